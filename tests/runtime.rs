//! What an App runs, end to end on the simulated cluster (kwok nodes, the real
//! controller-manager, the real k3s helm-controller and real Helm): process types with their
//! own selectors, health-gated web, autoscaling, a domain, cron; config changes released to
//! the running image without a build; secret config values kept out of everything but their
//! Secret.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase, AppPhase, ReleaseReason};
use shapeblock_agent::controllers::deploy::{CONFIG_REVISION_ANNOTATION, PROCESS_LABEL, chart_name};
use support::agent::*;
use support::eventually;

const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(180);
const IMAGE: &str = "registry.example.com/demo/shop:1.0";

/// An App with a web and a worker process, a health check, autoscaling, a domain and a cron
/// entry: the sample of the README.
fn runtime() -> serde_json::Value {
    json!({
        "config": {"NODE_ENV": "production"},
        "processes": {
            "web": {"command": ["node", "server.js"], "port": 8080, "healthCheck": {"path": "/healthz"},
                    "resources": {"requests": {"cpu": "100m"}},
                    "autoscaling": {"minReplicas": 2, "maxReplicas": 5, "targetCpuPercent": 70}},
            "worker": {"command": ["node", "worker.js"], "replicas": 1},
        },
        "domains": [{"host": "shop.example.com"}],
        "cron": [{"name": "nightly", "schedule": "0 3 * * *", "command": ["node", "report.js"]}],
        "deploy": {"progressDeadlineSeconds": 60, "ingressClass": "nginx"},
    })
}

async fn deployed_app(client: &Client, project: &str) -> App {
    let mut spec =
        json!({"registry": {"url": "registry.example.com"}, "build": {"type": "image", "image": IMAGE}});
    spec.as_object_mut()
        .unwrap()
        .extend(runtime().as_object().unwrap().clone());
    create(
        Api::<App>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "shop"}, "spec": spec}),
    )
    .await;
    wait_app(client, project, "shop", AppPhase::Ready).await;
    create(
        Api::<AppBuild>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": "shop-1"}, "spec": {"appName": "shop"}}),
    )
    .await;
    wait_build(client, project, "shop-1", AppBuildPhase::Completed).await;
    wait_app(client, project, "shop", AppPhase::Deployed).await
}

async fn deployment(client: &Client, project: &str, name: &str) -> Deployment {
    Api::<Deployment>::namespaced(client.clone(), project)
        .get(name)
        .await
        .unwrap()
}

fn pod_annotation(deployment: &Deployment, key: &str) -> Option<String> {
    deployment
        .spec
        .as_ref()?
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(key)
        .cloned()
}

async fn releases(client: &Client, project: &str) -> Vec<(u32, ReleaseReason, u32)> {
    releases_of(client, project, "shop").await
}

/// Waits until every process Deployment runs config revision `revision`, fully available.
async fn rolled_out_with(client: &Client, project: &str, revision: u32) {
    for name in ["shop-web", "shop-worker"] {
        eventually(
            ROLLOUT_TIMEOUT,
            &format!("{name} to roll out config revision {revision}"),
            || async {
                let d = deployment(client, project, name).await;
                let status = d.status.clone().unwrap_or_default();
                let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                (pod_annotation(&d, CONFIG_REVISION_ANNOTATION) == Some(revision.to_string())
                    && status.observed_generation >= d.metadata.generation
                    && status.updated_replicas == Some(desired)
                    && status.available_replicas == Some(desired)
                    && status.replicas == Some(desired))
                .then_some(())
            },
        )
        .await;
    }
}

