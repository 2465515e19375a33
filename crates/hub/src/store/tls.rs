//! TLS to Postgres, with libpq's words in the database URL: `sslmode` (`disable`, `prefer`,
//! `require`, `verify-ca`, `verify-full`), `sslrootcert` (a PEM file, or `system` for the
//! platform's roots) and `sslcert`/`sslkey` (a client certificate). tokio-postgres reads only
//! `disable`/`prefer`/`require`, so the URL is read here first: the rest decides the
//! verifier, and tokio-postgres gets the URL without them.
//!
//! As libpq: `prefer` and `require` encrypt without checking who answers unless a root
//! certificate is given (then they check the chain, as `verify-ca`; libpq's `prefer` would
//! not, but a root given and then ignored would be a surprise); `verify-ca` checks the chain,
//! `verify-full` the chain and the host name. One crypto provider, ring (see
//! DESIGN.md).

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use super::{Result, StoreError};

/// How much of the server's identity a connection checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<Self> {
        Ok(match value {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            // libpq's `allow` tries plain first: a downgrade by design, not offered.
            other => {
                return Err(StoreError::Config(format!(
                    "the database URL's sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                )));
            }
        })
    }

    /// What tokio-postgres is told: whether TLS is tried, and whether it is a must.
    fn negotiation(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Pg;
        match self {
            Self::Disable => Pg::Disable,
            Self::Prefer => Pg::Prefer,
            Self::Require | Self::VerifyCa | Self::VerifyFull => Pg::Require,
        }
    }
}

/// The TLS words of a database URL, taken out of it.
#[derive(Debug, Default, PartialEq)]
struct TlsWords {
    sslmode: Option<String>,
    sslrootcert: Option<String>,
    sslcert: Option<String>,
    sslkey: Option<String>,
}

impl TlsWords {
    fn take(&mut self, key: &str, value: String) -> bool {
        let slot = match key {
            "sslmode" => &mut self.sslmode,
            "sslrootcert" => &mut self.sslrootcert,
            "sslcert" => &mut self.sslcert,
            "sslkey" => &mut self.sslkey,
            _ => return false,
        };
        *slot = Some(value);
        true
    }
}

/// Splits the TLS words off `url` (a `postgres://` URL or libpq's `key=value` form); the rest
/// of it for tokio-postgres. No word of the URL is quoted in an error: it may hold a password.
fn split(url: &str) -> Result<(String, TlsWords)> {
    let mut words = TlsWords::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), words));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if !words.take(key, percent_decoded(value)?) {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return Ok((rest, words));
    }
    // key=value, space separated; values quoted with '' are left to tokio-postgres unless
    // they are TLS words, which are paths or modes and never need quoting here.
    let mut kept = Vec::new();
    for token in url.split_whitespace() {
        match token.split_once('=') {
            Some((key, value)) if words.take(key, value.trim_matches('\'').to_string()) => {}
            _ => kept.push(token),
        }
    }
    Ok((kept.join(" "), words))
}

/// `url` with `sslrootcert` set to `root` (and `sslmode=verify-full` unless it names a mode):
/// what `--database-ca` does, so the CA can come from its own file (a mounted Secret) while
/// the URL with its password comes from another. A URL naming a root itself is refused:
/// one of the two would be silently ignored.
pub fn with_root_cert(url: &str, root: &std::path::Path) -> Result<String> {
    let (_, words) = split(url)?;
    if words.sslrootcert.is_some() {
        return Err(StoreError::Config(
            "the database URL names sslrootcert and --database-ca gives another: keep one".into(),
        ));
    }
    let root = root
        .to_str()
        .ok_or_else(|| StoreError::Config("the database CA's path is not UTF-8".into()))?;
    let mode = if words.sslmode.is_none() {
        Some("verify-full")
    } else {
        None
    };
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let mut out = url.to_string();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for (key, value) in [("sslrootcert", Some(root)), ("sslmode", mode)] {
            if let Some(value) = value {
                out.push(sep);
                out.push_str(key);
                out.push('=');
                out.push_str(&percent_encoded(value));
                sep = '&';
            }
        }
        return Ok(out);
    }
    if root.chars().any(|c| c.is_whitespace() || c == '\'') {
        return Err(StoreError::Config(
            "the database CA's path has a space or a quote, which a key=value database URL cannot carry"
                .into(),
        ));
    }
    let mut out = format!("{url} sslrootcert={root}");
    if let Some(mode) = mode {
        out.push_str(" sslmode=");
        out.push_str(mode);
    }
    Ok(out)
}

