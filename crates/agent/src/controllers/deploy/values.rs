//! Helm values for the nxs universal chart (2.8.x), generated from an App, a build and the
//! user's `helmValues` in the documented ShapeBlock shape.
//!
//! Every string here is data: the embedded chart renders values as they are, never through
//! `tpl` (`assets/universal-chart-patch/`), so `{{` in a config var, a command or an env value
//! arrives in the pod spec as written (`tests/values.rs` checks it with the real `helm`). Keys
//! like `extraDeploy`, `hooks` or `serviceAccount` would still render arbitrary objects, so
//! user values are an allow-list of ShapeBlock keys that the agent translates; anything else
//! is refused with `InvalidSpec`.
//!
//! Past 600 lines: the allow-list and its translation are one mapping, kept in one place so a
//! key cannot be accepted in one file and translated in another.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

use crate::api::{AppSpec, BuildResources, BuildType, Process};

/// The ShapeBlock keys an AppBuild's `helmValues` may use. `replicaCount` is the seed's name
/// for `replicas`.
pub const ALLOWED_KEYS: &[&str] = &["replicas", "replicaCount", "port", "env", "ingress", "resources"];

/// Name of the web process's Deployment key and container (`<app>-web`).
pub const WEB: &str = "web";

/// What the generated values describe.
#[derive(Clone, Debug, PartialEq)]
pub struct Release<'a> {
    pub project: &'a str,
    pub app: &'a str,
    pub build: &'a str,
    /// Full image reference, pinned by digest where one is known.
    pub image: &'a str,
    /// What the App runs: its config vars, processes, domains, cron entries.
    pub runtime: &'a AppSpec,
    /// The App's config Secret (secret config vars), read by every process as `envFrom`.
    pub config_secret: Option<&'a str>,
    /// Pods carry it as an annotation: a new revision rolls them.
    pub config_revision: u32,
    /// Live replica counts of autoscaled processes: an upgrade keeps what the autoscaler
    /// chose instead of resetting it (the chart always renders `replicas`).
    pub live_replicas: &'a BTreeMap<String, i32>,
    /// ClusterIssuer of the domains' certificates when the App names none.
    pub default_issuer: &'a str,
    /// Process types the build reported (`AppBuildStatus::process_types`).
    pub build_processes: &'a BTreeMap<String, String>,
    /// Secrets every pod pulls its image with (`registry::pull_secrets`).
    pub pull_secrets: &'a [String],
}

/// Annotation on pod templates: the config revision the pods run with.
pub const CONFIG_REVISION_ANNOTATION: &str = "apps.shapeblock.io/config-revision";
/// Selector label that keeps each process's Deployment and Service apart.
pub const PROCESS_LABEL: &str = "apps.shapeblock.io/process";
/// Default `progressDeadlineSeconds` of a release (the chart's own is 600).
pub const DEFAULT_PROGRESS_DEADLINE: i32 = 300;
/// Seconds a terminating web pod keeps serving, so that endpoints drop it before it stops.
const PRE_STOP_SECONDS: i64 = 5;

/// Why user values were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("helmValues: {0}")]
pub struct Refused(pub String);

/// The build's `helmValues`, checked: they adjust the `web` process.
#[derive(Default)]
struct WebOverrides {
    replicas: Option<i64>,
    port: Option<i64>,
    env: Vec<Value>,
    resources: Option<Value>,
    hosts: Vec<String>,
}

fn web_overrides(user: Option<&Value>) -> Result<WebOverrides, Refused> {
    let empty = Map::new();
    let user = match user {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(map)) => map,
        Some(other) => return Err(Refused(format!("must be an object, not {other}"))),
    };
    let unknown: Vec<&str> = user
        .keys()
        .map(String::as_str)
        .filter(|k| !ALLOWED_KEYS.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(Refused(format!(
            "unknown or unsafe key(s) {}: allowed are {}",
            unknown.join(", "),
            ALLOWED_KEYS.join(", ")
        )));
    }
    let replicas = match (user.get("replicas"), user.get("replicaCount")) {
        (Some(_), Some(_)) => return Err(Refused("set replicas or replicaCount, not both".into())),
        (Some(v), None) | (None, Some(v)) => Some(integer(v, "replicas", 0, 100)?),
        (None, None) => None,
    };
    Ok(WebOverrides {
        replicas,
        port: user
            .get("port")
            .map(|v| integer(v, "port", 1, 65535))
            .transpose()?,
        env: user.get("env").map(env_list).transpose()?.unwrap_or_default(),
        resources: user.get("resources").map(resources).transpose()?,
        hosts: user
            .get("ingress")
            .map(ingress_hosts)
            .transpose()?
            .unwrap_or_default(),
    })
}

/// The App's process types: its own; else those its build found (buildpack process types run
/// as `/cnb/process/<type>`, `Procfile` command lines through a shell); else one `web` process
/// running the image's command.
pub fn processes(spec: &AppSpec, build_processes: &BTreeMap<String, String>) -> BTreeMap<String, Process> {
    if !spec.processes.is_empty() {
        return spec.processes.clone();
    }
    let found: BTreeMap<String, Process> = build_processes
        .iter()
        .filter(|(name, _)| is_process_name(name))
        .map(|(name, line)| {
            let command = match (spec.build.build_type, line.trim()) {
                (BuildType::Buildpack, _) | (_, "") => Vec::new(),
                (_, line) => vec!["/bin/sh".into(), "-c".into(), line.into()],
            };
            let process = Process {
                command,
                ..Process::default()
            };
            (name.clone(), process)
        })
        .collect();
    if found.is_empty() {
        BTreeMap::from([(WEB.to_owned(), Process::default())])
    } else {
        found
    }
}

