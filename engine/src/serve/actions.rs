//! The API's acting side: plans, starting, cancelling and retrying runs. The server drives no run
//! itself: each run it starts is a `ccluster apply` (or `retry`) process of its own, in its own
//! process group, that holds the state's writer as any `apply` in a terminal does. Its event lines
//! go to a file under the state (`serve/<run>.jsonl`... named when the run is known), so a run
//! outlives a server that stops or is killed, and the next server finds it like any other.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{find_run, ApiError, ApiResult, Problem};
use super::state::{driver_alive, Repo};
use super::Shared;
use crate::store::RunState;

/// How long a started process may take to say which run it is.
const START_WITHIN: Duration = Duration::from_secs(60);

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    /// The repository's name (`GET /api/v1/repos`); optional when one is served.
    pub repo: Option<String>,
    /// The clusterfile's path in the repository (default `clusterfile.toml`).
    pub clusterfile: Option<String>,
    /// Input values by name.
    #[serde(default)]
    pub inputs: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    pub repo: Option<String>,
    pub clusterfile: Option<String>,
    #[serde(default)]
    pub inputs: serde_json::Map<String, serde_json::Value>,
    /// Run agents against the scripted model server (no key, no tokens): `apply --rehearse`.
    #[serde(default)]
    pub rehearse: bool,
    /// Ignore cached results: `apply --fresh`.
    #[serde(default)]
    pub fresh: bool,
}

#[derive(Serialize, ToSchema)]
pub struct Started {
    pub run: String,
    /// The driving process.
    pub pid: u32,
}

#[derive(Serialize, ToSchema)]
pub struct Cancelling {
    pub run: String,
    pub pid: u32,
}

fn pick_repo<'a>(shared: &'a Shared, name: Option<&str>) -> ApiResult<&'a Repo> {
    let repos = &shared.states.repos;
    match name {
        Some(name) => repos.iter().find(|r| r.name == name).ok_or_else(|| {
            ApiError::bad_request(
                "unknown-repo",
                format!("no repository is served as `{name}` (GET /api/v1/repos lists them)"),
            )
        }),
        None if repos.len() == 1 => Ok(&repos[0]),
        None => Err(ApiError::bad_request(
            "repo-required",
            "several repositories are served: say which with `repo`",
        )),
    }
}

/// A clusterfile path inside the repository: relative, without `..` (as given: diagnostics name
/// it so).
fn clusterfile_in(repo: &Repo, path: Option<&str>) -> ApiResult<PathBuf> {
    let path = path.unwrap_or("clusterfile.toml");
    let p = Path::new(path);
    if path.is_empty()
        || p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(ApiError::bad_request(
            "invalid-path",
            format!("`{path}` is not a path inside the repository (relative, no `..`)"),
        ));
    }
    if !repo.root.join(p).is_file() {
        return Err(ApiError::not_found(
            "clusterfile-not-found",
            format!("{} has no file `{path}`", repo.name),
        ));
    }
    Ok(p.to_path_buf())
}

/// Writes the inputs where the process reads them (`--vars`), private to the user; removed once
/// the process has read them (they may hold secret inputs).
fn inputs_file(
    repo: &Repo,
    inputs: &serde_json::Map<String, serde_json::Value>,
) -> ApiResult<Option<PathBuf>> {
    if inputs.is_empty() {
        return Ok(None);
    }
    let dir = repo.state.join("serve");
    crate::store::create_private_dir_all(&dir).map_err(internal)?;
    let path = dir.join(format!(
        "inputs-{}-{}.json",
        std::process::id(),
        fastrand::u64(..)
    ));
    let text = serde_json::to_vec(inputs).map_err(internal)?;
    crate::store::private_file()
        .create_new(true)
        .write(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &text))
        .map_err(internal)?;
    Ok(Some(path))
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
}

