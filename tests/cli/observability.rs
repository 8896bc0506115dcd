//! Observability against real components: an OTLP receiver built on the official protocol
//! definitions (`tests/otlp/receiver.py`: opentelemetry-proto and grpcio from PyPI; see
//! [`crate::otlp`]) gets a rehearsed run's trace and metrics; Debian's Prometheus scrapes `serve` and `apply
//! --metrics-addr`; JSON logs parse line by line. The components are installed by
//! `scripts/otlp-receiver-for-tests.sh` and `scripts/prometheus-for-tests.sh` when missing, and a
//! test fails when it cannot get them.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::agents::repo;
use crate::dashboard::http;
use crate::otlp::{attributes, script_output, stop, Receiver, Span};
use crate::support::{claude_bin, root, Applied, Sandbox, Served};

/// Polls `done` until it holds, for at most `secs` seconds.
fn wait_for(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

const TRACED: &str = r#"version = 1
[workflow]
name = "traced"

[defaults]
timeout = "2m"

[tasks.write]
prompt = "Write the note"

[tasks.flaky]
run = "echo \"$TRACEPARENT\" > \"$MARKS/traceparent.$CCLUSTER_ATTEMPT\"; test -f \"$MARKS/tried\" || { touch \"$MARKS/tried\"; exit 1; }"
env = { MARKS = "{{ inputs.marks }}" }
retry = { limit = 2, on = ["exit_code"], backoff = { initial = "100ms" } }

[tasks.broken]
run = "echo broken >&2; exit 3"
retry = { limit = 0 }

[inputs.marks]
type = "string"
"#;

#[test]
fn a_rehearsed_run_is_one_trace_in_an_otlp_receiver_with_its_metrics() {
    let receiver = Receiver::start();
    let s = repo(TRACED);
    let marks = tempfile::tempdir().unwrap();
    std::fs::write(
        s.path().join("script.toml"),
        r#"[tasks.write]
turns = [
  { tools = [{ name = "Write", input = { file_path = "{{cwd}}/note.txt", content = "note\n" } }] },
  { text = "wrote it" },
]
"#,
    )
    .unwrap();
    // Traces over gRPC, metrics over HTTP/protobuf: both transports, by the standard variables.
    let done = Applied::from_output(
        s.command(&[
            "apply",
            "--rehearse",
            "--script",
            "script.toml",
            "--output",
            "json",
            "-k",
            "--var",
            &format!("marks={}", marks.path().display()),
        ])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &receiver.grpc)
        .env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")
        .env(
            "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
            format!("{}/v1/metrics", receiver.http),
        )
        .env("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "http/protobuf")
        .env("OTEL_SERVICE_NAME", "ccluster-ci")
        .env("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
        .env_remove("TRACEPARENT")
        .output()
        .unwrap(),
    );
    assert_eq!(done.code, 1, "{}{}", done.stdout, done.stderr);
    let run = done.of("run_started")[0]["run"]
        .as_str()
        .unwrap()
        .to_string();
    // Everything is exported before `apply` exits.
    let spans: Vec<Span> = receiver
        .spans()
        .into_iter()
        .filter(|s| s.attributes.get("ccluster.run") == Some(&run) || s.parent.is_some())
        .collect();
    let roots: Vec<&Span> = spans.iter().filter(|s| s.parent.is_none()).collect();
    assert_eq!(roots.len(), 1, "one root per run: {roots:#?}");
    let root = roots[0];
    assert_eq!(root.name, "run traced");
    assert_eq!(root.attributes["ccluster.workflow"], "traced");
    assert!(root.error, "the run failed: its span says so");
    assert_eq!(root.resource["service.name"], "ccluster-ci");
    assert_eq!(root.resource["deployment.environment"], "test");
    assert!(
        spans.iter().all(|s| s.trace == root.trace),
        "one trace: {spans:#?}"
    );
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.id.as_str(), s)).collect();
    for s in &spans {
        if let Some(parent) = &s.parent {
            assert!(by_id.contains_key(parent.as_str()), "orphan span {s:#?}");
        }
    }
    let task_span = |task: &str| -> &Span {
        let found: Vec<&Span> = spans
            .iter()
            .filter(|s| s.name == format!("task {task}"))
            .collect();
        assert_eq!(found.len(), 1, "one span for task {task}: {found:#?}");
        assert_eq!(found[0].parent.as_deref(), Some(root.id.as_str()));
        found[0]
    };
    let attempts = |task: &Span| -> Vec<&Span> {
        let mut found: Vec<&Span> = spans
            .iter()
            .filter(|s| s.parent.as_deref() == Some(task.id.as_str()))
            .collect();
        found.sort_by_key(|s| s.attributes["ccluster.attempt"].clone());
        assert!(
            found.iter().all(|a| a.name.starts_with("attempt ")),
            "{found:#?}"
        );
        found
    };

    // The retried task: two attempts under one task span, the first an error.
    let flaky = task_span("flaky");
    assert_eq!(flaky.attributes["ccluster.task.state"], "succeeded");
    assert!(!flaky.error);
    let tries = attempts(flaky);
    assert_eq!(tries.len(), 2, "{tries:#?}");
    assert!(tries[0].error);
    assert_eq!(tries[0].attributes["ccluster.attempt.outcome"], "retried");
    assert_eq!(tries[0].attributes["error.type"], "exit_code");
    assert!(!tries[1].error);
    for (key, value) in [
        ("ccluster.run", run.as_str()),
        ("ccluster.workflow", "traced"),
        ("ccluster.task", "flaky"),
        ("ccluster.node", "flaky"),
        ("ccluster.attempt", "2"),
        ("ccluster.runner", "local"),
        ("ccluster.task.kind", "shell"),
    ] {
        assert_eq!(tries[1].attributes[key], value, "{key}: {:#?}", tries[1]);
    }
    // Each attempt's process had its span as TRACEPARENT.
    for (n, attempt) in tries.iter().enumerate() {
        let seen =
            std::fs::read_to_string(marks.path().join(format!("traceparent.{}", n + 1))).unwrap();
        assert_eq!(
            seen.trim(),
            format!("00-{}-{}-01", attempt.trace, attempt.id),
            "attempt {}",
            n + 1
        );
    }
    // The runner's step is a child of the attempt.
    assert!(spans
        .iter()
        .any(|s| s.name == "runner.run" && s.parent.as_deref() == Some(tries[1].id.as_str())));

    // The failed task: its attempt and its task in error, with the class.
    let broken = task_span("broken");
    assert!(broken.error);
    assert_eq!(broken.attributes["ccluster.task.state"], "failed");
    assert_eq!(broken.attributes["error.type"], "exit_code");
    let failed = attempts(broken);
    assert_eq!(failed.len(), 1);
    assert!(failed[0].error);
    assert_eq!(failed[0].attributes["process.exit.code"], "3");

    // The agent: its turns and tool calls under its attempt, its usage on the attempt.
    let write = task_span("write");
    let agent = attempts(write);
    assert_eq!(agent.len(), 1);
    assert_eq!(agent[0].attributes["ccluster.task.kind"], "agent");
    assert!(
        agent[0].attributes["gen_ai.usage.output_tokens"]
            .parse::<u64>()
            .unwrap()
            > 0
    );
    let under = |parent: &Span| -> Vec<&Span> {
        let mut out = Vec::new();
        let mut frontier = vec![parent.id.clone()];
        while let Some(id) = frontier.pop() {
            for s in spans
                .iter()
                .filter(|s| s.parent.as_deref() == Some(id.as_str()))
            {
                out.push(s);
                frontier.push(s.id.clone());
            }
        }
        out
    };
    let inside = under(agent[0]);
    let turns = inside.iter().filter(|s| s.name == "agent turn").count();
    assert!(turns >= 2, "{inside:#?}");
    let tool = inside
        .iter()
        .find(|s| s.name == "tool Write")
        .unwrap_or_else(|| panic!("no tool span: {inside:#?}"));
    assert_eq!(tool.attributes["gen_ai.tool.name"], "Write");
    assert_eq!(tool.attributes["ccluster.tool.detail"], "note.txt");

    // Metrics arrived over HTTP, with the run's figures.
    let metrics = receiver.metrics();
    let finished = &metrics["ccluster.tasks.finished"];
    let count = |state: &str| -> f64 {
        finished
            .iter()
            .filter(|p| attributes(&p["attributes"])["ccluster.task.state"] == state)
            .map(|p| p["as_int"].as_str().unwrap_or("0").parse::<f64>().unwrap())
            .fold(0.0, f64::max)
    };
    assert_eq!(count("succeeded"), 2.0, "{finished:#?}");
    assert_eq!(count("failed"), 1.0, "{finished:#?}");
    let cost: f64 = metrics["ccluster.agent.cost"]
        .iter()
        .map(|p| p["as_double"].as_f64().unwrap_or(0.0))
        .fold(0.0, f64::max);
    assert!(cost > 0.0, "{:#?}", metrics["ccluster.agent.cost"]);
    for name in [
        "ccluster.attempt.duration",
        "ccluster.agent.token.usage",
        "ccluster.runner.operation.duration",
    ] {
        assert!(
            metrics.contains_key(name),
            "no {name}: {:?}",
            metrics.keys()
        );
    }
}

