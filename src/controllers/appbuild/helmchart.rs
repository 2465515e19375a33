//! The HelmChart (helm.cattle.io/v1) that deploys an App: in the agent's own namespace, never
//! the tenant's. The k3s helm-controller binds a `helm-<name>` ServiceAccount in the
//! HelmChart's namespace to its job role cluster-wide; in a tenant namespace any pod naming that
//! ServiceAccount would get that role. Only the agent can create pods in its namespace.

use std::collections::BTreeMap;

use base64::Engine;
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::controllers::{APP_LABEL, MANAGED_BY, MANAGED_BY_LABEL, PROJECT_LABEL};

/// The nxs universal chart 2.8.1 (Apache-2.0), shipped with the agent so that air-gapped
/// clusters need no chart repository.
pub const UNIVERSAL_CHART: &[u8] = include_bytes!("../../../assets/universal-chart-2.8.1.tgz");

/// Annotation on a HelmChart: the AppBuild it deploys.
pub const BUILD_ANNOTATION: &str = "apps.shapeblock.io/build";

pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart"),
        "helmcharts",
    )
}

/// The HelmChart's name, which is also the Helm release name: the App name and a short hash of
/// the project, so that it is unique in the agent's namespace and stays within Helm's 53.
pub fn chart_name(project: &str, app: &str) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, project.as_bytes());
    let mut hash = String::new();
    for byte in &digest.as_ref()[..4] {
        let _ = write!(hash, "{byte:02x}");
    }
    format!("{app}-{hash}")
}

/// The HelmChart for one App's release.
pub fn helm_chart(
    agent_namespace: &str,
    project: &str,
    app: &str,
    build: &str,
    values: &Value,
) -> DynamicObject {
    let labels = BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (PROJECT_LABEL.to_string(), project.to_string()),
        (APP_LABEL.to_string(), app.to_string()),
    ]);
    let values = serde_yaml::to_string(values).expect("JSON values serialize as YAML");
    let object = json!({
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChart",
        "metadata": {
            "name": chart_name(project, app),
            "namespace": agent_namespace,
            "labels": labels,
            "annotations": {BUILD_ANNOTATION: build},
        },
        "spec": {
            "chartContent": base64::engine::general_purpose::STANDARD.encode(UNIVERSAL_CHART),
            "targetNamespace": project,
            "valuesContent": values,
            // `retry`: a failed upgrade leaves the serving release alone and the next change
            // (the next build) is tried again. `reinstall` would uninstall a live release;
            // `abort` would block every later deploy until an administrator acts.
            "failurePolicy": "retry",
            // A handful of attempts, not the controller's default thousand.
            "backOffLimit": 3,
            "timeout": "5m",
        },
    });
    serde_json::from_value(object).expect("a HelmChart is a valid object")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_helm_and_differ_per_project() {
        let name = chart_name(&"p".repeat(63), &"a".repeat(40));
        assert!(name.len() <= 53, "{name}");
        assert_ne!(chart_name("shop", "web"), chart_name("blog", "web"));
    }

    #[test]
    fn chart_targets_the_project_from_the_agents_namespace() {
        let chart = helm_chart("shapeblock", "shop", "web", "web-1", &json!({"deployments": {}}));
        assert_eq!(chart.metadata.namespace.as_deref(), Some("shapeblock"));
        assert_eq!(chart.data["spec"]["targetNamespace"], "shop");
        assert_eq!(chart.data["spec"]["failurePolicy"], "retry");
        assert!(chart.data["spec"]["chartContent"].as_str().unwrap().len() > 1000);
        assert_eq!(chart.metadata.annotations.unwrap()[BUILD_ANNOTATION], "web-1");
    }
}
