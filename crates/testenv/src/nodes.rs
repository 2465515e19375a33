//! Simulated nodes: kube-scheduler binds pods, kwok plays the kubelet of a few Node objects,
//! and kwok Stages decide what their pods do. The defaults (`stages.yaml`) make pods start and
//! become Ready and Job pods finish; a test picks other outcomes for its own pods with
//! [`set_pod_outcome`], matching on namespace and container name or image, because the agent and
//! the controllers create the pods, not the test.

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::{CertificateAuthority, Error, ManagedProcess, Result, kubeconfig};

/// kwok manages the Nodes carrying this label, and nothing else.
pub const NODE_LABEL: (&str, &str) = ("shapeblock.io/simulated-node", "kwok");

const DEFAULT_STAGES: &str = include_str!("stages.yaml");
const STAGE_CRD_FILE: &str = "kwok.x-k8s.io_stages.yaml";
const FIELD_MANAGER: &str = "shapeblock-testenv";

fn stage_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("kwok.x-k8s.io", "v1alpha1", "Stage"),
        "stages",
    )
}

/// kube-scheduler and kwok, started after the controller-manager.
pub(super) struct NodeProcesses {
    pub scheduler: ManagedProcess,
    pub kwok: ManagedProcess,
}

/// Installs the Stage CRD and the default Stages, creates `count` Nodes, and starts
/// kube-scheduler and kwok. `kubelet_port` is where the nodes' kubelet endpoint listens.
pub(super) async fn start(
    client: &Client,
    bin_dir: &Path,
    work_dir: &Path,
    server: &str,
    ca: &CertificateAuthority,
    count: usize,
    kubelet_port: u16,
) -> Result<NodeProcesses> {
    for binary in ["kube-scheduler", "kwok", STAGE_CRD_FILE] {
        if !bin_dir.join(binary).is_file() {
            return Err(Error::MissingBinary {
                binary: binary.into(),
                dir: bin_dir.display().to_string(),
            });
        }
    }
    let crd_dir = work_dir.join("kwok-crds");
    std::fs::create_dir_all(&crd_dir).map_err(|e| Error::io(format!("create {}", crd_dir.display()), e))?;
    std::fs::copy(bin_dir.join(STAGE_CRD_FILE), crd_dir.join(STAGE_CRD_FILE))
        .map_err(|e| Error::io(format!("copy {STAGE_CRD_FILE}"), e))?;
    super::install_crds(client, &crd_dir).await?;
    install_default_stages(client, kubelet_port).await?;
    for index in 0..count {
        create_node(client, &format!("kwok-node-{index}")).await?;
    }

    let scheduler_kubeconfig = work_dir.join("scheduler.kubeconfig");
    let scheduler_user = ca.client_cert("system:kube-scheduler", None)?;
    kubeconfig::write(
        &scheduler_kubeconfig,
        server,
        ca.cert_pem(),
        &scheduler_user,
        "shapeblock-test",
    )?;
    let scheduler_kubeconfig = scheduler_kubeconfig.display().to_string();
    let scheduler = ManagedProcess::spawn(
        "kube-scheduler",
        &bin_dir.join("kube-scheduler"),
        &[
            format!("--kubeconfig={scheduler_kubeconfig}"),
            format!("--authentication-kubeconfig={scheduler_kubeconfig}"),
            format!("--authorization-kubeconfig={scheduler_kubeconfig}"),
            "--secure-port=0".into(),
            "--leader-elect=false".into(),
            "--v=1".into(),
        ],
        &work_dir.join("kube-scheduler.log"),
    )?;

    // kwok acts for the kubelets of every simulated node: it needs what a kubelet has and more
    // (it patches node and pod status, deletes pods, writes events and leases).
    let kwok_kubeconfig = work_dir.join("kwok.kubeconfig");
    let kwok_user = ca.client_cert("shapeblock-kwok", Some("system:masters"))?;
    kubeconfig::write(
        &kwok_kubeconfig,
        server,
        ca.cert_pem(),
        &kwok_user,
        "shapeblock-test",
    )?;
    let kwok = ManagedProcess::spawn(
        "kwok",
        &bin_dir.join("kwok"),
        &[
            format!("--kubeconfig={}", kwok_kubeconfig.display()),
            format!(
                "--manage-nodes-with-label-selector={}={}",
                NODE_LABEL.0, NODE_LABEL.1
            ),
            "--node-ip=127.0.0.1".into(),
            "--cidr=10.244.0.0/16".into(),
            // No --node-port: kwok would serve its own kubelet API there. The nodes advertise
            // the test support's endpoint instead (stages.yaml).
            "--enable-crds=Stage".into(),
            "--node-lease-duration-seconds=40".into(),
        ],
        &work_dir.join("kwok.log"),
    )?;
    Ok(NodeProcesses { scheduler, kwok })
}

