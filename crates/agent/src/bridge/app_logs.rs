//! Live logs of an App's running pods (`heroku logs --tail`), for as long as the hub asks
//! (`StartAppLogs` .. `StopAppLogs`, or the session's end). Unlike the build-log relay
//! ([`super::logs`]) nothing is acknowledged, persisted or resent: a live follow is as
//! ephemeral as the caller at the hub, so a broken session just ends it.
//!
//! - **Which pods.** Those of the App's process Deployments in a project namespace, selected by
//!   the labels the chart gives them (`apps.shapeblock.io/app`, and `apps.shapeblock.io/process`
//!   which only process pods carry, so build, run and release-command pods stay out). The pods
//!   are watched, so a rollout's new pods are followed as they come; each pod's container is a
//!   substream with its own offsets, counted in scrubbed bytes from where the follow started.
//! - **Bounded.** At most [`MAX_FOLLOWS`] follows, [`MAX_SUBSTREAMS`] substreams each, and a
//!   byte budget per follow ([`Budget`]). What exceeds the budget, or finds the channel to the
//!   tunnel full, is dropped and the hub gets a truncation marker saying how many bytes, so
//!   nothing is buffered beyond one read per substream.
//! - **Scrubbed** line by line by [`super::scrub`], as build logs are, before anything is
//!   counted or sent.
//! - **RBAC**: pods get/list/watch and `pods/log` get, which the build-log relay needs anyway.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{AsyncReadExt, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, LogParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::logs::CHUNK_BYTES;
use super::scrub::Scrubber;
use crate::controllers::APP_LABEL;
use crate::controllers::deploy::PROCESS_LABEL;
use crate::proto::v1::{AppLogChunk, StartAppLogs};
use crate::proto::{DEFAULT_TAIL_LINES, check_app_logs};

/// Live follows served at once (across every caller at the hub).
pub const MAX_FOLLOWS: usize = 8;
/// Pod containers one follow reads at once; pods beyond it are not followed.
pub const MAX_SUBSTREAMS: usize = 64;
/// KiB per second one follow may send by default (`--app-logs-kib-per-second`), after a
/// burst of [`BURST_SECONDS`] of it.
pub const DEFAULT_RATE_KIB: u64 = 512;
pub const BURST_SECONDS: u64 = 4;

/// How live follows are bounded and counted.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Bytes per second per follow.
    pub rate: u64,
    /// Follows being served (`shapeblock_app_log_streams`).
    pub streams: Gauge,
}

impl Limits {
    /// The burst: a few seconds of the rate, and never less than two reads.
    fn burst(&self) -> u64 {
        self.rate
            .saturating_mul(BURST_SECONDS)
            .max(2 * CHUNK_BYTES as u64)
    }
}
/// Chunks waiting for the tunnel, over every follow.
const CHANNEL: usize = 64;
/// How often a substream looks at its pod while the container has not started (or restarts).
const POD_POLL: Duration = Duration::from_secs(1);
/// How often a substream that dropped bytes tells the hub, when no bytes come after them.
const MARKER_EVERY: Duration = Duration::from_secs(1);
/// How long a deleted pod's substream keeps reading the last lines its container writes.
const GONE_GRACE: Duration = Duration::from_secs(2);

/// A token bucket: `rate` bytes a second, up to `burst` saved up. Pure (the caller passes the
/// time), so its bound is testable without a clock.
#[derive(Debug)]
pub struct Budget {
    rate: u64,
    burst: u64,
    tokens: u64,
    at: Instant,
}

impl Budget {
    pub fn new(rate: u64, burst: u64, now: Instant) -> Self {
        Self {
            rate,
            burst,
            tokens: burst,
            at: now,
        }
    }

