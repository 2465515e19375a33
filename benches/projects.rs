//! Benchmark (not a test): how fast the agent brings 500 Projects with one App each to Ready
//! on a real control plane that also holds 1,000 unrelated 100 KiB Secrets, its peak RSS, and
//! the ceiling: a bare kube client creating the same namespaces and Secrets.
//!
//! Run with `cargo bench --bench projects` (`PROJECTS=100` for a shorter run; `AGENT_BINARY`
//! for a profiler's wrapper of the agent, `AGENT_FLAGS` for more of its flags).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{App, AppPhase, Project, ProjectPhase};
use shapeblock_testenv::{ControlPlane, Options, agent};

const NOISE_SECRETS: usize = 1000;
const NOISE_SIZE: usize = 100 * 1024;
const CONCURRENCY: usize = 16;

fn main() {
    let projects: usize = std::env::var("PROJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    // Current-thread: the control plane's processes belong to the thread that starts them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(projects));
}

async fn run(projects: usize) {
    let plane = ControlPlane::start(Options::default())
        .await
        .expect("start the control plane");
    let client = plane.client().await.unwrap();
    println!(
        "control plane up; {} unrelated Secrets of {} KiB ...",
        NOISE_SECRETS,
        NOISE_SIZE / 1024
    );
    create_noise(&client).await;

    // Ceiling: a bare client creating what the agent creates per project (namespace + Secret).
    let started = Instant::now();
    stream::iter(0..projects)
        .map(|i| bare_project(client.clone(), format!("bare-{i}")))
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let ceiling = started.elapsed();
    println!(
        "bare client: {projects} namespaces + {projects} Secrets in {:.2}s",
        ceiling.as_secs_f64()
    );

    let kubeconfig =
        agent::install_agent_identity(&client, plane.kubeconfig(), "shapeblock", plane.work_dir())
            .await
            .unwrap();
    pull_secret(&client).await;
    // AGENT_BINARY / AGENT_FLAGS: a profiler's wrapper (its peak RSS is then the wrapper's),
    // another build, more flags.
    let (binary, extra) = agent::bench_overrides(env!("CARGO_BIN_EXE_shapeblock-agent"));
    let flags: Vec<String> = std::iter::once("--log=warn".to_string()).chain(extra).collect();
    let agent = agent::AgentProcess::start(
        &binary,
        &kubeconfig,
        "shapeblock",
        &plane.work_dir().join("agent.log"),
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await
    .unwrap();

    let started = Instant::now();
    let projects_api = Api::<Project>::all(client.clone());
    stream::iter(0..projects)
        .map(|i| {
            let api = projects_api.clone();
            async move {
                let project: Project =
                    serde_json::from_value(json!({"metadata": {"name": format!("p{i}")}, "spec": {}}))
                        .unwrap();
                api.create(&PostParams::default(), &project).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    wait_all(&projects_api, projects, |p: &Project| {
        p.status.as_ref().and_then(|s| s.phase) == Some(ProjectPhase::Ready)
    })
    .await;
    let projects_ready = started.elapsed();
    stream::iter(0..projects)
        .map(|i| {
            let api = Api::<App>::namespaced(client.clone(), &format!("p{i}"));
            async move {
                let app: App = serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {
                    "git": {"url": "https://github.com/example/web.git"}, "registry": {"url": "registry.example.com"}}}))
                .unwrap();
                api.create(&PostParams::default(), &app).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    wait_all(&Api::<App>::all(client.clone()), projects, |a: &App| {
        a.status.as_ref().and_then(|s| s.phase) == Some(AppPhase::Ready)
    })
    .await;
    let all_ready = started.elapsed();
    let rss = agent.peak_rss_kib();
    println!(
        "agent: {projects} Projects Ready in {:.2}s, with their Apps Ready in {:.2}s; ratio to the bare client {:.2}x",
        projects_ready.as_secs_f64(),
        all_ready.as_secs_f64(),
        projects_ready.as_secs_f64() / ceiling.as_secs_f64()
    );
    println!("agent peak RSS (VmHWM): {:.1} MiB", rss as f64 / 1024.0);
    for (name, kib) in plane.peak_rss_kib() {
        println!("{name} peak RSS: {:.0} MiB", kib as f64 / 1024.0);
    }
    drop(agent);
}

async fn create_noise(client: &Client) {
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": "noise"}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), "noise");
    stream::iter(0..NOISE_SECRETS)
        .map(|i| {
            let secrets = secrets.clone();
            async move {
                let secret = Secret {
                    metadata: ObjectMeta {
                        name: Some(format!("noise-{i}")),
                        ..Default::default()
                    },
                    data: Some(BTreeMap::from([(
                        "blob".to_string(),
                        ByteString(vec![b'x'; NOISE_SIZE]),
                    )])),
                    ..Default::default()
                };
                secrets.create(&PostParams::default(), &secret).await
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
}

async fn bare_project(client: Client, name: String) -> Result<(), kube::Error> {
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await?;
    let secret = registry_secret();
    Api::<Secret>::namespaced(client, &name)
        .create(&PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// The registry pull secret the agent copies into every project (and the bare client creates).
fn registry_secret() -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some("registry-credentials".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(b"{\"auths\":{}}".to_vec()),
        )])),
        ..Default::default()
    }
}

async fn pull_secret(client: &Client) {
    let secret = registry_secret();
    Api::<Secret>::namespaced(client.clone(), "shapeblock")
        .patch(
            "registry-credentials",
            &PatchParams::apply("bench").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
}

async fn wait_all<K>(api: &Api<K>, expected: usize, ready: impl Fn(&K) -> bool)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    loop {
        let list = api.list(&ListParams::default()).await.unwrap();
        let done = list
            .items
            .iter()
            .filter(|o| ready(o) && o.name_any() != "noise")
            .count();
        if done >= expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
