//! The server-facing API, `shapeblock.hub.v1` (`crates/proto/proto/shapeblock/hub/v1/hub.proto`):
//! what the product server and the hub's CLI drive the hub with. Its own listener, TLS with
//! the hub's CA-issued server certificate, and an API key on every call.
//!
//! Streams (events, log follows) read the store, never a copy in memory: a watcher holds at
//! most [`HubConfig::watch_buffer`](crate::HubConfig) events, and one that does not read them is
//! cut and resumes from the last id it got.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codegen::http;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use shapeblock_proto::v1::server_message::Body as Down;
use shapeblock_proto::{self as proto, MAX_MESSAGE_BYTES, hex, object_key};

use crate::store::{self, ApiKeyRow, ClusterRow, FeedEvent, Queued, StoreError, TokenRevoke, feed};
use crate::{Close, HubError, Inner, Prune, ServerMessage, Store};

/// The generated API: messages, `hub_server` and `hub_client`.
pub mod v1 {
    tonic::include_proto!("shapeblock.hub.v1");
}

pub(crate) mod app_logs;
pub(crate) mod routed_logs;

pub use app_logs::MAX_PER_CLUSTER as DEFAULT_APP_LOG_FOLLOWERS;
/// Live log chunks that wait in the database at most for one routed follow's caller.
pub use routed_logs::ROOM as ROUTED_LOG_ROOM;
mod client;
pub use client::{BearerKey, Client, ConnectError, connect};

use v1::hub_server::{Hub as HubApi, HubServer};

/// Events a watcher may have unread ([`crate::HubConfig::watch_buffer`]).
pub const DEFAULT_WATCH_BUFFER: usize = 1024;

/// How long a watcher may leave that many unread before it is cut.
pub const DEFAULT_WATCH_STALL: Duration = Duration::from_secs(10);

/// What API keys start with (so a leaked one is recognisable in a scan).
pub const API_KEY_PREFIX: &str = "sbk_";

/// The most a `ReadLog` returns, and what a `FollowLog` message carries.
const LOG_READ_LIMIT: usize = 1 << 20;
const LOG_FOLLOW_CHUNK: usize = 64 << 10;

/// The trailer of an OUT_OF_RANGE answer that names where reading can go on (an event id to
/// watch after, a log offset to read from): what retention pruned lies before it.
pub const RESUME_FROM: &str = "shapeblock-resume-from";

/// How often streams look at the store when nothing in this process said it changed.
const POLL: Duration = Duration::from_millis(500);

/// How long a watcher lets commits gather before it reads them.
const COALESCE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Internal(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        match e {
            ApiError::Unauthenticated(m) => Status::unauthenticated(m),
            ApiError::InvalidArgument(m) => Status::invalid_argument(m),
            ApiError::NotFound(m) => Status::not_found(m),
            ApiError::FailedPrecondition(m) => Status::failed_precondition(m),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "API call failed");
                Status::internal("the hub failed; see its log")
            }
            ApiError::Store(StoreError::Invalid(m)) => Status::invalid_argument(m),
            ApiError::Store(StoreError::Conflict(m)) => Status::failed_precondition(m),
            ApiError::Store(StoreError::Pruned { message, resume }) => {
                let mut status = Status::out_of_range(message);
                status
                    .metadata_mut()
                    .insert(RESUME_FROM, tonic::metadata::MetadataValue::from(resume));
                status
            }
            ApiError::Store(
                e @ (StoreError::Sql(_)
                | StoreError::Postgres(_)
                | StoreError::Pool(_)
                | StoreError::Config(_)),
            ) => {
                tracing::error!(error = %e, "API call: hub store failed");
                Status::internal("hub store failed; see the hub's log")
            }
        }
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        match e {
            HubError::Invalid(m) => ApiError::InvalidArgument(m),
            HubError::Store(e) => ApiError::Store(e),
            HubError::Pki(e) => ApiError::Internal(e.to_string()),
            HubError::Listen { addr, source } => ApiError::Internal(format!("listen on {addr}: {source}")),
        }
    }
}

