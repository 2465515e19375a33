//! The tunnel with real parts: the reference hub on loopback with its own CA and SQLite store,
//! real mTLS, and (for the end-to-end tests) the real `shapeblock-agent` binary under its own
//! ServiceAccount against the real apiserver.

mod support;

use std::path::Path;
use std::time::Duration;

use kube::api::Api;
use kube::{Client, ResourceExt};
use shapeblock_agent::api::Project;
use shapeblock_agent::proto::v1::agent_message::Body as Up;
use shapeblock_agent::proto::v1::agent_tunnel_client::AgentTunnelClient;
use shapeblock_agent::proto::v1::server_message::Body as Down;
use shapeblock_agent::proto::v1::{AgentMessage, Hello, ObjectRef, ServerMessage};
use shapeblock_agent::tunnel::{Identity, TunnelError, enroll};
use shapeblock_hub::{Hub, HubConfig, Prune};
use shapeblock_testenv::agent::AgentProcess;
use support::agent::{AGENT_NS, Env, hub_env as env};
use support::hub::result_of;
use support::{eventually, unique_name};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const TIMEOUT: Duration = Duration::from_secs(45);

fn provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

async fn hub(dir: &Path) -> Hub {
    provider();
    let mut config = HubConfig::new(dir.to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    config.database_url = support::hub::database_for_tests(dir);
    Hub::start(config).await.expect("start the hub")
}

async fn hub_at(dir: &Path, addr: std::net::SocketAddr) -> Hub {
    let mut config = HubConfig::new(dir.to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    config.database_url = support::hub::database_for_tests(dir);
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
    let token = hub.create_token(cluster, Duration::from_secs(60)).await.unwrap();
    let key = enroll::new_key().unwrap();
    enroll::enroll(&hub.url(), &token, &hub.ca_hash(), &key)
        .await
        .expect("enroll")
}

fn status_message(e: TunnelError) -> String {
    e.to_string()
}

/// A command as queued without the hub's checks (what a faulty or older hub could send).
fn raw(body: Down) -> Vec<u8> {
    use prost::Message;
    ServerMessage {
        seq: 0,
        body: Some(body),
    }
    .encode_to_vec()
}

fn raw_apply(manifest: &str) -> Vec<u8> {
    raw(Down::Apply(shapeblock_agent::proto::v1::Apply {
        manifest: manifest.into(),
    }))
}

#[tokio::test]
async fn enrollment_errors_are_distinct_and_a_retry_with_the_same_key_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path()).await;
    let (url, pin) = (hub.url(), hub.ca_hash());

    let token = hub.create_token("alpha", Duration::from_secs(60)).await.unwrap();
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
    let short = hub.create_token("beta", Duration::from_secs(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = status_message(enroll::enroll(&url, &short, &pin, &other).await.unwrap_err());
    assert!(expired.contains("expired"), "{expired}");

    // Wrong CA hash: refused in the handshake, before the token is sent; the token still works.
    let fresh = hub.create_token("gamma", Duration::from_secs(60)).await.unwrap();
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
    let db = match support::hub::database_for_tests(dir.path()) {
        Some(url) => shapeblock_testenv::postgres::Postgres::shared()
            .unwrap()
            .psql(&url, "SELECT * FROM tokens")
            .unwrap()
            .into_bytes(),
        None => std::fs::read(dir.path().join("hub.sqlite")).unwrap(),
    };
    assert!(!db.is_empty(), "the store was read");
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
        .await
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
        .await
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

impl Env {
    async fn hub_agent(&self, hub_url: &str, token: &str, pin: &str) -> AgentProcess {
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
            // The cluster registry the Apps' builds push to (with a token each).
            "--registry=registry.example.com".to_string(),
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
        .await
        .ok()?
        .into_iter()
        .find(|o| o.key == key)
        .map(|o| o.phase)
}

#[tokio::test]
async fn commands_become_resources_status_comes_back_and_nothing_is_lost_across_restarts() {
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let mut hub = hub(data.path()).await;
    let cluster = unique_name("c");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let (url, pin) = (hub.url(), hub.ca_hash());
    let agent = env.hub_agent(&url, &token, &pin).await;
    let projects: Api<Project> = Api::all(env.client.clone());

    // Apply a Project through the hub: the CR exists, the agent's controllers make it Ready,
    // the phase comes back and the hub records it.
    let p1 = unique_name("tun");
    let seq = hub.apply(&cluster, &project(&p1)).await.unwrap();
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
    let row = hub.store().cluster(&cluster).await.unwrap().unwrap();
    assert!(row.connected);
    let inventory = row.inventory.clone().expect("the inventory, as fields");
    assert_eq!(inventory.node_count, 2, "{row:?}");
    assert!(inventory.kubernetes_version.starts_with("v1.35"), "{row:?}");

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
    // The hub refuses both; an agent checks them as well.
    let unknown = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n";
    assert!(hub.apply(&cluster, &bad).await.is_err() && hub.apply(&cluster, unknown).await.is_err());
    let bad_seq = hub.queue(&cluster, raw_apply(&bad)).await.unwrap();
    let unknown_seq = hub.queue(&cluster, raw_apply(unknown)).await.unwrap();
    let garbage_seq = hub.queue(&cluster, Vec::new()).await.unwrap_or(0);
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
        let database = support::hub::database_for_tests(data.path());
        let location = shapeblock_hub::store_location(data.path(), database.as_deref(), 2);
        let store = shapeblock_hub::open_store_at(&location).await.unwrap();
        store
            .add_command(&cluster, &shapeblock_hub::apply_command(&project(&p2)).unwrap())
            .await
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
    let seq3 = hub.apply(&cluster, &project(&p3)).await.unwrap();
    let agent = env.hub_agent(&url, "sbt_spent", &pin).await;
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
    let commands = hub.store().commands(&cluster).await.unwrap();
    assert!(
        commands.iter().all(|c| c.done),
        "unanswered: {:?}",
        commands
            .iter()
            .filter(|c| !c.done)
            .map(|c| c.seq)
            .collect::<Vec<_>>()
    );
    let events = hub.store().events(&cluster).await.unwrap();
    let results = events.iter().filter(|e| e.1 == "result").count();
    assert_eq!(
        results,
        commands.len(),
        "one result event per command: {events:#?}"
    );
    for p in [&p1, &p2, &p3] {
        let ready = support::hub::times_recorded_ready(&events, p);
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
        .await
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
        (!hub.store().cluster(&cluster).await.ok()??.connected).then_some(())
    })
    .await;
    hub.stop().await;
}

// ---- build logs ----

fn manifest(kind: &str, namespace: &str, name: &str, spec: serde_json::Value) -> String {
    serde_json::json!({
        "apiVersion": "apps.shapeblock.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    })
    .to_string()
}

async fn build_pod(client: &Client, namespace: &str, job: &str) -> String {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    eventually(TIMEOUT, &format!("the pod of Job {job}"), || async {
        let list = pods
            .list(&kube::api::ListParams::default().labels(&format!("job-name={job}")))
            .await
            .ok()?;
        list.items.first().map(|p| p.name_any())
    })
    .await
    .0
}

async fn build_container_running(client: &Client, namespace: &str, pod: &str) {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), namespace);
    eventually(TIMEOUT, "the build container running", || async {
        let statuses = pods.get(pod).await.ok()?.status?.container_statuses?;
        statuses
            .iter()
            .find(|s| s.name == "build")?
            .state
            .as_ref()?
            .running
            .as_ref()?;
        Some(())
    })
    .await;
}

async fn hub_log(hub: &Hub, cluster: &str, stream: &str) -> (Vec<u8>, bool, bool) {
    hub.store().log(cluster, stream).await.unwrap()
}

/// A build's logs go to the hub through a hub restart and an agent restart (killed) while
/// the build runs and writes: every byte exactly once, in order, credentials scrubbed; its
/// Jobs are kept until the hub has the logs, then deleted. A cancelled build's log ends with
/// an explicit truncation marker.
#[tokio::test]
async fn build_logs_reach_the_hub_once_through_restarts_and_jobs_wait_for_them() {
    use shapeblock_agent::api::{AppBuild, AppBuildPhase};
    use shapeblock_testenv::{ContainerRef, PodOutcome, PodSelector, logs, set_pod_outcome};
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let mut hub = hub(data.path()).await;
    let cluster = unique_name("c");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let (url, pin) = (hub.url(), hub.ca_hash());
    let mut agent = env.hub_agent(&url, &token, &pin).await;

    let ns = unique_name("logs");
    hub.apply(&cluster, &project(&ns)).await.unwrap();
    let projects: Api<Project> = Api::all(env.client.clone());
    eventually(TIMEOUT, "the Project Ready", || async {
        let p = projects.get_opt(&ns).await.ok()??;
        (p.status?.phase? == shapeblock_agent::api::ProjectPhase::Ready).then_some(())
    })
    .await;
    let commit = "0123456789abcdef0123456789abcdef01234567";
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&ns, "resolve"),
        &PodOutcome::Succeed {
            after: Duration::from_millis(300),
            message: Some(commit.into()),
        },
    )
    .await
    .unwrap();
    // Long enough for a hub restart and an agent restart while it writes.
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&ns, "build"),
        &PodOutcome::Succeed {
            after: Duration::from_secs(25),
            message: Some(format!("sha256:{}", "ab".repeat(32))),
        },
    )
    .await
    .unwrap();
    logs().script(&ns, "resolve", &["resolving main", "resolved to 0123456"]);
    logs().script(
        &ns,
        "clone",
        &[
            "Cloning into '/workspace/source'...",
            "fatal: retrying https://bob:hunter2hunter2@github.com/example/api.git",
            "HEAD is now at 0123456",
        ],
    );
    hub.apply(
        &cluster,
        &manifest(
            "App",
            &ns,
            "api",
            serde_json::json!({"registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}, "git": {"url": "https://github.com/example/api.git"}}),
        ),
    ).await
    .unwrap();
    hub.apply(
        &cluster,
        &manifest("AppBuild", &ns, "api-1", serde_json::json!({"appName": "api"})),
    )
    .await
    .unwrap();

    // The build container writes ~1.5 MiB in lines while the test restarts things.
    let pod = build_pod(&env.client, &ns, "api-1-build").await;
    let log = ContainerRef::new(&ns, &pod, "build");
    let writer = {
        let log = log.clone();
        let client = env.client.clone();
        let namespace = ns.clone();
        let pod = pod.clone();
        tokio::spawn(async move {
            let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client, &namespace);
            let mut expected = String::new();
            for i in 0.. {
                let terminated = pods.get(&pod).await.ok().and_then(|p| {
                    let statuses = p.status?.container_statuses?;
                    statuses
                        .iter()
                        .find(|s| s.name == "build")?
                        .state
                        .as_ref()?
                        .terminated
                        .as_ref()?;
                    Some(())
                });
                if terminated.is_some() {
                    break;
                }
                for j in 0..50 {
                    let line = format!("step {i}.{j}: {}", "x".repeat(100));
                    logs().append(&log, &line);
                    expected.push_str(&line);
                    expected.push('\n');
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            expected
        })
    };

    // Hub restart while the log streams.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let addr = hub.address();
    hub.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    hub = hub_at(data.path(), addr).await;
    // Agent killed while the log streams, then started again with its stored identity.
    tokio::time::sleep(Duration::from_secs(5)).await;
    agent.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    agent = env.hub_agent(&url, "sbt_spent", &pin).await;

    let expected = writer.await.unwrap();
    assert!(
        expected.len() > 1 << 20,
        "the writer wrote {} bytes",
        expected.len()
    );
    let stream = |c: &str| format!("{ns}/api-1/{c}");
    let (bytes, truncated, _) = eventually(
        Duration::from_secs(90),
        "the whole build log at the hub",
        || async {
            let (bytes, truncated, eof) = hub_log(&hub, &cluster, &stream("build")).await;
            (eof || truncated).then_some((bytes, truncated, eof))
        },
    )
    .await
    .0;
    assert!(!truncated);
    assert_eq!(bytes.len(), expected.len(), "no byte lost or duplicated");
    assert!(
        bytes == expected.as_bytes(),
        "the hub's log is the container's log, in order"
    );
    let (resolve, _, eof) = hub_log(&hub, &cluster, &stream("resolve")).await;
    assert!(eof);
    assert_eq!(resolve, b"resolving main\nresolved to 0123456\n");
    let (clone, _, eof) = eventually(TIMEOUT, "the clone log's end", || async {
        let log = hub_log(&hub, &cluster, &stream("clone")).await;
        log.2.then_some(log)
    })
    .await
    .0;
    assert!(eof);
    let clone = String::from_utf8(clone).unwrap();
    assert!(!clone.contains("hunter2"), "credentials scrubbed: {clone}");
    assert!(
        clone.contains("https://***@github.com/example/api.git"),
        "{clone}"
    );

    // Delivery is recorded on the AppBuild, and only then are its Jobs deleted.
    let builds: Api<AppBuild> = Api::namespaced(env.client.clone(), &ns);
    let jobs: Api<k8s_openapi::api::batch::v1::Job> = Api::namespaced(env.client.clone(), &ns);
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let logs = builds.get("api-1").await.unwrap().status.unwrap_or_default().logs;
        let complete = logs.len() == 3 && logs.iter().all(|l| l.complete && !l.truncated);
        let left: Vec<String> = jobs
            .list(&kube::api::ListParams::default().labels("apps.shapeblock.io/build=api-1"))
            .await
            .unwrap()
            .items
            .into_iter()
            .filter(|j| j.metadata.deletion_timestamp.is_none())
            .map(|j| j.name_any())
            .collect();
        if complete && left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "status.logs complete and the Jobs gone: logs {logs:?}, Jobs left {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let recorded = builds.get("api-1").await.unwrap().status.unwrap().logs;
    let build_bytes = recorded.iter().find(|l| l.container == "build").unwrap().bytes;
    assert_eq!(build_bytes, expected.len() as u64);

    // A cancelled build: what it wrote arrives, then a truncation marker (its pod is gone).
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&ns, "build"),
        &PodOutcome::Hang,
    )
    .await
    .unwrap();
    hub.apply(
        &cluster,
        // Other build inputs than api-1's, or its image would be reused without a build.
        &manifest(
            "AppBuild",
            &ns,
            "api-2",
            serde_json::json!({"appName": "api", "buildVars": [{"key": "RUN", "value": "api-2"}]}),
        ),
    )
    .await
    .unwrap();
    let pod = build_pod(&env.client, &ns, "api-2-build").await;
    let log = ContainerRef::new(&ns, &pod, "build");
    build_container_running(&env.client, &ns, &pod).await;
    logs().append(&log, "building layer 1");
    eventually(TIMEOUT, "the first line at the hub", || async {
        (hub_log(&hub, &cluster, &format!("{ns}/api-2/build")).await.0 == b"building layer 1\n").then_some(())
    })
    .await;
    hub.cancel(&cluster, &ns, "api-2").await.unwrap();
    let (bytes, truncated, eof) = eventually(TIMEOUT, "the cancelled build's log to end", || async {
        let log = hub_log(&hub, &cluster, &format!("{ns}/api-2/build")).await;
        (log.1 || log.2).then_some(log)
    })
    .await
    .0;
    // Its pod stopped and its log was read to that point: complete, not truncated.
    assert!(
        eof && !truncated && bytes == b"building layer 1\n",
        "eof {eof}, truncated {truncated}, {:?}",
        String::from_utf8_lossy(&bytes)
    );
    let cancelled = builds.get("api-2").await.unwrap();
    assert_eq!(cancelled.status.unwrap().phase, Some(AppBuildPhase::Cancelled));

    // A build pod deleted while the agent is down: its log is marked truncated where
    // delivery stopped, once the agent is back.
    hub.apply(
        &cluster,
        // Other build inputs than api-1's, or its image would be reused without a build.
        &manifest(
            "AppBuild",
            &ns,
            "api-3",
            serde_json::json!({"appName": "api", "buildVars": [{"key": "RUN", "value": "api-3"}]}),
        ),
    )
    .await
    .unwrap();
    let pod = build_pod(&env.client, &ns, "api-3-build").await;
    let log = ContainerRef::new(&ns, &pod, "build");
    let stream3 = format!("{ns}/api-3/build");
    build_container_running(&env.client, &ns, &pod).await;
    logs().append(&log, "step 1 of 9");
    eventually(TIMEOUT, "its delivery recorded on the AppBuild", || async {
        let logs = builds.get("api-3").await.ok()?.status?.logs;
        logs.iter()
            .any(|l| l.container == "build" && l.bytes > 0)
            .then_some(())
    })
    .await;
    agent.kill();
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(env.client.clone(), &ns);
    pods.delete(
        &pod,
        &kube::api::DeleteParams {
            grace_period_seconds: Some(0),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    eventually(TIMEOUT, "the pod gone", || async {
        pods.get_opt(&pod).await.ok()?.is_none().then_some(())
    })
    .await;
    let agent = env.hub_agent(&url, "sbt_spent", &pin).await;
    let (bytes, truncated, eof) = eventually(TIMEOUT, "the truncation marker", || async {
        let log = hub_log(&hub, &cluster, &stream3).await;
        (log.1 || log.2).then_some(log)
    })
    .await
    .0;
    assert!(truncated && !eof, "marked truncated, not ended");
    assert_eq!(bytes, b"step 1 of 9\n", "what was delivered stays");

    agent
        .terminate(Duration::from_secs(15))
        .expect("agent stops on SIGTERM");
    hub.stop().await;
}

// ---- liveness, renewal, hand-over, hostile input, backpressure ----

async fn ready_at_hub(hub: &Hub, cluster: &str, name: &str) {
    let key = format!("Project//{name}");
    eventually(TIMEOUT, &format!("the hub sees {name} Ready"), || async {
        (phase_at_hub(hub, cluster, &key).await.as_deref() == Some("Ready")).then_some(())
    })
    .await;
}

async fn identity_certificate(client: &Client) -> String {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), AGENT_NS);
    let secret = secrets.get("shapeblock-agent-identity").await.unwrap();
    let data = secret.data.unwrap_or_default();
    String::from_utf8(data["tls.crt"].0.clone()).unwrap()
}

