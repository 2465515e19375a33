//! Benchmark (not a test): `APPS` Apps (default 50, in 10 Projects) each deployed by `BUILDS`
//! AppBuilds in turn (default 4: 200 in all) with the image strategy — the time until every
//! AppBuild is `Completed` (rolled out) and the agent's peak RSS — next to the ceiling: the
//! same releases (the same chart and values) installed by bare `helm upgrade --install --wait`
//! loops, one per App, all Apps at once, against the same control plane.
//!
//! `cargo bench --bench builds` (`APPS=10 BUILDS=2` for a shorter run).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase, Project, ProjectPhase};
use shapeblock_agent::controllers::deploy::{Release, UNIVERSAL_CHART, chart_values};
use shapeblock_testenv::{self as testenv, ControlPlane, Options, agent};

const PROJECTS: usize = 10;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

async fn run() {
    let apps = knob("APPS", 50);
    let builds = knob("BUILDS", 4);
    // The apiserver counts the agent's requests (its audit log), not the agent itself.
    let options = Options {
        audit: true,
        ..Options::default()
    };
    let helm = options.bin_dir.join("helm");
    let plane = ControlPlane::start(options)
        .await
        .expect("start the control plane");
    let client = plane.client().await.unwrap();

    let ceiling = bare_helm(&client, plane.kubeconfig(), plane.work_dir(), &helm, apps, builds).await;
    println!(
        "bare helm: {} releases ({apps} x {builds} upgrades, --wait) in {:.1}s",
        apps * builds,
        ceiling.as_secs_f64()
    );

    let kubeconfig =
        agent::install_agent_identity(&client, plane.kubeconfig(), "shapeblock", plane.work_dir())
            .await
            .unwrap();
    let agent = agent::AgentProcess::start(
        Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
        &kubeconfig,
        "shapeblock",
        &plane.work_dir().join("agent.log"),
        &["--log=warn", "--registry-secret="],
    )
    .await
    .unwrap();
    let projects = Api::<Project>::all(client.clone());
    for p in 0..PROJECTS {
        let project: Project =
            serde_json::from_value(json!({"metadata": {"name": format!("bench-{p}")}, "spec": {}})).unwrap();
        projects.create(&PostParams::default(), &project).await.unwrap();
    }
    for p in 0..PROJECTS {
        let name = format!("bench-{p}");
        wait(Duration::from_secs(120), || async {
            projects.get(&name).await.ok().and_then(|p| p.status?.phase) == Some(ProjectPhase::Ready)
        })
        .await;
    }
    for a in 0..apps {
        let app: App = serde_json::from_value(json!({"metadata": {"name": format!("app-{a}")}, "spec": {
            "registry": {"url": "registry.example.com"},
            "build": {"type": "image", "image": "registry.example.com/bench/web:1"}}}))
        .unwrap();
        Api::<App>::namespaced(client.clone(), &project_of(a))
            .create(&PostParams::default(), &app)
            .await
            .unwrap();
    }
    let started = Instant::now();
    stream::iter(0..apps)
        .map(|a| {
            let client = client.clone();
            async move {
                let api = Api::<AppBuild>::namespaced(client, &project_of(a));
                for b in 0..builds {
                    let name = format!("app-{a}-{b}");
                    let build: AppBuild = serde_json::from_value(json!({"metadata": {"name": name},
                        "spec": {"appName": format!("app-{a}"), "helmValues": {"replicas": 1, "port": 8080}}}))
                    .unwrap();
                    api.create(&PostParams::default(), &build).await.unwrap();
                    wait(Duration::from_secs(1800), || async {
                        let phase = api.get(&name).await.ok().and_then(|b| b.status?.phase);
                        assert!(
                            !phase.is_some_and(|p| p.is_final() && p != AppBuildPhase::Completed),
                            "{name} ended {phase:?}"
                        );
                        phase == Some(AppBuildPhase::Completed)
                    })
                    .await;
                }
            }
        })
        .buffer_unordered(apps)
        .collect::<Vec<()>>()
        .await;
    let elapsed = started.elapsed();
    let rss = agent.peak_rss_kib();
    breakdown(&client).await;
    let total_builds = (apps * builds) as f64;
    // How much reconciling it took, per kind.
    if let Some((200, metrics)) = agent.get("/metrics").await {
        for line in metrics.lines().filter(|l| {
            l.starts_with("shapeblock_reconciles_total")
                || l.starts_with("shapeblock_reconcile_duration_seconds_sum")
        }) {
            println!("  {line}");
        }
        let reconciles = |kind: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(&format!("shapeblock_reconciles_total{{kind=\"{kind}\"}}")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        println!(
            "  reconciles per build: AppBuild {:.1}, App {:.1} (goal: <= 5 in all)",
            reconciles("AppBuild") / total_builds,
            reconciles("App") / total_builds
        );
    }
    // Everything the agent asked the apiserver since it started (Project and App set-up
    // included), per verb and resource, from the apiserver's audit log.
    let user = format!(
        "system:serviceaccount:shapeblock:{}",
        shapeblock_agent::rbac::AGENT_NAME
    );
    let requests = testenv::audit::requests_by(&plane.audit_log().expect("audit log"), &user).unwrap();
    let sum: u64 = requests.values().sum();
    let mut top: Vec<_> = requests.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1));
    println!(
        "  apiserver requests by the agent: {sum} ({:.1} per build); most: {}",
        sum as f64 / total_builds,
        top.iter()
            .take(8)
            .map(|(what, n)| format!("{what} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "agent: {} AppBuilds ({apps} Apps x {builds}, image strategy) Completed in {:.1}s; ratio to bare helm {:.2}x; agent peak RSS {:.1} MiB",
        apps * builds,
        elapsed.as_secs_f64(),
        elapsed.as_secs_f64() / ceiling.as_secs_f64(),
        rss as f64 / 1024.0
    );
    agent.terminate(Duration::from_secs(15));
}

/// Where a build's time went, from its own status: waiting to start (created → `startTime`),
/// then deploying (`startTime` → `completionTime`: HelmChart, helm Job, rollout).
async fn breakdown(client: &Client) {
    let builds = Api::<AppBuild>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap();
    let seconds = |from: &k8s_openapi::jiff::Timestamp, to: &k8s_openapi::jiff::Timestamp| {
        to.duration_since(*from).as_secs_f64()
    };
    let (mut waiting, mut deploying) = (Vec::new(), Vec::new());
    for build in builds {
        let created = build.metadata.creation_timestamp.clone().unwrap().0;
        let status = build.status.unwrap_or_default();
        let (Some(start), Some(end)) = (status.start_time, status.completion_time) else {
            continue;
        };
        waiting.push(seconds(&created, &start.0));
        deploying.push(seconds(&start.0, &end.0));
    }
    for (what, mut values) in [
        ("created -> started", waiting),
        ("started -> Completed", deploying),
    ] {
        values.sort_by(f64::total_cmp);
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        println!(
            "  per build, {what}: p50 {:.1}s, p90 {:.1}s, max {:.1}s (second resolution)",
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
}

fn project_of(app: usize) -> String {
    format!("bench-{}", app % PROJECTS)
}

async fn wait<F, Fut>(timeout: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The ceiling: each App's releases by `helm upgrade --install --wait`, with the values the
/// agent would generate, Apps in parallel, builds of one App in turn.
async fn bare_helm(
    client: &Client,
    kubeconfig: &Path,
    work_dir: &Path,
    helm: &Path,
    apps: usize,
    builds: usize,
) -> Duration {
    let chart = work_dir.join("universal-chart.tgz");
    std::fs::write(&chart, UNIVERSAL_CHART).unwrap();
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    for p in 0..PROJECTS {
        let ns: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": format!("bare-{p}")}})).unwrap();
        namespaces.create(&PostParams::default(), &ns).await.unwrap();
    }
    let started = Instant::now();
    stream::iter(0..apps)
        .map(|a| {
            let (chart, kubeconfig, helm) = (chart.clone(), kubeconfig.to_path_buf(), helm.to_path_buf());
            let dir: PathBuf = work_dir.to_path_buf();
            async move {
                let namespace = format!("bare-{}", a % PROJECTS);
                let app = format!("app-{a}");
                // The same App as the agent deploys: image strategy, one web process.
                let spec: shapeblock_agent::api::AppSpec = serde_json::from_value(json!({
                    "registry": {"url": "registry.example.com"},
                    "build": {"type": "image", "image": "registry.example.com/bench/web:1"},
                }))
                .unwrap();
                let no_live_replicas = std::collections::BTreeMap::new();
                let no_build_processes = std::collections::BTreeMap::new();
                for b in 0..builds {
                    let build = format!("{app}-{b}");
                    let values = chart_values(
                        &Release {
                            project: &namespace,
                            app: &app,
                            build: &build,
                            image: "registry.example.com/bench/web:1",
                            runtime: &spec,
                            config_secret: None,
                            config_revision: 0,
                            live_replicas: &no_live_replicas,
                            default_issuer: "letsencrypt",
                            build_processes: &no_build_processes,
                            pull_secrets: &[],
                        },
                        Some(&json!({"replicas": 1, "port": 8080})),
                    )
                    .unwrap();
                    let file = dir.join(format!("{build}.json"));
                    std::fs::write(&file, values.to_string()).unwrap();
                    let status = tokio::process::Command::new(&helm)
                        .args(["upgrade", "--install", &app])
                        .arg(&chart)
                        .args([
                            "--namespace",
                            &namespace,
                            "--wait",
                            "--timeout",
                            "10m",
                            "--values",
                        ])
                        .arg(&file)
                        .env("KUBECONFIG", &kubeconfig)
                        .stdout(std::process::Stdio::null())
                        .stderr(std::process::Stdio::null())
                        .status()
                        .await
                        .unwrap();
                    assert!(status.success(), "helm upgrade {build}");
                }
            }
        })
        .buffer_unordered(apps)
        .collect::<Vec<()>>()
        .await;
    started.elapsed()
}
