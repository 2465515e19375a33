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
/// How often a deploy looks again when nothing woke it (see `run` for what does).
const DEPLOY_POLL: Duration = Duration::from_secs(10);
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
    // A rollout of an App Deployment that ended wakes the build that deploys it (the chart
    // labels them). Whole objects, kept nowhere: the deployment controller writes a
    // Deployment's status several times in a rollout, and only the end of it decides anything.
    let deployments = watcher(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default().labels(APP_LABEL),
    )
    .touched_objects();
    // So does the helm-controller's install Job ending: the release record is written by then.
    let installs = watcher(
        Api::<Job>::namespaced(client.clone(), &ctx.config.agent_namespace),
        watcher::Config::default().labels(HELM_CHART_JOB_LABEL),
    )
    .touched_objects();
    let controller = super::controller(builds, watcher::Config::default(), &ctx).owns_stream(build_jobs);
    let store = controller.store();
    let by_deployment = store.clone();
    let by_install = store.clone();
    let by_chart = store.clone();
    let mut controller = controller
        .watches_stream(deployments, move |d: Deployment| {
            rollout_ended(&by_deployment, &d)
        })
        .watches_stream(installs, move |job: Job| install_ended(&by_install, &job));
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
        // Only the helm-controller giving up on a chart: its other writes (the Job it made,
        // and this agent's own applies) change nothing a deploy waits for.
        controller = controller.watches_stream_with(
            charts,
            move |chart: DynamicObject| {
                if !helm_controller_gave_up(&chart) {
                    return Vec::new();
                }
                let project = chart.labels().get(super::PROJECT_LABEL).cloned();
                let app = chart.labels().get(APP_LABEL).cloned();
                let state = by_chart.state();
                wake(deploying(&state, project.as_deref(), app.as_deref()))
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

/// The label the helm-controller puts on its install Jobs: the HelmChart's name.
const HELM_CHART_JOB_LABEL: &str = "helmcharts.helm.cattle.io/chart";

/// The builds of `app` in `namespace` that are deploying, from the controller's store.
fn deploying<'s>(
    state: &'s [Arc<DeserializeGuard<AppBuild>>],
    namespace: Option<&'s str>,
    app: Option<&'s str>,
) -> impl Iterator<Item = &'s AppBuild> {
    state
        .iter()
        .filter_map(|guard| guard.0.as_ref().ok())
        .filter(move |build| {
            namespace.is_some()
                && build.namespace().as_deref() == namespace
                && Some(build.spec.app_name.as_str()) == app
                && phase(build) == Some(AppBuildPhase::Deploying)
        })
}

fn wake(
    builds: impl Iterator<Item = impl std::borrow::Borrow<AppBuild>>,
) -> Vec<ObjectRef<DeserializeGuard<AppBuild>>> {
    builds
        .map(|build| {
            let build = build.borrow();
            ObjectRef::new(&build.name_any()).within(&build.namespace().unwrap_or_default())
        })
        .collect()
}

/// The deploying builds whose rollout `deployment` ended: it runs the build's image rolled
/// out, or gave up.
fn rollout_ended(
    store: &Store<DeserializeGuard<AppBuild>>,
    deployment: &Deployment,
) -> Vec<ObjectRef<DeserializeGuard<AppBuild>>> {
    let state = store.state();
    let namespace = deployment.namespace();
    let ended = deploying(
        &state,
        namespace.as_deref(),
        deployment.labels().get(APP_LABEL).map(String::as_str),
    )
    .filter(|build| {
        let image = build
            .status
            .as_ref()
            .and_then(|s| s.image.as_deref())
            .unwrap_or_default();
        !matches!(
            rollout(Some(deployment), &build.name_any(), image),
            Rollout::Progressing
        )
    });
    wake(ended)
}

/// The deploying builds whose release the helm-controller's install Job `job` ended on.
fn install_ended(
    store: &Store<DeserializeGuard<AppBuild>>,
    job: &Job,
) -> Vec<ObjectRef<DeserializeGuard<AppBuild>>> {
    if matches!(job_state::of(job, None), JobState::Running(_)) {
        return Vec::new();
    }
    let Some(chart) = job.labels().get(HELM_CHART_JOB_LABEL) else {
        return Vec::new();
    };
    let state = store.state();
    let ended = state
        .iter()
        .filter_map(|guard| guard.0.as_ref().ok())
        .filter(|build| phase(build) == Some(AppBuildPhase::Deploying))
        .filter(|build| chart_name(&build.namespace().unwrap_or_default(), &build.spec.app_name) == *chart);
    wake(ended)
}

/// Whether the helm-controller marked `chart` failed (its Job ran out of retries, or it could
/// not make one).
fn helm_controller_gave_up(chart: &DynamicObject) -> bool {
    chart.data["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Failed" && c["status"] == "True")
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
    // A step that wrote a status goes on from what it wrote, in the same reconcile, rather
    // than from that write's watch event (which `Context::expect_echo` then drops): a build
    // from created to its HelmChart applied is one reconcile instead of three.
    let mut current: Option<AppBuild> = None;
    for _ in 0..MAX_STEPS {
        let pipeline = Pipeline::new(&ctx, current.as_ref().unwrap_or(build));
        let action = pipeline.step().await?;
        let (written, advance) = pipeline.into_written();
        if let Some(written) = &written {
            ctx.expect_echo(written);
        }
        match written {
            Some(written) if advance => current = Some(written),
            _ => {
                ctx.reset_retries(&key(build));
                return Ok(action);
            }
        }
    }
    ctx.reset_retries(&key(build));
    Ok(Action::requeue(POLL))
}

/// Steps one reconcile goes through at most (a build takes five from created to deployed).
const MAX_STEPS: usize = 8;

