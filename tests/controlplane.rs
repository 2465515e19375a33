//! The test control plane is a real one: kube-controller-manager runs (namespaces finish
//! deleting, garbage collection follows owner references, Jobs get Pods, namespaces get their
//! `default` ServiceAccount), and no component outlives the process that started it.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Resource, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::App;
use support::{client, eventually, fresh_namespace};

#[tokio::test]
async fn a_deleted_namespace_is_gone_within_seconds() {
    let client = client().await;
    let name = fresh_namespace(&client, "doomed").await;
    // Content makes the namespace controller do real work before the namespace can go.
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
    for i in 0..5 {
        let cm: ConfigMap = serde_json::from_value(json!({"metadata": {"name": format!("cm-{i}")}})).unwrap();
        config_maps.create(&PostParams::default(), &cm).await.unwrap();
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces.delete(&name, &DeleteParams::default()).await.unwrap();
    let (_, took) = eventually(Duration::from_secs(30), "the namespace to be deleted", || async {
        namespaces.get_opt(&name).await.unwrap().is_none().then_some(())
    })
    .await;
    println!("namespace with 5 ConfigMaps deleted in {took:?}");
}

#[tokio::test]
async fn dependents_are_garbage_collected_after_their_owner() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "gc").await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);

    // A core owner, and a custom-resource owner (what the agent's children will have).
    let owner: ConfigMap = serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap();
    let owner = config_maps.create(&PostParams::default(), &owner).await.unwrap();
    let apps: Api<App> = Api::namespaced(client.clone(), &namespace);
    let app: App = serde_json::from_value(json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "web"},
        "spec": {"git": {"url": "https://github.com/example/app.git"}, "registry": {"url": "registry.example.com"}}
    }))
    .unwrap();
    let app = apps.create(&PostParams::default(), &app).await.unwrap();

    let dependent = |name: &str, reference: serde_json::Value| -> Secret {
        serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": [reference]}})).unwrap()
    };
    let config_map_ref = serde_json::to_value(owner.controller_owner_ref(&()).unwrap()).unwrap();
    let app_ref = serde_json::to_value(app.controller_owner_ref(&()).unwrap()).unwrap();
    secrets
        .create(&PostParams::default(), &dependent("of-configmap", config_map_ref))
        .await
        .unwrap();
    secrets
        .create(&PostParams::default(), &dependent("of-app", app_ref))
        .await
        .unwrap();
    let unowned: Secret = serde_json::from_value(json!({"metadata": {"name": "unowned"}})).unwrap();
    secrets.create(&PostParams::default(), &unowned).await.unwrap();

    config_maps
        .delete("owner", &DeleteParams::default())
        .await
        .unwrap();
    apps.delete("web", &DeleteParams::default()).await.unwrap();
    let (_, took) = eventually(
        Duration::from_secs(30),
        "owned Secrets to be collected",
        || async {
            let names: BTreeSet<String> = secrets
                .list(&ListParams::default())
                .await
                .unwrap()
                .items
                .iter()
                .map(|s| s.name_any())
                .collect();
            (!names.contains("of-configmap") && !names.contains("of-app")).then_some(names)
        },
    )
    .await;
    assert!(
        secrets.get_opt("unowned").await.unwrap().is_some(),
        "the GC only collects dependents"
    );
    println!("dependents of a ConfigMap and of an App collected in {took:?}");
}

#[tokio::test]
async fn the_job_controller_creates_pods_and_namespaces_get_a_service_account() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "jobs").await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
    eventually(Duration::from_secs(30), "the default ServiceAccount", || async {
        accounts.get_opt("default").await.unwrap()
    })
    .await;

    let jobs: Api<Job> = Api::namespaced(client.clone(), &namespace);
    let job: Job = serde_json::from_value(json!({
        "metadata": {"name": "hello"},
        "spec": {"backoffLimit": 0, "template": {"spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "hello", "image": "busybox:1.36", "command": ["true"]}]
        }}}
    }))
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let (pod, _) = eventually(Duration::from_secs(30), "the Job's Pod", || async {
        pods.list(&ListParams::default().labels("job-name=hello"))
            .await
            .unwrap()
            .items
            .into_iter()
            .next()
    })
    .await;
    let owner = &pod.owner_references()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Job", "hello"));
    assert_eq!(pod.meta().namespace.as_deref(), Some(namespace.as_str()));
}

/// Descendants of `pid`, from /proc.
fn descendants(pid: u32) -> Vec<u32> {
    let mut parents = std::collections::HashMap::<u32, Vec<u32>>::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // The command name may contain spaces; the parent pid is the second field after ')'.
        let Some(after) = stat.rsplit_once(')').map(|(_, rest)| rest) else {
            continue;
        };
        if let Some(parent) = after
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u32>().ok())
        {
            parents.entry(parent).or_default().push(child);
        }
    }
    let mut found = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        for &child in parents.get(&p).into_iter().flatten() {
            found.push(child);
            stack.push(child);
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            !stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

#[test]
fn no_component_outlives_a_killed_parent() {
    let mut dev = Command::new(env!("CARGO_BIN_EXE_shapeblock-dev"))
        .args(["up", "--no-agent", "--exit-after", "600"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shapeblock-dev up");
    let stdout = BufReader::new(dev.stdout.take().unwrap());
    let mut ready = false;
    for line in stdout.lines() {
        let line = line.unwrap();
        if line.starts_with("control plane ready") {
            ready = true;
            break;
        }
    }
    assert!(ready, "shapeblock-dev up printed its ready line");
    let children = descendants(dev.id());
    let names: BTreeSet<String> = children
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).ok())
        .map(|name| name.trim().to_owned())
        .collect();
    // comm is cut to 15 bytes.
    let expected: BTreeSet<String> = [
        "etcd",
        "kube-apiserver",
        "kube-controller",
        "kube-scheduler",
        "kwok",
        "helm-controller",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(
        names, expected,
        "the control plane and its peers run under the parent"
    );

    // SIGKILL: no destructor, no signal handler runs. Only the parent-death signal is left.
    dev.kill().unwrap();
    dev.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while children.iter().any(|&pid| alive(pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let survivors: Vec<u32> = children.into_iter().filter(|&pid| alive(pid)).collect();
    assert!(survivors.is_empty(), "orphans left running: {survivors:?}");
}
