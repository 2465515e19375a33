//! RBAC in one place: the agent's own rules (each with the reason it exists) and the
//! ClusterRoles that Teams bind to. The tests install exactly these, and run the agent with a
//! token for its ServiceAccount, so a missing permission fails a test; the Helm chart renders
//! the same rules.

use std::collections::BTreeMap;

use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::{GROUP, TeamRole};

/// Name of the agent's ServiceAccount, ClusterRole, ClusterRoleBinding, Role and RoleBinding.
pub const AGENT_NAME: &str = "shapeblock-agent";

/// One RBAC rule and why the agent needs it.
#[derive(Clone, Debug)]
pub struct Rule {
    pub api_groups: &'static [&'static str],
    pub resources: &'static [&'static str],
    pub verbs: &'static [&'static str],
    pub resource_names: &'static [&'static str],
    pub why: &'static str,
}

impl Rule {
    fn policy(&self) -> PolicyRule {
        PolicyRule {
            api_groups: Some(strings(self.api_groups)),
            resources: Some(strings(self.resources)),
            verbs: strings(self.verbs),
            resource_names: (!self.resource_names.is_empty()).then(|| strings(self.resource_names)),
            non_resource_urls: None,
        }
    }
}

const READ_WRITE: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The ClusterRoles Teams bind to, by role.
pub fn team_cluster_role_name(role: TeamRole) -> &'static str {
    match role {
        TeamRole::Admin => "shapeblock-admin",
        TeamRole::Developer => "shapeblock-developer",
        TeamRole::Viewer => "shapeblock-viewer",
    }
}

/// Every ShapeBlock kind, as RBAC names its resources.
const SHAPEBLOCK_RESOURCES: &[&str] = &[
    "projects",
    "apps",
    "appbuilds",
    "appruns",
    "backingservices",
    "teams",
];

