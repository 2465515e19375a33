//! An App's release: the chart values rendered from the App's runtime spec (config vars,
//! processes, domains, cron), the image of the build it runs, its config revision and its
//! bound services. Shared by the AppBuild controller (a new image) and the App controller
//! (config, scale and settings changes on the running image, without a build).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::Value;

use super::backingservice::binding::Resolved;
use super::deploy::{Refused, chart_values, processes};
use super::{APP_LABEL, Context, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, Result};
use crate::api::{App, AppBuild};

/// Label on an App's config Secret (for the App controller's watch).
pub const CONFIG_SECRET_LABEL: &str = "apps.shapeblock.io/config-secret";

/// The App's config Secret: its secret config vars, read by every process as environment.
pub fn config_secret_name(app: &str) -> String {
    format!("{app}-config")
}

/// The owner reference of everything made for an App (its config Secret, its release Jobs).
pub(crate) fn owner_reference(app: &App) -> OwnerReference {
    app.controller_owner_ref(&())
        .expect("an App read from the apiserver has a name and uid")
}

/// The App's config Secret as the agent creates it: empty (its values are the user's, set by
/// the hub's set-config command or by hand), owned by the App.
pub fn config_secret(app: &App) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(config_secret_name(&app.name_any())),
            namespace: app.namespace(),
            labels: Some(
                [
                    (CONFIG_SECRET_LABEL.to_string(), "true".to_string()),
                    (APP_LABEL.to_string(), app.name_any()),
                    (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                ]
                .into(),
            ),
            owner_references: Some(vec![owner_reference(app)]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        ..Default::default()
    }
}

/// What runs: the build and its image (with the build's own `helmValues`).
pub struct Running<'a> {
    pub build: &'a str,
    pub image: &'a str,
    pub user_values: Option<&'a Value>,
    /// The process types the build found.
    pub processes: BTreeMap<String, String>,
}

impl<'a> Running<'a> {
    /// Build `name` running `image`, with what its AppBuild object says (if it still exists).
    pub fn of(name: &'a str, image: &'a str, build: Option<&'a AppBuild>) -> Self {
        Self {
            build: name,
            image,
            user_values: build.and_then(|b| b.spec.helm_values.as_ref()),
            processes: build
                .and_then(|b| b.status.as_ref())
                .map(|s| s.process_types.clone())
                .unwrap_or_default(),
        }
    }
}

/// Live replica counts of the App's autoscaled processes (from their Deployments).
pub async fn live_replicas(
    ctx: &Context,
    app: &App,
    build_processes: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, i32>> {
    let namespace = app.namespace().unwrap_or_default();
    let deployments = Api::<Deployment>::namespaced(ctx.client.clone(), &namespace);
    let mut live = BTreeMap::new();
    for (name, process) in processes(&app.spec, build_processes) {
        if process.autoscaling.is_none() {
            continue;
        }
        let deployment = super::deploy::deployment_name(&app.name_any(), &name);
        if let Some(replicas) = deployments
            .get_opt(&deployment)
            .await?
            .and_then(|d| d.spec)
            .and_then(|s| s.replicas)
        {
            live.insert(name, replicas);
        }
    }
    Ok(live)
}

/// The App's chart values for `running`, with its bound services; `Err(Refused)` when the
/// build's `helmValues` are refused.
pub async fn render(
    ctx: &Context,
    app: &App,
    running: &Running<'_>,
) -> Result<std::result::Result<(Value, Resolved), Refused>> {
    let project = app.namespace().unwrap_or_default();
    let live = live_replicas(ctx, app, &running.processes).await?;
    let status = app.status.clone().unwrap_or_default();
    let pull_secrets = super::registry::pull_secrets_checked(
        &ctx.client,
        app,
        &ctx.config.registry,
        ctx.config.registry_secret.as_deref(),
    )
    .await?;
    let release = super::deploy::Release {
        project: &project,
        app: &app.name_any(),
        build: running.build,
        image: running.image,
        runtime: &app.spec,
        config_secret: status.config_secret_name.as_deref(),
        config_revision: status.config_revision.unwrap_or(0),
        live_replicas: &live,
        default_issuer: &ctx.config.builds.certificate_issuer,
        build_processes: &running.processes,
        pull_secrets: &pull_secrets,
    };
    let mut values = match chart_values(&release, running.user_values) {
        Ok(values) => values,
        Err(refused) => return Ok(Err(refused)),
    };
    let (resolved, _) =
        super::backingservice::binding::bind(ctx, &project, &app.spec.services, &mut values).await?;
    Ok(Ok((values, resolved)))
}

/// The values of the App's HelmChart as deployed now, if there is one.
pub async fn deployed_values(ctx: &Context, app: &App) -> Result<Option<Value>> {
    let chart = super::deploy::chart_name(&app.namespace().unwrap_or_default(), &app.name_any());
    let chart = match charts(ctx).get_opt(&chart).await {
        Ok(chart) => chart,
        // No HelmChart kind: nothing is deployed.
        Err(kube::Error::Api(status)) if status.code == 404 => None,
        Err(err) => return Err(err.into()),
    };
    Ok(chart
        .as_ref()
        .and_then(|c| c.data["spec"]["valuesContent"].as_str())
        .and_then(|text| serde_json::from_str(text).ok()))
}

/// Applies the App's HelmChart with `values`: the helm-controller upgrades the release.
pub async fn apply(ctx: &Context, app: &App, build: &str, values: &Value) -> Result<()> {
    let mut chart = super::deploy::helm_chart_object(
        &ctx.config.agent_namespace,
        &app.namespace().unwrap_or_default(),
        &app.name_any(),
        build,
        values,
    );
    let charts = charts(ctx);
    // Deploys look again every few seconds until rolled out: the same release again is a
    // metadata read, not a patch carrying the whole chart.
    let applied = charts.get_metadata_opt(&chart.name_any()).await?;
    // A release being uninstalled (its App or Project is going) is not installed again: the
    // helm-controller would run the install and the uninstall Jobs in turn.
    if applied
        .as_ref()
        .is_some_and(|a| a.metadata.deletion_timestamp.is_some())
    {
        return Err(super::Error::Waiting(format!(
            "HelmChart {} is being uninstalled",
            chart.name_any()
        )));
    }
    let same = applied.is_some_and(|applied| {
        let annotations = applied.annotations();
        [super::deploy::BUILD_ANNOTATION, super::deploy::CONTENT_ANNOTATION]
            .iter()
            .all(|key| annotations.get(*key) == chart.annotations().get(*key))
    });
    if !same {
        ctx.fit_helm_chart(&mut chart).await;
        super::install_access::grant(ctx, &chart.name_any(), &app.namespace().unwrap_or_default()).await?;
        charts
            .patch(
                &chart.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&chart),
            )
            .await?;
    }
    Ok(())
}

