//! Agents on a `docker` runner through the real binary, a real daemon and the real `claude` CLI:
//! each in its own container on the `api-only` network, reaching the (scripted) model API through
//! ccluster's egress proxy and nothing else, with its credentials out of `docker inspect` and the
//! state directory; and the shipped `feature-fanout` workflow giving the same result as locally.

use std::time::{Duration, Instant};

use crate::apply::{Applied, Sandbox};
use crate::docker::Daemon;
use crate::rehearsal_server::files_under;
use crate::support::{claude_bin, git, root};

/// What the agent does in its container: writes its API key (reversed, the only way to see the
/// token from outside), what `git` and `id` say there, asks the proxy for a host it must not
/// reach, tries an address past the network's gateway directly, and waits so that the test can
/// look at the container.
const PROBE: &str = "printenv ANTHROPIC_API_KEY | rev > key.txt; git status --short > git.txt; id -u > uid.txt; git ls-remote http://example.invalid/x > /dev/null 2>&1; if timeout 3 bash -c 'exec 3<>/dev/tcp/192.0.2.2/80' 2>/dev/null; then echo reached; else echo unreachable; fi > direct.txt; sleep 3";

fn probing_clusterfile() -> String {
    format!(
        r#"version = 1
[runners.box]
kind = "docker"
image = "ccluster-test/debian:1"
pull = "never"
[tasks.spy]
runner = "box"
prompt = "look around"
workspace = "worktree"
claude = {{ allowed_tools = ["Bash"] }}
rehearsal = {{ turns = [{{ tools = [{{ name = "Bash", input = {{ command = "{PROBE}", description = "probe" }} }}] }}, {{ text = "done" }}] }}
"#
    )
}

#[test]
fn agents_in_containers_reach_only_the_model_api_and_keep_their_credentials_out_of_sight() {
    let daemon = Daemon::start_with_debian();
    let s = Sandbox::in_repo(&probing_clusterfile(), &[("README", "base\n")]);
    let child = daemon
        .ccluster(&s, &["apply", "--rehearse", "--output", "json"])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The container as Docker shows it, while the agent works.
    let deadline = Instant::now() + Duration::from_secs(60);
    let inspected = loop {
        let id = daemon.docker(&["ps", "-q", "--filter", "label=dev.ccluster.task=spy"]);
        if !id.trim().is_empty() {
            break daemon.docker(&["inspect", id.trim()]);
        }
        assert!(Instant::now() < deadline, "the agent's container never ran");
        std::thread::sleep(Duration::from_millis(50));
    };
    let run = Applied::from_output(child.wait_with_output().unwrap());
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let run_id = s.run_id();
    let show = |file: &str| {
        git(
            s.path(),
            &["show", &format!("refs/ccluster/runs/{run_id}/spy:{file}")],
        )
    };

    // The worker got its key, and it is nowhere else: not in the container's configuration,
    // not in any file of the state directory, not in what ccluster printed.
    let key: String = show("key.txt").trim().chars().rev().collect();
    assert_eq!(key.len(), 64, "{key}");
    assert!(!inspected.contains(&key), "{inspected}");
    assert!(!inspected.contains("ANTHROPIC_API_KEY"), "{inspected}");
    for file in files_under(&s.path().join(".ccluster")) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
            "the key reached {}",
            file.display()
        );
    }
    assert!(!run.stdout.contains(&key) && !run.stderr.contains(&key));

    // On the `api-only` network, with the pinned CLI mounted read-only.
    let container: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    let container = &container[0];
    assert!(
        container["NetworkSettings"]["Networks"]
            .as_object()
            .unwrap()
            .keys()
            .eq(["ccluster-api-only"]),
        "{container}"
    );
    let binds: Vec<&str> = container["HostConfig"]["Binds"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b.as_str())
        .collect();
    assert!(
        binds.contains(&format!("{0}:{0}:ro", claude_bin()).as_str()),
        "{binds:?}"
    );

    // The model API was reached (the run is done); another host, asked of the proxy, was refused
    // and the refusal told as an event and in the task's log; an address past the gateway could
    // not be reached at all.
    let refused: Vec<&serde_json::Value> = run
        .of("task_progress")
        .into_iter()
        .filter(|e| e["kind"] == "egress_refused")
        .collect();
    assert_eq!(refused.len(), 1, "{}", run.stdout);
    assert_eq!(refused[0]["task"], "spy");
    assert_eq!(refused[0]["detail"], "example.invalid:80");
    let logs = s.command(&["logs", "latest", "spy"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&logs.stdout)
            .contains("ccluster: refused a connection to example.invalid:80"),
        "{}",
        String::from_utf8_lossy(&logs.stdout)
    );
    assert_eq!(show("direct.txt"), "unreachable\n");

    // git works in the worktree inside; files are the invoking user's.
    assert!(
        show("git.txt").contains("?? key.txt"),
        "{}",
        show("git.txt")
    );
    assert_eq!(show("uid.txt").trim(), nix::unistd::getuid().to_string());
    assert_eq!(daemon.containers(), "");
}

/// The shipped workflow, with every task on `runner`'s `[runners.box]` when given.
fn feature_fanout(runner: Option<&str>) -> String {
    let text = std::fs::read_to_string(root().join("workflows/feature-fanout.toml")).unwrap();
    let Some(image) = runner else {
        return text;
    };
    let text = text.replace("[defaults]\n", "[defaults]\nrunner = \"box\"\n");
    format!("{text}\n[runners.box]\nkind = \"docker\"\nimage = \"{image}\"\npull = \"never\"\n")
}

/// The change the run's merged result makes to the base, and the nodes that ran.
fn rehearse_fanout(daemon: &Daemon, s: &Sandbox) -> (String, Vec<String>) {
    let out = daemon
        .ccluster(
            s,
            &[
                "apply",
                "--rehearse",
                "--output",
                "json",
                "--var",
                "test_command=git diff --quiet HEAD && test -d .ccluster-rehearsal",
            ],
        )
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .output()
        .unwrap();
    let run = Applied::from_output(out);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let run_id = s.run_id();
    // (The clusterfiles differ, in the base: the change made on it must not.)
    let tree = git(
        s.path(),
        &[
            "diff",
            "HEAD",
            &format!("refs/ccluster/runs/{run_id}/merge"),
        ],
    );
    let mut ran = run.tasks("task_succeeded");
    ran.sort();
    (tree, ran)
}

#[test]
fn feature_fanout_rehearsed_on_docker_gives_the_local_result() {
    let daemon = Daemon::start_with_debian();
    let files = [("src/settings.rs", "pub fn settings() {}\n")];
    let local = Sandbox::in_repo(&feature_fanout(None), &files);
    let boxed = Sandbox::in_repo(&feature_fanout(Some("ccluster-test/debian:1")), &files);
    let (local_tree, local_ran) = rehearse_fanout(&daemon, &local);
    let (boxed_tree, boxed_ran) = rehearse_fanout(&daemon, &boxed);
    // Planner, one agent per part, the merge and the tests, as on this machine.
    assert!(
        local_ran.iter().filter(|t| t.starts_with("build[")).count() >= 2,
        "{local_ran:?}"
    );
    assert_eq!(boxed_ran, local_ran);
    assert!(local_tree.contains(".ccluster-rehearsal/"), "{local_tree}");
    assert_eq!(boxed_tree, local_tree);
    assert_eq!(daemon.containers(), "");
}
