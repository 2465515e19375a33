//! The agent's side of the tunnel: enrollment, the mTLS stream to the hub, delivery (sequence
//! numbers, acks, an outbox resent after every reconnect), heartbeats, reconnect with capped
//! exponential backoff and full jitter, and certificate renewal.
//!
//! It knows the proto and TLS, not Kubernetes: it talks to the rest of the agent through
//! [`Host`] (commands in, phase changes out) and [`IdentityStore`] (where the key and
//! certificate are kept), both implemented by the bridge.

pub mod enroll;
pub mod queue;

use std::collections::VecDeque;
use std::future::Future;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig};

use crate::proto::v1::agent_message::Body as Up;
use crate::proto::v1::agent_tunnel_client::AgentTunnelClient;
use crate::proto::v1::server_message::Body as Down;
use crate::proto::v1::{
    Ack, AgentMessage, CommandResult, Heartbeat, Hello, Inventory, LogChunk, PhaseChange, StatusSnapshot,
};
use crate::proto::{MAX_MESSAGE_BYTES, now_unix};
pub use queue::PhaseQueue;

/// The agent's credentials for the hub. The key is PEM PKCS#8 and never leaves the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identity {
    pub cluster_id: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// Unix seconds.
    pub not_after: i64,
}

impl Identity {
    pub fn is_complete(&self) -> bool {
        !self.key_pem.is_empty() && !self.cert_pem.is_empty() && !self.ca_pem.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("tunnel configuration: {0}")]
    Config(String),
    #[error("cannot reach the hub: {0}")]
    Unreachable(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("wrong CA hash: {0}")]
    CaMismatch(String),
    #[error("enrollment refused: {}", .0.message())]
    Enroll(tonic::Status),
    #[error(
        "not enrolled: no identity is stored in the agent's Secret and no --enroll-token is set; create one with `shapeblock-hub token create --cluster NAME`"
    )]
    NotEnrolled,
    #[error(
        "the client certificate expired at {0} (Unix seconds) and could not be renewed: re-enroll with a new token (`shapeblock-hub token create`, then set --enroll-token and delete the agent's identity Secret)"
    )]
    Expired(i64),
    #[error("identity store: {0}")]
    Store(String),
    #[error("session: {0}")]
    Session(String),
}

/// What the tunnel needs from the rest of the agent.
#[tonic::async_trait]
pub trait Host: Send + Sync + 'static {
    /// Carries out one command; never fails the session (failures are results).
    async fn execute(&self, command: Down) -> CommandResult;
    /// The current phase of every resource the agent manages (sent after every connect).
    async fn snapshot(&self) -> Vec<PhaseChange>;
    /// Kubernetes version, nodes, allocatable.
    async fn inventory(&self) -> Inventory;
    /// Phase changes, coalesced per object.
    fn changes(&self) -> &PhaseQueue;
    /// The next build-log chunk (waits for one). Must be cancel-safe: the session polls it
    /// beside the stream and drops the future when something else comes first.
    async fn next_log(&self) -> LogChunk;
    /// The hub durably recorded this chunk (it was acknowledged).
    fn log_delivered(&self, chunk: &LogChunk);
}

/// Where the identity is kept (a Secret in the agent's namespace).
#[tonic::async_trait]
pub trait IdentityStore: Send + Sync + 'static {
    async fn load(&self) -> Result<Option<Identity>, String>;
    async fn save(&self, identity: &Identity) -> Result<(), String>;
}

/// How the tunnel runs.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// `https://host:port`.
    pub hub_url: String,
    pub enroll_token: Option<String>,
    pub ca_hash: Option<String>,
    pub heartbeat: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Most sequenced messages waiting for an ack; above it the agent stops producing
    /// (phase changes stay coalesced in the queue, log readers wait).
    pub outbox_limit: usize,
}

impl TunnelConfig {
    pub fn new(hub_url: String) -> Self {
        Self {
            hub_url,
            enroll_token: None,
            ca_hash: None,
            heartbeat: Duration::from_secs(10),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            outbox_limit: 256,
        }
    }
}

/// Delivery state that outlives one session.
#[derive(Default)]
struct Delivery {
    next_seq: u64,
    outbox: VecDeque<AgentMessage>,
    /// Highest command seq executed by this process: a command resent by the hub because its
    /// result was not recorded yet is not run twice (it would be harmless: apply is idempotent).
    executed_upto: u64,
}

