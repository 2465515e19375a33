//! One real node beside the kwok nodes: a kubelet built from the control plane's pinned
//! `k8s.io/kubernetes` (tools/kubelet), Debian's containerd and runc, and a CNI bridge from
//! Debian's plugins on a private range of this machine. Opt-in: only tests that call
//! [`real_node`] (or [`RealNode::start`]) start it, so the kwok suite stays as fast as it is.
//!
//! The node is tainted [`TAINT_KEY`]`=true:NoSchedule` and labelled [`LABEL_KEY`]`=true`:
//! a pod lands there only if it tolerates the taint and selects the label.
//!
//! Images never come from a network: the pod sandbox's pause image and a tiny HTTP server
//! ([`HELLO_IMAGE`]) are static Go programs (tools/node-images) that this module packs as OCI
//! archives and imports into containerd's `k8s.io` namespace before the kubelet starts.
//!
//! No orphans, even after a `kill -9` of the test binary: containerd, its shims, the
//! containers and the kubelet run inside one `unshare --pid --fork --mount-proc --kill-child`
//! (a [`ManagedProcess`]: own process group, parent-death signal). When that process dies the
//! kernel kills everything in its PID namespace, and the private mount namespace takes every
//! mount the kubelet and containerd made (overlay roots, volume tmpfs, network namespaces)
//! with it. What outlives the processes (the bridge, empty cgroup directories, the working
//! directory) is removed on drop, at exit for the shared node, and otherwise by the next
//! start that takes the same slot (a lock file held by the live owner).
//!
//! Needs root (cgroups, a bridge, mounts), which the test machine is.
//!
//! Past 600 lines: start-up, images and clean-up are one lifetime of one node; splitting them
//! would hide the order the no-orphan guarantee depends on.

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

pub use super::images::{OciImage, digest};
use super::process::free_port;
use super::{Error, ManagedProcess, Result};

/// The taint the node registers with: only pods that tolerate it schedule there.
pub const TAINT_KEY: &str = "shapeblock.io/real-node";
/// The label pods select the node by.
pub const LABEL_KEY: &str = "shapeblock.io/real-node";
/// The pod sandbox image (containerd's `sandbox_image`), imported locally.
pub const PAUSE_IMAGE: &str = "shapeblock.local/pause:test";
/// An HTTP server on `$PORT` (8080) answering `GET /` with `$BODY` ("hello") and
/// `GET /healthz` with "ok". Use it with `imagePullPolicy: Never` or `IfNotPresent`.
pub const HELLO_IMAGE: &str = "shapeblock.local/hello:test";

/// How many real nodes can run on this machine at once (test binaries of several runs).
const SLOTS: u8 = 8;
const CTR: &str = "ctr";

/// A running real node. Dropping it stops the kubelet and containerd (and with them every
/// container) and removes what they left.
pub struct RealNode {
    /// The Node's name, `shapeblock-real-<slot>`.
    pub name: String,
    /// The node's InternalIP: the bridge's address, where the kubelet listens.
    pub node_ip: Ipv4Addr,
    /// The pods' subnet (`10.250.<slot>.0/24`: outside kwok's simulated 10.244.0.0/16 and the
    /// service range, so a pod IP always means this node).
    pub pod_cidr: String,
    process: Option<ManagedProcess>,
    slot: Slot,
    kubeconfig: PathBuf,
}

/// What a slot owns on the machine. Derived from the slot number alone, so a later start can
/// find and remove what a killed owner left.
#[derive(Clone, Debug)]
struct Slot {
    number: u8,
    dir: PathBuf,
    bridge: String,
    cgroup: String,
    /// Held (flock) while the slot is in use; closed on exit, so a dead owner frees it.
    _lock: std::sync::Arc<File>,
}

