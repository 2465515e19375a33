//! The log relay: follows every container of every build pod and one-off run pod through the
//! pod log API and hands the bytes to the tunnel as [`LogChunk`]s, in order, with offsets the
//! agent counts itself (the pod log API has none). Build and run logs work the same way; below,
//! "the owner" is the AppBuild or AppRun whose pod it is.
//!
//! - **Backpressure.** Chunks go through a small bounded channel that the tunnel drains only
//!   while its outbox has room, so a follower reads its log only as fast as the hub takes it;
//!   memory is bounded by (channel + outbox) × [`CHUNK_BYTES`] whatever the log volume.
//! - **Resume.** The hub's acknowledgements are recorded in the owner's `status.logs` (its
//!   own field manager, written at most every [`PERSIST_EVERY`] and at once when a log is
//!   complete). A restarted agent — or a follower whose stream broke — re-reads the log from
//!   the start and skips what was delivered; a few bytes may be sent twice after a restart,
//!   and the hub cuts overlaps by offset, so it stores every byte exactly once. `sinceTime`
//!   was the alternative; its one-second resolution would need de-duplication by content.
//! - **Truncation.** When a pod (and with it its log) is gone before its log was read to the
//!   end, the hub gets an explicit `truncated` marker at the offset reached.
//! - **Scrubbing.** Every line goes through [`super::scrub`] before it is counted or sent.
//! - **Letting Jobs go.** The AppBuild and AppRun controllers delete a Job only once its
//!   result is in status *and* `status.logs` says its logs are complete.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncReadExt, FutureExt, StreamExt};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::{Api, DynamicObject, LogParams, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::{Notify, mpsc};

use super::scrub::Scrubber;
use crate::api::{AppBuild, AppRun, LogDelivery};
use crate::controllers::appbuild::BUILD_LABEL;
use crate::controllers::apprun::RUN_LABEL;
use crate::controllers::{MANAGED_BY, MANAGED_BY_LABEL};
use crate::proto::LogKind;
use crate::proto::v1::LogChunk;

/// Most bytes in one chunk.
pub const CHUNK_BYTES: usize = 32 * 1024;
/// Chunks waiting for the tunnel (beyond its outbox).
const CHANNEL: usize = 8;
/// How often delivery progress is written to the owner's status while logs stream.
pub const PERSIST_EVERY: Duration = Duration::from_secs(5);
/// How often a follower looks at its pod while waiting for a container to start.
const POD_POLL: Duration = Duration::from_secs(1);
/// After a log stream ends, how many times and how often the container's state is looked at
/// before the end is taken as early (the kubelet restarted) rather than the container's.
const STATUS_LAG_LOOKS: u32 = 10;
const STATUS_LAG_POLL: Duration = Duration::from_millis(200);
/// Field manager of `status.logs`, apart from the controller's status fields.
pub const LOG_FIELD_MANAGER: &str = "shapeblock-agent-logs";

/// The kind of object whose pods' logs are relayed: the AppBuild or AppRun that owns them.
type LogOwner = LogKind;

/// The label naming the owner on its pods.
fn owner_label(owner: LogOwner) -> &'static str {
    match owner {
        LogKind::Build => BUILD_LABEL,
        LogKind::Run => RUN_LABEL,
    }
}

fn owner_resource(owner: LogOwner) -> ApiResource {
    match owner {
        LogKind::Build => ApiResource::erase::<AppBuild>(&()),
        LogKind::Run => ApiResource::erase::<AppRun>(&()),
    }
}

/// Owner kind, namespace, name.
type OwnerKey = (LogOwner, String, String);

#[derive(Default)]
struct Progress {
    /// Delivery per owner, per container, as acknowledged by the hub.
    owners: HashMap<OwnerKey, HashMap<String, LogDelivery>>,
    /// Owners whose progress changed since it was last written.
    dirty: HashSet<OwnerKey>,
}

pub struct LogRelay {
    client: Client,
    tx: mpsc::Sender<LogChunk>,
    rx: tokio::sync::Mutex<mpsc::Receiver<LogChunk>>,
    progress: Mutex<Progress>,
    persist_now: Notify,
    /// Pods being followed or already done (until they are deleted).
    pods: Mutex<HashSet<String>>,
}

