//! Benchmark (not a test) of the hub's API, each figure next to its floor measured in the same
//! run:
//!
//! 1. apply → CR created (seen by a watch), `COMMANDS` (default 100) sequential: through the API
//!    (TLS, API key, a client in this process), through the in-process queue (`Hub::apply`),
//!    and a bare client's server-side apply to the same apiserver (the floor);
//! 2. WatchEvents fan-out: `WATCHERS` (default 100) watchers of a `shapeblock-hub` process
//!    while `WRITERS` (default 50) writers queue commands concurrently: events/s delivered (all
//!    watchers together), p50/p99 lag from record (the event's time at the hub) to watcher,
//!    and the hub's RSS; the floor is one watcher alone under the same writers;
//! 3. live App logs: `LOG_MIB` (default 32) of 1 KiB lines written into an App pod's log
//!    while a `FollowAppLogs` caller reads them through the agent, the tunnel and the hub:
//!    bytes/s delivered and bytes dropped, next to reading the same pod's log straight from
//!    the apiserver (the floor). The agent runs with `--app-logs-kib-per-second` `RATE_KIB`
//!    (default 1048576, so that the budget does not hide the tunnel; its default is 512);
//! 4. WatchEvents while builds run: `WATCHERS` (default 100) watchers of the one cluster of a
//!    `shapeblock-hub` process while a real agent runs `PROJECTS` x `APPS` (default 10 x 5)
//!    AppBuilds at once (dockerfile strategy, simulated build pods writing `BUILD_LINES`
//!    lines of log each, then rolled out by the helm-controller), every build applied through
//!    the API; each watcher reads until every build's final phase came: events/s delivered,
//!    p50/p99 lag from record to watcher, whether every watcher got the same ids, and the
//!    hub's RSS; the floor is one watcher alone during a round of as many builds in the same
//!    run (measured first, after a warm-up round that makes the Apps' first releases;
//!    `WARMUP=0` skips it). Not in the default run (it takes minutes).
//!
//! `cargo bench --bench hub_api` (`PARTS=apply`, `PARTS=watch`, `PARTS=applogs` or
//! `PARTS=builds` for one part).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use shapeblock_agent::api::Project;
use shapeblock_hub::api::v1 as api;
use shapeblock_hub::{Hub, HubConfig};
use shapeblock_testenv::{ControlPlane, Options, agent};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let parts = std::env::var("PARTS").unwrap_or_else(|_| "apply,watch,applogs".into());
        let wanted = |part: &str| parts.split(',').any(|p| p == part);
        if wanted("apply") {
            apply_latency().await;
        }
        if wanted("watch") {
            watch_fan_out().await;
        }
        if wanted("applogs") {
            app_logs_throughput().await;
        }
        if wanted("builds") {
            watch_during_builds().await;
        }
    });
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn project_json(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "metadata": {"name": name, "labels": {"bench": "hub-api"}}, "spec": {},
    })
}

fn summary(what: &str, mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let (p50, p99) = (ms(percentile(&samples, 0.5)), ms(percentile(&samples, 0.99)));
    println!("  {what}: p50 {p50:.1} ms, p99 {p99:.1} ms");
    (p50, p99)
}

