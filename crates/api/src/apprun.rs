//! `AppRun`: one command run once in an App's current image and config (`heroku run`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::appbuild::LogDelivery;
use super::common::{DNS_LABEL_PATTERN, conditions_schema};

/// How long a run may take unless its spec says otherwise.
pub const DEFAULT_RUN_TIMEOUT_SECONDS: i64 = 3600;

/// One command run once, as a Job, in the image the App runs now, with the same environment,
/// config vars, bound services, resources and ServiceAccount as its `web` process. Its output
/// goes to the hub like a build log; its exit code is in `status.exitCode`. What runs is fixed
/// at creation: create another AppRun to run something else.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "apps.shapeblock.io",
    doc = "A one-off command run in a ShapeBlock App's current image and config.",
    version = "v1alpha1",
    kind = "AppRun",
    plural = "appruns",
    shortname = "sbrun",
    category = "shapeblock",
    namespaced,
    status = "AppRunStatus",
    derive = "PartialEq",
    validation = Rule::new(super::common::DNS_LABEL_NAME_RULE).message(super::common::DNS_LABEL_NAME_MESSAGE),
    selectable = ".spec.appName",
    printcolumn(name = "App", type_ = "string", json_path = ".spec.appName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Exit", type_ = "integer", json_path = ".status.exitCode"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Command", type_ = "string", json_path = ".spec.command", priority = 1),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1)
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("what an AppRun runs is immutable; create a new AppRun instead"))]
pub struct AppRunSpec {
    /// The App (in the same namespace) whose image and config to run in.
    #[schemars(length(min = 1, max = 40), pattern(DNS_LABEL_PATTERN))]
    pub app_name: String,
    /// The command and its arguments, as a list (no shell: give `["sh", "-c", "..."]` for
    /// one). Buildpack images run it through the lifecycle's launcher, so the buildpacks'
    /// environment is set up as for the App's processes.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.all(a, a.size() <= 4096)").message("each argument is at most 4096 characters"))]
    pub command: Vec<String>,
    /// Deadline in seconds; the run fails with reason `Timeout` after it. Default 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 86400))]
    pub timeout_seconds: Option<i64>,
}

/// Where an AppRun is in its life. `Succeeded` and `Failed` are final.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AppRunPhase {
    /// Waiting for the App to run an image.
    #[default]
    Pending,
    /// The command runs.
    Running,
    /// Exited 0.
    Succeeded,
    /// Exited non-zero, timed out, or could not start; `reason` says which.
    Failed,
}

impl AppRunPhase {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Observed state of an AppRun.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppRunStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AppRunPhase>,
    /// `AppNotFound`, `NotDeployed`, `Started`, `Exited`, `Timeout`, `InvalidSpec`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The command's exit code, once it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The image it runs in (the App's current one when the run started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// The AppBuild that image comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<String>,
    /// The App's config revision it runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<u32>,
    /// The Job that runs it (`kubectl logs job/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`: true once the command exited 0.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// How far the output has been delivered to the hub (with the tunnel only), written by the
    /// log relay under its own field manager. The Job is deleted once it is complete.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["container".into()]))]
    pub logs: Vec<LogDelivery>,
}
