//! Every string a tenant or the hub controls reaches the app chart as data, never as a template.
//!
//! Property test: generated App specs (config, processes, commands, health paths, domains, cron,
//! deploy settings), AppBuild `helmValues` and prebuilt images, and BackingService `helmValues`
//! of every catalog engine are rendered by the agent (`chart_values`) and then by the real
//! `helm template` with the chart the agent embeds. Each case passes only if every input
//! string is a string of the rendered objects byte for byte, every object is of a kind the
//! agent means to create, in the project's namespace, and nothing else was rendered. A case
//! the agent refuses must say why.
//!
//! Regression (end to end on the simulated cluster, real helm-controller and helm): the
//! `lookup` of the agent's identity Secret in a config var, as found on the demo cluster,
//! arrives in the Deployment as the literal text.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, Patch, PatchParams};
use proptest::prelude::*;
use proptest::test_runner::{Config, FileFailurePersistence, TestRunner};
use serde::Deserialize;
use serde_json::{Value, json};
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase, AppPhase, AppSpec, BackingService};
use shapeblock_agent::controllers::backingservice::{catalog, desired};
use shapeblock_agent::controllers::deploy::{Release, UNIVERSAL_CHART, chart_values, values_content};
use shapeblock_testenv as testenv;

const PROJECT: &str = "shop";
const APP: &str = "web";
/// The pull Secrets of every release in these tests: the project's copy of the cluster's and
/// an App's own.
const PULL_SECRETS: &[&str] = &["registry-credentials", "ghcr"];
static PULL_SECRET_NAMES: std::sync::LazyLock<Vec<String>> =
    std::sync::LazyLock::new(|| PULL_SECRETS.iter().map(|s| s.to_string()).collect());
/// The demo cluster's escape, verbatim.
const LOOKUP: &str =
    r#"{{ (lookup "v1" "Secret" "shapeblock" "shapeblock-agent-identity").data | keys | join "," }}"#;

/// Cases per property; `SHAPEBLOCK_VALUES_CASES` raises it for a longer run.
fn cases(default: u32) -> u32 {
    std::env::var("SHAPEBLOCK_VALUES_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        // Found cases become named regression tests below, not files beside the sources.
        failure_persistence: Some(Box::new(FileFailurePersistence::Off)),
        ..Config::default()
    })
}

/// Pieces that mean something to Go templates, YAML, JSON, shells and URLs.
const PIECES: &[&str] = &[
    "{{",
    "}}",
    "{{-",
    "-}}",
    "{{/*",
    "*/}}",
    "{{ .Release.Name }}",
    LOOKUP,
    "{{ include \"x\" . }}",
    "{{ fail \"x\" }}",
    "{{ `",
    "` }}",
    "\n",
    "\r\n",
    "\t",
    ": ",
    "- ",
    "#",
    "---",
    "...",
    "&a",
    "*a",
    "!!binary",
    "'",
    "\"",
    "\\",
    "%",
    "@",
    "`",
    "$(id)",
    "${HOME}",
    "$VAR",
    "true",
    "null",
    "~",
    "0x1F",
    "1e3",
    "0o17",
    "{",
    "}",
    "[",
    "]",
    ",",
    "|",
    ">",
    " ",
    "ü",
    "日本",
    "\u{2028}",
    "\u{2029}",
    "\u{1}",
    "\u{0}",
    "\u{a0}",
    "\u{feff}",
    "kind: Secret",
    "apiVersion: v1",
    "?",
    "=",
    "/",
    "..",
    "<%",
    "%>",
];

/// A string a tenant could put anywhere free text is allowed.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        120 => prop::collection::vec(prop::sample::select(PIECES), 0..8).prop_map(|p| p.concat()),
        40 => "[^\u{7f}-\u{9f}\u{fffe}\u{ffff}]{0,40}",
        40 => Just(LOOKUP.to_string()),
        // What Helm's YAML cannot carry: the agent must refuse it, not break.
        1 => "[\u{7f}-\u{9f}\u{fffe}\u{ffff}]{1,3}",
    ]
}

/// `hostile()` within what a CEL rule allows: no `{{`, no space (health-check paths).
fn path() -> impl Strategy<Value = String> {
    hostile().prop_map(|s| {
        let s: String = s
            .replace("{{", "{")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        format!("/{s}").replace("{{", "{")
    })
}

fn env_name() -> impl Strategy<Value = String> {
    "[A-Za-z_][A-Za-z0-9_]{0,12}"
}

