//! Preparing one attempt, kind by kind: what the dispatcher hands over ([`TaskContext`]), what
//! every kind that runs a process shares (its environment, its workspace, its process specs and
//! the [`Job`] they make), and one module per kind. The dispatcher decides *whether* an attempt
//! starts; this decides *where and how* it runs: paths, worktrees, command lines, credentials.
//! A runner other than the local one changes placement here, not scheduling.

pub(crate) mod agent;
pub(crate) mod collect;
pub(crate) mod merge;
pub(crate) mod outputs;
pub(crate) mod shell;

use std::path::{Path, PathBuf};
use std::time::Duration;

use minijinja::value::Value as JinjaValue;
use tokio::sync::mpsc;

use super::context::{Rendered, RunScope};
use super::events::Event;
use super::job::{AgentJob, Job};
use super::options::ApplyError;
use super::runner::ProcessSpec;
use crate::model::raw::OutputMode;
use crate::plan::{PlannedAction, PlannedTask};
use crate::store::RunRecord;
use crate::workspace::{self, Input, Repo, WorkspaceSpec};

/// Environment variables passed through to every process; everything else must be declared.
pub const PASSED_ENV: &[&str] = &[
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR", "TERM",
];

/// Where an attempt's stdout (`out`) or stderr (`err`) goes: one flat folder per run, the file made
/// only when the stream has bytes.
pub fn log_path(logs: &Path, node: &str, attempt: u32, stream: &str) -> PathBuf {
    logs.join(format!("{}.{attempt}.{stream}", node_file_name(node)))
}

/// A plan node's id as a file name (`build[2]` → `build.2`, `review.fix` → `review.fix`): one
/// name per node, so two nodes never share logs, a worktree or a worker directory (see
/// [`workspace::node_file_name`]).
pub fn node_file_name(node: &str) -> String {
    workspace::node_file_name(node)
}

/// Where a run keeps its files, fixed when it starts.
pub(crate) struct RunPaths {
    /// The state directory, absolute: workspace processes run elsewhere, and git resolves paths
    /// from the repository.
    pub state: PathBuf,
    /// `runs/<run>/` under `state`.
    pub run: PathBuf,
    /// `runs/<run>/logs/` as the store names it: what attempt records point at.
    pub logs: PathBuf,
}

impl RunPaths {
    pub fn new(store_dir: &Path, run: &str) -> RunPaths {
        let state = std::path::absolute(store_dir).unwrap_or_else(|_| store_dir.into());
        RunPaths {
            run: state.join("runs").join(run),
            state,
            logs: store_dir.join("runs").join(run).join("logs"),
        }
    }

    /// Agent workers' directories (`<attempt file name>`, `<…>.resolve`).
    pub fn workers(&self) -> PathBuf {
        self.run.join("workers")
    }
}

/// Where a node's workspace comes from; present when the node has a workspace in a repository.
pub(crate) struct WorkspaceInputs<'a> {
    pub repo: &'a Repo,
    /// The clusterfile's directory inside the repository: where, in a worktree, commands run.
    pub subdir: &'a Path,
    /// The commits it builds on (see `Dispatcher::inputs`).
    pub inputs: &'a [Input],
    /// The run's base commit.
    pub run_base: &'a str,
    /// The result branch, when the node is the run's result.
    pub result_branch: Option<String>,
    /// As many worktrees wait for reuse as can run at once (`--jobs`).
    pub pool_size: usize,
    /// `[policy]`: what the task's change may hold.
    pub policy: &'a crate::policy::ChangePolicy,
}

