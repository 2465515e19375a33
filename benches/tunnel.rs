//! Benchmark (not a test) of the tunnel, each figure next to its floor measured in the same run:
//!
//! 1. command → CR applied: latency p50/p99 of `hub.apply` until the Project exists (seen by
//!    a watch), against a bare client's server-side apply to the same apiserver;
//! 2. time from a hub restart to the resumed session;
//! 3. build-log relay: MB/s and agent peak RSS while relaying `LOG_MIB` (default 1024) of one
//!    build container's log, against raw TLS throughput on loopback;
//! 4. hub RSS with `AGENTS` (default 1,000) concurrently connected agents (lightweight
//!    in-process clients), against the hub idle.
//!
//! `cargo bench --bench tunnel` (`COMMANDS=`, `LOG_MIB=`, `AGENTS=` for shorter runs;
//! `AGENT_BINARY`, `AGENT_FLAGS` to run another agent build or more of its flags).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use shapeblock_agent::api::{AppBuild, Project};
use shapeblock_agent::proto::v1::agent_message::Body as Up;
use shapeblock_agent::proto::v1::{AgentMessage, Heartbeat};
use shapeblock_agent::tunnel::enroll;
use shapeblock_hub::{Hub, HubConfig};
use shapeblock_testenv::stand_in::StandIn;
use shapeblock_testenv::{
    CertificateAuthority, ControlPlane, Options, PodOutcome, PodSelector, agent, logs, set_pod_outcome,
};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    raise_file_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run());
}

fn raise_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn run() {
    let plane = ControlPlane::start(Options::default())
        .await
        .expect("start the control plane");
    let client = plane.client().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = HubConfig::new(data.path().to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    let mut hub = Hub::start(config.clone()).await.unwrap();
    let cluster = "bench";
    let token = hub.create_token(cluster, Duration::from_secs(600)).await.unwrap();
    // AGENT_BINARY / AGENT_FLAGS: another build or more flags, compared in the same conditions.
    let (binary, extra) = agent::bench_overrides(env!("CARGO_BIN_EXE_shapeblock-agent"));
    let mut flags = agent::hub_flags(&hub.url(), &token, &hub.ca_hash(), "warn");
    // The cluster registry the log part's build pushes to (with a token of its own).
    flags.push("--registry=registry.example.com".into());
    flags.extend(extra);
    let agent =
        agent::AgentProcess::start_installed(&binary, &client, plane.kubeconfig(), plane.work_dir(), &flags)
            .await
            .unwrap();
    wait(Duration::from_secs(60), || hub.session_epoch(cluster).is_some()).await;

    // `PARTS=logs,agents` runs some parts only.
    let parts = std::env::var("PARTS").unwrap_or_else(|_| "commands,restart,logs,agents".into());
    let wanted = |part: &str| parts.split(',').any(|p| p == part);
    if wanted("commands") {
        command_latency(&client, &hub, cluster).await;
    }
    if wanted("restart") {
        hub = hub_restart(hub, config, cluster).await;
    }
    if wanted("logs") {
        log_relay(&client, &hub, cluster, &agent).await;
    }
    agent.terminate(Duration::from_secs(15));
    hub.stop().await;
    if wanted("agents") {
        many_agents().await;
    }
}

async fn wait(timeout: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    start.elapsed()
}

fn project_json(name: &str) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
        "metadata": {"name": name, "labels": {"bench": "tunnel"}}, "spec": {},
    })
}

