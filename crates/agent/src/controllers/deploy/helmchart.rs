//! The HelmChart (helm.cattle.io/v1) that deploys an App: in the agent's own namespace, never
//! the tenant's. The k3s helm-controller binds a `helm-<name>` ServiceAccount in the
//! HelmChart's namespace to its job role cluster-wide; in a tenant namespace any pod naming that
//! ServiceAccount would get that role. Only the agent can create pods in its namespace.

use std::collections::BTreeMap;

use base64::Engine;
use kube::api::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};

use crate::controllers::{APP_LABEL, MANAGED_BY, MANAGED_BY_LABEL, PROJECT_LABEL};

/// The nxs universal chart 2.8.1 (Apache-2.0), shipped with the agent so that air-gapped
/// clusters need no chart repository; patched by `build.rs` so that it renders values as data,
/// never through `tpl` (`assets/universal-chart-patch/`).
pub const UNIVERSAL_CHART: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/universal-chart.tgz"));

/// Annotation on a HelmChart: the AppBuild it deploys.
pub const BUILD_ANNOTATION: &str = "apps.shapeblock.io/build";
/// Annotation on a HelmChart the agent applies: a fingerprint of its chart and values, so that
/// applying the same release again costs a metadata read instead of a patch that carries the
/// whole chart.
pub const CONTENT_ANNOTATION: &str = "apps.shapeblock.io/content";

pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("helm.cattle.io", "v1", "HelmChart"),
        "helmcharts",
    )
}

/// The HelmChart's name, which is also the Helm release name: the App name and a short hash of
/// the project, so that it is unique in the agent's namespace and stays within Helm's 53.
pub fn chart_name(project: &str, app: &str) -> String {
    named(project.as_bytes(), app)
}

/// The HelmChart (and release) name of a BackingService: like an App's, but hashed with a
/// different input, so that an App and a BackingService of the same name never share one.
pub fn service_chart_name(project: &str, service: &str) -> String {
    named(format!("service:{project}").as_bytes(), service)
}

fn named(salt: &[u8], name: &str) -> String {
    format!("{name}-{}", sha256_hex_prefix(salt, 4))
}

/// The first `bytes` bytes of the SHA-256 of `input`, in hex: short, stable names and
/// fingerprints.
pub(crate) fn sha256_hex_prefix(input: &[u8], bytes: usize) -> String {
    use std::fmt::Write;
    let digest = ring::digest::digest(&ring::digest::SHA256, input);
    digest.as_ref()[..bytes].iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// Fingerprint of the embedded chart and `values_content`.
fn content_fingerprint(values_content: &str) -> String {
    let mut input = UNIVERSAL_CHART.to_vec();
    input.extend_from_slice(values_content.as_bytes());
    sha256_hex_prefix(&input, 16)
}

/// The HelmChart for one App's release.
pub fn helm_chart(
    agent_namespace: &str,
    project: &str,
    app: &str,
    build: &str,
    values: &Value,
) -> DynamicObject {
    let labels = BTreeMap::from([(APP_LABEL.to_string(), app.to_string())]);
    let annotations = BTreeMap::from([(BUILD_ANNOTATION.to_string(), build.to_string())]);
    chart_object(
        agent_namespace,
        &chart_name(project, app),
        project,
        labels,
        annotations,
        values,
    )
}

/// A HelmChart of the embedded universal chart in the agent's namespace, installing into
/// `project`. `labels` come on top of the managed-by and project labels (the project's
/// deletion removes its charts by them).
pub(crate) fn chart_object(
    agent_namespace: &str,
    name: &str,
    project: &str,
    mut labels: BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    values: &Value,
) -> DynamicObject {
    labels.insert(MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string());
    labels.insert(PROJECT_LABEL.to_string(), project.to_string());
    let values = values_content(values);
    let mut annotations = annotations;
    annotations.insert(CONTENT_ANNOTATION.to_string(), content_fingerprint(&values));
    let object = json!({
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChart",
        "metadata": {
            "name": name,
            "namespace": agent_namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "chartContent": base64::engine::general_purpose::STANDARD.encode(UNIVERSAL_CHART),
            "targetNamespace": project,
            "valuesContent": values,
            // `retry`: a failed upgrade leaves the serving release alone and the next change
            // (the next build) is tried again. `reinstall` would uninstall a live release;
            // `abort` would block every later deploy until an administrator acts.
            "failurePolicy": "retry",
            // A handful of attempts, not the controller's default thousand.
            "backOffLimit": 3,
            "timeout": "5m",
        },
    });
    serde_json::from_value(object).expect("a HelmChart is a valid object")
}

pub use crate::names::HELM_CHART_CRD;

/// Fields of the HelmChart spec the agent writes that older helm-controllers do not have
/// (`failurePolicy` came to `HelmChart.spec` long after the kind; a k3s embedding an older
/// controller serves a CRD without it). The apiserver refuses an applied object with a field
/// its structural schema does not declare, so each is left out where the served CRD lacks it.
/// The rest of what the agent writes (`chartContent`, `targetNamespace`, `valuesContent`) is
/// what a HelmChart is.
pub const OPTIONAL_SPEC_FIELDS: &[&str] = &["failurePolicy", "backOffLimit", "timeout"];

/// What the served HelmChart CRD's `spec` accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecFields {
    /// Whatever is sent (no schema, or unknown fields preserved), or not known.
    Any,
    /// Only these fields.
    Declared(std::collections::BTreeSet<String>),
}

