//! One-off runs and secret config vars through the hub, end to end: the reference hub over
//! real mTLS, the real agent binary, the simulated cluster with the real helm-controller and
//! Helm. A run's output comes back to the hub like a build log and its exit code into its
//! status; a secret config var set through the hub lands in the App's config Secret only and
//! releases the App without a build.

mod support;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use prost::Message;
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase, AppPhase, AppRun, AppRunPhase, ReleaseReason};
use shapeblock_agent::proto::v1::server_message::Body as Down;
use shapeblock_agent::proto::v1::{ServerMessage, SetConfig};
use shapeblock_hub::Hub;
use shapeblock_testenv::{PodOutcome, PodSelector, logs, set_pod_outcome};
use support::agent::*;
use support::eventually;

const IMAGE: &str = "registry.example.com/demo/shop:1.0";
const SECRET_VALUE: &str = "tok-5b1f0c9e-never-anywhere-else";
const HUB_TIMEOUT: Duration = Duration::from_secs(60);
const ROLLOUT: Duration = Duration::from_secs(180);

async fn deployed_app(client: &Client, project: &str) -> App {
    create(
        Api::<App>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "shop"}, "spec": {
            "registry": {"url": "registry.example.com"},
            "build": {"type": "image", "image": IMAGE},
            "config": {"GREETING": "hello"},
            "processes": {"web": {"command": ["node", "server.js"], "port": 8080, "resources": {"requests": {"cpu": "100m"}}}},
        }}),
    )
    .await;
    wait_app(client, project, "shop", AppPhase::Ready).await;
    create(
        Api::<AppBuild>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": "shop-1"}, "spec": {"appName": "shop"}}),
    )
    .await;
    wait_build(client, project, "shop-1", AppBuildPhase::Completed).await;
    wait_app(client, project, "shop", AppPhase::Deployed).await
}

async fn result_of(hub: &Hub, cluster: &str, seq: u64) -> (bool, String) {
    eventually(HUB_TIMEOUT, &format!("the result of command {seq}"), || {
        support::hub::result_of(hub, cluster, seq)
    })
    .await
    .0
}

fn run_manifest(namespace: &str, name: &str, app: &str, command: &[&str]) -> String {
    json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1",
        "kind": "AppRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"appName": app, "command": command},
    })
    .to_string()
}

async fn wait_run(client: &Client, namespace: &str, name: &str, phase: AppRunPhase) -> AppRun {
    let runs = Api::<AppRun>::namespaced(client.clone(), namespace);
    eventually(HUB_TIMEOUT, &format!("AppRun {name} {phase:?}"), || async {
        let run = runs.get_opt(name).await.ok()??;
        (run.status.as_ref()?.phase? == phase).then_some(run)
    })
    .await
    .0
}

