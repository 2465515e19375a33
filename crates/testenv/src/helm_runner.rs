//! Plays the kubelet for the helm-controller's install Jobs, whose container is the
//! klipper-helm image: its `entry` script cannot run here and is not a Go module, so its
//! contract is reimplemented, and the real `helm` CLI (Helm 4, built from Go modules) does the
//! work, authenticated with a TokenRequest token of the pod's own ServiceAccount.
//!
//! | klipper-helm input | what the runner does |
//! |---|---|
//! | container `args` (`install --namespace … --version … --set …` or `delete`) | the helm command and its flags, as `"$@"` in `entry` |
//! | `NAME` | release name |
//! | `CHART`, `REPO`, `VERSION` | chart reference; content from `/chart` wins (below) |
//! | `TARGET_NAMESPACE` | `--namespace` of every helm call |
//! | `HELM_DRIVER` | `HELM_DRIVER` of every helm call |
//! | `TIMEOUT` | `--timeout` |
//! | `FAILURE_POLICY` | release `failed`: `reinstall` uninstalls then installs; `retry` upgrades again (the CRD: "retry the install or upgrade whenever chart configuration changes"; the helm-controller starts a Job only on a change); anything else (`abort`) exits 1 "waiting for operator intervention", and the pod restarts with back-off, as `restartPolicy: OnFailure` does |
//! | `SERVER_SIDE`, `FORCE_CONFLICTS` | `--server-side`, `--force-conflicts` |
//! | `CONFIG_HASH` | `--labels helmcharts.helm.cattle.io/configHash=<hash>`; a `deployed` release already labelled with it is left alone (no second run) |
//! | `EXPECTED_RELEASE_REVISION` | the release must be at that revision, or at a later one made from this `CONFIG_HASH` (an earlier attempt of the same Job); else exit 1 without acting (the Job is stale) |
//! | volume at `/config` (projected Secret `chart-values-<name>` and `valuesSecrets`) | files written from the Secrets' keys; each `*.yaml`, in name order, becomes `--values` |
//! | volume at `/chart` (ConfigMap `chart-content-<name>`) | `<NAME>.tgz.base64` is decoded and installed instead of `CHART` |
//! | `serviceAccountName` | TokenRequest bound to the pod; helm talks to the apiserver with it, and the cluster CA from `kube-root-ca.crt` |
//! | `/dev/termination-log` | the container's termination message (with helm's error on failure) |
//! | stdout/stderr | the container log, served through `pods/log` ([`super::kubelet`]) |
//!
//! Not supported (the tests have no network): repositories, `/auth`, `/ca-files`, registry
//! secrets, `BOOTSTRAP`, `HELM_VERSION=v2`.
//!
//! Past 600 lines: the table above is one contract, implemented in one place.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Pod, Secret, ServiceAccount, Volume};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::kubelet::{ContainerRef, logs};
use super::{ManagedProcess, write_private};

/// The label the helm-controller puts on its Jobs' pods.
pub const CHART_LABEL: &str = "helmcharts.helm.cattle.io/chart";
/// The release label that records which HelmChart configuration a release was made from.
pub const CONFIG_HASH_LABEL: &str = "helmcharts.helm.cattle.io/configHash";

/// How long a failed helm container waits before it runs again. The kubelet starts at 10s and
/// doubles to 5 minutes; tests need a shorter clock.
const RESTART_BACKOFF: Duration = Duration::from_secs(5);

