//! `shapeblock-agent`: the agent binary's commands.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::api;
use crate::controllers::registry::{PushMode, RegistrySettings};

/// The ShapeBlock agent: runs in a cluster managed by ShapeBlock, dials out to the ShapeBlock
/// server and reconciles Projects, Apps, AppBuilds, BackingServices and Teams.
#[derive(Parser, Debug)]
#[command(name = "shapeblock-agent", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent: connect to the cluster (in-cluster config, `--kubeconfig` or
    /// `KUBECONFIG`), reconcile the ShapeBlock resources, serve `/healthz`, `/readyz` and
    /// `/metrics`, and stop gracefully on SIGTERM.
    Run(Box<RunArgs>),
    /// Print the RBAC objects the agent needs (its ClusterRole, Role and bindings, and the
    /// Team ClusterRoles) as YAML, or with `--markdown` the agent's rules and why each exists.
    Rbac {
        /// Namespace the agent runs in.
        #[arg(long, default_value = "shapeblock")]
        namespace: String,
        /// Print the rule table instead of the objects.
        #[arg(long)]
        markdown: bool,
    },
    /// Print the CustomResourceDefinitions of every ShapeBlock kind as YAML, or write one
    /// file per CRD into a directory (this is how `crds/` is generated).
    Crd {
        /// Write `<group>_<plural>.yaml` files into this directory instead of printing.
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Write the Helm chart's generated files (its `crds/` and `templates/rbac.yaml`, from the
    /// Rust types and `crates/agent/src/rbac.rs`) into the chart directory.
    Chart {
        #[arg(long, value_name = "DIR", default_value = "charts/shapeblock-agent")]
        out: PathBuf,
    },
}

