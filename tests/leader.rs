//! Leader election with real parts: agent processes under their ServiceAccount against the real
//! apiserver, sharing one Lease, each with a tunnel to the reference hub on loopback. Exactly
//! one leads (controllers and tunnel); a SIGKILLed leader is replaced within the lease
//! duration; a leader that shuts down gracefully hands over at once; nothing is done twice.

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use shapeblock_testenv::agent::AgentProcess;
use support::agent::{AGENT_NS, env};
use support::hub::{self, project, project_ready};
use support::{events_for, eventually, unique_name};

const LEASE_SECONDS: u64 = 4;
const TIMEOUT: Duration = Duration::from_secs(45);

async fn holder(client: &Client) -> Option<String> {
    Api::<Lease>::namespaced(client.clone(), AGENT_NS)
        .get_opt("shapeblock-agent")
        .await
        .ok()??
        .spec?
        .holder_identity
}

/// Reporting instances of a Project's `Ready` Events (cluster-scoped: they are in `default`).
async fn ready_events(client: &Client, project: &str) -> Vec<String> {
    events_for(client, "default", project)
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("Ready"))
        .map(|e| e.reporting_instance.unwrap_or_default())
        .collect()
}

#[tokio::test]
async fn one_replica_leads_a_killed_leader_is_replaced_within_the_lease_and_nothing_happens_twice() {
    let env = env().await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), AGENT_NS);
    let _ = leases.delete("shapeblock-agent", &Default::default()).await;
    // A previous test's identity would belong to another hub.
    let _ = Api::<Secret>::namespaced(env.client.clone(), AGENT_NS)
        .delete("shapeblock-agent-identity", &Default::default())
        .await;
    let data = tempfile::tempdir().unwrap();
    let hub = hub::start(data.path()).await;
    let cluster = unique_name("le");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();

    let flags = |name: &str| {
        [
            "--leader-elect".to_string(),
            format!("--instance={name}"),
            format!("--lease-duration-seconds={LEASE_SECONDS}"),
            "--renew-deadline-seconds=3".into(),
            "--retry-period-seconds=1".into(),
            format!("--hub-address={}", hub.url()),
            format!("--enroll-token={token}"),
            format!("--ca-hash={}", hub.ca_hash()),
            "--heartbeat-seconds=2".into(),
            "--reconnect-max-seconds=1".into(),
        ]
    };
    let start = |name: &'static str| {
        let flags = flags(name);
        let env = &env;
        async move {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            env.agent(&flags).await
        }
    };

    // The first replica takes the Lease, enrolls and connects; the second stands by, ready.
    let a: AgentProcess = start("replica-a").await;
    assert_eq!(holder(&env.client).await.as_deref(), Some("replica-a"));
    let b: AgentProcess = start("replica-b").await;
    let (status, body) = b.get("/readyz").await.unwrap();
    assert_eq!(status, 200, "a standby is ready to take over: {body}");
    assert!(body.contains("standby"), "{body}");
    assert_eq!(a.metric("shapeblock_leader").await, 1.0);
    assert_eq!(b.metric("shapeblock_leader").await, 0.0);
    eventually(TIMEOUT, "the leader's tunnel is connected", || async {
        hub.store().cluster(&cluster).await.ok()??.connected.then_some(())
    })
    .await;
    let epoch_a = hub.session_epoch(&cluster).expect("a session");

    let p1 = unique_name("lead");
    let seq1 = hub.apply(&cluster, &project(&p1)).await.unwrap();
    eventually(TIMEOUT, "the hub sees the first Project Ready", || async {
        project_ready(&hub, &cluster, &p1).await
    })
    .await;
    // The standby neither reconciles nor dials the hub.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        b.metric("shapeblock_reconciles_total{kind=\"Project\"}").await,
        0.0
    );
    assert_eq!(
        hub.session_epoch(&cluster),
        Some(epoch_a),
        "only one session so far"
    );

    // SIGKILL: no release. The standby waits out the lease, then leads, connects with the
    // identity the first replica stored (the token is spent) and reconciles.
    a.kill();
    let killed = Instant::now();
    let (_, handover) = eventually(TIMEOUT, "the standby takes the lease", || async {
        (holder(&env.client).await.as_deref() == Some("replica-b")).then_some(())
    })
    .await;
    eprintln!("hand-over after SIGKILL: {handover:?} (lease {LEASE_SECONDS}s, retry 1s)");
    assert!(
        handover <= Duration::from_secs(LEASE_SECONDS + 2),
        "took {handover:?} with a {LEASE_SECONDS}s lease"
    );
    eventually(TIMEOUT, "the new leader's tunnel is connected", || async {
        let epoch = hub.session_epoch(&cluster)?;
        (epoch > epoch_a && hub.store().cluster(&cluster).await.ok()??.connected).then_some(())
    })
    .await;
    eprintln!(
        "new leader connected to the hub {:?} after the kill",
        killed.elapsed()
    );
    let p2 = unique_name("lead");
    let seq2 = hub.apply(&cluster, &project(&p2)).await.unwrap();
    eventually(TIMEOUT, "the hub sees the second Project Ready", || async {
        project_ready(&hub, &cluster, &p2).await
    })
    .await;
    assert_eq!(b.metric("shapeblock_leader").await, 1.0);

    // A graceful shutdown releases the lease: a third replica leads within a retry period or
    // two, not a lease duration.
    let c: AgentProcess = start("replica-c").await;
    assert_eq!(holder(&env.client).await.as_deref(), Some("replica-b"));
    b.terminate(Duration::from_secs(15))
        .expect("the leader stops on SIGTERM");
    let (_, graceful) = eventually(TIMEOUT, "the third replica takes the released lease", || async {
        (holder(&env.client).await.as_deref() == Some("replica-c")).then_some(())
    })
    .await;
    eprintln!("hand-over after SIGTERM (lease released): {graceful:?}");
    assert!(graceful < Duration::from_secs(LEASE_SECONDS), "took {graceful:?}");
    let p3 = unique_name("lead");
    let seq3 = hub.apply(&cluster, &project(&p3)).await.unwrap();
    eventually(TIMEOUT, "the hub sees the third Project Ready", || async {
        project_ready(&hub, &cluster, &p3).await
    })
    .await;

    // Nothing twice: one result per command, each Project Ready once at the hub, and Ready
    // Events only from the replica that led at the time.
    let commands = hub.store().commands(&cluster).await.unwrap();
    assert_eq!(
        commands.iter().map(|c| (c.seq, c.done)).collect::<Vec<_>>(),
        vec![(seq1, true), (seq2, true), (seq3, true)]
    );
    let events = hub.store().events(&cluster).await.unwrap();
    let results = events.iter().filter(|e| e.1 == "result").count();
    assert_eq!(results, 3, "one result per command: {events:#?}");
    for (p, replica) in [(&p1, "replica-a"), (&p2, "replica-b"), (&p3, "replica-c")] {
        let at_hub = hub::times_recorded_ready(&events, p);
        assert_eq!(at_hub, 1, "{p} Ready recorded once at the hub: {events:#?}");
        // Only the leader of the time reported it. (Not "exactly once": the Project controller
        // can publish Ready twice when two reconciles race on a stale cache, with one replica.)
        let reporters = ready_events(&env.client, p).await;
        assert!(
            !reporters.is_empty() && reporters.iter().all(|r| r == replica),
            "{p}: {reporters:?}"
        );
    }
    c.terminate(Duration::from_secs(15)).expect("stops on SIGTERM");
    hub.stop().await;
}

