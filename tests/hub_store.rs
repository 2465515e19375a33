//! The hub's store, the same suite on both backends: SQLite in a temporary directory and a real
//! Postgres (Debian's, started by the test harness; one server per test process, a database
//! per test). Every test body runs twice, as `<name>::sqlite` and `<name>::postgres`.

use std::collections::HashMap;
use std::time::Duration;

use prost::Message;
use shapeblock_hub::store::notify::Notice;
use shapeblock_hub::store::{
    FeedEvent, Location, LogChunk, LogStreamRow, ObjectStatus, Queued, Recorded, Store, StoreError,
    TokenRevoke, Write, feed,
};
use shapeblock_proto::v1::server_message::Body as Down;
use shapeblock_proto::v1::{Hello, Inventory, ServerMessage, SetConfig};
use shapeblock_testenv::postgres::Postgres;

#[path = "support/backends.rs"]
mod backends;
use backends::{Place, on_both};

/// Each test's Postgres database name starts with this.
const DATABASE: &str = "hub_store";

on_both!(
    a_store_keeps_its_id_across_opens_and_a_new_one_has_another,
    a_message_is_recorded_once_and_never_for_an_old_epoch,
    a_batch_records_its_new_messages_once_and_nothing_for_an_old_epoch,
    a_log_reads_from_any_offset_jumps_a_gap_after_its_marker_and_says_where_it_ends,
    commands_are_queued_once_per_idempotency_key_delivered_and_answered,
    a_token_binds_one_key_and_only_an_unused_one_is_revoked,
    api_keys_are_listed_in_order_and_a_revoked_one_is_not_valid,
    a_revoked_cluster_refuses_its_certificates_until_it_enrolls_again,
    a_session_keeps_what_the_agent_said_and_ends_only_its_own_epoch,
    the_feed_is_in_commit_order_filtered_by_cluster_and_wakes_watchers,
    concurrent_writers_number_the_feed_without_holes_and_commands_without_repeats,
    stores_opened_together_on_one_database_migrate_once,
    a_new_session_fences_the_old_one_even_mid_write,
);

fn hello(version: &str) -> Hello {
    Hello {
        agent_version: version.into(),
        capabilities: vec!["apply".into(), "x".repeat(500)],
        inventory: Some(Inventory {
            kubernetes_version: "v1.35.0".into(),
            node_count: 3,
            allocatable_cpu_millis: 6000,
            allocatable_memory_bytes: 1 << 34,
        }),
    }
}

fn event(kind: &str, object: &str, detail: &str) -> Write {
    Write::Event {
        kind: kind.into(),
        object: object.into(),
        detail: detail.into(),
    }
}

async fn kinds(store: &Store, cluster: &str) -> Vec<String> {
    store
        .feed_after(Some(cluster), 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect()
}

async fn a_store_keeps_its_id_across_opens_and_a_new_one_has_another(place: Place) {
    let store = place.open().await;
    let id = store.id().await.unwrap();
    assert_eq!(id.len(), 32);
    store.add_token("h", "c", i64::MAX).await.unwrap();
    drop(store);
    let again = place.open().await;
    assert_eq!(again.id().await.unwrap(), id, "kept across opens");
    assert!(
        again.token("h").await.unwrap().is_some(),
        "and so is what it holds"
    );
    let other = match &place.location {
        Location::Sqlite(_) => Place::sqlite(),
        Location::Postgres { .. } => Place::postgres(DATABASE).await,
    };
    assert_ne!(
        other.open().await.id().await.unwrap(),
        id,
        "a new store, a new id"
    );
}

async fn a_message_is_recorded_once_and_never_for_an_old_epoch(place: Place) {
    let store = place.open().await;
    let (old, last) = store.begin_session("c", &hello("1.0.0")).await.unwrap();
    assert_eq!((old, last), (1, 0));
    let phase = |name: &str| ObjectStatus {
        key: format!("Project//{name}"),
        phase: "Ready".into(),
        observed_generation: 1,
        reason: String::new(),
        message: String::new(),
    };
    let writes = |name: &str| {
        vec![
            Write::Object(phase(name)),
            event("phase", &format!("Project//{name}"), "Ready"),
        ]
    };
    assert!(store.record("c", old, 1, &writes("a")).await.unwrap());
    assert!(
        !store.record("c", old, 1, &writes("b")).await.unwrap(),
        "seq 1 again"
    );
    assert!(
        !store.record("c", old + 7, 2, &writes("b")).await.unwrap(),
        "an epoch that never was"
    );
    // A newer session: the old one is fenced, whatever seq it sends.
    let (new, last) = store.begin_session("c", &hello("1.0.1")).await.unwrap();
    assert_eq!((new, last), (2, 1), "the new session resumes after seq 1");
    assert!(!store.record("c", old, 2, &writes("b")).await.unwrap(), "fenced");
    assert!(
        !store.record("c", new, 1, &writes("b")).await.unwrap(),
        "seq 1 is recorded"
    );
    assert!(store.record("c", new, 2, &writes("c")).await.unwrap());
    let objects: Vec<String> = store
        .objects("c")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        objects,
        ["Project//a", "Project//c"],
        "nothing of the refused writes"
    );
    let events = store.events("c").await.unwrap();
    assert_eq!(
        events.iter().map(|e| (e.0, e.2.as_str())).collect::<Vec<_>>(),
        [(1, "Project//a"), (2, "Project//c")]
    );
    assert_eq!(store.cluster("c").await.unwrap().unwrap().last_agent_seq, 2);
    // A write that fails takes the whole message with it: seq 3 stays unrecorded.
    let failing = vec![event("phase", "x", "1"), event("phase", "x", "2")];
    assert!(
        store.record("c", new, 3, &failing).await.is_err(),
        "two events for one seq"
    );
    assert_eq!(store.cluster("c").await.unwrap().unwrap().last_agent_seq, 2);
    assert_eq!(store.events("c").await.unwrap().len(), 2);
    assert!(
        store.record("c", new, 3, &[]).await.unwrap(),
        "seq 3 is still to come"
    );
}

