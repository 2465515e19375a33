//! `App`: one application in a project, with its source, registry and build strategy.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;

use super::common::{BuildResources, DNS_LABEL_PATTERN, DNS_SUBDOMAIN_PATTERN, conditions_schema};
use super::runtime::{
    ConfigVars, CronEntry, DeploySettings, Domain, DomainStatus, PROCESS_NAME_PATTERN, Process, ReleaseRecord,
};

/// Accepted git URLs: `https://host/path` or SSH (`ssh://[user@]host[:port]/path`,
/// `user@host:path`). Everything else (`file://`, `ext::`, local paths, anything starting with
/// `-`) is refused: git would run commands or read the agent's own files for them.
pub const GIT_URL_PATTERN: &str = r"^(https://[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?/[A-Za-z0-9._~%!$&'()*+,;=:@/-]+|ssh://([A-Za-z0-9._-]+@)?[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?/[A-Za-z0-9._~%/-]+|[A-Za-z0-9._-]+@[A-Za-z0-9][A-Za-z0-9.-]*:[A-Za-z0-9._~%][A-Za-z0-9._~%/-]*)$";

/// A git branch name that git itself accepts and that cannot be read as an option.
pub const GIT_BRANCH_PATTERN: &str = r"^[A-Za-z0-9_][A-Za-z0-9._/-]*$";

/// An image registry host, optionally with port and path prefix (no scheme).
pub const REGISTRY_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*$";

/// A fully qualified image reference: `[registry/]repository[:tag][@digest]`.
pub const IMAGE_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9._/:-]*(@sha256:[a-f0-9]{64})?$";

/// An application of a project. The agent validates its source, generates an SSH deploy key
/// for private repositories without credentials (the public half is in `status.sshPublicKey`),
/// and records what the builds produce.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "apps.shapeblock.io",
    doc = "A ShapeBlock application: git source, registry and build strategy.",
    version = "v1alpha1",
    kind = "App",
    plural = "apps",
    shortname = "sbapp",
    category = "shapeblock",
    namespaced,
    status = "AppStatus",
    derive = "PartialEq",
    validation = Rule::new(super::common::SHORT_NAME_RULE).message(super::common::SHORT_NAME_MESSAGE),
    validation = Rule::new("has(self.spec.git) || self.spec.build.type == 'image'").message("spec.git is required unless spec.build.type is image").field_path(".spec.git").reason(Reason::FieldValueRequired),
    printcolumn(name = "Strategy", type_ = "string", json_path = ".spec.build.type"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Latest Build", type_ = "string", json_path = ".status.latestBuild"),
    printcolumn(name = "Image", type_ = "string", json_path = ".status.currentImage", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    printcolumn(name = "Message", type_ = "string", json_path = ".status.message", priority = 1)
)]
#[serde(rename_all = "camelCase")]
pub struct AppSpec {
    /// Human-readable name shown in the ShapeBlock UI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub display_name: Option<String>,
    /// Free-text description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
    /// Where the source lives. Required unless the build type is `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<GitSource>,
    /// Where built images are pushed and pulled from.
    pub registry: RegistrySpec,
    /// How the source becomes an image. Defaults to a Dockerfile build.
    #[serde(default)]
    pub build: BuildSpec,
    /// BackingServices (in the App's namespace) the App uses. Their connection details reach
    /// the App's containers as variables read from each service's connection Secret
    /// (`<NAME>_HOST`, `_PORT`, `_USERNAME`, `_PASSWORD`, `_DATABASE`, `_URI`, and e.g.
    /// `DATABASE_URL`); changing the list re-deploys the running release.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 20),
        inner(length(min = 1, max = 40), pattern(DNS_LABEL_PATTERN))
    )]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t == s))").message("services must not repeat"))]
    pub services: Vec<String>,
    /// Config vars: plain environment of every process, release command, run and cron entry.
    /// Secret values go in the App's config Secret (`<app>-config`, see
    /// `status.configSecretName`) instead: pods read it, chart values never hold it. Changing
    /// either releases the running image again, without a build.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "config_vars_schema")]
    pub config: ConfigVars,
    /// Process types (`web` and any workers), each a Deployment of the App's image. Without
    /// any, the App runs one `web` process with the image's own command.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "processes_schema")]
    pub processes: BTreeMap<String, Process>,
    /// Command run once per release (builds, config changes, rollbacks) in the new image,
    /// before the new release replaces the old one, e.g. database migrations. If it fails the
    /// old release keeps serving.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 4096)))]
    pub release_command: Vec<String>,
    /// Custom domains of the `web` process.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 50))]
    #[x_kube(validation = Rule::new("self.all(d, self.exists_one(e, e.host == d.host))").message("domains must not repeat"))]
    pub domains: Vec<Domain>,
    /// Scheduled processes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    #[x_kube(validation = Rule::new("self.all(c, self.exists_one(d, d.name == c.name))").message("cron entry names must not repeat"))]
    pub cron: Vec<CronEntry>,
    /// How releases roll out and how domains are served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deploy: Option<DeploySettings>,
}

