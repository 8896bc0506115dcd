//! What a run produced, after the fact: `artifacts` (list or print), `report` (Markdown or JSON),
//! `export` (the result as a patch or a branch) and `gc` (remove what finished runs left in git).

/// Prints a line to stdout; a closed pipe (`ccluster doctor | head -1`) ends the output quietly
/// instead of panicking like `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use ccluster_engine::report;
use ccluster_engine::store::{
    Archive, RunRecord, RunRecords, RunState, Store, StoreError, TaskState,
};
use ccluster_engine::workspace::{self, RefName, Repo};

use crate::exit;
use crate::runs::{find_run, load_runs, report as store_error};

/// The run (default: the latest) and its records: the store, opened for reading, or, while another
/// process drives it, the finished runs' archives.
pub(crate) fn open_run(
    dir: &Path,
    run: Option<&str>,
) -> Result<(Box<dyn RunRecords>, RunRecord), u8> {
    let view = load_runs(dir).and_then(|v| find_run(v, run))?;
    if view.live {
        eprintln!(
            "error: run {} is still in progress; try again when it ends",
            view.run.id
        );
        return Err(exit::INVALID_INPUT);
    }
    let records: Box<dyn RunRecords> = match Store::open_reader(dir) {
        Ok(store) => Box::new(store),
        Err(StoreError::Locked { .. }) => Box::new(Archive::new(dir)),
        Err(e) => return Err(store_error(e)),
    };
    Ok((records, view.run))
}

fn matches_task(node: &str, task: &str) -> bool {
    node == task || node.strip_prefix(task).is_some_and(|r| r.starts_with('['))
}

pub fn artifacts(
    dir: &Path,
    run: Option<&str>,
    task: Option<&str>,
    get: Option<&str>,
    json: bool,
) -> u8 {
    // `artifacts TASK`: a first argument that names no run is a task of the latest run.
    let (run, task) = match (run, task) {
        (Some(first), None) if first != "latest" => {
            let names_a_run = load_runs(dir)
                .map(|views| views.iter().any(|v| v.run.id.starts_with(first)))
                .unwrap_or(true);
            if names_a_run {
                (Some(first), None)
            } else {
                (None, Some(first))
            }
        }
        other => other,
    };
    let (store, run) = match open_run(dir, run) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let mut tasks = match store.tasks(&run.id) {
        Ok(t) => t,
        Err(e) => return store_error(e),
    };
    tasks.sort_by_key(|t| t.order);
    let tasks: Vec<_> = tasks
        .into_iter()
        .filter(|t| task.is_none_or(|id| matches_task(&t.node, id)))
        .collect();
    if tasks.is_empty() {
        if let Some(id) = task {
            eprintln!("error: run {} has no task `{id}`", run.id);
            eprintln!("  help: `ccluster status {}` lists its tasks", run.id);
            return exit::INVALID_INPUT;
        }
    }
    if let Some(path) = get {
        return get_artifact(store.as_ref(), &run, &tasks, task, path);
    }
    if json {
        let listing: Vec<serde_json::Value> = tasks
            .iter()
            .map(|t| {
                let (from, node) = t.result_source(&run.id);
                let records = store.artifacts(from, node).unwrap_or_default();
                serde_json::json!({ "node": t.node, "run": from, "attempts": records })
            })
            .collect();
        let doc = serde_json::json!({ "run": run.id, "tasks": listing });
        let _ = writeln!(
            std::io::stdout().lock(),
            "{}",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        );
        return exit::SUCCESS;
    }
    let mut out = std::io::stdout().lock();
    for t in &tasks {
        let (from, node) = t.result_source(&run.id);
        let records = store.artifacts(from, node).unwrap_or_default();
        if records.is_empty() {
            continue;
        }
        let _ = writeln!(out, "{}", t.node);
        for a in records {
            let mut parts = Vec::new();
            if let Some(p) = &a.patch {
                parts.push(format!("{p} ({} files)", a.changed.len()));
            }
            if let Some(b) = &a.branch {
                // Runs made before the hidden refs recorded a branch's short name.
                if b.starts_with("refs/") {
                    parts.push(format!("ref {b}"));
                } else {
                    parts.push(format!("branch {b}"));
                }
            }
            if let Some(w) = &a.worktree {
                parts.push(format!("worktree {w}"));
            }
            let _ = writeln!(
                out,
                "  attempt {}{}: {}",
                a.attempt,
                match (&t.cached_from, &t.deduplicated_from) {
                    (_, Some(original)) => format!(" (of {original}, run {from})"),
                    (Some(_), None) => format!(" (run {from})"),
                    (None, None) => String::new(),
                },
                if parts.is_empty() {
                    "no changes".into()
                } else {
                    parts.join(", ")
                }
            );
            for f in &a.changed {
                let n = |v: Option<u64>| v.map_or("-".into(), |v| v.to_string());
                let _ = writeln!(
                    out,
                    "    +{:<5} -{:<5} {}",
                    n(f.added),
                    n(f.removed),
                    f.path
                );
            }
            let logs = dir.join("runs").join(from).join("logs");
            for stream in [
                "setup.out",
                "setup.err",
                "resolve.out",
                "resolve.err",
                "out",
                "err",
            ] {
                let path = ccluster_engine::exec::log_path(&logs, node, a.attempt, stream);
                if path.exists() {
                    let _ = writeln!(out, "    log    {}", path.display());
                }
            }
            for f in &a.files {
                let _ = writeln!(out, "    file   {f}");
            }
            for r in &a.reports {
                let _ = writeln!(
                    out,
                    "    report {}: {} passed, {} failed, {} skipped",
                    r.path, r.passed, r.failed, r.skipped
                );
            }
        }
    }
    exit::SUCCESS
}

