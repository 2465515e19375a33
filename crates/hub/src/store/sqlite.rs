//! The hub's store: SQLite in WAL mode, so the CLI (`token create`, `apply`) and a running hub
//! share one file safely, and a killed hub loses nothing that was acknowledged (every ack is
//! sent after the transaction that recorded the message commits).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{Connection, OptionalExtension, params};

use shapeblock_proto::now_unix;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("hub store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    Invalid(String),
    /// The request contradicts what the store holds (an idempotency key reused).
    #[error("{0}")]
    Conflict(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub struct Store {
    conn: Mutex<Connection>,
    /// Bumped after every commit that may have added to the feed: watchers wait on it
    /// instead of polling the store in a tight loop.
    tick: tokio::sync::watch::Sender<u64>,
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
    pub length: u64,
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
}

/// What revoking a token found.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TokenRevoke {
    Revoked,
    Used,
    Unknown,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS clusters (
  id TEXT PRIMARY KEY, epoch INTEGER NOT NULL DEFAULT 0, last_agent_seq INTEGER NOT NULL DEFAULT 0,
  next_command_seq INTEGER NOT NULL DEFAULT 1, connected INTEGER NOT NULL DEFAULT 0,
  last_seen INTEGER NOT NULL DEFAULT 0, hello TEXT);
CREATE TABLE IF NOT EXISTS tokens (
  hash TEXT PRIMARY KEY, cluster TEXT NOT NULL, expires_at INTEGER NOT NULL,
  bound_key TEXT, cert_pem TEXT);
CREATE TABLE IF NOT EXISTS commands (
  cluster TEXT NOT NULL, seq INTEGER NOT NULL, body BLOB NOT NULL, created_at INTEGER NOT NULL,
  done INTEGER NOT NULL DEFAULT 0, ok INTEGER, message TEXT, PRIMARY KEY (cluster, seq));
CREATE TABLE IF NOT EXISTS events (
  cluster TEXT NOT NULL, agent_seq INTEGER NOT NULL, epoch INTEGER NOT NULL, kind TEXT NOT NULL,
  object TEXT NOT NULL, detail TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (cluster, agent_seq));
CREATE TABLE IF NOT EXISTS objects (
  cluster TEXT NOT NULL, object TEXT NOT NULL, phase TEXT NOT NULL, observed_generation INTEGER NOT NULL,
  reason TEXT NOT NULL, message TEXT NOT NULL, at INTEGER NOT NULL, PRIMARY KEY (cluster, object));
CREATE TABLE IF NOT EXISTS logs (
  cluster TEXT NOT NULL, stream TEXT NOT NULL, offset INTEGER NOT NULL, data BLOB NOT NULL,
  truncated INTEGER NOT NULL DEFAULT 0, eof INTEGER NOT NULL DEFAULT 0,
  PRIMARY KEY (cluster, stream, offset));
CREATE TABLE IF NOT EXISTS feed (
  id INTEGER PRIMARY KEY AUTOINCREMENT, cluster TEXT NOT NULL, kind TEXT NOT NULL,
  at_ms INTEGER NOT NULL, epoch INTEGER NOT NULL DEFAULT 0, object TEXT NOT NULL DEFAULT '',
  phase TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
  command_seq INTEGER NOT NULL DEFAULT 0, ok INTEGER NOT NULL DEFAULT 0,
  truncated INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS feed_by_cluster ON feed (cluster, id);
CREATE TABLE IF NOT EXISTS api_keys (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created_at INTEGER NOT NULL,
  revoked_at INTEGER);
CREATE TABLE IF NOT EXISTS certificates (
  serial TEXT PRIMARY KEY, cluster TEXT NOT NULL, not_after INTEGER NOT NULL,
  issued_at INTEGER NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS idempotency (
  cluster TEXT NOT NULL, key TEXT NOT NULL, request TEXT NOT NULL, seq INTEGER NOT NULL,
  PRIMARY KEY (cluster, key));
";

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        // WAL: readers (the CLI) never block the hub; busy_timeout: the CLI and the hub take
        // turns instead of failing with SQLITE_BUSY.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        // The store's identity, made once with the store: agents tie what they executed to
        // it, so a replaced store is noticed (see `HelloAck.store_id`).
        let mut id = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| StoreError::Invalid("no system randomness".into()))?;
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?1)",
            params![shapeblock_proto::hex(&id)],
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            tick: tokio::sync::watch::channel(0).0,
        })
    }

    /// Changes whenever the feed may have grown (in this process).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.tick.subscribe()
    }

    fn bump(&self) {
        self.tick.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The identity of this store, made when it was created.
    pub fn id(&self) -> Result<String> {
        self.with(|c| Ok(c.query_row("SELECT value FROM meta WHERE key = 'store_id'", [], |r| r.get(0))?))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> Result<T>) -> Result<T> {
        let mut conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut conn)
    }

    fn ensure_cluster(conn: &Connection, cluster: &str) -> Result<()> {
        conn.execute(
            "INSERT OR IGNORE INTO clusters (id) VALUES (?1)",
            params![cluster],
        )?;
        Ok(())
    }

    pub fn add_token(&self, token_hash: &str, cluster: &str, expires_at: i64) -> Result<()> {
        self.with(|c| {
            Self::ensure_cluster(c, cluster)?;
            c.execute(
                "INSERT INTO tokens (hash, cluster, expires_at, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![token_hash, cluster, expires_at, now_unix()],
            )?;
            Ok(())
        })
    }

    pub fn token(&self, token_hash: &str) -> Result<Option<TokenRow>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT cluster, expires_at, bound_key, cert_pem FROM tokens WHERE hash = ?1",
                params![token_hash],
                |r| {
                    Ok(TokenRow {
                        cluster: r.get(0)?,
                        expires_at: r.get(1)?,
                        bound_key: r.get(2)?,
                        cert_pem: r.get(3)?,
                    })
                },
            )
            .optional()?)
        })
    }

    /// Binds an unused token to a key and its certificate; false if another key won the race.
    pub fn bind_token(&self, token_hash: &str, key: &str, cert_pem: &str) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE tokens SET bound_key = ?2, cert_pem = ?3 WHERE hash = ?1 AND bound_key IS NULL",
                params![token_hash, key, cert_pem],
            )?;
            Ok(n == 1)
        })
    }

    /// Queues a command (an encoded `ServerMessage` body) for a cluster; returns its seq.
    pub fn add_command(&self, cluster: &str, body: &[u8]) -> Result<u64> {
        let queued = Queued {
            cluster,
            body,
            kind: "",
            object: "",
            idempotency: None,
        };
        Ok(self.add_command_once(&queued)?.0)
    }

    /// Queues a command, recording a `queued` event; with an idempotency key (and a digest
    /// of the request), a key seen before returns the command it queued then (and true),
    /// queuing nothing; the same key with another request is refused.
    pub fn add_command_once(&self, queued: &Queued<'_>) -> Result<(u64, bool)> {
        let cluster = queued.cluster;
        let outcome = self.with(|c| {
            let tx = c.transaction()?;
            if let Some((key, request)) = queued.idempotency {
                let earlier: Option<(u64, String)> = tx
                    .query_row(
                        "SELECT seq, request FROM idempotency WHERE cluster = ?1 AND key = ?2",
                        params![cluster, key],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                if let Some((seq, digest)) = earlier {
                    if digest != request {
                        return Err(StoreError::Conflict(format!(
                            "idempotency key {key:?} was used for another request (command {seq})"
                        )));
                    }
                    return Ok((seq, true));
                }
            }
            Self::ensure_cluster(&tx, cluster)?;
            let seq: u64 = tx.query_row(
                "UPDATE clusters SET next_command_seq = next_command_seq + 1 WHERE id = ?1 RETURNING next_command_seq - 1",
                params![cluster],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT INTO commands (cluster, seq, body, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![cluster, seq, queued.body, now_unix()],
            )?;
            if let Some((key, request)) = queued.idempotency {
                tx.execute(
                    "INSERT INTO idempotency (cluster, key, request, seq) VALUES (?1, ?2, ?3, ?4)",
                    params![cluster, key, request, seq],
                )?;
            }
            write::feed(
                &tx,
                &FeedEvent {
                    cluster: cluster.into(),
                    kind: feed::QUEUED.into(),
                    object: queued.object.into(),
                    message: queued.kind.into(),
                    command_seq: seq,
                    ..Default::default()
                },
            )?;
            tx.commit()?;
            Ok((seq, false))
        })?;
        self.bump();
        Ok(outcome)
    }

    /// Commands without a result, from `after` on, in order, at most `limit`.
    pub fn pending_commands(&self, cluster: &str, after: u64, limit: u32) -> Result<Vec<CommandRow>> {
        self.commands_where(cluster, "done = 0 AND seq > ?2", after, limit)
    }

    /// Every command of a cluster (for the CLI and tests).
    pub fn commands(&self, cluster: &str) -> Result<Vec<CommandRow>> {
        self.commands_where(cluster, "seq > ?2", 0, u32::MAX)
    }

    fn commands_where(&self, cluster: &str, cond: &str, after: u64, limit: u32) -> Result<Vec<CommandRow>> {
        self.with(|c| {
            let sql = format!(
                "SELECT seq, body, done, ok, message, delivered, created_at FROM commands WHERE cluster = ?1 AND {cond} ORDER BY seq LIMIT ?3"
            );
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt
                .query_map(params![cluster, after, limit], |r| {
                    Ok(CommandRow {
                        seq: r.get(0)?,
                        body: r.get(1)?,
                        done: r.get::<_, i64>(2)? != 0,
                        ok: r.get::<_, Option<i64>>(3)?.map(|v| v != 0),
                        message: r.get(4)?,
                        delivered: r.get::<_, i64>(5)? != 0,
                        created_at: r.get(6)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// One command of a cluster.
    pub fn command(&self, cluster: &str, seq: u64) -> Result<Option<CommandRow>> {
        Ok(self
            .commands_where(cluster, "seq = ?2", seq, 1)?
            .into_iter()
            .next())
    }

    /// Marks the commands sent in a session, up to `seq`, delivered.
    pub fn mark_delivered(&self, cluster: &str, upto: u64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE commands SET delivered = 1 WHERE cluster = ?1 AND seq <= ?2 AND delivered = 0",
                params![cluster, upto],
            )?;
            Ok(())
        })
    }

    pub fn cluster(&self, cluster: &str) -> Result<Option<ClusterRow>> {
        self.with(|c| {
            Ok(c.query_row(
                &format!("SELECT {CLUSTER_COLUMNS} FROM clusters WHERE id = ?1"),
                params![cluster],
                cluster_row,
            )
            .optional()?)
        })
    }

    pub fn clusters(&self) -> Result<Vec<ClusterRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("SELECT {CLUSTER_COLUMNS} FROM clusters ORDER BY id"))?;
            let rows = stmt.query_map([], cluster_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// Starts a session: a new epoch, connected, what the hello says kept as fields; returns
    /// (epoch, last agent seq recorded).
    pub fn begin_session(&self, cluster: &str, hello: &shapeblock_proto::v1::Hello) -> Result<(u64, u64)> {
        let now = now_unix();
        // The agent's words: bounded before they are kept.
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
        let begun = self.with(|c| {
            let tx = c.transaction()?;
            Self::ensure_cluster(&tx, cluster)?;
            let (epoch, last): (u64, u64) = tx.query_row(
                "UPDATE clusters SET epoch = epoch + 1, connected = 1, last_seen = ?2, hello = NULL,
                   agent_version = ?3, capabilities = ?4, inventory = coalesce(?5, inventory)
                 WHERE id = ?1 RETURNING epoch, last_agent_seq",
                params![cluster, now, version, capabilities, inventory],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            write::feed(
                &tx,
                &FeedEvent {
                    cluster: cluster.into(),
                    kind: feed::SESSION_UP.into(),
                    epoch,
                    message: format!("agent {version}"),
                    ..Default::default()
                },
            )?;
            tx.commit()?;
            Ok((epoch, last))
        })?;
        self.bump();
        Ok(begun)
    }

    /// Keeps the expiry of the certificate a session was opened with.
    pub fn set_session_certificate(&self, cluster: &str, not_after: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE clusters SET cert_not_after = ?2 WHERE id = ?1",
                params![cluster, not_after],
            )?;
            Ok(())
        })
    }

    /// Keeps a fresh inventory of a cluster.
    pub fn set_inventory(&self, cluster: &str, inventory: &shapeblock_proto::v1::Inventory) -> Result<()> {
        let row = InventoryRow::from_proto(inventory, now_unix());
        let json = serde_json::to_string(&row).unwrap_or_default();
        self.with(|c| {
            c.execute(
                "UPDATE clusters SET inventory = ?2 WHERE id = ?1",
                params![cluster, json],
            )?;
            Ok(())
        })
    }

    /// Keeps the clock skew measured from a heartbeat.
    pub fn set_clock_skew(&self, cluster: &str, skew_ms: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE clusters SET clock_skew_ms = ?2 WHERE id = ?1",
                params![cluster, skew_ms],
            )?;
            Ok(())
        })
    }

    /// Ends a session (a `session-down` event with `reason`); marks the cluster
    /// disconnected if it is still the current epoch.
    pub fn end_session(&self, cluster: &str, epoch: u64, reason: &str) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE clusters SET connected = 0 WHERE id = ?1 AND epoch = ?2",
                params![cluster, epoch],
            )?;
            write::feed(
                &tx,
                &FeedEvent {
                    cluster: cluster.into(),
                    kind: feed::SESSION_DOWN.into(),
                    epoch,
                    message: reason.chars().take(512).collect(),
                    ..Default::default()
                },
            )?;
            tx.commit()?;
            Ok(())
        })?;
        self.bump();
        Ok(())
    }

    pub fn mark_disconnected_all(&self) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE clusters SET connected = 0", [])?;
            Ok(())
        })
    }

    pub fn touch(&self, cluster: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE clusters SET last_seen = ?2 WHERE id = ?1",
                params![cluster, now_unix()],
            )?;
            Ok(())
        })
    }

    /// Records one sequenced agent message, exactly once: returns false (and changes nothing)
    /// when `seq` was already recorded or `epoch` is no longer current. `apply` runs in the
    /// same transaction, so an ack is only ever sent for what is durably stored.
    pub fn record(
        &self,
        cluster: &str,
        epoch: u64,
        seq: u64,
        apply: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<()>,
    ) -> Result<bool> {
        self.with(|c| {
            let tx = c.transaction()?;
            let (current, last): (u64, u64) = tx.query_row(
                "SELECT epoch, last_agent_seq FROM clusters WHERE id = ?1",
                params![cluster],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if current != epoch || seq <= last {
                return Ok(false);
            }
            apply(&tx)?;
            tx.execute(
                "UPDATE clusters SET last_agent_seq = ?2, last_seen = ?3 WHERE id = ?1",
                params![cluster, seq, now_unix()],
            )?;
            tx.commit()?;
            Ok(true)
        })
        .inspect(|recorded| {
            if *recorded {
                self.bump();
            }
        })
    }

    pub fn events(&self, cluster: &str) -> Result<Vec<(u64, String, String, String)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT agent_seq, kind, object, detail FROM events WHERE cluster = ?1 ORDER BY agent_seq",
            )?;
            let rows = stmt
                .query_map(params![cluster], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    pub fn objects(&self, cluster: &str) -> Result<Vec<ObjectStatus>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT object, phase, observed_generation, reason, message FROM objects WHERE cluster = ?1 ORDER BY object",
            )?;
            let rows = stmt
                .query_map(params![cluster], |r| {
                    Ok(ObjectStatus {
                        key: r.get(0)?,
                        phase: r.get(1)?,
                        observed_generation: r.get(2)?,
                        reason: r.get(3)?,
                        message: r.get(4)?,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// How many bytes of a stream are stored, and whether it ended (eof or truncated),
    /// without reading them.
    pub fn log_end(&self, cluster: &str, stream: &str) -> Result<(u64, bool)> {
        self.with(|c| {
            let end = c
                .query_row(
                    "SELECT offset + length(data), eof OR truncated FROM logs WHERE cluster = ?1 AND stream = ?2 ORDER BY offset DESC LIMIT 1",
                    params![cluster, stream],
                    |r| Ok((r.get::<_, u64>(0)?, r.get::<_, i64>(1)? != 0)),
                )
                .optional()?;
            Ok(end.unwrap_or((0, false)))
        })
    }

    /// Log bytes of one stream (`namespace/build/container`), concatenated in offset order,
    /// and whether a truncation marker or the end was recorded.
    pub fn log(&self, cluster: &str, stream: &str) -> Result<(Vec<u8>, bool, bool)> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT data, truncated, eof FROM logs WHERE cluster = ?1 AND stream = ?2 ORDER BY offset",
            )?;
            let mut out = Vec::new();
            let (mut truncated, mut eof) = (false, false);
            let mut rows = stmt.query(params![cluster, stream])?;
            while let Some(r) = rows.next()? {
                out.extend_from_slice(&r.get::<_, Vec<u8>>(0)?);
                truncated |= r.get::<_, i64>(1)? != 0;
                eof |= r.get::<_, i64>(2)? != 0;
            }
            Ok((out, truncated, eof))
        })
    }

    /// Stores a new API key (its hash only).
    pub fn add_api_key(&self, id: &str, name: &str, hash: &str) -> Result<ApiKeyRow> {
        let created_at = now_unix();
        self.with(|c| {
            c.execute(
                "INSERT INTO api_keys (id, name, hash, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![id, name, hash, created_at],
            )?;
            Ok(ApiKeyRow {
                id: id.into(),
                name: name.into(),
                created_at,
                revoked_at: None,
            })
        })
    }

    /// The key with this hash, if it exists and is not revoked.
    pub fn valid_api_key(&self, hash: &str) -> Result<Option<ApiKeyRow>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT id, name, created_at, revoked_at FROM api_keys WHERE hash = ?1 AND revoked_at IS NULL",
                params![hash],
                api_key_row,
            )
            .optional()?)
        })
    }

    pub fn api_keys(&self) -> Result<Vec<ApiKeyRow>> {
        self.with(|c| {
            let mut stmt =
                c.prepare("SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY rowid")?;
            let rows = stmt.query_map([], api_key_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// Revokes a key (again: a no-op); `None` if there is none with this id.
    pub fn revoke_api_key(&self, id: &str) -> Result<Option<ApiKeyRow>> {
        self.with(|c| {
            c.execute(
                "UPDATE api_keys SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
                params![id, now_unix()],
            )?;
            Ok(c.query_row(
                "SELECT id, name, created_at, revoked_at FROM api_keys WHERE id = ?1",
                params![id],
                api_key_row,
            )
            .optional()?)
        })
    }

    /// Tokens (hash, row), of one cluster or all, newest last.
    pub fn tokens(&self, cluster: Option<&str>) -> Result<Vec<(String, TokenRow)>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT hash, cluster, expires_at, bound_key, cert_pem FROM tokens
                 WHERE ?1 IS NULL OR cluster = ?1 ORDER BY created_at, rowid",
            )?;
            let rows = stmt
                .query_map(params![cluster], |r| {
                    Ok((
                        r.get(0)?,
                        TokenRow {
                            cluster: r.get(1)?,
                            expires_at: r.get(2)?,
                            bound_key: r.get(3)?,
                            cert_pem: r.get(4)?,
                        },
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// Deletes a token nobody has used.
    pub fn revoke_token(&self, token_hash: &str) -> Result<TokenRevoke> {
        self.with(|c| {
            let bound: Option<Option<String>> = c
                .query_row(
                    "SELECT bound_key FROM tokens WHERE hash = ?1",
                    params![token_hash],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(match bound {
                None => TokenRevoke::Unknown,
                Some(Some(_)) => TokenRevoke::Used,
                Some(None) => {
                    c.execute("DELETE FROM tokens WHERE hash = ?1", params![token_hash])?;
                    TokenRevoke::Revoked
                }
            })
        })
    }

    /// Records a certificate the CA signed for a cluster.
    pub fn add_certificate(&self, serial: &str, cluster: &str, not_after: i64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT OR IGNORE INTO certificates (serial, cluster, not_after, issued_at) VALUES (?1, ?2, ?3, ?4)",
                params![serial, cluster, not_after, now_unix()],
            )?;
            Ok(())
        })
    }

    /// A revoked cluster enrolled again with a new token: a member again.
    pub fn rejoined(&self, cluster: &str) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE clusters SET revoked = 0 WHERE id = ?1", params![cluster])?;
            Ok(())
        })
    }

    /// Whether a certificate of `cluster` with `serial` may open a session: not revoked; one
    /// the store has no record of (signed by a hub from before the record) only if the
    /// cluster was never revoked.
    pub fn certificate_allowed(&self, cluster: &str, serial: &str) -> Result<bool> {
        self.with(|c| {
            let revoked: Option<i64> = c
                .query_row(
                    "SELECT revoked FROM certificates WHERE serial = ?1 AND cluster = ?2",
                    params![serial, cluster],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(revoked) = revoked {
                return Ok(revoked == 0);
            }
            let ever_revoked: Option<i64> = c
                .query_row(
                    "SELECT revoked_at FROM clusters WHERE id = ?1",
                    params![cluster],
                    |r| r.get(0),
                )
                .optional()?
                .flatten();
            Ok(ever_revoked.is_none())
        })
    }

    /// Revokes every certificate of a cluster and drops its tokens (used ones too: a used
    /// token answers its key with the revoked certificate); false if the cluster is unknown.
    pub fn revoke_cluster(&self, cluster: &str) -> Result<bool> {
        let found = self.with(|c| {
            let tx = c.transaction()?;
            let n = tx.execute(
                "UPDATE clusters SET revoked = 1, revoked_at = ?2 WHERE id = ?1",
                params![cluster, now_unix()],
            )?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute(
                "UPDATE certificates SET revoked = 1 WHERE cluster = ?1",
                params![cluster],
            )?;
            tx.execute("DELETE FROM tokens WHERE cluster = ?1", params![cluster])?;
            write::feed(
                &tx,
                &FeedEvent {
                    cluster: cluster.into(),
                    kind: feed::REVOKED.into(),
                    ..Default::default()
                },
            )?;
            tx.commit()?;
            Ok(true)
        })?;
        if found {
            self.bump();
        }
        Ok(found)
    }

    /// Feed entries after `after`, of one cluster or all, in order, at most `limit`.
    pub fn feed_after(&self, cluster: Option<&str>, after: u64, limit: u32) -> Result<Vec<FeedEvent>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, cluster, kind, at_ms, epoch, object, phase, reason, message, command_seq, ok, truncated
                 FROM feed WHERE id > ?2 AND (?1 IS NULL OR cluster = ?1) ORDER BY id LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(params![cluster, after, limit], |r| {
                    Ok(FeedEvent {
                        id: r.get(0)?,
                        cluster: r.get(1)?,
                        kind: r.get(2)?,
                        at_ms: r.get(3)?,
                        epoch: r.get(4)?,
                        object: r.get(5)?,
                        phase: r.get(6)?,
                        reason: r.get(7)?,
                        message: r.get(8)?,
                        command_seq: r.get(9)?,
                        ok: r.get::<_, i64>(10)? != 0,
                        truncated: r.get::<_, i64>(11)? != 0,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// The log streams of a cluster.
    pub fn log_streams(&self, cluster: &str) -> Result<Vec<LogStreamRow>> {
        self.with(|c| {
            // The last chunk by offset ends a stream (chunks never overlap).
            let mut stmt = c.prepare(
                "SELECT stream, offset + length(data), eof, truncated FROM logs AS l
                 WHERE cluster = ?1 AND offset = (SELECT max(offset) FROM logs WHERE cluster = l.cluster AND stream = l.stream)
                 ORDER BY stream",
            )?;
            let rows = stmt
                .query_map(params![cluster], |r| {
                    let (eof, truncated) = (r.get::<_, i64>(2)? != 0, r.get::<_, i64>(3)? != 0);
                    Ok(LogStreamRow {
                        stream: r.get(0)?,
                        length: r.get(1)?,
                        ended: eof || truncated,
                        truncated,
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// At most `limit` bytes of a log from `offset`, up to the first truncation marker.
    pub fn read_log(&self, cluster: &str, stream: &str, offset: u64, limit: usize) -> Result<LogRead> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT offset, data, truncated, eof FROM logs
                 WHERE cluster = ?1 AND stream = ?2 AND offset + length(data) >= ?3 ORDER BY offset LIMIT 512",
            )?;
            let rows = stmt
                .query_map(params![cluster, stream, offset], |r| {
                    Ok((
                        r.get::<_, u64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)? != 0,
                        r.get::<_, i64>(3)? != 0,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(read_rows(offset, limit, &rows))
        })
    }
}

/// [`Store::read_log`] over the chunks that end at or after `offset`, in order.
fn read_rows(offset: u64, limit: usize, rows: &[(u64, Vec<u8>, bool, bool)]) -> LogRead {
    let mut out = LogRead {
        offset,
        next_offset: offset,
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

fn api_key_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ApiKeyRow> {
    Ok(ApiKeyRow {
        id: r.get(0)?,
        name: r.get(1)?,
        created_at: r.get(2)?,
        revoked_at: r.get(3)?,
    })
}

/// Columns added after the first release: a store made by an older hub gets them on open.
const ADDED_COLUMNS: [(&str, &str, &str); 9] = [
    ("clusters", "agent_version", "TEXT"),
    ("clusters", "capabilities", "TEXT"),
    ("clusters", "inventory", "TEXT"),
    ("clusters", "clock_skew_ms", "INTEGER"),
    ("clusters", "cert_not_after", "INTEGER NOT NULL DEFAULT 0"),
    ("clusters", "revoked", "INTEGER NOT NULL DEFAULT 0"),
    ("clusters", "revoked_at", "INTEGER"),
    ("commands", "delivered", "INTEGER NOT NULL DEFAULT 0"),
    ("tokens", "created_at", "INTEGER NOT NULL DEFAULT 0"),
];

fn migrate(conn: &Connection) -> Result<()> {
    for (table, column, kind) in ADDED_COLUMNS {
        let present: bool = conn.query_row(
            "SELECT count(*) FROM pragma_table_info(?1) WHERE name = ?2",
            params![table, column],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !present {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
        }
    }
    Ok(())
}

const CLUSTER_COLUMNS: &str = "id, epoch, last_agent_seq, connected, last_seen, agent_version, capabilities, inventory, clock_skew_ms, cert_not_after, revoked";

fn cluster_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClusterRow> {
    let capabilities: Option<String> = r.get(6)?;
    let inventory: Option<String> = r.get(7)?;
    Ok(ClusterRow {
        id: r.get(0)?,
        epoch: r.get(1)?,
        last_agent_seq: r.get(2)?,
        connected: r.get::<_, i64>(3)? != 0,
        last_seen: r.get(4)?,
        agent_version: r.get(5)?,
        capabilities: capabilities
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or_default(),
        inventory: inventory.and_then(|i| serde_json::from_str(&i).ok()),
        clock_skew_ms: r.get(8)?,
        cert_not_after: r.get(9)?,
        revoked: r.get::<_, i64>(10)? != 0,
    })
}

/// Writes for [`Store::record`]'s callback.
pub mod write {
    use super::*;

    /// Appends to the feed (its id and time are the store's).
    pub fn feed(conn: &Connection, e: &FeedEvent) -> Result<()> {
        conn.execute(
            "INSERT INTO feed (cluster, kind, at_ms, epoch, object, phase, reason, message, command_seq, ok, truncated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                e.cluster,
                e.kind,
                shapeblock_proto::now_unix_ms(),
                e.epoch,
                e.object,
                e.phase,
                e.reason,
                e.message,
                e.command_seq,
                e.ok as i64,
                e.truncated as i64
            ],
        )?;
        Ok(())
    }

    /// What [`log`] stored.
    #[derive(Debug, Default, PartialEq)]
    pub struct LogWrite {
        /// The bytes (start, end) this store lacks before the chunk.
        pub gap: Option<(u64, u64)>,
        /// The stream's first record.
        pub opened: bool,
        /// The record that ends the stream (eof or truncated).
        pub ended: bool,
    }

    pub fn event(
        tx: &rusqlite::Transaction<'_>,
        cluster: &str,
        seq: u64,
        epoch: u64,
        kind: &str,
        object: &str,
        detail: &str,
    ) -> Result<()> {
        tx.execute(
            "INSERT INTO events (cluster, agent_seq, epoch, kind, object, detail, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![cluster, seq, epoch, kind, object, detail, now_unix()],
        )?;
        Ok(())
    }

    pub fn object(tx: &rusqlite::Transaction<'_>, cluster: &str, status: &ObjectStatus) -> Result<()> {
        tx.execute(
            "INSERT INTO objects (cluster, object, phase, observed_generation, reason, message, at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (cluster, object) DO UPDATE SET phase = excluded.phase,
               observed_generation = excluded.observed_generation, reason = excluded.reason,
               message = excluded.message, at = excluded.at",
            params![
                cluster,
                status.key,
                status.phase,
                status.observed_generation,
                status.reason,
                status.message,
                now_unix()
            ],
        )?;
        Ok(())
    }

    pub fn result(
        tx: &rusqlite::Transaction<'_>,
        cluster: &str,
        command_seq: u64,
        ok: bool,
        message: &str,
    ) -> Result<()> {
        tx.execute(
            "UPDATE commands SET done = 1, ok = ?3, message = ?4 WHERE cluster = ?1 AND seq = ?2",
            params![cluster, command_seq, ok as i64, message],
        )?;
        // A done command is never sent again: the values of secret config vars are not
        // needed any more, and the hub keeps only their names.
        let body: Option<Vec<u8>> = tx
            .query_row(
                "SELECT body FROM commands WHERE cluster = ?1 AND seq = ?2",
                params![cluster, command_seq],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(redacted) = body.as_deref().and_then(forget_config_values) {
            tx.execute(
                "UPDATE commands SET body = ?3 WHERE cluster = ?1 AND seq = ?2",
                params![cluster, command_seq, redacted],
            )?;
        }
        Ok(())
    }

    /// The body of a set-config command with its values emptied; `None` for other commands.
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

    /// Appends a log chunk. A chunk that overlaps what is stored is cut to the new bytes, so a
    /// replay never duplicates a byte. One that leaves a gap is stored after a truncation
    /// marker where the gap begins, and the gap (start, end) is reported: the agent counts
    /// offsets itself, so a gap means this store lost bytes it had acknowledged (restored
    /// from a backup, replaced). Refusing the chunk would end every session of the agent on
    /// the same resend.
    pub fn log(
        tx: &rusqlite::Transaction<'_>,
        cluster: &str,
        stream: &str,
        offset: u64,
        data: &[u8],
        truncated: bool,
        eof: bool,
    ) -> Result<LogWrite> {
        // Stored chunks never overlap, so the last one by offset ends the log: one index
        // lookup, not a scan of every chunk (a 1 GiB log is 32,768 of them).
        let last: Option<(u64, bool)> = tx
            .query_row(
                "SELECT offset + length(data), eof OR truncated FROM logs WHERE cluster = ?1 AND stream = ?2 ORDER BY offset DESC LIMIT 1",
                params![cluster, stream],
                |r| Ok((r.get(0)?, r.get::<_, i64>(1)? != 0)),
            )
            .optional()?;
        let (end, ended_before) = last.unwrap_or((0, false));
        let mut gap = None;
        if offset > end && !truncated {
            tx.execute(
                "INSERT OR REPLACE INTO logs (cluster, stream, offset, data, truncated, eof) VALUES (?1, ?2, ?3, x'', 1, 0)",
                params![cluster, stream, end],
            )?;
            gap = Some((end, offset));
        }
        let skip = end.saturating_sub(offset) as usize;
        if skip >= data.len() && !truncated && !eof {
            return Ok(LogWrite {
                gap,
                ..Default::default()
            });
        }
        let data = data.get(skip..).unwrap_or_default();
        tx.execute(
            "INSERT OR REPLACE INTO logs (cluster, stream, offset, data, truncated, eof) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![cluster, stream, offset.max(end), data, truncated as i64, eof as i64],
        )?;
        Ok(LogWrite {
            gap,
            opened: last.is_none(),
            ended: (truncated || eof) && !ended_before,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_reads_from_any_offset_jumps_a_gap_after_its_marker_and_says_where_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hub.sqlite")).unwrap();
        store.add_token("h", "c", i64::MAX).unwrap();
        let (epoch, _) = store.begin_session("c", &Default::default()).unwrap();
        let mut seq = 0;
        let mut chunk = |offset: u64, data: &[u8], eof: bool| {
            seq += 1;
            let mut written = write::LogWrite::default();
            store
                .record("c", epoch, seq, |tx| {
                    written = write::log(tx, "c", "ns/b/build", offset, data, false, eof)?;
                    Ok(())
                })
                .unwrap();
            written
        };
        assert!(chunk(0, b"hello ", false).opened);
        // A chunk past the end: the store lost bytes 6..10.
        let gapped = chunk(10, b"world", false);
        assert_eq!(
            (gapped.gap, gapped.opened, gapped.ended),
            (Some((6, 10)), false, false)
        );
        let read = |offset, limit| store.read_log("c", "ns/b/build", offset, limit).unwrap();
        let first = read(0, 1 << 20);
        assert_eq!(
            (
                first.data.as_slice(),
                first.truncated,
                first.eof,
                first.next_offset
            ),
            (&b"hello "[..], true, false, 10)
        );
        let second = read(first.next_offset, 1 << 20);
        assert_eq!(
            (second.offset, second.data.as_slice(), second.eof),
            (10, &b"world"[..], false)
        );
        assert_eq!(read(2, 3).data, b"llo");
        assert_eq!(read(8, 100).offset, 10, "inside the gap: from its end");
        assert!(chunk(15, b"!", true).ended);
        let last = read(15, 100);
        assert_eq!(
            (last.data.as_slice(), last.eof, last.next_offset),
            (&b"!"[..], true, 16)
        );
        let streams = store.log_streams("c").unwrap();
        assert_eq!(
            streams,
            [LogStreamRow {
                stream: "ns/b/build".into(),
                length: 16,
                ended: true,
                truncated: false
            }]
        );
        let kinds: Vec<String> = store
            .feed_after(Some("c"), 0, 100)
            .unwrap()
            .into_iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(
            kinds,
            [feed::SESSION_UP],
            "log events are the hub's, written in handle"
        );
    }

    #[test]
    fn a_store_keeps_its_id_an_old_one_gains_the_new_columns_and_a_new_one_has_another_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.sqlite");
        // A store as hubs before these columns made it, with a cluster in it.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(
                "CREATE TABLE clusters (id TEXT PRIMARY KEY, epoch INTEGER NOT NULL DEFAULT 0,
                   last_agent_seq INTEGER NOT NULL DEFAULT 0, next_command_seq INTEGER NOT NULL DEFAULT 1,
                   connected INTEGER NOT NULL DEFAULT 0, last_seen INTEGER NOT NULL DEFAULT 0, hello TEXT);
                 INSERT INTO clusters (id, hello) VALUES ('old', 'Hello { .. }');",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        let id = store.id().unwrap();
        assert_eq!(id.len(), 32);
        let old = store.cluster("old").unwrap().unwrap();
        assert_eq!((old.agent_version, old.inventory), (None, None));
        let hello = shapeblock_proto::v1::Hello {
            agent_version: "1.2.3".into(),
            capabilities: vec!["apply".into(), "x".repeat(500)],
            inventory: Some(shapeblock_proto::v1::Inventory {
                kubernetes_version: "v1.35.0".into(),
                node_count: 3,
                allocatable_cpu_millis: 6000,
                allocatable_memory_bytes: 1 << 34,
            }),
        };
        store.begin_session("old", &hello).unwrap();
        store.set_clock_skew("old", -250).unwrap();
        let row = store.cluster("old").unwrap().unwrap();
        assert_eq!(row.agent_version.as_deref(), Some("1.2.3"));
        assert_eq!(row.capabilities[0], "apply");
        assert_eq!(row.capabilities[1].len(), 64, "bounded");
        let inventory = row.inventory.unwrap();
        assert_eq!(
            (inventory.node_count, inventory.kubernetes_version.as_str()),
            (3, "v1.35.0")
        );
        assert_eq!(row.clock_skew_ms, Some(-250));
        drop(store);
        assert_eq!(Store::open(&path).unwrap().id().unwrap(), id, "kept across opens");
        std::fs::remove_file(&path).unwrap();
        assert_ne!(
            Store::open(&path).unwrap().id().unwrap(),
            id,
            "a new store, a new id"
        );
    }
}
