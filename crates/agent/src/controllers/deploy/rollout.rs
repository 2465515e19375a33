//! Whether a Deployment runs a given build's image, rolled out and available: how the AppBuild
//! controller decides a build is `Completed`, and how the App controller records its releases.

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;

use super::{BUILD_ANNOTATION, values};

pub(crate) enum Rollout {
    /// This build's template is running: updated, available, as many as wanted.
    Done,
    /// Not there yet.
    Progressing,
    /// The rollout gave up.
    Failed(String),
}

/// Whether the Deployment runs this build (its template carries the build and the image) and
/// has rolled out completely.
/// Whether `deployment` runs `build`'s `image`, updated and available (for the App's record
/// of its releases).
pub(crate) fn rolled_out(deployment: &Deployment, build: &str, image: &str) -> bool {
    matches!(rollout(Some(deployment), build, image), Rollout::Done)
}

pub(crate) fn rollout(deployment: Option<&Deployment>, build: &str, image: &str) -> Rollout {
    let Some(deployment) = deployment else {
        return Rollout::Progressing;
    };
    let Some(spec) = deployment.spec.as_ref() else {
        return Rollout::Progressing;
    };
    let template = &spec.template;
    let ours = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(BUILD_ANNOTATION))
        .map(String::as_str)
        == Some(build);
    let running_image = template
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default();
    let image_matches = {
        let (repository, tag) = values::split_image(image);
        running_image == format!("{repository}:{tag}")
    };
    if !ours || !image_matches {
        return Rollout::Progressing;
    }
    let Some(status) = deployment.status.as_ref() else {
        return Rollout::Progressing;
    };
    if let Some(condition) = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
    {
        return Rollout::Failed(format!(
            "{} did not become available: {}",
            deployment.name_any(),
            condition.message.clone().unwrap_or_default()
        ));
    }
    let desired = spec.replicas.unwrap_or(1);
    let observed = status.observed_generation.unwrap_or(0) >= deployment.metadata.generation.unwrap_or(0);
    let settled = status.updated_replicas.unwrap_or(0) == desired
        && status.available_replicas.unwrap_or(0) == desired
        && status.replicas.unwrap_or(0) == desired;
    if observed && settled {
        Rollout::Done
    } else {
        Rollout::Progressing
    }
}
