//! `ccluster serve`: the HTTP API and its event streams, against the real binary: every endpoint
//! on a finished run, SSE resumption with `Last-Event-ID`, a run started in a terminal seen live, a
//! run started by the server followed from the CLI and cancelled, a server killed mid-run, and bad
//! input answered with problem details.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{root, Sandbox, Served};

/// One Server-Sent Event.
#[derive(Debug, Clone)]
struct Sse {
    id: Option<String>,
    event: String,
    data: String,
}

/// Reads an event stream until `stop` says so for an event, the stream ends, or `within` passes.
fn read_sse(
    served: &Served,
    path: &str,
    last_event_id: Option<&str>,
    within: Duration,
    mut stop: impl FnMut(&Sse) -> bool,
) -> Vec<Sse> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(within))
        .build()
        .into();
    let mut req = agent.get(&served.url(path));
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let response = req.call().unwrap();
    assert_eq!(
        response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let reader = BufReader::new(response.into_body().into_reader());
    let mut out = Vec::new();
    let (mut id, mut event, mut data) = (None, String::new(), String::new());
    for line in reader.lines() {
        let Ok(line) = line else { break };
        if line.is_empty() {
            if !data.is_empty() {
                let e = Sse {
                    id: id.take(),
                    event: std::mem::take(&mut event),
                    data: std::mem::take(&mut data),
                };
                let done = stop(&e);
                out.push(e);
                if done {
                    break;
                }
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("id:") {
            id = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    out
}

fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "waited {within:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

const FINISHED: &str = r#"version = 1
[workflow]
name = "served"

[tasks.hello]
run = "echo hello from the log; echo and on stderr >&2"

[tasks.edit]
needs = ["hello"]
workspace = "worktree"
artifacts = ["notes/*.txt"]
run = "mkdir -p notes && echo kept > notes/a.txt && echo changed > file.txt"

[tasks.shard]
map = ["a", "b", "c"]
needs = ["hello"]
run = "echo {{ item }}"

[tasks.merge]
needs = ["edit"]
merge = { strategy = "git" }
"#;

fn finished_run() -> (Sandbox, String) {
    let s = Sandbox::in_repo(FINISHED, &[("README", "hi\n")]);
    let run = s.apply(&[]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let id = s.run_id();
    (s, id)
}

#[test]
fn every_reading_endpoint_answers_for_a_finished_run() {
    let (s, id) = finished_run();
    let served = Served::start(&[s.path()]);

    assert_eq!(served.json("/api/v1/health", 200)["status"], "ok");
    let ready = served.json("/api/v1/ready", 200);
    assert_eq!(ready["repos"][0]["has_state"], true);
    let repos = served.json("/api/v1/repos", 200);
    let repo = repos[0]["name"].as_str().unwrap().to_string();

    let list = served.json("/api/v1/runs", 200);
    let summary = &list["runs"][0];
    assert_eq!(summary["id"], id.as_str());
    assert_eq!(summary["repo"], repo.as_str());
    assert_eq!(summary["state"], "succeeded");
    assert_eq!(summary["workflow"], "served");
    assert_eq!(summary["counts"]["total"], 6);
    assert_eq!(summary["counts"]["succeeded"], 6);
    assert!(summary["started_by"].as_str().unwrap().contains("(cli"));
    assert_eq!(summary["live"], false);
    // Filters and paging.
    assert_eq!(
        served.json("/api/v1/runs?state=failed", 200)["runs"],
        Value::Array(vec![])
    );
    assert_eq!(
        served.json("/api/v1/runs?workflow=served&limit=1", 200)["runs"][0]["id"],
        id.as_str()
    );
    assert_eq!(
        served.json(&format!("/api/v1/runs?before={id}"), 200)["runs"],
        Value::Array(vec![])
    );

    let run = served.json(&format!("/api/v1/runs/{id}"), 200);
    let nodes: Vec<&str> = run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["node"].as_str().unwrap())
        .collect();
    assert_eq!(
        nodes,
        ["hello", "edit", "shard[0]", "shard[1]", "shard[2]", "merge"]
    );
    assert_eq!(run["result"], "merge");
    // A prefix and `latest` name it too.
    assert_eq!(
        served.json(&format!("/api/v1/runs/{}", &id[..12]), 200)["id"],
        id.as_str()
    );
    assert_eq!(served.json("/api/v1/runs/latest", 200)["id"], id.as_str());

    let graph = served.json(&format!("/api/v1/runs/{id}/graph"), 200);
    let group = |name: &str| {
        graph["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["id"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(group("shard")["count"], 3);
    assert_eq!(group("shard")["counts"]["succeeded"], 3);
    assert_eq!(group("shard")["layer"], 1);
    assert_eq!(group("merge")["layer"], 2);
    assert_eq!(group("merge")["kind"], "merge");
    assert!(graph["edges"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!({"from": "edit", "to": "merge"})));

    let task = served.json(&format!("/api/v1/runs/{id}/tasks/edit"), 200);
    assert_eq!(task["task"]["state"], "succeeded");
    assert_eq!(task["attempts"][0]["succeeded"], true);
    assert_eq!(task["attempt_numbers"], serde_json::json!([1]));
    assert_eq!(
        served.json(&format!("/api/v1/runs/{id}/tasks/shard%5B1%5D"), 200)["task"]["node"],
        "shard[1]"
    );

    // Logs: whole, a byte range, the other stream.
    let (code, log) = served.get(&format!("/api/v1/runs/{id}/tasks/hello/logs"));
    assert_eq!((code, log.as_str()), (200, "hello from the log\n"));
    let (_, part) = served.get(&format!(
        "/api/v1/runs/{id}/tasks/hello/logs?offset=6&length=4"
    ));
    assert_eq!(part, "from");
    let (_, err) = served.get(&format!(
        "/api/v1/runs/{id}/tasks/hello/logs?stream=err&attempt=1"
    ));
    assert_eq!(err, "and on stderr\n");
    // A followed log of a finished attempt ends with the file.
    let (_, followed) = served.get(&format!("/api/v1/runs/{id}/tasks/hello/logs?follow=true"));
    assert_eq!(followed, "hello from the log\n");

    let (code, diff) = served.get(&format!("/api/v1/runs/{id}/tasks/edit/diff"));
    assert_eq!(code, 200);
    assert!(
        diff.contains("+++ b/file.txt") && diff.contains("+changed"),
        "{diff}"
    );

    let artifacts = served.json(&format!("/api/v1/runs/{id}/artifacts"), 200);
    let paths: Vec<String> = artifacts
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["node"] == "edit")
        .map(|a| a["path"].as_str().unwrap().to_string())
        .collect();
    assert!(paths.contains(&"notes/a.txt".to_string()), "{artifacts}");
    let only_edit = served.json(&format!("/api/v1/runs/{id}/artifacts?node=edit"), 200);
    assert!(only_edit
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["node"] == "edit"));
    assert_eq!(only_edit.as_array().unwrap().len(), paths.len());
    let (code, kept) = served.get(&format!("/api/v1/runs/{id}/artifacts/edit/1/notes/a.txt"));
    assert_eq!((code, kept.as_str()), (200, "kept\n"));

    let report = served.json(&format!("/api/v1/runs/{id}/report"), 200);
    assert_eq!(report["run"], id.as_str());
    assert_eq!(report["tasks"].as_array().unwrap().len(), 6);
    let (code, md) = served.get(&format!("/api/v1/runs/{id}/report?format=markdown"));
    assert_eq!(code, 200);
    assert!(md.starts_with(&format!("## ccluster run `{id}`")), "{md}");

    let (code, result) = served.get(&format!("/api/v1/runs/{id}/diff"));
    assert_eq!(code, 200);
    assert!(result.contains("+changed"), "{result}");

    // The description of all this.
    let (code, openapi) = served.get("/openapi.json");
    assert_eq!(code, 200);
    let doc: Value = serde_json::from_str(&openapi).unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    drop(s);
}

#[test]
fn the_committed_openapi_description_matches_the_binary() {
    let run = crate::support::ccluster(&["schema", "--openapi"]);
    assert_eq!(run.code, 0);
    let committed = std::fs::read_to_string(root().join("schema/openapi.json")).unwrap();
    assert!(
        run.stdout == committed,
        "schema/openapi.json is stale: run `cargo run -p ccluster -- schema --openapi > schema/openapi.json`"
    );
    // Every route the server has is described, and nothing else.
    let doc: Value = serde_json::from_str(&committed).unwrap();
    let mut paths: Vec<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        [
            "/api/v1/events",
            "/api/v1/health",
            "/api/v1/plan",
            "/api/v1/ready",
            "/api/v1/repos",
            "/api/v1/runs",
            "/api/v1/runs/{run}",
            "/api/v1/runs/{run}/artifacts",
            "/api/v1/runs/{run}/artifacts/{node}/{attempt}/{path}",
            "/api/v1/runs/{run}/cancel",
            "/api/v1/runs/{run}/diff",
            "/api/v1/runs/{run}/events",
            "/api/v1/runs/{run}/graph",
            "/api/v1/runs/{run}/report",
            "/api/v1/runs/{run}/retry",
            "/api/v1/runs/{run}/tasks/{node}",
            "/api/v1/runs/{run}/tasks/{node}/diff",
            "/api/v1/runs/{run}/tasks/{node}/logs",
            "/api/v1/runs/{run}/tasks/{node}/transcript",
        ]
    );
}

#[test]
fn events_resume_after_the_last_event_id() {
    let (s, id) = finished_run();
    let served = Served::start(&[s.path()]);
    let path = format!("/api/v1/runs/{id}/events");
    let all = read_sse(&served, &path, None, Duration::from_secs(20), |_| false);
    // The stream ends by itself after run_finished, and is what `apply --output json` printed.
    assert_eq!(all.first().unwrap().event, "run_started");
    assert_eq!(all.last().unwrap().event, "run_finished");
    let printed: Vec<Value> = std::fs::read_to_string(
        s.path()
            .join(".ccluster/runs")
            .join(&id)
            .join("events.jsonl"),
    )
    .unwrap()
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    let streamed: Vec<Value> = all
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap())
        .collect();
    assert_eq!(streamed, printed);
    for (i, e) in all.iter().enumerate() {
        assert_eq!(e.id.as_deref(), Some((i + 1).to_string().as_str()));
        let v: Value = serde_json::from_str(&e.data).unwrap();
        assert_eq!(v["event"], e.event.as_str());
        assert_eq!(v["run"], id.as_str());
    }
    // A client that saw up to id 3 gets exactly the rest.
    let rest = read_sse(&served, &path, Some("3"), Duration::from_secs(20), |_| {
        false
    });
    assert_eq!(rest.len(), all.len() - 3);
    assert_eq!(rest[0].id.as_deref(), Some("4"));
    assert_eq!(rest[0].data, all[3].data);
    let after = read_sse(
        &served,
        &format!("{path}?after={}", all.len() - 1),
        None,
        Duration::from_secs(20),
        |_| false,
    );
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].event, "run_finished");
}

