//! The reference hub for tests: started on loopback with a short heartbeat, and what its store
//! says about the objects of a cluster.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use shapeblock_hub::{Hub, HubConfig};

/// A hub with its data in `dir`, on a free loopback port, heartbeat 2 s, its API on another.
pub async fn start(dir: &Path) -> Hub {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = HubConfig::new(dir.to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    config.api_listen = Some(([127, 0, 0, 1], 0).into());
    config.database_url = database_for_tests(dir);
    Hub::start(config).await.expect("start the hub")
}

/// The Postgres database of the test hub with data directory `dir` when
/// `SHAPEBLOCK_TEST_HUB_STORE=postgres` (a new one for a new directory, the same one when a
/// hub restarts on it), else `None` (SQLite in the data directory).
pub fn database_for_tests(dir: &Path) -> Option<String> {
    static DATABASES: std::sync::Mutex<Vec<(std::path::PathBuf, String)>> = std::sync::Mutex::new(Vec::new());
    let mut databases = DATABASES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, url)) = databases.iter().find(|(d, _)| d == dir) {
        return Some(url.clone());
    }
    let url = shapeblock_testenv::postgres::hub_database_for_tests("hub_test")
        .expect("a database for the test hub")?;
    databases.push((dir.to_path_buf(), url.clone()));
    Some(url)
}

/// What the CLI needs to call `hub`'s API (data in `dir`): `--hub`, a new `--api-key`, `--ca`.
pub async fn api_args(hub: &Hub, dir: &Path) -> Vec<std::ffi::OsString> {
    let (_, key) = shapeblock_hub::api::create_api_key(hub.store(), "test")
        .await
        .expect("an API key");
    let api = hub.api_address().expect("the hub serves its API");
    vec![
        "--hub".into(),
        format!("https://{api}").into(),
        "--api-key".into(),
        key.into(),
        "--ca".into(),
        dir.join("ca.pem").into(),
    ]
}

/// A Project manifest as the hub sends it.
pub fn project(name: &str) -> String {
    format!("apiVersion: apps.shapeblock.io/v1alpha1\nkind: Project\nmetadata:\n  name: {name}\nspec: {{}}\n")
}

/// `Some` once the hub's store has Project `name` in phase Ready.
pub async fn project_ready(hub: &Hub, cluster: &str, name: &str) -> Option<()> {
    let key = format!("Project//{name}");
    let objects = hub.store().objects(cluster).await.ok()?;
    objects
        .iter()
        .any(|o| o.key == key && o.phase == "Ready")
        .then_some(())
}

/// How often the hub recorded Project `name` becoming Ready: as a phase change or in a
/// snapshot after a reconnect. Once is right, however often the agent reconnected.
pub fn times_recorded_ready(events: &[(u64, String, String, String)], name: &str) -> usize {
    events
        .iter()
        .filter(|e| {
            (e.1 == "phase" && e.2 == format!("Project//{name}") && e.3 == "Ready")
                || (e.1 == "snapshot" && e.3.contains(&format!("Project//{name}=Ready")))
        })
        .count()
}

/// Runs the `shapeblock-hub` binary with `args`; its standard output (panics unless it
/// succeeds).
pub fn cli<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// [`cli`] awaited on the runtime, for a hub that serves on this runtime (waiting for the
/// process there would stop the hub from answering it).
pub async fn cli_async<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
        .args(args)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The result of command `seq` (ok, message) once the agent has answered it.
pub async fn result_of(hub: &Hub, cluster: &str, seq: u64) -> Option<(bool, String)> {
    let row = hub
        .store()
        .commands(cluster)
        .await
        .ok()?
        .into_iter()
        .find(|c| c.seq == seq)?;
    row.done
        .then(|| (row.ok.unwrap_or(false), row.message.unwrap_or_default()))
}
