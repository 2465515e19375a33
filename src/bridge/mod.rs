//! The bridge: commands from the hub become ShapeBlock custom resources (server-side apply
//! under one field manager), and the status of those resources becomes phase changes for the
//! hub. It knows the proto and the CRD types; never sockets or TLS (that is the tunnel's).

pub mod identity;
pub mod logs;
pub mod scrub;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::watcher;
use kube::{Client, Resource};
use tokio::sync::watch;

use crate::api::{App, AppBuild, AppRun, BackingService, GROUP, Project, Team};
use crate::proto::object_key;
use crate::proto::v1::server_message::Body as Down;
use crate::proto::v1::{CommandResult, Inventory, LogChunk, ObjectRef, PhaseChange, SetConfig};
use crate::tunnel::{Host, PhaseQueue};

/// The field manager of the desired state the hub sends (the same as the controllers': one
/// agent, one manager; the controllers write the status subresource, the bridge the spec).
pub const FIELD_MANAGER: &str = "shapeblock-agent";
/// Label on every resource the bridge applied: what `Sync { prune }` may delete.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "shapeblock-agent";
/// Annotation the bridge sets on an AppBuild when the hub cancels it; the AppBuild controller
/// acts on it.
pub use crate::api::CANCEL_ANNOTATION;

/// The kinds the hub manages, with whether they are namespaced.
fn kinds() -> Vec<(ApiResource, bool)> {
    vec![
        (ApiResource::erase::<Project>(&()), false),
        (ApiResource::erase::<App>(&()), true),
        (ApiResource::erase::<AppBuild>(&()), true),
        (ApiResource::erase::<AppRun>(&()), true),
        (ApiResource::erase::<BackingService>(&()), true),
        (ApiResource::erase::<Team>(&()), false),
    ]
}

fn kind(name: &str) -> Option<(ApiResource, bool)> {
    kinds().into_iter().find(|(r, _)| r.kind == name)
}

pub struct KubeHost {
    client: Client,
    queue: PhaseQueue,
    current: Mutex<HashMap<String, PhaseChange>>,
    synced: watch::Sender<usize>,
    logs: Arc<logs::LogRelay>,
}

fn failed(message: impl Into<String>, object: Option<ObjectRef>) -> CommandResult {
    CommandResult {
        command_seq: 0,
        ok: false,
        message: message.into(),
        object,
    }
}

