//! A fleet of simulated agents for scale benches of the hub: thousands of tunnels in one
//! process, each its own cluster with its own client certificate, speaking the real protocol
//! over real mTLS (one TCP connection each, as real agents have). What a simulated agent does
//! is what the hub sees of a real one: a `Hello`, heartbeats at the interval the hub asks for,
//! each command executed once (a redelivery is answered, not executed again) with a sequenced
//! result kept until acked and resent in the next session, and bursts of phase changes on
//! request. Counters on each agent say what it got and what the hub acknowledged, so a bench
//! can tell "all acknowledged, nothing lost" from the agents' side.
//!
//! Also the hub as a child process of its own ([`HubProcess`]), so that its RSS and CPU are
//! the hub's alone, killed with the bench however the bench ends.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair};
use shapeblock_proto::v1::agent_message::Body as Up;
use shapeblock_proto::v1::server_message::Body as Down;
use shapeblock_proto::v1::{AgentMessage, CommandResult, Heartbeat, ObjectRef, PhaseChange};
use tokio::sync::{mpsc, watch};

use super::process::ManagedProcess;
use super::stand_in::StandIn;
use super::{Error, Result};

/// A cluster's identity as enrollment leaves it: its id, certificate and key.
#[derive(Clone, Debug)]
pub struct Identity {
    pub cluster: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// Client certificates for `clusters`, signed by the hub CA in `ca_dir` (`ca.pem`,
/// `ca-key.pem`) exactly as the hub's `Enroll` signs them (a fresh key, a CSR, the hub's
/// subject and SAN), without the token round trip: thousands of enrollments through the API
/// would measure enrollment, not the steady state. Spread over `threads` OS threads (key
/// generation and signing are CPU-bound).
pub fn issue(
    ca_dir: &Path,
    clusters: &[String],
    lifetime: Duration,
    threads: usize,
) -> Result<Vec<Identity>> {
    let threads = threads.max(1);
    let per = clusters.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = clusters
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || -> Result<Vec<Identity>> {
                    // One CA per thread: loading it is cheap, sharing its key across threads
                    // would need it to be Sync.
                    let ca = shapeblock_hub::pki::Ca::load_or_create(ca_dir).map_err(pki_error)?;
                    chunk
                        .iter()
                        .map(|cluster| {
                            let key = KeyPair::generate().map_err(pki_error)?;
                            let csr = CertificateParams::default()
                                .serialize_request(&key)
                                .and_then(|c| c.pem())
                                .map_err(pki_error)?;
                            let (cert_pem, _) = ca.sign_client(&csr, cluster, lifetime).map_err(pki_error)?;
                            Ok(Identity {
                                cluster: cluster.clone(),
                                cert_pem,
                                key_pem: key.serialize_pem(),
                            })
                        })
                        .collect()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(clusters.len());
        for worker in workers {
            all.extend(
                worker
                    .join()
                    .map_err(|_| Error::Pki("a signing thread panicked".into()))??,
            );
        }
        Ok(all)
    })
}

fn pki_error(e: impl std::fmt::Display) -> Error {
    Error::Pki(e.to_string())
}

/// What one simulated agent saw and what the hub acknowledged to it.
#[derive(Debug, Default)]
pub struct Tally {
    /// Sessions begun (HelloAcks received); more than one means it reconnected.
    pub sessions: AtomicU64,
    /// A session is up now.
    pub connected: AtomicBool,
    /// Commands received, redeliveries included.
    pub delivered: AtomicU64,
    /// Commands executed (each once).
    pub executed: AtomicU64,
    /// Command results the hub acknowledged (recorded).
    pub results_acked: AtomicU64,
    /// Phase changes the hub acknowledged (recorded).
    pub phases_acked: AtomicU64,
    /// The newest command seq received: a bench waits on it for one command's latency.
    newest_command: watch::Sender<u64>,
}

impl Tally {
    /// Waits until a command of seq `seq` or later reached this agent.
    pub async fn delivered_upto(&self, seq: u64) {
        let mut newest = self.newest_command.subscribe();
        let _ = newest.wait_for(|n| *n >= seq).await;
    }
}

/// A running simulated agent.
pub struct SimAgent {
    pub identity: Arc<Identity>,
    pub tally: Arc<Tally>,
    /// Phase changes to send now (one message each, each of a new object).
    phases: mpsc::Sender<u32>,
    task: tokio::task::JoinHandle<()>,
}

impl SimAgent {
    /// Starts the agent's task: it dials `url` (a hub's agent listener or a load balancer in
    /// front of several), and dials again whenever its session ends, until `stop` is true or
    /// the agent is dropped.
    pub fn start(
        url: String,
        ca_pem: Arc<String>,
        identity: Arc<Identity>,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let tally = Arc::new(Tally::default());
        let (phases, orders) = mpsc::channel(4);
        let task = tokio::spawn(run(url, ca_pem, identity.clone(), tally.clone(), orders, stop));
        Self {
            identity,
            tally,
            phases,
            task,
        }
    }

