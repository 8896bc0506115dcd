//! ccluster's own git steps against hostile input and hostile repositories: task ids and branch
//! names that try to become ref-script lines or options, repository hooks, git steps that hang
//! (timeout, Ctrl-C), node names that used to share files, and binary merge conflicts.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::apply::Sandbox;
use crate::support::{git, task};

/// A sandbox that is a git repository on `main` with one commit (`README` = "base").
fn repo(clusterfile: &str) -> Sandbox {
    Sandbox::in_repo(clusterfile, &[("README", "base\n")])
}

/// Every ref of the repository, with its commit.
fn all_refs(s: &Sandbox) -> Vec<(String, String)> {
    git(
        s.path(),
        &["for-each-ref", "--format=%(refname) %(objectname)"],
    )
    .lines()
    .filter_map(|l| l.split_once(' '))
    .map(|(r, c)| (r.to_string(), c.to_string()))
    .collect()
}

/// The state of the user's side of the repository: branches outside ccluster's, HEAD, and what
/// `main` points at.
fn users_side(s: &Sandbox) -> (Vec<(String, String)>, String) {
    let refs = all_refs(s)
        .into_iter()
        .filter(|(r, _)| !r.starts_with("refs/heads/ccluster/") && !r.starts_with("refs/ccluster/"))
        .collect();
    let head = git(s.path(), &["symbolic-ref", "HEAD"]);
    (refs, head)
}

#[test]
fn hostile_template_task_ids_cannot_move_or_delete_the_users_branch() {
    let s = repo(
        r#"version = 1
[tasks.t]
use = "./lib/hostile.toml"
"#,
    );
    // Quoted keys with newlines and characters git refuses in ref names, each trying to turn
    // its line of a ref script into a second command, or its branch into another ref.
    s.file(
        "lib/hostile.toml",
        r#"version = 1
[tasks."a 0000000000000000000000000000000000000000\nupdate refs/heads/main"]
workspace = "worktree"
run = "echo one > one.txt"
[tasks."b\ndelete refs/heads/main\nupdate refs/heads/x"]
workspace = "worktree"
run = "echo two > two.txt"
[tasks."d/../../../../main"]
workspace = "worktree"
run = "echo four > four.txt"
[tasks."e..f.lock"]
workspace = "worktree"
run = "echo five > five.txt"
[tasks."-M"]
workspace = "worktree"
run = "echo six > six.txt"
[tasks." ~^:?*[\\"]
workspace = "worktree"
run = "echo seven > seven.txt"
"#,
    )
    .unwrap();
    git(s.path(), &["add", "-A"]);
    git(s.path(), &["commit", "-q", "-m", "template"]);
    let before = users_side(&s);
    let done = s.apply(&["--jobs", "4"]);
    // Either the ids are refused when compiling (a diagnostic, exit 2), or they run and every
    // result lands in a ref of ccluster's own: the user's branches stay as they were.
    assert!(
        done.code == 0 || done.code == 2,
        "{}{}",
        done.stdout,
        done.stderr
    );
    assert_eq!(users_side(&s), before);
    assert_eq!(git(s.path(), &["status", "--porcelain"]), "");
    if done.code == 0 {
        let run = s.run_id();
        let branches: Vec<String> = all_refs(&s)
            .into_iter()
            .map(|(r, _)| r)
            .filter(|r| r.starts_with(&format!("refs/ccluster/runs/{run}/")))
            .collect();
        // One ref per task, each holding its own file.
        assert_eq!(branches.len(), 6, "{branches:?}");
        for branch in &branches {
            let changed = git(s.path(), &["diff", "--name-only", "main", branch, "--"]);
            assert_eq!(changed.lines().count(), 1, "{branch}: {changed}");
        }
    }
}

