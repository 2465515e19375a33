//! Binding: an App lists BackingServices in `spec.services`; its web container gets their
//! connection details as `valueFrom.secretKeyRef` variables pointing at each service's
//! connection Secret. Values are never copied into the chart values. (The chart's
//! `envsFromSecret` would prefix the Secret name with the release name, so it cannot point at
//! the agent's Secret; plain `env` entries with `valueFrom` can.)
//!
//! Variables, for a service `orders-db`: `ORDERS_DB_HOST`, `_PORT`, `_USERNAME`, `_PASSWORD`,
//! `_DATABASE`, `_URI`; plus the catalog's alias (`DATABASE_URL`, `REDIS_URL`, ...) when
//! exactly one bound service claims it. A variable the user sets in `env` wins.

use std::collections::{BTreeMap, BTreeSet};

use kube::api::{Api, ListParams};
use serde_json::{Value, json};

use super::catalog::Catalog;
use super::desired::connection_secret_name;
use crate::api::BackingService;

/// Keys of the connection Secret, in the order the variables are listed.
const KEYS: &[&str] = &["host", "port", "username", "password", "database", "uri"];

/// One bound service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub service: String,
    /// The catalog's alias variable for the URI, if any.
    pub alias: Option<String>,
}

/// What an App's `spec.services` resolves to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    pub bound: Vec<Binding>,
    /// Listed services that do not exist (not bound: their pods could not start).
    pub missing: Vec<String>,
}

/// `orders-db` → `ORDERS_DB`; a leading digit gets a `SERVICE_` prefix.
pub fn prefix(service: &str) -> String {
    let upper = service.to_ascii_uppercase().replace('-', "_");
    if upper.starts_with(|c: char| c.is_ascii_digit()) {
        format!("SERVICE_{upper}")
    } else {
        upper
    }
}

/// The environment entries of the bindings.
pub fn binding_env(bindings: &[Binding]) -> Vec<Value> {
    let mut claims: BTreeMap<&str, usize> = BTreeMap::new();
    for alias in bindings.iter().filter_map(|b| b.alias.as_deref()) {
        *claims.entry(alias).or_default() += 1;
    }
    let reference = |service: &str, key: &str| json!({"secretKeyRef": {"name": connection_secret_name(service), "key": key}});
    let mut env = Vec::new();
    for binding in bindings {
        let prefix = prefix(&binding.service);
        for key in KEYS {
            env.push(json!({
                "name": format!("{prefix}_{}", key.to_ascii_uppercase()),
                "valueFrom": reference(&binding.service, key),
            }));
        }
        if let Some(alias) = binding.alias.as_deref().filter(|a| claims[a] == 1) {
            env.push(json!({"name": alias, "valueFrom": reference(&binding.service, "uri")}));
        }
    }
    env
}

/// Replaces the binding variables of every process's and cron entry's container in an App's
/// chart values. The user's variables are `{name, value}` (the values translator allows no
/// `valueFrom`), so every `valueFrom` entry is a binding: the function is idempotent and
/// removes unbound services.
/// Returns whether the values changed.
pub fn apply_bindings(values: &mut Value, env: Vec<Value>) -> bool {
    let mut changed = false;
    // Every process and cron entry uses the services, not only web.
    for section in ["deployments", "cronJobs"] {
        let Some(workloads) = values.get_mut(section).and_then(Value::as_object_mut) else {
            continue;
        };
        for workload in workloads.values_mut() {
            if let Some(container) = workload
                .pointer_mut("/containers/0")
                .and_then(Value::as_object_mut)
            {
                changed |= bind_container(container, &env);
            }
        }
    }
    changed
}

fn bind_container(container: &mut serde_json::Map<String, Value>, env: &[Value]) -> bool {
    let before = container.get("env").cloned();
    let user: Vec<Value> = before
        .as_ref()
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter(|e| e.get("valueFrom").is_none())
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let taken: BTreeSet<String> = user
        .iter()
        .filter_map(|e| e["name"].as_str().map(str::to_owned))
        .collect();
    let mut merged = user;
    merged.extend(
        env.iter()
            .filter(|e| !e["name"].as_str().is_some_and(|n| taken.contains(n)))
            .cloned(),
    );
    if merged.is_empty() {
        container.remove("env");
    } else {
        container.insert("env".into(), Value::Array(merged));
    }
    container.get("env") != before.as_ref()
}

/// Resolves an App's `spec.services` against the BackingServices of its namespace.
pub async fn resolve(
    client: &kube::Client,
    namespace: &str,
    services: &[String],
    catalog: &Catalog,
) -> Result<Resolved, kube::Error> {
    if services.is_empty() {
        return Ok(Resolved::default());
    }
    let existing: BTreeMap<String, BackingService> =
        Api::<BackingService>::namespaced(client.clone(), namespace)
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|s| (kube::ResourceExt::name_any(&s), s))
            .collect();
    let mut resolved = Resolved::default();
    let mut seen = BTreeSet::new();
    for name in services {
        if !seen.insert(name) {
            continue;
        }
        match existing.get(name) {
            Some(service) => resolved.bound.push(Binding {
                service: name.clone(),
                alias: catalog
                    .get(&service.spec.service_type)
                    .and_then(|e| e.binding_alias.clone()),
            }),
            None => resolved.missing.push(name.clone()),
        }
    }
    Ok(resolved)
}

