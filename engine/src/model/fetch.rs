//! Fetching `git+` templates: a spec is checked so that nothing in it can reach git as an option or
//! choose a transport, and git runs with only known protocols allowed and no hooks.
//!
//! A spec comes from a clusterfile or from a template, which may come from anyone: everything in it
//! that reaches a `git` command line is checked here first, and git is told to refuse anything the
//! checks might miss (`protocol.allow`, `--` before positionals).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The protocols a template repository may be fetched over (git's names, for `protocol.allow`).
const PROTOCOLS: [&str; 3] = ["https", "ssh", "file"];

/// A `git+<url>#<ref>:<path>` spec, checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GitSpec<'a> {
    pub url: &'a str,
    pub reference: &'a str,
    pub path: &'a str,
}

impl<'a> GitSpec<'a> {
    /// Splits and checks a spec (with its `git+` prefix): the ref is what follows the last `#`,
    /// the path what follows the first `:` after it.
    pub fn parse(spec: &'a str) -> Result<GitSpec<'a>, String> {
        let rest = spec
            .strip_prefix("git+")
            .ok_or_else(|| format!("`{}` does not start with `git+`", printable(spec)))?;
        let (url, tail) = rest
            .rsplit_once('#')
            .ok_or_else(|| format!("`{}` has no `#<ref>:<path>`", printable(spec)))?;
        let (reference, path) = tail
            .split_once(':')
            .ok_or_else(|| format!("`{}` has no `:<path>` after its ref", printable(spec)))?;
        check_url(url)?;
        check_reference(reference)?;
        check_path(path)?;
        Ok(GitSpec {
            url,
            reference,
            path,
        })
    }
}

/// `s` with control characters (newlines, escapes) written as escapes, for messages.
pub fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A full commit id (SHA-1 or SHA-256), as `git rev-parse` prints it.
pub fn is_commit_id(s: &str) -> bool {
    matches!(s.len(), 40 | 64)
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A host name or an IPv4 address, with an optional numeric port: never something `ssh` could
/// read as an option, nor anything git would decode first.
fn valid_host(host: &str) -> bool {
    let (name, port) = host.split_once(':').unwrap_or((host, "1"));
    name.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        && !port.is_empty()
        && port.chars().all(|c| c.is_ascii_digit())
}

fn valid_user(user: &str) -> bool {
    user.chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
}

/// Splits `user@host` (the user is optional) and checks both.
fn valid_authority(authority: &str) -> bool {
    match authority.rsplit_once('@') {
        Some((user, host)) => valid_user(user) && valid_host(host),
        None => valid_host(authority),
    }
}

/// Only `https://`, `ssh://`, `file:///`, an absolute local path, or scp-like `[user@]host:path`;
/// no transport helper (`ext::`, `fd::`), no option, no whitespace or control character.
fn check_url(url: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "the repository URL `{}` is not allowed: {why}",
            printable(url)
        ))
    };
    if url.is_empty() {
        return refuse("it is empty");
    }
    if url.starts_with('-') {
        return refuse("it starts with `-`, like an option");
    }
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return refuse("it contains whitespace or a control character");
    }
    if url.contains("::") {
        return refuse("`<transport>::` addresses run programs; use https://, ssh:// or file://");
    }
    let authority_and_path = |rest: &str| -> bool {
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        valid_authority(authority) && !path.is_empty()
    };
    if let Some(rest) = url.strip_prefix("https://") {
        if authority_and_path(rest) {
            return Ok(());
        }
        return refuse("expected https://[user@]host[:port]/path");
    }
    if let Some(rest) = url.strip_prefix("ssh://") {
        if authority_and_path(rest) {
            return Ok(());
        }
        return refuse("expected ssh://[user@]host[:port]/path");
    }
    if let Some(rest) = url.strip_prefix("file://") {
        if rest.starts_with('/') {
            return Ok(());
        }
        return refuse("expected file:///absolute/path");
    }
    if url.starts_with('/') {
        return Ok(());
    }
    if let Some((scheme, _)) = url.split_once("://") {
        return refuse(&format!(
            "`{}://` is not one of https://, ssh://, file://",
            printable(scheme)
        ));
    }
    // scp-like `[user@]host:path`, which git reads as ssh when no `/` comes before the `:`.
    if let Some((authority, path)) = url.split_once(':') {
        if !authority.contains('/') && valid_authority(authority) {
            if path.is_empty() || path.starts_with('-') {
                return refuse("the path after `host:` is empty or starts with `-`");
            }
            return Ok(());
        }
    }
    refuse("use https://, ssh://, [user@]host:path, file:///path or an absolute path")
}

