//! The processes above the ccluster that runs tasks (`apply`, `retry`, `run`), so that no process
//! a task started outlives ccluster, not even after a `kill -9`:
//!
//! ```text
//! shell ── ccluster (the process the shell started: passes signals on, exits as the worker did)
//!            └── ccluster (the keeper: adopts orphans, kills what is left when the worker dies)
//!                  └── ccluster (the worker: holds the state, runs the tasks, adopts orphans)
//!                        └── tasks, and whatever they start
//! ```
//!
//! - The worker adopts its tasks' orphans and stops what an attempt leaves behind when the attempt
//!   ends (`exec::reaper`).
//! - If the worker dies by a signal (`kill -9` of the pid in the lock, a crash), everything below
//!   it is handed to the keeper (a subreaper), which kills it all, whatever it did to hide
//!   (`setsid`, `env -i`, a double fork), then exits with 128 + the signal.
//! - If the process the shell started is killed (`kill -9`), the keeper is told by the kernel
//!   (`PR_SET_PDEATHSIG`) and kills the worker at once, then everything below it: the state's lock
//!   is free as soon as it would have been had the worker itself been killed.
//! - If the keeper dies, the worker sees its end of a pipe close, kills everything below itself
//!   and exits.
//! - SIGTERM, SIGINT, SIGHUP and SIGQUIT sent with `kill` are passed down to the worker; those the
//!   terminal sends reach all three already, and are not passed again.
//!
//! Costs two `fork`s per run, nothing per task.

use std::os::fd::OwnedFd;

use ccluster_engine::exec::reaper;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, getppid, ForkResult, Pid};

/// The signal the keeper gets when the process the shell started dies.
const PARENT_DIED: Signal = Signal::SIGUSR1;

/// Stop signals: passed down when sent by a process.
const PASSED_ON: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

fn set_of(signals: &[Signal]) -> SigSet {
    let mut set = SigSet::empty();
    for signal in signals {
        set.add(*signal);
    }
    set
}

/// Blocks `signals` (so that they are read from a signalfd); the mask before.
fn block(signals: &SigSet) -> Option<SigSet> {
    let mut before = SigSet::empty();
    nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(signals), Some(&mut before))
        .ok()
        .map(|_| before)
}

fn restore(mask: &SigSet) {
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(mask), None);
}

/// Splits into the three processes. Returns in the worker (or, if a split fails, in the process
/// that could not split, unsupervised); the others never return: each exits as its child did.
pub fn split() {
    let mut watched = set_of(&PASSED_ON);
    watched.add(Signal::SIGCHLD);
    // Blocked before each fork, so that nothing the child does meanwhile is missed.
    let Some(original) = block(&watched) else {
        reaper::become_subreaper();
        return;
    };
    let shell_child = nix::unistd::getpid();
    // SAFETY: no other thread exists yet (this runs first thing in `main`, before any runtime),
    // so the child may do anything a fresh process may.
    match unsafe { fork() } {
        Err(_) => {
            restore(&original);
            reaper::become_subreaper();
        }
        Ok(ForkResult::Parent { child }) => std::process::exit(match relay(child, None) {
            Ok(code) => code,
            Err(signal) => 128 + signal as i32,
        }),
        Ok(ForkResult::Child) => keep(shell_child, &original),
    }
}

/// In the keeper: starts the worker and stays above it. Returns in the worker.
fn keep(parent: Pid, original: &SigSet) {
    // Blocked first: the signal is read from the signalfd, never acted on by default.
    let _ = block(&set_of(&[PARENT_DIED]));
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_pdeathsig(PARENT_DIED);
    if getppid() != parent {
        // Killed before we could watch it: nothing has run yet.
        std::process::exit(128 + Signal::SIGKILL as i32);
    }
    reaper::become_subreaper();
    let Ok((alive_read, alive_write)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        restore(original);
        return;
    };
    // SAFETY: still a single thread, as in `split`.
    match unsafe { fork() } {
        Err(_) => restore(original),
        Ok(ForkResult::Child) => {
            drop(alive_write);
            restore(original);
            reaper::become_subreaper();
            watch_keeper(alive_read);
        }
        Ok(ForkResult::Parent { child }) => {
            drop(alive_read);
            let code = match relay(child, Some(parent)) {
                Ok(code) => code,
                Err(signal) => {
                    // The worker was killed: its tasks, and whatever they started, are ours now.
                    reaper::kill_descendants(std::process::id() as i32, true, 50);
                    128 + signal as i32
                }
            };
            drop(alive_write);
            std::process::exit(code);
        }
    }
}

/// In the worker: if the keeper dies, nothing would be left to stop the tasks after us: kill
/// everything below and exit now, as a `kill -9` would have, leaving the run to be found
/// interrupted by the next `apply`.
fn watch_keeper(alive: OwnedFd) {
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        loop {
            match nix::unistd::read(&alive, &mut byte) {
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
        reaper::kill_descendants(std::process::id() as i32, false, 20);
        // SAFETY: `_exit` ends the process at once; nothing of ours needs to run any more.
        unsafe { nix::libc::_exit(128 + Signal::SIGKILL as i32) };
    });
}

/// Passes stop signals down to `child` until it ends, and (with `parent`, in the keeper) kills it
/// when `parent` dies. Its end: the exit code, or the signal that killed it.
fn relay(child: Pid, parent: Option<Pid>) -> Result<i32, Signal> {
    let mut watched = set_of(&PASSED_ON);
    watched.add(Signal::SIGCHLD);
    if parent.is_some() {
        watched.add(PARENT_DIED);
    }
    let signals = SignalFd::new(&watched).ok();
    loop {
        if let Some(end) = reap(child) {
            return end;
        }
        let info = match signals.as_ref().map(SignalFd::read_signal) {
            Some(Ok(Some(info))) => info,
            Some(Ok(None) | Err(nix::errno::Errno::EINTR)) => continue,
            // Without a signalfd, signals cannot be passed on: wait for the child alone.
            None | Some(Err(_)) => return wait_for(child),
        };
        let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        if signal == PARENT_DIED && parent.is_some_and(|p| getppid() != p) {
            let _ = kill(child, Signal::SIGKILL);
        } else if PASSED_ON.contains(&signal) && info.ssi_code <= 0 {
            // Sent by a process (`kill`, si_code <= 0), not by the terminal or the kernel, which
            // signal the whole foreground process group themselves.
            let _ = kill(child, signal);
        }
    }
}

/// Waits for `child`'s end: its exit code, or the signal that killed it.
fn wait_for(child: Pid) -> Result<i32, Signal> {
    loop {
        match waitpid(child, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Err(signal),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Ok(1),
        }
    }
}

/// Collects ended children (`child`, or orphans handed to us); `child`'s end, if it ended.
fn reap(child: Pid) -> Option<Result<i32, Signal>> {
    let mut end = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == child => end = Some(Ok(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == child => end = Some(Err(signal)),
            Ok(WaitStatus::StillAlive) | Err(_) => return end,
            Ok(_) => {}
        }
    }
}
