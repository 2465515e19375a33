//! The hub→agent command path against hostile or careless commands, with real parts: the
//! reference hub on loopback (mTLS, its SQLite store), the real `shapeblock-agent` binary under
//! its own ServiceAccount, the real apiserver. Commands the hub itself would refuse are queued
//! raw, as a faulty or older hub could send them.

mod support;

use std::path::Path;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use prost::Message;
use shapeblock_agent::api::{App, Project};
use shapeblock_agent::proto::v1::server_message::Body as Down;
use shapeblock_agent::proto::v1::{
    Apply, CancelBuild, Delete, ObjectRef, PruneScope, ServerMessage, SetConfig, Sync,
};
use shapeblock_hub::{Hub, Prune};
use shapeblock_testenv::agent::AgentProcess;
use support::agent::{AGENT_NS, Env, hub_env as env};
use support::hub::result_of;
use support::{eventually, unique_name};

const TIMEOUT: Duration = Duration::from_secs(45);

/// A hub, an enrolled agent connected to it, and its cluster id.
struct Connected {
    hub: Hub,
    agent: AgentProcess,
    cluster: String,
    data: tempfile::TempDir,
}

impl Env {
    async fn connected(&self) -> Connected {
        let data = tempfile::tempdir().unwrap();
        let hub = support::hub::start(data.path()).await;
        let cluster = unique_name("c");
        let token = hub
            .create_token(&cluster, Duration::from_secs(300))
            .await
            .unwrap();
        let log = self.dir.join(format!("{}.log", unique_name("commands-agent")));
        let args = [
            "--log=shapeblock_agent=debug,info".to_string(),
            format!("--hub-address={}", hub.url()),
            format!("--enroll-token={token}"),
            format!("--ca-hash={}", hub.ca_hash()),
            "--heartbeat-seconds=2".to_string(),
            "--reconnect-max-seconds=2".to_string(),
            // No registry credentials to copy: Projects become Ready on their own.
            "--registry-secret=".to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent = AgentProcess::start(
            Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
            &self.kubeconfig,
            AGENT_NS,
            &log,
            &args,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        Connected {
            hub,
            agent,
            cluster,
            data,
        }
    }
}

impl Connected {
    /// Queues `body` unchecked and waits for its result (ok, message).
    async fn raw(&self, body: Down) -> (bool, String) {
        let bytes = ServerMessage {
            seq: 0,
            body: Some(body),
        }
        .encode_to_vec();
        let seq = self.hub.queue(&self.cluster, bytes).await.unwrap();
        self.result(seq).await
    }

    async fn result(&self, seq: u64) -> (bool, String) {
        eventually(TIMEOUT, &format!("the result of command {seq}"), || {
            result_of(&self.hub, &self.cluster, seq)
        })
        .await
        .0
    }

    /// Applies a Project through the hub and waits until the hub has it Ready.
    async fn project(&self, name: &str) {
        let seq = self.hub.apply(&self.cluster, &project(name)).await.unwrap();
        let (ok, message) = self.result(seq).await;
        assert!(ok, "{message}");
        eventually(TIMEOUT, "the Project Ready at the hub", || async {
            support::hub::project_ready(&self.hub, &self.cluster, name).await
        })
        .await;
    }

    /// Runs `shapeblock-hub ARGS` against the running hub's API, as an operator would:
    /// (success, stdout, stderr). Awaited, not waited for: the hub answers on this runtime.
    async fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
            .args(support::hub::api_args(&self.hub, self.data.path()).await)
            .args(args)
            .output()
            .await
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    async fn stop(self) {
        self.agent.terminate(Duration::from_secs(15)).expect("stops");
        self.hub.stop().await;
    }
}

fn project(name: &str) -> String {
    support::hub::project(name)
}

fn app(namespace: &str, name: &str) -> String {
    serde_json::json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1",
        "kind": "App",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "registry": {"url": "registry.example.com"},
            "build": {"type": "dockerfile"},
            "git": {"url": "https://github.com/example/api.git"},
        },
    })
    .to_string()
}

