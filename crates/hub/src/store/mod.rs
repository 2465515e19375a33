//! The hub's store, on one of two backends: SQLite (embedded, one file in the data
//! directory: the single-tenant install and the demo) or Postgres (`--database-url`: what
//! several replicas share). Both keep the same rows with the same meaning, and the same
//! promises: a killed hub loses nothing that was acknowledged (every ack is sent after the
//! transaction that recorded the message commits), a sequenced agent message is recorded at
//! most once, and a write of a session whose epoch is no longer current changes nothing.
//!
//! The API is async for Postgres' sake; SQLite answers from under a mutex, as it always did.

pub mod notify;
mod postgres;
pub mod retention;
mod sqlite;
pub mod tls;

pub use postgres::IDLE_IN_TRANSACTION;
pub use tls::Database;

use std::path::Path;
use std::time::Duration;

/// Postgres connections a hub keeps at most, unless told otherwise (`--database-pool`).
pub const DEFAULT_POOL_SIZE: usize = 16;

pub use retention::{PRUNE_BATCH, Pruned, RETENTION_LOCK, Retention};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("hub store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("hub store (Postgres): {}", with_causes(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("hub store (Postgres pool): {}", with_causes(.0))]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The database URL or the pool cannot be used as given.
    #[error("hub store: {0}")]
    Config(String),
    #[error("{0}")]
    Invalid(String),
    /// The request contradicts what the store holds (an idempotency key reused).
    #[error("{0}")]
    Conflict(String),
    /// What was asked for was pruned by retention: reading on from `resume` (an event id, a
    /// log offset) is truthful again, what lies before it is gone.
    #[error("{message}")]
    Pruned { message: String, resume: u64 },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// An error with what caused it: tokio-postgres' own words are only its kind ("db error",
/// "error performing TLS handshake"); the server's message or the certificate's fault is in
/// the causes. A cause already in the words is not said twice.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let said = e.to_string();
        if !text.contains(&said) {
            text = format!("{text}: {said}");
        }
        cause = e.source();
    }
    text
}

/// A live App log follow one replica serves for another (see `api::routed_logs`).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutedFollow {
    pub id: u64,
    pub cluster: String,
    pub requester: String,
    pub holder: String,
    /// The agent's `StartAppLogs`, encoded.
    pub request: Vec<u8>,
}

/// What became of chunks handed to a routed follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Stored,
    /// Its requester has not taken enough of what waits: try again later.
    Full,
    /// Its requester ended it.
    Gone,
}

/// Where a hub keeps its store.
#[derive(Debug, Clone, PartialEq)]
pub enum Location {
    /// A SQLite file (`hub.sqlite` in the data directory).
    Sqlite(std::path::PathBuf),
    /// A Postgres database (`postgres://…`), through a pool of at most `pool_size` connections.
    Postgres { url: String, pool_size: usize },
}

pub struct Store {
    backend: Backend,
    /// Bumped after every commit that may have added to the feed: watchers wait on it
    /// instead of polling the store in a tight loop. A commit by another replica on the same
    /// Postgres bumps it through the hub's LISTEN connection ([`Store::wake_watchers`]).
    tick: tokio::sync::watch::Sender<u64>,
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    Postgres(Box<postgres::Postgres>),
}

/// Calls the same method on whichever backend the store has.
macro_rules! on_backend {
    ($self:ident . $method:ident ( $($arg:expr),* $(,)? )) => {
        match &$self.backend {
            // Its calls are synchronous: a caller waits for its turn without holding a
            // runtime worker, so one worker at most is ever inside SQLite and the others go
            // on serving sessions (under a dial storm both used to wait on its mutex).
            Backend::Sqlite(b) => {
                let _turn = b.turn.lock().await;
                b.$method($($arg),*)
            }
            Backend::Postgres(b) => b.$method($($arg),*).await,
        }
    };
}

/// What [`Store::record_outcome`] did with a sequenced agent message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// Recorded now, with its writes.
    New,
    /// Its seq was recorded before (a resend): nothing changed, and an ack is right.
    Duplicate,
    /// Its session's epoch is no longer the cluster's (a newer session began, perhaps on
    /// another replica, or the session's replica was declared dead): nothing changed, and
    /// the message must not be acked, or the agent would drop what nobody recorded.
    Fenced,
}