/// A workflow whose `slow` task waits for a file the test writes.
const GATED: &str = r#"version = 1
[workflow]
name = "gated"

[tasks.first]
run = "echo first"

[tasks.slow]
needs = ["first"]
run = "echo waiting; while [ ! -e gate ]; do sleep 0.05; done; echo through"

[tasks.last]
needs = ["slow"]
run = "echo last"
"#;

fn started_tasks(events: &[Sse]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.event == "task_started")
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["task"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

#[test]
fn a_run_started_in_a_terminal_is_seen_live() {
    let s = Sandbox::in_repo(GATED, &[]);
    let served = Served::start(&[s.path()]);
    // The run-level stream shows every run as it appears and changes.
    let overview = {
        let url = served.url("/api/v1/events");
        std::thread::spawn(move || {
            let served = Served {
                child: None,
                base: url.trim_end_matches("/api/v1/events").to_string(),
            };
            read_sse(
                &served,
                "/api/v1/events",
                None,
                Duration::from_secs(60),
                |e| {
                    let v: Value = serde_json::from_str(&e.data).unwrap();
                    v["state"] == "succeeded"
                },
            )
        })
    };
    let mut apply = s.spawn_apply(&[]);
    // The run appears, running, read from its driver's live snapshot.
    let mut id = String::new();
    wait_for("the run to show", Duration::from_secs(20), || {
        let list = served.json("/api/v1/runs", 200);
        match list["runs"][0]["id"].as_str() {
            Some(found) => {
                id = found.to_string();
                true
            }
            None => false,
        }
    });
    wait_for("slow to run", Duration::from_secs(20), || {
        let run = served.json(&format!("/api/v1/runs/{id}"), 200);
        crate::support::task(&run, "slow")["state"] == "running"
    });
    let run = served.json(&format!("/api/v1/runs/{id}"), 200);
    assert_eq!(run["state"], "running");
    assert_eq!(run["live"], true);
    // Nodes that have not started yet are listed too, pending.
    assert_eq!(crate::support::task(&run, "last")["state"], "pending");
    assert_eq!(run["counts"]["total"], 3);
    let (_, waiting) = served.get(&format!("/api/v1/runs/{id}/tasks/slow/logs"));
    assert_eq!(waiting, "waiting\n");

    // Events so far, then the rest live as the gate opens: none twice, none missed.
    let path = format!("/api/v1/runs/{id}/events");
    let before = read_sse(&served, &path, None, Duration::from_secs(20), |e| {
        e.event == "task_started" && e.data.contains("\"slow\"")
    });
    let last_id = before.last().unwrap().id.clone().unwrap();
    let follower = {
        let base = served.base.clone();
        let path = path.clone();
        std::thread::spawn(move || {
            let served = Served { child: None, base };
            read_sse(
                &served,
                &path,
                Some(&last_id),
                Duration::from_secs(60),
                |_| false,
            )
        })
    };
    // A followed log gets the rest of the task's output as it comes, and ends with the attempt.
    let log_follower = {
        let url = served.url(&format!("/api/v1/runs/{id}/tasks/slow/logs?follow=true"));
        std::thread::spawn(move || {
            let mut body = ureq::get(&url).call().unwrap().into_body();
            body.read_to_string().unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(s.path().join("gate"), "").unwrap();
    let after = follower.join().unwrap();
    assert_eq!(after.last().unwrap().event, "run_finished");
    let mut all = before.clone();
    all.extend(after);
    let ids: Vec<u64> = all
        .iter()
        .map(|e| e.id.as_ref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(ids, (1..=ids.len() as u64).collect::<Vec<_>>());
    assert_eq!(started_tasks(&all), ["first", "slow", "last"]);
    assert_eq!(log_follower.join().unwrap(), "waiting\nthrough\n");
    assert!(apply.wait().unwrap().success());

    let seen = overview.join().unwrap();
    let states: Vec<String> = seen
        .iter()
        .map(|e| {
            serde_json::from_str::<Value>(&e.data).unwrap()["state"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        states.first().map(String::as_str),
        Some("running"),
        "{states:?}"
    );
    assert_eq!(states.last().map(String::as_str), Some("succeeded"));
    let finished = served.json(&format!("/api/v1/runs/{id}"), 200);
    assert_eq!(finished["state"], "succeeded");
    assert_eq!(finished["live"], false);
}

#[test]
fn a_run_started_by_the_server_is_followed_from_the_cli_and_cancelled() {
    let s = Sandbox::in_repo(GATED, &[]);
    let served = Served::start(&[s.path()]);
    let (code, started) = served.post("/api/v1/runs", "{}");
    assert_eq!(code, 202, "{started}");
    let id = started["run"].as_str().unwrap().to_string();
    wait_for("slow to run", Duration::from_secs(20), || {
        let status = s.status();
        status["run"]["id"] == id.as_str()
            && status["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["node"] == "slow" && t["state"] == "running")
    });
    // `ccluster status` from a terminal sees it; `logs` too.
    let status = s.status();
    assert_eq!(status["run"]["state"], "running");
    // Tasks that have not started are listed too, pending.
    assert_eq!(crate::support::task(&status, "last")["state"], "pending");
    let logs = s.command(&["logs", &id, "slow"]).output().unwrap();
    assert!(String::from_utf8_lossy(&logs.stdout).contains("waiting"));
    assert_eq!(
        served.json(&format!("/api/v1/runs/{id}"), 200)["started_by"],
        "server"
    );

    let (code, cancelled) = served.post(&format!("/api/v1/runs/{id}/cancel"), "");
    assert_eq!(code, 202, "{cancelled}");
    wait_for("the run to end", Duration::from_secs(30), || {
        served.json(&format!("/api/v1/runs/{id}"), 200)["state"] == "cancelled"
    });
    assert_eq!(s.status()["run"]["state"], "cancelled");
    // Cancelling what is over is a conflict.
    let (code, again) = served.post(&format!("/api/v1/runs/{id}/cancel"), "");
    assert_eq!(
        (code, again["code"].as_str()),
        (409, Some("run-not-running"))
    );

    // Retry runs it again: what succeeded is reused.
    std::fs::write(s.path().join("gate"), "").unwrap();
    let (code, retried) = served.post(&format!("/api/v1/runs/{id}/retry"), "");
    assert_eq!(code, 202, "{retried}");
    let new_id = retried["run"].as_str().unwrap().to_string();
    assert_ne!(new_id, id);
    let events = read_sse(
        &served,
        &format!("/api/v1/runs/{new_id}/events"),
        None,
        Duration::from_secs(60),
        |_| false,
    );
    let last: Value = serde_json::from_str(&events.last().unwrap().data).unwrap();
    assert_eq!(last["event"], "run_finished");
    assert_eq!(last["state"], "succeeded");
    assert!(!started_tasks(&events).contains(&"first".to_string()));
}

#[test]
fn a_server_killed_mid_run_loses_nothing() {
    let s = Sandbox::in_repo(GATED, &[]);
    let mut served = Served::start(&[s.path()]);
    let (code, started) = served.post("/api/v1/runs", "{}");
    assert_eq!(code, 202, "{started}");
    let id = started["run"].as_str().unwrap().to_string();
    let path = format!("/api/v1/runs/{id}/events");
    let before = read_sse(&served, &path, None, Duration::from_secs(20), |e| {
        e.event == "task_started" && e.data.contains("\"slow\"")
    });
    let port: u16 = served.base.rsplit(':').next().unwrap().parse().unwrap();
    served.kill();
    // The run goes on without the server: it is a driver of its own.
    std::fs::write(s.path().join("gate"), "").unwrap();
    let served = Served::start_on(&[s.path()], port);
    let last_id = before.last().unwrap().id.clone().unwrap();
    let after = read_sse(
        &served,
        &path,
        Some(&last_id),
        Duration::from_secs(60),
        |_| false,
    );
    let mut all = before;
    all.extend(after);
    assert_eq!(all.last().unwrap().event, "run_finished");
    assert_eq!(started_tasks(&all), ["first", "slow", "last"]);
    let run = served.json(&format!("/api/v1/runs/{id}"), 200);
    assert_eq!(run["state"], "succeeded");
    for t in run["tasks"].as_array().unwrap() {
        assert_eq!(t["attempts"], 1, "{t}");
    }
}

#[test]
fn a_driver_killed_mid_run_shows_as_interrupted_and_its_stream_ends() {
    let s = Sandbox::in_repo(GATED, &[]);
    let served = Served::start(&[s.path()]);
    let mut apply = s.spawn_apply(&[]);
    let mut id = String::new();
    wait_for("slow to run", Duration::from_secs(20), || {
        let list = served.json("/api/v1/runs", 200);
        let Some(found) = list["runs"][0]["id"].as_str() else {
            return false;
        };
        id = found.to_string();
        let run = served.json(&format!("/api/v1/runs/{id}"), 200);
        crate::support::task(&run, "slow")["state"] == "running"
    });
    // The driver is the process the supervisor started; the run record has its pid.
    let status = s.status();
    let pid = status["run"]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = apply.wait();
    let events = read_sse(
        &served,
        &format!("/api/v1/runs/{id}/events"),
        None,
        Duration::from_secs(20),
        |_| false,
    );
    assert_ne!(events.last().unwrap().event, "run_finished");
    assert_eq!(
        served.json(&format!("/api/v1/runs/{id}"), 200)["state"],
        "interrupted"
    );
}

fn problem(served: &Served, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (code, value) = if method == "GET" {
        let (code, text) = served.get(path);
        (
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    } else {
        served.post(path, body)
    };
    assert!(value["code"].is_string(), "{method} {path}: {code} {value}");
    assert_eq!(value["status"], code);
    (code, value)
}

#[test]
fn bad_input_gets_a_problem_detail_and_never_a_panic() {
    let (s, id) = finished_run();
    let served = Served::start(&[s.path()]);
    let cases: Vec<(&str, String, &str, u16, &str)> = vec![
        (
            "GET",
            "/api/v1/runs/20990101-000000.000-ffff".into(),
            "",
            404,
            "run-not-found",
        ),
        (
            "GET",
            "/api/v1/runs/..%2F..%2Fetc".into(),
            "",
            404,
            "run-not-found",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/tasks/nope"),
            "",
            404,
            "task-not-found",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/tasks/hello/logs?stream=..%2F..%2Fdb"),
            "",
            400,
            "unknown-stream",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/tasks/hello/logs?offset=999999"),
            "",
            416,
            "offset-past-end",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/tasks/hello/diff"),
            "",
            404,
            "no-diff",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/tasks/hello/transcript"),
            "",
            404,
            "not-an-agent",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/artifacts/edit/1/%2Fetc%2Fpasswd"),
            "",
            400,
            "invalid-path",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/artifacts/edit/1/notes%2F..%2F..%2F..%2Fdb"),
            "",
            400,
            "invalid-path",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/artifacts/edit/x/notes/a.txt"),
            "",
            400,
            "invalid-attempt",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/artifacts/edit/1/notes/b.txt"),
            "",
            404,
            "artifact-not-found",
        ),
        (
            "GET",
            format!("/api/v1/runs/{id}/report?format=pdf"),
            "",
            400,
            "unknown-format",
        ),
        (
            "GET",
            "/api/v1/runs?state=happy".into(),
            "",
            400,
            "unknown-state",
        ),
        (
            "GET",
            "/api/v1/runs?repo=elsewhere".into(),
            "",
            400,
            "unknown-repo",
        ),
        (
            "GET",
            "/api/v1/nothing-here".into(),
            "",
            404,
            "no-such-endpoint",
        ),
        (
            "POST",
            "/api/v1/runs".into(),
            "{not json",
            400,
            "invalid-json",
        ),
        (
            "POST",
            "/api/v1/runs".into(),
            r#"{"rehearse": "yes"}"#,
            422,
            "invalid-json",
        ),
        (
            "POST",
            "/api/v1/runs".into(),
            r#"{"clusterfile": "../../etc/passwd"}"#,
            400,
            "invalid-path",
        ),
        (
            "POST",
            "/api/v1/runs".into(),
            r#"{"clusterfile": "/etc/passwd"}"#,
            400,
            "invalid-path",
        ),
        (
            "POST",
            "/api/v1/runs".into(),
            r#"{"clusterfile": "missing.toml"}"#,
            404,
            "clusterfile-not-found",
        ),
        (
            "POST",
            "/api/v1/plan".into(),
            r#"{"surprise": 1}"#,
            422,
            "invalid-json",
        ),
        (
            "POST",
            format!("/api/v1/runs/{id}/cancel"),
            "",
            409,
            "run-not-running",
        ),
    ];
    for (method, path, body, status, code) in &cases {
        let (got, value) = problem(&served, method, path, body);
        assert_eq!(
            (got, value["code"].as_str().unwrap()),
            (*status, *code),
            "{method} {path}: {value}"
        );
    }
    // The raw `..` in a URL path (clients that do not normalise it).
    let mut stream =
        std::net::TcpStream::connect(served.base.trim_start_matches("http://")).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "GET /api/v1/runs/{id}/artifacts/edit/1/../../../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(!answer.contains("root:"), "{answer}");

    // A kept file swapped for a symlink out of the state is refused.
    let kept = s
        .path()
        .join(".ccluster/runs")
        .join(&id)
        .join("artifacts/edit.1/files/notes/a.txt");
    std::fs::remove_file(&kept).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &kept).unwrap();
    let (code, value) = problem(
        &served,
        "GET",
        &format!("/api/v1/runs/{id}/artifacts/edit/1/notes/a.txt"),
        "",
    );
    assert_eq!((code, value["code"].as_str()), (403, Some("path-escapes")));

    // An oversized body.
    let big = format!(r#"{{"inputs": {{"x": "{}"}}}}"#, "a".repeat(2 << 20));
    let (code, value) = problem(&served, "POST", "/api/v1/runs", &big);
    assert_eq!(
        (code, value["code"].as_str()),
        (413, Some("body-too-large"))
    );

    // A clusterfile with errors: its diagnostics, with positions.
    s.file("broken.toml", "version = 1\n[tasks.x]\nrun = 3\n")
        .unwrap();
    for endpoint in ["/api/v1/plan", "/api/v1/runs"] {
        let (code, value) = problem(
            &served,
            "POST",
            endpoint,
            r#"{"clusterfile": "broken.toml"}"#,
        );
        assert_eq!(
            (code, value["code"].as_str()),
            (422, Some("invalid-clusterfile"))
        );
        let d = &value["diagnostics"][0];
        assert_eq!(
            (d["file"].as_str(), d["line"].as_u64(), d["column"].as_u64()),
            (Some("broken.toml"), Some(3), Some(7)),
            "{value}"
        );
        assert!(
            value["detail"]
                .as_str()
                .unwrap()
                .contains("broken.toml:3:7"),
            "{value}"
        );
    }
    // A plan with inputs.
    let (code, plan) = served.post("/api/v1/plan", "{}");
    assert_eq!(code, 200, "{plan}");
    assert_eq!(plan["workflow"]["name"], "served");

    // Clients that go away mid-stream hold nothing up.
    for path in [
        format!("/api/v1/runs/{id}/events"),
        "/api/v1/events".to_string(),
        format!("/api/v1/runs/{id}/tasks/hello/logs?follow=true"),
    ] {
        let mut stream =
            std::net::TcpStream::connect(served.base.trim_start_matches("http://")).unwrap();
        write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut first = [0u8; 64];
        let _ = stream.read(&mut first).unwrap();
        drop(stream);
    }
    assert_eq!(served.json("/api/v1/health", 200)["status"], "ok");
    assert_eq!(
        served.json("/api/v1/runs", 200)["runs"][0]["id"],
        id.as_str()
    );
}

#[test]
fn serving_beyond_loopback_needs_insecure() {
    let run = crate::support::ccluster(&["serve", "--addr", "0.0.0.0:0", "--repo", "."]);
    assert_eq!(run.code, 2);
    assert!(
        run.stderr.contains("not a loopback address"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("--insecure"), "{}", run.stderr);
}

#[test]
fn two_repositories_are_served_side_by_side() {
    let (a, id_a) = finished_run();
    let b = Sandbox::in_repo(GATED, &[]);
    std::fs::write(b.path().join("gate"), "").unwrap();
    assert_eq!(b.apply(&[]).code, 0);
    let id_b = b.run_id();
    let served = Served::start(&[a.path(), b.path()]);
    let repos = served.json("/api/v1/repos", 200);
    let name_b = repos[1]["name"].as_str().unwrap().to_string();
    let list = served.json("/api/v1/runs", 200);
    assert_eq!(list["runs"].as_array().unwrap().len(), 2);
    let only_b = served.json(&format!("/api/v1/runs?repo={name_b}"), 200);
    assert_eq!(only_b["runs"][0]["id"], id_b.as_str());
    assert_eq!(only_b["runs"].as_array().unwrap().len(), 1);
    assert_eq!(
        served.json(&format!("/api/v1/runs/{id_a}"), 200)["workflow"],
        "served"
    );
    // With several repositories, a start says which.
    let (code, value) = served.post("/api/v1/runs", "{}");
    assert_eq!((code, value["code"].as_str()), (400, Some("repo-required")));
    drop((a, b));
}

#[test]
fn an_agent_transcript_is_told_step_by_step() {
    let s = crate::agents::repo(
        r#"version = 1
[workflow]
name = "talk"

[tasks.writer]
prompt = "Write a note"
workspace = "worktree"
"#,
    );
    std::fs::write(
        s.path().join("script.toml"),
        r#"[tasks.writer]
turns = [
  { tools = [{ name = "Write", input = { file_path = "{{cwd}}/note.txt", content = "noted\n" } }] },
  { text = "wrote the note" },
]
"#,
    )
    .unwrap();
    let done = crate::agents::rehearse(&s, &["--script", "script.toml"]);
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    let id = s.run_id();
    let served = Served::start(&[s.path()]);
    let steps = served.json(&format!("/api/v1/runs/{id}/tasks/writer/transcript"), 200);
    let kinds: Vec<&str> = steps
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"system"), "{steps}");
    assert_eq!(kinds.last(), Some(&"result"), "{steps}");
    let tool = steps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "tool")
        .unwrap_or_else(|| panic!("no tool call in {steps}"));
    assert!(
        tool["detail"].as_str().unwrap().starts_with("Write ")
            && tool["detail"].as_str().unwrap().ends_with("note.txt"),
        "{tool}"
    );
    assert!(
        kinds.iter().filter(|k| **k == "turn").count() >= 2,
        "{steps}"
    );
    let result = steps.as_array().unwrap().last().unwrap();
    assert!(result["cost_usd"].as_f64().unwrap() > 0.0, "{result}");
    assert!(
        result["detail"]
            .as_str()
            .unwrap()
            .contains("wrote the note"),
        "{result}"
    );
    // The run's summary carries the cost, and the task its usage.
    let run = served.json(&format!("/api/v1/runs/{id}"), 200);
    assert!(run["cost_usd"].as_f64().unwrap() > 0.0, "{run}");
    let task = served.json(&format!("/api/v1/runs/{id}/tasks/writer"), 200);
    assert!(
        task["attempts"][0]["usage"]["turns"].as_u64().unwrap() >= 2,
        "{task}"
    );
    let (_, diff) = served.get(&format!("/api/v1/runs/{id}/tasks/writer/diff"));
    assert!(diff.contains("+noted"), "{diff}");
}

#[test]
fn a_servers_policy_holds_every_run_it_plans_and_starts() {
    let s = Sandbox::in_repo(
        r#"version = 1
[workflow]
name = "guarded"

[tasks.change]
workspace = "worktree"
run = "mkdir -p .github && echo 'on: push' > .github/ci.yml"
"#,
        &[("README.md", "hi\n")],
    );
    let ops = tempfile::tempdir().unwrap();
    let policy = ops.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[policy]\ndenied_paths = [\".github/**\"]\nmax_run_usd = 1\n",
    )
    .unwrap();
    let served = Served::start_with(&[s.path()], 0, &["--policy", policy.to_str().unwrap()]);
    // The plan the server makes is held to its policy, and shows it.
    let (code, plan) = served.post("/api/v1/plan", "{}");
    assert_eq!(code, 200, "{plan}");
    assert_eq!(plan["policy"]["changes"]["denied_paths"][0], ".github/**");
    assert_eq!(plan["policy"]["max_run_usd"], 1.0);
    // So is the run it starts: the clusterfile allows the change, the server's policy does not.
    let (code, started) = served.post("/api/v1/runs", "{}");
    assert_eq!(code, 202, "{started}");
    let id = started["run"].as_str().unwrap().to_string();
    wait_for("the run to end", Duration::from_secs(30), || {
        let (code, run) = served.get(&format!("/api/v1/runs/{id}"));
        code == 200 && serde_json::from_str::<Value>(&run).is_ok_and(|r| r["state"] == "failed")
    });
    let run = served.json(&format!("/api/v1/runs/{id}"), 200);
    let task = run["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["node"] == "change")
        .unwrap();
    assert_eq!(task["class"], "policy", "{run}");
    assert!(
        task["message"].as_str().unwrap().contains("`.github/**`"),
        "{run}"
    );
}
