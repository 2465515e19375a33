//! Builds on the real node (crates/testenv/src/realnode.rs, crates/testenv/src/buildfarm.rs), nothing
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
use shapeblock_testenv::agent::AgentProcess;
use shapeblock_testenv::buildfarm::{self, BuildFarm, PULL_USER};
use shapeblock_testenv::registry::Registry;
use shapeblock_testenv::{self as testenv, realnode};
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
    real_with(extra, false).await
}

/// [`real`] with an App registry that refuses every push (`read_only`: distribution's
/// maintenance mode) if asked.
async fn real_with(extra: &[&str], read_only: bool) -> Real {
    let env = if extra.iter().any(|a| a.starts_with("--hub-address=")) {
        support::agent::hub_env().await
    } else {
        support::agent::env().await
    };
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
        format!("--builder-image={}", farm.builder_image),
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
    let mut options = farm.app_registry_options(&[cert], &cluster, port).unwrap();
    options.read_only = read_only;
    let registry = Registry::start_with(options)
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

/// `GET path` printed as a transcript: request, status, headers, body.
async fn transcript(address: &str, path: &str) -> String {
    let endpoint = testenv::images::Endpoint::plain(address);
    match endpoint.request("GET", path, &[], &[]).await {
        Ok((status, headers, body)) => {
            let headers: Vec<String> = headers.iter().map(|(n, v)| format!("< {n}: {v}")).collect();
            format!(
                "> GET http://{address}{path}\n< {status}\n{}\n<\n{body}",
                headers.join("\n")
            )
        }
        Err(e) => format!("> GET http://{address}{path}\n! {e}"),
    }
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

/// Follows the build container's log of build `build` through the pod log API (the real
/// kubelet reading containerd's log file) from the moment its pod exists until it ends: the
/// agent deletes finished build Jobs, so the log is read while it is written.
fn follow_build_log(client: &Client, project: &str, build: &str) -> tokio::task::JoinHandle<String> {
    let pods = Api::<Pod>::namespaced(client.clone(), project);
    let selector = format!("apps.shapeblock.io/build={build},apps.shapeblock.io/step=build");
    tokio::spawn(async move {
        use futures::AsyncBufReadExt;
        let deadline = Instant::now() + REAL_BUILD_TIMEOUT;
        while Instant::now() < deadline {
            let list = pods.list(&ListParams::default().labels(&selector)).await.unwrap();
            for pod in list.items {
                let started = pod
                    .status
                    .as_ref()
                    .and_then(|s| s.container_statuses.as_ref())
                    .is_some_and(|c| {
                        c.iter().any(|c| {
                            c.name == "build" && c.state.as_ref().is_some_and(|s| s.waiting.is_none())
                        })
                    });
                if !started {
                    continue;
                }
                let params = kube::api::LogParams {
                    container: Some("build".into()),
                    follow: true,
                    ..Default::default()
                };
                let Ok(stream) = pods.log_stream(&pod.name_any(), &params).await else {
                    continue;
                };
                let mut lines = stream.lines();
                let mut text = String::new();
                while let Some(Ok(line)) = futures::StreamExt::next(&mut lines).await {
                    text.push_str(&line);
                    text.push('\n');
                }
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        String::new()
    })
}

/// The build Jobs the agent made for `build` so far (any step).
async fn build_pods_seen(client: &Client, project: &str, build: &str, step: &str) -> usize {
    Api::<k8s_openapi::api::batch::v1::Job>::namespaced(client.clone(), project)
        .list(&ListParams::default().labels(&format!(
            "apps.shapeblock.io/build={build},apps.shapeblock.io/step={step}"
        )))
        .await
        .unwrap()
        .items
        .len()
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
    let log = follow_build_log(&client, &project, "web-1");
    create_build(&client, &project, "web-1", "web", json!({"gitRef": "main"})).await;
    let build = finished(&real, &project, "web-1").await;
    let cold = started.elapsed();
    let log = log.await.unwrap();
    assert_eq!(
        phase(&build),
        Some(AppBuildPhase::Completed),
        "{:?}\n{log}",
        build.status
    );
    let status = build.status.clone().unwrap();
    assert_eq!(status.commit_sha.as_deref(), Some(commit1.as_str()), "{status:?}");
    eprintln!(
        "build 1 (cold): commit → Completed in {cold:?}; image {:?}",
        status.image
    );
    eprintln!("kaniko log of build 1:\n{log}");
    assert!(
        log.contains("built on x86_64"),
        "the RUN step ran in kaniko: {log}"
    );

    let (addresses, _) = eventually(Duration::from_secs(120), "a ready endpoint of web", || async {
        let ready = ready_endpoints(&client, &project, "web").await;
        (!ready.is_empty()).then_some(ready)
    })
    .await;
    let (code, body) = http_get(&format!("{}:8080", addresses[0]), "/").await.unwrap();
    eprintln!(
        "before the rollout:\n{}",
        transcript(&format!("{}:8080", addresses[0]), "/").await
    );
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
            let mut answers: BTreeMap<String, usize> = BTreeMap::new();
            let mut failures = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let ready = ready_endpoints(&client, &project, "web").await;
                for address in ready {
                    match http_get(&format!("{address}:8080"), "/").await {
                        Ok((200, body)) => *answers.entry(body).or_default() += 1,
                        other => failures.push(format!("{address}: {other:?}")),
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (answers, failures)
        })
    };
    let started = Instant::now();
    let log = follow_build_log(&client, &project, "web-2");
    create_build(&client, &project, "web-2", "web", json!({"gitRef": "main"})).await;
    let build = finished(&real, &project, "web-2").await;
    let cached = started.elapsed();
    let log = log.await.unwrap();
    assert_eq!(
        phase(&build),
        Some(AppBuildPhase::Completed),
        "{:?}\n{log}",
        build.status
    );
    assert_eq!(
        build.status.as_ref().unwrap().commit_sha.as_deref(),
        Some(commit2.as_str())
    );
    eprintln!("build 2 (changed COPY layer): Completed in {cached:?}\nkaniko log:\n{log}");
    // Kaniko's layer cache in the cluster registry (`--cache-repo`): the unchanged RUN layer
    // is taken from it, not run again.
    assert!(
        log.contains("Found cached layer") || log.contains("Using caching version of cmd"),
        "no layer cache hit in build 2: {log}"
    );
    assert!(
        !log.contains("built on x86_64"),
        "the cached RUN step ran again: {log}"
    );
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
    let (answers, failures) = probe.await.unwrap();
    eprintln!("GETs during the rollout: {answers:?}, failed: {failures:?}");
    let after = ready_endpoints(&client, &project, "web").await;
    eprintln!(
        "after the rollout:\n{}",
        transcript(&format!("{}:8080", after[0]), "/").await
    );
    assert!(
        failures.is_empty(),
        "requests failed during the rollout: {failures:?}"
    );
    assert!(
        answers.contains_key("commit 1\n") && answers.contains_key("commit 2\n"),
        "{answers:?}"
    );

    // The same inputs again: the image is reused, no build Job at all.
    let started = Instant::now();
    create_build(&client, &project, "web-3", "web", json!({"gitRef": "main"})).await;
    let build = finished(&real, &project, "web-3").await;
    assert_eq!(
        phase(&build),
        Some(AppBuildPhase::Completed),
        "{:?}",
        build.status
    );
    let built = build
        .status
        .as_ref()
        .unwrap()
        .conditions
        .iter()
        .find(|c| c.type_ == "Built")
        .cloned();
    assert_eq!(
        built.as_ref().map(|c| c.reason.as_str()),
        Some("ImageReused"),
        "{built:?}"
    );
    assert_eq!(build_pods_seen(&client, &project, "web-3", "build").await, 0);
    eprintln!(
        "build 3 (same inputs): Completed in {:?}, {}",
        started.elapsed(),
        built.unwrap().message
    );
    drop(real.agent);
}

/// A failing `RUN`, a ref that does not exist, a registry that refuses the push: each ends in
/// its own reason, with what the real tool said.
#[tokio::test]
async fn real_failures_end_in_reasons_from_evidence() {
    // With a hub: the failing build's log is relayed.
    let data = tempfile::tempdir().unwrap();
    let hub = support::hub::start(data.path()).await;
    let cluster = support::unique_name("real");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let real = real(&[
        &format!("--hub-address={}", hub.url()),
        &format!("--enroll-token={token}"),
        &format!("--ca-hash={}", hub.ca_hash()),
        "--heartbeat-seconds=2",
        "--reconnect-max-seconds=2",
    ])
    .await;
    let client = real.env.client.clone();
    let project = real_project(&client, "fail").await;
    let base = real.farm.base_image.clone();
    real.farm
        .commit(
            "broken",
            &[(
                "Dockerfile",
                &format!("FROM {base}\nRUN echo about to fail && exit 3\n"),
            )],
            "a RUN that fails",
        )
        .unwrap();
    create(
        Api::<App>::namespaced(client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "broken"},
        "spec": {
            "git": {"url": real.farm.sample_url(), "branch": "broken"},
            "registry": {"url": real.cluster},
            "build": {"type": "dockerfile"},
            "processes": {"web": {"port": 8080}},
        }}),
    )
    .await;
    let log = follow_build_log(&client, &project, "broken-1");
    create_build(&client, &project, "broken-1", "broken", json!({})).await;
    let build = finished(&real, &project, "broken-1").await;
    let log = log.await.unwrap();
    let status = build.status.clone().unwrap();
    eprintln!(
        "failing RUN: {:?} {:?}\nlog:\n{log}",
        status.reason, status.message
    );
    assert_eq!(status.reason.as_deref(), Some("BuildFailed"), "{status:?}");
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("exit status 3"),
        "kaniko's own error line is not in {message:?}"
    );
    assert!(!message.contains('\u{1b}'), "terminal escapes in {message:?}");
    assert!(
        log.contains("about to fail") && log.contains("exit status 3"),
        "{log}"
    );

    let stream = format!("{project}/broken-1/build");
    let (relayed, _) = eventually(
        Duration::from_secs(60),
        "the failed build's log at the hub",
        || async {
            let (bytes, _, eof) = hub.store().log(&cluster, &stream).await.ok()?;
            eof.then(|| String::from_utf8_lossy(&bytes).into_owned())
        },
    )
    .await;
    assert!(
        relayed.contains("about to fail") && relayed.contains("exit status 3"),
        "the relayed log lacks kaniko's lines: {relayed}"
    );

    create_build(
        &client,
        &project,
        "broken-2",
        "broken",
        json!({"gitRef": "no-such-branch"}),
    )
    .await;
    let build = finished(&real, &project, "broken-2").await;
    let status = build.status.clone().unwrap();
    eprintln!("missing ref: {:?} {:?}", status.reason, status.message);
    assert_eq!(status.reason.as_deref(), Some("ResolveFailed"), "{status:?}");
    assert!(status.message.unwrap_or_default().contains("no-such-branch"));
    drop(real.agent);
    hub.stop().await;
}

