//! `/metrics` of `ccluster serve`: the metrics of every run in the served state directories,
//! counted from their event logs (`runs/<run>/events.jsonl`) as `apply` counts its own events.
//! Each log is read from where the last scrape stopped, so a scrape costs the new lines only;
//! after a restart the server counts every log again, which gives the same totals.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Mutex;

use super::state::States;
use crate::exec::{Event, EVENTS_FILE};
use crate::store::RunState;

/// How far each run's event log has been counted.
#[derive(Default)]
pub struct EventCounter {
    logs: Mutex<HashMap<PathBuf, LogRead>>,
}

#[derive(Default)]
struct LogRead {
    offset: u64,
    /// Bytes after the last whole line.
    partial: Vec<u8>,
    /// The run ended, or its driver died: nothing more will come.
    done: bool,
}

impl EventCounter {
    /// Counts the events written since the last call, in every served repository.
    pub fn catch_up(&self, states: &States) {
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        for view in states.runs() {
            let path = states.run_dir(&view).join(EVENTS_FILE);
            let read = logs.entry(path.clone()).or_default();
            if read.done {
                continue;
            }
            for event in new_events(&path, read) {
                crate::telemetry::metrics::observe(&event);
            }
            if view.run.state != RunState::Running
                || (view.live && !super::state::driver_alive(view.run.pid))
            {
                // A run whose driver died never says it finished: its tasks stop counting as
                // running.
                crate::telemetry::metrics::forget_run(&view.run.id);
                read.done = view.run.state != RunState::Running;
            }
        }
    }
}

/// The whole lines appended to `path` since `read.offset`, as events (a line that does not parse
/// is passed over, as it is for the event stream).
fn new_events(path: &std::path::Path, read: &mut LogRead) -> Vec<Event> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    if len <= read.offset || file.seek(SeekFrom::Start(read.offset)).is_err() {
        return Vec::new();
    }
    let mut bytes = std::mem::take(&mut read.partial);
    let Ok(n) = file.take(len - read.offset).read_to_end(&mut bytes) else {
        return Vec::new();
    };
    read.offset += n as u64;
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    read.partial = bytes.split_off(whole);
    bytes
        .split(|b| *b == b'\n')
        .filter(|line| !line.is_empty())
        .filter_map(|line| serde_json::from_slice(line).ok())
        .collect()
}
