//! The scripted model server: speaks the Anthropic Messages API the way the `claude` CLI uses it
//! (`POST /v1/messages`, SSE with `event:` lines, `input_json_delta` for tool input, the
//! non-streaming fallback, error bodies), on 127.0.0.1, driven by a [`Script`]. It is the engine
//! of `apply --rehearse` and of the end-to-end tests: no real key, no tokens spent, deterministic
//! answers, and faults on demand (HTTP errors n times, hangs, truncated streams).
//!
//! HTTP is written by hand on purpose: the server's job includes misbehaving at the byte level
//! (closing mid-stream, never answering), which a framework would fight. It answers one request
//! per connection (`Connection: close`), which the CLI accepts.
//!
//! Any local process can reach the port, so the server defends itself: a request must carry the
//! server's random per-run token (the workers' API key) before its body is read or the script
//! consulted; sizes, waits and connections are bounded (`http::Limits`); values made up from a
//! request's schema are bounded too ([`script::example_of`]); and it runs on a thread of its own.

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

use http::Limits;
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
    /// What the server did: `200`, `429`, `hang`, `truncate`... (`400` when the script could not
    /// answer within its bounds).
    pub answer: String,
    pub time_ms: u64,
}

struct State {
    script: Script,
    /// Requests seen per (task or session, turn): how many faults were already served.
    attempts: HashMap<(String, usize), u32>,
    log: Option<std::fs::File>,
    /// When the server started: the script's overloaded spells count from here.
    started: std::time::Instant,
    /// The rate limit's bucket: tokens, and when it was last filled.
    bucket: (f64, std::time::Instant),
    /// The rate-limit headers of the answer being made (empty without a rate limit).
    limit_headers: String,
}

impl State {
    /// The API's own refusals, before any task's script: 529 in an overloaded spell, 429 (with
    /// the seconds until a request would pass) beyond the rate limit.
    fn refusal(&mut self) -> Option<(u16, Option<u32>)> {
        self.limit_headers.clear();
        let now = std::time::Instant::now();
        let since = now.duration_since(self.started).as_millis() as u64;
        if self
            .script
            .overloaded
            .iter()
            .any(|s| since >= s.from_ms && since < s.from_ms + s.for_ms)
        {
            return Some((529, None));
        }
        let limit = self.script.rate_limit.as_ref()?;
        let per_second = f64::from(limit.per_minute.max(1)) / 60.0;
        let size = f64::from(
            limit
                .burst
                .unwrap_or((per_second.ceil() as u32).max(1))
                .max(1),
        );
        let (tokens, filled) = self.bucket;
        let tokens = (tokens + now.duration_since(filled).as_secs_f64() * per_second).min(size);
        // What the API says of its limit on every answer (`anthropic-ratelimit-requests-*`):
        // the limit a minute, what is left after this request, and when the bucket is full.
        let left = if tokens >= 1.0 { tokens - 1.0 } else { tokens };
        let full_in = Duration::from_secs_f64(((size - left) / per_second).max(0.0));
        self.limit_headers = format!(
            "anthropic-ratelimit-requests-limit: {}\r\nanthropic-ratelimit-requests-remaining: {}\r\nanthropic-ratelimit-requests-reset: {}\r\n",
            limit.per_minute,
            left.floor() as u64,
            humantime::format_rfc3339_seconds(std::time::SystemTime::now() + full_in)
        );
        if tokens >= 1.0 {
            self.bucket = (tokens - 1.0, now);
            None
        } else {
            self.bucket = (tokens, now);
            let wait = ((1.0 - tokens) / per_second).ceil().max(1.0) as u32;
            Some((429, Some(wait)))
        }
    }
}

/// What every connection handler shares.
struct Shared {
    state: Mutex<State>,
    /// The per-run secret a request must carry (`x-api-key`, or `Authorization: Bearer`).
    token: String,
    limits: Limits,
}

