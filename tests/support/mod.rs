//! Shared helpers for integration tests: one real control plane per test process (or the one
//! named by `SHAPEBLOCK_TEST_KUBECONFIG`), a fresh namespace per test, and YAML helpers.
#![allow(dead_code)]

pub mod agent;
pub mod chart;
pub mod hub;
pub mod hub_process;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use kube::{Client, ResourceExt};
use shapeblock_testenv as testenv;

/// An admin client for the suite's control plane (started on first use).
pub async fn client() -> Client {
    let plane = testenv::shared().unwrap_or_else(|e| panic!("{e}"));
    plane.client().await.expect("client for the test control plane")
}

/// Creates a namespace with a unique name starting with `prefix`, labelled for the test suite.
pub async fn fresh_namespace(client: &Client, prefix: &str) -> String {
    let name = unique_name(prefix);
    let namespace: Namespace = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"shapeblock.io/test": "true"}}
    }))
    .unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create test namespace");
    name
}

/// `prefix-<suffix>`, unique within the suite and across reruns against one cluster.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", testenv::unique_suffix())
}

/// The documents of a YAML file, as JSON values (empty documents skipped).
pub fn yaml_documents(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde_json::Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|value| !value.is_null())
        .collect()
}

use serde::Deserialize;

/// The API for an object's kind (found by discovery), namespaced to `namespace` if the kind is.
pub async fn api_for(
    client: &Client,
    object: &DynamicObject,
    namespace: &str,
) -> (Api<DynamicObject>, ApiCapabilities) {
    let types = object.types.as_ref().expect("object has apiVersion and kind");
    let gvk = GroupVersionKind::try_from(types).expect("valid apiVersion");
    let (resource, caps): (ApiResource, ApiCapabilities) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .unwrap_or_else(|e| panic!("discover {gvk:?}: {e}"));
    let api = match caps.scope {
        Scope::Namespaced => Api::namespaced_with(client.clone(), namespace, &resource),
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    (api, caps)
}

/// Turns a manifest into an object in `namespace` (if namespaced). Cluster-scoped objects get
/// `suffix` appended to their name so that tests sharing a cluster do not collide.
pub async fn place(
    client: &Client,
    manifest: &serde_json::Value,
    namespace: &str,
    suffix: &str,
) -> (Api<DynamicObject>, DynamicObject) {
    let mut object: DynamicObject = serde_json::from_value(manifest.clone()).expect("manifest is an object");
    let (api, caps) = api_for(client, &object, namespace).await;
    match caps.scope {
        Scope::Namespaced => object.metadata.namespace = Some(namespace.to_owned()),
        Scope::Cluster => object.metadata.name = Some(format!("{}-{suffix}", object.name_any())),
    }
    (api, object)
}

/// Polls `check` every 100 ms until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> (T, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return (value, start.elapsed());
        }
        if start.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Events (events.k8s.io) in `namespace` about the object named `name`.
pub async fn events_for(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Vec<k8s_openapi::api::events::v1::Event> {
    Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), namespace)
        .list(&kube::api::ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect()
}

/// Waits for an Event about `name` that `wanted` accepts: the agent publishes Events after the
/// status writes tests wait for, so one may not be there yet when the status is.
pub async fn wait_event(
    client: &Client,
    namespace: &str,
    name: &str,
    wanted: impl Fn(&k8s_openapi::api::events::v1::Event) -> bool,
) -> k8s_openapi::api::events::v1::Event {
    let what = format!("the Event about {namespace}/{name}");
    let found = eventually(Duration::from_secs(15), &what, || async {
        events_for(client, namespace, name)
            .await
            .into_iter()
            .find(|e| wanted(e))
    })
    .await;
    found.0
}

/// The first container of a Deployment's Pod template.
pub fn first_container(
    deployment: &k8s_openapi::api::apps::v1::Deployment,
) -> &k8s_openapi::api::core::v1::Container {
    let template = deployment.spec.as_ref().and_then(|s| s.template.spec.as_ref());
    &template.expect("a Pod template").containers[0]
}
