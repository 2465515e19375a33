//! BackingService controller: a database, cache or queue from the catalog, installed as a
//! HelmChart of the universal chart (in the agent's namespace, like Apps), with credentials the
//! agent generates once into a Secret it owns and a standard connection Secret for Apps.
//!
//! `Ready` means rolled out: the Helm release is `deployed`, its install Job (if still there)
//! succeeded, and the StatefulSet runs this generation's template, updated and available.
//! Deletion waits while Apps bind the service (unless forced), uninstalls the release, and then
//! deletes or keeps the data volume claims as `deletionPolicy` says.
//!
//! Past 600 lines: the reconcile and the deletion path; the desired objects are `desired`.

pub mod binding;
pub mod catalog;
pub mod desired;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Secret};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

pub use catalog::{Catalog, Entry};
pub use desired::{GENERATION_ANNOTATION, SERVICE_LABEL, connection_secret_name};

use super::deploy::{chart_object, helm_chart_resource, pending, release_status, service_chart_name};
use super::job_state::{self, JobState};
use super::{
    ConditionSet, Context, Error, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, PROJECT_LABEL, Result,
};
use crate::api::{
    App, BackingService, BackingServicePhase, BackingServiceStatus, DeletionPolicy, FORCE_DELETE_ANNOTATION,
};

const KIND: &str = "BackingService";
/// Finalizer: uninstall, then delete or keep the data.
pub const FINALIZER: &str = "apps.shapeblock.io/backing-service";
/// How often an installing service is looked at besides the watches.
const POLL: Duration = Duration::from_secs(5);
/// How often a service that cannot be provisioned (catalog, type) is looked at again: the
/// catalog ConfigMap is read, not watched.
const RECHECK: Duration = Duration::from_secs(60);
/// How often a service whose credentials Secret is in the way is looked at again.
const CONFLICT_RECHECK: Duration = Duration::from_secs(15);
/// After a stuck release record was cleared: the helm-controller recreates its Job within seconds.
const REPAIRED_RECHECK: Duration = Duration::from_secs(5);

/// Runs the BackingService controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let services = Api::<DeserializeGuard<BackingService>>::all(client.clone());
    let secrets = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_LABEL),
    )
    .touched_objects();
    let statefulsets = watcher(
        Api::<PartialObjectMeta<StatefulSet>>::all(client.clone()),
        watcher::Config::default().labels(SERVICE_LABEL),
    )
    .touched_objects();
    let charts = watcher(
        Api::<DynamicObject>::namespaced_with(
            client.clone(),
            &ctx.config.agent_namespace,
            &helm_chart_resource(),
        ),
        watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY},{SERVICE_LABEL}")),
    )
    .touched_objects();
    let controller = super::controller(services, watcher::Config::default(), &ctx)
        .owns_stream(secrets)
        .watches_stream(statefulsets, |sts: PartialObjectMeta<StatefulSet>| {
            labelled(sts.labels(), sts.namespace())
        })
        .watches_stream_with(
            charts,
            |chart: DynamicObject| labelled(chart.labels(), chart.labels().get(PROJECT_LABEL).cloned()),
            helm_chart_resource(),
        );
    super::mark_synced_when_ready(ctx.clone(), controller.store());
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(super::log_reconcile_end)
        .await;
}

/// The BackingService an object labelled with [`SERVICE_LABEL`] belongs to.
fn labelled(
    labels: &BTreeMap<String, String>,
    namespace: Option<String>,
) -> Option<ObjectRef<DeserializeGuard<BackingService>>> {
    Some(ObjectRef::new(labels.get(SERVICE_LABEL)?).within(&namespace?))
}

fn key(service: &impl ResourceExt) -> String {
    format!(
        "{}/{}",
        service.namespace().unwrap_or_default(),
        service.name_any()
    )
}

async fn reconcile(guard: Arc<DeserializeGuard<BackingService>>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    tracing::debug!(kind = KIND, object = %key(guard.as_ref()), "reconciling");
    let service = match &guard.0 {
        Ok(service) => Arc::new(service.clone()),
        Err(invalid) => return super::report_undecodable::<BackingService>(&ctx, invalid).await,
    };
    if let Some(action) = super::refuse_outside_projects(&ctx, service.as_ref()).await? {
        return Ok(action);
    }
    let api = Api::<BackingService>::namespaced(ctx.client.clone(), &service.namespace().unwrap_or_default());
    let action = finalizer(&api, FINALIZER, service.clone(), |event| async {
        match event {
            Finalizer::Apply(service) => apply(&service, &ctx).await,
            Finalizer::Cleanup(service) => cleanup(&service, &ctx).await,
        }
    })
    .await
    .map_err(Error::from)?;
    ctx.reset_retries(&key(service.as_ref()));
    Ok(action)
}