/// One write of a sequenced agent message, applied by [`Store::record`] in the transaction
/// that checks the session's epoch and the message's seq.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// A row of the cluster's event history (its seq and epoch are the message's).
    Event {
        kind: String,
        object: String,
        detail: String,
    },
    /// The current status of an object.
    Object(ObjectStatus),
    /// The result of a command: it is done (and a set-config's values are forgotten).
    Result {
        command_seq: u64,
        ok: bool,
        message: String,
    },
    /// An entry of the feed (its id and time are the store's).
    Feed(FeedEvent),
    /// A log chunk; the store adds the feed entries it implies (opened, gap, ended).
    Log(LogChunk),
}

/// A chunk of a build or run log as the agent sent it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogChunk {
    /// `namespace/build/container`.
    pub stream: String,
    pub offset: u64,
    pub data: Vec<u8>,
    pub truncated: bool,
    pub eof: bool,
    /// What the stream is (for the `log-opened` entry).
    pub kind: String,
}

/// What appending a log chunk found.
#[derive(Debug, Default, PartialEq)]
struct LogWrite {
    /// The bytes (start, end) this store lacks before the chunk.
    gap: Option<(u64, u64)>,
    /// The stream's first record.
    opened: bool,
    /// The record that ends the stream (eof or truncated).
    ended: bool,
}

impl LogChunk {
    /// The writes that a stored chunk implies, decided the same way on both backends.
    fn implied(&self, cluster: &str, epoch: u64, written: &LogWrite) -> Vec<Write> {
        let entry = |kind: &str, message: String, truncated: bool| {
            Write::Feed(FeedEvent {
                cluster: cluster.into(),
                kind: kind.into(),
                epoch,
                object: self.stream.clone(),
                message,
                truncated,
                ..Default::default()
            })
        };
        let mut writes = Vec::new();
        if written.opened {
            writes.push(entry(
                feed::LOG_OPENED,
                self.kind.chars().take(64).collect(),
                false,
            ));
        }
        if let Some((from, to)) = written.gap {
            tracing::warn!(%cluster, stream = %self.stream, from, to, "log chunk after a gap: this store lacks bytes the agent delivered (restored or replaced?)");
            let detail = format!("bytes {from}..{to} missing: the store lost them");
            writes.push(Write::Event {
                kind: "log-gap".into(),
                object: self.stream.clone(),
                detail: detail.clone(),
            });
            writes.push(entry(feed::LOG_GAP, detail, true));
        }
        if written.ended {
            let end = self.offset.saturating_add(self.data.len() as u64);
            writes.push(entry(feed::LOG_ENDED, format!("{end} bytes"), self.truncated));
        }
        writes
    }
}

/// The body of a set-config command with its values emptied; `None` for other commands. A
/// done command is never sent again: the values of secret config vars are not needed any
/// more, and the hub keeps only their names.
fn forget_config_values(body: &[u8]) -> Option<Vec<u8>> {
    use prost::Message;
    use shapeblock_proto::v1::ServerMessage;
    use shapeblock_proto::v1::server_message::Body;
    let mut message = ServerMessage::decode(body).ok()?;
    let Some(Body::SetConfig(command)) = message.body.as_mut() else {
        return None;
    };
    command.set.values_mut().for_each(String::clear);
    Some(message.encode_to_vec())
}

/// What the hello says of the agent, bounded (the agent's words) and encoded for the store:
/// (version, capabilities as JSON, inventory as JSON).
fn hello_fields(hello: &shapeblock_proto::v1::Hello, now: i64) -> (String, String, Option<String>) {
    let version: String = hello.agent_version.chars().take(64).collect();
    let capabilities: Vec<String> = hello
        .capabilities
        .iter()
        .take(64)
        .map(|c| c.chars().take(64).collect())
        .collect();
    let capabilities = serde_json::to_string(&capabilities).unwrap_or_default();
    let inventory = hello
        .inventory
        .as_ref()
        .map(|i| serde_json::to_string(&InventoryRow::from_proto(i, now)).unwrap_or_default());
    (version, capabilities, inventory)
}

