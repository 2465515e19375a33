//! The local demo on top of a running control plane: the agent under its own ServiceAccount,
//! the sample manifests, and what became of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};

use crate::agent::{AgentProcess, install_agent_identity};
use shapeblock_api::{App, AppBuild, AppRun, BackingService, Project, Team};

/// Sample manifests the demo applies (those whose controllers exist today).
const SAMPLES: &[&str] = &[
    "examples/01-project.yaml",
    "examples/02-apps.yaml",
    "examples/04-backingservice.yaml",
    "examples/05-team.yaml",
    "examples/06-prebuilt-build.yaml",
    "examples/07-apprun.yaml",
];
pub const AGENT_NAMESPACE: &str = "shapeblock";

/// Installs the agent's identity and RBAC, a registry pull secret, and starts the agent binary
/// that sits beside this one.
pub async fn start_agent(
    client: &Client,
    admin_kubeconfig: &Path,
    work_dir: &Path,
    hub: &DemoHub,
) -> Result<AgentProcess, Box<dyn std::error::Error>> {
    let kubeconfig = install_agent_identity(client, admin_kubeconfig, AGENT_NAMESPACE, work_dir).await?;
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "registry-credentials"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": "{\"auths\":{\"registry.shapeblock.io\":{\"auth\":\"ZGVtbzpkZW1v\"}}}"}
    }))?;
    Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client.clone(), AGENT_NAMESPACE)
        .patch(
            "registry-credentials",
            &PatchParams::apply("shapeblock-dev").force(),
            &Patch::Apply(&secret),
        )
        .await?;
    // The simulated cluster has no storage provisioner: the sample database's claim gets a
    // hostPath volume made for it, as a provisioner would.
    let volume: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "demo-main-db"},
        "spec": {
            "capacity": {"storage": "5Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete",
            "hostPath": {"path": "/tmp/shapeblock-demo/main-db"},
            "claimRef": {"namespace": "my-project", "name": "data-main-db-postgresql-0"},
        }
    }))?;
    Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(client.clone())
        .patch(
            "demo-main-db",
            &PatchParams::apply("shapeblock-dev").force(),
            &Patch::Apply(&volume),
        )
        .await?;
    // SSH clones check host keys against this ConfigMap. Nothing is cloned in the demo, so
    // the key is a stand-in generated here, said to be one, not GitHub's real key.
    let demo_host_key = shapeblock_agent::controllers::app::generate_deploy_key("demo stand-in")?.public;
    let known_hosts: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "shapeblock-known-hosts"},
        "data": {"known_hosts": format!("# local demo: a generated stand-in, not github.com's real host key\ngithub.com {demo_host_key}\n")}
    }))?;
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), AGENT_NAMESPACE)
        .patch(
            "shapeblock-known-hosts",
            &PatchParams::apply("shapeblock-dev").force(),
            &Patch::Apply(&known_hosts),
        )
        .await?;
    let binary = agent_binary()?;
    let log = work_dir.join("agent.log");
    let token = hub.hub.create_token(CLUSTER, Duration::from_secs(600)).await?;
    let args = [
        format!("--hub-address={}", hub.hub.url()),
        format!("--enroll-token={token}"),
        format!("--ca-hash={}", hub.hub.ca_hash()),
        "--heartbeat-seconds=5".to_string(),
        // The examples' Apps push to registry.shapeblock.io, each build with its own token.
        "--registry=registry.shapeblock.io".to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = AgentProcess::start(&binary, &kubeconfig, AGENT_NAMESPACE, &log, &args).await?;
    println!(
        "agent running as ServiceAccount {AGENT_NAMESPACE}/shapeblock-agent, enrolled with a one-time token (log: {})",
        log.display()
    );
    Ok(agent)
}

/// The cluster's name at the demo hub.
pub const CLUSTER: &str = "local-demo";

/// The reference hub, in this process, with its store in the work directory.
pub struct DemoHub {
    pub hub: shapeblock_hub::Hub,
    pub data_dir: PathBuf,
    /// `https://127.0.0.1:PORT`: the hub's API.
    pub api_url: String,
    /// A file holding an API key for it (mode 0600).
    pub api_key_file: PathBuf,
}

impl DemoHub {
    /// The flags that point the hub's CLI at this hub's API.
    pub fn cli_flags(&self) -> String {
        format!(
            "--hub {} --api-key $(cat {}) --ca {}",
            self.api_url,
            self.api_key_file.display(),
            self.data_dir.join("ca.pem").display()
        )
    }
}

