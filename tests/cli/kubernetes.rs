//! The Kubernetes runner against a real single-node Kubernetes 1.20 (`scripts/k8s-for-tests.sh`):
//! attempts as Jobs, their classes (exit code, `oom`, `image`, `infra`), cancel, `kill -9` and
//! the next `apply`, parallel pods, workspaces that travel by git, and credentials that never
//! show in the cluster's objects or the state directory.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::support::root;
use crate::support::{Applied, Sandbox};

/// The kubectl `scripts/k8s-for-tests.sh` built with the cluster (of its version): a fresh
/// machine may have none.
pub(crate) fn kubectl() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    home.join(".cache/ccluster/k8s-1.20.2/bin/kubectl")
}

/// A started cluster, shared by the tests that run at the same time (each in a namespace of its
/// own); stopped, by pid, when the last of them is done.
pub(crate) struct Cluster {
    dir: tempfile::TempDir,
    netns: String,
    /// Whether `ccluster-test/worker:1` was made in the cluster's Docker daemon.
    worker: Mutex<bool>,
}

/// The image of agent pods in these tests: the Debian test image with the pinned `claude` CLI
/// on its PATH (what `docker/worker/Dockerfile` makes for users, without a registry).
pub const WORKER_IMAGE: &str = "ccluster-test/worker:1";

static SHARED: Mutex<Weak<Cluster>> = Mutex::new(Weak::new());

impl Cluster {
    pub fn get() -> Arc<Cluster> {
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = shared.upgrade() {
            return c;
        }
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(root().join("scripts/k8s-for-tests.sh"))
            .arg("start")
            .arg(dir.path())
            .arg("debian")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the test cluster did not start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = std::fs::read_to_string(dir.path().join("netns.pid")).unwrap();
        let cluster = Arc::new(Cluster {
            netns: format!("/proc/{}/ns/net", pid.trim()),
            dir,
            worker: Mutex::new(false),
        });
        *shared = Arc::downgrade(&cluster);
        cluster
    }

    /// Makes [`WORKER_IMAGE`] in the cluster's Docker daemon, once: a container of the Debian
    /// image with the CLI copied in, committed (no image builder needed).
    pub fn worker_image(&self) {
        let mut made = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        if *made {
            return;
        }
        let cli = std::fs::canonicalize(crate::support::claude_bin()).unwrap();
        let docker = |args: &[&str]| {
            let out = Command::new("docker")
                .args(args)
                .env("DOCKER_HOST", self.docker_host())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "docker {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let box_name = format!("worker-build-{}", std::process::id());
        docker(&[
            "create",
            "--name",
            &box_name,
            "ccluster-test/debian:1",
            "true",
        ]);
        docker(&[
            "cp",
            cli.to_str().unwrap(),
            &format!("{box_name}:/usr/local/bin/claude"),
        ]);
        docker(&["commit", &box_name, WORKER_IMAGE]);
        docker(&["rm", &box_name]);
        *made = true;
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    pub fn docker_host(&self) -> String {
        format!("unix://{}/docker/docker.sock", self.dir.path().display())
    }

    /// A fresh namespace for one test.
    pub fn namespace(&self, name: &str) -> String {
        let ns = format!("{name}-{}", std::process::id());
        self.kubectl_ok(&["create", "namespace", &ns]);
        // Its default service account comes a moment later; pods need it.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self
            .kubectl(&["get", "serviceaccount", "default", "-n", &ns])
            .0
        {
            assert!(
                Instant::now() < deadline,
                "namespace {ns} has no service account"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        ns
    }

    /// `kubectl ARGS` inside the cluster's network namespace: whether it succeeded, its stdout.
    pub fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns))
            .arg("--")
            .arg(kubectl())
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let (ok, out) = self.kubectl(args);
        assert!(ok, "kubectl {args:?}: {out}");
        out
    }

    /// `ccluster ARGS` in the sandbox, inside the cluster's network namespace (where the API
    /// server and the pods' network are), with the cluster's kubeconfig.
    pub fn ccluster(&self, s: &Sandbox, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_ccluster"))
            .args(args)
            .current_dir(s.path())
            .env_remove("CCLUSTER_STATE_DIR")
            .env("KUBECONFIG", self.kubeconfig())
            .env("DOCKER_HOST", self.docker_host())
            // The Docker bridge's address: where pods reach ccluster's git endpoint.
            .env("CCLUSTER_ADVERTISE_ADDR", "192.0.2.1")
            .stdin(std::process::Stdio::null());
        cmd
    }

    pub fn apply(&self, s: &Sandbox, extra: &[&str]) -> Applied {
        let mut args = vec!["apply", "--output", "json", "--grace-period", "2s"];
        args.extend_from_slice(extra);
        Applied::from_output(self.ccluster(s, &args).output().unwrap())
    }

    /// What is left of ccluster's in the namespace: Jobs, pods, Secrets, ConfigMaps and
    /// NetworkPolicies it labels.
    pub fn leftovers(&self, ns: &str) -> String {
        self.kubectl_ok(&[
            "get",
            "jobs,pods,secrets,configmaps,networkpolicies",
            "-n",
            ns,
            "-l",
            "ccluster.dev/state",
            "-o",
            "name",
        ])
        .trim()
        .to_string()
    }

    /// Waits until nothing of ccluster's is left in the namespace (pods take their grace
    /// period to go).
    pub fn assert_emptied(&self, ns: &str) {
        // (The kubelet of a loaded two-core machine can take a minute to tear pods down.)
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let left = self.leftovers(ns);
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "left in {ns}: {left}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// How many pods of the namespace are in `phase` (`Running`, `Succeeded`) now.
    pub fn pods_in(&self, ns: &str, phase: &str) -> usize {
        self.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            ns,
            "--field-selector",
            &format!("status.phase={phase}"),
            "-o",
            "name",
        ])
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
    }

