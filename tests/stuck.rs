//! Objects that used to get stuck without a word, each now with a reason on the object: values
//! the helm-controller cannot store, a deploy that never gets a release, a credentials Secret
//! somebody else made, and a finalizer somebody else put on an App holding its Project's
//! deletion. On the shared simulated cluster (real kube-controller-manager namespace controller
//! and quota admission, real k3s helm-controller).

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ResourceQuota, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{
    App, AppBuild, AppBuildPhase, AppPhase, BackingService, BackingServicePhase, Project,
};
use shapeblock_agent::controllers::deploy::{chart_name, service_chart_name};
use support::agent::*;
use support::{eventually, wait_event};

fn charts(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart"),
        "helmcharts",
    );
    Api::namespaced_with(client.clone(), AGENT_NS, &resource)
}

async fn image_app(client: &Client, project: &str, name: &str, extra: serde_json::Value) {
    let mut spec = json!({"registry": {"url": "registry.example.com"},
                          "build": {"type": "image", "image": "registry.example.com/demo/web:1.0"}});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    create(
        Api::<App>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": name}, "spec": spec}),
    )
    .await;
    wait_app(client, project, name, AppPhase::Ready).await;
}

/// Waits for a build to fail, and returns its reason and message.
async fn failure(client: &Client, project: &str, name: &str, within: Duration) -> (String, String) {
    let builds = Api::<AppBuild>::namespaced(client.clone(), project);
    eventually(within, &format!("AppBuild {name} to fail"), || async {
        let status = builds.get(name).await.unwrap().status?;
        if status.phase == Some(AppBuildPhase::Completed) {
            panic!("AppBuild {name} completed: {status:?}");
        }
        (status.phase == Some(AppBuildPhase::Failed)).then(|| {
            (
                status.reason.unwrap_or_default(),
                status.message.unwrap_or_default(),
            )
        })
    })
    .await
    .0
}

#[tokio::test]
async fn values_the_helm_controller_cannot_store_fail_the_build_with_the_size_and_the_limit() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "big").await;
    // 34 vars of 32 KiB (the schema's most per value): 1.06 MiB of config, an App the apiserver
    // stores, but values the helm-controller's 1 MiB values Secret cannot hold.
    let config: BTreeMap<String, String> = (0..34)
        .map(|i| (format!("BLOB_{i:02}"), format!("{i:02}").repeat(16 * 1024)))
        .collect();
    image_app(&env.client, &project, "web", json!({"config": config})).await;
    create_build(&env.client, &project, "web-1", "web", json!({})).await;
    let (reason, message) = failure(&env.client, &project, "web-1", BUILD_TIMEOUT).await;
    eprintln!("{reason}: {message}");
    assert_eq!(reason, "ValuesTooLarge", "{message}");
    assert!(
        message.contains("960 KiB") && message.contains("the helm-controller can store"),
        "{message}"
    );
    let size: usize = message
        .split(" KiB (")
        .next()
        .and_then(|head| head.rsplit(' ').next())
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no size in {message}"));
    assert!(size > 1024, "{message}");
    // Nothing was handed to the helm-controller.
    assert!(
        charts(&env.client)
            .get_opt(&chart_name(&project, "web"))
            .await
            .unwrap()
            .is_none()
    );
    wait_event(&env.client, &project, "web-1", |e| {
        e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some("ValuesTooLarge")
    })
    .await;
}

/// Forbids pods in the agent's namespace (where the helm-controller runs its install Jobs)
/// until dropped.
struct NoInstallPods(Api<ResourceQuota>);

impl NoInstallPods {
    async fn new(client: &Client) -> Self {
        let quotas = Api::<ResourceQuota>::namespaced(client.clone(), AGENT_NS);
        let quota: ResourceQuota = serde_json::from_value(
            json!({"metadata": {"name": "no-install-pods"}, "spec": {"hard": {"pods": "0"}}}),
        )
        .unwrap();
        let _ = quotas.delete("no-install-pods", &DeleteParams::default()).await;
        quotas.create(&PostParams::default(), &quota).await.unwrap();
        // Admission enforces it once the quota controller has filled in its status.
        eventually(TIMEOUT, "the quota to be in force", || async {
            let quota = quotas.get("no-install-pods").await.unwrap();
            quota.status?.hard.filter(|h| h.contains_key("pods"))
        })
        .await;
        Self(quotas)
    }
}