fn kube_message(e: &kube::Error) -> String {
    match e {
        // The apiserver's own words: what the server shows its user.
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

impl KubeHost {
    /// Starts watching the kinds; phase changes flow into the queue until `shutdown`.
    pub fn start(
        client: Client,
        shutdown: impl std::future::Future<Output = ()> + Send + Clone + 'static,
    ) -> Arc<Self> {
        let (synced, _) = watch::channel(0);
        let host = Arc::new(Self {
            logs: logs::LogRelay::start(client.clone(), shutdown.clone()),
            client,
            queue: PhaseQueue::default(),
            current: Mutex::default(),
            synced,
        });
        for (resource, _) in kinds() {
            let host = host.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = shutdown => {}
                    _ = host.watch(resource) => {}
                }
            });
        }
        host
    }

    async fn watch(&self, resource: ApiResource) {
        let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
        let mut stream = watcher(api, watcher::Config::default()).boxed();
        let mut seen_init = Vec::new();
        let mut first_sync = true;
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Init) => seen_init.clear(),
                Ok(watcher::Event::InitApply(o)) => {
                    seen_init.push(key_of(&resource, &o));
                    self.observe(&resource, &o);
                }
                Ok(watcher::Event::InitDone) => {
                    // Objects that vanished while the watch was down are gone.
                    let gone: Vec<String> = {
                        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
                        current
                            .keys()
                            .filter(|k| {
                                k.starts_with(&format!("{}/", resource.kind)) && !seen_init.contains(k)
                            })
                            .cloned()
                            .collect()
                    };
                    for key in gone {
                        self.forget(&key);
                    }
                    if first_sync {
                        first_sync = false;
                        self.synced.send_modify(|n| *n += 1);
                    }
                }
                Ok(watcher::Event::Apply(o)) => self.observe(&resource, &o),
                Ok(watcher::Event::Delete(o)) => self.forget(&key_of(&resource, &o)),
                Err(e) => {
                    tracing::warn!(kind = %resource.kind, error = %e, "bridge watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    fn observe(&self, resource: &ApiResource, o: &DynamicObject) {
        let change = phase_change(resource, o);
        let key = change.object.as_ref().map(object_key).unwrap_or_default();
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if current.get(&key) != Some(&change) {
            current.insert(key, change.clone());
            drop(current);
            self.queue.push(change);
        }
    }

    fn forget(&self, key: &str) {
        let removed = self.current.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        if let Some(mut change) = removed {
            change.phase = "Deleted".into();
            change.reason = String::new();
            change.message = String::new();
            self.queue.push(change);
        }
    }

    fn api(&self, resource: &ApiResource, namespaced: bool, namespace: &str) -> Api<DynamicObject> {
        if namespaced {
            Api::namespaced_with(self.client.clone(), namespace, resource)
        } else {
            Api::all_with(self.client.clone(), resource)
        }
    }

    async fn apply(&self, manifest: &str) -> CommandResult {
        let mut value: serde_json::Value = match serde_yaml::from_str(manifest) {
            Ok(v) => v,
            Err(e) => return failed(format!("invalid manifest: {e}"), None),
        };
        let kind_name = value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let name = value
            .pointer("/metadata/name")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let namespace = value
            .pointer("/metadata/namespace")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        let Some((resource, namespaced)) = kind(&kind_name) else {
            return failed(
                format!(
                    "unknown kind {kind_name:?}: the agent applies Project, App, AppBuild, AppRun, BackingService and Team"
                ),
                None,
            );
        };
        let object = ObjectRef {
            kind: kind_name.clone(),
            namespace: if namespaced {
                namespace.clone()
            } else {
                String::new()
            },
            name: name.clone(),
        };
        if api_version != resource.api_version {
            return failed(
                format!(
                    "apiVersion {api_version:?} is not {} ({GROUP})",
                    resource.api_version
                ),
                Some(object),
            );
        }
        if name.is_empty() || (namespaced && namespace.is_empty()) {
            return failed(
                if namespaced {
                    "metadata.name and metadata.namespace are required"
                } else {
                    "metadata.name is required"
                },
                Some(object),
            );
        }
        if let Some(meta) = value.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            if !namespaced {
                meta.remove("namespace");
            }
            let labels = meta.entry("labels").or_insert_with(|| serde_json::json!({}));
            if let Some(labels) = labels.as_object_mut() {
                labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
            }
        }
        let api = self.api(&resource, namespaced, &namespace);
        match api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&value),
            )
            .await
        {
            Ok(_) => CommandResult {
                command_seq: 0,
                ok: true,
                message: "applied".into(),
                object: Some(object),
            },
            Err(e) => failed(kube_message(&e), Some(object)),
        }
    }

    async fn delete(&self, object: ObjectRef) -> CommandResult {
        let Some((resource, namespaced)) = kind(&object.kind) else {
            return failed(format!("unknown kind {:?}", object.kind), Some(object));
        };
        let api = self.api(&resource, namespaced, &object.namespace);
        match api.delete(&object.name, &DeleteParams::background()).await {
            Ok(_) => CommandResult {
                command_seq: 0,
                ok: true,
                message: "deleting".into(),
                object: Some(object),
            },
            // Idempotent: already gone is done.
            Err(kube::Error::Api(s)) if s.code == 404 => CommandResult {
                command_seq: 0,
                ok: true,
                message: "already gone".into(),
                object: Some(object),
            },
            Err(e) => failed(kube_message(&e), Some(object)),
        }
    }

    async fn cancel(&self, namespace: String, build: String) -> CommandResult {
        let object = ObjectRef {
            kind: AppBuild::kind(&()).into_owned(),
            namespace: namespace.clone(),
            name: build.clone(),
        };
        let api: Api<AppBuild> = Api::namespaced(self.client.clone(), &namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {CANCEL_ANNOTATION: "true"}}});
        match api
            .patch(&build, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => CommandResult {
                command_seq: 0,
                ok: true,
                message: "cancel requested".into(),
                object: Some(object),
            },
            Err(e) => failed(kube_message(&e), Some(object)),
        }
    }

    /// Writes secret config vars into the App's config Secret (creating it if the App
    /// controller has not yet). The result names the variables, never their values.
    async fn set_config(&self, command: SetConfig) -> CommandResult {
        use base64::Engine;
        let object = ObjectRef {
            kind: App::kind(&()).into_owned(),
            namespace: command.namespace.clone(),
            name: command.app.clone(),
        };
        if let Err(reason) = crate::proto::check_set_config(&command) {
            return failed(format!("set-config refused: {reason}"), Some(object));
        }
        let apps: Api<App> = Api::namespaced(self.client.clone(), &command.namespace);
        let app = match apps.get_opt(&command.app).await {
            Ok(Some(app)) => app,
            Ok(None) => {
                return failed(
                    format!(
                        "App {}/{} does not exist: create it first",
                        command.namespace, command.app
                    ),
                    Some(object),
                );
            }
            Err(e) => return failed(kube_message(&e), Some(object)),
        };
        let encode = |value: &str| base64::engine::general_purpose::STANDARD.encode(value);
        let mut data = serde_json::Map::new();
        for (name, value) in &command.set {
            data.insert(name.clone(), encode(value).into());
        }
        for name in &command.unset {
            data.insert(name.clone(), serde_json::Value::Null);
        }
        let secrets: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), &command.namespace);
        let name = crate::controllers::release::config_secret_name(&command.app);
        let patch = serde_json::json!({ "data": data });
        let mut written = secrets
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop);
        if matches!(&written, Err(kube::Error::Api(s)) if s.code == 404) {
            let mut secret = crate::controllers::release::config_secret(&app);
            secret.data = Some(
                command
                    .set
                    .iter()
                    .map(|(k, v)| (k.clone(), k8s_openapi::ByteString(v.clone().into_bytes())))
                    .collect(),
            );
            written = secrets.create(&Default::default(), &secret).await.map(drop);
        }
        match written {
            Ok(()) => {
                let mut said = Vec::new();
                if !command.set.is_empty() {
                    let names: Vec<&str> = command.set.keys().map(String::as_str).collect();
                    said.push(format!("set {}", names.join(", ")));
                }
                if !command.unset.is_empty() {
                    said.push(format!("unset {}", command.unset.join(", ")));
                }
                CommandResult {
                    command_seq: 0,
                    ok: true,
                    message: format!(
                        "config of {}/{}: {}",
                        command.namespace,
                        command.app,
                        said.join("; ")
                    ),
                    object: Some(object),
                }
            }
            Err(e) => failed(kube_message(&e), Some(object)),
        }
    }

    async fn sync(&self, manifests: Vec<String>, prune: bool) -> CommandResult {
        let mut wanted = Vec::new();
        let mut failures = Vec::new();
        for manifest in &manifests {
            let r = self.apply(manifest).await;
            if let Some(o) = &r.object {
                wanted.push(object_key(o));
            }
            if !r.ok {
                failures.push(r.message);
            }
        }
        let mut pruned = 0;
        // A manifest that failed may name an object that exists: pruning now could delete a
        // Project (and its namespace) because of a typo in its spec. Prune only a clean sync.
        let prune = prune && failures.is_empty();
        if !failures.is_empty() {
            failures.push("nothing was pruned because some manifests failed".into());
        }
        if prune {
            for (resource, namespaced) in kinds() {
                let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
                let list = match api
                    .list(&ListParams::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}")))
                    .await
                {
                    Ok(l) => l,
                    Err(e) => {
                        failures.push(kube_message(&e));
                        continue;
                    }
                };
                for o in list {
                    let key = key_of(&resource, &o);
                    if !wanted.contains(&key) {
                        let r = self
                            .delete(ObjectRef {
                                kind: resource.kind.clone(),
                                namespace: if namespaced {
                                    o.metadata.namespace.clone().unwrap_or_default()
                                } else {
                                    String::new()
                                },
                                name: o.metadata.name.clone().unwrap_or_default(),
                            })
                            .await;
                        if r.ok {
                            pruned += 1
                        } else {
                            failures.push(r.message)
                        }
                    }
                }
            }
        }
        CommandResult {
            command_seq: 0,
            ok: failures.is_empty(),
            message: if failures.is_empty() {
                format!("synced {} resources, pruned {pruned}", manifests.len())
            } else {
                failures.join("; ")
            },
            object: None,
        }
    }
}

