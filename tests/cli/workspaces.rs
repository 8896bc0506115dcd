//! Workspaces on real git repositories: worktrees per task, merges in a fixed order, conflict
//! reports and their resolution, downstream tasks building on merged work, the exported patch,
//! reports, `gc`, and `kill -9` in the middle of a fan-out and of a merge.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::apply::Sandbox;
use crate::support::{git, task};

/// A sandbox that is a git repository on `main` with one commit (`README` = "base").
fn repo(clusterfile: &str) -> Sandbox {
    Sandbox::in_repo(clusterfile, &[("README", "base\n")])
}

/// Worktrees git knows besides the main checkout and those waiting in the pool for reuse.
fn extra_worktrees(s: &Sandbox) -> Vec<String> {
    worktrees(s)
        .into_iter()
        .filter(|w| !w.contains("/worktrees/pool/"))
        .collect()
}

fn worktrees(s: &Sandbox) -> Vec<String> {
    git(s.path(), &["worktree", "list", "--porcelain"])
        .lines()
        .filter_map(|l| l.strip_prefix("worktree "))
        .skip(1)
        .map(str::to_string)
        .collect()
}

fn fan_out(sleeps: [&str; 4]) -> String {
    format!(
        r#"version = 1
[workflow]
name = "fan-out"

[tasks.edit]
map = [{{ name = "a", sleep = "{}" }}, {{ name = "b", sleep = "{}" }}, {{ name = "c", sleep = "{}" }}, {{ name = "d", sleep = "{}" }}]
workspace = "worktree"
run = "sleep {{{{ item.sleep }}}}; mkdir -p src; echo {{{{ item.name }}}} > src/{{{{ item.name }}}}.txt"

[tasks.join]
needs = ["edit"]
merge = {{ strategy = "git" }}

[tasks.count]
needs = ["join"]
run = "cat src/*.txt | tr -d '\n'"
"#,
        sleeps[0], sleeps[1], sleeps[2], sleeps[3]
    )
}

#[test]
fn parallel_edits_of_different_files_merge_cleanly_in_index_order() {
    let mut trees = Vec::new();
    // Two runs whose instances finish in opposite orders give the same merge.
    for sleeps in [["0.4", "0.3", "0.2", "0.1"], ["0.1", "0.2", "0.3", "0.4"]] {
        let s = repo(&fan_out(sleeps));
        let done = s.apply(&["--jobs", "4"]);
        assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
        let run = s.run_id();
        let branch = format!("ccluster/{run}/join");
        let first_parents = git(s.path(), &["log", "--first-parent", "--format=%s", &branch]);
        let merges: Vec<&str> = first_parents
            .lines()
            .filter(|l| l.starts_with("Merge"))
            .collect();
        assert_eq!(
            merges,
            [
                format!("Merge edit[3] into refs/ccluster/runs/{run}/join"),
                format!("Merge edit[2] into refs/ccluster/runs/{run}/join"),
                format!("Merge edit[1] into refs/ccluster/runs/{run}/join"),
                format!("Merge edit[0] into refs/ccluster/runs/{run}/join"),
            ]
        );
        // The downstream task ran on the merged work.
        let status = s.status();
        assert_eq!(task(&status, "count")["output"], "abcd");
        assert_eq!(
            git(s.path(), &["status", "--porcelain"]),
            "",
            "main checkout untouched"
        );
        assert!(extra_worktrees(&s).is_empty(), "{:?}", extra_worktrees(&s));
        trees.push(git(s.path(), &["rev-parse", &format!("{branch}:src")]));
        // Each instance has its own ref holding only its file.
        let files = git(
            s.path(),
            &[
                "diff",
                "--name-only",
                "main",
                &format!("refs/ccluster/runs/{run}/edit/2"),
            ],
        );
        assert_eq!(files.trim(), "src/c.txt");
    }
    assert_eq!(trees[0], trees[1]);
}

const CONFLICT: &str = r#"version = 1
[workflow]
name = "conflict"

[tasks.edit]
map = ["one", "two"]
workspace = "worktree"
run = "echo {{ item }} > README"

[tasks.join]
needs = ["edit"]
merge = { strategy = "git", on_conflict = "fail" }
"#;