fn error_policy(guard: Arc<DeserializeGuard<AppBuild>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.error_action(&key(guard.as_ref()), KIND, error)
}

fn phase(build: &AppBuild) -> Option<AppBuildPhase> {
    build.status.as_ref().and_then(|s| s.phase)
}

/// One step of one AppBuild, from the state in `build`.
struct Pipeline<'a> {
    ctx: &'a Context,
    build: &'a AppBuild,
    /// The build as this step's last status write left it.
    written: std::sync::Mutex<Option<AppBuild>>,
    /// The step moved the build on: the next one can start from `written` at once.
    advance: std::sync::atomic::AtomicBool,
}

/// Where a step left the build.
enum Step {
    /// Wait for the next event (or a short poll).
    Wait(Action),
    /// Moved on: write this status.
    Status(Box<AppBuildStatus>),
}

impl<'a> Pipeline<'a> {
    fn new(ctx: &'a Context, build: &'a AppBuild) -> Self {
        Self {
            ctx,
            build,
            written: Default::default(),
            advance: Default::default(),
        }
    }

    fn into_written(self) -> (Option<AppBuild>, bool) {
        (self.written.into_inner().unwrap(), self.advance.into_inner())
    }

    /// Ends a step that moved the build on: the next step starts now, from the status just
    /// written (the poll is only for a reconcile that went through [`MAX_STEPS`]).
    fn advanced(&self) -> Result<Action> {
        self.advance.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(Action::requeue(POLL))
    }

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
                self.advanced()
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

    /// A store of `web`'s builds in `shop`: `b1` deploying `img:1`, `b0` completed.
    fn builds() -> Store<DeserializeGuard<AppBuild>> {
        let (reader, mut writer) = kube::runtime::reflector::store();
        for (name, phase) in [("b0", "Completed"), ("b1", "Deploying")] {
            let build: AppBuild = serde_json::from_value(json!({
                "apiVersion": "apps.shapeblock.io/v1alpha1", "kind": "AppBuild",
                "metadata": {"name": name, "namespace": "shop", "uid": name},
                "spec": {"appName": "web"},
                "status": {"phase": phase, "image": "img:1"},
            }))
            .unwrap();
            writer.apply_watcher_event(&watcher::Event::Apply(DeserializeGuard(Ok(build))));
        }
        reader
    }

    fn names(refs: Vec<ObjectRef<DeserializeGuard<AppBuild>>>) -> Vec<String> {
        refs.into_iter()
            .map(|r| format!("{}/{}", r.namespace.unwrap_or_default(), r.name))
            .collect()
    }

    #[test]
    fn only_a_rollout_that_ended_wakes_the_build_deploying_it() {
        let deployment = |build: &str, available: i32, deadline_exceeded: bool| -> Deployment {
            let conditions = if deadline_exceeded {
                json!([{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "timed out"}])
            } else {
                json!([])
            };
            serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "shop", "generation": 2, "labels": {APP_LABEL: "web"}},
                "spec": {"replicas": 1, "selector": {}, "template": {
                    "metadata": {"annotations": {"apps.shapeblock.io/build": build}},
                    "spec": {"containers": [{"name": "web", "image": "img:1"}]},
                }},
                "status": {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1,
                    "availableReplicas": available, "conditions": conditions},
            }))
            .unwrap()
        };
        let store = builds();
        assert_eq!(
            names(rollout_ended(&store, &deployment("b1", 1, false))),
            ["shop/b1"]
        );
        assert_eq!(
            names(rollout_ended(&store, &deployment("b1", 0, true))),
            ["shop/b1"]
        );
        // On the way, or still the previous build's template: nothing to decide yet.
        assert!(rollout_ended(&store, &deployment("b1", 0, false)).is_empty());
        assert!(rollout_ended(&store, &deployment("b0", 1, false)).is_empty());
    }

    #[test]
    fn only_an_install_job_that_ended_wakes_the_builds_of_its_chart() {
        let job = |chart: &str, condition: Option<&str>| -> Job {
            let conditions = condition.map_or(json!([]), |c| json!([{"type": c, "status": "True"}]));
            serde_json::from_value(json!({
                "metadata": {"name": format!("helm-install-{chart}"), "labels": {HELM_CHART_JOB_LABEL: chart}},
                "status": {"conditions": conditions},
            }))
            .unwrap()
        };
        let store = builds();
        let ours = chart_name("shop", "web");
        assert_eq!(
            names(install_ended(&store, &job(&ours, Some("Complete")))),
            ["shop/b1"]
        );
        assert_eq!(
            names(install_ended(&store, &job(&ours, Some("Failed")))),
            ["shop/b1"]
        );
        assert!(install_ended(&store, &job(&ours, None)).is_empty());
        assert!(install_ended(&store, &job(&chart_name("shop", "api"), Some("Complete"))).is_empty());
    }

    #[test]
    fn a_chart_wakes_builds_only_once_the_helm_controller_gave_up_on_it() {
        let chart = |conditions: serde_json::Value| -> DynamicObject {
            serde_json::from_value(json!({
                "apiVersion": "helm.cattle.io/v1", "kind": "HelmChart", "metadata": {"name": "web"},
                "status": {"conditions": conditions},
            }))
            .unwrap()
        };
        assert!(helm_controller_gave_up(&chart(json!([
            {"type": "JobCreated", "status": "True"}, {"type": "Failed", "status": "True", "reason": "Job failed"}
        ]))));
        assert!(!helm_controller_gave_up(&chart(json!([
            {"type": "JobCreated", "status": "True"}, {"type": "Failed", "status": "False"}
        ]))));
        assert!(!helm_controller_gave_up(&chart(json!(null))));
    }

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
