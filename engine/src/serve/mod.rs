//! `ccluster serve`: the HTTP API (runs, tasks, logs, artifacts, reports, plans; starting,
//! cancelling and retrying runs), its live event streams, and the web dashboard, over the state
//! directories of one or more repositories.
//!
//! The server never holds a state's writer: runs are driven by `ccluster apply` processes (the
//! server starts its own runs as such processes), and the server reads what every driver leaves for
//! readers — the archives of finished runs, the live snapshots and the event logs of runs in
//! progress (docs/architecture.md, "Serving").

pub mod actions;
pub mod api;
pub mod dashboard;
pub mod graph;
pub mod live;
pub mod metrics;
pub mod state;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use utoipa::OpenApi;

use api::ApiError;
use state::{Repo, States};

/// The largest request body accepted (plans and starts are small JSON documents).
pub const MAX_BODY: usize = 1 << 20;

/// What `ccluster serve` was asked for.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Repository directories whose `.ccluster/` state is served.
    pub repos: Vec<PathBuf>,
    /// The `ccluster` binary that runs started by the server are driven by.
    pub exe: PathBuf,
    /// The server's policy (absolute): every run it plans, starts or retries is held to it.
    pub policy: Option<PathBuf>,
    /// The metrics `/metrics` serves (counted from the served runs' event logs).
    pub metrics: Option<crate::telemetry::MetricsText>,
}

/// What every request handler shares.
pub struct Shared {
    pub states: States,
    pub watchers: Arc<live::Watchers>,
    pub exe: PathBuf,
    /// Large answers made once (see [`api::Bodies`]).
    pub bodies: api::Bodies,
    /// The server's policy file, given to every `ccluster` it starts (`CCLUSTER_POLICY`).
    pub policy: Option<PathBuf>,
    pub metrics: Option<crate::telemetry::MetricsText>,
    pub counted: metrics::EventCounter,
}

impl Shared {
    /// A `ccluster` command as the server starts one: held to the server's policy, or to none
    /// (not to whatever `CCLUSTER_POLICY` the server's own environment had), exporting no
    /// metrics of its own.
    pub fn ccluster(&self) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.exe);
        match &self.policy {
            Some(p) => cmd.env("CCLUSTER_POLICY", p),
            None => cmd.env_remove("CCLUSTER_POLICY"),
        };
        // The server counts its runs' metrics from their event logs (and exports them, when
        // asked): a run it starts exports its trace only, so that nothing is counted twice.
        cmd.env("OTEL_METRICS_EXPORTER", "none");
        cmd
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ccluster",
        description = "The HTTP API of `ccluster serve`: runs, tasks, logs, artifacts, reports, live events; starting, cancelling and retrying runs. Errors are problem details (RFC 9457) with a stable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        api::health, api::ready, api::repos,
        api::list_runs, api::get_run, api::get_graph,
        api::get_task, api::task_logs, api::task_transcript, api::task_diff,
        api::list_artifacts, api::get_artifact, api::get_report, api::run_diff,
        api::run_events, api::all_events,
        actions::plan, actions::start_run, actions::cancel_run, actions::retry_run,
    ),
    tags(
        (name = "server", description = "Health and the repositories served"),
        (name = "runs", description = "Runs: listing, reading, starting, cancelling, retrying"),
        (name = "tasks", description = "A run's tasks: attempts, logs, transcripts, diffs"),
        (name = "artifacts", description = "What attempts left"),
        (name = "events", description = "Live Server-Sent Events"),
    )
)]
pub struct ApiDoc;

/// The OpenAPI description of the API, as `/openapi.json` serves it and `schema/openapi.json`
/// keeps it.
pub fn openapi_json() -> String {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc.to_pretty_json().unwrap_or_default() + "\n"
}

/// A JSON body whose rejections (malformed, wrong type, too large) are problem details.
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => {
                let status = rejection.status();
                let code = match status {
                    StatusCode::PAYLOAD_TOO_LARGE => "body-too-large",
                    StatusCode::UNSUPPORTED_MEDIA_TYPE => "not-json",
                    _ => "invalid-json",
                };
                Err(ApiError::new(status, code, rejection.body_text()))
            }
        }
    }
}

