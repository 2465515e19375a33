//! Helm values for the nxs universal chart (2.8.x), generated from an App, a build and the
//! user's `helmValues` in the documented ShapeBlock shape.
//!
//! The chart renders values through `tpl`, so a user string containing `{{` would run as a
//! template with the chart's (cluster-wide) powers; and keys like `extraDeploy`, `hooks` or
//! `serviceAccount` would render arbitrary objects. So user values are an allow-list of
//! ShapeBlock keys that the agent translates; anything else is refused with `InvalidSpec`.

use std::collections::BTreeMap;

use serde_json::{Map, Value, json};

/// The ShapeBlock keys an AppBuild's `helmValues` may use. `replicaCount` is the seed's name
/// for `replicas`.
pub const ALLOWED_KEYS: &[&str] = &["replicas", "replicaCount", "port", "env", "ingress", "resources"];

/// Name of the web process's Deployment key and container (`<app>-web`).
pub const WEB: &str = "web";

/// What the generated values describe.
#[derive(Clone, Debug, PartialEq)]
pub struct Release<'a> {
    pub project: &'a str,
    pub app: &'a str,
    pub build: &'a str,
    /// Full image reference, pinned by digest where one is known.
    pub image: &'a str,
}

/// Why user values were refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("helmValues: {0}")]
pub struct Refused(pub String);

/// Checks the user's values and translates them into the chart's shape.
pub fn chart_values(release: &Release<'_>, user: Option<&Value>) -> Result<Value, Refused> {
    let empty = Map::new();
    let user = match user {
        None | Some(Value::Null) => &empty,
        Some(Value::Object(map)) => map,
        Some(other) => return Err(Refused(format!("must be an object, not {other}"))),
    };
    reject_templates(&Value::Object(user.clone()), "helmValues")?;
    let unknown: Vec<&str> = user
        .keys()
        .map(String::as_str)
        .filter(|k| !ALLOWED_KEYS.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(Refused(format!(
            "unknown or unsafe key(s) {}: allowed are {}",
            unknown.join(", "),
            ALLOWED_KEYS.join(", ")
        )));
    }
    let replicas = match (user.get("replicas"), user.get("replicaCount")) {
        (Some(_), Some(_)) => return Err(Refused("set replicas or replicaCount, not both".into())),
        (Some(v), None) | (None, Some(v)) => integer(v, "replicas", 0, 100)?,
        (None, None) => 1,
    };
    let port = user
        .get("port")
        .map(|v| integer(v, "port", 1, 65535))
        .transpose()?;
    let env = user.get("env").map(env_list).transpose()?.unwrap_or_default();
    let resources = user.get("resources").map(resources).transpose()?;
    let hosts = user
        .get("ingress")
        .map(ingress_hosts)
        .transpose()?
        .unwrap_or_default();
    if !hosts.is_empty() && port.is_none() {
        return Err(Refused("ingress needs a port".into()));
    }

    let (repository, tag) = split_image(release.image);
    let mut container = json!({"name": WEB, "image": repository, "imageTag": tag});
    if !env.is_empty() {
        container["env"] = Value::Array(env);
    }
    if let Some(port) = port {
        container["ports"] = json!([{"name": "http", "containerPort": port}]);
    }
    if let Some(resources) = resources {
        container["resources"] = resources;
    }
    let mut values = json!({
        // Deployment and Service names become `<app>-web`.
        "releasePrefix": release.app,
        "generic": {
            "labels": {
                "apps.shapeblock.io/project": release.project,
                "apps.shapeblock.io/app": release.app,
            },
            "podLabels": {"apps.shapeblock.io/app": release.app},
            // Which build a running pod template belongs to: how "Completed" is decided.
            "podAnnotations": {"apps.shapeblock.io/build": release.build},
            "usePredefinedAffinity": false,
        },
        "deployments": {WEB: {
            "replicas": replicas,
            "extraSelectorLabels": {"apps.shapeblock.io/process": WEB},
            "containers": [container],
        }},
    });
    if let Some(port) = port {
        values["services"] = json!({WEB: {
            "extraSelectorLabels": {"apps.shapeblock.io/process": WEB},
            "ports": [{"name": "http", "port": port, "targetPort": port}],
        }});
    }
    if !hosts.is_empty() {
        let mut ingresses = Map::new();
        for host in hosts {
            ingresses.insert(
                host.clone(),
                json!({"hosts": [{"paths": [{"path": "/", "serviceName": WEB, "servicePort": port}]}]}),
            );
        }
        values["ingresses"] = Value::Object(ingresses);
    }
    Ok(values)
}

