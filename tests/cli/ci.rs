//! CI behaviour with the real binary: GitHub Actions annotations, grouped logs and the job summary
//! (`GITHUB_ACTIONS`, `GITHUB_STEP_SUMMARY`), plain timestamped lines elsewhere, `init --ci`, and
//! the shipped pipelines under `workflows/ci/`: valid against the published schemas (with the
//! real `check-jsonschema`), real actions, and `ccluster` command lines the binary accepts.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::apply::Sandbox;
use crate::support::{git, root};

/// Runs `ccluster ARGS` in the sandbox as a GitHub Actions step would, with the job summary in
/// `summary`.
fn in_github(s: &Sandbox, summary: &Path, args: &[&str]) -> (i32, String, String) {
    let out = s
        .command(args)
        .env("GITHUB_ACTIONS", "true")
        .env("CI", "true")
        .env("GITHUB_STEP_SUMMARY", summary)
        .env("GITHUB_WORKSPACE", s.path())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Times, run ids and durations vary: replaced in snapshots.
const FILTERS: &[(&str, &str)] = &[
    (r"\d{8}-\d{6}\.\d{3}-[0-9a-f]{4}", "[RUN]"),
    (r"(?m)^\d{2}:\d{2}:\d{2} ", "[TIME] "),
    (r"\b\d+(\.\d+)?m?s\b", "[DURATION]"),
];

fn snapshot(name: &str, text: &str) {
    insta::with_settings!({ filters => FILTERS.to_vec() }, {
        insta::assert_snapshot!(name.to_string(), text);
    });
}

const BAD: &str = r#"version = 1
[workflow]
name = "bad"

[tasks.build]
run = "make"
promt = "x"

[tasks.test]
run = "make test"
needs = ["biuld"]
"#;

#[test]
fn ci_invalid_clusterfile_becomes_error_annotations_and_a_summary() {
    let s = Sandbox::new(BAD);
    let summary = s.path().join("summary.md");
    for command in ["validate", "plan", "apply"] {
        let _ = std::fs::remove_file(&summary);
        let (code, stdout, _) = in_github(&s, &summary, &[command]);
        assert_eq!(code, 2, "{command}");
        let annotations: Vec<&str> = stdout.lines().filter(|l| l.starts_with("::")).collect();
        assert!(
            annotations
                .iter()
                .all(|l| l.starts_with("::error file=clusterfile.toml,line=")),
            "{command}: {stdout}"
        );
        assert_eq!(annotations.len(), 2, "{command}: {stdout}");
        insta::assert_snapshot!(format!("ci-annotations-{command}"), annotations.join("\n"));
        let written = std::fs::read_to_string(&summary).unwrap();
        insta::assert_snapshot!(format!("ci-summary-invalid-{command}"), written);
    }
    // With `-o json` stdout stays one JSON document: the commands go to stderr.
    let (code, stdout, stderr) = in_github(&s, &summary, &["validate", "-o", "json"]);
    assert_eq!(code, 2);
    serde_json::from_str::<Value>(&stdout).expect("stdout is JSON");
    assert!(
        stderr.contains("::error file=clusterfile.toml,line=7,col=1"),
        "{stderr}"
    );
}

const FAILING: &str = r#"version = 1
[workflow]
name = "failing"

[tasks.ok]
run = "echo fine"

[tasks.boom]
needs = ["ok"]
run = "echo building; echo 'broke: 50% done, line 2' >&2; echo '::error::forged by the task' >&2; exit 3"

[tasks.after]
needs = ["boom"]
run = "echo never"
"#;

#[test]
fn ci_failed_task_is_annotated_its_log_grouped_and_the_report_summarized() {
    let s = Sandbox::new(FAILING);
    let summary = s.path().join("summary.md");
    std::fs::write(&summary, "# earlier step\n").unwrap();
    let (code, stdout, stderr) = in_github(&s, &summary, &["apply"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stdout.contains("::error title=task boom failed (exit_code)::exit code 3\n"),
        "{stdout}"
    );
    // The task's own `::error::` line is printed as text inside the group, not obeyed.
    assert!(
        stdout.contains("\n ::error::forged by the task\n"),
        "{stdout}"
    );
    assert!(!stdout.contains("\n::error::forged"), "{stdout}");
    snapshot("ci-apply-failed-stdout", &stdout);
    let written = std::fs::read_to_string(&summary).unwrap();
    assert!(
        written.starts_with("# earlier step\n## ccluster run "),
        "{written}"
    );
    let report = Command::new(env!("CARGO_BIN_EXE_ccluster"))
        .args(["report", "latest"])
        .current_dir(s.path())
        .output()
        .unwrap();
    assert!(
        written.contains(&String::from_utf8_lossy(&report.stdout).to_string()),
        "the summary holds the report:\n{written}"
    );
    snapshot("ci-summary-failed", &written);
}

#[test]
fn ci_cancelled_run_still_writes_the_summary() {
    let s = Sandbox::new(
        "version = 1\n[workflow]\nname = \"cancelled\"\n[tasks.slow]\nrun = \"touch started; sleep 30\"\n",
    );
    let summary = s.path().join("summary.md");
    let mut child = s
        .command(&["apply", "--grace-period", "1s"])
        .env("GITHUB_ACTIONS", "true")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !s.path().join("started").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the task never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let written = std::fs::read_to_string(&summary).unwrap();
    assert!(written.contains("`cancelled`: cancelled"), "{written}");
}

#[test]
fn ci_other_ci_systems_keep_plain_timestamped_lines() {
    let s = Sandbox::new(FAILING);
    let summary = s.path().join("summary.md");
    let out = s
        .command(&["apply"])
        .env("CI", "true")
        .env_remove("GITHUB_ACTIONS")
        .env("GITHUB_STEP_SUMMARY", &summary)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("::"), "{stdout}");
    for line in stdout.lines() {
        let stamp = line.get(..9).unwrap_or("");
        assert!(
            stamp.len() == 9
                && stamp.as_bytes()[2] == b':'
                && stamp.as_bytes()[5] == b':'
                && stamp.ends_with(' '),
            "not a timestamped line: {line:?}"
        );
    }
    assert!(!summary.exists(), "only GitHub Actions gets a job summary");
}

#[test]
fn ci_init_writes_the_shipped_pipelines_once() {
    let s = Sandbox::in_repo("version = 1\n[workflow]\nname = \"x\"\n", &[]);
    std::fs::create_dir_all(s.path().join("sub")).unwrap();
    let init = |args: &[&str], dir: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_ccluster"))
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let shipped = std::fs::read_to_string(root().join("workflows/ci/github.yml")).unwrap();
    let (code, _, err) = init(&["init", "--ci", "github"], s.path());
    assert_eq!(code, 0, "{err}");
    let written = s.path().join(".github/workflows/ccluster.yml");
    assert_eq!(std::fs::read_to_string(&written).unwrap(), shipped);
    std::fs::write(&written, "mine").unwrap();
    let (code, _, err) = init(&["init", "--ci", "github"], s.path());
    assert_eq!(code, 2);
    assert!(err.contains("exists already"), "{err}");
    assert_eq!(std::fs::read_to_string(&written).unwrap(), "mine");
    // From a subdirectory: the file goes to the top, naming the clusterfile from there.
    let (code, _, err) = init(
        &["init", "--ci", "github", "--force"],
        &s.path().join("sub"),
    );
    assert_eq!(code, 0, "{err}");
    let text = std::fs::read_to_string(&written).unwrap();
    assert!(text.contains("CLUSTERFILE: sub/clusterfile.toml"), "{text}");

    let shipped = std::fs::read_to_string(root().join("workflows/ci/gitlab-ci.yml")).unwrap();
    let (code, _, err) = init(&["init", "--ci", "gitlab"], s.path());
    assert_eq!(code, 0, "{err}");
    let gitlab = s.path().join(".gitlab-ci.yml");
    assert_eq!(std::fs::read_to_string(&gitlab).unwrap(), shipped);
    std::fs::write(&gitlab, "stages: [test]\n").unwrap();
    let (code, out, err) = init(&["init", "--ci", "gitlab"], s.path());
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out, shipped,
        "an existing .gitlab-ci.yml gets the job printed"
    );
    assert_eq!(
        std::fs::read_to_string(&gitlab).unwrap(),
        "stages: [test]\n"
    );
    git(s.path(), &["status", "--short"]);
}

