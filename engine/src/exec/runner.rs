//! Runners place and supervise a task's process. The executor only sees [`Runner`]; the local
//! runner runs `sh -c` (or, for a simple command, its program: [`super::direct`]) in its own
//! process group with an explicit environment; its output is streamed to the attempt's log files
//! (created on the first byte), and the end of stdout is kept for the task's output.

use std::future::Future;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;
use tokio::sync::watch;
use tokio::time::{sleep, Instant};

use super::direct::Direct;

/// What to run, where, and with which limits.
#[derive(Clone, Debug)]
pub struct ProcessSpec {
    /// A shell command, run by `/bin/sh -c` (unless `argv` is given: then it only describes it).
    pub command: String,
    /// A program and its arguments, run without a shell.
    pub argv: Option<Vec<String>>,
    /// Receives stdout line by line as it arrives (an agent's stream-json), besides the log.
    pub lines: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    /// The whole environment of the process: nothing is inherited.
    pub env: Vec<(String, String)>,
    /// Written to the process's stdin, which is then closed (an agent's prompt: on the command
    /// line it would be limited to 128 KiB and shown by `ps`). `None`: stdin is `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    pub cwd: PathBuf,
    /// The attempt's workspace (or, for a task without one, the clusterfile's directory): what
    /// the process may change besides `cwd`. A runner that isolates the process makes it visible
    /// at the same path.
    pub workspace: Option<PathBuf>,
    /// What the process reads outside its workspace (an agent's CLI, a settings file): a runner
    /// that isolates it shows these read-only at the same path.
    pub reads: Vec<PathBuf>,
    /// Directories of its own it writes besides the workspace (an agent worker's config and temp
    /// directories): shown writable at the same path.
    pub writes: Vec<PathBuf>,
    /// Names in `env` whose values are credentials: a runner that can keep them from sight (from
    /// `docker inspect`, say) does.
    pub secret_env: Vec<String>,
    /// An agent's model API (its base URL): where `network = "api-only"` lets it go.
    pub model_api: Option<String>,
    /// Who the process is, for a runner's labels and its notices (refused connections).
    pub identity: Option<Identity>,
    /// Globs, relative to the workspace, of files the task leaves that ccluster keeps (its
    /// `artifacts` and `reports`): a runner whose process works on another machine brings them
    /// back, ignored by git or not.
    pub keeps: Vec<String>,
    /// Instead of starting the process, take over this work a killed ccluster left (see
    /// [`Runner::adopt`]): its output from the start, then its end.
    pub adopt: Option<String>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub timeout: Option<Duration>,
    /// Time between SIGTERM and SIGKILL when the process must stop.
    pub grace: Duration,
}

/// The attempt a process belongs to, and where a runner tells what happened around it.
#[derive(Clone, Debug)]
pub struct Identity {
    pub run: String,
    pub node: String,
    pub attempt: u32,
    /// The attempt's cache key, when it has one: an attempt of a later run with the same key
    /// does the same work (see [`Runner::adopt`]).
    pub cache_key: Option<String>,
    /// The run's state directory: what marks the runner's work as this state's.
    pub state_dir: PathBuf,
    pub events: tokio::sync::mpsc::UnboundedSender<super::Event>,
}

impl Identity {
    /// Tells a progress notice of the attempt (`kind` as in `task_progress` events).
    pub fn notice(&self, kind: &str, detail: String) {
        let _ = self.events.send(super::Event::TaskProgress {
            run: self.run.clone(),
            task: self.node.clone(),
            attempt: self.attempt,
            kind: kind.into(),
            detail,
            time_ms: crate::store::now_ms(),
        });
    }
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
    /// Could not be started, and never will be as it stands: its arguments or environment are
    /// too large for the system (`E2BIG`), or a path is too long (`ENAMETOOLONG`). Not retried.
    Unstartable(String),
    /// Killed for using more memory than its limit (a container's `memory`).
    OutOfMemory,
    /// Failed for a reason the runner tells (a pod evicted, an image missing).
    Failed(crate::model::raw::FailureClass, String),
}

impl std::fmt::Display for ProcessEnd {
    /// In words, for messages: `exit code 3`, `killed by signal 9`, `timed out`...
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProcessEnd::Exited(c) => write!(f, "exit code {c}"),
            ProcessEnd::Signaled(s) => write!(f, "killed by signal {s}"),
            ProcessEnd::TimedOut => f.write_str("timed out"),
            ProcessEnd::Cancelled => f.write_str("cancelled"),
            ProcessEnd::OutOfMemory => f.write_str("killed for using more memory than its limit"),
            ProcessEnd::SpawnFailed(e) | ProcessEnd::Unstartable(e) => f.write_str(e),
            ProcessEnd::Failed(_, e) => f.write_str(e),
        }
    }
}

