//! Reuse: tasks that `use` a template from a path, `builtin:`, or a git repository over file://
//! (pinned in clusterfile.lock), parameter errors that point at both files, cycles, and a retried
//! run that keeps the template text it started with.

use serde_json::Value;

use crate::apply::Sandbox;
use crate::support::{git, task};

fn output(status: &Value, node: &str) -> Value {
    task(status, node)["output"].clone()
}

/// A template whose tasks change the repository: its result branch is what users of it build on.
const WRITER: &str = r#"version = 1
[workflow]
name = "writer"
[inputs.text]
type = "string"
[inputs.copies]
type = "number"
default = 1
[tasks.write]
workspace = "worktree"
run = "echo '{{ inputs.text }} x{{ inputs.copies }}' > written.txt"
[tasks.merge]
needs = ["write"]
merge = { strategy = "git" }
[outputs]
branch = "{{ tasks.merge.output.branch }}"
said = "{{ inputs.text }}"
"#;

#[test]
fn templates_from_a_path_and_builtin_are_embedded_with_their_inputs_bound() {
    let s = Sandbox::new(
        r#"version = 1
[inputs.greeting]
type = "string"
default = "hello"

[tasks.w]
use = "./lib/writer.toml"
with = { text = "{{ inputs.greeting }} world", copies = 2 }

[tasks.after]
needs = ["w"]
run = "cat written.txt; echo '{{ tasks.w.output.said }}'"

[tasks.greet]
use = "builtin:hello"
with = { names = ["Ada"] }
"#,
    );
    s.file("lib/writer.toml", WRITER).unwrap();
    std::fs::write(s.path().join(".gitignore"), ".ccluster/\n").unwrap();
    git(s.path(), &["init", "-q", "-b", "main"]);
    git(s.path(), &["add", "-A"]);
    git(s.path(), &["commit", "-qm", "init"]);

    let plan = s.command(&["plan"]).output().unwrap();
    let plan = String::from_utf8_lossy(&plan.stdout);
    assert!(
        plan.contains("w.write [shell]") && plan.contains("greet.greet[0] [shell]"),
        "{plan}"
    );
    assert!(
        plan.contains("echo 'hello world x2' > written.txt"),
        "{plan}"
    );

    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    let status = s.status();
    // The downstream task builds on the template's result branch and reads its outputs.
    assert_eq!(output(&status, "after"), "hello world x2\nhello world");
    assert_eq!(output(&status, "w")["said"], "hello world");
    assert!(output(&status, "w")["branch"]
        .as_str()
        .unwrap()
        .ends_with("/w.merge"));
    assert_eq!(output(&status, "greet.greet[0]"), "Hello, Ada!");
}

#[test]
fn a_git_template_is_pinned_in_the_lock_file_until_update() {
    let lib = tempfile::tempdir().unwrap();
    git(lib.path(), &["init", "-q", "-b", "main"]);
    std::fs::write(
        lib.path().join("say.toml"),
        "version = 1\n[inputs.who]\ntype = \"string\"\n[tasks.say]\nrun = \"echo v1 {{ inputs.who }}\"\n[outputs]\nsaid = \"{{ tasks.say.output }}\"\n",
    )
    .unwrap();
    git(lib.path(), &["add", "-A"]);
    git(lib.path(), &["commit", "-qm", "v1"]);
    let url = format!("git+file://{}#main:say.toml", lib.path().display());
    let s = Sandbox::new(&format!(
        "version = 1\n[tasks.x]\nuse = \"{url}\"\nwith = {{ who = \"me\" }}\n"
    ));
    assert_eq!(s.apply(&[]).code, 0);
    assert_eq!(
        output(&s.status(), "x"),
        serde_json::json!({ "said": "v1 me" })
    );
    let lock = std::fs::read_to_string(s.path().join("clusterfile.lock")).unwrap();
    let v1 = git(lib.path(), &["rev-parse", "HEAD"]);
    assert!(lock.contains(v1.trim()), "{lock}");

    // The ref moves: runs keep using the pinned commit...
    std::fs::write(
        lib.path().join("say.toml"),
        "version = 1\n[inputs.who]\ntype = \"string\"\n[tasks.say]\nrun = \"echo v2 {{ inputs.who }}\"\n[outputs]\nsaid = \"{{ tasks.say.output }}\"\n",
    )
    .unwrap();
    git(lib.path(), &["commit", "-qam", "v2"]);
    let again = s.apply(&[]);
    assert_eq!(again.code, 0);
    assert!(
        again.tasks("task_started").is_empty(),
        "the pinned template did not change"
    );
    // ...until `update` pins the new one.
    let update = s.command(&["update"]).output().unwrap();
    assert!(
        update.status.success(),
        "{}",
        String::from_utf8_lossy(&update.stderr)
    );
    let v2 = git(lib.path(), &["rev-parse", "HEAD"]);
    assert!(std::fs::read_to_string(s.path().join("clusterfile.lock"))
        .unwrap()
        .contains(v2.trim()));
    assert_eq!(s.apply(&[]).code, 0);
    assert_eq!(
        output(&s.status(), "x"),
        serde_json::json!({ "said": "v2 me" })
    );
    // A template no longer used leaves the lock at the next `update`.
    s.write("version = 1\n[tasks.y]\nrun = \"true\"\n");
    assert!(s.command(&["update"]).output().unwrap().status.success());
    let lock = std::fs::read_to_string(s.path().join("clusterfile.lock")).unwrap();
    assert!(!lock.contains("say.toml"), "{lock}");
}

