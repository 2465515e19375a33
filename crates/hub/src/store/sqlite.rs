//! The SQLite backend: one file in WAL mode, so the CLI and a running hub share it safely.
//! One connection behind a mutex: writers take turns, which is what numbers the feed in
//! commit order.

use std::path::Path;
use std::sync::Mutex;

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};

use shapeblock_proto::now_unix;

use super::retention::{self, Cut, StreamSize};
use super::*;

pub(super) struct Sqlite {
    conn: Mutex<Connection>,
    /// Taken (asynchronously) around every call from the async store: see `on_backend!`.
    pub(super) turn: tokio::sync::Mutex<()>,
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
CREATE TABLE IF NOT EXISTS feed_pruned (cluster TEXT PRIMARY KEY, through INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS events_by_at ON events (at);
CREATE INDEX IF NOT EXISTS commands_pending ON commands (cluster) WHERE done = 0;
";

/// Indexes on columns [`ADDED_COLUMNS`] may have just added.
const ADDED_INDEXES: &str = "
CREATE INDEX IF NOT EXISTS logs_ended ON logs (at_ms) WHERE eof OR truncated;
";

impl Sqlite {
    pub(super) fn open(path: &Path) -> Result<Self> {
        let conn = Connection::open(path)?;
        // WAL: readers (the CLI) never block the hub; busy_timeout: the CLI and the hub take
        // turns instead of failing with SQLITE_BUSY.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&conn)?;
        conn.execute_batch(ADDED_INDEXES)?;
        // The store's identity, made once with the store.
        conn.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?1)",
            params![new_store_id()?],
        )?;
        Ok(Self {
            conn: Mutex::new(conn),
            turn: tokio::sync::Mutex::new(()),
        })
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

    /// Queues a command, recording a `queued` event; with an idempotency key (and a digest
    /// of the request), a key seen before returns the command it queued then (and true),
    /// queuing nothing; the same key with another request is refused.
    pub fn add_command_once(&self, queued: &Queued<'_>) -> Result<(u64, bool)> {
        let cluster = queued.cluster;
        self.with(|c| {
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
            write_feed(
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
        })
    }

    pub(super) fn commands_where(
        &self,
        cluster: &str,
        which: Commands,
        limit: u32,
    ) -> Result<Vec<CommandRow>> {
        let (cond, after) = match which {
            Commands::After(after) => ("seq > ?2", after),
            Commands::PendingAfter(after) => ("done = 0 AND seq > ?2", after),
            Commands::Seq(seq) => ("seq = ?2", seq),
        };
        self.with(|c| {
            let sql = format!(
                "SELECT seq, body, done, ok, message, delivered, created_at FROM commands WHERE cluster = ?1 AND {cond} ORDER BY seq LIMIT ?3"
            );
            let mut stmt = c.prepare(&sql)?;
            let rows = stmt
                .query_map(params![cluster, big(after), limit], |r| {
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
        let (version, capabilities, inventory) = hello_fields(hello, now);
        self.with(|c| {
            let tx = c.transaction()?;
            Self::ensure_cluster(&tx, cluster)?;
            let (epoch, last): (u64, u64) = tx.query_row(
                "UPDATE clusters SET epoch = epoch + 1, connected = 1, last_seen = ?2, hello = NULL,
                   agent_version = ?3, capabilities = ?4, inventory = coalesce(?5, inventory)
                 WHERE id = ?1 RETURNING epoch, last_agent_seq",
                params![cluster, now, version, capabilities, inventory],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            write_feed(
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
        })
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
    pub fn set_inventory(&self, cluster: &str, json: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE clusters SET inventory = ?2 WHERE id = ?1",
                params![cluster, json],
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
            write_feed(
                &tx,
                &FeedEvent {
                    cluster: cluster.into(),
                    kind: feed::SESSION_DOWN.into(),
                    epoch,
                    message: reason.into(),
                    ..Default::default()
                },
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    pub fn session_epochs(&self, clusters: &[String]) -> Result<Vec<(String, u64, bool)>> {
        self.with(|c| {
            let mut stmt = c.prepare_cached("SELECT epoch, revoked FROM clusters WHERE id = ?1")?;
            let mut out = Vec::new();
            for cluster in clusters {
                let row: Option<(u64, bool)> = stmt
                    .query_row(params![cluster], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?;
                if let Some((epoch, revoked)) = row {
                    out.push((cluster.clone(), epoch, revoked));
                }
            }
            Ok(out)
        })
    }

    pub fn mark_disconnected_all(&self) -> Result<()> {
        self.with(|c| {
            c.execute("UPDATE clusters SET connected = 0", [])?;
            Ok(())
        })
    }

    pub fn seen(&self, seen: &[(String, Option<i64>)]) -> Result<()> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut update = tx.prepare_cached(
                    "UPDATE clusters SET last_seen = ?2, clock_skew_ms = COALESCE(?3, clock_skew_ms) WHERE id = ?1",
                )?;
                let now = now_unix();
                for (cluster, skew) in seen {
                    update.execute(params![cluster, now, skew])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    pub fn with_pending_commands(&self, clusters: &[String]) -> Result<Vec<String>> {
        self.with(|c| {
            // `done = 0` as the partial index `commands_pending` says it, so SQLite uses it.
            let mut pending =
                c.prepare_cached("SELECT 1 FROM commands WHERE cluster = ?1 AND done = 0 LIMIT 1")?;
            let mut out = Vec::new();
            for cluster in clusters {
                if pending.exists(params![cluster])? {
                    out.push(cluster.clone());
                }
            }
            Ok(out)
        })
    }

    pub fn record(&self, cluster: &str, epoch: u64, messages: &[(u64, &[Write])]) -> Result<Recorded> {
        self.with(|c| {
            let tx = c.transaction()?;
            let (current, mut last): (u64, u64) = tx.query_row(
                "SELECT epoch, last_agent_seq FROM clusters WHERE id = ?1",
                params![cluster],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            if current != epoch {
                return Ok(Recorded::Fenced);
            }
            let mut recorded = Recorded::Duplicate;
            for &(seq, writes) in messages {
                if seq <= last {
                    continue;
                }
                for write in writes {
                    apply(&tx, cluster, epoch, seq, write)?;
                }
                last = seq;
                recorded = Recorded::New;
            }
            if recorded == Recorded::New {
                tx.execute(
                    "UPDATE clusters SET last_agent_seq = ?2, last_seen = ?3 WHERE id = ?1",
                    params![cluster, last, now_unix()],
                )?;
                tx.commit()?;
            }
            Ok(recorded)
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
        self.with(|c| {
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
            write_feed(
                &tx,
                &FeedEvent {
                    cluster: cluster.into(),
                    kind: feed::REVOKED.into(),
                    ..Default::default()
                },
            )?;
            tx.commit()?;
            Ok(true)
        })
    }

    /// The id of the feed's last entry (0: none yet).
    pub fn feed_end(&self) -> Result<u64> {
        self.with(|c| {
            let end: i64 = c.query_row("SELECT coalesce(max(id), 0) FROM feed", [], |r| r.get(0))?;
            Ok(end.max(0) as u64)
        })
    }

    /// Feed entries after `after`, of one cluster or all, in order, at most `limit`.
    pub fn feed_after(&self, cluster: Option<&str>, after: u64, limit: u32) -> Result<Vec<FeedEvent>> {
        self.with(|c| feed_rows(c, cluster, after, limit))
    }

    /// [`Sqlite::feed_after`] and the highest id retention pruned of that scope, read
    /// together (under the one connection's lock: no pass runs between the two reads).
    pub fn feed_page(&self, cluster: Option<&str>, after: u64, limit: u32) -> Result<(u64, Vec<FeedEvent>)> {
        self.with(|c| {
            let rows = feed_rows(c, cluster, after, limit)?;
            let through: Option<u64> = c
                .query_row(
                    "SELECT through FROM feed_pruned WHERE cluster = ?1",
                    params![cluster.unwrap_or("")],
                    |r| r.get(0),
                )
                .optional()?;
            Ok((through.unwrap_or(0), rows))
        })
    }

    /// The log streams of a cluster.
    pub fn log_streams(&self, cluster: &str) -> Result<Vec<LogStreamRow>> {
        self.with(|c| {
            // The last chunk by offset ends a stream (chunks never overlap).
            let mut stmt = c.prepare(
                "SELECT stream, offset + length(data), eof, truncated,
                   (SELECT min(offset) FROM logs WHERE cluster = l.cluster AND stream = l.stream) FROM logs AS l
                 WHERE cluster = ?1 AND offset = (SELECT max(offset) FROM logs WHERE cluster = l.cluster AND stream = l.stream)
                 ORDER BY stream",
            )?;
            let rows = stmt
                .query_map(params![cluster], |r| {
                    let (eof, truncated) = (r.get::<_, i64>(2)? != 0, r.get::<_, i64>(3)? != 0);
                    Ok(LogStreamRow {
                        stream: r.get(0)?,
                        length: r.get(1)?,
                        first_offset: r.get(4)?,
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
                .query_map(params![cluster, stream, big(offset)], |r| {
                    Ok((
                        r.get::<_, u64>(0)?,
                        r.get::<_, Vec<u8>>(1)?,
                        r.get::<_, i64>(2)? != 0,
                        r.get::<_, i64>(3)? != 0,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let first: Option<u64> = c.query_row(
                "SELECT min(offset) FROM logs WHERE cluster = ?1 AND stream = ?2",
                params![cluster, stream],
                |r| r.get(0),
            )?;
            Ok(read_rows(offset, limit, first.unwrap_or(0), &rows))
        })
    }
}

/// Retention (see [`super::retention`]): every statement is its own transaction, taken
/// under the connection's lock and let go before the next, so recording goes on between.
impl Sqlite {
    pub fn prune(&self, now_ms: i64, policy: &Retention) -> Result<Pruned> {
        let mut out = Pruned::ran();
        let batch = PRUNE_BATCH as i64;
        if let Some(age) = policy.events_max_age {
            let cut_ms = now_ms.saturating_sub(retention::ms(age));
            // The feed by its oldest ids: the first that is not old enough stops the pass, so
            // what goes is a prefix in id order (what a cursor can be compared with).
            loop {
                let upto = self.with(|c| {
                    let mut stmt = c.prepare_cached("SELECT id, at_ms FROM feed ORDER BY id LIMIT ?1")?;
                    let rows = stmt
                        .query_map(params![batch], |r| Ok((r.get::<_, u64>(0)?, r.get::<_, i64>(1)?)))?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(rows
                        .iter()
                        .take_while(|(_, at)| *at < cut_ms)
                        .last()
                        .map(|(id, _)| *id))
                })?;
                let Some(upto) = upto else { break };
                let n = self.with(|c| delete_feed(c, None, upto))?;
                out.feed += n;
                if n == 0 {
                    break;
                }
            }
            let cut_s = cut_ms.div_euclid(1000);
            loop {
                let n = self.with(|c| {
                    Ok(c.execute(
                        "DELETE FROM events WHERE (cluster, agent_seq) IN
                           (SELECT cluster, agent_seq FROM events WHERE at < ?1 LIMIT ?2)",
                        params![cut_s, batch],
                    )? as u64)
                })?;
                out.events += n;
                if n < PRUNE_BATCH as u64 {
                    break;
                }
            }
        }
        if let Some(cap) = policy.events_per_cluster {
            let cap = big(cap);
            let over: Vec<String> = self.with(|c| {
                let mut stmt = c.prepare("SELECT cluster FROM feed GROUP BY cluster HAVING count(*) > ?1")?;
                Ok(stmt
                    .query_map(params![cap], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?)
            })?;
            for cluster in &over {
                let boundary: Option<u64> = self.with(|c| {
                    Ok(c.query_row(
                        "SELECT id FROM feed WHERE cluster = ?1 ORDER BY id DESC LIMIT 1 OFFSET ?2",
                        params![cluster, cap],
                        |r| r.get(0),
                    )
                    .optional()?)
                })?;
                let Some(boundary) = boundary else { continue };
                loop {
                    let n = self.with(|c| delete_feed(c, Some(cluster), boundary))?;
                    out.feed += n;
                    if n == 0 {
                        break;
                    }
                }
            }
            let over: Vec<String> = self.with(|c| {
                let mut stmt =
                    c.prepare("SELECT cluster FROM events GROUP BY cluster HAVING count(*) > ?1")?;
                Ok(stmt
                    .query_map(params![cap], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?)
            })?;
            for cluster in &over {
                let boundary: Option<u64> = self.with(|c| {
                    Ok(c.query_row(
                        "SELECT agent_seq FROM events WHERE cluster = ?1 ORDER BY agent_seq DESC LIMIT 1 OFFSET ?2",
                        params![cluster, cap],
                        |r| r.get(0),
                    )
                    .optional()?)
                })?;
                let Some(boundary) = boundary else { continue };
                loop {
                    let n = self.with(|c| {
                        Ok(c.execute(
                            "DELETE FROM events WHERE cluster = ?1 AND agent_seq IN
                               (SELECT agent_seq FROM events WHERE cluster = ?1 AND agent_seq <= ?2 ORDER BY agent_seq LIMIT ?3)",
                            params![cluster, big(boundary), batch],
                        )? as u64)
                    })?;
                    out.events += n;
                    if n < PRUNE_BATCH as u64 {
                        break;
                    }
                }
            }
        }
        if let Some(age) = policy.logs_max_age {
            let cut_ms = now_ms.saturating_sub(retention::ms(age));
            loop {
                // Streams whose last chunk ends them and was written before the cut.
                let ended: Vec<(String, String)> = self.with(|c| {
                    let mut stmt = c.prepare_cached(
                        "SELECT cluster, stream FROM logs AS l WHERE (eof OR truncated) AND at_ms < ?1
                           AND offset = (SELECT max(offset) FROM logs WHERE cluster = l.cluster AND stream = l.stream)
                         LIMIT ?2",
                    )?;
                    Ok(stmt
                        .query_map(params![cut_ms, batch], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<Vec<_>, _>>()?)
                })?;
                if ended.is_empty() {
                    break;
                }
                for (cluster, stream) in &ended {
                    self.delete_stream(cluster, stream, &mut out)?;
                }
            }
        }
        if let Some(cap) = policy.log_bytes_per_cluster {
            let over: Vec<(String, u64)> = self.with(|c| {
                let mut stmt = c.prepare(
                    "SELECT cluster, sum(length(data)) FROM logs GROUP BY cluster HAVING sum(length(data)) > ?1",
                )?;
                Ok(stmt
                    .query_map(params![big(cap)], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect::<Result<Vec<_>, _>>()?)
            })?;
            for (cluster, total) in &over {
                let mut streams = self.with(|c| stream_sizes(c, cluster))?;
                retention::oldest_first(&mut streams);
                let mut excess = total.saturating_sub(cap);
                for s in &streams {
                    match retention::cut(s, excess) {
                        None => break,
                        Some(Cut::Whole(stream)) => {
                            excess = excess.saturating_sub(self.delete_stream(cluster, &stream, &mut out)?);
                        }
                        Some(Cut::Prefix(stream, need)) => {
                            excess =
                                excess.saturating_sub(self.delete_prefix(cluster, &stream, need, &mut out)?);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Deletes a stream, oldest chunks first (its end last: a reader meanwhile is told its
    /// prefix is gone); returns the bytes freed.
    fn delete_stream(&self, cluster: &str, stream: &str, out: &mut Pruned) -> Result<u64> {
        let mut freed = 0;
        loop {
            let deleted: Vec<u64> = self.with(|c| {
                let mut stmt = c.prepare_cached(
                    "DELETE FROM logs WHERE cluster = ?1 AND stream = ?2 AND offset IN
                       (SELECT offset FROM logs WHERE cluster = ?1 AND stream = ?2 ORDER BY offset LIMIT ?3)
                     RETURNING length(data)",
                )?;
                Ok(stmt
                    .query_map(params![cluster, stream, PRUNE_BATCH as i64], |r| r.get(0))?
                    .collect::<Result<Vec<_>, _>>()?)
            })?;
            out.log_chunks += deleted.len() as u64;
            let bytes: u64 = deleted.iter().sum();
            out.log_bytes += bytes;
            freed += bytes;
            if deleted.len() < PRUNE_BATCH {
                break;
            }
        }
        out.log_streams += 1;
        Ok(freed)
    }

    /// Deletes the oldest chunks of a stream, never its last, until `need` bytes are freed
    /// or only the last is left; returns the bytes freed.
    fn delete_prefix(&self, cluster: &str, stream: &str, need: u64, out: &mut Pruned) -> Result<u64> {
        let mut freed = 0;
        while freed < need {
            let chunks: Vec<(u64, u64)> = self.with(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT offset, length(data) FROM logs WHERE cluster = ?1 AND stream = ?2
                       AND offset < (SELECT max(offset) FROM logs WHERE cluster = ?1 AND stream = ?2)
                     ORDER BY offset LIMIT ?3",
                )?;
                Ok(stmt
                    .query_map(params![cluster, stream, PRUNE_BATCH as i64], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<Result<Vec<_>, _>>()?)
            })?;
            let Some((upto, bytes)) = retention::prefix_upto(&chunks, need - freed) else {
                break;
            };
            let n = self.with(|c| {
                Ok(c.execute(
                    "DELETE FROM logs WHERE cluster = ?1 AND stream = ?2 AND offset <= ?3",
                    params![cluster, stream, big(upto)],
                )? as u64)
            })?;
            out.log_chunks += n;
            out.log_bytes += bytes;
            freed += bytes;
        }
        Ok(freed)
    }
}

/// Feed entries after `after`, of one cluster or all, in order, at most `limit`.
fn feed_rows(c: &Connection, cluster: Option<&str>, after: u64, limit: u32) -> Result<Vec<FeedEvent>> {
    let mut stmt = c.prepare_cached(
        "SELECT id, cluster, kind, at_ms, epoch, object, phase, reason, message, command_seq, ok, truncated
         FROM feed WHERE id > ?2 AND (?1 IS NULL OR cluster = ?1) ORDER BY id LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(params![cluster, big(after), limit], |r| {
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
}

/// Deletes the oldest feed entries (of `cluster`, or of all) up to id `upto`, at most a batch,
/// and raises the pruned-through marks (the cluster's and the overall one) in the same
/// transaction; returns how many went.
fn delete_feed(c: &mut Connection, cluster: Option<&str>, upto: u64) -> Result<u64> {
    let tx = c.transaction()?;
    let deleted: Vec<(String, u64)> = {
        let mut stmt = tx.prepare_cached(
            "DELETE FROM feed WHERE id IN
               (SELECT id FROM feed WHERE id <= ?1 AND (?2 IS NULL OR cluster = ?2) ORDER BY id LIMIT ?3)
             RETURNING cluster, id",
        )?;
        stmt.query_map(params![big(upto), cluster, PRUNE_BATCH as i64], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?
    };
    let mut through: HashMap<&str, u64> = HashMap::new();
    for (cluster, id) in &deleted {
        for key in [cluster.as_str(), ""] {
            let mark = through.entry(key).or_default();
            *mark = (*mark).max(*id);
        }
    }
    for (key, id) in &through {
        tx.execute(
            "INSERT INTO feed_pruned (cluster, through) VALUES (?1, ?2)
             ON CONFLICT (cluster) DO UPDATE SET through = max(through, excluded.through)",
            params![key, big(*id)],
        )?;
    }
    tx.commit()?;
    Ok(deleted.len() as u64)
}

/// A cluster's streams as the size rule sees them.
fn stream_sizes(c: &Connection, cluster: &str) -> Result<Vec<StreamSize>> {
    let mut stmt = c.prepare(
        "SELECT stream, sum(length(data)), max(at_ms),
           (SELECT eof OR truncated FROM logs AS e WHERE e.cluster = ?1 AND e.stream = l.stream ORDER BY offset DESC LIMIT 1)
         FROM logs AS l WHERE cluster = ?1 GROUP BY stream",
    )?;
    let rows = stmt
        .query_map(params![cluster], |r| {
            Ok(StreamSize {
                stream: r.get(0)?,
                bytes: r.get(1)?,
                last_at_ms: r.get(2)?,
                ended: r.get::<_, i64>(3)? != 0,
            })
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
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
const ADDED_COLUMNS: [(&str, &str, &str); 10] = [
    ("clusters", "agent_version", "TEXT"),
    ("clusters", "capabilities", "TEXT"),
    ("clusters", "inventory", "TEXT"),
    ("clusters", "clock_skew_ms", "INTEGER"),
    ("clusters", "cert_not_after", "INTEGER NOT NULL DEFAULT 0"),
    ("clusters", "revoked", "INTEGER NOT NULL DEFAULT 0"),
    ("clusters", "revoked_at", "INTEGER"),
    ("commands", "delivered", "INTEGER NOT NULL DEFAULT 0"),
    ("tokens", "created_at", "INTEGER NOT NULL DEFAULT 0"),
    // When a chunk was written (Unix ms), for retention by age.
    ("logs", "at_ms", "INTEGER NOT NULL DEFAULT 0"),
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
            if (table, column) == ("logs", "at_ms") {
                // Chunks from before the column are dated by the upgrade, not the epoch: a
                // retention age then counts from now rather than pruning them at once.
                conn.execute(
                    "UPDATE logs SET at_ms = ?1",
                    params![shapeblock_proto::now_unix_ms()],
                )?;
            }
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

/// Appends to the feed (its id and time are the store's).
fn write_feed(conn: &Connection, e: &FeedEvent) -> Result<()> {
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

/// One write of [`Sqlite::record`], in its transaction.
fn apply(tx: &rusqlite::Transaction<'_>, cluster: &str, epoch: u64, seq: u64, write: &Write) -> Result<()> {
    match write {
        Write::Event { kind, object, detail } => {
            tx.execute(
                "INSERT INTO events (cluster, agent_seq, epoch, kind, object, detail, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![cluster, seq, epoch, kind, object, detail, now_unix()],
            )?;
        }
        Write::Object(status) => {
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
        }
        Write::Result {
            command_seq,
            ok,
            message,
        } => {
            tx.execute(
                "UPDATE commands SET done = 1, ok = ?3, message = ?4 WHERE cluster = ?1 AND seq = ?2",
                params![cluster, command_seq, *ok as i64, message],
            )?;
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
        }
        Write::Feed(e) => write_feed(tx, e)?,
        Write::Log(chunk) => {
            let written = write_log(tx, cluster, chunk)?;
            for implied in chunk.implied(cluster, epoch, &written) {
                apply(tx, cluster, epoch, seq, &implied)?;
            }
        }
    }
    Ok(())
}

/// Appends a log chunk. A chunk that overlaps what is stored is cut to the new bytes, so a
/// replay never duplicates a byte. One that leaves a gap is stored after a truncation
/// marker where the gap begins, and the gap (start, end) is reported: the agent counts
/// offsets itself, so a gap means this store lost bytes it had acknowledged (restored
/// from a backup, replaced). Refusing the chunk would end every session of the agent on
/// the same resend.
fn write_log(tx: &rusqlite::Transaction<'_>, cluster: &str, chunk: &LogChunk) -> Result<LogWrite> {
    let LogChunk {
        stream,
        offset,
        data,
        truncated,
        eof,
        ..
    } = chunk;
    let (offset, truncated, eof) = (*offset, *truncated, *eof);
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
            "INSERT OR REPLACE INTO logs (cluster, stream, offset, data, truncated, eof, at_ms) VALUES (?1, ?2, ?3, x'', 1, 0, ?4)",
            params![cluster, stream, end, shapeblock_proto::now_unix_ms()],
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
        "INSERT OR REPLACE INTO logs (cluster, stream, offset, data, truncated, eof, at_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            cluster,
            stream,
            offset.max(end),
            data,
            truncated as i64,
            eof as i64,
            shapeblock_proto::now_unix_ms()
        ],
    )?;
    Ok(LogWrite {
        gap,
        opened: last.is_none(),
        ended: (truncated || eof) && !ended_before,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let store = Sqlite::open(&path).unwrap();
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
        store.seen(&[("old".into(), Some(-250))]).unwrap();
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
        assert_eq!(
            Sqlite::open(&path).unwrap().id().unwrap(),
            id,
            "kept across opens"
        );
        std::fs::remove_file(&path).unwrap();
        assert_ne!(
            Sqlite::open(&path).unwrap().id().unwrap(),
            id,
            "a new store, a new id"
        );
    }
}
