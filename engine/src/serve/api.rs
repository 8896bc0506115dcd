//! The JSON API's reading side: runs, tasks, logs, transcripts, diffs, artifacts, reports and the
//! live event streams, with errors as problem details (RFC 9457) carrying a stable `code`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::graph::{graph, Graph, PlanGroups};
use super::state::{driver_alive, RunView};
use super::Shared;
use crate::exec::EVENTS_FILE;
use crate::store::{ArtifactRecord, AttemptRecord, RunRecords, RunState, TaskRecord, TaskState};

/// An error as the API answers it: `application/problem+json` (RFC 9457).
#[derive(Debug, Serialize, ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem (`https://ccluster.dev/problems/<code>`).
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    /// Stable: clients may match on it (`run-not-found`, `invalid-path`, ...).
    pub code: String,
    /// For a clusterfile with errors: its diagnostics, as `ccluster validate -o json` gives them
    /// (file, line, column, message, help).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<serde_json::Value>,
}

/// A handler's error, answered as a [`Problem`]; small, since every `Result` carries it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub diagnostics: Option<Box<serde_json::Value>>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            detail: detail.into(),
            diagnostics: None,
        }
    }

    pub fn not_found(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, detail)
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, detail)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            kind: format!("https://ccluster.dev/problems/{}", self.code),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("error")
                .to_string(),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code.to_string(),
            diagnostics: self.diagnostics.map(|d| *d),
        };
        let body = serde_json::to_vec(&problem).unwrap_or_default();
        (
            self.status,
            [(header::CONTENT_TYPE, "application/problem+json")],
            body,
        )
            .into_response()
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// Task counts by state.
#[derive(Clone, Debug, Default, PartialEq, Serialize, ToSchema)]
pub struct Counts {
    pub total: usize,
    pub pending: usize,
    pub running: usize,
    pub retrying: usize,
    pub succeeded: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
    pub cancelled: usize,
}

/// A run in lists.
#[derive(Clone, Debug, PartialEq, Serialize, ToSchema)]
pub struct RunSummary {
    pub id: String,
    /// The repository's name (`GET /api/v1/repos`).
    pub repo: String,
    pub workflow: String,
    /// `interrupted` also for a run whose driver is gone, before the next `apply` records it so.
    pub state: RunState,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// Until now for a run in progress.
    pub duration_ms: u64,
    /// What its agents cost so far, in US dollars.
    pub cost_usd: f64,
    pub tokens: u64,
    /// `alice (cli)`, `alice (cli, GitHub Actions)`, `server`; `unknown` for runs recorded before
    /// ccluster said.
    pub started_by: String,
    pub rehearsed: bool,
    /// Read from its driver's live snapshot (in progress, or its driver died).
    pub live: bool,
    pub counts: Counts,
}

pub fn summary(shared: &Shared, view: &RunView) -> RunSummary {
    let mut counts = Counts {
        total: view.tasks.len(),
        ..Counts::default()
    };
    let mut cost = 0.0;
    let mut tokens = 0;
    for t in view.tasks.iter() {
        *match t.state {
            TaskState::Pending => &mut counts.pending,
            TaskState::Running => &mut counts.running,
            TaskState::Retrying => &mut counts.retrying,
            TaskState::Succeeded => &mut counts.succeeded,
            TaskState::Cached => &mut counts.cached,
            TaskState::Failed => &mut counts.failed,
            TaskState::Skipped => &mut counts.skipped,
            TaskState::Cancelled => &mut counts.cancelled,
        } += 1;
        // A cached node's cost was spent by the run it came from.
        if t.cached_from.is_none() {
            cost += t.cost_usd.unwrap_or(0.0) + t.live_cost_usd.unwrap_or(0.0);
            tokens += t.tokens.unwrap_or(0);
        }
    }
    let run = &view.run;
    let end = run.finished_ms.unwrap_or_else(crate::store::now_ms);
    RunSummary {
        id: run.id.clone(),
        repo: shared.states.repos[view.repo].name.clone(),
        workflow: run.workflow.clone(),
        state: run.state,
        started_ms: run.started_ms,
        finished_ms: run.finished_ms,
        duration_ms: end.saturating_sub(run.started_ms),
        cost_usd: cost,
        tokens,
        started_by: run.started_by.clone().unwrap_or_else(|| "unknown".into()),
        rehearsed: run.rehearsed,
        live: view.live,
        counts,
    }
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// Liveness: the server answers.
#[utoipa::path(get, path = "/api/v1/health", tag = "server",
    responses((status = 200, body = Health)))]
pub async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    pub status: String,
    pub repos: Vec<RepoInfo>,
}

#[derive(Serialize, ToSchema)]
pub struct RepoInfo {
    pub name: String,
    pub path: String,
    /// Whether it has a state directory yet (no run was made there otherwise).
    pub has_state: bool,
}

fn repo_infos(shared: &Shared) -> Vec<RepoInfo> {
    shared
        .states
        .repos
        .iter()
        .map(|r| RepoInfo {
            name: r.name.clone(),
            path: r.root.display().to_string(),
            has_state: r.state.is_dir(),
        })
        .collect()
}

/// Readiness: the repositories are there and readable.
#[utoipa::path(get, path = "/api/v1/ready", tag = "server",
    responses((status = 200, body = Readiness), (status = 503, body = Problem)))]