/// Starts the runner on the current tokio runtime (the cluster's keeper runtime: helm processes
/// are forked from its thread and die with it).
pub async fn start(client: Client, server: String, helm: PathBuf, work_dir: PathBuf) {
    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    tokio::spawn(async move {
        let pods: Api<Pod> = Api::all(client.clone());
        let params = ListParams::default().labels(CHART_LABEL);
        loop {
            if let Ok(list) = pods.list(&params).await {
                for pod in list.items {
                    let uid = pod.uid().unwrap_or_default();
                    let bound = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).is_some();
                    let pending = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.phase.as_deref())
                        .unwrap_or("Pending")
                        == "Pending";
                    if !bound || !pending || pod.metadata.deletion_timestamp.is_some() {
                        continue;
                    }
                    if !seen.lock().unwrap_or_else(|e| e.into_inner()).insert(uid) {
                        continue;
                    }
                    let runner = Runner {
                        client: client.clone(),
                        server: server.clone(),
                        helm: helm.clone(),
                        work_dir: work_dir.clone(),
                    };
                    tokio::spawn(async move { runner.run_pod(pod).await });
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
}

#[derive(Clone)]
struct Runner {
    client: Client,
    server: String,
    helm: PathBuf,
    work_dir: PathBuf,
}

/// One run of the container: its exit code and termination message.
struct Exit {
    code: i32,
    message: String,
}

impl Runner {
    async fn run_pod(&self, pod: Pod) {
        let namespace = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let spec = pod.spec.clone().unwrap_or_default();
        let Some(container) = spec.containers.first().cloned() else {
            return;
        };
        let log = ContainerRef::new(&namespace, &name, &container.name);
        let restart = spec.restart_policy.as_deref() == Some("OnFailure");
        let started = Timestamp::now();
        let mut restarts = 0;
        let mut last: Option<serde_json::Value> = None;
        loop {
            let running = json!({"running": {"startedAt": Timestamp::now().to_string()}});
            let _ = patch_status(
                &pods,
                &name,
                &pod,
                &container,
                &running,
                last.as_ref(),
                restarts,
                true,
                "Running",
                started,
            )
            .await;
            let exit = match self.attempt(&pod, &container, &log, restarts).await {
                Ok(exit) => exit,
                Err(message) => {
                    logs().append(&log, &message);
                    Exit { code: 1, message }
                }
            };
            let terminated = json!({"terminated": {
                "exitCode": exit.code,
                "reason": if exit.code == 0 { "Completed" } else { "Error" },
                "message": exit.message,
                "startedAt": started.to_string(),
                "finishedAt": Timestamp::now().to_string(),
            }});
            if exit.code == 0 || !restart {
                let phase = if exit.code == 0 { "Succeeded" } else { "Failed" };
                let _ = patch_status(
                    &pods,
                    &name,
                    &pod,
                    &container,
                    &terminated,
                    last.as_ref(),
                    restarts,
                    false,
                    phase,
                    started,
                )
                .await;
                return;
            }
            // restartPolicy OnFailure: the container restarts in the same pod after a back-off.
            restarts += 1;
            let waiting = json!({"waiting": {"reason": "CrashLoopBackOff", "message": format!("back-off restarting failed container {}", container.name)}});
            let _ = patch_status(
                &pods,
                &name,
                &pod,
                &container,
                &waiting,
                Some(&terminated),
                restarts,
                false,
                "Running",
                started,
            )
            .await;
            last = Some(terminated);
            tokio::time::sleep(RESTART_BACKOFF).await;
            match pods.get_opt(&name).await {
                Ok(Some(current))
                    if current.metadata.deletion_timestamp.is_none() && current.uid() == pod.uid() => {}
                _ => return,
            }
        }
    }

    /// One execution of klipper-helm's `entry`.
    async fn attempt(
        &self,
        pod: &Pod,
        container: &Container,
        log: &ContainerRef,
        attempt: i32,
    ) -> Result<Exit, String> {
        let namespace = pod.namespace().unwrap_or_default();
        let env: BTreeMap<String, String> = container
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value.clone().map(|v| (e.name.clone(), v)))
            .collect();
        let var = |key: &str| env.get(key).cloned().unwrap_or_default();
        let dir = self
            .work_dir
            .join("helm-runs")
            .join(format!("{}-{attempt}", pod.uid().unwrap_or_default()));
        for sub in ["config", "chart", "home", "tmp"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| format!("create {}: {e}", dir.display()))?;
        }
        self.mount(pod, container, "/config", &dir.join("config")).await?;
        self.mount(pod, container, "/chart", &dir.join("chart")).await?;
        let kubeconfig = self.service_account_kubeconfig(pod, &dir).await?;
        let release = var("NAME");
        let target = var("TARGET_NAMESPACE");
        let target = if target.is_empty() {
            namespace.clone()
        } else {
            target
        };
        let mut terminal = Vec::<String>::new();
        let helm = Helm {
            binary: &self.helm,
            dir: &dir,
            kubeconfig: &kubeconfig,
            driver: var("HELM_DRIVER"),
            log: log.clone(),
        };

        if var("HELM_VERSION") == "v2" {
            return Ok(Exit {
                code: 64,
                message: "Helm v2 is not supported".into(),
            });
        }
        let args: Vec<String> = container.args.clone().unwrap_or_default();
        let current = helm.current(&release, &target).await?;
        if args.first().map(String::as_str) == Some("delete") {
            if current.is_none() {
                terminal.push("No helm chart installed; nothing to delete".into());
                return Ok(Exit {
                    code: 0,
                    message: terminal.join("\n"),
                });
            }
            terminal.push("Uninstalling helm chart".into());
            let code = helm
                .run(&["uninstall", &release, "--namespace", &target, "--wait"])
                .await?;
            return Ok(helm.exit(code, terminal));
        }

        let config_hash = var("CONFIG_HASH");
        let (revision, status) = current.clone().unwrap_or((0, String::new()));
        let release_hash = if current.is_some() {
            helm.config_hash(&release, &target).await?
        } else {
            None
        };
        let ours = !config_hash.is_empty() && release_hash.as_deref() == Some(config_hash.as_str());
        if status == "deployed" && ours {
            logs().append(
                log,
                &format!("release {release} revision {revision} is deployed with config hash {config_hash}; nothing to do"),
            );
            return Ok(Exit {
                code: 0,
                message: "Release already deployed with this configuration".into(),
            });
        }
        // A newer revision made from this configuration is an earlier attempt of this Job (a
        // restart); any other newer revision means the Job is stale.
        if let Ok(expected) = var("EXPECTED_RELEASE_REVISION").parse::<i64>()
            && expected != revision
            && !ours
        {
            let message = format!(
                "release {release} is at revision {revision} but this job expected {expected}: the release changed since the job was made; not acting"
            );
            logs().append(log, &message);
            return Ok(Exit { code: 1, message });
        }

        let chart = chart_reference(&dir.join("chart"), &release, &var("CHART"))?;
        let mut flags: Vec<String> = args.iter().skip(1).cloned().collect();
        if !flags
            .iter()
            .any(|f| f == "--namespace" || f.starts_with("--namespace="))
        {
            flags.extend(["--namespace".into(), target.clone()]);
        }
        let timeout = var("TIMEOUT");
        if !timeout.is_empty() {
            flags.extend(["--timeout".into(), timeout]);
        }
        if var("FORCE_CONFLICTS") == "true" {
            flags.push("--force-conflicts".into());
        }
        if !config_hash.is_empty() {
            flags.extend(["--labels".into(), format!("{CONFIG_HASH_LABEL}={config_hash}")]);
        }
        let mut values: Vec<PathBuf> = std::fs::read_dir(dir.join("config"))
            .map_err(|e| format!("read values: {e}"))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .collect();
        values.sort();
        for file in values {
            flags.extend(["--values".into(), file.display().to_string()]);
        }
        let server_side = var("SERVER_SIDE");
        let install = |flags: &[String]| {
            let mut all = vec!["install".to_owned(), release.clone(), chart.clone()];
            all.extend(flags.iter().cloned());
            // `install` takes a boolean; "auto" means the default there (server-side).
            if server_side == "false" {
                all.push("--server-side=false".into());
            }
            all
        };
        let upgrade = |flags: &[String]| {
            let mut all = vec!["upgrade".to_owned(), release.clone(), chart.clone()];
            all.extend(flags.iter().cloned());
            if !server_side.is_empty() {
                all.push(format!("--server-side={server_side}"));
            }
            all
        };

        let command = match status.as_str() {
            "" => {
                terminal.push("Installing helm chart".into());
                install(&flags)
            }
            "deployed" | "superseded" | "pending-upgrade" => {
                terminal.push("Upgrading helm chart".into());
                upgrade(&flags)
            }
            "failed" if var("FAILURE_POLICY") == "retry" => {
                terminal.push("Retrying upgrade of failed helm chart".into());
                upgrade(&flags)
            }
            _ if var("FAILURE_POLICY") == "reinstall" || var("FAILURE_POLICY").is_empty() => {
                terminal.push(format!("Uninstalling {status} helm chart"));
                let code = helm
                    .run(&["uninstall", &release, "--namespace", &target, "--wait"])
                    .await?;
                if code != 0 {
                    return Ok(helm.exit(code, terminal));
                }
                terminal.push("Installing helm chart".into());
                install(&flags)
            }
            _ => {
                let message = format!(
                    "Release status is '{status}' and failure policy is '{}', not 'reinstall'; waiting for operator intervention",
                    var("FAILURE_POLICY")
                );
                logs().append(log, &message);
                terminal.push(message);
                return Ok(Exit {
                    code: 1,
                    message: terminal.join("\n"),
                });
            }
        };
        let refs: Vec<&str> = command.iter().map(String::as_str).collect();
        let code = helm.run(&refs).await?;
        Ok(helm.exit(code, terminal))
    }

    /// Writes the content of the volume mounted at `path` into `into`, as the kubelet would.
    async fn mount(&self, pod: &Pod, container: &Container, path: &str, into: &Path) -> Result<(), String> {
        let namespace = pod.namespace().unwrap_or_default();
        let Some(mount) = container
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == path)
        else {
            return Ok(());
        };
        let volume: Option<&Volume> = pod
            .spec
            .as_ref()
            .and_then(|s| s.volumes.as_ref())
            .and_then(|v| v.iter().find(|v| v.name == mount.name));
        let Some(volume) = volume else {
            return Err(format!(
                "volume {} mounted at {path} is not in the pod",
                mount.name
            ));
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &namespace);
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &namespace);
        let mut files = BTreeMap::<String, Vec<u8>>::new();
        let mut sources = Vec::new();
        if let Some(projected) = &volume.projected {
            for source in projected.sources.iter().flatten() {
                if let Some(s) = &source.secret {
                    sources.push((true, s.name.clone(), s.items.clone(), s.optional.unwrap_or(false)));
                }
                if let Some(c) = &source.config_map {
                    sources.push((
                        false,
                        c.name.clone(),
                        c.items.clone(),
                        c.optional.unwrap_or(false),
                    ));
                }
            }
        }
        if let Some(s) = &volume.secret {
            sources.push((
                true,
                s.secret_name.clone().unwrap_or_default(),
                s.items.clone(),
                s.optional.unwrap_or(false),
            ));
        }
        if let Some(c) = &volume.config_map {
            sources.push((
                false,
                c.name.clone(),
                c.items.clone(),
                c.optional.unwrap_or(false),
            ));
        }
        for (is_secret, name, items, optional) in sources {
            let data: BTreeMap<String, Vec<u8>> = if is_secret {
                match secrets
                    .get_opt(&name)
                    .await
                    .map_err(|e| format!("secret {name}: {e}"))?
                {
                    Some(s) => s
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect(),
                    None if optional => continue,
                    None => return Err(format!("secret {namespace}/{name} for {path} not found")),
                }
            } else {
                match config_maps
                    .get_opt(&name)
                    .await
                    .map_err(|e| format!("configmap {name}: {e}"))?
                {
                    Some(c) => c
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect(),
                    None if optional => continue,
                    None => return Err(format!("configmap {namespace}/{name} for {path} not found")),
                }
            };
            match items {
                Some(items) if !items.is_empty() => {
                    for item in items {
                        if let Some(value) = data.get(&item.key) {
                            files.insert(item.path.clone(), value.clone());
                        }
                    }
                }
                _ => files.extend(data),
            }
        }
        for (file, content) in files {
            if file.contains("..") || file.starts_with('/') {
                return Err(format!("refusing volume path {file}"));
            }
            std::fs::write(into.join(&file), content).map_err(|e| format!("write {file}: {e}"))?;
        }
        Ok(())
    }

    /// A kubeconfig for the pod's ServiceAccount: a TokenRequest bound to the pod, and the CA
    /// the pod would see in `kube-root-ca.crt`.
    async fn service_account_kubeconfig(&self, pod: &Pod, dir: &Path) -> Result<PathBuf, String> {
        let namespace = pod.namespace().unwrap_or_default();
        let account = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &namespace);
        let request: TokenRequest = serde_json::from_value(json!({
            "spec": {
                "audiences": [],
                "expirationSeconds": 3600,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod.name_any(), "uid": pod.uid()},
            }
        }))
        .expect("valid token request");
        let token = accounts
            .create_token_request(&account, &PostParams::default(), &request)
            .await
            .map_err(|e| format!("token for service account {namespace}/{account}: {e}"))?
            .status
            .map(|s| s.token)
            .ok_or("token request returned no token")?;
        let ca = Api::<ConfigMap>::namespaced(self.client.clone(), &namespace)
            .get("kube-root-ca.crt")
            .await
            .map_err(|e| format!("kube-root-ca.crt in {namespace}: {e}"))?
            .data
            .and_then(|d| d.get("ca.crt").cloned())
            .ok_or("kube-root-ca.crt has no ca.crt")?;
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: cluster\n  cluster:\n    server: {}\n    certificate-authority-data: {}\nusers:\n- name: {account}\n  user:\n    token: {token}\ncontexts:\n- name: pod\n  context:\n    cluster: cluster\n    user: {account}\n    namespace: {namespace}\ncurrent-context: pod\n",
            self.server,
            STANDARD.encode(ca)
        );
        write_private(&path, &text).map_err(|e| e.to_string())?;
        Ok(path)
    }
}

