//! The test cluster has nodes (kwok, scheduled by the real kube-scheduler): pods start and
//! become Ready, Jobs and Deployments are driven to their outcomes by the real
//! kube-controller-manager, and each test picks how its pods end with a Stage of its own.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_testenv::{PodOutcome, PodSelector, set_pod_outcome};
use support::{client, eventually, fresh_namespace};

fn job(name: &str, image: &str, deadline: Option<i64>) -> Job {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "activeDeadlineSeconds": deadline,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "build", "image": image}],
            }},
        },
    }))
    .unwrap()
}

/// The condition of `type_` that is True on the Job, if any (with its reason).
async fn job_condition(jobs: &Api<Job>, name: &str, type_: &str) -> Option<(String, String)> {
    let job = jobs.get(name).await.unwrap();
    job.status?
        .conditions?
        .into_iter()
        .find(|c| c.type_ == type_ && c.status == "True")
        .map(|c| (c.reason.unwrap_or_default(), c.message.unwrap_or_default()))
}

async fn pods_of(client: &Client, namespace: &str, job: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("job-name={job}")))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn nodes_are_ready_and_advertise_the_kubelet_endpoint() {
    let client = client().await;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels("shapeblock.io/simulated-node=kwok"))
        .await
        .unwrap();
    assert!(nodes.items.len() >= 2, "two simulated nodes");
    for node in nodes.items {
        let status = node.status.unwrap();
        let ready = status.conditions.unwrap_or_default();
        assert!(ready.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let addresses = status.addresses.unwrap_or_default();
        assert!(
            addresses
                .iter()
                .any(|a| a.type_ == "InternalIP" && a.address == "127.0.0.1")
        );
        let port = status.daemon_endpoints.unwrap().kubelet_endpoint.unwrap().port;
        assert!(port > 0);
    }
}

#[tokio::test]
async fn a_job_whose_pod_succeeds_is_complete_with_the_termination_message() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "job-ok").await;
    let digest = "sha256:0f9e7c0f6ba3b1b0a3c2dd5e1e3c3a6f7d0b8a41c1d0b7c3e8f9a0b1c2d3e4f5";
    set_pod_outcome(
        &client,
        &PodSelector::container(&namespace, "build"),
        &PodOutcome::Succeed {
            after: Duration::from_millis(300),
            message: Some(digest.into()),
        },
    )
    .await
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    jobs.create(&PostParams::default(), &job("ok", "kaniko:latest", None))
        .await
        .unwrap();
    let (reason, took) = eventually(Duration::from_secs(30), "the Job to complete", || async {
        job_condition(&jobs, "ok", "Complete").await
    })
    .await;
    println!("Job complete ({reason:?}) in {took:?}");
    let pods = pods_of(&client, &namespace, "ok").await;
    let status = pods[0].status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    let terminated = status.container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.message.as_deref()),
        (0, Some(digest))
    );
}

#[tokio::test]
async fn a_job_whose_pod_fails_is_failed_and_the_message_is_on_the_pod() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "job-fail").await;
    set_pod_outcome(
        &client,
        &PodSelector::image(&namespace, "kaniko:broken"),
        &PodOutcome::Fail {
            after: Duration::from_millis(200),
            exit_code: 3,
            message: "error building image: COPY failed: no such file app.py".into(),
        },
    )
    .await
    .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    jobs.create(&PostParams::default(), &job("broken", "kaniko:broken", None))
        .await
        .unwrap();
    let ((reason, _), took) = eventually(Duration::from_secs(30), "the Job to fail", || async {
        job_condition(&jobs, "broken", "Failed").await
    })
    .await;
    println!("Job failed ({reason}) in {took:?}");
    assert_eq!(reason, "BackoffLimitExceeded");
    let pods = pods_of(&client, &namespace, "broken").await;
    let status = pods[0].status.clone().unwrap();
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    let terminated = status.container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(terminated.exit_code, 3);
    assert_eq!(
        terminated.message.as_deref(),
        Some("error building image: COPY failed: no such file app.py")
    );
}

