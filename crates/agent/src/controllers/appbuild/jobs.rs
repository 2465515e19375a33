//! Build Jobs: resolving a git ref to a commit, and building an image with kaniko or Cloud
//! Native Buildpacks. Pure functions of the App, the AppBuild and the agent's settings.
//!
//! Pod Security: project namespaces enforce `baseline`. Kaniko must run as root to unpack
//! image layers (allowed by `baseline`, no privilege, no extra capabilities); the buildpacks
//! lifecycle starts as root and drops to the builder's user itself, after the sources are
//! handed to that user; the clone runs as the git image's user (root: OpenSSH refuses a uid
//! the image's passwd does not name).
//!
//! One file past 600 lines on purpose: the resolve Job, the two build Jobs and the release Job
//! are one contract (the same pod skeleton, volumes, scripts and settings), and most of the
//! length is the unit tests that pin it.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, KeyToPath, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

use crate::api::{App, AppBuild, BuildResources, BuildType};
use crate::controllers::jobs::run_once;
pub(crate) use crate::controllers::jobs::{AppJob, RELEASE_CONTAINER, RELEASE_DEADLINE_SECONDS, app_job};
use crate::controllers::{APP_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use kube::ResourceExt;

/// Label on build Jobs (and their pods) naming the AppBuild.
pub const BUILD_LABEL: &str = "apps.shapeblock.io/build";
/// Label telling resolve Jobs from build Jobs.
pub const STEP_LABEL: &str = "apps.shapeblock.io/step";
pub const CLONE_CONTAINER: &str = "clone";
pub const BUILD_CONTAINER: &str = "build";
pub const RESOLVE_CONTAINER: &str = "resolve";
const WORKSPACE: &str = "/workspace";

/// Images and defaults for builds; set by the agent's flags.
#[derive(Clone, Debug)]
pub struct BuildSettings {
    /// Image with `git` and `ssh` for the resolve and clone steps.
    pub git_image: String,
    /// Kaniko executor: Chainguard's maintained fork by default (upstream was archived in 2025).
    pub kaniko_image: String,
    /// Buildpacks builder used when an App names none.
    pub builder_image: String,
    /// Build deadline when neither the AppBuild nor the App sets one.
    pub timeout_seconds: i64,
    /// Build resources when neither the AppBuild nor the App sets them.
    pub resources: BuildResources,
    /// Jobs are deleted by the agent once their result is recorded; this is only a backstop.
    pub ttl_seconds_after_finished: i32,
    /// Build logs go to the hub (the tunnel is on): a Job is kept until its pod's logs are
    /// delivered, not only until its result is recorded.
    pub relay_logs: bool,
    /// History: Completed AppBuilds kept per App.
    pub keep_succeeded: usize,
    /// History: Failed and Cancelled AppBuilds kept per App.
    pub keep_failed: usize,
    /// cert-manager ClusterIssuer of App domains that name none.
    pub certificate_issuer: String,
    /// A deploy fails (`DeployTimeout`) after the App's `progressDeadlineSeconds` plus this
    /// many seconds, the time allowed for the helm-controller's install Job.
    pub deploy_margin_seconds: u64,
}

impl Default for BuildSettings {
    fn default() -> Self {
        use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
        Self {
            git_image: "alpine/git:v2.47.2".into(),
            kaniko_image: "cgr.dev/chainguard/kaniko:latest".into(),
            builder_image: "paketobuildpacks/builder-jammy-base:latest".into(),
            timeout_seconds: 1800,
            resources: BuildResources {
                requests: BTreeMap::from([
                    ("cpu".to_string(), Quantity("500m".into())),
                    ("memory".to_string(), Quantity("1Gi".into())),
                ]),
                limits: BTreeMap::from([("memory".to_string(), Quantity("2Gi".into()))]),
            },
            ttl_seconds_after_finished: 24 * 3600,
            relay_logs: false,
            keep_succeeded: 10,
            keep_failed: 5,
            certificate_issuer: "letsencrypt".into(),
            deploy_margin_seconds: 600,
        }
    }
}

/// Where the built image goes: `<registry>/<project>/<app>:<tag>`.
pub fn destination(app: &App, tag: &str) -> String {
    format!(
        "{}/{}/{}:{tag}",
        app.spec.registry.url,
        app.namespace().unwrap_or_default(),
        app.name_any()
    )
}

/// The tag of a build: `imageTag`, else the short commit.
pub fn image_tag(build: &AppBuild, commit: &str) -> String {
    build
        .spec
        .image_tag
        .clone()
        .unwrap_or_else(|| commit.chars().take(12).collect())
}

/// Fingerprint of everything that determines a build's image: the same fingerprint means the
/// same image, so it can be reused instead of built again. Resources and timeouts are left out
/// (they change how a build runs, not what it makes).
pub fn inputs_hash(app: &App, build: &AppBuild, commit: &str, settings: &BuildSettings) -> String {
    let spec = &app.spec.build;
    let mut vars: Vec<(&str, &str)> = build
        .spec
        .build_vars
        .iter()
        .map(|v| (v.key.as_str(), v.value.as_str()))
        .collect();
    vars.sort_unstable();
    let builder = match spec.build_type {
        BuildType::Buildpack => spec
            .builder_image
            .clone()
            .unwrap_or_else(|| settings.builder_image.clone()),
        _ => settings.kaniko_image.clone(),
    };
    let inputs = serde_json::json!({
        "type": spec.build_type,
        "git": app.spec.git.as_ref().map(|g| &g.url),
        "commit": commit,
        "dockerfile": spec.dockerfile,
        "contextDir": spec.context_dir,
        "builder": builder,
        "buildVars": vars,
        "destination": destination(app, &image_tag(build, commit)),
    });
    let digest = ring::digest::digest(&ring::digest::SHA256, inputs.to_string().as_bytes());
    format!("sha256:{}", crate::proto::hex(digest.as_ref()))
}

/// The ref to resolve: the AppBuild's, else the App's branch.
pub fn git_ref(app: &App, build: &AppBuild) -> String {
    build
        .spec
        .git_ref
        .clone()
        .or_else(|| app.spec.git.as_ref().map(|g| g.branch.clone()))
        .unwrap_or_else(|| "main".into())
}

pub fn resolve_job_name(build: &AppBuild) -> String {
    format!("{}-resolve", build.name_any())
}

pub fn build_job_name(build: &AppBuild) -> String {
    format!("{}-build", build.name_any())
}

/// The build Job's deadline: the AppBuild's, the App's, or the agent's default.
pub fn build_deadline(app: &App, build: &AppBuild, settings: &BuildSettings) -> i64 {
    build
        .spec
        .timeout_seconds
        .or(app.spec.build.timeout_seconds)
        .unwrap_or(settings.timeout_seconds)
}

/// A Job that resolves the ref to a commit SHA with `git ls-remote` and reports it as its
/// termination message.
pub fn resolve_job(
    app: &App,
    build: &AppBuild,
    git_secret: Option<&str>,
    owner: &OwnerReference,
    settings: &BuildSettings,
) -> Job {
    let script = guarded(RESOLVE_BODY);
    let mut container = git_container(RESOLVE_CONTAINER, app, build, git_secret, settings, &script);
    container
        .env
        .get_or_insert_default()
        .push(env("GIT_REF", &git_ref(app, build)));
    job(
        app,
        build,
        &resolve_job_name(build),
        "resolve",
        owner,
        settings,
        vec![],
        container,
        git_volumes(app, git_secret),
        None,
        300,
    )
}

/// The build Job for the `dockerfile` and `buildpack` strategies: clone at `commit`, then
/// build and push; the digest (and for buildpacks the process types) come back as the build
/// container's termination message. `registry_secret` (a docker config) is mounted into the
/// build container only: the clone step, which runs before anything is checked out, never
/// sees it.
pub fn build_job(
    app: &App,
    build: &AppBuild,
    commit: &str,
    git_secret: Option<&str>,
    registry_secret: &str,
    owner: &OwnerReference,
    settings: &BuildSettings,
) -> Job {
    let clone_script = CLONE_BODY.replace("PROCFILE_TO_JSON", PROCFILE_TO_JSON);
    let buildpack = app.spec.build.build_type == BuildType::Buildpack;
    let mut clone = git_container(
        CLONE_CONTAINER,
        app,
        build,
        git_secret,
        settings,
        &guarded(&clone_script),
    );
    clone.env.get_or_insert_default().push(env("COMMIT", commit));
    let destination = destination(app, &image_tag(build, commit));
    let cache = format!(
        "{}/{}/{}/cache",
        app.spec.registry.url,
        app.namespace().unwrap_or_default(),
        app.name_any()
    );
    let resources = build
        .spec
        .resources
        .clone()
        .or_else(|| app.spec.build.resources.clone())
        .unwrap_or_else(|| settings.resources.clone());
    let mut main = if buildpack {
        buildpack_container(app, build, &destination, &cache, settings)
    } else {
        kaniko_container(app, build, &destination, &cache, settings)
    };
    main.resources = Some(ResourceRequirements {
        requests: (!resources.requests.is_empty()).then_some(resources.requests.clone()),
        limits: (!resources.limits.is_empty()).then_some(resources.limits.clone()),
        ..Default::default()
    });
    let mut volumes = git_volumes(app, git_secret);
    volumes.push(Volume {
        name: "registry".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(registry_secret.into()),
            items: Some(vec![KeyToPath {
                key: ".dockerconfigjson".into(),
                path: "config.json".into(),
                mode: None,
            }]),
            ..Default::default()
        }),
        ..Default::default()
    });
    let deadline = build_deadline(app, build, settings);
    job(
        app,
        build,
        &build_job_name(build),
        "build",
        owner,
        settings,
        vec![clone],
        main,
        volumes,
        None,
        deadline,
    )
}

