//! A real Postgres for tests, from Debian's `postgresql` package, started the way etcd is: its
//! own data directory on tmpfs, a free loopback port, its unix socket inside the data
//! directory (never `/var/run/postgresql`), and a child that dies with the thread that
//! started it (parent-death signal, see [`ManagedProcess`]); what the server forks makes its
//! own session (so a signal to the server's group does not reach it) but exits as soon as it
//! notices the server's death. `initdb` refuses root, so as root both run as the
//! `postgres` OS user, which then owns the directory.
//!
//! Tests share one server per test process ([`Postgres::shared`]) and take a database each
//! ([`Postgres::database`]): `initdb` costs seconds, `CREATE DATABASE` milliseconds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::process::{self, ManagedProcess, User};
use super::{Error, Result};

const WORK_DIR_PREFIX: &str = "shapeblock-pg-";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The superuser initdb makes; connections from loopback are trusted (a test server only).
const SUPERUSER: &str = "postgres";

/// A running Postgres; stopped (and its directory removed) on drop.
pub struct Postgres {
    // Field order is drop order: the server before its directory.
    server: ManagedProcess,
    bin_dir: PathBuf,
    work_dir: PathBuf,
    port: u16,
}

/// Where the shared server is (its process belongs to a thread that lives as long as the test
/// process).
#[derive(Clone, Debug)]
pub struct SharedPostgres {
    pub bin_dir: PathBuf,
    pub port: u16,
    pub pid: u32,
}

impl SharedPostgres {
    /// A new empty database; its URL.
    pub fn database(&self, prefix: &str) -> Result<String> {
        create_database(&self.bin_dir, self.port, prefix)
    }

    /// The URL of the `postgres` database (for administration).
    pub fn admin_url(&self) -> String {
        url(self.port, "postgres")
    }

    /// Runs `sql` with `psql` on the database at `url`; what it printed (unaligned, tuples
    /// only: one row a line, `|` between columns).
    pub fn psql(&self, url: &str, sql: &str) -> Result<String> {
        psql(&self.bin_dir, url, sql)
    }
}

