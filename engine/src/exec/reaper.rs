//! Finds and stops what a task leaves behind: processes still in its group when it ends, those that
//! left the group (`setsid`, daemons) but still carry the attempt's `CCLUSTER_*` variables, and,
//! when ccluster itself dies, every process below it. Linux only (`/proc`, `prctl`); elsewhere
//! only the process group is stopped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Set when this process adopts the orphans of its descendants (`PR_SET_CHILD_SUBREAPER`): a
/// task's process whose parent exits then becomes our child instead of init's, so it can be found.
static SUBREAPER: AtomicBool = AtomicBool::new(false);

/// The main processes of the attempts running now (each the leader of its own group): our own
/// children, reaped by their supervisors, never by the sweep.
static LIVE: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// The adopted orphans no attempt's end will claim (a kept daemon, a process with no attempt's
/// variables): they are not looked for again at every attempt's end. A new escapee is a new
/// orphan, or is found through its group.
static SETTLED: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// The variable a task sets to keep the background processes it starts after it exits (a
/// deliberate daemon).
pub const KEEP_BACKGROUND: &str = "CCLUSTER_KEEP_BACKGROUND";

/// The variables that say which attempt a process belongs to (inherited by all it starts).
const ATTEMPT_VARS: [&str; 3] = ["CCLUSTER_RUN", "CCLUSTER_TASK", "CCLUSTER_ATTEMPT"];

/// Makes this process adopt its descendants' orphans, so that a task's background process whose
/// parent exited stays below ccluster and can be stopped. Returns whether it took effect.
pub fn become_subreaper() -> bool {
    #[cfg(target_os = "linux")]
    if nix::sys::prctl::set_child_subreaper(true).is_ok() {
        SUBREAPER.store(true, Ordering::Relaxed);
        return true;
    }
    false
}

/// Remembers an attempt's main process while it runs.
pub(crate) fn started(pid: i32) {
    if let Ok(mut live) = LIVE.lock() {
        live.push(pid);
    }
}

/// Forgets an attempt's main process once it has been reaped.
pub(crate) fn ended(pid: i32) {
    if let Ok(mut live) = LIVE.lock() {
        live.retain(|p| *p != pid);
    }
}

/// A child ccluster started in a process group of its own for a step of its own (git under a
/// time limit): known as [`started`] until dropped, so that it is never taken for an adopted
/// orphan, killed or reaped (which would leave its waiter with `ECHILD`). Register it right after
/// `spawn`, before any `.await`.
pub(crate) struct OwnChild(i32);

impl OwnChild {
    pub(crate) fn new(pid: i32) -> OwnChild {
        started(pid);
        OwnChild(pid)
    }
}

impl Drop for OwnChild {
    fn drop(&mut self) {
        ended(self.0);
    }
}

/// What identifies an attempt's processes: its `CCLUSTER_*` variables (`NAME=value`), if the spec
/// has all of them; and whether the task asked to keep its background processes.
pub(crate) struct Attempt {
    markers: Option<Vec<Vec<u8>>>,
    pub keep_background: bool,
}

impl Attempt {
    pub fn of(env: &[(String, String)]) -> Attempt {
        let value = |name: &str| env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v);
        let markers = ATTEMPT_VARS
            .iter()
            .map(|name| value(name).map(|v| format!("{name}={v}").into_bytes()))
            .collect();
        Attempt {
            markers,
            keep_background: value(KEEP_BACKGROUND).is_some_and(|v| v == "1"),
        }
    }
}

/// One line of `/proc/<pid>/stat`: what the sweep needs.
struct Stat {
    state: u8,
    ppid: i32,
    pgid: i32,
    /// The kernel's `PF_*` flags of the (main) thread.
    flags: u64,
}

/// `PF_EXITING`: the process is ending.
const PF_EXITING: u64 = 0x4;

