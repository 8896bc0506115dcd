//! Results you can trust: a cached result stands only for the files it read, a clusterfile edit
//! re-runs only what it changed, and `retry` never turns a failure into "cached".

use serde_json::Value;

use crate::apply::Sandbox;
use crate::support::{git, task};

/// A sandbox that is a git repository with its clusterfile and `src/a.rs` committed.
fn repo(clusterfile: &str) -> Sandbox {
    Sandbox::in_repo(clusterfile, &[("src/a.rs", "fn a() {}\n")])
}

fn explain(s: &Sandbox) -> Vec<Value> {
    let out = s
        .command(&["plan", "--explain", "--format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: Value = serde_json::from_slice(&out.stdout).unwrap();
    plan["explain"].as_array().unwrap().clone()
}

fn verdict<'a>(explained: &'a [Value], node: &str) -> &'a Value {
    explained
        .iter()
        .find(|e| e["task"] == node)
        .unwrap_or_else(|| panic!("no {node} in {explained:?}"))
}

#[test]
fn a_task_without_a_workspace_is_keyed_on_the_files_the_repository_tracks() {
    let s = repo(
        r#"version = 1
[tasks.exists]
run = "test -e src/a.rs"
[tasks.pinned]
run = "echo pinned >> pinned.log"
sources = []
[tasks.globbed]
run = "echo globbed >> globbed.log"
sources = ["docs/*.md"]
"#,
    );
    s.file("docs/x.md", "one\n").unwrap();
    s.commit_all("docs");
    assert_eq!(s.apply(&[]).code, 0);
    let again = s.apply(&[]);
    assert_eq!(again.code, 0);
    assert!(again.tasks("task_started").is_empty(), "nothing changed");

    // An untracked file (an output, say) changes nothing.
    s.file("out.txt", "made by a task\n").unwrap();
    assert!(s.apply(&[]).tasks("task_started").is_empty());

    // The file `exists` reads is deleted and the deletion committed: it runs, and fails.
    git(s.path(), &["rm", "-q", "src/a.rs"]);
    git(s.path(), &["commit", "-q", "-m", "delete a.rs"]);
    let explained = explain(&s);
    assert_eq!(
        verdict(&explained, "exists")["changed"],
        serde_json::json!(["sources"])
    );
    assert_eq!(
        verdict(&explained, "exists")["files"],
        serde_json::json!(["src/a.rs (deleted)"]),
        "explain names the file that changed"
    );
    assert_eq!(verdict(&explained, "pinned")["verdict"], "satisfied");
    assert_eq!(verdict(&explained, "globbed")["verdict"], "satisfied");
    let deleted = s.apply(&[]);
    assert_eq!(deleted.code, 1, "{}", deleted.stderr);
    assert_eq!(deleted.tasks("task_started"), ["exists"]);
    assert_eq!(task(&s.status(), "exists")["state"], "failed");

    // Uncommitted edits count too, as they are on disk; declared sources only for their files.
    s.file("src/a.rs", "fn a() {}\n").unwrap();
    s.file("docs/x.md", "two\n").unwrap();
    let explained = explain(&s);
    assert_eq!(
        verdict(&explained, "globbed")["files"],
        serde_json::json!(["docs/x.md"])
    );
    let edited = s.apply(&[]);
    assert_eq!(edited.code, 0, "{}", edited.stderr);
    let mut started = edited.tasks("task_started");
    started.sort();
    assert_eq!(started, ["exists", "globbed"], "`sources = []` opts out");
    assert_eq!(s.read("pinned.log"), "pinned\n");
}

