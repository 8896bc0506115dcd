//! `state export` / `state import` with the real binary: a run interrupted on one clone resumes in
//! a fresh clone in another directory without running again what finished, and reaches the same
//! result commit; damaged, truncated, foreign or unplaceable archives are refused with nothing
//! changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::apply::{Applied, Sandbox};
use crate::support::{claude_bin, git, task};

/// Shell tasks and a rehearsed agent in worktrees; `flaky` fails until `marker` exists (outside
/// the repository, so its command is the same in every clone).
fn clusterfile(marker: &Path) -> String {
    format!(
        r#"version = 1
[workflow]
name = "resume-anywhere"

[tasks.a]
workspace = "worktree"
run = "echo a > a.txt"

[tasks.b]
workspace = "worktree"
run = "echo b > b.txt"

[tasks.note]
prompt = "Write a note about the project"

[tasks.flaky]
workspace = "worktree"
needs = ["a"]
run = "test -f '{}' && echo f > f.txt"

[tasks.join]
needs = ["flaky", "b", "note"]
merge = {{ strategy = "git" }}
"#,
        marker.display()
    )
}

fn rehearse(s: &Sandbox) -> Applied {
    Applied::from_output(
        s.command(&[
            "apply",
            "--rehearse",
            "--output",
            "json",
            "--grace-period",
            "1s",
        ])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .output()
        .unwrap(),
    )
}

/// A fresh clone of `from`'s repository in a directory of its own (no refs of ccluster's, no state).
fn clone(from: &Sandbox) -> Sandbox {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("git")
        .args(["clone", "-q"])
        .arg(from.path())
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Sandbox { dir }
}

