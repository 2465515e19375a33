//! BackingServices end to end under the agent's own ServiceAccount: the catalog's HelmCharts
//! (no password in them), credentials generated once, the connection Secret, binding into an
//! App's running release, deletion policies and the bound-delete refusal. Installs run through
//! the real k3s helm-controller and helm on kwok nodes; the StatefulSets roll out through the
//! real controller-manager, their claims bound by the real PV controller to volumes the test
//! provides (the simulated cluster has no storage provisioner).

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase, AppPhase, BackingService, BackingServicePhase};
use shapeblock_agent::controllers::deploy::{chart_name, service_chart_name};
use support::agent::*;
use support::{eventually, wait_event};

/// Generous: 2 shared cores run the whole simulated cluster and one helm process per install.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(240);
const TYPES: &[&str] = &["postgresql", "mysql", "redis", "mongodb", "rabbitmq"];

fn charts(client: &Client) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart"),
        "helmcharts",
    );
    Api::namespaced_with(client.clone(), AGENT_NS, &resource)
}

async fn backing_service(client: &Client, project: &str, name: &str, spec: serde_json::Value) {
    create(
        Api::<BackingService>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "BackingService",
               "metadata": {"name": name}, "spec": spec}),
    )
    .await;
}

/// A volume pre-bound to the claim the StatefulSet will make (`data-<name>-<type>-0`).
async fn volume_for(client: &Client, project: &str, name: &str, kind: &str) {
    let pv: PersistentVolume = serde_json::from_value(json!({
        "metadata": {"name": format!("{project}-{name}"), "labels": {"shapeblock.io/test": "true"}},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": format!("/tmp/shapeblock-test/{project}/{name}")},
            "claimRef": {"namespace": project, "name": format!("data-{name}-{kind}-0")},
        }
    }))
    .unwrap();
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .unwrap();
}

fn first_container(
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
) -> &k8s_openapi::api::core::v1::Container {
    &template.spec.as_ref().unwrap().containers[0]
}

