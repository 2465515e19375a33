//! The Helm chart: its generated parts equal the Rust sources, `helm lint` is clean, and what the
//! real `helm` renders (default values and a non-default set) is accepted by the real apiserver
//! with server-side apply, including Pod Security `restricted` for the Pods it makes.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use support::chart::{
    MANAGER, apply_all, assert_lint_clean, assert_refused, chart_dir, env_of, kinds, render,
    restricted_namespace, wait_pods,
};

#[test]
fn generated_chart_files_match_the_rust_sources() {
    let dir = chart_dir();
    let files = shapeblock_agent::chart::generated_files().unwrap();
    for (relative, expected) in &files {
        let path = dir.join(relative);
        let actual = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            actual == *expected,
            "{} differs from the Rust sources: run `cargo run --bin shapeblock-agent -- chart --out charts/shapeblock-agent`",
            path.display()
        );
    }
    // No stale CRD a renamed kind left behind.
    let mut on_disk: Vec<PathBuf> = std::fs::read_dir(dir.join("crds"))
        .unwrap()
        .map(|e| Path::new("crds").join(e.unwrap().file_name()))
        .collect();
    let mut generated: Vec<PathBuf> = files
        .iter()
        .map(|(p, _)| p.clone())
        .filter(|p| p.starts_with("crds"))
        .collect();
    on_disk.sort();
    generated.sort();
    assert_eq!(on_disk, generated);
}

#[test]
fn helm_lint_is_clean_and_the_schema_refuses_bad_values() {
    assert_lint_clean(&chart_dir());

    let refused = [
        (vec!["hub.address=https://hub.example.com:443"], "caHash"),
        (
            vec!["hub.address=hub.example.com", "hub.caHash=sha256:00"],
            "address",
        ),
        (vec!["replicaCount=0"], "replicaCount"),
        (vec!["log.format=xml"], "format"),
        (vec!["unknownKey=1"], "unknownKey"),
        (
            vec!["leaderElection.renewDeadlineSeconds=20"],
            "renewDeadlineSeconds must be shorter",
        ),
    ];
    assert_refused(|values| render("shapeblock", values), &refused);
}

#[tokio::test]
async fn default_values_render_and_apply_server_side_and_the_pod_is_restricted() {
    let client = support::client().await;
    let namespace = restricted_namespace(&client, "chart-default").await;
    // The namespace really enforces: a Pod without a restricted security context is refused.
    let plain: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "plain"},
        "spec": {"containers": [{"name": "c", "image": "example.com/x:1"}]}
    }))
    .unwrap();
    let refused = Api::<Pod>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &plain)
        .await
        .expect_err("Pod Security restricted is enforced");
    assert!(refused.to_string().contains("restricted"), "{refused}");
    let documents = render(&namespace, &[]).unwrap();
    assert_eq!(
        kinds(&documents),
        [
            "ClusterRole/shapeblock-admin",
            "ClusterRole/shapeblock-agent",
            "ClusterRole/shapeblock-developer",
            "ClusterRole/shapeblock-helm-release",
            "ClusterRole/shapeblock-viewer",
            "ClusterRoleBinding/shapeblock-agent",
            "CustomResourceDefinition/appbuilds.apps.shapeblock.io",
            "CustomResourceDefinition/appruns.apps.shapeblock.io",
            "CustomResourceDefinition/apps.apps.shapeblock.io",
            "CustomResourceDefinition/backingservices.apps.shapeblock.io",
            "CustomResourceDefinition/projects.apps.shapeblock.io",
            "CustomResourceDefinition/teams.apps.shapeblock.io",
            "Deployment/shapeblock-agent",
            "NetworkPolicy/shapeblock-agent",
            "Role/shapeblock-agent",
            "RoleBinding/shapeblock-agent",
            "ServiceAccount/shapeblock-agent",
        ]
    );
    apply_all(&client, &documents, &namespace).await;

    let deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get("shapeblock-agent")
        .await
        .unwrap();
    let env = env_of(&deployment);
    let value = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(value("SHAPEBLOCK_LEADER_ELECT"), Some("true".into()));
    assert_eq!(value("SHAPEBLOCK_HUB_ADDRESS"), None, "no hub by default");
    assert_eq!(value("SHAPEBLOCK_ENROLL_TOKEN"), None, "no token by default");

    let pods = wait_pods(&client, &namespace, "shapeblock-agent", 1).await;
    let spec = pods[0].spec.as_ref().unwrap();
    let security = spec.containers[0].security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(spec.service_account_name.as_deref(), Some("shapeblock-agent"));
    let resources = spec.containers[0].resources.as_ref().unwrap();
    assert!(resources.requests.as_ref().unwrap().contains_key("memory"));
    assert!(resources.limits.as_ref().unwrap().contains_key("memory"));

    // The NetworkPolicy selects the agent's Pods and allows no ingress at all.
    let policy: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
        Api::namespaced(client.clone(), &namespace);
    let policy = policy.get("shapeblock-agent").await.unwrap().spec.unwrap();
    assert_eq!(policy.policy_types.as_deref(), Some(&["Ingress".to_string()][..]));
    assert!(policy.ingress.unwrap_or_default().is_empty());
    let pod_labels = pods[0].labels();
    for (key, value) in policy
        .pod_selector
        .unwrap_or_default()
        .match_labels
        .unwrap_or_default()
    {
        assert_eq!(pod_labels.get(&key), Some(&value), "{key}");
    }
}

