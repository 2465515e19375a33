//! The reference hub: the server side of the tunnel. It issues one-time enrollment tokens,
//! signs CSRs with its CA, holds one session per cluster (mTLS; the cluster is the one in the
//! client certificate), delivers commands with sequence numbers until the agent answers each,
//! and records phase changes, command results and build logs exactly once in its store.
//!
//! It knows the proto, TLS, its store and its CA; it never talks to Kubernetes.

pub mod api;
pub mod cli;
pub mod pki;
pub mod replicas;
pub mod store;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use prost::Message;
use tokio::sync::{Notify, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use shapeblock_proto::v1::agent_message::Body as Up;
use shapeblock_proto::v1::agent_tunnel_server::{AgentTunnel, AgentTunnelServer};
use shapeblock_proto::v1::server_message::Body as Down;
use shapeblock_proto::v1::{
    Ack, AgentMessage, AppLogChunk, Apply, CancelBuild, Delete, EnrollRequest, EnrollResponse, Heartbeat,
    HelloAck, ObjectRef, PhaseChange, PruneScope, RenewRequest, ServerMessage, SetConfig, StatusSnapshot,
    StopAppLogs, Sync,
};
use shapeblock_proto::{self as proto, MAX_MESSAGE_BYTES, ca_hash, hex, now_unix, object_key};
use store::{FeedEvent, LogChunk, ObjectStatus, Recorded, Store, Write, feed};

/// How the hub runs.
#[derive(Clone, Debug)]
pub struct HubConfig {
    /// CA and server certificate live here, and the store unless `database_url` is set.
    pub data_dir: PathBuf,
    /// A Postgres database for the store (`postgres://…`) instead of `hub.sqlite` in
    /// `data_dir`: what several replicas share.
    pub database_url: Option<String>,
    /// Postgres connections this hub keeps at most.
    pub database_pool: usize,
    /// gRPC listen address (port 0: any free port).
    pub listen: SocketAddr,
    /// Names and addresses the TLS server certificate is valid for (agents dial one of them).
    pub server_names: Vec<String>,
    /// Lifetime of the client certificates the hub signs (default 45 days: see
    /// [`shapeblock_proto::certificates`] for why).
    pub cert_lifetime: Duration,
    /// The CA signs as if the time were now plus this many seconds (negative: in the past).
    /// 0 in production; tests use it to issue certificates that are weeks old.
    pub ca_clock_offset_secs: i64,
    /// Heartbeat interval; a session with no message for 3 intervals is closed.
    pub heartbeat: Duration,
    /// The server-facing API's listen address (`shapeblock.hub.v1`); `None`: not served.
    pub api_listen: Option<SocketAddr>,
    /// Events the hub holds for one API watcher (its memory bound) ...
    pub watch_buffer: usize,
    /// ... and how long they may stay unread before the watcher is cut as too slow.
    pub watch_stall: Duration,
    /// Live App log callers the hub serves at once for one cluster (the agent has its own
    /// bound, which this may exceed: then the agent's refusal reaches the caller).
    pub app_log_followers: usize,
    /// How often a replica (a hub on Postgres) refreshes its heartbeat row ...
    pub replica_heartbeat: Duration,
    /// ... and how old that row may grow before the replica is declared dead (at least
    /// [`replicas::MIN_DEAD_AFTER_BEATS`] beats).
    pub replica_dead_after: Duration,
    /// `/livez` and `/readyz` over plain HTTP here; `None`: not served.
    pub health_listen: Option<SocketAddr>,
    /// What the store keeps of events and logs ([`store::retention`]) ...
    pub retention: store::Retention,
    /// ... enforced by a pass this often (zero: never; on Postgres one replica's pass at a
    /// time, the others skip the round).
    pub retention_interval: Duration,
}

impl HubConfig {
    pub fn new(data_dir: PathBuf) -> Self {
        Self {
            data_dir,
            database_url: None,
            database_pool: store::DEFAULT_POOL_SIZE,
            listen: ([127, 0, 0, 1], 0).into(),
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            cert_lifetime: shapeblock_proto::certificates::DEFAULT_LIFETIME,
            ca_clock_offset_secs: 0,
            heartbeat: Duration::from_secs(10),
            api_listen: None,
            watch_buffer: api::DEFAULT_WATCH_BUFFER,
            watch_stall: api::DEFAULT_WATCH_STALL,
            app_log_followers: api::DEFAULT_APP_LOG_FOLLOWERS,
            replica_heartbeat: replicas::DEFAULT_HEARTBEAT,
            replica_dead_after: replicas::DEFAULT_DEAD_AFTER,
            health_listen: None,
            retention: store::Retention::defaults(),
            retention_interval: store::retention::DEFAULT_INTERVAL,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

struct Session {
    epoch: u64,
    close: watch::Sender<Close>,
    /// What the agent said it does (`Hello.capabilities`).
    capabilities: Vec<String>,
    /// Unsequenced messages for the agent (live log starts and stops), sent by the session
    /// task as its outbound queue has room.
    control: mpsc::Sender<Down>,
}

/// Why a session is told to end.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Close {
    Open,
    Superseded,
    Revoked,
}

struct Inner {
    config: HubConfig,
    store: Store,
    /// `HelloAck.store_id`.
    store_id: String,
    ca: pki::Ca,
    sessions: Mutex<HashMap<String, Session>>,
    wake: Mutex<HashMap<String, Arc<Notify>>>,
    /// Clusters heard from since [`keep_up`] last wrote them, with the clock skew of their
    /// last heartbeat if one measured it.
    seen: Mutex<HashMap<String, Option<i64>>>,
    stopping: watch::Sender<bool>,
    /// What agents dial (the default address in install lines).
    agent_url: String,
    /// API streams being served (each a task with a bounded buffer).
    streams: api::Streams,
    /// Live App log followers, by cluster and follow id.
    app_logs: api::app_logs::Registry,
    /// Live App log follows routed between this replica and others.
    routes: api::routed_logs::Routes,
    /// This process as one of several replicas on a shared Postgres; `None` on SQLite.
    replica: Option<replicas::Replica>,
}

impl Inner {
    /// Signs a client certificate of `cluster` at the CA's time, and records its serial (what
    /// a revocation refuses).
    async fn sign(&self, csr_pem: &str, cluster: &str) -> Result<(String, String), Status> {
        let now = time::OffsetDateTime::now_utc() + time::Duration::seconds(self.config.ca_clock_offset_secs);
        let (pem, key_hash) = self
            .ca
            .sign_client_at(csr_pem, cluster, self.config.cert_lifetime, now)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|e| internal(format!("signed certificate: {e}")))?;
        let serial = certificate_serial(&der).ok_or_else(|| internal("signed certificate has no serial"))?;
        let not_after = proto::not_after(&der).unwrap_or(0);
        self.store
            .add_certificate(&serial, cluster, not_after)
            .await
            .map_err(internal)?;
        Ok((pem, key_hash))
    }

    /// Asks the live session of `cluster`, if any, to end.
    fn close_session(&self, cluster: &str, why: Close) {
        if let Some(session) = self
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(cluster)
        {
            let _ = session.close.send(why);
        }
    }

    /// The control queue of `cluster`'s session, if it is still the one of `epoch` (or any
    /// live one, with `epoch` 0).
    fn control(&self, cluster: &str, epoch: u64) -> Option<mpsc::Sender<Down>> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(cluster)
            .filter(|s| epoch == 0 || s.epoch == epoch)
            .map(|s| s.control.clone())
    }

    /// The wake-up of `cluster`'s sender, if this process has one (a session here now or
    /// before): a notification about another replica's cluster makes none.
    fn held_wake(&self, cluster: &str) -> Option<Arc<Notify>> {
        self.wake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(cluster)
            .cloned()
    }

    /// The clusters this process holds a session of now.
    fn held(&self) -> Vec<String> {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Notes that `cluster`'s agent was heard from (and its clock skew, if a heartbeat
    /// measured it), for [`keep_up`] to write with the others.
    fn saw(&self, cluster: &str, skew_ms: Option<i64>) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let entry = seen.entry(cluster.to_string()).or_default();
        if skew_ms.is_some() {
            *entry = skew_ms;
        }
    }

    fn wake(&self, cluster: &str) -> Arc<Notify> {
        self.wake
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(cluster.to_string())
            .or_default()
            .clone()
    }
}

/// A running hub. Dropping it does not stop it; call [`Hub::stop`].
pub struct Hub {
    inner: Arc<Inner>,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
    api: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
    health: Option<(SocketAddr, tokio::task::JoinHandle<()>)>,
}

/// A DNS-label-like cluster id: it goes into a URI SAN and the store.
pub fn valid_cluster_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !id.starts_with('-')
        && !id.ends_with('-')
}

