//! What a real build needs around the real node, all on this machine: a registry of base and
//! tool images (TLS, no auth: the "public" registry builds pull `FROM`), the images themselves
//! (built here from Debian's packages and the pinned kaniko), a git server (Debian's git
//! `http-backend` behind Debian's lighttpd, TLS) with a sample app, and a registry token
//! service that gives pull tokens for basic credentials (what Harbor's or GitLab's token
//! service does), so that the kubelet pulls App images from a token-auth registry with an
//! ordinary pull secret. One CA signs every certificate; the tool images and the node's
//! containerd trust it, as a cluster's nodes trust their registry.
//!
//! Everything listens on the real node's bridge address, which pods reach (their gateway) and
//! this machine reaches too. Started once per test process ([`build_farm`]) beside the shared
//! real node; its processes die with the process.
//!
//! Past 600 lines: each service is short, but they share one CA, one address and one
//! lifetime, which is the point of putting them in one place.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::images::{Endpoint, ImageConfig, Layer, OciImage};
use super::process::free_port;
use super::registry::{Options, Registry};
use super::{CertificateAuthority, CertifiedKey, Error, ManagedProcess, Result};
use shapeblock_agent::controllers::registry::Signer;

/// The kaniko executor's version (tools/kaniko pins the same).
pub const KANIKO_VERSION: &str = "v1.25.6";
/// Where the sample app's repository is served, below the git server's address.
pub const SAMPLE_REPO: &str = "/git/sample.git";
/// The buildpacks lifecycle's version (tools/lifecycle pins the same).
pub const LIFECYCLE_VERSION: &str = "v0.20.12";
/// The builder's build user, as in Paketo's builders: uid 1001, gid 1000.
pub const CNB_USER: (u32, u32) = (1001, 1000);
/// The pull account the token service knows.
pub const PULL_USER: &str = "puller";

/// The build farm of this test process.
pub struct BuildFarm {
    /// The CA of every certificate here (PEM).
    pub ca_pem: String,
    /// `<node ip>:<port>` of the images registry.
    pub images: String,
    /// `<images>/base:bookworm`: busybox and its libraries (Debian), `/etc` of a minimal image.
    pub base_image: String,
    /// `<images>/git:<version>`: Debian's git, ssh, getent and busybox.
    pub git_image: String,
    /// `<images>/kaniko:<version>`: the executor from its Go module, upstream's layout.
    pub kaniko_image: String,
    /// `<images>/builder:test`: the lifecycle built from its Go module, one buildpack written
    /// for the tests (`shapeblock/static`: serves the app's files with busybox's httpd).
    pub builder_image: String,
    /// `<images>/run:test`: the builder's run image (the base image with the build user).
    pub run_image: String,
    /// `https://<node ip>:<port>`: the git server.
    pub git_url: String,
    /// `<node ip>:<port>` of the SSH git server (Debian's OpenSSH, `git-shell` for every key).
    pub ssh_address: String,
    /// Its host key as a `known_hosts` line (`[ip]:port ssh-ed25519 …`).
    pub ssh_known_hosts: String,
    authorized_keys: PathBuf,
    /// The sample repository's work tree on this machine (commit and push to change it).
    pub sample_work_tree: PathBuf,
    /// The bare repositories' directory.
    pub repos: PathBuf,
    /// `http://127.0.0.1:<port>/token`: the token service's realm.
    pub realm: String,
    /// The token service's signing certificate (registries add it to their root bundle).
    pub token_cert_pem: String,
    /// The pull account's password.
    pub pull_password: String,
    /// The node's bridge address.
    pub node_ip: Ipv4Addr,
    /// containerd's registry hosts directory (`certs.d`).
    certs_dir: PathBuf,
    ca: Arc<CertificateAuthority>,
    _keep: Vec<ManagedProcess>,
    _registry: Registry,
    _dir: tempfile::TempDir,
}

impl BuildFarm {
    /// A serving certificate of the farm's CA for `ip`.
    pub fn serving_cert(&self, ip: Ipv4Addr) -> Result<CertifiedKey> {
        self.ca.serving_cert("shapeblock test", &[], &[ip.into()])
    }

    /// Makes the node's containerd trust the farm's CA for `host` (`ip:port`): containerd
    /// reads its hosts directory at every pull.
    pub fn trust(&self, host: &str) -> Result<()> {
        trust(&self.certs_dir, host, &self.ca_pem)
    }

