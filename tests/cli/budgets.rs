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
}