pub async fn ready(State(shared): State<Arc<Shared>>) -> ApiResult<Json<Readiness>> {
    for r in &shared.states.repos {
        if !r.root.is_dir() {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "repo-missing",
                format!("repository {} is not there any more", r.root.display()),
            ));
        }
    }
    Ok(Json(Readiness {
        status: "ready".into(),
        repos: repo_infos(&shared),
    }))
}

/// The repositories served.
#[utoipa::path(get, path = "/api/v1/repos", tag = "server",
    responses((status = 200, body = [RepoInfo])))]
pub async fn repos(State(shared): State<Arc<Shared>>) -> Json<Vec<RepoInfo>> {
    Json(repo_infos(&shared))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunFilter {
    /// Only this repository's runs.
    pub repo: Option<String>,
    /// Only runs in this state (`running`, `succeeded`, `failed`, `cancelled`, `interrupted`).
    pub state: Option<String>,
    /// Only this workflow's runs.
    pub workflow: Option<String>,
    /// At most this many (default 50, at most 500).
    pub limit: Option<usize>,
    /// Only runs older than this run id (the previous page's `next`).
    pub before: Option<String>,
}

#[derive(Serialize, ToSchema)]
pub struct RunList {
    /// Newest first.
    pub runs: Vec<RunSummary>,
    /// The `before` of the next page, when there is one.
    pub next: Option<String>,
}

fn state_name(state: RunState) -> &'static str {
    match state {
        RunState::Running => "running",
        RunState::Succeeded => "succeeded",
        RunState::Failed => "failed",
        RunState::Cancelled => "cancelled",
        RunState::Interrupted => "interrupted",
    }
}

/// The runs, newest first, filtered and paged.
#[utoipa::path(get, path = "/api/v1/runs", tag = "runs", params(RunFilter),
    responses((status = 200, body = RunList), (status = 400, body = Problem)))]
pub async fn list_runs(
    State(shared): State<Arc<Shared>>,
    Query(filter): Query<RunFilter>,
) -> ApiResult<Json<RunList>> {
    if let Some(repo) = &filter.repo {
        if !shared.states.repos.iter().any(|r| &r.name == repo) {
            return Err(ApiError::bad_request(
                "unknown-repo",
                format!("no repository is served as `{repo}` (GET /api/v1/repos lists them)"),
            ));
        }
    }
    if let Some(state) = &filter.state {
        const STATES: [&str; 5] = ["running", "succeeded", "failed", "cancelled", "interrupted"];
        if !STATES.contains(&state.as_str()) {
            return Err(ApiError::bad_request(
                "unknown-state",
                format!("`{state}` is not a run state: {}", STATES.join(", ")),
            ));
        }
    }
    let limit = filter.limit.unwrap_or(50).clamp(1, 500);
    let views = blocking(&shared, |shared| shared.states.runs()).await?;
    let mut runs = Vec::new();
    let mut next = None;
    for view in views.iter().rev() {
        if filter
            .before
            .as_ref()
            .is_some_and(|before| view.run.id.as_str() >= before.as_str())
        {
            continue;
        }
        let repo = &shared.states.repos[view.repo].name;
        if filter.repo.as_ref().is_some_and(|r| r != repo)
            || filter
                .state
                .as_ref()
                .is_some_and(|s| s != state_name(view.run.state))
            || filter
                .workflow
                .as_ref()
                .is_some_and(|w| w != &view.run.workflow)
        {
            continue;
        }
        if runs.len() == limit {
            next = runs.last().map(|r: &RunSummary| r.id.clone());
            break;
        }
        runs.push(summary(&shared, view));
    }
    Ok(Json(RunList { runs, next }))
}

/// Runs the reading work on a blocking thread: files are read there.
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    work: impl FnOnce(&Shared) -> T + Send + 'static,
) -> ApiResult<T> {
    let shared = shared.clone();
    tokio::task::spawn_blocking(move || work(&shared))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the request's work failed: {e}"),
            )
        })
}

pub(super) async fn find_run(shared: &Arc<Shared>, id: String) -> ApiResult<RunView> {
    let shown = id.clone();
    blocking(shared, move |shared| shared.states.run(&id))
        .await?
        .ok_or_else(|| {
            ApiError::not_found(
                "run-not-found",
                format!(
                    "no run `{shown}` in the served repositories (GET /api/v1/runs lists them)"
                ),
            )
        })
}

/// One run with its tasks.
#[derive(Serialize, ToSchema)]
pub struct RunDetail {
    #[serde(flatten)]
    pub summary: RunSummary,
    /// The clusterfile's path as given to `apply`.
    pub clusterfile: String,
    pub inputs: serde_json::Value,
    /// The commit the run's workspaces started from.
    pub base: Option<String>,
    /// The task whose branch is the run's result.
    pub result: Option<String>,
    pub result_branch: Option<String>,
    /// `[workflow] max_run_usd`, when set.
    pub budget_usd: Option<f64>,
    /// In plan order.
    pub tasks: Vec<TaskRecord>,
}

/// A run, its tasks, and what they cost.
#[utoipa::path(get, path = "/api/v1/runs/{run}", tag = "runs",
    params(("run" = String, Path, description = "A run id, a unique prefix of one, or `latest`")),
    responses((status = 200, body = RunDetail), (status = 404, body = Problem)))]