#[tokio::test]
async fn a_registry_that_refuses_the_push_ends_push_failed() {
    let real = real_with(&[], true).await;
    let client = real.env.client.clone();
    let project = real_project(&client, "refused").await;
    sample_app(&real, &project, "web").await;
    let log = follow_build_log(&client, &project, "web-1");
    create_build(&client, &project, "web-1", "web", json!({})).await;
    let build = finished(&real, &project, "web-1").await;
    let log = log.await.unwrap();
    let status = build.status.clone().unwrap();
    eprintln!(
        "refused push: {:?} {:?}\nlog:\n{log}",
        status.reason, status.message
    );
    assert_eq!(status.reason.as_deref(), Some("PushFailed"), "{status:?}\n{log}");
    drop(real.agent);
}

/// A buildpack build, cloned over SSH with the App's deploy key: the lifecycle (built from its
/// Go module) in a builder assembled here
/// detects and builds the app with the test's buildpack, exports to the App registry on the
/// run image, and reports the process types from its own metadata; the pod serves.
#[tokio::test]
async fn a_buildpack_app_builds_with_the_real_lifecycle_and_serves() {
    let real = real(&[]).await;
    let client = real.env.client.clone();
    let project = real_project(&client, "cnb").await;
    let commit = real
        .farm
        .commit(
            "static",
            &[("index.html", "built by buildpacks\n"), ("healthz", "ok\n")],
            "a static site",
        )
        .unwrap();
    // Cloned over SSH with the App's generated deploy key, the server's host key known to the
    // agent (the clone that failed as a uid without a passwd entry).
    let known: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "shapeblock-known-hosts"},
        "data": {"known_hosts": real.farm.ssh_known_hosts},
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), AGENT_NS)
        .patch(
            "shapeblock-known-hosts",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&known),
        )
        .await
        .unwrap();
    create(
        Api::<App>::namespaced(client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "site"},
        "spec": {
            "git": {"url": real.farm.sample_ssh_url(), "branch": "static", "isPrivate": true},
            "registry": {"url": real.cluster},
            "build": {"type": "buildpack"},
            "processes": {"web": {"port": 8080, "healthCheck": {"path": "/healthz"}}},
        }}),
    )
    .await;
    let (key, _) = eventually(TIMEOUT, "the App's deploy key", || async {
        let app = Api::<App>::namespaced(client.clone(), &project)
            .get("site")
            .await
            .ok()?;
        app.status?.ssh_public_key
    })
    .await;
    real.farm.authorize(&key).unwrap();
    let started = Instant::now();
    let log = follow_build_log(&client, &project, "site-1");
    create_build(&client, &project, "site-1", "site", json!({})).await;
    let build = finished(&real, &project, "site-1").await;
    let log = log.await.unwrap();
    let status = build.status.clone().unwrap();
    eprintln!(
        "buildpack build: {:?} in {:?}\nlog:\n{log}",
        status.reason,
        started.elapsed()
    );
    assert_eq!(phase(&build), Some(AppBuildPhase::Completed), "{status:?}\n{log}");
    assert_eq!(status.commit_sha.as_deref(), Some(commit.as_str()));
    assert!(!log.contains('\u{1b}'), "terminal escapes in the log: {log}");
    assert!(
        log.contains(&format!("as {}:{}", buildfarm::CNB_USER.0, buildfarm::CNB_USER.1)),
        "the buildpack did not run as the builder's user: {log}"
    );
    assert_eq!(
        status.process_types.keys().cloned().collect::<Vec<_>>(),
        ["web"],
        "{status:?}"
    );
    let (addresses, _) = eventually(Duration::from_secs(120), "a ready endpoint of site", || async {
        let ready = ready_endpoints(&client, &project, "site").await;
        (!ready.is_empty()).then_some(ready)
    })
    .await;
    let (code, body) = http_get(&format!("{}:8080", addresses[0]), "/").await.unwrap();
    eprintln!("GET http://{}:8080/ → {code} {body:?}", addresses[0]);
    assert_eq!((code, body.as_str()), (200, "built by buildpacks\n"));
    drop(real.agent);
}