fn object(kind: &str, namespace: &str, name: &str) -> ObjectRef {
    ObjectRef {
        kind: kind.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// Whether the App exists and is not being deleted.
async fn app_alive(client: &Client, namespace: &str, name: &str) -> bool {
    Api::<App>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .unwrap()
        .is_some_and(|a| a.metadata.deletion_timestamp.is_none())
}

async fn app_going(client: &Client, namespace: &str, name: &str) -> Option<()> {
    let app = Api::<App>::namespaced(client.clone(), namespace)
        .get_opt(name)
        .await
        .ok()?;
    app.is_none_or(|a| a.metadata.deletion_timestamp.is_some())
        .then_some(())
}

/// A Delete whose namespace held `/` and `?` used to become the path of another App (the
/// query string cut the rest off): now every name and namespace of a command is checked
/// before any request, the result names the field and why, and the session goes on.
#[tokio::test]
async fn names_kubernetes_refuses_change_nothing_and_the_stream_keeps_working() {
    let env = env().await;
    let c = env.connected().await;
    let p = unique_name("names");
    c.project(&p).await;
    for name in ["web", "x"] {
        let seq = c.hub.apply(&c.cluster, &app(&p, name)).await.unwrap();
        let (ok, message) = c.result(seq).await;
        assert!(ok, "{message}");
    }

    // The hub refuses to queue it.
    let hostile = object("App", &format!("{p}/apps/x?"), "web");
    let refused = c.hub.delete(&c.cluster, hostile.clone()).await.unwrap_err();
    assert!(
        refused.to_string().contains("is not a namespace name"),
        "{refused}"
    );
    // Sent anyway: the agent refuses it, and deletes neither App.
    let (ok, message) = c
        .raw(Down::Delete(Delete {
            object: Some(hostile),
        }))
        .await;
    assert!(!ok, "{message}");
    assert!(
        message.contains(&format!(
            "delete refused: namespace \"{p}/apps/x?\" is not a namespace name"
        )),
        "{message}"
    );
    // The same through every other command that carries names.
    let cases = [
        (
            "a path in a name",
            Down::Delete(Delete {
                object: Some(object("App", &p, "../x")),
            }),
            "name \"../x\"",
        ),
        (
            "a namespace for a cluster-scoped kind",
            Down::Delete(Delete {
                object: Some(object("Project", "kube-system", &p)),
            }),
            "cluster-scoped",
        ),
        (
            "a manifest's namespace",
            Down::Apply(Apply {
                manifest: app(&format!("{p}/apps/x?"), "web"),
            }),
            "metadata.namespace",
        ),
        (
            "a cancel's build",
            Down::CancelBuild(CancelBuild {
                namespace: p.clone(),
                build: "x?dryRun=All".into(),
            }),
            "build \"x?dryRun=All\"",
        ),
        (
            "a set-config's namespace",
            Down::SetConfig(SetConfig {
                namespace: format!("{p}/secrets/x"),
                app: "web".into(),
                set: [("A".to_string(), "1".to_string())].into(),
                unset: vec![],
            }),
            "namespace \"",
        ),
        (
            "a sync's manifest",
            Down::Sync(Sync {
                manifests: vec![app(&p, "web"), app(&p, "W%2F..")],
                ..Default::default()
            }),
            "metadata.name \"W%2F..\"",
        ),
        (
            "a prune scope's namespace",
            Down::Sync(Sync {
                prune: true,
                prune_scope: Some(PruneScope {
                    namespaces: vec!["a/b".into()],
                    ..Default::default()
                }),
                ..Default::default()
            }),
            "prune_scope.namespaces",
        ),
    ];
    for (what, command, said) in cases {
        let (ok, message) = c.raw(command).await;
        assert!(!ok && message.contains(said), "{what}: {message}");
        println!("{what}: {message}");
    }
    assert!(app_alive(&env.client, &p, "web").await && app_alive(&env.client, &p, "x").await);

    // The stream kept working: a valid delete deletes exactly its App.
    let seq = c.hub.delete(&c.cluster, object("App", &p, "x")).await.unwrap();
    let (ok, message) = c.result(seq).await;
    assert!(ok, "{message}");
    eventually(TIMEOUT, "App x deleted", || app_going(&env.client, &p, "x")).await;
    assert!(app_alive(&env.client, &p, "web").await);
    let _ = Api::<Project>::all(env.client.clone())
        .delete(&p, &Default::default())
        .await;
    c.stop().await;
}

/// Namespaced objects are written only in namespaces the agent made for a Project: not in
/// `kube-system`, not in the agent's own namespace (even labelled like a project's), not in a
/// namespace someone else made, not in one that does not exist. In a Sync, those manifests fail
/// and the rest are applied.
#[tokio::test]
async fn commands_reach_only_namespaces_the_agent_made_for_a_project() {
    let env = env().await;
    let c = env.connected().await;
    let p = unique_name("tenant");
    c.project(&p).await;
    let namespaces: Api<Namespace> = Api::all(env.client.clone());
    let plain = support::fresh_namespace(&env.client, "plain").await;
    // Someone else's namespace carrying a project's labels for another name.
    let fake = support::fresh_namespace(&env.client, "fake").await;
    let labels = |project: &str| {
        serde_json::json!({"metadata": {"labels": {
            "app.kubernetes.io/managed-by": "shapeblock-agent",
            "apps.shapeblock.io/project": project,
        }}})
    };
    namespaces
        .patch(&fake, &PatchParams::default(), &Patch::Merge(labels(&p)))
        .await
        .unwrap();
    // The agent's own namespace, labelled as if it were a project's: still never served.
    namespaces
        .patch(AGENT_NS, &PatchParams::default(), &Patch::Merge(labels(AGENT_NS)))
        .await
        .unwrap();
    let missing = unique_name("missing");

    for (namespace, said) in [
        (
            "kube-system",
            "namespace kube-system is not a ShapeBlock project namespace".to_string(),
        ),
        (
            AGENT_NS,
            format!("namespace {AGENT_NS} is the agent's own namespace"),
        ),
        (
            plain.as_str(),
            format!("namespace {plain} is not a ShapeBlock project namespace"),
        ),
        (
            fake.as_str(),
            format!("namespace {fake} is not a ShapeBlock project namespace"),
        ),
        (missing.as_str(), format!("namespace {missing} does not exist")),
    ] {
        let seq = c.hub.apply(&c.cluster, &app(namespace, "web")).await.unwrap();
        let (ok, message) = c.result(seq).await;
        assert!(!ok && message.contains(&said), "{namespace}: {message}");
        let seq = c
            .hub
            .set_config(
                &c.cluster,
                SetConfig {
                    namespace: namespace.into(),
                    app: "web".into(),
                    set: [("A".to_string(), "1".to_string())].into(),
                    unset: vec![],
                },
            )
            .await
            .unwrap();
        let (ok, message) = c.result(seq).await;
        assert!(
            !ok && message.contains(&said),
            "set-config in {namespace}: {message}"
        );
        let seq = c.hub.cancel(&c.cluster, namespace, "web-1").await.unwrap();
        let (ok, message) = c.result(seq).await;
        assert!(!ok && message.contains(&said), "cancel in {namespace}: {message}");
        let seq = c
            .hub
            .delete(&c.cluster, object("App", namespace, "web"))
            .await
            .unwrap();
        let (ok, message) = c.result(seq).await;
        assert!(!ok && message.contains(&said), "delete in {namespace}: {message}");
        if namespace != missing {
            assert!(
                Api::<App>::namespaced(env.client.clone(), namespace)
                    .get_opt("web")
                    .await
                    .unwrap()
                    .is_none(),
                "no App in {namespace}"
            );
        }
    }
    let _ = namespaces
        .patch(
            AGENT_NS,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {
                "app.kubernetes.io/managed-by": null,
                "apps.shapeblock.io/project": null,
            }}})),
        )
        .await;

    // A Sync: the manifest for kube-system fails with the reason, the Project's is applied.
    let seq = c
        .hub
        .sync(&c.cluster, &[app("kube-system", "web"), app(&p, "web")], None)
        .await
        .unwrap();
    let (ok, message) = c.result(seq).await;
    assert!(!ok, "{message}");
    assert!(
        message.contains("applied 1 of 2")
            && message
                .contains("App/kube-system/web: namespace kube-system is not a ShapeBlock project namespace"),
        "{message}"
    );
    assert!(app_alive(&env.client, &p, "web").await);
    for namespace in [plain, fake] {
        let _ = namespaces.delete(&namespace, &Default::default()).await;
    }
    let _ = Api::<Project>::all(env.client.clone())
        .delete(&p, &Default::default())
        .await;
    c.stop().await;
}

