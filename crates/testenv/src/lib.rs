//! A real Kubernetes cluster for integration tests and the local demo, in the spirit of
//! controller-runtime's envtest: etcd, kube-apiserver and kube-controller-manager built from Go
//! modules by `tools/build-control-plane.sh`, started on loopback with random ports, their own
//! PKI and a temp directory, with the ShapeBlock CRDs installed. Around it, a simulated cluster:
//! kube-scheduler and kwok nodes whose pods run and finish ([`nodes`]), their container logs
//! through the real pod log API ([`kubelet`]), the real k3s helm-controller, and the real helm
//! CLI running its install Jobs ([`helm_runner`]). Opt-in, one real node beside them: a kubelet
//! with containerd and runc ([`realnode`]).
//!
//! This is test support: production code never calls it (the agent and the hub crates have it
//! as a dev-dependency only; tests/arrows.rs checks it).
//!
//! Past 600 lines: the control plane's start-up order (PKI, etcd, apiserver, controllers, CRDs,
//! helm-controller) is one sequence; its parts with their own concern are the modules above.

pub mod agent;
pub mod audit;
pub mod buildfarm;
pub mod cli;
pub mod fleet;
pub mod haproxy;
pub mod helm_runner;
pub mod images;
mod kubeconfig;
pub mod kubelet;
pub mod nodes;
mod pki;
pub mod postgres;
mod process;
pub mod proxy;
pub mod realnode;
pub mod registry;
pub mod stand_in;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};

pub use kubelet::{ContainerRef, logs};
pub use nodes::{PodOutcome, PodSelector, StageHandle, set_pod_outcome};
pub use pki::{CertificateAuthority, CertifiedKey};
pub use process::{ManagedProcess, free_port};
pub use realnode::{SharedRealNode, real_node};

/// The repository's root: `crds/`, `charts/` and `examples/` live there, two levels above this
/// crate.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Errors of the test control plane. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{binary} not found in {dir}: build the control plane first with `tools/build-control-plane.sh` \
         (or set SHAPEBLOCK_BIN_DIR to a directory with etcd, kube-apiserver and kube-controller-manager)"
    )]
    MissingBinary { binary: String, dir: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
    #[error("certificate generation failed: {0}")]
    Pki(String),
    #[error("{name} exited during start-up ({status}); last log lines ({log}):\n{tail}")]
    Exited {
        name: String,
        status: String,
        log: String,
        tail: String,
    },
    #[error("{name} was not ready within {seconds}s; last log lines ({log}):\n{tail}")]
    NotReady {
        name: String,
        seconds: u64,
        log: String,
        tail: String,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("CRD file {path}: {message}")]
    Crd { path: String, message: String },
    #[error("the shared control plane failed to start: {0}")]
    Shared(String),
    #[error("real node: {0}")]
    RealNode(String),
    #[error("Postgres: {0}")]
    Postgres(String),
}

impl Error {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Start-up settings. `Default` finds the binaries in the build cache and the CRDs in `crds/`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Directory with `etcd`, `kube-apiserver`, `kube-controller-manager`.
    pub bin_dir: PathBuf,
    /// Directory of CRD YAML files to install and wait for; `None` installs nothing.
    pub crds_dir: Option<PathBuf>,
    /// Parent of the control plane's working directory (certificates, kubeconfigs, logs).
    pub work_root: PathBuf,
    /// Whether to start kube-controller-manager (namespace deletion, garbage collection, Jobs,
    /// Deployments, service-account tokens). Almost every test wants it.
    pub controller_manager: bool,
    /// How many simulated (kwok) nodes to run, with kube-scheduler and the kubelet log
    /// endpoint. 0 runs none: pods then stay Pending, as in a bare control plane.
    pub nodes: usize,
    /// Whether to run the k3s helm-controller (and the helm runner for its Jobs, which needs
    /// nodes). Its CRDs come from `helm_crds_dir`.
    pub helm_controller: bool,
    /// The helm-controller CRDs (fixtures of the pinned release).
    pub helm_crds_dir: PathBuf,
    /// How long each component may take to become ready.
    pub ready_timeout: Duration,
    /// Whether kube-apiserver writes an audit log of every request (see
    /// [`ControlPlane::audit_log`]); benches count a client's requests from it.
    pub audit: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bin_dir: default_bin_dir(),
            crds_dir: Some(workspace_root().join("crds")),
            work_root: default_work_root(),
            controller_manager: true,
            nodes: 2,
            helm_controller: true,
            helm_crds_dir: workspace_root().join("charts/shapeblock-agent/files/helm-controller-crds"),
            ready_timeout: Duration::from_secs(60),
            audit: false,
        }
    }
}

