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
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub struct Store {
    conn: Mutex<Connection>,
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
}

/// A cluster's delivery state.
#[derive(Debug, Clone, Default)]
pub struct ClusterRow {
    pub id: String,
    pub epoch: u64,
    pub last_agent_seq: u64,
    pub connected: bool,
    pub last_seen: i64,
    pub hello: Option<String>,
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

const SCHEMA: &str = "
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
        Ok(Self {
            conn: Mutex::new(conn),
        })
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
                "INSERT INTO tokens (hash, cluster, expires_at) VALUES (?1, ?2, ?3)",
                params![token_hash, cluster, expires_at],
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
        self.with(|c| {
            let tx = c.transaction()?;
            Self::ensure_cluster(&tx, cluster)?;
            let seq: u64 = tx.query_row(
                "UPDATE clusters SET next_command_seq = next_command_seq + 1 WHERE id = ?1 RETURNING next_command_seq - 1",
                params![cluster],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT INTO commands (cluster, seq, body, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![cluster, seq, body, now_unix()],
            )?;
            tx.commit()?;
            Ok(seq)
        })
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
                "SELECT seq, body, done, ok, message FROM commands WHERE cluster = ?1 AND {cond} ORDER BY seq LIMIT ?3"
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
                    })
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    pub fn cluster(&self, cluster: &str) -> Result<Option<ClusterRow>> {
        self.with(|c| {
            Ok(c.query_row(
                "SELECT id, epoch, last_agent_seq, connected, last_seen, hello FROM clusters WHERE id = ?1",
                params![cluster],
                cluster_row,
            )
            .optional()?)
        })
    }

    pub fn clusters(&self) -> Result<Vec<ClusterRow>> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT id, epoch, last_agent_seq, connected, last_seen, hello FROM clusters ORDER BY id",
            )?;
            let rows = stmt.query_map([], cluster_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    /// Starts a session: a new epoch, connected; returns (epoch, last agent seq recorded).
    pub fn begin_session(&self, cluster: &str, hello: &str) -> Result<(u64, u64)> {
        self.with(|c| {
            Self::ensure_cluster(c, cluster)?;
            Ok(c.query_row(
                "UPDATE clusters SET epoch = epoch + 1, connected = 1, last_seen = ?2, hello = ?3 WHERE id = ?1 RETURNING epoch, last_agent_seq",
                params![cluster, now_unix(), hello],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
        })
    }

    /// Ends a session if it is still the current epoch.
    pub fn end_session(&self, cluster: &str, epoch: u64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE clusters SET connected = 0 WHERE id = ?1 AND epoch = ?2",
                params![cluster, epoch],
            )?;
            Ok(())
        })
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
}

fn cluster_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ClusterRow> {
    Ok(ClusterRow {
        id: r.get(0)?,
        epoch: r.get(1)?,
        last_agent_seq: r.get(2)?,
        connected: r.get::<_, i64>(3)? != 0,
        last_seen: r.get(4)?,
        hello: r.get(5)?,
    })
}

/// Writes for [`Store::record`]'s callback.
pub mod write {
    use super::*;

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
    /// replay never duplicates a byte; one that leaves a gap is refused (the agent counts
    /// offsets itself, so a gap is a bug worth seeing).
    pub fn log(
        tx: &rusqlite::Transaction<'_>,
        cluster: &str,
        stream: &str,
        offset: u64,
        data: &[u8],
        truncated: bool,
        eof: bool,
    ) -> Result<()> {
        // Stored chunks never overlap, so the last one by offset ends the log: one index
        // lookup, not a scan of every chunk (a 1 GiB log is 32,768 of them).
        let end: u64 = tx
            .query_row(
                "SELECT offset + length(data) FROM logs WHERE cluster = ?1 AND stream = ?2 ORDER BY offset DESC LIMIT 1",
                params![cluster, stream],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0);
        if offset > end && !truncated {
            return Err(StoreError::Invalid(format!(
                "log {stream}: chunk at offset {offset} leaves a gap after {end}"
            )));
        }
        let skip = end.saturating_sub(offset) as usize;
        if skip >= data.len() && !truncated && !eof {
            return Ok(());
        }
        let data = data.get(skip..).unwrap_or_default();
        tx.execute(
            "INSERT OR REPLACE INTO logs (cluster, stream, offset, data, truncated, eof) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![cluster, stream, offset.max(end), data, truncated as i64, eof as i64],
        )?;
        Ok(())
    }
}
