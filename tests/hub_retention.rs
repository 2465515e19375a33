//! Retention of the hub's store, the same suite on both backends (SQLite in a temporary
//! directory, a real Postgres started by the test harness): what goes by age and by size,
//! per cluster; what a reader of a pruned cursor or log offset is told; and, on Postgres,
//! that two replicas' passes never prune at once. Time is passed to `Store::prune`, never
//! slept through.

use std::time::Duration;

use shapeblock_hub::store::{
    FeedEvent, Location, LogChunk, ObjectStatus, Pruned, RETENTION_LOCK, Retention, Store, StoreError, Write,
    feed,
};

#[path = "support/backends.rs"]
mod backends;
use backends::{Place, on_both};

/// Each test's Postgres database name starts with this.
const DATABASE: &str = "hub_retention";

on_both!(
    events_older_than_the_age_go_as_a_prefix_and_a_cursor_before_it_is_told_where_to_resume,
    a_cluster_over_its_event_cap_keeps_its_newest_and_one_under_it_keeps_everything,
    ended_logs_older_than_the_age_go_whole_and_a_live_one_is_never_pruned_by_age,
    a_cluster_over_its_log_cap_loses_its_oldest_bytes_and_a_live_stream_keeps_valid_offsets,
);

const DAY: Duration = Duration::from_secs(86_400);

fn now_ms() -> i64 {
    shapeblock_proto::now_unix_ms()
}

/// Lets the clock move on, so what is written next is newer than what was written before.
async fn tick() {
    tokio::time::sleep(Duration::from_millis(5)).await;
}

/// An agent session of `cluster` recording messages from seq 1 on.
struct Agent<'a> {
    store: &'a Store,
    cluster: String,
    epoch: u64,
    seq: u64,
}

impl<'a> Agent<'a> {
    async fn begin(store: &'a Store, cluster: &str) -> Self {
        let (epoch, seq) = store.begin_session(cluster, &Default::default()).await.unwrap();
        Self {
            store,
            cluster: cluster.into(),
            epoch,
            seq,
        }
    }

    async fn record(&mut self, writes: &[Write]) {
        self.seq += 1;
        assert!(
            self.store
                .record(&self.cluster, self.epoch, self.seq, writes)
                .await
                .unwrap()
        );
    }

    /// A phase change: a history event, the object's status and a feed entry.
    async fn phase(&mut self, name: &str, phase: &str) {
        let key = format!("Project//{name}");
        let writes = [
            Write::Event {
                kind: "phase".into(),
                object: key.clone(),
                detail: phase.into(),
            },
            Write::Object(ObjectStatus {
                key: key.clone(),
                phase: phase.into(),
                observed_generation: 1,
                reason: String::new(),
                message: String::new(),
            }),
            Write::Feed(FeedEvent {
                cluster: self.cluster.clone(),
                kind: feed::PHASE.into(),
                object: key,
                phase: phase.into(),
                ..Default::default()
            }),
        ];
        self.record(&writes).await;
    }

    async fn log(&mut self, stream: &str, offset: u64, data: &[u8], eof: bool) {
        let chunk = LogChunk {
            stream: stream.into(),
            offset,
            data: data.to_vec(),
            truncated: false,
            eof,
            kind: "AppBuild".into(),
        };
        self.record(&[Write::Log(chunk)]).await;
    }
}