/// A connection that stops carrying bytes without closing is noticed by heartbeats on both
/// sides and replaced; a certificate with a short lifetime is renewed over the channel and
/// used without restarting the agent, past the first certificate's expiry.
#[tokio::test]
async fn a_silent_cut_is_noticed_and_certificates_renew_without_a_restart() {
    use shapeblock_testenv::proxy::Proxy;
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    provider();
    let mut config = HubConfig::new(data.path().to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    config.cert_lifetime = Duration::from_secs(30);
    let hub = Hub::start(config).await.unwrap();
    let proxy = Proxy::start(hub.address()).await.unwrap();
    let cluster = unique_name("c");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let agent = env.hub_agent(&proxy.url(), &token, &hub.ca_hash()).await;
    let enrolled = std::time::Instant::now();

    let p1 = unique_name("cut");
    hub.apply(&cluster, &project(&p1)).await.unwrap();
    ready_at_hub(&hub, &cluster, &p1).await;
    let first_certificate = identity_certificate(&env.client).await;
    let epoch = hub.session_epoch(&cluster).expect("connected");

    proxy.cut_silently();
    let (_, noticed) = eventually(Duration::from_secs(30), "a new session after the cut", || async {
        hub.session_epoch(&cluster).filter(|e| *e > epoch)
    })
    .await;
    println!("silent cut replaced by a new session after {noticed:?}");
    // 3 heartbeat intervals of 2 s, plus the reconnect backoff.
    assert!(noticed < Duration::from_secs(20), "{noticed:?}");
    let p2 = unique_name("cut");
    hub.apply(&cluster, &project(&p2)).await.unwrap();
    ready_at_hub(&hub, &cluster, &p2).await;

    // Renewed at about 2/3 of 30 s, saved, and used by the same process.
    eventually(
        Duration::from_secs(40),
        "a renewed certificate in the identity Secret",
        || async { (identity_certificate(&env.client).await != first_certificate).then_some(()) },
    )
    .await;
    let expired = Duration::from_secs(32).saturating_sub(enrolled.elapsed());
    tokio::time::sleep(expired).await;
    let p3 = unique_name("renewed");
    hub.apply(&cluster, &project(&p3)).await.unwrap();
    ready_at_hub(&hub, &cluster, &p3).await;
    assert!(agent.log_tail(400).contains("client certificate renewed"));
    agent
        .terminate(Duration::from_secs(15))
        .expect("the same agent process throughout");
    hub.stop().await;
}

/// Two agents of one cluster connecting in turn (a leader hand-over): the newer session
/// closes the older, and nothing is recorded twice.
#[tokio::test]
async fn a_second_agent_of_the_cluster_takes_over_without_duplicates() {
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let hub = hub(data.path()).await;
    let cluster = unique_name("c");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let (url, pin) = (hub.url(), hub.ca_hash());
    let first = env.hub_agent(&url, &token, &pin).await;
    let p1 = unique_name("turn");
    hub.apply(&cluster, &project(&p1)).await.unwrap();
    ready_at_hub(&hub, &cluster, &p1).await;
    let epoch = hub.session_epoch(&cluster).unwrap();

    // The second shares the identity Secret (same cluster); its session supersedes.
    let second = env.hub_agent(&url, "sbt_spent", &pin).await;
    eventually(TIMEOUT, "the second agent's session", || async {
        hub.session_epoch(&cluster).filter(|e| *e > epoch)
    })
    .await;
    first.kill();
    let p2 = unique_name("turn");
    hub.apply(&cluster, &project(&p2)).await.unwrap();
    ready_at_hub(&hub, &cluster, &p2).await;

    let commands = hub.store().commands(&cluster).await.unwrap();
    assert!(commands.iter().all(|c| c.done));
    let events = hub.store().events(&cluster).await.unwrap();
    assert_eq!(
        events.iter().filter(|e| e.1 == "result").count(),
        commands.len(),
        "one result per command: {events:#?}"
    );
    for p in [&p1, &p2] {
        let ready = events
            .iter()
            .filter(|e| {
                (e.1 == "phase" && e.2 == format!("Project//{p}") && e.3 == "Ready")
                    || (e.1 == "snapshot" && e.3.contains(&format!("Project//{p}=Ready")))
            })
            .count();
        assert_eq!(ready, 1, "{p} Ready once: {events:#?}");
    }
    second.terminate(Duration::from_secs(15)).expect("stops");
    hub.stop().await;
}

/// Malformed and oversized messages end the offending session with a reason; the hub keeps
/// serving; a manifest too large to ever deliver is refused when queued.
#[tokio::test]
async fn hostile_messages_are_refused_and_the_hub_keeps_serving() {
    use shapeblock_agent::proto::v1::LogChunk;
    let dir = tempfile::tempdir().unwrap();
    let hub = hub(dir.path()).await;
    let a = enroll_new(&hub, "hostile").await;
    let session = || async {
        open(channel(&hub.url(), &a.ca_pem, Some(&a)).await)
            .await
            .unwrap()
    };
    let ends_with = |mut down: tonic::Streaming<ServerMessage>| async move {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match down.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return None,
                    Err(status) => return Some(status),
                }
            }
        })
        .await
        .expect("the session ends")
    };

    let cases: Vec<(&str, AgentMessage, tonic::Code)> = vec![
        (
            "no body",
            AgentMessage { seq: 1, body: None },
            tonic::Code::InvalidArgument,
        ),
        (
            "a sequenced message numbered 0",
            AgentMessage {
                seq: 0,
                body: Some(Up::Log(LogChunk::default())),
            },
            tonic::Code::InvalidArgument,
        ),
        ("a second hello", hello(), tonic::Code::InvalidArgument),
        (
            "5 MiB in one message",
            AgentMessage {
                seq: 1,
                body: Some(Up::Log(LogChunk {
                    data: vec![b'x'; 5 << 20],
                    ..Default::default()
                })),
            },
            tonic::Code::OutOfRange,
        ),
    ];
    for (what, message, code) in cases {
        let (up, down) = session().await;
        up.send(message).await.unwrap();
        let status = ends_with(down)
            .await
            .unwrap_or_else(|| panic!("{what}: closed without a status"));
        assert_eq!(status.code(), code, "{what}: {status:?}");
        println!("{what}: {:?} {}", status.code(), status.message());
    }
    // Still serving, with nothing recorded from those sessions.
    let (up, mut down) = session().await;
    let Some(Down::HelloAck(ack)) = down.message().await.unwrap().unwrap().body else {
        panic!("hello ack");
    };
    assert_eq!(ack.last_agent_seq, 0, "nothing hostile was recorded");
    // A chunk after a gap (what a store restored from a backup gets) is kept after a
    // marker, the gap is an event, and the session goes on.
    up.send(AgentMessage {
        seq: 1,
        body: Some(Up::Log(LogChunk {
            build: "b".into(),
            namespace: "n".into(),
            container: "c".into(),
            offset: 1000,
            data: b"x".to_vec(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Down::Ack(a)) = down.message().await.unwrap().unwrap().body {
                return a.seq;
            }
        }
    })
    .await
    .expect("an ack, not the end of the session");
    assert_eq!(acked, 1);
    let (bytes, truncated, eof) = hub.store().log("hostile", "n/b/c").await.unwrap();
    assert_eq!((bytes.as_slice(), truncated, eof), (&b"x"[..], true, false));
    assert_eq!(
        hub.store().log_end("hostile", "n/b/c").await.unwrap(),
        (1001, false)
    );
    let events = hub.store().events("hostile").await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.1 == "log-gap" && e.3.contains("bytes 0..1000 missing")),
        "{events:?}"
    );
    let huge = format!("{}\n# {}", project("huge"), "x".repeat(3 << 20));
    let refused = hub.apply("hostile", &huge).await.unwrap_err();
    assert!(refused.to_string().contains("limit"), "{refused}");
    hub.stop().await;
}