impl Slot {
    fn take() -> Result<Self> {
        let root = std::env::temp_dir();
        for number in 0..SLOTS {
            let path = root.join(format!("shapeblock-realnode-{number}.lock"));
            let file = File::create(&path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
            // SAFETY: flock(2) on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Self {
                    number,
                    dir: root.join(format!("shapeblock-realnode-{number}")),
                    bridge: format!("sbreal{number}"),
                    cgroup: format!("shapeblock-real-{number}"),
                    _lock: std::sync::Arc::new(file),
                });
            }
        }
        Err(Error::RealNode(format!(
            "all {SLOTS} real-node slots are in use (lock files {}/shapeblock-realnode-*.lock)",
            root.display()
        )))
    }

    fn node_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 250, self.number, 1)
    }

    fn pod_cidr(&self) -> String {
        format!("10.250.{}.0/24", self.number)
    }

    /// Removes what a previous owner of this slot (or this one) left: mounts under the
    /// directory, the bridge, the cgroup directories (killing anything still in them), the
    /// directory.
    fn clean(&self) {
        unmount_under(&self.dir);
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(std::process::Stdio::null())
            .status();
        // runc also mirrors v1 cgroups into a hybrid host's unified hierarchy: clean both.
        let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let (v1, v2) = cgroup_hierarchies(&text);
        for mount in v1.into_iter().chain(v2) {
            remove_cgroup_tree(&mount.join(&self.cgroup));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The settings a slot's files are rendered from.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeLayout {
    pub name: String,
    pub dir: PathBuf,
    pub bridge: String,
    pub node_ip: Ipv4Addr,
    pub pod_cidr: String,
    pub cgroup_root: String,
    pub kubelet_port: u16,
}

impl NodeLayout {
    fn socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// containerd's registry hosts directory: `<host:port>/hosts.toml` (and a CA) per registry
    /// the node trusts, read at every pull.
    pub fn certs_dir(&self) -> PathBuf {
        self.dir.join("containerd/certs.d")
    }
}

/// containerd's configuration: everything under the node's directory, its own socket, CNI
/// from Debian's plugins, the local pause image.
///
/// `restrict_oom_score_adj`: the sandbox's capability set lacks CAP_SYS_RESOURCE, so the
/// kernel refuses the negative `oom_score_adj` the CRI plugin gives sandboxes (-998) and runc
/// fails with "can't get final child's PID from pipe: EOF"; this caps scores at containerd's
/// own (as for rootless containerd).
pub fn containerd_config(layout: &NodeLayout) -> String {
    let dir = layout.dir.join("containerd");
    let d = dir.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_unprivileged_ports = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
    SystemdCgroup = false
"#,
        socket = layout.socket().display(),
        cni_bin = cni_bin_dir().display(),
        cni_conf = layout.dir.join("cni").display(),
        certs = layout.certs_dir().display(),
    )
}

/// The CNI network: Debian's bridge plugin on the slot's bridge (which [`RealNode::start`]
/// creates with the node address, so the kubelet can listen there before the first pod),
/// host-local addresses in the pod subnet, state under the node's directory. No masquerade:
/// pods talk to this machine and to each other only.
pub fn cni_config(layout: &NodeLayout) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "shapeblock-real",
        "plugins": [{
            "type": "bridge",
            "bridge": layout.bridge,
            "isGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": layout.pod_cidr, "gateway": layout.node_ip.to_string()}]],
                "dataDir": layout.dir.join("cni-ipam"),
            },
        }],
    })
    .to_string()
}

