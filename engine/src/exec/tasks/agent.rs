//! An agent task: a `claude` worker (`crate::agent::Worker`) with its own directory, session and
//! credentials, or the scripted model server under `--rehearse`; how the run's workers are set
//! up, when an attempt resumes its predecessor's session, and the credentials an attempt leaves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::{node_file_name, Attempt, Commands, RunPaths, PASSED_ENV};
use crate::compile::Compiled;
use crate::exec::context;
use crate::exec::job::AgentJob;
use crate::exec::options::{ApplyError, ApplyOptions};
use crate::exec::runner::ProcessSpec;
use crate::model::raw::{FailureClass, OutputMode};
use crate::model::workflow::AgentSettings;
use crate::plan::{PlannedAction, PlannedTask};

/// Settled before the run starts: the CLI, the credentials, the scripted server if rehearsing.
pub(crate) struct Agents {
    pub bin: PathBuf,
    pub auth: crate::agent::Auth,
    /// Kept alive for the run.
    pub server: Option<crate::scripted::Server>,
    /// The clusterfile's `[prices]`, over the built-in table: what responses are priced at.
    pub prices: std::sync::Arc<crate::agent::prices::Overrides>,
    /// The model gateway that paces local workers' requests (unless `--no-adapt`), and the
    /// runners whose workers use it: those on this machine, which reach its loopback address.
    pub gateway: Option<(crate::agent::gateway::Gateway, Vec<String>)>,
}

/// The model gateway for the run's local workers, when it paces them: not with `--no-adapt`,
/// nor for Bedrock or Vertex (reached at their clouds' own hosts, with their own limits).
async fn gateway_for(
    compiled: &Compiled,
    opts: &ApplyOptions,
    auth: &crate::agent::Auth,
    model_api: &str,
) -> Result<Option<(crate::agent::gateway::Gateway, Vec<String>)>, ApplyError> {
    use crate::agent::Auth;
    if !opts.adapt_agents || matches!(auth, Auth::Bedrock | Auth::Vertex) {
        return Ok(None);
    }
    let local: Vec<String> = std::iter::once("local".to_string())
        .chain(
            compiled
                .workflow
                .runners
                .iter()
                .filter(|(_, r)| r.kind == crate::model::raw::RunnerKind::Local)
                .map(|(name, _)| name.clone()),
        )
        .collect();
    let gateway = crate::agent::gateway::Gateway::start(model_api)
        .await
        .map_err(|e| ApplyError::Agent(format!("cannot start the model gateway: {e}")))?;
    Ok(Some((gateway, local)))
}

