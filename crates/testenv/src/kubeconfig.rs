//! Kubeconfig files for the test control plane's users, with certificates inline.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::{CertifiedKey, Result};

/// Writes a kubeconfig for one user with a client certificate (mode 0600: it holds a key).
pub fn write(path: &Path, server: &str, ca_pem: &str, user: &CertifiedKey, cluster: &str) -> Result<()> {
    super::write_private(path, &render(server, ca_pem, user, cluster))
}

fn render(server: &str, ca_pem: &str, user: &CertifiedKey, cluster: &str) -> String {
    let ca = STANDARD.encode(ca_pem);
    let cert = STANDARD.encode(&user.cert_pem);
    let key = STANDARD.encode(&user.key_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: {cluster}
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {cluster}-user
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: {cluster}
  context:
    cluster: {cluster}
    user: {cluster}-user
current-context: {cluster}
"
    )
}

/// Whether a plain-HTTP endpoint on loopback answers 200 with a body containing `needle`
/// (etcd's `/health`). A hand-written request keeps an HTTP client out of the dependencies.
pub async fn http_probe(address: &str, path: &str, needle: &str) -> bool {
    matches!(http_get(address, path).await, Some((200, body)) if body.contains(needle))
}

/// A plain-HTTP/1.0 GET on loopback: the status code and body, or `None` if nothing answered.
pub async fn http_get(address: &str, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address))
        .await
        .ok()?
        .ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(timeout, stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head
        .strip_prefix("HTTP/1.")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    Some((status, body.to_owned()))
}

/// Writes a kubeconfig that authenticates with a bearer token (a ServiceAccount's), for the
/// cluster of `admin_kubeconfig` (mode 0600).
pub fn write_token_kubeconfig(path: &Path, admin_kubeconfig: &Path, token: &str) -> Result<()> {
    let admin = kube::config::Kubeconfig::read_from(admin_kubeconfig)
        .map_err(|e| super::Error::Kubeconfig(e.to_string()))?;
    let cluster = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .ok_or_else(|| {
            super::Error::Kubeconfig(format!("{} names no cluster", admin_kubeconfig.display()))
        })?;
    let server = cluster.server.clone().unwrap_or_default();
    let ca = cluster.certificate_authority_data.clone().unwrap_or_default();
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: cluster
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: token
  user:
    token: {token}
contexts:
- name: token
  context:
    cluster: cluster
    user: token
current-context: token
"
    );
    super::write_private(path, &text)
}
