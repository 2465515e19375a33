//! The agent's side of the tunnel: enrollment, the mTLS stream to the hub, delivery (sequence
//! numbers, acks, an outbox resent after every reconnect), heartbeats, reconnect with capped
//! exponential backoff and full jitter, and certificate renewal.
//!
//! It knows the proto and TLS, not Kubernetes: it talks to the rest of the agent through
//! [`Host`] (commands in, phase changes out) and [`IdentityStore`] (where the key and
//! certificate are kept), both implemented by the bridge.
//!
//! Past 600 lines: the session loop, delivery and renewal share one state machine.

pub mod enroll;
pub mod queue;
pub mod renewal;

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
    Ack, AgentMessage, AppLogChunk, CommandResult, Heartbeat, Hello, Inventory, LogChunk, StartAppLogs,
    StatusSnapshot,
};
use crate::proto::{MAX_MESSAGE_BYTES, now_unix, now_unix_ms};
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
    /// A key made for re-enrolling after the certificate expired, kept beside the expired
    /// certificate until a token is traded for a new one (so a crash in between retries with
    /// the same key, and the expired certificate still tells what happened).
    pub pending_key_pem: String,
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
        "the client certificate of cluster {cluster:?} expired at {expired_at} ({ago} s ago), so the hub cannot authenticate this agent{attempt}. Re-enroll it under the same cluster id: on the hub run `shapeblock-hub token create --cluster {cluster}`, then give the agent the token (`helm upgrade shapeblock-agent <chart> -n <namespace> --reuse-values --set enrollment.token=<token>`, or --enroll-token / SHAPEBLOCK_ENROLL_TOKEN); the agent keeps its identity Secret, and the hub keeps the cluster's commands and state"
    )]
    Expired {
        cluster: String,
        expired_at: String,
        ago: i64,
        /// What re-enrolling with the configured token said, if one is configured.
        attempt: String,
    },
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
    /// The current phase of every resource the agent manages (sent after every connect),
    /// `complete` when every kind's first list was in.
    async fn snapshot(&self) -> StatusSnapshot;
    /// Kubernetes version, nodes, allocatable.
    async fn inventory(&self) -> Inventory;
    /// Phase changes, coalesced per object.
    fn changes(&self) -> &PhaseQueue;
    /// The next build-log chunk (waits for one). Must be cancel-safe: the session polls it
    /// beside the stream and drops the future when something else comes first.
    async fn next_log(&self) -> LogChunk;
    /// The hub durably recorded this chunk (it was acknowledged).
    fn log_delivered(&self, chunk: &LogChunk);
    /// Live App logs: follow (until stopped or the session ends) and stop. Never commands:
    /// nothing is answered, stored or resent.
    fn start_app_logs(&self, _start: StartAppLogs) {}
    fn stop_app_logs(&self, _id: u64) {}
    /// The session ended: every live follow it asked for stops.
    fn end_app_logs(&self) {}
    /// The next live App log chunk (waits for one). Must be cancel-safe, as `next_log`.
    async fn next_app_log(&self) -> AppLogChunk {
        std::future::pending().await
    }
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
    /// How often the inventory is read; it is sent when it changed, and at least every
    /// [`INVENTORY_MAX_AGE`].
    pub inventory_check: Duration,
}

/// The longest the hub goes without a fresh inventory from a connected agent.
pub const INVENTORY_MAX_AGE: Duration = Duration::from_secs(600);

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
            inventory_check: Duration::from_secs(120),
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
    /// Valid for one store of the hub only (see [`Delivery::converge`]).
    executed_upto: u64,
    /// The hub store `executed_upto` and the numbering belong to (`None` before the first
    /// session; empty from hubs that send none).
    store_id: Option<String>,
    /// Highest agent seq the current store acked.
    acked_upto: u64,
}