async fn a_batch_records_its_new_messages_once_and_nothing_for_an_old_epoch(place: Place) {
    let store = place.open().await;
    let (old, _) = store.begin_session("c", &hello("1.0.0")).await.unwrap();
    let chunk = |offset: u64, data: &str| {
        vec![Write::Log(LogChunk {
            stream: "ns/b/build".into(),
            offset,
            data: data.as_bytes().to_vec(),
            truncated: false,
            eof: false,
            kind: "AppBuild".into(),
        })]
    };
    let (a, b, c, d) = (
        chunk(0, "one "),
        chunk(4, "two "),
        chunk(8, "three "),
        chunk(14, "four"),
    );
    assert_eq!(
        store.record_batch("c", old, &[(1, &a), (2, &b)]).await.unwrap(),
        Recorded::New
    );
    // A resend of 2 with what follows it: 2 is skipped, 3 recorded.
    assert_eq!(
        store
            .record_batch("c", old, &[(2, &chunk(4, "TWO ")), (3, &c)])
            .await
            .unwrap(),
        Recorded::New
    );
    assert_eq!(
        store.record_batch("c", old, &[(1, &a), (3, &c)]).await.unwrap(),
        Recorded::Duplicate,
        "all resends"
    );
    assert_eq!(store.cluster("c").await.unwrap().unwrap().last_agent_seq, 3);
    let (new, last) = store.begin_session("c", &hello("1.0.1")).await.unwrap();
    assert_eq!(last, 3);
    assert_eq!(
        store.record_batch("c", old, &[(4, &d), (5, &d)]).await.unwrap(),
        Recorded::Fenced,
        "the old session's batch"
    );
    assert_eq!(store.log("c", "ns/b/build").await.unwrap().0, b"one two three ");
    // A batch whose second write fails is not recorded at all (seq 4 stays to come).
    let failing = vec![event("phase", "x", "1"), event("phase", "x", "2")];
    assert!(
        store
            .record_batch("c", new, &[(4, &d), (5, &failing)])
            .await
            .is_err()
    );
    assert_eq!(store.cluster("c").await.unwrap().unwrap().last_agent_seq, 3);
    assert_eq!(
        store.record_batch("c", new, &[(4, &d)]).await.unwrap(),
        Recorded::New
    );
    assert_eq!(
        store.log("c", "ns/b/build").await.unwrap().0,
        b"one two three four"
    );
}

async fn a_log_reads_from_any_offset_jumps_a_gap_after_its_marker_and_says_where_it_ends(place: Place) {
    let store = place.open().await;
    store.add_token("h", "c", i64::MAX).await.unwrap();
    let (epoch, _) = store.begin_session("c", &Default::default()).await.unwrap();
    let mut seq = 0;
    let stream = "ns/b/build";
    let mut chunk = async |offset: u64, data: &[u8], eof: bool| {
        seq += 1;
        let write = Write::Log(LogChunk {
            stream: stream.into(),
            offset,
            data: data.to_vec(),
            truncated: false,
            eof,
            kind: "AppBuild".into(),
        });
        assert!(store.record("c", epoch, seq, &[write]).await.unwrap());
    };
    chunk(0, b"hello ", false).await;
    // A replay of what is stored adds nothing.
    chunk(0, b"hello", false).await;
    // A chunk past the end: the store lost bytes 6..10.
    chunk(10, b"world", false).await;
    let read = async |offset, limit| store.read_log("c", stream, offset, limit).await.unwrap();
    let first = read(0, 1 << 20).await;
    assert_eq!(
        (
            first.data.as_slice(),
            first.truncated,
            first.eof,
            first.next_offset
        ),
        (&b"hello "[..], true, false, 10)
    );
    let second = read(first.next_offset, 1 << 20).await;
    assert_eq!(
        (second.offset, second.data.as_slice(), second.eof),
        (10, &b"world"[..], false)
    );
    assert_eq!(read(2, 3).await.data, b"llo");
    assert_eq!(read(8, 100).await.offset, 10, "inside the gap: from its end");
    assert_eq!(store.log_end("c", stream).await.unwrap(), (15, false));
    chunk(15, b"!", true).await;
    let last = read(15, 100).await;
    assert_eq!(
        (last.data.as_slice(), last.eof, last.next_offset),
        (&b"!"[..], true, 16)
    );
    assert_eq!(store.log_end("c", stream).await.unwrap(), (16, true));
    assert_eq!(
        store.log("c", stream).await.unwrap(),
        (b"hello world!".to_vec(), true, true)
    );
    assert_eq!(
        store.log_streams("c").await.unwrap(),
        [LogStreamRow {
            stream: stream.into(),
            length: 16,
            first_offset: 0,
            ended: true,
            truncated: false
        }]
    );
    assert_eq!(
        kinds(&store, "c").await,
        [feed::SESSION_UP, feed::LOG_OPENED, feed::LOG_GAP, feed::LOG_ENDED]
    );
    let gap = store
        .events("c")
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.1 == "log-gap")
        .expect("the gap is in the history");
    assert_eq!(
        (gap.0, gap.3.as_str()),
        (3, "bytes 6..10 missing: the store lost them")
    );
}