impl LogRelay {
    /// Starts watching build and run pods; followers run until `shutdown`.
    pub fn start(
        client: Client,
        shutdown: impl std::future::Future<Output = ()> + Send + Clone + 'static,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let relay = Arc::new(Self {
            client,
            tx,
            rx: tokio::sync::Mutex::new(rx),
            progress: Mutex::default(),
            persist_now: Notify::new(),
            pods: Mutex::default(),
        });
        for owner in LogKind::ALL {
            let watch = relay.clone();
            let stop = shutdown.clone();
            let followers = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop => {}
                    _ = watch.watch_pods(owner, followers) => {}
                }
            });
        }
        let persist = relay.clone();
        tokio::spawn(async move { persist.persist_loop().await });
        relay
    }

    /// The next chunk (waits for one). Cancel-safe: `recv` is, and a cancelled lock wait
    /// takes nothing.
    pub async fn next(&self) -> LogChunk {
        let mut rx = self.rx.lock().await;
        match rx.recv().await {
            Some(chunk) => chunk,
            // The relay lives as long as the agent; never reached while it runs.
            None => std::future::pending().await,
        }
    }

    /// The hub durably recorded `chunk`.
    pub fn delivered(&self, chunk: &LogChunk) {
        let Some(owner) = LogKind::of(&chunk.kind) else {
            return; // never sent: the relay makes only chunks of its own kinds
        };
        let key = (owner, chunk.namespace.clone(), chunk.build.clone());
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let entry = progress
            .owners
            .entry(key.clone())
            .or_default()
            .entry(chunk.container.clone())
            .or_insert_with(|| LogDelivery {
                container: chunk.container.clone(),
                ..Default::default()
            });
        entry.bytes = entry.bytes.max(chunk.offset + chunk.data.len() as u64);
        let ends = chunk.eof || chunk.truncated;
        entry.complete |= ends;
        entry.truncated |= chunk.truncated;
        progress.dirty.insert(key);
        // A completed log lets its Job go: written at once, not at the next tick.
        if ends {
            drop(progress);
            self.persist_now.notify_one();
        }
    }

    async fn watch_pods(
        self: Arc<Self>,
        owner: LogOwner,
        shutdown: impl std::future::Future<Output = ()> + Send + Clone + 'static,
    ) {
        let pods: Api<Pod> = Api::all(self.client.clone());
        let config = watcher::Config::default()
            .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY},{}", owner_label(owner)));
        let mut events = watcher(pods, config).boxed();
        let mut listed: HashSet<OwnerKey> = HashSet::new();
        while let Some(event) = events.next().await {
            let pod = match event {
                Ok(watcher::Event::Init) => {
                    listed.clear();
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    let relay = self.clone();
                    let with_pods = std::mem::take(&mut listed);
                    tokio::spawn(async move { relay.truncate_orphans(owner, with_pods).await });
                    continue;
                }
                Ok(watcher::Event::InitApply(pod)) => {
                    let name = pod.labels().get(owner_label(owner)).cloned().unwrap_or_default();
                    listed.insert((owner, pod.namespace().unwrap_or_default(), name));
                    pod
                }
                Ok(watcher::Event::Apply(pod)) => pod,
                Ok(watcher::Event::Delete(pod)) => {
                    let uid = pod.uid().unwrap_or_default();
                    self.pods.lock().unwrap_or_else(|e| e.into_inner()).remove(&uid);
                    continue;
                }
                Err(err) => {
                    tracing::warn!(%err, kind = owner.name(), "watching pods for their logs");
                    continue;
                }
            };
            let uid = pod.uid().unwrap_or_default();
            if !self.pods.lock().unwrap_or_else(|e| e.into_inner()).insert(uid) {
                continue;
            }
            let relay = self.clone();
            let stop = shutdown.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = stop => {}
                    _ = relay.follow_pod(owner, pod) => {}
                }
            });
        }
    }

    /// Logs that were being relayed when the agent stopped and whose pods are gone now (say,
    /// evicted or deleted meanwhile): the hub gets a truncation marker where delivery stopped,
    /// rather than a log that silently never ends.
    async fn truncate_orphans(&self, owner: LogOwner, with_pods: HashSet<OwnerKey>) {
        let objects = match Api::<DynamicObject>::all_with(self.client.clone(), &owner_resource(owner))
            .list(&Default::default())
            .await
        {
            Ok(objects) => objects,
            Err(err) => {
                tracing::warn!(%err, kind = owner.name(), "cannot list them to find logs left unfinished");
                return;
            }
        };
        for object in objects {
            let key = (owner, object.namespace().unwrap_or_default(), object.name_any());
            if with_pods.contains(&key) {
                continue;
            }
            for delivery in deliveries(&object).into_iter().filter(|d| !d.complete) {
                tracing::info!(kind = owner.name(), namespace = %key.1, name = %key.2, container = %delivery.container, offset = delivery.bytes, "pod gone while the agent was away: telling the hub its log is truncated");
                let chunk = LogChunk {
                    kind: owner.name().into(),
                    build: key.2.clone(),
                    namespace: key.1.clone(),
                    container: delivery.container,
                    offset: delivery.bytes,
                    truncated: true,
                    ..Default::default()
                };
                if self.tx.send(chunk).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Relays every container of one pod, init containers first (they run first).
    async fn follow_pod(self: Arc<Self>, owner: LogOwner, pod: Pod) {
        let namespace = pod.namespace().unwrap_or_default();
        let Some(name) = pod.labels().get(owner_label(owner)).cloned() else {
            return;
        };
        let key = (owner, namespace.clone(), name.clone());
        let spec = pod.spec.clone().unwrap_or_default();
        let containers: Vec<String> = spec
            .init_containers
            .unwrap_or_default()
            .into_iter()
            .chain(spec.containers)
            .map(|c| c.name)
            .collect();
        let delivered = match self.recorded(&key).await {
            Ok(delivered) => delivered,
            Err(err) => {
                tracing::warn!(kind = owner.name(), %namespace, %name, %err, "cannot read its log progress; relaying from the start");
                HashMap::new()
            }
        };
        for container in containers {
            let done = delivered.get(&container);
            if done.is_some_and(|d| d.complete) {
                continue;
            }
            let follower = Follower {
                relay: &self,
                pods: Api::namespaced(self.client.clone(), &namespace),
                pod: pod.name_any(),
                chunk: LogChunk {
                    kind: owner.name().into(),
                    build: name.clone(),
                    namespace: namespace.clone(),
                    container: container.clone(),
                    ..Default::default()
                },
                skip: done.map_or(0, |d| d.bytes),
            };
            if follower.run().await.is_err() {
                return; // the tunnel is gone: the agent is stopping
            }
        }
    }

    /// What `status.logs` of the owner says was delivered (and seeds the progress with it, so
    /// the next write keeps those entries).
    async fn recorded(&self, key: &OwnerKey) -> Result<HashMap<String, LogDelivery>, kube::Error> {
        let (owner, namespace, name) = key;
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), namespace, &owner_resource(*owner));
        let recorded: HashMap<String, LogDelivery> = api
            .get_opt(name)
            .await?
            .map(|o| deliveries(&o))
            .unwrap_or_default()
            .into_iter()
            .map(|d| (d.container.clone(), d))
            .collect();
        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let known = progress.owners.entry(key.clone()).or_default();
        for (container, delivery) in &recorded {
            known.entry(container.clone()).or_insert_with(|| delivery.clone());
        }
        Ok(recorded)
    }

    async fn persist_loop(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.persist_now.notified() => {}
                _ = tokio::time::sleep(PERSIST_EVERY) => {}
            }
            self.persist().await;
        }
    }

    /// Writes the delivery progress of every owner that changed.
    async fn persist(&self) {
        let dirty: Vec<OwnerKey> = {
            let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            progress.dirty.drain().collect()
        };
        for key in dirty {
            let (owner, namespace, name) = &key;
            // Server-side apply removes list entries this manager no longer applies: merge
            // what is recorded (say, another pod's log, finished and dropped from memory)
            // before writing.
            if let Err(err) = self.recorded(&key).await {
                tracing::warn!(kind = owner.name(), %namespace, %name, %err, "cannot read log delivery; retrying");
                let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                progress.dirty.insert(key);
                continue;
            }
            let logs: Vec<LogDelivery> = {
                let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                let mut logs: Vec<LogDelivery> = progress
                    .owners
                    .get(&key)
                    .map(|m| m.values().cloned().collect())
                    .unwrap_or_default();
                logs.sort_by(|a, b| a.container.cmp(&b.container));
                logs
            };
            let complete = logs.iter().all(|l| l.complete);
            let resource = owner_resource(*owner);
            let api: Api<DynamicObject> = Api::namespaced_with(self.client.clone(), namespace, &resource);
            let patch = json!({
                "apiVersion": resource.api_version,
                "kind": resource.kind,
                "status": {"logs": logs},
            });
            match api
                .patch_status(
                    name,
                    &PatchParams::apply(LOG_FIELD_MANAGER).force(),
                    &Patch::Apply(patch),
                )
                .await
            {
                Ok(_) => {
                    // Once every log of an owner is complete the entry is not needed in memory.
                    if complete {
                        let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                        if !progress.dirty.contains(&key) {
                            progress.owners.remove(&key);
                        }
                    }
                }
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                    progress.owners.remove(&key);
                }
                Err(err) => {
                    tracing::warn!(kind = owner.name(), %namespace, %name, %err, "cannot record log delivery; retrying");
                    let mut progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                    progress.dirty.insert(key.clone());
                }
            }
        }
    }
}

