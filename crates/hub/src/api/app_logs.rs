//! `FollowAppLogs`: live logs of an App's pods, relayed from the agent over the cluster's
//! session to the caller and never stored. The hub holds, per caller, a bounded channel and a
//! task that notices the caller going (or its deadline) and tells the agent to stop.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use shapeblock_proto::v1::server_message::Body as Down;
use shapeblock_proto::v1::{AppLogChunk, StartAppLogs, StopAppLogs};

use super::{Counted, v1};
use crate::Inner;

/// Messages the hub holds for a caller (each at most the agent's 32 KiB read); beyond them,
/// chunks are dropped, and a caller that leaves them unread for the watch stall is cut.
pub const BUFFER: usize = 64;
/// Live followers of one cluster at once by default (`--app-log-followers`; the agent has its
/// own limit too).
pub const MAX_PER_CLUSTER: usize = 8;
/// Starts and stops waiting for a session's outbound queue.
pub(crate) const CONTROL_QUEUE: usize = 64;

type Sender = mpsc::Sender<Result<v1::AppLogData, Status>>;

struct Follower {
    epoch: u64,
    tx: Sender,
    /// Tells the follower's task that the registry ended it, and what the caller is owed.
    done: Option<oneshot::Sender<Ending>>,
    /// Since when chunks find the buffer full.
    full_since: Option<Instant>,
    /// What was dropped for a full buffer, per (pod, container), not yet told to the caller.
    dropped: HashMap<(String, String), Dropped>,
}

/// How the registry ended a follow: the markers of what was dropped and not yet told (the
/// buffer was full), then the status. The follower's task delivers them as the caller reads,
/// so a follow never ends with a drop unsaid.
#[derive(Debug)]
pub(crate) struct Ending {
    markers: Vec<v1::AppLogData>,
    status: Status,
}

/// A run of bytes of one substream the hub dropped.
#[derive(Default)]
struct Dropped {
    /// Where the run starts, and how long it is.
    offset: u64,
    bytes: u64,
    process: String,
    /// The substream ended within the run.
    eof: bool,
}

/// Substreams with dropped runs one caller may have; more is a caller to cut.
const MAX_DROPPED_SUBSTREAMS: usize = 256;

enum Pass {
    Sent,
    /// The buffer is full: the chunk is counted as dropped.
    Dropped,
    /// Too many substreams with dropped runs to keep track of.
    TooMany,
    /// The caller went.
    Gone,
}

impl Follower {
    fn new(epoch: u64, tx: Sender, done: oneshot::Sender<Ending>) -> Self {
        Self {
            epoch,
            tx,
            done: Some(done),
            full_since: None,
            dropped: HashMap::new(),
        }
    }

    /// Sends the markers of earlier drops that fit, then `chunk` (after its substream's
    /// marker) if it fits; one slot always stays free for the status that may end the caller.
    fn pass(&mut self, chunk: AppLogChunk) -> Pass {
        if self.tx.is_closed() {
            return Pass::Gone;
        }
        let substream = (chunk.pod.clone(), chunk.container.clone());
        let waiting: Vec<(String, String)> = self
            .dropped
            .keys()
            .filter(|k| **k != substream)
            .cloned()
            .collect();
        for other in waiting {
            let Ok(mut permits) = self.tx.try_reserve_many(2) else {
                break;
            };
            if let (Some(run), Some(permit)) = (self.dropped.remove(&other), permits.next()) {
                permit.send(Ok(marker(&other, run)));
            }
        }
        let own = self.dropped.contains_key(&substream);
        match self.tx.try_reserve_many(if own { 3 } else { 2 }) {
            Ok(mut permits) => {
                if let (Some(run), Some(permit)) = (self.dropped.remove(&substream), permits.next()) {
                    permit.send(Ok(marker(&substream, run)));
                }
                if let Some(permit) = permits.next() {
                    permit.send(Ok(data(chunk)));
                }
                Pass::Sent
            }
            Err(mpsc::error::TrySendError::Closed(())) => Pass::Gone,
            Err(mpsc::error::TrySendError::Full(())) => {
                if !own && self.dropped.len() >= MAX_DROPPED_SUBSTREAMS {
                    return Pass::TooMany;
                }
                let run = self.dropped.entry(substream).or_insert_with(|| Dropped {
                    offset: chunk.offset,
                    process: chunk.process.clone(),
                    ..Default::default()
                });
                run.bytes += chunk.data.len() as u64 + chunk.dropped;
                run.eof |= chunk.eof;
                Pass::Dropped
            }
        }
    }