fn token_hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// The serial number of a certificate (DER), hex.
pub fn certificate_serial(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(hex(cert.tbs_certificate.raw_serial()))
}

/// Opens the store of a hub data directory (for the CLI, which may run beside a live hub).
pub fn open_store(data_dir: &std::path::Path) -> Result<Store, HubError> {
    std::fs::create_dir_all(data_dir)
        .map_err(|e| HubError::Invalid(format!("cannot create {}: {e}", data_dir.display())))?;
    Ok(Store::open_sqlite(&data_dir.join("hub.sqlite"))?)
}

/// Where a hub with this data directory and (optional) database URL keeps its store: the
/// database if one is given, else `hub.sqlite` in the data directory.
pub fn store_location(
    data_dir: &std::path::Path,
    database_url: Option<&str>,
    pool_size: usize,
) -> store::Location {
    match database_url {
        Some(url) => store::Location::Postgres {
            url: url.to_string(),
            pool_size,
        },
        None => store::Location::Sqlite(data_dir.join("hub.sqlite")),
    }
}

/// Opens the store at `location`, creating the data directory a SQLite store lives in.
pub async fn open_store_at(location: &store::Location) -> Result<Store, HubError> {
    if let store::Location::Sqlite(path) = location
        && let Some(dir) = path.parent()
    {
        std::fs::create_dir_all(dir)
            .map_err(|e| HubError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
    }
    Ok(Store::open(location).await?)
}

/// Creates a one-time enrollment token for `cluster`, valid for `ttl`; returns the token.
/// Only its hash is stored.
pub async fn create_token(store: &Store, cluster: &str, ttl: Duration) -> Result<String, HubError> {
    if !valid_cluster_id(cluster) {
        return Err(HubError::Invalid(format!(
            "cluster id {cluster:?} must be 1-63 lower-case letters, digits and '-'"
        )));
    }
    let mut bytes = [0u8; 24];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| HubError::Invalid("no system randomness".into()))?;
    let token = format!("sbt_{}", hex(&bytes));
    store
        .add_token(&token_hash(&token), cluster, now_unix() + ttl.as_secs() as i64)
        .await?;
    Ok(token)
}

/// Parses a manifest of a ShapeBlock kind into the command that applies it; refuses what the
/// agent would refuse anyway (names and namespaces Kubernetes does not accept, unknown kinds),
/// so mistakes show at the hub's CLI.
pub fn apply_command(manifest: &str) -> Result<Vec<u8>, HubError> {
    check_manifest_size(manifest)?;
    proto::check_manifest(manifest).map_err(HubError::Invalid)?;
    Ok(Down::Apply(Apply {
        manifest: manifest.to_string(),
    })
    .encode_body())
}

fn check_manifest_size(manifest: &str) -> Result<(), HubError> {
    // The agent refuses messages above the limit; one queued would be resent forever.
    if manifest.len() > MAX_MESSAGE_BYTES / 2 {
        return Err(HubError::Invalid(format!(
            "manifest is {} bytes; the limit is {}",
            manifest.len(),
            MAX_MESSAGE_BYTES / 2
        )));
    }
    Ok(())
}

/// The command that deletes `object` (a managed kind, names Kubernetes accepts).
pub fn delete_command(object: ObjectRef) -> Result<Vec<u8>, HubError> {
    proto::check_object(&object).map_err(HubError::Invalid)?;
    Ok(Down::Delete(Delete { object: Some(object) }).encode_body())
}

/// What a `Sync` may prune and how much (see [`Sync`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prune {
    pub scope: PruneScope,
    /// Percent of the managed objects in scope; 0: the agent's default (50).
    pub max_percent: u32,
    pub force: bool,
}

impl Prune {
    /// Prune within these Projects (each with what is in its namespace).
    pub fn projects<S: ToString>(names: impl IntoIterator<Item = S>) -> Self {
        Self {
            scope: PruneScope {
                projects: names.into_iter().map(|n| n.to_string()).collect(),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// The command that converges the cluster to `manifests` (with `prune`, deleting the
/// resources the agent manages in its scope that are not among them). A prune without a
/// scope is refused here, as the agent would refuse it.
pub fn sync_command(manifests: &[String], prune: Option<Prune>) -> Result<Vec<u8>, HubError> {
    for manifest in manifests {
        check_manifest_size(manifest)?;
    }
    let pruning = prune.is_some();
    let prune = prune.unwrap_or_default();
    let command = Sync {
        manifests: manifests.to_vec(),
        // Never set: an agent from before scopes would prune the whole cluster on it. The
        // scope alone asks for the prune.
        prune: false,
        prune_scope: pruning.then_some(prune.scope),
        prune_max_percent: prune.max_percent,
        force: prune.force,
    };
    if pruning && proto::scope_is_empty(command.prune_scope.as_ref()) {
        return Err(HubError::Invalid(
            "a prune needs a scope: name the projects (or kinds and namespaces) it may prune in".into(),
        ));
    }
    proto::check_sync(&command).map_err(HubError::Invalid)?;
    let body = Down::Sync(command).encode_body();
    if body.len() > MAX_MESSAGE_BYTES / 2 {
        return Err(HubError::Invalid(format!(
            "the desired state is {} bytes in one message; the limit is {}",
            body.len(),
            MAX_MESSAGE_BYTES / 2
        )));
    }
    Ok(body)
}

/// The command that sets (and unsets) secret config vars of an App.
pub fn set_config_command(command: SetConfig) -> Result<Vec<u8>, HubError> {
    shapeblock_proto::check_set_config(&command).map_err(HubError::Invalid)?;
    Ok(Down::SetConfig(command).encode_body())
}

/// The command that cancels a running build.
pub fn cancel_command(namespace: &str, build: &str) -> Result<Vec<u8>, HubError> {
    let command = CancelBuild {
        namespace: namespace.into(),
        build: build.into(),
    };
    proto::check_cancel(&command).map_err(HubError::Invalid)?;
    Ok(Down::CancelBuild(command).encode_body())
}

trait EncodeBody {
    fn encode_body(self) -> Vec<u8>;
}

impl EncodeBody for Down {
    fn encode_body(self) -> Vec<u8> {
        ServerMessage {
            seq: 0,
            body: Some(self),
        }
        .encode_to_vec()
    }
}

/// Prunes the store every `retention_interval` until the hub stops, the first pass one
/// interval after the start (a hub restarting in a loop does not prune in a loop). A pass
/// that fails is logged and tried again next round: retention is late, never wrong.
fn start_retention(inner: &Arc<Inner>) {
    let every = inner.config.retention_interval;
    if every.is_zero() || inner.config.retention.keeps_everything() {
        tracing::info!("retention off: the store keeps every event and log");
        return;
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        let mut stopping = inner.stopping.subscribe();
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stopping.changed() => return,
            }
            let started = std::time::Instant::now();
            let pass = if inner.store.replicated() {
                inner
                    .store
                    .prune(shapeblock_proto::now_unix_ms(), &inner.config.retention)
                    .await
            } else {
                // SQLite's statements are synchronous: a pass through a backlog runs on a
                // blocking thread, not on a worker the sessions' tasks need.
                let on = inner.clone();
                let runtime = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || {
                    runtime.block_on(
                        on.store
                            .prune(shapeblock_proto::now_unix_ms(), &on.config.retention),
                    )
                })
                .await
                .unwrap_or_else(|e| Err(store::StoreError::Config(format!("retention pass: {e}"))))
            };
            match pass {
                Ok(p) if !p.ran => tracing::debug!("retention: another replica is pruning; skipped"),
                Ok(p) => tracing::info!(
                    feed = p.feed,
                    events = p.events,
                    log_chunks = p.log_chunks,
                    log_bytes = p.log_bytes,
                    log_streams = p.log_streams,
                    ms = started.elapsed().as_millis() as u64,
                    "retention pass"
                ),
                Err(e) => tracing::warn!(%e, "retention pass failed; trying again next round"),
            }
        }
    });
}

