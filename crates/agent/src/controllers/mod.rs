//! One controller per kind. They share a [`Context`]; each `reconcile` dispatches through
//! `kube::runtime::finalizer` (where cleanup matters) to idempotent apply / cleanup functions,
//! writes children and status with server-side apply under [`FIELD_MANAGER`], and builds the
//! objects it wants from pure functions that need no client.
//!
//! Controllers know the CRD types and kube; never the tunnel or the protocol.

pub mod app;
pub mod appbuild;
pub mod apprun;
pub mod backingservice;
mod conditions;
mod context;
pub mod deploy;
mod error;
pub mod install_access;
mod job_state;
mod jobs;
pub mod metrics;
pub mod project;
pub mod registry;
pub mod release;
pub mod team;

use std::future::Future;
use std::sync::Arc;

pub use conditions::{ConditionSet, set_condition};
pub use context::{CONTROLLERS, Config, Context};
pub use error::{Error, Result};

pub use crate::names::FIELD_MANAGER;
/// Label on every object the agent creates.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "shapeblock-agent";
/// Label naming the Project an object belongs to (on namespaces: the Project that owns it).
pub const PROJECT_LABEL: &str = "apps.shapeblock.io/project";
/// Label naming the App an object belongs to.
pub const APP_LABEL: &str = "apps.shapeblock.io/app";
/// Label naming the Team a RoleBinding belongs to.
pub const TEAM_LABEL: &str = "apps.shapeblock.io/team";

/// The annotation `kubectl apply` leaves: a copy of the whole object, never read here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what a cached object carries but no reconcile reads: `managedFields` (a JSON tree per
/// field manager, the largest part of most objects' metadata; measured at 8.8 MiB of the
/// agent's 37 MiB heap peak in the projects bench) and kubectl's last-applied copy. Applied to
/// every reflector before the store; writes are server-side applies built from scratch, so
/// nothing is ever sent back from a cached object.
pub(crate) fn slim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// Reconciles a controller runs at once unless `--reconcile-concurrency` says otherwise.
/// Unbounded (kube's default), 500 new Projects meant 500 reconciles in flight, each task with
/// its future (11 KiB) and its request: 8 MiB of the agent's 20 MiB heap peak in the projects
/// bench, while the apiserver served them no faster.
pub const DEFAULT_CONCURRENCY: u16 = 16;

/// A controller over `api` like `Controller::new`, its store kept [`slim`], running at most
/// `ctx.config.concurrency` reconciles at once.
pub(crate) fn controller<K>(
    api: kube::Api<kube::core::DeserializeGuard<K>>,
    config: kube::runtime::watcher::Config,
    ctx: &Arc<Context>,
) -> kube::runtime::Controller<kube::core::DeserializeGuard<K>>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (reader, writer) = reflector::store();
    // The store takes every event; only the echoes of the agent's own writes (which it went
    // on from already, see `Context::expect_echo`) trigger nothing.
    let echoes = ctx.clone();
    let objects = reflector(writer, watcher(api, config).modify(slim))
        .applied_objects()
        .filter(move |object| {
            std::future::ready(!object.as_ref().is_ok_and(|object| echoes.is_echo(object)))
        });
    kube::runtime::Controller::for_stream(objects, reader)
        .with_config(kube::runtime::controller::Config::default().concurrency(ctx.config.concurrency))
}

/// Runs every controller until `shutdown` resolves, then lets in-flight reconciles finish.
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + Clone + 'static) {
    tokio::join!(
        project::run(ctx.clone(), shutdown.clone()),
        app::run(ctx.clone(), shutdown.clone()),
        appbuild::run(ctx.clone(), shutdown.clone()),
        apprun::run(ctx.clone(), shutdown.clone()),
        backingservice::run(ctx.clone(), shutdown.clone()),
        team::run(ctx, shutdown),
    );
}

/// Reports an object the agent cannot decode (for example written against a newer CRD): a
/// Warning Event and a `Ready=False/InvalidObject` condition, then waits for a change. The
/// watch keeps serving every other object.
pub(crate) async fn report_undecodable<K>(
    ctx: &Context,
    invalid: &kube::core::error_boundary::InvalidObject,
) -> Result<kube::runtime::controller::Action>
where
    K: kube::Resource<DynamicType = ()>,
{
    use k8s_openapi::api::core::v1::ObjectReference;
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::discovery::ApiResource;

    let meta = &invalid.metadata;
    let name = meta.name.clone().unwrap_or_default();
    let message = format!("the agent cannot read this {}: {}", K::kind(&()), invalid.error);
    tracing::warn!(kind = %K::kind(&()), %name, error = %invalid.error, "undecodable object");
    let reference = ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        field_path: None,
    };
    ctx.publish(
        &reference,
        kube::runtime::events::EventType::Warning,
        "InvalidObject",
        "Decode",
        &message,
    )
    .await;
    let resource = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = match &meta.namespace {
        Some(ns) => Api::namespaced_with(ctx.client.clone(), ns, &resource),
        None => Api::all_with(ctx.client.clone(), &resource),
    };
    let mut conditions = ConditionSet::new(&[], meta.generation);
    conditions.set("Ready", false, "InvalidObject", &message);
    let patch = serde_json::json!({
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "status": {"phase": "Failed", "message": message, "conditions": conditions.conditions}
    });
    api.patch_status(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await?;
    Ok(kube::runtime::controller::Action::await_change())
}