impl Shared {
    /// The state, also after a handler panicked while holding it (the panic ended that request
    /// only; the counters and the log are still whole).
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running server; stops when dropped.
///
/// It runs on a thread of its own, with its own async runtime: a slow or hostile request never
/// holds up the caller's runtime (during `apply`, the dispatcher's), and a panic in a handler ends
/// that connection only.
pub struct Server {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropping the sender ends the accept loop; the runtime, dropped with its thread, cancels
        // every connection still open.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// How long the accept loop pauses after an error. At the descriptor limit (`EMFILE`) accepting
/// fails again at once until a connection closes, so retrying without a pause would spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// A fresh secret: 32 bytes from the kernel's random source, in hex.
pub fn new_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `given` is `token`, in a time that does not depend on where they differ.
fn same_secret(given: &str, token: &str) -> bool {
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// Whether the request carries the token, as the CLI sends it: `x-api-key` (`ANTHROPIC_API_KEY`)
/// or `Authorization: Bearer` (`ANTHROPIC_AUTH_TOKEN`).
fn authorized(head: &http::Head, token: &str) -> bool {
    let key = head.header("x-api-key");
    let bearer = head
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "));
    [key, bearer]
        .into_iter()
        .flatten()
        .any(|given| same_secret(given, token))
}

impl Server {
    /// Starts on 127.0.0.1 on a free port, with a fresh token ([`Server::token`]). Requests are
    /// appended to `log` (JSON lines) if given.
    pub fn start(script: Script, log: Option<PathBuf>) -> std::io::Result<Server> {
        Server::start_with(script, log, new_token()?, Limits::default())
    }

    /// As [`Server::start`], with a token chosen by the caller (`ccluster model-server`).
    pub fn start_with_token(
        script: Script,
        log: Option<PathBuf>,
        token: String,
    ) -> std::io::Result<Server> {
        Server::start_with(script, log, token, Limits::default())
    }

    fn start_with(
        script: Script,
        log: Option<PathBuf>,
        token: String,
        limits: Limits,
    ) -> std::io::Result<Server> {
        if token.is_empty() {
            return Err(std::io::Error::other("the server's token is empty"));
        }
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let log = match log {
            Some(p) => Some(
                crate::store::private_file()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
            None => None,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                bucket: (
                    script.rate_limit.as_ref().map_or(0.0, |l| {
                        f64::from(
                            l.burst
                                .unwrap_or((f64::from(l.per_minute.max(1)) / 60.0).ceil() as u32)
                                .max(1),
                        )
                    }),
                    std::time::Instant::now(),
                ),
                started: std::time::Instant::now(),
                script,
                attempts: HashMap::new(),
                log,
                limit_headers: String::new(),
            }),
            token,
            limits,
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let accepting = shared.clone();
        let thread = std::thread::Builder::new()
            .name("model-server".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    tokio::select! {
                        _ = accept_loop(listener, accepting) => {}
                        _ = stopped => {}
                    }
                });
            })?;
        Ok(Server {
            addr,
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Appends every request from now on to `path` (JSON lines).
    pub fn log_to(&self, path: &std::path::Path) -> std::io::Result<()> {
        let file = crate::store::private_file()
            .create(true)
            .append(true)
            .open(path)?;
        self.shared.state().log = Some(file);
        Ok(())
    }

    /// The base URL workers get as `ANTHROPIC_BASE_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The secret workers get as `ANTHROPIC_API_KEY`; never to be written anywhere.
    pub fn token(&self) -> &str {
        &self.shared.token
    }

    /// The script a plan node gets (for its cache key under rehearsal).
    pub fn script_for(&self, node: &str) -> TaskScript {
        self.shared.state().script.for_task(node)
    }
}

/// Accepts connections, at most `max_connections` at once (the rest wait in the listen backlog),
/// each handled in a task of its own.
async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(shared.limits.max_connections));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(_) => {
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = serve(stream, &shared).await;
            drop(slot);
        });
    }
}

/// The working directory the CLI announces in its prompt (`Primary working directory: <dir>`, or
/// `CWD: <dir>` with `--bare`): tool paths must be absolute, so scripts write `{{cwd}}`.
/// A directory longer than a path can be is not one (and would multiply the answer's size).
fn working_directory(body: &Value) -> Option<String> {
    let text = body.to_string();
    for marker in ["Primary working directory: ", "CWD: "] {
        if let Some(at) = text.find(marker) {
            let rest = &text[at + marker.len()..];
            let end = rest.find(['\\', '"', '\n']).unwrap_or(rest.len());
            let dir = rest[..end].trim();
            return (dir.len() <= MAX_PATH).then(|| dir.to_string());
        }
    }
    None
}

/// `PATH_MAX` on Linux.
const MAX_PATH: usize = 4096;

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
    /// The request cannot be answered from the script (its schema asks for too large a value).
    Refuse(String),
}

/// An Anthropic error body.
fn error_body(status: u16, message: &str) -> Vec<u8> {
    json!({"type": "error", "error": {"type": error_type(status), "message": message}})
        .to_string()
        .into_bytes()
}

/// Answers `status` with an error body before the request was read in full, then closes.
async fn refuse(stream: &mut TcpStream, status: u16, message: &str, limits: &Limits) {
    let body = error_body(status, message);
    let answer = http::respond(stream, status, "application/json", "", &body);
    if let Ok(Ok(())) = tokio::time::timeout(limits.io_timeout, answer).await {
        http::linger(stream).await;
    }
}

