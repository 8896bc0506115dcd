//! Guardrails on what a task may change (`[policy]`): the paths it may and may not touch, how
//! many files and lines, and content no change may add (private keys, tokens). Checked on a
//! task's change before it is committed; a violation fails the attempt with class `policy`, which
//! is never retried (the same change would be refused again).

use std::sync::OnceLock;

/// How globs match paths: `*` stays within one name and matches names starting with `.`; `**`
/// crosses directories.
const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// The change limits of a task, as the clusterfile's `[policy]` gives them.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ChangePolicy {
    /// Lists of globs, one per policy that has `allowed_paths` (the clusterfile's, an
    /// operator's): every changed path must match a glob of each.
    pub allowed_paths: Vec<Vec<String>>,
    /// Globs: no changed path may match one.
    pub denied_paths: Vec<String>,
    pub max_files_changed: Option<u64>,
    /// Lines added plus lines removed, over all files.
    pub max_lines_changed: Option<u64>,
    /// Refuse added lines that look like credentials (private keys, cloud and forge tokens).
    pub forbid_credentials: bool,
}

/// One changed file: its path, and its added lines (for content checks).
pub struct Changed<'a> {
    pub path: &'a str,
    pub added: u64,
    pub removed: u64,
    pub added_text: &'a str,
}

fn matches(pattern: &str, path: &str) -> bool {
    glob::Pattern::new(pattern).is_ok_and(|p| p.matches_with(path, MATCH))
}

