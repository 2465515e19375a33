//! The real node (crates/testenv/src/realnode.rs): a kubelet with containerd and runc beside the kwok
//! nodes. A pod there runs a real container from a locally built image, its readiness probe is
//! the kubelet's own HTTP request, and the test reaches the pod at its pod IP.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use shapeblock_testenv::{self as testenv, realnode};
use support::{client, eventually, fresh_namespace};

fn hello_pod(name: &str, body: &str, probe_path: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {realnode::LABEL_KEY: "true"},
            "tolerations": [{"key": realnode::TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}],
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "hello",
                "image": realnode::HELLO_IMAGE,
                "imagePullPolicy": "Never",
                "env": [{"name": "BODY", "value": body}],
                "ports": [{"containerPort": 8080}],
                "readinessProbe": {
                    "httpGet": {"path": probe_path, "port": 8080},
                    "periodSeconds": 1,
                },
            }],
        },
    }))
    .unwrap()
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            c.iter()
                .any(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

/// A plain HTTP/1.0 GET: status and body.
async fn http_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").as_bytes())
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), stream.read_to_end(&mut response))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "read"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    Ok((status, body.to_owned()))
}

#[tokio::test]
async fn a_pod_on_the_real_node_passes_its_readiness_probe_and_answers_at_its_pod_ip() {
    let start = Instant::now();
    let client = client().await;
    let plane_time = start.elapsed();
    let node_start = Instant::now();
    let node = testenv::real_node().unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "control plane up in {plane_time:?}; real node {} ({}) Ready in {:?}",
        node.name,
        node.node_ip,
        node_start.elapsed()
    );
    let namespace = fresh_namespace(&client, "realnode").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let body = format!("hello from {namespace}");

    let created = Instant::now();
    pods.create(&PostParams::default(), &hello_pod("hello", &body, "/healthz"))
        .await
        .unwrap();
    let (pod, _) = eventually(
        Duration::from_secs(90),
        "the pod Ready on the real node",
        || async {
            let pod = pods.get("hello").await.ok()?;
            ready(&pod).then_some(pod)
        },
    )
    .await;
    eprintln!("pod created → Ready in {:?}", created.elapsed());
    let spec = pod.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(node.name.as_str()));
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    let prefix = node.pod_cidr.trim_end_matches("0/24");
    assert!(ip.starts_with(prefix), "pod IP {ip} outside {}", node.pod_cidr);

    let (status, answer) = http_get(&format!("{ip}:8080"), "/")
        .await
        .unwrap_or_else(|e| panic!("GET http://{ip}:8080/: {e}"));
    assert_eq!((status, answer.as_str()), (200, body.as_str()));
    let (status, _) = http_get(&format!("{ip}:8080"), "/nope").await.unwrap();
    assert_eq!(status, 404, "the server itself answers, not something in between");
    // The pod log API: the apiserver asks this kubelet, which reads containerd's log file.
    let log = pods.logs("hello", &Default::default()).await.unwrap();
    assert_eq!(log.trim(), "listening on :8080");

    // The probe is the kubelet's real request: a path the server does not serve keeps a
    // running container unready.
    pods.create(&PostParams::default(), &hello_pod("unready", &body, "/missing"))
        .await
        .unwrap();
    let (_, _) = eventually(
        Duration::from_secs(60),
        "the unready pod's container running",
        || async {
            let pod = pods.get("unready").await.ok()?;
            running(&pod).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let pod = pods.get("unready").await.unwrap();
    assert!(
        !ready(&pod),
        "a failing readiness probe left the pod Ready: {:?}",
        pod.status
    );

    for name in ["hello", "unready"] {
        pods.delete(name, &DeleteParams::default()).await.unwrap();
    }
    let deleted = Instant::now();
    eventually(Duration::from_secs(60), "the pods gone", || async {
        let left = pods.list(&Default::default()).await.ok()?;
        left.items.is_empty().then_some(())
    })
    .await;
    eprintln!("pods deleted in {:?}", deleted.elapsed());
    let (status, _) = http_get(&format!("{ip}:8080"), "/")
        .await
        .unwrap_or((0, String::new()));
    assert_eq!(
        status, 0,
        "the container still answered after its pod was deleted"
    );
}

/// The kubelet pulls from the local registry (Debian's distribution, no credentials) an image
/// this test pushed there: the name exists nowhere else, and the pod's imageID is the pushed
/// manifest's digest.
#[tokio::test]
async fn the_real_node_pulls_an_image_pushed_to_the_local_registry() {
    let client = client().await;
    let node = testenv::real_node().unwrap_or_else(|e| panic!("{e}"));
    let registry = testenv::registry::Registry::start_open(None)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let image = realnode::OciImage::new(&realnode::hello_binary().unwrap()).unwrap();
    let tag = testenv::unique_suffix();
    let pushed = Instant::now();
    image
        .push(&registry.address, "realnode/hello", &tag)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("pushed in {:?}", pushed.elapsed());
    let reference = format!("{}/realnode/hello:{tag}", registry.address);

    let namespace = fresh_namespace(&client, "realnode-pull").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let mut pod = hello_pod("pulled", "pulled from the registry", "/healthz");
    let container = &mut pod.spec.as_mut().unwrap().containers[0];
    container.image = Some(reference.clone());
    container.image_pull_policy = Some("Always".into());
    let created = Instant::now();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let (pod, _) = eventually(Duration::from_secs(90), "the pulled pod Ready", || async {
        let pod = pods.get("pulled").await.ok()?;
        ready(&pod).then_some(pod)
    })
    .await;
    eprintln!(
        "pod created → pulled → Ready in {:?} on {}",
        created.elapsed(),
        node.name
    );
    let status = pod.status.as_ref().unwrap();
    let image_id = &status.container_statuses.as_ref().unwrap()[0].image_id;
    assert!(
        image_id.ends_with(&realnode::digest(&image.manifest)),
        "imageID {image_id} is not the pushed manifest {}",
        realnode::digest(&image.manifest)
    );
    let ip = status.pod_ip.clone().expect("pod IP");
    let (code, body) = http_get(&format!("{ip}:8080"), "/").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "pulled from the registry"));
    pods.delete("pulled", &DeleteParams::default()).await.unwrap();
    eventually(Duration::from_secs(60), "the pod gone", || async {
        pods.get_opt("pulled").await.ok()?.is_none().then_some(())
    })
    .await;
}