/// Where `tools/build-control-plane.sh` leaves the binaries: `$SHAPEBLOCK_BIN_DIR`, else
/// `$SHAPEBLOCK_CACHE/bin/current`, else `~/.cache/shapeblock/bin/current`.
pub fn default_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHAPEBLOCK_BIN_DIR") {
        return dir.into();
    }
    cache_dir().join("bin/current")
}

fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SHAPEBLOCK_CACHE") {
        return dir.into();
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    Path::new(&home).join(".cache/shapeblock")
}

/// etcd's data is on tmpfs when there is one: fsync-free and fast.
fn default_work_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}

const WORK_DIR_PREFIX: &str = "shapeblock-cp-";
const SERVICE_CIDR: &str = "10.96.0.0/16";
const SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const PORT_ATTEMPTS: usize = 5;
const FIELD_MANAGER: &str = "shapeblock-testenv";

/// The ClusterRole the helm-controller grants its Jobs (`--job-cluster-role`).
pub const HELM_JOB_CLUSTER_ROLE: &str = "shapeblock-helm-job";
const HELM_JOB_CLUSTER_ROLE_YAML: &str =
    include_str!("../../../charts/shapeblock-agent/files/helm-job-clusterrole.yaml");

/// A running control plane. Dropping it stops the processes and removes its directory.
pub struct ControlPlane {
    // Field order is drop order: the peers, controller-manager, apiserver, then etcd.
    helm_controller: Option<ManagedProcess>,
    kwok: Option<ManagedProcess>,
    scheduler: Option<ManagedProcess>,
    controller_manager: Option<ManagedProcess>,
    apiserver: ManagedProcess,
    etcd: ManagedProcess,
    work_dir: PathBuf,
    kubeconfig: PathBuf,
    server: String,
    ca: CertificateAuthority,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and (optionally) kube-controller-manager, waits until they
    /// are ready and installs the CRDs.
    ///
    /// The children die with the thread that calls this (see [`ManagedProcess::spawn`]).
    pub async fn start(options: Options) -> Result<Self> {
        for binary in ["etcd", "kube-apiserver", "kube-controller-manager"] {
            if !options.bin_dir.join(binary).is_file() {
                return Err(Error::MissingBinary {
                    binary: binary.into(),
                    dir: options.bin_dir.display().to_string(),
                });
            }
        }
        remove_stale_work_dirs(&options.work_root, WORK_DIR_PREFIX);
        let work_dir = options.work_root.join(format!(
            "{WORK_DIR_PREFIX}{}-{}",
            std::process::id(),
            unique_suffix()
        ));
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| Error::io(format!("create {}", work_dir.display()), e))?;

        let ca = CertificateAuthority::new("shapeblock-test-ca")?;
        let files = write_pki(&work_dir, &ca)?;

        let (etcd, etcd_url) = start_etcd(&options, &work_dir).await?;
        let kubeconfig = work_dir.join("admin.kubeconfig");
        let (apiserver, server) =
            start_apiserver(&options, &work_dir, &files, &etcd_url, &ca, &kubeconfig).await?;

