//! `shapeblock-hub`: the reference hub's commands. `serve` runs it; the others work on its
//! data directory directly (SQLite in WAL mode), beside a running hub, which picks up new
//! commands within half a second.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;

use crate::{self as hub, HubConfig};
use shapeblock_proto::v1::ObjectRef;

/// The reference ShapeBlock hub: enrollment tokens, CSR signing, agent sessions, commands,
/// and a record of events and build and run logs.
#[derive(Parser, Debug)]
#[command(
    name = "shapeblock-hub",
    version,
    about = "The reference ShapeBlock hub: enrolls agents, serves their mTLS sessions, queues commands, and keeps their events and build and run logs",
    long_about = None
)]
pub struct Cli {
    /// Where the CA, the server certificate and the store live.
    #[arg(long, env = "SHAPEBLOCK_HUB_DATA", default_value = "hub-data", global = true)]
    data_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve agents.
    Serve {
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: std::net::SocketAddr,
        /// Names and IPs for the server certificate (repeat).
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
        /// Lifetime of the client certificates (default 45 days; agents renew at 70-80 % of
        /// it, so this tolerates a hub outage of 9 days; below 35 days it is less than 7).
        #[arg(long, default_value_t = shapeblock_proto::certificates::DEFAULT_LIFETIME.as_secs())]
        cert_lifetime_seconds: u64,
        #[arg(long, default_value_t = 10)]
        heartbeat_seconds: u64,
        /// Serve the server-facing API (`shapeblock.hub.v1`: TLS, API keys) here.
        #[arg(long, env = "SHAPEBLOCK_HUB_API_ADDR")]
        api_addr: Option<std::net::SocketAddr>,
        /// Events the hub holds for one API watcher; one that leaves them unread for
        /// --watch-stall-ms is cut (RESOURCE_EXHAUSTED) and resumes from its cursor.
        #[arg(long, default_value_t = hub::api::DEFAULT_WATCH_BUFFER)]
        watch_buffer: usize,
        #[arg(long, default_value_t = hub::api::DEFAULT_WATCH_STALL.as_millis() as u64)]
        watch_stall_ms: u64,
    },
    /// API keys for the hub's API.
    ApiKey {
        #[command(subcommand)]
        command: ApiKeyCommand,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print the CA pin agents check (`sha256:…`).
    CaHash,
    /// Create a development CA and a server certificate for localhost in `--out`, and print how
    /// to start the hub with them. Never for production.
    DevCerts {
        /// Where to write `ca.pem`, `ca-key.pem` and `server.pem` (the hub's data directory).
        #[arg(long, default_value = "certs-dev")]
        out: PathBuf,
        /// Names and IPs for the server certificate (repeat).
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
    },
    /// Queue a server-side apply of a ShapeBlock manifest on a cluster.
    Apply {
        #[arg(long)]
        cluster: String,
        #[arg(short = 'f', long)]
        file: PathBuf,
    },
    /// Queue a delete.
    Delete {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        kind: String,
        #[arg(long, default_value = "")]
        namespace: String,
        #[arg(long)]
        name: String,
    },
    /// Queue the whole desired state: every manifest in the files (multi-document YAML), and
    /// with --prune the deletion of managed resources in the prune scope that are not among
    /// them. The agent prunes at most --prune-max-percent of the managed objects in scope, and
    /// nothing when the files keep none of them, unless --force.
    Sync {
        #[arg(long)]
        cluster: String,
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        /// Delete managed resources in the scope that the files do not list (needs a scope:
        /// --prune-project, or --prune-kind / --prune-namespace).
        #[arg(long)]
        prune: bool,
        /// Prune this Project and what is in its namespace (repeat).
        #[arg(long = "prune-project", requires = "prune")]
        prune_projects: Vec<String>,
        /// Prune objects of this kind (repeat; with --prune-namespace, only there).
        #[arg(long = "prune-kind", requires = "prune")]
        prune_kinds: Vec<String>,
        /// Prune objects in this namespace (repeat; with --prune-kind, only of those kinds).
        #[arg(long = "prune-namespace", requires = "prune")]
        prune_namespaces: Vec<String>,
        /// Most percent of the managed objects in scope one sync may remove (default 50).
        #[arg(long, requires = "prune", value_parser = clap::value_parser!(u32).range(1..=100))]
        prune_max_percent: Option<u32>,
        /// Prune beyond that share, and even when the files keep nothing in scope.
        #[arg(long, requires = "prune")]
        force: bool,
    },
    /// Queue the cancellation of a running build.
    Cancel {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        namespace: String,
        /// The AppBuild's name.
        #[arg(long)]
        build: String,
    },
    /// Queue a change of an App's secret config vars. They are kept in the App's config Secret
    /// in the cluster (the App is released again, without a build); the hub forgets the values
    /// once the agent confirms. A command line is visible to other local users: prefer
    /// --env-file for real secrets.
    ConfigSet {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        app: String,
        /// NAME=VALUE pairs.
        vars: Vec<String>,
        /// A file of NAME=VALUE lines (blank lines and `#` comments are skipped).
        #[arg(long)]
        env_file: Option<PathBuf>,
        /// Names to remove (repeat).
        #[arg(long)]
        unset: Vec<String>,
    },
    /// Clusters and whether they are connected.
    Clusters,
    /// Events (phase changes, command results) of a cluster.
    Events {
        #[arg(long)]
        cluster: String,
    },
    /// A build log (`namespace/build/container`; containers are `resolve`, `clone`, `build`,
    /// `release`) or a one-off run's output (`namespace/runs/run/run`).
    Logs {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        stream: String,
        /// Keep printing as the log grows, until its end.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Subcommand, Debug)]
enum ApiKeyCommand {
    /// Create a key on the data directory (the first one; later ones can come from the API)
    /// and print it: it is shown once, only its hash is stored.
    Create {
        #[arg(long)]
        name: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a one-time token and print the one-line install (`helm install …`).
    Create {
        #[arg(long)]
        cluster: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// The address agents dial.
        #[arg(long, default_value = "https://127.0.0.1:7443")]
        hub_address: String,
        /// The chart in the install line: a repository reference or a path.
        #[arg(long, default_value = INSTALL_CHART)]
        chart: String,
        /// The namespace in the install line.
        #[arg(long, default_value = "shapeblock")]
        namespace: String,
    },
}

/// The chart `token create` names unless told otherwise.
pub const INSTALL_CHART: &str = "oci://ghcr.io/shapeblock/charts/shapeblock-agent";

/// The one-line install: every value the agent needs, nothing else. Each word is quoted for a
/// POSIX shell if it needs to be.
pub fn install_line(chart: &str, namespace: &str, token: &str, hub_address: &str, ca_hash: &str) -> String {
    let words = [
        "helm".to_string(),
        "install".into(),
        "shapeblock-agent".into(),
        chart.into(),
        "-n".into(),
        namespace.into(),
        "--create-namespace".into(),
        "--set".into(),
        format!("enrollment.token={token}"),
        "--set".into(),
        format!("hub.address={hub_address}"),
        "--set".into(),
        format!("hub.caHash={ca_hash}"),
    ];
    words.iter().map(|w| shell_word(w)).collect::<Vec<_>>().join(" ")
}

fn shell_word(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./:=@+,".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

impl Cli {
    pub fn run(self) -> ExitCode {
        match self.execute() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    }

    fn execute(self) -> Result<(), Box<dyn std::error::Error>> {
        let data = self.data_dir;
        match self.command {
            Command::Serve {
                listen,
                names,
                cert_lifetime_seconds,
                heartbeat_seconds,
                api_addr,
                watch_buffer,
                watch_stall_ms,
            } => {
                init_tracing("info");
                let _ = rustls::crypto::ring::default_provider().install_default();
                let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
                runtime.block_on(async {
                    let config = HubConfig {
                        listen,
                        server_names: names,
                        cert_lifetime: Duration::from_secs(cert_lifetime_seconds),
                        heartbeat: Duration::from_secs(heartbeat_seconds.max(1)),
                        api_listen: api_addr,
                        watch_buffer,
                        watch_stall: Duration::from_millis(watch_stall_ms),
                        ..HubConfig::new(data)
                    };
                    let hub = hub::Hub::start(config).await?;
                    println!("listening on {} (CA {})", hub.url(), hub.ca_hash());
                    if let Some(api) = hub.api_address() {
                        println!("API on https://{api}");
                    }
                    shutdown_on_signals().await;
                    hub.stop().await;
                    Ok::<_, Box<dyn std::error::Error>>(())
                })?;
            }
            Command::Token {
                command:
                    TokenCommand::Create {
                        cluster,
                        ttl,
                        hub_address,
                        chart,
                        namespace,
                    },
            } => {
                let store = hub::open_store(&data)?;
                let ca = hub::pki::Ca::load_or_create(&data)?;
                let token = hub::create_token(&store, &cluster, Duration::from_secs(ttl))?;
                let line = install_line(
                    &chart,
                    &namespace,
                    &token,
                    &hub_address,
                    &shapeblock_proto::ca_hash(&ca.cert_der),
                );
                println!("{line}");
            }
            Command::ApiKey {
                command: ApiKeyCommand::Create { name },
            } => {
                let store = hub::open_store(&data)?;
                let (row, secret) = hub::api::create_api_key(&store, &name)?;
                eprintln!("API key {} ({}) created; it is shown once:", row.id, row.name);
                println!("{secret}");
            }
            Command::DevCerts { out, names } => {
                std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
                let ca = hub::pki::Ca::load_or_create(&out)?;
                // The hub issues itself a fresh server certificate from this CA on every start;
                // this one is for looking at (`openssl x509 -in server.pem -text`).
                let (cert, _key) = ca.server_cert(&names)?;
                hub::pki::Ca::save_server(&out, &cert)?;
                let dir = out.display();
                println!(
                    "development CA and server certificate for {} in {dir}",
                    names.join(", ")
                );
                println!("CA hash: {}", shapeblock_proto::ca_hash(&ca.cert_der));
                println!("start the hub:   shapeblock-hub --data-dir {dir} serve");
                println!("install line:    shapeblock-hub --data-dir {dir} token create --cluster dev");
            }
            Command::CaHash => {
                let ca = hub::pki::Ca::load_or_create(&data)?;
                println!("{}", shapeblock_proto::ca_hash(&ca.cert_der));
            }
            Command::Apply { cluster, file } => {
                let manifest =
                    std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
                let store = hub::open_store(&data)?;
                let seq = store.add_command(&cluster, &hub::apply_command(&manifest)?)?;
                println!("queued command {seq} for {cluster}");
            }
            Command::Delete {
                cluster,
                kind,
                namespace,
                name,
            } => {
                let store = hub::open_store(&data)?;
                let body = hub::delete_command(ObjectRef {
                    kind,
                    namespace,
                    name,
                })?;
                let seq = store.add_command(&cluster, &body)?;
                println!("queued command {seq} for {cluster}");
            }
            Command::Sync {
                cluster,
                files,
                prune,
                prune_projects,
                prune_kinds,
                prune_namespaces,
                prune_max_percent,
                force,
            } => {
                let mut manifests = Vec::new();
                for file in &files {
                    let text =
                        std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
                    for document in serde_yaml::Deserializer::from_str(&text) {
                        let value = serde_yaml::Value::deserialize(document)
                            .map_err(|e| format!("{}: {e}", file.display()))?;
                        if !value.is_null() {
                            manifests.push(serde_yaml::to_string(&value)?);
                        }
                    }
                }
                let scope = shapeblock_proto::v1::PruneScope {
                    projects: prune_projects,
                    kinds: prune_kinds,
                    namespaces: prune_namespaces,
                };
                let said = if prune {
                    format!(
                        "prune in projects {:?}, kinds {:?}, namespaces {:?}",
                        scope.projects, scope.kinds, scope.namespaces
                    )
                } else {
                    "no prune".into()
                };
                let prune = prune.then_some(hub::Prune {
                    scope,
                    max_percent: prune_max_percent.unwrap_or(0),
                    force,
                });
                let body = hub::sync_command(&manifests, prune)?;
                let store = hub::open_store(&data)?;
                let seq = store.add_command(&cluster, &body)?;
                println!(
                    "queued command {seq} for {cluster}: {} manifests, {said}",
                    manifests.len()
                );
            }
            Command::Cancel {
                cluster,
                namespace,
                build,
            } => {
                let store = hub::open_store(&data)?;
                let seq = store.add_command(&cluster, &hub::cancel_command(&namespace, &build)?)?;
                println!("queued command {seq} for {cluster}");
            }
            Command::ConfigSet {
                cluster,
                namespace,
                app,
                vars,
                env_file,
                unset,
            } => {
                let mut lines = vars;
                if let Some(file) = env_file {
                    let text = std::fs::read_to_string(&file)
                        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
                    lines.extend(
                        text.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .map(str::to_string),
                    );
                }
                let mut set = std::collections::HashMap::new();
                for line in lines {
                    let Some((name, value)) = line.split_once('=') else {
                        let name = line.chars().take(64).collect::<String>();
                        return Err(format!("{name:?} is not NAME=VALUE").into());
                    };
                    set.insert(name.trim().to_string(), value.to_string());
                }
                let names = set.len();
                let command = shapeblock_proto::v1::SetConfig {
                    namespace,
                    app,
                    set,
                    unset,
                };
                let store = hub::open_store(&data)?;
                let seq = store.add_command(&cluster, &hub::set_config_command(command)?)?;
                println!("queued command {seq} for {cluster} ({names} to set)");
            }
            Command::Clusters => {
                for c in hub::open_store(&data)?.clusters()? {
                    let state = if c.connected { "connected" } else { "disconnected" };
                    let ago = shapeblock_proto::now_unix().saturating_sub(c.last_seen);
                    let inventory = c
                        .inventory
                        .as_ref()
                        .map(|i| {
                            format!(
                                "kubernetes {} · {} nodes · {} mCPU · {} MiB",
                                i.kubernetes_version,
                                i.node_count,
                                i.allocatable_cpu_millis,
                                i.allocatable_memory_bytes >> 20
                            )
                        })
                        .unwrap_or_else(|| "no inventory".into());
                    let version = c.agent_version.as_deref().unwrap_or("-");
                    let skew = c
                        .clock_skew_ms
                        .map(|ms| format!("clock skew {ms} ms"))
                        .unwrap_or_else(|| "clock skew unknown".into());
                    println!(
                        "{}\t{state}\tepoch {}\tlast seen {ago}s ago\tagent {version}\t{inventory}\t{skew}",
                        c.id, c.epoch
                    );
                }
            }
            Command::Events { cluster } => {
                for (seq, kind, object, detail) in hub::open_store(&data)?.events(&cluster)? {
                    println!("{seq}\t{kind}\t{object}\t{detail}");
                }
            }
            Command::Logs {
                cluster,
                stream,
                follow,
            } => {
                use std::io::Write;
                let store = hub::open_store(&data)?;
                let mut printed = 0;
                loop {
                    let (bytes, truncated, eof) = store.log(&cluster, &stream)?;
                    let mut stdout = std::io::stdout();
                    stdout.write_all(bytes.get(printed..).unwrap_or_default())?;
                    stdout.flush()?;
                    printed = printed.max(bytes.len());
                    if truncated {
                        eprintln!("[log truncated: its pod was gone before the rest could be read]");
                    }
                    if eof {
                        eprintln!("[end of log]");
                    }
                    if !follow || truncated || eof {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
        Ok(())
    }
}

/// Logs to stderr at `level` (or `RUST_LOG`), coloured on a terminal. The agent has its own
/// (`shapeblock_agent::runtime`); the hub does not depend on the agent.
fn init_tracing(level: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_on_signals() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = terminate => tracing::info!("SIGTERM received: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received: shutting down"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_install_line_is_one_line_and_quotes_only_what_needs_it() {
        let line = install_line(
            "/a b/chart",
            "shapeblock",
            "sbt_0f",
            "https://hub:7443",
            "sha256:ab",
        );
        assert_eq!(
            line,
            "helm install shapeblock-agent '/a b/chart' -n shapeblock --create-namespace \
             --set enrollment.token=sbt_0f --set hub.address=https://hub:7443 --set hub.caHash=sha256:ab"
        );
        assert!(!line.contains('\n'));
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}
