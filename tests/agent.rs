//! The agent against the real control plane, running as its own process under its own
//! ServiceAccount token with exactly the RBAC rules of `crates/agent/src/rbac.rs`.
//!
//! Tests here run one at a time (one agent per cluster, as in production).

mod support;

use std::time::Duration;

use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
use k8s_openapi::api::core::v1::{LimitRange, Namespace, ResourceQuota, Secret};
use k8s_openapi::api::rbac::v1::RoleBinding;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{App, AppPhase, Project, ProjectPhase, Team, TeamPhase};

use support::{events_for, eventually, unique_name, wait_event};

use support::agent::*;

fn condition<'a>(
    conditions: &'a [k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {conditions:?}"))
}

#[tokio::test]
async fn a_project_gets_its_namespace_pull_secret_quota_and_defaults() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let name = unique_name("shop");
    let spec = json!({
        "displayName": "Shop", "description": "the shop",
        "namespaceLabels": {"tier": "web"},
        "resourceQuota": {"pods": "20", "requests.cpu": "2"},
        "containerDefaults": {"requests": {"cpu": "100m"}, "limits": {"memory": "256Mi"}}
    });
    create(
        Api::<Project>::all(env.client.clone()),
        project_manifest(&name, spec),
    )
    .await;
    let project = wait_project(&env.client, &name, ProjectPhase::Ready).await;
    let status = project.status.unwrap();
    assert_eq!(status.namespace.as_deref(), Some(name.as_str()));
    assert_eq!(status.observed_generation, project.metadata.generation);
    for type_ in ["Ready", "NamespaceReady", "PullSecretSynced"] {
        assert_eq!(condition(&status.conditions, type_).status, "True", "{type_}");
    }

    let namespace = Api::<Namespace>::all(env.client.clone())
        .get(&name)
        .await
        .unwrap();
    let labels = namespace.labels();
    assert_eq!(labels["apps.shapeblock.io/project"], name);
    assert_eq!(labels["app.kubernetes.io/managed-by"], "shapeblock-agent");
    assert_eq!(labels["tier"], "web");
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "baseline");
    assert_eq!(namespace.annotations()["apps.shapeblock.io/display-name"], "Shop");
    assert_eq!(namespace.owner_references()[0].name, name);

    let source = Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
        .get(PULL_SECRET)
        .await
        .unwrap();
    let copy = Api::<Secret>::namespaced(env.client.clone(), &name)
        .get(PULL_SECRET)
        .await
        .unwrap();
    assert_eq!(copy.data, source.data);
    assert_eq!(copy.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));

    let quota = Api::<ResourceQuota>::namespaced(env.client.clone(), &name)
        .get("shapeblock-quota")
        .await
        .unwrap();
    assert_eq!(quota.spec.unwrap().hard.unwrap()["pods"].0, "20");
    let range = Api::<LimitRange>::namespaced(env.client.clone(), &name)
        .get("shapeblock-defaults")
        .await
        .unwrap();
    assert_eq!(
        range.spec.unwrap().limits[0].default.as_ref().unwrap()["memory"].0,
        "256Mi"
    );

    // Dropping the quota from the spec removes it.
    Api::<Project>::all(env.client.clone())
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resourceQuota": null}})),
        )
        .await
        .unwrap();
    let quotas = Api::<ResourceQuota>::namespaced(env.client.clone(), &name);
    eventually(TIMEOUT, "the quota to be removed", || async {
        quotas
            .get_opt("shapeblock-quota")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    wait_event(&env.client, "default", &name, |e| {
        e.reason.as_deref() == Some("Ready")
    })
    .await;
}

#[tokio::test]
async fn an_edited_source_pull_secret_reaches_every_project_within_seconds() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let first = ready_project(&env.client, "sync-a").await;
    let second = ready_project(&env.client, "sync-b").await;
    set_pull_secret(&env.client, "rotated").await;
    let expected = Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
        .get(PULL_SECRET)
        .await
        .unwrap()
        .data;
    for project in [first, second] {
        let copies = Api::<Secret>::namespaced(env.client.clone(), &project);
        let (_, took) = eventually(
            Duration::from_secs(10),
            "the copy to follow the source",
            || async { (copies.get(PULL_SECRET).await.unwrap().data == expected).then_some(()) },
        )
        .await;
        println!("{project}: copy followed the source in {took:?}");
    }
}

