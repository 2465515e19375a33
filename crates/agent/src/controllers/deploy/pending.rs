//! A Helm release left `pending-install`, `pending-upgrade` or `pending-rollback`.
//!
//! Helm writes the new revision's record (a Secret labelled `status=pending-*`) before it
//! changes anything and marks it `deployed` or `failed` at the end. A helm that is killed or
//! loses the apiserver in between (an apiserver restart during the helm-controller's install
//! Job, found by the soak bench) leaves the record pending, and from then on Helm refuses every
//! operation on the release ("another operation (install/upgrade/rollback) is in progress"):
//! each retry of the Job fails, and the App or service could never be deployed again.
//!
//! The revision is judged abandoned only on evidence that no helm is working on it: the
//! helm-controller's Job for the release failed (its retries are exhausted) after the record
//! was written, and nothing of it still runs. The agent then deletes that record (the revision
//! before it, still `deployed`, keeps serving: Helm marks it `superseded` only after success)
//! and the failed Job, so that the helm-controller runs the install again from a release Helm
//! accepts. The delete carries the record's uid and resourceVersion as preconditions, so a
//! record that changed since it was judged is left alone.

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Preconditions, PropagationPolicy};
use kube::core::PartialObjectMeta;

use crate::controllers::job_state;

/// A release record Helm will not get past.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stuck {
    pub secret: String,
    pub version: u32,
    pub status: String,
    uid: Option<String>,
    resource_version: Option<String>,
}

impl Stuck {
    /// For an Event: what was found and what the agent did about it.
    pub fn describe(&self, release: &str, job: &str) -> String {
        format!(
            "Helm release {release} revision {} was left {} by an interrupted install and the helm-controller's Job {job} failed on it; removed that revision (the one before it keeps serving) and the failed Job, so the helm-controller installs again",
            self.version, self.status
        )
    }
}

/// The release records (Secret metadata) of `release` in `namespace`.
pub async fn revisions(
    client: &kube::Client,
    namespace: &str,
    release: &str,
) -> Result<Vec<PartialObjectMeta<Secret>>, kube::Error> {
    Ok(Api::<Secret>::namespaced(client.clone(), namespace)
        .list_metadata(&ListParams::default().labels(&format!("owner=helm,name={release}")))
        .await?
        .items)
}

/// The newest revision and its status.
pub fn newest(records: &[PartialObjectMeta<Secret>]) -> Option<(u32, String)> {
    records
        .iter()
        .filter_map(|s| {
            Some((
                s.labels().get("version")?.parse::<u32>().ok()?,
                s.labels().get("status")?.clone(),
            ))
        })
        .max_by_key(|(version, _)| *version)
}

/// The newest record, if it is pending and `installer` (the helm-controller's Job for the
/// release, read after the records) shows that no helm is working on it. Pure: the caller
/// reads both.
pub fn stuck(records: &[PartialObjectMeta<Secret>], installer: Option<&Job>) -> Option<Stuck> {
    let record = records
        .iter()
        .filter(|s| {
            s.labels()
                .get("version")
                .and_then(|v| v.parse::<u32>().ok())
                .is_some()
        })
        .max_by_key(|s| s.labels()["version"].parse::<u32>().unwrap_or(0))?;
    let status = record.labels().get("status")?;
    if !status.starts_with("pending-") || record.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let job = installer?;
    job_state::failure_message(job)?;
    let job_status = job.status.as_ref()?;
    if job_status.active.unwrap_or(0) > 0 {
        return None;
    }
    // The Job must have failed after the record was written: a Job that failed earlier says
    // nothing about a revision a newer helm may be writing now.
    let failed_at = job_status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Failed" && c.status == "True")?
        .last_transition_time
        .as_ref()?;
    let written = record.metadata.creation_timestamp.as_ref()?;
    if failed_at.0 < written.0 {
        return None;
    }
    Some(Stuck {
        secret: record.name_any(),
        version: record.labels()["version"].parse().ok()?,
        status: status.clone(),
        uid: record.metadata.uid.clone(),
        resource_version: record.metadata.resource_version.clone(),
    })
}

