//! `FollowAppLogs` on a replica that does not hold the cluster's session: the follow is
//! routed through the database, never through a connection between replicas. The requester
//! writes the follow (a row naming both replicas, the agent's request) and NOTIFYs the holder;
//! the holder follows locally as for its own callers ([`super::app_logs::start`]) and hands
//! each batch of what its caller would have got to the database, NOTIFYing the requester,
//! which takes (deletes) the batch in order and passes it on. Notifications carry ids only.
//!
//! Bounded at both ends: at most [`ROOM`] chunks wait in the database for one follow; past
//! that the holder stops reading its local follower, whose own bound then drops chunks behind
//! truncation markers and cuts a caller that stays behind, exactly as for a local caller. The
//! end of a follow (the agent's, the session's, a cut) is a status chunk; a caller going, its
//! deadline, or its replica stopping deletes the follow, and the holder stops the agent's.
//! Either end dying is noticed by the other within [`LOOK`]: a dead replica's follows are
//! deleted when it is declared dead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use tokio::sync::{Notify, mpsc};
use tonic::Status;

use shapeblock_proto::v1::StartAppLogs;

use super::{app_logs, v1};
use crate::Inner;
use crate::store::{Put, notify::Live};

/// Chunks that may wait in the database for one follow's requester: a caller's buffer's
/// worth, so routing adds no more slack than a local caller has.
pub const ROOM: usize = app_logs::BUFFER;
/// How often each end looks at the follow without a notification: the fallback for one
/// missed while the LISTEN connection was down, and how a dead other end is noticed.
pub const LOOK: Duration = Duration::from_secs(1);
/// How long the holder waits before trying a full follow again.
const FULL_RETRY: Duration = Duration::from_millis(20);
/// Chunks handed on in one transaction at most.
const BATCH: usize = 16;

/// The follows this replica routes, by id: the wake-up of the task serving each end.
#[derive(Default)]
pub(crate) struct Routes {
    /// Follows asked for here, served elsewhere: woken when chunks wait.
    requested: Mutex<HashMap<u64, Arc<Notify>>>,
    /// Follows served here for another replica: woken when their requester ends them.
    held: Mutex<HashMap<u64, Arc<Notify>>>,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Routes {
    fn wake(map: &Mutex<HashMap<u64, Arc<Notify>>>, id: u64) {
        if let Some(wake) = locked(map).get(&id) {
            wake.notify_one();
        }
    }
}

/// What a chunk in the database is: a message for the caller or the status ending it.
enum Body {
    Data(v1::AppLogData),
    End(Status),
}

impl Body {
    fn encode(&self) -> Vec<u8> {
        match self {
            Body::Data(data) => {
                let mut out = vec![0u8];
                data.encode(&mut out).expect("a Vec grows");
                out
            }
            Body::End(status) => {
                let mut out = vec![1u8];
                out.extend_from_slice(&(status.code() as i32).to_be_bytes());
                out.extend_from_slice(status.message().as_bytes());
                out
            }
        }
    }