/// What the CRD requires of a process type name (a build's report is not checked by it).
fn is_process_name(name: &str) -> bool {
    (1..=20).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Name of a process's Deployment (and of the web Service): `<app>-<process>`.
pub fn deployment_name(app: &str, process: &str) -> String {
    format!("{app}-{process}")
}

/// Checks the user's values and renders the App's release in the chart's shape.
pub fn chart_values(release: &Release<'_>, user: Option<&Value>) -> Result<Value, Refused> {
    let web = web_overrides(user)?;
    let spec = release.runtime;
    let processes = processes(spec, release.build_processes);
    let web_process = processes.get(WEB);
    let port = web.port.or(web_process.and_then(|p| p.port).map(i64::from));
    let mut hosts: Vec<(String, bool)> = spec.domains.iter().map(|d| (d.host.clone(), d.tls)).collect();
    for host in &web.hosts {
        if !hosts.iter().any(|(h, _)| h == host) {
            hosts.push((host.clone(), false));
        }
    }
    // The chart writes these as plain YAML scalars (`host: …`, `ingressClassName: …`, the
    // issuer's `name: …`, `image: <repository>:<tag>`), where YAML 1.1 would read `1.2`,
    // `0x1f` or `yes` as a number or a boolean and the apiserver would refuse the object.
    let (repository, tag) = split_image(release.image);
    let deploy = spec.deploy.as_ref();
    let plain = hosts
        .iter()
        .map(|(h, _)| ("host", h.clone()))
        .chain(
            deploy
                .and_then(|d| d.ingress_class.clone())
                .map(|c| ("deploy.ingressClass", c)),
        )
        .chain(
            deploy
                .and_then(|d| d.certificate_issuer.clone())
                .map(|c| ("deploy.certificateIssuer", c)),
        )
        .chain(std::iter::once(("image", format!("{repository}:{tag}"))));
    for (what, text) in plain {
        if reads_as_non_string(&text) {
            return Err(Refused(format!(
                "{what} {text:?} would be read as a number or a boolean by YAML: choose another name"
            )));
        }
    }
    if !hosts.is_empty() && port.is_none() {
        return Err(Refused("ingress needs a port".into()));
    }
    if !hosts.is_empty() && web_process.is_none() {
        return Err(Refused("domains need a web process".into()));
    }

    // Plain config vars, then the build's web variables over them (the user's last word).
    let config_env: Vec<Value> = spec
        .config
        .iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    let container = |name: &str, command: &[String], env: Vec<Value>| {
        let mut container = json!({"name": name, "image": repository, "imageTag": tag});
        let command = launch(spec, name, command);
        if !command.is_empty() {
            // A list: the chart would split a string on spaces.
            container["command"] = json!(command);
        }
        if !env.is_empty() {
            container["env"] = Value::Array(env);
        }
        if let Some(secret) = release.config_secret {
            container["envFrom"] = json!([{"secretRef": {"name": secret}}]);
        }
        container
    };
    let deadline = spec
        .deploy
        .as_ref()
        .and_then(|d| d.progress_deadline_seconds)
        .unwrap_or(DEFAULT_PROGRESS_DEADLINE);

    let mut deployments = Map::new();
    let mut hpas = Map::new();
    for (name, process) in &processes {
        let is_web = name == WEB;
        let env = if is_web {
            merge_env(&config_env, &web.env)
        } else {
            config_env.clone()
        };
        let mut c = container(name, &process.command, env);
        let resources = if is_web { web.resources.clone() } else { None }
            .or_else(|| process.resources.as_ref().map(quantities));
        if let Some(resources) = resources {
            c["resources"] = resources;
        }
        if is_web && let Some(port) = port {
            c["ports"] = json!([{"name": "http", "containerPort": port}]);
            let check = process.health_check.clone().unwrap_or_default();
            let probe = match &check.path {
                Some(path) => json!({"httpGet": {"path": path, "port": "http"}}),
                None => json!({"tcpSocket": {"port": "http"}}),
            };
            let mut readiness = probe.clone();
            readiness["periodSeconds"] = json!(5);
            readiness["failureThreshold"] = json!(3);
            if let Some(delay) = check.initial_delay_seconds {
                readiness["initialDelaySeconds"] = json!(delay);
            }
            c["readinessProbe"] = readiness;
            if check.liveness {
                let mut liveness = probe;
                liveness["periodSeconds"] = json!(10);
                liveness["failureThreshold"] = json!(6);
                liveness["initialDelaySeconds"] = json!(check.initial_delay_seconds.unwrap_or(0).max(10));
                c["livenessProbe"] = liveness;
            }
            // Endpoints drop a terminating pod asynchronously: keep serving meanwhile.
            c["lifecycle"] = json!({"preStop": {"sleep": {"seconds": PRE_STOP_SECONDS}}});
        }
        let asked = if is_web { web.replicas } else { None }.or(process.replicas.map(i64::from));
        let replicas = match &process.autoscaling {
            Some(scaling) => {
                hpas.insert(
                    name.clone(),
                    json!({
                        // The chart defaults to autoscaling/v2beta1, gone since Kubernetes 1.25.
                        "apiVersion": "autoscaling/v2",
                        "scaleTargetRef": {"name": name},
                        "minReplicas": scaling.min_replicas,
                        "maxReplicas": scaling.max_replicas,
                        "metrics": [{"type": "Resource", "resource": {"name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": scaling.target_cpu_percent}}}],
                    }),
                );
                // The autoscaler owns the count: keep it, within the bounds.
                let live = release.live_replicas.get(name).map(|&n| i64::from(n));
                live.or(asked)
                    .unwrap_or(i64::from(scaling.min_replicas))
                    .clamp(i64::from(scaling.min_replicas), i64::from(scaling.max_replicas))
            }
            None => asked.unwrap_or(1),
        };
        deployments.insert(
            name.clone(),
            json!({
                "replicas": replicas,
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "progressDeadlineSeconds": deadline,
                "extraSelectorLabels": {PROCESS_LABEL: name},
                "containers": [c],
            }),
        );
    }

    let mut values = json!({
        // Deployment and Service names become `<app>-<process>`.
        "releasePrefix": release.app,
        "generic": {
            "labels": {
                "apps.shapeblock.io/project": release.project,
                "apps.shapeblock.io/app": release.app,
            },
            "podLabels": {"apps.shapeblock.io/app": release.app},
            // Which build and config a running pod template belongs to: how "rolled out" is
            // decided, and what makes a config change roll the pods.
            "podAnnotations": {
                super::helmchart::BUILD_ANNOTATION: release.build,
                CONFIG_REVISION_ANNOTATION: release.config_revision.to_string(),
            },
            "usePredefinedAffinity": false,
        },
        "deployments": deployments,
    });
    if !release.pull_secrets.is_empty() {
        // The chart's list for every workload it renders (Deployments and CronJobs); its
        // top-level `imagePullSecrets` would make Secrets from values instead.
        values["generic"]["extraImagePullSecrets"] = release
            .pull_secrets
            .iter()
            .map(|name| json!({"name": name}))
            .collect();
    }
    if !hpas.is_empty() {
        values["hpas"] = Value::Object(hpas);
    }
    if let (Some(port), true) = (port, web_process.is_some()) {
        values["services"] = json!({WEB: {
            "extraSelectorLabels": {PROCESS_LABEL: WEB},
            "ports": [{"name": "http", "port": port, "targetPort": port}],
        }});
    }
    if !hosts.is_empty() {
        let class = spec.deploy.as_ref().and_then(|d| d.ingress_class.clone());
        let issuer = spec
            .deploy
            .as_ref()
            .and_then(|d| d.certificate_issuer.clone())
            .unwrap_or_else(|| release.default_issuer.to_owned());
        let mut ingresses = Map::new();
        let mut certificates = Map::new();
        for (host, tls) in hosts {
            let mut ingress =
                json!({"hosts": [{"paths": [{"path": "/", "serviceName": WEB, "servicePort": port}]}]});
            if let Some(class) = &class {
                ingress["ingressClassName"] = json!(class);
            }
            if tls {
                // One mechanism: the chart's Certificate (rendered only where cert-manager's
                // API exists), not the ingress-shim annotations as well.
                let secret = tls_secret_name(release.app, &host);
                ingress["extraTls"] = json!([{"hosts": [host], "secretName": secret}]);
                certificates.insert(
                    certificate_key(&host),
                    json!({
                        "dnsNames": [host],
                        "secretName": secret,
                        "issuerRef": {"originalName": issuer, "kind": "ClusterIssuer", "group": "cert-manager.io"},
                    }),
                );
            }
            ingresses.insert(host, ingress);
        }
        values["ingresses"] = Value::Object(ingresses);
        if !certificates.is_empty() {
            values["certificates"] = Value::Object(certificates);
        }
    }
    if !spec.cron.is_empty() {
        let mut cron = Map::new();
        for entry in &spec.cron {
            cron.insert(
                entry.name.clone(),
                json!({
                    "schedule": entry.schedule,
                    // One run at a time: a slow run is not stacked on.
                    "singleOnly": true,
                    "backoffLimit": 0,
                    "successfulJobsHistoryLimit": 3,
                    "failedJobsHistoryLimit": 3,
                    "containers": [container(&entry.name, &entry.command, config_env.clone())],
                }),
            );
        }
        values["cronJobs"] = Value::Object(cron);
    }
    check_yaml_printable(&values, "values")?;
    Ok(values)
}