/// Cluster-wide rules of the agent. No wildcards.
pub const AGENT_CLUSTER_RULES: &[Rule] = &[
    Rule {
        api_groups: &[GROUP],
        resources: SHAPEBLOCK_RESOURCES,
        verbs: &["get", "list", "watch", "patch"],
        resource_names: &[],
        why: "watch the ShapeBlock resources it reconciles; patch adds and removes its finalizer",
    },
    Rule {
        api_groups: &[GROUP],
        resources: SHAPEBLOCK_RESOURCES,
        verbs: &["create", "delete"],
        resource_names: &[],
        why: "the bridge materialises the hub's commands: server-side apply creates, delete and prune remove",
    },
    Rule {
        api_groups: &[""],
        resources: &["nodes"],
        verbs: &["list"],
        resource_names: &[],
        why: "the cluster inventory in the tunnel's hello: node count, allocatable CPU and memory",
    },
    Rule {
        api_groups: &[GROUP],
        resources: &[
            "projects/status",
            "apps/status",
            "appbuilds/status",
            "appruns/status",
            "backingservices/status",
            "teams/status",
        ],
        verbs: &["get", "patch"],
        resource_names: &[],
        why: "write phase, conditions and observedGeneration (server-side apply on the status subresource)",
    },
    Rule {
        api_groups: &[""],
        resources: &["namespaces"],
        verbs: READ_WRITE,
        resource_names: &[],
        why: "a Project is a namespace: create it, label it, delete it when the Project goes; watched by label, metadata only",
    },
    Rule {
        api_groups: &[""],
        resources: &["secrets"],
        verbs: READ_WRITE,
        resource_names: &[],
        why: "copy the registry pull secret into project namespaces, write each build's push-token Secret and keep the token signing key (agent namespace), keep App deploy keys, read the clone credentials an App names, generate BackingService credentials and connection Secrets, create each App's (empty) config Secret and read its version, never its values; delete a Helm release record an interrupted install left pending once the install Job failed on it (deploy::pending); watched by label, metadata only (RBAC cannot narrow by label)",
    },
    Rule {
        api_groups: &[""],
        resources: &["serviceaccounts"],
        verbs: &["create", "patch"],
        resource_names: &[],
        why: "turn off token automounting on each project namespace's default ServiceAccount, which App, run and service pods use (server-side apply creates it if the controller-manager has not yet; RBAC cannot narrow create by name); never read, never bound",
    },
    Rule {
        api_groups: &[""],
        resources: &["resourcequotas", "limitranges"],
        verbs: READ_WRITE,
        resource_names: &[],
        why: "a Project's optional quota and container defaults",
    },
    Rule {
        api_groups: &["rbac.authorization.k8s.io"],
        resources: &["rolebindings"],
        verbs: READ_WRITE,
        resource_names: &[],
        why: "a Team is RoleBindings in its projects' namespaces; listed by label to remove the ones no longer wanted",
    },
    Rule {
        api_groups: &["rbac.authorization.k8s.io"],
        resources: &["clusterroles"],
        verbs: &["bind"],
        resource_names: &[
            "shapeblock-admin",
            "shapeblock-developer",
            "shapeblock-viewer",
            HELM_RELEASE_ROLE,
        ],
        why: "bind Team members to the three ShapeBlock roles, and each HelmChart's install Job to shapeblock-helm-release in its release's namespace, without holding their permissions itself; nothing else",
    },
    Rule {
        api_groups: &["batch"],
        resources: &["jobs"],
        verbs: &["get", "list", "watch", "create", "delete"],
        resource_names: &[],
        why: "build and resolve Jobs in project namespaces, deleted once their result is recorded; read the helm-controller's install Jobs, and delete one that failed on a release record left pending so that it runs again",
    },
    Rule {
        api_groups: &[""],
        resources: &["pods"],
        verbs: &["get", "list", "watch"],
        resource_names: &[],
        why: "read a build pod's termination message (commit, digest) and which step failed; the log relay watches build pods by label, live App logs an App's process pods",
    },
    Rule {
        api_groups: &[""],
        resources: &["pods/log"],
        verbs: &["get"],
        resource_names: &[],
        why: "relay build pods' logs, and live logs of an App's process pods, to the hub (with the tunnel); read the last lines of a failed build step's log when the tool left no message (kaniko's and the lifecycle's final error)",
    },
    Rule {
        api_groups: &["cert-manager.io"],
        resources: &["certificates"],
        verbs: &["get"],
        resource_names: &[],
        why: "report whether the certificates of an App's TLS domains are issued (CertificatesReady)",
    },
    Rule {
        api_groups: &["apps"],
        resources: &["deployments"],
        verbs: &["get", "list", "watch"],
        resource_names: &[],
        why: "an AppBuild is Completed only when the App's Deployment has rolled out its image; watched by label, metadata only",
    },
    Rule {
        api_groups: &["apps"],
        resources: &["statefulsets"],
        verbs: &["get", "list", "watch"],
        resource_names: &[],
        why: "a BackingService is Ready only when its StatefulSet has rolled out; watched by label, metadata only",
    },
    Rule {
        api_groups: &[""],
        resources: &["persistentvolumeclaims"],
        verbs: &["list", "delete"],
        resource_names: &[],
        why: "a deleted BackingService's data claims (helm uninstall keeps them): deleted under deletionPolicy Delete, listed and reported under Retain",
    },
    Rule {
        api_groups: &["events.k8s.io"],
        resources: &["events"],
        verbs: &["create", "patch"],
        resource_names: &[],
        why: "Events on the objects it reconciles (kubectl describe shows them)",
    },
    Rule {
        api_groups: &["apiextensions.k8s.io"],
        resources: &["customresourcedefinitions"],
        verbs: &["get", "create", "patch"],
        resource_names: SHAPEBLOCK_CRDS,
        why: "server-side apply of its own six CRDs at start-up (Helm never upgrades a chart's crds/); create by name only through apply, which recreates a deleted one; no other CRD",
    },
    Rule {
        api_groups: &["apiextensions.k8s.io"],
        resources: &["customresourcedefinitions"],
        verbs: &["get"],
        resource_names: &[crate::names::HELM_CHART_CRD],
        why: "read which spec fields the served HelmChart CRD declares, to leave out those an older helm-controller lacks (failurePolicy); that one CRD only",
    },
];