pub async fn get_run(
    State(shared): State<Arc<Shared>>,
    UrlPath(run): UrlPath<String>,
) -> ApiResult<Response> {
    let view = find_run(&shared, run).await?;
    let budget = PlanGroups::read(&shared.states.run_dir(&view)).and_then(|g| g.budget_usd);
    let detail = RunDetail {
        summary: summary(&shared, &view),
        clusterfile: view.run.clusterfile.clone(),
        inputs: view.run.inputs.clone(),
        base: view.run.base.clone(),
        result: view.run.result.clone(),
        result_branch: view.run.result_branch(),
        budget_usd: budget,
        tasks: Vec::new(),
    };
    if let Some(body) = shared.bodies.get(&view, "run") {
        return Ok(json_bytes(body));
    }
    // Serialized on a blocking thread: 10,000 task records are a few megabytes. The summary
    // first, then the tasks spliced in as the last field, without an intermediate tree.
    let tasks = view.tasks.clone();
    let body = tokio::task::spawn_blocking(move || {
        let mut out = serde_json::to_vec(&detail).unwrap_or_default();
        let cut = out.len() - b"[]}".len();
        out.truncate(cut);
        let _ = serde_json::to_writer(&mut out, &*tasks);
        out.push(b'}');
        axum::body::Bytes::from(out)
    })
    .await
    .unwrap_or_default();
    shared.bodies.put(&view, "run", body.clone());
    Ok(json_bytes(body))
}

fn json_bytes(body: axum::body::Bytes) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Answers kept while what they were made from is unchanged: a finished 10,000-task run's detail
/// is megabytes of JSON, made once. Keyed by run and kind, valid for the task list they were
/// made from (the reader hands out the same list until its file changes); a run in progress is
/// not kept (its duration grows).
#[derive(Default)]
pub struct Bodies {
    kept: std::sync::Mutex<BTreeMap<BodyKey, (usize, axum::body::Bytes)>>,
}

/// A run and the kind of answer (`run`, `graph`).
type BodyKey = (String, &'static str);

/// At most this many answers are kept.
const KEPT_BODIES: usize = 16;

impl Bodies {
    fn get(&self, view: &RunView, kind: &'static str) -> Option<axum::body::Bytes> {
        let kept = self.kept.lock().ok()?;
        let (made_from, body) = kept.get(&(view.run.id.clone(), kind))?;
        (*made_from == Arc::as_ptr(&view.tasks) as usize).then(|| body.clone())
    }

    fn put(&self, view: &RunView, kind: &'static str, body: axum::body::Bytes) {
        if view.live {
            return;
        }
        if let Ok(mut kept) = self.kept.lock() {
            if kept.len() >= KEPT_BODIES {
                kept.clear();
            }
            kept.insert(
                (view.run.id.clone(), kind),
                (Arc::as_ptr(&view.tasks) as usize, body),
            );
        }
    }
}

/// The run's task graph, grouped by task, laid out in layers.
#[utoipa::path(get, path = "/api/v1/runs/{run}/graph", tag = "runs",
    params(("run" = String, Path, description = "A run id")),
    responses((status = 200, body = Graph), (status = 404, body = Problem)))]
pub async fn get_graph(
    State(shared): State<Arc<Shared>>,
    UrlPath(run): UrlPath<String>,
) -> ApiResult<Response> {
    let view = find_run(&shared, run).await?;
    if let Some(body) = shared.bodies.get(&view, "graph") {
        return Ok(json_bytes(body));
    }
    let plan = PlanGroups::read(&shared.states.run_dir(&view));
    let tasks = view.tasks.clone();
    let body = tokio::task::spawn_blocking(move || {
        axum::body::Bytes::from(
            serde_json::to_vec(&graph(plan.as_ref(), &tasks)).unwrap_or_default(),
        )
    })
    .await
    .unwrap_or_default();
    shared.bodies.put(&view, "graph", body.clone());
    Ok(json_bytes(body))
}

/// One task of a run.
#[derive(Serialize, ToSchema)]
pub struct TaskDetail {
    pub task: TaskRecord,
    /// Attempts that ended, in order (a finished run's; a run in progress lists them in
    /// `attempt_numbers` only).
    pub attempts: Vec<AttemptRecord>,
    pub artifacts: Vec<ArtifactRecord>,
    /// The attempts that have logs, in order: the run and node whose logs they are may be another
    /// run's (a cached task) or another node's (a deduplicated one).
    pub attempt_numbers: Vec<u32>,
    pub logs_from: LogSource,
}

/// Where a task's logs are: its own run and node, or those its result came from.
#[derive(Clone, Serialize, ToSchema)]
pub struct LogSource {
    pub run: String,
    pub node: String,
}

fn find_task(view: &RunView, node: &str) -> ApiResult<TaskRecord> {
    view.tasks
        .iter()
        .find(|t| t.node == node)
        .cloned()
        .ok_or_else(|| {
            ApiError::not_found(
                "task-not-found",
                format!("run {} has no task `{node}`", view.run.id),
            )
        })
}

/// The logs directory of a run, by id, in the same repository.
fn logs_dir(shared: &Shared, view: &RunView, run: &str) -> PathBuf {
    shared.states.repos[view.repo]
        .state
        .join("runs")
        .join(run)
        .join("logs")
}

/// How many attempts the run and node a task's result came from made (its own, unless cached
/// or deduplicated).
fn source_attempts(shared: &Shared, view: &RunView, task: &TaskRecord) -> u32 {
    let (from_run, from_node) = task.result_source(&view.run.id);
    let find = |v: &RunView| {
        v.tasks
            .iter()
            .find(|t| t.node == from_node)
            .map(|t| t.attempts)
    };
    if from_run == view.run.id {
        find(view).unwrap_or(task.attempts)
    } else {
        shared
            .states
            .run(from_run)
            .and_then(|v| find(&v))
            .unwrap_or(0)
    }
}

