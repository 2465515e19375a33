//! AppBuild controller: resolve the ref, build the image in a Job (or take the prebuilt one),
//! deploy it through a HelmChart, and call it `Completed` only once the App's Deployment runs
//! this build's image, rolled out and available.

mod failure;
mod jobs;

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
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

pub use jobs::{BUILD_LABEL, BuildSettings, parse_build_report, parse_commit, release_job};

use super::deploy::rollout::{Rollout, rollout};
use super::deploy::{chart_name, chart_values, deployment_name, helmchart, processes, values};
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
    let controller = Controller::new(builds, watcher::Config::default()).owns_stream(build_jobs);
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

    async fn build_image(&self, app: &App) -> Result<Step> {
        let owner = self
            .build
            .controller_owner_ref(&())
            .expect("an AppBuild from the apiserver has a uid");
        let settings = &self.ctx.config.builds;
        // Clone only what the App controller checked for the App's current spec.
        let git_secret = match super::app::clone_source(app) {
            super::app::CloneSource::Ready(secret) => secret,
            super::app::CloneSource::Unchecked => return Ok(Step::Wait(Action::requeue(POLL))),
            super::app::CloneSource::Refused { reason, message } => {
                return Ok(Step::Status(Box::new(self.failed(&reason, message))));
            }
        };
        let jobs = Api::<Job>::namespaced(self.ctx.client.clone(), &self.namespace());
        // Where the image goes is checked before anything runs: a refused destination or
        // credential fails the build with the reason, not a push error at the end.
        let target = match self.push_target(app).await {
            Ok(target) => target,
            Err(RegistryError::Refused { reason, message }) => {
                return Ok(Step::Status(Box::new(self.failed(reason, message))));
            }
            Err(err) => return Err(err.into()),
        };
        let Some(commit) = self.status().commit_sha else {
            let job = jobs::resolve_job(app, self.build, git_secret.as_deref(), &owner, settings);
            return match self.run_job(&jobs, job, jobs::RESOLVE_CONTAINER).await? {
                JobOutcome::Running(pod) => Ok(self.pending_or_building(
                    AppBuildPhase::Pending,
                    "Resolving",
                    format!("resolving {}", jobs::git_ref(app, self.build)),
                    pod,
                )),
                JobOutcome::Succeeded(message) => match parse_commit(&message) {
                    Some(commit) => {
                        let mut status = self.with(
                            AppBuildPhase::Pending,
                            "Resolved",
                            &format!("{} is {commit}", jobs::git_ref(app, self.build)),
                        );
                        status.commit_sha = Some(commit);
                        Ok(Step::Status(Box::new(status)))
                    }
                    None => Ok(Step::Status(Box::new(self.failed(
                        "ResolveFailed",
                        format!("the resolve step reported no commit: {message:?}"),
                    )))),
                },
                JobOutcome::Failed { message, .. } => Ok(Step::Status(Box::new(self.failed(
                    "ResolveFailed",
                    format!("cannot resolve {}: {message}", jobs::git_ref(app, self.build)),
                )))),
            };
        };
        let inputs = jobs::inputs_hash(app, self.build, &commit, settings);
        if let Some(reused) = self.reusable_image(&inputs).await? {
            return Ok(Step::Status(Box::new(reused)));
        }
        // A token only for a Job about to be created: not for a running one, nor for a missing
        // Job on a stale copy of this build (one that finished and was deleted, see `run_job`).
        let mint = matches!(target, PushTarget::Cluster { .. })
            && jobs
                .get_metadata_opt(&jobs::build_job_name(self.build))
                .await?
                .is_none()
            && !self.is_stale().await?;
        let registry = match self.push_secret(app, &target, mint).await {
            Ok(name) => name,
            Err(RegistryError::Refused { reason, message }) => {
                return Ok(Step::Status(Box::new(self.failed(reason, message))));
            }
            Err(RegistryError::Key(message)) => {
                return Ok(Step::Status(Box::new(self.failed(
                    "RegistryTokenUnavailable",
                    format!("cannot mint the build's push token: {message}"),
                ))));
            }
            Err(err) => return Err(err.into()),
        };
        let job = jobs::build_job(
            app,
            self.build,
            &commit,
            git_secret.as_deref(),
            &registry,
            &owner,
            settings,
        );
        match self.run_job(&jobs, job, jobs::BUILD_CONTAINER).await? {
            JobOutcome::Running(pod) => {
                let step = self.pending_or_building(
                    AppBuildPhase::Building,
                    "Building",
                    format!("building {commit}"),
                    pod,
                );
                if phase(self.build) != Some(AppBuildPhase::Building) {
                    self.event(EventType::Normal, "Building", format!("building commit {commit}"))
                        .await;
                }
                Ok(step)
            }
            JobOutcome::Succeeded(message) => match parse_build_report(&message) {
                Some(report) => {
                    let clone_report = self
                        .job_pod(&jobs::build_job_name(self.build))
                        .await?
                        .and_then(|pod| job_state::terminated(&pod, jobs::CLONE_CONTAINER))
                        .and_then(|t| t.message)
                        .and_then(|message| jobs::parse_procfile_report(&message));
                    let destination = jobs::destination(app, &jobs::image_tag(self.build, &commit));
                    let image = format!("{destination}@{}", report.digest);
                    let mut status = self.deploying(image, Some(report.digest));
                    status.inputs_hash = Some(inputs);
                    status.process_types = match report.processes.is_empty() {
                        // Buildpacks know the image's process types.
                        false => report.processes.into_iter().map(|p| (p, String::new())).collect(),
                        // Otherwise the clone step read the Procfile, if there is one.
                        true => clone_report.unwrap_or_default(),
                    };
                    Ok(Step::Status(Box::new(status)))
                }
                None => Ok(Step::Status(Box::new(self.failed(
                    "BuildFailed",
                    format!("the build reported no image digest: {message:?}"),
                )))),
            },
            JobOutcome::Failed { reason, message } => {
                Ok(Step::Status(Box::new(self.failed(reason, message))))
            }
        }
    }

    /// Where this build may push (see [`registry::push_target`]); a tenant's own credential
    /// Secret is checked to be one made for that registry.
    async fn push_target(&self, app: &App) -> Result<PushTarget, RegistryError> {
        let config = &self.ctx.config;
        let target = registry::push_target(app, &config.registry, config.registry_secret.as_deref())?;
        if let PushTarget::Own { secret, host } = &target {
            registry::own_credential(&self.ctx.client, &self.namespace(), secret, host).await?;
        }
        Ok(target)
    }

    /// The Secret the build Job mounts for its push. For the cluster registry: this build's
    /// own, with a token minted now for the App's repositories, valid for the build's deadline
    /// and a margin, when `mint` (the Job is about to be created; a running Job has its token
    /// already).
    async fn push_secret(&self, app: &App, target: &PushTarget, mint: bool) -> Result<String, RegistryError> {
        let (host, repositories) = match target {
            PushTarget::Own { secret, .. } | PushTarget::Shared { secret } => return Ok(secret.clone()),
            PushTarget::Cluster { host, repositories } => (host, repositories),
        };
        let name = registry::push_secret_name(&self.build.name_any());
        if !mint {
            return Ok(name);
        }
        let secrets = Api::<Secret>::namespaced(self.ctx.client.clone(), &self.namespace());
        // Never write over a Secret this build did not make (a tenant could name a build so
        // that `<build>-push` is someone else's Secret).
        if let Some(existing) = secrets.get_metadata_opt(&name).await?
            && !self.owns(&existing.metadata)
        {
            return Err(RegistryError::Refused {
                reason: "PushSecretConflict",
                message: format!(
                    "Secret {name} already exists and was not made for this build: rename the \
                     AppBuild or remove the Secret"
                ),
            });
        }
        let settings = &self.ctx.config.registry;
        let lifetime =
            jobs::build_deadline(app, self.build, &self.ctx.config.builds) + registry::TOKEN_MARGIN_SECONDS;
        let token = self.ctx.registry_signer().await?.mint(
            &settings.token_issuer,
            &settings.service(),
            &format!("{}/{}", self.namespace(), self.build.name_any()),
            repositories,
            lifetime,
        )?;
        let owner = self
            .build
            .controller_owner_ref(&())
            .expect("an AppBuild from the apiserver has a uid");
        let secret = registry::push_secret(
            &self.namespace(),
            &name,
            jobs::step_labels(app, self.build, "push"),
            &owner,
            host,
            &token,
        );
        secrets
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        Ok(name)
    }

    /// Whether this build owns an object (its controller owner reference has our uid).
    fn owns(&self, meta: &kube::api::ObjectMeta) -> bool {
        let uid = self.build.metadata.uid.as_deref();
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
    }

    /// Deletes this build's push Secret, if it has one: once the image is pushed or the build
    /// ended, nothing needs its token. Best effort (it expires anyway, and goes with the
    /// AppBuild).
    async fn revoke_push_secret(&self) {
        let secrets = Api::<Secret>::namespaced(self.ctx.client.clone(), &self.namespace());
        let name = registry::push_secret_name(&self.build.name_any());
        let existing = match secrets.get_metadata_opt(&name).await {
            Ok(Some(existing)) if self.owns(&existing.metadata) => existing,
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(secret = %name, %err, "cannot read a build's push Secret to delete it");
                return;
            }
        };
        let params = DeleteParams {
            preconditions: Some(kube::api::Preconditions {
                uid: existing.metadata.uid.clone(),
                resource_version: None,
            }),
            ..DeleteParams::background()
        };
        if let Err(err) = super::delete_if_present(&secrets, &name, &params).await {
            tracing::warn!(secret = %name, %err, "cannot delete a build's push Secret; it goes with the AppBuild");
        }
    }

    /// The image of an earlier build of this App with the same inputs, as this build's
    /// result (no build Job), if one was pushed.
    async fn reusable_image(&self, inputs: &str) -> Result<Option<AppBuildStatus>> {
        let siblings = Api::<AppBuild>::namespaced(self.ctx.client.clone(), &self.namespace())
            .list(&ListParams::default().fields(&format!("spec.appName={}", self.build.spec.app_name)))
            .await?;
        let earlier = siblings
            .items
            .into_iter()
            .filter(|b| b.name_any() != self.build.name_any())
            .filter_map(|b| {
                let status = b.status.clone()?;
                (status.inputs_hash.as_deref() == Some(inputs) && status.image_digest.is_some())
                    .then_some((b, status))
            })
            .max_by_key(|(b, _)| b.metadata.creation_timestamp.clone());
        let Some((from, built)) = earlier else {
            return Ok(None);
        };
        let image = built.image.unwrap_or_default();
        let mut status = self.deploying(image.clone(), built.image_digest);
        status.inputs_hash = Some(inputs.to_string());
        status.process_types = built.process_types;
        let message = format!(
            "reusing {image}, built by {} from the same inputs",
            from.name_any()
        );
        let mut conditions = ConditionSet::new(&status.conditions, self.build.metadata.generation);
        conditions.set("Built", true, "ImageReused", &message);
        status.conditions = conditions.conditions;
        self.event(EventType::Normal, "ImageReused", message).await;
        Ok(Some(status))
    }

    /// A rollback: the image of an earlier build of this App, deployed without building.
    async fn roll_back(&self, target: &str) -> Result<Step> {
        let earlier = Api::<AppBuild>::namespaced(self.ctx.client.clone(), &self.namespace())
            .get_opt(target)
            .await?;
        let image = earlier.as_ref().and_then(|b| {
            let status = b.status.as_ref()?;
            (b.spec.app_name == self.build.spec.app_name)
                .then(|| Some((status.image.clone()?, status.image_digest.clone())))?
        });
        let Some((image, digest)) = image else {
            let why = match earlier {
                None => "does not exist".to_string(),
                Some(b) if b.spec.app_name != self.build.spec.app_name => {
                    format!("belongs to App {}", b.spec.app_name)
                }
                Some(_) => "never produced an image".to_string(),
            };
            return Ok(Step::Status(Box::new(self.failed(
                "InvalidSpec",
                format!("cannot roll back to AppBuild {target}: it {why}"),
            ))));
        };
        let mut status = self.deploying(image.clone(), digest);
        let message = format!("rolling back to {image}, built by {target}");
        let mut conditions = ConditionSet::new(&status.conditions, self.build.metadata.generation);
        conditions.set("Built", true, "Rollback", &message);
        status.conditions = conditions.conditions;
        status.message = Some(message);
        Ok(Step::Status(Box::new(status)))
    }

    fn pending_or_building(
        &self,
        phase: AppBuildPhase,
        reason: &str,
        message: String,
        pod: Option<String>,
    ) -> Step {
        let mut status = self.with(phase, reason, &message);
        if pod.is_some() {
            status.pod_name = pod;
        }
        if status == self.status() {
            return Step::Wait(Action::requeue(Duration::from_secs(60)));
        }
        Step::Status(Box::new(status))
    }

    /// Whether the apiserver has a newer version of this AppBuild than the one being reconciled.
    async fn is_stale(&self) -> Result<bool> {
        let fresh = Api::<AppBuild>::namespaced(self.ctx.client.clone(), &self.namespace())
            .get_metadata_opt(&self.build.name_any())
            .await?;
        Ok(fresh.is_none_or(|f| f.metadata.resource_version != self.build.metadata.resource_version))
    }

    /// Why a failed step's pod failed (see [`failure`]). A build container that left no
    /// words of its own (an empty message, or only the digest kaniko writes before it
    /// pushes) has the tail of its log read: what the tool printed last.
    async fn failure_of(&self, pod: &Pod) -> (&'static str, String) {
        let Some((container, ended)) = failed_container(pod) else {
            return ("BuildFailed", "the build pod failed".into());
        };
        let spec = container_spec(pod, &container);
        let step = match container.as_str() {
            jobs::CLONE_CONTAINER => failure::BuildStep::Clone,
            // The creator's container carries the platform API version; kaniko's does not.
            jobs::BUILD_CONTAINER
                if spec
                    .and_then(|c| c.env.as_ref())
                    .is_some_and(|env| env.iter().any(|e| e.name == "CNB_PLATFORM_API")) =>
            {
                failure::BuildStep::Buildpack
            }
            jobs::BUILD_CONTAINER => failure::BuildStep::Kaniko,
            // Resolve and release steps: their callers say what failed.
            _ => return ("BuildFailed", job_state::exit_summary(&ended)),
        };
        let mut said = ended.message.clone().unwrap_or_default();
        if failure::needs_log(&said) {
            let params = kube::api::LogParams {
                container: Some(container.clone()),
                tail_lines: Some(20),
                ..Default::default()
            };
            match Api::<Pod>::namespaced(self.ctx.client.clone(), &self.namespace())
                .logs(&pod.name_any(), &params)
                .await
            {
                Ok(log) => said = format!("{said}\n{log}"),
                Err(err) => tracing::debug!(%err, pod = %pod.name_any(), "cannot read the failed step's log"),
            }
        }
        let memory_limit = spec
            .and_then(|c| c.resources.as_ref())
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("memory"))
            .map(|q| q.0.as_str());
        failure::classify(&failure::Ended {
            step,
            exit_code: ended.exit_code,
            reason: ended.reason.as_deref(),
            said: &said,
            memory_limit,
        })
    }

    /// Creates the Job if needed and reads where it is.
    async fn run_job(&self, jobs: &Api<Job>, job: Job, container: &str) -> Result<JobOutcome> {
        let name = job.name_any();
        let current = match jobs.get_opt(&name).await? {
            Some(current) => current,
            // A missing Job may mean this step is not started, or that it finished and was
            // deleted after a status write this (cached) object does not show yet: ask.
            None if self.is_stale().await? => return Ok(JobOutcome::Running(None)),
            None => match jobs
                .create(
                    &PostParams {
                        field_manager: Some(FIELD_MANAGER.into()),
                        ..Default::default()
                    },
                    &job,
                )
                .await
            {
                Ok(created) => created,
                Err(kube::Error::Api(s)) if s.code == 409 => return Ok(JobOutcome::Running(None)),
                Err(err) => return Err(err.into()),
            },
        };
        Ok(match job_state::state(&self.ctx.client, &current).await? {
            JobState::Running(pod) => JobOutcome::Running(pod.map(|p| p.name_any())),
            JobState::Complete(pod) => JobOutcome::Succeeded(
                pod.and_then(|p| job_state::terminated(&p, container))
                    .and_then(|t| t.message)
                    .unwrap_or_default(),
            ),
            JobState::Failed {
                timed_out_after: Some(deadline),
                ..
            } => JobOutcome::Failed {
                reason: "Timeout",
                message: format!("the build did not finish within {deadline}s"),
            },
            JobState::Failed { pod, .. } => {
                let (reason, message) = match pod {
                    Some(pod) => self.failure_of(&pod).await,
                    None => ("BuildFailed", "the build pod failed".into()),
                };
                JobOutcome::Failed { reason, message }
            }
        })
    }

    /// Deploys the build's image and decides when it is rolled out.
    async fn deploy(&self, app: &App) -> Result<Action> {
        if !self.ctx.helm_charts_served() {
            // Looked again: the helm-controller may have been installed since.
            if !crate::startup::helm_chart_kind_served(&self.ctx.client).await? {
                let status = self.with(
                    AppBuildPhase::Deploying,
                    "HelmControllerMissing",
                    crate::startup::HELM_CONTROLLER_MISSING,
                );
                if self.status().reason != status.reason {
                    self.write(status).await?;
                }
                return Ok(Action::requeue(HELM_CONTROLLER_RECHECK));
            }
            self.ctx.set_helm_charts_served(true);
        }
        let image = self.status().image.unwrap_or_default();
        if self.status().reason.as_deref() == Some("HelmControllerMissing") {
            let message = format!("deploying {image}");
            self.write(self.with(AppBuildPhase::Deploying, "Deploying", &message))
                .await?;
        }
        let project = self.namespace();
        let release = chart_name(&project, &self.build.spec.app_name);
        // What was there before this build's change, recorded before the change is made.
        let Some(baseline) = self.status().release_baseline else {
            let newest = self.newest_release(&project, &release).await?;
            let mut status = self.status();
            status.release_baseline = Some(newest.map_or(0, |(version, _)| version));
            // Its transition time starts the deploy's clock (see `deploy_deadline`).
            let mut conditions = ConditionSet::new(&status.conditions, self.build.metadata.generation);
            conditions.set(
                "Deployed",
                false,
                "Deploying",
                format!("HelmChart {}/{release} applied", self.ctx.config.agent_namespace),
            );
            status.conditions = conditions.conditions;
            self.write(status).await?;
            return Ok(Action::requeue(POLL));
        };
        // The App controller sets up the App's config Secret first thing; a release rendered
        // before that would be made again, with the Secret, right after.
        if app
            .status
            .as_ref()
            .and_then(|s| s.config_secret_name.as_ref())
            .is_none()
        {
            return Ok(Action::requeue(POLL));
        }
        let name = self.build.name_any();
        let running = crate::controllers::release::Running::of(&name, &image, Some(self.build));
        let values = match crate::controllers::release::render(self.ctx, app, &running).await? {
            Ok((values, _)) => values,
            Err(refused) => {
                return self
                    .finish(AppBuildPhase::Failed, "InvalidSpec", refused.to_string())
                    .await;
            }
        };
        // Values the helm-controller could not store would leave the build here for ever.
        let chart = helmchart::helm_chart(
            &self.ctx.config.agent_namespace,
            &project,
            &self.build.spec.app_name,
            &name,
            &values,
        );
        if let Err(too_large) = helmchart::check_stored_size(&chart) {
            return self
                .finish(AppBuildPhase::Failed, "ValuesTooLarge", too_large)
                .await;
        }
        // The release command runs (once per build) before the release replaces the serving
        // one: if it fails, the HelmChart is not touched.
        if !app.spec.release_command.is_empty() && !self.has_condition("ReleaseCommand") {
            return self.run_release_command(app, &values).await;
        }
        crate::controllers::release::apply(self.ctx, app, &self.build.name_any(), &values).await?;
        let deployments = Api::<Deployment>::namespaced(self.ctx.client.clone(), &project);
        let mut rollouts = Vec::new();
        for process in processes(&app.spec, &running.processes).into_keys() {
            let name = deployment_name(&self.build.spec.app_name, &process);
            let deployment = deployments.get_opt(&name).await?;
            rollouts.push((name, rollout(deployment.as_ref(), &self.build.name_any(), &image)));
        }
        // Only a release made after the baseline belongs to this change.
        let ours = self
            .newest_release(&project, &release)
            .await?
            .filter(|(version, _)| *version > baseline);
        let release_status = ours.as_ref().map(|(_, status)| status.clone());
        if let Some((_, Rollout::Failed(message))) =
            rollouts.iter().find(|(_, r)| matches!(r, Rollout::Failed(_)))
        {
            // A release that never became ready goes back to the one serving before it (whose
            // pods never stopped: the rollout keeps every available pod until new ones are).
            let message = match self.restore_running_release(app).await? {
                Some(restored) => format!("{message}; rolled back to {restored}"),
                None => format!("{message}; nothing earlier to roll back to"),
            };
            return self
                .finish(AppBuildPhase::Failed, "ReleaseNotReady", message)
                .await;
        }
        let deployment_name = rollouts
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", ");
        let verb = if rollouts.len() == 1 { "runs" } else { "run" };
        if rollouts.iter().all(|(_, r)| matches!(r, Rollout::Done))
            && release_status.as_deref() == Some("deployed")
        {
            {
                self.record_deployed(app, &image).await?;
                let revision = ours.map(|(version, _)| version);
                let message = match revision {
                    Some(revision) => {
                        format!("{deployment_name} {verb} {image} (release revision {revision})")
                    }
                    None => format!("{deployment_name} {verb} {image}"),
                };
                let mut status = self.ended(AppBuildPhase::Completed, "RolledOut", &message);
                let mut conditions = ConditionSet::new(&status.conditions, self.build.metadata.generation);
                conditions.set("Deployed", true, "RolledOut", &message);
                status.conditions = conditions.conditions;
                status.release_revision = revision;
                return self.conclude(status).await;
            }
        }
        if release_status.as_deref() == Some("failed") {
            return self
                .finish(
                    AppBuildPhase::Failed,
                    "DeployFailed",
                    format!("Helm release {release} failed; the previous release keeps serving"),
                )
                .await;
        }
        let job = format!("helm-install-{release}");
        let installer = match ours {
            None => {
                Api::<Job>::namespaced(self.ctx.client.clone(), &self.ctx.config.agent_namespace)
                    .get_opt(&job)
                    .await?
            }
            Some(_) => None,
        };
        if ours.is_none() {
            // The deploy began when the image was there (builds older than that were
            // superseded by then, so a Job created since is this build's).
            let deploy_started = self
                .status()
                .conditions
                .iter()
                .find(|c| c.type_ == "Built" && c.status == "True")
                .map(|c| c.last_transition_time.clone());
            if let (Some(installer), Some(started)) = (&installer, deploy_started)
                && let Some(why) = install_failed_without_release(installer, &started)
            {
                let namespace = &self.ctx.config.agent_namespace;
                return self
                    .finish(
                        AppBuildPhase::Failed,
                        "DeployFailed",
                        format!("the helm-controller's Job {namespace}/{job} failed without making a release ({why}); the previous release keeps serving. Its log: `kubectl -n {namespace} logs job/{job}`; build again to retry"),
                    )
                    .await;
            }
        }
        let (started, deadline) = self.deploy_deadline(app);
        let waited = u64::try_from(Timestamp::now().duration_since(started).as_secs()).unwrap_or(0);
        if waited > deadline {
            let waiting_for = match (&ours, &release_status) {
                (None, _) => {
                    let namespace = &self.ctx.config.agent_namespace;
                    let job_state = match &installer {
                        None => "does not exist (is the helm-controller running?)".to_string(),
                        Some(job) => install_job_progress(job),
                    };
                    format!(
                        "a Helm release from HelmChart {namespace}/{release}: the helm-controller's Job {namespace}/{job} {job_state}"
                    )
                }
                (Some((revision, state)), _) if state != "deployed" => {
                    format!("Helm release {release} revision {revision}, which is {state}")
                }
                _ => {
                    let pending: Vec<&str> = rollouts
                        .iter()
                        .filter(|(_, r)| !matches!(r, Rollout::Done))
                        .map(|(name, _)| name.as_str())
                        .collect();
                    format!("Deployment(s) {} to roll out", pending.join(", "))
                }
            };
            // The HelmChart holds this build's values: set it back, so that a helm-controller
            // that gets to it later does not release a build that failed.
            let restored = match self.restore_running_release(app).await? {
                Some(restored) => format!("the HelmChart is back on {restored}"),
                None => "nothing earlier to go back to".to_string(),
            };
            return self
                .finish(
                    AppBuildPhase::Failed,
                    "DeployTimeout",
                    format!("the deploy did not finish within {deadline}s (the App's progressDeadlineSeconds and --deploy-margin-seconds): still waiting for {waiting_for}; {restored}"),
                )
                .await;
        }
        Ok(Action::requeue(POLL))
    }

    /// When the deploy's clock started, and how many seconds it may take: the App's rollout
    /// deadline plus a margin for the helm-controller's install Job. The clock starts when the
    /// HelmChart is first applied (`Deployed` turned False), or again when the release command
    /// finished (it has a deadline of its own); waiting for a missing HelmChart kind
    /// (`HelmControllerMissing`) is not counted: installing the helm-controller later deploys
    /// the build, as documented.
    fn deploy_deadline(&self, app: &App) -> (Timestamp, u64) {
        let status = self.status();
        let since = |type_: &str, value: &str| {
            status
                .conditions
                .iter()
                .find(|c| c.type_ == type_ && c.status == value)
                .map(|c| c.last_transition_time.0)
        };
        let started = [
            since("Deployed", "False"),
            since("ReleaseCommand", "True"),
            since("Built", "True"),
        ]
        .into_iter()
        .flatten()
        .max()
        .or(status.start_time.as_ref().map(|t| t.0))
        .unwrap_or_else(Timestamp::now);
        let progress = app
            .spec
            .deploy
            .as_ref()
            .and_then(|d| d.progress_deadline_seconds)
            .unwrap_or(values::DEFAULT_PROGRESS_DEADLINE);
        let deadline = u64::try_from(progress).unwrap_or(0) + self.ctx.config.builds.deploy_margin_seconds;
        (started, deadline)
    }

    /// The pod of one of this build's Jobs, if it is still there.
    async fn job_pod(&self, job: &str) -> Result<Option<Pod>> {
        Ok(Api::<Pod>::namespaced(self.ctx.client.clone(), &self.namespace())
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await?
            .items
            .into_iter()
            .next())
    }

    /// Applies the App's running release again (the build it runs, with the App's settings):
    /// what serves before this build. Returns what it restored, if anything.
    async fn restore_running_release(&self, app: &App) -> Result<Option<String>> {
        let status = app.status.clone().unwrap_or_default();
        let (Some(build), Some(image)) = (status.current_build, status.current_image) else {
            return Ok(None);
        };
        if build == self.build.name_any() {
            return Ok(None);
        }
        let running_build = Api::<AppBuild>::namespaced(self.ctx.client.clone(), &self.namespace())
            .get_opt(&build)
            .await?;
        let running = crate::controllers::release::Running::of(&build, &image, running_build.as_ref());
        match crate::controllers::release::render(self.ctx, app, &running).await? {
            Ok((values, _)) => {
                crate::controllers::release::apply(self.ctx, app, &build, &values).await?;
                Ok(Some(format!("{image} (AppBuild {build})")))
            }
            Err(_) => Ok(None),
        }
    }

    fn has_condition(&self, type_: &str) -> bool {
        self.status()
            .conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    }

    /// Runs the App's release command in a Job with this release's web container; on success
    /// the deploy goes on, on failure the build fails with the command's own words.
    async fn run_release_command(&self, app: &App, values: &serde_json::Value) -> Result<Action> {
        let command = values::launch(&app.spec, jobs::RELEASE_CONTAINER, &app.spec.release_command);
        let owner = self
            .build
            .controller_owner_ref(&())
            .expect("an AppBuild from the apiserver has a name and uid");
        let job = jobs::release_job(
            app,
            self.build,
            &jobs::release_job_name(self.build),
            values,
            command,
            &owner,
            &self.ctx.config.builds,
        );
        let name = job.name_any();
        let jobs_api = Api::<Job>::namespaced(self.ctx.client.clone(), &self.namespace());
        match self.run_job(&jobs_api, job, jobs::RELEASE_CONTAINER).await? {
            JobOutcome::Running(pod) => {
                let mut status = self.with(
                    AppBuildPhase::Deploying,
                    "ReleaseCommand",
                    &format!("running the release command (Job {name}) before the release"),
                );
                if pod.is_some() {
                    status.pod_name = pod;
                }
                if status != self.status() {
                    self.write(status).await?;
                }
                Ok(Action::requeue(POLL))
            }
            JobOutcome::Succeeded(_) => {
                let mut status = self.with(
                    AppBuildPhase::Deploying,
                    "Deploying",
                    &format!("deploying {}", self.status().image.unwrap_or_default()),
                );
                let mut conditions = ConditionSet::new(&status.conditions, self.build.metadata.generation);
                conditions.set(
                    "ReleaseCommand",
                    true,
                    "Succeeded",
                    format!("the release command succeeded (Job {name})"),
                );
                status.conditions = conditions.conditions;
                self.write(status).await?;
                // With the log relay, the Job waits for its log (`release_delivered_jobs`).
                if !self.ctx.config.builds.relay_logs {
                    self.delete_job(&jobs_api, &name).await;
                }
                Ok(Action::requeue(POLL))
            }
            JobOutcome::Failed { reason, message } => {
                let said = self.release_command_output(&name).await.unwrap_or(message);
                let why = if reason == "Timeout" {
                    format!("did not finish within {}s", jobs::RELEASE_DEADLINE_SECONDS)
                } else {
                    said
                };
                self.finish(
                    AppBuildPhase::Failed,
                    "ReleaseCommandFailed",
                    format!("the release command failed, so the release was not made and the previous one keeps serving (Job {name}): {why}"),
                )
                .await
            }
        }
    }

    /// The exit code and termination message of a failed release command: the command's own
    /// message, or (`FallbackToLogsOnError`) the last lines of its log.
    async fn release_command_output(&self, job: &str) -> Option<String> {
        let pods = Api::<Pod>::namespaced(self.ctx.client.clone(), &self.namespace());
        let pod = pods
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await
            .ok()?
            .items
            .into_iter()
            .next()?;
        let terminated = job_state::terminated(&pod, jobs::RELEASE_CONTAINER)?;
        Some(job_state::exit_summary(&terminated))
    }

    async fn newest_release(&self, namespace: &str, release: &str) -> Result<Option<(u32, String)>> {
        Ok(helmchart::newest_release(&self.ctx.client, namespace, release).await?)
    }

    fn with(&self, phase: AppBuildPhase, reason: &str, message: &str) -> AppBuildStatus {
        let mut status = self.status();
        let mut conditions = ConditionSet::new(&status.conditions, self.build.metadata.generation);
        conditions.set("Ready", phase == AppBuildPhase::Completed, reason, message);
        status.phase = Some(phase);
        status.reason = Some(reason.into());
        status.message = Some(message.into());
        status.observed_generation = self.build.metadata.generation;
        status.conditions = conditions.conditions;
        if status.start_time.is_none() {
            status.start_time = Some(Time(Timestamp::now()));
        }
        status
    }

    fn deploying(&self, image: String, digest: Option<String>) -> AppBuildStatus {
        let mut status = self.with(
            AppBuildPhase::Deploying,
            "Deploying",
            &format!("deploying {image}"),
        );
        let mut conditions = ConditionSet::new(&status.conditions, self.build.metadata.generation);
        conditions.set("Built", true, "Built", format!("image {image}"));
        status.conditions = conditions.conditions;
        status.image = Some(image);
        status.image_digest = digest;
        status
    }

    fn failed(&self, reason: &str, message: String) -> AppBuildStatus {
        self.ended(AppBuildPhase::Failed, reason, &message)
    }

    async fn finish(&self, phase: AppBuildPhase, reason: &str, message: String) -> Result<Action> {
        self.conclude(self.ended(phase, reason, &message)).await
    }

    /// A final status: `with` plus the completion time.
    fn ended(&self, phase: AppBuildPhase, reason: &str, message: &str) -> AppBuildStatus {
        let mut status = self.with(phase, reason, message);
        status.completion_time = Some(Time(Timestamp::now()));
        status
    }

    /// Writes a final status, then lets the build's Jobs go, publishes the Event and prunes
    /// the history.
    async fn conclude(&self, status: AppBuildStatus) -> Result<Action> {
        let phase = status.phase.unwrap_or_default();
        // Status first: deleting the Jobs wakes this build again, and that reconcile must see
        // the final phase rather than recreate a Job.
        self.write(status.clone()).await?;
        self.revoke_push_secret().await;
        // A cancelled build's pod is stopped at once (its log up to there is relayed, then
        // marked truncated); a failed one's log explains the failure, so with the relay its
        // Jobs wait for it like a successful one's.
        let stop_now = phase == AppBuildPhase::Cancelled || !self.ctx.config.builds.relay_logs;
        if phase != AppBuildPhase::Completed && stop_now {
            let jobs = Api::<Job>::namespaced(self.ctx.client.clone(), &self.namespace());
            for name in [
                jobs::resolve_job_name(self.build),
                jobs::build_job_name(self.build),
                jobs::release_job_name(self.build),
            ] {
                self.delete_job(&jobs, &name).await;
            }
        }
        self.event_for(&status).await;
        self.prune_history_of_app().await;
        Ok(Action::await_change())
    }

    async fn prune_history_of_app(&self) {
        let apps = Api::<App>::namespaced(self.ctx.client.clone(), &self.namespace());
        if let Ok(Some(app)) = apps.get_opt(&self.build.spec.app_name).await {
            self.prune_history(&app).await;
        }
    }

    /// Keeps the newest `keep_succeeded` Completed and `keep_failed` Failed or Cancelled
    /// AppBuilds of the App and deletes the older ones (their Jobs go with them); never the
    /// App's latest build or the build of the image it runs. Best effort: the next build
    /// tries again.
    async fn prune_history(&self, app: &App) {
        let api = Api::<AppBuild>::namespaced(self.ctx.client.clone(), &self.namespace());
        let siblings = match api
            .list(&ListParams::default().fields(&format!("spec.appName={}", self.build.spec.app_name)))
            .await
        {
            Ok(list) => list.items,
            Err(err) => {
                tracing::warn!(app = %self.build.spec.app_name, %err, "cannot list builds to prune history");
                return;
            }
        };
        let settings = &self.ctx.config.builds;
        for name in history_to_prune(app, siblings, settings.keep_succeeded, settings.keep_failed) {
            match super::delete_if_present(&api, &name, &DeleteParams::background()).await {
                Ok(true) => {
                    tracing::info!(build = %name, app = %self.build.spec.app_name, "pruned from the build history")
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(build = %name, %err, "cannot prune a build from the history"),
            }
        }
    }

    async fn event_for(&self, status: &AppBuildStatus) {
        let type_ = if status.phase == Some(AppBuildPhase::Completed) {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let reason = status.reason.clone().unwrap_or_default();
        self.event(type_, &reason, status.message.clone().unwrap_or_default())
            .await;
    }

    async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.ctx
            .publish(&self.build.object_ref(&()), type_, reason, "Build", note)
            .await;
    }

    async fn write(&self, status: AppBuildStatus) -> Result<()> {
        if self.build.status.as_ref() == Some(&status) {
            return Ok(());
        }
        // `status.logs` belongs to the log relay (its own field manager): leaving it out keeps
        // this write from taking it over with a stale copy.
        let status = AppBuildStatus {
            logs: Vec::new(),
            ..status
        };
        super::apply_status_at_version(self.ctx, self.build, &status).await
    }

    /// With the log relay: deletes each step's Job once its result is recorded (or the build
    /// ended) and the hub has every log of its pod (`status.logs`, written by the relay, whose
    /// write wakes this build).
    async fn release_delivered_jobs(&self) {
        if !self.ctx.config.builds.relay_logs {
            return;
        }
        let status = self.status();
        let ended = status.phase.is_some_and(AppBuildPhase::is_final);
        let jobs = Api::<Job>::namespaced(self.ctx.client.clone(), &self.namespace());
        let steps = [
            (
                jobs::resolve_job_name(self.build),
                status.commit_sha.is_some(),
                &[jobs::RESOLVE_CONTAINER][..],
            ),
            (
                jobs::build_job_name(self.build),
                status.image.is_some(),
                &[jobs::CLONE_CONTAINER, jobs::BUILD_CONTAINER][..],
            ),
            (
                jobs::release_job_name(self.build),
                self.has_condition("ReleaseCommand"),
                &[jobs::RELEASE_CONTAINER][..],
            ),
        ];
        for (job, recorded, containers) in steps {
            if (recorded || ended) && logs_delivered(&status, containers) {
                self.delete_job(&jobs, &job).await;
            }
        }
    }

    async fn delete_job(&self, jobs: &Api<Job>, name: &str) {
        if let Err(err) = super::delete_if_present(jobs, name, &DeleteParams::background()).await {
            tracing::warn!(job = name, %err, "could not delete a finished build Job; its TTL will");
        }
    }

    /// A newer build of the same App supersedes running older ones.
    async fn supersede_older_builds(&self) -> Result<()> {
        let api = Api::<AppBuild>::namespaced(self.ctx.client.clone(), &self.namespace());
        let created = self.build.metadata.creation_timestamp.clone();
        for older in api.list(&ListParams::default()).await?.items {
            let running = !phase(&older).is_some_and(AppBuildPhase::is_final);
            if older.spec.app_name != self.build.spec.app_name
                || older.name_any() == self.build.name_any()
                || !running
            {
                continue;
            }
            if older.metadata.creation_timestamp > created {
                continue;
            }
            let pipeline = Pipeline {
                ctx: self.ctx,
                build: &older,
            };
            pipeline
                .finish(
                    AppBuildPhase::Cancelled,
                    "Superseded",
                    format!("superseded by {}", self.build.name_any()),
                )
                .await?;
        }
        Ok(())
    }

    async fn set_latest_build(&self, app: &App) -> Result<()> {
        // Server-side apply drops the fields this manager owns and leaves out: the images the
        // App runs must be applied again with it, or a new build would erase them.
        let status = app.status.clone().unwrap_or_default();
        let patch = json!({"apiVersion": App::api_version(&()), "kind": "App", "status": {
            "latestBuild": self.build.name_any(),
            "currentImage": status.current_image,
            "previousImage": status.previous_image,
            "currentBuild": status.current_build,
        }});
        Api::<App>::namespaced(self.ctx.client.clone(), &self.namespace())
            .patch_status(
                &app.name_any(),
                &PatchParams::apply(BUILD_STATUS_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await?;
        Ok(())
    }

    async fn record_deployed(&self, app: &App, image: &str) -> Result<()> {
        let current = app.status.as_ref().and_then(|s| s.current_image.clone());
        let previous = match current {
            Some(current) if current != image => Some(current),
            _ => app.status.as_ref().and_then(|s| s.previous_image.clone()),
        };
        let patch = json!({"apiVersion": App::api_version(&()), "kind": "App", "status": {
            "latestBuild": self.build.name_any(), "currentImage": image, "previousImage": previous,
            "currentBuild": self.build.name_any()}});
        Api::<App>::namespaced(self.ctx.client.clone(), &self.namespace())
            .patch_status(
                &app.name_any(),
                &PatchParams::apply(BUILD_STATUS_MANAGER).force(),
                &Patch::Apply(patch),
            )
            .await?;
        Ok(())
    }
}

/// The AppBuilds to delete so that at most `keep_succeeded` Completed and `keep_failed`
/// Failed/Cancelled ones remain, oldest first; builds still running, the App's latest build
/// and the build whose image the App runs are never pruned.
fn history_to_prune(
    app: &App,
    builds: Vec<AppBuild>,
    keep_succeeded: usize,
    keep_failed: usize,
) -> Vec<String> {
    let status = app.status.clone().unwrap_or_default();
    let protected = |b: &AppBuild| {
        status.latest_build.as_deref() == Some(b.name_any().as_str())
            || (b.status.as_ref().and_then(|s| s.image.as_deref()).is_some()
                && b.status.as_ref().and_then(|s| s.image.as_deref()) == status.current_image.as_deref()
                && phase(b) == Some(AppBuildPhase::Completed))
    };
    let mut finished: Vec<AppBuild> = builds
        .into_iter()
        .filter(|b| phase(b).is_some_and(AppBuildPhase::is_final))
        .collect();
    // Newest first; the name breaks ties within a second.
    finished.sort_by(|a, b| {
        (b.metadata.creation_timestamp.as_ref().map(|t| t.0), b.name_any())
            .cmp(&(a.metadata.creation_timestamp.as_ref().map(|t| t.0), a.name_any()))
    });
    let (mut succeeded, mut failed) = (0, 0);
    let mut prune = Vec::new();
    for build in finished {
        let kept = if phase(&build) == Some(AppBuildPhase::Completed) {
            succeeded += 1;
            succeeded <= keep_succeeded
        } else {
            failed += 1;
            failed <= keep_failed
        };
        if !kept && !protected(&build) {
            prune.push(build.name_any());
        }
    }
    prune
}

/// Whether the hub has every log of these containers (all complete in `status.logs`).
fn logs_delivered(status: &AppBuildStatus, containers: &[&str]) -> bool {
    containers.iter().all(|container| {
        status
            .logs
            .iter()
            .any(|l| l.container == *container && l.complete)
    })
}

enum JobOutcome {
    Running(Option<String>),
    Succeeded(String),
    Failed { reason: &'static str, message: String },
}

/// Why the helm-controller's install Job failed, if it failed during this deploy (a Job from
/// before it says nothing about this build's change). Nothing retries such a Job until the
/// HelmChart changes again, so the build must not wait for it.
/// What a helm-controller install Job is doing, for a deploy that waited too long on it.
fn install_job_progress(job: &Job) -> String {
    let status = job.status.clone().unwrap_or_default();
    let name = job.name_any();
    let namespace = job.namespace().unwrap_or_default();
    if status.active.unwrap_or(0) > 0 {
        format!("is still running (`kubectl -n {namespace} logs job/{name}`)")
    } else if status.failed.unwrap_or(0) > 0 {
        format!("failed {} time(s) and retries", status.failed.unwrap_or(0))
    } else {
        format!(
            "has no pod running (`kubectl -n {namespace} describe job/{name}` says why: quota, scheduling, image)"
        )
    }
}

fn install_failed_without_release(installer: &Job, deploy_started: &Time) -> Option<String> {
    let created = installer.metadata.creation_timestamp.as_ref()?;
    if created.0 < deploy_started.0 {
        return None;
    }
    job_state::failure_message(installer)
}

/// The container of `pod` that failed (init containers first: they run first) and how it
/// ended.
fn failed_container(pod: &Pod) -> Option<(String, ContainerStateTerminated)> {
    let status = pod.status.as_ref()?;
    status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .find_map(|c| {
            let terminated = c.state.as_ref()?.terminated.as_ref()?;
            (terminated.exit_code != 0).then(|| (c.name.clone(), terminated.clone()))
        })
}

/// The spec of `pod`'s container `name`.
fn container_spec<'a>(pod: &'a Pod, name: &str) -> Option<&'a k8s_openapi::api::core::v1::Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == name)
}

#[cfg(test)]
mod tests {
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
