//! Task graphs: a fan-out whose instances have ids and run after one another (`map`, `id`,
//! `after`), planned by a real `claude` worker against the scripted model server, or written in
//! the clusterfile: dependency order, starts from the merge of what an instance runs after,
//! failures that skip exactly their dependents, a planner told what is wrong with its graph, and
//! resuming after `kill -9`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agents::{rehearse, repo};
use crate::apply::{Applied, Sandbox};
use crate::support::{claude_bin, git};

/// A planner (an agent with a structured output) and the graph its subtasks make.
fn planned(rehearsal: &str) -> String {
    format!(
        r#"version = 1
[tasks.plan]
prompt = "Plan the feature"
output_schema = {{ type = "object", required = ["subtasks"], properties = {{ subtasks = {{ type = "array", items = {{ type = "object", required = ["id"], properties = {{ id = {{ type = "string" }}, depends_on = {{ type = "array", items = {{ type = "string" }} }} }} }} }} }} }}
retry = {{ limit = 2 }}
rehearsal = {rehearsal}

[tasks.build]
needs = ["plan"]
map = "{{{{ tasks.plan.output.subtasks }}}}"
id = "{{{{ item.id }}}}"
after = "{{{{ item.depends_on | default([]) }}}}"
prompt = "Build the {{{{ item.id }}}} part"
on_item_failure = "continue"

[tasks.all]
needs = ["build"]
merge = {{ strategy = "git" }}
"#
    )
}

/// The times each task's events happened at: (started, succeeded), in ms.
fn times(run: &Applied) -> HashMap<String, (u64, u64)> {
    let mut out: HashMap<String, (u64, u64)> = HashMap::new();
    for e in &run.events {
        let task = e["task"].as_str().unwrap_or_default().to_string();
        let t = e["time_ms"].as_u64().unwrap_or(0);
        match e["event"].as_str() {
            Some("task_started") => out.entry(task).or_default().0 = t,
            Some("task_succeeded") => out.entry(task).or_default().1 = t,
            _ => {}
        }
    }
    out
}

