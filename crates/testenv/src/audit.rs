//! The apiserver's audit log, for counting the requests one client makes (the builds bench's
//! "apiserver requests per build"). Counted by the apiserver, not by the client under test, so
//! a client that miscounts its own requests cannot flatter itself.

use std::collections::BTreeMap;
use std::path::Path;

use super::{Error, Result};

/// Every request at `Metadata` level, one line when its response is complete (a watch is
/// counted when it ends; the ones still open are not in the count).
pub(crate) const POLICY: &str = "\
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived, ResponseStarted]
rules:
- level: Metadata
";

/// Requests of `user` in the audit log at `path`, keyed `"<verb> <resource>[/<subresource>]"`.
pub fn requests_by(path: &Path, user: &str) -> Result<BTreeMap<String, u64>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let mut counts = BTreeMap::new();
    for line in text.lines() {
        // A line being written when we read is cut short: not an event yet.
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if event["user"]["username"].as_str() != Some(user) {
            continue;
        }
        let verb = event["verb"].as_str().unwrap_or("?");
        let object = &event["objectRef"];
        let resource = match (object["resource"].as_str(), object["subresource"].as_str()) {
            (Some(r), Some(s)) => format!("{r}/{s}"),
            (Some(r), None) => r.to_owned(),
            _ => event["requestURI"].as_str().unwrap_or("?").to_owned(),
        };
        *counts.entry(format!("{verb} {resource}")).or_insert(0) += 1;
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_counted_per_verb_and_resource_for_one_user_only() {
        let dir = std::env::temp_dir().join(format!("sb-audit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("audit.log");
        let line = |user: &str, verb: &str, resource: &str, sub: Option<&str>| {
            let mut object = serde_json::json!({"resource": resource});
            if let Some(sub) = sub {
                object["subresource"] = sub.into();
            }
            serde_json::json!({"user": {"username": user}, "verb": verb, "objectRef": object}).to_string()
        };
        let text = [
            line("agent", "get", "apps", None),
            line("agent", "get", "apps", None),
            line("agent", "patch", "appbuilds", Some("status")),
            line("someone", "get", "apps", None),
            "{\"user\": {\"usern".into(),
        ]
        .join("\n");
        std::fs::write(&path, text).unwrap();
        let counts = requests_by(&path, "agent").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            counts.into_iter().collect::<Vec<_>>(),
            [
                ("get apps".to_string(), 2),
                ("patch appbuilds/status".to_string(), 1)
            ]
        );
    }
}
