//! The App controller's runtime half: the App's config Secret and config revision, and new
//! releases of the running image when config vars, processes, domains, cron entries, scaling
//! or bound services change (no build), each recorded in `status.releases`.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::api::{App, AppBuild, DomainStatus, ReleaseReason, ReleaseRecord};
use crate::controllers::release::{self, Running, config_secret_name};
use crate::controllers::{APP_LABEL, ConditionSet, Context, Result, deploy, job_state, jobs};

/// Releases kept in `status.releases`.
pub const KEEP_RELEASES: usize = 20;

/// The runtime fields of App status that the App controller owns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RuntimeStatus {
    pub config_secret_name: Option<String>,
    pub config_revision: Option<u32>,
    pub config_fingerprint: Option<String>,
    pub runtime_fingerprint: Option<String>,
    pub releases: Vec<ReleaseRecord>,
    pub domains: Vec<DomainStatus>,
}

impl RuntimeStatus {
    pub fn of(app: &App) -> Self {
        let status = app.status.clone().unwrap_or_default();
        Self {
            config_secret_name: status.config_secret_name,
            config_revision: status.config_revision,
            config_fingerprint: status.config_fingerprint,
            runtime_fingerprint: status.runtime_fingerprint,
            releases: status.releases,
            domains: status.domains,
        }
    }
}

/// Makes sure the App's config Secret exists (created empty, owned by the App; its values
/// are the user's and never touched) and counts a new config revision when the plain vars or
/// the Secret changed.
pub async fn ensure_config(app: &App, ctx: &Context, runtime: &mut RuntimeStatus) -> Result<()> {
    let namespace = app.namespace().unwrap_or_default();
    let name = config_secret_name(&app.name_any());
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &namespace);
    let meta = match secrets.get_metadata_opt(&name).await? {
        Some(existing) => existing.metadata,
        None => {
            let secret = release::config_secret(app);
            match secrets.create(&PostParams::default(), &secret).await {
                Ok(created) => created.metadata,
                // Created meanwhile (another pass, or by the user first): use it as it is.
                Err(kube::Error::Api(status)) if status.code == 409 => {
                    secrets.get_metadata(&name).await?.metadata
                }
                Err(err) => return Err(err.into()),
            }
        }
    };
    let fingerprint = release::config_fingerprint(
        &app.spec.config,
        meta.uid.as_deref().unwrap_or_default(),
        meta.resource_version.as_deref().unwrap_or_default(),
    );
    if runtime.config_fingerprint.as_deref() != Some(fingerprint.as_str()) {
        runtime.config_revision = Some(runtime.config_revision.unwrap_or(0) + 1);
        runtime.config_fingerprint = Some(fingerprint);
    }
    runtime.config_secret_name = Some(name);
    Ok(())
}