/// A server that sends a Project and its App back to back (no wait for the Project to be
/// Ready) gets both applied: the App's command waits for the Project's namespace instead of
/// being refused for arriving early. Without a Project there is nothing to wait for (above).
#[tokio::test]
async fn an_app_sent_right_after_its_project_waits_for_the_namespace() {
    let env = env().await;
    let c = env.connected().await;
    let p = unique_name("eager");
    let project_seq = c.hub.apply(&c.cluster, &project(&p)).await.unwrap();
    let app_seq = c.hub.apply(&c.cluster, &app(&p, "web")).await.unwrap();
    let (ok, message) = c.result(project_seq).await;
    assert!(ok, "{message}");
    let (ok, message) = c.result(app_seq).await;
    assert!(ok, "the App was refused: {message}");
    let apps: Api<App> = Api::namespaced(env.client.clone(), &p);
    assert!(apps.get_opt("web").await.unwrap().is_some());
    let _ = Api::<Project>::all(env.client.clone())
        .delete(&p, &Default::default())
        .await;
    c.stop().await;
}

/// Prune removes only managed objects in its scope, not more than the stated share without
/// force, never from an empty desired state or without a scope, and says what it removed or
/// how many it would have.
#[tokio::test]
async fn prune_is_scoped_bounded_and_reports_what_it_removed() {
    let env = env().await;
    let c = env.connected().await;
    let [a, b] = ["prune-a", "prune-b"].map(unique_name);
    for p in [&a, &b] {
        c.project(p).await;
    }
    let a_apps = ["a1", "a2", "a3"];
    for name in a_apps {
        let seq = c.hub.apply(&c.cluster, &app(&a, name)).await.unwrap();
        assert!(c.result(seq).await.0);
    }
    let seq = c.hub.apply(&c.cluster, &app(&b, "b1")).await.unwrap();
    assert!(c.result(seq).await.0);
    let projects: Api<Project> = Api::all(env.client.clone());
    let all_there = || async {
        for name in a_apps {
            assert!(app_alive(&env.client, &a, name).await, "{name} was removed");
        }
        assert!(app_alive(&env.client, &b, "b1").await, "b1 was removed");
        for p in [&a, &b] {
            let project = projects.get(p).await.unwrap();
            assert!(project.metadata.deletion_timestamp.is_none(), "{p} was removed");
        }
    };

    // An old hub's prune (no scope): applied, never pruned.
    let (ok, message) = c
        .raw(Down::Sync(Sync {
            manifests: vec![project(&a)],
            prune: true,
            ..Default::default()
        }))
        .await;
    assert!(!ok && message.contains("names no prune scope"), "{message}");
    // The hub does not queue one.
    assert!(c.hub.sync(&c.cluster, &[], Some(Prune::default())).await.is_err());
    // An empty desired state (an empty file, a bug in the server): nothing is pruned, even
    // with a share of 100%.
    let empty = Prune {
        max_percent: 100,
        ..Prune::projects([&a, &b])
    };
    let seq = c.hub.sync(&c.cluster, &[], Some(empty)).await.unwrap();
    let (ok, message) = c.result(seq).await;
    assert!(!ok, "{message}");
    assert!(
        message.contains("keeps none of the 6 managed objects in scope") && message.contains("all 6"),
        "{message}"
    );
    all_there().await;

    // Scoped to Project A: a3 goes; B's App, listed nowhere, stays.
    let seq = c
        .hub
        .sync(
            &c.cluster,
            &[project(&a), app(&a, "a1"), app(&a, "a2")],
            Some(Prune::projects([&a])),
        )
        .await
        .unwrap();
    let (ok, message) = c.result(seq).await;
    assert!(ok, "{message}");
    assert_eq!(message, format!("synced 3 resources, pruned 1: App/{a}/a3"));
    eventually(TIMEOUT, "a3 deleted", || app_going(&env.client, &a, "a3")).await;
    assert!(app_alive(&env.client, &b, "b1").await);

    // Two of the three left in scope: more than half, refused with the count.
    let seq = c
        .hub
        .sync(&c.cluster, &[project(&a)], Some(Prune::projects([&a])))
        .await
        .unwrap();
    let (ok, message) = c.result(seq).await;
    assert!(!ok, "{message}");
    assert!(
        message.contains("would remove 2 of the 3 managed objects in scope (66%), more than the 50% allowed"),
        "{message}"
    );
    assert!(app_alive(&env.client, &a, "a1").await && app_alive(&env.client, &a, "a2").await);

    // With force (through the CLI, as an operator would): done, and the result lists them.
    let state = c.data.path().join("state.yaml");
    std::fs::write(&state, project(&a)).unwrap();
    let state = state.to_str().unwrap();
    let (ok, _, stderr) = c
        .cli(&["sync", "--cluster", &c.cluster, "-f", state, "--prune"])
        .await;
    assert!(!ok && stderr.contains("a prune needs a scope"), "{stderr}");
    let (ok, _, stderr) = c
        .cli(&["sync", "--cluster", &c.cluster, "-f", state, "--force"])
        .await;
    assert!(!ok && stderr.contains("--prune"), "--force alone: {stderr}");
    let (ok, stdout, stderr) = c
        .cli(&[
            "sync",
            "--cluster",
            &c.cluster,
            "-f",
            state,
            "--prune",
            "--prune-project",
            &a,
            "--force",
        ])
        .await;
    assert!(ok, "{stderr}");
    let seq: u64 = stdout
        .strip_prefix("queued command ")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    let (ok, message) = c.result(seq).await;
    assert!(ok, "{message}");
    assert_eq!(
        message,
        format!("synced 1 resources, pruned 2: App/{a}/a1, App/{a}/a2")
    );
    for name in ["a1", "a2"] {
        eventually(TIMEOUT, "a1 and a2 deleted", || app_going(&env.client, &a, name)).await;
    }
    assert!(app_alive(&env.client, &b, "b1").await);
    assert!(
        projects
            .get(&a)
            .await
            .unwrap()
            .metadata
            .deletion_timestamp
            .is_none()
    );

    // By kind and namespace: Apps in B only.
    let by_kind = Prune {
        scope: PruneScope {
            kinds: vec!["App".into()],
            namespaces: vec![b.clone()],
            ..Default::default()
        },
        force: true,
        ..Default::default()
    };
    let seq = c.hub.sync(&c.cluster, &[], Some(by_kind)).await.unwrap();
    let (ok, message) = c.result(seq).await;
    assert!(ok, "{message}");
    assert_eq!(message, format!("synced 0 resources, pruned 1: App/{b}/b1"));
    for p in [&a, &b] {
        assert!(
            projects
                .get(p)
                .await
                .unwrap()
                .metadata
                .deletion_timestamp
                .is_none()
        );
        let _ = projects.delete(p, &Default::default()).await;
    }
    c.stop().await;
}
