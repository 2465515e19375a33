//! The CRDs, generated from the Rust types, against the real kube-apiserver: samples are
//! accepted, invalid manifests are rejected with the apiserver's own message, the status
//! subresource and printer columns work, and the committed YAML matches the types.

mod support;

use std::path::{Path, PathBuf};

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use shapeblock_agent::api::{
    self, App, AppBuild, AppBuildPhase, AppPhase, BackingService, BuildType, Project, Team,
};
use support::{client, fresh_namespace, place, unique_name, yaml_documents};

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn yaml_files(dir: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo_path(dir))
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn committed_crds_match_the_types() {
    let regenerate = "regenerate with `cargo run --bin shapeblock-agent -- crd --out crds`";
    let mut expected_files = Vec::new();
    for crd in api::crds() {
        let file = api::crd_file_name(&crd);
        let committed = std::fs::read_to_string(repo_path("crds").join(&file))
            .unwrap_or_else(|e| panic!("crds/{file} missing ({e}); {regenerate}"));
        assert!(
            committed == api::crd_yaml(&crd).unwrap(),
            "crds/{file} differs from the Rust types; {regenerate}"
        );
        expected_files.push(repo_path("crds").join(file));
    }
    expected_files.sort();
    assert_eq!(
        yaml_files("crds"),
        expected_files,
        "crds/ holds files the types do not generate"
    );
}

#[tokio::test]
async fn seed_samples_are_accepted_and_read_back_as_the_rust_types() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "samples").await;
    let suffix = shapeblock_testenv::unique_suffix();
    let mut created = 0;
    for file in yaml_files("examples") {
        for manifest in yaml_documents(&file) {
            let (api, object) = place(&client, &manifest, &namespace, &suffix).await;
            api.create(&PostParams::default(), &object)
                .await
                .unwrap_or_else(|e| panic!("{} {} rejected: {e}", file.display(), object.name_any()));
            created += 1;
        }
    }
    assert_eq!(created, 10, "every sample document was created");

    // What the apiserver stored parses as the Rust types, with the schema's defaults applied.
    let apps = Api::<App>::namespaced(client.clone(), &namespace)
        .list(&Default::default())
        .await
        .unwrap();
    assert_eq!(apps.items.len(), 4);
    let sample = apps.items.iter().find(|a| a.name_any() == "sample-app").unwrap();
    assert_eq!(
        sample.spec.build.build_type,
        BuildType::Dockerfile,
        "build defaults to dockerfile"
    );
    let prebuilt = apps
        .items
        .iter()
        .find(|a| a.name_any() == "prebuilt-app")
        .unwrap();
    assert_eq!(prebuilt.spec.build.build_type, BuildType::Image);
    assert!(prebuilt.spec.git.is_none());
    let build = Api::<AppBuild>::namespaced(client.clone(), &namespace)
        .get("sample-app-build-1")
        .await
        .unwrap();
    assert_eq!(build.spec.build_vars.len(), 2);
    let values = build.spec.helm_values.as_ref().expect("helmValues kept");
    assert_eq!(
        values["ingress"]["hosts"][0], "myapp.example.com",
        "free-form helmValues are preserved"
    );
    assert_eq!(values["replicaCount"], 2);
    let service = Api::<BackingService>::namespaced(client.clone(), &namespace)
        .get("main-db")
        .await
        .unwrap();
    assert_eq!(service.spec.service_type, "postgresql");
    let project = Api::<Project>::all(client.clone())
        .get(&format!("my-project-{suffix}"))
        .await
        .unwrap();
    assert_eq!(project.spec.resource_quota.len(), 3);
    let team = Api::<Team>::all(client.clone())
        .get(&format!("backend-{suffix}"))
        .await
        .unwrap();
    assert_eq!(team.spec.members.len(), 2);
}

#[tokio::test]
async fn invalid_manifests_are_rejected_with_the_apiserver_message() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "invalid").await;
    let suffix = shapeblock_testenv::unique_suffix();
    let files = yaml_files("tests/manifests/invalid");
    assert!(files.len() >= 20, "the invalid set is all there");
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let expect = text
            .lines()
            .find_map(|line| line.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} has no `# expect:` line", file.display()));
        let manifest = yaml_documents(file).remove(0);
        let (api, object) = place(&client, &manifest, &namespace, &suffix).await;
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => failures.push(format!(
                "{name}: accepted, expected rejection containing {expect:?}"
            )),
            Err(kube::Error::Api(status)) if status.code == 422 && status.message.contains(expect) => {
                println!("{name}: rejected: {}", status.message);
            }
            Err(e) => failures.push(format!("{name}: expected 422 containing {expect:?}, got {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn app_manifest(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App",
        "metadata": {"name": name},
        "spec": {"git": {"url": "https://github.com/example/app.git"}, "registry": {"url": "registry.example.com"}}
    })
}