/// Finds the `claude` CLI and the credentials workers will use, or starts the scripted server
/// when rehearsing; `None` when the plan has no agent task.
pub(crate) async fn agents_for(
    compiled: &Compiled,
    opts: &ApplyOptions,
) -> Result<Option<Agents>, ApplyError> {
    let configured = compiled.plan.nodes.iter().find_map(|n| match &n.action {
        PlannedAction::Agent { settings, .. }
        | PlannedAction::Merge {
            agent: Some(settings),
            ..
        } => Some(settings.bin.clone()),
        _ => n.resolver.as_ref().map(|s| s.bin.clone()),
    });
    let Some(configured) = configured else {
        return Ok(None);
    };
    // A configured `bin` is relative to the clusterfile.
    let configured = configured.map(|b| opts.workdir.join(b).display().to_string());
    let bin = crate::agent::find_bin(configured.as_deref()).map_err(ApplyError::Agent)?;
    let prices = std::sync::Arc::new(compiled.workflow.prices.clone());
    let Some(script) = &opts.rehearse else {
        let auth = crate::agent::Auth::detect()
            .ok_or_else(|| ApplyError::Agent(crate::agent::Auth::MISSING.into()))?;
        let model_api = std::env::var("ANTHROPIC_BASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| crate::agent::DEFAULT_MODEL_API.to_string());
        let gateway = gateway_for(compiled, opts, &auth, &model_api).await?;
        return Ok(Some(Agents {
            bin,
            auth,
            server: None,
            prices,
            gateway,
        }));
    };
    let script = rehearsal_script(compiled, script);
    // The server runs on a thread of its own and requires a fresh token, which only the run's
    // workers get.
    let server = crate::scripted::Server::start(script, None)
        .map_err(|e| ApplyError::Agent(format!("cannot start the scripted model server: {e}")))?;
    let gateway = gateway_for(
        compiled,
        opts,
        &crate::agent::Auth::Rehearsal,
        &server.url(),
    )
    .await?;
    Ok(Some(Agents {
        bin,
        auth: crate::agent::Auth::Rehearsal,
        server: Some(server),
        prices,
        gateway,
    }))
}

/// The script a rehearsal answers with: `--script`'s tables, then the clusterfile's `rehearsal`
/// tables for the tasks it does not name.
pub fn rehearsal_script(
    compiled: &Compiled,
    given: &crate::scripted::Script,
) -> crate::scripted::Script {
    let mut script = given.clone();
    for task in &compiled.workflow.tasks {
        if let Some(r) = &task.rehearsal {
            script
                .tasks
                .entry(task.id.to_string())
                .or_insert_with(|| r.clone());
        }
    }
    script
}

/// What a worker needs under rehearsal: the server's URL and token, and its node.
pub(crate) fn rehearsal<'a>(
    agents: &'a Agents,
    url: Option<&'a str>,
    node: &'a str,
) -> Option<crate::agent::Rehearsal<'a>> {
    let (server, url) = (agents.server.as_ref()?, url?);
    Some(crate::agent::Rehearsal {
        url,
        token: server.token(),
        node,
    })
}

/// The `rehearsal` part of a rehearsed agent node's cache key: the hash of the script the server
/// answers it with. A rehearsed result must never stand in for a real one, nor the other way
/// round; and a changed script is a changed result.
pub(crate) fn rehearsal_part(agents: Option<&Agents>, node: &str) -> String {
    let script = agents
        .and_then(|a| a.server.as_ref())
        .map(|s| s.script_for(node))
        .unwrap_or_default();
    context::hash_of(&script)
}

/// The session an attempt continues: its predecessor's, when its answer was refused (an invalid
/// task graph, a structured output that does not fit: the planner is told what is wrong), or
/// under `retry.resume_session` when it was interrupted (the conversation goes on, in the same
/// workspace).
pub(crate) fn resume(
    plan: &PlannedTask,
    attempt: u32,
    previous: Option<&(String, PathBuf)>,
    class: Option<FailureClass>,
) -> Option<(String, PathBuf)> {
    let is_agent = matches!(plan.action, PlannedAction::Agent { .. });
    match (previous, class) {
        // A refused answer is answered again in the same conversation, told why.
        (Some(session), Some(FailureClass::PlanInvalid | FailureClass::StructuredOutput))
            if is_agent && attempt > 1 =>
        {
            Some(session.clone())
        }
        (Some(session), Some(class))
            if is_agent
                && attempt > 1
                && plan.retry.resume_session
                && matches!(
                    class,
                    FailureClass::Timeout
                        | FailureClass::Killed
                        | FailureClass::NoResult
                        | FailureClass::ApiError
                        | FailureClass::RateLimit
                        | FailureClass::Overloaded
                        | FailureClass::Signal
                ) =>
        {
            Some(session.clone())
        }
        _ => None,
    }
}

