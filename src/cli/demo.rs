//! The local demo on top of a running control plane: the agent under its own ServiceAccount,
//! the sample manifests, and what became of them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;
use kube::{Client, ResourceExt};

use crate::api::{App, AppBuild, AppBuildPhase, Project, Team};
use crate::testenv::agent::{AgentProcess, install_agent_identity};

/// Sample manifests the demo applies (those whose controllers exist today).
const SAMPLES: &[&str] = &[
    "examples/01-project.yaml",
    "examples/02-apps.yaml",
    "examples/05-team.yaml",
    "examples/06-prebuilt-build.yaml",
];
pub const AGENT_NAMESPACE: &str = "shapeblock";

/// Installs the agent's identity and RBAC, a registry pull secret, and starts the agent binary
/// that sits beside this one.
pub async fn start_agent(
    client: &Client,
    admin_kubeconfig: &Path,
    work_dir: &Path,
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
    // SSH clones check host keys against this ConfigMap. Nothing is cloned in the demo, so
    // the key is a stand-in generated here, said to be one, not GitHub's real key.
    let demo_host_key = crate::controllers::app::generate_deploy_key("demo stand-in")?.public;
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
    let agent = AgentProcess::start(&binary, &kubeconfig, AGENT_NAMESPACE, &log, &[]).await?;
    println!(
        "agent running as ServiceAccount {AGENT_NAMESPACE}/shapeblock-agent (log: {})",
        log.display()
    );
    Ok(agent)
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

/// Server-side applies the sample manifests (paths relative to `root`), in order.
pub async fn apply_samples(client: &Client, root: &Path) -> Result<(), Box<dyn std::error::Error>> {
    for sample in SAMPLES {
        let path = root.join(sample);
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_json::Value::deserialize(document)?;
            if value.is_null() {
                continue;
            }
            let object: DynamicObject = serde_json::from_value(value)?;
            let types = object.types.clone().ok_or("manifest without apiVersion/kind")?;
            let gvk = GroupVersionKind::try_from(&types)?;
            let (resource, caps) = kube::discovery::pinned_kind(client, &gvk).await?;
            let api: Api<DynamicObject> = match (caps.scope, object.namespace()) {
                (Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), &ns, &resource),
                _ => Api::all_with(client.clone(), &resource),
            };
            // Namespaced samples live in the Project's namespace, which the agent creates.
            let name = object.name_any();
            let apply = PatchParams::apply("shapeblock-dev").force();
            let mut attempts = 0;
            loop {
                match api.patch(&name, &apply, &Patch::Apply(&object)).await {
                    Ok(_) => break,
                    Err(kube::Error::Api(s)) if s.code == 404 && attempts < 100 => {
                        attempts += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(format!("{}: {name}: {e}", path.display()).into()),
                }
            }
            println!("applied {} {name}", gvk.kind);
        }
    }
    Ok(())
}

use serde::Deserialize;

/// Follows an AppBuild through its phases, printing each change, until it ends (or `limit`).
pub async fn follow_build(
    client: &Client,
    namespace: &str,
    name: &str,
    limit: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    let builds = Api::<AppBuild>::namespaced(client.clone(), namespace);
    let started = std::time::Instant::now();
    let mut last = None;
    println!();
    println!("AppBuild {namespace}/{name}:");
    while started.elapsed() < limit {
        let status = builds.get(name).await?.status.unwrap_or_default();
        let now = (status.phase, status.message.clone());
        if last.as_ref() != Some(&now) {
            let phase = status
                .phase
                .map(|p| format!("{p:?}"))
                .unwrap_or_else(|| "-".into());
            println!(
                "  {:>5.1}s  {phase:<10} {}",
                started.elapsed().as_secs_f64(),
                status.message.unwrap_or_default()
            );
            last = Some(now);
        }
        if status.phase.is_some_and(AppBuildPhase::is_final) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    println!("  still running after {limit:?}: kubectl describe appbuild -n {namespace} {name}");
    Ok(())
}

/// Prints what the agent made of the samples, as `kubectl get` would.
pub async fn print_status(client: &Client) -> Result<(), Box<dyn std::error::Error>> {
    println!();
    println!("{:<10} {:<16} {:<10} MESSAGE", "KIND", "NAME", "PHASE");
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
        "{kind:<10} {name:<16} {:<10} {}",
        phase.unwrap_or_else(|| "-".into()),
        message.unwrap_or_default()
    );
}
