//! Several hub replicas on one Postgres, with real parts: `shapeblock-hub serve` processes
//! sharing one CA and one database (Debian's Postgres, started by the harness), Debian's
//! HAProxy in front of them (TCP, round robin, `/readyz` checks), real mTLS, the real agent
//! against the test control plane, and agent stand-ins that speak the real protocol over
//! real mTLS where a test needs many clusters or exact control of what is sent when.
//!
//! Replicas reach each other only through the database (LISTEN/NOTIFY, heartbeat rows): no
//! connection between them exists here to fake.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shapeblock_agent::proto::v1::agent_message::Body as Up;
use shapeblock_agent::proto::v1::server_message::Body as Down;
use shapeblock_agent::proto::v1::{
    AgentMessage, AppLogChunk, CommandResult, Heartbeat, Hello, ObjectRef, PhaseChange,
};
use shapeblock_agent::tunnel::{Identity, enroll};
use shapeblock_hub::api::v1 as api;
use shapeblock_hub::api::v1::hub_client::HubClient;
use shapeblock_testenv::haproxy::{Backend, Haproxy};
use shapeblock_testenv::postgres::{Postgres, SharedPostgres};
use shapeblock_testenv::stand_in::StandIn;
use support::hub_process::{Bearer, Client, free_port, hub_cli};
use support::{eventually, unique_name};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const TIMEOUT: Duration = Duration::from_secs(45);
/// The replicas' heartbeat in these tests ...
const REPLICA_HEARTBEAT_MS: u64 = 500;
/// ... and their dead-after: 3 beats.
const REPLICA_DEAD_AFTER_MS: u64 = 1500;

fn provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// One `shapeblock-hub serve` process of the set.
struct Replica {
    child: Child,
    dir: tempfile::TempDir,
    agent_port: u16,
    api_port: u16,
    health_port: u16,
    /// What it printed as its replica id.
    id: String,
}

