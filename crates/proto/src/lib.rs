//! The tunnel protocol: generated types of `proto/shapeblock/agent/v1/agent.proto` and the few
//! conventions both sides share (the CA pin format, the identity in a client certificate, the
//! certificate lifetime policy in [`certificates`]). See `docs/protocol.md`.

pub mod certificates;

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

/// `not_before` and `not_after` of a certificate (DER), Unix seconds.
pub fn validity(der: &[u8]) -> Option<(i64, i64)> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// `not_after` of a certificate (DER), Unix seconds.
pub fn not_after(der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

impl v1::ObjectRef {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        }
    }
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
        // The kind is the agent's words: shown cut, so the reason stays short.
        None => Err(format!(
            "log chunk of kind {}: only AppBuild and AppRun have logs",
            shown(kind)
        )),
    }
}

// ---- names in commands ----
//
// Names and namespaces from the hub become path segments of apiserver requests: one that is
// not what Kubernetes accepts (`/`, `?`, `..`, `%`) would address another object. Both sides
// check every one of them with these functions: the hub before it queues a command, the agent
// before any request.

/// How the objects of a kind the agent manages are named, as its CRD accepts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindNames {
    pub kind: &'static str,
    /// Namespaced; else cluster-scoped, with an empty namespace.
    pub namespaced: bool,
    /// Names are DNS labels of at most this many characters (the CRDs' name rules: 40 where
    /// the name prefixes derived names, 63 otherwise).
    pub max_name: usize,
}

/// Every kind the hub manages through the agent.
pub const MANAGED_KINDS: [KindNames; 6] = [
    KindNames {
        kind: "Project",
        namespaced: false,
        max_name: 63,
    },
    KindNames {
        kind: "App",
        namespaced: true,
        max_name: 40,
    },
    KindNames {
        kind: "AppBuild",
        namespaced: true,
        max_name: 63,
    },
    KindNames {
        kind: "AppRun",
        namespaced: true,
        max_name: 63,
    },
    KindNames {
        kind: "BackingService",
        namespaced: true,
        max_name: 40,
    },
    KindNames {
        kind: "Team",
        namespaced: false,
        max_name: 40,
    },
];

/// The naming rules of a managed kind; `None` for any other kind.
pub fn kind_names(kind: &str) -> Option<KindNames> {
    MANAGED_KINDS.iter().copied().find(|k| k.kind == kind)
}

/// A DNS-1123 label (namespace names, and the names of every managed kind): 1-63 lower-case
/// letters, digits and '-', starting and ending with a letter or digit.
pub fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A DNS-1123 subdomain (what Kubernetes accepts for most object names): at most 253
/// characters of DNS labels joined by '.'.
pub fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// A string the hub sent, for a message: quoted and escaped, at most 64 characters of it.
pub fn shown(value: &str) -> String {
    let mut cut: String = value.chars().take(64).collect();
    if cut.len() < value.len() {
        cut.push('…');
    }
    format!("{cut:?}")
}

const LABEL_RULE: &str = "lower-case letters, digits and '-', starting and ending with a letter or digit";

/// Checks a namespace name; `field` names it in the message.
pub fn check_namespace(field: &str, namespace: &str) -> Result<(), String> {
    if is_dns_label(namespace) {
        Ok(())
    } else {
        Err(format!(
            "{field} {} is not a namespace name: 1-63 {LABEL_RULE}",
            shown(namespace)
        ))
    }
}

/// Checks the name of an object of `kind`; `field` names it in the message.
pub fn check_name(kind: KindNames, field: &str, name: &str) -> Result<(), String> {
    if is_dns_label(name) && name.len() <= kind.max_name {
        Ok(())
    } else {
        Err(format!(
            "{field} {} is not a valid {} name: 1-{} {LABEL_RULE}",
            shown(name),
            kind.kind,
            kind.max_name
        ))
    }
}

/// Checks a reference to a managed object: a known kind, a name its CRD accepts, a namespace
/// name for a namespaced kind and none for a cluster-scoped one.
pub fn check_object(object: &v1::ObjectRef) -> Result<KindNames, String> {
    check_object_named(object, ("namespace", "name"))
}