fn key_of(resource: &ApiResource, o: &DynamicObject) -> String {
    format!(
        "{}/{}/{}",
        resource.kind,
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone().unwrap_or_default()
    )
}

/// The phase of one object as the hub sees it.
pub fn phase_change(resource: &ApiResource, o: &DynamicObject) -> PhaseChange {
    let status = o.data.get("status");
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).unwrap_or_default().to_string();
    let ready = status
        .and_then(|s| s.get("conditions"))
        .and_then(|c| c.as_array())
        .and_then(|c| {
            c.iter()
                .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("Ready"))
        });
    PhaseChange {
        object: Some(ObjectRef {
            kind: resource.kind.clone(),
            namespace: o.metadata.namespace.clone().unwrap_or_default(),
            name: o.metadata.name.clone().unwrap_or_default(),
        }),
        phase: text(status.and_then(|s| s.get("phase"))),
        observed_generation: status
            .and_then(|s| s.get("observedGeneration"))
            .and_then(|g| g.as_i64())
            .unwrap_or(0),
        generation: o.metadata.generation.unwrap_or(0),
        reason: text(ready.and_then(|c| c.get("reason"))),
        message: text(ready.and_then(|c| c.get("message"))),
    }
}

/// CPU quantity in millicores (`2`, `1500m`).
fn cpu_millis(q: &str) -> u64 {
    if let Some(m) = q.strip_suffix('m') {
        m.parse().unwrap_or(0)
    } else {
        q.parse::<f64>().map(|c| (c * 1000.0) as u64).unwrap_or(0)
    }
}

