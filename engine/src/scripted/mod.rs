//! The scripted model server: speaks the Anthropic Messages API the way the `claude` CLI uses it
//! (`POST /v1/messages`, SSE with `event:` lines, `input_json_delta` for tool input, the
//! non-streaming fallback, error bodies), on 127.0.0.1, driven by a [`Script`]. It is the engine
//! of `apply --rehearse` and of the end-to-end tests: no key, no tokens, deterministic answers,
//! and faults on demand (HTTP errors n times, hangs, truncated streams).
//!
//! HTTP is written by hand on purpose: the server's job includes misbehaving at the byte level
//! (closing mid-stream, never answering), which a framework would fight. It answers one request
//! per connection (`Connection: close`), which the CLI accepts.

mod http;
pub mod script;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

pub use script::{Fault, Script, TaskScript, ToolCall, Turn};

/// The header that names the task a request belongs to (set through `ANTHROPIC_CUSTOM_HEADERS`).
pub const TASK_HEADER: &str = "x-ccluster-task";

/// One request as the server saw it: a line of its log (`runs/<run>/rehearsal.jsonl`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Recorded {
    pub task: String,
    pub session: String,
    /// The turn the request asked for (assistant messages already in the conversation).
    pub turn: usize,
    pub stream: bool,
    /// What the server did: `200`, `429`, `hang`, `truncate`...
    pub answer: String,
    pub time_ms: u64,
}

struct State {
    script: Script,
    /// Requests seen per (task or session, turn): how many faults were already served.
    attempts: HashMap<(String, usize), u32>,
    log: Option<std::fs::File>,
}

/// A running server; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    /// Starts on 127.0.0.1 on a free port. Requests are appended to `log` (JSON lines) if given.
    pub async fn start(script: Script, log: Option<PathBuf>) -> std::io::Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let log = match log {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => None,
        };
        let state = Arc::new(Mutex::new(State {
            script,
            attempts: HashMap::new(),
            log,
        }));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, state).await;
                });
            }
        });
        Ok(Server { addr, state, task })
    }

    /// Appends every request from now on to `path` (JSON lines).
    pub fn log_to(&self, path: &std::path::Path) -> std::io::Result<()> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if let Ok(mut st) = self.state.lock() {
            st.log = Some(file);
        }
        Ok(())
    }

    /// The base URL workers get as `ANTHROPIC_BASE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The script a plan node gets (for its cache key under rehearsal).
    pub fn script_for(&self, node: &str) -> TaskScript {
        self.state
            .lock()
            .map(|s| s.script.for_task(node))
            .unwrap_or_default()
    }
}

/// The working directory the CLI announces in its prompt (`Primary working directory: <dir>`, or
/// `CWD: <dir>` with `--bare`): tool paths must be absolute, so scripts write `{{cwd}}`.
fn working_directory(body: &Value) -> Option<String> {
    let text = body.to_string();
    for marker in ["Primary working directory: ", "CWD: "] {
        if let Some(at) = text.find(marker) {
            let rest = &text[at + marker.len()..];
            let end = rest.find(['\\', '"', '\n']).unwrap_or(rest.len());
            return Some(rest[..end].trim().to_string());
        }
    }
    None
}

/// `[ccluster-task: build[2]]` in a prompt names the task.
fn prompt_marker(prompt: &str) -> Option<String> {
    let at = prompt.find("[ccluster-task:")?;
    let rest = &prompt[at + "[ccluster-task:".len()..];
    // The id may itself hold brackets (`build[2]`): it ends at the last `]` of the marker.
    let end = rest.find("]]").map(|i| i + 1).or_else(|| rest.find(']'))?;
    Some(rest[..end].trim().to_string())
}

/// The text of the first user message: the task's prompt.
fn first_prompt(body: &Value) -> String {
    let Some(messages) = body["messages"].as_array() else {
        return String::new();
    };
    for m in messages.iter().filter(|m| m["role"] == "user") {
        match &m["content"] {
            Value::String(s) => return s.clone(),
            Value::Array(blocks) => {
                let texts: Vec<&str> = blocks
                    .iter()
                    .filter(|b| b["type"] == "text")
                    .filter_map(|b| b["text"].as_str())
                    .filter(|t| !t.starts_with("<system-reminder>"))
                    .collect();
                if !texts.is_empty() {
                    return texts.join("\n");
                }
            }
            _ => {}
        }
    }
    String::new()
}

fn now_ms() -> u64 {
    crate::store::now_ms()
}