/// `Sync` converges the cluster to the hub's desired state: applies what is listed, and with
/// `prune` deletes what the agent manages and is not listed — never what it does not manage,
/// and nothing at all when a listed manifest fails.
#[tokio::test]
async fn sync_applies_the_desired_state_and_prunes_only_managed_resources() {
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let hub = hub(data.path()).await;
    let cluster = unique_name("c");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let agent = env.hub_agent(&hub.url(), &token, &hub.ca_hash()).await;
    let projects: Api<Project> = Api::all(env.client.clone());
    let [keep, drop, add, unmanaged] = ["keep", "drop", "add", "own"].map(unique_name);
    for p in [&keep, &drop] {
        hub.apply(&cluster, &project(p)).await.unwrap();
        ready_at_hub(&hub, &cluster, p).await;
    }
    let mine: Project = serde_yaml::from_str(&project(&unmanaged)).unwrap();
    projects.create(&Default::default(), &mine).await.unwrap();

    // Prune within these Projects (the unmanaged one included: the label keeps it).
    let prune = Prune::projects([&keep, &drop, &add, &unmanaged]);
    // A failing manifest in the set (queued past the hub's own check): applied what it
    // could, pruned nothing.
    let broken = project("Not_Valid");
    let seq = hub
        .queue(
            &cluster,
            raw(Down::Sync(shapeblock_agent::proto::v1::Sync {
                manifests: vec![project(&keep), project(&add), broken],
                prune: true,
                prune_scope: Some(prune.scope.clone()),
                ..Default::default()
            })),
        )
        .await
        .unwrap();
    let (ok, message) = eventually(TIMEOUT, "the first sync's result", || {
        result_of(&hub, &cluster, seq)
    })
    .await
    .0;
    assert!(!ok && message.contains("nothing was pruned"), "{message}");
    assert!(projects.get_opt(&drop).await.unwrap().is_some());

    let seq = hub
        .sync(&cluster, &[project(&keep), project(&add)], Some(prune))
        .await
        .unwrap();
    let (ok, message) = eventually(TIMEOUT, "the sync's result", || result_of(&hub, &cluster, seq))
        .await
        .0;
    assert!(ok, "{message}");
    ready_at_hub(&hub, &cluster, &add).await;
    eventually(TIMEOUT, "the unlisted managed Project deleted", || async {
        let p = projects.get_opt(&drop).await.ok()?;
        p.is_none_or(|p| p.metadata.deletion_timestamp.is_some())
            .then_some(())
    })
    .await;
    assert!(projects.get_opt(&keep).await.unwrap().is_some());
    assert!(
        projects
            .get_opt(&unmanaged)
            .await
            .unwrap()
            .is_some_and(|p| p.metadata.deletion_timestamp.is_none()),
        "a Project the agent does not manage is never pruned"
    );
    let _ = projects.delete(&unmanaged, &Default::default()).await;
    agent.terminate(Duration::from_secs(15)).expect("stops");
    hub.stop().await;
}

