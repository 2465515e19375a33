//! Enrollment: pin the hub's CA by its hash before sending anything, make a key pair here (the
//! private key never leaves the cluster), and trade the one-time token and a CSR for a client
//! certificate.

use std::sync::{Arc, Mutex};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use super::{Identity, TunnelError};
use crate::proto::v1::agent_tunnel_client::AgentTunnelClient;
use crate::proto::v1::{EnrollRequest, RenewRequest};
use crate::proto::{MAX_MESSAGE_BYTES, ca_hash};

/// Accepts the hub's certificate only if its chain carries a CA with the pinned hash and the
/// leaf verifies against that CA for the name dialled.
#[derive(Debug)]
struct PinVerifier {
    pin: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    found: Mutex<Option<Vec<u8>>>,
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| ca_hash(c) == self.pin) else {
            return Err(rustls::Error::General(format!(
                "the hub's CA does not match the pinned hash {} (it presented {}): check --ca-hash against `shapeblock-hub ca-hash`",
                self.pin,
                intermediates
                    .iter()
                    .map(|c| ca_hash(c))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("pinned CA unusable: {e}")))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            self.provider.clone(),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, &[], server_name, ocsp, now)?;
        *self.found.lock().unwrap_or_else(|e| e.into_inner()) = Some(ca.to_vec());
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `https://host:port` → (host, port).
pub(crate) fn host_port(url: &str) -> Result<(String, u16), TunnelError> {
    let rest = url
        .strip_prefix("https://")
        .ok_or_else(|| TunnelError::Config(format!("hub address {url:?} must start with https://")))?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| TunnelError::Config(format!("hub address {url:?} needs a port")))?;
    let port = port
        .parse()
        .map_err(|_| TunnelError::Config(format!("hub address {url:?}: bad port")))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// TLS handshake with the hub that sends nothing but the ClientHello, and returns the CA (PEM)
/// if it matches `pin`.
pub async fn fetch_pinned_ca(hub_url: &str, pin: &str) -> Result<String, TunnelError> {
    let (host, port) = host_port(hub_url)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinVerifier {
        pin: pin.trim().to_string(),
        provider: provider.clone(),
        found: Mutex::new(None),
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| TunnelError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_no_client_auth();
    let name = ServerName::try_from(host.clone())
        .map_err(|e| TunnelError::Config(format!("hub host {host:?}: {e}")))?;
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| TunnelError::Unreachable(format!("{hub_url}: {e}")))?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    match connector.connect(name, tcp).await {
        Ok(_) => {}
        Err(e) => {
            let text = e.to_string();
            return Err(if text.contains("does not match the pinned hash") {
                TunnelError::CaMismatch(text)
            } else {
                TunnelError::Tls(format!("{hub_url}: {text}"))
            });
        }
    }
    let der = verifier
        .found
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .ok_or_else(|| TunnelError::Tls("handshake finished without a pinned CA".into()))?;
    Ok(pem_encode("CERTIFICATE", &der))
}

fn pem_encode(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A new key pair (PEM, PKCS#8).
pub fn new_key() -> Result<String, TunnelError> {
    Ok(KeyPair::generate()
        .map_err(|e| TunnelError::Tls(format!("key generation: {e}")))?
        .serialize_pem())
}

fn csr(key_pem: &str) -> Result<String, TunnelError> {
    let key = KeyPair::from_pem(key_pem).map_err(|e| TunnelError::Tls(format!("stored key: {e}")))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "shapeblock-agent");
    params.distinguished_name = dn;
    params
        .serialize_request(&key)
        .and_then(|r| r.pem())
        .map_err(|e| TunnelError::Tls(format!("CSR: {e}")))
}

pub(crate) fn endpoint(hub_url: &str, tls: ClientTlsConfig) -> Result<Endpoint, TunnelError> {
    let (host, _) = host_port(hub_url)?;
    Endpoint::from_shared(hub_url.to_string())
        .map_err(|e| TunnelError::Config(format!("hub address {hub_url:?}: {e}")))?
        .tls_config(tls.domain_name(host))
        .map_err(|e| TunnelError::Tls(e.to_string()))
        .map(|e| e.connect_timeout(std::time::Duration::from_secs(10)))
}

/// Enrolls with `token` and the key in `key_pem`: pins the CA first, then sends the CSR.
pub async fn enroll(hub_url: &str, token: &str, pin: &str, key_pem: &str) -> Result<Identity, TunnelError> {
    let ca_pem = fetch_pinned_ca(hub_url, pin).await?;
    let channel = endpoint(
        hub_url,
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)),
    )?
    .connect()
    .await
    .map_err(|e| TunnelError::Unreachable(format!("{hub_url}: {e}")))?;
    let mut client = AgentTunnelClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let response = client
        .enroll(EnrollRequest {
            token: token.trim().to_string(),
            csr_pem: csr(key_pem)?,
        })
        .await
        .map_err(TunnelError::Enroll)?
        .into_inner();
    Ok(Identity {
        cluster_id: response.cluster_id,
        key_pem: key_pem.to_string(),
        cert_pem: response.certificate_pem,
        ca_pem: response.ca_pem,
        not_after: response.not_after,
        pending_key_pem: String::new(),
    })
}

/// A fresh certificate for a new key, over the authenticated channel.
pub async fn renew(
    client: &mut AgentTunnelClient<tonic::transport::Channel>,
    current: &Identity,
) -> Result<Identity, TunnelError> {
    let key_pem = new_key()?;
    let response = client
        .renew(RenewRequest {
            csr_pem: csr(&key_pem)?,
        })
        .await
        .map_err(TunnelError::Enroll)?
        .into_inner();
    Ok(Identity {
        cluster_id: response.cluster_id,
        key_pem,
        cert_pem: response.certificate_pem,
        ca_pem: if response.ca_pem.is_empty() {
            current.ca_pem.clone()
        } else {
            response.ca_pem
        },
        not_after: response.not_after,
        pending_key_pem: String::new(),
    })
}