fn error_policy(guard: Arc<DeserializeGuard<BackingService>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.error_action(&key(guard.as_ref()), KIND, error)
}

/// The catalog in force: built-in entries, replaced or extended by the admin's ConfigMap.
pub async fn load_catalog(ctx: &Context) -> Result<std::result::Result<Catalog, String>> {
    let configmap = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ctx.config.agent_namespace)
        .get_opt(catalog::CONFIGMAP)
        .await?;
    let overrides = configmap
        .as_ref()
        .and_then(|c| c.data.as_ref())
        .and_then(|d| d.get(catalog::CONFIGMAP_KEY))
        .map(String::as_str);
    Ok(catalog::merged(overrides))
}

/// A status under construction, from the object's previous one.
struct Report<'a> {
    service: &'a BackingService,
    status: BackingServiceStatus,
    conditions: ConditionSet,
}

impl<'a> Report<'a> {
    fn new(service: &'a BackingService) -> Self {
        let status = service.status.clone().unwrap_or_default();
        let conditions = ConditionSet::new(&status.conditions, service.metadata.generation);
        Self {
            service,
            status,
            conditions,
        }
    }

    fn previous_phase(&self) -> Option<BackingServicePhase> {
        self.service.status.as_ref().and_then(|s| s.phase)
    }

    fn previous_reason(&self, type_: &str) -> Option<&str> {
        self.service
            .status
            .as_ref()?
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.reason.as_str())
    }

    /// Writes the status (if it changed) and an Event when the phase or reason changed.
    async fn write(
        mut self,
        ctx: &Context,
        phase: BackingServicePhase,
        reason: &str,
        message: String,
    ) -> Result<()> {
        let newly = self.previous_phase() != Some(phase) || self.previous_reason("Ready") != Some(reason);
        self.conditions
            .set("Ready", phase == BackingServicePhase::Ready, reason, &message);
        self.status.phase = Some(phase);
        self.status.message = Some(message.clone());
        self.status.observed_generation = self.service.metadata.generation;
        self.status.conditions = self.conditions.conditions;
        if self.service.status.as_ref() != Some(&self.status) {
            let patch = json!({
                "apiVersion": BackingService::api_version(&()),
                "kind": KIND,
                "status": self.status,
            });
            Api::<BackingService>::namespaced(
                ctx.client.clone(),
                &self.service.namespace().unwrap_or_default(),
            )
            .patch_status(
                &self.service.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await?;
        }
        if newly {
            let type_ = match phase {
                BackingServicePhase::Failed => EventType::Warning,
                _ => EventType::Normal,
            };
            ctx.publish(&self.service.object_ref(&()), type_, reason, "Provision", message)
                .await;
        }
        Ok(())
    }
}

