//! An agent under test: its ServiceAccount and RBAC installed, the registry pull secret in
//! place, and the real `shapeblock-agent` binary started on demand. Tests that run an agent
//! take a process-wide lock: one agent per cluster, as in production.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use shapeblock_agent::api::{App, AppPhase, Project, ProjectPhase};
use shapeblock_testenv::{self as testenv, agent::AgentProcess};
use tokio::sync::{Mutex, MutexGuard};

use super::{eventually, unique_name};

static SERIAL: Mutex<()> = Mutex::const_new(());
pub const AGENT_NS: &str = "shapeblock";
pub const PULL_SECRET: &str = "registry-credentials";
pub const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Env {
    pub client: Client,
    pub kubeconfig: PathBuf,
    pub dir: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

pub async fn env() -> Env {
    let serial = SERIAL.lock().await;
    let plane = testenv::shared().unwrap_or_else(|e| panic!("{e}"));
    let client = plane.client().await.unwrap();
    let kubeconfig =
        testenv::agent::install_agent_identity(&client, &plane.kubeconfig, AGENT_NS, &plane.work_dir)
            .await
            .expect("install the agent's ServiceAccount and RBAC");
    set_pull_secret(&client, "initial").await;
    Env {
        client,
        kubeconfig,
        dir: plane.work_dir.clone(),
        _serial: serial,
    }
}

/// [`env`] for tests that enroll the agent with a hub of their own: a previous test's identity
/// would belong to another hub.
pub async fn hub_env() -> Env {
    let env = env().await;
    let _ = Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
        .delete("shapeblock-agent-identity", &Default::default())
        .await;
    env
}

impl Env {
    pub async fn agent(&self, extra: &[&str]) -> AgentProcess {
        let log = self.dir.join(format!("{}.log", unique_name("agent")));
        let mut args = vec!["--log=shapeblock_agent=debug,info"];
        // Apps in these tests push to registry.example.com: the cluster registry, unless the
        // test names its own.
        if !extra.iter().any(|a| a.starts_with("--registry=")) {
            args.push("--registry=registry.example.com");
        }
        args.extend_from_slice(extra);
        AgentProcess::start(
            std::path::Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
            &self.kubeconfig,
            AGENT_NS,
            &log,
            &args,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

pub async fn set_pull_secret(client: &Client, password: &str) {
    let config = json!({"auths": {"registry.example.com": {"username": "ci", "password": password}}});
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(PULL_SECRET.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(config.to_string().into_bytes()),
        )])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), AGENT_NS)
        .patch(
            PULL_SECRET,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

pub async fn create<K>(api: Api<K>, manifest: serde_json::Value) -> K
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object: K = serde_json::from_value(manifest).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap()
}

pub fn project_manifest(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project", "metadata": {"name": name}, "spec": spec})
}

pub fn app_manifest(name: &str, git: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": name},
           "spec": {"git": git, "registry": {"url": "registry.example.com"}}})
}

pub async fn project_phase(client: &Client, name: &str) -> Option<ProjectPhase> {
    Api::<Project>::all(client.clone())
        .get_opt(name)
        .await
        .unwrap()?
        .status?
        .phase
}

pub async fn wait_project(client: &Client, name: &str, phase: ProjectPhase) -> Project {
    eventually(TIMEOUT, &format!("Project {name} to be {phase:?}"), || async {
        let project = Api::<Project>::all(client.clone()).get(name).await.unwrap();
        (project.status.as_ref().and_then(|s| s.phase) == Some(phase)).then_some(project)
    })
    .await
    .0
}

pub async fn wait_app(client: &Client, namespace: &str, name: &str, phase: AppPhase) -> App {
    eventually(
        TIMEOUT,
        &format!("App {namespace}/{name} to be {phase:?}"),
        || async {
            let app = Api::<App>::namespaced(client.clone(), namespace)
                .get(name)
                .await
                .unwrap();
            (app.status.as_ref().and_then(|s| s.phase) == Some(phase)).then_some(app)
        },
    )
    .await
    .0
}

/// A Ready project with a fresh name.
pub async fn ready_project(client: &Client, prefix: &str) -> String {
    let name = unique_name(prefix);
    create(
        Api::<Project>::all(client.clone()),
        project_manifest(&name, json!({})),
    )
    .await;
    wait_project(client, &name, ProjectPhase::Ready).await;
    name
}

/// Generous: CI machines have 2 cores and a whole simulated cluster on them.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(180);

/// Creates AppBuild `name` of App `app`, with `extra` spec fields.
pub async fn create_build(client: &Client, project: &str, name: &str, app: &str, extra: serde_json::Value) {
    let mut spec = json!({"appName": app});
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    create(
        Api::<shapeblock_agent::api::AppBuild>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": name}, "spec": spec}),
    )
    .await;
}

/// Waits for an AppBuild to reach `phase`; panics at once if it ends in another final phase.
pub async fn wait_build(
    client: &Client,
    project: &str,
    name: &str,
    phase: shapeblock_agent::api::AppBuildPhase,
) -> shapeblock_agent::api::AppBuild {
    use shapeblock_agent::api::{AppBuild, AppBuildPhase};
    let builds = Api::<AppBuild>::namespaced(client.clone(), project);
    eventually(
        BUILD_TIMEOUT,
        &format!("AppBuild {name} to be {phase:?}"),
        || async {
            let build = builds.get(name).await.unwrap();
            let current = build.status.as_ref().and_then(|s| s.phase);
            if current.is_some_and(AppBuildPhase::is_final) && current != Some(phase) {
                panic!(
                    "AppBuild {name} ended {current:?}, not {phase:?}: {:?}",
                    build.status
                );
            }
            (current == Some(phase)).then_some(build)
        },
    )
    .await
    .0
}