/// The diagnostics a failed compile printed (`{"diagnostics": [...]}` on stdout), as a problem.
fn invalid_clusterfile(stdout: &[u8], stderr: &[u8]) -> ApiError {
    // `plan` prints the document pretty, `apply` on one line.
    let first = stdout.split(|b| *b == b'\n').next().unwrap_or_default();
    let diagnostics = serde_json::from_slice::<serde_json::Value>(stdout)
        .or_else(|_| serde_json::from_slice::<serde_json::Value>(first))
        .ok()
        .and_then(|v| v.get("diagnostics").cloned());
    let detail = match &diagnostics {
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .filter_map(|d| {
                Some(format!(
                    "{}:{}:{}: {}",
                    d["file"].as_str()?,
                    d["line"],
                    d["column"],
                    d["message"].as_str()?
                ))
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => String::from_utf8_lossy(stderr).trim().to_string(),
    };
    ApiError {
        diagnostics: diagnostics.map(Box::new),
        ..ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-clusterfile",
            detail,
        )
    }
}

/// The plan of a clusterfile with inputs (`ccluster plan -o json`), or its diagnostics.
#[utoipa::path(post, path = "/api/v1/plan", tag = "runs", request_body = PlanRequest,
    responses((status = 200, description = "The plan (docs/plan-json.md)"),
              (status = 422, body = Problem, description = "The clusterfile has errors: `diagnostics` has them"),
              (status = 400, body = Problem), (status = 404, body = Problem)))]
pub async fn plan(
    State(shared): State<Arc<Shared>>,
    super::ApiJson(req): super::ApiJson<PlanRequest>,
) -> ApiResult<axum::response::Response> {
    let repo = pick_repo(&shared, req.repo.as_deref())?.clone();
    let file = clusterfile_in(&repo, req.clusterfile.as_deref())?;
    let vars = inputs_file(&repo, &req.inputs)?;
    let mut cmd = shared.ccluster();
    cmd.current_dir(&repo.root)
        .args(["plan", "--output", "json"])
        .stdin(Stdio::null());
    if let Some(vars) = &vars {
        cmd.arg("--vars").arg(vars);
    }
    cmd.arg(&file);
    let out = cmd.output().await;
    if let Some(vars) = &vars {
        let _ = std::fs::remove_file(vars);
    }
    let out = out.map_err(internal)?;
    if out.status.success() {
        return Ok((
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            out.stdout,
        )
            .into_response());
    }
    Err(invalid_clusterfile(&out.stdout, &out.stderr))
}

use axum::response::IntoResponse;

