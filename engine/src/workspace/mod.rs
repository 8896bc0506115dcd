//! Workspaces: a git worktree (or a shared clone) per task attempt, started from the commits the
//! task builds on; the commit of what an attempt changed, published as a branch; git merges of
//! branches in a fixed order, with a report of what collided. Everything goes through the `git`
//! CLI, so users' git behaves here as it does for them (config, attributes, LFS filters).

pub mod artifacts;
pub mod transplant;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};

use crate::model::raw::WorkspaceMode;

/// A needed task's result that a workspace builds on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    pub node: String,
    pub commit: String,
}

/// One file of a change, with line counts (`None` for binary files).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangedFile {
    pub path: String,
    pub added: Option<u64>,
    pub removed: Option<u64>,
}

/// A conflicting merge: which input, which files, and which inputs changed each file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    /// The input whose merge conflicted.
    pub input: String,
    pub files: Vec<ConflictedFile>,
    /// How it ended: `None` while unresolved (the merge failed), else what resolved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolved_by: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `ccluster/<run>/<node>`.
    pub branch: String,
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

/// The environment every git command gets: nothing of the caller's git variables (a hook's
/// `GIT_DIR` must not redirect us), no prompts, stable messages.
fn git_command_std(dir: &Path) -> std::process::Command {
    let mut cmd = std::process::Command::new("git");
    cmd.arg("-C").arg(dir).env_clear();
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
    format!("`git {}` failed: {}", args.join(" "), detail)
}

/// Runs git synchronously (CLI commands, run start); stdout on success.
pub fn git_sync(dir: &Path, args: &[&str]) -> Result<String, String> {
    let out = git_command_std(dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(describe_failure(args, &out))
    }
}

/// Runs git from a job; the process dies with the job if the run aborts.
async fn git_output(
    dir: &Path,
    args: &[&str],
    env: &[(String, String)],
) -> Result<std::process::Output, String> {
    let mut cmd = tokio::process::Command::from(git_command_std(dir));
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .kill_on_drop(true);
    cmd.output()
        .await
        .map_err(|e| format!("cannot run git: {e}"))
}

async fn git(dir: &Path, args: &[&str], env: &[(String, String)]) -> Result<String, String> {
    let out = git_output(dir, args, env).await?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(describe_failure(args, &out))
    }
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
            &["cat-file", "-e", &format!("{commit}^{{commit}}")],
        )
        .is_ok()
    }

    /// Sets refs in one transaction (`update-ref --stdin`): all or none.
    pub fn set_refs(&self, refs: &[(String, String)]) -> Result<(), String> {
        if refs.is_empty() {
            return Ok(());
        }
        let mut script = String::from("start\n");
        for (name, commit) in refs {
            script.push_str(&format!("update {name} {commit}\n"));
        }
        script.push_str("commit\n");
        run_with_stdin(&self.root, &["update-ref", "--stdin"], &script)
    }

    /// Deletes refs in one transaction.
    pub fn delete_refs(&self, refs: &[String]) -> Result<(), String> {
        if refs.is_empty() {
            return Ok(());
        }
        let mut script = String::from("start\n");
        for name in refs {
            script.push_str(&format!("delete {name}\n"));
        }
        script.push_str("commit\n");
        run_with_stdin(&self.root, &["update-ref", "--stdin"], &script)
    }

    /// Refs under a prefix (`refs/heads/ccluster/<run>/`), with their commits.
    pub fn refs_under(&self, prefix: &str) -> Vec<(String, String)> {
        git_sync(
            &self.root,
            &["for-each-ref", "--format=%(refname) %(objectname)", prefix],
        )
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(r, c)| (r.to_string(), c.to_string()))
        .collect()
    }
}