async fn command_latency(client: &Client, hub: &Hub, cluster: &str) {
    let n = knob("COMMANDS", 200);
    let projects: Api<Project> = Api::all(client.clone());
    let mut floor = Vec::with_capacity(n);
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
        floor.push(started.elapsed());
    }
    // When each Project was first seen by a watch.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let recorder = {
        let seen = seen.clone();
        let api = projects.clone();
        tokio::spawn(async move {
            let mut events = watcher(api, watcher::Config::default().labels("bench=tunnel")).boxed();
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
    let mut through_hub = Vec::with_capacity(n);
    for i in 0..n {
        let name = format!("cmd-{i}");
        let manifest = serde_json::to_string(&project_json(&name)).unwrap();
        let started = Instant::now();
        hub.apply(cluster, &manifest).await.unwrap();
        wait(Duration::from_secs(30), || {
            seen.lock().unwrap().contains_key(&name)
        })
        .await;
        through_hub.push(seen.lock().unwrap()[&name] - started);
    }
    recorder.abort();
    floor.sort();
    through_hub.sort();
    let (f50, f99) = (percentile(&floor, 0.5), percentile(&floor, 0.99));
    let (h50, h99) = (percentile(&through_hub, 0.5), percentile(&through_hub, 0.99));
    println!(
        "command -> CR applied ({n} sequential): p50 {:.1} ms, p99 {:.1} ms; floor (bare server-side apply) p50 {:.1} ms, p99 {:.1} ms; ratio p50 {:.1}x, p99 {:.1}x",
        ms(h50),
        ms(h99),
        ms(f50),
        ms(f99),
        ms(h50) / ms(f50),
        ms(h99) / ms(f99)
    );
}

async fn hub_restart(hub: Hub, config: HubConfig, cluster: &str) -> Hub {
    let addr = hub.address();
    let mut hub = hub;
    let mut resumed = Vec::new();
    for _ in 0..5 {
        let epoch = hub.session_epoch(cluster).unwrap_or(0);
        hub.stop().await;
        let config = HubConfig {
            listen: addr,
            ..config.clone()
        };
        let started = Instant::now();
        hub = loop {
            match Hub::start(config.clone()).await {
                Ok(hub) => break hub,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let listening = started.elapsed();
        wait(Duration::from_secs(30), || {
            hub.session_epoch(cluster).is_some_and(|e| e > epoch)
        })
        .await;
        resumed.push((listening, started.elapsed()));
    }
    resumed.sort_by_key(|r| r.1);
    let median = resumed[resumed.len() / 2];
    println!(
        "hub restart -> session resumed: median {:.0} ms over {} restarts (hub listening after {:.0} ms; the agent reconnects with full-jitter backoff capped at 1 s), max {:.0} ms",
        ms(median.1),
        resumed.len(),
        ms(median.0),
        ms(resumed.last().unwrap().1)
    );
    hub
}

async fn log_relay(client: &Client, hub: &Hub, cluster: &str, agent: &agent::AgentProcess) {
    const LINE: usize = 1024;
    let mib = knob("LOG_MIB", 1024);
    let total = mib << 20;
    let floor = tls_loopback_throughput(total).await;

    let ns = "logbench";
    hub.apply(cluster, &serde_json::to_string(&project_json(ns)).unwrap())
        .await
        .unwrap();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while namespaces.get_opt(ns).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "project namespace");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let lines: Vec<String> = (0..total / LINE)
        .map(|i| format!("{i:>10} {}", "z".repeat(LINE - 12)))
        .collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    logs().script(ns, "build", &refs);
    drop(refs);
    drop(lines);
    set_pod_outcome(
        client,
        &PodSelector::container(ns, "resolve"),
        &PodOutcome::Succeed {
            after: Duration::from_millis(200),
            message: Some("0123456789abcdef0123456789abcdef01234567".into()),
        },
    )
    .await
    .unwrap();
    set_pod_outcome(
        client,
        &PodSelector::container(ns, "build"),
        &PodOutcome::Succeed {
            after: Duration::from_secs(1),
            message: Some(format!("sha256:{}", "ef".repeat(32))),
        },
    )
    .await
    .unwrap();
    // The floor the issue sets: the same log read straight from the pod-log API by a bare
    // client (kube's own client, follow=true), from a pod whose `build` container gets the
    // same scripted lines.
    let api_rate = pod_log_api_rate(client, ns, total / LINE * LINE).await;
    let app = serde_json::json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
        "metadata": {"name": "big", "namespace": ns},
        "spec": {"registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}, "git": {"url": "https://github.com/example/big.git"}}});
    let build = serde_json::json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
        "metadata": {"name": "big-1", "namespace": ns}, "spec": {"appName": "big"}});
    hub.apply(cluster, &app.to_string()).await.unwrap();
    hub.apply(cluster, &build.to_string()).await.unwrap();
    let stream = format!("{ns}/big-1/build");
    let end = async || hub.store().log_end(cluster, &stream).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let builds: Api<AppBuild> = Api::namespaced(client.clone(), ns);
    let mut looked = Instant::now();
    while end().await.0 == 0 {
        assert!(Instant::now() < deadline);
        // A build that ended before its log began will never relay one: say why, now.
        if looked.elapsed() > Duration::from_secs(1) {
            looked = Instant::now();
            if let Some(status) = builds.get("big-1").await.unwrap().status
                && status.phase.is_some_and(|p| p.is_final())
            {
                panic!(
                    "AppBuild big-1 ended {:?} before any log: {} {}",
                    status.phase,
                    status.reason.unwrap_or_default(),
                    status.message.unwrap_or_default()
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let first = end().await.0;
    while !end().await.1 {
        assert!(Instant::now() < deadline, "the log did not end");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed();
    let (bytes, _) = end().await;
    assert_eq!(bytes as usize, total / LINE * LINE, "every byte at the hub");
    let rate = (bytes - first) as f64 / elapsed.as_secs_f64() / 1e6;
    println!(
        "log relay: {mib} MiB at {rate:.1} MB/s (kubelet -> apiserver -> agent -> TLS -> hub -> SQLite), agent peak RSS {:.1} MiB; floor: the pod-log API read by a bare client {api_rate:.1} MB/s (ratio {:.3}, goal >= 0.8), raw TLS on loopback {floor:.0} MB/s (ratio {:.3})",
        agent.peak_rss_kib() as f64 / 1024.0,
        rate / api_rate,
        rate / floor
    );
}

/// MB/s of a bare client following one container's log (`expected` bytes) to its end through
/// the apiserver, from the pod's creation on (as the agent's relay is timed from its first
/// byte, this is the kinder figure for the floor).
async fn pod_log_api_rate(client: &Client, ns: &str, expected: usize) -> f64 {
    use futures::AsyncReadExt;
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{LogParams, PostParams};
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "floor"},
        "spec": {"restartPolicy": "Never", "containers": [{"name": "build", "image": "builder:1"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let phase = pods.get("floor").await.unwrap().status.and_then(|s| s.phase);
        if matches!(phase.as_deref(), Some("Running" | "Succeeded")) {
            break;
        }
        assert!(Instant::now() < deadline, "the floor pod did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let params = LogParams {
        container: Some("build".into()),
        follow: true,
        ..LogParams::default()
    };
    let started = Instant::now();
    let mut stream = pods.log_stream("floor", &params).await.unwrap();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    loop {
        let n = stream.read(&mut buffer).await.unwrap();
        if n == 0 {
            break;
        }
        read += n;
    }
    let elapsed = started.elapsed();
    assert_eq!(read, expected, "the whole log through the pod-log API");
    pods.delete("floor", &Default::default()).await.unwrap();
    read as f64 / elapsed.as_secs_f64() / 1e6
}

/// MB/s of `bytes` over one TLS connection on loopback (tokio-rustls, ring), in 32 KiB writes.
async fn tls_loopback_throughput(bytes: usize) -> f64 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = CertificateAuthority::new("bench").unwrap();
    let served = ca
        .serving_cert("bench", &["localhost"], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let certs = vec![CertificateDer::from_pem_slice(served.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(served.key_pem.as_bytes()).unwrap();
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(socket).await.unwrap();
        let mut buffer = vec![0u8; 64 * 1024];
        let mut read = 0;
        while read < bytes {
            let n = tls.read(&mut buffer).await.unwrap();
            assert!(n > 0);
            read += n;
        }
    });
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let client = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect("localhost".try_into().unwrap(), socket)
        .await
        .unwrap();
    let chunk = vec![b'z'; 32 * 1024];
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        tls.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    tls.flush().await.unwrap();
    reader.await.unwrap();
    sent as f64 / started.elapsed().as_secs_f64() / 1e6
}

fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn many_agents() {
    let n = knob("AGENTS", 1000);
    let data = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let log = std::fs::File::create(data.path().join("hub.log")).unwrap();
    let mut hub = std::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
        .args([
            "--data-dir",
            data.path().to_str().unwrap(),
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--heartbeat-seconds",
            "10",
        ])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}");
    let store = shapeblock_hub::open_store(data.path()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "hub process did not listen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pin = {
        let ca = shapeblock_hub::pki::Ca::load_or_create(data.path()).unwrap();
        shapeblock_agent::proto::ca_hash(&ca.cert_der)
    };
    let idle = rss_kib(hub.id()).0;

    // Enrollment is not what is measured: done first, a few at a time.
    let mut tokens: Vec<String> = Vec::new();
    for i in 0..n {
        tokens.push(
            shapeblock_hub::create_token(&store, &format!("a{i}"), Duration::from_secs(600))
                .await
                .unwrap(),
        );
    }
    let started = Instant::now();
    let identities: Vec<_> = futures::stream::iter(tokens)
        .map(|token| {
            let url = url.clone();
            let pin = pin.clone();
            async move {
                let key = enroll::new_key().unwrap();
                enroll::enroll(&url, &token, &pin, &key).await.unwrap()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let enrolled = started.elapsed();

    let connected = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut sessions = Vec::new();
    for identity in identities {
        let url = url.clone();
        let connected = connected.clone();
        sessions.push(tokio::spawn(async move {
            let StandIn { up: tx, mut down } = StandIn::dial(
                &url,
                &identity.ca_pem,
                &identity.cert_pem,
                &identity.key_pem,
                "bench",
                4,
            )
            .await
            .unwrap();
            down.message().await.unwrap().expect("hello ack");
            connected.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut beat = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    m = down.message() => if !matches!(m, Ok(Some(_))) { break },
                    _ = beat.tick() => {
                        let hb = AgentMessage { seq: 0, body: Some(Up::Heartbeat(Heartbeat { sent_at_ms: 0 })) };
                        if tx.send(hb).await.is_err() { break }
                    }
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    while connected.load(std::sync::atomic::Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "only {} connected",
            connected.load(std::sync::atomic::Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_time = started.elapsed() - enrolled;
    // Let heartbeats flow for a while: the figure is the steady state, not the rush.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let live = store
        .clusters()
        .await
        .unwrap()
        .iter()
        .filter(|c| c.connected)
        .count();
    let (rss, hwm) = rss_kib(hub.id());
    println!(
        "hub with {n} connected agents ({live} marked connected in its store): RSS {:.1} MiB, peak {:.1} MiB; idle {:.1} MiB ({:.1} KiB per agent); enrolling took {:.1}s, connecting {:.1}s",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0,
        idle as f64 / 1024.0,
        (rss.saturating_sub(idle)) as f64 / n as f64,
        enrolled.as_secs_f64(),
        connect_time.as_secs_f64()
    );
    for session in sessions {
        session.abort();
    }
    let _ = hub.kill();
    let _ = hub.wait();
}
