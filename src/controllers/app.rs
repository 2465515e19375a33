//! App controller: checks the source, provides clone credentials (a generated SSH deploy key
//! for private repositories that name none), and reports both in status.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::app_runtime::{self, RuntimeStatus};
use super::{APP_LABEL, ConditionSet, Context, Error, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, Result};
use crate::api::{App, AppPhase, AppStatus, BackingService, GitSource};

const KIND: &str = "App";
/// Finalizer that removes an App's release (its HelmChart) when the App is deleted.
pub const FINALIZER: &str = "apps.shapeblock.io/release";
/// Annotation on an App: set it to a new value to replace the generated deploy key.
pub const REGENERATE_KEY_ANNOTATION: &str = "apps.shapeblock.io/regenerate-deploy-key";
/// Annotation on the deploy-key Secret: the regenerate value it was made for.
const GENERATED_FOR_ANNOTATION: &str = "apps.shapeblock.io/generated-for";
/// Label on generated deploy keys, for the metadata-only watch.
pub const DEPLOY_KEY_LABEL: &str = "apps.shapeblock.io/deploy-key";
const PRIVATE_KEY: &str = "ssh-privatekey";
const PUBLIC_KEY: &str = "ssh-publickey";
/// Key of the SSH host keys, in deploy-key Secrets and in the agent's ConfigMap.
pub const KNOWN_HOSTS: &str = "known_hosts";
/// ConfigMap in the agent's namespace whose `known_hosts` lists the SSH host keys of the git
/// servers: SSH clones check the server against it (never trust on first use). A fixed name,
/// so the agent's Role can grant it and nothing else.
pub const KNOWN_HOSTS_CONFIGMAP: &str = "shapeblock-known-hosts";

/// Runs the App controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let apps = Api::<DeserializeGuard<App>>::all(ctx.client.clone());
    let keys = watcher(
        Api::<PartialObjectMeta<Secret>>::all(ctx.client.clone()),
        watcher::Config::default().labels(DEPLOY_KEY_LABEL),
    )
    .touched_objects();
    // A changed config Secret is a new config revision, released to the running image.
    let configs = watcher(
        Api::<PartialObjectMeta<Secret>>::all(ctx.client.clone()),
        watcher::Config::default().labels(super::release::CONFIG_SECRET_LABEL),
    )
    .touched_objects();
    // A BackingService appearing or going changes what the Apps listing it can bind.
    let services = watcher(
        Api::<PartialObjectMeta<BackingService>>::all(ctx.client.clone()),
        watcher::Config::default(),
    )
    .touched_objects();
    let controller = Controller::new(apps, watcher::Config::default())
        .owns_stream(keys)
        .owns_stream(configs);
    let store = controller.store();
    let by_service = store.clone();
    let controller =
        controller.watches_stream(services, move |service: PartialObjectMeta<BackingService>| {
            let namespace = service.namespace();
            let name = service.name_any();
            by_service
                .state()
                .iter()
                .filter(|guard| guard.namespace() == namespace)
                .filter(|guard| matches!(&guard.0, Ok(app) if app.spec.services.contains(&name)))
                .map(|guard| ObjectRef::from_obj(guard.as_ref()))
                .collect::<Vec<_>>()
        });
    super::mark_synced_when_ready(ctx.clone(), store.clone());
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(super::log_reconcile_end)
        .await;
}

async fn reconcile(guard: Arc<DeserializeGuard<App>>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    let key = format!("{}/{}", guard.namespace().unwrap_or_default(), guard.name_any());
    tracing::debug!(kind = KIND, object = %key, "reconciling");
    let app = match &guard.0 {
        Ok(app) => app,
        Err(invalid) => return super::report_undecodable::<App>(&ctx, invalid).await,
    };
    if let Some(action) = super::refuse_outside_projects(&ctx, app).await? {
        return Ok(action);
    }
    let api = Api::<App>::namespaced(ctx.client.clone(), &app.namespace().unwrap_or_default());
    let action = finalizer(&api, FINALIZER, Arc::new(app.clone()), |event| async {
        match event {
            Finalizer::Apply(app) => apply(&app, &ctx).await,
            Finalizer::Cleanup(app) => cleanup(&app, &ctx).await,
        }
    })
    .await
    .map_err(Error::from)?;
    ctx.reset_retries(&key);
    Ok(action)
}

