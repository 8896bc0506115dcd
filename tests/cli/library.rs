//! The shipped workflow library: every template validates, starts a project with `init`, and runs
//! end to end under `apply --rehearse` (the real `claude` CLI against the scripted model server).
//! `run --goal` drives the built-in `goal` workflow, including its fix-up loop.

use serde_json::Value;

use crate::apply::{Applied, Sandbox};
use crate::support::{claude_bin, git};

/// A small project with two commits (reviews compare with HEAD~1), and no clusterfile yet.
fn project() -> Sandbox {
    let s = Sandbox::new("");
    std::fs::remove_file(s.path().join("clusterfile.toml")).unwrap();
    std::fs::create_dir_all(s.path().join("src")).unwrap();
    std::fs::write(s.path().join("README.md"), "# A project\n").unwrap();
    std::fs::write(s.path().join("src/a.rs"), "pub fn a() {}\n").unwrap();
    std::fs::write(s.path().join("src/b.rs"), "pub fn b() {}\n").unwrap();
    git(s.path(), &["init", "-q", "-b", "main"]);
    git(s.path(), &["add", "-A"]);
    git(s.path(), &["commit", "-q", "-m", "one"]);
    std::fs::write(s.path().join("src/b.rs"), "pub fn b() -> u8 { 1 }\n").unwrap();
    git(s.path(), &["commit", "-qam", "two"]);
    s
}

fn ccluster(s: &Sandbox, args: &[&str]) -> Applied {
    Applied::from_output(
        s.command(args)
            .env("CCLUSTER_CLAUDE_BIN", claude_bin())
            .output()
            .unwrap(),
    )
}

