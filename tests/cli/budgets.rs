//! A run's budget holds while its agents run: their responses are priced as they stream, and
//! when the run's spending crosses `max_run_usd` its agents are stopped, so it overshoots by at
//! most the responses in flight (one per running agent).

use crate::agents::{rehearse, repo};

#[test]
fn a_run_budget_stops_running_agents_within_one_response_each() {
    let agents = 3;
    let tasks: String = (0..agents)
        .map(|i| format!("[tasks.t{i}]\nprompt = \"Work {i}\"\n"))
        .collect();
    // $10 for the run; every response costs $1 (250,000 input tokens at the default model's
    // price), and each agent would make eight.
    let s = repo(&format!(
        "version = 1\n[workflow]\nname = \"spend\"\n[defaults]\ntimeout = \"3m\"\nmax_run_usd = 10.0\n{tasks}"
    ));
    let mut script = String::from("turn_delay_ms = 400\n");
    for i in 0..agents {
        let turns: Vec<String> = (0..7)
            .map(|t| {
                format!(
                    "{{ tools = [{{ name = \"Write\", input = {{ file_path = \"{{{{cwd}}}}/t{i}-{t}.txt\", content = \"x\" }} }}] }}"
                )
            })
            .chain(["{ text = \"done\" }".to_string()])
            .collect();
        script.push_str(&format!(
            "[tasks.t{i}]\nusage = [250000, 10]\nturns = [{}]\n",
            turns.join(", ")
        ));
    }
    std::fs::write(s.path().join("script.toml"), script).unwrap();
    let done = rehearse(&s, &["--script", "script.toml", "--agents", "3"]);
    assert_eq!(done.code, 1, "{}{}", done.stdout, done.stderr);
    let finished = done.of("run_finished");
    assert_eq!(finished[0]["state"], "failed", "{}", done.stdout);
    let warned: Vec<&str> = done
        .of("warning")
        .iter()
        .filter_map(|w| w["message"].as_str())
        .filter(|m| m.contains("budget is spent"))
        .collect();
    assert_eq!(warned.len(), 1, "{}", done.stdout);
    // No agent finished its eight responses: they were stopped.
    assert!(done.of("task_succeeded").is_empty(), "{}", done.stdout);
    let cancelled = done.of("task_cancelled");
    assert_eq!(cancelled.len(), agents, "{}", done.stdout);
    assert!(cancelled
        .iter()
        .all(|c| c["reason"].as_str().unwrap().contains("budget is spent")));
    // What they cost in the end, by the CLI's own accounts: over the budget by at most one
    // response ($1) per running agent.
    let status = s.status();
    let spent: f64 = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["cost_usd"].as_f64().unwrap_or(0.0))
        .sum();
    let overshoot = spent - 10.0;
    eprintln!("spent ${spent:.2}: overshoot ${overshoot:.2} for {agents} running agents");
    assert!(spent >= 10.0, "spent {spent}");
    assert!(overshoot <= 1.0 * agents as f64, "spent {spent}");
    // The report says what stopped the run.
    let report = s.command(&["report"]).output().unwrap();
    let report = String::from_utf8_lossy(&report.stdout);
    assert!(
        report.contains("**Stopped by its budget:** the run's agent budget is spent ("),
        "{report}"
    );
}

#[test]
fn a_tasks_budget_stops_its_agent_alone_at_the_clusterfiles_prices_and_status_shows_cost_growing() {
    // Each response reads 250,000 tokens: $1 at the built-in price, $2 at the clusterfile's.
    let s = repo(
        r#"version = 1
[workflow]
name = "task-budget"

[prices.claude]
input = 8
output = 40

[defaults]
timeout = "3m"

[tasks.capped]
prompt = "Spend"
claude = { max_budget_usd = 5 }

[tasks.free]
prompt = "Spend a little"
"#,
    );
    let write = |i: usize| {
        format!("{{ tools = [{{ name = \"Write\", input = {{ file_path = \"{{{{cwd}}}}/f{i}.txt\", content = \"x\" }} }}] }}")
    };
    let turns = |n: usize| {
        (0..n)
            .map(write)
            .chain(["{ text = \"done\" }".to_string()])
            .collect::<Vec<_>>()
            .join(", ")
    };
    std::fs::write(
        s.path().join("script.toml"),
        format!(
            "turn_delay_ms = 1500\n[tasks.capped]\nusage = [250000, 10]\nturns = [{}]\n[tasks.free]\nusage = [250000, 10]\nturns = [{}]\n",
            turns(7),
            turns(3)
        ),
    )
    .unwrap();
    let child = s
        .command(&[
            "apply",
            "--rehearse",
            "--output",
            "json",
            "--grace-period",
            "1s",
            "--script",
            "script.toml",
        ])
        .env("CCLUSTER_CLAUDE_BIN", crate::support::claude_bin())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs, `status` shows the running agents' cost so far, growing.
    let mut seen: Vec<f64> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::time::Instant::now() < deadline && seen.len() < 40 {
        let out = s
            .command(&["status", "--json", "--state-dir", ".ccluster"])
            .output()
            .unwrap();
        if let Ok(status) = serde_json::from_slice::<serde_json::Value>(&out.stdout) {
            if status["run"]["state"] != "running" && !seen.is_empty() {
                break;
            }
            // The capped agent's cost so far, as `status` tells it.
            if let Some(so_far) = status["tasks"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["node"] == "capped")
                .and_then(|t| t["live_cost_usd"].as_f64())
            {
                if seen.last() != Some(&so_far) {
                    seen.push(so_far);
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(150));
    }
    let done = crate::support::Applied::from_output(child.wait_with_output().unwrap());
    // It grew, response by response, and never shrank.
    assert!(seen.len() >= 2, "the cost so far never grew: {seen:?}");
    assert!(seen.windows(2).all(|w| w[1] > w[0]), "{seen:?}");
    // The capped agent was stopped by its own budget, at the clusterfile's prices: the CLI's
    // own `--max-budget-usd 5` (at $1 a response) would have let it make five responses.
    let failed = done.of("task_failed");
    assert_eq!(failed.len(), 1, "{}{}", done.stdout, done.stderr);
    assert_eq!(failed[0]["task"], "capped");
    assert_eq!(failed[0]["class"], "budget");
    let message = failed[0]["message"].as_str().unwrap();
    assert!(
        message.starts_with("stopped: the task's budget is spent ($")
            && message.contains("of `max_budget_usd = 5`"),
        "{message}"
    );
    let stopped_at: f64 = message["stopped: the task's budget is spent ($".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    eprintln!("the task's budget stopped its agent at ${stopped_at:.2} of $5");
    // At most one response ($2) over.
    assert!((5.0..=7.0).contains(&stopped_at), "{message}");
    // The other agent was not touched.
    assert!(done.tasks("task_succeeded").contains(&"free".to_string()));
    // Once the run is over, no cost is "so far" any more.
    let status = s.status();
    assert!(status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .all(|t| t.get("live_cost_usd").is_none()));
}
