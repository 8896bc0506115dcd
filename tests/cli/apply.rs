//! `ccluster apply` on real processes: retries, timeouts, Ctrl-C, skip rules, fan-out policies,
//! dynamic maps, the JSON event stream, the cache, the lock.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub use crate::support::{Applied, Sandbox};

fn wait_for(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn alive(pid: i32) -> bool {
    // A zombie is dead for our purposes; /proc/<pid>/stat says `Z`.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

#[test]
fn retries_with_backoff_until_success() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.flaky]
run = "n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; echo attempt $n; test $n -ge 3"
retry = { limit = 3, backoff = { initial = "100ms", factor = 2.0, jitter = 0.0 } }
"#,
    );
    let run = s.apply(&[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let retries = run.of("task_retrying");
    assert_eq!(retries.len(), 2);
    assert_eq!(retries[0]["delay_ms"], 100);
    assert_eq!(retries[1]["delay_ms"], 200);
    assert_eq!(retries[0]["class"], "exit_code");
    assert_eq!(run.of("task_succeeded")[0]["attempt"], 3);
    // Every attempt has its own record and log.
    let status = s.status();
    assert_eq!(status["tasks"][0]["attempts"], 3);
    let logs = std::fs::read_dir(s.path().join(".ccluster/runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("logs");
    for a in 1..=3 {
        let log = std::fs::read_to_string(logs.join(format!("flaky.{a}.out"))).unwrap();
        assert_eq!(log, format!("attempt {a}\n"));
    }
    let run_id = status["run"]["id"].as_str().unwrap();
    let printed = s.command(&["logs", run_id, "flaky"]).output().unwrap();
    let printed = String::from_utf8_lossy(&printed.stdout);
    assert!(
        printed.contains("==> flaky attempt 2 stdout <==\nattempt 2\n"),
        "{printed}"
    );
}

#[test]
fn retries_stop_at_the_limit() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.always]
run = "echo try >> tries; exit 7"
retry = { limit = 2, backoff = { initial = "10ms" } }
"#,
    );
    let run = s.apply(&[]);
    assert_eq!(run.code, 1);
    assert_eq!(s.read("tries").lines().count(), 3, "limit 2 = 3 attempts");
    let failed = run.of("task_failed");
    assert_eq!(
        (failed[0]["exit_code"].clone(), failed[0]["attempt"].clone()),
        (7.into(), 3.into())
    );
}

#[test]
fn classes_not_in_retry_on_are_not_retried() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.once]
run = "echo try >> tries; exit 1"
retry = { limit = 5, on = ["timeout"] }
"#,
    );
    let run = s.apply(&[]);
    assert_eq!(run.code, 1);
    assert_eq!(
        s.read("tries").lines().count(),
        1,
        "exit_code is not in `on`"
    );
    assert!(run.of("task_retrying").is_empty());
}

#[test]
fn a_failure_stops_the_run_and_cancels_pending_retries() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.flaky]
run = "echo try >> tries; exit 1"
retry = { limit = 5, backoff = { initial = "60s" } }
[tasks.broken]
run = "sleep 0.2; exit 2"
"#,
    );
    let start = Instant::now();
    let run = s.apply(&["--jobs", "2"]);
    // The retry waiting 60 s is cancelled when the run stops, not waited for.
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "the run waited for a cancelled retry"
    );
    assert_eq!(run.code, 1);
    assert_eq!(
        s.read("tries").lines().count(),
        1,
        "the pending retry is cancelled when the run stops"
    );
    assert_eq!(run.tasks("task_cancelled"), ["flaky"]);
}

#[test]
fn a_timeout_kills_the_whole_process_tree() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.slow]
run = "sleep 60 & echo $! > child.pid; sleep 60"
timeout = "500ms"
"#,
    );
    let start = Instant::now();
    let run = s.apply(&[]);
    assert_eq!(run.code, 1);
    assert!(
        start.elapsed() < Duration::from_secs(20),
        "took {:?}",
        start.elapsed()
    );
    let failed = run.of("task_failed");
    assert_eq!(failed[0]["class"], "timeout");
    let child: i32 = s.read("child.pid").trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !alive(child),
        "the background child {child} survived the timeout"
    );
}

