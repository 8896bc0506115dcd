//! Runners place and supervise a task's process. The executor only sees [`Runner`]; the local
//! runner runs `sh -c` in its own process group with an explicit environment, its output going
//! straight to the attempt's log files.

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::{sleep, Instant};

/// What to run, where, and with which limits.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    /// A shell command, run by `/bin/sh -c`.
    pub command: String,
    /// The whole environment of the process: nothing is inherited.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when the process must stop.
    pub grace: Duration,
}

/// How a process ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessEnd {
    Exited(i32),
    /// Ended by a signal ccluster did not send.
    Signaled(i32),
    /// Ran past its timeout and was stopped.
    TimedOut,
    /// Stopped because the run is being cancelled.
    Cancelled,
    SpawnFailed(String),
}

/// How urgently running processes must stop (the run is being cancelled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stop {
    No,
    /// SIGTERM to the process group, SIGKILL after the grace period.
    Graceful,
    /// SIGKILL at once (a second Ctrl-C).
    Now,
}

pub type ProcessFuture = Pin<Box<dyn Future<Output = ProcessEnd> + Send>>;

/// Places and supervises processes.
pub trait Runner: Send + Sync {
    fn run(&self, spec: ProcessSpec, stop: watch::Receiver<Stop>) -> ProcessFuture;
}

/// Runs processes on this machine.
pub struct LocalRunner;

impl Runner for LocalRunner {
    fn run(&self, spec: ProcessSpec, stop: watch::Receiver<Stop>) -> ProcessFuture {
        Box::pin(run_local(spec, stop))
    }
}

fn signal_group(pgid: i32, signal: Signal) {
    // ESRCH (the group is gone) is the expected race here, not an error.
    let _ = killpg(Pid::from_raw(pgid), signal);
}

async fn run_local(spec: ProcessSpec, mut stop: watch::Receiver<Stop>) -> ProcessEnd {
    let open = |path: &PathBuf| {
        std::fs::File::create(path)
            .map_err(|e| format!("cannot create log file `{}`: {e}", path.display()))
    };
    let (stdout, stderr) = match (open(&spec.stdout), open(&spec.stderr)) {
        (Ok(o), Ok(e)) => (o, e),
        (Err(e), _) | (_, Err(e)) => return ProcessEnd::SpawnFailed(e),
    };
    let mut command = tokio::process::Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(&spec.command)
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        // Its own process group: a timeout or Ctrl-C stops the whole tree, and a Ctrl-C in the
        // terminal reaches ccluster only, which then stops tasks in order.
        .process_group(0);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            return ProcessEnd::SpawnFailed(format!(
                "cannot start `/bin/sh` in `{}`: {e}",
                spec.cwd.display()
            ))
        }
    };
    let Some(pgid) = child.id().map(|id| id as i32) else {
        return ProcessEnd::SpawnFailed("the process vanished at start".into());
    };
    let deadline = spec.timeout.map(|t| Instant::now() + t);
    let mut stop_open = true;
    loop {
        if *stop.borrow() != Stop::No {
            let level = *stop.borrow();
            terminate(&mut child, pgid, spec.grace, level, &mut stop).await;
            return ProcessEnd::Cancelled;
        }
        tokio::select! {
            status = child.wait() => {
                return match status {
                    Ok(s) => match (s.code(), s.signal()) {
                        (Some(code), _) => ProcessEnd::Exited(code),
                        (None, Some(sig)) => ProcessEnd::Signaled(sig),
                        (None, None) => ProcessEnd::Exited(-1),
                    },
                    Err(e) => ProcessEnd::SpawnFailed(format!("cannot wait for the process: {e}")),
                };
            }
            _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {
                terminate(&mut child, pgid, spec.grace, Stop::Graceful, &mut stop).await;
                return ProcessEnd::TimedOut;
            }
            changed = stop.changed(), if stop_open => {
                if changed.is_err() {
                    stop_open = false;
                }
            }
        }
    }
}

/// Stops the whole process group: SIGTERM, then SIGKILL after `grace` (or at once when `level` is
/// `Now`, or becomes `Now` meanwhile). Leftovers of the group are killed too.
async fn terminate(
    child: &mut Child,
    pgid: i32,
    grace: Duration,
    level: Stop,
    stop: &mut watch::Receiver<Stop>,
) {
    if level == Stop::Now {
        signal_group(pgid, Signal::SIGKILL);
        let _ = child.wait().await;
        return;
    }
    signal_group(pgid, Signal::SIGTERM);
    let escalate = async {
        loop {
            if *stop.borrow() == Stop::Now {
                return;
            }
            if stop.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = child.wait() => {}
        _ = sleep(grace) => {
            signal_group(pgid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
        _ = escalate => {
            signal_group(pgid, Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }
    // Children that outlived the shell (still in its group) must not survive a stopped task.
    signal_group(pgid, Signal::SIGKILL);
}