impl Delivery {
    /// Converges with the hub's `HelloAck`: drops what it has, renumbers from it if this
    /// process is new (an agent restart starts at 0), and forgets the executed commands when
    /// the store is not the one they were numbered by: replaced (another store id) or restored
    /// from a backup (it lost messages it had acked). Skipping by `executed_upto` then would
    /// silence the agent: the hub numbers new commands from its own store. Returns why it
    /// reset, if it did; Err for a seq no hub store can hold (numbering on from it would
    /// overflow).
    fn converge(&mut self, store_id: &str, last_agent_seq: u64) -> Result<Option<String>, String> {
        if last_agent_seq > i64::MAX as u64 {
            return Err(format!(
                "the hub's hello ack says it has agent seq {last_agent_seq}, beyond any store's range"
            ));
        }
        let reason = match &self.store_id {
            Some(known) if known != store_id => Some(format!(
                "the hub's store is another one (id {known:?}, now {store_id:?})"
            )),
            Some(_) if last_agent_seq < self.acked_upto => Some(format!(
                "the hub's store lost messages it had acknowledged (it has up to {last_agent_seq}, it acknowledged {}): restored from a backup?",
                self.acked_upto
            )),
            _ => None,
        };
        self.store_id = Some(store_id.to_string());
        if reason.is_some() {
            self.executed_upto = 0;
            // Results answer commands of the old numbering: sent to this store they would
            // mark other commands done. The hub resends what it has not seen answered.
            self.outbox.retain(|m| !matches!(m.body, Some(Up::Result(_))));
            let mut seq = last_agent_seq;
            for m in self.outbox.iter_mut() {
                seq += 1;
                m.seq = seq;
            }
            self.next_seq = seq;
            self.acked_upto = last_agent_seq;
            return Ok(reason);
        }
        self.outbox.retain(|m| m.seq > last_agent_seq);
        self.next_seq = self.next_seq.max(last_agent_seq);
        self.acked_upto = self.acked_upto.max(last_agent_seq);
        if self.outbox.front().is_some_and(|m| m.seq != last_agent_seq + 1) {
            // A first session of this process after a store change it cannot tell from the
            // id: renumber what is left.
            let mut seq = last_agent_seq;
            for m in self.outbox.iter_mut() {
                seq += 1;
                m.seq = seq;
            }
            self.next_seq = seq;
        }
        Ok(None)
    }

