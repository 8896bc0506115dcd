//! The process the shell starts for the commands that run tasks: it forks the ccluster that does
//! the work and stays above it as a subreaper, so that no process a task started outlives
//! ccluster, not even after a `kill -9`.
//!
//! - The worker (the child) adopts its tasks' orphans, and stops what an attempt leaves behind
//!   when the attempt ends (`exec::reaper`).
//! - If the worker dies by a signal (`kill -9`, a crash), every process below it is reparented to
//!   the supervisor, which kills them all, whatever they did to hide (`setsid`, `env -i`, a
//!   double fork), then exits with 128 + the signal.
//! - If the supervisor dies (`kill -9` of the process the shell knows), the worker sees its end
//!   of a pipe close, kills every process below itself and exits at once, as a killed ccluster.
//! - Signals sent to the supervisor (SIGTERM, SIGINT, SIGHUP, SIGQUIT from `kill`) are passed
//!   to the worker; those the terminal sends reach both, and are not passed again.
//!
//! Costs one `fork` per run, nothing per task.

use std::os::fd::OwnedFd;

use ccluster_engine::exec::reaper;
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

/// Splits into supervisor and worker. Returns in the worker (or, if the split fails, in the only
/// process, unsupervised); the supervisor never returns: it exits as the worker did.
pub fn split() {
    let mut watched = SigSet::empty();
    for signal in [
        Signal::SIGCHLD,
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
    ] {
        watched.add(signal);
    }
    let mut before = SigSet::empty();
    // Blocked before the fork, so the supervisor misses nothing the worker does meanwhile.
    if nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&watched), Some(&mut before))
        .is_err()
    {
        reaper::become_subreaper();
        return;
    }
    let restore = |before: &SigSet| {
        let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(before), None);
    };
    let Ok((alive_read, alive_write)) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC) else {
        restore(&before);
        reaper::become_subreaper();
        return;
    };
    // SAFETY: no other thread exists yet (this runs first thing in `main`, before any runtime),
    // so the child may do anything a fresh process may.
    match unsafe { fork() } {
        Err(_) => {
            restore(&before);
            reaper::become_subreaper();
        }
        Ok(ForkResult::Child) => {
            drop(alive_write);
            restore(&before);
            reaper::become_subreaper();
            watch_supervisor(alive_read);
        }
        Ok(ForkResult::Parent { child }) => {
            drop(alive_read);
            let code = supervise(child, &watched);
            drop(alive_write);
            std::process::exit(code);
        }
    }
}

/// In the worker: when the supervisor is gone (its end of the pipe closed), ccluster was killed:
/// kill everything below and exit now, as `kill -9` would have, leaving the run to be found
/// interrupted by the next `apply`.
fn watch_supervisor(alive: OwnedFd) {
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

/// In the supervisor: passes signals on until the worker ends; after a violent end, kills every
/// process left below. Returns the exit code to end with.
fn supervise(worker: Pid, watched: &SigSet) -> i32 {
    let _ = reaper::become_subreaper();
    let signals = SignalFd::new(watched).ok();
    let ended = loop {
        if let Some(end) = reap(worker) {
            break end;
        }
        let info = match signals.as_ref().map(SignalFd::read_signal) {
            Some(Ok(Some(info))) => info,
            Some(Ok(None) | Err(nix::errno::Errno::EINTR)) => continue,
            // Without a signalfd, signals cannot be passed on: wait for the worker alone.
            None | Some(Err(_)) => break wait_for(worker),
        };
        let Ok(signal) = Signal::try_from(info.ssi_signo as i32) else {
            continue;
        };
        // Sent by a process (`kill`, si_code <= 0), not by the terminal or the kernel, which
        // signal the worker themselves.
        if signal != Signal::SIGCHLD && info.ssi_code <= 0 {
            let _ = kill(worker, signal);
        }
    };
    match ended {
        Ok(code) => code,
        Err(signal) => {
            // The worker was killed: its tasks, and whatever they started, are ours now.
            reaper::kill_descendants(std::process::id() as i32, true, 50);
            128 + signal as i32
        }
    }
}

/// Waits for the worker's end: its exit code, or the signal that killed it.
fn wait_for(worker: Pid) -> Result<i32, Signal> {
    loop {
        match waitpid(worker, None) {
            Ok(WaitStatus::Exited(_, code)) => return Ok(code),
            Ok(WaitStatus::Signaled(_, signal, _)) => return Err(signal),
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Ok(1),
        }
    }
}

/// Collects ended children (the worker, or orphans handed to us); the worker's end, if it ended.
fn reap(worker: Pid) -> Option<Result<i32, Signal>> {
    let mut end = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) if pid == worker => end = Some(Ok(code)),
            Ok(WaitStatus::Signaled(pid, signal, _)) if pid == worker => end = Some(Err(signal)),
            Ok(WaitStatus::StillAlive) | Err(_) => return end,
            Ok(_) => {}
        }
    }
}