#[test]
fn ctrl_c_stops_tasks_checkpoints_and_exits_130() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.quick]
run = "echo done"
[tasks.long]
run = "echo $$ > long.pid; test -f resume || sleep 60"
[tasks.after]
needs = ["long"]
run = "echo never > after.txt"
"#,
    );
    let child = s.spawn_apply(&["--jobs", "2"]);
    wait_for(&s.path().join("long.pid"), Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(200));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let long: i32 = s.read("long.pid").trim().parse().unwrap();
    assert!(!alive(long), "the task process survived Ctrl-C");
    assert!(!s.path().join("after.txt").exists());
    let status = s.status();
    assert_eq!(status["run"]["state"], "cancelled");
    // Resuming runs what did not finish, and only that.
    std::fs::write(s.path().join("resume"), "").unwrap();
    let again = s.apply(&[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.tasks("task_cached"), ["quick"]);
    let mut ran = again.tasks("task_started");
    ran.sort();
    assert_eq!(ran, ["after", "long"]);
}

#[test]
fn skipped_tasks_skip_their_dependents_but_not_collect_merges() {
    let s = Sandbox::new(
        r#"version = 1
[inputs.docs]
type = "bool"
default = false
[tasks.build]
run = "echo built"
[tasks.docs]
when = "{{ inputs.docs }}"
run = "echo docs"
[tasks.publish_docs]
needs = ["docs"]
run = "echo publish"
[tasks.each]
map = [1, 2, 3]
when = "{{ item != 2 }}"
run = "echo {{ item }}"
[tasks.gather]
needs = ["each"]
merge = { strategy = "collect" }
[tasks.show]
needs = ["gather"]
run = "echo '{{ tasks.gather.output | tojson }}'"
output = "json"
"#,
    );
    let run = s.apply(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let mut skipped = run.tasks("task_skipped");
    skipped.sort();
    assert_eq!(skipped, ["docs", "each[1]", "publish_docs"]);
    let status = s.status();
    let show = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "show")
        .unwrap();
    assert_eq!(show["output"], serde_json::json!(["1", "3"]));
}

#[test]
fn fail_fast_stops_a_fan_out_and_continue_tolerates_failures() {
    let fail_fast = Sandbox::new(
        r#"version = 1
[tasks.each]
map = [1, 2, 3, 4]
max_parallel = 1
run = "echo {{ item }} >> ran; test {{ item }} -ne 2"
"#,
    );
    let run = fail_fast.apply(&["--jobs", "4"]);
    assert_eq!(run.code, 1);
    assert_eq!(
        fail_fast.read("ran"),
        "1\n2\n",
        "instances after the failure must not start"
    );
    let mut cancelled = run.tasks("task_cancelled");
    cancelled.sort();
    assert_eq!(cancelled, ["each[2]", "each[3]"]);

    let tolerant = Sandbox::new(
        r#"version = 1
[tasks.each]
map = [1, 2, 3, 4]
on_item_failure = "continue"
min_success = 3
run = "test {{ item }} -ne 2"
[tasks.after]
needs = ["each"]
run = "echo ok"
"#,
    );
    let run = tolerant.apply(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.tasks("task_failed"), ["each[1]"]);
    assert!(run.tasks("task_succeeded").contains(&"after".to_string()));

    let short = Sandbox::new(
        r#"version = 1
[tasks.each]
map = [1, 2, 3]
on_item_failure = "continue"
run = "test {{ item }} -eq 1"
[tasks.after]
needs = ["each"]
run = "echo never"
"#,
    );
    let run = short.apply(&[]);
    assert_eq!(run.code, 1, "min_success defaults to all instances");
    assert_eq!(
        run.of("task_failed").len(),
        2,
        "continue runs every instance"
    );
    assert_eq!(run.tasks("task_cancelled"), ["after"]);
}

