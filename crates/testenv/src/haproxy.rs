//! A real TCP load balancer for tests: Debian's `haproxy`, started the way Postgres is (its
//! own directory under the work root, a free loopback port, a child that dies with the
//! thread that started it), with a configuration the harness writes: TCP mode, round robin
//! over the given backends, health checks fast enough for tests. Agents dial it as they
//! would a cloud load balancer in front of several hub replicas; TLS passes through.
//!
//! A backend with a health port is checked with `GET /readyz` there (a replica that is
//! stalled or not ready is taken out, and its connections cut); one without is checked by
//! connecting.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::process::{self, ManagedProcess};
use super::{Error, Result};

const WORK_DIR_PREFIX: &str = "shapeblock-haproxy-";
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// One server behind the balancer.
#[derive(Clone, Debug)]
pub struct Backend {
    /// Its name in HAProxy's configuration and statistics.
    pub name: String,
    pub addr: SocketAddr,
    /// Where `/readyz` is served (HTTP), if anywhere.
    pub health_port: Option<u16>,
}

/// A running HAProxy; stopped (and its directory removed) on drop.
pub struct Haproxy {
    // Field order is drop order: the process before its directory.
    process: ManagedProcess,
    work_dir: PathBuf,
    port: u16,
}

/// `/usr/sbin/haproxy`, or `SHAPEBLOCK_HAPROXY`.
pub fn binary() -> Result<PathBuf> {
    let path = std::env::var_os("SHAPEBLOCK_HAPROXY")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/haproxy"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::MissingBinary {
            binary: "haproxy".into(),
            dir: format!("{} (apt-get install haproxy)", path.display()),
        })
    }
}

/// The configuration for a frontend on `port` over `backends`, with its admin socket in
/// `work_dir`.
pub fn config(port: u16, backends: &[Backend], work_dir: &Path) -> String {
    let mut text = format!(
        "global
  # Two descriptors a connection: within the usual 20,000-descriptor limit of a test shell.
  maxconn 8000
  stats socket {sock} mode 600 level admin

defaults
  mode tcp
  # A connection to a server that just died goes to another rather than failing.
  retries 2
  option redispatch
  timeout connect 1s
  # Tunnels live for hours; the hub's and the agent's heartbeats notice a dead one.
  timeout client 1h
  timeout server 1h
  timeout check 300ms

frontend agents
  bind 127.0.0.1:{port}
  default_backend hubs

backend hubs
  balance roundrobin
  # Fast for tests: down after 2 failed checks 200 ms apart, up after 1; a server marked down
  # has its connections cut, so its agents reconnect to the others.
  default-server inter 200ms fall 2 rise 1 on-marked-down shutdown-sessions
",
        sock = work_dir.join("admin.sock").display()
    );
    if backends.iter().any(|b| b.health_port.is_some()) {
        text.push_str("  option httpchk GET /readyz\n  http-check expect status 200\n");
    }
    for b in backends {
        text.push_str(&format!("  server {} {} check", b.name, b.addr));
        if let Some(port) = b.health_port {
            text.push_str(&format!(" port {port}"));
        }
        text.push('\n');
    }
    text
}

