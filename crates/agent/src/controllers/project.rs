//! Project controller: a namespace per Project, the registry pull secret copied into it and
//! kept in sync with its source, and the optional quota and container defaults.
//!
//! One file past 600 lines: a Project's reconcile, its deletion (the namespace finalizer and
//! the reports on what holds a namespace) and its desired objects are one lifecycle; the
//! desired objects are the pure functions at the end, unit-tested below.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    LimitRange, LimitRangeItem, LimitRangeSpec, Namespace, ResourceQuota, ResourceQuotaSpec, Secret,
    ServiceAccount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{
    ConditionSet, Context, Error, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, PROJECT_LABEL, Result,
    delete_if_present,
};
use crate::api::{Project, ProjectPhase, ProjectStatus};

const KIND: &str = "Project";
/// Finalizer that keeps a Project until its namespace is gone.
pub const FINALIZER: &str = "apps.shapeblock.io/namespace";
/// Label on pull-secret copies, naming their source (`<namespace>.<name>`).
pub const COPY_OF_LABEL: &str = "apps.shapeblock.io/copy-of";
const QUOTA_NAME: &str = "shapeblock-quota";
const LIMIT_RANGE_NAME: &str = "shapeblock-defaults";
/// Pod Security level of project namespaces: `baseline` forbids privileged pods, host access and
/// added capabilities, yet lets kaniko run as root (it needs to, to unpack image layers).
pub const POD_SECURITY_LEVEL: &str = "baseline";

/// The Project controller's caches: what it owns (metadata only, selected by label) and the
/// source pull secret. They save a GET per child per reconcile; a miss falls back to the API.
struct State {
    ctx: Arc<Context>,
    namespaces: Store<PartialObjectMeta<Namespace>>,
    quotas: Store<PartialObjectMeta<ResourceQuota>>,
    limit_ranges: Store<PartialObjectMeta<LimitRange>>,
    source: Store<Secret>,
}

/// Runs the Project controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let projects = Api::<DeserializeGuard<Project>>::all(client.clone());
    // Children, watched by label and as metadata only: the body is never needed to notice that
    // one changed or vanished, and an unselected Secret watch would cache every Secret.
    let owned =
        || watcher::Config::default().labels(&format!("{PROJECT_LABEL},{MANAGED_BY_LABEL}={MANAGED_BY}"));
    let (namespaces, namespace_writer) = reflector::store();
    let namespace_events = reflector(
        namespace_writer,
        watcher(Api::<PartialObjectMeta<Namespace>>::all(client.clone()), owned()).modify(super::slim),
    )
    .touched_objects();
    let (quotas, quota_writer) = reflector::store();
    let quota_events = reflector(
        quota_writer,
        watcher(
            Api::<PartialObjectMeta<ResourceQuota>>::all(client.clone()),
            owned(),
        )
        .modify(super::slim),
    )
    .touched_objects();
    let (limit_ranges, limit_writer) = reflector::store();
    let limit_events = reflector(
        limit_writer,
        watcher(Api::<PartialObjectMeta<LimitRange>>::all(client.clone()), owned()).modify(super::slim),
    )
    .touched_objects();
    let copies = watcher(
        Api::<PartialObjectMeta<Secret>>::all(client.clone()),
        watcher::Config::default().labels(COPY_OF_LABEL),
    )
    .touched_objects();

    let controller = super::controller(projects, watcher::Config::default(), &ctx)
        .owns_stream(namespace_events)
        .owns_stream(quota_events)
        .owns_stream(limit_events)
        .owns_stream(copies);
    let store = controller.store();

    // The source pull secret, watched by name: when it changes, every project's copy follows.
    let (source, source_writer) = reflector::store();
    let controller = match &ctx.config.registry_secret {
        Some(name) => {
            let events = reflector(
                source_writer,
                watcher(
                    Api::<Secret>::namespaced(client.clone(), &ctx.config.agent_namespace),
                    watcher::Config::default().fields(&format!("metadata.name={name}")),
                )
                .modify(super::slim),
            )
            .touched_objects();
            let all = store.clone();
            controller.watches_stream(events, move |_| all_projects(&all))
        }
        None => controller,
    };

    super::mark_synced_when_ready(ctx.clone(), store.clone());
    let state = Arc::new(State {
        ctx,
        namespaces,
        quotas,
        limit_ranges,
        source,
    });

    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, state)
        .for_each(super::log_reconcile_end)
        .await;
}