    /// The images registry, for pushes from tests.
    pub fn images_endpoint(&self) -> Result<Endpoint> {
        Endpoint::tls(&self.images, &self.ca_pem)
    }

    /// The options of a token-auth registry for App images on the node's address: it trusts
    /// `signers` (the agent's certificate) and the token service, whose realm it names.
    pub fn app_registry_options(&self, signers: &[String], service: &str, port: u16) -> Result<Options> {
        let mut root_certs = signers.to_vec();
        root_certs.push(self.token_cert_pem.clone());
        Ok(Options {
            auth: Some(super::registry::TokenAuth {
                service: service.to_owned(),
                issuer: "shapeblock-agent".to_owned(),
                root_certs,
            }),
            realm: Some(self.realm.clone()),
            ip: Some(self.node_ip),
            tls: Some(self.serving_cert(self.node_ip)?),
            read_only: false,
            port: Some(port),
        })
    }
}

fn trust(certs_dir: &Path, host: &str, ca_pem: &str) -> Result<()> {
    let dir = certs_dir.join(host);
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    let ca = dir.join("ca.crt");
    super::write_file(&ca, ca_pem)?;
    super::write_file(
        &dir.join("hosts.toml"),
        &format!(
            "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            ca.display()
        ),
    )
}

/// The build farm of this test process, started on first use (with the shared real node).
pub fn build_farm() -> Result<&'static BuildFarm> {
    static FARM: OnceLock<std::result::Result<BuildFarm, String>> = OnceLock::new();
    FARM.get_or_init(|| {
        let node = super::real_node().map_err(|e| e.to_string())?;
        let (ip, certs_dir) = (node.node_ip, node.certs_dir.clone());
        let (sender, receiver) = std::sync::mpsc::channel();
        // The processes die with the thread that forked them: a thread that lives as long as
        // the test process.
        std::thread::Builder::new()
            .name("build-farm".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = sender.send(Err(format!("tokio runtime: {e}")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let started = Instant::now();
                    let result = start(ip, certs_dir).await.map_err(|e| e.to_string());
                    if result.is_ok() {
                        eprintln!("build farm ready in {:?}", started.elapsed());
                    }
                    let _ = sender.send(result);
                    std::future::pending::<()>().await;
                });
            })
            .map_err(|e| format!("spawn the build farm's thread: {e}"))?;
        receiver
            .recv()
            .map_err(|_| "the build farm's thread ended without a result".to_string())?
    })
    .as_ref()
    .map_err(|e| Error::RealNode(e.clone()))
}

async fn start(ip: Ipv4Addr, certs_dir: PathBuf) -> Result<BuildFarm> {
    let dir = tempfile::Builder::new()
        .prefix("shapeblock-buildfarm-")
        .tempdir()
        .map_err(|e| Error::io("create the build farm's directory", e))?;
    let ca = Arc::new(CertificateAuthority::new("shapeblock test build farm")?);
    let ca_pem = ca.cert_pem().to_owned();
    let serving = ca.serving_cert("shapeblock test", &[], &[ip.into()])?;

    let registry = Registry::start_with(Options {
        ip: Some(ip),
        tls: Some(serving.clone()),
        ..Default::default()
    })
    .await?;
    let images = registry.address.clone();
    trust(&certs_dir, &images, &ca_pem)?;
    let endpoint = Endpoint::tls(&images, &ca_pem)?;
    let bundle = ca_bundle(&ca_pem)?;
    let pushed = Instant::now();
    let base_image = format!("{images}/base:bookworm");
    base_image_of()?.push_with(&endpoint, "base", "bookworm").await?;
    let git_version = git_version()?;
    let git_image = format!("{images}/git:{git_version}");
    git_image_of(&bundle)?
        .push_with(&endpoint, "git", &git_version)
        .await?;
    let kaniko_image = format!("{images}/kaniko:{KANIKO_VERSION}");
    kaniko_image_of(&bundle)?
        .push_with(&endpoint, "kaniko", KANIKO_VERSION)
        .await?;
    let run_image = format!("{images}/run:test");
    run_image_of()?.push_with(&endpoint, "run", "test").await?;
    let builder_image = format!("{images}/builder:test");
    builder_image_of(&bundle, &run_image)?
        .push_with(&endpoint, "builder", "test")
        .await?;
    eprintln!("build farm: images pushed to {images} in {:?}", pushed.elapsed());

    let mut keep = Vec::new();
    let (git_process, git_url) = start_git_server(dir.path(), ip, &serving).await?;
    keep.push(git_process);
    let (ssh_process, ssh_address, ssh_known_hosts) = start_ssh_server(dir.path(), ip).await?;
    keep.push(ssh_process);
    let repos = dir.path().join("repos");
    let sample_work_tree = dir.path().join("sample");
    sample_repository(&repos, &sample_work_tree, &base_image)?;

    let (signer, _key) = Signer::generate().map_err(|e| Error::Pki(e.to_string()))?;
    let token_cert_pem = signer.cert_pem.clone();
    let pull_password = super::unique_suffix();
    let realm = start_token_service(signer, pull_password.clone()).await?;

    Ok(BuildFarm {
        ca_pem,
        images,
        base_image,
        git_image,
        kaniko_image,
        builder_image,
        run_image,
        git_url,
        ssh_address,
        ssh_known_hosts,
        authorized_keys: dir.path().join("ssh/authorized_keys"),
        sample_work_tree,
        repos,
        realm,
        token_cert_pem,
        pull_password,
        node_ip: ip,
        certs_dir,
        ca,
        _keep: keep,
        _registry: registry,
        _dir: dir,
    })
}

