//! Push credentials against a real registry: Debian's `docker-registry` (distribution 2.8) with
//! token auth, trusting only the agent's signing certificate. First the tokens alone (what a
//! token for one App may and may not do), then end to end: the agent binary on the simulated
//! cluster mints a token per build, and a build's pod sees that token and nothing else.

mod support;

use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase, AppPhase};
use shapeblock_agent::controllers::registry::{DEFAULT_KEY_SECRET, Signer};
use shapeblock_testenv::nodes::{PodOutcome, PodSelector, set_pod_outcome};
use shapeblock_testenv::registry::{Registry, TokenAuth};
use support::agent::*;
use support::eventually;

const ISSUER: &str = "shapeblock-agent";
const SERVICE: &str = "registry.test";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The HTTP status of `method url` with an optional bearer token (curl: no client of our own
/// between the test and the registry). `extra` goes to curl as is.
fn status(method: &str, url: &str, token: Option<&str>, extra: &[&str]) -> u16 {
    let mut command = std::process::Command::new("curl");
    command.args([
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-X",
        method,
        "--max-time",
        "10",
    ]);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    command.args(extra).arg(url);
    let output = command.output().expect("run curl");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl {method} {url}: {output:?}"))
}

/// Starts a blob upload; on 202 finishes it with a small blob, as a push does, and returns
/// the final status (201 when the blob is stored).
fn push_blob(registry: &str, repository: &str, token: Option<&str>) -> u16 {
    let start = format!("http://{registry}/v2/{repository}/blobs/uploads/");
    let mut command = std::process::Command::new("curl");
    command.args([
        "-s",
        "-o",
        "/dev/null",
        "-D",
        "-",
        "-X",
        "POST",
        "--max-time",
        "10",
    ]);
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let output = command.arg(&start).output().expect("run curl");
    let headers = String::from_utf8_lossy(&output.stdout).to_string();
    let code: u16 = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status from POST {start}: {headers}"));
    if code != 202 {
        return code;
    }
    let location = headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .expect("an upload location")
        .trim()
        .to_string();
    let blob = b"shapeblock registry test blob";
    let digest = ring::digest::digest(&ring::digest::SHA256, blob);
    let digest = format!("sha256:{}", shapeblock_agent::proto::hex(digest.as_ref()));
    let separator = if location.contains('?') { '&' } else { '?' };
    let url = if location.starts_with("http") {
        format!("{location}{separator}digest={digest}")
    } else {
        format!("http://{registry}{location}{separator}digest={digest}")
    };
    let body = std::env::temp_dir().join(format!("shapeblock-blob-{}", std::process::id()));
    std::fs::write(&body, blob).unwrap();
    let code = status(
        "PUT",
        &url,
        token,
        &[
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &format!("@{}", body.display()),
        ],
    );
    let _ = std::fs::remove_file(&body);
    code
}

fn repositories(project: &str, app: &str) -> Vec<String> {
    vec![format!("{project}/{app}"), format!("{project}/{app}/cache")]
}

#[tokio::test]
async fn a_token_for_one_app_pushes_there_and_nowhere_else() {
    let (agent, _) = Signer::generate().unwrap();
    let (stranger, _) = Signer::generate().unwrap();
    let registry = Registry::start(
        &TokenAuth {
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_certs: vec![agent.cert_pem.clone()],
        },
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    let address = registry.address.as_str();
    let token = agent
        .mint(ISSUER, SERVICE, "a/web-1", &repositories("a", "web"), 300)
        .unwrap();
    let upload = |repository: &str, token: Option<&str>| {
        status(
            "POST",
            &format!("http://{address}/v2/{repository}/blobs/uploads/"),
            token,
            &[],
        )
    };

    // The App's repository and its cache: accepted, and a whole blob is stored.
    assert_eq!(upload("a/web", Some(&token)), 202);
    assert_eq!(upload("a/web/cache", Some(&token)), 202);
    assert_eq!(push_blob(address, "a/web", Some(&token)), 201);
    assert_eq!(push_blob(address, "a/web/cache", Some(&token)), 201);

    // Another project's repository, another App of the same project, a path below or above:
    // refused, for push and for pull.
    let denied = |code: u16| code == 401 || code == 403;
    for repository in ["b/web", "a/other", "b/web/cache", "a/web/cache/x", "a"] {
        let code = upload(repository, Some(&token));
        assert!(denied(code), "{repository}: {code}");
    }
    let pull = status(
        "GET",
        &format!("http://{address}/v2/b/web/tags/list"),
        Some(&token),
        &[],
    );
    assert!(denied(pull), "pull from b/web: {pull}");
    assert!(denied(upload("a/web", None)), "no token");

    // Expired (past the registry's minute of leeway), signed by a key it does not trust, or
    // minted for another registry or issuer: refused.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expired = agent
        .mint_at(
            ISSUER,
            SERVICE,
            "a/web-1",
            &repositories("a", "web"),
            now - 7200,
            now - 3600,
        )
        .unwrap();
    let not_yet = agent
        .mint_at(
            ISSUER,
            SERVICE,
            "a/web-1",
            &repositories("a", "web"),
            now + 3600,
            now + 7200,
        )
        .unwrap();
    let foreign = stranger
        .mint(ISSUER, SERVICE, "a/web-1", &repositories("a", "web"), 300)
        .unwrap();
    let other_audience = agent
        .mint(
            ISSUER,
            "other.registry",
            "a/web-1",
            &repositories("a", "web"),
            300,
        )
        .unwrap();
    let other_issuer = agent
        .mint("someone-else", SERVICE, "a/web-1", &repositories("a", "web"), 300)
        .unwrap();
    // A token whose signature was made for other claims (the access list edited to `b`).
    let forged = {
        let parts: Vec<&str> = token.split('.').collect();
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = String::from_utf8(b64.decode(parts[1]).unwrap())
            .unwrap()
            .replace("\"a/web\"", "\"b/web\"");
        format!("{}.{}.{}", parts[0], b64.encode(claims), parts[2])
    };
    for (what, bad) in [
        ("expired", &expired),
        ("not yet valid", &not_yet),
        ("signed by another key", &foreign),
        ("for another service", &other_audience),
        ("from another issuer", &other_issuer),
    ] {
        let code = upload("a/web", Some(bad));
        assert!(denied(code), "{what}: {code}");
    }
    let code = upload("b/web", Some(&forged));
    assert!(denied(code), "edited claims: {code}");
}

async fn app(client: &Client, project: &str, name: &str, registry: &str) {
    app_with(client, project, name, json!({"url": registry})).await;
}

async fn app_with(client: &Client, project: &str, name: &str, registry: serde_json::Value) {
    create(
        Api::<App>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": name},
               "spec": {"registry": registry, "build": {"type": "dockerfile"},
                        "git": {"url": "https://github.com/example/web.git"}}}),
    )
    .await;
    wait_app(client, project, name, AppPhase::Ready).await;
}