fn config_vars_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 200,
        "additionalProperties": {"type": "string", "maxLength": 32768},
        "x-kubernetes-validations": [{
            "rule": format!("self.all(k, k.matches('{}'))", super::appbuild::ENV_NAME_PATTERN),
            "message": "config var names are letters, digits and '_', not starting with a digit"
        }]
    })
}

fn processes_schema(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let process = generator.subschema_for::<Process>();
    schemars::json_schema!({
        "type": "object",
        "maxProperties": 10,
        "additionalProperties": process,
        "x-kubernetes-validations": [
            {
                "rule": format!("self.all(k, k.matches('{PROCESS_NAME_PATTERN}'))"),
                "message": "process type names are lowercase letters, digits and '-', at most 20, starting with a letter"
            },
            {
                "rule": "self.all(k, k == 'web' || (!has(self[k].port) && !has(self[k].healthCheck)))",
                "message": "only the web process has a port and a health check"
            }
        ]
    })
}

/// The git repository of an App.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GitSource {
    /// Repository URL: `https://…` or SSH (`ssh://git@host/org/repo.git`, `git@host:org/repo.git`).
    /// `file://`, `ext::`, local paths and option-like values are refused.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new(format!("self.matches('{}')", cel_quote(GIT_URL_PATTERN))).message("must be an https:// URL or an SSH URL (ssh://[user@]host/path or user@host:path); file://, ext::, local paths and option-like values are refused"))]
    pub url: String,
    /// Branch built when an AppBuild names no `gitRef`.
    #[serde(default = "default_branch")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new(format!("self.matches('{GIT_BRANCH_PATTERN}') && !self.contains('..') && !self.endsWith('/') && !self.endsWith('.lock')")).message("must be a git branch name: letters, digits, '_', '.', '/', '-', not starting with '-' or '.'"))]
    pub branch: String,
    /// Secret in the App's namespace with credentials for the clone, made for that purpose by
    /// someone who may write Secrets: label `apps.shapeblock.io/credential: git`, annotation
    /// `apps.shapeblock.io/git-hosts` listing the git host(s) it is for (comma-separated), and
    /// type `kubernetes.io/basic-auth` with `username`/`password` (an HTTPS token) or
    /// `kubernetes.io/ssh-auth` with `ssh-privatekey` and `known_hosts` (SSH). Any other Secret
    /// is refused (`CredentialsNotAllowed`) and nothing of it is used. If unset and `isPrivate`
    /// is true, the agent generates an SSH deploy key and publishes its public half in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub secret_name: Option<String>,
    /// Whether the repository needs credentials to clone.
    #[serde(default)]
    pub is_private: bool,
}

/// Escapes a regular expression for a single-quoted CEL string literal.
pub(crate) fn cel_quote(pattern: &str) -> String {
    pattern.replace('\\', "\\\\").replace('\'', "\\'")
}

fn default_branch() -> String {
    "main".into()
}

/// The image registry of an App.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistrySpec {
    /// Registry host and optional path prefix, without scheme, e.g. `registry.shapeblock.io`.
    /// Images are pushed to `<url>/<project>/<app>:<tag>`.
    #[schemars(length(min = 1, max = 255), pattern(REGISTRY_PATTERN))]
    pub url: String,
    /// Docker-config Secret (type `kubernetes.io/dockerconfigjson`) in the App's namespace used to
    /// push and pull. Defaults to the project's copy of the cluster's registry pull secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), pattern(DNS_SUBDOMAIN_PATTERN))]
    pub secret_name: Option<String>,
}