/// Records a build's release once the App runs it, and releases the running image again when
/// what the App itself contributes changed. Returns a message for status when the release
/// waits.
pub async fn release(
    app: &App,
    ctx: &Context,
    bound: &[String],
    runtime: &mut RuntimeStatus,
) -> Result<Option<String>> {
    let status = app.status.clone().unwrap_or_default();
    let (Some(build), Some(image)) = (status.current_build.clone(), status.current_image.clone()) else {
        // Nothing runs yet: the first build renders the App's settings.
        return Ok(None);
    };
    let namespace = app.namespace().unwrap_or_default();
    let builds = Api::<AppBuild>::namespaced(ctx.client.clone(), &namespace);
    let revision = runtime.config_revision.unwrap_or(0);
    // The App as it will be released: with this pass's config revision.
    let mut view = app.clone();
    if let Some(status) = view.status.as_mut() {
        status.config_secret_name = runtime.config_secret_name.clone();
        status.config_revision = runtime.config_revision;
    }
    let fingerprint = release::runtime_fingerprint(&view, bound);
    let last = runtime.releases.last();
    let new_build =
        last.map(|r| (r.build.as_deref(), r.image.as_str())) != Some((Some(build.as_str()), image.as_str()));
    let settings_changed = runtime.runtime_fingerprint.as_deref() != Some(fingerprint.as_str());
    if !new_build && !settings_changed {
        // The common case: nothing to record, nothing to release (no further reads).
        return Ok(None);
    }
    let deployed = release::deployed_values(ctx, app).await?;
    let running_build = builds.get_opt(&build).await?;
    if new_build {
        let reason = match running_build.as_ref().and_then(|b| b.spec.rollback_to.as_ref()) {
            Some(_) => ReleaseReason::Rollback,
            None => ReleaseReason::Build,
        };
        // The revision the build released with is the one its pods carry.
        let released_revision = deployed
            .as_ref()
            .and_then(|v| v["generic"]["podAnnotations"][deploy::CONFIG_REVISION_ANNOTATION].as_str())
            .and_then(|r| r.parse().ok())
            .unwrap_or(revision);
        record(runtime, reason, &image, &build, released_revision);
    }
    if !settings_changed {
        return Ok(None);
    }
    // A build on its way out renders the new settings itself; release after it. The chart
    // names the build it deploys: this App object may predate that build's own write of
    // `latestBuild`, and releasing the running build over it would undo its deploy.
    let charted = deployed
        .as_ref()
        .and_then(|v| v["generic"]["podAnnotations"][deploy::BUILD_ANNOTATION].as_str());
    for other in [status.latest_build.as_deref(), charted]
        .into_iter()
        .flatten()
        .filter(|other| *other != build)
    {
        if let Some(other) = builds.get_opt(other).await?
            && !other
                .status
                .as_ref()
                .and_then(|s| s.phase)
                .is_some_and(|p| p.is_final())
        {
            return Ok(Some(format!(
                "settings changed: released after AppBuild {} finishes",
                other.name_any()
            )));
        }
    }
    let running = Running::of(&build, &image, running_build.as_ref());
    let values = match release::render(ctx, &view, &running).await? {
        Ok((values, _)) => values,
        Err(refused) => return Ok(Some(format!("cannot release the running build again: {refused}"))),
    };
    // Values the helm-controller cannot store would never be released: say so, keep serving.
    let chart = deploy::helm_chart_object(
        &ctx.config.agent_namespace,
        &namespace,
        &app.name_any(),
        &build,
        &values,
    );
    if let Err(too_large) = deploy::check_stored_size(&chart) {
        return Ok(Some(format!(
            "cannot release the running build again: {too_large}"
        )));
    }
    if deployed.as_ref() != Some(&values) {
        // Releasing is decided from this App object, which may lag behind a build that has
        // just made itself current: releasing the build it names would undo that deploy. Act
        // only on the App as it is now.
        let fresh = Api::<App>::namespaced(ctx.client.clone(), &namespace)
            .get_metadata_opt(&app.name_any())
            .await?;
        if fresh.is_none_or(|f| f.metadata.resource_version != app.metadata.resource_version) {
            return Ok(Some("the App changed meanwhile: looking again".into()));
        }
        let previous_revision = runtime.releases.last().map_or(0, |r| r.config_revision);
        let reason = if previous_revision != revision {
            ReleaseReason::ConfigChange
        } else if deployed
            .as_ref()
            .is_some_and(|d| release::only_scale_differs(d, &values))
        {
            ReleaseReason::Scale
        } else if deployed
            .as_ref()
            .is_some_and(|d| release::only_bindings_differ(d, &values))
        {
            ReleaseReason::Bindings
        } else {
            ReleaseReason::Settings
        };
        // Like a build's, this release runs the release command first (scaling is not a
        // release of new code or config: it does not).
        if reason != ReleaseReason::Scale && !app.spec.release_command.is_empty() {
            let job = format!("{}-release-{}", app.name_any(), &fingerprint[..10]);
            if let Some(waiting) = release_command(ctx, app, &job, &values).await? {
                return Ok(Some(waiting));
            }
        }
        release::apply(ctx, app, &build, &values).await?;
        let version = record(runtime, reason, &image, &build, revision);
        let event = match reason {
            ReleaseReason::Bindings => "BindingsChanged",
            _ => "Released",
        };
        ctx.publish(
            &app.object_ref(&()),
            EventType::Normal,
            event,
            "Release",
            format!(
                "release v{version} ({reason:?}): {image} with config revision {revision}, bound to {}",
                if bound.is_empty() {
                    "no services".to_string()
                } else {
                    bound.join(", ")
                }
            ),
        )
        .await;
    }
    runtime.runtime_fingerprint = Some(fingerprint);
    Ok(None)
}

fn record(
    runtime: &mut RuntimeStatus,
    reason: ReleaseReason,
    image: &str,
    build: &str,
    config_revision: u32,
) -> u32 {
    let version = runtime.releases.last().map_or(1, |r| r.version + 1);
    runtime.releases.push(ReleaseRecord {
        version,
        reason,
        image: image.to_owned(),
        build: Some(build.to_owned()),
        config_revision,
        time: Time(Timestamp::now()),
        rolled_out: None,
    });
    let excess = runtime.releases.len().saturating_sub(KEEP_RELEASES);
    runtime.releases.drain(..excess);
    version
}

/// Records when the newest release has rolled out: every Deployment of the App runs its
/// build's image with its config revision, updated and available. Returns whether it is still
/// rolling out (Deployments are not watched by the App controller: look again soon).
pub async fn track_rollout(app: &App, ctx: &Context, runtime: &mut RuntimeStatus) -> Result<bool> {
    let Some(last) = runtime.releases.last_mut() else {
        return Ok(false);
    };
    if last.rolled_out.is_some() {
        return Ok(false);
    }
    let Some(build) = last.build.clone() else {
        return Ok(false);
    };
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), &app.namespace().unwrap_or_default())
        .list(&ListParams::default().labels(&format!("{}={}", APP_LABEL, app.name_any())))
        .await?
        .items;
    let revision = last.config_revision.to_string();
    let done = !deployments.is_empty()
        && deployments.iter().all(|d| {
            deploy::rolled_out(d, &build, &last.image)
                && d.spec
                    .as_ref()
                    .and_then(|s| s.template.metadata.as_ref())
                    .and_then(|m| m.annotations.as_ref())
                    .and_then(|a| a.get(deploy::CONFIG_REVISION_ANNOTATION))
                    == Some(&revision)
        });
    if done {
        last.rolled_out = Some(Time(Timestamp::now()));
    }
    Ok(!done)
}