#[test]
fn parameter_errors_point_at_both_files_and_cycles_name_the_chain() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.a]
use = "./lib/writer.toml"
with = { txet = "x" }

[tasks.c]
use = "./lib/one.toml"
"#,
    );
    s.file("lib/writer.toml", WRITER).unwrap();
    s.file(
        "lib/one.toml",
        "version = 1\n[tasks.x]\nuse = \"./two.toml\"\n",
    )
    .unwrap();
    s.file(
        "lib/two.toml",
        "version = 1\n[tasks.y]\nuse = \"./one.toml\"\n",
    )
    .unwrap();
    let out = s
        .command(&["validate"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // The unknown parameter: where it is written, and where the template declares its inputs.
    assert!(
        stderr.contains("error[unknown-parameter]: clusterfile.toml:4:17: template `lib/writer.toml` has no input `txet`"),
        "{stderr}"
    );
    assert!(
        stderr.contains("its inputs, declared at lib/writer.toml:4:9: `text`, `copies`"),
        "{stderr}"
    );
    assert!(stderr.contains("error[missing-parameter]: clusterfile.toml:3:7: template `lib/writer.toml` needs its input `text`"), "{stderr}");
    assert!(
        stderr.contains("the input is declared at lib/writer.toml:4:9"),
        "{stderr}"
    );
    assert!(
        stderr.contains("error[template-cycle]: lib/two.toml:3:7: templates use each other in a cycle: clusterfile.toml -> lib/one.toml -> lib/two.toml -> lib/one.toml"),
        "{stderr}"
    );
}

#[test]
fn a_retried_run_keeps_the_template_text_it_started_with() {
    let s = Sandbox::new("version = 1\n[tasks.t]\nuse = \"./lib/step.toml\"\n");
    s.file(
        "lib/step.toml",
        "version = 1\n[tasks.step]\nrun = \"echo old; exit 1\"\n",
    )
    .unwrap();
    let first = s.apply(&[]);
    assert_eq!(first.code, 1);
    // The template changes after the run; retrying the run still runs what it started with.
    s.file(
        "lib/step.toml",
        "version = 1\n[tasks.step]\nrun = \"echo new\"\n",
    )
    .unwrap();
    let run = s.status()["run"]["id"].as_str().unwrap().to_string();
    let retry = s
        .command(&[
            "retry",
            &run,
            "--output",
            "json",
            "--state-dir",
            ".ccluster",
        ])
        .output()
        .unwrap();
    assert_eq!(
        retry.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&retry.stderr)
    );
    let status = s.status();
    let retried = status["run"]["id"].as_str().unwrap().to_string();
    assert_ne!(retried, run);
    let logs = s.command(&["logs", &retried, "t.step"]).output().unwrap();
    assert!(String::from_utf8_lossy(&logs.stdout).contains("old"));
    // A new `apply` reads the files as they are now.
    assert_eq!(s.apply(&[]).code, 0);
    assert_eq!(output(&s.status(), "t.step"), "new");
}

#[test]
fn names_in_a_template_are_checked_against_the_template() {
    let s =
        Sandbox::new("version = 1\n[tasks.t]\nuse = \"./lib/typo.toml\"\nwith = { who = \"a\" }\n");
    s.file("lib/typo.toml",
        "version = 1\n[inputs.who]\ntype = \"string\"\n[tasks.say]\nrun = \"echo {{ inputs.whom }}\"\n",
    )
    .unwrap();
    let out = s
        .command(&["validate"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error[undefined-name]: lib/typo.toml:5:16: undefined name `inputs.whom` in the `run` of task `t.say`"),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `inputs.who`?"), "{stderr}");
}

#[test]
fn nested_templates_resolve_relative_to_each_other_also_on_retry() {
    let s = Sandbox::new("version = 1\n[tasks.o]\nuse = \"./lib/outer.toml\"\n");
    s.file(
        "lib/outer.toml",
        "version = 1\n[tasks.i]\nuse = \"./sub/inner.toml\"\nwith = { n = 7 }\n",
    )
    .unwrap();
    s.file(
        "lib/sub/inner.toml",
        "version = 1\n[inputs.n]\ntype = \"number\"\n[tasks.echo]\nrun = \"echo {{ inputs.n }}\"\n",
    )
    .unwrap();
    assert_eq!(s.apply(&[]).code, 0);
    assert_eq!(output(&s.status(), "o.i.echo"), "7");
    let run = s.status()["run"]["id"].as_str().unwrap().to_string();
    let retry = s
        .command(&[
            "retry",
            &run,
            "--task",
            "o.i.echo",
            "--state-dir",
            ".ccluster",
        ])
        .output()
        .unwrap();
    assert!(
        retry.status.success(),
        "{}",
        String::from_utf8_lossy(&retry.stderr)
    );
    assert_eq!(output(&s.status(), "o.i.echo"), "7");
}

#[test]
fn a_rendered_with_value_is_checked_against_the_input_type() {
    let s = Sandbox::new(
        "version = 1\n[inputs.n]\ntype = \"string\"\ndefault = \"abc\"\n[tasks.t]\nuse = \"./lib/writer.toml\"\nwith = { text = \"x\", copies = \"{{ inputs.n }}\" }\n",
    );
    s.file("lib/writer.toml", WRITER).unwrap();
    let out = s.command(&["plan"]).env("NO_COLOR", "1").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`copies` of template `lib/writer.toml` is a number, but its `with` value gives \"abc\""),
        "{stderr}"
    );
}