/// A branch, a tag or another ref name git accepts (`git check-ref-format --allow-onelevel`), or
/// a full commit id; never anything that starts like an option or a forced refspec.
fn check_reference(reference: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "the ref `{}` is not allowed: {why}",
            printable(reference)
        ))
    };
    if reference.is_empty() {
        return refuse("it is empty");
    }
    if reference.starts_with('-') || reference.starts_with('+') {
        return refuse("it starts with `-` or `+`");
    }
    if is_commit_id(reference) {
        return Ok(());
    }
    let valid = git_command(None)
        .args(["check-ref-format", "--allow-onelevel", reference])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("cannot run git: {e}"))?
        .success();
    if !valid {
        return refuse("it is not a valid ref name (`git check-ref-format`)");
    }
    Ok(())
}

/// A relative path inside the repository: no `..`, nothing that starts with `-`.
fn check_path(path: &str) -> Result<(), String> {
    let refuse = |why: &str| {
        Err(format!(
            "the path `{}` is not allowed: {why}",
            printable(path)
        ))
    };
    if path.is_empty() {
        return refuse("it is empty");
    }
    if path.starts_with('-') || path.starts_with('/') {
        return refuse("it must be relative to the repository and not start with `-`");
    }
    if path.chars().any(char::is_control) {
        return refuse("it contains a control character");
    }
    if path.split('/').any(|part| part == "..") {
        return refuse("it must not contain `..`");
    }
    Ok(())
}

/// `git` with nothing of the caller's git environment, no prompt, no hooks, and only the
/// [`PROTOCOLS`] allowed (also for redirects and anything the remote suggests, like bundle URIs).
fn git_command(git_dir: Option<&Path>) -> Command {
    let mut cmd = Command::new("git");
    cmd.env_clear();
    // What ssh and https need to authenticate and reach the network as the user would.
    for key in [
        "PATH",
        "HOME",
        "USER",
        "TMPDIR",
        "SSH_AUTH_SOCK",
        "HTTPS_PROXY",
        "https_proxy",
        "NO_PROXY",
        "no_proxy",
    ] {
        if let Some(v) = std::env::var_os(key) {
            cmd.env(key, v);
        }
    }
    cmd.env("LC_ALL", "C")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_ALLOW_PROTOCOL", PROTOCOLS.join(":"))
        .stdin(Stdio::null());
    cmd.args(["-c", "protocol.allow=never"]);
    for protocol in PROTOCOLS {
        cmd.arg("-c")
            .arg(format!("protocol.{protocol}.allow=always"));
    }
    cmd.args([
        "-c",
        "core.hooksPath=/dev/null",
        "-c",
        "core.fsmonitor=false",
        "-c",
        "transfer.bundleURI=false",
    ]);
    if let Some(dir) = git_dir {
        // Explicit, so a missing cache repository is never looked for in a parent directory.
        let mut arg = std::ffi::OsString::from("--git-dir=");
        arg.push(dir);
        cmd.arg(arg);
    }
    cmd
}