#[tokio::test]
async fn two_processes_a_domain_cron_and_an_autoscaler_roll_out_and_web_traffic_reaches_web_pods_only() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "runtime").await;
    let app = deployed_app(&env.client, &project).await;
    let status = app.status.unwrap();
    assert_eq!(status.current_build.as_deref(), Some("shop-1"));
    assert_eq!(status.config_secret_name.as_deref(), Some("shop-config"));

    // Each process is its own Deployment with its own selector and command.
    let web = deployment(&env.client, &project, "shop-web").await;
    let worker = deployment(&env.client, &project, "shop-worker").await;
    for (deployment, process, command) in [(&web, "web", "server.js"), (&worker, "worker", "worker.js")] {
        let spec = deployment.spec.as_ref().unwrap();
        assert_eq!(
            spec.selector
                .match_labels
                .as_ref()
                .unwrap()
                .get(PROCESS_LABEL)
                .map(String::as_str),
            Some(process)
        );
        let strategy = spec.strategy.as_ref().unwrap().rolling_update.as_ref().unwrap();
        assert_eq!(
            strategy.max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
        );
        assert_eq!(
            strategy.max_surge,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
        );
        assert_eq!(spec.progress_deadline_seconds, Some(60));
        let container = support::first_container(deployment);
        assert_eq!(
            container.command.as_ref().unwrap(),
            &vec!["node".to_string(), command.to_string()]
        );
        let env_from = container.env_from.as_ref().expect("secret config by reference");
        assert_eq!(env_from[0].secret_ref.as_ref().unwrap().name, "shop-config");
        assert_eq!(container.env.as_ref().unwrap()[0].name, "NODE_ENV");
    }
    // Web: health-gated, drained before it stops; the worker serves nothing.
    let web_container = support::first_container(&web);
    let readiness = web_container
        .readiness_probe
        .as_ref()
        .expect("web has a readiness check");
    assert_eq!(
        readiness.http_get.as_ref().unwrap().path.as_deref(),
        Some("/healthz")
    );
    let pre_stop = web_container
        .lifecycle
        .as_ref()
        .unwrap()
        .pre_stop
        .as_ref()
        .unwrap();
    assert_eq!(pre_stop.sleep.as_ref().unwrap().seconds, 5);
    assert!(support::first_container(&worker).readiness_probe.is_none());
    assert_eq!(
        web.spec.as_ref().unwrap().replicas,
        Some(2),
        "starts at the autoscaler's minimum"
    );

    // The web Service's endpoints hold web pods only.
    let pods = Api::<Pod>::namespaced(env.client.clone(), &project)
        .list(&ListParams::default().labels(&format!("{PROCESS_LABEL}=web")))
        .await
        .unwrap();
    let web_ips: std::collections::BTreeSet<String> = pods
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    let worker_ips: std::collections::BTreeSet<String> = Api::<Pod>::namespaced(env.client.clone(), &project)
        .list(&ListParams::default().labels(&format!("{PROCESS_LABEL}=worker")))
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    assert_eq!(web_ips.len(), 2, "two web pods with addresses");
    assert_eq!(worker_ips.len(), 1, "one worker pod with an address");
    let slices = Api::<EndpointSlice>::namespaced(env.client.clone(), &project);
    let (endpoints, _) = eventually(
        support::agent::TIMEOUT,
        "the web Service's EndpointSlice",
        || async {
            let items = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=shop-web"))
                .await
                .unwrap()
                .items;
            let addresses: std::collections::BTreeSet<String> = items
                .iter()
                .flat_map(|s| s.endpoints.iter().flat_map(|e| e.addresses.clone()))
                .collect();
            (addresses.len() == 2).then_some(addresses)
        },
    )
    .await;
    assert_eq!(endpoints, web_ips);
    assert!(endpoints.is_disjoint(&worker_ips));

    // Autoscaling through autoscaling/v2, cron as a CronJob, the domain as an Ingress rule
    // with TLS from the Certificate's Secret.
    let hpa = Api::<HorizontalPodAutoscaler>::namespaced(env.client.clone(), &project)
        .get("shop-web")
        .await
        .unwrap();
    let hpa_spec = hpa.spec.unwrap();
    assert_eq!((hpa_spec.min_replicas, hpa_spec.max_replicas), (Some(2), 5));
    assert_eq!(hpa_spec.scale_target_ref.name, "shop-web");
    let cron = Api::<CronJob>::namespaced(env.client.clone(), &project)
        .get("shop-nightly")
        .await
        .unwrap();
    let cron_spec = cron.spec.unwrap();
    assert_eq!(cron_spec.schedule, "0 3 * * *");
    let cron_container = &cron_spec
        .job_template
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .containers[0];
    assert_eq!(cron_container.command.as_ref().unwrap()[1], "report.js");
    assert_eq!(cron_container.image.as_deref(), Some(IMAGE));
    let ingress = Api::<Ingress>::namespaced(env.client.clone(), &project)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    assert_eq!(ingress.len(), 1);
    let ingress_spec = ingress[0].spec.clone().unwrap();
    assert_eq!(ingress_spec.ingress_class_name.as_deref(), Some("nginx"));
    assert_eq!(
        ingress_spec.rules.unwrap()[0].host.as_deref(),
        Some("shop.example.com")
    );
    assert_eq!(
        ingress_spec.tls.unwrap()[0].secret_name.as_deref(),
        Some("shop-tls-shop-example-com")
    );
    // Without cert-manager's API, the App says so.
    let app = Api::<App>::namespaced(env.client.clone(), &project)
        .get("shop")
        .await
        .unwrap();
    let tls = app
        .status
        .unwrap()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "CertificatesReady")
        .expect("a CertificatesReady condition");
    assert_eq!(
        (tls.status.as_str(), tls.reason.as_str()),
        ("False", "CertManagerMissing")
    );
    assert!(tls.message.contains("cert-manager"), "{}", tls.message);
}