fn all_projects(store: &Store<DeserializeGuard<Project>>) -> Vec<ObjectRef<DeserializeGuard<Project>>> {
    store
        .state()
        .iter()
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

async fn reconcile(guard: Arc<DeserializeGuard<Project>>, state: Arc<State>) -> Result<Action> {
    let ctx = &state.ctx;
    let _timer = ctx.metrics.reconcile(KIND);
    tracing::debug!(kind = KIND, object = %guard.name_any(), "reconciling");
    let project = match &guard.0 {
        Ok(project) => Arc::new(project.clone()),
        Err(invalid) => return super::report_undecodable::<Project>(ctx, invalid).await,
    };
    let api = Api::<Project>::all(ctx.client.clone());
    let key = project.name_any();
    let action = finalizer(&api, FINALIZER, project, |event| async {
        match event {
            Finalizer::Apply(project) => apply(&project, &state).await,
            Finalizer::Cleanup(project) => cleanup(&project, ctx).await,
        }
    })
    .await
    .map_err(Error::from)?;
    ctx.reset_retries(&key);
    Ok(action)
}

fn error_policy(guard: Arc<DeserializeGuard<Project>>, error: &Error, state: Arc<State>) -> Action {
    state.ctx.error_action(&guard.name_any(), KIND, error)
}

async fn apply(project: &Project, state: &State) -> Result<Action> {
    let ctx = &*state.ctx;
    let name = project.name_any();
    let mut conditions = ConditionSet::new(
        project
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default(),
        project.metadata.generation,
    );
    let namespaces = Api::<Namespace>::all(ctx.client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();

    // Ours and cached: no need to ask. Anything else (not yet cached, or not ours) is checked
    // against the API, so a foreign namespace is never mistaken for a free name.
    let cached = state.namespaces.get(&ObjectRef::new(&name));
    let existing = match cached {
        Some(meta) if is_owned_by(&meta.metadata, &name) => Some(meta.metadata.clone()),
        _ => namespaces.get_metadata_opt(&name).await?.map(|m| m.metadata),
    };
    if let Some(existing) = existing {
        if !is_owned_by(&existing, &name) {
            let message = format!(
                "namespace {name} already exists and was not created for this Project; \
                 the agent does not adopt or delete it: rename the Project or remove the namespace"
            );
            conditions.set("NamespaceReady", false, "NamespaceConflict", &message);
            conditions.set("Ready", false, "NamespaceConflict", &message);
            let newly = phase_of(project) != Some(ProjectPhase::Failed);
            write_status(ctx, project, ProjectPhase::Failed, &message, None, conditions).await?;
            if newly {
                ctx.publish(
                    &project.object_ref(&()),
                    EventType::Warning,
                    "NamespaceConflict",
                    "CreateNamespace",
                    &message,
                )
                .await;
            }
            // Not watched (it carries none of our labels): look again now and then.
            return Ok(Action::requeue(std::time::Duration::from_secs(300)));
        }
        if existing.deletion_timestamp.is_some() {
            let message = format!("waiting for namespace {name} to finish terminating");
            conditions.set("NamespaceReady", false, "NamespaceTerminating", &message);
            conditions.set("Ready", false, "NamespaceTerminating", &message);
            write_status(ctx, project, ProjectPhase::Pending, &message, None, conditions).await?;
            return Err(Error::Waiting(message));
        }
    }

    let owner = owner_reference(project);
    namespaces
        .patch(&name, &params, &Patch::Apply(desired_namespace(project, &owner)))
        .await?;
    conditions.set(
        "NamespaceReady",
        true,
        "Created",
        format!("namespace {name} is ready"),
    );

    // App, run and service pods use the namespace's `default` ServiceAccount: without a token
    // mounted they cannot even discover the API (that account has no RoleBinding; a token would
    // only identify the pod). The controller-manager creates `default` only if it is missing.
    Api::<ServiceAccount>::namespaced(ctx.client.clone(), &name)
        .patch(
            DEFAULT_SERVICE_ACCOUNT,
            &params,
            &Patch::Apply(desired_default_service_account()),
        )
        .await?;

    let pull_secret_ok = sync_pull_secret(project, state, &owner, &mut conditions).await?;

    // Delete what the spec no longer asks for, if the (label-selected) cache says it exists.
    let quotas = Api::<ResourceQuota>::namespaced(ctx.client.clone(), &name);
    match desired_quota(project, &owner) {
        Some(quota) => drop(quotas.patch(QUOTA_NAME, &params, &Patch::Apply(quota)).await?),
        None if state
            .quotas
            .get(&ObjectRef::new(QUOTA_NAME).within(&name))
            .is_some() =>
        {
            delete_if_present(&quotas, QUOTA_NAME, &DeleteParams::default()).await?;
        }
        None => {}
    }
    let limits = Api::<LimitRange>::namespaced(ctx.client.clone(), &name);
    match desired_limit_range(project, &owner) {
        Some(range) => drop(
            limits
                .patch(LIMIT_RANGE_NAME, &params, &Patch::Apply(range))
                .await?,
        ),
        None if state
            .limit_ranges
            .get(&ObjectRef::new(LIMIT_RANGE_NAME).within(&name))
            .is_some() =>
        {
            delete_if_present(&limits, LIMIT_RANGE_NAME, &DeleteParams::default()).await?;
        }
        None => {}
    }

    let (phase, message) = if pull_secret_ok {
        conditions.set("Ready", true, "Reconciled", format!("namespace {name} is ready"));
        (ProjectPhase::Ready, format!("namespace {name} is ready"))
    } else {
        let message = conditions
            .conditions
            .iter()
            .find(|c| c.type_ == "PullSecretSynced")
            .map(|c| c.message.clone())
            .unwrap_or_default();
        conditions.set("Ready", false, "PullSecretMissing", &message);
        (ProjectPhase::Pending, message)
    };
    let became_ready = phase == ProjectPhase::Ready && phase_of(project) != Some(ProjectPhase::Ready);
    write_status(ctx, project, phase, &message, Some(name.clone()), conditions).await?;
    if became_ready {
        ctx.publish(
            &project.object_ref(&()),
            EventType::Normal,
            "Ready",
            "Reconcile",
            &message,
        )
        .await;
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// Copies the source pull secret into the project. Returns whether the copy is in place
/// (or none is configured).
async fn sync_pull_secret(
    project: &Project,
    state: &State,
    owner: &OwnerReference,
    conditions: &mut ConditionSet,
) -> Result<bool> {
    let ctx = &*state.ctx;
    let Some(source_name) = &ctx.config.registry_secret else {
        conditions.set(
            "PullSecretSynced",
            true,
            "NotConfigured",
            "no registry pull secret is configured",
        );
        return Ok(true);
    };
    let source_ns = &ctx.config.agent_namespace;
    let source = match state.source.get(&ObjectRef::new(source_name).within(source_ns)) {
        Some(cached) => Some((*cached).clone()),
        None => {
            Api::<Secret>::namespaced(ctx.client.clone(), source_ns)
                .get_opt(source_name)
                .await?
        }
    };
    let Some(source) = source else {
        let message = format!(
            "registry pull secret {source_ns}/{source_name} does not exist: create it (type \
             kubernetes.io/dockerconfigjson) and every project gets a copy"
        );
        conditions.set("PullSecretSynced", false, "SourceSecretMissing", message);
        return Ok(false);
    };
    let copy = desired_pull_secret(project, &source, source_ns, owner);
    Api::<Secret>::namespaced(ctx.client.clone(), &project.name_any())
        .patch(
            source_name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(copy),
        )
        .await?;
    conditions.set(
        "PullSecretSynced",
        true,
        "Copied",
        format!("{source_name} copied from namespace {source_ns}"),
    );
    Ok(true)
}

async fn cleanup(project: &Project, ctx: &Context) -> Result<Action> {
    let name = project.name_any();
    let namespaces = Api::<Namespace>::all(ctx.client.clone());
    let Some(namespace) = namespaces.get_opt(&name).await? else {
        return Ok(Action::await_change());
    };
    if !is_owned_by(&namespace.metadata, &name) {
        // Somebody else's namespace: never ours to delete.
        return Ok(Action::await_change());
    }
    if phase_of(project) != Some(ProjectPhase::Terminating) {
        let message = format!("deleting namespace {name}");
        report_terminating(
            ctx,
            project,
            "Terminating",
            &message,
            EventType::Normal,
            "DeletingNamespace",
        )
        .await?;
    }
    if namespace.metadata.deletion_timestamp.is_none() {
        // Releases are uninstalled first, while the namespace and the RoleBindings that let
        // their install Jobs act in it still exist (the namespace controller would delete
        // those bindings before the uninstall could run). A helm-controller that does not get
        // there in time must not keep the namespace: it goes anyway, and takes the releases'
        // objects with it.
        let remaining = delete_helm_charts(ctx, &name).await;
        let deleting_for = project
            .metadata
            .deletion_timestamp
            .as_ref()
            .map(|t| (k8s_openapi::jiff::Timestamp::now() - t.0).get_seconds())
            .unwrap_or_default();
        if remaining > 0 && deleting_for < UNINSTALL_GRACE_SECONDS {
            return Err(Error::Waiting(format!(
                "waiting for {remaining} Helm release(s) deploying into {name} to be uninstalled before the namespace goes"
            )));
        }
        if !delete_if_present(&namespaces, &name, &DeleteParams::background()).await? {
            return Ok(Action::await_change());
        }
        return Err(Error::Waiting(format!("namespace {name} is terminating")));
    }
    // Charts whose uninstall can no longer run (their namespace is going) are let go, or
    // they would stay in the agent's namespace with a failing Job forever.
    release_stuck_helm_charts(ctx, &name).await;
    // Only once the namespace controller says content remains: before that it is still
    // deleting, and listing what holds it every retry would be wasted requests.
    let content_remains = namespace
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| {
            c.iter().any(|c| {
                c.status == "True"
                    && matches!(
                        c.type_.as_str(),
                        "NamespaceContentRemaining" | "NamespaceFinalizersRemaining"
                    )
            })
        });
    let holders = if content_remains {
        foreign_finalizers(ctx, &name).await?
    } else {
        Vec::new()
    };
    if let Some(message) = blocked_deletion(&name, &namespace, &holders) {
        // Said on the Project (and once as a Warning Event) instead of a bare "terminating":
        // nothing the agent does will finish it, whoever put the finalizer there must.
        if project.status.as_ref().and_then(|s| s.message.as_deref()) != Some(message.as_str()) {
            report_terminating(
                ctx,
                project,
                "DeletionBlocked",
                &message,
                EventType::Warning,
                "DeletionBlocked",
            )
            .await?;
        }
        // An error, not Ok: Ok from cleanup would drop the finalizer and the Project with it.
        // The namespace watch wakes us when it is gone; meanwhile look at what holds it.
        return Err(Error::Waiting(message));
    }
    // The namespace watch wakes us when it is gone; the error only schedules a fallback retry.
    Err(Error::Waiting(format!("namespace {name} is terminating")))
}

/// A deleting Project's status (`Terminating`, `Ready=False/<reason>`) and an Event.
async fn report_terminating(
    ctx: &Context,
    project: &Project,
    reason: &str,
    message: &str,
    event_type: EventType,
    event_reason: &str,
) -> Result<()> {
    let mut conditions = ConditionSet::new(
        project
            .status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default(),
        project.metadata.generation,
    );
    conditions.set("Ready", false, reason, message);
    write_status(
        ctx,
        project,
        ProjectPhase::Terminating,
        message,
        Some(project.name_any()),
        conditions,
    )
    .await?;
    ctx.publish(
        &project.object_ref(&()),
        event_type,
        event_reason,
        "Delete",
        message,
    )
    .await;
    Ok(())
}

/// How long a Project's deletion waits for its releases to be uninstalled before it deletes
/// the namespace anyway.
const UNINSTALL_GRACE_SECONDS: i64 = 120;

/// Removes the finalizers of the project's HelmCharts that are being deleted: once the
/// namespace is terminating, the namespace controller removes what their releases made, and
/// the install Jobs can no longer act there.
async fn release_stuck_helm_charts(ctx: &Context, project: &str) {
    let (charts, listed) = project_helm_charts(ctx, project).await;
    let Ok(list) = listed else {
        return;
    };
    for chart in list.items {
        if chart.metadata.deletion_timestamp.is_none() || chart.finalizers().is_empty() {
            continue;
        }
        let patch = serde_json::json!({"metadata": {"finalizers": null}});
        match charts
            .patch(&chart.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(project, chart = %chart.name_any(), "let go of a HelmChart whose namespace is terminating")
            }
            Err(err) => {
                tracing::warn!(project, chart = %chart.name_any(), %err, "could not let go of a HelmChart")
            }
        }
    }
}

/// The agent's own objects in `namespace` that carry a finalizer the agent did not put there,
/// as `Kind name (finalizer, ...)`. The kinds the agent serves are the ones a tenant's tools
/// most likely hold; for any other the namespace's own conditions say which resource.
async fn foreign_finalizers(ctx: &Context, namespace: &str) -> Result<Vec<String>> {
    use crate::api::{App, AppBuild, AppRun, BackingService};
    async fn held<K>(ctx: &Context, namespace: &str) -> Result<Vec<String>>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        let listed = Api::<PartialObjectMeta<K>>::namespaced(ctx.client.clone(), namespace)
            .list_metadata(&kube::api::ListParams::default())
            .await?;
        Ok(listed
            .items
            .iter()
            .filter_map(|object| {
                let foreign: Vec<&str> = object
                    .finalizers()
                    .iter()
                    .map(String::as_str)
                    .filter(|f| is_foreign(f))
                    .collect();
                (!foreign.is_empty())
                    .then(|| format!("{} {} ({})", K::kind(&()), object.name_any(), foreign.join(", ")))
            })
            .collect())
    }
    let mut holders = held::<App>(ctx, namespace).await?;
    holders.extend(held::<AppBuild>(ctx, namespace).await?);
    holders.extend(held::<AppRun>(ctx, namespace).await?);
    holders.extend(held::<BackingService>(ctx, namespace).await?);
    Ok(holders)
}

/// Whether a finalizer is neither the agent's nor one Kubernetes' own controllers remove by
/// themselves (PVC protection, foreground deletion, Job tracking): one that may never go.
fn is_foreign(finalizer: &str) -> bool {
    !(finalizer.starts_with("apps.shapeblock.io/")
        || finalizer.starts_with("kubernetes.io/")
        || finalizer.starts_with("batch.kubernetes.io/")
        || matches!(finalizer, "kubernetes" | "foregroundDeletion" | "orphan"))
}

/// Why a terminating namespace is not gone, if something other than the agent holds it: the
/// objects with foreign finalizers, and what kube-controller-manager's namespace controller
/// reports (`NamespaceFinalizersRemaining`, `NamespaceContentRemaining`, deletion failures).
pub fn blocked_deletion(name: &str, namespace: &Namespace, holders: &[String]) -> Option<String> {
    let reported: Vec<String> = namespace
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| {
            c.status == "True"
                && matches!(
                    c.type_.as_str(),
                    "NamespaceFinalizersRemaining"
                        | "NamespaceContentRemaining"
                        | "NamespaceDeletionContentFailure"
                        | "NamespaceDeletionDiscoveryFailure"
                        | "NamespaceDeletionGroupVersionParsingFailure"
                )
        })
        .filter_map(|c| c.message.clone())
        .collect();
    // "Some content in the namespace has finalizers remaining: a in 1 resource instances, b in 2 ..."
    let finalizers_remain = namespace
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .filter(|c| c.type_ == "NamespaceFinalizersRemaining" && c.status == "True")
        .filter_map(|c| {
            c.message
                .as_deref()?
                .split_once(": ")
                .map(|(_, list)| list.to_owned())
        })
        .any(|list| {
            list.split(", ")
                .filter_map(|item| item.split(" in ").next())
                .any(is_foreign)
        });
    if holders.is_empty() && !finalizers_remain {
        return None;
    }
    let mut message = format!("namespace {name} cannot finish deleting");
    if !holders.is_empty() {
        message.push_str(&format!(
            ": held by {}, finalizer(s) the agent did not set: whoever set them must finish and take them \
             out of metadata.finalizers (or remove them by hand: `kubectl -n {name} edit <kind> <name>`)",
            holders.join("; ")
        ));
    }
    if !reported.is_empty() {
        message.push_str(&format!("; the namespace reports: {}", reported.join("; ")));
    }
    Some(message)
}