#[tokio::test]
async fn a_leader_that_finds_its_lease_taken_stops_at_once() {
    let env = env().await;
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), AGENT_NS);
    let _ = leases.delete("shapeblock-agent", &Default::default()).await;
    let mut agent = env
        .agent(&[
            "--leader-elect",
            "--instance=replica-x",
            "--lease-duration-seconds=4",
            "--renew-deadline-seconds=3",
            "--retry-period-seconds=1",
        ])
        .await;
    assert_eq!(holder(&env.client).await.as_deref(), Some("replica-x"));

    // Someone else holds it now (as after a partition during which it expired and was taken).
    let mut lease = leases.get("shapeblock-agent").await.unwrap();
    let spec = lease.spec.as_mut().unwrap();
    spec.holder_identity = Some("replica-elsewhere".into());
    spec.renew_time = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::now(),
    ));
    leases
        .replace("shapeblock-agent", &Default::default(), &lease)
        .await
        .unwrap();
    let status = agent
        .wait_exit(Duration::from_secs(5))
        .expect("the former leader exits within a retry period or two");
    assert!(!status.success(), "a lost lease is an error: {status}");
    assert!(
        agent.log_tail(20).contains("lost the lease"),
        "{}",
        agent.log_tail(20)
    );
    // It did not release (or overwrite) the lease it no longer holds.
    assert_eq!(holder(&env.client).await.as_deref(), Some("replica-elsewhere"));
}