async fn commands_are_queued_once_per_idempotency_key_delivered_and_answered(place: Place) {
    let store = place.open().await;
    let set_config = ServerMessage {
        seq: 0,
        body: Some(Down::SetConfig(SetConfig {
            namespace: "shop".into(),
            app: "web".into(),
            set: HashMap::from([("TOKEN".to_string(), "secret".to_string())]),
            unset: vec![],
        })),
    }
    .encode_to_vec();
    let queued = |key: Option<(&'static str, &'static str)>, body: &'static [u8]| Queued {
        cluster: "c",
        body,
        kind: "apply",
        object: "App/shop/web",
        idempotency: key,
    };
    let first = store.add_command("c", &set_config).await.unwrap();
    assert_eq!(first, 1);
    let keyed = store
        .add_command_once(&queued(Some(("k", "d1")), &b"two"[..]))
        .await
        .unwrap();
    assert_eq!(keyed, (2, false));
    assert_eq!(
        store
            .add_command_once(&queued(Some(("k", "d1")), &b"two"[..]))
            .await
            .unwrap(),
        (2, true),
        "the same key and request: the command of then"
    );
    let refused = store
        .add_command_once(&queued(Some(("k", "d2")), &b"other"[..]))
        .await;
    assert!(matches!(refused, Err(StoreError::Conflict(_))), "{refused:?}");
    assert_eq!(store.add_command("c", b"three").await.unwrap(), 3);
    let seqs =
        |rows: Vec<shapeblock_hub::store::CommandRow>| rows.into_iter().map(|c| c.seq).collect::<Vec<_>>();
    assert_eq!(seqs(store.pending_commands("c", 0, 32).await.unwrap()), [1, 2, 3]);
    assert_eq!(seqs(store.pending_commands("c", 1, 1).await.unwrap()), [2]);
    store.mark_delivered("c", 2).await.unwrap();
    let delivered: Vec<bool> = store
        .commands("c")
        .await
        .unwrap()
        .iter()
        .map(|c| c.delivered)
        .collect();
    assert_eq!(delivered, [true, true, false]);
    let (epoch, _) = store.begin_session("c", &Default::default()).await.unwrap();
    let answer = Write::Result {
        command_seq: 1,
        ok: true,
        message: "set".into(),
    };
    assert!(store.record("c", epoch, 1, &[answer]).await.unwrap());
    let done = store.command("c", 1).await.unwrap().unwrap();
    assert_eq!(
        (done.done, done.ok, done.message.as_deref()),
        (true, Some(true), Some("set"))
    );
    let kept = ServerMessage::decode(done.body.as_slice()).unwrap();
    let Some(Down::SetConfig(kept)) = kept.body else {
        panic!("{kept:?}")
    };
    assert_eq!(kept.set["TOKEN"], "", "a done set-config keeps the names only");
    assert_eq!(seqs(store.pending_commands("c", 0, 32).await.unwrap()), [2, 3]);
    assert!(store.command("c", 9).await.unwrap().is_none());
    // Which sessions to wake, for every cluster at once: only those with a command not done.
    store.add_command("d", b"one").await.unwrap();
    let (epoch_d, _) = store.begin_session("d", &Default::default()).await.unwrap();
    let wanted = ["c".to_string(), "d".into(), "none".into()];
    let mut pending = store.with_pending_commands(&wanted).await.unwrap();
    pending.sort();
    assert_eq!(pending, ["c", "d"]);
    let answer = Write::Result {
        command_seq: 1,
        ok: false,
        message: "no".into(),
    };
    assert!(store.record("d", epoch_d, 1, &[answer]).await.unwrap());
    assert_eq!(store.with_pending_commands(&wanted).await.unwrap(), ["c"]);
    let queued_events: Vec<(u64, String)> = store
        .feed_after(Some("c"), 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == feed::QUEUED)
        .map(|e| (e.command_seq, e.message))
        .collect();
    assert_eq!(
        queued_events,
        [(1, String::new()), (2, "apply".into()), (3, String::new())],
        "one queued event per command, none for a replay"
    );
}

async fn a_token_binds_one_key_and_only_an_unused_one_is_revoked(place: Place) {
    let store = place.open().await;
    store.add_token("h1", "alpha", 100).await.unwrap();
    store.add_token("h2", "beta", 200).await.unwrap();
    store.add_token("h3", "alpha", 300).await.unwrap();
    assert!(
        store.add_token("h1", "beta", 1).await.is_err(),
        "a hash is one token"
    );
    let row = store.token("h1").await.unwrap().unwrap();
    assert_eq!(
        (row.cluster.as_str(), row.expires_at, row.bound_key),
        ("alpha", 100, None)
    );
    assert!(store.bind_token("h1", "key-a", "PEM-A").await.unwrap());
    assert!(
        !store.bind_token("h1", "key-b", "PEM-B").await.unwrap(),
        "the first key won"
    );
    let bound = store.token("h1").await.unwrap().unwrap();
    assert_eq!(
        (bound.bound_key.as_deref(), bound.cert_pem.as_deref()),
        (Some("key-a"), Some("PEM-A"))
    );
    let hashes = |rows: Vec<(String, shapeblock_hub::store::TokenRow)>| {
        rows.into_iter().map(|(h, _)| h).collect::<Vec<_>>()
    };
    assert_eq!(hashes(store.tokens(None).await.unwrap()), ["h1", "h2", "h3"]);
    assert_eq!(hashes(store.tokens(Some("alpha")).await.unwrap()), ["h1", "h3"]);
    assert_eq!(store.revoke_token("h1").await.unwrap(), TokenRevoke::Used);
    assert_eq!(store.revoke_token("h2").await.unwrap(), TokenRevoke::Revoked);
    assert_eq!(store.revoke_token("h2").await.unwrap(), TokenRevoke::Unknown);
    assert!(store.token("h2").await.unwrap().is_none());
    // A token makes its cluster known.
    let clusters: Vec<String> = store
        .clusters()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(clusters, ["alpha", "beta"]);
}

