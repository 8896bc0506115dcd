//! Run metrics, derived from the event stream alone: `apply` feeds its own events as it emits
//! them, and `serve` feeds the event logs of the runs it watches, so both count the same way.
//! Instruments follow OpenTelemetry's naming (dotted names, units, `error.type`,
//! `gen_ai.request.model`); the Prometheus exporter turns them into `ccluster_..._total`,
//! `..._seconds` and so on. Their list is in `docs/observability.md`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};

use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry::KeyValue;

use crate::exec::Event;

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// Seconds an attempt or a wait may take, from a tenth of a second to an hour.
const DURATION_BOUNDS: [f64; 14] = [
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
];
/// Seconds a runner or git step may take: finer at the low end.
const STEP_BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// The instruments, and what the gauges read.
struct Metrics {
    runs_started: Counter<u64>,
    runs_finished: Counter<u64>,
    tasks_started: Counter<u64>,
    tasks_finished: Counter<u64>,
    attempt_duration: Histogram<f64>,
    queue_wait: Histogram<f64>,
    tokens: Counter<u64>,
    cost: Counter<f64>,
    api_retries: Counter<u64>,
    steps: Histogram<f64>,
    merges: Counter<u64>,
    conflicts: Counter<u64>,
    live: Arc<Mutex<Live>>,
}

/// The runs going on, for the gauges: tasks running, budgets.
#[derive(Default)]
struct Live {
    runs: HashMap<String, LiveRun>,
}

#[derive(Default)]
struct LiveRun {
    workflow: String,
    budget_usd: Option<f64>,
    /// Cost of finished attempts.
    spent_usd: f64,
    /// Running agents' cost so far, by task.
    streaming_usd: HashMap<String, f64>,
    running: HashSet<String>,
    /// Each started task's kind and runner, for its attempt's figures.
    tasks: HashMap<String, (String, String)>,
}

impl LiveRun {
    fn spent(&self) -> f64 {
        self.spent_usd + self.streaming_usd.values().sum::<f64>()
    }
}

/// Makes the instruments on `provider`; later calls are ignored (one pipeline per process).
pub fn install(provider: &opentelemetry_sdk::metrics::SdkMeterProvider) {
    let meter = provider.meter("ccluster");
    let _ = METRICS.set(Metrics::new(&meter));
}

/// Counts what `event` says; nothing when no metrics are kept.
pub fn observe(event: &Event) {
    if let Some(m) = METRICS.get() {
        m.observe(event);
    }
}

/// Forgets a run that ended without saying so (its driver was killed): its tasks no longer
/// count as running.
pub fn forget_run(run: &str) {
    if let Some(m) = METRICS.get() {
        m.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .runs
            .remove(run);
    }
}

/// The API error kind of an `api_retry` progress detail (`#2 after 429 (rate_limit_error) ...`).
fn retry_kind(detail: &str) -> String {
    let status = detail
        .split_once(" after ")
        .map(|(_, rest)| rest.split(' ').next().unwrap_or_default())
        .unwrap_or_default();
    match status {
        "429" => "rate_limit".into(),
        "529" => "overloaded".into(),
        "no" => "connection".into(),
        s if s.starts_with('5') => "server_error".into(),
        "" => "unknown".into(),
        s => s.to_string(),
    }
}