#[test]
fn conflicting_edits_are_reported_then_resolved_by_the_hand_off() {
    let s = repo(CONFLICT);
    let failed = s.apply(&[]);
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    let fail = failed.of("task_failed");
    assert_eq!(fail.len(), 1);
    assert_eq!(fail[0]["task"], "join");
    assert_eq!(fail[0]["class"], "merge_conflict");
    let message = fail[0]["message"].as_str().unwrap();
    assert!(
        message.contains("README (changed by edit[0], edit[1])"),
        "{message}"
    );
    // The failed merge's worktree is left for inspection, without a half-made merge.
    assert_eq!(extra_worktrees(&s).len(), 1);
    let report = s.command(&["report", "--format", "json"]).output().unwrap();
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    let join = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "join")
        .unwrap();
    assert_eq!(join["conflicts"][0]["files"][0]["path"], "README");
    assert_eq!(join["conflicts"][0]["resolved_by"], Value::Null);
    let run = s.run_id();
    assert!(
        git(
            s.path(),
            &["branch", "--list", &format!("ccluster/{run}/join")]
        )
        .is_empty(),
        "a failed merge publishes no branch"
    );
    assert!(
        git(
            s.path(),
            &["for-each-ref", &format!("refs/ccluster/runs/{run}/join")]
        )
        .is_empty(),
        "a failed merge publishes no ref"
    );

    // Hand the conflict to a resolving command: it sees the listing and fixes the file.
    s.write(&CONFLICT.replace(
        r#"on_conflict = "fail" }"#,
        r#"on_conflict = "run", run = "test \"$CCLUSTER_CONFLICTS\" = README && grep -q README \"$CCLUSTER_CONFLICT_REPORT\" && printf 'one\ntwo\n' > README" }"#,
    ));
    let resolved = s.apply(&[]);
    assert_eq!(resolved.code, 0, "{}{}", resolved.stdout, resolved.stderr);
    assert_eq!(resolved.tasks("task_cached"), ["edit[0]", "edit[1]"]);
    let run = s.run_id();
    let readme = git(s.path(), &["show", &format!("ccluster/{run}/join:README")]);
    assert_eq!(readme, "one\ntwo\n");

    let md = s.command(&["report"]).output().unwrap();
    assert!(md.status.success());
    let md = String::from_utf8_lossy(&md.stdout).into_owned();
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(r"\d{8}-\d{6}\.\d{3}-[0-9a-f]{4}", "[RUN]");
    settings.add_filter(r"\b[0-9a-f]{10}\b", "[SHA]");
    settings.add_filter(r"\d+\.\d+s\b", "[TIME]");
    settings.bind(|| insta::assert_snapshot!("report-resolved-conflict", md));
}

