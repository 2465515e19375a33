//! `shapeblock-hub`: the reference hub's commands. `serve` runs it, `dev-certs`, `ca-hash` and
//! the first `api-key create` work on its data directory; everything else is a client of the
//! hub's API (`--hub`, `--api-key`, `--ca`), so the CLI works against a remote hub the same way
//! as against a local one.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Deserialize;

use crate::api::v1 as api;
use crate::{self as hub, HubConfig};

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
    /// Where the CA, the server certificate and (without --database-url) the store live
    /// (serve, dev-certs, ca-hash, and `api-key create` without --hub).
    #[arg(long, env = "SHAPEBLOCK_HUB_DATA", default_value = "hub-data", global = true)]
    data_dir: PathBuf,
    /// Keep the store in this Postgres database (`postgres://user:password@host:port/db`)
    /// instead of `hub.sqlite` in --data-dir: what several hub replicas share. Its schema is
    /// created and migrated at start-up. Without it, SQLite. TLS as libpq's URL words say:
    /// `sslmode` (disable, prefer (the default), require, verify-ca, verify-full),
    /// `sslrootcert` (a PEM file or `system`), `sslcert` and `sslkey`.
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_DATABASE_URL",
        global = true,
        hide_env_values = true
    )]
    database_url: Option<String>,
    /// The CA (PEM) that signed the database's certificate: --database-url gets
    /// `sslrootcert` set to it, and `sslmode=verify-full` unless the URL names a mode.
    #[arg(
        long,
        env = "SHAPEBLOCK_HUB_DATABASE_CA",
        global = true,
        requires = "database_url"
    )]
    database_ca: Option<PathBuf>,
    /// The hub's API (`https://host:port`, what `serve --api-addr` listens on).
    #[arg(long, env = "SHAPEBLOCK_HUB_API", global = true)]
    hub: Option<String>,
    /// An API key (`sbk_…`).
    #[arg(long, env = "SHAPEBLOCK_HUB_API_KEY", global = true, hide_env_values = true)]
    api_key: Option<String>,
    /// The hub's CA certificate (PEM); default: `ca.pem` in --data-dir.
    #[arg(long, env = "SHAPEBLOCK_HUB_CA", global = true)]
    ca: Option<PathBuf>,
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
        /// Live App log callers served at once for one cluster; more are RESOURCE_EXHAUSTED.
        #[arg(long, default_value_t = hub::api::DEFAULT_APP_LOG_FOLLOWERS)]
        app_log_followers: usize,
        /// Postgres connections the hub keeps at most (with --database-url); sessions and API
        /// calls share them, so this bounds the database's load whatever the agent count.
        #[arg(long, default_value_t = hub::store::DEFAULT_POOL_SIZE)]
        database_pool: usize,
        /// With --database-url this hub is one of possibly several replicas: it refreshes
        /// its heartbeat row this often ...
        #[arg(long, default_value_t = hub::replicas::DEFAULT_HEARTBEAT.as_millis() as u64)]
        replica_heartbeat_ms: u64,
        /// ... and a replica whose row is older than this (at least 2 beats) is declared dead
        /// and only the clusters it held are handed on.
        #[arg(long, default_value_t = hub::replicas::DEFAULT_DEAD_AFTER.as_millis() as u64)]
        replica_dead_after_ms: u64,
        /// Serve `/livez` and `/readyz` (plain HTTP) here: ready while the database takes
        /// this replica's heartbeat and its LISTEN connection is up; live while it answers.
        #[arg(long, env = "SHAPEBLOCK_HUB_HEALTH_ADDR")]
        health_addr: Option<std::net::SocketAddr>,
        /// Retention: prune events (the WatchEvents feed and the agents' event history)
        /// recorded more than this many days ago; 0: keep them forever. A watcher resuming
        /// from a pruned cursor gets OUT_OF_RANGE with the cursor to resume from.
        #[arg(long, env = "SHAPEBLOCK_HUB_RETAIN_EVENTS_DAYS", default_value_t = hub::store::retention::DEFAULT_EVENTS_DAYS)]
        retain_events_days: u64,
        /// Retention: keep at most this many events (a count, not bytes: events are small
        /// and alike) per cluster, the newest; 0: no cap.
        #[arg(long, env = "SHAPEBLOCK_HUB_RETAIN_EVENTS_PER_CLUSTER", default_value_t = hub::store::retention::DEFAULT_EVENTS_PER_CLUSTER)]
        retain_events_per_cluster: u64,
        /// Retention: prune build and run logs that ended (complete or truncated) more than
        /// this many days ago, whole; 0: keep them forever. A log still being written is
        /// never pruned by age.
        #[arg(long, env = "SHAPEBLOCK_HUB_RETAIN_LOGS_DAYS", default_value_t = hub::store::retention::DEFAULT_LOGS_DAYS)]
        retain_logs_days: u64,
        /// Retention: keep at most this many bytes of log data per cluster (e.g. `1GiB`,
        /// `512MiB`, binary units); over it the oldest bytes go first: the streams written
        /// longest ago, whole if they ended, else their oldest chunks (a live stream keeps
        /// its offsets; reading a pruned range is OUT_OF_RANGE). 0: no cap.
        #[arg(long, env = "SHAPEBLOCK_HUB_RETAIN_LOG_BYTES_PER_CLUSTER", default_value = "1GiB",
              value_parser = hub::store::retention::parse_bytes)]
        retain_log_bytes_per_cluster: u64,
        /// How often retention runs (on Postgres one replica at a time, the others skip the
        /// round); 0: never, whatever the --retain-* flags say.
        #[arg(long, env = "SHAPEBLOCK_HUB_RETENTION_INTERVAL_SECONDS", default_value_t = hub::store::retention::DEFAULT_INTERVAL.as_secs())]
        retention_interval_seconds: u64,
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
        /// A retry with the same key queues nothing new.
        #[arg(long, default_value = "")]
        idempotency_key: String,
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
    /// Refuse a cluster's certificates from now on and close its session; joining again
    /// takes a new token.
    Revoke {
        #[arg(long)]
        cluster: String,
    },
    /// The latest phase of every resource of a cluster.
    Objects {
        #[arg(long)]
        cluster: String,
    },
    /// A command's state: queued, delivered, succeeded or failed (with the message).
    #[command(name = "command")]
    Inspect {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        id: u64,
    },
    /// What the hub records (phase changes, command results, sessions, log streams), of one
    /// cluster or all, from after an event id.
    Events {
        #[arg(long)]
        cluster: Option<String>,
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep printing as events are recorded (resuming after a cut).
        #[arg(short, long)]
        follow: bool,
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
    /// Live logs of an App's running pods (`heroku logs --tail`), each line after its pod and
    /// container, until interrupted.
    AppLogs {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        namespace: String,
        #[arg(long)]
        app: String,
        /// One process type (default: every one).
        #[arg(long, default_value = "")]
        process: String,
        /// One container (default: every one).
        #[arg(long, default_value = "")]
        container: String,
        /// Lines of each container's log from before (default 100; 0: only new lines).
        #[arg(long)]
        tail: Option<u32>,
        /// Only lines of the last this many seconds.
        #[arg(long, default_value_t = 0)]
        since_seconds: u32,
    },
}