type ApiResult<T> = Result<Response<T>, Status>;

/// How many API streams are being served, for `GetHub` (and to show that a watcher that
/// went left nothing behind).
#[derive(Default)]
pub(crate) struct Streams {
    watchers: std::sync::atomic::AtomicU32,
    followers: std::sync::atomic::AtomicU32,
    app_log_followers: std::sync::atomic::AtomicU32,
}

/// Counts one stream while its task lives.
struct Counted<'a>(&'a std::sync::atomic::AtomicU32);

impl<'a> Counted<'a> {
    fn new(counter: &'a std::sync::atomic::AtomicU32) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn random_hex(n: usize) -> Result<String, HubError> {
    let mut bytes = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| HubError::Invalid("no system randomness".into()))?;
    Ok(hex(&bytes))
}

/// Creates an API key named `name`: the stored row and the key (shown once; only its SHA-256
/// is kept). 32 random bytes: a plain hash is enough, nobody can guess one to match.
pub async fn create_api_key(store: &Store, name: &str) -> Result<(ApiKeyRow, String), HubError> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 64 || name.chars().any(char::is_control) {
        return Err(HubError::Invalid(
            "an API key needs a name of 1-64 printable characters".into(),
        ));
    }
    let secret = format!("{API_KEY_PREFIX}{}", random_hex(32)?);
    let row = store
        .add_api_key(&random_hex(8)?, name, &sha256_hex(secret.as_bytes()))
        .await?;
    Ok((row, secret))
}

/// Starts serving the API on `listener`; its address and the server's task.
pub(crate) fn serve(
    inner: Arc<Inner>,
    listener: tokio::net::TcpListener,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), HubError> {
    let addr = listener
        .local_addr()
        .map_err(|e| HubError::Invalid(format!("API listener: {e}")))?;
    let tls = ServerTlsConfig::new().identity(Identity::from_pem(cert_pem, key_pem));
    // Above the manifest limit, so a manifest that is too large gets the hub's reason rather
    // than the transport's.
    let service = HubServer::new(Api { inner: inner.clone() })
        .max_decoding_message_size(MAX_MESSAGE_BYTES * 2)
        .max_encoding_message_size(MAX_MESSAGE_BYTES * 2);
    let service = Auth {
        service,
        inner: inner.clone(),
    };
    let router = Server::builder()
        .tls_config(tls)
        .map_err(|e| HubError::Invalid(format!("API TLS configuration: {e}")))?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service);
    let mut stop = inner.stopping.subscribe();
    let task = tokio::spawn(async move {
        let signal = async move {
            let _ = stop.changed().await;
        };
        if let Err(err) = router
            .serve_with_incoming_shutdown(crate::incoming(listener), signal)
            .await
        {
            tracing::error!(%err, "hub API server failed");
        }
    });
    tracing::info!(%addr, "hub API listening");
    Ok((addr, task))
}

/// Every call needs a valid key: `authorization: Bearer <key>`. A service around the API's
/// rather than an interceptor: the key is looked up in the store, which may wait on the
/// network (Postgres), and interceptors cannot wait.
#[derive(Clone)]
struct Auth<S> {
    service: S,
    inner: Arc<Inner>,
}

impl<S: tonic::server::NamedService> tonic::server::NamedService for Auth<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for Auth<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.service.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The clone that was made ready serves this call; the fresh one waits for the next.
        let fresh = self.service.clone();
        let mut service = std::mem::replace(&mut self.service, fresh);
        let inner = self.inner.clone();
        Box::pin(async move {
            match authorized(&inner, request.headers()).await {
                Ok(()) => service.call(request).await,
                Err(e) => Ok(Status::from(e).into_http()),
            }
        })
    }
}