/// Everything a kind of task needs to prepare one attempt. The dispatcher builds it from its own
/// state, so that what runs a process never reaches into scheduling.
pub(crate) struct TaskContext<'a> {
    pub plan: &'a PlannedTask,
    /// The node's templates rendered for this attempt.
    pub rendered: &'a Rendered,
    pub attempt: u32,
    /// The run's template values, and what templates of this node see as `tasks`: for what is
    /// rendered only now (a template instance's outputs).
    pub scope: &'a RunScope,
    pub tasks: &'a JinjaValue,
    /// The run: its id, its start (the commits' dates), its refs.
    pub run: &'a RunRecord,
    pub paths: &'a RunPaths,
    /// The clusterfile's directory: where a task without a workspace runs, what a task's
    /// `claude.bin` and settings file are relative to, where `copy` globs are read.
    pub workdir: &'a Path,
    /// The cache key: names the workspace's keep ref.
    pub cache_key: Option<&'a str>,
    pub grace: Duration,
    pub workspace: Option<WorkspaceInputs<'a>>,
    /// How agent workers run (the CLI, the credentials or the scripted server).
    pub agents: Option<&'a agent::Agents>,
    /// The session (and worker directory) this attempt continues (`retry.resume_session`).
    pub resume: Option<(String, PathBuf)>,
    /// Where a running agent's progress goes.
    pub progress: &'a mpsc::UnboundedSender<Event>,
    /// Work a killed ccluster left with the node's runner, which this attempt takes over.
    pub adopted: Option<crate::exec::runner::Adopted>,
    /// Why the previous attempt's answer was refused, for the resumed session (see
    /// [`agent::feedback`]).
    pub feedback: Option<String>,
    /// The run's secrets, resolved when it started: the node gets those its task lists.
    pub secrets: &'a crate::secrets::SecretValues,
}

/// What preparing an attempt gave.
// One per attempt and handed straight over: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Prepared {
    /// The attempt to start; `session` is an agent's (session id, worker directory).
    Job {
        job: Job,
        session: Option<(String, PathBuf)>,
    },
    /// The node fails without an attempt (a task's `claude.bin` that is not a file).
    Refused(String),
}

/// A kind's processes for one attempt.
pub(crate) struct Commands {
    /// The task's command; `None` for a git merge.
    pub process: Option<ProcessSpec>,
    pub output: OutputMode,
    /// What resolves a conflicted merge.
    pub resolve: Option<ProcessSpec>,
    /// An agent's (session id, worker directory).
    pub session: Option<(String, PathBuf)>,
    pub agent: Option<AgentJob>,
}

impl Commands {
    fn new(process: Option<ProcessSpec>, output: OutputMode, resolve: Option<ProcessSpec>) -> Self {
        Commands {
            process,
            output,
            resolve,
            session: None,
            agent: None,
        }
    }
}

/// What the kinds that run a process share, made once per attempt by [`prepare`].
pub(crate) struct Attempt<'a> {
    pub cx: &'a TaskContext<'a>,
    /// Passed through, then declared, then ccluster's own.
    pub env: Vec<(String, String)>,
    /// `<node file name>.<attempt>`: names the attempt's worktree, worker and artifacts.
    pub file_name: String,
    /// Where the command runs: the workspace's (or the clusterfile's) directory, and `workdir`.
    pub cwd: PathBuf,
    /// Resolvers work from the repository's top: conflicted paths are relative to it.
    pub ws_root: PathBuf,
    /// The variables of `env` that hold secrets (or their files' paths).
    pub secret_env: Vec<String>,
    /// The directory of the attempt's secret files, when it has any.
    pub secret_dir: Option<PathBuf>,
}

impl Attempt<'_> {
    /// A process of the attempt; `stream` prefixes its log files' names (`setup.`, `resolve.`).
    pub fn spec(&self, command: String, stream: &str, cwd: PathBuf) -> ProcessSpec {
        let (cx, plan) = (self.cx, self.cx.plan);
        ProcessSpec {
            command,
            argv: None,
            lines: None,
            env: self.env.clone(),
            stdin: None,
            cwd,
            workspace: Some(self.ws_root.clone()),
            // A runner that isolates the process shows it its secret files, read-only.
            reads: self.secret_dir.iter().cloned().collect(),
            writes: Vec::new(),
            secret_env: self.secret_env.clone(),
            model_api: None,
            identity: Some(crate::exec::runner::Identity {
                run: cx.run.id.clone(),
                node: plan.id.clone(),
                attempt: cx.attempt,
                cache_key: cx.cache_key.map(str::to_string),
                state_dir: cx.paths.state.clone(),
                events: cx.progress.clone(),
            }),
            keeps: plan
                .artifacts
                .iter()
                .chain(&plan.reports)
                .cloned()
                .collect(),
            adopt: None,
            stdout: log_path(
                &cx.paths.logs,
                &plan.id,
                cx.attempt,
                &format!("{stream}out"),
            ),
            stderr: log_path(
                &cx.paths.logs,
                &plan.id,
                cx.attempt,
                &format!("{stream}err"),
            ),
            timeout: plan.timeout_ms.map(Duration::from_millis),
            grace: cx.grace,
        }
    }
}