/// Prints one artifact of a task's last attempt: `patch.diff`, a kept file, or a report.
fn get_artifact(
    store: &dyn RunRecords,
    run: &RunRecord,
    tasks: &[ccluster_engine::store::TaskRecord],
    task: Option<&str>,
    path: &str,
) -> u8 {
    let [t] = tasks else {
        eprintln!(
            "error: --get needs one plan node; `{}` has {}",
            task.unwrap_or("the run"),
            tasks.len()
        );
        eprintln!("  help: name an instance, e.g. `edit[0]`");
        return exit::INVALID_INPUT;
    };
    let (from, node) = t.result_source(&run.id);
    let Some(a) = store.artifacts(from, node).unwrap_or_default().pop() else {
        eprintln!("error: `{}` has no artifacts", t.node);
        eprintln!(
            "  help: `ccluster artifacts {} {}` lists what each attempt left",
            run.id, t.node
        );
        return exit::INVALID_INPUT;
    };
    let dir = PathBuf::from(&a.dir);
    let file = if Some(path) == a.patch.as_deref() {
        dir.join(path)
    } else if a.files.iter().any(|f| f == path) || a.reports.iter().any(|r| r.path == path) {
        dir.join("files").join(path)
    } else {
        eprintln!("error: `{}` has no artifact `{path}`", t.node);
        eprintln!(
            "  help: `ccluster artifacts {} {}` lists them",
            run.id, t.node
        );
        return exit::INVALID_INPUT;
    };
    match std::fs::read(&file) {
        Ok(bytes) => {
            let _ = std::io::stdout().lock().write_all(&bytes);
            exit::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            exit::TASK_FAILED
        }
    }
}

pub fn report(dir: &Path, run: Option<&str>, json: bool) -> u8 {
    let (store, run) = match open_run(dir, run) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let built = match report::build(store.as_ref(), &run) {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let text = if json {
        serde_json::to_string_pretty(&built).unwrap_or_default() + "\n"
    } else {
        report::to_markdown(&built)
    };
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
    exit::SUCCESS
}

pub fn export(dir: &Path, run: Option<&str>, patch: Option<&Path>, branch: Option<&str>) -> u8 {
    // A name that git would read as an option (`-M` renames the checked-out branch) or that is
    // not a valid branch name is refused before anything runs.
    let branch = match branch.map(RefName::branch).transpose() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: --branch: {e}");
            return exit::INVALID_INPUT;
        }
    };
    let (store, run) = match open_run(dir, run) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let built = match report::build(store.as_ref(), &run) {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    let (Some(repo), Some(base)) = (&run.repo, &run.base) else {
        eprintln!(
            "error: run {} has no workspaces, so no result to export",
            run.id
        );
        return exit::INVALID_INPUT;
    };
    let Some(result) = built.result else {
        eprintln!(
            "error: run {} has no result: {}",
            run.id,
            match &run.result {
                Some(task) => format!("its result task `{task}` did not succeed"),
                None => "it has no git merge task, and `[workflow] result` is not set".into(),
            }
        );
        return exit::TASK_FAILED;
    };
    let repo = Path::new(repo);
    if let Some(file) = patch {
        let diff = match workspace::git_sync_bytes(
            repo,
            &[
                "diff",
                "--binary",
                "--no-renames",
                "--end-of-options",
                base,
                &result.commit,
                "--",
            ],
        ) {
            Ok(diff) => diff,
            Err(e) => {
                eprintln!("error: {e}");
                return exit::TASK_FAILED;
            }
        };
        let written = if file == Path::new("-") {
            std::io::stdout().lock().write_all(&diff)
        } else {
            std::fs::write(file, &diff)
        };
        if let Err(e) = written {
            eprintln!("error: cannot write {}: {e}", file.display());
            return exit::TASK_FAILED;
        }
        if file != Path::new("-") {
            eprintln!(
                "wrote {} ({} against base {}): apply it with `git apply {}`",
                file.display(),
                result.branch,
                &base[..base.len().min(10)],
                file.display()
            );
        }
    }
    if let Some(branch) = branch {
        let repo = Repo {
            root: repo.to_path_buf(),
        };
        if let Err(e) = repo.create_branch(&branch, &result.commit) {
            eprintln!("error: {e}");
            return exit::INVALID_INPUT;
        }
        eprintln!(
            "created branch {} at {}",
            branch.short_branch().unwrap_or_default(),
            &result.commit[..result.commit.len().min(10)]
        );
    }
    exit::SUCCESS
}