fn run_with_stdin(dir: &Path, args: &[&str], input: &str) -> Result<(), String> {
    use std::io::Write;
    let mut child = git_command_std(dir)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input.as_bytes());
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
pub async fn create(spec: &WorkspaceSpec, copy_from: &Path) -> Result<Vec<String>, String> {
    if let Some(old) = spec.reuse.as_ref().filter(|p| p.is_dir()) {
        let _turn = WORKTREE_REGISTRY.lock().await;
        let (from, to) = (old.to_string_lossy(), spec.path.to_string_lossy());
        if git(&spec.repo, &["worktree", "move", &from, &to], &[])
            .await
            .is_ok()
        {
            return Ok(Vec::new());
        }
    }
    if std::fs::symlink_metadata(&spec.path).is_ok() {
        remove_dir(&spec.path);
        let _turn = WORKTREE_REGISTRY.lock().await;
        let _ = git(&spec.repo, &["worktree", "prune"], &[]).await;
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
                &["clone", "--quiet", "--shared", "--no-checkout", ".", &path],
                &[],
            )
            .await?;
            git(
                &spec.path,
                &["checkout", "--quiet", "--detach", &spec.start],
                &[],
            )
            .await?;
        }
        _ if reuse_pooled(spec).await => {}
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
                        &path,
                        &spec.start,
                    ],
                    &[],
                )
                .await?;
            }
            git(&spec.path, &["reset", "--hard", "--quiet"], &[]).await?;
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

/// `git add --all`, leaving out `excluded` paths (files copied in: `.env` must not be committed).
async fn add_all(dir: &Path, excluded: &[String]) -> Result<(), String> {
    let specs: Vec<String> = excluded
        .iter()
        .map(|p| format!(":(exclude,literal){p}"))
        .collect();
    let mut args = vec!["add", "--all", "--", "."];
    args.extend(specs.iter().map(String::as_str));
    git(dir, &args, &[]).await.map(|_| ())
}

/// Takes a finished worktree from the pool, if one waits, and turns it into this attempt's: moved
/// to its path, checked out at `start`, every file that is not in `start` removed. Checking out
/// a commit over a worktree only rewrites the files that differ, so on a large repository this
/// costs a small fraction of a fresh checkout.
async fn reuse_pooled(spec: &WorkspaceSpec) -> bool {
    let Some((pool, _)) = &spec.pool else {
        return false;
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
            if git(&spec.repo, &["worktree", "move", &from, &path], &[])
                .await
                .is_ok()
            {
                taken = true;
                break;
            }
            // Not a usable worktree (half-moved by a killed run): drop it.
            remove_dir(&entry);
            let _ = git(&spec.repo, &["worktree", "prune"], &[]).await;
        }
        taken
    };
    if !taken {
        return false;
    }
    let ready = async {
        git(
            &spec.path,
            &["checkout", "--quiet", "--force", "--detach", &spec.start],
            &[],
        )
        .await?;
        git(&spec.path, &["clean", "-ffdxq"], &[]).await
    }
    .await;
    if ready.is_err() {
        remove_dir(&spec.path);
        let _turn = WORKTREE_REGISTRY.lock().await;
        let _ = git(&spec.repo, &["worktree", "prune"], &[]).await;
        return false;
    }
    true
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

/// Merges one input into the workspace (`--no-ff`, so every input shows in the history).
pub async fn merge_one(
    spec: &WorkspaceSpec,
    input: &Input,
    merged_so_far: &[Input],
) -> Result<MergeStep, String> {
    let message = format!("Merge {} into {}", input.node, spec.branch);
    let args = [
        "merge",
        "--no-ff",
        "--no-verify",
        "--no-edit",
        "--quiet",
        "-m",
        &message,
        &input.commit,
    ];
    let out = git_output(&spec.path, &args, &spec.identity).await?;
    if out.status.success() {
        return Ok(MergeStep::Merged);
    }
    let conflicted = git(&spec.path, &["diff", "--name-only", "--diff-filter=U"], &[]).await?;
    let conflicted: Vec<String> = conflicted.lines().map(str::to_string).collect();
    if conflicted.is_empty() {
        return Err(describe_failure(&args, &out));
    }
    // Name the colliders: each input (merged so far, and this one) that changed the file.
    let mut changes: Vec<(String, Vec<String>)> = Vec::new();
    for i in merged_so_far.iter().chain(std::iter::once(input)) {
        let files = git(
            &spec.repo,
            &[
                "diff",
                "--name-only",
                "--no-renames",
                &spec.run_base,
                &i.commit,
            ],
            &[],
        )
        .await
        .unwrap_or_default();
        changes.push((i.node.clone(), files.lines().map(str::to_string).collect()));
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
    let _ = git(&spec.path, &["merge", "--abort"], &[]).await;
}

/// After a resolver ran: no conflict markers may remain in the conflicted files; then the merge
/// is committed.
pub async fn conclude_merge(spec: &WorkspaceSpec, conflict: &Conflict) -> Result<(), String> {
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
        return Err(format!(
            "conflict markers remain after resolving: {}",
            marked.join(", ")
        ));
    }
    git(&spec.path, &["add", "--all"], &[]).await?;
    let left = git(&spec.path, &["diff", "--name-only", "--diff-filter=U"], &[]).await?;
    if !left.trim().is_empty() {
        return Err(format!(
            "files still unmerged after resolving: {}",
            left.lines().collect::<Vec<_>>().join(", ")
        ));
    }
    git(
        &spec.path,
        &["commit", "--quiet", "--no-verify", "--no-edit"],
        &spec.identity,
    )
    .await?;
    Ok(())
}

