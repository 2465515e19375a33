//! Soak (a bench, not in the default test run): the agent, the hub and the apiserver are
//! killed and restarted at random points while builds, runs and a large build log go through
//! the tunnel, and afterwards both sides are counted. 0 lost is the pass mark: the bench
//! panics on the first count that is off.
//!
//! `cargo bench --bench soak`, with `KILLS` (agent SIGKILLs, default 100), `HUB_RESTARTS` (30),
//! `APISERVER_RESTARTS` (10), `PROJECTS` (6), `LOG_MIB` (50, the large build log), `SEED`
//! (printed, to repeat a run's schedule).
//!
//! Counted:
//! - every command queued at the hub has a result, and succeeded;
//! - every command was executed once in effect: each AppBuild and AppRun the hub asked for
//!   exists in the cluster with one UID only (a second execution after a lost ack would
//!   not make a second object, but a re-execution of a delete-then-apply would);
//! - every final phase is recorded once at the hub (as a phase change or in a reconnect's
//!   snapshot), and it is the cluster's;
//! - every log byte is delivered: each build's log at the hub equals what its container wrote
//!   and is complete;
//! - no stuck finalizer: deleting every Project through the hub removes every Project and
//!   namespace.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use shapeblock_agent::api::{AppBuild, AppRun, Project};
use shapeblock_agent::proto::v1::ObjectRef;
use shapeblock_hub::{Hub, HubConfig};
use shapeblock_testenv::agent::{self, AgentProcess};
use shapeblock_testenv::{ControlPlane, Options, PodOutcome, PodSelector, logs, set_pod_outcome};

const CLUSTER: &str = "soak";
/// The hub of the soak; `None` only while a restart holds the lock.
type SharedHub = Arc<tokio::sync::RwLock<Option<Hub>>>;
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
/// Lines of each ordinary build's log.
const BUILD_LINES: usize = 200;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// xorshift64*: a schedule that `SEED` repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn millis(&mut self, from: u64, to: u64) -> Duration {
        Duration::from_millis(from + self.next() % (to - from + 1))
    }
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

/// The agent of the soak, restarted after each kill with the same arguments (its identity
/// Secret carries it back to the same cluster id).
struct Agent {
    kubeconfig: PathBuf,
    log_dir: PathBuf,
    args: Vec<String>,
    process: Option<AgentProcess>,
    starts: usize,
}

impl Agent {
    async fn start(&mut self) {
        self.starts += 1;
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.process = Some(
            AgentProcess::start(
                Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
                &self.kubeconfig,
                "shapeblock",
                &self.log_dir.join(format!("agent-{}.log", self.starts)),
                &args,
            )
            .await
            .unwrap(),
        );
    }

    async fn kill_and_restart(&mut self) {
        if let Some(process) = self.process.take() {
            process.kill();
        }
        self.start().await;
    }
}

fn project_manifest(name: &str) -> String {
    serde_json::json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "metadata": {"name": name}, "spec": {}})
    .to_string()
}

fn app_manifest(namespace: &str) -> String {
    serde_json::json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {"registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"},
                 "git": {"url": "https://github.com/example/web.git"},
                 "processes": {"web": {"port": 8080}}}})
    .to_string()
}

/// A build var of its own gives every build its own inputs: the same inputs would reuse the
/// first build's image (`ImageReused`), with no build container and so no log to count.
fn build_manifest(namespace: &str, name: &str) -> String {
    serde_json::json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"appName": "web", "buildVars": [{"key": "SOAK_BUILD", "value": name}]}})
    .to_string()
}

fn run_manifest(namespace: &str, name: &str) -> String {
    serde_json::json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppRun",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"appName": "web", "command": ["migrate", name]}})
    .to_string()
}

