//! Benchmark (not a test): the agent's peak RSS holding `APPS` Apps (default 1,000, ten per
//! Project), each with two processes (web and worker) and `HISTORY` AppBuilds of history
//! (default 5, all Completed, as a long-lived cluster keeps them), from its start until every
//! App is Ready. The floor beside it: the same agent with the Projects only (no Apps, no
//! builds), in the same run.
//!
//! The history is written before the agent that is measured starts (the bench writes each
//! build's final status itself), so the agent reads it whole at its first list, as after a
//! restart, and no build runs.
//!
//! `cargo bench --bench history` (`APPS=200` for a shorter run; `AGENT_BINARY`, `AGENT_FLAGS`).

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppPhase, Project, ProjectPhase};
use shapeblock_testenv::{ControlPlane, Options, agent};

const APPS_PER_PROJECT: usize = 10;
const CONCURRENCY: usize = 16;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // Current-thread: the control plane's processes belong to the thread that starts them.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let apps = knob("APPS", 1000);
    let history = knob("HISTORY", 5);
    let projects = apps.div_ceil(APPS_PER_PROJECT);
    let plane = ControlPlane::start(Options::default())
        .await
        .expect("start the control plane");
    let client = plane.client().await.unwrap();
    let kubeconfig =
        agent::install_agent_identity(&client, plane.kubeconfig(), "shapeblock", plane.work_dir())
            .await
            .unwrap();
    let (binary, extra) = agent::bench_overrides(env!("CARGO_BIN_EXE_shapeblock-agent"));
    let flags: Vec<String> = ["--log=warn", "--registry-secret="]
        .into_iter()
        .map(String::from)
        .chain(extra)
        .collect();
    let start_agent = |name: &'static str| {
        let (binary, kubeconfig, flags, log) = (
            binary.clone(),
            kubeconfig.clone(),
            flags.clone(),
            plane.work_dir().join(name),
        );
        async move {
            agent::AgentProcess::start(
                &binary,
                &kubeconfig,
                "shapeblock",
                &log,
                &flags.iter().map(String::as_str).collect::<Vec<_>>(),
            )
            .await
            .unwrap()
        }
    };

    // The floor: the agent with the Projects alone, settled.
    let floor_agent = start_agent("agent-projects.log").await;
    let projects_api = Api::<Project>::all(client.clone());
    stream::iter(0..projects)
        .map(|p| {
            let api = projects_api.clone();
            async move {
                let project: Project =
                    serde_json::from_value(json!({"metadata": {"name": format!("h{p}")}, "spec": {}}))
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
    // Settled: whatever the first minute of reconciles allocated is in the peak.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let floor = floor_agent.peak_rss_kib();
    drop(floor_agent);
    println!(
        "floor: the agent with {projects} Projects only, peak RSS {:.1} MiB",
        floor as f64 / 1024.0
    );

    // The history, written while no agent runs.
    let started = Instant::now();
    stream::iter(0..apps)
        .map(|i| write_app_with_history(client.clone(), i, history))
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    println!(
        "{apps} Apps (web + worker) with {history} Completed AppBuilds each written in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let agent = start_agent("agent.log").await;
    wait_all(&Api::<App>::all(client.clone()), apps, |a: &App| {
        a.status.as_ref().and_then(|s| s.phase) == Some(AppPhase::Ready)
    })
    .await;
    let ready = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let builds = Api::<AppBuild>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await
        .unwrap()
        .items
        .len();
    assert_eq!(
        builds,
        apps * history,
        "the agent pruned or lost builds of the history"
    );
    let rss = agent.peak_rss_kib();
    println!(
        "agent: {apps} Apps x {history} AppBuilds, 2 processes each: every App Ready {:.1}s after start; agent peak RSS {:.1} MiB (goal <= 25), {:.1} MiB over the floor",
        ready.as_secs_f64(),
        rss as f64 / 1024.0,
        (rss as f64 - floor as f64) / 1024.0
    );
    if let Some((200, metrics)) = agent.get("/metrics").await {
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("shapeblock_reconciles_total"))
        {
            println!("  {line}");
        }
    }
    drop(agent);
}

/// App `i` (in Project `h{i / 10}`) and its `history` builds, each Completed with the status
/// a real deploy leaves (image, digest, conditions, times, process types, release revision).
async fn write_app_with_history(client: Client, i: usize, history: usize) {
    let project = format!("h{}", i / APPS_PER_PROJECT);
    let name = format!("app{i}");
    let apps = Api::<App>::namespaced(client.clone(), &project);
    let app: App = serde_json::from_value(json!({"metadata": {"name": name}, "spec": {
        "registry": {"url": "registry.example.com"},
        "build": {"type": "image", "image": format!("registry.example.com/{project}/{name}:1")},
        "config": {"NODE_ENV": "production", "LOG_LEVEL": "info"},
        "processes": {
            "web": {"command": ["node", "server.js"], "port": 8080, "healthCheck": {"path": "/healthz"},
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
            "worker": {"command": ["node", "worker.js"], "replicas": 1},
        },
    }}))
    .unwrap();
    apps.create(&PostParams::default(), &app).await.unwrap();
    let builds = Api::<AppBuild>::namespaced(client, &project);
    for b in 1..=history {
        let build_name = format!("{name}-{b}");
        let build: AppBuild = serde_json::from_value(json!({
            "metadata": {"name": build_name},
            "spec": {"appName": name},
        }))
        .unwrap();
        builds.create(&PostParams::default(), &build).await.unwrap();
        let image = format!("registry.example.com/{project}/{name}:{b}");
        let at = |second: usize| format!("2026-11-01T10:{:02}:{:02}Z", b % 60, second);
        let condition = |type_: &str, reason: &str, message: String| {
            json!({"type": type_, "status": "True", "reason": reason, "message": message,
                   "lastTransitionTime": at(30), "observedGeneration": 1})
        };
        let status = json!({
            "phase": "Completed",
            "reason": "RolledOut",
            "message": format!("{name}-web, {name}-worker run {image} (release revision {b})"),
            "image": image,
            "imageDigest": format!("sha256:{}", "ab".repeat(32)),
            "releaseBaseline": b - 1,
            "releaseRevision": b,
            "processTypes": {"web": "node server.js", "worker": "node worker.js"},
            "startTime": at(0),
            "completionTime": at(30),
            "observedGeneration": 1,
            "conditions": [
                condition("Built", "Built", format!("image {image}")),
                condition("Deployed", "RolledOut", format!("{name}-web, {name}-worker run {image}")),
                condition("Ready", "RolledOut", format!("{name}-web, {name}-worker run {image}")),
            ],
        });
        builds
            .patch_status(
                &build_name,
                &PatchParams::apply("bench").force(),
                &Patch::Apply(json!({
                    "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "status": status,
                })),
            )
            .await
            .unwrap();
    }
}

async fn wait_all<K>(api: &Api<K>, expected: usize, ready: impl Fn(&K) -> bool)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let list = api.list(&ListParams::default()).await.unwrap();
        let done = list.items.iter().filter(|o| ready(o)).count();
        if done >= expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{done} of {expected} ready after 30 minutes; first not ready: {:?}",
            list.items.iter().find(|o| !ready(o)).map(|o| o.name_any())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
