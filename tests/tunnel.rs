//! The tunnel with real parts: the reference hub on loopback with its own CA and SQLite store,
//! real mTLS, and (for the end-to-end tests) the real `shapeblock-agent` binary under its own
//! ServiceAccount against the real apiserver.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::api::Api;
use kube::{Client, ResourceExt};
use shapeblock_agent::api::Project;
use shapeblock_agent::hub::{Hub, HubConfig};
use shapeblock_agent::proto::v1::agent_message::Body as Up;
use shapeblock_agent::proto::v1::agent_tunnel_client::AgentTunnelClient;
use shapeblock_agent::proto::v1::server_message::Body as Down;
use shapeblock_agent::proto::v1::{AgentMessage, Hello, ObjectRef, ServerMessage};
use shapeblock_agent::testenv::{self, agent::AgentProcess};
use shapeblock_agent::tunnel::{Identity, TunnelError, enroll};
use support::{eventually, unique_name};
use tokio::sync::{Mutex, MutexGuard};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

static SERIAL: Mutex<()> = Mutex::const_new(());
const AGENT_NS: &str = "shapeblock";
const TIMEOUT: Duration = Duration::from_secs(45);

fn provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn hub(dir: &Path) -> Hub {
    provider();
    let mut config = HubConfig::new(dir.to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    Hub::start(config).await.expect("start the hub")
}

async fn hub_at(dir: &Path, addr: std::net::SocketAddr) -> Hub {
    let mut config = HubConfig::new(dir.to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    config.listen = addr;
    // The old listener's port may take a moment to be free again.
    for _ in 0..50 {
        match Hub::start(config.clone()).await {
            Ok(hub) => return hub,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("cannot restart the hub on {addr}");
}

async fn enroll_new(hub: &Hub, cluster: &str) -> Identity {
    let token = hub.create_token(cluster, Duration::from_secs(60)).unwrap();
    let key = enroll::new_key().unwrap();
    enroll::enroll(&hub.url(), &token, &hub.ca_hash(), &key)
        .await
        .expect("enroll")
}

fn status_message(e: TunnelError) -> String {
    e.to_string()
}

#[tokio::test]
async fn enrollment_errors_are_distinct_and_a_retry_with_the_same_key_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path()).await;
    let (url, pin) = (hub.url(), hub.ca_hash());

    let token = hub.create_token("alpha", Duration::from_secs(60)).unwrap();
    let key = enroll::new_key().unwrap();
    let first = enroll::enroll(&url, &token, &pin, &key)
        .await
        .expect("first enrollment");
    assert_eq!(first.cluster_id, "alpha");
    assert!(first.cert_pem.contains("BEGIN CERTIFICATE"));
    assert!(
        !first.cert_pem.contains("PRIVATE KEY"),
        "the hub never sees or returns a key"
    );
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(first.cert_pem.as_bytes()).unwrap();
    assert_eq!(
        shapeblock_agent::proto::cluster_of_certificate(&der).as_deref(),
        Some("alpha")
    );

    // An agent that crashed after the hub signed retries with the same key: same certificate.
    let again = enroll::enroll(&url, &token, &pin, &key)
        .await
        .expect("retry with the same key");
    assert_eq!(again.cert_pem, first.cert_pem);

    // The same token with another key: used.
    let other = enroll::new_key().unwrap();
    let used = status_message(enroll::enroll(&url, &token, &pin, &other).await.unwrap_err());
    assert!(used.contains("already used"), "{used}");

    // Garbage.
    let unknown = status_message(
        enroll::enroll(&url, "sbt_garbage", &pin, &other)
            .await
            .unwrap_err(),
    );
    assert!(unknown.contains("unknown enrollment token"), "{unknown}");

    // Expired.
    let short = hub.create_token("beta", Duration::from_secs(1)).unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = status_message(enroll::enroll(&url, &short, &pin, &other).await.unwrap_err());
    assert!(expired.contains("expired"), "{expired}");

    // Wrong CA hash: refused in the handshake, before the token is sent; the token still works.
    let fresh = hub.create_token("gamma", Duration::from_secs(60)).unwrap();
    let wrong = format!("sha256:{}", "0".repeat(64));
    let err = enroll::enroll(&url, &fresh, &wrong, &other).await.unwrap_err();
    assert!(matches!(err, TunnelError::CaMismatch(_)), "{err}");
    assert!(
        err.to_string().contains("does not match the pinned hash"),
        "{err}"
    );
    let ok = enroll::enroll(&url, &fresh, &pin, &other)
        .await
        .expect("token unused by the refused attempt");
    assert_eq!(ok.cluster_id, "gamma");

    // Only token hashes are stored.
    let db = std::fs::read(dir.path().join("hub.sqlite")).unwrap();
    let needle = fresh.as_bytes();
    assert!(
        !db.windows(needle.len()).any(|w| w == needle),
        "a token is stored in clear"
    );
    hub.stop().await;
}

async fn channel(hub_url: &str, ca_pem: &str, identity: Option<&Identity>) -> tonic::transport::Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("127.0.0.1");
    if let Some(id) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(&id.cert_pem, &id.key_pem));
    }
    Endpoint::from_shared(hub_url.to_string())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn hello() -> AgentMessage {
    AgentMessage {
        seq: 0,
        body: Some(Up::Hello(Hello {
            agent_version: "test".into(),
            ..Default::default()
        })),
    }
}

