//! A `kubernetes` runner's keys: a runner with every key validates (tasks on it too), plans the same
//! from TOML and KDL, and shows its settings in the text and JSON plans; keys of another kind are
//! warnings only.

use crate::support::ccluster;

const FULL_TOML: &str = "tests/fixtures/kubernetes/full-runner.toml";
const FULL_KDL: &str = "tests/fixtures/kubernetes/full-runner.kdl";

#[test]
fn tasks_on_a_kubernetes_runner_with_every_key_validate() {
    for file in [FULL_TOML, FULL_KDL] {
        let run = ccluster(&["validate", file]);
        assert_eq!(run.code, 0, "{file}: {}", run.stderr);
        assert_eq!(run.stderr, "", "{file} has warnings");
        assert!(run.stdout.contains("valid (2 tasks"), "{}", run.stdout);
    }
}

#[test]
fn plans_show_a_kubernetes_runner_the_same_from_toml_and_kdl() {
    let text = ccluster(&["plan", FULL_TOML]);
    assert_eq!(text.code, 0, "{}", text.stderr);
    insta::assert_snapshot!("plan-text-kubernetes-runner", text.stdout);
    let json = ccluster(&["plan", "--format", "json", FULL_TOML]);
    assert_eq!(json.code, 0, "{}", json.stderr);
    insta::assert_snapshot!("plan-json-kubernetes-runner", json.stdout);
    let from_kdl = ccluster(&["plan", "--format", "json", FULL_KDL]);
    assert_eq!(from_kdl.code, 0, "{}", from_kdl.stderr);
    assert_eq!(json.stdout, from_kdl.stdout, "TOML and KDL plans differ");

    let plan: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
    let cluster = &plan["runners"]["cluster"];
    assert_eq!(cluster["kind"], "kubernetes");
    assert_eq!(cluster["namespace"], "ci");
    assert!(cluster.get("docker").is_none(), "{cluster}");
    let k = &cluster["kubernetes"];
    assert_eq!(k["context"], "staging");
    assert_eq!(k["namespace"], "ci");
    assert_eq!(k["limits"]["cpu"], "2", "a number is kept as its text");
    assert_eq!(k["requests"]["memory"], "256Mi");
    assert_eq!(k["tolerations"][2]["toleration_seconds"], 30);
    assert_eq!(k["pull"], "always");
    assert_eq!(k["unschedulable_timeout_ms"], 600_000);
    // Defaults, spelt out.
    let small = &plan["runners"]["small"]["kubernetes"];
    assert_eq!(small["pull"], "missing");
    assert_eq!(small["unschedulable_timeout_ms"], 300_000);
    assert!(small["context"].is_null() && small["network"].is_null());
}

#[test]
fn keys_of_another_runner_kind_are_only_warnings() {
    let run = ccluster(&["validate", "tests/fixtures/kubernetes/ignored-keys.toml"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    for expected in [
        "runner `cluster` is `kubernetes`: `memory` is a `docker` runner's key and is ignored",
        "help: a pod's CPUs and memory are its `resources`",
        "runner `cluster` is `kubernetes`: `mounts` is a `docker` runner's key",
        "runner `box` is `docker`: `tolerations` is a `kubernetes` runner's key and is ignored",
        "runner `box` is `docker`: `labels` is a `kubernetes` runner's key",
    ] {
        assert!(
            run.stderr.contains(expected),
            "missing {expected:?} in\n{}",
            run.stderr
        );
    }
    assert_eq!(
        run.stderr.matches("warning[ignored-key]").count(),
        4,
        "{}",
        run.stderr
    );
}
