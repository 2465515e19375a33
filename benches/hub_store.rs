//! Benchmark (not a test) of the hub's store on both backends, in one run and on one machine:
//! SQLite in a temporary directory on tmpfs (WAL, `synchronous=NORMAL`, as the hub opens it)
//! and Postgres from the test harness (tmpfs, `fsync=off`), through the same interface.
//!
//! 1. one session recording `CHUNKS` (default 2000) 4 KiB log chunks one after the other (what
//!    one agent streaming a build log costs: messages/s, p50/p99 per message);
//! 2. `SESSIONS` (default 16) sessions of as many clusters recording at once, `CHUNKS` / 4
//!    each (messages/s all together; on Postgres over a pool of `POOL` (default 16)
//!    connections);
//! 3. `SESSIONS` callers queuing commands at once, 200 each (commands/s, each with its feed
//!    entry).
//!
//! `cargo bench --bench hub_store` (`BACKENDS=sqlite` or `BACKENDS=postgres` for one).

use std::sync::Arc;
use std::time::{Duration, Instant};

use shapeblock_hub::store::{Location, LogChunk, Store, Write};
use shapeblock_testenv::postgres::Postgres;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn chunk(stream: &str, offset: u64) -> Write {
    Write::Log(LogChunk {
        stream: stream.into(),
        offset,
        data: vec![b'x'; 4096],
        truncated: false,
        eof: false,
        kind: "AppBuild".into(),
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Records `n` chunks in one session of `cluster`; the time of each.
async fn stream(store: &Store, cluster: &str, n: usize) -> Vec<Duration> {
    let (epoch, _) = store.begin_session(cluster, &Default::default()).await.unwrap();
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let write = chunk("ns/b/build", i as u64 * 4096);
        assert!(
            store
                .record(cluster, epoch, i as u64 + 1, &[write])
                .await
                .unwrap()
        );
        times.push(started.elapsed());
    }
    times
}

async fn measure(name: &str, location: Location) {
    let chunks = env_or("CHUNKS", 2000);
    let sessions = env_or("SESSIONS", 16);
    let store = Arc::new(Store::open(&location).await.unwrap());

    let started = Instant::now();
    let mut times = stream(&store, "one", chunks).await;
    let took = started.elapsed();
    times.sort();
    println!(
        "{name:>8}  1 session, {chunks} chunks of 4 KiB: {:>7.0} msg/s ({:.1} MB/s), p50 {:.2} ms, p99 {:.2} ms",
        chunks as f64 / took.as_secs_f64(),
        chunks as f64 * 4096.0 / took.as_secs_f64() / 1e6,
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
    );

    let each = (chunks / 4).max(1);
    let started = Instant::now();
    let tasks: Vec<_> = (0..sessions)
        .map(|s| {
            let store = store.clone();
            tokio::spawn(async move { stream(&store, &format!("s{s}"), each).await })
        })
        .collect();
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await.unwrap());
    }
    let took = started.elapsed();
    times.sort();
    println!(
        "{name:>8}  {sessions} sessions at once, {each} chunks each: {:>7.0} msg/s, p50 {:.2} ms, p99 {:.2} ms",
        (sessions * each) as f64 / took.as_secs_f64(),
        percentile(&times, 0.5).as_secs_f64() * 1e3,
        percentile(&times, 0.99).as_secs_f64() * 1e3,
    );

    let started = Instant::now();
    let tasks: Vec<_> = (0..sessions)
        .map(|s| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..200 {
                    store.add_command(&format!("q{s}"), b"command").await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let took = started.elapsed();
    println!(
        "{name:>8}  {sessions} callers queuing 200 commands each: {:>7.0} commands/s",
        (sessions * 200) as f64 / took.as_secs_f64(),
    );
}

#[tokio::main]
async fn main() {
    let backends = std::env::var("BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    if backends.contains("sqlite") {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap());
        measure("sqlite", Location::Sqlite(dir.path().join("hub.sqlite"))).await;
    }
    if backends.contains("postgres") {
        let postgres = Postgres::start().unwrap();
        let url = postgres.database("bench").unwrap();
        let pool_size = env_or("POOL", 16);
        measure("postgres", Location::Postgres { url, pool_size }).await;
        drop(postgres);
    }
}
