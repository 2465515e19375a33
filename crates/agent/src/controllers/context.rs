//! What every reconciler shares: the client, the event recorder, metrics, configuration, and
//! per-object retry counters for backoff.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use super::Error;
use super::metrics::Metrics;

/// Agent settings the controllers need.
#[derive(Clone, Debug)]
pub struct Config {
    /// The agent's own namespace (source of the registry pull secret).
    pub agent_namespace: String,
    /// Name of the registry pull secret in the agent's namespace that every project gets a
    /// copy of; `None` when the cluster's registry needs none.
    pub registry_secret: Option<String>,
    /// Periodic re-check of healthy objects, in case something changed unseen.
    pub resync: Duration,
    /// Reconciles each controller runs at once.
    pub concurrency: u16,
    /// Pod name, to tell Event sources apart when several replicas run.
    pub instance: Option<String>,
    /// Images and defaults of build Jobs.
    pub builds: super::appbuild::BuildSettings,
    /// The cluster registry and how builds push to it.
    pub registry: super::registry::RegistrySettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            agent_namespace: "shapeblock".into(),
            registry_secret: Some("registry-credentials".into()),
            resync: Duration::from_secs(30 * 60),
            concurrency: super::DEFAULT_CONCURRENCY,
            instance: None,
            builds: Default::default(),
            registry: Default::default(),
        }
    }
}

/// Shared by all reconcilers.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: std::sync::Arc<Metrics>,
    pub config: Config,
    retries: Mutex<HashMap<String, u32>>,
    /// Namespaces recently confirmed as made for a Project, and when: every reconcile of a
    /// namespaced kind checks, and a namespace does not change hands within a minute.
    project_namespaces: Mutex<HashMap<String, Instant>>,
    synced: AtomicUsize,
    helm_charts_served: AtomicBool,
    /// The registry token signing key, loaded (or made) on first use.
    registry_signer: tokio::sync::OnceCell<super::registry::Signer>,
    /// What the served HelmChart CRD accepts, and when it was read.
    helm_chart_fields: Mutex<Option<(Instant, super::deploy::SpecFields)>>,
    /// Versions of objects this agent wrote and already went on from (uid → resourceVersion):
    /// their watch events bring nothing new, and a reconcile for each was most of a build's.
    echoes: Echoes,
}

/// Versions of objects written and already gone on from, by uid: see [`Context::expect_echo`].
#[derive(Default)]
pub(crate) struct Echoes(Mutex<HashMap<String, String>>);

/// More echoes than this waiting at once means their watch events are not coming (a watch
/// that restarted past them): forgetting them all costs a reconcile each, nothing else.
const MAX_ECHOES: usize = 10_000;

impl Echoes {
    fn expect(&self, meta: &ObjectMeta) {
        let (Some(uid), Some(version)) = (meta.uid.clone(), meta.resource_version.clone()) else {
            return;
        };
        let mut echoes = self.0.lock().unwrap();
        if echoes.len() >= MAX_ECHOES {
            echoes.clear();
        }
        echoes.insert(uid, version);
    }

    fn take(&self, meta: &ObjectMeta) -> bool {
        let (Some(uid), Some(version)) = (&meta.uid, &meta.resource_version) else {
            return false;
        };
        let mut echoes = self.0.lock().unwrap();
        if echoes.get(uid) == Some(version) {
            echoes.remove(uid);
            return true;
        }
        false
    }
}

/// How long what the served HelmChart CRD accepts is trusted: a k3s upgrade can bring a newer
/// helm-controller (and CRD) without restarting the agent.
const HELM_CHART_FIELDS_FOR: Duration = Duration::from_secs(600);

/// Number of controllers whose caches must be synced before the agent reports ready.
pub const CONTROLLERS: usize = 6;

