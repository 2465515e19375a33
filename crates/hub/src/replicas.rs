//! Several hubs on one Postgres, all equal. Each is a replica: a random id, a heartbeat row
//! it refreshes, the sessions it begins owned by it in the database. What one replica does
//! that concerns another's sessions or watchers reaches it through Postgres LISTEN/NOTIFY
//! ([`crate::store::notify`]), never through a connection between replicas; slow polls
//! are only the fallback for notifications missed while the LISTEN connection was down.
//!
//! A replica whose heartbeat is older than its dead-after ([`DEFAULT_DEAD_AFTER`], never
//! under [`MIN_DEAD_AFTER_BEATS`] beats) is declared dead by whichever live replica notices
//! first, and only the clusters it held are handed on. A
//! replica that finds its own row gone (it was stalled that long) ends its sessions: they
//! were handed on, and their writes are refused anyway.
//!
//! Readiness (`/readyz` on the health listener) is the database answering this replica's
//! heartbeat and the LISTEN connection listening; liveness (`/livez`) is the process
//! answering at all, so an outage of the database makes replicas unready, not restarted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::store::notify::{self, Notice};
use crate::{Close, HubError, Inner};

/// The default heartbeat of a replica's row.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);
/// A replica is dead once its heartbeat is this old. Generous against the beat because a
/// false death costs a reconnect of every agent the replica held, while a real one costs
/// only this long before they are handed on (their agents usually reconnect sooner anyway:
/// the load balancer sees the replica's port close).
pub const DEFAULT_DEAD_AFTER: Duration = Duration::from_secs(15);
/// ... and never less than this many beats, so one slow heartbeat write is not a death.
pub const MIN_DEAD_AFTER_BEATS: u32 = 2;
/// Every this many beats a replica compares its sessions with the database (a newer epoch
/// or a revocation whose notification it missed) and wakes its senders and watchers.
const RESYNC_BEATS: u32 = 5;

/// This process as a replica.
pub(crate) struct Replica {
    pub(crate) id: String,
    heartbeat: Duration,
    dead_after: Duration,
    /// The last heartbeat reached the database.
    database: AtomicBool,
    /// The LISTEN connection is listening.
    listening: watch::Sender<bool>,
}

impl Replica {
    pub(crate) fn new(heartbeat: Duration, dead_after: Duration) -> Result<Self, HubError> {
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| HubError::Invalid("no system randomness".into()))?;
        Ok(Self {
            id: shapeblock_proto::hex(&id),
            heartbeat,
            dead_after: dead_after.max(heartbeat * MIN_DEAD_AFTER_BEATS),
            database: AtomicBool::new(true),
            listening: watch::channel(false).0,
        })
    }

    pub(crate) fn dead_after(&self) -> Duration {
        self.dead_after
    }
}

/// Why this hub is not ready, if it is not.
pub(crate) fn unready(inner: &Inner) -> Option<String> {
    let replica = inner.replica.as_ref()?;
    if !replica.database.load(Ordering::Relaxed) {
        return Some("the database did not take this replica's last heartbeat".into());
    }
    if !*replica.listening.borrow() {
        return Some("the LISTEN connection to the database is down".into());
    }
    None
}

/// Starts the replica's tasks: heartbeat (with the dead-replica check), LISTEN, and what
/// acts on notifications. They end when the hub stops.
pub(crate) fn start(inner: &Arc<Inner>) {
    let Some(replica) = inner.replica.as_ref() else {
        return;
    };
    let Some(config) = inner.store.listen_config() else {
        return;
    };
    let (notices, received) = mpsc::channel(4096);
    tokio::spawn(notify::listen(
        config,
        notices,
        replica.listening.clone(),
        inner.stopping.subscribe(),
        replica.heartbeat,
    ));
    tokio::spawn(act_on_notices(inner.clone(), received));
    tokio::spawn(beat(inner.clone()));
}

async fn act_on_notices(inner: Arc<Inner>, mut received: mpsc::Receiver<Notice>) {
    while let Some(notice) = received.recv().await {
        match notice {
            Notice::Session { cluster, epoch } => supersede(&inner, &cluster, epoch),
            Notice::Command { cluster } => {
                if let Some(wake) = inner.held_wake(&cluster) {
                    wake.notify_one();
                }
            }
            Notice::Feed { .. } => inner.store.wake_watchers(),
            Notice::Revoked { cluster } => inner.close_session(&cluster, Close::Revoked),
            Notice::Live {
                kind,
                follow,
                replica,
            } => {
                if inner.replica.as_ref().is_some_and(|me| me.id == replica) {
                    crate::api::routed_logs::notice(&inner, kind, follow);
                }
            }
            Notice::Resync => resync(&inner).await,
        }
    }
}

/// Closes this replica's session of `cluster` if it is older than `epoch`.
fn supersede(inner: &Inner, cluster: &str, epoch: u64) {
    let sessions = inner.sessions.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(session) = sessions.get(cluster)
        && session.epoch < epoch
    {
        tracing::info!(%cluster, old = session.epoch, new = epoch, "a newer session (another replica's, or a hand-on) replaces this one");
        let _ = session.close.send(Close::Superseded);
    }
}