async fn feed_ids(store: &Store, cluster: Option<&str>) -> Vec<u64> {
    store
        .feed_after(cluster, 0, 100_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect()
}

fn events_only(days: u64) -> Retention {
    Retention {
        events_max_age: Some(DAY * days as u32),
        ..Default::default()
    }
}

/// The feed goes by age as a prefix in id order, the agents' history with it, the objects'
/// status stays; resuming from a cursor inside what went is OUT_OF_RANGE-worthy (the store
/// names the cursor to resume from), from 0 or from that cursor is not.
async fn events_older_than_the_age_go_as_a_prefix_and_a_cursor_before_it_is_told_where_to_resume(
    place: Place,
) {
    let store = place.open().await;
    let started = now_ms();
    let mut a = Agent::begin(&store, "a").await;
    for i in 0..5 {
        a.phase(&format!("p{i}"), "Pending").await;
    }
    let old = feed_ids(&store, None).await;
    tick().await;
    let mid = now_ms();
    tick().await;
    for i in 0..3 {
        a.phase(&format!("p{i}"), "Ready").await;
    }
    let all = feed_ids(&store, None).await;
    let new: Vec<u64> = all[old.len()..].to_vec();
    assert_eq!(
        (old.len(), new.len()),
        (6, 3),
        "session-up and five phases, then three"
    );

    // A week's retention a little short of a week after the start: nothing is old enough.
    let policy = events_only(7);
    let early = store
        .prune(started + 7 * 86_400_000 - 60_000, &policy)
        .await
        .unwrap();
    assert_eq!(
        early,
        Pruned {
            ran: true,
            ..Default::default()
        }
    );
    assert_eq!(feed_ids(&store, None).await, all);

    // A week after `mid`: exactly what was written before it.
    let pass = store.prune(mid + 7 * 86_400_000, &policy).await.unwrap();
    assert!(pass.ran);
    assert_eq!(pass.feed, old.len() as u64);
    assert_eq!(
        feed_ids(&store, None).await,
        new,
        "the newer entries, all of them"
    );
    let last_pruned = *old.last().unwrap();

    // Cursors: 0 is "what the hub has"; the last pruned id is where nothing is missing; one
    // before it lost entries, said with the cursor to resume from, for the cluster and for all.
    assert_eq!(ids(store.feed_resume(None, 0, 100).await.unwrap()), new);
    assert_eq!(
        ids(store.feed_resume(Some("a"), last_pruned, 100).await.unwrap()),
        new
    );
    for scope in [None, Some("a")] {
        match store.feed_resume(scope, old[1], 100).await {
            Err(StoreError::Pruned { resume, message }) => {
                assert_eq!(resume, last_pruned, "{message}");
                assert!(message.contains(&format!("after_id {last_pruned}")), "{message}");
            }
            other => panic!("a pruned cursor ({scope:?}) must be refused, got {other:?}"),
        }
    }
    // Another cluster lost nothing: its cursors are fine whatever the number.
    assert!(store.feed_resume(Some("b"), 1, 100).await.unwrap().is_empty());

    // Everything old enough: the feed and the history are empty, the objects' status is not
    // an event and stays.
    let everything = store.prune(now_ms() + 8 * 86_400_000, &policy).await.unwrap();
    assert_eq!(everything.feed, new.len() as u64);
    // The history is dated in seconds: the pass at `mid` may have taken some of it already.
    assert_eq!(
        pass.events + everything.events,
        8,
        "the eight history rows, once each"
    );
    assert!(feed_ids(&store, None).await.is_empty());
    assert!(store.events("a").await.unwrap().is_empty());
    let objects = store.objects("a").await.unwrap();
    assert_eq!(objects.len(), 5);
    assert_eq!(objects.iter().filter(|o| o.phase == "Ready").count(), 3);
    // A new entry after it all is read from the last cursor with no error.
    let through = *new.last().unwrap();
    a.phase("p9", "Ready").await;
    let fresh = store.feed_resume(None, through, 100).await.unwrap();
    assert_eq!(fresh.len(), 1);
    assert!(fresh[0].id > through);
    // A pass with nothing to do deletes nothing: nothing is pruned twice.
    let again = store.prune(mid + 7 * 86_400_000, &policy).await.unwrap();
    assert_eq!(again.total_rows(), 0);
}

fn ids(events: Vec<FeedEvent>) -> Vec<u64> {
    events.into_iter().map(|e| e.id).collect()
}

/// The per-cluster cap: cluster "big" keeps its newest N feed entries and history rows,
/// cluster "small" (under the cap, its entries interleaved with big's) keeps all of them.
async fn a_cluster_over_its_event_cap_keeps_its_newest_and_one_under_it_keeps_everything(place: Place) {
    let store = place.open().await;
    let mut big = Agent::begin(&store, "big").await;
    let mut small = Agent::begin(&store, "small").await;
    for i in 0..30 {
        big.phase(&format!("p{i}"), "Ready").await;
        if i % 6 == 0 {
            small.phase(&format!("p{i}"), "Ready").await;
        }
    }
    let big_before = feed_ids(&store, Some("big")).await;
    let small_before = feed_ids(&store, Some("small")).await;
    assert_eq!((big_before.len(), small_before.len()), (31, 6));
    let policy = Retention {
        events_per_cluster: Some(10),
        ..Default::default()
    };
    let pass = store.prune(now_ms(), &policy).await.unwrap();
    assert_eq!((pass.feed, pass.events), (21, 20));
    assert_eq!(feed_ids(&store, Some("big")).await, big_before[21..]);
    assert_eq!(
        feed_ids(&store, Some("small")).await,
        small_before,
        "under the cap: untouched"
    );
    let history: Vec<u64> = store
        .events("big")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        history,
        (big.seq - 9..=big.seq).collect::<Vec<_>>(),
        "the newest ten"
    );
    assert_eq!(store.events("small").await.unwrap().len(), 5);

    // small's cursors are whole; big's, and the all-clusters one, say what went.
    let small_first = small_before[0];
    assert_eq!(
        ids(store.feed_resume(Some("small"), small_first, 100).await.unwrap()),
        small_before[1..]
    );
    let big_pruned = big_before[20];
    for scope in [Some("big"), None] {
        match store.feed_resume(scope, small_first, 100).await {
            Err(StoreError::Pruned { resume, .. }) => assert_eq!(resume, big_pruned),
            other => panic!("{scope:?}: {other:?}"),
        }
    }
    assert!(store.feed_resume(Some("big"), big_pruned, 100).await.is_ok());
    // At the cap now: a second pass deletes nothing.
    assert_eq!(store.prune(now_ms(), &policy).await.unwrap().total_rows(), 0);
}

