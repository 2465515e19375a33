//! Tenants stay in their Project namespaces: ShapeBlock objects anywhere else are refused with
//! a reason and get nothing made for them, and project pods carry no API token.

mod support;

use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppRun, BackingService};
use support::agent::*;
use support::{eventually, fresh_namespace, wait_event};

/// Status conditions of a namespaced ShapeBlock object, as JSON.
async fn status_of<K>(client: &Client, namespace: &str, name: &str) -> Option<serde_json::Value>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let object = Api::<K>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .ok()??;
    let status = serde_json::to_value(object).ok()?["status"].clone();
    status.is_object().then_some(status)
}

async fn refused<K>(client: &Client, namespace: &str, name: &str) -> serde_json::Value
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
{
    let (status, _) = eventually(
        TIMEOUT,
        &format!("{} {namespace}/{name} to be refused", K::kind(&())),
        || async {
            let status = status_of::<K>(client, namespace, name).await?;
            let ready = status["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == "Ready")?
                .clone();
            (ready["reason"] == "NotAProjectNamespace" && ready["status"] == "False").then_some(status)
        },
    )
    .await;
    assert_eq!(status["phase"], "Failed", "{status}");
    assert!(
        status["message"].as_str().unwrap().contains(namespace),
        "{status}"
    );
    wait_event(client, namespace, name, |e| {
        e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some("NotAProjectNamespace")
    })
    .await;
    status
}

fn app(name: &str) -> serde_json::Value {
    json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": name}, "spec": {
        "registry": {"url": "registry.example.com"},
        "build": {"type": "image", "image": "registry.example.com/x/web:1"},
    }})
}

#[tokio::test]
async fn shapeblock_objects_outside_project_namespaces_are_refused_and_get_nothing() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let client = &env.client;
    // A namespace someone else made, the agent's own, and kube-system.
    let foreign = fresh_namespace(client, "not-a-project").await;
    for namespace in [foreign.as_str(), AGENT_NS, "kube-system"] {
        create(Api::<App>::namespaced(client.clone(), namespace), app("intruder")).await;
        create(
            Api::<AppBuild>::namespaced(client.clone(), namespace),
            json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": "intruder-1"}, "spec": {"appName": "intruder"}}),
        )
        .await;
        create(
            Api::<AppRun>::namespaced(client.clone(), namespace),
            json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppRun", "metadata": {"name": "intruder-run"}, "spec": {"appName": "intruder", "command": ["id"]}}),
        )
        .await;
        create(
            Api::<BackingService>::namespaced(client.clone(), namespace),
            json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "BackingService", "metadata": {"name": "intruder-db"}, "spec": {"type": "postgresql"}}),
        )
        .await;
        refused::<App>(client, namespace, "intruder").await;
        refused::<AppBuild>(client, namespace, "intruder-1").await;
        refused::<AppRun>(client, namespace, "intruder-run").await;
        refused::<BackingService>(client, namespace, "intruder-db").await;
    }
    // Nothing was made for them: no finalizer that could hold a namespace, no Job, no HelmChart.
    let charts = Api::<DynamicObject>::namespaced_with(
        client.clone(),
        AGENT_NS,
        &shapeblock_agent::controllers::deploy::helm_chart_resource(),
    );
    for namespace in [foreign.as_str(), AGENT_NS, "kube-system"] {
        let app = Api::<App>::namespaced(client.clone(), namespace)
            .get("intruder")
            .await
            .unwrap();
        assert!(app.finalizers().is_empty(), "{:?}", app.finalizers());
        let jobs = Api::<Job>::namespaced(client.clone(), namespace)
            .list(&ListParams::default().labels("app.kubernetes.io/managed-by=shapeblock-agent"))
            .await
            .unwrap();
        assert!(
            jobs.items.is_empty(),
            "Jobs in {namespace}: {:?}",
            jobs.items.iter().map(|j| j.name_any()).collect::<Vec<_>>()
        );
    }
    let charts = charts.list(&ListParams::default()).await.unwrap();
    assert!(
        !charts.items.iter().any(|c| c.name_any().starts_with("intruder")),
        "HelmCharts: {:?}",
        charts.items.iter().map(|c| c.name_any()).collect::<Vec<_>>()
    );

    // A namespace labelled like a project by someone else is still not the agent's project
    // unless the labels name it: a label for another project does not pass.
    let spoofed = fresh_namespace(client, "spoofed").await;
    let namespaces = Api::<Namespace>::all(client.clone());
    namespaces
        .patch(
            &spoofed,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(json!({"metadata": {"labels": {
                "app.kubernetes.io/managed-by": "shapeblock-agent", "apps.shapeblock.io/project": "someone-else"}}})),
        )
        .await
        .unwrap();
    create(Api::<App>::namespaced(client.clone(), &spoofed), app("intruder")).await;
    refused::<App>(client, &spoofed, "intruder").await;

    // Objects in a real Project namespace are served as before.
    let project = ready_project(client, "served").await;
    create(Api::<App>::namespaced(client.clone(), &project), app("web")).await;
    wait_app(client, &project, "web", shapeblock_agent::api::AppPhase::Ready).await;
    // And the refused ones go away when deleted: nothing holds them.
    for namespace in [foreign.as_str(), AGENT_NS, "kube-system"] {
        let apps = Api::<App>::namespaced(client.clone(), namespace);
        apps.delete("intruder", &Default::default()).await.unwrap();
        eventually(Duration::from_secs(10), "the refused App to go", || async {
            apps.get_opt("intruder").await.unwrap().is_none().then_some(())
        })
        .await;
        Api::<AppBuild>::namespaced(client.clone(), namespace)
            .delete("intruder-1", &Default::default())
            .await
            .unwrap();
        Api::<AppRun>::namespaced(client.clone(), namespace)
            .delete("intruder-run", &Default::default())
            .await
            .unwrap();
        Api::<BackingService>::namespaced(client.clone(), namespace)
            .delete("intruder-db", &Default::default())
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn project_pods_get_no_service_account_token() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "tokens").await;
    let accounts = Api::<ServiceAccount>::namespaced(env.client.clone(), &project);
    let (account, _) = eventually(TIMEOUT, "the default ServiceAccount", || async {
        accounts.get_opt("default").await.unwrap()
    })
    .await;
    assert_eq!(account.automount_service_account_token, Some(false));
    // A pod that names no ServiceAccount gets no token volume (the admission plugin decides).
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(env.client.clone(), &project);
    let pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(json!({
        "metadata": {"name": "probe"},
        "spec": {"containers": [{"name": "c", "image": "registry.example.com/x:1"}]},
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let spec = created.spec.unwrap();
    assert_eq!(spec.service_account_name.as_deref(), Some("default"));
    let token_volumes: Vec<String> = spec
        .volumes
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.projected.is_some())
        .map(|v| v.name)
        .collect();
    assert!(token_volumes.is_empty(), "token volumes: {token_volumes:?}");
    pods.delete("probe", &Default::default()).await.unwrap();
}