/// A JSON merge patch.
async fn merge<K>(api: &Api<K>, name: &str, patch: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

async fn get_service(client: &Client, project: &str, name: &str) -> Option<BackingService> {
    Api::<BackingService>::namespaced(client.clone(), project)
        .get_opt(name)
        .await
        .unwrap()
}

async fn wait_phase(
    client: &Client,
    project: &str,
    name: &str,
    phase: BackingServicePhase,
) -> BackingService {
    eventually(
        INSTALL_TIMEOUT,
        &format!("BackingService {name} to be {phase:?}"),
        || async {
            let service = get_service(client, project, name).await?;
            let current = service.status.as_ref().and_then(|s| s.phase);
            if current == Some(BackingServicePhase::Failed) && phase != BackingServicePhase::Failed {
                panic!("BackingService {name} failed: {:?}", service.status);
            }
            (current == Some(phase)).then_some(service)
        },
    )
    .await
    .0
}

async fn secret_text(client: &Client, project: &str, name: &str, key: &str) -> String {
    let secret = Api::<Secret>::namespaced(client.clone(), project)
        .get(name)
        .await
        .unwrap();
    String::from_utf8(secret.data.unwrap()[key].0.clone()).unwrap()
}

async fn wait_secret(client: &Client, project: &str, name: &str) -> Secret {
    eventually(TIMEOUT, &format!("Secret {name}"), || async {
        Api::<Secret>::namespaced(client.clone(), project)
            .get_opt(name)
            .await
            .unwrap()
    })
    .await
    .0
}

async fn values_content(client: &Client, chart: &str) -> String {
    eventually(TIMEOUT, &format!("HelmChart {chart}"), || async {
        let chart = charts(client).get_opt(chart).await.unwrap()?;
        chart.data["spec"]["valuesContent"].as_str().map(str::to_owned)
    })
    .await
    .0
}

fn condition<'a>(
    service: &'a BackingService,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    service
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

#[tokio::test]
async fn every_catalog_entry_installs_with_real_helm_rolls_out_and_turns_ready_with_no_password_in_values() {
    let env = env().await;
    let agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "catalog").await;
    let started = Instant::now();
    for kind in TYPES {
        let name = format!("my-{kind}");
        volume_for(&env.client, &project, &name, kind).await;
        backing_service(&env.client, &project, &name, json!({"type": kind})).await;
    }
    for kind in TYPES {
        let name = format!("my-{kind}");
        // The HelmChart is accepted, lives in the agent's namespace and carries no credential.
        let values = values_content(&env.client, &service_chart_name(&project, &name)).await;
        let credentials = format!("{name}-credentials");
        wait_secret(&env.client, &project, &credentials).await;
        let password = secret_text(&env.client, &project, &credentials, "password").await;
        let root = secret_text(&env.client, &project, &credentials, "root-password").await;
        assert_eq!(password.len(), 32);
        assert!(
            !values.contains(&password) && !values.contains(&root),
            "{kind}: {values}"
        );
        assert!(values.contains("secretKeyRef"), "{kind}: {values}");
        assert!(
            values.contains(&format!("\"name\": \"{credentials}\"")),
            "{kind}: {values}"
        );
        let chart = charts(&env.client)
            .get(&service_chart_name(&project, &name))
            .await
            .unwrap();
        assert_eq!(chart.data["spec"]["targetNamespace"], project.as_str());
        // The consumers' Secret has the standard keys and the password inside the URI.
        let connection = wait_secret(&env.client, &project, &format!("{name}-connection")).await;
        let keys: Vec<String> = connection.data.unwrap().keys().cloned().collect();
        assert_eq!(keys, ["database", "host", "password", "port", "uri", "username"]);
        let uri = secret_text(&env.client, &project, &format!("{name}-connection"), "uri").await;
        assert!(uri.contains(&password), "{kind}");
        if *kind == "postgresql" {
            eprintln!("rendered valuesContent of {kind}:\n{values}");
        }
    }
    let mut ready_after = Vec::new();
    for kind in TYPES {
        let name = format!("my-{kind}");
        let service = wait_phase(&env.client, &project, &name, BackingServicePhase::Ready).await;
        ready_after.push((kind, started.elapsed()));
        let status = service.status.clone().unwrap();
        assert!(
            status
                .endpoint
                .as_deref()
                .unwrap()
                .starts_with(&format!("{name}-{kind}.{project}.svc:")),
            "{status:?}"
        );
        assert_eq!(
            status.connection_secret.as_deref(),
            Some(format!("{name}-connection").as_str())
        );
        for type_ in ["Installed", "Available", "CredentialsReady", "Ready"] {
            assert_eq!(
                condition(&service, type_).unwrap().status,
                "True",
                "{kind} {type_}"
            );
        }
        // What Ready means: the StatefulSet runs the official image, available, with its claim.
        let sts = Api::<StatefulSet>::namespaced(env.client.clone(), &project)
            .get(&format!("{name}-{kind}"))
            .await
            .unwrap();
        assert_eq!(sts.status.as_ref().unwrap().available_replicas, Some(1));
        let image = first_container(&sts.spec.as_ref().unwrap().template)
            .image
            .clone()
            .unwrap();
        assert!(image.starts_with("docker.io/library/"), "{image}");
        let claim = Api::<PersistentVolumeClaim>::namespaced(env.client.clone(), &project)
            .get(&format!("data-{name}-{kind}-0"))
            .await
            .unwrap();
        assert_eq!(claim.status.unwrap().phase.as_deref(), Some("Bound"));
        wait_event(&env.client, &project, &name, |e| {
            e.reason.as_deref() == Some("Ready")
        })
        .await;
    }
    for (kind, elapsed) in &ready_after {
        eprintln!(
            "{kind}: Ready {:.1}s after the five were created",
            elapsed.as_secs_f64()
        );
    }
    for kind in TYPES {
        let password = secret_text(
            &env.client,
            &project,
            &format!("my-{kind}-credentials"),
            "password",
        )
        .await;
        assert!(
            !agent.log_tail(1_000_000).contains(&password),
            "no password in the agent's log"
        );
    }
}

