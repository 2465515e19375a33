//! AppBuilds end to end on the simulated cluster: build Jobs whose pods run on kwok nodes with
//! outcomes the test chooses, the real k3s helm-controller and real Helm installing the
//! universal chart, and Deployments rolling out through the real controller-manager.

mod support;

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase, AppPhase, Project};
use shapeblock_testenv::nodes::{PodOutcome, PodSelector, set_pod_outcome};
use support::agent::*;
use support::eventually;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn digest() -> String {
    format!("sha256:{}", "ab".repeat(32))
}

async fn app(
    client: &Client,
    project: &str,
    name: &str,
    build: serde_json::Value,
    git: Option<serde_json::Value>,
) {
    let mut spec = json!({"registry": {"url": "registry.example.com"}, "build": build});
    if let Some(git) = git {
        spec["git"] = git;
    }
    create(
        Api::<App>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": name}, "spec": spec}),
    )
    .await;
    wait_app(client, project, name, AppPhase::Ready).await;
}

#[tokio::test]
async fn a_prebuilt_image_is_deployed_by_real_helm_and_completed_once_rolled_out() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "prebuilt").await;
    app(
        &env.client,
        &project,
        "web",
        json!({"type": "image", "image": "registry.example.com/demo/web:1.0"}),
        None,
    )
    .await;
    create_build(
        &env.client,
        &project,
        "web-1",
        "web",
        json!({"helmValues": {"replicaCount": 2, "port": 8080, "env": {"NODE_ENV": "production"}}}),
    )
    .await;
    let done = wait_build(&env.client, &project, "web-1", AppBuildPhase::Completed).await;
    let status = done.status.unwrap();
    assert_eq!(status.image.as_deref(), Some("registry.example.com/demo/web:1.0"));
    assert!(status.completion_time.is_some() && status.start_time.is_some());

    // What Completed means: the Deployment runs this build's image, rolled out and available.
    let deployment = Api::<Deployment>::namespaced(env.client.clone(), &project)
        .get("web-web")
        .await
        .unwrap();
    let template = deployment.spec.as_ref().unwrap().template.clone();
    assert_eq!(
        template.metadata.unwrap().annotations.unwrap()["apps.shapeblock.io/build"],
        "web-1"
    );
    let container = &template.spec.unwrap().containers[0];
    assert_eq!(container.name, "web");
    assert_eq!(
        container.image.as_deref(),
        Some("registry.example.com/demo/web:1.0")
    );
    assert_eq!(container.env.as_ref().unwrap()[0].name, "NODE_ENV");
    assert_eq!(deployment.status.unwrap().available_replicas, Some(2));
    // The HelmChart lives in the agent's namespace, targeting the project.
    let charts = Api::<kube::api::DynamicObject>::namespaced_with(
        env.client.clone(),
        AGENT_NS,
        &kube::discovery::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart"),
            "helmcharts",
        ),
    );
    let chart = charts
        .get(&shapeblock_agent::controllers::deploy::chart_name(
            &project, "web",
        ))
        .await
        .unwrap();
    assert_eq!(chart.data["spec"]["targetNamespace"], project.as_str());
    // The pinned helm-controller's CRD has failurePolicy: the agent read it and kept it.
    assert_eq!(chart.data["spec"]["failurePolicy"], "retry");
    // The helm-controller's ServiceAccount for it is in the agent's namespace, never the
    // tenant's (where any pod could name it).
    let accounts = |namespace: &str| {
        Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(env.client.clone(), namespace)
    };
    let in_tenant = accounts(&project).list(&Default::default()).await.unwrap().items;
    assert!(
        in_tenant.iter().all(|sa| !sa.name_any().starts_with("helm-")),
        "{:?}",
        in_tenant.iter().map(|sa| sa.name_any()).collect::<Vec<_>>()
    );
    assert!(
        accounts(AGENT_NS)
            .get_opt(&format!("helm-{}", chart.name_any()))
            .await
            .unwrap()
            .is_some()
    );

    let app = Api::<App>::namespaced(env.client.clone(), &project)
        .get("web")
        .await
        .unwrap();
    let app_status = app.status.unwrap();
    assert_eq!(
        app_status.current_image.as_deref(),
        Some("registry.example.com/demo/web:1.0")
    );
    assert_eq!(app_status.latest_build.as_deref(), Some("web-1"));
    let app = wait_app(&env.client, &project, "web", AppPhase::Deployed).await;
    assert!(app.status.unwrap().current_image.is_some());

    // Deleting the Project takes its HelmCharts (in the agent's namespace) with it.
    let chart_name = shapeblock_agent::controllers::deploy::chart_name(&project, "web");
    Api::<Project>::all(env.client.clone())
        .delete(&project, &Default::default())
        .await
        .unwrap();
    eventually(
        BUILD_TIMEOUT,
        "the Project, and its HelmChart being deleted",
        || async {
            let project_gone = Api::<Project>::all(env.client.clone())
                .get_opt(&project)
                .await
                .unwrap()
                .is_none();
            let chart = charts.get_opt(&chart_name).await.unwrap();
            let chart_going = chart.is_none_or(|c| c.metadata.deletion_timestamp.is_some());
            (project_gone && chart_going).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn a_dockerfile_build_resolves_builds_pushes_and_deploys() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "kaniko").await;
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "resolve"),
        &PodOutcome::Succeed {
            after: Duration::from_millis(500),
            message: Some(COMMIT.into()),
        },
    )
    .await
    .unwrap();
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &PodOutcome::Succeed {
            after: Duration::from_secs(1),
            message: Some(digest()),
        },
    )
    .await
    .unwrap();
    app(
        &env.client,
        &project,
        "api",
        json!({"type": "dockerfile", "dockerfile": "Dockerfile.prod"}),
        Some(json!({"url": "https://github.com/example/api.git"})),
    )
    .await;
    create_build(
        &env.client,
        &project,
        "api-1",
        "api",
        json!({"gitRef": "main", "buildVars": [{"key": "A", "value": "1"}]}),
    )
    .await;

    // The build Job exists while it runs, with its labels and deadline.
    let jobs = Api::<Job>::namespaced(env.client.clone(), &project);
    let (job, _) = eventually(BUILD_TIMEOUT, "the build Job", || async {
        jobs.get_opt("api-1-build").await.unwrap()
    })
    .await;
    assert_eq!(job.labels()["apps.shapeblock.io/build"], "api-1");
    assert_eq!(job.spec.as_ref().unwrap().backoff_limit, Some(0));
    let done = wait_build(&env.client, &project, "api-1", AppBuildPhase::Completed).await;
    let status = done.status.unwrap();
    assert_eq!(status.commit_sha.as_deref(), Some(COMMIT));
    assert_eq!(status.image_digest.as_deref(), Some(digest().as_str()));
    let image = format!("registry.example.com/{project}/api:0123456789ab@{}", digest());
    assert_eq!(status.image.as_deref(), Some(image.as_str()));
    let deployment = Api::<Deployment>::namespaced(env.client.clone(), &project)
        .get("api-web")
        .await
        .unwrap();
    assert_eq!(
        deployment.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .as_deref(),
        Some(image.as_str()),
        "pinned by digest"
    );
    // The result is recorded, so the Jobs are gone.
    eventually(
        Duration::from_secs(30),
        "the build Jobs to be deleted",
        || async {
            let left = jobs
                .list(&ListParams::default().labels("apps.shapeblock.io/build=api-1"))
                .await
                .unwrap()
                .items;
            left.iter()
                .all(|j| j.metadata.deletion_timestamp.is_some())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn failures_say_which_step_failed() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "failing").await;
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "resolve"),
        &PodOutcome::Succeed {
            after: Duration::from_millis(200),
            message: Some(COMMIT.into()),
        },
    )
    .await
    .unwrap();
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &PodOutcome::Fail {
            after: Duration::from_millis(500),
            exit_code: 1,
            message: "error building image: RUN npm ci: exit status 1".into(),
        },
    )
    .await
    .unwrap();
    app(
        &env.client,
        &project,
        "api",
        json!({"type": "dockerfile"}),
        Some(json!({"url": "https://github.com/example/api.git"})),
    )
    .await;
    create_build(&env.client, &project, "api-1", "api", json!({})).await;
    let failed = wait_build(&env.client, &project, "api-1", AppBuildPhase::Failed).await;
    let status = failed.status.unwrap();
    // The simulated node ran the clone step, then failed the build step with this message.
    assert_eq!(status.reason.as_deref(), Some("BuildFailed"), "{status:?}");
    assert!(status.message.unwrap().contains("RUN npm ci: exit status 1"));

    // Unsafe deploy values are refused before anything is built.
    create_build(
        &env.client,
        &project,
        "api-2",
        "api",
        json!({"helmValues": {"extraDeploy": [{"kind": "ClusterRoleBinding"}]}}),
    )
    .await;
    let refused = wait_build(&env.client, &project, "api-2", AppBuildPhase::Failed).await;
    assert_eq!(
        refused.status.as_ref().unwrap().reason.as_deref(),
        Some("InvalidSpec")
    );
    assert!(
        Api::<Job>::namespaced(env.client.clone(), &project)
            .get_opt("api-2-build")
            .await
            .unwrap()
            .is_none()
    );
}