/// How a process ended, and the end of what it printed on stdout (for the task's output).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessResult {
    pub end: ProcessEnd,
    /// The last [`STDOUT_KEPT`] bytes of stdout (the whole of it is in the log file).
    pub stdout: Vec<u8>,
}

/// How much of stdout is kept in memory for the task's output.
pub const STDOUT_KEPT: usize = 4 << 20;

/// After the main process exits, how long its output pipes are still read: a background child
/// that keeps them open must not hold the task forever.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(250);

/// The kernel's limit on one argument or environment string (`MAX_ARG_STRLEN`, 32 pages).
const MAX_ARG_STRLEN: usize = 128 << 10;

/// The kernel's limit on all arguments and environment together: a quarter of the stack limit,
/// at most 6 MiB, at least 128 KiB.
fn max_args_total() -> usize {
    let stack = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_STACK)
        .map_or(8 << 20, |(soft, _)| soft);
    ((stack / 4).min(6 << 20) as usize).max(MAX_ARG_STRLEN)
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

pub type ProcessFuture = Pin<Box<dyn Future<Output = ProcessResult> + Send>>;

/// Places and supervises processes.
pub trait Runner: Send + Sync {
    fn run(&self, spec: ProcessSpec, stop: watch::Receiver<Stop>) -> ProcessFuture;

    /// What kind of runner this is (`local`, `docker`, `kubernetes`): a label of its metrics.
    fn kind(&self) -> &'static str {
        "local"
    }

    /// Finds what dead ccluster processes of the state directory `state_dir` left with this
    /// runner (a killed ccluster cannot clean up), before a new run starts; we hold the state's
    /// lock, so whatever carries its mark is an orphan. Finished or running work a task of the new
    /// run may adopt (see [`Runner::adopt`]) is kept, and its workspace returned so that it is
    /// not cleaned away; the rest is stopped and removed. The local runner's leftovers are found
    /// by the process sweep instead (and are never adopted: their output pipes died with ccluster).
    fn recover(&self, state_dir: &Path) -> Pin<Box<dyn Future<Output = Vec<PathBuf>> + Send + '_>> {
        let _ = state_dir;
        Box::pin(std::future::ready(Vec::new()))
    }

    /// The kept work of an attempt of `node` whose cache key was `key` (the same work a new
    /// attempt with that key would do), taken over by the caller, which runs its process with
    /// `ProcessSpec::adopt` set to [`Adopted::handle`].
    fn adopt(&self, node: &str, key: &str) -> Option<Adopted> {
        let _ = (node, key);
        None
    }

    /// Removes kept work that nothing adopted: the run that could have is ending.
    fn release(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(std::future::ready(()))
    }
}

/// Work a killed ccluster left running (or finished) with a runner, taken over by a new attempt.
#[derive(Clone, Debug)]
pub struct Adopted {
    /// What the runner knows it by (a container's name).
    pub handle: String,
    /// The workspace it works in: the new attempt's workspace is moved from there.
    pub workspace: Option<PathBuf>,
}

/// The runners of a run, by the names tasks give in `runner`; `local` is always there.
#[derive(Clone)]
pub struct Runners {
    local: std::sync::Arc<dyn Runner>,
    named: std::collections::HashMap<String, std::sync::Arc<dyn Runner>>,
}

impl Runners {
    /// Every task on `local`.
    pub fn local(local: std::sync::Arc<dyn Runner>) -> Runners {
        Runners {
            local,
            named: Default::default(),
        }
    }

    /// Adds a declared runner.
    pub fn with(mut self, name: &str, runner: std::sync::Arc<dyn Runner>) -> Runners {
        self.named.insert(name.to_string(), runner);
        self
    }

    /// The runner a task names (the local one for `local`).
    pub fn get(&self, name: &str) -> &std::sync::Arc<dyn Runner> {
        self.named.get(name).unwrap_or(&self.local)
    }

    /// Every runner (one declared as `local` is the local runner again).
    pub fn all(&self) -> impl Iterator<Item = &std::sync::Arc<dyn Runner>> {
        std::iter::once(&self.local).chain(self.named.values())
    }

    /// Whether `name` has a runner here (`local` always has).
    pub fn has(&self, name: &str) -> bool {
        name == "local" || self.named.contains_key(name)
    }
}

/// Runs processes on this machine.
#[derive(Debug)]
pub struct LocalRunner {
    programs: super::direct::Resolver,
    /// Every command through `sh -c`, simple ones too (`CCLUSTER_ALWAYS_SHELL=1`).
    always_shell: bool,
}

impl LocalRunner {
    /// A runner that passes every command to `sh -c` when `always_shell`, else simple commands
    /// straight to their program.
    pub fn new(always_shell: bool) -> LocalRunner {
        LocalRunner {
            programs: super::direct::Resolver::default(),
            always_shell,
        }
    }
}