/// Attempt numbers that have log files for a node.
fn attempts_logged(logs: &Path, node: &str) -> Vec<u32> {
    let stem = crate::workspace::names::node_file_name(node);
    let mut out: Vec<u32> = std::fs::read_dir(logs)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let rest = name.strip_prefix(&stem)?.strip_prefix('.')?;
            let (attempt, _stream) = rest.split_once('.')?;
            attempt.parse().ok()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// A task: its record, its attempts and what they left.
#[utoipa::path(get, path = "/api/v1/runs/{run}/tasks/{node}", tag = "tasks",
    params(("run" = String, Path, description = "A run id"),
           ("node" = String, Path, description = "A plan node (`build`, `build[2]`)")),
    responses((status = 200, body = TaskDetail), (status = 404, body = Problem)))]
pub async fn get_task(
    State(shared): State<Arc<Shared>>,
    UrlPath((run, node)): UrlPath<(String, String)>,
) -> ApiResult<Json<TaskDetail>> {
    let view = find_run(&shared, run).await?;
    let task = find_task(&view, &node)?;
    let (from_run, from_node) = task.result_source(&view.run.id);
    let source = LogSource {
        run: from_run.to_string(),
        node: from_node.to_string(),
    };
    let (attempts, artifacts) = match &view.archive {
        Some(archive) if from_run == view.run.id => (
            archive.attempts.get(from_node).cloned().unwrap_or_default(),
            archive
                .artifacts
                .get(from_node)
                .cloned()
                .unwrap_or_default(),
        ),
        _ => {
            // Another run's archive, for a cached task.
            let other = shared.states.run(from_run).and_then(|v| v.archive);
            match other {
                Some(a) => (
                    a.attempts.get(from_node).cloned().unwrap_or_default(),
                    a.artifacts.get(from_node).cloned().unwrap_or_default(),
                ),
                None => (Vec::new(), Vec::new()),
            }
        }
    };
    let mut numbers: Vec<u32> = (1..=source_attempts(&shared, &view, &task)).collect();
    if numbers.is_empty() {
        numbers = attempts_logged(&logs_dir(&shared, &view, from_run), from_node);
    }
    Ok(Json(TaskDetail {
        task,
        attempts,
        artifacts,
        attempt_numbers: numbers,
        logs_from: source,
    }))
}

/// The streams an attempt logs, as their files end.
const STREAMS: [&str; 6] = [
    "out",
    "err",
    "setup.out",
    "setup.err",
    "resolve.out",
    "resolve.err",
];

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct LogQuery {
    /// The attempt (default: the latest with logs).
    pub attempt: Option<u32>,
    /// `out` (default; an agent's stream-json transcript), `err`, `setup.out`, `setup.err`,
    /// `resolve.out`, `resolve.err`.
    pub stream: Option<String>,
    /// The first byte (default 0).
    pub offset: Option<u64>,
    /// At most this many bytes (default: to the end; at most 16 MiB without `follow`).
    pub length: Option<u64>,
    /// Keep the response open and send new bytes as the attempt writes them, until it ends.
    pub follow: Option<bool>,
}

/// The most a log answer holds without `follow`.
const MAX_LOG_BYTES: u64 = 16 << 20;
/// How often a followed log is looked at.
const LOG_POLL: Duration = Duration::from_millis(100);

struct LogFile {
    path: PathBuf,
    /// The attempt was made (its missing file is an empty log, not an unknown one).
    made: bool,
}

async fn log_file(
    shared: &Arc<Shared>,
    run: String,
    node: String,
    attempt: Option<u32>,
    stream: Option<String>,
) -> ApiResult<(RunView, TaskRecord, u32, LogFile)> {
    let view = find_run(shared, run).await?;
    let task = find_task(&view, &node)?;
    let stream = stream.unwrap_or_else(|| "out".into());
    if !STREAMS.contains(&stream.as_str()) {
        return Err(ApiError::bad_request(
            "unknown-stream",
            format!("`{stream}` is not a log stream: {}", STREAMS.join(", ")),
        ));
    }
    let (from_run, from_node) = task.result_source(&view.run.id);
    let logs = logs_dir(shared, &view, from_run);
    let made = source_attempts(shared, &view, &task);
    let attempt = match attempt {
        Some(a) => a,
        None => (made > 0)
            .then_some(made)
            .or_else(|| attempts_logged(&logs, from_node).last().copied())
            .ok_or_else(|| {
                ApiError::not_found(
                    "no-logs",
                    format!("`{node}` has no logs (it has not started)"),
                )
            })?,
    };
    let path = crate::exec::log_path(&logs, from_node, attempt, &stream);
    // An attempt that wrote nothing on a stream has no file for it: an empty log.
    let made = attempt >= 1 && attempt <= made;
    Ok((view, task, attempt, LogFile { path, made }))
}

/// Bytes of an attempt's log: a range, or followed while the attempt runs.
#[utoipa::path(get, path = "/api/v1/runs/{run}/tasks/{node}/logs", tag = "tasks",
    params(("run" = String, Path, description = "A run id"),
           ("node" = String, Path, description = "A plan node"), LogQuery),
    responses((status = 200, description = "The log's bytes; `X-Log-Size` is the file's size now",
               content_type = "text/plain"),
              (status = 404, body = Problem), (status = 400, body = Problem)))]