fn percent_encoded(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decoded(value: &str) -> Result<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    StoreError::Config("the database URL has a bad %-escape in its TLS options".into())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| StoreError::Config("the database URL's TLS options are not UTF-8".into()))
}

/// What connections to one database dial with: tokio-postgres' config and the TLS connector.
#[derive(Clone)]
pub struct Database {
    pub config: tokio_postgres::Config,
    pub tls: MakeRustls,
    pub mode: SslMode,
}

impl std::fmt::Debug for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The config's Debug hides the password; the TLS config has nothing to show.
        f.debug_struct("Database")
            .field("config", &self.config)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Reads a database URL with its TLS words; files it names are read now, so a missing
    /// certificate is an error at start-up, not at the first connection.
    pub fn from_url(url: &str) -> Result<Self> {
        let (rest, words) = split(url)?;
        let mode = match words.sslmode.as_deref() {
            Some(mode) => SslMode::parse(mode)?,
            None => SslMode::Prefer,
        };
        let mut config: tokio_postgres::Config = rest
            .parse()
            .map_err(|e| StoreError::Config(format!("the database URL cannot be read: {e}")))?;
        config.ssl_mode(mode.negotiation());
        let roots = match words.sslrootcert.as_deref() {
            None => None,
            Some("system") => Some(system_roots()?),
            Some(path) => Some(roots_from(path)?),
        };
        if roots.is_none() && matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) {
            return Err(StoreError::Config(format!(
                "the database URL's sslmode {} needs sslrootcert (a PEM file of the CA, or `system`)",
                if mode == SslMode::VerifyCa {
                    "verify-ca"
                } else {
                    "verify-full"
                }
            )));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            None => Arc::new(Unverified(provider.clone())),
            Some(roots) => {
                let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .map_err(|e| StoreError::Config(format!("the database's root certificates: {e}")))?;
                match mode {
                    SslMode::VerifyFull => webpki,
                    _ => Arc::new(ChainOnly(webpki)),
                }
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Config(format!("TLS to the database: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let client = match (words.sslcert.as_deref(), words.sslkey.as_deref()) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert), Some(key)) => {
                let chain = certificates_in(cert)?;
                let key = PrivateKeyDer::from_pem_slice(&read(key)?)
                    .map_err(|e| StoreError::Config(format!("sslkey {key}: no private key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| StoreError::Config(format!("the database client certificate: {e}")))?
            }
            _ => {
                return Err(StoreError::Config(
                    "the database URL names sslcert or sslkey without the other".into(),
                ));
            }
        };
        Ok(Self {
            config,
            tls: MakeRustls(Arc::new(client)),
            mode,
        })
    }
}

fn read(path: &str) -> Result<Vec<u8>> {
    std::fs::read(PathBuf::from(path)).map_err(|e| StoreError::Config(format!("read {path}: {e}")))
}

fn certificates_in(path: &str) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| StoreError::Config(format!("{path}: {e}")))?;
    if certs.is_empty() {
        return Err(StoreError::Config(format!("{path} holds no PEM certificate")));
    }
    Ok(certs)
}

fn roots_from(path: &str) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in certificates_in(path)? {
        roots
            .add(cert)
            .map_err(|e| StoreError::Config(format!("sslrootcert {path}: {e}")))?;
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(StoreError::Config(
            "sslrootcert=system: this machine has no readable root certificates".into(),
        ));
    }
    Ok(roots)
}

/// `prefer`/`require` without a root certificate: encrypted, the peer unchecked (libpq's
/// meaning of these modes); the handshake's signatures are still verified.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the chain to the roots is checked, the name in the certificate is not.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// tokio-postgres' TLS over rustls.
#[derive(Clone)]
pub struct MakeRustls(Arc<ClientConfig>);

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> std::result::Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.0.clone(),
            name: ServerName::try_from(host.to_string())?,
        })
    }
}

pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<RustlsStream<S>>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        Box::pin(async move {
            let stream = connector.connect(self.name, stream).await?;
            Ok(RustlsStream(Box::new(stream)))
        })
    }
}

