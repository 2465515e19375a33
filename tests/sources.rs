//! An App's git source against a tenant who may edit Apps but not read Secrets (the Team
//! `developer` role): the Secrets an App may clone with, and the hosts it may clone from. Real
//! apiserver, real agent binary.

mod support;

use std::collections::BTreeMap;
use std::time::Instant;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use shapeblock_agent::api::{App, AppBuild, AppBuildPhase, AppPhase};
use support::agent::*;
use support::{events_for, eventually};

const URL: &str = "https://github.com/example/web.git";

fn condition<'a>(app: &'a App, type_: &str) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    app.status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
        .unwrap_or_else(|| panic!("no {type_} condition: {:?}", app.status))
}

/// Waits until the App's `Ready` condition has `reason` (and returns the App).
async fn wait_ready_reason(client: &Client, project: &str, name: &str, reason: &str) -> App {
    let apps = Api::<App>::namespaced(client.clone(), project);
    eventually(TIMEOUT, &format!("App {name} Ready reason {reason}"), || async {
        let app = apps.get(name).await.unwrap();
        let current = app
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.reason.clone());
        let current_generation =
            app.status.as_ref().and_then(|s| s.observed_generation) == app.metadata.generation;
        (current.as_deref() == Some(reason) && current_generation).then_some(app)
    })
    .await
    .0
}

/// Changes the App's description: a new generation, so the agent looks at it (and at the
/// Secret it names) now rather than at its next periodic check.
async fn touch(client: &Client, project: &str, name: &str, note: &str) {
    Api::<App>::namespaced(client.clone(), project)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"description": note}})),
        )
        .await
        .unwrap();
}

/// Waits for a Warning Event about `name` with `reason` and exactly `note` (the Event follows
/// the status write that the test waits for).
async fn wait_warning(client: &Client, project: &str, name: &str, reason: &str, note: &str) {
    eventually(
        TIMEOUT,
        &format!("a Warning {reason} about {name}: {note}"),
        || async {
            events_for(client, project, name)
                .await
                .into_iter()
                .any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.type_.as_deref() == Some("Warning")
                        && e.note.as_deref() == Some(note)
                })
                .then_some(())
        },
    )
    .await;
}

async fn start_build(client: &Client, project: &str, name: &str, app: &str) {
    create(
        Api::<AppBuild>::namespaced(client.clone(), project),
        json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
               "metadata": {"name": name}, "spec": {"appName": app}}),
    )
    .await;
}

