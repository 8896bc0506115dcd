//! The compiler at scale, on generated clusterfiles: long dependency chains and cycles compile in
//! bounded memory, and nesting beyond the limit is a `too-deep` diagnostic, never a stack
//! overflow, in `validate`, `plan` and `apply`.

use std::process::Command;

use crate::apply::Sandbox;
use crate::support::Run;

/// The address space a run may use: a chain of 10,000 tasks needs tens of megabytes; storing
/// every task's ancestor set took a gigabyte.
const MEMORY_LIMIT_KB: u32 = 256 * 1024;

/// Runs `ccluster ARGS` in the sandbox with its address space limited, so a compiler that grows
/// quadratically fails (an allocation fails and the process aborts) instead of passing slowly.
fn bounded(s: &Sandbox, args: &[&str]) -> Run {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -v {MEMORY_LIMIT_KB} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_ccluster"))
        .args(args)
        .current_dir(s.path())
        .env("NO_COLOR", "1")
        .env_remove("CCLUSTER_STATE_DIR")
        .output()
        .expect("run ccluster");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A chain `t0 <- t1 <- ... <- t{n-1}`; `run` makes the command of task `i` (with `{{ }}` as is).
fn chain(n: usize, run: impl Fn(usize) -> String) -> String {
    let mut text = String::from("version = 1\n[workflow]\nname = \"chain\"\n\n");
    for i in 0..n {
        text.push_str(&format!("[tasks.t{i}]\nrun = \"{}\"\n", run(i)));
        if i > 0 {
            text.push_str(&format!("needs = [\"t{}\"]\n", i - 1));
        }
        text.push('\n');
    }
    text
}

#[test]
fn a_chain_of_10000_tasks_validates_plans_and_explains_in_bounded_memory() {
    let s = Sandbox::new(&chain(10_000, |i| format!("echo {i}")));
    let run = bounded(&s, &["validate", "clusterfile.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("valid (10000 tasks, 10000 plan nodes)"),
        "{}",
        run.stdout
    );
    let plan = bounded(&s, &["plan", "--format", "json", "clusterfile.toml"]);
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let doc: serde_json::Value = serde_json::from_str(&plan.stdout).expect("plan JSON");
    assert_eq!(doc["summary"]["nodes"], 10_000);
    let explain = bounded(&s, &["plan", "--explain", "clusterfile.toml"]);
    assert_eq!(explain.code, 0, "{}", explain.stderr);
}

#[test]
fn a_chain_of_10000_tasks_reading_upstream_outputs_is_checked_in_bounded_memory() {
    // Every task reads its predecessor's output; the last also reads the first's, 9,999 needs
    // away, and one reads a task it does not need.
    let mut text = chain(10_000, |i| match i {
        0 => "echo 0".to_string(),
        9_999 => "echo {{ tasks.t9998.output }} {{ tasks.t0.output }}".to_string(),
        _ => format!("echo {{{{ tasks.t{}.output }}}}", i - 1),
    });
    text.push_str("[tasks.stray]\nrun = \"echo {{ tasks.t5.output }}\"\n");
    let s = Sandbox::new(&text);
    let run = bounded(&s, &["validate", "clusterfile.toml"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("error[not-upstream]")
            && run
                .stderr
                .contains("task `stray` reads `tasks.t5` but does not need `t5`"),
        "{}",
        run.stderr
    );
    assert_eq!(
        run.stderr.matches("error[").count(),
        1,
        "only `stray` is wrong: {}",
        run.stderr
    );
}

#[test]
fn a_cycle_through_10000_tasks_is_reported_by_its_ends_in_bounded_memory() {
    let mut text = chain(10_000, |i| format!("echo {i}"));
    text = text.replacen(
        "[tasks.t0]\nrun = \"echo 0\"\n",
        "[tasks.t0]\nrun = \"echo 0\"\nneeds = [\"t9999\"]\n",
        1,
    );
    let s = Sandbox::new(&text);
    let run = bounded(&s, &["validate", "clusterfile.toml"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    let first = run.stderr.lines().next().unwrap_or_default();
    assert_eq!(
        first,
        "error[cycle]: clusterfile.toml:7:10: dependency cycle: t0 -> t9999 -> t9998 -> t9997 -> \
         t9996 -> t9995 -> t9994 -> t9993 -> ... -> t8 -> t7 -> t6 -> t5 -> t4 -> t3 -> t2 -> t1 \
         -> t0 (10000 tasks)"
    );
    // One pointer per edge shown, not one per task of the cycle.
    assert_eq!(
        run.stderr.matches("` needs `").count(),
        16,
        "{}",
        run.stderr
    );
}

#[test]
fn templates_read_the_upstream_outputs_they_name_or_all_of_them() {
    // `c` names a task two needs away; `d` reads `tasks` as a whole, so it sees every upstream
    // task; `e` names none and still runs.
    let s = Sandbox::new(
        r#"version = 1
[tasks.a]
run = "echo A"
[tasks.b]
needs = ["a"]
run = "echo B"
[tasks.c]
needs = ["b"]
run = "echo {{ tasks.a.output }}{{ tasks.b.output }}"
[tasks.d]
needs = ["c"]
run = "echo {{ tasks | list | join(',') }} {{ tasks[\"c\"].output }}"
[tasks.e]
needs = ["d"]
run = "echo E"
"#,
    );
    let run = s.apply(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let status = s.status();
    let output = |node: &str| crate::support::task(&status, node)["output"].clone();
    assert_eq!(output("c"), "AB");
    assert_eq!(output("d"), "a,b,c AB");
    assert_eq!(output("e"), "E");
}

/// A KDL clusterfile whose `vars` nest `levels` deep (`vars` itself is level 1), one block a line.
fn deep_kdl(levels: usize) -> String {
    let inner = levels - 1;
    format!(
        "version 1\nworkflow {{\n  name \"deep\"\n}}\nvars {{\n{}x 1\n{}}}\ntasks {{\n  t run=\"echo {{{{ vars.a }}}}\"\n}}\n",
        "a {\n".repeat(inner),
        "}\n".repeat(inner)
    )
}

/// A TOML clusterfile whose `vars` nest `levels` deep: `[vars]` is level 1, each bracket of `a`
/// one more, one bracket a line.
fn deep_toml(levels: usize) -> String {
    let brackets = levels - 1;
    format!(
        "version = 1\n[workflow]\nname = \"deep\"\n[vars]\na = {}1\n{}\n[tasks.t]\nrun = \"echo {{{{ vars.a }}}}\"\n",
        "[\n".repeat(brackets),
        "]\n".repeat(brackets)
    )
}

/// `validate`, `plan` and `apply` of a too-deep clusterfile all stop at the same diagnostic.
fn assert_too_deep_everywhere(s: &Sandbox, file: &str) -> String {
    let validate = bounded(s, &["validate", file]);
    assert_eq!(validate.code, 2, "{}", validate.stderr);
    assert!(
        validate.stderr.starts_with("error[too-deep]: "),
        "{}",
        validate.stderr
    );
    for args in [vec!["plan", file], vec!["apply", file]] {
        let run = bounded(s, &args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains("error[too-deep]") && !run.stderr.contains("overflow"),
            "{args:?}: {}",
            run.stderr
        );
    }
    validate.stderr
}

#[test]
fn kdl_nesting_at_the_limit_compiles_and_deeper_is_a_diagnostic() {
    let s = Sandbox::new("");
    s.file("at-limit.kdl", &deep_kdl(64)).unwrap();
    let ok = bounded(&s, &["plan", "at-limit.kdl"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);

    s.file("one-more.kdl", &deep_kdl(65)).unwrap();
    insta::assert_snapshot!(
        "too-deep-kdl-65",
        assert_too_deep_everywhere(&s, "one-more.kdl")
    );
    // The size that overflowed the stack: the same diagnostic, at the same place.
    s.file("deep.kdl", &deep_kdl(1_500)).unwrap();
    insta::assert_snapshot!(
        "too-deep-kdl-1500",
        assert_too_deep_everywhere(&s, "deep.kdl")
    );
}

#[test]
fn kdl_braces_in_strings_and_comments_do_not_count_as_nesting() {
    let braces = "{".repeat(200);
    // Two braces in a row would open a template in a command.
    let spaced = "{ ".repeat(200);
    let s = Sandbox::new("");
    s.file(
        "braces.kdl",
        &format!(
            "version 1\n// {braces}\n/* {braces} /* nested {braces} */ */\nworkflow {{\n  name \"{braces}\"\n  description #\"{braces}\"#\n}}\ntasks {{\n  t run=\"\"\"\n    echo '{spaced}'\n    \"\"\"\n}}\n"
        ),
    )
    .unwrap();
    let run = bounded(&s, &["validate", "braces.kdl"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
}

#[test]
fn toml_nesting_at_the_limit_compiles_and_deeper_is_a_diagnostic() {
    let s = Sandbox::new("");
    s.file("at-limit.toml", &deep_toml(64)).unwrap();
    let ok = bounded(&s, &["plan", "at-limit.toml"]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);

    s.file("one-more.toml", &deep_toml(65)).unwrap();
    insta::assert_snapshot!(
        "too-deep-toml-65",
        assert_too_deep_everywhere(&s, "one-more.toml")
    );
    // Past the TOML parser's own limit: still one `too-deep`, at level 65.
    s.file("deep.toml", &deep_toml(1_500)).unwrap();
    insta::assert_snapshot!(
        "too-deep-toml-1500",
        assert_too_deep_everywhere(&s, "deep.toml")
    );
}

#[test]
fn toml_tables_nested_by_inline_tables_and_dotted_keys_are_limited_too() {
    let s = Sandbox::new("");
    let tail = "[tasks.t]\nrun = \"echo\"\n";
    // Inline tables, 1,500 deep on one line.
    let inline = format!(
        "version = 1\n[vars]\na = {}1{}\n{tail}",
        "{ a = ".repeat(1_500),
        " }".repeat(1_500)
    );
    // A dotted table header, dotted keys and arrays, each within the TOML parser's own limit,
    // together deeper than the clusterfile's.
    let dotted = format!(
        "version = 1\n[vars.{}]\n{} = {}1{}\n{tail}",
        vec!["h"; 30].join("."),
        vec!["k"; 30].join("."),
        "[".repeat(30),
        "]".repeat(30)
    );
    for (file, text) in [("inline.toml", inline), ("dotted.toml", dotted)] {
        s.file(file, &text).unwrap();
        let stderr = assert_too_deep_everywhere(&s, file);
        assert_eq!(stderr.matches("error[").count(), 1, "{file}: {stderr}");
    }
}