fn files_of(s: &Sandbox, reference: &str) -> Vec<String> {
    git(s.path(), &["ls-tree", "-r", "--name-only", reference])
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn a_planned_graph_runs_in_dependency_order_from_what_it_builds_on() {
    // Five subtasks, two levels of dependencies below the first: scaffold → api, ui → tests;
    // docs on its own. Every answer takes 0.3 s, so that overlaps show in the event times.
    let s = repo(&planned(
        r#"{ output = { subtasks = [{ id = "scaffold" }, { id = "api", depends_on = ["scaffold"] }, { id = "ui", depends_on = ["scaffold"] }, { id = "tests", depends_on = ["api", "ui"] }, { id = "docs" }] } }"#,
    ));
    std::fs::write(s.path().join("script.toml"), "turn_delay_ms = 300\n").unwrap();
    let run = rehearse(&s, &["--script", "script.toml"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    // The event stream carries the expanded graph.
    let expanded = run.of("map_expanded");
    assert_eq!(expanded.len(), 1, "{}", run.stdout);
    let tests_instance = expanded[0]["graph"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["node"] == "build[tests]")
        .unwrap();
    assert_eq!(
        tests_instance["after"],
        serde_json::json!(["build[api]", "build[ui]"])
    );
    let t = times(&run);
    let node = |id: &str| t[&format!("build[{id}]")];
    // In dependency order: each starts after what it runs after succeeded.
    assert!(node("api").0 >= node("scaffold").1, "{t:?}");
    assert!(node("ui").0 >= node("scaffold").1, "{t:?}");
    assert!(node("tests").0 >= node("api").1.max(node("ui").1), "{t:?}");
    // Independent instances overlap: api with ui, scaffold with docs.
    assert!(
        node("api").0 < node("ui").1 && node("ui").0 < node("api").1,
        "{t:?}"
    );
    assert!(node("docs").0 < node("scaffold").1, "{t:?}");

    // An instance starts from the merge of what it runs after: `tests` sees the notes of api,
    // ui and scaffold; docs sees none of them. The result merges all five.
    let run_id = s.run_id();
    let at = |node: &str| format!("refs/ccluster/runs/{run_id}/{node}");
    let tests = files_of(&s, &at("build%5Btests%5D"));
    for part in ["scaffold", "api", "ui", "tests"] {
        assert!(
            tests.contains(&format!(".ccluster-rehearsal/build.{part}.md")),
            "{tests:?}"
        );
    }
    let docs = files_of(&s, &at("build%5Bdocs%5D"));
    assert!(!docs.iter().any(|f| f.contains("scaffold")), "{docs:?}");
    let all = files_of(&s, &at("all"));
    for part in ["scaffold", "api", "ui", "tests", "docs"] {
        assert!(
            all.contains(&format!(".ccluster-rehearsal/build.{part}.md")),
            "{all:?}"
        );
    }
    // The expanded graph's edges are in the status.
    let status = s.status();
    let tests_record = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "build[tests]")
        .unwrap();
    assert_eq!(
        tests_record["after"],
        serde_json::json!(["build[api]", "build[ui]"])
    );
    // `plan --run` draws the plan as the run expanded it.
    let drawn = s
        .command(&["plan", "--run", "latest", "--format", "dot"])
        .output()
        .unwrap();
    let dot = String::from_utf8_lossy(&drawn.stdout);
    for edge in [
        r#""plan" -> "build[scaffold]";"#,
        r#""build[scaffold]" -> "build[api]";"#,
        r#""build[ui]" -> "build[tests]";"#,
        r#""build[docs]" -> "all";"#,
    ] {
        assert!(dot.contains(edge), "{edge} not in {dot}");
    }
    assert!(!dot.contains("build[*]"), "{dot}");
    // `plan --explain` expands the graph from the planner's cached output, each instance keyed on
    // what it builds on, as `apply` does: nothing would run again.
    let explained = s
        .command(&["plan", "--explain", "--rehearse"])
        .output()
        .unwrap();
    let explained = String::from_utf8_lossy(&explained.stdout);
    assert!(
        explained.starts_with("0 to run, 7 satisfied by cached results"),
        "{explained}"
    );
    assert!(explained.contains("satisfied  build[tests]"), "{explained}");
}

#[test]
fn a_planner_whose_graph_is_invalid_is_told_why_in_its_session_and_answers_again() {
    // First a graph with an unknown id and a cycle, then, in the same session, a valid one.
    let s = repo(&planned(
        r#"{ turns = [
  { tools = [{ name = "StructuredOutput", input = { subtasks = [{ id = "scaffold" }, { id = "tests", depends_on = ["scafold"] }, { id = "a", depends_on = ["b"] }, { id = "b", depends_on = ["a"] }] } }] },
  { tools = [{ name = "StructuredOutput", input = { subtasks = [{ id = "scaffold" }, { id = "tests", depends_on = ["scaffold"] }] } }] },
] }"#,
    ));
    let run = rehearse(&s, &[]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let retrying = run.of("task_retrying");
    assert_eq!(retrying.len(), 1, "{}", run.stdout);
    assert_eq!(retrying[0]["task"], "plan");
    assert_eq!(retrying[0]["class"], "plan_invalid");
    let message = retrying[0]["message"].as_str().unwrap();
    assert!(
        message.contains(
            "`tests` runs after `scafold`, which no instance has; did you mean `scaffold`?"
        ),
        "{message}"
    );
    assert!(
        message.contains("the instances form a cycle: a → b → a"),
        "{message}"
    );
    assert_eq!(
        run.tasks("task_succeeded"),
        ["plan", "build[scaffold]", "build[tests]", "all"]
    );

    // The retry continued the planner's session (one session id for all its requests), and
    // what it was told is in that session's transcript.
    let run_id = s.run_id();
    let dir = s.path().join(".ccluster/runs").join(&run_id);
    let requests = std::fs::read_to_string(dir.join("rehearsal.jsonl")).unwrap();
    let sessions: std::collections::BTreeSet<String> = requests
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["task"] == "plan")
        .map(|r| r["session"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sessions.len(), 1, "{requests}");
    let transcripts = crate::rehearsal_server::files_under(&dir.join("workers"));
    let told = transcripts.iter().any(|f| {
        f.extension().is_some_and(|e| e == "jsonl")
            && std::fs::read_to_string(f)
                .unwrap_or_default()
                .contains("did you mean `scaffold`?")
    });
    assert!(told, "no transcript holds the feedback: {transcripts:?}");
}

#[test]
fn a_failed_instance_skips_exactly_what_runs_after_it() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.step]
map = [{ id = "a", fail = true }, { id = "b", after = ["a"] }, { id = "c", after = ["b"] }, { id = "d" }, { id = "e", after = ["d"] }]
id = "{{ item.id }}"
after = "{{ item.after | default([]) }}"
run = "{% if item.fail | default(false) %}exit 3{% else %}echo {{ item.id }}{% endif %}"
on_item_failure = "continue"
sources = []
"#,
    );
    let run = Applied::from_output(s.command(&["apply", "--output", "json"]).output().unwrap());
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    assert_eq!(run.tasks("task_failed"), ["step[a]"]);
    let mut skipped = run.tasks("task_skipped");
    skipped.sort();
    assert_eq!(skipped, ["step[b]", "step[c]"]);
    let reasons: Vec<&str> = run
        .of("task_skipped")
        .iter()
        .map(|e| e["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons.contains(&"skipped: `step[a]` did not succeed"),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"skipped: `step[b]` did not succeed"),
        "{reasons:?}"
    );
    let mut succeeded = run.tasks("task_succeeded");
    succeeded.sort();
    assert_eq!(succeeded, ["step[d]", "step[e]"]);
}

