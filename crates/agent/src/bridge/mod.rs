//! The bridge: commands from the hub become ShapeBlock custom resources (server-side apply
//! under one field manager), and the status of those resources becomes phase changes for the
//! hub. It knows the proto and the CRD types; never sockets or TLS (that is the tunnel's).
//!
//! Past 600 lines: the commands and the status relay share the field manager, the kinds table
//! and the delivery rules; the log relay is `logs`.

pub mod app_logs;
pub mod identity;
pub mod logs;
pub mod prune;
pub mod scrub;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PartialObjectMeta, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::watcher;
use kube::{Client, Resource};
use tokio::sync::watch;

use crate::api::{App, AppBuild, AppRun, BackingService, GROUP, Project, Team};
use crate::proto::v1::server_message::Body as Down;
use crate::proto::v1::{
    AppLogChunk, CancelBuild, CommandResult, Inventory, LogChunk, ObjectRef, PhaseChange, SetConfig,
    StartAppLogs, StatusSnapshot, Sync,
};
use crate::proto::{
    check_cancel, check_manifest, check_object, check_prune_options, object_key, scope_is_empty,
};
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

/// How long a command for a Project's namespace waits for the Project controller to make it.
/// Making a namespace takes milliseconds to a few seconds on a busy apiserver; a command waits
/// this long at most, once per command, and only when the Project exists.
const NAMESPACE_WAIT: Duration = Duration::from_secs(15);

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
    /// Never a project namespace, whatever its labels say.
    agent_namespace: String,
    queue: PhaseQueue,
    current: Mutex<HashMap<String, PhaseChange>>,
    synced: watch::Sender<usize>,
    logs: Arc<logs::LogRelay>,
    app_logs: Arc<app_logs::AppLogs>,
}

fn failed(message: impl Into<String>, object: Option<ObjectRef>) -> CommandResult {
    CommandResult {
        command_seq: 0,
        ok: false,
        message: message.into(),
        object,
    }
}

tokio::task_local! {
    /// Set while a command runs when one of its requests failed because the apiserver could
    /// not answer (unreachable, 5xx, 429), not because of what was asked: such a failure says
    /// nothing about the command, so [`KubeHost::execute`] runs it again instead of reporting
    /// it. Task-local because every failure of every command kind goes through
    /// [`kube_message`], which is the one place that sees the error itself.
    static UNAVAILABLE: std::cell::Cell<bool>;
}

/// How long a command is retried while the apiserver cannot answer (an apiserver restart
/// takes seconds). Past that the failure is reported with the apiserver's words. Commands are
/// idempotent (server-side apply, delete, annotations), so running one again is safe. The
/// session loop waits meanwhile; kept under three default heartbeats (30 s), after which the
/// hub would end the session, and then the unanswered command comes again after the
/// reconnect and runs again: no loss either way.
const COMMAND_RETRY: Duration = Duration::from_secs(20);

/// Whether `e` is the apiserver not answering rather than refusing.
fn apiserver_unavailable(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(status) => status.code == 429 || status.code >= 500,
        kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => true,
        _ => false,
    }
}

