//! Workspaces: a git worktree (or a shared clone) per task attempt, started from the commits the
//! task builds on; the commit of what an attempt changed, published as a ref of the run
//! (`refs/ccluster/runs/<run>/<node>`); git merges of those commits in a fixed order, with a report of what collided. Everything goes through the `git`
//! CLI, so users' git behaves here as it does for them (config, attributes, LFS filters).

pub mod artifacts;
pub mod names;
pub mod transplant;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::exec::runner::Stop;
use crate::model::raw::WorkspaceMode;
pub use names::{is_object_id, node_file_name, node_ref_name, RefName};

/// A needed task's result that a workspace builds on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    pub node: String,
    pub commit: String,
}

/// One file of a change, with line counts (`None` for binary files).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangedFile {
    pub path: String,
    pub added: Option<u64>,
    pub removed: Option<u64>,
}

/// A conflicting merge: which input, which files, and which inputs changed each file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Conflict {
    /// The input whose merge conflicted.
    pub input: String,
    pub files: Vec<ConflictedFile>,
    /// How it ended: `None` while unresolved (the merge failed), else what resolved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConflictedFile {
    pub path: String,
    /// The inputs (plan nodes) that changed this file, in merge order.
    pub tasks: Vec<String>,
}

impl Conflict {
    /// One line per file: `src/a.rs (edit[0], edit[1])`.
    pub fn listing(&self) -> String {
        self.files
            .iter()
            .map(|f| format!("  {} (changed by {})", f.path, f.tasks.join(", ")))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// An attempt's workspace: where it is, what it starts from, how its result is published.
#[derive(Clone, Debug)]
pub struct WorkspaceSpec {
    /// Top level of the main checkout (never modified).
    pub repo: PathBuf,
    pub mode: WorkspaceMode,
    /// The attempt's own directory, under the state directory.
    pub path: PathBuf,
    /// The commit checked out first.
    pub start: String,
    /// Merged into `start`, in this order, before the task runs.
    pub merge: Vec<Input>,
    /// The run's base commit: inputs' own changes are measured from it (to name colliders).
    pub run_base: String,
    /// Globs of files copied from the main checkout.
    pub copy: Vec<String>,
    /// The full ref the result is published as: `refs/ccluster/runs/<run>/<node>`.
    pub task_ref: String,
    /// What the change may hold (`[policy]`), checked before it is published.
    pub policy: Option<crate::policy::ChangePolicy>,
    /// For the run's result task: its branch, `refs/heads/ccluster/<run>/<node>`, set with the
    /// other refs.
    pub result_branch: Option<String>,
    /// A ref that keeps the commit reachable while the cache may reuse it.
    pub keep_ref: String,
    /// Commit message.
    pub message: String,
    /// Author, committer and their (fixed) dates: a merge of the same inputs is the same commit.
    pub identity: Vec<(String, String)>,
    /// Where finished worktrees wait to be reused (see [`create`]), and how many may wait.
    pub pool: Option<(PathBuf, usize)>,
    /// An earlier attempt's worktree to go on in, as it was (a resumed agent conversation).
    pub reuse: Option<PathBuf>,
}

impl WorkspaceSpec {
    /// Where the clusterfile's directory is inside the workspace.
    pub fn dir_for(&self, subdir: &Path) -> PathBuf {
        self.path.join(subdir)
    }
}

/// Whether repository hooks run inside ccluster's own git steps: only when the user opts in with
/// `CCLUSTER_GIT_HOOKS=1`. A hook is the repository's code, not the task's: it would run outside
/// the task's timeout, environment and logs (a `post-commit` that sleeps would hold a finished
/// task), and a `reference-transaction` hook could veto or rewrite ccluster's bookkeeping.
pub fn hooks_enabled() -> bool {
    std::env::var_os("CCLUSTER_GIT_HOOKS").is_some_and(|v| v == "1")
}

/// The environment every git command gets: nothing of the caller's git variables (a hook's
/// `GIT_DIR` must not redirect us), no prompts, stable messages, and no hooks unless the user
/// opted in ([`hooks_enabled`]).
fn git_command_std(dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("git");
    cmd.arg("-C").arg(dir).env_clear();
    if !hooks_enabled() {
        cmd.args(["-c", "core.hooksPath=/dev/null"]);
    }
    for key in ["PATH", "HOME", "USER", "TMPDIR"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    cmd.env("LC_ALL", "C")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_OPTIONAL_LOCKS", "0")
        .stdin(Stdio::null());
    cmd
}

fn describe_failure(args: &[&str], out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let detail = if stderr.trim().is_empty() {
        stdout.trim()
    } else {
        stderr.trim()
    };
    format!("`git {}` failed: {}", args.join(" "), detail.escape_debug())
}

/// Runs git synchronously (CLI commands, run start); stdout on success.
pub fn git_sync(dir: &Path, args: &[&str]) -> Result<String, String> {
    git_sync_bytes(dir, args).map(|out| String::from_utf8_lossy(&out).into_owned())
}

/// [`git_sync`], stdout as bytes (a binary patch).
pub fn git_sync_bytes(dir: &Path, args: &[&str]) -> Result<Vec<u8>, String> {
    git_sync_with(dir, args, &[], None)
}

/// [`git_sync_bytes`] with more variables in git's clean environment (`GIT_INDEX_FILE`, an
/// identity) and, optionally, bytes for its stdin, written from a thread so that a large input
/// cannot deadlock against git's output.
pub fn git_sync_with(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
    stdin: Option<&[u8]>,
) -> Result<Vec<u8>, String> {
    use std::io::Write;
    let mut cmd = git_command_std(dir);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if stdin.is_some() {
        cmd.stdin(Stdio::piped());
    }
    let mut child = cmd.spawn().map_err(|e| format!("cannot run git: {e}"))?;
    let writer = match (stdin, child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => {
            let bytes = bytes.to_vec();
            // A git that exits early closes its stdin: its exit status tells what went wrong.
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&bytes);
            }))
        }
        _ => None,
    };
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if let Some(writer) = writer {
        let _ = writer.join();
    }
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(describe_failure(args, &out))
    }
}