/// Removes the stuck record (only if it is still the one judged) and the failed Job (its pods
/// with it), after which the helm-controller creates the Job again.
pub async fn clear(
    client: &kube::Client,
    namespace: &str,
    stuck: &Stuck,
    job_namespace: &str,
    job: &str,
) -> Result<(), kube::Error> {
    let exactly = DeleteParams {
        preconditions: Some(Preconditions {
            uid: stuck.uid.clone(),
            resource_version: stuck.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    match Api::<Secret>::namespaced(client.clone(), namespace)
        .delete(&stuck.secret, &exactly)
        .await
    {
        Ok(_) => {}
        // Gone already, or changed since: a helm got to it, nothing to clear.
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => return Ok(()),
        Err(err) => return Err(err),
    }
    let background = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    match Api::<Job>::namespaced(client.clone(), job_namespace)
        .delete(job, &background)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

    fn at(seconds: i64) -> Time {
        Time(Timestamp::from_second(1_800_000_000 + seconds).unwrap())
    }

    fn record(version: u32, status: &str, written: i64) -> PartialObjectMeta<Secret> {
        PartialObjectMeta {
            metadata: ObjectMeta {
                name: Some(format!("sh.helm.release.v1.web.v{version}")),
                uid: Some(format!("uid-{version}")),
                resource_version: Some(format!("{version}00")),
                creation_timestamp: Some(at(written)),
                labels: Some(
                    [("owner", "helm"), ("name", "web"), ("status", status)]
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .chain([("version".to_string(), version.to_string())])
                        .collect(),
                ),
                ..ObjectMeta::default()
            },
            ..PartialObjectMeta::default()
        }
    }

    fn job(failed_at: Option<i64>, active: i32) -> Job {
        Job {
            status: Some(JobStatus {
                active: Some(active),
                conditions: failed_at.map(|t| {
                    vec![JobCondition {
                        type_: "Failed".into(),
                        status: "True".into(),
                        message: Some("Job has reached the specified backoff limit".into()),
                        last_transition_time: Some(at(t)),
                        ..JobCondition::default()
                    }]
                }),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    #[test]
    fn a_pending_revision_the_failed_job_left_is_stuck() {
        let records = [record(1, "deployed", 0), record(2, "pending-upgrade", 10)];
        let stuck = stuck(&records, Some(&job(Some(60), 0))).expect("stuck");
        assert_eq!(stuck.secret, "sh.helm.release.v1.web.v2");
        assert_eq!((stuck.version, stuck.status.as_str()), (2, "pending-upgrade"));
        assert_eq!(stuck.uid.as_deref(), Some("uid-2"));
        assert_eq!(stuck.resource_version.as_deref(), Some("200"));
        assert_eq!(newest(&records), Some((2, "pending-upgrade".into())));
    }

    #[test]
    fn nothing_is_stuck_while_a_helm_may_still_be_working() {
        let pending = [record(1, "deployed", 0), record(2, "pending-upgrade", 10)];
        // No Job, a Job still running, one that has not failed, one running a retry, and one
        // that failed before this revision was written (a newer helm may be writing it).
        assert_eq!(stuck(&pending, None), None);
        assert_eq!(stuck(&pending, Some(&job(None, 1))), None);
        assert_eq!(stuck(&pending, Some(&job(None, 0))), None);
        assert_eq!(stuck(&pending, Some(&job(Some(60), 1))), None);
        assert_eq!(stuck(&pending, Some(&job(Some(5), 0))), None);
    }

    #[test]
    fn only_the_newest_revision_and_only_a_pending_one_counts() {
        let failed = Some(&job(Some(60), 0)).cloned();
        let settled = [record(1, "pending-install", 0), record(2, "deployed", 10)];
        assert_eq!(stuck(&settled, failed.as_ref()), None);
        let failed_release = [record(1, "deployed", 0), record(2, "failed", 10)];
        assert_eq!(stuck(&failed_release, failed.as_ref()), None);
        assert_eq!(stuck(&[], failed.as_ref()), None);
        // Versions compare as numbers: v10 is newer than v9.
        let many = [record(9, "deployed", 0), record(10, "pending-rollback", 10)];
        assert_eq!(stuck(&many, failed.as_ref()).map(|s| s.version), Some(10));
        let install = [record(1, "pending-install", 10)];
        assert_eq!(stuck(&install, failed.as_ref()).map(|s| s.version), Some(1));
    }
}