        let mut plane = Self {
            helm_controller: None,
            kwok: None,
            scheduler: None,
            controller_manager: None,
            apiserver,
            etcd,
            work_dir,
            kubeconfig,
            server,
            ca,
        };
        let client = plane.client().await?;
        // CRDs first: the garbage collector and quota controllers learn new resources only on
        // their 30-second discovery resync, as in a real cluster where CRDs predate the test.
        if let Some(dir) = &options.crds_dir {
            install_crds(&client, dir).await?;
        }
        if options.controller_manager {
            plane.controller_manager = Some(plane.start_controller_manager(&options, &files)?);
            wait_for_default_service_account(
                &client,
                options.ready_timeout,
                plane.controller_manager.as_ref(),
            )
            .await?;
        }
        if options.nodes > 0 {
            plane.start_nodes(&options, &client).await?;
        }
        if options.helm_controller {
            plane.start_helm_controller(&options, &client).await?;
        }
        Ok(plane)
    }

    /// The kubelet endpoint, kube-scheduler and kwok, then waits for the nodes to be Ready.
    async fn start_nodes(&mut self, options: &Options, client: &Client) -> Result<()> {
        let kubelet = kubelet::KubeletServer::start(&self.ca, &self.kubeconfig).await?;
        let processes = nodes::start(
            client,
            &options.bin_dir,
            &self.work_dir,
            &self.server,
            &self.ca,
            options.nodes,
            kubelet.port(),
        )
        .await?;
        self.scheduler = Some(processes.scheduler);
        let kwok = self.kwok.insert(processes.kwok);
        nodes::wait_ready(client, options.nodes, options.ready_timeout, kwok).await
    }

    /// The k3s helm-controller with our job ClusterRole, and the runner for its Jobs' pods.
    async fn start_helm_controller(&mut self, options: &Options, client: &Client) -> Result<()> {
        for binary in ["helm-controller", "helm"] {
            if !options.bin_dir.join(binary).is_file() {
                return Err(Error::MissingBinary {
                    binary: binary.into(),
                    dir: options.bin_dir.display().to_string(),
                });
            }
        }
        install_crds(client, &options.helm_crds_dir).await?;
        let role: k8s_openapi::api::rbac::v1::ClusterRole = serde_yaml::from_str(HELM_JOB_CLUSTER_ROLE_YAML)
            .map_err(|e| Error::Crd {
                path: "charts/shapeblock-agent/files/helm-job-clusterrole.yaml".into(),
                message: e.to_string(),
            })?;
        Api::<k8s_openapi::api::rbac::v1::ClusterRole>::all(client.clone())
            .patch(
                HELM_JOB_CLUSTER_ROLE,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&role),
            )
            .await?;
        // It runs as an admin, as in k3s where it is part of the server.
        let user = self
            .ca
            .client_cert("shapeblock-helm-controller", Some("system:masters"))?;
        let kubeconfig = self.work_dir.join("helm-controller.kubeconfig");
        kubeconfig::write(
            &kubeconfig,
            &self.server,
            self.ca.cert_pem(),
            &user,
            "shapeblock-test",
        )?;
        self.helm_controller = Some(ManagedProcess::spawn(
            "helm-controller",
            &options.bin_dir.join("helm-controller"),
            &[
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--job-cluster-role={HELM_JOB_CLUSTER_ROLE}"),
            ],
            &self.work_dir.join("helm-controller.log"),
        )?);
        helm_runner::start(
            client.clone(),
            self.server.clone(),
            options.bin_dir.join("helm"),
            self.work_dir.clone(),
        )
        .await;
        Ok(())
    }

    /// Restarts kube-apiserver on the same port and data (SIGTERM, then SIGKILL after 5 s), as a
    /// control-plane upgrade or crash does; returns once it answers `/readyz` again, with how
    /// long it was away.
    pub async fn restart_apiserver(&mut self) -> Result<Duration> {
        let started = Instant::now();
        self.apiserver.restart(Duration::from_secs(5))?;
        let client = self.client().await?;
        wait_ready(&mut self.apiserver, Duration::from_secs(60), || readyz(&client)).await?;
        Ok(started.elapsed())
    }

    /// The apiserver's audit log, if [`Options::audit`] asked for one (read it with
    /// [`audit::requests_by`]).
    pub fn audit_log(&self) -> Option<PathBuf> {
        let path = self.work_dir.join(AUDIT_LOG);
        path.exists().then_some(path)
    }

    /// The admin kubeconfig (user in `system:masters`).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The apiserver URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> &str {
        &self.server
    }

    /// The directory with certificates, kubeconfigs and component logs.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The cluster CA, to issue more client certificates (other users and groups).
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// Process ids of the components, for measuring them.
    pub fn pids(&self) -> Vec<(String, u32)> {
        [
            Some(&self.etcd),
            Some(&self.apiserver),
            self.controller_manager.as_ref(),
            self.scheduler.as_ref(),
            self.kwok.as_ref(),
            self.helm_controller.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|p| (p.name().to_owned(), p.pid()))
        .collect()
    }

    /// Peak resident memory (VmHWM) of each running component so far, in KiB.
    pub fn peak_rss_kib(&self) -> Vec<(String, u64)> {
        self.pids()
            .into_iter()
            .filter_map(|(name, pid)| Some((name, process::peak_rss_kib(pid)?)))
            .collect()
    }

    /// A new admin client. Each tokio runtime needs its own: a client's connections live on
    /// the runtime that made them.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }

    fn start_controller_manager(&self, options: &Options, files: &PkiFiles) -> Result<ManagedProcess> {
        let kcm = self.ca.client_cert("system:kube-controller-manager", None)?;
        let kubeconfig = self.work_dir.join("controller-manager.kubeconfig");
        kubeconfig::write(
            &kubeconfig,
            &self.server,
            self.ca.cert_pem(),
            &kcm,
            "shapeblock-test",
        )?;
        let kubeconfig = kubeconfig.display().to_string();
        let args = vec![
            format!("--kubeconfig={kubeconfig}"),
            format!("--authentication-kubeconfig={kubeconfig}"),
            format!("--authorization-kubeconfig={kubeconfig}"),
            "--secure-port=0".into(),
            "--leader-elect=false".into(),
            // Each controller acts as its own ServiceAccount, as in a real cluster.
            "--use-service-account-credentials=true".into(),
            format!("--service-account-private-key-file={}", files.sa_key.display()),
            format!("--root-ca-file={}", files.ca_cert.display()),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--controllers=*".into(),
            // Test pods come and go quickly: collect them quickly too.
            "--concurrent-gc-syncs=10".into(),
            "--v=1".into(),
        ];
        ManagedProcess::spawn(
            "kube-controller-manager",
            &options.bin_dir.join("kube-controller-manager"),
            &args,
            &self.work_dir.join("kube-controller-manager.log"),
        )
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let grace = Duration::from_secs(5);
        for peer in [
            &mut self.helm_controller,
            &mut self.kwok,
            &mut self.scheduler,
            &mut self.controller_manager,
        ]
        .into_iter()
        .flatten()
        {
            peer.stop(grace);
        }
        self.apiserver.stop(grace);
        self.etcd.stop(grace);
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

/// Builds a client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path).map_err(|e| Error::Kubeconfig(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .map_err(|e| Error::Kubeconfig(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

/// What the suite shares: where the control plane is. Processes belong to a thread that never
/// ends, so they live exactly as long as the test process.
#[derive(Clone, Debug)]
pub struct SharedControlPlane {
    pub kubeconfig: PathBuf,
    pub server: String,
    pub work_dir: PathBuf,
    pub pids: Vec<(String, u32)>,
}

impl SharedControlPlane {
    /// A new admin client for the calling runtime.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig).await
    }
}