impl Replica {
    fn agent_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.agent_port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
    }

    async fn readyz(&self) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.health_port))
            .await
            .ok()?;
        stream
            .write_all(b"GET /readyz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        tokio::time::timeout(Duration::from_secs(2), stream.read_to_string(&mut text))
            .await
            .ok()?
            .ok()?;
        let code = text.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, text))
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.signal(libc::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Replicas on one database with one CA and one API key, HAProxy in front of their agent
/// listeners.
/// The database server of a set: this process's shared one, or one of the test's own (that
/// it may restart).
enum Server {
    Shared(&'static SharedPostgres),
    Own(Box<Postgres>),
}

impl Server {
    fn psql(&self, url: &str, sql: &str) -> String {
        match self {
            Server::Shared(s) => s.psql(url, sql),
            Server::Own(s) => s.psql(url, sql),
        }
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

struct Set {
    postgres: Server,
    url: String,
    ca_pem: String,
    ca_hash: String,
    key: String,
    replicas: Vec<Replica>,
    haproxy: Haproxy,
}

async fn start_replica(database: &str, ca_dir: &Path) -> Replica {
    let dir = tempfile::tempdir().unwrap();
    for file in ["ca.pem", "ca-key.pem"] {
        std::fs::copy(ca_dir.join(file), dir.path().join(file)).unwrap();
    }
    let (agent_port, api_port, health_port) = (free_port(), free_port(), free_port());
    let log = std::fs::File::create(dir.path().join("hub.log")).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--database-url", database])
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{agent_port}"),
            "--api-addr",
            &format!("127.0.0.1:{api_port}"),
            "--health-addr",
            &format!("127.0.0.1:{health_port}"),
            "--heartbeat-seconds",
            "2",
            "--replica-heartbeat-ms",
            &REPLICA_HEARTBEAT_MS.to_string(),
            "--replica-dead-after-ms",
            &REPLICA_DEAD_AFTER_MS.to_string(),
        ])
        .env("RUST_LOG", "info")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let mut replica = Replica {
        child,
        dir,
        agent_port,
        api_port,
        health_port,
        id: String::new(),
    };
    // Ready means the database took its heartbeat and its LISTEN connection is up.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some((200, _)) = replica.readyz().await {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica did not become ready: {}",
            replica.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    replica.id = replica
        .log()
        .lines()
        .find_map(|l| l.strip_prefix("replica ").map(str::to_string))
        .expect("the replica prints its id");
    replica
}

impl Set {
    async fn start(n: usize) -> Self {
        let shared = Postgres::shared().unwrap_or_else(|e| panic!("{e}"));
        let url = shared.database("replicas").unwrap();
        Self::start_on(Server::Shared(shared), url, n).await
    }

    async fn start_on(postgres: Server, url: String, n: usize) -> Self {
        provider();
        let ca_dir = tempfile::tempdir().unwrap();
        let ca = shapeblock_hub::pki::Ca::load_or_create(ca_dir.path()).unwrap();
        let made = hub_cli(
            ca_dir.path(),
            &["--database-url", &url, "api-key", "create", "--name", "test"],
        );
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let key = String::from_utf8(made.stdout).unwrap().trim().to_string();
        let mut replicas = Vec::new();
        for _ in 0..n {
            replicas.push(start_replica(&url, ca_dir.path()).await);
        }
        let backends: Vec<Backend> = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| Backend {
                name: format!("r{i}"),
                addr: ([127, 0, 0, 1], r.agent_port).into(),
                health_port: Some(r.health_port),
            })
            .collect();
        let haproxy = Haproxy::start(&backends).unwrap_or_else(|e| panic!("{e}"));
        for b in &backends {
            haproxy
                .wait_server(&b.name, "UP", Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("{e}"));
        }
        Self {
            postgres,
            url,
            ca_hash: shapeblock_proto::ca_hash(&ca.cert_der),
            ca_pem: ca.cert_pem.clone(),
            key,
            replicas,
            haproxy,
        }
    }

    async fn client(&self, i: usize) -> Client {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("127.0.0.1");
        let channel = Endpoint::from_shared(format!("https://127.0.0.1:{}", self.replicas[i].api_port))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        HubClient::with_interceptor(channel, Bearer(Some(self.key.clone())))
    }

    fn sql(&self, sql: &str) -> String {
        self.postgres.psql(&self.url, sql)
    }

    /// The index of the replica whose session of `cluster` is live, if one is.
    fn holder(&self, cluster: &str) -> Option<usize> {
        let id = self.sql(&format!(
            "SELECT coalesce(replica, '') FROM clusters WHERE id = '{cluster}' AND connected"
        ));
        self.replicas.iter().position(|r| !id.is_empty() && r.id == id)
    }

    fn epoch(&self, cluster: &str) -> u64 {
        self.sql(&format!("SELECT epoch FROM clusters WHERE id = '{cluster}'"))
            .parse()
            .unwrap()
    }

    /// A new cluster's identity, enrolled through HAProxy with a token made on replica `i`.
    async fn enroll(&self, i: usize, cluster: &str) -> Identity {
        let token = self
            .client(i)
            .await
            .create_enrollment_token(api::CreateEnrollmentTokenRequest {
                cluster_id: cluster.into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let key = enroll::new_key().unwrap();
        enroll::enroll(&self.haproxy.url(), &token.secret, &self.ca_hash, &key)
            .await
            .expect("enroll through HAProxy")
    }

    fn dump_logs(&self) -> String {
        self.replicas
            .iter()
            .enumerate()
            .map(|(i, r)| format!("--- replica {i} ({})\n{}", r.id, r.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Queues `n` deletes of `cluster` through `client`, each after the last was executed (by the
/// stand-in whose results `done` collects); how long each took from the API call, sorted.
async fn executed_after(
    client: &mut Client,
    cluster: &str,
    prefix: &str,
    n: u64,
    done: &Arc<Mutex<Done>>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    for i in 0..n {
        let queued = Instant::now();
        let seq = queue_delete(client, cluster, &format!("{prefix}{i}")).await;
        // Looked at often: the figure is the delivery's, not the look's.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done.lock().unwrap().executed.contains_key(&seq) {
            assert!(Instant::now() < deadline, "command {seq} executed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        latencies.push(queued.elapsed());
    }
    latencies.sort();
    latencies
}

fn delete_body(name: &str) -> api::DeleteRequest {
    api::DeleteRequest {
        object: Some(api::ObjectRef {
            kind: "Project".into(),
            namespace: String::new(),
            name: name.into(),
        }),
        ..Default::default()
    }
}

/// Queues a delete of Project `name` on `cluster` through `client`; its command id.
async fn queue_delete(client: &mut Client, cluster: &str, name: &str) -> u64 {
    client
        .delete(api::DeleteRequest {
            cluster_id: cluster.into(),
            ..delete_body(name)
        })
        .await
        .unwrap()
        .into_inner()
        .command_id
}

/// What a stand-in agent did: how often each command was delivered and executed, and the
/// sessions (epochs) it had.
#[derive(Default, Debug)]
struct Done {
    delivered: BTreeMap<u64, u32>,
    executed: BTreeMap<u64, u32>,
    epochs: Vec<u64>,
}

/// A stand-in agent that behaves like the real one where delivery is concerned: it dials
/// `url` (HAProxy) and dials again whenever the session breaks, executes each command once
/// (a command delivered again is not executed again), answers it with a sequenced result
/// kept in its outbox until acked and sent again in the next session if not, and heartbeats.
fn stand_in(url: String, identity: Identity, stop: tokio::sync::watch::Receiver<bool>) -> Arc<Mutex<Done>> {
    let done = Arc::new(Mutex::new(Done::default()));
    let state = done.clone();
    tokio::spawn(async move {
        let mut stop = stop;
        let mut outbox: Vec<AgentMessage> = Vec::new();
        let mut next_seq = 0u64;
        loop {
            if *stop.borrow() {
                return;
            }
            let dialed = StandIn::dial(
                &url,
                &identity.ca_pem,
                &identity.cert_pem,
                &identity.key_pem,
                "stand-in",
                256,
            )
            .await;
            let Ok(StandIn { up, mut down }) = dialed else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let first = tokio::time::timeout(Duration::from_secs(5), down.message()).await;
            let Ok(Ok(Some(first))) = first else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Some(Down::HelloAck(ack)) = first.body else {
                continue;
            };
            state.lock().unwrap().epochs.push(ack.epoch);
            outbox.retain(|m| m.seq > ack.last_agent_seq);
            next_seq = next_seq.max(ack.last_agent_seq);
            for m in &outbox {
                let _ = up.send(m.clone()).await;
            }
            let mut beat = tokio::time::interval(Duration::from_millis(700));
            loop {
                tokio::select! {
                    message = down.message() => {
                        let Ok(Some(message)) = message else { break };
                        match message.body {
                            Some(Down::Ack(a)) => outbox.retain(|m| m.seq > a.seq),
                            Some(Down::Heartbeat(_)) | Some(Down::HelloAck(_)) | None => {}
                            Some(_) if message.seq > 0 => {
                                let command = message.seq;
                                let fresh = {
                                    let mut s = state.lock().unwrap();
                                    *s.delivered.entry(command).or_default() += 1;
                                    let fresh = !s.executed.contains_key(&command);
                                    if fresh {
                                        s.executed.insert(command, 1);
                                    }
                                    fresh
                                };
                                if fresh {
                                    next_seq += 1;
                                    let result = AgentMessage {
                                        seq: next_seq,
                                        body: Some(Up::Result(CommandResult {
                                            command_seq: command,
                                            ok: true,
                                            message: "done".into(),
                                            object: None,
                                        })),
                                    };
                                    outbox.push(result.clone());
                                    let _ = up.send(result).await;
                                }
                            }
                            Some(_) => {}
                        }
                    }
                    _ = beat.tick() => {
                        let hb = AgentMessage { seq: 0, body: Some(Up::Heartbeat(Heartbeat { sent_at_ms: 0 })) };
                        if up.send(hb).await.is_err() { break; }
                    }
                    _ = stop.changed() => return,
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    done
}

/// When a hub logged the first line containing `what`: seconds since midnight (UTC), from
/// its tracing timestamp (`2026-01-01T11:58:18.292619Z ...`).
fn logged_at(log: &str, what: &str) -> f64 {
    let line = log
        .lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("{what:?} in\n{log}"));
    let clock = line.split('T').nth(1).and_then(|t| t.split('Z').next()).unwrap();
    let parts: Vec<f64> = clock.split(':').map(|p| p.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

fn phase(name: &str, phase: &str) -> Up {
    Up::Phase(PhaseChange {
        object: Some(ObjectRef {
            kind: "Project".into(),
            namespace: String::new(),
            name: name.into(),
        }),
        phase: phase.into(),
        ..Default::default()
    })
}

/// The next message with a seq-0 ack of `seq` or later (skipping heartbeats).
async fn acked(down: &mut tonic::Streaming<shapeblock_agent::proto::v1::ServerMessage>, seq: u64) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = down.message().await.unwrap().expect("stream open");
            if let Some(Down::Ack(a)) = m.body
                && a.seq >= seq
            {
                return;
            }
        }
    })
    .await
    .expect("acked");
}

/// How the stream ends: its status.
async fn ended(down: &mut tonic::Streaming<shapeblock_agent::proto::v1::ServerMessage>) -> tonic::Status {
    loop {
        match down.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return tonic::Status::ok("ended"),
            Err(status) => return status,
        }
    }
}

async fn dial(url: &str, id: &Identity) -> StandIn {
    tokio::time::timeout(
        TIMEOUT,
        StandIn::dial(url, &id.ca_pem, &id.cert_pem, &id.key_pem, "stand-in", 16),
    )
    .await
    .expect("the hub accepts the stream in time")
    .unwrap()
}

async fn hello_ack(down: &mut tonic::Streaming<shapeblock_agent::proto::v1::ServerMessage>) -> (u64, u64) {
    let first = tokio::time::timeout(TIMEOUT, down.message())
        .await
        .expect("the hello is answered in time")
        .unwrap()
        .unwrap();
    let Some(Down::HelloAck(ack)) = first.body else {
        panic!("{first:?}")
    };
    (ack.epoch, ack.last_agent_seq)
}

#[tokio::test]
async fn a_newer_session_on_another_replica_closes_the_older_at_once_and_a_stalled_replica_records_nothing() {
    let set = Set::start(2).await;
    let id = set.enroll(0, "stall").await;
    let (a, b) = (set.replicas[0].agent_url(), set.replicas[1].agent_url());

    // Older on A, newer on B: A closes its session, woken by B's notification.
    let mut older = dial(&a, &id).await;
    let (e1, _) = hello_ack(&mut older.down).await;
    let dialed = Instant::now();
    let mut newer = dial(&b, &id).await;
    let (e2, _) = hello_ack(&mut newer.down).await;
    assert!(e2 > e1);
    let status = tokio::time::timeout(Duration::from_secs(5), ended(&mut older.down))
        .await
        .expect("the older session ends");
    let upper = dialed.elapsed();
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("superseded"), "{}", status.message());
    // From B's "session started" to A's "session ended", on the one clock of this machine.
    let began = logged_at(
        &set.replicas[1].log(),
        &format!("session started cluster=stall epoch={e2} "),
    );
    let closed = logged_at(
        &set.replicas[0].log(),
        &format!("session ended cluster=stall epoch={e1} "),
    );
    // B logs its line after the checks that follow the commit that notified A, so A's close
    // may come first (negative).
    let took_ms = (closed - began) * 1000.0;
    println!(
        "the older session on replica A closed {took_ms:.1} ms after replica B logged the newer one's start \
         (B's dial to A's close, as the test saw it: {upper:?})"
    );
    assert!(
        took_ms < 1000.0,
        "closed within a second (a notification: the fallback resync is every 5 beats): {took_ms} ms"
    );
    assert_eq!(set.holder("stall"), Some(1));
    drop(newer);

    // A stalled replica: A holds the session, is stopped with a message of seq n+1 on its
    // socket, the agent reconnects to B and sends n+1 there; A wakes and tries to record
    // its stale copy.
    let mut on_a = dial(&a, &id).await;
    let (e3, last) = hello_ack(&mut on_a.down).await;
    on_a.up
        .send(AgentMessage {
            seq: last + 1,
            body: Some(phase("stalled", "BeforeStall")),
        })
        .await
        .unwrap();
    acked(&mut on_a.down, last + 1).await;
    set.replicas[0].signal(libc::SIGSTOP);
    let stopped = Instant::now();
    on_a.up
        .send(AgentMessage {
            seq: last + 2,
            body: Some(phase("stalled", "FromStaleA")),
        })
        .await
        .unwrap();
    let mut on_b = dial(&b, &id).await;
    let (e4, last_b) = hello_ack(&mut on_b.down).await;
    assert!(e4 > e3);
    assert_eq!(last_b, last + 1, "B resumes where A's recorded messages end");
    on_b.up
        .send(AgentMessage {
            seq: last + 2,
            body: Some(phase("stalled", "FromB")),
        })
        .await
        .unwrap();
    acked(&mut on_b.down, last + 2).await;
    let stalled_for = stopped.elapsed();
    set.replicas[0].signal(libc::SIGCONT);
    let status = tokio::time::timeout(Duration::from_secs(10), ended(&mut on_a.down))
        .await
        .expect("the stale session on A ends");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    println!("replica A was stopped for {stalled_for:?}; its stale session ended with {status:?}");
    // A fenced message is also unacked: B's session stays, nothing of A's stale copy is
    // recorded, B's is.
    let events =
        set.sql("SELECT agent_seq || ':' || detail FROM events WHERE cluster = 'stall' ORDER BY agent_seq");
    let events: Vec<&str> = events.lines().collect();
    assert_eq!(
        events,
        [
            format!("{}:BeforeStall", last + 1).as_str(),
            format!("{}:FromB", last + 2).as_str()
        ],
        "{}",
        set.dump_logs()
    );
    assert_eq!(
        set.sql("SELECT count(*) FROM feed WHERE phase = 'FromStaleA'"),
        "0"
    );
    assert_eq!(
        set.sql("SELECT phase FROM objects WHERE cluster = 'stall' AND object = 'Project//stalled'"),
        "FromB"
    );
    // Which came first once A ran again: B's notification (A closes its session before it
    // reads the stale copy) or the stale copy (refused by the transaction that would have
    // recorded it; tests/hub_store.rs pins that path down deterministically). Either way
    // nothing of it is recorded, as checked above.
    let log = set.replicas[0].log();
    let path = if log.contains("a fenced session's message was refused") {
        "the stale copy reached record() and was refused as fenced"
    } else if log.contains("declared dead") {
        "A had been declared dead meanwhile"
    } else {
        assert!(log.contains("old=3 new=4"), "{log}");
        "A's notification closed the stale session before it read the copy"
    };
    println!("after SIGCONT: {path}");
    // B's session is still the live one.
    assert_eq!(set.holder("stall"), Some(1));
    assert_eq!(set.epoch("stall"), e4);
}

/// The hub's pooled connections of this test's database that sit idle inside a transaction
/// that has written (so holds the locks of what it wrote), longer than any of a running hub's
/// would.
fn stalled_transactions(set: &Set) -> u32 {
    set.sql(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
           AND application_name = 'shapeblock-hub' AND state = 'idle in transaction'
           AND backend_xid IS NOT NULL
           AND clock_timestamp() - state_change > interval '200 milliseconds'",
    )
    .parse()
    .unwrap()
}

#[tokio::test]
async fn a_replica_stopped_inside_a_transaction_holds_up_no_other_replica_and_records_nothing_after() {
    use shapeblock_hub::store::IDLE_IN_TRANSACTION;
    let set = Set::start(2).await;
    let id = set.enroll(0, "frozen").await;
    let (a, b) = (set.replicas[0].agent_url(), set.replicas[1].agent_url());

    // A records phase changes back to back, so it is inside a transaction most of the time.
    let StandIn { up, mut down } = dial(&a, &id).await;
    let (_, first) = hello_ack(&mut down).await;
    let sender = tokio::spawn(async move {
        for seq in first + 1.. {
            let body = Some(phase("frozen", &format!("FromA{seq}")));
            if up.send(AgentMessage { seq, body }).await.is_err() {
                return;
            }
        }
    });
    let acks = tokio::spawn(async move {
        let mut acked = 0;
        loop {
            match down.message().await {
                Ok(Some(m)) => {
                    if let Some(Down::Ack(a)) = m.body {
                        acked = a.seq;
                    }
                }
                Ok(None) => return (acked, tonic::Status::ok("ended")),
                Err(status) => return (acked, status),
            }
        }
    });
    eventually(TIMEOUT, "A records", || async {
        (set.sql("SELECT count(*) FROM events WHERE cluster = 'frozen'") != "0").then_some(())
    })
    .await;

    // Stop A until it is caught between two statements of one of its transactions after a
    // write (the server shows its connection idle in it): the first write of recording is
    // the cluster's row, so B's new session has to wait for that row.
    let mut attempts = 0;
    let stopped = loop {
        attempts += 1;
        assert!(attempts <= 50, "A was never caught inside a transaction");
        set.replicas[0].signal(libc::SIGSTOP);
        let stopped = Instant::now();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if stalled_transactions(&set) > 0 {
            break stopped;
        }
        set.replicas[0].signal(libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(20 + 7 * (attempts % 7))).await;
    };
    println!("A stopped inside a transaction at attempt {attempts}");

    // B begins the cluster's next session, and records, while A is still stopped: the server
    // ended A's transaction once it sat idle for IDLE_IN_TRANSACTION.
    let mut on_b = tokio::time::timeout(IDLE_IN_TRANSACTION * 3, async {
        let mut on_b = dial(&b, &id).await;
        let hello = hello_ack(&mut on_b.down).await;
        (on_b, hello)
    })
    .await;
    let took = stopped.elapsed();
    let Ok((ref mut on_b, (_, last_b))) = on_b else {
        set.replicas[0].signal(libc::SIGCONT);
        panic!(
            "B could not begin a session while A was stopped inside a transaction ({took:?})\n{}",
            set.dump_logs()
        );
    };
    assert_eq!(stalled_transactions(&set), 0, "the server ended A's transaction");
    on_b.up
        .send(AgentMessage {
            seq: last_b + 1,
            body: Some(phase("frozen", "FromB")),
        })
        .await
        .unwrap();
    acked(&mut on_b.down, last_b + 1).await;
    let recorded_for = stopped.elapsed();
    println!(
        "with A stopped inside a transaction, B's session began {took:?} after the stop and recorded \
         {recorded_for:?} after it (the server ends an idle transaction after {IDLE_IN_TRANSACTION:?})"
    );
    assert!(
        took >= IDLE_IN_TRANSACTION / 2,
        "B did wait for A's transaction: {took:?}"
    );

    // A wakes: its session ends, and nothing it held when stopped is recorded.
    set.replicas[0].signal(libc::SIGCONT);
    let (acked_by_a, status) = tokio::time::timeout(TIMEOUT, acks)
        .await
        .expect("A's stale session ends")
        .unwrap();
    sender.abort();
    assert_ne!(status.code(), tonic::Code::Ok, "{status:?}");
    println!("A's stale session ended with {status:?}; A had acked up to seq {acked_by_a}");
    assert!(
        acked_by_a <= last_b,
        "A acked {acked_by_a}, past what B resumed from ({last_b})"
    );
    let after: Vec<String> = set
        .sql(&format!(
            "SELECT agent_seq || ':' || detail FROM events WHERE cluster = 'frozen' AND agent_seq > {last_b} ORDER BY agent_seq"
        ))
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(after, [format!("{}:FromB", last_b + 1)], "{}", set.dump_logs());
    let recorded = set.sql(&format!(
        "SELECT count(*) || ':' || coalesce(min(agent_seq), 0) || ':' || coalesce(max(agent_seq), 0)
           FROM events WHERE cluster = 'frozen' AND agent_seq <= {last_b}"
    ));
    assert_eq!(
        recorded,
        format!("{}:{}:{last_b}", last_b - first, first + 1),
        "every seq A recorded, once, up to where B resumed"
    );
    assert_eq!(
        set.sql("SELECT phase FROM objects WHERE cluster = 'frozen' AND object = 'Project//frozen'"),
        "FromB"
    );
    assert_eq!(set.holder("frozen"), Some(1));
}

#[tokio::test]
async fn a_command_queued_on_one_replica_reaches_a_session_on_another_at_once_and_watch_sees_every_replica() {
    let set = Set::start(3).await;
    let id = set.enroll(0, "cross").await;
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    // The session on replica 1 (dialed directly), commands queued through replica 0.
    let done = stand_in(set.replicas[1].agent_url(), id, stop);
    eventually(TIMEOUT, "the session on replica 1", || async {
        (set.holder("cross") == Some(1)).then_some(())
    })
    .await;

    // A watcher on replica 2, from the start of the feed: it sees what 0 and 1 record.
    let mut watcher = set
        .client(2)
        .await
        .watch_events(api::WatchEventsRequest {
            cluster_id: "cross".into(),
            after_id: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let n = 10u64;
    let latencies = executed_after(&mut set.client(0).await, "cross", "p", n, &done).await;
    // The same through the replica that holds the session, for comparison.
    let same = executed_after(&mut set.client(1).await, "cross", "q", n, &done).await;
    println!(
        "API call to executed, session on replica 1: queued on replica 0 median {:?} max {:?}; on replica 1 median {:?} max {:?} ({n} each)",
        latencies[latencies.len() / 2],
        latencies.last().unwrap(),
        same[same.len() / 2],
        same.last().unwrap()
    );
    let n = 2 * n;
    // Well under the 5 s fallback poll of a session on Postgres: a notification woke it.
    assert!(
        *latencies.last().unwrap() < Duration::from_secs(2),
        "{latencies:?}"
    );
    eventually(TIMEOUT, "every command done at the hub", || async {
        (set.sql("SELECT count(*) FROM commands WHERE cluster = 'cross' AND done") == n.to_string())
            .then_some(())
    })
    .await;

    // The watcher on replica 2 saw the queued events (written by replica 0) and the results
    // (written by replica 1), in one increasing order.
    let mut seen: Vec<api::Event> = Vec::new();
    tokio::time::timeout(TIMEOUT, async {
        while seen
            .iter()
            .filter(|e| e.kind == api::EventKind::CommandResult as i32)
            .count()
            < n as usize
        {
            seen.push(watcher.message().await.unwrap().unwrap());
        }
    })
    .await
    .expect("the watcher on replica 2 sees every result");
    let ids: Vec<u64> = seen.iter().map(|e| e.id).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let queued = seen
        .iter()
        .filter(|e| e.kind == api::EventKind::CommandQueued as i32)
        .count();
    assert_eq!(queued, n as usize, "queued on replica 0 and on replica 1");
    let results: BTreeSet<u64> = seen
        .iter()
        .filter(|e| e.kind == api::EventKind::CommandResult as i32)
        .map(|e| e.command_id)
        .collect();
    assert_eq!(results, (1..=n).collect::<BTreeSet<u64>>());
    // The feed as the database has it is what the watcher got.
    let in_db: Vec<u64> = set
        .sql(&format!(
            "SELECT id FROM feed WHERE cluster = 'cross' AND id <= {} ORDER BY id",
            ids.last().unwrap()
        ))
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(ids, in_db);

    // Resumable by cursor, on any replica: from the middle, the rest, on replica 1.
    let cursor = ids[ids.len() / 2];
    let mut resumed = set
        .client(1)
        .await
        .watch_events(api::WatchEventsRequest {
            cluster_id: "cross".into(),
            after_id: cursor,
        })
        .await
        .unwrap()
        .into_inner();
    let rest: Vec<u64> = ids.iter().copied().filter(|id| *id > cursor).collect();
    let mut got = Vec::new();
    while got.len() < rest.len() {
        got.push(resumed.message().await.unwrap().unwrap().id);
    }
    assert_eq!(got, rest);
    // Executed once each, delivered once each (no reconnect happened).
    let d = done.lock().unwrap();
    assert!(d.executed.values().all(|n| *n == 1), "{d:?}");
    assert_eq!(d.executed.len() as u64, n);
    assert_eq!(d.epochs.len(), 1, "one session throughout: {d:?}");
}

/// The next message down that `pick` takes, skipping the others.
async fn next_down<T>(
    down: &mut tonic::Streaming<shapeblock_agent::proto::v1::ServerMessage>,
    pick: impl Fn(Down) -> Option<T>,
) -> T {
    loop {
        let message = down.message().await.unwrap().expect("the session is open");
        if let Some(picked) = message.body.and_then(&pick) {
            return picked;
        }
    }
}

fn app_log(id: u64, pod: &str, offset: u64, data: Vec<u8>) -> AgentMessage {
    AgentMessage {
        seq: 0,
        body: Some(Up::AppLog(AppLogChunk {
            id,
            pod: pod.into(),
            container: "web".into(),
            process: "web".into(),
            offset,
            data,
            ..Default::default()
        })),
    }
}

/// Bytes of one substream as a caller reassembles them: data at its offsets, and the runs
/// markers say were dropped; (data, dropped bytes).
fn reassemble(got: &[api::AppLogData], pod: &str) -> (Vec<u8>, u64) {
    let mut data = Vec::new();
    let mut dropped = 0;
    for m in got.iter().filter(|m| m.pod == pod) {
        assert_eq!(m.offset, data.len() as u64 + dropped, "{pod}: no gap, no overlap");
        if m.truncated {
            dropped += m.dropped;
        }
        data.extend_from_slice(&m.data);
    }
    (data, dropped)
}

/// Sends `chunks` chunks over `pods` up `up`, never more than `window` ahead of what the
/// caller has taken (`taken`); what was sent per pod.
async fn send_windowed(
    up: &tokio::sync::mpsc::Sender<AgentMessage>,
    id: u64,
    pods: &[&str],
    chunks: usize,
    window: usize,
    taken: &mut tokio::sync::watch::Receiver<usize>,
) -> BTreeMap<String, Vec<u8>> {
    let mut sent: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for i in 0..chunks {
        taken.wait_for(|n| i < n + window).await.unwrap();
        let pod = pods[i % pods.len()];
        let line = format!("{pod} line {i:06} ").into_bytes();
        let data: Vec<u8> = line.iter().copied().cycle().take(1024 + 97 * (i % 31)).collect();
        let stream = sent.entry(pod.to_string()).or_default();
        up.send(app_log(id, pod, stream.len() as u64, data.clone()))
            .await
            .unwrap();
        stream.extend_from_slice(&data);
    }
    sent
}

/// Reads `stream` into a shared list, counting messages in `taken`, until it ends; its end.
fn read_follow(
    mut stream: tonic::Streaming<api::AppLogData>,
) -> (
    tokio::sync::watch::Receiver<usize>,
    Arc<Mutex<Vec<api::AppLogData>>>,
    tokio::task::JoinHandle<tonic::Status>,
) {
    let (count, taken) = tokio::sync::watch::channel(0usize);
    let got = Arc::new(Mutex::new(Vec::new()));
    let into = got.clone();
    let reader = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(m)) => {
                    into.lock().unwrap().push(m);
                    count.send_modify(|n| *n += 1);
                }
                Ok(None) => return tonic::Status::ok("ended"),
                Err(status) => return status,
            }
        }
    });
    (taken, got, reader)
}

#[tokio::test]
async fn live_app_logs_are_routed_to_the_replica_holding_the_session_and_revocation_reaches_it() {
    let set = Set::start(2).await;
    let id = set.enroll(0, "revoked").await;
    let hello = Hello {
        agent_version: "stand-in".into(),
        capabilities: vec![shapeblock_proto::APP_LOGS_CAPABILITY.into()],
        ..Default::default()
    };
    let mut session = StandIn::dial_with(
        &set.replicas[1].agent_url(),
        &id.ca_pem,
        (&id.cert_pem, &id.key_pem),
        hello,
        64,
    )
    .await
    .unwrap();
    hello_ack(&mut session.down).await;
    let beats = session.up.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let hb = AgentMessage {
                seq: 0,
                body: Some(Up::Heartbeat(Heartbeat { sent_at_ms: 0 })),
            };
            if beats.send(hb).await.is_err() {
                return;
            }
        }
    });
    let request = || api::FollowAppLogsRequest {
        cluster_id: "revoked".into(),
        namespace: "shop".into(),
        app: "web".into(),
        ..Default::default()
    };
    let start_of = |b| match b {
        Down::StartAppLogs(s) => Some(s),
        _ => None,
    };
    let pods = ["web-1", "web-2", "worker-1"];
    const CHUNKS: usize = 600;
    const WINDOW: usize = 32;

    // The same follow through the replica holding the session and through the other, the
    // stand-in keeping WINDOW chunks ahead of the caller: routed through the database, every
    // byte arrives once and in order, as it does locally.
    let mut rates = Vec::new();
    for (through, name) in [(1, "local"), (0, "routed")] {
        let asked = Instant::now();
        let stream = set
            .client(through)
            .await
            .follow_app_logs(request())
            .await
            .unwrap()
            .into_inner();
        let start = tokio::time::timeout(Duration::from_secs(5), next_down(&mut session.down, start_of))
            .await
            .expect("the agent is asked to follow");
        let reached = asked.elapsed();
        assert_eq!((start.namespace.as_str(), start.app.as_str()), ("shop", "web"));
        let (mut taken, got, reader) = read_follow(stream);
        let began = Instant::now();
        let sent = send_windowed(&session.up, start.id, &pods, CHUNKS, WINDOW, &mut taken).await;
        tokio::time::timeout(Duration::from_secs(30), taken.wait_for(|n| *n >= CHUNKS))
            .await
            .expect("every chunk reaches the caller")
            .unwrap();
        let took = began.elapsed();
        let bytes: usize = sent.values().map(Vec::len).sum();
        {
            let got = got.lock().unwrap();
            assert_eq!(got.len(), CHUNKS, "no chunk twice, no marker");
            for (pod, data) in &sent {
                let (back, dropped) = reassemble(&got, pod);
                assert_eq!(dropped, 0, "{name}: nothing dropped within the window");
                assert!(back == *data, "{name}: {pod}'s bytes as sent");
            }
        }
        let rate = bytes as f64 / took.as_secs_f64() / 1e6;
        println!(
            "{name} follow (API call on replica {through}, session on replica 1): agent asked after {reached:?}; \
             {CHUNKS} chunks, {bytes} bytes in {took:?} ({rate:.1} MB/s, {WINDOW}-chunk window), 0 lost, 0 duplicated"
        );
        rates.push(rate);
        // The caller goes: the agent is told to stop.
        let gone = Instant::now();
        reader.abort();
        let stop = tokio::time::timeout(
            Duration::from_secs(5),
            next_down(&mut session.down, |b| match b {
                Down::StopAppLogs(s) => Some(s),
                _ => None,
            }),
        )
        .await
        .expect("the agent is told to stop");
        assert_eq!(stop.id, start.id);
        println!(
            "{name}: the caller went, the agent was told to stop {:?} later",
            gone.elapsed()
        );
    }
    println!("routed / local: {:.2}", rates[1] / rates[0]);

    // A caller that does not read: what cannot wait is dropped behind a marker, never lost
    // unsaid, and nothing beyond the bounds waits in the database.
    let mut on_a = set.client(0).await;
    let mut stalled = on_a.follow_app_logs(request()).await.unwrap().into_inner();
    let start = tokio::time::timeout(Duration::from_secs(5), next_down(&mut session.down, start_of))
        .await
        .unwrap();
    let mut sent = Vec::new();
    for i in 0..400u64 {
        let data = format!("unread {i:05}\n").repeat(2300).into_bytes();
        session
            .up
            .send(app_log(start.id, "web-1", sent.len() as u64, data.clone()))
            .await
            .unwrap();
        sent.extend_from_slice(&data);
    }
    let (waiting, _) = eventually(Duration::from_secs(10), "chunks waiting in the database", || {
        let n: u64 = set
            .sql("SELECT count(*) FROM live_chunks")
            .trim()
            .parse()
            .unwrap();
        async move { (n > 0).then_some(n) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let waiting_later: u64 = set
        .sql("SELECT count(*) FROM live_chunks")
        .trim()
        .parse()
        .unwrap();
    assert!(
        waiting_later <= shapeblock_hub::api::ROUTED_LOG_ROOM as u64 + 16,
        "{waiting} then {waiting_later} chunks wait in the database"
    );
    // An end from the agent after them: the caller gets all, then the end.
    session
        .up
        .send(AgentMessage {
            seq: 0,
            body: Some(Up::AppLog(AppLogChunk {
                id: start.id,
                ended: "no App web in namespace shop".into(),
                ..Default::default()
            })),
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    let end = loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.message())
            .await
            .unwrap()
        {
            Ok(Some(m)) => got.push(m),
            Ok(None) => panic!("ended without a status"),
            Err(status) => break status,
        }
    };
    let (back, dropped) = reassemble(&got, "web-1");
    assert_eq!(
        back.len() as u64 + dropped,
        sent.len() as u64,
        "every byte delivered or said dropped"
    );
    assert!(
        dropped > 0,
        "the caller read nothing for 400 chunks: some were dropped"
    );
    assert_eq!(end.code(), tonic::Code::FailedPrecondition, "{end:?}");
    assert!(end.message().contains("no App web"), "{}", end.message());
    println!(
        "unread follow: {} of {} bytes delivered, {dropped} said dropped; at most {waiting_later} chunks waited in the database",
        back.len(),
        sent.len()
    );

    // Revoked through replica 0: the session on replica 1 ends, woken by the notification,
    // and with it a follow routed to it.
    let mut open = on_a.follow_app_logs(request()).await.unwrap().into_inner();
    tokio::time::timeout(Duration::from_secs(5), next_down(&mut session.down, start_of))
        .await
        .unwrap();
    let revoked = Instant::now();
    on_a.revoke_cluster(api::RevokeClusterRequest {
        cluster_id: "revoked".into(),
    })
    .await
    .unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), ended(&mut session.down))
        .await
        .expect("the session on replica 1 ends");
    let took = revoked.elapsed();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    println!("revoked on replica 0, the session on replica 1 closed after {took:?}");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let end = tokio::time::timeout(Duration::from_secs(5), open.message())
        .await
        .expect("the routed follow ends with the session")
        .expect_err("with a status");
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert!(end.message().contains("ended"), "{}", end.message());
    heartbeat.abort();
    // Nothing of the follows is left in the database.
    eventually(
        Duration::from_secs(5),
        "no routed follow left in the database",
        || {
            let left =
                set.sql("SELECT (SELECT count(*) FROM live_follows) + (SELECT count(*) FROM live_chunks)");
            async move { (left.trim() == "0").then_some(()) }
        },
    )
    .await;
}

#[tokio::test]
async fn a_routed_follow_ends_at_one_end_when_the_replica_at_the_other_is_killed() {
    let set = Set::start(3).await;
    let id = set.enroll(0, "routed").await;
    let hello = Hello {
        agent_version: "stand-in".into(),
        capabilities: vec![shapeblock_proto::APP_LOGS_CAPABILITY.into()],
        ..Default::default()
    };
    let mut session = StandIn::dial_with(
        &set.replicas[2].agent_url(),
        &id.ca_pem,
        (&id.cert_pem, &id.key_pem),
        hello,
        64,
    )
    .await
    .unwrap();
    hello_ack(&mut session.down).await;
    let beats = session.up.clone();
    let heartbeat = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let hb = AgentMessage {
                seq: 0,
                body: Some(Up::Heartbeat(Heartbeat { sent_at_ms: 0 })),
            };
            if beats.send(hb).await.is_err() {
                return;
            }
        }
    });
    let request = || api::FollowAppLogsRequest {
        cluster_id: "routed".into(),
        namespace: "shop".into(),
        app: "web".into(),
        ..Default::default()
    };
    let start_of = |b| match b {
        Down::StartAppLogs(s) => Some(s),
        _ => None,
    };
    // A follow through replica 1 flows; replica 1 is killed: the holder (2) stops the
    // agent's follow once 1 is declared dead, rather than serving nobody for ever.
    let mut through_1 = set
        .client(1)
        .await
        .follow_app_logs(request())
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(5), next_down(&mut session.down, start_of))
        .await
        .unwrap();
    session
        .up
        .send(app_log(first.id, "web-1", 0, b"hello\n".to_vec()))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), through_1.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.data, b"hello\n");
    let killed = Instant::now();
    set.replicas[1].signal(libc::SIGKILL);
    let stop = tokio::time::timeout(
        Duration::from_secs(15),
        next_down(&mut session.down, |b| match b {
            Down::StopAppLogs(s) => Some(s),
            _ => None,
        }),
    )
    .await
    .expect("the holder stops the follow of a dead requester");
    assert_eq!(stop.id, first.id);
    println!(
        "requester killed: the agent was told to stop {:?} later (dead after {REPLICA_DEAD_AFTER_MS} ms)",
        killed.elapsed()
    );
    // A follow through replica 0; the holder (2) is killed: the caller is told, not left
    // waiting on a follow nobody serves.
    let mut through_0 = set
        .client(0)
        .await
        .follow_app_logs(request())
        .await
        .unwrap()
        .into_inner();
    let second = tokio::time::timeout(Duration::from_secs(5), next_down(&mut session.down, start_of))
        .await
        .unwrap();
    session
        .up
        .send(app_log(second.id, "web-1", 0, b"again\n".to_vec()))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), through_0.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.data, b"again\n");
    let killed = Instant::now();
    set.replicas[2].signal(libc::SIGKILL);
    let end = tokio::time::timeout(Duration::from_secs(15), through_0.message())
        .await
        .expect("the caller is told")
        .expect_err("with a status");
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert!(end.message().contains("follow again"), "{}", end.message());
    println!(
        "holder killed: the caller got {:?} {:?} later",
        end.message(),
        killed.elapsed()
    );
    heartbeat.abort();
}