/// The KubeletConfiguration (JSON is YAML).
///
/// - `failCgroupV1: false`: since 1.35 the kubelet refuses to start on a cgroup v1 host unless
///   told otherwise; this machine mounts only v1 controllers (and an empty unified hierarchy).
/// - `cgroupDriver: cgroupfs` (no systemd here), pods under the slot's own `cgroupRoot`, which
///   the kubelet requires to exist, so that two nodes (two test runs) do not share `/kubepods`.
/// - `failSwapOn: false`; eviction thresholds near zero and image GC off, so that a full disk
///   on a shared test machine does not evict test pods or delete the imported images.
/// - The kubelet's API: client certificates of the cluster CA are not wired up, so it allows
///   anonymous requests (logs, exec from the apiserver). It listens only on the bridge address,
///   inside this machine.
pub fn kubelet_config(layout: &NodeLayout) -> String {
    serde_json::json!({
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "failCgroupV1": false,
        "failSwapOn": false,
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": format!("/{}", layout.cgroup_root),
        "address": layout.node_ip.to_string(),
        "port": layout.kubelet_port,
        "readOnlyPort": 0,
        "healthzPort": 0,
        "authentication": {"anonymous": {"enabled": true}, "webhook": {"enabled": false}},
        "authorization": {"mode": "AlwaysAllow"},
        "registerWithTaints": [{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}],
        "evictionHard": {
            "memory.available": "1Mi",
            "nodefs.available": "1%",
            "nodefs.inodesFree": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "containerRuntimeEndpoint": format!("unix://{}", layout.socket().display()),
        "resolvConf": "",
        "serializeImagePulls": false,
        "syncFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
    })
    .to_string()
}

/// The script run as PID 1 of the node's namespaces: containerd, the image imports, then the
/// kubelet; when either daemon exits, so does the script and with it the namespace.
pub fn node_script(layout: &NodeLayout, kubelet: &Path, kubeconfig: &Path, images: &[PathBuf]) -> String {
    let dir = &layout.dir;
    let q = |p: &Path| shell_quote(&p.display().to_string());
    let socket = q(&layout.socket());
    let mut script = format!(
        "set -eu\n\
         containerd --config {config} >>{clog} 2>&1 &\n\
         for _ in $(seq 300); do [ -S {socket} ] && break; sleep 0.1; done\n\
         [ -S {socket} ] || {{ echo 'containerd did not open its socket within 30s'; exit 1; }}\n",
        config = q(&dir.join("containerd/config.toml")),
        clog = q(&dir.join("containerd.log")),
    );
    for image in images {
        script.push_str(&format!(
            "{CTR} --address {socket} -n k8s.io images import {} >/dev/null\n",
            q(image)
        ));
    }
    script.push_str(&format!(
        "{kubelet} --config={config} --kubeconfig={kubeconfig} --root-dir={root} --cert-dir={certs} \
         --hostname-override={name} --node-ip={ip} --node-labels={LABEL_KEY}=true --v=2 >>{klog} 2>&1 &\n\
         wait -n\n\
         echo 'containerd or the kubelet exited'\n\
         exit 1\n",
        kubelet = q(kubelet),
        config = q(&dir.join("kubelet-config.yaml")),
        kubeconfig = q(kubeconfig),
        root = q(&dir.join("kubelet")),
        certs = q(&dir.join("kubelet-pki")),
        name = shell_quote(&layout.name),
        ip = layout.node_ip,
        klog = q(&dir.join("kubelet.log")),
    ));
    script
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

impl RealNode {
    /// Starts containerd and the kubelet against the cluster of `kubeconfig` (an admin's: the
    /// node registers itself and reads everything a kubelet reads), waits until the Node is
    /// Ready and schedulable. `bin_dir` holds `kubelet`, `node-image-pause`, `node-image-hello`
    /// (tools/build-control-plane.sh).
    ///
    /// The children die with the thread that calls this (see [`ManagedProcess::spawn`]).
    pub async fn start(bin_dir: &Path, kubeconfig: &Path, timeout: Duration) -> Result<Self> {
        check_prerequisites(bin_dir)?;
        let slot = Slot::take()?;
        slot.clean();
        let layout = NodeLayout {
            name: format!("shapeblock-real-{}", slot.number),
            dir: slot.dir.clone(),
            bridge: slot.bridge.clone(),
            node_ip: slot.node_ip(),
            pod_cidr: slot.pod_cidr(),
            cgroup_root: slot.cgroup.clone(),
            kubelet_port: free_port()?,
        };
        let mut node = Self {
            name: layout.name.clone(),
            node_ip: layout.node_ip,
            pod_cidr: layout.pod_cidr.clone(),
            process: None,
            slot,
            kubeconfig: kubeconfig.to_owned(),
        };
        node.prepare(&layout)?;
        let images = [
            write_image(&layout.dir, PAUSE_IMAGE, &bin_dir.join("node-image-pause"))?,
            write_image(&layout.dir, HELLO_IMAGE, &bin_dir.join("node-image-hello"))?,
        ];
        let script = node_script(&layout, &bin_dir.join("kubelet"), kubeconfig, &images);
        let script_path = layout.dir.join("node.sh");
        super::write_file(&script_path, &script)?;
        let process = ManagedProcess::spawn(
            "real node (containerd, kubelet)",
            Path::new("unshare"),
            &[
                "--pid".into(),
                "--fork".into(),
                "--mount-proc".into(),
                "--kill-child".into(),
                // Host mounts show inside; the node's own never leave its namespace.
                "--propagation".into(),
                "slave".into(),
                "bash".into(),
                script_path.display().to_string(),
            ],
            &layout.dir.join("node.log"),
        )?;
        let process = node.process.insert(process);
        let client = super::client_from_kubeconfig(kubeconfig).await?;
        wait_node_ready(&client, &layout, process, timeout).await?;
        Ok(node)
    }

    /// The directories, files, cgroup roots and bridge the processes expect.
    fn prepare(&self, layout: &NodeLayout) -> Result<()> {
        let dir = &layout.dir;
        for sub in [
            "containerd",
            "containerd/certs.d",
            "cni",
            "kubelet",
            "kubelet-pki",
            "cni-ipam",
        ] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path).map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        }
        super::write_file(&dir.join("containerd/config.toml"), &containerd_config(layout))?;
        super::write_file(&dir.join("cni/10-shapeblock-real.conflist"), &cni_config(layout))?;
        super::write_file(&dir.join("kubelet-config.yaml"), &kubelet_config(layout))?;
        create_cgroup_roots(&layout.cgroup_root)?;
        let prefix = format!("{}/24", layout.node_ip);
        for args in [
            vec!["link", "add", layout.bridge.as_str(), "type", "bridge"],
            vec!["addr", "add", prefix.as_str(), "dev", layout.bridge.as_str()],
            vec!["link", "set", layout.bridge.as_str(), "up"],
        ] {
            run("ip", &args)?;
        }
        Ok(())
    }

    /// The node's working directory (containerd's root, the kubelet's, logs).
    pub fn dir(&self) -> &Path {
        &self.slot.dir
    }

    /// The bridge its pods are on.
    pub fn bridge(&self) -> &str {
        &self.slot.bridge
    }

    /// Every process of the node now: the namespace's `unshare` and all in its process group
    /// and PID namespace (containerd, shims, containers, the kubelet), by host PID.
    pub fn pids(&self) -> Vec<u32> {
        let Some(process) = &self.process else {
            return Vec::new();
        };
        let root = process.pid();
        let mut pids = vec![root];
        // Children of children: the PID namespace's members all descend from `unshare`.
        let mut frontier = vec![root];
        while let Some(parent) = frontier.pop() {
            let children =
                std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                pids.push(child);
                frontier.push(child);
            }
        }
        pids
    }

    /// The containerd and kubelet logs, for a failing test's message.
    pub fn log_tails(&self, lines: usize) -> String {
        log_tails(&self.slot.dir, lines)
    }
}

