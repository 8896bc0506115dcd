//! `[policy]` guardrails: what a task's change may hold, checked before it is committed (class
//! `policy`, never retried), with credentials refused by default.

use crate::support::{Applied, Sandbox};

fn run_task(policy: &str, command: &str) -> (crate::support::Applied, Sandbox) {
    let s = Sandbox::in_repo(
        &format!(
            r#"version = 1
{policy}
[tasks.change]
workspace = "worktree"
retry = {{ limit = 2 }}
run = '''{command}'''
"#
        ),
        &[("src/lib.rs", "fn a() {}\n"), ("README.md", "hi\n")],
    );
    let run = s.apply(&[]);
    (run, s)
}

fn failure(run: &crate::support::Applied) -> (String, String) {
    let failed = run.of("task_failed");
    assert_eq!(failed.len(), 1, "{}{}", run.stdout, run.stderr);
    // Never retried: the same change would be refused again.
    assert!(run.of("task_retrying").is_empty(), "{}", run.stdout);
    (
        failed[0]["class"].as_str().unwrap_or("").to_string(),
        failed[0]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn a_denied_path_fails_the_attempt_and_nothing_is_published() {
    let (run, s) = run_task(
        "[policy]\ndenied_paths = [\".github/**\", \"**/.env\"]\n",
        "mkdir -p .github/workflows && echo 'on: push' > .github/workflows/ci.yml",
    );
    assert_eq!(run.code, 1);
    let (class, message) = failure(&run);
    assert_eq!(class, "policy");
    assert!(
        message.contains("`.github/workflows/ci.yml` may not be changed"),
        "{message}"
    );
    assert!(message.contains("`.github/**`"), "{message}");
    let id = s.run_id();
    let refs = crate::support::git(
        s.path(),
        &["for-each-ref", &format!("refs/ccluster/runs/{id}/")],
    );
    assert_eq!(refs, "", "the refused change was published");
}

#[test]
fn allowed_paths_and_sizes_bound_a_change() {
    let inside =
        "[policy]\nallowed_paths = [\"src/**\"]\nmax_files_changed = 2\nmax_lines_changed = 3\n";
    let (run, _) = run_task(
        inside,
        "echo 'fn b() {}' >> src/lib.rs && echo x > src/new.rs",
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let (run, _) = run_task(inside, "echo changed > README.md");
    let (class, message) = failure(&run);
    assert_eq!(class, "policy");
    assert!(
        message.contains("none of the policy's allowed paths (`src/**`)"),
        "{message}"
    );
    let (run, _) = run_task(
        inside,
        "echo a > src/a.rs && echo b > src/b.rs && echo c > src/c.rs",
    );
    assert!(failure(&run)
        .1
        .contains("3 files changed, more than the policy's `max_files_changed = 2`"));
    let (run, _) = run_task(inside, "printf '1\\n2\\n3\\n4\\n' > src/a.rs");
    assert!(failure(&run).1.contains("4 lines changed"));
}

#[test]
fn a_credential_in_a_change_is_refused_by_default() {
    // No [policy] at all: credentials are refused anyway.
    let (run, _) = run_task(
        "",
        "printf -- '-----BEGIN OPENSSH PRIVATE KEY-----\\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmU\\n-----END OPENSSH PRIVATE KEY-----\\n' > src/id_key",
    );
    let (class, message) = failure(&run);
    assert_eq!(class, "policy");
    assert!(
        message.contains("`src/id_key` adds what looks like a private key (added line 1)"),
        "{message}"
    );
    assert!(!message.contains("b3Blbn"), "{message}");
    assert!(!run.stdout.contains("b3BlbnNzaC1rZXktdjEAAAAABG5vbmU"));
    // Turned off, it is committed.
    let (run, _) = run_task(
        "[policy]\nforbid_credentials = false\n",
        "printf -- '-----BEGIN OPENSSH PRIVATE KEY-----\\n' > src/id_key",
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
}

#[test]
fn a_policy_glob_that_is_not_one_is_a_diagnostic() {
    let s = Sandbox::new(
        "version = 1\n[policy]\ndenied_paths = [\"src/[\"]\n[tasks.a]\nrun = \"true\"\n",
    );
    let out = s.command(&["validate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("error[invalid-glob]: clusterfile.toml:3:17"),
        "{text}"
    );
}

/// A clusterfile whose tasks ask for more than its `[policy]` allows.
const OVER_ASKING: &str = r#"version = 1
[policy]
allowed_tools = ["Read", "Edit", "Bash(cargo *)"]
max_permission_mode = "acceptEdits"
max_turns = 10

[tasks.plan]
prompt = "Plan"
claude = { permission_mode = "bypassPermissions", max_turns = 20, allowed_tools = ["Read", "Bash", "Bash(git push:*)"] }
"#;

#[test]
fn validate_rejects_a_task_asking_for_more_than_the_policy_with_both_places() {
    let s = Sandbox::new(OVER_ASKING);
    let out = s
        .command(&["validate", "clusterfile.toml"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    insta::assert_snapshot!("policy-over-asking", stderr);
    // Machine-readable too: each error at the task's key, with a note at the policy's.
    let out = s
        .command(&["validate", "clusterfile.toml", "--output", "json"])
        .output()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes: Vec<&str> = doc["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["code"].as_str().unwrap())
        .collect();
    for code in [
        "policy-permission-mode",
        "policy-max-turns",
        "policy-tool-not-allowed",
        "policy-denied-tool",
    ] {
        assert!(codes.contains(&code), "{code} missing from {codes:?}");
    }
}

#[test]
fn an_operators_policy_is_laid_over_the_clusterfiles_and_kept_for_retry() {
    let s = Sandbox::in_repo(
        r#"version = 1
[policy]
denied_paths = ["secrets/**"]

[defaults]
max_run_usd = 5

[tasks.change]
workspace = "worktree"
run = "mkdir -p .github && echo 'on: push' > .github/ci.yml"
"#,
        &[("README.md", "hi\n")],
    );
    s.file(
        "ops/policy.toml",
        "[policy]\ndenied_paths = [\".github/**\"]\nmax_run_usd = 2\n",
    )
    .unwrap();
    // The run budget asks for more than the operator allows: an error naming both places.
    let out = s
        .command(&["validate", "--policy", "ops/policy.toml"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "clusterfile.toml:6:15: the run's budget of $5 is more than the policy allows"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("the operator's policy (ops/policy.toml:3:15) says `max_run_usd = 2`"),
        "{stderr}"
    );
    s.write(
        &s.read("clusterfile.toml")
            .replace("max_run_usd = 5", "max_run_usd = 1"),
    );
    s.commit_all("a smaller budget");
    // `plan` shows the policy in force: both layers' denied paths.
    let plan = s
        .command(&["plan", "--policy", "ops/policy.toml"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        text.contains(
            "policy: paths any (not secrets/**, .github/**) | credentials refused | run budget $1"
        ),
        "{text}"
    );
    // The operator's denied path holds, though the clusterfile allows it.
    let run = s.apply(&["--policy", "ops/policy.toml"]);
    let (class, message) = failure(&run);
    assert_eq!(class, "policy");
    assert!(message.contains("`.github/**`"), "{message}");
    // The run kept the policy: a retry without `--policy` is held to it too.
    let retry = Applied::from_output(
        s.command(&["retry", "--output", "json", "--grace-period", "1s"])
            .env_remove("CCLUSTER_POLICY")
            .output()
            .unwrap(),
    );
    let (class, message) = failure(&retry);
    assert_eq!(class, "policy");
    assert!(message.contains("`.github/**`"), "{message}");
    // A broken policy file is a diagnostic in that file, and nothing runs.
    s.file("ops/bad.toml", "[policy]\nmax_turns = \"many\"\n")
        .unwrap();
    let out = s
        .command(&["apply", "--policy", "ops/bad.toml"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ops/bad.toml:2:13"), "{stderr}");
}

#[test]
fn agents_are_denied_pushing_and_held_to_the_policys_turns() {
    let s = Sandbox::in_repo(
        r#"version = 1
[policy]
max_turns = 2

[tasks.pusher]
prompt = "Push your work"
claude = { allowed_tools = ["Bash"] }
rehearsal = { turns = [{ tools = [{ name = "Bash", input = { command = "git push origin HEAD:refs/heads/sneaky" } }] }, { text = "done" }] }

[tasks.chatty]
prompt = "Read a lot"
retry = { limit = 0 }
rehearsal = { turns = [{ tools = [{ name = "Read", input = { file_path = "{{cwd}}/README.md" } }] }, { tools = [{ name = "Read", input = { file_path = "{{cwd}}/README.md" } }] }, { tools = [{ name = "Read", input = { file_path = "{{cwd}}/README.md" } }] }, { text = "done" }] }
"#,
        &[("README.md", "hi\n")],
    );
    let remote = tempfile::tempdir().unwrap();
    crate::support::git(remote.path(), &["init", "-q", "--bare"]);
    crate::support::git(
        s.path(),
        &["remote", "add", "origin", remote.path().to_str().unwrap()],
    );
    let run = crate::agents::rehearse(&s, &["--keep-going"]);
    // The push was denied by the CLI itself (the default `denied_tools`), though the task allows
    // every Bash command.
    assert!(
        run.tasks("task_succeeded").contains(&"pusher".to_string()),
        "{}{}",
        run.stdout,
        run.stderr
    );
    let id = s.run_id();
    let transcript = s.read(&format!(".ccluster/runs/{id}/logs/pusher.1.out"));
    assert!(
        transcript.contains(r#""permission_denials":[{"tool_name":"Bash""#),
        "{transcript}"
    );
    let pushed = crate::support::git(remote.path(), &["for-each-ref"]);
    assert_eq!(pushed, "", "the agent pushed");
    // The policy's `max_turns` became the task's: the CLI stopped the third turn.
    let failed = run.of("task_failed");
    assert_eq!(failed.len(), 1, "{}", run.stdout);
    assert_eq!(failed[0]["task"], "chatty");
    assert_eq!(failed[0]["class"], "max_turns");
}

#[test]
fn an_inherited_setting_over_the_policy_is_one_error_at_the_defaults() {
    let s = Sandbox::new(
        r#"version = 1
[policy]
max_turns = 5

[defaults.claude]
max_turns = 9

[tasks.a]
prompt = "A"

[tasks.b]
prompt = "B"
"#,
    );
    let out = s
        .command(&["validate", "clusterfile.toml", "--output", "json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let found: Vec<&serde_json::Value> = doc["diagnostics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["code"] == "policy-max-turns")
        .collect();
    assert_eq!(found.len(), 1, "{doc}");
    assert!(
        found[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("`[defaults.claude]` asks for 9 turns"),
        "{doc}"
    );
}