impl Hub {
    /// Loads or creates the CA and store in `config.data_dir` and starts serving.
    pub async fn start(config: HubConfig) -> Result<Self, HubError> {
        // The CA lives here whichever store the hub has.
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| HubError::Invalid(format!("cannot create {}: {e}", config.data_dir.display())))?;
        let location = store_location(
            &config.data_dir,
            config.database_url.as_deref(),
            config.database_pool,
        );
        let store = open_store_at(&location).await?;
        // On SQLite this is the only hub: a previous process's sessions are gone, whatever
        // the store says. On Postgres other replicas may hold sessions; a previous process's
        // are handed on once its heartbeat is stale, by whichever replica notices.
        let replica = if store.replicated() {
            Some(replicas::Replica::new(
                config.replica_heartbeat,
                config.replica_dead_after,
            )?)
        } else {
            store.mark_disconnected_all().await?;
            None
        };
        let store_id = store.id().await?;
        tracing::info!(backend = store.backend(), "hub store open");
        let tolerated = shapeblock_proto::certificates::outage_tolerated(config.cert_lifetime);
        if tolerated < shapeblock_proto::certificates::OUTAGE_TOLERATED {
            tracing::warn!(
                lifetime_s = config.cert_lifetime.as_secs(),
                tolerated_s = tolerated.as_secs(),
                "client certificates of this lifetime strand an agent after a hub outage of {tolerated:?} (the default of 45 days tolerates 9 days)"
            );
        }
        let ca = pki::Ca::load_or_create(&config.data_dir)?;
        let (cert, key) = ca.server_cert(&config.server_names)?;
        pki::Ca::save_server(&config.data_dir, &cert)?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| HubError::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| HubError::Listen {
            addr: config.listen,
            source,
        })?;
        let health_listener = match config.health_listen {
            Some(addr) => Some(replicas::bind_health(addr).await?),
            None => None,
        };
        if let Some(replica) = &replica {
            // Registered before any session begins: a session owned by a replica without a
            // row would be handed on at once.
            store.register_replica(&replica.id, &addr.to_string()).await?;
            tracing::info!(replica = %replica.id, "hub replica registered");
        }
        let api_listener =
            match config.api_listen {
                Some(api_addr) => Some(tokio::net::TcpListener::bind(api_addr).await.map_err(|source| {
                    HubError::Listen {
                        addr: api_addr,
                        source,
                    }
                })?),
                None => None,
            };
        let (stopping, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            store,
            store_id,
            sessions: Mutex::default(),
            wake: Mutex::default(),
            seen: Mutex::default(),
            stopping,
            config: config.clone(),
            ca,
            agent_url: format!("https://{addr}"),
            streams: api::Streams::default(),
            app_logs: api::app_logs::Registry::default(),
            routes: api::routed_logs::Routes::default(),
            replica,
        });
        replicas::start(&inner);
        if inner.replica.is_none() {
            tokio::spawn(watch_queued(inner.clone()));
        }
        tokio::spawn(keep_up(inner.clone()));
        start_retention(&inner);
        let health = health_listener.map(|listener| {
            let addr = listener.local_addr().ok();
            (addr, replicas::serve_health(inner.clone(), listener))
        });
        let api = match api_listener {
            Some(listener) => Some(api::serve(inner.clone(), listener, &cert, &key)?),
            None => None,
        };
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(&inner.ca.cert_pem))
            // Enroll has no client certificate yet; Connect and Renew insist on one.
            .client_auth_optional(true);
        let service = AgentTunnelServer::new(Service { inner: inner.clone() })
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let router = Server::builder()
            .tls_config(tls)
            .map_err(|e| HubError::Invalid(format!("TLS configuration: {e}")))?
            .http2_keepalive_interval(Some(config.heartbeat))
            .http2_keepalive_timeout(Some(config.heartbeat * 2))
            .add_service(service);
        let mut stop = inner.stopping.subscribe();
        let server = tokio::spawn(async move {
            let incoming = incoming(listener);
            let signal = async move {
                let _ = stop.changed().await;
            };
            if let Err(err) = router.serve_with_incoming_shutdown(incoming, signal).await {
                tracing::error!(%err, "hub server failed");
            }
        });
        tracing::info!(%addr, ca_hash = %ca_hash(&inner.ca.cert_der), "hub listening");
        Ok(Self {
            inner,
            addr,
            server,
            api,
            health: health.and_then(|(addr, task)| Some((addr?, task))),
        })
    }

    /// The health listener's address (`/livez`, `/readyz`), if it is served.
    pub fn health_address(&self) -> Option<SocketAddr> {
        self.health.as_ref().map(|(addr, _)| *addr)
    }

    /// This process's replica id (a hub on Postgres).
    pub fn replica_id(&self) -> Option<&str> {
        self.inner.replica.as_ref().map(|r| r.id.as_str())
    }

    /// Why the hub is not ready (`/readyz`), if it is not.
    pub fn unready(&self) -> Option<String> {
        replicas::unready(&self.inner)
    }

    /// The API's address, if it is served.
    pub fn api_address(&self) -> Option<SocketAddr> {
        self.api.as_ref().map(|(addr, _)| *addr)
    }

    pub fn address(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT` (what an agent dials).
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    pub fn ca_hash(&self) -> String {
        ca_hash(&self.inner.ca.cert_der)
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub async fn create_token(&self, cluster: &str, ttl: Duration) -> Result<String, HubError> {
        create_token(&self.inner.store, cluster, ttl).await
    }

    /// Queues a server-side apply of `manifest` on `cluster`; returns the command's seq.
    pub async fn apply(&self, cluster: &str, manifest: &str) -> Result<u64, HubError> {
        self.queue(cluster, apply_command(manifest)?).await
    }

    pub async fn delete(&self, cluster: &str, object: ObjectRef) -> Result<u64, HubError> {
        self.queue(cluster, delete_command(object)?).await
    }

    /// Queues a `Sync` of `manifests`, pruning as `prune` says (`None`: no prune).
    pub async fn sync(
        &self,
        cluster: &str,
        manifests: &[String],
        prune: Option<Prune>,
    ) -> Result<u64, HubError> {
        self.queue(cluster, sync_command(manifests, prune)?).await
    }

    /// Queues a change of an App's secret config vars.
    pub async fn set_config(&self, cluster: &str, command: SetConfig) -> Result<u64, HubError> {
        self.queue(cluster, set_config_command(command)?).await
    }

    pub async fn cancel(&self, cluster: &str, namespace: &str, build: &str) -> Result<u64, HubError> {
        self.queue(cluster, cancel_command(namespace, build)?).await
    }

    /// Queues any encoded `ServerMessage`, unchecked (tests use it for hostile input).
    pub async fn queue(&self, cluster: &str, body: Vec<u8>) -> Result<u64, HubError> {
        let seq = self.inner.store.add_command(cluster, &body).await?;
        self.inner.wake(cluster).notify_one();
        Ok(seq)
    }

    /// The live session's epoch of a cluster, if connected.
    pub fn session_epoch(&self, cluster: &str) -> Option<u64> {
        self.inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(cluster)
            .map(|s| s.epoch)
    }

    /// Stops serving: every session ends (agents see the stream break, as when the hub
    /// dies) and the listener closes.
    pub async fn stop(self) {
        let _ = self.inner.stopping.send(true);
        let servers = std::iter::once(self.server)
            .chain(self.api.map(|(_, server)| server))
            .chain(self.health.map(|(_, server)| server));
        for mut server in servers {
            if tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
            {
                server.abort();
            }
        }
        // Who was heard from in the last interval, with the sessions ended: else a cluster's
        // last_seen would be up to an interval older than its agent's last message.
        let _ = tokio::time::timeout(Duration::from_secs(5), flush_seen(&self.inner)).await;
    }
}

/// How often a hub on SQLite reads what was queued since it last looked.
const QUEUED_POLL: Duration = Duration::from_millis(500);

/// How often the hub looks for commands its sessions may have missed a wake-up for (a
/// replica's notification lost while its LISTEN connection was down, a wake-up raced): one
/// query for all its sessions. A look per session every 500 ms was 20,000 queries/s with
/// 10,000 agents, 65 % of a core at rest; every 5 s it was still 2,000 (`benches/hub_scale.rs`).
const COMMAND_POLL: Duration = Duration::from_secs(5);

/// What the hub does for all its sessions at once rather than each on its own: writes who was
/// heard from (every heartbeat), and wakes the sessions with commands not done (the fallback
/// for a missed wake-up, every [`COMMAND_POLL`]). Per session, both were a statement per agent
/// per interval: the database's whole load at rest with 10,000 agents.
async fn keep_up(inner: Arc<Inner>) {
    let mut stopping = inner.stopping.subscribe();
    let mut beat = tokio::time::interval(inner.config.heartbeat);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut poll = tokio::time::interval(COMMAND_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = beat.tick() => flush_seen(&inner).await,
            _ = poll.tick() => wake_pending(&inner).await,
            _ = stopping.changed() => return,
        }
    }
}

/// Writes who was heard from since the last write. What cannot be written (the database is
/// down) is kept for the next, unless a newer look at the same cluster came meanwhile.
async fn flush_seen(inner: &Inner) {
    let seen: Vec<(String, Option<i64>)> =
        std::mem::take(&mut *inner.seen.lock().unwrap_or_else(|e| e.into_inner()))
            .into_iter()
            .collect();
    if seen.is_empty() {
        return;
    }
    if let Err(e) = inner.store.seen(&seen).await {
        tracing::warn!(%e, clusters = seen.len(), "writing when agents were last seen; kept for the next write");
        let mut pending = inner.seen.lock().unwrap_or_else(|e| e.into_inner());
        for (cluster, skew) in seen {
            pending.entry(cluster).or_insert(skew);
        }
    }
}

/// Wakes the senders of this hub's sessions that have commands not done.
pub(crate) async fn wake_pending(inner: &Inner) {
    match inner.store.with_pending_commands(&inner.held()).await {
        Ok(pending) => {
            for cluster in pending {
                if let Some(wake) = inner.held_wake(&cluster) {
                    wake.notify_one();
                }
            }
        }
        Err(e) => tracing::warn!(%e, "looking for commands sessions may have missed"),
    }
}

/// On SQLite the CLI queues commands from another process, and nothing tells this one: it
/// reads the feed's `queued` entries every [`QUEUED_POLL`] and wakes the sessions of those
/// clusters only, one read for the whole hub however many sessions it holds.
async fn watch_queued(inner: Arc<Inner>) {
    const PAGE: u32 = 1000;
    let mut stopping = inner.stopping.subscribe();
    let mut cursor = None;
    let mut tick = tokio::time::interval(QUEUED_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopping.changed() => return,
        }
        // Sessions look for commands when they begin: what was queued before this hub read
        // the feed's end is theirs to find.
        let after = match cursor {
            Some(after) => after,
            None => match inner.store.feed_end().await {
                Ok(end) => *cursor.insert(end),
                Err(e) => {
                    tracing::warn!(%e, "reading the feed's end");
                    continue;
                }
            },
        };
        let mut after = after;
        loop {
            let entries = match inner.store.feed_after(None, after, PAGE).await {
                Ok(entries) => entries,
                Err(e) => {
                    tracing::warn!(%e, "reading queued commands");
                    break;
                }
            };
            for entry in &entries {
                after = after.max(entry.id);
                if entry.kind == feed::QUEUED
                    && let Some(wake) = inner.held_wake(&entry.cluster)
                {
                    wake.notify_one();
                }
            }
            if entries.len() < PAGE as usize {
                break;
            }
        }
        cursor = Some(after);
    }
}

/// The connections `listener` accepts, with `TCP_NODELAY` (what tonic's own `serve` sets,
/// and a listener of our own does not get): every message of the tunnel is small and written
/// at once, so Nagle's algorithm would hold one written right after another (a command just
/// after the ack of the previous one's result) until the agent's delayed ACK, 40 ms on Linux.
pub(crate) fn incoming(listener: tokio::net::TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

struct Service {
    inner: Arc<Inner>,
}

fn cluster_of<T>(request: &Request<T>) -> Result<String, Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        Status::unauthenticated(
            "a client certificate is required: enroll first (shapeblock-agent gets one with the install token)",
        )
    })?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    proto::cluster_of_certificate(leaf)
        .ok_or_else(|| Status::permission_denied("the client certificate names no ShapeBlock cluster"))
}

type ConnectStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<ServerMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentTunnel for Service {
    async fn enroll(&self, request: Request<EnrollRequest>) -> Result<Response<EnrollResponse>, Status> {
        let req = request.into_inner();
        let store = &self.inner.store;
        let hash = token_hash(req.token.trim());
        let token = store.token(&hash).await.map_err(internal)?.ok_or_else(|| {
            Status::unauthenticated("unknown enrollment token: create one with `shapeblock-hub token create`")
        })?;
        let (cert_pem, key_hash) = self.inner.sign(&req.csr_pem, &token.cluster).await?;
        // A used token still answers the key it was first used with: an agent that crashed
        // after the hub signed, before it stored the certificate, retries with the same key.
        if let Some(bound) = &token.bound_key {
            if *bound == key_hash {
                let cert_pem = token.cert_pem.clone().unwrap_or_default();
                return Ok(Response::new(self.response(&token.cluster, cert_pem)));
            }
            return Err(Status::permission_denied(
                "enrollment token already used (by another key): create a new one with `shapeblock-hub token create`",
            ));
        }
        if token.expires_at <= now_unix() {
            return Err(Status::unauthenticated(format!(
                "enrollment token expired {} s ago: create a new one with `shapeblock-hub token create`",
                now_unix() - token.expires_at
            )));
        }
        if !store
            .bind_token(&hash, &key_hash, &cert_pem)
            .await
            .map_err(internal)?
        {
            return Err(Status::permission_denied(
                "enrollment token already used (by another key)",
            ));
        }
        // A new token after a revocation: the cluster is a member again.
        store.rejoined(&token.cluster).await.map_err(internal)?;
        tracing::info!(cluster = %token.cluster, "cluster enrolled");
        Ok(Response::new(self.response(&token.cluster, cert_pem)))
    }

    async fn renew(&self, request: Request<RenewRequest>) -> Result<Response<EnrollResponse>, Status> {
        let (cluster, _, _) = self.admitted(&request).await?;
        let (cert_pem, _) = self.inner.sign(&request.into_inner().csr_pem, &cluster).await?;
        tracing::info!(%cluster, "client certificate renewed");
        Ok(Response::new(self.response(&cluster, cert_pem)))
    }

    type TunnelStream = ConnectStream;

    async fn tunnel(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        let (cluster, not_after, serial) = self.admitted(&request).await?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10 s"))??
            .ok_or_else(|| Status::invalid_argument("stream ended before hello"))?;
        let Some(Up::Hello(hello)) = first.body else {
            return Err(Status::invalid_argument("the first message must be hello"));
        };
        let (epoch, last_agent_seq) = self
            .inner
            .store
            .begin_session(&cluster, &hello)
            .await
            .map_err(internal)?;
        if let Err(e) = self
            .inner
            .store
            .set_session_certificate(&cluster, not_after)
            .await
        {
            tracing::warn!(%e, "certificate expiry");
        }
        let (close, closed) = watch::channel(Close::Open);
        let (control, control_rx) = mpsc::channel(api::app_logs::CONTROL_QUEUE);
        let session_entry = Session {
            epoch,
            close,
            capabilities: hello.capabilities.clone(),
            control,
        };
        if let Some(old) = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(cluster.clone(), session_entry)
        {
            tracing::info!(%cluster, old = old.epoch, new = epoch, "newer session replaces the older");
            let _ = old.close.send(Close::Superseded);
        }
        // A revocation between the check above and this session's registration found no
        // session to close: look again now that it is registered.
        if matches!(
            self.inner.store.certificate_allowed(&cluster, &serial).await,
            Ok(false)
        ) {
            self.inner.close_session(&cluster, Close::Revoked);
        }
        // Likewise a newer session on another replica whose notification came before this
        // one was registered: it found nothing to close here.
        if self.inner.replica.is_some()
            && let Ok(current) = self
                .inner
                .store
                .session_epochs(std::slice::from_ref(&cluster))
                .await
            && current.iter().any(|(_, e, _)| *e > epoch)
        {
            self.inner.close_session(&cluster, Close::Superseded);
        }
        tracing::info!(%cluster, epoch, last_agent_seq, agent = %hello.agent_version, "session started");
        let (tx, rx) = mpsc::channel(64);
        let ack = ServerMessage {
            seq: 0,
            body: Some(Down::HelloAck(HelloAck {
                epoch,
                last_agent_seq,
                heartbeat_seconds: self.inner.config.heartbeat.as_secs().max(1) as u32,
                store_id: self.inner.store_id.clone(),
            })),
        };
        tx.send(Ok(ack)).await.map_err(|_| Status::cancelled("closed"))?;
        tokio::spawn(session(
            self.inner.clone(),
            (cluster, epoch),
            inbound,
            tx,
            (closed, control_rx),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

impl Service {
    /// The cluster of the client certificate and its expiry, if the certificate is not
    /// revoked: checked before anything else of a session or renewal, so a revoked
    /// cluster's still-valid certificate gets nothing.
    async fn admitted<T>(&self, request: &Request<T>) -> Result<(String, i64, String), Status> {
        let cluster = cluster_of(request)?;
        let leaf = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.to_vec()))
            .unwrap_or_default();
        let serial = certificate_serial(&leaf)
            .ok_or_else(|| Status::unauthenticated("the client certificate cannot be read"))?;
        if !self
            .inner
            .store
            .certificate_allowed(&cluster, &serial)
            .await
            .map_err(internal)?
        {
            tracing::warn!(%cluster, %serial, "a revoked certificate was refused");
            return Err(Status::permission_denied(format!(
                "cluster {cluster:?} was revoked at the hub: its certificate is no longer accepted; \
                 to join again, enroll with a new token (`shapeblock-hub token create --cluster {cluster}`)"
            )));
        }
        Ok((cluster, proto::not_after(&leaf).unwrap_or(0), serial))
    }

    fn response(&self, cluster: &str, cert_pem: String) -> EnrollResponse {
        let not_after = rustls::pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .ok()
            .and_then(|d| proto::not_after(&d))
            .unwrap_or(0);
        EnrollResponse {
            cluster_id: cluster.to_string(),
            certificate_pem: cert_pem,
            ca_pem: self.inner.ca.cert_pem.clone(),
            not_after,
        }
    }
}

use rustls::pki_types::pem::PemObject;

/// Hands a live App log chunk to the caller waiting for it; one nobody here waits for (its
/// caller went, or a stop was lost) is stopped again. At most one stop per chunk, and the
/// agent's budget bounds the chunks.
fn relay_app_log(inner: &Inner, cluster: &str, epoch: u64, chunk: AppLogChunk) {
    let stall = (inner.config.watch_stall, Instant::now());
    if let Some(id) = inner.app_logs.relay(cluster, epoch, chunk, stall)
        && let Some(stopper) = inner.control(cluster, epoch)
    {
        let _ = stopper.try_send(Down::StopAppLogs(StopAppLogs { id }));
    }
}

/// What recording an agent message failed with, as the session's end: the agent's error if
/// the store found the message invalid, else the hub's.
fn recording_status(e: store::StoreError) -> Status {
    match e {
        store::StoreError::Invalid(m) => Status::invalid_argument(m),
        other => internal(other),
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    tracing::error!(%e, "hub store failed");
    Status::internal("hub store failed; see the hub's log")
}

/// One session: sends commands without a result (in order, after the previous session's),
/// heartbeats, and acks; records what the agent sends.
async fn session(
    inner: Arc<Inner>,
    (cluster, epoch): (String, u64),
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<ServerMessage, Status>>,
    (mut closed, mut control): (watch::Receiver<Close>, mpsc::Receiver<Down>),
) {
    let wake = inner.wake(&cluster);
    let mut stopping = inner.stopping.subscribe();
    let heartbeat = inner.config.heartbeat;
    let mut beat = tokio::time::interval(heartbeat);
    // Woken for commands only: on Postgres by a notification, on SQLite by `watch_queued`
    // for commands the CLI queued, and on both by `keep_up`'s look for what a wake-up missed.
    let mut last_heard = Instant::now();
    let mut sent_upto = 0u64;
    let mut pending_ack: Option<ServerMessage> = None;
    // Whether commands may be waiting: at the start, on a wake-up, and while the
    // last look found more than the outbound queue took. Not on every message from the agent:
    // a look per heartbeat was a query per agent per heartbeat for nothing.
    let mut look = true;
    // Whether the outbound queue was found full (a command or an ack left waiting): room
    // there wakes the session, not the next message or poll.
    let mut full = false;
    let reason: Status = loop {
        tokio::select! {
            _ = closed.changed() => match *closed.borrow() {
                Close::Revoked => break Status::permission_denied("cluster revoked at the hub: enroll again with a new token"),
                Close::Superseded | Close::Open => break Status::aborted("superseded by a newer session of this cluster"),
            },
            _ = stopping.changed() => break Status::unavailable("hub shutting down"),
            // Only with room: the session task is the one sender, so the try_send cannot fail.
            Some(body) = control.recv(), if tx.capacity() > 0 => {
                let _ = tx.try_send(Ok(ServerMessage { seq: 0, body: Some(body) }));
            }
            message = inbound.message() => match message {
                Ok(Some(AgentMessage { body: Some(Up::AppLog(chunk)), .. })) => {
                    last_heard = Instant::now();
                    relay_app_log(&inner, &cluster, epoch, chunk);
                }
                Ok(Some(message)) => {
                    last_heard = Instant::now();
                    // Log chunks that have already arrived behind this one are recorded with
                    // it, up to the first message of another kind (included); the stream's
                    // end, if it came among them, is seen after they are recorded.
                    let mut messages = vec![message];
                    let mut ended = None;
                    while messages.len() < LOG_BATCH && messages.last().is_some_and(batches) {
                        match inbound.message().now_or_never() {
                            Some(Ok(Some(AgentMessage { body: Some(Up::AppLog(chunk)), .. }))) => {
                                relay_app_log(&inner, &cluster, epoch, chunk);
                            }
                            Some(Ok(Some(next))) => messages.push(next),
                            Some(Ok(None)) => {
                                ended = Some(Status::cancelled("agent closed the stream"));
                                break;
                            }
                            Some(Err(status)) => {
                                ended = Some(status);
                                break;
                            }
                            None => break,
                        }
                    }
                    match handle(&inner, &cluster, epoch, messages).await {
                        // Acks are cumulative: never wait to send one (waiting could deadlock
                        // with an agent that waits for us to read); keep the latest instead.
                        Ok(Some(reply)) => pending_ack = Some(reply),
                        Ok(None) => {}
                        Err(status) => break status,
                    }
                    if let Some(status) = ended {
                        break status;
                    }
                }
                Ok(None) => break Status::cancelled("agent closed the stream"),
                Err(status) => break status,
            },
            _ = wake.notified() => look = true,
            // The permit goes back at once: the room is taken below.
            Ok(_room) = tx.reserve(), if full => full = false,
            _ = beat.tick() => {
                if last_heard.elapsed() > heartbeat * 3 {
                    tracing::warn!(%cluster, epoch, "no heartbeat for 3 intervals: closing the session");
                    break Status::unavailable("no heartbeat");
                }
                let hb = ServerMessage { seq: 0, body: Some(Down::Heartbeat(Heartbeat { sent_at_ms: now_ms() })) };
                if tx.try_send(Ok(hb)).is_err() { /* full: the stream is busy, which is liveness enough */ }
                inner.saw(&cluster, None);
            }
        }
        if let Some(ack) = pending_ack.take()
            && let Err(mpsc::error::TrySendError::Full(Ok(ack))) = tx.try_send(Ok(ack))
        {
            pending_ack = Some(ack);
            full = true;
        }
        if !look {
            continue;
        }
        // Send what is pending, as far as the outbound queue has room (bounded: a slow agent
        // holds commands in the store, not in memory).
        const BATCH: u32 = 32;
        match inner.store.pending_commands(&cluster, sent_upto, BATCH).await {
            Ok(rows) => {
                let sent_before = sent_upto;
                // All sent, and fewer than asked for: nothing is left until something queues.
                look = rows.len() as u32 == BATCH;
                for row in rows {
                    let Ok(permit) = tx.try_reserve() else {
                        look = true;
                        full = true;
                        break;
                    };
                    match ServerMessage::decode(row.body.as_slice()) {
                        Ok(mut message) => {
                            message.seq = row.seq;
                            permit.send(Ok(message));
                        }
                        Err(e) => tracing::error!(%e, seq = row.seq, "undecodable stored command"),
                    }
                    sent_upto = row.seq;
                }
                if sent_upto > sent_before
                    && let Err(e) = inner.store.mark_delivered(&cluster, sent_upto).await
                {
                    tracing::warn!(%e, "marking commands delivered");
                }
            }
            Err(e) => tracing::error!(%e, "reading commands"),
        }
    };
    tracing::info!(%cluster, epoch, reason = %reason.message(), "session ended");
    let said = reason.message().to_string();
    let _ = tx.try_send(Err(reason));
    {
        let mut sessions = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
        if sessions.get(&cluster).is_some_and(|s| s.epoch == epoch) {
            sessions.remove(&cluster);
        }
    }
    // After the session is gone from the map: a follower that registers from now on finds no
    // session, and one that registered before is ended here.
    inner.app_logs.session_ended(&cluster, epoch, &said);
    if let Err(e) = inner.store.end_session(&cluster, epoch, &said).await {
        tracing::warn!(%e, "end session");
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The phase an object gets at the hub when a complete snapshot no longer lists it.
pub const DELETED: &str = "Deleted";

/// What a snapshot changes in what the hub knows: the objects whose status differs, and, when
/// the snapshot is complete, every known object it does not list, marked [`DELETED`] (it
/// was deleted while the hub was not told: the agent or the hub was down, or the agent
/// restarted and its queue of phase changes with it).
fn snapshot_changes(known: &[ObjectStatus], snapshot: &StatusSnapshot) -> Vec<ObjectStatus> {
    let mut changes: Vec<ObjectStatus> = snapshot
        .objects
        .iter()
        .map(status_of)
        .filter(|status| !known.contains(status))
        .collect();
    if snapshot.complete {
        let listed: std::collections::HashSet<String> = snapshot
            .objects
            .iter()
            .map(|p| p.object.as_ref().map(object_key).unwrap_or_default())
            .collect();
        changes.extend(
            known
                .iter()
                .filter(|o| o.phase != DELETED && !listed.contains(&o.key))
                .map(|o| ObjectStatus {
                    key: o.key.clone(),
                    phase: DELETED.into(),
                    observed_generation: o.observed_generation,
                    reason: "NotInCluster".into(),
                    message:
                        "not in the agent's snapshot after a reconnect: deleted while the hub was not told"
                            .into(),
                }),
        );
    }
    changes
}

fn phase_event(cluster: &str, epoch: u64, status: &ObjectStatus) -> FeedEvent {
    FeedEvent {
        cluster: cluster.into(),
        kind: feed::PHASE.into(),
        epoch,
        object: status.key.clone(),
        phase: status.phase.clone(),
        reason: status.reason.clone(),
        message: status.message.clone(),
        ..Default::default()
    }
}

fn status_of(p: &PhaseChange) -> ObjectStatus {
    ObjectStatus {
        key: p.object.as_ref().map(object_key).unwrap_or_default(),
        phase: p.phase.clone(),
        observed_generation: p.observed_generation,
        reason: p.reason.clone(),
        message: p.message.clone(),
    }
}

/// What recording a sequenced agent message writes, given what the hub knows of the
/// cluster's objects (for phase changes and snapshots).
fn writes_of(
    cluster: &str,
    epoch: u64,
    known: &[ObjectStatus],
    body: &Up,
) -> Result<Vec<Write>, store::StoreError> {
    let event = |kind: &str, object: &str, detail: String| Write::Event {
        kind: kind.into(),
        object: object.into(),
        detail,
    };
    let mut writes = Vec::new();
    match body {
        Up::Result(r) => {
            let object = r.object.as_ref().map(object_key).unwrap_or_default();
            writes.push(Write::Result {
                command_seq: r.command_seq,
                ok: r.ok,
                message: r.message.clone(),
            });
            let detail = format!(
                "command {} {}: {}",
                r.command_seq,
                if r.ok { "ok" } else { "failed" },
                r.message
            );
            writes.push(event("result", &object, detail));
            writes.push(Write::Feed(FeedEvent {
                cluster: cluster.into(),
                kind: feed::RESULT.into(),
                epoch,
                object,
                message: r.message.clone(),
                command_seq: r.command_seq,
                ok: r.ok,
                ..Default::default()
            }));
        }
        Up::Phase(p) => {
            let status = status_of(p);
            if !known.contains(&status) {
                writes.push(event("phase", &status.key, status.phase.clone()));
                writes.push(Write::Feed(phase_event(cluster, epoch, &status)));
                writes.push(Write::Object(status));
            }
        }
        Up::Snapshot(s) => {
            // Level: whatever differs from what the hub knows becomes an event, so a phase
            // change lost to an agent restart still shows up once; and what a complete
            // snapshot does not list is gone.
            let mut changed = Vec::new();
            for status in snapshot_changes(known, s) {
                changed.push(format!("{}={}", status.key, status.phase));
                writes.push(Write::Feed(phase_event(cluster, epoch, &status)));
                writes.push(Write::Object(status));
            }
            if !changed.is_empty() {
                writes.push(event("snapshot", "", changed.join(" ")));
            }
        }
        Up::Log(l) => {
            let stream = proto::log_stream(l).map_err(store::StoreError::Invalid)?;
            writes.push(Write::Log(LogChunk {
                stream,
                offset: l.offset,
                data: l.data.clone(),
                truncated: l.truncated,
                eof: l.eof,
                kind: l.kind.clone(),
            }));
        }
        Up::Hello(_) | Up::Heartbeat(_) | Up::Ack(_) | Up::Inventory(_) | Up::AppLog(_) => {}
    }
    Ok(writes)
}

/// Most log chunks recorded in one transaction (32 KiB each at most: 2 MiB).
const LOG_BATCH: usize = 64;

/// Whether `message` is one that may be recorded together with others that arrived with it:
/// a log chunk. Not a phase change or snapshot: each of those is compared with what the
/// previous one recorded.
fn batches(message: &AgentMessage) -> bool {
    matches!(message.body, Some(Up::Log(_)))
}

/// Records agent messages (one, or several log chunks that arrived together, in one
/// transaction); the reply (an ack of the last) if any. An error ends the session, after what
/// came before the message it is about was recorded.
async fn handle(
    inner: &Inner,
    cluster: &str,
    epoch: u64,
    messages: Vec<AgentMessage>,
) -> Result<Option<ServerMessage>, Status> {
    let mut batch = Vec::with_capacity(messages.len());
    let mut refused = None;
    for message in messages {
        match prepare(inner, cluster, epoch, message).await {
            Ok(Some(sequenced)) => batch.push(sequenced),
            Ok(None) => {}
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    if !batch.is_empty() {
        let messages: Vec<(u64, &[Write])> = batch
            .iter()
            .map(|(seq, writes)| (*seq, writes.as_slice()))
            .collect();
        let recorded = inner
            .store
            .record_batch(cluster, epoch, &messages)
            .await
            .map_err(recording_status)?;
        if recorded == Recorded::Fenced {
            // A stale session's message (a newer session began, here or on another replica):
            // dropped unacked, and the session ends.
            tracing::info!(%cluster, epoch, seq = messages[0].0, "a fenced session's message was refused");
            return Err(Status::aborted("superseded by a newer session of this cluster"));
        }
    }
    if let Some(status) = refused {
        return Err(status);
    }
    Ok(batch.last().map(|(seq, _)| ServerMessage {
        seq: 0,
        body: Some(Down::Ack(Ack { seq: *seq })),
    }))
}

/// Checks one agent message and deals with it if it is not sequenced; a sequenced one's seq
/// and the writes recording it will make.
async fn prepare(
    inner: &Inner,
    cluster: &str,
    epoch: u64,
    message: AgentMessage,
) -> Result<Option<(u64, Vec<Write>)>, Status> {
    let seq = message.seq;
    let Some(body) = message.body else {
        return Err(Status::invalid_argument("message without a body"));
    };
    match &body {
        Up::Heartbeat(Heartbeat { sent_at_ms }) => {
            inner.saw(cluster, (*sent_at_ms > 0).then(|| now_ms() - sent_at_ms));
            return Ok(None);
        }
        Up::Inventory(inventory) => {
            inner
                .store
                .set_inventory(cluster, inventory)
                .await
                .map_err(internal)?;
            return Ok(None);
        }
        // Relayed by the session loop, never recorded.
        Up::Ack(_) | Up::AppLog(_) => return Ok(None),
        Up::Hello(_) => return Err(Status::invalid_argument("hello twice in one session")),
        _ if seq == 0 => return Err(Status::invalid_argument("sequenced message with seq 0")),
        _ => {}
    }
    // The store keeps numbers as SQLite integers (i64): larger ones are the agent's error,
    // not the store's (found by the fuzz targets below).
    const LIMIT: u64 = i64::MAX as u64;
    let too_large = |what: &str, n: u64| {
        Status::invalid_argument(format!("{what} {n} is out of range (at most {LIMIT})"))
    };
    if seq > LIMIT {
        return Err(too_large("seq", seq));
    }
    match &body {
        Up::Result(r) if r.command_seq > LIMIT => return Err(too_large("command seq", r.command_seq)),
        Up::Log(l) if l.offset.saturating_add(l.data.len() as u64) > LIMIT => {
            return Err(too_large("log offset", l.offset));
        }
        _ => {}
    }
    let store = &inner.store;
    // What the hub knows of the cluster's objects, for phase changes and snapshots only: a
    // log chunk must not cost a read of every object.
    let known = match &body {
        Up::Phase(_) | Up::Snapshot(_) => store.objects(cluster).await.map_err(internal)?,
        _ => Vec::new(),
    };
    let writes = writes_of(cluster, epoch, &known, &body).map_err(recording_status)?;
    Ok(Some((seq, writes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_connections_do_not_wait_for_acks_to_send() {
        use tokio_stream::StreamExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut accepted = incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let stream = accepted.next().await.unwrap().unwrap();
        assert!(stream.nodelay().unwrap(), "TCP_NODELAY on the hub's side");
    }

    fn object(kind: &str, namespace: &str, name: &str) -> ObjectRef {
        ObjectRef::new(kind, namespace, name)
    }

    #[test]
    fn commands_with_names_kubernetes_refuses_are_never_queued() {
        assert!(delete_command(object("App", "shop", "web")).is_ok());
        let refused = delete_command(object("App", "p/apps/x?", "web")).unwrap_err();
        assert!(
            refused
                .to_string()
                .contains("\"p/apps/x?\" is not a namespace name"),
            "{refused}"
        );
        assert!(delete_command(object("Project", "x", "p")).is_err());
        assert!(cancel_command("shop", "web-1").is_ok());
        assert!(cancel_command("shop", "../web-1").is_err());
        let app = |namespace: &str| {
            format!(
                "apiVersion: apps.shapeblock.io/v1alpha1\nkind: App\nmetadata:\n  name: web\n  namespace: {namespace}\n"
            )
        };
        assert!(apply_command(&app("shop")).is_ok());
        assert!(apply_command(&app("'a?b'")).is_err());
        let refused = sync_command(&[app("shop"), app("'a/b'")], None).unwrap_err();
        assert!(refused.to_string().starts_with("manifest 2: "), "{refused}");
    }

    fn phase(kind: &str, name: &str, phase: &str) -> PhaseChange {
        PhaseChange {
            object: Some(object(kind, if kind == "Project" { "" } else { "shop" }, name)),
            phase: phase.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_complete_snapshot_marks_what_it_does_not_list_deleted_and_a_partial_one_does_not() {
        let known: Vec<ObjectStatus> = [
            phase("Project", "shop", "Ready"),
            phase("App", "web", "Ready"),
            phase("App", "old", "Deleted"),
            phase("App", "gone", "Ready"),
        ]
        .iter()
        .map(status_of)
        .collect();
        let listed = vec![phase("Project", "shop", "Ready"), phase("App", "web", "Building")];
        let partial = snapshot_changes(
            &known,
            &StatusSnapshot {
                objects: listed.clone(),
                complete: false,
            },
        );
        assert_eq!(
            partial
                .iter()
                .map(|s| (s.key.as_str(), s.phase.as_str()))
                .collect::<Vec<_>>(),
            [("App/shop/web", "Building")]
        );
        let complete = snapshot_changes(
            &known,
            &StatusSnapshot {
                objects: listed,
                complete: true,
            },
        );
        assert_eq!(
            complete
                .iter()
                .map(|s| (s.key.as_str(), s.phase.as_str()))
                .collect::<Vec<_>>(),
            [("App/shop/web", "Building"), ("App/shop/gone", DELETED)],
            "an object marked once is not marked again"
        );
        assert_eq!(complete[1].reason, "NotInCluster");
        // Everything gone: all marked, once.
        let empty = StatusSnapshot {
            objects: vec![],
            complete: true,
        };
        assert_eq!(snapshot_changes(&known, &empty).len(), 3);
    }

    #[test]
    fn a_prune_is_queued_only_with_a_scope() {
        let manifests = [
            "apiVersion: apps.shapeblock.io/v1alpha1\nkind: Project\nmetadata:\n  name: shop\n".to_string(),
        ];
        let refused = sync_command(&manifests, Some(Prune::default())).unwrap_err();
        assert!(refused.to_string().contains("needs a scope"), "{refused}");
        let decode = |body: Vec<u8>| match ServerMessage::decode(body.as_slice()).unwrap().body {
            Some(Down::Sync(sync)) => sync,
            other => panic!("{other:?}"),
        };
        let plain = decode(sync_command(&manifests, None).unwrap());
        assert!(!plain.prune && plain.prune_scope.is_none());
        // The old flag stays off: an agent from before scopes prunes nothing on this.
        let scoped = decode(sync_command(&manifests, Some(Prune::projects(["shop"]))).unwrap());
        assert!(!scoped.prune && !scoped.force);
        assert_eq!(scoped.prune_scope.unwrap().projects, ["shop"]);
        let too_much = Prune {
            max_percent: 150,
            ..Prune::projects(["shop"])
        };
        assert!(sync_command(&manifests, Some(too_much)).is_err());
    }
}

/// Fuzz targets for the hub's decoding of every agent message, with a fixed case budget in the
/// default run (`SHAPEBLOCK_FUZZ_CASES` raises it for a longer run, e.g. 200000): arbitrary
/// bytes, and well-formed messages of every kind with hostile strings and numbers, go through
/// what a session does with a received message (decode, then [`handle`] against a real store).
/// Every one must end in a reply or a clean `Status` that is the agent's fault, never a
/// panic and never "hub store failed".
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use shapeblock_proto::v1::{Hello, Inventory, LogChunk};
    // The SQLite backend answers without waiting: its futures complete on the first poll.
    use futures::executor::block_on;
    use std::sync::LazyLock;

    pub(crate) fn cases() -> u32 {
        std::env::var("SHAPEBLOCK_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048)
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        inner: Inner,
        epoch: u64,
    }

    const CLUSTER: &str = "fuzz";

    static FIXTURE: LazyLock<Fixture> = LazyLock::new(|| {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("hub.sqlite")).unwrap();
        let store_id = block_on(store.id()).unwrap();
        let hello = Hello::default();
        let (epoch, _) = block_on(store.begin_session(CLUSTER, &hello)).unwrap();
        let ca = pki::Ca::load_or_create(dir.path()).unwrap();
        let (stopping, _) = watch::channel(false);
        let (close, _) = watch::channel(Close::Open);
        let inner = Inner {
            config: HubConfig::new(dir.path().to_path_buf()),
            store,
            store_id,
            ca,
            sessions: Mutex::new(HashMap::from([(
                CLUSTER.to_string(),
                Session {
                    epoch,
                    close,
                    capabilities: Vec::new(),
                    control: mpsc::channel(1).0,
                },
            )])),
            wake: Mutex::default(),
            seen: Mutex::default(),
            stopping,
            agent_url: "https://127.0.0.1:7443".into(),
            streams: api::Streams::default(),
            app_logs: api::app_logs::Registry::default(),
            routes: api::routed_logs::Routes::default(),
            replica: None,
        };
        Fixture {
            _dir: dir,
            inner,
            epoch,
        }
    });

    /// What a session does with one received message; Err is the Status the session ends with.
    fn receive(bytes: &[u8]) -> Result<(), Status> {
        let message = AgentMessage::decode(bytes).map_err(|e| Status::invalid_argument(e.to_string()))?;
        deliver(message)
    }

    fn deliver(message: AgentMessage) -> Result<(), Status> {
        let f = &*FIXTURE;
        block_on(handle(&f.inner, CLUSTER, f.epoch, vec![message])).map(drop)
    }

    fn clean(outcome: Result<(), Status>) -> Result<(), TestCaseError> {
        if let Err(status) = outcome {
            prop_assert!(
                matches!(status.code(), tonic::Code::InvalidArgument | tonic::Code::Aborted),
                "{:?}: {}",
                status.code(),
                status.message()
            );
            prop_assert!(status.message().len() < 2048, "a short reason");
        }
        // The store still answers.
        prop_assert!(block_on(FIXTURE.inner.store.objects(CLUSTER)).is_ok());
        Ok(())
    }

    fn hostile() -> BoxedStrategy<String> {
        prop_oneof![
            any::<String>(),
            Just(String::new()),
            Just("\0".to_string()),
            Just("Project//x".to_string()),
            Just("'; DROP TABLE objects; --".to_string()),
            Just("x".repeat(70_000)),
            "[a-z0-9/.-]{0,80}",
            proptest::sample::select(vec!["Project", "App", "AppBuild", "AppRun", "Team", "Deleted"])
                .prop_map(String::from),
        ]
        .boxed()
    }

    fn number() -> BoxedStrategy<u64> {
        prop_oneof![
            any::<u64>(),
            0..64u64,
            Just(i64::MAX as u64),
            Just(i64::MAX as u64 + 1),
            Just(u64::MAX)
        ]
        .boxed()
    }

    fn object() -> BoxedStrategy<Option<ObjectRef>> {
        proptest::option::of(
            (hostile(), hostile(), hostile()).prop_map(|(kind, namespace, name)| ObjectRef {
                kind,
                namespace,
                name,
            }),
        )
        .boxed()
    }

    fn phase() -> BoxedStrategy<PhaseChange> {
        (
            object(),
            hostile(),
            any::<i64>(),
            any::<i64>(),
            hostile(),
            hostile(),
        )
            .prop_map(
                |(object, phase, observed_generation, generation, reason, message)| PhaseChange {
                    object,
                    phase,
                    observed_generation,
                    generation,
                    reason,
                    message,
                },
            )
            .boxed()
    }

    fn inventory() -> BoxedStrategy<Inventory> {
        (hostile(), any::<u32>(), any::<u64>(), any::<u64>())
            .prop_map(|(v, n, c, m)| Inventory {
                kubernetes_version: v,
                node_count: n,
                allocatable_cpu_millis: c,
                allocatable_memory_bytes: m,
            })
            .boxed()
    }

    fn body() -> BoxedStrategy<Up> {
        prop_oneof![
            (
                hostile(),
                proptest::collection::vec(hostile(), 0..4),
                proptest::option::of(inventory())
            )
                .prop_map(|(agent_version, capabilities, inventory)| Up::Hello(Hello {
                    agent_version,
                    capabilities,
                    inventory
                })),
            any::<i64>().prop_map(|sent_at_ms| Up::Heartbeat(Heartbeat { sent_at_ms })),
            number().prop_map(|seq| Up::Ack(Ack { seq })),
            (number(), any::<bool>(), hostile(), object()).prop_map(|(command_seq, ok, message, object)| {
                Up::Result(shapeblock_proto::v1::CommandResult {
                    command_seq,
                    ok,
                    message,
                    object,
                })
            }),
            phase().prop_map(Up::Phase),
            (proptest::collection::vec(phase(), 0..6), any::<bool>())
                .prop_map(|(objects, complete)| Up::Snapshot(StatusSnapshot { objects, complete })),
            (
                hostile(),
                hostile(),
                hostile(),
                number(),
                proptest::collection::vec(any::<u8>(), 0..64),
                any::<bool>(),
                any::<bool>(),
                hostile()
            )
                .prop_map(
                    |(build, namespace, container, offset, data, eof, truncated, kind)| Up::Log(LogChunk {
                        build,
                        namespace,
                        container,
                        offset,
                        data,
                        eof,
                        truncated,
                        kind
                    })
                ),
            inventory().prop_map(Up::Inventory),
        ]
        .boxed()
    }

    /// Regression: the first crash the targets found. A seq (or command seq, or log end)
    /// above `i64::MAX` failed the SQLite write, and the session ended with `INTERNAL` "hub
    /// store failed" and an error in the hub's log, as if the store were broken.
    #[test]
    fn numbers_beyond_the_stores_range_are_the_agents_error_not_the_stores() {
        let huge = i64::MAX as u64 + 1;
        for message in [
            AgentMessage {
                seq: huge,
                body: Some(Up::Phase(PhaseChange::default())),
            },
            AgentMessage {
                seq: 1,
                body: Some(Up::Result(shapeblock_proto::v1::CommandResult {
                    command_seq: u64::MAX,
                    ..Default::default()
                })),
            },
            AgentMessage {
                seq: 1,
                body: Some(Up::Log(LogChunk {
                    offset: huge - 1,
                    data: vec![1, 2],
                    ..Default::default()
                })),
            },
        ] {
            let status = deliver(message).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(status.message().contains("out of range"), "{status:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_from_an_agent_end_in_a_reply_or_a_clean_status(
            bytes in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            clean(receive(&bytes))?;
        }

        #[test]
        fn well_formed_hostile_agent_messages_end_in_a_reply_or_a_clean_status(
            seq in number(),
            body in proptest::option::of(body()),
        ) {
            let message = AgentMessage { seq, body };
            // Both ways in: as the struct, and through the wire encoding.
            clean(receive(&message.encode_to_vec()))?;
        }
    }
}