/// A hub that reads at most 10 MB/s and 200 MiB of build log: every byte arrives once and in
/// order, and the agent's memory stays bounded (it reads the log only as fast as the hub
/// takes it).
#[tokio::test]
async fn a_slow_hub_gets_every_byte_of_a_large_log_and_the_agent_stays_small() {
    use shapeblock_testenv::proxy::Proxy;
    use shapeblock_testenv::{PodOutcome, PodSelector, logs, set_pod_outcome};
    const LOG_BYTES: usize = 200 << 20;
    const LINE: usize = 1024;
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let hub = hub(data.path()).await;
    let proxy = Proxy::start(hub.address()).await.unwrap();
    proxy.limit_upstream(10_000_000);
    let cluster = unique_name("c");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let agent = env.hub_agent(&proxy.url(), &token, &hub.ca_hash()).await;
    let ns = unique_name("slow");
    hub.apply(&cluster, &project(&ns)).await.unwrap();
    ready_at_hub(&hub, &cluster, &ns).await;

    // The build container's whole log, chosen before its pod exists.
    let lines: Vec<String> = (0..LOG_BYTES / LINE)
        .map(|i| format!("{i:>10} {}", "y".repeat(LINE - 12)))
        .collect();
    let expected_digest = {
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        for line in &lines {
            context.update(line.as_bytes());
            context.update(b"\n");
        }
        context.finish().as_ref().to_vec()
    };
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    logs().script(&ns, "build", &refs);
    drop(refs);
    drop(lines);
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&ns, "resolve"),
        &PodOutcome::Succeed {
            after: Duration::from_millis(300),
            message: Some("0123456789abcdef0123456789abcdef01234567".into()),
        },
    )
    .await
    .unwrap();
    set_pod_outcome(
        &env.client,
        &PodSelector::container(&ns, "build"),
        &PodOutcome::Succeed {
            after: Duration::from_secs(2),
            message: Some(format!("sha256:{}", "cd".repeat(32))),
        },
    )
    .await
    .unwrap();
    hub.apply(
        &cluster,
        &manifest(
            "App",
            &ns,
            "big",
            serde_json::json!({"registry": {"url": "registry.example.com"}, "build": {"type": "dockerfile"}, "git": {"url": "https://github.com/example/big.git"}}),
        ),
    ).await
    .unwrap();
    hub.apply(
        &cluster,
        &manifest("AppBuild", &ns, "big-1", serde_json::json!({"appName": "big"})),
    )
    .await
    .unwrap();
    let stream = format!("{ns}/big-1/build");
    let started = std::time::Instant::now();
    eventually(
        Duration::from_secs(240),
        "the whole 200 MiB at the hub",
        || async { hub_log(&hub, &cluster, &stream).await.2.then_some(()) },
    )
    .await;
    let elapsed = started.elapsed();
    let (bytes, truncated, _) = hub_log(&hub, &cluster, &stream).await;
    assert!(!truncated);
    assert_eq!(bytes.len(), LOG_BYTES / LINE * LINE, "no byte lost or duplicated");
    assert_eq!(
        ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref(),
        expected_digest.as_slice(),
        "in order"
    );
    let rss = agent.peak_rss_kib();
    println!(
        "200 MiB through a 10 MB/s hub in {elapsed:?} ({:.1} MB/s at the hub; proxy carried {} MB); agent peak RSS {:.1} MiB",
        bytes.len() as f64 / elapsed.as_secs_f64() / 1e6,
        proxy.upstream_bytes() / 1_000_000,
        rss as f64 / 1024.0
    );
    assert!(rss < 64 * 1024, "agent peak RSS {rss} KiB");
    agent.terminate(Duration::from_secs(15)).expect("stops");
    hub.stop().await;
}