/// A u64 of the hub as a 64-bit SQL integer; past i64::MAX it saturates (a cursor or offset
/// that far finds nothing, rather than failing).
fn big(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A new store id: agents tie what they executed to it, so a replaced store is noticed (see
/// `HelloAck.store_id`).
fn new_store_id() -> Result<String> {
    let mut id = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .map_err(|_| StoreError::Invalid("no system randomness".into()))?;
    Ok(shapeblock_proto::hex(&id))
}

impl Store {
    /// Opens (creating if need be) the store at `location`; a Postgres one is migrated to
    /// this hub's schema first.
    pub async fn open(location: &Location) -> Result<Self> {
        let backend = match location {
            Location::Sqlite(path) => Backend::Sqlite(sqlite::Sqlite::open(path)?),
            Location::Postgres { url, pool_size } => {
                Backend::Postgres(Box::new(postgres::Postgres::connect(url, *pool_size).await?))
            }
        };
        Ok(Self {
            backend,
            tick: tokio::sync::watch::channel(0).0,
        })
    }

    /// Opens a SQLite store (synchronous: SQLite needs no runtime).
    pub fn open_sqlite(path: &Path) -> Result<Self> {
        Ok(Self {
            backend: Backend::Sqlite(sqlite::Sqlite::open(path)?),
            tick: tokio::sync::watch::channel(0).0,
        })
    }

    /// Which backend this store is on ("sqlite" or "postgres"), for logs and the API.
    pub fn backend(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Changes whenever the feed may have grown (in this process).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.tick.subscribe()
    }

    fn bump(&self) {
        self.tick.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes this process's watchers: another replica's commit may have added to the feed.
    pub fn wake_watchers(&self) {
        self.bump();
    }

    /// Whether several hub processes may share this store (Postgres): then each is a replica
    /// with a heartbeat row, and sessions are owned by the replica that began them.
    pub fn replicated(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// What a LISTEN connection of this store dials (Postgres only).
    pub fn listen_config(&self) -> Option<Database> {
        match &self.backend {
            Backend::Sqlite(_) => None,
            Backend::Postgres(b) => Some(b.database()),
        }
    }

    /// Registers this process as replica `id` (its heartbeat row, `addr` for people reading
    /// the table); the sessions it begins from now on are owned by it. SQLite: nothing.
    pub async fn register_replica(&self, id: &str, addr: &str) -> Result<()> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(()),
            Backend::Postgres(b) => b.register_replica(id, addr).await,
        }
    }

    /// Refreshes this replica's heartbeat; false if its row is gone (another replica
    /// declared it dead and handed its clusters on).
    pub async fn replica_heartbeat(&self, id: &str) -> Result<bool> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(true),
            Backend::Postgres(b) => b.replica_heartbeat(id).await,
        }
    }

    /// Declares dead the replicas (other than `me`) whose heartbeat is older than
    /// `dead_after`, and hands on the clusters they held: disconnected, their epoch moved on
    /// (so a replica that was only stalled can record nothing more of them), a
    /// `session-down` entry each. Returns the clusters handed on (id, new epoch).
    pub async fn hand_on_dead_replicas(&self, me: &str, dead_after: Duration) -> Result<Vec<(String, u64)>> {
        let handed = match &self.backend {
            Backend::Sqlite(_) => Vec::new(),
            Backend::Postgres(b) => b.hand_on_dead_replicas(me, dead_after).await?,
        };
        if !handed.is_empty() {
            self.bump();
        }
        Ok(handed)
    }

    /// The current epoch of each of `clusters` and whether it is revoked (unknown ones
    /// left out).
    pub async fn session_epochs(&self, clusters: &[String]) -> Result<Vec<(String, u64, bool)>> {
        on_backend!(self.session_epochs(clusters))
    }

    /// The replica whose session of `cluster` is live, if one is (Postgres only).
    pub async fn session_replica(&self, cluster: &str) -> Result<Option<String>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(None),
            Backend::Postgres(b) => b.session_replica(cluster).await,
        }
    }

    /// Asks replica `holder` (which holds `cluster`'s session) to serve a live App log
    /// follow for replica `requester`: the follow's id. Postgres only.
    pub async fn route_follow(
        &self,
        requester: &str,
        holder: &str,
        cluster: &str,
        request: &[u8],
    ) -> Result<u64> {
        self.postgres()?
            .route_follow(requester, holder, cluster, request)
            .await
    }

    /// A routed follow, if its requester has not ended it.
    pub async fn routed_follow(&self, id: u64) -> Result<Option<RoutedFollow>> {
        self.postgres()?.routed_follow(id).await
    }

    /// The routed follows `holder` is asked to serve.
    pub async fn routed_follows_held_by(&self, holder: &str) -> Result<Vec<u64>> {
        self.postgres()?.routed_follows_held_by(holder).await
    }

    /// Hands `bodies` on to a routed follow's requester, unless more than `room` would then
    /// wait for it (a batch is always taken when nothing waits).
    pub async fn put_routed(&self, id: u64, bodies: &[Vec<u8>], room: usize) -> Result<Put> {
        self.postgres()?.put_routed(id, bodies, room).await
    }

    /// Takes (deletes and returns, in order) up to `most` chunks waiting for a routed follow's
    /// requester; None: the follow is gone.
    pub async fn take_routed(&self, id: u64, most: usize) -> Result<Option<Vec<Vec<u8>>>> {
        self.postgres()?.take_routed(id, most).await
    }

    /// Ends a routed follow (with what waits for it); its holder is told.
    pub async fn end_routed(&self, id: u64) -> Result<()> {
        self.postgres()?.end_routed(id).await
    }

    fn postgres(&self) -> Result<&postgres::Postgres> {
        match &self.backend {
            Backend::Postgres(b) => Ok(b),
            Backend::Sqlite(_) => Err(StoreError::Invalid(
                "only a hub on Postgres has other replicas to route through".into(),
            )),
        }
    }

    /// The replicas with a heartbeat row: (id, started_at ms, heartbeat_at ms, addr).
    pub async fn replicas(&self) -> Result<Vec<(String, i64, i64, String)>> {
        match &self.backend {
            Backend::Sqlite(_) => Ok(Vec::new()),
            Backend::Postgres(b) => b.replicas().await,
        }
    }

    /// The identity of this store, made when it was created.
    pub async fn id(&self) -> Result<String> {
        on_backend!(self.id())
    }

    pub async fn add_token(&self, token_hash: &str, cluster: &str, expires_at: i64) -> Result<()> {
        on_backend!(self.add_token(token_hash, cluster, expires_at))
    }

    pub async fn token(&self, token_hash: &str) -> Result<Option<TokenRow>> {
        on_backend!(self.token(token_hash))
    }

    /// Binds an unused token to a key and its certificate; false if another key won the race.
    pub async fn bind_token(&self, token_hash: &str, key: &str, cert_pem: &str) -> Result<bool> {
        on_backend!(self.bind_token(token_hash, key, cert_pem))
    }

    /// Queues a command (an encoded `ServerMessage` body) for a cluster; returns its seq.
    pub async fn add_command(&self, cluster: &str, body: &[u8]) -> Result<u64> {
        let queued = Queued {
            cluster,
            body,
            kind: "",
            object: "",
            idempotency: None,
        };
        Ok(self.add_command_once(&queued).await?.0)
    }

    /// Queues a command, recording a `queued` event; with an idempotency key (and a digest
    /// of the request), a key seen before returns the command it queued then (and true),
    /// queuing nothing; the same key with another request is refused.
    pub async fn add_command_once(&self, queued: &Queued<'_>) -> Result<(u64, bool)> {
        let outcome = on_backend!(self.add_command_once(queued))?;
        if !outcome.1 {
            self.bump();
        }
        Ok(outcome)
    }

    /// Commands without a result, from `after` on, in order, at most `limit`.
    pub async fn pending_commands(&self, cluster: &str, after: u64, limit: u32) -> Result<Vec<CommandRow>> {
        on_backend!(self.commands_where(cluster, Commands::PendingAfter(after), limit))
    }

    /// Every command of a cluster (for the CLI and tests).
    pub async fn commands(&self, cluster: &str) -> Result<Vec<CommandRow>> {
        on_backend!(self.commands_where(cluster, Commands::After(0), u32::MAX))
    }

    /// One command of a cluster.
    pub async fn command(&self, cluster: &str, seq: u64) -> Result<Option<CommandRow>> {
        Ok(on_backend!(self.commands_where(cluster, Commands::Seq(seq), 1))?
            .into_iter()
            .next())
    }

    /// Marks the commands sent in a session, up to `seq`, delivered.
    pub async fn mark_delivered(&self, cluster: &str, upto: u64) -> Result<()> {
        on_backend!(self.mark_delivered(cluster, upto))
    }

    pub async fn cluster(&self, cluster: &str) -> Result<Option<ClusterRow>> {
        on_backend!(self.cluster(cluster))
    }

    pub async fn clusters(&self) -> Result<Vec<ClusterRow>> {
        on_backend!(self.clusters())
    }

    /// Starts a session: a new epoch, connected, what the hello says kept as fields; returns
    /// (epoch, last agent seq recorded).
    pub async fn begin_session(
        &self,
        cluster: &str,
        hello: &shapeblock_proto::v1::Hello,
    ) -> Result<(u64, u64)> {
        let begun = on_backend!(self.begin_session(cluster, hello))?;
        self.bump();
        Ok(begun)
    }

    /// Keeps the expiry of the certificate a session was opened with.
    pub async fn set_session_certificate(&self, cluster: &str, not_after: i64) -> Result<()> {
        on_backend!(self.set_session_certificate(cluster, not_after))
    }

    /// Keeps a fresh inventory of a cluster.
    pub async fn set_inventory(
        &self,
        cluster: &str,
        inventory: &shapeblock_proto::v1::Inventory,
    ) -> Result<()> {
        let row = InventoryRow::from_proto(inventory, shapeblock_proto::now_unix());
        let json = serde_json::to_string(&row).unwrap_or_default();
        on_backend!(self.set_inventory(cluster, &json))
    }

    /// Ends a session (a `session-down` event with `reason`); marks the cluster
    /// disconnected if it is still the current epoch.
    pub async fn end_session(&self, cluster: &str, epoch: u64, reason: &str) -> Result<()> {
        let reason: String = reason.chars().take(512).collect();
        on_backend!(self.end_session(cluster, epoch, &reason))?;
        self.bump();
        Ok(())
    }

    /// Marks every cluster disconnected (a hub starting: the sessions of the one before it
    /// are gone). Only right while one hub uses the store.
    pub async fn mark_disconnected_all(&self) -> Result<()> {
        on_backend!(self.mark_disconnected_all())
    }

    /// Marks every cluster of `seen` seen now, with the clock skew its last heartbeat
    /// measured if there was one: one statement for a replica's sessions, not one per agent
    /// per heartbeat (which with 10,000 agents was 2,000 writes/s of the database's time).
    pub async fn seen(&self, seen: &[(String, Option<i64>)]) -> Result<()> {
        if seen.is_empty() {
            return Ok(());
        }
        on_backend!(self.seen(seen))
    }

    /// Which of `clusters` have commands not yet done: the sessions to wake when a
    /// notification may have been missed, found with one query instead of a poll per session.
    pub async fn with_pending_commands(&self, clusters: &[String]) -> Result<Vec<String>> {
        if clusters.is_empty() {
            return Ok(Vec::new());
        }
        on_backend!(self.with_pending_commands(clusters))
    }

    /// Records one sequenced agent message, exactly once: returns false (and changes nothing)
    /// when `seq` was already recorded or `epoch` is no longer current. `writes` are applied
    /// in the same transaction, so an ack is only ever sent for what is durably stored, and
    /// a fenced session's writes are refused by the transaction that would have made them.
    pub async fn record(&self, cluster: &str, epoch: u64, seq: u64, writes: &[Write]) -> Result<bool> {
        Ok(self.record_outcome(cluster, epoch, seq, writes).await? == Recorded::New)
    }

    /// [`Store::record`], telling a resend from a fenced session's message.
    pub async fn record_outcome(
        &self,
        cluster: &str,
        epoch: u64,
        seq: u64,
        writes: &[Write],
    ) -> Result<Recorded> {
        self.record_batch(cluster, epoch, &[(seq, writes)]).await
    }

    /// Records several sequenced messages of one session (in seq order) in one transaction:
    /// what a log backlog costs per chunk is then a row, not a commit. [`Recorded::New`] if
    /// any was new (the resends among them change nothing), [`Recorded::Fenced`] if the
    /// epoch is no longer current (none is recorded).
    pub async fn record_batch(
        &self,
        cluster: &str,
        epoch: u64,
        messages: &[(u64, &[Write])],
    ) -> Result<Recorded> {
        if messages.is_empty() {
            return Ok(Recorded::Duplicate);
        }
        let recorded = on_backend!(self.record(cluster, epoch, messages))?;
        if recorded == Recorded::New {
            self.bump();
        }
        Ok(recorded)
    }

    /// The event history of a cluster: (agent seq, kind, object, detail), in seq order.
    pub async fn events(&self, cluster: &str) -> Result<Vec<(u64, String, String, String)>> {
        on_backend!(self.events(cluster))
    }

    pub async fn objects(&self, cluster: &str) -> Result<Vec<ObjectStatus>> {
        on_backend!(self.objects(cluster))
    }

    /// How many bytes of a stream are stored, and whether it ended (eof or truncated),
    /// without reading them.
    pub async fn log_end(&self, cluster: &str, stream: &str) -> Result<(u64, bool)> {
        on_backend!(self.log_end(cluster, stream))
    }

    /// Log bytes of one stream (`namespace/build/container`), concatenated in offset order,
    /// and whether a truncation marker or the end was recorded.
    pub async fn log(&self, cluster: &str, stream: &str) -> Result<(Vec<u8>, bool, bool)> {
        on_backend!(self.log(cluster, stream))
    }

    /// Stores a new API key (its hash only).
    pub async fn add_api_key(&self, id: &str, name: &str, hash: &str) -> Result<ApiKeyRow> {
        on_backend!(self.add_api_key(id, name, hash))
    }

    /// The key with this hash, if it exists and is not revoked.
    pub async fn valid_api_key(&self, hash: &str) -> Result<Option<ApiKeyRow>> {
        on_backend!(self.valid_api_key(hash))
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKeyRow>> {
        on_backend!(self.api_keys())
    }

    /// Revokes a key (again: a no-op); `None` if there is none with this id.
    pub async fn revoke_api_key(&self, id: &str) -> Result<Option<ApiKeyRow>> {
        on_backend!(self.revoke_api_key(id))
    }

    /// Tokens (hash, row), of one cluster or all, newest last.
    pub async fn tokens(&self, cluster: Option<&str>) -> Result<Vec<(String, TokenRow)>> {
        on_backend!(self.tokens(cluster))
    }

    /// Deletes a token nobody has used.
    pub async fn revoke_token(&self, token_hash: &str) -> Result<TokenRevoke> {
        on_backend!(self.revoke_token(token_hash))
    }

    /// Records a certificate the CA signed for a cluster.
    pub async fn add_certificate(&self, serial: &str, cluster: &str, not_after: i64) -> Result<()> {
        on_backend!(self.add_certificate(serial, cluster, not_after))
    }

    /// A revoked cluster enrolled again with a new token: a member again.
    pub async fn rejoined(&self, cluster: &str) -> Result<()> {
        on_backend!(self.rejoined(cluster))
    }

    /// Whether a certificate of `cluster` with `serial` may open a session: not revoked; one
    /// the store has no record of (signed by a hub from before the record) only if the
    /// cluster was never revoked.
    pub async fn certificate_allowed(&self, cluster: &str, serial: &str) -> Result<bool> {
        on_backend!(self.certificate_allowed(cluster, serial))
    }

    /// Revokes every certificate of a cluster and drops its tokens (used ones too: a used
    /// token answers its key with the revoked certificate); false if the cluster is unknown.
    pub async fn revoke_cluster(&self, cluster: &str) -> Result<bool> {
        let found = on_backend!(self.revoke_cluster(cluster))?;
        if found {
            self.bump();
        }
        Ok(found)
    }

    /// The id of the feed's last entry (0: none yet): where a reader of what is new starts.
    pub async fn feed_end(&self) -> Result<u64> {
        on_backend!(self.feed_end())
    }

    /// Feed entries after `after`, of one cluster or all, in order, at most `limit`.
    pub async fn feed_after(&self, cluster: Option<&str>, after: u64, limit: u32) -> Result<Vec<FeedEvent>> {
        on_backend!(self.feed_after(cluster, after, limit))
    }

    /// The log streams of a cluster.
    pub async fn log_streams(&self, cluster: &str) -> Result<Vec<LogStreamRow>> {
        on_backend!(self.log_streams(cluster))
    }

    /// At most `limit` bytes of a log from `offset`, up to the first truncation marker.
    /// Offset 0 reads from the first byte kept; another offset whose bytes retention pruned
    /// is refused ([`StoreError::Pruned`], resume at the first byte kept) rather than
    /// answered with the bytes after it as if they followed.
    pub async fn read_log(&self, cluster: &str, stream: &str, offset: u64, limit: usize) -> Result<LogRead> {
        let read = on_backend!(self.read_log(cluster, stream, offset, limit))?;
        if offset > 0 && offset < read.first_offset && read.offset != offset {
            return Err(StoreError::Pruned {
                message: format!(
                    "bytes 0..{first} of log {stream} were pruned by the hub's retention: offset {offset} is gone; \
                     read from offset {first} (the first byte kept)",
                    first = read.first_offset
                ),
                resume: read.first_offset,
            });
        }
        Ok(read)
    }

    /// [`Store::feed_after`] for a reader resuming from a cursor: `after` 0 reads from the
    /// oldest entry kept; another `after` from which retention pruned entries (of `cluster`,
    /// or of any cluster) is refused with [`StoreError::Pruned`], naming the cursor from which
    /// nothing is missing, rather than answered with a silent hole.
    pub async fn feed_resume(&self, cluster: Option<&str>, after: u64, limit: u32) -> Result<Vec<FeedEvent>> {
        let (through, events) = on_backend!(self.feed_page(cluster, after, limit))?;
        if after > 0 && after < through {
            let scope = match cluster {
                Some(c) => format!("of cluster {c}"),
                None => "of every cluster".to_string(),
            };
            return Err(StoreError::Pruned {
                message: format!(
                    "events {scope} after id {after} were pruned by the hub's retention (up to id {through}): \
                     re-read current state (ListObjects, GetCommand) and watch again with after_id {through}"
                ),
                resume: through,
            });
        }
        Ok(events)
    }

    /// One retention pass at `now_ms` (Unix ms; the background task passes the clock, tests
    /// pass any time). On Postgres only one replica prunes at a time: a pass that finds
    /// another replica's pass running skips ([`Pruned::ran`] false).
    pub async fn prune(&self, now_ms: i64, policy: &Retention) -> Result<Pruned> {
        on_backend!(self.prune(now_ms, policy))
    }
}