/// The control plane of this test process, started on first use with default options.
///
/// With `SHAPEBLOCK_TEST_KUBECONFIG` set, that cluster is used instead and nothing is started
/// (for example a control plane started once by `shapeblock-dev up`).
pub fn shared() -> Result<&'static SharedControlPlane> {
    static SHARED: OnceLock<Result<SharedControlPlane, String>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Some(path) = std::env::var_os("SHAPEBLOCK_TEST_KUBECONFIG") {
                let kubeconfig = PathBuf::from(path);
                return Ok(SharedControlPlane {
                    server: String::new(),
                    work_dir: kubeconfig.parent().map(Path::to_owned).unwrap_or_default(),
                    kubeconfig,
                    pids: Vec::new(),
                });
            }
            start_on_keeper_thread()
        })
        .as_ref()
        .map_err(|e| Error::Shared(e.clone()))
}

fn start_on_keeper_thread() -> Result<SharedControlPlane, String> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("control-plane".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = sender.send(Err(format!("tokio runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                match ControlPlane::start(Options::default()).await {
                    Ok(plane) => {
                        let _ = sender.send(Ok(SharedControlPlane {
                            kubeconfig: plane.kubeconfig.clone(),
                            server: plane.server.clone(),
                            work_dir: plane.work_dir.clone(),
                            pids: plane.pids(),
                        }));
                        // Keep the forking thread (and with it the children) and this runtime
                        // (the kubelet endpoint and the helm runner run on it) until exit.
                        let _keep = plane;
                        std::future::pending::<()>().await;
                    }
                    Err(e) => {
                        let _ = sender.send(Err(e.to_string()));
                    }
                }
            });
        })
        .map_err(|e| format!("spawn control-plane thread: {e}"))?;
    receiver
        .recv()
        .map_err(|_| "control-plane thread ended without a result".to_string())?
}

