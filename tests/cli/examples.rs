//! Every shipped workflow validates, plans the same from TOML and KDL, and its plan is snapshotted.

use crate::support::{ccluster, files};

#[test]
fn every_shipped_workflow_validates() {
    let workflows = files("workflows", &["toml", "kdl"]);
    assert!(
        workflows.len() >= 4,
        "expected shipped examples, found {workflows:?}"
    );
    for file in workflows {
        let run = ccluster(&["validate", &file]);
        assert_eq!(run.code, 0, "{file} does not validate:\n{}", run.stderr);
        assert!(run.stdout.contains("valid"), "{}", run.stdout);
        assert_eq!(run.stderr, "", "{file} has warnings");
    }
}

#[test]
fn toml_and_kdl_forms_compile_to_identical_plans() {
    let kdl = files("workflows", &["kdl"]);
    assert!(kdl.len() >= 2, "ship at least two examples in both forms");
    for kdl_file in kdl {
        let toml_file = kdl_file.replace(".kdl", ".toml");
        let from_kdl = ccluster(&["plan", "--format", "json", &kdl_file]);
        let from_toml = ccluster(&["plan", "--format", "json", &toml_file]);
        assert_eq!(from_kdl.code, 0, "{}", from_kdl.stderr);
        assert_eq!(from_toml.code, 0, "{}", from_toml.stderr);
        assert_eq!(
            from_kdl.stdout, from_toml.stdout,
            "{kdl_file} and {toml_file} differ"
        );
    }
}

#[test]
fn plans_of_shipped_workflows() {
    for file in files("workflows", &["toml"]) {
        let name = file
            .trim_start_matches("workflows/")
            .trim_end_matches(".toml")
            .to_string();
        // Templates with required parameters are planned with example values.
        let vars: &[&str] = match name.as_str() {
            "goal" => &["--var", "goal=Add a changelog"],
            "map-files" => &[
                "--var",
                "glob=src/*.rs",
                "--var",
                "instruction=Add a header",
            ],
            "docs" => &["--var", r#"modules=["src/a.rs", "src/b.rs"]"#],
            _ => &[],
        };
        let mut args = vec!["plan", file.as_str()];
        args.extend_from_slice(vars);
        let text = ccluster(&args);
        assert_eq!(text.code, 0, "{}", text.stderr);
        insta::assert_snapshot!(format!("plan-text-{name}"), text.stdout);
        args.extend_from_slice(&["--format", "json"]);
        let json = ccluster(&args);
        assert_eq!(json.code, 0, "{}", json.stderr);
        insta::assert_snapshot!(format!("plan-json-{name}"), json.stdout);
    }
}

#[test]
fn diagram_formats() {
    let dot = ccluster(&["plan", "--format", "dot", "workflows/feature-fanout.toml"]);
    assert_eq!(dot.code, 0, "{}", dot.stderr);
    insta::assert_snapshot!("plan-dot-feature-fanout", dot.stdout);
    let mermaid = ccluster(&[
        "plan",
        "--format",
        "mermaid",
        "workflows/tests-per-module.toml",
    ]);
    assert_eq!(mermaid.code, 0, "{}", mermaid.stderr);
    insta::assert_snapshot!("plan-mermaid-tests-per-module", mermaid.stdout);
}

#[test]
fn vars_override_defaults_and_are_typed() {
    let run = ccluster(&[
        "plan",
        "--format",
        "json",
        "workflows/hello.toml",
        "--var",
        r#"names=["x","y"]"#,
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let plan: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    let ids: Vec<&str> = plan["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["greet[0]", "greet[1]", "greetings", "show"]);
    assert_eq!(
        plan["tasks"][1]["action"]["run"]["rendered"],
        "echo 'Hello, y!'"
    );
}

#[test]
fn bad_vars_are_reported_with_exit_code_2() {
    let run = ccluster(&[
        "plan",
        "workflows/hello.toml",
        "--var",
        "names=notjson",
        "--var",
        "nmaes=1",
    ]);
    assert_eq!(run.code, 2);
    insta::assert_snapshot!("bad-vars", run.stderr);
}

#[test]
fn missing_file_is_exit_code_2() {
    let run = ccluster(&["validate", "does-not-exist.toml"]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("cannot read `does-not-exist.toml`"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_wrongly_typed_var_is_not_also_reported_missing() {
    let run = ccluster(&["plan", "workflows/hello.toml", "--var", "names=3"]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("wrong-input-type"), "{}", run.stderr);
    assert!(!run.stderr.contains("missing-input"), "{}", run.stderr);
}
