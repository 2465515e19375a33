//! A real image registry for tests: Debian's `docker-registry` (distribution 2.8) on loopback,
//! a random port, its own directory, and token auth that trusts the certificates it is given.
//! Killed when dropped (a [`ManagedProcess`]: own process group, parent-death signal).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::process::{free_port, port_conflict};
use super::{Error, ManagedProcess, Result};

/// Where the binary is looked for: `SHAPEBLOCK_DOCKER_REGISTRY`, else Debian's path.
pub fn binary() -> PathBuf {
    std::env::var_os("SHAPEBLOCK_DOCKER_REGISTRY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/docker-registry"))
}

/// What the registry's `auth.token` section says.
#[derive(Clone, Debug)]
pub struct TokenAuth {
    /// `service`: the audience tokens must carry.
    pub service: String,
    /// `issuer`: the `iss` tokens must carry.
    pub issuer: String,
    /// PEM certificates whose keys may sign tokens (`rootcertbundle`).
    pub root_certs: Vec<String>,
}

/// How a registry is started beyond its defaults (loopback, plain HTTP, no auth).
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Token auth, and the realm clients get tokens from (`None`: never contacted; builds
    /// carry their token from the start).
    pub auth: Option<TokenAuth>,
    pub realm: Option<String>,
    /// Listen here instead of 127.0.0.1 (the real node's bridge address, which pods reach).
    pub ip: Option<std::net::Ipv4Addr>,
    /// Serve TLS with this certificate.
    pub tls: Option<super::CertifiedKey>,
    /// Refuse every write (distribution's read-only maintenance mode): pulls work, pushes
    /// are answered 405.
    pub read_only: bool,
    /// A port chosen by the caller.
    pub port: Option<u16>,
}

pub struct Registry {
    /// `<ip>:<port>` (`127.0.0.1` unless [`Options::ip`]).
    pub address: String,
    _dir: tempfile::TempDir,
    _process: ManagedProcess,
}

impl Registry {
    /// Starts a registry that accepts only tokens signed by `auth.root_certs`. The port is
    /// `port` if given (a caller that must name it before the registry runs), else a free one.
    pub async fn start(auth: &TokenAuth, port: Option<u16>) -> Result<Self> {
        Self::start_with(Options {
            auth: Some(auth.clone()),
            port,
            ..Default::default()
        })
        .await
    }

    /// A registry anyone on this machine may push to and pull from (the real node's image
    /// source: the kubelet pulls with no credentials).
    pub async fn start_open(port: Option<u16>) -> Result<Self> {
        Self::start_with(Options {
            port,
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(options: Options) -> Result<Self> {
        let binary = binary();
        if !binary.exists() {
            return Err(Error::io(
                format!(
                    "{} not found: apt-get install docker-registry (or set SHAPEBLOCK_DOCKER_REGISTRY)",
                    binary.display()
                ),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            ));
        }
        let mut last = None;
        for _ in 0..5 {
            let port = match options.port {
                Some(port) => port,
                None => free_port()?,
            };
            match Self::try_start(&binary, &options, port).await {
                Err(Error::Exited { tail, .. }) if port_conflict(&tail) => last = Some(tail),
                other => return other,
            }
        }
        Err(Error::Shared(format!(
            "no free port for the registry: {}",
            last.unwrap_or_default()
        )))
    }

    async fn try_start(binary: &Path, options: &Options, port: u16) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("shapeblock-registry-")
            .tempdir()
            .map_err(|e| Error::io("create the registry's directory", e))?;
        let ip = options.ip.unwrap_or(std::net::Ipv4Addr::LOCALHOST);
        let address = format!("{ip}:{port}");
        // JSON is YAML: no quoting rules to get wrong for the paths.
        let mut config = serde_json::json!({
            "version": "0.1",
            "log": {"level": "info", "accesslog": {"disabled": true}},
            "storage": {"filesystem": {"rootdirectory": dir.path().join("data")}},
            "http": {"addr": address, "secret": "test-only-upload-state-secret"},
        });
        if let Some(tls) = &options.tls {
            let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
            std::fs::write(&cert, &tls.cert_pem)
                .map_err(|e| Error::io("write the registry's certificate", e))?;
            super::write_private(&key, &tls.key_pem)?;
            config["http"]["tls"] = serde_json::json!({"certificate": cert, "key": key});
        }
        if options.read_only {
            config["storage"]["maintenance"] = serde_json::json!({"readonly": {"enabled": true}});
        }
        if let Some(auth) = &options.auth {
            let bundle = dir.path().join("root-certs.pem");
            std::fs::write(&bundle, auth.root_certs.concat())
                .map_err(|e| Error::io("write the registry's root certificates", e))?;
            config["auth"] = serde_json::json!({"token": {
                // Never contacted: builds carry their token (registrytoken) from the start.
                "realm": options.realm.as_deref().unwrap_or("http://127.0.0.1:9/token"),
                "service": auth.service,
                "issuer": auth.issuer,
                "rootcertbundle": bundle,
            }});
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config.to_string())
            .map_err(|e| Error::io("write the registry's config", e))?;
        let mut process = ManagedProcess::spawn(
            "docker-registry",
            binary,
            &["serve".into(), config_path.display().to_string()],
            &dir.path().join("registry.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = process.exited() {
                return Err(Error::Exited {
                    name: "docker-registry".into(),
                    status: status.to_string(),
                    log: process.log_path().display().to_string(),
                    tail: process.log_tail(20),
                });
            }
            if tokio::net::TcpStream::connect(&address).await.is_ok() {
                return Ok(Self {
                    address,
                    _dir: dir,
                    _process: process,
                });
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    name: "docker-registry".into(),
                    seconds: 15,
                    log: process.log_path().display().to_string(),
                    tail: process.log_tail(20),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