/// The agent, with its own ServiceAccount and RBAC, reads the HelmChart CRD the cluster
/// serves (the pinned helm-controller's) and finds every optional field it writes there.
#[tokio::test]
async fn the_agent_reads_which_fields_the_served_helm_chart_crd_declares() {
    use shapeblock_agent::controllers::deploy::{OPTIONAL_SPEC_FIELDS, SpecFields};
    use shapeblock_agent::controllers::{Config, Context, metrics::Metrics};
    let env = env().await;
    let kubeconfig = kube::config::Kubeconfig::read_from(&env.kubeconfig).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let ctx = Context::new(
        Client::try_from(config).unwrap(),
        std::sync::Arc::new(Metrics::default()),
        Config::default(),
    );
    let SpecFields::Declared(fields) = ctx.helm_chart_fields().await else {
        panic!("the agent could not read the served HelmChart CRD's spec fields");
    };
    for field in OPTIONAL_SPEC_FIELDS
        .iter()
        .chain(&["chartContent", "targetNamespace", "valuesContent"])
    {
        assert!(fields.contains(*field), "{field} in {fields:?}");
    }
}

/// Pods pull with the project's copy of the cluster pull secret and, for an App whose images
/// live in its own registry, with that registry's credential: the Deployment the real Helm
/// renders and the release command's Job alike.
#[tokio::test]
async fn app_pods_and_the_release_command_pull_with_the_registry_credentials() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "pulls").await;
    let own: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "metadata": {"name": "ghcr", "labels": {"apps.shapeblock.io/credential": "registry"},
                     "annotations": {"apps.shapeblock.io/registry-host": "ghcr.io"}},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": "{\"auths\":{\"ghcr.io\":{\"auth\":\"YTpi\"}}}"},
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(env.client.clone(), &project)
        .create(&Default::default(), &own)
        .await
        .unwrap();
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "release"),
        &PodOutcome::Succeed {
            after: Duration::from_secs(2),
            message: None,
        },
    )
    .await
    .unwrap();
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "web"},
               "spec": {"registry": {"url": "ghcr.io/acme", "secretName": "ghcr"},
                        "build": {"type": "image", "image": "ghcr.io/acme/web:1.0"},
                        "releaseCommand": ["./migrate"]}}),
    )
    .await;
    wait_app(&env.client, &project, "web", AppPhase::Ready).await;
    create_build(
        &env.client,
        &project,
        "web-1",
        "web",
        json!({"helmValues": {"port": 8080}}),
    )
    .await;
    let pulls = |pod: Option<k8s_openapi::api::core::v1::PodSpec>| -> Vec<String> {
        pod.and_then(|p| p.image_pull_secrets)
            .unwrap_or_default()
            .into_iter()
            .map(|s| s.name)
            .collect()
    };
    let jobs = Api::<Job>::namespaced(env.client.clone(), &project);
    let (release, _) = eventually(BUILD_TIMEOUT, "the release command's Job", || async {
        jobs.get_opt("web-1-release").await.unwrap()
    })
    .await;
    assert_eq!(pulls(release.spec.unwrap().template.spec), [PULL_SECRET, "ghcr"]);
    wait_build(&env.client, &project, "web-1", AppBuildPhase::Completed).await;
    let deployment = Api::<Deployment>::namespaced(env.client.clone(), &project)
        .get("web-web")
        .await
        .unwrap();
    assert_eq!(
        pulls(deployment.spec.unwrap().template.spec),
        [PULL_SECRET, "ghcr"]
    );
}