pub async fn task_logs(
    State(shared): State<Arc<Shared>>,
    UrlPath((run, node)): UrlPath<(String, String)>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Response> {
    let (view, task, attempt, file) = log_file(&shared, run, node, q.attempt, q.stream).await?;
    let size = std::fs::metadata(&file.path).map(|m| m.len());
    let offset = q.offset.unwrap_or(0);
    let headers = |size: u64| {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        h.insert("x-log-size", HeaderValue::from(size));
        h
    };
    if !q.follow.unwrap_or(false) {
        let size = size
            .or_else(|e| if file.made { Ok(0) } else { Err(e) })
            .map_err(|_| {
                ApiError::not_found(
                    "no-logs",
                    format!("`{}` attempt {attempt} has no such log", task.node),
                )
            })?;
        if offset > size {
            return Err(ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "offset-past-end",
                format!("offset {offset} is past the log's end ({size} bytes)"),
            ));
        }
        let length = q
            .length
            .unwrap_or(size - offset)
            .min(size - offset)
            .min(MAX_LOG_BYTES);
        let path = file.path.clone();
        let bytes = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            let mut f = std::fs::File::open(path)?;
            f.seek(SeekFrom::Start(offset))?;
            let mut out = Vec::with_capacity(length as usize);
            f.take(length).read_to_end(&mut out)?;
            Ok(out)
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
        return Ok((headers(size), bytes).into_response());
    }
    // Follow: what is there, then what comes, until the attempt is over (the task moved past it,
    // or the run's driver is gone) and the file has nothing more.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, Infallible>>(16);
    let shared2 = shared.clone();
    let run_id = view.run.id.clone();
    let node = task.node.clone();
    let path = file.path.clone();
    tokio::spawn(async move {
        let mut offset = offset;
        let mut limit = q.length.unwrap_or(u64::MAX);
        loop {
            let path2 = path.clone();
            let chunk = tokio::task::spawn_blocking(move || -> Vec<u8> {
                let Ok(mut f) = std::fs::File::open(path2) else {
                    return Vec::new();
                };
                if f.seek(SeekFrom::Start(offset)).is_err() {
                    return Vec::new();
                }
                let mut out = Vec::new();
                let _ = f.take(1 << 20).read_to_end(&mut out);
                out
            })
            .await
            .unwrap_or_default();
            if !chunk.is_empty() {
                let take = (chunk.len() as u64).min(limit) as usize;
                offset += take as u64;
                limit -= take as u64;
                if tx.send(Ok(chunk[..take].to_vec())).await.is_err() || limit == 0 {
                    return;
                }
                continue;
            }
            // Nothing new: is the attempt still going?
            let still = shared2.states.run(&run_id).is_some_and(|v| {
                v.tasks.iter().any(|t| {
                    t.node == node
                        && matches!(t.state, TaskState::Running | TaskState::Pending)
                        && t.attempts <= attempt
                }) && v.run.state == RunState::Running
                    && driver_alive(v.run.pid)
            });
            if !still {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(LOG_POLL) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((headers(size.unwrap_or(0)), Body::from_stream(stream)).into_response())
}

/// One step of an agent's transcript.
#[derive(Serialize, ToSchema)]
pub struct TranscriptEntry {
    /// `system` (the session started), `turn` (a model response), `text`, `tool` (a call),
    /// `tool_result`, `denied`, `api_retry`, `result` (the end, with its cost).
    pub kind: String,
    pub detail: String,
    /// For `turn`: its number; for `result`: the turns taken.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_error: Option<bool>,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AttemptQuery {
    /// The attempt (default: the latest).
    pub attempt: Option<u32>,
}

/// Short: a tool input or result line shown in one line.
fn short(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c == '\n' { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        one_line
    } else {
        one_line.chars().take(max).collect::<String>() + "…"
    }
}

/// The entries of a stream-json transcript.
pub fn transcript(text: &str) -> Vec<TranscriptEntry> {
    let mut out = Vec::new();
    let mut turn = 0;
    let entry = |kind: &str, detail: String| TranscriptEntry {
        kind: kind.into(),
        detail,
        turn: None,
        cost_usd: None,
        is_error: None,
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match v["type"].as_str().unwrap_or_default() {
            "system" if v["subtype"] == "init" => out.push(entry(
                "system",
                format!(
                    "session {} · model {}",
                    v["session_id"].as_str().unwrap_or("?"),
                    v["model"].as_str().unwrap_or("?")
                ),
            )),
            "system" if v["subtype"] == "api_retry" => out.push(entry(
                "api_retry",
                format!(
                    "#{} after {} ({})",
                    v["attempt"].as_u64().unwrap_or(0),
                    v["error_status"]
                        .as_u64()
                        .map_or("no answer".to_string(), |s| s.to_string()),
                    v["error"].as_str().unwrap_or("")
                ),
            )),
            "assistant" => {
                turn += 1;
                out.push(TranscriptEntry {
                    turn: Some(turn),
                    ..entry("turn", format!("turn {turn}"))
                });
                for part in v["message"]["content"].as_array().into_iter().flatten() {
                    match part["type"].as_str().unwrap_or_default() {
                        "text" => out.push(entry(
                            "text",
                            part["text"].as_str().unwrap_or_default().to_string(),
                        )),
                        "tool_use" => {
                            let input = &part["input"];
                            let what = ["file_path", "command", "pattern", "path", "url"]
                                .iter()
                                .find_map(|k| input[*k].as_str())
                                .map(str::to_string)
                                .unwrap_or_else(|| short(&input.to_string(), 120));
                            out.push(entry(
                                "tool",
                                format!("{} {}", part["name"].as_str().unwrap_or("?"), what),
                            ));
                        }
                        _ => {}
                    }
                }
            }
            "user" => {
                for part in v["message"]["content"].as_array().into_iter().flatten() {
                    if part["type"] == "tool_result" {
                        let content = match &part["content"] {
                            serde_json::Value::String(s) => s.clone(),
                            other => other
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|c| c["text"].as_str())
                                .collect::<Vec<_>>()
                                .join("\n"),
                        };
                        let is_error = part["is_error"].as_bool().unwrap_or(false);
                        out.push(TranscriptEntry {
                            is_error: Some(is_error),
                            ..entry("tool_result", short(&content, 400))
                        });
                    }
                }
            }
            "result" => {
                for d in v["permission_denials"].as_array().into_iter().flatten() {
                    out.push(entry(
                        "denied",
                        format!(
                            "{} {}",
                            d["tool_name"].as_str().unwrap_or("?"),
                            short(&d["tool_input"].to_string(), 120)
                        ),
                    ));
                }
                out.push(TranscriptEntry {
                    turn: v["num_turns"].as_u64().map(|n| n as u32),
                    cost_usd: v["total_cost_usd"].as_f64(),
                    is_error: v["is_error"].as_bool(),
                    ..entry(
                        "result",
                        format!(
                            "{}{}",
                            v["subtype"].as_str().unwrap_or("result"),
                            v["result"]
                                .as_str()
                                .map(|r| format!(": {}", short(r, 400)))
                                .unwrap_or_default()
                        ),
                    )
                });
            }
            _ => {}
        }
    }
    out
}

/// An agent attempt's transcript, as steps (turns, tool calls, results, denials, API retries,
/// cost). While the attempt runs, asking again gives what it has done since.
#[utoipa::path(get, path = "/api/v1/runs/{run}/tasks/{node}/transcript", tag = "tasks",
    params(("run" = String, Path, description = "A run id"),
           ("node" = String, Path, description = "A plan node"), AttemptQuery),
    responses((status = 200, body = [TranscriptEntry]), (status = 404, body = Problem)))]
pub async fn task_transcript(
    State(shared): State<Arc<Shared>>,
    UrlPath((run, node)): UrlPath<(String, String)>,
    Query(q): Query<AttemptQuery>,
) -> ApiResult<Json<Vec<TranscriptEntry>>> {
    let (_, task, attempt, file) =
        log_file(&shared, run, node, q.attempt, Some("out".into())).await?;
    let text = tokio::fs::read(&file.path).await.map_err(|_| {
        ApiError::not_found(
            "no-logs",
            format!("`{}` attempt {attempt} has no transcript", task.node),
        )
    })?;
    let text = String::from_utf8_lossy(&text).into_owned();
    if !text.starts_with("{\"type\":") && !text.is_empty() {
        return Err(ApiError::not_found(
            "not-an-agent",
            format!(
                "`{}` is not an agent task: its log is not a transcript",
                task.node
            ),
        ));
    }
    Ok(Json(transcript(&text)))
}

/// The directory an attempt's artifacts are kept in, by run and node.
fn artifact_dir(shared: &Shared, view: &RunView, run: &str, node: &str, attempt: u32) -> PathBuf {
    shared.states.repos[view.repo]
        .state
        .join("runs")
        .join(run)
        .join("artifacts")
        .join(format!(
            "{}.{attempt}",
            crate::workspace::names::node_file_name(node)
        ))
}

/// The diff an attempt made (its `patch.diff`).
#[utoipa::path(get, path = "/api/v1/runs/{run}/tasks/{node}/diff", tag = "tasks",
    params(("run" = String, Path, description = "A run id"),
           ("node" = String, Path, description = "A plan node"), AttemptQuery),
    responses((status = 200, description = "A unified diff", content_type = "text/x-diff"),
              (status = 404, body = Problem)))]