/// Why one of an attempt's git steps did not give a result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GitError {
    /// Git ran and failed (or could not be started), or what it left is unusable.
    Failed(String),
    /// The attempt's time for git steps ran out during `step` (`git commit`), which was stopped.
    TimedOut { step: String },
    /// The run is being cancelled: the step was stopped, or not started.
    Cancelled,
}

impl std::fmt::Display for GitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GitError::Failed(e) => f.write_str(e),
            GitError::TimedOut { step } => write!(f, "timed out in `{step}`"),
            GitError::Cancelled => f.write_str("cancelled"),
        }
    }
}

impl From<String> for GitError {
    fn from(e: String) -> GitError {
        GitError::Failed(e)
    }
}

/// How long a git step may take to stop after SIGTERM (git removes its lock files on it) before
/// its process group is killed.
const GIT_GRACE: Duration = Duration::from_secs(2);

/// The bounds of an attempt's git steps: the run's stop signal (Ctrl-C), and the task's
/// `timeout`, which all of the attempt's git steps share (each process the attempt runs, setup,
/// resolver or command, has its own `timeout` besides).
pub struct GitLimits {
    stop: Option<watch::Receiver<Stop>>,
    /// The time git steps may still take (`None`: no limit).
    left: Mutex<Option<Duration>>,
}

impl GitLimits {
    pub fn new(timeout: Option<Duration>, stop: watch::Receiver<Stop>) -> GitLimits {
        GitLimits {
            stop: Some(stop),
            left: Mutex::new(timeout),
        }
    }

    /// No bounds: for clean-up after the attempt (recording what a failed attempt changed,
    /// removing a published worktree), which runs no hooks and must not be cut short.
    pub fn none() -> GitLimits {
        GitLimits {
            stop: None,
            left: Mutex::new(None),
        }
    }

    fn stop_now(&self) -> Option<Stop> {
        self.stop
            .as_ref()
            .map(|s| *s.borrow())
            .filter(|s| *s != Stop::No)
    }

    fn time_left(&self) -> Option<Duration> {
        *self.left.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spend(&self, spent: Duration) {
        let mut left = self.left.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = left.as_mut() {
            *l = l.saturating_sub(spent);
        }
    }
}

/// Kills a git step's process group (hooks and all) if its future is dropped before it ended.
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0 {
            // ESRCH (the group is gone) is the expected race here.
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
    }
}

