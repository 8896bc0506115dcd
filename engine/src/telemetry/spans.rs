//! The spans of a run and the log lines of its events. A run is one trace: the `run` span is its
//! root (or a child of the caller's `TRACEPARENT`), each task a child of the run, each attempt a
//! child of its task; the steps of an attempt (workspace, merges, the runner, an agent's turns
//! and tool calls) are children of the attempt. Field names are the attributes exported:
//! `ccluster.run`, `ccluster.workflow`, `ccluster.task`, `ccluster.node`, `ccluster.attempt`,
//! `ccluster.runner`, `error.type` (the failure class).

use tracing::field::Empty;
use tracing::Span;

use crate::exec::Event;

/// The root span of a run.
pub fn run(run: &str, workflow: &str) -> Span {
    let span = tracing::info_span!(
        "run",
        otel.name = %format!("run {workflow}"),
        ccluster.run = %run,
        ccluster.workflow = %workflow,
        ccluster.run.state = Empty,
        otel.status_code = Empty,
        otel.status_message = Empty,
    );
    super::join_caller_trace(&span);
    span
}

/// What a task or attempt span is about.
pub struct Subject<'a> {
    pub run: &'a str,
    pub workflow: &'a str,
    /// The workflow's task (`build` for the instance `build[2]`).
    pub task: &'a str,
    /// The plan node: the instance.
    pub node: &'a str,
    pub kind: &'a str,
    /// The runner's name in the clusterfile (`local` by default).
    pub runner: &'a str,
}

/// A task's span: from its first attempt (or its settling without one) to its final state.
pub fn task(parent: &Span, s: &Subject<'_>) -> Span {
    tracing::info_span!(
        parent: parent,
        "task",
        otel.name = %format!("task {}", s.task),
        ccluster.run = %s.run,
        ccluster.workflow = %s.workflow,
        ccluster.task = %s.task,
        ccluster.node = %s.node,
        ccluster.task.kind = %s.kind,
        ccluster.runner = %s.runner,
        ccluster.task.state = Empty,
        ccluster.cached_from = Empty,
        error.type = Empty,
        otel.status_code = Empty,
        otel.status_message = Empty,
    )
}

/// An attempt's span, the parent of everything the attempt does.
pub fn attempt(parent: &Span, s: &Subject<'_>, attempt: u32) -> Span {
    tracing::info_span!(
        parent: parent,
        "attempt",
        otel.name = %format!("attempt {} #{attempt}", s.task),
        ccluster.run = %s.run,
        ccluster.workflow = %s.workflow,
        ccluster.task = %s.task,
        ccluster.node = %s.node,
        ccluster.attempt = attempt,
        ccluster.task.kind = %s.kind,
        ccluster.runner = %s.runner,
        ccluster.attempt.outcome = Empty,
        error.type = Empty,
        process.exit.code = Empty,
        gen_ai.request.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        ccluster.cost_usd = Empty,
        otel.status_code = Empty,
        otel.status_message = Empty,
    )
}

/// Records how a task, attempt or run span ended: `state` in its state field, and for a failure
/// its class and an error status with the (masked) message.
pub fn ended(span: &Span, field: &str, state: &str, class: Option<&str>, message: Option<&str>) {
    span.record(field, state);
    if let Some(class) = class {
        span.record("error.type", class);
    }
    if matches!(state, "failed" | "retried" | "interrupted") || class.is_some() {
        span.record("otel.status_code", "ERROR");
        if let Some(message) = message {
            let message = crate::secrets::redact_text(message);
            let first = message.lines().next().unwrap_or_default();
            span.record("otel.status_message", first);
        }
    } else if state != "cancelled" {
        span.record("otel.status_code", "OK");
    }
}

/// The target of the run's event lines (`target` in JSON logs): the OpenTelemetry layer leaves
/// them out, since the spans say the same.
pub const EVENTS: &str = "ccluster::events";

/// One log line per event of the run, with `run`, `task` and `attempt` as fields (what a log
/// pipeline filters by; `attempt` is 0 on lines about no attempt: cached, skipped, cancelled);
/// failures at `warn`, the rest at `info`, agent progress at `debug`.
pub fn log_event(event: &Event) {
    match event {
        Event::RunStarted {
            run,
            workflow,
            nodes,
            ..
        } => tracing::info!(target: EVENTS, run = %run, workflow = %workflow, nodes, "run started"),
        Event::TaskStarted {
            run,
            task,
            attempt,
            kind,
            runner,
            ..
        } => tracing::info!(
            target: EVENTS,
            run = %run,
            task = %task,
            attempt,
            kind = kind.as_deref().unwrap_or_default(),
            runner = runner.as_deref().unwrap_or_default(),
            "task started"
        ),
        Event::TaskRetrying {
            run,
            task,
            attempt,
            class,
            delay_ms,
            message,
            ..
        } => tracing::warn!(
            target: EVENTS,
            run = %run,
            task = %task,
            attempt,
            class = class.name(),
            delay_ms,
            error = %message,
            "task attempt failed; retrying"
        ),
        Event::TaskSucceeded {
            run,
            task,
            attempt,
            duration_ms,
            facts,
            ..
        } => tracing::info!(
            target: EVENTS,
            run = %run,
            task = %task,
            attempt,
            duration_ms,
            cost_usd = facts.usage.as_ref().map_or(0.0, |u| u.cost_usd),
            "task succeeded"
        ),
        Event::TaskCached {
            run,
            task,
            from_run,
            ..
        } => {
            tracing::info!(target: EVENTS, run = %run, task = %task, attempt = 0u32, from_run = %from_run, "task cached")
        }
        Event::TaskDeduplicated {
            run,
            task,
            from_task,
            ..
        } => tracing::info!(
            target: EVENTS,
            run = %run,
            task = %task,
            attempt = 0u32,
            from_task = %from_task,
            "task deduplicated"
        ),
        Event::TaskFailed {
            run,
            task,
            attempt,
            class,
            exit_code,
            message,
            ..
        } => tracing::warn!(
            target: EVENTS,
            run = %run,
            task = %task,
            attempt,
            class = class.map_or("", |c| c.name()),
            exit_code = exit_code.unwrap_or_default(),
            error = %message,
            "task failed"
        ),
        Event::TaskSkipped {
            run, task, reason, ..
        } => {
            tracing::info!(target: EVENTS, run = %run, task = %task, attempt = 0u32, reason = %reason, "task skipped")
        }
        Event::TaskCancelled {
            run, task, reason, ..
        } => {
            tracing::info!(target: EVENTS, run = %run, task = %task, attempt = 0u32, reason = %reason, "task cancelled")
        }
        Event::TaskProgress {
            run,
            task,
            attempt,
            kind,
            detail,
            ..
        } => tracing::debug!(
            target: EVENTS,
            run = %run,
            task = %task,
            attempt,
            kind = %kind,
            detail = %detail,
            "agent progress"
        ),
        Event::Warning {
            run, task, message, ..
        } => {
            tracing::warn!(target: EVENTS, run = %run, task = %task, attempt = 0u32, error = %message, "warning")
        }
        Event::MapExpanded {
            run, task, items, ..
        } => {
            tracing::info!(target: EVENTS, run = %run, task = %task, attempt = 0u32, items, "map expanded")
        }
        Event::RunFinished {
            run,
            state,
            succeeded,
            cached,
            failed,
            skipped,
            cancelled,
            duration_ms,
            ..
        } => tracing::info!(
            target: EVENTS,
            run = %run,
            state = ?state,
            succeeded,
            cached,
            failed,
            skipped,
            cancelled,
            duration_ms,
            "run finished"
        ),
    }
}