/// Which commands of a cluster a read wants.
#[derive(Debug, Clone, Copy)]
enum Commands {
    After(u64),
    PendingAfter(u64),
    Seq(u64),
}

/// A token as stored (only its hash is kept).
#[derive(Debug, Clone)]
pub struct TokenRow {
    pub cluster: String,
    pub expires_at: i64,
    /// SHA-256 (hex) of the public key of the first CSR signed with it.
    pub bound_key: Option<String>,
    pub cert_pem: Option<String>,
}

/// A command waiting for (or answered by) the agent.
#[derive(Debug, Clone)]
pub struct CommandRow {
    pub seq: u64,
    /// Encoded `ServerMessage` without its seq.
    pub body: Vec<u8>,
    pub done: bool,
    pub ok: Option<bool>,
    pub message: Option<String>,
    /// Sent to the agent at least once.
    pub delivered: bool,
    pub created_at: i64,
}

/// A cluster's delivery state and what its agent said about itself.
#[derive(Debug, Clone, Default)]
pub struct ClusterRow {
    pub id: String,
    pub epoch: u64,
    pub last_agent_seq: u64,
    pub connected: bool,
    pub last_seen: i64,
    /// From the last hello.
    pub agent_version: Option<String>,
    pub capabilities: Vec<String>,
    /// The latest inventory (hello or refresh).
    pub inventory: Option<InventoryRow>,
    /// Hub clock minus the agent's, in ms, from its last heartbeat (network delay included).
    pub clock_skew_ms: Option<i64>,
    /// `not_after` of the certificate of the latest session (Unix seconds; 0: unknown).
    pub cert_not_after: i64,
    /// Revoked, and not enrolled again since.
    pub revoked: bool,
}