/// `check-jsonschema` (PyPI) in a venv under ~/.cache/ccluster/, installed when missing. Fails the
/// test when it cannot be had: the shipped pipelines are always checked.
fn check_jsonschema() -> (PathBuf, PathBuf) {
    static VENV: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let venv = VENV.get_or_init(|| {
        let home = std::env::var_os("HOME").expect("HOME is set");
        let venv = PathBuf::from(home).join(".cache/ccluster/check-jsonschema-venv");
        let bin = venv.join("bin/check-jsonschema");
        if !bin.exists() {
            let made = Command::new("python3")
                .args(["-m", "venv"])
                .arg(&venv)
                .output()
                .expect("python3 runs");
            assert!(
                made.status.success(),
                "python3 -m venv: {}",
                String::from_utf8_lossy(&made.stderr)
            );
            let pip = Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", "check-jsonschema==0.39.0"])
                .output()
                .expect("pip runs");
            assert!(
                pip.status.success(),
                "cannot install check-jsonschema: {}",
                String::from_utf8_lossy(&pip.stderr)
            );
        }
        venv
    });
    (venv.join("bin/check-jsonschema"), venv.join("bin/python"))
}

/// The pipeline as JSON, parsed by the YAML library check-jsonschema itself uses.
fn yaml(python: &Path, file: &Path) -> Value {
    let out = Command::new(python)
        .args([
            "-c",
            "import json, sys\nfrom ruamel.yaml import YAML\nprint(json.dumps(YAML(typ='safe').load(open(sys.argv[1]))))",
        ])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} does not parse: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn validate_schema(checker: &Path, schema: &str, file: &Path) {
    let out = Command::new(checker)
        .args(["--builtin-schema", schema])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} fails {schema}: {}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `ccluster ...` command lines of shell scripts: continuations joined, each cut at the first