#[tokio::test]
async fn a_hanging_job_exceeds_its_deadline() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "job-hang").await;
    set_pod_outcome(&client, &PodSelector::namespace(&namespace), &PodOutcome::Hang)
        .await
        .unwrap();
    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    jobs.create(&PostParams::default(), &job("slow", "kaniko:latest", Some(2)))
        .await
        .unwrap();
    // It runs (so it is not just unscheduled) ...
    eventually(Duration::from_secs(20), "the pod to run", || async {
        let pods = pods_of(&client, &namespace, "slow").await;
        pods.first()
            .and_then(|p| p.status.clone()?.phase)
            .filter(|phase| phase == "Running")
    })
    .await;
    // ... and the Job controller stops it at the deadline, and the pod goes away.
    let ((reason, _), took) = eventually(Duration::from_secs(30), "DeadlineExceeded", || async {
        job_condition(&jobs, "slow", "Failed").await
    })
    .await;
    println!("Job failed ({reason}) after {took:?}");
    assert_eq!(reason, "DeadlineExceeded");
    eventually(
        Duration::from_secs(30),
        "the killed pod to be deleted",
        || async {
            pods_of(&client, &namespace, "slow")
                .await
                .is_empty()
                .then_some(())
        },
    )
    .await;
}

fn deployment(name: &str, image: &str, replicas: i32, progress_deadline: i32) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "progressDeadlineSeconds": progress_deadline,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "web", "image": image}]},
            },
        },
    }))
    .unwrap()
}

#[tokio::test]
async fn a_deployment_rolls_out_and_a_never_ready_rollout_exceeds_its_progress_deadline() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "deploy").await;
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &namespace);
    deployments
        .create(&PostParams::default(), &deployment("web", "web:v1", 3, 600))
        .await
        .unwrap();
    let (_, took) = eventually(Duration::from_secs(30), "3 available replicas", || async {
        let status = deployments.get("web").await.unwrap().status?;
        (status.available_replicas == Some(3) && status.updated_replicas == Some(3)).then_some(())
    })
    .await;
    println!("3 replicas available in {took:?}");
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert!(
        pods.items.iter().all(|p| p
            .spec
            .as_ref()
            .unwrap()
            .node_name
            .as_deref()
            .unwrap_or("")
            .starts_with("kwok-node-")),
        "every pod was bound to a simulated node by the scheduler"
    );

    // v2 never becomes ready: the rollout stalls and the controller says so.
    set_pod_outcome(
        &client,
        &PodSelector::image(&namespace, "web:v2"),
        &PodOutcome::NeverReady,
    )
    .await
    .unwrap();
    let mut web = deployments.get("web").await.unwrap();
    let spec = web.spec.as_mut().unwrap();
    spec.progress_deadline_seconds = Some(3);
    spec.template.spec.as_mut().unwrap().containers[0].image = Some("web:v2".into());
    deployments
        .replace("web", &PostParams::default(), &web)
        .await
        .unwrap();
    let (reason, took) = eventually(Duration::from_secs(40), "ProgressDeadlineExceeded", || async {
        let conditions = deployments.get("web").await.unwrap().status?.conditions?;
        conditions
            .into_iter()
            .find(|c| c.type_ == "Progressing" && c.status == "False")
            .and_then(|c| c.reason)
    })
    .await;
    println!("rollout stalled ({reason}) after {took:?}");
    assert_eq!(reason, "ProgressDeadlineExceeded");
    let status = deployments.get("web").await.unwrap().status.unwrap();
    assert_eq!(
        status.available_replicas,
        Some(3),
        "the old replicas keep serving"
    );
    let pods = Api::<Pod>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    let v2: Vec<&Pod> = pods
        .items
        .iter()
        .filter(|p| p.spec.as_ref().unwrap().containers[0].image.as_deref() == Some("web:v2"))
        .collect();
    assert!(!v2.is_empty(), "the new ReplicaSet made pods");
    for pod in v2 {
        let status = pod.status.clone().unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"), "{}", pod.name_any());
        assert!(!status.container_statuses.unwrap()[0].ready);
    }
}