struct PkiFiles {
    ca_cert: PathBuf,
    serving_cert: PathBuf,
    serving_key: PathBuf,
    sa_key: PathBuf,
    sa_pub: PathBuf,
}

fn write_pki(dir: &Path, ca: &CertificateAuthority) -> Result<PkiFiles> {
    let serving = ca.serving_cert(
        "kube-apiserver",
        &[
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ],
        &pki::loopback_ips(SERVICE_IP),
    )?;
    let files = PkiFiles {
        ca_cert: dir.join("ca.crt"),
        serving_cert: dir.join("apiserver.crt"),
        serving_key: dir.join("apiserver.key"),
        sa_key: dir.join("service-account.key"),
        sa_pub: dir.join("service-account.pub"),
    };
    write_file(&files.ca_cert, ca.cert_pem())?;
    write_file(&files.serving_cert, &serving.cert_pem)?;
    write_private(&files.serving_key, &serving.key_pem)?;
    let (sa_key, sa_pub) = pki::signing_key_pair_pem()?;
    write_private(&files.sa_key, &sa_key)?;
    write_file(&files.sa_pub, &sa_pub)?;
    Ok(files)
}

async fn start_etcd(options: &Options, work_dir: &Path) -> Result<(ManagedProcess, String)> {
    let mut last_error = None;
    for attempt in 0..PORT_ATTEMPTS {
        let (client_port, peer_port) = (process::free_port()?, process::free_port()?);
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let data_dir = work_dir.join(format!("etcd-data-{attempt}"));
        let args = vec![
            "--name=default".into(),
            format!("--data-dir={}", data_dir.display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
            // Tests write little; keep etcd's memory small.
            "--quota-backend-bytes=2147483648".into(),
            "--snapshot-count=5000".into(),
        ];
        let mut etcd = ManagedProcess::spawn(
            "etcd",
            &options.bin_dir.join("etcd"),
            &args,
            &work_dir.join("etcd.log"),
        )?;
        let address = format!("127.0.0.1:{client_port}");
        let probe = || kubeconfig::http_probe(&address, "/health", "\"health\":\"true\"");
        match wait_ready(&mut etcd, options.ready_timeout, probe).await {
            Ok(()) => return Ok((etcd, client_url)),
            Err(e @ Error::Exited { .. }) if process::port_conflict(&etcd.log_tail(50)) => {
                last_error = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_error.expect("at least one attempt"))
}

const AUDIT_LOG: &str = "kube-apiserver-audit.log";

async fn start_apiserver(
    options: &Options,
    work_dir: &Path,
    files: &PkiFiles,
    etcd_url: &str,
    ca: &CertificateAuthority,
    kubeconfig_path: &Path,
) -> Result<(ManagedProcess, String)> {
    let admin = ca.client_cert("shapeblock-admin", Some("system:masters"))?;
    let mut last_error = None;
    for _ in 0..PORT_ATTEMPTS {
        let port = process::free_port()?;
        let mut args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={port}"),
            format!("--cert-dir={}", work_dir.display()),
            format!("--tls-cert-file={}", files.serving_cert.display()),
            format!("--tls-private-key-file={}", files.serving_key.display()),
            format!("--client-ca-file={}", files.ca_cert.display()),
            "--authorization-mode=RBAC".into(),
            "--anonymous-auth=false".into(),
            format!("--service-account-issuer=https://kubernetes.default.svc.cluster.local"),
            format!("--service-account-key-file={}", files.sa_pub.display()),
            format!("--service-account-signing-key-file={}", files.sa_key.display()),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--allow-privileged=true".into(),
            "--kubelet-preferred-address-types=InternalIP".into(),
            "--profiling=false".into(),
            // One apiserver and nothing to fairly share between: spare the memory.
            "--enable-priority-and-fairness=false".into(),
            // A namespace can pin its pods to nodes (scheduler.alpha.kubernetes.io/node-selector)
            // and give them tolerations (…/defaultTolerations), as a platform team does for a
            // tenant's dedicated nodes: the real-node tests put a project on the real node so.
            "--enable-admission-plugins=PodNodeSelector,PodTolerationRestriction".into(),
            "--v=1".into(),
        ];
        if options.audit {
            let policy = work_dir.join("audit-policy.yaml");
            std::fs::write(&policy, audit::POLICY)
                .map_err(|e| Error::io(format!("write {}", policy.display()), e))?;
            args.push(format!("--audit-policy-file={}", policy.display()));
            args.push(format!("--audit-log-path={}", work_dir.join(AUDIT_LOG).display()));
        }
        let mut apiserver = ManagedProcess::spawn(
            "kube-apiserver",
            &options.bin_dir.join("kube-apiserver"),
            &args,
            &work_dir.join("kube-apiserver.log"),
        )?;
        let server = format!("https://127.0.0.1:{port}");
        kubeconfig::write(kubeconfig_path, &server, ca.cert_pem(), &admin, "shapeblock-test")?;
        let client = client_from_kubeconfig(kubeconfig_path).await?;
        match wait_ready(&mut apiserver, options.ready_timeout, || readyz(&client)).await {
            Ok(()) => return Ok((apiserver, server)),
            Err(e @ Error::Exited { .. }) if process::port_conflict(&apiserver.log_tail(50)) => {
                last_error = Some(e)
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_error.expect("at least one attempt"))
}

/// Polls `probe` until it succeeds, the process exits, or the timeout passes.
async fn wait_ready<F, Fut>(process: &mut ManagedProcess, timeout: Duration, probe: F) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.exited() {
            return Err(Error::Exited {
                name: process.name().into(),
                status: status.to_string(),
                log: process.log_path().display().to_string(),
                tail: process.log_tail(30),
            });
        }
        if probe().await {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::NotReady {
                name: process.name().into(),
                seconds: timeout.as_secs(),
                log: process.log_path().display().to_string(),
                tail: process.log_tail(30),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether the apiserver's `/readyz` (every post-start hook done) answers `ok`.
async fn readyz(client: &Client) -> bool {
    let Ok(request) = http::Request::get("/readyz").body(Vec::new()) else {
        return false;
    };
    matches!(client.request_text(request).await, Ok(body) if body.trim() == "ok")
}

async fn wait_for_default_service_account(
    client: &Client,
    timeout: Duration,
    kcm: Option<&ManagedProcess>,
) -> Result<()> {
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "default");
    let deadline = Instant::now() + timeout;
    loop {
        if accounts.get_opt("default").await?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let (log, tail) = kcm
                .map(|p| (p.log_path().display().to_string(), p.log_tail(30)))
                .unwrap_or_default();
            return Err(Error::NotReady {
                name: "kube-controller-manager (no `default` ServiceAccount in namespace default)".into(),
                seconds: timeout.as_secs(),
                log,
                tail,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Server-side applies every `*.yaml` CRD in `dir` and waits until each is Established.
pub async fn install_crds(client: &Client, dir: &Path) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(format!("read {}", dir.display()), e))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    entries.sort();
    let mut names = Vec::new();
    for path in entries {
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).map_err(|e| Error::Crd {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let name = crd.metadata.name.clone().ok_or_else(|| Error::Crd {
            path: path.display().to_string(),
            message: "no metadata.name".into(),
        })?;
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await?;
        names.push(name);
    }
    for name in names {
        let established = await_condition(api.clone(), &name, conditions::is_crd_established());
        tokio::time::timeout(Duration::from_secs(30), established)
            .await
            .map_err(|_| Error::Crd {
                path: name.clone(),
                message: "not Established within 30s".into(),
            })?
            .map_err(|e| Error::Crd {
                path: name.clone(),
                message: e.to_string(),
            })?;
    }
    Ok(())
}

/// Removes work directories of control planes whose process is gone (a killed test run
/// cannot clean up after itself; the next one does).
fn remove_stale_work_dirs(root: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// A short suffix unique within this process and unlikely across processes.
pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:x}{:x}",
        nanos & 0xfffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn write_file(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::io(format!("write {}", path.display()), e))
}

fn write_private(path: &Path, contents: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    file.write_all(contents.as_bytes())
        .map_err(|e| Error::io(format!("write {}", path.display()), e))
}