async fn api_keys_are_listed_in_order_and_a_revoked_one_is_not_valid(place: Place) {
    let store = place.open().await;
    for (id, name) in [("k2", "second-made-first"), ("k1", "then")] {
        store.add_api_key(id, name, &format!("hash-{id}")).await.unwrap();
    }
    assert!(
        store.add_api_key("k3", "dup", "hash-k1").await.is_err(),
        "a hash is one key"
    );
    let ids: Vec<String> = store
        .api_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.id)
        .collect();
    assert_eq!(ids, ["k2", "k1"], "in the order made");
    assert_eq!(
        store.valid_api_key("hash-k1").await.unwrap().unwrap().name,
        "then"
    );
    let revoked = store.revoke_api_key("k1").await.unwrap().unwrap();
    let at = revoked.revoked_at.expect("revoked");
    assert!(store.valid_api_key("hash-k1").await.unwrap().is_none());
    let again = store.revoke_api_key("k1").await.unwrap().unwrap();
    assert_eq!(again.revoked_at, Some(at), "a second revocation changes nothing");
    assert!(store.revoke_api_key("nope").await.unwrap().is_none());
    assert!(store.valid_api_key("hash-k2").await.unwrap().is_some());
}

async fn a_revoked_cluster_refuses_its_certificates_until_it_enrolls_again(place: Place) {
    let store = place.open().await;
    store.add_token("t1", "c", i64::MAX).await.unwrap();
    store.add_certificate("s1", "c", 1000).await.unwrap();
    store.add_certificate("s1", "c", 1000).await.unwrap();
    assert!(store.certificate_allowed("c", "s1").await.unwrap());
    assert!(
        store
            .certificate_allowed("c", "from-before-records")
            .await
            .unwrap()
    );
    assert!(!store.revoke_cluster("unknown").await.unwrap());
    assert!(store.revoke_cluster("c").await.unwrap());
    assert!(!store.certificate_allowed("c", "s1").await.unwrap());
    assert!(
        !store
            .certificate_allowed("c", "from-before-records")
            .await
            .unwrap(),
        "a cluster once revoked accepts only certificates on record"
    );
    assert!(
        store.tokens(Some("c")).await.unwrap().is_empty(),
        "its tokens are gone"
    );
    assert!(store.cluster("c").await.unwrap().unwrap().revoked);
    assert_eq!(kinds(&store, "c").await, [feed::REVOKED]);
    // Enrolled again with a new token: a member, with its new certificate only.
    store.rejoined("c").await.unwrap();
    store.add_certificate("s2", "c", 2000).await.unwrap();
    assert!(!store.cluster("c").await.unwrap().unwrap().revoked);
    assert!(store.certificate_allowed("c", "s2").await.unwrap());
    assert!(!store.certificate_allowed("c", "s1").await.unwrap());
}

