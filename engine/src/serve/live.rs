//! Live event streams: a run's event log (`runs/<run>/events.jsonl`, appended by its driver after
//! each commit) followed for Server-Sent Events. One watcher per followed file notices growth and
//! wakes that file's clients, each of which reads from its own offset: a slow client holds back
//! only itself, and a client that reconnects with `Last-Event-ID` (an event's line number) gets
//! exactly the lines after it. What one read finds goes out as one chunk of SSE text (a burst of
//! events is one write per client, not one per event).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use tokio::sync::{mpsc, watch};

/// How often a followed file is looked at: an event reaches clients this long after its line is
/// written, at worst (plus the client's own read).
const WATCH_EVERY: Duration = Duration::from_millis(10);
/// How long a quiet stream waits before asking whether its run's driver is still there.
const QUIET_CHECK: Duration = Duration::from_secs(1);
/// Chunks a client may have in flight before its reader waits for it.
const CLIENT_BUFFER: usize = 64;
/// A comment sent on a quiet stream this often, so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The files being followed, each with one watcher.
#[derive(Default)]
pub struct Watchers {
    files: Mutex<HashMap<PathBuf, watch::Receiver<u64>>>,
}

impl Watchers {
    /// A receiver told the file's length whenever it changes; the watcher stops when its last
    /// receiver is gone.
    pub fn watch(self: &Arc<Self>, path: &Path) -> watch::Receiver<u64> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(rx) = files.get(path) {
            if rx.has_changed().is_ok() {
                return rx.clone();
            }
        }
        let len = std::fs::metadata(path).map_or(0, |m| m.len());
        let (tx, rx) = watch::channel(len);
        files.insert(path.to_path_buf(), rx.clone());
        let path = path.to_path_buf();
        let this = self.clone();
        tokio::spawn(async move {
            let mut last = len;
            loop {
                tokio::time::sleep(WATCH_EVERY).await;
                // The map's copy does not count: with no other receiver, nobody follows.
                if tx.receiver_count() <= 1 {
                    let mut files = this.files.lock().unwrap_or_else(|e| e.into_inner());
                    if tx.receiver_count() <= 1 {
                        files.remove(&path);
                        return;
                    }
                }
                let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                if len != last {
                    last = len;
                    let _ = tx.send(len);
                }
            }
        });
        rx
    }
}

/// The SSE event type of an event line: its `event` field, which the driver writes first.
fn event_type(line: &[u8]) -> &str {
    line.strip_prefix(b"{\"event\":\"")
        .and_then(|rest| rest.iter().position(|b| *b == b'"').map(|end| &rest[..end]))
        .and_then(|name| std::str::from_utf8(name).ok())
        .filter(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .unwrap_or("message")
}

/// One event line as SSE text: its id, its type, its data (a JSON line has no newline in it).
fn sse_text(out: &mut Vec<u8>, id: u64, line: &[u8]) {
    use std::io::Write;
    let _ = write!(out, "id: {id}\nevent: {}\ndata: ", event_type(line));
    out.extend_from_slice(line);
    out.extend_from_slice(b"\n\n");
}

/// Follows a run's event log from after line `after`, sending each line as an SSE event with its
/// line number as id, until `run_finished` is sent, the client goes, or (the log quiet) `alive`
/// says the run's driver is gone. The receiver gets chunks of `text/event-stream`.
pub fn follow(
    watchers: &Arc<Watchers>,
    path: PathBuf,
    after: u64,
    alive: impl Fn() -> bool + Send + 'static,
) -> mpsc::Receiver<Result<Bytes, Infallible>> {
    let (tx, rx) = mpsc::channel(CLIENT_BUFFER);
    let mut grown = watchers.watch(&path);
    tokio::spawn(async move {
        let mut offset = 0u64;
        let mut seq = 0u64;
        let mut partial: Vec<u8> = Vec::new();
        let mut file: Option<std::fs::File> = None;
        let mut quiet = Duration::ZERO;
        loop {
            if file.is_none() {
                file = std::fs::File::open(&path).ok();
            }
            let mut bytes = std::mem::take(&mut partial);
            if let Some(f) = &mut file {
                let read = f
                    .seek(SeekFrom::Start(offset))
                    .and_then(|_| f.read_to_end(&mut bytes));
                if let Ok(n) = read {
                    offset += n as u64;
                }
            }
            let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            partial = bytes[whole..].to_vec();
            let mut finished = false;
            let mut chunk = Vec::new();
            for line in bytes[..whole].split(|b| *b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                seq += 1;
                if seq <= after {
                    continue;
                }
                finished = event_type(line) == "run_finished";
                sse_text(&mut chunk, seq, line);
            }
            if !chunk.is_empty() && tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                return;
            }
            if finished {
                return;
            }
            // Wait for the file to grow, the client to go, or a quiet spell.
            tokio::select! {
                changed = grown.changed() => {
                    quiet = Duration::ZERO;
                    if changed.is_err() {
                        return;
                    }
                }
                _ = tx.closed() => return,
                _ = tokio::time::sleep(QUIET_CHECK) => {
                    quiet += QUIET_CHECK;
                    if quiet >= KEEP_ALIVE {
                        quiet = Duration::ZERO;
                        if tx.send(Ok(Bytes::from_static(b": keep-alive\n\n"))).await.is_err() {
                            return;
                        }
                    }
                    if !alive() {
                        // One more read: the driver may have written its last lines just now.
                        if let Some(f) = &mut file {
                            let len = f.metadata().map_or(0, |m| m.len());
                            if len > offset {
                                continue;
                            }
                        }
                        return;
                    }
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::event_type;

    #[test]
    fn an_event_line_is_one_sse_event() {
        let mut out = Vec::new();
        super::sse_text(&mut out, 7, br#"{"event":"task_started","run":"x"}"#);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "id: 7\nevent: task_started\ndata: {\"event\":\"task_started\",\"run\":\"x\"}\n\n"
        );
    }

    #[test]
    fn the_event_type_is_the_leading_field() {
        assert_eq!(
            event_type(br#"{"event":"task_started","run":"x"}"#),
            "task_started"
        );
        assert_eq!(event_type(br#"{"run":"x"}"#), "message");
        assert_eq!(event_type(br#"{"event":"a\nb"}"#), "message");
    }
}