pub struct RustlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// SCRAM's channel binding (`tls-server-end-point`, RFC 5929): the hash of the server's
    /// certificate, by its signature's hash (SHA-256 for MD5 and SHA-1 too).
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        let Some(cert) = session.peer_certificates().and_then(|c| c.first()) else {
            return ChannelBinding::none();
        };
        let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
            return ChannelBinding::none();
        };
        use x509_parser::oid_registry as oid;
        let algorithm = &parsed.signature_algorithm.algorithm;
        let digest = if *algorithm == oid::OID_PKCS1_SHA384WITHRSA
            || *algorithm == oid::OID_SIG_ECDSA_WITH_SHA384
        {
            &ring::digest::SHA384
        } else if *algorithm == oid::OID_PKCS1_SHA512WITHRSA || *algorithm == oid::OID_SIG_ECDSA_WITH_SHA512 {
            &ring::digest::SHA512
        } else if *algorithm == oid::OID_SIG_ED25519 {
            // No hash of its own: RFC 5929 gives none, so no binding is offered.
            return ChannelBinding::none();
        } else {
            &ring::digest::SHA256
        };
        ChannelBinding::tls_server_end_point(ring::digest::digest(digest, cert.as_ref()).as_ref().to_vec())
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_words_are_taken_out_of_either_form_of_url() {
        let (rest, words) = split(
            "postgres://u:p@db:5432/hub?sslmode=verify-full&application_name=x&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@db:5432/hub?application_name=x");
        assert_eq!(words.sslmode.as_deref(), Some("verify-full"));
        assert_eq!(words.sslrootcert.as_deref(), Some("/etc/ca.pem"));
        let (rest, words) = split("postgres://db/hub?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), words.sslmode.as_deref()),
            ("postgres://db/hub", Some("require"))
        );
        let (rest, words) = split("host=db dbname=hub sslmode=verify-ca sslrootcert='/ca.pem'").unwrap();
        assert_eq!(rest, "host=db dbname=hub");
        assert_eq!(words.sslrootcert.as_deref(), Some("/ca.pem"));
        assert!(split("postgres://db/hub?sslrootcert=%zz").is_err());
    }

    #[test]
    fn a_root_given_apart_is_added_to_the_url_and_verifies_fully_unless_told_otherwise() {
        let root = std::path::Path::new("/etc/shapeblock/db ca/ca.crt");
        let url = with_root_cert("postgres://u:p@db/hub", root).unwrap();
        let (rest, words) = split(&url).unwrap();
        assert_eq!(rest, "postgres://u:p@db/hub");
        assert_eq!(words.sslrootcert.as_deref(), Some("/etc/shapeblock/db ca/ca.crt"));
        assert_eq!(words.sslmode.as_deref(), Some("verify-full"));
        let url = with_root_cert("postgres://db/hub?sslmode=verify-ca&application_name=a", root).unwrap();
        let (rest, words) = split(&url).unwrap();
        assert_eq!(rest, "postgres://db/hub?application_name=a");
        assert_eq!(words.sslmode.as_deref(), Some("verify-ca"));
        let url = with_root_cert("host=db dbname=hub", std::path::Path::new("/ca.crt")).unwrap();
        let (rest, words) = split(&url).unwrap();
        assert_eq!(rest, "host=db dbname=hub");
        assert_eq!(
            (words.sslrootcert.as_deref(), words.sslmode.as_deref()),
            (Some("/ca.crt"), Some("verify-full"))
        );
        assert!(with_root_cert("host=db", root).is_err());
        let e = with_root_cert("postgres://db/hub?sslrootcert=/other.crt", root).unwrap_err();
        assert!(e.to_string().contains("keep one"), "{e}");
    }

    #[test]
    fn modes_are_libpqs_and_verifying_ones_need_a_root() {
        assert_eq!(
            Database::from_url("postgres://db/hub").unwrap().mode,
            SslMode::Prefer
        );
        let disabled = Database::from_url("postgres://db/hub?sslmode=disable").unwrap();
        assert_eq!(
            disabled.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        for mode in ["verify-ca", "verify-full"] {
            let e = Database::from_url(&format!("postgres://u:secret@db/hub?sslmode={mode}")).unwrap_err();
            assert!(e.to_string().contains("needs sslrootcert"), "{e}");
            assert!(!e.to_string().contains("secret"));
        }
        let e = Database::from_url("postgres://db/hub?sslmode=allow").unwrap_err();
        assert!(e.to_string().contains("not one of"), "{e}");
        let e = Database::from_url("postgres://db/hub?sslmode=require&sslrootcert=/nonexistent/ca.pem")
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let e = Database::from_url("postgres://db/hub?sslcert=/a.pem").unwrap_err();
        assert!(e.to_string().contains("without the other"), "{e}");
    }
}