fn kube_message(e: &kube::Error) -> String {
    if apiserver_unavailable(e) {
        let _ = UNAVAILABLE.try_with(|u| u.set(true));
    }
    match e {
        // The apiserver's own words: what the server shows its user.
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

impl KubeHost {
    /// Starts watching the kinds; phase changes flow into the queue until `shutdown`.
    /// `agent_namespace` is the agent's own namespace, where no command writes.
    pub fn start(
        client: Client,
        agent_namespace: &str,
        app_logs: app_logs::Limits,
        shutdown: impl std::future::Future<Output = ()> + Send + Clone + 'static,
    ) -> Arc<Self> {
        let (synced, _) = watch::channel(0);
        let host = Arc::new(Self {
            logs: logs::LogRelay::start(client.clone(), shutdown.clone()),
            app_logs: app_logs::AppLogs::new(client.clone(), agent_namespace, app_logs),
            client,
            agent_namespace: agent_namespace.to_string(),
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

    /// Ok when the agent made `namespace` for a Project: only there do commands write
    /// namespaced objects (never in the agent's own namespace, `kube-system` or a tenant's
    /// other namespaces). `namespace` has been checked as a name already. Answers are kept in
    /// `seen` for the rest of one command.
    async fn project_namespace(&self, namespace: &str, seen: &mut Seen) -> Result<(), String> {
        if let Some(answer) = seen.get(namespace) {
            return answer.clone();
        }
        let answer = if namespace == self.agent_namespace {
            Err(format!(
                "namespace {namespace} is the agent's own namespace, not a ShapeBlock project namespace"
            ))
        } else {
            match self.namespace_of_project(namespace).await {
                Ok(Some(ns)) if is_project_namespace(&ns.metadata) => Ok(()),
                Ok(Some(_)) => Err(format!(
                    "namespace {namespace} is not a ShapeBlock project namespace: the agent \
                     serves only the namespaces it made for a Project"
                )),
                Ok(None) => Err(format!(
                    "namespace {namespace} does not exist: it is made for its Project, and no \
                     Project {namespace} exists (or it did not make it within {}s); apply the \
                     Project first",
                    NAMESPACE_WAIT.as_secs()
                )),
                Err(e) => Err(format!("cannot read namespace {namespace}: {}", kube_message(&e))),
            }
        };
        seen.insert(namespace.to_string(), answer.clone());
        answer
    }

    /// The namespace's metadata; while its Project exists and the namespace does not yet (a
    /// server that sends a Project and its App back to back, or both in one Sync), waits up to
    /// [`NAMESPACE_WAIT`] for the Project controller to make it, so that the App is not refused
    /// for arriving milliseconds early. Without a Project there is nothing to wait for.
    async fn namespace_of_project(
        &self,
        namespace: &str,
    ) -> Result<Option<PartialObjectMeta<Namespace>>, kube::Error> {
        let namespaces = Api::<Namespace>::all(self.client.clone());
        let found = namespaces.get_metadata_opt(namespace).await?;
        if found.is_some() {
            return Ok(found);
        }
        let project = Api::<Project>::all(self.client.clone())
            .get_metadata_opt(namespace)
            .await?;
        if project.is_none_or(|p| p.metadata.deletion_timestamp.is_some()) {
            return Ok(None);
        }
        let deadline = tokio::time::Instant::now() + NAMESPACE_WAIT;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(ns) = namespaces.get_metadata_opt(namespace).await? {
                return Ok(Some(ns));
            }
        }
        Ok(None)
    }

    /// One run of a command: its result as the apiserver answered.
    async fn execute_once(&self, command: Down) -> CommandResult {
        match command {
            Down::Apply(a) => self.apply(&a.manifest, &mut Seen::new()).await,
            Down::Delete(d) => match d.object {
                Some(o) => self.delete(o, &mut Seen::new()).await,
                None => failed("delete names no object", None),
            },
            Down::CancelBuild(c) => self.cancel(c).await,
            Down::Sync(s) => self.sync(s).await,
            Down::SetConfig(c) => self.set_config(c).await,
            Down::HelloAck(_)
            | Down::Heartbeat(_)
            | Down::Ack(_)
            | Down::StartAppLogs(_)
            | Down::StopAppLogs(_) => failed("not a command", None),
        }
    }

    async fn apply(&self, manifest: &str, seen: &mut Seen) -> CommandResult {
        // Names are checked before anything else: they become the request's path.
        let (object, mut value) = match check_manifest(manifest) {
            Ok(checked) => checked,
            Err(reason) => return failed(reason, None),
        };
        let Some((resource, namespaced)) = kind(&object.kind) else {
            return failed(format!("unknown kind {:?}", object.kind), None);
        };
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string();
        if api_version != resource.api_version {
            return failed(
                format!(
                    "apiVersion {} is not {} ({GROUP})",
                    crate::proto::shown(&api_version),
                    resource.api_version
                ),
                Some(object),
            );
        }
        if namespaced && let Err(reason) = self.project_namespace(&object.namespace, seen).await {
            return failed(reason, Some(object));
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
        let api = self.api(&resource, namespaced, &object.namespace);
        match api
            .patch(
                &object.name,
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

    async fn delete(&self, object: ObjectRef, seen: &mut Seen) -> CommandResult {
        if let Err(reason) = check_object(&object) {
            return failed(format!("delete refused: {reason}"), None);
        }
        let Some((resource, namespaced)) = kind(&object.kind) else {
            return failed(format!("unknown kind {:?}", object.kind), None);
        };
        if namespaced && let Err(reason) = self.project_namespace(&object.namespace, seen).await {
            return failed(format!("delete refused: {reason}"), Some(object));
        }
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

    async fn cancel(&self, command: CancelBuild) -> CommandResult {
        if let Err(reason) = check_cancel(&command) {
            return failed(format!("cancel refused: {reason}"), None);
        }
        let CancelBuild { namespace, build } = command;
        let object = ObjectRef {
            kind: AppBuild::kind(&()).into_owned(),
            namespace: namespace.clone(),
            name: build.clone(),
        };
        if let Err(reason) = self.project_namespace(&namespace, &mut Seen::new()).await {
            return failed(format!("cancel refused: {reason}"), Some(object));
        }
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
            return failed(format!("set-config refused: {reason}"), None);
        }
        if let Err(reason) = self.project_namespace(&command.namespace, &mut Seen::new()).await {
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

    /// Applies every manifest (one that fails does not stop the others), then, with `prune`,
    /// removes what [`prune::plan`] says: managed objects in the scope that are not listed,
    /// within the share. No scope, a failed manifest or too large a share: nothing is pruned,
    /// and the result says why.
    async fn sync(&self, command: Sync) -> CommandResult {
        if let Err(reason) = check_prune_options(&command) {
            return failed(format!("sync refused, nothing applied: {reason}"), None);
        }
        let mut seen = Seen::new();
        let mut wanted = HashSet::new();
        let mut failures = Vec::new();
        for manifest in &command.manifests {
            let r = self.apply(manifest, &mut seen).await;
            if let Some(o) = &r.object {
                wanted.insert(object_key(o));
            }
            if !r.ok {
                failures.push(match &r.object {
                    Some(o) => format!("{}: {}", object_key(o), r.message),
                    None => r.message,
                });
            }
        }
        let applied = command.manifests.len() - failures.len();
        let done = |message: String, ok: bool| CommandResult {
            command_seq: 0,
            ok,
            message,
            object: None,
        };
        let synced = format!("applied {applied} of {} manifests", command.manifests.len());
        if !command.prune && command.prune_scope.is_none() {
            return if failures.is_empty() {
                done(format!("synced {} resources", command.manifests.len()), true)
            } else {
                done(format!("{synced}; {}", reasons(&failures)), false)
            };
        }
        // A manifest that failed may name an object that exists: pruning now could delete a
        // Project (and its namespace) because of a typo in its spec. Prune only a clean sync.
        if !failures.is_empty() {
            return done(
                format!(
                    "{synced}; {}; nothing was pruned because some manifests failed",
                    reasons(&failures)
                ),
                false,
            );
        }
        let scope = match &command.prune_scope {
            Some(scope) if !scope_is_empty(Some(scope)) => scope,
            _ => {
                return done(
                    format!(
                        "{synced}; prune refused: this Sync names no prune scope (projects, or \
                         kinds and namespaces), and the agent never prunes the whole cluster; \
                         nothing was pruned"
                    ),
                    false,
                );
            }
        };
        let mut managed = Vec::new();
        for (resource, namespaced) in kinds() {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), &resource);
            let selector = format!("{MANAGED_BY_LABEL}={MANAGED_BY}");
            match api.list_metadata(&ListParams::default().labels(&selector)).await {
                // Objects being deleted already are neither removed again nor counted.
                Ok(list) => managed.extend(
                    list.into_iter()
                        .filter(|o| o.metadata.deletion_timestamp.is_none())
                        .map(|o| ObjectRef {
                            kind: resource.kind.clone(),
                            namespace: if namespaced {
                                o.metadata.namespace.unwrap_or_default()
                            } else {
                                String::new()
                            },
                            name: o.metadata.name.unwrap_or_default(),
                        }),
                ),
                // Without the whole list the share cannot be known: prune nothing.
                Err(e) => {
                    return done(
                        format!(
                            "{synced}; nothing was pruned: cannot list {}: {}",
                            resource.kind,
                            kube_message(&e)
                        ),
                        false,
                    );
                }
            }
        }
        let remove = match prune::plan(scope, &managed, &wanted, command.prune_max_percent, command.force) {
            Ok(remove) => remove,
            Err(refusal) => return done(format!("{synced}; {refusal}"), false),
        };
        let mut pruned = Vec::new();
        for object in remove {
            let r = self.delete(object.clone(), &mut seen).await;
            if r.ok {
                pruned.push(object);
            } else {
                failures.push(format!("{}: {}", object_key(&object), r.message));
            }
        }
        let mut message = format!(
            "synced {} resources, pruned {}",
            command.manifests.len(),
            pruned.len()
        );
        if !pruned.is_empty() {
            message.push_str(&format!(": {}", prune::listing(&pruned)));
        }
        if !failures.is_empty() {
            message.push_str(&format!("; not pruned: {}", reasons(&failures)));
        }
        done(message, failures.is_empty())
    }
}

/// The reasons of a Sync's failures, at most [`prune::LISTED`] of them (a result is one
/// message, and a desired state can have thousands of manifests).
fn reasons(failures: &[String]) -> String {
    let mut text: Vec<&str> = failures.iter().take(prune::LISTED).map(String::as_str).collect();
    let more = failures.len().saturating_sub(prune::LISTED);
    let more = format!("and {more} more");
    if failures.len() > prune::LISTED {
        text.push(&more);
    }
    text.join("; ")
}

/// What one command found out about namespaces (by name: a project namespace or why not).
type Seen = HashMap<String, Result<(), String>>;

/// Whether the agent made this namespace for the Project of the same name (the labels the
/// Project controller puts on it).
fn is_project_namespace(meta: &ObjectMeta) -> bool {
    use crate::controllers::{MANAGED_BY as BY, MANAGED_BY_LABEL as BY_LABEL, PROJECT_LABEL};
    let labels = meta.labels.as_ref();
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    meta.name.is_some() && label(BY_LABEL) == Some(BY) && label(PROJECT_LABEL) == meta.name.as_deref()
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
        let started = tokio::time::Instant::now();
        let mut pause = Duration::from_millis(250);
        loop {
            let (result, unavailable) = UNAVAILABLE
                .scope(std::cell::Cell::new(false), async {
                    let result = self.execute_once(command.clone()).await;
                    (result, UNAVAILABLE.with(|u| u.get()))
                })
                .await;
            if result.ok || !unavailable || started.elapsed() + pause > COMMAND_RETRY {
                return result;
            }
            tracing::info!(message = %result.message, "the apiserver could not answer a command; running it again");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    async fn snapshot(&self) -> StatusSnapshot {
        // Level means the whole level: wait (bounded) until every kind's first list is in.
        // Only then does the snapshot say it is complete, and only a complete one lets the
        // hub mark what it does not list as deleted.
        let mut synced = self.synced.subscribe();
        let total = kinds().len();
        let complete = tokio::time::timeout(Duration::from_secs(30), synced.wait_for(|n| *n >= total))
            .await
            .is_ok_and(|r| r.is_ok());
        if !complete {
            tracing::warn!(
                "not every kind was listed within 30 s: the snapshot is partial, and the hub prunes nothing by it"
            );
        }
        let mut all: Vec<PhaseChange> = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|c| c.object.as_ref().map(object_key));
        StatusSnapshot {
            objects: all,
            complete,
        }
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

    fn start_app_logs(&self, start: StartAppLogs) {
        self.app_logs.start(start);
    }

    fn stop_app_logs(&self, id: u64) {
        self.app_logs.stop(id);
    }

    fn end_app_logs(&self) {
        self.app_logs.stop_all();
    }

    async fn next_app_log(&self) -> AppLogChunk {
        self.app_logs.next().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_apiserver_not_answering_makes_a_command_run_again() {
        let status = |code| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        for code in [429, 500, 502, 503, 504] {
            assert!(apiserver_unavailable(&status(code)), "{code}");
        }
        // What was asked is refused: reported as it is.
        for code in [400, 403, 404, 409, 410, 422] {
            assert!(!apiserver_unavailable(&status(code)), "{code}");
        }
        assert!(apiserver_unavailable(&kube::Error::Service(
            "connection refused".into()
        )));
        assert!(!apiserver_unavailable(
            &kube::Error::LinesCodecMaxLineLengthExceeded
        ));
        // Outside a command's scope the flag is simply not set (no panic).
        let _ = kube_message(&status(503));
    }

    #[test]
    fn only_namespaces_made_for_their_project_are_project_namespaces() {
        let meta = |name: &str, labels: &[(&str, &str)]| ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        };
        let by = ("app.kubernetes.io/managed-by", "shapeblock-agent");
        assert!(is_project_namespace(&meta(
            "shop",
            &[by, ("apps.shapeblock.io/project", "shop")]
        )));
        for other in [
            meta("kube-system", &[]),
            meta("shop", &[by]),
            meta("shop", &[("apps.shapeblock.io/project", "shop")]),
            meta("shop", &[by, ("apps.shapeblock.io/project", "blog")]),
            meta(
                "shop",
                &[
                    ("app.kubernetes.io/managed-by", "helm"),
                    ("apps.shapeblock.io/project", "shop"),
                ],
            ),
        ] {
            assert!(!is_project_namespace(&other), "{other:?}");
        }
    }

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

/// Fuzz target for the agent's decoding of every server message, with a fixed case budget
/// (`SHAPEBLOCK_FUZZ_CASES` for a longer run): arbitrary bytes, and well-formed messages of
/// every kind with hostile strings, go through the decoding and the checks each command
/// passes in this module before any apiserver request (the same functions, in the same
/// order). Each must end in a clean refusal (a short reason for the failed `CommandResult`)
/// or a request that names only valid objects, never a panic.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::proto::v1::{Apply, Delete, PruneScope, ServerMessage};
    use proptest::prelude::*;
    use prost::Message;

    fn cases() -> u32 {
        std::env::var("SHAPEBLOCK_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2048)
    }

    /// What the bridge does with a command before its first request: Ok names the objects
    /// it would request, Err is the refusal.
    fn before_any_request(body: &Down) -> Result<Vec<ObjectRef>, String> {
        match body {
            Down::Apply(a) => {
                let (object, value) = check_manifest(&a.manifest)?;
                let (resource, _) = kind(&object.kind).ok_or("unknown kind")?;
                let version = value
                    .get("apiVersion")
                    .and_then(|v| v.as_str())
                    .unwrap_or_default();
                if version != resource.api_version {
                    return Err(format!(
                        "apiVersion {} is not {}",
                        crate::proto::shown(version),
                        resource.api_version
                    ));
                }
                Ok(vec![object])
            }
            Down::Delete(d) => {
                let object = d.object.clone().ok_or("delete names no object")?;
                check_object(&object)?;
                Ok(vec![object])
            }
            Down::CancelBuild(c) => {
                check_cancel(c)?;
                Ok(vec![ObjectRef::new("AppBuild", &c.namespace, &c.build)])
            }
            Down::SetConfig(c) => {
                crate::proto::check_set_config(c)?;
                Ok(vec![ObjectRef::new("App", &c.namespace, &c.app)])
            }
            Down::Sync(s) => {
                check_prune_options(s)?;
                let mut objects = Vec::new();
                let mut wanted = HashSet::new();
                for manifest in &s.manifests {
                    if let Ok((object, _)) = check_manifest(manifest) {
                        wanted.insert(object_key(&object));
                        objects.push(object);
                    }
                }
                if let Some(scope) = s.prune_scope.as_ref().filter(|s| !scope_is_empty(Some(s))) {
                    // What the cluster has: valid names, some in scope.
                    let managed: Vec<ObjectRef> = scope
                        .projects
                        .iter()
                        .filter(|p| crate::proto::is_dns_label(p))
                        .flat_map(|p| [ObjectRef::new("Project", "", p), ObjectRef::new("App", p, "web")])
                        .chain([ObjectRef::new("Project", "", "other")])
                        .collect();
                    let remove = prune::plan(scope, &managed, &wanted, s.prune_max_percent, s.force)?;
                    objects.extend(remove);
                }
                Ok(objects)
            }
            Down::StartAppLogs(start) => {
                crate::proto::check_app_logs(start)?;
                // Its names become a label selector in that App's namespace.
                Ok(vec![ObjectRef::new("App", &start.namespace, &start.app)])
            }
            Down::HelloAck(_) | Down::Heartbeat(_) | Down::Ack(_) | Down::StopAppLogs(_) => Ok(Vec::new()),
        }
    }

    fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
        let Ok(message) = ServerMessage::decode(bytes) else {
            // The gRPC layer ends the stream with a Status; nothing is executed.
            return Ok(());
        };
        let Some(body) = message.body else {
            // Answered "unknown command" by the tunnel.
            return Ok(());
        };
        let outcome = before_any_request(&body);
        match outcome {
            Ok(objects) => {
                for object in objects {
                    prop_assert!(check_object(&object).is_ok(), "a request for {:?}", object);
                }
            }
            Err(reason) => prop_assert!(
                reason.chars().count() < 1200,
                "a short reason for {}: {} chars: {}",
                crate::proto::command_capability(&body).unwrap_or("?"),
                reason.chars().count(),
                reason.chars().take(300).collect::<String>()
            ),
        }
        Ok(())
    }

    fn hostile() -> BoxedStrategy<String> {
        prop_oneof![
            any::<String>(),
            Just(String::new()),
            Just("x".repeat(70_000)),
            "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?",
            "[a-zA-Z0-9./?#% _-]{0,70}",
            Just("../web".to_string()),
            Just("kube-system".to_string()),
        ]
        .boxed()
    }

    /// Manifests: arbitrary text, YAML and JSON of each kind with hostile names, deep
    /// nesting, alias bombs, several documents.
    fn manifest() -> BoxedStrategy<String> {
        let kinds = proptest::sample::select(vec![
            "Project",
            "App",
            "AppBuild",
            "AppRun",
            "BackingService",
            "Team",
            "ConfigMap",
            "",
        ]);
        prop_oneof![
            hostile(),
            (kinds.clone(), hostile(), hostile()).prop_map(|(kind, name, namespace)| format!(
                "apiVersion: apps.shapeblock.io/v1alpha1\nkind: {kind}\nmetadata:\n  name: {name:?}\n  namespace: {namespace:?}\nspec: {{}}\n"
            )),
            (kinds, hostile(), hostile()).prop_map(|(kind, name, namespace)| serde_json::json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": kind,
                "metadata": {"name": name, "namespace": namespace}, "spec": {"x": [1, {"y": null}]}
            }).to_string()),
            (1..5000usize).prop_map(|depth| format!("{}{}", "[".repeat(depth), "]".repeat(depth))),
            (1..5000usize).prop_map(|depth| "a:\n".to_string() + &"  - ".repeat(depth)),
            Just("a: &a [*a, *a, *a, *a, *a, *a, *a, *a]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a]\nc: [*b, *b, *b, *b, *b, *b, *b, *b]\n".to_string()),
            Just("apiVersion: apps.shapeblock.io/v1alpha1\nkind: Project\nmetadata: {name: a}\n---\nkind: App\n".to_string()),
            Just("apiVersion: apps.shapeblock.io/v1alpha1\nkind: Project\nmetadata: {name: 1e999}\n".to_string()),
            Just("!!binary AAAA".to_string()),
        ]
        .boxed()
    }

    fn body() -> BoxedStrategy<Down> {
        let names = || proptest::collection::vec(hostile(), 0..4);
        prop_oneof![
            (
                hostile(),
                hostile(),
                hostile(),
                hostile(),
                proptest::option::of(any::<u32>())
            )
                .prop_map(
                    |(namespace, app, process, container, tail_lines)| Down::StartAppLogs(
                        crate::proto::v1::StartAppLogs {
                            id: 1,
                            namespace,
                            app,
                            process,
                            container,
                            since_seconds: 0,
                            tail_lines,
                        }
                    )
                ),
            manifest().prop_map(|manifest| Down::Apply(Apply { manifest })),
            proptest::option::of((hostile(), hostile(), hostile())).prop_map(|o| Down::Delete(Delete {
                object: o.map(|(k, ns, n)| ObjectRef {
                    kind: k,
                    namespace: ns,
                    name: n
                })
            })),
            (hostile(), hostile())
                .prop_map(|(namespace, build)| Down::CancelBuild(CancelBuild { namespace, build })),
            (
                proptest::collection::vec(manifest(), 0..4),
                any::<bool>(),
                proptest::option::of((names(), names(), names())),
                prop_oneof![0..120u32, any::<u32>()],
                any::<bool>()
            )
                .prop_map(|(manifests, prune, scope, prune_max_percent, force)| Down::Sync(
                    Sync {
                        manifests,
                        prune,
                        prune_scope: scope.map(|(projects, kinds, namespaces)| PruneScope {
                            projects,
                            kinds,
                            namespaces
                        }),
                        prune_max_percent,
                        force
                    }
                )),
            (
                hostile(),
                hostile(),
                proptest::collection::hash_map(hostile(), hostile(), 0..4),
                names()
            )
                .prop_map(|(namespace, app, set, unset)| Down::SetConfig(SetConfig {
                    namespace,
                    app,
                    set,
                    unset
                })),
        ]
        .boxed()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_from_a_hub_end_in_a_refusal_or_a_valid_request(
            bytes in proptest::collection::vec(any::<u8>(), 0..256)
        ) {
            check(&bytes)?;
        }

        #[test]
        fn well_formed_hostile_commands_end_in_a_refusal_or_a_valid_request(
            seq in any::<u64>(),
            body in body(),
        ) {
            check(&ServerMessage { seq, body: Some(body) }.encode_to_vec())?;
        }
    }
}
