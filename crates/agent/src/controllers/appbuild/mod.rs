//! AppBuild controller: resolve the ref, build the image in a Job (or take the prebuilt one),
//! deploy it through a HelmChart, and call it `Completed` only once the App's Deployment runs
//! this build's image, rolled out and available.
//!
//! One reconcile is a [`Pipeline`] step; its methods live with the step they serve: `image`
//! (resolve, build, push), `rollout` (release command, HelmChart, rollout, rollback) and
//! `record` (status, Events, App fields, history, Jobs released after their logs).

mod failure;
mod image;
mod jobs;
mod record;
mod rollout;

use image::JobOutcome;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ContainerStateTerminated, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

pub use jobs::{BUILD_LABEL, BuildSettings, parse_build_report, parse_commit, release_job};

use super::deploy::rollout::{Rollout, rollout};
use super::deploy::{chart_name, chart_values, deployment_name, helmchart, pending, processes, values};
use super::job_state::{self, JobState};
use super::registry::{self, PushTarget, RegistryError};
use super::{APP_LABEL, ConditionSet, Context, Error, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, Result};
use crate::api::{App, AppBuild, AppBuildPhase, AppBuildStatus, BuildType};

const KIND: &str = "AppBuild";
pub use crate::api::CANCEL_ANNOTATION;
/// Field manager for the App status fields that builds own (`latestBuild`, images).
const BUILD_STATUS_MANAGER: &str = "shapeblock-agent-builds";
const POLL: Duration = Duration::from_secs(3);
/// How often a build waiting for the HelmChart kind looks again.
const HELM_CONTROLLER_RECHECK: Duration = Duration::from_secs(10);

/// Runs the AppBuild controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let builds = Api::<DeserializeGuard<AppBuild>>::all(client.clone());
    let build_jobs = watcher(
        Api::<PartialObjectMeta<Job>>::all(client.clone()),
        watcher::Config::default().labels(BUILD_LABEL),
    )
    .touched_objects();
    let managed = format!("{MANAGED_BY_LABEL}={MANAGED_BY},{APP_LABEL}");
    // Rollouts of App Deployments wake the build that deploys them (the chart labels them).
    let deployments = watcher(
        Api::<PartialObjectMeta<Deployment>>::all(client.clone()),
        watcher::Config::default().labels(APP_LABEL),
    )
    .touched_objects();
    let controller = super::controller(builds, watcher::Config::default(), &ctx).owns_stream(build_jobs);
    let store = controller.store();
    let by_deployment = store.clone();
    let by_chart = store.clone();
    let mut controller = controller.watches_stream(deployments, move |d: PartialObjectMeta<Deployment>| {
        deploying_builds(
            &by_deployment,
            d.namespace().as_deref(),
            d.labels().get(APP_LABEL).map(String::as_str),
        )
    });
    // Without the kind, a watch would fail and retry without end; deploys poll instead and
    // say what is missing (see `deploy`).
    if ctx.helm_charts_served() {
        let charts = watcher(
            Api::<DynamicObject>::namespaced_with(
                client.clone(),
                &ctx.config.agent_namespace,
                &helmchart::resource(),
            ),
            watcher::Config::default().labels(&managed),
        )
        .touched_objects();
        controller = controller.watches_stream_with(
            charts,
            move |chart: DynamicObject| {
                let project = chart.labels().get(super::PROJECT_LABEL).cloned();
                let app = chart.labels().get(APP_LABEL).cloned();
                deploying_builds(&by_chart, project.as_deref(), app.as_deref())
            },
            helmchart::resource(),
        );
    }
    super::mark_synced_when_ready(ctx.clone(), store.clone());
    if ctx.config.registry.cluster.is_some() && ctx.config.registry.push_mode == registry::PushMode::Token {
        // Made (or read) at start, not at the first build: the registry must be given its
        // certificate before any build can push.
        let ctx = ctx.clone();
        tokio::spawn(async move {
            match ctx.registry_signer().await {
                Ok(signer) => tracing::info!(
                    key_id = %signer.key_id,
                    secret = %format!("{}/{}", ctx.config.agent_namespace, ctx.config.registry.key_secret),
                    "registry push tokens are signed with this key; its certificate (tls.crt) goes in the registry's auth.token.rootcertbundle"
                ),
                Err(err) => {
                    tracing::error!(%err, "no registry token signing key yet; builds to the cluster registry will retry")
                }
            }
        });
    }
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(super::log_reconcile_end)
        .await;
}