/// `||`, `&&`, `|`, `;` or redirection.
fn ccluster_lines(scripts: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for script in scripts {
        let joined = script.replace("\\\n", " ");
        for line in joined.lines() {
            let line = line.trim();
            if !line.starts_with("ccluster ") {
                continue;
            }
            let mut words = Vec::new();
            for word in line.split_whitespace() {
                if ["||", "&&", "|", ";", ">", "2>", ">>"].contains(&word) {
                    break;
                }
                words.push(word.trim_matches('"').to_string());
            }
            out.push(words);
        }
    }
    out
}

/// Each command line with `--help` appended: clap accepts it only if the subcommand exists and
/// every flag before it is one of its own.
fn check_commands(lines: &[Vec<String>], expected: &[&str]) {
    let mut seen = Vec::new();
    for words in lines {
        let mut args: Vec<&str> = words[1..].iter().map(String::as_str).collect();
        args.push("--help");
        let out = Command::new(env!("CARGO_BIN_EXE_ccluster"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{}` is not a command ccluster accepts: {}",
            words.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        // The subcommand: `state` has its own.
        let depth = if words[1] == "state" { 3 } else { 2 };
        seen.push(words[1..depth.min(words.len())].join(" "));
    }
    for command in expected {
        assert!(
            seen.iter().any(|s| s == command),
            "no `ccluster {command}` in {seen:?}"
        );
    }
}

#[test]
fn ci_shipped_github_workflow_is_valid_and_names_real_actions_and_commands() {
    let (checker, python) = check_jsonschema();
    let file = root().join("workflows/ci/github.yml");
    validate_schema(&checker, "vendor.github-workflows", &file);
    let doc = yaml(&python, &file);
    let allowed = [
        "actions/checkout@v4",
        "actions/cache/restore@v4",
        "actions/cache/save@v4",
        "actions/cache@v4",
        "actions/upload-artifact@v4",
    ];
    let mut scripts = Vec::new();
    let mut uses = Vec::new();
    let mut always = Vec::new();
    for (_, job) in doc["jobs"].as_object().unwrap() {
        for step in job["steps"].as_array().unwrap() {
            if let Some(action) = step["uses"].as_str() {
                assert!(allowed.contains(&action), "unknown action {action}");
                uses.push(action.to_string());
            }
            if let Some(run) = step["run"].as_str() {
                scripts.push(run.to_string());
            }
            if step["if"] == "always()" {
                always.push(step.clone());
            }
        }
    }
    for needed in [
        "actions/checkout@v4",
        "actions/cache/restore@v4",
        "actions/cache/save@v4",
    ] {
        assert!(uses.iter().any(|u| u == needed), "{needed} missing");
    }
    // The state is saved whatever happened to `apply`.
    assert!(always.iter().any(|s| s["uses"] == "actions/cache/save@v4"));
    assert!(always.iter().any(|s| s["run"]
        .as_str()
        .is_some_and(|r| r.contains("ccluster state export"))));
    let checkout = doc["jobs"]["apply"]["steps"][0].clone();
    assert_eq!(checkout["with"]["fetch-depth"], 0);
    let restore = doc["jobs"]["apply"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["uses"] == "actions/cache/restore@v4")
        .unwrap()
        .clone();
    let key = restore["with"]["key"].as_str().unwrap();
    assert!(
        key.contains("hashFiles(") && key.contains("github.sha"),
        "{key}"
    );
    assert!(restore["with"]["restore-keys"].as_str().is_some());
    check_commands(
        &ccluster_lines(&scripts),
        &["state import", "apply", "state export", "report"],
    );
}

#[test]
fn ci_shipped_gitlab_pipeline_is_valid_and_names_real_commands() {
    let (checker, python) = check_jsonschema();
    let file = root().join("workflows/ci/gitlab-ci.yml");
    validate_schema(&checker, "vendor.gitlab-ci", &file);
    let doc = yaml(&python, &file);
    let job = &doc["ccluster"];
    assert_eq!(job["cache"]["when"], "always");
    assert_eq!(job["artifacts"]["when"], "always");
    assert!(job["cache"]["key"]["files"].is_array());
    let mut scripts = Vec::new();
    for part in ["before_script", "script", "after_script"] {
        for line in job[part].as_array().unwrap() {
            scripts.push(line.as_str().unwrap().to_string());
        }
    }
    let after: Vec<String> = job["after_script"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    assert!(after.iter().any(|l| l.contains("ccluster state export")));
    check_commands(
        &ccluster_lines(&scripts),
        &["state import", "apply", "state export", "report"],
    );
}

#[test]
fn ci_an_error_outside_the_clusterfile_is_annotated_too() {
    // Valid, but its workspace task cannot run outside a git repository.
    let s = Sandbox::new(
        "version = 1\n[workflow]\nname = \"norepo\"\n[tasks.edit]\nworkspace = \"worktree\"\nrun = \"true\"\n",
    );
    let summary = s.path().join("summary.md");
    let (code, stdout, stderr) = in_github(&s, &summary, &["apply"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("::error title=ccluster::")),
        "{stdout}"
    );
}

/// How one step of the shipped GitHub workflow ended, as the job goes.
struct Job {
    /// The clone the job checked out.
    checkout: PathBuf,
    home: PathBuf,
    /// What `actions/cache` keeps between jobs.
    cache: PathBuf,
    summary: PathBuf,
    /// Each `run` step's name, exit code and output.
    ran: Vec<(String, i32, String)>,
}

/// Plays the shipped workflow's job on `checkout` as GitHub would: `run` steps under bash with the
/// workflow's `env`, a failure skipping later steps but those with `if: always()`; the cache
/// actions as copies of the archive to and from `cache`. The install step is left out: the built
/// binary is on `PATH`, as an installed one would be.
fn play_github_job(doc: &Value, checkout: &Path, home: &Path, cache: &Path) -> Job {
    let home = home.to_path_buf();
    std::fs::create_dir_all(&home).unwrap();
    let mut job = Job {
        checkout: checkout.to_path_buf(),
        home: home.clone(),
        cache: cache.to_path_buf(),
        summary: home.join("summary.md"),
        ran: Vec::new(),
    };
    let archive = home.join(".cache/ccluster-ci/state.tgz");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_ccluster")).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let mut failed = false;
    let mut matched = false;
    for step in doc["jobs"]["apply"]["steps"].as_array().unwrap() {
        let condition = step["if"].as_str().unwrap_or("");
        let runs_now = match condition {
            "always()" => true,
            "steps.restore.outputs.cache-matched-key != ''" => !failed && matched,
            "" => !failed,
            other => panic!("a condition this test does not know: {other}"),
        };
        if !runs_now {
            continue;
        }
        match step["uses"].as_str() {
            Some("actions/checkout@v4") | Some("actions/upload-artifact@v4") => {}
            Some("actions/cache/restore@v4") => {
                let saved = job.cache.join("state.tgz");
                if saved.exists() {
                    std::fs::create_dir_all(archive.parent().unwrap()).unwrap();
                    std::fs::copy(&saved, &archive).unwrap();
                    matched = true;
                }
            }
            Some("actions/cache/save@v4") => {
                if archive.exists() {
                    std::fs::create_dir_all(&job.cache).unwrap();
                    std::fs::copy(&archive, job.cache.join("state.tgz")).unwrap();
                }
            }
            Some(other) => panic!("an action this test does not play: {other}"),
            None => {
                let name = step["name"].as_str().unwrap_or("").to_string();
                if name.starts_with("Install") {
                    continue;
                }
                let mut cmd = Command::new("bash");
                cmd.args(["--noprofile", "--norc", "-eo", "pipefail", "-c"])
                    .arg(step["run"].as_str().unwrap())
                    .current_dir(checkout)
                    .env("PATH", &path)
                    .env("HOME", &home)
                    .env("GITHUB_ACTIONS", "true")
                    .env("CI", "true")
                    .env("GITHUB_WORKSPACE", checkout)
                    .env("GITHUB_STEP_SUMMARY", &job.summary)
                    .env_remove("CCLUSTER_STATE_DIR");
                for (key, value) in doc["env"].as_object().unwrap() {
                    cmd.env(key, value.as_str().unwrap());
                }
                let out = cmd.output().unwrap();
                let code = out.status.code().unwrap_or(-1);
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                failed |= code != 0;
                job.ran.push((name, code, text));
            }
        }
    }
    job
}

impl Job {
    fn step(&self, name: &str) -> &(String, i32, String) {
        self.ran
            .iter()
            .find(|(n, _, _)| n == name)
            .unwrap_or_else(|| panic!("step `{name}` did not run: {:?}", self.ran))
    }
}

/// The shipped workflow, played twice: the first job's `apply` fails, its state is still saved;
/// the second job, on a fresh clone, imports it and runs only what did not finish.
#[test]
fn ci_shipped_github_workflow_resumes_a_failed_job_in_the_next() {
    let (_, python) = check_jsonschema();
    let doc = yaml(&python, &root().join("workflows/ci/github.yml"));
    let markers = tempfile::tempdir().unwrap();
    let marker = markers.path().join("fixed");
    let first = Sandbox::in_repo(
        &format!(
            "version = 1\n[workflow]\nname = \"ci\"\n\n[tasks.build]\nworkspace = \"worktree\"\nrun = \"echo built > built.txt\"\n\n[tasks.test]\nworkspace = \"worktree\"\nneeds = [\"build\"]\nrun = \"test -f '{}'\"\n",
            marker.display()
        ),
        &[],
    );
    let jobs = tempfile::tempdir().unwrap();
    let cache = jobs.path().join("actions-cache");

    let one = play_github_job(&doc, first.path(), &jobs.path().join("home-1"), &cache);
    let (_, code, out) = one.step("Apply");
    assert_eq!(*code, 1, "{out}");
    assert!(
        out.contains("::error title=task test failed (exit_code)::"),
        "{out}"
    );
    let (_, code, out) = one.step("Export the state");
    assert_eq!(*code, 0, "{out}");
    assert!(
        one.cache.join("state.tgz").exists(),
        "the failed job saved its state"
    );
    assert!(one.checkout.join("ccluster-report.md").exists());
    let summary = std::fs::read_to_string(&one.summary).unwrap();
    assert!(summary.contains("| `test` | failed |"), "{summary}");

    // The next job: another machine, a fresh clone of the same commit.
    let second = jobs.path().join("second");
    git(
        jobs.path(),
        &["clone", "-q", first.path().to_str().unwrap(), "second"],
    );
    std::fs::write(&marker, "").unwrap();
    let two = play_github_job(&doc, &second, &jobs.path().join("home-2"), &cache);
    let (_, code, out) = two.step("Import the state");
    assert_eq!(*code, 0, "{out}");
    assert!(out.contains("imported run"), "{out}");
    let (_, code, out) = two.step("Apply");
    assert_eq!(*code, 0, "{out}");
    assert!(out.contains("cached  build (from run "), "{out}");
    assert!(!out.contains("start   build"), "{out}");
    assert!(out.contains("start   test"), "{out}");
    assert!(two.home.join(".cache/ccluster-ci/state.tgz").exists());
}

/// Plays the shipped GitLab job on `checkout`: `before_script` and `script` (a failure ends them),
/// then `after_script` whatever happened, each line under `sh -e` with the job's variables; the
/// cache as a copy of `.ccluster-ci/` to and from `cache` (restored before, saved `when: always`).
/// The install lines are left out: the built binary is on `PATH`.
fn play_gitlab_job(doc: &Value, checkout: &Path, cache: &Path) -> Vec<(String, i32, String)> {
    let job = &doc["ccluster"];
    let kept = checkout.join(".ccluster-ci");
    if cache.join("state.tgz").exists() {
        std::fs::create_dir_all(&kept).unwrap();
        std::fs::copy(cache.join("state.tgz"), kept.join("state.tgz")).unwrap();
    }
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_ccluster")).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let run = |line: &str| {
        let mut cmd = Command::new("sh");
        cmd.args(["-e", "-c", line])
            .current_dir(checkout)
            .env("PATH", &path)
            .env("CI", "true")
            .env("GITLAB_CI", "true")
            .env_remove("GITHUB_ACTIONS")
            .env_remove("CCLUSTER_STATE_DIR");
        for (key, value) in job["variables"].as_object().unwrap() {
            cmd.env(key, value.as_str().unwrap());
        }
        let out = cmd.output().unwrap();
        (
            line.to_string(),
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let mut ran = Vec::new();
    let mut failed = false;
    for part in ["before_script", "script", "after_script"] {
        for line in job[part].as_array().unwrap() {
            let line = line.as_str().unwrap();
            let install = line.starts_with("command -v") || line.starts_with("npm install");
            if install || (failed && part != "after_script") {
                continue;
            }
            let result = run(line);
            failed |= result.1 != 0 && part != "after_script";
            ran.push(result);
        }
    }
    if kept.join("state.tgz").exists() {
        std::fs::create_dir_all(cache).unwrap();
        std::fs::copy(kept.join("state.tgz"), cache.join("state.tgz")).unwrap();
    }
    ran
}

fn line_ran<'a>(ran: &'a [(String, i32, String)], starts: &str) -> &'a (String, i32, String) {
    ran.iter()
        .find(|(l, _, _)| l.trim_start().starts_with(starts))
        .unwrap_or_else(|| panic!("no line `{starts}` ran: {ran:?}"))
}

/// The shipped GitLab job, played twice, as the GitHub one above.
#[test]
fn ci_shipped_gitlab_pipeline_resumes_a_failed_job_in_the_next() {
    let (_, python) = check_jsonschema();
    let doc = yaml(&python, &root().join("workflows/ci/gitlab-ci.yml"));
    let markers = tempfile::tempdir().unwrap();
    let marker = markers.path().join("fixed");
    let first = Sandbox::in_repo(
        &format!(
            "version = 1\n[workflow]\nname = \"ci\"\n\n[tasks.build]\nworkspace = \"worktree\"\nrun = \"echo built > built.txt\"\n\n[tasks.test]\nworkspace = \"worktree\"\nneeds = [\"build\"]\nrun = \"test -f '{}'\"\n",
            marker.display()
        ),
        &[],
    );
    let jobs = tempfile::tempdir().unwrap();
    let cache = jobs.path().join("gitlab-cache");
    let one = play_gitlab_job(&doc, first.path(), &cache);
    let (_, code, out) = line_ran(&one, "ccluster apply");
    assert_eq!(*code, 1, "{out}");
    assert!(!out.contains("::"), "no GitHub commands on GitLab: {out}");
    let (_, code, out) = line_ran(&one, "ccluster state export");
    assert_eq!(*code, 0, "{out}");
    assert!(
        cache.join("state.tgz").exists(),
        "the failed job saved its state"
    );
    assert!(first.path().join("ccluster-report.md").exists());

    let second = jobs.path().join("second");
    git(
        jobs.path(),
        &["clone", "-q", first.path().to_str().unwrap(), "second"],
    );
    std::fs::write(&marker, "").unwrap();
    let two = play_gitlab_job(&doc, &second, &cache);
    let (_, code, out) = line_ran(&two, "if [ -f .ccluster-ci/state.tgz ]");
    assert_eq!(*code, 0, "{out}");
    assert!(out.contains("imported run"), "{out}");
    let (_, code, out) = line_ran(&two, "ccluster apply");
    assert_eq!(*code, 0, "{out}");
    assert!(out.contains("cached  build (from run "), "{out}");
    assert!(!out.contains("start   build"), "{out}");
}