/// A stand-in for the Prometheus Operator's CRD: the test cluster has none, and the chart's
/// ServiceMonitor must still be applied somewhere real.
async fn install_service_monitor_crd(client: &Client) {
    let crd = serde_json::json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
        "spec": {
            "group": "monitoring.coreos.com",
            "names": {"kind": "ServiceMonitor", "plural": "servicemonitors", "singular": "servicemonitor", "listKind": "ServiceMonitorList"},
            "scope": "Namespaced",
            "versions": [{"name": "v1", "served": true, "storage": true,
                "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}]
        }
    });
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd: CustomResourceDefinition = serde_json::from_value(crd).unwrap();
    api.patch(
        "servicemonitors.monitoring.coreos.com",
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap();
    kube::runtime::wait::await_condition(
        api,
        "servicemonitors.monitoring.coreos.com",
        kube::runtime::wait::conditions::is_crd_established(),
    )
    .await
    .unwrap();
    // Discovery caches of other clients learn the new kind on their next refresh.
    tokio::time::sleep(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn non_default_values_render_and_apply_server_side() {
    let client = support::client().await;
    install_service_monitor_crd(&client).await;
    let namespace = restricted_namespace(&client, "chart-custom").await;
    let ca_hash = format!("sha256:{}", "ab".repeat(32));
    let values = [
        "hub.address=https://hub.example.com:7443".to_string(),
        format!("hub.caHash={ca_hash}"),
        "enrollment.token=sbt_0123456789abcdef".into(),
        "replicaCount=2".into(),
        "leaderElection.leaseDurationSeconds=30".into(),
        "leaderElection.renewDeadlineSeconds=20".into(),
        "leaderElection.retryPeriodSeconds=4".into(),
        "registrySecret=".into(),
        "log.format=plain".into(),
        "log.level=debug".into(),
        "resources.requests.memory=96Mi".into(),
        "resources.limits.memory=512Mi".into(),
        "serviceMonitor.enabled=true".into(),
        "serviceMonitor.labels.release=prometheus".into(),
        "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring".into(),
        "helmController.install=true".into(),
        "nodeSelector.kubernetes\\.io/os=linux".into(),
        "podAnnotations.example\\.com/team=platform".into(),
        "image.tag=0.1.0-test".into(),
    ];
    let values: Vec<&str> = values.iter().map(String::as_str).collect();
    let documents = render(&namespace, &values).unwrap();
    let kinds = kinds(&documents);
    for expected in [
        "Secret/shapeblock-agent-enrollment",
        "Service/shapeblock-agent-metrics",
        "ServiceMonitor/shapeblock-agent",
        "Deployment/shapeblock-helm-controller",
        "ClusterRole/shapeblock-helm-job",
        "ClusterRole/shapeblock-helm-controller",
        "Role/shapeblock-helm-controller",
    ] {
        assert!(
            kinds.contains(&expected.to_string()),
            "{expected} missing from {kinds:#?}"
        );
    }
    apply_all(&client, &documents, &namespace).await;

    let deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get("shapeblock-agent")
        .await
        .unwrap();
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(2));
    let env = env_of(&deployment);
    let value = |name: &str| env.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    assert_eq!(
        value("SHAPEBLOCK_HUB_ADDRESS"),
        Some("https://hub.example.com:7443".into())
    );
    assert_eq!(value("SHAPEBLOCK_CA_HASH"), Some(ca_hash.clone().into()));
    assert_eq!(value("SHAPEBLOCK_LEASE_DURATION_SECONDS"), Some("30".into()));
    // Set and empty (the apiserver drops `value: ""`): no registry credentials to copy.
    assert_eq!(value("SHAPEBLOCK_REGISTRY_SECRET"), Some(serde_json::Value::Null));
    let token = value("SHAPEBLOCK_ENROLL_TOKEN").unwrap();
    assert_eq!(
        token["secretKeyRef"]["name"], "shapeblock-agent-enrollment",
        "the token comes from the Secret, never a plain value: {token}"
    );
    let rendered = serde_json::to_string(&deployment).unwrap();
    assert!(
        !rendered.contains("sbt_0123456789abcdef"),
        "token in the Deployment"
    );

    // Both Deployments' Pods pass Pod Security `restricted`.
    wait_pods(&client, &namespace, "shapeblock-agent", 2).await;
    wait_pods(&client, &namespace, "shapeblock-helm-controller", 1).await;
}