#[tokio::test]
async fn a_backing_service_applied_through_the_hub_reports_ready_upstream_and_goes_on_delete() {
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let hub = hub(data.path()).await;
    let cluster = unique_name("c");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let agent = env.hub_agent(&hub.url(), &token, &hub.ca_hash()).await;
    let project_name = unique_name("tunsvc");
    hub.apply(&cluster, &project(&project_name)).await.unwrap();
    ready_at_hub(&hub, &cluster, &project_name).await;
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
    let service = manifest(
        "BackingService",
        &project_name,
        "cache",
        serde_json::json!({"type": "redis", "deletionPolicy": "Delete"}),
    );
    let seq = hub.apply(&cluster, &service).await.unwrap();
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
        .await
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

// ---- certificates that outlive a hub outage, a hub view that equals the cluster, store
// identity ----

const DAY: i64 = 24 * 3600;

impl Env {
    /// [`Env::hub_agent`] with more arguments.
    async fn hub_agent_with(&self, hub_url: &str, token: &str, pin: &str, extra: &[&str]) -> AgentProcess {
        let log = self.dir.join(format!("{}.log", unique_name("tunnel-agent")));
        let mut args = vec![
            "--log=shapeblock_agent=debug,info".to_string(),
            format!("--hub-address={hub_url}"),
            format!("--enroll-token={token}"),
            format!("--ca-hash={pin}"),
            "--heartbeat-seconds=2".to_string(),
            "--reconnect-max-seconds=2".to_string(),
            "--registry-secret=".to_string(),
            "--registry=registry.example.com".to_string(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
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

    /// Puts `identity` into the agent's identity Secret, as an agent that enrolled earlier left
    /// it.
    async fn store_identity(&self, identity: &Identity) {
        use shapeblock_agent::tunnel::IdentityStore;
        shapeblock_agent::bridge::identity::SecretIdentityStore::new(
            self.client.clone(),
            AGENT_NS,
            shapeblock_agent::bridge::identity::IDENTITY_SECRET,
        )
        .save(identity)
        .await
        .unwrap();
    }

    async fn stored_identity(&self) -> Identity {
        use shapeblock_agent::tunnel::IdentityStore;
        shapeblock_agent::bridge::identity::SecretIdentityStore::new(
            self.client.clone(),
            AGENT_NS,
            shapeblock_agent::bridge::identity::IDENTITY_SECRET,
        )
        .load()
        .await
        .unwrap()
        .expect("an identity Secret")
    }
}

/// A hub whose CA signs as if it were `offset_secs` from now, on `addr` (0: any port).
async fn hub_with_clock(dir: &Path, addr: Option<std::net::SocketAddr>, offset_secs: i64) -> Hub {
    provider();
    let mut config = HubConfig::new(dir.to_path_buf());
    config.heartbeat = Duration::from_secs(2);
    config.database_url = support::hub::database_for_tests(dir);
    config.ca_clock_offset_secs = offset_secs;
    if let Some(addr) = addr {
        config.listen = addr;
    }
    for _ in 0..50 {
        match Hub::start(config.clone()).await {
            Ok(hub) => return hub,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    panic!("cannot start the hub");
}

fn days(secs: i64) -> f64 {
    secs as f64 / DAY as f64
}

/// The worst case for the renewal policy: an agent renewed nothing until its latest renewal
/// point (80 % of 45 days), then the hub was down for 7 days, so its certificate is at 95.6 %
/// of its lifetime when the hub comes back. The hub's CA clock is set back to issue such a
/// certificate; the agent runs through the outage and renews on its first connection.
#[tokio::test]
async fn a_week_long_hub_outage_does_not_strand_the_agent_it_renews_on_reconnect() {
    use shapeblock_agent::tunnel::renewal;
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let lifetime = renewal::DEFAULT_LIFETIME.as_secs() as i64;
    let outage = renewal::OUTAGE_TOLERATED.as_secs() as i64;
    let age = lifetime * 8 / 10 + outage;
    let past = hub_with_clock(data.path(), None, -age).await;
    let (addr, pin) = (past.address(), past.ca_hash());
    let url = past.url();
    let cluster = unique_name("c");
    let old = enroll_new(&past, &cluster).await;
    past.stop().await;
    env.store_identity(&old).await;
    let now = shapeblock_agent::proto::now_unix();
    let (not_before, not_after) = renewal::validity(&old.cert_pem).unwrap();
    println!(
        "certificate: lifetime {:.1} days, issued {:.1} days ago, {:.1} days left ({:.1} % used); renewal point at {:.1} % (day {:.1})",
        days(not_after - not_before),
        days(now - not_before),
        days(not_after - now),
        100.0 * (now - not_before) as f64 / (not_after - not_before) as f64,
        100.0 * (renewal::renew_at(&old).unwrap() - not_before) as f64 / (not_after - not_before) as f64,
        days(renewal::renew_at(&old).unwrap() - not_before),
    );
    assert!(renewal::due(&old, now) && !renewal::expired(&old, now));

    // The hub is down: the agent (its token long spent) keeps trying, and does not exit.
    let mut agent = env.hub_agent(&url, "sbt_spent", &pin).await;
    let down = std::time::Instant::now();
    eventually(TIMEOUT, "the agent to notice the hub is down", || async {
        agent.log_tail(200).contains("cannot reach the hub").then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        agent.wait_exit(Duration::ZERO).is_none(),
        "the agent runs through the outage"
    );

    // The hub is back, with the real clock: the agent renews on connect.
    let hub = hub_with_clock(data.path(), Some(addr), 0).await;
    let back = std::time::Instant::now();
    let (renewed, took) = eventually(
        TIMEOUT,
        "a renewed certificate in the identity Secret",
        || async {
            let id = env.stored_identity().await;
            (id.cert_pem != old.cert_pem).then_some(id)
        },
    )
    .await;
    let now = shapeblock_agent::proto::now_unix();
    let (nb, na) = renewal::validity(&renewed.cert_pem).unwrap();
    println!(
        "hub down {:?} (simulated outage: {:.0} days); renewed {took:?} after the hub came back; new certificate valid {:.1} days from now (renewal at day {:.1})",
        back - down,
        days(outage),
        days(na - now),
        days(renewal::renew_at(&renewed).unwrap() - nb),
    );
    assert_eq!(renewed.cluster_id, cluster, "the same cluster");
    assert!(na - now > lifetime - DAY, "a fresh certificate");
    assert!(!renewal::due(&renewed, now));
    let p = unique_name("outage");
    hub.apply(&cluster, &project(&p)).await.unwrap();
    ready_at_hub(&hub, &cluster, &p).await;
    assert!(
        agent
            .log_tail(400)
            .contains("past its renewal point: renewing on connect"),
        "{}",
        agent.log_tail(100)
    );
    agent
        .terminate(Duration::from_secs(15))
        .expect("the same agent process throughout");
    hub.stop().await;
}

/// Past expiry the only way back is a new token. An agent whose certificate expired says so
/// (when, and what to run), keeps running without a crash loop or a flood of logs, and a
/// fresh token for the same cluster re-joins it with its cluster id, its commands and its
/// state at the hub.
#[tokio::test]
async fn an_expired_certificate_is_refused_with_the_remedy_and_a_fresh_token_rejoins_the_same_cluster() {
    use shapeblock_agent::tunnel::renewal;
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let lifetime = renewal::DEFAULT_LIFETIME.as_secs() as i64;
    let past = hub_with_clock(data.path(), None, -(lifetime + DAY)).await;
    let addr = past.address();
    let cluster = unique_name("c");
    // Enrolled with the install token, which stays in the agent's configuration.
    let install_token = past
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let expired = enroll::enroll(
        &past.url(),
        &install_token,
        &past.ca_hash(),
        &enroll::new_key().unwrap(),
    )
    .await
    .unwrap();
    past.stop().await;
    env.store_identity(&expired).await;
    let hub = hub_with_clock(data.path(), Some(addr), 0).await;
    let (url, pin) = (hub.url(), hub.ca_hash());
    let p1 = unique_name("rejoin");
    let seq = hub.apply(&cluster, &project(&p1)).await.unwrap();

    let mut agent = env.hub_agent(&url, &install_token, &pin).await;
    let line = format!("the client certificate of cluster \"{cluster}\" expired at");
    eventually(TIMEOUT, "the expiry in the agent's log", || async {
        agent.log_tail(300).contains(&line).then_some(())
    })
    .await;
    // Retried every 2 s for 8 s more: the process stays up, healthy, and says it once.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(agent.wait_exit(Duration::ZERO).is_none(), "no crash");
    assert_eq!(agent.get("/healthz").await.map(|(code, _)| code), Some(200));
    let log = agent.log_tail(2000);
    let said: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&line) && l.contains("ERROR"))
        .collect();
    println!("the agent said: {}", said.first().copied().unwrap_or_default());
    assert_eq!(said.len(), 1, "once, not at every retry:\n{log}");
    for remedy in [
        format!("shapeblock-hub token create --cluster {cluster}"),
        "--set enrollment.token=".to_string(),
        "re-enrolling with the configured token failed".to_string(),
        "already used".to_string(),
    ] {
        assert!(said[0].contains(&remedy), "{remedy:?} in {}", said[0]);
    }
    assert!(result_of(&hub, &cluster, seq).await.is_none(), "nothing ran");

    // The remedy: a token for the same cluster, given to the agent (a new pod, as a
    // `helm upgrade --set enrollment.token=…` makes).
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    agent.kill();
    let started = std::time::Instant::now();
    let agent = env.hub_agent(&url, &token, &pin).await;
    eventually(TIMEOUT, "the command queued before the re-join", || {
        result_of(&hub, &cluster, seq)
    })
    .await;
    ready_at_hub(&hub, &cluster, &p1).await;
    println!(
        "re-joined and executed the queued command {:?} after the new token",
        started.elapsed()
    );
    let identity = env.stored_identity().await;
    let now = shapeblock_agent::proto::now_unix();
    assert_eq!(identity.cluster_id, cluster, "the same cluster identity");
    assert!(identity.not_after - now > lifetime - DAY);
    assert!(identity.pending_key_pem.is_empty());
    assert_ne!(identity.key_pem, expired.key_pem, "a new key");
    assert!(
        agent
            .log_tail(400)
            .contains("re-enrolled with the hub after the certificate expired")
    );
    agent.terminate(Duration::from_secs(15)).expect("stops");
    hub.stop().await;
}

/// The objects of all six kinds in the cluster, as `Kind/namespace/name`.
async fn cluster_objects(client: &Client) -> std::collections::BTreeSet<String> {
    use kube::api::{DynamicObject, ListParams};
    use kube::discovery::ApiResource;
    use shapeblock_agent::api::{App, AppBuild, AppRun, BackingService, Team};
    let mut out = std::collections::BTreeSet::new();
    for (resource, namespaced) in [
        (ApiResource::erase::<Project>(&()), false),
        (ApiResource::erase::<App>(&()), true),
        (ApiResource::erase::<AppBuild>(&()), true),
        (ApiResource::erase::<AppRun>(&()), true),
        (ApiResource::erase::<BackingService>(&()), true),
        (ApiResource::erase::<Team>(&()), false),
    ] {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        for o in api.list_metadata(&ListParams::default()).await.unwrap() {
            let ns = if namespaced {
                o.metadata.namespace.clone().unwrap_or_default()
            } else {
                String::new()
            };
            out.insert(format!("{}/{ns}/{}", resource.kind, o.name_any()));
        }
    }
    out
}

/// What the hub shows as existing (not Deleted).
async fn hub_objects(hub: &Hub, cluster: &str) -> std::collections::BTreeSet<String> {
    hub.store()
        .objects(cluster)
        .await
        .unwrap()
        .into_iter()
        .filter(|o| o.phase != "Deleted")
        .map(|o| o.key)
        .collect()
}

async fn views_agree(hub: &Hub, cluster: &str, client: &Client, after: &str) {
    let (_, took) = eventually(
        TIMEOUT,
        &format!("the hub's view to equal the cluster's {after}"),
        || async {
            let (at_hub, in_cluster) = (hub_objects(hub, cluster).await, cluster_objects(client).await);
            (at_hub == in_cluster).then_some(())
        },
    )
    .await;
    println!(
        "{after}: the hub's view equals the cluster's ({} objects) after {took:?}",
        cluster_objects(client).await.len()
    );
}

/// Deletes `key`'s object and, if the agent is not there to finalize it, takes its
/// finalizers off (as an operator would); waits until it is gone.
async fn delete_for_good(client: &Client, kind: &str, namespace: &str, name: &str) {
    use kube::api::{DynamicObject, Patch, PatchParams};
    use kube::discovery::ApiResource;
    let resource = match kind {
        "Project" => ApiResource::erase::<Project>(&()),
        "App" => ApiResource::erase::<shapeblock_agent::api::App>(&()),
        other => panic!("{other}"),
    };
    let api: Api<DynamicObject> = if namespace.is_empty() {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), namespace, &resource)
    };
    let _ = api.delete(name, &Default::default()).await;
    let _ = api
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"finalizers": null}})),
        )
        .await;
    eventually(TIMEOUT, &format!("{kind} {name} gone"), || async {
        api.get_opt(name).await.ok()?.is_none().then_some(())
    })
    .await;
}