async fn install_default_stages(client: &Client, kubelet_port: u16) -> Result<()> {
    let text = DEFAULT_STAGES.replace("__KUBELET_PORT__", &kubelet_port.to_string());
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &stage_resource());
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_json::Value::deserialize(document).map_err(|e| Error::Crd {
            path: "src/testenv/stages.yaml".into(),
            message: e.to_string(),
        })?;
        let stage: DynamicObject = serde_json::from_value(value).map_err(|e| Error::Crd {
            path: "src/testenv/stages.yaml".into(),
            message: e.to_string(),
        })?;
        api.patch(
            &stage.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&stage),
        )
        .await?;
    }
    Ok(())
}

use serde::Deserialize;

async fn create_node(client: &Client, name: &str) -> Result<()> {
    let node: Node = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {
                NODE_LABEL.0: NODE_LABEL.1,
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
            },
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
        },
    }))
    .expect("valid node");
    match Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Waits until `count` simulated nodes are Ready and schedulable.
pub(super) async fn wait_ready(
    client: &Client,
    count: usize,
    timeout: Duration,
    kwok: &ManagedProcess,
) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let selector = format!("{}={}", NODE_LABEL.0, NODE_LABEL.1);
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let list = nodes
            .list(&kube::api::ListParams::default().labels(&selector))
            .await?;
        let ready = list
            .items
            .iter()
            .filter(|node| {
                let conditions = node
                    .status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .cloned()
                    .unwrap_or_default();
                let tainted = node
                    .spec
                    .as_ref()
                    .and_then(|s| s.taints.as_ref())
                    .is_some_and(|t| !t.is_empty());
                !tainted
                    && conditions
                        .iter()
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            })
            .count();
        if ready >= count {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(Error::NotReady {
                name: format!("kwok ({ready} of {count} simulated nodes Ready and untainted)"),
                seconds: timeout.as_secs(),
                log: kwok.log_path().display().to_string(),
                tail: kwok.log_tail(30),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Which pods an outcome applies to: all pods in `namespace` with a container whose name is
/// `container` (if set) and whose image is `image` (if set).
#[derive(Clone, Debug)]
pub struct PodSelector {
    pub namespace: String,
    pub container: Option<String>,
    pub image: Option<String>,
}

impl PodSelector {
    /// Every pod in the namespace.
    pub fn namespace(namespace: &str) -> Self {
        Self {
            namespace: namespace.into(),
            container: None,
            image: None,
        }
    }

    /// Pods in the namespace with a container of this name.
    pub fn container(namespace: &str, container: &str) -> Self {
        Self {
            container: Some(container.into()),
            ..Self::namespace(namespace)
        }
    }

    /// Pods in the namespace with a container running this image.
    pub fn image(namespace: &str, image: &str) -> Self {
        Self {
            image: Some(image.into()),
            ..Self::namespace(namespace)
        }
    }
}

/// What the simulated kubelet does with the selected pods once they run (all their containers
/// alike). `Succeed` and `Fail` end the pod (`restartPolicy: Never` semantics, what Jobs use).
#[derive(Clone, Debug)]
pub enum PodOutcome {
    /// Exit 0 after running for `after`, with `message` as the termination message (e.g. an
    /// image digest).
    Succeed {
        after: Duration,
        message: Option<String>,
    },
    /// Exit with `exit_code` and `message` after running for `after`.
    Fail {
        after: Duration,
        exit_code: i32,
        message: String,
    },
    /// End after `after` as a real kubelet reports a kill: `reason` (say `OOMKilled`) and
    /// `exit_code` (137), no termination message.
    Killed {
        after: Duration,
        exit_code: i32,
        reason: String,
    },
    /// Run until deleted (so `activeDeadlineSeconds` or a cancel is what ends it).
    Hang,
    /// Start but never pass readiness.
    NeverReady,
}

/// A test's Stage, deleted with its namespace (it is owned by it) or by [`StageHandle::remove`].
#[derive(Debug)]
pub struct StageHandle {
    pub name: String,
}

impl StageHandle {
    pub async fn remove(self, client: &Client) -> Result<()> {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &stage_resource());
        match api.delete(&self.name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Makes the selected pods (including ones created later) follow `outcome` instead of the
/// defaults. The Stage weighs more than every default, so kwok always picks it.
pub async fn set_pod_outcome(
    client: &Client,
    selector: &PodSelector,
    outcome: &PodOutcome,
) -> Result<StageHandle> {
    let namespace = Api::<Namespace>::all(client.clone())
        .get(&selector.namespace)
        .await?;
    let name = format!("test-{}-{}", selector.namespace, super::unique_suffix());
    let stage = outcome_stage(&name, selector, outcome, &namespace);
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &stage_resource());
    let stage: DynamicObject = serde_json::from_value(stage).expect("valid stage");
    api.create(&PostParams::default(), &stage).await?;
    Ok(StageHandle { name })
}

fn quote(text: &str) -> String {
    // JSON strings are valid YAML and Go-template-safe once the braces are escaped.
    serde_json::to_string(text)
        .expect("string")
        .replace("{{", "{{ \"{{\" }}")
}

fn outcome_stage(
    name: &str,
    selector: &PodSelector,
    outcome: &PodOutcome,
    namespace: &Namespace,
) -> serde_json::Value {
    let mut expressions = vec![
        json!({"jq": {"key": ".metadata.namespace", "operator": "In", "values": [selector.namespace]}}),
        json!({"jq": {"key": ".metadata.deletionTimestamp", "operator": "DoesNotExist"}}),
        json!({"jq": {"key": ".metadata.labels[\"helmcharts.helm.cattle.io/chart\"]", "operator": "DoesNotExist"}}),
    ];
    if let Some(container) = &selector.container {
        expressions.push(
            json!({"jq": {"key": ".spec.containers.[].name", "operator": "In", "values": [container]}}),
        );
    }
    if let Some(image) = &selector.image {
        expressions
            .push(json!({"jq": {"key": ".spec.containers.[].image", "operator": "In", "values": [image]}}));
    }
    let running = [
        json!({"jq": {"key": ".status.phase", "operator": "In", "values": ["Running"]}}),
        json!({"jq": {"key": ".status.conditions.[] | select( .type == \"Ready\" ) | .status", "operator": "In", "values": ["True"]}}),
    ];
    let starting = [
        json!({"jq": {"key": ".status.phase", "operator": "In", "values": ["Pending"]}}),
        json!({"jq": {"key": ".status.podIP", "operator": "Exists"}}),
    ];
    let (extra, delay_ms, template): (&[serde_json::Value], u128, String) = match outcome {
        PodOutcome::Succeed { after, message } => (
            &running,
            after.as_millis(),
            terminated_template(0, "Completed", message.as_deref(), "Succeeded"),
        ),
        PodOutcome::Fail {
            after,
            exit_code,
            message,
        } => (
            &running,
            after.as_millis(),
            terminated_template(*exit_code, "Error", Some(message), "Failed"),
        ),
        PodOutcome::Killed {
            after,
            exit_code,
            reason,
        } => (
            &running,
            after.as_millis(),
            terminated_template(*exit_code, reason, None, "Failed"),
        ),
        // Scheduled a day out, and pre-empting the default completion meanwhile.
        PodOutcome::Hang => (&running, 86_400_000, String::new()),
        PodOutcome::NeverReady => (&starting, 0, NOT_READY_TEMPLATE.to_owned()),
    };
    expressions.extend(extra.iter().cloned());
    let next = if template.is_empty() {
        json!({"event": {"type": "Normal", "reason": "Hanging", "message": "the test chose this pod to hang"}})
    } else {
        json!({"statusTemplate": template})
    };
    json!({
        "apiVersion": "kwok.x-k8s.io/v1alpha1",
        "kind": "Stage",
        "metadata": {
            "name": name,
            "labels": {"shapeblock.io/test-namespace": selector.namespace},
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "Namespace",
                "name": namespace.name_any(),
                "uid": namespace.uid().unwrap_or_default(),
            }],
        },
        "spec": {
            "resourceRef": {"apiGroup": "v1", "kind": "Pod"},
            "selector": {"matchExpressions": expressions},
            "weight": 1,
            "delay": {"durationMilliseconds": delay_ms as u64},
            "next": next,
        },
    })
}

fn terminated_template(exit_code: i32, reason: &str, message: Option<&str>, phase: &str) -> String {
    let message = message
        .map(|m| format!("\n            message: {}", quote(m)))
        .unwrap_or_default();
    format!(
        r#"{{{{ $now := Now }}}}
conditions:
- lastTransitionTime: {{{{ $now | Quote }}}}
  reason: PodCompleted
  status: "False"
  type: Ready
- lastTransitionTime: {{{{ $now | Quote }}}}
  reason: PodCompleted
  status: "False"
  type: ContainersReady
containerStatuses:
{{{{ range .spec.containers }}}}
- image: {{{{ .image | Quote }}}}
  imageID: {{{{ printf "docker-pullable://%s" .image | Quote }}}}
  containerID: {{{{ printf "kwok://%s" .name | Quote }}}}
  name: {{{{ .name | Quote }}}}
  ready: false
  restartCount: 0
  started: false
  state:
    terminated:
            exitCode: {exit_code}
            reason: {reason}{message}
            startedAt: {{{{ $now | Quote }}}}
            finishedAt: {{{{ $now | Quote }}}}
{{{{ end }}}}
phase: {phase}
"#
    )
}

const NOT_READY_TEMPLATE: &str = r#"{{ $now := Now }}
conditions:
- lastTransitionTime: {{ $now | Quote }}
  reason: ContainersNotReady
  status: "False"
  type: Ready
- lastTransitionTime: {{ $now | Quote }}
  reason: ContainersNotReady
  status: "False"
  type: ContainersReady
containerStatuses:
{{ range .spec.containers }}
- image: {{ .image | Quote }}
  imageID: {{ printf "docker-pullable://%s" .image | Quote }}
  containerID: {{ printf "kwok://%s" .name | Quote }}
  name: {{ .name | Quote }}
  ready: false
  restartCount: 0
  started: true
  state:
    running:
      startedAt: {{ $now | Quote }}
{{ end }}
phase: Running
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_stages_parse_and_name_the_kubelet_port() {
        let text = DEFAULT_STAGES.replace("__KUBELET_PORT__", "4321");
        let names: Vec<String> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| {
                let v = serde_json::Value::deserialize(d).unwrap();
                assert_eq!(
                    v["spec"]["weight"], 0,
                    "defaults must weigh 0 so tests' stages win"
                );
                v["metadata"]["name"].as_str().unwrap().to_owned()
            })
            .collect();
        assert!(names.contains(&"shapeblock-pod-ready".to_owned()), "{names:?}");
        assert!(text.contains("Port: 4321"));
    }

    #[test]
    fn a_failure_stage_carries_its_message_safely() {
        let namespace: Namespace =
            serde_json::from_value(json!({"metadata": {"name": "ns", "uid": "u"}})).unwrap();
        let stage = outcome_stage(
            "s",
            &PodSelector::container("ns", "build"),
            &PodOutcome::Fail {
                after: Duration::from_millis(1500),
                exit_code: 3,
                message: "bad: {{ x }} \"quoted\"".into(),
            },
            &namespace,
        );
        assert_eq!(stage["spec"]["weight"], 1);
        assert_eq!(stage["spec"]["delay"]["durationMilliseconds"], 1500);
        let template = stage["spec"]["next"]["statusTemplate"].as_str().unwrap();
        assert!(template.contains("exitCode: 3"), "{template}");
        assert!(
            template.contains(r#"message: "bad: {{ "{{" }} x }} \"quoted\"""#),
            "{template}"
        );
    }
}
