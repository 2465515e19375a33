//! AppRun controller: runs a one-off command (`heroku run`) as a Job in the App's current
//! image, config and bound services, copying the `web` process's container as rendered for the
//! running release, and records the exit code. The log relay sends the output to the hub; the
//! Job is deleted once it has (without the tunnel it stays for `kubectl logs` until its TTL).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PostParams};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};

use super::deploy::{launch, pull_secrets_of, release_container};
use super::job_state::{self, JobState};
use super::jobs::{AppJob, app_job};
use super::release::{self, Running};
use super::{APP_LABEL, ConditionSet, Context, FIELD_MANAGER, Result};
use crate::api::{App, AppBuild, AppRun, AppRunPhase, AppRunStatus, DEFAULT_RUN_TIMEOUT_SECONDS};

const KIND: &str = "AppRun";
/// Label on a run's Job and pod naming the AppRun (the log relay follows these pods).
pub const RUN_LABEL: &str = "apps.shapeblock.io/run";
/// The container that runs the command.
pub const RUN_CONTAINER: &str = "run";
/// How often a run waiting for its App (to exist, or to run an image) looks again.
const WAIT_FOR_APP: Duration = Duration::from_secs(10);
/// A running run is woken by its Job's changes; this is only a backstop.
const RUNNING_RECHECK: Duration = Duration::from_secs(60);

/// Runs the AppRun controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let runs = Api::<DeserializeGuard<AppRun>>::all(client.clone());
    let jobs = watcher(
        Api::<PartialObjectMeta<Job>>::all(client.clone()),
        watcher::Config::default().labels(RUN_LABEL),
    )
    .touched_objects();
    // An App that changes (say, its first build deployed) wakes the runs waiting for it.
    let apps = watcher(
        Api::<PartialObjectMeta<App>>::all(client),
        watcher::Config::default(),
    )
    .touched_objects();
    let controller = super::controller(runs, watcher::Config::default(), &ctx).owns_stream(jobs);
    let store = controller.store();
    let waiting = store.clone();
    let controller = controller.watches_stream(apps, move |app: PartialObjectMeta<App>| {
        waiting_runs(&waiting, app.namespace().as_deref(), &app.name_any())
    });
    super::mark_synced_when_ready(ctx.clone(), store);
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(super::log_reconcile_end)
        .await;
}

/// Runs of `app` that have not started.
fn waiting_runs(
    store: &Store<DeserializeGuard<AppRun>>,
    namespace: Option<&str>,
    app: &str,
) -> Vec<ObjectRef<DeserializeGuard<AppRun>>> {
    store
        .state()
        .iter()
        .filter(|guard| guard.namespace().as_deref() == namespace)
        .filter(|guard| match &guard.0 {
            Ok(run) => {
                run.spec.app_name == app
                    && run.status.as_ref().and_then(|s| s.phase).unwrap_or_default() == AppRunPhase::Pending
            }
            Err(_) => false,
        })
        .map(|guard| ObjectRef::from_obj(guard.as_ref()))
        .collect()
}

fn key(run: &impl ResourceExt) -> String {
    format!("{}/{}", run.namespace().unwrap_or_default(), run.name_any())
}

fn error_policy(guard: Arc<DeserializeGuard<AppRun>>, error: &super::Error, ctx: Arc<Context>) -> Action {
    ctx.error_action(&key(guard.as_ref()), KIND, error)
}

async fn reconcile(guard: Arc<DeserializeGuard<AppRun>>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    let run = match &guard.0 {
        Ok(run) => run,
        Err(invalid) => return super::report_undecodable::<AppRun>(&ctx, invalid).await,
    };
    if let Some(action) = super::refuse_outside_projects(&ctx, run).await? {
        return Ok(action);
    }
    let action = Step { ctx: &ctx, run }.next().await?;
    ctx.reset_retries(&key(run));
    Ok(action)
}

struct Step<'a> {
    ctx: &'a Context,
    run: &'a AppRun,
}