#[tokio::test]
async fn config_changes_release_without_a_build_keep_the_autoscaled_count_and_secret_values_stay_secret() {
    let env = env().await;
    let agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "config").await;
    let app = deployed_app(&env.client, &project).await;
    let first_revision = app.status.as_ref().unwrap().config_revision.unwrap();
    assert_eq!(
        releases(&env.client, &project).await,
        vec![(1, ReleaseReason::Build, first_revision)]
    );
    let jobs = Api::<Job>::namespaced(env.client.clone(), &project);
    let jobs_before = jobs.list(&ListParams::default()).await.unwrap().items.len();
    let replica_sets = Api::<ReplicaSet>::namespaced(env.client.clone(), &project);
    let web_sets = || async {
        replica_sets
            .list(&ListParams::default().labels(&format!("{PROCESS_LABEL}=web")))
            .await
            .unwrap()
            .items
            .len()
    };
    let sets_before = web_sets().await;

    // The autoscaler (here: the test in its place) chose 4 web pods.
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &project);
    deployments
        .patch_scale(
            "shop-web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await
        .unwrap();

    // A plain config var: a new release of the running image, no build.
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    apps.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"config": {"FEATURE_X": "on"}}})),
    )
    .await
    .unwrap();
    let second = first_revision + 1;
    rolled_out_with(&env.client, &project, second).await;
    let web = deployment(&env.client, &project, "shop-web").await;
    assert_eq!(
        web.spec.as_ref().unwrap().replicas,
        Some(4),
        "the upgrade keeps the autoscaled count"
    );
    let names: Vec<String> = support::first_container(&web)
        .env
        .iter()
        .flatten()
        .map(|e| e.name.clone())
        .collect();
    assert!(names.contains(&"FEATURE_X".to_string()), "{names:?}");
    assert!(web_sets().await > sets_before, "a new ReplicaSet");
    assert_eq!(
        jobs.list(&ListParams::default()).await.unwrap().items.len(),
        jobs_before,
        "no build Job"
    );
    assert_eq!(
        releases(&env.client, &project).await,
        vec![
            (1, ReleaseReason::Build, first_revision),
            (2, ReleaseReason::ConfigChange, second)
        ]
    );

    // A secret config var: set in the App's config Secret, read by the pods by reference.
    const SECRET_VALUE: &str = "s3cr3t-value-9f2c1e7d";
    let secrets = Api::<Secret>::namespaced(env.client.clone(), &project);
    secrets
        .patch(
            "shop-config",
            &PatchParams::default(),
            &Patch::Merge(json!({"stringData": {"STRIPE_KEY": SECRET_VALUE}})),
        )
        .await
        .unwrap();
    let third = second + 1;
    rolled_out_with(&env.client, &project, third).await;
    assert_eq!(
        releases(&env.client, &project).await.last(),
        Some(&(3, ReleaseReason::ConfigChange, third))
    );

    // Scaling the worker is a Scale release.
    apps.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"processes": {"worker": {"replicas": 2}}}})),
    )
    .await
    .unwrap();
    eventually(ROLLOUT_TIMEOUT, "a Scale release with 2 workers", || async {
        let d = deployment(&env.client, &project, "shop-worker").await;
        let scaled = d.status.and_then(|s| s.available_replicas) == Some(2);
        let last = releases(&env.client, &project).await.last().copied();
        (scaled && last == Some((4, ReleaseReason::Scale, third))).then_some(())
    })
    .await;

    // The secret value is nowhere but its Secret: not in the App, the AppBuild, the HelmChart,
    // the helm-controller's values Secret, Helm's release records, Events or the agent's log.
    let mut places: BTreeMap<String, String> = BTreeMap::new();
    places.insert(
        "App".into(),
        serde_json::to_string(&apps.get("shop").await.unwrap()).unwrap(),
    );
    places.insert(
        "AppBuild".into(),
        serde_json::to_string(
            &Api::<AppBuild>::namespaced(env.client.clone(), &project)
                .get("shop-1")
                .await
                .unwrap(),
        )
        .unwrap(),
    );
    let charts = Api::<DynamicObject>::namespaced_with(
        env.client.clone(),
        AGENT_NS,
        &shapeblock_agent::controllers::deploy::helm_chart_resource(),
    );
    let release = chart_name(&project, "shop");
    places.insert(
        "HelmChart".into(),
        serde_json::to_string(&charts.get(&release).await.unwrap()).unwrap(),
    );
    for namespace in [AGENT_NS, project.as_str()] {
        for secret in Api::<Secret>::namespaced(env.client.clone(), namespace)
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
        {
            if secret.name_any() == "shop-config" {
                continue;
            }
            let decoded: String = secret
                .data
                .iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(&v.0)))
                .collect();
            places.insert(format!("Secret {namespace}/{}", secret.name_any()), decoded);
        }
    }
    // Helm's release records are gzipped: read them back with helm itself.
    let plane = shapeblock_testenv::shared().unwrap();
    let helm = std::process::Command::new(shapeblock_testenv::default_bin_dir().join("helm"))
        .args(["get", "all", &release, "--namespace", &project, "--kubeconfig"])
        .arg(&plane.kubeconfig)
        .env("HELM_CACHE_HOME", env.dir.join("helm-cache"))
        .env("HELM_CONFIG_HOME", env.dir.join("helm-config"))
        .env("HELM_DATA_HOME", env.dir.join("helm-data"))
        .output()
        .unwrap();
    assert!(helm.status.success(), "{}", String::from_utf8_lossy(&helm.stderr));
    let helm_text = String::from_utf8_lossy(&helm.stdout).into_owned();
    assert!(
        helm_text.contains("shop-config"),
        "helm get all shows the release"
    );
    places.insert("helm get all".into(), helm_text);
    for namespace in [AGENT_NS, project.as_str()] {
        let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(env.client.clone(), namespace)
            .list(&ListParams::default())
            .await
            .unwrap();
        places.insert(
            format!("Events in {namespace}"),
            serde_json::to_string(&events.items).unwrap(),
        );
    }
    places.insert("agent log".into(), agent.log_tail(100_000));
    for (place, text) in &places {
        assert!(
            !text.contains(SECRET_VALUE),
            "the secret config value leaked into {place}"
        );
    }
    assert!(places.len() > 8, "looked in {:?}", places.keys());
}

