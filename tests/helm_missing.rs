//! A cluster without the k3s helm-controller (EKS, GKE, AKS, DOKS): the agent says so once at
//! start-up and in a metric, a build waits in `Deploying` with reason `HelmControllerMissing`
//! instead of failing, and deploys as soon as the chart's `helmController.install` brings the
//! controller, which then works with the chart's (non-admin) rules. Its own control plane:
//! the shared one has the kind and an admin helm-controller.

mod support;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::Client;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppPhase, Project, ProjectPhase};
use shapeblock_testenv::{self as testenv, ControlPlane, ManagedProcess, Options, agent::AgentProcess};
use support::agent::{create, project_manifest, wait_app, wait_project};
use support::chart::{apply_all, render};
use support::{eventually, unique_name};

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

    // The chart's helmController.install: its CRDs, RBAC and job role, applied as rendered; the
    // controller itself runs out of cluster (no kubelet here) as the chart's ServiceAccount,
    // with the chart's arguments.
    let documents = render(AGENT_NS, &["helmController.install=true"]).unwrap();
    let helm_controller: Vec<serde_json::Value> = documents
        .into_iter()
        .filter(|d| {
            let name = d["metadata"]["name"].as_str().unwrap_or_default();
            name.starts_with("shapeblock-helm") || name.ends_with(".helm.cattle.io")
        })
        .collect();
    apply_all(&client, &helm_controller, AGENT_NS).await;
    let deployment = helm_controller
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the helm-controller Deployment");
    let mut args: Vec<String> =
        serde_json::from_value(deployment["spec"]["template"]["spec"]["containers"][0]["args"].clone())
            .unwrap();
    let controller_kubeconfig = testenv::agent::service_account_kubeconfig(
        &client,
        plane.kubeconfig(),
        AGENT_NS,
        "shapeblock-helm-controller",
        plane.work_dir(),
    )
    .await
    .unwrap();
    args.push(format!("--kubeconfig={}", controller_kubeconfig.display()));
    let controller_log = plane.work_dir().join("chart-helm-controller.log");
    let controller = ManagedProcess::spawn(
        "helm-controller",
        &testenv::default_bin_dir().join("helm-controller"),
        &args,
        &controller_log,
    )
    .unwrap();

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
    eprintln!("HelmChart created {waited:?} after the chart installed the helm-controller");
    assert_ne!(
        build_reason(&client, &project, "web-1").await.as_deref(),
        Some("HelmControllerMissing")
    );
    // The helm-controller, with only the chart's rules, makes the install Job and binds its
    // ServiceAccount to the job role (not cluster-admin).
    let jobs: Api<Job> = Api::namespaced(client.clone(), AGENT_NS);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let job = loop {
        let list = jobs.list(&Default::default()).await.unwrap();
        if let Some(job) = list
            .items
            .into_iter()
            .find(|j| j.name_any().starts_with("helm-install-"))
        {
            break job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no install Job from the chart's helm-controller; its log:\n{}",
            controller.log_tail(60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let account = job
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .service_account_name
        .unwrap();
    let bindings = Api::<ClusterRoleBinding>::all(client.clone())
        .list(&Default::default())
        .await
        .unwrap();
    let binding = bindings
        .items
        .iter()
        .find(|b| {
            b.subjects
                .iter()
                .flatten()
                .any(|s| s.name == account && s.namespace.as_deref() == Some(AGENT_NS))
        })
        .expect("a binding for the install Job's ServiceAccount");
    assert_eq!(binding.role_ref.name, "shapeblock-helm-job");
    let log = std::fs::read_to_string(&controller_log).unwrap();
    assert!(!log.contains("forbidden"), "the chart's rules are enough:\n{log}");
    drop(controller);
    agent
        .terminate(Duration::from_secs(15))
        .expect("stops on SIGTERM");
}