fn deploying_builds(
    store: &Store<DeserializeGuard<AppBuild>>,
    namespace: Option<&str>,
    app: Option<&str>,
) -> Vec<ObjectRef<DeserializeGuard<AppBuild>>> {
    let (Some(namespace), Some(app)) = (namespace, app) else {
        return Vec::new();
    };
    store
        .state()
        .iter()
        .filter(|guard| guard.namespace().as_deref() == Some(namespace))
        .filter(|guard| match &guard.0 {
            Ok(build) => build.spec.app_name == app && phase(build) == Some(AppBuildPhase::Deploying),
            Err(_) => false,
        })
        .map(|guard| ObjectRef::from_obj(guard.as_ref()))
        .collect()
}

fn key(build: &impl ResourceExt) -> String {
    format!("{}/{}", build.namespace().unwrap_or_default(), build.name_any())
}

async fn reconcile(guard: Arc<DeserializeGuard<AppBuild>>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    tracing::debug!(kind = KIND, object = %key(guard.as_ref()), "reconciling");
    let build = match &guard.0 {
        Ok(build) => build,
        Err(invalid) => return super::report_undecodable::<AppBuild>(&ctx, invalid).await,
    };
    if let Some(action) = super::refuse_outside_projects(&ctx, build).await? {
        return Ok(action);
    }
    let action = Pipeline { ctx: &ctx, build }.step().await?;
    ctx.reset_retries(&key(build));
    Ok(action)
}

fn error_policy(guard: Arc<DeserializeGuard<AppBuild>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.error_action(&key(guard.as_ref()), KIND, error)
}

fn phase(build: &AppBuild) -> Option<AppBuildPhase> {
    build.status.as_ref().and_then(|s| s.phase)
}

/// One reconcile of one AppBuild: advances it by as many steps as are ready.
struct Pipeline<'a> {
    ctx: &'a Context,
    build: &'a AppBuild,
}

/// Where a step left the build.
enum Step {
    /// Wait for the next event (or a short poll).
    Wait(Action),
    /// Moved on: write this status.
    Status(Box<AppBuildStatus>),
}