/// Flags of `shapeblock-agent run`; each has an environment variable for use in a Pod spec.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Kubeconfig to use instead of the in-cluster configuration (or `KUBECONFIG`).
    #[arg(long, env = "SHAPEBLOCK_KUBECONFIG", value_name = "FILE")]
    kubeconfig: Option<PathBuf>,
    /// Speak HTTP/2 to the apiserver when it offers it: one connection for every watch and
    /// request. `false` keeps kube's HTTP/1.1 client (a connection per request in flight),
    /// for an apiserver proxy that mishandles HTTP/2.
    #[arg(
        long,
        env = "SHAPEBLOCK_APISERVER_HTTP2",
        default_value_t = true,
        action = clap::ArgAction::Set,
        value_name = "BOOL"
    )]
    apiserver_http2: bool,
    /// The agent's own namespace: holds the registry pull secret it copies into projects.
    #[arg(
        long,
        env = "SHAPEBLOCK_NAMESPACE",
        default_value = "shapeblock",
        value_name = "NAMESPACE"
    )]
    agent_namespace: String,
    /// Registry pull secret (in the agent's namespace) copied into every project and kept in
    /// sync. Empty: the registry needs no credentials, nothing is copied. It should be a
    /// read-only credential: with the default push mode no build ever mounts it.
    #[arg(
        long,
        env = "SHAPEBLOCK_REGISTRY_SECRET",
        default_value = "registry-credentials",
        value_name = "NAME"
    )]
    registry_secret: String,
    #[command(flatten)]
    registry: RegistryArgs,
    /// Address of the HTTP endpoints `/healthz`, `/readyz` (ready once every cache is synced)
    /// and `/metrics` (Prometheus text).
    #[arg(
        long,
        env = "SHAPEBLOCK_HTTP_ADDR",
        default_value = "0.0.0.0:8080",
        value_name = "ADDR"
    )]
    http_addr: std::net::SocketAddr,
    /// How often healthy objects are re-checked even when nothing changed, in seconds.
    #[arg(
        long,
        env = "SHAPEBLOCK_RESYNC_SECONDS",
        default_value_t = 1800,
        value_name = "SECONDS"
    )]
    resync_seconds: u64,
    /// Reconciles each controller runs at once. Each holds its object and its requests in
    /// flight; more than the apiserver serves at once only queues there.
    #[arg(
        long,
        env = "SHAPEBLOCK_RECONCILE_CONCURRENCY",
        default_value_t = crate::controllers::DEFAULT_CONCURRENCY,
        value_parser = clap::value_parser!(u16).range(1..),
        value_name = "N"
    )]
    reconcile_concurrency: u16,
    /// How long in-flight reconciles may take to finish after SIGTERM, in seconds.
    #[arg(
        long,
        env = "SHAPEBLOCK_SHUTDOWN_TIMEOUT_SECONDS",
        default_value_t = 20,
        value_name = "SECONDS"
    )]
    shutdown_timeout_seconds: u64,
    /// Log format.
    #[arg(long, env = "SHAPEBLOCK_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    log_format: LogFormat,
    /// Log level or filter (`info`, `debug`, `shapeblock_agent=debug,kube=info`); `RUST_LOG`
    /// overrides it.
    #[arg(long, env = "SHAPEBLOCK_LOG", default_value = "info", value_name = "FILTER")]
    log: String,
    /// Image with git and ssh, for resolving refs and cloning.
    #[arg(
        long,
        env = "SHAPEBLOCK_GIT_IMAGE",
        default_value = "alpine/git:v2.47.2",
        value_name = "IMAGE"
    )]
    git_image: String,
    /// Kaniko executor for `dockerfile` builds. Upstream kaniko was archived in 2025; the
    /// default is Chainguard's maintained fork (the one the tests build from its Go module).
    /// Its public image carries only `latest`: pin it by digest.
    #[arg(
        long,
        env = "SHAPEBLOCK_KANIKO_IMAGE",
        default_value = "cgr.dev/chainguard/kaniko:latest",
        value_name = "IMAGE"
    )]
    kaniko_image: String,
    /// Buildpacks builder for `buildpack` builds whose App names none.
    #[arg(
        long,
        env = "SHAPEBLOCK_BUILDER_IMAGE",
        default_value = "paketobuildpacks/builder-jammy-base:latest",
        value_name = "IMAGE"
    )]
    builder_image: String,
    /// Build deadline (the Job's activeDeadlineSeconds) when the App and AppBuild set none.
    #[arg(
        long,
        env = "SHAPEBLOCK_BUILD_TIMEOUT_SECONDS",
        default_value_t = 1800,
        value_name = "SECONDS"
    )]
    build_timeout_seconds: i64,
    /// Seconds a deploy may take beyond the App's `progressDeadlineSeconds` (the helm-controller's
    /// install Job) before the build fails with `DeployTimeout`.
    #[arg(
        long,
        env = "SHAPEBLOCK_DEPLOY_MARGIN_SECONDS",
        default_value_t = 600,
        value_name = "SECONDS"
    )]
    deploy_margin_seconds: u64,
    /// Finished AppBuilds kept per App after they Completed; older ones are deleted (with
    /// their Jobs). The App's latest build and the one it runs are always kept.
    #[arg(long, env = "SHAPEBLOCK_KEEP_BUILDS", default_value_t = 10, value_name = "N")]
    keep_builds: usize,
    /// Failed or cancelled AppBuilds kept per App.
    #[arg(
        long,
        env = "SHAPEBLOCK_KEEP_FAILED_BUILDS",
        default_value_t = 5,
        value_name = "N"
    )]
    keep_failed_builds: usize,
    /// cert-manager ClusterIssuer that signs the certificates of App domains that name none.
    #[arg(
        long,
        env = "SHAPEBLOCK_CERTIFICATE_ISSUER",
        default_value = "letsencrypt",
        value_name = "NAME"
    )]
    certificate_issuer: String,
    /// Name of this replica (the Pod name), recorded as the source of Events.
    #[arg(long, env = "POD_NAME", value_name = "NAME")]
    instance: Option<String>,
    /// Server-side apply the ShapeBlock CRDs on start-up (Helm never upgrades a chart's
    /// CRDs). Needs the CRD rule of `shapeblock-agent rbac`.
    #[arg(long, env = "SHAPEBLOCK_APPLY_CRDS", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    apply_crds: bool,
    #[command(flatten)]
    hub: HubArgs,
    #[command(flatten)]
    leader: LeaderArgs,
}