async fn authorized(inner: &Inner, headers: &http::HeaderMap) -> Result<(), ApiError> {
    let header = headers.get("authorization").ok_or_else(|| {
        ApiError::Unauthenticated("an API key is required: authorization: Bearer <key>".into())
    })?;
    let key = header
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .ok_or_else(|| ApiError::Unauthenticated("the authorization header must be `Bearer <key>`".into()))?;
    match inner.store.valid_api_key(&sha256_hex(key.as_bytes())).await? {
        Some(_) => Ok(()),
        None => Err(ApiError::Unauthenticated("unknown or revoked API key".into())),
    }
}

struct Api {
    inner: Arc<Inner>,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

impl Api {
    fn store(&self) -> &Store {
        &self.inner.store
    }

    async fn known(&self, cluster: &str) -> Result<ClusterRow, ApiError> {
        self.store()
            .cluster(cluster)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no cluster {} at this hub", proto::shown(cluster))))
    }

    /// Queues `body` for a known cluster, once per idempotency key.
    async fn queue(
        &self,
        cluster: &str,
        body: Vec<u8>,
        kind: &str,
        object: &str,
        idempotency_key: &str,
    ) -> Result<v1::CommandAccepted, ApiError> {
        self.known(cluster).await?;
        let key = idempotency_key.trim();
        if key.len() > 200 {
            return Err(ApiError::InvalidArgument(
                "an idempotency key has at most 200 bytes".into(),
            ));
        }
        let digest = sha256_hex(&body);
        let queued = Queued {
            cluster,
            body: &body,
            kind,
            object,
            idempotency: (!key.is_empty()).then_some((key, digest.as_str())),
        };
        let (seq, replayed) = self.store().add_command_once(&queued).await?;
        if !replayed {
            self.inner.wake(cluster).notify_one();
        }
        Ok(v1::CommandAccepted {
            cluster_id: cluster.into(),
            command_id: seq,
            replayed,
        })
    }
}

fn api_key(row: ApiKeyRow) -> v1::ApiKey {
    v1::ApiKey {
        id: row.id,
        name: row.name,
        created_at: row.created_at,
        revoked_at: row.revoked_at.unwrap_or(0),
    }
}

fn cluster(row: ClusterRow) -> v1::Cluster {
    v1::Cluster {
        id: row.id,
        connected: row.connected,
        session_epoch: row.epoch,
        agent_version: row.agent_version.unwrap_or_default(),
        capabilities: row.capabilities,
        inventory: row.inventory.map(|i| v1::Inventory {
            kubernetes_version: i.kubernetes_version,
            node_count: i.node_count,
            allocatable_cpu_millis: i.allocatable_cpu_millis,
            allocatable_memory_bytes: i.allocatable_memory_bytes,
            received_at: i.received_at,
        }),
        last_heartbeat: row.last_seen,
        certificate_not_after: row.cert_not_after,
        revoked: row.revoked,
        clock_skew_ms: row.clock_skew_ms,
    }
}

fn object_ref(key: &str) -> v1::ObjectRef {
    let mut parts = key.splitn(3, '/');
    let mut next = || parts.next().unwrap_or_default().to_string();
    v1::ObjectRef {
        kind: next(),
        namespace: next(),
        name: next(),
    }
}

fn event_kind(kind: &str) -> v1::EventKind {
    use v1::EventKind as K;
    match kind {
        feed::PHASE => K::Phase,
        feed::RESULT => K::CommandResult,
        feed::QUEUED => K::CommandQueued,
        feed::SESSION_UP => K::SessionUp,
        feed::SESSION_DOWN => K::SessionDown,
        feed::LOG_OPENED => K::LogOpened,
        feed::LOG_ENDED => K::LogEnded,
        feed::LOG_GAP => K::LogGap,
        feed::REVOKED => K::ClusterRevoked,
        _ => K::Unspecified,
    }
}

fn event(e: FeedEvent) -> v1::Event {
    v1::Event {
        id: e.id,
        cluster_id: e.cluster,
        kind: event_kind(&e.kind) as i32,
        at_ms: e.at_ms,
        epoch: e.epoch,
        object: e.object,
        phase: e.phase,
        reason: e.reason,
        message: e.message,
        command_id: e.command_seq,
        ok: e.ok,
        truncated: e.truncated,
    }
}

/// A stored command's kind and the object it names: never more (a set-config's values stay
/// in the store until the agent confirms, then they are gone).
fn describe(body: &[u8]) -> (&'static str, String) {
    match ServerMessage::decode(body).ok().and_then(|m| m.body) {
        Some(Down::Apply(a)) => (
            "apply",
            proto::check_manifest(&a.manifest)
                .map(|(o, _)| object_key(&o))
                .unwrap_or_default(),
        ),
        Some(Down::Delete(d)) => ("delete", d.object.as_ref().map(object_key).unwrap_or_default()),
        Some(Down::Sync(_)) => ("sync", String::new()),
        Some(Down::SetConfig(c)) => ("set-config", format!("App/{}/{}", c.namespace, c.app)),
        Some(Down::CancelBuild(c)) => ("cancel", format!("AppBuild/{}/{}", c.namespace, c.build)),
        _ => ("other", String::new()),
    }
}

fn log_data(read: store::LogRead) -> v1::LogData {
    v1::LogData {
        offset: read.offset,
        data: read.data,
        next_offset: read.next_offset,
        truncated: read.truncated,
        eof: read.eof,
        first_offset: read.first_offset,
    }
}

#[tonic::async_trait]
impl HubApi for Api {
    async fn get_hub(&self, _: Request<v1::GetHubRequest>) -> ApiResult<v1::HubInfo> {
        use std::sync::atomic::Ordering::Relaxed;
        let sessions = self
            .inner
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        Ok(Response::new(v1::HubInfo {
            version: env!("CARGO_PKG_VERSION").into(),
            ca_hash: proto::ca_hash(&self.inner.ca.cert_der),
            agent_address: self.inner.agent_url.clone(),
            store_id: self.inner.store_id.clone(),
            watchers: self.inner.streams.watchers.load(Relaxed),
            log_followers: self.inner.streams.followers.load(Relaxed),
            sessions: sessions as u32,
            app_log_followers: self.inner.streams.app_log_followers.load(Relaxed),
            replica_id: self
                .inner
                .replica
                .as_ref()
                .map(|r| r.id.clone())
                .unwrap_or_default(),
        }))
    }