/// The pull Secrets of the release `values`, for the release command's and runs' pods.
pub fn pull_secrets_of(values: &Value) -> Vec<String> {
    values["generic"]["extraImagePullSecrets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect()
}

/// The container a release command (or a one-off run) copies: `web`'s as rendered, or the
/// first process's for an App without `web`.
pub fn release_container(values: &Value) -> Value {
    values
        .pointer(&format!("/deployments/{WEB}/containers/0"))
        .or_else(|| {
            values["deployments"]
                .as_object()
                .and_then(|d| d.values().next())
                .map(|d| &d["containers"][0])
        })
        .cloned()
        .unwrap_or_default()
}

/// The command of a process or one-off run. Buildpack images run a process type as
/// `/cnb/process/<type>` and anything else through the lifecycle's launcher (which sets up the
/// buildpacks' environment); other images run the command as given.
pub fn launch(spec: &AppSpec, process: &str, command: &[String]) -> Vec<String> {
    match (spec.build.build_type, command.is_empty()) {
        (BuildType::Buildpack, true) => vec![format!("/cnb/process/{process}")],
        (BuildType::Buildpack, false) => std::iter::once("/cnb/lifecycle/launcher".to_string())
            .chain(command.iter().cloned())
            .collect(),
        (_, _) => command.to_vec(),
    }
}

/// `<host>` → the key of its Certificate in the chart values (`<app>-<key>` is its name).
pub fn certificate_key(host: &str) -> String {
    format!("tls-{}", host.replace('.', "-"))
}

/// The Secret that holds a domain's certificate.
pub fn tls_secret_name(app: &str, host: &str) -> String {
    format!("{app}-{}", certificate_key(host))
}

/// `base` with `over` replacing entries of the same name.
fn merge_env(base: &[Value], over: &[Value]) -> Vec<Value> {
    let mut merged: BTreeMap<String, Value> = BTreeMap::new();
    for entry in base.iter().chain(over) {
        if let Some(name) = entry["name"].as_str() {
            merged.insert(name.to_owned(), entry.clone());
        }
    }
    merged.into_values().collect()
}

fn quantities(resources: &BuildResources) -> Value {
    let mut out = Map::new();
    for (section, map) in [("requests", &resources.requests), ("limits", &resources.limits)] {
        if !map.is_empty() {
            out.insert(
                section.into(),
                map.iter()
                    .map(|(k, v)| (k.clone(), json!(v.0)))
                    .collect::<Map<_, _>>()
                    .into(),
            );
        }
    }
    Value::Object(out)
}

/// `repo[:tag][@digest]` → (`repo`, `tag[@digest]`); the chart joins them with `:`.
pub fn split_image(image: &str) -> (String, String) {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    let last_slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (repository, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], &name[last_slash + i + 1..]),
        None => (name, "latest"),
    };
    let tag = match digest {
        Some(digest) => format!("{tag}@{digest}"),
        None => tag.to_owned(),
    };
    (repository.to_owned(), tag)
}