#[tokio::test]
async fn deleting_a_project_deletes_its_namespace_and_then_the_project() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let name = ready_project(&env.client, "doomed").await;
    let config_map: k8s_openapi::api::core::v1::ConfigMap =
        serde_json::from_value(json!({"metadata": {"name": "content"}})).unwrap();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(env.client.clone(), &name)
        .create(&PostParams::default(), &config_map)
        .await
        .unwrap();
    Api::<Project>::all(env.client.clone())
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    let (_, took) = eventually(
        Duration::from_secs(60),
        "the Project and its namespace to be gone",
        || async {
            let project = Api::<Project>::all(env.client.clone())
                .get_opt(&name)
                .await
                .unwrap();
            let namespace = Api::<Namespace>::all(env.client.clone())
                .get_opt(&name)
                .await
                .unwrap();
            (project.is_none() && namespace.is_none()).then_some(())
        },
    )
    .await;
    println!("project and namespace deleted in {took:?}");
}

#[tokio::test]
async fn a_foreign_namespace_is_refused_and_never_deleted() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let name = unique_name("foreign");
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(env.client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();
    create(
        Api::<Project>::all(env.client.clone()),
        project_manifest(&name, json!({})),
    )
    .await;
    let project = wait_project(&env.client, &name, ProjectPhase::Failed).await;
    let ready = condition(&project.status.as_ref().unwrap().conditions, "Ready").clone();
    assert_eq!(ready.reason, "NamespaceConflict");
    assert!(
        ready
            .message
            .contains("already exists and was not created for this Project"),
        "{}",
        ready.message
    );
    wait_event(&env.client, "default", &name, |e| {
        e.reason.as_deref() == Some("NamespaceConflict") && e.type_.as_deref() == Some("Warning")
    })
    .await;
    let labels = Api::<Namespace>::all(env.client.clone())
        .get(&name)
        .await
        .unwrap()
        .labels()
        .clone();
    assert!(!labels.contains_key("apps.shapeblock.io/project"), "not adopted");

    Api::<Project>::all(env.client.clone())
        .delete(&name, &DeleteParams::default())
        .await
        .unwrap();
    eventually(TIMEOUT, "the Project to be gone", || async {
        project_phase(&env.client, &name).await.is_none().then_some(())
    })
    .await;
    let namespace = Api::<Namespace>::all(env.client.clone())
        .get(&name)
        .await
        .unwrap();
    assert!(
        namespace.metadata.deletion_timestamp.is_none(),
        "somebody else's namespace is left alone"
    );
}

#[tokio::test]
async fn an_invalid_app_gets_a_condition_and_an_event_and_no_hot_loop() {
    let env = env().await;
    let agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "invalid").await;
    let before = agent.metric("shapeblock_reconciles_total{kind=\"App\"}").await;
    // Valid for the apiserver's schema; refused by the agent: it points at cloud metadata.
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        app_manifest("meta", json!({"url": "https://169.254.169.254/latest/meta-data"})),
    )
    .await;
    let app = wait_app(&env.client, &project, "meta", AppPhase::Failed).await;
    let ready = condition(&app.status.as_ref().unwrap().conditions, "Ready").clone();
    assert_eq!(ready.reason, "InvalidSpec");
    assert!(ready.message.contains("link-local"), "{}", ready.message);
    wait_event(&env.client, &project, "meta", |e| {
        e.reason.as_deref() == Some("InvalidSpec")
    })
    .await;

    tokio::time::sleep(Duration::from_secs(30)).await;
    let key = format!("object={project}/meta");
    let reconciles = agent
        .log_tail(100_000)
        .lines()
        .filter(|l| l.contains("reconciling") && l.contains(&key))
        .count();
    let counted = agent.metric("shapeblock_reconciles_total{kind=\"App\"}").await - before;
    println!(
        "invalid App reconciled {reconciles} times in 30 s (App reconciles counted by /metrics: {counted})"
    );
    assert!(
        (1..=3).contains(&reconciles),
        "{reconciles} reconciles of an invalid App in 30 s"
    );
    let events = events_for(&env.client, &project, "meta").await;
    assert_eq!(
        events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("InvalidSpec"))
            .count(),
        1
    );
}

