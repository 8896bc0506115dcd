//! `[policy]` guardrails: what a task's change may hold, checked before it is committed (class
//! `policy`, never retried), with credentials refused by default.

use crate::support::Sandbox;

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
