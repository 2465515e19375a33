//! Wiring of the running agent: telemetry, the HTTP endpoints (`/healthz`, `/readyz`,
//! `/metrics`), the controllers, and graceful shutdown. No business logic lives here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use prometheus_client::metrics::gauge::Gauge;

use crate::controllers::{self, Context, metrics::Metrics};

/// Settings of `shapeblock-agent run`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub kubeconfig: Option<std::path::PathBuf>,
    /// See [`crate::kube_client`]; `false`: kube's own HTTP/1.1 client.
    pub apiserver_http2: bool,
    pub http_addr: SocketAddr,
    pub shutdown_timeout: Duration,
    pub controllers: controllers::Config,
    /// The tunnel to the hub; `None`: no hub configured, the agent only reconciles.
    pub tunnel: Option<TunnelSettings>,
    /// Lease-based leader election; `None`: this process leads unconditionally.
    pub leader_election: Option<crate::leader::LeaderConfig>,
    /// Server-side apply the ShapeBlock CRDs on becoming leader.
    pub apply_crds: bool,
}

/// Settings of the tunnel (`--hub-address` and friends).
#[derive(Clone, Debug)]
pub struct TunnelSettings {
    pub config: crate::tunnel::TunnelConfig,
    /// Secret in the agent's namespace that keeps the key, certificate and CA.
    pub identity_secret: String,
    /// Bytes per second each live App log follow may send.
    pub app_logs_rate: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load the Kubernetes configuration: {0}")]
    Config(String),
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Leadership(#[from] crate::leader::LeaderError),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A future that resolves once shutdown starts, cloneable for every task that must stop.
pub type ShutdownSignal = Shared<BoxFuture<'static, ()>>;

/// Resolves on SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> ShutdownSignal {
    async {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(err) => {
                    tracing::error!(%err, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await
                }
            }
        };
        tokio::select! {
            _ = terminate => tracing::info!("SIGTERM received: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received: shutting down"),
        }
    }
    .boxed()
    .shared()
}

/// Runs the agent until `shutdown`, then stops watches and waits (at most
/// `settings.shutdown_timeout`) for in-flight reconciles.
///
/// With leader election, `/healthz` and `/readyz` are served from the start, but the CRDs,
/// the controllers and the tunnel start only once this replica holds the Lease. Losing it ends
/// the process with [`Error::Leadership`], so that the Pod restarts as a standby instead of
/// running on next to a new leader.
pub async fn run(settings: Settings, shutdown: ShutdownSignal) -> Result<(), Error> {
    let client = client(&settings).await?;
    let version = client.apiserver_version().await?;
    tracing::info!(kubernetes = %version.git_version, "connected to the Kubernetes API");

    let mut metrics = Metrics::default();
    let leading = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    let helm_charts_served = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
    metrics.registry.register(
        "leader",
        "1 while this replica holds the lease and runs the controllers and the tunnel",
        leading.clone(),
    );
    metrics.registry.register(
        "helm_chart_kind_served",
        "1 when the apiserver serves helm.cattle.io/v1 HelmCharts (App deploys need them)",
        helm_charts_served.clone(),
    );
    let metrics = Arc::new(metrics);
    let mut config = settings.controllers.clone();
    config.builds.relay_logs = settings.tunnel.is_some();
    let ctx = Arc::new(Context::new(client.clone(), metrics, config));
    let role = Arc::new(AtomicU8::new(if settings.leader_election.is_some() {
        ROLE_WAITING
    } else {
        ROLE_LEADING
    }));
    let server = serve_http(
        &settings,
        HttpState {
            ctx: ctx.clone(),
            role: role.clone(),
        },
        shutdown.clone(),
    )
    .await?;

    let mut elector = match settings.leader_election.clone() {
        Some(config) => Some(crate::leader::Elector::new(client.clone(), config)?),
        None => None,
    };
    if let Some(elector) = elector.as_mut() {
        let standing_by = || role.store(ROLE_STANDBY, Ordering::SeqCst);
        if !elector.acquire(shutdown.clone(), standing_by).await {
            server.abort();
            return Ok(());
        }
        role.store(ROLE_LEADING, Ordering::SeqCst);
    }
    leading.set(1);

    if settings.apply_crds {
        // The chart installed them once; failing here would turn a missing RBAC rule into an
        // outage, so say what is wrong and run on the CRDs that are there.
        if let Err(err) = crate::startup::apply_crds(&client).await {
            tracing::error!(%err, "cannot apply the ShapeBlock CRDs; running on the installed ones");
        }
    }
    match crate::startup::helm_chart_kind_served(&client).await {
        Ok(true) => {
            helm_charts_served.set(1);
        }
        Ok(false) => {
            helm_charts_served.set(0);
            ctx.set_helm_charts_served(false);
            tracing::warn!("{}", crate::startup::HELM_CONTROLLER_MISSING);
        }
        Err(err) => tracing::warn!(%err, "cannot tell whether HelmCharts are served"),
    }

    // Leading ends on shutdown or when the lease is lost, whichever comes first.
    let (lost_tx, lost_rx) = tokio::sync::oneshot::channel();
    let lost = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = elector.map(|mut elector| {
        let stop = shutdown.clone();
        let lost = lost.clone();
        tokio::spawn(async move {
            let outcome = elector.hold(stop).await;
            if let Err(err) = &outcome {
                tracing::error!(%err, "stopping: another replica may lead now");
                lost.store(true, Ordering::SeqCst);
                let _ = lost_tx.send(());
            }
            (elector, outcome)
        })
    });
    let outer = shutdown.clone();
    let stop: ShutdownSignal = async move {
        tokio::select! {
            _ = outer => {}
            Ok(()) = lost_rx => {}
        }
    }
    .boxed()
    .shared();

    let tunnel = settings.tunnel.clone().map(|tunnel| {
        let host = crate::bridge::KubeHost::start(
            client.clone(),
            &settings.controllers.agent_namespace,
            crate::bridge::app_logs::Limits {
                rate: tunnel.app_logs_rate,
                streams: ctx.metrics.app_log_streams.clone(),
            },
            stop.clone(),
        );
        let store = Arc::new(crate::bridge::identity::SecretIdentityStore::new(
            client.clone(),
            &settings.controllers.agent_namespace,
            &tunnel.identity_secret,
        ));
        tracing::info!(hub = %tunnel.config.hub_url, "tunnel to the hub enabled");
        tokio::spawn(crate::tunnel::run(tunnel.config, host, store, stop.clone()))
    });
    let mut controllers = tokio::spawn(controllers::run(ctx, stop.clone()));
    stop.await;
    if lost.load(Ordering::SeqCst) {
        // Another replica may lead within moments: stop writing at once rather than let
        // in-flight reconciles finish (they are idempotent; the new leader redoes them).
        controllers.abort();
    } else {
        match tokio::time::timeout(settings.shutdown_timeout, &mut controllers).await {
            Ok(_) => tracing::info!("controllers stopped"),
            Err(_) => tracing::warn!(
                timeout = ?settings.shutdown_timeout,
                "in-flight reconciles did not finish in time; exiting anyway (they are idempotent and resume on restart)"
            ),
        }
    }
    if let Some(tunnel) = tunnel {
        tunnel.abort();
    }
    leading.set(0);
    let mut outcome = Ok(());
    if let Some(holder) = holder {
        match holder.await {
            // Released only after the controllers and the tunnel stopped: the next leader
            // must not start while this one still writes.
            Ok((mut elector, Ok(()))) => elector.release().await,
            Ok((_, Err(err))) => outcome = Err(err.into()),
            Err(err) => tracing::error!(%err, "the lease holder task failed"),
        }
    }
    server.abort();
    outcome
}