impl Context {
    pub fn new(client: Client, metrics: std::sync::Arc<Metrics>, config: Config) -> Self {
        let reporter = Reporter {
            controller: super::MANAGED_BY.into(),
            instance: config.instance.clone(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            config,
            retries: Mutex::new(HashMap::new()),
            project_namespaces: Mutex::new(HashMap::new()),
            synced: AtomicUsize::new(0),
            helm_charts_served: AtomicBool::new(true),
            registry_signer: tokio::sync::OnceCell::new(),
            helm_chart_fields: Mutex::new(None),
            echoes: Echoes::default(),
        }
    }

    /// Records that this agent wrote `object` (as returned by the apiserver) and has acted on
    /// what it holds, so that its own watch event does not reconcile it again.
    pub(crate) fn expect_echo(&self, object: &impl kube::Resource) {
        self.echoes.expect(object.meta());
    }

    /// Whether `object` is the watch event of a write [`expect_echo`](Self::expect_echo)
    /// recorded (forgotten once seen). Any other version, newer or not, is news.
    pub(crate) fn is_echo(&self, object: &impl kube::Resource) -> bool {
        self.echoes.take(object.meta())
    }

    /// What the served HelmChart CRD's spec accepts (read lazily, kept for ten minutes). A
    /// CRD the agent cannot read is taken to accept everything, as before.
    pub async fn helm_chart_fields(&self) -> super::deploy::SpecFields {
        use super::deploy::{HELM_CHART_CRD, SpecFields, served_spec_fields};
        use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
        let cached = self.helm_chart_fields.lock().unwrap().clone();
        if let Some((at, fields)) = &cached
            && at.elapsed() < HELM_CHART_FIELDS_FOR
        {
            return fields.clone();
        }
        let read = kube::Api::<CustomResourceDefinition>::all(self.client.clone())
            .get_opt(HELM_CHART_CRD)
            .await;
        let fields = match read {
            Ok(Some(crd)) => served_spec_fields(&crd),
            // Not served: the deploy says so (HelmControllerMissing) without this.
            Ok(None) => SpecFields::Any,
            Err(err) => {
                tracing::warn!(%err, "cannot read the HelmChart CRD; sending every HelmChart field");
                // Looked at again next time: the error may pass.
                return cached.map(|(_, f)| f).unwrap_or(SpecFields::Any);
            }
        };
        let before = cached.map(|(_, f)| f.missing());
        let missing = fields.missing();
        if before.as_ref() != Some(&missing) && (!missing.is_empty() || before.is_some()) {
            tracing::info!(
                left_out = ?missing,
                "the served HelmChart CRD ({HELM_CHART_CRD}) declares no spec field of these names \
                 (an older helm-controller): HelmCharts are applied without them, so a failed \
                 upgrade follows the controller's own default"
            );
        }
        *self.helm_chart_fields.lock().unwrap() = Some((Instant::now(), fields.clone()));
        fields
    }

    /// Leaves out of `chart` what the served HelmChart CRD does not declare.
    pub async fn fit_helm_chart(&self, chart: &mut kube::api::DynamicObject) {
        super::deploy::fit_to_served(chart, &self.helm_chart_fields().await);
    }

    /// Why `namespace` is not served, or `None` when it is a namespace the agent made for a
    /// Project (labelled by the agent with that Project's name, and not the agent's own).
    /// Apps, builds, runs and services anywhere else would run tenant code beside whatever
    /// lives there, e.g. the agent's identity in its own namespace, or in `kube-system`.
    pub async fn not_a_project_namespace(&self, namespace: &str) -> Result<Option<String>, Error> {
        const CONFIRMED_FOR: Duration = Duration::from_secs(60);
        if namespace == self.config.agent_namespace {
            return Ok(Some(format!(
                "namespace {namespace} is the agent's own; Apps, AppBuilds, AppRuns and BackingServices are served only in Project namespaces"
            )));
        }
        let confirmed = self.project_namespaces.lock().unwrap().get(namespace).copied();
        if confirmed.is_some_and(|at| at.elapsed() < CONFIRMED_FOR) {
            return Ok(None);
        }
        let namespaces = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(self.client.clone());
        let labels = namespaces
            .get_metadata_opt(namespace)
            .await?
            .and_then(|n| n.metadata.labels)
            .unwrap_or_default();
        let made_for_project = labels.get(super::PROJECT_LABEL).map(String::as_str) == Some(namespace)
            && labels.get(super::MANAGED_BY_LABEL).map(String::as_str) == Some(super::MANAGED_BY);
        if made_for_project {
            self.project_namespaces
                .lock()
                .unwrap()
                .insert(namespace.to_owned(), Instant::now());
            return Ok(None);
        }
        self.project_namespaces.lock().unwrap().remove(namespace);
        Ok(Some(format!(
            "namespace {namespace} was not made by the agent for a Project; Apps, AppBuilds, AppRuns and BackingServices are served only in Project namespaces (create a Project named after the namespace)"
        )))
    }

    /// Publishes an Event. Failing to record one (e.g. in a namespace being deleted) must not
    /// fail the reconcile, so errors are logged and dropped.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: impl Into<String>,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(truncate(note.into(), 1000)),
            action: action.into(),
            secondary: None,
        };
        if let Err(err) = self.recorder.publish(&event, regarding).await {
            tracing::debug!(%err, reason, "could not record event");
        }
    }

    /// What to do after a failed reconcile: wait for a change (invalid spec), retry soon
    /// (waiting on something), or back off exponentially with jitter (transient errors).
    pub fn error_action(&self, key: &str, kind: &str, error: &Error) -> Action {
        self.metrics.failure(kind, error.reason());
        match error {
            Error::Waiting(_) => tracing::debug!(kind, object = key, %error, "waiting"),
            Error::InvalidSpec { .. } => {
                tracing::info!(kind, object = key, %error, "invalid spec; waiting for a change")
            }
            _ => tracing::warn!(kind, object = key, %error, "reconcile failed; will retry"),
        }
        if let Some(delay) = error.fixed_delay() {
            return Action::requeue(delay);
        }
        if !error.is_retryable() {
            return Action::await_change();
        }
        let attempt = {
            let mut retries = self.retries.lock().unwrap_or_else(|p| p.into_inner());
            let attempt = retries.entry(key.to_owned()).or_insert(0);
            *attempt = attempt.saturating_add(1);
            *attempt
        };
        Action::requeue(backoff_delay(attempt))
    }

    /// Forgets the failures of an object that reconciled successfully.
    pub fn reset_retries(&self, key: &str) {
        self.retries.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }

    /// Marks one controller's cache as synced.
    pub fn mark_synced(&self) {
        self.synced.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether the apiserver serves HelmCharts (the k3s helm-controller's kind), as last seen.
    pub fn helm_charts_served(&self) -> bool {
        self.helm_charts_served.load(Ordering::SeqCst)
    }

    /// The registry token signing key from its Secret in the agent's namespace, made there on
    /// first use; a failure is retried on the next call.
    pub async fn registry_signer(
        &self,
    ) -> std::result::Result<&super::registry::Signer, super::registry::RegistryError> {
        self.registry_signer
            .get_or_try_init(|| {
                super::registry::load_or_create_signer(
                    &self.client,
                    &self.config.agent_namespace,
                    &self.config.registry.key_secret,
                )
            })
            .await
    }

    pub fn set_helm_charts_served(&self, served: bool) {
        self.helm_charts_served.store(served, Ordering::SeqCst);
    }

    /// Whether every controller's cache is synced.
    pub fn is_ready(&self) -> bool {
        self.synced_count() >= CONTROLLERS
    }

    /// How many controllers have synced their caches.
    pub fn synced_count(&self) -> usize {
        self.synced.load(Ordering::SeqCst)
    }
}

/// 1 s, 2 s, 4 s, ... capped at 5 minutes, with jitter so that many objects failing together
/// do not retry together.
pub fn backoff_delay(attempt: u32) -> Duration {
    use backon::BackoffBuilder;
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_secs(1))
        .with_max_delay(Duration::from_secs(300))
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(Duration::from_secs(300))
}

fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert!(backoff_delay(1) >= Duration::from_secs(1) && backoff_delay(1) <= Duration::from_secs(2));
        assert!(backoff_delay(3) >= Duration::from_secs(4));
        assert!(backoff_delay(30) <= Duration::from_secs(600));
        assert!(backoff_delay(30) >= Duration::from_secs(300));
    }

    #[test]
    fn only_the_version_written_is_an_echo_and_only_once() {
        let meta = |uid: &str, version: &str| ObjectMeta {
            uid: Some(uid.into()),
            resource_version: Some(version.into()),
            ..Default::default()
        };
        let echoes = Echoes::default();
        echoes.expect(&meta("a", "7"));
        // Someone else's write, older or newer, is news; so is another object's.
        assert!(!echoes.take(&meta("a", "6")));
        assert!(!echoes.take(&meta("b", "7")));
        assert!(echoes.take(&meta("a", "7")));
        assert!(
            !echoes.take(&meta("a", "7")),
            "the same event again (a relist) is news"
        );
        // A newer write replaces the one expected before it.
        echoes.expect(&meta("a", "8"));
        echoes.expect(&meta("a", "9"));
        assert!(!echoes.take(&meta("a", "8")));
        assert!(echoes.take(&meta("a", "9")));
        // Without a uid or a version there is nothing to match.
        echoes.expect(&ObjectMeta::default());
        assert!(!echoes.take(&ObjectMeta::default()));
    }

    #[test]
    fn echoes_never_piling_up_are_forgotten() {
        let echoes = Echoes::default();
        for i in 0..=MAX_ECHOES {
            echoes.expect(&ObjectMeta {
                uid: Some(i.to_string()),
                resource_version: Some("1".into()),
                ..Default::default()
            });
        }
        assert_eq!(echoes.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 10), "abc");
    }
}