#[test]
fn starts_committed_ahead_are_given_back_when_a_fan_out_fails_fast() {
    // Tiny tasks get their starts committed ahead of a free slot. When the fan-out fails fast,
    // those never ran: they must end cancelled with no attempt, and nothing of theirs may run.
    let items: Vec<String> = (0..60).map(|i| i.to_string()).collect();
    let s = Sandbox::new(&format!(
        r#"version = 1
[tasks.each]
map = [{}]
run = "echo {{{{ item }}}} >> ran; test {{{{ item }}}} -ne 30"
"#,
        items.join(", ")
    ));
    let run = s.apply(&["--jobs", "1"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let ran: Vec<String> = s.read("ran").lines().map(String::from).collect();
    let expected: Vec<String> = (0..=30).map(|i| i.to_string()).collect();
    assert_eq!(ran, expected, "nothing after the failure may start");
    let status = s.status();
    for i in 0..60 {
        let t = crate::support::task(&status, &format!("each[{i}]"));
        let (state, attempts) = (
            t["state"].as_str().unwrap(),
            t["attempts"].as_u64().unwrap(),
        );
        if i <= 30 {
            assert_eq!(attempts, 1, "each[{i}]: {t}");
        } else {
            assert_eq!((state, attempts), ("cancelled", 0), "each[{i}]: {t}");
        }
    }
    assert_eq!(run.tasks("task_started").len(), 31);
}

#[test]
fn simple_commands_run_without_a_shell_exactly_as_the_shell_runs_them() {
    // A command of plain words runs its program directly (no `sh`); whatever it does must look the
    // same as through `sh -c`: environment, output, exit codes, signals, scripts without `#!`.
    let s = Sandbox::new("");
    let bin = s.path().join("bin");
    s.file("bin/plain", "echo \"plain script got $1 in $PWD\"\n")
        .unwrap();
    s.file("bin/killed", "#!/bin/sh\nkill -9 $$\n").unwrap();
    // Who started it: the one thing meant to differ.
    s.file("bin/parent", "#!/bin/sh\ncat /proc/$PPID/comm\n")
        .unwrap();
    for script in ["plain", "killed", "parent"] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join(script), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    s.write(&format!(
        r#"version = 1
[defaults]
retry = {{ limit = 0 }}
[tasks.env]
run = "env"
[tasks.pwd]
run = "printenv PWD"
[tasks.missing]
run = "no-such-program-anywhere x"
[tasks.plain]
run = "{bin}/plain arg"
[tasks.killed]
run = "{bin}/killed"
[tasks.status]
run = "ls no-such-file"
[tasks.args]
run = "/usr/bin/printf %s:%s: a=b  c"
[tasks.parent]
run = "{bin}/parent"
"#,
        bin = bin.display()
    ));
    let outcomes = |always_shell: &str| {
        let out = s
            .command(&["apply", "--keep-going", "--fresh", "--output", "json"])
            .env("CCLUSTER_ALWAYS_SHELL", always_shell)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status = s.status();
        let mut seen = Vec::new();
        for t in status["tasks"].as_array().unwrap() {
            let mut output = t["output"].as_str().unwrap_or("").to_string();
            if t["node"] == "env" {
                // The same variables, whatever their order; the run's id differs.
                let mut lines: Vec<&str> = output
                    .lines()
                    .filter(|l| !l.starts_with("CCLUSTER_RUN="))
                    .collect();
                lines.sort();
                output = lines.join("\n");
            }
            seen.push((
                t["node"].as_str().unwrap().to_string(),
                t["state"].clone(),
                t["exit_code"].clone(),
                t["class"].clone(),
                output,
            ));
        }
        seen
    };
    let (mut direct, mut shell) = (outcomes(""), outcomes("1"));
    let parent = |seen: &mut Vec<(String, Value, Value, Value, String)>| {
        let i = seen.iter().position(|t| t.0 == "parent").unwrap();
        seen.remove(i).4
    };
    assert_eq!(parent(&mut direct), "ccluster", "run without a shell");
    assert_eq!(parent(&mut shell), "sh", "run through `sh -c`");
    assert_eq!(direct, shell);
    let of = |node: &str| direct.iter().find(|t| t.0 == node).unwrap();
    let physical = std::fs::canonicalize(s.path()).unwrap();
    assert_eq!(of("pwd").4, physical.display().to_string());
    assert_eq!(of("missing").2, 127);
    assert_eq!(
        of("plain").4,
        format!("plain script got arg in {}", physical.display())
    );
    // As `sh` reports it: 128 + SIGKILL.
    assert_eq!(of("killed").2, 137);
    assert_eq!(of("status").2, 2);
    assert_eq!(of("args").4, "a=b:c:");
}

#[test]
fn a_dynamic_map_expands_from_an_upstream_output() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.list]
run = "echo 'files: ignored'; echo '[\"a.rs\", \"b.rs\", \"c.rs\"]'"
output = "json"
[tasks.each]
needs = ["list"]
map = "{{ tasks.list.output }}"
run = "echo {{ index }}:{{ item }}"
[tasks.join]
needs = ["each"]
run = "echo '{{ tasks.each.outputs | join(\",\") }}'"
"#,
    );
    let run = s.apply(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let expanded = run.of("map_expanded");
    assert_eq!(expanded.len(), 1);
    assert_eq!(expanded[0]["items"], 3);
    let status = s.status();
    let join = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "join")
        .unwrap();
    assert_eq!(join["output"], "0:a.rs,1:b.rs,2:c.rs");
}

