//! The run-once Job skeleton every Job of the agent uses (build steps, a build's release
//! command, the App's release command on a config change, one-off AppRuns), and the Job that
//! runs one command of the App's own code. Job state is [`super::job_state`]. Imports no
//! controller.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{Container, LocalObjectReference, PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::controllers::{MANAGED_BY, MANAGED_BY_LABEL};

pub const RELEASE_CONTAINER: &str = "release";
/// Deadline of a release command (migrations and the like).
pub const RELEASE_DEADLINE_SECONDS: i64 = 900;

/// A Job that runs `pod` once: no retry (a failed step or command is reported, not run again),
/// `restartPolicy: Never`, `labels` on the Job and its pod, owned by `owner`.
pub(crate) fn run_once(
    namespace: &str,
    name: &str,
    labels: BTreeMap<String, String>,
    owner: &OwnerReference,
    deadline_seconds: i64,
    ttl_seconds_after_finished: i32,
    pod: PodSpec,
) -> Job {
    Job {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(labels.clone()),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            backoff_limit: Some(0),
            active_deadline_seconds: Some(deadline_seconds),
            ttl_seconds_after_finished: Some(ttl_seconds_after_finished),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    ..pod
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A Job that runs one command of the App's own code: a release command or a one-off run.
pub struct AppJob<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    /// Labels of the Job and its pod (with the managed-by label added).
    pub labels: BTreeMap<String, String>,
    pub container: &'a str,
    /// The `web` process's container as rendered for the release (in the chart values'
    /// shape): image, plain and secret config vars, bound services, resources. It carries no
    /// secret value (those are references).
    pub web: &'a serde_json::Value,
    /// Secrets the pod pulls the image with: the release's (`pull_secrets_of` its values).
    pub pull_secrets: Vec<String>,
    pub command: Vec<String>,
    pub owner: &'a OwnerReference,
    pub deadline_seconds: i64,
    pub ttl_seconds_after_finished: i32,
}

/// The Job of an [`AppJob`]: `web`'s container running `command` once. The pod runs with the
/// namespace's default ServiceAccount and its defaults, like `web`: it is the app's code, not
/// the builder's.
pub fn app_job(spec: &AppJob<'_>) -> Job {
    fn field<T: serde::de::DeserializeOwned>(web: &serde_json::Value, key: &str) -> Option<T> {
        web.get(key).cloned().and_then(|v| serde_json::from_value(v).ok())
    }
    let web = spec.web;
    let image = format!(
        "{}:{}",
        web["image"].as_str().unwrap_or_default(),
        web["imageTag"].as_str().unwrap_or_default()
    );
    let container = Container {
        name: spec.container.into(),
        image: Some(image),
        command: Some(spec.command.clone()),
        env: field(web, "env"),
        env_from: field(web, "envFrom"),
        resources: field(web, "resources"),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    };
    let mut labels = spec.labels.clone();
    labels.insert(MANAGED_BY_LABEL.into(), MANAGED_BY.into());
    run_once(
        spec.namespace,
        spec.name,
        labels,
        spec.owner,
        spec.deadline_seconds,
        spec.ttl_seconds_after_finished,
        PodSpec {
            containers: vec![container],
            image_pull_secrets: (!spec.pull_secrets.is_empty()).then(|| {
                spec.pull_secrets
                    .iter()
                    .map(|name| LocalObjectReference { name: name.clone() })
                    .collect()
            }),
            ..Default::default()
        },
    )
}