#[test]
fn export_refuses_branch_names_that_are_options_or_invalid() {
    let s = repo(
        r#"version = 1
[tasks.edit]
workspace = "worktree"
run = "echo x > x.txt"
[tasks.join]
needs = ["edit"]
merge = { strategy = "git" }
"#,
    );
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    let before = users_side(&s);
    let main = git(s.path(), &["rev-parse", "main"]);
    for bad in [
        "--branch=-M",
        "--branch=--foo",
        "--branch=-D",
        "--branch=-f",
        "--branch=--force",
        "--branch=-",
        "--branch=--",
        "--branch=-mmain",
        "--branch=HEAD",
        "--branch=a..b",
        "--branch=a b",
        "--branch=a\nb",
        "--branch=refs/heads/x",
        "--branch=x.lock",
        "--branch=x~1",
        "--branch=@{-1}",
        // An existing branch is not moved.
        "--branch=main",
    ] {
        let out = s.command(&["export", bad]).output().unwrap();
        assert!(
            !out.status.success(),
            "{bad:?} was accepted: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(users_side(&s), before, "{bad:?} changed the branches");
        assert_eq!(git(s.path(), &["rev-parse", "main"]), main);
    }
    // The separate-argument form too.
    let out = s.command(&["export", "--branch", "-M"]).output().unwrap();
    assert!(!out.status.success());
    assert_eq!(users_side(&s), before);
    // A good name still works.
    let out = s
        .command(&["export", "--branch", "result/x"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!git(s.path(), &["branch", "--list", "result/x"]).is_empty());
}

/// Hooks that leave a marker named after themselves in `markers` and then sleep.
fn install_hooks(s: &Sandbox, markers: &Path, hooks: &[&str], sleep: u32) {
    let dir = s.path().join(".git/hooks");
    std::fs::create_dir_all(&dir).unwrap();
    for hook in hooks {
        let path = dir.join(hook);
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\necho $$ >> '{}/{hook}'\nsleep {sleep}\n",
                markers.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

const ALL_HOOKS: [&str; 9] = [
    "pre-commit",
    "prepare-commit-msg",
    "commit-msg",
    "post-commit",
    "post-checkout",
    "pre-merge-commit",
    "post-merge",
    "reference-transaction",
    "post-rewrite",
];

fn markers_in(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    found
}

#[test]
fn repository_hooks_do_not_run_inside_ccluster_git_steps() {
    let s = repo(
        r#"version = 1
[tasks.edit]
map = ["a", "b"]
workspace = "worktree"
run = "echo {{ item }} > {{ item }}.txt"
[tasks.join]
needs = ["edit"]
merge = { strategy = "git" }
[tasks.copy]
needs = ["join"]
workspace = "copy"
run = "echo c > c.txt"
"#,
    );
    let markers = tempfile::tempdir().unwrap();
    install_hooks(&s, markers.path(), &ALL_HOOKS, 20);
    let started = Instant::now();
    let done = s.apply(&["--jobs", "2"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert_eq!(markers_in(markers.path()), Vec::<String>::new());
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
    let run = s.run_id();
    let joined = git(
        s.path(),
        &["ls-tree", "--name-only", &format!("ccluster/{run}/join")],
    );
    assert!(
        joined.contains("a.txt") && joined.contains("b.txt"),
        "{joined}"
    );
    // `export --branch` and `gc` are ccluster's git steps too.
    let out = s
        .command(&["export", "--branch", "result"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let out = s.command(&["gc"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(markers_in(markers.path()), Vec::<String>::new());
}

#[test]
fn with_hooks_opted_in_a_hanging_hook_is_stopped_at_the_task_timeout() {
    let s = repo(
        r#"version = 1
[tasks.edit]
workspace = "worktree"
timeout = "2s"
run = "echo x > x.txt"
"#,
    );
    let markers = tempfile::tempdir().unwrap();
    install_hooks(&s, markers.path(), &["post-commit"], 20);
    let started = Instant::now();
    let out = s
        .command(&["apply", "--output", "json", "--grace-period", "1s"])
        .env("CCLUSTER_GIT_HOOKS", "1")
        .output()
        .unwrap();
    let elapsed = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The opt-in works: the hook ran, and was stopped.
    assert_eq!(markers_in(markers.path()), ["post-commit"]);
    let hook: i32 = std::fs::read_to_string(markers.path().join("post-commit"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!alive(hook), "the hook outlived the timeout");
    let status = s.status();
    let edit = task(&status, "edit");
    assert_eq!(edit["state"], "failed", "{edit}");
    assert_eq!(edit["class"], "timeout", "{edit}");
    assert!(
        edit["message"].as_str().unwrap().contains("git commit"),
        "{edit}"
    );
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
    // Nothing was published: no ref of the run, hidden or branch.
    let run = s.run_id();
    let published: Vec<(String, String)> = all_refs(&s)
        .into_iter()
        .filter(|(r, _)| r.contains(&run))
        .collect();
    assert!(published.is_empty(), "{published:?}");
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

fn wait_for(path: &Path, timeout: Duration) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < timeout,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn ctrl_c_stops_a_hanging_git_step_and_the_task_is_cancelled() {
    for hook in ["post-commit", "reference-transaction", "post-merge"] {
        let s = repo(
            r#"version = 1
[tasks.edit]
map = ["a", "b"]
workspace = "worktree"
run = "echo {{ item }} > {{ item }}.txt"
[tasks.join]
needs = ["edit"]
merge = { strategy = "git" }
"#,
        );
        let markers = tempfile::tempdir().unwrap();
        install_hooks(&s, markers.path(), &[hook], 60);
        let child = s
            .command(&["apply", "--output", "json", "--grace-period", "1s"])
            .env("CCLUSTER_GIT_HOOKS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let marker = markers.path().join(hook);
        wait_for(&marker, Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(200));
        let interrupted = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        )
        .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(130),
            "{hook}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            interrupted.elapsed() < Duration::from_secs(15),
            "{hook}: Ctrl-C took {:?}",
            interrupted.elapsed()
        );
        for pid in std::fs::read_to_string(&marker).unwrap().lines() {
            assert!(
                !alive(pid.trim().parse().unwrap()),
                "{hook} survived Ctrl-C"
            );
        }
        let status = s.status();
        assert_eq!(status["run"]["state"], "cancelled", "{hook}: {status}");
        let states: Vec<&Value> = status["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| &t["state"])
            .collect();
        assert!(
            states.iter().any(|s| *s == "cancelled"),
            "{hook}: {states:?}"
        );
        assert!(!states.iter().any(|s| *s == "failed"), "{hook}: {states:?}");
    }
}

#[test]
fn a_template_task_and_a_top_level_task_with_the_same_flat_name_keep_their_own_files() {
    let s = repo(
        r#"version = 1
[tasks.a]
use = "./lib/t.toml"
[tasks.a_b]
workspace = "worktree"
run = "sleep 0.3; echo top > top.txt; ls; echo from-top"
"#,
    );
    s.file(
        "lib/t.toml",
        r#"version = 1
[tasks.b]
workspace = "worktree"
run = "sleep 0.3; echo tpl > tpl.txt; ls; echo from-template"
"#,
    )
    .unwrap();
    git(s.path(), &["add", "-A"]);
    git(s.path(), &["commit", "-q", "-m", "template"]);
    let done = s.apply(&["--jobs", "2"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    let run = s.run_id();
    let logs = s.path().join(".ccluster/runs").join(&run).join("logs");
    let top = std::fs::read_to_string(logs.join("a_b.1.out")).unwrap();
    let tpl = std::fs::read_to_string(logs.join("a.b.1.out")).unwrap();
    assert!(
        top.ends_with("from-top\n") && !top.contains("tpl.txt"),
        "{top}"
    );
    assert!(
        tpl.ends_with("from-template\n") && !tpl.contains("top.txt"),
        "{tpl}"
    );
    // `ccluster logs` finds each node's own.
    let out = s.command(&["logs", &run, "a.b"]).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("from-template") && !shown.contains("from-top"),
        "{shown}"
    );
    // Each result holds only its own file: the worktrees were not shared.
    for (branch, file) in [("a_b", "top.txt"), ("a.b", "tpl.txt")] {
        let changed = git(
            s.path(),
            &[
                "diff",
                "--name-only",
                "main",
                &format!("refs/ccluster/runs/{run}/{branch}"),
                "--",
            ],
        );
        assert_eq!(changed.trim(), file, "{branch}");
    }
}

/// Two instances write different binary content to `blob.bin`; the merge resolves with `resolve`.
fn binary_conflict(resolve: &str) -> String {
    format!(
        r#"version = 1
[tasks.edit]
map = ["1", "2"]
workspace = "worktree"
run = 'printf "\000\001{{{{ item }}}}\000" > blob.bin'
[tasks.join]
needs = ["edit"]
merge = {{ strategy = "git", on_conflict = "run", run = "{resolve}" }}
"#
    )
}

#[test]
fn a_binary_conflict_the_resolver_left_alone_fails_and_one_it_staged_succeeds() {
    let s = repo(&binary_conflict("true"));
    std::fs::write(s.path().join("blob.bin"), b"\x00base\x00").unwrap();
    git(s.path(), &["add", "blob.bin"]);
    git(s.path(), &["commit", "-q", "-m", "binary"]);
    let failed = s.apply(&[]);
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    let fail = failed.of("task_failed");
    assert_eq!(fail.len(), 1, "{:?}", failed.events);
    assert_eq!(fail[0]["task"], "join");
    assert_eq!(fail[0]["class"], "merge_conflict");
    assert!(
        fail[0]["message"].as_str().unwrap().contains("blob.bin"),
        "{}",
        fail[0]["message"]
    );
    let run = s.run_id();
    assert!(git(
        s.path(),
        &["branch", "--list", &format!("ccluster/{run}/join")]
    )
    .is_empty());

    // Taking the second instance's side and staging it is a resolution.
    s.write(&binary_conflict(
        "git checkout --theirs -- blob.bin && git add blob.bin",
    ));
    let resolved = s.apply(&[]);
    assert_eq!(resolved.code, 0, "{}{}", resolved.stdout, resolved.stderr);
    let run = s.run_id();
    let merged = std::process::Command::new("git")
        .arg("-C")
        .arg(s.path())
        .args(["show", &format!("ccluster/{run}/join:blob.bin")])
        .output()
        .unwrap()
        .stdout;
    assert_eq!(merged, b"\x00\x012\x00");

    // Changing the file without staging it counts too (the resolver did something).
    s.write(&binary_conflict("printf both > blob.bin"));
    let changed = s.apply(&[]);
    assert_eq!(changed.code, 0, "{}{}", changed.stdout, changed.stderr);
    let run = s.run_id();
    assert_eq!(
        git(
            s.path(),
            &["show", &format!("ccluster/{run}/join:blob.bin")]
        ),
        "both"
    );
}

#[test]
fn gc_dry_run_names_what_it_would_remove_and_removes_nothing() {
    let s = repo(
        r#"version = 1
[tasks.edit]
map = ["a", "b"]
workspace = "worktree"
run = "echo {{ item }} > {{ item }}.txt"
[tasks.join]
needs = ["edit"]
merge = { strategy = "git" }
"#,
    );
    assert_eq!(s.apply(&[]).code, 0);
    let run = s.run_id();
    let before = all_refs(&s);
    let out = s.command(&["gc", "--dry-run"]).output().unwrap();
    assert!(out.status.success());
    let said = String::from_utf8_lossy(&out.stdout);
    for node in ["edit/0", "edit/1", "join"] {
        assert!(
            said.contains(&format!(
                "would remove ref refs/ccluster/runs/{run}/{node}\n"
            )),
            "{said}"
        );
    }
    assert!(
        said.contains(&format!("kept result branch ccluster/{run}/join")),
        "{said}"
    );
    assert!(
        !said.contains(&format!("would remove branch ccluster/{run}/join")),
        "{said}"
    );
    assert_eq!(all_refs(&s), before);
}
