//! How a worktree travels to a pod and back: the commit it starts from, made with a scratch
//! index, and the pod's pushed result applied to the local worktree.

use super::*;

/// The variable of the pod's git token (from the run's Secret).
pub(super) const TOKEN_VAR: &str = "CCLUSTER_GIT_TOKEN";

/// What a pod's workspace is: the commit it starts from, and where it pushes.
pub(super) struct Travel {
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
