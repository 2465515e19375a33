//! Where a Job the agent created stands, read the same way for build steps, release commands
//! and one-off runs: the Job's own conditions decide, its pod says how the command ended.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

/// A Job's state, with its pod when there is one.
pub enum JobState {
    /// Not finished.
    Running(Option<Pod>),
    /// Every container exited 0.
    Complete(Option<Pod>),
    /// A container failed, or the Job's deadline (`timed_out_after`, seconds) ended it.
    Failed {
        timed_out_after: Option<i64>,
        pod: Option<Pod>,
    },
}

/// Reads `job`'s state and its pod (Jobs the agent creates never retry: one pod).
pub async fn state(client: &Client, job: &Job) -> Result<JobState, kube::Error> {
    let namespace = job.namespace().unwrap_or_default();
    let pod = Api::<Pod>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels(&format!("job-name={}", job.name_any())))
        .await?
        .items
        .into_iter()
        .next();
    Ok(of(job, pod))
}

/// The state `job`'s conditions give, with `pod`.
pub fn of(job: &Job, pod: Option<Pod>) -> JobState {
    let conditions = job
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let holds = |type_: &str| conditions.iter().find(|c| c.type_ == type_ && c.status == "True");
    if holds("Complete").is_some() {
        return JobState::Complete(pod);
    }
    if let Some(failed) = holds("Failed") {
        let timed_out_after = (failed.reason.as_deref() == Some("DeadlineExceeded")).then(|| {
            job.spec
                .as_ref()
                .and_then(|s| s.active_deadline_seconds)
                .unwrap_or_default()
        });
        return JobState::Failed { timed_out_after, pod };
    }
    JobState::Running(pod)
}

/// The message of `job`'s `Failed` condition (say, "Job has reached the specified backoff
/// limit"), if it failed.
pub fn failure_message(job: &Job) -> Option<String> {
    job.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Failed" && c.status == "True")
        .map(|c| c.message.clone().unwrap_or_else(|| "failed".into()))
}

/// How `container` (an init container or a main one) of `pod` ended, if it did.
pub fn terminated(pod: &Pod, container: &str) -> Option<ContainerStateTerminated> {
    let status = pod.status.as_ref()?;
    status
        .container_statuses
        .iter()
        .flatten()
        .chain(status.init_container_statuses.iter().flatten())
        .find(|c| c.name == container)?
        .state
        .as_ref()?
        .terminated
        .clone()
}

/// `exit <code>` and the container's termination message (its own, or with
/// `FallbackToLogsOnError` the last lines of its log), for status messages.
pub fn exit_summary(terminated: &ContainerStateTerminated) -> String {
    let mut said = format!("exit {}", terminated.exit_code);
    if let Some(message) = terminated
        .message
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty())
    {
        said.push_str(&format!(": {message}"));
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(conditions: serde_json::Value) -> Job {
        serde_json::from_value(json!({
            "metadata": {"name": "j", "namespace": "n"},
            "spec": {"activeDeadlineSeconds": 60, "template": {}},
            "status": {"conditions": conditions},
        }))
        .unwrap()
    }

    fn pod(exit_code: i32, message: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "j-abc"},
            "status": {"containerStatuses": [{
                "name": "run", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": exit_code, "message": message}},
            }]},
        }))
        .unwrap()
    }

    #[test]
    fn conditions_decide_and_the_pod_says_how_it_ended() {
        assert!(matches!(of(&job(json!([])), None), JobState::Running(None)));
        let complete = json!([{"type": "Complete", "status": "True"}]);
        assert!(matches!(of(&job(complete), None), JobState::Complete(None)));
        let deadline = json!([{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]);
        assert!(matches!(
            of(&job(deadline), None),
            JobState::Failed {
                timed_out_after: Some(60),
                ..
            }
        ));
        let failed = json!([{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "Job has reached the specified backoff limit"}]);
        assert_eq!(
            failure_message(&job(failed.clone())).as_deref(),
            Some("Job has reached the specified backoff limit")
        );
        assert_eq!(failure_message(&job(json!([]))), None);
        let JobState::Failed {
            timed_out_after: None,
            pod: Some(pod),
        } = of(&job(failed), Some(pod(3, "  no such table\n")))
        else {
            panic!("a failed Job");
        };
        let ended = terminated(&pod, "run").expect("terminated");
        assert_eq!(exit_summary(&ended), "exit 3: no such table");
        assert!(terminated(&pod, "other").is_none());
    }
}
