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

/// Whose pod a [`v1::LogChunk`] comes from, by its `kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LogKind {
    Build,
    Run,
}

impl LogKind {
    pub const ALL: [LogKind; 2] = [LogKind::Build, LogKind::Run];

    /// The kind a chunk names: `AppBuild`, also when empty (agents older than one-off runs
    /// sent no kind), or `AppRun`.
    pub fn of(kind: &str) -> Option<Self> {
        match kind {
            "" | "AppBuild" => Some(LogKind::Build),
            "AppRun" => Some(LogKind::Run),
            _ => None,
        }
    }

    /// The `kind` a chunk carries.
    pub fn name(self) -> &'static str {
        match self {
            LogKind::Build => "AppBuild",
            LogKind::Run => "AppRun",
        }
    }
}

/// The log stream a chunk belongs to, as the hub stores and shows it: a build's
/// `namespace/build/container`, a one-off run's `namespace/runs/run/container`. `Err` for a
/// kind that has no logs.
pub fn log_stream(chunk: &v1::LogChunk) -> Result<String, String> {
    let v1::LogChunk {
        kind,
        namespace,
        build: name,
        container,
        ..
    } = chunk;
    match LogKind::of(kind) {
        Some(LogKind::Build) => Ok(format!("{namespace}/{name}/{container}")),
        Some(LogKind::Run) => Ok(format!("{namespace}/runs/{name}/{container}")),
        None => Err(format!(
            "log chunk of kind {kind:?}: only AppBuild and AppRun have logs"
        )),
    }
}

/// Most bytes of secret config values in one [`v1::SetConfig`] (a Secret holds 1 MiB in all).
pub const MAX_CONFIG_BYTES: usize = 512 * 1024;

/// Checks a [`v1::SetConfig`] as both sides must (the hub before queueing it, the agent before
/// acting on it). Messages name variables, never values.
pub fn check_set_config(command: &v1::SetConfig) -> Result<(), String> {
    for (what, name) in [("namespace", &command.namespace), ("app", &command.app)] {
        if !is_dns_label(name) {
            return Err(format!("{what} {name:?} is not a DNS label"));
        }
    }
    if command.set.is_empty() && command.unset.is_empty() {
        return Err("nothing to set or unset".into());
    }
    for name in command.set.keys().chain(&command.unset) {
        if !is_env_name(name) {
            return Err(format!(
                "{name:?} is not a config var name: letters, digits and '_', not starting with a digit, at most 255"
            ));
        }
    }
    if let Some(both) = command.unset.iter().find(|name| command.set.contains_key(*name)) {
        return Err(format!("{both} is both set and unset"));
    }
    let bytes: usize = command.set.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_CONFIG_BYTES {
        return Err(format!(
            "the values are {bytes} bytes; at most {MAX_CONFIG_BYTES} in one command"
        ));
    }
    Ok(())
}

fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// An environment variable name, as config vars are (`[A-Za-z_][A-Za-z0-9_]*`, at most 255).
pub fn is_env_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

/// Unix seconds now.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(set: &[(&str, &str)], unset: &[&str]) -> v1::SetConfig {
        v1::SetConfig {
            namespace: "shop".into(),
            app: "web".into(),
            set: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            unset: unset.iter().map(|k| k.to_string()).collect(),
        }
    }

    #[test]
    fn set_config_commands_are_checked_without_repeating_values() {
        assert!(check_set_config(&command(&[("API_KEY", "s3cret")], &["OLD"])).is_ok());
        let refused = [
            check_set_config(&command(&[], &[])).unwrap_err(),
            check_set_config(&command(&[("1X", "s3cret")], &[])).unwrap_err(),
            check_set_config(&command(&[("A-B", "s3cret")], &[])).unwrap_err(),
            check_set_config(&command(&[("A", "s3cret")], &["A"])).unwrap_err(),
            check_set_config(&v1::SetConfig {
                namespace: "Shop".into(),
                ..command(&[("A", "s3cret")], &[])
            })
            .unwrap_err(),
            check_set_config(&command(&[("BIG", &"x".repeat(MAX_CONFIG_BYTES))], &[])).unwrap_err(),
        ];
        for message in refused {
            assert!(!message.contains("s3cret"), "{message}");
        }
    }

    #[test]
    fn log_streams_tell_builds_from_runs() {
        let chunk = |kind: &str| v1::LogChunk {
            kind: kind.into(),
            namespace: "shop".into(),
            build: "web-1".into(),
            container: "build".into(),
            ..Default::default()
        };
        assert_eq!(log_stream(&chunk("")).unwrap(), "shop/web-1/build");
        assert_eq!(log_stream(&chunk("AppBuild")).unwrap(), "shop/web-1/build");
        assert_eq!(log_stream(&chunk("AppRun")).unwrap(), "shop/runs/web-1/build");
        assert!(log_stream(&chunk("Team")).is_err());
    }
}