async fn not_found() -> Response {
    ApiError::not_found(
        "no-such-endpoint",
        "no such endpoint (GET /openapi.json lists them)",
    )
    .into_response()
}

/// Names repositories by their directory's name, made unique with a number.
fn repos_of(dirs: &[PathBuf]) -> std::io::Result<Vec<Repo>> {
    let mut repos: Vec<Repo> = Vec::new();
    for dir in dirs {
        let root = std::fs::canonicalize(dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("--repo {}: {e}", dir.display())))?;
        let base = root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "repo".into());
        let mut name = base.clone();
        let mut n = 1;
        while repos.iter().any(|r| r.name == name) {
            n += 1;
            name = format!("{base}-{n}");
        }
        repos.push(Repo {
            name,
            state: root.join(".ccluster"),
            root,
        });
    }
    Ok(repos)
}

/// The server's routes over `shared`.
pub fn router(shared: Arc<Shared>) -> Router {
    let api = Router::new()
        .route("/health", get(api::health))
        .route("/ready", get(api::ready))
        .route("/repos", get(api::repos))
        .route("/runs", get(api::list_runs).post(actions::start_run))
        .route("/runs/{run}", get(api::get_run))
        .route("/runs/{run}/graph", get(api::get_graph))
        .route("/runs/{run}/events", get(api::run_events))
        .route("/runs/{run}/report", get(api::get_report))
        .route("/runs/{run}/diff", get(api::run_diff))
        .route("/runs/{run}/cancel", post(actions::cancel_run))
        .route("/runs/{run}/retry", post(actions::retry_run))
        .route("/runs/{run}/artifacts", get(api::list_artifacts))
        .route(
            "/runs/{run}/artifacts/{node}/{attempt}/{*path}",
            get(api::get_artifact),
        )
        .route("/runs/{run}/tasks/{node}", get(api::get_task))
        .route("/runs/{run}/tasks/{node}/logs", get(api::task_logs))
        .route(
            "/runs/{run}/tasks/{node}/transcript",
            get(api::task_transcript),
        )
        .route("/runs/{run}/tasks/{node}/diff", get(api::task_diff))
        .route("/events", get(api::all_events))
        .route("/plan", post(actions::plan))
        .fallback(not_found);
    Router::new()
        .nest("/api/v1", api)
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    openapi_json(),
                )
            }),
        )
        .route("/metrics", get(prometheus_metrics))
        .route("/", get(dashboard::index))
        .route("/assets/{file}", get(dashboard::asset))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(shared)
}

/// `GET /metrics`: what the served runs' event logs add up to, as Prometheus text.
async fn prometheus_metrics(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
) -> Response {
    let Some(metrics) = shared.metrics.clone() else {
        return not_found().await;
    };
    let text = tokio::task::spawn_blocking(move || {
        shared.counted.catch_up(&shared.states);
        metrics.render()
    })
    .await
    .unwrap_or_default();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            crate::telemetry::PROMETHEUS_TEXT,
        )],
        text,
    )
        .into_response()
}

/// Serves until the process is stopped (SIGINT or SIGTERM: connections are closed and the server
/// exits; the runs it started go on).
pub async fn serve(config: ServeConfig) -> std::io::Result<()> {
    let repos = repos_of(&config.repos)?;
    let shared = Arc::new(Shared {
        states: States::new(repos),
        watchers: Arc::new(live::Watchers::default()),
        exe: config.exe.clone(),
        bodies: api::Bodies::default(),
        policy: config.policy.clone(),
        metrics: config.metrics.clone(),
        counted: metrics::EventCounter::default(),
    });
    let listener = tokio::net::TcpListener::bind(config.addr).await?;
    let addr = listener.local_addr()?;
    // The one line a script waits for (the port, when 0 was asked for).
    println!("serving on http://{addr}/");
    for r in &shared.states.repos {
        eprintln!("  repository {} ({})", r.name, r.root.display());
    }
    let stop = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => {}
        }
    };
    axum::serve(listener, router(shared))
        .with_graceful_shutdown(stop)
        .await
}