fn kaniko_container(
    app: &App,
    build: &AppBuild,
    destination: &str,
    cache: &str,
    settings: &BuildSettings,
) -> Container {
    let context = app.spec.build.context_dir.as_deref().unwrap_or(".");
    let mut args = vec![
        format!("--context=dir://{WORKSPACE}/src/{context}"),
        format!(
            "--dockerfile={}",
            app.spec.build.dockerfile.as_deref().unwrap_or("Dockerfile")
        ),
        format!("--destination={destination}"),
        "--cache=true".into(),
        format!("--cache-repo={cache}"),
        // The digest comes back in the pod's termination message: nothing queries the registry.
        "--digest-file=/dev/termination-log".into(),
        // Kaniko colours its log by default (ANSI escapes even without a terminal), which a
        // failure message and the relayed build log would carry verbatim (seen on the real
        // node).
        "--log-format=text".into(),
    ];
    args.extend(
        build
            .spec
            .build_vars
            .iter()
            .map(|v| format!("--build-arg={}={}", v.key, v.value)),
    );
    Container {
        name: BUILD_CONTAINER.into(),
        image: Some(settings.kaniko_image.clone()),
        args: Some(args),
        env: Some(vec![env("DOCKER_CONFIG", "/kaniko/.docker")]),
        volume_mounts: Some(vec![
            mount("workspace", WORKSPACE, false),
            mount("registry", "/kaniko/.docker", true),
        ]),
        // kaniko writes the digest file only when it gets to the push: a failure before it
        // leaves the file empty, and the kubelet then makes the log's tail the message (kaniko
        // prints its final error last). See `failure.rs`.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            // Kaniko unpacks image layers as root; it needs no privilege and no capabilities.
            run_as_user: Some(0),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn buildpack_container(
    app: &App,
    build: &AppBuild,
    destination: &str,
    cache: &str,
    settings: &BuildSettings,
) -> Container {
    // Build variables become platform env files; the report and the launch metadata give the
    // digest and the process types, squeezed into the 4 KiB termination message.
    let script = r#"set -eu
# The lifecycle starts as root and drops to the builder's user itself (CNB_USER_ID and
# CNB_GROUP_ID, set by the builder image: 1001:1000 in Paketo's); that user must own the
# sources it builds, cloned as root.
: "${CNB_USER_ID:?the builder image sets no CNB_USER_ID}" "${CNB_GROUP_ID:?the builder image sets no CNB_GROUP_ID}"
chown -R "$CNB_USER_ID:$CNB_GROUP_ID" /workspace/src
mkdir -p /workspace/platform/env
for var in $(env | sed -n 's/^BUILD_VAR_\([A-Za-z_][A-Za-z0-9_]*\)=.*/\1/p'); do
  eval "printf '%s' \"\$BUILD_VAR_$var\"" > "/workspace/platform/env/$var"
done
/cnb/lifecycle/creator -app=/workspace/src -platform=/workspace/platform -layers=/workspace/layers \
  -cache-image="$CACHE_IMAGE" -report=/workspace/report.toml "$DESTINATION"
digest=$(sed -n 's/^ *digest *= *"\(sha256:[0-9a-f]*\)".*/\1/p' /workspace/report.toml | head -n1)
types=$(sed -n 's/^ *type *= *"\([A-Za-z0-9_.-]*\)".*/"\1"/p' /workspace/layers/config/metadata.toml 2>/dev/null | sort -u | paste -sd, -)
printf '{"digest":"%s","processes":[%s]}' "$digest" "$types" | head -c 4000 > /dev/termination-log"#;
    let mut env_vars = vec![
        env("DESTINATION", destination),
        env("CACHE_IMAGE", cache),
        env("DOCKER_CONFIG", "/home/cnb/.docker"),
        env("CNB_PLATFORM_API", "0.13"),
        // Plain log lines: the lifecycle colours its phase headers by default, and the log's
        // tail becomes a failure's message (seen on the real node, as with kaniko).
        env("CNB_NO_COLOR", "true"),
    ];
    env_vars.extend(
        build
            .spec
            .build_vars
            .iter()
            .map(|v| env(&format!("BUILD_VAR_{}", v.key), &v.value)),
    );
    Container {
        name: BUILD_CONTAINER.into(),
        image: Some(
            app.spec
                .build
                .builder_image
                .clone()
                .unwrap_or_else(|| settings.builder_image.clone()),
        ),
        command: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
        env: Some(env_vars),
        volume_mounts: Some(vec![
            mount("workspace", WORKSPACE, false),
            mount("registry", "/home/cnb/.docker", true),
        ]),
        // The script writes its message only after the creator succeeded: on failure the
        // lifecycle's `ERROR: failed to …` line, last in the log, becomes the message.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        // The creator must start as root: it makes the layers and cache directories the
        // build user's and then drops to that user (a non-root start fails with "failed to
        // exec as user"). No privilege and no escalation beyond that.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn git_container(
    name: &str,
    app: &App,
    _build: &AppBuild,
    git_secret: Option<&str>,
    settings: &BuildSettings,
    script: &str,
) -> Container {
    let git = app.spec.git.as_ref();
    let url = git.map(|g| g.url.clone()).unwrap_or_default();
    let ssh = crate::controllers::app::is_ssh_url(&url);
    // Where the URL connects, as the agent read it; the step resolves and checks the host
    // again itself (`GIT_HOST_GUARD`). A URL the agent refuses never gets here (builds of it
    // fail first); should one, the empty host makes the guard refuse it.
    let (host, port) = match crate::controllers::app::git_endpoint(&url) {
        Ok(endpoint) => (endpoint.host.canonical(), endpoint.port.to_string()),
        Err(_) => (String::new(), String::new()),
    };
    // The URL, host and ref reach the shell as environment variables, never spliced into it.
    let mut env_vars = vec![
        env("GIT_URL", &url),
        env("GIT_HOST", &host),
        env("GIT_PORT", &port),
        env("HOME", "/tmp"),
        env("GIT_TERMINAL_PROMPT", "0"),
    ];
    let mut mounts = vec![mount("workspace", WORKSPACE, false)];
    if let Some(secret) = git_secret {
        if ssh {
            env_vars.push(env(
                "GIT_SSH_COMMAND",
                "ssh -i /etc/git-secret/ssh-privatekey -o IdentitiesOnly=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/etc/git-secret/known_hosts",
            ));
            mounts.push(mount("git-secret", "/etc/git-secret", true));
        } else {
            // A credential helper reads the token from the environment: it is never in a URL,
            // an argument or git's config on disk. Nothing else of the Secret is mounted.
            env_vars.push(secret_env("GIT_USERNAME", secret, "username"));
            env_vars.push(secret_env("GIT_PASSWORD", secret, "password"));
            env_vars.push(env("GIT_CONFIG_COUNT", "1"));
            env_vars.push(env("GIT_CONFIG_KEY_0", "credential.helper"));
            env_vars.push(env(
                "GIT_CONFIG_VALUE_0",
                "!f() { echo \"username=$GIT_USERNAME\"; echo \"password=$GIT_PASSWORD\"; }; f",
            ));
        }
    }
    Container {
        name: name.into(),
        image: Some(settings.git_image.clone()),
        command: Some(vec!["/bin/sh".into(), "-c".into(), script.into()]),
        env: Some(env_vars),
        volume_mounts: Some(mounts),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The step's volumes: the workspace, and for SSH clones the two keys of the credentials
/// Secret the clone reads (the private key and the server's host keys), never the whole
/// Secret. HTTPS credentials come in as two environment variables instead.
fn git_volumes(app: &App, git_secret: Option<&str>) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: "workspace".into(),
        empty_dir: Some(Default::default()),
        ..Default::default()
    }];
    let ssh = app
        .spec
        .git
        .as_ref()
        .is_some_and(|g| crate::controllers::app::is_ssh_url(&g.url));
    if let Some(secret) = git_secret.filter(|_| ssh) {
        let item = |key: &str| KeyToPath {
            key: key.into(),
            path: key.into(),
            mode: None,
        };
        volumes.push(Volume {
            name: "git-secret".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.into()),
                default_mode: Some(0o400),
                items: Some(vec![
                    item(crate::controllers::app::SSH_PRIVATE_KEY),
                    item(crate::controllers::app::KNOWN_HOSTS),
                ]),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    volumes
}

/// Shell functions the resolve and clone steps run before git connects: resolve the host as
/// the pod's resolver does, refuse loopback, link-local, unspecified and cloud metadata
/// addresses (DNS names pointing there, rebinding), and pin git to the checked addresses. Its
/// `sb_check_addresses` is tested with the machine's `sh` and awk (and busybox where present).
pub const GIT_HOST_GUARD: &str = include_str!("git_guard.sh");

/// A git step's script: the guard first, then `body`.
fn guarded(body: &str) -> String {
    format!("set -eu\n{GIT_HOST_GUARD}sb_guard_git_host\n{body}")
}

/// The resolve step after the guard: `git ls-remote` into a file, its exit status checked (no
/// `pipefail`: the git image's `/bin/sh` may be dash or busybox), then an exact match of
/// `GIT_REF`: `refs/heads/<ref>`, else `refs/tags/<ref>` (the peeled `^{}` line of an
/// annotated tag, which is the commit, not the tag object), or a full `refs/...` name, or a
/// full commit SHA. ls-remote's own patterns match by suffix (`main` would also match
/// `refs/heads/release/main`): they only narrow what the server sends. The commit, or why
/// there is none, goes to the termination log: exit 4 when git failed (`git ls-remote <url>
/// failed (exit N): <what git said>`), 2 when no such ref exists (`ref X not found …`), 3
/// when the guard refused the host. Tested with the machine's `sh` and git against
/// a local repository (`the_resolve_step_picks_the_exact_ref_and_tells_git_failures_apart`).
pub const RESOLVE_BODY: &str = r#": "${SB_TERMINATION_LOG:=/dev/termination-log}"
sb_refs="${TMPDIR:-/tmp}/sb-ls-remote.$$"
case "$GIT_REF" in
  refs/*) set -- "$GIT_REF" "$GIT_REF^{}" ;;
  *) set -- "refs/heads/$GIT_REF" "refs/tags/$GIT_REF" "refs/tags/$GIT_REF^{}" ;;
esac
sb_status=0
git ls-remote "$GIT_URL" "$@" > "$sb_refs" 2> "$sb_refs.err" || sb_status=$?
if [ "$sb_status" -ne 0 ]; then
  cat "$sb_refs.err" >&2
  sb_said=$(grep -v '^[[:space:]]*$' "$sb_refs.err" | tr '\n' ' ' | cut -c1-600 | sed 's/ *$//')
  printf 'git ls-remote %s failed (exit %s): %s\n' "$GIT_URL" "$sb_status" "$sb_said" | tee "$SB_TERMINATION_LOG" >&2
  exit 4
fi
sha=$(awk '
  BEGIN { ref = ENVIRON["GIT_REF"]; full = (substr(ref, 1, 5) == "refs/") }
  full && $2 == ref { plain = $1 }
  full && $2 == ref "^{}" { peeled = $1 }
  !full && $2 == "refs/heads/" ref { head = $1 }
  !full && $2 == "refs/tags/" ref { tag = $1 }
  !full && $2 == "refs/tags/" ref "^{}" { tagpeeled = $1 }
  END {
    if (full) print (peeled != "" ? peeled : plain)
    else if (head != "") print head
    else print (tagpeeled != "" ? tagpeeled : tag)
  }' "$sb_refs")
if [ -z "$sha" ] && [ "${#GIT_REF}" -eq 40 ]; then
  case "$GIT_REF" in
    *[!0-9a-fA-F]*) ;;
    *) sha=$(printf '%s' "$GIT_REF" | tr 'A-F' 'a-f') ;;
  esac
fi
if [ -z "$sha" ]; then
  printf 'ref %s not found in %s (no branch or tag of that name; a commit must be given in full, 40 hex digits)\n' "$GIT_REF" "$GIT_URL" | tee "$SB_TERMINATION_LOG" >&2
  exit 2
fi
printf '%s' "$sha" > "$SB_TERMINATION_LOG""#;

/// The clone step after the guard: fetch just the commit (protocol v2 servers allow any
/// reachable commit; a v0 server refuses unadvertised objects), else every ref, then check it
/// out. Reads a Procfile into the termination log. Tested like [`RESOLVE_BODY`].
pub const CLONE_BODY: &str = r#": "${SB_TERMINATION_LOG:=/dev/termination-log}"
cd /workspace
git init -q src && cd src
git remote add origin "$GIT_URL"
git fetch -q --depth 1 origin "$COMMIT" || git fetch -q --no-tags origin '+refs/*:refs/sb/*'
git checkout -q "$COMMIT"
if [ -f Procfile ]; then PROCFILE_TO_JSON | head -c 3500 > "$SB_TERMINATION_LOG"; fi"#;

/// Labels of a build step's Job and pod (and of the build's push Secret).
pub fn step_labels(app: &App, build: &AppBuild, step: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (MANAGED_BY_LABEL.to_string(), MANAGED_BY.to_string()),
        (APP_LABEL.to_string(), app.name_any()),
        (BUILD_LABEL.to_string(), build.name_any()),
        (STEP_LABEL.to_string(), step.to_string()),
    ])
}

#[allow(clippy::too_many_arguments)]
fn job(
    app: &App,
    build: &AppBuild,
    name: &str,
    step: &str,
    owner: &OwnerReference,
    settings: &BuildSettings,
    init: Vec<Container>,
    main: Container,
    volumes: Vec<Volume>,
    fs_group: Option<i64>,
    deadline: i64,
) -> Job {
    run_once(
        &build.namespace().unwrap_or_default(),
        name,
        step_labels(app, build, step),
        owner,
        deadline,
        settings.ttl_seconds_after_finished,
        PodSpec {
            // Builds talk to git and the registry, never to the Kubernetes API.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            init_containers: (!init.is_empty()).then_some(init),
            containers: vec![main],
            volumes: Some(volumes),
            security_context: Some(PodSecurityContext {
                fs_group,
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn secret_env(name: &str, secret: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: secret.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

/// The outcome a build container reports: a digest, and process types for buildpacks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BuildReport {
    pub digest: String,
    pub processes: Vec<String>,
}

/// Parses a build container's termination message: kaniko writes the bare digest, the
/// buildpack script a small JSON object.
pub fn parse_build_report(message: &str) -> Option<BuildReport> {
    let message = message.trim();
    let is_digest = |d: &str| {
        d.strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
    };
    if is_digest(message) {
        return Some(BuildReport {
            digest: message.to_owned(),
            processes: Vec::new(),
        });
    }
    let value: serde_json::Value = serde_json::from_str(message).ok()?;
    let digest = value.get("digest")?.as_str().filter(|d| is_digest(d))?.to_owned();
    let processes = value
        .get("processes")
        .and_then(|p| p.as_array())
        .map(|p| p.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    Some(BuildReport { digest, processes })
}

/// Shell that prints the `Procfile` in the working directory as `{"procfile": {name: command
/// line}}` (at most 10 entries): the clone step's termination message, so the agent learns the
/// process types without opening the image. Runs with busybox's sed and awk (alpine/git) as
/// with mawk and gawk (tested with the machine's, `procfile_lines_become_json`).
pub const PROCFILE_TO_JSON: &str = r#"sed 's/\\/\\\\/g; s/"/\\"/g' Procfile | awk 'match($0, /^[a-z][a-z0-9-]*:/) { name = substr($0, 1, RLENGTH - 1); cmd = substr($0, RLENGTH + 1); sub(/^[ \t]+/, "", cmd); sub(/[ \t\r]+$/, "", cmd); if (cmd != "" && n < 10) printf "%s\"%s\":\"%s\"", (n++ ? "," : "{\"procfile\":{"), name, cmd } END { if (n) printf "}}" }'"#;

/// Parses the clone step's termination message: the Procfile's process types, if it read one.
pub fn parse_procfile_report(message: &str) -> Option<BTreeMap<String, String>> {
    let value: serde_json::Value = serde_json::from_str(message.trim()).ok()?;
    let entries = value.get("procfile")?.as_object()?;
    Some(
        entries
            .iter()
            .filter_map(|(name, line)| Some((name.clone(), line.as_str()?.to_owned())))
            .collect(),
    )
}

/// Parses the resolve step's termination message: a full commit SHA.
pub fn parse_commit(message: &str) -> Option<String> {
    let sha = message.trim();
    (sha.len() == 40 && sha.chars().all(|c| c.is_ascii_hexdigit())).then(|| sha.to_ascii_lowercase())
}

/// Name of a build's release-command Job.
pub fn release_job_name(build: &AppBuild) -> String {
    format!("{}-release", build.name_any())
}

/// The release command's Job: [`app_job`] for a build's release (its `web` container and
/// pull Secrets from the release `values`), labelled as the build's step so its log is
/// relayed as part of the build's.
pub fn release_job(
    app: &App,
    build: &AppBuild,
    name: &str,
    values: &serde_json::Value,
    command: Vec<String>,
    owner: &OwnerReference,
    settings: &BuildSettings,
) -> Job {
    app_job(&AppJob {
        pull_secrets: super::values::pull_secrets_of(values),
        namespace: &build.namespace().unwrap_or_default(),
        name,
        labels: step_labels(app, build, "release"),
        container: RELEASE_CONTAINER,
        web: &super::values::release_container(values),
        command,
        owner,
        deadline_seconds: RELEASE_DEADLINE_SECONDS,
        ttl_seconds_after_finished: settings.ttl_seconds_after_finished,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AppBuildSpec, AppSpec, BuildSpec, BuildVar, GitSource, RegistrySpec};

    fn app(build_type: BuildType) -> App {
        let mut app = App::new(
            "web",
            AppSpec {
                display_name: None,
                description: None,
                git: Some(GitSource {
                    url: "https://github.com/example/web.git".into(),
                    branch: "main".into(),
                    secret_name: Some("git-token".into()),
                    is_private: true,
                }),
                registry: RegistrySpec {
                    url: "registry.example.com".into(),
                    secret_name: None,
                },
                build: BuildSpec {
                    build_type,
                    context_dir: None,
                    dockerfile: None,
                    ..Default::default()
                },
                services: Vec::new(),
                config: Default::default(),
                processes: Default::default(),
                release_command: Vec::new(),
                domains: Vec::new(),
                cron: Vec::new(),
                deploy: None,
            },
        );
        app.metadata.namespace = Some("shop".into());
        app
    }

    fn build() -> AppBuild {
        let mut build = AppBuild::new(
            "web-7",
            AppBuildSpec {
                app_name: "web".into(),
                git_ref: Some("main".into()),
                image_tag: None,
                build_vars: vec![BuildVar {
                    key: "NODE_ENV".into(),
                    value: "production".into(),
                }],
                helm_values: None,
                resources: None,
                timeout_seconds: Some(600),
                rollback_to: None,
            },
        );
        build.metadata.namespace = Some("shop".into());
        build.metadata.uid = Some("uid".into());
        build
    }

    fn owner() -> OwnerReference {
        use kube::Resource;
        build().controller_owner_ref(&()).unwrap()
    }

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn the_inputs_hash_changes_with_what_makes_the_image_and_only_with_that() {
        let settings = BuildSettings::default();
        let base = inputs_hash(&app(BuildType::Dockerfile), &build(), COMMIT, &settings);
        assert!(base.starts_with("sha256:") && base.len() == 7 + 64);
        // Same inputs, different run settings: same image.
        let mut slower = build();
        slower.spec.timeout_seconds = Some(3600);
        slower.metadata.name = Some("web-8".into());
        assert_eq!(
            inputs_hash(&app(BuildType::Dockerfile), &slower, COMMIT, &settings),
            base
        );
        // Anything that changes the image changes the hash.
        let mut other_var = build();
        other_var.spec.build_vars[0].value = "development".into();
        let mut tagged = build();
        tagged.spec.image_tag = Some("v1".into());
        let mut dockerfile = app(BuildType::Dockerfile);
        dockerfile.spec.build.dockerfile = Some("Dockerfile.prod".into());
        let changed = [
            inputs_hash(
                &app(BuildType::Dockerfile),
                &build(),
                &COMMIT.replace('0', "f"),
                &settings,
            ),
            inputs_hash(&app(BuildType::Dockerfile), &other_var, COMMIT, &settings),
            inputs_hash(&app(BuildType::Dockerfile), &tagged, COMMIT, &settings),
            inputs_hash(&dockerfile, &build(), COMMIT, &settings),
            inputs_hash(&app(BuildType::Buildpack), &build(), COMMIT, &settings),
        ];
        for (i, hash) in changed.iter().enumerate() {
            assert_ne!(*hash, base, "change {i}");
        }
    }

    #[test]
    fn kaniko_job_fields() {
        let mut app = app(BuildType::Dockerfile);
        app.spec.build.context_dir = Some("services/web".into());
        app.spec.build.dockerfile = Some("docker/Dockerfile.prod".into());
        let job = build_job(
            &app,
            &build(),
            COMMIT,
            Some("git-token"),
            "registry-credentials",
            &owner(),
            &BuildSettings::default(),
        );
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        assert_eq!(spec.active_deadline_seconds, Some(600));
        let labels = job.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[BUILD_LABEL], "web-7");
        assert_eq!(labels[APP_LABEL], "web");
        assert_eq!(labels[MANAGED_BY_LABEL], "shapeblock-agent");
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.automount_service_account_token, Some(false));
        let clone = &pod.init_containers.as_ref().unwrap()[0];
        let env: BTreeMap<_, _> = clone.env.iter().flatten().map(|e| (e.name.as_str(), e)).collect();
        assert_eq!(env["COMMIT"].value.as_deref(), Some(COMMIT));
        assert_eq!(
            env["GIT_PASSWORD"]
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap()
                .name,
            "git-token"
        );
        assert!(
            !clone.command.as_ref().unwrap()[2].contains("github.com"),
            "the URL is not in the script"
        );
        let main = &pod.containers[0];
        let args = main.args.as_ref().unwrap();
        assert!(args.contains(&"--context=dir:///workspace/src/services/web".to_string()));
        assert!(args.contains(&"--dockerfile=docker/Dockerfile.prod".to_string()));
        assert!(args.contains(&"--destination=registry.example.com/shop/web:0123456789ab".to_string()));
        assert!(args.contains(&"--cache-repo=registry.example.com/shop/web/cache".to_string()));
        assert!(args.contains(&"--digest-file=/dev/termination-log".to_string()));
        assert!(
            args.contains(&"--log-format=text".to_string()),
            "plain log lines, no colour escapes"
        );
        assert!(args.contains(&"--build-arg=NODE_ENV=production".to_string()));
        // Failing tools write no message: the log's tail is what the agent reads.
        assert_eq!(
            main.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        assert_eq!(
            clone.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        assert_eq!(main.security_context.as_ref().unwrap().run_as_user, Some(0));
        assert_eq!(main.security_context.as_ref().unwrap().privileged, Some(false));
        assert_eq!(
            main.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
            "2Gi"
        );
        let registry = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "registry")
            .unwrap();
        assert_eq!(
            registry.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("registry-credentials")
        );
    }

    #[test]
    fn buildpack_job_starts_as_root_for_the_lifecycle_to_drop_privileges() {
        let app = app(BuildType::Buildpack);
        let job = build_job(
            &app,
            &build(),
            COMMIT,
            None,
            "registry-credentials",
            &owner(),
            &BuildSettings::default(),
        );
        let pod = job.spec.unwrap().template.spec.unwrap();
        let main = &pod.containers[0];
        assert_eq!(
            main.image.as_deref(),
            Some("paketobuildpacks/builder-jammy-base:latest")
        );
        let context = main.security_context.as_ref().unwrap();
        assert_eq!(
            (context.run_as_user, context.allow_privilege_escalation),
            (Some(0), Some(false))
        );
        assert_eq!(pod.security_context.unwrap().fs_group, None);
        let script = &main.command.as_ref().unwrap()[2];
        assert!(script.contains(r#"chown -R "$CNB_USER_ID:$CNB_GROUP_ID" /workspace/src"#));
        assert_eq!(
            main.termination_message_policy.as_deref(),
            Some("FallbackToLogsOnError")
        );
        let env: BTreeMap<_, _> = main
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.clone()))
            .collect();
        assert_eq!(env["BUILD_VAR_NODE_ENV"].as_deref(), Some("production"));
        assert_eq!(env["CNB_NO_COLOR"].as_deref(), Some("true"));
        assert_eq!(
            env["DESTINATION"].as_deref(),
            Some("registry.example.com/shop/web:0123456789ab")
        );
        // The clone runs as the git image's user (root): OpenSSH refuses a uid the image
        // has no passwd entry for.
        assert_eq!(
            pod.init_containers.unwrap()[0]
                .security_context
                .as_ref()
                .unwrap()
                .run_as_user,
            None
        );
    }

    #[test]
    fn resolve_job_reports_a_commit() {
        let job = resolve_job(
            &app(BuildType::Dockerfile),
            &build(),
            None,
            &owner(),
            &BuildSettings::default(),
        );
        let container = &job
            .spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0];
        assert_eq!(container.name, RESOLVE_CONTAINER);
        let env: BTreeMap<_, _> = container
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.clone()))
            .collect();
        assert_eq!(env["GIT_REF"].as_deref(), Some("main"));
        assert_eq!(job.metadata.labels.unwrap()[STEP_LABEL], "resolve");
    }

    fn pod_of(job: &Job) -> &PodSpec {
        job.spec.as_ref().unwrap().template.spec.as_ref().unwrap()
    }

    #[test]
    fn git_steps_get_only_the_secret_keys_the_clone_needs() {
        // https: the token arrives as two variables; no volume of the Secret at all.
        let https = app(BuildType::Dockerfile);
        let job = build_job(
            &https,
            &build(),
            COMMIT,
            Some("git-token"),
            "registry-credentials",
            &owner(),
            &BuildSettings::default(),
        );
        let pod = pod_of(&job);
        assert!(pod.volumes.iter().flatten().all(|v| v.name != "git-secret"));
        let clone = &pod.init_containers.as_ref().unwrap()[0];
        assert!(
            clone
                .volume_mounts
                .iter()
                .flatten()
                .all(|m| m.name != "git-secret")
        );
        let from_secret: Vec<_> = clone
            .env
            .iter()
            .flatten()
            .filter_map(|e| e.value_from.as_ref()?.secret_key_ref.as_ref())
            .map(|r| (r.name.as_str(), r.key.as_str()))
            .collect();
        assert_eq!(
            from_secret,
            [("git-token", "username"), ("git-token", "password")]
        );
        // SSH: the private key and the host keys, projected as items, read-only.
        let mut ssh = app(BuildType::Dockerfile);
        ssh.spec.git.as_mut().unwrap().url = "ssh://git@git.example.com:2222/web.git".into();
        for job in [
            resolve_job(
                &ssh,
                &build(),
                Some("web-deploy-key"),
                &owner(),
                &BuildSettings::default(),
            ),
            build_job(
                &ssh,
                &build(),
                COMMIT,
                Some("web-deploy-key"),
                "registry-credentials",
                &owner(),
                &BuildSettings::default(),
            ),
        ] {
            let volume = pod_of(&job)
                .volumes
                .iter()
                .flatten()
                .find(|v| v.name == "git-secret")
                .and_then(|v| v.secret.clone())
                .unwrap();
            assert_eq!(volume.secret_name.as_deref(), Some("web-deploy-key"));
            let keys: Vec<_> = volume.items.unwrap().into_iter().map(|i| i.key).collect();
            assert_eq!(keys, ["ssh-privatekey", "known_hosts"]);
        }
    }

    #[test]
    fn git_steps_check_the_host_before_git_connects() {
        let mut app = app(BuildType::Dockerfile);
        app.spec.git.as_mut().unwrap().url = "https://Git.Example.com.:8443/web.git".into();
        let resolve = resolve_job(&app, &build(), None, &owner(), &BuildSettings::default());
        let built = build_job(
            &app,
            &build(),
            COMMIT,
            None,
            "registry-credentials",
            &owner(),
            &BuildSettings::default(),
        );
        let steps = [
            pod_of(&resolve).containers[0].clone(),
            pod_of(&built).init_containers.as_ref().unwrap()[0].clone(),
        ];
        for step in steps {
            let script = &step.command.as_ref().unwrap()[2];
            assert!(script.starts_with("set -eu\n"), "{}", step.name);
            let guard = script.find("\nsb_guard_git_host\n").expect("the guard runs");
            let git = script
                .find("git ls-remote")
                .or_else(|| script.find("git remote add"))
                .unwrap();
            assert!(guard < git, "{}: the guard runs before git", step.name);
            assert!(script.contains(GIT_HOST_GUARD));
            assert!(!script.contains("example.com"), "values never reach the script");
            let env: BTreeMap<_, _> = step
                .env
                .iter()
                .flatten()
                .map(|e| (e.name.as_str(), e.value.clone().unwrap_or_default()))
                .collect();
            assert_eq!(env["GIT_HOST"], "git.example.com");
            assert_eq!(env["GIT_PORT"], "8443");
        }
    }

    /// Runs `sb_check_addresses` over `addresses` with `shell` (and the awk on its PATH).
    fn check_addresses(shell: &[&str], path: Option<&std::path::Path>, addresses: &str) -> (bool, String) {
        use std::io::Write;
        let mut command = std::process::Command::new(shell[0]);
        command
            .args(&shell[1..])
            .arg("-c")
            .arg(format!("{GIT_HOST_GUARD}\nsb_check_addresses"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        if let Some(dir) = path {
            command.env(
                "PATH",
                format!("{}:{}", dir.display(), std::env::var("PATH").unwrap()),
            );
        }
        let mut child = command.spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(addresses.as_bytes())
            .unwrap();
        let output = child.wait_with_output().unwrap();
        (output.status.success(), String::from_utf8(output.stdout).unwrap())
    }

    /// The shells to run the guard with: the machine's `sh` and awk, and busybox's (the
    /// alpine/git image's) where the machine has it.
    fn shells() -> Vec<(Vec<&'static str>, Option<tempfile::TempDir>)> {
        let mut shells = vec![(vec!["sh"], None)];
        if let Ok(busybox) = which("busybox") {
            let dir = tempfile::tempdir().unwrap();
            for tool in ["awk", "sort", "head", "sh"] {
                std::os::unix::fs::symlink(&busybox, dir.path().join(tool)).unwrap();
            }
            shells.push((vec!["busybox", "sh"], Some(dir)));
        }
        shells
    }

    fn which(tool: &str) -> Result<std::path::PathBuf, ()> {
        std::env::var("PATH")
            .unwrap_or_default()
            .split(':')
            .map(|d| std::path::Path::new(d).join(tool))
            .find(|p| p.is_file())
            .ok_or(())
    }

    #[test]
    fn the_address_check_refuses_what_the_clone_must_not_reach() {
        for (shell, dir) in shells() {
            let path = dir.as_ref().map(|d| d.path());
            for (address, why) in [
                ("127.0.0.1", "is a loopback address"),
                ("127.8.9.10", "is a loopback address"),
                ("::1", "is a loopback address"),
                ("0.0.0.0", "is an unspecified address"),
                ("::", "is an unspecified address"),
                ("169.254.169.254", "is a link-local address"),
                ("fe80::1", "is a link-local address"),
                ("FE80::1%eth0", "is a link-local address"),
                (
                    "::ffff:127.0.0.1",
                    "carries an IPv4 address that is a loopback address",
                ),
                (
                    "::ffff:a9fe:a9fe",
                    "carries an IPv4 address that is a link-local address",
                ),
                (
                    "64:ff9b::7f00:1",
                    "carries an IPv4 address that is a loopback address",
                ),
                ("fd00:ec2::254", "is AWS instance metadata"),
                ("100.100.100.200", "is a cloud metadata address"),
                ("no-address", "is not an address"),
                ("1::2::3", "is not an address"),
                ("1.2.3.256", "is not an address"),
                ("2001:db8::1%$(touch /tmp/x)", "is not an address"),
            ] {
                let (ok, printed) =
                    check_addresses(&shell, path, &format!("10.0.0.1\n{address}\n140.82.112.3\n"));
                assert!(!ok, "{shell:?}: {address} passed");
                assert!(
                    printed.starts_with(&format!("{address} {why}")),
                    "{shell:?}: {address}: {printed}"
                );
            }
            for allowed in [
                "10.0.0.1",
                "140.82.112.3",
                "192.168.1.1",
                "2606:50c0:8000::154",
                "fd12:3456::1",
                "::ffff:10.0.0.1",
                " 172.16.0.1 ",
            ] {
                assert_eq!(
                    check_addresses(&shell, path, &format!("{allowed}\n")),
                    (true, String::new()),
                    "{shell:?}: {allowed}"
                );
            }
        }
    }

    #[test]
    fn the_guard_refuses_a_name_resolving_to_loopback_and_pins_the_checked_addresses() {
        for (shell, dir) in shells() {
            let dir = dir.unwrap_or_else(|| tempfile::tempdir().unwrap());
            // A stand-in for the pod's resolver: a name pointing at loopback (or rebinding
            // to it), and an ordinary one.
            std::fs::write(
                dir.path().join("getent"),
                "#!/bin/sh\ncase \"$2\" in\n  rebind.example) printf '140.82.112.3 STREAM rebind.example\\n127.0.0.1 STREAM rebind.example\\n' ;;\n  git.example.com) printf '2606:50c0::1 STREAM git.example.com\\n140.82.112.3 STREAM git.example.com\\n' ;;\n  *) exit 2 ;;\nesac\n",
            )
            .unwrap();
            std::fs::set_permissions(
                dir.path().join("getent"),
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
            .unwrap();
            let log = dir.path().join("termination-log");
            let run = |host: &str, url: &str, port: &str| {
                let _ = std::fs::remove_file(&log);
                let output = std::process::Command::new(shell[0])
                    .args(&shell[1..])
                    .arg("-c")
                    .arg(format!(
                        "{GIT_HOST_GUARD}sb_guard_git_host\nenv | grep -E '^GIT_(CONFIG|SSH)' | sort"
                    ))
                    .env(
                        "PATH",
                        format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap()),
                    )
                    .env("SB_TERMINATION_LOG", &log)
                    .env("GIT_HOST", host)
                    .env("GIT_PORT", port)
                    .env("GIT_URL", url)
                    .env_remove("GIT_SSH_COMMAND")
                    .env_remove("GIT_CONFIG_COUNT")
                    .output()
                    .unwrap();
                (
                    output.status.code(),
                    String::from_utf8(output.stdout).unwrap(),
                    std::fs::read_to_string(&log).unwrap_or_default(),
                )
            };
            let (code, _, message) = run("rebind.example", "https://rebind.example/x.git", "443");
            assert_eq!(code, Some(3), "{shell:?}");
            assert_eq!(
                message.trim(),
                "refused: the git host rebind.example resolves to 127.0.0.1 is a loopback address (this node)"
            );
            let (code, _, message) = run("nowhere.example", "https://nowhere.example/x.git", "443");
            assert_eq!(code, Some(3));
            assert!(
                message.starts_with("cannot resolve the git host nowhere.example"),
                "{message}"
            );
            let (code, _, message) = run("a;touch /tmp/x", "https://x/x.git", "443");
            assert_eq!(code, Some(3));
            assert!(message.contains("is not a host name"), "{message}");
            // https: curl connects to the checked addresses (IPv4 first), and no redirect
            // takes it elsewhere.
            let (code, env, _) = run("git.example.com", "https://git.example.com/x.git", "443");
            assert_eq!(code, Some(0), "{shell:?}");
            assert!(
                env.contains("GIT_CONFIG_KEY_0=http.followRedirects\nGIT_CONFIG_KEY_1=http.curloptResolve\n"),
                "{env}"
            );
            assert!(
                env.contains("GIT_CONFIG_VALUE_1=git.example.com:443:140.82.112.3,[2606:50c0::1]\n"),
                "{env}"
            );
            // SSH: ssh connects to the checked address and checks the host key under the name.
            let (code, env, _) = run("git.example.com", "ssh://git@git.example.com:2222/x.git", "2222");
            assert_eq!(code, Some(0));
            assert!(
                env.contains(
                    "GIT_SSH_COMMAND=ssh -o HostName=140.82.112.3 -o 'HostKeyAlias=[git.example.com]:2222'\n"
                ),
                "{env}"
            );
            // An allowed address needs no lookup.
            let (code, env, _) = run("10.0.0.5", "https://10.0.0.5/x.git", "443");
            assert_eq!(code, Some(0));
            assert!(!env.contains("curloptResolve"), "{env}");
        }
    }

    /// A bare repository with branches `main` and `release/main` (different commits), an
    /// annotated tag `v1` and a lightweight tag `v2` on older commits; its commits by name.
    fn sample_repository(dir: &std::path::Path) -> BTreeMap<&'static str, String> {
        let git = |cwd: &std::path::Path, args: &[&str]| {
            let output = std::process::Command::new("git")
                .args([
                    "-c",
                    "user.name=t",
                    "-c",
                    "user.email=t@example.com",
                    "-c",
                    "init.defaultBranch=main",
                ])
                .args(args)
                .current_dir(cwd)
                .env("HOME", dir)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "git {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8(output.stdout).unwrap().trim().to_owned()
        };
        git(dir, &["init", "-q", "--bare", "remote.git"]);
        git(dir, &["init", "-q", "work"]);
        let work = dir.join("work");
        let mut commits = BTreeMap::new();
        for (name, file) in [("tagged", "a"), ("light", "b"), ("release", "c"), ("main", "d")] {
            std::fs::write(work.join(file), name).unwrap();
            git(&work, &["add", file]);
            git(&work, &["commit", "-q", "-m", name]);
            commits.insert(name, git(&work, &["rev-parse", "HEAD"]));
            match name {
                "tagged" => git(&work, &["tag", "-a", "-m", "version 1", "v1"]),
                "light" => git(&work, &["tag", "v2"]),
                "release" => git(&work, &["branch", "release/main"]),
                _ => String::new(),
            };
        }
        git(
            &work,
            &["push", "-q", "../remote.git", "main", "release/main", "v1", "v2"],
        );
        let tag_object = git(&dir.join("remote.git"), &["rev-parse", "refs/tags/v1"]);
        assert_ne!(
            tag_object, commits["tagged"],
            "v1 is an annotated tag: its own object"
        );
        commits.insert("v1-object", tag_object);
        commits
    }

    /// Runs `body` (a git step's script after the guard) with `shell`, in `dir`, with `env`;
    /// returns the exit code and the termination log.
    fn run_step(
        shell: &[&str],
        path: Option<&std::path::Path>,
        dir: &std::path::Path,
        body: &str,
        env: &[(&str, &str)],
    ) -> (Option<i32>, String) {
        let log = dir.join("termination-log");
        let _ = std::fs::remove_file(&log);
        let mut command = std::process::Command::new(shell[0]);
        command
            .args(&shell[1..])
            .arg("-c")
            .arg(format!("set -eu\n{body}"))
            .current_dir(dir)
            .env("HOME", dir)
            .env("TMPDIR", dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("SB_TERMINATION_LOG", &log)
            .envs(env.iter().copied());
        if let Some(tools) = path {
            command.env(
                "PATH",
                format!("{}:{}", tools.display(), std::env::var("PATH").unwrap()),
            );
        }
        let output = command.output().unwrap();
        (
            output.status.code(),
            std::fs::read_to_string(&log).unwrap_or_default(),
        )
    }

    #[test]
    fn the_resolve_step_picks_the_exact_ref_and_tells_git_failures_apart() {
        let dir = tempfile::tempdir().unwrap();
        let commits = sample_repository(dir.path());
        let url = format!("file://{}/remote.git", dir.path().display());
        for (shell, tools) in shells() {
            let tools = tools.inspect(|t| {
                // The rest of busybox's applets the step uses (git is the machine's).
                for tool in ["grep", "tr", "cut", "sed", "tee", "cat"] {
                    let _ = std::os::unix::fs::symlink(which("busybox").unwrap(), t.path().join(tool));
                }
            });
            let path = tools.as_ref().map(|t| t.path());
            let resolve = |git_ref: &str| {
                run_step(
                    &shell,
                    path,
                    dir.path(),
                    RESOLVE_BODY,
                    &[("GIT_URL", &url), ("GIT_REF", git_ref)],
                )
            };
            for (git_ref, want) in [
                // Not refs/heads/release/main, which ls-remote's suffix match also lists.
                ("main", &commits["main"]),
                ("release/main", &commits["release"]),
                ("refs/heads/release/main", &commits["release"]),
                // The commit an annotated tag points at, not the tag object.
                ("v1", &commits["tagged"]),
                ("refs/tags/v1", &commits["tagged"]),
                ("v2", &commits["light"]),
                (&commits["light"].to_ascii_uppercase(), &commits["light"]),
            ] {
                assert_eq!(resolve(git_ref), (Some(0), want.clone()), "{shell:?}: {git_ref}");
                assert_eq!(parse_commit(want).as_deref(), Some(want.as_str()));
            }
            for missing in ["elease/main", "release", "heads/main", &commits["main"][..12]] {
                let (code, message) = resolve(missing);
                assert_eq!(code, Some(2), "{shell:?}: {missing}: {message}");
                assert!(
                    message.starts_with(&format!("ref {missing} not found in {url}")),
                    "{shell:?}: {message}"
                );
            }
            // git itself failing is not "not found", and says what git said.
            let gone = format!("file://{}/gone.git", dir.path().display());
            let (code, message) = run_step(
                &shell,
                path,
                dir.path(),
                RESOLVE_BODY,
                &[("GIT_URL", &gone), ("GIT_REF", "main")],
            );
            assert_eq!(code, Some(4), "{shell:?}: {message}");
            assert!(
                message.starts_with(&format!("git ls-remote {gone} failed (exit 128): fatal: ")),
                "{shell:?}: {message}"
            );
            assert!(
                message.contains("does not appear to be a git repository"),
                "{message}"
            );
        }
    }

    #[test]
    fn the_clone_step_checks_out_the_resolved_commit() {
        let dir = tempfile::tempdir().unwrap();
        let commits = sample_repository(dir.path());
        let url = format!("file://{}/remote.git", dir.path().display());
        let workspace = dir.path().join("workspace");
        let body = CLONE_BODY
            .replace("PROCFILE_TO_JSON", PROCFILE_TO_JSON)
            .replace("cd /workspace", &format!("cd {}", workspace.display()));
        // An older commit (only an annotated tag names it), by protocol v2 and by the
        // fallback a v0 server needs, which refuses to send an unadvertised commit.
        for version in ["2", "0"] {
            let _ = std::fs::remove_dir_all(&workspace);
            std::fs::create_dir(&workspace).unwrap();
            let (code, _) = run_step(
                &["sh"],
                None,
                dir.path(),
                &body,
                &[
                    ("GIT_URL", &url),
                    ("COMMIT", &commits["tagged"]),
                    ("GIT_CONFIG_COUNT", "1"),
                    ("GIT_CONFIG_KEY_0", "protocol.version"),
                    ("GIT_CONFIG_VALUE_0", version),
                ],
            );
            assert_eq!(code, Some(0), "protocol {version}");
            let checked_out = std::process::Command::new("git")
                .args(["rev-parse", "HEAD"])
                .current_dir(workspace.join("src"))
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8(checked_out.stdout).unwrap().trim(),
                commits["tagged"],
                "protocol {version}"
            );
            assert_eq!(
                std::fs::read_to_string(workspace.join("src/a")).unwrap(),
                "tagged"
            );
            assert!(
                !workspace.join("src/d").exists(),
                "the commit, not the branch tip"
            );
        }
    }

    #[test]
    fn release_jobs_pull_with_the_releases_secrets() {
        let web = serde_json::json!({"image": "ghcr.io/acme/shop/web", "imageTag": "abc"});
        let values = serde_json::json!({
            "generic": {"extraImagePullSecrets": [{"name": "registry-credentials"}, {"name": "ghcr"}]},
            "deployments": {"web": {"containers": [web]}},
        });
        let job = release_job(
            &app(BuildType::Dockerfile),
            &build(),
            "web-7-release",
            &values,
            vec!["migrate".into()],
            &owner(),
            &BuildSettings::default(),
        );
        let pod = pod_of(&job);
        let pulls: Vec<_> = pod
            .image_pull_secrets
            .iter()
            .flatten()
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(pulls, ["registry-credentials", "ghcr"]);
        assert_eq!(
            pod.containers[0].image.as_deref(),
            Some("ghcr.io/acme/shop/web:abc")
        );
        let none = release_job(
            &app(BuildType::Dockerfile),
            &build(),
            "web-7-release",
            &serde_json::json!({"deployments": {"web": {"containers": [web]}}}),
            vec!["migrate".into()],
            &owner(),
            &BuildSettings::default(),
        );
        assert!(pod_of(&none).image_pull_secrets.is_none());
    }

    #[test]
    fn termination_messages_parse() {
        let digest = format!("sha256:{}", "a".repeat(64));
        assert_eq!(parse_build_report(&digest).unwrap().digest, digest);
        let json = format!(r#"{{"digest":"{digest}","processes":["web","worker"]}}"#);
        assert_eq!(parse_build_report(&json).unwrap().processes, ["web", "worker"]);
        assert!(parse_build_report("error: push failed").is_none());
        assert_eq!(parse_commit(&format!("{COMMIT}\n")).as_deref(), Some(COMMIT));
        assert!(parse_commit("main").is_none());
    }

    #[test]
    fn procfile_lines_become_json() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("Procfile"),
            "web: node server.js --port \"$PORT\"\nworker:   bundle exec sidekiq -q a\\b  \n# a comment\nBad: x\nrelease: rake db:migrate\r\n",
        )
        .unwrap();
        let output = std::process::Command::new("sh")
            .arg("-c")
            .arg(PROCFILE_TO_JSON)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let found = parse_procfile_report(&String::from_utf8(output.stdout).unwrap()).unwrap();
        assert_eq!(
            found,
            BTreeMap::from([
                ("web".to_string(), "node server.js --port \"$PORT\"".to_string()),
                ("worker".to_string(), "bundle exec sidekiq -q a\\b".to_string()),
                ("release".to_string(), "rake db:migrate".to_string()),
            ])
        );
        assert!(parse_procfile_report("").is_none(), "no Procfile, no report");
    }
}