/// One connection: its request (within `limits`, the token checked before the body is read) and
/// the answer.
async fn serve(mut stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    let limits = &shared.limits;
    // The whole request must arrive within the timeout: an idle client, or one trickling a byte at
    // a time, is dropped.
    let deadline = tokio::time::Instant::now() + limits.io_timeout;
    let read = async {
        let head = http::read_head(&mut stream, limits).await?;
        if !authorized(&head, &shared.token) {
            return Err(http::Failure::Reject(
                401,
                "a valid x-api-key or bearer token is required".into(),
            ));
        }
        let headers = head.headers.clone();
        let body = http::read_body(&mut stream, head, limits).await?;
        Ok((headers, body))
    };
    let (headers, body) = match tokio::time::timeout_at(deadline, read).await {
        Err(_) => return Ok(()),
        Ok(Err(http::Failure::Gone)) => return Ok(()),
        Ok(Err(http::Failure::Io(e))) => return Err(e),
        Ok(Err(http::Failure::Reject(status, message))) => {
            refuse(&mut stream, status, &message, limits).await;
            return Ok(());
        }
        Ok(Ok(request)) => request,
    };
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    // The task: named by the header ccluster sets, or by a `[ccluster-task: <id>]` marker in the
    // prompt (for workers started by hand).
    let task = match header(TASK_HEADER) {
        Some(t) => t.to_string(),
        None => prompt_marker(&first_prompt(&body)).unwrap_or_default(),
    };
    let session = header("x-claude-code-session-id")
        .unwrap_or_default()
        .to_string();
    let streaming = body["stream"].as_bool().unwrap_or(false);
    let turn = body["messages"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["role"] == "assistant").count());
    let (answer, delay, limit_headers) = {
        let mut st = shared.state();
        #[cfg(test)]
        if header(tests::PANIC_HEADER).is_some() {
            panic!("a handler panics while it holds the state");
        }
        let task_script = st.script.for_task(&task);
        // Faults count per task (across its attempts, so "fail twice" means twice in all),
        // or per session for a request that names no task.
        let who = if task.is_empty() {
            session.clone()
        } else {
            task.clone()
        };
        let refused = st.refusal();
        let seen = st.attempts.entry((who, turn)).or_insert(0);
        let attempt = *seen;
        // A refusal by the API's own limits is no fault of the task's script: its faults
        // still come, on the requests that pass.
        if refused.is_none() {
            *seen = seen.saturating_add(1);
        }
        let answer = match refused.map(|(s, r)| Answer::Error(s, r)) {
            Some(answer) => answer,
            None => match task_script.fault_for(turn, attempt) {
                Some(f) if f.hang => Answer::Hang,
                Some(f) if f.truncate => Answer::Truncate,
                Some(f) => Answer::Error(f.status.unwrap_or(500), f.retry_after),
                None => {
                    let cwd = working_directory(&body).unwrap_or_default();
                    let usage = task_script.usage.unwrap_or([100, 50]);
                    match task_script
                        .turn(turn, &task, &first_prompt(&body), &body)
                        .and_then(|t| t.to_message(&cwd, turn, usage))
                    {
                        Ok(message) => Answer::Message(message),
                        Err(e) => Answer::Refuse(e),
                    }
                }
            },
        };
        let label = match &answer {
            Answer::Error(s, _) => s.to_string(),
            Answer::Hang => "hang".into(),
            Answer::Truncate => "truncate".into(),
            Answer::Message(_) => "200".into(),
            Answer::Refuse(_) => "400".into(),
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
        (answer, st.script.turn_delay_ms, st.limit_headers.clone())
    };
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if let Answer::Hang = answer {
        // Hold the connection open without a byte until the client gives up (no timeout: that is
        // the fault; only a client with the token gets here).
        let mut sink = [0u8; 64];
        use tokio::io::AsyncReadExt;
        while stream.read(&mut sink).await.unwrap_or(0) > 0 {}
        return Ok(());
    }
    // A client that stops reading cannot hold the connection forever.
    tokio::time::timeout(
        limits.io_timeout,
        answer_with(&mut stream, answer, &body, &limit_headers),
    )
    .await
    .unwrap_or(Ok(()))
}

async fn answer_with(
    stream: &mut TcpStream,
    answer: Answer,
    body: &Value,
    limit_headers: &str,
) -> std::io::Result<()> {
    match answer {
        Answer::Hang => Ok(()),
        Answer::Refuse(message) => {
            http::respond(
                stream,
                400,
                "application/json",
                "",
                &error_body(400, &format!("scripted server: {message}")),
            )
            .await
        }
        Answer::Error(status, retry_after) => {
            let mut extra = limit_headers.to_string();
            if let Some(s) = retry_after {
                extra.push_str(&format!("retry-after: {s}\r\n"));
            }
            http::respond(
                stream,
                status,
                "application/json",
                &extra,
                &error_body(status, &format!("scripted {status}")),
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
            if body["stream"].as_bool().unwrap_or(false) {
                let frames = http::sse_frames(&message);
                let head = format!("HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n{limit_headers}connection: close\r\n\r\n");
                stream.write_all(head.as_bytes()).await?;
                stream.write_all(frames.as_bytes()).await?;
                stream.shutdown().await
            } else {
                http::respond(
                    stream,
                    200,
                    "application/json",
                    limit_headers,
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
mod tests;