async fn a_session_keeps_what_the_agent_said_and_ends_only_its_own_epoch(place: Place) {
    let store = place.open().await;
    let (first, _) = store.begin_session("c", &hello("1.2.3")).await.unwrap();
    store.set_session_certificate("c", 4242).await.unwrap();
    // Seen in one batch with a cluster the store does not know (nothing is made of it).
    store
        .seen(&[("c".into(), Some(-250)), ("unknown".into(), Some(1))])
        .await
        .unwrap();
    assert!(store.cluster("unknown").await.unwrap().is_none());
    // Seen again without a heartbeat's measurement: the last skew stays.
    store.seen(&[("c".into(), None)]).await.unwrap();
    let row = store.cluster("c").await.unwrap().unwrap();
    assert_eq!(row.agent_version.as_deref(), Some("1.2.3"));
    assert_eq!(row.capabilities[0], "apply");
    assert_eq!(row.capabilities[1].len(), 64, "bounded");
    let inventory = row.inventory.clone().unwrap();
    assert_eq!(
        (inventory.node_count, inventory.kubernetes_version.as_str()),
        (3, "v1.35.0")
    );
    assert_eq!(
        (row.clock_skew_ms, row.cert_not_after, row.connected, row.epoch),
        (Some(-250), 4242, true, first)
    );
    assert!(row.last_seen > 0);
    store
        .set_inventory(
            "c",
            &Inventory {
                node_count: 5,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // A hello without an inventory keeps the last one.
    let (second, _) = store.begin_session("c", &Hello::default()).await.unwrap();
    assert_eq!(
        store
            .cluster("c")
            .await
            .unwrap()
            .unwrap()
            .inventory
            .unwrap()
            .node_count,
        5
    );
    store.end_session("c", first, &"late ".repeat(200)).await.unwrap();
    assert!(
        store.cluster("c").await.unwrap().unwrap().connected,
        "an older session's end"
    );
    store
        .end_session("c", second, "agent closed the stream")
        .await
        .unwrap();
    assert!(!store.cluster("c").await.unwrap().unwrap().connected);
    let downs: Vec<FeedEvent> = store
        .feed_after(Some("c"), 0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == feed::SESSION_DOWN)
        .collect();
    assert_eq!(downs.iter().map(|e| e.epoch).collect::<Vec<_>>(), [first, second]);
    assert_eq!(downs[0].message.len(), 512, "a reason is bounded");
    store.begin_session("d", &Hello::default()).await.unwrap();
    store.mark_disconnected_all().await.unwrap();
    assert!(store.clusters().await.unwrap().iter().all(|c| !c.connected));
}

async fn the_feed_is_in_commit_order_filtered_by_cluster_and_wakes_watchers(place: Place) {
    let store = place.open().await;
    assert_eq!(store.feed_end().await.unwrap(), 0, "an empty feed ends at 0");
    let mut tick = store.subscribe();
    tick.borrow_and_update();
    let (a, _) = store.begin_session("a", &Hello::default()).await.unwrap();
    assert!(tick.has_changed().unwrap(), "a commit wakes watchers");
    tick.borrow_and_update();
    store.begin_session("b", &Hello::default()).await.unwrap();
    let feed_write = Write::Feed(FeedEvent {
        cluster: "a".into(),
        kind: feed::PHASE.into(),
        epoch: a,
        object: "Project//p".into(),
        phase: "Ready".into(),
        reason: "Reconciled".into(),
        message: "ok".into(),
        ok: true,
        truncated: true,
        command_seq: 7,
        ..Default::default()
    });
    tick.borrow_and_update();
    assert!(
        !store
            .record("a", a + 1, 1, std::slice::from_ref(&feed_write))
            .await
            .unwrap()
    );
    assert!(!tick.has_changed().unwrap(), "nothing recorded, nobody woken");
    assert!(store.record("a", a, 1, &[feed_write]).await.unwrap());
    assert!(tick.has_changed().unwrap());
    let all = store.feed_after(None, 0, 100).await.unwrap();
    assert_eq!(
        all.iter()
            .map(|e| (e.cluster.as_str(), e.kind.as_str()))
            .collect::<Vec<_>>(),
        [
            ("a", feed::SESSION_UP),
            ("b", feed::SESSION_UP),
            ("a", feed::PHASE)
        ]
    );
    assert!(all.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(
        store.feed_end().await.unwrap(),
        all[2].id,
        "the end is the last entry"
    );
    assert!(store.feed_after(None, all[2].id, 100).await.unwrap().is_empty());
    let phase = &all[2];
    assert_eq!(
        (
            phase.object.as_str(),
            phase.phase.as_str(),
            phase.reason.as_str(),
            phase.message.as_str(),
            phase.ok,
            phase.truncated,
            phase.command_seq,
            phase.epoch
        ),
        ("Project//p", "Ready", "Reconciled", "ok", true, true, 7, a)
    );
    assert!(phase.at_ms > 0);
    let after_first = store.feed_after(None, all[0].id, 1).await.unwrap();
    assert_eq!(after_first, [all[1].clone()], "from a cursor, at most the limit");
    let only_a = store.feed_after(Some("a"), 0, 100).await.unwrap();
    assert_eq!(only_a, [all[0].clone(), all[2].clone()]);
    assert!(
        store.feed_after(None, u64::MAX, 100).await.unwrap().is_empty(),
        "a cursor past everything"
    );
}

/// Writers at the same time, as sessions and API calls are: every feed id is taken once and in
/// commit order (a reader that saw id n has seen every id below it), and command seqs per
/// cluster are 1..n with no repeat.
async fn concurrent_writers_number_the_feed_without_holes_and_commands_without_repeats(place: Place) {
    let store = std::sync::Arc::new(place.open().await);
    const CLUSTERS: usize = 4;
    const EACH: usize = 25;
    let mut writers = Vec::new();
    for c in 0..CLUSTERS {
        for w in 0..2 {
            let store = store.clone();
            writers.push(tokio::spawn(async move {
                let cluster = format!("c{c}");
                for i in 0..EACH {
                    let body = format!("{w}-{i}");
                    store.add_command(&cluster, body.as_bytes()).await.unwrap();
                }
            }));
        }
    }
    // A reader during the writes: what it sees grows without holes.
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut seen = 0u64;
            let mut ids = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while ids.len() < CLUSTERS * 2 * EACH && tokio::time::Instant::now() < deadline {
                for e in store.feed_after(None, seen, 64).await.unwrap() {
                    ids.push(e.id);
                    seen = e.id;
                }
                tokio::task::yield_now().await;
            }
            ids
        })
    };
    for writer in writers {
        writer.await.unwrap();
    }
    let ids = reader.await.unwrap();
    assert_eq!(ids.len(), CLUSTERS * 2 * EACH);
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "a reader during the writes saw every id, in order"
    );
    for c in 0..CLUSTERS {
        let seqs: Vec<u64> = store
            .commands(&format!("c{c}"))
            .await
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(seqs, (1..=(2 * EACH) as u64).collect::<Vec<_>>());
    }
}

async fn stores_opened_together_on_one_database_migrate_once(place: Place) {
    // Replicas starting at the same time (SQLite: a hub and its CLI on one file).
    let opened = futures::future::join_all((0..4).map(|_| place.open())).await;
    let mut ids = Vec::new();
    for store in &opened {
        ids.push(store.id().await.unwrap());
    }
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");
    opened[0].add_token("h", "c", 1).await.unwrap();
    assert!(
        opened[3].token("h").await.unwrap().is_some(),
        "one store, seen by all"
    );
}

/// An old session writing as fast as it can while a new session begins: whatever the old one
/// recorded is before the new session's starting point (its `last_agent_seq`), and once the
/// new one began nothing of the old one is recorded.
async fn a_new_session_fences_the_old_one_even_mid_write(place: Place) {
    let store = std::sync::Arc::new(place.open().await);
    for trial in 0..10u64 {
        let cluster = format!("f{trial}");
        let (old, _) = store.begin_session(&cluster, &Hello::default()).await.unwrap();
        let writer = {
            let (store, cluster) = (store.clone(), cluster.clone());
            tokio::spawn(async move {
                let mut recorded = Vec::new();
                for seq in 1..=100_000u64 {
                    let writes = [event("phase", "Project//p", &seq.to_string())];
                    if !store.record(&cluster, old, seq, &writes).await.unwrap() {
                        break;
                    }
                    recorded.push(seq);
                }
                recorded
            })
        };
        tokio::time::sleep(Duration::from_millis(5 + trial * 3)).await;
        let (new, last) = store.begin_session(&cluster, &Hello::default()).await.unwrap();
        assert_eq!(new, old + 1);
        let recorded = writer.await.unwrap();
        assert!(
            !recorded.is_empty() && recorded.len() < 100_000,
            "the race happened"
        );
        assert_eq!(
            recorded.last().copied(),
            Some(last),
            "trial {trial}: nothing after the new session began"
        );
        assert_eq!(store.events(&cluster).await.unwrap().len() as u64, last);
    }
}