async fn apply(service: &BackingService, ctx: &Context) -> Result<Action> {
    let mut report = Report::new(service);
    let kind = &service.spec.service_type;
    let catalog = match load_catalog(ctx).await? {
        Ok(catalog) => catalog,
        Err(message) => {
            report
                .write(ctx, BackingServicePhase::Failed, "InvalidCatalog", message)
                .await?;
            return Ok(Action::requeue(RECHECK));
        }
    };
    let Some(entry) = catalog.get(kind) else {
        let message = format!(
            "type {kind} is not in the catalog: choose one of {}",
            catalog.keys().cloned().collect::<Vec<_>>().join(", ")
        );
        report
            .write(ctx, BackingServicePhase::Failed, "UnknownType", message)
            .await?;
        return Ok(Action::requeue(RECHECK));
    };
    let namespace = service.namespace().unwrap_or_default();
    let names = desired::Names::of(service);
    let statefulset = Api::<StatefulSet>::namespaced(ctx.client.clone(), &namespace)
        .get_opt(&names.workload)
        .await?;
    let values =
        match desired::chart_values(service, entry, installed_storage(statefulset.as_ref()).as_deref()) {
            Ok(values) => values,
            Err(refused) => {
                let message = refused.to_string();
                report
                    .write(ctx, BackingServicePhase::Failed, "InvalidSpec", message.clone())
                    .await?;
                return Err(Error::InvalidSpec {
                    reason: "InvalidSpec",
                    message,
                });
            }
        };
    let owner = service
        .controller_owner_ref(&())
        .expect("a BackingService from the apiserver has a uid");

    let credentials = match ensure_credentials(service, entry, ctx, &owner).await {
        Ok(credentials) => credentials,
        // A Secret in the way (somebody else's, or missing keys): said on the service, with a
        // Warning Event, instead of a log line nobody reads.
        Err(Error::InvalidSpec { reason, message }) => {
            report.conditions.set("CredentialsReady", false, reason, &message);
            report
                .write(ctx, BackingServicePhase::Failed, reason, message)
                .await?;
            // Such a Secret carries none of our labels, so it is not watched: look again.
            return Ok(Action::requeue(CONFLICT_RECHECK));
        }
        Err(err) => return Err(err),
    };
    report.conditions.set(
        "CredentialsReady",
        true,
        "Generated",
        format!(
            "credentials in Secret {}, connection details in Secret {}",
            names.credentials, names.connection
        ),
    );
    let connection = desired::connection_secret(service, entry, &credentials, &owner);
    Api::<Secret>::namespaced(ctx.client.clone(), &namespace)
        .patch(
            &names.connection,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&connection),
        )
        .await?;
    report.status.connection_secret = Some(names.connection.clone());
    report.status.endpoint = Some(format!("{}:{}", names.host, entry.port));

    let generation = service.metadata.generation.unwrap_or_default().to_string();
    let release = service_chart_name(&namespace, &service.name_any());
    let mut chart = chart_object(
        &ctx.config.agent_namespace,
        &release,
        &namespace,
        BTreeMap::from([(SERVICE_LABEL.to_string(), service.name_any())]),
        BTreeMap::new(),
        &values,
    );
    if let Err(too_large) = super::deploy::check_stored_size(&chart) {
        report
            .conditions
            .set("Installed", false, "ValuesTooLarge", &too_large);
        report
            .write(ctx, BackingServicePhase::Failed, "ValuesTooLarge", too_large)
            .await?;
        return Ok(Action::await_change());
    }
    let charts = Api::<DynamicObject>::namespaced_with(
        ctx.client.clone(),
        &ctx.config.agent_namespace,
        &helm_chart_resource(),
    );
    // A release being uninstalled (its Project is going) is not installed again: the
    // helm-controller would run the install and the uninstall Jobs in turn.
    let existing = match charts.get_metadata_opt(&release).await {
        Ok(existing) => existing,
        Err(kube::Error::Api(status)) if status.code == 404 => None,
        Err(err) => return Err(err.into()),
    };
    if existing.is_some_and(|c| c.metadata.deletion_timestamp.is_some()) {
        return Err(Error::Waiting(format!(
            "HelmChart {release} is being uninstalled"
        )));
    }
    ctx.fit_helm_chart(&mut chart).await;
    super::install_access::grant(ctx, &release, &namespace).await?;
    let applied = charts
        .patch(
            &release,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&chart),
        )
        .await?;

    // Where the install is. The helm-controller does not always get to write `status.jobName`,
    // so the Job is found by its naming convention, `helm-install-<chart>`.
    let job_name = applied.data["status"]["jobName"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("helm-install-{release}"));
    let job = Api::<Job>::namespaced(ctx.client.clone(), &ctx.config.agent_namespace)
        .get_opt(&job_name)
        .await?;
    let job_running = job
        .as_ref()
        .is_some_and(|j| matches!(job_state::of(j, None), JobState::Running(_)));
    let job_failed = job.as_ref().and_then(job_state::failure_message);
    let release_state = release_status(&ctx.client, &namespace, &release).await?;
    let rollout = rolled_out(statefulset.as_ref(), &generation);

    if release_state
        .as_deref()
        .is_some_and(|s| s.starts_with("pending-"))
    {
        let records = pending::revisions(&ctx.client, &namespace, &release).await?;
        if let Some(stuck) = pending::stuck(&records, job.as_ref()) {
            let agent_namespace = &ctx.config.agent_namespace;
            pending::clear(&ctx.client, &namespace, &stuck, agent_namespace, &job_name).await?;
            let note = stuck.describe(&release, &format!("{agent_namespace}/{job_name}"));
            tracing::warn!(service = %service.name_any(), "{note}");
            ctx.publish(
                &service.object_ref(&()),
                EventType::Warning,
                "ReleaseRepaired",
                "Provision",
                note,
            )
            .await;
            return Ok(Action::requeue(REPAIRED_RECHECK));
        }
    }
    let installed = release_state.as_deref() == Some("deployed") && !job_running;
    if let Some(why) = &job_failed
        && !(installed && rollout.is_ok())
    {
        let message = format!("the Helm install Job {job_name} failed: {why}");
        report
            .conditions
            .set("Installed", false, "InstallFailed", &message);
        report
            .write(ctx, BackingServicePhase::Failed, "InstallFailed", message)
            .await?;
        return Ok(Action::requeue(RECHECK));
    }
    match &release_state {
        Some(state) if installed => report.conditions.set(
            "Installed",
            true,
            "Deployed",
            format!("Helm release {release} is {state}"),
        ),
        Some(state) => report.conditions.set(
            "Installed",
            false,
            "Installing",
            format!("Helm release {release} is {state}"),
        ),
        None => report.conditions.set(
            "Installed",
            false,
            "Installing",
            format!("waiting for the helm-controller to install release {release}"),
        ),
    };
    match &rollout {
        Ok(()) => report.conditions.set(
            "Available",
            true,
            "RolledOut",
            format!("StatefulSet {} is available", names.workload),
        ),
        Err(why) => report
            .conditions
            .set("Available", false, "RollingOut", why.clone()),
    };
    if installed && rollout.is_ok() {
        let message = format!(
            "{kind} {} at {}:{}",
            entry.version(service.spec.version.as_deref()).unwrap_or_default(),
            names.host,
            entry.port
        );
        report
            .write(ctx, BackingServicePhase::Ready, "Ready", message)
            .await?;
        return Ok(Action::requeue(ctx.config.resync));
    }
    let message = match &rollout {
        Err(why) if installed => why.clone(),
        _ => format!("installing {kind} (Helm release {release})"),
    };
    report
        .write(ctx, BackingServicePhase::Provisioning, "Provisioning", message)
        .await?;
    Ok(Action::requeue(POLL))
}

