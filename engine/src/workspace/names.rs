//! Names ccluster derives from plan node ids and users' arguments: [`RefName`], a full ref name
//! checked against git's own rules (`git check-ref-format`) before any git command sees it, and
//! the injective encodings of plan node ids into ref paths ([`node_ref_name`]) and file names
//! ([`node_file_name`]), and where a run's refs live ([`task_refs_prefix`], [`result_branch`]).

use std::fmt;

/// A full ref name (`refs/heads/ccluster/<run>/edit/2`) that follows git's rules for ref names.
/// Only [`RefName::new`] and [`RefName::branch`] make one, so a name built from a task id, a run id
/// or a user's argument cannot reach a ref script or a git command line unchecked: a newline
/// cannot start a second `update-ref` command, and a leading `-` cannot become an option.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RefName(String);

impl RefName {
    /// A full ref name under `refs/`.
    pub fn new(name: impl Into<String>) -> Result<RefName, String> {
        let name = name.into();
        if !name.starts_with("refs/") {
            return Err(format!(
                "`{}` is not a ref name under `refs/`",
                name.escape_debug()
            ));
        }
        check_ref_format(&name)
            .map_err(|why| format!("`{}` is not a valid ref name: {why}", name.escape_debug()))?;
        Ok(RefName(name))
    }