async fn open(
    channel: tonic::transport::Channel,
) -> Result<
    (
        tokio::sync::mpsc::Sender<AgentMessage>,
        tonic::Streaming<ServerMessage>,
    ),
    tonic::Status,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.send(hello()).await.unwrap();
    let down = AgentTunnelClient::new(channel)
        .tunnel(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, down))
}

#[tokio::test]
async fn sessions_need_a_certificate_identity_comes_from_it_and_a_newer_session_closes_the_older() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path()).await;
    let a = enroll_new(&hub, "cluster-a").await;
    let b = enroll_new(&hub, "cluster-b").await;

    // No client certificate: refused.
    let err = match open(channel(&hub.url(), &a.ca_pem, None).await).await {
        Ok((_, mut down)) => down.message().await.unwrap_err(),
        Err(status) => status,
    };
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(
        err.message().contains("client certificate is required"),
        "{}",
        err.message()
    );

    // A's certificate makes a session of A, whatever the messages say; B's commands never
    // reach it.
    let seq_b = hub
        .delete(
            "cluster-b",
            ObjectRef {
                kind: "Project".into(),
                namespace: String::new(),
                name: "for-b".into(),
            },
        )
        .unwrap();
    let seq_a = hub
        .delete(
            "cluster-a",
            ObjectRef {
                kind: "Project".into(),
                namespace: String::new(),
                name: "for-a".into(),
            },
        )
        .unwrap();
    let (_up_a, mut down_a) = open(channel(&hub.url(), &a.ca_pem, Some(&a)).await)
        .await
        .unwrap();
    let first = down_a.message().await.unwrap().unwrap();
    let Some(Down::HelloAck(ack)) = first.body else {
        panic!("expected hello ack, got {first:?}")
    };
    let epoch_1 = ack.epoch;
    let command = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let m = down_a.message().await.unwrap().unwrap();
            if m.seq > 0 {
                return m;
            }
        }
    })
    .await
    .expect("A gets its command");
    assert_eq!(command.seq, seq_a);
    let Some(Down::Delete(d)) = command.body else {
        panic!("{command:?}")
    };
    assert_eq!(
        d.object.unwrap().name,
        "for-a",
        "A only sees A's commands (B's was seq {seq_b})"
    );
    assert_eq!(hub.session_epoch("cluster-a"), Some(epoch_1));
    assert_eq!(hub.session_epoch("cluster-b"), None);
    drop(b);

    // A second session of A: the first is closed with a clear reason; the epoch moves on.
    let (_up_a2, mut down_a2) = open(channel(&hub.url(), &a.ca_pem, Some(&a)).await)
        .await
        .unwrap();
    let Some(Down::HelloAck(ack2)) = down_a2.message().await.unwrap().unwrap().body else {
        panic!()
    };
    assert!(ack2.epoch > epoch_1);
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match down_a.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    })
    .await
    .expect("the older session ends");
    let status = closed.expect("closed with a status");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status:?}");
    assert!(status.message().contains("superseded"), "{}", status.message());
    assert_eq!(hub.session_epoch("cluster-a"), Some(ack2.epoch));
    hub.stop().await;
}

// ---- end to end with the real agent against the real apiserver ----