/// Whether YAML 1.1 (what Helm parses manifests with) reads `text`, written as a plain scalar,
/// as something other than a string: a boolean or null word, or anything number-like (decimal,
/// `0x`/`0o`/`0b` integers, floats with exponents, `.inf`, sexagesimal `1:20`, digits with
/// `_`). Conservative: a few such strings YAML would keep are refused too.
pub(crate) fn reads_as_non_string(text: &str) -> bool {
    const WORDS: &[&str] = &[
        "", "~", "null", "y", "yes", "n", "no", "true", "false", "on", "off",
    ];
    if WORDS.contains(&text.to_ascii_lowercase().as_str()) {
        return true;
    }
    let unsigned = text.strip_prefix(['+', '-']).unwrap_or(text);
    let lower = unsigned.to_ascii_lowercase();
    if [".inf", ".nan"].contains(&lower.as_str()) {
        return true;
    }
    if !unsigned.starts_with(|c: char| c.is_ascii_digit() || c == '.') {
        return false;
    }
    let radix = [("0x", 16), ("0o", 8), ("0b", 2)]
        .iter()
        .find_map(|(prefix, radix)| lower.strip_prefix(prefix).map(|digits| (digits, *radix)));
    if let Some((digits, radix)) = radix {
        return !digits.is_empty() && digits.chars().all(|c| c == '_' || c.is_digit(radix));
    }
    lower.parse::<f64>().is_ok()
        || (lower.chars().any(|c| c.is_ascii_digit())
            && lower.chars().all(|c| c.is_ascii_digit() || "._:e+-".contains(c)))
}

/// Refuses text that Helm cannot carry: it reads values and rendered manifests as YAML 1.1,
/// which forbids DEL, the C1 controls and U+FFFE/U+FFFF even inside quotes and takes NEL
/// (U+0085) for a line break, while JSON (the `valuesContent` and what the chart writes with
/// `toJson`) leaves them unescaped. Every other character arrives as written. `path` names
/// where the text came from.
pub(crate) fn check_yaml_printable(value: &Value, path: &str) -> Result<(), Refused> {
    let unprintable = |s: &str| {
        s.chars()
            .find(|&c| matches!(c, '\u{7f}'..='\u{9f}' | '\u{fffe}' | '\u{ffff}'))
    };
    match value {
        Value::String(s) => match unprintable(s) {
            Some(c) => Err(Refused(format!(
                "{path} contains the control character U+{:04X}, which Helm's YAML cannot carry",
                c as u32
            ))),
            None => Ok(()),
        },
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| check_yaml_printable(v, &format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            check_yaml_printable(&Value::String(k.clone()), path)?;
            check_yaml_printable(v, &format!("{path}.{k}"))
        }),
        _ => Ok(()),
    }
}

fn integer(value: &Value, name: &str, min: i64, max: i64) -> Result<i64, Refused> {
    value.as_i64().filter(|n| (min..=max).contains(n)).ok_or_else(|| {
        Refused(format!(
            "{name} must be an integer from {min} to {max}, not {value}"
        ))
    })
}