/// The HelmCharts API of the agent's namespace and the (metadata of the) charts that deploy
/// into `project`.
async fn project_helm_charts(
    ctx: &Context,
    project: &str,
) -> (
    Api<kube::api::DynamicObject>,
    kube::Result<kube::core::ObjectList<kube::core::PartialObjectMeta<kube::api::DynamicObject>>>,
) {
    let charts = Api::<kube::api::DynamicObject>::namespaced_with(
        ctx.client.clone(),
        &ctx.config.agent_namespace,
        &super::deploy::helm_chart_resource(),
    );
    let selector = format!("{PROJECT_LABEL}={project},{MANAGED_BY_LABEL}={MANAGED_BY}");
    let listed = charts
        .list_metadata(&kube::api::ListParams::default().labels(&selector))
        .await;
    (charts, listed)
}

/// Deletes the HelmCharts (in the agent's namespace) that deploy into the project, so the
/// helm-controller stops installing into a namespace that is going away, and returns how many
/// are still there (their uninstall not finished). Best effort: the helm-controller's own
/// finalizer runs the uninstall, and a failure here must not keep the namespace alive.
async fn delete_helm_charts(ctx: &Context, project: &str) -> usize {
    let (charts, listed) = project_helm_charts(ctx, project).await;
    match listed {
        Ok(list) => {
            let remaining = list.items.len();
            for chart in list
                .items
                .iter()
                .filter(|c| c.metadata.deletion_timestamp.is_none())
            {
                if let Err(err) = charts
                    .delete(&chart.name_any(), &DeleteParams::background())
                    .await
                {
                    tracing::warn!(project, chart = %chart.name_any(), %err, "could not delete HelmChart");
                }
            }
            remaining
        }
        // No HelmChart CRD (no helm-controller installed): nothing was deployed.
        Err(kube::Error::Api(status)) if status.code == 404 => 0,
        Err(err) => {
            tracing::warn!(project, %err, "could not list the project's HelmCharts");
            0
        }
    }
}