    fn decode(bytes: &[u8]) -> Self {
        let garbled = || Body::End(Status::internal("a routed live log chunk could not be read"));
        match bytes.split_first() {
            Some((0, rest)) => v1::AppLogData::decode(rest)
                .map(Body::Data)
                .unwrap_or_else(|_| garbled()),
            Some((1, rest)) if rest.len() >= 4 => {
                let code = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
                Body::End(Status::new(
                    tonic::Code::from(code),
                    String::from_utf8_lossy(&rest[4..]).into_owned(),
                ))
            }
            _ => garbled(),
        }
    }
}

/// Starts a follow of `cluster`'s live App logs on replica `holder`, which holds its session;
/// the caller's stream, as [`app_logs::start`] gives a local caller.
pub(crate) async fn follow(
    inner: &Arc<Inner>,
    cluster: &str,
    request: StartAppLogs,
    deadline: Option<Duration>,
    holder: &str,
) -> Result<mpsc::Receiver<Result<v1::AppLogData, Status>>, Status> {
    let me = inner
        .replica
        .as_ref()
        .map(|r| r.id.clone())
        .ok_or_else(|| Status::internal("routing live logs without replicas"))?;
    let id = inner
        .store
        .route_follow(&me, holder, cluster, &request.encode_to_vec())
        .await
        .map_err(|e| Status::unavailable(format!("routing the follow to replica {holder}: {e}")))?;
    let wake = Arc::new(Notify::new());
    locked(&inner.routes.requested).insert(id, wake.clone());
    let (tx, rx) = mpsc::channel(app_logs::BUFFER + 1);
    tokio::spawn(relay_to_caller(inner.clone(), id, wake, tx, deadline));
    tracing::debug!(%cluster, id, %holder, "live log follow routed");
    Ok(rx)
}

/// The requester's end: takes what the holder handed on, in order, to the caller, until the
/// follow ends at either end.
async fn relay_to_caller(
    inner: Arc<Inner>,
    id: u64,
    wake: Arc<Notify>,
    tx: mpsc::Sender<Result<v1::AppLogData, Status>>,
    deadline: Option<Duration>,
) {
    let mut stopping = inner.stopping.subscribe();
    let expired = tokio::time::sleep(deadline.unwrap_or(Duration::MAX / 4));
    tokio::pin!(expired);
    // What ends the caller's stream here (None: the caller went), and whether the follow
    // is gone from the database already.
    let (status, gone) = 'relay: loop {
        let taken = match inner.store.take_routed(id, ROOM).await {
            Ok(Some(taken)) => taken,
            Ok(None) => {
                break (
                    Some(Status::unavailable(
                        "the hub replica serving this follow stopped (it held the cluster's session): follow again",
                    )),
                    true,
                );
            }
            Err(e) => {
                break (
                    Some(Status::unavailable(format!(
                        "routed live logs: {e}; follow again"
                    ))),
                    false,
                );
            }
        };
        let idle = taken.is_empty();
        for body in taken {
            let message = match Body::decode(&body) {
                Body::Data(data) => Ok(data),
                Body::End(status) => break 'relay (Some(status), false),
            };
            tokio::select! {
                sent = tx.send(message) => if sent.is_err() { break 'relay (None, false) },
                _ = &mut expired => break 'relay (Some(Status::deadline_exceeded("the caller's deadline passed")), false),
                _ = stopping.changed() => break 'relay (Some(Status::unavailable("hub shutting down: follow again")), false),
            }
        }
        if !idle {
            continue;
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(LOOK) => {}
            _ = tx.closed() => break (None, false),
            _ = &mut expired => break (Some(Status::deadline_exceeded("the caller's deadline passed")), false),
            _ = stopping.changed() => break (Some(Status::unavailable("hub shutting down: follow again")), false),
        }
    };
    locked(&inner.routes.requested).remove(&id);
    if let Some(status) = status {
        let _ = tx.try_send(Err(status));
    }
    if !gone && let Err(e) = inner.store.end_routed(id).await {
        // Its holder finds it gone only once the database is back; until then its next
        // hand-on fails, and a dead requester's follows are deleted with its row.
        tracing::warn!(id, %e, "ending a routed live log follow");
    }
    tracing::debug!(id, "routed live log follow ended at its requester");
}

/// What a notification about routed follows asks of this replica.
pub(crate) fn notice(inner: &Arc<Inner>, kind: Live, id: u64) {
    match kind {
        Live::Start => serve(inner, id),
        Live::Data => Routes::wake(&inner.routes.requested, id),
        Live::Stop => Routes::wake(&inner.routes.held, id),
    }
}

/// The fallback for notifications missed: every requester looks again, and the follows this
/// replica should serve and does not are started.
pub(crate) async fn resync(inner: &Arc<Inner>) {
    for wake in locked(&inner.routes.requested).values() {
        wake.notify_one();
    }
    let Some(me) = inner.replica.as_ref().map(|r| r.id.clone()) else {
        return;
    };
    match inner.store.routed_follows_held_by(&me).await {
        Ok(ids) => {
            for id in ids {
                serve(inner, id);
            }
        }
        Err(e) => tracing::debug!(%e, "looking for routed live log follows"),
    }
}

/// Serves routed follow `id` here, unless it is served already.
fn serve(inner: &Arc<Inner>, id: u64) {
    let wake = {
        let mut held = locked(&inner.routes.held);
        if held.contains_key(&id) {
            return;
        }
        let wake = Arc::new(Notify::new());
        held.insert(id, wake.clone());
        wake
    };
    let inner = inner.clone();
    tokio::spawn(async move {
        hold(&inner, id, wake).await;
        locked(&inner.routes.held).remove(&id);
    });
}

/// The holder's end: a local follow whose caller is the database.
async fn hold(inner: &Arc<Inner>, id: u64, stop: Arc<Notify>) {
    let me = inner.replica.as_ref().map(|r| r.id.as_str()).unwrap_or_default();
    let follow = match inner.store.routed_follow(id).await {
        Ok(Some(follow)) if follow.holder == me => follow,
        Ok(_) => return,
        Err(e) => {
            // Looked for again at the next resync.
            tracing::warn!(id, %e, "reading a routed live log follow");
            return;
        }
    };
    let request = match StartAppLogs::decode(follow.request.as_slice()) {
        Ok(request) => request,
        Err(_) => {
            hand_on(
                inner,
                id,
                &[Body::End(Status::internal("a routed live log request could not be read")).encode()],
                &stop,
            )
            .await;
            return;
        }
    };
    let mut rx = match app_logs::start(inner, &follow.cluster, request, None) {
        Ok(rx) => rx,
        Err(status) => {
            hand_on(inner, id, &[Body::End(status).encode()], &stop).await;
            return;
        }
    };
    tracing::debug!(cluster = %follow.cluster, id, requester = %follow.requester, "serving a routed live log follow");
    let mut stopping = inner.stopping.subscribe();
    let mut look = tokio::time::interval(LOOK);
    look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            first = rx.recv() => first,
            _ = stop.notified() => return,
            _ = look.tick() => {
                if matches!(inner.store.routed_follow(id).await, Ok(None)) {
                    return;
                }
                continue;
            }
            _ = stopping.changed() => {
                hand_on(inner, id, &[Body::End(Status::unavailable("the hub replica serving this follow is shutting down: follow again")).encode()], &stop).await;
                return;
            }
        };
        let mut batch = Vec::new();
        let mut ended = false;
        let mut next = first;
        loop {
            match next {
                Some(Ok(data)) => batch.push(Body::Data(data).encode()),
                Some(Err(status)) => {
                    batch.push(Body::End(status).encode());
                    ended = true;
                }
                None => {
                    batch.push(
                        Body::End(Status::unavailable(
                            "the follow ended at its hub replica: follow again",
                        ))
                        .encode(),
                    );
                    ended = true;
                }
            }
            if ended || batch.len() >= BATCH {
                break;
            }
            match rx.try_recv() {
                Ok(item) => next = Some(item),
                Err(_) => break,
            }
        }
        if !hand_on(inner, id, &batch, &stop).await || ended {
            return;
        }
    }
}