    /// Asks the agent to send `n` phase changes at once.
    pub async fn send_phases(&self, n: u32) {
        let _ = self.phases.send(n).await;
    }
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the agent keeps until the hub acks it, and what it is.
struct Unacked {
    message: AgentMessage,
    result: bool,
}

async fn run(
    url: String,
    ca_pem: Arc<String>,
    identity: Arc<Identity>,
    tally: Arc<Tally>,
    mut orders: mpsc::Receiver<u32>,
    mut stop: watch::Receiver<bool>,
) {
    let mut outbox: Vec<Unacked> = Vec::new();
    let mut next_seq = 0u64;
    let mut executed_upto = 0u64;
    let mut objects = 0u64;
    let mut backoff = Duration::from_millis(200);
    while !*stop.borrow() {
        // Deep enough for a burst of phase changes and the outbox resent at once.
        let dialed = StandIn::dial(&url, &ca_pem, &identity.cert_pem, &identity.key_pem, "sim", 256).await;
        let Ok(StandIn { up, mut down }) = dialed else {
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = stop.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
            continue;
        };
        let ack = match tokio::time::timeout(Duration::from_secs(30), down.message()).await {
            Ok(Ok(Some(m))) => match m.body {
                Some(Down::HelloAck(ack)) => ack,
                _ => continue,
            },
            _ => continue,
        };
        backoff = Duration::from_millis(200);
        tally.sessions.fetch_add(1, Ordering::Relaxed);
        tally.connected.store(true, Ordering::Relaxed);
        settle(&tally, &mut outbox, ack.last_agent_seq);
        next_seq = next_seq.max(ack.last_agent_seq);
        for unacked in &outbox {
            let _ = up.send(unacked.message.clone()).await;
        }
        let period = Duration::from_secs(u64::from(ack.heartbeat_seconds.max(1)));
        let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                message = down.message() => {
                    let Ok(Some(message)) = message else { break };
                    match message.body {
                        Some(Down::Ack(a)) => settle(&tally, &mut outbox, a.seq),
                        Some(Down::Heartbeat(_)) | Some(Down::HelloAck(_)) | None => {}
                        Some(_) if message.seq > 0 => {
                            let command = message.seq;
                            tally.delivered.fetch_add(1, Ordering::Relaxed);
                            tally.newest_command.send_replace(command);
                            // Commands come in seq order: one at or below the newest executed
                            // is a redelivery, whose result is already in the outbox or acked.
                            if command > executed_upto {
                                executed_upto = command;
                                tally.executed.fetch_add(1, Ordering::Relaxed);
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
                                outbox.push(Unacked { message: result.clone(), result: true });
                                if up.send(result).await.is_err() { break; }
                            }
                        }
                        Some(_) => {}
                    }
                }
                Some(n) = orders.recv() => {
                    for _ in 0..n {
                        next_seq += 1;
                        objects += 1;
                        let phase = AgentMessage {
                            seq: next_seq,
                            body: Some(Up::Phase(PhaseChange {
                                object: Some(ObjectRef::new("Project", "", &format!("p{objects}"))),
                                phase: "Ready".into(),
                                ..Default::default()
                            })),
                        };
                        outbox.push(Unacked { message: phase.clone(), result: false });
                        if up.send(phase).await.is_err() { break; }
                    }
                }
                _ = beat.tick() => {
                    let hb = AgentMessage { seq: 0, body: Some(Up::Heartbeat(Heartbeat { sent_at_ms: 0 })) };
                    if up.send(hb).await.is_err() { break; }
                }
                _ = stop.changed() => break,
            }
        }
        tally.connected.store(false, Ordering::Relaxed);
    }
}

/// Drops what the hub acknowledged (cumulatively, up to `seq`) from the outbox, counting it.
fn settle(tally: &Tally, outbox: &mut Vec<Unacked>, seq: u64) {
    outbox.retain(|u| {
        if u.message.seq > seq {
            return true;
        }
        let counter = if u.result {
            &tally.results_acked
        } else {
            &tally.phases_acked
        };
        counter.fetch_add(1, Ordering::Relaxed);
        false
    });
}

/// CPU time (user + system) of a process so far, from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    cpu_of_stat(&stat)
}

/// CPU time of a process and its children (a Postgres server and its backends: they are
/// in sessions of their own, so their process group is not the server's).
pub fn tree_cpu_time(parent: u32) -> Duration {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    entries
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            stat_field(stat, 3) == Some(u64::from(parent))
                || stat.split_whitespace().next() == Some(&parent.to_string())
        })
        .map(|stat| cpu_of_stat(&stat))
        .sum()
}