fn check_object_named(
    object: &v1::ObjectRef,
    (ns_field, name_field): (&str, &str),
) -> Result<KindNames, String> {
    let Some(kind) = kind_names(&object.kind) else {
        return Err(format!(
            "unknown kind {}: the agent manages {}",
            shown(&object.kind),
            MANAGED_KINDS.map(|k| k.kind).join(", ")
        ));
    };
    if kind.namespaced {
        check_namespace(ns_field, &object.namespace)?;
    } else if !object.namespace.is_empty() {
        return Err(format!(
            "{ns_field} {} given for a {}, which is cluster-scoped: leave it empty",
            shown(&object.namespace),
            kind.kind
        ));
    }
    check_name(kind, name_field, &object.name)?;
    Ok(kind)
}

/// A manifest of a managed kind, parsed and checked: the object it names (kind,
/// `metadata.namespace`, `metadata.name`) and its content.
pub fn check_manifest(manifest: &str) -> Result<(v1::ObjectRef, serde_json::Value), String> {
    let value: serde_json::Value =
        serde_yaml::from_str(manifest).map_err(|e| format!("invalid manifest: {e}"))?;
    let text = |pointer: &str| -> Result<String, String> {
        match value.pointer(pointer) {
            None | Some(serde_json::Value::Null) => Ok(String::new()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(format!("{} is not a string", &pointer[1..].replace('/', "."))),
        }
    };
    let object = v1::ObjectRef {
        kind: text("/kind")?,
        namespace: text("/metadata/namespace")?,
        name: text("/metadata/name")?,
    };
    if object.kind.is_empty() {
        return Err("manifest has no kind".into());
    }
    if kind_names(&object.kind).is_some() {
        if object.name.is_empty() {
            return Err("metadata.name is required".into());
        }
        if object.namespace.is_empty() && kind_names(&object.kind).is_some_and(|k| k.namespaced) {
            return Err(format!("metadata.namespace is required for a {}", object.kind));
        }
    }
    check_object_named(&object, ("metadata.namespace", "metadata.name"))?;
    Ok((object, value))
}

/// Checks a [`v1::CancelBuild`]: the namespace and the AppBuild's name.
pub fn check_cancel(command: &v1::CancelBuild) -> Result<(), String> {
    check_object_named(
        &v1::ObjectRef {
            kind: "AppBuild".into(),
            namespace: command.namespace.clone(),
            name: command.build.clone(),
        },
        ("namespace", "build"),
    )
    .map(drop)
}

/// The share of the managed objects in scope one prune removes unless forced, in percent.
pub const DEFAULT_PRUNE_MAX_PERCENT: u32 = 50;

/// Whether a prune scope names nothing (a prune with it is refused).
pub fn scope_is_empty(scope: Option<&v1::PruneScope>) -> bool {
    scope.is_none_or(|s| s.projects.is_empty() && s.kinds.is_empty() && s.namespaces.is_empty())
}

/// Checks the names in a [`v1::Sync`] (each manifest, the prune scope, the share), as the hub
/// does before it queues one. Whether a
/// prune has a scope at all is not checked here: the hub refuses to queue a prune without one,
/// the agent applies such a Sync and refuses its prune.
pub fn check_sync(command: &v1::Sync) -> Result<(), String> {
    for (i, manifest) in command.manifests.iter().enumerate() {
        check_manifest(manifest).map_err(|reason| format!("manifest {}: {reason}", i + 1))?;
    }
    check_prune_options(command)
}

/// Checks what a [`v1::Sync`] says about pruning (the scope's names, the share). The agent
/// checks this before any request, and each manifest as it applies it.
pub fn check_prune_options(command: &v1::Sync) -> Result<(), String> {
    if command.prune_max_percent > 100 {
        return Err(format!(
            "prune_max_percent {} is above 100",
            command.prune_max_percent
        ));
    }
    if let Some(scope) = &command.prune_scope {
        let project = kind_names("Project").unwrap_or(MANAGED_KINDS[0]);
        for name in &scope.projects {
            check_name(project, "prune_scope.projects", name)?;
        }
        for kind in &scope.kinds {
            if kind_names(kind).is_none() {
                return Err(format!(
                    "prune_scope.kinds: unknown kind {}: the agent manages {}",
                    shown(kind),
                    MANAGED_KINDS.map(|k| k.kind).join(", ")
                ));
            }
        }
        for namespace in &scope.namespaces {
            check_namespace("prune_scope.namespaces", namespace)?;
        }
    }
    Ok(())
}

/// Most bytes of secret config values in one [`v1::SetConfig`] (a Secret holds 1 MiB in all).
pub const MAX_CONFIG_BYTES: usize = 512 * 1024;

/// Checks a [`v1::SetConfig`] as both sides must (the hub before queueing it, the agent before
/// acting on it). Messages name variables, never values.
pub fn check_set_config(command: &v1::SetConfig) -> Result<(), String> {
    check_object_named(
        &v1::ObjectRef {
            kind: "App".into(),
            namespace: command.namespace.clone(),
            name: command.app.clone(),
        },
        ("namespace", "app"),
    )?;
    if command.set.is_empty() && command.unset.is_empty() {
        return Err("nothing to set or unset".into());
    }
    for name in command.set.keys().chain(&command.unset) {
        if !is_env_name(name) {
            return Err(format!(
                "{} is not a config var name: letters, digits and '_', not starting with a digit, at most 255",
                // The hub's words, quoted in part (found by the bridge's fuzz target: a
                // 70,000-character name came back whole in the result).
                shown(name)
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

/// An environment variable name, as config vars are (`[A-Za-z_][A-Za-z0-9_]*`, at most 255).
pub fn is_env_name(name: &str) -> bool {
    (1..=255).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
}

// ---- capabilities ----

/// The name `Hello.capabilities` gives a command the agent executes; `None` for server
/// messages that are not commands. Exhaustive on purpose: a new command does not compile
/// until it has a name here, and [`COMMAND_CAPABILITIES`] is checked against this in a test.
pub fn command_capability(body: &v1::server_message::Body) -> Option<&'static str> {
    use v1::server_message::Body;
    match body {
        Body::Apply(_) => Some("apply"),
        Body::Delete(_) => Some("delete"),
        Body::CancelBuild(_) => Some("cancel"),
        Body::Sync(_) => Some("sync"),
        Body::SetConfig(_) => Some("set-config"),
        Body::HelloAck(_)
        | Body::Heartbeat(_)
        | Body::Ack(_)
        | Body::StartAppLogs(_)
        | Body::StopAppLogs(_) => None,
    }
}

/// Every command kind the agent executes, by [`command_capability`]'s names.
pub const COMMAND_CAPABILITIES: [&str; 5] = ["apply", "delete", "cancel", "sync", "set-config"];

/// What the agent does besides commands: level snapshots (`complete-snapshot`: it says when a
/// snapshot lists everything, so the hub may prune by it), build and run logs, periodic
/// inventory, and delivery state tied to the hub's store id.
pub const FEATURE_CAPABILITIES: [&str; 7] = [
    "snapshot",
    "complete-snapshot",
    "logs",
    "run-logs",
    "inventory",
    "store-id",
    APP_LOGS_CAPABILITY,
];

/// The agent follows live App logs (`StartAppLogs`, `StopAppLogs`).
pub const APP_LOGS_CAPABILITY: &str = "app-logs";

// ---- live App logs ----

/// Lines of each container a live follow starts with when the caller does not say.
pub const DEFAULT_TAIL_LINES: u32 = 100;
/// The most a caller may ask for.
pub const MAX_TAIL_LINES: u32 = 10_000;

/// Checks a live follow before its names go into a label selector or a request path: the
/// namespace, the App's name as its CRD accepts it, the process type and the container as
/// DNS labels (label values and container names are), and the tail within its bound.
pub fn check_app_logs(start: &v1::StartAppLogs) -> Result<(), String> {
    check_namespace("namespace", &start.namespace)?;
    let app = kind_names("App").ok_or("no App kind")?;
    check_name(app, "app", &start.app)?;
    for (field, value) in [("process", &start.process), ("container", &start.container)] {
        if !value.is_empty() && !is_dns_label(value) {
            return Err(format!(
                "{field} {} is not a valid {field} name: 1-63 {LABEL_RULE}",
                shown(value)
            ));
        }
    }
    if start.tail_lines.is_some_and(|n| n > MAX_TAIL_LINES) {
        return Err(format!("tail_lines is at most {MAX_TAIL_LINES}"));
    }
    Ok(())
}

/// `Hello.capabilities`: the commands, then the features.
pub fn capabilities() -> Vec<String> {
    COMMAND_CAPABILITIES
        .iter()
        .chain(FEATURE_CAPABILITIES.iter())
        .map(|c| c.to_string())
        .collect()
}

/// Unix milliseconds now.
pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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

    /// Regression (found by the bridge's fuzz target): a config var name of 70,000 characters
    /// came back whole in the failed result, and from there into the hub's store and events.
    #[test]
    fn a_huge_config_var_name_is_quoted_in_part() {
        let name = "x-".repeat(35_000);
        let refused = check_set_config(&command(&[(&name, "v")], &[])).unwrap_err();
        assert!(refused.chars().count() < 200, "{} chars", refused.chars().count());
        assert!(refused.contains("is not a config var name"), "{refused}");
    }

    #[test]
    fn live_log_follows_are_checked_before_their_names_become_a_selector() {
        let start = |namespace: &str, app: &str, process: &str, container: &str| v1::StartAppLogs {
            namespace: namespace.into(),
            app: app.into(),
            process: process.into(),
            container: container.into(),
            ..Default::default()
        };
        assert!(check_app_logs(&start("shop", "web", "", "")).is_ok());
        assert!(check_app_logs(&start("shop", "web", "worker", "worker")).is_ok());
        for (bad, field) in [
            (start("", "web", "", ""), "namespace"),
            (start("shop", "web,x=y", "", ""), "app"),
            (start("shop", &"a".repeat(41), "", ""), "app"),
            (
                start("shop", "web", "web,apps.shapeblock.io/app!=x", ""),
                "process",
            ),
            (start("shop", "web", "", "../x"), "container"),
            (
                v1::StartAppLogs {
                    tail_lines: Some(MAX_TAIL_LINES + 1),
                    ..start("shop", "web", "", "")
                },
                "tail_lines",
            ),
        ] {
            let refused = check_app_logs(&bad).unwrap_err();
            assert!(refused.starts_with(field), "{refused}");
        }
    }

    #[test]
    fn capabilities_name_every_command_the_agent_executes() {
        use v1::server_message::Body;
        let commands = [
            Body::Apply(Default::default()),
            Body::Delete(Default::default()),
            Body::CancelBuild(Default::default()),
            Body::Sync(Default::default()),
            Body::SetConfig(Default::default()),
        ];
        let named: Vec<&str> = commands.iter().filter_map(command_capability).collect();
        assert_eq!(named, COMMAND_CAPABILITIES, "one name per command, in the list");
        for other in [
            Body::HelloAck(Default::default()),
            Body::Heartbeat(Default::default()),
            Body::Ack(Default::default()),
        ] {
            assert_eq!(command_capability(&other), None);
        }
        let all = capabilities();
        assert!(all.iter().any(|c| c == "set-config") && all.iter().any(|c| c == "run-logs"));
        let unique: std::collections::HashSet<&String> = all.iter().collect();
        assert_eq!(unique.len(), all.len());
    }

    fn command(set: &[(&str, &str)], unset: &[&str]) -> v1::SetConfig {
        v1::SetConfig {
            namespace: "shop".into(),
            app: "web".into(),
            set: set.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            unset: unset.iter().map(|k| k.to_string()).collect(),
        }
    }

    /// The rules of a DNS-1123 label, written again independently of [`is_dns_label`]: by
    /// characters, with an explicit alphabet.
    fn oracle_label(s: &str) -> bool {
        const ALNUM: &str = "abcdefghijklmnopqrstuvwxyz0123456789";
        let chars: Vec<char> = s.chars().collect();
        match (chars.first(), chars.last()) {
            (Some(first), Some(last)) => {
                chars.len() <= 63
                    && ALNUM.contains(*first)
                    && ALNUM.contains(*last)
                    && chars.iter().all(|c| ALNUM.contains(*c) || *c == '-')
            }
            _ => false,
        }
    }

    fn oracle_subdomain(s: &str) -> bool {
        s.chars().count() <= 253 && s.split('.').all(oracle_label)
    }

    /// What must never be in a name that reaches a request path.
    fn path_safe(s: &str) -> bool {
        !s.contains(['/', '?', '#', '%'])
            && !s.contains("..")
            && !s.chars().any(|c| c.is_whitespace() || c.is_uppercase())
    }

    /// Strings of every sort: arbitrary Unicode, valid names, names of lengths around the
    /// limits (40, 63), near-valid names, and valid names with one hostile character put in.
    fn names() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            any::<String>(),
            "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?",
            "[a-z0-9]{38,42}|[a-z0-9]{61,65}",
            "[a-z0-9-]{0,70}",
            "[a-z0-9.-]{0,260}",
            "[a-zA-Z0-9./?#% _\t\n%-]{0,70}",
            (
                "[a-z0-9]{1,30}",
                "[/?#%. A-Z\u{00e9}\u{0130}\u{212a}]",
                "[a-z0-9]{0,30}"
            )
                .prop_map(|(a, b, c)| format!("{a}{b}{c}")),
        ]
    }

    const CASES: u32 = 4096;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(CASES))]

        #[test]
        fn the_name_checks_accept_exactly_what_kubernetes_accepts(s in names()) {
            proptest::prop_assert_eq!(is_dns_label(&s), oracle_label(&s));
            proptest::prop_assert_eq!(is_dns_subdomain(&s), oracle_subdomain(&s));
            proptest::prop_assert_eq!(check_namespace("namespace", &s).is_ok(), oracle_label(&s));
            for kind in MANAGED_KINDS {
                let ok = check_name(kind, "name", &s).is_ok();
                proptest::prop_assert_eq!(ok, oracle_label(&s) && s.len() <= kind.max_name);
            }
            if is_dns_subdomain(&s) {
                proptest::prop_assert!(path_safe(&s), "accepted {:?}", s);
            }
        }

        #[test]
        fn object_references_are_checked_whole_and_messages_stay_short(
            kind in proptest::sample::select(vec!["Project", "App", "AppBuild", "AppRun", "BackingService", "Team", "ConfigMap", "", "app"]),
            namespace in names(),
            name in names(),
        ) {
            let object = v1::ObjectRef { kind: kind.into(), namespace: namespace.clone(), name: name.clone() };
            let expected = kind_names(kind).is_some_and(|k| {
                oracle_label(&name)
                    && name.len() <= k.max_name
                    && if k.namespaced { oracle_label(&namespace) } else { namespace.is_empty() }
            });
            match check_object(&object) {
                Ok(_) => {
                    proptest::prop_assert!(expected);
                    proptest::prop_assert!(path_safe(&object.namespace) && path_safe(&object.name));
                }
                Err(message) => {
                    proptest::prop_assert!(!expected);
                    // A hostile name is quoted in part, never in full.
                    proptest::prop_assert!(message.chars().count() < 400, "{}", message);
                }
            }
        }
    }

    #[test]
    fn names_that_would_address_another_object_are_refused() {
        let object = |kind: &str, namespace: &str, name: &str| v1::ObjectRef {
            kind: kind.into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        // The one of the issue: a namespace that turns the path into another App's.
        let refused = check_object(&object("App", "p/apps/x?", "web")).unwrap_err();
        assert!(
            refused.contains("namespace \"p/apps/x?\" is not a namespace name"),
            "{refused}"
        );
        for (kind, namespace, name) in [
            ("App", "shop", "../web"),
            ("App", "shop", "web#x"),
            ("App", "shop", "w%2Fb"),
            ("App", "Shop", "web"),
            ("App", "shop", "web "),
            ("App", "", "web"),
            ("App", "shop", &"a".repeat(41)),
            ("AppBuild", "shop", &"a".repeat(64)),
            ("Project", "shop", "shop"),
            ("Team", "", "a.b"),
            ("ConfigMap", "shop", "web"),
        ] {
            assert!(
                check_object(&object(kind, namespace, name)).is_err(),
                "{kind} {namespace} {name}"
            );
        }
        assert!(check_object(&object("App", "shop", &"a".repeat(40))).is_ok());
        assert!(check_object(&object("AppBuild", "shop", &"a".repeat(63))).is_ok());
        assert!(check_object(&object("Project", "", "shop")).is_ok());
        let cancel = |namespace: &str, build: &str| v1::CancelBuild {
            namespace: namespace.into(),
            build: build.into(),
        };
        assert!(check_cancel(&cancel("shop", "web-1")).is_ok());
        let refused = check_cancel(&cancel("shop", "web-1/../../x")).unwrap_err();
        assert!(refused.starts_with("build \"web-1/../../x\""), "{refused}");
        let refused = check_set_config(&v1::SetConfig {
            app: "a/b".into(),
            ..command(&[("A", "1")], &[])
        })
        .unwrap_err();
        assert!(refused.starts_with("app \"a/b\""), "{refused}");
    }

    #[test]
    fn manifests_are_checked_by_their_metadata() {
        let manifest = |kind: &str, meta: &str| {
            format!("apiVersion: apps.shapeblock.io/v1alpha1\nkind: {kind}\nmetadata: {meta}\nspec: {{}}\n")
        };
        let (object, _) = check_manifest(&manifest("App", "{name: web, namespace: shop}")).unwrap();
        assert_eq!(
            (
                object.kind.as_str(),
                object.namespace.as_str(),
                object.name.as_str()
            ),
            ("App", "shop", "web")
        );
        for (kind, meta, said) in [
            ("App", "{name: web}", "metadata.namespace is required"),
            ("App", "{namespace: shop}", "metadata.name is required"),
            (
                "App",
                "{name: web, namespace: 'a/b?'}",
                "metadata.namespace \"a/b?\"",
            ),
            (
                "App",
                "{name: 'x/../y', namespace: shop}",
                "metadata.name \"x/../y\"",
            ),
            (
                "App",
                "{name: 5, namespace: shop}",
                "metadata.name is not a string",
            ),
            ("Project", "{name: p, namespace: shop}", "cluster-scoped"),
            ("Secret", "{name: x, namespace: shop}", "unknown kind"),
        ] {
            let refused = check_manifest(&manifest(kind, meta)).unwrap_err();
            assert!(refused.contains(said), "{kind} {meta}: {refused}");
        }
        assert!(check_manifest("{").unwrap_err().contains("invalid manifest"));
        assert!(
            check_manifest("metadata: {name: x}")
                .unwrap_err()
                .contains("no kind")
        );
    }

    #[test]
    fn sync_commands_are_checked_whole() {
        let sync = |scope: v1::PruneScope, percent: u32| v1::Sync {
            manifests: vec![
                "apiVersion: apps.shapeblock.io/v1alpha1\nkind: Project\nmetadata: {name: p}\n".into(),
            ],
            prune: true,
            prune_scope: Some(scope),
            prune_max_percent: percent,
            force: false,
        };
        let scope = |projects: &[&str], kinds: &[&str], namespaces: &[&str]| v1::PruneScope {
            projects: projects.iter().map(|s| s.to_string()).collect(),
            kinds: kinds.iter().map(|s| s.to_string()).collect(),
            namespaces: namespaces.iter().map(|s| s.to_string()).collect(),
        };
        assert!(check_sync(&sync(scope(&["p"], &["App"], &["shop"]), 0)).is_ok());
        assert!(
            check_sync(&sync(scope(&["p"], &[], &[]), 101))
                .unwrap_err()
                .contains("above 100")
        );
        assert!(
            check_sync(&sync(scope(&["P/x"], &[], &[]), 0))
                .unwrap_err()
                .contains("prune_scope.projects")
        );
        assert!(
            check_sync(&sync(scope(&[], &["Secret"], &[]), 0))
                .unwrap_err()
                .contains("prune_scope.kinds")
        );
        assert!(
            check_sync(&sync(scope(&[], &[], &["kube system"]), 0))
                .unwrap_err()
                .contains("prune_scope.namespaces")
        );
        let mut bad = sync(scope(&["p"], &[], &[]), 0);
        bad.manifests.push("kind: App\nmetadata: {name: a}\n".into());
        assert!(check_sync(&bad).unwrap_err().starts_with("manifest 2: "));
        assert!(scope_is_empty(None) && scope_is_empty(Some(&scope(&[], &[], &[]))));
        assert!(!scope_is_empty(Some(&scope(&[], &["Team"], &[]))));
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
