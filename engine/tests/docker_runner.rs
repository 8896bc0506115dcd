//! The Docker runner against a real daemon: started by `scripts/docker-for-tests.sh` in a network
//! namespace of its own (installing Debian's docker.io when it is missing), stopped by its pid at
//! the end. The test fails, never skips, when the daemon cannot be started.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ccluster_engine::exec::docker::{container_name, DockerRunner, LABEL_TASK};
use ccluster_engine::exec::{ProcessEnd, ProcessSpec, Runner, Stop};
use ccluster_engine::model::raw::{NetworkMode, PullPolicy};
use ccluster_engine::model::workflow::DockerSettings;
use tokio::sync::watch;

const IMAGE: &str = "ccluster-test/busybox:1";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/docker-for-tests.sh")
}

/// The private daemon; stopped when dropped.
struct Daemon {
    dir: tempfile::TempDir,
    host: String,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(script())
            .arg("start")
            .arg(dir.path())
            .output()
            .expect("run scripts/docker-for-tests.sh");
        assert!(
            out.status.success(),
            "the test Docker daemon did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let host = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("DOCKER_HOST=").map(str::to_string))
            .expect("DOCKER_HOST from the script");
        Daemon { dir, host }
    }

    /// `docker ARGS` against this daemon: its stdout.
    fn docker(&self, args: &[&str]) -> String {
        let out = Command::new("docker")
            .args(args)
            .env("DOCKER_HOST", &self.host)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

fn settings() -> DockerSettings {
    DockerSettings {
        pull: PullPolicy::Never,
        user: None,
        cpus: None,
        memory_bytes: None,
        pids: None,
        network: Some(NetworkMode::None),
        mounts: Vec::new(),
        env: Default::default(),
        allow_hosts: Vec::new(),
    }
}

fn spec(dir: &Path, node: &str, command: &str) -> ProcessSpec {
    ProcessSpec {
        command: command.to_string(),
        argv: None,
        lines: None,
        env: vec![
            ("PATH".into(), "/bin".into()),
            ("CCLUSTER_RUN".into(), "20261204-000000.000-test".into()),
            ("CCLUSTER_TASK".into(), node.into()),
            ("CCLUSTER_ATTEMPT".into(), "1".into()),
        ],
        stdin: None,
        cwd: dir.to_path_buf(),
        workspace: None,
        reads: Vec::new(),
        writes: Vec::new(),
        secret_env: Vec::new(),
        model_api: None,
        identity: None,
        keeps: Vec::new(),
        adopt: None,
        stdout: dir.join(format!("{node}.out")),
        stderr: dir.join(format!("{node}.err")),
        timeout: None,
        grace: Duration::from_secs(1),
    }
}

#[test]
fn tasks_run_in_containers_of_their_own_with_their_limits_and_stop_as_local_ones_do() {
    let daemon = Daemon::start();
    // The runner reads DOCKER_HOST as the docker CLI does.
    std::env::set_var("DOCKER_HOST", &daemon.host);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let dir = std::fs::canonicalize(work.path()).unwrap();
    let base = dir.clone();
    let run = |runner: &DockerRunner, spec: ProcessSpec, stop: watch::Receiver<Stop>| {
        rt.block_on(runner.run(spec, stop))
    };
    let (_keep, idle) = watch::channel(Stop::No);

    // A missing image is said before anything runs: not pulled under `never`, and under
    // `missing` the pull fails (no registry can be reached from the daemon's namespace).
    let missing = rt.block_on(DockerRunner::connect(
        "box",
        "no-such/image:1",
        settings(),
        &base,
        false,
    ));
    let said = missing.err().unwrap_or_default();
    assert!(said.contains("not on this machine"), "{said}");
    let pulling = DockerSettings {
        pull: PullPolicy::Missing,
        ..settings()
    };
    let unpullable = rt.block_on(DockerRunner::connect(
        "box",
        "no-such/image:1",
        pulling.clone(),
        &base,
        false,
    ));
    let said = unpullable.err().unwrap_or_default();
    assert!(
        said.contains("cannot pull image `no-such/image:1`"),
        "{said}"
    );
    // An image that is here is not pulled under `missing`.
    assert!(rt
        .block_on(DockerRunner::connect("box", IMAGE, pulling, &base, false))
        .is_ok());
    let runner = rt
        .block_on(DockerRunner::connect(
            "box",
            IMAGE,
            settings(),
            &base,
            false,
        ))
        .unwrap();

    // Exit code, both streams to their logs, stdout kept, the environment as given, files in
    // the mounted directory at the same path, written as the invoking user.
    let mut s = spec(
        &dir,
        "build",
        "echo out; echo err >&2; echo $CCLUSTER_TASK > made.txt; pwd; exit 3",
    );
    s.env.push(("GREETING".into(), "hi".into()));
    let done = run(&runner, s, idle.clone());
    assert_eq!(done.end, ProcessEnd::Exited(3));
    let stdout = String::from_utf8_lossy(&done.stdout).into_owned();
    assert_eq!(stdout, format!("out\n{}\n", dir.display()));
    assert_eq!(
        std::fs::read_to_string(dir.join("build.out")).unwrap(),
        stdout
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("build.err")).unwrap(),
        "err\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("made.txt")).unwrap(),
        "build\n"
    );
    let meta = std::fs::metadata(dir.join("made.txt")).unwrap();
    assert_eq!(
        (meta.uid(), meta.gid()),
        (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw()
        )
    );
    // The container is gone once its result is taken.
    assert_eq!(daemon.docker(&["ps", "-aq"]).trim(), "");

    // Another user, when the runner names one (who may write in this directory).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let as_other = rt
        .block_on(DockerRunner::connect(
            "box",
            IMAGE,
            DockerSettings {
                user: Some("1234:2345".into()),
                ..settings()
            },
            &base,
            false,
        ))
        .unwrap();
    let done = run(
        &as_other,
        spec(&dir, "other", "id -u; touch other.txt"),
        idle.clone(),
    );
    assert_eq!(done.end, ProcessEnd::Exited(0));
    assert_eq!(String::from_utf8_lossy(&done.stdout), "1234\n");
    let meta = std::fs::metadata(dir.join("other.txt")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (1234, 2345));

    // Limits and labels, as the daemon has them while the task runs.
    let limited = rt
        .block_on(DockerRunner::connect(
            "box",
            IMAGE,
            DockerSettings {
                cpus: Some(0.5),
                memory_bytes: Some(64 << 20),
                pids: Some(50),
                ..settings()
            },
            &base,
            false,
        ))
        .unwrap();
    let s = spec(&dir, "limited", "sleep 3");
    let name = container_name("20261204-000000.000-test", "limited", "1");
    let inspected = std::thread::scope(|scope| {
        let looker = scope.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let seen = daemon.docker(&[
                    "inspect",
                    "--format",
                    &format!(
                        "{{{{.HostConfig.NanoCpus}}}} {{{{.HostConfig.Memory}}}} {{{{.HostConfig.PidsLimit}}}} {{{{.HostConfig.NetworkMode}}}} {{{{index .Config.Labels \"{LABEL_TASK}\"}}}}"
                    ),
                    &name,
                ]);
                if !seen.trim().is_empty() || Instant::now() > deadline {
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let done = run(&limited, s, idle.clone());
        assert_eq!(done.end, ProcessEnd::Exited(0));
        looker.join().unwrap()
    });
    assert_eq!(
        inspected.trim(),
        format!("500000000 {} 50 none limited", 64 << 20)
    );

    // No network under `none`: loopback only.
    let done = run(
        &runner,
        spec(&dir, "net", "ls /sys/class/net"),
        idle.clone(),
    );
    assert_eq!(String::from_utf8_lossy(&done.stdout), "lo\n");

    // Killed for its memory: `oom`.
    let small = rt
        .block_on(DockerRunner::connect(
            "box",
            IMAGE,
            DockerSettings {
                memory_bytes: Some(8 << 20),
                ..settings()
            },
            &base,
            false,
        ))
        .unwrap();
    let done = run(
        &small,
        spec(
            &dir,
            "hungry",
            "head -c 200000000 /dev/zero | tail > /dev/null",
        ),
        idle.clone(),
    );
    assert_eq!(done.end, ProcessEnd::OutOfMemory);

    // A timeout stops the container (TERM, the grace period, KILL) and removes it.
    let mut s = spec(&dir, "slow", "sleep 60");
    s.timeout = Some(Duration::from_secs(1));
    let started = Instant::now();
    let done = run(&runner, s, idle.clone());
    assert_eq!(done.end, ProcessEnd::TimedOut);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(daemon.docker(&["ps", "-aq"]).trim(), "");

    // Cancelling does too.
    let (stop_tx, stop_rx) = watch::channel(Stop::No);
    let started = Instant::now();
    let done = rt.block_on(async {
        let running = runner.run(spec(&dir, "cancelled", "sleep 60"), stop_rx);
        let cancel = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            let _ = stop_tx.send(Stop::Graceful);
        };
        let (done, ()) = tokio::join!(running, cancel);
        done
    });
    assert_eq!(done.end, ProcessEnd::Cancelled);
    assert!(started.elapsed() < Duration::from_secs(20));
    assert_eq!(daemon.docker(&["ps", "-aq"]).trim(), "");
}
