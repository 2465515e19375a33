//! `Team`: people and the role they have in each project.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{DNS_LABEL_PATTERN, conditions_schema};

/// A team: its members get the listed role in each listed project, as RoleBindings (made and
/// removed by the agent) in the project's namespace to the ClusterRoles
/// `shapeblock-admin`, `shapeblock-developer` and `shapeblock-viewer`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "apps.shapeblock.io",
    doc = "A ShapeBlock team: members and their role in each project.",
    version = "v1alpha1",
    kind = "Team",
    plural = "teams",
    shortname = "sbteam",
    category = "shapeblock",
    status = "TeamStatus",
    derive = "PartialEq",
    derive = "Default",
    validation = Rule::new(super::common::SHORT_NAME_RULE).message(super::common::SHORT_NAME_MESSAGE),
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.memberCount"),
    printcolumn(name = "Projects", type_ = "integer", json_path = ".status.projectCount"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1)
)]
#[serde(rename_all = "camelCase")]
pub struct TeamSpec {
    /// Human-readable name shown in the ShapeBlock UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub display_name: Option<String>,
    /// Users and groups, as the cluster's authenticator names them.
    #[serde(default)]
    #[schemars(length(max = 500))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["kind".into(), "name".into()]))]
    pub members: Vec<TeamMember>,
    /// The role the team has in each project.
    #[serde(default)]
    #[schemars(length(max = 500))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["project".into()]))]
    pub projects: Vec<TeamProjectRole>,
}

/// Kind of a team member.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum SubjectKind {
    /// A user name.
    #[default]
    User,
    /// A group name.
    Group,
}

/// One member of a team.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, KubeSchema)]
pub struct TeamMember {
    /// `User` or `Group`.
    #[serde(default)]
    pub kind: SubjectKind,
    /// User or group name, exactly as the authenticator reports it. `system:` names are refused.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = Rule::new("!self.startsWith('system:')").message("system: users and groups cannot be team members"))]
    pub name: String,
}

/// A team's role in one project.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct TeamProjectRole {
    /// Name of the Project (and of its namespace).
    #[schemars(length(min = 1, max = 63), pattern(DNS_LABEL_PATTERN))]
    pub project: String,
    /// `admin`, `developer` or `viewer`.
    pub role: TeamRole,
}

/// Roles a team can have in a project.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum TeamRole {
    /// Everything a developer can do, plus reading the project's Secrets.
    Admin,
    /// Manage ShapeBlock resources, read workloads and logs; no RBAC, no Secrets.
    Developer,
    /// Read-only; no Secrets.
    #[default]
    Viewer,
}

/// Where a Team is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum TeamPhase {
    /// Not reconciled yet.
    #[default]
    Pending,
    /// Every binding is in place.
    Ready,
    /// Some bindings could not be made; see `message`.
    Failed,
}

/// Observed state of a Team.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TeamStatus {
    /// Summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TeamPhase>,
    /// Human-readable explanation of the phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Number of members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_count: Option<i32>,
    /// Number of projects with a binding in place.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub project_count: Option<i32>,
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
