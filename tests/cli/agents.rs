//! Agent tasks end to end: the real `claude` CLI (installed by `scripts/ensure-claude.sh` when
//! missing) against ccluster's scripted model server (`apply --rehearse`), in real git worktrees.
//! Each failure class is provoked through the server's faults and checked against the retry policy.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::apply::{Applied, Sandbox};
use crate::support::{claude_bin, git, task};

/// A sandbox that is a git repository on `main` with its clusterfile committed.
pub(crate) fn repo(clusterfile: &str) -> Sandbox {
    Sandbox::in_repo(clusterfile, &[])
}

/// `apply --rehearse --output json` with the pinned CLI.
pub(crate) fn rehearse(s: &Sandbox, extra: &[&str]) -> Applied {
    let mut args = vec![
        "apply",
        "--rehearse",
        "--output",
        "json",
        "--grace-period",
        "1s",
    ];
    args.extend_from_slice(extra);
    Applied::from_output(
        s.command(&args)
            .env("CCLUSTER_CLAUDE_BIN", claude_bin())
            .output()
            .unwrap(),
    )
}

const PIPELINE: &str = r#"version = 1
[workflow]
name = "agents"

[defaults]
timeout = "2m"

[tasks.plan]
prompt = "Split the work into parts"
output_schema = { type = "object", required = ["parts"], properties = { parts = { type = "array", items = { type = "object", required = ["name"], properties = { name = { type = "string" } } } } } }
rehearsal = { output = { parts = [{ name = "alpha" }, { name = "beta" }, { name = "gamma" }] } }

[tasks.build]
needs = ["plan"]
map = "{{ tasks.plan.output.parts }}"
prompt = "Build part {{ item.name }}"

[tasks.merge]
needs = ["build"]
merge = { strategy = "git" }

[tasks.check]
needs = ["merge"]
run = "cat parts/alpha.txt parts/beta.txt parts/gamma.txt"
"#;

/// Each builder writes its part, then edits it, then says it is done.
fn build_script() -> String {
    let mut script = String::new();
    for (i, name) in ["alpha", "beta", "gamma"].iter().enumerate() {
        script.push_str(&format!(
            r#"[tasks."build[{i}]"]
turns = [
  {{ tools = [{{ name = "Write", input = {{ file_path = "{{{{cwd}}}}/parts/{name}.txt", content = "{name} draft\n" }} }}] }},
  {{ tools = [{{ name = "Edit", input = {{ file_path = "{{{{cwd}}}}/parts/{name}.txt", old_string = "draft", new_string = "done" }} }}] }},
  {{ text = "built {name}" }},
]
"#
        ));
    }
    script
}