pub async fn start_hub(work_dir: &Path) -> Result<DemoHub, Box<dyn std::error::Error>> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let data_dir = work_dir.join("hub");
    let mut config = shapeblock_hub::HubConfig::new(data_dir.clone());
    config.heartbeat = Duration::from_secs(5);
    config.api_listen = Some(([127, 0, 0, 1], 0).into());
    let hub = shapeblock_hub::Hub::start(config).await?;
    let api = hub.api_address().ok_or("the hub's API is not served")?;
    let (_, key) = shapeblock_hub::api::create_api_key(hub.store(), "demo").await?;
    let api_key_file = data_dir.join("api-key");
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&api_key_file)?;
        writeln!(file, "{key}")?;
    }
    println!(
        "hub listening on {} (CA {}, store {}), its API on https://{api} (key in {})",
        hub.url(),
        hub.ca_hash(),
        data_dir.display(),
        api_key_file.display()
    );
    Ok(DemoHub {
        hub,
        data_dir,
        api_url: format!("https://{api}"),
        api_key_file,
    })
}

/// The sample manifests, in order, as the hub sends them.
fn sample_manifests(root: &Path) -> Result<Vec<(String, String)>, Box<dyn std::error::Error>> {
    let mut manifests = Vec::new();
    for sample in SAMPLES {
        let path = root.join(sample);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(document)?;
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_string();
            manifests.push((kind, serde_yaml::to_string(&value)?));
        }
    }
    Ok(manifests)
}

