//! The workspace's dependency arrows point one way (README "Layout"): api and proto depend on no
//! other crate of ours; the agent on api and proto, never on the hub, the test harness or SQLite;
//! the hub on proto only, never on Kubernetes or the agent; the test harness is nobody's normal
//! dependency but this root package's (for `shapeblock-dev`). Checked on the resolved graph
//! `cargo metadata` prints, following normal and build edges transitively, so an arrow added
//! the wrong way anywhere below a crate fails here.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// For each crate: crates it must not reach through normal or build dependencies.
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "shapeblock-api",
        &[
            "shapeblock-proto",
            "shapeblock-agent",
            "shapeblock-hub",
            "shapeblock-testenv",
            "tonic",
            "prost",
        ],
    ),
    (
        "shapeblock-proto",
        &[
            "shapeblock-api",
            "shapeblock-agent",
            "shapeblock-hub",
            "shapeblock-testenv",
            "kube",
            "k8s-openapi",
        ],
    ),
    (
        "shapeblock-agent",
        &[
            "shapeblock-hub",
            "shapeblock-testenv",
            "rusqlite",
            "libsqlite3-sys",
        ],
    ),
    (
        "shapeblock-hub",
        &[
            "shapeblock-api",
            "shapeblock-agent",
            "shapeblock-testenv",
            "kube",
            "k8s-openapi",
        ],
    ),
];

/// Which workspace crates each workspace crate may name directly as a normal dependency.
const ALLOWED_DIRECT: &[(&str, &[&str])] = &[
    ("shapeblock-api", &[]),
    ("shapeblock-proto", &[]),
    ("shapeblock-agent", &["shapeblock-api", "shapeblock-proto"]),
    ("shapeblock-hub", &["shapeblock-proto"]),
    (
        "shapeblock-testenv",
        // proto: the agent stand-in (`testenv::stand_in`) speaks the tunnel protocol itself.
        &[
            "shapeblock-api",
            "shapeblock-proto",
            "shapeblock-agent",
            "shapeblock-hub",
        ],
    ),
    (
        "shapeblock",
        &["shapeblock-agent", "shapeblock-hub", "shapeblock-testenv"],
    ),
];

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON")
}

/// Every arrow that breaks a rule, as "from -> to (why)".
fn violations(metadata: &Value) -> Vec<String> {
    let names: BTreeMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    // Normal and build edges of the resolved graph (dev edges are tests' business), by name.
    let mut edges: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for node in metadata["resolve"]["nodes"].as_array().unwrap() {
        let from = names[node["id"].as_str().unwrap()];
        for dep in node["deps"].as_array().unwrap() {
            let linked = dep["dep_kinds"]
                .as_array()
                .unwrap()
                .iter()
                .any(|k| k["kind"].is_null() || k["kind"] == "build");
            if linked {
                edges
                    .entry(from)
                    .or_default()
                    .insert(names[dep["pkg"].as_str().unwrap()]);
            }
        }
    }
    for (krate, _) in ALLOWED_DIRECT {
        assert!(
            names.values().any(|n| n == krate),
            "{krate} is not in the workspace"
        );
    }
    let mut found = Vec::new();
    for (krate, forbidden) in FORBIDDEN {
        let mut seen = BTreeSet::new();
        let mut todo = vec![*krate];
        while let Some(next) = todo.pop() {
            for dep in edges.get(next).into_iter().flatten() {
                if seen.insert(*dep) {
                    todo.push(dep);
                }
            }
        }
        for bad in forbidden.iter().filter(|bad| seen.contains(**bad)) {
            found.push(format!("{krate} -> {bad} (reached through its dependencies)"));
        }
    }
    for (krate, allowed) in ALLOWED_DIRECT {
        let ours = edges
            .get(krate)
            .into_iter()
            .flatten()
            .filter(|d| d.starts_with("shapeblock"));
        for dep in ours.filter(|d| !allowed.contains(d)) {
            found.push(format!("{krate} -> {dep} (not an allowed arrow)"));
        }
    }
    found
}

/// The API crate takes kube's derive and core types, not its client: features are unified
/// across the workspace, so this is checked where it is declared.
#[test]
fn the_api_crate_asks_kube_for_the_derive_only() {
    let metadata = metadata();
    let api = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "shapeblock-api")
        .expect("shapeblock-api in the workspace");
    let kube = api["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "kube" && d["kind"].is_null())
        .expect("shapeblock-api depends on kube");
    assert_eq!(kube["uses_default_features"], false, "{kube}");
    assert_eq!(kube["features"], serde_json::json!(["derive"]), "{kube}");
}

#[test]
fn dependency_arrows_point_one_way() {
    let found = violations(&metadata());
    assert!(
        found.is_empty(),
        "dependency arrows the wrong way:\n{}",
        found.join("\n")
    );
}

/// The check sees a wrong arrow: the real graph with the agent depending on the hub (and so,
/// through it, on SQLite) and the hub on kube.
#[test]
fn a_wrong_arrow_is_reported() {
    let mut metadata = metadata();
    let id_of = |metadata: &Value, name: &str| {
        metadata["packages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .map(|p| p["id"].clone())
            .unwrap_or_else(|| panic!("package {name} in the graph"))
    };
    let (agent, hub, kube) = (
        id_of(&metadata, "shapeblock-agent"),
        id_of(&metadata, "shapeblock-hub"),
        id_of(&metadata, "kube"),
    );
    for node in metadata["resolve"]["nodes"].as_array_mut().unwrap() {
        let to = if node["id"] == agent {
            &hub
        } else if node["id"] == hub {
            &kube
        } else {
            continue;
        };
        node["deps"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"pkg": to, "dep_kinds": [{"kind": null, "target": null}]}));
    }
    let found = violations(&metadata);
    for wanted in [
        "shapeblock-agent -> shapeblock-hub (reached through its dependencies)",
        "shapeblock-agent -> rusqlite (reached through its dependencies)",
        "shapeblock-agent -> shapeblock-hub (not an allowed arrow)",
        "shapeblock-hub -> kube (reached through its dependencies)",
    ] {
        assert!(
            found.iter().any(|f| f == wanted),
            "{wanted} not reported in {found:?}"
        );
    }
}
