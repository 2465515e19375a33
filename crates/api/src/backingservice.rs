//! `BackingService`: a database, cache or queue from the agent's catalog.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DNS_LABEL_PATTERN, conditions_schema, free_form_object, optional_quantity};

/// A backing service (PostgreSQL, MySQL, Redis, MongoDB, RabbitMQ, or any type the cluster's
/// catalog defines) deployed with Helm in the project's namespace. The agent generates its
/// credentials and publishes a connection Secret that Apps bind to.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "apps.shapeblock.io",
    doc = "A database, cache or queue from the ShapeBlock catalog, bound to apps.",
    version = "v1alpha1",
    kind = "BackingService",
    plural = "backingservices",
    shortname = "bsvc",
    category = "shapeblock",
    namespaced,
    status = "BackingServiceStatus",
    derive = "PartialEq",
    validation = Rule::new(super::common::SHORT_NAME_RULE).message(super::common::SHORT_NAME_MESSAGE),
    printcolumn(name = "Type", type_ = "string", json_path = ".spec.type"),
    printcolumn(name = "Version", type_ = "string", json_path = ".spec.version"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".status.endpoint"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1)
)]
#[serde(rename_all = "camelCase")]
pub struct BackingServiceSpec {
    /// Catalog entry to deploy, e.g. `postgresql`, `mysql`, `redis`, `mongodb`, `rabbitmq`.
    /// The catalog is data the cluster admin can extend, so this is checked against it at
    /// reconcile time (an unknown type is reported in status), not by an enum here.
    #[serde(rename = "type")]
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("type is immutable; create a new BackingService"))]
    pub service_type: String,
    /// Version of the service (the catalog lists the ones it supports). Defaults to the catalog's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), pattern(r"^[A-Za-z0-9][A-Za-z0-9._-]*$"))]
    pub version: Option<String>,
    /// Size of the service.
    #[serde(default)]
    pub plan: ServicePlan,
    /// Extra chart values, checked against the catalog's allow-list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "free_form_object")]
    pub helm_values: Option<serde_json::Value>,
    /// What happens to the data when the BackingService is deleted: `Retain` (default) keeps
    /// the volume claims and the credentials Secret, `Delete` removes them.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
}

/// What deleting a BackingService does to its data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum DeletionPolicy {
    /// Uninstall the release; keep the data volume claims and the credentials Secret (a new
    /// BackingService of the same name and type reattaches them).
    #[default]
    Retain,
    /// Uninstall the release and delete the data volume claims and Secrets.
    Delete,
}

/// Annotation on a BackingService: `"true"` lets it be deleted while Apps still bind it.
pub const FORCE_DELETE_ANNOTATION: &str = "apps.shapeblock.io/force-delete";

/// Storage, CPU and memory of a backing service. Unset fields take the catalog's defaults.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.storage) == has(oldSelf.storage) && (!has(self.storage) || string(self.storage) == string(oldSelf.storage))").message("plan.storage cannot be changed after creation: a StatefulSet's volume claim template is immutable"))]
pub struct ServicePlan {
    /// Size of the data volume, e.g. `1Gi`. Fixed at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub storage: Option<Quantity>,
    /// CPU request and limit, e.g. `250m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub cpu: Option<Quantity>,
    /// Memory request and limit, e.g. `256Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "optional_quantity")]
    pub memory: Option<Quantity>,
}

/// Where a BackingService is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum BackingServicePhase {
    /// Being installed or upgraded.
    #[default]
    Provisioning,
    /// Installed and its workload is available.
    Ready,
    /// Cannot be provisioned; see `message` and conditions.
    Failed,
    /// Being removed.
    Deleting,
}

/// Observed state of a BackingService.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackingServiceStatus {
    /// Summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<BackingServicePhase>,
    /// Human-readable explanation of the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// In-cluster `host:port` of the service (no credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Secret with `host`, `port`, `username`, `password`, `database` and `uri` for consumers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_secret: Option<String>,
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `CredentialsReady`, `Installed`, `Available`, `DeletionBlocked`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