impl Step<'_> {
    fn namespace(&self) -> String {
        self.run.namespace().unwrap_or_default()
    }

    fn status(&self) -> AppRunStatus {
        self.run.status.clone().unwrap_or_default()
    }

    async fn next(&self) -> Result<Action> {
        if self.status().phase.is_some_and(AppRunPhase::is_final) {
            return self.let_job_go().await;
        }
        let jobs = Api::<Job>::namespaced(self.ctx.client.clone(), &self.namespace());
        match jobs.get_opt(&self.run.name_any()).await? {
            Some(job) => self.observe(&job).await,
            // No Job: not started, or finished and deleted after a status write this (cached)
            // object does not show yet. A run must never run twice: act on fresh state only.
            None if self.is_stale().await? => Ok(Action::requeue(Duration::from_secs(1))),
            None if self.status().job_name.is_some() => {
                self.finish(
                    AppRunPhase::Failed,
                    "JobDeleted",
                    None,
                    "the run's Job was deleted before it finished; create a new AppRun to run the command again".into(),
                )
                .await
            }
            None => self.start(&jobs).await,
        }
    }

    async fn is_stale(&self) -> Result<bool> {
        let fresh = Api::<AppRun>::namespaced(self.ctx.client.clone(), &self.namespace())
            .get_metadata_opt(&self.run.name_any())
            .await?;
        Ok(fresh.is_none_or(|f| f.metadata.resource_version != self.run.metadata.resource_version))
    }

    async fn start(&self, jobs: &Api<Job>) -> Result<Action> {
        let app_name = &self.run.spec.app_name;
        let apps = Api::<App>::namespaced(self.ctx.client.clone(), &self.namespace());
        let Some(app) = apps.get_opt(app_name).await? else {
            return self
                .waiting(
                    "AppNotFound",
                    format!("App {app_name} does not exist in this namespace; the run starts once it does"),
                )
                .await;
        };
        let status = app.status.clone().unwrap_or_default();
        let (Some(build), Some(image)) = (status.current_build.clone(), status.current_image.clone()) else {
            return self
                .waiting(
                    "NotDeployed",
                    format!(
                        "App {app_name} runs no image yet; the run starts once a build of it is deployed"
                    ),
                )
                .await;
        };
        let running_build = Api::<AppBuild>::namespaced(self.ctx.client.clone(), &self.namespace())
            .get_opt(&build)
            .await?;
        let values = match release::render(
            self.ctx,
            &app,
            &Running::of(&build, &image, running_build.as_ref()),
        )
        .await?
        {
            Ok((values, _)) => values,
            Err(refused) => {
                return self
                    .finish(
                        AppRunPhase::Failed,
                        "InvalidSpec",
                        None,
                        format!("cannot render the App's running release to copy: {refused}"),
                    )
                    .await;
            }
        };
        let job = run_job(
            self.run,
            &app,
            &values,
            self.ctx.config.builds.ttl_seconds_after_finished,
        );
        let created = jobs
            .create(
                &PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                },
                &job,
            )
            .await;
        match created {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
        let command = self.run.spec.command.join(" ");
        let message = format!("running `{command}` in {image}");
        let mut next = self.with(AppRunPhase::Running, "Started", &message);
        next.image = Some(image);
        next.build = Some(build);
        next.config_revision = status.config_revision;
        next.job_name = Some(job.name_any());
        next.start_time = Some(Time(Timestamp::now()));
        self.write(next).await?;
        self.ctx
            .publish(
                &self.run.object_ref(&()),
                EventType::Normal,
                "Started",
                "Run",
                format!("{message} (Job {})", job.name_any()),
            )
            .await;
        Ok(Action::requeue(RUNNING_RECHECK))
    }

    async fn observe(&self, job: &Job) -> Result<Action> {
        let deadline = self
            .run
            .spec
            .timeout_seconds
            .unwrap_or(DEFAULT_RUN_TIMEOUT_SECONDS);
        match job_state::state(&self.ctx.client, job).await? {
            JobState::Running(_) => Ok(Action::requeue(RUNNING_RECHECK)),
            JobState::Complete(_) => {
                self.finish(AppRunPhase::Succeeded, "Exited", Some(0), "exited 0".into())
                    .await
            }
            JobState::Failed {
                timed_out_after: Some(_),
                ..
            } => {
                self.finish(
                    AppRunPhase::Failed,
                    "Timeout",
                    None,
                    format!(
                        "did not finish within {deadline}s (spec.timeoutSeconds); the command was stopped"
                    ),
                )
                .await
            }
            JobState::Failed { pod, .. } => {
                let ended = pod.as_ref().and_then(|p| job_state::terminated(p, RUN_CONTAINER));
                match ended {
                    Some(ended) => {
                        self.finish(
                            AppRunPhase::Failed,
                            "Exited",
                            Some(ended.exit_code),
                            job_state::exit_summary(&ended),
                        )
                        .await
                    }
                    None => {
                        let why = pod
                            .and_then(|p| p.status)
                            .and_then(|s| s.message.or(s.reason))
                            .unwrap_or_else(|| "its pod failed before the command ran".into());
                        self.finish(
                            AppRunPhase::Failed,
                            "NotStarted",
                            None,
                            format!("the command did not run: {why}"),
                        )
                        .await
                    }
                }
            }
        }
    }

    /// A finished run's Job goes once its output is delivered (the status keeps the exit code,
    /// the hub the output); without the tunnel it stays for `kubectl logs` until its TTL.
    async fn let_job_go(&self) -> Result<Action> {
        let status = self.status();
        let delivered = !status.logs.is_empty() && status.logs.iter().all(|l| l.complete);
        if self.ctx.config.builds.relay_logs && delivered {
            let jobs = Api::<Job>::namespaced(self.ctx.client.clone(), &self.namespace());
            match jobs
                .delete(&self.run.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                Err(err) => return Err(err.into()),
            }
        }
        Ok(Action::await_change())
    }

    async fn waiting(&self, reason: &str, message: String) -> Result<Action> {
        let next = self.with(AppRunPhase::Pending, reason, &message);
        self.write(next).await?;
        Ok(Action::requeue(WAIT_FOR_APP))
    }

    async fn finish(
        &self,
        phase: AppRunPhase,
        reason: &str,
        exit_code: Option<i32>,
        message: String,
    ) -> Result<Action> {
        let mut next = self.with(phase, reason, &message);
        next.exit_code = exit_code;
        next.completion_time = Some(Time(Timestamp::now()));
        self.write(next).await?;
        let (type_, event) = match phase {
            AppRunPhase::Succeeded => (EventType::Normal, "Succeeded"),
            _ => (EventType::Warning, "Failed"),
        };
        self.ctx
            .publish(&self.run.object_ref(&()), type_, event, "Run", &message)
            .await;
        Ok(Action::requeue(Duration::from_secs(1)))
    }

    fn with(&self, phase: AppRunPhase, reason: &str, message: &str) -> AppRunStatus {
        let mut status = self.status();
        status.phase = Some(phase);
        status.reason = Some(reason.into());
        status.message = Some(message.into());
        status.observed_generation = self.run.metadata.generation;
        let mut conditions = ConditionSet::new(&status.conditions, self.run.metadata.generation);
        conditions.set("Ready", phase == AppRunPhase::Succeeded, reason, message);
        status.conditions = conditions.conditions;
        status
    }

    async fn write(&self, status: AppRunStatus) -> Result<()> {
        if self.run.status.as_ref() == Some(&status) {
            return Ok(());
        }
        // `status.logs` belongs to the log relay (its own field manager): leaving it out keeps
        // this write from taking it over with a stale copy.
        let status = AppRunStatus {
            logs: Vec::new(),
            ..status
        };
        super::apply_status_at_version(self.ctx, self.run, &status).await?;
        Ok(())
    }
}

