//! What an AppBuild leaves behind: its status and Events, the App fields builds own (latest
//! build, images), the history kept per App, and the Jobs released once the hub has their logs.

use super::*;

impl Pipeline<'_> {
    pub(super) fn with(&self, phase: AppBuildPhase, reason: &str, message: &str) -> AppBuildStatus {
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

    pub(super) fn deploying(&self, image: String, digest: Option<String>) -> AppBuildStatus {
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

    pub(super) fn failed(&self, reason: &str, message: String) -> AppBuildStatus {
        self.ended(AppBuildPhase::Failed, reason, &message)
    }

    pub(super) async fn finish(&self, phase: AppBuildPhase, reason: &str, message: String) -> Result<Action> {
        self.conclude(self.ended(phase, reason, &message)).await
    }

    /// A final status: `with` plus the completion time.
    pub(super) fn ended(&self, phase: AppBuildPhase, reason: &str, message: &str) -> AppBuildStatus {
        let mut status = self.with(phase, reason, message);
        status.completion_time = Some(Time(Timestamp::now()));
        status
    }

    /// Writes a final status, then lets the build's Jobs go, publishes the Event and prunes
    /// the history.
    pub(super) async fn conclude(&self, status: AppBuildStatus) -> Result<Action> {
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

    pub(super) async fn prune_history_of_app(&self) {
        let apps = Api::<App>::namespaced(self.ctx.client.clone(), &self.namespace());
        if let Ok(Some(app)) = apps.get_opt(&self.build.spec.app_name).await {
            self.prune_history(&app).await;
        }
    }

    /// Keeps the newest `keep_succeeded` Completed and `keep_failed` Failed or Cancelled
    /// AppBuilds of the App and deletes the older ones (their Jobs go with them); never the
    /// App's latest build or the build of the image it runs. Best effort: the next build
    /// tries again.
    pub(super) async fn prune_history(&self, app: &App) {
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
            match crate::controllers::delete_if_present(&api, &name, &DeleteParams::background()).await {
                Ok(true) => {
                    tracing::info!(build = %name, app = %self.build.spec.app_name, "pruned from the build history")
                }
                Ok(false) => {}
                Err(err) => tracing::warn!(build = %name, %err, "cannot prune a build from the history"),
            }
        }
    }

    pub(super) async fn event_for(&self, status: &AppBuildStatus) {
        let type_ = if status.phase == Some(AppBuildPhase::Completed) {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let reason = status.reason.clone().unwrap_or_default();
        self.event(type_, &reason, status.message.clone().unwrap_or_default())
            .await;
    }

    pub(super) async fn event(&self, type_: EventType, reason: &str, note: String) {
        self.ctx
            .publish(&self.build.object_ref(&()), type_, reason, "Build", note)
            .await;
    }

    pub(super) async fn write(&self, status: AppBuildStatus) -> Result<()> {
        if self.build.status.as_ref() == Some(&status) {
            return Ok(());
        }
        // `status.logs` belongs to the log relay (its own field manager): leaving it out keeps
        // this write from taking it over with a stale copy.
        let status = AppBuildStatus {
            logs: Vec::new(),
            ..status
        };
        let written = crate::controllers::apply_status_at_version(self.ctx, self.build, &status).await?;
        *self.written.lock().unwrap() = Some(written);
        Ok(())
    }

    /// With the log relay: deletes each step's Job once its result is recorded (or the build
    /// ended) and the hub has every log of its pod (`status.logs`, written by the relay, whose
    /// write wakes this build).
    pub(super) async fn release_delivered_jobs(&self) {
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

    pub(super) async fn delete_job(&self, jobs: &Api<Job>, name: &str) {
        if let Err(err) = crate::controllers::delete_if_present(jobs, name, &DeleteParams::background()).await
        {
            tracing::warn!(job = name, %err, "could not delete a finished build Job; its TTL will");
        }
    }

    /// A newer build of the same App supersedes running older ones.
    pub(super) async fn supersede_older_builds(&self) -> Result<()> {
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
            let pipeline = Pipeline::new(self.ctx, &older);
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

    pub(super) async fn set_latest_build(&self, app: &App) -> Result<()> {
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

    pub(super) async fn record_deployed(&self, app: &App, image: &str) -> Result<()> {
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
pub(super) fn history_to_prune(
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
pub(super) fn logs_delivered(status: &AppBuildStatus, containers: &[&str]) -> bool {
    containers.iter().all(|container| {
        status
            .logs
            .iter()
            .any(|l| l.container == *container && l.complete)
    })
}