/// Names of the ShapeBlock CRDs, for the one rule on CRDs (a unit test keeps it equal to
/// [`crate::api::crds`]).
pub const SHAPEBLOCK_CRDS: &[&str] = &[
    "projects.apps.shapeblock.io",
    "apps.apps.shapeblock.io",
    "appbuilds.apps.shapeblock.io",
    "appruns.apps.shapeblock.io",
    "backingservices.apps.shapeblock.io",
    "teams.apps.shapeblock.io",
];

/// The Lease replicas elect their leader with, in the agent's namespace.
pub const LEASE_NAME: &str = AGENT_NAME;

/// The agent's ClusterRole.
pub fn agent_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(AGENT_NAME, None),
        rules: Some(AGENT_CLUSTER_RULES.iter().map(Rule::policy).collect()),
        ..Default::default()
    }
}

/// Binds the agent's ClusterRole to its ServiceAccount in `namespace`.
pub fn agent_cluster_role_binding(namespace: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(AGENT_NAME, None),
        role_ref: role_ref("ClusterRole", AGENT_NAME),
        subjects: Some(vec![service_account(namespace)]),
    }
}

/// Rules the agent needs in its own namespace only.
pub const AGENT_NAMESPACE_RULES: &[Rule] = &[
    Rule {
        api_groups: &[""],
        resources: &["secrets"],
        verbs: &["get", "list", "watch"],
        resource_names: &[],
        why: "watch the source registry pull secret (by name) to copy it into every project",
    },
    Rule {
        api_groups: &[""],
        resources: &["configmaps"],
        verbs: &["get"],
        resource_names: &[
            crate::names::CATALOG_CONFIGMAP,
            crate::names::KNOWN_HOSTS_CONFIGMAP,
        ],
        why: "read the cluster admin's BackingService catalog overrides and the SSH known_hosts that generated deploy keys carry to their clones; no other ConfigMap",
    },
    Rule {
        api_groups: &["helm.cattle.io"],
        resources: &["helmcharts"],
        verbs: &["get", "list", "watch", "create", "patch", "delete"],
        resource_names: &[],
        why: "deploy Apps and BackingServices as HelmCharts in the agent's own namespace (never a tenant's: see the AppBuild notes)",
    },
    Rule {
        api_groups: &["coordination.k8s.io"],
        resources: &["leases"],
        verbs: &["create"],
        resource_names: &[],
        why: "leader election: the first replica creates the Lease (RBAC cannot narrow create by name)",
    },
    Rule {
        api_groups: &["coordination.k8s.io"],
        resources: &["leases"],
        verbs: &["get", "update"],
        resource_names: &[LEASE_NAME],
        why: "leader election: read, renew, take over and release its one Lease; no other Lease",
    },
];

/// The agent's Role in its own namespace.
pub fn agent_role(namespace: &str) -> Role {
    Role {
        metadata: meta(AGENT_NAME, Some(namespace)),
        rules: Some(AGENT_NAMESPACE_RULES.iter().map(Rule::policy).collect()),
    }
}

/// Binds the agent's Role to its ServiceAccount.
pub fn agent_role_binding(namespace: &str) -> RoleBinding {
    RoleBinding {
        metadata: meta(AGENT_NAME, Some(namespace)),
        role_ref: role_ref("Role", AGENT_NAME),
        subjects: Some(vec![service_account(namespace)]),
    }
}

const SHAPEBLOCK_KINDS: &[&str] = &["apps", "appbuilds", "appruns", "backingservices"];
const READ: &[&str] = &["get", "list", "watch"];
const WRITE: &[&str] = &["create", "update", "patch", "delete"];