/// An App's release goes with it: its HelmChart (in the agent's namespace, so no owner
/// reference can take it) is deleted, and the helm-controller's own finalizer uninstalls the
/// release. The App does not wait for the uninstall: a broken helm-controller must not leave
/// the App, and with it the project's namespace, stuck.
async fn cleanup(app: &App, ctx: &Context) -> Result<Action> {
    let project = app.namespace().unwrap_or_default();
    let chart = super::appbuild::chart_name(&project, &app.name_any());
    let charts = Api::<kube::api::DynamicObject>::namespaced_with(
        ctx.client.clone(),
        &ctx.config.agent_namespace,
        &super::appbuild::helm_chart_resource(),
    );
    match super::delete_if_present(&charts, &chart, &DeleteParams::background()).await {
        Ok(true) => {
            ctx.publish(
                &app.object_ref(&()),
                EventType::Normal,
                "Uninstalling",
                "Delete",
                &format!(
                    "deleted HelmChart {}/{chart}: the helm-controller uninstalls the release",
                    ctx.config.agent_namespace
                ),
            )
            .await;
        }
        // Gone already, or no HelmChart CRD at all (nothing was ever deployed).
        Ok(false) => {}
        Err(err) => return Err(err),
    }
    Ok(Action::await_change())
}

fn error_policy(guard: Arc<DeserializeGuard<App>>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", guard.namespace().unwrap_or_default(), guard.name_any());
    ctx.error_action(&key, KIND, error)
}

/// The outcome of credential handling, for status.
struct Credentials {
    secret_name: Option<String>,
    public_key: Option<String>,
    /// For SSH sources: whether the clone can check the server's host key.
    host_keys_known: bool,
}

impl Credentials {
    fn none() -> Self {
        Self {
            secret_name: None,
            public_key: None,
            host_keys_known: true,
        }
    }
}