    async fn create_api_key(
        &self,
        request: Request<v1::CreateApiKeyRequest>,
    ) -> ApiResult<v1::CreateApiKeyResponse> {
        let (row, secret) = create_api_key(self.store(), &request.into_inner().name)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(id = %row.id, name = %row.name, "API key created");
        Ok(Response::new(v1::CreateApiKeyResponse {
            key: Some(api_key(row)),
            secret,
        }))
    }

    async fn list_api_keys(&self, _: Request<v1::ListApiKeysRequest>) -> ApiResult<v1::ListApiKeysResponse> {
        let keys = self.store().api_keys().await.map_err(ApiError::from)?;
        Ok(Response::new(v1::ListApiKeysResponse {
            keys: keys.into_iter().map(api_key).collect(),
        }))
    }

    async fn revoke_api_key(
        &self,
        request: Request<v1::RevokeApiKeyRequest>,
    ) -> ApiResult<v1::RevokeApiKeyResponse> {
        let id = request.into_inner().id;
        let row = self
            .store()
            .revoke_api_key(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::NotFound(format!("no API key {}", proto::shown(&id))))?;
        tracing::info!(id = %row.id, name = %row.name, "API key revoked");
        Ok(Response::new(v1::RevokeApiKeyResponse {
            key: Some(api_key(row)),
        }))
    }