pub async fn task_diff(
    State(shared): State<Arc<Shared>>,
    UrlPath((run, node)): UrlPath<(String, String)>,
    Query(q): Query<AttemptQuery>,
) -> ApiResult<Response> {
    let view = find_run(&shared, run).await?;
    let task = find_task(&view, &node)?;
    let (from_run, from_node) = task.result_source(&view.run.id);
    let attempt = q.attempt.unwrap_or(task.attempts.max(1));
    let path = artifact_dir(&shared, &view, from_run, from_node, attempt).join("patch.diff");
    let bytes = tokio::fs::read(&path).await.map_err(|_| {
        ApiError::not_found(
            "no-diff",
            format!("`{node}` attempt {attempt} changed no files (or has not finished)",),
        )
    })?;
    Ok((
        [(header::CONTENT_TYPE, "text/x-diff; charset=utf-8")],
        bytes,
    )
        .into_response())
}

/// An artifact in lists.
#[derive(Serialize, ToSchema)]
pub struct ArtifactEntry {
    pub node: String,
    pub attempt: u32,
    /// Its path under the attempt (`patch.diff`, or a kept file's path in the workspace).
    pub path: String,
    /// `patch`, `file` or `report`.
    pub kind: String,
    pub size: Option<u64>,
}

/// The artifact files of a record, with where each is on disk.
fn artifact_files(a: &ArtifactRecord) -> Vec<(String, &'static str, PathBuf)> {
    let dir = PathBuf::from(&a.dir);
    let mut out = Vec::new();
    if let Some(patch) = &a.patch {
        out.push((patch.clone(), "patch", dir.join(patch)));
    }
    for f in &a.files {
        out.push((f.clone(), "file", dir.join("files").join(f)));
    }
    for r in &a.reports {
        if !a.files.contains(&r.path) {
            out.push((r.path.clone(), "report", dir.join("files").join(&r.path)));
        }
    }
    out
}