#[test]
fn a_planned_fan_out_of_agents_in_worktrees_merges_and_is_checked() {
    let s = repo(PIPELINE);
    std::fs::write(s.path().join("script.toml"), build_script()).unwrap();
    let done = rehearse(&s, &["--script", "script.toml", "--jobs", "3"]);
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    assert!(
        done.stderr.contains("authenticate with none: rehearsal"),
        "{}",
        done.stderr
    );
    assert_eq!(done.of("map_expanded")[0]["items"], 3);
    // Progress came through as the agents worked.
    let tools: Vec<&str> = done
        .of("task_progress")
        .iter()
        .filter(|e| e["kind"] == "tool")
        .filter_map(|e| e["detail"].as_str())
        .collect();
    assert!(tools.contains(&"Edit parts/beta.txt"), "{tools:?}");
    let status = s.status();
    assert_eq!(
        task(&status, "check")["output"],
        "alpha done\nbeta done\ngamma done"
    );
    assert_eq!(task(&status, "build[1]")["output"], "built beta");
    assert_eq!(task(&status, "plan")["output"]["parts"][2]["name"], "gamma");
    // Usage and cost are recorded per task and shown by `status`.
    for node in ["plan", "build[0]", "build[1]", "build[2]"] {
        let t = task(&status, node);
        assert!(t["cost_usd"].as_f64().unwrap() > 0.0, "{t}");
        assert!(t["tokens"].as_u64().unwrap() > 0, "{t}");
    }
    let table = s.command(&["status"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("COST") && table.contains("agents: $"),
        "{table}"
    );

    // Each worker had its own config dir, holding its own session's transcript and no other.
    let run = status["run"]["id"].as_str().unwrap().to_string();
    let run_dir = s.path().join(".ccluster/runs").join(&run);
    let mut sessions = Vec::new();
    for node in ["plan.1", "build.0.1", "build.1.1", "build.2.1"] {
        let log =
            std::fs::read_to_string(run_dir.join("logs").join(format!("{node}.out"))).unwrap();
        let first: Value = serde_json::from_str(log.lines().next().unwrap()).unwrap();
        let session = first["session_id"].as_str().unwrap().to_string();
        let config = run_dir.join("workers").join(node).join("config");
        assert!(
            first["memory_paths"]["auto"]
                .as_str()
                .is_some_and(|p| p.starts_with(config.to_str().unwrap())),
            "{first}"
        );
        let transcripts: Vec<String> = walk(&config.join("projects"))
            .into_iter()
            .filter(|p| p.ends_with(".jsonl"))
            .collect();
        assert_eq!(transcripts.len(), 1, "{node}: {transcripts:?}");
        assert!(transcripts[0].ends_with(&format!("{session}.jsonl")));
        sessions.push(session);
    }
    sessions.sort();
    sessions.dedup();
    assert_eq!(sessions.len(), 4, "every attempt has its own session");

    // Nothing changed since: a second rehearsal runs nothing.
    let again = rehearse(&s, &["--script", "script.toml"]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.tasks("task_started").is_empty());
    let branch = format!("ccluster/{run}/merge");
    assert_eq!(
        git(s.path(), &["show", &format!("{branch}:parts/gamma.txt")]),
        "gamma done\n"
    );
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        } else {
            out.push(e.path().display().to_string());
        }
    }
    out
}

/// One task per failure class. The CLI's own retries are off (`CLAUDE_CODE_MAX_RETRIES = 0`) so
/// each fault reaches ccluster's retry policy.
const FAULTS: &str = r#"version = 1
[workflow]
name = "faults"

[defaults]
timeout = "1m"
env = { CLAUDE_CODE_MAX_RETRIES = "0", API_TIMEOUT_MS = "2000" }
retry = { limit = 1, backoff = { initial = "100ms", max = "100ms", jitter = 0.0 } }

[tasks.rate_limited]
prompt = "a"
rehearsal = { faults = [{ status = 429 }] }

[tasks.overloaded]
prompt = "b"
rehearsal = { faults = [{ status = 529 }] }

[tasks.server_error]
prompt = "c"
rehearsal = { faults = [{ status = 500 }] }

[tasks.hanging]
prompt = "d"
rehearsal = { faults = [{ hang = true }] }

[tasks.truncated]
prompt = "e"
rehearsal = { faults = [{ truncate = true, times = 2 }] }

[tasks.unauthorized]
prompt = "f"
rehearsal = { faults = [{ status = 401, times = 5 }] }

[tasks.too_many_turns]
prompt = "g"
claude = { max_turns = 1 }
retry = { limit = 0 }
rehearsal = { turns = [{ tools = [{ name = "Read", input = { file_path = "{{cwd}}/.gitignore" } }] }, { tools = [{ name = "Read", input = { file_path = "{{cwd}}/.gitignore" } }] }] }

[tasks.over_budget]
prompt = "h"
claude = { max_budget_usd = 0.5 }
rehearsal = { usage = [100, 100000], turns = [{ tools = [{ name = "Read", input = { file_path = "{{cwd}}/.gitignore" } }] }, { text = "done" }] }

[tasks.no_structured_output]
prompt = "i"
output_schema = { type = "object", required = ["n"], properties = { n = { type = "integer" } } }
retry = { limit = 0 }
rehearsal = { turns = [{ text = "I will not call the tool" }] }

[tasks.too_slow]
prompt = "j"
timeout = "4s"
env = { CLAUDE_CODE_MAX_RETRIES = "0", API_TIMEOUT_MS = "60000" }
retry = { limit = 0 }
rehearsal = { faults = [{ hang = true, times = 9 }] }
"#;

