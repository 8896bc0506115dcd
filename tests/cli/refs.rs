//! Where runs leave their commits in git: one hidden ref per plan node under
//! `refs/ccluster/runs/<run>/`, one branch per run (its result) under `refs/heads/ccluster/`, and
//! `gc` (with `--keep N` and `--dry-run`) collecting them, including the per-node branches that
//! runs made before the hidden refs left behind.

use ccluster_engine::store::Store;
use serde_json::Value;

use crate::apply::Sandbox;
use crate::support::{git, task};

/// A sandbox that is a git repository on `main` with one commit (`README` = "base").
fn repo(clusterfile: &str) -> Sandbox {
    Sandbox::in_repo(clusterfile, &[("README", "base\n")])
}

/// Ref names under a prefix, sorted.
fn refs_under(s: &Sandbox, prefix: &str) -> Vec<String> {
    let mut refs: Vec<String> = git(
        s.path(),
        &["for-each-ref", "--format=%(refname)", "--", prefix],
    )
    .lines()
    .map(str::to_string)
    .collect();
    refs.sort();
    refs
}

/// `git branch --list`, as short names.
fn branches(s: &Sandbox) -> Vec<String> {
    let mut names: Vec<String> = git(s.path(), &["branch", "--list", "--format=%(refname:short)"])
        .lines()
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// A fan-out of three edits, a git merge of them (the result), a shell task after the merge,
/// and a task that commits in its worktree itself, as an agent does.
const FAN_IN: &str = r#"version = 1
[tasks.edit]
map = ["a", "b", "c"]
workspace = "worktree"
run = "echo {{ item }} > {{ item }}.txt"

[tasks.own]
workspace = "worktree"
run = "echo mine > own.txt && git add own.txt && git -c user.name=t -c user.email=t@example.com commit -q -m 'committed by the task'"

[tasks.join]
needs = ["edit", "own"]
merge = { strategy = "git" }

[tasks.check]
needs = ["join"]
run = "cat a.txt b.txt c.txt own.txt | tr -d '\n'"
"#;

#[test]
fn per_task_commits_are_hidden_refs_and_only_the_result_is_a_branch() {
    let s = repo(FAN_IN);
    let out = s.command(&["apply"]).output().unwrap();
    let said =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said}");
    let run = s.run_id();
    // The apply tells where the task commits are.
    assert!(
        said.contains(&format!(
            "each task's commit: git for-each-ref refs/ccluster/runs/{run}/"
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!("result: branch ccluster/{run}/join")),
        "{said}"
    );
    // `git branch` lists the user's branch and the run's result, nothing else.
    assert_eq!(
        branches(&s),
        ["ccluster/".to_string() + &run + "/join", "main".into()]
    );
    let prefix = format!("refs/ccluster/runs/{run}/");
    assert_eq!(
        refs_under(&s, "refs/ccluster/runs/"),
        ["check", "edit/0", "edit/1", "edit/2", "join", "own"].map(|n| format!("{prefix}{n}"))
    );
    // The result branch and the result task's ref are the same commit.
    assert_eq!(
        git(s.path(), &["rev-parse", &format!("{prefix}join")]),
        git(s.path(), &["rev-parse", &format!("ccluster/{run}/join")])
    );
    // The merge ran on every input: the check task saw all files.
    assert_eq!(task(&s.status(), "check")["output"], "abcmine");
    // A commit the task made itself is in its ref's history (and so in the merge).
    let log = git(s.path(), &["log", "--format=%s", &format!("{prefix}own")]);
    assert!(log.contains("committed by the task"), "{log}");
    let merged = git(s.path(), &["log", "--format=%s", &format!("{prefix}join")]);
    assert!(merged.contains("committed by the task"), "{merged}");
    assert!(
        merged.contains(&format!("Merge edit[1] into {prefix}join")),
        "{merged}"
    );
    // `artifacts` names each attempt's ref; `report -o json` each node's.
    let listing = s.command(&["artifacts", &run]).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains(&format!("ref {prefix}edit/0")),
        "{listing}"
    );
    let report = s.command(&["report", "-o", "json"]).output().unwrap();
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["result"]["branch"], format!("ccluster/{run}/join"));
    let edit1 = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "edit[1]")
        .unwrap();
    assert_eq!(edit1["ref"], format!("{prefix}edit/1"));
    // A git merge's output names its ref.
    assert_eq!(
        task(&s.status(), "join")["output"]["ref"],
        format!("{prefix}join")
    );
    // `export --branch` adds the user's branch, and only that.
    let out = s
        .command(&["export", "--branch", "feature/x"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        branches(&s),
        [
            format!("ccluster/{run}/join"),
            "feature/x".into(),
            "main".into()
        ]
    );
}

