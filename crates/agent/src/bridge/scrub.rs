//! Credential scrubbing of build logs before they leave the cluster. Builds print what their
//! tools print: a `git` error with the remote URL, a `curl -v` with its `Authorization`
//! header, a Dockerfile that echoes a token. The agent cannot know every secret, so it
//! removes what *looks* like one, line by line, before a byte is relayed or stored.
//!
//! Scrubbing is deterministic for a given input, whatever the read boundaries were: offsets
//! count scrubbed bytes, and a relay that re-reads a log after a reconnect produces the same
//! bytes and can skip the ones already delivered.

/// Longest line kept whole; a longer one is scrubbed and passed on in pieces of this size (a
/// secret split across two pieces may then survive: a trade for bounded memory).
pub const MAX_LINE: usize = 16 * 1024;

const MASK: &str = "***";

/// Splits a byte stream into lines and scrubs each one.
#[derive(Default)]
pub struct Scrubber {
    partial: Vec<u8>,
}

impl Scrubber {
    /// Scrubs the complete lines of `input` (and what accumulated before); keeps an
    /// unfinished last line for later.
    pub fn push(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(end) if self.partial.len() + end < MAX_LINE => {
                    self.partial.extend_from_slice(&rest[..=end]);
                    out.extend_from_slice(&scrub_line(&self.partial));
                    self.partial.clear();
                    rest = &rest[end + 1..];
                }
                _ => {
                    let room = MAX_LINE - self.partial.len();
                    let take = room.min(rest.len());
                    self.partial.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if self.partial.len() == MAX_LINE {
                        out.extend_from_slice(&scrub_line(&self.partial));
                        self.partial.clear();
                    }
                }
            }
        }
    }

    /// The unfinished last line, scrubbed (the log ended without a newline).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.partial.is_empty() {
            out.extend_from_slice(&scrub_line(&self.partial));
            self.partial.clear();
        }
    }
}

/// Everything the scrubbers look for, in one automaton: a line with none of these (nearly
/// every line of a build log) is passed on after a single scan.
fn suspects() -> &'static aho_corasick::AhoCorasick {
    static SUSPECTS: std::sync::OnceLock<aho_corasick::AhoCorasick> = std::sync::OnceLock::new();
    SUSPECTS.get_or_init(|| {
        let patterns = ["://", "PRIVATE KEY-----"]
            .iter()
            .chain(KEYWORDS)
            .chain(TOKEN_PREFIXES);
        aho_corasick::AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(patterns)
            .expect("fixed patterns")
    })
}

/// Scrubs one line (invalid UTF-8 is kept byte for byte where no secret is found).
pub fn scrub_line(line: &[u8]) -> Vec<u8> {
    if !suspects().is_match(line) {
        return line.to_vec();
    }
    let text = String::from_utf8_lossy(line);
    let mut scrubbed = text.to_string();
    scrub_url_userinfo(&mut scrubbed);
    scrub_after_keywords(&mut scrubbed);
    scrub_private_key_blocks(&mut scrubbed);
    scrub_token_shapes(&mut scrubbed);
    if scrubbed == text {
        line.to_vec()
    } else {
        scrubbed.into_bytes()
    }
}

/// `scheme://user:password@host` → `scheme://***@host`.
fn scrub_url_userinfo(text: &mut String) {
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let start = from + found + 3;
        let authority_end = text[start..]
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '\'')
            .map_or(text.len(), |i| start + i);
        // Only `user:password@`: a bare `git@` is a user name, not a secret.
        if let Some(at) = text[start..authority_end].rfind('@')
            && text[start..start + at].contains(':')
        {
            text.replace_range(start..start + at, MASK);
            from = start + MASK.len() + 1;
        } else {
            from = start;
        }
    }
}

/// Values after words that introduce secrets: `password=…`, `token: …`, `Authorization:
/// Bearer …`, `--password …`.
const KEYWORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "api-key",
    "access_key",
    "private_key",
    "authorization",
    "credentials",
];

/// Well-known token shapes: GitHub (`ghp_`, `gho_`, `ghs_`, `ghu_`, `ghr_`, `github_pat_`),
/// GitLab (`glpat-`), Slack (`xox?-`), AWS access key ids (`AKIA…`, `ASIA…`).
const TOKEN_PREFIXES: &[&str] = &[
    "ghp_",
    "gho_",
    "ghs_",
    "ghu_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "xoxa-",
    "AKIA",
    "ASIA",
];

fn scrub_after_keywords(text: &mut String) {
    let lower = text.to_ascii_lowercase();
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    for keyword in KEYWORDS {
        let mut from = 0;
        while let Some(found) = lower[from..].find(keyword) {
            let keyword_start = from + found;
            let mut i = keyword_start + keyword.len();
            from = i;
            // Rest of the word (`GIT_PASSWORD`, `tokens`), then the separator.
            while lower[i..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                i += 1;
            }
            let after_word = i;
            while lower[i..].starts_with(['"', '\'']) {
                i += 1;
            }
            // `key=value` and `key: value`; a space only after a flag (`--password value`):
            // in prose ("the token expired") the next word is not the secret.
            let flag = lower[..keyword_start].ends_with("--");
            let separated = lower[i..].starts_with([':', '=']) || (flag && lower[i..].starts_with(' '));
            if !separated || lower[after_word..].starts_with("  ") {
                continue;
            }
            while lower[i..].starts_with([':', '=', ' ', '"', '\'']) {
                i += 1;
            }
            // `Authorization: Bearer xyz`, `Basic xyz`: the scheme stays, the value goes.
            for scheme in ["bearer ", "basic ", "token "] {
                if lower[i..].starts_with(scheme) {
                    i += scheme.len();
                }
            }
            let end = lower[i..]
                .find(|c: char| {
                    c.is_whitespace() || c == '"' || c == '\'' || c == ',' || c == '&' || c == ';'
                })
                .map_or(lower.len(), |e| i + e);
            // Short words after "token" are prose ("token expired"), not secrets.
            if end - i >= 6 {
                cuts.push((i, end));
            }
        }
    }
    apply_cuts(text, cuts);
}