async fn apply(app: &App, ctx: &Context) -> Result<Action> {
    let mut conditions = ConditionSet::new(
        app.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default(),
        app.metadata.generation,
    );
    // First: builds wait for the App's config Secret, whatever else is wrong with the App.
    let mut runtime = RuntimeStatus::of(app);
    app_runtime::ensure_config(app, ctx, &mut runtime).await?;
    if let Err(message) = validate_source(app) {
        conditions.set("SourceValid", false, "InvalidSpec", &message);
        conditions.set("Ready", false, "InvalidSpec", &message);
        let newly = !matches!(condition_reason(app, "SourceValid"), Some("InvalidSpec"))
            || observed_generation(app) != app.metadata.generation;
        write_status(
            ctx,
            app,
            AppPhase::Failed,
            &message,
            None,
            conditions,
            runtime.clone(),
        )
        .await?;
        warn_once(ctx, app, newly, "InvalidSpec", "Validate", &message).await;
        // Nothing to retry until the spec changes; the status write above is what users see.
        return Err(Error::InvalidSpec {
            reason: "InvalidSpec",
            message,
        });
    }
    conditions.set(
        "SourceValid",
        true,
        "Valid",
        "git source, registry and build strategy are valid",
    );

    let credentials = match ensure_credentials(app, ctx).await {
        Ok(credentials) => credentials,
        Err(Error::InvalidSpec { reason, message }) => {
            let newly = condition_reason(app, "CredentialsReady") != Some(reason);
            conditions.set("CredentialsReady", false, reason, &message);
            conditions.set("Ready", false, reason, &message);
            write_status(
                ctx,
                app,
                AppPhase::Failed,
                &message,
                None,
                conditions,
                runtime.clone(),
            )
            .await?;
            warn_once(ctx, app, newly, reason, "Credentials", &message).await;
            // The named Secret may appear later; it is not watched, so look again now and then.
            return Ok(Action::requeue(std::time::Duration::from_secs(60)));
        }
        Err(err) => return Err(err),
    };
    let message = match &credentials.secret_name {
        Some(secret) => format!("clones with the credentials in Secret {secret}"),
        None => "public repository: no clone credentials needed".to_string(),
    };
    conditions.set("CredentialsReady", true, "Ready", &message);
    if !credentials.host_keys_known {
        let message = format!(
            "SSH clones check the git server's host key, and none are known: create ConfigMap {}/{} with key known_hosts (e.g. from `ssh-keyscan HOST`, checked against the host's published fingerprints); the deploy key is in status.sshPublicKey meanwhile",
            ctx.config.agent_namespace, KNOWN_HOSTS_CONFIGMAP
        );
        let newly = condition_reason(app, "HostKeysKnown") != Some("KnownHostsMissing");
        conditions.set("HostKeysKnown", false, "KnownHostsMissing", &message);
        conditions.set("Ready", false, "KnownHostsMissing", &message);
        write_status(
            ctx,
            app,
            AppPhase::Failed,
            &message,
            Some(credentials),
            conditions,
            runtime.clone(),
        )
        .await?;
        warn_once(ctx, app, newly, "KnownHostsMissing", "Credentials", &message).await;
        // The ConfigMap is not watched: look again now and then.
        return Ok(Action::requeue(std::time::Duration::from_secs(60)));
    }
    if app.spec.git.as_ref().is_some_and(|g| is_ssh_url(&g.url)) {
        conditions.set(
            "HostKeysKnown",
            true,
            "Known",
            "the clone checks the git server's host key",
        );
    }
    let bound = bind_services(app, ctx, &mut conditions).await?;
    let waiting = app_runtime::release(app, ctx, &bound, &mut runtime).await?;
    let issuing = app_runtime::certificates(app, ctx, &mut conditions, &mut runtime).await?;
    let rolling = app_runtime::track_rollout(app, ctx, &mut runtime).await?;
    let running = app.status.as_ref().and_then(|s| s.current_image.clone());
    let (phase, mut summary) = match &running {
        Some(image) => (AppPhase::Deployed, format!("running {image}")),
        None => (AppPhase::Ready, "ready to build".to_string()),
    };
    if let Some(version) = runtime.releases.last().map(|r| r.version) {
        summary = format!("{summary} (release v{version})");
    }
    if let Some(waiting) = &waiting {
        summary = format!("{summary}; {waiting}");
    }
    conditions.set("Ready", true, "Reconciled", &summary);
    write_status(ctx, app, phase, &summary, Some(credentials), conditions, runtime).await?;
    if waiting.is_some() || rolling {
        // The build's own status changes and rollouts do not wake the App: look again shortly.
        return Ok(Action::requeue(std::time::Duration::from_secs(5)));
    }
    if issuing {
        return Ok(Action::requeue(std::time::Duration::from_secs(30)));
    }
    Ok(Action::requeue(ctx.config.resync))
}

/// Resolves and reports the App's bindings; returns the bound services. Releasing them into
/// the running image is the runtime's job (`app_runtime::release`), like any settings change.
async fn bind_services(app: &App, ctx: &Context, conditions: &mut ConditionSet) -> Result<Vec<String>> {
    use super::backingservice::binding;
    if app.spec.services.is_empty() && condition_reason(app, "ServicesBound").is_none() {
        return Ok(Vec::new());
    }
    let namespace = app.namespace().unwrap_or_default();
    let catalog = match super::backingservice::load_catalog(ctx).await? {
        Ok(catalog) => catalog,
        Err(_) => super::backingservice::catalog::merged(None).expect("the built-in catalog is valid"),
    };
    let resolved = binding::resolve(&ctx.client, &namespace, &app.spec.services, &catalog).await?;
    let bound: Vec<String> = resolved.bound.iter().map(|b| b.service.clone()).collect();
    if resolved.missing.is_empty() {
        let message = if bound.is_empty() {
            "no services bound".to_string()
        } else {
            format!("bound to {}", bound.join(", "))
        };
        conditions.set("ServicesBound", true, "Bound", message);
    } else {
        conditions.set(
            "ServicesBound",
            false,
            "ServiceNotFound",
            format!(
                "BackingService(s) {} do not exist in namespace {namespace}; they are bound once they do",
                resolved.missing.join(", ")
            ),
        );
    }
    Ok(bound)
}

/// A Warning Event, published only when the condition is new (not on every retry).
async fn warn_once(ctx: &Context, app: &App, newly: bool, reason: &str, action: &str, message: &str) {
    if newly {
        ctx.publish(&app.object_ref(&()), EventType::Warning, reason, action, message)
            .await;
    }
}