/// Field `n` (0-based, counted after the command name) of a `/proc/PID/stat` line: the
/// command name is in parentheses and may contain spaces.
fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')': state is field 2 of the whole line, so field k is rest's (k - 2)th word.
    rest.split_whitespace().nth(n - 2)?.parse().ok()
}

fn cpu_of_stat(stat: &str) -> Duration {
    // utime and stime are fields 13 and 14 (0-based), in clock ticks.
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (user, system) = (
        stat_field(stat, 13).unwrap_or(0),
        stat_field(stat, 14).unwrap_or(0),
    );
    Duration::from_secs_f64((user + system) as f64 / ticks)
}

/// `VmRSS` and `VmHWM` (peak) of a process, in KiB, from `/proc/PID/status`.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Open file descriptors of a process.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A `shapeblock-hub serve` process with its own data directory, killed with the thread that
/// started it (and on drop), whatever ends the bench.
pub struct HubProcess {
    // Field order is drop order: the process before its directory.
    process: ManagedProcess,
    data: tempfile::TempDir,
    pub agent_port: u16,
    pub api_port: u16,
    pub health_port: u16,
}

impl HubProcess {
    /// Starts `binary` (`shapeblock-hub`) with the CA of `ca_dir` copied into a data
    /// directory of its own, `global` before `serve` (`--database-url …`) and `serve_args`
    /// after the listen addresses; returns once its API port accepts connections.
    pub fn start(
        binary: &Path,
        ca_dir: &Path,
        global: &[String],
        serve_args: &[String],
        log_filter: &str,
    ) -> Result<Self> {
        let data = tempfile::tempdir().map_err(|e| Error::io("create a hub data directory", e))?;
        for file in ["ca.pem", "ca-key.pem"] {
            std::fs::copy(ca_dir.join(file), data.path().join(file))
                .map_err(|e| Error::io(format!("copy {file}"), e))?;
        }
        let (agent_port, api_port, health_port) =
            (super::free_port()?, super::free_port()?, super::free_port()?);
        let mut args: Vec<String> = vec!["--data-dir".into(), data.path().display().to_string()];
        args.extend(global.iter().cloned());
        args.extend([
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{agent_port}"),
            "--api-addr".into(),
            format!("127.0.0.1:{api_port}"),
            "--health-addr".into(),
            format!("127.0.0.1:{health_port}"),
        ]);
        args.extend(serve_args.iter().cloned());
        let env = [("RUST_LOG".to_string(), log_filter.to_string())];
        let mut process = ManagedProcess::spawn_with_env(
            "shapeblock-hub",
            binary,
            &args,
            &env,
            &data.path().join("hub.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", api_port)).is_err() {
            if let Some(status) = process.exited() {
                return Err(Error::Exited {
                    name: "shapeblock-hub".into(),
                    status: status.to_string(),
                    log: process.log_path().display().to_string(),
                    tail: process.log_tail(30),
                });
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    name: "shapeblock-hub".into(),
                    seconds: 60,
                    log: process.log_path().display().to_string(),
                    tail: process.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Self {
            process,
            data,
            agent_port,
            api_port,
            health_port,
        })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn agent_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.agent_port)
    }

    pub fn api_address(&self) -> String {
        format!("https://127.0.0.1:{}", self.api_port)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.path().to_path_buf()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.process.log_path()).unwrap_or_default()
    }

    /// Ends the process (SIGTERM, SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) {
        self.process.stop(grace);
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_a_command_name_with_spaces() {
        let stat = "42 (tokio worker) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 1 2 3";
        assert_eq!(stat_field(stat, 3), Some(1), "the parent");
        assert_eq!(stat_field(stat, 4), Some(42), "the process group");
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        assert_eq!(cpu_of_stat(stat), Duration::from_secs_f64(300.0 / ticks));
    }

    #[test]
    fn issued_certificates_name_their_cluster() {
        let dir = tempfile::tempdir().unwrap();
        shapeblock_hub::pki::Ca::load_or_create(dir.path()).unwrap();
        let clusters: Vec<String> = (0..5).map(|i| format!("c-{i}")).collect();
        let issued = issue(dir.path(), &clusters, Duration::from_secs(3600), 2).unwrap();
        assert_eq!(issued.len(), 5);
        for (identity, cluster) in issued.iter().zip(&clusters) {
            let der = rustls::pki_types::CertificateDer::from_pem_slice(identity.cert_pem.as_bytes());
            use rustls::pki_types::pem::PemObject;
            let der = der.unwrap();
            assert_eq!(
                shapeblock_proto::cluster_of_certificate(&der).as_deref(),
                Some(cluster.as_str())
            );
        }
    }
}
