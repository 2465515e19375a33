//! The agent's Helm chart under test: rendered by the real `helm` and server-side applied, as
//! it would land in a cluster.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde::Deserialize;
use shapeblock_testenv as testenv;

use super::api_for;

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
    let mut command = helm();
    command
        .args(["template", "shapeblock-agent"])
        .arg(chart_dir())
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