/// Debian's CA bundle with the farm's CA appended.
fn ca_bundle(ca_pem: &str) -> Result<Vec<u8>> {
    let path = Path::new("/etc/ssl/certs/ca-certificates.crt");
    let mut bundle = std::fs::read(path).unwrap_or_default();
    bundle.extend_from_slice(ca_pem.as_bytes());
    Ok(bundle)
}

fn base_image_of() -> Result<OciImage> {
    let mut layer = Layer::new();
    layer.busybox()?.minimal_etc()?;
    OciImage::from_layers(
        vec![layer.finish()?],
        &ImageConfig {
            cmd: vec!["/bin/sh".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            ..Default::default()
        },
    )
}

fn git_version() -> Result<String> {
    let output = std::process::Command::new("git")
        .arg("--version")
        .output()
        .map_err(|e| Error::io("git --version", e))?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap_or("unknown")
        .to_owned())
}

/// Debian's git (with its https helper), OpenSSH's client, glibc's getent, busybox for the
/// shell and the tools the agent's scripts use, the CA bundle. Users: root and nobody only,
/// as in alpine/git.
fn git_image_of(bundle: &[u8]) -> Result<OciImage> {
    let mut layer = Layer::new();
    layer
        .host_program(Path::new("/usr/bin/git"))?
        .host_program(Path::new("/usr/lib/git-core/git-remote-http"))?
        .symlink("/usr/lib/git-core/git", "/usr/bin/git")?
        .symlink("/usr/lib/git-core/git-remote-https", "git-remote-http")?
        .host_program(Path::new("/usr/bin/getent"))?;
    for program in ["/usr/bin/ssh", "/usr/bin/ssh-keygen"] {
        if Path::new(program).exists() {
            layer.host_program(Path::new(program))?;
        }
    }
    if Path::new("/usr/share/git-core/templates").is_dir() {
        layer.host_tree(Path::new("/usr/share/git-core/templates"))?;
    }
    layer
        .file("/etc/ssl/certs/ca-certificates.crt", 0o644, bundle)?
        .busybox()?
        .minimal_etc()?;
    OciImage::from_layers(
        vec![layer.finish()?],
        &ImageConfig {
            entrypoint: vec!["git".into()],
            env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
            ..Default::default()
        },
    )
}

/// The kaniko executor as upstream's deploy/Dockerfile lays it out: `/kaniko/executor`, the
/// CA bundle in `/kaniko/ssl/certs`, `DOCKER_CONFIG=/kaniko/.docker/`, no shell.
fn kaniko_image_of(bundle: &[u8]) -> Result<OciImage> {
    let executor = super::default_bin_dir().join("kaniko-executor");
    let mut layer = Layer::new();
    layer
        .dir("/kaniko", 0o777)?
        .dir("/kaniko/.docker", 0o755)?
        .host_file(&executor, "/kaniko/executor")
        .map_err(|e| Error::RealNode(format!("{e} (tools/build-control-plane.sh builds it)")))?
        .file("/kaniko/ssl/certs/ca-certificates.crt", 0o644, bundle)?
        .file("/etc/nsswitch.conf", 0o644, b"hosts: files dns\n")?
        .dir("/workspace", 0o755)?;
    OciImage::from_layers(
        vec![layer.finish()?],
        &ImageConfig {
            entrypoint: vec!["/kaniko/executor".into()],
            env: vec![
                "HOME=/root".into(),
                "USER=root".into(),
                "PATH=/usr/local/bin:/kaniko".into(),
                "SSL_CERT_DIR=/kaniko/ssl/certs".into(),
                "DOCKER_CONFIG=/kaniko/.docker/".into(),
            ],
            working_dir: Some("/workspace".into()),
            ..Default::default()
        },
    )
}

