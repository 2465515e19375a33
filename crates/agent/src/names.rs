//! Names of what the agent owns or reads by name that its RBAC rules ([`crate::rbac`]) grant
//! by name and the controllers use: one definition for both, so that the rules import no
//! controller.

/// The field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "shapeblock-agent";
/// Name of the helm-controller's HelmChart CRD.
pub const HELM_CHART_CRD: &str = "helmcharts.helm.cattle.io";
/// ConfigMap in the agent's namespace whose `catalog.yaml` key overrides built-in entries.
pub const CATALOG_CONFIGMAP: &str = "shapeblock-catalog";
/// ConfigMap in the agent's namespace whose `known_hosts` lists the SSH host keys of the git
/// servers: SSH clones check the server against it (never trust on first use). A fixed name,
/// so the agent's Role can grant it and nothing else.
pub const KNOWN_HOSTS_CONFIGMAP: &str = "shapeblock-known-hosts";