fn condition_reason<'a>(app: &'a App, type_: &str) -> Option<&'a str> {
    app.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.as_str())
}

fn observed_generation(app: &App) -> Option<i64> {
    app.status.as_ref().and_then(|s| s.observed_generation)
}

/// Finds or makes the clone credentials.
async fn ensure_credentials(app: &App, ctx: &Context) -> Result<Credentials> {
    let Some(git) = &app.spec.git else {
        return Ok(Credentials::none());
    };
    let namespace = app.namespace().unwrap_or_default();
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &namespace);
    if let Some(name) = &git.secret_name {
        let Some(secret) = secrets.get_opt(name).await? else {
            return Err(Error::InvalidSpec {
                reason: "SecretNotFound",
                message: format!("git.secretName {name} does not exist in namespace {namespace}"),
            });
        };
        check_credentials_secret(&secret, git)?;
        return Ok(Credentials {
            secret_name: Some(name.clone()),
            public_key: None,
            host_keys_known: true,
        });
    }
    if !git.is_private {
        return Ok(Credentials::none());
    }
    let known_hosts = known_hosts(ctx).await?;
    let wanted = app
        .annotations()
        .get(REGENERATE_KEY_ANNOTATION)
        .cloned()
        .unwrap_or_default();
    let name = deploy_key_name(app);
    if let Some(existing) = secrets.get_opt(&name).await? {
        let made_for = existing
            .annotations()
            .get(GENERATED_FOR_ANNOTATION)
            .cloned()
            .unwrap_or_default();
        if made_for == wanted {
            let data = existing.data.clone().unwrap_or_default();
            let public = data
                .get(PUBLIC_KEY)
                .map(|b| String::from_utf8_lossy(&b.0).trim().to_string());
            // Host keys follow the ConfigMap (added, rotated or removed by the admin).
            if data.get(KNOWN_HOSTS).map(|b| b.0.as_slice()) != known_hosts.as_deref().map(str::as_bytes) {
                let value = known_hosts.as_deref().map(|k| ByteString(k.as_bytes().to_vec()));
                secrets
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"data": {KNOWN_HOSTS: value}})),
                    )
                    .await?;
            }
            return Ok(Credentials {
                secret_name: Some(name),
                public_key: public,
                host_keys_known: known_hosts.is_some(),
            });
        }
        let key = generate_deploy_key(&comment(app))?;
        let secret = desired_deploy_key(
            app,
            &name,
            &key,
            known_hosts.as_deref(),
            &wanted,
            &owner_reference(app),
        );
        secrets
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&secret),
            )
            .await?;
        ctx.publish(
            &app.object_ref(&()),
            EventType::Normal,
            "DeployKeyRegenerated",
            "Credentials",
            format!("replaced the SSH deploy key in Secret {name}: add the new public key (status.sshPublicKey) to the repository"),
        )
        .await;
        return Ok(Credentials {
            secret_name: Some(name),
            public_key: Some(key.public),
            host_keys_known: known_hosts.is_some(),
        });
    }
    let key = generate_deploy_key(&comment(app))?;
    let secret = desired_deploy_key(
        app,
        &name,
        &key,
        known_hosts.as_deref(),
        &wanted,
        &owner_reference(app),
    );
    // Create, never overwrite: a concurrent reconcile that won the race keeps its key.
    match secrets
        .create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &secret,
        )
        .await
    {
        Ok(_) => {
            ctx.publish(
                &app.object_ref(&()),
                EventType::Normal,
                "DeployKeyGenerated",
                "Credentials",
                format!("generated an SSH deploy key in Secret {name}: add status.sshPublicKey to the repository as a read-only deploy key"),
            )
            .await;
            Ok(Credentials {
                secret_name: Some(name),
                public_key: Some(key.public),
                host_keys_known: known_hosts.is_some(),
            })
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Err(Error::Waiting(format!(
            "deploy key Secret {name} was created concurrently; reading it again"
        ))),
        Err(err) => Err(err.into()),
    }
}

fn comment(app: &App) -> String {
    format!(
        "shapeblock:{}/{}",
        app.namespace().unwrap_or_default(),
        app.name_any()
    )
}