fn stat(pid: i32) -> Option<Stat> {
    let text = std::fs::read(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid pgrp ...`; `comm` may hold spaces and parentheses.
    let close = text.iter().rposition(|b| *b == b')')?;
    let mut fields = text[close + 1..]
        .split(|b| *b == b' ')
        .filter(|f| !f.is_empty());
    let state = *fields.next()?.first()?;
    let mut number = || -> Option<i64> { std::str::from_utf8(fields.next()?).ok()?.parse().ok() };
    let ppid = number()? as i32;
    let pgid = number()? as i32;
    // Then session, tty_nr and tpgid, then flags.
    for _ in 0..3 {
        number()?;
    }
    let flags = number()? as u64;
    Some(Stat {
        state,
        ppid,
        pgid,
        flags,
    })
}

/// Whether the ccluster process `pid` (one holding a state) is going away: gone, ending, or a
/// worker whose keeper has lost the process the shell started (`cli/src/supervisor.rs`: the keeper
/// is about to kill it). Lets a new `apply` wait for the state instead of being refused.
pub fn going_away(pid: i32) -> bool {
    let Some(holder) = stat(pid) else {
        return true;
    };
    if holder.flags & PF_EXITING != 0 {
        return true;
    }
    let exe = |pid: i32| std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let Some(keeper) = stat(holder.ppid) else {
        return false;
    };
    let own = exe(pid);
    // Under a keeper (the same program), whose own parent is no longer a ccluster.
    own.is_some() && exe(holder.ppid) == own && exe(keeper.ppid) != own
}

/// Every process on the machine with its parent (zombies left out: they are already dead).
fn processes() -> HashMap<i32, i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let s = stat(pid)?;
            (s.state != b'Z').then_some((pid, s.ppid))
        })
        .collect()
}

/// `roots` and everything below them in `parents` (pid → parent).
fn subtrees(parents: &HashMap<i32, i32>, roots: &[i32]) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for (pid, ppid) in parents {
        children.entry(*ppid).or_default().push(*pid);
    }
    let mut found = Vec::new();
    let mut todo: Vec<i32> = roots.to_vec();
    while let Some(pid) = todo.pop() {
        if found.contains(&pid) {
            continue;
        }
        found.push(pid);
        todo.extend(children.get(&pid).into_iter().flatten());
    }
    found
}

fn has_markers(pid: i32, markers: &[Vec<u8>]) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    markers
        .iter()
        .all(|m| environ.split(|b| *b == 0).any(|var| var == m.as_slice()))
}

/// Stops what an attempt left behind once its main process has ended (unless the task keeps its
/// background processes): whatever is left in its process group, then, if anything escaped the
/// group, every process carrying the attempt's variables, with all it started.
///
/// Cheap when there is nothing to stop (the common case of a tiny task): one `killpg`, and with
/// [`become_subreaper`] one read of our own list of children.
pub(crate) fn stop_leftovers(pgid: i32, attempt: &Attempt) {
    if attempt.keep_background {
        return;
    }
    // Something was still in the group: what it started may have left the group since.
    let group_had_members = killpg(Pid::from_raw(pgid), Signal::SIGKILL).is_ok();
    let orphans = if SUBREAPER.load(Ordering::Relaxed) {
        new_orphans()
    } else {
        Vec::new()
    };
    let Some(markers) = &attempt.markers else {
        return;
    };
    if group_had_members || !orphans.is_empty() {
        kill_marked(markers);
    }
    let settled = orphans.into_iter().filter(|pid| settled(*pid, markers));
    if let Ok(mut list) = SETTLED.lock() {
        list.extend(settled);
    }
}

/// Whether no other attempt's end will claim `pid`: it is gone, carries no attempt's variables,
/// is kept, or is this attempt's (then it was just killed).
fn settled(pid: i32, markers: &[Vec<u8>]) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return true;
    };
    let vars: Vec<&[u8]> = environ.split(|b| *b == 0).collect();
    let keep = format!("{KEEP_BACKGROUND}=1");
    !vars.iter().any(|v| v.starts_with(b"CCLUSTER_ATTEMPT="))
        || vars.contains(&keep.as_bytes())
        || markers.iter().all(|m| vars.contains(&m.as_slice()))
}

/// Kills every process carrying all of `markers`, with everything it started.
fn kill_marked(markers: &[Vec<u8>]) {
    let parents = processes();
    let me = std::process::id() as i32;
    let marked: Vec<i32> = parents
        .keys()
        .copied()
        .filter(|pid| *pid != me && has_markers(*pid, markers))
        .collect();
    for pid in subtrees(&parents, &marked) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

/// The live orphans we have adopted (processes we did not start, outside our own group) that are
/// not settled; orphans that already ended are reaped on the way. Only the main thread's children
/// are listed, which is where the kernel puts adopted ones, and where the dispatcher starts tasks.
fn new_orphans() -> Vec<i32> {
    let me = std::process::id();
    let Ok(list) = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")) else {
        return Vec::new();
    };
    if list.trim().is_empty() {
        return Vec::new();
    }
    let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
    let own_group = nix::unistd::getpgrp().as_raw();
    let mut orphans = Vec::new();
    for pid in list
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        if live.contains(&pid) {
            continue;
        }
        let Some(s) = stat(pid) else { continue };
        // ccluster's own helpers stay in its group, or are known as `OwnChild` (git steps, in a
        // group of their own to be stopped with the attempt): whoever started them reaps them.
        if s.pgid == own_group {
            continue;
        }
        if s.state == b'Z' {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        } else {
            orphans.push(pid);
        }
    }
    let Ok(mut settled) = SETTLED.lock() else {
        return orphans;
    };
    settled.retain(|pid| orphans.contains(pid));
    orphans.retain(|pid| !settled.contains(pid));
    orphans
}

/// Kills every process below `root` (by parentage), until none is left or `rounds` scans found
/// some each time. With `reap`, collects our own dead children between rounds (only for a
/// process that has no other supervisor of its children).
pub fn kill_descendants(root: i32, reap: bool, rounds: usize) {
    for _ in 0..rounds {
        let parents = processes();
        let below: Vec<i32> = subtrees(&parents, &[root])
            .into_iter()
            .filter(|p| *p != root)
            .collect();
        if below.is_empty() {
            return;
        }
        for pid in below {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        if reap {
            while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                if status == nix::sys::wait::WaitStatus::StillAlive {
                    break;
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_reads_a_command_name_with_spaces_and_parentheses() {
        // Our own stat line: whatever our name, the fields after it are found.
        let me = stat(std::process::id() as i32).expect("own stat");
        assert_eq!(me.ppid, nix::unistd::getppid().as_raw());
        assert_eq!(me.pgid, nix::unistd::getpgrp().as_raw());
        assert_eq!(me.flags & PF_EXITING, 0);
    }

    #[test]
    fn a_live_process_without_a_keeper_is_not_going_away_and_a_gone_one_is() {
        assert!(!going_away(std::process::id() as i32));
        // Beyond the largest pid Linux hands out (2^22).
        assert!(going_away(1 << 23));
    }

    #[test]
    fn subtrees_follow_parentage() {
        let parents: HashMap<i32, i32> = [(2, 1), (3, 2), (4, 3), (5, 1), (6, 9)].into();
        let mut found = subtrees(&parents, &[2]);
        found.sort();
        assert_eq!(found, vec![2, 3, 4]);
    }

    #[test]
    fn the_attempt_is_told_by_all_three_variables() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let full = Attempt::of(&env(&[
            ("CCLUSTER_RUN", "r"),
            ("CCLUSTER_TASK", "t"),
            ("CCLUSTER_ATTEMPT", "1"),
        ]));
        assert_eq!(full.markers.map(|m| m.len()), Some(3));
        assert!(!full.keep_background);
        let partial = Attempt::of(&env(&[("CCLUSTER_RUN", "r"), (KEEP_BACKGROUND, "1")]));
        assert!(partial.markers.is_none());
        assert!(partial.keep_background);
    }
}
