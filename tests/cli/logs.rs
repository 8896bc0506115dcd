//! `ccluster logs`: every attempt and both streams as bytes, `-f` started before the run it
//! follows, map instances, agent transcripts for people (and `--raw`), and flat memory on a large
//! log.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::apply::Sandbox;
use crate::support::claude_bin;

/// Waits for a child to exit, killing it (and failing) after `limit`.
fn wait_output(mut child: Child, limit: Duration) -> (i32, Vec<u8>, String) {
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        stdout.read_to_end(&mut bytes).unwrap();
        bytes
    });
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("`logs -f` did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    (status.code().unwrap_or(-1), reader.join().unwrap(), stderr)
}

fn spawn_logs(s: &Sandbox, args: &[&str]) -> Child {
    let mut all = vec!["logs"];
    all.extend_from_slice(args);
    s.command(&all)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn logs_copy_non_utf8_bytes_and_show_stderr_with_the_run_defaulting_to_the_latest() {
    let s = Sandbox::new(
        "version = 1\n[tasks.bytes]\nrun = '''printf 'caf\\351 \\377\\376\\n'; echo oops >&2'''\n",
    );
    let run = s.apply(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let id = run.events[0]["run"].as_str().unwrap().to_string();
    let expected: &[u8] =
        b"==> bytes attempt 1 stdout <==\ncaf\xe9 \xff\xfe\n==> bytes attempt 1 stderr <==\noops\n";
    for args in [
        vec!["logs", id.as_str(), "bytes"],
        // A lone task is a task of the latest run; no argument at all is the latest run.
        vec!["logs", "bytes"],
        vec!["logs"],
        vec!["logs", "latest", "bytes"],
    ] {
        let out = s.command(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert_eq!(
            out.stdout,
            expected,
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let missing = s.command(&["logs", "nothing"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let said = String::from_utf8_lossy(&missing.stderr);
    assert!(
        said.contains("has no task `nothing`") && said.contains("its tasks: bytes"),
        "{said}"
    );
}

#[test]
fn follow_started_before_apply_shows_every_attempt_and_both_streams_until_the_run_ends() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.flaky]
run = '''n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; echo out $n; sleep 0.2; echo err $n >&2; test $n -ge 2'''
retry = { limit = 1, backoff = { initial = "10ms" } }
[tasks.other]
run = "echo not this one"
"#,
    );
    // Before the run exists at all: `logs -f` waits for it and for its task.
    let follower = spawn_logs(&s, &["-f", "flaky"]);
    std::thread::sleep(Duration::from_millis(300));
    let run = s.apply(&[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let (code, out, err) = wait_output(follower, Duration::from_secs(20));
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{out}\n{err}");
    for (header, line) in [
        ("==> flaky attempt 1 stdout <==", "out 1"),
        ("==> flaky attempt 1 stderr <==", "err 1"),
        ("==> flaky attempt 2 stdout <==", "out 2"),
        ("==> flaky attempt 2 stderr <==", "err 2"),
    ] {
        assert!(out.contains(&format!("{header}\n{line}\n")), "{out}");
    }
    assert!(!out.contains("not this one"), "{out}");
}

#[test]
fn follow_of_a_dynamic_map_shows_every_instance_as_it_is_expanded() {
    let s = Sandbox::new(
        r#"version = 1
[tasks.list]
run = "sleep 0.5; echo '[\"a\", \"b\", \"c\"]'"
output = "json"
[tasks.each]
needs = ["list"]
map = "{{ tasks.list.output }}"
run = "echo item {{ item }}; sleep 0.3; echo done {{ item }} >&2"
"#,
    );
    let apply = s.spawn_apply(&[]);
    let follower = spawn_logs(&s, &["-f", "each"]);
    let (code, out, err) = wait_output(follower, Duration::from_secs(30));
    let out = String::from_utf8_lossy(&out);
    assert_eq!(code, 0, "{out}\n{err}");
    for (i, item) in ["a", "b", "c"].iter().enumerate() {
        assert!(
            out.contains(&format!(
                "==> each[{i}] attempt 1 stdout <==\nitem {item}\n"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "==> each[{i}] attempt 1 stderr <==\ndone {item}\n"
            )),
            "{out}"
        );
    }
    assert!(
        !out.contains("[\"a\""),
        "the upstream task is not selected: {out}"
    );
    assert_eq!(apply.wait_with_output().unwrap().status.code(), Some(0));
}

#[test]
fn ctrl_c_ends_a_waiting_follower_quietly_with_130() {
    let s = Sandbox::new("version = 1\n[tasks.a]\nrun = \"true\"\n");
    let follower = spawn_logs(&s, &["-f"]);
    std::thread::sleep(Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(follower.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let (code, out, err) = wait_output(follower, Duration::from_secs(5));
    assert_eq!((code, out.as_slice(), err.as_str()), (130, &b""[..], ""));
}

/// The high-water mark of a process's resident memory, in KiB (none once it has exited).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Reads all of a `logs` process's stdout, sampling its peak memory (KiB) while the pipe holds
/// it back, until `expected` bytes came (then `then` runs); returns the byte count and the peak.
fn read_measured(mut child: Child, expected: u64, then: impl FnOnce()) -> (u64, u64) {
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    let (mut total, mut peak) = (0u64, 0u64);
    let mut buf = vec![0u8; 1 << 16];
    let mut then = Some(then);
    loop {
        if total < expected {
            if let Some(kib) = peak_rss_kib(pid) {
                peak = peak.max(kib);
            }
        } else if let Some(then) = then.take() {
            then();
        }
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
    (total, peak)
}

#[test]
fn a_50_mb_log_is_streamed_in_flat_memory() {
    const SIZE: u64 = 50_000_000;
    // The task stays running after its output, so `logs` reads the run's live view, not the
    // database, whose own cache would hide what reading the log costs.
    let s = Sandbox::new(&format!(
        "version = 1\n[tasks.big]\nrun = \"yes 'a line of a long log 0123456789' | head -c {SIZE}; sleep 60\"\n[tasks.small]\nrun = \"echo small\"\n"
    ));
    let apply = s.spawn_apply(&[]);
    let runs = s.path().join(".ccluster/runs");
    let start = Instant::now();
    let run = loop {
        let found = std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|run| {
                run.join("live.jsonl").exists()
                    && std::fs::metadata(run.join("logs/big.1.out")).is_ok_and(|m| m.len() == SIZE)
            });
        if let Some(run) = found {
            break run;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the log did not fill"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let run = run.file_name().unwrap().to_string_lossy().into_owned();
    // What `logs` holds for a log of six bytes: the program itself (its size changes with the
    // code, the debug build's more than the release's), against which the big log is measured.
    // Following it keeps the process there to be measured once it has printed the log.
    let mut small = spawn_logs(&s, &["-f", "small"]);
    let mut out = small.stdout.take().unwrap();
    let mut seen = Vec::new();
    while !contains(&seen, b"small\n") {
        let mut buf = [0u8; 256];
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let baseline = peak_rss_kib(small.id()).expect("the follower is there");
    let _ = small.kill();
    let _ = small.wait();
    let header = "==> big attempt 1 stdout <==\n".len() as u64;
    for args in [&[run.as_str(), "big"][..], &["-f", "big"][..]] {
        let child = spawn_logs(&s, args);
        let (total, peak) = read_measured(child, header + SIZE, || {
            if args[0] == "-f" {
                // The follower ends when the run does.
                let cancel = s.command(&["cancel"]).output().unwrap();
                assert_eq!(cancel.status.code(), Some(0));
            }
        });
        assert_eq!(total, header + SIZE, "{args:?}");
        assert!(peak > 0, "no memory sample");
        assert!(
            peak < baseline + 12 * 1024,
            "`logs {args:?}` held {peak} KiB for a {SIZE}-byte log, {baseline} KiB for a small one"
        );
    }
    let _ = apply.wait_with_output();
}

/// A sandbox that is a git repository on `main` with its clusterfile committed.
fn repo(clusterfile: &str) -> Sandbox {
    Sandbox::in_repo(clusterfile, &[])
}

#[test]
fn an_agent_transcript_reads_as_turns_tool_calls_denials_and_result_and_raw_as_json() {
    let outside = "/tmp/ccluster-logs-test-outside.txt";
    let s = repo(&format!(
        r#"version = 1
[tasks.agent]
prompt = "go"
rehearsal = {{ turns = [{{ text = "Let me look.", tools = [{{ name = "Bash", input = {{ command = "echo hi" }} }}] }}, {{ tools = [{{ name = "Write", input = {{ file_path = "{outside}", content = "x" }} }}] }}, {{ tools = [{{ name = "Write", input = {{ file_path = "{{{{cwd}}}}/a.txt", content = "one\n" }} }}] }}, {{ text = "all done" }}] }}
"#
    ));
    let done = s
        .command(&["apply", "--rehearse", "--output", "json"])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .output()
        .unwrap();
    assert_eq!(
        done.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&done.stderr)
    );
    assert!(!Path::new(outside).exists());
    let shown = s.command(&["logs", "agent"]).output().unwrap();
    let text = String::from_utf8_lossy(&shown.stdout);
    let expected_in_order = [
        "==> agent attempt 1 stdout <==\nsession ",
        "--- turn 1 ---\nLet me look.\n> Bash: echo hi\n  | hi\n",
        "--- turn 2 ---\n> Write: /tmp/ccluster-logs-test-outside.txt\n! DENIED Write: ",
        "--- turn 3 ---\n> Write: a.txt\n  | File created successfully at: a.txt",
        "--- turn 4 ---\nall done\n=== result: success, 4 turns, $",
        "=== 1 permission denial: Write\n",
    ];
    let mut from = 0;
    for part in expected_in_order {
        let at = text[from..]
            .find(part)
            .unwrap_or_else(|| panic!("`{part}` not found in order in:\n{text}"));
        from += at + part.len();
    }
    assert!(!text.contains("\"type\""), "{text}");

    // `--raw`: the CLI's own lines, byte for byte.
    let raw = s.command(&["logs", "agent", "--raw"]).output().unwrap();
    let run_dir = std::fs::read_dir(s.path().join(".ccluster/runs"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let file = std::fs::read(run_dir.join("logs/agent.1.out")).unwrap();
    let mut expected = b"==> agent attempt 1 stdout <==\n".to_vec();
    expected.extend_from_slice(&file);
    assert_eq!(raw.stdout, expected);
    let lines: Vec<Value> = String::from_utf8_lossy(&file)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.iter().any(|l| l["type"] == "result"));
    assert!(contains(&raw.stdout, b"\"permission_denied\""));
}

#[test]
fn follow_shows_a_partial_line_while_the_task_still_runs() {
    let s = Sandbox::new(
        "version = 1\n[tasks.work]\nrun = \"printf 'Working...'; sleep 1; echo done\"\n",
    );
    let apply = s.spawn_apply(&[]);
    let mut follower = spawn_logs(&s, &["-f", "work"]);
    let mut stdout = follower.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !contains(&seen, b"Working...") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "ended early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // Shown before the line was complete, not held back for it.
    assert!(
        !contains(&seen, b"done"),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    stdout.read_to_end(&mut seen).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&seen),
        "==> work attempt 1 stdout <==\nWorking...done\n"
    );
    assert_eq!(follower.wait().unwrap().code(), Some(0));
    assert_eq!(apply.wait_with_output().unwrap().status.code(), Some(0));
}

#[test]
fn a_template_instance_id_selects_its_embedded_tasks() {
    let s = Sandbox::new("version = 1\n[tasks.t]\nuse = \"./lib/step.toml\"\n[tasks.u]\nrun = \"echo not this one\"\n");
    s.file(
        "lib/step.toml",
        "version = 1\n[tasks.step]\nrun = \"echo stepping\"\n[tasks.more]\nneeds = [\"step\"]\nrun = \"echo more\"\n",
    )
    .unwrap();
    assert_eq!(s.apply(&[]).code, 0);
    let run = s.status()["run"]["id"].as_str().unwrap().to_string();
    let out = s.command(&["logs", &run, "t"]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "==> t.step attempt 1 stdout <==\nstepping\n==> t.more attempt 1 stdout <==\nmore\n"
    );
}