/// Prepares the attempt of a node that runs a process (a shell task, an agent, a git merge).
pub(crate) fn prepare(cx: &TaskContext) -> Result<Prepared, ApplyError> {
    let (plan, attempt, rendered) = (cx.plan, cx.attempt, cx.rendered);
    let mut env: Vec<(String, String)> = PASSED_ENV
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| (k.to_string(), v)))
        .collect();
    // Declared variables first, ccluster's own last: a task cannot hide from orphan reaping
    // (which looks for CCLUSTER_RUN) by overriding it.
    env.extend(rendered.env.iter().cloned());
    let file_name = format!("{}.{attempt}", node_file_name(&plan.id));
    let (secret_env, secret_dir) = match secret_env(cx, &file_name, &mut env) {
        Ok(delivered) => delivered,
        Err(reason) => return Ok(Prepared::Refused(reason)),
    };
    env.push(("CCLUSTER_RUN".into(), cx.run.id.clone()));
    env.push(("CCLUSTER_TASK".into(), plan.id.clone()));
    env.push(("CCLUSTER_ATTEMPT".into(), attempt.to_string()));

    let workspace = workspace_spec(cx, &file_name);
    let subdir = cx
        .workspace
        .as_ref()
        .map(|w| w.subdir)
        .unwrap_or(Path::new(""));
    let cwd = match &workspace {
        Some(ws) => ws.dir_for(subdir),
        None => cx.workdir.to_path_buf(),
    };
    let cwd = match &rendered.workdir {
        Some(w) => cwd.join(w),
        None => cwd,
    };
    let ws_root = workspace
        .as_ref()
        .map(|w| w.path.clone())
        .unwrap_or_else(|| cx.workdir.to_path_buf());
    let ws_dir = workspace
        .as_ref()
        .map(|w| w.dir_for(subdir))
        .unwrap_or_else(|| cx.workdir.to_path_buf());
    let a = Attempt {
        cx,
        env,
        file_name,
        cwd,
        ws_root,
        secret_env,
        secret_dir,
    };
    let mut commands = match &plan.action {
        PlannedAction::Shell { output, .. } => shell::commands(&a, *output),
        PlannedAction::Outputs { .. } => Commands::new(None, OutputMode::Text, None),
        PlannedAction::Merge { .. } => merge::commands(&a)?,
        PlannedAction::Agent {
            settings,
            output_schema,
            ..
        } => match agent::commands(&a, settings, output_schema.as_ref())? {
            Ok(c) => c,
            Err(reason) => return Ok(Prepared::Refused(reason)),
        },
    };
    // A task graph's instance that starts from a merge of several predecessors may have an agent
    // to resolve a conflict there.
    if let (Some(settings), None, true) = (
        &plan.resolver,
        &commands.resolve,
        workspace.as_ref().is_some_and(|w| !w.merge.is_empty()),
    ) {
        commands.resolve = Some(merge::resolver(&a, settings, "resolve.")?);
    }
    // Adopted work set its workspace up when it started.
    let setup = plan
        .workspace
        .as_ref()
        .and_then(|w| w.setup.clone())
        .filter(|_| cx.adopted.is_none())
        .map(|s| a.spec(s, "setup.", ws_dir.clone()));
    let mut process = commands.process;
    if let (Some(p), Some(adopted)) = (process.as_mut(), &cx.adopted) {
        p.adopt = Some(adopted.handle.clone());
    }
    Ok(Prepared::Job {
        job: Job {
            process,
            output: commands.output,
            workspace,
            setup,
            resolve: commands.resolve,
            copy_from: cx.workdir.to_path_buf(),
            root: cx.workdir.to_path_buf(),
            artifacts: plan.artifacts.clone(),
            reports: plan.reports.clone(),
            attempt,
            timeout: plan.timeout_ms.map(Duration::from_millis),
            artifact_dir: cx.paths.run.join("artifacts").join(&a.file_name),
            agent: commands.agent,
        },
        session: commands.session,
    })
}

