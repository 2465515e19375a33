//! What a `Sync` with `prune` removes: the managed objects in its scope that the desired state
//! does not list, and only while that is no more than the stated share of the managed objects
//! in scope (an empty or truncated desired state would otherwise delete every Project and its
//! namespace). Pure: the bridge lists and deletes, this decides.

use std::collections::HashSet;

use crate::proto::v1::{ObjectRef, PruneScope};
use crate::proto::{DEFAULT_PRUNE_MAX_PERCENT, kind_names, object_key};

/// How many objects a result names before it says "and N more" (a result is one message).
pub const LISTED: usize = 20;

/// Whether `object` (a managed object) is one the scope lets a prune remove.
pub fn in_scope(scope: &PruneScope, object: &ObjectRef) -> bool {
    let namespaced = kind_names(&object.kind).is_some_and(|k| k.namespaced);
    let of_project = scope.projects.iter().any(|project| {
        if namespaced {
            object.namespace == *project
        } else {
            object.kind == "Project" && object.name == *project
        }
    });
    let selected = (!scope.kinds.is_empty() || !scope.namespaces.is_empty())
        && (scope.kinds.is_empty() || scope.kinds.contains(&object.kind))
        && (scope.namespaces.is_empty() || scope.namespaces.contains(&object.namespace));
    of_project || selected
}

/// The objects to remove (namespaced ones before the Projects and Teams), or why none is.
///
/// `managed` is every managed object there is, `wanted` the keys ([`object_key`]) the desired
/// state lists. `max_percent` 0 means [`DEFAULT_PRUNE_MAX_PERCENT`].
pub fn plan(
    scope: &PruneScope,
    managed: &[ObjectRef],
    wanted: &HashSet<String>,
    max_percent: u32,
    force: bool,
) -> Result<Vec<ObjectRef>, String> {
    let scoped: Vec<&ObjectRef> = managed.iter().filter(|o| in_scope(scope, o)).collect();
    let mut remove: Vec<ObjectRef> = scoped
        .iter()
        .filter(|o| !wanted.contains(&object_key(o)))
        .map(|o| (*o).clone())
        .collect();
    remove.sort_by_key(|o| (o.namespace.is_empty(), object_key(o)));
    if force || remove.is_empty() {
        return Ok(remove);
    }
    let (n, of) = (remove.len(), scoped.len());
    if n == of {
        return Err(format!(
            "prune refused: the desired state keeps none of the {of} managed objects in scope, \
             so it would remove all {n} ({}); an empty or truncated desired state is never \
             pruned without force",
            listing(&remove)
        ));
    }
    let max = if max_percent == 0 {
        DEFAULT_PRUNE_MAX_PERCENT
    } else {
        max_percent.min(100)
    };
    if n * 100 > max as usize * of {
        return Err(format!(
            "prune refused: it would remove {n} of the {of} managed objects in scope ({}%), \
             more than the {max}% allowed ({}); send force, or a higher share, to prune them",
            n * 100 / of,
            listing(&remove)
        ));
    }
    Ok(remove)
}