async fn create(
    client: &Client,
    manifest: serde_json::Value,
    namespace: &str,
) -> Result<DynamicObject, kube::Error> {
    let (api, object) = place(client, &manifest, namespace, "x").await;
    api.create(&PostParams::default(), &object).await
}

#[tokio::test]
async fn name_lengths_are_limited_where_names_become_other_names() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "names").await;

    let forty = format!("a{}", "b".repeat(39));
    create(&client, app_manifest(&forty), &namespace)
        .await
        .expect("a 40-character App name is accepted");
    let err = create(&client, app_manifest(&format!("{forty}c")), &namespace)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("at most 40 characters"),
        "41-character App name: {err}"
    );

    // A Project's name becomes a namespace: 63 characters at most, no dots. `place` appends
    // `-x` to cluster-scoped names, so these are 63 and 64 characters once placed.
    let project = |name: String| json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project", "metadata": {"name": name}, "spec": {}});
    let sixty_one = format!("p{}", "q".repeat(60));
    create(&client, project(sixty_one.clone()), &namespace)
        .await
        .expect("a 63-character Project name is accepted");
    let err = create(&client, project(format!("{sixty_one}r")), &namespace)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("metadata.name must be a DNS label"),
        "64-character Project name: {err}"
    );

    let service = |name: &str| json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "BackingService", "metadata": {"name": name}, "spec": {"type": "redis"}});
    create(&client, service(&forty), &namespace)
        .await
        .expect("a 40-character BackingService name is accepted");
    let err = create(&client, service(&format!("{forty}c")), &namespace)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("at most 40 characters"),
        "41-character BackingService name: {err}"
    );
}

#[tokio::test]
async fn status_is_a_subresource() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "status").await;
    let apps: Api<App> = Api::namespaced(client.clone(), &namespace);
    create(&client, app_manifest("web"), &namespace).await.unwrap();

    let status = json!({"status": {
        "phase": "Ready",
        "message": "source and credentials in place",
        "observedGeneration": 1,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Reconciled", "message": "ok",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]
    }});
    let after = apps
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(after.status.as_ref().unwrap().phase, Some(AppPhase::Ready));
    assert_eq!(
        after.metadata.generation,
        Some(1),
        "a status write does not bump the generation"
    );

    // Status sent through the main resource is ignored; spec changes bump the generation.
    let spec_and_status = json!({"spec": {"displayName": "Web"}, "status": {"phase": "Failed"}});
    let after = apps
        .patch("web", &PatchParams::default(), &Patch::Merge(&spec_and_status))
        .await
        .unwrap();
    assert_eq!(after.status.as_ref().unwrap().phase, Some(AppPhase::Ready));
    assert_eq!(after.metadata.generation, Some(2));
    assert_eq!(after.spec.display_name.as_deref(), Some("Web"));

    // An invalid status is refused too: the phase is an enum.
    let bad = json!({"status": {"phase": "Exploded"}});
    let err = apps
        .patch_status("web", &PatchParams::default(), &Patch::Merge(&bad))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("Unsupported value: \"Exploded\""),
        "{err}"
    );
}

#[tokio::test]
async fn what_an_appbuild_builds_is_immutable() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "immutable").await;
    let builds: Api<AppBuild> = Api::namespaced(client.clone(), &namespace);
    let manifest = json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
        "metadata": {"name": "b1"}, "spec": {"appName": "web", "gitRef": "main"}
    });
    create(&client, manifest, &namespace).await.unwrap();
    let change = json!({"spec": {"gitRef": "develop"}});
    let err = builds
        .patch("b1", &PatchParams::default(), &Patch::Merge(&change))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("immutable; create a new AppBuild"),
        "{err}"
    );
    // Values that are not part of what is built may still change.
    let values = json!({"spec": {"helmValues": {"replicas": 3}}});
    builds
        .patch("b1", &PatchParams::default(), &Patch::Merge(&values))
        .await
        .expect("helmValues may change");
}