    /// Watches the namespace's pods (`kubectl get pods --watch`) until [`PodWatch::pods`]: every
    /// pod made meanwhile, each one run of a task, however short it lived.
    pub fn watch_pods(&self, ns: &str) -> PodWatch {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns))
            .arg("--")
            .arg(kubectl())
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .args(["get", "pods", "-n", ns, "--watch", "-o", "name"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let seen = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let into = seen.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                into.lock().unwrap().insert(line.trim().to_string());
            }
        });
        // The watch lists what is there, then follows: it is in place once it answers.
        std::thread::sleep(Duration::from_millis(1500));
        PodWatch {
            _child: Reaped::new(child),
            seen,
        }
    }
}

/// The pods a `kubectl get pods --watch` has seen.
pub(crate) struct PodWatch {
    _child: Reaped,
    seen: Arc<Mutex<std::collections::BTreeSet<String>>>,
}

impl PodWatch {
    pub fn pods(&self) -> std::collections::BTreeSet<String> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(root().join("scripts/k8s-for-tests.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .status();
    }
}

/// A `ccluster` the test started: killed and reaped, by its pid, if the test ends (or fails)
/// before it did.
struct Reaped(Option<std::process::Child>);

impl Reaped {
    fn new(child: std::process::Child) -> Reaped {
        Reaped(Some(child))
    }

    fn id(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }

    fn running(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// `kill -9`, and reaped.
    fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn output(mut self) -> std::process::Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        self.kill();
    }
}

fn runner(ns: &str, extra: &str) -> String {
    format!(
        r#"[runners.k8s]
kind = "kubernetes"
image = "ccluster-test/debian:1"
namespace = "{ns}"
pull = "never"
{extra}
"#
    )
}

#[test]
fn twenty_shell_tasks_run_as_twenty_parallel_pods_and_leave_nothing() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("twenty");
    let s = Sandbox::new(&format!(
        r#"version = 1
{}
[tasks.each]
runner = "k8s"
map = [{}]
run = "echo task {{{{ item }}}} on $(hostname); echo its stderr >&2"
"#,
        runner(&ns, ""),
        (1..=20)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let pods = cluster.watch_pods(&ns);
    // Traced, to a receiver in the cluster's network namespace (where ccluster runs).
    let receiver = crate::otlp::Receiver::start_in(Some(&cluster.netns));
    let run = Applied::from_output(
        cluster
            .ccluster(
                &s,
                &[
                    "apply",
                    "--output",
                    "json",
                    "--grace-period",
                    "2s",
                    "-j",
                    "20",
                ],
            )
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.http)
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.tasks("task_succeeded").len(), 20, "{}", run.stdout);
    // Each attempt's runner operations are spans under its `runner.run`.
    let spans = receiver.spans();
    for operation in [
        "kubernetes.prepare",
        "kubernetes.create_job",
        "kubernetes.watch",
    ] {
        let found: Vec<&crate::otlp::Span> = spans.iter().filter(|s| s.name == operation).collect();
        assert_eq!(found.len(), 20, "{operation}: {found:#?}");
        for span in found {
            let parent = spans.iter().find(|p| Some(&p.id) == span.parent.as_ref());
            assert_eq!(
                parent.map(|p| p.name.as_str()),
                Some("runner.run"),
                "{span:#?}"
            );
        }
    }
    // Each ran in a pod of its own, at the same time as the others.
    let starts: Vec<&serde_json::Value> = run.of("task_started");
    let finishes: Vec<&serde_json::Value> = run.of("task_succeeded");
    let last_start = starts.iter().map(|e| e["time_ms"].as_u64().unwrap()).max();
    let first_end = finishes
        .iter()
        .map(|e| e["time_ms"].as_u64().unwrap())
        .min();
    assert!(last_start < first_end, "the pods did not run in parallel");
    let logs = s.command(&["logs", "latest", "each[3]"]).output().unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("task 4 on cc-"), "{logs}");
    assert!(logs.contains("stderr <==\nits stderr"), "{logs}");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(pods.pods().len(), 20, "{:?}", pods.pods());
    cluster.assert_emptied(&ns);
}