#[test]
fn the_claude_cli_joins_the_attempts_trace_when_its_own_telemetry_is_on() {
    let receiver = Receiver::start();
    let s = repo(
        r#"version = 1
[workflow]
name = "joined"
[defaults]
timeout = "2m"
[tasks.ask]
prompt = "Say hello"
"#,
    );
    // Everything over gRPC: ccluster's export, and the workers' own, which
    // CCLUSTER_AGENT_TELEMETRY switches on with the same endpoint.
    let done = Applied::from_output(
        s.command(&["apply", "--rehearse", "--output", "json"])
            .env("CCLUSTER_CLAUDE_BIN", claude_bin())
            .env("CCLUSTER_AGENT_TELEMETRY", "1")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.grpc)
            .env("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
            .env_remove("OTEL_RESOURCE_ATTRIBUTES")
            .env_remove("TRACEPARENT")
            .output()
            .unwrap(),
    );
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    let spans = receiver.spans();
    let attempt = spans
        .iter()
        .find(|s| s.name == "attempt ask #1")
        .unwrap_or_else(|| panic!("{spans:#?}"));
    let interaction = spans
        .iter()
        .find(|s| s.name == "claude_code.interaction")
        .unwrap_or_else(|| panic!("the CLI sent no interaction span: {spans:#?}"));
    assert_eq!(interaction.resource["service.name"], "claude-code");
    assert_eq!(interaction.resource["ccluster.task"], "ask");
    assert_eq!(interaction.resource["ccluster.workflow"], "joined");
    assert_eq!(interaction.trace, attempt.trace);
    assert_eq!(interaction.parent.as_deref(), Some(attempt.id.as_str()));
    assert!(spans
        .iter()
        .any(|s| s.name == "claude_code.llm_request" && s.trace == attempt.trace));
    // The CLI's own metrics land beside ccluster's.
    let metrics = receiver.metrics();
    assert!(
        metrics.contains_key("claude_code.token.usage"),
        "{:?}",
        metrics.keys()
    );
    assert!(
        metrics.contains_key("ccluster.tasks.finished"),
        "{:?}",
        metrics.keys()
    );
}