/// The run's Job: `web`'s container from the release `values` running the command (through
/// the launcher for buildpack images), owned by the AppRun.
pub fn run_job(run: &AppRun, app: &App, values: &serde_json::Value, ttl_seconds_after_finished: i32) -> Job {
    let owner = run
        .controller_owner_ref(&())
        .expect("an AppRun from the apiserver has a name and uid");
    let labels = [
        (APP_LABEL.to_string(), app.name_any()),
        (RUN_LABEL.to_string(), run.name_any()),
    ]
    .into();
    app_job(&AppJob {
        namespace: &run.namespace().unwrap_or_default(),
        name: &run.name_any(),
        labels,
        container: RUN_CONTAINER,
        web: &release_container(values),
        pull_secrets: pull_secrets_of(values),
        command: launch(&app.spec, RUN_CONTAINER, &run.spec.command),
        owner: &owner,
        deadline_seconds: run.spec.timeout_seconds.unwrap_or(DEFAULT_RUN_TIMEOUT_SECONDS),
        ttl_seconds_after_finished,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AppRunSpec, BuildType};
    use serde_json::json;

    #[test]
    fn a_run_copies_web_and_runs_its_command_through_the_launcher_once() {
        let mut app: App = serde_json::from_value(json!({
            "apiVersion": "apps.shapeblock.io/v1alpha1",
            "kind": "App",
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"registry": {"url": "registry.example.com"}, "build": {"type": "buildpack"}},
        }))
        .expect("an App");
        app.spec.build.build_type = BuildType::Buildpack;
        let mut run = AppRun::new(
            "seed-1",
            AppRunSpec {
                app_name: "web".into(),
                command: vec!["rake".into(), "db:seed".into()],
                timeout_seconds: None,
            },
        );
        run.metadata.namespace = Some("shop".into());
        run.metadata.uid = Some("uid-1".into());
        let web = json!({
            "image": "registry.example.com/shop/web",
            "imageTag": "abc123",
            "env": [{"name": "RACK_ENV", "value": "production"}],
            "envFrom": [{"secretRef": {"name": "web-config"}}],
            "resources": {"requests": {"cpu": "100m"}},
        });
        let values = json!({
            "generic": {"extraImagePullSecrets": [{"name": "registry-credentials"}, {"name": "ghcr"}]},
            "deployments": {"worker": {"containers": [{"image": "x"}]}, "web": {"containers": [web]}},
        });
        let job = run_job(&run, &app, &values, 600);
        assert_eq!(job.name_any(), "seed-1");
        assert_eq!(job.labels()[RUN_LABEL], "seed-1");
        assert_eq!(job.labels()[APP_LABEL], "web");
        assert_eq!(job.owner_references()[0].kind, "AppRun");
        let spec = job.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(0), "a run never runs twice");
        assert_eq!(spec.active_deadline_seconds, Some(DEFAULT_RUN_TIMEOUT_SECONDS));
        assert_eq!(spec.ttl_seconds_after_finished, Some(600));
        let template = spec.template;
        assert_eq!(template.metadata.unwrap().labels.unwrap()[RUN_LABEL], "seed-1");
        let pod = template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        // It pulls the image as the release's pods do.
        let pulls: Vec<_> = pod
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(pulls, ["registry-credentials", "ghcr"]);
        // The app's own pod defaults, like web: not the builder's hardening overrides.
        assert_eq!(pod.automount_service_account_token, None);
        assert_eq!(pod.service_account_name, None);
        let container = &pod.containers[0];
        assert_eq!(container.name, RUN_CONTAINER);
        assert_eq!(
            container.image.as_deref(),
            Some("registry.example.com/shop/web:abc123")
        );
        assert_eq!(
            container.command.as_deref().unwrap(),
            ["/cnb/lifecycle/launcher", "rake", "db:seed"]
        );
        assert_eq!(container.env.as_ref().unwrap()[0].name, "RACK_ENV");
        let from = container.env_from.as_ref().unwrap();
        assert_eq!(from[0].secret_ref.as_ref().unwrap().name, "web-config");
        assert!(container.resources.is_some());
    }
}
