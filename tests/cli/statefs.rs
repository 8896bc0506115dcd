//! The state directory on disk: who may read it (modes on a real run, the warning for an old
//! one), what `artifacts` and `copy` globs may reach (never the state itself, never through a
//! link), the Markdown report of hostile names and messages, and finished runs read while another
//! run holds the database.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::apply::Sandbox;
use crate::support::git;

/// A sandbox that is a git repository on `main` with one commit (`README` = "base").
fn repo(clusterfile: &str) -> Sandbox {
    Sandbox::in_repo(clusterfile, &[("README", "base\n")])
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
    // The loosest umask: the modes must come from ccluster, not from it.
    let mut apply = s.command(&["apply", "--output", "json"]);
    // SAFETY: umask is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        apply.pre_exec(|| {
            nix::sys::stat::umask(nix::sys::stat::Mode::empty());
            Ok(())
        });
    }
    let done = apply.output().unwrap();
    assert!(done.status.success(), "{done:?}");
    let state = s.path().join(".ccluster");
    assert_eq!(mode(&state), 0o700, "the state directory");
    assert_eq!(mode(&state.join("db")), 0o700, "sled's directory");
    let run = s.run_id();
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

/// Total size of the files under `dir`.
fn size(dir: &Path) -> u64 {
    tree(dir)
        .iter()
        .filter(|p| p.is_file())
        .map(|p| std::fs::symlink_metadata(p).unwrap().len())
        .sum()
}

#[test]
fn an_everything_artifact_glob_never_copies_the_state_into_itself() {
    // No workspace: globs are read in the main checkout, where the state is.
    let s = repo(
        "version = 1\n[tasks.keep]\nrun = \"echo kept > made.txt\"\nartifacts = [\"**/*\", \"**\", \".ccluster/**\", \"*/*/*\"]\n",
    );
    std::fs::write(s.path().join("big.bin"), vec![7u8; 1 << 20]).unwrap();
    let mut sizes = Vec::new();
    for _ in 0..4 {
        let done = s.apply(&["--fresh"]);
        assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
        sizes.push(size(&s.path().join(".ccluster")));
        let run = s.run_id();
        let kept = s
            .path()
            .join(".ccluster/runs")
            .join(&run)
            .join("artifacts/keep.1/files");
        let mut files: Vec<String> = tree(&kept)
            .iter()
            .filter(|p| p.is_file())
            .map(|p| p.strip_prefix(&kept).unwrap().display().to_string())
            .collect();
        files.sort();
        assert_eq!(
            files,
            [
                ".gitignore",
                "README",
                "big.bin",
                "clusterfile.toml",
                "made.txt"
            ]
        );
    }
    // Each run adds one copy of the tree (1 MiB), not a copy of everything before it.
    for pair in sizes.windows(2) {
        let grew = pair[1] - pair[0];
        assert!(grew < 3 << 19, "the state grew by {grew} bytes: {sizes:?}");
    }
}

#[test]
fn artifact_and_copy_globs_do_not_follow_links_out_of_the_workspace() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::create_dir(outside.path().join("dir")).unwrap();
    std::fs::write(outside.path().join("dir/secret.txt"), "top secret\n").unwrap();
    std::fs::write(outside.path().join("secret.txt"), "top secret\n").unwrap();
    let s = repo(&format!(
        r#"version = 1
[tasks.plain]
run = "true"
artifacts = ["**/*", "linked/*", "linked/secret.txt", "secret.txt"]

[tasks.edit]
workspace = "worktree"
copy = ["**/*"]
run = "test ! -e .ccluster && test ! -e linked && test ! -e secret.txt && ln -s {dir} made-link && echo ok"
artifacts = ["**/*", "made-link/*"]
"#,
        dir = outside.path().join("dir").display()
    ));
    std::os::unix::fs::symlink(outside.path().join("dir"), s.path().join("linked")).unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("secret.txt"),
        s.path().join("secret.txt"),
    )
    .unwrap();
    std::fs::write(s.path().join(".env"), "LOCAL=1\n").unwrap();
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    let state = s.path().join(".ccluster");
    for path in tree(&state) {
        if path.is_file() && !path.starts_with(state.join("db")) {
            let text = std::fs::read(&path).unwrap();
            assert!(
                !String::from_utf8_lossy(&text).contains("top secret"),
                "{} holds the secret",
                path.display()
            );
        }
    }
    let run = s.run_id();
    let files = |node: &str| {
        let dir = state
            .join("runs")
            .join(&run)
            .join("artifacts")
            .join(format!("{node}.1/files"));
        let mut files: Vec<String> = tree(&dir)
            .iter()
            .filter(|p| p.is_file())
            .map(|p| p.strip_prefix(&dir).unwrap().display().to_string())
            .collect();
        files.sort();
        files
    };
    assert_eq!(
        files("plain"),
        [".env", ".gitignore", "README", "clusterfile.toml"]
    );
    // `copy` brought `.env` (and the committed files), nothing through a link.
    assert_eq!(
        files("edit"),
        [".env", ".gitignore", "README", "clusterfile.toml"]
    );
}