#[tokio::test]
async fn the_release_command_runs_as_web_before_the_release_and_a_failing_one_changes_nothing() {
    use shapeblock_testenv::nodes::{PodOutcome, PodSelector, set_pod_outcome};
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "release").await;
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "shop"}, "spec": {
            "registry": {"url": "registry.example.com"}, "build": {"type": "image", "image": IMAGE},
            "config": {"NODE_ENV": "production"},
            "processes": {"web": {"port": 8080, "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}},
            "releaseCommand": ["node", "migrate.js"],
        }}),
    )
    .await;
    wait_app(&env.client, &project, "shop", AppPhase::Ready).await;
    // The first release command takes a few seconds: long enough to look at its Job.
    let slow = set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "release"),
        &PodOutcome::Succeed {
            after: Duration::from_secs(6),
            message: None,
        },
    )
    .await
    .unwrap();
    let builds = Api::<AppBuild>::namespaced(env.client.clone(), &project);
    let build = |name: &str| json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": name}, "spec": {"appName": "shop"}});
    create(builds.clone(), build("shop-1")).await;
    let jobs = Api::<Job>::namespaced(env.client.clone(), &project);
    let (job, _) = eventually(support::agent::TIMEOUT, "the release command's Job", || async {
        jobs.get_opt("shop-1-release").await.unwrap()
    })
    .await;
    // Nothing is released before the command has run.
    let charts = Api::<DynamicObject>::namespaced_with(
        env.client.clone(),
        AGENT_NS,
        &shapeblock_agent::controllers::deploy::helm_chart_resource(),
    );
    assert!(
        charts
            .get_opt(&chart_name(&project, "shop"))
            .await
            .unwrap()
            .is_none()
    );
    let pod = job.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    assert_eq!(
        container.command.as_ref().unwrap(),
        &vec!["node".to_string(), "migrate.js".to_string()]
    );
    assert_eq!(container.image.as_deref(), Some(IMAGE));
    assert_eq!(container.env.as_ref().unwrap()[0].name, "NODE_ENV");
    assert_eq!(
        container.env_from.as_ref().unwrap()[0]
            .secret_ref
            .as_ref()
            .unwrap()
            .name,
        "shop-config"
    );
    let requests = container.resources.as_ref().unwrap().requests.as_ref().unwrap();
    assert_eq!(requests["cpu"].0, "100m");
    assert_eq!(
        pod.service_account_name, None,
        "the namespace's default ServiceAccount, as web"
    );
    wait_build(&env.client, &project, "shop-1", AppBuildPhase::Completed).await;
    let web = deployment(&env.client, &project, "shop-web").await;
    let web_container = support::first_container(&web);
    assert_eq!(web_container.env, container.env, "the same config as web");
    assert_eq!(web_container.env_from, container.env_from);
    assert_eq!(web_container.resources, container.resources);
    let chart_before = charts.get(&chart_name(&project, "shop")).await.unwrap();

    // A failing release command: the build fails with its words, nothing is released.
    slow.remove(&env.client).await.unwrap();
    let failing = set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "release"),
        &PodOutcome::Fail {
            after: Duration::from_millis(500),
            exit_code: 3,
            message: "migration 0042 failed: relation \"orders\" already exists".into(),
        },
    )
    .await
    .unwrap();
    create(builds.clone(), build("shop-2")).await;
    let failed = wait_build(&env.client, &project, "shop-2", AppBuildPhase::Failed).await;
    let status = failed.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("ReleaseCommandFailed"));
    let message = status.message.unwrap();
    assert!(
        message.contains("exit 3") && message.contains("migration 0042 failed"),
        "{message}"
    );
    let chart_after = charts.get(&chart_name(&project, "shop")).await.unwrap();
    assert_eq!(
        chart_after.data["spec"], chart_before.data["spec"],
        "the HelmChart is untouched"
    );
    let web = deployment(&env.client, &project, "shop-web").await;
    assert_eq!(
        pod_annotation(&web, "apps.shapeblock.io/build").as_deref(),
        Some("shop-1")
    );
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    let app = apps.get("shop").await.unwrap();
    assert_eq!(
        app.status.as_ref().unwrap().current_build.as_deref(),
        Some("shop-1")
    );

    // A config change is a release too: the command runs (now succeeding) before it.
    failing.remove(&env.client).await.unwrap();
    let revision = app.status.unwrap().config_revision.unwrap();
    apps.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"config": {"NODE_ENV": "staging"}}})),
    )
    .await
    .unwrap();
    eventually(
        ROLLOUT_TIMEOUT,
        "the config release after its release command",
        || async {
            let web = deployment(&env.client, &project, "shop-web").await;
            let released =
                pod_annotation(&web, CONFIG_REVISION_ANNOTATION) == Some((revision + 1).to_string());
            let last = releases_of(&env.client, &project, "shop").await.last().copied();
            (released && last.map(|(_, reason, _)| reason) == Some(ReleaseReason::ConfigChange)).then_some(())
        },
    )
    .await;
    let commands: Vec<String> = jobs
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|j| j.name_any())
        .filter(|n| n.starts_with("shop-release-"))
        .collect();
    assert_eq!(
        commands.len(),
        1,
        "one release command for the config release: {commands:?}"
    );
}