    /// Takes `n` bytes if the budget has them at `now`; false (and nothing taken) if not.
    pub fn take(&mut self, n: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at);
        let earned = (elapsed.as_nanos().saturating_mul(u128::from(self.rate)) / 1_000_000_000)
            .min(u128::from(u64::MAX)) as u64;
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(self.burst);
            // Only the time that earned whole bytes is used up: short steps add up.
            let used = u128::from(earned) * 1_000_000_000 / u128::from(self.rate.max(1));
            self.at += Duration::from_nanos(used.min(u128::from(u64::MAX)) as u64);
            if self.tokens == self.burst {
                self.at = now;
            }
        }
        if n <= self.tokens {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

struct Follow {
    /// Aborts the follow's task (and with it every substream) when dropped.
    task: tokio::task::AbortHandle,
}

impl Drop for Follow {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub struct AppLogs {
    client: Client,
    agent_namespace: String,
    tx: mpsc::Sender<AppLogChunk>,
    rx: tokio::sync::Mutex<mpsc::Receiver<AppLogChunk>>,
    follows: Mutex<HashMap<u64, Follow>>,
    limits: Limits,
}

/// Counts one follow while its task lives (also when it is aborted: the future is dropped).
struct Counted(Gauge);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl AppLogs {
    pub fn new(client: Client, agent_namespace: &str, limits: Limits) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(CHANNEL);
        Arc::new(Self {
            client,
            agent_namespace: agent_namespace.to_string(),
            tx,
            rx: tokio::sync::Mutex::new(rx),
            follows: Mutex::default(),
            limits,
        })
    }

    fn follows(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Follow>> {
        self.follows.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next chunk of a follow still running (waits for one). Cancel-safe.
    pub async fn next(&self) -> AppLogChunk {
        let mut rx = self.rx.lock().await;
        loop {
            let Some(chunk) = rx.recv().await else {
                return std::future::pending().await;
            };
            // A follow stopped after this was queued: its caller is gone.
            if !chunk.ended.is_empty() || self.follows().contains_key(&chunk.id) {
                return chunk;
            }
        }
    }

    pub fn start(self: &Arc<Self>, start: StartAppLogs) {
        let id = start.id;
        let refuse = |why: String, exhausted: bool| {
            tracing::info!(id, reason = %why, "live log follow refused");
            let _ = self.tx.try_send(AppLogChunk {
                id,
                ended: why,
                exhausted,
                ..Default::default()
            });
        };
        if let Err(why) = check_app_logs(&start) {
            return refuse(why, false);
        }
        let mut follows = self.follows();
        if follows.contains_key(&id) {
            return; // the hub said it twice
        }
        if follows.len() >= MAX_FOLLOWS {
            drop(follows);
            return refuse(
                format!("this agent serves at most {MAX_FOLLOWS} live log follows at once"),
                true,
            );
        }
        self.limits.streams.inc();
        let counted = Counted(self.limits.streams.clone());
        let this = self.clone();
        let task = tokio::spawn(async move {
            let _counted = counted;
            let why = this.follow(&start).await;
            tracing::info!(id, namespace = %start.namespace, app = %start.app, reason = %why, "live log follow ended at the agent");
            let _ = this.tx.try_send(AppLogChunk {
                id,
                ended: why,
                ..Default::default()
            });
            this.follows().remove(&id);
        });
        tracing::info!(id, "live log follow started");
        follows.insert(
            id,
            Follow {
                task: task.abort_handle(),
            },
        );
    }

    pub fn stop(&self, id: u64) {
        if self.follows().remove(&id).is_some() {
            tracing::info!(id, "live log follow stopped by the hub");
        }
    }

    /// The session ended: so did every follow it asked for.
    pub fn stop_all(&self) {
        let stopped = std::mem::take(&mut *self.follows());
        if !stopped.is_empty() {
            tracing::info!(follows = stopped.len(), "session ended: live log follows stopped");
        }
    }

    /// Runs one follow until its pods can no longer be watched; the reason.
    async fn follow(self: &Arc<Self>, start: &StartAppLogs) -> String {
        if let Err(why) = self.project_namespace(&start.namespace).await {
            return why;
        }
        let mut selector = format!("{APP_LABEL}={},{PROCESS_LABEL}", start.app);
        if !start.process.is_empty() {
            selector = format!("{APP_LABEL}={},{PROCESS_LABEL}={}", start.app, start.process);
        }
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &start.namespace);
        let mut events = watcher(pods.clone(), watcher::Config::default().labels(&selector))
            .default_backoff()
            .boxed();
        let budget = Arc::new(Mutex::new(Budget::new(
            self.limits.rate,
            self.limits.burst(),
            Instant::now(),
        )));
        let mut substreams = JoinSet::new();
        // Pods being followed, by uid, with what tells their substreams the pod was deleted.
        let mut followed: HashMap<String, watch::Sender<bool>> = HashMap::new();
        let mut listed = false;
        let mut skipped: HashSet<String> = HashSet::new();
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                Some(_) = substreams.join_next(), if !substreams.is_empty() => continue,
            };
            let Some(event) = event else {
                return "the pod watch ended".into();
            };
            let (pod, existing) = match event {
                Ok(watcher::Event::Init) => continue,
                Ok(watcher::Event::InitDone) => {
                    listed = true;
                    continue;
                }
                Ok(watcher::Event::InitApply(pod)) => (pod, !listed),
                Ok(watcher::Event::Apply(pod)) => (pod, false),
                Ok(watcher::Event::Delete(pod)) => {
                    if let Some(gone) = followed.remove(&pod.uid().unwrap_or_default()) {
                        let _ = gone.send(true);
                    }
                    continue;
                }
                Err(err) => {
                    tracing::debug!(%err, "watching an App's pods for live logs");
                    continue;
                }
            };
            let uid = pod.uid().unwrap_or_default();
            if followed.contains_key(&uid) || skipped.contains(&uid) {
                continue;
            }
            let process = pod.labels().get(PROCESS_LABEL).cloned().unwrap_or_default();
            let containers: Vec<String> = pod
                .spec
                .iter()
                .flat_map(|s| s.containers.iter().map(|c| c.name.clone()))
                .filter(|c| start.container.is_empty() || *c == start.container)
                .collect();
            if substreams.len() + containers.len() > MAX_SUBSTREAMS {
                tracing::info!(pod = %pod.name_any(), "a live log follow reads {MAX_SUBSTREAMS} pod containers already: not this pod");
                skipped.insert(uid);
                continue;
            }
            let (gone, gone_rx) = watch::channel(false);
            followed.insert(uid, gone);
            // Pods that were there when the follow started get the tail the caller asked for;
            // later ones (a rollout's) are new, so all of their log is.
            let (tail, since) = if existing {
                (
                    Some(start.tail_lines.unwrap_or(DEFAULT_TAIL_LINES)),
                    start.since_seconds,
                )
            } else {
                (None, 0)
            };
            for container in containers {
                let substream = Substream {
                    logs: self.clone(),
                    pods: pods.clone(),
                    pod: pod.name_any(),
                    chunk: AppLogChunk {
                        id: start.id,
                        pod: pod.name_any(),
                        container,
                        process: process.clone(),
                        ..Default::default()
                    },
                    budget: budget.clone(),
                    dropped: 0,
                    gone: gone_rx.clone(),
                };
                substreams.spawn(substream.run(tail, since));
            }
        }
    }

    /// Live logs only of namespaces the agent made for a Project (never its own, nor a
    /// tenant's other namespaces).
    async fn project_namespace(&self, namespace: &str) -> Result<(), String> {
        if namespace == self.agent_namespace {
            return Err(format!(
                "namespace {namespace} is the agent's own namespace, not a ShapeBlock project namespace"
            ));
        }
        match Api::<Namespace>::all(self.client.clone())
            .get_metadata_opt(namespace)
            .await
        {
            Ok(Some(ns)) if super::is_project_namespace(&ns.metadata) => Ok(()),
            Ok(Some(_)) => Err(format!(
                "namespace {namespace} is not a ShapeBlock project namespace"
            )),
            Ok(None) => Err(format!("namespace {namespace} does not exist")),
            Err(e) => Err(format!(
                "cannot read namespace {namespace}: {}",
                super::kube_message(&e)
            )),
        }
    }
}