#[test]
fn json_logs_parse_line_by_line_with_run_task_and_attempt_on_every_task_line() {
    let s = Sandbox::new(
        r#"version = 1
[workflow]
name = "logged"
[tasks.a]
run = "echo a"
[tasks.b]
run = "exit 2"
needs = ["a"]
retry = { limit = 1, on = ["exit_code"], backoff = { initial = "50ms" } }
[tasks.c]
run = "echo c"
needs = ["b"]
"#,
    );
    let out = s
        .command(&["apply", "--log-format", "json", "--log-file", "log.jsonl"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("\"level\""),
        "logs go to the file, the terminal keeps its progress: {stderr}"
    );
    let text = s.read("log.jsonl");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let task_lines: Vec<&Value> = lines.iter().filter(|l| l.get("task").is_some()).collect();
    // a started and succeeded, b started twice and failed twice (one retry), c cancelled... or
    // skipped: every one is a task line.
    assert!(task_lines.len() >= 7, "{text}");
    for l in &task_lines {
        assert!(l["run"].is_string(), "{l}");
        assert!(l["attempt"].is_u64(), "{l}");
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
    }
    let messages: Vec<(&str, &str, u64)> = task_lines
        .iter()
        .map(|l| {
            (
                l["message"].as_str().unwrap(),
                l["task"].as_str().unwrap(),
                l["attempt"].as_u64().unwrap(),
            )
        })
        .collect();
    for expected in [
        ("task started", "a", 1),
        ("task succeeded", "a", 1),
        ("task started", "b", 2),
        ("task attempt failed; retrying", "b", 1),
        ("task failed", "b", 2),
    ] {
        assert!(messages.contains(&expected), "{expected:?} in {messages:?}");
    }
    let failed = task_lines
        .iter()
        .find(|l| l["message"] == "task failed")
        .unwrap();
    assert_eq!(failed["level"], "WARN");
    assert_eq!(failed["class"], "exit_code");
    assert_eq!(failed["error"], "exit code 2");
    // Without flags, nothing but the progress: text logs are off unless asked for.
    let quiet = s
        .command(&["apply"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&quiet.stderr).contains(" INFO "));
    let wrong = s
        .command(&["apply", "--log-level", "verbose"])
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("`verbose` is not a level"));
    let verbose = s
        .command(&["apply", "--log-level", "info"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&verbose.stderr).contains("task started"),
        "{}",
        String::from_utf8_lossy(&verbose.stderr)
    );
}