/// The agent's worker process: its `claude` command line, prompt on stdin, environment, and a
/// prepared worker directory (a new one, or the resumed session's). The inner `Err` fails the
/// node without an attempt.
pub(crate) fn commands(
    a: &Attempt,
    settings: &AgentSettings,
    output_schema: Option<&Value>,
) -> Result<Result<Commands, String>, ApplyError> {
    let (cx, plan) = (a.cx, a.cx.plan);
    let Some(agents) = cx.agents else {
        return Err(ApplyError::Internal(
            "agent task without a worker set-up".into(),
        ));
    };
    // A task may name its own `claude` (relative to the clusterfile).
    let bin = match settings.bin.as_deref() {
        Some(b) if std::env::var_os("CCLUSTER_CLAUDE_BIN").is_none() => {
            let b = cx.workdir.join(b);
            if !b.is_file() {
                return Ok(Err(format!(
                    "`claude.bin` is `{}`, which is not a file",
                    b.display()
                )));
            }
            b
        }
        _ => agents.bin.clone(),
    };
    let (session, dir) = match &cx.resume {
        Some((session, dir)) => (session.clone(), dir.clone()),
        None => (
            crate::agent::new_session_id(),
            cx.paths.workers().join(&a.file_name),
        ),
    };
    // A settings file is named relative to the clusterfile, not the workspace.
    let mut settings = settings.clone();
    if let Some(crate::model::raw::StringOrObject::String(p)) = &mut settings.settings {
        *p = cx.workdir.join(&*p).display().to_string();
    }
    let url = agents.server.as_ref().map(|s| s.url());
    let worker = crate::agent::Worker {
        bin: &bin,
        prompt: &cx.rendered.command,
        settings: &settings,
        output_schema,
        session: &session,
        resume: cx.resume.as_ref().map(|(s, _)| s.as_str()),
        resume_prompt: cx.feedback.as_deref(),
        dir: &dir,
        timeout: plan.timeout_ms.map(Duration::from_millis),
        retry: &plan.retry,
        auth: &agents.auth,
        rehearsal: rehearsal(agents, url.as_deref(), &plan.id),
    };
    let mut s = worker_process(
        a,
        &worker,
        format!("claude -p <prompt of {}>", plan.id),
        "",
        a.cwd.clone(),
    )?;
    // The worker's own variables, then the task's, then ccluster's.
    let declared = std::mem::take(&mut s.env);
    s.env = PASSED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    s.env.extend(worker.env());
    s.env.extend(
        declared
            .into_iter()
            .filter(|(k, _)| !PASSED_ENV.contains(&k.as_str())),
    );
    // A worker on this machine talks to the model API through the run's gateway, which paces
    // all of them (its credentials pass through it untouched).
    if let Some((gateway, local)) = &agents.gateway {
        if local.contains(&plan.runner) && s.model_api.is_some() {
            s.env.retain(|(k, _)| k != "ANTHROPIC_BASE_URL");
            s.env
                .push(("ANTHROPIC_BASE_URL".into(), gateway.url().to_string()));
            s.model_api = Some(gateway.url().to_string());
        }
    }
    Ok(Ok(Commands {
        process: Some(s),
        output: OutputMode::Text,
        resolve: None,
        session: Some((session, dir)),
        agent: Some(AgentJob {
            wants_structured: output_schema.is_some(),
            run: cx.run.id.clone(),
            node: plan.id.clone(),
            progress: cx.progress.clone(),
            prices: agents.prices.clone(),
        }),
    }))
}

/// The credentials workers get, as (variable, value) pairs: masked like the workflow's secrets.
/// A login session's tokens are read from its credentials file; the scripted server's token is
/// the rehearsal's.
pub(crate) fn credentials(agents: &Agents) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = crate::agent::SECRET_VARS
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    if let Some(server) = &agents.server {
        out.push(("ANTHROPIC_API_KEY".into(), server.token().to_string()));
    }
    if let crate::agent::Auth::Subscription(file) = &agents.auth {
        let json: Option<serde_json::Value> = std::fs::read(file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let mut stack: Vec<&serde_json::Value> = json.iter().collect();
        while let Some(v) = stack.pop() {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, item) in map {
                        match item {
                            serde_json::Value::String(s) if k.ends_with("Token") => {
                                out.push(("CLAUDE_LOGIN".into(), s.clone()));
                            }
                            other => stack.push(other),
                        }
                    }
                }
                serde_json::Value::Array(items) => stack.extend(items),
                _ => {}
            }
        }
    }
    out
}