    async fn create_enrollment_token(
        &self,
        request: Request<v1::CreateEnrollmentTokenRequest>,
    ) -> ApiResult<v1::CreateEnrollmentTokenResponse> {
        let r = request.into_inner();
        let ttl = match r.ttl_seconds {
            0 => 3600,
            n if n > 30 * 86400 => {
                return Err(ApiError::InvalidArgument("a token is valid for at most 30 days".into()).into());
            }
            n => n,
        };
        let secret = crate::create_token(self.store(), &r.cluster_id, Duration::from_secs(ttl))
            .await
            .map_err(ApiError::from)?;
        let or = |value: String, default: &str| {
            if value.is_empty() {
                default.to_string()
            } else {
                value
            }
        };
        let install_line = crate::cli::install_line(
            &or(r.chart, crate::cli::INSTALL_CHART),
            &or(r.namespace, "shapeblock"),
            &secret,
            &or(r.hub_address, &self.inner.agent_url),
            &proto::ca_hash(&self.inner.ca.cert_der),
        );
        let id = crate::token_hash(&secret);
        let token = self
            .store()
            .token(&id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| ApiError::Internal("a token just created is not in the store".into()))?;
        tracing::info!(cluster = %r.cluster_id, "enrollment token created");
        Ok(Response::new(v1::CreateEnrollmentTokenResponse {
            token: Some(v1::EnrollmentToken {
                id,
                cluster_id: token.cluster,
                expires_at: token.expires_at,
                used: false,
            }),
            secret,
            install_line,
        }))
    }

    async fn list_enrollment_tokens(
        &self,
        request: Request<v1::ListEnrollmentTokensRequest>,
    ) -> ApiResult<v1::ListEnrollmentTokensResponse> {
        let cluster = request.into_inner().cluster_id;
        let filter = (!cluster.is_empty()).then_some(cluster.as_str());
        let tokens = self.store().tokens(filter).await.map_err(ApiError::from)?;
        Ok(Response::new(v1::ListEnrollmentTokensResponse {
            tokens: tokens
                .into_iter()
                .map(|(id, t)| v1::EnrollmentToken {
                    id,
                    cluster_id: t.cluster,
                    expires_at: t.expires_at,
                    used: t.bound_key.is_some(),
                })
                .collect(),
        }))
    }

    async fn revoke_enrollment_token(
        &self,
        request: Request<v1::RevokeEnrollmentTokenRequest>,
    ) -> ApiResult<v1::RevokeEnrollmentTokenResponse> {
        let id = request.into_inner().id;
        match self.store().revoke_token(&id).await.map_err(ApiError::from)? {
            TokenRevoke::Revoked => Ok(Response::new(v1::RevokeEnrollmentTokenResponse {})),
            TokenRevoke::Used => Err(ApiError::FailedPrecondition(
                "this token was used already: revoke the cluster instead".into(),
            )
            .into()),
            TokenRevoke::Unknown => Err(ApiError::NotFound(format!("no token {}", proto::shown(&id))).into()),
        }
    }

    async fn list_clusters(
        &self,
        _: Request<v1::ListClustersRequest>,
    ) -> ApiResult<v1::ListClustersResponse> {
        let rows = self.store().clusters().await.map_err(ApiError::from)?;
        Ok(Response::new(v1::ListClustersResponse {
            clusters: rows.into_iter().map(cluster).collect(),
        }))
    }

    async fn get_cluster(&self, request: Request<v1::GetClusterRequest>) -> ApiResult<v1::Cluster> {
        Ok(Response::new(cluster(
            self.known(&request.into_inner().cluster_id).await?,
        )))
    }

    async fn revoke_cluster(&self, request: Request<v1::RevokeClusterRequest>) -> ApiResult<v1::Cluster> {
        let id = request.into_inner().cluster_id;
        self.known(&id).await?;
        if !self.store().revoke_cluster(&id).await.map_err(ApiError::from)? {
            return Err(ApiError::NotFound(format!("no cluster {}", proto::shown(&id))).into());
        }
        self.inner.close_session(&id, Close::Revoked);
        tracing::warn!(cluster = %id, "cluster revoked");
        Ok(Response::new(cluster(self.known(&id).await?)))
    }

    async fn apply(&self, request: Request<v1::ApplyRequest>) -> ApiResult<v1::CommandAccepted> {
        let r = request.into_inner();
        let body = crate::apply_command(&r.manifest).map_err(ApiError::from)?;
        let object = proto::check_manifest(&r.manifest)
            .map(|(o, _)| object_key(&o))
            .unwrap_or_default();
        Ok(Response::new(
            self.queue(&r.cluster_id, body, "apply", &object, &r.idempotency_key)
                .await?,
        ))
    }

