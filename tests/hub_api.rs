//! The hub's server-facing API (`shapeblock.hub.v1`) with real parts: the `shapeblock-hub`
//! binary serving it over TLS with its CA, API keys made by its CLI, a client that knows only
//! the proto, and (where a test says so) the real `shapeblock-agent` binary on the test
//! cluster, enrolled with the install line the API printed.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use rustls::pki_types::pem::PemObject;
use shapeblock_hub::api::v1::hub_client::HubClient;
use shapeblock_hub::api::v1::{self as api, CommandState, EventKind};
use shapeblock_testenv::stand_in::StandIn;
use support::agent::{AGENT_NS, Env, hub_env};
use support::hub_process::{Bearer, Client, HubProcess, agent_from_install_line, wait_phase_at_hub};
use support::{eventually, unique_name};
use tonic::{Code, Status};

const TIMEOUT: Duration = Duration::from_secs(45);

fn project(name: &str) -> String {
    support::hub::project(name)
}

/// A cluster the hub knows (it has a token), with no agent.
async fn cluster_with_token(client: &mut Client) -> (String, api::CreateEnrollmentTokenResponse) {
    let cluster = unique_name("c");
    let token = client
        .create_enrollment_token(api::CreateEnrollmentTokenRequest {
            cluster_id: cluster.clone(),
            ttl_seconds: 300,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (cluster, token)
}

async fn apply(
    client: &mut Client,
    cluster: &str,
    manifest: &str,
    key: &str,
) -> Result<api::CommandAccepted, Status> {
    client
        .apply(api::ApplyRequest {
            cluster_id: cluster.into(),
            manifest: manifest.into(),
            idempotency_key: key.into(),
        })
        .await
        .map(|r| r.into_inner())
}

/// Every event after `after` the hub has now (read until the stream is quiet for 300 ms).
async fn events(client: &mut Client, cluster: &str, after: u64) -> Vec<api::Event> {
    let mut stream = client
        .watch_events(api::WatchEventsRequest {
            cluster_id: cluster.into(),
            after_id: after,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Ok(next) = tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
        match next.unwrap() {
            Some(event) => out.push(event),
            None => break,
        }
    }
    out
}

fn queued(events: &[api::Event]) -> usize {
    events
        .iter()
        .filter(|e| e.kind() == EventKind::CommandQueued)
        .count()
}

fn assert_refused(result: Result<impl std::fmt::Debug, Status>, code: Code, words: &str) {
    let status = result.expect_err("refused");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(words),
        "{:?} lacks {words:?}",
        status.message()
    );
}

// ---- bad input: a clear error, nothing changed ----

/// The calls a caller without a valid key tries: a token, a command, a revocation, a key.
async fn try_everything(client: &mut Client, cluster: &str) -> Vec<Status> {
    let mut refused = Vec::new();
    let token = client
        .create_enrollment_token(api::CreateEnrollmentTokenRequest {
            cluster_id: unique_name("intruder"),
            ..Default::default()
        })
        .await;
    refused.push(token.expect_err("token refused"));
    refused.push(
        apply(client, cluster, &project("intruder"), "")
            .await
            .expect_err("apply refused"),
    );
    let revoke = client
        .revoke_cluster(api::RevokeClusterRequest {
            cluster_id: cluster.into(),
        })
        .await;
    refused.push(revoke.expect_err("revoke refused"));
    let key = client
        .create_api_key(api::CreateApiKeyRequest { name: "mine".into() })
        .await;
    refused.push(key.expect_err("key refused"));
    let watch = client.watch_events(api::WatchEventsRequest::default()).await;
    refused.push(watch.map(drop).expect_err("watch refused"));
    refused
}

/// Nothing of what [`try_everything`] tried happened.
async fn nothing_changed(client: &mut Client, cluster: &str, tokens_before: usize) {
    let tokens = client
        .list_enrollment_tokens(api::ListEnrollmentTokensRequest::default())
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert_eq!(tokens.len(), tokens_before, "{tokens:?}");
    let c = client
        .get_cluster(api::GetClusterRequest {
            cluster_id: cluster.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!c.revoked);
    assert_eq!(queued(&events(client, "", 0).await), 0);
    let keys = client
        .list_api_keys(api::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert!(keys.iter().all(|k| k.name != "mine"), "{keys:?}");
}

#[tokio::test]
async fn a_call_without_an_api_key_is_unauthenticated_and_changes_nothing() {
    let hub = HubProcess::start(&[]).await;
    let mut admin = hub.client().await;
    let (cluster, _) = cluster_with_token(&mut admin).await;
    let mut anonymous = hub.client_with(None).await;
    for status in try_everything(&mut anonymous, &cluster).await {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(status.message().contains("API key is required"), "{status:?}");
    }
    nothing_changed(&mut admin, &cluster, 1).await;
}

#[tokio::test]
async fn a_wrong_api_key_is_unauthenticated_and_changes_nothing() {
    let hub = HubProcess::start(&[]).await;
    let mut admin = hub.client().await;
    let (cluster, _) = cluster_with_token(&mut admin).await;
    // The right shape, one character off; and not a key at all.
    let mut off = hub.key.clone();
    let last = if off.ends_with('0') { "1" } else { "0" };
    off.replace_range(off.len() - 1.., last);
    for key in [off.as_str(), "hunter2"] {
        let mut wrong = hub.client_with(Some(key)).await;
        for status in try_everything(&mut wrong, &cluster).await {
            assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
            assert!(
                status.message().contains("unknown or revoked API key"),
                "{status:?}"
            );
        }
    }
    nothing_changed(&mut admin, &cluster, 1).await;
}

#[tokio::test]
async fn a_revoked_api_key_is_unauthenticated_and_changes_nothing() {
    let hub = HubProcess::start(&[]).await;
    let mut admin = hub.client().await;
    let (cluster, _) = cluster_with_token(&mut admin).await;
    // A second key, made through the API, works until it is revoked.
    let made = admin
        .create_api_key(api::CreateApiKeyRequest { name: "ci".into() })
        .await
        .unwrap()
        .into_inner();
    let mut second = hub.client_with(Some(&made.secret)).await;
    let listed = second
        .list_api_keys(api::ListApiKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(
        listed.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["test", "ci"]
    );
    assert!(
        !format!("{listed:?}").contains(&made.secret[4..]),
        "a listing never shows a key"
    );
    let id = made.key.unwrap().id;
    let revoked = admin
        .revoke_api_key(api::RevokeApiKeyRequest { id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.key.unwrap().revoked_at > 0);
    for status in try_everything(&mut second, &cluster).await {
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
        assert!(
            status.message().contains("unknown or revoked API key"),
            "{status:?}"
        );
    }
    nothing_changed(&mut admin, &cluster, 1).await;
    assert_refused(
        admin
            .revoke_api_key(api::RevokeApiKeyRequest { id: "nope".into() })
            .await,
        Code::NotFound,
        "no API key",
    );
}

#[tokio::test]
async fn a_manifest_that_is_not_yaml_is_invalid_argument_and_nothing_is_queued() {
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, _) = cluster_with_token(&mut client).await;
    assert_refused(
        apply(&mut client, &cluster, "kind: [Project\nmetadata: {name: x", "").await,
        Code::InvalidArgument,
        "invalid manifest",
    );
    assert_refused(
        apply(&mut client, &cluster, "just words", "").await,
        Code::InvalidArgument,
        "manifest has no kind",
    );
    assert_eq!(queued(&events(&mut client, "", 0).await), 0);
}

#[tokio::test]
async fn a_manifest_of_a_kind_that_is_not_shapeblocks_is_invalid_argument_and_nothing_is_queued() {
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, _) = cluster_with_token(&mut client).await;
    let config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  namespace: default\n";
    let status = apply(&mut client, &cluster, config_map, "").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("ConfigMap"), "{status:?}");
    // In a sync too, with the manifest's place in the list.
    let sync = client
        .sync(api::SyncRequest {
            cluster_id: cluster.clone(),
            manifests: vec![project("fine"), config_map.into()],
            ..Default::default()
        })
        .await;
    assert_refused(sync, Code::InvalidArgument, "manifest 2");
    assert_eq!(queued(&events(&mut client, "", 0).await), 0);
}

#[tokio::test]
async fn a_manifest_too_large_is_invalid_argument_and_nothing_is_queued() {
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, _) = cluster_with_token(&mut client).await;
    let huge = format!("{}  description: {}\n", project("big"), "x".repeat(3 << 20));
    assert_refused(
        apply(&mut client, &cluster, &huge, "").await,
        Code::InvalidArgument,
        "the limit is",
    );
    assert_eq!(queued(&events(&mut client, "", 0).await), 0);
}

#[tokio::test]
async fn an_unknown_cluster_is_not_found() {
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let nobody = unique_name("nobody");
    assert_refused(
        apply(&mut client, &nobody, &project("p"), "").await,
        Code::NotFound,
        &nobody,
    );
    let id = || nobody.clone();
    assert_refused(
        client
            .get_cluster(api::GetClusterRequest { cluster_id: id() })
            .await,
        Code::NotFound,
        "no cluster",
    );
    assert_refused(
        client
            .revoke_cluster(api::RevokeClusterRequest { cluster_id: id() })
            .await,
        Code::NotFound,
        "no cluster",
    );
    assert_refused(
        client
            .get_command(api::GetCommandRequest {
                cluster_id: id(),
                command_id: 1,
            })
            .await,
        Code::NotFound,
        "no cluster",
    );
    assert_refused(
        client
            .list_objects(api::ListObjectsRequest { cluster_id: id() })
            .await,
        Code::NotFound,
        "no cluster",
    );
    let watch = client
        .watch_events(api::WatchEventsRequest {
            cluster_id: id(),
            after_id: 0,
        })
        .await;
    assert_refused(watch.map(drop), Code::NotFound, "no cluster");
    assert_refused(
        client
            .cancel_build(api::CancelBuildRequest {
                cluster_id: id(),
                namespace: "shop".into(),
                build: "web-1".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "no cluster",
    );
    assert!(
        client
            .list_clusters(api::ListClustersRequest {})
            .await
            .unwrap()
            .into_inner()
            .clusters
            .is_empty(),
        "nothing made on the way"
    );
}

// ---- events ----

#[tokio::test]
async fn watch_events_resume_from_a_cursor_with_no_gap_and_no_duplicate() {
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (a, _) = cluster_with_token(&mut client).await;
    let (b, _) = cluster_with_token(&mut client).await;
    for i in 0..40 {
        let cluster = if i % 4 == 0 { &b } else { &a };
        apply(&mut client, cluster, &project(&format!("p{i}")), "")
            .await
            .unwrap();
    }
    // Read 15, then go away mid-stream.
    let mut stream = client
        .watch_events(api::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while got.len() < 15 {
        got.push(stream.message().await.unwrap().unwrap());
    }
    drop(stream);
    // Resume from the cursor while more is recorded.
    let cursor = got.last().unwrap().id;
    let mut resumed = hub.client().await;
    let mut stream = resumed
        .watch_events(api::WatchEventsRequest {
            cluster_id: String::new(),
            after_id: cursor,
        })
        .await
        .unwrap()
        .into_inner();
    let writer = {
        let mut client = hub.client().await;
        let a = a.clone();
        tokio::spawn(async move {
            for i in 40..80 {
                apply(&mut client, &a, &project(&format!("p{i}")), "")
                    .await
                    .unwrap();
            }
        })
    };
    while got.len() < 80 {
        let event = tokio::time::timeout(TIMEOUT, stream.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .unwrap();
        got.push(event);
    }
    writer.await.unwrap();
    let ids: Vec<u64> = got.iter().map(|e| e.id).collect();
    assert_eq!(ids, (1..=80).collect::<Vec<u64>>(), "no gap, no duplicate");
    assert!(got.iter().all(|e| e.kind() == EventKind::CommandQueued));
    assert_eq!(got[1].object, "Project//p1");
    // One cluster's: only its events, in order, resumable the same way.
    let only_b = events(&mut client, &b, 0).await;
    assert_eq!(only_b.len(), 10);
    assert!(only_b.iter().all(|e| e.cluster_id == b));
    assert!(only_b.windows(2).all(|w| w[0].id < w[1].id));
    let after = events(&mut client, &b, only_b[4].id).await;
    assert_eq!(after, only_b[5..]);
}

#[tokio::test]
async fn a_slow_watcher_is_cut_with_resource_exhausted_and_resumes_from_its_cursor() {
    let hub = HubProcess::start(&["--watch-buffer", "8", "--watch-stall-ms", "1000"]).await;
    let mut client = hub.client().await;
    let (cluster, _) = cluster_with_token(&mut client).await;
    // A watcher that reads nothing: a small window, so the hub's buffers fill soon.
    let channel = hub
        .channel(|e| {
            e.initial_stream_window_size(1024)
                .initial_connection_window_size(65535)
        })
        .await;
    let mut slow = HubClient::with_interceptor(channel, Bearer(Some(hub.key.clone())));
    let mut stream = slow
        .watch_events(api::WatchEventsRequest {
            cluster_id: cluster.clone(),
            after_id: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // Written until the hub has cut the watcher: how many events HTTP/2 buffers on both
    // sides depends on their size and the server's send buffer, not on this test, so a fixed
    // count can fit entirely in the buffers and never stall anyone (as it did on a faster CI).
    const MOST: u64 = 100_000;
    let long = "x".repeat(50);
    let started = Instant::now();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let written = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let hub_client = hub.client();
            let (cluster, long) = (cluster.clone(), long.clone());
            let (next, written, cut) = (next.clone(), written.clone(), cut.clone());
            async move {
                use std::sync::atomic::Ordering::SeqCst;
                let mut client = hub_client.await;
                while !cut.load(SeqCst) {
                    let i = next.fetch_add(1, SeqCst);
                    if i >= MOST {
                        break;
                    }
                    apply(&mut client, &cluster, &project(&format!("{long}-{i}")), "")
                        .await
                        .unwrap();
                    written.fetch_add(1, SeqCst);
                }
            }
        })
        .collect();
    let watch_for_the_cut = async {
        use std::sync::atomic::Ordering::SeqCst;
        while !hub.log().contains("slow watcher cut") && next.load(SeqCst) < MOST {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A few more after the cut: what the resumed watch must bring too.
        tokio::time::sleep(Duration::from_millis(200)).await;
        cut.store(true, SeqCst);
    };
    tokio::join!(futures::future::join_all(writers), watch_for_the_cut);
    let total = written.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        hub.log().contains("slow watcher cut"),
        "no cut after {total} events"
    );
    eprintln!("{total} events recorded in {:?}", started.elapsed());
    let rss_after_writes = rss_kib(hub.child.id());
    // Now read: every event up to the cut, in order, then the status.
    let mut got: Vec<u64> = Vec::new();
    let status = loop {
        match tokio::time::timeout(TIMEOUT, stream.message())
            .await
            .expect("the stream ends")
        {
            Ok(Some(event)) => got.push(event.id),
            Ok(None) => panic!("ended without a status after {} events", got.len()),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("watch again with after_id"),
        "{status:?}"
    );
    let cut_at = *got.last().expect("some events before the cut");
    assert!(cut_at < total, "cut before the end ({cut_at})");
    assert!(
        started.elapsed() > Duration::from_secs(1),
        "the writes outlast the stall allowed"
    );
    assert!(
        status.message().contains(&format!("({cut_at})")),
        "the status names the cursor: {status:?}"
    );
    assert_eq!(got, (1..=cut_at).collect::<Vec<u64>>());
    eprintln!(
        "cut after {cut_at} of {total} events; hub RSS {} KiB after the writes",
        rss_after_writes
    );
    // Resume from the cursor: the rest, no gap, no duplicate.
    let mut stream = client
        .watch_events(api::WatchEventsRequest {
            cluster_id: cluster.clone(),
            after_id: cut_at,
        })
        .await
        .unwrap()
        .into_inner();
    while got.len() < total as usize {
        let event = tokio::time::timeout(TIMEOUT, stream.message())
            .await
            .expect("the rest comes")
            .unwrap()
            .unwrap();
        got.push(event.id);
    }
    assert_eq!(got, (1..=total).collect::<Vec<u64>>());
    assert!(hub.log().contains("slow watcher cut"), "{}", hub.log());
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

// ---- with the real agent ----

async fn cluster_state(client: &mut Client, cluster: &str) -> api::Cluster {
    client
        .get_cluster(api::GetClusterRequest {
            cluster_id: cluster.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

async fn connected(client: &mut Client, cluster: &str) -> api::Cluster {
    let client = client.clone();
    eventually(TIMEOUT, "the agent connected", || {
        let mut client = client.clone();
        async move {
            let c = cluster_state(&mut client, cluster).await;
            (c.connected && c.inventory.is_some()).then_some(c)
        }
    })
    .await
    .0
}

async fn command_done(client: &mut Client, cluster: &str, id: u64) -> api::Command {
    eventually(TIMEOUT, &format!("command {id} answered"), || {
        let mut client = client.clone();
        async move {
            let c = client
                .get_command(api::GetCommandRequest {
                    cluster_id: cluster.into(),
                    command_id: id,
                })
                .await
                .unwrap()
                .into_inner();
            matches!(c.state(), CommandState::Succeeded | CommandState::Failed).then_some(c)
        }
    })
    .await
    .0
}

#[tokio::test]
async fn commands_through_the_api_are_queued_once_per_idempotency_key_and_reach_the_agent() {
    let env = hub_env().await;
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, token) = cluster_with_token(&mut client).await;
    // Queued before the agent is there: the command waits in the store.
    let name = unique_name("api");
    let first = apply(&mut client, &cluster, &project(&name), "create-project-1")
        .await
        .unwrap();
    let waiting = client
        .get_command(api::GetCommandRequest {
            cluster_id: cluster.clone(),
            command_id: first.command_id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(waiting.state(), CommandState::Queued);
    assert_eq!(
        (waiting.kind.as_str(), waiting.object.as_str()),
        ("apply", format!("Project//{name}").as_str())
    );
    // The product server retries the same request: the same command, nothing more queued.
    let retried = apply(&mut client, &cluster, &project(&name), "create-project-1")
        .await
        .unwrap();
    assert_eq!(retried.command_id, first.command_id);
    assert!(retried.replayed && !first.replayed);
    assert_refused(
        apply(&mut client, &cluster, &project("other"), "create-project-1").await,
        Code::FailedPrecondition,
        "used for another request",
    );

    let agent = agent_from_install_line(&env, &hub, &token).await;
    let c = connected(&mut client, &cluster).await;
    assert!(c.session_epoch >= 1 && !c.agent_version.is_empty(), "{c:?}");
    assert!(c.capabilities.iter().any(|k| k == "apply"), "{c:?}");
    let now = shapeblock_proto::now_unix();
    assert!(c.certificate_not_after > now + 30 * 86400, "{c:?}");
    assert!(c.last_heartbeat >= now - 10, "{c:?}");
    let done = command_done(&mut client, &cluster, first.command_id).await;
    assert_eq!(done.state(), CommandState::Succeeded, "{done:?}");
    let key = format!("Project//{name}");
    wait_phase_at_hub(&client, &cluster, &key, "Ready").await;

    // A set-config value: in no response, event or log, whatever becomes of the command.
    let secret_value = format!("s3cret-{}", unique_name("v"));
    let set = client
        .set_config(api::SetConfigRequest {
            cluster_id: cluster.clone(),
            namespace: name.clone(),
            app: "web".into(),
            set: [("DATABASE_PASSWORD".to_string(), secret_value.clone())].into(),
            unset: vec![],
            idempotency_key: "config-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let answered = command_done(&mut client, &cluster, set.command_id).await;
    assert_eq!(answered.kind, "set-config");

    let all = events(&mut client, &cluster, 0).await;
    let kinds = |kind: EventKind| all.iter().filter(|e| e.kind() == kind).count();
    assert_eq!(
        kinds(EventKind::CommandQueued),
        2,
        "one per command, none for the retry: {all:#?}"
    );
    assert!(kinds(EventKind::SessionUp) >= 1);
    let result = all
        .iter()
        .find(|e| e.kind() == EventKind::CommandResult && e.command_id == first.command_id)
        .expect("the result as an event");
    assert!(result.ok && result.object == key, "{result:?}");
    assert!(
        all.iter()
            .any(|e| e.kind() == EventKind::Phase && e.object == key && e.phase == "Ready"),
        "{all:#?}"
    );
    let shown = format!(
        "{set:?}{answered:?}{all:?}{:?}{}",
        cluster_state(&mut client, &cluster).await,
        hub.log()
    );
    assert!(!shown.contains(&secret_value), "a config value leaked");

    agent.terminate(Duration::from_secs(15)).expect("stops");
    let _ = Api::<shapeblock_agent::api::Project>::all(env.client.clone())
        .delete(&name, &Default::default())
        .await;
}

/// Opens a tunnel with a client certificate; the hub's answer.
async fn tunnel_with(hub: &HubProcess, cert_pem: &str, key_pem: &str) -> Result<(), Status> {
    let mut stand_in =
        StandIn::dial(&hub.agent_url, &hub.ca_pem, cert_pem, key_pem, "revoked-test", 2).await?;
    stand_in.down.message().await?;
    Ok(())
}

async fn identity(env: &Env) -> (String, String) {
    let secret = Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
        .get("shapeblock-agent-identity")
        .await
        .unwrap();
    let data = secret.data.unwrap_or_default();
    let text = |k: &str| String::from_utf8(data[k].0.clone()).unwrap();
    (text("tls.crt"), text("tls.key"))
}

#[tokio::test]
async fn a_revoked_cluster_is_refused_with_its_still_valid_certificate_and_rejoins_with_a_new_token() {
    let env = hub_env().await;
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, token) = cluster_with_token(&mut client).await;
    let agent = agent_from_install_line(&env, &hub, &token).await;
    let before = connected(&mut client, &cluster).await;
    let (cert, key) = identity(&env).await;
    let (_, not_after) = shapeblock_proto::validity(
        &rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes()).unwrap(),
    )
    .unwrap();
    assert!(
        not_after > shapeblock_proto::now_unix() + 86400,
        "the certificate is valid for weeks"
    );
    let spare = client
        .create_enrollment_token(api::CreateEnrollmentTokenRequest {
            cluster_id: cluster.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let revoked_at = Instant::now();
    let revoked = client
        .revoke_cluster(api::RevokeClusterRequest {
            cluster_id: cluster.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(revoked.revoked);
    let polling = client.clone();
    let (_, closed_in) = eventually(Duration::from_secs(5), "the session closed", || {
        let mut client = polling.clone();
        let cluster = cluster.clone();
        async move { (!cluster_state(&mut client, &cluster).await.connected).then_some(()) }
    })
    .await;
    let closed_in = revoked_at.elapsed().min(closed_in + Duration::from_millis(100));
    eprintln!("session closed {closed_in:?} after the revocation");
    assert!(closed_in < Duration::from_secs(1), "{closed_in:?}");

    // The still-valid certificate gets nothing: no session, no renewal.
    let refused = tunnel_with(&hub, &cert, &key).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("revoked"), "{refused:?}");
    // The agent keeps trying with it and stays out; its tokens went with the revocation.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = cluster_state(&mut client, &cluster).await;
    assert!(!after.connected && after.revoked, "{after:?}");
    assert_eq!(after.session_epoch, before.session_epoch, "no session since");
    let tokens = client
        .list_enrollment_tokens(api::ListEnrollmentTokensRequest {
            cluster_id: cluster.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .tokens;
    assert!(tokens.is_empty(), "{tokens:?}");
    assert_refused(
        client
            .revoke_enrollment_token(api::RevokeEnrollmentTokenRequest {
                id: spare.token.unwrap().id,
            })
            .await,
        Code::NotFound,
        "no token",
    );
    let all = events(&mut client, &cluster, 0).await;
    assert!(all.iter().any(|e| e.kind() == EventKind::ClusterRevoked));
    let down = all
        .iter()
        .rfind(|e| e.kind() == EventKind::SessionDown)
        .expect("the session's end as an event");
    assert!(down.message.contains("revoked"), "{down:?}");

    // Joining again takes a new token (and a new identity).
    agent.terminate(Duration::from_secs(15)).expect("stops");
    let _ = Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
        .delete("shapeblock-agent-identity", &Default::default())
        .await;
    let fresh = client
        .create_enrollment_token(api::CreateEnrollmentTokenRequest {
            cluster_id: cluster.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let agent = agent_from_install_line(&env, &hub, &fresh).await;
    let back = connected(&mut client, &cluster).await;
    assert!(
        !back.revoked && back.session_epoch > before.session_epoch,
        "{back:?}"
    );
    // The old certificate stays refused.
    let refused = tunnel_with(&hub, &cert, &key).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    agent.terminate(Duration::from_secs(15)).expect("stops");
}

// ---- the CLI: a client of the API ----

#[tokio::test]
async fn the_cli_goes_through_the_api_with_flags_or_environment_and_says_what_it_needs() {
    let hub = HubProcess::start(&[]).await;
    let ca = hub.dir.path().join("ca.pem");
    // Run from another directory, with no data directory: nothing local to fall back on.
    let elsewhere = tempfile::tempdir().unwrap();
    let run = |args: &[String], env: &[(&str, &str)]| {
        let output = Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
            .current_dir(elsewhere.path())
            .env_remove("SHAPEBLOCK_HUB_API")
            .env_remove("SHAPEBLOCK_HUB_API_KEY")
            .env_remove("SHAPEBLOCK_HUB_CA")
            .envs(env.iter().copied())
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let bare = |args: &[&str]| -> Vec<String> { args.iter().map(|a| a.to_string()).collect() };
    let flags = [
        "--hub",
        hub.api_url.as_str(),
        "--api-key",
        hub.key.as_str(),
        "--ca",
        ca.to_str().unwrap(),
    ];
    let with = |rest: &[&str]| -> Vec<String> { flags.iter().chain(rest).map(|a| a.to_string()).collect() };
    let cluster = unique_name("cli");

    let (ok, line, stderr) = run(&with(&["token", "create", "--cluster", &cluster]), &[]);
    assert!(ok, "{stderr}");
    assert!(line.starts_with("helm install shapeblock-agent "), "{line}");
    assert!(line.contains(&format!("hub.address={}", hub.agent_url)), "{line}");

    // The same through the environment.
    let env = [
        ("SHAPEBLOCK_HUB_API", hub.api_url.as_str()),
        ("SHAPEBLOCK_HUB_API_KEY", hub.key.as_str()),
        ("SHAPEBLOCK_HUB_CA", ca.to_str().unwrap()),
    ];
    let (ok, listed, stderr) = run(&bare(&["token", "list"]), &env);
    assert!(ok, "{stderr}");
    assert!(listed.contains(&cluster) && listed.contains("unused"), "{listed}");

    let manifest = elsewhere.path().join("p.yaml");
    std::fs::write(&manifest, project("from-cli")).unwrap();
    let apply = with(&[
        "apply",
        "--cluster",
        &cluster,
        "-f",
        manifest.to_str().unwrap(),
        "--idempotency-key",
        "k1",
    ]);
    let (ok, first, stderr) = run(&apply, &[]);
    assert!(ok, "{stderr}");
    assert_eq!(first.trim(), format!("queued command 1 for {cluster}"));
    let (ok, again, _) = run(&apply, &[]);
    assert!(
        ok && again.contains("queued command 1 ") && again.contains("already queued"),
        "{again}"
    );
    let (ok, state, _) = run(&with(&["command", "--cluster", &cluster, "--id", "1"]), &[]);
    assert!(
        ok && state.contains("apply\tProject//from-cli\tqueued"),
        "{state}"
    );
    let (ok, events, _) = run(&with(&["events", "--cluster", &cluster]), &[]);
    assert!(ok, "{events}");
    assert_eq!(events.lines().count(), 1, "one queued command: {events}");
    assert!(events.contains("command_queued\tProject//from-cli"), "{events}");
    let (ok, clusters, _) = run(&with(&["clusters"]), &[]);
    assert!(
        ok && clusters.contains(&format!("{cluster}\tdisconnected")),
        "{clusters}"
    );
    let (ok, _, stderr) = run(&with(&["revoke", "--cluster", &cluster]), &[]);
    assert!(ok, "{stderr}");
    let (_, clusters, _) = run(&with(&["clusters"]), &[]);
    assert!(clusters.contains(&format!("{cluster}\trevoked")), "{clusters}");

    // Refusals come back with the API's code and reason.
    let (ok, _, stderr) = run(
        &with(&["apply", "--cluster", "nobody", "-f", manifest.to_str().unwrap()]),
        &[],
    );
    assert!(
        !ok && stderr.contains("NotFound") && stderr.contains("nobody"),
        "{stderr}"
    );
    let wrong = [
        "--hub",
        &hub.api_url,
        "--api-key",
        "sbk_wrong",
        "--ca",
        ca.to_str().unwrap(),
        "clusters",
    ];
    let (ok, _, stderr) = run(&bare(&wrong), &[]);
    assert!(!ok && stderr.contains("Unauthenticated"), "{stderr}");
    // What it needs, said.
    let (ok, _, stderr) = run(&bare(&["clusters"]), &[]);
    assert!(!ok && stderr.contains("--hub"), "{stderr}");
    let (ok, _, stderr) = run(&bare(&["--hub", &hub.api_url, "clusters"]), &[]);
    assert!(!ok && stderr.contains("--api-key"), "{stderr}");
    // A second key through the API (the first came from the data directory).
    let (ok, key, stderr) = run(&with(&["api-key", "create", "--name", "second"]), &[]);
    assert!(ok && key.trim().starts_with("sbk_"), "{stderr}");
    let (ok, keys, _) = run(&with(&["api-key", "list"]), &[]);
    assert!(
        ok && keys.contains("\ttest\tvalid") && keys.contains("\tsecond\tvalid"),
        "{keys}"
    );
}

// ---- logs ----

/// Build log chunks as an agent sends them (over its mTLS stream, with seqs, waiting for
/// the acks), from a stand-in that speaks the agent protocol: only the log path is tested.
async fn send_log_chunks(
    hub: &HubProcess,
    identity: &shapeblock_agent::tunnel::Identity,
    first_seq: u64,
    chunks: &[(u64, &[u8], bool)],
) {
    use shapeblock_proto::v1::agent_message::Body as Up;
    use shapeblock_proto::v1::server_message::Body as Down;
    use shapeblock_proto::v1::{AgentMessage, LogChunk};
    let StandIn { up: tx, mut down } = StandIn::dial(
        &hub.agent_url,
        &hub.ca_pem,
        &identity.cert_pem,
        &identity.key_pem,
        "log-stand-in",
        16,
    )
    .await
    .unwrap();
    let mut last = 0;
    for (i, (offset, data, eof)) in chunks.iter().enumerate() {
        last = first_seq + i as u64;
        let chunk = LogChunk {
            build: "web-1".into(),
            namespace: "shop".into(),
            container: "build".into(),
            offset: *offset,
            data: data.to_vec(),
            eof: *eof,
            truncated: false,
            kind: "AppBuild".into(),
        };
        tx.send(AgentMessage {
            seq: last,
            body: Some(Up::Log(chunk)),
        })
        .await
        .unwrap();
    }
    // Every chunk acknowledged: stored.
    while let Some(message) = down.message().await.unwrap() {
        if let Some(Down::Ack(ack)) = message.body
            && ack.seq >= last
        {
            break;
        }
    }
}

/// A new cluster and the identity an agent enrolled with its token (pinning the hub's CA by the
/// hash in the install line).
async fn enrolled_cluster(
    hub: &HubProcess,
    client: &mut Client,
) -> (String, shapeblock_agent::tunnel::Identity) {
    use shapeblock_agent::tunnel::enroll;
    let (cluster, token) = cluster_with_token(client).await;
    let key = enroll::new_key().unwrap();
    let pin = token
        .install_line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("hub.caHash="))
        .unwrap()
        .to_string();
    let identity = enroll::enroll(&hub.agent_url, &token.secret, &pin, &key)
        .await
        .expect("enroll");
    (cluster, identity)
}

#[tokio::test]
async fn a_hub_stopped_between_two_writes_of_who_was_heard_from_still_writes_the_last() {
    use shapeblock_proto::v1::agent_message::Body as Up;
    use shapeblock_proto::v1::{AgentMessage, Heartbeat};
    let mut hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, identity) = enrolled_cluster(&hub, &mut client).await;
    let StandIn { up, down: _down } = StandIn::dial(
        &hub.agent_url,
        &hub.ca_pem,
        &identity.cert_pem,
        &identity.key_pem,
        "seen-stand-in",
        16,
    )
    .await
    .unwrap();
    let beats = tokio::spawn(async move {
        loop {
            let hb = AgentMessage {
                seq: 0,
                body: Some(Up::Heartbeat(Heartbeat { sent_at_ms: 0 })),
            };
            if up.send(hb).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    // Just after a write (the hub writes who was heard from once per 2 s heartbeat): the
    // next is 2 s away, and the agent goes on being heard.
    let before = cluster_state(&mut client, &cluster).await.last_heartbeat;
    let written = loop {
        let now = cluster_state(&mut client, &cluster).await.last_heartbeat;
        if now != before {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(hub.child.id() as libc::pid_t, libc::SIGTERM) };
    let status = hub.child.wait().unwrap();
    assert!(status.success(), "{status:?}: {}", hub.log());
    beats.abort();
    let database = support::hub::database_for_tests(hub.dir.path());
    let store = shapeblock_hub::open_store_at(&shapeblock_hub::store_location(
        hub.dir.path(),
        database.as_deref(),
        2,
    ))
    .await
    .unwrap();
    let row = store.cluster(&cluster).await.unwrap().unwrap();
    assert!(
        row.last_seen > written,
        "heard from until the hub stopped, 1.2 s after the write at {written}: last seen {}",
        row.last_seen
    );
}

#[tokio::test]
async fn logs_are_listed_read_from_an_offset_and_followed_to_their_end() {
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, identity) = enrolled_cluster(&hub, &mut client).await;
    let stream = "shop/web-1/build";
    send_log_chunks(
        &hub,
        &identity,
        1,
        &[(0, b"step 1\n", false), (7, b"step 2\n", false)],
    )
    .await;
    let listed = client
        .list_logs(api::ListLogsRequest {
            cluster_id: cluster.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .streams;
    assert_eq!(
        listed,
        [api::LogStream {
            stream: stream.into(),
            length: 14,
            ended: false,
            truncated: false,
            first_offset: 0,
        }]
    );
    let read = client
        .read_log(api::ReadLogRequest {
            cluster_id: cluster.clone(),
            stream: stream.into(),
            offset: 5,
            limit: 4,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (read.data.as_slice(), read.next_offset, read.eof),
        (&b"1\nst"[..], 9, false)
    );

    // A follower from offset 3 gets the rest as it arrives, then the end.
    let mut follower = client
        .follow_log(api::FollowLogRequest {
            cluster_id: cluster.clone(),
            stream: stream.into(),
            offset: 3,
        })
        .await
        .unwrap()
        .into_inner();
    let first = follower.message().await.unwrap().unwrap();
    assert_eq!((first.offset, first.data.as_slice()), (3, &b"p 1\nstep 2\n"[..]));
    // The next session's chunks (the agent's seqs go on), the last one with the end.
    send_log_chunks(&hub, &identity, 3, &[(14, b"done\n", false), (19, b"", true)]).await;
    let mut rest = Vec::new();
    let mut ended = false;
    while let Some(data) = tokio::time::timeout(TIMEOUT, follower.message())
        .await
        .expect("the follower is told")
        .unwrap()
    {
        rest.extend_from_slice(&data.data);
        ended |= data.eof;
    }
    assert_eq!(rest, b"done\n");
    assert!(ended, "the last message says the log ended");
    let all = events(&mut client, &cluster, 0).await;
    let log_events: Vec<(EventKind, &str)> = all
        .iter()
        .filter(|e| matches!(e.kind(), EventKind::LogOpened | EventKind::LogEnded))
        .map(|e| (e.kind(), e.object.as_str()))
        .collect();
    assert_eq!(
        log_events,
        [(EventKind::LogOpened, stream), (EventKind::LogEnded, stream)]
    );
    let sessions = all.iter().filter(|e| e.kind() == EventKind::SessionUp).count();
    assert_eq!(sessions, 2);
}

// ---- watchers that go ----

/// The `shapeblock-resume-from` trailer of an OUT_OF_RANGE answer, as a number.
fn resume_from(status: &Status) -> u64 {
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    status
        .metadata()
        .get(shapeblock_hub::api::RESUME_FROM)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {} in {status:?}", shapeblock_hub::api::RESUME_FROM))
}

/// Retention through the real hub: its background pass (every second here) prunes a
/// cluster's events and log bytes over their caps, and what an API reader gets is truthful:
/// a pruned cursor or offset is OUT_OF_RANGE with where to resume, offset 0 and cursor 0
/// read what is kept, and the hub says which replica answered.
#[tokio::test]
async fn retention_prunes_in_the_background_and_a_reader_of_what_went_is_told_where_to_resume() {
    let hub = HubProcess::start(&[
        "--retention-interval-seconds",
        "1",
        "--retain-events-per-cluster",
        "4",
        "--retain-log-bytes-per-cluster",
        "10",
    ])
    .await;
    let mut client = hub.client().await;
    let (cluster, identity) = enrolled_cluster(&hub, &mut client).await;
    // The cluster's first event: its first command queued (one event is under the cap).
    apply(&mut client, &cluster, &project("p0"), "").await.unwrap();
    let first_event = events(&mut client, &cluster, 0).await[0].id;
    for i in 1..6 {
        apply(&mut client, &cluster, &project(&format!("p{i}")), "")
            .await
            .unwrap();
    }
    let stream = "shop/web-1/build";
    // 21 bytes, a cap of 10: the two oldest chunks go, the stream is still being written.
    send_log_chunks(
        &hub,
        &identity,
        1,
        &[
            (0, b"step 1\n", false),
            (7, b"step 2\n", false),
            (14, b"step 3\n", false),
        ],
    )
    .await;
    let (listed, _) = eventually(TIMEOUT, "the retention pass", || {
        let mut client = client.clone();
        let cluster = cluster.clone();
        async move {
            let streams = client
                .list_logs(api::ListLogsRequest { cluster_id: cluster })
                .await
                .unwrap()
                .into_inner()
                .streams;
            (streams.first()?.first_offset > 0).then_some(streams)
        }
    })
    .await;
    assert_eq!(
        listed,
        [api::LogStream {
            stream: stream.into(),
            length: 21,
            ended: false,
            truncated: false,
            first_offset: 14,
        }]
    );
    let read = |offset| {
        let mut client = client.clone();
        let cluster = cluster.clone();
        async move {
            client
                .read_log(api::ReadLogRequest {
                    cluster_id: cluster,
                    stream: stream.into(),
                    offset,
                    limit: 0,
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let refused = read(3).await.expect_err("offset 3 was pruned");
    assert_eq!(resume_from(&refused), 14);
    assert!(refused.message().contains("read from offset 14"), "{refused:?}");
    let kept = read(0).await.unwrap();
    assert_eq!(
        (
            kept.offset,
            kept.first_offset,
            kept.data.as_slice(),
            kept.next_offset
        ),
        (14, 14, &b"step 3\n"[..], 21)
    );
    let mut follower = client
        .follow_log(api::FollowLogRequest {
            cluster_id: cluster.clone(),
            stream: stream.into(),
            offset: 3,
        })
        .await
        .unwrap()
        .into_inner();
    let refused = follower.message().await.expect_err("following from offset 3");
    assert_eq!(resume_from(&refused), 14);

    // Events: the cluster keeps its newest four; its first cursor is gone.
    let mut stale = client
        .watch_events(api::WatchEventsRequest {
            cluster_id: cluster.clone(),
            after_id: first_event,
        })
        .await
        .unwrap()
        .into_inner();
    let refused = tokio::time::timeout(TIMEOUT, stale.message())
        .await
        .unwrap()
        .expect_err("a pruned cursor");
    let resume = resume_from(&refused);
    assert!(resume > first_event, "{refused:?}");
    assert!(refused.message().contains("ListObjects"), "{refused:?}");
    let from_zero = events(&mut client, &cluster, 0).await;
    assert!(
        !from_zero.is_empty() && from_zero.len() <= 4 && from_zero[0].id > resume,
        "{from_zero:?}"
    );
    assert_eq!(events(&mut client, &cluster, resume).await, from_zero);

    // The replica that answered: the one the hub printed (a hub on Postgres), else none.
    let printed = hub
        .log()
        .lines()
        .find_map(|l| l.strip_prefix("replica ").map(str::to_string))
        .unwrap_or_default();
    assert_eq!(hub_info(&mut client).await.replica_id, printed);
}

async fn hub_info(client: &mut Client) -> api::HubInfo {
    client.get_hub(api::GetHubRequest {}).await.unwrap().into_inner()
}

/// Opens `n` watchers at once, each reading one event, then drops them: half by ending the
/// stream, half by closing the connection under it.
async fn watchers_come_and_go(hub: &HubProcess, cluster: &str, n: usize) {
    let shared = hub.client().await;
    let opened = (0..n).map(|i| {
        let mut shared = shared.clone();
        let cluster = cluster.to_string();
        async move {
            let mut own = if i % 2 == 0 {
                Some(hub.client().await)
            } else {
                None
            };
            let client = own.as_mut().unwrap_or(&mut shared);
            let mut stream = client
                .watch_events(api::WatchEventsRequest {
                    cluster_id: cluster,
                    after_id: 0,
                })
                .await
                .unwrap()
                .into_inner();
            stream.message().await.unwrap().expect("an event");
            drop(stream);
            drop(own);
        }
    });
    futures::future::join_all(opened).await;
}

#[tokio::test]
async fn a_thousand_watchers_that_come_and_go_leave_no_task_and_no_memory_behind() {
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, _) = cluster_with_token(&mut client).await;
    for i in 0..20 {
        apply(&mut client, &cluster, &project(&format!("w{i}")), "")
            .await
            .unwrap();
    }
    // A first round warms the allocator and the TLS caches: the baseline is after it.
    watchers_come_and_go(&hub, &cluster, 100).await;
    let idle = |client: &Client| {
        let client = client.clone();
        async move {
            eventually(Duration::from_secs(10), "every watcher's task ended", || {
                let mut client = client.clone();
                async move { (hub_info(&mut client).await.watchers == 0).then_some(()) }
            })
            .await
        }
    };
    idle(&client).await;
    let baseline = rss_kib(hub.child.id());
    let started = Instant::now();
    for _ in 0..10 {
        watchers_come_and_go(&hub, &cluster, 100).await;
    }
    let took = started.elapsed();
    let (_, settled_in) = idle(&client).await;
    let after = rss_kib(hub.child.id());
    eprintln!(
        "1000 watchers came and went in {took:?}; tasks back to 0 within {settled_in:?}; hub RSS {baseline} KiB before, {after} KiB after"
    );
    let info = hub_info(&mut client).await;
    assert_eq!((info.watchers, info.log_followers), (0, 0), "{info:?}");
    assert!(
        after < baseline + 8 * 1024,
        "hub RSS grew from {baseline} KiB to {after} KiB"
    );
}

// ---- live App logs ----

const APP_IMAGE: &str = "registry.example.com/demo/shop:1.0";

fn manifest(kind: &str, namespace: &str, name: &str, spec: serde_json::Value) -> String {
    serde_json::json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
    .to_string()
}

fn follow_request(cluster: &str, namespace: &str, app: &str, process: &str) -> api::FollowAppLogsRequest {
    api::FollowAppLogsRequest {
        cluster_id: cluster.into(),
        namespace: namespace.into(),
        app: app.into(),
        process: process.into(),
        ..Default::default()
    }
}

/// Reads a live follow until `done` says the text so far is enough (or `TIMEOUT`).
async fn read_until(
    stream: &mut tonic::Streaming<api::AppLogData>,
    got: &mut Vec<api::AppLogData>,
    done: impl Fn(&[api::AppLogData]) -> bool,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !done(got) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(data))) => got.push(data),
            Ok(other) => panic!("the follow ended waiting for {what}: {other:?}"),
            Err(_) => panic!("no {what} within 90 s; got {got:?}"),
        }
    }
}

/// The text of one pod container's substream, checking its offsets run on without a gap.
fn substream(got: &[api::AppLogData], pod: &str, container: &str) -> String {
    let mut offset = 0;
    let mut text = Vec::new();
    for data in got.iter().filter(|d| d.pod == pod && d.container == container) {
        assert_eq!(
            data.offset, offset,
            "offsets of {pod}/{container} run on: {got:?}"
        );
        offset += data.data.len() as u64 + data.dropped;
        text.extend_from_slice(&data.data);
    }
    String::from_utf8(text).unwrap()
}

async fn running_pods(env: &Env, namespace: &str, selector: &str) -> Vec<k8s_openapi::api::core::v1::Pod> {
    use kube::ResourceExt;
    let pods = Api::<k8s_openapi::api::core::v1::Pod>::namespaced(env.client.clone(), namespace)
        .list(&kube::api::ListParams::default().labels(selector))
        .await
        .unwrap();
    pods.items
        .into_iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none()
                && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && !p.name_any().is_empty()
        })
        .collect()
}

/// A connected agent of `hub` and the App `shop` (processes web and worker) built and
/// deployed in a new Project `ns` (whose pods' logs the caller scripts first): the agent, its
/// cluster, the running web pods and how long they took.
async fn shop_with_running_web(
    env: &Env,
    hub: &HubProcess,
    client: &mut Client,
    ns: &str,
) -> (
    shapeblock_testenv::agent::AgentProcess,
    String,
    Vec<k8s_openapi::api::core::v1::Pod>,
    Duration,
) {
    let (cluster, token) = cluster_with_token(client).await;
    let agent = support::hub_process::agent_from_install_line_with(
        env,
        hub,
        &token,
        &["--registry=registry.example.com"],
    )
    .await;
    let c = connected(client, &cluster).await;
    assert!(c.capabilities.iter().any(|k| k == "app-logs"), "{c:?}");

    apply(client, &cluster, &project(ns), "").await.unwrap();
    let key = format!("Project//{ns}");
    wait_phase_at_hub(client, &cluster, &key, "Ready").await;
    for m in [
        manifest(
            "App",
            ns,
            "shop",
            serde_json::json!({
                "registry": {"url": "registry.example.com"},
                "build": {"type": "image", "image": APP_IMAGE},
                "processes": {
                    "web": {"command": ["node", "server.js"], "port": 8080, "replicas": 1},
                    "worker": {"command": ["node", "worker.js"], "replicas": 1},
                },
            }),
        ),
        manifest("AppBuild", ns, "shop-1", serde_json::json!({"appName": "shop"})),
    ] {
        let accepted = apply(client, &cluster, &m, "").await.unwrap();
        let done = command_done(client, &cluster, accepted.command_id).await;
        assert_eq!(done.state(), CommandState::Succeeded, "{done:?}");
    }
    let web_selector = "apps.shapeblock.io/app=shop,apps.shapeblock.io/process=web";
    let (pods, took) = eventually(Duration::from_secs(180), "the App's web pod running", || {
        let ns = ns.to_string();
        async move {
            let pods = running_pods(env, &ns, web_selector).await;
            (!pods.is_empty()).then_some(pods)
        }
    })
    .await;
    (agent, cluster, pods, took)
}

#[tokio::test]
async fn live_app_logs_follow_an_apps_pods_new_ones_included_scrubbed_and_stop_when_the_caller_goes() {
    use kube::ResourceExt;
    use shapeblock_testenv::{ContainerRef, logs};
    let env = hub_env().await;
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let ns = unique_name("live");
    let secret = "hunter2hunter2";
    logs().script(
        &ns,
        "web",
        &[
            "booting web",
            &format!("connecting to postgres://shop:{secret}@db:5432/shop"),
            "listening on 8080",
        ],
    );
    logs().script(&ns, "worker", &["worker up"]);
    let (agent, cluster, pods, took) = shop_with_running_web(&env, &hub, &mut client, &ns).await;
    eprintln!("web pod running {took:?} after the App was applied");
    let first = pods[0].name_any();

    // The web process only: its scripted lines in order, the password scrubbed.
    let started = Instant::now();
    let mut stream = client
        .follow_app_logs(follow_request(&cluster, &ns, "shop", "web"))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    read_until(
        &mut stream,
        &mut got,
        |got| substream(got, &first, "web").contains("listening on 8080\n"),
        "the web pod's scripted lines",
    )
    .await;
    eprintln!("first lines {:?} after the call", started.elapsed());
    assert_eq!(
        substream(&got, &first, "web"),
        "booting web\nconnecting to postgres://***@db:5432/shop\nlistening on 8080\n"
    );
    assert!(got.iter().all(|d| d.process == "web"), "{got:?}");
    // A line written now arrives.
    logs().append(&ContainerRef::new(&ns, &first, "web"), "GET /healthz 200");
    read_until(
        &mut stream,
        &mut got,
        |got| substream(got, &first, "web").ends_with("GET /healthz 200\n"),
        "a line written during the follow",
    )
    .await;
    let (info, _) = eventually(TIMEOUT, "one live follower at the hub and at the agent", || {
        let mut client = client.clone();
        let agent = &agent;
        async move {
            let info = hub_info(&mut client).await;
            (info.app_log_followers == 1 && agent.metric("shapeblock_app_log_streams").await == 1.0)
                .then_some(info)
        }
    })
    .await;
    assert_eq!(info.app_log_followers, 1);

    // A new pod (the ReplicaSet replaces a deleted one, as in a rollout) is followed too.
    Api::<k8s_openapi::api::core::v1::Pod>::namespaced(env.client.clone(), &ns)
        .delete(&first, &Default::default())
        .await
        .unwrap();
    read_until(
        &mut stream,
        &mut got,
        |got| {
            got.iter()
                .filter(|d| d.pod != first)
                .any(|d| substream(got, &d.pod, "web").contains("listening on 8080\n"))
        },
        "the new pod's lines",
    )
    .await;
    let second = got.iter().find(|d| d.pod != first).unwrap().pod.clone();
    assert_eq!(
        substream(&got, &second, "web"),
        "booting web\nconnecting to postgres://***@db:5432/shop\nlistening on 8080\n"
    );
    let all: Vec<u8> = got.iter().flat_map(|d| d.data.clone()).collect();
    assert!(
        !String::from_utf8_lossy(&all).contains(secret),
        "the password was scrubbed"
    );
    assert!(
        !got.iter().any(|d| d.truncated),
        "nothing dropped at this rate: {got:?}"
    );

    // Every process, from the last line of each: the worker too.
    let mut both = client
        .follow_app_logs(api::FollowAppLogsRequest {
            tail_lines: Some(1),
            ..follow_request(&cluster, &ns, "shop", "")
        })
        .await
        .unwrap()
        .into_inner();
    let mut got_both = Vec::new();
    read_until(
        &mut both,
        &mut got_both,
        |got| {
            got.iter()
                .any(|d| d.process == "worker" && d.data == b"worker up\n")
                && got
                    .iter()
                    .any(|d| d.process == "web" && d.data == b"listening on 8080\n")
        },
        "the last line of each process",
    )
    .await;
    assert!(
        !got_both.iter().any(|d| d.data.starts_with(b"booting")),
        "a tail of 1 line: {got_both:?}"
    );

    // The CLI prints each line after its pod and container.
    let mut cli = tokio::process::Command::new(env!("CARGO_BIN_EXE_shapeblock-hub"))
        .args(["--hub", &hub.api_url, "--api-key", &hub.key, "--ca"])
        .arg(hub.dir.path().join("ca.pem"))
        .args([
            "app-logs",
            "--cluster",
            &cluster,
            "--namespace",
            &ns,
            "--app",
            "shop",
        ])
        .args(["--process", "web", "--tail", "1"])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut printed = tokio::io::BufReader::new(cli.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        TIMEOUT,
        tokio::io::AsyncBufReadExt::read_line(&mut printed, &mut line),
    )
    .await
    .expect("the CLI printed a line")
    .unwrap();
    assert_eq!(line, format!("{second}/web: listening on 8080\n"));
    cli.kill().await.unwrap();

    // Since 3 seconds ago (lines the pods wrote at least 6 seconds ago are not shown): only
    // what is written from now on, appended until the follow has started at the kubelet.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let mut recent = client
        .follow_app_logs(api::FollowAppLogsRequest {
            since_seconds: 3,
            ..follow_request(&cluster, &ns, "shop", "web")
        })
        .await
        .unwrap()
        .into_inner();
    let mut got_recent = Vec::new();
    for i in 0.. {
        logs().append(
            &ContainerRef::new(&ns, &second, "web"),
            &format!("GET /since/{i} 200"),
        );
        if let Ok(message) = tokio::time::timeout(Duration::from_millis(500), recent.message()).await {
            got_recent.push(message.unwrap().expect("the follow goes on"));
            break;
        }
        assert!(i < 120, "no line written since the follow began within 60 s");
    }
    let text = String::from_utf8_lossy(&got_recent[0].data).to_string();
    assert!(
        text.starts_with("GET /since/") && !text.contains("booting") && !text.contains("healthz"),
        "only lines from the last 3 seconds: {got_recent:?}"
    );
    drop(recent);

    // More callers than the hub serves for one cluster (8): the one too many is refused.
    eventually(TIMEOUT, "the CLI's follow gone", || {
        let mut client = client.clone();
        async move { (hub_info(&mut client).await.app_log_followers == 2).then_some(()) }
    })
    .await;
    let mut many = Vec::new();
    for _ in 0..6 {
        let request = api::FollowAppLogsRequest {
            tail_lines: Some(0),
            ..follow_request(&cluster, &ns, "shop", "web")
        };
        many.push(client.follow_app_logs(request).await.unwrap().into_inner());
    }
    assert_refused(
        client
            .follow_app_logs(follow_request(&cluster, &ns, "shop", "web"))
            .await,
        Code::ResourceExhausted,
        "the most the hub serves",
    );
    drop(many);

    // The callers go: the hub and the agent stop.
    drop(stream);
    drop(both);
    let gone = Instant::now();
    eventually(TIMEOUT, "no live follower left at the hub nor the agent", || {
        let mut client = client.clone();
        let agent = &agent;
        async move {
            let info = hub_info(&mut client).await;
            (info.app_log_followers == 0 && agent.metric("shapeblock_app_log_streams").await == 0.0)
                .then_some(())
        }
    })
    .await;
    eprintln!(
        "callers gone -> follows stopped at the agent within {:?}",
        gone.elapsed()
    );

    // A caller's deadline ends its follow as well.
    let mut timed = tonic::Request::new(follow_request(&cluster, &ns, "shop", "web"));
    timed.set_timeout(Duration::from_secs(2));
    let mut stream = client.follow_app_logs(timed).await.unwrap().into_inner();
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("the deadline ended the follow");
    assert!(
        matches!(&ended, Err(s) if s.code() == Code::DeadlineExceeded || s.code() == Code::Cancelled),
        "{ended:?}"
    );
    eventually(TIMEOUT, "the timed-out follow stopped at the agent", || {
        let agent = &agent;
        async move { (agent.metric("shapeblock_app_log_streams").await == 0.0).then_some(()) }
    })
    .await;

    // The session ends (the agent stops): the caller gets UNAVAILABLE with the reason.
    let mut stream = client
        .follow_app_logs(follow_request(&cluster, &ns, "shop", "web"))
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    read_until(&mut stream, &mut got, |got| !got.is_empty(), "a first line").await;
    agent.terminate(Duration::from_secs(15)).expect("stops");
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                other => break other,
            }
        }
    })
    .await
    .expect("the follow ended with the session");
    let status = ended.expect_err("a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("session"), "{status:?}");
    assert_refused(
        client
            .follow_app_logs(follow_request(&cluster, &ns, "shop", "web"))
            .await,
        Code::Unavailable,
        "not connected",
    );
    let _ = Api::<shapeblock_agent::api::Project>::all(env.client.clone())
        .delete(&ns, &Default::default())
        .await;
}

#[tokio::test]
async fn the_agent_serves_at_most_its_own_number_of_live_log_follows_when_the_hub_allows_more() {
    use shapeblock_agent::bridge::app_logs::MAX_FOLLOWS;
    let env = hub_env().await;
    let allowed = (MAX_FOLLOWS + 2).to_string();
    let hub = HubProcess::start(&["--app-log-followers", &allowed]).await;
    let mut client = hub.client().await;
    let ns = unique_name("cap");
    shapeblock_testenv::logs().script(&ns, "web", &["web up"]);
    let (_agent, cluster, _pods, _) = shop_with_running_web(&env, &hub, &mut client, &ns).await;
    let follow = |client: &Client| {
        let mut client = client.clone();
        let request = api::FollowAppLogsRequest {
            tail_lines: Some(1),
            ..follow_request(&cluster, &ns, "shop", "web")
        };
        async move { client.follow_app_logs(request).await.unwrap().into_inner() }
    };
    // As many as the agent serves: each gets the web pod's last line.
    let mut served = Vec::new();
    for _ in 0..MAX_FOLLOWS {
        let mut stream = follow(&client).await;
        let mut got = Vec::new();
        read_until(
            &mut stream,
            &mut got,
            |got| !got.is_empty(),
            "a line of the web pod",
        )
        .await;
        served.push(stream);
    }
    // One more: the hub lets it through, the agent refuses it, and its reason reaches the caller.
    let mut refused = follow(&client).await;
    let status = tokio::time::timeout(TIMEOUT, refused.message())
        .await
        .expect("the agent answered")
        .expect_err("the agent refused the follow");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains(&format!(
            "this agent serves at most {MAX_FOLLOWS} live log follows at once"
        )),
        "{status:?}"
    );
    // One of them goes: the agent serves a new one.
    drop(served.pop());
    eventually(TIMEOUT, "a follow served again", || async {
        let mut stream = follow(&client).await;
        match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
            Ok(Ok(Some(_))) => Some(()),
            _ => None,
        }
    })
    .await;
}

#[tokio::test]
async fn live_app_logs_of_an_unknown_cluster_are_not_found_and_bad_names_are_invalid_argument() {
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, _) = cluster_with_token(&mut client).await;
    assert_refused(
        client
            .follow_app_logs(follow_request("no-such-cluster", "shop", "web", ""))
            .await,
        Code::NotFound,
        "no cluster",
    );
    for (request, words) in [
        (follow_request(&cluster, "Shop", "web", ""), "namespace"),
        (follow_request(&cluster, "shop", "../web", ""), "app"),
        (follow_request(&cluster, "shop", &"a".repeat(41), ""), "app"),
        (follow_request(&cluster, "shop", "web", "web,x!=y"), "process"),
        (
            api::FollowAppLogsRequest {
                container: "web container".into(),
                ..follow_request(&cluster, "shop", "web", "")
            },
            "container",
        ),
        (
            api::FollowAppLogsRequest {
                tail_lines: Some(10_001),
                ..follow_request(&cluster, "shop", "web", "")
            },
            "tail_lines",
        ),
    ] {
        assert_refused(
            client.follow_app_logs(request).await,
            Code::InvalidArgument,
            words,
        );
    }
    // Known, but no agent connected.
    assert_refused(
        client
            .follow_app_logs(follow_request(&cluster, "shop", "web", ""))
            .await,
        Code::Unavailable,
        "not connected",
    );
    assert_eq!(hub_info(&mut client).await.app_log_followers, 0);
}

/// A command queued into a hub's SQLite store by another process (nothing tells the hub)
/// reaches the live session through the hub's one watcher of the feed, in about its half
/// second, not at the 5 s fallback poll of each session. It was a look per session every
/// 500 ms: 65 % of a core for 10,000 idle agents (`benches/hub_scale.rs`).
#[tokio::test]
async fn a_command_queued_by_another_process_reaches_the_live_session_without_a_poll_per_session() {
    let hub = HubProcess::start(&[]).await;
    let mut client = hub.client().await;
    let (cluster, token) = cluster_with_token(&mut client).await;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(hub.ca_pem.as_bytes()).unwrap();
    let key = shapeblock_agent::tunnel::enroll::new_key().unwrap();
    let identity = shapeblock_agent::tunnel::enroll::enroll(
        &hub.agent_url,
        &token.secret,
        &shapeblock_proto::ca_hash(&der),
        &key,
    )
    .await
    .unwrap();
    let mut stand_in = StandIn::dial(
        &hub.agent_url,
        &hub.ca_pem,
        &identity.cert_pem,
        &identity.key_pem,
        "queued-test",
        4,
    )
    .await
    .unwrap();
    let hello = stand_in.down.message().await.unwrap().unwrap();
    assert!(matches!(
        hello.body,
        Some(shapeblock_agent::proto::v1::server_message::Body::HelloAck(_))
    ));
    // The session has looked for commands at its start; the next look of its own is 5 s on.
    let database = support::hub::database_for_tests(hub.dir.path());
    let location = shapeblock_hub::store_location(hub.dir.path(), database.as_deref(), 1);
    let other = shapeblock_hub::open_store_at(&location).await.unwrap();
    let body = shapeblock_hub::delete_command(shapeblock_agent::proto::v1::ObjectRef::new(
        "Project", "", "queued",
    ))
    .unwrap();
    let queued = Instant::now();
    let seq = other.add_command(&cluster, &body).await.unwrap();
    let took = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let message = stand_in.down.message().await.unwrap().expect("the session stays");
            if message.seq == seq {
                return queued.elapsed();
            }
        }
    })
    .await
    .expect("the command reaches the session");
    println!("a command queued by another process reached the session in {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}: woken, not polled");
}