/// Runs one git step of an attempt in its own process group, stopped (SIGTERM, then SIGKILL after
/// [`GIT_GRACE`]; at once for a second Ctrl-C) when the attempt's time for git runs out or the run
/// is cancelled. `input` is written to its stdin.
async fn git_output(
    dir: &Path,
    args: &[&str],
    env: &[(String, String)],
    input: Option<&[u8]>,
    limits: &GitLimits,
) -> Result<std::process::Output, GitError> {
    use tokio::io::AsyncWriteExt;
    if limits.stop_now().is_some() {
        return Err(GitError::Cancelled);
    }
    let step = || format!("git {}", args.first().copied().unwrap_or_default());
    let left = limits.time_left();
    if left.is_some_and(|l| l.is_zero()) {
        return Err(GitError::TimedOut { step: step() });
    }
    let mut cmd = tokio::process::Command::from(git_command_std(dir));
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let started = tokio::time::Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| GitError::Failed(format!("cannot run git: {e}")))?;
    let mut guard = GroupGuard(child.id().and_then(|id| i32::try_from(id).ok()));
    // Its own group makes it look like a task's orphan to the process sweep: it is not one.
    let _own = guard.0.map(crate::exec::reaper::OwnChild::new);
    let stdin = child.stdin.take();
    let finished = async move {
        if let (Some(mut stdin), Some(input)) = (stdin, input) {
            // A git that exits early closes its stdin: its exit status tells what went wrong.
            let _ = stdin.write_all(input).await;
        }
        child.wait_with_output().await
    };
    tokio::pin!(finished);
    let deadline = async {
        match left {
            Some(l) => tokio::time::sleep(l).await,
            None => std::future::pending().await,
        }
    };
    let mut stop = limits.stop.clone();
    let stopped = async {
        match stop.as_mut() {
            Some(stop) => {
                while stop.changed().await.is_ok() {
                    let now = *stop.borrow();
                    if now != Stop::No {
                        return now;
                    }
                }
                std::future::pending().await
            }
            None => std::future::pending().await,
        }
    };
    let (why, urgency) = tokio::select! {
        out = &mut finished => {
            guard.0 = None;
            limits.spend(started.elapsed());
            return out.map_err(|e| GitError::Failed(format!("cannot run git: {e}")));
        }
        () = deadline => (GitError::TimedOut { step: step() }, Stop::Graceful),
        how = stopped => (GitError::Cancelled, how),
    };
    limits.spend(started.elapsed());
    if let Some(pgid) = guard.0 {
        if urgency == Stop::Graceful {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGTERM);
            // Whether it ended in time or not, the guard kills what is left of the group.
            let _ = tokio::time::timeout(GIT_GRACE, &mut finished).await;
        }
    }
    drop(guard);
    Err(why)
}

async fn git(
    dir: &Path,
    args: &[&str],
    env: &[(String, String)],
    limits: &GitLimits,
) -> Result<String, GitError> {
    let out = git_output(dir, args, env, None, limits).await?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(GitError::Failed(describe_failure(args, &out)))
    }
}

/// The `update-ref --stdin -z` script that sets `refs` to their commits, in one transaction. Every
/// name is a checked [`RefName`] and every commit a full object id, and NUL-separated fields
/// leave nothing for a stray character to inject.
fn update_script(refs: &[(RefName, String)]) -> Result<Vec<u8>, String> {
    let mut script = b"start\0".to_vec();
    for (name, commit) in refs {
        if !is_object_id(commit) {
            return Err(format!(
                "`{}` is not a commit id (for {name})",
                commit.escape_debug()
            ));
        }
        script.extend_from_slice(format!("update {name}\0{commit}\0\0").as_bytes());
    }
    script.extend_from_slice(b"commit\0");
    Ok(script)
}

/// Checks names given as strings (records, `for-each-ref` output) before they reach git.
fn checked(refs: &[(String, String)]) -> Result<Vec<(RefName, String)>, String> {
    refs.iter()
        .map(|(name, commit)| Ok((RefName::new(name.as_str())?, commit.clone())))
        .collect()
}

/// The main checkout a clusterfile lives in.
#[derive(Clone, Debug)]
pub struct Repo {
    pub root: PathBuf,
}

impl Repo {
    /// The repository containing `dir`, if any.
    pub fn discover(dir: &Path) -> Result<Repo, String> {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        let top = git_sync(dir, &["rev-parse", "--show-toplevel"])?;
        Ok(Repo {
            root: PathBuf::from(top.trim()),
        })
    }

    /// The commit a ref names.
    pub fn resolve(&self, rev: &str) -> Result<String, String> {
        git_sync(
            &self.root,
            &[
                "rev-parse",
                "--verify",
                "--quiet",
                "--end-of-options",
                &format!("{rev}^{{commit}}"),
            ],
        )
        .map(|s| s.trim().to_string())
        .map_err(|_| format!("`{rev}` does not name a commit in {}", self.root.display()))
    }

    /// Whether the main checkout has changes to tracked files (they are not part of any run).
    pub fn is_dirty(&self) -> bool {
        git_sync(
            &self.root,
            &["status", "--porcelain", "--untracked-files=no"],
        )
        .is_ok_and(|s| !s.trim().is_empty())
    }

    /// Whether a commit exists (a cached result's commit may have been collected by git).
    pub fn has_commit(&self, commit: &str) -> bool {
        git_sync(
            &self.root,
            &[
                "cat-file",
                "-e",
                "--end-of-options",
                &format!("{commit}^{{commit}}"),
            ],
        )
        .is_ok()
    }

    /// Sets refs in one transaction (`update-ref --stdin -z`): all or none. Names that are not
    /// valid ref names, and commits that are not object ids, are refused before git runs.
    pub fn set_refs(&self, refs: &[(String, String)]) -> Result<(), String> {
        if refs.is_empty() {
            return Ok(());
        }
        let script = update_script(&checked(refs)?)?;
        run_with_stdin(&self.root, &["update-ref", "--stdin", "-z"], &script)
    }

