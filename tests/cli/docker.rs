//! Tasks on a `docker` runner through the real binary and a real daemon (started by
//! `scripts/docker-for-tests.sh` in a network namespace of its own, stopped by its pid).

use std::process::Command;

use crate::apply::{Applied, Sandbox};
use crate::support::{git, root};

const IMAGE: &str = "ccluster-test/busybox:1";

pub(crate) struct Daemon {
    dir: tempfile::TempDir,
    pub host: String,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with("")
    }

    /// With the glibc image (`ccluster-test/debian:1`) too: what agents need.
    pub fn start_with_debian() -> Daemon {
        Daemon::start_with("debian")
    }

    fn start_with(images: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(root().join("scripts/docker-for-tests.sh"))
            .arg("start")
            .arg(dir.path())
            .arg(images)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the test Docker daemon did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let host = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("DOCKER_HOST=").map(str::to_string))
            .unwrap();
        Daemon { dir, host }
    }

    pub fn containers(&self) -> String {
        self.docker(&["ps", "-aq"]).trim().to_string()
    }

    /// What `docker ARGS` prints.
    pub fn docker(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ccluster ARGS` in the sandbox, run inside the daemon's network namespace: where its
    /// networks' gateways are, so that the `api-only` proxy can listen on one (as ccluster on
    /// the daemon's own machine does).
    pub fn ccluster(&self, s: &Sandbox, args: &[&str]) -> Command {
        let pid = std::fs::read_to_string(self.dir.path().join("docker.pid")).unwrap();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/proc/{}/ns/net", pid.trim()))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_ccluster"))
            .args(args)
            .current_dir(s.path())
            .env_remove("CCLUSTER_STATE_DIR")
            .env("DOCKER_HOST", &self.host)
            .stdin(std::process::Stdio::null());
        cmd
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/docker-for-tests.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn clusterfile(image: &str, pull: &str) -> String {
    format!(
        r#"version = 1
[workflow]
result = "edit"
[runners.box]
kind = "docker"
image = "{image}"
pull = "{pull}"
network = "none"
memory = "64m"
[defaults]
runner = "box"
[tasks.hello]
run = "echo hello from the box; ls /sys/class/net"
sources = []
[tasks.edit]
workspace = "worktree"
run = "echo built > built.txt; id -u > uid.txt"
[tasks.slow]
run = "sleep 30"
timeout = "1s"
sources = []
"#
    )
}

fn apply_with(s: &Sandbox, host: &str) -> Applied {
    let out = s
        .command(&["apply", "--output", "json", "--grace-period", "1s", "-k"])
        .env("DOCKER_HOST", host)
        .output()
        .unwrap();
    Applied::from_output(out)
}

#[test]
fn shell_tasks_run_in_containers_on_a_docker_runner() {
    let daemon = Daemon::start();
    let s = Sandbox::in_repo(&clusterfile(IMAGE, "never"), &[("README", "base\n")]);
    // Traced: the runner's own operations are spans of each attempt.
    let receiver = crate::otlp::Receiver::start();
    let run = Applied::from_output(
        s.command(&["apply", "--output", "json", "--grace-period", "1s", "-k"])
            .env("DOCKER_HOST", &daemon.host)
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.http)
            .output()
            .unwrap(),
    );
    let spans = receiver.spans();
    let parent_of = |span: &crate::otlp::Span| {
        spans
            .iter()
            .find(|p| Some(&p.id) == span.parent.as_ref())
            .map(|p| p.name.as_str())
    };
    for operation in [
        "docker.create",
        "docker.attach",
        "docker.start",
        "docker.wait",
    ] {
        let found: Vec<_> = spans.iter().filter(|s| s.name == operation).collect();
        assert!(!found.is_empty(), "no {operation} span: {spans:#?}");
        assert!(
            found.iter().all(|s| parent_of(s) == Some("runner.run")),
            "{operation} outside runner.run: {found:#?}"
        );
    }
    // `slow` times out; the others succeed.
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.of("task_succeeded").len(), 2, "{}", run.stdout);
    let failed = run.of("task_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["task"], "slow");
    assert_eq!(failed[0]["class"], "timeout");

    // Output streamed to the logs; no network but loopback.
    let logs = s.command(&["logs", "latest", "hello"]).output().unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("hello from the box\nlo\n"), "{logs}");
    // The worktree task's file is in its result, written as the invoking user.
    let run_id = s.run_id();
    let ref_name = format!("refs/ccluster/runs/{run_id}/edit");
    assert_eq!(
        git(s.path(), &["show", &format!("{ref_name}:built.txt")]),
        "built\n"
    );
    assert_eq!(
        git(s.path(), &["show", &format!("{ref_name}:uid.txt")]).trim(),
        nix::unistd::getuid().to_string()
    );
    // Every container is gone, the timed-out one too.
    assert_eq!(daemon.containers(), "");

    // attach: a command inside the running task's container, in its directory.
    let gated = Sandbox::in_repo(
        r#"version = 1
[runners.box]
kind = "docker"
image = "ccluster-test/busybox:1"
pull = "never"
network = "none"
[tasks.waiting]
runner = "box"
run = "while [ ! -f go ]; do sleep 0.1; done"
sources = []
"#,
        &[],
    );
    let child = gated
        .command(&["apply", "--output", "json"])
        .env("DOCKER_HOST", &daemon.host)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    crate::attach::wait_running(&gated, "waiting");
    let out = gated
        .command(&[
            "attach",
            "waiting",
            "--",
            "sh",
            "-c",
            "test -f /.dockerenv && pwd && ls /sys/class/net",
        ])
        .env("DOCKER_HOST", &daemon.host)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "{}\nlo\n",
            std::fs::canonicalize(gated.path()).unwrap().display()
        )
    );
    std::fs::write(gated.path().join("go"), "").unwrap();
    let done = Applied::from_output(child.wait_with_output().unwrap());
    assert_eq!(done.code, 0, "{}", done.stderr);

    // No daemon: said before anything starts, and no run is recorded.
    let fresh = Sandbox::in_repo(&clusterfile(IMAGE, "never"), &[]);
    let missing = format!("unix://{}/nothing.sock", fresh.path().display());
    let run = apply_with(&fresh, &missing);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("runner `box`: cannot reach the Docker daemon")
            && run.stderr.contains("help: "),
        "{}",
        run.stderr
    );
    assert!(run.events.is_empty());
    // An image the daemon does not have, under `pull = "never"`: the same.
    fresh.write(&clusterfile("no-such/image:1", "never"));
    let run = apply_with(&fresh, &daemon.host);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("`no-such/image:1` is not on this machine"),
        "{}",
        run.stderr
    );
    assert!(run.events.is_empty());
}

/// A task that says it started, waits for `go` in the read-only `/signals`, and changes its
/// worktree.
const WAITER: &str = r#"version = 1
[runners.box]
kind = "docker"
image = "ccluster-test/busybox:1"
pull = "never"
network = "NETWORK"
mounts = ["SIGNALS:/signals"]
[tasks.long]
runner = "box"
workspace = "worktree"
run = "echo started; while [ ! -f /signals/go ]; do sleep 0.1; done; echo finished; echo made > made.txt"
"#;

/// A sandbox for [`WAITER`] on `network`, and its signals directory.
fn waiter(network: &str) -> (Sandbox, tempfile::TempDir) {
    let signals = tempfile::tempdir().unwrap();
    let text = WAITER
        .replace("NETWORK", network)
        .replace("SIGNALS", &signals.path().display().to_string());
    (Sandbox::in_repo(&text, &[("README", "base\n")]), signals)
}

/// Starts `apply` and kills it (-9) once its task's container said it started.
fn kill_once_started(daemon: &Daemon, apply: &mut Command) {
    let mut child = apply
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let id = daemon.docker(&["ps", "-q", "--filter", "label=dev.ccluster.task=long"]);
        if !id.trim().is_empty() && daemon.docker(&["logs", id.trim()]).contains("started") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the task never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
}

/// How many containers of the sandbox's task started since `since` (a Unix time): its runs.
/// Containers are told apart by the sandbox's state directory, which they are labelled with.
fn runs_since(daemon: &Daemon, s: &Sandbox, since: u64) -> usize {
    let state = std::fs::canonicalize(s.path())
        .unwrap()
        .join(".ccluster")
        .display()
        .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1;
    daemon
        .docker(&[
            "events",
            "--since",
            &since.to_string(),
            "--until",
            &now.to_string(),
            "--filter",
            "event=start",
            "--filter",
            "label=dev.ccluster.task=long",
            "--filter",
            &format!("label=dev.ccluster.state={state}"),
        ])
        .lines()
        .count()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn after_kill_9_the_next_apply_adopts_what_containers_did_and_leaves_none() {
    let daemon = Daemon::start();

    // Finished after ccluster died: harvested. Its output and its change are the task's; it ran
    // once.
    let since = unix_now();
    let (s, signals) = waiter("none");
    kill_once_started(&daemon, &mut daemon.ccluster(&s, &["apply"]));
    std::fs::write(signals.path().join("go"), "").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while daemon
        .docker(&["ps", "-a", "-q", "--filter", "status=exited"])
        .trim()
        .is_empty()
    {
        assert!(std::time::Instant::now() < deadline, "the task never ended");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let run = Applied::from_output(
        daemon
            .ccluster(&s, &["apply", "--output", "json"])
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(runs_since(&daemon, &s, since), 1, "the task ran again");
    let adopted: Vec<_> = run
        .of("task_progress")
        .into_iter()
        .filter(|e| e["kind"] == "adopted")
        .collect();
    assert_eq!(adopted.len(), 1, "{}", run.stdout);
    assert!(
        adopted[0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("the finished container"),
        "{}",
        adopted[0]
    );
    let logs = s.command(&["logs", "latest", "long"]).output().unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("started\nfinished\n"), "{logs}");
    let run_id = s.run_id();
    assert_eq!(
        git(
            s.path(),
            &[
                "show",
                &format!("refs/ccluster/runs/{run_id}/long:made.txt")
            ]
        ),
        "made\n"
    );
    assert_eq!(daemon.containers(), "");

    // Still running when the next apply starts: adopted, followed to its end, run once.
    let since = unix_now();
    let (s, signals) = waiter("none");
    kill_once_started(&daemon, &mut daemon.ccluster(&s, &["apply"]));
    let child = daemon
        .ccluster(&s, &["apply", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::write(signals.path().join("go"), "").unwrap();
    let run = Applied::from_output(child.wait_with_output().unwrap());
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(runs_since(&daemon, &s, since), 1, "the task ran again");
    assert!(
        run.stdout.contains("the running container"),
        "{}",
        run.stdout
    );
    assert_eq!(daemon.containers(), "");

    // Running on `api-only`, whose proxy died with ccluster: stopped, and the task runs again.
    // It is let go only once the next apply has started it again: were it let go before, it
    // could end before that apply looks (under load), and a finished container is harvested.
    let since = unix_now();
    let (s, signals) = waiter("api-only");
    kill_once_started(&daemon, &mut daemon.ccluster(&s, &["apply"]));
    let child = daemon
        .ccluster(&s, &["apply", "--output", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while runs_since(&daemon, &s, since) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the task was not started again"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::fs::write(signals.path().join("go"), "").unwrap();
    let run = Applied::from_output(child.wait_with_output().unwrap());
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(runs_since(&daemon, &s, since), 2);
    assert!(!run.stdout.contains("\"adopted\""), "{}", run.stdout);
    assert_eq!(daemon.containers(), "");
}