impl SpecFields {
    /// The optional fields the agent must leave out.
    pub fn missing(&self) -> Vec<&'static str> {
        match self {
            SpecFields::Any => Vec::new(),
            SpecFields::Declared(fields) => OPTIONAL_SPEC_FIELDS
                .iter()
                .copied()
                .filter(|f| !fields.contains(*f))
                .collect(),
        }
    }
}

/// The spec fields the served `v1` version of the HelmChart CRD declares.
pub fn served_spec_fields(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
) -> SpecFields {
    let Some(version) = crd.spec.versions.iter().find(|v| v.name == "v1" && v.served) else {
        return SpecFields::Any;
    };
    let spec = version
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| s.properties.as_ref())
        .and_then(|p| p.get("spec"));
    match spec {
        Some(spec) if spec.x_kubernetes_preserve_unknown_fields != Some(true) => match &spec.properties {
            Some(properties) => SpecFields::Declared(properties.keys().cloned().collect()),
            None => SpecFields::Any,
        },
        _ => SpecFields::Any,
    }
}

/// Leaves out of `chart` the optional spec fields `served` lacks.
pub fn fit_to_served(chart: &mut DynamicObject, served: &SpecFields) {
    if let Some(spec) = chart.data.get_mut("spec").and_then(Value::as_object_mut) {
        for field in served.missing() {
            spec.remove(field);
        }
    }
}

/// Most data a Secret or ConfigMap holds (the apiserver refuses more).
pub const SECRET_DATA_LIMIT: usize = 1024 * 1024;
/// Most `valuesContent` the agent writes. The helm-controller copies it into the Secret
/// `chart-values-<name>` (beside its own small values file); above 1 MiB it cannot, and the
/// release never comes. The headroom is for that second file and the keys.
pub const MAX_VALUES_BYTES: usize = SECRET_DATA_LIMIT - 64 * 1024;
/// Most size of a HelmChart as stored: etcd takes requests of up to 1.5 MiB by default, and
/// the object carries the chart (`chartContent`), the escaped values and its managed fields.
pub const MAX_CHART_OBJECT_BYTES: usize = 1536 * 1024 - 128 * 1024;

