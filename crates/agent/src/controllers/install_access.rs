//! What the helm-controller's install Job of one HelmChart may touch: its release's namespace,
//! nothing else.
//!
//! The helm-controller binds each HelmChart's `helm-<chart>` ServiceAccount cluster-wide to its
//! job role (`--job-cluster-role`). With the agent's chart that role, `shapeblock-helm-job`,
//! grants nothing; the agent binds `shapeblock-helm-release` (what the app and service charts
//! render, and Helm's release storage) to that ServiceAccount in the release's namespace only,
//! before it applies the HelmChart. So a template that ran anyway (the embedded chart renders
//! values as data) could see one project's objects, never the agent's namespace, where its
//! identity Secret lives, nor another tenant's or the system's.

use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::{Patch, PatchParams};

use super::{Context, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, Result};

/// The ClusterRole an install Job gets in its release's namespace.
pub const HELM_RELEASE_ROLE: &str = crate::rbac::HELM_RELEASE_ROLE;

/// The ServiceAccount the helm-controller runs a HelmChart's Jobs as.
pub fn job_service_account(chart: &str) -> String {
    format!("helm-{chart}")
}

/// The RoleBinding in `target` that lets the install Job of HelmChart `agent_namespace/chart`
/// manage its release there.
pub fn role_binding(agent_namespace: &str, chart: &str, target: &str) -> RoleBinding {
    let account = job_service_account(chart);
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(account.clone()),
            namespace: Some(target.to_owned()),
            labels: Some([(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string())].into()),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: HELM_RELEASE_ROLE.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: account,
            namespace: Some(agent_namespace.to_owned()),
            ..Default::default()
        }]),
    }
}

/// Applies [`role_binding`]. It is left in place when the release goes: the uninstall Job
/// needs it, and the namespace takes it along when its Project is deleted.
pub async fn grant(ctx: &Context, chart: &str, target: &str) -> Result<()> {
    let binding = role_binding(&ctx.config.agent_namespace, chart, target);
    Api::<RoleBinding>::namespaced(ctx.client.clone(), target)
        .patch(
            &job_service_account(chart),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&binding),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_names_one_job_account_in_the_agent_namespace_and_lives_in_the_release_namespace() {
        let binding = role_binding("shapeblock", "web-1a2b3c4d", "shop");
        assert_eq!(binding.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(binding.metadata.name.as_deref(), Some("helm-web-1a2b3c4d"));
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(binding.role_ref.name, "shapeblock-helm-release");
        let subjects = binding.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "ServiceAccount");
        assert_eq!(subjects[0].name, "helm-web-1a2b3c4d");
        assert_eq!(subjects[0].namespace.as_deref(), Some("shapeblock"));
    }
}