#[test]
fn every_template_starts_a_project_and_rehearses_end_to_end() {
    let cases: &[(&str, &[&str])] = &[
        ("goal", &["--var", "goal=Add a changelog"]),
        (
            "map-files",
            &[
                "--var",
                "glob=src/*.rs",
                "--var",
                "instruction=Add a header comment",
                "--var",
                "batch_size=1",
            ],
        ),
        (
            "tests-per-module",
            &[
                "--var",
                r#"modules=["src/a.rs", "src/b.rs"]"#,
                "--var",
                "check=true",
            ],
        ),
        ("review", &[]),
        ("docs", &["--var", r#"modules=["src/a.rs", "src/b.rs"]"#]),
        ("feature-fanout", &["--var", "test_command=true"]),
        ("hello", &[]),
    ];
    // Each can also be used from another clusterfile (`use = "builtin:<name>"`).
    for (name, vars) in cases {
        let mut with = String::new();
        for pair in vars.chunks(2).map(|c| c[1]) {
            let (k, v) = pair.split_once('=').unwrap();
            // Lists and numbers as they are, strings quoted.
            let v = if v.starts_with('[') || v.parse::<f64>().is_ok() {
                v.to_string()
            } else {
                format!("{v:?}")
            };
            with.push_str(&format!("{k} = {v}, "));
        }
        // In a project: the workflows with workspaces need its repository.
        let s = project();
        s.write(&format!(
            "version = 1\n[tasks.t]\nuse = \"builtin:{name}\"\nwith = {{ {} }}\n",
            with.trim_end_matches(", ")
        ));
        let out = s.command(&["validate"]).output().unwrap();
        assert!(
            out.status.success(),
            "builtin:{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let listing = ccluster(&project(), &["templates"]);
    assert_eq!(listing.code, 0);
    for (name, vars) in cases {
        assert!(
            listing.stdout.contains(&format!("{name} ")),
            "{}",
            listing.stdout
        );
        let s = project();
        let init = ccluster(&s, &["init", "--template", name]);
        assert_eq!(init.code, 0, "{name}: {}", init.stderr);
        assert!(std::fs::read_to_string(s.path().join(".gitignore"))
            .unwrap()
            .contains(".ccluster/"));
        let valid = ccluster(&s, &["validate"]);
        assert_eq!(valid.code, 0, "{name}: {}", valid.stderr);
        let mut args = vec!["apply", "--rehearse", "--output", "json"];
        args.extend_from_slice(vars);
        let done = ccluster(&s, &args);
        assert_eq!(done.code, 0, "{name}:\n{}\n{}", done.stdout, done.stderr);
        assert!(
            !done.tasks("task_succeeded").is_empty(),
            "{name} ran nothing"
        );
        // A second `init` does not overwrite the project's clusterfile.
        assert_eq!(ccluster(&s, &["init"]).code, 2);
    }
}

#[test]
fn run_goal_drives_the_goal_workflow_through_its_fix_up_loop() {
    let s = project();
    // The tests fail until a `fixed.txt` exists; the first fix-up agent writes it.
    std::fs::write(
        s.path().join("script.toml"),
        r#"[tasks.fix1]
turns = [{ tools = [{ name = "Write", input = { file_path = "{{cwd}}/fixed.txt", content = "ok\n" } }] }, { text = "fixed" }]
"#,
    )
    .unwrap();
    // `run --goal` takes no script; the same workflow through `apply` does (its text is shipped).
    let init = ccluster(&s, &["init", "--template", "goal"]);
    assert_eq!(init.code, 0);
    let done = ccluster(
        &s,
        &[
            "apply",
            "--rehearse",
            "--script",
            "script.toml",
            "--output",
            "json",
            "--var",
            "goal=Make the tests pass",
            "--var",
            "test_command=test -f fixed.txt",
            "--var",
            "max_replan_rounds=1",
        ],
    );
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    let succeeded = done.tasks("task_succeeded");
    // The second look (`replan`) adds follow-ups as a graph, run after the fix-up loop and
    // merged before the docs: the rehearsed planner's graph has one dependency.
    for task in [
        "fix1",
        "retest1",
        "fixed",
        "replan",
        "followup[rehearsal]",
        "followup[rehearsal-2]",
        "followup[rehearsal-3]",
        "followed",
        "docs",
        "verify",
    ] {
        assert!(
            succeeded.contains(&task.to_string()),
            "{task}: {succeeded:?}"
        );
    }
    assert_eq!(done.tasks("task_skipped"), ["fix2"]);
    let position = |task: &str| succeeded.iter().position(|t| t == task).unwrap();
    assert!(position("followup[rehearsal-2]") > position("followup[rehearsal]"));
    let status = s.status();
    let test = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "test")
        .unwrap();
    assert_ne!(test["output"], "PASS", "the first test run failed");
    let run = status["run"]["id"].as_str().unwrap();
    assert_eq!(
        git(
            s.path(),
            &["show", &format!("refs/ccluster/runs/{run}/docs:fixed.txt")]
        ),
        "ok\n"
    );

    // `run --goal` itself, in a fresh project.
    let p = project();
    std::fs::write(p.path().join(".gitignore"), ".ccluster/\n").unwrap();
    git(p.path(), &["add", ".gitignore"]);
    git(p.path(), &["commit", "-qm", "ignore state"]);
    let done = ccluster(
        &p,
        &[
            "run",
            "--goal",
            "Add a changelog",
            "--rehearse",
            "--output",
            "json",
        ],
    );
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    let status: Value = p.status();
    assert_eq!(status["run"]["clusterfile"], "builtin:goal");
    assert_eq!(status["run"]["workflow"], "goal");
    let report = p.command(&["report"]).output().unwrap();
    assert!(String::from_utf8_lossy(&report.stdout).contains("**Result:** branch `ccluster/"));
}

#[test]
fn a_builtin_template_used_in_a_clusterfile_keeps_its_defaults_and_hands_on_its_result() {
    let s = project();
    std::fs::write(
        s.path().join("clusterfile.toml"),
        r#"version = 1
[tasks.g]
use = "builtin:goal"
with = { goal = "Add a changelog" }

[tasks.after]
needs = ["g"]
run = "ls .ccluster-rehearsal | wc -l"
"#,
    )
    .unwrap();
    std::fs::write(s.path().join(".gitignore"), ".ccluster/\n").unwrap();
    git(s.path(), &["add", "-A"]);
    git(s.path(), &["commit", "-qm", "use goal"]);
    // The template's own `[defaults]` (timeout, agent settings) apply to its tasks.
    let plan = ccluster(&s, &["plan"]);
    assert!(
        plan.stdout.contains("1. g.plan [agent]")
            && plan.stdout.contains("timeout: 45m")
            && plan.stdout.contains("max_turns=60"),
        "{}",
        plan.stdout
    );
    let done = ccluster(&s, &["apply", "--rehearse", "--output", "json"]);
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    let status = s.status();
    let after = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "after")
        .unwrap();
    // plan, three builders and docs each left a note on the template's result.
    assert_eq!(after["output"], "5");
    let run = status["run"]["id"].as_str().unwrap();
    assert!(!git(
        s.path(),
        &["for-each-ref", &format!("refs/ccluster/runs/{run}/g")]
    )
    .is_empty());
}