/// An attempt's secrets do not outlive it either: its secret files are removed, and what its
/// worker wrote under the state (the session's transcript, the Bash tool's output) is masked.
fn forget_secrets(paths: &RunPaths, node: &str, attempt: u32, session_dir: Option<&Path>) {
    let file_name = format!("{}.{attempt}", node_file_name(node));
    let run = paths
        .run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let _ = std::fs::remove_dir_all(crate::secrets::files_root(&run).join(&file_name));
    if crate::secrets::active().is_none() {
        return;
    }
    let workers = paths.workers();
    for dir in [
        Some(workers.join(&file_name)),
        Some(workers.join(format!("{file_name}.resolve"))),
        session_dir.map(Path::to_path_buf),
    ]
    .into_iter()
    .flatten()
    {
        crate::secrets::redact_files_under(&dir);
    }
}

/// A copied `claude login` credential does not outlive the attempt, whether its worker (or its
/// merge's resolver) ran or not. Only a login session is copied: nothing to do else.
pub(crate) fn forget_credentials(
    agents: Option<&Agents>,
    paths: &RunPaths,
    node: &str,
    attempt: u32,
    session_dir: Option<&Path>,
) {
    forget_secrets(paths, node, attempt, session_dir);
    if !matches!(
        agents.map(|a| &a.auth),
        Some(crate::agent::Auth::Subscription(_))
    ) {
        return;
    }
    let workers = paths.workers();
    let file_name = format!("{}.{attempt}", node_file_name(node));
    let mut dirs = vec![
        workers.join(&file_name),
        workers.join(format!("{file_name}.resolve")),
    ];
    // A resumed attempt works in its predecessor's directory.
    if let Some(dir) = session_dir {
        dirs.push(dir.to_path_buf());
    }
    for dir in dirs {
        let _ = std::fs::remove_file(dir.join("config").join(".credentials.json"));
    }
}

/// The process of a `claude` worker (a task's agent, a merge's resolver): its directories made,
/// its command line, and its prompt on stdin. `shown` is what logs and events call the command;
/// the caller adds the worker's variables in the order its kind needs.
pub(super) fn worker_process(
    a: &Attempt,
    worker: &crate::agent::Worker,
    shown: String,
    stream: &str,
    cwd: PathBuf,
) -> Result<ProcessSpec, ApplyError> {
    worker.prepare().map_err(|e| ApplyError::Io {
        path: worker.dir.to_path_buf(),
        source: e,
    })?;
    let mut s = a.spec(shown, stream, cwd);
    s.argv = Some(worker.argv());
    s.stdin = worker.stdin();
    // What a runner that isolates the worker must show it: the CLI and a named settings file
    // (read-only), the worker's own directory (writable); which variables are credentials; and
    // the model API it talks to.
    s.reads.push(worker.bin.to_path_buf());
    if let Some(crate::model::raw::StringOrObject::String(p)) = &worker.settings.settings {
        s.reads.push(PathBuf::from(p));
    }
    s.writes.push(worker.dir.to_path_buf());
    s.secret_env
        .extend(crate::agent::SECRET_VARS.iter().map(|v| v.to_string()));
    s.model_api = Some(worker.model_api());
    Ok(s)
}

/// What a resumed planner is told when its last answer was refused: the reason, and to answer
/// again in full. Bounded: a reason longer than 16 KiB is cut.
pub(crate) fn feedback(class: Option<FailureClass>, message: Option<&str>) -> Option<String> {
    if !matches!(
        class,
        Some(FailureClass::PlanInvalid | FailureClass::StructuredOutput)
    ) {
        return None;
    }
    let mut reason = message?.to_string();
    if reason.len() > 16 << 10 {
        let mut cut = 16 << 10;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    Some(format!(
        "Your last answer cannot be used: {reason}\n\nFix these problems and give your whole answer again, in the same format."
    ))
}
