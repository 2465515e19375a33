//! The agent as the cluster would run it: under its own ServiceAccount with exactly the RBAC
//! rules of [`shapeblock_agent::rbac`] (never as `system:masters`), as a separate process, so that a
//! missing permission fails a test and restarts are real restarts.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::kubeconfig::{http_get, write_token_kubeconfig};
use super::{Error, ManagedProcess, Result};
use shapeblock_agent::rbac;

const MANAGER: &str = "shapeblock-testenv";

/// Installs the agent's namespace, ServiceAccount, RBAC and the Team ClusterRoles, and returns
/// a kubeconfig (written under `dir`) with a fresh token for the ServiceAccount.
pub async fn install_agent_identity(
    admin: &Client,
    admin_kubeconfig: &Path,
    namespace: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let namespace_object: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": namespace}}))
            .expect("static namespace");
    apply(&Api::<Namespace>::all(admin.clone()), &namespace_object).await?;
    let account: ServiceAccount = serde_json::from_value(
        serde_json::json!({"metadata": {"name": rbac::AGENT_NAME, "namespace": namespace}}),
    )
    .expect("static service account");
    apply(
        &Api::<ServiceAccount>::namespaced(admin.clone(), namespace),
        &account,
    )
    .await?;
    apply(
        &Api::<ClusterRole>::all(admin.clone()),
        &rbac::agent_cluster_role(),
    )
    .await?;
    apply(
        &Api::<ClusterRoleBinding>::all(admin.clone()),
        &rbac::agent_cluster_role_binding(namespace),
    )
    .await?;
    apply(
        &Api::<Role>::namespaced(admin.clone(), namespace),
        &rbac::agent_role(namespace),
    )
    .await?;
    apply(
        &Api::<RoleBinding>::namespaced(admin.clone(), namespace),
        &rbac::agent_role_binding(namespace),
    )
    .await?;
    for role in rbac::team_cluster_roles() {
        apply(&Api::<ClusterRole>::all(admin.clone()), &role).await?;
    }
    apply(
        &Api::<ClusterRole>::all(admin.clone()),
        &rbac::helm_release_cluster_role(),
    )
    .await?;
    service_account_kubeconfig(admin, admin_kubeconfig, namespace, rbac::AGENT_NAME, dir).await
}

/// A kubeconfig (written under `dir`) with a fresh TokenRequest token for ServiceAccount
/// `namespace/name`, as a Pod of that ServiceAccount would authenticate.
pub async fn service_account_kubeconfig(
    admin: &Client,
    admin_kubeconfig: &Path,
    namespace: &str,
    name: &str,
    dir: &Path,
) -> Result<PathBuf> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(24 * 3600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(admin.clone(), namespace)
        .create_token_request(name, &PostParams::default(), &request)
        .await?
        .status
        .map(|s| s.token)
        .ok_or_else(|| Error::Kubeconfig("TokenRequest returned no token".into()))?;
    let path = dir.join(format!("{name}-{namespace}.kubeconfig"));
    write_token_kubeconfig(&path, admin_kubeconfig, &token)?;
    Ok(path)
}

