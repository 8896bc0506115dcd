//! Templates from untrusted clusterfiles and repositories: `git+` specs that try to reach git as
//! options or transports, `validate` and `plan` that fetch nothing unless asked, path templates
//! confined to the repository, files that are not templates never quoted, and template task ids
//! checked by the rule of the clusterfile's.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::apply::Sandbox;
use crate::support::git;

/// A secret in the environment of every `ccluster` these tests run: it must never be printed.
const SECRET: &str = "s3cr3t-7f1c9a-token";

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs `ccluster ARGS` in the sandbox with the secret in its environment; fails the test if it
/// does not finish within 60 s (a FIFO read would block forever).
fn run(s: &Sandbox, args: &[&str]) -> Output {
    let mut child = s
        .command(args)
        .env("NO_COLOR", "1")
        .env("CCLUSTER_TEST_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("`ccluster {}` hung", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !all.contains(SECRET),
        "`ccluster {}` printed the secret:\n{all}",
        args.join(" ")
    );
    out
}

/// A git repository holding one template, `tpl.toml`, on `main`.
fn template_repo() -> tempfile::TempDir {
    let lib = tempfile::tempdir().unwrap();
    git(lib.path(), &["init", "-q", "-b", "main"]);
    std::fs::write(
        lib.path().join("tpl.toml"),
        "version = 1\n[tasks.say]\nrun = \"echo from the template\"\n",
    )
    .unwrap();
    git(lib.path(), &["add", "-A"]);
    git(lib.path(), &["commit", "-qm", "tpl"]);
    lib
}

/// A sandbox that is a git repository with a commit, whose clusterfile is `clusterfile`.
fn repo_sandbox(clusterfile: &str) -> Sandbox {
    Sandbox::in_repo(clusterfile, &[])
}

