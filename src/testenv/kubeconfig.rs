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
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(address),
    )
    .await
    else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        stream.read_to_end(&mut response),
    )
    .await;
    let text = String::from_utf8_lossy(&response);
    matches!(read, Ok(Ok(_)))
        && text.starts_with("HTTP/1.")
        && text.contains(" 200 ")
        && text.contains(needle)
}