/// Push versus build, and memory, decided from what the tools leave: kaniko writes its digest
/// file just before it pushes, so a failed push leaves the digest as the termination message
/// and kaniko's own `error pushing image: …` last in its log; an OOM kill is the kubelet's
/// `OOMKilled` with exit 137 and no message.
#[tokio::test]
async fn failure_reasons_come_from_what_kaniko_and_the_kubelet_leave() {
    use shapeblock_testenv::kubelet::logs;
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "evidence").await;
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "resolve"),
        &PodOutcome::Succeed {
            after: Duration::from_millis(200),
            message: Some(COMMIT.into()),
        },
    )
    .await
    .unwrap();
    let push_error = format!(
        "error pushing image: failed to push to destination registry.example.com/{project}/api:0123456789ab: \
         PUT https://registry.example.com/v2/{project}/api/manifests/0123456789ab: DENIED: requested access to the resource is denied"
    );
    logs().script(
        &project,
        "build",
        &[
            "INFO[0004] Taking snapshot of full filesystem...",
            "INFO[0005] Pushing image to registry.example.com",
            &push_error,
        ],
    );
    let pushing = set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &PodOutcome::Fail {
            after: Duration::from_millis(500),
            exit_code: 1,
            message: digest(),
        },
    )
    .await
    .unwrap();
    app(
        &env.client,
        &project,
        "api",
        json!({"type": "dockerfile"}),
        Some(json!({"url": "https://github.com/example/api.git"})),
    )
    .await;
    create_build(&env.client, &project, "api-1", "api", json!({})).await;
    let failed = wait_build(&env.client, &project, "api-1", AppBuildPhase::Failed).await;
    let status = failed.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("PushFailed"), "{status:?}");
    let message = status.message.unwrap();
    assert!(
        message.starts_with(&format!(
            "kaniko built the image ({}) but did not push it (exit 1): ",
            digest()
        )),
        "{message}"
    );
    assert!(
        message.ends_with(&push_error),
        "the agent read kaniko's last line: {message}"
    );

    pushing.remove(&env.client).await.unwrap();
    logs().script(&project, "build", &["INFO[0009] RUN npm ci"]);
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &PodOutcome::Killed {
            after: Duration::from_millis(500),
            exit_code: 137,
            reason: "OOMKilled".into(),
        },
    )
    .await
    .unwrap();
    create_build(&env.client, &project, "api-2", "api", json!({"imageTag": "oom"})).await;
    let killed = wait_build(&env.client, &project, "api-2", AppBuildPhase::Failed).await;
    let status = killed.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("BuildOutOfMemory"), "{status:?}");
    let message = status.message.unwrap();
    assert!(
        message.starts_with(
            "the build step was killed for using more than its memory limit of 2Gi (exit 137, OOMKilled)"
        ),
        "{message}"
    );
    assert!(message.ends_with("INFO[0009] RUN npm ci"), "{message}");
}

