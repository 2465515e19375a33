//! What an App runs once built: config vars, process types, the release command, domains,
//! scaling and scheduled processes. The agent renders these into the universal chart's values
//! (`controllers::release`); users never write chart values for them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::BuildResources;

/// A process type name: it becomes part of the Deployment name `<app>-<process>` (an App name
/// has at most 40 characters, so 20 here keeps that within a DNS label).
pub const PROCESS_NAME_PATTERN: &str = "^[a-z]([-a-z0-9]{0,18}[a-z0-9])?$";

/// The process type that serves HTTP: the only one with a port, a Service, domains and a
/// readiness check.
pub const WEB_PROCESS: &str = "web";

/// One process type (Heroku's "dyno type"): a Deployment of the App's image running `command`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.autoscaling) || !has(self.replicas) || (self.replicas >= self.autoscaling.minReplicas && self.replicas <= self.autoscaling.maxReplicas)").message("replicas must lie within autoscaling.minReplicas and maxReplicas"))]
pub struct Process {
    /// Command and its arguments, as a list (never split on spaces). Empty: the image's own
    /// entrypoint (for buildpack images, `/cnb/process/<type>`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub command: Vec<String>,
    /// Number of pods. Defaults to 1. With `autoscaling`, the starting point the autoscaler
    /// moves from; upgrades keep whatever the autoscaler chose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub replicas: Option<i32>,
    /// Port the process listens on (`web` only). Gets a Service and the App's domains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i32>,
    /// How the platform tells that a `web` pod is ready for traffic. Defaults to a TCP check
    /// on `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
    /// CPU and memory per pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<BuildResources>,
    /// Horizontal autoscaling on CPU (an `autoscaling/v2` HorizontalPodAutoscaler). Needs a
    /// CPU request in `resources`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
}

/// A readiness (and optionally liveness) check of a `web` process.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HealthCheck {
    /// HTTP path to GET (a 2xx or 3xx answer is healthy). Unset: a TCP connect to the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    #[x_kube(validation = Rule::new("self.startsWith('/') && !self.contains('{{') && !self.contains(' ')").message("must be an absolute path without spaces"))]
    pub path: Option<String>,
    /// Also restart pods that fail the check (a liveness probe). Off by default: a liveness
    /// probe that is too strict restarts healthy pods under load.
    #[serde(default)]
    pub liveness: bool,
    /// Seconds to wait after start before the first check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 600))]
    pub initial_delay_seconds: Option<i32>,
}

/// Autoscaling bounds and target.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct Autoscaling {
    #[schemars(range(min = 1, max = 100))]
    pub min_replicas: i32,
    #[schemars(range(min = 1, max = 100))]
    pub max_replicas: i32,
    /// Average CPU utilisation (percent of the request) to aim for.
    #[serde(default = "default_cpu_target")]
    #[schemars(range(min = 10, max = 100))]
    pub target_cpu_percent: i32,
}

fn default_cpu_target() -> i32 {
    80
}

/// A custom domain of the `web` process.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Domain {
    /// Host name, e.g. `shop.example.com`.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)+$')").message("must be a lowercase DNS name with at least two labels"))]
    pub host: String,
    /// Serve HTTPS with a certificate from cert-manager (`deploy.certificateIssuer`).
    #[serde(default = "default_true")]
    pub tls: bool,
}

fn default_true() -> bool {
    true
}

/// A scheduled process (a CronJob running the App's image and config).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct CronEntry {
    /// Name of the entry; the CronJob is `<app>-<name>`.
    #[schemars(length(min = 1, max = 20), pattern(PROCESS_NAME_PATTERN))]
    pub name: String,
    /// Cron schedule in the cluster's time zone, e.g. `0 3 * * *`.
    #[schemars(length(min = 9, max = 100))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9*/,@ a-zA-Z-]+$') && !self.contains('{{')").message("must be a cron schedule: five fields of digits, '*', '/', ',' and '-', or a macro like @daily"))]
    pub schedule: String,
    /// Command and arguments, as a list.
    #[schemars(length(min = 1, max = 64), inner(length(max = 4096)))]
    pub command: Vec<String>,
}

/// How releases are rolled out and exposed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeploySettings {
    /// Seconds a release may take to become available before it fails (and is rolled back).
    /// Defaults to 300.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 30, max = 3600))]
    pub progress_deadline_seconds: Option<i32>,
    /// IngressClass of the App's domains. Defaults to the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(super::common::DNS_LABEL_PATTERN))]
    pub ingress_class: Option<String>,
    /// cert-manager ClusterIssuer that signs the domains' certificates. Defaults to the
    /// agent's (`--certificate-issuer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(super::common::DNS_SUBDOMAIN_PATTERN))]
    pub certificate_issuer: Option<String>,
}

/// Why a release was made.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ReleaseReason {
    /// A build deployed a new image.
    Build,
    /// An AppBuild rolled back to an earlier build's image.
    Rollback,
    /// Config vars (plain or secret) changed.
    ConfigChange,
    /// Replicas or autoscaling changed.
    Scale,
    /// Bound BackingServices changed.
    Bindings,
    /// Other runtime settings changed: processes, domains, cron, deploy settings.
    Settings,
}

/// One release of an App (like Heroku's `v12`): what ran from when.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseRecord {
    /// Release number, counting up from 1.
    pub version: u32,
    pub reason: ReleaseReason,
    /// The image released.
    pub image: String,
    /// The AppBuild whose image it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// The config revision released.
    pub config_revision: u32,
    /// When the release was made.
    pub time: Time,
    /// When every process ran it, updated and available (unset while it rolls out, and for a
    /// release replaced before it finished rolling out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_out: Option<Time>,
}

/// A domain of the App as served now.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DomainStatus {
    pub host: String,
    /// Served over HTTPS.
    pub tls: bool,
    /// Whether its certificate is issued (TLS domains only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_ready: Option<bool>,
}

/// Config vars: plain ones, by name. Secret ones live in the App's config Secret.
pub type ConfigVars = BTreeMap<String, String>;