fn run(git_dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = git_command(Some(git_dir))
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`git {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The bare repository a URL's commits are cached in: `<cache>/git/<hash>`.
pub struct CachedRepo {
    dir: PathBuf,
}

impl CachedRepo {
    /// The cache of `url` under `cache` (`<state>/templates`); nothing is created yet.
    pub fn new(cache: &Path, url: &str) -> CachedRepo {
        CachedRepo {
            dir: cache
                .join("git")
                .join(&blake3::hash(url.as_bytes()).to_hex()[..16]),
        }
    }

    /// Whether `commit` (a full id) is in the cache, so it can be read without fetching.
    pub fn has(&self, commit: &str) -> bool {
        is_commit_id(commit)
            && self.dir.join("HEAD").exists()
            && run(
                &self.dir,
                &["cat-file", "-e", &format!("{commit}^{{commit}}")],
            )
            .is_ok()
    }

    fn ensure(&self) -> Result<(), String> {
        if self.dir.join("HEAD").exists() {
            return Ok(());
        }
        crate::store::create_private_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let dir = self.dir.to_string_lossy().into_owned();
        run(&self.dir, &["init", "--quiet", "--bare", "--", &dir]).map(drop)
    }

    /// Fetches `reference` of `url`; the commit it names.
    pub fn fetch_ref(&self, url: &str, reference: &str) -> Result<String, String> {
        self.ensure()?;
        run(
            &self.dir,
            &["fetch", "--quiet", "--no-tags", "--", url, reference],
        )
        .map_err(|e| format!("cannot fetch `{reference}` of `{url}`: {e}"))?;
        let commit = run(
            &self.dir,
            &["rev-parse", "--verify", "--quiet", "FETCH_HEAD^{commit}"],
        )?
        .trim()
        .to_string();
        if !is_commit_id(&commit) {
            return Err(format!("`{reference}` of `{url}` is not a commit"));
        }
        Ok(commit)
    }

    /// Fetches every ref of `url`, to find a pinned commit no longer at its ref.
    pub fn fetch_all(&self, url: &str) -> Result<(), String> {
        self.ensure()?;
        run(
            &self.dir,
            &[
                "fetch",
                "--quiet",
                "--no-tags",
                "--",
                url,
                "+refs/*:refs/remotes/origin/*",
            ],
        )
        .map(drop)
        .map_err(|e| format!("cannot fetch `{url}`: {e}"))
    }

    /// The text of `path` at `commit`.
    pub fn read(&self, commit: &str, path: &str) -> Result<String, String> {
        if !is_commit_id(commit) {
            return Err(format!("`{}` is not a commit id", printable(commit)));
        }
        // `cat-file blob` applies no filter or text conversion; the object name starts with the
        // commit's hex digits, so it cannot be read as an option.
        let out = git_command(Some(&self.dir))
            .args(["cat-file", "blob", &format!("{commit}:{path}")])
            .output()
            .map_err(|e| format!("cannot run git: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`{path}` is not a file of the repository at {commit}"
            ));
        }
        String::from_utf8(out.stdout)
            .map_err(|_| format!("`{path}` at {commit} is not UTF-8 text, so not a template"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_urls_are_accepted() {
        for url in [
            "https://github.com/acme/flows",
            "https://user@git.example.com:8443/acme/flows.git",
            "ssh://git@github.com/acme/flows.git",
            "git@github.com:acme/flows.git",
            "github.com:acme/flows",
            "file:///srv/flows",
            "/srv/flows",
        ] {
            assert_eq!(check_url(url), Ok(()), "{url}");
        }
    }

    #[test]
    fn options_transports_and_odd_urls_are_refused() {
        for url in [
            "--upload-pack=touch /tmp/x;#",
            "-uevil",
            "--config=core.sshCommand=evil",
            "ext::sh -c touch% /tmp/x",
            "ext::sh",
            "fd::3",
            "foo::bar",
            "https://host/a::b",
            "ssh://git@[::1]:22/flows",
            "ssh://[-oProxyCommand=evil]/x",
            "[-oProxyCommand=evil]:x",
            "[host]:x",
            "ssh://host:-oProxyCommand=evil/x",
            "ssh://host:22x/x",
            "https://host:/x",
            "ssh://-oProxyCommand=evil/x",
            "ssh://%2DoProxyCommand=evil/x",
            "ssh://user@-oProxyCommand=evil/x",
            "ssh://-user@host/x",
            "-oProxyCommand=evil:x",
            "host:-x",
            "http://example.com/flows",
            "git://example.com/flows",
            "https://",
            "https://host",
            "file://relative/path",
            "relative/path",
            "./flows",
            "",
            "https://host/a b",
            "https://host/a\nb",
            "https://host/a\tb",
            "ssh://host\u{0}/x",
        ] {
            assert!(check_url(url).is_err(), "{url:?} was accepted");
        }
    }

    #[test]
    fn refs_are_ref_names_or_commit_ids() {
        for ok in [
            "main",
            "v1.2",
            "refs/tags/v1",
            "HEAD",
            "feature/x",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert_eq!(check_reference(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "--upload-pack=x",
            "-x",
            "+main",
            "a..b",
            "a@{1}",
            "a b",
            "a\nb",
            "a:b",
            "a^",
            "a~1",
            "*",
            "a?",
            "a[",
            "a\\b",
            "refs/heads/x.lock",
            "/main",
        ] {
            assert!(check_reference(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn paths_stay_inside_the_repository() {
        for ok in ["say.toml", "flows/review/deep.toml", "a-b.kdl"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "--output=/tmp/x",
            "/etc/passwd",
            "../x.toml",
            "a/../../x.toml",
            "a/..",
            "a\nb",
        ] {
            assert!(check_path(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn a_spec_splits_at_the_last_hash_and_the_first_colon_after_it() {
        assert_eq!(
            GitSpec::parse("git+https://h/a#b#main:dir/t.toml"),
            Ok(GitSpec {
                url: "https://h/a#b",
                reference: "main",
                path: "dir/t.toml"
            })
        );
        // The example: an option in the URL position, then in the ref position.
        assert!(GitSpec::parse("git+--upload-pack=touch /tmp/x;#.:tpl.toml").is_err());
        assert!(GitSpec::parse("git+file:///srv/flows#--upload-pack=x:tpl.toml").is_err());
        assert!(GitSpec::parse("git+file:///srv/flows#main:-tpl.toml").is_err());
    }

    #[test]
    fn commit_ids_are_full_lowercase_hex() {
        assert!(is_commit_id("0123456789abcdef0123456789abcdef01234567"));
        assert!(!is_commit_id("0123456789ABCDEF0123456789abcdef01234567"));
        assert!(!is_commit_id("--upload-pack=0123456789abcdef0123456789"));
        assert!(!is_commit_id("abc123"));
    }
}