impl Runner for LocalRunner {
    fn run(&self, spec: ProcessSpec, stop: watch::Receiver<Stop>) -> ProcessFuture {
        let direct = match &spec.argv {
            None if !self.always_shell => self.programs.direct(&spec.command, &spec.env, &spec.cwd),
            _ => None,
        };
        Box::pin(run_local(spec, direct, stop))
    }
}

/// Kills the process group if the supervising future is dropped before the process ended (the
/// run aborted, e.g. on a failed state write): no task may outlive its supervisor.
struct GroupGuard {
    pgid: i32,
    armed: bool,
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            signal_group(self.pgid, Signal::SIGKILL);
        }
    }
}

fn signal_group(pgid: i32, signal: Signal) {
    // ESRCH (the group is gone) is the expected race here, not an error.
    let _ = killpg(Pid::from_raw(pgid), signal);
}

/// A log file created on the first byte written: most tasks print nothing, and creating two empty
/// files per attempt costs more than running a small command.
pub(crate) struct LazyLog {
    path: PathBuf,
    file: Option<std::fs::File>,
    failed: bool,
    /// Masks the run's secrets; holds back the end of what it was given until the next piece
    /// (a value may be cut between two reads) or the drop.
    redact: Option<crate::secrets::StreamRedactor>,
}

impl LazyLog {
    pub(crate) fn new(path: PathBuf) -> LazyLog {
        LazyLog {
            path,
            file: None,
            failed: false,
            redact: crate::secrets::active().map(|r| r.stream()),
        }
    }

    pub(crate) fn write(&mut self, bytes: &[u8]) {
        match &mut self.redact {
            Some(redact) => {
                let mut masked = Vec::with_capacity(bytes.len());
                redact.push(bytes, &mut masked);
                if !masked.is_empty() {
                    self.write_out(&masked);
                }
            }
            None => self.write_out(bytes),
        }
    }

    fn write_out(&mut self, bytes: &[u8]) {
        use std::io::Write;
        if self.failed {
            return;
        }
        if self.file.is_none() {
            // Logs hold whatever the task printed: the owner's only.
            let created = crate::store::private_file()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&self.path);
            match created {
                Ok(f) => self.file = Some(f),
                Err(_) => {
                    self.failed = true;
                    return;
                }
            }
        }
        if let Some(f) = &mut self.file {
            if f.write_all(bytes).is_err() {
                self.failed = true;
            }
        }
    }
}

impl Drop for LazyLog {
    /// The end of the stream: what the masker held back is written.
    fn drop(&mut self) {
        if let Some(mut redact) = self.redact.take() {
            let mut rest = Vec::new();
            redact.finish(&mut rest);
            if !rest.is_empty() {
                self.write_out(&rest);
            }
        }
    }
}

async fn read_some<R: AsyncRead + Unpin>(reader: &mut Option<R>, buf: &mut [u8]) -> usize {
    match reader {
        Some(r) => r.read(buf).await.unwrap_or(0),
        None => std::future::pending().await,
    }
}

