//! Deduplication inside a run: plan nodes of one task doing the same work run once, in one run;
//! the others take the original's outcome (success or failure), also after a `kill -9`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::apply::{Applied, Sandbox};
use crate::support::{claude_bin, git, task};

/// A map whose instances append their item to `count` (outside the workspace, so the test counts
/// real runs) and then say it; `extra` is added to the task.
fn counting_map(count: &Path, items: &str, extra: &str) -> String {
    format!(
        r#"version = 1
[workflow]
name = "dedup"

[tasks.work]
map = {items}
run = "echo {{{{ item }}}} >> '{}'; sleep 0.3; echo done-{{{{ item }}}}"
sources = []
{extra}
"#,
        count.display()
    )
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The instances of the map, each as (state, deduplicated_from).
fn states(status: &Value) -> Vec<(String, Option<String>)> {
    status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["state"].as_str().unwrap().to_string(),
                t["deduplicated_from"].as_str().map(str::to_string),
            )
        })
        .collect()
}

fn ok(run: &Applied) {
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
}

/// Snapshots human output, with what changes from run to run replaced.
fn snapshot(name: &str, text: &str) {
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(r"\d{8}-\d{6}\.\d{3}-[0-9a-f]{4}", "[RUN]");
    settings.add_filter(r"\b\d{2}:\d{2}:\d{2}\b", "[CLOCK]");
    settings.add_filter(r"\b\d+(\.\d+)?m?s\b", "[TIME]");
    settings.bind(|| insta::assert_snapshot!(name, text));
}

