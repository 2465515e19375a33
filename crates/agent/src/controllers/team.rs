//! Team controller: one RoleBinding per (team, project) in the project's namespace, binding the
//! team's members to the ShapeBlock ClusterRole of their role there. Bindings the team no
//! longer wants are removed; bindings are never made in namespaces the agent does not own.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::core::{DeserializeGuard, PartialObjectMeta};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::{
    ConditionSet, Context, Error, FIELD_MANAGER, MANAGED_BY, MANAGED_BY_LABEL, PROJECT_LABEL, Result,
    TEAM_LABEL,
};
use crate::api::{SubjectKind, Team, TeamPhase, TeamStatus};
use crate::rbac::team_cluster_role_name;

const KIND: &str = "Team";
/// Finalizer that removes a Team's bindings before the Team goes.
pub const FINALIZER: &str = "apps.shapeblock.io/rolebindings";

/// Runs the Team controller until `shutdown`.
pub async fn run(ctx: Arc<Context>, shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let teams = Api::<DeserializeGuard<Team>>::all(client.clone());
    let bindings = watcher(
        Api::<PartialObjectMeta<RoleBinding>>::all(client.clone()),
        watcher::Config::default().labels(TEAM_LABEL),
    )
    .touched_objects();
    // A project namespace appearing (or going) changes which bindings can exist.
    let namespaces = watcher(
        Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
        watcher::Config::default().labels(PROJECT_LABEL),
    )
    .touched_objects();
    let controller = super::controller(teams, watcher::Config::default(), &ctx).owns_stream(bindings);
    let store = controller.store();
    let teams_of_project = store.clone();
    let controller = controller.watches_stream(namespaces, move |ns: PartialObjectMeta<Namespace>| {
        teams_listing(&teams_of_project, &ns.name_any())
    });
    super::mark_synced_when_ready(ctx.clone(), store.clone());
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(super::log_reconcile_end)
        .await;
}

fn teams_listing(
    store: &Store<DeserializeGuard<Team>>,
    project: &str,
) -> Vec<ObjectRef<DeserializeGuard<Team>>> {
    store
        .state()
        .iter()
        .filter(|guard| match &guard.0 {
            Ok(team) => team.spec.projects.iter().any(|p| p.project == project),
            Err(_) => false,
        })
        .map(|guard| ObjectRef::from_obj(guard.as_ref()))
        .collect()
}

async fn reconcile(guard: Arc<DeserializeGuard<Team>>, ctx: Arc<Context>) -> Result<Action> {
    let _timer = ctx.metrics.reconcile(KIND);
    tracing::debug!(kind = KIND, object = %guard.name_any(), "reconciling");
    let team = match &guard.0 {
        Ok(team) => Arc::new(team.clone()),
        Err(invalid) => return super::report_undecodable::<Team>(&ctx, invalid).await,
    };
    let key = team.name_any();
    let api = Api::<Team>::all(ctx.client.clone());
    let action = finalizer(&api, FINALIZER, team, |event| async {
        match event {
            Finalizer::Apply(team) => apply(&team, &ctx).await,
            Finalizer::Cleanup(team) => cleanup(&team, &ctx).await,
        }
    })
    .await
    .map_err(Error::from)?;
    ctx.reset_retries(&key);
    Ok(action)
}

fn error_policy(guard: Arc<DeserializeGuard<Team>>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.error_action(&guard.name_any(), KIND, error)
}

async fn apply(team: &Team, ctx: &Context) -> Result<Action> {
    let name = team.name_any();
    let namespaces = Api::<Namespace>::all(ctx.client.clone());
    let mut missing = Vec::new();
    let mut desired = Vec::new();
    let owner = team
        .controller_owner_ref(&())
        .expect("a Team read from the apiserver has a name and uid");
    for grant in &team.spec.projects {
        // Only namespaces the agent made for a Project: a Team must never reach kube-system.
        let owned = namespaces
            .get_metadata_opt(&grant.project)
            .await?
            .is_some_and(|ns| {
                ns.labels().get(PROJECT_LABEL) == Some(&grant.project)
                    && ns.labels().get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGED_BY)
                    && ns.metadata.deletion_timestamp.is_none()
            });
        if owned {
            desired.extend(desired_binding(team, &grant.project, grant.role, &owner));
        } else {
            missing.push(grant.project.clone());
        }
    }
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut wanted = BTreeSet::new();
    for binding in &desired {
        let namespace = binding.metadata.namespace.clone().unwrap_or_default();
        Api::<RoleBinding>::namespaced(ctx.client.clone(), &namespace)
            .patch(&binding_name(&name), &params, &Patch::Apply(binding))
            .await?;
        wanted.insert(namespace);
    }
    let removed = remove_bindings(ctx, &name, &wanted).await?;

    let mut conditions = ConditionSet::new(
        team.status
            .as_ref()
            .map(|s| s.conditions.as_slice())
            .unwrap_or_default(),
        team.metadata.generation,
    );
    let (phase, message) = if missing.is_empty() {
        let message = format!(
            "{} member(s) bound in {} project(s)",
            team.spec.members.len(),
            wanted.len()
        );
        conditions.set("Ready", true, "Reconciled", &message);
        (TeamPhase::Ready, message)
    } else {
        let message = format!(
            "project(s) {} do not exist (or are not ShapeBlock projects); their bindings are made when they appear",
            missing.join(", ")
        );
        conditions.set("Ready", false, "ProjectNotFound", &message);
        (TeamPhase::Failed, message)
    };
    let previous_phase = team.status.as_ref().and_then(|s| s.phase);
    let status = TeamStatus {
        phase: Some(phase),
        message: Some(message.clone()),
        member_count: Some(team.spec.members.len() as i32),
        project_count: Some(wanted.len() as i32),
        observed_generation: team.metadata.generation,
        conditions: conditions.conditions,
    };
    let unchanged = team.status.as_ref() == Some(&status);
    let patch = json!({"apiVersion": Team::api_version(&()), "kind": KIND, "status": status});
    if !unchanged {
        Api::<Team>::all(ctx.client.clone())
            .patch_status(&name, &params, &Patch::Apply(patch))
            .await?;
    }
    if previous_phase != Some(phase) || removed > 0 {
        let type_ = if phase == TeamPhase::Ready {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let reason = if phase == TeamPhase::Ready {
            "Bound"
        } else {
            "ProjectNotFound"
        };
        ctx.publish(&team.object_ref(&()), type_, reason, "Bind", &message)
            .await;
    }
    Ok(Action::requeue(ctx.config.resync))
}