/// Set in the child process of the test below.
const CHILD_VAR: &str = "SHAPEBLOCK_TEST_POSTGRES_CHILD";

/// Whether a process runs (exists and is not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| Some(stat.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

/// The children of `parent` (Postgres' children each make their own session, so they are not
/// in the server's process group).
fn children_of(parent: u32) -> Vec<u32> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command (in parentheses, may hold spaces): state, ppid.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if fields.get(1) == Some(&parent.to_string().as_str()) {
            members.push(pid);
        }
    }
    members
}

/// The harness's promise: a test process that is killed (SIGKILL, nothing runs after it)
/// leaves no Postgres behind, neither the server nor what it forked.
#[test]
fn a_postgres_started_by_a_killed_process_does_not_outlive_it() {
    use std::io::{BufRead, Write as _};
    const NAME: &str = "a_postgres_started_by_a_killed_process_does_not_outlive_it";
    if std::env::var_os(CHILD_VAR).is_some() {
        let postgres = Postgres::start().unwrap();
        println!("postgres-pid {} {}", postgres.pid(), postgres.port());
        std::io::stdout().flush().unwrap();
        std::thread::sleep(Duration::from_secs(300));
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(CHILD_VAR, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (pid, port) = stdout
        .lines()
        .map_while(Result::ok)
        .find_map(|line| {
            // On the line libtest began with the test's name.
            let (_, said) = line.split_once("postgres-pid ")?;
            let mut words = said.split(' ');
            Some((
                words.next()?.parse::<u32>().ok()?,
                words.next()?.parse::<u16>().ok()?,
            ))
        })
        .expect("the child started a Postgres");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "the server listens"
    );
    let mut processes = children_of(pid);
    assert!(
        !processes.is_empty(),
        "the server's helpers (checkpointer, writers, …)"
    );
    processes.push(pid);
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while processes.iter().any(|p| running(*p)) {
        let left: Vec<u32> = processes.iter().copied().filter(|p| running(*p)).collect();
        assert!(
            std::time::Instant::now() < deadline,
            "still running 20 s after their test process was killed: {left:?} of {processes:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on its port"
    );
}

/// Postgres only: the migrations are recorded, a second start applies none, and a schema made
/// by a newer hub is refused rather than used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_schema_is_versioned_and_one_newer_than_the_hub_is_refused() {
    let (server, url) = tokio::task::spawn_blocking(|| {
        let server = Postgres::shared().unwrap();
        (server, server.database("hub_store").unwrap())
    })
    .await
    .unwrap();
    let location = Location::Postgres {
        url: url.clone(),
        pool_size: 2,
    };
    let id = Store::open(&location).await.unwrap().id().await.unwrap();
    let versions = |server: &shapeblock_testenv::postgres::SharedPostgres| {
        server
            .psql(&url, "SELECT version FROM schema_migrations ORDER BY version")
            .unwrap()
    };
    assert_eq!(versions(server), "1\n2\n3\n4\n5");
    assert_eq!(Store::open(&location).await.unwrap().id().await.unwrap(), id);
    assert_eq!(versions(server), "1\n2\n3\n4\n5", "nothing applied twice");
    server
        .psql(
            &url,
            "INSERT INTO schema_migrations (version, applied_at) VALUES (99, 0)",
        )
        .unwrap();
    let refused = Store::open(&location)
        .await
        .err()
        .expect("a newer schema is refused");
    assert!(
        refused.to_string().contains("version 99, made by a newer hub"),
        "{refused}"
    );
    assert!(matches!(refused, StoreError::Config(_)));
}

/// Two stores on one database, each registered as a replica: what two hub processes are.
async fn two_replicas() -> (
    Store,
    Store,
    String,
    &'static shapeblock_testenv::postgres::SharedPostgres,
) {
    let (server, url) = tokio::task::spawn_blocking(|| {
        let server = Postgres::shared().unwrap();
        (server, server.database("hub_replicas").unwrap())
    })
    .await
    .unwrap();
    let location = Location::Postgres {
        url: url.clone(),
        pool_size: 4,
    };
    let a = Store::open(&location).await.unwrap();
    let b = Store::open(&location).await.unwrap();
    a.register_replica("replica-a", "a:1").await.unwrap();
    b.register_replica("replica-b", "b:1").await.unwrap();
    (a, b, url, server)
}

/// Postgres only: a session of another replica fences this one's in the transaction that
/// would record (refused as fenced, not taken for a resend, so it is never acked), and a
/// replica that stopped heartbeating has only its own clusters handed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_fence_each_other_in_the_database_and_only_a_dead_ones_clusters_are_handed_on() {
    let (a, b, url, server) = two_replicas().await;
    let phase = |detail: &str| [event("phase", "Project//p", detail)];
    let (old, _) = a.begin_session("c1", &Hello::default()).await.unwrap();
    assert!(a.record("c1", old, 1, &phase("a1")).await.unwrap());
    assert_eq!(
        a.session_replica("c1").await.unwrap().as_deref(),
        Some("replica-a")
    );
    // The agent reconnects to B: A's session is fenced, a resend on B is a duplicate.
    let (new, last) = b.begin_session("c1", &Hello::default()).await.unwrap();
    assert_eq!((new, last), (old + 1, 1));
    assert_eq!(
        a.session_replica("c1").await.unwrap().as_deref(),
        Some("replica-b")
    );
    assert_eq!(
        a.record_outcome("c1", old, 2, &phase("stale")).await.unwrap(),
        Recorded::Fenced
    );
    assert_eq!(
        b.record_outcome("c1", new, 1, &phase("a1")).await.unwrap(),
        Recorded::Duplicate
    );
    assert_eq!(
        b.record_outcome("c1", new, 2, &phase("b2")).await.unwrap(),
        Recorded::New
    );
    let details: Vec<String> = a.events("c1").await.unwrap().into_iter().map(|e| e.3).collect();
    assert_eq!(details, ["a1", "b2"]);
    assert_eq!(
        a.session_epochs(&["c1".into(), "unknown".into()]).await.unwrap(),
        [("c1".to_string(), new, false)]
    );

    // A holds c3, B holds c2; A stops heartbeating.
    let (c3, _) = a.begin_session("c3", &Hello::default()).await.unwrap();
    let (c2, _) = b.begin_session("c2", &Hello::default()).await.unwrap();
    assert!(a.replica_heartbeat("replica-a").await.unwrap());
    assert!(
        b.hand_on_dead_replicas("replica-b", Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty(),
        "nobody is dead yet"
    );
    server
        .psql(
            &url,
            "UPDATE replicas SET heartbeat_at = heartbeat_at - 120000 WHERE id = 'replica-a'",
        )
        .unwrap();
    let feed_before = b.feed_after(None, 0, 10_000).await.unwrap().last().unwrap().id;
    let handed = b
        .hand_on_dead_replicas("replica-b", Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        handed,
        [("c3".to_string(), c3 + 1)],
        "only the dead replica's cluster"
    );
    assert!(!b.cluster("c3").await.unwrap().unwrap().connected);
    assert!(b.cluster("c2").await.unwrap().unwrap().connected);
    assert_eq!(b.cluster("c2").await.unwrap().unwrap().epoch, c2);
    assert!(b.cluster("c1").await.unwrap().unwrap().connected);
    let downs: Vec<(String, String)> = b
        .feed_after(None, feed_before, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.cluster, e.kind))
        .collect();
    assert_eq!(downs, [("c3".to_string(), feed::SESSION_DOWN.to_string())]);
    // Again: nothing more to hand on.
    assert!(
        b.hand_on_dead_replicas("replica-b", Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    // A wakes up: its row is gone, and what it still writes for c3 is refused.
    assert!(!a.replica_heartbeat("replica-a").await.unwrap());
    assert_eq!(
        a.record_outcome("c3", c3, 1, &phase("late")).await.unwrap(),
        Recorded::Fenced
    );
    let replicas: Vec<String> = b.replicas().await.unwrap().into_iter().map(|r| r.0).collect();
    assert_eq!(replicas, ["replica-b"]);
}

/// Postgres only: a replica's heartbeat does not wait for the pool. With every pooled
/// connection waiting its turn on the feed (10,000 agents sending at once), a heartbeat on
/// the pool missed its deadline and the other replicas declared a healthy replica dead and
/// handed on all its clusters (`benches/hub_scale.rs`); it has a connection of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_heartbeat_is_answered_while_every_pooled_connection_waits_on_the_feed() {
    let (server, url) = tokio::task::spawn_blocking(|| {
        let server = Postgres::shared().unwrap();
        (server, server.database("hub_busy").unwrap())
    })
    .await
    .unwrap();
    let store = Store::open(&Location::Postgres {
        url: url.clone(),
        pool_size: 1,
    })
    .await
    .unwrap();
    store.register_replica("busy", "a:1").await.unwrap();
    let (epoch, _) = store.begin_session("c", &Hello::default()).await.unwrap();
    // Another connection holds the feed's lock for 4 s (FEED_LOCK in store/postgres.rs)...
    let holder = std::thread::spawn(move || {
        server
            .psql(
                &url,
                "BEGIN; SELECT pg_advisory_xact_lock(5999437101915963394); SELECT pg_sleep(4); COMMIT;",
            )
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ... so a write with a feed entry holds the pool's only connection, waiting.
    let store = std::sync::Arc::new(store);
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let phase = [Write::Feed(FeedEvent {
                cluster: "c".into(),
                kind: feed::PHASE.into(),
                ..Default::default()
            })];
            store.record("c", epoch, 1, &phase).await.unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    assert!(store.replica_heartbeat("busy").await.unwrap());
    assert!(
        store
            .hand_on_dead_replicas("busy", Duration::from_secs(60))
            .await
            .unwrap()
            .is_empty()
    );
    let took = started.elapsed();
    assert!(!writer.is_finished(), "the write still waits on the feed");
    assert!(
        took < Duration::from_secs(2),
        "the heartbeat waited for the pool: {took:?}"
    );
    assert!(writer.await.unwrap(), "then the write is recorded");
    holder.join().unwrap();
}

/// Postgres only: what one replica commits reaches another's LISTEN connection, ids only,
/// once it is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicas_listen_connection_hears_sessions_commands_the_feed_and_revocations() {
    let (a, b, _, _) = two_replicas().await;
    let (notices, mut heard) = tokio::sync::mpsc::channel(64);
    let (up, mut listening) = tokio::sync::watch::channel(false);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let listener = tokio::spawn(shapeblock_hub::store::notify::listen(
        b.listen_config().unwrap(),
        notices,
        up,
        stopping,
        Duration::from_secs(1),
    ));
    listening.wait_for(|up| *up).await.unwrap();
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(5), heard.recv())
            .await
            .expect("a notice")
            .unwrap()
    };
    assert_eq!(next().await, Notice::Resync);
    let (epoch, _) = a.begin_session("n1", &Hello::default()).await.unwrap();
    assert_eq!(
        next().await,
        Notice::Session {
            cluster: "n1".into(),
            epoch
        }
    );
    assert!(matches!(next().await, Notice::Feed { .. }), "session-up");
    let seq = a.add_command("n1", b"x").await.unwrap();
    assert_eq!(seq, 1);
    assert_eq!(next().await, Notice::Command { cluster: "n1".into() });
    let Notice::Feed { id } = next().await else {
        panic!("queued")
    };
    assert_eq!(b.feed_after(None, id - 1, 1).await.unwrap()[0].kind, feed::QUEUED);
    assert!(a.revoke_cluster("n1").await.unwrap());
    assert_eq!(next().await, Notice::Revoked { cluster: "n1".into() });
    let Notice::Feed { id: revoked } = next().await else {
        panic!("revoked")
    };
    assert!(revoked > id);
    // Nothing else was heard (a refused write notifies nothing).
    assert!(
        !a.record("n1", epoch + 5, 1, &[event("phase", "x", "y")])
            .await
            .unwrap()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), heard.recv())
            .await
            .is_err(),
        "no notice for what was not committed"
    );
    stop.send(true).unwrap();
    listener.await.unwrap();
}

