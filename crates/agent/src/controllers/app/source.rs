//! An App's source, checked before anything uses it: where its git URL connects (host, port,
//! transport) and whether the branch and credentials can work with it, and how a build clones.

use super::*;

/// What a build may clone with, decided from the App alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloneSource {
    /// The source is valid and its credentials were checked for this generation of the spec:
    /// clone with this Secret (the agent's deploy key or a marked credentials Secret), if any.
    Ready(Option<String>),
    /// The App's source or credentials are refused; the build fails with this.
    Refused { reason: String, message: String },
    /// The App controller has not checked this generation of the spec yet: a build started now
    /// could clone a new URL with the credentials checked for the old one.
    Unchecked,
}

/// The clone credentials a build may use. Builds read them from the App's status, which only
/// the agent writes, and only once that status is about the App's current spec.
pub fn clone_source(app: &App) -> CloneSource {
    if let Err(message) = validate_source(app) {
        return CloneSource::Refused {
            reason: "InvalidSpec".into(),
            message,
        };
    }
    if app.spec.git.is_none() {
        return CloneSource::Ready(None);
    }
    if observed_generation(app).is_none() || observed_generation(app) != app.metadata.generation {
        return CloneSource::Unchecked;
    }
    let ssh = app.spec.git.as_ref().is_some_and(|g| is_ssh_url(&g.url));
    // HostKeysKnown is only ever set for SSH sources (and may linger from an earlier SSH URL).
    let checked: &[&str] = if ssh {
        &["CredentialsReady", "HostKeysKnown"]
    } else {
        &["CredentialsReady"]
    };
    for type_ in checked {
        if let Some(c) = condition(app, type_).filter(|c| c.status == "False") {
            return CloneSource::Refused {
                reason: c.reason.clone(),
                message: format!("App {}: {}", app.name_any(), c.message),
            };
        }
    }
    match condition(app, "CredentialsReady") {
        Some(c) if c.status == "True" => {
            CloneSource::Ready(app.status.as_ref().and_then(|s| s.git_secret_name.clone()))
        }
        _ => CloneSource::Unchecked,
    }
}

/// Checks what the CRD schema checks (it may be older or looser than this agent) and what it
/// cannot: where the git host points, and whether the credentials can work with the URL.
pub fn validate_source(app: &App) -> std::result::Result<(), String> {
    use crate::api::BuildType;
    if let Some(git) = &app.spec.git {
        validate_git_url(&git.url)?;
        validate_branch(&git.branch)?;
        if git.is_private && git.secret_name.is_none() && !is_ssh_url(&git.url) {
            return Err(format!(
                "git.url {} is https and private, but no git.secretName is given: a generated deploy key \
                 works only with SSH URLs (git@host:org/repo.git); use an SSH URL, or name a Secret with \
                 username and password (an access token)",
                git.url
            ));
        }
    } else if app.spec.build.build_type != BuildType::Image {
        return Err("spec.git is required unless spec.build.type is image".into());
    }
    match (app.spec.build.build_type, &app.spec.build.image) {
        (BuildType::Image, None) => return Err("build.image is required when build.type is image".into()),
        (BuildType::Dockerfile | BuildType::Buildpack, Some(_)) => {
            return Err("build.image may only be set when build.type is image".into());
        }
        _ => {}
    }
    Ok(())
}

/// Where a git URL connects: the host as the resolver reads it, the port, and the transport.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitEndpoint {
    pub host: git_host::Host,
    pub port: u16,
    pub ssh: bool,
}

/// Accepts `https://host[:port]/path`, `ssh://[user@]host[:port]/path` and `user@host:path`;
/// refuses everything git would treat as a local path, a transport helper or an option, and
/// hosts that reach this node or a cloud's metadata service in any spelling ([`git_host`]).
pub fn validate_git_url(url: &str) -> std::result::Result<(), String> {
    git_endpoint(url).map(|_| ())
}

/// Parses and checks a git URL: where it connects, or why it is refused.
pub fn git_endpoint(url: &str) -> std::result::Result<GitEndpoint, String> {
    let refuse = |why: &str| Err(format!("git.url {url:?} is refused: {why}"));
    if url.starts_with('-') {
        return refuse("it would be read as a command-line option");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return refuse("it contains whitespace or control characters");
    }
    let (authority, ssh, scp_like) = if let Some(rest) = url.strip_prefix("https://") {
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.contains('@') {
            return refuse("credentials in the URL would be logged and stored; put them in git.secretName");
        }
        if !rest.contains('/') {
            return refuse("it names no repository path");
        }
        (authority, false, false)
    } else if let Some(rest) = url.strip_prefix("ssh://") {
        let authority = rest.split('/').next().unwrap_or_default();
        if !rest.contains('/') {
            return refuse("it names no repository path");
        }
        (authority.rsplit('@').next().unwrap_or_default(), true, false)
    } else if let Some((user_host, path)) = url
        .split_once(':')
        .filter(|(u, _)| u.contains('@') && !u.contains('/'))
    {
        if path.is_empty() || path.starts_with('-') {
            return refuse("it names no repository path");
        }
        (user_host.rsplit('@').next().unwrap_or_default(), true, true)
    } else {
        return refuse(
            "only https:// and SSH URLs are accepted (file://, ext::, http:// and local paths are not)",
        );
    };
    let (host, port) = if scp_like {
        (authority, None)
    } else {
        split_port(authority)
    };
    if host.is_empty() || host.starts_with('-') {
        return refuse("it has no host");
    }
    let port = match port {
        None => {
            if ssh {
                22
            } else {
                443
            }
        }
        Some(port) => match port.parse::<u16>() {
            Ok(port) if port > 0 => port,
            _ => return refuse("its port is not a number from 1 to 65535"),
        },
    };
    let host = match git_host::check(host) {
        Ok(host) => host,
        Err(why) => return refuse(&why),
    };
    Ok(GitEndpoint { host, port, ssh })
}

/// Splits `host[:port]` and `[v6][:port]`.
pub(super) fn split_port(authority: &str) -> (&str, Option<&str>) {
    if authority.starts_with('[') {
        return match authority.find(']') {
            Some(end) => {
                let port = authority[end + 1..].strip_prefix(':');
                (&authority[..end + 1], port)
            }
            None => (authority, None),
        };
    }
    match authority.split_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    }
}

/// Whether a git URL uses SSH.
pub fn is_ssh_url(url: &str) -> bool {
    url.starts_with("ssh://") || (!url.contains("://") && url.contains('@'))
}

/// Branch names git accepts that cannot be read as options.
pub fn validate_branch(branch: &str) -> std::result::Result<(), String> {
    let valid = !branch.is_empty()
        && !branch.starts_with(['-', '.', '/'])
        && !branch.ends_with(['/', '.'])
        && !branch.ends_with(".lock")
        && !branch.contains("..")
        && !branch.contains("//")
        && branch
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c));
    if valid {
        Ok(())
    } else {
        Err(format!("git.branch {branch:?} is not a valid branch name"))
    }
}