/// `/etc/passwd` and `/etc/group` with root, nobody and the build user `cnb`.
fn cnb_etc(layer: &mut Layer) -> Result<()> {
    let (uid, gid) = CNB_USER;
    layer
        .file(
            "/etc/passwd",
            0o644,
            format!(
                "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\ncnb:x:{uid}:{gid}:cnb:/home/cnb:/bin/sh\n"
            )
            .as_bytes(),
        )?
        .file(
            "/etc/group",
            0o644,
            format!("root:x:0:\nnogroup:x:65534:\ncnb:x:{gid}:\n").as_bytes(),
        )?;
    Ok(())
}

/// The run image: busybox (its httpd serves the sample), the build user, nothing else.
fn run_image_of() -> Result<OciImage> {
    let mut layer = Layer::new();
    cnb_etc(&mut layer)?;
    layer.busybox()?.minimal_etc()?.dir("/home/cnb", 0o755)?;
    OciImage::from_layers(
        vec![layer.finish()?],
        &ImageConfig {
            env: vec![
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                format!("CNB_USER_ID={}", CNB_USER.0),
                format!("CNB_GROUP_ID={}", CNB_USER.1),
            ],
            ..Default::default()
        },
    )
}

/// The builder: the lifecycle as upstream's builders lay it out (`/cnb/lifecycle/<phase>` links
/// to the multi-call binary, the launcher beside it), `/cnb/order.toml` with one group,
/// `/cnb/run.toml` naming the run image, and the buildpack `shapeblock/static`: it detects an
/// `index.html` and contributes a `web` process serving the app directory. Like Paketo's, the
/// image sets `CNB_USER_ID`/`CNB_GROUP_ID` and has a shell.
fn builder_image_of(bundle: &[u8], run_image: &str) -> Result<OciImage> {
    let bin = super::default_bin_dir();
    let mut layer = Layer::new();
    cnb_etc(&mut layer)?;
    layer
        .host_file(&bin.join("lifecycle"), "/cnb/lifecycle/lifecycle")
        .map_err(|e| Error::RealNode(format!("{e} (tools/build-control-plane.sh builds it)")))?
        .host_file(&bin.join("launcher"), "/cnb/lifecycle/launcher")?;
    for phase in [
        "analyzer", "builder", "creator", "detector", "exporter", "restorer", "rebaser", "extender",
    ] {
        layer.symlink(&format!("/cnb/lifecycle/{phase}"), "lifecycle")?;
    }
    let buildpack = "/cnb/buildpacks/shapeblock_static/0.1.0";
    layer
        .file(
            &format!("{buildpack}/buildpack.toml"),
            0o644,
            b"api = \"0.10\"\n[buildpack]\nid = \"shapeblock/static\"\nversion = \"0.1.0\"\nname = \"Static files (ShapeBlock tests)\"\n[[targets]]\nos = \"linux\"\narch = \"amd64\"\n",
        )?
        .file(
            &format!("{buildpack}/bin/detect"),
            0o755,
            b"#!/bin/sh\n# Static sites: an index.html at the top.\n[ -f index.html ] || exit 100\n",
        )?
        .file(
            &format!("{buildpack}/bin/build"),
            0o755,
            b"#!/bin/sh\nset -eu\necho \"shapeblock/static: serving $(ls | wc -l) files from $PWD as $(id -u):$(id -g)\"\ncat > \"$CNB_LAYERS_DIR/launch.toml\" <<EOF\n[[processes]]\ntype = \"web\"\ncommand = [\"httpd\"]\nargs = [\"-f\", \"-p\", \"8080\", \"-h\", \"$PWD\"]\ndefault = true\nEOF\n",
        )?
        .file(
            "/cnb/order.toml",
            0o644,
            b"[[order]]\n[[order.group]]\nid = \"shapeblock/static\"\nversion = \"0.1.0\"\n",
        )?
        .file(
            "/cnb/run.toml",
            0o644,
            format!("[[images]]\nimage = \"{run_image}\"\n").as_bytes(),
        )?
        .file("/etc/ssl/certs/ca-certificates.crt", 0o644, bundle)?
        .busybox()?
        .minimal_etc()?
        .dir("/home/cnb", 0o755)?
        .dir("/layers", 0o755)?
        .dir("/workspace", 0o755)?;
    OciImage::from_layers(
        vec![layer.finish()?],
        &ImageConfig {
            env: vec![
                "PATH=/cnb/lifecycle:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
                format!("CNB_USER_ID={}", CNB_USER.0),
                format!("CNB_GROUP_ID={}", CNB_USER.1),
                "CNB_PLATFORM_API=0.13".into(),
            ],
            working_dir: Some("/layers".into()),
            ..Default::default()
        },
    )
}

