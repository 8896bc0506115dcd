//! The dispatcher's spans: a task's span opens with its first attempt (or when it settles
//! without one, as a cached or skipped task does) and closes at its final state; each attempt's
//! span is the parent of the attempt's work, and its trace context reaches the attempt's
//! processes as `TRACEPARENT`. With no subscriber these are disabled spans and cost nothing.

use std::time::Instant;

use tracing::Span;

use super::{ApplyError, Dispatcher, RunSummary};
use crate::exec::job::{Job, JobResult};
use crate::exec::{AttemptFacts, AttemptUsage};
use crate::model::raw::FailureClass;
use crate::telemetry::spans::{self, Subject};

/// A node's open spans, and since when it has been ready (for its queue wait).
#[derive(Default)]
pub(super) struct NodeSpans {
    task: Option<Span>,
    attempt: Option<Span>,
    pub(super) ready_since: Option<Instant>,
}

fn state_name<T: serde::Serialize>(state: &T) -> String {
    serde_json::to_value(state)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl Dispatcher<'_> {
    fn subject(&self, node: usize) -> Subject<'_> {
        let plan = &self.nodes[node].plan;
        Subject {
            run: &self.run.id,
            workflow: &self.run.workflow,
            task: &plan.task,
            node: &plan.id,
            kind: plan.action.kind(),
            runner: &plan.runner,
        }
    }

    /// Opens the span of `node`'s attempt starting now (and its task's, for a first attempt),
    /// and gives the attempt's processes its trace context.
    pub(super) fn attempt_span(&mut self, node: usize, mut job: Job) -> (Job, Span) {
        let subject = self.subject(node);
        let task = self.nodes[node]
            .spans
            .task
            .clone()
            .unwrap_or_else(|| spans::task(&self.run_span, &subject));
        let attempt = spans::attempt(&task, &subject, self.nodes[node].record.attempts);
        if let Some(parent) = crate::telemetry::traceparent(&attempt) {
            for spec in [&mut job.process, &mut job.setup, &mut job.resolve]
                .into_iter()
                .flatten()
            {
                spec.env.push(("TRACEPARENT".into(), parent.clone()));
            }
        }
        if job.agent.is_some() || job.resolve.as_ref().is_some_and(|r| r.argv.is_some()) {
            let forwarded = crate::telemetry::agents::worker_env(&subject_labels(&subject));
            for spec in [&mut job.process, &mut job.resolve].into_iter().flatten() {
                if spec.argv.is_some() {
                    spec.env.extend(forwarded.iter().cloned());
                }
            }
        }
        let spans = &mut self.nodes[node].spans;
        spans.task = Some(task);
        spans.attempt = Some(attempt.clone());
        (job, attempt)
    }

    /// Closes `node`'s attempt span with how the attempt ended.
    pub(super) fn attempt_span_ended(
        &mut self,
        node: usize,
        outcome: &str,
        class: Option<FailureClass>,
        message: Option<&str>,
        facts: &AttemptFacts,
    ) {
        let Some(span) = self.nodes[node].spans.attempt.take() else {
            return;
        };
        if span.is_disabled() {
            return;
        }
        if let Some(u) = &facts.usage {
            span.record("gen_ai.request.model", u.model.as_str());
            span.record("gen_ai.usage.input_tokens", u.input_tokens);
            span.record("gen_ai.usage.output_tokens", u.output_tokens);
            span.record("ccluster.cost_usd", u.cost_usd);
        }
        if let Some(code) = self.nodes[node].record.exit_code {
            span.record("process.exit.code", code);
        }
        spans::ended(
            &span,
            "ccluster.attempt.outcome",
            outcome,
            class.map(FailureClass::name),
            message,
        );
    }

    /// Closes `node`'s task span with its final state (opening it first when the task settled
    /// without an attempt).
    pub(super) fn task_span_ended(&mut self, node: usize) {
        let span = match self.nodes[node].spans.task.take() {
            Some(span) => span,
            None => spans::task(&self.run_span, &self.subject(node)),
        };
        if span.is_disabled() {
            return;
        }
        let record = &self.nodes[node].record;
        if let Some(from) = &record.cached_from {
            span.record("ccluster.cached_from", from.as_str());
        }
        spans::ended(
            &span,
            "ccluster.task.state",
            &state_name(&record.state),
            record.class.map(FailureClass::name),
            record.message.as_deref(),
        );
    }
}

/// The resource attributes a worker's own telemetry is labelled with.
fn subject_labels(s: &Subject<'_>) -> Vec<(&'static str, String)> {
    vec![
        ("ccluster.run", s.run.to_string()),
        ("ccluster.workflow", s.workflow.to_string()),
        ("ccluster.task", s.task.to_string()),
        ("ccluster.node", s.node.to_string()),
    ]
}

/// What an attempt's result tells metrics: its agent's usage, its steps' times, its merges.
pub(super) fn facts_of(result: &JobResult) -> AttemptFacts {
    AttemptFacts {
        usage: result.usage.as_ref().map(|u| AttemptUsage {
            model: u.model.clone(),
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_tokens: u.cache_read_input_tokens,
            cache_creation_tokens: u.cache_creation_input_tokens,
            cost_usd: u.cost_usd,
        }),
        steps: result.steps.clone(),
        merges: result.merges.clone(),
    }
}

/// Records how the run ended on its span.
pub(super) fn run_ended(span: &Span, summary: &Result<RunSummary, ApplyError>) {
    if span.is_disabled() {
        return;
    }
    match summary {
        Ok(s) => {
            let state = state_name(&s.state);
            let failed = (s.failed > 0).then(|| format!("{} tasks failed", s.failed));
            spans::ended(span, "ccluster.run.state", &state, None, failed.as_deref());
        }
        Err(e) => spans::ended(
            span,
            "ccluster.run.state",
            "failed",
            Some("internal"),
            Some(&e.to_string()),
        ),
    }
}