#[tokio::test]
async fn a_killed_replica_hands_on_only_its_clusters_and_every_command_is_executed_once() {
    let mut set = Set::start(3).await;
    let clusters: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let mut done = BTreeMap::new();
    // Enrolled first, then dialed one after the other: HAProxy's round robin then spreads
    // the sessions over the three (an enrollment makes connections of its own).
    let mut identities = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        identities.push((c.clone(), set.enroll(i % 3, c).await));
    }
    for (c, id) in identities {
        done.insert(c.clone(), stand_in(set.haproxy.url(), id, stop.clone()));
        let c = c.clone();
        eventually(TIMEOUT, "the stand-in connected", || async {
            set.holder(&c).map(|_| ())
        })
        .await;
    }
    eventually(TIMEOUT, "every stand-in connected", || async {
        clusters.iter().all(|c| set.holder(c).is_some()).then_some(())
    })
    .await;
    let holders: BTreeMap<String, usize> = clusters
        .iter()
        .map(|c| (c.clone(), set.holder(c).unwrap()))
        .collect();
    // The replica with the most sessions dies.
    let victim = (0..3)
        .max_by_key(|r| holders.values().filter(|h| *h == r).count())
        .unwrap();
    let survivors: Vec<usize> = (0..3).filter(|r| *r != victim).collect();
    let (theirs, others): (Vec<String>, Vec<String>) =
        clusters.iter().cloned().partition(|c| holders[c] == victim);
    assert!(!theirs.is_empty() && !others.is_empty(), "{holders:?}");
    println!("sessions by replica: {holders:?}; killing replica {victim}");
    let epochs_before: BTreeMap<String, u64> = others.iter().map(|c| (c.clone(), set.epoch(c))).collect();
    let feed_before: u64 = set.sql("SELECT coalesce(max(id), 0) FROM feed").parse().unwrap();

    // Commands on every cluster, queued through the survivors, before and after the kill.
    let mut queued: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let per_cluster = 8;
    let mut clients = Vec::new();
    for r in &survivors {
        clients.push(set.client(*r).await);
    }
    let queue_round = |round: usize, clients: &[Client]| {
        let mut calls = Vec::new();
        for (i, c) in clusters.iter().enumerate() {
            let mut client = clients[(i + round) % clients.len()].clone();
            let c = c.clone();
            calls.push(async move {
                let seq = queue_delete(&mut client, &c, &format!("r{round}")).await;
                (c, seq)
            });
        }
        calls
    };
    for round in 0..per_cluster / 2 {
        for (c, seq) in futures::future::join_all(queue_round(round, &clients)).await {
            queued.entry(c).or_default().push(seq);
        }
    }
    let mut victim_replica = set.replicas.remove(victim);
    let killed = Instant::now();
    let _ = victim_replica.child.kill();
    let _ = victim_replica.child.wait();
    for round in per_cluster / 2..per_cluster {
        for (c, seq) in futures::future::join_all(queue_round(round, &clients)).await {
            queued.entry(c).or_default().push(seq);
        }
    }
    let survivor_ids: BTreeSet<String> = set.replicas.iter().map(|r| r.id.clone()).collect();
    let (_, reconnected) = eventually(TIMEOUT, "the dead replica's clusters on the others", || async {
        theirs
            .iter()
            .all(|c| {
                let id = set.sql(&format!(
                    "SELECT coalesce(replica, '') FROM clusters WHERE id = '{c}' AND connected"
                ));
                survivor_ids.contains(&id)
            })
            .then_some(())
    })
    .await;
    println!(
        "the killed replica's {} clusters had sessions on the others {reconnected:?} after the kill",
        theirs.len()
    );
    let total = clusters.len() * per_cluster;
    eventually(TIMEOUT, "every command done at the hub", || async {
        (set.sql("SELECT count(*) FROM commands WHERE done") == total.to_string()).then_some(())
    })
    .await;
    let settled = killed.elapsed();
    // The dead replica's row is gone (declared dead by a survivor).
    let dead_id = victim_replica.id.clone();
    eventually(
        Duration::from_secs(10),
        "the dead replica declared dead",
        || async {
            (set.sql(&format!("SELECT count(*) FROM replicas WHERE id = '{dead_id}'")) == "0").then_some(())
        },
    )
    .await;
    let _ = stop_tx.send(true);

    // Counted on both sides: every command executed exactly once by its stand-in, one
    // result recorded for each, nothing else.
    let mut executed_total = 0;
    let mut redelivered = 0;
    for (c, seqs) in &queued {
        let d = done[c].lock().unwrap();
        let expected: BTreeSet<u64> = seqs.iter().copied().collect();
        let executed: BTreeSet<u64> = d.executed.keys().copied().collect();
        assert_eq!(executed, expected, "{c}: executed what was queued, nothing lost");
        assert!(d.executed.values().all(|n| *n == 1), "{c}: {d:?}");
        executed_total += d.executed.len();
        redelivered += d.delivered.values().filter(|n| **n > 1).count();
        let results = set.sql(&format!(
            "SELECT count(*), count(DISTINCT command_seq) FROM feed WHERE cluster = '{c}' AND kind = 'result'"
        ));
        assert_eq!(
            results,
            format!("{}|{}", seqs.len(), seqs.len()),
            "{c}: one result each"
        );
        let events = set.sql(&format!(
            "SELECT count(*) FROM events WHERE cluster = '{c}' AND kind = 'result'"
        ));
        assert_eq!(events, seqs.len().to_string(), "{c}");
    }
    // The survivors' clusters were never disconnected: same session (epoch), no
    // session-down since before the kill.
    for c in &others {
        assert_eq!(set.epoch(c), epochs_before[c], "{c} kept its session");
        let downs = set.sql(&format!(
            "SELECT count(*) FROM feed WHERE cluster = '{c}' AND kind = 'session-down' AND id > {feed_before}"
        ));
        assert_eq!(downs, "0", "{c} was not disconnected");
        assert_eq!(
            done[c].lock().unwrap().epochs.len(),
            1,
            "{c}: one session throughout"
        );
    }
    for c in &theirs {
        assert!(done[c].lock().unwrap().epochs.len() >= 2, "{c} reconnected");
    }
    println!(
        "kill -9 of replica {victim}, which held {} of {} clusters: {total} commands queued, {executed_total} executed \
         (0 lost, 0 duplicated; {redelivered} delivered again after the reconnect and not executed again), \
         all done {settled:?} after the kill; the {} other clusters kept their sessions",
        theirs.len(),
        clusters.len(),
        others.len()
    );
    assert_eq!(executed_total, total);
}