/// Adds the secrets the node's task lists to `env`: a value, or the path of a 0600 file written
/// for the attempt outside the state and the workspace ([`crate::secrets::files_root`], removed
/// when the attempt ends). Returns the variables that hold them and the files' directory, or why
/// the node cannot have them (it then fails without an attempt).
fn secret_env(
    cx: &TaskContext,
    file_name: &str,
    env: &mut Vec<(String, String)>,
) -> Result<(Vec<String>, Option<PathBuf>), String> {
    use crate::secrets::Delivery;
    let mut names = Vec::new();
    let mut dir = None;
    for secret in &cx.plan.secrets {
        // Every secret a task lists was read when the run started.
        let Some(value) = cx.secrets.get(&secret.name) else {
            return Err(format!(
                "secret `{}` was not read when the run started",
                secret.name
            ));
        };
        match &secret.delivery {
            Delivery::Env(var) => {
                env.push((var.clone(), value.to_string()));
                names.push(var.clone());
            }
            Delivery::File { file, env: var } => {
                let d = crate::secrets::files_root(&cx.run.id).join(file_name);
                let path = crate::secrets::write_secret_file(&cx.run.id, file_name, file, value)
                    .map_err(|e| {
                        format!(
                            "cannot write the file of secret `{}` in `{}`: {e}",
                            secret.name,
                            d.display()
                        )
                    })?;
                env.push((var.clone(), path.display().to_string()));
                names.push(var.clone());
                dir = Some(d);
            }
        }
    }
    Ok((names, dir))
}

/// The attempt's workspace: where it is, what it starts from and merges, what it publishes.
fn workspace_spec(cx: &TaskContext, file_name: &str) -> Option<WorkspaceSpec> {
    let (Some(w), Some(ws)) = (&cx.workspace, &cx.plan.workspace) else {
        return None;
    };
    let (plan, attempt, run) = (cx.plan, cx.attempt, cx.run);
    let inputs = w.inputs;
    let is_merge = matches!(plan.action, PlannedAction::Merge { .. });
    // A merge starts from the run's base and merges every input; another task starts
    // from what it builds on (the first input, the others merged into it).
    let (start, merge) = if is_merge || inputs.is_empty() {
        (
            w.run_base.to_string(),
            if is_merge {
                inputs.to_vec()
            } else {
                Vec::new()
            },
        )
    } else {
        (inputs[0].commit.clone(), inputs[1..].to_vec())
    };
    let date = format!("@{} +0000", run.started_ms / 1000);
    let identity = vec![
        ("GIT_AUTHOR_NAME".to_string(), "ccluster".to_string()),
        (
            "GIT_AUTHOR_EMAIL".to_string(),
            "ccluster@localhost".to_string(),
        ),
        ("GIT_COMMITTER_NAME".to_string(), "ccluster".to_string()),
        (
            "GIT_COMMITTER_EMAIL".to_string(),
            "ccluster@localhost".to_string(),
        ),
        ("GIT_AUTHOR_DATE".to_string(), date.clone()),
        ("GIT_COMMITTER_DATE".to_string(), date),
    ];
    let worktrees = cx.paths.state.join("worktrees");
    Some(WorkspaceSpec {
        repo: w.repo.root.clone(),
        mode: ws.mode,
        path: worktrees.join(&run.id).join(file_name),
        start,
        merge,
        run_base: w.run_base.to_string(),
        copy: ws.copy.clone(),
        task_ref: run.task_ref(&plan.id),
        result_branch: w.result_branch.clone(),
        keep_ref: format!("refs/ccluster/keep/{}", cx.cache_key.unwrap_or("none")),
        message: format!("ccluster: {} (run {}, attempt {attempt})", plan.id, run.id),
        identity,
        pool: Some((worktrees.join("pool"), w.pool_size)),
        // A merge joins changes that were checked as their tasks made them.
        policy: (!is_merge && !w.policy.is_empty()).then(|| w.policy.clone()),
        // Adopted work's workspace (a killed run's), or the interrupted session's.
        reuse: match &cx.adopted {
            Some(adopted) => adopted.workspace.clone(),
            None => cx.resume.as_ref().map(|_| {
                worktrees.join(&run.id).join(format!(
                    "{}.{}",
                    node_file_name(&plan.id),
                    attempt - 1
                ))
            }),
        },
    })
}
