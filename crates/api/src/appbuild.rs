//! `AppBuild`: one build of one App at one git ref, and its deployment.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{BuildResources, DNS_LABEL_PATTERN, conditions_schema, free_form_object};

/// Annotation that cancels an AppBuild when set to `true` (by the hub through the bridge, or by
/// hand: `kubectl annotate appbuild NAME apps.shapeblock.io/cancel-requested=true`).
pub const CANCEL_ANNOTATION: &str = "apps.shapeblock.io/cancel-requested";

/// A git ref: branch, tag or (abbreviated) commit SHA. Never option-like.
pub const GIT_REF_PATTERN: &str = r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$";

/// A container image tag.
pub const IMAGE_TAG_PATTERN: &str = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$";

/// An environment variable name.
pub const ENV_NAME_PATTERN: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";

/// CEL transition rule: the inputs of a build never change (an optional field may be neither
/// added nor removed). Deploy-time `helmValues` and limits may still change.
const IMMUTABLE_BUILD_INPUTS: &str = "self.appName == oldSelf.appName \
    && (has(self.gitRef) ? has(oldSelf.gitRef) && self.gitRef == oldSelf.gitRef : !has(oldSelf.gitRef)) \
    && (has(self.imageTag) ? has(oldSelf.imageTag) && self.imageTag == oldSelf.imageTag : !has(oldSelf.imageTag)) \
    && self.buildVars == oldSelf.buildVars \
    && (has(self.rollbackTo) ? has(oldSelf.rollbackTo) && self.rollbackTo == oldSelf.rollbackTo : !has(oldSelf.rollbackTo))";

/// A rollback deploys an earlier build's image: there is nothing to resolve or build.
const ROLLBACK_BUILDS_NOTHING: &str =
    "!has(self.rollbackTo) || (!has(self.gitRef) && !has(self.imageTag) && size(self.buildVars) == 0)";

/// One build of an App: the agent resolves `gitRef` to a commit, builds and pushes the image in
/// a Job (unless the App deploys a prebuilt image), then deploys it with Helm. What to build is
/// fixed at creation: create a new AppBuild to build something else.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "apps.shapeblock.io",
    doc = "One build and deployment of a ShapeBlock App at one git ref.",
    version = "v1alpha1",
    kind = "AppBuild",
    plural = "appbuilds",
    shortname = "sbbuild",
    shortname = "ab",
    category = "shapeblock",
    namespaced,
    status = "AppBuildStatus",
    derive = "PartialEq",
    validation = Rule::new(super::common::DNS_LABEL_NAME_RULE).message(super::common::DNS_LABEL_NAME_MESSAGE),
    selectable = ".spec.appName",
    printcolumn(name = "App", type_ = "string", json_path = ".spec.appName"),
    printcolumn(name = "Ref", type_ = "string", json_path = ".spec.gitRef"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Reason", type_ = "string", json_path = ".status.reason"),
    printcolumn(name = "Commit", type_ = "string", json_path = ".status.commitSha", priority = 1),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.image", priority = 1),
    printcolumn(name = "Started", type_ = "date", json_path = ".status.startTime"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1)
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new(IMMUTABLE_BUILD_INPUTS).message("what an AppBuild builds is immutable; create a new AppBuild instead"))]
#[x_kube(validation = Rule::new(ROLLBACK_BUILDS_NOTHING).message("rollbackTo deploys an earlier build's image: gitRef, imageTag and buildVars do not apply"))]
pub struct AppBuildSpec {
    /// The App (in the same namespace) to build.
    #[schemars(length(min = 1, max = 40), pattern(DNS_LABEL_PATTERN))]
    pub app_name: String,
    /// Branch, tag or commit to build. Defaults to the App's branch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(format!("self.matches('{GIT_REF_PATTERN}') && !self.contains('..')")).message("must be a branch, tag or commit: letters, digits, '_', '.', '/', '-', not starting with '-' or '.'"))]
    pub git_ref: Option<String>,
    /// Tag of the built image. Defaults to the short commit SHA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128))]
    #[x_kube(validation = Rule::new(format!("self.matches('{IMAGE_TAG_PATTERN}')")).message("must be a valid image tag: letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-'"))]
    pub image_tag: Option<String>,
    /// Build-time environment: Docker build args for `dockerfile`, build env for `buildpack`.
    #[serde(default)]
    #[schemars(length(max = 100))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["key".into()]))]
    pub build_vars: Vec<BuildVar>,
    /// Deployment values in the documented ShapeBlock shape (replicas, env, port, ingress hosts,
    /// resources) plus allow-listed chart overrides. Unknown or unsafe keys are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub helm_values: Option<serde_json::Value>,
    /// Resources for the build Job. Defaults to the App's, then the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<BuildResources>,
    /// Build deadline in seconds. Defaults to the App's, then the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 86400))]
    pub timeout_seconds: Option<i64>,
    /// Roll back: deploy the image of this earlier AppBuild of the same App again, without
    /// building (its `helmValues` are not reused: give this AppBuild the values to deploy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    pub rollback_to: Option<String>,
}