#[tokio::test]
async fn credentials_are_generated_once_and_survive_reconciles_and_an_agent_restart() {
    let env = env().await;
    let agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "creds").await;
    backing_service(&env.client, &project, "cache", json!({"type": "redis"})).await;
    let first = wait_secret(&env.client, &project, "cache-credentials").await;
    let password = secret_text(&env.client, &project, "cache-credentials", "password").await;
    assert_eq!(first.owner_references()[0].kind, "BackingService");

    let services = Api::<BackingService>::namespaced(env.client.clone(), &project);
    let reconciled = |generation: i64| {
        let services = services.clone();
        async move {
            eventually(
                TIMEOUT,
                &format!("generation {generation} reconciled"),
                || async {
                    let s = services.get("cache").await.unwrap();
                    (s.status?.observed_generation == Some(generation)).then_some(())
                },
            )
            .await;
        }
    };
    // The claim size is fixed (a StatefulSet's claim template is immutable): refused up front.
    let err = services
        .patch(
            "cache",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"plan": {"storage": "2Gi"}}})),
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("plan.storage cannot be changed"),
        "{err}"
    );
    merge(&services, "cache", json!({"spec": {"plan": {"memory": "192Mi"}}})).await;
    reconciled(2).await;
    assert!(
        agent
            .terminate(Duration::from_secs(15))
            .is_some_and(|s| s.success()),
        "a clean shutdown"
    );
    let agent = env.agent(&[]).await;
    merge(&services, "cache", json!({"spec": {"plan": {"memory": "256Mi"}}})).await;
    reconciled(3).await;
    let after = Api::<Secret>::namespaced(env.client.clone(), &project)
        .get("cache-credentials")
        .await
        .unwrap();
    assert_eq!(after.uid(), first.uid(), "the Secret was never recreated");
    assert_eq!(
        after.resource_version(),
        first.resource_version(),
        "nor rewritten"
    );
    assert_eq!(
        secret_text(&env.client, &project, "cache-credentials", "password").await,
        password
    );
    let values = values_content(&env.client, &service_chart_name(&project, "cache")).await;
    assert!(values.contains("\"memory\": \"256Mi\""), "{values}");
    assert!(!values.contains(&password));
    let uri = secret_text(&env.client, &project, "cache-connection", "uri").await;
    assert_eq!(
        uri,
        format!("redis://default:{password}@cache-redis.{project}.svc:6379/0")
    );
    assert!(!agent.log_tail(1_000_000).contains(&password));
}