/// Loads the identity, or enrolls (saving the new key *before* the CSR goes out, so a crash
/// between signing and storing retries with the same key and gets the same certificate).
pub async fn ensure_identity(
    config: &TunnelConfig,
    store: &dyn IdentityStore,
) -> Result<Identity, TunnelError> {
    let stored = store
        .load()
        .await
        .map_err(TunnelError::Store)?
        .unwrap_or_default();
    if stored.is_complete() {
        if stored.not_after > 0 && stored.not_after <= now_unix() {
            return Err(TunnelError::Expired(stored.not_after));
        }
        return Ok(stored);
    }
    let (Some(token), Some(pin)) = (&config.enroll_token, &config.ca_hash) else {
        return Err(TunnelError::NotEnrolled);
    };
    let mut pending = stored;
    if pending.key_pem.is_empty() {
        pending.key_pem = enroll::new_key()?;
        store.save(&pending).await.map_err(TunnelError::Store)?;
    }
    let identity = enroll::enroll(&config.hub_url, token, pin, &pending.key_pem).await?;
    store.save(&identity).await.map_err(TunnelError::Store)?;
    tracing::info!(cluster = %identity.cluster_id, not_after = identity.not_after, "enrolled with the hub");
    Ok(identity)
}

/// Full jitter: a uniform delay in `[0, d]`.
fn full_jitter(d: Duration) -> Duration {
    let mut bytes = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    let r = u64::from_le_bytes(bytes) as f64 / u64::MAX as f64;
    d.mul_f64(r)
}