fn archived(shared: &Shared, view: &RunView) -> ApiResult<Arc<crate::store::RunArchive>> {
    let _ = shared;
    view.archive.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "run-in-progress",
            format!(
                "run {} is in progress: its artifacts and report are there once it ends (a finished task's diff is at /tasks/{{node}}/diff already)",
                view.run.id
            ),
        )
    })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ArtifactFilter {
    /// Only this plan node's (`build[2]`).
    pub node: Option<String>,
}

/// What the run's attempts left: patches, kept files, test reports.
#[utoipa::path(get, path = "/api/v1/runs/{run}/artifacts", tag = "artifacts",
    params(("run" = String, Path, description = "A run id"), ArtifactFilter),
    responses((status = 200, body = [ArtifactEntry]), (status = 404, body = Problem),
              (status = 409, body = Problem)))]
pub async fn list_artifacts(
    State(shared): State<Arc<Shared>>,
    UrlPath(run): UrlPath<String>,
    Query(filter): Query<ArtifactFilter>,
) -> ApiResult<Json<Vec<ArtifactEntry>>> {
    let view = find_run(&shared, run).await?;
    let archive = archived(&shared, &view)?;
    let mut out = Vec::new();
    for (node, records) in &archive.artifacts {
        if filter.node.as_ref().is_some_and(|n| n != node) {
            continue;
        }
        for a in records {
            for (path, kind, file) in artifact_files(a) {
                out.push(ArtifactEntry {
                    node: node.clone(),
                    attempt: a.attempt,
                    path,
                    kind: kind.into(),
                    size: std::fs::metadata(&file).ok().map(|m| m.len()),
                });
            }
        }
    }
    Ok(Json(out))
}

/// One artifact's bytes.
#[utoipa::path(get, path = "/api/v1/runs/{run}/artifacts/{node}/{attempt}/{path}", tag = "artifacts",
    params(("run" = String, Path, description = "A run id"),
           ("node" = String, Path, description = "A plan node"),
           ("attempt" = u32, Path, description = "The attempt"),
           ("path" = String, Path, description = "The artifact's path, as listed")),
    responses((status = 200, description = "The file", content_type = "application/octet-stream"),
              (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn get_artifact(
    State(shared): State<Arc<Shared>>,
    UrlPath((run, node, attempt, path)): UrlPath<(String, String, String, String)>,
) -> ApiResult<Response> {
    let attempt: u32 = attempt.parse().map_err(|_| {
        ApiError::bad_request(
            "invalid-attempt",
            format!("`{attempt}` is not an attempt number"),
        )
    })?;
    if path.starts_with('/')
        || Path::new(&path)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(ApiError::bad_request(
            "invalid-path",
            format!(
                "`{path}` is not a path inside the attempt's artifacts (no `..`, not absolute)"
            ),
        ));
    }
    let view = find_run(&shared, run).await?;
    let archive = archived(&shared, &view)?;
    let record = archive
        .artifacts
        .get(&node)
        .and_then(|list| list.iter().find(|a| a.attempt == attempt))
        .ok_or_else(|| {
            ApiError::not_found(
                "artifact-not-found",
                format!("`{node}` attempt {attempt} left no artifacts"),
            )
        })?;
    let (_, _, file) = artifact_files(record)
        .into_iter()
        .find(|(p, ..)| *p == path)
        .ok_or_else(|| {
            ApiError::not_found(
                "artifact-not-found",
                format!("`{node}` attempt {attempt} has no artifact `{path}`"),
            )
        })?;
    // A kept file that is a symlink (or sits under one) must not lead out of the state.
    let state = std::fs::canonicalize(&shared.states.repos[view.repo].state).ok();
    let real = std::fs::canonicalize(&file).ok();
    match (state, real) {
        (Some(state), Some(real)) if real.starts_with(&state) => {
            let bytes = tokio::fs::read(&real).await.map_err(|e| {
                ApiError::not_found("artifact-not-found", format!("cannot read `{path}`: {e}"))
            })?;
            let kind = if path.ends_with(".diff") || path.ends_with(".txt") || path.ends_with(".md")
            {
                "text/plain; charset=utf-8"
            } else if path.ends_with(".xml") {
                "application/xml"
            } else if path.ends_with(".json") {
                "application/json"
            } else {
                "application/octet-stream"
            };
            Ok((
                [
                    (header::CONTENT_TYPE, kind),
                    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
                ],
                bytes,
            )
                .into_response())
        }
        (_, None) => Err(ApiError::not_found(
            "artifact-not-found",
            format!("`{path}` is gone (removed by `ccluster gc`?)"),
        )),
        _ => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "path-escapes",
            format!("`{path}` leads out of the state directory"),
        )),
    }
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    /// `json` (default) or `markdown`.
    pub format: Option<String>,
}