    async fn delete(&self, request: Request<v1::DeleteRequest>) -> ApiResult<v1::CommandAccepted> {
        let r = request.into_inner();
        let o = r
            .object
            .ok_or_else(|| ApiError::InvalidArgument("object is required".into()))?;
        let object = proto::v1::ObjectRef {
            kind: o.kind,
            namespace: o.namespace,
            name: o.name,
        };
        let key = object_key(&object);
        let body = crate::delete_command(object).map_err(ApiError::from)?;
        Ok(Response::new(
            self.queue(&r.cluster_id, body, "delete", &key, &r.idempotency_key)
                .await?,
        ))
    }

    async fn sync(&self, request: Request<v1::SyncRequest>) -> ApiResult<v1::CommandAccepted> {
        let r = request.into_inner();
        let prune = r.prune.map(|scope| Prune {
            scope: proto::v1::PruneScope {
                projects: scope.projects,
                kinds: scope.kinds,
                namespaces: scope.namespaces,
            },
            max_percent: r.prune_max_percent,
            force: r.force,
        });
        let body = crate::sync_command(&r.manifests, prune).map_err(ApiError::from)?;
        Ok(Response::new(
            self.queue(&r.cluster_id, body, "sync", "", &r.idempotency_key)
                .await?,
        ))
    }

    async fn set_config(&self, request: Request<v1::SetConfigRequest>) -> ApiResult<v1::CommandAccepted> {
        let r = request.into_inner();
        let object = format!("App/{}/{}", r.namespace, r.app);
        let command = proto::v1::SetConfig {
            namespace: r.namespace,
            app: r.app,
            set: r.set,
            unset: r.unset,
        };
        let body = crate::set_config_command(command).map_err(ApiError::from)?;
        Ok(Response::new(
            self.queue(&r.cluster_id, body, "set-config", &object, &r.idempotency_key)
                .await?,
        ))
    }

    async fn cancel_build(&self, request: Request<v1::CancelBuildRequest>) -> ApiResult<v1::CommandAccepted> {
        let r = request.into_inner();
        let body = crate::cancel_command(&r.namespace, &r.build).map_err(ApiError::from)?;
        let object = format!("AppBuild/{}/{}", r.namespace, r.build);
        Ok(Response::new(
            self.queue(&r.cluster_id, body, "cancel", &object, &r.idempotency_key)
                .await?,
        ))
    }