impl Drop for RealNode {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            // SIGTERM lets the kubelet and containerd end; `unshare` ignores it and goes when
            // its child (the script) does, or at the SIGKILL after the grace period.
            process.stop(Duration::from_secs(5));
        }
        self.slot.clean();
        // The Node object would look Ready to the scheduler until the node lifecycle
        // controller's grace period ends, and take the next test's pods: remove it. Drop may
        // run inside a runtime, so on a thread of its own.
        let (kubeconfig, name) = (self.kubeconfig.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let client = super::client_from_kubeconfig(&kubeconfig).await.ok()?;
                let nodes: Api<Node> = Api::all(client);
                tokio::time::timeout(Duration::from_secs(10), nodes.delete(&name, &Default::default()))
                    .await
                    .ok()?
                    .ok()
            })
        })
        .join();
    }
}

fn log_tails(dir: &Path, lines: usize) -> String {
    ["node.log", "containerd.log", "kubelet.log"]
        .iter()
        .map(|name| {
            let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            format!(
                "--- {} ---\n{}",
                dir.join(name).display(),
                all[all.len().saturating_sub(lines)..].join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn wait_node_ready(
    client: &kube::Client,
    layout: &NodeLayout,
    process: &mut ManagedProcess,
    timeout: Duration,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = process.exited() {
            return Err(Error::Exited {
                name: process.name().into(),
                status: status.to_string(),
                log: layout.dir.display().to_string(),
                tail: log_tails(&layout.dir, 30),
            });
        }
        if let Some(node) = nodes.get_opt(&layout.name).await?
            && node_ready(&node)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::NotReady {
                name: format!("real node {}", layout.name),
                seconds: timeout.as_secs(),
                log: layout.dir.display().to_string(),
                tail: log_tails(&layout.dir, 30),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Ready, and no longer carrying the not-ready taint the node lifecycle controller removes
/// (until then the scheduler will not place pods there).
pub fn node_ready(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key.starts_with("node.kubernetes.io/")));
    ready && !tainted
}

fn cni_bin_dir() -> PathBuf {
    std::env::var_os("SHAPEBLOCK_CNI_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/cni"))
}

fn check_prerequisites(bin_dir: &Path) -> Result<()> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Error::RealNode(
            "a real node needs root (cgroups, a bridge, mounts)".into(),
        ));
    }
    for binary in ["kubelet", "node-image-pause", "node-image-hello"] {
        if !bin_dir.join(binary).is_file() {
            return Err(Error::MissingBinary {
                binary: binary.into(),
                dir: bin_dir.display().to_string(),
            });
        }
    }
    let missing: Vec<&str> = [
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        CTR,
        "ip",
        "unshare",
        "bash",
    ]
    .into_iter()
    .filter(|tool| !on_path(tool))
    .collect();
    let cni = cni_bin_dir();
    let missing_cni: Vec<&str> = ["bridge", "host-local", "loopback"]
        .into_iter()
        .filter(|plugin| !cni.join(plugin).is_file())
        .collect();
    if !missing.is_empty() || !missing_cni.is_empty() {
        return Err(Error::RealNode(format!(
            "missing {} {}: apt-get install containerd runc containernetworking-plugins iproute2 \
             (or set SHAPEBLOCK_CNI_BIN_DIR)",
            missing.join(" "),
            missing_cni
                .iter()
                .map(|p| format!("{}/{p}", cni.display()))
                .collect::<Vec<_>>()
                .join(" ")
        )));
    }
    Ok(())
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    let output = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| Error::io(format!("run {program}"), e))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(Error::RealNode(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// Mount points of cgroup hierarchies: every v1 controller's, or the v2 root.
fn cgroup_mounts() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    parse_cgroup_mounts(&text)
}

/// From `/proc/self/mountinfo`: v1 hierarchies if there are any (the kubelet uses them then,
/// and an empty unified hierarchy beside them is not its business), else the v2 root.
fn parse_cgroup_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let (v1, v2) = cgroup_hierarchies(mountinfo);
    if v1.is_empty() { v2 } else { v1 }
}