/// One build-time variable.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct BuildVar {
    /// Variable name.
    #[schemars(length(min = 1, max = 255), pattern(ENV_NAME_PATTERN))]
    pub key: String,
    /// Variable value. Build variables end up in image metadata and logs: never put secrets here.
    #[serde(default)]
    #[schemars(length(max = 32768))]
    pub value: String,
}

/// Where an AppBuild is in its life. `Completed`, `Failed` and `Cancelled` are final.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AppBuildPhase {
    /// Accepted; resolving the ref or waiting for its turn.
    #[default]
    Pending,
    /// The build Job is running.
    Building,
    /// The image is being deployed and rolled out.
    Deploying,
    /// Rolled out: the App runs this build's image.
    Completed,
    /// Failed; `reason` says in which step.
    Failed,
    /// Cancelled on request or superseded by a newer build.
    Cancelled,
}

impl AppBuildPhase {
    /// Whether the build can still change.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

/// Observed state of an AppBuild.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppBuildStatus {
    /// Summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AppBuildPhase>,
    /// Machine-readable cause of the last transition: `ResolveFailed`, `CloneFailed`,
    /// `BuildFailed`, `PushFailed`, `BuildOutOfMemory`, `Timeout`, `DeployFailed`, `InvalidSpec`, `Superseded`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable explanation: what happened and what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The commit `gitRef` resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit_sha: Option<String>,
    /// The image deployed, `<registry>/<project>/<app>:<tag>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Digest of the pushed image (`sha256:…`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_digest: Option<String>,
    /// The App's newest Helm release revision when this build's deploy began: revisions
    /// above it are this build's (an older failed release says nothing about this one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_baseline: Option<u32>,
    /// The Helm release revision that rolled out this build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_revision: Option<u32>,
    /// Fingerprint of everything that determines the image (strategy and its settings,
    /// commit, build variables, destination): a later build of the App with the same
    /// fingerprint reuses this image instead of building it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs_hash: Option<String>,
    /// Process types the build found, by name: the command line of each `Procfile` entry, or
    /// empty for a buildpack process type (run as `/cnb/process/<type>`). An App that declares
    /// no `processes` runs these.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub process_types: std::collections::BTreeMap<String, String>,
    /// The build Job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_name: Option<String>,
    /// The build Job's pod (for `kubectl logs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
    /// When the build started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the build reached a final phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Built`, `Deployed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// How far each build container's log has been delivered to the hub (with the tunnel
    /// only). A build's Jobs are deleted once every log is complete; an agent that restarts
    /// resumes each log from here. Written by the log relay under its own field manager.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["container".into()]))]
    pub logs: Vec<LogDelivery>,
}

/// Delivery of one build container's log.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LogDelivery {
    /// Container of a build pod (`resolve`, `clone`, `build`).
    pub container: String,
    /// Bytes the hub has acknowledged (after credential scrubbing).
    pub bytes: u64,
    /// The hub has the whole log (its end, or a truncation marker).
    #[serde(default)]
    pub complete: bool,
    /// Part of the log could not be read (its pod was deleted first); the hub was told.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}
