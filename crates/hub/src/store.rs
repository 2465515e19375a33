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
        self.with(|c| {
            Self::ensure_cluster(c, cluster)?;
            Ok(c.query_row(
                "UPDATE clusters SET epoch = epoch + 1, connected = 1, last_seen = ?2, hello = NULL,
                   agent_version = ?3, capabilities = ?4, inventory = coalesce(?5, inventory)
                 WHERE id = ?1 RETURNING epoch, last_agent_seq",
                params![cluster, now, version, capabilities, inventory],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?)
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

/// Columns added after the first release: a store made by an older hub gets them on open.
const ADDED_COLUMNS: [(&str, &str, &str); 4] = [
    ("clusters", "agent_version", "TEXT"),
    ("clusters", "capabilities", "TEXT"),
    ("clusters", "inventory", "TEXT"),
    ("clusters", "clock_skew_ms", "INTEGER"),
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

const CLUSTER_COLUMNS: &str =
    "id, epoch, last_agent_seq, connected, last_seen, agent_version, capabilities, inventory, clock_skew_ms";

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
    /// replay never duplicates a byte. One that leaves a gap is stored after a truncation
    /// marker where the gap begins, and the gap (start, end) is returned: the agent counts
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
    ) -> Result<Option<(u64, u64)>> {
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
            return Ok(gap);
        }
        let data = data.get(skip..).unwrap_or_default();
        tx.execute(
            "INSERT OR REPLACE INTO logs (cluster, stream, offset, data, truncated, eof) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![cluster, stream, offset.max(end), data, truncated as i64, eof as i64],
        )?;
        Ok(gap)
    }
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