    fn end(mut self, status: Status) {
        let mut runs: Vec<((String, String), Dropped)> = self.dropped.drain().collect();
        runs.sort_by(|a, b| a.0.cmp(&b.0));
        let ending = Ending {
            markers: runs.into_iter().map(|(k, r)| marker(&k, r)).collect(),
            status,
        };
        let undelivered = match self.done.take() {
            Some(done) => done.send(ending).err(),
            None => Some(ending),
        };
        // No task to deliver it (it went meanwhile): the status, in the slot kept for it.
        if let Some(ending) = undelivered {
            let _ = self.tx.try_send(Err(ending.status));
        }
    }
}

#[derive(Default)]
pub(crate) struct Registry {
    next_id: AtomicU64,
    followers: Mutex<HashMap<(String, u64), Follower>>,
}

impl Registry {
    fn followers(&self) -> std::sync::MutexGuard<'_, HashMap<(String, u64), Follower>> {
        self.followers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remove(&self, cluster: &str, id: u64) -> bool {
        self.followers().remove(&(cluster.to_string(), id)).is_some()
    }

    /// Passes one chunk from the agent to its caller. A caller whose buffer is full loses the
    /// chunk (it gets a truncation marker for it once it reads again, as for what the agent
    /// drops); one that leaves it full for `stall` is cut. Some(id): nobody takes it (the
    /// caller went, or was cut just now): the agent should stop that follow.
    pub(crate) fn relay(
        &self,
        cluster: &str,
        epoch: u64,
        chunk: AppLogChunk,
        (stall, now): (Duration, Instant),
    ) -> Option<u64> {
        let key = (cluster.to_string(), chunk.id);
        let mut followers = self.followers();
        let Some(follower) = followers.get_mut(&key).filter(|f| f.epoch == epoch) else {
            return Some(chunk.id);
        };
        if !chunk.ended.is_empty() {
            let status = if chunk.exhausted {
                Status::resource_exhausted(format!("the agent: {}; follow again later", chunk.ended))
            } else {
                Status::failed_precondition(format!("the agent ended the follow: {}", chunk.ended))
            };
            if let Some(follower) = followers.remove(&key) {
                follower.end(status);
            }
            return None;
        }
        match follower.pass(chunk) {
            Pass::Sent => {
                follower.full_since = None;
                None
            }
            Pass::Dropped if now.duration_since(*follower.full_since.get_or_insert(now)) < stall => None,
            Pass::Dropped | Pass::TooMany => {
                tracing::info!(cluster, id = key.1, "slow live log caller cut");
                let follower = followers.remove(&key)?;
                follower.end(Status::resource_exhausted(format!(
                    "this caller left {BUFFER} live log messages unread for {} ms, the most the hub holds \
                     for one: it was cut; follow again",
                    stall.as_millis()
                )));
                Some(key.1)
            }
            Pass::Gone => {
                followers.remove(&key);
                Some(key.1)
            }
        }
    }

    /// The session `epoch` of `cluster` ended: so does every follow it carried.
    pub(crate) fn session_ended(&self, cluster: &str, epoch: u64, why: &str) {
        let mut followers = self.followers();
        let ended: Vec<(String, u64)> = followers
            .iter()
            .filter(|((c, _), f)| c == cluster && f.epoch == epoch)
            .map(|(k, _)| k.clone())
            .collect();
        for key in ended {
            if let Some(follower) = followers.remove(&key) {
                follower.end(Status::unavailable(format!(
                    "the session of cluster {cluster} ended ({why}): follow again once it is connected"
                )));
            }
        }
    }
}

fn marker((pod, container): &(String, String), run: Dropped) -> v1::AppLogData {
    v1::AppLogData {
        pod: pod.clone(),
        container: container.clone(),
        process: run.process,
        offset: run.offset,
        truncated: true,
        dropped: run.bytes,
        eof: run.eof,
        ..Default::default()
    }
}

fn data(chunk: AppLogChunk) -> v1::AppLogData {
    v1::AppLogData {
        pod: chunk.pod,
        container: chunk.container,
        process: chunk.process,
        offset: chunk.offset,
        data: chunk.data,
        truncated: chunk.truncated,
        dropped: chunk.dropped,
        eof: chunk.eof,
    }
}

