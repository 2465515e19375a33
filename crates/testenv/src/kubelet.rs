//! The simulated nodes' kubelet endpoint for container logs.
//!
//! The apiserver serves `pods/log` by proxying to `https://<node InternalIP>:<daemonEndpoints
//! kubelet port>/containerLogs/{namespace}/{pod}/{container}`. kwok can serve logs from files,
//! but its follow mode ends at the first end of file; a build log relay needs a stream that
//! stays open while lines arrive and ends when the container stops, as on a real node. So the
//! test support serves that path itself, from a [`LogStore`] that tests (and the helm runner)
//! write to. The apiserver does not verify kubelet certificates unless told to, but the
//! endpoint still speaks TLS with a certificate from the cluster CA, as a kubelet does.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use kube::{Client, ResourceExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::{CertificateAuthority, Error, Result};

/// One container's log, addressed as the kubelet addresses it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

impl ContainerRef {
    pub fn new(namespace: &str, pod: &str, container: &str) -> Self {
        Self {
            namespace: namespace.into(),
            pod: pod.into(),
            container: container.into(),
        }
    }
}

#[derive(Clone, Debug)]
struct Line {
    time: Timestamp,
    text: String,
}

/// Lines chosen in advance for containers that do not exist yet (the agent creates the pods, so
/// a test cannot know their names): every container named `container` in `namespace` starts
/// its log with `lines`.
#[derive(Clone, Debug)]
struct Script {
    namespace: String,
    container: String,
    lines: Vec<String>,
}

#[derive(Default)]
struct State {
    logs: HashMap<ContainerRef, Vec<Line>>,
    scripts: Vec<Script>,
}

/// Container logs of the simulated nodes, shared by every cluster in this process (container
/// references include the namespace, and each test has its own).
pub struct LogStore {
    state: Mutex<State>,
    // Bumped on every append, so that followers wake up; works across tokio runtimes.
    version: watch::Sender<u64>,
}

/// The process-wide log store.
pub fn logs() -> &'static LogStore {
    static STORE: OnceLock<LogStore> = OnceLock::new();
    STORE.get_or_init(|| LogStore {
        state: Mutex::new(State::default()),
        version: watch::Sender::new(0),
    })
}

impl LogStore {
    /// Appends one line (without its newline) to a container's log, stamped now.
    pub fn append(&self, container: &ContainerRef, line: &str) {
        self.append_at(container, line, Timestamp::now());
    }

    /// Appends one line with a chosen timestamp (for `sinceTime` tests).
    pub fn append_at(&self, container: &ContainerRef, line: &str, time: Timestamp) {
        {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let log = Self::log_of(&mut state, container, time);
            for text in line.split('\n') {
                log.push(Line {
                    time,
                    text: text.to_owned(),
                });
            }
        }
        self.version.send_modify(|v| *v += 1);
    }

