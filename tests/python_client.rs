//! The Python client's suite (`clients/python/`, pytest) against a real hub process and a real
//! agent on the test cluster: this test starts both, then runs pytest in the client's venv
//! (`clients/python/tools/venv.sh`, from PyPI, cached by the hash of its requirements) with
//! their addresses in the environment, and a build running whose log the suite follows (its
//! pods on kwok nodes with outcomes and log lines this test scripts). Its output is pytest's.

mod support;

use std::path::Path;
use std::time::Duration;

use shapeblock_hub::api::v1 as api;
use shapeblock_testenv::{PodOutcome, PodSelector, logs, set_pod_outcome};
use support::agent::hub_env;
use support::hub_process::{HubProcess, agent_from_install_line_with, wait_phase_at_hub};
use support::{eventually, unique_name};

/// The scripted build log's lines (`line 0`, `line 1`, ...): about 380 KiB.
const BUILD_LOG_LINES: usize = 40_000;

fn manifest(kind: &str, namespace: &str, name: &str, spec: serde_json::Value) -> String {
    serde_json::json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
    .to_string()
}

#[tokio::test]
async fn the_python_clients_suite_passes_against_a_real_hub_and_agent() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python");
    let venv = std::process::Command::new(python.join("tools/venv.sh"))
        .output()
        .unwrap();
    assert!(venv.status.success(), "{}", String::from_utf8_lossy(&venv.stderr));
    let venv = String::from_utf8(venv.stdout).unwrap().trim().to_string();

    let env = hub_env().await;
    // Small watcher bounds, so the suite sees the hub cut a slow watcher and the client resume.
    let hub = HubProcess::start(&["--watch-buffer", "8", "--watch-stall-ms", "500"]).await;
    let mut client = hub.client().await;
    let cluster = unique_name("py");
    let token = client
        .create_enrollment_token(api::CreateEnrollmentTokenRequest {
            cluster_id: cluster.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let agent = agent_from_install_line_with(&env, &hub, &token, &["--registry=registry.example.com"]).await;
    eventually(Duration::from_secs(45), "the agent connected", || {
        let mut client = client.clone();
        let cluster = cluster.clone();
        async move {
            let c = client
                .get_cluster(api::GetClusterRequest { cluster_id: cluster })
                .await
                .ok()?
                .into_inner();
            (c.connected && c.inventory.is_some()).then_some(())
        }
    })
    .await;

    // A build whose log the suite follows: its pods' outcomes and 500 lines of log scripted.
    let ns = unique_name("py");
    let apply = |manifest: String| {
        let mut client = client.clone();
        let cluster = cluster.clone();
        async move {
            client
                .apply(api::ApplyRequest {
                    cluster_id: cluster,
                    manifest,
                    idempotency_key: String::new(),
                })
                .await
                .unwrap();
        }
    };
    apply(support::hub::project(&ns)).await;
    wait_phase_at_hub(&client, &cluster, &format!("Project//{ns}"), "Ready").await;
    for (container, message) in [
        ("resolve", "0123456789abcdef0123456789abcdef01234567".to_string()),
        ("build", format!("sha256:{}", "ab".repeat(32))),
    ] {
        set_pod_outcome(
            &env.client,
            &PodSelector::container(&ns, container),
            &PodOutcome::Succeed {
                after: Duration::from_secs(2),
                message: Some(message),
            },
        )
        .await
        .unwrap();
    }
    // Several of the hub's 64 KiB follow messages, so that a follow can break in the middle.
    let lines: Vec<String> = (0..BUILD_LOG_LINES).map(|i| format!("line {i}")).collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    logs().script(&ns, "build", &lines);
    // The App's web pod, once the build deployed it: what the suite follows live.
    logs().script(
        &ns,
        "web",
        &["web booting", "password=hunter2hunter2", "web ready"],
    );
    let spec = serde_json::json!({
        "registry": {"url": "registry.example.com"},
        "build": {"type": "dockerfile"},
        "git": {"url": "https://github.com/example/api.git"},
    });
    apply(manifest("App", &ns, "api", spec)).await;
    apply(manifest(
        "AppBuild",
        &ns,
        "api-1",
        serde_json::json!({"appName": "api"}),
    ))
    .await;

    // Awaited, not waited for: this process serves the build pods' logs.
    let output = tokio::process::Command::new(Path::new(&venv).join("bin/python"))
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-v"])
        .current_dir(&python)
        .env("SHAPEBLOCK_HUB_API", &hub.api_url)
        .env("SHAPEBLOCK_HUB_API_KEY", &hub.key)
        .env("SHAPEBLOCK_HUB_CA", hub.dir.path().join("ca.pem"))
        .env("SHAPEBLOCK_TEST_CLUSTER", &cluster)
        .env("SHAPEBLOCK_TEST_BUILD_LOG", format!("{ns}/api-1/build"))
        .env("SHAPEBLOCK_TEST_BUILD_LOG_LINES", BUILD_LOG_LINES.to_string())
        .env("SHAPEBLOCK_TEST_APP", format!("{ns}/api"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    agent.terminate(Duration::from_secs(15)).expect("stops");
    assert!(output.status.success(), "pytest failed (hub log: {})", hub.log());
    assert!(stdout.contains(" passed"), "{stdout}");
}