#[test]
fn a_cached_rerun_after_a_clusterfile_edit_gets_refs_of_its_own() {
    let s = repo(FAN_IN);
    assert_eq!(s.apply(&[]).code, 0);
    let first = s.run_id();
    // An unrelated task: the workspace tasks are reused, moved onto the new base.
    s.write(&format!(
        "{FAN_IN}[tasks.other]\nrun = \"true\"\nsources = []\n"
    ));
    s.commit_all("another task");
    let again = s.apply(&[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.tasks("task_started"), ["other"]);
    let second = s.run_id();
    let prefix = format!("refs/ccluster/runs/{second}/");
    assert_eq!(
        refs_under(&s, &prefix),
        ["check", "edit/0", "edit/1", "edit/2", "join", "own"].map(|n| format!("{prefix}{n}"))
    );
    // The reused results sit on this run's base: they hold the edited clusterfile.
    for node in ["edit/2", "join"] {
        let shown = git(
            s.path(),
            &["show", &format!("{prefix}{node}:clusterfile.toml")],
        );
        assert!(shown.contains("[tasks.other]"), "{node}: {shown}");
    }
    assert_eq!(
        branches(&s),
        [
            format!("ccluster/{first}/join"),
            format!("ccluster/{second}/join"),
            "main".into()
        ]
    );
    let patch = s.command(&["export", "--patch", "-"]).output().unwrap();
    let patch = String::from_utf8_lossy(&patch.stdout);
    assert!(
        patch.contains("+mine") && !patch.contains("clusterfile"),
        "{patch}"
    );
}

/// A run whose result is published and whose last task fails, so it leaves a worktree.
const WITH_FAILURE: &str = r#"version = 1
[tasks.edit]
map = ["a", "b"]
workspace = "worktree"
run = "echo {{ item }} > {{ item }}.txt"

[tasks.join]
needs = ["edit"]
merge = { strategy = "git" }

[tasks.broken]
needs = ["join"]
run = "echo half > half.txt; exit 1"
"#;

/// The directories under `<state>/worktrees/<run>/`.
fn worktrees_of(s: &Sandbox, run: &str) -> Vec<String> {
    let dir = s.path().join(".ccluster/worktrees").join(run);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn gc_keep_collects_all_but_the_newest_runs_and_dry_run_names_the_same() {
    let s = repo(WITH_FAILURE);
    let mut runs = Vec::new();
    for _ in 0..3 {
        assert_eq!(s.apply(&["--fresh"]).code, 1);
        runs.push(s.run_id());
    }
    for run in &runs {
        assert_eq!(worktrees_of(&s, run), ["broken.1"], "{run}");
        assert_eq!(
            refs_under(&s, &format!("refs/ccluster/runs/{run}/")).len(),
            3
        );
    }
    let all = |s: &Sandbox| refs_under(s, "refs/");
    let before = all(&s);

    let dry = s
        .command(&["gc", "--keep", "1", "--dry-run"])
        .output()
        .unwrap();
    assert!(dry.status.success());
    let said = String::from_utf8_lossy(&dry.stdout).into_owned();
    assert_eq!(all(&s), before, "--dry-run removes nothing");
    for run in &runs {
        assert_eq!(worktrees_of(&s, run), ["broken.1"]);
    }
    // The two older runs' failed worktrees (and the pool's), and their three refs each.
    assert!(
        said.lines()
            .next()
            .unwrap()
            .ends_with(" worktrees and 6 refs of finished runs"),
        "{said}"
    );
    assert!(
        said.contains(&format!("kept run {} (one of the 1 most recent)", runs[2])),
        "{said}"
    );
    let listed: Vec<String> = said
        .lines()
        .filter_map(|l| l.strip_prefix("  would remove ref "))
        .map(str::to_string)
        .collect();
    assert!(
        !said.contains(&format!("would remove ref refs/ccluster/runs/{}/", runs[2]))
            && !said.contains(&format!("worktrees/{}/", runs[2])),
        "{said}"
    );
    for old in &runs[..2] {
        let path = s
            .path()
            .join(".ccluster/worktrees")
            .join(old)
            .join("broken.1");
        let shown = std::path::absolute(&path).unwrap();
        assert!(
            said.contains(&format!("  would remove worktree {}\n", shown.display())),
            "{said}"
        );
    }

    let done = s.command(&["gc", "--keep", "1"]).output().unwrap();
    assert!(done.status.success());
    let after = all(&s);
    // Exactly what the dry run listed is gone.
    let mut gone: Vec<String> = before
        .iter()
        .filter(|r| !after.contains(r))
        .cloned()
        .collect();
    gone.sort();
    let mut listed = listed;
    listed.sort();
    assert_eq!(gone, listed);
    for old in &runs[..2] {
        assert_eq!(
            refs_under(&s, &format!("refs/ccluster/runs/{old}/")),
            Vec::<String>::new()
        );
        assert_eq!(worktrees_of(&s, old), Vec::<String>::new());
    }
    // The newest run is untouched; every run keeps its result branch.
    assert_eq!(
        refs_under(&s, &format!("refs/ccluster/runs/{}/", runs[2])).len(),
        3
    );
    assert_eq!(worktrees_of(&s, &runs[2]), ["broken.1"]);
    assert_eq!(
        branches(&s),
        runs.iter()
            .map(|r| format!("ccluster/{r}/join"))
            .chain(["main".to_string()])
            .collect::<Vec<_>>()
    );
    // Its records are kept too: the artifacts of a collected run still list.
    let listing = s.command(&["artifacts", &runs[0]]).output().unwrap();
    assert!(listing.status.success());

    // `--keep` larger than the number of runs keeps everything; plain `gc` collects the last one.
    let none = s.command(&["gc", "--keep", "5"]).output().unwrap();
    assert!(
        String::from_utf8_lossy(&none.stdout).starts_with("removed 0 worktrees and 0 refs"),
        "{}",
        String::from_utf8_lossy(&none.stdout)
    );
    assert_eq!(
        refs_under(&s, &format!("refs/ccluster/runs/{}/", runs[2])).len(),
        3
    );
    assert!(s.command(&["gc"]).output().unwrap().status.success());
    assert_eq!(refs_under(&s, "refs/ccluster/runs/"), Vec::<String>::new());
    assert_eq!(worktrees_of(&s, &runs[2]), Vec::<String>::new());
}

#[test]
fn gc_keep_must_be_a_number() {
    let s = repo(WITH_FAILURE);
    for bad in ["-1", "x", ""] {
        let out = s.command(&["gc", "--keep", bad]).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }
}

/// Turns the last run into one made before the hidden refs: its nodes' refs become branches under
/// `refs/heads/ccluster/<run>/`, and its records say nothing of hidden refs and name branches by
/// their short names, as such runs recorded them.
fn make_legacy(s: &Sandbox, run: &str) {
    let hidden = format!("refs/ccluster/runs/{run}/");
    let mut script = String::new();
    for line in git(
        s.path(),
        &[
            "for-each-ref",
            "--format=%(refname) %(objectname)",
            "--",
            &hidden,
        ],
    )
    .lines()
    {
        let (name, commit) = line.split_once(' ').unwrap();
        let node = name.strip_prefix(&hidden).unwrap();
        script.push_str(&format!(
            "update refs/heads/ccluster/{run}/{node} {commit}\ndelete {name}\n"
        ));
    }
    let mut update = std::process::Command::new("git")
        .arg("-C")
        .arg(s.path())
        .args(["update-ref", "--stdin"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    update
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(update.wait().unwrap().success());
    let store = Store::open(&s.path().join(".ccluster")).unwrap();
    let mut record = store.run(run).unwrap().unwrap();
    record.task_refs = None;
    store.put_run(&record).unwrap();
    for t in store.tasks(run).unwrap() {
        for mut a in store.artifacts(run, &t.node).unwrap() {
            if let Some(b) = &a.branch {
                a.branch = Some(
                    b.strip_prefix("refs/ccluster/runs/")
                        .map_or(b.clone(), |rest| format!("ccluster/{rest}")),
                );
                store.put_artifacts(run, &t.node, &a).unwrap();
            }
        }
    }
    store.commit().unwrap();
}

#[test]
fn the_branches_of_runs_made_before_the_hidden_refs_are_read_and_collected() {
    let s = repo(WITH_FAILURE);
    assert_eq!(s.apply(&[]).code, 1);
    let run = s.run_id();
    make_legacy(&s, &run);
    assert_eq!(refs_under(&s, "refs/ccluster/runs/"), Vec::<String>::new());
    assert_eq!(
        branches(&s),
        ["edit/0", "edit/1", "join"]
            .map(|n| format!("ccluster/{run}/{n}"))
            .into_iter()
            .chain(["main".to_string()])
            .collect::<Vec<_>>()
    );
    // Its records read as they were written.
    let listing = s.command(&["artifacts", &run]).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(
        listing.contains(&format!("branch ccluster/{run}/edit/0")),
        "{listing}"
    );
    let report = s.command(&["report", "-o", "json"]).output().unwrap();
    let report: Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(report["result"]["branch"], format!("ccluster/{run}/join"));
    let edit0 = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "edit[0]")
        .unwrap();
    assert_eq!(edit0["ref"], format!("refs/heads/ccluster/{run}/edit/0"));
    let out = s.command(&["export", "--patch", "-"]).output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("+a"));

    // `gc` removes its per-node branches, as it always did, and keeps its result branch.
    let dry = s.command(&["gc", "--dry-run"]).output().unwrap();
    let said = String::from_utf8_lossy(&dry.stdout);
    for node in ["edit/0", "edit/1"] {
        assert!(
            said.contains(&format!("  would remove branch ccluster/{run}/{node}\n")),
            "{said}"
        );
    }
    assert!(
        said.contains(&format!("kept result branch ccluster/{run}/join")),
        "{said}"
    );
    assert!(s.command(&["gc"]).output().unwrap().status.success());
    assert_eq!(
        branches(&s),
        [format!("ccluster/{run}/join"), "main".into()]
    );
    assert_eq!(worktrees_of(&s, &run), Vec::<String>::new());
}

#[test]
fn an_interrupted_run_from_before_the_hidden_refs_loses_only_its_stray_branches() {
    let s = repo(WITH_FAILURE);
    assert_eq!(s.apply(&[]).code, 1);
    let run = s.run_id();
    make_legacy(&s, &run);
    // As if its process had died mid-run: still `running`, and a branch set for a node whose
    // success was never recorded.
    let head = git(s.path(), &["rev-parse", "HEAD"]);
    git(
        s.path(),
        &[
            "update-ref",
            &format!("refs/heads/ccluster/{run}/broken"),
            head.trim(),
        ],
    );
    {
        let store = Store::open(&s.path().join(".ccluster")).unwrap();
        let mut record = store.run(&run).unwrap().unwrap();
        record.state = ccluster_engine::store::RunState::Running;
        record.pid = dead_pid();
        store.put_run(&record).unwrap();
        store.commit().unwrap();
    }
    s.write("version = 1\n[tasks.t]\nrun = \"true\"\n");
    assert_eq!(s.apply(&[]).code, 0);
    // The stray branch is gone; those of nodes that succeeded stay, for `gc` to collect.
    assert_eq!(
        branches(&s),
        ["edit/0", "edit/1", "join"]
            .map(|n| format!("ccluster/{run}/{n}"))
            .into_iter()
            .chain(["main".to_string()])
            .collect::<Vec<_>>()
    );
}

/// A pid no process has: that of a child that has exited and been reaped.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// A git step runs in a process group of its own; once it exits, the sweep for a task's leftover
/// processes must not reap it before its waiter does (the step would fail with `No child
/// processes`, and the attempt with `setup_error`). Many short workspace tasks in parallel make
/// the two meet often.
#[test]
fn git_steps_are_never_reaped_by_the_sweep_for_leftover_processes() {
    let s = repo(
        r#"version = 1
[tasks.edit]
map = ["a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"]
workspace = "worktree"
run = "echo {{ item }} > {{ item }}.txt"
[tasks.join]
needs = ["edit"]
merge = { strategy = "git" }
"#,
    );
    for _ in 0..4 {
        let done = s.apply(&["--fresh", "--jobs", "4"]);
        let failed: Vec<String> = done
            .of("task_failed")
            .iter()
            .map(|f| format!("{}: {}", f["task"], f["message"]))
            .collect();
        assert!(failed.is_empty(), "{failed:?}");
        assert_eq!(done.code, 0, "{}", done.stderr);
    }
}