#[test]
fn a_graph_known_at_plan_time_is_checked_by_validate() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.step]
map = [{ id = "a", after = ["c"] }, { id = "b", after = ["a"] }, { id = "c", after = ["b"] }, { id = "d", after = ["e"] }]
id = "{{ item.id }}"
after = "{{ item.after }}"
run = "true"
"#,
    );
    let out = s.command(&["validate"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error[invalid-graph]"), "{stderr}");
    assert!(
        stderr.contains("`d` runs after `e`, which no instance has"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the instances form a cycle: a → b → c → a"),
        "{stderr}"
    );
    assert!(stderr.contains("clusterfile.toml:4:"), "{stderr}");
}

#[test]
fn after_kill_9_a_graph_resumes_without_asking_the_planner_again() {
    // The planner's subtasks are shell steps: `first`, then `mid` (which waits for `go`), then
    // `last`. Each step writes a line when it starts.
    let s = repo(
        r#"version = 1
[tasks.plan]
prompt = "Plan"
output_schema = { type = "object", required = ["steps"], properties = { steps = { type = "array", items = { type = "object", properties = { id = { type = "string" }, after = { type = "array", items = { type = "string" } } } } } } }
rehearsal = { output = { steps = [{ id = "first" }, { id = "mid", after = ["first"] }, { id = "last", after = ["mid"] }] } }

[tasks.step]
needs = ["plan"]
map = "{{ tasks.plan.output.steps }}"
id = "{{ item.id }}"
after = "{{ item.after | default([]) }}"
run = "echo {{ item.id }} >> started.txt; if [ {{ item.id }} = mid ]; then while [ ! -f go ]; do sleep 0.05; done; fi"
workspace = "none"
sources = []
"#,
    );
    let started = s.path().join("started.txt");
    let go = s.path().join("go");
    let mut child = s
        .command(&["apply", "--rehearse"])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&started)
        .unwrap_or_default()
        .contains("mid")
    {
        assert!(Instant::now() < deadline, "`mid` never started");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::fs::write(&go, "").unwrap();

    let run = rehearse(&s, &[]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    // The planner and `first` come from the interrupted run; only `mid` (interrupted) and
    // `last` run.
    let mut cached = run.tasks("task_cached");
    cached.sort();
    assert_eq!(cached, ["plan", "step[first]"]);
    assert_eq!(run.tasks("task_started"), ["step[mid]", "step[last]"]);
    assert_eq!(
        std::fs::read_to_string(&started).unwrap(),
        "first\nmid\nmid\nlast\n"
    );
    let run_id = s.run_id();
    let requests = s
        .path()
        .join(".ccluster/runs")
        .join(&run_id)
        .join("rehearsal.jsonl");
    assert!(
        !std::fs::read_to_string(requests)
            .unwrap_or_default()
            .contains("\"task\":\"plan\""),
        "the planner was asked again"
    );
}

#[test]
fn an_instance_whose_predecessors_conflict_fails_or_has_an_agent_resolve_it() {
    // `a` and `b` write the same file differently; `c` runs after both, so it starts from their
    // merge, which conflicts.
    let graph = |on_conflict: &str| {
        format!(
            r#"version = 1
[tasks.step]
map = [{{ id = "a" }}, {{ id = "b" }}, {{ id = "c", after = ["a", "b"] }}]
id = "{{{{ item.id }}}}"
after = "{{{{ item.after | default([]) }}}}"
workspace = "worktree"
run = "{{% if item.id == 'c' %}}cat shared.txt > seen.txt{{% else %}}echo {{{{ item.id }}}} > shared.txt{{% endif %}}"
on_item_failure = "continue"
{on_conflict}
"#
        )
    };
    let s = repo(&graph(""));
    let run = Applied::from_output(s.command(&["apply", "--output", "json"]).output().unwrap());
    assert_eq!(run.code, 1, "{}\n{}", run.stdout, run.stderr);
    let failed = run.of("task_failed");
    assert_eq!(failed.len(), 1, "{}", run.stdout);
    assert_eq!(failed[0]["task"], "step[c]");
    assert_eq!(failed[0]["class"], "merge_conflict");

    // With an agent to resolve it (rehearsed: it writes both lines), `c` goes on from the
    // resolution.
    s.write(&graph("on_conflict = \"agent\""));
    git(s.path(), &["commit", "-qam", "resolve with an agent"]);
    std::fs::write(
        s.path().join("script.toml"),
        r#"[tasks."step[c]"]
turns = [{ tools = [{ name = "Write", input = { file_path = "{{cwd}}/shared.txt", content = "a\nb\n" } }] }, { text = "resolved" }]
"#,
    )
    .unwrap();
    let run = rehearse(&s, &["--script", "script.toml"]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let run_id = s.run_id();
    assert_eq!(
        git(
            s.path(),
            &[
                "show",
                &format!("refs/ccluster/runs/{run_id}/step%5Bc%5D:seen.txt")
            ]
        ),
        "a\nb\n"
    );
}