async fn resolve_job(client: &Client, project: &str, build: &str) -> Option<Job> {
    Api::<Job>::namespaced(client.clone(), project)
        .get_opt(&format!("{build}-resolve"))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_git_secret_is_used_only_once_marked_for_the_urls_host() {
    let started = Instant::now();
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "sources").await;
    let secrets = Api::<Secret>::namespaced(env.client.clone(), &project);
    // A Secret of the namespace that was never meant for clones (a developer can name it,
    // not read it): username and password, as a tenant's own git server would want them.
    let mut token = Secret {
        type_: Some("kubernetes.io/basic-auth".into()),
        data: Some(BTreeMap::from([
            ("username".to_string(), ByteString(b"ci".to_vec())),
            ("password".to_string(), ByteString(b"s3cret-token".to_vec())),
        ])),
        ..Default::default()
    };
    token.metadata.name = Some("git-token".into());
    secrets.create(&PostParams::default(), &token).await.unwrap();
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        app_manifest(
            "web",
            json!({"url": URL, "secretName": "git-token", "isPrivate": true}),
        ),
    )
    .await;
    let refused = wait_ready_reason(&env.client, &project, "web", "CredentialsNotAllowed").await;
    let message = condition(&refused, "CredentialsReady").message.clone();
    for lacks in [
        "the label apps.shapeblock.io/credential=git",
        "the annotation apps.shapeblock.io/git-hosts",
    ] {
        assert!(message.contains(lacks), "{message}");
    }
    assert_eq!(refused.status.as_ref().unwrap().phase, Some(AppPhase::Failed));
    assert_eq!(
        refused.status.as_ref().unwrap().git_secret_name,
        None,
        "builds are given no Secret"
    );
    wait_warning(&env.client, &project, "web", "CredentialsNotAllowed", &message).await;
    // A build of it fails with the reason, and no Job ever holds the Secret.
    start_build(&env.client, &project, "web-1", "web").await;
    let failed = wait_build(&env.client, &project, "web-1", AppBuildPhase::Failed).await;
    let status = failed.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("CredentialsNotAllowed"));
    assert!(status.message.unwrap().contains("git-token"));
    assert!(resolve_job(&env.client, &project, "web-1").await.is_none());

    // Marked by someone who may write Secrets, for the URL's host: used.
    secrets
        .patch(
            "git-token",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "labels": {"apps.shapeblock.io/credential": "git"},
                "annotations": {"apps.shapeblock.io/git-hosts": "github.com"}}})),
        )
        .await
        .unwrap();
    touch(&env.client, &project, "web", "marked").await;
    let ready = wait_app(&env.client, &project, "web", AppPhase::Ready).await;
    assert_eq!(
        ready.status.as_ref().unwrap().git_secret_name.as_deref(),
        Some("git-token")
    );
    start_build(&env.client, &project, "web-2", "web").await;
    let (job, _) = eventually(BUILD_TIMEOUT, "the resolve Job of web-2", || {
        resolve_job(&env.client, &project, "web-2")
    })
    .await;
    let pod = job.spec.unwrap().template.spec.unwrap();
    let container = &pod.containers[0];
    let from_secret: Vec<_> = container
        .env
        .iter()
        .flatten()
        .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
        .map(|r| format!("{}/{}", r.name, r.key))
        .collect();
    assert_eq!(from_secret, ["git-token/username", "git-token/password"]);
    assert!(
        pod.volumes.iter().flatten().all(|v| v.secret.is_none()),
        "the Secret is not mounted: {:?}",
        pod.volumes
    );
    let host = container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "GIT_HOST")
        .unwrap();
    assert_eq!(host.value.as_deref(), Some("github.com"));
    Api::<AppBuild>::namespaced(env.client.clone(), &project)
        .patch(
            "web-2",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {CANCEL: "true"}}})),
        )
        .await
        .unwrap();

    // The same Secret bound to another host only: refused again, saying for which host it is.
    secrets
        .patch(
            "git-token",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"annotations": {"apps.shapeblock.io/git-hosts": "gitlab.example.com"}}}),
            ),
        )
        .await
        .unwrap();
    touch(&env.client, &project, "web", "rebound").await;
    let refused = wait_ready_reason(&env.client, &project, "web", "CredentialsNotForHost").await;
    let message = condition(&refused, "CredentialsReady").message.clone();
    assert!(
        message.contains(
            "github.com in its annotation apps.shapeblock.io/git-hosts (it is for \"gitlab.example.com\")"
        ),
        "{message}"
    );
    assert!(refused.status.unwrap().git_secret_name.is_none());
    wait_warning(&env.client, &project, "web", "CredentialsNotForHost", &message).await;

    // A Secret squatting the generated deploy key's name is not taken for it.
    let mut squat = Secret {
        type_: Some("kubernetes.io/ssh-auth".into()),
        data: Some(BTreeMap::from([(
            "ssh-privatekey".to_string(),
            ByteString(b"-----BEGIN OPENSSH PRIVATE KEY-----".to_vec()),
        )])),
        ..Default::default()
    };
    squat.metadata.name = Some("api-deploy-key".into());
    secrets.create(&PostParams::default(), &squat).await.unwrap();
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        app_manifest(
            "api",
            json!({"url": "git@github.com:example/api.git", "isPrivate": true}),
        ),
    )
    .await;
    let conflict = wait_ready_reason(&env.client, &project, "api", "DeployKeyConflict").await;
    assert!(conflict.status.unwrap().ssh_public_key.is_none());
    println!(
        "a_git_secret_is_used_only_once_marked_for_the_urls_host: {:?}",
        started.elapsed()
    );
}

const CANCEL: &str = shapeblock_agent::api::CANCEL_ANNOTATION;

#[tokio::test]
async fn loopback_and_metadata_hosts_in_other_spellings_are_refused() {
    let started = Instant::now();
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "spellings").await;
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    let cases = [
        (
            "decimal",
            "https://2130706433/x.git",
            "127.0.0.1 is a loopback address",
        ),
        ("hex", "https://0x7f.1/x.git", "127.0.0.1 is a loopback address"),
        (
            "metadata",
            "https://metadata.google.internal./x.git",
            "metadata.google.internal names this node or a cloud's instance metadata service",
        ),
    ];
    for (name, url, _) in cases {
        create(apps.clone(), app_manifest(name, json!({"url": url}))).await;
    }
    for (name, url, why) in cases {
        let app = wait_ready_reason(&env.client, &project, name, "InvalidSpec").await;
        let source = condition(&app, "SourceValid");
        assert_eq!(source.status, "False");
        assert!(
            source
                .message
                .starts_with(&format!("git.url {url:?} is refused: {why}")),
            "{name}: {}",
            source.message
        );
        wait_warning(&env.client, &project, name, "InvalidSpec", &source.message).await;
    }
    // A build of such an App fails before any Job is made.
    start_build(&env.client, &project, "hex-1", "hex").await;
    let failed = wait_build(&env.client, &project, "hex-1", AppBuildPhase::Failed).await;
    let status = failed.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("InvalidSpec"));
    assert!(status.message.unwrap().contains("loopback"));
    assert!(resolve_job(&env.client, &project, "hex-1").await.is_none());
    println!(
        "loopback_and_metadata_hosts_in_other_spellings_are_refused: {:?}",
        started.elapsed()
    );
}