#[tokio::test]
async fn a_private_ssh_app_gets_a_deploy_key_that_survives_restarts() {
    let env = env().await;
    let agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "keys").await;
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        app_manifest(
            "api",
            json!({"url": "git@github.com:example/api.git", "isPrivate": true}),
        ),
    )
    .await;
    // No host keys known yet: the key is generated (so it can be added to the repository),
    // but the App says clones cannot check the server, and how to fix it.
    let configmaps = Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(env.client.clone(), AGENT_NS);
    let _ = configmaps
        .delete("shapeblock-known-hosts", &Default::default())
        .await;
    let blocked = wait_app(&env.client, &project, "api", AppPhase::Failed).await;
    let blocked = blocked.status.unwrap();
    assert!(blocked.ssh_public_key.is_some());
    assert!(
        blocked
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("shapeblock/shapeblock-known-hosts"),
        "{:?}",
        blocked.message
    );
    let known_hosts =
        "github.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRlc3Qta2V5LW5vdC1naXRodWJzLXJlYWwta2V5\n";
    configmaps
        .create(
            &Default::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "shapeblock-known-hosts"}, "data": {"known_hosts": known_hosts}}),
            )
            .unwrap(),
        )
        .await
        .unwrap();
    Api::<App>::namespaced(env.client.clone(), &project)
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"description": "now with host keys"}})),
        )
        .await
        .unwrap();
    let app = wait_app(&env.client, &project, "api", AppPhase::Ready).await;
    let status = app.status.unwrap();
    let public = status.ssh_public_key.clone().expect("public key in status");
    assert_eq!(public, blocked.ssh_public_key.unwrap(), "the same key");
    assert!(public.starts_with("ssh-ed25519 "), "{public}");
    assert_eq!(status.git_secret_name.as_deref(), Some("api-deploy-key"));
    let secret = Api::<Secret>::namespaced(env.client.clone(), &project)
        .get("api-deploy-key")
        .await
        .unwrap();
    let private = String::from_utf8(secret.data.as_ref().unwrap()["ssh-privatekey"].0.clone()).unwrap();
    assert_eq!(
        secret.data.as_ref().unwrap()["known_hosts"].0,
        known_hosts.as_bytes()
    );
    assert!(private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
    assert_eq!(secret.owner_references()[0].kind, "App");
    let everything = serde_json::to_string(
        &Api::<App>::namespaced(env.client.clone(), &project)
            .get("api")
            .await
            .unwrap(),
    )
    .unwrap();
    assert!(
        !everything.contains("PRIVATE KEY"),
        "the private key never appears in the App"
    );
    assert!(
        !agent.log_tail(100_000).contains("PRIVATE KEY"),
        "nor in the agent's log"
    );

    // A restarted agent keeps the key.
    assert!(
        agent
            .terminate(Duration::from_secs(15))
            .is_some_and(|s| s.success())
    );
    let agent = env.agent(&[]).await;
    Api::<App>::namespaced(env.client.clone(), &project)
        .patch(
            "api",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"displayName": "API"}})),
        )
        .await
        .unwrap();
    let apps = Api::<App>::namespaced(env.client.clone(), &project);
    eventually(TIMEOUT, "the App to be reconciled after the restart", || async {
        let app = apps.get("api").await.unwrap();
        (app.status.as_ref()?.observed_generation == app.metadata.generation).then_some(())
    })
    .await;
    assert_eq!(
        apps.get("api")
            .await
            .unwrap()
            .status
            .unwrap()
            .ssh_public_key
            .as_deref(),
        Some(public.as_str())
    );

    // Regeneration only on request.
    apps.patch(
        "api",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"apps.shapeblock.io/regenerate-deploy-key": "1"}}}),
        ),
    )
    .await
    .unwrap();
    let (new_key, _) = eventually(TIMEOUT, "a new deploy key", || async {
        let key = apps.get("api").await.unwrap().status?.ssh_public_key?;
        (key != public).then_some(key)
    })
    .await;
    assert!(new_key.starts_with("ssh-ed25519 "));
    drop(agent);
}

async fn can(client: &Client, user: &str, verb: &str, resource: &str, group: &str, namespace: &str) -> bool {
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.into()),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(namespace.into()),
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<SubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .unwrap()
        .status
        .unwrap()
        .allowed
}