/// What notifications would have done, done from the database: sessions that are no longer
/// current or are revoked end, senders look for commands, watchers read on, routed live log
/// follows are looked at.
pub(crate) async fn resync(inner: &Arc<Inner>) {
    let held: Vec<(String, u64)> = inner
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(c, s)| (c.clone(), s.epoch))
        .collect();
    let clusters: Vec<String> = held.iter().map(|(c, _)| c.clone()).collect();
    match inner.store.session_epochs(&clusters).await {
        Ok(current) => {
            for (cluster, epoch, revoked) in current {
                if revoked {
                    inner.close_session(&cluster, Close::Revoked);
                } else {
                    supersede(inner, &cluster, epoch);
                }
            }
        }
        Err(e) => tracing::warn!(%e, "comparing sessions with the database"),
    }
    crate::wake_pending(inner).await;
    inner.store.wake_watchers();
    crate::api::routed_logs::resync(inner).await;
}

async fn beat(inner: Arc<Inner>) {
    let Some(replica) = inner.replica.as_ref() else {
        return;
    };
    let mut stopping = inner.stopping.subscribe();
    let mut beats = tokio::time::interval(replica.heartbeat);
    beats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut n = 0u32;
    // Since when this replica's heartbeats have reached the database without a break.
    let mut in_touch_since: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = beats.tick() => {}
            _ = stopping.changed() => return,
        }
        n = n.wrapping_add(1);
        // Bounded: a database that does not answer makes this replica unready in one beat.
        let beat = tokio::time::timeout(
            replica.heartbeat.max(Duration::from_secs(1)),
            inner.store.replica_heartbeat(&replica.id),
        )
        .await;
        if matches!(beat, Ok(Ok(_))) {
            in_touch_since.get_or_insert_with(tokio::time::Instant::now);
        } else {
            in_touch_since = None;
        }
        match beat {
            Ok(Ok(true)) => replica.database.store(true, Ordering::Relaxed),
            Ok(Ok(false)) => {
                // Stalled long enough to be declared dead: what it held is handed on already.
                tracing::warn!(replica = %replica.id, "this replica was declared dead (its heartbeat stalled): ending its sessions and registering again");
                for cluster in inner.held() {
                    inner.close_session(&cluster, Close::Superseded);
                }
                let registered = inner.store.register_replica(&replica.id, &inner.agent_url).await;
                replica.database.store(registered.is_ok(), Ordering::Relaxed);
            }
            Ok(Err(e)) => {
                tracing::warn!(%e, "replica heartbeat");
                replica.database.store(false, Ordering::Relaxed);
            }
            Err(_) => {
                tracing::warn!("replica heartbeat: the database did not answer in time");
                replica.database.store(false, Ordering::Relaxed);
            }
        }
        // After an outage of the database every heartbeat row is stale, this one's included:
        // the others get a full dead-after window to beat again before any of them is
        // declared dead, or every outage would end every replica's sessions.
        let settled = in_touch_since.is_some_and(|since| since.elapsed() > replica.dead_after());
        if settled {
            match inner
                .store
                .hand_on_dead_replicas(&replica.id, replica.dead_after())
                .await
            {
                Ok(handed) if !handed.is_empty() => {
                    tracing::warn!(clusters = handed.len(), "sessions of a dead replica handed on")
                }
                Ok(_) => {}
                Err(e) => tracing::debug!(%e, "dead replica check"),
            }
        }
        if n.is_multiple_of(RESYNC_BEATS) {
            resync(&inner).await;
        }
    }
}

/// Serves `/livez` and `/readyz` (plain HTTP/1.1, what kubelet's and HAProxy's probes speak)
/// on `listener` until the hub stops.
pub(crate) fn serve_health(
    inner: Arc<Inner>,
    listener: tokio::net::TcpListener,
) -> tokio::task::JoinHandle<()> {
    let mut stopping = inner.stopping.subscribe();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stopping.changed() => return,
            };
            let Ok((stream, _)) = accepted else { continue };
            let inner = inner.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(5), answer(&inner, stream)).await;
            });
        }
    })
}

async fn answer(inner: &Inner, mut stream: tokio::net::TcpStream) -> std::io::Result<()> {
    // The request line is all that matters; a probe's request fits in one read.
    let mut buf = [0u8; 1024];
    let n = stream.read(&mut buf).await?;
    let request = String::from_utf8_lossy(&buf[..n]);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = match path {
        "/livez" => ("200 OK", "ok\n".to_string()),
        "/readyz" => match unready(inner) {
            None => ("200 OK", "ready\n".to_string()),
            Some(why) => ("503 Service Unavailable", format!("not ready: {why}\n")),
        },
        _ => ("404 Not Found", "/livez or /readyz\n".to_string()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Binds the health listener.
pub(crate) async fn bind_health(addr: SocketAddr) -> Result<tokio::net::TcpListener, HubError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HubError::Listen { addr, source })
}
