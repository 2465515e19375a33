//! The tunnel protocol: generated types of `proto/shapeblock/agent/v1/agent.proto` and the few
//! conventions both sides share (the CA pin format, the identity in a client certificate).
//! See `docs/protocol.md`.

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("shapeblock.agent.v1");
}

/// Largest message either side accepts (a manifest, a log chunk): bigger ones are refused by
/// the gRPC layer with `OUT_OF_RANGE`, and the stream is not trusted further.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Prefix of the URI SAN that carries a cluster's identity in its client certificate.
pub const IDENTITY_URI_PREFIX: &str = "spiffe://shapeblock.io/cluster/";

/// The pin of a CA, as the one-line install carries it: `sha256:` and the hex SHA-256 of the
/// CA certificate's DER. (kubeadm pins the public key; pinning the whole certificate is as
/// strong and needs no ASN.1 parsing on the agent.)
pub fn ca_hash(ca_der: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, ca_der);
    format!("sha256:{}", hex(digest.as_ref()))
}

/// Lower-case hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cluster id in a client certificate (DER): the one URI SAN with [`IDENTITY_URI_PREFIX`].
pub fn cluster_of_certificate(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => uri.strip_prefix(IDENTITY_URI_PREFIX).map(str::to_string),
        _ => None,
    })
}

/// `not_after` of a certificate (DER), Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// Key of an object in messages and stores: `Kind/namespace/name` (namespace empty for
/// cluster-scoped kinds).
pub fn object_key(object: &v1::ObjectRef) -> String {
    format!("{}/{}/{}", object.kind, object.namespace, object.name)
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