/// Name of the generated deploy-key Secret (App names are at most 40 characters).
pub fn deploy_key_name(app: &App) -> String {
    format!("{}-deploy-key", app.name_any())
}

pub(crate) fn owner_reference(app: &App) -> OwnerReference {
    app.controller_owner_ref(&())
        .expect("an App read from the apiserver has a name and uid")
}

/// The Secret holding a generated deploy key (`kubernetes.io/ssh-auth`).
/// The SSH `known_hosts` the cluster admin provides, if any.
async fn known_hosts(ctx: &Context) -> Result<Option<String>> {
    let configmaps = Api::<ConfigMap>::namespaced(ctx.client.clone(), &ctx.config.agent_namespace);
    let found = configmaps.get_opt(KNOWN_HOSTS_CONFIGMAP).await?;
    Ok(found
        .and_then(|c| c.data)
        .and_then(|mut d| d.remove(KNOWN_HOSTS))
        .filter(|k| !k.trim().is_empty()))
}

fn desired_deploy_key(
    app: &App,
    name: &str,
    key: &DeployKey,
    known_hosts: Option<&str>,
    made_for: &str,
    owner: &OwnerReference,
) -> Secret {
    let mut data = BTreeMap::from([
        (
            PRIVATE_KEY.to_string(),
            ByteString(key.private.as_bytes().to_vec()),
        ),
        (PUBLIC_KEY.to_string(), ByteString(key.public.as_bytes().to_vec())),
    ]);
    if let Some(known_hosts) = known_hosts {
        data.insert(
            KNOWN_HOSTS.to_string(),
            ByteString(known_hosts.as_bytes().to_vec()),
        );
    }
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: app.namespace(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (APP_LABEL.to_string(), app.name_any()),
                (DEPLOY_KEY_LABEL.to_string(), "true".to_string()),
            ])),
            annotations: Some(BTreeMap::from([(
                GENERATED_FOR_ANNOTATION.to_string(),
                made_for.to_string(),
            )])),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        type_: Some("kubernetes.io/ssh-auth".into()),
        data: Some(data),
        ..Default::default()
    }
}

/// A named credentials Secret must hold an SSH key for SSH URLs, or a username and password
/// (token) for HTTPS URLs.
fn check_credentials_secret(secret: &Secret, git: &GitSource) -> Result<()> {
    let has = |key: &str| secret.data.as_ref().is_some_and(|d| d.contains_key(key));
    let name = secret.name_any();
    if is_ssh_url(&git.url) && has(PRIVATE_KEY) && !has(KNOWN_HOSTS) {
        return Err(Error::InvalidSpec {
            reason: "KnownHostsMissing",
            message: format!(
                "Secret {name} has no known_hosts: SSH clones check the git server's host key and never trust it blindly; add its keys (e.g. from `ssh-keyscan HOST`, checked against the host's published fingerprints) as known_hosts"
            ),
        });
    }
    let ok = if is_ssh_url(&git.url) {
        has(PRIVATE_KEY)
    } else {
        has("username") && has("password")
    };
    if ok {
        Ok(())
    } else if is_ssh_url(&git.url) {
        Err(Error::InvalidSpec {
            reason: "InvalidCredentials",
            message: format!("Secret {name} has no ssh-privatekey, which an SSH git URL needs"),
        })
    } else {
        Err(Error::InvalidSpec {
            reason: "InvalidCredentials",
            message: format!(
                "Secret {name} needs username and password (an access token) for an https git URL"
            ),
        })
    }
}

