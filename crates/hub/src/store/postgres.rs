//! The Postgres backend: what several hub replicas can share. A bounded pool (never a
//! connection per agent), statements prepared once per connection, and versioned migrations
//! applied at start-up in one transaction under an advisory lock, so replicas starting
//! together migrate once.
//!
//! Same rows and meaning as the SQLite backend; flags are BOOLEAN, numbers BIGINT, blobs
//! BYTEA. Numbers the hub holds as u64 are kept as BIGINT: the hub refuses agent numbers past
//! i64::MAX before they reach the store, and a caller's cursor past it saturates.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use tokio_postgres::Row;
use tokio_postgres::types::ToSql;

use shapeblock_proto::now_unix;

use super::retention::{self, Cut, StreamSize};
use super::*;

type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

pub(super) struct Postgres {
    pool: Pool,
    /// One connection of its own for this replica's liveness (its heartbeat row, the dead
    /// replica check): on the shared pool, a heartbeat waited behind every session's write
    /// whenever the feed's writers queued (10,000 agents sending at once), missed its
    /// deadline, and the other replicas declared a healthy replica dead and handed on all
    /// its clusters (`benches/hub_scale.rs` found it: thousands of reconnects).
    control: Pool,
    /// What the pool dials, for the hub's LISTEN connection.
    database: Database,
    /// The replica this process registered as: the owner of the sessions it begins.
    replica: std::sync::OnceLock<String>,
}

/// The channels the hub NOTIFYs on (in the transaction that makes the change, so a listener
/// hears of it once it is committed). Payloads carry ids only; a listener reads the rest.
pub mod channel {
    /// `cluster \t epoch`: a session of `cluster` began (or was handed on) at `epoch`; a
    /// replica holding an older one closes it.
    pub const SESSION: &str = "sb_session";
    /// `cluster`: a command was queued; the replica holding its session sends it.
    pub const COMMAND: &str = "sb_command";
    /// `id`: the feed grew up to `id`; watchers read on.
    pub const FEED: &str = "sb_feed";
    /// `cluster`: revoked; its live session ends wherever it is.
    pub const REVOKE: &str = "sb_revoke";
    /// `kind \t follow \t replica`: to `replica`, about routed live log follow `follow`:
    /// `start` (serve it), `data` (chunks wait), `stop` (its requester ended it).
    pub const LIVE: &str = "sb_live";
}

/// The database's clock in ms: replicas' heartbeats are compared on one clock, whatever
/// their hosts' clocks say.
const DB_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::BIGINT";

/// Advisory lock keys (one namespace for the hub: "SBHB" and a number).
const MIGRATION_LOCK: i64 = 0x5342_4842_0000_0001;
/// Taken by every transaction that appends to the feed, until it commits: ids come from a
/// sequence when the insert runs, so two concurrent writers could otherwise commit 6 before
/// 5, and a watcher that read 6 would never see 5. Taking turns keeps "a reader never sees
/// id n+1 before id n", as SQLite's one writer does.
const FEED_LOCK: i64 = 0x5342_4842_0000_0002;
/// How long the server lets one of the hub's transactions sit idle before it ends the
/// connection (and with it the transaction and its locks). A hub's transactions wait on
/// nothing but the database, so an idle one is a stalled process (stopped, swapped out, a
/// frozen VM): without this its row locks and the feed lock would hold every other replica's
/// session of that cluster, and every replica's feed, until it woke, since Postgres does not
/// notice a client that is stopped rather than gone.
pub const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(5);

/// The schema, one migration per version, applied in order and never edited once released:
/// a change is a new entry.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE clusters (
  id TEXT PRIMARY KEY, epoch BIGINT NOT NULL DEFAULT 0, last_agent_seq BIGINT NOT NULL DEFAULT 0,
  next_command_seq BIGINT NOT NULL DEFAULT 1, connected BOOLEAN NOT NULL DEFAULT FALSE,
  last_seen BIGINT NOT NULL DEFAULT 0, agent_version TEXT, capabilities TEXT, inventory TEXT,
  clock_skew_ms BIGINT, cert_not_after BIGINT NOT NULL DEFAULT 0,
  revoked BOOLEAN NOT NULL DEFAULT FALSE, revoked_at BIGINT);
CREATE TABLE tokens (
  hash TEXT PRIMARY KEY, cluster TEXT NOT NULL, expires_at BIGINT NOT NULL,
  bound_key TEXT, cert_pem TEXT, created_at BIGINT NOT NULL DEFAULT 0, n BIGSERIAL);
CREATE TABLE commands (
  cluster TEXT NOT NULL, seq BIGINT NOT NULL, body BYTEA NOT NULL, created_at BIGINT NOT NULL,
  done BOOLEAN NOT NULL DEFAULT FALSE, ok BOOLEAN, message TEXT,
  delivered BOOLEAN NOT NULL DEFAULT FALSE, PRIMARY KEY (cluster, seq));
CREATE TABLE events (
  cluster TEXT NOT NULL, agent_seq BIGINT NOT NULL, epoch BIGINT NOT NULL, kind TEXT NOT NULL,
  object TEXT NOT NULL, detail TEXT NOT NULL, at BIGINT NOT NULL, PRIMARY KEY (cluster, agent_seq));
CREATE TABLE objects (
  cluster TEXT NOT NULL, object TEXT NOT NULL, phase TEXT NOT NULL, observed_generation BIGINT NOT NULL,
  reason TEXT NOT NULL, message TEXT NOT NULL, at BIGINT NOT NULL, PRIMARY KEY (cluster, object));
CREATE TABLE logs (
  cluster TEXT NOT NULL, stream TEXT NOT NULL, "offset" BIGINT NOT NULL, data BYTEA NOT NULL,
  truncated BOOLEAN NOT NULL DEFAULT FALSE, eof BOOLEAN NOT NULL DEFAULT FALSE,
  PRIMARY KEY (cluster, stream, "offset"));
CREATE TABLE feed (
  id BIGSERIAL PRIMARY KEY, cluster TEXT NOT NULL, kind TEXT NOT NULL,
  at_ms BIGINT NOT NULL, epoch BIGINT NOT NULL DEFAULT 0, object TEXT NOT NULL DEFAULT '',
  phase TEXT NOT NULL DEFAULT '', reason TEXT NOT NULL DEFAULT '', message TEXT NOT NULL DEFAULT '',
  command_seq BIGINT NOT NULL DEFAULT 0, ok BOOLEAN NOT NULL DEFAULT FALSE,
  truncated BOOLEAN NOT NULL DEFAULT FALSE);
CREATE INDEX feed_by_cluster ON feed (cluster, id);
CREATE TABLE api_keys (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, created_at BIGINT NOT NULL,
  revoked_at BIGINT, n BIGSERIAL);
CREATE TABLE certificates (
  serial TEXT PRIMARY KEY, cluster TEXT NOT NULL, not_after BIGINT NOT NULL,
  issued_at BIGINT NOT NULL, revoked BOOLEAN NOT NULL DEFAULT FALSE);
CREATE TABLE idempotency (
  cluster TEXT NOT NULL, key TEXT NOT NULL, request TEXT NOT NULL, seq BIGINT NOT NULL,
  PRIMARY KEY (cluster, key));