/// A TOML basic string holding `s`.
fn toml_string(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

#[test]
fn git_specs_cannot_pass_options_or_pick_transports() {
    let lib = template_repo();
    let marks = tempfile::tempdir().unwrap();
    let mark = marks.path().join("ran");
    let m = mark.display().to_string();
    let url = format!("file://{}", lib.path().display());
    // Each would run `touch <mark>` if it reached git as an option or a transport.
    let specs = [
        // The issue's: an option in the URL position (the ref `.` is the cache repository).
        format!("git+--upload-pack=touch {m};#.:tpl.toml"),
        format!("git+--upload-pack=touch {m};#main:tpl.toml"),
        format!("git+-u touch {m};#.:tpl.toml"),
        format!("git+--config=core.sshCommand=touch {m};#main:tpl.toml"),
        format!("git+-c core.sshCommand=touch {m};#main:tpl.toml"),
        // The ref position, and a ref smuggled after a newline.
        format!("git+{url}#--upload-pack=touch {m};:tpl.toml"),
        format!("git+{url}#-u touch {m};:tpl.toml"),
        format!("git+{url}#main\n--upload-pack=touch {m};:tpl.toml"),
        format!("git+{url}#+main:tpl.toml"),
        format!("git+{url}#main@{{1}}:tpl.toml"),
        format!("git+{url}#ma..in:tpl.toml"),
        // The path position.
        format!("git+{url}#main:--output={m}"),
        format!("git+{url}#main:../tpl.toml"),
        format!("git+{url}#main:/etc/passwd"),
        // Transports that run programs, and hosts ssh would read as options.
        format!("git+ext::sh -c touch% {m}#main:tpl.toml"),
        format!("git+ext::sh -c 'touch {m}'#main:tpl.toml"),
        "git+fd::0#main:tpl.toml".to_string(),
        "git+fd::3,4#main:tpl.toml".to_string(),
        format!("git+ssh://-oProxyCommand=touch%20{m}/x#main:tpl.toml"),
        format!("git+ssh://%2DoProxyCommand=touch%20{m}/x#main:tpl.toml"),
        format!("git+-oProxyCommand=touch {m}:x#main:tpl.toml"),
        format!("git+{url}\n--upload-pack=touch {m};#main:tpl.toml"),
        // Schemes that are not allowed.
        "git+http://127.0.0.1:9/flows#main:tpl.toml".to_string(),
        "git+git://127.0.0.1:9/flows#main:tpl.toml".to_string(),
        "git+relative/flows#main:tpl.toml".to_string(),
    ];
    for spec in &specs {
        let s = Sandbox::new(&format!(
            "version = 1\n[tasks.t]\nuse = {}\n",
            toml_string(spec)
        ));
        // Every command that compiles: each refuses the spec with exit code 2, before git runs.
        for args in [
            &["validate"][..],
            &["validate", "--fetch"],
            &["plan", "--fetch"],
            &["update"],
            &["apply"],
        ] {
            let out = run(&s, args);
            let err = stderr(&out);
            assert!(
                !mark.exists(),
                "{spec:?} ran a command with {args:?}: {err}"
            );
            assert_eq!(out.status.code(), Some(2), "{spec:?} {args:?}: {err}");
            assert!(
                err.contains("error[template-source]: clusterfile.toml:3:7")
                    && err.contains("is not allowed"),
                "{spec:?} {args:?}: {err}"
            );
        }
        assert!(
            !s.path().join(".ccluster").exists(),
            "{spec:?}: nothing was fetched or run"
        );
    }

    // The same from inside a template: a path template that uses a hostile spec.
    let s = Sandbox::new("version = 1\n[tasks.t]\nuse = \"./lib/outer.toml\"\n");
    s.file(
        "lib/outer.toml",
        &format!(
            "version = 1\n[tasks.inner]\nuse = {}\n",
            toml_string(&format!("git+--upload-pack=touch {m};#.:tpl.toml"))
        ),
    )
    .unwrap();
    let out = run(&s, &["validate", "--fetch"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("error[template-source]: lib/outer.toml:3:7"),
        "{}",
        stderr(&out)
    );
    assert!(!mark.exists());
}

#[test]
fn a_lock_file_pin_must_be_a_commit_id() {
    let lib = template_repo();
    let spec = format!("git+file://{}#main:tpl.toml", lib.path().display());
    let s = Sandbox::new(&format!("version = 1\n[tasks.t]\nuse = \"{spec}\"\n"));
    let marks = tempfile::tempdir().unwrap();
    let mark = marks.path().join("ran");
    std::fs::write(
        s.path().join("clusterfile.lock"),
        format!(
            "[git.{}]\ncommit = \"--upload-pack=touch {};\"\n",
            toml_string(&spec),
            mark.display()
        ),
    )
    .unwrap();
    for args in [&["apply"][..], &["validate", "--fetch"], &["plan"]] {
        let out = run(&s, args);
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("which is not a full commit id"),
            "{}",
            stderr(&out)
        );
    }
    assert!(!mark.exists());
}

#[test]
fn validate_and_plan_fetch_nothing_unless_asked() {
    let lib = template_repo();
    let spec = format!("git+file://{}#main:tpl.toml", lib.path().display());
    let s = Sandbox::new(&format!("version = 1\n[tasks.t]\nuse = \"{spec}\"\n"));
    let lock = s.path().join("clusterfile.lock");
    let cache = s.path().join(".ccluster/templates");

    // Not pinned: reported, nothing fetched, nothing pinned.
    for args in [&["validate"][..], &["plan"]] {
        let out = run(&s, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("it is not pinned in clusterfile.lock yet, and this command fetches nothing unless asked to"),
            "{err}"
        );
        assert!(
            err.contains("help: run `ccluster update` to fetch and pin it, or pass `--fetch`"),
            "{err}"
        );
        assert!(!lock.exists() && !cache.exists(), "{args:?} fetched");
    }

    // `--fetch` fetches and pins.
    let out = run(&s, &["validate", "--fetch"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let pinned = git(lib.path(), &["rev-parse", "HEAD"]);
    assert!(std::fs::read_to_string(&lock)
        .unwrap()
        .contains(pinned.trim()));

    // Pinned and cached: no fetch needed, even with the repository gone.
    let moved = lib.path().with_extension("moved");
    std::fs::rename(lib.path(), &moved).unwrap();
    for args in [&["validate"][..], &["plan"]] {
        let out = run(&s, args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }

    // Pinned but not cached: reported, and `plan --fetch` fetches it again.
    std::fs::remove_dir_all(&cache).unwrap();
    let out = run(&s, &["plan"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out)
            .contains("is not in the cache, and this command fetches nothing unless asked to"),
        "{}",
        stderr(&out)
    );
    assert!(!cache.exists());
    std::fs::rename(&moved, lib.path()).unwrap();
    let out = run(&s, &["plan", "--fetch"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("echo from the template"));
}

#[test]
fn path_templates_stay_inside_the_repository() {
    // Outside the repository: a valid template, so only the confinement can refuse it.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        outside.path().join("tpl.toml"),
        format!("version = 1\n[tasks.leak]\nrun = \"echo {SECRET}\"\n"),
    )
    .unwrap();
    let s = repo_sandbox("version = 1\n[tasks.ok]\nrun = \"true\"\n");
    s.file(
        "lib/inside.toml",
        "version = 1\n[tasks.step]\nrun = \"echo inside\"\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("tpl.toml"),
        s.path().join("lib/escape.toml"),
    )
    .unwrap();
    std::os::unix::fs::symlink("inside.toml", s.path().join("lib/link.toml")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", s.path().join("lib/zero.toml")).unwrap();
    let fifo = s.path().join("lib/fifo.toml");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    std::fs::create_dir_all(s.path().join("lib/dir.toml")).unwrap();
    let relative_outside = format!(
        "../{}/tpl.toml",
        outside.path().file_name().unwrap().to_string_lossy()
    );

    let refused = [
        ("/proc/self/environ", "is outside the repository"),
        ("/etc/passwd", "is outside the repository"),
        ("/dev/zero", "is outside the repository"),
        (relative_outside.as_str(), "is outside the repository"),
        ("./lib/escape.toml", "is outside the repository"),
        ("./lib/zero.toml", "is outside the repository"),
        (
            &*format!("{}/tpl.toml", outside.path().display()),
            "is outside the repository",
        ),
        ("./lib/fifo.toml", "is not a regular file"),
        ("./lib/dir.toml", "is not a regular file"),
    ];
    for (spec, why) in refused {
        s.write(&format!(
            "version = 1\n[tasks.t]\nuse = {}\n",
            toml_string(spec)
        ));
        for args in [&["validate"][..], &["apply"]] {
            let out = run(&s, args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{spec} {args:?}: {err}");
            assert!(
                err.contains("error[template-source]: clusterfile.toml:3:7") && err.contains(why),
                "{spec} {args:?}: {err}"
            );
        }
    }

    // Inside the repository: a link that stays inside, and a clusterfile in a subdirectory using
    // a template above it (the repository is the limit, not the clusterfile's directory).
    s.write("version = 1\n[tasks.t]\nuse = \"./lib/link.toml\"\n");
    let out = run(&s, &["plan"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    s.file(
        "sub/clusterfile.toml",
        "version = 1\n[tasks.t]\nuse = \"../lib/inside.toml\"\n",
    )
    .unwrap();
    let out = run(&s, &["plan", "sub/clusterfile.toml"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("echo inside"));
}

#[test]
fn outside_a_repository_the_clusterfile_directory_is_the_limit() {
    let parent = tempfile::tempdir().unwrap();
    std::fs::write(
        parent.path().join("tpl.toml"),
        "version = 1\n[tasks.step]\nrun = \"true\"\n",
    )
    .unwrap();
    let dir = parent.path().join("project");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("clusterfile.toml"),
        "version = 1\n[tasks.t]\nuse = \"../tpl.toml\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ccluster"))
        .arg("validate")
        .current_dir(&dir)
        .env("NO_COLOR", "1")
        // No repository above the temporary directory is looked for.
        .env("GIT_CEILING_DIRECTORIES", parent.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is outside the repository"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_file_that_is_not_a_template_is_never_quoted() {
    let s = repo_sandbox("version = 1\n[tasks.ok]\nrun = \"true\"\n");
    // Valid TOML without `version`, invalid TOML, invalid KDL, not UTF-8: each holds the secret.
    s.file(".env", &format!("TOKEN = \"{SECRET}\"\n")).unwrap();
    s.file("secrets.toml", &format!("token {SECRET}\n"))
        .unwrap();
    s.file("notes.kdl", &format!("token \"{SECRET}\n")).unwrap();
    s.file("Cargo.toml", &format!("[package]\nname = \"{SECRET}\"\n"))
        .unwrap();
    let mut binary = SECRET.as_bytes().to_vec();
    binary.extend([0xff, 0xfe]);
    std::fs::write(s.path().join("blob.toml"), binary).unwrap();
    for spec in [
        "./.env",
        "./secrets.toml",
        "./notes.kdl",
        "./Cargo.toml",
        "./blob.toml",
    ] {
        s.write(&format!("version = 1\n[tasks.t]\nuse = \"{spec}\"\n"));
        for args in [
            &["validate"][..],
            &["validate", "--format", "json"],
            &["apply"],
        ] {
            let out = run(&s, args);
            assert_eq!(
                out.status.code(),
                Some(2),
                "{spec} {args:?}: {}",
                stderr(&out)
            );
        }
    }
    s.write("version = 1\n[tasks.t]\nuse = \"./secrets.toml\"\n");
    insta::assert_snapshot!("not-a-template-syntax", stderr(&run(&s, &["validate"])));
    s.write("version = 1\n[tasks.t]\nuse = \"./.env\"\n");
    insta::assert_snapshot!("not-a-template-no-version", stderr(&run(&s, &["validate"])));

    // A template with errors of its own is still reported in its own file, with its excerpt.
    s.file(
        "lib/typo.toml",
        "version = 1\n[tasks.say]\nrnu = \"echo\"\n",
    )
    .unwrap();
    s.write("version = 1\n[tasks.t]\nuse = \"./lib/typo.toml\"\n");
    let err = stderr(&run(&s, &["validate"]));
    assert!(
        err.contains("lib/typo.toml:3:1") && err.contains("rnu = \"echo\""),
        "{err}"
    );
}

#[test]
fn template_task_ids_obey_the_id_rule() {
    let s = Sandbox::new("version = 1\n[tasks.t]\nuse = \"./lib/t.toml\"\n");
    for id in [
        "a\\nb",
        "a/b",
        "x..y",
        "a@{1}",
        "a.b",
        "-x",
        "a b",
        "main\\u001b[2J",
        "9a",
    ] {
        s.file(
            "lib/t.toml",
            &format!(
                "version = 1\n[tasks.ok]\nrun = \"true\"\n\n[tasks.\"{id}\"]\nrun = \"true\"\n"
            ),
        )
        .unwrap();
        for args in [&["validate"][..], &["apply"]] {
            let out = run(&s, args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{id} {args:?}: {err}");
            assert!(
                err.contains("error[invalid-id]: lib/t.toml:5:8: invalid task id"),
                "{id} {args:?}: {err}"
            );
            // Nothing raw reaches the terminal: a newline or an escape is shown escaped.
            assert!(!err.contains('\u{1b}'), "{err}");
        }
        assert!(!s.path().join(".ccluster").exists(), "{id}: a run started");
    }
    s.file(
        "lib/t.toml",
        "version = 1\n[tasks.ok]\nrun = \"true\"\n\n[tasks.\"a\\nb\"]\nrun = \"true\"\n",
    )
    .unwrap();
    insta::assert_snapshot!("template-id-newline", stderr(&run(&s, &["validate"])));

    // The same in KDL, and in a template used by a template.
    s.file(
        "lib/t.kdl",
        "version 1\ntasks {\n    \"a/b\" {\n        run \"true\"\n    }\n}\n",
    )
    .unwrap();
    s.file(
        "lib/outer.toml",
        "version = 1\n[tasks.inner]\nuse = \"./t.kdl\"\n",
    )
    .unwrap();
    s.write("version = 1\n[tasks.t]\nuse = \"./lib/outer.toml\"\n");
    let err = stderr(&run(&s, &["validate"]));
    assert!(
        err.contains("error[invalid-id]: lib/t.kdl:3:5: invalid task id `a/b`"),
        "{err}"
    );

    // A task that uses a template is checked too: its id starts every embedded id.
    s.write("version = 1\n[tasks.\"u\\nv\"]\nuse = \"builtin:hello\"\n");
    let err = stderr(&run(&s, &["validate"]));
    assert!(
        err.contains("error[invalid-id]: clusterfile.toml:2:8: invalid task id `u\\nv`"),
        "{err}"
    );
    // And the ids of a valid template embed as before.
    s.file("lib/t.toml", "version = 1\n[tasks.ok-1]\nrun = \"true\"\n")
        .unwrap();
    s.write("version = 1\n[tasks.t]\nuse = \"./lib/t.toml\"\n");
    let out = run(&s, &["plan"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("t.ok-1 [shell]"));
}

#[test]
fn output_schema_files_stay_inside_the_repository() {
    // A JSON file outside the repository that is a valid schema: only the confinement can refuse
    // it, and `plan` would otherwise print it.
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(
        outside.path().join("creds.json"),
        format!("{{\"type\": \"object\", \"description\": \"{SECRET}\"}}"),
    )
    .unwrap();
    let s = repo_sandbox("version = 1\n[tasks.ok]\nrun = \"true\"\n");
    s.file("schemas/ok.json", "{\"type\": \"object\"}").unwrap();
    std::os::unix::fs::symlink(
        outside.path().join("creds.json"),
        s.path().join("schemas/escape.json"),
    )
    .unwrap();
    let fifo = s.path().join("schemas/fifo.json");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let absolute = format!("{}/creds.json", outside.path().display());
    let refused = [
        ("/proc/self/environ", "is outside the repository"),
        ("/dev/zero", "is outside the repository"),
        (absolute.as_str(), "is outside the repository"),
        ("schemas/escape.json", "is outside the repository"),
        ("schemas/fifo.json", "is not a regular file"),
    ];
    for (path, why) in refused {
        s.write(&format!(
            "version = 1\n[tasks.t]\nprompt = \"p\"\noutput_schema = {}\n",
            toml_string(path)
        ));
        for args in [&["validate"][..], &["plan"]] {
            let out = run(&s, args);
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{path} {args:?}: {err}");
            assert!(
                err.contains("error[invalid-output-schema]: clusterfile.toml:4:17")
                    && err.contains(why),
                "{path} {args:?}: {err}"
            );
        }
        // Where a tool reads the plan, the refusal is there too (and the secret is not: `run`).
        let out = run(&s, &["plan", "-o", "json"]);
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stdout).contains(why));
    }
    s.write("version = 1\n[tasks.t]\nprompt = \"p\"\noutput_schema = \"schemas/ok.json\"\n");
    let out = run(&s, &["validate"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