#[test]
fn each_failure_class_is_classified_and_retried_as_documented() {
    let s = repo(FAULTS);
    let done = rehearse(&s, &["--jobs", "4", "--keep-going"]);
    assert_eq!(done.code, 1, "{}\n{}", done.stdout, done.stderr);
    let class_of = |event: &str, task: &str| -> Option<String> {
        done.of(event)
            .iter()
            .find(|e| e["task"] == task)
            .and_then(|e| e["class"].as_str().map(str::to_string))
    };
    // Retried once, then fine.
    for (task, class) in [
        ("rate_limited", "rate_limit"),
        ("overloaded", "overloaded"),
        ("server_error", "api_error"),
        ("hanging", "api_error"),
        ("truncated", "api_error"),
    ] {
        assert_eq!(
            class_of("task_retrying", task).as_deref(),
            Some(class),
            "{task}: {}",
            done.stdout
        );
        assert!(
            done.tasks("task_succeeded").contains(&task.to_string()),
            "{task}"
        );
    }
    // Never retried, or not allowed to be.
    for (task, class) in [
        ("unauthorized", "auth"),
        ("too_many_turns", "max_turns"),
        ("over_budget", "budget"),
        ("no_structured_output", "structured_output"),
        ("too_slow", "timeout"),
    ] {
        assert_eq!(
            class_of("task_failed", task).as_deref(),
            Some(class),
            "{task}: {}",
            done.stdout
        );
        assert_eq!(class_of("task_retrying", task), None, "{task} was retried");
    }
}

/// Finds a running process whose environment has all of `marks`.
fn find_process(marks: &[String]) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        let vars: Vec<&[u8]> = env.split(|b| *b == 0).collect();
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let is_claude = String::from_utf8_lossy(&cmdline).contains("claude");
        if is_claude && marks.iter().all(|m| vars.contains(&m.as_bytes())) {
            return Some(pid);
        }
    }
    None
}

/// Starts `apply --rehearse` and SIGKILLs the `victim` task's first worker once it has written
/// `started.txt` and waits inside its second turn (the script hangs there); returns the apply.
fn apply_and_kill_the_first_worker(s: &Sandbox) -> std::process::Child {
    let child = s
        .command(&["apply", "--rehearse", "--output", "json"])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let marks = [
        "CCLUSTER_TASK=victim".to_string(),
        "CCLUSTER_ATTEMPT=1".to_string(),
    ];
    let start = Instant::now();
    let worktrees = s.path().join(".ccluster/worktrees");
    let pid = loop {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the worker never got going"
        );
        let started = walk(&worktrees).iter().any(|p| p.ends_with("started.txt"));
        if let (true, Some(pid)) = (started, find_process(&marks)) {
            break pid;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(300));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child
}

/// A command that finds no Claude credentials: none in the environment, none in its HOME.
fn without_credentials(cmd: &mut Command, home: &Path) {
    cmd.env("HOME", home).env_remove("CLAUDE_CONFIG_DIR");
    for var in [
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "CLAUDE_CODE_OAUTH_TOKEN",
        "CLAUDE_CODE_USE_BEDROCK",
        "CLAUDE_CODE_USE_VERTEX",
    ] {
        cmd.env_remove(var);
    }
}

#[test]
fn a_worker_killed_mid_run_is_retried() {
    let s = repo(
        r#"version = 1
[tasks.victim]
prompt = "work slowly"
retry = { limit = 1, backoff = { initial = "100ms", jitter = 0.0 } }
rehearsal = { faults = [{ hang = true, turn = 1 }], turns = [{ tools = [{ name = "Write", input = { file_path = "{{cwd}}/started.txt", content = "x" } }] }, { text = "finished" }] }
"#,
    );
    let child = apply_and_kill_the_first_worker(&s);
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let events: Vec<Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let retrying = events
        .iter()
        .find(|e| e["event"] == "task_retrying")
        .expect("a retry");
    assert_eq!(retrying["class"], "killed", "{stdout}");
    let status = s.status();
    assert_eq!(task(&status, "victim")["attempts"], 2);
    assert_eq!(task(&status, "victim")["output"], "finished");
}

#[test]
fn a_missing_cli_or_missing_credentials_stop_the_run_before_it_starts() {
    let s = repo("version = 1\n[tasks.a]\nprompt = \"hi\"\n");
    let out = s
        .command(&["apply"])
        .env("CCLUSTER_CLAUDE_BIN", "/nonexistent/claude")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("CCLUSTER_CLAUDE_BIN is `/nonexistent/claude`"),
        "{stderr}"
    );

    let home = tempfile::tempdir().unwrap();
    let mut cmd = s.command(&["apply"]);
    cmd.env("CCLUSTER_CLAUDE_BIN", claude_bin());
    without_credentials(&mut cmd, home.path());
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("agent tasks need Claude credentials"),
        "{stderr}"
    );
    assert!(
        !s.path().join(".ccluster/worktrees").exists(),
        "nothing ran"
    );
}