async fn write_status(
    ctx: &Context,
    app: &App,
    phase: AppPhase,
    message: &str,
    credentials: Option<Credentials>,
    conditions: ConditionSet,
    runtime: RuntimeStatus,
) -> Result<()> {
    let previous = app.status.clone().unwrap_or_default();
    let (git_secret_name, ssh_public_key) = match credentials {
        Some(c) => (c.secret_name, c.public_key),
        None => (previous.git_secret_name.clone(), previous.ssh_public_key.clone()),
    };
    let status = AppStatus {
        phase: Some(phase),
        message: Some(message.to_owned()),
        git_secret_name,
        ssh_public_key,
        observed_generation: app.metadata.generation,
        conditions: conditions.conditions,
        last_updated: Some(Time(Timestamp::now())),
        // latestBuild and the images belong to the build controller (its own field manager):
        // leaving them out of this apply leaves them alone.
        latest_build: None,
        current_image: None,
        previous_image: None,
        current_build: None,
        config_secret_name: runtime.config_secret_name,
        config_revision: runtime.config_revision,
        config_fingerprint: runtime.config_fingerprint,
        runtime_fingerprint: runtime.runtime_fingerprint,
        releases: runtime.releases,
        domains: runtime.domains,
    };
    let comparable = |s: &AppStatus| AppStatus {
        last_updated: None,
        latest_build: None,
        current_image: None,
        previous_image: None,
        current_build: None,
        ..s.clone()
    };
    if comparable(&status) == comparable(&previous) {
        return Ok(());
    }
    let patch = json!({"apiVersion": App::api_version(&()), "kind": KIND, "status": status});
    Api::<App>::namespaced(ctx.client.clone(), &app.namespace().unwrap_or_default())
        .patch_status(
            &app.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    Ok(())
}

/// Checks what the CRD schema checks (it may be older or looser than this agent) and what it
/// cannot: where the git host points, and whether the credentials can work with the URL.
pub fn validate_source(app: &App) -> std::result::Result<(), String> {
    use crate::api::BuildType;
    if let Some(git) = &app.spec.git {
        validate_git_url(&git.url)?;
        validate_branch(&git.branch)?;
        if git.is_private && git.secret_name.is_none() && !is_ssh_url(&git.url) {
            return Err(format!(
                "git.url {} is https and private, but no git.secretName is given: a generated deploy key \
                 works only with SSH URLs (git@host:org/repo.git); use an SSH URL, or name a Secret with \
                 username and password (an access token)",
                git.url
            ));
        }
    } else if app.spec.build.build_type != BuildType::Image {
        return Err("spec.git is required unless spec.build.type is image".into());
    }
    match (app.spec.build.build_type, &app.spec.build.image) {
        (BuildType::Image, None) => return Err("build.image is required when build.type is image".into()),
        (BuildType::Dockerfile | BuildType::Buildpack, Some(_)) => {
            return Err("build.image may only be set when build.type is image".into());
        }
        _ => {}
    }
    Ok(())
}

/// Accepts `https://host[:port]/path`, `ssh://[user@]host[:port]/path` and `user@host:path`;
/// refuses everything git would treat as a local path, a transport helper or an option, and
/// hosts that are loopback, link-local (cloud metadata) or unspecified addresses.
pub fn validate_git_url(url: &str) -> std::result::Result<(), String> {
    let refuse = |why: &str| Err(format!("git.url {url:?} is refused: {why}"));
    if url.starts_with('-') {
        return refuse("it would be read as a command-line option");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return refuse("it contains whitespace or control characters");
    }
    let host = if let Some(rest) = url.strip_prefix("https://") {
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') {
            return refuse("credentials in the URL would be logged and stored; put them in git.secretName");
        }
        if !rest.contains('/') {
            return refuse("it names no repository path");
        }
        authority
    } else if let Some(rest) = url.strip_prefix("ssh://") {
        let authority = rest.split('/').next().unwrap_or_default();
        if !rest.contains('/') {
            return refuse("it names no repository path");
        }
        authority.rsplit('@').next().unwrap_or_default()
    } else if let Some((user_host, path)) = url
        .split_once(':')
        .filter(|(u, _)| u.contains('@') && !u.contains('/'))
    {
        if path.is_empty() || path.starts_with('-') {
            return refuse("it names no repository path");
        }
        user_host.rsplit('@').next().unwrap_or_default()
    } else {
        return refuse(
            "only https:// and SSH URLs are accepted (file://, ext::, http:// and local paths are not)",
        );
    };
    let host = strip_port(host);
    if host.is_empty() || host.starts_with('-') {
        return refuse("it has no host");
    }
    if host.eq_ignore_ascii_case("localhost") {
        return refuse("the host is this node (localhost)");
    }
    if let Ok(ip) = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        let internal = match ip {
            IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local() || v4.is_unspecified(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.is_unspecified() || (v6.segments()[0] & 0xffc0) == 0xfe80
            }
        };
        if internal {
            return refuse("the host is a loopback, link-local (cloud metadata) or unspecified address");
        }
    }
    Ok(())
}

