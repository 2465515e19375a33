//! The deploy step of an AppBuild: the release command, the HelmChart of the release, and the
//! wait until the App's Deployment runs this build's image (or the deploy fails with the
//! helm-controller's or the rollout's own words); rollbacks to an earlier build's image.

use super::*;

impl Pipeline<'_> {
    /// A rollback: the image of an earlier build of this App, deployed without building.
    pub(super) async fn roll_back(&self, target: &str) -> Result<Step> {
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

    /// Deploys the build's image and decides when it is rolled out.
    pub(super) async fn deploy(&self, app: &App) -> Result<Action> {
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
            return self.advanced();
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
            return self.advanced();
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
        let records = pending::revisions(&self.ctx.client, &project, &release).await?;
        let newest = pending::newest(&records);
        let ours = newest.clone().filter(|(version, _)| *version > baseline);
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
        let job = format!("helm-install-{release}");
        if newest
            .as_ref()
            .is_some_and(|(_, state)| state.starts_with("pending-"))
            && self.repair_pending(&records, &release, &job, baseline).await?
        {
            return Ok(Action::requeue(POLL));
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
        // A rollout that ends, the helm-controller's Job ending and its giving up wake the
        // build (see `run`); this looks again for what has no event (a release record) and at
        // the deadline.
        let left = Duration::from_secs(deadline.saturating_sub(waited) + 1);
        Ok(Action::requeue(DEPLOY_POLL.min(left)))
    }

    /// When the deploy's clock started, and how many seconds it may take: the App's rollout
    /// deadline plus a margin for the helm-controller's install Job. The clock starts when the
    /// HelmChart is first applied (`Deployed` turned False), or again when the release command
    /// finished (it has a deadline of its own); waiting for a missing HelmChart kind
    /// (`HelmControllerMissing`) is not counted: installing the helm-controller later deploys
    /// the build, as documented.
    pub(super) fn deploy_deadline(&self, app: &App) -> (Timestamp, u64) {
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

    /// Applies the App's running release again (the build it runs, with the App's settings):
    /// what serves before this build. Returns what it restored, if anything.
    pub(super) async fn restore_running_release(&self, app: &App) -> Result<Option<String>> {
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

    pub(super) fn has_condition(&self, type_: &str) -> bool {
        self.status()
            .conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    }

    /// Runs the App's release command in a Job with this release's web container; on success
    /// the deploy goes on, on failure the build fails with the command's own words.
    pub(super) async fn run_release_command(&self, app: &App, values: &serde_json::Value) -> Result<Action> {
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
                self.advanced()
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
    pub(super) async fn release_command_output(&self, job: &str) -> Option<String> {
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

    /// The newest release record is pending: true when it was cleared, once the helm-controller's Job failed on it (see `deploy::pending`). A cleared
    /// revision at or below the baseline was left by an earlier deploy: helm writes that version
    /// again for this build's change, so the baseline goes below it.
    async fn repair_pending(
        &self,
        records: &[kube::core::PartialObjectMeta<Secret>],
        release: &str,
        job: &str,
        baseline: u32,
    ) -> Result<bool> {
        let agent_namespace = &self.ctx.config.agent_namespace;
        let installer = Api::<Job>::namespaced(self.ctx.client.clone(), agent_namespace)
            .get_opt(job)
            .await?;
        let Some(stuck) = pending::stuck(records, installer.as_ref()) else {
            return Ok(false);
        };
        pending::clear(&self.ctx.client, &self.namespace(), &stuck, agent_namespace, job).await?;
        let note = stuck.describe(release, &format!("{agent_namespace}/{job}"));
        tracing::warn!(build = %self.build.name_any(), "{note}");
        self.event(EventType::Warning, "ReleaseRepaired", note).await;
        if stuck.version <= baseline {
            let mut status = self.status();
            status.release_baseline = Some(stuck.version - 1);
            self.write(status).await?;
        }
        Ok(true)
    }

    pub(super) async fn newest_release(
        &self,
        namespace: &str,
        release: &str,
    ) -> Result<Option<(u32, String)>> {
        Ok(helmchart::newest_release(&self.ctx.client, namespace, release).await?)
    }
}

/// What a helm-controller install Job is doing, for a deploy that waited too long on it.
pub(super) fn install_job_progress(job: &Job) -> String {
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

/// Why the helm-controller's install Job failed, if it failed during this deploy (a Job from
/// before it says nothing about this build's change). Nothing retries such a Job until the
/// HelmChart changes again, so the build must not wait for it.
pub(super) fn install_failed_without_release(installer: &Job, deploy_started: &Time) -> Option<String> {
    let created = installer.metadata.creation_timestamp.as_ref()?;
    if created.0 < deploy_started.0 {
        return None;
    }
    job_state::failure_message(installer)
}