#[tokio::test]
async fn a_hanging_build_times_out_and_a_newer_build_supersedes_a_running_one() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "slow").await;
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "resolve"),
        &PodOutcome::Succeed {
            after: Duration::from_millis(200),
            message: Some(COMMIT.into()),
        },
    )
    .await
    .unwrap();
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &PodOutcome::Hang,
    )
    .await
    .unwrap();
    app(
        &env.client,
        &project,
        "api",
        json!({"type": "dockerfile"}),
        Some(json!({"url": "https://github.com/example/api.git"})),
    )
    .await;
    create_build(
        &env.client,
        &project,
        "api-1",
        "api",
        json!({"timeoutSeconds": 60}),
    )
    .await;
    wait_build(&env.client, &project, "api-1", AppBuildPhase::Building).await;
    create_build(
        &env.client,
        &project,
        "api-2",
        "api",
        json!({"timeoutSeconds": 60}),
    )
    .await;
    let superseded = wait_build(&env.client, &project, "api-1", AppBuildPhase::Cancelled).await;
    assert_eq!(superseded.status.unwrap().reason.as_deref(), Some("Superseded"));
    let timed_out = eventually(Duration::from_secs(120), "api-2 to time out", || async {
        let build = Api::<AppBuild>::namespaced(env.client.clone(), &project)
            .get("api-2")
            .await
            .unwrap();
        (build.status.as_ref()?.phase == Some(AppBuildPhase::Failed)).then_some(build)
    })
    .await
    .0;
    assert_eq!(timed_out.status.unwrap().reason.as_deref(), Some("Timeout"));
    let _ = Api::<Project>::all(env.client.clone())
        .patch(
            &project,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"done": "true"}}})),
        )
        .await;
}

fn condition_reason(build: &AppBuild, type_: &str) -> Option<String> {
    build
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.clone())
}