/// The chart to install: content from the HelmChart (`/chart/<NAME>.tgz.base64`) if present,
/// else `CHART` as given.
fn chart_reference(chart_dir: &Path, release: &str, chart: &str) -> Result<String, String> {
    let encoded = chart_dir.join(format!("{release}.tgz.base64"));
    if encoded.is_file() {
        let text =
            std::fs::read_to_string(&encoded).map_err(|e| format!("read {}: {e}", encoded.display()))?;
        let cleaned: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let bytes = STANDARD
            .decode(cleaned)
            .map_err(|e| format!("chart content of {release} is not base64: {e}"))?;
        let archive = chart_dir.join(format!("{release}.tgz"));
        std::fs::write(&archive, bytes).map_err(|e| format!("write {}: {e}", archive.display()))?;
        return Ok(archive.display().to_string());
    }
    if chart.is_empty() {
        return Err("the HelmChart has neither chart nor chartContent".into());
    }
    Ok(chart.to_owned())
}

struct Helm<'a> {
    binary: &'a Path,
    dir: &'a Path,
    kubeconfig: &'a Path,
    driver: String,
    log: ContainerRef,
}

impl Helm<'_> {
    /// Runs helm to completion, its output appended to the container log. Returns the exit code.
    async fn run(&self, args: &[&str]) -> Result<i32, String> {
        Ok(self.output(args, true).await?.0)
    }

    async fn output(&self, args: &[&str], echo: bool) -> Result<(i32, String), String> {
        let out = self.dir.join(format!("helm-{}.out", super::unique_suffix()));
        let mut all: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
        all.push(format!("--kubeconfig={}", self.kubeconfig.display()));
        if echo {
            logs().append(&self.log, &format!("+ helm {}", args.join(" ")));
        }
        let home = self.dir.join("home");
        let mut env = vec![
            ("HOME".to_owned(), home.display().to_string()),
            (
                "HELM_CACHE_HOME".to_owned(),
                home.join(".cache").display().to_string(),
            ),
            (
                "HELM_CONFIG_HOME".to_owned(),
                home.join(".config").display().to_string(),
            ),
            (
                "HELM_DATA_HOME".to_owned(),
                home.join(".helm").display().to_string(),
            ),
            ("TMPDIR".to_owned(), self.dir.join("tmp").display().to_string()),
        ];
        if !self.driver.is_empty() {
            env.push(("HELM_DRIVER".into(), self.driver.clone()));
        }
        let mut process = ManagedProcess::spawn_with_env("helm", self.binary, &all, &env, &out)
            .map_err(|e| e.to_string())?;
        let status = loop {
            if let Some(status) = process.exited() {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let text = std::fs::read_to_string(&out).unwrap_or_default();
        if echo {
            for line in text.lines() {
                logs().append(&self.log, line);
            }
        }
        Ok((status.code().unwrap_or(1), text))
    }

    /// The latest release's revision and status, if there is one (Helm 4 lists every state by
    /// default; it has no `--all`).
    async fn current(&self, release: &str, namespace: &str) -> Result<Option<(i64, String)>, String> {
        let filter = format!("^{release}$");
        let (code, text) = self
            .output(
                &[
                    "ls",
                    "--filter",
                    &filter,
                    "--namespace",
                    namespace,
                    "--output",
                    "json",
                ],
                false,
            )
            .await?;
        if code != 0 {
            logs().append(&self.log, &text);
            return Err(format!("helm ls failed: {}", text.trim()));
        }
        let list: Vec<serde_json::Value> =
            serde_json::from_str(text.trim()).map_err(|e| format!("helm ls output: {e}: {text}"))?;
        Ok(list.first().map(|r| {
            let revision = r["revision"]
                .as_str()
                .and_then(|v| v.parse().ok())
                .or_else(|| r["revision"].as_i64())
                .unwrap_or(0);
            (revision, r["status"].as_str().unwrap_or_default().to_lowercase())
        }))
    }

    async fn config_hash(&self, release: &str, namespace: &str) -> Result<Option<String>, String> {
        let (code, text) = self
            .output(
                &[
                    "get",
                    "metadata",
                    release,
                    "--namespace",
                    namespace,
                    "--output",
                    "json",
                ],
                false,
            )
            .await?;
        if code != 0 {
            return Ok(None);
        }
        let metadata: serde_json::Value =
            serde_json::from_str(text.trim()).map_err(|e| format!("helm get metadata output: {e}"))?;
        Ok(metadata["labels"][CONFIG_HASH_LABEL].as_str().map(str::to_owned))
    }

    /// The container's exit: helm's code, and the termination log (plus helm's error).
    fn exit(&self, code: i32, mut terminal: Vec<String>) -> Exit {
        if code != 0
            && let Some(error) = logs_tail(&self.log)
                .into_iter()
                .rev()
                .find(|l| l.starts_with("Error"))
        {
            terminal.push(error);
        }
        Exit {
            code,
            message: terminal.join("\n"),
        }
    }
}

fn logs_tail(container: &ContainerRef) -> Vec<String> {
    logs().lines(container)
}

#[allow(clippy::too_many_arguments)]
async fn patch_status(
    pods: &Api<Pod>,
    name: &str,
    pod: &Pod,
    container: &Container,
    state: &serde_json::Value,
    last_state: Option<&serde_json::Value>,
    restarts: i32,
    ready: bool,
    phase: &str,
    started: Timestamp,
) -> kube::Result<Pod> {
    let now = Timestamp::now().to_string();
    let ready_text = if ready { "True" } else { "False" };
    let host = pod
        .status
        .as_ref()
        .and_then(|s| s.host_ip.clone())
        .unwrap_or_else(|| "127.0.0.1".into());
    let status = json!({"status": {
        "phase": phase,
        "hostIP": host,
        "hostIPs": [{"ip": host}],
        "podIP": "10.244.255.1",
        "startTime": started.to_string(),
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "Ready", "status": ready_text, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": ready_text, "lastTransitionTime": now},
        ],
        "containerStatuses": [{
            "name": container.name,
            "image": container.image,
            "imageID": format!("docker-pullable://{}", container.image.clone().unwrap_or_default()),
            "containerID": format!("kwok://{}", container.name),
            "ready": ready,
            "started": state.get("running").is_some(),
            "restartCount": restarts,
            "state": state,
            "lastState": last_state.cloned().unwrap_or(json!({})),
        }],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
}