/// Reads the credentials Secret, or creates it once. Never rewritten: the service's data is
/// initialised with these credentials. A Secret kept by an earlier BackingService of the same
/// name (deletion policy Retain) is adopted, so recreating the service reattaches its data.
async fn ensure_credentials(
    service: &BackingService,
    entry: &Entry,
    ctx: &Context,
    owner: &k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> Result<desired::Credentials> {
    let names = desired::Names::of(service);
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &service.namespace().unwrap_or_default());
    if let Some(existing) = secrets.get_opt(&names.credentials).await? {
        // Somebody else's Secret first: whatever it holds is not this service's to use.
        let owned = existing.owner_references().iter().any(|o| o.uid == owner.uid);
        if !owned && existing.labels().get(SERVICE_LABEL) != Some(&service.name_any()) {
            return Err(Error::InvalidSpec {
                reason: "SecretConflict",
                message: format!(
                    "Secret {} exists and was not made for this BackingService (it lacks the label \
                         {SERVICE_LABEL}={}): the agent neither takes over nor overwrites it; delete or \
                         rename that Secret, or give the BackingService another name",
                    names.credentials,
                    service.name_any()
                ),
            });
        }
        let Some(credentials) = desired::Credentials::from_secret(&existing) else {
            return Err(Error::InvalidSpec {
                reason: "InvalidCredentials",
                message: format!(
                    "Secret {} lacks username, password, root-password or database; the agent does \
                     not overwrite credentials a service's data may depend on: fix or delete it",
                    names.credentials
                ),
            });
        };
        if !owned {
            let patch = json!({"metadata": {"ownerReferences": [owner]}});
            secrets
                .patch(&names.credentials, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            ctx.publish(
                &service.object_ref(&()),
                EventType::Normal,
                "CredentialsAdopted",
                "Provision",
                format!("reusing the retained credentials in Secret {}", names.credentials),
            )
            .await;
        }
        return Ok(credentials);
    }
    let credentials = desired::Credentials::generate(entry)
        .map_err(|_| Error::Crypto("the system random source failed".into()))?;
    let secret = desired::credentials_secret(service, &credentials, owner);
    // Create, never overwrite: a concurrent reconcile that won the race keeps its password.
    let params = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match secrets.create(&params, &secret).await {
        Ok(_) => {
            ctx.publish(
                &service.object_ref(&()),
                EventType::Normal,
                "CredentialsGenerated",
                "Provision",
                format!("generated credentials into Secret {}", names.credentials),
            )
            .await;
            Ok(credentials)
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Err(Error::Waiting(format!(
            "Secret {} was created concurrently; reading it again",
            names.credentials
        ))),
        Err(err) => Err(err.into()),
    }
}

/// The data claim size of a running StatefulSet.
fn installed_storage(statefulset: Option<&StatefulSet>) -> Option<String> {
    statefulset?
        .spec
        .as_ref()?
        .volume_claim_templates
        .as_ref()?
        .iter()
        .find(|claim| claim.metadata.name.as_deref() == Some(desired::DATA_VOLUME))?
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|quantity| quantity.0.clone())
}

/// Whether the StatefulSet runs the template of `generation`, every replica updated, ready
/// and available; otherwise what it is waiting for.
pub fn rolled_out(statefulset: Option<&StatefulSet>, generation: &str) -> std::result::Result<(), String> {
    let Some(sts) = statefulset else {
        return Err("waiting for the StatefulSet".into());
    };
    let name = sts.name_any();
    let spec = sts.spec.as_ref().ok_or("StatefulSet has no spec")?;
    let ours = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(GENERATION_ANNOTATION))
        .map(String::as_str)
        == Some(generation);
    if !ours {
        return Err(format!(
            "StatefulSet {name} does not run generation {generation} yet"
        ));
    }
    let desired = spec.replicas.unwrap_or(1);
    let status = sts.status.clone().unwrap_or_default();
    let observed = status.observed_generation.unwrap_or(0) >= sts.metadata.generation.unwrap_or(0);
    let revision_done = status.update_revision.is_none() || status.current_revision == status.update_revision;
    let settled = status.replicas == desired
        && status.updated_replicas.unwrap_or(0) == desired
        && status.ready_replicas.unwrap_or(0) == desired
        && status.available_replicas.unwrap_or(0) == desired;
    if observed && revision_done && settled {
        Ok(())
    } else {
        Err(format!(
            "StatefulSet {name}: {} of {desired} ready",
            status.ready_replicas.unwrap_or(0)
        ))
    }
}