async fn apply<K>(api: &Api<K>, object: &K) -> Result<()>
where
    K: Resource + Clone + DeserializeOwned + Serialize + std::fmt::Debug,
{
    api.patch(
        &object.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await?;
    Ok(())
}

/// The flags by which a test's or a bench's agent joins a hub at `url`: heartbeats and
/// reconnect back-off short enough that an outage heals within a test's patience, and no
/// registry Secret (the tests that push set their own).
pub fn hub_flags(url: &str, token: &str, ca_hash: &str, log: &str) -> Vec<String> {
    vec![
        format!("--log={log}"),
        format!("--hub-address={url}"),
        format!("--enroll-token={token}"),
        format!("--ca-hash={ca_hash}"),
        "--heartbeat-seconds=2".into(),
        "--reconnect-max-seconds=1".into(),
        "--registry-secret=".into(),
    ]
}

/// A running `shapeblock-agent run`.
pub struct AgentProcess {
    process: ManagedProcess,
    http: String,
}

/// The agent binary a bench runs and the flags it adds, from the environment: `AGENT_BINARY`
/// instead of `default_binary` (a profiler's wrapper script that execs the agent, another
/// build), and `AGENT_FLAGS` (whitespace-separated), to compare settings in the same
/// conditions.
pub fn bench_overrides(default_binary: &str) -> (PathBuf, Vec<String>) {
    let binary = std::env::var("AGENT_BINARY").unwrap_or_else(|_| default_binary.into());
    let flags = std::env::var("AGENT_FLAGS")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    (PathBuf::from(binary), flags)
}

impl AgentProcess {
    /// Starts the agent binary with `kubeconfig` and extra flags, and waits until `/readyz`.
    ///
    /// As with every [`ManagedProcess`], the agent dies with the thread that starts it.
    pub async fn start(
        binary: &Path,
        kubeconfig: &Path,
        namespace: &str,
        log: &Path,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_with_env(binary, kubeconfig, namespace, log, extra, &[]).await
    }

    /// [`AgentProcess::start`] with environment variables (as a Pod spec sets them); the flags
    /// given here win over them.
    pub async fn start_with_env(
        binary: &Path,
        kubeconfig: &Path,
        namespace: &str,
        log: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Result<Self> {
        let port = std::net::TcpListener::bind(("127.0.0.1", 0))
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::io("find a free port", e))?
            .port();
        let http = format!("127.0.0.1:{port}");
        let mut args = vec![
            "run".to_string(),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--agent-namespace={namespace}"),
            format!("--http-addr={http}"),
            "--shutdown-timeout-seconds=10".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut process = ManagedProcess::spawn_with_env("shapeblock-agent", binary, &args, env, log)?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = process.exited() {
                return Err(Error::Exited {
                    name: "shapeblock-agent".into(),
                    status: status.to_string(),
                    log: log.display().to_string(),
                    tail: process.log_tail(30),
                });
            }
            if matches!(http_get(&http, "/readyz").await, Some((200, _))) {
                return Ok(Self { process, http });
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    name: "shapeblock-agent".into(),
                    seconds: 30,
                    log: log.display().to_string(),
                    tail: process.log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Installs the agent's identity on the cluster `admin` reaches and starts `binary` with
    /// `flags` (say [`hub_flags`]) under it; its log is `agent.log` in `work_dir`.
    pub async fn start_installed(
        binary: &Path,
        admin: &Client,
        admin_kubeconfig: &Path,
        work_dir: &Path,
        flags: &[String],
    ) -> Result<Self> {
        let kubeconfig = install_agent_identity(admin, admin_kubeconfig, "shapeblock", work_dir).await?;
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        Self::start(
            binary,
            &kubeconfig,
            "shapeblock",
            &work_dir.join("agent.log"),
            &flags,
        )
        .await
    }

    /// `GET` one of the agent's HTTP endpoints: status and body.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(&self.http, path).await
    }

    /// The value of a counter in `/metrics` (0 when absent), e.g.
    /// `shapeblock_reconciles_total{kind="App"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        let Some((200, text)) = self.get("/metrics").await else {
            return 0.0;
        };
        text.lines()
            .find_map(|line| {
                line.strip_prefix(series)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or(0.0)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Peak resident memory (VmHWM) so far, in KiB.
    /// Established TCP connections of the agent to `port`.
    pub fn tcp_connections_to(&self, port: u16) -> usize {
        super::process::tcp_connections_to(self.pid(), port)
    }

    pub fn peak_rss_kib(&self) -> u64 {
        super::process::peak_rss_kib(self.pid()).unwrap_or(0)
    }

    /// The agent's log so far.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// Sends SIGTERM and waits up to `grace` for the exit; the exit status, or `None` if the
    /// agent had to be killed.
    pub fn terminate(mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.process.pid() as libc::pid_t, libc::SIGTERM) };
        self.wait_exit(grace)
    }

    /// Waits up to `timeout` for the agent to exit; its exit status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.process.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no shutdown at all, as when a node dies.
    pub fn kill(mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.process.pid() as libc::pid_t, libc::SIGKILL) };
        while self.process.exited().is_none() {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
