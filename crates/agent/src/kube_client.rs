//! The agent's Kubernetes client: kube's middleware over a hyper client that speaks HTTP/2
//! when the apiserver offers it (it does, by ALPN), as client-go does.
//!
//! kube's own client speaks HTTP/1.1 only, so every request in flight and every watch holds a
//! TLS connection of its own, each with its read buffer, TLS state and hyper's channels. The
//! agent watches about thirty streams and reconciles many objects at once: in the projects
//! bench the heap profile showed 390 connections' worth of those (about 13 MiB of a 37 MiB
//! peak). Over HTTP/2 they are streams of one connection.

use std::time::Duration;

use hyper_rustls::{FixedServerNameResolver, HttpsConnectorBuilder};
use hyper_timeout::TimeoutConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use kube::client::ConfigExt;
use kube::client::retry::RetryPolicy;
use tower::retry::RetryLayer;
use tower::{BoxError, ServiceBuilder, ServiceExt};

/// With one connection for everything, a dead one must be noticed: a PING every 30 s, the
/// connection given up 15 s after an unanswered one (client-go's HTTP/2 health check uses the
/// same two figures).
const PING_INTERVAL: Duration = Duration::from_secs(30);
const PING_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("TLS configuration for the apiserver: {0}")]
    Tls(#[source] kube::Error),
    #[error("the apiserver's TLS server name {name:?} is not a valid DNS name or IP address")]
    ServerName { name: String },
    #[error("authentication for the apiserver: {0}")]
    Auth(#[source] kube::Error),
}

/// A client for `config`. A proxy in the kubeconfig keeps kube's own client (which knows how
/// to tunnel through it) and HTTP/1.1.
pub fn client(config: kube::Config) -> Result<kube::Client, Error> {
    if config.proxy_url.is_some() {
        return kube::Client::try_from(config).map_err(Error::Tls);
    }
    let tls = config.rustls_client_config().map_err(Error::Tls)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(config.connect_timeout);
    let builder = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    let builder = match &config.tls_server_name {
        Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(
            name.clone()
                .try_into()
                .map_err(|_| Error::ServerName { name: name.clone() })?,
        )),
        None => builder,
    };
    // ALPN offers h2, then http/1.1: an apiserver behind something that speaks only HTTP/1.1
    // still works.
    let https = builder.enable_all_versions().wrap_connector(http);
    // Read and write timeouts as kube sets them: they end an HTTP/1.1 connection (and a watch
    // on it) whose peer went away; on HTTP/2 the pings come first.
    let mut connector = TimeoutConnector::new(https);
    connector.set_read_timeout(config.read_timeout);
    connector.set_write_timeout(config.write_timeout);
    let hyper = HyperClient::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .http2_keep_alive_interval(PING_INTERVAL)
        .http2_keep_alive_timeout(PING_TIMEOUT)
        .http2_keep_alive_while_idle(true)
        // Large lists and log streams share the connection: let the window follow the
        // bandwidth-delay product instead of HTTP/2's 64 KiB default.
        .http2_adaptive_window(true)
        .build(connector);
    let service = ServiceBuilder::new()
        .layer(config.base_uri_layer())
        .option_layer(
            config
                .default_retry
                .then(|| RetryLayer::new(RetryPolicy::server_retry())),
        )
        .option_layer(config.auth_layer().map_err(Error::Auth)?)
        .layer(config.extra_headers_layer().map_err(Error::Auth)?)
        .service(hyper.map_err(BoxError::from));
    Ok(kube::Client::new(service, config.default_namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> kube::Config {
        kube::Config::new(url.parse().unwrap())
    }

    #[tokio::test]
    async fn a_server_name_that_is_no_name_is_refused_with_it() {
        let mut config = config("https://127.0.0.1:6443");
        config.tls_server_name = Some("not a name".into());
        let error = client(config).err().expect("refused");
        assert!(error.to_string().contains("\"not a name\""), "{error}");
    }

    #[tokio::test]
    async fn a_plain_config_builds_a_client() {
        let mut config = config("https://127.0.0.1:6443");
        config.tls_server_name = Some("kubernetes.default.svc".into());
        client(config).expect("a client");
    }
}