#[test]
fn exit_codes_deleted_pods_and_missing_images_are_classified() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("classes");
    let s = Sandbox::new(&format!(
        r#"version = 1
{}
[runners.nowhere]
kind = "kubernetes"
image = "ccluster-test/not-there:1"
namespace = "{ns}"
pull = "never"

[runners.small]
kind = "kubernetes"
image = "ccluster-test/debian:1"
namespace = "{ns}"
pull = "never"
resources = {{ limits = {{ memory = "32Mi" }} }}

[tasks.exits]
runner = "k8s"
run = "echo bye; exit 3"
retry = {{ limit = 0 }}

[runners.huge]
kind = "kubernetes"
image = "ccluster-test/debian:1"
namespace = "{ns}"
pull = "never"
resources = {{ requests = {{ cpu = "64" }} }}
unschedulable_timeout = "3s"

[tasks.slow]
runner = "k8s"
run = "sleep 120"
timeout = "5s"
retry = {{ limit = 0 }}

[tasks.nowhere_to_run]
runner = "huge"
run = "echo never"

[tasks.greedy]
runner = "small"
run = "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo held it"

[tasks.noimage]
runner = "nowhere"
run = "echo never"

[tasks.deleted]
runner = "k8s"
run = "if [ \"$CCLUSTER_ATTEMPT\" = 1 ]; then echo first; sleep 60; fi; echo second"
retry = {{ limit = 1, on = ["infra"], backoff = {{ initial = "100ms" }} }}
"#,
        runner(&ns, "")
    ));
    let mut child = cluster
        .ccluster(&s, &["apply", "--output", "json", "-k", "-j", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    // Someone deletes the first attempt's pod while it runs.
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let (_, pods) = cluster.kubectl(&[
            "get",
            "pods",
            "-n",
            &ns,
            "-l",
            "ccluster.dev/attempt=1",
            "--field-selector",
            "status.phase=Running",
            "-o",
            "name",
        ]);
        let pod = pods
            .lines()
            .find(|p| p.contains("-deleted-"))
            .map(str::to_string);
        if let Some(pod) = pod {
            cluster.kubectl_ok(&["delete", "-n", &ns, &pod, "--wait=false"]);
            break;
        }
        if !child.running() {
            let run = Applied::from_output(child.output());
            panic!(
                "the run ended before `deleted` ran: {}{}",
                run.stdout, run.stderr
            );
        }
        assert!(Instant::now() < deadline, "the task `deleted` never ran");
        std::thread::sleep(Duration::from_millis(300));
    }
    let run = Applied::from_output(child.output());
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let failed = |task: &str| {
        run.of("task_failed")
            .into_iter()
            .find(|e| e["task"] == task)
            .cloned()
            .unwrap_or_else(|| panic!("{task} did not fail: {}", run.stdout))
    };
    let exits = failed("exits");
    assert_eq!(exits["class"], "exit_code");
    assert_eq!(exits["exit_code"], 3);
    let slow = failed("slow");
    assert_eq!(slow["class"], "timeout", "{slow}");
    let unplaced = failed("nowhere_to_run");
    assert_eq!(unplaced["class"], "unschedulable", "{unplaced}");
    let message = unplaced["message"].as_str().unwrap();
    assert!(
        message.contains("could not be scheduled for 3s") && message.contains("Insufficient cpu"),
        "{message}"
    );
    assert_eq!(unplaced["attempt"], 1, "not retried by default");
    let greedy = failed("greedy");
    assert_eq!(greedy["class"], "oom", "{greedy}");
    assert_eq!(greedy["attempt"], 1, "oom is not retried by default");
    let noimage = failed("noimage");
    assert_eq!(noimage["class"], "image", "{noimage}");
    let message = noimage["message"].as_str().unwrap();
    assert!(
        message.contains("ccluster-test/not-there:1") && message.contains("ErrImageNeverPull"),
        "{message}"
    );
    // Not retried: one attempt.
    assert_eq!(noimage["attempt"], 1);
    let retried = run
        .of("task_retrying")
        .into_iter()
        .find(|e| e["task"] == "deleted")
        .cloned()
        .unwrap_or_else(|| panic!("`deleted` was not retried: {}", run.stdout));
    assert_eq!(retried["class"], "infra", "{retried}");
    assert!(run.tasks("task_succeeded").contains(&"deleted".to_string()));
    cluster.assert_emptied(&ns);
}