/// Rules of a Team role inside a project namespace.
///
/// What RBAC cannot enforce: anyone who may create Pods in a namespace can mount any Secret of
/// that namespace into them. Developers cannot create Pods directly, but the agent builds and
/// deploys for them; their apps' pods see what the apps are bound to, by design.
pub fn team_rules(role: TeamRole) -> Vec<PolicyRule> {
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|s| s.to_string()).collect()),
        resources: Some(resources.iter().map(|s| s.to_string()).collect()),
        verbs: verbs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let mut rules = vec![
        rule(&[GROUP], SHAPEBLOCK_KINDS, READ),
        rule(
            &[""],
            &[
                "pods",
                "pods/log",
                "services",
                "endpoints",
                "configmaps",
                "events",
                "persistentvolumeclaims",
                "resourcequotas",
                "limitranges",
            ],
            READ,
        ),
        rule(&["apps"], &["deployments", "replicasets", "statefulsets"], READ),
        rule(&["batch"], &["jobs", "cronjobs"], READ),
        rule(&["networking.k8s.io"], &["ingresses"], READ),
        rule(&["autoscaling"], &["horizontalpodautoscalers"], READ),
        rule(&["cert-manager.io"], &["certificates"], READ),
        rule(&["events.k8s.io"], &["events"], READ),
    ];
    if matches!(role, TeamRole::Developer | TeamRole::Admin) {
        rules.push(rule(&[GROUP], SHAPEBLOCK_KINDS, WRITE));
    }
    if role == TeamRole::Admin {
        rules.push(rule(
            &[""],
            &["secrets"],
            &["get", "list", "watch", "create", "update", "patch", "delete"],
        ));
        rules.push(rule(&[""], &["pods"], &["delete"]));
    }
    rules
}

/// The ClusterRole an install Job of the helm-controller gets in its release's namespace only
/// (a RoleBinding per HelmChart, `controllers::install_access`): exactly what the app chart and
/// the service charts render, and Helm's release storage (Secrets). No RBAC objects, and of
/// custom resources only cert-manager's Certificates (an App domain's TLS).
pub const HELM_RELEASE_ROLE: &str = "shapeblock-helm-release";

/// The rules of [`HELM_RELEASE_ROLE`].
pub fn helm_release_rules() -> Vec<PolicyRule> {
    const ALL: &[&str] = &["get", "list", "watch", "create", "update", "patch", "delete"];
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(strings(groups)),
        resources: Some(strings(resources)),
        verbs: strings(verbs),
        ..Default::default()
    };
    vec![
        rule(
            &[""],
            &[
                "configmaps",
                "secrets",
                "services",
                "serviceaccounts",
                "persistentvolumeclaims",
            ],
            ALL,
        ),
        rule(
            &[""],
            &["pods", "pods/log", "events", "endpoints"],
            &["get", "list", "watch"],
        ),
        rule(&["apps"], &["deployments", "statefulsets", "replicasets"], ALL),
        rule(&["batch"], &["jobs", "cronjobs"], ALL),
        rule(&["autoscaling"], &["horizontalpodautoscalers"], ALL),
        rule(&["policy"], &["poddisruptionbudgets"], ALL),
        rule(&["networking.k8s.io"], &["ingresses", "networkpolicies"], ALL),
        rule(&["cert-manager.io"], &["certificates"], ALL),
    ]
}

/// [`HELM_RELEASE_ROLE`] as an object.
pub fn helm_release_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(HELM_RELEASE_ROLE, None),
        rules: Some(helm_release_rules()),
        ..Default::default()
    }
}

/// The three Team ClusterRoles.
pub fn team_cluster_roles() -> Vec<ClusterRole> {
    [TeamRole::Admin, TeamRole::Developer, TeamRole::Viewer]
        .into_iter()
        .map(|role| ClusterRole {
            metadata: meta(team_cluster_role_name(role), None),
            rules: Some(team_rules(role)),
            ..Default::default()
        })
        .collect()
}