#[tokio::test]
async fn each_build_mounts_only_its_own_token_and_it_goes_with_the_build() {
    let env = env().await;
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let cluster_registry = format!("127.0.0.1:{port}");
    let _agent = env
        .agent(&[
            &format!("--registry={cluster_registry}"),
            &format!("--registry-token-service={SERVICE}"),
        ])
        .await;
    // The agent makes its signing key at start; the registry is given its certificate.
    let secrets = |namespace: &str| Api::<Secret>::namespaced(env.client.clone(), namespace);
    let (key, _) = eventually(TIMEOUT, "the agent's token signing key", || async {
        secrets(AGENT_NS).get_opt(DEFAULT_KEY_SECRET).await.unwrap()
    })
    .await;
    let cert = String::from_utf8(key.data.unwrap()["tls.crt"].0.clone()).unwrap();
    let registry = Registry::start(
        &TokenAuth {
            service: SERVICE.into(),
            issuer: ISSUER.into(),
            root_certs: vec![cert],
        },
        Some(port),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}"));

    let project = ready_project(&env.client, "push").await;
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "resolve"),
        &PodOutcome::Succeed {
            after: Duration::from_millis(200),
            message: Some(COMMIT.into()),
        },
    )
    .await
    .unwrap();
    // The build runs until cancelled: what it holds is looked at while it runs.
    let hang = set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &PodOutcome::Hang,
    )
    .await
    .unwrap();
    app(&env.client, &project, "web", &cluster_registry).await;
    create_build(&env.client, &project, "web-1", "web", json!({})).await;

    let jobs = Api::<Job>::namespaced(env.client.clone(), &project);
    let (job, _) = eventually(BUILD_TIMEOUT, "the build Job", || async {
        jobs.get_opt("web-1-build").await.unwrap()
    })
    .await;
    let pod = job.spec.unwrap().template.spec.unwrap();
    // The pod's only Secret is the build's own, mounted into the build container only.
    let secret_volumes: Vec<(String, String)> = pod
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| Some((v.name.clone(), v.secret.as_ref()?.secret_name.clone()?)))
        .collect();
    assert_eq!(
        secret_volumes,
        [("registry".to_string(), "web-1-push".to_string())]
    );
    let mounts = |containers: &[k8s_openapi::api::core::v1::Container]| {
        containers
            .iter()
            .filter(|c| c.volume_mounts.iter().flatten().any(|m| m.name == "registry"))
            .map(|c| c.name.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(mounts(&pod.containers), ["build"]);
    assert!(mounts(pod.init_containers.as_deref().unwrap_or_default()).is_empty());
    let spec = serde_json::to_string(&pod).unwrap();
    assert!(
        !spec.contains(PULL_SECRET),
        "the shared credential is not in the pod: {spec}"
    );

    // Its config carries a token and no password, for this App's repositories.
    let push = secrets(&project).get("web-1-push").await.unwrap();
    assert_eq!(push.metadata.owner_references.unwrap()[0].name, "web-1");
    let config: serde_json::Value =
        serde_json::from_slice(&push.data.unwrap()[".dockerconfigjson"].0).unwrap();
    let auths = config["auths"].as_object().unwrap();
    assert_eq!(auths.keys().collect::<Vec<_>>(), [&cluster_registry]);
    let entry = auths[&cluster_registry].as_object().unwrap();
    assert_eq!(entry.keys().collect::<Vec<_>>(), ["registrytoken"]);
    let token = entry["registrytoken"].as_str().unwrap();

    // The real registry takes it for this App and refuses it for another project's.
    let address = registry.address.as_str();
    assert_eq!(push_blob(address, &format!("{project}/web"), Some(token)), 201);
    assert_eq!(
        push_blob(address, &format!("{project}/web/cache"), Some(token)),
        201
    );
    let elsewhere = push_blob(address, "other-project/web", Some(token));
    assert!(elsewhere == 401 || elsewhere == 403, "{elsewhere}");
    // What stays in the project namespace is the pull secret copy: not a push credential.
    let copy = secrets(&project).get(PULL_SECRET).await.unwrap();
    let copy: serde_json::Value = serde_json::from_slice(&copy.data.unwrap()[".dockerconfigjson"].0).unwrap();
    let basic = copy["auths"]["registry.example.com"].clone();
    let code = status(
        "POST",
        &format!("http://{address}/v2/{project}/web/blobs/uploads/"),
        None,
        &[
            "-u",
            &format!(
                "{}:{}",
                basic["username"].as_str().unwrap(),
                basic["password"].as_str().unwrap()
            ),
        ],
    );
    assert_eq!(code, 401, "the pull secret cannot push");

    // Cancelled: the token's Secret goes at once.
    Api::<AppBuild>::namespaced(env.client.clone(), &project)
        .patch(
            "web-1",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {(shapeblock_agent::api::CANCEL_ANNOTATION): "true"}}}),
            ),
        )
        .await
        .unwrap();
    wait_build(&env.client, &project, "web-1", AppBuildPhase::Cancelled).await;
    eventually(TIMEOUT, "the push Secret to be deleted", || async {
        secrets(&project)
            .get_opt("web-1-push")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;

    // A build that pushes: its token goes once the image is recorded, not with the Job.
    hang.remove(&env.client).await.unwrap();
    let succeed = set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &PodOutcome::Succeed {
            after: Duration::from_secs(3),
            message: Some(format!("sha256:{}", "ab".repeat(32))),
        },
    )
    .await
    .unwrap();
    create_build(&env.client, &project, "web-2", "web", json!({})).await;
    eventually(BUILD_TIMEOUT, "web-2's push Secret", || async {
        secrets(&project).get_opt("web-2-push").await.unwrap()
    })
    .await;
    eventually(BUILD_TIMEOUT, "web-2's image, then no push Secret", || async {
        let built = Api::<AppBuild>::namespaced(env.client.clone(), &project)
            .get("web-2")
            .await
            .unwrap()
            .status
            .and_then(|s| s.image)
            .is_some();
        let gone = secrets(&project).get_opt("web-2-push").await.unwrap().is_none();
        (built && gone).then_some(())
    })
    .await;

    // A build named so that its push Secret would be someone else's Secret does not write
    // over it.
    let theirs: Secret = serde_json::from_value(json!({
        "metadata": {"name": "web-3-push"}, "stringData": {"password": "not the agent's"},
    }))
    .unwrap();
    secrets(&project)
        .create(&Default::default(), &theirs)
        .await
        .unwrap();
    // (Another tag: the same inputs as web-2 would reuse its image without a build.)
    create(
        Api::<AppBuild>::namespaced(env.client.clone(), &project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild", "metadata": {"name": "web-3"},
               "spec": {"appName": "web", "imageTag": "v3"}}),
    )
    .await;
    let refused = wait_build(&env.client, &project, "web-3", AppBuildPhase::Failed).await;
    assert_eq!(
        refused.status.unwrap().reason.as_deref(),
        Some("PushSecretConflict")
    );
    let kept = secrets(&project).get("web-3-push").await.unwrap();
    assert_eq!(kept.data.unwrap()["password"].0, b"not the agent's");
    assert!(jobs.get_opt("web-3-build").await.unwrap().is_none());

    // A path of the tenant's choosing inside the cluster registry is refused before any Job.
    app(
        &env.client,
        &project,
        "sneaky",
        &format!("{cluster_registry}/other-project"),
    )
    .await;
    create_build(&env.client, &project, "sneaky-1", "sneaky", json!({})).await;
    let refused = wait_build(&env.client, &project, "sneaky-1", AppBuildPhase::Failed).await;
    let status = refused.status.unwrap();
    assert_eq!(
        status.reason.as_deref(),
        Some("RegistryPathRefused"),
        "{status:?}"
    );
    assert!(
        status
            .message
            .as_deref()
            .unwrap()
            .contains(&format!("set registry.url to {cluster_registry}")),
        "{status:?}"
    );
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "RegistryPathRefused")
    );
    eventually(TIMEOUT, "a Warning Event saying why", || async {
        support::events_for(&env.client, &project, "sneaky-1")
            .await
            .into_iter()
            .find(|e| {
                e.type_.as_deref() == Some("Warning") && e.reason.as_deref() == Some("RegistryPathRefused")
            })
    })
    .await;
    assert!(jobs.get_opt("sneaky-1-resolve").await.unwrap().is_none());
    assert!(
        secrets(&project)
            .get_opt("sneaky-1-push")
            .await
            .unwrap()
            .is_none()
    );

    // Another registry: a Secret of the namespace that was not made as its credential (here
    // the pull secret copy) is refused; one marked for that host is what the build mounts.
    app_with(
        &env.client,
        &project,
        "borrowed",
        json!({"url": "ghcr.io/acme", "secretName": PULL_SECRET}),
    )
    .await;
    create_build(&env.client, &project, "borrowed-1", "borrowed", json!({})).await;
    let refused = wait_build(&env.client, &project, "borrowed-1", AppBuildPhase::Failed).await;
    let status = refused.status.unwrap();
    assert_eq!(
        status.reason.as_deref(),
        Some("RegistrySecretRefused"),
        "{status:?}"
    );
    assert!(
        status.message.as_deref().unwrap().contains("no label"),
        "{status:?}"
    );
    let own: Secret = serde_json::from_value(json!({
        "metadata": {"name": "ghcr", "labels": {"apps.shapeblock.io/credential": "registry"},
                     "annotations": {"apps.shapeblock.io/registry-host": "ghcr.io"}},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": "{\"auths\":{\"ghcr.io\":{\"auth\":\"YTpi\"}}}"},
    }))
    .unwrap();
    secrets(&project).create(&Default::default(), &own).await.unwrap();
    app_with(
        &env.client,
        &project,
        "own",
        json!({"url": "ghcr.io/acme", "secretName": "ghcr"}),
    )
    .await;
    succeed.remove(&env.client).await.unwrap();
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&project, "build"),
        &PodOutcome::Hang,
    )
    .await
    .unwrap();
    create_build(&env.client, &project, "own-1", "own", json!({})).await;
    let (job, _) = eventually(BUILD_TIMEOUT, "the own registry's build Job", || async {
        jobs.get_opt("own-1-build").await.unwrap()
    })
    .await;
    let volumes = job
        .spec
        .unwrap()
        .template
        .spec
        .unwrap()
        .volumes
        .unwrap_or_default();
    let registry_volume = volumes.iter().find(|v| v.name == "registry").unwrap();
    assert_eq!(
        registry_volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("ghcr")
    );
    assert!(
        secrets(&project).get_opt("own-1-push").await.unwrap().is_none(),
        "no token minted for another registry"
    );
}