    /// Chooses the first lines of every container named `container` in `namespace`, including
    /// pods created later.
    pub fn script(&self, namespace: &str, container: &str, lines: &[&str]) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.scripts.push(Script {
            namespace: namespace.into(),
            container: container.into(),
            lines: lines.iter().map(|l| (*l).to_owned()).collect(),
        });
    }

    fn log_of<'a>(state: &'a mut State, container: &ContainerRef, time: Timestamp) -> &'a mut Vec<Line> {
        if !state.logs.contains_key(container) {
            let scripted = state
                .scripts
                .iter()
                .rev()
                .find(|s| s.namespace == container.namespace && s.container == container.container)
                .map(|s| {
                    s.lines
                        .iter()
                        .map(|text| Line {
                            time,
                            text: text.clone(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            state.logs.insert(container.clone(), scripted);
        }
        state.logs.get_mut(container).expect("inserted above")
    }

    /// The lines of a container's log so far.
    pub fn lines(&self, container: &ContainerRef) -> Vec<String> {
        self.snapshot(container).into_iter().map(|l| l.text).collect()
    }

    fn snapshot(&self, container: &ContainerRef) -> Vec<Line> {
        self.snapshot_from(container, 0).0
    }

    /// The lines from `start` on, and how many lines the log has: a follower copies only what
    /// is new (a log of hundreds of MiB is not copied every poll).
    fn snapshot_from(&self, container: &ContainerRef, start: usize) -> (Vec<Line>, usize) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let log = Self::log_of(&mut state, container, Timestamp::now());
        (log.get(start..).unwrap_or_default().to_vec(), log.len())
    }
}

/// The query parameters the kubelet honours for `containerLogs`.
#[derive(Debug, Default, PartialEq)]
struct LogOptions {
    follow: bool,
    timestamps: bool,
    since: Option<Timestamp>,
    tail_lines: Option<usize>,
    limit_bytes: Option<usize>,
}

impl LogOptions {
    fn parse(query: &str, now: Timestamp) -> Result<Self, String> {
        let mut options = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            let bad = |what: &str| format!("invalid {key}={value}: {what}");
            match key {
                "follow" => options.follow = value == "true" || value == "1",
                "timestamps" => options.timestamps = value == "true" || value == "1",
                "sinceTime" => options.since = Some(value.parse().map_err(|_| bad("not an RFC 3339 time"))?),
                "sinceSeconds" => {
                    let seconds: i64 = value.parse().map_err(|_| bad("not a number"))?;
                    options.since = Some(now - SignedDuration::from_secs(seconds));
                }
                "tailLines" => options.tail_lines = Some(value.parse().map_err(|_| bad("not a number"))?),
                "limitBytes" => options.limit_bytes = Some(value.parse().map_err(|_| bad("not a number"))?),
                _ => {}
            }
        }
        Ok(options)
    }

    fn render(&self, line: &Line) -> String {
        if self.timestamps {
            format!("{} {}\n", line.time, line.text)
        } else {
            format!("{}\n", line.text)
        }
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|hex| u8::from_str_radix(hex, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A running kubelet endpoint.
pub struct KubeletServer {
    port: u16,
}

impl KubeletServer {
    /// Binds a loopback port and serves on the current tokio runtime, which must outlive the
    /// cluster (the control plane's keeper runtime). `kubeconfig` is an admin kubeconfig, used to
    /// learn when a followed container terminates.
    pub async fn start(ca: &CertificateAuthority, kubeconfig: &std::path::Path) -> Result<Self> {
        let serving = ca.serving_cert(
            "shapeblock-simulated-kubelet",
            &["localhost"],
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
        )?;
        let certs = CertificateDer::pem_slice_iter(serving.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Pki(format!("kubelet certificate: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes())
            .map_err(|e| Error::Pki(format!("kubelet key: {e}")))?;
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Pki(e.to_string()))?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| Error::Pki(e.to_string()))?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .await
            .map_err(|e| Error::io("bind the kubelet endpoint", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::io("kubelet endpoint address", e))?
            .port();
        let client = super::client_from_kubeconfig(kubeconfig).await?;
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let client = client.clone();
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        let _ = serve_connection(tls, client).await;
                    }
                });
            }
        });
        Ok(Self { port })
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

async fn serve_connection<S>(stream: S, client: Client) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + AsyncWrite + Unpin,
{
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    // Headers carry nothing we need; read up to the blank line.
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).await? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
    }
    let mut stream = reader.into_inner();
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let container = match (method, segments.as_slice()) {
        ("GET", ["containerLogs", namespace, pod, container]) => ContainerRef::new(namespace, pod, container),
        _ => {
            return respond(
                &mut stream,
                "404 Not Found",
                "only containerLogs is served here\n",
            )
            .await;
        }
    };
    let options = match LogOptions::parse(query, Timestamp::now()) {
        Ok(options) => options,
        Err(message) => return respond(&mut stream, "400 Bad Request", &format!("{message}\n")).await,
    };
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .await?;
    stream_log(&mut stream, &container, &options, &client).await?;
    stream.write_all(b"0\r\n\r\n").await?;
    stream.flush().await?;
    stream.shutdown().await
}

async fn respond<S: AsyncWrite + Unpin>(stream: &mut S, status: &str, body: &str) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// How often a follower checks whether its container has terminated.
const TERMINATION_POLL: Duration = Duration::from_millis(200);