#[test]
fn json_events_follow_the_documented_shape() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.a]
run = "echo a"
[tasks.b]
needs = ["a"]
run = "exit 1"
"#,
    );
    let run = s.apply(&[]);
    assert_eq!(run.code, 1);
    assert!(
        run.stdout.lines().all(|l| l.starts_with('{')),
        "only JSON lines on stdout:\n{}",
        run.stdout
    );
    assert_eq!(run.events.first().unwrap()["event"], "run_started");
    let last = run.events.last().unwrap();
    assert_eq!(last["event"], "run_finished");
    assert_eq!(last["state"], "failed");
    for e in &run.events {
        assert!(e["run"].is_string() && e["time_ms"].is_u64(), "{e}");
        let kind = e["event"].as_str().unwrap();
        assert!(
            [
                "run_started",
                "task_started",
                "task_retrying",
                "task_succeeded",
                "task_cached",
                "task_failed",
                "task_skipped",
                "task_cancelled",
                "map_expanded",
                "run_finished"
            ]
            .contains(&kind),
            "{kind}"
        );
        if kind.starts_with("task_") {
            assert!(e["task"].is_string(), "{e}");
        }
    }
}

#[test]
fn a_second_apply_is_up_to_date_and_an_edit_reruns_only_what_it_touches() {
    let file = |greeting: &str| {
        format!(
            r#"version = 1
[tasks.a]
run = "echo a >> ran"
[tasks.b]
run = "echo {greeting} >> ran"
[tasks.c]
needs = ["b"]
run = "echo c >> ran"
[tasks.d]
needs = ["a"]
run = "echo d >> ran"
"#
        )
    };
    let s = Sandbox::new(&file("hello"));
    assert_eq!(s.apply(&[]).code, 0);
    assert_eq!(s.read("ran").lines().count(), 4);

    let human = s.command(&["apply"]).output().unwrap();
    assert!(human.status.success());
    assert!(
        String::from_utf8_lossy(&human.stdout).contains("up to date"),
        "{}",
        String::from_utf8_lossy(&human.stdout)
    );
    assert_eq!(s.read("ran").lines().count(), 4, "nothing ran again");

    s.write(&file("bonjour"));
    let run = s.apply(&[]);
    let mut ran = run.tasks("task_started");
    ran.sort();
    assert_eq!(
        ran,
        ["b", "c"],
        "only the edited task and its dependents run"
    );

    let fresh = s.apply(&["--fresh"]);
    assert_eq!(fresh.tasks("task_started").len(), 4);
}

#[test]
fn changing_scheduling_settings_keeps_the_cache() {
    let s = Sandbox::new("version = 1\n[tasks.a]\nrun = \"echo a\"\n");
    assert_eq!(s.apply(&[]).code, 0);
    s.write("version = 1\n[tasks.a]\nrun = \"echo a\"\ntimeout = \"5m\"\nretry = { limit = 3 }\ndescription = \"now documented\"\n");
    let run = s.apply(&["--jobs", "1"]);
    assert_eq!(run.tasks("task_cached"), ["a"]);
}