fn phase_of(project: &Project) -> Option<ProjectPhase> {
    project.status.as_ref().and_then(|s| s.phase)
}

/// The ServiceAccount pods of a namespace run as unless they name another.
const DEFAULT_SERVICE_ACCOUNT: &str = "default";

/// The project's `default` ServiceAccount, as far as the agent cares: no token in pods unless
/// a pod asks for one.
fn desired_default_service_account() -> serde_json::Value {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": DEFAULT_SERVICE_ACCOUNT},
        "automountServiceAccountToken": false,
    })
}

/// Whether a namespace was created by the agent for this Project.
fn is_owned_by(namespace: &ObjectMeta, project: &str) -> bool {
    let labels = namespace.labels.clone().unwrap_or_default();
    labels.get(PROJECT_LABEL).map(String::as_str) == Some(project)
        && labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
}

async fn write_status(
    ctx: &Context,
    project: &Project,
    phase: ProjectPhase,
    message: &str,
    namespace: Option<String>,
    conditions: ConditionSet,
) -> Result<()> {
    let status = ProjectStatus {
        phase: Some(phase),
        message: Some(message.to_owned()),
        namespace,
        observed_generation: project.metadata.generation,
        conditions: conditions.conditions,
    };
    // An unchanged status is not written: no request, no watch event, no extra reconcile.
    if project.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": Project::api_version(&()),
        "kind": KIND,
        "status": status,
    });
    let written = Api::<Project>::all(ctx.client.clone())
        .patch_status(
            &project.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    // The status is the last thing a reconcile writes: its watch event would find nothing to do.
    ctx.expect_echo(&written);
    Ok(())
}