/// `repo[:tag][@digest]` → (`repo`, `tag[@digest]`); the chart joins them with `:`.
pub fn split_image(image: &str) -> (String, String) {
    let (name, digest) = match image.split_once('@') {
        Some((name, digest)) => (name, Some(digest)),
        None => (image, None),
    };
    let last_slash = name.rfind('/').map(|i| i + 1).unwrap_or(0);
    let (repository, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], &name[last_slash + i + 1..]),
        None => (name, "latest"),
    };
    let tag = match digest {
        Some(digest) => format!("{tag}@{digest}"),
        None => tag.to_owned(),
    };
    (repository.to_owned(), tag)
}

pub(crate) fn reject_templates(value: &Value, path: &str) -> Result<(), Refused> {
    match value {
        Value::String(s) if s.contains("{{") => Err(Refused(format!(
            "{path} contains '{{{{': templates are not allowed in values"
        ))),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .try_for_each(|(i, v)| reject_templates(v, &format!("{path}[{i}]"))),
        Value::Object(map) => map.iter().try_for_each(|(k, v)| {
            if k.contains("{{") {
                return Err(Refused(format!("{path} has a key containing '{{{{'")));
            }
            reject_templates(v, &format!("{path}.{k}"))
        }),
        _ => Ok(()),
    }
}

fn integer(value: &Value, name: &str, min: i64, max: i64) -> Result<i64, Refused> {
    value.as_i64().filter(|n| (min..=max).contains(n)).ok_or_else(|| {
        Refused(format!(
            "{name} must be an integer from {min} to {max}, not {value}"
        ))
    })
}

/// `env` as a map (the seed's shape) or a list of `{name, value}`.
pub(crate) fn env_list(value: &Value) -> Result<Vec<Value>, Refused> {
    let pairs: Vec<(String, Value)> = match value {
        Value::Object(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Value::Array(items) => items
            .iter()
            .map(
                |item| match (item.get("name").and_then(Value::as_str), item.get("value")) {
                    (Some(name), Some(value)) if item.as_object().is_some_and(|o| o.len() == 2) => {
                        Ok((name.to_owned(), value.clone()))
                    }
                    _ => Err(Refused(format!("env entries are {{name, value}}, not {item}"))),
                },
            )
            .collect::<Result<_, _>>()?,
        other => return Err(Refused(format!("env must be a map or a list, not {other}"))),
    };
    let mut seen = BTreeMap::new();
    for (name, value) in pairs {
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(Refused(format!("env name {name:?} is not a valid variable name")));
        }
        let text = match value {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(Refused(format!(
                    "env {name} must be a string, number or boolean, not {other}"
                )));
            }
        };
        seen.insert(name, text);
    }
    Ok(seen
        .into_iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect())
}

fn resources(value: &Value) -> Result<Value, Refused> {
    let map = value
        .as_object()
        .ok_or_else(|| Refused("resources must be an object".into()))?;
    let mut out = Map::new();
    for (section, quantities) in map {
        if section != "requests" && section != "limits" {
            return Err(Refused(format!("resources.{section}: only requests and limits")));
        }
        let quantities = quantities
            .as_object()
            .ok_or_else(|| Refused(format!("resources.{section} must be an object")))?;
        let mut checked = Map::new();
        for (name, quantity) in quantities {
            if !["cpu", "memory", "ephemeral-storage"].contains(&name.as_str()) {
                return Err(Refused(format!(
                    "resources.{section}.{name}: only cpu, memory, ephemeral-storage"
                )));
            }
            let text = match quantity {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => {
                    return Err(Refused(format!(
                        "resources.{section}.{name} is not a quantity: {other}"
                    )));
                }
            };
            checked.insert(name.clone(), Value::String(text));
        }
        out.insert(section.clone(), Value::Object(checked));
    }
    Ok(Value::Object(out))
}