/// Queues `manifest` at the hub (retrying while a restart has it down).
async fn apply(hub: &SharedHub, manifest: &str) -> u64 {
    loop {
        let queued = match hub.read().await.as_ref() {
            Some(h) => Some(h.apply(CLUSTER, manifest).await),
            None => None,
        };
        if let Some(Ok(seq)) = queued {
            return seq;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The hub's phase of `key`, if it has one.
async fn hub_phase(hub: &SharedHub, key: &str) -> Option<String> {
    let hub = hub.read().await;
    let objects = hub.as_ref()?.store().objects(CLUSTER).await.ok()?;
    objects.into_iter().find(|o| o.key == key).map(|o| o.phase)
}

/// Waits for every key to reach one of `finals` at the hub; on a timeout, prints what the
/// cluster, the hub and the agent's logs say about the first key that did not, then panics.
async fn wait_final(hub: &SharedHub, probe: &Probe, keys: &[String], finals: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(900);
    for key in keys {
        loop {
            if hub_phase(hub, key)
                .await
                .is_some_and(|p| finals.contains(&p.as_str()))
            {
                break;
            }
            if Instant::now() >= deadline {
                probe.diagnose(hub, key).await;
                panic!("{key} reached no final phase at the hub (diagnosis above)");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What a stalled soak needs to be diagnosed: the cluster as kubectl would show it and the
/// agents' logs (one file per start).
struct Probe {
    kubectl: PathBuf,
    kubeconfig: PathBuf,
    log_dir: PathBuf,
}

impl Probe {
    fn kubectl(&self, args: &[&str]) -> String {
        match std::process::Command::new(&self.kubectl)
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
        {
            Ok(out) => format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => format!("kubectl: {e}"),
        }
    }

    async fn diagnose(&self, hub: &SharedHub, key: &str) {
        let mut parts = key.splitn(3, '/');
        let (kind, namespace, name) = (
            parts.next().unwrap_or_default().to_lowercase(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        println!("==== diagnosis of {key}");
        println!("-- the object in the cluster");
        println!(
            "{}",
            self.kubectl(&["get", &kind, "-n", namespace, name, "-o", "yaml"])
        );
        println!("-- jobs, pods and events of {namespace}");
        println!(
            "{}",
            self.kubectl(&["get", "jobs,pods", "-n", namespace, "-o", "wide"])
        );
        println!(
            "{}",
            self.kubectl(&["get", "events", "-n", namespace, "--sort-by=.lastTimestamp"])
        );
        println!("-- the hub");
        {
            let guard = hub.read().await;
            if let Some(h) = guard.as_ref() {
                let store = h.store();
                for o in store.objects(CLUSTER).await.unwrap_or_default() {
                    if o.key.contains(namespace) {
                        println!("object {} {} {:?} {:?}", o.key, o.phase, o.reason, o.message);
                    }
                }
                for (seq, kind, object, detail) in store.events(CLUSTER).await.unwrap_or_default() {
                    if object.contains(name) && object.contains(namespace) || detail.contains(key) {
                        println!(
                            "event {seq} {kind} {object} {}",
                            detail.chars().take(300).collect::<String>()
                        );
                    }
                }
                for c in store.commands(CLUSTER).await.unwrap_or_default() {
                    if !c.done {
                        println!("unanswered command {}", c.seq);
                    }
                }
            }
        }
        println!("-- agent log lines naming {namespace}/{name} or warning (last 200)");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.log_dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.retain(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("agent-"))
        });
        files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        let mut lines = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for line in text.lines() {
                if line.contains(name) && line.contains(namespace)
                    || line.contains("WARN")
                    || line.contains("ERROR")
                {
                    lines.push(format!("{}: {line}", file.file_name().unwrap().to_string_lossy()));
                }
            }
        }
        for line in lines.iter().skip(lines.len().saturating_sub(200)) {
            println!("{line}");
        }
    }
}

/// UIDs seen per `Kind/namespace/name`, from watches that survive apiserver restarts.
fn watch_uids<K>(client: Client, kind: &'static str, seen: Arc<Mutex<HashMap<String, HashSet<String>>>>)
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + 'static,
{
    tokio::spawn(async move {
        let api: Api<K> = Api::all(client);
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            let objects = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => vec![o],
                _ => continue,
            };
            for object in objects {
                let key = format!(
                    "{kind}/{}/{}",
                    object.namespace().unwrap_or_default(),
                    object.name_any()
                );
                if let Some(uid) = object.uid() {
                    seen.lock().unwrap().entry(key).or_default().insert(uid);
                }
            }
        }
    });
}

async fn run() {
    let kills = knob("KILLS", 100);
    let hub_restarts = knob("HUB_RESTARTS", 30);
    let apiserver_restarts = knob("APISERVER_RESTARTS", 10);
    let projects = knob("PROJECTS", 6) as usize;
    let log_mib = knob("LOG_MIB", 50) as usize;
    let seed = knob(
        "SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1,
    );
    println!(
        "soak: {kills} agent kills, {hub_restarts} hub restarts, {apiserver_restarts} apiserver restarts, {projects} projects, {log_mib} MiB log, SEED={seed}"
    );
    let started = Instant::now();
    let plane = Arc::new(tokio::sync::Mutex::new(
        ControlPlane::start(Options::default())
            .await
            .expect("start the control plane"),
    ));
    let (client, kubeconfig, work_dir) = {
        let plane = plane.lock().await;
        (
            plane.client().await.unwrap(),
            plane.kubeconfig().to_owned(),
            plane.work_dir().to_owned(),
        )
    };
    let data = tempfile::tempdir().unwrap();
    let mut config = HubConfig::new(data.path().to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    let first = Hub::start(config.clone()).await.unwrap();
    let config = HubConfig {
        listen: first.address(),
        ..config
    };
    let token = first
        .create_token(CLUSTER, Duration::from_secs(3600))
        .await
        .unwrap();
    let mut args = agent::hub_flags(&first.url(), &token, &first.ca_hash(), "info");
    args.push("--registry=registry.example.com".into());
    let hub: SharedHub = Arc::new(tokio::sync::RwLock::new(Some(first)));
    let agent_kubeconfig = agent::install_agent_identity(&client, &kubeconfig, "shapeblock", &work_dir)
        .await
        .unwrap();
    let mut agent = Agent {
        kubeconfig: agent_kubeconfig,
        log_dir: work_dir.clone(),
        args,
        process: None,
        starts: 0,
    };
    agent.start().await;
    let probe = Probe {
        kubectl: shapeblock_testenv::default_bin_dir().join("kubectl"),
        kubeconfig: kubeconfig.clone(),
        log_dir: work_dir.clone(),
    };

    let uids = Arc::new(Mutex::new(HashMap::new()));
    watch_uids::<AppBuild>(client.clone(), "AppBuild", uids.clone());
    watch_uids::<AppRun>(client.clone(), "AppRun", uids.clone());

    // What the simulated build containers do: resolve answers the commit, every build writes
    // its log and succeeds; runs succeed. The large log is one build's of its own project.
    let build_lines: Vec<String> = (0..BUILD_LINES)
        .map(|i| format!("step {i:>4} {}", "b".repeat(60)))
        .collect();
    let names: Vec<String> = (0..projects).map(|i| format!("soak-{i}")).collect();
    let refs: Vec<&str> = build_lines.iter().map(String::as_str).collect();
    for name in &names {
        logs().script(name, "build", &refs);
    }
    let big_lines: Vec<String> = (0..(log_mib << 20) / 1024)
        .map(|i| format!("{i:>10} {}", "z".repeat(1024 - 12)))
        .collect();
    let big_refs: Vec<&str> = big_lines.iter().map(String::as_str).collect();
    logs().script("soak-log", "build", &big_refs);
    let mut expected_logs: BTreeMap<String, usize> = BTreeMap::new();

    for name in names.iter().chain(["soak-log".to_string()].iter()) {
        apply(&hub, &project_manifest(name)).await;
    }
    // As the agent's answer to an App sent too early says (and as a server does): an App once
    // its Project is Ready, which is when its namespace exists.
    let project_keys: Vec<String> = names
        .iter()
        .chain(["soak-log".to_string()].iter())
        .map(|name| format!("Project//{name}"))
        .collect();
    wait_final(&hub, &probe, &project_keys, &["Ready"]).await;
    for name in names.iter().chain(["soak-log".to_string()].iter()) {
        apply(&hub, &app_manifest(name)).await;
    }
    // The pods' outcomes are set per namespace: once the namespaces exist.
    let namespaces_api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    for name in names.iter().chain(["soak-log".to_string()].iter()) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while namespaces_api.get_opt(name).await.ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "namespace {name} not made");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    for name in names.iter().chain(["soak-log".to_string()].iter()) {
        set_pod_outcome(
            &client,
            &PodSelector::container(name, "resolve"),
            &PodOutcome::Succeed {
                after: Duration::from_millis(300),
                message: Some(COMMIT.into()),
            },
        )
        .await
        .unwrap();
        set_pod_outcome(
            &client,
            &PodSelector::container(name, "build"),
            &PodOutcome::Succeed {
                after: Duration::from_secs(2),
                message: Some(format!("sha256:{}", "ab".repeat(32))),
            },
        )
        .await
        .unwrap();
        set_pod_outcome(
            &client,
            &PodSelector::container(name, "run"),
            &PodOutcome::Succeed {
                after: Duration::from_secs(1),
                message: None,
            },
        )
        .await
        .unwrap();
    }
    apply(&hub, &build_manifest("soak-log", "web-big")).await;
    expected_logs.insert(
        "soak-log/web-big/build".into(),
        big_lines.iter().map(|l| l.len() + 1).sum(),
    );

    // The chaos: kills and restarts in a shuffled order, a random 1-6 s apart.
    let mut rng = Rng(seed);
    let mut schedule: Vec<&str> = std::iter::repeat_n("agent", kills as usize)
        .chain(std::iter::repeat_n("hub", hub_restarts as usize))
        .chain(std::iter::repeat_n("apiserver", apiserver_restarts as usize))
        .collect();
    for i in (1..schedule.len()).rev() {
        let j = (rng.next() % (i as u64 + 1)) as usize;
        schedule.swap(i, j);
    }
    let delays: Vec<Duration> = schedule.iter().map(|_| rng.millis(1000, 6000)).collect();
    let chaos_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let chaos = {
        let (hub, plane, chaos_done) = (hub.clone(), plane.clone(), chaos_done.clone());
        tokio::spawn(async move {
            let mut away = Vec::new();
            for (what, delay) in schedule.into_iter().zip(delays) {
                tokio::time::sleep(delay).await;
                match what {
                    "agent" => agent.kill_and_restart().await,
                    "hub" => {
                        // Held for the whole restart: the work waits, as a server retries.
                        let mut guard = hub.write().await;
                        if let Some(old) = guard.take() {
                            old.stop().await;
                        }
                        *guard = Some(loop {
                            match Hub::start(config.clone()).await {
                                Ok(hub) => break hub,
                                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                            }
                        });
                    }
                    _ => away.push(plane.lock().await.restart_apiserver().await.unwrap()),
                }
            }
            chaos_done.store(true, std::sync::atomic::Ordering::SeqCst);
            (agent, away)
        })
    };

    // The work: rounds of one build per project then one run per project, until the chaos is
    // over (at least two rounds).
    let mut build_keys = Vec::new();
    let mut run_keys = Vec::new();
    let mut round = 0;
    while round < 2 || !chaos_done.load(std::sync::atomic::Ordering::SeqCst) {
        round += 1;
        let mut keys = Vec::new();
        for name in &names {
            let build = format!("web-{round}");
            apply(&hub, &build_manifest(name, &build)).await;
            keys.push(format!("AppBuild/{name}/{build}"));
            expected_logs.insert(
                format!("{name}/{build}/build"),
                build_lines.iter().map(|l| l.len() + 1).sum(),
            );
        }
        wait_final(&hub, &probe, &keys, &["Completed", "Failed", "Cancelled"]).await;
        build_keys.extend(keys);
        let mut keys = Vec::new();
        for name in &names {
            let run = format!("migrate-{round}");
            apply(&hub, &run_manifest(name, &run)).await;
            keys.push(format!("AppRun/{name}/{run}"));
        }
        wait_final(&hub, &probe, &keys, &["Succeeded", "Failed"]).await;
        run_keys.extend(keys);
    }
    let (mut agent, away) = chaos.await.unwrap();
    build_keys.push("AppBuild/soak-log/web-big".into());
    wait_final(&hub, &probe, &build_keys, &["Completed", "Failed", "Cancelled"]).await;
    let chaos_time = started.elapsed();

    // Counts.
    let hub_guard = hub.read().await;
    let store = hub_guard.as_ref().unwrap().store();
    let commands = store.commands(CLUSTER).await.unwrap();
    let unanswered: Vec<u64> = commands.iter().filter(|c| !c.done).map(|c| c.seq).collect();
    let failed: Vec<(u64, Option<String>)> = commands
        .iter()
        .filter(|c| c.done && c.ok != Some(true))
        .map(|c| (c.seq, c.message.clone()))
        .collect();
    let events = store.events(CLUSTER).await.unwrap();
    let mut recorded: BTreeMap<String, usize> = BTreeMap::new();
    let finals = ["Completed", "Failed", "Cancelled", "Succeeded"];
    for (_, kind, object, detail) in &events {
        if kind == "phase" && finals.contains(&detail.as_str()) {
            *recorded.entry(object.clone()).or_default() += 1;
        }
        if kind == "snapshot" {
            for key in build_keys.iter().chain(&run_keys) {
                if finals.iter().any(|f| detail.contains(&format!("{key}={f}"))) {
                    *recorded.entry(key.clone()).or_default() += 1;
                }
            }
        }
    }
    let mut phases_off = Vec::new();
    for key in build_keys.iter().chain(&run_keys) {
        let times = recorded.get(key).copied().unwrap_or(0);
        if times != 1 {
            phases_off.push(format!("{key} recorded {times}×"));
        }
    }
    let mut builds_by_phase: BTreeMap<String, usize> = BTreeMap::new();
    for key in build_keys.iter().chain(&run_keys) {
        let phase = store
            .objects(CLUSTER)
            .await
            .unwrap()
            .into_iter()
            .find(|o| &o.key == key)
            .map(|o| o.phase)
            .unwrap_or_default();
        *builds_by_phase
            .entry(format!("{}:{phase}", key.split('/').next().unwrap()))
            .or_default() += 1;
    }
    let uid_counts = uids.lock().unwrap().clone();
    let twice: Vec<&String> = uid_counts
        .iter()
        .filter(|(_, u)| u.len() > 1)
        .map(|(k, _)| k)
        .collect();
    let missing: Vec<&String> = build_keys
        .iter()
        .chain(&run_keys)
        .filter(|k| !uid_counts.contains_key(*k))
        .collect();
    let mut log_bytes = 0usize;
    let mut logs_off = Vec::new();
    for (stream, expected) in &expected_logs {
        let (bytes, truncated, eof) = store.log(CLUSTER, stream).await.unwrap();
        log_bytes += bytes.len();
        if bytes.len() != *expected || truncated || !eof {
            logs_off.push(format!(
                "{stream}: {} of {expected} bytes, truncated {truncated}, eof {eof}",
                bytes.len()
            ));
        }
    }
    drop(hub_guard);

    // No stuck finalizer: every Project deleted through the hub goes, namespace and all.
    let deleting = Instant::now();
    for name in names.iter().chain(["soak-log".to_string()].iter()) {
        loop {
            let queued = match hub.read().await.as_ref() {
                Some(h) => Some(h.delete(CLUSTER, ObjectRef::new("Project", "", name)).await),
                None => None,
            };
            if let Some(Ok(_)) = queued {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let projects_api: Api<Project> = Api::all(client.clone());
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let mut stuck = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        stuck.clear();
        for name in names.iter().chain(["soak-log".to_string()].iter()) {
            if projects_api.get_opt(name).await.ok().flatten().is_some() {
                stuck.push(format!("Project {name}"));
            }
            if namespaces.get_opt(name).await.ok().flatten().is_some() {
                stuck.push(format!("namespace {name}"));
            }
        }
        if stuck.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let deleted_in = deleting.elapsed();
    if let Some(process) = agent.process.take() {
        process.terminate(Duration::from_secs(15));
    }

    let mut away = away;
    away.sort();
    println!(
        "soak: {rounds} rounds in {chaos_time:.0?} under {kills} agent SIGKILLs ({starts} agent starts), {hub_restarts} hub restarts, {apiserver_restarts} apiserver restarts (away median {median:.1?}, max {max:.1?})",
        rounds = round,
        starts = agent.starts,
        median = away.get(away.len() / 2).copied().unwrap_or_default(),
        max = away.last().copied().unwrap_or_default(),
    );
    println!(
        "commands: {} queued, {} unanswered, {} failed {failed:?}",
        commands.len(),
        unanswered.len(),
        failed.len()
    );
    println!(
        "executed once in effect: {} objects asked for, {} with more than one UID {twice:?}, {} never created {missing:?}",
        build_keys.len() + run_keys.len(),
        twice.len(),
        missing.len()
    );
    println!(
        "final phases: {builds_by_phase:?}; recorded other than once at the hub: {} {phases_off:?}",
        phases_off.len()
    );
    println!(
        "logs: {} streams, {:.1} MiB at the hub, {} incomplete {logs_off:?}",
        expected_logs.len(),
        log_bytes as f64 / (1 << 20) as f64,
        logs_off.len()
    );
    println!("deletion: every Project and namespace gone in {deleted_in:.1?}; stuck: {stuck:?}");
    let lost = unanswered.len()
        + failed.len()
        + twice.len()
        + missing.len()
        + phases_off.len()
        + logs_off.len()
        + stuck.len();
    println!("soak: {lost} lost");
    assert_eq!(lost, 0, "the soak lost something (see above)");
}
