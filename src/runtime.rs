//! Wiring of the running agent: telemetry, the HTTP endpoints (`/healthz`, `/readyz`,
//! `/metrics`), the controllers, and graceful shutdown. No business logic lives here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::controllers::{self, Context, metrics::Metrics};

/// Settings of `shapeblock-agent run`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub kubeconfig: Option<std::path::PathBuf>,
    pub http_addr: SocketAddr,
    pub shutdown_timeout: Duration,
    pub controllers: controllers::Config,
    /// The tunnel to the hub; `None`: no hub configured, the agent only reconciles.
    pub tunnel: Option<TunnelSettings>,
}

/// Settings of the tunnel (`--hub-address` and friends).
#[derive(Clone, Debug)]
pub struct TunnelSettings {
    pub config: crate::tunnel::TunnelConfig,
    /// Secret in the agent's namespace that keeps the key, certificate and CA.
    pub identity_secret: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot load the Kubernetes configuration: {0}")]
    Config(String),
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
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
pub async fn run(settings: Settings, shutdown: ShutdownSignal) -> Result<(), Error> {
    let client = client(&settings).await?;
    let version = client.apiserver_version().await?;
    tracing::info!(kubernetes = %version.git_version, "connected to the Kubernetes API");

    let metrics = Arc::new(Metrics::default());
    let tunnel = settings.tunnel.clone().map(|tunnel| {
        let host = crate::bridge::KubeHost::start(client.clone(), shutdown.clone());
        let store = Arc::new(crate::bridge::identity::SecretIdentityStore::new(
            client.clone(),
            &settings.controllers.agent_namespace,
            &tunnel.identity_secret,
        ));
        tracing::info!(hub = %tunnel.config.hub_url, "tunnel to the hub enabled");
        tokio::spawn(crate::tunnel::run(tunnel.config, host, store, shutdown.clone()))
    });
    let mut config = settings.controllers.clone();
    config.builds.relay_logs = settings.tunnel.is_some();
    let ctx = Arc::new(Context::new(client, metrics, config));

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
        .with_state(ctx.clone());
    let server_shutdown = shutdown.clone();
    let server = tokio::spawn(async move {
        if let Err(err) = axum::serve(listener, app)
            .with_graceful_shutdown(server_shutdown)
            .await
        {
            tracing::error!(%err, "HTTP server failed");
        }
    });

    let controllers = tokio::spawn(controllers::run(ctx, shutdown.clone()));
    shutdown.await;
    match tokio::time::timeout(settings.shutdown_timeout, controllers).await {
        Ok(_) => tracing::info!("controllers stopped"),
        Err(_) => tracing::warn!(
            timeout = ?settings.shutdown_timeout,
            "in-flight reconciles did not finish in time; exiting anyway (they are idempotent and resume on restart)"
        ),
    }
    server.abort();
    if let Some(tunnel) = tunnel {
        tunnel.abort();
    }
    Ok(())
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
    Ok(kube::Client::try_from(config)?)
}

async fn readyz(State(ctx): State<Arc<Context>>) -> (StatusCode, String) {
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
    State(ctx): State<Arc<Context>>,
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