/// Refuses an object outside a Project namespace (see [`Context::not_a_project_namespace`]):
/// `Ready=False/NotAProjectNamespace`, phase `Failed`, one Warning Event, and nothing created;
/// then waits for a change. Objects being deleted pass, so that a finalizer set before this
/// check existed can still be cleaned up. `Ok(None)`: the namespace is served.
pub(crate) async fn refuse_outside_projects<K>(
    ctx: &Context,
    object: &K,
) -> Result<Option<kube::runtime::controller::Action>>
where
    K: kube::Resource<DynamicType = ()> + serde::Serialize,
{
    use kube::ResourceExt;
    use kube::api::{Api, DynamicObject, Patch, PatchParams};
    use kube::discovery::ApiResource;

    const REASON: &str = "NotAProjectNamespace";
    if object.meta().deletion_timestamp.is_some() {
        return Ok(None);
    }
    let namespace = object.namespace().unwrap_or_default();
    let Some(message) = ctx.not_a_project_namespace(&namespace).await? else {
        return Ok(None);
    };
    let status = serde_json::to_value(object).unwrap_or_default()["status"].take();
    let conditions: Vec<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> =
        serde_json::from_value(status["conditions"].clone()).unwrap_or_default();
    let already = conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.reason == REASON)
        && status["observedGeneration"].as_i64() == object.meta().generation;
    if already {
        return Ok(Some(kube::runtime::controller::Action::await_change()));
    }
    tracing::warn!(kind = %K::kind(&()), %namespace, name = %object.name_any(), "refused outside a Project namespace");
    ctx.publish(
        &object.object_ref(&()),
        kube::runtime::events::EventType::Warning,
        REASON,
        "Validate",
        &message,
    )
    .await;
    let mut conditions = ConditionSet::new(&conditions, object.meta().generation);
    conditions.set("Ready", false, REASON, &message);
    let resource = ApiResource::erase::<K>(&());
    let mut status = serde_json::json!({
        "phase": "Failed", "message": message,
        "observedGeneration": object.meta().generation,
        "conditions": conditions.conditions,
    });
    // Builds and runs say why they ended in `status.reason` too; the other kinds have none.
    if matches!(resource.kind.as_str(), "AppBuild" | "AppRun") {
        status["reason"] = REASON.into();
    }
    let patch =
        serde_json::json!({"apiVersion": resource.api_version, "kind": resource.kind, "status": status});
    Api::<DynamicObject>::namespaced_with(ctx.client.clone(), &namespace, &resource)
        .patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    Ok(Some(kube::runtime::controller::Action::await_change()))
}

/// Writes `status` (server-side apply under [`FIELD_MANAGER`]) on `object`, conditional on the
/// `resourceVersion` the decision was made from: a reconcile working from a stale cache (say,
/// before a newer build cancelled this one) gets [`Error::Waiting`] and retries with fresh
/// state instead of overwriting a final phase.
pub(crate) async fn apply_status_at_version<K>(
    ctx: &Context,
    object: &K,
    status: &impl serde::Serialize,
) -> Result<K>
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    use kube::ResourceExt;
    use kube::api::{Api, Patch, PatchParams};
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"resourceVersion": object.resource_version()},
        "status": status,
    });
    Api::<K>::namespaced(ctx.client.clone(), &object.namespace().unwrap_or_default())
        .patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(|err| match err {
            kube::Error::Api(status) if status.code == 409 => Error::Waiting(format!(
                "the {} changed since it was read; reconciling again",
                K::kind(&())
            )),
            err => err.into(),
        })
}

/// Marks a controller synced once its store has its initial list, for `/readyz`.
///
/// A store's readiness future wakes only its most recent poller, and the controller itself
/// waits on it too, so poll with a short timeout instead of waiting once.
pub(crate) fn mark_synced_when_ready<K>(ctx: Arc<Context>, store: kube::runtime::reflector::Store<K>)
where
    K: kube::Resource + Clone + Send + Sync + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone + Send + Sync,
{
    tokio::spawn(async move {
        loop {
            match tokio::time::timeout(std::time::Duration::from_millis(200), store.wait_until_ready()).await
            {
                Ok(Ok(())) => return ctx.mark_synced(),
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        }
    });
}

/// What a controller's result stream ends each reconcile with. Failures were already counted,
/// logged and scheduled by the error policy; this only keeps a trace at debug level.
pub(crate) async fn log_reconcile_end<T, E: std::fmt::Display>(result: Result<T, E>) {
    if let Err(err) = result {
        tracing::debug!(%err, "reconcile ended with an error");
    }
}

/// Deletes an object that may already be gone. Returns whether this call deleted it.
pub(crate) async fn delete_if_present<K>(
    api: &kube::Api<K>,
    name: &str,
    params: &kube::api::DeleteParams,
) -> Result<bool>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(false),
        Err(err) => Err(err.into()),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Namespace;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    use super::*;

    #[test]
    fn a_slim_object_keeps_everything_but_managed_fields_and_the_last_applied_copy() {
        let mut namespace: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "shop",
                "labels": {PROJECT_LABEL: "shop"},
                "annotations": {LAST_APPLIED: "{\"a\":1}", "apps.shapeblock.io/display-name": "Shop"},
                "finalizers": ["kubernetes"],
                "resourceVersion": "7",
            }
        }))
        .unwrap();
        namespace.metadata.managed_fields = Some(vec![ManagedFieldsEntry {
            manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        }]);
        let mut expected = namespace.clone();
        expected.metadata.managed_fields = None;
        expected
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(LAST_APPLIED);
        slim(&mut namespace);
        assert_eq!(namespace, expected);
        assert_eq!(namespace.metadata.annotations.unwrap().len(), 1);
    }
}
