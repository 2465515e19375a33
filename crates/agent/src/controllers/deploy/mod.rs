//! What several kinds share to deploy an App: the HelmChart in the agent's namespace
//! ([`helmchart`]), the universal chart's values rendered from an App's spec ([`values`]) and
//! whether a Deployment has rolled out a build ([`rollout`]). The AppBuild controller (a new
//! image), the App controller (config and scale on the running image), AppRun (the release's
//! container) and BackingService (a service's chart) use it; it imports no controller.

pub(crate) mod helmchart;
pub(crate) mod pending;
pub(crate) mod rollout;
pub(crate) mod values;

pub use helmchart::{
    BUILD_ANNOTATION, CONTENT_ANNOTATION, HELM_CHART_CRD, OPTIONAL_SPEC_FIELDS, SpecFields,
    check_stored_size, fit_to_served, served_spec_fields, values_content,
};
pub use helmchart::{
    UNIVERSAL_CHART, chart_name, release_status, resource as helm_chart_resource, service_chart_name,
};
pub(crate) use helmchart::{chart_object, helm_chart as helm_chart_object, sha256_hex_prefix};
pub(crate) use rollout::rolled_out;
pub use values::{
    ALLOWED_KEYS, CONFIG_REVISION_ANNOTATION, PROCESS_LABEL, Release, WEB, chart_values, deployment_name,
    launch, processes, pull_secrets_of, release_container, tls_secret_name,
};
pub(crate) use values::{Refused, check_yaml_printable, env_list};
