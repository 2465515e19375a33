//! The hub's Helm chart: `helm lint` is clean, the schema and the templates refuse what cannot
//! work (several SQLite writers, a CA that would not outlive its Pod or is not shared), and what
//! the real `helm` renders (one SQLite replica on a volume; three replicas on Postgres from a
//! Secret) is accepted by the real apiserver with server-side apply, Pods passing Pod Security
//! `restricted`.

mod support;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, PostParams};
use support::chart::{
    apply_all, assert_lint_clean, assert_refused, env_of, hub_chart_dir, kinds, render_chart,
    restricted_namespace, wait_pods,
};

fn render(namespace: &str, values: &[&str]) -> Result<Vec<serde_json::Value>, String> {
    render_chart(&hub_chart_dir(), "hub", namespace, values)
}

fn args_of(deployment: &Deployment) -> Vec<String> {
    support::first_container(deployment)
        .args
        .clone()
        .unwrap_or_default()
}

#[test]
fn the_charts_version_is_the_workspaces() {
    let chart = std::fs::read_to_string(hub_chart_dir().join("Chart.yaml")).unwrap();
    let chart: serde_yaml::Value = serde_yaml::from_str(&chart).unwrap();
    assert_eq!(chart["version"].as_str(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(chart["appVersion"].as_str(), Some(env!("CARGO_PKG_VERSION")));
}

#[test]
fn helm_lint_is_clean_and_what_cannot_work_is_refused() {
    assert_lint_clean(&hub_chart_dir());
    let refused = [
        (vec!["replicas=2"], "needs database.existingSecret"),
        (
            vec!["replicas=2", "ca.existingSecret=ca"],
            "which one replica only may write",
        ),
        (
            vec!["replicas=2", "database.existingSecret=db"],
            "ca.existingSecret is required",
        ),
        (
            vec!["database.existingSecret=db"],
            "ca.existingSecret is required",
        ),
        (vec!["replicas=0"], "replicas"),
        (vec!["service.agents.type=ClusterIP"], "type"),
        (vec!["database.existingSecret=Not_A_Name"], "existingSecret"),
        (vec!["serverNames[0]=hub example.com"], "serverNames"),
        (vec!["hub.certLifetimeSeconds=60"], "certLifetimeSeconds"),
        (vec!["unknownKey=1"], "unknownKey"),
        (vec!["retention.logBytesPerCluster=1GB"], "logBytesPerCluster"),
        (vec!["retention.eventsDays=-1"], "eventsDays"),
    ];
    assert_refused(|values| render("hub", values), &refused);
}

#[tokio::test]
async fn sqlite_on_a_volume_renders_and_applies_server_side_and_the_pod_is_restricted() {
    let client = support::client().await;
    let namespace = restricted_namespace(&client, "hubchart-sqlite").await;
    let documents = render(&namespace, &[]).unwrap();
    assert_eq!(
        kinds(&documents),
        [
            "Deployment/hub-shapeblock-hub",
            "PersistentVolumeClaim/hub-shapeblock-hub",
            "Service/hub-shapeblock-hub-agents",
            "Service/hub-shapeblock-hub-api",
            "ServiceAccount/hub-shapeblock-hub",
        ]
    );
    apply_all(&client, &documents, &namespace).await;
    let deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get("hub-shapeblock-hub")
        .await
        .unwrap();
    let spec = deployment.spec.as_ref().unwrap();
    assert_eq!(spec.replicas, Some(1));
    assert_eq!(
        spec.strategy.as_ref().unwrap().type_.as_deref(),
        Some("Recreate"),
        "one SQLite writer: the old Pod goes first"
    );
    let args = args_of(&deployment);
    assert_eq!(args[0], "serve");
    assert!(
        !args.iter().any(|a| a.starts_with("--retain")),
        "no retention value set: the hub's defaults, {args:?}"
    );
    for name in [
        "hub-shapeblock-hub-api",
        &format!("hub-shapeblock-hub-api.{namespace}"),
        &format!("hub-shapeblock-hub-api.{namespace}.svc"),
    ] {
        assert!(args.contains(&format!("--name={name}")), "{name} in {args:?}");
    }
    let env = env_of(&deployment);
    assert!(
        env.iter().all(|(n, _)| n != "SHAPEBLOCK_HUB_DATABASE_URL"),
        "{env:?}"
    );
    let claim = Api::<PersistentVolumeClaim>::namespaced(client.clone(), &namespace)
        .get("hub-shapeblock-hub")
        .await
        .unwrap();
    assert_eq!(
        claim.spec.unwrap().access_modes,
        Some(vec!["ReadWriteOnce".to_string()])
    );
    let agents = Api::<Service>::namespaced(client.clone(), &namespace)
        .get("hub-shapeblock-hub-agents")
        .await
        .unwrap();
    assert_eq!(agents.spec.unwrap().type_.as_deref(), Some("LoadBalancer"));

    let pods = wait_pods(&client, &namespace, "shapeblock-hub", 1).await;
    let pod = pods[0].spec.as_ref().unwrap();
    assert_eq!(
        pod.automount_service_account_token,
        Some(false),
        "the hub never calls the API"
    );
    let security = pod.containers[0].security_context.as_ref().unwrap();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
}

#[tokio::test]
async fn postgres_from_a_secret_renders_and_applies_and_the_url_stays_in_the_secret() {
    let client = support::client().await;
    let namespace = restricted_namespace(&client, "hubchart-pg").await;
    let url = "postgres://hub:s3cret-password@db.example.com:5432/hub";
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "hub-db"},
        "stringData": {"url": url},
    }))
    .unwrap();
    Api::<Secret>::namespaced(client.clone(), &namespace)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    let values = [
        "database.existingSecret=hub-db",
        "database.pool=8",
        "database.caSecret=hub-db-ca",
        "ca.existingSecret=hub-ca",
        "serverNames[0]=hub.example.com",
        "service.agents.type=NodePort",
        "service.agents.nodePort=30743",
        "hub.appLogFollowers=4",
        "hub.watchStallMs=5000",
        "networkPolicy.enabled=true",
        "replicas=3",
        "hub.replicaHeartbeatMs=1000",
        "hub.replicaDeadAfterMs=20000",
        "retention.eventsDays=0",
        "retention.logsDays=7",
        "retention.logBytesPerCluster=512MiB",
        "retention.intervalSeconds=300",
        "podDisruptionBudget=ignored",
    ];
    // An unknown key is refused rather than ignored; the rest renders.
    let err = render(&namespace, &values).expect_err("an unknown key");
    assert!(err.contains("podDisruptionBudget"), "{err}");
    let documents = render(&namespace, &values[..values.len() - 1]).unwrap();
    assert_eq!(
        kinds(&documents),
        [
            "Deployment/hub-shapeblock-hub",
            "NetworkPolicy/hub-shapeblock-hub",
            "PodDisruptionBudget/hub-shapeblock-hub",
            "Service/hub-shapeblock-hub-agents",
            "Service/hub-shapeblock-hub-api",
            "ServiceAccount/hub-shapeblock-hub",
        ],
        "no volume claim: with Postgres nothing lasting is in the data directory; a budget for 3 replicas"
    );
    let rendered = serde_json::to_string(&documents).unwrap();
    assert!(
        !rendered.contains("s3cret-password"),
        "the database URL is in the manifests"
    );
    apply_all(&client, &documents, &namespace).await;

    let deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get("hub-shapeblock-hub")
        .await
        .unwrap();
    let args = args_of(&deployment);
    assert_eq!(deployment.spec.as_ref().unwrap().replicas, Some(3));
    for flag in [
        "--health-addr=0.0.0.0:7445",
        "--replica-heartbeat-ms=1000",
        "--replica-dead-after-ms=20000",
        "--database-pool=8",
        "--database-ca=/etc/shapeblock-hub/database/ca.crt",
        "--name=hub.example.com",
        "--app-log-followers=4",
        "--watch-stall-ms=5000",
        // 0 is passed (that rule off), not taken for "the hub's default".
        "--retain-events-days=0",
        "--retain-logs-days=7",
        "--retain-log-bytes-per-cluster=512MiB",
        "--retention-interval-seconds=300",
    ] {
        assert!(args.iter().any(|a| a == flag), "{flag} in {args:?}");
    }
    assert!(
        !args.iter().any(|a| a.starts_with("--retain-events-per-cluster")),
        "an unset retention value keeps the hub's default: {args:?}"
    );
    let env = env_of(&deployment);
    let url_env = &env
        .iter()
        .find(|(n, _)| n == "SHAPEBLOCK_HUB_DATABASE_URL")
        .expect("the database URL")
        .1;
    assert_eq!(url_env["secretKeyRef"]["name"], "hub-db", "{url_env}");
    assert_eq!(url_env["secretKeyRef"]["key"], "url", "{url_env}");
    let pod = deployment.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let volumes = pod.volumes.as_ref().unwrap();
    let data = volumes.iter().find(|v| v.name == "data").unwrap();
    assert!(data.empty_dir.is_some() && data.persistent_volume_claim.is_none());
    let ca = volumes.iter().find(|v| v.name == "ca").unwrap();
    assert_eq!(ca.secret.as_ref().unwrap().secret_name.as_deref(), Some("hub-ca"));
    // The database's CA is its own Secret, mounted where --database-ca looks, read-only.
    let database_ca = volumes
        .iter()
        .find(|v| v.name == "database-ca")
        .unwrap()
        .secret
        .as_ref()
        .unwrap();
    assert_eq!(database_ca.secret_name.as_deref(), Some("hub-db-ca"));
    assert_eq!(database_ca.items.as_ref().unwrap()[0].key, "ca.crt");
    let mount = pod.containers[0]
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "database-ca")
        .expect("the database CA mounted");
    assert_eq!(
        (mount.mount_path.as_str(), mount.read_only),
        ("/etc/shapeblock-hub/database", Some(true))
    );
    // Ready on the database and the LISTEN connection, live on the process alone.
    let container = &pod.containers[0];
    let http = |probe: &Option<k8s_openapi::api::core::v1::Probe>| {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        (get.path.clone().unwrap_or_default(), get.port.clone())
    };
    let health = k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String("health".into());
    assert_eq!(
        http(&container.readiness_probe),
        ("/readyz".to_string(), health.clone())
    );
    assert_eq!(http(&container.liveness_probe), ("/livez".to_string(), health));
    // Spread over nodes when it can be; one Pod at a time may be disrupted.
    let spread = pod
        .affinity
        .as_ref()
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|a| a.preferred_during_scheduling_ignored_during_execution.as_ref())
        .expect("soft anti-affinity with several replicas");
    assert_eq!(spread[0].pod_affinity_term.topology_key, "kubernetes.io/hostname");
    let budget =
        Api::<k8s_openapi::api::policy::v1::PodDisruptionBudget>::namespaced(client.clone(), &namespace)
            .get("hub-shapeblock-hub")
            .await
            .unwrap()
            .spec
            .unwrap();
    assert_eq!(
        budget.max_unavailable,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
    );

    let agents = Api::<Service>::namespaced(client.clone(), &namespace)
        .get("hub-shapeblock-hub-agents")
        .await
        .unwrap()
        .spec
        .unwrap();
    assert_eq!(agents.type_.as_deref(), Some("NodePort"));
    assert_eq!(agents.ports.unwrap()[0].node_port, Some(30743));

    // The policy admits the agents' port from anywhere and the API port from the namespace.
    let policy = Api::<NetworkPolicy>::namespaced(client.clone(), &namespace)
        .get("hub-shapeblock-hub")
        .await
        .unwrap()
        .spec
        .unwrap();
    let ingress = policy.ingress.unwrap_or_default();
    let ports: Vec<String> = ingress
        .iter()
        .flat_map(|rule| rule.ports.clone().unwrap_or_default())
        .filter_map(|p| p.port)
        .map(|p| match p {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s,
        })
        .collect();
    assert!(ports.iter().any(|p| p == "agents" || p == "7443"), "{ports:?}");
    assert!(ports.iter().any(|p| p == "api" || p == "7444"), "{ports:?}");

    // The Pods are made (Pod Security `restricted` admits them) with the Secret's URL by
    // reference.
    wait_pods(&client, &namespace, "shapeblock-hub", 3).await;
}