async fn cleanup(team: &Team, ctx: &Context) -> Result<Action> {
    remove_bindings(ctx, &team.name_any(), &BTreeSet::new()).await?;
    Ok(Action::await_change())
}

/// Deletes this team's bindings outside `keep` (namespaces). Returns how many went.
async fn remove_bindings(ctx: &Context, team: &str, keep: &BTreeSet<String>) -> Result<usize> {
    let all = Api::<RoleBinding>::all(ctx.client.clone());
    let selector = format!("{TEAM_LABEL}={team},{MANAGED_BY_LABEL}={MANAGED_BY}");
    let existing = all
        .list_metadata(&ListParams::default().labels(&selector))
        .await?;
    let mut removed = 0;
    for binding in existing.items {
        let namespace = binding.namespace().unwrap_or_default();
        if keep.contains(&namespace) {
            continue;
        }
        let api = Api::<RoleBinding>::namespaced(ctx.client.clone(), &namespace);
        if super::delete_if_present(&api, &binding.name_any(), &DeleteParams::default()).await? {
            removed += 1;
        }
    }
    Ok(removed)
}

/// Name of a team's RoleBinding in each of its projects.
pub fn binding_name(team: &str) -> String {
    format!("shapeblock-team-{team}")
}

/// The RoleBinding for one (team, project) grant; `None` when the team has no members.
pub fn desired_binding(
    team: &Team,
    project: &str,
    role: crate::api::TeamRole,
    owner: &OwnerReference,
) -> Option<RoleBinding> {
    if team.spec.members.is_empty() {
        return None;
    }
    let subjects = team
        .spec
        .members
        .iter()
        .map(|member| Subject {
            kind: match member.kind {
                SubjectKind::User => "User",
                SubjectKind::Group => "Group",
            }
            .into(),
            name: member.name.clone(),
            api_group: Some("rbac.authorization.k8s.io".into()),
            namespace: None,
        })
        .collect();
    Some(RoleBinding {
        metadata: ObjectMeta {
            name: Some(binding_name(&team.name_any())),
            namespace: Some(project.into()),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
                (TEAM_LABEL.to_string(), team.name_any()),
                (PROJECT_LABEL.to_string(), project.to_string()),
            ])),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: team_cluster_role_name(role).into(),
        },
        subjects: Some(subjects),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{TeamMember, TeamRole, TeamSpec};

    #[test]
    fn binding_names_members_and_the_role() {
        let mut team = Team::new(
            "backend",
            TeamSpec {
                members: vec![
                    TeamMember {
                        kind: SubjectKind::User,
                        name: "alice".into(),
                    },
                    TeamMember {
                        kind: SubjectKind::Group,
                        name: "devs".into(),
                    },
                ],
                ..Default::default()
            },
        );
        team.metadata.uid = Some("uid".into());
        let owner = team.controller_owner_ref(&()).unwrap();
        let binding = desired_binding(&team, "shop", TeamRole::Developer, &owner).unwrap();
        assert_eq!(binding.role_ref.name, "shapeblock-developer");
        assert_eq!(binding.metadata.namespace.as_deref(), Some("shop"));
        let subjects = binding.subjects.unwrap();
        assert_eq!(
            (subjects[0].kind.as_str(), subjects[0].name.as_str()),
            ("User", "alice")
        );
        assert_eq!(
            (subjects[1].kind.as_str(), subjects[1].name.as_str()),
            ("Group", "devs")
        );
        team.spec.members.clear();
        assert!(desired_binding(&team, "shop", TeamRole::Viewer, &owner).is_none());
    }
}