impl Haproxy {
    /// Starts HAProxy in front of `backends`; returns once its frontend accepts connections.
    /// It dies with the calling thread.
    pub fn start(backends: &[Backend]) -> Result<Self> {
        let binary = binary()?;
        let root = super::default_work_root();
        super::remove_stale_work_dirs(&root, WORK_DIR_PREFIX);
        let work_dir = root.join(format!(
            "{WORK_DIR_PREFIX}{}-{}",
            std::process::id(),
            super::unique_suffix()
        ));
        std::fs::create_dir_all(&work_dir)
            .map_err(|e| Error::io(format!("create {}", work_dir.display()), e))?;
        let mut last_error = None;
        for _ in 0..super::PORT_ATTEMPTS {
            let port = process::free_port()?;
            let cfg = work_dir.join("haproxy.cfg");
            std::fs::write(&cfg, config(port, backends, &work_dir))
                .map_err(|e| Error::io(format!("write {}", cfg.display()), e))?;
            // -db: in the foreground, no fork (so the parent-death signal reaches it).
            let args = vec!["-db".to_string(), "-f".to_string(), cfg.display().to_string()];
            let process = ManagedProcess::spawn("haproxy", &binary, &args, &work_dir.join("haproxy.log"))?;
            let mut haproxy = Self {
                process,
                work_dir: work_dir.clone(),
                port,
            };
            match haproxy.wait_ready() {
                Ok(()) => return Ok(haproxy),
                Err(e @ Error::Exited { .. })
                    if haproxy.process.log_tail(30).contains("cannot bind socket") =>
                {
                    // Keep the directory for the next attempt.
                    haproxy.work_dir = PathBuf::new();
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.process.exited() {
                return Err(Error::Exited {
                    name: "haproxy".into(),
                    status: status.to_string(),
                    log: self.process.log_path().display().to_string(),
                    tail: self.process.log_tail(30),
                });
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    name: "haproxy".into(),
                    seconds: READY_TIMEOUT.as_secs(),
                    log: self.process.log_path().display().to_string(),
                    tail: self.process.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The frontend's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `https://127.0.0.1:PORT`: what agents dial (TLS passes through to a hub).
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Each backend server's name and status as HAProxy sees it (`UP`, `DOWN`, ...), from
    /// its admin socket.
    pub fn servers(&self) -> Result<Vec<(String, String)>> {
        use std::io::{Read, Write};
        let sock = self.work_dir.join("admin.sock");
        let mut stream = std::os::unix::net::UnixStream::connect(&sock)
            .map_err(|e| Error::io(format!("connect {}", sock.display()), e))?;
        stream
            .write_all(b"show stat\n")
            .map_err(|e| Error::io("haproxy admin socket", e))?;
        let mut csv = String::new();
        stream
            .read_to_string(&mut csv)
            .map_err(|e| Error::io("haproxy admin socket", e))?;
        // `# pxname,svname,...`: the status is the 18th column.
        Ok(csv
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let fields: Vec<&str> = l.split(',').collect();
                let (proxy, server, status) = (fields.first()?, fields.get(1)?, fields.get(17)?);
                (*proxy == "hubs" && *server != "BACKEND").then(|| (server.to_string(), status.to_string()))
            })
            .collect())
    }

    /// Waits until HAProxy sees server `name` in a status starting with `status` (`UP`,
    /// `DOWN`).
    pub fn wait_server(&self, name: &str, status: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let servers = self.servers()?;
            if servers.iter().any(|(n, s)| n == name && s.starts_with(status)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    name: format!("haproxy server {name} {status} (servers: {servers:?})"),
                    seconds: timeout.as_secs(),
                    log: self.process.log_path().display().to_string(),
                    tail: self.process.log_tail(10),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.process.stop(Duration::from_secs(5));
        if !self.work_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_round_robins_over_every_backend_with_checks() {
        let backends = [
            Backend {
                name: "r0".into(),
                addr: "127.0.0.1:7001".parse().unwrap(),
                health_port: Some(8001),
            },
            Backend {
                name: "r1".into(),
                addr: "127.0.0.1:7002".parse().unwrap(),
                health_port: Some(8002),
            },
        ];
        let text = config(9000, &backends, Path::new("/tmp/x"));
        assert!(text.contains("mode tcp"));
        assert!(text.contains("balance roundrobin"));
        assert!(text.contains("bind 127.0.0.1:9000"));
        assert!(text.contains("server r0 127.0.0.1:7001 check port 8001"));
        assert!(text.contains("server r1 127.0.0.1:7002 check port 8002"));
        assert!(text.contains("option httpchk GET /readyz"));
    }
}
