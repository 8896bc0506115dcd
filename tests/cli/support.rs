//! Running the real binary from the repository root, so paths in output are stable and relative.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// The repository root (the workspace directory).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The output of one run of `ccluster`.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `ccluster ARGS` in the repository root, with no terminal and no color.
pub fn ccluster(args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_ccluster"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .env_remove("CLICOLOR_FORCE")
        // Run under GitHub Actions, the output would carry workflow commands: tests that want
        // them set the variable themselves (tests/cli/ci.rs).
        .env_remove("GITHUB_ACTIONS")
        .env_remove("GITHUB_STEP_SUMMARY")
        .output()
        .expect("run ccluster");
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Files in a folder of the repository with one of the extensions, sorted by name.
pub fn files(dir: &str, extensions: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(root().join(dir))
        .unwrap_or_else(|e| panic!("read {dir}: {e}"))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| extensions.contains(&e))
        })
        .map(|p| format!("{dir}/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    out.sort();
    out
}

/// The `claude` CLI of the pinned version, installed from npm by `scripts/ensure-claude.sh` when
/// missing. Panics (the test fails) when it cannot be had: agent tests never skip.
pub fn claude_bin() -> String {
    static BIN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let out = Command::new(root().join("scripts/ensure-claude.sh"))
            .output()
            .expect("run scripts/ensure-claude.sh");
        assert!(
            out.status.success(),
            "cannot get the claude CLI: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    })
    .clone()
}

/// Runs git in `dir` with a fixed identity; panics (the test fails) when git fails.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "test")
        .env("GIT_AUTHOR_EMAIL", "test@localhost")
        .env("GIT_COMMITTER_NAME", "test")
        .env("GIT_COMMITTER_EMAIL", "test@localhost")
        .output()
        .expect("git is installed");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A plan node's record in `status --json`.
pub fn task<'a>(status: &'a serde_json::Value, node: &str) -> &'a serde_json::Value {
    status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == node)
        .unwrap_or_else(|| panic!("no task {node} in {status}"))
}

/// A clusterfile in a fresh directory, with its state beside it.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

pub struct Applied {
    pub code: i32,
    pub events: Vec<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl Applied {
    /// The exit code, output and JSON events (`--output json`) of a finished `ccluster` command.
    pub fn from_output(out: std::process::Output) -> Applied {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let events = stdout
            .lines()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l}: {e}")))
            .collect();
        Applied {
            code: out.status.code().unwrap_or(-1),
            events,
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
    pub fn of(&self, event: &str) -> Vec<&Value> {
        self.events.iter().filter(|e| e["event"] == event).collect()
    }

    pub fn tasks(&self, event: &str) -> Vec<String> {
        self.of(event)
            .iter()
            .map(|e| e["task"].as_str().unwrap_or("").to_string())
            .collect()
    }
}

impl Sandbox {
    pub fn new(clusterfile: &str) -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("clusterfile.toml"), clusterfile).unwrap();
        Sandbox { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A sandbox that is a git repository on `main` whose first commit holds the clusterfile,
    /// `files` (path, content) and a `.gitignore` of the state directory.
    pub fn in_repo(clusterfile: &str, files: &[(&str, &str)]) -> Sandbox {
        let s = Sandbox::new(clusterfile);
        for (path, content) in files {
            s.file(path, content).unwrap();
        }
        s.file(".gitignore", ".ccluster/\n").unwrap();
        git(s.path(), &["init", "-q", "-b", "main"]);
        s.commit_all("init");
        s
    }

    /// Commits everything in the sandbox's repository.
    pub fn commit_all(&self, message: &str) {
        git(self.path(), &["add", "-A"]);
        git(self.path(), &["commit", "-q", "-m", message]);
    }

    /// The id of the latest run, from `status`.
    pub fn run_id(&self) -> String {
        self.status()["run"]["id"].as_str().unwrap().to_string()
    }

    /// Writes a file of the sandbox (`lib/writer.toml`), making its directories.
    pub fn file(&self, path: &str, text: &str) -> std::io::Result<()> {
        let path = self.path().join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, text)
    }

    pub fn write(&self, clusterfile: &str) {
        std::fs::write(self.path().join("clusterfile.toml"), clusterfile).unwrap();
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ccluster"));
        cmd.args(args)
            .current_dir(self.path())
            .env_remove("CCLUSTER_STATE_DIR")
            .env_remove("GITHUB_ACTIONS")
            .env_remove("GITHUB_STEP_SUMMARY")
            .stdin(Stdio::null());
        cmd
    }

    pub fn apply(&self, extra: &[&str]) -> Applied {
        let mut args = vec!["apply", "--output", "json", "--grace-period", "1s"];
        args.extend_from_slice(extra);
        Applied::from_output(self.command(&args).output().unwrap())
    }

    pub fn spawn_apply(&self, extra: &[&str]) -> Child {
        let mut args = vec!["apply", "--output", "json", "--grace-period", "1s"];
        args.extend_from_slice(extra);
        self.command(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn status(&self) -> Value {
        let out = self
            .command(&["status", "--json", "--state-dir", ".ccluster"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.path().join(file)).unwrap_or_default()
    }
}

/// Every file under `dir`, recursively.
pub(crate) fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            out.extend(files_under(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

/// A `ccluster serve` started by a test on a free loopback port, killed (by its pid) when dropped.
pub struct Served {
    pub child: Option<Child>,
    /// `http://127.0.0.1:PORT`
    pub base: String,
}

impl Served {
    /// Serves `repos`; waits until it answers `/api/v1/health`.
    pub fn start(repos: &[&Path]) -> Served {
        Served::start_on(repos, 0)
    }

    /// On `port` (0: any free one).
    pub fn start_on(repos: &[&Path], port: u16) -> Served {
        Served::start_with(repos, port, &[])
    }

    /// Serves `repos` on `port` (0: a free one), with more arguments to `serve`.
    pub fn start_with(repos: &[&Path], port: u16, extra: &[&str]) -> Served {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ccluster"));
        cmd.args(["serve", "--addr", &format!("127.0.0.1:{port}")]);
        cmd.args(extra);
        for r in repos {
            cmd.arg("--repo").arg(r);
        }
        let mut child = cmd
            .env_remove("CCLUSTER_STATE_DIR")
            .env_remove("CCLUSTER_POLICY")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Its first line names the address (the port, when 0 was asked for).
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let base = line
            .trim()
            .strip_prefix("serving on ")
            .unwrap_or_else(|| panic!("serve said {line:?}"))
            .trim_end_matches('/')
            .to_string();
        let served = Served {
            child: Some(child),
            base,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while served.get("/api/v1/health").0 != 200 {
            assert!(std::time::Instant::now() < deadline, "serve never answered");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        served
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(60)))
            .build()
            .into()
    }

    /// Status and body of a GET.
    pub fn get(&self, path: &str) -> (u16, String) {
        match Served::agent().get(&self.url(path)).call() {
            Ok(mut r) => (
                r.status().as_u16(),
                r.body_mut().read_to_string().unwrap_or_default(),
            ),
            Err(_) => (0, String::new()),
        }
    }

    /// A GET's body as JSON, asserting the status.
    pub fn json(&self, path: &str, status: u16) -> Value {
        let (code, body) = self.get(path);
        assert_eq!(code, status, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    /// Status and JSON body of a POST of `body` (raw text).
    pub fn post(&self, path: &str, body: &str) -> (u16, Value) {
        let mut r = Served::agent()
            .post(&self.url(path))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        let text = r.body_mut().read_to_string().unwrap_or_default();
        (
            r.status().as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.kill();
    }
}