/// The controller owner reference children of a Project carry.
pub fn owner_reference(project: &Project) -> OwnerReference {
    project
        .controller_owner_ref(&())
        .expect("a Project read from the apiserver has a name and uid")
}

fn child_labels(project: &Project) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (PROJECT_LABEL.to_string(), project.name_any()),
    ])
}

/// The namespace of a Project: its labels (user's first, ours win), display annotations and
/// the Pod Security level.
pub fn desired_namespace(project: &Project, owner: &OwnerReference) -> Namespace {
    let mut labels = project.spec.namespace_labels.clone();
    labels.extend(child_labels(project));
    labels.insert(
        "pod-security.kubernetes.io/enforce".into(),
        POD_SECURITY_LEVEL.into(),
    );
    let mut annotations = BTreeMap::new();
    if let Some(display) = &project.spec.display_name {
        annotations.insert("apps.shapeblock.io/display-name".to_string(), display.clone());
    }
    if let Some(description) = &project.spec.description {
        annotations.insert("apps.shapeblock.io/description".to_string(), description.clone());
    }
    Namespace {
        metadata: ObjectMeta {
            name: Some(project.name_any()),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The project's copy of the registry pull secret: same type and data as the source.
pub fn desired_pull_secret(
    project: &Project,
    source: &Secret,
    source_ns: &str,
    owner: &OwnerReference,
) -> Secret {
    let mut labels = child_labels(project);
    labels.insert(COPY_OF_LABEL.into(), format!("{source_ns}.{}", source.name_any()));
    Secret {
        metadata: ObjectMeta {
            name: Some(source.name_any()),
            namespace: Some(project.name_any()),
            labels: Some(labels),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        type_: source.type_.clone(),
        data: source.data.clone(),
        ..Default::default()
    }
}

/// The project's ResourceQuota, if the spec asks for one.
pub fn desired_quota(project: &Project, owner: &OwnerReference) -> Option<ResourceQuota> {
    (!project.spec.resource_quota.is_empty()).then(|| ResourceQuota {
        metadata: child_meta(project, QUOTA_NAME, owner),
        spec: Some(ResourceQuotaSpec {
            hard: Some(project.spec.resource_quota.clone()),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The project's LimitRange (container defaults), if the spec asks for one.
pub fn desired_limit_range(project: &Project, owner: &OwnerReference) -> Option<LimitRange> {
    let defaults = project.spec.container_defaults.as_ref()?;
    if defaults.requests.is_empty() && defaults.limits.is_empty() {
        return None;
    }
    let non_empty = |map: &BTreeMap<_, _>| (!map.is_empty()).then(|| map.clone());
    Some(LimitRange {
        metadata: child_meta(project, LIMIT_RANGE_NAME, owner),
        spec: Some(LimitRangeSpec {
            limits: vec![LimitRangeItem {
                type_: "Container".into(),
                default: non_empty(&defaults.limits),
                default_request: non_empty(&defaults.requests),
                ..Default::default()
            }],
        }),
    })
}

fn child_meta(project: &Project, name: &str, owner: &OwnerReference) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(project.name_any()),
        labels: Some(child_labels(project)),
        owner_references: Some(vec![owner.clone()]),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{BuildResources, ProjectSpec};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn project() -> Project {
        let mut project = Project::new(
            "shop",
            ProjectSpec {
                display_name: Some("Shop".into()),
                namespace_labels: BTreeMap::from([
                    ("team".to_string(), "web".to_string()),
                    (PROJECT_LABEL.to_string(), "spoofed".to_string()),
                ]),
                ..Default::default()
            },
        );
        project.metadata.uid = Some("uid-1".into());
        project
    }

    #[test]
    fn a_namespace_held_by_a_foreign_finalizer_says_by_what() {
        let terminating: Namespace = serde_json::from_value(json!({
            "metadata": {"name": "shop"},
            "status": {"phase": "Terminating", "conditions": [
                {"type": "NamespaceDeletionDiscoveryFailure", "status": "False", "reason": "ResourcesDiscovered", "message": "All resources successfully discovered"},
                {"type": "NamespaceContentRemaining", "status": "True", "reason": "SomeResourcesRemain",
                 "message": "Some resources are remaining: apps.apps.shapeblock.io has 1 resource instances"},
                {"type": "NamespaceFinalizersRemaining", "status": "True", "reason": "SomeFinalizersRemain",
                 "message": "Some content in the namespace has finalizers remaining: example.com/hold in 1 resource instances"},
            ]},
        }))
        .unwrap();
        let holders = vec!["App web (example.com/hold)".to_string()];
        let message = blocked_deletion("shop", &terminating, &holders).unwrap();
        assert!(
            message.contains("held by App web (example.com/hold)"),
            "{message}"
        );
        assert!(
            message.contains("example.com/hold in 1 resource instances"),
            "{message}"
        );
        assert!(!message.contains("successfully discovered"), "{message}");
        // Something else holds it (no App of ours): the namespace's words still say what.
        let message = blocked_deletion("shop", &terminating, &[]).unwrap();
        assert!(message.contains("apps.apps.shapeblock.io has 1"), "{message}");
        // Still deleting content, nothing held: nothing to report.
        let busy: Namespace = serde_json::from_value(json!({
            "metadata": {"name": "shop"}, "status": {"phase": "Terminating"}
        }))
        .unwrap();
        assert_eq!(blocked_deletion("shop", &busy, &[]), None);
        // Only the agent's own finalizers (its cleanup is under way) or Kubernetes' own.
        let ours: Namespace = serde_json::from_value(json!({
            "metadata": {"name": "shop"},
            "status": {"phase": "Terminating", "conditions": [
                {"type": "NamespaceFinalizersRemaining", "status": "True", "reason": "SomeFinalizersRemain",
                 "message": "Some content in the namespace has finalizers remaining: apps.shapeblock.io/release in 1 resource instances, kubernetes.io/pvc-protection in 2 resource instances"},
            ]},
        }))
        .unwrap();
        assert_eq!(blocked_deletion("shop", &ours, &[]), None);
    }

    #[test]
    fn namespace_carries_our_labels_over_the_users() {
        let project = project();
        let ns = desired_namespace(&project, &owner_reference(&project));
        let labels = ns.metadata.labels.unwrap();
        assert_eq!(
            labels[PROJECT_LABEL], "shop",
            "user labels cannot spoof ownership"
        );
        assert_eq!(labels["team"], "web");
        assert_eq!(labels["pod-security.kubernetes.io/enforce"], "baseline");
        assert_eq!(
            ns.metadata.annotations.unwrap()["apps.shapeblock.io/display-name"],
            "Shop"
        );
        assert_eq!(ns.metadata.owner_references.unwrap()[0].uid, "uid-1");
    }

    #[test]
    fn quota_and_limits_only_when_asked_for() {
        let mut project = project();
        let owner = owner_reference(&project);
        assert!(desired_quota(&project, &owner).is_none());
        assert!(desired_limit_range(&project, &owner).is_none());
        project
            .spec
            .resource_quota
            .insert("pods".into(), Quantity("10".into()));
        project.spec.container_defaults = Some(BuildResources {
            requests: BTreeMap::from([("cpu".to_string(), Quantity("100m".into()))]),
            limits: BTreeMap::new(),
        });
        let quota = desired_quota(&project, &owner).unwrap();
        assert_eq!(quota.spec.unwrap().hard.unwrap()["pods"], Quantity("10".into()));
        let range = desired_limit_range(&project, &owner).unwrap().spec.unwrap();
        assert_eq!(
            range.limits[0].default_request.as_ref().unwrap()["cpu"],
            Quantity("100m".into())
        );
        assert!(range.limits[0].default.is_none());
    }

    #[test]
    fn pull_secret_copy_keeps_type_and_data_and_names_its_source() {
        let project = project();
        let source = Secret {
            metadata: ObjectMeta {
                name: Some("registry-credentials".into()),
                ..Default::default()
            },
            type_: Some("kubernetes.io/dockerconfigjson".into()),
            data: Some(BTreeMap::from([(
                ".dockerconfigjson".to_string(),
                k8s_openapi::ByteString(b"{}".to_vec()),
            )])),
            ..Default::default()
        };
        let copy = desired_pull_secret(&project, &source, "shapeblock", &owner_reference(&project));
        assert_eq!(copy.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(copy.type_, source.type_);
        assert_eq!(copy.data, source.data);
        assert_eq!(
            copy.metadata.labels.unwrap()[COPY_OF_LABEL],
            "shapeblock.registry-credentials"
        );
    }
}
