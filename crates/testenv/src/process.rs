//! Child processes of the test control plane that cannot outlive their parent.
//!
//! Every child gets its own process group (so a signal reaches anything it forks) and a
//! parent-death signal, so that a test binary that panics, is killed, or simply exits with the
//! control plane in a `static` (which is never dropped) leaves no orphans behind.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Error, Result};

/// A running child whose output goes to a log file.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log: PathBuf,
    // What it was started with, for `restart`.
    binary: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    user: Option<User>,
}

/// An OS user (uid, gid) a child runs as, for programs that refuse root (Postgres).
pub type User = (u32, u32);

impl ManagedProcess {
    /// Starts `binary` with `args`, output appended to `log`.
    ///
    /// Linux delivers the parent-death signal when the *thread* that forked the child exits,
    /// so callers must spawn from a thread that lives as long as the process should.
    pub fn spawn(name: &str, binary: &Path, args: &[String], log: &Path) -> Result<Self> {
        Self::spawn_with_env(name, binary, args, &[], log)
    }

    /// [`ManagedProcess::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(String, String)],
        log: &Path,
    ) -> Result<Self> {
        let out = File::create(log).map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        Self::spawn_to(name, binary, args, env, None, log, out)
    }

    /// [`ManagedProcess::spawn`] as another OS user. The parent-death signal is set after the
    /// switch: changing the user clears it.
    pub fn spawn_as(name: &str, binary: &Path, args: &[String], user: User, log: &Path) -> Result<Self> {
        let out = File::create(log).map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        Self::spawn_to(name, binary, args, &[], Some(user), log, out)
    }

    /// Stops the process (SIGTERM, SIGKILL after `grace`) and starts it again with the same
    /// binary, arguments and environment, appending to the same log. The new process dies with
    /// the thread that calls this.
    pub fn restart(&mut self, grace: Duration) -> Result<()> {
        self.stop(grace);
        let out = File::options()
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io(format!("open {}", self.log.display()), e))?;
        let next = Self::spawn_to(
            &self.name,
            &self.binary,
            &self.args,
            &self.env,
            self.user,
            &self.log,
            out,
        )?;
        *self = next;
        Ok(())
    }

    fn spawn_to(
        name: &str,
        binary: &Path,
        args: &[String],
        env: &[(String, String)],
        user: Option<User>,
        log: &Path,
        out: File,
    ) -> Result<Self> {
        let err = out.try_clone().map_err(|e| Error::io("clone log handle", e))?;
        let parent = std::process::id() as libc::pid_t;
        let mut command = Command::new(binary);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let Some((uid, gid)) = user {
            // std switches the user before the pre_exec hook below runs.
            command.uid(uid).gid(gid);
        }
        // SAFETY: only async-signal-safe libc calls between fork and exec.
        unsafe {
            command.pre_exec(move || {
                if libc::setpgid(0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The parent may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .map_err(|e| Error::io(format!("start {} ({})", name, binary.display()), e))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            binary: binary.to_owned(),
            args: args.to_vec(),
            env: env.to_vec(),
            user,
        })
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of the process's log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// SIGTERM to the process group, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let group = -(self.child.id() as libc::pid_t);
        // SAFETY: plain kill(2) on a process group we created.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if self.exited().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// A TCP port on loopback that was free a moment ago. Another process may take it before the
/// child binds it, so callers retry on "address already in use".
pub fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind(("127.0.0.1", 0)).map_err(|e| Error::io("find a free port", e))?;
    Ok(listener
        .local_addr()
        .map_err(|e| Error::io("find a free port", e))?
        .port())
}

/// Whether a log tail says a port was already taken.
pub fn port_conflict(log_tail: &str) -> bool {
    log_tail.contains("address already in use")
}

/// Established TCP connections of process `pid` to `port` (on any address): its socket inodes
/// matched against the kernel's TCP tables.
pub fn tcp_connections_to(pid: u32, port: u16) -> usize {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return 0;
    };
    let inodes: std::collections::HashSet<String> = fds
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(target.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let wanted = format!(":{port:04X}");
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|table| std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).ok())
        .flat_map(|text| {
            text.lines()
                .skip(1)
                .map(|line| line.split_whitespace().map(String::from).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        // Columns: sl, local, remote, state (01: established), ..., inode (the tenth).
        .filter(|columns| {
            columns.len() > 9
                && columns[2].ends_with(&wanted)
                && columns[3] == "01"
                && inodes.contains(&columns[9])
        })
        .count()
}

/// Peak resident memory (VmHWM) of a process so far, in KiB; `None` once it is gone.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