#[tokio::test]
async fn an_image_built_from_the_same_inputs_is_reused_without_a_build() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "reuse").await;
    let outcome = |after: u64, message: &str| PodOutcome::Succeed {
        after: Duration::from_millis(after),
        message: Some(message.into()),
    };
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "resolve"),
        &outcome(200, COMMIT),
    )
    .await
    .unwrap();
    let succeeds = set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &outcome(500, &digest()),
    )
    .await
    .unwrap();
    app(
        &env.client,
        &project,
        "api",
        json!({"type": "dockerfile"}),
        Some(json!({"url": "https://github.com/example/api.git"})),
    )
    .await;
    create_build(&env.client, &project, "api-1", "api", json!({"gitRef": "main"})).await;
    let first = wait_build(&env.client, &project, "api-1", AppBuildPhase::Completed).await;
    // From now on a build would fail: the second AppBuild must not build.
    succeeds.remove(&env.client).await.unwrap();
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &PodOutcome::Fail {
            after: Duration::from_millis(100),
            exit_code: 1,
            message: "a second build ran".into(),
        },
    )
    .await
    .unwrap();
    create_build(&env.client, &project, "api-2", "api", json!({"gitRef": "main"})).await;
    let second = wait_build(&env.client, &project, "api-2", AppBuildPhase::Completed).await;
    let (a, b) = (first.status.clone().unwrap(), second.status.clone().unwrap());
    assert_eq!(a.image, b.image);
    assert_eq!(a.inputs_hash, b.inputs_hash);
    assert!(a.inputs_hash.is_some());
    assert_eq!(condition_reason(&second, "Built").as_deref(), Some("ImageReused"));
    // Other inputs: a real build (which now fails, proving it ran).
    create_build(
        &env.client,
        &project,
        "api-3",
        "api",
        json!({"gitRef": "main", "buildVars": [{"key": "FLAVOUR", "value": "other"}]}),
    )
    .await;
    let third = wait_build(&env.client, &project, "api-3", AppBuildPhase::Failed).await;
    assert!(
        third
            .status
            .unwrap()
            .message
            .unwrap()
            .contains("a second build ran")
    );
}

#[tokio::test]
async fn rollback_deploys_an_earlier_image_history_is_pruned_and_a_deleted_app_takes_its_release() {
    let env = env().await;
    let _agent = env.agent(&["--keep-builds=2", "--keep-failed-builds=1"]).await;
    let project = ready_project(&env.client, "rollback").await;
    let image = |tag: &str| format!("registry.example.com/demo/web:{tag}");
    app(
        &env.client,
        &project,
        "web",
        json!({"type": "image", "image": image("1.0")}),
        None,
    )
    .await;
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &project);
    let running = || async {
        let d = deployments.get("web-web").await.unwrap();
        d.spec.unwrap().template.spec.unwrap().containers[0]
            .image
            .clone()
            .unwrap()
    };
    create_build(&env.client, &project, "w1", "web", json!({})).await;
    wait_build(&env.client, &project, "w1", AppBuildPhase::Completed).await;
    apps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"build": {"image": image("2.0")}}})),
    )
    .await
    .unwrap();
    create_build(&env.client, &project, "w2", "web", json!({})).await;
    wait_build(&env.client, &project, "w2", AppBuildPhase::Completed).await;
    assert_eq!(running().await, image("2.0"));

    // Roll back to w1: its image, no build; the App says what it ran before.
    create_build(&env.client, &project, "w3", "web", json!({"rollbackTo": "w1"})).await;
    let rolled = wait_build(&env.client, &project, "w3", AppBuildPhase::Completed).await;
    assert_eq!(condition_reason(&rolled, "Built").as_deref(), Some("Rollback"));
    assert_eq!(running().await, image("1.0"));
    let status = apps.get("web").await.unwrap().status.unwrap();
    assert_eq!(status.current_image, Some(image("1.0")));
    assert_eq!(status.previous_image, Some(image("2.0")));
    create_build(&env.client, &project, "w4", "web", json!({"rollbackTo": "nope"})).await;
    let refused = wait_build(&env.client, &project, "w4", AppBuildPhase::Failed).await;
    let refused = refused.status.unwrap();
    assert_eq!(refused.reason.as_deref(), Some("InvalidSpec"));
    assert!(
        refused
            .message
            .unwrap()
            .contains("AppBuild nope: it does not exist")
    );

    // History: 2 Completed and 1 failed kept, plus what the App runs; w1 goes.
    create_build(&env.client, &project, "w5", "web", json!({})).await;
    wait_build(&env.client, &project, "w5", AppBuildPhase::Completed).await;
    let builds = Api::<AppBuild>::namespaced(env.client.clone(), &project);
    eventually(Duration::from_secs(30), "w1 pruned", || async {
        builds.get_opt("w1").await.unwrap().is_none().then_some(())
    })
    .await;
    for kept in ["w2", "w3", "w4", "w5"] {
        assert!(builds.get_opt(kept).await.unwrap().is_some(), "{kept} kept");
    }

    // Deleting the App deletes its HelmChart (the helm-controller uninstalls the release).
    let charts = Api::<kube::api::DynamicObject>::namespaced_with(
        env.client.clone(),
        AGENT_NS,
        &shapeblock_agent::controllers::deploy::helm_chart_resource(),
    );
    let chart = shapeblock_agent::controllers::deploy::chart_name(&project, "web");
    assert!(charts.get_opt(&chart).await.unwrap().is_some());
    apps.delete("web", &Default::default()).await.unwrap();
    eventually(BUILD_TIMEOUT, "the App gone and its HelmChart going", || async {
        let app_gone = apps.get_opt("web").await.unwrap().is_none();
        let chart = charts.get_opt(&chart).await.unwrap();
        (app_gone && chart.is_none_or(|c| c.metadata.deletion_timestamp.is_some())).then_some(())
    })
    .await;
}