/// One pod container's live log.
struct Substream {
    logs: Arc<AppLogs>,
    pods: Api<Pod>,
    pod: String,
    /// Template: id, pod, container, process; `offset` is where the substream is.
    chunk: AppLogChunk,
    budget: Arc<Mutex<Budget>>,
    /// Bytes dropped at `chunk.offset - dropped` and not yet reported.
    dropped: u64,
    gone: watch::Receiver<bool>,
}

impl Substream {
    async fn run(mut self, mut tail: Option<u32>, mut since: u32) {
        let mut broke_at: Option<Instant> = None;
        loop {
            match self.state().await {
                Readable::Gone => break,
                Readable::NotYet => {
                    tokio::time::sleep(POD_POLL).await;
                    continue;
                }
                Readable::Yes => {}
            }
            let mut params = LogParams {
                container: Some(self.chunk.container.clone()),
                follow: true,
                tail_lines: tail.map(i64::from),
                since_seconds: (since > 0).then_some(i64::from(since)),
                ..LogParams::default()
            };
            // Reopened after a break (an apiserver restart, a container restart): from a
            // little before the break, so that a line or two may come twice and none is lost.
            if let Some(at) = broke_at {
                params.tail_lines = None;
                params.since_seconds = Some(at.elapsed().as_secs() as i64 + 1);
            }
            self.read(&params).await;
            tail = None;
            since = 0;
            broke_at = Some(Instant::now());
            if *self.gone.borrow() {
                break;
            }
            tokio::time::sleep(POD_POLL).await;
        }
        self.flush_dropped();
        let end = AppLogChunk {
            eof: true,
            ..self.chunk.clone()
        };
        let _ = self.logs.tx.send(end).await;
    }