"#,
    ),
    // Several replicas: a heartbeat row each, and the replica that owns a cluster's live
    // session (NULL: none, or a hub from before replicas, whose sessions are gone).
    (
        2,
        r#"
CREATE TABLE replicas (
  id TEXT PRIMARY KEY, started_at BIGINT NOT NULL, heartbeat_at BIGINT NOT NULL,
  addr TEXT NOT NULL DEFAULT '');
ALTER TABLE clusters ADD COLUMN replica TEXT;
CREATE INDEX clusters_by_replica ON clusters (replica) WHERE connected;
"#,
    ),
    // Retention: when each log chunk was written (chunks from before are dated by the
    // upgrade: a constant default, so no table rewrite), the indexes the prune statements
    // walk, and the highest feed id pruned per cluster ('' for all clusters).
    (
        3,
        r#"
ALTER TABLE logs ADD COLUMN at_ms BIGINT NOT NULL DEFAULT (extract(epoch FROM now()) * 1000)::BIGINT;
ALTER TABLE logs ALTER COLUMN at_ms DROP DEFAULT;
CREATE INDEX logs_ended ON logs (at_ms) WHERE eof OR truncated;
CREATE INDEX events_by_at ON events (at);
CREATE TABLE feed_pruned (cluster TEXT PRIMARY KEY, through BIGINT NOT NULL);
"#,
    ),
    // The commands not yet done, which the replicas' fallback for a missed notification
    // looks up for all their sessions at once.
    (
        4,
        r#"
CREATE INDEX commands_pending ON commands (cluster) WHERE NOT done;
"#,
    ),
    // Live App logs followed through one replica from a session on another: the follow, and
    // its chunks in flight (a few per follow; the requester deletes what it takes). Unlogged:
    // live logs are never kept, and a crash of the database ends every follow anyway.
    (
        5,
        r#"
CREATE UNLOGGED TABLE live_follows (
  id BIGSERIAL PRIMARY KEY, cluster TEXT NOT NULL, requester TEXT NOT NULL, holder TEXT NOT NULL,
  request BYTEA NOT NULL, created_at BIGINT NOT NULL);
CREATE INDEX live_follows_by_holder ON live_follows (holder);
CREATE UNLOGGED TABLE live_chunks (
  follow BIGINT NOT NULL REFERENCES live_follows (id) ON DELETE CASCADE, seq BIGSERIAL,
  body BYTEA NOT NULL, PRIMARY KEY (follow, seq));
"#,
    ),
];

/// The newest schema version this hub knows.
pub(super) fn schema_version() -> i64 {
    MIGRATIONS.last().map(|(v, _)| *v).unwrap_or(0)
}

fn unbig(n: i64) -> u64 {
    n.max(0) as u64
}

const CLUSTER_COLUMNS: &str = "id, epoch, last_agent_seq, connected, last_seen, agent_version, capabilities, inventory, clock_skew_ms, cert_not_after, revoked";

fn cluster_row(r: &Row) -> ClusterRow {
    let capabilities: Option<String> = r.get(6);
    let inventory: Option<String> = r.get(7);
    ClusterRow {
        id: r.get(0),
        epoch: unbig(r.get(1)),
        last_agent_seq: unbig(r.get(2)),
        connected: r.get(3),
        last_seen: r.get(4),
        agent_version: r.get(5),
        capabilities: capabilities
            .and_then(|c| serde_json::from_str(&c).ok())
            .unwrap_or_default(),
        inventory: inventory.and_then(|i| serde_json::from_str(&i).ok()),
        clock_skew_ms: r.get(8),
        cert_not_after: r.get(9),
        revoked: r.get(10),
    }
}

fn api_key_row(r: &Row) -> ApiKeyRow {
    ApiKeyRow {
        id: r.get(0),
        name: r.get(1),
        created_at: r.get(2),
        revoked_at: r.get(3),
    }
}

fn token_row(r: &Row) -> TokenRow {
    TokenRow {
        cluster: r.get(0),
        expires_at: r.get(1),
        bound_key: r.get(2),
        cert_pem: r.get(3),
    }
}

/// A transaction and whether it holds [`FEED_LOCK`] yet.
struct Tx<'a> {
    tx: Transaction<'a>,
    feed_locked: bool,
}

impl<'a> Tx<'a> {
    fn new(tx: Transaction<'a>) -> Self {
        Self {
            tx,
            feed_locked: false,
        }
    }

    async fn exec(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        let statement = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.execute(&statement, params).await?)
    }

    async fn one(&self, sql: &str, params: Params<'_>) -> Result<Row> {
        let statement = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.query_one(&statement, params).await?)
    }

    async fn opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let statement = self.tx.prepare_cached(sql).await?;
        Ok(self.tx.query_opt(&statement, params).await?)
    }

    async fn commit(self) -> Result<()> {
        Ok(self.tx.commit().await?)
    }

    async fn ensure_cluster(&self, cluster: &str) -> Result<()> {
        self.exec(
            "INSERT INTO clusters (id) VALUES ($1) ON CONFLICT (id) DO NOTHING",
            &[&cluster],
        )
        .await?;
        Ok(())
    }

    /// Appends to the feed (its id and time are the store's), in turn with other writers.
    async fn feed(&mut self, e: &FeedEvent) -> Result<()> {
        if !self.feed_locked {
            self.exec("SELECT pg_advisory_xact_lock($1)::TEXT", &[&FEED_LOCK])
                .await?;
            self.feed_locked = true;
        }
        // The NOTIFY in the same statement: no round trip more, and delivered on commit.
        self.exec(
            "WITH added AS (
               INSERT INTO feed (cluster, kind, at_ms, epoch, object, phase, reason, message, command_seq, ok, truncated)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) RETURNING id)
             SELECT pg_notify('sb_feed', id::TEXT) FROM added",
            &[
                &e.cluster,
                &e.kind,
                &shapeblock_proto::now_unix_ms(),
                &big(e.epoch),
                &e.object,
                &e.phase,
                &e.reason,
                &e.message,
                &big(e.command_seq),
                &e.ok,
                &e.truncated,
            ],
        )
        .await?;
        Ok(())
    }

    /// One write of [`Postgres::record`], with what a log chunk implies.
    async fn apply(&mut self, cluster: &str, epoch: u64, seq: u64, write: &Write) -> Result<()> {
        let Write::Log(chunk) = write else {
            return self.apply_one(cluster, epoch, seq, write).await;
        };
        let written = self.log(cluster, chunk).await?;
        for implied in chunk.implied(cluster, epoch, &written) {
            self.apply_one(cluster, epoch, seq, &implied).await?;
        }
        Ok(())
    }

    /// A write other than a log chunk.
    async fn apply_one(&mut self, cluster: &str, epoch: u64, seq: u64, write: &Write) -> Result<()> {
        match write {
            Write::Event { kind, object, detail } => {
                self.exec(
                    "INSERT INTO events (cluster, agent_seq, epoch, kind, object, detail, at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                    &[&cluster, &big(seq), &big(epoch), kind, object, detail, &now_unix()],
                )
                .await?;
            }
            Write::Object(status) => {
                self.exec(
                    "INSERT INTO objects (cluster, object, phase, observed_generation, reason, message, at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (cluster, object) DO UPDATE SET phase = excluded.phase,
                       observed_generation = excluded.observed_generation, reason = excluded.reason,
                       message = excluded.message, at = excluded.at",
                    &[
                        &cluster,
                        &status.key,
                        &status.phase,
                        &status.observed_generation,
                        &status.reason,
                        &status.message,
                        &now_unix(),
                    ],
                )
                .await?;
            }
            Write::Result {
                command_seq,
                ok,
                message,
            } => {
                let body = self
                    .opt(
                        "UPDATE commands SET done = TRUE, ok = $3, message = $4 WHERE cluster = $1 AND seq = $2 RETURNING body",
                        &[&cluster, &big(*command_seq), ok, message],
                    )
                    .await?
                    .map(|r| r.get::<_, Vec<u8>>(0));
                if let Some(redacted) = body.as_deref().and_then(forget_config_values) {
                    self.exec(
                        "UPDATE commands SET body = $3 WHERE cluster = $1 AND seq = $2",
                        &[&cluster, &big(*command_seq), &redacted],
                    )
                    .await?;
                }
            }
            Write::Feed(e) => self.feed(e).await?,
            Write::Log(_) => {
                return Err(StoreError::Invalid("a log chunk implies no other chunk".into()));
            }
        }
        Ok(())
    }

    /// Appends a log chunk, as the SQLite backend does (see there: overlaps cut, a gap
    /// stored as a truncation marker and reported).
    async fn log(&self, cluster: &str, chunk: &LogChunk) -> Result<LogWrite> {
        let (offset, truncated, eof) = (chunk.offset, chunk.truncated, chunk.eof);
        let last = self
            .opt(
                r#"SELECT "offset" + octet_length(data), eof OR truncated FROM logs
                   WHERE cluster = $1 AND stream = $2 ORDER BY "offset" DESC LIMIT 1"#,
                &[&cluster, &chunk.stream],
            )
            .await?
            .map(|r| (unbig(r.get::<_, i64>(0)), r.get::<_, bool>(1)));
        let (end, ended_before) = last.unwrap_or((0, false));
        const PUT: &str = r#"INSERT INTO logs (cluster, stream, "offset", data, truncated, eof, at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)
            ON CONFLICT (cluster, stream, "offset") DO UPDATE SET data = excluded.data,
              truncated = excluded.truncated, eof = excluded.eof, at_ms = excluded.at_ms"#;
        let at_ms = shapeblock_proto::now_unix_ms();
        let mut gap = None;
        if offset > end && !truncated {
            self.exec(
                PUT,
                &[
                    &cluster,
                    &chunk.stream,
                    &big(end),
                    &Vec::<u8>::new(),
                    &true,
                    &false,
                    &at_ms,
                ],
            )
            .await?;
            gap = Some((end, offset));
        }
        let skip = end.saturating_sub(offset) as usize;
        if skip >= chunk.data.len() && !truncated && !eof {
            return Ok(LogWrite {
                gap,
                ..Default::default()
            });
        }
        let data = chunk.data.get(skip..).unwrap_or_default();
        self.exec(
            PUT,
            &[
                &cluster,
                &chunk.stream,
                &big(offset.max(end)),
                &data,
                &truncated,
                &eof,
                &at_ms,
            ],
        )
        .await?;
        Ok(LogWrite {
            gap,
            opened: last.is_none(),
            ended: (truncated || eof) && !ended_before,
        })
    }
}