/// `failurePolicy: retry`: an upgrade the cluster refuses (here a ResourceQuota forbids the
/// Service the new values add) fails the build with `DeployFailed` and leaves the serving
/// release untouched; once the cause is gone, the next build deploys.
#[tokio::test]
async fn a_failed_upgrade_keeps_the_previous_release_serving_and_the_next_build_deploys() {
    use k8s_openapi::api::core::v1::ResourceQuota;
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "upgrade").await;
    let image = |tag: &str| format!("registry.example.com/demo/web:{tag}");
    app(
        &env.client,
        &project,
        "web",
        json!({"type": "image", "image": image("1.0")}),
        None,
    )
    .await;
    create_build(&env.client, &project, "w1", "web", json!({})).await;
    wait_build(&env.client, &project, "w1", AppBuildPhase::Completed).await;

    let quotas = Api::<ResourceQuota>::namespaced(env.client.clone(), &project);
    quotas
        .create(
            &Default::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "no-services"}, "spec": {"hard": {"services": "0"}}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    // The quota controller must have counted before the apiserver enforces it.
    eventually(Duration::from_secs(30), "the quota counted", || async {
        quotas.get("no-services").await.ok()?.status?.used.map(|_| ())
    })
    .await;
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    apps.patch(
        "web",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"build": {"image": image("2.0")}}})),
    )
    .await
    .unwrap();
    create_build(
        &env.client,
        &project,
        "w2",
        "web",
        json!({"helmValues": {"port": 8080}}),
    )
    .await;
    let failed = wait_build(&env.client, &project, "w2", AppBuildPhase::Failed).await;
    let failed = failed.status.unwrap();
    assert_eq!(failed.reason.as_deref(), Some("DeployFailed"), "{failed:?}");
    // The serving release is untouched: w1's image, available.
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &project);
    let serving = deployments.get("web-web").await.unwrap();
    let template = serving.spec.unwrap().template;
    assert_eq!(
        template.metadata.unwrap().annotations.unwrap()["apps.shapeblock.io/build"],
        "w1"
    );
    assert_eq!(template.spec.unwrap().containers[0].image, Some(image("1.0")));
    assert_eq!(serving.status.unwrap().available_replicas, Some(1));
    assert_eq!(
        apps.get("web").await.unwrap().status.unwrap().current_image,
        Some(image("1.0"))
    );

    // The cause removed, the next build deploys over the failed release.
    quotas.delete("no-services", &Default::default()).await.unwrap();
    create_build(
        &env.client,
        &project,
        "w3",
        "web",
        json!({"helmValues": {"port": 8080}}),
    )
    .await;
    wait_build(&env.client, &project, "w3", AppBuildPhase::Completed).await;
    let deployed = deployments.get("web-web").await.unwrap();
    assert_eq!(
        deployed.spec.unwrap().template.spec.unwrap().containers[0].image,
        Some(image("2.0"))
    );
    assert!(
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(env.client.clone(), &project)
            .get_opt("web-web")
            .await
            .unwrap()
            .is_some()
    );
}