/// `env` as a map (the seed's shape) or a list of `{name, value}`.
pub(crate) fn env_list(value: &Value) -> Result<Vec<Value>, Refused> {
    let pairs: Vec<(String, Value)> = match value {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Value::Array(items) => items
            .iter()
            .map(
                |item| match (item.get("name").and_then(Value::as_str), item.get("value")) {
                    (Some(name), Some(value)) if item.as_object().is_some_and(|o| o.len() == 2) => {
                        Ok((name.to_owned(), value.clone()))
                    }
                    _ => Err(Refused(format!("env entries are {{name, value}}, not {item}"))),
                },
            )
            .collect::<Result<_, _>>()?,
        other => return Err(Refused(format!("env must be a map or a list, not {other}"))),
    };
    let mut seen = BTreeMap::new();
    for (name, value) in pairs {
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(Refused(format!("env name {name:?} is not a valid variable name")));
        }
        let text = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(Refused(format!(
                    "env {name} must be a string, number or boolean, not {other}"
                )));
            }
        };
        seen.insert(name, text);
    }
    Ok(seen
        .into_iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect())
}

fn resources(value: &Value) -> Result<Value, Refused> {
    let map = value
        .as_object()
        .ok_or_else(|| Refused("resources must be an object".into()))?;
    let mut out = Map::new();
    for (section, quantities) in map {
        if section != "requests" && section != "limits" {
            return Err(Refused(format!("resources.{section}: only requests and limits")));
        }
        let quantities = quantities
            .as_object()
            .ok_or_else(|| Refused(format!("resources.{section} must be an object")))?;
        let mut checked = Map::new();
        for (name, quantity) in quantities {
            if !["cpu", "memory", "ephemeral-storage"].contains(&name.as_str()) {
                return Err(Refused(format!(
                    "resources.{section}.{name}: only cpu, memory, ephemeral-storage"
                )));
            }
            let text = match quantity {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => {
                    return Err(Refused(format!(
                        "resources.{section}.{name} is not a quantity: {other}"
                    )));
                }
            };
            checked.insert(name.clone(), Value::String(text));
        }
        out.insert(section.clone(), Value::Object(checked));
    }
    Ok(Value::Object(out))
}