#[derive(Subcommand, Debug)]
enum ApiKeyCommand {
    /// Create a key and print it (shown once, only its hash is stored): through the API with
    /// --hub, else on the data directory (how the first one is made).
    Create {
        #[arg(long)]
        name: String,
    },
    List,
    Revoke {
        #[arg(long)]
        id: String,
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
        /// The address agents dial (default: the hub's agent listener as it sees it).
        #[arg(long, default_value = "")]
        hub_address: String,
        /// The chart in the install line: a repository reference or a path.
        #[arg(long, default_value = INSTALL_CHART)]
        chart: String,
        /// The namespace in the install line.
        #[arg(long, default_value = "shapeblock")]
        namespace: String,
    },
    /// Tokens (their ids, clusters, expiry, whether used).
    List {
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Revoke an unused token.
    Revoke {
        #[arg(long)]
        id: String,
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

    fn execute(mut self) -> Result<(), Box<dyn std::error::Error>> {
        let data = self.data_dir.clone();
        if let (Some(url), Some(ca)) = (self.database_url.as_deref(), self.database_ca.as_deref()) {
            self.database_url = Some(hub::store::tls::with_root_cert(url, ca)?);
        }
        match self.command {
            Command::Serve {
                listen,
                names,
                cert_lifetime_seconds,
                heartbeat_seconds,
                api_addr,
                watch_buffer,
                watch_stall_ms,
                app_log_followers,
                database_pool,
                replica_heartbeat_ms,
                replica_dead_after_ms,
                health_addr,
                retain_events_days,
                retain_events_per_cluster,
                retain_logs_days,
                retain_log_bytes_per_cluster,
                retention_interval_seconds,
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
                        app_log_followers,
                        database_url: self.database_url,
                        database_pool,
                        replica_heartbeat: Duration::from_millis(replica_heartbeat_ms.max(50)),
                        replica_dead_after: Duration::from_millis(replica_dead_after_ms),
                        health_listen: health_addr,
                        retention: hub::store::Retention::from_flags(
                            retain_events_days,
                            retain_events_per_cluster,
                            retain_logs_days,
                            retain_log_bytes_per_cluster,
                        ),
                        retention_interval: Duration::from_secs(retention_interval_seconds),
                        ..HubConfig::new(data)
                    };
                    let hub = hub::Hub::start(config).await?;
                    println!("listening on {} (CA {})", hub.url(), hub.ca_hash());
                    if let Some(api) = hub.api_address() {
                        println!("API on https://{api}");
                    }
                    if let Some(health) = hub.health_address() {
                        println!("health on http://{health} (/livez, /readyz)");
                    }
                    if let Some(replica) = hub.replica_id() {
                        println!("replica {replica}");
                    }
                    shutdown_on_signals().await;
                    hub.stop().await;
                    Ok::<_, Box<dyn std::error::Error>>(())
                })?;
            }
            Command::ApiKey {
                command: ApiKeyCommand::Create { name },
            } if self.hub.is_none() => {
                let location =
                    hub::store_location(&data, self.database_url.as_deref(), hub::store::DEFAULT_POOL_SIZE);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let (row, secret) = runtime.block_on(async {
                    let store = hub::open_store_at(&location).await?;
                    hub::api::create_api_key(&store, &name).await
                })?;
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
                println!("start the hub:   shapeblock-hub --data-dir {dir} serve --api-addr 127.0.0.1:7444");
                println!("first API key:   shapeblock-hub --data-dir {dir} api-key create --name admin");
                println!(
                    "install line:    shapeblock-hub --hub https://127.0.0.1:7444 --api-key sbk_… --ca {dir}/ca.pem token create --cluster dev"
                );
            }
            Command::CaHash => {
                let ca = hub::pki::Ca::load_or_create(&data)?;
                println!("{}", shapeblock_proto::ca_hash(&ca.cert_der));
            }
            command => {
                let target = Target {
                    hub: self.hub,
                    api_key: self.api_key,
                    ca: self.ca.unwrap_or_else(|| data.join("ca.pem")),
                };
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(remote(target, command))?;
            }
        }
        Ok(())
    }
}