/// The body of a PEM private key, when one is printed on a line.
fn scrub_private_key_blocks(text: &mut String) {
    if text.contains("PRIVATE KEY-----") {
        let trimmed_end = text.trim_end_matches(['\n', '\r']).len();
        let newline = text[trimmed_end..].to_string();
        *text = format!("-----PRIVATE KEY {MASK}-----{newline}");
    }
}

/// Well-known token shapes ([`TOKEN_PREFIXES`]), wherever they appear.
fn scrub_token_shapes(text: &mut String) {
    let mut cuts = Vec::new();
    for prefix in TOKEN_PREFIXES {
        let mut from = 0;
        while let Some(found) = text[from..].find(prefix) {
            let start = from + found;
            let body_start = start + prefix.len();
            let end = text[body_start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
                .map_or(text.len(), |e| body_start + e);
            from = end.max(body_start);
            let at_word_start = start == 0 || !text[..start].ends_with(|c: char| c.is_ascii_alphanumeric());
            if at_word_start && end - body_start >= 12 {
                cuts.push((start, end));
            }
        }
    }
    apply_cuts(text, cuts);
}

/// Replaces byte ranges with the mask, merging overlaps, from the end so indices stay valid.
fn apply_cuts(text: &mut String, mut cuts: Vec<(usize, usize)>) {
    cuts.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::new();
    for (start, end) in cuts {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    for (start, end) in merged.into_iter().rev() {
        text.replace_range(start..end, MASK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrubbed(line: &str) -> String {
        String::from_utf8(scrub_line(line.as_bytes())).unwrap()
    }

    #[test]
    fn credentials_that_builds_print_are_masked() {
        let cases = [
            (
                "fatal: unable to access 'https://bob:s3cr3tpass@git.example.com/r.git/': 403",
                "fatal: unable to access 'https://***@git.example.com/r.git/': 403",
            ),
            (
                "> Authorization: Bearer eyJhbGciOiJIUzI1NiJ9.x.y",
                "> Authorization: Bearer ***",
            ),
            (
                "DB_PASSWORD=hunter2hunter2 npm run build",
                "DB_PASSWORD=*** npm run build",
            ),
            ("--password 'correct-horse-battery'", "--password '***'"),
            ("{\"token\": \"abcdef123456\"}", "{\"token\": \"***\"}"),
            (
                "cloning with ghp_0123456789abcdefABCDEF0123456789abcd",
                "cloning with ***",
            ),
            (
                "export AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE",
                "export AWS_ACCESS_KEY_ID=***",
            ),
            ("key: glpat-xxxxxxxxxxxxxxxxxxxx here", "key: *** here"),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\n",
                "-----PRIVATE KEY ***-----\n",
            ),
        ];
        for (input, expected) in cases {
            assert_eq!(scrubbed(input), expected, "{input}");
        }
    }

    #[test]
    fn ordinary_build_output_is_untouched() {
        for line in [
            "Step 3/7 : RUN npm ci\n",
            "INFO[0003] Pushing image to registry.local/p/web:abc1234\n",
            "the token expired, retrying\n",
            "Downloading https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz\n",
            "ssh://git@github.com/acme/web.git\n",
            "Successfully built 4f2d1c0e\n",
        ] {
            assert_eq!(scrubbed(line), line);
        }
        let binary = [0xff, 0xfe, b'o', b'k', b'\n'];
        assert_eq!(scrub_line(&binary), binary);
    }

    #[test]
    fn output_does_not_depend_on_how_the_input_was_split() {
        let log = "line one\nhttps://u:pw123456@h/x\npassword=abcdefgh\nno newline at the end";
        let whole = {
            let mut s = Scrubber::default();
            let mut out = Vec::new();
            s.push(log.as_bytes(), &mut out);
            s.finish(&mut out);
            out
        };
        for split in 1..log.len() {
            let mut s = Scrubber::default();
            let mut out = Vec::new();
            s.push(&log.as_bytes()[..split], &mut out);
            s.push(&log.as_bytes()[split..], &mut out);
            s.finish(&mut out);
            assert_eq!(out, whole, "split at {split}");
        }
        assert!(!String::from_utf8(whole).unwrap().contains("pw123456"));
    }

    #[test]
    fn long_lines_are_passed_on_in_bounded_pieces() {
        let mut s = Scrubber::default();
        let mut out = Vec::new();
        s.push(&vec![b'a'; MAX_LINE * 2 + 10], &mut out);
        assert_eq!(out.len(), MAX_LINE * 2);
        s.finish(&mut out);
        assert_eq!(out.len(), MAX_LINE * 2 + 10);
    }
}