/// Resolves `services` and rewrites the binding variables of an App's chart values. Returns
/// what was resolved and whether the values changed.
pub async fn bind(
    ctx: &crate::controllers::Context,
    namespace: &str,
    services: &[String],
    values: &mut Value,
) -> crate::controllers::Result<(Resolved, bool)> {
    if services.is_empty() {
        // Nothing to resolve, so no catalog to read (every release of every App passes here).
        let changed = apply_bindings(values, binding_env(&[]));
        return Ok((Resolved::default(), changed));
    }
    let catalog = match super::load_catalog(ctx).await? {
        Ok(catalog) => catalog,
        // The BackingServices report a broken override; aliases come from the built-in entries.
        Err(_) => super::catalog::merged(None).expect("the built-in catalog is valid"),
    };
    let resolved = resolve(&ctx.client, namespace, services, &catalog).await?;
    let changed = apply_bindings(values, binding_env(&resolved.bound));
    Ok((resolved, changed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(env: Option<Value>) -> Value {
        let mut container = json!({"name": "web", "image": "x", "imageTag": "1"});
        if let Some(env) = env {
            container["env"] = env;
        }
        json!({"deployments": {"web": {"containers": [container]}}})
    }

    #[test]
    fn bindings_are_secret_key_refs_to_the_connection_secret() {
        let env = binding_env(&[Binding {
            service: "orders-db".into(),
            alias: Some("DATABASE_URL".into()),
        }]);
        let names: Vec<&str> = env.iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "ORDERS_DB_HOST",
                "ORDERS_DB_PORT",
                "ORDERS_DB_USERNAME",
                "ORDERS_DB_PASSWORD",
                "ORDERS_DB_DATABASE",
                "ORDERS_DB_URI",
                "DATABASE_URL"
            ]
        );
        assert_eq!(
            env[6]["valueFrom"],
            json!({"secretKeyRef": {"name": "orders-db-connection", "key": "uri"}})
        );
        assert!(env.iter().all(|e| e.get("value").is_none()), "no copied values");
        assert_eq!(prefix("1cache"), "SERVICE_1CACHE");
    }

    #[test]
    fn an_alias_claimed_twice_is_left_out() {
        let env = binding_env(&[
            Binding {
                service: "a".into(),
                alias: Some("DATABASE_URL".into()),
            },
            Binding {
                service: "b".into(),
                alias: Some("DATABASE_URL".into()),
            },
        ]);
        assert!(!env.iter().any(|e| e["name"] == "DATABASE_URL"));
        assert_eq!(env.len(), 12);
    }

    #[test]
    fn workers_and_cron_entries_are_bound_too() {
        let mut v = values(None);
        v["deployments"]["worker"] = json!({"containers": [{"name": "worker"}]});
        v["cronJobs"] = json!({"nightly": {"containers": [{"name": "nightly"}]}});
        let bindings = [Binding {
            service: "db".into(),
            alias: Some("DATABASE_URL".into()),
        }];
        assert!(apply_bindings(&mut v, binding_env(&bindings)));
        for pointer in [
            "/deployments/web/containers/0/env",
            "/deployments/worker/containers/0/env",
            "/cronJobs/nightly/containers/0/env",
        ] {
            let env = v.pointer(pointer).and_then(Value::as_array).unwrap();
            assert!(env.iter().any(|e| e["name"] == "DATABASE_URL"), "{pointer}");
        }
    }

    #[test]
    fn applying_is_idempotent_keeps_user_variables_and_unbinds() {
        let mut v = values(Some(
            json!([{"name": "DB_HOST", "value": "mine"}, {"name": "NODE_ENV", "value": "production"}]),
        ));
        let bindings = [Binding {
            service: "db".into(),
            alias: None,
        }];
        assert!(apply_bindings(&mut v, binding_env(&bindings)));
        let once = v.clone();
        assert!(
            !apply_bindings(&mut v, binding_env(&bindings)),
            "nothing changes twice"
        );
        assert_eq!(v, once);
        let env = v["deployments"]["web"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(env.len(), 2 + 6 - 1, "the user's DB_HOST wins over the binding's");
        assert_eq!(env[0], json!({"name": "DB_HOST", "value": "mine"}));
        assert!(apply_bindings(&mut v, Vec::new()), "unbinding changes the values");
        assert_eq!(
            v["deployments"]["web"]["containers"][0]["env"],
            json!([{"name": "DB_HOST", "value": "mine"}, {"name": "NODE_ENV", "value": "production"}])
        );
        let mut bare = values(None);
        assert!(!apply_bindings(&mut bare, Vec::new()));
        assert!(bare["deployments"]["web"]["containers"][0].get("env").is_none());
    }
}
