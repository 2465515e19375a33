//! `shapeblock-dev`: developer commands around a local control plane.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::{ControlPlane, Options};

/// Local development helpers for the ShapeBlock agent: a real Kubernetes control plane on
/// loopback (etcd, kube-apiserver, kube-controller-manager built by
/// `tools/build-control-plane.sh`) with the ShapeBlock CRDs installed, simulated kwok nodes
/// (kube-scheduler, pod logs), the k3s helm-controller and helm.
#[derive(Parser, Debug)]
#[command(name = "shapeblock-dev", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start the local control plane, install the CRDs, print how to reach it, and keep it
    /// running until Ctrl-C (or SIGTERM), then stop everything and remove its files.
    Up {
        /// Directory with etcd, kube-apiserver, kube-controller-manager, kube-scheduler, kwok,
        /// helm-controller and helm.
        #[arg(long, env = "SHAPEBLOCK_BIN_DIR", value_name = "DIR")]
        bin_dir: Option<std::path::PathBuf>,
        /// Also write the admin kubeconfig here (stable path for scripts and other shells).
        #[arg(long, value_name = "FILE")]
        kubeconfig_out: Option<std::path::PathBuf>,
        /// Only the control plane: no agent, no samples.
        #[arg(long)]
        no_agent: bool,
        /// Stop after this many seconds instead of waiting for a signal (for scripted runs).
        #[arg(long, value_name = "SECONDS")]
        exit_after: Option<u64>,
        /// How many simulated (kwok) nodes to run; 0 for a bare control plane (pods stay
        /// Pending, no helm-controller).
        #[arg(long, default_value_t = 2, value_name = "COUNT")]
        nodes: usize,
    },
}

impl Cli {
    pub fn run(self) -> ExitCode {
        // Current-thread: the control plane's children are tied to the thread that forks them.
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("error: cannot start the async runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        let outcome = match self.command {
            Command::Up {
                bin_dir,
                kubeconfig_out,
                no_agent,
                exit_after,
                nodes,
            } => runtime.block_on(up(bin_dir, kubeconfig_out, no_agent, exit_after, nodes)),
        };
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }
}