/// What to do with one request.
enum Answer {
    Error(u16, Option<u32>),
    Hang,
    Truncate,
    Message(Value),
}

async fn serve(mut stream: TcpStream, state: Arc<Mutex<State>>) -> std::io::Result<()> {
    let Some(request) = http::read_request(&mut stream).await? else {
        return Ok(());
    };
    let body: Value = serde_json::from_slice(&request.body).unwrap_or(Value::Null);
    // The task: named by the header ccluster sets, or by a `[ccluster-task: <id>]` marker in the
    // prompt (for workers started by hand).
    let task = match request.header(TASK_HEADER) {
        Some(t) => t.to_string(),
        None => prompt_marker(&first_prompt(&body)).unwrap_or_default(),
    };
    let session = request
        .header("x-claude-code-session-id")
        .unwrap_or_default()
        .to_string();
    let streaming = body["stream"].as_bool().unwrap_or(false);
    let turn = body["messages"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["role"] == "assistant").count());
    let (answer, delay) = {
        let mut st = state
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?;
        let task_script = st.script.for_task(&task);
        // Faults count per task (across its attempts, so "fail twice" means twice in all),
        // or per session for a request that names no task.
        let who = if task.is_empty() {
            session.clone()
        } else {
            task.clone()
        };
        let seen = st.attempts.entry((who, turn)).or_insert(0);
        let attempt = *seen;
        *seen += 1;
        let answer = match task_script.fault_for(turn, attempt) {
            Some(f) if f.hang => Answer::Hang,
            Some(f) if f.truncate => Answer::Truncate,
            Some(f) => Answer::Error(f.status.unwrap_or(500), f.retry_after),
            None => {
                let cwd = working_directory(&body).unwrap_or_default();
                let turn_script = task_script.turn(turn, &task, &first_prompt(&body), &body);
                Answer::Message(turn_script.to_message(
                    &cwd,
                    turn,
                    task_script.usage.unwrap_or([100, 50]),
                ))
            }
        };
        let label = match &answer {
            Answer::Error(s, _) => s.to_string(),
            Answer::Hang => "hang".into(),
            Answer::Truncate => "truncate".into(),
            Answer::Message(_) => "200".into(),
        };
        let record = Recorded {
            task: task.clone(),
            session,
            turn,
            stream: streaming,
            answer: label,
            time_ms: now_ms(),
        };
        if let Some(log) = st.log.as_mut() {
            let _ = serde_json::to_writer(&mut *log, &record);
            let _ = log.write_all(b"\n");
        }
        (answer, st.script.turn_delay_ms)
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    match answer {
        Answer::Hang => {
            // Hold the connection open without a byte until the client gives up.
            let mut sink = [0u8; 64];
            use tokio::io::AsyncReadExt;
            while stream.read(&mut sink).await.unwrap_or(0) > 0 {}
            Ok(())
        }
        Answer::Error(status, retry_after) => {
            let body = json!({"type": "error", "error": {"type": error_type(status), "message": format!("scripted {status}")}});
            let mut extra = String::new();
            if let Some(s) = retry_after {
                extra = format!("retry-after: {s}\r\n");
            }
            http::respond(
                &mut stream,
                status,
                "application/json",
                &extra,
                body.to_string().as_bytes(),
            )
            .await
        }
        Answer::Truncate => {
            let head =
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            stream.write_all(head.as_bytes()).await?;
            let start = json!({"type": "message_start", "message": {"id": "msg_truncated", "type": "message", "role": "assistant", "model": body["model"], "content": [], "stop_reason": null, "usage": {"input_tokens": 1, "output_tokens": 0}}});
            stream
                .write_all(format!("event: message_start\ndata: {start}\n\n").as_bytes())
                .await?;
            stream.shutdown().await
        }
        Answer::Message(mut message) => {
            message["model"] = body["model"].clone();
            if streaming {
                let frames = http::sse_frames(&message);
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\nconnection: close\r\n\r\n";
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(frames.as_bytes()).await?;
                stream.shutdown().await
            } else {
                http::respond(
                    &mut stream,
                    200,
                    "application/json",
                    "",
                    message.to_string().as_bytes(),
                )
                .await
            }
        }
    }
}

fn error_type(status: u16) -> &'static str {
    match status {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_marker_names_the_task() {
        assert_eq!(
            prompt_marker("do it [ccluster-task: build[2]] now").as_deref(),
            Some("build[2]")
        );
        assert_eq!(
            prompt_marker("[ccluster-task: plan]").as_deref(),
            Some("plan")
        );
        assert_eq!(prompt_marker("nothing here"), None);
    }
}
