//! `ccluster attach`: a command (or shell) where a running task works, while it runs.

use std::time::{Duration, Instant};

use crate::apply::{Applied, Sandbox};

/// Waits until `node` of the run in progress is running.
pub(crate) fn wait_running(s: &Sandbox, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = s.command(&["status", "-o", "json"]).output().unwrap();
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            let running = v["tasks"].as_array().is_some_and(|ts| {
                ts.iter()
                    .any(|t| t["node"] == node && t["state"] == "running")
            });
            if running {
                return;
            }
        }
        assert!(Instant::now() < deadline, "{node} never ran");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn attach_runs_a_command_in_the_running_tasks_worktree_and_its_changes_are_the_tasks() {
    let release = tempfile::tempdir().unwrap();
    let gate = release.path().join("go");
    let s = Sandbox::in_repo(
        &format!(
            r#"version = 1
[workflow]
result = "edit"
[tasks.edit]
workspace = "worktree"
run = "while [ ! -f {gate} ]; do sleep 0.1; done"
[tasks.plain]
run = "while [ ! -f {gate} ]; do sleep 0.1; done"
sources = []
"#,
            gate = gate.display()
        ),
        &[("README", "base\n")],
    );
    let child = s.spawn_apply(&["--jobs", "2"]);
    wait_running(&s, "edit");
    wait_running(&s, "plain");

    let out = s
        .command(&[
            "attach",
            "edit",
            "--",
            "sh",
            "-c",
            "pwd; echo $CCLUSTER_TASK; echo from-attach > attached.txt",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut lines = stdout.lines();
    let place = lines.next().unwrap();
    assert!(
        place.contains("/.ccluster/worktrees/") && place.ends_with("/edit.1"),
        "{stdout}"
    );
    assert_eq!(lines.next(), Some("edit"));

    // A task without a workspace works in the clusterfile's directory.
    let out = s
        .command(&["attach", "plain", "--", "pwd"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        std::fs::canonicalize(s.path())
            .unwrap()
            .display()
            .to_string()
    );
    // The command's exit code is attach's.
    let out = s
        .command(&["attach", "plain", "--", "sh", "-c", "exit 7"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(7));

    std::fs::write(&gate, "").unwrap();
    let done = Applied::from_output(child.wait_with_output().unwrap());
    assert_eq!(done.code, 0, "{}", done.stderr);
    // What was changed through attach is part of the task's result.
    let patch = s.command(&["export", "--patch", "-"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&patch.stdout).contains("+from-attach"),
        "{}",
        String::from_utf8_lossy(&patch.stderr)
    );

    // Once the task has ended there is nothing to attach to.
    let out = s
        .command(&["attach", "edit", "--", "true"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("is not running") && stderr.contains("help: "),
        "{stderr}"
    );
}