    /// The branch `refs/heads/<name>` for a name a user gave (`export --branch`): besides git's
    /// rules, it may not start with `-` (git refuses such branch names; as an argument it would
    /// read as an option) nor be `HEAD`.
    pub fn branch(name: &str) -> Result<RefName, String> {
        if name.starts_with('-') {
            return Err(format!(
                "`{}` is not a valid branch name: it starts with `-`",
                name.escape_debug()
            ));
        }
        if name == "HEAD" || name.starts_with("refs/") {
            return Err(format!(
                "`{}` is not a valid branch name: give the short name, not `HEAD` or `refs/...`",
                name.escape_debug()
            ));
        }
        RefName::new(format!("refs/heads/{name}"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The branch's short name (`ccluster/<run>/edit`) when the ref is under `refs/heads/`.
    pub fn short_branch(&self) -> Option<&str> {
        self.0.strip_prefix("refs/heads/")
    }
}

impl fmt::Display for RefName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for RefName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Where a run keeps the commit of each of its plan nodes: `refs/ccluster/runs/<run>/`, outside
/// `refs/heads/`, so that `git branch` lists only results. `git for-each-ref refs/ccluster/runs/`
/// lists them; `git log refs/ccluster/runs/<run>/edit/2` shows one.
pub fn task_refs_prefix(run: &str) -> String {
    format!("refs/ccluster/runs/{run}/")
}

/// Where runs made before the hidden refs kept their nodes' commits, as branches:
/// `refs/heads/ccluster/<run>/`. The result branch of every run lives there too.
pub fn legacy_task_refs_prefix(run: &str) -> String {
    format!("refs/heads/ccluster/{run}/")
}

/// A plan node's ref under a prefix: `refs/ccluster/runs/<run>/edit/2`.
pub fn node_ref(prefix: &str, node: &str) -> String {
    format!("{prefix}{}", node_ref_name(node))
}

/// The branch of a run's result: `refs/heads/ccluster/<run>/<result node>`, the one branch a run
/// adds.
pub fn result_branch(run: &str, node: &str) -> String {
    node_ref(&legacy_task_refs_prefix(run), node)
}

/// The rules of `git check-ref-format` (without `--allow-onelevel` or `--refspec-pattern`), for a
/// full ref name; `Err` says which one is broken.
fn check_ref_format(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    if name == "@" {
        return Err("it is `@`");
    }
    if name.starts_with('/') || name.ends_with('/') {
        return Err("it starts or ends with `/`");
    }
    if name.ends_with('.') {
        return Err("it ends with `.`");
    }
    if name.contains("..") {
        return Err("it contains `..`");
    }
    if name.contains("@{") {
        return Err("it contains `@{`");
    }
    if !name.contains('/') {
        return Err("it has a single component");
    }
    if let Some(c) = name.chars().find(|c| {
        c.is_ascii_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\')
    }) {
        return Err(if c.is_ascii_control() {
            "it contains a control character"
        } else {
            "it contains one of ` ~^:?*[\\`"
        });
    }
    for component in name.split('/') {
        if component.is_empty() {
            return Err("it contains `//`");
        }
        if component.starts_with('.') {
            return Err("a component starts with `.`");
        }
        if component.ends_with(".lock") {
            return Err("a component ends with `.lock`");
        }
    }
    Ok(())
}

/// Whether `s` is a full object id (SHA-1 or SHA-256, lowercase hex), as `rev-parse` prints it.
pub fn is_object_id(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The trailing instance indices of a plan node id (`edit[2]` → (`edit`, [`2`]); `a[1][0]` →
/// (`a`, [`1`, `0`])): `[` + digits (or `*`, a dynamic placeholder, when `star`) + `]`, at the end
/// only. Anything else bracketed is part of the id.
fn split_indices(node: &str, star: bool) -> (&str, Vec<&str>) {
    let mut base = node;
    let mut indices = Vec::new();
    while let Some(inner) = base.strip_suffix(']') {
        let Some(open) = inner.rfind('[') else { break };
        let index = &inner[open + 1..];
        let valid = (!index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
            || (star && index == "*");
        if !valid {
            break;
        }
        indices.push(index);
        base = &inner[..open];
    }
    indices.reverse();
    (base, indices)
}

fn push_escaped(out: &mut String, c: char) {
    let mut buf = [0u8; 4];
    for b in c.encode_utf8(&mut buf).bytes() {
        out.push_str(&format!("%{b:02X}"));
    }
}

/// A plan node id as a ref path (`edit[2]` → `edit/2`, `review.fix` → `review.fix`), always a
/// valid part of a ref name, and injective: letters, digits, `_` and `-` stay; a `.` stays between
/// two of them (unless it would end a component in `.lock`); the trailing indices become
/// components; every other byte, `%` included, is written `%XX`. Decoding `%XX` and `/<digits>`
/// gives the id back, so two nodes never share a ref.
pub fn node_ref_name(node: &str) -> String {
    let (base, indices) = split_indices(node, false);
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let chars: Vec<char> = base.chars().collect();
    let mut out = String::with_capacity(base.len());
    for (i, &c) in chars.iter().enumerate() {
        let between = i > 0 && plain(chars[i - 1]) && chars.get(i + 1).is_some_and(|&n| plain(n));
        // `.lock` may not end a component (git's lock files).
        let ends_lock = chars.len() == i + 5
            && chars[i + 1..]
                .iter()
                .collect::<String>()
                .eq_ignore_ascii_case("lock");
        if plain(c) || (c == '.' && between && !ends_lock) {
            out.push(c);
        } else {
            push_escaped(&mut out, c);
        }
    }
    for index in indices {
        out.push('/');
        out.push_str(index);
    }
    out
}

/// A plan node id as a file name (`build[2]` → `build.2`, `review.fix` → `review.fix`), injective
/// so that two nodes never share a log, worktree or worker directory: letters, digits, `_` and `-`
/// stay; a `.` stays unless it starts the name or is followed by a digit or `*` (which would read
/// as an index); the trailing indices become `.<index>`; every other byte, `%` included, is
/// written `%XX`.
pub fn node_file_name(node: &str) -> String {
    let (base, indices) = split_indices(node, true);
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let chars: Vec<char> = base.chars().collect();
    let mut out = String::with_capacity(base.len());
    for (i, &c) in chars.iter().enumerate() {
        let keeps_dot = c == '.'
            && i > 0
            && !chars
                .get(i + 1)
                .is_some_and(|&n| n.is_ascii_digit() || n == '*');
        if plain(c) || keeps_dot {
            out.push(c);
        } else {
            push_escaped(&mut out, c);
        }
    }
    for index in indices {
        out.push('.');
        out.push_str(index);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_rules_are_enforced() {
        for bad in [
            "refs/heads/main\nupdate refs/heads/x",
            "refs/heads/a\0b",
            "refs/heads/a b",
            "refs/heads/a..b",
            "refs/heads/.hidden",
            "refs/heads/a.lock",
            "refs/heads/a.lock/b",
            "refs/heads/a/",
            "refs/heads//a",
            "refs/heads/a.",
            "refs/heads/a@{1}",
            "refs/heads/a~1",
            "refs/heads/a^",
            "refs/heads/a:b",
            "refs/heads/a?",
            "refs/heads/a*",
            "refs/heads/a[0]",
            "refs/heads/a\\b",
            "refs/heads/a\x7f",
            "heads/main",
            "-M",
            "",
        ] {
            assert!(RefName::new(bad).is_err(), "{bad:?} accepted");
        }
        for good in [
            "refs/heads/main",
            "refs/ccluster/keep/ab12",
            "refs/heads/a.b/c-d_e%2E",
        ] {
            assert!(RefName::new(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn agrees_with_git_check_ref_format() {
        for name in [
            "refs/heads/ok",
            "refs/heads/a..b",
            "refs/heads/a.lock",
            "refs/heads/.a",
            "refs/heads/a b",
            "refs/heads/a\tb",
            "refs/heads/a@{b",
            "refs/heads/a@b",
            "refs/heads/%41",
            "refs/heads/é",
            "refs/heads/a./b",
            "refs/heads/a/.b",
        ] {
            let git = std::process::Command::new("git")
                .args(["check-ref-format", name])
                .status()
                .expect("git runs")
                .success();
            assert_eq!(RefName::new(name).is_ok(), git, "{name:?}");
        }
    }

    #[test]
    fn user_branches_may_not_be_options() {
        for bad in [
            "-M",
            "--foo",
            "-",
            "--",
            "-d",
            "HEAD",
            "refs/heads/x",
            "a\nb",
            "a..b",
        ] {
            assert!(RefName::branch(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            RefName::branch("feature/x").unwrap().as_str(),
            "refs/heads/feature/x"
        );
    }

    #[test]
    fn object_ids() {
        assert!(is_object_id(&"a".repeat(40)));
        assert!(is_object_id(&"0".repeat(64)));
        assert!(!is_object_id(&format!("{}\n", "a".repeat(40))));
        assert!(!is_object_id("HEAD"));
        assert!(!is_object_id(&"A".repeat(40)));
    }

    #[test]
    fn node_ref_names_are_readable_valid_and_distinct() {
        assert_eq!(node_ref_name("edit"), "edit");
        assert_eq!(node_ref_name("edit[2]"), "edit/2");
        assert_eq!(node_ref_name("review.fix"), "review.fix");
        assert_eq!(node_ref_name("a[1][0]"), "a/1/0");
        let hostile = [
            "a.b",
            "a_b",
            "a%2Eb",
            "a\nb",
            "main\nupdate refs/heads/main 0000",
            "a..b",
            ".a",
            "a.",
            "a.lock",
            "a.LOCK",
            "a/b",
            "a b",
            "a[1]2",
            "a[1",
            "a[x]",
            "a@{1}",
            "-M",
            "é",
            "a~1",
            "a:b",
            "a[1]",
            "a/1",
        ];
        let mut seen = std::collections::HashMap::new();
        for id in hostile {
            let name = node_ref_name(id);
            assert!(
                RefName::new(format!("refs/heads/ccluster/run/{name}")).is_ok(),
                "{id:?} → {name:?} is not a valid ref"
            );
            if let Some(other) = seen.insert(name.clone(), id) {
                panic!("{id:?} and {other:?} share {name:?}");
            }
        }
    }

    #[test]
    fn a_runs_refs_are_hidden_and_only_its_result_is_a_branch() {
        let run = "20261125-094110.512-3fa2";
        assert_eq!(
            node_ref(&task_refs_prefix(run), "edit[2]"),
            format!("refs/ccluster/runs/{run}/edit/2")
        );
        assert_eq!(
            result_branch(run, "join"),
            format!("refs/heads/ccluster/{run}/join")
        );
        for id in ["a\nb", "-M", "a..b", "é", "a.lock"] {
            let name = node_ref(&task_refs_prefix(run), id);
            assert!(RefName::new(name.as_str()).is_ok(), "{name:?}");
            assert!(!name.starts_with("refs/heads/"), "{name:?}");
        }
    }

    #[test]
    fn node_file_names_are_readable_and_distinct() {
        assert_eq!(node_file_name("build"), "build");
        assert_eq!(node_file_name("build[2]"), "build.2");
        assert_eq!(node_file_name("shard[*]"), "shard.*");
        assert_eq!(node_file_name("review.fix"), "review.fix");
        assert_eq!(node_file_name("a_b"), "a_b");
        let ids = [
            "a.b", "a_b", "a%2Eb", "a[1]", "a.1", "a[1]2", "a[12]", "a[1][2]", "a.1.2", "a[*]",
            "a.*", "a*", "..", ".", "a/b", "a b", "a\nb", "a[1", "é", "a%2Fb",
        ];
        let mut seen = std::collections::HashMap::new();
        for id in ids {
            let name = node_file_name(id);
            assert!(
                !name.contains('/') && !name.starts_with('.'),
                "{id:?} → {name:?}"
            );
            if let Some(other) = seen.insert(name.clone(), id) {
                panic!("{id:?} and {other:?} share {name:?}");
            }
        }
    }
}