/// The v1 and the v2 cgroup mount points in `/proc/self/mountinfo`.
fn cgroup_hierarchies(mountinfo: &str) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in mountinfo.lines() {
        // Fields: id parent major:minor root mount-point options [optional...] - fstype ...
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mount_point) = left.split(' ').nth(4) else {
            continue;
        };
        match right.split(' ').next() {
            Some("cgroup") => v1.push(PathBuf::from(mount_point)),
            Some("cgroup2") => v2.push(PathBuf::from(mount_point)),
            _ => {}
        }
    }
    (v1, v2)
}

fn create_cgroup_roots(name: &str) -> Result<()> {
    for mount in cgroup_mounts() {
        let dir = mount.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        // A v1 cpuset takes no tasks until it has CPUs and memory nodes: its parent's.
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(mount.join(file)) {
                let path = dir.join(file);
                if std::fs::read_to_string(&path).is_ok_and(|v| v.trim().is_empty()) {
                    std::fs::write(&path, value.trim())
                        .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
                }
            }
        }
    }
    Ok(())
}

/// Kills whatever is still in a cgroup subtree and removes it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&entry.path());
        }
    }
    for attempt in 0..50 {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|p| p.trim().parse::<libc::pid_t>().ok()) {
                // SAFETY: kill(2); these processes belong to this slot's node.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        if attempt > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Unmounts everything mounted at or below `dir` (deepest first). The node's mounts live in
/// its own mount namespace and go with it; this is for anything that reached the host's.
fn unmount_under(dir: &Path) {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = text
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        if let Ok(path) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2(2) with a NUL-terminated path.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Packs `binary` as a one-layer OCI image archive (`/app`, the entrypoint) named `name`, as
/// `ctr images import` reads it, and writes it under `dir`.
fn write_image(dir: &Path, name: &str, binary: &Path) -> Result<PathBuf> {
    let bytes = std::fs::read(binary).map_err(|e| Error::io(format!("read {}", binary.display()), e))?;
    let archive = OciImage::new(&bytes)?.archive(name)?;
    let file = name.replace(['/', ':'], "_");
    let path = dir.join(format!("{file}.oci.tar"));
    std::fs::write(&path, archive).map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    Ok(path)
}

/// The HTTP server's binary ([`HELLO_IMAGE`]'s `/app`), to push elsewhere.
pub fn hello_binary() -> Result<Vec<u8>> {
    let path = super::default_bin_dir().join("node-image-hello");
    std::fs::read(&path).map_err(|e| {
        Error::io(
            format!("read {} (tools/build-control-plane.sh)", path.display()),
            e,
        )
    })
}

/// Where the shared real node is, for tests.
#[derive(Clone, Debug)]
pub struct SharedRealNode {
    /// The Node's name.
    pub name: String,
    /// Its InternalIP (the bridge address; the test process reaches pod IPs through it).
    pub node_ip: Ipv4Addr,
    /// The pods' subnet.
    pub pod_cidr: String,
    /// containerd's, the kubelet's and the node script's logs.
    pub log_dir: PathBuf,
    /// containerd's registry hosts directory ([`NodeLayout::certs_dir`]).
    pub certs_dir: PathBuf,
}

/// The real node of this test process, started on first use beside the shared control plane
/// ([`super::shared`]) and kept until the process exits (then removed by an exit handler).
pub fn real_node() -> Result<&'static SharedRealNode> {
    static NODE: OnceLock<Result<SharedRealNode, String>> = OnceLock::new();
    NODE.get_or_init(|| {
        let plane = super::shared().map_err(|e| e.to_string())?;
        start_on_keeper_thread(plane.kubeconfig.clone())
    })
    .as_ref()
    .map_err(|e| Error::RealNode(e.clone()))
}

/// The shared node's slot, for the exit handler.
static SHARED_SLOT: OnceLock<(Slot, u32)> = OnceLock::new();

extern "C" fn clean_shared_node() {
    if let Some((slot, pid)) = SHARED_SLOT.get() {
        // SAFETY: kill(2) of the node's process group, which this process created.
        unsafe { libc::kill(-(*pid as libc::pid_t), libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(200));
        slot.clean();
    }
}

fn start_on_keeper_thread(kubeconfig: PathBuf) -> Result<SharedRealNode, String> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("real-node".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = sender.send(Err(format!("tokio runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let bin_dir = super::default_bin_dir();
                match RealNode::start(&bin_dir, &kubeconfig, Duration::from_secs(120)).await {
                    Ok(node) => {
                        if let Some(process) = &node.process {
                            let _ = SHARED_SLOT.set((node.slot.clone(), process.pid()));
                            // SAFETY: registering a plain extern "C" fn.
                            unsafe { libc::atexit(clean_shared_node) };
                        }
                        let _ = sender.send(Ok(SharedRealNode {
                            name: node.name.clone(),
                            node_ip: node.node_ip,
                            pod_cidr: node.pod_cidr.clone(),
                            log_dir: node.slot.dir.clone(),
                            certs_dir: node.slot.dir.join("containerd/certs.d"),
                        }));
                        // Keep the forking thread (and with it the children) until exit.
                        let _keep = node;
                        std::future::pending::<()>().await;
                    }
                    Err(e) => {
                        let _ = sender.send(Err(e.to_string()));
                    }
                }
            });
        })
        .map_err(|e| format!("spawn real-node thread: {e}"))?;
    receiver
        .recv()
        .map_err(|_| "real-node thread ended without a result".to_string())?
}

#[cfg(test)]
mod tests {
    use super::super::images::sha256_hex;
    use super::*;

    fn layout() -> NodeLayout {
        NodeLayout {
            name: "shapeblock-real-3".into(),
            dir: PathBuf::from("/tmp/shapeblock-realnode-3"),
            bridge: "sbreal3".into(),
            node_ip: Ipv4Addr::new(10, 250, 3, 1),
            pod_cidr: "10.250.3.0/24".into(),
            cgroup_root: "shapeblock-real-3".into(),
            kubelet_port: 41234,
        }
    }

    #[test]
    fn kubelet_config_allows_cgroup_v1_and_taints_the_node() {
        let config: serde_json::Value = serde_json::from_str(&kubelet_config(&layout())).unwrap();
        assert_eq!(config["failCgroupV1"], false);
        assert_eq!(config["failSwapOn"], false);
        assert_eq!(config["cgroupDriver"], "cgroupfs");
        assert_eq!(config["cgroupRoot"], "/shapeblock-real-3");
        assert_eq!(config["address"], "10.250.3.1");
        assert_eq!(config["port"], 41234);
        assert_eq!(
            config["registerWithTaints"],
            serde_json::json!([{"key": TAINT_KEY, "value": "true", "effect": "NoSchedule"}])
        );
        assert_eq!(
            config["containerRuntimeEndpoint"],
            "unix:///tmp/shapeblock-realnode-3/containerd/containerd.sock"
        );
    }

    #[test]
    fn containerd_keeps_to_the_node_directory() {
        let config = containerd_config(&layout());
        for line in config.lines().filter(|l| l.contains("\"/")) {
            assert!(
                line.contains("/tmp/shapeblock-realnode-3/")
                    || line.contains(&*cni_bin_dir().to_string_lossy()),
                "{line}"
            );
        }
        assert!(config.contains(&format!("sandbox_image = \"{PAUSE_IMAGE}\"")));
        assert!(config.contains("restrict_oom_score_adj = true"));
        assert!(config.contains("runtime_type = \"io.containerd.runc.v2\""));
    }

    #[test]
    fn cni_uses_the_slot_bridge_and_range() {
        let config: serde_json::Value = serde_json::from_str(&cni_config(&layout())).unwrap();
        let bridge = &config["plugins"][0];
        assert_eq!(bridge["bridge"], "sbreal3");
        assert_eq!(bridge["ipMasq"], false);
        assert_eq!(bridge["ipam"]["ranges"][0][0]["subnet"], "10.250.3.0/24");
        assert_eq!(bridge["ipam"]["dataDir"], "/tmp/shapeblock-realnode-3/cni-ipam");
    }

    #[test]
    fn the_script_quotes_its_paths_and_ends_with_the_daemons() {
        let mut l = layout();
        l.dir = PathBuf::from("/tmp/it's here");
        let script = node_script(&l, Path::new("/bin/kubelet"), Path::new("/k/admin"), &[]);
        assert!(
            script.contains(r"--root-dir='/tmp/it'\''s here/kubelet'"),
            "{script}"
        );
        assert!(script.contains("--node-labels=shapeblock.io/real-node=true"));
        assert!(script.trim_end().ends_with("exit 1"));
    }

    #[test]
    fn cgroup_mounts_prefer_v1_hierarchies() {
        let mixed = "\
30 25 0:26 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
31 25 0:27 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
33 1 0:29 / /proc rw - proc proc rw";
        assert_eq!(
            parse_cgroup_mounts(mixed),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu"),
                PathBuf::from("/sys/fs/cgroup/memory")
            ]
        );
        let v2 = "32 25 0:28 / /sys/fs/cgroup rw,relatime shared:4 - cgroup2 cgroup2 rw";
        assert_eq!(parse_cgroup_mounts(v2), vec![PathBuf::from("/sys/fs/cgroup")]);
    }

    #[test]
    fn oci_archive_blobs_match_their_digests() {
        let archive = OciImage::new(b"\x7fELF not really")
            .unwrap()
            .archive("shapeblock.local/x:1")
            .unwrap();
        let mut files = std::collections::HashMap::new();
        for entry in tar::Archive::new(&archive[..]).entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            files.insert(path, bytes);
        }
        for (path, bytes) in &files {
            // Directory entries (`blobs/`, `blobs/sha256/`) carry no bytes.
            if let Some(digest) = path.strip_prefix("blobs/sha256/").filter(|d| !d.is_empty()) {
                assert_eq!(sha256_hex(bytes), digest, "{path}");
            }
        }
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let manifest = &index["manifests"][0];
        assert_eq!(
            manifest["annotations"]["io.containerd.image.name"],
            "shapeblock.local/x:1"
        );
        let digest = manifest["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap();
        let manifest: serde_json::Value =
            serde_json::from_slice(&files[&format!("blobs/sha256/{digest}")]).unwrap();
        let layer = manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .strip_prefix("sha256:")
            .unwrap();
        let mut layer = tar::Archive::new(&files[&format!("blobs/sha256/{layer}")][..]);
        let entry = layer.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(entry.path().unwrap().to_str(), Some("app"));
        assert_eq!(entry.header().mode().unwrap(), 0o755);
    }
}