#[test]
fn a_second_apply_on_the_same_state_is_refused_while_one_runs() {
    let s = Sandbox::new("version = 1\n[tasks.wait]\nrun = \"touch started; sleep 3\"\n");
    let first = s.spawn_apply(&[]);
    wait_for(&s.path().join("started"), Duration::from_secs(20));
    let second = s.apply(&[]);
    assert_eq!(second.code, 2);
    assert!(
        second.stderr.contains("another ccluster process"),
        "{}",
        second.stderr
    );
    // `status` from another terminal shows the live run (its snapshot lags at most 0.5 s).
    std::thread::sleep(Duration::from_millis(700));
    let live = s.status();
    assert_eq!(live["live"], true);
    assert_eq!(live["run"]["state"], "running");
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn cancel_from_another_terminal() {
    let s = Sandbox::new("version = 1\n[tasks.wait]\nrun = \"touch started; sleep 60\"\n");
    let first = s.spawn_apply(&[]);
    wait_for(&s.path().join("started"), Duration::from_secs(20));
    let cancel = s.command(&["cancel"]).output().unwrap();
    assert!(
        cancel.status.success(),
        "{}",
        String::from_utf8_lossy(&cancel.stderr)
    );
    let out = first.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
}

#[test]
fn workers_get_a_clean_environment() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.env]
run = "env | sort > env.txt"
env = { DECLARED = "yes" }
"#,
    );
    let out = s
        .command(&["apply"])
        .env("ANTHROPIC_API_KEY", "sk-secret")
        .env("SOME_TOKEN", "t0k3n")
        .output()
        .unwrap();
    assert!(out.status.success());
    let env = s.read("env.txt");
    assert!(env.contains("DECLARED=yes"));
    assert!(env.contains("CCLUSTER_TASK=env"));
    assert!(
        !env.contains("sk-secret") && !env.contains("t0k3n"),
        "{env}"
    );
}

