//! Crash safety: `kill -9` the `apply` process at random moments, then apply until done. No task
//! recorded as succeeded may run again, every task ends succeeded exactly once, and each task's
//! side effects never outnumber its recorded attempts.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::apply::Sandbox;

const TASKS: usize = 50;

/// A small deterministic generator; the seed is printed so a failure can be replayed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % below
    }
}

fn workflow() -> String {
    let mut s = String::from("version = 1\n[workflow]\nname = \"crash\"\n");
    for i in 0..TASKS {
        // Each task appends one line to its own file, then takes a while, so kills land mid-task.
        s.push_str(&format!(
            "[tasks.t{i}]\nrun = \"mkdir -p out; echo ran >> out/t{i}; sleep 0.{}\"\n",
            5 + i % 4 * 10
        ));
        if i >= 10 {
            s.push_str(&format!("needs = [\"t{}\"]\n", i - 10));
        }
    }
    s
}

fn runs(s: &Sandbox) -> Vec<Value> {
    let out = s.command(&["runs"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(|id| {
            let out = s.command(&["status", id, "--json"]).output().unwrap();
            serde_json::from_slice(&out.stdout).unwrap()
        })
        .collect()
}

#[test]
fn kill_9_at_random_moments_never_loses_or_repeats_finished_work() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("crash test seed: {seed}");
    let mut rng = Lcg(seed);
    let s = Sandbox::new(&workflow());
    let mut kills = 0;
    let mut completed = false;
    let start = Instant::now();
    while kills < 20 && start.elapsed() < Duration::from_secs(120) {
        let mut child = s.spawn_apply(&["--jobs", "4"]);
        std::thread::sleep(Duration::from_millis(30 + rng.next(250)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        } else {
            completed = true;
        }
        let _ = child.wait();
        if completed {
            break;
        }
    }
    assert!(kills >= 20 || completed, "only {kills} kills landed");
    eprintln!("{kills} kills landed mid-run");
    let mut finished = false;
    let mut last_failure = String::new();
    // "Apply until done": each apply takes over the state the last one left.
    for _ in 0..8 {
        let run = s.apply(&["--jobs", "4"]);
        if run.code == 0 {
            finished = true;
            break;
        }
        last_failure = format!("exit {}: {}\n{}", run.code, run.stderr, run.stdout);
    }
    assert!(
        finished,
        "apply never completed after the kills; last: {last_failure}"
    );

    let runs = runs(&s);
    // A kill can land before an apply records its run; most land later.
    assert!(runs.len() >= 2, "{} runs recorded", runs.len());
    let last = runs.last().unwrap();
    assert_eq!(last["run"]["state"], "succeeded");
    assert_eq!(last["tasks"].as_array().unwrap().len(), TASKS);

    // Per task: in which runs it succeeded, and how many attempts were started in all.
    let mut succeeded_in: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut attempts: BTreeMap<String, u64> = BTreeMap::new();
    let mut attempted_in: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (r, run) in runs.iter().enumerate() {
        for t in run["tasks"].as_array().unwrap() {
            let node = t["node"].as_str().unwrap().to_string();
            let n = t["attempts"].as_u64().unwrap();
            *attempts.entry(node.clone()).or_default() += n;
            if n > 0 {
                attempted_in.entry(node.clone()).or_default().push(r);
            }
            if t["state"] == "succeeded" {
                succeeded_in.entry(node).or_default().push(r);
            }
        }
    }
    for i in 0..TASKS {
        let node = format!("t{i}");
        let wins = succeeded_in.get(&node).cloned().unwrap_or_default();
        assert_eq!(
            wins.len(),
            1,
            "{node} succeeded in runs {wins:?}: it must succeed exactly once"
        );
        let after: Vec<usize> = attempted_in[&node]
            .iter()
            .copied()
            .filter(|&r| r > wins[0])
            .collect();
        assert!(
            after.is_empty(),
            "{node} ran again (runs {after:?}) after succeeding in run {}",
            wins[0]
        );
        let lines = s.read(&format!("out/t{i}")).lines().count() as u64;
        assert!(lines >= 1, "{node} never ran");
        assert!(
            lines <= attempts[&node],
            "{node} ran {lines} times but only {} attempts were recorded",
            attempts[&node]
        );
    }
    // Nothing is left to do.
    let again = s.apply(&[]);
    assert_eq!(again.code, 0);
    assert!(again.of("task_started").is_empty());
}

#[test]
fn a_corrupt_or_truncated_lock_file_is_taken_over() {
    let s = Sandbox::new("version = 1\n[tasks.a]\nrun = \"echo a\"\n");
    std::fs::create_dir_all(s.path().join(".ccluster")).unwrap();
    for garbage in [&b""[..], b"\x00\xff\xfe garbage", b"99999999"] {
        std::fs::write(s.path().join(".ccluster/lock"), garbage).unwrap();
        let run = s.apply(&["--fresh"]);
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
}
