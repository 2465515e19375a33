//! One LISTEN connection per replica: how a replica hears what the others committed (a newer
//! session, a queued command, a feed entry, a revocation) at once rather than by polling.
//! Payloads carry ids only; what they name is read from the store.
//!
//! Postgres does not keep notifications for a listener that is not connected, so after every
//! (re)connection the listener reports [`Notice::Resync`]: whatever it may have missed is
//! looked at once. While it is down, the hub's slow polls still deliver everything, later.

use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::AsyncMessage;

use super::Database;

use super::postgres::channel;

/// What another replica (or this one) committed.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    /// A session of `cluster` began, or was handed on, at `epoch`.
    Session { cluster: String, epoch: u64 },
    /// A command of `cluster` was queued.
    Command { cluster: String },
    /// The feed grew up to `id`.
    Feed { id: u64 },
    /// `cluster` was revoked.
    Revoked { cluster: String },
    /// About routed live log follow `follow`, to `replica`.
    Live {
        kind: Live,
        follow: u64,
        replica: String,
    },
    /// The connection is (again) listening; notifications may have been missed before.
    Resync,
}

/// What a [`Notice::Live`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    /// To its holder: serve it.
    Start,
    /// To its requester: chunks wait.
    Data,
    /// To its holder: its requester ended it.
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("LISTEN connection: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("LISTEN connection: no answer within {0:?}")]
    Timeout(Duration),
    #[error("LISTEN connection closed")]
    Closed,
}

/// How long a connection attempt or a ping may take before the connection counts as down.
const DEADLINE: Duration = Duration::from_secs(5);
/// Reconnection backoff: from the first to the last, doubling.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(200), Duration::from_secs(5));

impl Notice {
    fn parse(channel: &str, payload: &str) -> Option<Self> {
        Some(match channel {
            channel::SESSION => {
                let (cluster, epoch) = payload.split_once('\t')?;
                Notice::Session {
                    cluster: cluster.into(),
                    epoch: epoch.parse().ok()?,
                }
            }
            channel::COMMAND => Notice::Command {
                cluster: payload.into(),
            },
            channel::FEED => Notice::Feed {
                id: payload.parse().ok()?,
            },
            channel::REVOKE => Notice::Revoked {
                cluster: payload.into(),
            },
            channel::LIVE => {
                let mut parts = payload.splitn(3, '\t');
                let kind = match parts.next()? {
                    "start" => Live::Start,
                    "data" => Live::Data,
                    "stop" => Live::Stop,
                    _ => return None,
                };
                Notice::Live {
                    kind,
                    follow: parts.next()?.parse().ok()?,
                    replica: parts.next()?.into(),
                }
            }
            _ => return None,
        })
    }
}

/// Listens until `stop` changes: every notification as a [`Notice`] to `notices`; `up` says
/// whether the connection is listening (the hub's readiness). Reconnects with backoff; a
/// connection that does not answer a ping every `ping` is dropped and made again.
pub async fn listen(
    database: Database,
    notices: mpsc::Sender<Notice>,
    up: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
    ping: Duration,
) {
    let mut backoff = BACKOFF.0;
    loop {
        let result = listen_once(&database, &notices, &up, &mut stop, ping).await;
        // A connection that listened for a while starts the backoff over.
        if up.send_replace(false) {
            backoff = BACKOFF.0;
        }
        match result {
            // Stopping.
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(%e, retry_ms = backoff.as_millis() as u64, "hub notifications down; reconnecting")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// One connection, for as long as it works; `Ok` only when stopping.
async fn listen_once(
    database: &Database,
    notices: &mpsc::Sender<Notice>,
    up: &watch::Sender<bool>,
    stop: &mut watch::Receiver<bool>,
    ping: Duration,
) -> Result<(), NotifyError> {
    // Named, so an operator (or a test) can tell it from the pool's connections.
    let mut config = database.config.clone();
    config.application_name("shapeblock-hub-listen");
    let (client, mut connection) = tokio::time::timeout(DEADLINE, config.connect(database.tls.clone()))
        .await
        .map_err(|_| NotifyError::Timeout(DEADLINE))??;
    // The connection delivers notifications only while it is polled: a task of its own,
    // ending (and with it this listener) when the connection does.
    let forward = notices.clone();
    let mut driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message? {
                AsyncMessage::Notification(n) => {
                    match Notice::parse(n.channel(), n.payload()) {
                        // A full queue waits: Postgres keeps the rest meanwhile.
                        Some(notice) => {
                            if forward.send(notice).await.is_err() {
                                return Ok(());
                            }
                        }
                        None => tracing::warn!(
                            channel = n.channel(),
                            "an unreadable hub notification was ignored"
                        ),
                    }
                }
                AsyncMessage::Notice(notice) => tracing::debug!(%notice, "Postgres notice"),
                _ => {}
            }
        }
        Err::<(), NotifyError>(NotifyError::Closed)
    });
    let listening = format!(
        "LISTEN {}; LISTEN {}; LISTEN {}; LISTEN {}; LISTEN {}",
        channel::SESSION,
        channel::COMMAND,
        channel::FEED,
        channel::REVOKE,
        channel::LIVE
    );
    let result = async {
        tokio::time::timeout(DEADLINE, client.batch_execute(&listening))
            .await
            .map_err(|_| NotifyError::Timeout(DEADLINE))??;
        up.send_replace(true);
        tracing::info!("hub notifications listening");
        if notices.send(Notice::Resync).await.is_err() {
            return Ok(());
        }
        let mut pings = tokio::time::interval(ping);
        pings.tick().await;
        loop {
            tokio::select! {
                ended = &mut driver => {
                    return match ended {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(NotifyError::Closed),
                    };
                }
                _ = pings.tick() => {
                    // A connection cut without a FIN is only noticed by asking.
                    tokio::time::timeout(DEADLINE, client.simple_query("SELECT 1"))
                        .await
                        .map_err(|_| NotifyError::Timeout(DEADLINE))??;
                }
                _ = stop.changed() => return Ok(()),
            }
        }
    }
    .await;
    driver.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_read_or_ignored() {
        assert_eq!(
            Notice::parse("sb_session", "c-1\t7"),
            Some(Notice::Session {
                cluster: "c-1".into(),
                epoch: 7
            })
        );
        assert_eq!(Notice::parse("sb_session", "c-1"), None);
        assert_eq!(Notice::parse("sb_feed", "12"), Some(Notice::Feed { id: 12 }));
        assert_eq!(Notice::parse("sb_feed", "x"), None);
        assert_eq!(
            Notice::parse("sb_command", "c"),
            Some(Notice::Command { cluster: "c".into() })
        );
        assert_eq!(
            Notice::parse("sb_revoke", "c"),
            Some(Notice::Revoked { cluster: "c".into() })
        );
        assert_eq!(
            Notice::parse("sb_live", "data\t12\tab01"),
            Some(Notice::Live {
                kind: Live::Data,
                follow: 12,
                replica: "ab01".into()
            })
        );
        assert_eq!(Notice::parse("sb_live", "go\t12\tab01"), None);
        assert_eq!(Notice::parse("sb_live", "stop\t12"), None);
        assert_eq!(Notice::parse("other", "c"), None);
    }
}