fn dns_label() -> impl Strategy<Value = String> {
    "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
}

fn host() -> impl Strategy<Value = String> {
    prop::collection::vec(dns_label(), 2..4).prop_map(|labels| labels.join("."))
}

fn schedule() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0 3 * * *".to_string()),
        Just("@daily   ".to_string()),
        "[0-9*/,@ a-zA-Z-]{9,30}",
    ]
}

/// An App spec in the shape the apiserver admits, with hostile text wherever it admits text.
fn app_spec() -> impl Strategy<Value = Value> {
    let process = (
        prop::collection::vec(hostile(), 0..4),
        prop::option::of(1..65535i32),
        prop::option::of(path()),
    );
    let processes = prop::collection::btree_map(
        prop_oneof![Just("web".to_string()), "[a-z]([a-z0-9-]{0,6}[a-z0-9])?"],
        process,
        1..4,
    );
    let cron = prop::collection::btree_map(
        "[a-z]([a-z0-9-]{0,6}[a-z0-9])?",
        (schedule(), prop::collection::vec(hostile(), 1..4)),
        0..3,
    );
    (
        prop::collection::btree_map(env_name(), hostile(), 0..6),
        processes,
        prop::collection::btree_set(host(), 0..3),
        cron,
        prop::option::of(dns_label()),
        prop::option::of(host()),
        prop::bool::ANY,
    )
        .prop_map(|(config, processes, domains, cron, class, issuer, buildpack)| {
            let processes: serde_json::Map<String, Value> = processes
                .into_iter()
                .map(|(name, (command, port, path))| {
                    let mut p = json!({"command": command});
                    if name == "web" {
                        p["port"] = json!(port.unwrap_or(8080));
                        if let Some(path) = path {
                            p["healthCheck"] = json!({"path": path, "liveness": true});
                        }
                    }
                    (name, p)
                })
                .collect();
            let has_web = processes.contains_key("web");
            let mut spec = json!({
                "registry": {"url": "registry.example.com"},
                "build": if buildpack { json!({"type": "buildpack"}) } else { json!({"type": "image", "image": "registry.example.com/shop/web:1"}) },
                "config": config,
                "processes": processes,
                "cron": cron.into_iter().map(|(name, (schedule, command))| json!({"name": name, "schedule": schedule, "command": command})).collect::<Vec<_>>(),
            });
            if has_web {
                spec["domains"] = json!(domains.into_iter().map(|h| json!({"host": h})).collect::<Vec<_>>());
            }
            let mut deploy = serde_json::Map::new();
            if let Some(class) = class {
                deploy.insert("ingressClass".into(), json!(class));
            }
            if let Some(issuer) = issuer {
                deploy.insert("certificateIssuer".into(), json!(issuer));
            }
            spec["deploy"] = Value::Object(deploy);
            spec
        })
}

/// An AppBuild's `helmValues`: the web overrides a build may carry.
fn build_values() -> impl Strategy<Value = Option<Value>> {
    prop::option::of(
        (
            prop::collection::btree_map(env_name(), hostile(), 0..4),
            prop::option::of(0..5i64),
            prop::collection::vec(host(), 0..2),
        )
            .prop_map(|(env, replicas, hosts)| {
                let mut values = json!({"env": env});
                if let Some(replicas) = replicas {
                    values["replicas"] = json!(replicas);
                }
                if !hosts.is_empty() {
                    values["ingress"] = json!({"hosts": hosts});
                }
                values
            }),
    )
}

/// A prebuilt image reference: `registry/path:tag`.
fn image() -> impl Strategy<Value = String> {
    (
        "[a-z0-9]([a-z0-9.-]{0,10}[a-z0-9])?(:[0-9]{2,5})?(/[a-z0-9._-]{1,10}){1,3}",
        "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}",
    )
        .prop_map(|(repo, tag)| format!("{repo}:{tag}"))
}

/// Cases the agent refused, by kind of refusal.
#[derive(Default)]
struct Tally {
    refused: AtomicUsize,
    reasons: std::sync::Mutex<BTreeSet<String>>,
}

impl Tally {
    fn refused(&self, message: &str) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        self.reasons.lock().unwrap().insert(reason_of(message));
    }

    /// Prints the counts, and fails unless most of the `total` cases were rendered and checked.
    fn report(self, what: &str, total: u32) {
        let refused = self.refused.into_inner();
        println!(
            "{total} {what} cases: {} rendered by helm and checked, {refused} refused by the agent ({:?})",
            total as usize - refused,
            self.reasons.into_inner().unwrap()
        );
        assert!(
            refused * 2 < total as usize,
            "most cases must render: {refused} of {total} refused"
        );
    }
}