    /// Reads one log stream until it ends, or until a while after the pod was deleted.
    async fn read(&mut self, params: &LogParams) {
        let mut stream = match self.pods.log_stream(&self.pod, params).await {
            Ok(stream) => stream,
            Err(err) => {
                tracing::debug!(pod = %self.pod, container = %self.chunk.container, %err, "opening a live log");
                return;
            }
        };
        let mut gone = self.gone.clone();
        let deadline = async move {
            let _ = gone.wait_for(|g| *g).await;
            tokio::time::sleep(GONE_GRACE).await;
        };
        tokio::pin!(deadline);
        let mut scrubber = Scrubber::default();
        let mut buffer = vec![0u8; CHUNK_BYTES];
        let mut out = Vec::with_capacity(CHUNK_BYTES);
        // A run of dropped bytes is told when the next bytes are sent, or at the next tick
        // when nothing more comes (a burst followed by silence).
        let mut tick = tokio::time::interval(MARKER_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let read = tokio::select! {
                read = stream.read(&mut buffer) => read,
                _ = &mut deadline => break,
                _ = tick.tick() => {
                    self.flush_dropped();
                    continue;
                }
            };
            match read {
                Ok(0) => break,
                Ok(n) => {
                    out.clear();
                    scrubber.push(&buffer[..n], &mut out);
                    self.offer(&out);
                }
                Err(err) => {
                    tracing::debug!(pod = %self.pod, container = %self.chunk.container, %err, "live log stream broke");
                    break;
                }
            }
        }
        out.clear();
        scrubber.finish(&mut out);
        self.offer(&out);
    }

