//! The state directory on disk: who may read it (modes on a real run, the warning for an old
//! one).
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::apply::Sandbox;
use crate::support::git;

/// A sandbox that is a git repository with one commit, its state in `.ccluster/` inside it.
fn repo(clusterfile: &str) -> Sandbox {
    let s = Sandbox::new(clusterfile);
    std::fs::write(s.path().join("README"), "base\n").unwrap();
    std::fs::write(s.path().join(".gitignore"), ".ccluster/\n").unwrap();
    git(s.path(), &["init", "-q", "-b", "main"]);
    git(s.path(), &["add", "-A"]);
    git(s.path(), &["commit", "-q", "-m", "init"]);
    s
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Every path under `dir`, links not followed.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            if entry.file_type().unwrap().is_dir() {
                todo.push(entry.path());
            }
            out.push(entry.path());
        }
    }
    out.sort();
    out
}

fn run_id(s: &Sandbox) -> String {
    s.status()["run"]["id"].as_str().unwrap().to_string()
}

const NOISY: &str = r#"version = 1
[workflow]
name = "noisy"

[tasks.edit]
workspace = "worktree"
setup = "echo preparing"
run = "echo secret-output; echo oops >&2; echo changed > new.txt; mkdir -p out; echo kept > out/kept.txt"
artifacts = ["out/*"]

[tasks.after]
needs = ["edit"]
run = "echo done"
"#;

#[test]
fn a_real_run_leaves_nothing_other_users_can_read() {
    let s = repo(NOISY);
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    let state = s.path().join(".ccluster");
    assert_eq!(mode(&state), 0o700, "the state directory");
    assert_eq!(mode(&state.join("db")), 0o700, "sled's directory");
    let run = run_id(&s);
    let logs = state.join("runs").join(&run).join("logs");
    for log in [
        "edit.1.out",
        "edit.1.err",
        "edit.1.setup.out",
        "after.1.out",
    ] {
        assert_eq!(mode(&logs.join(log)), 0o600, "{log}");
    }
    let artifacts = state
        .join("runs")
        .join(&run)
        .join("artifacts")
        .join("edit.1");
    assert_eq!(mode(&artifacts.join("patch.diff")), 0o600);
    assert_eq!(mode(&artifacts.join("files/out/kept.txt")), 0o600);
    assert_eq!(mode(&state.join("lock")), 0o600);

    // Everything ccluster made: directories 0700, files 0600. Not checked one by one: sled's own
    // files (behind `db/`, 0700) and the files of workspaces (the user's, with git's modes).
    let mut checked = 0;
    for path in tree(&state) {
        let rel = path.strip_prefix(&state).unwrap();
        let parts: Vec<_> = rel.iter().map(|p| p.to_string_lossy()).collect();
        let in_sled = parts[0] == "db" && parts.len() > 1;
        let in_workspace = parts[0] == "worktrees" && parts.len() > 2;
        if in_sled || in_workspace {
            continue;
        }
        let expected = if path.is_dir() { 0o700 } else { 0o600 };
        assert_eq!(mode(&path), expected, "{}", rel.display());
        checked += 1;
    }
    assert!(checked > 10, "only {checked} paths checked");
    // The workspaces' own directories (each run's, the pool) too.
    for dir in tree(&state.join("worktrees"))
        .iter()
        .filter(|p| p.strip_prefix(&state).unwrap().iter().count() == 2)
    {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
}

#[test]
fn a_state_directory_made_with_a_user_option_is_private_too() {
    let s = Sandbox::new("version = 1\n[tasks.hello]\nrun = \"echo hi\"\n");
    let out = s
        .command(&["apply", "--state-dir", "nested/dirs/state"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    for dir in ["nested", "nested/dirs", "nested/dirs/state"] {
        assert_eq!(mode(&s.path().join(dir)), 0o700, "{dir}");
    }
}

#[test]
fn an_old_world_readable_state_is_tightened_with_a_warning() {
    let s = Sandbox::new("version = 1\n[tasks.hello]\nrun = \"echo hi\"\n");
    assert_eq!(s.apply(&[]).code, 0);
    let state = s.path().join(".ccluster");
    // What an older ccluster left: the process's default modes.
    set_mode(&state, 0o755);

    // A reader says so and changes nothing.
    let runs = s.command(&["runs"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&runs.stderr);
    assert!(
        stderr.contains(
            "warning: the state directory .ccluster is readable by other users (mode 0755)"
        ),
        "{stderr}"
    );
    assert_eq!(mode(&state), 0o755);

    // The next run narrows it, and says so.
    let again = s.apply(&[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert!(
        again.stderr.contains(
            "warning: the state directory .ccluster was readable by other users (mode 0755); its mode is now 0700"
        ),
        "{}",
        again.stderr
    );
    assert_eq!(mode(&state), 0o700);
    // Then nothing more to say.
    let quiet = s.apply(&[]);
    assert!(!quiet.stderr.contains("warning"), "{}", quiet.stderr);

    // Group access alone counts too.
    set_mode(&state, 0o750);
    let group = s.apply(&[]);
    assert!(group.stderr.contains("(mode 0750)"), "{}", group.stderr);
    assert_eq!(mode(&state), 0o700);
}

#[test]
fn a_shared_directory_given_as_state_is_warned_about_but_not_changed() {
    let s = Sandbox::new("version = 1\n[tasks.hello]\nrun = \"echo hi\"\n");
    let shared = s.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("notes.txt"), "someone else's\n").unwrap();
    set_mode(&shared, 0o775);
    let out = s
        .command(&["apply", "--state-dir", "shared"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr
            .contains("warning: the state directory shared is readable by other users (mode 0775)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("help: it holds files that are not ccluster's"),
        "{stderr}"
    );
    assert_eq!(mode(&shared), 0o775);
    // What ccluster made inside is private all the same.
    assert_eq!(mode(&shared.join("runs")), 0o700);
    assert_eq!(mode(&shared.join("db")), 0o700);
}