/// Whether the helm-controller can store what `chart` asks of it: its values in the Secret
/// `chart-values-<name>`, its chart in the ConfigMap `chart-content-<name>`, and the HelmChart
/// itself. Otherwise why not, with the sizes: an install that cannot be stored never starts,
/// and nothing else would say so.
pub fn check_stored_size(chart: &DynamicObject) -> Result<(), String> {
    let spec = &chart.data["spec"];
    let values = spec["valuesContent"].as_str().map_or(0, str::len);
    let content = spec["chartContent"].as_str().map_or(0, str::len);
    let object = serde_json::to_vec(chart).map_or(usize::MAX, |bytes| bytes.len());
    let kib = |bytes: usize| bytes.div_ceil(1024);
    if values > MAX_VALUES_BYTES {
        return Err(format!(
            "the chart values are {} KiB ({values} bytes), over the {} KiB the helm-controller can store \
             (its values Secret chart-values-{} holds at most 1 MiB), so the release would never be made. \
             Config vars are repeated in every process, cron entry and release command: use fewer or \
             shorter ones, or put large ones in the App's config Secret (read as a whole, not copied)",
            kib(values),
            kib(MAX_VALUES_BYTES),
            chart.metadata.name.as_deref().unwrap_or_default(),
        ));
    }
    if content > MAX_VALUES_BYTES {
        return Err(format!(
            "the chart archive is {} KiB, over the {} KiB its ConfigMap can hold",
            kib(content),
            kib(MAX_VALUES_BYTES)
        ));
    }
    if object > MAX_CHART_OBJECT_BYTES {
        return Err(format!(
            "the HelmChart would be {} KiB (chart {} KiB, values {} KiB), over the {} KiB the apiserver \
             stores in one object: use fewer or shorter config vars",
            kib(object),
            kib(content),
            kib(values),
            kib(MAX_CHART_OBJECT_BYTES)
        ));
    }
    Ok(())
}