/// `ingress: {enabled, hosts: [...]}` (the seed's shape) → the hosts, if enabled.
fn ingress_hosts(value: &Value) -> Result<Vec<String>, Refused> {
    let map = value
        .as_object()
        .ok_or_else(|| Refused("ingress must be an object".into()))?;
    if let Some(key) = map.keys().find(|k| *k != "enabled" && *k != "hosts") {
        return Err(Refused(format!("ingress.{key}: only enabled and hosts")));
    }
    if map.get("enabled").and_then(Value::as_bool) == Some(false) {
        return Ok(Vec::new());
    }
    let hosts = map
        .get("hosts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    hosts
        .iter()
        .map(|h| {
            let host = h
                .as_str()
                .ok_or_else(|| Refused(format!("ingress host {h} is not a string")))?;
            let valid = !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                });
            if valid {
                Ok(host.to_owned())
            } else {
                Err(Refused(format!("ingress host {host:?} is not a DNS name")))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    static NO_LIVE_REPLICAS: BTreeMap<String, i32> = BTreeMap::new();
    static NO_BUILD_PROCESSES: BTreeMap<String, String> = BTreeMap::new();

    fn spec(runtime: Value) -> AppSpec {
        let mut spec = json!({"registry": {"url": "registry.example.com"}, "build": {"type": "image", "image": "nginx"}});
        spec.as_object_mut()
            .unwrap()
            .extend(runtime.as_object().unwrap().clone());
        serde_json::from_value(spec).unwrap()
    }

    fn plain() -> &'static AppSpec {
        Box::leak(Box::new(spec(json!({}))))
    }

    fn release_of(spec: &AppSpec) -> Release<'_> {
        Release {
            project: "shop",
            app: "web",
            build: "web-1",
            image: "registry.example.com/shop/web:abc1234@sha256:0123",
            runtime: spec,
            config_secret: Some("web-config"),
            config_revision: 3,
            live_replicas: &NO_LIVE_REPLICAS,
            default_issuer: "letsencrypt",
            build_processes: &NO_BUILD_PROCESSES,
            pull_secrets: &[],
        }
    }

    fn release() -> Release<'static> {
        release_of(plain())
    }

    /// An App with two process types, a domain with TLS, autoscaling and a cron entry.
    fn sample() -> AppSpec {
        spec(json!({
            "config": {"NODE_ENV": "production", "LOG_LEVEL": "info"},
            "processes": {
                "web": {"command": ["node", "server.js"], "port": 8080, "healthCheck": {"path": "/healthz"},
                        "resources": {"requests": {"cpu": "100m"}}, "autoscaling": {"minReplicas": 2, "maxReplicas": 5, "targetCpuPercent": 70}},
                "worker": {"command": ["node", "worker.js", "--queue=default"], "replicas": 2},
            },
            "domains": [{"host": "shop.example.com"}, {"host": "plain.example.com", "tls": false}],
            "cron": [{"name": "nightly", "schedule": "0 3 * * *", "command": ["node", "report.js"]}],
            "deploy": {"progressDeadlineSeconds": 120, "ingressClass": "nginx"},
        }))
    }

    #[test]
    fn every_process_gets_its_own_deployment_selector_and_the_config() {
        let spec = sample();
        let values = chart_values(&release_of(&spec), None).unwrap();
        let deployments = values["deployments"].as_object().unwrap();
        assert_eq!(deployments.keys().collect::<Vec<_>>(), ["web", "worker"]);
        for (name, deployment) in deployments {
            assert_eq!(deployment["extraSelectorLabels"][PROCESS_LABEL], name.as_str());
            assert_eq!(
                deployment["strategy"]["rollingUpdate"],
                json!({"maxUnavailable": 0, "maxSurge": 1})
            );
            assert_eq!(deployment["progressDeadlineSeconds"], 120);
            let container = &deployment["containers"][0];
            assert_eq!(container["name"], name.as_str());
            assert_eq!(
                container["envFrom"],
                json!([{"secretRef": {"name": "web-config"}}]),
                "secret vars by reference"
            );
            assert_eq!(
                container["env"],
                json!([{"name": "LOG_LEVEL", "value": "info"}, {"name": "NODE_ENV", "value": "production"}])
            );
        }
        let worker = &deployments["worker"];
        assert_eq!(worker["replicas"], 2);
        assert_eq!(
            worker["containers"][0]["command"],
            json!(["node", "worker.js", "--queue=default"])
        );
        assert!(
            worker["containers"][0].get("readinessProbe").is_none(),
            "workers serve no traffic"
        );
        assert_eq!(
            values["services"].as_object().unwrap().len(),
            1,
            "only web has a Service"
        );
        assert_eq!(
            values["services"]["web"]["extraSelectorLabels"][PROCESS_LABEL],
            "web"
        );
        assert_eq!(
            values["generic"]["podAnnotations"][CONFIG_REVISION_ANNOTATION],
            "3"
        );
    }

    #[test]
    fn web_is_health_gated_and_drains_before_it_stops() {
        let spec = sample();
        let values = chart_values(&release_of(&spec), None).unwrap();
        let web = &values["deployments"]["web"]["containers"][0];
        assert_eq!(
            web["readinessProbe"]["httpGet"],
            json!({"path": "/healthz", "port": "http"})
        );
        assert!(web.get("livenessProbe").is_none(), "liveness is opt-in");
        assert_eq!(web["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
        let tcp = spec_with_web(json!({"port": 3000, "healthCheck": {"liveness": true}}));
        let values = chart_values(&release_of(&tcp), None).unwrap();
        let web = &values["deployments"]["web"]["containers"][0];
        assert_eq!(
            web["readinessProbe"]["tcpSocket"]["port"], "http",
            "TCP by default"
        );
        assert_eq!(web["livenessProbe"]["tcpSocket"]["port"], "http");
    }

    fn spec_with_web(web: Value) -> AppSpec {
        spec(json!({"processes": {"web": web}}))
    }

    #[test]
    fn autoscaled_processes_get_a_v2_autoscaler_and_keep_the_live_count() {
        let spec = sample();
        let values = chart_values(&release_of(&spec), None).unwrap();
        let hpa = &values["hpas"]["web"];
        assert_eq!(hpa["apiVersion"], "autoscaling/v2");
        assert_eq!(hpa["scaleTargetRef"]["name"], "web");
        assert_eq!(
            hpa["metrics"][0]["resource"]["target"],
            json!({"type": "Utilization", "averageUtilization": 70})
        );
        assert_eq!(
            values["deployments"]["web"]["replicas"], 2,
            "starts at minReplicas"
        );
        let live = BTreeMap::from([("web".to_string(), 4)]);
        let mut release = release_of(&spec);
        release.live_replicas = &live;
        let values = chart_values(&release, None).unwrap();
        assert_eq!(
            values["deployments"]["web"]["replicas"], 4,
            "an upgrade keeps what the autoscaler chose"
        );
        assert!(values["hpas"].get("worker").is_none());
    }

    #[test]
    fn domains_become_ingress_rules_and_certificates_by_one_mechanism() {
        let spec = sample();
        let values = chart_values(&release_of(&spec), None).unwrap();
        let tls = &values["ingresses"]["shop.example.com"];
        assert_eq!(tls["ingressClassName"], "nginx");
        assert_eq!(tls["hosts"][0]["paths"][0]["servicePort"], 8080);
        assert_eq!(
            tls["extraTls"],
            json!([{"hosts": ["shop.example.com"], "secretName": "web-tls-shop-example-com"}])
        );
        assert!(
            tls.get("certManager").is_none(),
            "no ingress-shim annotations besides the Certificate"
        );
        let certificate = &values["certificates"]["tls-shop-example-com"];
        assert_eq!(certificate["dnsNames"], json!(["shop.example.com"]));
        assert_eq!(certificate["issuerRef"]["originalName"], "letsencrypt");
        assert_eq!(certificate["secretName"], "web-tls-shop-example-com");
        assert!(values["ingresses"]["plain.example.com"].get("extraTls").is_none());
        assert_eq!(values["certificates"].as_object().unwrap().len(), 1);
    }

    #[test]
    fn cron_entries_run_the_image_with_the_config() {
        let spec = sample();
        let values = chart_values(&release_of(&spec), None).unwrap();
        let cron = &values["cronJobs"]["nightly"];
        assert_eq!(cron["schedule"], "0 3 * * *");
        assert_eq!(cron["singleOnly"], true);
        let container = &cron["containers"][0];
        assert_eq!(container["command"], json!(["node", "report.js"]));
        assert_eq!(container["imageTag"], "abc1234@sha256:0123");
        assert_eq!(container["envFrom"][0]["secretRef"]["name"], "web-config");
    }

    #[test]
    fn the_builds_values_have_the_last_word_on_web() {
        let spec = sample();
        let user = json!({"replicas": 3, "env": {"NODE_ENV": "staging"}, "port": 9090});
        let values = chart_values(&release_of(&spec), Some(&user)).unwrap();
        let web = &values["deployments"]["web"];
        assert_eq!(web["replicas"], 3);
        assert_eq!(
            web["containers"][0]["env"],
            json!([{"name": "LOG_LEVEL", "value": "info"}, {"name": "NODE_ENV", "value": "staging"}])
        );
        assert_eq!(values["services"]["web"]["ports"][0]["port"], 9090);
        assert_eq!(
            values["deployments"]["worker"]["containers"][0]["env"][1]["value"],
            "production"
        );
    }

    #[test]
    fn a_worker_only_app_has_no_service_and_refuses_domains() {
        let workers = spec(json!({"processes": {"worker": {"command": ["run"]}}}));
        let values = chart_values(&release_of(&workers), None).unwrap();
        assert!(values.get("services").is_none());
        assert!(values["deployments"].get("web").is_none());
        let with_domain = spec(json!({"processes": {"worker": {}}, "domains": [{"host": "a.example.com"}]}));
        let err = chart_values(&release_of(&with_domain), None).unwrap_err();
        assert!(err.0.contains("port") || err.0.contains("web process"), "{err}");
    }

    #[test]
    fn buildpack_images_run_processes_and_commands_through_the_lifecycle() {
        let mut buildpack = sample();
        buildpack.build.build_type = BuildType::Buildpack;
        buildpack.build.image = None;
        buildpack.processes.get_mut("worker").unwrap().command.clear();
        let values = chart_values(&release_of(&buildpack), None).unwrap();
        assert_eq!(
            values["deployments"]["web"]["containers"][0]["command"],
            json!(["/cnb/lifecycle/launcher", "node", "server.js"])
        );
        assert_eq!(
            values["deployments"]["worker"]["containers"][0]["command"],
            json!(["/cnb/process/worker"])
        );
        assert_eq!(
            values["cronJobs"]["nightly"]["containers"][0]["command"][0],
            "/cnb/lifecycle/launcher"
        );
        let image = sample();
        assert_eq!(
            launch(&image, "web", &[]),
            Vec::<String>::new(),
            "other images keep their entrypoint"
        );
    }

    #[test]
    fn without_processes_an_app_runs_what_its_build_found() {
        let found = BTreeMap::from([
            ("web".to_string(), "node server.js --port $PORT".to_string()),
            ("worker".to_string(), "node worker.js".to_string()),
            ("Bad Name".to_string(), "x".to_string()),
        ]);
        let image = spec(json!({}));
        let mut release = release_of(&image);
        release.build_processes = &found;
        let values = chart_values(&release, None).unwrap();
        let deployments = values["deployments"].as_object().unwrap();
        assert_eq!(
            deployments.keys().collect::<Vec<_>>(),
            ["web", "worker"],
            "invalid names are left out"
        );
        assert_eq!(
            deployments["web"]["containers"][0]["command"],
            json!(["/bin/sh", "-c", "node server.js --port $PORT"]),
            "a Procfile line runs through a shell, as Heroku runs it"
        );
        let mut buildpack = spec(json!({}));
        buildpack.build.build_type = BuildType::Buildpack;
        buildpack.build.image = None;
        let types = BTreeMap::from([
            ("web".to_string(), String::new()),
            ("worker".to_string(), String::new()),
        ]);
        let mut release = release_of(&buildpack);
        release.build_processes = &types;
        let values = chart_values(&release, None).unwrap();
        assert_eq!(
            values["deployments"]["worker"]["containers"][0]["command"],
            json!(["/cnb/process/worker"])
        );
        let declared = sample();
        let mut release = release_of(&declared);
        release.build_processes = &found;
        let values = chart_values(&release, None).unwrap();
        assert_eq!(
            values["deployments"]["web"]["containers"][0]["command"],
            json!(["node", "server.js"]),
            "the App's own processes win"
        );
    }

    #[test]
    fn scale_only_changes_are_told_apart() {
        let spec = sample();
        let before = chart_values(&release_of(&spec), None).unwrap();
        let live = BTreeMap::from([("web".to_string(), 5)]);
        let mut release = release_of(&spec);
        release.live_replicas = &live;
        let after = chart_values(&release, None).unwrap();
        assert!(crate::controllers::release::only_scale_differs(&before, &after));
        release.config_revision = 4;
        let config = chart_values(&release, None).unwrap();
        assert!(!crate::controllers::release::only_scale_differs(&before, &config));
    }

    #[test]
    fn the_seeds_values_become_the_charts_shape() {
        let seed = json!({"replicaCount": 2, "env": {"NODE_ENV": "production"}, "port": 8080,
                          "ingress": {"enabled": true, "hosts": ["myapp.example.com"]}});
        let values = chart_values(&release(), Some(&seed)).unwrap();
        let web = &values["deployments"]["web"];
        assert_eq!(web["replicas"], 2);
        let container = &web["containers"][0];
        assert_eq!(container["name"], "web", "containers are always named");
        assert_eq!(container["image"], "registry.example.com/shop/web");
        assert_eq!(
            container["imageTag"], "abc1234@sha256:0123",
            "the digest is pinned"
        );
        assert_eq!(
            container["env"],
            json!([{"name": "NODE_ENV", "value": "production"}])
        );
        assert_eq!(values["services"]["web"]["ports"][0]["port"], 8080);
        assert_eq!(
            values["ingresses"]["myapp.example.com"]["hosts"][0]["paths"][0]["servicePort"],
            8080
        );
        assert_eq!(
            values["generic"]["podAnnotations"]["apps.shapeblock.io/build"],
            "web-1"
        );
        assert_eq!(values["releasePrefix"], "web");
    }

    #[test]
    fn plain_scalars_yaml_would_not_read_as_strings_are_told_apart() {
        for text in [
            "1.2", "0.0", "123", "0x1f", "0o17", "0b101", "1e3", "1_000", "1:20", "+1", "-2.5", ".5", ".inf",
            "-.Inf", ".nan", "yes", "No", "ON", "off", "y", "true", "Null", "~", "",
        ] {
            assert!(reads_as_non_string(text), "{text:?}");
        }
        for text in [
            "a.0",
            "web",
            "0a.example.com",
            "registry.example.com/shop/web:1",
            "nginx",
            "le-prod",
            "1.2.example",
        ] {
            assert!(!reads_as_non_string(text), "{text:?}");
        }
    }

    #[test]
    fn text_helm_cannot_carry_is_refused_and_everything_else_passes() {
        let refused = check_yaml_printable(&json!({"env": [{"value": "a\u{7f}b"}]}), "values").unwrap_err();
        assert!(refused.0.contains("U+007F"), "{refused}");
        assert!(refused.0.contains("values.env[0].value"), "{refused}");
        assert!(check_yaml_printable(&json!({"k": "\u{9f}"}), "v").is_err());
        assert!(check_yaml_printable(&json!({"k": "\u{ffff}"}), "v").is_err());
        assert!(check_yaml_printable(&json!({"k": "\u{85}"}), "v").is_err());
        assert!(check_yaml_printable(&json!({"k": "tab\tnl\n\u{1}\u{a0}ü日本\u{2028}{{ x }}"}), "v").is_ok());
    }

    #[test]
    fn templates_unknown_and_dangerous_keys_are_refused() {
        for (user, why) in [
            (
                json!({"extraDeploy": [{"kind": "ClusterRoleBinding"}]}),
                "unknown or unsafe key(s) extraDeploy",
            ),
            (json!({"hooks": {}}), "unknown or unsafe key(s) hooks"),
            (json!({"serviceAccount": {"create": true}}), "unknown or unsafe"),
            (
                json!({"replicas": 1000}),
                "replicas must be an integer from 0 to 100",
            ),
            (json!({"replicas": 1, "replicaCount": 2}), "not both"),
            (json!({"env": {"1X": "a"}}), "not a valid variable name"),
            (
                json!({"resources": {"limits": {"nvidia.com/gpu": "1"}}}),
                "only cpu, memory",
            ),
            (
                json!({"ingress": {"hosts": ["a.example.com"]}}),
                "ingress needs a port",
            ),
            (
                json!({"ingress": {"hosts": ["Not A Host"]}, "port": 80}),
                "not a DNS name",
            ),
            (json!("replicas: 3"), "must be an object"),
        ] {
            let err = chart_values(&release(), Some(&user)).unwrap_err();
            assert!(err.0.contains(why), "{user}: {err}");
        }
    }

    #[test]
    fn every_workload_pulls_with_the_release_pull_secrets() {
        let spec = sample();
        let secrets = ["registry-credentials".to_string(), "ghcr".to_string()];
        let release = Release {
            pull_secrets: &secrets,
            ..release_of(&spec)
        };
        let values = chart_values(&release, None).unwrap();
        assert_eq!(
            values["generic"]["extraImagePullSecrets"],
            json!([{"name": "registry-credentials"}, {"name": "ghcr"}])
        );
        assert_eq!(pull_secrets_of(&values), secrets);
        let none = chart_values(&release_of(&spec), None).unwrap();
        assert!(none["generic"].get("extraImagePullSecrets").is_none());
        assert!(pull_secrets_of(&none).is_empty());
    }

    #[test]
    fn no_values_give_one_replica_and_no_service() {
        let values = chart_values(&release(), None).unwrap();
        assert_eq!(values["deployments"]["web"]["replicas"], 1);
        assert!(values.get("services").is_none());
    }

    #[test]
    fn image_references_split_for_the_chart() {
        assert_eq!(split_image("nginx"), ("nginx".into(), "latest".into()));
        assert_eq!(split_image("nginx:1.27"), ("nginx".into(), "1.27".into()));
        assert_eq!(
            split_image("reg:5000/a/b:v1"),
            ("reg:5000/a/b".into(), "v1".into())
        );
        assert_eq!(
            split_image("reg:5000/a/b@sha256:ff"),
            ("reg:5000/a/b".into(), "latest@sha256:ff".into())
        );
    }
}
