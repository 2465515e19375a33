//! The build step of an AppBuild: resolve the ref, build and push the image in Jobs (or reuse
//! an image an earlier build of the same inputs pushed), with a push credential scoped to this
//! build and revoked once the push is done, and a failure reason taken from what the Job left.

use super::*;

impl Pipeline<'_> {
    pub(super) async fn build_image(&self, app: &App) -> Result<Step> {
        let owner = self
            .build
            .controller_owner_ref(&())
            .expect("an AppBuild from the apiserver has a uid");
        let settings = &self.ctx.config.builds;
        // Clone only what the App controller checked for the App's current spec.
        let git_secret = match crate::controllers::app::clone_source(app) {
            crate::controllers::app::CloneSource::Ready(secret) => secret,
            crate::controllers::app::CloneSource::Unchecked => return Ok(Step::Wait(Action::requeue(POLL))),
            crate::controllers::app::CloneSource::Refused { reason, message } => {
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
    pub(super) async fn push_target(&self, app: &App) -> Result<PushTarget, RegistryError> {
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
    pub(super) async fn push_secret(
        &self,
        app: &App,
        target: &PushTarget,
        mint: bool,
    ) -> Result<String, RegistryError> {
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
    pub(super) fn owns(&self, meta: &kube::api::ObjectMeta) -> bool {
        let uid = self.build.metadata.uid.as_deref();
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && Some(o.uid.as_str()) == uid)
    }

    /// Deletes this build's push Secret, if it has one: once the image is pushed or the build
    /// ended, nothing needs its token. Best effort (it expires anyway, and goes with the
    /// AppBuild).
    pub(super) async fn revoke_push_secret(&self) {
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
        if let Err(err) = crate::controllers::delete_if_present(&secrets, &name, &params).await {
            tracing::warn!(secret = %name, %err, "cannot delete a build's push Secret; it goes with the AppBuild");
        }
    }

    /// The image of an earlier build of this App with the same inputs, as this build's
    /// result (no build Job), if one was pushed.
    pub(super) async fn reusable_image(&self, inputs: &str) -> Result<Option<AppBuildStatus>> {
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

    pub(super) fn pending_or_building(
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
    pub(super) async fn is_stale(&self) -> Result<bool> {
        let fresh = Api::<AppBuild>::namespaced(self.ctx.client.clone(), &self.namespace())
            .get_metadata_opt(&self.build.name_any())
            .await?;
        Ok(fresh.is_none_or(|f| f.metadata.resource_version != self.build.metadata.resource_version))
    }

    /// Why a failed step's pod failed (see [`failure`]). A build container that left no
    /// words of its own (an empty message, or only the digest kaniko writes before it
    /// pushes) has the tail of its log read: what the tool printed last.
    pub(super) async fn failure_of(&self, pod: &Pod) -> (&'static str, String) {
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
    pub(super) async fn run_job(&self, jobs: &Api<Job>, job: Job, container: &str) -> Result<JobOutcome> {
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

    /// The pod of one of this build's Jobs, if it is still there.
    pub(super) async fn job_pod(&self, job: &str) -> Result<Option<Pod>> {
        Ok(Api::<Pod>::namespaced(self.ctx.client.clone(), &self.namespace())
            .list(&ListParams::default().labels(&format!("job-name={job}")))
            .await?
            .items
            .into_iter()
            .next())
    }
}

pub(super) enum JobOutcome {
    Running(Option<String>),
    Succeeded(String),
    Failed { reason: &'static str, message: String },
}

/// The container of `pod` that failed (init containers first: they run first) and how it
/// ended.
pub(super) fn failed_container(pod: &Pod) -> Option<(String, ContainerStateTerminated)> {
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
pub(super) fn container_spec<'a>(
    pod: &'a Pod,
    name: &str,
) -> Option<&'a k8s_openapi::api::core::v1::Container> {
    let spec = pod.spec.as_ref()?;
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .find(|c| c.name == name)
}