/// The run's report (`ccluster report`): JSON, or Markdown.
#[utoipa::path(get, path = "/api/v1/runs/{run}/report", tag = "runs",
    params(("run" = String, Path, description = "A run id"), ReportQuery),
    responses((status = 200, description = "The report (JSON or text/markdown)"),
              (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn get_report(
    State(shared): State<Arc<Shared>>,
    UrlPath(run): UrlPath<String>,
    Query(q): Query<ReportQuery>,
) -> ApiResult<Response> {
    let view = find_run(&shared, run).await?;
    let _ = archived(&shared, &view)?;
    let markdown = match q.format.as_deref() {
        None | Some("json") => false,
        Some("markdown") | Some("md") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "unknown-format",
                format!("`{other}` is not a report format: json, markdown"),
            ))
        }
    };
    let state = shared.states.repos[view.repo].state.clone();
    let run = view.run.clone();
    let built = tokio::task::spawn_blocking(move || {
        let records = crate::store::Archive::new(&state);
        crate::report::build(&records as &dyn RunRecords, &run).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "report-failed", e))?;
    Ok(if markdown {
        (
            [(header::CONTENT_TYPE, "text/markdown; charset=utf-8")],
            crate::report::to_markdown(&built),
        )
            .into_response()
    } else {
        Json(built).into_response()
    })
}

/// The run's result as a diff from its base (what `ccluster export --patch` writes).
#[utoipa::path(get, path = "/api/v1/runs/{run}/diff", tag = "runs",
    params(("run" = String, Path, description = "A run id")),
    responses((status = 200, description = "A unified diff", content_type = "text/x-diff"),
              (status = 404, body = Problem)))]
pub async fn run_diff(
    State(shared): State<Arc<Shared>>,
    UrlPath(run): UrlPath<String>,
) -> ApiResult<Response> {
    let view = find_run(&shared, run).await?;
    let no_result = || {
        ApiError::not_found(
            "no-result",
            format!("run {} has no result commit (yet)", view.run.id),
        )
    };
    let (Some(repo), Some(base), Some(result)) = (&view.run.repo, &view.run.base, &view.run.result)
    else {
        return Err(no_result());
    };
    let commit = view
        .tasks
        .iter()
        .find(|t| &t.node == result)
        .and_then(|t| t.commit.clone())
        .ok_or_else(no_result)?;
    let out = tokio::process::Command::new("git")
        .current_dir(repo)
        .args(["diff", "--no-renames", "--no-color", base, &commit, "--"])
        .output()
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "git-failed",
                e.to_string(),
            )
        })?;
    if !out.status.success() {
        return Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "git-failed",
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok((
        [(header::CONTENT_TYPE, "text/x-diff; charset=utf-8")],
        out.stdout,
    )
        .into_response())
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Only events after this id (as `Last-Event-ID`, which wins when both are given).
    pub after: Option<u64>,
}

/// The run's events as Server-Sent Events: each `data` is one event of `apply --output json`
/// (docs/events.md), its `event` the event's type, its `id` its place in the run's event log.
/// Reconnect with `Last-Event-ID` to get only what came after. Ends after `run_finished`.
#[utoipa::path(get, path = "/api/v1/runs/{run}/events", tag = "events",
    params(("run" = String, Path, description = "A run id"), EventsQuery,
           ("Last-Event-ID" = Option<u64>, Header, description = "The last event id received")),
    responses((status = 200, description = "An event stream", content_type = "text/event-stream"),
              (status = 404, body = Problem)))]
pub async fn run_events(
    State(shared): State<Arc<Shared>>,
    UrlPath(run): UrlPath<String>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let view = find_run(&shared, run).await?;
    let after = match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| {
                ApiError::bad_request("invalid-event-id", "Last-Event-ID is not an event id")
            })?,
        None => q.after.unwrap_or(0),
    };
    let path = shared.states.run_dir(&view).join(EVENTS_FILE);
    let pid = view.run.pid;
    let finished = view.archive.is_some();
    let rx = super::live::follow(&shared.watchers, path, after, move || {
        !finished && driver_alive(pid)
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Run-level events: `event: run` with a [`RunSummary`] as `data`, for every run when the stream
/// opens and then whenever a run appears or its summary changes.
#[utoipa::path(get, path = "/api/v1/events", tag = "events",
    responses((status = 200, description = "An event stream of RunSummary", content_type = "text/event-stream")))]
pub async fn all_events(State(shared): State<Arc<Shared>>) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(256);
    tokio::spawn(async move {
        let mut seen: BTreeMap<String, RunSummary> = BTreeMap::new();
        let mut id = 0u64;
        loop {
            let shared2 = shared.clone();
            let now = tokio::task::spawn_blocking(move || {
                let views = shared2.states.runs();
                views
                    .iter()
                    .map(|v| summary(&shared2, v))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default();
            for s in now {
                // Durations grow by themselves; a change worth saying is anything else.
                let same = seen.get(&s.id).is_some_and(|old| {
                    RunSummary {
                        duration_ms: s.duration_ms,
                        ..old.clone()
                    } == s
                });
                if same {
                    continue;
                }
                id += 1;
                let event = SseEvent::default()
                    .id(id.to_string())
                    .event("run")
                    .json_data(&s)
                    .unwrap_or_default();
                if tx.send(Ok(event)).await.is_err() {
                    return;
                }
                seen.insert(s.id.clone(), s);
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = tx.closed() => return,
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}
