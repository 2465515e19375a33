//! App controller: checks the source, provides clone credentials (a generated SSH deploy key
//! for private repositories that name none), and reports both in status. The source checks
//! live in `source`, the credentials in `credentials`, the runtime (config, processes,
//! domains) in `runtime`.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::release::owner_reference;
use super::{APP_LABEL, ConditionSet, Context, Error, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, Result};
use crate::api::{App, AppPhase, AppStatus, BackingService};
use runtime::{self as app_runtime, RuntimeStatus};

mod credentials;
pub mod git_host;
mod runtime;
mod source;

use credentials::{Credentials, ensure_credentials};
pub use credentials::{DeployKey, check_credentials_secret, deploy_key_name, generate_deploy_key};
pub use source::{
    CloneSource, GitEndpoint, clone_source, git_endpoint, is_ssh_url, validate_branch, validate_git_url,
    validate_source,
};

const KIND: &str = "App";
/// Finalizer that removes an App's release (its HelmChart) when the App is deleted.
pub const FINALIZER: &str = "apps.shapeblock.io/release";
/// Annotation on an App: set it to a new value to replace the generated deploy key.
pub const REGENERATE_KEY_ANNOTATION: &str = "apps.shapeblock.io/regenerate-deploy-key";
/// Annotation on the deploy-key Secret: the regenerate value it was made for.
const GENERATED_FOR_ANNOTATION: &str = "apps.shapeblock.io/generated-for";
/// Label on generated deploy keys, for the metadata-only watch.
pub const DEPLOY_KEY_LABEL: &str = "apps.shapeblock.io/deploy-key";
/// Label a Secret must carry (value [`GIT_CREDENTIAL`]) before an App may name it as
/// `git.secretName`. Developers may name Secrets but not write them: only someone who may write
/// Secrets (a project admin) can say a Secret is meant for clones.
pub const CREDENTIAL_LABEL: &str = "apps.shapeblock.io/credential";
pub const GIT_CREDENTIAL: &str = "git";
/// Annotation on a git credentials Secret: the git hosts (comma-separated) it was made for. A
/// token for github.com is never handed to another host, whatever URL an App names.
pub const GIT_HOSTS_ANNOTATION: &str = "apps.shapeblock.io/git-hosts";
/// Secret types of git credentials, by URL kind.
pub const BASIC_AUTH_TYPE: &str = "kubernetes.io/basic-auth";
pub const SSH_AUTH_TYPE: &str = "kubernetes.io/ssh-auth";
/// Key of the SSH private key in `kubernetes.io/ssh-auth` Secrets.
pub const SSH_PRIVATE_KEY: &str = "ssh-privatekey";
const PUBLIC_KEY: &str = "ssh-publickey";
/// Key of the SSH host keys, in deploy-key Secrets and in the agent's ConfigMap.
pub const KNOWN_HOSTS: &str = "known_hosts";
pub use crate::names::KNOWN_HOSTS_CONFIGMAP;

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
    let controller = super::controller(apps, watcher::Config::default(), &ctx)
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
    let chart = super::deploy::chart_name(&project, &app.name_any());
    let charts = Api::<kube::api::DynamicObject>::namespaced_with(
        ctx.client.clone(),
        &ctx.config.agent_namespace,
        &super::deploy::helm_chart_resource(),
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
            let newly = condition_reason(app, "CredentialsReady") != Some(reason)
                || condition_message(app, "CredentialsReady") != Some(message.as_str());
            conditions.set("CredentialsReady", false, reason, &message);
            conditions.set("Ready", false, reason, &message);
            // Builds clone with the Secret in status: a refused one must not stay there.
            write_status(
                ctx,
                app,
                AppPhase::Failed,
                &message,
                Some(Credentials::none()),
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

fn condition_message<'a>(app: &'a App, type_: &str) -> Option<&'a str> {
    condition(app, type_).map(|c| c.message.as_str())
}

fn condition<'a>(
    app: &'a App,
    type_: &str,
) -> Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition> {
    app.status.as_ref()?.conditions.iter().find(|c| c.type_ == type_)
}

