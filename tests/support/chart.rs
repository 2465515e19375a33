//! The project's Helm charts under test: rendered by the real `helm` and server-side applied, as
//! it would land in a cluster.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use shapeblock_testenv as testenv;

use super::{api_for, eventually, unique_name};

pub const MANAGER: &str = "shapeblock-chart-test";

pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/shapeblock-agent")
}

pub fn helm() -> Command {
    let mut command = Command::new(testenv::default_bin_dir().join("helm"));
    // No user configuration, cache or plugins from the machine running the tests.
    let home = std::env::temp_dir().join("shapeblock-chart-test-helm");
    command
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"));
    command
}

/// `helm template` of the chart into `namespace` with `--set` values; the documents, or helm's
/// error output.
pub fn render(namespace: &str, values: &[&str]) -> Result<Vec<serde_json::Value>, String> {
    render_chart(&chart_dir(), "shapeblock-agent", namespace, values)
}

pub fn hub_chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/shapeblock-hub")
}

/// `helm template` of the chart at `chart` as release `release`.
pub fn render_chart(
    chart: &Path,
    release: &str,
    namespace: &str,
    values: &[&str],
) -> Result<Vec<serde_json::Value>, String> {
    let mut command = helm();
    command
        .args(["template", release])
        .arg(chart)
        .args(["--namespace", namespace, "--include-crds"]);
    for value in values {
        command.args(["--set", value]);
    }
    let output = command.output().expect("run helm");
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let text = String::from_utf8(output.stdout).unwrap();
    Ok(serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap())
        .filter(|value| !value.is_null())
        .collect())
}

pub fn kinds(documents: &[serde_json::Value]) -> Vec<String> {
    let mut kinds: Vec<String> = documents
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    kinds.sort();
    kinds
}

/// Server-side applies every document (CRDs first, as Helm does), as the chart would land.
pub async fn apply_all(client: &Client, documents: &[serde_json::Value], namespace: &str) {
    let (crds, rest): (Vec<_>, Vec<_>) = documents
        .iter()
        .partition(|d| d["kind"] == "CustomResourceDefinition");
    for document in crds.into_iter().chain(rest) {
        let object: DynamicObject = serde_json::from_value(document.clone()).unwrap();
        let (api, _) = api_for(client, &object, namespace).await;
        api.patch(
            &object.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap_or_else(|e| panic!("apply {} {}: {e}", document["kind"], object.name_any()));
    }
}

/// `helm lint --strict` of the chart passes with nothing to say.
pub fn assert_lint_clean(chart: &Path) {
    let output = helm().arg("lint").arg("--strict").arg(chart).output().unwrap();
    let text =
        String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{text}");
    assert!(
        !text.contains("[WARNING]") && !text.contains("[ERROR]") && !text.contains("[INFO]"),
        "{text}"
    );
}

/// Each set of values fails to render, with helm's error naming what is wrong.
pub fn assert_refused(
    render: impl Fn(&[&str]) -> Result<Vec<serde_json::Value>, String>,
    refused: &[(Vec<&str>, &str)],
) {
    for (values, needle) in refused {
        let err = render(values).expect_err(&format!("{values:?} must be refused"));
        assert!(err.contains(needle), "{values:?}: {err}");
    }
}

/// A namespace that enforces Pod Security `restricted`, so a Pod the chart's Deployments make
/// is refused unless its security context is restricted.
pub async fn restricted_namespace(client: &Client, prefix: &str) -> String {
    let name = unique_name(prefix);
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {
            "shapeblock.io/test": "true",
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/enforce-version": "latest",
        }}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    name
}

/// Waits until the Deployment's ReplicaSet made `replicas` Pods (Pod Security admission
/// would refuse them otherwise).
pub async fn wait_pods(client: &Client, namespace: &str, app: &str, replicas: usize) -> Vec<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector = format!("app.kubernetes.io/name={app}");
    eventually(
        Duration::from_secs(60),
        &format!("{replicas} Pods of {app} in {namespace}"),
        || async {
            let list = pods.list(&ListParams::default().labels(&selector)).await.ok()?;
            (list.items.len() >= replicas).then_some(list.items)
        },
    )
    .await
    .0
}

pub fn env_of(deployment: &Deployment) -> Vec<(String, serde_json::Value)> {
    super::first_container(deployment)
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|e| {
            let value = match (e.value, e.value_from) {
                (Some(v), _) => serde_json::Value::String(v),
                (None, from) => serde_json::to_value(from).unwrap(),
            };
            (e.name, value)
        })
        .collect()
}