/// lighttpd (TLS) running git's `http-backend` for every repository under `<dir>/repos`, as
/// git's documentation sets it up; read-only (no `receive-pack`).
async fn start_git_server(dir: &Path, ip: Ipv4Addr, cert: &CertifiedKey) -> Result<(ManagedProcess, String)> {
    let binary = Path::new("/usr/sbin/lighttpd");
    if !binary.exists() {
        return Err(Error::RealNode(
            "/usr/sbin/lighttpd not found: apt-get install lighttpd lighttpd-mod-openssl".into(),
        ));
    }
    for sub in ["repos", "www"] {
        std::fs::create_dir_all(dir.join(sub))
            .map_err(|e| Error::io("create the git server's directories", e))?;
    }
    let pem = dir.join("lighttpd.pem");
    super::write_private(&pem, &format!("{}{}", cert.cert_pem, cert.key_pem))?;
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        let config = format!(
            r#"server.modules = ("mod_openssl", "mod_alias", "mod_setenv", "mod_cgi")
server.document-root = "{www}"
server.bind = "{ip}"
server.port = {port}
server.errorlog = "{dir}/lighttpd-error.log"
ssl.engine = "enable"
ssl.pemfile = "{pem}"
alias.url += ("/git" => "/usr/lib/git-core/git-http-backend")
$HTTP["url"] =~ "^/git" {{
  cgi.assign = ("" => "")
  setenv.add-environment = ("GIT_PROJECT_ROOT" => "{repos}", "GIT_HTTP_EXPORT_ALL" => "")
}}
"#,
            www = dir.join("www").display(),
            dir = dir.display(),
            pem = pem.display(),
            repos = dir.join("repos").display(),
        );
        let config_path = dir.join("lighttpd.conf");
        super::write_file(&config_path, &config)?;
        let mut process = ManagedProcess::spawn(
            "lighttpd (git http-backend)",
            binary,
            &["-D".into(), "-f".into(), config_path.display().to_string()],
            &dir.join("lighttpd.log"),
        )?;
        let address = format!("{ip}:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = process.exited() {
                last = format!(
                    "lighttpd exited ({status}): {}{}",
                    process.log_tail(20),
                    std::fs::read_to_string(dir.join("lighttpd-error.log")).unwrap_or_default()
                );
                break;
            }
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                return Ok((process, format!("https://{address}")));
            }
            if Instant::now() > deadline {
                return Err(Error::RealNode(format!(
                    "lighttpd did not listen on {address} within 10s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !super::process::port_conflict(&last) {
            break;
        }
    }
    Err(Error::RealNode(last))
}

/// Debian's OpenSSH server on the node's address: key logins only, every key restricted to
/// `git-shell` (fetches of the repositories under `<dir>/repos`, nothing else).
async fn start_ssh_server(dir: &Path, ip: Ipv4Addr) -> Result<(ManagedProcess, String, String)> {
    let sshd = Path::new("/usr/sbin/sshd");
    if !sshd.exists() {
        return Err(Error::RealNode(
            "/usr/sbin/sshd not found: apt-get install openssh-server".into(),
        ));
    }
    let ssh = dir.join("ssh");
    std::fs::create_dir_all(&ssh).map_err(|e| Error::io("create the SSH server's directory", e))?;
    // sshd's privilege separation directory.
    std::fs::create_dir_all("/run/sshd").map_err(|e| Error::io("create /run/sshd", e))?;
    let key = ssh.join("host_ed25519");
    let output = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .output()
        .map_err(|e| Error::io("ssh-keygen", e))?;
    if !output.status.success() {
        return Err(Error::RealNode(format!(
            "ssh-keygen: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let public = std::fs::read_to_string(ssh.join("host_ed25519.pub"))
        .map_err(|e| Error::io("read the SSH host key", e))?;
    let public: Vec<&str> = public.split_whitespace().take(2).collect();
    super::write_file(&ssh.join("authorized_keys"), "")?;
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        let config = format!(
            "ListenAddress {ip}:{port}\nHostKey {key}\nAuthorizedKeysFile {keys}\nPidFile {pid}\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nLogLevel VERBOSE\n",
            key = key.display(),
            keys = ssh.join("authorized_keys").display(),
            pid = ssh.join("sshd.pid").display(),
        );
        let config_path = ssh.join("sshd_config");
        super::write_file(&config_path, &config)?;
        let mut process = ManagedProcess::spawn(
            "sshd (git-shell)",
            sshd,
            &[
                "-D".into(),
                "-e".into(),
                "-f".into(),
                config_path.display().to_string(),
            ],
            &ssh.join("sshd.log"),
        )?;
        let address = format!("{ip}:{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = process.exited() {
                last = format!("sshd exited ({status}): {}", process.log_tail(20));
                break;
            }
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                let known = format!("[{ip}]:{port} {} {}\n", public[0], public.get(1).unwrap_or(&""));
                return Ok((process, address, known));
            }
            if Instant::now() > deadline {
                return Err(Error::RealNode(format!(
                    "sshd did not listen on {address} within 10s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !last.contains("Address already in use") {
            break;
        }
    }
    Err(Error::RealNode(last))
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let output = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Sample")
        .env("GIT_AUTHOR_EMAIL", "sample@example.com")
        .env("GIT_COMMITTER_NAME", "Sample")
        .env("GIT_COMMITTER_EMAIL", "sample@example.com")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .output()
        .map_err(|e| Error::io(format!("git {}", args.join(" ")), e))?;
    if !output.status.success() {
        return Err(Error::RealNode(format!(
            "git {} in {}: {}",
            args.join(" "),
            dir.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// The sample app's Dockerfile: busybox's httpd serving `index.html` on the local base image.
/// The `RUN` layer stays the same between commits (kaniko's layer cache), the `COPY` changes.
pub fn sample_dockerfile(base_image: &str) -> String {
    format!(
        "FROM {base_image}\n\
         RUN mkdir -p /www && echo ok > /www/healthz && echo built on $(uname -m)\n\
         COPY index.html /www/index.html\n\
         EXPOSE 8080\n\
         CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n"
    )
}

/// The sample repository, bare at `<repos>/sample.git`, worked on in `work_tree`: `main` with
/// one commit ("commit 1" served at `/`).
fn sample_repository(repos: &Path, work_tree: &Path, base_image: &str) -> Result<()> {
    let bare = repos.join("sample.git");
    std::fs::create_dir_all(&bare).map_err(|e| Error::io("create the sample repository", e))?;
    git(&bare, &["init", "-q", "--bare", "-b", "main"])?;
    git(&bare, &["config", "uploadpack.allowReachableSHA1InWant", "true"])?;
    std::fs::create_dir_all(work_tree).map_err(|e| Error::io("create the sample work tree", e))?;
    git(work_tree, &["init", "-q", "-b", "main"])?;
    super::write_file(&work_tree.join("Dockerfile"), &sample_dockerfile(base_image))?;
    super::write_file(&work_tree.join("index.html"), "commit 1\n")?;
    git(work_tree, &["add", "."])?;
    git(work_tree, &["commit", "-q", "-m", "commit 1"])?;
    git(
        work_tree,
        &["remote", "add", "origin", &bare.display().to_string()],
    )?;
    git(work_tree, &["push", "-q", "origin", "main"])?;
    Ok(())
}

impl BuildFarm {
    /// Writes `files` into the sample work tree on branch `branch` (created from `main` if
    /// new), commits them with `message` and pushes: the new commit's SHA.
    pub fn commit(&self, branch: &str, files: &[(&str, &str)], message: &str) -> Result<String> {
        let tree = &self.sample_work_tree;
        if git(
            tree,
            &["rev-parse", "--verify", "-q", &format!("refs/heads/{branch}")],
        )
        .is_err()
        {
            git(tree, &["branch", branch, "main"])?;
        }
        git(tree, &["checkout", "-q", branch])?;
        for (path, contents) in files {
            super::write_file(&tree.join(path), contents)?;
        }
        git(tree, &["add", "."])?;
        git(tree, &["commit", "-q", "--allow-empty", "-m", message])?;
        git(tree, &["push", "-q", "origin", branch])?;
        let sha = git(tree, &["rev-parse", "HEAD"])?;
        git(tree, &["checkout", "-q", "main"])?;
        Ok(sha)
    }

    /// The SHA `main` (or any ref) points at.
    pub fn rev(&self, reference: &str) -> Result<String> {
        git(&self.sample_work_tree, &["rev-parse", reference])
    }

    /// The sample app's clone URL.
    pub fn sample_url(&self) -> String {
        format!("{}{SAMPLE_REPO}", self.git_url)
    }

    /// The sample app's SSH clone URL (user root: the only account the images and this
    /// machine share; every key is confined to `git-shell`).
    pub fn sample_ssh_url(&self) -> String {
        format!(
            "ssh://root@{}{}",
            self.ssh_address,
            self.repos.join("sample.git").display()
        )
    }

    /// Lets `public_key` (an OpenSSH public key line) fetch over SSH, through `git-shell` only.
    pub fn authorize(&self, public_key: &str) -> Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.authorized_keys)
            .map_err(|e| Error::io("open authorized_keys", e))?;
        writeln!(
            file,
            "restrict,command=\"git-shell -c \\\"$SSH_ORIGINAL_COMMAND\\\"\" {}",
            public_key.trim()
        )
        .map_err(|e| Error::io("write authorized_keys", e))
    }
}

/// The token service: `GET /token?service=…&scope=repository:<name>:<actions>` with the pull
/// account's basic credentials answers a token granting `pull` (never `push`) on each
/// repository asked for; anything else is 401. Other methods are 405, so containerd falls back
/// from its OAuth POST to this GET.
async fn start_token_service(signer: Signer, password: String) -> Result<String> {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode, Uri};
    use axum::routing::get;
    let state = Arc::new((signer, password));
    async fn token(
        State(state): State<Arc<(Signer, String)>>,
        headers: HeaderMap,
        uri: Uri,
    ) -> (StatusCode, String) {
        use base64::Engine;
        let (signer, password) = &*state;
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|v| base64::engine::general_purpose::STANDARD.decode(v).ok())
            .map(|v| String::from_utf8_lossy(&v).into_owned());
        if given.as_deref() != Some(&format!("{PULL_USER}:{password}")) {
            return (StatusCode::UNAUTHORIZED, "{}".into());
        }
        let query: Vec<(String, String)> = uri
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (percent_decode(k), percent_decode(v)))
            .collect();
        let service = query
            .iter()
            .find(|(k, _)| k == "service")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let repositories: Vec<String> = query
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .filter_map(|s| s.strip_prefix("repository:").map(str::to_owned))
            .filter_map(|s| {
                let (name, actions) = s.rsplit_once(':')?;
                actions.split(',').any(|a| a == "pull").then(|| name.to_owned())
            })
            .collect();
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        match signer.mint_actions(
            "shapeblock-agent",
            &service,
            PULL_USER,
            &repositories,
            &["pull"],
            now,
            now + 300,
        ) {
            Ok(token) => (
                StatusCode::OK,
                serde_json::json!({"token": token, "access_token": token, "expires_in": 300}).to_string(),
            ),
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "{}".into()),
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| Error::io("bind the token service", e))?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::io("the token service's address", e))?;
    let app = axum::Router::new().route("/token", get(token)).with_state(state);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(format!("http://{address}/token"))
}

/// `%XX` escapes and `+` of a query component.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&text[i + 1..i + 3], 16) {
                Ok(byte) => {
                    out.push(byte);
                    i += 3;
                    continue;
                }
                Err(_) => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_components_decode() {
        assert_eq!(percent_decode("repository%3Aa%2Fb%3Apull"), "repository:a/b:pull");
        assert_eq!(percent_decode("a+b%20c%2"), "a b c%2");
    }
}
