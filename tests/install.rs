//! The one-line install, proven: `shapeblock-hub token create` prints a line, the line runs as
//! printed (real `helm`, the chart from this checkout) against the real test apiserver, and
//! the agent binary then runs out of cluster exactly as the chart's Pod would (the
//! ServiceAccount the chart made, the environment its Deployment sets, the token from its
//! Secret): it enrolls, connects, and reconciles under the chart's RBAC alone. The test
//! control plane has no kubelet to run the Pod itself.
//!
//! Its own test binary, so its own cluster: nothing else installs RBAC objects there for Helm
//! to collide with.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use shapeblock_agent::api::Project;
use shapeblock_testenv::{self as testenv, agent::AgentProcess};
use support::{eventually, unique_name};

const NAMESPACE: &str = "shapeblock";
const TIMEOUT: Duration = Duration::from_secs(45);

/// The chart's container environment, resolved as the kubelet would: plain values, Secret
/// keys (optional ones may be missing), and the two downward-API fields it uses.
async fn pod_environment(
    client: &kube::Client,
    deployment: &Deployment,
    pod_name: &str,
) -> Vec<(String, String)> {
    let container = support::first_container(deployment);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let mut env = Vec::new();
    for var in container.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from) {
            (Some(value), _) => Some(value),
            (None, None) => Some(String::new()),
            (None, Some(from)) => {
                if let Some(field) = from.field_ref {
                    match field.field_path.as_str() {
                        "metadata.name" => Some(pod_name.to_string()),
                        "metadata.namespace" => Some(NAMESPACE.to_string()),
                        other => panic!("the chart uses field {other}, which this test cannot resolve"),
                    }
                } else if let Some(key) = from.secret_key_ref {
                    let secret = secrets.get_opt(&key.name).await.unwrap();
                    let value = secret
                        .and_then(|s| s.data)
                        .and_then(|d| d.get(&key.key).cloned())
                        .map(|b| String::from_utf8(b.0).unwrap());
                    assert!(
                        value.is_some() || key.optional == Some(true),
                        "{} missing",
                        key.name
                    );
                    value
                } else {
                    panic!("unexpected env source for {}", var.name)
                }
            }
        };
        if let Some(value) = value {
            env.push((var.name, value));
        }
    }
    env
}