/// Hands `batch` to the database for the requester, waiting while its room is full; false
/// when the follow is over (its requester ended it, or the database failed it).
async fn hand_on(inner: &Arc<Inner>, id: u64, batch: &[Vec<u8>], stop: &Notify) -> bool {
    loop {
        match inner.store.put_routed(id, batch, ROOM).await {
            Ok(Put::Stored) => return true,
            Ok(Put::Gone) => return false,
            Ok(Put::Full) => {
                tokio::select! {
                    _ = tokio::time::sleep(FULL_RETRY) => {}
                    _ = stop.notified() => return false,
                }
            }
            Err(e) => {
                // The requester's own reads fail alike and end its caller.
                tracing::warn!(id, %e, "handing routed live logs on");
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_and_an_end_come_out_of_the_database_as_they_went_in() {
        let data = v1::AppLogData {
            pod: "web-1".into(),
            container: "web".into(),
            offset: 42,
            data: b"line\n".to_vec(),
            truncated: true,
            dropped: 7,
            ..Default::default()
        };
        let Body::Data(back) = Body::decode(&Body::Data(data.clone()).encode()) else {
            panic!("not data")
        };
        assert_eq!(back, data);
        let status = Status::resource_exhausted("too many: follow again");
        let Body::End(back) = Body::decode(&Body::End(status).encode()) else {
            panic!("not an end")
        };
        assert_eq!(
            (back.code(), back.message()),
            (tonic::Code::ResourceExhausted, "too many: follow again")
        );
        for garbled in [&[][..], &[1, 0], &[9, 1, 2]] {
            let Body::End(status) = Body::decode(garbled) else {
                panic!("{garbled:?} read as data")
            };
            assert_eq!(status.code(), tonic::Code::Internal);
        }
    }
}