fn observed_generation(app: &App) -> Option<i64> {
    app.status.as_ref().and_then(|s| s.observed_generation)
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
    let written = Api::<App>::namespaced(ctx.client.clone(), &app.namespace().unwrap_or_default())
        .patch_status(
            &app.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
    // The status is the last thing a reconcile writes: its watch event would find nothing to do.
    ctx.expect_echo(&written);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::credentials::{desired_deploy_key, is_own_deploy_key};
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
    fn other_spellings_of_forbidden_hosts_are_refused_in_every_url_form() {
        for url in [
            "https://2130706433/x.git",
            "https://0x7f.1/x.git",
            "https://0177.0.0.1/x.git",
            "https://127.1:8443/x.git",
            "https://localhost./x.git",
            "https://metadata.google.internal./x.git",
            "https://METADATA/x.git",
            "https://0/x.git",
            "https://100.100.100.200/latest/meta-data",
            "https://[::ffff:127.0.0.1]/x.git",
            "https://[fe80::1%25eth0]/x.git",
            "https://[fd00:ec2::254]/latest",
            "ssh://git@0x7f000001:22/x.git",
            "ssh://git@[::1]:2222/x.git",
            "git@instance-data:x.git",
            "git@169.254.43518:x.git",
            "git@app.localhost:x.git",
        ] {
            let err = validate_git_url(url).unwrap_err();
            assert!(err.starts_with(&format!("git.url {url:?} is refused: ")), "{err}");
        }
        assert!(validate_git_url("https://github.com:0/x.git").is_err(), "port 0");
        assert!(
            validate_git_url("https://github.com:99999/x.git").is_err(),
            "port"
        );
    }

    #[test]
    fn endpoints_name_host_and_port() {
        let endpoint = git_endpoint("ssh://git@GitHub.com.:2222/x.git").unwrap();
        assert_eq!(
            (endpoint.host.canonical().as_str(), endpoint.port, endpoint.ssh),
            ("github.com", 2222, true)
        );
        let endpoint = git_endpoint("git@github.com:x.git").unwrap();
        assert_eq!((endpoint.port, endpoint.ssh), (22, true));
        let endpoint = git_endpoint("https://[2001:db8::1]/x.git").unwrap();
        assert_eq!(
            (endpoint.host.canonical().as_str(), endpoint.port, endpoint.ssh),
            ("2001:db8::1", 443, false)
        );
    }

    fn secret(type_: &str, labels: &[(&str, &str)], hosts: Option<&str>, keys: &[&str]) -> Secret {
        let mut secret = Secret {
            type_: Some(type_.into()),
            data: Some(
                keys.iter()
                    .map(|k| (k.to_string(), ByteString(b"x".to_vec())))
                    .collect(),
            ),
            ..Default::default()
        };
        secret.metadata.name = Some("git-token".into());
        secret.metadata.labels = Some(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        if let Some(hosts) = hosts {
            secret.metadata.annotations = Some(BTreeMap::from([(
                GIT_HOSTS_ANNOTATION.to_string(),
                hosts.to_string(),
            )]));
        }
        secret
    }

    fn refusal(result: Result<()>) -> (String, String) {
        match result {
            Err(Error::InvalidSpec { reason, message }) => (reason.to_string(), message),
            other => panic!("not refused: {other:?}"),
        }
    }

    const HTTPS: &str = "https://github.com/example/app.git";
    const MARK: (&str, &str) = (CREDENTIAL_LABEL, GIT_CREDENTIAL);

    #[test]
    fn a_marked_credentials_secret_for_the_urls_host_is_accepted() {
        let token = secret(
            BASIC_AUTH_TYPE,
            &[MARK],
            Some("github.com"),
            &["username", "password"],
        );
        check_credentials_secret(&token, HTTPS).unwrap();
        // Hosts compare as resolvers read them; lists may name several.
        let listed = secret(
            BASIC_AUTH_TYPE,
            &[MARK],
            Some("gitlab.example.com, GitHub.com."),
            &["username", "password"],
        );
        check_credentials_secret(&listed, "https://github.com:443/example/app.git").unwrap();
        let key = secret(
            SSH_AUTH_TYPE,
            &[MARK],
            Some("github.com"),
            &[SSH_PRIVATE_KEY, KNOWN_HOSTS],
        );
        check_credentials_secret(&key, "git@github.com:example/app.git").unwrap();
    }

    #[test]
    fn an_unmarked_or_misbound_secret_is_refused_saying_what_it_lacks() {
        let keys = &["username", "password"];
        // Any Secret of the namespace, as a developer would name it: every mark is missing.
        let (reason, message) = refusal(check_credentials_secret(
            &secret("Opaque", &[], None, keys),
            HTTPS,
        ));
        assert_eq!(reason, "CredentialsNotAllowed");
        for lacks in [
            "the label apps.shapeblock.io/credential=git",
            "type kubernetes.io/basic-auth for an https URL (it is Opaque)",
            "the annotation apps.shapeblock.io/git-hosts naming the git host(s) it is for (github.com)",
        ] {
            assert!(message.contains(lacks), "{message}");
        }
        // Made for another host: a token for gitlab is not handed to github (or an attacker's).
        let (reason, message) = refusal(check_credentials_secret(
            &secret(BASIC_AUTH_TYPE, &[MARK], Some("gitlab.example.com"), keys),
            HTTPS,
        ));
        assert_eq!(reason, "CredentialsNotForHost");
        assert!(
            message.contains(
                "github.com in its annotation apps.shapeblock.io/git-hosts (it is for \"gitlab.example.com\")"
            ),
            "{message}"
        );
        assert!(
            !message.contains("the label apps"),
            "only what is missing: {message}"
        );
        // The label's value matters, and so does a type that fits the URL.
        let (reason, _) = refusal(check_credentials_secret(
            &secret(
                BASIC_AUTH_TYPE,
                &[(CREDENTIAL_LABEL, "registry")],
                Some("github.com"),
                keys,
            ),
            HTTPS,
        ));
        assert_eq!(reason, "CredentialsNotAllowed");
        let (_, message) = refusal(check_credentials_secret(
            &secret(
                BASIC_AUTH_TYPE,
                &[MARK],
                Some("github.com"),
                &[SSH_PRIVATE_KEY, KNOWN_HOSTS],
            ),
            "git@github.com:example/app.git",
        ));
        assert!(
            message.contains("type kubernetes.io/ssh-auth for an SSH URL"),
            "{message}"
        );
        // Marked, but without what the clone needs.
        let (reason, _) = refusal(check_credentials_secret(
            &secret(BASIC_AUTH_TYPE, &[MARK], Some("github.com"), &["username"]),
            HTTPS,
        ));
        assert_eq!(reason, "InvalidCredentials");
        let (reason, _) = refusal(check_credentials_secret(
            &secret(SSH_AUTH_TYPE, &[MARK], Some("github.com"), &[SSH_PRIVATE_KEY]),
            "git@github.com:example/app.git",
        ));
        assert_eq!(reason, "KnownHostsMissing");
    }

    #[test]
    fn only_the_apps_own_generated_key_is_its_deploy_key() {
        let mut app = App::new(
            "api",
            serde_json::from_value(serde_json::json!({"registry": {"url": "r.example.com"}})).unwrap(),
        );
        app.metadata.namespace = Some("shop".into());
        app.metadata.uid = Some("uid-1".into());
        let key = generate_deploy_key("c").unwrap();
        let mine = desired_deploy_key(&app, "api-deploy-key", &key, None, "", &owner_reference(&app));
        assert!(is_own_deploy_key(&mine, &app));
        let mut earlier = app.clone();
        earlier.metadata.uid = Some("uid-0".into());
        assert!(!is_own_deploy_key(&mine, &earlier), "an earlier App's key");
        let mut unlabelled = mine.clone();
        unlabelled.metadata.labels = None;
        assert!(!is_own_deploy_key(&unlabelled, &app));
        let stranger = secret(SSH_AUTH_TYPE, &[], None, &[SSH_PRIVATE_KEY]);
        assert!(!is_own_deploy_key(&stranger, &app));
    }

    fn app_with_status(
        url: &str,
        generation: i64,
        observed: Option<i64>,
        conditions: &[(&str, bool, &str)],
    ) -> App {
        let mut app = App::new(
            "api",
            serde_json::from_value(serde_json::json!({
                "git": {"url": url, "secretName": "git-token"},
                "registry": {"url": "r.example.com"}
            }))
            .unwrap(),
        );
        app.metadata.generation = Some(generation);
        let mut set = ConditionSet::new(&[], observed);
        for (type_, status, reason) in conditions {
            set.set(type_, *status, reason, format!("{type_} says {reason}"));
        }
        app.status = Some(AppStatus {
            observed_generation: observed,
            git_secret_name: Some("git-token".into()),
            conditions: set.conditions,
            ..Default::default()
        });
        app
    }

    #[test]
    fn builds_clone_only_with_credentials_checked_for_the_current_spec() {
        let ready = app_with_status(HTTPS, 2, Some(2), &[("CredentialsReady", true, "Ready")]);
        assert_eq!(clone_source(&ready), CloneSource::Ready(Some("git-token".into())));
        // The spec changed (say, to another URL) since the Secret was checked.
        let stale = app_with_status(HTTPS, 3, Some(2), &[("CredentialsReady", true, "Ready")]);
        assert_eq!(clone_source(&stale), CloneSource::Unchecked);
        let fresh = app_with_status(HTTPS, 1, None, &[]);
        assert_eq!(clone_source(&fresh), CloneSource::Unchecked);
        let refused = app_with_status(
            HTTPS,
            2,
            Some(2),
            &[("CredentialsReady", false, "CredentialsNotAllowed")],
        );
        assert_eq!(
            clone_source(&refused),
            CloneSource::Refused {
                reason: "CredentialsNotAllowed".into(),
                message: "App api: CredentialsReady says CredentialsNotAllowed".into()
            }
        );
        // A refused URL needs no status to be refused.
        let metadata = app_with_status(
            "https://0x7f.1/x.git",
            2,
            Some(2),
            &[("CredentialsReady", true, "Ready")],
        );
        assert!(
            matches!(clone_source(&metadata), CloneSource::Refused { reason, .. } if reason == "InvalidSpec")
        );
        // SSH sources also need the server's host keys; HostKeysKnown of an earlier SSH URL
        // does not hold back an https one.
        let conditions = [
            ("CredentialsReady", true, "Ready"),
            ("HostKeysKnown", false, "KnownHostsMissing"),
        ];
        let blind = app_with_status("git@github.com:example/app.git", 2, Some(2), &conditions);
        assert!(
            matches!(clone_source(&blind), CloneSource::Refused { reason, .. } if reason == "KnownHostsMissing")
        );
        let https_now = app_with_status(HTTPS, 2, Some(2), &conditions);
        assert_eq!(
            clone_source(&https_now),
            CloneSource::Ready(Some("git-token".into()))
        );
    }

    mod spellings {
        //! Every spelling of a forbidden address is refused; ordinary hosts pass.
        use super::super::validate_git_url;
        use proptest::prelude::*;
        use std::net::Ipv4Addr;

        /// Forbidden IPv4 addresses: loopback, 0/8, link-local, and the single metadata ones.
        fn forbidden_v4() -> impl Strategy<Value = Ipv4Addr> {
            prop_oneof![
                any::<[u8; 3]>().prop_map(|[a, b, c]| Ipv4Addr::new(127, a, b, c)),
                any::<[u8; 3]>().prop_map(|[a, b, c]| Ipv4Addr::new(0, a, b, c)),
                any::<[u8; 2]>().prop_map(|[a, b]| Ipv4Addr::new(169, 254, a, b)),
                Just(Ipv4Addr::new(169, 254, 169, 254)),
                Just(Ipv4Addr::new(100, 100, 100, 200)),
                Just(Ipv4Addr::BROADCAST),
            ]
        }

        /// One number as `inet_aton` reads it: decimal, octal with leading zeros, or hex with
        /// either case of prefix and digits and leading zeros.
        fn spell(value: u32, style: u8, zeros: usize, upper: bool) -> String {
            let zeros = "0".repeat(zeros);
            match style % 3 {
                0 => value.to_string(),
                1 => format!("0{zeros}{value:o}"),
                _ => {
                    let digits = if upper {
                        format!("{value:X}")
                    } else {
                        format!("{value:x}")
                    };
                    format!("{}{zeros}{digits}", if upper { "0X" } else { "0x" })
                }
            }
        }

        fn v4_spelling() -> impl Strategy<Value = (Ipv4Addr, String)> {
            (
                forbidden_v4(),
                1usize..=4,
                proptest::collection::vec((any::<u8>(), 0usize..3, any::<bool>()), 4),
                0usize..3,
            )
                .prop_map(|(address, parts, styles, dots)| {
                    let bytes = address.octets();
                    let mut spelled: Vec<String> = bytes[..parts - 1]
                        .iter()
                        .zip(&styles)
                        .map(|(b, (style, zeros, upper))| spell(u32::from(*b), *style, *zeros, *upper))
                        .collect();
                    let last = bytes[parts - 1..]
                        .iter()
                        .fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
                    let (style, zeros, upper) = styles[3];
                    spelled.push(spell(last, style, zeros, upper));
                    (address, format!("{}{}", spelled.join("."), ".".repeat(dots)))
                })
        }

        fn v6_spelling() -> impl Strategy<Value = String> {
            let mapped = (forbidden_v4(), any::<bool>(), any::<bool>()).prop_map(|(v4, dotted, upper)| {
                let [a, b, c, d] = v4.octets();
                let text = if dotted {
                    format!("::ffff:{v4}")
                } else {
                    format!(
                        "0:0:0:0:0:ffff:{:x}:{:x}",
                        u16::from_be_bytes([a, b]),
                        u16::from_be_bytes([c, d])
                    )
                };
                if upper { text.to_uppercase() } else { text }
            });
            let loopback = prop_oneof![
                Just("::1".to_string()),
                Just("0:0:0:0:0:0:0:1".to_string()),
                Just("0000::0001".to_string()),
                Just("::".to_string())
            ];
            let link_local = (0xfe80u16..=0xfebf, any::<[u16; 4]>(), any::<bool>()).prop_map(
                |(head, [a, b, c, d], zone)| {
                    format!(
                        "{head:x}::{a:x}:{b:x}:{c:x}:{d:x}{}",
                        if zone { "%25eth0" } else { "" }
                    )
                },
            );
            prop_oneof![mapped, loopback, link_local, Just("fd00:ec2::254".to_string())]
                .prop_map(|address| format!("[{address}]"))
        }

        fn names() -> impl Strategy<Value = String> {
            let forbidden = prop_oneof![
                Just("localhost".to_string()),
                Just("metadata".to_string()),
                Just("metadata.google.internal".to_string()),
                Just("metadata.goog".to_string()),
                Just("instance-data".to_string()),
                "[a-z][a-z0-9-]{0,10}".prop_map(|label| format!("{label}.localhost")),
            ];
            (forbidden, any::<u64>(), 0usize..3).prop_map(|(name, case, dots)| {
                let cased: String = name
                    .chars()
                    .enumerate()
                    .map(|(i, c)| {
                        if case >> (i % 64) & 1 == 1 {
                            c.to_ascii_uppercase()
                        } else {
                            c
                        }
                    })
                    .collect();
                format!("{cased}{}", ".".repeat(dots))
            })
        }

        /// The same host in each URL form the agent accepts.
        fn urls(host: &str, which: u8, port: Option<u16>) -> String {
            let port = port.map(|p| format!(":{}", p.max(1))).unwrap_or_default();
            match which % 3 {
                0 => format!("https://{host}{port}/org/repo.git"),
                1 => format!("ssh://git@{host}{port}/org/repo.git"),
                _ => format!("git@{host}:org/repo.git"),
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

            #[test]
            fn every_spelling_of_a_forbidden_v4_address_is_refused(
                (address, host) in v4_spelling(), which in any::<u8>(), port in proptest::option::of(any::<u16>())
            ) {
                // The spelling is one the C library reads as that address.
                prop_assert_eq!(crate::controllers::app::git_host::inet_aton(host.trim_end_matches('.')), Some(address));
                let url = urls(&host, which, port);
                prop_assert!(validate_git_url(&url).is_err(), "{} passed", url);
            }

            #[test]
            fn every_spelling_of_a_forbidden_v6_address_is_refused(
                host in v6_spelling(), which in 0u8..2, port in proptest::option::of(any::<u16>())
            ) {
                // Bracketed addresses work in https:// and ssh:// URLs.
                let url = urls(&host, which, port);
                prop_assert!(validate_git_url(&url).is_err(), "{} passed", url);
            }

            #[test]
            fn forbidden_names_in_any_case_and_with_trailing_dots_are_refused(
                host in names(), which in any::<u8>(), port in proptest::option::of(any::<u16>())
            ) {
                let url = urls(&host, which, port);
                prop_assert!(validate_git_url(&url).is_err(), "{} passed", url);
            }

            #[test]
            fn ordinary_hostnames_and_private_addresses_pass(
                labels in proptest::collection::vec("[a-z][a-z0-9-]{0,14}[a-z0-9]", 1..4),
                tld in "(com|org|io|dev|net|example|internal)",
                private in (any::<[u8; 3]>(), 0u8..3),
                which in any::<u8>(), port in proptest::option::of(any::<u16>())
            ) {
                let name = format!("{}.{tld}", labels.join("."));
                prop_assume!(!name.ends_with(".localhost") && !name.starts_with("metadata.goog") && name != "instance-data.ec2.internal" && name != "metadata.google.internal");
                prop_assert!(validate_git_url(&urls(&name, which, port)).is_ok(), "{}", name);
                let ([a, b, c], range) = private;
                let address = match range {
                    0 => Ipv4Addr::new(10, a, b, c),
                    1 => Ipv4Addr::new(172, 16 | (a & 15), b, c),
                    _ => Ipv4Addr::new(192, 168, b, c),
                };
                prop_assert!(validate_git_url(&urls(&address.to_string(), which, port)).is_ok(), "{}", address);
            }

            #[test]
            fn public_addresses_pass(address in any::<u32>().prop_map(Ipv4Addr::from), which in any::<u8>()) {
                let [a, b, ..] = address.octets();
                let forbidden = a == 127 || a == 0 || (a, b) == (169, 254)
                    || [Ipv4Addr::new(100, 100, 100, 200), Ipv4Addr::new(168, 63, 129, 16), Ipv4Addr::BROADCAST].contains(&address);
                prop_assert_eq!(validate_git_url(&urls(&address.to_string(), which, None)).is_ok(), !forbidden, "{}", address);
            }
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