fn logs_only(days: u64) -> Retention {
    Retention {
        logs_max_age: Some(DAY * days as u32),
        ..Default::default()
    }
}

/// By age, a log goes only once it ended, and whole; one still being written stays however
/// old its last write, and keeps being written.
async fn ended_logs_older_than_the_age_go_whole_and_a_live_one_is_never_pruned_by_age(place: Place) {
    let store = place.open().await;
    let mut a = Agent::begin(&store, "a").await;
    a.log("ns/old/build", 0, b"old build ", false).await;
    a.log("ns/old/build", 10, b"done", true).await;
    a.log("ns/live/build", 0, b"still ", false).await;
    tick().await;
    let mid = now_ms();
    tick().await;
    a.log("ns/new/build", 0, b"new build", true).await;
    let pass = store.prune(mid + 86_400_000, &logs_only(1)).await.unwrap();
    assert_eq!(
        (pass.log_streams, pass.log_chunks, pass.log_bytes),
        (1, 2, 14),
        "the old ended stream, whole"
    );
    let streams: Vec<String> = store
        .log_streams("a")
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.stream)
        .collect();
    assert_eq!(streams, ["ns/live/build", "ns/new/build"]);
    // The live one, a year on, still stays, and goes on where it was.
    let year = store
        .prune(now_ms() + 365 * 86_400_000, &logs_only(1))
        .await
        .unwrap();
    assert_eq!(year.log_streams, 1, "the new ended stream");
    a.log("ns/live/build", 6, b"going", false).await;
    assert_eq!(
        store.log("a", "ns/live/build").await.unwrap(),
        (b"still going".to_vec(), false, false)
    );
    let kinds: Vec<String> = store
        .feed_after(Some("a"), 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(!kinds.iter().any(|k| k == feed::LOG_GAP), "{kinds:?}");
}

/// By size, per cluster: the oldest bytes of the cluster over its cap go (an ended stream
/// whole when it fits in the excess, else a live stream's oldest chunks, never its last),
/// the cluster under its cap is untouched; the live stream goes on at its offsets, and a
/// reader of the pruned range is told where the kept bytes begin.
async fn a_cluster_over_its_log_cap_loses_its_oldest_bytes_and_a_live_stream_keeps_valid_offsets(
    place: Place,
) {
    let store = place.open().await;
    let mut a = Agent::begin(&store, "a").await;
    let mut b = Agent::begin(&store, "b").await;
    let chunk = |n: u8| vec![b'a' + n; 100];
    for i in 0..3u64 {
        a.log("ns/old/build", i * 100, &chunk(i as u8), i == 2).await;
    }
    for i in 0..5u64 {
        b.log("ns/b/build", i * 100, &chunk(i as u8), i == 4).await;
    }
    tick().await;
    for i in 0..10u64 {
        a.log("ns/live/build", i * 100, &chunk(i as u8), false).await;
    }
    let live = "ns/live/build";
    // a holds 1,300 bytes, b 500; a cap of 800 frees 500 of a: the ended 300 whole, then
    // the live stream's two oldest chunks.
    let policy = Retention {
        log_bytes_per_cluster: Some(800),
        ..Default::default()
    };
    let pass = store.prune(now_ms(), &policy).await.unwrap();
    assert_eq!((pass.log_streams, pass.log_chunks, pass.log_bytes), (1, 5, 500));
    let streams = store.log_streams("a").await.unwrap();
    assert_eq!(streams.len(), 1);
    assert_eq!(
        (
            streams[0].stream.as_str(),
            streams[0].first_offset,
            streams[0].length
        ),
        (live, 200, 1000)
    );
    assert_eq!(
        store.log("b", "ns/b/build").await.unwrap().0.len(),
        500,
        "b is under its cap"
    );

    // Reading: from 0 is from the first byte kept, said so; from inside the pruned range is
    // refused with where to resume; from a kept offset is as before.
    let from_zero = store.read_log("a", live, 0, 150).await.unwrap();
    assert_eq!((from_zero.offset, from_zero.first_offset), (200, 200));
    assert_eq!(from_zero.data, [[b'c'; 100].as_slice(), &[b'd'; 50]].concat());
    match store.read_log("a", live, 150, 10).await {
        Err(StoreError::Pruned { resume, message }) => {
            assert_eq!(resume, 200);
            assert!(message.contains("offset 150"), "{message}");
        }
        other => panic!("a pruned offset must be refused, got {other:?}"),
    }
    let kept = store.read_log("a", live, 250, 100).await.unwrap();
    assert_eq!((kept.offset, kept.data.len(), kept.next_offset), (250, 100, 350));

    // The agent writes on: no gap, the end where it was, the new bytes readable.
    a.log(live, 1000, b"tail", false).await;
    assert_eq!(store.log_end("a", live).await.unwrap(), (1004, false));
    let tail = store.read_log("a", live, 1000, 100).await.unwrap();
    assert_eq!(tail.data, b"tail");

    // A cap smaller than one chunk: everything but the live stream's last chunk goes.
    let tiny = Retention {
        log_bytes_per_cluster: Some(1),
        ..Default::default()
    };
    store.prune(now_ms(), &tiny).await.unwrap();
    let streams = store.log_streams("a").await.unwrap();
    assert_eq!((streams[0].first_offset, streams[0].length), (1000, 1004));
    a.log(live, 1004, b"!", true).await;
    assert_eq!(store.read_log("a", live, 0, 100).await.unwrap().data, b"tail!");
    let kinds: Vec<String> = store
        .feed_after(Some("a"), 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(!kinds.iter().any(|k| k == feed::LOG_GAP), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| *k == feed::LOG_OPENED).count(),
        2,
        "{kinds:?}"
    );
}