/// Memory quantity in bytes (`16Gi`, `1000Ki`, `1G`, plain bytes).
fn memory_bytes(q: &str) -> u64 {
    const UNITS: &[(&str, u64)] = &[
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, factor) in UNITS {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().map(|n| (n * *factor as f64) as u64).unwrap_or(0);
        }
    }
    q.parse().unwrap_or(0)
}

#[tonic::async_trait]
impl Host for KubeHost {
    async fn execute(&self, command: Down) -> CommandResult {
        match command {
            Down::Apply(a) => self.apply(&a.manifest).await,
            Down::Delete(d) => match d.object {
                Some(o) => self.delete(o).await,
                None => failed("delete names no object", None),
            },
            Down::CancelBuild(c) => self.cancel(c.namespace, c.build).await,
            Down::Sync(s) => self.sync(s.manifests, s.prune).await,
            Down::SetConfig(c) => self.set_config(c).await,
            Down::HelloAck(_) | Down::Heartbeat(_) | Down::Ack(_) => failed("not a command", None),
        }
    }

    async fn snapshot(&self) -> Vec<PhaseChange> {
        // Level means the whole level: wait (bounded) until every kind's first list is in.
        let mut synced = self.synced.subscribe();
        let total = kinds().len();
        let _ = tokio::time::timeout(Duration::from_secs(30), synced.wait_for(|n| *n >= total)).await;
        let mut all: Vec<PhaseChange> = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|c| c.object.as_ref().map(object_key));
        all
    }

    async fn inventory(&self) -> Inventory {
        let mut inventory = Inventory::default();
        if let Ok(v) = self.client.apiserver_version().await {
            inventory.kubernetes_version = v.git_version;
        }
        match Api::<Node>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(nodes) => {
                inventory.node_count = nodes.items.len() as u32;
                for node in nodes {
                    let alloc = node.status.and_then(|s| s.allocatable).unwrap_or_default();
                    inventory.allocatable_cpu_millis +=
                        alloc.get("cpu").map(|q| cpu_millis(&q.0)).unwrap_or(0);
                    inventory.allocatable_memory_bytes +=
                        alloc.get("memory").map(|q| memory_bytes(&q.0)).unwrap_or(0);
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot list nodes for the inventory"),
        }
        inventory
    }

    fn changes(&self) -> &PhaseQueue {
        &self.queue
    }

    async fn next_log(&self) -> LogChunk {
        self.logs.next().await
    }

    fn log_delivered(&self, chunk: &LogChunk) {
        self.logs.delivered(chunk);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(cpu_millis("2"), 2000);
        assert_eq!(cpu_millis("1500m"), 1500);
        assert_eq!(memory_bytes("16Gi"), 16 << 30);
        assert_eq!(memory_bytes("1000Ki"), 1_024_000);
        assert_eq!(memory_bytes("1G"), 1_000_000_000);
        assert_eq!(memory_bytes("42"), 42);
    }
}
