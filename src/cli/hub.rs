//! `shapeblock-hub`: the reference hub's commands. `serve` runs it; the others work on its
//! data directory directly (SQLite in WAL mode), beside a running hub, which picks up new
//! commands within half a second.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;

use crate::hub::{self, HubConfig};
use crate::proto::v1::ObjectRef;

/// The reference ShapeBlock hub: enrollment tokens, CSR signing, agent sessions, commands,
/// and a record of events and build logs.
#[derive(Parser, Debug)]
#[command(name = "shapeblock-hub", version, about, long_about = None)]
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
        #[arg(long, default_value_t = 86400)]
        cert_lifetime_seconds: u64,
        #[arg(long, default_value_t = 10)]
        heartbeat_seconds: u64,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print the CA pin agents check (`sha256:…`).
    CaHash,
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
    /// with --prune the deletion of managed resources not among them.
    Sync {
        #[arg(long)]
        cluster: String,
        #[arg(short = 'f', long = "file", required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        prune: bool,
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
    /// Clusters and whether they are connected.
    Clusters,
    /// Events (phase changes, command results) of a cluster.
    Events {
        #[arg(long)]
        cluster: String,
    },
    /// A build log (`namespace/build/container`; containers are `resolve`, `clone`, `build`).
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
enum TokenCommand {
    /// Create a one-time token and print the install line.
    Create {
        #[arg(long)]
        cluster: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
        /// The address agents dial.
        #[arg(long, default_value = "https://127.0.0.1:7443")]
        hub_address: String,
    },
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
            } => {
                crate::runtime::init_tracing(false, "info");
                let _ = rustls::crypto::ring::default_provider().install_default();
                let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
                runtime.block_on(async {
                    let config = HubConfig {
                        listen,
                        server_names: names,
                        cert_lifetime: Duration::from_secs(cert_lifetime_seconds),
                        heartbeat: Duration::from_secs(heartbeat_seconds.max(1)),
                        ..HubConfig::new(data)
                    };
                    let hub = hub::Hub::start(config).await?;
                    println!("listening on {} (CA {})", hub.url(), hub.ca_hash());
                    crate::runtime::shutdown_on_signals().await;
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
                    },
            } => {
                let store = hub::open_store(&data)?;
                let ca = hub::pki::Ca::load_or_create(&data)?;
                let token = hub::create_token(&store, &cluster, Duration::from_secs(ttl))?;
                println!(
                    "SHAPEBLOCK_HUB_ADDRESS={hub_address} SHAPEBLOCK_ENROLL_TOKEN={token} SHAPEBLOCK_CA_HASH={} shapeblock-agent run",
                    crate::proto::ca_hash(&ca.cert_der)
                );
            }
            Command::CaHash => {
                let ca = hub::pki::Ca::load_or_create(&data)?;
                println!("{}", crate::proto::ca_hash(&ca.cert_der));
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
                });
                let seq = store.add_command(&cluster, &body)?;
                println!("queued command {seq} for {cluster}");
            }
            Command::Sync {
                cluster,
                files,
                prune,
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
                let store = hub::open_store(&data)?;
                let seq = store.add_command(&cluster, &hub::sync_command(&manifests, prune)?)?;
                println!(
                    "queued command {seq} for {cluster}: {} manifests, prune {prune}",
                    manifests.len()
                );
            }
            Command::Cancel {
                cluster,
                namespace,
                build,
            } => {
                let store = hub::open_store(&data)?;
                let seq = store.add_command(&cluster, &hub::cancel_command(&namespace, &build))?;
                println!("queued command {seq} for {cluster}");
            }
            Command::Clusters => {
                for c in hub::open_store(&data)?.clusters()? {
                    let state = if c.connected { "connected" } else { "disconnected" };
                    println!("{}\t{state}\tepoch {}\tlast seen {}", c.id, c.epoch, c.last_seen);
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