/// Bounded waits: a database that is down or a pool that is exhausted becomes an error the
/// session and the API report, not a call that hangs.
fn bounded_pool(manager: Manager, size: usize) -> Result<Pool> {
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .wait_timeout(Some(Duration::from_secs(30)))
        .create_timeout(Some(Duration::from_secs(10)))
        .recycle_timeout(Some(Duration::from_secs(10)))
        .build()
        .map_err(|e| StoreError::Config(format!("connection pool: {e}")))
}

impl Postgres {
    /// Connects a pool of at most `pool_size` connections to `url` and migrates the schema.
    pub(super) async fn connect(url: &str, pool_size: usize) -> Result<Self> {
        // The URL's own words are not repeated in its errors: it may hold a password.
        let mut database = Database::from_url(url)?;
        let options = format!(
            "{} -c idle_in_transaction_session_timeout={}",
            database.config.get_options().unwrap_or_default(),
            IDLE_IN_TRANSACTION.as_millis()
        );
        database.config.options(options.trim_start());
        // So an operator (or a test) can tell the hub's connections in pg_stat_activity.
        if database.config.get_application_name().is_none() {
            database.config.application_name("shapeblock-hub");
        }
        let manager = |database: &Database| {
            Manager::from_config(
                database.config.clone(),
                database.tls.clone(),
                ManagerConfig {
                    recycling_method: RecyclingMethod::Fast,
                },
            )
        };
        let pool = bounded_pool(manager(&database), pool_size.max(1))?;
        // Its connection is made on first use: only a replica (a hub serving) uses it, never
        // the CLI.
        let control = bounded_pool(manager(&database), 1)?;
        let store = Self {
            pool,
            control,
            database,
            replica: std::sync::OnceLock::new(),
        };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<()> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;
        tx.batch_execute(&format!(
            "SELECT pg_advisory_xact_lock({MIGRATION_LOCK});
             CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL);"
        ))
        .await?;
        let applied: i64 = tx
            .query_one("SELECT coalesce(max(version), 0) FROM schema_migrations", &[])
            .await?
            .get(0);
        if applied > schema_version() {
            return Err(StoreError::Config(format!(
                "the database's schema is version {applied}, made by a newer hub; this one knows up to {}",
                schema_version()
            )));
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > applied) {
            tx.batch_execute(sql).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &now_unix()],
            )
            .await?;
            tracing::info!(version, "hub store: schema migrated");
        }
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('store_id', $1) ON CONFLICT (key) DO NOTHING",
            &[&new_store_id()?],
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn client(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    async fn exec(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.execute(&statement, params).await?)
    }

    async fn rows(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query(&statement, params).await?)
    }

    async fn opt(&self, sql: &str, params: Params<'_>) -> Result<Option<Row>> {
        let client = self.client().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.query_opt(&statement, params).await?)
    }

    pub(super) async fn id(&self) -> Result<String> {
        let row = self
            .opt("SELECT value FROM meta WHERE key = 'store_id'", &[])
            .await?
            .ok_or_else(|| StoreError::Invalid("the store has no id".into()))?;
        Ok(row.get(0))
    }

    pub(super) async fn add_token(&self, token_hash: &str, cluster: &str, expires_at: i64) -> Result<()> {
        let mut client = self.client().await?;
        let tx = Tx::new(client.transaction().await?);
        tx.ensure_cluster(cluster).await?;
        tx.exec(
            "INSERT INTO tokens (hash, cluster, expires_at, created_at) VALUES ($1, $2, $3, $4)",
            &[&token_hash, &cluster, &expires_at, &now_unix()],
        )
        .await?;
        tx.commit().await
    }

    pub(super) async fn token(&self, token_hash: &str) -> Result<Option<TokenRow>> {
        Ok(self
            .opt(
                "SELECT cluster, expires_at, bound_key, cert_pem FROM tokens WHERE hash = $1",
                &[&token_hash],
            )
            .await?
            .as_ref()
            .map(token_row))
    }

    pub(super) async fn bind_token(&self, token_hash: &str, key: &str, cert_pem: &str) -> Result<bool> {
        let n = self
            .exec(
                "UPDATE tokens SET bound_key = $2, cert_pem = $3 WHERE hash = $1 AND bound_key IS NULL",
                &[&token_hash, &key, &cert_pem],
            )
            .await?;
        Ok(n == 1)
    }

    pub(super) async fn add_command_once(&self, queued: &Queued<'_>) -> Result<(u64, bool)> {
        let cluster = queued.cluster;
        let mut client = self.client().await?;
        let mut tx = Tx::new(client.transaction().await?);
        // The cluster's row first: it is what two callers queuing with one key take turns on,
        // so the second sees the first's idempotency row.
        tx.ensure_cluster(cluster).await?;
        tx.exec("SELECT 1 FROM clusters WHERE id = $1 FOR UPDATE", &[&cluster])
            .await?;
        if let Some((key, request)) = queued.idempotency {
            let earlier = tx
                .opt(
                    "SELECT seq, request FROM idempotency WHERE cluster = $1 AND key = $2",
                    &[&cluster, &key],
                )
                .await?;
            if let Some(row) = earlier {
                let (seq, digest): (i64, String) = (row.get(0), row.get(1));
                if digest != request {
                    return Err(StoreError::Conflict(format!(
                        "idempotency key {key:?} was used for another request (command {seq})"
                    )));
                }
                return Ok((unbig(seq), true));
            }
        }
        let seq: i64 = tx
            .one(
                "UPDATE clusters SET next_command_seq = next_command_seq + 1 WHERE id = $1 RETURNING next_command_seq - 1",
                &[&cluster],
            )
            .await?
            .get(0);
        tx.exec(
            "INSERT INTO commands (cluster, seq, body, created_at) VALUES ($1, $2, $3, $4)",
            &[&cluster, &seq, &queued.body, &now_unix()],
        )
        .await?;
        if let Some((key, request)) = queued.idempotency {
            tx.exec(
                "INSERT INTO idempotency (cluster, key, request, seq) VALUES ($1, $2, $3, $4)",
                &[&cluster, &key, &request, &seq],
            )
            .await?;
        }
        tx.exec("SELECT pg_notify('sb_command', $1)", &[&cluster]).await?;
        tx.feed(&FeedEvent {
            cluster: cluster.into(),
            kind: feed::QUEUED.into(),
            object: queued.object.into(),
            message: queued.kind.into(),
            command_seq: unbig(seq),
            ..Default::default()
        })
        .await?;
        tx.commit().await?;
        Ok((unbig(seq), false))
    }

    pub(super) async fn commands_where(
        &self,
        cluster: &str,
        which: Commands,
        limit: u32,
    ) -> Result<Vec<CommandRow>> {
        let (cond, after) = match which {
            Commands::After(after) => ("seq > $2", after),
            Commands::PendingAfter(after) => ("NOT done AND seq > $2", after),
            Commands::Seq(seq) => ("seq = $2", seq),
        };
        let sql = format!(
            "SELECT seq, body, done, ok, message, delivered, created_at FROM commands WHERE cluster = $1 AND {cond} ORDER BY seq LIMIT $3"
        );
        let rows = self
            .rows(&sql, &[&cluster, &big(after), &i64::from(limit)])
            .await?;
        Ok(rows
            .iter()
            .map(|r| CommandRow {
                seq: unbig(r.get(0)),
                body: r.get(1),
                done: r.get(2),
                ok: r.get(3),
                message: r.get(4),
                delivered: r.get(5),
                created_at: r.get(6),
            })
            .collect())
    }

    pub(super) async fn mark_delivered(&self, cluster: &str, upto: u64) -> Result<()> {
        self.exec(
            "UPDATE commands SET delivered = TRUE WHERE cluster = $1 AND seq <= $2 AND NOT delivered",
            &[&cluster, &big(upto)],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn cluster(&self, cluster: &str) -> Result<Option<ClusterRow>> {
        Ok(self
            .opt(
                &format!("SELECT {CLUSTER_COLUMNS} FROM clusters WHERE id = $1"),
                &[&cluster],
            )
            .await?
            .as_ref()
            .map(cluster_row))
    }

    pub(super) async fn clusters(&self) -> Result<Vec<ClusterRow>> {
        let rows = self
            .rows(
                &format!("SELECT {CLUSTER_COLUMNS} FROM clusters ORDER BY id"),
                &[],
            )
            .await?;
        Ok(rows.iter().map(cluster_row).collect())
    }

    pub(super) async fn begin_session(
        &self,
        cluster: &str,
        hello: &shapeblock_proto::v1::Hello,
    ) -> Result<(u64, u64)> {
        let now = now_unix();
        let (version, capabilities, inventory) = hello_fields(hello, now);
        let mut client = self.client().await?;
        let mut tx = Tx::new(client.transaction().await?);
        tx.ensure_cluster(cluster).await?;
        let replica = self.replica.get().map(String::as_str);
        let row = tx
            .one(
                "UPDATE clusters SET epoch = epoch + 1, connected = TRUE, last_seen = $2,
                   agent_version = $3, capabilities = $4, inventory = coalesce($5, inventory), replica = $6
                 WHERE id = $1 RETURNING epoch, last_agent_seq",
                &[&cluster, &now, &version, &capabilities, &inventory, &replica],
            )
            .await?;
        let (epoch, last) = (unbig(row.get(0)), unbig(row.get(1)));
        tx.exec(
            "SELECT pg_notify('sb_session', $1)",
            &[&format!("{cluster}\t{epoch}")],
        )
        .await?;
        tx.feed(&FeedEvent {
            cluster: cluster.into(),
            kind: feed::SESSION_UP.into(),
            epoch,
            message: format!("agent {version}"),
            ..Default::default()
        })
        .await?;
        tx.commit().await?;
        Ok((epoch, last))
    }

    pub(super) async fn set_session_certificate(&self, cluster: &str, not_after: i64) -> Result<()> {
        self.exec(
            "UPDATE clusters SET cert_not_after = $2 WHERE id = $1",
            &[&cluster, &not_after],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn set_inventory(&self, cluster: &str, json: &str) -> Result<()> {
        self.exec(
            "UPDATE clusters SET inventory = $2 WHERE id = $1",
            &[&cluster, &json],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn end_session(&self, cluster: &str, epoch: u64, reason: &str) -> Result<()> {
        let mut client = self.client().await?;
        let mut tx = Tx::new(client.transaction().await?);
        tx.exec(
            "UPDATE clusters SET connected = FALSE, replica = NULL WHERE id = $1 AND epoch = $2",
            &[&cluster, &big(epoch)],
        )
        .await?;
        tx.feed(&FeedEvent {
            cluster: cluster.into(),
            kind: feed::SESSION_DOWN.into(),
            epoch,
            message: reason.into(),
            ..Default::default()
        })
        .await?;
        tx.commit().await
    }

    pub(super) fn database(&self) -> Database {
        self.database.clone()
    }

    /// A statement on the replica's own connection ([`Postgres::control`]).
    async fn control_exec(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        let client = self.control.get().await?;
        let statement = client.prepare_cached(sql).await?;
        Ok(client.execute(&statement, params).await?)
    }

    pub(super) async fn register_replica(&self, id: &str, addr: &str) -> Result<()> {
        self.control_exec(
            &format!(
                "INSERT INTO replicas (id, started_at, heartbeat_at, addr) VALUES ($1, {DB_NOW_MS}, {DB_NOW_MS}, $2)
                 ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at"
            ),
            &[&id, &addr],
        )
        .await?;
        if self.replica.set(id.to_string()).is_err() && self.replica.get().map(String::as_str) != Some(id) {
            return Err(StoreError::Invalid(
                "this store is registered as another replica already".into(),
            ));
        }
        Ok(())
    }

    pub(super) async fn replica_heartbeat(&self, id: &str) -> Result<bool> {
        let n = self
            .control_exec(
                &format!("UPDATE replicas SET heartbeat_at = {DB_NOW_MS} WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(n == 1)
    }

    pub(super) async fn hand_on_dead_replicas(
        &self,
        me: &str,
        dead_after: Duration,
    ) -> Result<Vec<(String, u64)>> {
        let dead_after_ms = i64::try_from(dead_after.as_millis()).unwrap_or(i64::MAX);
        let mut client = self.control.get().await?;
        let mut tx = Tx::new(client.transaction().await?);
        let dead = tx
            .tx
            .query(
                &format!(
                    "DELETE FROM replicas WHERE id <> $1 AND heartbeat_at < {DB_NOW_MS} - $2 RETURNING id"
                ),
                &[&me, &dead_after_ms],
            )
            .await?;
        for row in &dead {
            tracing::warn!(replica = %row.get::<_, String>(0), "hub replica stopped heartbeating: declared dead");
        }
        // A live session whose replica has no row is gone with it (or was begun by a hub from
        // before replicas). The conditions are on the row itself: one that a replica is
        // beginning a session of is locked, and once it commits Postgres checks them again on
        // the new row (now owned by a live replica), so a fresh session is never handed on.
        let handed = tx
            .tx
            .query(
                "UPDATE clusters SET connected = FALSE, replica = NULL, epoch = epoch + 1
                 WHERE connected
                   AND (replica IS NULL OR NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = clusters.replica))
                 RETURNING id, epoch",
                &[],
            )
            .await?;
        let handed: Vec<(String, u64)> = handed.iter().map(|r| (r.get(0), unbig(r.get(1)))).collect();
        // Live log follows either end of which was on a dead replica: the other end finds
        // them gone at its next look.
        tx.exec(
            "DELETE FROM live_follows f WHERE NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = f.requester)
                OR NOT EXISTS (SELECT 1 FROM replicas r WHERE r.id = f.holder)",
            &[],
        )
        .await?;
        for (cluster, epoch) in &handed {
            tx.exec(
                "SELECT pg_notify('sb_session', $1)",
                &[&format!("{cluster}\t{epoch}")],
            )
            .await?;
            tx.feed(&FeedEvent {
                cluster: cluster.clone(),
                kind: feed::SESSION_DOWN.into(),
                epoch: *epoch,
                message: "its hub replica stopped heartbeating: handed on".into(),
                ..Default::default()
            })
            .await?;
        }
        tx.commit().await?;
        Ok(handed)
    }

    pub(super) async fn route_follow(
        &self,
        requester: &str,
        holder: &str,
        cluster: &str,
        request: &[u8],
    ) -> Result<u64> {
        let mut client = self.client().await?;
        let tx = Tx::new(client.transaction().await?);
        let id: i64 = tx
            .one(
                &format!(
                    "INSERT INTO live_follows (cluster, requester, holder, request, created_at)
                     VALUES ($1, $2, $3, $4, {DB_NOW_MS}) RETURNING id"
                ),
                &[&cluster, &requester, &holder, &request],
            )
            .await?
            .get(0);
        tx.exec(
            "SELECT pg_notify('sb_live', $1)",
            &[&format!("start\t{id}\t{holder}")],
        )
        .await?;
        tx.commit().await?;
        Ok(unbig(id))
    }

    pub(super) async fn routed_follow(&self, id: u64) -> Result<Option<RoutedFollow>> {
        Ok(self
            .opt(
                "SELECT cluster, requester, holder, request FROM live_follows WHERE id = $1",
                &[&big(id)],
            )
            .await?
            .map(|r| RoutedFollow {
                id,
                cluster: r.get(0),
                requester: r.get(1),
                holder: r.get(2),
                request: r.get(3),
            }))
    }

    pub(super) async fn routed_follows_held_by(&self, holder: &str) -> Result<Vec<u64>> {
        let rows = self
            .rows("SELECT id FROM live_follows WHERE holder = $1", &[&holder])
            .await?;
        Ok(rows.iter().map(|r| unbig(r.get(0))).collect())
    }

    pub(super) async fn put_routed(&self, id: u64, bodies: &[Vec<u8>], room: usize) -> Result<Put> {
        let id = big(id);
        let mut client = self.client().await?;
        let tx = Tx::new(client.transaction().await?);
        let Some(row) = tx
            .opt(
                "SELECT requester, (SELECT count(*) FROM live_chunks WHERE follow = $1)
                 FROM live_follows WHERE id = $1",
                &[&id],
            )
            .await?
        else {
            return Ok(Put::Gone);
        };
        let requester: String = row.get(0);
        let waiting: i64 = row.get(1);
        if waiting as usize + bodies.len() > room.max(bodies.len()) && waiting > 0 {
            return Ok(Put::Full);
        }
        let inserted = tx
            .exec(
                "INSERT INTO live_chunks (follow, body)
                 SELECT $1, b FROM unnest($2::BYTEA[]) WITH ORDINALITY AS u (b, n) ORDER BY n",
                &[&id, &bodies],
            )
            .await;
        match inserted {
            Ok(_) => {}
            // Its requester ended it since the look.
            Err(StoreError::Postgres(e))
                if e.code() == Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION) =>
            {
                return Ok(Put::Gone);
            }
            Err(e) => return Err(e),
        }
        tx.exec(
            "SELECT pg_notify('sb_live', $1)",
            &[&format!("data\t{id}\t{requester}")],
        )
        .await?;
        tx.commit().await?;
        Ok(Put::Stored)
    }

    pub(super) async fn take_routed(&self, id: u64, most: usize) -> Result<Option<Vec<Vec<u8>>>> {
        let id = big(id);
        let most = i64::try_from(most).unwrap_or(i64::MAX);
        let rows = self
            .rows(
                "DELETE FROM live_chunks WHERE follow = $1 AND seq IN
                   (SELECT seq FROM live_chunks WHERE follow = $1 ORDER BY seq LIMIT $2)
                 RETURNING seq, body",
                &[&id, &most],
            )
            .await?;
        if rows.is_empty() {
            let exists = self
                .opt("SELECT 1 FROM live_follows WHERE id = $1", &[&id])
                .await?
                .is_some();
            return Ok(exists.then(Vec::new));
        }
        let mut taken: Vec<(i64, Vec<u8>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        taken.sort_by_key(|(seq, _)| *seq);
        Ok(Some(taken.into_iter().map(|(_, body)| body).collect()))
    }

    pub(super) async fn end_routed(&self, id: u64) -> Result<()> {
        let id = big(id);
        let mut client = self.client().await?;
        let tx = Tx::new(client.transaction().await?);
        if let Some(row) = tx
            .opt("DELETE FROM live_follows WHERE id = $1 RETURNING holder", &[&id])
            .await?
        {
            let holder: String = row.get(0);
            tx.exec(
                "SELECT pg_notify('sb_live', $1)",
                &[&format!("stop\t{id}\t{holder}")],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn session_epochs(&self, clusters: &[String]) -> Result<Vec<(String, u64, bool)>> {
        let rows = self
            .rows(
                "SELECT id, epoch, revoked FROM clusters WHERE id = ANY($1)",
                &[&clusters],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), unbig(r.get(1)), r.get(2)))
            .collect())
    }

    pub(super) async fn session_replica(&self, cluster: &str) -> Result<Option<String>> {
        Ok(self
            .opt(
                "SELECT replica FROM clusters WHERE id = $1 AND connected",
                &[&cluster],
            )
            .await?
            .and_then(|r| r.get(0)))
    }

    pub(super) async fn replicas(&self) -> Result<Vec<(String, i64, i64, String)>> {
        let rows = self
            .rows(
                "SELECT id, started_at, heartbeat_at, addr FROM replicas ORDER BY started_at, id",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    pub(super) async fn mark_disconnected_all(&self) -> Result<()> {
        self.exec("UPDATE clusters SET connected = FALSE WHERE connected", &[])
            .await?;
        Ok(())
    }

    pub(super) async fn seen(&self, seen: &[(String, Option<i64>)]) -> Result<()> {
        let (clusters, skews): (Vec<&str>, Vec<Option<i64>>) =
            seen.iter().map(|(c, s)| (c.as_str(), *s)).unzip();
        self.exec(
            "UPDATE clusters SET last_seen = $3, clock_skew_ms = COALESCE(x.skew, clusters.clock_skew_ms)
             FROM unnest($1::text[], $2::bigint[]) AS x(id, skew) WHERE clusters.id = x.id",
            &[&clusters, &skews, &now_unix()],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn with_pending_commands(&self, clusters: &[String]) -> Result<Vec<String>> {
        let rows = self
            .rows(
                "SELECT DISTINCT cluster FROM commands WHERE cluster = ANY($1) AND NOT done",
                &[&clusters],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub(super) async fn record(
        &self,
        cluster: &str,
        epoch: u64,
        messages: &[(u64, &[Write])],
    ) -> Result<Recorded> {
        let mut client = self.client().await?;
        let mut tx = Tx::new(client.transaction().await?);
        let top = messages.iter().map(|&(seq, _)| seq).max().unwrap_or(0);
        // Below this the seqs were recorded before: resends, skipped. One message (the common
        // case) needs no read: the update below refuses it if it is one.
        let mut last = 0;
        if messages.len() > 1 {
            match tx
                .opt(
                    "SELECT last_agent_seq FROM clusters WHERE id = $1 AND epoch = $2 FOR UPDATE",
                    &[&cluster, &big(epoch)],
                )
                .await?
            {
                Some(row) => last = unbig(row.get(0)),
                None => return Ok(Recorded::Fenced),
            }
        }
        // The seq is taken if the session is current and the seq new, in one statement. The
        // row stays locked until the commit, so a new session's epoch bump waits for this
        // transaction (or this one finds the bumped epoch and changes nothing): a fenced
        // session never records after the new one began.
        let taken = tx
            .opt(
                "UPDATE clusters SET last_agent_seq = $3, last_seen = $4
                 WHERE id = $1 AND epoch = $2 AND last_agent_seq < $3 RETURNING 1",
                &[&cluster, &big(epoch), &big(top), &now_unix()],
            )
            .await?;
        if taken.is_none() {
            // Which refusal it was, read in the same transaction: only a resend may be acked.
            let current = tx
                .opt("SELECT epoch FROM clusters WHERE id = $1", &[&cluster])
                .await?
                .map(|r| unbig(r.get(0)));
            return Ok(if current == Some(epoch) {
                Recorded::Duplicate
            } else {
                Recorded::Fenced
            });
        }
        for &(seq, writes) in messages {
            if seq <= last {
                continue;
            }
            for write in writes {
                tx.apply(cluster, epoch, seq, write).await?;
            }
            last = seq;
        }
        tx.commit().await?;
        Ok(Recorded::New)
    }

    pub(super) async fn events(&self, cluster: &str) -> Result<Vec<(u64, String, String, String)>> {
        let rows = self
            .rows(
                "SELECT agent_seq, kind, object, detail FROM events WHERE cluster = $1 ORDER BY agent_seq",
                &[&cluster],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| (unbig(r.get(0)), r.get(1), r.get(2), r.get(3)))
            .collect())
    }

    pub(super) async fn objects(&self, cluster: &str) -> Result<Vec<ObjectStatus>> {
        let rows = self
            .rows(
                "SELECT object, phase, observed_generation, reason, message FROM objects WHERE cluster = $1 ORDER BY object",
                &[&cluster],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ObjectStatus {
                key: r.get(0),
                phase: r.get(1),
                observed_generation: r.get(2),
                reason: r.get(3),
                message: r.get(4),
            })
            .collect())
    }

    pub(super) async fn log_end(&self, cluster: &str, stream: &str) -> Result<(u64, bool)> {
        let end = self
            .opt(
                r#"SELECT "offset" + octet_length(data), eof OR truncated FROM logs
                   WHERE cluster = $1 AND stream = $2 ORDER BY "offset" DESC LIMIT 1"#,
                &[&cluster, &stream],
            )
            .await?
            .map(|r| (unbig(r.get(0)), r.get(1)));
        Ok(end.unwrap_or((0, false)))
    }

    pub(super) async fn log(&self, cluster: &str, stream: &str) -> Result<(Vec<u8>, bool, bool)> {
        let rows = self
            .rows(
                r#"SELECT data, truncated, eof FROM logs WHERE cluster = $1 AND stream = $2 ORDER BY "offset""#,
                &[&cluster, &stream],
            )
            .await?;
        let mut out = Vec::new();
        let (mut truncated, mut eof) = (false, false);
        for r in &rows {
            out.extend_from_slice(r.get::<_, &[u8]>(0));
            truncated |= r.get::<_, bool>(1);
            eof |= r.get::<_, bool>(2);
        }
        Ok((out, truncated, eof))
    }

    pub(super) async fn add_api_key(&self, id: &str, name: &str, hash: &str) -> Result<ApiKeyRow> {
        let created_at = now_unix();
        self.exec(
            "INSERT INTO api_keys (id, name, hash, created_at) VALUES ($1, $2, $3, $4)",
            &[&id, &name, &hash, &created_at],
        )
        .await?;
        Ok(ApiKeyRow {
            id: id.into(),
            name: name.into(),
            created_at,
            revoked_at: None,
        })
    }

    pub(super) async fn valid_api_key(&self, hash: &str) -> Result<Option<ApiKeyRow>> {
        Ok(self
            .opt(
                "SELECT id, name, created_at, revoked_at FROM api_keys WHERE hash = $1 AND revoked_at IS NULL",
                &[&hash],
            )
            .await?
            .as_ref()
            .map(api_key_row))
    }

    pub(super) async fn api_keys(&self) -> Result<Vec<ApiKeyRow>> {
        let rows = self
            .rows(
                "SELECT id, name, created_at, revoked_at FROM api_keys ORDER BY n",
                &[],
            )
            .await?;
        Ok(rows.iter().map(api_key_row).collect())
    }

    pub(super) async fn revoke_api_key(&self, id: &str) -> Result<Option<ApiKeyRow>> {
        self.exec(
            "UPDATE api_keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL",
            &[&id, &now_unix()],
        )
        .await?;
        Ok(self
            .opt(
                "SELECT id, name, created_at, revoked_at FROM api_keys WHERE id = $1",
                &[&id],
            )
            .await?
            .as_ref()
            .map(api_key_row))
    }

    pub(super) async fn tokens(&self, cluster: Option<&str>) -> Result<Vec<(String, TokenRow)>> {
        let rows = self
            .rows(
                "SELECT hash, cluster, expires_at, bound_key, cert_pem FROM tokens
                 WHERE $1::TEXT IS NULL OR cluster = $1 ORDER BY created_at, n",
                &[&cluster],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    TokenRow {
                        cluster: r.get(1),
                        expires_at: r.get(2),
                        bound_key: r.get(3),
                        cert_pem: r.get(4),
                    },
                )
            })
            .collect())
    }

    pub(super) async fn revoke_token(&self, token_hash: &str) -> Result<TokenRevoke> {
        // One statement decides: a token bound between a read and the delete is not deleted.
        let deleted = self
            .exec(
                "DELETE FROM tokens WHERE hash = $1 AND bound_key IS NULL",
                &[&token_hash],
            )
            .await?;
        if deleted == 1 {
            return Ok(TokenRevoke::Revoked);
        }
        let known = self
            .opt("SELECT 1 FROM tokens WHERE hash = $1", &[&token_hash])
            .await?
            .is_some();
        Ok(if known {
            TokenRevoke::Used
        } else {
            TokenRevoke::Unknown
        })
    }

    pub(super) async fn add_certificate(&self, serial: &str, cluster: &str, not_after: i64) -> Result<()> {
        self.exec(
            "INSERT INTO certificates (serial, cluster, not_after, issued_at) VALUES ($1, $2, $3, $4)
             ON CONFLICT (serial) DO NOTHING",
            &[&serial, &cluster, &not_after, &now_unix()],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn rejoined(&self, cluster: &str) -> Result<()> {
        self.exec("UPDATE clusters SET revoked = FALSE WHERE id = $1", &[&cluster])
            .await?;
        Ok(())
    }

    pub(super) async fn certificate_allowed(&self, cluster: &str, serial: &str) -> Result<bool> {
        let revoked = self
            .opt(
                "SELECT revoked FROM certificates WHERE serial = $1 AND cluster = $2",
                &[&serial, &cluster],
            )
            .await?;
        if let Some(row) = revoked {
            return Ok(!row.get::<_, bool>(0));
        }
        let ever_revoked: Option<i64> = self
            .opt("SELECT revoked_at FROM clusters WHERE id = $1", &[&cluster])
            .await?
            .and_then(|r| r.get(0));
        Ok(ever_revoked.is_none())
    }

    pub(super) async fn revoke_cluster(&self, cluster: &str) -> Result<bool> {
        let mut client = self.client().await?;
        let mut tx = Tx::new(client.transaction().await?);
        let n = tx
            .exec(
                "UPDATE clusters SET revoked = TRUE, revoked_at = $2 WHERE id = $1",
                &[&cluster, &now_unix()],
            )
            .await?;
        if n == 0 {
            return Ok(false);
        }
        tx.exec(
            "UPDATE certificates SET revoked = TRUE WHERE cluster = $1",
            &[&cluster],
        )
        .await?;
        tx.exec("DELETE FROM tokens WHERE cluster = $1", &[&cluster])
            .await?;
        tx.exec("SELECT pg_notify('sb_revoke', $1)", &[&cluster]).await?;
        tx.feed(&FeedEvent {
            cluster: cluster.into(),
            kind: feed::REVOKED.into(),
            ..Default::default()
        })
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn feed_end(&self) -> Result<u64> {
        let row = self.opt("SELECT coalesce(max(id), 0) FROM feed", &[]).await?;
        Ok(row.map(|r| unbig(r.get(0))).unwrap_or(0))
    }

    pub(super) async fn feed_after(
        &self,
        cluster: Option<&str>,
        after: u64,
        limit: u32,
    ) -> Result<Vec<FeedEvent>> {
        let rows = self
            .rows(
                &format!(
                    "SELECT {FEED_COLUMNS} FROM feed WHERE id > $2 AND ($1::TEXT IS NULL OR cluster = $1) ORDER BY id LIMIT $3"
                ),
                &[&cluster, &big(after), &i64::from(limit)],
            )
            .await?;
        Ok(rows.iter().map(|r| feed_event(r, 0)).collect())
    }

    /// [`Postgres::feed_after`] and the highest id retention pruned of that scope, in one
    /// statement: one snapshot, so a pass committing meanwhile is seen in both or neither.
    pub(super) async fn feed_page(
        &self,
        cluster: Option<&str>,
        after: u64,
        limit: u32,
    ) -> Result<(u64, Vec<FeedEvent>)> {
        let rows = self
            .rows(
                &format!(
                    "WITH mark AS (SELECT coalesce((SELECT through FROM feed_pruned WHERE cluster = $4), 0) AS through)
                     SELECT mark.through, f.* FROM mark LEFT JOIN LATERAL (
                       SELECT {FEED_COLUMNS} FROM feed WHERE id > $2 AND ($1::TEXT IS NULL OR cluster = $1)
                       ORDER BY id LIMIT $3) AS f ON TRUE
                     ORDER BY f.id"
                ),
                &[&cluster, &big(after), &i64::from(limit), &cluster.unwrap_or("")],
            )
            .await?;
        let through = rows.first().map(|r| unbig(r.get(0))).unwrap_or(0);
        let events = rows
            .iter()
            .filter(|r| r.get::<_, Option<i64>>(1).is_some())
            .map(|r| feed_event(r, 1))
            .collect();
        Ok((through, events))
    }

    /// One retention pass (see [`super::retention`]), if no other replica's is running: under
    /// a session-level advisory lock on one pooled connection, every statement on it and
    /// each its own transaction, the lock let go on the same connection at the end.
    pub(super) async fn prune(&self, now_ms: i64, policy: &Retention) -> Result<Pruned> {
        // Armed from before the lock is asked for until it is let go: a pass whose future is
        // dropped in between (cancelled, or the runtime stopping) may hold the lock.
        let mut held = LockHeld(Some(self.client().await?));
        let client = held.0.as_ref().expect("just set");
        let locked: bool = client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK])
            .await?
            .get(0);
        if !locked {
            held.release();
            tracing::debug!("retention: another replica's pass is running; skipping this round");
            return Ok(Pruned::default());
        }
        let pass = Pass(client).run(now_ms, policy).await;
        let unlocked = client
            .query_one("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
            .await
            .map(|r| r.get::<_, bool>(0));
        if matches!(unlocked, Ok(true)) {
            held.release();
        } else {
            tracing::warn!("retention: the advisory lock could not be released; closing its connection");
        }
        pass
    }

    pub(super) async fn log_streams(&self, cluster: &str) -> Result<Vec<LogStreamRow>> {
        // The last chunk by offset ends a stream (chunks never overlap).
        let rows = self
            .rows(
                r#"SELECT DISTINCT ON (stream) stream, "offset" + octet_length(data), eof, truncated,
                     (SELECT min("offset") FROM logs AS f WHERE f.cluster = logs.cluster AND f.stream = logs.stream)
                   FROM logs WHERE cluster = $1 ORDER BY stream, "offset" DESC"#,
                &[&cluster],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let (eof, truncated): (bool, bool) = (r.get(2), r.get(3));
                LogStreamRow {
                    stream: r.get(0),
                    length: unbig(r.get(1)),
                    first_offset: unbig(r.get(4)),
                    ended: eof || truncated,
                    truncated,
                }
            })
            .collect())
    }

    pub(super) async fn read_log(
        &self,
        cluster: &str,
        stream: &str,
        offset: u64,
        limit: usize,
    ) -> Result<LogRead> {
        let rows = self
            .rows(
                r#"SELECT "offset", data, truncated, eof,
                     (SELECT min("offset") FROM logs WHERE cluster = $1 AND stream = $2)
                   FROM logs
                   WHERE cluster = $1 AND stream = $2 AND "offset" + octet_length(data) >= $3
                   ORDER BY "offset" LIMIT 512"#,
                &[&cluster, &stream, &big(offset)],
            )
            .await?;
        // The first offset kept is read in the same statement as the chunks (one snapshot):
        // a pass pruning between two reads could not make either lie about the other.
        let first = rows.first().map(|r| unbig(r.get(4))).unwrap_or(0);
        let rows: Vec<(u64, Vec<u8>, bool, bool)> = rows
            .iter()
            .map(|r| (unbig(r.get(0)), r.get(1), r.get(2), r.get(3)))
            .collect();
        Ok(read_rows(offset, limit, first, &rows))
    }
}

const FEED_COLUMNS: &str =
    "id, cluster, kind, at_ms, epoch, object, phase, reason, message, command_seq, ok, truncated";

/// A feed entry from [`FEED_COLUMNS`] starting at column `at`.
fn feed_event(r: &Row, at: usize) -> FeedEvent {
    FeedEvent {
        id: unbig(r.get(at)),
        cluster: r.get(at + 1),
        kind: r.get(at + 2),
        at_ms: r.get(at + 3),
        epoch: unbig(r.get(at + 4)),
        object: r.get(at + 5),
        phase: r.get(at + 6),
        reason: r.get(at + 7),
        message: r.get(at + 8),
        command_seq: unbig(r.get(at + 9)),
        ok: r.get(at + 10),
        truncated: r.get(at + 11),
    }
}

/// A retention pass on the one connection that holds [`RETENTION_LOCK`].
struct Pass<'a>(&'a deadpool_postgres::Object);

/// The connection of a retention pass while it may hold [`RETENTION_LOCK`]. Dropped so, it is
/// closed rather than put back in the pool: its next user would hold the lock unknowingly,
/// and every replica would skip retention for as long as it lives. Closed, it lets go.
struct LockHeld(Option<deadpool_postgres::Object>);

impl LockHeld {
    /// The lock is not held (never taken, or let go): the connection goes back to the pool.
    fn release(&mut self) {
        self.0.take();
    }
}

impl Drop for LockHeld {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// Deletes the oldest feed entries up to an id, a batch at most, and raises the
/// pruned-through marks of their clusters and of all ('') in the same statement.
const DELETE_FEED: &str = "
WITH d AS (DELETE FROM feed WHERE id IN (SELECT id FROM feed WHERE id <= $1 ORDER BY id LIMIT $2) RETURNING cluster, id),
  marks AS (SELECT cluster, max(id) AS through FROM d WHERE cluster <> '' GROUP BY cluster
            UNION ALL SELECT '', max(id) FROM d HAVING count(*) > 0),
  up AS (INSERT INTO feed_pruned (cluster, through) SELECT cluster, through FROM marks
         ON CONFLICT (cluster) DO UPDATE SET through = greatest(feed_pruned.through, excluded.through))
SELECT count(*) FROM d";

/// [`DELETE_FEED`] of one cluster (`$3`).
const DELETE_CLUSTER_FEED: &str = "
WITH d AS (DELETE FROM feed WHERE id IN
             (SELECT id FROM feed WHERE cluster = $3 AND id <= $1 ORDER BY id LIMIT $2) RETURNING cluster, id),
  marks AS (SELECT cluster, max(id) AS through FROM d WHERE cluster <> '' GROUP BY cluster
            UNION ALL SELECT '', max(id) FROM d HAVING count(*) > 0),
  up AS (INSERT INTO feed_pruned (cluster, through) SELECT cluster, through FROM marks
         ON CONFLICT (cluster) DO UPDATE SET through = greatest(feed_pruned.through, excluded.through))
SELECT count(*) FROM d";

impl Pass<'_> {
    async fn rows(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>> {
        let statement = self.0.prepare_cached(sql).await?;
        Ok(self.0.query(&statement, params).await?)
    }

    async fn exec(&self, sql: &str, params: Params<'_>) -> Result<u64> {
        let statement = self.0.prepare_cached(sql).await?;
        Ok(self.0.execute(&statement, params).await?)
    }

    async fn run(&self, now_ms: i64, policy: &Retention) -> Result<Pruned> {
        let mut out = Pruned::ran();
        let batch = PRUNE_BATCH as i64;
        if let Some(age) = policy.events_max_age {
            let cut_ms = now_ms.saturating_sub(retention::ms(age));
            // The feed by its oldest ids: the first that is not old enough stops the pass, so
            // what goes is a prefix in id order (what a cursor can be compared with).
            loop {
                let rows = self
                    .rows("SELECT id, at_ms FROM feed ORDER BY id LIMIT $1", &[&batch])
                    .await?;
                let upto = rows
                    .iter()
                    .map(|r| (r.get::<_, i64>(0), r.get::<_, i64>(1)))
                    .take_while(|(_, at)| *at < cut_ms)
                    .last()
                    .map(|(id, _)| id);
                let Some(upto) = upto else { break };
                let n = unbig(self.rows(DELETE_FEED, &[&upto, &batch]).await?[0].get(0));
                out.feed += n;
                if n == 0 {
                    break;
                }
            }
            let cut_s = cut_ms.div_euclid(1000);
            loop {
                let n = self
                    .exec(
                        "DELETE FROM events WHERE (cluster, agent_seq) IN
                           (SELECT cluster, agent_seq FROM events WHERE at < $1 LIMIT $2)",
                        &[&cut_s, &batch],
                    )
                    .await?;
                out.events += n;
                if n < PRUNE_BATCH as u64 {
                    break;
                }
            }
        }
        if let Some(cap) = policy.events_per_cluster {
            let cap = big(cap);
            let over = self
                .rows(
                    "SELECT cluster FROM feed GROUP BY cluster HAVING count(*) > $1",
                    &[&cap],
                )
                .await?;
            for row in &over {
                let cluster: String = row.get(0);
                let boundary = self
                    .rows(
                        "SELECT id FROM feed WHERE cluster = $1 ORDER BY id DESC LIMIT 1 OFFSET $2",
                        &[&cluster, &cap],
                    )
                    .await?;
                let Some(boundary) = boundary.first().map(|r| r.get::<_, i64>(0)) else {
                    continue;
                };
                loop {
                    let n = unbig(
                        self.rows(DELETE_CLUSTER_FEED, &[&boundary, &batch, &cluster])
                            .await?[0]
                            .get(0),
                    );
                    out.feed += n;
                    if n == 0 {
                        break;
                    }
                }
            }
            let over = self
                .rows(
                    "SELECT cluster FROM events GROUP BY cluster HAVING count(*) > $1",
                    &[&cap],
                )
                .await?;
            for row in &over {
                let cluster: String = row.get(0);
                let boundary = self
                    .rows(
                        "SELECT agent_seq FROM events WHERE cluster = $1 ORDER BY agent_seq DESC LIMIT 1 OFFSET $2",
                        &[&cluster, &cap],
                    )
                    .await?;
                let Some(boundary) = boundary.first().map(|r| r.get::<_, i64>(0)) else {
                    continue;
                };
                loop {
                    let n = self
                        .exec(
                            "DELETE FROM events WHERE cluster = $1 AND agent_seq IN
                               (SELECT agent_seq FROM events WHERE cluster = $1 AND agent_seq <= $2 ORDER BY agent_seq LIMIT $3)",
                            &[&cluster, &boundary, &batch],
                        )
                        .await?;
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
                let ended = self
                    .rows(
                        r#"SELECT cluster, stream FROM logs AS l WHERE (eof OR truncated) AND at_ms < $1
                             AND "offset" = (SELECT max("offset") FROM logs AS m WHERE m.cluster = l.cluster AND m.stream = l.stream)
                           LIMIT $2"#,
                        &[&cut_ms, &batch],
                    )
                    .await?;
                if ended.is_empty() {
                    break;
                }
                for row in &ended {
                    self.delete_stream(row.get(0), row.get(1), &mut out).await?;
                }
            }
        }
        if let Some(cap) = policy.log_bytes_per_cluster {
            let over = self
                .rows(
                    "SELECT cluster, sum(octet_length(data))::BIGINT FROM logs GROUP BY cluster
                     HAVING sum(octet_length(data)) > $1",
                    &[&big(cap)],
                )
                .await?;
            for row in &over {
                let (cluster, total): (String, i64) = (row.get(0), row.get(1));
                let mut streams: Vec<StreamSize> = self
                    .rows(
                        r#"SELECT stream, sum(octet_length(data))::BIGINT, max(at_ms),
                             (SELECT eof OR truncated FROM logs AS e WHERE e.cluster = $1 AND e.stream = l.stream
                              ORDER BY "offset" DESC LIMIT 1)
                           FROM logs AS l WHERE cluster = $1 GROUP BY stream"#,
                        &[&cluster],
                    )
                    .await?
                    .iter()
                    .map(|r| StreamSize {
                        stream: r.get(0),
                        bytes: unbig(r.get(1)),
                        last_at_ms: r.get(2),
                        ended: r.get(3),
                    })
                    .collect();
                retention::oldest_first(&mut streams);
                let mut excess = unbig(total).saturating_sub(cap);
                for s in &streams {
                    match retention::cut(s, excess) {
                        None => break,
                        Some(Cut::Whole(stream)) => {
                            excess =
                                excess.saturating_sub(self.delete_stream(&cluster, &stream, &mut out).await?);
                        }
                        Some(Cut::Prefix(stream, need)) => {
                            excess = excess
                                .saturating_sub(self.delete_prefix(&cluster, &stream, need, &mut out).await?);
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Deletes a stream, oldest chunks first (its end last: a reader meanwhile is told its
    /// prefix is gone); returns the bytes freed.
    async fn delete_stream(&self, cluster: &str, stream: &str, out: &mut Pruned) -> Result<u64> {
        let mut freed = 0;
        loop {
            let deleted = self
                .rows(
                    r#"DELETE FROM logs WHERE cluster = $1 AND stream = $2 AND "offset" IN
                         (SELECT "offset" FROM logs WHERE cluster = $1 AND stream = $2 ORDER BY "offset" LIMIT $3)
                       RETURNING octet_length(data)::BIGINT"#,
                    &[&cluster, &stream, &(PRUNE_BATCH as i64)],
                )
                .await?;
            out.log_chunks += deleted.len() as u64;
            let bytes: u64 = deleted.iter().map(|r| unbig(r.get(0))).sum();
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
    async fn delete_prefix(&self, cluster: &str, stream: &str, need: u64, out: &mut Pruned) -> Result<u64> {
        let mut freed = 0;
        while freed < need {
            let chunks: Vec<(u64, u64)> = self
                .rows(
                    r#"SELECT "offset", octet_length(data)::BIGINT FROM logs WHERE cluster = $1 AND stream = $2
                         AND "offset" < (SELECT max("offset") FROM logs WHERE cluster = $1 AND stream = $2)
                       ORDER BY "offset" LIMIT $3"#,
                    &[&cluster, &stream, &(PRUNE_BATCH as i64)],
                )
                .await?
                .iter()
                .map(|r| (unbig(r.get(0)), unbig(r.get(1))))
                .collect();
            let Some((upto, bytes)) = retention::prefix_upto(&chunks, need - freed) else {
                break;
            };
            let n = self
                .exec(
                    r#"DELETE FROM logs WHERE cluster = $1 AND stream = $2 AND "offset" <= $3"#,
                    &[&cluster, &stream, &big(upto)],
                )
                .await?;
            out.log_chunks += n;
            out.log_bytes += bytes;
            freed += bytes;
        }
        Ok(freed)
    }
}