async fn up(
    bin_dir: Option<std::path::PathBuf>,
    kubeconfig_out: Option<std::path::PathBuf>,
    no_agent: bool,
    exit_after: Option<u64>,
    nodes: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut options = Options::default();
    if let Some(dir) = bin_dir {
        options.bin_dir = dir;
    }
    options.nodes = nodes;
    options.helm_controller = nodes > 0;
    let peers = if nodes > 0 {
        format!(", kube-scheduler, kwok ({nodes} nodes), helm-controller")
    } else {
        String::new()
    };
    eprintln!(
        "starting etcd, kube-apiserver, kube-controller-manager{peers} from {} ...",
        options.bin_dir.display()
    );
    let started = std::time::Instant::now();
    let bin_dir = options.bin_dir.clone();
    let plane = ControlPlane::start(options).await?;
    let mut kubeconfig = plane.kubeconfig().to_owned();
    if let Some(out) = kubeconfig_out {
        std::fs::copy(&kubeconfig, &out)?;
        kubeconfig = out;
    }
    let client = plane.client().await?;
    let version = client.apiserver_version().await?;
    println!(
        "control plane ready in {:.1}s: Kubernetes {} at {}",
        started.elapsed().as_secs_f64(),
        version.git_version,
        plane.server()
    );
    println!("component logs: {}", plane.work_dir().display());
    println!();
    println!("  export KUBECONFIG={}", kubeconfig.display());
    if bin_dir.join("kubectl").is_file() {
        // A kubectl of the same release as the apiserver, built with it.
        println!("  export PATH={}:$PATH", bin_dir.display());
    }
    println!("  kubectl get crd");
    if nodes > 0 {
        println!("  kubectl get nodes                       # simulated by kwok: pods run, Jobs finish");
        println!("  kubectl get helmcharts -A               # installed by the k3s helm-controller and helm");
    }
    println!("  kubectl get shapeblock -A");
    println!("  kubectl describe app -n my-project sample-app");
    println!();
    let demo = if no_agent {
        None
    } else {
        let hub = super::demo::start_hub(plane.work_dir()).await?;
        let agent = super::demo::start_agent(&client, plane.kubeconfig(), plane.work_dir(), &hub).await?;
        super::demo::send_samples_and_follow(&hub, &crate::workspace_root(), Duration::from_secs(120))
            .await?;
        super::demo::print_status(&client).await?;
        let hub_cli = std::env::current_exe()?.with_file_name("shapeblock-hub");
        let hub_cli = format!("{} {}", hub_cli.display(), hub.cli_flags());
        println!();
        println!("Simulated here: the nodes (kwok: pods are scheduled and \"run\", nothing executes), the");
        println!(
            "helm-controller's Job image (its pods are run by a local stand-in that calls the real helm),"
        );
        println!("and storage (the database's volume is a hostPath the demo made; no provisioner runs).");
        println!(
            "Real: etcd, kube-apiserver, kube-controller-manager, kube-scheduler, the k3s helm-controller,"
        );
        println!("helm, the agent (under its ServiceAccount), the hub, and the mTLS tunnel between them.");
        println!();
        println!("Look around:");
        println!("  {hub_cli} clusters");
        println!("  {hub_cli} events --cluster {}", super::demo::CLUSTER);
        println!("  kubectl get apps,appbuilds -A");
        println!("  kubectl -n my-project get deploy,pods");
        println!("  kubectl get helmcharts -n {}", super::demo::AGENT_NAMESPACE);
        println!("sample-app fails on purpose: it names a git Secret that does not exist. Create it, marked");
        println!("as a clone credential for github.com (only those who may write Secrets can), and watch");
        println!("the App turn Ready (the agent looks again within a minute):");
        println!(
            "  kubectl -n my-project create secret generic git-credentials --type=kubernetes.io/basic-auth \\"
        );
        println!("      --from-literal=username=demo --from-literal=password=token");
        println!("  kubectl -n my-project label secret git-credentials apps.shapeblock.io/credential=git");
        println!(
            "  kubectl -n my-project annotate secret git-credentials apps.shapeblock.io/git-hosts=github.com"
        );
        println!("buildpack-app got a generated SSH deploy key; its public half is in its status:");
        println!("  kubectl -n my-project get app buildpack-app -o jsonpath='{{.status.sshPublicKey}}'");
        println!("Send a new build through the hub (a rollback to the first one):");
        println!(
            "  printf 'apiVersion: apps.shapeblock.io/v1alpha1\\nkind: AppBuild\\nmetadata: {{name: prebuilt-app-2, namespace: my-project}}\\nspec: {{appName: prebuilt-app, rollbackTo: prebuilt-app-1}}\\n' > /tmp/rollback.yaml"
        );
        println!(
            "  {hub_cli} apply --cluster {} -f /tmp/rollback.yaml",
            super::demo::CLUSTER
        );
        Some((hub, agent))
    };
    println!();
    println!("press Ctrl-C to stop");
    wait_for_stop(exit_after).await;
    if let Some((hub, agent)) = demo {
        println!("agent peak RSS: {} MiB", agent.peak_rss_kib() / 1024);
        let _ = agent.terminate(Duration::from_secs(15));
        hub.hub.stop().await;
    }
    let peaks = plane.peak_rss_kib();
    let total: u64 = peaks.iter().map(|(_, kib)| kib).sum();
    let each: Vec<String> = peaks
        .iter()
        .map(|(name, kib)| format!("{name} {} MiB", kib / 1024))
        .collect();
    println!("peak RSS: {} (sum {} MiB)", each.join(", "), total / 1024);
    eprintln!("stopping ...");
    drop(plane);
    Ok(())
}

async fn wait_for_stop(exit_after: Option<u64>) {
    let timer = async {
        match exit_after {
            Some(seconds) => tokio::time::sleep(Duration::from_secs(seconds)).await,
            None => std::future::pending().await,
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
        _ = timer => {}
    }
}