    async fn get_command(&self, request: Request<v1::GetCommandRequest>) -> ApiResult<v1::Command> {
        let r = request.into_inner();
        self.known(&r.cluster_id).await?;
        let row = self
            .store()
            .command(&r.cluster_id, r.command_id)
            .await
            .map_err(ApiError::from)?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "no command {} for cluster {}",
                    r.command_id, r.cluster_id
                ))
            })?;
        let (kind, object) = describe(&row.body);
        let state = match (row.done, row.ok) {
            (true, Some(true)) => v1::CommandState::Succeeded,
            (true, _) => v1::CommandState::Failed,
            (false, _) if row.delivered => v1::CommandState::Delivered,
            (false, _) => v1::CommandState::Queued,
        };
        Ok(Response::new(v1::Command {
            cluster_id: r.cluster_id,
            command_id: row.seq,
            kind: kind.into(),
            object,
            state: state as i32,
            message: row.message.unwrap_or_default(),
            created_at: row.created_at,
        }))
    }

    type WatchEventsStream = Stream<v1::Event>;

    async fn watch_events(
        &self,
        request: Request<v1::WatchEventsRequest>,
    ) -> ApiResult<Self::WatchEventsStream> {
        let r = request.into_inner();
        let cluster = if r.cluster_id.is_empty() {
            None
        } else {
            self.known(&r.cluster_id).await?;
            Some(r.cluster_id)
        };
        let buffer = self.inner.config.watch_buffer.max(1);
        // One slot more than the bound: the status that cuts a slow watcher must fit.
        let (tx, rx) = mpsc::channel(buffer + 1);
        let stall = self.inner.config.watch_stall;
        tokio::spawn(watch(
            self.inner.clone(),
            cluster,
            r.after_id,
            (buffer, stall),
            tx,
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn list_objects(
        &self,
        request: Request<v1::ListObjectsRequest>,
    ) -> ApiResult<v1::ListObjectsResponse> {
        let id = request.into_inner().cluster_id;
        self.known(&id).await?;
        let objects = self.store().objects(&id).await.map_err(ApiError::from)?;
        Ok(Response::new(v1::ListObjectsResponse {
            objects: objects
                .into_iter()
                .map(|o| v1::ObjectStatus {
                    object: Some(object_ref(&o.key)),
                    key: o.key,
                    phase: o.phase,
                    observed_generation: o.observed_generation,
                    reason: o.reason,
                    message: o.message,
                })
                .collect(),
        }))
    }

    async fn list_logs(&self, request: Request<v1::ListLogsRequest>) -> ApiResult<v1::ListLogsResponse> {
        let id = request.into_inner().cluster_id;
        self.known(&id).await?;
        let streams = self.store().log_streams(&id).await.map_err(ApiError::from)?;
        Ok(Response::new(v1::ListLogsResponse {
            streams: streams
                .into_iter()
                .map(|s| v1::LogStream {
                    stream: s.stream,
                    length: s.length,
                    first_offset: s.first_offset,
                    ended: s.ended,
                    truncated: s.truncated,
                })
                .collect(),
        }))
    }

    async fn read_log(&self, request: Request<v1::ReadLogRequest>) -> ApiResult<v1::LogData> {
        let r = request.into_inner();
        self.known(&r.cluster_id).await?;
        let limit = match r.limit as usize {
            0 => LOG_READ_LIMIT,
            n => n.min(LOG_READ_LIMIT),
        };
        let read = self
            .store()
            .read_log(&r.cluster_id, &r.stream, r.offset, limit)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(log_data(read)))
    }

    type FollowLogStream = Stream<v1::LogData>;

    async fn follow_log(&self, request: Request<v1::FollowLogRequest>) -> ApiResult<Self::FollowLogStream> {
        let r = request.into_inner();
        self.known(&r.cluster_id).await?;
        // Sent with backpressure: a slow reader slows its own reads of the store, no more.
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(follow(self.inner.clone(), r.cluster_id, r.stream, r.offset, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FollowAppLogsStream = Stream<v1::AppLogData>;

    async fn follow_app_logs(
        &self,
        request: Request<v1::FollowAppLogsRequest>,
    ) -> ApiResult<Self::FollowAppLogsStream> {
        let deadline = app_logs::deadline(request.metadata());
        let r = request.into_inner();
        let start = proto::v1::StartAppLogs {
            id: 0,
            namespace: r.namespace,
            app: r.app,
            process: r.process,
            container: r.container,
            since_seconds: r.since_seconds,
            tail_lines: r.tail_lines,
        };
        // Checked before anything else: these names become a label selector at the agent.
        proto::check_app_logs(&start).map_err(ApiError::InvalidArgument)?;
        self.known(&r.cluster_id).await?;
        // Live logs come over the live session: if another replica holds it, the follow is
        // routed to it through the database.
        if let Some(me) = self.inner.replica.as_ref()
            && self.inner.control(&r.cluster_id, 0).is_none()
            && let Some(holder) = self
                .store()
                .session_replica(&r.cluster_id)
                .await
                .map_err(ApiError::from)?
            && holder != me.id
        {
            let rx = routed_logs::follow(&self.inner, &r.cluster_id, start, deadline, &holder).await?;
            return Ok(Response::new(Box::pin(ReceiverStream::new(rx))));
        }
        let rx = app_logs::start(&self.inner, &r.cluster_id, start, deadline)?;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Feeds one watcher from the store: what was recorded after `after`, then what is recorded
/// while it stays. Ends when the watcher goes, the hub stops, or the watcher leaves `buffer`
/// events unread for `stall` (then with RESOURCE_EXHAUSTED, after the last event it can
/// resume from).
async fn watch(
    inner: Arc<Inner>,
    cluster: Option<String>,
    mut after: u64,
    (buffer, stall): (usize, Duration),
    tx: mpsc::Sender<Result<v1::Event, Status>>,
) {
    let _counted = Counted::new(&inner.streams.watchers);
    let mut tick = inner.store.subscribe();
    let mut stopping = inner.stopping.subscribe();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Mark what is seen before reading: a commit after the read changes the tick again.
        tick.borrow_and_update();
        loop {
            let batch = match inner.store.feed_resume(cluster.as_deref(), after, 256).await {
                Ok(batch) => batch,
                Err(e) => {
                    let _ = tx.try_send(Err(ApiError::Store(e).into()));
                    return;
                }
            };
            if batch.is_empty() {
                break;
            }
            for e in batch {
                // Two free slots: one for the event, one kept for the status that may cut
                // the watcher later. A watcher catching up is waited for; one that leaves
                // `buffer` events unread for `stall` is slow.
                let permits = tokio::select! {
                    permits = tokio::time::timeout(stall, tx.reserve_many(2)) => permits,
                    _ = stopping.changed() => {
                        let _ = tx.try_send(Err(Status::unavailable("hub shutting down: watch again from the last id received")));
                        return;
                    }
                };
                match permits {
                    Ok(Ok(mut permits)) => {
                        let id = e.id;
                        if let Some(permit) = permits.next() {
                            permit.send(Ok(event(e)));
                        }
                        after = id;
                    }
                    Ok(Err(_)) => return,
                    Err(_) => {
                        let status = Status::resource_exhausted(format!(
                            "this watcher left {buffer} events unread for {} ms, the most the hub holds for one: \
                             it was cut; watch again with after_id set to the last id received ({after})",
                            stall.as_millis()
                        ));
                        let _ = tx.try_send(Err(status));
                        tracing::info!(after, "slow watcher cut");
                        return;
                    }
                }
            }
        }
        tokio::select! {
            _ = tick.changed() => {
                // Commits come in bursts (a build's log, a snapshot): one read for a burst,
                // not one per commit per watcher, keeps many watchers off the writers' lock.
                tokio::time::sleep(COALESCE).await;
            }
            _ = poll.tick() => {}
            _ = tx.closed() => return,
            _ = stopping.changed() => {
                let _ = tx.try_send(Err(Status::unavailable("hub shutting down: watch again from the last id received")));
                return;
            }
        }
    }
}

/// Sends a log from `offset` as it grows, until it ends or the reader goes.
async fn follow(
    inner: Arc<Inner>,
    cluster: String,
    stream: String,
    mut offset: u64,
    tx: mpsc::Sender<Result<v1::LogData, Status>>,
) {
    let _counted = Counted::new(&inner.streams.followers);
    let mut tick = inner.store.subscribe();
    let mut stopping = inner.stopping.subscribe();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.borrow_and_update();
        let read = match inner
            .store
            .read_log(&cluster, &stream, offset, LOG_FOLLOW_CHUNK)
            .await
        {
            Ok(read) => read,
            Err(e) => {
                let _ = tx.send(Err(ApiError::Store(e).into())).await;
                return;
            }
        };
        let full = read.data.len() == LOG_FOLLOW_CHUNK;
        let moved = read.next_offset != offset;
        let eof = read.eof;
        offset = read.next_offset;
        if (moved || read.truncated || eof) && tx.send(Ok(log_data(read))).await.is_err() {
            return;
        }
        if eof {
            return;
        }
        if full || moved {
            continue;
        }
        tokio::select! {
            _ = tick.changed() => {}
            _ = poll.tick() => {}
            _ = tx.closed() => return,
            _ = stopping.changed() => {
                let _ = tx.send(Err(Status::unavailable("hub shutting down: follow again from the last offset"))).await;
                return;
            }
        }
    }
}
