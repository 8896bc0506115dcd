//! The event stream of a run: what `--output json` prints, one JSON object per line, and what
//! the human progress view is drawn from. Documented in `docs/events.md`.

use serde::Serialize;

use crate::model::raw::FailureClass;
use crate::store::RunState;

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    RunStarted {
        run: String,
        workflow: String,
        nodes: usize,
        /// The run's `max_run_usd`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_run_usd: Option<f64>,
        time_ms: u64,
    },
    TaskStarted {
        run: String,
        task: String,
        attempt: u32,
        /// `shell`, `agent`, `merge` or `outputs`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        kind: Option<String>,
        /// The kind of runner it runs on: `local`, `docker` or `kubernetes`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        runner: Option<String>,
        /// How long the attempt waited for a slot after it was ready.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queued_ms: Option<u64>,
        time_ms: u64,
    },
    TaskRetrying {
        run: String,
        task: String,
        attempt: u32,
        class: FailureClass,
        delay_ms: u64,
        message: String,
        /// How long the failed attempt took.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        #[serde(flatten)]
        facts: AttemptFacts,
        time_ms: u64,
    },
    TaskSucceeded {
        run: String,
        task: String,
        attempt: u32,
        duration_ms: u64,
        #[serde(flatten)]
        facts: AttemptFacts,
        time_ms: u64,
    },
    /// Not run: a result with the same cache key exists (from `from_run`).
    TaskCached {
        run: String,
        task: String,
        from_run: String,
        time_ms: u64,
    },
    /// Not run: another node of this run (`from_task`) does the same work, and this one took its
    /// result. The deduplicated node succeeded (or, when `from_task` was cached, is cached).
    TaskDeduplicated {
        run: String,
        task: String,
        from_task: String,
        time_ms: u64,
    },
    TaskFailed {
        run: String,
        task: String,
        attempt: u32,
        class: Option<FailureClass>,
        exit_code: Option<i32>,
        message: String,
        /// How long the failed attempt took; absent when it failed before running.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        #[serde(flatten)]
        facts: AttemptFacts,
        time_ms: u64,
    },
    TaskSkipped {
        run: String,
        task: String,
        reason: String,
        time_ms: u64,
    },
    TaskCancelled {
        run: String,
        task: String,
        reason: String,
        time_ms: u64,
    },
    /// What a running agent does: a new turn, a tool call, a denied tool, an API retry.
    TaskProgress {
        run: String,
        task: String,
        attempt: u32,
        /// `turn`, `tool`, `denied` or `api_retry`.
        kind: String,
        detail: String,
        time_ms: u64,
    },
    /// Something worth knowing that stops nothing: instances of a fan-out told to change the same
    /// paths (known only once a dynamic map is expanded).
    Warning {
        run: String,
        task: String,
        message: String,
        time_ms: u64,
    },
    MapExpanded {
        run: String,
        task: String,
        items: usize,
        /// A task graph's instances with what each runs after (the graph's edges); absent for a
        /// plain map.
        #[serde(skip_serializing_if = "Option::is_none")]
        graph: Option<Vec<GraphInstance>>,
        time_ms: u64,
    },
    RunFinished {
        run: String,
        state: RunState,
        succeeded: usize,
        cached: usize,
        failed: usize,
        skipped: usize,
        cancelled: usize,
        duration_ms: u64,
        time_ms: u64,
    },
}

/// What an attempt used and how long its steps took, on the event that ends it: what metrics
/// are made of (by `apply` from its own events, by `serve` from event logs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct AttemptFacts {
    /// The agent's tokens and cost (its resolving agents' too, for a merge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<AttemptUsage>,
    /// Its steps in order: `workspace.create`, `workspace.merge`, `setup`, `runner.run`,
    /// `workspace.commit`, `artifacts.collect`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepTime>,
    /// The branches it merged into its workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merges: Option<MergeCount>,
}

/// An agent attempt's usage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct AttemptUsage {
    /// The model that did most of the work (most output tokens).
    pub model: String,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_creation_tokens: u64,
    pub cost_usd: f64,
}

/// How long one step of an attempt took.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct StepTime {
    /// Borrowed when made by the attempt (one of a few names), owned when read back.
    pub step: std::borrow::Cow<'static, str>,
    pub ms: u64,
}

/// Merges into an attempt's workspace: clean ones, conflicted ones (and of those, resolved), and
/// the files in conflict.
#[derive(Clone, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct MergeCount {
    pub clean: u32,
    pub conflicted: u32,
    pub resolved: u32,
    pub conflicted_files: u32,
}