#[test]
fn a_copy_into_a_link_committed_by_an_earlier_task_fails_instead_of_writing_outside() {
    let outside = tempfile::tempdir().unwrap();
    let s = repo(&format!(
        r#"version = 1
[tasks.plant]
workspace = "worktree"
run = "ln -s {dir} conf"

[tasks.use]
needs = ["plant"]
workspace = "worktree"
copy = ["conf/*"]
run = "true"
"#,
        dir = outside.path().display()
    ));
    std::fs::create_dir(s.path().join("conf")).unwrap();
    std::fs::write(s.path().join("conf/local.toml"), "x = 1\n").unwrap();
    std::fs::write(s.path().join(".gitignore"), ".ccluster/\nconf/\n").unwrap();
    git(s.path(), &["commit", "-qam", "ignore conf"]);
    let failed = s.apply(&[]);
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    let fail = failed.of("task_failed");
    assert_eq!(fail[0]["task"], "use");
    assert_eq!(fail[0]["class"], "setup_error");
    let message = fail[0]["message"].as_str().unwrap();
    assert!(message.contains("conf/local.toml"), "{message}");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
}

#[test]
fn the_markdown_report_shows_hostile_names_and_messages_as_written() {
    let s = repo(
        r#"version = 1
[workflow]
name = "report"

[tasks.edit]
workspace = "worktree"
run = "echo 1 > '<img src=x onerror=alert(1)>.md'; echo 2 > '*a*.txt'; echo 3 > 'a|b`c.txt'; echo 4 > '[l](javascript:x).md'"

[tasks.broken]
needs = ["edit"]
workspace = "worktree"
setup = "echo '<img src=x onerror=alert(1)> **bold** [x](y) ~~s~~'; exit 3"
run = "true"
"#,
    );
    let failed = s.apply(&[]);
    assert_eq!(failed.code, 1, "{}{}", failed.stdout, failed.stderr);
    let md = s.command(&["report"]).output().unwrap();
    assert!(md.status.success());
    let md = String::from_utf8_lossy(&md.stdout).into_owned();
    assert!(
        md.contains(r"\<img src=x onerror=alert(1)\> \*\*bold\*\* \[x\](y) \~\~s\~\~"),
        "{md}"
    );
    // (A file name cannot hold `</b>`: `/` separates directories.)
    for file in [
        "`<img src=x onerror=alert(1)>.md`",
        "`*a*.txt`",
        r"``a\|b`c.txt``",
        "`[l](javascript:x).md`",
    ] {
        assert!(md.contains(&format!("| {file} |")), "{file} in {md}");
    }
    let mut settings = insta::Settings::clone_current();
    settings.add_filter(r"\d{8}-\d{6}\.\d{3}-[0-9a-f]{4}", "[RUN]");
    settings.add_filter(r"\b[0-9a-f]{10}\b", "[SHA]");
    settings.add_filter(r"\d+\.\d+s\b", "[TIME]");
    settings.bind(|| insta::assert_snapshot!("report-hostile-names", md));
}

/// A run in progress whose task waits for the file `go`: let go and waited for if the test ends
/// before it does, so that no task outlives the test.
struct Running {
    child: std::process::Child,
    go: PathBuf,
}

impl Running {
    fn finish(&mut self) -> std::process::ExitStatus {
        std::fs::write(&self.go, "").unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = std::fs::write(&self.go, "");
            let _ = self.child.wait();
        }
    }
}

fn wait_until(what: &str, test: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !test() {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(30),
            "{what} did not happen"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn finished_runs_stay_readable_while_another_run_is_in_progress() {
    let s = repo(NOISY);
    let done = s.apply(&[]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    let old = s.run_id();
    let archive = s
        .path()
        .join(".ccluster/runs")
        .join(&old)
        .join("record.json");
    assert!(archive.exists(), "a finished run is archived");
    let read = |args: &[&str]| {
        let out = s.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let report = read(&["report", &old]);
    let json = read(&["report", &old, "--format", "json"]);
    let artifacts = read(&["artifacts", &old]);
    let logs = read(&["logs", &old]);
    let kept = read(&["artifacts", &old, "edit", "--get", "out/kept.txt"]);
    assert_eq!(kept, "kept\n");
    // As if an older ccluster had recorded it: the next writer archives it.
    std::fs::remove_file(&archive).unwrap();

    s.write("version = 1\n[tasks.wait]\nrun = \"touch started; while [ ! -e go ]; do sleep 0.05; done\"\n");
    let mut child = Running {
        child: s.spawn_apply(&[]),
        go: s.path().join("go"),
    };
    wait_until("the second run starts", || {
        s.path().join("started").exists()
    });
    assert!(archive.exists(), "the writer archived the older run");

    let runs = read(&["runs"]);
    assert!(runs.contains(&old), "{runs}");
    assert_eq!(
        runs.lines().filter(|l| l.contains("running")).count(),
        1,
        "{runs}"
    );
    assert_eq!(read(&["report", &old]), report);
    assert_eq!(read(&["report", &old, "--format", "json"]), json);
    assert_eq!(read(&["artifacts", &old]), artifacts);
    assert_eq!(read(&["logs", &old]), logs);
    assert_eq!(
        read(&["artifacts", &old, "edit", "--get", "out/kept.txt"]),
        "kept\n"
    );
    let status: serde_json::Value =
        serde_json::from_str(&read(&["status", &old, "--json"])).unwrap();
    assert_eq!(status["run"]["state"], "succeeded");
    // The run in progress is still refused.
    let live = s.command(&["report"]).output().unwrap();
    assert_eq!(live.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&live.stderr).contains("still in progress"));

    assert!(child.finish().success());
}