/// Debian's Prometheus, scraping `targets` (job name, `host:port`) every second, stopped (by
/// its pid) when dropped.
struct Prometheus {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[(&str, String)]) -> Prometheus {
        static SETUP: std::sync::OnceLock<HashMap<String, String>> = std::sync::OnceLock::new();
        let setup = SETUP.get_or_init(|| script_output("scripts/prometheus-for-tests.sh"));
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (job, target) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
            ));
        }
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = Command::new(&setup["PROMETHEUS"])
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start prometheus");
        let p = Prometheus {
            child,
            base: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        };
        wait_for(30, "prometheus to be ready", || {
            http()
                .get(&format!("{}/-/ready", p.base))
                .call()
                .is_ok_and(|r| r.status() == 200)
        });
        p
    }

    /// Whether every target has been scraped successfully.
    fn all_up(&self) -> bool {
        let Ok(mut answer) = http().get(&format!("{}/api/v1/targets", self.base)).call() else {
            return false;
        };
        let v: Value = answer.body_mut().read_json().unwrap();
        let targets = v["data"]["activeTargets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        !targets.is_empty() && targets.iter().all(|t| t["health"] == "up")
    }

    /// The value of an instant query that returns one series (`None`: no series).
    fn value(&self, query: &str) -> Option<f64> {
        let mut answer = http()
            .get(&format!("{}/api/v1/query", self.base))
            .query("query", query)
            .call()
            .ok()?;
        let v: Value = answer.body_mut().read_json().ok()?;
        let result = v["data"]["result"].as_array()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn prometheus_scrapes_serve_and_a_running_apply_and_finds_the_runs_figures() {
    let agents = 3;
    let tasks: String = (0..agents)
        .map(|i| format!("[tasks.agent{i}]\nprompt = \"Work {i}\"\n"))
        .collect();
    let s = repo(&format!(
        "version = 1\n[workflow]\nname = \"scraped\"\n[defaults]\ntimeout = \"2m\"\nmax_run_usd = 50.0\n{tasks}[tasks.check]\nrun = \"echo ok\"\n[tasks.merge]\nneeds = [{}]\nmerge = {{ strategy = \"git\" }}\n",
        (0..agents)
            .map(|i| format!("\"agent{i}\""))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    // Slow answers, so that the run lasts a few scrapes; one overloaded answer, which the
    // worker's CLI retries.
    std::fs::write(
        s.path().join("script.toml"),
        "turn_delay_ms = 2500\n[tasks.agent0]\nfaults = [{ status = 529 }]\n",
    )
    .unwrap();
    let served = Served::start(&[s.path()]);
    let apply_port = free_port();
    let prometheus = Prometheus::start(&[
        (
            "serve",
            served.base.trim_start_matches("http://").to_string(),
        ),
        ("apply", format!("127.0.0.1:{apply_port}")),
    ]);
    wait_for(30, "a first scrape of the server", || {
        prometheus.value("up{job=\"serve\"}") == Some(1.0)
    });
    let run = s
        .command(&[
            "apply",
            "--rehearse",
            "--script",
            "script.toml",
            "--output",
            "json",
            "--metrics-addr",
            &format!("127.0.0.1:{apply_port}"),
        ])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // While it runs, Prometheus scrapes the apply process itself.
    wait_for(60, "a scrape of the running apply", || {
        prometheus
            .value("max_over_time(sum(ccluster_tasks_running{job=\"apply\"})[5m:500ms])")
            .is_some_and(|n| n >= 1.0)
    });
    let done = Applied::from_output(run.wait_with_output().unwrap());
    assert_eq!(done.code, 0, "{}{}", done.stdout, done.stderr);
    assert!(prometheus.all_up() || prometheus.value("up{job=\"serve\"}") == Some(1.0));
    // The server counts the finished run from its event log.
    let succeeded = "sum(ccluster_tasks_finished_total{job=\"serve\",ccluster_task_state=\"succeeded\",ccluster_workflow=\"scraped\"})";
    wait_for(30, "the run's tasks in Prometheus", || {
        prometheus.value(succeeded) == Some(f64::from(agents + 2))
    });
    let runs = prometheus
        .value("sum(ccluster_runs_finished_total{job=\"serve\",ccluster_run_state=\"succeeded\"})");
    assert_eq!(runs, Some(1.0));
    let cost = prometheus
        .value("sum(ccluster_agent_cost_total{job=\"serve\"})")
        .unwrap();
    let spent: f64 = s.status()["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["cost_usd"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(cost > 0.0);
    assert!((cost - spent).abs() < 1e-6, "{cost} vs the run's {spent}");
    let tokens = prometheus
        .value("sum(ccluster_agent_token_usage_total{job=\"serve\",gen_ai_token_type=\"output\"})")
        .unwrap();
    assert!(tokens > 0.0);
    let attempts = prometheus
        .value("sum(ccluster_attempt_duration_seconds_count{job=\"serve\"})")
        .unwrap();
    assert_eq!(attempts, f64::from(agents + 2));
    let merged = prometheus
        .value("sum(ccluster_merges_total{job=\"serve\",ccluster_merge_outcome=\"clean\"})")
        .unwrap();
    assert_eq!(merged, f64::from(agents));
    let retried = prometheus
        .value("sum(ccluster_agent_api_retries_total{job=\"serve\",error_type=\"overloaded\"})")
        .unwrap();
    assert!(retried >= 1.0, "{retried}");
    // The apply process's own figures, as last scraped before it ended.
    let started = prometheus
        .value("max_over_time(sum(ccluster_tasks_started_total{job=\"apply\"})[5m:1s])")
        .unwrap();
    assert!(started >= 1.0, "{started}");
    let budget_left = prometheus
        .value("max_over_time(min(ccluster_run_budget_remaining{job=\"apply\"})[5m:1s])")
        .unwrap();
    assert!(budget_left > 0.0 && budget_left <= 50.0, "{budget_left}");
    // Every series the shipped Grafana dashboard charts is one Prometheus got from this run
    // (conflicts aside: this run has none).
    let mut answer = http()
        .get(&format!("{}/api/v1/query", prometheus.base))
        .query(
            "query",
            "count by (__name__) (last_over_time({__name__=~\"ccluster_.+\"}[5m]))",
        )
        .call()
        .unwrap();
    let seen: Value = answer.body_mut().read_json().unwrap();
    let seen: Vec<&str> = seen["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["metric"]["__name__"].as_str())
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("docs/grafana/ccluster.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    let mut stack = vec![&dashboard];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(o) => {
                if let Some(Value::String(e)) = o.get("expr") {
                    exprs.push(e.clone());
                }
                stack.extend(o.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    // A series is a name with a selector: `ccluster_runs_started_total{...}`.
    let mut charted = std::collections::BTreeSet::new();
    for expr in &exprs {
        for (at, _) in expr.match_indices("ccluster_") {
            let rest = &expr[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            if rest[end..].starts_with('{') {
                charted.insert(rest[..end].to_string());
            }
        }
    }
    assert!(charted.len() >= 10, "{charted:?}");
    for name in charted {
        if name == "ccluster_merge_conflicts_total" {
            continue;
        }
        assert!(
            seen.contains(&name.as_str()),
            "the dashboard charts {name}, which Prometheus never saw: {seen:?}"
        );
    }
    drop(served);
}