fn psql(bin_dir: &Path, url: &str, sql: &str) -> Result<String> {
    let output = Command::new(bin_dir.join("psql"))
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            url,
            "-c",
            sql,
        ])
        .output()
        .map_err(|e| Error::io("run psql", e))?;
    if !output.status.success() {
        return Err(Error::Postgres(format!(
            "psql: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

impl Postgres {
    /// Runs `initdb` in a new directory on tmpfs and starts the server on a free port; waits
    /// until it accepts connections. The server dies with the calling thread.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// [`Postgres::start`] serving TLS with `serving` (its certificate and key), and refusing
    /// every TCP connection that is not TLS (`hostnossl ... reject`): a client that connects
    /// at all spoke TLS. The role `scram`, if a test creates it, signs in by SCRAM-SHA-256
    /// (with channel binding when the client offers it); every other role is trusted. Tools of this module (`psql`, `createdb`) connect with
    /// `sslmode=require`.
    pub fn start_tls(serving: &super::pki::CertifiedKey) -> Result<Self> {
        Self::start_with(Some(serving))
    }

    fn start_with(serving: Option<&super::pki::CertifiedKey>) -> Result<Self> {
        let bin_dir = bin_dir()?;
        let user = server_user()?;
        let root = super::default_work_root();
        super::remove_stale_work_dirs(&root, WORK_DIR_PREFIX);
        let work_dir = root.join(format!(
            "{WORK_DIR_PREFIX}{}-{}",
            std::process::id(),
            super::unique_suffix()
        ));
        make_dir(&work_dir, user)?;
        let data_dir = work_dir.join("data");
        initdb(&bin_dir, &data_dir, &work_dir, user)?;
        let mut tls_args = Vec::new();
        if let Some(serving) = serving {
            let cert = work_dir.join("server.crt");
            let key = work_dir.join("server.key");
            let hba = work_dir.join("pg_hba.conf");
            write_owned(&cert, serving.cert_pem.as_bytes(), user)?;
            // Postgres refuses a key others may read.
            write_owned(&key, serving.key_pem.as_bytes(), user)?;
            write_owned(
                &hba,
                b"local all all trust\nhostnossl all all 127.0.0.1/32 reject\nhostssl all scram 127.0.0.1/32 scram-sha-256\nhostssl all all 127.0.0.1/32 trust\n",
                user,
            )?;
            for (name, path) in [
                ("ssl_cert_file", &cert),
                ("ssl_key_file", &key),
                ("hba_file", &hba),
            ] {
                tls_args.push("-c".to_string());
                tls_args.push(format!("{name}={}", path.display()));
            }
            tls_args.extend(["-c".to_string(), "ssl=on".to_string()]);
        }
        let mut last_error = None;
        for _ in 0..super::PORT_ATTEMPTS {
            let port = process::free_port()?;
            let args: Vec<String> = [
                "-D",
                &data_dir.display().to_string(),
                "-p",
                &port.to_string(),
                "-k",
                &work_dir.display().to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                // On tmpfs durability is moot; these keep a test server quick and small.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=32MB",
                "-c",
                "max_connections=300",
                // Its shared memory segments as files in the data directory, not in /dev/shm
                // where a killed server would leave them behind.
                "-c",
                "dynamic_shared_memory_type=mmap",
            ]
            .iter()
            .map(|a| a.to_string())
            .chain(tls_args.iter().cloned())
            .collect();
            let log = work_dir.join("postgres.log");
            let server = match user {
                Some(user) => {
                    ManagedProcess::spawn_as("postgres", &bin_dir.join("postgres"), &args, user, &log)?
                }
                None => ManagedProcess::spawn("postgres", &bin_dir.join("postgres"), &args, &log)?,
            };
            let mut postgres = Self {
                server,
                bin_dir: bin_dir.clone(),
                work_dir: work_dir.clone(),
                port,
            };
            match postgres.wait_ready() {
                Ok(()) => return Ok(postgres),
                Err(e @ Error::Exited { .. })
                    if postgres
                        .server
                        .log_tail(50)
                        .to_lowercase()
                        .contains("address already in use") =>
                {
                    // Keep the directory for the next attempt.
                    postgres.work_dir = PathBuf::new();
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    /// The server of this test process, started on first use on a thread that never ends.
    pub fn shared() -> Result<&'static SharedPostgres> {
        static SHARED: OnceLock<Result<SharedPostgres, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| {
                let (sender, receiver) = std::sync::mpsc::channel();
                std::thread::Builder::new()
                    .name("postgres".into())
                    .spawn(move || match Postgres::start() {
                        Ok(postgres) => {
                            let _ = sender.send(Ok(SharedPostgres {
                                bin_dir: postgres.bin_dir.clone(),
                                port: postgres.port,
                                pid: postgres.pid(),
                            }));
                            // The forking thread must live as long as the server should.
                            let _keep = postgres;
                            loop {
                                std::thread::park();
                            }
                        }
                        Err(e) => {
                            let _ = sender.send(Err(e.to_string()));
                        }
                    })
                    .map_err(|e| format!("spawn the postgres thread: {e}"))?;
                receiver
                    .recv()
                    .map_err(|_| "the postgres thread ended without a result".to_string())?
            })
            .as_ref()
            .map_err(|e| Error::Postgres(e.clone()))
    }

    /// The URL of the `postgres` database.
    pub fn url(&self) -> String {
        url(self.port, "postgres")
    }

    /// A new empty database; its URL.
    pub fn database(&self, prefix: &str) -> Result<String> {
        create_database(&self.bin_dir, self.port, prefix)
    }

    /// [`SharedPostgres::psql`].
    pub fn psql(&self, url: &str, sql: &str) -> Result<String> {
        psql(&self.bin_dir, url, sql)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// Stops the server (a fast shutdown, then SIGKILL) and starts it again on the same port
    /// and data; waits until it accepts connections. What clients see: their connections
    /// break, new ones are refused until it is back.
    pub fn restart(&mut self) -> Result<()> {
        self.shut_down_fast();
        self.server.restart(Duration::from_secs(10))?;
        self.wait_ready()
    }

    /// [`Postgres::restart`] with the server down for `outage` in between (clients meanwhile
    /// find nothing listening).
    pub fn restart_after(&mut self, outage: Duration) -> Result<()> {
        self.shut_down_fast();
        std::thread::sleep(outage);
        self.server.restart(Duration::from_secs(10))?;
        self.wait_ready()
    }

    /// SIGINT, Postgres' fast shutdown: clients are disconnected rather than waited for (the
    /// SIGTERM of [`ManagedProcess::stop`] is its smart shutdown, which waits for them).
    fn shut_down_fast(&mut self) {
        if self.server.exited().is_some() {
            return;
        }
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.server.pid() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.server.exited().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = self.server.exited() {
                return Err(Error::Exited {
                    name: "postgres".into(),
                    status: status.to_string(),
                    log: self.server.log_path().display().to_string(),
                    tail: self.server.log_tail(30),
                });
            }
            let ready = Command::new(self.bin_dir.join("pg_isready"))
                .args([
                    "-q",
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    SUPERUSER,
                ])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::NotReady {
                    name: "postgres".into(),
                    seconds: READY_TIMEOUT.as_secs(),
                    log: self.server.log_path().display().to_string(),
                    tail: self.server.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.shut_down_fast();
        self.server.stop(Duration::from_secs(5));
        if !self.work_dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.work_dir);
        }
    }
}

fn url(port: u16, database: &str) -> String {
    format!("postgres://{SUPERUSER}@127.0.0.1:{port}/{database}")
}

fn create_database(bin_dir: &Path, port: u16, prefix: &str) -> Result<String> {
    let name: String = format!("{prefix}_{}_{}", std::process::id(), super::unique_suffix())
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let output = Command::new(bin_dir.join("createdb"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", SUPERUSER, &name])
        .output()
        .map_err(|e| Error::io("run createdb", e))?;
    if !output.status.success() {
        return Err(Error::Postgres(format!(
            "createdb {name}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(url(port, &name))
}

/// The newest Postgres of Debian's packages (`/usr/lib/postgresql/<version>/bin`), or
/// `SHAPEBLOCK_POSTGRES_BIN`.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("SHAPEBLOCK_POSTGRES_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    newest.map(|(_, bin)| bin).ok_or_else(|| Error::MissingBinary {
        binary: "initdb and postgres".into(),
        dir: format!("{}/*/bin (apt-get install postgresql)", root.display()),
    })
}

/// The user the server runs as: `None` (this process's) unless it is root, which initdb and
/// postgres refuse; then the `postgres` user Debian's package creates.
fn server_user() -> Result<Option<User>> {
    // SAFETY: plain geteuid(2).
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new(SUPERUSER).expect("no NUL");
    // SAFETY: getpwnam with a valid C string; the fields are copied out before any other
    // call could reuse its static buffer (tests start servers one at a time).
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return Err(Error::Postgres(
            "running as root, and there is no `postgres` user to run Postgres as (apt-get install postgresql makes it)".into(),
        ));
    }
    // SAFETY: non-null entry from getpwnam.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some((uid, gid)))
}

/// A file only its owner (the server's user) may read.
fn write_owned(path: &Path, data: &[u8], user: Option<User>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, data).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .map_err(|e| Error::io(format!("chown {}", path.display()), e))?;
    }
    Ok(())
}

fn make_dir(dir: &Path, user: Option<User>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .map_err(|e| Error::io(format!("chown {}", dir.display()), e))?;
    }
    Ok(())
}

fn initdb(bin_dir: &Path, data_dir: &Path, work_dir: &Path, user: Option<User>) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let log = work_dir.join("initdb.log");
    let out = std::fs::File::create(&log).map_err(|e| Error::io(format!("create {}", log.display()), e))?;
    let err = out.try_clone().map_err(|e| Error::io("clone log handle", e))?;
    let mut command = Command::new(bin_dir.join("initdb"));
    command
        .arg("-D")
        .arg(data_dir)
        .args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--no-sync",
            "--no-locale",
            "-E",
            "UTF8",
        ])
        .current_dir(work_dir)
        .stdout(out)
        .stderr(err);
    if let Some((uid, gid)) = user {
        command.uid(uid).gid(gid);
    }
    let status = command.status().map_err(|e| Error::io("run initdb", e))?;
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        return Err(Error::Postgres(format!("initdb failed ({status}):\n{text}")));
    }
    Ok(())
}

/// The variable that puts the hubs of the integration tests on Postgres.
pub const HUB_STORE_VAR: &str = "SHAPEBLOCK_TEST_HUB_STORE";

/// With `SHAPEBLOCK_TEST_HUB_STORE=postgres`, a new database on this process's shared server
/// for one test hub, so the hub's integration tests can run on Postgres; otherwise `None`
/// (the hub keeps SQLite in its data directory, the default).
pub fn hub_database_for_tests(prefix: &str) -> Result<Option<String>> {
    match std::env::var(HUB_STORE_VAR).as_deref() {
        Ok("postgres") => Ok(Some(Postgres::shared()?.database(prefix)?)),
        Ok("sqlite") | Ok("") | Err(_) => Ok(None),
        Ok(other) => Err(Error::Postgres(format!(
            "{HUB_STORE_VAR}={other:?}: expected postgres or sqlite"
        ))),
    }
}