/// A node of its own (not the shared one): started, Ready, and on drop nothing of it is left
/// on the machine — no process, no bridge, no cgroup, no mount, no directory.
#[tokio::test]
async fn a_stopped_real_node_leaves_nothing_behind() {
    let plane = testenv::shared().unwrap_or_else(|e| panic!("{e}"));
    let node = realnode::RealNode::start(
        &testenv::default_bin_dir(),
        &plane.kubeconfig,
        Duration::from_secs(120),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let dir = node.dir().to_owned();
    let bridge = node.bridge().to_owned();
    let pids = node.pids();
    // unshare, the script, containerd, the kubelet at least.
    assert!(pids.len() >= 4, "{pids:?}");
    assert!(std::path::Path::new(&format!("/sys/class/net/{bridge}")).exists());
    let name = node.name.clone();
    drop(node);

    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z ")),
            "process {pid} of {name} outlived its node"
        );
    }
    assert!(!dir.exists(), "{} is still there", dir.display());
    assert!(!std::path::Path::new(&format!("/sys/class/net/{bridge}")).exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&*dir.to_string_lossy()),
        "mounts left under {}",
        dir.display()
    );
    let cgroups: Vec<_> = std::fs::read_dir("/sys/fs/cgroup")
        .unwrap()
        .flatten()
        .map(|e| e.path().join(&name))
        .filter(|p| p.exists())
        .collect();
    assert!(cgroups.is_empty(), "cgroups left: {cgroups:?}");
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(plane.client().await.unwrap());
    assert!(
        nodes.get_opt(&name).await.unwrap().is_none(),
        "the Node object {name} is left"
    );
}