impl Drop for NoInstallPods {
    fn drop(&mut self) {
        // Also when the test panics: later tests need install pods. (The client's connection
        // runs on this runtime, so wait on it in place rather than on another runtime.)
        let quotas = self.0.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let _ = quotas.delete("no-install-pods", &DeleteParams::default()).await;
            })
        });
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deploy_that_never_gets_a_release_fails_at_its_deadline_naming_the_install_job() {
    let env = env().await;
    let _agent = env.agent(&["--deploy-margin-seconds=0"]).await;
    let project = ready_project(&env.client, "deadline").await;
    image_app(
        &env.client,
        &project,
        "web",
        json!({"deploy": {"progressDeadlineSeconds": 30}}),
    )
    .await;
    let quota = NoInstallPods::new(&env.client).await;
    let started = std::time::Instant::now();
    create_build(&env.client, &project, "web-1", "web", json!({})).await;
    let (reason, message) = failure(&env.client, &project, "web-1", Duration::from_secs(120)).await;
    let waited = started.elapsed();
    drop(quota);
    eprintln!("after {waited:?}: {reason}: {message}");
    assert_eq!(reason, "DeployTimeout", "{message}");
    let chart = chart_name(&project, "web");
    assert!(
        message.contains("within 30s")
            && message.contains(&format!("HelmChart {AGENT_NS}/{chart}"))
            && message.contains(&format!("Job {AGENT_NS}/helm-install-{chart}")),
        "{message}"
    );
    assert!(message.contains("has no pod running"), "{message}");
    assert!(waited >= Duration::from_secs(30), "failed after {waited:?}");
}

/// What an interrupted `helm upgrade` leaves (an apiserver restart in the middle of the
/// helm-controller's Job, as the soak bench found): the release's next revision recorded
/// `pending-upgrade`, so that helm refuses every later operation on it. Forged here from the
/// deployed revision's own record, as helm writes one (gzipped JSON, base64, in the Secret).
async fn leave_pending_upgrade(client: &Client, project: &str, release: &str) -> String {
    use std::io::{Read, Write};
    let secrets = Api::<Secret>::namespaced(client.clone(), project);
    let deployed = secrets
        .get(&format!("sh.helm.release.v1.{release}.v1"))
        .await
        .unwrap();
    let encoded = &deployed.data.as_ref().unwrap()["release"].0;
    let gzipped = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded).unwrap();
    let mut json = String::new();
    flate2::read::GzDecoder::new(&gzipped[..])
        .read_to_string(&mut json)
        .unwrap();
    let mut record: serde_json::Value = serde_json::from_str(&json).unwrap();
    record["version"] = json!(2);
    record["info"]["status"] = json!("pending-upgrade");
    record["info"]["description"] = json!("Preparing upgrade");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(record.to_string().as_bytes()).unwrap();
    let data = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, gz.finish().unwrap());
    let name = format!("sh.helm.release.v1.{release}.v2");
    let mut labels = deployed.labels().clone();
    labels.insert("version".into(), "2".into());
    labels.insert("status".into(), "pending-upgrade".into());
    let forged = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            labels: Some(labels),
            ..Default::default()
        },
        type_: deployed.type_.clone(),
        data: Some([("release".to_string(), ByteString(data.into_bytes()))].into()),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &forged).await.unwrap();
    name
}

#[tokio::test]
async fn a_release_an_interrupted_install_left_pending_is_cleared_and_the_next_build_rolls_out() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "pending").await;
    image_app(&env.client, &project, "web", json!({})).await;
    create_build(&env.client, &project, "web-1", "web", json!({})).await;
    wait_build(&env.client, &project, "web-1", AppBuildPhase::Completed).await;
    let release = chart_name(&project, "web");
    let forged = leave_pending_upgrade(&env.client, &project, &release).await;

    // Helm refuses to upgrade past the pending revision: every attempt of the helm-controller's
    // Job fails, and without the agent every later build would too.
    create_build(&env.client, &project, "web-2", "web", json!({})).await;
    let build = wait_build(&env.client, &project, "web-2", AppBuildPhase::Completed).await;
    let status = build.status.unwrap();
    eprintln!("{:?}: {:?}", status.reason, status.message);
    // Helm wrote revision 2 again, this time deployed: the forged record is gone.
    assert_eq!(status.release_revision, Some(2), "{status:?}");
    let secrets = Api::<Secret>::namespaced(env.client.clone(), &project);
    let record = secrets.get(&forged).await.unwrap();
    assert_eq!(
        record.labels().get("status").map(String::as_str),
        Some("deployed"),
        "{:?}",
        record.labels()
    );
    let event = wait_event(&env.client, &project, "web-2", |e| {
        e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some("ReleaseRepaired")
    })
    .await;
    let note = event.note.unwrap_or_default();
    assert!(
        note.contains(&format!(
            "Helm release {release} revision 2 was left pending-upgrade"
        )) && note.contains(&format!("helm-install-{release}")),
        "{note}"
    );
}

