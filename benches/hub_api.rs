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
//!    (default 1048576, so that the budget does not hide the tunnel; its default is 512).
//!
//! `cargo bench --bench hub_api` (`PARTS=apply`, `PARTS=watch` or `PARTS=applogs` for one part).

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
    let token = hub.create_token(cluster, Duration::from_secs(600)).unwrap();
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
    let (_, key) = shapeblock_hub::api::create_api_key(hub.store(), "bench").unwrap();
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
        hub.apply(cluster, &manifest).unwrap();
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
    let mut hub = std::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
        .arg("--data-dir")
        .arg(data.path())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--api-addr",
            &format!("127.0.0.1:{api_port}"),
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
    let address = format!("https://127.0.0.1:{api_port}");
    let idle = rss_kib(hub.id());
    let (alone_rate, alone_recorded, alone_lags, _) =
        watch_round(&address, &key, &ca, hub.id(), (1, writers, per_writer)).await;
    let (rate, recorded, lags, rss) =
        watch_round(&address, &key, &ca, hub.id(), (watchers, writers, per_writer)).await;
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
    let _ = hub.kill();
    let _ = hub.wait();
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
    let token = hub.create_token(cluster, Duration::from_secs(600)).unwrap();
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
    let (_, key) = shapeblock_hub::api::create_api_key(hub.store(), "bench").unwrap();
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