fn charts(ctx: &Context) -> Api<DynamicObject> {
    Api::namespaced_with(
        ctx.client.clone(),
        &ctx.config.agent_namespace,
        &super::deploy::helm_chart_resource(),
    )
}

/// A fingerprint of what the App itself contributes to a release (not the image): a change
/// means the App controller must release the running image again.
pub fn runtime_fingerprint(app: &App, bound: &[String]) -> String {
    let spec = &app.spec;
    let inputs = serde_json::json!({
        "config": spec.config,
        "revision": app.status.as_ref().and_then(|s| s.config_revision),
        "secret": app.status.as_ref().and_then(|s| s.config_secret_name.clone()),
        "processes": spec.processes,
        "domains": spec.domains,
        "cron": spec.cron,
        "deploy": spec.deploy,
        "bound": bound,
    });
    short_hash(inputs.to_string().as_bytes())
}

/// The config revision's fingerprint: the plain vars and the config Secret's identity and
/// version. Never its values: the fingerprint is in status for anyone to read.
pub fn config_fingerprint(
    config: &BTreeMap<String, String>,
    secret_uid: &str,
    secret_version: &str,
) -> String {
    let inputs = serde_json::json!({"config": config, "uid": secret_uid, "version": secret_version});
    short_hash(inputs.to_string().as_bytes())
}

fn short_hash(bytes: &[u8]) -> String {
    super::deploy::sha256_hex_prefix(bytes, 8)
}

/// Whether two renders differ only in replica counts and autoscalers (a scale, not a change
/// of what runs).
pub fn only_scale_differs(before: &Value, after: &Value) -> bool {
    fn strip(values: &Value) -> Value {
        let mut values = values.clone();
        if let Some(map) = values.as_object_mut() {
            map.remove("hpas");
        }
        if let Some(deployments) = values.get_mut("deployments").and_then(Value::as_object_mut) {
            for deployment in deployments.values_mut() {
                if let Some(d) = deployment.as_object_mut() {
                    d.remove("replicas");
                }
            }
        }
        values
    }
    before != after && strip(before) == strip(after)
}

/// Whether two renders differ only in the bound services' variables (the `valueFrom` entries:
/// users' variables are plain values).
pub fn only_bindings_differ(before: &Value, after: &Value) -> bool {
    fn strip(values: &Value) -> Value {
        let mut values = values.clone();
        if let Some(deployments) = values.get_mut("deployments").and_then(Value::as_object_mut) {
            for deployment in deployments.values_mut() {
                for container in deployment["containers"].as_array_mut().into_iter().flatten() {
                    if let Some(env) = container.get_mut("env").and_then(Value::as_array_mut) {
                        env.retain(|e| e.get("valueFrom").is_none());
                        if env.is_empty() {
                            container.as_object_mut().map(|c| c.remove("env"));
                        }
                    }
                }
            }
        }
        values
    }
    before != after && strip(before) == strip(after)
}