/// `kubectl get` asks for a server-side Table; the printer columns must be in it.
async fn table(client: &Client, path: &str) -> serde_json::Value {
    let request = http::Request::get(path)
        .header("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io")
        .body(Vec::new())
        .unwrap();
    serde_json::from_str(&client.request_text(request).await.unwrap()).unwrap()
}

fn column_names(table: &serde_json::Value) -> Vec<String> {
    table["columnDefinitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn printer_columns_show_in_kubectl_tables() {
    let client = client().await;
    let namespace = fresh_namespace(&client, "columns").await;
    let manifest = json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
        "metadata": {"name": "b1"}, "spec": {"appName": "web", "gitRef": "v1.2.0"}
    });
    create(&client, manifest, &namespace).await.unwrap();
    let builds: Api<AppBuild> = Api::namespaced(client.clone(), &namespace);
    let status =
        json!({"status": {"phase": "Failed", "reason": "CloneFailed", "commitSha": "0123456789abcdef"}});
    builds
        .patch_status("b1", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();

    let appbuilds = table(
        &client,
        &format!("/apis/apps.shapeblock.io/v1alpha1/namespaces/{namespace}/appbuilds"),
    )
    .await;
    assert_eq!(
        column_names(&appbuilds),
        [
            "Name", "App", "Ref", "Phase", "Reason", "Commit", "Image", "Started", "Age", "Message"
        ]
    );
    let cells = &appbuilds["rows"][0]["cells"];
    assert_eq!(cells[0], "b1");
    assert_eq!(cells[1], "web");
    assert_eq!(cells[2], "v1.2.0");
    assert_eq!(cells[3], "Failed");
    assert_eq!(cells[4], "CloneFailed");
    assert_eq!(cells[5], "0123456789abcdef");
    assert!(AppBuildPhase::Failed.is_final());

    create(&client, app_manifest("web"), &namespace).await.unwrap();
    let apps = table(
        &client,
        &format!("/apis/apps.shapeblock.io/v1alpha1/namespaces/{namespace}/apps"),
    )
    .await;
    assert_eq!(
        column_names(&apps),
        [
            "Name",
            "Strategy",
            "Phase",
            "Latest Build",
            "Image",
            "Age",
            "Message"
        ]
    );
    assert_eq!(apps["rows"][0]["cells"][1], "dockerfile");

    let project_name = unique_name("columns");
    let project = json!({"apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "Project",
                         "metadata": {"name": project_name}, "spec": {"displayName": "Columns"}});
    Api::<DynamicObject>::all_with(
        client.clone(),
        &kube::discovery::ApiResource::erase::<Project>(&()),
    )
    .create(&PostParams::default(), &serde_json::from_value(project).unwrap())
    .await
    .unwrap();
    let projects = table(&client, "/apis/apps.shapeblock.io/v1alpha1/projects").await;
    assert_eq!(
        column_names(&projects),
        ["Name", "Display Name", "Namespace", "Phase", "Age", "Message"]
    );
    let row = projects["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cells"][0] == project_name.as_str())
        .unwrap();
    assert_eq!(row["cells"][1], "Columns");
}

#[tokio::test]
async fn short_names_and_category_are_served() {
    let client = client().await;
    let discovery = kube::Discovery::new(client)
        .filter(&["apps.shapeblock.io"])
        .run()
        .await
        .unwrap();
    let group = discovery.get("apps.shapeblock.io").expect("group is served");
    let mut kinds: Vec<String> = group
        .recommended_resources()
        .into_iter()
        .map(|(r, _)| r.kind)
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        ["App", "AppBuild", "AppRun", "BackingService", "Project", "Team"]
    );
    // Short names come from the CRD objects themselves.
    let crds: Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = Api::all(support::client().await);
    let app = crds.get("apps.apps.shapeblock.io").await.unwrap();
    assert_eq!(app.spec.names.short_names, Some(vec!["sbapp".to_owned()]));
    assert_eq!(app.spec.names.categories, Some(vec!["shapeblock".to_owned()]));
    let run = crds.get("appruns.apps.shapeblock.io").await.unwrap();
    assert_eq!(run.spec.names.short_names, Some(vec!["sbrun".to_owned()]));
    assert_eq!(run.spec.names.categories, Some(vec!["shapeblock".to_owned()]));
}
