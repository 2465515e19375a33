//! Certificates and keys for the test control plane, made with rcgen: a CA, the apiserver's
//! serving certificate, client certificates, and the service-account signing key.

use std::net::{IpAddr, Ipv4Addr};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};

use super::{Error, Result};

/// A PEM certificate and its PEM (PKCS#8) private key.
#[derive(Clone, Debug)]
pub struct CertifiedKey {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A certificate authority that can issue serving and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl CertificateAuthority {
    /// Creates a new self-signed CA.
    pub fn new(common_name: &str) -> Result<Self> {
        let key = KeyPair::generate().map_err(pki_error)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, None);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(pki_error)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA certificate (PEM), for trust bundles and `--client-ca-file`.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// A TLS server certificate for loopback and the in-cluster names of the apiserver.
    pub fn serving_cert(
        &self,
        common_name: &str,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<CertifiedKey> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(common_name, None);
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| Ok(SanType::DnsName((*n).try_into().map_err(pki_error)?)))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_>>()?;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params)
    }

    /// A client certificate: Kubernetes reads the user from the CN and groups from O.
    pub fn client_cert(&self, user: &str, group: Option<&str>) -> Result<CertifiedKey> {
        let mut params = CertificateParams::default();
        params.distinguished_name = name(user, group);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params)
    }

    fn issue(&self, params: CertificateParams) -> Result<CertifiedKey> {
        let key = KeyPair::generate().map_err(pki_error)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(pki_error)?;
        Ok(CertifiedKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A fresh ECDSA P-256 key pair for signing service-account tokens (ES256): the private key
/// (PKCS#8 PEM) and the public key (SPKI PEM), which the apiserver reads from separate files.
pub fn signing_key_pair_pem() -> Result<(String, String)> {
    let key = KeyPair::generate().map_err(pki_error)?;
    Ok((key.serialize_pem(), key.public_key_pem()))
}

/// The addresses the apiserver certificate covers.
pub fn loopback_ips(service_ip: Ipv4Addr) -> Vec<IpAddr> {
    vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V4(service_ip)]
}

fn name(common_name: &str, organization: Option<&str>) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    if let Some(org) = organization {
        dn.push(DnType::OrganizationName, org);
    }
    dn
}

fn pki_error(err: impl std::fmt::Display) -> Error {
    Error::Pki(err.to_string())
}