/// A refusal without the text it quotes, to tally refusals by kind.
fn reason_of(message: &str) -> String {
    let message = message.trim_start_matches("helmValues: ");
    message
        .split('"')
        .next()
        .unwrap_or_default()
        .chars()
        .take(40)
        .collect()
}

/// Every string in a rendered document, keys included.
fn strings(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => {
            out.insert(s.clone());
        }
        Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
        Value::Object(map) => map.iter().for_each(|(k, v)| {
            out.insert(k.clone());
            strings(v, out)
        }),
        _ => {}
    }
}

struct Helm {
    chart: PathBuf,
    dir: tempfile::TempDir,
    renders: AtomicUsize,
}

impl Helm {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let chart = dir.path().join("universal-chart.tgz");
        std::fs::write(&chart, UNIVERSAL_CHART).unwrap();
        Helm {
            chart,
            dir,
            renders: AtomicUsize::new(0),
        }
    }

    /// `helm template` of the embedded chart with `values` as the HelmChart carries them
    /// (JSON), with cert-manager's API present so that Certificates render.
    fn template(&self, values: &Value) -> Result<Vec<Value>, String> {
        let n = self.renders.fetch_add(1, Ordering::Relaxed);
        let file = self.dir.path().join(format!("values-{n}.json"));
        // Exactly what the HelmChart carries.
        std::fs::write(&file, values_content(values)).unwrap();
        let home = self.dir.path().join("helm-home");
        let output = Command::new(testenv::default_bin_dir().join("helm"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_DATA_HOME", home.join("data"))
            .args(["template", "release"])
            .arg(&self.chart)
            .args(["--namespace", PROJECT, "--api-versions", "cert-manager.io/v1"])
            .arg("--values")
            .arg(&file)
            .output()
            .expect("run helm");
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).into_owned());
        }
        let text = String::from_utf8(output.stdout).map_err(|e| e.to_string())?;
        serde_yaml::Deserializer::from_str(&text)
            .map(|doc| Value::deserialize(doc).map_err(|e| format!("{e}\n{text}")))
            .filter(|doc| !matches!(doc, Ok(Value::Null)))
            .collect()
    }
}

/// Renders `values` and checks the property; `Err` says how it failed.
fn check_rendered(
    helm: &Helm,
    values: &Value,
    inputs: &BTreeSet<String>,
    kinds: &[&str],
) -> Result<(), String> {
    let documents = helm
        .template(values)
        .map_err(|e| format!("helm refused the agent's values: {e}"))?;
    let mut rendered = BTreeSet::new();
    for document in &documents {
        let kind = document["kind"].as_str().unwrap_or_default();
        if !kinds.contains(&kind) {
            return Err(format!("rendered an unexpected {kind}: {document}"));
        }
        match document["metadata"]["namespace"].as_str() {
            None | Some(PROJECT) => {}
            Some(other) => return Err(format!("rendered a {kind} in namespace {other}")),
        }
        // Every App pod pulls with the release's pull Secrets, in the pod spec itself.
        let pod = match kind {
            "Deployment" => Some(&document["spec"]["template"]["spec"]),
            "CronJob" => Some(&document["spec"]["jobTemplate"]["spec"]["template"]["spec"]),
            _ => None,
        };
        if let Some(pod) = pod {
            let pulls: Vec<&str> = pod["imagePullSecrets"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["name"].as_str())
                .collect();
            if pulls != PULL_SECRETS {
                return Err(format!(
                    "a {kind} pulls with {pulls:?}, not {PULL_SECRETS:?}: {document}"
                ));
            }
        }
        strings(document, &mut rendered);
    }
    for input in inputs {
        if !rendered.contains(input) {
            return Err(format!("{input:?} is not in the rendered objects literally"));
        }
    }
    Ok(())
}

fn release<'a>(
    spec: &'a AppSpec,
    image: &'a str,
    none: &'a BTreeMap<String, i32>,
    processes: &'a BTreeMap<String, String>,
) -> Release<'a> {
    Release {
        project: PROJECT,
        app: APP,
        build: "web-1",
        image,
        runtime: spec,
        config_secret: Some("web-config"),
        config_revision: 1,
        live_replicas: none,
        default_issuer: "letsencrypt",
        build_processes: processes,
        pull_secrets: &PULL_SECRET_NAMES,
    }
}

