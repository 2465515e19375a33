//! Builds on the real node (src/testenv/realnode.rs, src/testenv/buildfarm.rs), nothing
//! simulated on the way: the agent's resolve and clone steps run Debian's git against a real
//! git server, kaniko (built from its Go module) builds the sample app's Dockerfile on a base
//! image made here and pushes to a token-auth registry with the build's own token, the
//! helm-controller deploys, the kubelet pulls with the project's pull secret (a token
//! service's pull token), and the pod passes its real readiness probe and answers HTTP.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase};
use shapeblock_agent::testenv::agent::AgentProcess;
use shapeblock_agent::testenv::buildfarm::{self, BuildFarm, PULL_USER};
use shapeblock_agent::testenv::registry::Registry;
use shapeblock_agent::testenv::{self, realnode};
use support::agent::{AGENT_NS, Env, TIMEOUT, create, create_build, ready_project};
use support::eventually;

const PULL_SECRET: &str = "cluster-pull";
/// A cold first build pulls kaniko (52 MB) and the base image and runs on 2 shared cores.
const REAL_BUILD_TIMEOUT: Duration = Duration::from_secs(600);

/// The agent, the App registry and the farm of one test.
struct Real {
    env: Env,
    farm: &'static BuildFarm,
    cluster: String,
    _registry: Registry,
    agent: AgentProcess,
}

async fn real(extra: &[&str]) -> Real {
    let env = support::agent::env().await;
    testenv::real_node().unwrap_or_else(|e| panic!("{e}"));
    let farm = buildfarm::build_farm().unwrap_or_else(|e| panic!("{e}"));
    let port = testenv::free_port().unwrap();
    let cluster = format!("{}:{port}", farm.node_ip);
    // The project's pull secret: the pull account of the token service, as a robot account's
    // credentials would be.
    let config = json!({"auths": {&cluster: {"username": PULL_USER, "password": farm.pull_password}}});
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": PULL_SECRET},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": ByteString(config.to_string().into_bytes())},
    }))
    .unwrap();
    Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
        .patch(
            PULL_SECRET,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&secret),
        )
        .await
        .unwrap();
    let mut args = vec![
        format!("--registry={cluster}"),
        format!("--registry-secret={PULL_SECRET}"),
        format!("--kaniko-image={}", farm.kaniko_image),
        format!("--git-image={}", farm.git_image),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let agent = env.agent(&args).await;
    let (key, _) = eventually(TIMEOUT, "the agent's token signing key", || async {
        Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
            .get_opt(shapeblock_agent::controllers::registry::DEFAULT_KEY_SECRET)
            .await
            .unwrap()
    })
    .await;
    let cert = String::from_utf8(key.data.unwrap()["tls.crt"].0.clone()).unwrap();
    let registry = Registry::start_with(farm.app_registry_options(&[cert], &cluster, port).unwrap())
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    farm.trust(&cluster).unwrap();
    Real {
        env,
        farm,
        cluster,
        _registry: registry,
        agent,
    }
}

/// A Ready project whose pods all go to the real node: the namespace selects it and tolerates
/// its taint (the apiserver's PodNodeSelector and PodTolerationRestriction admission).
async fn real_project(client: &Client, prefix: &str) -> String {
    let project = ready_project(client, prefix).await;
    let patch = json!({"metadata": {"annotations": {
        "scheduler.alpha.kubernetes.io/node-selector": format!("{}=true", realnode::LABEL_KEY),
        "scheduler.alpha.kubernetes.io/defaultTolerations":
            json!([{"key": realnode::TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]).to_string(),
    }}});
    Api::<Namespace>::all(client.clone())
        .patch(&project, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap();
    project
}

async fn sample_app(real: &Real, project: &str, name: &str) {
    create(
        Api::<App>::namespaced(real.env.client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": name},
        "spec": {
            "git": {"url": real.farm.sample_url(), "branch": "main"},
            "registry": {"url": real.cluster},
            "build": {"type": "dockerfile", "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}},
            "processes": {"web": {"port": 8080, "healthCheck": {"path": "/healthz"}}},
        }}),
    )
    .await;
}

/// Waits for a build's final phase: the build, with the agent's and node's logs on timeout.
async fn finished(real: &Real, project: &str, name: &str) -> AppBuild {
    let builds = Api::<AppBuild>::namespaced(real.env.client.clone(), project);
    let deadline = Instant::now() + REAL_BUILD_TIMEOUT;
    loop {
        let build = builds.get(name).await.unwrap();
        if build
            .status
            .as_ref()
            .and_then(|s| s.phase)
            .is_some_and(AppBuildPhase::is_final)
        {
            return build;
        }
        if Instant::now() > deadline {
            panic!(
                "AppBuild {name} not finished in {REAL_BUILD_TIMEOUT:?}: {:?}\n{}\n{}",
                build.status,
                real.agent.log_tail(40),
                testenv::real_node()
                    .map(|n| n.log_dir.display().to_string())
                    .unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn phase(build: &AppBuild) -> Option<AppBuildPhase> {
    build.status.as_ref().and_then(|s| s.phase)
}

/// The ready endpoints of the App's web Service: where kube-proxy would send a request now.
async fn ready_endpoints(client: &Client, project: &str, app: &str) -> Vec<String> {
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), project)
        .list(&ListParams::default())
        .await
        .unwrap();
    let mut addresses = Vec::new();
    for slice in slices.items {
        let service = slice
            .labels()
            .get("kubernetes.io/service-name")
            .cloned()
            .unwrap_or_default();
        if !service.starts_with(app) {
            continue;
        }
        for endpoint in slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(false);
            let terminating = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.terminating)
                .unwrap_or(false);
            if ready && !terminating {
                addresses.extend(endpoint.addresses);
            }
        }
    }
    addresses.sort();
    addresses
}

/// A plain HTTP/1.0 GET: status and body.
async fn http_get(address: &str, path: &str) -> std::io::Result<(u16, String)> {
    let endpoint = testenv::images::Endpoint::plain(address);
    endpoint
        .request("GET", path, &[], &[])
        .await
        .map(|(status, _, body)| (status, body))
        .map_err(|e| std::io::Error::other(e.to_string()))
}

async fn app_pods(client: &Client, project: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), project)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| p.labels().contains_key("app.kubernetes.io/instance") || p.labels().contains_key("app"))
        .collect()
}