/// Where the API is and how to call it.
struct Target {
    hub: Option<String>,
    api_key: Option<String>,
    ca: PathBuf,
}

impl Target {
    async fn connect(self) -> Result<hub::api::Client, Box<dyn std::error::Error>> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let address = self.hub.ok_or(
            "this command goes through the hub's API: give --hub https://HOST:PORT (or SHAPEBLOCK_HUB_API)",
        )?;
        let key = self
            .api_key
            .ok_or("give an API key: --api-key (or SHAPEBLOCK_HUB_API_KEY); the first one comes from `shapeblock-hub --data-dir DIR api-key create --name NAME`")?;
        let ca = std::fs::read_to_string(&self.ca).map_err(|e| {
            format!(
                "the hub's CA {}: {e} (give --ca or SHAPEBLOCK_HUB_CA)",
                self.ca.display()
            )
        })?;
        Ok(hub::api::connect(&address, &key, &ca).await?)
    }
}

/// A status as the CLI prints it.
fn said(status: tonic::Status) -> Box<dyn std::error::Error> {
    format!("{:?}: {}", status.code(), status.message()).into()
}

fn queued(accepted: api::CommandAccepted, what: &str) {
    let again = if accepted.replayed {
        " (already queued by an earlier request with this idempotency key)"
    } else {
        ""
    };
    println!(
        "queued command {} for {}{what}{again}",
        accepted.command_id, accepted.cluster_id
    );
}