#[tokio::test]
async fn binding_puts_secret_key_refs_into_the_running_release_and_redeploys_when_it_changes() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "bind").await;
    backing_service(&env.client, &project, "orders-db", json!({"type": "postgresql"})).await;
    wait_secret(&env.client, &project, "orders-db-connection").await;
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    create(
        apps.clone(),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "web"},
               "spec": {"registry": {"url": "registry.example.com"},
                        "build": {"type": "image", "image": "registry.example.com/demo/web:1.0"},
                        "services": ["orders-db"]}}),
    )
    .await;
    wait_app(&env.client, &project, "web", AppPhase::Ready).await;
    create(
        Api::<AppBuild>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": "web-1"},
               "spec": {"appName": "web", "helmValues": {"env": {"NODE_ENV": "production", "ORDERS_DB_HOST": "override"}}}}),
    )
    .await;
    let builds = Api::<AppBuild>::namespaced(env.client.clone(), &project);
    eventually(INSTALL_TIMEOUT, "AppBuild web-1 to complete", || async {
        let phase = builds.get("web-1").await.unwrap().status?.phase;
        assert_ne!(phase, Some(AppBuildPhase::Failed));
        (phase == Some(AppBuildPhase::Completed)).then_some(())
    })
    .await;
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &project);
    let env_of = |deployment: &Deployment| {
        first_container(&deployment.spec.as_ref().unwrap().template)
            .env
            .clone()
            .unwrap_or_default()
    };
    // The build deployed with the binding: references, never values; the user's variable wins.
    let running = env_of(&deployments.get("web-web").await.unwrap());
    let url = running
        .iter()
        .find(|e| e.name == "DATABASE_URL")
        .expect("DATABASE_URL");
    let reference = url.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
    assert_eq!(
        (reference.name.as_str(), reference.key.as_str()),
        ("orders-db-connection", "uri")
    );
    assert!(
        running
            .iter()
            .all(|e| e.value_from.is_some() || e.name == "NODE_ENV" || e.name == "ORDERS_DB_HOST")
    );
    assert_eq!(
        running
            .iter()
            .find(|e| e.name == "ORDERS_DB_HOST")
            .unwrap()
            .value
            .as_deref(),
        Some("override")
    );
    let password = secret_text(&env.client, &project, "orders-db-credentials", "password").await;
    let values = values_content(&env.client, &chart_name(&project, "web")).await;
    assert!(!values.contains(&password));

    // A second service bound later (and one that does not exist): the running release is
    // re-rendered without a build and the Deployment rolls out with the new references.
    backing_service(&env.client, &project, "jobs", json!({"type": "rabbitmq"})).await;
    merge(
        &apps,
        "web",
        json!({"spec": {"services": ["orders-db", "jobs", "ghost"]}}),
    )
    .await;
    eventually(
        INSTALL_TIMEOUT,
        "the Deployment to carry the jobs binding",
        || async {
            let d = deployments.get("web-web").await.unwrap();
            env_of(&d).iter().any(|e| e.name == "AMQP_URL").then_some(())
        },
    )
    .await;
    let app = apps.get("web").await.unwrap();
    let bound = app
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "ServicesBound")
        .unwrap();
    assert_eq!(bound.status, "False");
    assert!(bound.message.contains("ghost"), "{}", bound.message);
    wait_event(&env.client, &project, "web", |e| {
        e.reason.as_deref() == Some("BindingsChanged")
    })
    .await;
    let values = values_content(&env.client, &chart_name(&project, "web")).await;
    assert!(
        !values.contains("GHOST_"),
        "a missing service is not bound: {values}"
    );
    assert!(
        values.contains("\"apps.shapeblock.io/build\": \"web-1\""),
        "same build, re-rendered"
    );

    // Unbinding removes the references again.
    merge(&apps, "web", json!({"spec": {"services": null}})).await;
    eventually(
        INSTALL_TIMEOUT,
        "the bindings to be gone from the Deployment",
        || async {
            let d = deployments.get("web-web").await.unwrap();
            env_of(&d).iter().all(|e| e.value_from.is_none()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn deleting_a_bound_service_is_refused_until_unbound_or_forced() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "bound").await;
    backing_service(&env.client, &project, "db", json!({"type": "mysql"})).await;
    backing_service(&env.client, &project, "queue", json!({"type": "rabbitmq"})).await;
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    create(
        apps.clone(),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "api"},
               "spec": {"registry": {"url": "registry.example.com"},
                        "build": {"type": "image", "image": "registry.example.com/demo/api:1"},
                        "services": ["db", "queue"]}}),
    )
    .await;
    wait_app(&env.client, &project, "api", AppPhase::Ready).await;
    let services = Api::<BackingService>::namespaced(env.client.clone(), &project);
    for name in ["db", "queue"] {
        wait_secret(&env.client, &project, &format!("{name}-credentials")).await;
        services.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["db", "queue"] {
        let service = wait_phase(&env.client, &project, name, BackingServicePhase::Deleting).await;
        let blocked = eventually(TIMEOUT, "DeletionBlocked", || async {
            let s = get_service(&env.client, &project, name).await?;
            condition(&s, "DeletionBlocked")
                .filter(|c| c.status == "True")
                .cloned()
        })
        .await
        .0;
        assert!(blocked.message.contains("api"), "{}", blocked.message);
        assert_eq!(blocked.reason, "BoundToApps");
        assert!(service.metadata.deletion_timestamp.is_some());
    }
    // Still there a while later: the refusal holds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(get_service(&env.client, &project, "db").await.is_some());
    assert!(
        charts(&env.client)
            .get_opt(&service_chart_name(&project, "db"))
            .await
            .unwrap()
            .is_some(),
        "nothing uninstalled while bound"
    );

    // Unbinding lets `db` go; `queue` goes when forced.
    merge(&apps, "api", json!({"spec": {"services": ["queue"]}})).await;
    eventually(INSTALL_TIMEOUT, "db to be deleted once unbound", || async {
        get_service(&env.client, &project, "db")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(get_service(&env.client, &project, "queue").await.is_some());
    merge(
        &services,
        "queue",
        json!({"metadata": {"annotations": {"apps.shapeblock.io/force-delete": "true"}}}),
    )
    .await;
    eventually(INSTALL_TIMEOUT, "queue to be deleted when forced", || async {
        get_service(&env.client, &project, "queue")
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        charts(&env.client)
            .get_opt(&service_chart_name(&project, "queue"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn deletion_policy_delete_removes_the_data_and_retain_keeps_and_reattaches_it() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "policy").await;
    volume_for(&env.client, &project, "gone", "redis").await;
    volume_for(&env.client, &project, "kept", "redis").await;
    backing_service(
        &env.client,
        &project,
        "gone",
        json!({"type": "redis", "deletionPolicy": "Delete"}),
    )
    .await;
    backing_service(&env.client, &project, "kept", json!({"type": "redis"})).await;
    let claims = Api::<PersistentVolumeClaim>::namespaced(env.client.clone(), &project);
    for name in ["gone", "kept"] {
        wait_phase(&env.client, &project, name, BackingServicePhase::Ready).await;
        assert!(
            claims
                .get_opt(&format!("data-{name}-redis-0"))
                .await
                .unwrap()
                .is_some()
        );
    }
    let kept_password = secret_text(&env.client, &project, "kept-credentials", "password").await;
    let services = Api::<BackingService>::namespaced(env.client.clone(), &project);
    for name in ["gone", "kept"] {
        services.delete(name, &DeleteParams::default()).await.unwrap();
    }
    for name in ["gone", "kept"] {
        eventually(INSTALL_TIMEOUT, &format!("{name} to be deleted"), || async {
            get_service(&env.client, &project, name)
                .await
                .is_none()
                .then_some(())
        })
        .await;
    }
    // Delete: the claim and the Secrets go.
    eventually(TIMEOUT, "the Delete policy's claim and Secrets to go", || async {
        let claim = claims.get_opt("data-gone-redis-0").await.unwrap();
        let secret = Api::<Secret>::namespaced(env.client.clone(), &project)
            .get_opt("gone-credentials")
            .await
            .unwrap();
        (claim.is_none() && secret.is_none()).then_some(())
    })
    .await;
    // Retain: the claim and the credentials stay (no owner left to collect them), reported.
    let claim = claims.get("data-kept-redis-0").await.unwrap();
    assert!(claim.metadata.deletion_timestamp.is_none());
    let secret = Api::<Secret>::namespaced(env.client.clone(), &project)
        .get("kept-credentials")
        .await
        .unwrap();
    assert!(secret.owner_references().is_empty());
    let retained = wait_event(&env.client, &project, "kept", |e| {
        e.reason.as_deref() == Some("Retained")
    })
    .await;
    assert!(retained.note.as_deref().unwrap().contains("data-kept-redis-0"));
    // A new service of the same name reattaches the data with the same credentials.
    backing_service(&env.client, &project, "kept", json!({"type": "redis"})).await;
    wait_phase(&env.client, &project, "kept", BackingServicePhase::Ready).await;
    assert_eq!(
        secret_text(&env.client, &project, "kept-credentials", "password").await,
        kept_password
    );
    assert_eq!(claims.get("data-kept-redis-0").await.unwrap().uid(), claim.uid());
}

#[tokio::test]
async fn the_catalog_is_data_an_admin_extends_and_bad_types_or_values_fail_with_a_reason() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "extend").await;
    backing_service(&env.client, &project, "kv", json!({"type": "keyvalue"})).await;
    let failed = wait_phase(&env.client, &project, "kv", BackingServicePhase::Failed).await;
    assert_eq!(condition(&failed, "Ready").unwrap().reason, "UnknownType");
    backing_service(
        &env.client,
        &project,
        "bad",
        json!({"type": "postgresql", "helmValues": {"extraDeploy": [{"kind": "ClusterRoleBinding"}]}}),
    )
    .await;
    let bad = wait_phase(&env.client, &project, "bad", BackingServicePhase::Failed).await;
    assert!(bad.status.unwrap().message.unwrap().contains("extraDeploy"));
    assert!(
        charts(&env.client)
            .get_opt(&service_chart_name(&project, "bad"))
            .await
            .unwrap()
            .is_none()
    );

    // An install the apiserver refuses (an invalid label key only it checks): the Helm Job
    // fails its retries and the service says so.
    backing_service(
        &env.client,
        &project,
        "broken",
        json!({"type": "redis", "helmValues": {"nodeSelector": {"not a label key!": "x"}}}),
    )
    .await;
    let broken = wait_phase(&env.client, &project, "broken", BackingServicePhase::Failed).await;
    assert_eq!(condition(&broken, "Ready").unwrap().reason, "InstallFailed");
    assert_eq!(condition(&broken, "Installed").unwrap().status, "False");

    let catalog = include_str!("fixtures/catalog-keyvalue.yaml");
    let configmaps = Api::<ConfigMap>::namespaced(env.client.clone(), AGENT_NS);
    let configmap: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "shapeblock-catalog"}, "data": {"catalog.yaml": catalog}
    }))
    .unwrap();
    configmaps
        .create(&PostParams::default(), &configmap)
        .await
        .unwrap();
    // Any change makes the agent look again (the ConfigMap itself is read, not watched).
    merge(
        &Api::<BackingService>::namespaced(env.client.clone(), &project),
        "kv",
        json!({"metadata": {"annotations": {"touch": "1"}}}),
    )
    .await;
    let values = values_content(&env.client, &service_chart_name(&project, "kv")).await;
    configmaps
        .delete("shapeblock-catalog", &DeleteParams::default())
        .await
        .unwrap();
    assert!(values.contains("docker.io/valkey/valkey"), "{values}");
    assert!(values.contains("VALKEY_PASSWORD"), "{values}");
    let password = secret_text(&env.client, &project, "kv-credentials", "password").await;
    assert!(!values.contains(&password));
}