fn ccluster(s: &Sandbox, args: &[&str]) -> Applied {
    Applied::from_output(s.command(args).output().unwrap())
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Every file under `dir` with its bytes (nothing when `dir` does not exist).
fn tree_bytes(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    crate::support::files_under(dir)
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

/// What an import could change: the state directory's files and the repository's refs.
fn footprint(s: &Sandbox) -> (BTreeMap<PathBuf, Vec<u8>>, String, bool) {
    (
        tree_bytes(&s.path().join(".ccluster")),
        git(s.path(), &["for-each-ref"]),
        s.path().join(".ccluster").exists(),
    )
}

fn archive_entries(file: &Path) -> Vec<String> {
    let out = Command::new("tar").arg("tzf").arg(file).output().unwrap();
    assert!(
        out.status.success(),
        "tar tzf: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Run 1 fails on `flaky` in clone 1 and is exported; clone 2 imports it and resumes: only
/// `flaky` and `join` run. Its run, exported in turn and imported in clone 3, is all cached there
/// and its result branch is the same commit.
#[test]
fn state_export_import_resumes_in_a_fresh_clone_without_rerunning_finished_work() {
    let markers = tempfile::tempdir().unwrap();
    let marker = markers.path().join("flaky-ok");
    let first = Sandbox::in_repo(&clusterfile(&marker), &[]);
    let failed = rehearse(&first);
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    assert_eq!(sorted(failed.tasks("task_succeeded")), ["a", "b", "note"]);
    assert_eq!(failed.tasks("task_failed"), ["flaky"]);
    let run1 = first.run_id();

    // A worker's credentials copy must never travel.
    let worker = first
        .path()
        .join(format!(".ccluster/runs/{run1}/workers/note.1/config"));
    std::fs::create_dir_all(&worker).unwrap();
    std::fs::write(
        worker.join(".credentials.json"),
        "{\"secret\":\"do-not-export\"}",
    )
    .unwrap();

    let archives = tempfile::tempdir().unwrap();
    let archive1 = archives.path().join("run1.tgz");
    let exported = ccluster(
        &first,
        &["state", "export", "latest", archive1.to_str().unwrap()],
    );
    assert_eq!(exported.code, 0, "{}", exported.stderr);
    let entries = archive_entries(&archive1);
    assert_eq!(entries[0], "manifest.json", "{entries:?}");
    assert!(entries.contains(&"refs.bundle".to_string()), "{entries:?}");
    assert!(
        entries.iter().any(|e| e.starts_with("run/logs/note.1")),
        "{entries:?}"
    );
    assert!(
        !entries.iter().any(|e| e.ends_with(".credentials.json")),
        "credentials exported: {entries:?}"
    );
    let raw = Command::new("sh")
        .arg("-c")
        .arg(format!("gzip -dc '{}'", archive1.display()))
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&raw.stdout).contains("do-not-export"));

    // Clone 2, elsewhere: import, then apply with `flaky` able to pass.
    let second = clone(&first);
    let imported = ccluster(&second, &["state", "import", archive1.to_str().unwrap()]);
    assert_eq!(imported.code, 0, "{}", imported.stderr);
    assert!(
        imported.stderr.contains(&format!("imported run {run1}")),
        "{}",
        imported.stderr
    );
    assert!(!imported.stderr.contains("differs"), "{}", imported.stderr);
    assert!(!git(second.path(), &["for-each-ref", "refs/ccluster/keep/"]).is_empty());
    std::fs::write(&marker, "").unwrap();
    let resumed = rehearse(&second);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(sorted(resumed.tasks("task_started")), ["flaky", "join"]);
    assert_eq!(sorted(resumed.tasks("task_cached")), ["a", "b", "note"]);
    let status = second.status();
    let run2 = status["run"]["id"].as_str().unwrap().to_string();
    for node in ["a", "b", "note"] {
        assert_eq!(task(&status, node)["state"], "cached");
        assert_eq!(task(&status, node)["attempts"], 0);
        assert_eq!(task(&status, node)["cached_from"], run1.as_str());
    }
    assert_eq!(task(&status, "flaky")["attempts"], 1);
    let result2 = git(
        second.path(),
        &["rev-parse", &format!("ccluster/{run2}/join")],
    );

    // Clone 3: the finished run moves, and nothing runs at all.
    let archive2 = archives.path().join("run2.tgz");
    let exported = ccluster(
        &second,
        &["state", "export", &run2, archive2.to_str().unwrap()],
    );
    assert_eq!(exported.code, 0, "{}", exported.stderr);
    let third = clone(&first);
    let imported = ccluster(&third, &["state", "import", archive2.to_str().unwrap()]);
    assert_eq!(imported.code, 0, "{}", imported.stderr);
    // The imported run reads as it did where it ran.
    let report = ccluster(&third, &["report", &run2]);
    assert_eq!(report.code, 0, "{}", report.stderr);
    assert!(report.stdout.contains("succeeded"), "{}", report.stdout);
    let again = rehearse(&third);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(again.tasks("task_started").is_empty(), "{}", again.stdout);
    assert_eq!(again.tasks("task_cached").len(), 5);
    let run3 = third.run_id();
    let result3 = git(
        third.path(),
        &["rev-parse", &format!("ccluster/{run3}/join")],
    );
    assert_eq!(result2, result3, "the result branch is the same commit");
}

/// Refusals: each leaves the target's state directory and refs byte for byte as they were.
#[test]
fn state_import_refuses_damaged_foreign_and_unplaceable_archives_changing_nothing() {
    let first = Sandbox::in_repo(
        r#"version = 1
[workflow]
name = "refusals"
[tasks.edit]
workspace = "worktree"
run = "echo edited > edited.txt"
"#,
        &[],
    );
    assert_eq!(first.apply(&[]).code, 0);
    let archives = tempfile::tempdir().unwrap();
    let good = archives.path().join("good.tgz");
    let exported = ccluster(
        &first,
        &["state", "export", "latest", good.to_str().unwrap()],
    );
    assert_eq!(exported.code, 0, "{}", exported.stderr);
    let bytes = std::fs::read(&good).unwrap();

    // A target that has state of its own already, and one that has none.
    let with_state = clone(&first);
    assert_eq!(with_state.apply(&[]).code, 0);
    let without_state = clone(&first);

    let write = |name: &str, data: &[u8]| {
        let path = archives.path().join(name);
        std::fs::write(&path, data).unwrap();
        path
    };
    let mut flipped = bytes.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0x40;
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            write("truncated.tgz", &bytes[..bytes.len() * 2 / 3]),
            "is damaged",
        ),
        (write("flipped.tgz", &flipped), "is damaged"),
        (
            write("garbage.tgz", b"not an archive at all"),
            "is not a ccluster state archive",
        ),
        (
            repack(&good, archives.path(), "newer.tgz", |m| {
                m["version"] = 99.into()
            }),
            "format version 99",
        ),
        (
            repack_tampered(&good, archives.path()),
            "does not match its SHA-256",
        ),
    ];
    for target in [&with_state, &without_state] {
        for (file, message) in &cases {
            let before = footprint(target);
            let out = ccluster(target, &["state", "import", file.to_str().unwrap()]);
            assert_eq!(out.code, 2, "{}: {}", file.display(), out.stderr);
            assert!(
                out.stderr.contains(message),
                "{}: {}",
                file.display(),
                out.stderr
            );
            assert!(out.stderr.contains("nothing was changed"), "{}", out.stderr);
            assert!(
                before == footprint(target),
                "{} changed the target",
                file.display()
            );
        }
    }

    // A path that is no archive at all.
    let missing = ccluster(&without_state, &["state", "import", "no-such.tgz"]);
    assert_eq!(missing.code, 2, "{}", missing.stderr);
    assert!(
        missing
            .stderr
            .contains("cannot read the archive `no-such.tgz`"),
        "{}",
        missing.stderr
    );
    assert!(!without_state.path().join(".ccluster").exists());

    // A clone without the commits the bundle builds on (an unrelated repository).
    let unrelated = Sandbox::in_repo("version = 1\n[workflow]\nname = \"other\"\n", &[]);
    let before = footprint(&unrelated);
    let out = ccluster(&unrelated, &["state", "import", good.to_str().unwrap()]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("base commit"), "{}", out.stderr);
    assert!(before == footprint(&unrelated));

    // The same run twice: refused unless --force.
    let ok = ccluster(&without_state, &["state", "import", good.to_str().unwrap()]);
    assert_eq!(ok.code, 0, "{}", ok.stderr);
    let before = footprint(&without_state);
    let twice = ccluster(&without_state, &["state", "import", good.to_str().unwrap()]);
    assert_eq!(twice.code, 2);
    assert!(twice.stderr.contains("already has run"), "{}", twice.stderr);
    assert!(before == footprint(&without_state));
    // An edited clusterfile is worth a note: what its edit changed will run again.
    let edited = without_state
        .read("clusterfile.toml")
        .replace("edited", "changed");
    without_state.write(&edited);
    let forced = ccluster(
        &without_state,
        &["state", "import", "--force", good.to_str().unwrap()],
    );
    assert_eq!(forced.code, 0, "{}", forced.stderr);
    assert!(forced.stderr.contains("replacing it"), "{}", forced.stderr);
    assert!(
        forced
            .stderr
            .contains("note: clusterfile.toml differs from the text run"),
        "{}",
        forced.stderr
    );
    let status = without_state.status();
    assert_eq!(task(&status, "edit")["state"], "succeeded");
}

