//! The objects a BackingService wants, as pure functions: the generated credentials, the
//! consumers' connection Secret, and the chart values. No client here; unit-tested directly.
//!
//! The chart values name the credentials Secret and its keys, never a credential: the chart
//! (and `helm get values`, and the HelmChart object anyone with read access to the agent's
//! namespace sees) carry no password.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use serde_json::{Map, Value, json};

use super::catalog::Entry;
use crate::api::BackingService;
use crate::controllers::deploy::{Refused, check_yaml_printable, env_list};
use crate::controllers::{MANAGED_BY, MANAGED_BY_LABEL, PROJECT_LABEL};

/// Label naming the BackingService an object belongs to (Secrets, chart objects, PVCs).
pub const SERVICE_LABEL: &str = "apps.shapeblock.io/service";
/// Pod-template annotation: the BackingService generation the template was rendered from.
pub const GENERATION_ANNOTATION: &str = "apps.shapeblock.io/generation";
/// Name of the data volume claim template; PVCs are `data-<workload>-<ordinal>`.
pub const DATA_VOLUME: &str = "data";

/// Names derived from a BackingService.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// Agent-owned Secret the service's pods read their credentials from.
    pub credentials: String,
    /// Standard connection Secret for consumers.
    pub connection: String,
    /// StatefulSet and Service name: `<name>-<type>` (the chart prefixes the key).
    pub workload: String,
    /// In-cluster host of the service.
    pub host: String,
}

impl Names {
    pub fn of(service: &BackingService) -> Self {
        let name = service.name_any();
        let workload = format!("{name}-{}", service.spec.service_type);
        Self {
            credentials: format!("{name}-credentials"),
            connection: connection_secret_name(&name),
            host: format!("{workload}.{}.svc", service.namespace().unwrap_or_default()),
            workload,
        }
    }
}

/// The connection Secret of a BackingService, by name: Apps bind to it without reading the
/// BackingService.
pub fn connection_secret_name(service: &str) -> String {
    format!("{service}-connection")
}

/// Generated credentials, as stored in the credentials Secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    pub root_password: String,
    pub database: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("database", &self.database)
            .finish_non_exhaustive()
    }
}

/// A strong random password: 32 characters from [A-Za-z0-9] (about 190 bits) from the
/// operating system's random source. Alphanumeric so that URIs need no escaping.
pub fn generate_password() -> Result<String, ring::error::Unspecified> {
    use ring::rand::SecureRandom;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let random = ring::rand::SystemRandom::new();
    let mut password = String::with_capacity(32);
    let mut buffer = [0u8; 64];
    while password.len() < 32 {
        random.fill(&mut buffer)?;
        // Rejection sampling keeps every character equally likely (248 = 4 * 62).
        for byte in buffer.iter().filter(|b| **b < 248) {
            if password.len() == 32 {
                break;
            }
            password.push(ALPHABET[(*byte % 62) as usize] as char);
        }
    }
    Ok(password)
}

impl Credentials {
    pub fn generate(entry: &Entry) -> Result<Self, ring::error::Unspecified> {
        Ok(Self {
            username: entry.username.clone(),
            password: generate_password()?,
            root_password: generate_password()?,
            database: entry.database.clone(),
        })
    }

    /// Reads them back from the credentials Secret; `None` if a key is missing.
    pub fn from_secret(secret: &Secret) -> Option<Self> {
        let data = secret.data.as_ref()?;
        let get = |key: &str| data.get(key).and_then(|v| String::from_utf8(v.0.clone()).ok());
        Some(Self {
            username: get("username")?,
            password: get("password")?,
            root_password: get("root-password")?,
            database: get("database")?,
        })
    }
}

fn labels(service: &BackingService) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (PROJECT_LABEL.to_string(), service.namespace().unwrap_or_default()),
        (SERVICE_LABEL.to_string(), service.name_any()),
    ])
}