    /// Deletes refs in one transaction (checked like [`Repo::set_refs`]).
    pub fn delete_refs(&self, refs: &[String]) -> Result<(), String> {
        if refs.is_empty() {
            return Ok(());
        }
        let mut script = b"start\0".to_vec();
        for name in refs {
            let name = RefName::new(name.as_str())?;
            script.extend_from_slice(format!("delete {name}\0\0").as_bytes());
        }
        script.extend_from_slice(b"commit\0");
        run_with_stdin(&self.root, &["update-ref", "--stdin", "-z"], &script)
    }

    /// Creates a branch at a commit, refusing to move an existing one (`export --branch`).
    pub fn create_branch(&self, branch: &RefName, commit: &str) -> Result<(), String> {
        let Some(name) = branch.short_branch() else {
            return Err(format!("{branch} is not a branch"));
        };
        if !is_object_id(commit) {
            return Err(format!("`{}` is not a commit id", commit.escape_debug()));
        }
        git_sync(&self.root, &["branch", "--no-track", "--", name, commit]).map(|_| ())
    }

    /// Refs under a prefix (`refs/heads/ccluster/<run>/`), with their commits.
    pub fn refs_under(&self, prefix: &str) -> Vec<(String, String)> {
        git_sync(
            &self.root,
            &[
                "for-each-ref",
                "--format=%(refname) %(objectname)",
                "--",
                prefix,
            ],
        )
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(r, c)| (r.to_string(), c.to_string()))
        .collect()
    }
}

fn run_with_stdin(dir: &Path, args: &[&str], input: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut child = git_command_std(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(describe_failure(args, &out))
    }
}

fn remove_dir(path: &Path) {
    if std::fs::symlink_metadata(path).is_ok() {
        let _ = std::fs::remove_dir_all(path);
    }
}