    /// The hub acked everything up to `seq`; the acked messages leave the outbox. Returns the
    /// log chunks among them (now durably at the hub).
    fn acked(&mut self, seq: u64) -> Vec<LogChunk> {
        self.acked_upto = self.acked_upto.max(seq);
        let mut delivered = Vec::new();
        while self.outbox.front().is_some_and(|m| m.seq <= seq) {
            if let Some(AgentMessage {
                body: Some(Up::Log(chunk)),
                ..
            }) = self.outbox.pop_front()
            {
                delivered.push(chunk);
            }
        }
        delivered
    }
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
        let now = now_unix();
        if renewal::expired(&stored, now) {
            return reenroll(config, store, stored, now).await;
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

/// An expired certificate: with a token configured, trade it for a new certificate of the
/// cluster the token names (a new key, saved beside the expired certificate first);
/// otherwise, or when the hub refuses the token, an error that names the expiry and the
/// remedy.
async fn reenroll(
    config: &TunnelConfig,
    store: &dyn IdentityStore,
    mut stored: Identity,
    now: i64,
) -> Result<Identity, TunnelError> {
    let expired = |attempt: String| TunnelError::Expired {
        cluster: stored.cluster_id.clone(),
        expired_at: rfc3339(stored.not_after),
        ago: now - stored.not_after,
        attempt,
    };
    let (Some(token), Some(pin)) = (&config.enroll_token, &config.ca_hash) else {
        return Err(expired(String::new()));
    };
    if stored.pending_key_pem.is_empty() {
        stored.pending_key_pem = enroll::new_key()?;
        store.save(&stored).await.map_err(TunnelError::Store)?;
    }
    let identity = match enroll::enroll(&config.hub_url, token, pin, &stored.pending_key_pem).await {
        Ok(identity) => identity,
        Err(e) => {
            return Err(expired(format!(
                "; re-enrolling with the configured token failed: {e}"
            )));
        }
    };
    if identity.cluster_id != stored.cluster_id {
        tracing::warn!(before = %stored.cluster_id, now = %identity.cluster_id, "the new token enrolled this agent as another cluster");
    }
    store.save(&identity).await.map_err(TunnelError::Store)?;
    tracing::info!(cluster = %identity.cluster_id, not_after = identity.not_after, "re-enrolled with the hub after the certificate expired");
    Ok(identity)
}

/// `2026-12-01T03:38:51Z` (UTC) for Unix seconds.
fn rfc3339(unix: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp(unix) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        ),
        Err(_) => format!("{unix} (Unix seconds)"),
    }
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
    // The same error again (an expired certificate, no token) is logged once every 10 minutes,
    // not at every retry.
    let mut last_logged: Option<(String, Instant)> = None;
    let work = async {
        loop {
            let started = Instant::now();
            let outcome = match ensure_identity(&config, store.as_ref()).await {
                Ok(identity) => {
                    let outcome =
                        session(&config, &identity, host.as_ref(), store.as_ref(), &mut delivery).await;
                    // Live follows belong to the session that asked for them.
                    host.end_app_logs();
                    outcome
                }
                Err(e) => Err(e),
            };
            match &outcome {
                Ok(()) => tracing::info!("session ended; reconnecting"),
                Err(e) => {
                    // What makes two errors the same (an expiry's message counts its age).
                    let text = match e {
                        TunnelError::Expired {
                            cluster,
                            expired_at,
                            attempt,
                            ..
                        } => format!("expired {cluster} {expired_at} {attempt}"),
                        other => other.to_string(),
                    };
                    let repeated = last_logged
                        .as_ref()
                        .is_some_and(|(t, at)| *t == text && at.elapsed() < Duration::from_secs(600));
                    if repeated {
                        tracing::debug!(error = %e, "tunnel: {e}");
                    } else if matches!(e, TunnelError::Expired { .. } | TunnelError::NotEnrolled) {
                        // The whole remedy, once (not again as a field).
                        tracing::error!("tunnel: {e}");
                        last_logged = Some((text, Instant::now()));
                    } else {
                        tracing::warn!(error = %e, "tunnel: {e}");
                        last_logged = Some((text, Instant::now()));
                    }
                }
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

/// Renews the certificate over `client` and saves it; Ok(false) when the hub refused (the
/// session goes on with the current certificate, which is still valid).
async fn try_renew(
    client: &mut AgentTunnelClient<tonic::transport::Channel>,
    identity: &Identity,
    store: &dyn IdentityStore,
) -> Result<bool, TunnelError> {
    let now = now_unix();
    match enroll::renew(client, identity).await {
        Ok(renewed) => {
            store.save(&renewed).await.map_err(TunnelError::Store)?;
            tracing::info!(
                not_after = renewed.not_after,
                old_not_after = identity.not_after,
                left_s = identity.not_after - now,
                "client certificate renewed; reconnecting with it"
            );
            Ok(true)
        }
        Err(e) => {
            tracing::warn!(error = %e, left_s = identity.not_after - now, "client certificate renewal failed; retrying in a minute");
            Ok(false)
        }
    }
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
    // Past the renewal point (after a hub outage, or an agent that was down): renew before
    // anything else, whatever the session would have lasted.
    let mut next_renew_try = Instant::now();
    if renewal::due(identity, now_unix()) {
        tracing::info!(
            not_after = identity.not_after,
            renew_at = renewal::renew_at(identity),
            "the client certificate is past its renewal point: renewing on connect"
        );
        if try_renew(&mut client, identity, store).await? {
            return Ok(());
        }
        next_renew_try = Instant::now() + Duration::from_secs(60);
    }
    // Bounded: when the hub reads slowly, `send` waits and nothing new is produced.
    let (up, up_rx) = mpsc::channel::<AgentMessage>(32);
    let mut inventory = host.inventory().await;
    let hello = AgentMessage {
        seq: 0,
        body: Some(Up::Hello(Hello {
            agent_version: env!("CARGO_PKG_VERSION").into(),
            capabilities: crate::proto::capabilities(),
            inventory: Some(inventory.clone()),
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
    if let Some(reason) = delivery
        .converge(&ack.store_id, ack.last_agent_seq)
        .map_err(TunnelError::Session)?
    {
        tracing::warn!(
            store_id = %ack.store_id,
            "{reason}: every command it sends is executed, whatever its seq"
        );
    }
    tracing::info!(
        epoch = ack.epoch,
        last_agent_seq = ack.last_agent_seq,
        store_id = %ack.store_id,
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
    let m = sequenced(delivery, Up::Snapshot(snapshot));
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
    let mut inventory_check = tokio::time::interval(config.inventory_check);
    inventory_check.tick().await;
    let mut inventory_sent = Instant::now();
    // Hubs before store ids end a session on an agent message they cannot decode: they get
    // the inventory in the hello only.
    let hub_takes_inventory = !ack.store_id.is_empty();
    let mut last_heard = Instant::now();
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
                        for chunk in delivery.acked(seq) {
                            host.log_delivered(&chunk);
                        }
                    }
                    Some(Down::Heartbeat(_)) => {}
                    Some(Down::HelloAck(_)) => return Err(TunnelError::Session("second hello ack".into())),
                    Some(Down::StartAppLogs(start)) => host.start_app_logs(start),
                    Some(Down::StopAppLogs(stop)) => host.stop_app_logs(stop.id),
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
            // Unsequenced: bounded by the follows' own budgets, not by the outbox.
            chunk = host.next_app_log() => {
                let m = AgentMessage { seq: 0, body: Some(Up::AppLog(chunk)) };
                up.send(m).await.map_err(|_| TunnelError::Session("closed".into()))?;
            }
            chunk = host.next_log(), if log_room => {
                let m = sequenced(delivery, Up::Log(chunk));
                up.send(m).await.map_err(|_| TunnelError::Session("closed".into()))?;
            }
            _ = inventory_check.tick(), if hub_takes_inventory => {
                let fresh = host.inventory().await;
                if fresh != inventory || inventory_sent.elapsed() >= INVENTORY_MAX_AGE {
                    inventory = fresh;
                    inventory_sent = Instant::now();
                    let m = AgentMessage { seq: 0, body: Some(Up::Inventory(inventory.clone())) };
                    let _ = up.try_send(m);
                }
            }
            _ = beat.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    return Err(TunnelError::Session(format!("no message from the hub for {:?}: reconnecting", last_heard.elapsed())));
                }
                // The sender's clock: the hub keeps the skew between the two.
                let hb = AgentMessage { seq: 0, body: Some(Up::Heartbeat(Heartbeat { sent_at_ms: now_unix_ms() })) };
                // try_send: a full queue already proves the stream is busy.
                let _ = up.try_send(hb);
                if Instant::now() >= next_renew_try && renewal::due(identity, now_unix()) {
                    if try_renew(&mut client, identity, store).await? {
                        return Ok(());
                    }
                    next_renew_try = Instant::now() + Duration::from_secs(60);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::PhaseChange;

    fn message(seq: u64, body: Up) -> AgentMessage {
        AgentMessage {
            seq,
            body: Some(body),
        }
    }

    fn result(command_seq: u64) -> Up {
        Up::Result(CommandResult {
            command_seq,
            ok: true,
            ..Default::default()
        })
    }

    fn phase() -> Up {
        Up::Phase(PhaseChange::default())
    }

    /// What a hub sends that changes the delivery state, hostile: hello acks with any store id
    /// and seq, acks of any seq, interleaved with the agent's own messages.
    #[derive(Debug, Clone)]
    enum Event {
        HelloAck(String, u64),
        Ack(u64),
        Send(bool),
    }

    fn event() -> impl proptest::strategy::Strategy<Value = Event> {
        use proptest::prelude::*;
        let seq = prop_oneof![0..40u64, any::<u64>(), Just(u64::MAX)];
        prop_oneof![
            (
                prop_oneof![
                    Just("a".to_string()),
                    Just("b".to_string()),
                    Just(String::new()),
                    any::<String>()
                ],
                seq.clone()
            )
                .prop_map(|(id, n)| Event::HelloAck(id, n)),
            seq.prop_map(Event::Ack),
            any::<bool>().prop_map(Event::Send),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: std::env::var("SHAPEBLOCK_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2048),
            failure_persistence: None,
            ..Default::default()
        })]

        /// Fuzz target for the agent's delivery state under any hub: never a panic, and the
        /// outbox stays numbered without gaps, after what the hub has, below `next_seq`.
        #[test]
        fn any_sequence_of_hello_acks_and_acks_keeps_the_outbox_numbered(
            events in proptest::collection::vec(event(), 0..40)
        ) {
            let mut d = Delivery::default();
            let mut hub_has = 0u64;
            for e in events {
                match e {
                    Event::HelloAck(id, n) => {
                        let refused = d.converge(&id, n).is_err();
                        proptest::prop_assert_eq!(refused, n > i64::MAX as u64);
                        if !refused {
                            hub_has = n;
                        }
                    }
                    Event::Ack(n) => {
                        d.acked(n);
                    }
                    Event::Send(result) => {
                        if d.next_seq < u64::MAX - 1 {
                            sequenced(&mut d, if result { super::tests::result(1) } else { phase() });
                        }
                    }
                }
                let seqs: Vec<u64> = d.outbox.iter().map(|m| m.seq).collect();
                proptest::prop_assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{:?}", seqs);
                if let Some(last) = seqs.last() {
                    proptest::prop_assert!(*last <= d.next_seq);
                }
                if let Some(first) = seqs.first() {
                    // What is resent comes after what the hub has (acks may run ahead of it).
                    proptest::prop_assert!(*first > hub_has.min(d.acked_upto), "{:?} after {}", seqs, hub_has);
                }
            }
        }
    }

    #[test]
    fn expiry_times_are_shown_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_796_096_331), "2026-12-01T03:38:51Z");
    }

    #[test]
    fn executed_commands_are_forgotten_when_the_hubs_store_is_replaced_or_restored() {
        let mut d = Delivery::default();
        assert_eq!(
            d.converge("store-a", 0),
            Ok(None),
            "a first session resets nothing"
        );
        d.executed_upto = 7;
        d.next_seq = 5;
        d.acked_upto = 3;
        d.outbox = [message(4, result(7)), message(5, phase())].into();
        // The same store again, which has 4: nothing forgotten.
        assert_eq!(d.converge("store-a", 4), Ok(None));
        assert_eq!(d.executed_upto, 7);
        assert_eq!(d.outbox.iter().map(|m| m.seq).collect::<Vec<_>>(), [5]);

        // Another store: commands of its numbering are all executed; results of the old one
        // are not sent to it; the rest is renumbered after what it has.
        d.outbox = [message(5, phase()), message(6, result(7)), message(7, phase())].into();
        let why = d.converge("store-b", 0).unwrap().expect("a reset");
        assert!(why.contains("another one"), "{why}");
        assert_eq!(d.executed_upto, 0);
        assert_eq!(d.outbox.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2]);
        assert!(d.outbox.iter().all(|m| !matches!(m.body, Some(Up::Result(_)))));
        assert_eq!(d.next_seq, 2);

        // The same store id, restored from a backup: it has less than it acked.
        d.executed_upto = 9;
        d.acked_upto = 40;
        d.outbox.clear();
        let why = d.converge("store-b", 12).unwrap().expect("a reset");
        assert!(why.contains("lost messages"), "{why}");
        assert_eq!((d.executed_upto, d.next_seq, d.acked_upto), (0, 12, 12));
    }

    /// Regression: the crash the delivery target found. A hello ack with `last_agent_seq`
    /// near `u64::MAX` overflowed the renumbering (a panic that ended the tunnel task in a
    /// debug build, wrapped numbers in a release one); it is refused and the session ends.
    #[test]
    fn a_hello_ack_beyond_any_stores_range_is_refused() {
        let mut d = Delivery::default();
        d.converge("a", 3).unwrap();
        sequenced(&mut d, phase());
        let refused = d.converge("a", u64::MAX).unwrap_err();
        assert!(refused.contains("beyond any store's range"), "{refused}");
        assert_eq!(d.outbox.len(), 1, "nothing lost");
        assert_eq!(d.converge("a", 3), Ok(None));
    }
}