/// An import while an `apply` drives the state is refused: the importer never writes beside a
/// running writer.
#[test]
fn state_import_is_refused_while_a_run_holds_the_state() {
    let first = Sandbox::in_repo(
        "version = 1\n[workflow]\nname = \"busy\"\n[tasks.quick]\nrun = \"true\"\n",
        &[],
    );
    assert_eq!(first.apply(&[]).code, 0);
    let archive = first.path().join("quick.tgz");
    let exported = ccluster(
        &first,
        &["state", "export", "latest", archive.to_str().unwrap()],
    );
    assert_eq!(exported.code, 0, "{}", exported.stderr);

    let busy = clone(&first);
    let signal = busy.path().join("started");
    busy.write(&format!(
        "version = 1\n[workflow]\nname = \"busy\"\n[tasks.slow]\nrun = \"touch '{}'; sleep 30\"\n",
        signal.display()
    ));
    let mut child = busy.spawn_apply(&[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !signal.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the slow task never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = ccluster(&busy, &["state", "import", archive.to_str().unwrap()]);
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let _ = child.wait();
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("another ccluster process"),
        "{}",
        out.stderr
    );
    assert!(!busy
        .path()
        .join(".ccluster/runs")
        .join(archive_run(&archive))
        .exists());
}

/// The run id an archive's manifest names.
fn archive_run(file: &Path) -> String {
    manifest(file)["run"].as_str().unwrap().to_string()
}

fn manifest(file: &Path) -> serde_json::Value {
    let out = Command::new("tar")
        .arg("xzOf")
        .arg(file)
        .arg("manifest.json")
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Unpacks `good`, lets `edit` change its manifest, packs it again as a well-formed tar.gz.
fn repack(good: &Path, dir: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let work = dir.join(format!("{name}.d"));
    std::fs::create_dir_all(&work).unwrap();
    run_tar(&work, &["xzf", good.to_str().unwrap()]);
    let mut m = manifest(good);
    edit(&mut m);
    std::fs::write(work.join("manifest.json"), serde_json::to_vec(&m).unwrap()).unwrap();
    let out = dir.join(name);
    let mut args = vec!["czf".to_string(), out.display().to_string()];
    for entry in std::fs::read_dir(&work).unwrap() {
        args.push(entry.unwrap().file_name().to_string_lossy().into_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tar(&work, &args);
    out
}

/// A well-formed archive whose records were changed after the manifest was written.
fn repack_tampered(good: &Path, dir: &Path) -> PathBuf {
    let out = repack(good, dir, "tampered.tgz", |_| {});
    let work = dir.join("tampered.tgz.d");
    let records = work.join("records.json");
    let text = std::fs::read_to_string(&records).unwrap();
    std::fs::write(&records, text.replacen("succeeded", "failed   ", 1)).unwrap();
    let mut args = vec!["czf".to_string(), out.display().to_string()];
    for entry in std::fs::read_dir(&work).unwrap() {
        args.push(entry.unwrap().file_name().to_string_lossy().into_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tar(&work, &args);
    out
}

fn run_tar(dir: &Path, args: &[&str]) {
    let out = Command::new("tar")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tar {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A run killed with SIGKILL mid-way (its record still says `running`) moves too: the next
/// `apply` in the other clone marks it interrupted, keeps what succeeded and runs the rest once.
#[test]
fn state_export_of_a_killed_run_resumes_in_another_clone() {
    let markers = tempfile::tempdir().unwrap();
    let marker = markers.path().join("fast");
    let started = markers.path().join("started");
    let first = Sandbox::in_repo(
        &format!(
            r#"version = 1
[workflow]
name = "killed"

[tasks.a]
workspace = "worktree"
run = "echo a > a.txt"

[tasks.slow]
workspace = "worktree"
needs = ["a"]
run = "test -f '{}' || {{ touch '{}'; sleep 60; }}; echo s > s.txt"
"#,
            marker.display(),
            started.display()
        ),
        &[],
    );
    let mut child = first.spawn_apply(&[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !started.exists() {
        assert!(std::time::Instant::now() < deadline, "`slow` never started");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    let _ = child.wait();

    // The killed process's keeper lets go of the state a moment later.
    let archive = markers.path().join("killed.tgz");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let exported = loop {
        let out = ccluster(
            &first,
            &["state", "export", "latest", archive.to_str().unwrap()],
        );
        if out.code == 0 || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    assert_eq!(exported.code, 0, "{}", exported.stderr);
    let run1 = archive_run(&archive);
    assert_eq!(
        first.status()["run"]["state"],
        "running",
        "recorded as the kill left it"
    );

    let second = clone(&first);
    let imported = ccluster(&second, &["state", "import", archive.to_str().unwrap()]);
    assert_eq!(imported.code, 0, "{}", imported.stderr);
    std::fs::write(&marker, "").unwrap();
    let resumed = second.apply(&[]);
    assert_eq!(resumed.code, 0, "{}", resumed.stderr);
    assert_eq!(resumed.tasks("task_cached"), ["a"]);
    assert_eq!(resumed.tasks("task_started"), ["slow"]);
    let runs = ccluster(&second, &["runs", "-o", "json"]);
    assert!(runs.code == 0, "{}", runs.stderr);
    let listed: serde_json::Value = serde_json::from_str(&runs.stdout).unwrap();
    let killed = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == run1.as_str())
        .unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(killed["state"], "interrupted");
}