/// Reports whether the certificates of the App's TLS domains are issued: `CertificatesReady`,
/// with `CertManagerMissing` when the cluster serves no cert-manager API (the chart renders
/// Certificates only where it does, so the domains would be served without TLS). Returns
/// whether some are still being issued (Certificates are not watched: look again soon).
pub async fn certificates(
    app: &App,
    ctx: &Context,
    conditions: &mut ConditionSet,
    runtime: &mut RuntimeStatus,
) -> Result<bool> {
    runtime.domains = app
        .spec
        .domains
        .iter()
        .map(|d| DomainStatus {
            host: d.host.clone(),
            tls: d.tls,
            certificate_ready: None,
        })
        .collect();
    let hosts: Vec<&str> = app
        .spec
        .domains
        .iter()
        .filter(|d| d.tls)
        .map(|d| d.host.as_str())
        .collect();
    if hosts.is_empty() {
        conditions.set(
            "CertificatesReady",
            true,
            "NoTLSDomains",
            "no domain asks for TLS",
        );
        return Ok(false);
    }
    let namespace = app.namespace().unwrap_or_default();
    let certificates = Api::<kube::api::DynamicObject>::namespaced_with(
        ctx.client.clone(),
        &namespace,
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::core::GroupVersionKind::gvk("cert-manager.io", "v1", "Certificate"),
            "certificates",
        ),
    );
    let mut pending = Vec::new();
    for host in &hosts {
        let name = deploy::tls_secret_name(&app.name_any(), host);
        let certificate = match certificates.get_opt(&name).await {
            Ok(certificate) => certificate,
            Err(kube::Error::Api(status)) if status.code == 404 => {
                conditions.set(
                    "CertificatesReady",
                    false,
                    "CertManagerMissing",
                    format!(
                        "domains {} ask for TLS, but this cluster serves no cert-manager API (cert-manager.io/v1): install cert-manager and a ClusterIssuer, or set tls: false on the domain",
                        hosts.join(", ")
                    ),
                );
                return Ok(false);
            }
            Err(err) => return Err(err.into()),
        };
        let ready = certificate.as_ref().is_some_and(|c| {
            c.data["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        });
        if let Some(domain) = runtime.domains.iter_mut().find(|d| d.host == *host) {
            domain.certificate_ready = Some(ready);
        }
        if !ready {
            pending.push(*host);
        }
    }
    if pending.is_empty() {
        conditions.set(
            "CertificatesReady",
            true,
            "Issued",
            format!("certificates issued for {}", hosts.join(", ")),
        );
        Ok(false)
    } else {
        conditions.set(
            "CertificatesReady",
            false,
            "Issuing",
            format!(
                "waiting for cert-manager to issue certificates for {}",
                pending.join(", ")
            ),
        );
        Ok(true)
    }
}

/// Runs the release command of a release the App makes (config or settings changed) in Job
/// `name`: `None` once it succeeded, else what the release waits for (running, or failed: the
/// running release keeps serving until the settings change again).
async fn release_command(
    ctx: &Context,
    app: &App,
    name: &str,
    values: &serde_json::Value,
) -> Result<Option<String>> {
    use k8s_openapi::api::batch::v1::Job;
    let namespace = app.namespace().unwrap_or_default();
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &namespace);
    let Some(job) = jobs.get_opt(name).await? else {
        // Not a build's step: its log is the App's, not the running build's.
        let job = jobs::app_job(&jobs::AppJob {
            namespace: &namespace,
            name,
            labels: [(APP_LABEL.to_string(), app.name_any())].into(),
            container: jobs::RELEASE_CONTAINER,
            web: &deploy::release_container(values),
            pull_secrets: deploy::pull_secrets_of(values),
            command: deploy::launch(&app.spec, jobs::RELEASE_CONTAINER, &app.spec.release_command),
            owner: &super::owner_reference(app),
            deadline_seconds: jobs::RELEASE_DEADLINE_SECONDS,
            ttl_seconds_after_finished: ctx.config.builds.ttl_seconds_after_finished,
        });
        match jobs.create(&PostParams::default(), &job).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
        return Ok(Some(format!(
            "running the release command (Job {name}) before releasing"
        )));
    };
    match job_state::state(&ctx.client, &job).await? {
        job_state::JobState::Complete(_) => return Ok(None),
        job_state::JobState::Failed { pod, .. } => {
            let said = pod
                .as_ref()
                .and_then(|p| job_state::terminated(p, jobs::RELEASE_CONTAINER))
                .map(|t| job_state::exit_summary(&t))
                .unwrap_or_else(|| "it did not finish".into());
            return Ok(Some(format!(
                "the release command failed ({said}; Job {name}): the running release keeps serving; change the config or settings to try again"
            )));
        }
        job_state::JobState::Running(_) => {}
    }
    Ok(Some(format!(
        "running the release command (Job {name}) before releasing"
    )))
}