#[tokio::test]
async fn the_real_agent_behind_haproxy_executes_a_command_queued_on_another_replica() {
    let set = Set::start(2).await;
    let env = support::agent::hub_env().await;
    let token = set
        .client(0)
        .await
        .create_enrollment_token(api::CreateEnrollmentTokenRequest {
            cluster_id: "real".into(),
            hub_address: set.haproxy.url(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let log = env.dir.join(format!("{}.log", unique_name("replicas-agent")));
    let args = [
        "--log=shapeblock_agent=debug,info".to_string(),
        format!("--hub-address={}", set.haproxy.url()),
        format!("--enroll-token={}", token.secret),
        format!("--ca-hash={}", set.ca_hash),
        "--heartbeat-seconds=2".to_string(),
        "--reconnect-max-seconds=1".to_string(),
        "--registry-secret=".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = shapeblock_testenv::agent::AgentProcess::start(
        Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
        &env.kubeconfig,
        support::agent::AGENT_NS,
        &log,
        &args,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let (holder, _) = eventually(TIMEOUT, "the agent's session", || async { set.holder("real") }).await;
    let other = 1 - holder;
    let name = unique_name("replicas");
    let accepted = set
        .client(other)
        .await
        .apply(api::ApplyRequest {
            cluster_id: "real".into(),
            manifest: support::hub::project(&name),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut client = set.client(other).await;
    let (_, took) = eventually(TIMEOUT, "the command succeeded", || {
        let mut client = client.clone();
        async move {
            let command = client
                .get_command(api::GetCommandRequest {
                    cluster_id: "real".into(),
                    command_id: accepted.command_id,
                })
                .await
                .ok()?
                .into_inner();
            (command.state == api::CommandState::Succeeded as i32).then_some(())
        }
    })
    .await;
    println!("queued on replica {other}, the agent's session on replica {holder}: succeeded after {took:?}");
    support::hub_process::wait_phase_at_hub(&client, "real", &format!("Project//{name}"), "Ready").await;
    let projects: kube::Api<shapeblock_agent::api::Project> = kube::Api::all(env.client.clone());
    assert!(projects.get_opt(&name).await.unwrap().is_some());
    let results = set.sql(&format!(
        "SELECT count(*) FROM feed WHERE cluster = 'real' AND kind = 'result' AND command_seq = {}",
        accepted.command_id
    ));
    assert_eq!(results, "1", "executed and recorded once");
    assert_eq!(
        set.holder("real"),
        Some(holder),
        "the session stayed where it was"
    );
    let _ = client
        .delete(api::DeleteRequest {
            cluster_id: "real".into(),
            ..delete_body(&name)
        })
        .await;
    agent.terminate(Duration::from_secs(10));
}

#[tokio::test]
async fn readiness_follows_the_database_and_the_listen_connection() {
    let set = Set::start(1).await;
    let (code, _) = set.replicas[0].readyz().await.unwrap();
    assert_eq!(code, 200);
    // The LISTEN connection killed from the database's side: unready until it reconnects,
    // live all along.
    let pid = set.sql(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'shapeblock-hub-listen' AND datname = current_database()",
    );
    assert!(!pid.is_empty(), "the LISTEN connection is visible");
    set.sql(&format!("SELECT pg_terminate_backend({pid})"));
    eventually(
        Duration::from_secs(20),
        "ready again after the reconnect",
        || async {
            let (code, _) = set.replicas[0].readyz().await?;
            (code == 200).then_some(())
        },
    )
    .await;
    assert!(
        set.replicas[0]
            .log()
            .contains("hub notifications down; reconnecting"),
        "{}",
        set.replicas[0].log()
    );
}

/// What a logging stand-in sent: the bytes of its one build log, in order, and its sessions.
#[derive(Default, Debug)]
struct Logged {
    bytes: Vec<u8>,
    epochs: Vec<u64>,
    /// The most chunks that waited for an ack at once.
    outbox_peak: usize,
    /// Every chunk is acked (after `finish`).
    drained: bool,
}

/// A stand-in agent streaming one build log (`shop/b-<cluster>/build`) as sequenced chunks,
/// as the agent does: a chunk stays in its bounded outbox (at most `OUTBOX`; it reads no
/// more of the log while full) until acked, and what is unacked is sent again in the next
/// session. After `finish` it sends the last chunk (eof) and reports once all are acked.
fn logger(url: String, identity: Identity, finish: tokio::sync::watch::Receiver<bool>) -> Arc<Mutex<Logged>> {
    const OUTBOX: usize = 64;
    let logged = Arc::new(Mutex::new(Logged::default()));
    let state = logged.clone();
    let cluster = identity.cluster_id.clone();
    tokio::spawn(async move {
        let mut finish = finish;
        let mut outbox: Vec<AgentMessage> = Vec::new();
        let (mut next_seq, mut line, mut ended) = (0u64, 0u64, false);
        loop {
            let Ok(StandIn { up, mut down }) = StandIn::dial(
                &url,
                &identity.ca_pem,
                &identity.cert_pem,
                &identity.key_pem,
                "stand-in",
                256,
            )
            .await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Ok(Ok(Some(first))) = tokio::time::timeout(Duration::from_secs(5), down.message()).await
            else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Some(Down::HelloAck(ack)) = first.body else {
                continue;
            };
            state.lock().unwrap().epochs.push(ack.epoch);
            outbox.retain(|m| m.seq > ack.last_agent_seq);
            if ended && outbox.is_empty() {
                state.lock().unwrap().drained = true;
            }
            for m in &outbox {
                let _ = up.send(m.clone()).await;
            }
            let mut produce = tokio::time::interval(Duration::from_millis(10));
            let mut beat = tokio::time::interval(Duration::from_millis(700));
            loop {
                tokio::select! {
                    message = down.message() => {
                        let Ok(Some(message)) = message else { break };
                        if let Some(Down::Ack(a)) = message.body {
                            outbox.retain(|m| m.seq > a.seq);
                            if ended && outbox.is_empty() {
                                state.lock().unwrap().drained = true;
                            }
                        }
                    }
                    _ = produce.tick(), if outbox.len() < OUTBOX && !ended => {
                        let last = *finish.borrow();
                        let data: Vec<u8> = if last {
                            Vec::new()
                        } else {
                            line += 1;
                            format!("{cluster} build line {line:06} {}\n", "x".repeat(200)).into_bytes()
                        };
                        let offset = {
                            let mut s = state.lock().unwrap();
                            let offset = s.bytes.len() as u64;
                            s.bytes.extend_from_slice(&data);
                            offset
                        };
                        next_seq += 1;
                        let chunk = AgentMessage {
                            seq: next_seq,
                            body: Some(Up::Log(shapeblock_agent::proto::v1::LogChunk {
                                build: format!("b-{cluster}"),
                                namespace: "shop".into(),
                                container: "build".into(),
                                offset,
                                data,
                                eof: last,
                                truncated: false,
                                kind: "AppBuild".into(),
                            })),
                        };
                        ended = last;
                        outbox.push(chunk.clone());
                        {
                            let mut s = state.lock().unwrap();
                            s.outbox_peak = s.outbox_peak.max(outbox.len());
                        }
                        if up.send(chunk).await.is_err() { break; }
                    }
                    _ = beat.tick() => {
                        let hb = AgentMessage { seq: 0, body: Some(Up::Heartbeat(Heartbeat { sent_at_ms: 0 })) };
                        if up.send(hb).await.is_err() { break; }
                    }
                    _ = finish.changed(), if !*finish.borrow() => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    logged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_while_agents_stream_build_logs_loses_nothing_and_restarts_no_replica() {
    // A server of this test's own, restarted in the middle.
    let postgres = tokio::task::block_in_place(Postgres::start).unwrap_or_else(|e| panic!("{e}"));
    let url = postgres.database("replicas").unwrap();
    let mut set = Set::start_on(Server::Own(Box::new(postgres)), url, 2).await;
    let clusters: Vec<String> = (0..4).map(|i| format!("l{i}")).collect();
    let mut identities = Vec::new();
    for (i, c) in clusters.iter().enumerate() {
        identities.push(set.enroll(i % 2, c).await);
    }
    let (finish_tx, finish) = tokio::sync::watch::channel(false);
    let logs: Vec<Arc<Mutex<Logged>>> = identities
        .into_iter()
        .map(|id| logger(set.haproxy.url(), id, finish.clone()))
        .collect();
    let stored = |set: &Set| -> u64 {
        set.sql("SELECT coalesce(sum(octet_length(data)), 0) FROM logs")
            .parse()
            .unwrap()
    };
    eventually(TIMEOUT, "logs arriving", || async {
        (stored(&set) > 50_000).then_some(())
    })
    .await;
    let before = stored(&set);
    let Server::Own(server) = &mut set.postgres else {
        unreachable!()
    };
    let restarted = Instant::now();
    // Down for 3 s: longer than a replica's dead-after (1.5 s), so every heartbeat row is
    // stale when it comes back, and longer than the agents' outbox takes to fill.
    tokio::task::block_in_place(|| server.restart_after(Duration::from_secs(3)))
        .unwrap_or_else(|e| panic!("{e}"));
    let outage = restarted.elapsed();
    let unready = set.replicas[0].readyz().await.map(|(code, _)| code);
    // Back: the replicas become ready again on their own, and the logs go on.
    for r in &set.replicas {
        eventually(TIMEOUT, "the replica ready again", || async {
            (r.readyz().await?.0 == 200).then_some(())
        })
        .await;
    }
    let after_restart = stored(&set);
    eventually(TIMEOUT, "logs arriving after the restart", || async {
        (stored(&set) > after_restart + 50_000).then_some(())
    })
    .await;
    finish_tx.send(true).unwrap();
    eventually(TIMEOUT, "every chunk acked", || async {
        logs.iter().all(|l| l.lock().unwrap().drained).then_some(())
    })
    .await;

    // Counted on both sides: each stream's bytes at the hub are exactly what its agent sent.
    let mut total = 0usize;
    for (c, log) in clusters.iter().zip(&logs) {
        let log = log.lock().unwrap();
        let digest = shapeblock_proto::hex(ring::digest::digest(&ring::digest::SHA256, &log.bytes).as_ref());
        let at_hub = set.sql(&format!(
            "SELECT coalesce(sum(octet_length(data)), 0) || '|' || encode(sha256(string_agg(data, ''::BYTEA ORDER BY \"offset\")), 'hex')
             FROM logs WHERE cluster = '{c}'"
        ));
        assert_eq!(
            at_hub,
            format!("{}|{digest}", log.bytes.len()),
            "{c}: every byte once, in order"
        );
        assert!(
            log.epochs.len() >= 2,
            "{c} reconnected across the outage: {log:?}"
        );
        total += log.bytes.len();
    }
    assert_eq!(set.sql("SELECT count(*) FROM feed WHERE kind = 'log-gap'"), "0");
    assert_eq!(
        set.sql("SELECT count(*) FROM feed WHERE kind = 'log-ended'"),
        clusters.len().to_string()
    );
    // No replica restarted or was declared dead: the outage made them unready only.
    for r in &mut set.replicas {
        assert!(
            r.child.try_wait().unwrap().is_none(),
            "the replica process still runs"
        );
        assert!(!r.log().contains("declared dead"), "{}", r.log());
    }
    assert_eq!(set.sql("SELECT count(*) FROM replicas"), "2");
    let peaks: Vec<usize> = logs.iter().map(|l| l.lock().unwrap().outbox_peak).collect();
    let sessions: Vec<usize> = logs.iter().map(|l| l.lock().unwrap().epochs.len()).collect();
    assert_eq!(
        unready,
        Some(503),
        "still unready just after: its LISTEN connection reconnects with backoff"
    );
    println!(
        "Postgres down and back in {outage:?} with {before} log bytes stored; {total} bytes sent by {} agents, all stored once \
         (0 lost, 0 duplicated, no gap); sessions per agent {sessions:?}; outbox peaks {peaks:?} (bound 64)",
        clusters.len()
    );
}