/// Starts `args` as a driver of its own and waits for its first event line, `run_started`: the
/// run's id. A clusterfile with errors gives its diagnostics instead.
async fn start_driver(
    shared: &Shared,
    repo: &Repo,
    args: Vec<std::ffi::OsString>,
    vars: Option<PathBuf>,
) -> ApiResult<Started> {
    let dir = repo.state.join("serve");
    crate::store::create_private_dir_all(&dir).map_err(internal)?;
    let stamp = format!("{}-{}", crate::store::now_ms(), fastrand::u32(..));
    let out_path = dir.join(format!("{stamp}.jsonl"));
    let err_path = dir.join(format!("{stamp}.err"));
    let open = |p: &Path| {
        crate::store::private_file()
            .create_new(true)
            .write(true)
            .open(p)
    };
    let stdout = open(&out_path).map_err(internal)?;
    let stderr = open(&err_path).map_err(internal)?;
    let mut cmd = shared.ccluster();
    cmd.current_dir(&repo.root)
        .args(&args)
        .env("CCLUSTER_STARTED_BY", "server")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        // Its own process group: a Ctrl-C meant for the server does not cancel its runs, and
        // they outlive it.
        .process_group(0)
        .kill_on_drop(false);
    let mut child = cmd.spawn().map_err(internal)?;
    let pid = child.id().unwrap_or(0);
    let deadline = tokio::time::Instant::now() + START_WITHIN;
    let result = loop {
        let text = tokio::fs::read(&out_path).await.unwrap_or_default();
        if let Some(end) = text.iter().position(|b| *b == b'\n') {
            let first = &text[..end];
            match serde_json::from_slice::<serde_json::Value>(first) {
                Ok(v) if v["event"] == "run_started" => {
                    break Ok(Started {
                        run: v["run"].as_str().unwrap_or_default().to_string(),
                        pid,
                    })
                }
                _ => {
                    let _ = child.wait().await;
                    let err = tokio::fs::read(&err_path).await.unwrap_or_default();
                    break Err(invalid_clusterfile(first, &err));
                }
            }
        }
        if let Ok(Some(status)) = child.try_wait() {
            // Ended before a run started: what it said on stderr is why.
            let text = tokio::fs::read(&out_path).await.unwrap_or_default();
            let err = tokio::fs::read(&err_path).await.unwrap_or_default();
            if text.starts_with(b"{\"diagnostics\"") {
                break Err(invalid_clusterfile(&text, &err));
            }
            let code = if status.code() == Some(2) {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            break Err(ApiError::new(
                code,
                "start-failed",
                format!(
                    "the run did not start ({status}): {}",
                    String::from_utf8_lossy(&err).trim()
                ),
            ));
        }
        if tokio::time::Instant::now() > deadline {
            break Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "start-timeout",
                format!("process {pid} did not start a run within {START_WITHIN:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some(vars) = vars {
        let _ = std::fs::remove_file(vars);
    }
    // Reaped when it ends; a server that dies first leaves it to init.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    result
}

/// Starts a run of a clusterfile of a served repository (`ccluster apply` in a process of its
/// own); answers once the run has an id. Follow it with `/api/v1/runs/{run}/events`.
#[utoipa::path(post, path = "/api/v1/runs", tag = "runs", request_body = StartRequest,
    responses((status = 202, body = Started),
              (status = 422, body = Problem, description = "The clusterfile has errors: `diagnostics` has them"),
              (status = 400, body = Problem), (status = 404, body = Problem), (status = 409, body = Problem)))]
pub async fn start_run(
    State(shared): State<Arc<Shared>>,
    super::ApiJson(req): super::ApiJson<StartRequest>,
) -> ApiResult<(StatusCode, Json<Started>)> {
    let repo = pick_repo(&shared, req.repo.as_deref())?.clone();
    let file = clusterfile_in(&repo, req.clusterfile.as_deref())?;
    let vars = inputs_file(&repo, &req.inputs)?;
    let mut args: Vec<std::ffi::OsString> = vec!["apply".into(), "--output".into(), "json".into()];
    if req.rehearse {
        args.push("--rehearse".into());
    }
    if req.fresh {
        args.push("--fresh".into());
    }
    if let Some(vars) = &vars {
        args.push("--vars".into());
        args.push(vars.clone().into());
    }
    // The served state, wherever in the repository the clusterfile is.
    args.push("--state-dir".into());
    args.push(repo.state.clone().into());
    args.push(file.into());
    let started = start_driver(&shared, &repo, args, vars).await?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}

/// Stops a run in progress as Ctrl-C would: its tasks are stopped gracefully, its state kept.
#[utoipa::path(post, path = "/api/v1/runs/{run}/cancel", tag = "runs",
    params(("run" = String, Path, description = "A run id")),
    responses((status = 202, body = Cancelling), (status = 404, body = Problem),
              (status = 409, body = Problem, description = "The run is not in progress")))]
pub async fn cancel_run(
    State(shared): State<Arc<Shared>>,
    UrlPath(run): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<Cancelling>)> {
    let view = find_run(&shared, run).await?;
    let pid = view.run.pid;
    if view.run.state != RunState::Running || !driver_alive(pid) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "run-not-running",
            format!("run {} is not in progress", view.run.id),
        ));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .map_err(|e| internal(format!("cannot signal process {pid}: {e}")))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Cancelling {
            run: view.run.id,
            pid,
        }),
    ))
}

/// Runs a finished run again (`ccluster retry`): what succeeded is reused, the rest runs.
#[utoipa::path(post, path = "/api/v1/runs/{run}/retry", tag = "runs",
    params(("run" = String, Path, description = "A run id")),
    responses((status = 202, body = Started), (status = 404, body = Problem),
              (status = 409, body = Problem, description = "The run is in progress")))]
pub async fn retry_run(
    State(shared): State<Arc<Shared>>,
    UrlPath(run): UrlPath<String>,
) -> ApiResult<(StatusCode, Json<Started>)> {
    let view = find_run(&shared, run).await?;
    if view.run.state == RunState::Running && driver_alive(view.run.pid) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "run-in-progress",
            format!("run {} is still in progress", view.run.id),
        ));
    }
    let repo = shared.states.repos[view.repo].clone();
    let args: Vec<std::ffi::OsString> = vec![
        "retry".into(),
        view.run.id.clone().into(),
        "--output".into(),
        "json".into(),
        "--state-dir".into(),
        repo.state.clone().into(),
    ];
    let started = start_driver(&shared, &repo, args, None).await?;
    Ok((StatusCode::ACCEPTED, Json(started)))
}
