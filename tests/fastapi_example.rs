//! The FastAPI example (`examples/fastapi/`) end to end: a real uvicorn server on the Python
//! client, a real hub process, a real agent on the test cluster whose build pods run on kwok
//! nodes with outcomes and logs this test scripts. The example's pytest suite applies an App
//! and an AppBuild through REST, follows the build on the events WebSocket to Completed and
//! its log on the logs WebSocket across a reconnect. Its transcript is printed.

mod support;

use std::path::Path;
use std::time::Duration;

use shapeblock_hub::api::v1 as api;
use shapeblock_testenv::{PodOutcome, PodSelector, logs, set_pod_outcome};
use support::agent::hub_env;
use support::hub_process::{HubProcess, agent_from_install_line_with, wait_phase_at_hub};
use support::unique_name;

#[tokio::test]
async fn the_fastapi_example_follows_a_build_to_completed_and_its_log_across_a_reconnect() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let example = root.join("examples/fastapi");
    let venv = tokio::process::Command::new(root.join("clients/python/tools/venv.sh"))
        .arg(example.join("requirements.txt"))
        .output()
        .await
        .unwrap();
    assert!(venv.status.success(), "{}", String::from_utf8_lossy(&venv.stderr));
    let venv = String::from_utf8(venv.stdout).unwrap().trim().to_string();

    let env = hub_env().await;
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let cluster = unique_name("fastapi");
    let token = client
        .create_enrollment_token(api::CreateEnrollmentTokenRequest {
            cluster_id: cluster.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let agent = agent_from_install_line_with(&env, &hub, &token, &["--registry=registry.example.com"]).await;
    let ns = unique_name("fastapi");
    client
        .apply(api::ApplyRequest {
            cluster_id: cluster.clone(),
            manifest: support::hub::project(&ns),
            idempotency_key: String::new(),
        })
        .await
        .unwrap();
    let key = format!("Project//{ns}");
    wait_phase_at_hub(&client, &cluster, &key, "Ready").await;
    // The build's pods: a resolved commit, a pushed digest, and 2,000 lines of build log.
    for (container, after, message) in [
        (
            "resolve",
            Duration::from_millis(300),
            "0123456789abcdef0123456789abcdef01234567".to_string(),
        ),
        (
            "build",
            Duration::from_secs(3),
            format!("sha256:{}", "ab".repeat(32)),
        ),
    ] {
        set_pod_outcome(
            &env.client,
            &PodSelector::container(&ns, container),
            &PodOutcome::Succeed {
                after,
                message: Some(message),
            },
        )
        .await
        .unwrap();
    }
    let lines: Vec<String> = (0..2000)
        .map(|i| format!("step {i} {}", "x".repeat(80)))
        .collect();
    let lines: Vec<&str> = lines.iter().map(String::as_str).collect();
    logs().script(&ns, "build", &lines);

    let transcript = hub.dir.path().join("transcript.txt");
    // Awaited, not waited for: this process serves the build pods' logs.
    let output = tokio::process::Command::new(Path::new(&venv).join("bin/python"))
        .args([
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-v",
            "-s",
            "test_example.py",
        ])
        .current_dir(&example)
        .env("PYTHONPATH", root.join("clients/python/src"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("SHAPEBLOCK_HUB_API", &hub.api_url)
        .env("SHAPEBLOCK_HUB_API_KEY", &hub.key)
        .env("SHAPEBLOCK_HUB_CA", hub.dir.path().join("ca.pem"))
        .env("SHAPEBLOCK_TEST_CLUSTER", &cluster)
        .env("SHAPEBLOCK_TEST_NAMESPACE", &ns)
        .env("SHAPEBLOCK_TRANSCRIPT", &transcript)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&output.stderr));
    eprintln!(
        "WebSocket transcript:\n{}",
        std::fs::read_to_string(&transcript).unwrap_or_default()
    );
    agent.terminate(Duration::from_secs(15)).expect("stops");
    assert!(output.status.success(), "pytest failed (hub log: {})", hub.log());
}