/// The commit the workspace is at now.
pub async fn head(spec: &WorkspaceSpec) -> Result<String, String> {
    Ok(git(&spec.path, &["rev-parse", "HEAD"], &[])
        .await?
        .trim()
        .to_string())
}

/// Commits every change in the workspace but `excluded` files (none: no commit); returns the
/// resulting commit.
pub async fn commit_all(spec: &WorkspaceSpec, excluded: &[String]) -> Result<String, String> {
    add_all(&spec.path, excluded).await?;
    let staged = git_output(&spec.path, &["diff", "--cached", "--quiet"], &[]).await?;
    if !staged.status.success() {
        git(
            &spec.path,
            &["commit", "--quiet", "--no-verify", "-m", &spec.message],
            &spec.identity,
        )
        .await?;
    }
    head(spec).await
}

/// Files changed between two commits (`to = None`: the staged workspace), and the binary patch.
pub async fn changes(
    dir: &Path,
    from: &str,
    to: Option<&str>,
    excluded: &[String],
) -> Result<(Vec<ChangedFile>, Vec<u8>), String> {
    let mut numstat = vec!["diff", "--numstat", "--no-renames"];
    let mut patch = vec!["diff", "--binary", "--no-renames"];
    if to.is_none() {
        add_all(dir, excluded).await?;
        numstat.push("--cached");
        patch.push("--cached");
    }
    numstat.push(from);
    patch.push(from);
    if let Some(to) = to {
        numstat.push(to);
        patch.push(to);
    }
    let stat = git(dir, &numstat, &[]).await?;
    let files = stat
        .lines()
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
    let out = git_output(dir, &patch, &[]).await?;
    Ok((files, out.stdout))
}

/// Publishes a result: the run's branch for the node and the ref that keeps it for the cache,
/// set together. A copy workspace first sends its commit to the main repository.
pub async fn publish(spec: &WorkspaceSpec, commit: &str) -> Result<(), String> {
    if spec.mode == WorkspaceMode::Copy {
        let main = spec.repo.to_string_lossy().into_owned();
        git(
            &spec.path,
            &[
                "push",
                "--quiet",
                "--no-verify",
                &main,
                &format!("{commit}:{}", spec.keep_ref),
            ],
            &[],
        )
        .await?;
    }
    let repo = Repo {
        root: spec.repo.clone(),
    };
    let refs = vec![
        (format!("refs/heads/{}", spec.branch), commit.to_string()),
        (spec.keep_ref.clone(), commit.to_string()),
    ];
    tokio::task::spawn_blocking(move || repo.set_refs(&refs))
        .await
        .map_err(|e| format!("cannot set refs: {e}"))?
}

/// Worktree registrations and removals of this process take turns (see [`create`]).
static WORKTREE_REGISTRY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Done with a workspace whose work is published (the branch holds it): a worktree goes to the
/// pool while there is room; otherwise the files are removed, in parallel with other jobs, then
/// git's record of the worktree.
pub async fn remove(spec: &WorkspaceSpec) {
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
            if git(&spec.repo, &["worktree", "move", &from, &to], &[])
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
        let _ = git(&spec.repo, &["worktree", "prune"], &[]).await;
    }
}

/// A branch or path name for a plan node: `edit[2]` → `edit/2` (task ids never contain `/`, and
/// a mapped task has no branch of its own, so names cannot collide).
pub fn node_ref_name(node: &str) -> String {
    node.replace('[', "/").replace(']', "")
}