#[test]
fn sources_outside_the_directory_are_refused_at_validate() {
    let s = repo(
        r#"version = 1
[tasks.sneaky]
run = "true"
sources = ["../elsewhere/*", "/etc/passwd", "src/[.rs"]
"#,
    );
    let out = s.command(&["validate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for problem in [
        "leaves the clusterfile's directory",
        "an absolute path",
        "not a glob",
    ] {
        assert!(stderr.contains(problem), "{problem}: {stderr}");
    }
    assert!(stderr.contains("clusterfile.toml:4:"), "{stderr}");
}

const EDITING: &str = r#"version = 1
[tasks.edit]
map = ["a", "b"]
workspace = "worktree"
run = "echo edited >> src/{{ item }}.rs"
[tasks.join]
needs = ["edit"]
merge = { strategy = "git" }
[tasks.check]
needs = ["join"]
run = "cat src/a.rs src/b.rs"
"#;

#[test]
fn editing_the_clusterfile_reruns_only_the_tasks_it_changed() {
    let s = repo(EDITING);
    let first = s.apply(&[]);
    assert_eq!(first.code, 0, "{}", first.stderr);

    // A new, unrelated task: the workspace tasks keep their results.
    s.write(&format!(
        "{EDITING}[tasks.other]\nrun = \"true\"\nsources = []\n"
    ));
    s.file("clusterfile.lock", "# lock\n").unwrap();
    s.commit_all("another task");
    let explained = explain(&s);
    assert_eq!(verdict(&explained, "edit[0]")["verdict"], "satisfied");
    assert_eq!(verdict(&explained, "check")["verdict"], "satisfied");
    let second = s.apply(&[]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert_eq!(second.tasks("task_started"), ["other"]);

    // The reused result sits on this run's base: it keeps the new clusterfile, and its patch
    // against the base is the task's change alone.
    let status = s.status();
    let result = status["run"]["result"].as_str().unwrap().to_string();
    let run = status["run"]["id"].as_str().unwrap();
    let branch = format!("ccluster/{run}/{result}");
    let shown = git(s.path(), &["show", &format!("{branch}:clusterfile.toml")]);
    assert!(shown.contains("[tasks.other]"), "{shown}");
    let patch = s.command(&["export", "--patch", "-"]).output().unwrap();
    let patch = String::from_utf8_lossy(&patch.stdout);
    assert!(patch.contains("+edited"), "{patch}");
    assert!(!patch.contains("clusterfile"), "{patch}");
    assert_eq!(
        git(s.path(), &["merge-base", "--is-ancestor", "HEAD", &branch]),
        "",
        "the result descends from this run's base"
    );

    // Changing the task itself runs it again.
    s.write(&EDITING.replace("echo edited", "echo changed"));
    s.commit_all("change edit");
    let third = s.apply(&[]);
    assert_eq!(third.code, 0, "{}", third.stderr);
    let mut started = third.tasks("task_started");
    started.sort();
    assert_eq!(started, ["check", "edit[0]", "edit[1]", "join"]);
}

#[test]
fn retry_runs_what_failed_even_when_an_older_run_left_a_cached_result() {
    // Succeeds the first time, fails afterwards (a flaky test, say).
    let s = Sandbox::new(
        r#"version = 1
[tasks.flaky]
run = "echo ran >> runs.log; test ! -f failed-once && touch failed-once"
"#,
    );
    assert_eq!(s.apply(&[]).code, 0);
    let fresh = s.apply(&["--fresh"]);
    assert_eq!(fresh.code, 1, "the second run fails");
    let retried = s.command(&["retry", "--output", "json"]).output().unwrap();
    assert_eq!(
        retried.status.code(),
        Some(1),
        "the retried task fails again"
    );
    assert_eq!(
        s.read("runs.log"),
        "ran\nran\nran\n",
        "it ran, not taken from the cache"
    );
    assert_eq!(task(&s.status(), "flaky")["state"], "failed");
}

#[test]
fn an_undefined_attribute_fails_the_task_naming_it_through_filters_and_when() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.a]
run = "echo '{\"parts\": [\"x\", \"y\"]}'"
output = "json"
[tasks.joined]
needs = ["a"]
run = "echo {{ tasks.a.output.prts | join(',') }}"
[tasks.as_json]
needs = ["a"]
run = "echo {{ tasks.a.output.prts | tojson }}"
[tasks.guarded]
needs = ["a"]
when = "tasks.a.output.prts"
run = "echo deploy"
[tasks.tested]
needs = ["a"]
when = "tasks.a.output.prts is none"
run = "echo deploy"
[tasks.fine]
needs = ["a"]
when = "tasks.a.output.prts is defined or tasks.a.output.parts"
run = "echo {{ tasks.a.output.parts | join(',') }} {{ tasks.a.output.prts | default('none') }}"
"#,
    );
    let run = s.apply(&["-k"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let status = s.status();
    for node in ["joined", "as_json", "guarded", "tested"] {
        let t = task(&status, node);
        assert_eq!(t["state"], "failed", "{node}: {t}");
        let message = t["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("`tasks.a.output.prts` is undefined: `tasks.a.output` has `parts`"),
            "{node}: {message}"
        );
    }
    assert_eq!(task(&status, "fine")["state"], "succeeded");
    assert_eq!(task(&status, "fine")["output"], "x,y none");
}

#[test]
fn a_plan_time_when_that_names_nothing_is_an_error_not_false() {
    let s = Sandbox::new(
        r#"version = 1
[inputs.deploy]
type = "object"
default = { enabled = true }
[tasks.deploy]
when = "inputs.deploy.enabeld"
run = "echo deploy"
"#,
    );
    let out = s.command(&["validate"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`inputs.deploy.enabeld` is undefined: `inputs.deploy` has `enabled`"),
        "{stderr}"
    );
}

#[test]
fn a_templates_declared_outputs_are_checked_at_validate() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.docs]
use = "./lib/docs.toml"
[tasks.publish]
needs = ["docs"]
run = "echo {{ tasks.docs.output.summry }}"
"#,
    );
    s.file(
        "lib/docs.toml",
        "version = 1\n[tasks.write]\nrun = \"echo hi\"\n[outputs]\nsummary = \"{{ tasks.write.output }}\"\npages = \"3\"\n",
    )
    .unwrap();
    let out = s.command(&["validate"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("declares no output `summry`"), "{stderr}");
    assert!(
        stderr.contains("did you mean `tasks.docs.output.summary`?"),
        "{stderr}"
    );
    assert!(stderr.contains("clusterfile.toml:6:"), "{stderr}");
}