/// What an owner's `status.logs` records.
fn deliveries(object: &DynamicObject) -> Vec<LogDelivery> {
    object
        .data
        .pointer("/status/logs")
        .cloned()
        .and_then(|logs| serde_json::from_value(logs).ok())
        .unwrap_or_default()
}

/// The tunnel side of the channel is gone.
struct Closed;

/// Follows one container's log to its end.
struct Follower<'a> {
    relay: &'a LogRelay,
    pods: Api<Pod>,
    pod: String,
    /// Template: kind, owner name, namespace, container.
    chunk: LogChunk,
    /// Scrubbed bytes already delivered (or queued): re-read, not re-sent.
    skip: u64,
}

/// Where a container is, as far as reading its log goes.
enum State {
    /// Not started yet: its log does not exist.
    Waiting,
    /// Running or finished: its log can be read.
    Readable { finished: bool },
    /// Will never run (the pod ended first): an empty log.
    NeverRan,
    /// The pod is gone, and its logs with it.
    Gone,
}

impl Follower<'_> {
    async fn run(mut self) -> Result<(), Closed> {
        loop {
            match self.state().await {
                State::Waiting => tokio::time::sleep(POD_POLL).await,
                State::Gone => return self.send_end(false, true).await,
                State::NeverRan => return self.send_end(true, false).await,
                State::Readable { .. } => {
                    match self.read_once().await? {
                        // The log was read to its end and the container had finished.
                        true => return self.send_end(true, false).await,
                        // The stream ended early (apiserver or kubelet restart): read again.
                        false => tokio::time::sleep(POD_POLL).await,
                    }
                }
            }
        }
    }

    /// Reads the log from the start, sending what is past `skip`. True if it ended with the
    /// container finished (so everything was read).
    async fn read_once(&mut self) -> Result<bool, Closed> {
        let params = LogParams {
            container: Some(self.chunk.container.clone()),
            follow: true,
            ..LogParams::default()
        };
        let mut stream = match self.pods.log_stream(&self.pod, &params).await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(pod = %self.pod, container = %self.chunk.container, %err, "opening a log");
                return Ok(false);
            }
        };
        let mut scrubber = Scrubber::default();
        let mut produced = 0u64;
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut out = Vec::with_capacity(CHUNK_BYTES);
        loop {
            let mut read = match stream.read(&mut buffer).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) => {
                    tracing::debug!(pod = %self.pod, container = %self.chunk.container, %err, "log stream broke");
                    return Ok(false);
                }
            };
            // A read returns one HTTP/2 frame or one kubelet write, often a few KiB: take what
            // has already arrived too, so a backlog travels in full chunks (each chunk is a
            // message, an ack and a transaction at the hub). Never waits for more: what is
            // written slowly still goes out as it comes.
            let mut broke = false;
            while read < buffer.len() {
                match stream.read(&mut buffer[read..]).now_or_never() {
                    Some(Ok(n)) if n > 0 => read += n,
                    // The end (seen again by the next read) or nothing ready yet.
                    Some(Ok(_)) | None => break,
                    Some(Err(err)) => {
                        tracing::debug!(pod = %self.pod, container = %self.chunk.container, %err, "log stream broke");
                        broke = true;
                        break;
                    }
                }
            }
            out.clear();
            scrubber.push(&buffer[..read], &mut out);
            produced = self.send_new(produced, &out).await?;
            if broke {
                return Ok(false);
            }
        }
        // The stream ended: complete only if the container has stopped (its last lines were
        // written before the kubelet closed the stream). Its status may say so a moment after
        // the stream ends: looked at for a while before taking the end as early, or a pod
        // deleted in that moment (a cancelled build) would be told as truncated.
        let mut finished = false;
        for look in 0..STATUS_LAG_LOOKS {
            if look > 0 {
                tokio::time::sleep(STATUS_LAG_POLL).await;
            }
            if matches!(
                self.state().await,
                State::Readable { finished: true } | State::Gone
            ) {
                finished = true;
                break;
            }
        }
        if finished {
            out.clear();
            scrubber.finish(&mut out);
            self.send_new(produced, &out).await?;
        }
        Ok(finished)
    }

    /// Sends the part of `bytes` (which start at scrubbed offset `at`) beyond `skip`; returns
    /// the offset after them.
    async fn send_new(&mut self, at: u64, bytes: &[u8]) -> Result<u64, Closed> {
        let end = at + bytes.len() as u64;
        if end > self.skip {
            let from = self.skip.saturating_sub(at) as usize;
            for piece in bytes[from..].chunks(CHUNK_BYTES) {
                self.send(LogChunk {
                    offset: self.skip,
                    data: piece.to_vec(),
                    ..self.chunk.clone()
                })
                .await?;
                self.skip += piece.len() as u64;
            }
        }
        Ok(end)
    }

    async fn send_end(&mut self, eof: bool, truncated: bool) -> Result<(), Closed> {
        if truncated {
            tracing::info!(pod = %self.pod, container = %self.chunk.container, offset = self.skip, "pod gone before its log was read to the end: telling the hub");
        }
        self.send(LogChunk {
            offset: self.skip,
            eof,
            truncated,
            ..self.chunk.clone()
        })
        .await
    }

    async fn send(&self, chunk: LogChunk) -> Result<(), Closed> {
        self.relay.tx.send(chunk).await.map_err(|_| Closed)
    }

    async fn state(&self) -> State {
        match self.pods.get_opt(&self.pod).await {
            Ok(Some(pod)) => container_state(&pod, &self.chunk.container),
            Ok(None) => State::Gone,
            // Cannot tell: treat as not yet readable and look again.
            Err(_) => State::Waiting,
        }
    }
}