/// `/readyz` of a replica that runs no election, or holds the lease.
const ROLE_LEADING: u8 = 0;
/// Before the first look at the lease.
const ROLE_WAITING: u8 = 1;
/// Another replica leads; this one is ready to take over.
const ROLE_STANDBY: u8 = 2;

#[derive(Clone)]
struct HttpState {
    ctx: Arc<Context>,
    role: Arc<AtomicU8>,
}

async fn serve_http(
    settings: &Settings,
    state: HttpState,
    shutdown: ShutdownSignal,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let listener = tokio::net::TcpListener::bind(settings.http_addr)
        .await
        .map_err(|source| Error::Http {
            addr: settings.http_addr,
            source,
        })?;
    let local = listener.local_addr().map_err(|source| Error::Http {
        addr: settings.http_addr,
        source,
    })?;
    tracing::info!(addr = %local, "serving /healthz, /readyz and /metrics");
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(state);
    Ok(tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
            tracing::error!(%err, "HTTP server failed");
        }
    }))
}

async fn client(settings: &Settings) -> Result<kube::Client, Error> {
    let config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|e| Error::Config(e.to_string()))?
        }
        None => kube::Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    if settings.apiserver_http2 {
        crate::kube_client::client(config).map_err(|e| Error::Config(e.to_string()))
    } else {
        Ok(kube::Client::try_from(config)?)
    }
}

/// A standby is ready: it is live, has read the lease, and takes over when the leader goes.
/// Reporting it unready would stall every rollout (and `helm install --wait`) of two replicas.
async fn readyz(State(state): State<HttpState>) -> (StatusCode, String) {
    let ctx = &state.ctx;
    match state.role.load(Ordering::SeqCst) {
        ROLE_STANDBY => return (StatusCode::OK, "standby: another replica holds the lease".into()),
        ROLE_WAITING => return (StatusCode::SERVICE_UNAVAILABLE, "reading the lease".into()),
        _ => {}
    }
    if ctx.is_ready() {
        (StatusCode::OK, "ok".into())
    } else {
        let synced = ctx.synced_count();
        let total = controllers::CONTROLLERS;
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("caches not synced yet ({synced}/{total} controllers)"),
        )
    }
}

async fn metrics_text(
    State(HttpState { ctx, .. }): State<HttpState>,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        ctx.metrics.encode(),
    )
}

/// Installs the tracing subscriber: plain text or JSON, filtered by `RUST_LOG` or `level`.
pub fn init_tracing(json: bool, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}