#[test]
fn plan_explain_predicts_what_apply_runs_and_why() {
    let file = |greeting: &str| {
        format!(
            r#"version = 1
[tasks.a]
run = "echo a"
[tasks.b]
run = "echo {greeting}"
[tasks.list]
run = "echo '[1, 2]'"
output = "json"
[tasks.each]
needs = ["list", "b"]
map = "{{{{ tasks.list.output }}}}"
run = "echo {{{{ item }}}} {{{{ tasks.b.output }}}}"
[tasks.d]
needs = ["a"]
run = "echo d"
"#
        )
    };
    let s = Sandbox::new(&file("hello"));
    let explain = |s: &Sandbox| -> Vec<Value> {
        let out = s
            .command(&["plan", "--explain", "--format", "json"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["explain"].as_array().unwrap().clone()
    };
    let before = explain(&s);
    assert!(before.iter().all(|e| e["verdict"] == "run"), "{before:?}");
    assert!(
        !s.path().join(".ccluster").exists(),
        "explaining creates no state"
    );
    assert_eq!(s.apply(&[]).code, 0);

    s.write(&file("bonjour"));
    let predicted = explain(&s);
    let verdict = |task: &str| {
        predicted
            .iter()
            .find(|e| e["task"] == task)
            .unwrap_or_else(|| panic!("{task} in {predicted:?}"))
            .clone()
    };
    assert_eq!(verdict("a")["verdict"], "satisfied");
    assert_eq!(verdict("b")["verdict"], "run");
    assert_eq!(verdict("b")["changed"], serde_json::json!(["command"]));
    assert_eq!(verdict("list")["verdict"], "satisfied");
    assert_eq!(verdict("each[*]")["verdict"], "run");
    assert_eq!(verdict("d")["verdict"], "satisfied");

    let run = s.apply(&[]);
    let mut ran = run.tasks("task_started");
    ran.sort();
    assert_eq!(ran, ["b", "each[0]", "each[1]"]);
    let mut cached = run.tasks("task_cached");
    cached.sort();
    assert_eq!(cached, ["a", "d", "list"]);

    // Nothing changed: the prediction is "all satisfied", including the expanded instances.
    let after = explain(&s);
    assert!(
        after.iter().all(|e| e["verdict"] == "satisfied"),
        "{after:?}"
    );
    assert!(after.iter().any(|e| e["task"] == "each[1]"));
}

#[test]
fn retry_reruns_what_failed_with_the_runs_own_text_and_inputs() {
    let s = Sandbox::new(
        r#"version = 1
[inputs.who]
default = "world"
[tasks.ok]
run = "echo {{ inputs.who }} >> ok.log"
[tasks.shaky]
needs = ["ok"]
run = "echo {{ inputs.who }} >> shaky.log; test -f fixed"
"#,
    );
    let first = s
        .command(&["apply", "--output", "json", "--var", "who=ada"])
        .output()
        .unwrap();
    assert_eq!(first.status.code(), Some(1));
    // The file changes afterwards; `retry` must still run the run's own text and inputs.
    s.write("version = 1\n[tasks.other]\nrun = \"echo changed >> other.log\"\n");
    std::fs::write(s.path().join("fixed"), "").unwrap();
    let retried = s.command(&["retry", "--output", "json"]).output().unwrap();
    assert_eq!(
        retried.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
    assert_eq!(s.read("ok.log"), "ada\n", "what succeeded is not run again");
    assert_eq!(
        s.read("shaky.log"),
        "ada\nada\n",
        "the failed task ran again, with the same input"
    );
    assert!(!s.path().join("other.log").exists());

    let forced = s
        .command(&["retry", "--task", "ok", "--output", "json"])
        .output()
        .unwrap();
    assert_eq!(forced.status.code(), Some(0));
    assert_eq!(
        s.read("ok.log"),
        "ada\nada\n",
        "--task runs a succeeded task again"
    );
}

#[test]
fn a_second_ctrl_c_kills_at_once() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.stubborn]
run = "trap '' TERM; echo $$ > pid; while true; do sleep 0.1; done"
"#,
    );
    let mut cmd = s.command(&["apply", "--output", "json", "--grace-period", "60s"]);
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(&s.path().join("pid"), Duration::from_secs(20));
    let apply = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(apply, nix::sys::signal::Signal::SIGINT).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    nix::sys::signal::kill(apply, nix::sys::signal::Signal::SIGINT).unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the second Ctrl-C did not kill at once ({:?})",
        started.elapsed()
    );
    let pid: i32 = s.read("pid").trim().parse().unwrap();
    assert!(!alive(pid), "the task ignoring SIGTERM survived");
}

#[test]
fn logs_follow_prints_until_the_run_ends() {
    let s = Sandbox::new(
        "version = 1\n[tasks.talk]\nrun = \"for i in 1 2 3; do echo line $i; sleep 0.3; done\"\n",
    );
    let child = s.spawn_apply(&[]);
    let runs = s.path().join(".ccluster/runs");
    let start = Instant::now();
    let run = loop {
        if let Some(entry) = std::fs::read_dir(&runs).ok().and_then(|mut d| d.next()) {
            break entry.unwrap().file_name().to_string_lossy().into_owned();
        }
        assert!(start.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    };
    // The live view lags up to 0.5 s behind; `logs` needs the task to be listed.
    std::thread::sleep(Duration::from_millis(600));
    let followed = s.command(&["logs", &run, "talk", "-f"]).output().unwrap();
    let text = String::from_utf8_lossy(&followed.stdout);
    assert!(text.contains("line 1\nline 2\nline 3\n"), "{text}");
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(0));
}

#[test]
fn two_tasks_with_the_same_command_both_run() {
    let s = Sandbox::new("version = 1\n[tasks.a]\nrun = \"echo x >> log\"\n[tasks.b]\nneeds = [\"a\"]\nrun = \"echo x >> log\"\n");
    let run = s.apply(&[]);
    assert_eq!(run.code, 0);
    assert_eq!(
        s.read("log"),
        "x\nx\n",
        "a task never takes another task's result"
    );
}