/// The deadline a gRPC caller sent (`grpc-timeout`: digits and a unit).
pub(crate) fn deadline(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Registers a follower of `request` on `cluster`'s live session and asks the agent to start;
/// the caller's stream. Refusals: not connected or a full control queue (UNAVAILABLE), an
/// agent without live logs (FAILED_PRECONDITION), too many followers (RESOURCE_EXHAUSTED).
pub(crate) fn start(
    inner: &Arc<Inner>,
    cluster: &str,
    mut request: StartAppLogs,
    deadline: Option<Duration>,
) -> Result<mpsc::Receiver<Result<v1::AppLogData, Status>>, Status> {
    let (epoch, control) = {
        let sessions = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get(cluster).ok_or_else(|| {
            Status::unavailable(format!(
                "cluster {cluster} is not connected: live logs come from its agent; follow again once it is"
            ))
        })?;
        if !session
            .capabilities
            .iter()
            .any(|c| c == shapeblock_proto::APP_LOGS_CAPABILITY)
        {
            return Err(Status::failed_precondition(format!(
                "the agent of cluster {cluster} does not follow live App logs (no `{}` capability): upgrade it",
                shapeblock_proto::APP_LOGS_CAPABILITY
            )));
        }
        (session.epoch, session.control.clone())
    };
    let registry = &inner.app_logs;
    // One slot more than the bound: the status that ends a caller must fit.
    let (tx, rx) = mpsc::channel(BUFFER + 1);
    let (done, done_rx) = oneshot::channel();
    let id = registry.next_id.fetch_add(1, Ordering::Relaxed) + 1;
    {
        let mut followers = registry.followers();
        let here = followers.keys().filter(|(c, _)| c == cluster).count();
        if here >= inner.config.app_log_followers {
            return Err(Status::resource_exhausted(format!(
                "cluster {cluster} has {here} live log followers, the most the hub serves for one: follow again later"
            )));
        }
        followers.insert((cluster.to_string(), id), Follower::new(epoch, tx.clone(), done));
    }
    // The session may have ended between the look-up and the registration, before its end
    // could see this follower: then it is not served.
    let live = inner
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(cluster)
        .is_some_and(|s| s.epoch == epoch);
    request.id = id;
    if !live || control.try_send(Down::StartAppLogs(request)).is_err() {
        registry.remove(cluster, id);
        return Err(Status::unavailable(format!(
            "the session of cluster {cluster} is busy or ending: follow again"
        )));
    }
    tokio::spawn(watch_caller(
        inner.clone(),
        (cluster.to_string(), epoch, id),
        tx,
        done_rx,
        deadline,
    ));
    Ok(rx)
}

/// Lives as long as the caller's stream: when the caller goes (or its deadline passes, or the
/// hub stops) before the registry ended it, the agent is told to stop.
async fn watch_caller(
    inner: Arc<Inner>,
    (cluster, epoch, id): (String, u64, u64),
    tx: Sender,
    done: oneshot::Receiver<Ending>,
    deadline: Option<Duration>,
) {
    let _counted = Counted::new(&inner.streams.app_log_followers);
    let mut stopping = inner.stopping.subscribe();
    let expired = async {
        match deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let status = tokio::select! {
        ending = done => {
            if let Ok(ending) = ending {
                deliver(&tx, ending, inner.config.watch_stall).await;
            }
            return;
        }
        _ = tx.closed() => None,
        _ = expired => Some(Status::deadline_exceeded("the caller's deadline passed")),
        _ = stopping.changed() => Some(Status::unavailable("hub shutting down: follow again")),
    };
    if !inner.app_logs.remove(&cluster, id) {
        return; // ended by the registry meanwhile
    }
    if let Some(status) = status {
        let _ = tx.try_send(Err(status));
    }
    if let Some(control) = inner.control(&cluster, epoch) {
        let _ = control.try_send(Down::StopAppLogs(StopAppLogs { id }));
    }
    tracing::debug!(%cluster, id, "live log caller gone: follow stopped");
}

/// Sends an ending's markers as the caller makes room, always keeping a slot for the status;
/// a caller that leaves them unread for `stall` gets the status without the rest.
async fn deliver(tx: &Sender, ending: Ending, stall: Duration) {
    let Ending { markers, status } = ending;
    let _ = tokio::time::timeout(stall, async {
        for marker in markers {
            let Ok(mut permits) = tx.reserve_many(2).await else {
                return;
            };
            if let Some(permit) = permits.next() {
                permit.send(Ok(marker));
            }
        }
    })
    .await;
    let _ = tx.try_send(Err(status));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_are_read_in_every_unit() {
        let mut metadata = tonic::metadata::MetadataMap::new();
        for (value, expected) in [
            ("2S", Duration::from_secs(2)),
            ("1500m", Duration::from_millis(1500)),
            ("1M", Duration::from_secs(60)),
            ("7u", Duration::from_micros(7)),
        ] {
            metadata.insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(deadline(&metadata), Some(expected), "{value}");
        }
        metadata.insert("grpc-timeout", "S".parse().unwrap());
        assert_eq!(deadline(&metadata), None);
    }

    #[test]
    fn a_caller_that_does_not_read_loses_chunks_behind_a_marker_and_is_cut_after_the_stall() {
        let registry = Registry::default();
        let (tx, mut rx) = mpsc::channel(BUFFER + 1);
        let (done, mut done_rx) = oneshot::channel();
        registry
            .followers()
            .insert(("c".into(), 1), Follower::new(3, tx, done));
        let chunk = |offset| AppLogChunk {
            id: 1,
            pod: "web-1".into(),
            container: "web".into(),
            offset,
            data: b"line\n".to_vec(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let stall = Duration::from_secs(5);
        let at = |ms| (stall, t0 + Duration::from_millis(ms));
        for i in 0..BUFFER as u64 {
            assert_eq!(registry.relay("c", 3, chunk(i * 5), at(0)), None);
        }
        // Another epoch's chunk is not this follower's.
        assert_eq!(registry.relay("c", 4, chunk(0), at(0)), Some(1));
        // Full: dropped, not cut, within the stall.
        for i in 0..3u64 {
            assert_eq!(
                registry.relay("c", 3, chunk((BUFFER as u64 + i) * 5), at(100)),
                None
            );
        }
        // The caller reads some: a marker for what was dropped, then what comes next.
        for i in 0..10u64 {
            let data = rx.try_recv().unwrap().unwrap();
            assert_eq!(data.offset, i * 5);
        }
        let next = (BUFFER as u64 + 3) * 5;
        assert_eq!(registry.relay("c", 3, chunk(next), at(200)), None);
        let mut got: Vec<v1::AppLogData> = Vec::new();
        while let Ok(Ok(data)) = rx.try_recv() {
            got.push(data);
        }
        assert_eq!(got.len(), BUFFER - 10 + 2, "the rest, a marker, the new chunk");
        let marker = &got[got.len() - 2];
        assert!(marker.truncated && marker.data.is_empty(), "{marker:?}");
        assert_eq!((marker.offset, marker.dropped), (BUFFER as u64 * 5, 15));
        assert_eq!(got[got.len() - 1].offset, next);
        // Full again, for longer than the stall: cut, and the agent told to stop.
        let mut offset = next + 5;
        for _ in 0..=BUFFER {
            assert_eq!(registry.relay("c", 3, chunk(offset), at(300)), None);
            offset += 5;
        }
        assert_eq!(registry.relay("c", 3, chunk(offset), at(300 + 4_999)), None);
        let cut = registry.relay("c", 3, chunk(offset + 5), at(300 + 5_001));
        assert_eq!(cut, Some(1));
        // The status and the marker of what was dropped since go to the follower's task,
        // which delivers them as the caller reads.
        let ending = done_rx.try_recv().unwrap();
        assert_eq!(
            ending.status.code(),
            tonic::Code::ResourceExhausted,
            "{:?}",
            ending.status
        );
        let [marker] = ending.markers.as_slice() else {
            panic!("{:?}", ending.markers)
        };
        assert!(marker.truncated && marker.dropped > 0, "{marker:?}");
        let mut read = 0;
        while let Ok(item) = rx.try_recv() {
            assert!(item.is_ok(), "no status before the markers");
            read += 1;
        }
        assert!(read > 0, "what was buffered is the caller's");
        assert_eq!(
            marker.offset + marker.dropped,
            offset + 10,
            "the run to the cut chunk, included"
        );
        // Delivered in order once the caller reads: the marker, then the status.
        let (tx2, mut rx2) = mpsc::channel(BUFFER + 1);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(deliver(&tx2, ending, stall));
        assert!(rx2.try_recv().unwrap().unwrap().truncated);
        assert_eq!(
            rx2.try_recv().unwrap().unwrap_err().code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            registry.relay("c", 3, chunk(offset + 10), at(0)),
            Some(1),
            "gone: stop it again"
        );
    }
}