/// Runs `command` against the test cluster with a Helm home of its own; panics with the
/// output unless it succeeds.
fn run_against(command: &mut Command, kubeconfig: &Path, helm_home: &Path) {
    let output = command
        .env("KUBECONFIG", kubeconfig)
        .env("HELM_CACHE_HOME", helm_home.join("cache"))
        .env("HELM_CONFIG_HOME", helm_home.join("config"))
        .env("HELM_DATA_HOME", helm_home.join("data"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{command:?}:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_printed_install_line_installs_an_agent_that_enrolls_and_connects() {
    let plane = testenv::shared().unwrap_or_else(|e| panic!("{e}"));
    let client = plane.client().await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let hub = support::hub::start(data.path()).await;
    let cluster = unique_name("install");
    let chart = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/shapeblock-agent");

    // The hub's CLI prints the line, through the running hub's API.
    let api = support::hub::api_args(&hub, data.path()).await;
    let printed = support::hub::cli_async(api.iter().map(|a| a.as_os_str()).chain([
        "token".as_ref(),
        "create".as_ref(),
        "--cluster".as_ref(),
        cluster.as_ref(),
        "--hub-address".as_ref(),
        hub.url().as_ref(),
        "--chart".as_ref(),
        chart.as_os_str(),
    ]))
    .await;
    let line = printed.trim_end();
    assert_eq!(line.lines().count(), 1, "one line: {printed}");
    assert!(line.starts_with("helm install shapeblock-agent "), "{line}");
    let shown: Vec<&str> = line
        .split(' ')
        .map(|w| {
            if w.starts_with("enrollment.token=") {
                "enrollment.token=<redacted>"
            } else {
                w
            }
        })
        .collect();
    eprintln!("install line: {}", shown.join(" "));

    // Exactly that line, by a shell, with the real helm first on PATH and the test cluster as
    // the kubeconfig (as an operator's shell would have them).
    let helm_dir = testenv::default_bin_dir();
    let path = format!(
        "{}:{}",
        helm_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let started = std::time::Instant::now();
    run_against(
        Command::new("sh").args(["-c", line]).env("PATH", path),
        &plane.kubeconfig,
        data.path(),
    );
    eprintln!("helm install took {:?}", started.elapsed());

    // The registry pull secret the chart's default values name, as the operator provides it.
    let pull: Secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some("registry-credentials".into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/dockerconfigjson".into()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_string(),
            ByteString(br#"{"auths":{}}"#.to_vec()),
        )])),
        ..Default::default()
    };
    Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .create(&PostParams::default(), &pull)
        .await
        .unwrap();

    // The agent as the chart's Pod: its ServiceAccount's token, its Deployment's environment.
    let deployment = Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
        .get("shapeblock-agent")
        .await
        .unwrap();
    let pod_name = "shapeblock-agent-install-test";
    let env = pod_environment(&client, &deployment, pod_name).await;
    let names: Vec<&str> = env.iter().map(|(n, _)| n.as_str()).collect();
    for needed in [
        "SHAPEBLOCK_HUB_ADDRESS",
        "SHAPEBLOCK_CA_HASH",
        "SHAPEBLOCK_ENROLL_TOKEN",
    ] {
        assert!(
            names.contains(&needed),
            "{needed} not set by the chart: {names:?}"
        );
    }
    let kubeconfig = testenv::agent::service_account_kubeconfig(
        &client,
        &plane.kubeconfig,
        NAMESPACE,
        "shapeblock-agent",
        &plane.work_dir,
    )
    .await
    .unwrap();
    // A CRD lost since the install (deleted by hand, say): the agent's start-up apply brings
    // it back, under the chart's RBAC.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete("teams.apps.shapeblock.io", &Default::default())
        .await
        .unwrap();
    eventually(TIMEOUT, "the Team CRD is gone", || async {
        crds.get_opt("teams.apps.shapeblock.io")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    let log = plane
        .work_dir
        .join(format!("{}.log", unique_name("installed-agent")));
    let started = std::time::Instant::now();
    // Only the listening address differs from the Pod (the chart's port may be taken here).
    let agent = AgentProcess::start_with_env(
        Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
        &kubeconfig,
        NAMESPACE,
        &log,
        &[],
        &env,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    eventually(TIMEOUT, "the hub reports the cluster connected", || async {
        hub.store().cluster(&cluster).await.ok()??.connected.then_some(())
    })
    .await;
    eprintln!("agent started, enrolled and connected in {:?}", started.elapsed());
    for name in shapeblock_agent::rbac::SHAPEBLOCK_CRDS {
        let crd = crds.get(name).await.unwrap_or_else(|e| panic!("{name}: {e}"));
        let managers: Vec<String> = crd
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter_map(|f| f.manager)
            .collect();
        assert!(
            managers.iter().any(|m| m == "shapeblock-agent"),
            "{name} applied by the agent at start-up: {managers:?}"
        );
    }
    let identity = Api::<Secret>::namespaced(client.clone(), NAMESPACE)
        .get("shapeblock-agent-identity")
        .await
        .expect("the agent keeps its identity in its namespace");
    assert!(identity.data.unwrap_or_default().contains_key("tls.crt"));
    let lease = Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(client.clone(), NAMESPACE)
        .get("shapeblock-agent")
        .await
        .expect("the chart turns leader election on");
    assert_eq!(lease.spec.unwrap().holder_identity.as_deref(), Some(pod_name));

    // It works under the chart's RBAC alone: a Project sent through the hub becomes Ready.
    let project = unique_name("installed");
    hub.apply(&cluster, &support::hub::project(&project))
        .await
        .unwrap();
    eventually(TIMEOUT, "the hub sees the Project Ready", || async {
        support::hub::project_ready(&hub, &cluster, &project).await
    })
    .await;

    // Uninstall as the chart's README says: the agent goes, the CRDs stay, and with them the
    // Project and its namespace.
    eprintln!(
        "the installed agent's peak RSS: {} MiB",
        agent.peak_rss_kib().div_ceil(1024)
    );
    agent
        .terminate(Duration::from_secs(15))
        .expect("the agent stops on SIGTERM");
    run_against(
        Command::new(helm_dir.join("helm")).args(["uninstall", "shapeblock-agent", "-n", NAMESPACE]),
        &plane.kubeconfig,
        data.path(),
    );
    for name in shapeblock_agent::rbac::SHAPEBLOCK_CRDS {
        let crd = crds
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("{name} kept: {e}"));
        assert!(
            crd.metadata.deletion_timestamp.is_none(),
            "{name} is being deleted"
        );
    }
    assert!(
        Api::<Project>::all(client.clone())
            .get_opt(&project)
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        Api::<Deployment>::namespaced(client.clone(), NAMESPACE)
            .get_opt("shapeblock-agent")
            .await
            .unwrap()
            .is_none(),
        "the agent's Deployment is gone"
    );
    hub.stop().await;
}

#[tokio::test]
async fn dev_certs_make_a_ca_that_the_hub_then_serves_with() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs-dev");
    let dev_certs = || {
        let text = support::hub::cli(["dev-certs".as_ref(), "--out".as_ref(), out.as_os_str()]);
        assert!(
            text.contains("shapeblock-hub --data-dir"),
            "says how to start the hub: {text}"
        );
        text.lines()
            .find_map(|l| l.strip_prefix("CA hash: "))
            .expect("prints the CA hash")
            .to_string()
    };
    let printed = dev_certs();
    assert_eq!(dev_certs(), printed, "a second run keeps the CA");
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(out.join("ca-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o077, 0, "the CA key is private");
    assert!(
        std::fs::read_to_string(out.join("server.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );

    // The hub started on that directory serves with that CA: an agent pinned to the printed
    // hash enrolls.
    let hub = support::hub::start(&out).await;
    assert_eq!(hub.ca_hash(), printed);
    let token = hub.create_token("dev", Duration::from_secs(60)).await.unwrap();
    let key = shapeblock_agent::tunnel::enroll::new_key().unwrap();
    let url = hub.url().replace("127.0.0.1", "localhost");
    let identity = shapeblock_agent::tunnel::enroll::enroll(&url, &token, &printed, &key)
        .await
        .expect("enrolls against localhost with the dev CA");
    assert_eq!(identity.cluster_id, "dev");
    hub.stop().await;
}