/// The process of `spec`: its program (`direct`, when the command needs no shell), arguments,
/// directory and whole environment.
fn command_of(spec: &ProcessSpec, direct: Option<&Direct>) -> tokio::process::Command {
    let mut command = match (&spec.argv, direct) {
        (Some(argv), _) if !argv.is_empty() => {
            let mut c = tokio::process::Command::new(&argv[0]);
            c.args(&argv[1..]);
            c
        }
        (_, Some(direct)) => {
            let mut c = tokio::process::Command::new(&direct.program);
            c.arg0(&direct.argv[0]).args(&direct.argv[1..]);
            c
        }
        _ => {
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c").arg(&spec.command);
            c
        }
    };
    command
        .current_dir(&spec.cwd)
        .env_clear()
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(match spec.stdin {
            Some(_) => Stdio::piped(),
            None => Stdio::null(),
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a timeout or Ctrl-C stops the whole tree, and a Ctrl-C in the
        // terminal reaches ccluster only, which then stops tasks in order.
        .process_group(0);
    if let (None, Some(Direct { pwd: Some(pwd), .. })) = (&spec.argv, direct) {
        command.env("PWD", pwd);
    }
    command
}

async fn run_local(
    spec: ProcessSpec,
    direct: Option<Direct>,
    mut stop: watch::Receiver<Stop>,
) -> ProcessResult {
    let failed = |e: String| ProcessResult {
        end: ProcessEnd::SpawnFailed(e),
        stdout: Vec::new(),
    };
    let (spawned, ran_direct) = match command_of(&spec, direct.as_ref()).spawn() {
        // The shell decides what a program that cannot be executed means (a script without `#!`
        // is run as a shell script, a vanished one is exit code 127): ask it.
        Err(_) if direct.is_some() => (command_of(&spec, None).spawn(), false),
        spawned => (spawned, direct.is_some()),
    };
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let program = spec
                .argv
                .as_ref()
                .and_then(|a| a.first())
                .map_or("/bin/sh", String::as_str);
            let message = format!("cannot start `{program}` in `{}`: {e}", spec.cwd.display());
            return match e.raw_os_error() {
                // Starting it again cannot help: say what is too large.
                Some(code) if code == nix::libc::E2BIG || code == nix::libc::ENAMETOOLONG => {
                    ProcessResult {
                        end: ProcessEnd::Unstartable(format!(
                            "{message}; the command line and environment are limited to \
                             {} KiB for one value and about {} KiB in all",
                            MAX_ARG_STRLEN >> 10,
                            max_args_total() >> 10
                        )),
                        stdout: Vec::new(),
                    }
                }
                _ => failed(message),
            };
        }
    };
    let Some(pgid) = child.id().map(|id| id as i32) else {
        return failed("the process vanished at start".into());
    };
    super::reaper::started(pgid);
    let attempt = super::reaper::Attempt::of(&spec.env);
    let mut guard = GroupGuard { pgid, armed: true };
    if let (Some(bytes), Some(mut stdin)) = (spec.stdin.clone(), child.stdin.take()) {
        // Written off the loop: a process that reads its input slowly must not hold anything up.
        // A process that exits without reading it all ends the write (EPIPE), which is no error.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&bytes).await;
        });
    }
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let (mut out_log, mut err_log) = (
        LazyLog::new(spec.stdout.clone()),
        LazyLog::new(spec.stderr.clone()),
    );
    let (mut out_buf, mut err_buf) = (vec![0u8; 16 << 10], vec![0u8; 16 << 10]);
    let mut kept: Vec<u8> = Vec::new();
    let mut lines = super::lines::LineSplitter::default();
    let timeout_at = spec.timeout.map(|t| Instant::now() + t);
    let mut end: Option<ProcessEnd> = None;
    let mut drain_until: Option<Instant> = None;
    let mut stop_open = true;
    loop {
        if end.is_some() && out.is_none() && err.is_none() {
            break;
        }
        if end.is_none() && *stop.borrow() != Stop::No {
            let level = *stop.borrow();
            terminate(&mut child, pgid, spec.grace, level, &mut stop).await;
            end = Some(ProcessEnd::Cancelled);
            drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
        }
        tokio::select! {
            n = read_some(&mut out, &mut out_buf) => {
                if n == 0 {
                    out = None;
                } else {
                    out_log.write(&out_buf[..n]);
                    if let Some(tx) = &spec.lines {
                        lines.push(&out_buf[..n], |line| {
                            let _ = tx.send(line);
                        });
                    }
                    kept.extend_from_slice(&out_buf[..n]);
                    if kept.len() > 2 * STDOUT_KEPT {
                        kept.drain(..kept.len() - STDOUT_KEPT);
                    }
                }
            }
            n = read_some(&mut err, &mut err_buf) => {
                if n == 0 { err = None } else { err_log.write(&err_buf[..n]) }
            }
            status = child.wait(), if end.is_none() => {
                end = Some(match status {
                    Ok(s) => match (s.code(), s.signal()) {
                        (Some(code), _) => ProcessEnd::Exited(code),
                        (None, Some(sig)) => ProcessEnd::Signaled(sig),
                        (None, None) => ProcessEnd::Exited(-1),
                    },
                    Err(e) => ProcessEnd::SpawnFailed(format!("cannot wait for the process: {e}")),
                });
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
            _ = async { match drain_until { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => break,
            _ = async { match timeout_at { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } }, if end.is_none() => {
                terminate(&mut child, pgid, spec.grace, Stop::Graceful, &mut stop).await;
                end = Some(ProcessEnd::TimedOut);
                drain_until = Some(Instant::now() + DRAIN_AFTER_EXIT);
            }
            changed = stop.changed(), if stop_open && end.is_none() => {
                if changed.is_err() {
                    stop_open = false;
                }
            }
        }
    }
    guard.armed = false;
    super::reaper::ended(pgid);
    // The attempt is over: what it started in the background goes with it.
    super::reaper::stop_leftovers(pgid, &attempt);
    if let Some(tx) = &spec.lines {
        lines.finish(|line| {
            let _ = tx.send(line);
        });
    }
    if kept.len() > STDOUT_KEPT {
        kept.drain(..kept.len() - STDOUT_KEPT);
    }
    let end = match end.unwrap_or(ProcessEnd::Exited(-1)) {
        // `sh -c` reports a program killed by a signal as exit code 128 + the signal; so does a
        // simple command run directly, lest skipping the shell change what a task's failure is.
        ProcessEnd::Signaled(signal) if ran_direct => ProcessEnd::Exited(128 + signal),
        end => end,
    };
    ProcessResult { end, stdout: kept }
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