fn strip_port(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split(']')
            .next()
            .map(|h| &authority[..h.len() + 1])
            .unwrap_or(authority);
    }
    authority.split(':').next().unwrap_or(authority)
}

/// Whether a git URL uses SSH.
pub fn is_ssh_url(url: &str) -> bool {
    url.starts_with("ssh://") || (!url.contains("://") && url.contains('@'))
}

/// Branch names git accepts that cannot be read as options.
pub fn validate_branch(branch: &str) -> std::result::Result<(), String> {
    let valid = !branch.is_empty()
        && !branch.starts_with(['-', '.', '/'])
        && !branch.ends_with(['/', '.'])
        && !branch.ends_with(".lock")
        && !branch.contains("..")
        && !branch.contains("//")
        && branch
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!("git.branch {branch:?} is not a valid branch name"))
    }
}

/// A generated Ed25519 key pair in OpenSSH encodings.
pub struct DeployKey {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----…`: stays in the Secret; never logged.
    pub private: String,
    /// `ssh-ed25519 AAAA… comment`: safe to show.
    pub public: String,
}

impl std::fmt::Debug for DeployKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

/// Generates an Ed25519 deploy key from the operating system's random source.
pub fn generate_deploy_key(comment: &str) -> Result<DeployKey> {
    use ring::rand::SecureRandom;
    let mut seed = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| Error::Crypto("the system random source failed".into()))?;
    let keypair = ssh_key::private::Ed25519Keypair::from_seed(&seed);
    let mut private = ssh_key::PrivateKey::from(keypair);
    private.set_comment(comment);
    let public = private
        .public_key()
        .to_openssh()
        .map_err(|e| Error::Crypto(e.to_string()))?;
    let private = private
        .to_openssh(ssh_key::LineEnding::LF)
        .map_err(|e| Error::Crypto(e.to_string()))?;
    Ok(DeployKey {
        private: private.to_string(),
        public,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_git_urls() {
        for url in [
            "https://github.com/example/app.git",
            "https://git.example.com:8443/group/sub/app",
            "ssh://git@github.com/example/app.git",
            "ssh://git@[2001:db8::1]:2222/example/app.git",
            "git@github.com:example/app.git",
            "https://10.0.0.5/internal/app.git",
        ] {
            assert_eq!(validate_git_url(url), Ok(()), "{url}");
        }
    }

    #[test]
    fn refused_git_urls_say_why() {
        for (url, why) in [
            ("file:///etc/passwd", "only https:// and SSH"),
            ("ext::sh -c touch% /tmp/pwned", "whitespace"),
            ("ext::sh", "only https:// and SSH"),
            ("--upload-pack=touch /tmp/x", "option"),
            ("/srv/git/app.git", "only https:// and SSH"),
            ("http://github.com/example/app.git", "only https:// and SSH"),
            (
                "https://user:token@github.com/example/app.git",
                "credentials in the URL",
            ),
            ("https://169.254.169.254/latest/meta-data", "link-local"),
            ("https://127.0.0.1/repo.git", "loopback"),
            ("ssh://git@localhost/repo.git", "localhost"),
            ("ssh://git@[::1]/repo.git", "loopback"),
            ("git@github.com:-oProxyCommand=x", "no repository path"),
            ("https://github.com", "no repository path"),
        ] {
            let err = validate_git_url(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn branches() {
        for ok in ["main", "release/1.2", "feature_x-y"] {
            assert_eq!(validate_branch(ok), Ok(()), "{ok}");
        }
        for bad in ["-x", "a..b", "x.lock", "", "a b", ".hidden", "x/"] {
            assert!(validate_branch(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn deploy_keys_are_ed25519_and_distinct() {
        let a = generate_deploy_key("shapeblock:ns/app").unwrap();
        let b = generate_deploy_key("shapeblock:ns/app").unwrap();
        assert!(a.public.starts_with("ssh-ed25519 AAAA"), "{}", a.public);
        assert!(a.public.ends_with(" shapeblock:ns/app"));
        assert!(a.private.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----"));
        assert_ne!(a.public, b.public);
        assert!(
            !format!("{a:?}").contains("PRIVATE"),
            "Debug never shows the private key"
        );
    }
}