#[test]
fn a_dynamic_map_that_cannot_expand_fails_once_under_keep_going_with_its_reason() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.list]
run = "echo '{\"a\": 1}'"
output = "json"
[tasks.each]
needs = ["list"]
map = "{{ tasks.list.output }}"
run = "echo {{ item }}"
[tasks.after]
needs = ["each"]
run = "echo after"
[tasks.other]
run = "true"
"#,
    );
    let run = s.apply(&["-k"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let terminal = [
        "task_succeeded",
        "task_failed",
        "task_cancelled",
        "task_skipped",
        "task_cached",
    ];
    let mut ends: std::collections::BTreeMap<String, usize> = Default::default();
    for e in &run.events {
        if terminal.contains(&e["event"].as_str().unwrap_or_default()) {
            *ends
                .entry(e["task"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert!(
        ends.values().all(|&n| n == 1),
        "one terminal event per node: {ends:?}"
    );
    let status = s.status();
    let each = task(&status, "each[*]");
    assert_eq!(each["state"], "failed");
    assert!(
        each["message"]
            .as_str()
            .unwrap()
            .contains("gave map, not a list"),
        "{each}"
    );
    let finished = run.of("run_finished");
    assert_eq!(finished[0]["failed"], 1);
    let report = s.command(&["report"]).output().unwrap();
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(report.contains("gave map, not a list"), "{report}");
}

/// `apply --rehearse` with the pinned `claude` CLI.
fn rehearse(s: &Sandbox) -> crate::apply::Applied {
    crate::apply::Applied::from_output(
        s.command(&["apply", "--rehearse", "-o", "json", "--grace-period", "5s"])
            .env("CCLUSTER_CLAUDE_BIN", crate::support::claude_bin())
            .output()
            .unwrap(),
    )
}

#[test]
fn denials_and_the_cost_of_a_timed_out_attempt_are_counted_and_shown_alike() {
    let s = repo(
        r#"version = 1
[tasks.careful]
prompt = "clean up"
claude = { allowed_tools = ["Bash"], disallowed_tools = ["Bash(rm *)"] }
rehearsal = { turns = [{ tools = [{ name = "Bash", input = { command = "rm -rf build" } }] }, { text = "done" }] }
[tasks.slow]
prompt = "work"
timeout = "8s"
claude = { allowed_tools = ["Bash"] }
rehearsal = { usage = [100000, 50000], turns = [{ tools = [{ name = "Bash", input = { command = "echo one" } }] }, { text = "done" }], faults = [{ hang = true, turn = 1, times = 5 }] }
"#,
    );
    let run = rehearse(&s);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let status = s.status();
    let careful = task(&status, "careful");
    assert_eq!(careful["state"], "succeeded", "{careful}");
    assert_eq!(careful["denials"], 1, "{careful}");
    // The timed-out attempt had spent one turn: the CLI's own figure for it is kept.
    let slow = task(&status, "slow");
    assert_eq!(slow["class"], "timeout", "{slow}");
    let cost = slow["cost_usd"].as_f64().unwrap_or(0.0);
    assert!(cost > 1.0, "the first turn's cost counts: {slow}");
    assert!(slow["tokens"].as_u64().unwrap_or(0) >= 150_000, "{slow}");

    let human = s.command(&["status"]).output().unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.contains("1 tool call denied"), "{human}");
    let report = s.command(&["report"]).output().unwrap();
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(report.contains("1 tool call denied"), "{report}");
    // The same precision in both.
    let shown = format!("${cost:.4}");
    assert!(
        human.contains(&shown) && report.contains(&shown),
        "{shown}: {human}{report}"
    );
}