/// A cluster's inventory as stored: named fields (JSON in the store).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InventoryRow {
    pub kubernetes_version: String,
    pub node_count: u32,
    pub allocatable_cpu_millis: u64,
    pub allocatable_memory_bytes: u64,
    /// When the hub received it, Unix seconds.
    pub received_at: i64,
}

impl InventoryRow {
    pub fn from_proto(inventory: &shapeblock_proto::v1::Inventory, received_at: i64) -> Self {
        Self {
            // The agent's words: bounded before they are kept.
            kubernetes_version: inventory.kubernetes_version.chars().take(64).collect(),
            node_count: inventory.node_count,
            allocatable_cpu_millis: inventory.allocatable_cpu_millis,
            allocatable_memory_bytes: inventory.allocatable_memory_bytes,
            received_at,
        }
    }
}

/// The current status of one object, as the agent last reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectStatus {
    pub key: String,
    pub phase: String,
    pub observed_generation: i64,
    pub reason: String,
    pub message: String,
}

/// A command to queue ([`Store::add_command_once`]).
pub struct Queued<'a> {
    pub cluster: &'a str,
    /// Encoded `ServerMessage` without its seq.
    pub body: &'a [u8],
    /// For the `queued` event: the command's kind and the object it names (if one).
    pub kind: &'a str,
    pub object: &'a str,
    /// (key, digest of the request).
    pub idempotency: Option<(&'a str, &'a str)>,
}