/// The manifests of YAML files (multi-document), each as its own YAML.
fn manifests_of(files: &[PathBuf]) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut manifests = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        for document in serde_yaml::Deserializer::from_str(&text) {
            let value =
                serde_yaml::Value::deserialize(document).map_err(|e| format!("{}: {e}", file.display()))?;
            if !value.is_null() {
                manifests.push(serde_yaml::to_string(&value)?);
            }
        }
    }
    Ok(manifests)
}

fn event_line(e: &api::Event) -> String {
    let kind = e
        .kind()
        .as_str_name()
        .trim_start_matches("EVENT_KIND_")
        .to_lowercase();
    let detail = match e.kind() {
        api::EventKind::Phase => format!("{} {} {}", e.phase, e.reason, e.message),
        api::EventKind::CommandResult => format!(
            "command {} {}: {}",
            e.command_id,
            if e.ok { "ok" } else { "failed" },
            e.message
        ),
        api::EventKind::CommandQueued => format!("command {} {}", e.command_id, e.message),
        _ => e.message.clone(),
    };
    format!(
        "{}\t{}\t{kind}\t{}\t{}",
        e.id,
        e.cluster_id,
        e.object,
        detail.trim_end()
    )
}

async fn remote(target: Target, command: Command) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = target.connect().await?;
    match command {
        Command::Serve { .. } | Command::DevCerts { .. } | Command::CaHash => {
            unreachable!("local commands run on the data directory")
        }
        Command::ApiKey { command } => match command {
            ApiKeyCommand::Create { name } => {
                let made = client
                    .create_api_key(api::CreateApiKeyRequest { name })
                    .await
                    .map_err(said)?
                    .into_inner();
                let key = made.key.unwrap_or_default();
                eprintln!("API key {} ({}) created; it is shown once:", key.id, key.name);
                println!("{}", made.secret);
            }
            ApiKeyCommand::List => {
                let keys = client
                    .list_api_keys(api::ListApiKeysRequest {})
                    .await
                    .map_err(said)?
                    .into_inner()
                    .keys;
                for k in keys {
                    let state = if k.revoked_at > 0 { "revoked" } else { "valid" };
                    println!("{}\t{}\t{state}\tcreated {}", k.id, k.name, k.created_at);
                }
            }
            ApiKeyCommand::Revoke { id } => {
                client
                    .revoke_api_key(api::RevokeApiKeyRequest { id: id.clone() })
                    .await
                    .map_err(said)?;
                println!("API key {id} revoked");
            }
        },
        Command::Token { command } => match command {
            TokenCommand::Create {
                cluster,
                ttl,
                hub_address,
                chart,
                namespace,
            } => {
                let made = client
                    .create_enrollment_token(api::CreateEnrollmentTokenRequest {
                        cluster_id: cluster,
                        ttl_seconds: ttl,
                        hub_address,
                        chart,
                        namespace,
                    })
                    .await
                    .map_err(said)?
                    .into_inner();
                println!("{}", made.install_line);
            }
            TokenCommand::List { cluster } => {
                let tokens = client
                    .list_enrollment_tokens(api::ListEnrollmentTokensRequest {
                        cluster_id: cluster.unwrap_or_default(),
                    })
                    .await
                    .map_err(said)?
                    .into_inner()
                    .tokens;
                for t in tokens {
                    let state = if t.used { "used" } else { "unused" };
                    println!("{}\t{}\t{state}\texpires {}", t.id, t.cluster_id, t.expires_at);
                }
            }
            TokenCommand::Revoke { id } => {
                client
                    .revoke_enrollment_token(api::RevokeEnrollmentTokenRequest { id: id.clone() })
                    .await
                    .map_err(said)?;
                println!("token {id} revoked");
            }
        },
        Command::Apply {
            cluster,
            file,
            idempotency_key,
        } => {
            let manifest = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let accepted = client
                .apply(api::ApplyRequest {
                    cluster_id: cluster,
                    manifest,
                    idempotency_key,
                })
                .await
                .map_err(said)?
                .into_inner();
            queued(accepted, "");
        }
        Command::Delete {
            cluster,
            kind,
            namespace,
            name,
        } => {
            let accepted = client
                .delete(api::DeleteRequest {
                    cluster_id: cluster,
                    object: Some(api::ObjectRef {
                        kind,
                        namespace,
                        name,
                    }),
                    idempotency_key: String::new(),
                })
                .await
                .map_err(said)?
                .into_inner();
            queued(accepted, "");
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
            let manifests = manifests_of(&files)?;
            let scope = api::PruneScope {
                projects: prune_projects,
                kinds: prune_kinds,
                namespaces: prune_namespaces,
            };
            let what = if prune {
                format!(
                    "prune in projects {:?}, kinds {:?}, namespaces {:?}",
                    scope.projects, scope.kinds, scope.namespaces
                )
            } else {
                "no prune".into()
            };
            let count = manifests.len();
            let accepted = client
                .sync(api::SyncRequest {
                    cluster_id: cluster,
                    manifests,
                    prune: prune.then_some(scope),
                    prune_max_percent: prune_max_percent.unwrap_or(0),
                    force,
                    idempotency_key: String::new(),
                })
                .await
                .map_err(said)?
                .into_inner();
            queued(accepted, &format!(": {count} manifests, {what}"));
        }
        Command::Cancel {
            cluster,
            namespace,
            build,
        } => {
            let accepted = client
                .cancel_build(api::CancelBuildRequest {
                    cluster_id: cluster,
                    namespace,
                    build,
                    idempotency_key: String::new(),
                })
                .await
                .map_err(said)?
                .into_inner();
            queued(accepted, "");
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
            let accepted = client
                .set_config(api::SetConfigRequest {
                    cluster_id: cluster,
                    namespace,
                    app,
                    set,
                    unset,
                    idempotency_key: String::new(),
                })
                .await
                .map_err(said)?
                .into_inner();
            queued(accepted, &format!(" ({names} to set)"));
        }
        Command::Clusters => {
            let clusters = client
                .list_clusters(api::ListClustersRequest {})
                .await
                .map_err(said)?
                .into_inner()
                .clusters;
            for c in clusters {
                let state = match (c.connected, c.revoked) {
                    (_, true) => "revoked",
                    (true, false) => "connected",
                    (false, false) => "disconnected",
                };
                let ago = shapeblock_proto::now_unix().saturating_sub(c.last_heartbeat);
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
                let version = if c.agent_version.is_empty() {
                    "-"
                } else {
                    &c.agent_version
                };
                let skew = c
                    .clock_skew_ms
                    .map(|ms| format!("clock skew {ms} ms"))
                    .unwrap_or_else(|| "clock skew unknown".into());
                println!(
                    "{}\t{state}\tepoch {}\tlast seen {ago}s ago\tagent {version}\t{inventory}\t{skew}",
                    c.id, c.session_epoch
                );
            }
        }
        Command::Revoke { cluster } => {
            client
                .revoke_cluster(api::RevokeClusterRequest {
                    cluster_id: cluster.clone(),
                })
                .await
                .map_err(said)?;
            println!(
                "cluster {cluster} revoked: its certificates are refused; a new token lets it join again"
            );
        }
        Command::Objects { cluster } => {
            let objects = client
                .list_objects(api::ListObjectsRequest { cluster_id: cluster })
                .await
                .map_err(said)?
                .into_inner()
                .objects;
            for o in objects {
                println!("{}\t{}\t{}\t{}", o.key, o.phase, o.reason, o.message);
            }
        }
        Command::Inspect { cluster, id } => {
            let c = client
                .get_command(api::GetCommandRequest {
                    cluster_id: cluster,
                    command_id: id,
                })
                .await
                .map_err(said)?
                .into_inner();
            let state = c
                .state()
                .as_str_name()
                .trim_start_matches("COMMAND_STATE_")
                .to_lowercase();
            println!(
                "{}\t{}\t{}\t{state}\t{}",
                c.command_id, c.kind, c.object, c.message
            );
        }
        Command::Events {
            cluster,
            after,
            follow,
        } => {
            let mut after = after;
            loop {
                let mut stream = client
                    .watch_events(api::WatchEventsRequest {
                        cluster_id: cluster.clone().unwrap_or_default(),
                        after_id: after,
                    })
                    .await
                    .map_err(said)?
                    .into_inner();
                loop {
                    // Without --follow: what is recorded now, then stop once the stream is quiet.
                    let next = if follow {
                        stream.message().await
                    } else {
                        match tokio::time::timeout(Duration::from_millis(500), stream.message()).await {
                            Ok(next) => next,
                            Err(_) => return Ok(()),
                        }
                    };
                    match next {
                        Ok(Some(e)) => {
                            println!("{}", event_line(&e));
                            after = e.id;
                        }
                        Ok(None) => return Ok(()),
                        Err(status) if follow && status.code() == tonic::Code::ResourceExhausted => {
                            eprintln!("[{}; resuming after {after}]", status.message());
                            break;
                        }
                        Err(status) => return Err(said(status)),
                    }
                }
            }
        }
        Command::Logs {
            cluster,
            stream,
            follow,
        } => {
            use std::io::Write;
            let mut offset = 0;
            let mut follower = if follow {
                Some(
                    client
                        .follow_log(api::FollowLogRequest {
                            cluster_id: cluster.clone(),
                            stream: stream.clone(),
                            offset,
                        })
                        .await
                        .map_err(said)?
                        .into_inner(),
                )
            } else {
                None
            };
            loop {
                let data = match &mut follower {
                    Some(follower) => match follower.message().await.map_err(said)? {
                        Some(data) => data,
                        None => break,
                    },
                    None => client
                        .read_log(api::ReadLogRequest {
                            cluster_id: cluster.clone(),
                            stream: stream.clone(),
                            offset,
                            limit: 0,
                        })
                        .await
                        .map_err(said)?
                        .into_inner(),
                };
                if offset == 0 && data.offset > 0 && data.offset == data.first_offset {
                    eprintln!("[bytes 0..{} pruned by the hub's retention]", data.offset);
                }
                let mut stdout = std::io::stdout();
                stdout.write_all(&data.data)?;
                stdout.flush()?;
                if data.truncated {
                    eprintln!("[log truncated: its pod was gone before the rest could be read]");
                }
                if data.eof && !data.truncated {
                    eprintln!("[end of log]");
                }
                let moved = data.next_offset != offset;
                offset = data.next_offset;
                if data.eof || (follower.is_none() && !moved) {
                    break;
                }
            }
        }
        Command::AppLogs {
            cluster,
            namespace,
            app,
            process,
            container,
            tail,
            since_seconds,
        } => {
            use std::io::Write;
            let mut follower = client
                .follow_app_logs(api::FollowAppLogsRequest {
                    cluster_id: cluster,
                    namespace,
                    app,
                    process,
                    container,
                    since_seconds,
                    tail_lines: tail,
                })
                .await
                .map_err(said)?
                .into_inner();
            // Lines split across chunks are put together per substream before printing.
            let mut partial: std::collections::HashMap<(String, String), Vec<u8>> = Default::default();
            while let Some(data) = follower.message().await.map_err(said)? {
                let key = (data.pod.clone(), data.container.clone());
                if data.truncated {
                    eprintln!(
                        "[{}/{}: {} bytes dropped by the agent's rate limit]",
                        key.0, key.1, data.dropped
                    );
                }
                let buffer = partial.entry(key.clone()).or_default();
                buffer.extend_from_slice(&data.data);
                let mut stdout = std::io::stdout();
                while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    write!(stdout, "{}/{}: ", key.0, key.1)?;
                    stdout.write_all(&line)?;
                }
                stdout.flush()?;
                if data.eof {
                    partial.remove(&key);
                    eprintln!("[{}/{}: ended]", key.0, key.1);
                }
            }
        }
    }
    Ok(())
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