/// The cluster registry and how builds push to it.
#[derive(clap::Args, Debug)]
struct RegistryArgs {
    /// The cluster registry, `host[:port]` with an optional path prefix that the operator
    /// chooses (e.g. `registry.shapeblock.io/<cluster>`). Apps whose `registry.url` is exactly
    /// this push to `<registry>/<project>/<app>`; any other path or port on its host is
    /// refused. Unset: Apps name their own registry and credential Secret.
    #[arg(long, env = "SHAPEBLOCK_REGISTRY", value_name = "HOST[:PORT][/PREFIX]")]
    registry: Option<String>,
    /// How builds authenticate to the cluster registry: `token` (a token per build for the
    /// App's own repositories, signed by the agent; the registry must trust its certificate)
    /// or `shared` (the `--registry-secret` copy, readable by every build: any tenant can push
    /// into any project's repositories; single-tenant clusters only).
    #[arg(long, env = "SHAPEBLOCK_REGISTRY_PUSH_MODE", value_enum, default_value_t = PushMode::Token)]
    registry_push_mode: PushMode,
    /// `iss` of push tokens: the registry's `auth.token.issuer`.
    #[arg(
        long,
        env = "SHAPEBLOCK_REGISTRY_TOKEN_ISSUER",
        default_value = "shapeblock-agent",
        value_name = "NAME"
    )]
    registry_token_issuer: String,
    /// `aud` of push tokens: the registry's `auth.token.service`. Default: the registry's host.
    #[arg(long, env = "SHAPEBLOCK_REGISTRY_TOKEN_SERVICE", value_name = "NAME")]
    registry_token_service: Option<String>,
    /// Secret (in the agent's namespace, type kubernetes.io/tls) with the token signing key
    /// (`tls.key`, ECDSA P-256 PKCS#8) and its certificate (`tls.crt`); generated when missing.
    #[arg(
        long,
        env = "SHAPEBLOCK_REGISTRY_TOKEN_SECRET",
        default_value = crate::controllers::registry::DEFAULT_KEY_SECRET,
        value_name = "NAME"
    )]
    registry_token_secret: String,
}

impl RegistryArgs {
    fn settings(self) -> Result<RegistrySettings, String> {
        let cluster = self.registry.filter(|r| !r.is_empty());
        if let Some(registry) = cluster.as_ref().filter(|r| !is_registry_reference(r)) {
            return Err(format!(
                "--registry {registry:?} is not host[:port][/prefix] (no scheme, lower-case path)"
            ));
        }
        if self.registry_push_mode == PushMode::Shared && cluster.is_none() {
            return Err("--registry-push-mode=shared needs --registry".into());
        }
        Ok(RegistrySettings {
            cluster,
            push_mode: self.registry_push_mode,
            token_issuer: self.registry_token_issuer,
            token_service: self.registry_token_service.unwrap_or_default(),
            key_secret: self.registry_token_secret,
        })
    }
}

/// `host[:port][/path]` as [`api::REGISTRY_PATTERN`] says, checked by hand (no regex engine
/// in the binary).
fn is_registry_reference(value: &str) -> bool {
    let (host, path) = value.split_once('/').unwrap_or((value, ""));
    let (name, port) = host.split_once(':').unwrap_or((host, ""));
    let name_ok = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-');
    let port_ok = !host.contains(':')
        || (!port.is_empty() && port.len() <= 5 && port.chars().all(|c| c.is_ascii_digit()));
    let path_ok = !value.contains('/')
        || path.split('/').all(|segment| {
            !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c))
                && segment.starts_with(|c: char| c.is_ascii_alphanumeric())
                && segment.ends_with(|c: char| c.is_ascii_alphanumeric())
        });
    name_ok && port_ok && path_ok
}

/// Leader election: with it, only the replica holding the Lease `shapeblock-agent` in the
/// agent's namespace runs the controllers and the tunnel; the others stand by (ready) and take
/// over within the lease duration, or at once when the leader shuts down gracefully.
#[derive(clap::Args, Debug)]
struct LeaderArgs {
    /// Elect a leader among replicas (the chart always does: a rolling update runs two Pods).
    #[arg(long, env = "SHAPEBLOCK_LEADER_ELECT")]
    leader_elect: bool,
    /// How long a standby waits on a Lease its holder stopped renewing, in seconds.
    #[arg(
        long,
        env = "SHAPEBLOCK_LEASE_DURATION_SECONDS",
        default_value_t = 15,
        value_name = "SECONDS"
    )]
    lease_duration_seconds: u64,
    /// How long the leader keeps leading without a successful renewal, in seconds (shorter than
    /// the lease duration).
    #[arg(
        long,
        env = "SHAPEBLOCK_RENEW_DEADLINE_SECONDS",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    renew_deadline_seconds: u64,
    /// How often the leader renews and a standby retries, in seconds.
    #[arg(
        long,
        env = "SHAPEBLOCK_RETRY_PERIOD_SECONDS",
        default_value_t = 2,
        value_name = "SECONDS"
    )]
    retry_period_seconds: u64,
}