/// Runs the tunnel until `shutdown`: enrolls if needed, keeps one session up, reconnects.
pub async fn run(
    config: TunnelConfig,
    host: std::sync::Arc<dyn Host>,
    store: std::sync::Arc<dyn IdentityStore>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut delivery = Delivery::default();
    let backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(config.backoff_min)
            .with_max_delay(config.backoff_max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    let work = async {
        loop {
            let started = Instant::now();
            let outcome = match ensure_identity(&config, store.as_ref()).await {
                Ok(identity) => {
                    session(&config, &identity, host.as_ref(), store.as_ref(), &mut delivery).await
                }
                Err(e) => Err(e),
            };
            match &outcome {
                Ok(()) => tracing::info!("session ended; reconnecting"),
                Err(e) => tracing::warn!(error = %e, "tunnel: {e}"),
            }
            // A session that lived a while starts the backoff over.
            if started.elapsed() > config.backoff_max {
                delays = backoff();
            }
            let delay = full_jitter(delays.next().unwrap_or(config.backoff_max));
            tracing::debug!(?delay, "reconnecting after");
            tokio::time::sleep(delay).await;
        }
    };
    tokio::select! {
        _ = shutdown => tracing::info!("tunnel stopped"),
        _ = work => {}
    }
}

fn sequenced(delivery: &mut Delivery, body: Up) -> AgentMessage {
    delivery.next_seq += 1;
    let message = AgentMessage {
        seq: delivery.next_seq,
        body: Some(body),
    };
    delivery.outbox.push_back(message.clone());
    message
}

/// One session, until it breaks (an error) or the certificate was renewed (Ok: reconnect with
/// the new one).
async fn session(
    config: &TunnelConfig,
    identity: &Identity,
    host: &dyn Host,
    store: &dyn IdentityStore,
    delivery: &mut Delivery,
) -> Result<(), TunnelError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&identity.ca_pem))
        .identity(tonic::transport::Identity::from_pem(
            &identity.cert_pem,
            &identity.key_pem,
        ));
    let channel = enroll::endpoint(&config.hub_url, tls)?
        .http2_keep_alive_interval(config.heartbeat)
        .keep_alive_timeout(config.heartbeat * 2)
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(|e| TunnelError::Unreachable(format!("{}: {e:?}", config.hub_url)))?;
    let mut client = AgentTunnelClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    // Bounded: when the hub reads slowly, `send` waits and nothing new is produced.
    let (up, up_rx) = mpsc::channel::<AgentMessage>(32);
    let hello = AgentMessage {
        seq: 0,
        body: Some(Up::Hello(Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            capabilities: ["apply", "delete", "sync", "snapshot", "cancel", "logs"]
                .map(String::from)
                .to_vec(),
            inventory: Some(host.inventory().await),
        })),
    };
    up.send(hello)
        .await
        .map_err(|_| TunnelError::Session("closed".into()))?;
    let mut down = client
        .tunnel(ReceiverStream::new(up_rx))
        .await
        .map_err(|s| TunnelError::Session(format!("hub refused the session: {}", s.message())))?
        .into_inner();
    let first = down
        .message()
        .await
        .map_err(|s| TunnelError::Session(s.message().to_string()))?
        .ok_or_else(|| TunnelError::Session("hub closed before hello ack".into()))?;
    let Some(Down::HelloAck(ack)) = first.body else {
        return Err(TunnelError::Session(
            "hub's first message was not a hello ack".into(),
        ));
    };
    // Converge the delivery state with the hub's: drop what it has, renumber from it if this
    // process is new (an agent restart starts at 0).
    delivery.outbox.retain(|m| m.seq > ack.last_agent_seq);
    delivery.next_seq = delivery.next_seq.max(ack.last_agent_seq);
    if delivery
        .outbox
        .front()
        .is_some_and(|m| m.seq != ack.last_agent_seq + 1)
    {
        // The hub lost messages it had acked (its store was replaced): renumber what is left.
        let mut seq = ack.last_agent_seq;
        for m in delivery.outbox.iter_mut() {
            seq += 1;
            m.seq = seq;
        }
        delivery.next_seq = seq;
    }
    tracing::info!(
        epoch = ack.epoch,
        last_agent_seq = ack.last_agent_seq,
        resend = delivery.outbox.len(),
        "session up"
    );
    let resend: Vec<AgentMessage> = delivery.outbox.iter().cloned().collect();
    for m in resend {
        up.send(m)
            .await
            .map_err(|_| TunnelError::Session("closed".into()))?;
    }
    let snapshot = host.snapshot().await;
    let m = sequenced(delivery, Up::Snapshot(StatusSnapshot { objects: snapshot }));
    up.send(m)
        .await
        .map_err(|_| TunnelError::Session("closed".into()))?;

    let heartbeat = if ack.heartbeat_seconds > 0 {
        config
            .heartbeat
            .min(Duration::from_secs(ack.heartbeat_seconds.into()))
    } else {
        config.heartbeat
    };
    let mut beat = tokio::time::interval(heartbeat);
    let mut last_heard = Instant::now();
    // Renew at 2/3 of the remaining lifetime (checked every heartbeat).
    let lifetime = (identity.not_after - now_unix()).max(0);
    let renew_at = now_unix() + lifetime * 2 / 3;
    loop {
        let room = delivery.outbox.len() < config.outbox_limit;
        // Logs may fill only half the outbox: results and phase changes always find room.
        let log_room = delivery.outbox.len() < config.outbox_limit / 2;
        tokio::select! {
            message = down.message() => {
                let message = message
                    .map_err(|s| TunnelError::Session(format!("{:?}: {}", s.code(), s.message())))?
                    .ok_or_else(|| TunnelError::Session("hub closed the stream".into()))?;
                last_heard = Instant::now();
                match message.body {
                    Some(Down::Ack(Ack { seq })) => {
                        while delivery.outbox.front().is_some_and(|m| m.seq <= seq) {
                            if let Some(AgentMessage { body: Some(Up::Log(chunk)), .. }) = delivery.outbox.pop_front() {
                                host.log_delivered(&chunk);
                            }
                        }
                    }
                    Some(Down::Heartbeat(_)) => {}
                    Some(Down::HelloAck(_)) => return Err(TunnelError::Session("second hello ack".into())),
                    body if message.seq > 0 => {
                        if message.seq <= delivery.executed_upto {
                            continue;
                        }
                        let result = match body {
                            Some(command) => {
                                let mut r = host.execute(command).await;
                                r.command_seq = message.seq;
                                r
                            }
                            None => CommandResult {
                                command_seq: message.seq,
                                ok: false,
                                message: "unknown command: this agent does not understand it (newer hub?)".into(),
                                object: None,
                            },
                        };
                        delivery.executed_upto = message.seq;
                        let m = sequenced(delivery, Up::Result(result));
                        up.send(m).await.map_err(|_| TunnelError::Session("closed".into()))?;
                    }
                    _ => tracing::debug!("ignoring an unsequenced server message"),
                }
            }
            change = host.changes().next(), if room => {
                let m = sequenced(delivery, Up::Phase(change));
                up.send(m).await.map_err(|_| TunnelError::Session("closed".into()))?;
            }
            chunk = host.next_log(), if log_room => {
                let m = sequenced(delivery, Up::Log(chunk));
                up.send(m).await.map_err(|_| TunnelError::Session("closed".into()))?;
            }
            _ = beat.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    return Err(TunnelError::Session(format!("no message from the hub for {:?}: reconnecting", last_heard.elapsed())));
                }
                let hb = AgentMessage { seq: 0, body: Some(Up::Heartbeat(Heartbeat { sent_at_ms: 0 })) };
                // try_send: a full queue already proves the stream is busy.
                let _ = up.try_send(hb);
                if identity.not_after > 0 && now_unix() >= renew_at {
                    let renewed = enroll::renew(&mut client, identity).await?;
                    store.save(&renewed).await.map_err(TunnelError::Store)?;
                    tracing::info!(not_after = renewed.not_after, "client certificate renewed; reconnecting with it");
                    return Ok(());
                }
            }
        }
    }
}