impl Metrics {
    fn new(meter: &Meter) -> Metrics {
        let live = Arc::new(Mutex::new(Live::default()));
        // Gauges of the runs going on, summed by workflow.
        let by_workflow = |name: &'static str, unit, description, count: fn(&LiveRun) -> u64| {
            let gauge_live = live.clone();
            meter
                .u64_observable_gauge(name)
                .with_unit(unit)
                .with_description(description)
                .with_callback(move |observer| {
                    let live = gauge_live.lock().unwrap_or_else(|e| e.into_inner());
                    let mut sums: HashMap<&str, u64> = HashMap::new();
                    for run in live.runs.values() {
                        *sums.entry(&run.workflow).or_default() += count(run);
                    }
                    for (workflow, n) in sums {
                        observer.observe(
                            n,
                            &[KeyValue::new("ccluster.workflow", workflow.to_string())],
                        );
                    }
                })
                .build()
        };
        by_workflow("ccluster.runs.running", "{run}", "Runs going on now", |_| 1);
        by_workflow(
            "ccluster.tasks.running",
            "{task}",
            "Task attempts running now",
            |run| run.running.len() as u64,
        );
        // Gauges of each run going on (`None`: the run has no such figure).
        let per_run = |name: &'static str, description, value: fn(&LiveRun) -> Option<f64>| {
            let gauge_live = live.clone();
            meter
                .f64_observable_gauge(name)
                .with_unit("{USD}")
                .with_description(description)
                .with_callback(move |observer| {
                    let live = gauge_live.lock().unwrap_or_else(|e| e.into_inner());
                    for (id, run) in &live.runs {
                        if let Some(v) = value(run) {
                            observer.observe(v, &run_attributes(id, run));
                        }
                    }
                })
                .build()
        };
        per_run(
            "ccluster.run.budget.spent",
            "What each running run has spent on agents, running ones included",
            |run| Some(run.spent()),
        );
        per_run(
            "ccluster.run.budget.remaining",
            "What each running run with a max_run_usd may still spend",
            |run| Some((run.budget_usd? - run.spent()).max(0.0)),
        );
        Metrics {
            runs_started: meter
                .u64_counter("ccluster.runs.started")
                .with_unit("{run}")
                .with_description("Runs started")
                .build(),
            runs_finished: meter
                .u64_counter("ccluster.runs.finished")
                .with_unit("{run}")
                .with_description("Runs finished, by their state")
                .build(),
            tasks_started: meter
                .u64_counter("ccluster.tasks.started")
                .with_unit("{task}")
                .with_description("Tasks that started their first attempt")
                .build(),
            tasks_finished: meter
                .u64_counter("ccluster.tasks.finished")
                .with_unit("{task}")
                .with_description("Tasks that reached a final state, by state and failure class")
                .build(),
            attempt_duration: meter
                .f64_histogram("ccluster.attempt.duration")
                .with_unit("s")
                .with_description("How long attempts took, by outcome")
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build(),
            queue_wait: meter
                .f64_histogram("ccluster.task.queue.wait")
                .with_unit("s")
                .with_description("How long ready attempts waited for a slot")
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build(),
            tokens: meter
                .u64_counter("ccluster.agent.token.usage")
                .with_unit("{token}")
                .with_description("Tokens agents used, by model, token type and task")
                .build(),
            cost: meter
                .f64_counter("ccluster.agent.cost")
                .with_unit("{USD}")
                .with_description("What agents cost, by model and task")
                .build(),
            api_retries: meter
                .u64_counter("ccluster.agent.api.retries")
                .with_unit("{retry}")
                .with_description("Model API requests workers sent again, by error kind")
                .build(),
            steps: meter
                .f64_histogram("ccluster.runner.operation.duration")
                .with_unit("s")
                .with_description("How long the steps of attempts took, by runner and step")
                .with_boundaries(STEP_BOUNDS.to_vec())
                .build(),
            merges: meter
                .u64_counter("ccluster.merges")
                .with_unit("{merge}")
                .with_description("Branches merged into workspaces, by outcome")
                .build(),
            conflicts: meter
                .u64_counter("ccluster.merge.conflicts")
                .with_unit("{file}")
                .with_description("Files in conflict when merging")
                .build(),
            live,
        }
    }

    fn observe(&self, event: &Event) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        let workflow_of = |live: &Live, run: &str| {
            live.runs
                .get(run)
                .map(|r| r.workflow.clone())
                .unwrap_or_default()
        };
        match event {
            Event::RunStarted {
                run,
                workflow,
                max_run_usd,
                ..
            } => {
                self.runs_started
                    .add(1, &[KeyValue::new("ccluster.workflow", workflow.clone())]);
                live.runs.insert(
                    run.clone(),
                    LiveRun {
                        workflow: workflow.clone(),
                        budget_usd: *max_run_usd,
                        ..LiveRun::default()
                    },
                );
            }
            Event::TaskStarted {
                run,
                task,
                attempt,
                kind,
                runner,
                queued_ms,
                ..
            } => {
                let workflow = workflow_of(&live, run);
                let kind = kind.clone().unwrap_or_default();
                if *attempt <= 1 {
                    self.tasks_started.add(
                        1,
                        &[
                            KeyValue::new("ccluster.workflow", workflow.clone()),
                            KeyValue::new("ccluster.task.kind", kind.clone()),
                        ],
                    );
                }
                if let Some(ms) = queued_ms {
                    self.queue_wait.record(
                        *ms as f64 / 1000.0,
                        &[KeyValue::new("ccluster.workflow", workflow)],
                    );
                }
                if let Some(r) = live.runs.get_mut(run) {
                    r.running.insert(task.clone());
                    r.tasks
                        .insert(task.clone(), (kind, runner.clone().unwrap_or_default()));
                }
            }
            Event::TaskSucceeded {
                run,
                task,
                duration_ms,
                facts,
                ..
            } => {
                self.attempt_ended(
                    &mut live,
                    run,
                    task,
                    "succeeded",
                    None,
                    Some(*duration_ms),
                    facts,
                );
                self.task_finished(&live, run, "succeeded", None);
            }
            Event::TaskRetrying {
                run,
                task,
                class,
                duration_ms,
                facts,
                ..
            } => {
                self.attempt_ended(
                    &mut live,
                    run,
                    task,
                    "retried",
                    Some(class.name()),
                    *duration_ms,
                    facts,
                );
            }
            Event::TaskFailed {
                run,
                task,
                class,
                duration_ms,
                facts,
                ..
            } => {
                let class = class.map(|c| c.name());
                self.attempt_ended(&mut live, run, task, "failed", class, *duration_ms, facts);
                self.task_finished(&live, run, "failed", class);
            }
            Event::TaskCancelled { run, task, .. } => {
                if let Some(r) = live.runs.get_mut(run) {
                    r.running.remove(task);
                    r.streaming_usd.remove(task);
                }
                self.task_finished(&live, run, "cancelled", None);
            }
            Event::TaskCached { run, .. } => self.task_finished(&live, run, "cached", None),
            Event::TaskDeduplicated { run, .. } => {
                self.task_finished(&live, run, "deduplicated", None)
            }
            Event::TaskSkipped { run, .. } => self.task_finished(&live, run, "skipped", None),
            Event::TaskProgress {
                run,
                task,
                kind,
                detail,
                ..
            } => match kind.as_str() {
                "api_retry" => self.api_retries.add(
                    1,
                    &[
                        KeyValue::new("ccluster.workflow", workflow_of(&live, run)),
                        KeyValue::new("error.type", retry_kind(detail)),
                    ],
                ),
                "cost" => {
                    if let (Some(r), Ok(usd)) = (live.runs.get_mut(run), detail.parse::<f64>()) {
                        r.streaming_usd.insert(task.clone(), usd);
                    }
                }
                _ => {}
            },
            Event::RunFinished { run, state, .. } => {
                let workflow = workflow_of(&live, run);
                self.runs_finished.add(
                    1,
                    &[
                        KeyValue::new("ccluster.workflow", workflow),
                        KeyValue::new(
                            "ccluster.run.state",
                            serde_json::to_value(state)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default(),
                        ),
                    ],
                );
                live.runs.remove(run);
            }
            Event::Warning { .. } | Event::MapExpanded { .. } => {}
        }
    }

    fn task_finished(&self, live: &Live, run: &str, state: &'static str, class: Option<&str>) {
        let mut attributes = vec![
            KeyValue::new(
                "ccluster.workflow",
                live.runs
                    .get(run)
                    .map(|r| r.workflow.clone())
                    .unwrap_or_default(),
            ),
            KeyValue::new("ccluster.task.state", state),
        ];
        if let Some(class) = class {
            attributes.push(KeyValue::new("error.type", class.to_string()));
        }
        self.tasks_finished.add(1, &attributes);
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt_ended(
        &self,
        live: &mut Live,
        run: &str,
        task: &str,
        outcome: &'static str,
        class: Option<&str>,
        duration_ms: Option<u64>,
        facts: &crate::exec::AttemptFacts,
    ) {
        let Some(r) = live.runs.get_mut(run) else {
            return;
        };
        r.running.remove(task);
        r.streaming_usd.remove(task);
        let workflow = r.workflow.clone();
        let (kind, runner) = r.tasks.get(task).cloned().unwrap_or_default();
        if let Some(ms) = duration_ms {
            let mut attributes = vec![
                KeyValue::new("ccluster.workflow", workflow.clone()),
                KeyValue::new("ccluster.task.kind", kind),
                KeyValue::new("ccluster.attempt.outcome", outcome),
            ];
            if let Some(class) = class {
                attributes.push(KeyValue::new("error.type", class.to_string()));
            }
            self.attempt_duration
                .record(ms as f64 / 1000.0, &attributes);
        }
        for step in &facts.steps {
            self.steps.record(
                step.ms as f64 / 1000.0,
                &[
                    KeyValue::new("ccluster.runner.kind", runner.clone()),
                    KeyValue::new("ccluster.operation", step.step.to_string()),
                ],
            );
        }
        if let Some(m) = &facts.merges {
            let workflow = KeyValue::new("ccluster.workflow", workflow.clone());
            for (outcome, n) in [
                ("clean", m.clean),
                ("resolved", m.resolved),
                ("conflict", m.conflicted.saturating_sub(m.resolved)),
            ] {
                if n > 0 {
                    self.merges.add(
                        u64::from(n),
                        &[
                            workflow.clone(),
                            KeyValue::new("ccluster.merge.outcome", outcome),
                        ],
                    );
                }
            }
            if m.conflicted_files > 0 {
                self.conflicts
                    .add(u64::from(m.conflicted_files), &[workflow]);
            }
        }
        if let Some(u) = &facts.usage {
            r.spent_usd += u.cost_usd;
            let base = [
                KeyValue::new("ccluster.workflow", workflow),
                KeyValue::new("gen_ai.request.model", u.model.clone()),
                KeyValue::new("ccluster.task", task.to_string()),
            ];
            for (kind, n) in [
                ("input", u.input_tokens),
                ("output", u.output_tokens),
                ("cache_read", u.cache_read_tokens),
                ("cache_creation", u.cache_creation_tokens),
            ] {
                let mut attributes = base.to_vec();
                attributes.push(KeyValue::new("gen_ai.token.type", kind));
                self.tokens.add(n, &attributes);
            }
            self.cost.add(u.cost_usd, &base);
        }
    }
}

fn run_attributes(id: &str, run: &LiveRun) -> [KeyValue; 2] {
    [
        KeyValue::new("ccluster.run", id.to_string()),
        KeyValue::new("ccluster.workflow", run.workflow.clone()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_retries_are_told_apart_by_status() {
        assert_eq!(
            retry_kind("#1 after 429 (rate_limit_error), again in 500 ms"),
            "rate_limit"
        );
        assert_eq!(retry_kind("#2 after 529 (overloaded_error)"), "overloaded");
        assert_eq!(
            retry_kind("#1 after no answer (fetch failed)"),
            "connection"
        );
        assert_eq!(retry_kind("#1 after 500 (api_error)"), "server_error");
    }
}