/// Objects deleted while the hub or the agent was away: the snapshot after the reconnect
/// marks them Deleted at the hub, and after every restart sequence the hub's view (what it
/// does not show as Deleted) equals the objects in the cluster.
#[tokio::test]
async fn the_hubs_view_equals_the_clusters_after_deletes_while_the_tunnel_is_down() {
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let mut hub = hub(data.path()).await;
    let cluster = unique_name("c");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let (url, pin, addr) = (hub.url(), hub.ca_hash(), hub.address());
    let mut agent = env.hub_agent(&url, &token, &pin).await;
    let [a, b, c] = ["view-a", "view-b", "view-c"].map(unique_name);
    for p in [&a, &b, &c] {
        hub.apply(&cluster, &project(p)).await.unwrap();
        ready_at_hub(&hub, &cluster, p).await;
    }
    let app = manifest(
        "App",
        &a,
        "web",
        serde_json::json!({"registry": {"url": "registry.example.com"}, "git": {"url": "https://github.com/example/web.git"}}),
    );
    let seq = hub.apply(&cluster, &app).await.unwrap();
    eventually(TIMEOUT, "the App applied", || result_of(&hub, &cluster, seq)).await;
    let app_key = format!("App/{a}/web");
    eventually(TIMEOUT, "the hub knows the App", || async {
        phase_at_hub(&hub, &cluster, &app_key).await.map(|_| ())
    })
    .await;
    views_agree(&hub, &cluster, &env.client, "at the start").await;

    // 1. The hub is down; Project b is deleted (the agent finalizes it and queues the
    // change); the agent is then killed, and its queue with it; the hub comes back, then the
    // agent.
    hub.stop().await;
    delete_for_good(&env.client, "Project", "", &b).await;
    agent.kill();
    hub = hub_at(data.path(), addr).await;
    agent = env.hub_agent(&url, "sbt_spent", &pin).await;
    eventually(TIMEOUT, "the hub sees b deleted", || async {
        (phase_at_hub(&hub, &cluster, &format!("Project//{b}"))
            .await
            .as_deref()
            == Some("Deleted"))
        .then_some(())
    })
    .await;
    views_agree(
        &hub,
        &cluster,
        &env.client,
        "hub down, delete, agent killed, hub back, agent back",
    )
    .await;

    // 2. The agent is down; the App and Project c are deleted (their finalizers taken off,
    // as nothing finalizes them); the agent comes back.
    agent.kill();
    delete_for_good(&env.client, "App", &a, "web").await;
    delete_for_good(&env.client, "Project", "", &c).await;
    agent = env.hub_agent(&url, "sbt_spent", &pin).await;
    for key in [app_key.clone(), format!("Project//{c}")] {
        eventually(TIMEOUT, &format!("the hub sees {key} deleted"), || async {
            (phase_at_hub(&hub, &cluster, &key).await.as_deref() == Some("Deleted")).then_some(())
        })
        .await;
    }
    let gone = hub
        .store()
        .objects(&cluster)
        .await
        .unwrap()
        .into_iter()
        .find(|o| o.key == app_key)
        .unwrap();
    assert_eq!(gone.reason, "NotInCluster", "{gone:?}");
    views_agree(&hub, &cluster, &env.client, "agent down, delete, agent back").await;

    // 3. Both down; a Project is created directly in the cluster and Project a deleted; the
    // agent comes back first, then the hub.
    hub.stop().await;
    agent.kill();
    let d = unique_name("view-d");
    let mine: Project = serde_yaml::from_str(&project(&d)).unwrap();
    Api::<Project>::all(env.client.clone())
        .create(&Default::default(), &mine)
        .await
        .unwrap();
    delete_for_good(&env.client, "Project", "", &a).await;
    let agent = env.hub_agent(&url, "sbt_spent", &pin).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    hub = hub_at(data.path(), addr).await;
    ready_at_hub(&hub, &cluster, &d).await;
    views_agree(
        &hub,
        &cluster,
        &env.client,
        "both down, create and delete, agent back, hub back",
    )
    .await;
    let events = hub.store().events(&cluster).await.unwrap();
    let marked = |key: &str| {
        events
            .iter()
            .filter(|e| e.3.contains(&format!("{key}=Deleted")) || (e.2 == key && e.3 == "Deleted"))
            .count()
    };
    for key in [
        format!("Project//{a}"),
        format!("Project//{b}"),
        format!("Project//{c}"),
        app_key,
    ] {
        assert_eq!(marked(&key), 1, "{key} marked deleted once: {events:#?}");
    }
    let _ = Api::<Project>::all(env.client.clone())
        .delete(&d, &Default::default())
        .await;
    agent.terminate(Duration::from_secs(15)).expect("stops");
    hub.stop().await;
}

