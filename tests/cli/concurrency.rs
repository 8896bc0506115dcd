//! Agent slots apart from process slots: `--agents` and `[defaults] max_agents` bound agent
//! attempts, `--jobs` bounds processes, and neither waits for the other's slots.

use serde_json::Value;

use crate::agents::{rehearse, repo};

const THREE_AGENTS: &str = r#"version = 1
[workflow]
name = "three"

[tasks.a]
prompt = "Say a"

[tasks.b]
prompt = "Say b"

[tasks.c]
prompt = "Say c"
"#;

/// The most attempts that overlapped, from the run's events.
fn most_at_once(events: &[Value]) -> usize {
    let (mut now, mut most) = (0usize, 0usize);
    for e in events {
        match e["event"].as_str() {
            Some("task_started") => {
                now += 1;
                most = most.max(now);
            }
            Some("task_succeeded" | "task_failed" | "task_retrying") => now -= 1,
            _ => {}
        }
    }
    most
}

#[test]
fn agents_run_beside_processes_in_slots_of_their_own() {
    let s = repo(THREE_AGENTS);
    // One process slot: the three agents still run together.
    let done = rehearse(&s, &["--jobs", "1", "--agents", "3"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert_eq!(most_at_once(&done.events), 3, "{}", done.stdout);
}

#[test]
fn agent_slots_hold_agents_back() {
    let s = repo(THREE_AGENTS);
    let done = rehearse(&s, &["--jobs", "4", "--agents", "1", "--fresh"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert_eq!(most_at_once(&done.events), 1, "{}", done.stdout);
    // The clusterfile's default, when the command line does not say.
    s.write(&THREE_AGENTS.replace(
        "name = \"three\"\n",
        "name = \"three\"\n\n[defaults]\nmax_agents = 2\n",
    ));
    let done = rehearse(&s, &["--jobs", "4", "--fresh"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert_eq!(most_at_once(&done.events), 2, "{}", done.stdout);
}

fn six_agents() -> crate::support::Sandbox {
    let tasks: String = (0..6)
        .map(|i| format!("[tasks.t{i}]\nprompt = \"Say {i}\"\n"))
        .collect();
    repo(&format!(
        "version = 1\n[workflow]\nname = \"limited\"\n[defaults]\ntimeout = \"3m\"\nretry = {{ limit = 4 }}\n{tasks}"
    ))
}

#[test]
fn agent_slots_halve_when_the_api_is_overloaded_and_everything_still_succeeds() {
    let s = six_agents();
    // Overloaded for the first five seconds: six agents asking together are refused at
    // once (529 reaches the workers; it says nothing of when to come back).
    std::fs::write(
        s.path().join("script.toml"),
        "overloaded = [{ from_ms = 0, for_ms = 5000 }]\n",
    )
    .unwrap();
    let done = rehearse(&s, &["--script", "script.toml", "--agents", "6"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert_eq!(done.of("task_succeeded").len(), 6, "{}", done.stdout);
    let cuts: Vec<String> = done
        .of("warning")
        .iter()
        .filter_map(|w| w["message"].as_str())
        .filter(|m| m.contains("agent slots"))
        .map(str::to_string)
        .collect();
    assert!(
        cuts.first()
            .is_some_and(|m| m.contains("agent slots 6 → 3")),
        "{cuts:?}\n{}",
        done.stdout
    );
}

#[test]
fn under_a_rate_limit_the_gateway_paces_the_workers_who_never_see_a_refusal() {
    let s = six_agents();
    // One request a second, two at once: six agents asking together meet the limit at once.
    std::fs::write(
        s.path().join("script.toml"),
        "rate_limit = { per_minute = 60, burst = 2 }\n",
    )
    .unwrap();
    let done = rehearse(&s, &["--script", "script.toml", "--agents", "6"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert_eq!(done.of("task_succeeded").len(), 6, "{}", done.stdout);
    // The API refused requests, yet no worker saw it: the run's model gateway waited each
    // refusal out (it said when to come back) and sent the request again.
    let run = done.of("run_started")[0]["run"]
        .as_str()
        .unwrap()
        .to_string();
    let answers: Vec<String> = std::fs::read_to_string(
        s.path()
            .join(format!(".ccluster/runs/{run}/rehearsal.jsonl")),
    )
    .unwrap()
    .lines()
    .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["answer"].to_string())
    .collect();
    assert!(answers.iter().any(|a| a.contains("429")), "{answers:?}");
    let retries: Vec<&str> = done
        .of("task_progress")
        .iter()
        .filter(|p| p["kind"] == "api_retry")
        .filter_map(|p| p["detail"].as_str())
        .collect();
    assert!(retries.is_empty(), "{retries:?}");
    assert!(done.of("task_retrying").is_empty(), "{}", done.stdout);
}

#[test]
fn without_adapting_workers_meet_the_limit_themselves() {
    let s = six_agents();
    std::fs::write(
        s.path().join("script.toml"),
        "rate_limit = { per_minute = 60, burst = 2 }\n",
    )
    .unwrap();
    let done = rehearse(
        &s,
        &["--script", "script.toml", "--agents", "6", "--no-adapt"],
    );
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    // No gateway: the workers saw the limit, and were told how long to wait.
    let retries: Vec<&str> = done
        .of("task_progress")
        .iter()
        .filter(|p| p["kind"] == "api_retry")
        .filter_map(|p| p["detail"].as_str())
        .collect();
    assert!(
        retries
            .iter()
            .any(|d| d.contains("after 429") && d.contains("again in")),
        "{retries:?}"
    );
}