#[test]
fn the_run_budget_stops_agent_work_once_spent() {
    // Each response reports 100,000 output tokens: about $2 at the default model's price.
    let s = repo(
        r#"version = 1
[defaults]
max_run_usd = 1.0

[tasks.first]
prompt = "spend"
rehearsal = { usage = [100, 100000] }

[tasks.second]
needs = ["first"]
prompt = "never"
"#,
    );
    let done = rehearse(&s, &[]);
    assert_eq!(done.code, 1, "{}", done.stdout);
    assert_eq!(done.tasks("task_succeeded"), ["first"]);
    let cancelled = done.of("task_cancelled");
    assert_eq!(cancelled[0]["task"], "second");
    assert!(
        cancelled[0]["reason"]
            .as_str()
            .unwrap()
            .contains("agent budget is spent"),
        "{}",
        done.stdout
    );
}

#[test]
fn resume_session_continues_the_killed_conversation_in_its_worktree() {
    let s = repo(
        r#"version = 1
[tasks.victim]
prompt = "work slowly"
retry = { limit = 1, resume_session = true, backoff = { initial = "100ms", jitter = 0.0 } }
rehearsal = { faults = [{ hang = true, turn = 1 }], turns = [{ tools = [{ name = "Write", input = { file_path = "{{cwd}}/started.txt", content = "x" } }] }] }
"#,
    );
    let child = apply_and_kill_the_first_worker(&s);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Both attempts spoke in one session: the second resumed the first's conversation.
    let status = s.status();
    let run = status["run"]["id"].as_str().unwrap();
    let requests = std::fs::read_to_string(
        s.path()
            .join(".ccluster/runs")
            .join(run)
            .join("rehearsal.jsonl"),
    )
    .unwrap();
    let sessions: std::collections::BTreeSet<String> = requests
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["session"].to_string())
        .collect();
    assert_eq!(sessions.len(), 1, "{requests}");
    // The work of the first attempt is in the result: it went on in the same worktree.
    let files = git(
        s.path(),
        &[
            "ls-tree",
            "-r",
            "--name-only",
            &format!("refs/ccluster/runs/{run}/victim"),
        ],
    );
    assert!(files.contains("started.txt"), "{files}");
    assert_eq!(task(&status, "victim")["attempts"], 2);
}

#[test]
fn api_retries_and_denied_tools_are_reported_as_progress() {
    // The CLI retries the 429 itself (once allowed: a 429 that does not say when to come back
    // passes the run's model gateway); the agent then tries to write outside its worktree, which
    // `acceptEdits` denies.
    let s = repo(
        r#"version = 1
[tasks.busy]
prompt = "go"
env = { CLAUDE_CODE_MAX_RETRIES = "1" }
rehearsal = { faults = [{ status = 429 }], turns = [{ tools = [{ name = "Write", input = { file_path = "/tmp/ccluster-outside-the-tree.txt", content = "x" } }] }, { text = "gave up" }] }
"#,
    );
    let done = rehearse(&s, &[]);
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    let kinds: Vec<String> = done
        .of("task_progress")
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["kind"].as_str().unwrap(),
                e["detail"].as_str().unwrap()
            )
        })
        .collect();
    assert!(
        kinds
            .iter()
            .any(|k| k.starts_with("api_retry #1 after 429")),
        "{kinds:?}"
    );
    assert!(
        kinds.iter().any(|k| k.starts_with("denied Write")),
        "{kinds:?}"
    );
    assert!(!Path::new("/tmp/ccluster-outside-the-tree.txt").exists());
}