/// The agent's rules as a Markdown table (resources, verbs, why), for the README.
pub fn markdown_table() -> String {
    let mut out = String::from("| scope | API group | resources | verbs | why |\n|---|---|---|---|---|\n");
    let rows = AGENT_CLUSTER_RULES
        .iter()
        .map(|r| ("cluster", r))
        .chain(AGENT_NAMESPACE_RULES.iter().map(|r| ("agent namespace", r)));
    for (scope, rule) in rows {
        let group = rule
            .api_groups
            .iter()
            .map(|g| if g.is_empty() { "core" } else { g })
            .collect::<Vec<_>>();
        let mut resources = rule.resources.join(", ");
        if !rule.resource_names.is_empty() {
            resources = format!("{resources} (only {})", rule.resource_names.join(", "));
        }
        out.push_str(&format!(
            "| {scope} | {} | {resources} | {} | {} |\n",
            group.join(", "),
            rule.verbs.join(", "),
            rule.why
        ));
    }
    out
}

/// Every RBAC object the agent needs, as one multi-document YAML stream.
pub fn manifests(namespace: &str) -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    let mut push = |value: serde_json::Value| -> Result<(), serde_yaml::Error> {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&value)?);
        Ok(())
    };
    push(serde_json::to_value(agent_cluster_role()).expect("serializable"))?;
    push(serde_json::to_value(agent_cluster_role_binding(namespace)).expect("serializable"))?;
    push(serde_json::to_value(agent_role(namespace)).expect("serializable"))?;
    push(serde_json::to_value(agent_role_binding(namespace)).expect("serializable"))?;
    for role in team_cluster_roles() {
        push(serde_json::to_value(role).expect("serializable"))?;
    }
    push(serde_json::to_value(helm_release_cluster_role()).expect("serializable"))?;
    Ok(out)
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: Some(BTreeMap::from([(
            "app.kubernetes.io/part-of".to_string(),
            "shapeblock".to_string(),
        )])),
        ..Default::default()
    }
}

fn role_ref(kind: &str, name: &str) -> RoleRef {
    RoleRef {
        api_group: "rbac.authorization.k8s.io".into(),
        kind: kind.into(),
        name: name.into(),
    }
}

fn service_account(namespace: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".into(),
        name: AGENT_NAME.into(),
        namespace: Some(namespace.into()),
        api_group: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_wildcards_anywhere() {
        let roles = team_cluster_roles().into_iter().chain([agent_cluster_role()]);
        for role in roles {
            for rule in role.rules.unwrap() {
                let all = rule
                    .verbs
                    .iter()
                    .chain(rule.resources.iter().flatten())
                    .chain(rule.api_groups.iter().flatten());
                assert!(
                    all.clone().all(|s| s != "*"),
                    "wildcard in {:?}",
                    role.metadata.name
                );
            }
        }
    }

    #[test]
    fn the_readme_lists_the_rules_as_they_are() {
        let readme =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
        assert!(
            readme.contains(&markdown_table()),
            "README.md's RBAC table differs from crates/agent/src/rbac.rs: paste `shapeblock-agent rbac --markdown`"
        );
    }

    #[test]
    fn the_crd_rule_names_exactly_the_shapeblock_crds() {
        let mut names: Vec<String> = crate::api::crds()
            .into_iter()
            .map(|crd| crd.metadata.name.unwrap_or_default())
            .collect();
        let mut listed: Vec<String> = SHAPEBLOCK_CRDS.iter().map(|s| s.to_string()).collect();
        names.sort();
        listed.sort();
        assert_eq!(names, listed);
    }

    #[test]
    fn only_admins_touch_secrets() {
        for role in [TeamRole::Developer, TeamRole::Viewer] {
            let touches = team_rules(role)
                .iter()
                .any(|r| r.resources.iter().flatten().any(|s| s == "secrets"));
            assert!(!touches, "{role:?} must not reach Secrets");
        }
        assert!(
            team_rules(TeamRole::Admin)
                .iter()
                .any(|r| r.resources.iter().flatten().any(|s| s == "secrets"))
        );
    }
}