/// Apps of the service's namespace that bind it and are not being deleted.
async fn binding_apps(service: &BackingService, ctx: &Context) -> Result<Vec<String>> {
    let apps = Api::<App>::namespaced(ctx.client.clone(), &service.namespace().unwrap_or_default())
        .list(&ListParams::default())
        .await?;
    let name = service.name_any();
    Ok(apps
        .items
        .into_iter()
        .filter(|a| a.metadata.deletion_timestamp.is_none() && a.spec.services.contains(&name))
        .map(|a| a.name_any())
        .collect())
}

async fn cleanup(service: &BackingService, ctx: &Context) -> Result<Action> {
    let namespace = service.namespace().unwrap_or_default();
    let name = service.name_any();
    let mut report = Report::new(service);
    let forced = service
        .annotations()
        .get(FORCE_DELETE_ANNOTATION)
        .map(String::as_str)
        == Some("true");
    let apps = binding_apps(service, ctx).await?;
    if !apps.is_empty() && !forced {
        let message = format!(
            "deletion waits: App(s) {} still bind this service; remove it from their spec.services, \
             or annotate the BackingService {FORCE_DELETE_ANNOTATION}=true to delete it anyway",
            apps.join(", ")
        );
        report
            .conditions
            .set("DeletionBlocked", true, "BoundToApps", &message);
        report
            .write(
                ctx,
                BackingServicePhase::Deleting,
                "DeletionBlocked",
                message.clone(),
            )
            .await?;
        // Bindings change on Apps, which this controller does not watch: look again shortly.
        return Err(Error::Waiting(message));
    }
    let message = match (apps.is_empty(), service.spec.deletion_policy) {
        (false, _) => format!("forced deletion while App(s) {} bind it", apps.join(", ")),
        (true, DeletionPolicy::Retain) => {
            "uninstalling; the data volume claims are kept (deletionPolicy Retain)".into()
        }
        (true, DeletionPolicy::Delete) => {
            "uninstalling; the data volume claims will be deleted (deletionPolicy Delete)".into()
        }
    };
    report.conditions.set(
        "DeletionBlocked",
        false,
        "Deleting",
        "nothing binds the service, or deletion was forced",
    );
    report
        .write(ctx, BackingServicePhase::Deleting, "Deleting", message)
        .await?;

    // Uninstall: the helm-controller's own finalizer on the HelmChart runs `helm uninstall`;
    // the chart is gone once it has.
    let charts = Api::<DynamicObject>::namespaced_with(
        ctx.client.clone(),
        &ctx.config.agent_namespace,
        &helm_chart_resource(),
    );
    let release = service_chart_name(&namespace, &name);
    match charts.get_metadata_opt(&release).await {
        Ok(Some(chart)) => {
            if chart.metadata.deletion_timestamp.is_none() {
                super::delete_if_present(&charts, &release, &DeleteParams::background()).await?;
            }
            return Err(Error::Waiting(format!(
                "waiting for Helm release {release} to be uninstalled"
            )));
        }
        Ok(None) => {}
        // No HelmChart CRD: nothing was ever installed.
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(err) => return Err(err.into()),
    }

    // `helm uninstall` keeps a StatefulSet's claims: delete or report them here.
    let claims = Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &namespace);
    let selector = format!("{SERVICE_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}");
    let listed: Vec<String> = claims
        .list_metadata(&ListParams::default().labels(&selector))
        .await?
        .items
        .iter()
        .map(|c| c.name_any())
        .collect();
    let credentials = desired::Names::of(service).credentials;
    match service.spec.deletion_policy {
        DeletionPolicy::Delete => {
            if !listed.is_empty() {
                for claim in &listed {
                    super::delete_if_present(&claims, claim, &DeleteParams::background()).await?;
                }
                return Err(Error::Waiting(format!(
                    "waiting for volume claim(s) {} to be deleted",
                    listed.join(", ")
                )));
            }
            ctx.publish(
                &service.object_ref(&()),
                EventType::Normal,
                "Deleted",
                "Delete",
                "uninstalled; data volume claims and Secrets deleted",
            )
            .await;
        }
        DeletionPolicy::Retain => {
            // The credentials stay with the data: without them the retained data is locked.
            let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &namespace);
            if secrets.get_metadata_opt(&credentials).await?.is_some() {
                let patch = json!({"metadata": {"ownerReferences": null}});
                secrets
                    .patch(&credentials, &PatchParams::default(), &Patch::Merge(&patch))
                    .await?;
            }
            let kept = if listed.is_empty() {
                "no data volume claims".to_string()
            } else {
                format!("volume claim(s) {}", listed.join(", "))
            };
            ctx.publish(
                &service.object_ref(&()),
                EventType::Normal,
                "Retained",
                "Delete",
                format!(
                    "uninstalled; kept {kept} and Secret {credentials} (a new BackingService {name} of type \
                     {} reattaches them; delete them to free the storage)",
                    service.spec.service_type
                ),
            )
            .await;
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sts(annotation: &str, ready: i32, observed: i64) -> StatefulSet {
        serde_json::from_value(json!({
            "metadata": {"name": "db-postgresql", "generation": 2},
            "spec": {"replicas": 1, "serviceName": "x", "selector": {},
                     "template": {"metadata": {"annotations": {GENERATION_ANNOTATION: annotation}}}},
            "status": {"replicas": 1, "updatedReplicas": 1, "readyReplicas": ready, "availableReplicas": ready,
                       "observedGeneration": observed, "currentRevision": "r2", "updateRevision": "r2"},
        }))
        .unwrap()
    }

    #[test]
    fn rolled_out_means_this_generation_ready_and_available() {
        assert_eq!(rolled_out(Some(&sts("3", 1, 2)), "3"), Ok(()));
        assert!(
            rolled_out(Some(&sts("2", 1, 2)), "3")
                .unwrap_err()
                .contains("generation 3")
        );
        assert!(
            rolled_out(Some(&sts("3", 0, 2)), "3")
                .unwrap_err()
                .contains("0 of 1")
        );
        assert!(
            rolled_out(Some(&sts("3", 1, 1)), "3").is_err(),
            "status of an older spec"
        );
        assert!(rolled_out(None, "3").is_err());
    }
}