async fn stream_log<S: AsyncWrite + Unpin>(
    stream: &mut S,
    container: &ContainerRef,
    options: &LogOptions,
    client: &Client,
) -> std::io::Result<()> {
    let store = logs();
    let mut version = store.version.subscribe();
    let lines = store.snapshot(container);
    let mut selected: Vec<&Line> = lines
        .iter()
        .filter(|l| options.since.is_none_or(|since| l.time >= since))
        .collect();
    if let Some(tail) = options.tail_lines {
        selected.drain(..selected.len().saturating_sub(tail));
    }
    let mut budget = options.limit_bytes.unwrap_or(usize::MAX);
    let mut sent = lines.len();
    if !write_lines(stream, options, selected, &mut budget).await? {
        return Ok(());
    }
    stream.flush().await?;
    if !options.follow {
        return Ok(());
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &container.namespace);
    loop {
        // The final state is read before the last lines, so nothing written before the
        // container stopped is lost.
        let finished = container_finished(&pods, container).await;
        let (lines, total) = store.snapshot_from(container, sent);
        let selected: Vec<&Line> = lines
            .iter()
            .filter(|line| options.since.is_none_or(|since| line.time >= since))
            .collect();
        if !write_lines(stream, options, selected, &mut budget).await? {
            return Ok(());
        }
        sent = total;
        stream.flush().await?;
        if finished {
            return Ok(());
        }
        let _ = tokio::time::timeout(TERMINATION_POLL, version.changed()).await;
    }
}

/// Writes lines in HTTP chunks of up to 64 KiB (a kubelet streams a file, not a write per
/// line), within the byte budget. False once the budget is spent.
async fn write_lines<S: AsyncWrite + Unpin>(
    stream: &mut S,
    options: &LogOptions,
    lines: Vec<&Line>,
    budget: &mut usize,
) -> std::io::Result<bool> {
    let mut batch = String::new();
    for line in lines {
        batch.push_str(&options.render(line));
        if batch.len() >= 64 * 1024 {
            if !write_limited(stream, &batch, budget).await? {
                return Ok(false);
            }
            batch.clear();
        }
    }
    if batch.is_empty() {
        return Ok(*budget > 0);
    }
    write_limited(stream, &batch, budget).await
}

/// Writes `text` as one chunk, cut to what is left of the byte budget. False once the budget is
/// spent.
async fn write_limited<S: AsyncWrite + Unpin>(
    stream: &mut S,
    text: &str,
    budget: &mut usize,
) -> std::io::Result<bool> {
    let bytes = &text.as_bytes()[..text.len().min(*budget)];
    if !bytes.is_empty() {
        stream
            .write_all(format!("{:x}\r\n", bytes.len()).as_bytes())
            .await?;
        stream.write_all(bytes).await?;
        stream.write_all(b"\r\n").await?;
    }
    *budget -= bytes.len();
    Ok(*budget > 0)
}

/// Whether the container has stopped for good (terminated and not restarting) or its pod is
/// gone.
async fn container_finished(pods: &Api<Pod>, container: &ContainerRef) -> bool {
    let pod = match pods.get_opt(&container.pod).await {
        Ok(Some(pod)) => pod,
        Ok(None) => return true,
        Err(_) => return false,
    };
    if pod.metadata.deletion_timestamp.is_some() && pod.finalizers().is_empty() {
        return true;
    }
    let status = pod.status.unwrap_or_default();
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return true;
    }
    status
        .container_statuses
        .unwrap_or_default()
        .iter()
        .chain(status.init_container_statuses.unwrap_or_default().iter())
        .find(|s| s.name == container.container)
        .and_then(|s| s.state.as_ref())
        .is_some_and(|s| s.terminated.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_parsed_like_the_kubelet() {
        let now: Timestamp = "2026-01-01T00:01:00Z".parse().unwrap();
        let options = LogOptions::parse(
            "follow=true&timestamps=true&sinceTime=2026-01-01T00%3A00%3A30Z&tailLines=3&limitBytes=10",
            now,
        )
        .unwrap();
        assert_eq!(
            options,
            LogOptions {
                follow: true,
                timestamps: true,
                since: Some("2026-01-01T00:00:30Z".parse().unwrap()),
                tail_lines: Some(3),
                limit_bytes: Some(10),
            }
        );
        let relative = LogOptions::parse("sinceSeconds=60", now).unwrap();
        assert_eq!(relative.since, Some("2026-01-01T00:00:00Z".parse().unwrap()));
        assert!(
            LogOptions::parse("tailLines=x", now)
                .unwrap_err()
                .contains("tailLines")
        );
    }
}
