//! HelmCharts are installed as on k3s: the real k3s helm-controller makes a suspended Job and
//! resumes it, and the Job's pod is executed by the test support with the real helm CLI under
//! the Job's own ServiceAccount token, bound to our job ClusterRole instead of cluster-admin.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, DynamicObject, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::Project;
use shapeblock_agent::controllers::install_access;
use shapeblock_testenv::{self as testenv, HELM_JOB_CLUSTER_ROLE};
use support::{client, eventually, fresh_namespace};

fn helm_charts(client: &Client, namespace: &str) -> Api<DynamicObject> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart"),
        "helmcharts",
    );
    Api::namespaced_with(client.clone(), namespace, &resource)
}

fn universal_chart() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/charts/universal-chart-2.8.1.tgz"
    );
    STANDARD.encode(std::fs::read(path).expect("the universal chart fixture"))
}

fn web_values(replicas: u32, tag: &str) -> String {
    format!(
        "releasePrefix: web
deployments:
  app:
    replicas: {replicas}
    containers:
    - name: web
      image: registry.example.com/web
      imageTag: {tag}
services:
  app:
    ports:
    - name: http
      port: 80
"
    )
}

async fn create_chart(
    client: &Client,
    namespace: &str,
    name: &str,
    target: &str,
    values: &str,
    extra: serde_json::Value,
) {
    let mut spec = json!({
        "chartContent": universal_chart(),
        "targetNamespace": target,
        "valuesContent": values,
    });
    spec.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    let chart: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChart",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    // As the agent does before it applies a HelmChart: the install Job may act in its
    // release's namespace only (the helm-controller's cluster-wide job role grants nothing).
    let params = PatchParams::apply("shapeblock-helm-test").force();
    Api::<ClusterRole>::all(client.clone())
        .patch(
            shapeblock_agent::rbac::HELM_RELEASE_ROLE,
            &params,
            &Patch::Apply(shapeblock_agent::rbac::helm_release_cluster_role()),
        )
        .await
        .unwrap();
    Api::<RoleBinding>::namespaced(client.clone(), target)
        .patch(
            &install_access::job_service_account(name),
            &params,
            &Patch::Apply(install_access::role_binding(namespace, name, target)),
        )
        .await
        .unwrap();
    helm_charts(client, namespace)
        .create(&PostParams::default(), &chart)
        .await
        .unwrap();
}

/// Helm's release Secrets of `release` in `namespace`: version → labels.
async fn releases(
    client: &Client,
    namespace: &str,
    release: &str,
) -> BTreeMap<u32, BTreeMap<String, String>> {
    Api::<Secret>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("owner=helm,name={release}")))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.type_.as_deref() == Some("helm.sh/release.v1"))
        .map(|s| {
            let labels = s.labels().clone();
            (labels["version"].parse().unwrap(), labels)
        })
        .collect()
}

fn job_env(job: &Job, key: &str) -> Option<String> {
    job.spec.as_ref()?.template.spec.as_ref()?.containers[0]
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == key)?
        .value
        .clone()
}

async fn chart_pods(client: &Client, namespace: &str, chart: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), namespace)
        .list(&ListParams::default().labels(&format!("helmcharts.helm.cattle.io/chart={chart}")))
        .await
        .unwrap()
        .items
}