/// Secret config vars set through the hub: in the config Secret, released without a build,
/// named (never valued) in results, forgotten by the hub once confirmed; bad commands refused
/// with a reason. One-off runs: the failing one's output and exit code come back, its Job
/// copies web and goes once the output is delivered; a run of a missing App waits and says why.
#[tokio::test]
async fn secret_config_through_the_hub_and_one_off_runs_with_their_output_and_exit_codes() {
    let env = env().await;
    // A previous test's identity would belong to another hub.
    let _ = Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
        .delete("shapeblock-agent-identity", &Default::default())
        .await;
    let data = tempfile::tempdir().unwrap();
    let hub = support::hub::start(data.path()).await;
    let cluster = support::unique_name("runs");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let agent = env
        .agent(&[
            &format!("--hub-address={}", hub.url()),
            &format!("--enroll-token={token}"),
            &format!("--ca-hash={}", hub.ca_hash()),
            "--heartbeat-seconds=2",
            "--reconnect-max-seconds=2",
        ])
        .await;
    let project = ready_project(&env.client, "runs").await;
    let app = deployed_app(&env.client, &project).await;
    let first_revision = app.status.as_ref().unwrap().config_revision.unwrap();
    let jobs = Api::<Job>::namespaced(env.client.clone(), &project);

    // A secret config var through the hub.
    let seq = hub
        .set_config(
            &cluster,
            SetConfig {
                namespace: project.clone(),
                app: "shop".into(),
                set: [("API_TOKEN".to_string(), SECRET_VALUE.to_string())].into(),
                unset: vec![],
            },
        )
        .await
        .unwrap();
    let (ok, message) = result_of(&hub, &cluster, seq).await;
    assert!(ok, "{message}");
    assert!(
        message.contains("API_TOKEN") && !message.contains(SECRET_VALUE),
        "{message}"
    );
    let secret = Api::<Secret>::namespaced(env.client.clone(), &project)
        .get("shop-config")
        .await
        .unwrap();
    assert_eq!(
        secret.data.unwrap()["API_TOKEN"].0,
        SECRET_VALUE.as_bytes(),
        "the value is in the App's config Secret"
    );
    let releases = eventually(ROLLOUT, "a config-change release", || async {
        let app = Api::<App>::namespaced(env.client.clone(), &project)
            .get("shop")
            .await
            .ok()?;
        let releases = app.status?.releases;
        (releases.last()?.reason == ReleaseReason::ConfigChange).then_some(releases)
    })
    .await
    .0;
    let last = releases.last().unwrap();
    assert!(last.config_revision > first_revision);
    assert_eq!(last.build.as_deref(), Some("shop-1"), "released without a build");
    assert!(
        releases[0].rolled_out.is_some(),
        "the build's release rolled out: {releases:?}"
    );
    // The record says when the config change had rolled out, once it has.
    let rolled_out = eventually(ROLLOUT, "the config-change release rolled out", || async {
        let app = Api::<App>::namespaced(env.client.clone(), &project)
            .get("shop")
            .await
            .ok()?;
        let last = app.status?.releases.last()?.clone();
        (last.version == releases.last().unwrap().version).then_some(last.rolled_out)?
    })
    .await
    .0;
    let web = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(env.client.clone(), &project)
        .get("shop-web")
        .await
        .unwrap();
    let web_status = web.status.unwrap();
    assert_eq!(web_status.updated_replicas, web_status.available_replicas);
    assert!(rolled_out.0 >= releases.last().unwrap().time.0);
    // Confirmed: the hub keeps the names, not the values.
    let stored = hub
        .store()
        .commands(&cluster)
        .await
        .unwrap()
        .into_iter()
        .find(|c| c.seq == seq)
        .unwrap();
    let Some(Down::SetConfig(kept)) = ServerMessage::decode(stored.body.as_slice()).unwrap().body else {
        panic!("a set-config command");
    };
    assert_eq!(kept.set.keys().collect::<Vec<_>>(), ["API_TOKEN"]);
    assert!(kept.set.values().all(String::is_empty), "{kept:?}");

    // Hostile or mistaken set-config commands (queued raw, past the hub's own checks).
    let raw = |command: SetConfig| {
        ServerMessage {
            seq: 0,
            body: Some(Down::SetConfig(command)),
        }
        .encode_to_vec()
    };
    let bad_name = hub
        .queue(
            &cluster,
            raw(SetConfig {
                namespace: project.clone(),
                app: "shop".into(),
                set: [("BAD-NAME".to_string(), SECRET_VALUE.to_string())].into(),
                unset: vec![],
            }),
        )
        .await
        .unwrap();
    let no_app = hub
        .queue(
            &cluster,
            raw(SetConfig {
                namespace: project.clone(),
                app: "nope".into(),
                set: [("A".to_string(), SECRET_VALUE.to_string())].into(),
                unset: vec![],
            }),
        )
        .await
        .unwrap();
    let (ok, message) = result_of(&hub, &cluster, bad_name).await;
    assert!(!ok && message.contains("not a config var name"), "{message}");
    assert!(!message.contains(SECRET_VALUE), "{message}");
    let (ok, message) = result_of(&hub, &cluster, no_app).await;
    assert!(!ok && message.contains("does not exist"), "{message}");

    // A one-off run that fails: its output and exit code come back.
    logs().script(
        &project,
        "run",
        &["== Migrating", "error: relation \"orders\" does not exist"],
    );
    let failing = set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "run"),
        &PodOutcome::Fail {
            after: Duration::from_secs(3),
            exit_code: 3,
            message: "relation \"orders\" does not exist".into(),
        },
    )
    .await
    .unwrap();
    hub.apply(
        &cluster,
        &run_manifest(&project, "migrate-1", "shop", &["rake", "db:migrate"]),
    )
    .await
    .unwrap();
    // While it runs: the Job is web's container with the command.
    let job = eventually(HUB_TIMEOUT, "the run's Job", || async {
        jobs.get_opt("migrate-1").await.ok()?
    })
    .await
    .0;
    let pod = job.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some(IMAGE));
    assert_eq!(container.command.as_deref().unwrap(), ["rake", "db:migrate"]);
    let env_vars = container.env.clone().unwrap_or_default();
    assert!(
        env_vars
            .iter()
            .any(|e| e.name == "GREETING" && e.value.as_deref() == Some("hello"))
    );
    assert!(
        container
            .env_from
            .iter()
            .flatten()
            .any(|f| f.secret_ref.as_ref().is_some_and(|s| s.name == "shop-config")),
        "the run sees the secret config vars by reference: {:?}",
        container.env_from
    );
    assert!(container.resources.as_ref().is_some_and(|r| r.requests.is_some()));

    let run = wait_run(&env.client, &project, "migrate-1", AppRunPhase::Failed).await;
    let status = run.status.unwrap();
    assert_eq!(status.exit_code, Some(3));
    assert_eq!(status.reason.as_deref(), Some("Exited"));
    assert!(
        status.message.as_deref().unwrap().contains("exit 3"),
        "{status:?}"
    );
    assert_eq!(status.image.as_deref(), Some(IMAGE));
    assert_eq!(status.build.as_deref(), Some("shop-1"));
    let stream = format!("{project}/runs/migrate-1/run");
    let output = eventually(HUB_TIMEOUT, "the run's output at the hub", || async {
        let (bytes, _, eof) = hub.store().log(&cluster, &stream).await.ok()?;
        eof.then(|| String::from_utf8_lossy(&bytes).into_owned())
    })
    .await
    .0;
    assert_eq!(
        output,
        "== Migrating\nerror: relation \"orders\" does not exist\n"
    );
    eventually(HUB_TIMEOUT, "the hub to see the run failed", || async {
        let objects = hub.store().objects(&cluster).await.ok()?;
        let key = format!("AppRun/{project}/migrate-1");
        objects
            .iter()
            .find(|o| o.key == key && o.phase == "Failed")
            .map(|o| o.message.clone())
    })
    .await;
    eventually(
        HUB_TIMEOUT,
        "the run's Job to go once its output is delivered",
        || async { jobs.get_opt("migrate-1").await.ok()?.is_none().then_some(()) },
    )
    .await;
    failing.remove(&env.client).await.unwrap();

    // What a run runs is fixed.
    let runs = Api::<AppRun>::namespaced(env.client.clone(), &project);
    let refused = runs
        .patch(
            "migrate-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"command": ["sh"]}})),
        )
        .await
        .expect_err("an AppRun's command is immutable");
    assert!(refused.to_string().contains("immutable"), "{refused}");

    // One that succeeds; and one for an App that does not exist waits and says so.
    hub.apply(
        &cluster,
        &run_manifest(&project, "seed-1", "shop", &["rake", "db:seed"]),
    )
    .await
    .unwrap();
    hub.apply(&cluster, &run_manifest(&project, "lost-1", "nope", &["true"]))
        .await
        .unwrap();
    let run = wait_run(&env.client, &project, "seed-1", AppRunPhase::Succeeded).await;
    assert_eq!(run.status.unwrap().exit_code, Some(0));
    let lost = wait_run(&env.client, &project, "lost-1", AppRunPhase::Pending).await;
    let status = lost.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("AppNotFound"), "{status:?}");
    assert!(jobs.get_opt("lost-1").await.unwrap().is_none());

    // The secret value went nowhere else: not the hub's events, logs or objects, not the
    // agent's log, not the cluster's Events.
    let mut places = vec![
        ("agent log", agent.log_tail(200_000)),
        (
            "hub events",
            format!("{:?}", hub.store().events(&cluster).await.unwrap()),
        ),
        (
            "hub objects",
            format!("{:?}", hub.store().objects(&cluster).await.unwrap()),
        ),
        ("run output", output),
    ];
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(env.client.clone(), &project)
        .list(&ListParams::default())
        .await
        .unwrap();
    places.push(("Events", serde_json::to_string(&events.items).unwrap()));
    for (place, text) in &places {
        assert!(
            !text.contains(SECRET_VALUE),
            "the secret value leaked into {place}"
        );
    }
    drop(agent);
    let _ = Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
        .delete("shapeblock-agent-identity", &Default::default())
        .await;
}