async fn releases_of(client: &Client, project: &str, app: &str) -> Vec<(u32, ReleaseReason, u32)> {
    let app = Api::<App>::namespaced(client.clone(), project)
        .get(app)
        .await
        .unwrap();
    app.status
        .unwrap_or_default()
        .releases
        .iter()
        .map(|r| (r.version, r.reason, r.config_revision))
        .collect()
}

#[tokio::test]
async fn a_release_that_never_becomes_ready_is_rolled_back_and_availability_never_drops() {
    use shapeblock_testenv::nodes::{PodOutcome, PodSelector, set_pod_outcome};
    const NEXT: &str = "registry.example.com/demo/shop:2.0";
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "neverready").await;
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    create(
        apps.clone(),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "shop"}, "spec": {
            "registry": {"url": "registry.example.com"}, "build": {"type": "image", "image": IMAGE},
            "processes": {"web": {"port": 8080, "replicas": 2}},
            "deploy": {"progressDeadlineSeconds": 30},
        }}),
    )
    .await;
    wait_app(&env.client, &project, "shop", AppPhase::Ready).await;
    let builds = Api::<AppBuild>::namespaced(env.client.clone(), &project);
    let build = |name: &str| json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": name}, "spec": {"appName": "shop"}});
    create(builds.clone(), build("shop-1")).await;
    wait_build(&env.client, &project, "shop-1", AppBuildPhase::Completed).await;

    // The next image never passes its readiness check.
    set_pod_outcome(
        &env.client,
        &PodSelector::image(&project, NEXT),
        &PodOutcome::NeverReady,
    )
    .await
    .unwrap();
    apps.patch(
        "shop",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"build": {"image": NEXT}}})),
    )
    .await
    .unwrap();
    let deployments = Api::<Deployment>::namespaced(env.client.clone(), &project);
    let watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let lowest = {
        let (deployments, watching) = (deployments.clone(), watching.clone());
        tokio::spawn(async move {
            let mut lowest = i32::MAX;
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let d = deployments.get("shop-web").await.unwrap();
                lowest = lowest.min(d.status.and_then(|s| s.available_replicas).unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            lowest
        })
    };
    create(builds.clone(), build("shop-2")).await;
    let failed = wait_build(&env.client, &project, "shop-2", AppBuildPhase::Failed).await;
    let status = failed.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("ReleaseNotReady"));
    let message = status.message.unwrap();
    assert!(
        message.contains("rolled back to") && message.contains("shop-1"),
        "{message}"
    );
    // The previous release serves again, fully rolled out.
    eventually(
        ROLLOUT_TIMEOUT,
        "shop-web back on shop-1, 2 available, no new pods",
        || async {
            let d = deployments.get("shop-web").await.unwrap();
            let status = d.status.clone().unwrap_or_default();
            (pod_annotation(&d, "apps.shapeblock.io/build").as_deref() == Some("shop-1")
                && support::first_container(&d).image.as_deref() == Some(IMAGE)
                && status.observed_generation >= d.metadata.generation
                && status.replicas == Some(2)
                && status.updated_replicas == Some(2)
                && status.available_replicas == Some(2))
            .then_some(())
        },
    )
    .await;
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        lowest.await.unwrap(),
        2,
        "available web pods never dropped below 2"
    );
    let app = apps.get("shop").await.unwrap();
    assert_eq!(app.status.unwrap().current_build.as_deref(), Some("shop-1"));
}