/// Copies the store files (the hub is stopped, so they are consistent).
fn copy_store(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for name in ["hub.sqlite", "hub.sqlite-wal", "hub.sqlite-shm"] {
        let _ = std::fs::remove_file(to.join(name));
        if from.join(name).exists() {
            std::fs::copy(from.join(name), to.join(name)).unwrap();
        }
    }
}

/// A hub store restored from a backup, then one replaced by an empty store, while the agent
/// keeps running: the agent notices each (the lost acks; the new store id) and executes
/// every command the hub sends, although their seqs are ones it executed before. The
/// hello's capabilities, the heartbeat's clock and the inventory (as fields, refreshed when
/// the cluster changes) are checked on the way.
#[tokio::test]
async fn a_restored_or_replaced_hub_store_gets_every_command_executed() {
    use k8s_openapi::api::core::v1::Node;
    if support::hub::database_for_tests(Path::new("/")).is_some() {
        // A backup and a replacement here are files of the SQLite store.
        println!("skipped: the hub's store is Postgres (SHAPEBLOCK_TEST_HUB_STORE)");
        return;
    }
    let env = env().await;
    let data = tempfile::tempdir().unwrap();
    let backup = tempfile::tempdir().unwrap();
    let mut hub = hub(data.path()).await;
    let cluster = unique_name("c");
    let token = hub
        .create_token(&cluster, Duration::from_secs(300))
        .await
        .unwrap();
    let (url, pin, addr) = (hub.url(), hub.ca_hash(), hub.address());
    let agent = env
        .hub_agent_with(&url, &token, &pin, &["--inventory-seconds=1"])
        .await;
    let p1 = unique_name("store");
    let seq1 = hub.apply(&cluster, &project(&p1)).await.unwrap();
    ready_at_hub(&hub, &cluster, &p1).await;

    // What the agent said about itself, as fields.
    let row = eventually(TIMEOUT, "a clock skew from a heartbeat", || async {
        hub.store()
            .cluster(&cluster)
            .await
            .ok()?
            .filter(|r| r.clock_skew_ms.is_some())
    })
    .await
    .0;
    assert_eq!(row.capabilities, shapeblock_agent::proto::capabilities());
    for capability in ["apply", "delete", "cancel", "sync", "set-config", "run-logs"] {
        assert!(
            row.capabilities.iter().any(|c| c == capability),
            "{capability}: {row:?}"
        );
    }
    let skew = row.clock_skew_ms.unwrap();
    println!(
        "agent {:?}, capabilities {:?}, clock skew {skew} ms",
        row.agent_version, row.capabilities
    );
    assert!(skew.abs() < 5_000, "one machine: {skew} ms");
    assert_eq!(row.agent_version.as_deref(), Some(env!("CARGO_PKG_VERSION")));
    let inventory = row.inventory.clone().unwrap();
    assert_eq!(inventory.node_count, 2);
    // A node joins: the hub has the new count within the check interval, not at a reconnect.
    let epoch = hub.session_epoch(&cluster).unwrap();
    let node_name = unique_name("extra-node");
    let node: Node = serde_json::from_value(serde_json::json!({"metadata": {"name": node_name}})).unwrap();
    let nodes: Api<Node> = Api::all(env.client.clone());
    nodes.create(&Default::default(), &node).await.unwrap();
    let (_, took) = eventually(TIMEOUT, "the inventory refreshed", || async {
        let row = hub.store().cluster(&cluster).await.ok()??;
        (row.inventory?.node_count == 3).then_some(())
    })
    .await;
    nodes.delete(&node_name, &Default::default()).await.unwrap();
    eventually(TIMEOUT, "the inventory refreshed again", || async {
        let row = hub.store().cluster(&cluster).await.ok()??;
        (row.inventory?.node_count == 2).then_some(())
    })
    .await;
    assert_eq!(hub.session_epoch(&cluster), Some(epoch), "in the same session");
    println!("inventory refreshed {took:?} after a node joined");

    // A backup of the store now, with command 1 done.
    hub.stop().await;
    // Let the old hub's sessions end and its store close.
    tokio::time::sleep(Duration::from_secs(1)).await;
    copy_store(data.path(), backup.path());
    hub = hub_at(data.path(), addr).await;
    let store_id = hub.store().id().await.unwrap();
    let p2 = unique_name("store");
    let seq2 = hub.apply(&cluster, &project(&p2)).await.unwrap();
    let p3 = unique_name("store");
    let seq3 = hub.apply(&cluster, &project(&p3)).await.unwrap();
    ready_at_hub(&hub, &cluster, &p3).await;
    assert_eq!((seq1, seq2, seq3), (1, 2, 3));

    // The store restored from the backup: it numbers its next command 2 again.
    hub.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    copy_store(backup.path(), data.path());
    hub = hub_at(data.path(), addr).await;
    assert_eq!(
        hub.store().id().await.unwrap(),
        store_id,
        "a backup has the same id"
    );
    let p4 = unique_name("store");
    let seq4 = hub.apply(&cluster, &project(&p4)).await.unwrap();
    assert_eq!(seq4, 2, "a seq the agent has executed before");
    let (ok, message) = eventually(TIMEOUT, "the command after the restore answered", || {
        result_of(&hub, &cluster, seq4)
    })
    .await
    .0;
    assert!(ok, "{message}");
    ready_at_hub(&hub, &cluster, &p4).await;
    assert!(agent.log_tail(600).contains("lost messages it had acknowledged"));

    // The store replaced by an empty one (the CA kept): a new id, commands from 1 again.
    hub.stop().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    for name in ["hub.sqlite", "hub.sqlite-wal", "hub.sqlite-shm"] {
        let _ = std::fs::remove_file(data.path().join(name));
    }
    hub = hub_at(data.path(), addr).await;
    assert_ne!(hub.store().id().await.unwrap(), store_id);
    let p5 = unique_name("store");
    let seq5 = hub.apply(&cluster, &project(&p5)).await.unwrap();
    assert_eq!(seq5, 1);
    let (ok, message) = eventually(TIMEOUT, "the command of the new store answered", || {
        result_of(&hub, &cluster, seq5)
    })
    .await
    .0;
    assert!(ok, "{message}");
    ready_at_hub(&hub, &cluster, &p5).await;
    assert!(agent.log_tail(600).contains("the hub's store is another one"));
    // The new store knows every Project by the snapshot, and no stale result reached it.
    for p in [&p1, &p2, &p3, &p4] {
        ready_at_hub(&hub, &cluster, p).await;
    }
    let commands = hub.store().commands(&cluster).await.unwrap();
    assert_eq!(commands.len(), 1);
    let results = hub
        .store()
        .events(&cluster)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.1 == "result")
        .count();
    assert_eq!(results, 1, "one result, for its one command");
    agent
        .terminate(Duration::from_secs(15))
        .expect("the same agent process throughout");
    for p in [&p1, &p2, &p3, &p4, &p5] {
        let _ = Api::<Project>::all(env.client.clone())
            .delete(p, &Default::default())
            .await;
    }
    hub.stop().await;
}