/// What the feed's `kind` column holds.
pub mod feed {
    pub const PHASE: &str = "phase";
    pub const RESULT: &str = "result";
    pub const QUEUED: &str = "queued";
    pub const SESSION_UP: &str = "session-up";
    pub const SESSION_DOWN: &str = "session-down";
    pub const LOG_OPENED: &str = "log-opened";
    pub const LOG_ENDED: &str = "log-ended";
    pub const LOG_GAP: &str = "log-gap";
    pub const REVOKED: &str = "revoked";
}

/// One entry of the feed: everything the hub records, numbered in the order it was
/// committed (SQLite `AUTOINCREMENT` inside the writing transaction, and writers take turns,
/// so a reader never sees id n+1 before id n).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeedEvent {
    pub id: u64,
    pub cluster: String,
    pub kind: String,
    pub at_ms: i64,
    pub epoch: u64,
    pub object: String,
    pub phase: String,
    pub reason: String,
    pub message: String,
    pub command_seq: u64,
    pub ok: bool,
    pub truncated: bool,
}

/// An API key as stored (only its hash is kept).
#[derive(Debug, Clone, PartialEq)]
pub struct ApiKeyRow {
    pub id: String,
    pub name: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

/// A log stream: how much is stored and whether it ended.
#[derive(Debug, Clone, PartialEq)]
pub struct LogStreamRow {
    pub stream: String,
    /// Where the stream ends (bytes written so far, pruned ones included).
    pub length: u64,
    /// The first byte kept: retention pruned the bytes before it (0: none pruned).
    pub first_offset: u64,
    pub ended: bool,
    pub truncated: bool,
}

/// Bytes of a log from an offset ([`Store::read_log`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogRead {
    pub offset: u64,
    pub data: Vec<u8>,
    pub next_offset: u64,
    pub truncated: bool,
    /// Nothing follows `next_offset` (complete, or cut short when `truncated`).
    pub eof: bool,
    /// The stream's first byte kept: retention pruned the bytes before it (0: none pruned).
    pub first_offset: u64,
}

