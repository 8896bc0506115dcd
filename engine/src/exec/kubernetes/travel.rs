//! How a worktree travels to a pod and back: the commit it starts from, made with a scratch
//! index, and the pod's pushed result applied to the local worktree.

use super::*;

/// The variable of the pod's git token (from the run's Secret).
pub(super) const TOKEN_VAR: &str = "CCLUSTER_GIT_TOKEN";

/// What a pod's workspace is: the commit it starts from, and where it pushes.
pub(super) struct Travel {
    /// The run whose carrier the pod fetches from and pushes to (an adopted Job's is the killed
    /// run's).
    pub(super) run: String,
    pub(super) workspace: PathBuf,
    pub(super) start: String,
    pub(super) result_name: String,
}

/// A commit of the workspace as it is now (tracked and untracked files, what `.gitignore`
/// leaves out excepted) on top of its `HEAD`, made with a scratch index: the worktree's own
/// index and `HEAD` are not touched.
pub(super) fn snapshot(workspace: &Path, scratch: &Path) -> Result<String, String> {
    let git = |args: &[&str]| -> Result<String, String> {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(workspace)
            .args(args)
            .env("GIT_INDEX_FILE", scratch)
            .env("GIT_AUTHOR_NAME", "ccluster")
            .env("GIT_AUTHOR_EMAIL", "ccluster@localhost")
            .env("GIT_COMMITTER_NAME", "ccluster")
            .env("GIT_COMMITTER_EMAIL", "ccluster@localhost")
            .output()
            .map_err(|e| format!("cannot run git: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "git {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let _ = std::fs::remove_file(scratch);
    let result = (|| {
        git(&["read-tree", "HEAD"])?;
        git(&["add", "-A", "."])?;
        let tree = git(&["write-tree"])?;
        git(&[
            "commit-tree",
            &tree,
            "-p",
            "HEAD",
            "-m",
            "ccluster: the workspace an attempt starts from",
        ])
    })();
    let _ = std::fs::remove_file(scratch);
    result
}

/// Applies the changes of `result` (a pod's push) over `start` to the worktree's files.
pub(super) fn apply_result(workspace: &Path, start: &str, result: &str) -> Result<(), String> {
    if start == result {
        return Ok(());
    }
    let diff = std::process::Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["diff", "--binary", "--no-renames", start, result])
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !diff.status.success() {
        return Err(format!(
            "cannot read what the pod changed: {}",
            String::from_utf8_lossy(&diff.stderr).trim()
        ));
    }
    if diff.stdout.is_empty() {
        return Ok(());
    }
    use std::io::Write;
    let mut apply = std::process::Command::new("git")
        .arg("-C")
        .arg(workspace)
        .args(["apply", "--whitespace=nowarn", "--unidiff-zero", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if let Some(mut input) = apply.stdin.take() {
        input
            .write_all(&diff.stdout)
            .map_err(|e| format!("cannot apply what the pod changed: {e}"))?;
    }
    let out = apply
        .wait_with_output()
        .map_err(|e| format!("cannot apply what the pod changed: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot apply what the pod changed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Where a run's pods fetch their start commits from and push their results to: ccluster's
/// own endpoint, or a remote of the user's repository (`remote = "origin"`) for a cluster that
/// cannot reach the driver.
pub(super) enum Carrier {
    Endpoint(crate::exec::endpoint::Endpoint),
    Remote(Remote),
}

/// A git remote of the repository, as a carrier: the driver pushes start commits there and
/// fetches results from there, with the user's own git credentials; pods use whatever their
/// image or environment gives them for it.
pub(super) struct Remote {
    pub(super) repo: PathBuf,
    pub(super) remote: String,
    pub(super) url: String,
    pub(super) run: String,
}

impl Remote {
    /// The remote `remote` of the repository `repo` is in (a worktree of it will do: the remote
    /// is used from the repository's own git directory, which outlives the run's worktrees).
    pub(super) fn new(repo: &Path, remote: &str, run: &str) -> Result<Remote, String> {
        let common = crate::workspace::git_sync(
            repo,
            &["rev-parse", "--path-format=absolute", "--git-common-dir"],
        )?;
        let repo = PathBuf::from(common.trim());
        let url = crate::workspace::git_sync(&repo, &["remote", "get-url", "--", remote]).map_err(
            |_| format!("the repository has no remote `{remote}` (the runner's `remote`)"),
        )?;
        Ok(Remote {
            repo,
            remote: remote.to_string(),
            url: url.trim().to_string(),
            run: run.to_string(),
        })
    }

    fn git(&self, args: &[&str]) -> Result<String, String> {
        crate::workspace::git_sync(&self.repo, args)
    }
}

impl Carrier {
    pub(super) fn git_url(&self) -> String {
        match self {
            Carrier::Endpoint(e) => e.git_url(),
            Carrier::Remote(r) => r.url.clone(),
        }
    }

    /// The token pods send (`None`: the remote's own credentials apply).
    pub(super) fn token(&self) -> Option<&str> {
        match self {
            Carrier::Endpoint(e) => Some(e.token()),
            Carrier::Remote(_) => None,
        }
    }

    /// The endpoint, when the carrier is ccluster's own.
    pub(super) fn endpoint(&self) -> Option<&crate::exec::endpoint::Endpoint> {
        match self {
            Carrier::Endpoint(e) => Some(e),
            Carrier::Remote(_) => None,
        }
    }

    /// Makes `commit` fetchable as the start of the pod `name`; returns its ref.
    pub(super) fn offer(&self, name: &str, commit: &str) -> Result<String, String> {
        match self {
            Carrier::Endpoint(e) => e.offer(name, commit),
            Carrier::Remote(r) => {
                let start = format!("refs/ccluster/{}/start/{name}", r.run);
                r.git(&[
                    "push",
                    "--quiet",
                    "--no-verify",
                    "--",
                    &r.remote,
                    &format!("{commit}:{start}"),
                ])
                .map_err(|e| format!("cannot push the start commit to `{}`: {e}", r.remote))?;
                Ok(start)
            }
        }
    }

    /// The ref the pod `name` pushes its result to.
    pub(super) fn result_ref(&self, name: &str) -> String {
        match self {
            Carrier::Endpoint(e) => e.result_ref(name),
            Carrier::Remote(r) => format!("refs/ccluster/{}/{name}", r.run),
        }
    }

    /// What the pod `name` pushed, brought into the repository (under [`Carrier::result_ref`]).
    pub(super) fn take(&self, name: &str) -> Result<Option<String>, String> {
        match self {
            Carrier::Endpoint(e) => e.take(name),
            Carrier::Remote(r) => {
                let pushed = self.result_ref(name);
                let listed = r.git(&["ls-remote", "--", &r.remote, &pushed])?;
                if listed.trim().is_empty() {
                    return Ok(None);
                }
                r.git(&[
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    "--no-write-fetch-head",
                    "--",
                    &r.remote,
                    &format!("+{pushed}:{pushed}"),
                ])?;
                Ok(Some(
                    r.git(&["rev-parse", "--verify", &pushed])?
                        .trim()
                        .to_string(),
                ))
            }
        }
    }

    /// The URL pods reach `model_api` at through the carrier (ccluster's endpoint only).
    pub(super) fn relay(&self, model_api: &str) -> Result<String, String> {
        match self {
            Carrier::Endpoint(e) => e.relay(model_api),
            Carrier::Remote(r) => Err(format!(
                "the model API at {model_api} is on this machine's loopback, which pods cannot reach: a runner with `remote = \"{}\"` has no endpoint to relay it",
                r.remote
            )),
        }
    }

    /// The run is over: a remote forgets the run's refs (start commits and results).
    pub(super) fn forget(&self) {
        if let Carrier::Remote(r) = self {
            let prefix = format!("refs/ccluster/{}/", r.run);
            let Ok(listed) = r.git(&["ls-remote", "--", &r.remote, &format!("{prefix}*")]) else {
                return;
            };
            let refs: Vec<String> = listed
                .lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter(|r| r.starts_with(&prefix))
                .map(|r| format!(":{r}"))
                .collect();
            if !refs.is_empty() {
                let mut args = vec!["push", "--quiet", "--no-verify", "--", &r.remote];
                args.extend(refs.iter().map(String::as_str));
                let _ = r.git(&args);
            }
        }
    }
}

/// What a pod sends back besides its workspace's change: its own directories (an agent worker's)
/// and the workspace's files matching `keeps` (artifacts and test reports, which git may ignore).
pub(super) struct Sent {
    pub(super) dirs: Vec<String>,
    pub(super) workspace: String,
    pub(super) keeps: Vec<String>,
}

/// The names a pod pushes its own directories' files, and the workspace's kept files, under
/// (beside its workspace's `name`).
pub(super) fn files_name(name: &str) -> String {
    format!("{name}-files")
}

pub(super) fn kept_name(name: &str) -> String {
    format!("{name}-kept")
}

/// The `sh` lines a pod runs after its task (whatever its status): commit, in scratch
/// repositories, the files of its own directories (an agent worker's: its session transcript,
/// which a resumed attempt continues), paths from `/`, and the workspace's files matching its
/// `keeps` (ignored by git or not), paths from the workspace; push them to the run's refs of
/// [`files_name`] and [`kept_name`]. Best effort: a failure is said on stderr, not the task's.
pub(super) fn files_push_script(
    git_url: &str,
    token_var: &str,
    run: &str,
    name: &str,
    sent: &Sent,
    scratch: &str,
) -> String {
    let push = |work_tree: &str, adds: &str, pushed: &str, what: &str| {
        format!(
            "( set -eu\n  g={scratch}/{pushed}\n  rm -rf \"$g\"; git init -q \"$g\"\n  cd {work_tree}\n  export GIT_DIR=\"$g/.git\" GIT_WORK_TREE={work_tree}\n{adds}  GIT_AUTHOR_NAME=ccluster GIT_AUTHOR_EMAIL=ccluster@localhost GIT_COMMITTER_NAME=ccluster GIT_COMMITTER_EMAIL=ccluster@localhost git -c core.hooksPath=/dev/null commit -q --no-verify --allow-empty -m {what}\n  {auth} git push -q --no-verify -- {url} {refspec}\n  rm -rf \"$g\"\n) || echo 'ccluster: cannot push the {what} of the attempt' >&2\n",
            scratch = sh_quote(scratch),
            pushed = pushed,
            work_tree = sh_quote(work_tree),
            auth = crate::exec::endpoint::auth_env(token_var),
            url = sh_quote(git_url),
            refspec = sh_quote(&format!("+HEAD:refs/ccluster/{run}/{pushed}")),
        )
    };
    let mut script = String::new();
    if !sent.dirs.is_empty() {
        let adds: String = sent
            .dirs
            .iter()
            .map(|d| {
                format!(
                    "  git add -A -f -- {}\n",
                    sh_quote(d.trim_start_matches('/'))
                )
            })
            .collect();
        script.push_str(&push("/", &adds, &files_name(name), "files"));
    }
    if !sent.keeps.is_empty() {
        // A glob that matches nothing is no error.
        let adds: String = sent
            .keeps
            .iter()
            .map(|g| {
                let spec = format!(":(glob){}", g.trim_start_matches("./"));
                format!("  git add -f -- {} 2>/dev/null || :\n", sh_quote(&spec))
            })
            .collect();
        script.push_str(&push(
            &sent.workspace,
            &adds,
            &kept_name(name),
            "kept-files",
        ));
    }
    script
}

/// Writes the regular files of `commit` (what a pod pushed with [`files_push_script`]), whose
/// paths are relative to `root`, back under `root`, read with git in `repo`; only those inside
/// one of `within`, and only regular files: a symbolic link, a path outside, or anything under a
/// `.git` (a pod's push is not trusted) is left out.
pub(super) fn restore_files(
    repo: &Path,
    commit: &str,
    root: &Path,
    within: &[PathBuf],
) -> Result<usize, String> {
    let listing = crate::workspace::git_sync_bytes(repo, &["ls-tree", "-r", "-z", commit])?;
    let mut written = 0;
    for entry in listing.split(|b| *b == 0).filter(|e| !e.is_empty()) {
        let entry = String::from_utf8_lossy(entry);
        let Some((meta, path)) = entry.split_once('\t') else {
            continue;
        };
        let mut meta = meta.split(' ');
        let (mode, kind, oid) = (meta.next(), meta.next(), meta.next());
        let (Some(mode), Some("blob"), Some(oid)) = (mode, kind, oid) else {
            continue;
        };
        if !matches!(mode, "100644" | "100755") {
            continue;
        }
        let relative = Path::new(path);
        let unsafe_part = relative.components().any(|c| {
            !matches!(c, std::path::Component::Normal(_))
                || c.as_os_str().eq_ignore_ascii_case(".git")
        });
        let target = root.join(relative);
        if unsafe_part || !within.iter().any(|w| target.starts_with(w)) {
            continue;
        }
        let bytes = crate::workspace::git_sync_bytes(repo, &["cat-file", "blob", oid])?;
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot make {}: {e}", parent.display()))?;
        }
        // Not through a link the directory might hold.
        let _ = std::fs::remove_file(&target);
        crate::store::write_private(&target, &bytes)
            .map_err(|e| format!("cannot write {}: {e}", target.display()))?;
        written += 1;
    }
    Ok(written)
}