/// Sends the samples through the hub (Projects first: the agent applies a namespaced
/// object only once its Project's namespace exists) and shows what comes back, live, until
/// the sample build ends (or `limit`).
pub async fn send_samples_and_follow(
    hub: &DemoHub,
    root: &Path,
    limit: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let started = std::time::Instant::now();
    let manifests = sample_manifests(root)?;
    // Simulated nodes execute nothing: this is what the sample run's command prints on them.
    crate::logs().script("my-project", "run", DEMO_RUN_OUTPUT);
    let (projects, rest): (Vec<_>, Vec<_>) = manifests.into_iter().partition(|(kind, _)| kind == "Project");
    println!();
    println!("sending the samples through the hub; what the agent reports back:");
    println!("  {:>6}  {:<44} WHAT", "TIME", "OBJECT");
    let mut shown = 0;
    for (_, manifest) in &projects {
        hub.hub.apply(CLUSTER, manifest).await?;
    }
    let projects_ready = async |hub: &DemoHub| -> bool {
        let objects = hub.hub.store().objects(CLUSTER).await.unwrap_or_default();
        projects.iter().all(|(_, m)| {
            let name = serde_yaml::from_str::<serde_json::Value>(m)
                .ok()
                .and_then(|v| v["metadata"]["name"].as_str().map(String::from))
                .unwrap_or_default();
            objects
                .iter()
                .any(|o| o.key == format!("Project//{name}") && o.phase == "Ready")
        })
    };
    let mut rest_sent = false;
    while started.elapsed() < limit {
        shown = print_new_events(hub, started, shown).await?;
        if !rest_sent && projects_ready(hub).await {
            for (_, manifest) in &rest {
                hub.hub.apply(CLUSTER, manifest).await?;
            }
            rest_sent = true;
        }
        let objects = hub.hub.store().objects(CLUSTER).await?;
        let phase_of = |key: &str| objects.iter().find(|o| o.key == key).map(|o| o.phase.clone());
        let build_done = phase_of(&format!("AppBuild/my-project/{DEMO_BUILD}"))
            .is_some_and(|p| matches!(p.as_str(), "Completed" | "Failed" | "Cancelled"));
        let database_done = phase_of("BackingService/my-project/main-db")
            .is_some_and(|p| matches!(p.as_str(), "Ready" | "Failed"));
        let run_done = phase_of(&format!("AppRun/my-project/{DEMO_RUN}"))
            .is_some_and(|p| matches!(p.as_str(), "Succeeded" | "Failed"));
        let stream = format!("my-project/runs/{DEMO_RUN}/run");
        let (output, _, output_done) = hub.hub.store().log(CLUSTER, &stream).await?;
        if build_done && database_done && run_done && output_done {
            print_new_events(hub, started, shown).await?;
            println!();
            println!(
                "output of AppRun {DEMO_RUN}, as the hub received it (shapeblock-hub logs --stream {stream}):"
            );
            for line in String::from_utf8_lossy(&output).lines() {
                println!("  | {line}");
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("  still running after {limit:?}: kubectl describe appbuild -n my-project {DEMO_BUILD}");
    Ok(())
}

/// The sample build the demo follows.
pub const DEMO_BUILD: &str = "prebuilt-app-1";
/// The sample one-off run, and what it prints.
pub const DEMO_RUN: &str = "prebuilt-app-check";
const DEMO_RUN_OUTPUT: &[&str] = &[
    "checking prebuilt-app (release config: LOG_LEVEL=info)",
    "database main-db: reachable",
    "all checks passed",
];

async fn print_new_events(
    hub: &DemoHub,
    started: std::time::Instant,
    shown: usize,
) -> Result<usize, Box<dyn std::error::Error>> {
    let events = hub.hub.store().events(CLUSTER).await?;
    let objects = hub.hub.store().objects(CLUSTER).await?;
    for (_, kind, object, detail) in events.iter().skip(shown) {
        let at = started.elapsed().as_secs_f64();
        match kind.as_str() {
            // An object seen before its controller wrote a status: nothing to say yet.
            "phase" if detail.is_empty() => {}
            "phase" => {
                let message = objects
                    .iter()
                    .find(|o| &o.key == object)
                    .map(|o| o.message.clone())
                    .unwrap_or_default();
                let what = if message.is_empty() {
                    detail.clone()
                } else {
                    format!("{detail}: {message}")
                };
                println!(
                    "  {at:>5.1}s  {:<44} {}",
                    object.replace("//", " ").replace('/', " "),
                    clip(&what)
                );
            }
            "result" if detail.contains(" failed:") => {
                println!("  {at:>5.1}s  {:<44} {}", "(command)", clip(detail));
            }
            "snapshot" => println!(
                "  {at:>5.1}s  {:<44} {}",
                "(agent connected: status of everything)",
                clip(detail)
            ),
            _ => {}
        }
    }
    Ok(events.len())
}

fn clip(text: &str) -> String {
    const WIDTH: usize = 90;
    if text.chars().count() <= WIDTH {
        text.to_string()
    } else {
        format!("{}…", text.chars().take(WIDTH - 1).collect::<String>())
    }
}

fn agent_binary() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let binary = std::env::current_exe()?.with_file_name("shapeblock-agent");
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build --bin shapeblock-agent`",
            binary.display()
        )
        .into())
    }
}

use serde::Deserialize;

/// Prints what the agent made of the samples, as `kubectl get` would.
pub async fn print_status(client: &Client) -> Result<(), Box<dyn std::error::Error>> {
    println!();
    println!("{:<10} {:<20} {:<10} MESSAGE", "KIND", "NAME", "PHASE");
    for project in Api::<Project>::all(client.clone())
        .list(&Default::default())
        .await?
    {
        let status = project.status.clone().unwrap_or_default();
        row(
            "Project",
            &project.name_any(),
            status.phase.map(|p| format!("{p:?}")),
            status.message,
        );
    }
    for app in Api::<App>::all(client.clone()).list(&Default::default()).await? {
        let status = app.status.clone().unwrap_or_default();
        row(
            "App",
            &app.name_any(),
            status.phase.map(|p| format!("{p:?}")),
            status.message,
        );
    }
    for service in Api::<BackingService>::all(client.clone())
        .list(&Default::default())
        .await?
    {
        let status = service.status.clone().unwrap_or_default();
        row(
            "Service",
            &service.name_any(),
            status.phase.map(|p| format!("{p:?}")),
            status.message,
        );
    }
    for build in Api::<AppBuild>::all(client.clone())
        .list(&Default::default())
        .await?
    {
        let status = build.status.clone().unwrap_or_default();
        row(
            "AppBuild",
            &build.name_any(),
            status.phase.map(|p| format!("{p:?}")),
            status.message,
        );
    }
    for run in Api::<AppRun>::all(client.clone())
        .list(&Default::default())
        .await?
    {
        let status = run.status.clone().unwrap_or_default();
        row(
            "AppRun",
            &run.name_any(),
            status.phase.map(|p| format!("{p:?}")),
            status.message,
        );
    }
    for team in Api::<Team>::all(client.clone()).list(&Default::default()).await? {
        let status = team.status.clone().unwrap_or_default();
        row(
            "Team",
            &team.name_any(),
            status.phase.map(|p| format!("{p:?}")),
            status.message,
        );
    }
    Ok(())
}

fn row(kind: &str, name: &str, phase: Option<String>, message: Option<String>) {
    println!(
        "{kind:<10} {name:<20} {:<10} {}",
        phase.unwrap_or_else(|| "-".into()),
        message.unwrap_or_default()
    );
}