/// TLS to the database, by libpq's words in the URL, against a Postgres that refuses every
/// connection without TLS: the pool's and the LISTEN connection's are encrypted; `verify-full`
/// checks the chain and the name, `verify-ca` the chain only, and a refusal says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_speaks_tls_to_postgres_as_its_url_says_and_checks_the_server_it_is_told_to() {
    use shapeblock_testenv::CertificateAuthority;
    let ca = CertificateAuthority::new("hub database CA").unwrap();
    let serving = ca
        .serving_cert("postgres", &["db.test"], &[std::net::Ipv4Addr::LOCALHOST.into()])
        .unwrap();
    // Started on this (the test's) thread: the server lives as long as it does.
    let postgres = tokio::task::block_in_place(|| Postgres::start_tls(&serving)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert_pem()).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(
        &other_ca,
        CertificateAuthority::new("another CA").unwrap().cert_pem(),
    )
    .unwrap();
    let port = postgres.port();
    let url = |host: &str, query: String| format!("postgres://postgres@{host}:{port}/postgres?{query}");
    let open = async |url: String| Store::open(&Location::Postgres { url, pool_size: 2 }).await;
    // Plain is refused by the server, and the error says so in the server's words.
    let refused = open(url("127.0.0.1", "sslmode=disable".into()))
        .await
        .err()
        .unwrap();
    assert!(refused.to_string().contains("no encryption"), "{refused}");
    // The right CA and the name in the certificate.
    let store = open(url(
        "127.0.0.1",
        format!(
            "sslmode=verify-full&sslrootcert={}&application_name=hub-tls",
            ca_file.display()
        ),
    ))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    store.add_command("c", b"x").await.unwrap();
    let encrypted = |name: &str| {
        postgres
            .psql(
                &postgres.url(),
                &format!(
                    "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name = '{name}'"
                ),
            )
            .unwrap()
    };
    let pooled = encrypted("hub-tls");
    assert!(pooled.ends_with("|t") && !pooled.starts_with("0|"), "{pooled}");
    // The LISTEN connection dials the same way.
    let (notices, _heard) = tokio::sync::mpsc::channel(16);
    let (up, mut listening) = tokio::sync::watch::channel(false);
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let listener = tokio::spawn(shapeblock_hub::store::notify::listen(
        store.listen_config().unwrap(),
        notices,
        up,
        stopping,
        Duration::from_secs(1),
    ));
    tokio::time::timeout(Duration::from_secs(10), listening.wait_for(|up| *up))
        .await
        .expect("listening over TLS")
        .unwrap();
    assert_eq!(encrypted("shapeblock-hub-listen"), "1|t");
    stop.send(true).unwrap();
    listener.await.unwrap();
    // A name the certificate does not hold: verify-full refuses, verify-ca does not look.
    let misnamed = open(url(
        "localhost",
        format!("sslmode=verify-full&sslrootcert={}", ca_file.display()),
    ))
    .await
    .err()
    .unwrap();
    assert!(misnamed.to_string().contains("TLS handshake"), "{misnamed}");
    assert!(misnamed.to_string().to_lowercase().contains("name"), "{misnamed}");
    open(url(
        "localhost",
        format!("sslmode=verify-ca&sslrootcert={}", ca_file.display()),
    ))
    .await
    .unwrap_or_else(|e| panic!("{e}"));
    // Another CA: refused, whichever verifying mode.
    for mode in ["verify-ca", "verify-full", "require"] {
        let unknown = open(url(
            "127.0.0.1",
            format!("sslmode={mode}&sslrootcert={}", other_ca.display()),
        ))
        .await
        .err()
        .unwrap_or_else(|| panic!("{mode} trusted another CA's server"));
        assert!(unknown.to_string().contains("UnknownIssuer"), "{mode}: {unknown}");
    }
    // libpq's require without a root: encrypted, unchecked.
    open(url("127.0.0.1", "sslmode=require".into()))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    // A password role over SCRAM with channel binding required: the binding is the server
    // certificate's hash as this connection saw it, so a man in the middle could not relay
    // it. The CA given apart, as --database-ca does (verify-full by default).
    postgres
        .psql(
            &postgres.url(),
            "CREATE ROLE scram LOGIN SUPERUSER PASSWORD 'pw-scram'",
        )
        .unwrap();
    let scram = |binding: &str| {
        shapeblock_hub::store::tls::with_root_cert(
            &format!("postgres://scram:pw-scram@127.0.0.1:{port}/postgres?channel_binding={binding}"),
            &ca_file,
        )
        .unwrap()
    };
    let bound = open(scram("require")).await.unwrap_or_else(|e| panic!("{e}"));
    bound.add_command("c", b"y").await.unwrap();
    let wrong = open(
        shapeblock_hub::store::tls::with_root_cert(
            &format!("postgres://scram:wrong@127.0.0.1:{port}/postgres"),
            &ca_file,
        )
        .unwrap(),
    )
    .await
    .err()
    .unwrap();
    assert!(
        wrong.to_string().contains("password authentication failed"),
        "{wrong}"
    );
    assert!(
        !wrong.to_string().contains("wrong"),
        "the password in an error: {wrong}"
    );
}