#[tokio::test]
async fn a_helm_chart_is_installed_once_by_real_helm_and_upgraded_when_its_values_change() {
    let client = client().await;
    let system = fresh_namespace(&client, "helm-sys").await;
    let app = fresh_namespace(&client, "helm-app").await;
    create_chart(&client, &system, "web", &app, &web_values(2, "v1"), json!({})).await;

    // The helm-controller's Job: created suspended, resumed, then completed by the Job
    // controller once the runner's helm install exits 0.
    let jobs: Api<Job> = Api::namespaced(client.clone(), &system);
    let (job, took) = eventually(Duration::from_secs(60), "the install Job to complete", || async {
        let job = jobs.get_opt("helm-install-web").await.unwrap()?;
        let complete = job
            .status
            .as_ref()?
            .conditions
            .as_ref()?
            .iter()
            .any(|c| c.type_ == "Complete" && c.status == "True");
        complete.then_some(job)
    })
    .await;
    println!("HelmChart installed in {took:?}");
    assert_eq!(job.spec.as_ref().unwrap().suspend, Some(false), "resumed");
    assert!(
        job.metadata.generation.unwrap() >= 2,
        "created suspended, then resumed"
    );
    let config_hash = job_env(&job, "CONFIG_HASH").expect("the controller sets CONFIG_HASH");

    let binding = Api::<ClusterRoleBinding>::all(client.clone())
        .get(&format!("helm-{system}-web"))
        .await
        .unwrap();
    assert_eq!(
        binding.role_ref.name, HELM_JOB_CLUSTER_ROLE,
        "our job role, not cluster-admin"
    );

    let installed = releases(&client, &app, "web").await;
    assert_eq!(installed.keys().copied().collect::<Vec<_>>(), vec![1]);
    assert_eq!(installed[&1]["status"], "deployed");
    assert_eq!(installed[&1]["helmcharts.helm.cattle.io/configHash"], config_hash);

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &app);
    eventually(
        Duration::from_secs(30),
        "web-app to roll out on the kwok nodes",
        || async {
            let status = deployments.get_opt("web-app").await.unwrap()?.status?;
            (status.available_replicas == Some(2)).then_some(())
        },
    )
    .await;

    // What a real node would show: the log through pods/log and the termination message.
    let pods = chart_pods(&client, &system, "web").await;
    assert_eq!(pods.len(), 1);
    let pod = &pods[0];
    let log = Api::<Pod>::namespaced(client.clone(), &system)
        .logs(&pod.name_any(), &LogParams::default())
        .await
        .unwrap();
    assert!(log.contains("+ helm install web"), "{log}");
    assert!(log.contains("STATUS: deployed"), "{log}");
    let terminated = pod.status.clone().unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .terminated
        .unwrap();
    assert_eq!(
        (terminated.exit_code, terminated.message.as_deref()),
        (0, Some("Installing helm chart"))
    );

    // No second run after success: the controller sees the deployed release with its hash.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        chart_pods(&client, &system, "web").await.len(),
        1,
        "no second install pod"
    );
    assert_eq!(
        releases(&client, &app, "web").await.len(),
        1,
        "no second revision"
    );

    // A values change: the controller replaces the Job, helm upgrades to revision 2.
    helm_charts(&client, &system)
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"valuesContent": web_values(3, "v2")}})),
        )
        .await
        .unwrap();
    let (upgraded, took) = eventually(Duration::from_secs(60), "revision 2 to be deployed", || async {
        let all = releases(&client, &app, "web").await;
        all.get(&2).filter(|l| l["status"] == "deployed").cloned()
    })
    .await;
    println!("upgraded in {took:?}");
    assert_ne!(
        upgraded["helmcharts.helm.cattle.io/configHash"], config_hash,
        "new configuration, new hash"
    );
    assert_eq!(releases(&client, &app, "web").await[&1]["status"], "superseded");
    eventually(Duration::from_secs(30), "3 replicas of web:v2", || async {
        let deployment = deployments.get("web-app").await.unwrap();
        let image = deployment.spec.as_ref()?.template.spec.as_ref()?.containers[0]
            .image
            .clone()?;
        let status = deployment.status?;
        (image.ends_with(":v2") && status.available_replicas == Some(3) && status.updated_replicas == Some(3))
            .then_some(())
    })
    .await;
}

/// Values that make the chart render a bare Pod: the job role may read pods (so helm's
/// pre-flight passes and the release is recorded) but not create them, so the install fails
/// half-way, leaving a `failed` release, as a chart that the API refuses does.
const FAILING_VALUES: &str = "extraDeploy:
  stray: |-
    apiVersion: v1
    kind: Pod
    metadata:
      name: stray
      namespace: {{ .Release.Namespace }}
    spec:
      containers:
      - name: c
        image: busybox
";

#[tokio::test]
async fn a_failing_chart_with_abort_policy_stops_and_waits_and_helm_is_not_admin() {
    let client = client().await;
    let system = fresh_namespace(&client, "helm-sys").await;
    let app = fresh_namespace(&client, "helm-app").await;
    create_chart(
        &client,
        &system,
        "bad",
        &app,
        FAILING_VALUES,
        json!({"failurePolicy": "abort"}),
    )
    .await;

    // First run: helm, holding only the Job's token, is refused the Pod; the release is
    // recorded as failed. The container restarts (restartPolicy OnFailure) and, the policy
    // being abort, waits for an operator instead of reinstalling.
    let (pod, took) = eventually(Duration::from_secs(60), "the abort message", || async {
        chart_pods(&client, &system, "bad").await.into_iter().find(|pod| {
            let status = pod.status.clone().unwrap_or_default();
            status.container_statuses.unwrap_or_default().iter().any(|c| {
                c.restart_count >= 2
                    && c.last_state
                        .as_ref()
                        .and_then(|s| s.terminated.as_ref())
                        .and_then(|t| t.message.as_deref())
                        .is_some_and(|m| m.contains("waiting for operator intervention"))
            })
        })
    })
    .await;
    println!("aborted after {took:?}");
    let container = &pod.status.clone().unwrap().container_statuses.unwrap()[0];
    assert_eq!(
        container
            .last_state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        1
    );
    let log = Api::<Pod>::namespaced(client.clone(), &system)
        .logs(&pod.name_any(), &LogParams::default())
        .await
        .unwrap();
    assert!(
        log.contains(&format!("system:serviceaccount:{system}:helm-bad")) && log.contains("forbidden"),
        "helm was refused as the Job's ServiceAccount: {log}"
    );
    let recorded = releases(&client, &app, "bad").await;
    assert_eq!(
        recorded.keys().copied().collect::<Vec<_>>(),
        vec![1],
        "no retry installed anything"
    );
    assert_eq!(recorded[&1]["status"], "failed");
    assert!(
        Api::<Pod>::namespaced(client.clone(), &app)
            .get_opt("stray")
            .await
            .unwrap()
            .is_none()
    );
    let job = Api::<Job>::namespaced(client.clone(), &system)
        .get("helm-install-bad")
        .await
        .unwrap();
    let conditions = job.status.and_then(|s| s.conditions).unwrap_or_default();
    assert!(
        !conditions
            .iter()
            .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True"),
        "the Job keeps waiting: {conditions:?}"
    );
}