/// Makes the attempt's workspace: checks out `start` (a leftover directory of the same attempt
/// from an interrupted run is removed first) and copies the `copy` files from the main checkout.
/// Returns the copied files (relative to the repository root): they are never committed.
pub async fn create(
    spec: &WorkspaceSpec,
    copy_from: &Path,
    limits: &GitLimits,
) -> Result<Vec<String>, GitError> {
    if let Some(old) = spec.reuse.as_ref().filter(|p| p.is_dir()) {
        let _turn = WORKTREE_REGISTRY.lock().await;
        // From another run's directory (adopted work), this run's may not exist yet.
        if let Some(parent) = spec.path.parent() {
            let _ = crate::store::create_private_dir_all(parent);
        }
        let (from, to) = (old.to_string_lossy(), spec.path.to_string_lossy());
        match git(
            &spec.repo,
            &["worktree", "move", "--", &from, &to],
            &[],
            limits,
        )
        .await
        {
            Ok(_) => return Ok(Vec::new()),
            Err(GitError::Failed(_)) => {}
            Err(stopped) => return Err(stopped),
        }
    }
    if std::fs::symlink_metadata(&spec.path).is_ok() {
        remove_dir(&spec.path);
        let _turn = WORKTREE_REGISTRY.lock().await;
        let _ = git(&spec.repo, &["worktree", "prune"], &[], limits).await;
    }
    if let Some(parent) = spec.path.parent() {
        crate::store::create_private_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let path = spec.path.to_string_lossy().into_owned();
    match spec.mode {
        WorkspaceMode::Copy => {
            // A clone that borrows the main repository's objects: nothing is copied but the files.
            git(
                &spec.repo,
                &[
                    "clone",
                    "--quiet",
                    "--shared",
                    "--no-checkout",
                    "--",
                    ".",
                    &path,
                ],
                &[],
                limits,
            )
            .await?;
            git(
                &spec.path,
                &["checkout", "--quiet", "--detach", &spec.start, "--"],
                &[],
                limits,
            )
            .await?;
        }
        _ if reuse_pooled(spec, limits).await? => {}
        _ => {
            // Registering a worktree reads the others' records: two registrations at once can
            // fail, so they take turns. Checking out the files, the slow part, runs in parallel.
            {
                let _turn = WORKTREE_REGISTRY.lock().await;
                git(
                    &spec.repo,
                    &[
                        "worktree",
                        "add",
                        "--quiet",
                        "--no-checkout",
                        "--detach",
                        "--",
                        &path,
                        &spec.start,
                    ],
                    &[],
                    limits,
                )
                .await?;
            }
            git(&spec.path, &["reset", "--hard", "--quiet"], &[], limits).await?;
        }
    }
    let files = artifacts::matching(copy_from, &spec.copy);
    let subdir = relative_to(copy_from, &spec.repo);
    artifacts::copy_files(copy_from, &files, &spec.path.join(&subdir)).map_err(|e| {
        format!(
            "cannot copy {} into the workspace: {e}",
            spec.copy.join(", ")
        )
    })?;
    Ok(files
        .iter()
        .map(|f| subdir.join(f).to_string_lossy().into_owned())
        .collect())
}

/// Moves the worktree's HEAD back to `start`, keeping its files and index: commits a task made
/// on its own are no longer reachable from the worktree (a refused change's).
pub async fn undo_commits(dir: &Path, start: &str, limits: &GitLimits) -> Result<(), GitError> {
    git(
        dir,
        &["reset", "--soft", "--quiet", "--end-of-options", start],
        &[],
        limits,
    )
    .await
    .map(|_| ())
}

/// The files the attempt's result would take since `start`: modified and new ones not ignored by
/// git, and those a commit the task made itself changed, leaving out `excluded` paths (files
/// copied in), relative to `dir`.
pub async fn uncommitted_files(
    dir: &Path,
    start: &str,
    excluded: &[String],
    limits: &GitLimits,
) -> Result<Vec<String>, GitError> {
    let specs: Vec<String> = excluded
        .iter()
        .map(|p| format!(":(exclude,literal){p}"))
        .collect();
    let mut args = vec![
        "ls-files",
        "--modified",
        "--others",
        "--exclude-standard",
        "-z",
        "--",
        ".",
    ];
    args.extend(specs.iter().map(String::as_str));
    let mut out = git(dir, &args, &[], limits).await?;
    // A task that committed on its own: what its commits changed is in the result too.
    let mut committed = vec![
        "diff",
        "--name-only",
        "--no-renames",
        "--diff-filter=d",
        "-z",
        "--end-of-options",
        start,
        "HEAD",
        "--",
        ".",
    ];
    committed.extend(specs.iter().map(String::as_str));
    out.push('\0');
    out.push_str(&git(dir, &committed, &[], limits).await?);
    let mut files: Vec<String> = out
        .split('\0')
        .filter(|f| !f.is_empty())
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// `git add --all`, leaving out `excluded` paths (files copied in: `.env` must not be committed).
async fn add_all(dir: &Path, excluded: &[String], limits: &GitLimits) -> Result<(), GitError> {
    let specs: Vec<String> = excluded
        .iter()
        .map(|p| format!(":(exclude,literal){p}"))
        .collect();
    let mut args = vec!["add", "--all", "--", "."];
    args.extend(specs.iter().map(String::as_str));
    git(dir, &args, &[], limits).await.map(|_| ())
}

/// Takes a finished worktree from the pool, if one waits, and turns it into this attempt's: moved
/// to its path, checked out at `start`, every file that is not in `start` removed. Checking out
/// a commit over a worktree only rewrites the files that differ, so on a large repository this
/// costs a small fraction of a fresh checkout. `Ok(false)`: none could be used.
async fn reuse_pooled(spec: &WorkspaceSpec, limits: &GitLimits) -> Result<bool, GitError> {
    let Some((pool, _)) = &spec.pool else {
        return Ok(false);
    };
    let path = spec.path.to_string_lossy().into_owned();
    let taken = {
        let _turn = WORKTREE_REGISTRY.lock().await;
        let mut entries: Vec<PathBuf> = std::fs::read_dir(pool)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        entries.sort();
        let mut taken = false;
        for entry in entries {
            let from = entry.to_string_lossy().into_owned();
            match git(
                &spec.repo,
                &["worktree", "move", "--", &from, &path],
                &[],
                limits,
            )
            .await
            {
                Ok(_) => {
                    taken = true;
                    break;
                }
                Err(GitError::Failed(_)) => {}
                Err(stopped) => return Err(stopped),
            }
            // Not a usable worktree (half-moved by a killed run): drop it.
            remove_dir(&entry);
            let _ = git(&spec.repo, &["worktree", "prune"], &[], limits).await;
        }
        taken
    };
    if !taken {
        return Ok(false);
    }
    let ready = async {
        git(
            &spec.path,
            &[
                "checkout",
                "--quiet",
                "--force",
                "--detach",
                &spec.start,
                "--",
            ],
            &[],
            limits,
        )
        .await?;
        git(&spec.path, &["clean", "-ffdxq"], &[], limits).await
    }
    .await;
    match ready {
        Ok(_) => Ok(true),
        Err(e) => {
            remove_dir(&spec.path);
            let _turn = WORKTREE_REGISTRY.lock().await;
            let _ = git(&spec.repo, &["worktree", "prune"], &[], &GitLimits::none()).await;
            match e {
                GitError::Failed(_) => Ok(false),
                stopped => Err(stopped),
            }
        }
    }
}

/// `dir` relative to `root` (empty when it is the root or outside it).
pub fn relative_to(dir: &Path, root: &Path) -> PathBuf {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(dir)
        .strip_prefix(canon(root))
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// What merging one input did.
pub enum MergeStep {
    Merged,
    /// The worktree is left mid-merge, with conflict markers in `Conflict::files`.
    Conflicted(Conflict),
}

/// The paths git left unmerged in a workspace's index.
async fn unmerged(dir: &Path, limits: &GitLimits) -> Result<Vec<String>, GitError> {
    let listed = git(
        dir,
        &["diff", "--name-only", "-z", "--diff-filter=U"],
        &[],
        limits,
    )
    .await?;
    Ok(listed
        .split('\0')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect())
}

/// Merges one input into the workspace (`--no-ff`, so every input shows in the history).
pub async fn merge_one(
    spec: &WorkspaceSpec,
    input: &Input,
    merged_so_far: &[Input],
    limits: &GitLimits,
) -> Result<MergeStep, GitError> {
    let message = format!("Merge {} into {}", input.node, spec.task_ref);
    let args = [
        "merge",
        "--no-ff",
        "--no-verify",
        "--no-edit",
        "--quiet",
        "-m",
        &message,
        "--end-of-options",
        &input.commit,
    ];
    let out = git_output(&spec.path, &args, &spec.identity, None, limits).await?;
    if out.status.success() {
        return Ok(MergeStep::Merged);
    }
    let conflicted = unmerged(&spec.path, limits).await?;
    if conflicted.is_empty() {
        return Err(GitError::Failed(describe_failure(&args, &out)));
    }
    // Name the colliders: each input (merged so far, and this one) that changed the file.
    let mut changes: Vec<(String, Vec<String>)> = Vec::new();
    for i in merged_so_far.iter().chain(std::iter::once(input)) {
        let files = git(
            &spec.repo,
            &[
                "diff",
                "--name-only",
                "-z",
                "--no-renames",
                "--end-of-options",
                &spec.run_base,
                &i.commit,
                "--",
            ],
            &[],
            limits,
        )
        .await?;
        changes.push((
            i.node.clone(),
            files
                .split('\0')
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
        ));
    }
    let files = conflicted
        .into_iter()
        .map(|path| ConflictedFile {
            tasks: changes
                .iter()
                .filter(|(_, files)| files.contains(&path))
                .map(|(n, _)| n.clone())
                .collect(),
            path,
        })
        .collect();
    Ok(MergeStep::Conflicted(Conflict {
        input: input.node.clone(),
        files,
        resolved_by: None,
    }))
}

/// Gives up a conflicted merge, leaving the worktree as it was before it.
pub async fn abort_merge(spec: &WorkspaceSpec) {
    let _ = git(&spec.path, &["merge", "--abort"], &[], &GitLimits::none()).await;
}

/// What a conflicted merge left in the worktree at each conflicted path (a hash of the file, or
/// `None` when there is none), taken before the resolver runs: a path it neither staged nor
/// changed is not resolved.
pub struct LeftByMerge(Vec<(String, Option<blake3::Hash>)>);

fn file_hash(path: &Path) -> Option<blake3::Hash> {
    std::fs::read(path).ok().map(|bytes| blake3::hash(&bytes))
}

/// What the conflicted merge left at each conflicted path, before the resolver runs.
pub fn left_by_merge(spec: &WorkspaceSpec, conflict: &Conflict) -> LeftByMerge {
    LeftByMerge(
        conflict
            .files
            .iter()
            .map(|f| (f.path.clone(), file_hash(&spec.path.join(&f.path))))
            .collect(),
    )
}

/// After a resolver ran: every conflicted path must be resolved, that is staged by the resolver
/// (`git add`, `git rm`, `git checkout --theirs` + `git add`), or changed from what the merge left
/// there, and no conflict markers may remain; then the merge is committed. A binary file keeps
/// one side's content with no markers, so a resolver that does nothing must not count as having
/// chosen it.
pub async fn conclude_merge(
    spec: &WorkspaceSpec,
    conflict: &Conflict,
    before: &LeftByMerge,
    limits: &GitLimits,
) -> Result<(), GitError> {
    let still_unmerged = unmerged(&spec.path, limits).await?;
    let untouched: Vec<&str> = before
        .0
        .iter()
        .filter(|(path, hash)| {
            still_unmerged.contains(path) && file_hash(&spec.path.join(path)) == *hash
        })
        .map(|(path, _)| path.as_str())
        .collect();
    if !untouched.is_empty() {
        return Err(GitError::Failed(format!(
            "the resolver left conflicted files as the merge left them (neither staged nor \
             changed): {}",
            untouched.join(", ")
        )));
    }
    let mut marked = Vec::new();
    for f in &conflict.files {
        let text = std::fs::read(spec.path.join(&f.path)).unwrap_or_default();
        let has_markers = text.split(|b| *b == b'\n').any(|line| {
            line.starts_with(b"<<<<<<< ") || line.starts_with(b">>>>>>> ") || line == b"======="
        });
        if has_markers {
            marked.push(f.path.clone());
        }
    }
    if !marked.is_empty() {
        return Err(GitError::Failed(format!(
            "conflict markers remain after resolving: {}",
            marked.join(", ")
        )));
    }
    git(&spec.path, &["add", "--all"], &[], limits).await?;
    let left = unmerged(&spec.path, limits).await?;
    if !left.is_empty() {
        return Err(GitError::Failed(format!(
            "files still unmerged after resolving: {}",
            left.join(", ")
        )));
    }
    git(
        &spec.path,
        &["commit", "--quiet", "--no-verify", "--no-edit"],
        &spec.identity,
        limits,
    )
    .await?;
    Ok(())
}

/// The commit the workspace is at now.
pub async fn head(spec: &WorkspaceSpec, limits: &GitLimits) -> Result<String, GitError> {
    Ok(git(&spec.path, &["rev-parse", "HEAD"], &[], limits)
        .await?
        .trim()
        .to_string())
}

/// Commits every change in the workspace but `excluded` files (none: no commit); returns the
/// resulting commit.
pub async fn commit_all(
    spec: &WorkspaceSpec,
    excluded: &[String],
    limits: &GitLimits,
) -> Result<String, GitError> {
    add_all(&spec.path, excluded, limits).await?;
    let staged = git_output(
        &spec.path,
        &["diff", "--cached", "--quiet"],
        &[],
        None,
        limits,
    )
    .await?;
    if !staged.status.success() {
        git(
            &spec.path,
            &["commit", "--quiet", "--no-verify", "-m", &spec.message],
            &spec.identity,
            limits,
        )
        .await?;
    }
    head(spec, limits).await
}

/// Files changed between two commits (`to = None`: the staged workspace), and the binary patch.
pub async fn changes(
    dir: &Path,
    from: &str,
    to: Option<&str>,
    excluded: &[String],
    limits: &GitLimits,
) -> Result<(Vec<ChangedFile>, Vec<u8>), GitError> {
    let mut numstat = vec!["diff", "--numstat", "-z", "--no-renames"];
    let mut patch = vec!["diff", "--binary", "--no-renames"];
    if to.is_none() {
        add_all(dir, excluded, limits).await?;
        numstat.push("--cached");
        patch.push("--cached");
    }
    numstat.extend(["--end-of-options", from]);
    patch.extend(["--end-of-options", from]);
    if let Some(to) = to {
        numstat.push(to);
        patch.push(to);
    }
    numstat.push("--");
    patch.push("--");
    let stat = git(dir, &numstat, &[], limits).await?;
    // `-z`: `added TAB removed TAB path NUL`, the path as it is (no quoting of odd names).
    let files = stat
        .split('\0')
        .filter_map(|l| {
            let mut it = l.splitn(3, '\t');
            let (a, r, p) = (it.next()?, it.next()?, it.next()?);
            Some(ChangedFile {
                path: p.to_string(),
                added: a.parse().ok(),
                removed: r.parse().ok(),
            })
        })
        .collect();
    let out = git_output(dir, &patch, &[], None, limits).await?;
    Ok((files, out.stdout))
}

/// Publishes a result: the run's ref for the node (and the result branch, for the run's result
/// task) and the ref that keeps it for the cache, set together. A copy workspace first sends its
/// commit to the main repository.
pub async fn publish(
    spec: &WorkspaceSpec,
    commit: &str,
    limits: &GitLimits,
) -> Result<(), GitError> {
    let mut refs = vec![RefName::new(spec.task_ref.as_str())?];
    if let Some(branch) = &spec.result_branch {
        refs.push(RefName::new(branch.as_str())?);
    }
    refs.push(RefName::new(spec.keep_ref.as_str())?);
    if !is_object_id(commit) {
        return Err(GitError::Failed(format!(
            "`{}` is not a commit id",
            commit.escape_debug()
        )));
    }
    if spec.mode == WorkspaceMode::Copy {
        // The main repository fetches the clone's HEAD (the commit) rather than the clone pushing
        // it: a push runs the receiving repository's hooks in a `receive-pack` that does not get
        // our `-c` options, while a fetch runs none there. The refs are set below.
        let clone = spec.path.to_string_lossy().into_owned();
        git(
            &spec.repo,
            &[
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--",
                &clone,
                "HEAD",
            ],
            &[],
            limits,
        )
        .await?;
    }
    let refs: Vec<(RefName, String)> = refs.into_iter().map(|r| (r, commit.to_string())).collect();
    let script = update_script(&refs)?;
    let args = ["update-ref", "--stdin", "-z"];
    let out = git_output(&spec.repo, &args, &[], Some(&script), limits).await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(GitError::Failed(describe_failure(&args, &out)))
    }
}

/// Worktree registrations and removals of this process take turns (see [`create`]).
static WORKTREE_REGISTRY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Done with a workspace whose work is published (its ref holds it): a worktree goes to the
/// pool while there is room; otherwise the files are removed, in parallel with other jobs, then
/// git's record of the worktree.
pub async fn remove(spec: &WorkspaceSpec) {
    let limits = GitLimits::none();
    if let (WorkspaceMode::Worktree, Some((pool, max))) = (spec.mode, &spec.pool) {
        let _turn = WORKTREE_REGISTRY.lock().await;
        let waiting = std::fs::read_dir(pool).map_or(0, |d| d.count());
        if waiting < *max && crate::store::create_private_dir_all(pool).is_ok() {
            let name = spec
                .path
                .iter()
                .rev()
                .take(2)
                .map(|c| c.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(".");
            let to = pool.join(name).to_string_lossy().into_owned();
            let from = spec.path.to_string_lossy().into_owned();
            if git(
                &spec.repo,
                &["worktree", "move", "--", &from, &to],
                &[],
                &limits,
            )
            .await
            .is_ok()
            {
                return;
            }
        }
    }
    let path = spec.path.clone();
    let _ = tokio::task::spawn_blocking(move || remove_dir(&path)).await;
    if spec.mode != WorkspaceMode::Copy {
        let _turn = WORKTREE_REGISTRY.lock().await;
        let _ = git(&spec.repo, &["worktree", "prune"], &[], &limits).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository on `main` with two commits; returns it and both commits (old, new).
    fn repo() -> (tempfile::TempDir, Repo, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let out = std::process::Command::new("git")
                .arg("-C")
                .arg(dir.path())
                .args(args)
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@localhost")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@localhost")
                .output()
                .unwrap();
            assert!(out.status.success(), "{args:?}");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        };
        run(&["init", "-q", "-b", "main"]);
        run(&["commit", "-q", "--allow-empty", "-m", "one"]);
        let old = run(&["rev-parse", "HEAD"]);
        run(&["commit", "-q", "--allow-empty", "-m", "two"]);
        let new = run(&["rev-parse", "HEAD"]);
        run(&["reset", "-q", "--hard", &old]);
        let repo = Repo {
            root: dir.path().to_path_buf(),
        };
        (dir, repo, old, new)
    }

    fn refs(repo: &Repo) -> Vec<(String, String)> {
        repo.refs_under("refs/")
    }

    #[test]
    fn ref_scripts_cannot_be_injected_through_names_or_commits() {
        let (_dir, repo, old, new) = repo();
        let before = refs(&repo);
        let zero = "0".repeat(40);
        let hostile: Vec<(String, String)> = vec![
            (
                format!("refs/heads/x {zero}\nupdate refs/heads/main"),
                new.clone(),
            ),
            (
                format!("refs/heads/x\nupdate refs/heads/main {new}"),
                new.clone(),
            ),
            ("refs/heads/x\ndelete refs/heads/main".into(), new.clone()),
            (
                format!("refs/heads/x\0update refs/heads/main\0{new}"),
                new.clone(),
            ),
            (
                "refs/heads/x".into(),
                format!("{new}\nupdate refs/heads/main {new}"),
            ),
            (
                "refs/heads/x".into(),
                format!("{new}\0\0update refs/heads/main\0{new}"),
            ),
            ("refs/heads/../main".into(), new.clone()),
            ("refs/heads/main.lock".into(), new.clone()),
            ("HEAD".into(), new.clone()),
            ("-M".into(), new.clone()),
            ("refs/heads/x".into(), "HEAD".into()),
        ];
        for (name, commit) in &hostile {
            let pair = [(name.clone(), commit.clone())];
            assert!(
                repo.set_refs(&pair).is_err(),
                "{name:?} {commit:?} accepted"
            );
            if name != "refs/heads/x" {
                assert!(
                    repo.delete_refs(std::slice::from_ref(name)).is_err(),
                    "{name:?} accepted"
                );
            }
            assert_eq!(refs(&repo), before, "{name:?} {commit:?} changed the refs");
        }
        // One bad name in a batch: nothing of the batch is set.
        let batch = [
            ("refs/heads/ccluster/r/a".to_string(), new.clone()),
            (
                "refs/heads/ccluster/r/b\nupdate refs/heads/main".to_string(),
                new.clone(),
            ),
        ];
        assert!(repo.set_refs(&batch).is_err());
        assert_eq!(refs(&repo), before);
        // Good names still work.
        let good = [("refs/heads/ccluster/r/a.b/2".to_string(), new.clone())];
        repo.set_refs(&good).unwrap();
        assert_eq!(repo.resolve("main").unwrap(), old);
        assert_eq!(repo.resolve("ccluster/r/a.b/2").unwrap(), new);
        repo.delete_refs(&[good[0].0.clone()]).unwrap();
        assert_eq!(refs(&repo), before);
    }

    #[test]
    fn user_branches_that_look_like_options_are_refused() {
        let (_dir, repo, _old, new) = repo();
        let before = refs(&repo);
        for name in ["-M", "--force", "-D", "-", "-m main"] {
            assert!(RefName::branch(name).is_err(), "{name:?}");
        }
        let ok = RefName::branch("feature/x").unwrap();
        repo.create_branch(&ok, &new).unwrap();
        // An existing branch is not moved.
        assert!(repo
            .create_branch(&RefName::branch("main").unwrap(), &new)
            .is_err());
        assert_eq!(refs(&repo).len(), before.len() + 1);
        assert!(repo.create_branch(&ok, "-M").is_err());
    }
}
