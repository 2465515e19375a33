//! The hub's CA: generated on first start and persisted in the data directory (or taken from
//! files there, e.g. copied from `certs-dev/`), its TLS server certificate, and CSR signing.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use shapeblock_proto::{IDENTITY_URI_PREFIX, hex};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{0}")]
    Invalid(String),
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
}

fn read(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn write(path: &Path, contents: &str, private: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    file.write_all(contents.as_bytes()).map_err(err)
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|d| d.to_vec())
        .map_err(|e| PkiError::Invalid(format!("not a PEM certificate: {e}")))
}

impl Ca {
    /// Loads `ca.pem` + `ca-key.pem` from `dir`, or creates and saves them.
    pub fn load_or_create(dir: &Path) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
        if let (Some(cert_pem), Some(key_pem)) = (read(&cert_path)?, read(&key_path)?) {
            let key = KeyPair::from_pem(&key_pem)?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)?;
            let cert_der = pem_to_der(&cert_pem)?;
            return Ok(Self {
                issuer,
                cert_pem,
                cert_der,
            });
        }
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("ShapeBlock hub CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2044, 1, 1);
        let cert = params.self_signed(&key)?;
        write(&key_path, &key.serialize_pem(), true)?;
        write(&cert_path, &cert.pem(), false)?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A TLS server certificate for `names` (DNS names or IP addresses); PEM cert chain (leaf,
    /// then CA: the agent's pin check needs the CA in the handshake) and PEM key.
    pub fn server_cert(&self, names: &[String]) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn("shapeblock-hub");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(365);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((format!("{}{}", cert.pem(), self.cert_pem), key.serialize_pem()))
    }

    /// Signs a CSR as a client certificate of `cluster`: subject and SANs come from the hub,
    /// never from the CSR; only its public key is used. Returns the PEM certificate and the
    /// hex SHA-256 of the public key (what a token is bound to).
    pub fn sign_client(
        &self,
        csr_pem: &str,
        cluster: &str,
        lifetime: Duration,
    ) -> Result<(String, String), PkiError> {
        self.sign_client_at(csr_pem, cluster, lifetime, time::OffsetDateTime::now_utc())
    }

    /// [`Ca::sign_client`] as if the time were `now` (the hub's clock is injectable, so tests
    /// can issue a certificate that is weeks old).
    pub fn sign_client_at(
        &self,
        csr_pem: &str,
        cluster: &str,
        lifetime: Duration,
        now: time::OffsetDateTime,
    ) -> Result<(String, String), PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::Invalid(format!("invalid CSR: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cluster);
        params.subject_alt_names = vec![SanType::URI(
            format!("{IDENTITY_URI_PREFIX}{cluster}").try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // A minute of back-dating absorbs clock skew between hub and cluster.
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::try_from(lifetime).unwrap_or(time::Duration::DAY);
        let signed = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key.clone(),
        }
        .signed_by(&self.issuer)?;
        use rcgen::PublicKeyData;
        let key_hash = hex(ring::digest::digest(&ring::digest::SHA256, csr.public_key.der_bytes()).as_ref());
        Ok((signed.pem(), key_hash))
    }

    /// Saves the server certificate (for operators who want to inspect it); not required.
    pub fn save_server(dir: &Path, cert_pem: &str) -> Result<(), PkiError> {
        write(&dir.join("server.pem"), cert_pem, false)
    }
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "ShapeBlock");
    dn
}
