//! Task processes against ccluster's own life: every stop signal stops the run cleanly, nothing a
//! task started outlives a killed ccluster (whatever it did to hide), background processes go
//! with their attempt unless the task keeps them, and an agent's prompt travels on stdin.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::apply::{Applied, Sandbox};
use crate::support::{claude_bin, task};

/// A number no other test's `sleep` uses: this test binary's pid, after a per-test prefix.
fn marker(prefix: u32) -> String {
    format!("{prefix}.{}", std::process::id())
}

/// The pids of the processes whose command line holds `sleep <marker>`.
fn sleeping(marker: &str) -> Vec<i32> {
    let needle = format!("sleep\0{marker}");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z');
            !zombie && String::from_utf8_lossy(&cmdline).contains(&needle)
        })
        .collect()
}

/// Waits up to `timeout` for no process to hold any of `markers`; on failure, kills what is
/// left (so a failing test leaves nothing behind) and says what it was.
fn assert_all_gone(markers: &[String], timeout: Duration, what: &str) {
    let start = Instant::now();
    loop {
        let left: Vec<(String, Vec<i32>)> = markers
            .iter()
            .map(|m| (m.clone(), sleeping(m)))
            .filter(|(_, pids)| !pids.is_empty())
            .collect();
        if left.is_empty() {
            return;
        }
        if start.elapsed() > timeout {
            for (_, pids) in &left {
                for pid in pids {
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                }
            }
            panic!("{what}: still running after {timeout:?}: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_for(what: &str, timeout: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(start.elapsed() < timeout, "{what} did not happen");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `child` to end, at most `timeout` (then kills it and fails).
fn finish(mut child: Child, timeout: Duration) -> Applied {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("ccluster did not end within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Applied::from_output(child.wait_with_output().unwrap())
}

/// The pid of the process holding the state (the one doing the work), from the lock file.
fn worker_pid(s: &Sandbox) -> i32 {
    s.read(".ccluster/lock").trim().parse().unwrap()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

#[test]
fn sighup_and_sigquit_stop_the_run_as_sigterm_does() {
    for (signal, to_worker) in [
        (Signal::SIGHUP, false),
        (Signal::SIGQUIT, false),
        (Signal::SIGHUP, true),
        (Signal::SIGQUIT, true),
    ] {
        let s = Sandbox::new(
            r#"version = 1
[tasks.long]
run = "echo $$ > pid; sleep 300"
"#,
        );
        let child = s.spawn_apply(&[]);
        wait_for("the task's start", Duration::from_secs(20), || {
            !s.read("pid").trim().is_empty() && !s.read(".ccluster/lock").trim().is_empty()
        });
        let target = if to_worker {
            worker_pid(&s)
        } else {
            child.id() as i32
        };
        kill(Pid::from_raw(target), signal).unwrap();
        let done = finish(child, Duration::from_secs(20));
        let case = format!(
            "{signal} to the {}",
            if to_worker { "worker" } else { "command" }
        );
        assert_eq!(done.code, 130, "{case}: {}{}", done.stdout, done.stderr);
        let status = s.status();
        assert_eq!(status["run"]["state"], "cancelled", "{case}");
        assert_eq!(task(&status, "long")["state"], "cancelled", "{case}");
        let pid: i32 = s.read("pid").trim().parse().unwrap();
        assert!(!alive(pid), "{case}: the task's shell survived");
    }
}

/// A task that hides background processes every way it can, then waits.
fn hiding_task(markers: &[String]) -> String {
    format!(
        r#"version = 1
[tasks.hide]
run = "sleep {0} & setsid sleep {1} & env -i sleep {2} & env -i setsid sleep {3} >/dev/null 2>&1 & (setsid sh -c 'sleep {4} & wait' &) ; echo started > started; sleep {5}"
"#,
        markers[0], markers[1], markers[2], markers[3], markers[4], markers[5]
    )
}

#[test]
fn no_task_process_outlives_a_killed_ccluster() {
    // Killed as the shell would (the process it started), then the process holding the state.
    for (round, kill_worker) in [(0u32, false), (1, true)] {
        let markers: Vec<String> = (0..6).map(|i| marker(987_610 + round * 10 + i)).collect();
        let s = Sandbox::new(&hiding_task(&markers));
        let child = s.spawn_apply(&[]);
        wait_for("the task's start", Duration::from_secs(20), || {
            !s.read("started").is_empty()
                && markers.iter().all(|m| !sleeping(m).is_empty())
                && !s.read(".ccluster/lock").trim().is_empty()
        });
        let worker = worker_pid(&s);
        let target = if kill_worker {
            worker
        } else {
            child.id() as i32
        };
        kill(Pid::from_raw(target), Signal::SIGKILL).unwrap();
        let what = if kill_worker {
            "after kill -9 of the worker"
        } else {
            "after kill -9 of ccluster"
        };
        assert_all_gone(&markers, Duration::from_secs(5), what);
        let _ = finish(child, Duration::from_secs(10));
        wait_for("the worker's end", Duration::from_secs(10), || {
            !alive(worker)
        });
        // The next apply finds the run interrupted, as after any kill -9.
        s.write(NEXT);
        let again = s.apply(&[]);
        assert_eq!(again.code, 0, "{}", again.stderr);
        let runs = s.command(&["runs"]).output().unwrap();
        assert!(
            String::from_utf8_lossy(&runs.stdout).contains("interrupted"),
            "{}",
            String::from_utf8_lossy(&runs.stdout)
        );
        assert_all_gone(&markers, Duration::from_secs(5), "after the next apply");
    }
}

const NEXT: &str = "version = 1\n[tasks.next]\nrun = \"true\"\n";

/// The parent of `pid`.
fn parent_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn an_apply_started_right_after_a_kill_9_waits_for_the_state_instead_of_being_refused() {
    let markers: Vec<String> = (0..6).map(|i| marker(987_630 + i)).collect();
    let s = Sandbox::new(&hiding_task(&markers));
    let child = s.spawn_apply(&[]);
    wait_for("the task's start", Duration::from_secs(20), || {
        !s.read("started").is_empty()
            && markers.iter().all(|m| !sleeping(m).is_empty())
            && !s.read(".ccluster/lock").trim().is_empty()
    });
    let worker = worker_pid(&s);
    // The keeper, held still, cannot kill the worker yet: the worker keeps the state locked for
    // as long as an apply may start.
    let keeper = Pid::from_raw(parent_of(worker));
    kill(keeper, Signal::SIGSTOP).unwrap();
    let mut child = child;
    kill(Pid::from_raw(child.id() as i32), Signal::SIGKILL).unwrap();
    // Not its output: the stopped keeper holds the pipes.
    child.wait().unwrap();
    s.write(NEXT);
    let next = s.spawn_apply(&[]);
    std::thread::sleep(Duration::from_millis(500));
    kill(keeper, Signal::SIGCONT).unwrap();
    let next = finish(next, Duration::from_secs(20));
    assert_eq!(next.code, 0, "{}", next.stderr);
    assert!(!alive(worker));
    assert_all_gone(&markers, Duration::from_secs(5), "after the keeper went on");
}

#[test]
fn background_processes_are_stopped_when_their_attempt_ends_unless_kept() {
    let gone: Vec<String> = (0..4).map(|i| marker(987_650 + i)).collect();
    let kept = marker(987_659);
    let s = Sandbox::new(&format!(
        r#"version = 1
[tasks.leave]
run = "sleep {0} & setsid sleep {1} & (setsid sh -c 'env -i sleep {2} & wait' >/dev/null 2>&1 &)"

[tasks.daemon]
run = "sleep {kept} >/dev/null 2>&1 &"
env = {{ CCLUSTER_KEEP_BACKGROUND = "1" }}

[tasks.after]
needs = ["leave", "daemon"]
run = "sleep 0.5"

# Other attempts end while `slow`'s escaped process runs: it is still found when `slow` ends.
[tasks.slow]
run = "(setsid sleep {3} &) ; sleep 1"

[tasks.tick]
run = "sleep 0.3"
"#,
        gone[0], gone[1], gone[2], gone[3]
    ));
    let done = s.apply(&["--jobs", "5"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    // Every attempt had ended when `apply` returned; stopping is done by then.
    let kept_pids = sleeping(&kept);
    assert_all_gone(&gone, Duration::from_millis(100), "after the attempt ended");
    assert_eq!(kept_pids.len(), 1, "the kept daemon is not running");
    for pid in kept_pids {
        kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    }
}

#[test]
fn a_command_too_long_for_the_system_fails_once_and_is_not_retried() {
    // One argument of `sh -c` over the kernel's 128 KiB limit: a real E2BIG.
    let long = "x".repeat(200 << 10);
    let s = Sandbox::new(&format!(
        r#"version = 1
[tasks.huge]
run = "true {long}"
retry = {{ limit = 3, on = ["spawn_error"], backoff = {{ initial = "10ms" }} }}
"#
    ));
    let done = s.apply(&[]);
    assert_eq!(done.code, 1, "{}", done.stderr);
    assert!(done.of("task_retrying").is_empty(), "{}", done.stdout);
    let status = s.status();
    let t = task(&status, "huge");
    assert_eq!(t["attempts"], 1);
    assert_eq!(t["class"], "spawn_error");
    let message = t["message"].as_str().unwrap();
    assert!(
        message.contains("Argument list too long") && message.contains("128 KiB"),
        "{message}"
    );
}

/// A sandbox that is a git repository on `main` with its clusterfile committed.
fn repo(clusterfile: &str) -> Sandbox {
    Sandbox::in_repo(clusterfile, &[])
}

/// The first user message of the session transcripts the CLI wrote under `dir`.
fn transcript_prompts(dir: &Path) -> Vec<String> {
    let mut prompts = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return prompts;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            prompts.extend(transcript_prompts(&path));
        } else if path.extension().is_some_and(|e| e == "jsonl") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            for line in text.lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if let (Some("user"), Some(content)) =
                    (v["type"].as_str(), v["message"]["content"].as_str())
                {
                    prompts.push(content.to_string());
                }
            }
        }
    }
    prompts
}

#[test]
fn a_200_kib_prompt_reaches_the_cli_on_stdin_and_not_on_its_command_line() {
    let prompt = format!(
        "Begin. {} End of the long prompt.",
        "word ".repeat(40 << 10)
    );
    let s = repo(&format!(
        r#"version = 1
[defaults]
timeout = "2m"

[tasks.long]
prompt = """{prompt}"""
claude = {{ allowed_tools = ["Bash"], append_system_prompt = "Answer briefly.", settings = {{ env = {{ SEEN = "yes" }} }} }}
"#
    ));
    // The worker looks at its parent's (the CLI's) command line.
    std::fs::write(
        s.path().join("script.toml"),
        r#"[tasks.long]
turns = [
  { tools = [{ name = "Bash", input = { command = "tr '\\0' ' ' < /proc/$PPID/cmdline; echo; echo ARGV-BYTES $(wc -c < /proc/$PPID/cmdline)" } }] },
  { text = "done" },
]
"#,
    )
    .unwrap();
    let done = Applied::from_output(
        s.command(&[
            "apply",
            "--rehearse",
            "--script",
            "script.toml",
            "--output",
            "json",
        ])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .stdout(Stdio::piped())
        .output()
        .unwrap(),
    );
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    // The CLI got the whole prompt...
    let prompts = transcript_prompts(&s.path().join(".ccluster/runs"));
    assert!(
        prompts.iter().any(|p| p == &prompt),
        "the prompt did not arrive whole: {:?}",
        prompts.iter().map(|p| p.len()).collect::<Vec<_>>()
    );
    // ...and its command line, as `ps` shows it, holds none of it.
    let log = std::fs::read_dir(s.path().join(".ccluster/runs"))
        .unwrap()
        .flatten()
        .map(|run| std::fs::read_to_string(run.path().join("logs/long.1.out")).unwrap_or_default())
        .collect::<String>();
    let argv_line = log
        .lines()
        .find(|l| l.contains("ARGV-BYTES") && l.contains("tool_use_result"))
        .unwrap_or_else(|| panic!("no command line was read: {log}"));
    assert!(argv_line.contains("--session-id"), "{argv_line}");
    assert!(!argv_line.contains("Begin."), "{argv_line}");
    assert!(!argv_line.contains("word word"), "{argv_line}");
    assert!(!argv_line.contains("Answer briefly"), "{argv_line}");
    assert!(!argv_line.contains("SEEN"), "{argv_line}");
}