fn container_state(pod: &Pod, container: &str) -> State {
    let status = pod.status.clone().unwrap_or_default();
    let pod_ended = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let statuses: Vec<ContainerStatus> = status
        .init_container_statuses
        .unwrap_or_default()
        .into_iter()
        .chain(status.container_statuses.unwrap_or_default())
        .collect();
    let Some(state) = statuses
        .iter()
        .find(|s| s.name == container)
        .and_then(|s| s.state.clone())
    else {
        return if pod_ended {
            State::NeverRan
        } else {
            State::Waiting
        };
    };
    if state.terminated.is_some() {
        State::Readable { finished: true }
    } else if state.running.is_some() {
        State::Readable { finished: pod_ended }
    } else if pod_ended || pod.metadata.deletion_timestamp.is_some() {
        State::NeverRan
    } else {
        State::Waiting
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(phase: &str, init: serde_json::Value, main: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": "p"},
            "status": {
                "phase": phase,
                "initContainerStatuses": [{"name": "clone", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": init}],
                "containerStatuses": [{"name": "build", "image": "i", "imageID": "", "ready": false, "restartCount": 0, "state": main}],
            }
        }))
        .unwrap()
    }

    #[test]
    fn container_states_decide_when_a_log_can_be_read() {
        let running = json!({"running": {}});
        let done = json!({"terminated": {"exitCode": 0}});
        let waiting = json!({"waiting": {"reason": "PodInitializing"}});
        let p = pod("Pending", running.clone(), waiting.clone());
        assert!(matches!(
            container_state(&p, "clone"),
            State::Readable { finished: false }
        ));
        assert!(matches!(container_state(&p, "build"), State::Waiting));
        let p = pod("Running", done.clone(), running);
        assert!(matches!(
            container_state(&p, "clone"),
            State::Readable { finished: true }
        ));
        // A failed clone: the build container never runs, its log is empty and complete.
        let p = pod("Failed", json!({"terminated": {"exitCode": 1}}), waiting);
        assert!(matches!(container_state(&p, "build"), State::NeverRan));
        assert!(matches!(container_state(&p, "other"), State::NeverRan));
    }
}