#[tokio::test]
async fn team_members_get_exactly_their_role_in_their_projects() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let dev_project = ready_project(&env.client, "team-dev").await;
    let view_project = ready_project(&env.client, "team-view").await;
    let other_project = ready_project(&env.client, "team-other").await;
    let team = unique_name("backend");
    let spec = json!({
        "members": [{"kind": "User", "name": "alice"}, {"kind": "User", "name": "bob"}],
        "projects": [{"project": dev_project, "role": "developer"}, {"project": view_project, "role": "viewer"},
                     {"project": "kube-system", "role": "admin"}]
    });
    create(Api::<Team>::all(env.client.clone()), json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Team", "metadata": {"name": team}, "spec": spec})).await;
    let teams = Api::<Team>::all(env.client.clone());
    let (status, _) = eventually(TIMEOUT, "the Team to be reconciled", || async {
        let status = teams.get(&team).await.unwrap().status?;
        (status.project_count == Some(2)).then_some(status)
    })
    .await;
    assert_eq!(
        status.phase,
        Some(TeamPhase::Failed),
        "kube-system is not a project"
    );
    assert!(status.message.as_deref().unwrap().contains("kube-system"));
    assert!(
        Api::<RoleBinding>::namespaced(env.client.clone(), "kube-system")
            .list(&ListParams::default().labels("apps.shapeblock.io/team"))
            .await
            .unwrap()
            .items
            .is_empty(),
        "never a binding outside the agent's namespaces"
    );

    let group = "apps.shapeblock.io";
    assert!(can(&env.client, "alice", "create", "appbuilds", group, &dev_project).await);
    assert!(
        !can(&env.client, "alice", "create", "appbuilds", group, &view_project).await,
        "viewer cannot build"
    );
    assert!(can(&env.client, "alice", "list", "appbuilds", group, &view_project).await);
    assert!(
        !can(&env.client, "alice", "create", "appbuilds", group, &other_project).await,
        "no role elsewhere"
    );
    assert!(
        !can(&env.client, "alice", "get", "secrets", "", &dev_project).await,
        "developers cannot read Secrets"
    );
    assert!(
        !can(&env.client, "alice", "get", "secrets", "", &view_project).await,
        "viewers cannot read Secrets"
    );
    assert!(
        !can(
            &env.client,
            "alice",
            "create",
            "rolebindings",
            "rbac.authorization.k8s.io",
            &dev_project
        )
        .await
    );
    assert!(
        can(&env.client, "alice", "get", "pods", "", &view_project).await,
        "viewers read workloads"
    );
    // The threat of HelmCharts (their `helm-<name>` ServiceAccount is bound cluster-wide to
    // the job role): they live in the agent's namespace, where no tenant can run a pod, read
    // a token or make a Job; a pod can only name a ServiceAccount of its own namespace.
    for (verb, resource, group) in [
        ("create", "pods", ""),
        ("create", "jobs", "batch"),
        ("get", "secrets", ""),
        ("create", "helmcharts", "helm.cattle.io"),
        ("create", "serviceaccounts", ""),
    ] {
        assert!(
            !can(&env.client, "alice", verb, resource, group, AGENT_NS).await,
            "a tenant cannot {verb} {resource} in the agent's namespace"
        );
    }

    // Removing a member and a project removes exactly what the agent made.
    let spec = json!({"spec": {"members": [{"kind": "User", "name": "alice"}], "projects": [{"project": dev_project, "role": "developer"}]}});
    teams
        .patch(&team, &PatchParams::default(), &Patch::Merge(spec))
        .await
        .unwrap();
    let bindings = Api::<RoleBinding>::all(env.client.clone());
    let selector = format!("apps.shapeblock.io/team={team}");
    eventually(
        TIMEOUT,
        "the viewer binding to go and bob to be unbound",
        || async {
            let items = bindings
                .list(&ListParams::default().labels(&selector))
                .await
                .unwrap()
                .items;
            let subjects: Vec<String> = items
                .iter()
                .flat_map(|b| b.subjects.iter().flatten().map(|s| s.name.clone()))
                .collect();
            (items.len() == 1
                && items[0].namespace().as_deref() == Some(dev_project.as_str())
                && subjects == ["alice"])
            .then_some(())
        },
    )
    .await;
    assert!(!can(&env.client, "bob", "create", "appbuilds", group, &dev_project).await);
    assert!(!can(&env.client, "alice", "list", "appbuilds", group, &view_project).await);

    teams.delete(&team, &DeleteParams::default()).await.unwrap();
    eventually(TIMEOUT, "the Team and its bindings to be gone", || async {
        let left = bindings
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items
            .len();
        (left == 0 && teams.get_opt(&team).await.unwrap().is_none()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn an_undecodable_object_does_not_stall_the_others() {
    let env = env().await;
    let _agent = env.agent(&[]).await;
    let project = ready_project(&env.client, "decode").await;
    // A newer CRD adds a build type this agent does not know.
    let crds = Api::<CustomResourceDefinition>::all(env.client.clone());
    let original = crds.get("apps.apps.shapeblock.io").await.unwrap();
    let mut newer = serde_json::to_value(&original).unwrap();
    newer["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["build"]["properties"]["type"]["enum"]
        .as_array_mut()
        .unwrap()
        .push(json!("nixpacks"));
    newer["metadata"]["managedFields"] = serde_json::Value::Null;
    crds.replace(
        "apps.apps.shapeblock.io",
        &PostParams::default(),
        &serde_json::from_value(newer).unwrap(),
    )
    .await
    .unwrap();

    let future_app = json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "future"},
        "spec": {"git": {"url": "https://github.com/example/app.git"}, "registry": {"url": "registry.example.com"}, "build": {"type": "nixpacks"}}});
    let dynamic = Api::<kube::api::DynamicObject>::namespaced_with(
        env.client.clone(),
        &project,
        &kube::discovery::ApiResource::erase::<App>(&()),
    );
    let created = eventually(TIMEOUT, "the newer CRD to accept nixpacks", || async {
        dynamic
            .create(
                &PostParams::default(),
                &serde_json::from_value(future_app.clone()).unwrap(),
            )
            .await
            .ok()
    })
    .await;
    drop(created);
    create(
        Api::<App>::namespaced(env.client.clone(), &project),
        app_manifest("today", json!({"url": "https://github.com/example/app.git"})),
    )
    .await;
    wait_app(&env.client, &project, "today", AppPhase::Ready).await;

    let (status, _) = eventually(TIMEOUT, "the undecodable App to be reported", || async {
        let object = dynamic.get("future").await.unwrap();
        let status = object.data.get("status")?.clone();
        (status["phase"] == "Failed").then_some(status)
    })
    .await;
    assert_eq!(status["conditions"][0]["reason"], "InvalidObject");
    assert!(
        status["message"].as_str().unwrap().contains("nixpacks"),
        "{status}"
    );
    wait_event(&env.client, &project, "future", |e| {
        e.reason.as_deref() == Some("InvalidObject")
    })
    .await;

    dynamic.delete("future", &DeleteParams::default()).await.unwrap();
    let mut restored = original.clone();
    restored.metadata.managed_fields = None;
    restored.metadata.resource_version = crds
        .get("apps.apps.shapeblock.io")
        .await
        .unwrap()
        .metadata
        .resource_version;
    crds.replace("apps.apps.shapeblock.io", &PostParams::default(), &restored)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_killed_agent_converges_when_it_comes_back() {
    const PROJECTS: usize = 10;
    let env = env().await;
    let projects = Api::<Project>::all(env.client.clone());
    // The agent copies this pull secret into every project before the project is Ready; it
    // does not exist yet, so no Project can be Ready when the agent is killed: the kill falls
    // in the middle of the work, whatever the machine's speed.
    let secret = unique_name("restart-credentials");
    let flag = format!("--registry-secret={secret}");
    let agent = env.agent(&[&flag]).await;
    let names: Vec<String> = (0..PROJECTS)
        .map(|i| unique_name(&format!("restart{i}")))
        .collect();
    for name in &names {
        create(
            projects.clone(),
            project_manifest(name, json!({"resourceQuota": {"pods": "5"}})),
        )
        .await;
    }
    // The agent has begun on every Project (its namespace and quota are there)...
    eventually(
        Duration::from_secs(60),
        "the agent to begin on every Project",
        || async {
            for name in &names {
                Api::<ResourceQuota>::namespaced(env.client.clone(), name)
                    .get_opt("shapeblock-quota")
                    .await
                    .ok()??;
            }
            Some(())
        },
    )
    .await;
    agent.kill();
    // ...and, at the kill (nothing changes them while no agent runs), finished none.
    let mut at_kill = Vec::new();
    for name in &names {
        let project = projects.get(name).await.unwrap();
        let ready = project
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"))
            .map(|c| (c.status.clone(), c.reason.clone()));
        at_kill.push((project.status.and_then(|s| s.phase), ready));
    }
    println!("at the kill: {at_kill:?}");
    let unfinished = at_kill
        .iter()
        .filter(|(phase, _)| *phase != Some(ProjectPhase::Ready))
        .count();
    assert_eq!(
        unfinished, PROJECTS,
        "no Project was Ready at the kill: {at_kill:?}"
    );

    // What was missing is there now; only a new agent can finish the work.
    let source: Secret = serde_json::from_value(json!({
        "metadata": {"name": secret},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": "eyJhdXRocyI6e319"},
    }))
    .unwrap();
    let secrets = Api::<Secret>::namespaced(env.client.clone(), AGENT_NS);
    secrets.create(&PostParams::default(), &source).await.unwrap();
    let started = std::time::Instant::now();
    let _agent = env.agent(&[&flag]).await;
    for name in &names {
        wait_project(&env.client, name, ProjectPhase::Ready).await;
        assert!(
            Api::<Secret>::namespaced(env.client.clone(), name)
                .get_opt(&secret)
                .await
                .unwrap()
                .is_some(),
            "{name} has its pull secret copy"
        );
    }
    println!(
        "the restarted agent made the {unfinished} unfinished Projects Ready in {:?}",
        started.elapsed()
    );
    let _ = secrets.delete(&secret, &DeleteParams::default()).await;
}

#[tokio::test]
async fn health_metrics_and_a_graceful_shutdown() {
    let env = env().await;
    let agent = env.agent(&[]).await;
    assert_eq!(agent.get("/healthz").await.map(|(code, _)| code), Some(200));
    assert_eq!(agent.get("/readyz").await.map(|(code, _)| code), Some(200));
    ready_project(&env.client, "metrics").await;
    let (_, metrics) = agent.get("/metrics").await.unwrap();
    for series in [
        "shapeblock_reconciles_total{kind=\"Project\"}",
        "shapeblock_reconcile_duration_seconds_count{kind=\"Project\"}",
    ] {
        assert!(metrics.contains(series), "{series} missing from:\n{metrics}");
    }
    let started = std::time::Instant::now();
    let status = agent
        .terminate(Duration::from_secs(15))
        .expect("the agent exits on SIGTERM");
    assert!(status.success(), "clean exit: {status}");
    println!("SIGTERM to exit: {:?}", started.elapsed());
}

/// The port of the apiserver in `kubeconfig`.
fn apiserver_port(kubeconfig: &std::path::Path) -> u16 {
    let config = kube::config::Kubeconfig::read_from(kubeconfig).unwrap();
    let server = config.clusters[0]
        .cluster
        .as_ref()
        .unwrap()
        .server
        .clone()
        .unwrap();
    server.parse::<http::Uri>().unwrap().port_u16().unwrap()
}

/// Every watch and request of the agent goes over one HTTP/2 connection to the apiserver,
/// where kube's own client keeps a connection per watch and per request in flight (each with
/// its TLS state and buffers: that was 13 MiB of the projects bench's heap). The same count
/// with `--apiserver-http2=false` shows what it measures.
#[tokio::test]
async fn the_agent_shares_one_connection_to_the_apiserver_for_all_its_watches_and_requests() {
    let env = env().await;
    let port = apiserver_port(&env.kubeconfig);
    let mut counts = Vec::new();
    for flags in [&[][..], &["--apiserver-http2=false"][..]] {
        let agent = env.agent(flags).await;
        let names: Vec<String> = (0..5).map(|i| unique_name(&format!("conn{i}"))).collect();
        for name in &names {
            create(
                Api::<Project>::all(env.client.clone()),
                project_manifest(name, json!({})),
            )
            .await;
        }
        for name in &names {
            wait_project(&env.client, name, ProjectPhase::Ready).await;
        }
        let count = agent.tcp_connections_to(port);
        println!("flags {flags:?}: {count} connections to the apiserver");
        counts.push(count);
        agent.terminate(Duration::from_secs(10));
        for name in &names {
            Api::<Project>::all(env.client.clone())
                .delete(name, &DeleteParams::default())
                .await
                .unwrap();
        }
    }
    assert_eq!(counts[0], 1, "over HTTP/2: {counts:?}");
    // Each of the agent's watches alone holds an HTTP/1.1 connection.
    assert!(counts[1] >= 20, "over HTTP/1.1: {counts:?}");
}
