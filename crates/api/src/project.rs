//! `Project`: a tenant's namespace and what comes with it.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{BuildResources, conditions_schema, quota_map};

/// A ShapeBlock project: the agent creates a namespace of the same name, copies the registry
/// pull secret into it and keeps it in sync, and applies the optional quota and default limits.
/// Deleting the Project deletes the namespace and everything in it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "apps.shapeblock.io",
    doc = "A ShapeBlock project: a namespace of the same name with the registry pull secret, quota and defaults.",
    version = "v1alpha1",
    kind = "Project",
    plural = "projects",
    shortname = "sbproj",
    category = "shapeblock",
    status = "ProjectStatus",
    derive = "PartialEq",
    derive = "Default",
    validation = Rule::new(super::common::DNS_LABEL_NAME_RULE).message(super::common::DNS_LABEL_NAME_MESSAGE),
    printcolumn(name = "Display Name", type_ = "string", json_path = ".spec.displayName"),
    printcolumn(name = "Namespace", type_ = "string", json_path = ".status.namespace"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1)
)]
#[serde(rename_all = "camelCase")]
pub struct ProjectSpec {
    /// Human-readable name shown in the ShapeBlock UI; copied to the namespace's annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub display_name: Option<String>,
    /// Free-text description; copied to the namespace's annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Extra labels for the project's namespace (for example to select it in a NetworkPolicy).
    /// Keys under `apps.shapeblock.io/` and `kubernetes.io/` are reserved.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = Rule::new("self.all(k, !k.startsWith('apps.shapeblock.io/') && !k.contains('kubernetes.io/'))").message("label keys under apps.shapeblock.io/ and kubernetes.io/ are reserved"))]
    pub namespace_labels: BTreeMap<String, String>,
    /// Optional ResourceQuota `hard` limits for the namespace, e.g.
    /// `{requests.cpu: "4", limits.memory: 8Gi, pods: "50"}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quota_map")]
    pub resource_quota: BTreeMap<String, Quantity>,
    /// Optional default requests and limits for containers that set none (a LimitRange).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_defaults: Option<BuildResources>,
}

/// Where a Project is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ProjectPhase {
    /// Accepted, namespace not ready yet.
    #[default]
    Pending,
    /// Namespace and pull secret are in place.
    Ready,
    /// Being deleted; the namespace is being removed.
    Terminating,
    /// Cannot be reconciled; see `message` and the `Ready` condition.
    Failed,
}

/// Observed state of a Project.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProjectStatus {
    /// Summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ProjectPhase>,
    /// Human-readable explanation of the phase: what is wrong and what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The namespace this project owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `NamespaceReady`, `PullSecretSynced`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