/// A client holding a token of `account`, as the helm runner's pods do.
async fn client_as(namespace: &str, account: &str) -> Client {
    let plane = testenv::shared().unwrap();
    let admin = client().await;
    let request: TokenRequest =
        serde_json::from_value(json!({"spec": {"audiences": [], "expirationSeconds": 600}})).unwrap();
    let token = Api::<ServiceAccount>::namespaced(admin, namespace)
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let admin_config = std::fs::read_to_string(&plane.kubeconfig).unwrap();
    let ca = admin_config
        .lines()
        .find_map(|l| l.trim().strip_prefix("certificate-authority-data: "))
        .unwrap()
        .to_owned();
    let path = plane.work_dir.join(format!("{namespace}-{account}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority-data: {ca}\nusers:\n- name: u\n  user:\n    token: {token}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n",
            plane.server
        ),
    )
    .unwrap();
    testenv::client_from_kubeconfig(&path).await.unwrap()
}

fn forbidden<T: std::fmt::Debug>(result: kube::Result<T>) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.code == 403)
}

#[tokio::test]
async fn the_job_role_allows_what_charts_render_and_nothing_else() {
    let admin = client().await;
    let system = fresh_namespace(&admin, "helm-sys").await;
    let app = fresh_namespace(&admin, "helm-app").await;
    // The helm-controller makes the ServiceAccount and its binding for each HelmChart.
    create_chart(&admin, &system, "probe", &app, &web_values(1, "v1"), json!({})).await;
    eventually(Duration::from_secs(30), "the probe chart's binding", || async {
        Api::<ClusterRoleBinding>::all(admin.clone())
            .get_opt(&format!("helm-{system}-probe"))
            .await
            .unwrap()
    })
    .await;
    let job = client_as(&system, "helm-probe").await;

    // Allowed: what the charts render, and helm's release storage.
    let deployments: Api<Deployment> = Api::namespaced(job.clone(), &app);
    deployments.list(&ListParams::default()).await.unwrap();
    Api::<Secret>::namespaced(job.clone(), &app)
        .list(&ListParams::default())
        .await
        .unwrap();

    // Nothing outside the release's namespace: not the HelmChart's own namespace (the
    // agent's, with its identity Secret), not another namespace, nothing cluster-wide.
    let elsewhere = fresh_namespace(&admin, "helm-other").await;
    for namespace in [system.as_str(), elsewhere.as_str(), "kube-system", "default"] {
        assert!(
            forbidden(
                Api::<Secret>::namespaced(job.clone(), namespace)
                    .list(&ListParams::default())
                    .await
            ),
            "Secrets of {namespace}"
        );
        assert!(
            forbidden(
                Api::<Secret>::namespaced(job.clone(), namespace)
                    .get("shapeblock-agent-identity")
                    .await
            ),
            "a Secret by name in {namespace}"
        );
        assert!(
            forbidden(
                Api::<Deployment>::namespaced(job.clone(), namespace)
                    .list(&ListParams::default())
                    .await
            ),
            "Deployments of {namespace}"
        );
    }
    assert!(forbidden(
        Api::<Secret>::all(job.clone()).list(&ListParams::default()).await
    ));

    // Forbidden: RBAC, cluster-scoped kinds, other custom resources, exec and pod writes.
    let role: Role = serde_json::from_value(json!({"metadata": {"name": "r"}, "rules": []})).unwrap();
    assert!(forbidden(
        Api::<Role>::namespaced(job.clone(), &app)
            .create(&PostParams::default(), &role)
            .await
    ));
    let cluster_role: ClusterRole =
        serde_json::from_value(json!({"metadata": {"name": format!("{app}-x")}})).unwrap();
    assert!(forbidden(
        Api::<ClusterRole>::all(job.clone())
            .create(&PostParams::default(), &cluster_role)
            .await
    ));
    assert!(forbidden(
        Api::<Node>::all(job.clone()).list(&ListParams::default()).await
    ));
    assert!(forbidden(
        Api::<Project>::all(job.clone())
            .list(&ListParams::default())
            .await
    ));
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
    }))
    .unwrap();
    assert!(forbidden(
        Api::<Pod>::namespaced(job.clone(), &app)
            .create(&PostParams::default(), &pod)
            .await
    ));
    assert!(forbidden(
        helm_charts(&job, &system).list(&ListParams::default()).await
    ));
}