fn secret(
    service: &BackingService,
    name: &str,
    owner: &OwnerReference,
    data: BTreeMap<&str, String>,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: service.namespace(),
            labels: Some(labels(service)),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            data.into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The agent-owned Secret the service's own pods read (created once, never rewritten).
pub fn credentials_secret(
    service: &BackingService,
    credentials: &Credentials,
    owner: &OwnerReference,
) -> Secret {
    secret(
        service,
        &Names::of(service).credentials,
        owner,
        BTreeMap::from([
            ("username", credentials.username.clone()),
            ("password", credentials.password.clone()),
            ("root-password", credentials.root_password.clone()),
            ("database", credentials.database.clone()),
        ]),
    )
}

/// The consumers' Secret: `host`, `port`, `username`, `password`, `database`, `uri`.
pub fn connection_secret(
    service: &BackingService,
    entry: &Entry,
    credentials: &Credentials,
    owner: &OwnerReference,
) -> Secret {
    let names = Names::of(service);
    let uri = entry.uri(
        &credentials.username,
        &credentials.password,
        &names.host,
        &credentials.database,
    );
    secret(
        service,
        &names.connection,
        owner,
        BTreeMap::from([
            ("host", names.host.clone()),
            ("port", entry.port.to_string()),
            ("username", credentials.username.clone()),
            ("password", credentials.password.clone()),
            ("database", credentials.database.clone()),
            ("uri", uri),
        ]),
    )
}

/// Chart values for the service: one StatefulSet with a `data` claim and one Service, the
/// credentials passed as `secretKeyRef`s. User values are checked against the entry's
/// allow-list and translated; anything else is refused.
///
/// `installed_storage` is the claim size of the running StatefulSet, if any: without a size in
/// the plan it wins over the catalog's default, so an admin changing that default does not
/// make every existing service's upgrade fail on the immutable claim template.
pub fn chart_values(
    service: &BackingService,
    entry: &Entry,
    installed_storage: Option<&str>,
) -> Result<Value, Refused> {
    let empty = Map::new();
    let user = match service.spec.helm_values.as_ref() {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(map)) => map,
        Some(other) => return Err(Refused(format!("must be an object, not {other}"))),
    };
    if let Some(key) = user.keys().find(|k| !entry.allowed_values.contains(k)) {
        let allowed = if entry.allowed_values.is_empty() {
            "none".to_string()
        } else {
            entry.allowed_values.join(", ")
        };
        return Err(Refused(format!(
            "key {key} is not allowed for type {}: allowed are {allowed}",
            service.spec.service_type
        )));
    }
    let version = entry.version(service.spec.version.as_deref()).map_err(Refused)?;
    let names = Names::of(service);
    let name = service.name_any();
    let kind = service.spec.service_type.as_str();

    let mut env: Vec<Value> = entry
        .credential_env
        .iter()
        .map(|(variable, key)| {
            json!({"name": variable, "valueFrom": {"secretKeyRef": {"name": names.credentials, "key": key}}})
        })
        .collect();
    let mut plain: BTreeMap<String, Value> = entry
        .env
        .iter()
        .map(|(k, v)| (k.clone(), json!({"name": k, "value": v})))
        .collect();
    if let Some(user_env) = user.get("env") {
        for item in env_list(user_env)? {
            let variable = item["name"].as_str().unwrap_or_default().to_owned();
            entry
                .check_env(&variable, item["value"].as_str().unwrap_or_default())
                .map_err(Refused)?;
            plain.insert(variable, item);
        }
    }
    env.extend(plain.into_values());

    let mut args: Vec<Value> = entry.args.iter().map(|a| json!(a)).collect();
    if let Some(extra) = user.get("args") {
        let extra: Vec<String> = extra
            .as_array()
            .and_then(|items| items.iter().map(|i| i.as_str().map(str::to_owned)).collect())
            .ok_or_else(|| Refused("args must be a list of strings".into()))?;
        entry.check_args(&extra).map_err(Refused)?;
        args.extend(extra.into_iter().map(Value::String));
    }

    let plan = &service.spec.plan;
    let quantity = |q: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>, default: &str| {
        q.map(|q| q.0.clone()).unwrap_or_else(|| default.to_owned())
    };
    let storage = quantity(
        plan.storage.as_ref(),
        installed_storage.unwrap_or(&entry.defaults.storage),
    );
    let cpu = quantity(plan.cpu.as_ref(), &entry.defaults.cpu);
    let memory = quantity(plan.memory.as_ref(), &entry.defaults.memory);

    let selector = json!({SERVICE_LABEL: name});
    let mut container = json!({
        "name": kind,
        "image": entry.image,
        "imageTag": version,
        "env": env,
        "ports": [{"name": "tcp", "containerPort": entry.port}],
        // Guaranteed memory; CPU may burst above the request.
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": {"memory": memory}},
        "readinessProbe": {"tcpSocket": {"port": entry.port}, "initialDelaySeconds": 5, "periodSeconds": 10},
        // A sub-directory: ext4 volumes carry `lost+found`, which database initialisers refuse.
        "volumeMounts": [{"name": DATA_VOLUME, "mountPath": entry.data_path, "subPath": kind}],
    });
    if !args.is_empty() {
        container["args"] = Value::Array(args);
    }
    let mut claim_spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": storage}},
    });
    if let Some(class) = user.get("storageClassName") {
        let class = class
            .as_str()
            .filter(|c| {
                !c.is_empty()
                    && c.len() <= 253
                    && c.chars()
                        .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ".-".contains(ch))
            })
            .ok_or_else(|| Refused("storageClassName must be a StorageClass name".into()))?;
        claim_spec["storageClassName"] = json!(class);
    }
    let mut statefulset = json!({
        "replicas": 1,
        "serviceName": kind,
        "extraSelectorLabels": selector,
        "containers": [container],
        "volumeClaimTemplates": [{
            // Labelled so that the Delete policy finds them (and Retain reports them).
            "metadata": {"name": DATA_VOLUME, "labels": labels(service)},
            "spec": claim_spec,
        }],
    });
    if let Some(selector) = user.get("nodeSelector") {
        let valid = selector
            .as_object()
            .is_some_and(|m| m.values().all(Value::is_string));
        if !valid {
            return Err(Refused("nodeSelector must map labels to strings".into()));
        }
        statefulset["nodeSelector"] = selector.clone();
    }
    let values = json!({
        // StatefulSet and Service become `<name>-<type>`.
        "releasePrefix": name,
        "generic": {
            "labels": {PROJECT_LABEL: service.namespace().unwrap_or_default(), SERVICE_LABEL: name},
            // (Pods get SERVICE_LABEL from extraSelectorLabels; repeating it in podLabels would
            // render a duplicate key.)
            // Which generation a pod template was rendered from: how "rolled out" is decided.
            "podAnnotations": {GENERATION_ANNOTATION: service.metadata.generation.unwrap_or_default().to_string()},
            "usePredefinedAffinity": false,
        },
        "statefulSets": {kind: statefulset},
        "services": {kind: {
            "extraSelectorLabels": selector,
            "ports": [{"name": "tcp", "port": entry.port, "targetPort": entry.port}],
        }},
    });
    check_yaml_printable(&values, "values")?;
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::super::catalog;
    use super::*;

    pub(crate) fn service(kind: &str, values: Option<Value>) -> BackingService {
        let mut object = json!({
            "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "BackingService",
            "metadata": {"name": "db", "namespace": "shop", "uid": "u-1"},
            "spec": {"type": kind},
        });
        if let Some(values) = values {
            object["spec"]["helmValues"] = values;
        }
        serde_json::from_value(object).unwrap()
    }

    fn owner() -> OwnerReference {
        OwnerReference {
            api_version: "apps.shapeblock.io/v1alpha1".into(),
            kind: "BackingService".into(),
            name: "db".into(),
            uid: "u-1".into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    #[test]
    fn passwords_are_long_alphanumeric_and_distinct() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn every_entry_renders_values_that_name_the_secret_and_hold_no_credential() {
        let catalog = catalog::parse(catalog::BUILTIN).unwrap();
        for (kind, entry) in &catalog {
            let service = service(kind, None);
            let credentials = Credentials::generate(entry).unwrap();
            let values = chart_values(&service, entry, None).unwrap();
            let yaml = crate::controllers::deploy::values_content(&values);
            assert!(!yaml.contains(&credentials.password), "{kind}");
            assert!(!yaml.contains(&credentials.root_password), "{kind}");
            let sts = &values["statefulSets"][kind.as_str()];
            let container = &sts["containers"][0];
            let refs: Vec<&Value> = container["env"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(|e| e.get("valueFrom"))
                .collect();
            assert!(!refs.is_empty(), "{kind}");
            for r in refs {
                assert_eq!(r["secretKeyRef"]["name"], "db-credentials", "{kind}");
            }
            assert_eq!(container["image"], entry.image.as_str());
            assert_eq!(container["imageTag"], entry.default_version.as_str());
            assert_eq!(sts["volumeClaimTemplates"][0]["metadata"]["name"], DATA_VOLUME);
            assert_eq!(
                sts["volumeClaimTemplates"][0]["metadata"]["labels"][SERVICE_LABEL],
                "db"
            );
            assert_eq!(values["services"][kind.as_str()]["ports"][0]["port"], entry.port);
            let connection = connection_secret(&service, entry, &credentials, &owner());
            let data = connection.data.unwrap();
            let keys: Vec<&str> = data.keys().map(String::as_str).collect();
            assert_eq!(keys, ["database", "host", "password", "port", "uri", "username"]);
            let uri = String::from_utf8(data["uri"].0.clone()).unwrap();
            assert!(uri.contains(&credentials.password), "{kind}: {uri}");
            assert!(
                uri.contains(&format!("db-{kind}.shop.svc:{}", entry.port)),
                "{uri}"
            );
        }
    }

    #[test]
    fn plan_and_allowed_user_values_are_translated() {
        let catalog = catalog::parse(catalog::BUILTIN).unwrap();
        let mut pg = service(
            "postgresql",
            Some(json!({"env": {"POSTGRES_INITDB_ARGS": "--data-checksums"},
                        "args": ["-c", "max_connections=200"], "storageClassName": "fast-ssd",
                        "nodeSelector": {"disk": "ssd"}})),
        );
        pg.spec.version = Some("16".into());
        pg.spec.plan.storage = Some(k8s_openapi::apimachinery::pkg::api::resource::Quantity(
            "5Gi".into(),
        ));
        let values = chart_values(&pg, &catalog["postgresql"], Some("2Gi")).unwrap();
        let sts = &values["statefulSets"]["postgresql"];
        let container = &sts["containers"][0];
        assert_eq!(container["imageTag"], "16");
        assert_eq!(container["args"], json!(["-c", "max_connections=200"]));
        assert!(
            container["env"]
                .as_array()
                .unwrap()
                .contains(&json!({"name": "POSTGRES_INITDB_ARGS", "value": "--data-checksums"}))
        );
        let claim = &sts["volumeClaimTemplates"][0]["spec"];
        assert_eq!(claim["resources"]["requests"]["storage"], "5Gi");
        assert_eq!(claim["storageClassName"], "fast-ssd");
        assert_eq!(sts["nodeSelector"]["disk"], "ssd");
        // Redis keeps its password argument ahead of the user's.
        let redis = service("redis", Some(json!({"args": ["--maxmemory", "64mb"]})));
        let values = chart_values(&redis, &catalog["redis"], Some("2Gi")).unwrap();
        let args = values["statefulSets"]["redis"]["containers"][0]["args"].clone();
        assert_eq!(
            values["statefulSets"]["redis"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"],
            "2Gi",
            "without a plan size, the installed claim's size stays"
        );
        assert_eq!(args[1], "$(REDIS_PASSWORD)");
        assert_eq!(args[5], "64mb");
    }

    #[test]
    fn unsafe_or_unknown_user_values_are_refused() {
        let catalog = catalog::parse(catalog::BUILTIN).unwrap();
        for (kind, values, why) in [
            (
                "postgresql",
                json!({"extraDeploy": []}),
                "key extraDeploy is not allowed",
            ),
            (
                "postgresql",
                json!({"env": {"POSTGRES_PASSWORD": "x"}}),
                "generated credentials",
            ),
            ("rabbitmq", json!({"args": ["x"]}), "key args is not allowed"),
            ("redis", json!({"args": "x"}), "list of strings"),
            (
                "mysql",
                json!({"storageClassName": "Bad Class"}),
                "StorageClass name",
            ),
            ("mysql", json!({"nodeSelector": {"a": 1}}), "nodeSelector"),
        ] {
            let err = chart_values(&service(kind, Some(values.clone())), &catalog[kind], None).unwrap_err();
            assert!(err.0.contains(why), "{kind} {values}: {err}");
        }
        let mut old = service("postgresql", None);
        old.spec.version = Some("9.6".into());
        assert!(
            chart_values(&old, &catalog["postgresql"], None)
                .unwrap_err()
                .0
                .contains("not offered")
        );
    }

    #[test]
    fn reserved_variables_and_flags_are_refused_in_every_spelling() {
        let catalog = catalog::parse(catalog::BUILTIN).unwrap();
        let refused = |kind: &str, values: Value| {
            chart_values(&service(kind, Some(values)), &catalog[kind], None)
                .unwrap_err()
                .0
        };
        for (kind, values, why) in [
            (
                "postgresql",
                json!({"env": {"POSTGRES_HOST_AUTH_METHOD": "trust"}}),
                "POSTGRES_HOST_AUTH_METHOD is reserved",
            ),
            (
                "postgresql",
                json!({"env": {"POSTGRES_PASSWORD_FILE": "/x"}}),
                "generated credentials",
            ),
            (
                "postgresql",
                json!({"env": {"POSTGRES_INITDB_ARGS": "--auth=trust"}}),
                "sets --auth",
            ),
            (
                "postgresql",
                json!({"env": {"POSTGRES_INITDB_ARGS": "-Atrust"}}),
                "sets -A",
            ),
            (
                "postgresql",
                json!({"env": {"POSTGRES_INITDB_ARGS": "--data-checksums; echo"}}),
                "shell",
            ),
            (
                "postgresql",
                json!({"args": ["-c", "hba_file=/tmp/trust"]}),
                "sets --hba-file",
            ),
            (
                "postgresql",
                json!({"args": ["-chba_file=/tmp/trust"]}),
                "sets --hba-file",
            ),
            (
                "postgresql",
                json!({"args": ["--HBA-FILE=/tmp/trust"]}),
                "sets --hba-file",
            ),
            (
                "postgresql",
                json!({"args": ["postgres", "-c", "x=1"]}),
                "must start with a flag",
            ),
            (
                "mysql",
                json!({"env": {"MYSQL_ALLOW_EMPTY_PASSWORD": "yes"}}),
                "MYSQL_ALLOW_EMPTY_PASSWORD",
            ),
            (
                "mysql",
                json!({"env": {"MYSQL_RANDOM_ROOT_PASSWORD": "1"}}),
                "MYSQL_RANDOM_ROOT_PASSWORD",
            ),
            (
                "mysql",
                json!({"env": {"MARIADB_ALLOW_EMPTY_ROOT_PASSWORD": "1"}}),
                "MARIADB_ALLOW_EMPTY_ROOT_PASSWORD",
            ),
            (
                "mysql",
                json!({"args": ["--skip-grant-tables"]}),
                "sets --skip-grant-tables",
            ),
            (
                "mysql",
                json!({"args": ["--loose-skip_grant_tables"]}),
                "sets --skip-grant-tables",
            ),
            (
                "mysql",
                json!({"args": ["--grant-tables=0"]}),
                "sets --skip-grant-tables",
            ),
            (
                "mysql",
                json!({"args": ["--init-file=/var/lib/mysql/x.sql"]}),
                "sets --init-file",
            ),
            (
                "redis",
                json!({"args": ["--requirepass", ""]}),
                "sets --requirepass",
            ),
            (
                "redis",
                json!({"args": ["--user default on nopass ~* +@all"]}),
                "sets --user",
            ),
            (
                "redis",
                json!({"args": ["--maxmemory 1mb\nuser default on nopass"]}),
                "line break",
            ),
            (
                "redis",
                json!({"args": ["--protected-mode=no"]}),
                "sets --protected-mode",
            ),
            (
                "redis",
                json!({"args": ["--enable-debug"]}),
                "abbreviates --enable-debug-command",
            ),
            (
                "redis",
                json!({"args": ["--appendonly", "no"]}),
                "sets --appendonly",
            ),
            ("redis", json!({"args": ["-"]}), "prefix of every flag"),
            ("redis", json!({"args": ["--"]}), "abbreviates"),
            ("mongodb", json!({"args": ["--noauth"]}), "sets --noauth"),
            (
                "mongodb",
                json!({"args": ["--transitionToAuth"]}),
                "sets --transitionToAuth",
            ),
            (
                "mongodb",
                json!({"args": ["--setParameter", "enableLocalhostAuthBypass=true"]}),
                "sets --setParameter",
            ),
            (
                "mongodb",
                json!({"env": {"MONGO_INITDB_ROOT_PASSWORD_FILE": "/x"}}),
                "generated credentials",
            ),
            (
                "rabbitmq",
                json!({"env": {"RABBITMQ_ERLANG_COOKIE": "x"}}),
                "RABBITMQ_ERLANG_COOKIE is reserved",
            ),
            (
                "rabbitmq",
                json!({"env": {"ERL_FLAGS": "-rabbit loopback_users []"}}),
                "ERL_FLAGS is reserved",
            ),
        ] {
            let err = refused(kind, values.clone());
            assert!(err.contains(why), "{kind} {values}: {err}");
        }
        // What stays allowed: tuning.
        for (kind, values) in [
            (
                "postgresql",
                json!({"args": ["-c", "max_connections=200", "-cshared_buffers=64MB"],
                                  "env": {"POSTGRES_INITDB_ARGS": "--data-checksums --locale=C.UTF-8"}}),
            ),
            (
                "mysql",
                json!({"args": ["--max-connections=300", "--skip-name-resolve"]}),
            ),
            (
                "redis",
                json!({"args": ["--maxmemory", "64mb", "--maxmemory-policy allkeys-lru"]}),
            ),
            ("mongodb", json!({"args": ["--wiredTigerCacheSizeGB", "0.25"]})),
            (
                "rabbitmq",
                json!({"env": {"RABBITMQ_VM_MEMORY_HIGH_WATERMARK": "0.6"}}),
            ),
        ] {
            chart_values(&service(kind, Some(values.clone())), &catalog[kind], None)
                .unwrap_or_else(|e| panic!("{kind} {values}: {e}"));
        }
    }

    #[test]
    fn catalog_entries_must_say_what_is_reserved() {
        let mut redis = catalog::parse(catalog::BUILTIN).unwrap()["redis"].clone();
        redis.reserved_args.clear();
        redis.args.clear();
        let yaml = serde_yaml::to_string(&BTreeMap::from([("kv", redis)])).unwrap();
        assert!(
            catalog::parse(&yaml)
                .unwrap_err()
                .contains("reservedArgs must list")
        );
        let without = include_str!("../../../../../tests/fixtures/catalog-keyvalue.yaml")
            .lines()
            .filter(|l| !l.starts_with("  reservedEnv"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(catalog::parse(&without).unwrap_err().contains("reservedEnv"));
    }

    mod property {
        use proptest::prelude::*;
        use serde_json::{Map, Value, json};

        use super::super::super::catalog::{self, Entry};
        use super::super::chart_values;
        use super::service;

        /// A reserved flag of `entry` (its `reservedArgs` and the flags of its own `args`),
        /// without dashes, and whether it is a short one.
        fn reserved_flags(entry: &Entry) -> Vec<(String, bool)> {
            entry
                .reserved_args
                .iter()
                .chain(entry.args.iter().filter(|a| a.starts_with('-')))
                .map(|f| match f.strip_prefix("--") {
                    Some(long) => (long.to_string(), false),
                    None => (f[1..].to_string(), true),
                })
                .collect()
        }

        /// One spelling of a reserved flag the engine would read as that flag.
        fn spell(entry: &Entry, flag: &(String, bool), how: u8, word: &str) -> Vec<String> {
            let (name, short) = flag;
            if *short {
                return vec![if how.is_multiple_of(2) {
                    format!("-{name}")
                } else {
                    format!("-{name}{word}")
                }];
            }
            match how % 10 {
                0 => vec![format!("--{name}")],
                1 => vec![format!("--{name}={word}")],
                2 => vec![format!("--{}", name.to_uppercase())],
                3 => vec![format!("--{}", name.replace('-', "_"))],
                4 => vec![format!("--{name} {word}")],
                5 => {
                    let cut = (word.len() % name.len()) + 1;
                    vec![format!("--{}", &name[..cut])]
                }
                6 => match entry.flag_prefixes.first() {
                    Some(prefix) => vec![format!("--{prefix}{name}")],
                    None => vec![format!("--{name}")],
                },
                7 => match entry.setting_flags.first() {
                    Some(setting) => vec![setting.clone(), format!("{name}={word}")],
                    None => vec![format!("--{name}")],
                },
                8 => match entry.setting_flags.first() {
                    Some(setting) => vec![format!("{setting}{}={word}", name.replace('-', "_"))],
                    None => vec![format!("--{name}={word}")],
                },
                // A Redis-style config line smuggled after a harmless option.
                _ => vec![format!("--zz{word} 1\n{name} {word}")],
            }
        }

        fn reserved_variables(entry: &Entry) -> Vec<String> {
            let mut names: Vec<String> = entry.reserved_env.clone();
            for variable in entry.credential_env.keys() {
                names.push(variable.clone());
                names.push(format!("{variable}_FILE"));
            }
            names.extend(entry.env.keys().cloned());
            names
        }

        type Pick = (u8, usize, u8, String);

        fn picks() -> impl Strategy<Value = Vec<Pick>> {
            prop::collection::vec((0u8..6, any::<usize>(), any::<u8>(), "[a-z0-9]{1,8}"), 0..6)
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

            /// Whatever a user puts in `helmValues.env` and `.args`, for every engine: either
            /// refused, or rendered with every reserved variable the agent's (credentials by
            /// `secretKeyRef` from the Secret, catalog variables as the catalog says, reserved
            /// ones absent) and the arguments exactly the agent's then the user's, none of which
            /// spells a reserved flag. And harmless values are not refused.
            #[test]
            fn user_values_never_change_what_the_agent_decides(
                engine in any::<usize>(),
                env_picks in picks(),
                arg_picks in picks(),
            ) {
                let catalog = catalog::parse(catalog::BUILTIN).unwrap();
                let (kind, entry) = catalog.iter().nth(engine % catalog.len()).unwrap();
                let flags = reserved_flags(entry);
                let variables = reserved_variables(entry);
                let mut injected = false;

                let mut env: Map<String, Value> = Map::new();
                let mut env_injected = std::collections::BTreeMap::new();
                for (pick, which, how, word) in &env_picks {
                    let (name, value, bad) = match (pick % 4, entry.arg_env.first()) {
                        (0, _) => (variables[which % variables.len()].clone(), word.clone(), true),
                        (2, Some(var)) => (var.clone(), format!("--zz{word} {word}"), false),
                        (3, Some(var)) if !flags.is_empty() => {
                            let spelled = spell(entry, &flags[which % flags.len()], *how, word);
                            (var.clone(), spelled.join(" "), true)
                        }
                        _ => (format!("ZZ_{}", word.to_uppercase()), word.clone(), false),
                    };
                    env.insert(name.clone(), json!(value));
                    env_injected.insert(name, bad);
                }
                injected |= env_injected.values().any(|bad| *bad);

                let mut args: Vec<String> = Vec::new();
                for (pick, which, how, word) in &arg_picks {
                    match pick % 4 {
                        0 if !flags.is_empty() => {
                            args.extend(spell(entry, &flags[which % flags.len()], *how, word));
                            injected = true;
                        }
                        1 => args.push(word.clone()),
                        2 => match entry.setting_flags.first() {
                            Some(setting) => args.extend([setting.clone(), format!("zz{word}=1")]),
                            None => args.push(format!("--zz{word}={word}")),
                        },
                        _ => args.push(format!("--zz{word}")),
                    }
                }
                let mut values = json!({});
                if !env.is_empty() {
                    values["env"] = Value::Object(env.clone());
                }
                if !args.is_empty() {
                    values["args"] = json!(args);
                }
                let allowed = |key: &str| entry.allowed_values.iter().any(|k| k == key);
                let breaks_a_rule = (!env.is_empty() && !allowed("env"))
                    || (!args.is_empty() && !allowed("args"))
                    || (entry.args.is_empty() && args.first().is_some_and(|a| !a.starts_with('-')));

                match chart_values(&service(kind, Some(values.clone())), entry, None) {
                    Err(refused) => prop_assert!(
                        injected || breaks_a_rule,
                        "{kind}: harmless {values} refused: {refused}"
                    ),
                    Ok(rendered) => {
                        prop_assert!(!injected && !breaks_a_rule, "{kind}: {values} was accepted");
                        let container = &rendered["statefulSets"][kind.as_str()]["containers"][0];
                        let rendered_env = container["env"].as_array().unwrap();
                        let named = |name: &str| rendered_env.iter().filter(|e| e["name"] == name).collect::<Vec<_>>();
                        for (variable, key) in &entry.credential_env {
                            let wanted = json!({"name": variable, "valueFrom": {"secretKeyRef": {"name": "db-credentials", "key": key}}});
                            prop_assert_eq!(named(variable), vec![&wanted]);
                        }
                        for (variable, value) in &entry.env {
                            let wanted = json!({"name": variable, "value": value});
                            prop_assert_eq!(named(variable), vec![&wanted]);
                        }
                        for variable in &entry.reserved_env {
                            prop_assert!(named(variable).is_empty(), "{kind}: {variable} rendered");
                        }
                        for (variable, value) in &env {
                            let wanted = json!({"name": variable, "value": value});
                            prop_assert_eq!(named(variable), vec![&wanted]);
                        }
                        let mut expected: Vec<String> = entry.args.clone();
                        expected.extend(args.iter().cloned());
                        let rendered_args: Vec<String> = container["args"]
                            .as_array()
                            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
                            .unwrap_or_default();
                        prop_assert_eq!(rendered_args, expected);
                    }
                }
            }
        }
    }

    #[test]
    fn debug_never_shows_passwords() {
        let catalog = catalog::parse(catalog::BUILTIN).unwrap();
        let credentials = Credentials::generate(&catalog["mysql"]).unwrap();
        let shown = format!("{credentials:?}");
        assert!(!shown.contains(&credentials.password) && !shown.contains(&credentials.root_password));
        let secret = credentials_secret(&service("mysql", None), &credentials, &owner());
        assert_eq!(Credentials::from_secret(&secret), Some(credentials));
    }
}