/// Postgres only: while one replica's pass holds the retention lock another's skips (and
/// deletes nothing); two passes at once delete every row once between them, and the lock is
/// let go after each (a later pass runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_prune_at_once_and_nothing_is_deleted_twice() {
    let place = Place::postgres(DATABASE).await;
    let Location::Postgres { url, .. } = &place.location else {
        unreachable!()
    };
    let (a, b) = (place.open().await, place.open().await);
    let mut agent = Agent::begin(&a, "c").await;
    // Five thousand feed entries in one message: more than a batch, several statements.
    let writes: Vec<Write> = (0..5000)
        .map(|i| {
            Write::Feed(FeedEvent {
                cluster: "c".into(),
                kind: feed::PHASE.into(),
                object: format!("Project//p{i}"),
                phase: "Ready".into(),
                ..Default::default()
            })
        })
        .collect();
    agent.record(&writes).await;
    let total = feed_ids(&a, None).await.len() as u64;
    assert_eq!(total, 5001);
    let policy = events_only(1);
    let later = now_ms() + 2 * 86_400_000;

    // Another replica's pass, as far as the lock says: held from a connection of our own.
    let (holder, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    holder
        .execute("SELECT pg_advisory_lock($1)", &[&RETENTION_LOCK])
        .await
        .unwrap();
    for store in [&a, &b] {
        let skipped = store.prune(later, &policy).await.unwrap();
        assert_eq!(skipped, Pruned::default(), "skipped, nothing deleted");
    }
    assert_eq!(feed_ids(&a, None).await.len() as u64, total);
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
        .await
        .unwrap();

    let (pa, pb) = tokio::join!(a.prune(later, &policy), b.prune(later, &policy));
    let (pa, pb) = (pa.unwrap(), pb.unwrap());
    assert!(pa.ran || pb.ran);
    // One pass did all of it: had both pruned at once they would have shared the rows.
    assert!(pa.feed == 0 || pb.feed == 0, "{pa:?} {pb:?}");
    assert_eq!(pa.feed + pb.feed, total, "every row once: {pa:?} {pb:?}");
    assert!(feed_ids(&a, None).await.is_empty());
    // Each pass let go of the lock on its connection: ours takes it at once.
    let free: bool = holder
        .query_one("SELECT pg_try_advisory_lock($1)", &[&RETENTION_LOCK])
        .await
        .unwrap()
        .get(0);
    assert!(free, "a pass left the retention lock held");
    holder
        .execute("SELECT pg_advisory_unlock($1)", &[&RETENTION_LOCK])
        .await
        .unwrap();
    drop(holder);
    let _ = connection.await;
    // And a later pass runs (nothing left to do).
    let after = b.prune(later, &policy).await.unwrap();
    assert!(after.ran);
    assert_eq!(after.total_rows(), 0);
}