/// What revoking a token found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokenRevoke {
    Revoked,
    Used,
    Unknown,
}

/// [`Store::read_log`] over the chunks that end at or after `offset`, in order; `first` is
/// the offset of the stream's first chunk kept.
fn read_rows(offset: u64, limit: usize, first: u64, rows: &[(u64, Vec<u8>, bool, bool)]) -> LogRead {
    let mut out = LogRead {
        offset,
        next_offset: offset,
        first_offset: first,
        ..Default::default()
    };
    let mut pos = offset;
    for (i, (start, data, truncated, eof)) in rows.iter().enumerate() {
        if *start > pos {
            // Inside the bytes a marker says are missing: jump over them.
            if !out.data.is_empty() {
                break;
            }
            pos = *start;
            out.offset = pos;
        }
        let skip = (pos - start) as usize;
        let rest = data.get(skip..).unwrap_or_default();
        let room = limit.saturating_sub(out.data.len());
        let taken = rest.len().min(room);
        out.data.extend_from_slice(&rest[..taken]);
        pos += taken as u64;
        if taken < rest.len() {
            break;
        }
        if *truncated {
            out.truncated = true;
            match rows.get(i + 1) {
                Some((next, ..)) => pos = pos.max(*next),
                None => out.eof = true,
            }
            break;
        }
        if *eof {
            out.eof = true;
            break;
        }
    }
    out.next_offset = pos;
    out
}
