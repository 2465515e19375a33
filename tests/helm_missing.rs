//! A cluster without the k3s helm-controller (EKS, GKE, AKS, DOKS without the chart's
//! `helmController.install`): the agent says so once at start-up and in a metric, a build
//! waits in `Deploying` with reason `HelmControllerMissing` instead of failing, and deploys as
//! soon as the HelmChart kind appears. Its own control plane: the shared one has the kind.

mod support;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppPhase, Project, ProjectPhase};
use shapeblock_agent::testenv::{self, ControlPlane, Options, agent::AgentProcess};
use support::agent::{create, project_manifest, wait_app, wait_project};
use support::{eventually, unique_name, yaml_documents};

const TIMEOUT: Duration = Duration::from_secs(45);
const AGENT_NS: &str = "shapeblock";

async fn build_reason(client: &Client, namespace: &str, name: &str) -> Option<String> {
    Api::<AppBuild>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .ok()?
        .status?
        .reason
}

#[tokio::test]
async fn without_the_helm_chart_kind_builds_wait_with_a_clear_reason_and_deploy_once_it_exists() {
    let plane = ControlPlane::start(Options {
        helm_controller: false,
        nodes: 0,
        ..Options::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let client = plane.client().await.unwrap();
    let kubeconfig =
        testenv::agent::install_agent_identity(&client, plane.kubeconfig(), AGENT_NS, plane.work_dir())
            .await
            .unwrap();
    let agent = AgentProcess::start(
        Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
        &kubeconfig,
        AGENT_NS,
        &plane.work_dir().join("agent.log"),
        &["--registry-secret="],
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(agent.metric("shapeblock_helm_chart_kind_served").await, 0.0);
    assert!(
        agent
            .log_tail(200)
            .contains("HelmChart kind (helm.cattle.io/v1) is not served"),
        "{}",
        agent.log_tail(50)
    );

    let project = unique_name("nohelm");
    create(
        Api::<Project>::all(client.clone()),
        project_manifest(&project, json!({})),
    )
    .await;
    wait_project(&client, &project, ProjectPhase::Ready).await;
    create(
        Api::<App>::namespaced(client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "web"},
               "spec": {"registry": {"url": "registry.example.com"},
                        "build": {"type": "image", "image": "registry.example.com/demo/web:1.0"}}}),
    )
    .await;
    wait_app(&client, &project, "web", AppPhase::Ready).await;
    create(
        Api::<AppBuild>::namespaced(client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": "web-1"},
               "spec": {"appName": "web"}}),
    )
    .await;
    eventually(TIMEOUT, "the build to wait for the helm-controller", || async {
        (build_reason(&client, &project, "web-1").await.as_deref() == Some("HelmControllerMissing"))
            .then_some(())
    })
    .await;
    let build = Api::<AppBuild>::namespaced(client.clone(), &project)
        .get("web-1")
        .await
        .unwrap();
    let status = build.status.unwrap();
    assert_eq!(
        format!("{:?}", status.phase),
        "Some(Deploying)",
        "waiting, not failed"
    );
    assert!(
        status
            .message
            .unwrap_or_default()
            .contains("helmController.install=true"),
        "the message says what to do"
    );

    // The helm-controller's CRDs arrive (as the chart's helmController.install would bring
    // them): the build goes on and its HelmChart is created.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/crds");
    for file in [
        "helm.cattle.io_helmcharts.yaml",
        "helm.cattle.io_helmchartconfigs.yaml",
    ] {
        for document in yaml_documents(&fixtures.join(file)) {
            let crd: CustomResourceDefinition = serde_json::from_value(document).unwrap();
            let name = crd.metadata.name.clone().unwrap();
            crds.patch(&name, &PatchParams::apply("test").force(), &Patch::Apply(&crd))
                .await
                .unwrap();
        }
    }
    let resource = ApiResource {
        group: "helm.cattle.io".into(),
        version: "v1".into(),
        api_version: "helm.cattle.io/v1".into(),
        kind: "HelmChart".into(),
        plural: "helmcharts".into(),
    };
    let charts: Api<DynamicObject> = Api::namespaced_with(client.clone(), AGENT_NS, &resource);
    let (_, waited) = eventually(TIMEOUT, "the build's HelmChart", || async {
        let list = charts.list(&Default::default()).await.ok()?;
        (!list.items.is_empty()).then_some(())
    })
    .await;
    eprintln!("HelmChart created {waited:?} after the CRDs were applied");
    assert_ne!(
        build_reason(&client, &project, "web-1").await.as_deref(),
        Some("HelmControllerMissing")
    );
    agent
        .terminate(Duration::from_secs(15))
        .expect("stops on SIGTERM");
}
