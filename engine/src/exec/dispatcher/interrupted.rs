//! What a dead ccluster left behind, cleaned before a new run: its task processes outside
//! containers (found by `CCLUSTER_RUN` in their environment) and its unfinished git state.

use std::path::{Path, PathBuf};

use crate::store::{RunRecord, Store};
use crate::workspace::{self, Repo};

/// Kills what is left of an interrupted run's task processes: every process whose environment
/// says `CCLUSTER_RUN=<run>` (set for every task process, and inherited by its children), but
/// those of containers. Linux's `/proc` is read; elsewhere this does nothing.
pub(super) fn reap_orphans(run: &str) {
    let marker = format!("CCLUSTER_RUN={run}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    // A process in another PID namespace lives in a container: its runner finds it (and may
    // adopt it), by the container's labels.
    let pid_namespace = |dir: &Path| std::fs::read_link(dir.join("ns/pid")).ok();
    let ours = pid_namespace(Path::new("/proc/self"));
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if environ
            .split(|b| *b == 0)
            .any(|var| var == marker.as_bytes())
            && pid_namespace(&entry.path()) == ours
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Cleans what an interrupted run left in git: the workspaces of attempts that never ended (a
/// failed attempt's stays, for inspection), and refs of nodes that did not succeed (a ref may have
/// been set just before the process died, before its success was recorded): under the run's
/// `refs/ccluster/runs/<run>/`, and its branches under `refs/heads/ccluster/<run>/` (the result
/// branch, or every node's in a run made before the hidden refs).
pub(super) fn clean_interrupted(store: &Store, run: &RunRecord, kept: &[PathBuf]) {
    let Some(root) = &run.repo else {
        return;
    };
    let repo = Repo {
        root: PathBuf::from(root),
    };
    let tasks = store.tasks(&run.id).unwrap_or_default();
    let state = std::path::absolute(store.dir()).unwrap_or_else(|_| store.dir().into());
    let dir = state.join("worktrees").join(&run.id);
    let mut keep: std::collections::HashSet<PathBuf> = kept.iter().cloned().collect();
    for t in &tasks {
        for a in store.artifacts(&run.id, &t.node).unwrap_or_default() {
            if let Some(w) = a.worktree {
                keep.insert(PathBuf::from(w));
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for entry in entries.flatten() {
            if !keep.contains(&entry.path()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    let _ = workspace::git_sync(&repo.root, &["worktree", "prune"]);
    let prefixes = [
        workspace::names::task_refs_prefix(&run.id),
        workspace::names::legacy_task_refs_prefix(&run.id),
    ];
    let succeeded: std::collections::HashSet<String> = tasks
        .iter()
        .filter(|t| t.state.is_success())
        .flat_map(|t| {
            prefixes
                .iter()
                .map(|p| workspace::names::node_ref(p, &t.node))
        })
        .collect();
    let stray: Vec<String> = prefixes
        .iter()
        .flat_map(|p| repo.refs_under(p))
        .map(|(r, _)| r)
        .filter(|r| !succeeded.contains(r))
        .collect();
    let _ = repo.delete_refs(&stray);
}