/// The tunnel to the ShapeBlock hub. Without `--hub-address` the agent only reconciles.
#[derive(clap::Args, Debug)]
struct HubArgs {
    /// The hub to dial out to, `https://host:port`.
    #[arg(long, env = "SHAPEBLOCK_HUB_ADDRESS", value_name = "URL")]
    hub_address: Option<String>,
    /// One-time enrollment token from the install line (only needed until the identity
    /// Secret holds a certificate). Prefer the environment variable from a Secret.
    #[arg(
        long,
        env = "SHAPEBLOCK_ENROLL_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    enroll_token: Option<String>,
    /// Pin of the hub's CA from the install line, `sha256:<hex>`.
    #[arg(long, env = "SHAPEBLOCK_CA_HASH", value_name = "HASH")]
    ca_hash: Option<String>,
    /// Secret (in the agent's namespace) that keeps the tunnel's key, certificate and CA.
    #[arg(long, env = "SHAPEBLOCK_IDENTITY_SECRET", default_value = crate::bridge::identity::IDENTITY_SECRET, value_name = "NAME")]
    identity_secret: String,
    /// Application heartbeat interval, in seconds (the hub may ask for a shorter one).
    #[arg(
        long,
        env = "SHAPEBLOCK_HEARTBEAT_SECONDS",
        default_value_t = 10,
        value_name = "SECONDS"
    )]
    heartbeat_seconds: u64,
    /// Longest wait between reconnect attempts, in seconds (exponential backoff, full jitter).
    #[arg(
        long,
        env = "SHAPEBLOCK_RECONNECT_MAX_SECONDS",
        default_value_t = 30,
        value_name = "SECONDS"
    )]
    reconnect_max_seconds: u64,
    /// How often the cluster inventory (nodes, allocatable, Kubernetes version) is read, in
    /// seconds; it goes to the hub when it changed, and at least every 10 minutes.
    #[arg(
        long,
        env = "SHAPEBLOCK_INVENTORY_SECONDS",
        default_value_t = 120,
        value_name = "SECONDS"
    )]
    inventory_seconds: u64,
    /// Bytes per second, in KiB, each live App log follow may send to the hub (after a burst of
    /// four seconds' worth); what exceeds it is dropped with a truncation marker.
    #[arg(
        long,
        env = "SHAPEBLOCK_APP_LOGS_KIB_PER_SECOND",
        default_value_t = crate::bridge::app_logs::DEFAULT_RATE_KIB,
        value_name = "KIB"
    )]
    app_logs_kib_per_second: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line.
    Json,
}

impl Cli {
    /// Runs the chosen command and maps its outcome to the process exit code.
    pub fn run(self) -> ExitCode {
        let outcome = match self.command {
            Command::Run(args) => run(*args),
            Command::Rbac { markdown: true, .. } => {
                print!("{}", crate::rbac::markdown_table());
                Ok(())
            }
            Command::Rbac {
                namespace,
                markdown: false,
            } => crate::rbac::manifests(&namespace)
                .map(|yaml| print!("{yaml}"))
                .map_err(Into::into),
            Command::Crd { out: None } => print_crds(),
            Command::Crd { out: Some(dir) } => write_crds(&dir),
            Command::Chart { out } => crate::chart::write(&out)
                .map(|written| written.iter().for_each(|p| println!("wrote {}", p.display())))
                .map_err(Into::into),
        };
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("error: {err}");
                ExitCode::FAILURE
            }
        }
    }
}

fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    crate::runtime::init_tracing(matches!(args.log_format, LogFormat::Json), &args.log);
    let leader_election = args.leader.leader_elect.then(|| crate::leader::LeaderConfig {
        namespace: args.agent_namespace.clone(),
        lease_name: crate::rbac::LEASE_NAME.into(),
        identity: args.instance.clone().unwrap_or_else(default_identity),
        lease_duration: std::time::Duration::from_secs(args.leader.lease_duration_seconds),
        renew_deadline: std::time::Duration::from_secs(args.leader.renew_deadline_seconds),
        retry_period: std::time::Duration::from_secs(args.leader.retry_period_seconds),
    });
    let registry = args.registry.settings()?;
    let settings = crate::runtime::Settings {
        kubeconfig: args.kubeconfig,
        apiserver_http2: args.apiserver_http2,
        http_addr: args.http_addr,
        shutdown_timeout: std::time::Duration::from_secs(args.shutdown_timeout_seconds),
        controllers: crate::controllers::Config {
            agent_namespace: args.agent_namespace,
            registry_secret: (!args.registry_secret.is_empty()).then_some(args.registry_secret),
            registry,
            resync: std::time::Duration::from_secs(args.resync_seconds),
            concurrency: args.reconcile_concurrency,
            instance: args.instance,
            builds: crate::controllers::appbuild::BuildSettings {
                git_image: args.git_image,
                kaniko_image: args.kaniko_image,
                builder_image: args.builder_image,
                timeout_seconds: args.build_timeout_seconds,
                keep_succeeded: args.keep_builds,
                keep_failed: args.keep_failed_builds,
                certificate_issuer: args.certificate_issuer,
                deploy_margin_seconds: args.deploy_margin_seconds,
                ..Default::default()
            },
        },
        tunnel: args.hub.hub_address.map(|url| crate::runtime::TunnelSettings {
            config: crate::tunnel::TunnelConfig {
                enroll_token: args.hub.enroll_token,
                ca_hash: args.hub.ca_hash,
                heartbeat: std::time::Duration::from_secs(args.hub.heartbeat_seconds.max(1)),
                backoff_max: std::time::Duration::from_secs(args.hub.reconnect_max_seconds.max(1)),
                inventory_check: std::time::Duration::from_secs(args.hub.inventory_seconds.max(1)),
                ..crate::tunnel::TunnelConfig::new(url)
            },
            identity_secret: args.hub.identity_secret,
            app_logs_rate: args.hub.app_logs_kib_per_second.max(1).saturating_mul(1024),
        }),
        leader_election,
        apply_crds: args.apply_crds,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let shutdown = crate::runtime::shutdown_on_signals();
        crate::runtime::run(settings, shutdown).await
    })?;
    Ok(())
}

/// Outside a Pod (no `POD_NAME`): the host name and process id, unique enough among replicas.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

fn print_crds() -> Result<(), Box<dyn std::error::Error>> {
    for crd in api::crds() {
        print!("---\n{}", api::crd_yaml(&crd)?);
    }
    Ok(())
}

fn write_crds(dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for crd in api::crds() {
        let path = dir.join(api::crd_file_name(&crd));
        std::fs::write(&path, api::crd_yaml(&crd)?)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_flags_are_checked_and_shared_push_is_explicit() {
        for good in [
            "registry.example.com",
            "127.0.0.1:5000",
            "registry.shapeblock.io/c-42",
            "r:1/a/b.c",
        ] {
            assert!(is_registry_reference(good), "{good}");
        }
        for bad in [
            "https://registry.example.com",
            "registry.example.com/",
            "registry.example.com/Upper",
            "registry.example.com:",
            "registry.example.com:123456",
            "-registry",
            "registry.example.com/a//b",
            "reg istry",
        ] {
            assert!(!is_registry_reference(bad), "{bad}");
        }
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from([&["shapeblock-agent", "run"][..], args].concat()).unwrap();
            match cli.command {
                Command::Run(run) => run.registry.settings(),
                _ => unreachable!(),
            }
        };
        let settings = parse(&["--registry=registry.example.com"]).unwrap();
        assert_eq!(
            settings.push_mode,
            PushMode::Token,
            "tokens unless asked otherwise"
        );
        assert_eq!(settings.service(), "registry.example.com");
        assert!(
            parse(&["--registry-push-mode=shared"]).is_err(),
            "shared needs a registry"
        );
        assert!(parse(&["--registry=https://registry.example.com"]).is_err());
        assert_eq!(parse(&[]).unwrap().cluster, None);
    }
}