async fn apply_latency() {
    let n = knob("COMMANDS", 100);
    let plane = ControlPlane::start(Options::default())
        .await
        .expect("start the control plane");
    let client = plane.client().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = HubConfig::new(data.path().to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    config.api_listen = Some(([127, 0, 0, 1], 0).into());
    let hub = Hub::start(config).await.unwrap();
    let cluster = "bench";
    let token = hub.create_token(cluster, Duration::from_secs(600)).await.unwrap();
    let agent = agent::AgentProcess::start_installed(
        Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
        &client,
        plane.kubeconfig(),
        plane.work_dir(),
        &agent::hub_flags(&hub.url(), &token, &hub.ca_hash(), "warn"),
    )
    .await
    .unwrap();
    let started = Instant::now();
    while hub.session_epoch(cluster).is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the agent did not connect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (_, key) = shapeblock_hub::api::create_api_key(hub.store(), "bench")
        .await
        .unwrap();
    let ca = std::fs::read_to_string(data.path().join("ca.pem")).unwrap();
    let address = format!("https://{}", hub.api_address().unwrap());
    let mut api_client = shapeblock_hub::api::connect(&address, &key, &ca).await.unwrap();

    let projects: Api<Project> = Api::all(client.clone());
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let recorder = {
        let seen = seen.clone();
        let api = projects.clone();
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default().labels("bench=hub-api")).boxed();
            while let Some(Ok(event)) = events.next().await {
                if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = event {
                    seen.lock()
                        .unwrap()
                        .entry(p.name_any())
                        .or_insert_with(Instant::now);
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let until_seen = |name: String, started: Instant| {
        let seen = seen.clone();
        async move {
            loop {
                if let Some(at) = seen.lock().unwrap().get(&name) {
                    return *at - started;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "{name} never appeared"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    };
    let (mut floor, mut queue, mut through_api) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so that the three see the same apiserver and machine load.
    for i in 0..n {
        let name = format!("floor-{i}");
        let started = Instant::now();
        projects
            .patch(
                &name,
                &PatchParams::apply("bench").force(),
                &Patch::Apply(project_json(&name)),
            )
            .await
            .unwrap();
        floor.push(until_seen(name, started).await);

        let name = format!("queue-{i}");
        let manifest = serde_json::to_string(&project_json(&name)).unwrap();
        let started = Instant::now();
        hub.apply(cluster, &manifest).await.unwrap();
        queue.push(until_seen(name, started).await);

        let name = format!("api-{i}");
        let manifest = serde_json::to_string(&project_json(&name)).unwrap();
        let started = Instant::now();
        api_client
            .apply(api::ApplyRequest {
                cluster_id: cluster.into(),
                manifest,
                idempotency_key: format!("bench-{i}"),
            })
            .await
            .unwrap();
        through_api.push(until_seen(name, started).await);
    }
    recorder.abort();
    println!("apply -> CR created ({n} sequential each, interleaved):");
    let (a50, a99) = summary("through the API (TLS, key, idempotency key)", through_api);
    let (q50, q99) = summary("through the in-process queue (Hub::apply)", queue);
    let (f50, f99) = summary("floor: bare server-side apply", floor);
    println!(
        "  API / floor: p50 {:.1}x, p99 {:.1}x; API / queue: p50 {:.2}x, p99 {:.2}x",
        a50 / f50,
        a99 / f99,
        a50 / q50,
        a99 / q99
    );
    agent.terminate(Duration::from_secs(15));
    hub.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One round: `watchers` watchers of everything, `writers` writers each queueing `per_writer`
/// commands; (events delivered per second, lags, hub RSS at the end in KiB).
async fn watch_round(
    address: &str,
    key: &str,
    ca: &str,
    pid: u32,
    (watchers, writers, per_writer): (usize, usize, usize),
) -> (f64, f64, Vec<Duration>, u64) {
    let mut setup = shapeblock_hub::api::connect(address, key, ca).await.unwrap();
    let cluster = format!("bench-{}", free_port());
    setup
        .create_enrollment_token(api::CreateEnrollmentTokenRequest {
            cluster_id: cluster.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let total = writers * per_writer;
    let mut streams = Vec::new();
    for _ in 0..watchers {
        let mut client = shapeblock_hub::api::connect(address, key, ca).await.unwrap();
        let stream = client
            .watch_events(api::WatchEventsRequest {
                cluster_id: cluster.clone(),
                after_id: 0,
            })
            .await
            .unwrap()
            .into_inner();
        streams.push((client, stream));
    }
    let started = Instant::now();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|(_client, mut stream)| {
            tokio::spawn(async move {
                let mut lags = Vec::with_capacity(total);
                while lags.len() < total {
                    let event = stream.message().await.unwrap().unwrap();
                    let now = shapeblock_proto::now_unix_ms();
                    lags.push(Duration::from_millis((now - event.at_ms).max(0) as u64));
                }
                lags
            })
        })
        .collect();
    let writers: Vec<_> = (0..writers)
        .map(|w| {
            let (address, key, ca, cluster) = (
                address.to_string(),
                key.to_string(),
                ca.to_string(),
                cluster.clone(),
            );
            tokio::spawn(async move {
                let mut client = shapeblock_hub::api::connect(&address, &key, &ca).await.unwrap();
                for i in 0..per_writer {
                    let name = format!("w{w}-{i}");
                    let manifest = serde_json::to_string(&project_json(&name)).unwrap();
                    client
                        .apply(api::ApplyRequest {
                            cluster_id: cluster.clone(),
                            manifest,
                            idempotency_key: String::new(),
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let recorded = total as f64 / started.elapsed().as_secs_f64();
    let mut lags = Vec::new();
    for reader in readers {
        lags.extend(reader.await.unwrap());
    }
    let elapsed = started.elapsed();
    (
        (watchers * total) as f64 / elapsed.as_secs_f64(),
        recorded,
        lags,
        rss_kib(pid),
    )
}

async fn watch_fan_out() {
    let watchers = knob("WATCHERS", 100);
    let writers = knob("WRITERS", 50);
    let per_writer = knob("PER_WRITER", 20);
    // No agent here: the hub's heartbeat setting changes nothing measured.
    let hub = HubProcess::start().await;
    let (key, ca, address) = (hub.key.clone(), hub.ca.clone(), hub.api_address.clone());
    let idle = rss_kib(hub.pid());
    let (alone_rate, alone_recorded, alone_lags, _) =
        watch_round(&address, &key, &ca, hub.pid(), (1, writers, per_writer)).await;
    let (rate, recorded, lags, rss) =
        watch_round(&address, &key, &ca, hub.pid(), (watchers, writers, per_writer)).await;
    println!(
        "WatchEvents: {watchers} watchers, {writers} concurrent writers x {per_writer} commands ({} events each watcher):",
        writers * per_writer
    );
    println!(
        "  delivered {rate:.0} events/s in all while {recorded:.0} events/s were recorded; floor (1 watcher): {alone_rate:.0} events/s while {alone_recorded:.0} were recorded"
    );
    summary(&format!("lag record -> watcher, {watchers} watchers"), lags);
    summary("floor: lag with 1 watcher", alone_lags);
    println!(
        "  hub RSS {:.1} MiB with {watchers} watchers (idle {:.1} MiB)",
        rss as f64 / 1024.0,
        idle as f64 / 1024.0
    );
}

async fn app_logs_throughput() {
    use k8s_openapi::api::core::v1::{Namespace, Pod};
    use kube::api::{LogParams, PostParams};
    use shapeblock_testenv::{ContainerRef, PodOutcome, PodSelector, logs, set_pod_outcome};

    let mib = knob("LOG_MIB", 32);
    let rate_kib = knob("RATE_KIB", 1 << 20);
    let plane = ControlPlane::start(Options::default())
        .await
        .expect("start the control plane");
    let client = plane.client().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = HubConfig::new(data.path().to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    config.api_listen = Some(([127, 0, 0, 1], 0).into());
    let hub = Hub::start(config).await.unwrap();
    let cluster = "bench";
    let token = hub.create_token(cluster, Duration::from_secs(600)).await.unwrap();
    let kubeconfig =
        agent::install_agent_identity(&client, plane.kubeconfig(), "shapeblock", plane.work_dir())
            .await
            .unwrap();
    let args = [
        "--log=warn".to_string(),
        format!("--hub-address={}", hub.url()),
        format!("--enroll-token={token}"),
        format!("--ca-hash={}", hub.ca_hash()),
        "--heartbeat-seconds=2".into(),
        "--reconnect-max-seconds=1".into(),
        "--registry-secret=".into(),
        format!("--app-logs-kib-per-second={rate_kib}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = agent::AgentProcess::start(
        Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
        &kubeconfig,
        "shapeblock",
        &plane.work_dir().join("agent.log"),
        &args,
    )
    .await
    .unwrap();
    let started = Instant::now();
    while hub.session_epoch(cluster).is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the agent did not connect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ns = "livelogs";
    hub.apply(cluster, &serde_json::to_string(&project_json(ns)).unwrap())
        .await
        .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let started = Instant::now();
    while !namespaces
        .get_opt(ns)
        .await
        .unwrap()
        .is_some_and(|n| n.labels().contains_key("apps.shapeblock.io/project"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no project namespace"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    set_pod_outcome(&client, &PodSelector::namespace(ns), &PodOutcome::Hang)
        .await
        .unwrap();
    // A pod as the chart labels an App's web process.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "bench-web-0", "labels": {
            "apps.shapeblock.io/app": "bench", "apps.shapeblock.io/process": "web"}},
        "spec": {"containers": [{"name": "web", "image": "bench:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let started = Instant::now();
    while pods
        .get("bench-web-0")
        .await
        .unwrap()
        .status
        .and_then(|s| s.phase)
        .as_deref()
        != Some("Running")
    {
        assert!(started.elapsed() < Duration::from_secs(60), "the pod did not run");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, key) = shapeblock_hub::api::create_api_key(hub.store(), "bench")
        .await
        .unwrap();
    let ca = std::fs::read_to_string(data.path().join("ca.pem")).unwrap();
    let address = format!("https://{}", hub.api_address().unwrap());
    let mut api_client = shapeblock_hub::api::connect(&address, &key, &ca).await.unwrap();
    let mut follow = api_client
        .follow_app_logs(api::FollowAppLogsRequest {
            cluster_id: cluster.into(),
            namespace: ns.into(),
            app: "bench".into(),
            process: "web".into(),
            tail_lines: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Live once a first line comes through.
    let log = ContainerRef::new(ns, "bench-web-0", "web");
    let ready = "ready\n";
    let (mut delivered, mut dropped) = (0u64, 0u64);
    let mut marker = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = marker.tick() => logs().append(&log, "ready"),
            message = follow.message() => {
                let d = message.unwrap().expect("the follow goes on");
                delivered += d.data.len() as u64;
                if d.data.ends_with(ready.as_bytes()) {
                    break;
                }
            }
        }
    }
    let base = delivered;
    // Marker lines still in flight are counted in `base` below, not as the bench's bytes.
    let line = "x".repeat(1023);
    let lines_per_batch = 256;
    let batch = vec![line.as_str(); lines_per_batch].join("\n");
    let total = (mib as u64) << 20;
    let batches = total / (1024 * lines_per_batch as u64);
    let writer = tokio::spawn(async move {
        for _ in 0..batches {
            logs().append(&log, &batch);
            tokio::task::yield_now().await;
        }
    });
    let started = Instant::now();
    let mut first_after = None;
    let mut last_at = started;
    // The last bytes may all be dropped: wait for them at most until the stream is quiet.
    while delivered + dropped < base + total {
        match tokio::time::timeout(Duration::from_secs(5), follow.message()).await {
            Ok(Ok(Some(d))) => {
                first_after.get_or_insert_with(|| started.elapsed());
                last_at = Instant::now();
                delivered += d.data.len() as u64;
                dropped += d.dropped;
            }
            other => {
                println!("  (the follow went quiet or ended: {other:?})");
                break;
            }
        }
    }
    let through = last_at - started;
    writer.await.unwrap();
    let delivered = delivered.saturating_sub(base);
    drop(follow);

    let started = Instant::now();
    let mut reader = pods
        .log_stream(
            "bench-web-0",
            &LogParams {
                container: Some("web".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut floor_bytes = 0u64;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        use futures::AsyncReadExt;
        let n = reader.read(&mut buffer).await.unwrap();
        if n == 0 {
            break;
        }
        floor_bytes += n as u64;
    }
    let floor = started.elapsed();
    // The live floor: the same amount written again while followed straight from the
    // apiserver.
    let mut live = pods
        .log_stream(
            "bench-web-0",
            &LogParams {
                container: Some("web".into()),
                follow: true,
                tail_lines: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = ContainerRef::new(ns, "bench-web-0", "web");
    let batch = vec![line.as_str(); lines_per_batch].join("\n");
    let writer = tokio::spawn(async move {
        for _ in 0..batches {
            logs().append(&log, &batch);
            tokio::task::yield_now().await;
        }
    });
    let started = Instant::now();
    let mut live_bytes = 0u64;
    while live_bytes < batches * 1024 * lines_per_batch as u64 {
        use futures::AsyncReadExt;
        let n = live.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the direct follow ended");
        live_bytes += n as u64;
    }
    let live_floor = started.elapsed();
    writer.await.unwrap();
    let mb = |bytes: u64, d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    println!(
        "live App logs: {mib} MiB of 1 KiB lines written while followed (agent budget {rate_kib} KiB/s per follow):"
    );
    println!(
        "  through agent, tunnel and hub: {:.1} MB/s delivered ({delivered} bytes in {:.2} s, first after {:?}), {dropped} bytes dropped ({:.1} %)",
        mb(delivered, through),
        through.as_secs_f64(),
        first_after.unwrap_or_default(),
        dropped as f64 * 100.0 / total as f64
    );
    println!(
        "  floor: the same pod's log straight from the apiserver: {:.1} MB/s ({floor_bytes} bytes in {:.2} s)",
        mb(floor_bytes, floor),
        floor.as_secs_f64()
    );
    println!(
        "  floor: the same amount written again while followed straight from the apiserver: {:.1} MB/s ({live_bytes} bytes in {:.2} s)",
        mb(live_bytes, live_floor),
        live_floor.as_secs_f64()
    );
    println!("  agent peak RSS {:.1} MiB", agent.peak_rss_kib() as f64 / 1024.0);
    agent.terminate(Duration::from_secs(15));
    hub.stop().await;
}

const FINAL_BUILD_PHASES: [&str; 3] = ["Completed", "Failed", "Cancelled"];

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A `shapeblock-hub serve` of its own, so that its RSS is the hub's alone. Killed when
/// dropped: a panicking bench would otherwise leave it serving.
struct HubProcess {
    child: std::process::Child,
    data: tempfile::TempDir,
    port: u16,
    api_address: String,
    key: String,
    ca: String,
}

impl HubProcess {
    async fn start() -> Self {
        let data = tempfile::tempdir().unwrap();
        let made = std::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
            .arg("--data-dir")
            .arg(data.path())
            .args(["api-key", "create", "--name", "bench"])
            .output()
            .unwrap();
        let key = String::from_utf8(made.stdout).unwrap().trim().to_string();
        let (port, api_port) = (free_port(), free_port());
        let log = std::fs::File::create(data.path().join("hub.log")).unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
            .arg("--data-dir")
            .arg(data.path())
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--api-addr",
                &format!("127.0.0.1:{api_port}"),
                // As the in-process hubs of the other parts: a lost session is noticed soon.
                "--heartbeat-seconds",
                "2",
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while tokio::net::TcpStream::connect(("127.0.0.1", api_port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "the hub process did not listen");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let ca = std::fs::read_to_string(data.path().join("ca.pem")).unwrap();
        Self {
            child,
            data,
            port,
            api_address: format!("https://127.0.0.1:{api_port}"),
            key,
            ca,
        }
    }

    async fn client(&self) -> shapeblock_hub::api::Client {
        shapeblock_hub::api::connect(&self.api_address, &self.key, &self.ca)
            .await
            .unwrap()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = self.data.path().join("hub.log");
        if std::thread::panicking() {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            println!("-- the hub's log, last lines:");
            for line in tail.into_iter().rev() {
                println!("{line}");
            }
        }
    }
}

/// The id of the last event of `cluster` once nothing was recorded for `quiet` (or after two
/// minutes of events): where a round's watchers start, so that the previous round's trailing
/// events (an App's rollout after its build) are not counted in this one.
async fn quiet_cursor(
    client: &mut shapeblock_hub::api::Client,
    cluster: &str,
    after: u64,
    quiet: Duration,
) -> u64 {
    let mut stream = client
        .watch_events(api::WatchEventsRequest {
            cluster_id: cluster.into(),
            after_id: after,
        })
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last = after;
    while Instant::now() < deadline {
        match tokio::time::timeout(quiet, stream.message()).await {
            Ok(Ok(Some(e))) => last = e.id,
            Ok(other) => panic!("the cursor's watch ended: {other:?}"),
            Err(_) => break,
        }
    }
    last
}

fn build_app_manifest(namespace: &str, app: &str) -> String {
    serde_json::json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
        "metadata": {"name": app, "namespace": namespace},
        "spec": {"registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"},
                 "git": {"url": "https://github.com/example/web.git"},
                 "processes": {"web": {"port": 8080}}}})
    .to_string()
}

/// What one round of builds gave its watchers.
struct BuildsRound {
    watchers: usize,
    /// Events in the round's sequence (the first watcher's).
    events: usize,
    elapsed: Duration,
    lags: Vec<Duration>,
    per_watcher: Vec<usize>,
    /// Watchers whose ids are exactly the first watcher's.
    identical: usize,
    /// Over every watcher: an id not above the one before, and a step of more than one.
    duplicates: usize,
    gaps: usize,
    ids: (u64, u64),
    phases: std::collections::BTreeMap<String, usize>,
    /// The first watcher's events by kind.
    kinds: std::collections::BTreeMap<&'static str, usize>,
    rss_end_kib: u64,
    rss_max_kib: u64,
}

/// One round: `watchers` watchers of `cluster` from the quiet cursor, then one AppBuild per
/// App (named after `round`) applied through the API all at once; each watcher reads until
/// every one of them has its final phase.
async fn builds_round(
    hub: &HubProcess,
    cluster: &str,
    apps: &[(String, String)],
    round: usize,
    watchers: usize,
    cursor: u64,
) -> BuildsRound {
    let mut setup = hub.client().await;
    let cursor = quiet_cursor(&mut setup, cluster, cursor, Duration::from_secs(3)).await;
    let builds: Vec<(String, String, String)> = apps
        .iter()
        .map(|(ns, app)| (ns.clone(), app.clone(), format!("{app}-r{round}")))
        .collect();
    let keys: Arc<std::collections::HashSet<String>> = Arc::new(
        builds
            .iter()
            .map(|(ns, _, name)| format!("AppBuild/{ns}/{name}"))
            .collect(),
    );
    let mut streams = Vec::new();
    for _ in 0..watchers {
        let mut client = hub.client().await;
        let stream = client
            .watch_events(api::WatchEventsRequest {
                cluster_id: cluster.into(),
                after_id: cursor,
            })
            .await
            .unwrap()
            .into_inner();
        streams.push((client, stream));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(900);
    let readers: Vec<_> = streams
        .into_iter()
        .map(|(client, mut stream)| {
            let keys = keys.clone();
            tokio::spawn(async move {
                let (mut ids, mut lags) = (Vec::new(), Vec::new());
                let mut finals: HashMap<String, String> = HashMap::new();
                let mut kinds = std::collections::BTreeMap::new();
                while finals.len() < keys.len() {
                    let event = match tokio::time::timeout_at(deadline, stream.message()).await {
                        Ok(Ok(Some(event))) => event,
                        other => panic!(
                            "a watcher stopped with {} of {} builds final ({} events): {other:?}",
                            finals.len(),
                            keys.len(),
                            ids.len()
                        ),
                    };
                    let now = shapeblock_proto::now_unix_ms();
                    lags.push(Duration::from_millis((now - event.at_ms).max(0) as u64));
                    ids.push(event.id);
                    let kind = api::EventKind::try_from(event.kind).unwrap_or_default();
                    *kinds.entry(kind.as_str_name()).or_insert(0usize) += 1;
                    if event.kind == api::EventKind::Phase as i32
                        && FINAL_BUILD_PHASES.contains(&event.phase.as_str())
                        && keys.contains(&event.object)
                    {
                        finals.entry(event.object).or_insert(event.phase);
                    }
                }
                // The stream goes back with the figures: the hub's RSS at the end is taken
                // with every watcher still connected.
                (ids, lags, finals, kinds, client, stream)
            })
        })
        .collect();
    let rss_max = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (rss_max, pid) = (rss_max.clone(), hub.pid());
        tokio::spawn(async move {
            loop {
                rss_max.fetch_max(rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let started = Instant::now();
    // As a server would: each build its own request, all at once.
    let applies = builds.iter().map(|(ns, app, name)| {
        let mut client = setup.clone();
        let manifest = serde_json::json!({"apiVersion": "apps.shapeblock.io/v1alpha1",
            "kind": "AppBuild", "metadata": {"name": name, "namespace": ns},
            "spec": {"appName": app}})
        .to_string();
        async move {
            client
                .apply(api::ApplyRequest {
                    cluster_id: cluster.into(),
                    manifest,
                    idempotency_key: String::new(),
                })
                .await
                .unwrap();
        }
    });
    futures::future::join_all(applies).await;
    let mut results = Vec::new();
    for reader in readers {
        results.push(reader.await.unwrap());
    }
    let elapsed = started.elapsed();
    let rss_end_kib = rss_kib(hub.pid());
    sampler.abort();
    let first = results[0].0.clone();
    let mut round = BuildsRound {
        watchers,
        events: first.len(),
        elapsed,
        lags: Vec::new(),
        per_watcher: Vec::new(),
        identical: 0,
        duplicates: 0,
        gaps: 0,
        ids: (
            first.first().copied().unwrap_or(0),
            first.last().copied().unwrap_or(0),
        ),
        phases: Default::default(),
        kinds: results[0].3.clone(),
        rss_end_kib,
        rss_max_kib: rss_max
            .load(std::sync::atomic::Ordering::Relaxed)
            .max(rss_end_kib),
    };
    for phase in results[0].2.values() {
        *round.phases.entry(phase.clone()).or_default() += 1;
    }
    for (ids, lags, ..) in results {
        round.per_watcher.push(ids.len());
        round.identical += usize::from(ids == first);
        let mut previous = cursor;
        for id in &ids {
            if *id <= previous {
                round.duplicates += 1;
            } else if *id > previous + 1 {
                round.gaps += 1;
            }
            previous = *id;
        }
        round.lags.extend(lags);
    }
    round
}

async fn watch_during_builds() {
    use shapeblock_testenv::{PodOutcome, PodSelector, logs, set_pod_outcome};

    let watchers = knob("WATCHERS", 100);
    let projects = knob("PROJECTS", 10);
    let apps_per_project = knob("APPS", 5);
    let build_lines = knob("BUILD_LINES", 200);
    let plane = ControlPlane::start(Options::default())
        .await
        .expect("start the control plane");
    let client = plane.client().await.unwrap();
    let hub = HubProcess::start().await;
    let idle = rss_kib(hub.pid());
    let cluster = "bench";
    let mut setup = hub.client().await;
    let secret = setup
        .create_enrollment_token(api::CreateEnrollmentTokenRequest {
            cluster_id: cluster.into(),
            ttl_seconds: 3600,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .secret;
    let ca_hash = setup
        .get_hub(api::GetHubRequest {})
        .await
        .unwrap()
        .into_inner()
        .ca_hash;
    let mut flags = agent::hub_flags(
        &format!("https://127.0.0.1:{}", hub.port),
        &secret,
        &ca_hash,
        "warn",
    );
    flags.push("--registry=registry.example.com".into());
    let agent = agent::AgentProcess::start_installed(
        Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
        &client,
        plane.kubeconfig(),
        plane.work_dir(),
        &flags,
    )
    .await
    .unwrap();
    let started = Instant::now();
    loop {
        let connected = setup
            .get_cluster(api::GetClusterRequest {
                cluster_id: cluster.into(),
            })
            .await
            .is_ok_and(|c| c.into_inner().connected);
        if connected {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the agent did not connect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let lines: Vec<String> = (0..build_lines)
        .map(|i| format!("step {i:>4} {}", "b".repeat(60)))
        .collect();
    let line_refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let namespaces: Vec<String> = (0..projects).map(|p| format!("watch-{p}")).collect();
    for ns in &namespaces {
        logs().script(ns, "build", &line_refs);
        setup
            .apply(api::ApplyRequest {
                cluster_id: cluster.into(),
                manifest: serde_json::to_string(&project_json(ns)).unwrap(),
                idempotency_key: String::new(),
            })
            .await
            .unwrap();
    }
    // As a server does: the Apps once their Projects are Ready at the hub.
    let started = Instant::now();
    loop {
        let objects = setup
            .list_objects(api::ListObjectsRequest {
                cluster_id: cluster.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .objects;
        let ready = namespaces.iter().all(|ns| {
            objects
                .iter()
                .any(|o| o.key == format!("Project//{ns}") && o.phase == "Ready")
        });
        if ready {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the Projects were not Ready at the hub"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut apps = Vec::new();
    for ns in &namespaces {
        for a in 0..apps_per_project {
            let app = format!("app-{a}");
            setup
                .apply(api::ApplyRequest {
                    cluster_id: cluster.into(),
                    manifest: build_app_manifest(ns, &app),
                    idempotency_key: String::new(),
                })
                .await
                .unwrap();
            apps.push((ns.clone(), app));
        }
        set_pod_outcome(
            &client,
            &PodSelector::container(ns, "resolve"),
            &PodOutcome::Succeed {
                after: Duration::from_millis(300),
                message: Some("0123456789abcdef0123456789abcdef01234567".into()),
            },
        )
        .await
        .unwrap();
        set_pod_outcome(
            &client,
            &PodSelector::container(ns, "build"),
            &PodOutcome::Succeed {
                after: Duration::from_secs(2),
                message: Some(format!("sha256:{}", "ab".repeat(32))),
            },
        )
        .await
        .unwrap();
    }
    let settled = rss_kib(hub.pid());
    // An App's first build installs its release and later ones upgrade it, which records
    // other events: the warm-up makes the floor's round and the watchers' round alike.
    let warm_up = match knob("WARMUP", 1) {
        0 => None,
        _ => Some(builds_round(&hub, cluster, &apps, 0, 1, 0).await),
    };
    let cursor = warm_up.as_ref().map_or(0, |w| w.ids.1);
    let floor = builds_round(&hub, cluster, &apps, 1, 1, cursor).await;
    let round = builds_round(&hub, cluster, &apps, 2, watchers, floor.ids.1).await;
    let peak = peak_rss_kib(hub.pid());

    let rate = |r: &BuildsRound| (r.watchers * r.events) as f64 / r.elapsed.as_secs_f64();
    let recorded = |r: &BuildsRound| r.events as f64 / r.elapsed.as_secs_f64();
    println!(
        "WatchEvents while builds run: {} AppBuilds per round ({projects} Projects x {apps_per_project} Apps, dockerfile strategy, {build_lines}-line build logs, rolled out), applied through the API of a shapeblock-hub process to a real agent; watchers of its cluster read until every build's final phase:",
        apps.len()
    );
    let rounds = [
        (Some(&round), "watchers"),
        (Some(&floor), "floor (1 watcher, its own round)"),
        (warm_up.as_ref(), "warm-up (1 watcher, the Apps' first releases)"),
    ];
    for (r, what) in rounds.into_iter().filter_map(|(r, what)| Some((r?, what))) {
        println!(
            "  {what}: {} watchers, {:.0} events/s delivered in all while {:.0} events/s were recorded ({} events, ids {}..={}, in {:.1} s; final phases {:?})",
            r.watchers,
            rate(r),
            recorded(r),
            r.events,
            r.ids.0,
            r.ids.1,
            r.elapsed.as_secs_f64(),
            r.phases
        );
    }
    println!("  events of the watchers' round by kind: {:?}", round.kinds);
    println!(
        "  events per watcher: min {}, max {}; {} of {} watchers got the first watcher's ids exactly; {} duplicate and {} gap steps over all watchers",
        round.per_watcher.iter().min().unwrap(),
        round.per_watcher.iter().max().unwrap(),
        round.identical,
        round.watchers,
        round.duplicates,
        round.gaps
    );
    summary(
        &format!("lag record -> watcher, {} watchers", round.watchers),
        round.lags.clone(),
    );
    summary("floor: lag with 1 watcher", floor.lags.clone());
    println!(
        "  hub RSS {:.1} MiB at the end with {} watchers (sampled max {:.1} MiB; floor round: end {:.1}, max {:.1} MiB); idle {:.1} MiB before the agent, {:.1} MiB with the agent, Projects and Apps; peak (VmHWM) {:.1} MiB",
        round.rss_end_kib as f64 / 1024.0,
        round.watchers,
        round.rss_max_kib as f64 / 1024.0,
        floor.rss_end_kib as f64 / 1024.0,
        floor.rss_max_kib as f64 / 1024.0,
        idle as f64 / 1024.0,
        settled as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    agent.terminate(Duration::from_secs(15));
    drop(hub);
}