#[test]
fn without_rehearsal_workers_use_the_users_credentials_which_never_reach_the_state() {
    // A scripted server stands in for the API, reached the way a user's proxy would be:
    // through ANTHROPIC_BASE_URL, with an API key that must not leak into run state.
    let s = repo("version = 1\n[tasks.real]\nprompt = \"hello\"\n");
    let key = "sk-ant-test-0123456789-must-not-leak";
    let mut server = Command::new(env!("CARGO_BIN_EXE_ccluster"))
        .arg("model-server")
        .env("CCLUSTER_MODEL_SERVER_TOKEN", key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let url = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(server.stderr.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        line.trim().to_string()
    };
    let out = s
        .command(&["apply", "--output", "json"])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .env("ANTHROPIC_BASE_URL", &url)
        .env("ANTHROPIC_API_KEY", key)
        .output()
        .unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("agents authenticate with an API key (ANTHROPIC_API_KEY)"),
        "{stderr}"
    );
    assert!(!stderr.contains(key) && !String::from_utf8_lossy(&out.stdout).contains(key));
    let status = s.status();
    assert_eq!(task(&status, "real")["output"], "Rehearsal of ``: done.");
    for file in walk(&s.path().join(".ccluster")) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "the API key reached {file}"
        );
    }
}

#[test]
fn an_agent_resolves_merge_conflicts_and_its_cost_is_the_merges() {
    // Two agents write the same file; the merge hands the conflict to a resolving agent, scripted
    // to write the resolution (the merge task's script is the resolver's).
    let s = repo(
        r#"version = 1
[tasks.edit]
map = ["one", "two"]
prompt = "write {{ item }}"

[tasks.join]
needs = ["edit"]
merge = { strategy = "git", on_conflict = "agent" }
"#,
    );
    std::fs::write(
        s.path().join("script.toml"),
        r#"[tasks."edit[0]"]
turns = [{ tools = [{ name = "Write", input = { file_path = "{{cwd}}/shared.txt", content = "one\n" } }] }, { text = "wrote one" }]
[tasks."edit[1]"]
turns = [{ tools = [{ name = "Write", input = { file_path = "{{cwd}}/shared.txt", content = "two\n" } }] }, { text = "wrote two" }]
[tasks.join]
turns = [{ tools = [{ name = "Write", input = { file_path = "{{cwd}}/shared.txt", content = "one\ntwo\n" } }] }, { text = "resolved" }]
"#,
    )
    .unwrap();
    let done = rehearse(&s, &["--script", "script.toml"]);
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    let status = s.status();
    let join = task(&status, "join");
    assert!(join["cost_usd"].as_f64().unwrap() > 0.0, "{join}");
    let run = status["run"]["id"].as_str().unwrap();
    assert_eq!(
        git(
            s.path(),
            &["show", &format!("ccluster/{run}/join:shared.txt")]
        ),
        "one\ntwo\n"
    );
    let report = s.command(&["report", "--format", "json"]).output().unwrap();
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    let join = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "join")
        .unwrap();
    assert!(join["conflicts"][0]["resolved_by"]
        .as_str()
        .unwrap()
        .contains("claude"));
}

#[test]
fn doctor_reports_the_cli_credentials_and_git_without_secrets() {
    let s = repo("version = 1\n[tasks.a]\nrun = \"true\"\n");
    let key = "sk-ant-doctor-secret-42";
    let ok = s
        .command(&["doctor"])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .env("ANTHROPIC_API_KEY", key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(ok.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("ok   claude       2.1.331"), "{stdout}");
    assert!(
        stdout.contains("ok   credentials  an API key (ANTHROPIC_API_KEY)"),
        "{stdout}"
    );
    assert!(stdout.contains("ok   git"), "{stdout}");
    assert!(stdout.contains("ok   repository"), "{stdout}");
    assert!(!stdout.contains(key));

    let home = tempfile::tempdir().unwrap();
    let mut cmd = s.command(&["doctor"]);
    cmd.env("CCLUSTER_CLAUDE_BIN", "/nonexistent/claude");
    without_credentials(&mut cmd, home.path());
    let missing = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&missing.stdout);
    assert_eq!(missing.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("MISS claude"), "{stdout}");
    assert!(stdout.contains("MISS credentials"), "{stdout}");

    // A `claude login` session is found in the user's config dir (and only named).
    std::fs::create_dir_all(home.path().join(".claude")).unwrap();
    std::fs::write(
        home.path().join(".claude/.credentials.json"),
        "{\"token\": \"x\"}",
    )
    .unwrap();
    let login = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&login.stdout);
    assert!(
        stdout.contains("ok   credentials  the `claude login` session in"),
        "{stdout}"
    );
}