#[test]
fn a_map_over_a_a_b_runs_each_distinct_item_once_and_reports_the_duplicate() {
    let outside = tempfile::tempdir().unwrap();
    let count = outside.path().join("count");
    let s = Sandbox::new(&counting_map(&count, r#"["a", "a", "b"]"#, ""));
    // Two slots: `work[2]` starts beside `work[0]` while `work[1]` waits without a slot.
    let run = s.apply(&["--jobs", "2"]);
    ok(&run);
    let mut ran = lines(&count);
    ran.sort();
    assert_eq!(ran, ["a", "b"], "each distinct item runs once");
    assert_eq!(run.tasks("task_started"), ["work[0]", "work[2]"]);
    let dedup = run.of("task_deduplicated");
    assert_eq!(dedup.len(), 1, "{}", run.stdout);
    assert_eq!(dedup[0]["task"], "work[1]");
    assert_eq!(dedup[0]["from_task"], "work[0]");
    // Each node ends with exactly one terminal event.
    assert!(!run.tasks("task_succeeded").contains(&"work[1]".to_string()));
    // The waiting duplicate held no slot: `work[2]` started before `work[0]` ended.
    let position = |event: &str, node: &str| {
        run.events
            .iter()
            .position(|e| e["event"] == event && e["task"] == node)
            .unwrap()
    };
    assert!(position("task_started", "work[2]") < position("task_succeeded", "work[0]"));
    assert!(position("task_succeeded", "work[0]") < position("task_deduplicated", "work[1]"));

    let status = s.status();
    let dup = task(&status, "work[1]");
    assert_eq!(dup["state"], "succeeded");
    assert_eq!(dup["deduplicated_from"], "work[0]");
    assert_eq!(dup["attempts"], 0);
    assert_eq!(dup["output"], "done-a");
    assert!(task(&status, "work[0]").get("deduplicated_from").is_none());
    let finished = run.of("run_finished");
    assert_eq!(finished[0]["succeeded"], 3);

    // The text of `status` and the report say it too.
    let table = s.command(&["status"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    snapshot("dedup-status", &table);
    let report = s.command(&["report"]).output().unwrap();
    assert!(report.status.success());
    let report = String::from_utf8_lossy(&report.stdout).into_owned();
    snapshot("dedup-report", &report);
    let json = s.command(&["report", "-o", "json"]).output().unwrap();
    assert!(json.status.success());
    let json: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(json["totals"]["deduplicated"], 1, "{json}");
    assert_eq!(json["tasks"][1]["deduplicated_from"], "work[0]", "{json}");

    // The next run takes everything from the cache; `--fresh` runs the work again, once.
    ok(&s.apply(&[]));
    assert_eq!(lines(&count).len(), 2);
    let fresh = s.apply(&["--fresh"]);
    ok(&fresh);
    assert_eq!(
        lines(&count).len(),
        4,
        "--fresh ran each distinct item once more"
    );
    assert_eq!(fresh.tasks("task_deduplicated"), ["work[1]"]);
}

#[test]
fn the_human_progress_shows_the_duplicate() {
    let outside = tempfile::tempdir().unwrap();
    let count = outside.path().join("count");
    let s = Sandbox::new(&counting_map(&count, r#"["a", "a", "b"]"#, ""));
    // One slot: the order of the lines is fixed.
    let out = s.command(&["apply", "--jobs", "1"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    snapshot("dedup-progress", &String::from_utf8_lossy(&out.stdout));
}

#[test]
fn a_failing_original_fails_its_duplicate_without_running_it_after_its_retries() {
    let outside = tempfile::tempdir().unwrap();
    let count = outside.path().join("count");
    let clusterfile = format!(
        r#"version = 1
[tasks.work]
map = ["x", "x"]
run = "echo {{{{ item }}}} >> '{}'; sleep 0.2; exit 3"
sources = []
retry = {{ limit = 1, on = ["exit_code"], backoff = {{ initial = "50ms", jitter = 0.0 }} }}
"#,
        count.display()
    );
    let s = Sandbox::new(&clusterfile);
    let run = s.apply(&["--jobs", "2"]);
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    // The original ran twice (its retry); the duplicate waited for the last attempt, never ran.
    assert_eq!(lines(&count), ["x", "x"]);
    assert_eq!(run.tasks("task_started"), ["work[0]", "work[0]"]);
    let failed = run.of("task_failed");
    assert_eq!(failed.len(), 2, "{}", run.stdout);
    let dup = failed.iter().find(|e| e["task"] == "work[1]").unwrap();
    assert_eq!(dup["class"], "exit_code");
    assert_eq!(dup["exit_code"], 3);
    assert_eq!(dup["attempt"], 0);
    assert_eq!(
        dup["message"],
        "`work[0]`, which does the same work, failed: exit code 3"
    );
    assert!(run.of("task_deduplicated").is_empty());
    let status = s.status();
    let t = task(&status, "work[1]");
    assert_eq!(t["state"], "failed");
    assert_eq!(t["class"], "exit_code");
    assert_eq!(t["deduplicated_from"], "work[0]");
    assert_eq!(t["attempts"], 0);
    assert_eq!(task(&status, "work[0]")["attempts"], 2);
    assert_eq!(
        states(&status),
        [
            ("failed".into(), None),
            ("failed".into(), Some("work[0]".into()))
        ]
    );
}

#[test]
fn instances_whose_work_differs_by_their_index_are_not_duplicates() {
    let outside = tempfile::tempdir().unwrap();
    let count = outside.path().join("count");
    let clusterfile = format!(
        r#"version = 1
[tasks.work]
map = ["a", "a"]
run = "echo {{{{ item }}}}-{{{{ index }}}} >> '{}'"
sources = []

[tasks.again]
run = "echo a-0 >> '{}'"
sources = []
"#,
        count.display(),
        count.display()
    );
    let s = Sandbox::new(&clusterfile);
    let run = s.apply(&[]);
    ok(&run);
    let mut ran = lines(&count);
    ran.sort();
    // Two instances rendering two commands, and another task: three runs, nothing deduplicated.
    assert_eq!(ran, ["a-0", "a-0", "a-1"]);
    assert!(run.of("task_deduplicated").is_empty());
}

/// `kill -9` once the original's success is durable and before its duplicate is settled: the next
/// `apply` takes the original from the cache and settles the duplicate from it; neither runs.
#[test]
fn after_kill_9_between_the_original_and_its_duplicate_nothing_runs_twice() {
    let outside = tempfile::tempdir().unwrap();
    let count = outside.path().join("count");
    let hold = outside.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    // With one slot, `work[1]` (which waits while `hold` exists) runs after the original
    // `work[0]`, and the duplicate `work[2]` is reached only after `work[1]`. (A tenth of a
    // second each, so that no start is committed ahead of a free slot: see docs/state.md.)
    let clusterfile = format!(
        r#"version = 1
[tasks.work]
map = ["a", "wait", "a"]
run = "echo {{{{ item }}}} >> '{count}'; if [ {{{{ item }}}} = wait ]; then while [ -e '{hold}' ]; do sleep 0.05; done; fi; sleep 0.1; echo done-{{{{ item }}}}"
sources = []
"#,
        count = count.display(),
        hold = hold.display()
    );
    let s = Sandbox::new(&clusterfile);
    let mut child = s.spawn_apply(&["--jobs", "1"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        assert!(Instant::now() < deadline, "work[1] never started");
        assert!(child.try_wait().unwrap().is_none(), "apply ended early");
        let out = s
            .command(&["status", "--json", "--state-dir", ".ccluster"])
            .output()
            .unwrap();
        if let Ok(status) = serde_json::from_slice::<Value>(&out.stdout) {
            let state = |node: &str| {
                status["tasks"]
                    .as_array()
                    .and_then(|ts| ts.iter().find(|t| t["node"] == node))
                    .map(|t| t["state"].clone())
            };
            if state("work[0]") == Some("succeeded".into())
                && state("work[1]") == Some("running".into())
            {
                break status;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();
    let first_run = first["run"]["id"].as_str().unwrap().to_string();
    // The duplicate was not settled before the kill.
    assert!(
        !first["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["node"] == "work[2]" && t["state"] != "pending"),
        "{first}"
    );
    std::fs::remove_file(&hold).unwrap();

    let resumed = s.apply(&["--jobs", "1"]);
    ok(&resumed);
    // `a` ran once in all; `wait` was cut short by the kill and ran again (at-least-once).
    assert_eq!(lines(&count), ["a", "wait", "wait"]);
    assert_eq!(resumed.tasks("task_started"), ["work[1]"]);
    assert_eq!(resumed.tasks("task_cached"), ["work[0]"]);
    let dedup = resumed.of("task_deduplicated");
    assert_eq!(dedup.len(), 1, "{}", resumed.stdout);
    assert_eq!(dedup[0]["task"], "work[2]");
    assert_eq!(dedup[0]["from_task"], "work[0]");
    let status = s.status();
    let dup = task(&status, "work[2]");
    // The original came from the cache, so the duplicate is cached too, from the killed run.
    assert_eq!(dup["state"], "cached");
    assert_eq!(dup["cached_from"], first_run.as_str());
    assert_eq!(dup["deduplicated_from"], "work[0]");
    assert_eq!(dup["output"], "done-a");
    // And one more apply runs nothing.
    let again = s.apply(&["--jobs", "1"]);
    ok(&again);
    assert!(again.of("task_started").is_empty());
    assert_eq!(lines(&count).len(), 3);
}

const PLANNED: &str = r#"version = 1
[workflow]
name = "planned"

[tasks.plan]
prompt = "Split the work into parts"
output_schema = { type = "object", required = ["parts"], properties = { parts = { type = "array", items = { type = "object", required = ["name"], properties = { name = { type = "string" } } } } } }
rehearsal = { output = { parts = [{ name = "docs" }, { name = "docs" }] } }

[tasks.build]
needs = ["plan"]
map = "{{ tasks.plan.output.parts }}"
prompt = "Write the {{ item.name }} page"
"#;

/// A planner returning two identical subtasks: one agent session for the two, with the real CLI.
#[test]
fn a_planner_returning_two_identical_subtasks_pays_for_one_agent_session() {
    let s = Sandbox::in_repo(PLANNED, &[]);
    let run = Applied::from_output(
        s.command(&[
            "apply",
            "--rehearse",
            "--output",
            "json",
            "--grace-period",
            "1s",
            "--jobs",
            "3",
        ])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .output()
        .unwrap(),
    );
    ok(&run);
    assert_eq!(run.tasks("task_started"), ["plan", "build[0]"]);
    assert_eq!(run.tasks("task_deduplicated"), ["build[1]"]);
    let status = s.status();
    let id = status["run"]["id"].as_str().unwrap();
    let requests = std::fs::read_to_string(
        s.path()
            .join(".ccluster/runs")
            .join(id)
            .join("rehearsal.jsonl"),
    )
    .unwrap();
    let sessions: std::collections::BTreeSet<(String, String)> = requests
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|r| (r["task"].to_string(), r["session"].to_string()))
        .collect();
    // One session for the planner, one for the two builders.
    assert_eq!(sessions.len(), 2, "{requests}");
    assert!(
        !requests.contains("build[1]"),
        "the duplicate asked the model: {requests}"
    );
    let (original, dup) = (task(&status, "build[0]"), task(&status, "build[1]"));
    assert_eq!(original["state"], "succeeded");
    assert_eq!(dup["state"], "succeeded");
    assert_eq!(dup["deduplicated_from"], "build[0]");
    assert_eq!(dup["output"], original["output"]);
    assert!(dup.get("cost_usd").is_none(), "{dup}");
    // Its commit is the original's, under its own ref of the run.
    let commit = original["commit"].as_str().unwrap();
    assert_eq!(dup["commit"], commit);
    let own = git(
        s.path(),
        &["rev-parse", &format!("refs/ccluster/runs/{id}/build/1")],
    );
    assert_eq!(own.trim(), commit);
    // The report lists the original's changes for it, as the cache does for a cached node.
    let report = Command::new(env!("CARGO_BIN_EXE_ccluster"))
        .args(["report"])
        .current_dir(s.path())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.contains("| `build[1]` | succeeded, deduplicated from `build[0]` |"),
        "{report}"
    );
}

/// `ccluster cancel` while the original runs: its waiting duplicate is cancelled with it, unrun.
#[test]
fn a_cancelled_original_cancels_its_waiting_duplicate() {
    let outside = tempfile::tempdir().unwrap();
    let count = outside.path().join("count");
    let hold = outside.path().join("hold");
    std::fs::write(&hold, "").unwrap();
    let clusterfile = format!(
        r#"version = 1
[tasks.work]
map = ["x", "x"]
run = "echo {{{{ item }}}} >> '{count}'; while [ -e '{hold}' ]; do sleep 0.05; done"
sources = []
"#,
        count = count.display(),
        hold = hold.display()
    );
    let s = Sandbox::new(&clusterfile);
    let child = s.spawn_apply(&["--jobs", "2"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while lines(&count).is_empty() {
        assert!(Instant::now() < deadline, "work[0] never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cancel = s.command(&["cancel"]).output().unwrap();
    assert!(cancel.status.success(), "{cancel:?}");
    let run = Applied::from_output(child.wait_with_output().unwrap());
    assert_eq!(run.code, 130, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(lines(&count), ["x"]);
    assert_eq!(run.tasks("task_started"), ["work[0]"]);
    let cancelled = run.of("task_cancelled");
    let dup = cancelled.iter().find(|e| e["task"] == "work[1]").unwrap();
    assert_eq!(
        dup["reason"],
        "not run: `work[0]`, which does the same work, was cancelled"
    );
    let status = s.status();
    assert_eq!(task(&status, "work[1]")["deduplicated_from"], "work[0]");
    assert_eq!(task(&status, "work[1]")["state"], "cancelled");
}

/// A planned task graph with two subtasks of the same work under different ids: one agent
/// session for both, and what runs after the duplicate starts from the original's result.
#[test]
fn in_a_task_graph_a_duplicate_subtask_runs_once_and_its_dependents_build_on_its_result() {
    let s = crate::agents::repo(
        r#"version = 1
[tasks.plan]
prompt = "Plan the feature"
output_schema = { type = "object", required = ["subtasks"], properties = { subtasks = { type = "array", items = { type = "object", required = ["id", "topic"], properties = { id = { type = "string" }, topic = { type = "string" }, depends_on = { type = "array", items = { type = "string" } } } } } } }
rehearsal = { output = { subtasks = [{ id = "docs", topic = "the docs" }, { id = "manual", topic = "the docs" }, { id = "check", topic = "a check", depends_on = ["manual"] }] } }

[tasks.build]
needs = ["plan"]
map = "{{ tasks.plan.output.subtasks }}"
id = "{{ item.id }}"
after = "{{ item.depends_on | default([]) }}"
prompt = "Write {{ item.topic }}"
"#,
    );
    let run = crate::agents::rehearse(&s, &["--jobs", "3"]);
    ok(&run);
    assert_eq!(run.tasks("task_deduplicated"), ["build[manual]"]);
    assert_eq!(run.of("task_deduplicated")[0]["from_task"], "build[docs]");
    let mut started = run.tasks("task_started");
    started.sort();
    assert_eq!(started, ["build[check]", "build[docs]", "plan"]);
    let id = s.run_id();
    let requests = std::fs::read_to_string(
        s.path()
            .join(".ccluster/runs")
            .join(&id)
            .join("rehearsal.jsonl"),
    )
    .unwrap();
    let sessions: std::collections::BTreeSet<String> = requests
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["session"].to_string())
        .collect();
    assert_eq!(sessions.len(), 3, "{requests}");
    // `check` runs after the duplicate, from its commit: the original's work.
    let files = git(
        s.path(),
        &[
            "ls-tree",
            "-r",
            "--name-only",
            &format!("refs/ccluster/runs/{id}/build%5Bcheck%5D"),
        ],
    );
    assert!(
        files.contains(".ccluster-rehearsal/build.docs.md"),
        "{files}"
    );
    let status = s.status();
    assert_eq!(
        task(&status, "build[manual]")["deduplicated_from"],
        "build[docs]"
    );
    assert_eq!(
        task(&status, "build[manual]")["commit"],
        task(&status, "build[docs]")["commit"]
    );
}