#[test]
fn cancel_deletes_the_jobs() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("cancel");
    let s = Sandbox::new(&format!(
        r#"version = 1
{}
[tasks.slow]
runner = "k8s"
map = [1, 2, 3]
run = "echo started {{{{ item }}}}; sleep 300"
"#,
        runner(&ns, "")
    ));
    let child = cluster
        .ccluster(&s, &["apply", "--output", "json", "--grace-period", "2s"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while cluster.pods_in(&ns, "Running") < 3 {
        assert!(Instant::now() < deadline, "the pods never started");
        std::thread::sleep(Duration::from_millis(300));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let started = Instant::now();
    let run = Applied::from_output(child.output());
    assert_eq!(run.code, 130, "{}{}", run.stdout, run.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(run.tasks("task_cancelled").len(), 3, "{}", run.stdout);
    let jobs = cluster.kubectl_ok(&["get", "jobs", "-n", &ns, "-o", "name"]);
    assert_eq!(jobs.trim(), "", "Jobs left after cancel");
    cluster.assert_emptied(&ns);
}

#[test]
fn after_kill_9_the_next_apply_harvests_finished_pods_and_adopts_running_ones() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("kill9");
    let s = Sandbox::new(&format!(
        r#"version = 1
{}
[tasks.work]
runner = "k8s"
map = ["quick-1", "quick-2", "slow-1", "slow-2"]
run = "echo started {{{{ item }}}}; case {{{{ item }}}} in quick*) sleep 8;; *) sleep 45;; esac; echo finished {{{{ item }}}}"
"#,
        runner(&ns, "")
    ));
    let pods = cluster.watch_pods(&ns);
    let mut child = cluster
        .ccluster(&s, &["apply", "-j", "4"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while cluster.pods_in(&ns, "Running") < 4 {
        assert!(Instant::now() < deadline, "the pods never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill();
    assert_eq!(
        cluster.pods_in(&ns, "Succeeded"),
        0,
        "a quick task ended before the kill"
    );
    // The quick ones finish while no ccluster watches.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = cluster.kubectl_ok(&[
            "get",
            "pods",
            "-n",
            &ns,
            "--field-selector",
            "status.phase=Succeeded",
            "-o",
            "name",
        ]);
        if done.lines().filter(|l| !l.trim().is_empty()).count() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the quick tasks never ended");
        std::thread::sleep(Duration::from_millis(300));
    }
    let run = cluster.apply(&s, &["-j", "4"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_eq!(run.tasks("task_succeeded").len(), 4, "{}", run.stdout);
    let adopted: Vec<String> = run
        .of("task_progress")
        .into_iter()
        .filter(|e| e["kind"] == "adopted")
        .map(|e| e["task"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(adopted.len(), 4, "{}", run.stdout);
    // No task ran twice: four pods in all, each task's log whole.
    assert_eq!(pods.pods().len(), 4, "{:?}", pods.pods());
    for (index, item) in [(0, "quick-1"), (3, "slow-2")] {
        let logs = s
            .command(&["logs", "latest", &format!("work[{index}]")])
            .output()
            .unwrap();
        let logs = String::from_utf8_lossy(&logs.stdout);
        assert!(
            logs.contains(&format!("started {item}\nfinished {item}\n")),
            "{logs}"
        );
    }
    cluster.assert_emptied(&ns);
}

#[test]
fn a_worktree_task_travels_by_git_and_gives_the_local_runners_result() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("travel");
    let clusterfile = |runner_name: &str| {
        format!(
            r#"version = 1
{}
[tasks.edit]
runner = "{runner_name}"
workspace = "worktree"
map = ["a", "b"]
run = "echo made by {{{{ item }}}} > {{{{ item }}}}.txt; echo more >> README; rm -f old.txt; mkdir -p deep/er && printf 'x\\0y' > deep/er/bin.dat"
[tasks.merge]
needs = ["edit"]
merge = {{ strategy = "git" }}
"#,
            runner(&ns, "")
        )
    };
    let files = [("README", "hello\n"), ("old.txt", "old\n")];
    let pods = Sandbox::in_repo(&clusterfile("k8s"), &files);
    let here = Sandbox::in_repo(&clusterfile("local"), &files);
    // Twice: the second run's pods push files the repository has already (the first's).
    for extra in [&[][..], &["--fresh"][..]] {
        let run = cluster.apply(&pods, extra);
        assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    }
    let local = here.apply(&[]);
    assert_eq!(local.code, 0, "{}{}", local.stdout, local.stderr);
    let change = |s: &Sandbox| {
        let run_id = s.run_id();
        crate::support::git(
            s.path(),
            &[
                "diff",
                "--binary",
                "HEAD",
                &format!("refs/ccluster/runs/{run_id}/merge"),
            ],
        )
    };
    let made = change(&pods);
    assert!(
        made.contains("+made by a") && made.contains("deleted file mode"),
        "{made}"
    );
    // (The clusterfiles differ in the base; the change made on it must not.)
    assert_eq!(made, change(&here));
    // The pods' carrier refs and the run's transport repository are gone.
    let refs = crate::support::git(pods.path(), &["for-each-ref", "--format=%(refname)"]);
    assert!(
        refs.lines().all(|r| r.starts_with("refs/ccluster/runs/")
            || r.starts_with("refs/ccluster/keep/")
            || r.starts_with("refs/heads/")),
        "{refs}"
    );
    assert!(std::fs::read_dir(pods.path().join(".ccluster/transport"))
        .map(|d| d.count() == 0)
        .unwrap_or(true));
    cluster.assert_emptied(&ns);
}

/// The shipped workflow with every task on a Kubernetes runner in `ns` (or, without one, as it
/// is: on this machine).
fn feature_fanout(ns: Option<&str>) -> String {
    let text = std::fs::read_to_string(root().join("workflows/feature-fanout.toml")).unwrap();
    let Some(ns) = ns else {
        return text;
    };
    let text = text.replace("[defaults]\n", "[defaults]\nrunner = \"k8s\"\n");
    format!(
        "{text}\n[runners.k8s]\nkind = \"kubernetes\"\nimage = \"{WORKER_IMAGE}\"\nnamespace = \"{ns}\"\npull = \"never\"\n"
    )
}

#[test]
fn feature_fanout_rehearsed_on_kubernetes_gives_the_local_result_and_shows_no_credential() {
    let cluster = Cluster::get();
    cluster.worker_image();
    let ns = cluster.namespace("fanout");
    let files = [("src/settings.rs", "pub fn settings() {}\n")];
    let here = Sandbox::in_repo(&feature_fanout(None), &files);
    let pods = Sandbox::in_repo(&feature_fanout(Some(&ns)), &files);
    let args = [
        "apply",
        "--rehearse",
        "--output",
        "json",
        "--var",
        "test_command=git diff --quiet HEAD && test -d .ccluster-rehearsal",
    ];
    let local = Applied::from_output(
        here.command(&args)
            .env("CCLUSTER_CLAUDE_BIN", crate::support::claude_bin())
            .output()
            .unwrap(),
    );
    assert_eq!(local.code, 0, "{}{}", local.stdout, local.stderr);
    let mut child = cluster
        .ccluster(&pods, &args)
        .env("CCLUSTER_CLAUDE_BIN", crate::support::claude_bin())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    // What the cluster holds while the agents work: every Job and pod as YAML.
    let mut seen = String::new();
    let mut credentials: Vec<(String, String)> = Vec::new();
    let mut policies = String::new();
    let deadline = Instant::now() + Duration::from_secs(240);
    while child.running() {
        assert!(Instant::now() < deadline, "the run did not end");
        let (_, yaml) = cluster.kubectl(&["get", "jobs,pods,configmaps", "-n", &ns, "-o", "yaml"]);
        seen.push_str(&yaml);
        let (_, yaml) = cluster.kubectl(&["get", "networkpolicies", "-n", &ns, "-o", "json"]);
        if yaml.contains("ccluster.dev/state") {
            policies = yaml;
        }
        for pair in secret_values(&cluster, &ns) {
            if !credentials.contains(&pair) {
                credentials.push(pair);
            }
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    let run = Applied::from_output(child.output());
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    // The planner and each part's agent ran as pods: one container each, with the merge's test.
    let mut ran = run.tasks("task_succeeded");
    ran.sort();
    let mut ran_here = local.tasks("task_succeeded");
    ran_here.sort();
    assert_eq!(ran, ran_here);
    assert!(
        ran.iter().filter(|t| t.starts_with("build[")).count() >= 2,
        "{ran:?}"
    );
    assert!(seen.contains("ccluster.dev/job"), "no pod was seen");
    // The agents' pods were `api-only`: a NetworkPolicy let them out to the run's endpoint (the
    // relay of the rehearsal's model server, and git) and DNS only. (The test cluster has no
    // network plugin to enforce it: this checks what is asked of one.)
    let policies: serde_json::Value =
        serde_json::from_str(&policies).expect("no NetworkPolicy was made");
    let policy = &policies["items"][0];
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Egress"]),
        "{policy}"
    );
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["ccluster.dev/network"],
        "api-only"
    );
    let egress = policy["spec"]["egress"].as_array().unwrap();
    let cidrs: Vec<&str> = egress
        .iter()
        .filter_map(|r| r["to"][0]["ipBlock"]["cidr"].as_str())
        .collect();
    assert_eq!(cidrs, ["192.0.2.1/32"], "{policy}");
    assert!(
        egress
            .iter()
            .all(|r| !r["to"].is_null() || r["ports"][0]["port"] == 53),
        "{policy}"
    );
    let change = |s: &Sandbox| {
        let run_id = s.run_id();
        crate::support::git(
            s.path(),
            &[
                "diff",
                "HEAD",
                &format!("refs/ccluster/runs/{run_id}/merge"),
            ],
        )
    };
    let made = change(&pods);
    assert!(made.contains(".ccluster-rehearsal/"), "{made}");
    assert_eq!(made, change(&here));
    // The credentials the pods had (the model's key, the git endpoint's token) are in no Job, pod
    // or ConfigMap, in nothing ccluster printed, and in no file of the state directory.
    let secrets = cluster.kubectl_ok(&["get", "secrets", "-n", &ns, "-o", "json"]);
    assert!(
        !secrets.contains("ccluster.dev/state"),
        "the run's Secret is left: {secrets}"
    );
    assert!(
        seen.contains("secretKeyRef"),
        "no credential was given by reference"
    );
    // The model's key (the scripted server's token), the relay's URL and the endpoint's token.
    // (Short values, such as a task's custom header, are searched for with no proof.)
    credentials.retain(|(_, v)| v.len() >= 32);
    assert!(credentials.len() >= 3, "{credentials:?}");
    for (name, value) in credentials {
        assert!(!seen.contains(&value), "{name} is in the cluster's objects");
        assert!(
            !run.stdout.contains(&value) && !run.stderr.contains(&value),
            "{name} was printed"
        );
        for file in crate::support::files_under(&pods.path().join(".ccluster")) {
            let bytes = std::fs::read(&file).unwrap_or_default();
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{name} reached {}",
                file.display()
            );
        }
    }
    cluster.assert_emptied(&ns);
}

/// The values of ccluster's Secrets in `ns` now (base64-decoded by coreutils' `base64`): the
/// credentials the run's pods get by reference. The endpoint's entry is `port token`: its token.
fn secret_values(cluster: &Cluster, ns: &str) -> Vec<(String, String)> {
    let (_, json) = cluster.kubectl(&[
        "get",
        "secrets",
        "-n",
        ns,
        "-l",
        "ccluster.dev/state",
        "-o",
        "json",
    ]);
    let Ok(list) = serde_json::from_str::<serde_json::Value>(&json) else {
        return Vec::new();
    };
    let mut values = Vec::new();
    for item in list["items"].as_array().into_iter().flatten() {
        for (key, encoded) in item["data"].as_object().into_iter().flatten() {
            let mut decode = Command::new("base64")
                .arg("-d")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            use std::io::Write;
            decode
                .stdin
                .take()
                .unwrap()
                .write_all(encoded.as_str().unwrap_or("").as_bytes())
                .unwrap();
            let out = decode.wait_with_output().unwrap();
            let value = String::from_utf8_lossy(&out.stdout).into_owned();
            let value = match key.as_str() {
                "endpoint" => value
                    .split_once(' ')
                    .map(|(_, t)| t.to_string())
                    .unwrap_or(value),
                _ => value,
            };
            values.push((key.clone(), value));
        }
    }
    values
}

#[test]
fn gc_removes_what_a_killed_run_left_in_the_namespace() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("gc");
    let s = Sandbox::in_repo(
        &format!(
            r#"version = 1
{}
[tasks.slow]
runner = "k8s"
workspace = "worktree"
run = "sleep 300"
"#,
            runner(&ns, "")
        ),
        &[("README", "hello\n")],
    );
    let mut child = cluster
        .ccluster(&s, &["apply"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster.pods_in(&ns, "Running") < 1 {
        assert!(Instant::now() < deadline, "the pod never started");
        std::thread::sleep(Duration::from_millis(300));
    }
    child.kill();
    // Its Job, the run's Secret (the endpoint's token) and the inputs are left.
    let left = cluster.leftovers(&ns);
    assert!(
        left.contains("job.batch/") && left.contains("secret/"),
        "{left}"
    );
    let out = cluster.ccluster(&s, &["gc", "--dry-run"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("would remove job/cc-"), "{said}");
    assert!(
        !cluster.leftovers(&ns).is_empty(),
        "--dry-run removed something"
    );
    let out = cluster.ccluster(&s, &["gc"]).output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("removed secret/ccluster-"), "{said}");
    cluster.assert_emptied(&ns);
}

/// A `git daemon` serving one bare repository (pushes allowed) on the Docker bridge's address,
/// inside the cluster's network namespace: a remote the pods reach. Stopped by its pid.
struct GitDaemon {
    child: Reaped,
    url: String,
    _dir: tempfile::TempDir,
}

impl GitDaemon {
    fn start(cluster: &Cluster) -> GitDaemon {
        let dir = tempfile::tempdir().unwrap();
        crate::support::git(dir.path(), &["init", "-q", "--bare", "remote.git"]);
        let port = 20000 + (std::process::id() % 10000) as u16;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", cluster.netns))
            .arg("--")
            .arg("git")
            .arg("daemon")
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--enable=receive-pack")
            .arg(format!("--base-path={}", dir.path().display()))
            .arg("--listen=192.0.2.1")
            .arg(format!("--port={port}"))
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map(Reaped::new)
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        GitDaemon {
            child,
            url: format!("git://192.0.2.1:{port}/remote.git"),
            _dir: dir,
        }
    }
}

#[test]
fn a_runner_with_a_remote_carries_workspaces_through_it() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("remote");
    let mut daemon = GitDaemon::start(&cluster);
    let s = Sandbox::in_repo(
        &format!(
            r#"version = 1
{}
[tasks.edit]
runner = "k8s"
workspace = "worktree"
run = "echo made in a pod > made.txt"
"#,
            runner(&ns, "remote = \"origin\"")
        ),
        &[("README", "hello\n")],
    );
    crate::support::git(s.path(), &["remote", "add", "origin", &daemon.url]);
    // The driver reaches the remote from the cluster's namespace, as pods do.
    let run = cluster.apply(&s, &[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let run_id = s.run_id();
    assert_eq!(
        crate::support::git(
            s.path(),
            &[
                "show",
                &format!("refs/ccluster/runs/{run_id}/edit:made.txt")
            ]
        ),
        "made in a pod\n"
    );
    // The run's refs on the remote are gone with the run; no endpoint token was given.
    let listed = Command::new("nsenter")
        .arg(format!("--net={}", cluster.netns))
        .arg("--")
        .args(["git", "ls-remote", &daemon.url])
        .output()
        .unwrap();
    assert!(listed.status.success());
    assert_eq!(String::from_utf8_lossy(&listed.stdout), "");
    daemon.child.kill();
    cluster.assert_emptied(&ns);
}

#[test]
fn a_planner_in_a_pod_told_its_graph_is_invalid_answers_again_in_the_same_session() {
    let cluster = Cluster::get();
    cluster.worker_image();
    let ns = cluster.namespace("replan");
    // First a graph with an unknown id, then, in the same session, a valid one.
    let rehearsal = r#"{ turns = [
  { tools = [{ name = "StructuredOutput", input = { subtasks = [{ id = "scaffold" }, { id = "tests", depends_on = ["scafold"] }] } }] },
  { tools = [{ name = "StructuredOutput", input = { subtasks = [{ id = "scaffold" }, { id = "tests", depends_on = ["scaffold"] }] } }] },
] }"#;
    let s = Sandbox::in_repo(
        &format!(
            r#"version = 1
[defaults]
runner = "k8s"

[runners.k8s]
kind = "kubernetes"
image = "{WORKER_IMAGE}"
namespace = "{ns}"
pull = "never"

[tasks.plan]
prompt = "Plan the feature"
output_schema = {{ type = "object", required = ["subtasks"], properties = {{ subtasks = {{ type = "array", items = {{ type = "object", required = ["id"], properties = {{ id = {{ type = "string" }}, depends_on = {{ type = "array", items = {{ type = "string" }} }} }} }} }} }} }}
retry = {{ limit = 2 }}
rehearsal = {rehearsal}

[tasks.build]
needs = ["plan"]
map = "{{{{ tasks.plan.output.subtasks }}}}"
id = "{{{{ item.id }}}}"
after = "{{{{ item.depends_on | default([]) }}}}"
prompt = "Build the {{{{ item.id }}}} part"

[tasks.all]
needs = ["build"]
merge = {{ strategy = "git" }}
"#
        ),
        &[("README", "hello\n")],
    );
    let run = Applied::from_output(
        cluster
            .ccluster(&s, &["apply", "--rehearse", "--output", "json"])
            .env("CCLUSTER_CLAUDE_BIN", crate::support::claude_bin())
            .output()
            .unwrap(),
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let retrying = run.of("task_retrying");
    assert_eq!(retrying.len(), 1, "{}", run.stdout);
    assert_eq!(retrying[0]["class"], "plan_invalid");
    assert_eq!(
        run.tasks("task_succeeded"),
        ["plan", "build[scaffold]", "build[tests]", "all"]
    );
    // The second attempt's pod resumed the first one's session: one session id in every request
    // the planner made, and the session's transcript (brought back from the pods) holds what it
    // was told.
    let run_id = s.run_id();
    let dir = s.path().join(".ccluster/runs").join(&run_id);
    let requests = std::fs::read_to_string(dir.join("rehearsal.jsonl")).unwrap();
    let sessions: std::collections::BTreeSet<String> = requests
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["task"] == "plan")
        .map(|r| r["session"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(sessions.len(), 1, "{requests}");
    let transcripts = crate::support::files_under(&dir.join("workers"));
    let told = transcripts.iter().any(|f| {
        f.extension().is_some_and(|e| e == "jsonl")
            && std::fs::read_to_string(f)
                .unwrap_or_default()
                .contains("did you mean `scaffold`?")
    });
    assert!(told, "no transcript holds the feedback: {transcripts:?}");
    cluster.assert_emptied(&ns);
}

#[test]
fn artifacts_and_test_reports_come_back_from_pods_even_when_git_ignores_them() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("artifacts");
    let s = Sandbox::in_repo(
        &format!(
            r#"version = 1
{}
[tasks.test]
runner = "k8s"
workspace = "worktree"
run = "mkdir -p out && echo built > out/app.bin && printf '<testsuite tests=\"3\"><testcase name=\"a\"/><testcase name=\"b\"/><testcase name=\"c\"><failure/></testcase></testsuite>' > out/junit.xml && echo changed >> README"
artifacts = ["out/app.bin"]
reports = ["out/*.xml"]
"#,
            runner(&ns, "")
        ),
        &[("README", "hello\n")],
    );
    s.file(".gitignore", ".ccluster/\nout/\n").unwrap();
    s.commit_all("out/ is built");
    let run = cluster.apply(&s, &[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let listing = s.command(&["artifacts", "latest"]).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    assert!(listing.contains("file   out/app.bin"), "{listing}");
    assert!(
        listing.contains("report out/junit.xml: 2 passed, 1 failed, 0 skipped"),
        "{listing}"
    );
    let got = s
        .command(&["artifacts", "latest", "test", "--get", "out/app.bin"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&got.stdout), "built\n");
    // What git ignores stays out of the task's commit, as on this machine.
    let run_id = s.run_id();
    let files = crate::support::git(
        s.path(),
        &[
            "ls-tree",
            "-r",
            "--name-only",
            &format!("refs/ccluster/runs/{run_id}/test"),
        ],
    );
    assert!(!files.contains("out/"), "{files}");
    cluster.assert_emptied(&ns);
}

#[test]
fn a_worktree_pod_left_running_by_a_killed_ccluster_pushes_to_the_next_ones_endpoint() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("readopt");
    let s = Sandbox::in_repo(
        &format!(
            r#"version = 1
{}
[tasks.edit]
runner = "k8s"
workspace = "worktree"
run = "sleep 20; echo made while nobody watched > made.txt"
"#,
            runner(&ns, "")
        ),
        &[("README", "hello\n")],
    );
    let pods = cluster.watch_pods(&ns);
    let mut child = cluster
        .ccluster(&s, &["apply"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Reaped::new)
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while cluster.pods_in(&ns, "Running") < 1 {
        assert!(Instant::now() < deadline, "the pod never started");
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill();
    // The next apply listens where the first did, with its token (remembered in the run's
    // Secret): the pod it adopts pushes there when its task ends.
    let run = cluster.apply(&s, &[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let adopted: Vec<&serde_json::Value> = run
        .of("task_progress")
        .into_iter()
        .filter(|e| e["kind"] == "adopted")
        .collect();
    assert_eq!(adopted.len(), 1, "{}", run.stdout);
    let run_id = s.run_id();
    assert_eq!(
        crate::support::git(
            s.path(),
            &[
                "show",
                &format!("refs/ccluster/runs/{run_id}/edit:made.txt")
            ]
        ),
        "made while nobody watched\n"
    );
    assert_eq!(
        pods.pods().len(),
        1,
        "the task ran again: {:?}",
        pods.pods()
    );
    cluster.assert_emptied(&ns);
}

#[test]
fn a_secret_read_from_a_kubernetes_secret_reaches_its_task_and_is_masked() {
    let cluster = Cluster::get();
    let ns = cluster.namespace("secret-source");
    cluster.kubectl_ok(&[
        "create",
        "secret",
        "generic",
        "api-tokens",
        "-n",
        &ns,
        "--from-literal=token=kube-held-value-4921",
    ]);
    let s = Sandbox::new(&format!(
        r#"version = 1
[secrets.TOKEN]
from = "kubernetes:{ns}/api-tokens/token"

[tasks.use]
secrets = ["TOKEN"]
run = 'test "$TOKEN" = kube-held-value-4921 && echo "the task got $TOKEN"'
"#
    ));
    let run = cluster.apply(&s, &[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let logs = s.command(&["logs", "latest", "use"]).output().unwrap();
    let logs = String::from_utf8_lossy(&logs.stdout);
    assert!(logs.contains("the task got [secret TOKEN]"), "{logs}");
    // Nothing the run wrote holds the value.
    for file in crate::support::files_under(&s.path().join(".ccluster")) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains("kube-held-value-4921"),
            "{} holds the value",
            file.display()
        );
    }
    // A key the Secret does not have stops the run before it starts, naming the source.
    s.write(&s.read("clusterfile.toml").replace("/token\"", "/missing\""));
    let run = cluster.apply(&s, &[]);
    assert_eq!(run.code, 2, "{}{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "secret `TOKEN` (from `kubernetes:{ns}/api-tokens/missing`) cannot be read: the Secret `api-tokens` in namespace `{ns}` has no key `missing`"
        )),
        "{}",
        run.stderr
    );
}
