//! One consistent command line: `--output json` on every command that prints data (old spellings
//! kept), `RUN` arguments (`latest`, unique prefixes, ambiguous ones refused), `clusterfile.kdl`
//! found without a name, state directories pointed at when there is none here.

use serde_json::Value;

use crate::apply::{Applied, Sandbox};
use crate::support::{claude_bin, git};

const TWO_TASKS: &str = r#"version = 1
[tasks.a]
run = "echo a"
sources = []
[tasks.b]
needs = ["a"]
run = "echo b"
sources = []
"#;

fn json_of(s: &Sandbox, args: &[&str]) -> Value {
    let out = s.command(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} did not print one JSON document ({e}): {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn every_command_that_prints_data_takes_output_json() {
    let s = Sandbox::new(TWO_TASKS);
    assert_eq!(s.apply(&["--fresh"]).code, 0);
    assert_eq!(s.apply(&["--fresh"]).code, 0);
    let runs = json_of(&s, &["runs", "--output", "json"]);
    assert_eq!(runs.as_array().unwrap().len(), 2);
    assert_eq!(runs[1]["state"], "succeeded");
    let id = runs[1]["id"].as_str().unwrap();
    assert_eq!(json_of(&s, &["status", "-o", "json"])["run"]["id"], id);
    assert_eq!(
        json_of(&s, &["status", "--json"])["run"]["id"],
        id,
        "old spelling"
    );
    assert_eq!(json_of(&s, &["artifacts", "-o", "json"])["run"], id);
    assert!(json_of(&s, &["report", "-o", "json"]).is_object());
    assert!(
        json_of(&s, &["report", "--format", "json"]).is_object(),
        "old spelling"
    );
    assert!(json_of(&s, &["plan", "-o", "json"])["tasks"].is_array());
    assert!(
        json_of(&s, &["plan", "--format", "json"])["tasks"].is_array(),
        "old spelling"
    );
    assert!(json_of(&s, &["validate", "--output", "json"])["diagnostics"].is_array());
    assert!(json_of(&s, &["validate", "--format", "json"])["diagnostics"].is_array());
    let templates = json_of(&s, &["templates", "--output", "json"]);
    assert!(templates
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["use"] == "builtin:goal" && t["inputs"]["goal"]["required"] == true));
    let doctor = json_of(&s, &["doctor", "--output", "json"]);
    assert!(doctor["checks"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["check"] == "git" && c["ok"] == true));
}

#[test]
fn compile_errors_under_apply_output_json_are_json_on_stdout() {
    let s = Sandbox::new("version = 1\n[tasks.a]\nrun = 3\n");
    let out = s.command(&["apply", "--output", "json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // One line, as the event stream it stands in for.
    assert_eq!(out.stdout.iter().filter(|b| **b == b'\n').count(), 1);
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["diagnostics"][0]["code"], "wrong-type");
    assert_eq!(doc["diagnostics"][0]["line"], 3);
}

#[test]
fn errors_about_runs_and_tasks_say_what_to_do() {
    let s = Sandbox::new(TWO_TASKS);
    assert_eq!(s.apply(&[]).code, 0);
    for args in [
        &["artifacts", "latest", "nosuch"][..],
        &["logs", "latest", "nosuch"],
        &["retry", "--task", "nosuch"],
        &["cancel"],
        &["status", "nosuch"],
    ] {
        let out = s.command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{args:?}: {stderr}");
        assert!(stderr.contains("\n  help: "), "{args:?}: {stderr}");
    }
}

#[test]
fn run_arguments_take_latest_and_refuse_ambiguous_prefixes() {
    let s = Sandbox::new(TWO_TASKS);
    assert_eq!(s.apply(&["--fresh"]).code, 0);
    assert_eq!(s.apply(&["--fresh"]).code, 0);
    let runs = json_of(&s, &["runs", "-o", "json"]);
    let (first, latest) = (
        runs[0]["id"].as_str().unwrap().to_string(),
        runs[1]["id"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        json_of(&s, &["status", "latest", "-o", "json"])["run"]["id"],
        latest
    );
    assert_eq!(
        json_of(&s, &["status", &first, "-o", "json"])["run"]["id"],
        first
    );
    // Both ids start with the year: a prefix naming two runs is refused, listing them.
    let out = s.command(&["report", &first[..4]]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is ambiguous: 2 runs start with it"),
        "{stderr}"
    );
    assert!(
        stderr.contains(&first) && stderr.contains(&latest),
        "{stderr}"
    );
    // `artifacts` defaults to the latest run, and takes a task alone.
    assert_eq!(json_of(&s, &["artifacts", "-o", "json"])["run"], latest);
    let listing = json_of(&s, &["artifacts", "b", "-o", "json"]);
    assert_eq!(listing["run"], latest);
    assert_eq!(listing["tasks"].as_array().unwrap().len(), 1);
    assert_eq!(listing["tasks"][0]["node"], "b");
}

#[test]
fn a_clusterfile_kdl_is_found_without_naming_it() {
    let s = Sandbox::new("");
    std::fs::remove_file(s.path().join("clusterfile.toml")).unwrap();
    s.file(
        "clusterfile.kdl",
        "version 1\ntasks {\n  hello {\n    run \"echo hi\"\n  }\n}\n",
    )
    .unwrap();
    let validate = s.command(&["validate"]).output().unwrap();
    assert_eq!(
        validate.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&validate.stderr)
    );
    let applied = s.apply(&[]);
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    assert_eq!(applied.tasks("task_succeeded"), ["hello"]);
}

#[test]
fn without_state_here_the_state_directories_nearby_are_named() {
    let s = Sandbox::new("");
    std::fs::remove_file(s.path().join("clusterfile.toml")).unwrap();
    s.file("ci/clusterfile.toml", TWO_TASKS).unwrap();
    let applied = Applied::from_output(
        s.command(&["apply", "ci/clusterfile.toml", "-o", "json"])
            .output()
            .unwrap(),
    );
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    for args in [&["runs"][..], &["status"][..], &["report"][..]] {
        let out = s.command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("found some in ci/.ccluster: pass `--state-dir ci/.ccluster`"),
            "{args:?}: {stderr}"
        );
    }
}

#[test]
fn plan_explain_rehearse_keys_agents_as_a_rehearsal_does() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.ask]
prompt = "Say hello."
workspace = "none"
sources = []
"#,
    );
    s.file(".gitignore", ".ccluster/\n").unwrap();
    git(s.path(), &["init", "-q", "-b", "main"]);
    git(s.path(), &["add", "-A"]);
    git(s.path(), &["commit", "-q", "-m", "init"]);
    let applied = Applied::from_output(
        s.command(&["apply", "--rehearse", "-o", "json"])
            .env("CCLUSTER_CLAUDE_BIN", claude_bin())
            .output()
            .unwrap(),
    );
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    let verdict = |extra: &[&str]| {
        let mut args = vec!["plan", "--explain", "-o", "json"];
        args.extend_from_slice(extra);
        json_of(&s, &args)["explain"][0]["verdict"].clone()
    };
    assert_eq!(verdict(&["--rehearse"]), "satisfied");
    assert_eq!(
        verdict(&[]),
        "run",
        "a real run never takes a rehearsed result"
    );
}