struct Env {
    client: Client,
    kubeconfig: PathBuf,
    dir: PathBuf,
    _serial: MutexGuard<'static, ()>,
}

async fn env() -> Env {
    let serial = SERIAL.lock().await;
    let plane = testenv::shared().unwrap_or_else(|e| panic!("{e}"));
    let client = plane.client().await.unwrap();
    let kubeconfig =
        testenv::agent::install_agent_identity(&client, &plane.kubeconfig, AGENT_NS, &plane.work_dir)
            .await
            .expect("install the agent's ServiceAccount and RBAC");
    // A previous test's identity would belong to another hub.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), AGENT_NS);
    let _ = secrets
        .delete("shapeblock-agent-identity", &Default::default())
        .await;
    Env {
        client,
        kubeconfig,
        dir: plane.work_dir.clone(),
        _serial: serial,
    }
}

impl Env {
    async fn agent(&self, hub_url: &str, token: &str, pin: &str) -> AgentProcess {
        let log = self.dir.join(format!("{}.log", unique_name("tunnel-agent")));
        let args = [
            "--log=shapeblock_agent=debug,info".to_string(),
            format!("--hub-address={hub_url}"),
            format!("--enroll-token={token}"),
            format!("--ca-hash={pin}"),
            "--heartbeat-seconds=2".to_string(),
            "--reconnect-max-seconds=2".to_string(),
            // No registry credentials to copy: Projects become Ready on their own.
            "--registry-secret=".to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        AgentProcess::start(
            Path::new(env!("CARGO_BIN_EXE_shapeblock-agent")),
            &self.kubeconfig,
            AGENT_NS,
            &log,
            &args,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }
}

fn project(name: &str) -> String {
    format!(
        "apiVersion: apps.shapeblock.io/v1alpha1\nkind: Project\nmetadata:\n  name: {name}\nspec:\n  displayName: {name}\n"
    )
}

async fn phase_at_hub(hub: &Hub, cluster: &str, key: &str) -> Option<String> {
    hub.store()
        .objects(cluster)
        .ok()?
        .into_iter()
        .find(|o| o.key == key)
        .map(|o| o.phase)
}

async fn result_of(hub: &Hub, cluster: &str, seq: u64) -> Option<(bool, String)> {
    let row = hub
        .store()
        .commands(cluster)
        .ok()?
        .into_iter()
        .find(|c| c.seq == seq)?;
    row.done
        .then(|| (row.ok.unwrap_or(false), row.message.unwrap_or_default()))
}

#[tokio::test]
async fn commands_become_resources_status_comes_back_and_nothing_is_lost_across_restarts() {
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let mut hub = hub(data.path()).await;
    let cluster = unique_name("c");
    let token = hub.create_token(&cluster, Duration::from_secs(300)).unwrap();
    let (url, pin) = (hub.url(), hub.ca_hash());
    let agent = env.agent(&url, &token, &pin).await;
    let projects: Api<Project> = Api::all(env.client.clone());

    // Apply a Project through the hub: the CR exists, the agent's controllers make it Ready,
    // the phase comes back and the hub records it.
    let p1 = unique_name("tun");
    let seq = hub.apply(&cluster, &project(&p1)).unwrap();
    eventually(TIMEOUT, "the Project exists", || async {
        projects.get_opt(&p1).await.ok().flatten()
    })
    .await;
    let created = projects.get(&p1).await.unwrap();
    assert_eq!(
        created
            .labels()
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("shapeblock-agent")
    );
    let (ok, message) = eventually(TIMEOUT, "the result is recorded", || {
        result_of(&hub, &cluster, seq)
    })
    .await
    .0;
    assert!(ok, "{message}");
    let key = format!("Project//{p1}");
    eventually(TIMEOUT, "the hub sees the Project Ready", || async {
        (phase_at_hub(&hub, &cluster, &key).await.as_deref() == Some("Ready")).then_some(())
    })
    .await;
    let row = hub.store().cluster(&cluster).unwrap().unwrap();
    assert!(row.connected);
    let hello = row.hello.unwrap_or_default();
    assert!(hello.contains("node_count: 2"), "inventory in hello: {hello}");
    assert!(
        hello.contains("kubernetes_version: \"v1.35"),
        "inventory in hello: {hello}"
    );

    // The identity is in the agent's Secret; the key never went to the hub.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(env.client.clone(), AGENT_NS);
    let secret = secrets
        .get("shapeblock-agent-identity")
        .await
        .expect("identity Secret");
    let data_keys: Vec<String> = secret.data.unwrap_or_default().keys().cloned().collect();
    assert!(
        data_keys.contains(&"tls.key".to_string()) && data_keys.contains(&"tls.crt".to_string()),
        "{data_keys:?}"
    );

    // Rejections carry the apiserver's own words; unknown kinds and garbage are refused too;
    // the session survives all of them.
    let bad = format!(
        "apiVersion: apps.shapeblock.io/v1alpha1\nkind: Project\nmetadata:\n  name: {}\nspec: {{}}\n",
        "Not_A_Name"
    );
    let bad_seq = hub.apply(&cluster, &bad).unwrap();
    let unknown_seq = hub
        .apply(
            &cluster,
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n",
        )
        .unwrap();
    let garbage_seq = hub.queue(&cluster, Vec::new()).unwrap_or(0);
    let (ok, message) = eventually(TIMEOUT, "the invalid Project is refused", || {
        result_of(&hub, &cluster, bad_seq)
    })
    .await
    .0;
    assert!(!ok);
    assert!(
        message.contains("Not_A_Name") || message.contains("Invalid") || message.contains("invalid"),
        "{message}"
    );
    let (ok, message) = eventually(TIMEOUT, "the unknown kind is refused", || {
        result_of(&hub, &cluster, unknown_seq)
    })
    .await
    .0;
    assert!(!ok && message.contains("unknown kind"), "{message}");
    if garbage_seq > 0 {
        let (ok, message) = eventually(TIMEOUT, "the empty command is refused", || {
            result_of(&hub, &cluster, garbage_seq)
        })
        .await
        .0;
        assert!(!ok && message.contains("unknown command"), "{message}");
    }

    // Hub restart: stop it, queue a command while it is down (as the CLI does, into the
    // store), start it again from its store on the same address: the agent reconnects, the
    // command is applied, nothing is recorded twice.
    let addr = hub.address();
    hub.stop().await;
    let p2 = unique_name("tun");
    let seq2 = {
        let store = shapeblock_agent::hub::open_store(data.path()).unwrap();
        store
            .add_command(
                &cluster,
                &shapeblock_agent::hub::apply_command(&project(&p2)).unwrap(),
            )
            .unwrap()
    };
    hub = hub_at(data.path(), addr).await;
    assert_eq!(hub.ca_hash(), pin, "the CA is persisted");
    eventually(
        TIMEOUT,
        "the Project queued while the hub was down exists",
        || async { projects.get_opt(&p2).await.ok().flatten() },
    )
    .await;
    eventually(TIMEOUT, "its result is recorded", || {
        result_of(&hub, &cluster, seq2)
    })
    .await;
    let key2 = format!("Project//{p2}");
    eventually(TIMEOUT, "the hub sees it Ready", || async {
        (phase_at_hub(&hub, &cluster, &key2).await.as_deref() == Some("Ready")).then_some(())
    })
    .await;

    // Agent killed (no shutdown at all), a command queued meanwhile, agent started again
    // (its token is spent: it must use its stored identity).
    agent.kill();
    let p3 = unique_name("tun");
    let seq3 = hub.apply(&cluster, &project(&p3)).unwrap();
    let agent = env.agent(&url, "sbt_spent", &pin).await;
    eventually(
        TIMEOUT,
        "the Project queued while the agent was down exists",
        || async { projects.get_opt(&p3).await.ok().flatten() },
    )
    .await;
    eventually(TIMEOUT, "its result is recorded", || {
        result_of(&hub, &cluster, seq3)
    })
    .await;
    let key3 = format!("Project//{p3}");
    eventually(TIMEOUT, "the hub sees it Ready", || async {
        (phase_at_hub(&hub, &cluster, &key3).await.as_deref() == Some("Ready")).then_some(())
    })
    .await;

    // Nothing lost, nothing twice: every command has exactly one recorded result, and no
    // Project reached Ready twice in the hub's events.
    let commands = hub.store().commands(&cluster).unwrap();
    assert!(
        commands.iter().all(|c| c.done),
        "unanswered: {:?}",
        commands
            .iter()
            .filter(|c| !c.done)
            .map(|c| c.seq)
            .collect::<Vec<_>>()
    );
    let events = hub.store().events(&cluster).unwrap();
    let results = events.iter().filter(|e| e.1 == "result").count();
    assert_eq!(
        results,
        commands.len(),
        "one result event per command: {events:#?}"
    );
    for p in [&p1, &p2, &p3] {
        let ready = events
            .iter()
            .filter(|e| {
                (e.1 == "phase" && e.2 == format!("Project//{p}") && e.3 == "Ready")
                    || (e.1 == "snapshot" && e.3.contains(&format!("Project//{p}=Ready")))
            })
            .count();
        assert_eq!(ready, 1, "{p} Ready recorded once: {events:#?}");
    }

    // Delete through the hub: the Project goes, the hub hears of it.
    let del = hub
        .delete(
            &cluster,
            ObjectRef {
                kind: "Project".into(),
                namespace: String::new(),
                name: p1.clone(),
            },
        )
        .unwrap();
    eventually(TIMEOUT, "the delete is answered", || {
        result_of(&hub, &cluster, del)
    })
    .await;
    eventually(TIMEOUT, "the hub sees the Project deleted", || async {
        (phase_at_hub(&hub, &cluster, &key).await.as_deref() == Some("Deleted")).then_some(())
    })
    .await;

    agent
        .terminate(Duration::from_secs(15))
        .expect("agent stops on SIGTERM");
    eventually(TIMEOUT, "the hub marks the cluster disconnected", || async {
        (!hub.store().cluster(&cluster).ok()??.connected).then_some(())
    })
    .await;
    hub.stop().await;
}

#[tokio::test]
async fn a_backing_service_applied_through_the_hub_reports_ready_upstream_and_goes_on_delete() {
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let hub = hub(data.path()).await;
    let cluster = unique_name("c");
    let token = hub.create_token(&cluster, Duration::from_secs(300)).unwrap();
    let agent = env.agent(&hub.url(), &token, &hub.ca_hash()).await;
    let project_name = unique_name("tunsvc");
    hub.apply(&cluster, &project(&project_name)).unwrap();
    let project_key = format!("Project//{project_name}");
    eventually(TIMEOUT, "the hub sees the Project Ready", || async {
        (phase_at_hub(&hub, &cluster, &project_key).await.as_deref() == Some("Ready")).then_some(())
    })
    .await;
    // The simulated cluster has no storage provisioner: a volume for the service's claim.
    let volume: k8s_openapi::api::core::v1::PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("{project_name}-cache")},
        "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                 "hostPath": {"path": "/tmp/shapeblock-test/tunnel"},
                 "claimRef": {"namespace": project_name, "name": "data-cache-redis-0"}},
    }))
    .unwrap();
    Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(env.client.clone())
        .create(&Default::default(), &volume)
        .await
        .unwrap();
    let manifest = format!(
        "apiVersion: apps.shapeblock.io/v1alpha1\nkind: BackingService\nmetadata:\n  name: cache\n  namespace: {project_name}\nspec:\n  type: redis\n  deletionPolicy: Delete\n"
    );
    let seq = hub.apply(&cluster, &manifest).unwrap();
    let (ok, message) = eventually(TIMEOUT, "the apply is answered", || {
        result_of(&hub, &cluster, seq)
    })
    .await
    .0;
    assert!(ok, "{message}");
    let key = format!("BackingService/{project_name}/cache");
    eventually(
        Duration::from_secs(120),
        "the hub sees the BackingService Ready",
        || async { (phase_at_hub(&hub, &cluster, &key).await.as_deref() == Some("Ready")).then_some(()) },
    )
    .await;
    let delete = hub
        .delete(
            &cluster,
            ObjectRef {
                kind: "BackingService".into(),
                namespace: project_name.clone(),
                name: "cache".into(),
            },
        )
        .unwrap();
    eventually(TIMEOUT, "the delete is answered", || {
        result_of(&hub, &cluster, delete)
    })
    .await;
    eventually(
        Duration::from_secs(120),
        "the hub sees the BackingService deleted",
        || async { (phase_at_hub(&hub, &cluster, &key).await.as_deref() == Some("Deleted")).then_some(()) },
    )
    .await;
    agent
        .terminate(Duration::from_secs(15))
        .expect("agent stops on SIGTERM");
    hub.stop().await;
}