/// What credentials look like: (name, pattern).
fn credential_patterns() -> &'static [(&'static str, regex::Regex)] {
    static PATTERNS: OnceLock<Vec<(&'static str, regex::Regex)>> = OnceLock::new();
    PATTERNS.get_or_init(|| {
        [
            (
                "a private key",
                r"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED |PGP )?PRIVATE KEY(?: BLOCK)?-----",
            ),
            ("an AWS access key id", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
            ("a GitHub token", r"\b(?:gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{60,})\b"),
            ("an Anthropic API key", r"\bsk-ant-[A-Za-z0-9_\-]{20,}"),
            ("a Slack token", r"\bxox[abposr]-[A-Za-z0-9-]{10,}"),
            ("a Google API key", r"\bAIza[0-9A-Za-z_\-]{35}\b"),
        ]
        .into_iter()
        .filter_map(|(name, p)| regex::Regex::new(p).ok().map(|r| (name, r)))
        .collect()
    })
}

impl ChangePolicy {
    /// Whether it limits anything.
    pub fn is_empty(&self) -> bool {
        *self == ChangePolicy::default()
    }

    /// Lays another policy over this one: the stricter of each wins.
    pub fn tighten(&mut self, other: ChangePolicy) {
        self.allowed_paths.extend(other.allowed_paths);
        for p in other.denied_paths {
            if !self.denied_paths.contains(&p) {
                self.denied_paths.push(p);
            }
        }
        let least = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max_files_changed = least(self.max_files_changed, other.max_files_changed);
        self.max_lines_changed = least(self.max_lines_changed, other.max_lines_changed);
        self.forbid_credentials |= other.forbid_credentials;
    }

    /// In words, for `plan`: `paths src/** (not .github/**) | at most 20 files, 500 lines |
    /// credentials refused`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        let mut paths = self
            .allowed_paths
            .iter()
            .map(|set| set.join(", "))
            .collect::<Vec<_>>()
            .join(" and ");
        if paths.is_empty() {
            paths = "any".into();
        }
        if !self.denied_paths.is_empty() {
            paths.push_str(&format!(" (not {})", self.denied_paths.join(", ")));
        }
        parts.push(format!("paths {paths}"));
        let mut sizes = Vec::new();
        if let Some(f) = self.max_files_changed {
            sizes.push(format!("{f} files"));
        }
        if let Some(l) = self.max_lines_changed {
            sizes.push(format!("{l} lines"));
        }
        if !sizes.is_empty() {
            parts.push(format!("at most {}", sizes.join(", ")));
        }
        parts.push(
            if self.forbid_credentials {
                "credentials refused"
            } else {
                "credentials not checked"
            }
            .into(),
        );
        parts.join(" | ")
    }

    /// The first violation of the policy by `changes`, in words (naming the file, never the
    /// content it found).
    pub fn violation(&self, changes: &[Changed<'_>]) -> Option<String> {
        for c in changes {
            if let Some(p) = self.denied_paths.iter().find(|p| matches(p, c.path)) {
                return Some(format!(
                    "`{}` may not be changed: it matches the policy's denied path `{p}`",
                    c.path
                ));
            }
            if let Some(allowed) = self
                .allowed_paths
                .iter()
                .find(|set| !set.iter().any(|p| matches(p, c.path)))
            {
                return Some(format!(
                    "`{}` may not be changed: it matches none of the policy's allowed paths ({})",
                    c.path,
                    allowed
                        .iter()
                        .map(|p| format!("`{p}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
        if let Some(max) = self.max_files_changed {
            if changes.len() as u64 > max {
                return Some(format!(
                    "{} files changed, more than the policy's `max_files_changed = {max}`",
                    changes.len()
                ));
            }
        }
        if let Some(max) = self.max_lines_changed {
            let lines: u64 = changes.iter().map(|c| c.added + c.removed).sum();
            if lines > max {
                return Some(format!(
                    "{lines} lines changed, more than the policy's `max_lines_changed = {max}`"
                ));
            }
        }
        if self.forbid_credentials {
            for c in changes {
                for (what, pattern) in credential_patterns() {
                    if let Some(line) = c.added_text.lines().position(|l| pattern.is_match(l)) {
                        return Some(format!(
                            "`{}` adds what looks like {what} (added line {}); credentials do not belong in a commit",
                            c.path,
                            line + 1
                        ));
                    }
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change<'a>(path: &'a str, added_text: &'a str) -> Changed<'a> {
        Changed {
            path,
            added: added_text.lines().count() as u64,
            removed: 0,
            added_text,
        }
    }

    #[test]
    fn paths_are_allowed_and_denied_by_glob() {
        let policy = ChangePolicy {
            allowed_paths: vec![vec!["src/**".into(), "docs/*.md".into()]],
            denied_paths: vec!["src/secrets/**".into(), "**/.env".into()],
            ..ChangePolicy::default()
        };
        assert_eq!(policy.violation(&[change("src/a/b.rs", "x")]), None);
        assert_eq!(policy.violation(&[change("docs/x.md", "x")]), None);
        let denied = policy
            .violation(&[change("src/secrets/k.rs", "x")])
            .unwrap();
        assert!(denied.contains("denied path `src/secrets/**`"), "{denied}");
        let env = policy.violation(&[change("src/app/.env", "x")]).unwrap();
        assert!(env.contains("`**/.env`"), "{env}");
        let outside = policy.violation(&[change("docs/a/b.md", "x")]).unwrap();
        assert!(
            outside.contains("none of the policy's allowed paths"),
            "{outside}"
        );
    }

    #[test]
    fn sizes_are_limited() {
        let policy = ChangePolicy {
            max_files_changed: Some(1),
            max_lines_changed: Some(3),
            ..ChangePolicy::default()
        };
        assert_eq!(policy.violation(&[change("a", "1\n2\n3\n")]), None);
        assert!(policy
            .violation(&[change("a", "1"), change("b", "2")])
            .unwrap()
            .contains("2 files changed"));
        assert!(policy
            .violation(&[change("a", "1\n2\n3\n4\n")])
            .unwrap()
            .contains("4 lines changed"));
    }

    #[test]
    fn credentials_are_refused_without_being_repeated() {
        let policy = ChangePolicy {
            forbid_credentials: true,
            ..ChangePolicy::default()
        };
        let key = "ok\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n";
        let found = policy.violation(&[change("id_ed25519", key)]).unwrap();
        assert!(
            found.contains("looks like a private key (added line 2)"),
            "{found}"
        );
        assert!(!found.contains("b3Blbn"));
        let token = format!("token = \"ghp_{}\"\n", "a".repeat(36));
        assert!(policy
            .violation(&[change("cfg.toml", &token)])
            .unwrap()
            .contains("a GitHub token"));
        assert_eq!(
            policy.violation(&[change("README.md", "the AKIA prefix is how keys start\n")]),
            None
        );
    }
}