/// How an App's image is produced.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuildType {
    /// Build the repository's Dockerfile with kaniko.
    #[default]
    Dockerfile,
    /// Build with Cloud Native Buildpacks (the lifecycle `creator` in `builderImage`).
    Buildpack,
    /// Deploy a prebuilt image (`image`); nothing is built.
    Image,
}

/// Build strategy and its settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type != 'image' || has(self.image)").message("build.image is required when build.type is image"),
    validation = Rule::new("self.type == 'image' || !has(self.image)").message("build.image may only be set when build.type is image"),
    validation = Rule::new("self.type == 'buildpack' || !has(self.builderImage)").message("build.builderImage may only be set when build.type is buildpack"),
    validation = Rule::new("self.type == 'dockerfile' || (!has(self.dockerfile) && !has(self.contextDir))").message("build.dockerfile and build.contextDir apply to build.type dockerfile only")
)]
pub struct BuildSpec {
    /// `dockerfile` (kaniko), `buildpack` (Cloud Native Buildpacks) or `image` (prebuilt).
    #[serde(default, rename = "type")]
    pub build_type: BuildType,
    /// Buildpacks builder image. Defaults to the agent's configured Paketo builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), pattern(IMAGE_PATTERN))]
    pub builder_image: Option<String>,
    /// The prebuilt image to deploy (required for, and only for, type `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), pattern(IMAGE_PATTERN))]
    pub image: Option<String>,
    /// Path of the Dockerfile relative to `contextDir`. Defaults to `Dockerfile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.split('/').exists(p, p == '..')").message("must be a relative path inside the repository"))]
    pub dockerfile: Option<String>,
    /// Sub-directory of the repository used as the build context. Defaults to the repository root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.split('/').exists(p, p == '..')").message("must be a relative path inside the repository"))]
    pub context_dir: Option<String>,
    /// Resources for this App's build Jobs. Defaults to the agent's build defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<BuildResources>,
    /// Build deadline in seconds (the Job's `activeDeadlineSeconds`). Defaults to the agent's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 60, max = 86400))]
    pub timeout_seconds: Option<i64>,
}

/// Where an App is in its life.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum AppPhase {
    /// Accepted; no build has been deployed yet.
    #[default]
    Pending,
    /// Source and credentials are in place; ready to build.
    Ready,
    /// A build is running.
    Building,
    /// A build is being deployed.
    Deploying,
    /// The latest build is running.
    Deployed,
    /// Cannot be reconciled; see `message` and conditions.
    Failed,
}

/// Observed state of an App.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AppStatus {
    /// Summary of the conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<AppPhase>,
    /// Human-readable explanation of the phase: what is wrong and what to do about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Name of the most recent AppBuild of this App.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_build: Option<String>,
    /// Image (with digest) that is running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_image: Option<String>,
    /// Image that ran before the current one (the rollback target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_image: Option<String>,
    /// Public half of the generated SSH deploy key: add it to the repository as a read-only
    /// deploy key. The private half stays in a Secret in the App's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_public_key: Option<String>,
    /// Secret holding the clone credentials in use (given or generated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_secret_name: Option<String>,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<Time>,
    /// The `metadata.generation` the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The AppBuild whose image is running now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_build: Option<String>,
    /// The App's config Secret: secret config vars, read by every process as environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_secret_name: Option<String>,
    /// Counts config changes (plain vars or the config Secret); pods carry it as the
    /// `apps.shapeblock.io/config-revision` annotation, so a change rolls them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_revision: Option<u32>,
    /// What `configRevision` was counted from: a hash of the plain vars and the config
    /// Secret's resourceVersion (never of secret values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_fingerprint: Option<String>,
    /// Fingerprint of the App's own release inputs (config revision, processes, domains, cron,
    /// deploy settings, bound services) when the running image was last released.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_fingerprint: Option<String>,
    /// The App's domains and whether each one's certificate is issued.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub domains: Vec<DomainStatus>,
    /// The App's releases, newest last (at most 20 kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releases: Vec<ReleaseRecord>,
    /// `Ready`, `SourceValid`, `CredentialsReady`, `ServicesBound`, `Deployed`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
}