/// An instance of a task graph, in `map_expanded`: its plan node and the nodes it runs after.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct GraphInstance {
    pub node: String,
    pub after: Vec<String>,
}

/// Where events go: the CLI prints them; tests collect them.
pub trait EventSink {
    fn emit(&mut self, event: &Event);

    /// Called after each batch of events (one commit's worth): a buffered sink writes them out.
    fn flush(&mut self) {}
}

impl EventSink for Vec<Event> {
    fn emit(&mut self, event: &Event) {
        self.push(event.clone());
    }
}

/// The file of a run's events beside its other files, `runs/<run>/events.jsonl`: what `ccluster
/// serve` streams to its clients (an event's id there is its line number).
pub const EVENTS_FILE: &str = "events.jsonl";

/// A sink that also appends every event to the run's event log, one JSON line each, written out
/// when the inner sink is flushed (after each commit, or each progress step) so that followers see
/// a batch as soon as the terminal does. A failed write loses the log's tail, never the run.
pub struct EventLog<'a> {
    inner: &'a mut dyn EventSink,
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl<'a> EventLog<'a> {
    pub fn new(path: &std::path::Path, inner: &'a mut dyn EventSink) -> EventLog<'a> {
        let out = crate::store::private_file()
            .create(true)
            .append(true)
            .open(path)
            .ok()
            .map(std::io::BufWriter::new);
        EventLog { inner, out }
    }
}

impl EventSink for EventLog<'_> {
    fn emit(&mut self, event: &Event) {
        use std::io::Write;
        // The run's secrets are masked in the event itself, so the caller's sink (the terminal,
        // `--output json`) gets the masked event too.
        let raw = serde_json::to_vec(event).unwrap_or_default();
        let (mut line, masked) = match crate::secrets::active().filter(|r| r.find(&raw).is_some()) {
            Some(redactor) => {
                let mut tree = serde_json::to_value(event).unwrap_or_default();
                redactor.redact_json(&mut tree);
                let line = serde_json::to_vec(&tree).unwrap_or_default();
                // Every string of an event is free text, so a masked one reads back; should one
                // not, the sink gets a notice rather than the value.
                let masked = serde_json::from_value(tree).unwrap_or_else(|_| Event::Warning {
                    run: String::new(),
                    task: String::new(),
                    message: crate::secrets::mask_of("event"),
                    time_ms: crate::store::now_ms(),
                });
                (line, Some(masked))
            }
            None => (raw, None),
        };
        if let Some(out) = &mut self.out {
            line.push(b'\n');
            if out.write_all(&line).is_err() {
                self.out = None;
            }
        }
        let event = masked.as_ref().unwrap_or(event);
        // Logs and metrics see what the log file does: the masked event.
        crate::telemetry::spans::log_event(event);
        crate::telemetry::metrics::observe(event);
        self.inner.emit(event);
    }

    fn flush(&mut self) {
        use std::io::Write;
        if let Some(out) = &mut self.out {
            if out.flush().is_err() {
                self.out = None;
            }
        }
        self.inner.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_log_masks_events_for_its_file_and_its_inner_sink() {
        let value = "event-log-secret-4711";
        crate::secrets::install(crate::secrets::Redactor::new(&[(
            "EV_TOKEN".into(),
            value.into(),
        )]));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(EVENTS_FILE);
        let mut inner: Vec<Event> = Vec::new();
        {
            let mut log = EventLog::new(&path, &mut inner);
            log.emit(&Event::TaskFailed {
                run: "r".into(),
                task: "t".into(),
                attempt: 1,
                class: Some(FailureClass::ExitCode),
                exit_code: Some(1),
                message: format!("printed {value} and failed"),
                duration_ms: None,
                facts: AttemptFacts::default(),
                time_ms: 1,
            });
            log.emit(&Event::TaskProgress {
                run: "r".into(),
                task: "t".into(),
                attempt: 1,
                kind: "tool".into(),
                detail: format!("Bash echo {}", serde_json::to_string(value).unwrap()),
                time_ms: 2,
            });
            log.flush();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(value), "{text}");
        assert!(
            text.contains("printed [secret EV_TOKEN] and failed"),
            "{text}"
        );
        let Event::TaskFailed { message, .. } = &inner[0] else {
            panic!("{inner:?}");
        };
        assert_eq!(message, "printed [secret EV_TOKEN] and failed");
        let Event::TaskProgress { detail, .. } = &inner[1] else {
            panic!("{inner:?}");
        };
        assert_eq!(detail, "Bash echo \"[secret EV_TOKEN]\"");
    }
}
