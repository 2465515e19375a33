//! Why a build pod failed, decided from what a real run leaves behind: which container ended
//! non-zero, its exit code, the kubelet's `terminated.reason`, and the words the tool itself
//! printed last (the termination message, which with `FallbackToLogsOnError` is the tail of
//! the container's log when the tool wrote no message of its own, or the log tail the agent
//! read).
//!
//! What the tools print, from their sources:
//! - kaniko (chainguard-dev/kaniko v1.25.6, `cmd/executor/cmd/root.go`) ends every failure of
//!   its run with one line on stderr, the wrapped error: `error checking push permissions --
//!   make sure you entered the correct tag name, and that you are authenticated correctly, and
//!   try again: …` (checked before anything is built, for the destination and the cache repo),
//!   `error building image: …` (`DoBuild`, including pulling the base image and `RUN`; a failed
//!   `RUN`'s own exit code becomes kaniko's) and `error pushing image: …` (`DoPush`). Set-up
//!   errors (context, Dockerfile path, flags) come from cobra as `Error: …`. `DoPush` writes
//!   `--digest-file` before it pushes (`pkg/executor/push.go`), so a failed push can leave the
//!   digest as the termination message; that too means the image was built and not pushed.
//! - the CNB lifecycle (buildpacks/lifecycle v0.20.11) logs `ERROR: failed to <action>: …`
//!   (`cmd/exit.go`) and exits with its phase's code (`platform/exit.go`): 20-22 detect, 32
//!   analyze, 42 restore, 51-52 build, 62 export. The creator checks registry access before it
//!   builds (`phase/connected_factory.go`): `failed to initialize analyzer: validating registry
//!   write access: failed to ensure registry read/write access to …` (exit 1). Export (62) is
//!   where the image is written to the registry.

/// Which step of the build pod ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildStep {
    /// The clone init container.
    Clone,
    /// The build container, with kaniko.
    Kaniko,
    /// The build container, with the CNB lifecycle's creator.
    Buildpack,
}

/// How a container of a build pod ended, as its status and log say.
#[derive(Clone, Debug)]
pub struct Ended<'a> {
    pub step: BuildStep,
    pub exit_code: i32,
    /// `terminated.reason` (`Error`, `OOMKilled`, …).
    pub reason: Option<&'a str>,
    /// The termination message, or the tail of the log when the message holds no words.
    pub said: &'a str,
    /// The container's memory limit, if it has one.
    pub memory_limit: Option<&'a str>,
}

/// kaniko's and the lifecycle's messages that mean the registry refused the image.
const KANIKO_PUSH: &[&str] = &["error checking push permissions", "error pushing image"];
const KANIKO_FINAL: &[&str] = &[
    "error checking push permissions",
    "error pushing image",
    "error building image",
    "Error: ",
];
/// The lifecycle's exit code for a failed export (`platform.ExportError`).
const LIFECYCLE_EXPORT_FAILED: i32 = 62;