#[test]
fn cancel_without_a_run_changes_nothing() {
    let s = Sandbox::new("version = 1\n[tasks.a]\nrun = \"true\"\n");
    let out = s.command(&["cancel"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no run is in progress"));
    assert!(!s.path().join(".ccluster").exists(), "cancel created state");
}

#[test]
fn logs_of_a_cached_task_are_those_of_the_run_it_came_from() {
    let s = Sandbox::new("version = 1\n[tasks.hello]\nrun = \"echo hello from the first run\"\n");
    assert_eq!(s.apply(&[]).code, 0);
    let again = s.apply(&[]);
    assert_eq!(again.tasks("task_cached"), ["hello"]);
    let run = again.events[0]["run"].as_str().unwrap().to_string();
    let out = s.command(&["logs", &run, "hello"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("(cached from run ") && text.contains("hello from the first run"),
        "{text}"
    );
}

#[test]
fn secret_inputs_never_reach_the_state_and_are_masked_in_plans() {
    let s = Sandbox::new(
        r#"version = 1
[inputs.token]
secret = true
[tasks.use]
run = "printf %s '{{ inputs.token }}' | wc -c"
[tasks.fail_once]
needs = ["use"]
run = "test -f fixed"
"#,
    );
    let plan = s
        .command(&["plan", "--var", "token=hunter2-s3cr3t"])
        .output()
        .unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.contains("printf %s '***' | wc -c") && !plan.contains("hunter2"),
        "{plan}"
    );

    let run = s
        .command(&["apply", "--output", "json", "--var", "token=hunter2-s3cr3t"])
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    // Nothing under the state directory holds the secret: database, logs, live view.
    let found = Command::new("grep")
        .args(["-r", "-l", "hunter2", ".ccluster"])
        .current_dir(s.path())
        .output()
        .unwrap();
    assert!(
        found.stdout.is_empty(),
        "the secret is in {}",
        String::from_utf8_lossy(&found.stdout)
    );
    let status = s.status();
    assert_eq!(status["run"]["inputs"]["token"], "***");

    std::fs::write(s.path().join("fixed"), "").unwrap();
    let refused = s.command(&["retry"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("input `token` is secret"));
    let retried = s
        .command(&["retry", "--var", "token=hunter2-s3cr3t", "--output", "json"])
        .output()
        .unwrap();
    assert_eq!(
        retried.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&retried.stderr)
    );
}

#[test]
fn commands_that_print_end_quietly_on_a_closed_pipe() {
    // `ccluster doctor | head -1`: the reader goes away; ccluster must not panic.
    for args in [&["doctor"][..], &["templates"][..]] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ccluster"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn a_runners_max_parallel_holds_its_tasks_back_and_no_one_elses() {
    // Three slow instances on a runner that takes one at a time, and three beside them on
    // `local`, with room for all six under --jobs.
    let s = Sandbox::new(
        r#"version = 1
[runners.one_at_a_time]
kind = "local"
max_parallel = 1

[tasks.narrow]
runner = "one_at_a_time"
map = [1, 2, 3]
run = "sleep 0.4; echo {{ item }}"

[tasks.wide]
map = [1, 2, 3]
run = "sleep 0.4; echo wide {{ item }}"
"#,
    );
    let run = s.apply(&["-j", "6"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let spans = |prefix: &str| {
        let mut spans: Vec<(u64, u64)> = run
            .of("task_started")
            .iter()
            .filter(|e| e["task"].as_str().unwrap().starts_with(prefix))
            .map(|e| {
                let task = e["task"].as_str().unwrap();
                let end = run
                    .of("task_succeeded")
                    .iter()
                    .find(|f| f["task"] == task)
                    .unwrap()["time_ms"]
                    .as_u64()
                    .unwrap();
                (e["time_ms"].as_u64().unwrap(), end)
            })
            .collect();
        spans.sort();
        spans
    };
    let narrow = spans("narrow[");
    assert_eq!(narrow.len(), 3);
    for pair in narrow.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "overlap on the runner: {narrow:?}");
    }
    // `local`'s tasks were not held back: they ran together.
    let wide = spans("wide[");
    let last_start = wide.iter().map(|w| w.0).max().unwrap();
    let first_end = wide.iter().map(|w| w.1).min().unwrap();
    assert!(last_start < first_end, "{wide:?}");
}