/// Removes the worktrees and refs of finished runs; keeps each run's result branch, the
/// worktrees of failed attempts when the run says `keep_failed`, everything of a live run, and,
/// with `keep`, everything of the `keep` most recent finished runs.
pub fn gc(dir: &Path, dry_run: bool, keep: Option<usize>) -> u8 {
    if !dir.join("db").exists() {
        out!("nothing to collect in {}", dir.display());
        return exit::SUCCESS;
    }
    // The writer lock: no run may start while its worktrees are being removed.
    let store = match Store::open(dir) {
        Ok(s) => s,
        Err(e) => return store_error(e),
    };
    crate::runs::warn_if_loose(&store);
    let runs = match store.runs() {
        Ok(r) => r,
        Err(e) => return store_error(e),
    };
    // A run still marked `running` (its process died; the next `apply` marks it interrupted) is
    // never collected, so it does not count among the kept ones either. Run ids sort by start.
    let mut finished: Vec<&RunRecord> = runs
        .iter()
        .filter(|r| r.state != RunState::Running)
        .collect();
    finished.sort_by(|a, b| b.id.cmp(&a.id));
    let spared = keep.unwrap_or(0).min(finished.len());
    let kept_runs: Vec<&RunRecord> = finished[..spared].to_vec();
    let (mut worktrees, mut refs, mut kept) = (0usize, 0usize, Vec::new());
    // What `--dry-run` would remove, by name.
    let mut listing: Vec<String> = Vec::new();
    let mut repos: HashSet<String> = HashSet::new();
    for run in &finished[spared..] {
        let Some(root) = &run.repo else { continue };
        repos.insert(root.clone());
        let repo = Repo {
            root: PathBuf::from(root),
        };
        let mut failed_worktrees = HashSet::new();
        if run.keep_failed {
            for t in store.tasks(&run.id).unwrap_or_default() {
                if t.state == TaskState::Failed {
                    for a in store.artifacts(&run.id, &t.node).unwrap_or_default() {
                        if let Some(w) = a.worktree {
                            failed_worktrees.insert(PathBuf::from(w));
                        }
                    }
                }
            }
        }
        let state = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        if let Ok(entries) = std::fs::read_dir(state.join("worktrees").join(&run.id)) {
            for entry in entries.flatten() {
                if failed_worktrees.contains(&entry.path()) {
                    continue;
                }
                worktrees += 1;
                if dry_run {
                    listing.push(format!("worktree {}", entry.path().display()));
                } else {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        // The run's refs under `refs/ccluster/runs/<run>/`, and its branches: the result branch
        // stays; the others are those of runs made before the hidden refs (one per node).
        let result = run.result_branch();
        let doomed: Vec<String> = [
            workspace::names::task_refs_prefix(&run.id),
            workspace::names::legacy_task_refs_prefix(&run.id),
        ]
        .iter()
        .flat_map(|prefix| repo.refs_under(prefix))
        .map(|(r, _)| r)
        .filter(|r| {
            if Some(r) == result.as_ref() {
                kept.push(r.trim_start_matches("refs/heads/").to_string());
                false
            } else {
                true
            }
        })
        .collect();
        refs += doomed.len();
        if dry_run {
            listing.extend(doomed.iter().map(|r| match r.strip_prefix("refs/heads/") {
                Some(branch) => format!("branch {branch}"),
                None => format!("ref {r}"),
            }));
        } else if let Err(e) = repo.delete_refs(&doomed) {
            eprintln!("warning: {e}");
        }
    }
    // Worktrees waiting for reuse go too: they only make later runs faster.
    let state = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    if let Ok(entries) = std::fs::read_dir(state.join("worktrees").join("pool")) {
        for entry in entries.flatten() {
            worktrees += 1;
            if dry_run {
                listing.push(format!("worktree {}", entry.path().display()));
            } else {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    if !dry_run {
        for root in &repos {
            let _ = workspace::git_sync(Path::new(root), &["worktree", "prune"]);
        }
    }
    out!(
        "{} {worktrees} worktrees and {refs} refs of finished runs",
        if dry_run { "would remove" } else { "removed" }
    );
    // What a crash left in a Kubernetes cluster (no run is going on: we hold the lock).
    for item in crate::runs::kubernetes_leftovers(&state, &runs, dry_run) {
        if dry_run {
            listing.push(item);
        } else {
            out!("removed {item}");
        }
    }
    for run in kept_runs {
        out!(
            "kept run {} (one of the {} most recent)",
            run.id,
            keep.unwrap_or(0)
        );
    }
    for k in kept {
        out!("kept result branch {k}");
    }
    for item in listing {
        out!("  would remove {item}");
    }
    exit::SUCCESS
}