/// The texts of an App spec and build values that reach the chart.
fn app_inputs(spec: &Value, user: Option<&Value>, image: &str) -> BTreeSet<String> {
    let mut inputs = BTreeSet::from([image.to_string()]);
    let texts = |v: &Value, out: &mut BTreeSet<String>| {
        if let Some(s) = v.as_str() {
            out.insert(s.to_string());
        }
    };
    for value in spec["config"].as_object().into_iter().flat_map(|m| m.values()) {
        texts(value, &mut inputs);
    }
    for process in spec["processes"].as_object().into_iter().flat_map(|m| m.values()) {
        process["command"]
            .as_array()
            .into_iter()
            .flatten()
            .for_each(|c| texts(c, &mut inputs));
        texts(&process["healthCheck"]["path"], &mut inputs);
    }
    for entry in spec["cron"].as_array().into_iter().flatten() {
        texts(&entry["schedule"], &mut inputs);
        entry["command"]
            .as_array()
            .into_iter()
            .flatten()
            .for_each(|c| texts(c, &mut inputs));
    }
    for domain in spec["domains"].as_array().into_iter().flatten() {
        texts(&domain["host"], &mut inputs);
    }
    let domains = spec["domains"].as_array().is_some_and(|d| !d.is_empty());
    let mut ingress_hosts = false;
    // A build's `helmValues` adjust the web process.
    let web = spec["processes"].get("web").is_some();
    if let Some(user) = user.filter(|_| web) {
        for value in user["env"].as_object().into_iter().flat_map(|m| m.values()) {
            texts(value, &mut inputs);
        }
        for host in user["ingress"]["hosts"].as_array().into_iter().flatten() {
            texts(host, &mut inputs);
            ingress_hosts = true;
        }
    }
    // Rendered only where there is an Ingress, and a Certificate (domains default to TLS).
    if domains || ingress_hosts {
        texts(&spec["deploy"]["ingressClass"], &mut inputs);
    }
    if domains {
        texts(&spec["deploy"]["certificateIssuer"], &mut inputs);
    }
    inputs
}

const APP_KINDS: &[&str] = &[
    "Deployment",
    "Service",
    "Ingress",
    "Certificate",
    "HorizontalPodAutoscaler",
    "CronJob",
];
const SERVICE_KINDS: &[&str] = &["StatefulSet", "Service"];