/// `valuesContent` as JSON, which is YAML too. Not serde_yaml's YAML: it writes YAML 1.2, where
/// `yes`, `on` or `no` are plain strings and need no quotes, but Helm reads values as YAML 1.1,
/// where unquoted they are booleans; an env value or argument `"yes"` would arrive as `true`
/// and the workload be refused. JSON quotes every string.
pub fn values_content(values: &Value) -> String {
    // Helm reads this JSON as YAML 1.1, where U+2028 and U+2029 are line breaks even inside
    // quotes (folded away); escaped, they arrive as written. They occur only inside strings.
    serde_json::to_string_pretty(values)
        .expect("JSON values serialize")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

/// The status (`deployed`, `failed`, `pending-install`, ...) of the newest revision of a Helm
/// release, from Helm's own release Secrets (labelled `owner=helm,name=<release>`).
pub async fn release_status(
    client: &kube::Client,
    namespace: &str,
    release: &str,
) -> Result<Option<String>, kube::Error> {
    Ok(newest_release(client, namespace, release)
        .await?
        .map(|(_, status)| status))
}

/// The newest revision of a Helm release and its status (`deployed`, `failed`, ...), from
/// the release records Helm keeps as Secrets.
pub async fn newest_release(
    client: &kube::Client,
    namespace: &str,
    release: &str,
) -> Result<Option<(u32, String)>, kube::Error> {
    let records = super::pending::revisions(client, namespace, release).await?;
    Ok(super::pending::newest(&records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crd(
        spec: Value,
    ) -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
        serde_json::from_value(json!({
            "metadata": {"name": HELM_CHART_CRD},
            "spec": {"group": "helm.cattle.io", "scope": "Namespaced",
                "names": {"plural": "helmcharts", "kind": "HelmChart"},
                "versions": [{"name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": spec}}}}]},
        }))
        .unwrap()
    }

    #[test]
    fn fields_the_served_crd_lacks_are_left_out() {
        let current = crd(json!({"type": "object", "properties": {
            "chart": {"type": "string"}, "chartContent": {"type": "string"}, "targetNamespace": {"type": "string"},
            "valuesContent": {"type": "string"}, "failurePolicy": {"type": "string"},
            "backOffLimit": {"type": "integer"}, "timeout": {"type": "string"}}}));
        assert!(served_spec_fields(&current).missing().is_empty());
        let mut chart = helm_chart("shapeblock", "shop", "web", "web-1", &json!({}));
        fit_to_served(&mut chart, &served_spec_fields(&current));
        assert_eq!(chart.data["spec"]["failurePolicy"], "retry");

        let older = crd(json!({"type": "object", "properties": {
            "chart": {"type": "string"}, "chartContent": {"type": "string"}, "targetNamespace": {"type": "string"},
            "valuesContent": {"type": "string"}, "backOffLimit": {"type": "integer"}, "timeout": {"type": "string"}}}));
        let served = served_spec_fields(&older);
        assert_eq!(served.missing(), ["failurePolicy"]);
        fit_to_served(&mut chart, &served);
        let spec = chart.data["spec"].as_object().unwrap();
        assert!(!spec.contains_key("failurePolicy"));
        assert_eq!(spec["backOffLimit"], 3);
        assert_eq!(spec["targetNamespace"], "shop");

        // No schema to go by: everything is sent, as before.
        let open = crd(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
        assert_eq!(served_spec_fields(&open), SpecFields::Any);
        let mut unserved = older.clone();
        unserved.spec.versions[0].served = false;
        assert_eq!(served_spec_fields(&unserved), SpecFields::Any);
    }

    #[test]
    fn names_fit_helm_and_differ_per_project() {
        let name = chart_name(&"p".repeat(63), &"a".repeat(40));
        assert!(name.len() <= 53, "{name}");
        assert_ne!(chart_name("shop", "web"), chart_name("blog", "web"));
        assert_ne!(chart_name("shop", "db"), service_chart_name("shop", "db"));
        assert!(service_chart_name(&"p".repeat(63), &"a".repeat(40)).len() <= 53);
    }

    #[test]
    fn chart_targets_the_project_from_the_agents_namespace() {
        let chart = helm_chart("shapeblock", "shop", "web", "web-1", &json!({"deployments": {}}));
        assert_eq!(chart.metadata.namespace.as_deref(), Some("shapeblock"));
        assert_eq!(chart.data["spec"]["targetNamespace"], "shop");
        assert_eq!(chart.data["spec"]["failurePolicy"], "retry");
        assert!(chart.data["spec"]["chartContent"].as_str().unwrap().len() > 1000);
        assert_eq!(chart.metadata.annotations.unwrap()[BUILD_ANNOTATION], "web-1");
    }

    #[test]
    fn what_the_helm_controller_cannot_store_is_refused_with_the_sizes() {
        let with = |bytes: usize| {
            helm_chart(
                "shapeblock",
                "shop",
                "web",
                "web-1",
                &json!({"deployments": {"web": {"env": [{"name": "A", "value": "x".repeat(bytes)}]}}}),
            )
        };
        assert_eq!(check_stored_size(&with(1000)), Ok(()));
        // valuesContent is the pretty JSON around the value: about 100 bytes more.
        assert_eq!(check_stored_size(&with(MAX_VALUES_BYTES - 200)), Ok(()));
        let err = check_stored_size(&with(MAX_VALUES_BYTES + 1)).unwrap_err();
        assert!(
            err.contains("960 KiB") && err.contains("chart-values-web-"),
            "{err}"
        );
        let err = check_stored_size(&with(2 * SECRET_DATA_LIMIT)).unwrap_err();
        assert!(err.contains("2049 KiB"), "{err}");
        // Escaping counts: quotes double in the object, not in valuesContent.
        let quotes = helm_chart(
            "shapeblock",
            "shop",
            "web",
            "web-1",
            &json!({"env": [{"name": "A", "value": "\"".repeat(700 * 1024)}]}),
        );
        let values = quotes.data["spec"]["valuesContent"].as_str().unwrap().len();
        assert!(values > 1400 * 1024 && values <= 1500 * 1024, "{values}");
        assert!(check_stored_size(&quotes).unwrap_err().contains("values Secret"));
        let half = helm_chart(
            "shapeblock",
            "shop",
            "web",
            "web-1",
            &json!({"env": [{"name": "A", "value": "\"".repeat(300 * 1024)}]}),
        );
        assert_eq!(
            check_stored_size(&half),
            Ok(()),
            "600 KiB of values, 1.2 MiB object"
        );
        let escaped = helm_chart(
            "shapeblock",
            "shop",
            "web",
            "web-1",
            &json!({"env": [{"name": "A", "value": "\"".repeat(400 * 1024)}]}),
        );
        let err = check_stored_size(&escaped).unwrap_err();
        assert!(
            err.contains("HelmChart would be") && err.contains("values 801 KiB"),
            "{err}"
        );
    }

    #[test]
    fn values_content_quotes_strings_helm_would_read_as_booleans() {
        let values = json!({"env": [{"name": "FLAG", "value": "yes"}], "args": ["--appendonly", "on", "no"]});
        let content = values_content(&values);
        for word in ["yes", "on", "no"] {
            assert!(content.contains(&format!("\"{word}\"")), "{content}");
        }
        let parsed: Value = serde_yaml::from_str(&content).unwrap();
        assert_eq!(parsed, values, "YAML readers read it back unchanged");
    }
}
