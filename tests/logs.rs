//! Container logs reach clients through the real pod log API: the apiserver proxies
//! `pods/log` to the simulated nodes' kubelet endpoint, which serves what the test chose,
//! streams while lines are appended, and ends the stream when the container terminates.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, LogParams, PostParams};
use serde_json::json;
use shapeblock_testenv::{self as testenv, ContainerRef, PodOutcome, PodSelector, logs, set_pod_outcome};
use support::{client, eventually, fresh_namespace};

async fn running_pod(client: &Client, namespace: &str, name: &str) -> Api<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "build", "image": "builder:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    eventually(Duration::from_secs(20), "the pod to run", || async {
        let phase = pods.get(name).await.unwrap().status?.phase?;
        (phase == "Running").then_some(())
    })
    .await;
    pods
}

#[tokio::test]
async fn pod_logs_return_the_chosen_lines_and_honour_since_tail_and_limit() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "logs").await;
    set_pod_outcome(&client, &PodSelector::namespace(&namespace), &PodOutcome::Hang)
        .await
        .unwrap();
    let pods = running_pod(&client, &namespace, "builder").await;
    let log = ContainerRef::new(&namespace, "builder", "build");
    let start: Timestamp = "2026-01-01T10:00:00Z".parse().unwrap();
    for i in 0..5 {
        logs().append_at(&log, &format!("step {i}"), start + SignedDuration::from_secs(i));
    }
    let get = |params: LogParams| {
        let pods = pods.clone();
        async move { pods.logs("builder", &params).await.unwrap() }
    };
    let all = LogParams {
        container: Some("build".into()),
        ..LogParams::default()
    };
    assert_eq!(get(all.clone()).await, "step 0\nstep 1\nstep 2\nstep 3\nstep 4\n");
    assert_eq!(
        get(LogParams {
            tail_lines: Some(2),
            ..all.clone()
        })
        .await,
        "step 3\nstep 4\n"
    );
    assert_eq!(
        get(LogParams {
            limit_bytes: Some(10),
            ..all.clone()
        })
        .await,
        "step 0\nste"
    );
    assert_eq!(
        get(LogParams {
            since_time: Some(start + SignedDuration::from_secs(3)),
            ..all.clone()
        })
        .await,
        "step 3\nstep 4\n"
    );
    let stamped = get(LogParams {
        timestamps: true,
        tail_lines: Some(1),
        ..all.clone()
    })
    .await;
    assert_eq!(stamped, "2026-01-01T10:00:04Z step 4\n");
}

#[tokio::test]
async fn scripted_lines_are_the_log_of_pods_created_later() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "logs-script").await;
    logs().script(
        &namespace,
        "build",
        &["Cloning into 'app'...", "Pushed sha256:abc"],
    );
    set_pod_outcome(&client, &PodSelector::namespace(&namespace), &PodOutcome::Hang)
        .await
        .unwrap();
    let pods = running_pod(&client, &namespace, "later").await;
    let text = pods
        .logs(
            "later",
            &LogParams {
                container: Some("build".into()),
                ..LogParams::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(text, "Cloning into 'app'...\nPushed sha256:abc\n");
}

#[tokio::test]
async fn kubectl_logs_follow_streams_appended_lines_and_ends_when_the_container_terminates() {
    let plane = testenv::shared().unwrap();
    let kubectl = testenv::default_bin_dir().join("kubectl");
    let client = client().await;
    let namespace = fresh_namespace(&client, "logs-follow").await;
    set_pod_outcome(
        &client,
        &PodSelector::namespace(&namespace),
        &PodOutcome::Succeed {
            after: Duration::from_secs(6),
            message: None,
        },
    )
    .await
    .unwrap();
    let pods = running_pod(&client, &namespace, "follow").await;
    let log = ContainerRef::new(&namespace, "follow", "build");
    logs().append(&log, "first");

    let mut child = Command::new(&kubectl)
        .arg(format!("--kubeconfig={}", plane.kubeconfig.display()))
        .args(["logs", "-f", "-n", &namespace, "follow", "-c", "build"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    let (lines, received) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let _ = lines.send(line.unwrap());
        }
    });
    let next = |what: &str| {
        received
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("kubectl logs -f did not print {what}"))
    };
    assert_eq!(next("the first line"), "first");
    // A line appended while the client is attached arrives on the open stream.
    logs().append(&log, "second");
    assert_eq!(next("the appended line"), "second");
    logs().append(&log, "third");
    assert_eq!(next("the next appended line"), "third");
    let still_running = pods.get("follow").await.unwrap().status.unwrap().phase;
    assert_eq!(
        still_running.as_deref(),
        Some("Running"),
        "the stream was open while running"
    );

    // The container terminates (its Stage ends it): the stream ends and kubectl exits 0.
    let exited = eventually(Duration::from_secs(20), "kubectl logs -f to end", || {
        let status = child.try_wait().unwrap();
        async move { status }
    })
    .await
    .0;
    assert!(exited.success(), "kubectl logs -f exited with {exited}");
    let phase = pods.get("follow").await.unwrap().status.unwrap().phase;
    assert_eq!(
        phase.as_deref(),
        Some("Succeeded"),
        "the stream ended because the container did"
    );
    assert!(received.try_recv().is_err(), "nothing after the last line");
}