/// Whether `text` is only an image digest (what kaniko's `--digest-file` holds).
pub fn is_digest(text: &str) -> bool {
    text.trim()
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Whether the agent should read the container's log for the words: the message is empty or
/// only the digest kaniko wrote before its push.
pub fn needs_log(message: &str) -> bool {
    message.trim().is_empty() || is_digest(message)
}

/// The reason and message of a failed build step.
pub fn classify(ended: &Ended<'_>) -> (&'static str, String) {
    let lines: Vec<&str> = ended
        .said
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let code = ended.exit_code;
    let step = match ended.step {
        BuildStep::Clone => "clone",
        BuildStep::Kaniko | BuildStep::Buildpack => "build",
    };
    if ended.reason == Some("OOMKilled") {
        let limit = ended.memory_limit.map(|l| format!(" of {l}")).unwrap_or_default();
        return (
            "BuildOutOfMemory",
            format!(
                "the {step} step was killed for using more than its memory limit{limit} (exit {code}, OOMKilled): \
                 raise resources.limits.memory of the AppBuild or the App{}",
                tail(&lines, None)
            ),
        );
    }
    match ended.step {
        BuildStep::Clone => {
            let key = lines
                .iter()
                .rposition(|l| {
                    l.starts_with("fatal:") || l.starts_with("error:") || l.starts_with("refused:")
                })
                .or_else(|| lines.len().checked_sub(1));
            ("CloneFailed", said("git clone failed", code, &lines, key))
        }
        BuildStep::Kaniko => {
            if let Some(digest) = lines.iter().find(|l| is_digest(l)) {
                // Only the digest file: kaniko writes it in `DoPush` just before pushing.
                let key = lines.iter().rposition(|l| starts_with_any(l, KANIKO_PUSH));
                let mut message =
                    format!("kaniko built the image ({digest}) but did not push it (exit {code})");
                if let Some(key) = key {
                    message.push_str(&format!(": {}", lines[key]));
                }
                return ("PushFailed", message);
            }
            let key = lines
                .iter()
                .rposition(|l| starts_with_any(l, KANIKO_FINAL))
                .or_else(|| lines.len().checked_sub(1));
            let push = key.is_some_and(|k| starts_with_any(lines[k], KANIKO_PUSH));
            if push {
                ("PushFailed", said("the push failed", code, &lines, key))
            } else {
                ("BuildFailed", said("the build failed", code, &lines, key))
            }
        }
        BuildStep::Buildpack => {
            let key = lines
                .iter()
                .rposition(|l| l.starts_with("ERROR: "))
                .or_else(|| lines.len().checked_sub(1));
            let error = key.map(|k| lines[k]).unwrap_or_default();
            let push = (code == LIFECYCLE_EXPORT_FAILED && !error.contains("failed to write export report"))
                || error.contains("validating registry write access");
            if push {
                (
                    "PushFailed",
                    said(
                        "the image could not be written to the registry",
                        code,
                        &lines,
                        key,
                    ),
                )
            } else {
                ("BuildFailed", said("the build failed", code, &lines, key))
            }
        }
    }
}

fn starts_with_any(line: &str, prefixes: &[&str]) -> bool {
    prefixes.iter().any(|p| line.starts_with(p))
}

/// `<what> (exit N): <the key line>`, and the lines before it for context.
fn said(what: &str, code: i32, lines: &[&str], key: Option<usize>) -> String {
    match key {
        Some(key) => format!("{what} (exit {code}): {}{}", lines[key], tail(lines, Some(key))),
        None => format!("{what} (exit {code}) and printed nothing"),
    }
}

/// Up to five lines before `before` (or the last five), on lines of their own.
fn tail(lines: &[&str], before: Option<usize>) -> String {
    let end = before.unwrap_or(lines.len());
    let context = &lines[end.saturating_sub(5)..end];
    if context.is_empty() {
        return String::new();
    }
    format!("\n{}", context.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(step: BuildStep, exit_code: i32, said: &str) -> Ended<'_> {
        Ended {
            step,
            exit_code,
            reason: Some("Error"),
            said,
            memory_limit: Some("2Gi"),
        }
    }

    #[test]
    fn kaniko_push_and_build_errors_are_told_apart_by_its_own_final_line() {
        use BuildStep::Kaniko;
        // Exactly as cmd/executor/cmd/root.go wraps them.
        let permissions = "INFO[0000] Retrieving image manifest debian:12\nerror checking push permissions -- make sure you entered the correct tag name, and that you are authenticated correctly, and try again: checking push permission for \"registry.example.com/shop/web:abc\": POST https://registry.example.com/v2/shop/web/blobs/uploads/: UNAUTHORIZED: authentication required";
        let (reason, message) = classify(&ended(Kaniko, 1, permissions));
        assert_eq!(reason, "PushFailed");
        assert!(
            message.starts_with("the push failed (exit 1): error checking push permissions"),
            "{message}"
        );
        assert!(
            message.ends_with("Retrieving image manifest debian:12"),
            "context follows: {message}"
        );
        let pushing = "INFO[0012] Pushing image to registry.example.com/shop/web:abc\nerror pushing image: failed to push to destination registry.example.com/shop/web:abc: PUT https://registry.example.com/v2/shop/web/manifests/abc: DENIED: requested access to the resource is denied";
        assert_eq!(classify(&ended(Kaniko, 1, pushing)).0, "PushFailed");
        // A failed RUN: kaniko's exit code is the command's; the log says "registry" and
        // "denied" (a guess by words would call it a push failure).
        let run = "INFO[0003] RUN curl https://registry.npmjs.org/x\ncurl: (22) The requested URL returned error: 403 access denied\nerror building image: error building stage: failed to execute command: waiting for process to exit: exit status 22";
        let (reason, message) = classify(&ended(Kaniko, 22, run));
        assert_eq!(reason, "BuildFailed");
        assert!(message.starts_with("the build failed (exit 22): error building image: error building stage: failed to execute command"));
        assert!(message.contains("403 access denied"));
        // A base image that cannot be pulled is a build failure, not a push one.
        let base = "error building image: unable to complete operation after 0 attempts, last error: GET https://registry.example.com/v2/base/manifests/1: UNAUTHORIZED: authentication required";
        assert_eq!(classify(&ended(Kaniko, 1, base)).0, "BuildFailed");
        let setup = "Error: error resolving dockerfile path: please provide a valid path to a Dockerfile within the build context with --dockerfile\nUsage:\n  executor [flags]";
        let (reason, message) = classify(&ended(Kaniko, 1, setup));
        assert_eq!(reason, "BuildFailed");
        assert!(message.contains("error resolving dockerfile path"), "{message}");
    }

    #[test]
    fn a_digest_left_by_a_failed_kaniko_means_the_push_failed() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let (reason, message) = classify(&ended(BuildStep::Kaniko, 1, &digest));
        assert_eq!(reason, "PushFailed");
        assert_eq!(
            message,
            format!("kaniko built the image ({digest}) but did not push it (exit 1)")
        );
        // With the log the agent read: the error too.
        let with_log = format!("{digest}\nerror pushing image: failed to push to destination r/x:1: DENIED");
        let (reason, message) = classify(&ended(BuildStep::Kaniko, 1, &with_log));
        assert_eq!(reason, "PushFailed");
        assert!(message.ends_with(": error pushing image: failed to push to destination r/x:1: DENIED"));
        assert!(needs_log(&digest) && needs_log("  \n") && !needs_log("error building image: x"));
    }

    #[test]
    fn lifecycle_phase_exit_codes_and_errors_decide_for_buildpacks() {
        use BuildStep::Buildpack;
        let export = "===> EXPORTING\nERROR: failed to export: failed to write image to the following tags: [registry.example.com/shop/web:abc: PUT https://registry.example.com/v2/shop/web/manifests/abc: DENIED: denied]";
        let (reason, message) = classify(&ended(Buildpack, 62, export));
        assert_eq!(reason, "PushFailed");
        assert!(
            message.contains("(exit 62): ERROR: failed to export"),
            "{message}"
        );
        let access = "===> ANALYZING\nERROR: failed to initialize analyzer: validating registry write access: failed to ensure registry read/write access to registry.example.com/shop/web:abc";
        assert_eq!(classify(&ended(Buildpack, 1, access)).0, "PushFailed");
        let run_image = "ERROR: failed to initialize analyzer: validating registry read access: failed to ensure registry read access to run:1";
        assert_eq!(classify(&ended(Buildpack, 1, run_image)).0, "BuildFailed");
        let detect = "===> DETECTING\nERROR: No buildpack groups passed detection.\nERROR: failed to detect: buildpack(s) failed with err";
        let (reason, message) = classify(&ended(Buildpack, 20, detect));
        assert_eq!(reason, "BuildFailed");
        assert!(
            message.contains("(exit 20): ERROR: failed to detect"),
            "{message}"
        );
        let build = "===> BUILDING\nnpm ERR! missing script: build\nERROR: failed to build: exit status 1";
        assert_eq!(classify(&ended(Buildpack, 51, build)).0, "BuildFailed");
    }

    #[test]
    fn out_of_memory_and_clone_failures_say_so() {
        let mut killed = ended(BuildStep::Kaniko, 137, "");
        killed.reason = Some("OOMKilled");
        let (reason, message) = classify(&killed);
        assert_eq!(reason, "BuildOutOfMemory");
        assert!(
            message.contains("memory limit of 2Gi (exit 137, OOMKilled)"),
            "{message}"
        );
        let clone =
            "Cloning\nfatal: could not read Username for 'https://github.com': terminal prompts disabled";
        let (reason, message) = classify(&ended(BuildStep::Clone, 128, clone));
        assert_eq!(reason, "CloneFailed");
        assert!(
            message.starts_with("git clone failed (exit 128): fatal: could not read Username"),
            "{message}"
        );
        let (reason, message) = classify(&ended(BuildStep::Clone, 1, ""));
        assert_eq!(
            (reason, message.as_str()),
            ("CloneFailed", "git clone failed (exit 1) and printed nothing")
        );
    }
}