#[tokio::test]
async fn a_credentials_secret_made_by_someone_else_fails_the_service_with_a_reason_and_an_event() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "conflict").await;
    let secrets = Api::<Secret>::namespaced(env.client.clone(), &project);
    let foreign = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("db-credentials".into()),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "password".to_string(),
            ByteString(b"somebody-elses".to_vec()),
        )])),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &foreign).await.unwrap();
    let services = Api::<BackingService>::namespaced(env.client.clone(), &project);
    create(
        services.clone(),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "BackingService",
               "metadata": {"name": "db"}, "spec": {"type": "postgresql"}}),
    )
    .await;
    let (status, _) = eventually(TIMEOUT, "the service to fail", || async {
        let status = services.get("db").await.unwrap().status?;
        (status.phase == Some(BackingServicePhase::Failed)).then_some(status)
    })
    .await;
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "SecretConflict")
    );
    assert!(
        ready.message.contains("Secret db-credentials"),
        "{}",
        ready.message
    );
    wait_event(&env.client, &project, "db", |e| {
        e.type_.as_deref() == Some("Warning")
            && e.reason.as_deref() == Some("SecretConflict")
            && e.note.as_deref().is_some_and(|n| n.contains("db-credentials"))
    })
    .await;
    // The agent neither overwrote it nor installed anything with it.
    let kept = secrets.get("db-credentials").await.unwrap();
    assert_eq!(kept.data.unwrap()["password"].0, b"somebody-elses");
    assert!(
        charts(&env.client)
            .get_opt(&service_chart_name(&project, "db"))
            .await
            .unwrap()
            .is_none()
    );

    // Once it is out of the way the service proceeds, with credentials of its own.
    secrets
        .delete("db-credentials", &DeleteParams::default())
        .await
        .unwrap();
    let (secret, _) = eventually(Duration::from_secs(60), "the agent's credentials", || async {
        let secret = secrets.get_opt("db-credentials").await.unwrap()?;
        (!secret.owner_references().is_empty()).then_some(secret)
    })
    .await;
    assert_ne!(secret.data.unwrap()["password"].0, b"somebody-elses");
    eventually(TIMEOUT, "CredentialsReady", || async {
        let status = services.get("db").await.unwrap().status?;
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "CredentialsReady" && c.status == "True")
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_finalizer_someone_else_put_on_an_app_is_named_while_it_holds_the_project() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "held").await;
    image_app(&env.client, &project, "web", json!({})).await;
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    let app = apps.get("web").await.unwrap();
    let mut finalizers = app.finalizers().to_vec();
    finalizers.push("example.com/hold".into());
    apps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
    )
    .await
    .unwrap();

    let projects = Api::<Project>::all(env.client.clone());
    projects.delete(&project, &DeleteParams::default()).await.unwrap();
    let (status, took) = eventually(
        Duration::from_secs(90),
        "the Project to say what holds it",
        || async {
            let status = projects.get(&project).await.unwrap().status?;
            status
                .message
                .as_deref()
                .is_some_and(|m| m.contains("App web (example.com/hold)"))
                .then_some(status)
        },
    )
    .await;
    eprintln!("the Project named its holder after {took:?}");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(ready.reason, "DeletionBlocked");
    assert!(
        ready
            .message
            .contains(&format!("namespace {project} cannot finish deleting"))
    );
    wait_event(&env.client, "default", &project, |e| {
        e.type_.as_deref() == Some("Warning")
            && e.reason.as_deref() == Some("DeletionBlocked")
            && e.note.as_deref().is_some_and(|n| n.contains("example.com/hold"))
    })
    .await;
    // The namespace controller's own words join in once it has tried.
    let (message, _) = eventually(
        Duration::from_secs(60),
        "the namespace's conditions in the message",
        || async {
            let message = projects.get(&project).await.unwrap().status?.message?;
            message
                .contains("finalizers remaining: example.com/hold")
                .then_some(message)
        },
    )
    .await;
    eprintln!("{message}");
    assert!(message.contains("the namespace reports"), "{message}");

    // The holder lets go: the Project goes.
    let app = apps.get("web").await.unwrap();
    let rest: Vec<String> = app
        .finalizers()
        .iter()
        .filter(|f| *f != "example.com/hold")
        .cloned()
        .collect();
    apps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(120), "the Project to be gone", || async {
        projects.get_opt(&project).await.unwrap().is_none().then_some(())
    })
    .await;
}