impl Pipeline<'_> {
    fn namespace(&self) -> String {
        self.build.namespace().unwrap_or_default()
    }

    fn status(&self) -> AppBuildStatus {
        self.build.status.clone().unwrap_or_default()
    }

    async fn step(&self) -> Result<Action> {
        self.release_delivered_jobs().await;
        if phase(self.build).is_some_and(AppBuildPhase::is_final) {
            return Ok(Action::await_change());
        }
        if self
            .build
            .annotations()
            .get(CANCEL_ANNOTATION)
            .map(String::as_str)
            == Some("true")
        {
            return self
                .finish(
                    AppBuildPhase::Cancelled,
                    "Cancelled",
                    "cancelled on request".into(),
                )
                .await;
        }
        let apps = Api::<App>::namespaced(self.ctx.client.clone(), &self.namespace());
        let Some(app) = apps.get_opt(&self.build.spec.app_name).await? else {
            let message = format!(
                "App {} does not exist in namespace {}",
                self.build.spec.app_name,
                self.namespace()
            );
            self.write(self.with(AppBuildPhase::Pending, "AppNotFound", &message))
                .await?;
            return Ok(Action::requeue(Duration::from_secs(15)));
        };
        if phase(self.build).is_none() {
            self.supersede_older_builds().await?;
            self.set_latest_build(&app).await?;
        }
        // Refuse bad deploy values before spending a build on them.
        let no_live_replicas = std::collections::BTreeMap::new();
        if let Err(refused) = chart_values(
            &values::Release {
                project: &self.namespace(),
                app: &self.build.spec.app_name,
                build: &self.build.name_any(),
                image: "placeholder",
                runtime: &app.spec,
                config_secret: None,
                config_revision: 0,
                live_replicas: &no_live_replicas,
                default_issuer: &self.ctx.config.builds.certificate_issuer,
                build_processes: &self.status().process_types,
                pull_secrets: &[],
            },
            self.build.spec.helm_values.as_ref(),
        ) {
            return self
                .finish(AppBuildPhase::Failed, "InvalidSpec", refused.to_string())
                .await;
        }
        if phase(self.build) == Some(AppBuildPhase::Deploying) && self.status().image.is_some() {
            return self.deploy(&app).await;
        }
        let step = match (&self.build.spec.rollback_to, app.spec.build.build_type) {
            (Some(target), _) => self.roll_back(target).await?,
            (None, BuildType::Image) => {
                let image = app.spec.build.image.clone().unwrap_or_default();
                Step::Status(Box::new(self.deploying(image, None)))
            }
            (None, BuildType::Dockerfile | BuildType::Buildpack) => self.build_image(&app).await?,
        };
        match step {
            Step::Wait(action) => Ok(action),
            Step::Status(status) => {
                let deploying = status.phase == Some(AppBuildPhase::Deploying);
                let final_phase = status.phase.is_some_and(AppBuildPhase::is_final);
                self.write(*status.clone()).await?;
                // Only once the result is in status: deleting a Job wakes this build again, and
                // that reconcile must find the step done rather than start it over. With the
                // log relay, the Job waits for its logs too (`release_delivered_jobs`).
                if status.image.is_some() || final_phase {
                    // The push is done (or will not happen): the token goes now, not with the
                    // Job, which the log relay may keep for a while.
                    self.revoke_push_secret().await;
                }
                if !self.ctx.config.builds.relay_logs {
                    let jobs = Api::<Job>::namespaced(self.ctx.client.clone(), &self.namespace());
                    if status.commit_sha.is_some() && self.status().commit_sha.is_none() {
                        self.delete_job(&jobs, &jobs::resolve_job_name(self.build)).await;
                    }
                    if status.image.is_some() && self.status().image.is_none() {
                        self.delete_job(&jobs, &jobs::build_job_name(self.build)).await;
                    }
                }
                if final_phase {
                    self.event_for(&status).await;
                    self.prune_history(&app).await;
                    return Ok(Action::await_change());
                }
                if deploying {
                    self.event(
                        EventType::Normal,
                        "Deploying",
                        status.message.clone().unwrap_or_default(),
                    )
                    .await;
                }
                // The write's own watch event brings the next step, with fresh state.
                Ok(Action::requeue(POLL))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::image::failed_container;
    use super::record::history_to_prune;
    use super::rollout::{install_failed_without_release, install_job_progress};
    use super::*;

    #[test]
    fn a_deploy_past_its_deadline_says_what_the_install_job_does() {
        let job = |status: serde_json::Value| -> Job {
            serde_json::from_value(json!({
                "metadata": {"name": "helm-install-web-1", "namespace": "shapeblock"},
                "status": status,
            }))
            .unwrap()
        };
        assert!(install_job_progress(&job(json!({}))).contains("has no pod running"));
        assert!(install_job_progress(&job(json!({"active": 1}))).contains("logs job/helm-install-web-1"));
        assert!(install_job_progress(&job(json!({"failed": 2}))).contains("failed 2 time(s)"));
    }

    #[test]
    fn an_install_job_that_failed_during_the_deploy_fails_the_build_an_older_one_does_not() {
        let job = |created: &str, conditions: serde_json::Value| -> Job {
            serde_json::from_value(json!({
                "metadata": {"name": "helm-install-shop-web-1", "creationTimestamp": created},
                "spec": {"template": {}},
                "status": {"conditions": conditions},
            }))
            .unwrap()
        };
        let started = Time("2026-11-29T23:08:13Z".parse().unwrap());
        let failed = json!([{"type": "Failed", "status": "True", "message": "Job has reached the specified backoff limit"}]);
        assert_eq!(
            install_failed_without_release(&job("2026-11-29T23:08:38Z", failed.clone()), &started).as_deref(),
            Some("Job has reached the specified backoff limit")
        );
        // Still running, or left over from before this deploy: not this build's failure.
        assert_eq!(
            install_failed_without_release(&job("2026-11-29T23:08:38Z", json!([])), &started),
            None
        );
        assert_eq!(
            install_failed_without_release(&job("2026-11-29T23:07:00Z", failed), &started),
            None
        );
    }

    fn pod(init: Option<(i32, &str)>, main: Option<(i32, &str)>) -> Pod {
        let status = |name: &str, (code, message): (i32, &str)| {
            serde_json::json!({"name": name, "image": "x", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "message": message}}})
        };
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "status": {
                "initContainerStatuses": init.map(|i| vec![status("clone", i)]).unwrap_or_default(),
                "containerStatuses": main.map(|m| vec![status("build", m)]).unwrap_or_default(),
            }
        }))
        .unwrap()
    }

    #[test]
    fn history_keeps_the_newest_per_outcome_and_never_what_the_app_runs() {
        let build = |name: &str, second: i64, phase: AppBuildPhase, image: &str| -> AppBuild {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
                "metadata": {"name": name, "creationTimestamp": format!("2026-01-01T00:00:{second:02}Z")},
                "spec": {"appName": "web"},
                "status": {"phase": phase, "image": image},
            }))
            .unwrap()
        };
        use AppBuildPhase::*;
        let builds = vec![
            build("b1", 1, Completed, "img:1"),
            build("b2", 2, Completed, "img:2"),
            build("b3", 3, Failed, ""),
            build("b4", 4, Completed, "img:4"),
            build("b5", 5, Cancelled, ""),
            build("b6", 6, Completed, "img:6"),
            build("b7", 7, Failed, ""),
            build("b8", 8, Building, ""),
        ];
        let mut app: App = serde_json::from_value(serde_json::json!({
            "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "App", "metadata": {"name": "web"},
            "spec": {"registry": {"url": "r"}, "build": {"type": "image", "image": "img"}},
            "status": {"latestBuild": "b8", "currentImage": "img:6"},
        }))
        .unwrap();
        // Keep 2 Completed (b6, b4) and 1 failed (b7); b8 is still running.
        assert_eq!(
            history_to_prune(&app, builds.clone(), 2, 1),
            ["b5", "b3", "b2", "b1"]
        );
        // A rollback runs an old image: its build stays whatever its age.
        app.status.as_mut().unwrap().current_image = Some("img:1".into());
        assert_eq!(history_to_prune(&app, builds, 2, 1), ["b5", "b3", "b2"]);
    }

    #[test]
    fn the_failed_container_is_the_first_that_ended_non_zero() {
        let (name, ended) = failed_container(&pod(Some((128, "fatal: repository not found")), None)).unwrap();
        assert_eq!((name.as_str(), ended.exit_code), ("clone", 128));
        let (name, ended) =
            failed_container(&pod(Some((0, "")), Some((22, "error building image: x")))).unwrap();
        assert_eq!((name.as_str(), ended.exit_code), ("build", 22));
        assert_eq!(ended.message.as_deref(), Some("error building image: x"));
        assert!(failed_container(&pod(Some((0, "")), Some((0, "sha256:x")))).is_none());
    }
}