#[test]
fn validate_refuses_what_apply_would_refuse_before_it_starts() {
    let workspace = "version = 1\n[tasks.edit]\nworkspace = \"worktree\"\nrun = \"true\"\n";
    // Outside a git repository.
    let s = Sandbox::new(workspace);
    for args in [&["validate"][..], &["apply"]] {
        let out = s.command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("git repository"), "{args:?}: {stderr}");
    }
    let out = s.command(&["validate"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error[no-repository]") && stderr.contains("help: "),
        "{stderr}"
    );
    // In a repository without a commit, and with a base that does not exist.
    git(s.path(), &["init", "-q", "-b", "main"]);
    let out = s.command(&["validate"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("error[no-base]"), "{stderr}");
    git(s.path(), &["add", "-A"]);
    git(s.path(), &["commit", "-q", "-m", "init"]);
    assert_eq!(
        s.command(&["validate"]).output().unwrap().status.code(),
        Some(0)
    );
    s.write(&format!(
        "{workspace}[workflow]\nbase = \"no-such-branch\"\n"
    ));
    for args in [&["validate"][..], &["apply"]] {
        let out = s.command(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("no-such-branch"), "{args:?}: {stderr}");
    }
    // A workflow without workspaces needs no repository.
    let plain = Sandbox::new("version = 1\n[tasks.a]\nrun = \"true\"\n");
    assert_eq!(
        plain.command(&["validate"]).output().unwrap().status.code(),
        Some(0)
    );
}

#[test]
fn plan_shows_the_runners_its_tasks_use_as_checked() {
    let s = Sandbox::new(
        r#"version = 1
[runners.box]
kind = "docker"
image = "worker:1"
memory = "512m"
cpus = 1.5
network = "none"
mounts = ["cache:/cache"]
[runners.unused]
kind = "docker"
image = "other:1"
[tasks.build]
runner = "box"
run = "make"
sources = []
"#,
    );
    let out = s.command(&["plan"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("runner box: docker worker:1 (pull missing; user (yours); cpus 1.5; memory 512 MiB; network none; mount cache:/cache (read-only))"),
        "{text}"
    );
    assert!(!text.contains("unused"), "{text}");
    let plan = json_of(&s, &["plan", "-o", "json"]);
    let box_ = &plan["runners"]["box"];
    assert_eq!(box_["kind"], "docker");
    assert_eq!(box_["docker"]["memory_bytes"], 512 << 20);
    assert_eq!(box_["docker"]["network"], "none");
    assert!(plan["runners"].get("unused").is_none());
    // All local: no runners in the plan.
    let local = Sandbox::new(TWO_TASKS);
    assert!(json_of(&local, &["plan", "-o", "json"])
        .get("runners")
        .is_none());
}