/// Reads one line of a container's log through the pod log API (the real kubelet).
async fn build_log(client: &Client, project: &str, build: &str) -> String {
    let pods = Api::<Pod>::namespaced(client.clone(), project)
        .list(&ListParams::default().labels(&format!(
            "apps.shapeblock.io/build={build},apps.shapeblock.io/step=build"
        )))
        .await
        .unwrap();
    let mut text = String::new();
    for pod in pods.items {
        if let Ok(log) = Api::<Pod>::namespaced(client.clone(), project)
            .logs(
                &pod.name_any(),
                &kube::api::LogParams {
                    container: Some("build".into()),
                    ..Default::default()
                },
            )
            .await
        {
            text.push_str(&log);
        }
    }
    text
}

#[tokio::test]
async fn a_dockerfile_app_goes_from_a_commit_to_a_pod_answering_http_and_rolls_over_without_a_failed_request()
{
    let real = real(&[]).await;
    let client = real.env.client.clone();
    let project = real_project(&client, "real").await;
    sample_app(&real, &project, "web").await;
    let commit1 = real.farm.rev("main").unwrap();

    let started = Instant::now();
    create_build(&client, &project, "web-1", "web", json!({"gitRef": "main"})).await;
    let build = finished(&real, &project, "web-1").await;
    let cold = started.elapsed();
    assert_eq!(
        phase(&build),
        Some(AppBuildPhase::Completed),
        "{:?}\n{}",
        build.status,
        build_log(&client, &project, "web-1").await
    );
    let status = build.status.clone().unwrap();
    assert_eq!(status.commit_sha.as_deref(), Some(commit1.as_str()), "{status:?}");
    eprintln!(
        "build 1 (cold): commit → Completed in {cold:?}; image {:?}",
        status.image
    );
    let log = build_log(&client, &project, "web-1").await;
    eprintln!("kaniko log of build 1:\n{log}");

    let (addresses, _) = eventually(Duration::from_secs(120), "a ready endpoint of web", || async {
        let ready = ready_endpoints(&client, &project, "web").await;
        (!ready.is_empty()).then_some(ready)
    })
    .await;
    let (code, body) = http_get(&format!("{}:8080", addresses[0]), "/").await.unwrap();
    eprintln!("GET http://{}:8080/ → {code} {body:?}", addresses[0]);
    assert_eq!((code, body.as_str()), (200, "commit 1\n"));
    let _ = app_pods(&client, &project).await;

    // Commit 2: a new body; the RUN layer is the same (kaniko's layer cache).
    let commit2 = real
        .farm
        .commit("main", &[("index.html", "commit 2\n")], "commit 2")
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let (client, project, stop) = (client.clone(), project.clone(), stop.clone());
        tokio::spawn(async move {
            let mut transcript: BTreeMap<String, usize> = BTreeMap::new();
            let mut failures = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ready = ready_endpoints(&client, &project, "web").await;
                for address in ready {
                    match http_get(&format!("{address}:8080"), "/").await {
                        Ok((200, body)) => *transcript.entry(body).or_default() += 1,
                        other => failures.push(format!("{address}: {other:?}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (transcript, failures)
        })
    };
    let started = Instant::now();
    create_build(&client, &project, "web-2", "web", json!({"gitRef": "main"})).await;
    let build = finished(&real, &project, "web-2").await;
    let cached = started.elapsed();
    assert_eq!(
        phase(&build),
        Some(AppBuildPhase::Completed),
        "{:?}",
        build.status
    );
    assert_eq!(
        build.status.as_ref().unwrap().commit_sha.as_deref(),
        Some(commit2.as_str())
    );
    let log = build_log(&client, &project, "web-2").await;
    eprintln!("build 2 (changed COPY layer): Completed in {cached:?}\nkaniko log:\n{log}");
    eventually(
        Duration::from_secs(120),
        "every ready endpoint serving commit 2",
        || async {
            let ready = ready_endpoints(&client, &project, "web").await;
            let mut all = !ready.is_empty();
            for address in ready {
                all &=
                    http_get(&format!("{address}:8080"), "/").await.ok() == Some((200, "commit 2\n".into()));
            }
            all.then_some(())
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (transcript, failures) = probe.await.unwrap();
    eprintln!("GETs during the rollout: {transcript:?}, failed: {failures:?}");
    assert!(
        failures.is_empty(),
        "requests failed during the rollout: {failures:?}"
    );
    assert!(
        transcript.contains_key("commit 1\n") && transcript.contains_key("commit 2\n"),
        "{transcript:?}"
    );
    drop(real.agent);
}