#[test]
fn exported_patch_applies_on_the_base_and_export_makes_a_branch() {
    let s = repo(&fan_out(["0", "0", "0", "0"]));
    assert_eq!(s.apply(&[]).code, 0);
    let patch = s.path().join("result.diff");
    let out = s
        .command(&["export", "--patch", patch.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A fresh clone at the base takes the patch cleanly and ends with the result's tree.
    let clone = tempfile::tempdir().unwrap();
    git(
        clone.path(),
        &["clone", "-q", s.path().to_str().unwrap(), "."],
    );
    git(clone.path(), &["apply", "--index", patch.to_str().unwrap()]);
    let run = s.run_id();
    let applied = git(clone.path(), &["write-tree"]);
    let result = git(
        s.path(),
        &["rev-parse", &format!("ccluster/{run}/join^{{tree}}")],
    );
    assert_eq!(applied, result);

    let out = s
        .command(&["export", "--branch", "feature/result"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        git(s.path(), &["rev-parse", "feature/result^{tree}"]),
        result
    );
}

#[test]
fn the_base_commit_is_part_of_the_cache_key() {
    let s = repo(&fan_out(["0", "0", "0", "0"]));
    assert_eq!(s.apply(&[]).code, 0);
    let again = s.apply(&[]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    assert!(again.tasks("task_started").is_empty());
    // The cached run still gets its result branch.
    let run = s.run_id();
    assert!(!git(
        s.path(),
        &["branch", "--list", &format!("ccluster/{run}/join")]
    )
    .is_empty());
    // A new commit on the base: every workspace task starts from it, so all run again.
    std::fs::write(s.path().join("NEW"), "x\n").unwrap();
    git(s.path(), &["add", "NEW"]);
    git(s.path(), &["commit", "-q", "-m", "new"]);
    let explain = s
        .command(&["plan", "--explain", "--format", "json"])
        .output()
        .unwrap();
    let explain: Value = serde_json::from_slice(&explain.stdout).unwrap();
    let edit0 = explain["explain"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["task"] == "edit[0]")
        .unwrap();
    assert_eq!(edit0["verdict"], "run");
    assert_eq!(edit0["changed"], serde_json::json!(["base"]));
    let rerun = s.apply(&[]);
    assert_eq!(rerun.code, 0, "{}{}", rerun.stdout, rerun.stderr);
    assert_eq!(rerun.tasks("task_started").len(), 6);
    let run = s.run_id();
    assert_eq!(
        git(s.path(), &["show", &format!("ccluster/{run}/join:NEW")]),
        "x\n"
    );
}

#[test]
fn setup_and_copy_prepare_the_workspace_and_setup_failures_are_classified() {
    let s = repo(
        r#"version = 1
[tasks.use_env]
workspace = "worktree"
copy = [".env"]
setup = "cat .env > from-setup"
run = "cat .env from-setup"
artifacts = ["from-setup"]
"#,
    );
    // `.env` is not committed: it reaches the workspace only by `copy`.
    std::fs::write(s.path().join(".env"), "TOKEN=local\n").unwrap();
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert_eq!(
        task(&s.status(), "use_env")["output"],
        "TOKEN=local\nTOKEN=local"
    );
    let run = s.run_id();
    let got = s
        .command(&["artifacts", &run, "use_env", "--get", "from-setup"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout), "TOKEN=local\n");

    s.write("version = 1\n[tasks.broken]\nworkspace = \"worktree\"\nsetup = \"exit 3\"\nrun = \"true\"\n");
    let failed = s.apply(&[]);
    assert_eq!(failed.code, 1);
    let fail = failed.of("task_failed");
    assert_eq!(fail[0]["class"], "setup_error");
    assert!(fail[0]["message"].as_str().unwrap().contains("exit code 3"));

    s.write("version = 1\n[tasks.noisy]\nworkspace = \"worktree\"\nsetup = \"echo preparing\"\nrun = \"echo working\"\n");
    assert_eq!(s.apply(&[]).code, 0);
    let logs = s.command(&["logs", &s.run_id()]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&logs.stdout),
        "==> noisy attempt 1 setup stdout <==\npreparing\n==> noisy attempt 1 stdout <==\nworking\n"
    );
}

#[test]
fn gc_removes_finished_worktrees_and_branches_but_keeps_results_and_failed_work_when_told() {
    let s = repo(&format!(
        "{}\n[tasks.broken]\nneeds = [\"join\"]\nrun = \"echo half > half.txt; exit 1\"\n",
        fan_out(["0", "0", "0", "0"])
            .replace("name = \"fan-out\"", "name = \"gc\"\nkeep_failed = true")
    ));
    let done = s.apply(&[]);
    assert_eq!(done.code, 1);
    let run = s.run_id();
    // The failed attempt's worktree is kept, with its half-made work.
    let kept = extra_worktrees(&s);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(Path::new(&kept[0]).join("half.txt").exists());
    let out = s.command(&["gc"]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(extra_worktrees(&s).len(), 1, "keep_failed keeps it");
    let branches = git(s.path(), &["branch", "--list", "ccluster/*"]);
    assert_eq!(branches.trim(), format!("ccluster/{run}/join"));
    assert_eq!(
        git(s.path(), &["for-each-ref", "refs/ccluster/runs/"]),
        "",
        "gc removes the run's refs"
    );

    s.write(
        &std::fs::read_to_string(s.path().join("clusterfile.toml"))
            .unwrap()
            .replace("keep_failed = true", "keep_failed = false"),
    );
    assert_eq!(s.apply(&[]).code, 1);
    assert_eq!(extra_worktrees(&s).len(), 2);
    assert!(s.command(&["gc"]).output().unwrap().status.success());
    // The second run did not keep failed work; the first run's policy still holds for its own;
    // the pool of reusable worktrees is emptied.
    assert_eq!(worktrees(&s), kept);
}

#[test]
fn a_clusterfile_outside_git_is_refused_before_anything_runs() {
    let s = Sandbox::new("version = 1\n[tasks.t]\nworkspace = \"worktree\"\nrun = \"true\"\n");
    let out = s.apply(&[]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("git repository"), "{}", out.stderr);
}

/// Waits until a path exists (polling), or panics.
fn wait_for(what: &str, test: impl Fn() -> bool) {
    let start = Instant::now();
    while !test() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn worktree_dirs(s: &Sandbox, name: &str) -> bool {
    let Ok(runs) = std::fs::read_dir(s.path().join(".ccluster/worktrees")) else {
        return false;
    };
    runs.flatten().any(|r| r.path().join(name).exists())
}

#[test]
fn kill_9_mid_fan_out_and_mid_merge_leaves_nothing_stray_and_finishes() {
    let clusterfile = r#"version = 1
[workflow]
name = "killed"

[tasks.edit]
map = ["one", "two", "three"]
workspace = "worktree"
run = "echo {{ item }} > README; echo {{ item }} > {{ item }}.txt; sleep 1"

[tasks.join]
needs = ["edit"]
merge = { strategy = "git", on_conflict = "run", run = "sleep 1; printf 'merged\n' > README" }
"#;
    let s = repo(clusterfile);
    // 1. In the middle of the fan-out: instances are running in their worktrees.
    let mut child = s.spawn_apply(&["--jobs", "2"]);
    wait_for("a running instance", || worktree_dirs(&s, "edit.0.1"));
    std::thread::sleep(Duration::from_millis(200));
    child.kill().unwrap();
    child.wait().unwrap();
    // 2. In the middle of the merge: the resolver is running in the conflicted worktree.
    let mut child = s.spawn_apply(&["--jobs", "2"]);
    wait_for("the merge", || worktree_dirs(&s, "join.1"));
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_run = {
        let out = s.command(&["runs"]).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .last()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    };
    // 3. Apply until done.
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    // No instance that succeeded before a kill ran again in the last run, and the merge ran.
    assert!(done.tasks("task_succeeded").contains(&"join".to_string()));
    let run = s.run_id();
    assert_eq!(
        git(s.path(), &["show", &format!("ccluster/{run}/join:README")]),
        "merged\n"
    );
    for f in ["one", "two", "three"] {
        assert_eq!(
            git(s.path(), &["show", &format!("ccluster/{run}/join:{f}.txt")]),
            format!("{f}\n")
        );
    }
    // Nothing stray: no worktree, no half-merged ref or branch of the killed run, no leftover
    // directory.
    assert!(extra_worktrees(&s).is_empty(), "{:?}", extra_worktrees(&s));
    assert!(
        git(
            s.path(),
            &["branch", "--list", &format!("ccluster/{killed_run}/join")]
        )
        .is_empty(),
        "the killed merge left a branch"
    );
    assert!(
        git(
            s.path(),
            &[
                "for-each-ref",
                &format!("refs/ccluster/runs/{killed_run}/join")
            ]
        )
        .is_empty(),
        "the killed merge left a ref"
    );
    let leftovers: Vec<_> = std::fs::read_dir(s.path().join(".ccluster/worktrees"))
        .unwrap()
        .flatten()
        .filter(|r| r.file_name() != "pool")
        .flat_map(|r| std::fs::read_dir(r.path()).unwrap().flatten())
        .map(|e| e.path())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(git(s.path(), &["status", "--porcelain"]), "");
}

#[test]
fn a_reused_worktree_is_as_clean_as_a_fresh_one() {
    // With one job, `second` takes the worktree `first` left in the pool.
    let s = repo(
        r#"version = 1
[tasks.first]
workspace = "worktree"
run = "echo kept > kept.txt; echo junk > junk.log; echo dirty >> README"

[tasks.second]
needs = ["first"]
run = "test ! -e junk.log && cat kept.txt README"
"#,
    );
    std::fs::write(s.path().join(".gitignore"), ".ccluster/\n*.log\n").unwrap();
    git(s.path(), &["commit", "-qam", "ignore logs"]);
    let done = s.apply(&["--jobs", "1"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert_eq!(task(&s.status(), "second")["output"], "kept\nbase\ndirty");
    assert_eq!(worktrees(&s).len(), 1, "one worktree waits in the pool");
    // A later run reuses it from a different commit: nothing of the old one shows through.
    s.write("version = 1\n[tasks.third]\nworkspace = \"worktree\"\nrun = \"test ! -e kept.txt && test ! -e junk.log && cat README\"\n");
    let done = s.apply(&["--jobs", "1"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert_eq!(task(&s.status(), "third")["output"], "base");
}

#[test]
fn plan_warns_when_instances_are_told_to_touch_the_same_paths() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.edit]
map = ["a", "b", "a"]
touches = ["src/{{ item }}.rs", "docs/{{ item }}/"]
run = "true"

[tasks.apart]
map = ["a", "b"]
touches = ["src/{{ item }}.rs"]
run = "true"
"#,
    );
    let out = s.command(&["plan"]).env("NO_COLOR", "1").output().unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning[overlapping-touches]"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(
        warnings[0].contains(
            "instances `edit[0]` and `edit[2]` of task `edit` are told to change `src/a.rs`"
        ),
        "{stderr}"
    );
}

#[test]
fn a_dirty_main_checkout_is_left_alone_and_not_seen_by_workspaces() {
    let s = repo("version = 1\n[tasks.look]\nworkspace = \"worktree\"\nrun = \"cat README; echo task > README\"\n");
    std::fs::write(s.path().join("README"), "uncommitted\n").unwrap();
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    assert!(
        done.stderr.contains("uncommitted changes"),
        "{}",
        done.stderr
    );
    assert_eq!(task(&s.status(), "look")["output"], "base");
    assert_eq!(
        std::fs::read_to_string(s.path().join("README")).unwrap(),
        "uncommitted\n"
    );
    let run = s.run_id();
    let listing = s.command(&["artifacts", &run]).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("look.1.out"), "{listing}");
    assert!(listing.contains("+1     -1     README"), "{listing}");
}

#[test]
fn copied_files_are_never_committed() {
    let s = repo("version = 1\n[tasks.t]\nworkspace = \"worktree\"\ncopy = [\".env\"]\nrun = \"cat .env > seen.txt\"\n");
    std::fs::write(s.path().join(".env"), "TOKEN=secret-value\n").unwrap();
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    let run = s.run_id();
    let files = git(
        s.path(),
        &[
            "ls-tree",
            "-r",
            "--name-only",
            &format!("refs/ccluster/runs/{run}/t"),
        ],
    );
    assert!(files.contains("seen.txt"), "{files}");
    assert!(
        !files.contains(".env"),
        "the copied .env was committed: {files}"
    );
}

#[test]
fn a_copy_workspace_publishes_its_commit_like_a_worktree() {
    let s = repo(
        "version = 1\n[tasks.c]\nworkspace = \"copy\"\nrun = \"echo copied > c.txt\"\n\n[tasks.after]\nneeds = [\"c\"]\nrun = \"cat c.txt\"\n",
    );
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    assert_eq!(task(&s.status(), "after")["output"], "copied");
    let run = s.run_id();
    assert_eq!(
        git(
            s.path(),
            &["show", &format!("refs/ccluster/runs/{run}/c:c.txt")]
        ),
        "copied\n"
    );
    // A copy is no worktree of the main repository, and is removed once published.
    assert!(extra_worktrees(&s).is_empty(), "{:?}", extra_worktrees(&s));
}

#[test]
fn apply_warns_when_a_dynamic_fan_out_is_told_to_touch_the_same_paths() {
    let s = repo(
        r#"version = 1
[tasks.parts]
output = "json"
run = "echo '[{\"files\": [\"src/a.rs\"]}, {\"files\": [\"src/b.rs\"]}, {\"files\": [\"src/a.rs\", \"docs/\"]}]'"

[tasks.edit]
needs = ["parts"]
map = "{{ tasks.parts.output }}"
touches = ["{{ item.files | tojson }}"]
run = "true"
"#,
    );
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}", done.stderr);
    let warnings = done.of("warning");
    assert_eq!(warnings.len(), 1, "{}", done.stdout);
    assert_eq!(warnings[0]["task"], "edit");
    assert!(
        warnings[0]["message"]
            .as_str()
            .unwrap()
            .contains("instances `edit[0]` and `edit[2]` are told to change `src/a.rs`"),
        "{}",
        done.stdout
    );
}