/// `ingress: {enabled, hosts: [...]}` (the seed's shape) → the hosts, if enabled.
fn ingress_hosts(value: &Value) -> Result<Vec<String>, Refused> {
    let map = value
        .as_object()
        .ok_or_else(|| Refused("ingress must be an object".into()))?;
    if let Some(key) = map.keys().find(|k| *k != "enabled" && *k != "hosts") {
        return Err(Refused(format!("ingress.{key}: only enabled and hosts")));
    }
    if map.get("enabled").and_then(Value::as_bool) == Some(false) {
        return Ok(Vec::new());
    }
    let hosts = map
        .get("hosts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    hosts
        .iter()
        .map(|h| {
            let host = h
                .as_str()
                .ok_or_else(|| Refused(format!("ingress host {h} is not a string")))?;
            let valid = !host.is_empty()
                && host.len() <= 253
                && host.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                });
            if valid {
                Ok(host.to_owned())
            } else {
                Err(Refused(format!("ingress host {host:?} is not a DNS name")))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release() -> Release<'static> {
        Release {
            project: "shop",
            app: "web",
            build: "web-1",
            image: "registry.example.com/shop/web:abc1234@sha256:0123",
        }
    }

    #[test]
    fn the_seeds_values_become_the_charts_shape() {
        let seed = json!({"replicaCount": 2, "env": {"NODE_ENV": "production"}, "port": 8080,
                          "ingress": {"enabled": true, "hosts": ["myapp.example.com"]}});
        let values = chart_values(&release(), Some(&seed)).unwrap();
        let web = &values["deployments"]["web"];
        assert_eq!(web["replicas"], 2);
        let container = &web["containers"][0];
        assert_eq!(container["name"], "web", "containers are always named");
        assert_eq!(container["image"], "registry.example.com/shop/web");
        assert_eq!(
            container["imageTag"], "abc1234@sha256:0123",
            "the digest is pinned"
        );
        assert_eq!(
            container["env"],
            json!([{"name": "NODE_ENV", "value": "production"}])
        );
        assert_eq!(values["services"]["web"]["ports"][0]["port"], 8080);
        assert_eq!(
            values["ingresses"]["myapp.example.com"]["hosts"][0]["paths"][0]["servicePort"],
            8080
        );
        assert_eq!(
            values["generic"]["podAnnotations"]["apps.shapeblock.io/build"],
            "web-1"
        );
        assert_eq!(values["releasePrefix"], "web");
    }

    #[test]
    fn templates_unknown_and_dangerous_keys_are_refused() {
        for (user, why) in [
            (
                json!({"env": {"X": "{{ .Release.Name }}"}}),
                "templates are not allowed",
            ),
            (
                json!({"extraDeploy": [{"kind": "ClusterRoleBinding"}]}),
                "unknown or unsafe key(s) extraDeploy",
            ),
            (json!({"hooks": {}}), "unknown or unsafe key(s) hooks"),
            (json!({"serviceAccount": {"create": true}}), "unknown or unsafe"),
            (
                json!({"replicas": 1000}),
                "replicas must be an integer from 0 to 100",
            ),
            (json!({"replicas": 1, "replicaCount": 2}), "not both"),
            (json!({"env": {"1X": "a"}}), "not a valid variable name"),
            (
                json!({"resources": {"limits": {"nvidia.com/gpu": "1"}}}),
                "only cpu, memory",
            ),
            (
                json!({"ingress": {"hosts": ["a.example.com"]}}),
                "ingress needs a port",
            ),
            (
                json!({"ingress": {"hosts": ["Not A Host"]}, "port": 80}),
                "not a DNS name",
            ),
            (json!("replicas: 3"), "must be an object"),
        ] {
            let err = chart_values(&release(), Some(&user)).unwrap_err();
            assert!(err.0.contains(why), "{user}: {err}");
        }
    }

    #[test]
    fn no_values_give_one_replica_and_no_service() {
        let values = chart_values(&release(), None).unwrap();
        assert_eq!(values["deployments"]["web"]["replicas"], 1);
        assert!(values.get("services").is_none());
    }

    #[test]
    fn image_references_split_for_the_chart() {
        assert_eq!(split_image("nginx"), ("nginx".into(), "latest".into()));
        assert_eq!(split_image("nginx:1.27"), ("nginx".into(), "1.27".into()));
        assert_eq!(
            split_image("reg:5000/a/b:v1"),
            ("reg:5000/a/b".into(), "v1".into())
        );
        assert_eq!(
            split_image("reg:5000/a/b@sha256:ff"),
            ("reg:5000/a/b".into(), "latest@sha256:ff".into())
        );
    }
}