#[test]
fn every_app_string_reaches_the_rendered_objects_literally_and_nothing_else_is_rendered() {
    let helm = Helm::new();
    let tally = Tally::default();
    let total = cases(96);
    runner(total)
        .run(&(app_spec(), build_values(), image()), |(spec, user, image)| {
            let parsed: AppSpec =
                serde_json::from_value(spec.clone()).map_err(|e| TestCaseError::fail(e.to_string()))?;
            let none = BTreeMap::new();
            let processes = BTreeMap::new();
            let release = release(&parsed, &image, &none, &processes);
            let values = match chart_values(&release, user.as_ref()) {
                Ok(values) => values,
                Err(refused_with) => {
                    let message = refused_with.to_string();
                    prop_assert!(!message.is_empty());
                    tally.refused(&message);
                    return Ok(());
                }
            };
            let inputs = app_inputs(&spec, user.as_ref(), &image);
            check_rendered(&helm, &values, &inputs, APP_KINDS).map_err(TestCaseError::fail)?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    tally.report("App", total);
}

#[test]
fn every_backing_service_string_reaches_the_rendered_objects_literally() {
    let helm = Helm::new();
    let catalog = catalog::merged(None).unwrap();
    let engines: Vec<String> = catalog.keys().cloned().collect();
    let tally = Tally::default();
    let total = cases(48);
    let strategy = (
        prop::sample::select(engines),
        prop::collection::btree_map(env_name(), hostile(), 0..4),
        prop::collection::vec(hostile(), 0..4),
        prop::option::of(dns_label()),
        prop::collection::btree_map("[a-z]{1,8}(/[a-z]{1,8})?", hostile(), 0..2),
    );
    runner(total)
        .run(&strategy, |(engine, env, args, class, selector)| {
            let entry = &catalog[&engine];
            let mut user = serde_json::Map::new();
            let allowed = |key: &str| entry.allowed_values.iter().any(|k| k == key);
            if allowed("env") {
                user.insert("env".into(), json!(env));
            }
            if allowed("args") {
                // Flags of the test's own (no engine reserves `--sb-`), values hostile: the
                // catalog refuses a first argument that is not a flag, and reserved flags.
                let args: Vec<String> = args.iter().map(|a| format!("--sb-test={a}")).collect();
                user.insert("args".into(), json!(args));
            }
            if allowed("storageClassName")
                && let Some(class) = &class
            {
                user.insert("storageClassName".into(), json!(class));
            }
            if allowed("nodeSelector") {
                user.insert("nodeSelector".into(), json!(selector));
            }
            let service: BackingService = serde_json::from_value(json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "BackingService",
                "metadata": {"name": "db", "namespace": PROJECT},
                "spec": {"type": engine, "helmValues": user},
            }))
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let values = match desired::chart_values(&service, entry, None) {
                Ok(values) => values,
                Err(refused_with) => {
                    let message = refused_with.to_string();
                    prop_assert!(!message.is_empty());
                    tally.refused(&message);
                    return Ok(());
                }
            };
            let mut inputs = BTreeSet::new();
            for (key, value) in &user {
                match key.as_str() {
                    "env" | "nodeSelector" => value
                        .as_object()
                        .into_iter()
                        .flat_map(|m| m.values())
                        .for_each(|v| {
                            inputs.insert(v.as_str().unwrap().to_string());
                        }),
                    "args" => value.as_array().into_iter().flatten().for_each(|v| {
                        inputs.insert(v.as_str().unwrap().to_string());
                    }),
                    _ => {
                        inputs.insert(value.as_str().unwrap().to_string());
                    }
                }
            }
            check_rendered(&helm, &values, &inputs, SERVICE_KINDS).map_err(TestCaseError::fail)?;
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    tally.report("BackingService", total);
}

#[test]
fn the_embedded_chart_is_upstream_with_only_the_values_helper_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let unpack = |archive: &Path, into: &Path| {
        std::fs::create_dir_all(into).unwrap();
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(archive)
            .arg("-C")
            .arg(into)
            .status()
            .unwrap();
        assert!(status.success());
    };
    let embedded = dir.path().join("embedded.tgz");
    std::fs::write(&embedded, UNIVERSAL_CHART).unwrap();
    unpack(&embedded, &dir.path().join("embedded"));
    unpack(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/agent/assets/universal-chart-2.8.1.tgz"),
        &dir.path().join("upstream"),
    );
    let output = Command::new("diff")
        .args(["-r", "upstream", "embedded"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let diff = String::from_utf8_lossy(&output.stdout);
    let changed: Vec<&str> = diff.lines().filter(|l| l.starts_with("diff ")).collect();
    assert_eq!(
        changed,
        [
            "diff -r upstream/universal-chart/Chart.yaml embedded/universal-chart/Chart.yaml",
            "diff -r upstream/universal-chart/templates/helpers/_tplvalues.tpl embedded/universal-chart/templates/helpers/_tplvalues.tpl",
        ],
        "{diff}"
    );
    let helper = std::fs::read_to_string(
        dir.path()
            .join("embedded/universal-chart/templates/helpers/_tplvalues.tpl"),
    )
    .unwrap();
    let code: String = helper.split("*/ -}}").last().unwrap().into();
    assert!(
        !code.contains("tpl "),
        "the values helper still evaluates templates:\n{helper}"
    );
    // No other template of the chart evaluates a string.
    let status = Command::new("grep")
        .args(["-rlE", r"\btpl\b", "embedded/universal-chart/templates"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let users: Vec<String> = String::from_utf8_lossy(&status.stdout)
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(
        users,
        ["embedded/universal-chart/templates/helpers/_tplvalues.tpl"],
        "templates that call tpl"
    );
}

/// Cases the property test found, kept by name.
#[test]
fn values_that_look_like_yaml_or_templates_stay_strings() {
    let helm = Helm::new();
    let spec: AppSpec = serde_json::from_value(json!({
        "registry": {"url": "registry.example.com"},
        "build": {"type": "image", "image": "registry.example.com/shop/web:1"},
        "config": {
            "PROBE": LOOKUP, "JSON": "{\"a\": {\"b\": [1, 2]}}", "GO_TEMPLATE": "Hello {{ .Name }}!",
            "BOOL": "true", "NULL": "null", "MULTI": "line one\nkind: Secret\n---\n", "NUM": "0x1F",
            "RAW": "{{`{{ x }}`}}", "COMMENT": "{{/* c */}}", "UNICODE": "\u{2028}ü",
        },
        "processes": {"web": {"command": ["sh", "-c", "echo {{ .Values }} $(id)"], "port": 8080}},
        "cron": [{"name": "nightly", "schedule": "0 3 * * *", "command": ["{{ lookup \"v1\" \"Namespace\" \"\" \"\" }}"]}],
    }))
    .unwrap();
    let none = BTreeMap::new();
    let processes = BTreeMap::new();
    let values = chart_values(
        &release(&spec, "registry.example.com/shop/web:1", &none, &processes),
        None,
    )
    .unwrap();
    let raw = serde_json::to_value(&spec).unwrap();
    let inputs = app_inputs(&raw, None, "registry.example.com/shop/web:1");
    assert!(inputs.contains(LOOKUP));
    check_rendered(&helm, &values, &inputs, APP_KINDS).unwrap();
}

/// The demo cluster's escape, end to end: a released config var holding a `lookup` of the
/// agent's identity Secret reaches the Deployment as that text, not as the Secret's keys.
#[tokio::test]
async fn a_lookup_in_a_config_var_is_released_as_text_not_run_by_the_install_job() {
    use support::agent::*;
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "escape").await;
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    create(
        apps.clone(),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "probe"}, "spec": {
            "registry": {"url": "registry.example.com"},
            "build": {"type": "image", "image": "registry.example.com/escape/probe:1"},
            "processes": {"web": {"port": 8080}},
        }}),
    )
    .await;
    wait_app(&env.client, &project, "probe", AppPhase::Ready).await;
    create(
        Api::<AppBuild>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": "probe-1"}, "spec": {"appName": "probe"}}),
    )
    .await;
    wait_build(&env.client, &project, "probe-1", AppBuildPhase::Completed).await;
    // As the tenant did: a config change, released without a build.
    apps.patch(
        "probe",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"config": {"PROBE": LOOKUP, "JSON": "{\"k\": \"{{v}}\"}"}}})),
    )
    .await
    .unwrap();
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &project);
    let (env_vars, _) = support::eventually(
        std::time::Duration::from_secs(120),
        "the config change to be released",
        || async {
            let deployment = deployments.get_opt("probe-web").await.ok()??;
            let container = deployment.spec?.template.spec?.containers.into_iter().next()?;
            let vars: BTreeMap<String, String> = container
                .env
                .unwrap_or_default()
                .into_iter()
                .map(|e| (e.name, e.value.unwrap_or_default()))
                .collect();
            vars.contains_key("PROBE").then_some(vars)
        },
    )
    .await;
    assert_eq!(
        env_vars["PROBE"], LOOKUP,
        "the install Job ran the config var as a template"
    );
    assert_eq!(env_vars["JSON"], "{\"k\": \"{{v}}\"}");
    assert!(!env_vars["PROBE"].contains("tls.key"));

    // What a template could read had one run anyway: the install Job's ServiceAccount may read
    // Secrets in its release's namespace and nowhere else.
    let chart = shapeblock_agent::controllers::deploy::chart_name(&project, "probe");
    let user = format!("system:serviceaccount:{AGENT_NS}:helm-{chart}");
    let other = ready_project(&env.client, "escape-other").await;
    for (namespace, name, verb, allowed) in [
        (project.as_str(), "", "list", true),
        (project.as_str(), "probe-config", "get", true),
        (AGENT_NS, "shapeblock-agent-identity", "get", false),
        (AGENT_NS, "", "list", false),
        (other.as_str(), "", "list", false),
        ("kube-system", "", "list", false),
        ("", "", "list", false),
    ] {
        assert_eq!(
            can(&env.client, &user, verb, "secrets", namespace, name).await,
            allowed,
            "{user} {verb} secrets {namespace}/{name}"
        );
    }
}

/// A SubjectAccessReview: may `user` `verb` `resource` (core group) in `namespace`?
async fn can(
    client: &kube::Client,
    user: &str,
    verb: &str,
    resource: &str,
    namespace: &str,
    name: &str,
) -> bool {
    use k8s_openapi::api::authorization::v1::SubjectAccessReview;
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "spec": {"user": user, "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{}", support::agent::AGENT_NS), "system:authenticated"],
                 "resourceAttributes": {"verb": verb, "resource": resource, "namespace": namespace, "name": name}},
    }))
    .unwrap();
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&Default::default(), &review)
        .await
        .unwrap()
        .status
        .is_some_and(|s| s.allowed)
}