#[tokio::test]
async fn deleting_a_project_takes_its_installed_and_bound_services_with_it() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "doomed").await;
    volume_for(&env.client, &project, "db", "postgresql").await;
    backing_service(&env.client, &project, "db", json!({"type": "postgresql"})).await;
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "api"},
               "spec": {"registry": {"url": "registry.example.com"},
                        "build": {"type": "image", "image": "registry.example.com/demo/api:1"},
                        "services": ["db"]}}),
    )
    .await;
    wait_phase(&env.client, &project, "db", BackingServicePhase::Ready).await;
    // The App goes with its namespace, so its binding does not hold the service (nor the
    // namespace) back; the release is uninstalled on the way.
    Api::<shapeblock_agent::api::Project>::all(env.client.clone())
        .delete(&project, &DeleteParams::default())
        .await
        .unwrap();
    let (_, took) = eventually(
        INSTALL_TIMEOUT,
        "the Project and its namespace to be gone",
        || async {
            let project_left = Api::<shapeblock_agent::api::Project>::all(env.client.clone())
                .get_opt(&project)
                .await
                .unwrap();
            let namespace = Api::<k8s_openapi::api::core::v1::Namespace>::all(env.client.clone())
                .get_opt(&project)
                .await
                .unwrap();
            (project_left.is_none() && namespace.is_none()).then_some(())
        },
    )
    .await;
    eprintln!("project with an installed, bound service deleted in {took:?}");
    assert!(
        charts(&env.client)
            .get_opt(&service_chart_name(&project, "db"))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn helm_values_that_would_switch_authentication_off_are_refused_naming_the_variable_or_flag() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "noauth").await;
    let cases = [
        (
            "pg",
            json!({"type": "postgresql", "helmValues": {"env": {"POSTGRES_HOST_AUTH_METHOD": "trust"}}}),
            "POSTGRES_HOST_AUTH_METHOD",
        ),
        (
            "pgargs",
            json!({"type": "postgresql", "helmValues": {"args": ["-c", "hba_file=/tmp/trust.conf"]}}),
            "--hba-file",
        ),
        (
            "cache",
            json!({"type": "redis", "helmValues": {"args": ["--user", "default", "on", "nopass", "~*", "+@all"]}}),
            "--user",
        ),
        (
            "cache2",
            json!({"type": "redis", "helmValues": {"args": ["--requirepass=", "--protected-mode", "no"]}}),
            "--requirepass",
        ),
        (
            "sql",
            json!({"type": "mysql", "helmValues": {"env": {"MYSQL_ALLOW_EMPTY_PASSWORD": "yes"}}}),
            "MYSQL_ALLOW_EMPTY_PASSWORD",
        ),
        (
            "sql2",
            json!({"type": "mysql", "helmValues": {"args": ["--loose-skip-grant-tables"]}}),
            "--skip-grant-tables",
        ),
        (
            "docs",
            json!({"type": "mongodb", "helmValues": {"args": ["--noauth"]}}),
            "--noauth",
        ),
    ];
    for (name, spec, _) in &cases {
        backing_service(&env.client, &project, name, spec.clone()).await;
    }
    for (name, _, named) in &cases {
        let failed = wait_phase(&env.client, &project, name, BackingServicePhase::Failed).await;
        let ready = condition(&failed, "Ready").unwrap();
        assert_eq!(ready.reason, "InvalidSpec", "{name}");
        assert!(ready.message.contains(named), "{name}: {}", ready.message);
        // Refused before anything is written: no HelmChart, no credentials.
        assert!(
            charts(&env.client)
                .get_opt(&service_chart_name(&project, name))
                .await
                .unwrap()
                .is_none(),
            "{name}"
        );
        wait_event(&env.client, &project, name, |e| {
            e.type_.as_deref() == Some("Warning") && e.note.as_deref().is_some_and(|n| n.contains(named))
        })
        .await;
    }
}
