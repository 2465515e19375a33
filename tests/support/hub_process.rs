//! The hub as a process with its API on (`shapeblock-hub serve --api-addr`), its first API
//! key made by the CLI on the data directory, and a client that knows only the proto; an agent
//! enrolled with the install line the API prints.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shapeblock_hub::api::v1 as api;
use shapeblock_hub::api::v1::hub_client::HubClient;
use shapeblock_testenv::agent::AgentProcess;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use super::agent::{AGENT_NS, Env};
use super::unique_name;

/// A `shapeblock-hub serve` process with its API on, in its own data directory.
pub struct HubProcess {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub agent_url: String,
    pub api_url: String,
    pub ca_pem: String,
    /// The first API key, made by the CLI on the data directory.
    pub key: String,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn hub_cli(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

impl HubProcess {
    pub async fn start(extra: &[&str]) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let database = super::hub::database_for_tests(dir.path());
        let database: Vec<String> = database
            .map(|url| vec!["--database-url".to_string(), url])
            .unwrap_or_default();
        let database: Vec<&str> = database.iter().map(String::as_str).collect();
        let made = hub_cli(
            dir.path(),
            &[&database[..], &["api-key", "create", "--name", "test"]].concat(),
        );
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        let key = String::from_utf8(made.stdout).unwrap().trim().to_string();
        assert!(key.starts_with("sbk_"), "{key}");
        let (port, api_port) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("hub.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
            .arg("--data-dir")
            .arg(dir.path())
            .args(&database)
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--api-addr",
                &format!("127.0.0.1:{api_port}"),
                "--heartbeat-seconds",
                "2",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        for p in [port, api_port] {
            while tokio::net::TcpStream::connect(("127.0.0.1", p)).await.is_err() {
                assert!(
                    Instant::now() < deadline,
                    "the hub process did not listen: {}",
                    std::fs::read_to_string(dir.path().join("hub.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        Self {
            child,
            dir,
            agent_url: format!("https://127.0.0.1:{port}"),
            api_url: format!("https://127.0.0.1:{api_port}"),
            ca_pem,
            key,
        }
    }

    pub async fn channel(&self, endpoint: impl FnOnce(Endpoint) -> Endpoint) -> Channel {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("127.0.0.1");
        endpoint(Endpoint::from_shared(self.api_url.clone()).unwrap())
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// A client with the hub's first key.
    pub async fn client(&self) -> Client {
        self.client_with(Some(&self.key)).await
    }

    pub async fn client_with(&self, key: Option<&str>) -> Client {
        HubClient::with_interceptor(self.channel(|e| e).await, Bearer(key.map(str::to_string)))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone)]
pub struct Bearer(pub Option<String>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(key) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        Ok(request)
    }
}

pub type Client = HubClient<InterceptedService<Channel, Bearer>>;

/// Waits until the hub's object status has `key` (`Kind/namespace/name`) of `cluster` in
/// `phase`, as the product's UI would see it.
pub async fn wait_phase_at_hub(client: &Client, cluster: &str, key: &str, phase: &str) -> api::ObjectStatus {
    super::eventually(
        Duration::from_secs(45),
        &format!("{key} {phase} at the hub"),
        || {
            let mut client = client.clone();
            let cluster = cluster.to_string();
            async move {
                let objects = client
                    .list_objects(api::ListObjectsRequest { cluster_id: cluster })
                    .await
                    .ok()?
                    .into_inner()
                    .objects;
                objects.into_iter().find(|o| o.key == key && o.phase == phase)
            }
        },
    )
    .await
    .0
}

/// The agent enrolled with the install line the API printed for `token`.
pub async fn agent_from_install_line(
    env: &Env,
    hub: &HubProcess,
    token: &api::CreateEnrollmentTokenResponse,
) -> AgentProcess {
    agent_from_install_line_with(env, hub, token, &[]).await
}

/// [`agent_from_install_line`] with more agent flags.
pub async fn agent_from_install_line_with(
    env: &Env,
    hub: &HubProcess,
    token: &api::CreateEnrollmentTokenResponse,
    extra: &[&str],
) -> AgentProcess {
    let line = &token.install_line;
    let value = |key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key} in {line}"))
            .to_string()
    };
    assert_eq!(value("enrollment.token"), token.secret);
    assert_eq!(value("hub.address"), hub.agent_url);
    let log = env.dir.join(format!("{}.log", unique_name("api-agent")));
    let args = [
        "--log=shapeblock_agent=debug,info".to_string(),
        format!("--hub-address={}", value("hub.address")),
        format!("--enroll-token={}", value("enrollment.token")),
        format!("--ca-hash={}", value("hub.caHash")),
        "--heartbeat-seconds=2".to_string(),
        "--reconnect-max-seconds=1".to_string(),
        "--registry-secret=".to_string(),
    ];
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    AgentProcess::start(
        Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
        &env.kubeconfig,
        AGENT_NS,
        &log,
        &args,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"))
}
