//! Pieces shared by several kinds: condition lists, free-form values, resource settings,
//! and the name rules that keep derived Kubernetes names within their limits.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// CEL rule (root level) for kinds whose name becomes a namespace: a DNS-1123 label.
pub(crate) const DNS_LABEL_NAME_RULE: &str =
    "self.metadata.name.size() <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
pub(crate) const DNS_LABEL_NAME_MESSAGE: &str = "metadata.name must be a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit";

/// CEL rule (root level) for kinds whose name becomes a Helm release and the prefix of derived
/// resource names (`<name>-build-<id>`, `helm-install-<project>-<name>`, ...): 40 characters keeps
/// every derived name within the 63-character label limit.
pub(crate) const SHORT_NAME_RULE: &str =
    "self.metadata.name.size() <= 40 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')";
pub(crate) const SHORT_NAME_MESSAGE: &str = "metadata.name must be a DNS label of at most 40 characters (lowercase letters, digits and '-', starting and ending with a letter or digit), so that the Helm release and derived resource names fit";

/// Pattern of a DNS-1123 label (names of namespaces, apps, secrets referenced by name).
pub(crate) const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Pattern of a DNS-1123 subdomain (Secret names).
pub(crate) const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Schema of `status.conditions`: standard `metav1.Condition`s, a list-map keyed by `type`
/// so that server-side apply merges conditions written by different reconcile passes.
pub fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition>();
    json_schema!({
        "description": "Standard Kubernetes conditions (`Ready` and kind-specific ones), one per type.",
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"]
    })
}

/// Schema of a free-form object whose unknown fields the apiserver must keep (Helm values).
pub fn free_form_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// A Kubernetes quantity (`500m`, `1Gi`, `2`), without k8s-openapi's page-long description.
fn quantity_value() -> serde_json::Value {
    serde_json::json!({
        "x-kubernetes-int-or-string": true,
        "anyOf": [{"type": "integer"}, {"type": "string"}],
        "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
    })
}

/// Schema of a ResourceQuota's `hard` map: any resource name, quantity values.
pub(crate) fn quota_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "additionalProperties": quantity_value()
    })
}

/// Schema of an optional quantity field.
pub(crate) fn optional_quantity(_: &mut SchemaGenerator) -> Schema {
    let mut value = quantity_value();
    value["nullable"] = true.into();
    Schema::try_from(value).expect("a JSON object is a schema")
}

/// CPU and memory (requests and limits) for a build, a workload or container defaults. Quantities use Kubernetes notation (`500m`, `1Gi`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BuildResources {
    /// Minimum resources the scheduler reserves, e.g. `{cpu: 500m, memory: 1Gi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "resource_map")]
    pub requests: BTreeMap<String, Quantity>,
    /// Hard ceilings; a build over its memory limit is killed and fails with `BuildOutOfMemory`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "resource_map")]
    pub limits: BTreeMap<String, Quantity>,
}

/// Resource maps accept only `cpu`, `memory` and `ephemeral-storage`: other resource names are
/// almost always typos that Kubernetes would reject only when the Job is created.
pub(crate) fn resource_map(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        // Bounds the rule's cost: it is evaluated for every process's resources too.
        "maxProperties": 3,
        "additionalProperties": quantity_value(),
        "x-kubernetes-validations": [{
            "rule": "self.all(k, k in ['cpu', 'memory', 'ephemeral-storage'])",
            "message": "only cpu, memory and ephemeral-storage may be set"
        }]
    })
}