/// `Kind/namespace/name` of each object, at most [`LISTED`] of them.
pub fn listing(objects: &[ObjectRef]) -> String {
    let mut text: Vec<String> = objects.iter().take(LISTED).map(object_key).collect();
    if objects.len() > LISTED {
        text.push(format!("and {} more", objects.len() - LISTED));
    }
    text.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &str, namespace: &str, name: &str) -> ObjectRef {
        ObjectRef::new(kind, namespace, name)
    }

    fn projects(names: &[&str]) -> PruneScope {
        PruneScope {
            projects: names.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    fn keys(objects: &[&ObjectRef]) -> HashSet<String> {
        objects.iter().map(|o| object_key(o)).collect()
    }

    #[test]
    fn a_project_scope_holds_the_project_and_its_namespace_only() {
        let scope = projects(&["shop"]);
        assert!(in_scope(&scope, &object("Project", "", "shop")));
        assert!(in_scope(&scope, &object("App", "shop", "web")));
        assert!(in_scope(&scope, &object("AppRun", "shop", "web-1")));
        assert!(!in_scope(&scope, &object("Project", "", "blog")));
        assert!(!in_scope(&scope, &object("App", "blog", "web")));
        assert!(!in_scope(&scope, &object("Team", "", "shop")));
    }

    #[test]
    fn kinds_and_namespaces_select_together_and_nothing_selects_nothing() {
        let kinds = PruneScope {
            kinds: vec!["Team".into()],
            ..Default::default()
        };
        assert!(in_scope(&kinds, &object("Team", "", "ops")));
        assert!(!in_scope(&kinds, &object("Project", "", "ops")));
        let both = PruneScope {
            kinds: vec!["App".into()],
            namespaces: vec!["shop".into()],
            ..Default::default()
        };
        assert!(in_scope(&both, &object("App", "shop", "web")));
        assert!(!in_scope(&both, &object("App", "blog", "web")));
        assert!(!in_scope(&both, &object("AppBuild", "shop", "web-1")));
        let namespaces = PruneScope {
            namespaces: vec!["shop".into()],
            ..Default::default()
        };
        assert!(in_scope(&namespaces, &object("AppBuild", "shop", "web-1")));
        assert!(!in_scope(&namespaces, &object("Project", "", "shop")));
        let none = PruneScope::default();
        for o in [object("Project", "", "shop"), object("App", "shop", "web")] {
            assert!(!in_scope(&none, &o));
        }
    }

    #[test]
    fn a_prune_removes_only_the_unlisted_objects_in_scope_within_the_share() {
        let (p, a, b) = (
            object("Project", "", "shop"),
            object("App", "shop", "a"),
            object("App", "shop", "b"),
        );
        // Another Project's App is never counted nor removed.
        let managed = [p.clone(), a.clone(), b.clone(), object("App", "blog", "x")];
        let removed = plan(&projects(&["shop"]), &managed, &keys(&[&p, &a]), 0, false).unwrap();
        assert_eq!(removed, std::slice::from_ref(&b));
        // 2 of 3 is above 50%: refused with the count and the names; allowed when forced or
        // with a higher share.
        let refused = plan(&projects(&["shop"]), &managed, &keys(&[&p]), 0, false).unwrap_err();
        assert!(
            refused.contains("remove 2 of the 3") && refused.contains("50%"),
            "{refused}"
        );
        assert!(
            refused.contains("App/shop/a") && refused.contains("App/shop/b"),
            "{refused}"
        );
        assert_eq!(
            plan(&projects(&["shop"]), &managed, &keys(&[&p]), 0, true).unwrap(),
            [a.clone(), b.clone()]
        );
        assert_eq!(
            plan(&projects(&["shop"]), &managed, &keys(&[&p]), 70, false)
                .unwrap()
                .len(),
            2
        );
        // Nothing in scope is kept: refused, even with a share of 100.
        let empty = plan(&projects(&["shop"]), &managed, &HashSet::new(), 100, false).unwrap_err();
        assert!(
            empty.contains("keeps none of the 3") && empty.contains("all 3"),
            "{empty}"
        );
        // Forced: Projects go last, after what is in their namespace.
        let all = plan(&projects(&["shop"]), &managed, &HashSet::new(), 0, true).unwrap();
        assert_eq!(all, [a, b, p]);
        // Nothing to remove is never refused.
        assert!(
            plan(&projects(&["none"]), &managed, &HashSet::new(), 0, false)
                .unwrap()
                .is_empty()
        );
        assert!(
            plan(&PruneScope::default(), &managed, &HashSet::new(), 0, false)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn listings_are_bounded() {
        let many: Vec<ObjectRef> = (0..25).map(|i| object("App", "shop", &format!("a{i}"))).collect();
        let text = listing(&many);
        assert!(text.starts_with("App/shop/a0, "), "{text}");
        assert!(text.ends_with("and 5 more"), "{text}");
        assert_eq!(text.matches("App/").count(), LISTED);
    }
}