    /// Sends `bytes` if the budget and the channel have room for them, else drops them (and
    /// says so before the next bytes that are sent).
    fn offer(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let n = bytes.len() as u64;
        let affordable = self
            .budget
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(n, Instant::now());
        // Room for the data and, when some were dropped before, its marker first.
        let needed = if self.dropped > 0 { 2 } else { 1 };
        let logs = self.logs.clone();
        let permits = if affordable {
            logs.tx.try_reserve_many(needed).ok()
        } else {
            None
        };
        match permits {
            Some(mut permits) => {
                if self.dropped > 0
                    && let Some(permit) = permits.next()
                {
                    permit.send(self.marker());
                }
                if let Some(permit) = permits.next() {
                    permit.send(AppLogChunk {
                        data: bytes.to_vec(),
                        ..self.chunk.clone()
                    });
                }
            }
            None => self.dropped += n,
        }
        self.chunk.offset += n;
    }

    /// The truncation marker of what was dropped, and the count starts over.
    fn marker(&mut self) -> AppLogChunk {
        let marker = AppLogChunk {
            offset: self.chunk.offset - self.dropped,
            truncated: true,
            dropped: self.dropped,
            ..self.chunk.clone()
        };
        tracing::debug!(pod = %self.pod, container = %self.chunk.container, dropped = self.dropped, "live log bytes dropped");
        self.dropped = 0;
        marker
    }

    fn flush_dropped(&mut self) {
        let logs = self.logs.clone();
        if self.dropped > 0
            && let Ok(permit) = logs.tx.try_reserve()
        {
            permit.send(self.marker());
        }
    }

    async fn state(&self) -> Readable {
        if *self.gone.borrow() {
            return Readable::Gone;
        }
        match self.pods.get_opt(&self.pod).await {
            Ok(None) => Readable::Gone,
            Ok(Some(pod)) => {
                let status = pod.status.clone().unwrap_or_default();
                if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
                    return Readable::Gone;
                }
                let started = status
                    .container_statuses
                    .unwrap_or_default()
                    .iter()
                    .find(|s| s.name == self.chunk.container)
                    .and_then(|s| s.state.as_ref())
                    .is_some_and(|s| s.running.is_some() || s.terminated.is_some());
                if started { Readable::Yes } else { Readable::NotYet }
            }
            Err(_) => Readable::NotYet,
        }
    }
}

enum Readable {
    Yes,
    NotYet,
    /// The pod is gone or finished: nothing more will be written.
    Gone,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_allows_a_burst_then_its_rate_and_never_more() {
        let t0 = Instant::now();
        let mut budget = Budget::new(1000, 4000, t0);
        assert!(budget.take(4000, t0), "the burst");
        assert!(!budget.take(1, t0), "nothing left at once");
        // Earned at the rate, in steps smaller than a byte's worth too.
        let mut sent = 0;
        for ms in 1..=3000u64 {
            let now = t0 + Duration::from_millis(ms);
            if budget.take(10, now) {
                sent += 10;
            }
        }
        assert!((2990..=3000).contains(&sent), "about 1000 bytes a second: {sent}");
        // Saved up to the burst, no more, however long it was idle.
        let later = t0 + Duration::from_secs(3600);
        assert!(budget.take(4000, later));
        assert!(!budget.take(1, later));
        // More than the burst never fits: it is dropped, not waited for.
        let mut budget = Budget::new(1000, 4000, t0);
        assert!(!budget.take(4001, t0 + Duration::from_secs(60)));
        assert!(budget.take(4000, t0 + Duration::from_secs(60)));
    }

    #[test]
    fn over_a_minute_a_follow_sends_at_most_its_burst_and_rate() {
        let t0 = Instant::now();
        let limits = Limits {
            rate: DEFAULT_RATE_KIB * 1024,
            streams: Gauge::default(),
        };
        let mut budget = Budget::new(limits.rate, limits.burst(), t0);
        let mut sent = 0u64;
        // A container writing 32 KiB every millisecond (32 MB/s).
        for ms in 0..60_000u64 {
            if budget.take(CHUNK_BYTES as u64, t0 + Duration::from_millis(ms)) {
                sent += CHUNK_BYTES as u64;
            }
        }
        let bound = limits.burst() + limits.rate * 60;
        assert!(
            sent <= bound && sent > bound - 2 * CHUNK_BYTES as u64,
            "{sent} of {bound}"
        );
    }
}