#[tokio::test]
async fn an_app_without_processes_runs_the_process_types_its_buildpack_build_reported() {
    use shapeblock_testenv::nodes::{PodOutcome, PodSelector, set_pod_outcome};
    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
    let digest = format!("sha256:{}", "cd".repeat(32));
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "buildpack").await;
    for (container, message) in [
        ("resolve", COMMIT.to_string()),
        (
            "build",
            format!(r#"{{"digest":"{digest}","processes":["web","worker"]}}"#),
        ),
    ] {
        set_pod_outcome(
            &env.client,
            &PodSelector::container(&project, container),
            &PodOutcome::Succeed {
                after: Duration::from_millis(500),
                message: Some(message),
            },
        )
        .await
        .unwrap();
    }
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "shop"}, "spec": {
            "registry": {"url": "registry.example.com"}, "build": {"type": "buildpack"},
            "git": {"url": "https://github.com/example/shop.git"},
        }}),
    )
    .await;
    wait_app(&env.client, &project, "shop", AppPhase::Ready).await;
    create(
        Api::<AppBuild>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": "shop-1"},
               "spec": {"appName": "shop", "helmValues": {"port": 8080}}}),
    )
    .await;
    let done = wait_build(&env.client, &project, "shop-1", AppBuildPhase::Completed).await;
    let found = done.status.unwrap().process_types;
    assert_eq!(found.keys().collect::<Vec<_>>(), ["web", "worker"]);
    for process in ["web", "worker"] {
        let d = deployment(&env.client, &project, &format!("shop-{process}")).await;
        assert_eq!(
            support::first_container(&d).command.as_ref().unwrap(),
            &vec![format!("/cnb/process/{process}")],
            "a buildpack image runs a process type through its launcher"
        );
    }
}
