//! The Python client's suite (`clients/python/`, pytest) against a real hub process and a real
//! agent on the test cluster: this test starts both, then runs pytest in the client's venv
//! (`clients/python/tools/venv.sh`, from PyPI, cached by the hash of its requirements) with
//! their addresses in the environment. Its output is pytest's.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use shapeblock_hub::api::v1 as api;
use support::agent::hub_env;
use support::hub_process::{HubProcess, agent_from_install_line};
use support::{eventually, unique_name};

#[tokio::test]
async fn the_python_clients_suite_passes_against_a_real_hub_and_agent() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python");
    let venv = Command::new(python.join("tools/venv.sh")).output().unwrap();
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
    let agent = agent_from_install_line(&env, &hub, &token).await;
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

    let output = Command::new(Path::new(&venv).join("bin/python"))
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-v"])
        .current_dir(&python)
        .env("SHAPEBLOCK_HUB_API", &hub.api_url)
        .env("SHAPEBLOCK_HUB_API_KEY", &hub.key)
        .env("SHAPEBLOCK_HUB_CA", hub.dir.path().join("ca.pem"))
        .env("SHAPEBLOCK_TEST_CLUSTER", &cluster)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    agent.terminate(Duration::from_secs(15)).expect("stops");
    assert!(output.status.success(), "pytest failed (hub log: {})", hub.log());
    assert!(stdout.contains(" passed"), "{stdout}");
}
