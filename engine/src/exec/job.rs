//! One attempt of a task, from start to end, off the dispatcher's loop: make its workspace (merge
//! what it builds on, resolving conflicts if told how), run `setup` and the command on the runner,
//! then commit and publish what changed, and keep its artifacts. The dispatcher records the
//! [`JobResult`]; nothing here writes run state.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;

use super::runner::{ProcessEnd, ProcessResult, ProcessSpec, Runner, Stop};
use crate::model::raw::{FailureClass, OutputMode};
use crate::store::ArtifactRecord;
use crate::workspace::{self, artifacts, GitError, GitLimits, MergeStep, WorkspaceSpec};

/// Everything an attempt needs; built by the dispatcher when the attempt starts.
pub struct Job {
    /// The task's command; `None` for a git merge, which runs no command of its own.
    pub process: Option<ProcessSpec>,
    /// How stdout becomes the output.
    pub output: OutputMode,
    pub workspace: Option<WorkspaceSpec>,
    /// Run in the fresh workspace before the command.
    pub setup: Option<ProcessSpec>,
    /// Run in a conflicted merge to resolve it (`on_conflict = "run"`).
    pub resolve: Option<ProcessSpec>,
    /// The main checkout directory the clusterfile is in (where `copy` globs are read).
    pub copy_from: PathBuf,
    /// Where `artifacts` and `reports` globs are read when the task has no workspace.
    pub root: PathBuf,
    pub artifacts: Vec<String>,
    pub reports: Vec<String>,
    pub attempt: u32,
    /// The task's `timeout`: ccluster's own git steps of the attempt share it (its processes have
    /// it in their [`ProcessSpec`]).
    pub timeout: Option<Duration>,
    /// This attempt's artifact directory.
    pub artifact_dir: PathBuf,
    /// Set for an agent attempt: its stream-json is read as it arrives.
    pub agent: Option<AgentJob>,
}

/// How an agent attempt reports.
pub struct AgentJob {
    pub wants_structured: bool,
    pub run: String,
    pub node: String,
    pub progress: tokio::sync::mpsc::UnboundedSender<super::Event>,
    /// What its responses are priced at (the clusterfile's `[prices]` over the built-in table).
    pub prices: std::sync::Arc<crate::agent::prices::Overrides>,
}

/// How an attempt ended.
pub struct JobResult {
    pub process: ProcessResult,
    /// A failure outside the command (workspace, setup, merge, commit): it decides the attempt.
    pub failure: Option<(FailureClass, String)>,
    /// The output, when the attempt succeeded.
    pub output: Option<Value>,
    pub commit: Option<String>,
    /// `None` when there was nothing to keep (no workspace, no globs).
    pub artifacts: Option<ArtifactRecord>,
    pub usage: Option<crate::agent::Usage>,
    /// How long each step took, in order.
    pub steps: Vec<super::StepTime>,
    /// The merges into its workspace.
    pub merges: Option<super::MergeCount>,
}

/// The steps of an attempt as they are timed: each is a span (a child of the attempt's) and a
/// [`super::StepTime`] of the result. Shared by the attempt's futures, hence the lock.
#[derive(Default)]
struct Steps {
    times: std::sync::Mutex<Vec<super::StepTime>>,
    merges: std::sync::Mutex<Option<super::MergeCount>>,
}

impl Steps {
    fn push(&self, step: &'static str, took: Duration) {
        self.times
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(super::StepTime {
                step: step.into(),
                ms: took.as_millis() as u64,
            });
    }

    async fn time<T>(&self, step: &'static str, work: impl std::future::Future<Output = T>) -> T {
        use tracing::Instrument as _;
        let span = tracing::info_span!("step", otel.name = step, ccluster.operation = step);
        let t0 = std::time::Instant::now();
        let out = work.instrument(span).await;
        self.push(step, t0.elapsed());
        out
    }

    fn time_sync<T>(&self, step: &'static str, work: impl FnOnce() -> T) -> T {
        let span = tracing::info_span!("step", otel.name = step, ccluster.operation = step);
        let t0 = std::time::Instant::now();
        let out = span.in_scope(work);
        self.push(step, t0.elapsed());
        out
    }

    fn merged(&self, count: impl FnOnce(&mut super::MergeCount)) {
        count(
            self.merges
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert_with(Default::default),
        );
    }
}

/// The output of a shell task from its stdout.
pub fn shell_output(mode: OutputMode, stdout: &str) -> Result<Value, String> {
    match mode {
        OutputMode::Text => Ok(Value::String(stdout.trim().to_string())),
        OutputMode::Json => {
            if let Ok(v) = serde_json::from_str::<Value>(stdout.trim()) {
                return Ok(v);
            }
            stdout
                .lines()
                .rev()
                .find_map(|line| serde_json::from_str::<Value>(line.trim()).ok())
                .ok_or_else(|| "`output = \"json\"` but stdout holds no JSON value".to_string())
        }
    }
}

fn no_process() -> ProcessResult {
    ProcessResult {
        end: ProcessEnd::Exited(0),
        stdout: Vec::new(),
    }
}

/// How a failed git step ends the attempt: a git failure is `class` with `context`; a step stopped
/// by the attempt's timeout is a timeout, and one stopped by a cancel a cancel, as they would be
/// for the task's command.
fn git_failure(
    error: GitError,
    class: FailureClass,
    context: impl FnOnce(String) -> String,
) -> (ProcessResult, FailureClass, String) {
    let ended = |end| ProcessResult {
        end,
        stdout: Vec::new(),
    };
    match error {
        GitError::Failed(e) => (no_process(), class, context(e)),
        GitError::TimedOut { step } => (
            ended(ProcessEnd::TimedOut),
            FailureClass::Timeout,
            format!("timed out in ccluster's `{step}` step"),
        ),
        GitError::Cancelled => (ended(ProcessEnd::Cancelled), class, "cancelled".into()),
    }
}

pub async fn run(job: Job, runner: Arc<dyn Runner>, stop: watch::Receiver<Stop>) -> JobResult {
    let steps = Steps::default();
    let mut result = attempt(job, runner, stop, &steps).await;
    result.steps = steps.times.into_inner().unwrap_or_else(|e| e.into_inner());
    result.merges = steps.merges.into_inner().unwrap_or_else(|e| e.into_inner());
    result
}

async fn attempt(
    job: Job,
    runner: Arc<dyn Runner>,
    stop: watch::Receiver<Stop>,
    steps: &Steps,
) -> JobResult {
    let mut record = ArtifactRecord {
        attempt: job.attempt,
        dir: job.artifact_dir.display().to_string(),
        ..ArtifactRecord::default()
    };
    let keep = job.workspace.is_some() || !job.artifacts.is_empty() || !job.reports.is_empty();
    let fail = |record: ArtifactRecord, process: ProcessResult, class, message: String| JobResult {
        process,
        failure: Some((class, message)),
        output: None,
        commit: None,
        artifacts: Some(record),
        usage: None,
        steps: Vec::new(),
        merges: None,
    };

    let Some(ws) = &job.workspace else {
        let mut result = run_command(&job, &runner, stop, steps).await;
        if keep {
            steps.time_sync("artifacts.collect", || {
                collect(&job, &job.root, &mut record)
            });
            result.artifacts = Some(record);
        }
        return result;
    };

    let limits = GitLimits::new(job.timeout, stop.clone());
    let git_fail = |record, error, class, context: &dyn Fn(String) -> String| {
        let (process, class, message) = git_failure(error, class, context);
        fail(record, process, class, message)
    };
    let copied = match steps
        .time(
            "workspace.create",
            workspace::create(ws, &job.copy_from, &limits),
        )
        .await
    {
        Ok(copied) => copied,
        Err(e) => {
            return git_fail(record, e, FailureClass::SetupError, &|e| {
                format!("cannot make the workspace: {e}")
            })
        }
    };
    record.worktree = Some(ws.path.display().to_string());
    // What resolving agents spent: it counts as the attempt's.
    let mut resolvers: Option<crate::agent::Usage> = None;
    let spent = |mut r: JobResult, resolvers: &Option<crate::agent::Usage>| {
        r.usage = crate::agent::Usage::plus(r.usage.take(), resolvers.as_ref());
        r
    };
    for (i, input) in ws.merge.iter().enumerate() {
        let merged = steps
            .time(
                "workspace.merge",
                workspace::merge_one(ws, input, &ws.merge[..i], &limits),
            )
            .await;
        let mut conflict = match merged {
            Ok(MergeStep::Merged) => {
                steps.merged(|m| m.clean += 1);
                continue;
            }
            Ok(MergeStep::Conflicted(c)) => {
                tracing::info!(
                    from = %input.node,
                    files = c.files.len(),
                    "merge conflict"
                );
                steps.merged(|m| {
                    m.conflicted += 1;
                    m.conflicted_files += c.files.len() as u32;
                });
                c
            }
            Err(e) => {
                return git_fail(record, e, FailureClass::SetupError, &|e| {
                    format!("cannot merge `{}`: {e}", input.node)
                })
            }
        };
        let Some(mut resolver) = job.resolve.clone() else {
            workspace::abort_merge(ws).await;
            let message = format!(
                "merging `{}` conflicts:\n{}",
                input.node,
                conflict.listing()
            );
            record.conflicts.push(conflict);
            return fail(record, no_process(), FailureClass::MergeConflict, message);
        };
        // The resolver sees the conflict listing in its environment and as a JSON file.
        let report = job.artifact_dir.join(format!("conflict.{}.json", i + 1));
        let _ = crate::store::create_private_dir_all(&job.artifact_dir);
        let _ = crate::store::write_private(
            &report,
            serde_json::to_vec_pretty(&conflict).unwrap_or_default(),
        );
        resolver.env.push((
            "CCLUSTER_CONFLICTS".into(),
            conflict
                .files
                .iter()
                .map(|f| f.path.as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        ));
        resolver.env.push((
            "CCLUSTER_CONFLICT_REPORT".into(),
            report.display().to_string(),
        ));
        // An agent resolver is told the listing in its prompt, in a session of its own for each
        // conflict (the CLI refuses a session id twice).
        if let Some(argv) = resolver.argv.as_mut() {
            if let Some(prompt) = resolver.stdin.as_mut() {
                let text = String::from_utf8_lossy(prompt);
                if text.contains("{{conflicts}}") {
                    *prompt = text
                        .replace("{{conflicts}}", &conflict.listing())
                        .into_bytes();
                }
            }
            if let Some(at) = argv.iter().position(|a| a == "--session-id") {
                if let Some(id) = argv.get_mut(at + 1) {
                    *id = crate::agent::new_session_id();
                }
            }
        }
        let command = resolver.command.clone();
        let left_by_merge = workspace::left_by_merge(ws, &conflict);
        let end = if resolver.argv.is_some() {
            // An agent: its stream-json gives what it spent.
            let (process, transcript) = steps
                .time(
                    "merge.resolve",
                    run_agent(resolver, &runner, stop.clone(), Default::default(), |_| {}),
                )
                .await;
            resolvers = crate::agent::Usage::plus(resolvers, transcript.usage().as_ref());
            process.end
        } else {
            steps
                .time("merge.resolve", runner.run(resolver, stop.clone()))
                .await
                .end
        };
        if end != ProcessEnd::Exited(0) {
            let message = format!(
                "merging `{}` conflicts, and the resolver `{command}` failed ({}):\n{}",
                input.node,
                end,
                conflict.listing()
            );
            record.conflicts.push(conflict);
            let process = ProcessResult {
                end: if end == ProcessEnd::Cancelled {
                    end
                } else {
                    ProcessEnd::Exited(0)
                },
                stdout: Vec::new(),
            };
            return spent(
                fail(record, process, FailureClass::MergeConflict, message),
                &resolvers,
            );
        }
        if let Err(e) = workspace::conclude_merge(ws, &conflict, &left_by_merge, &limits).await {
            let context = |e| format!("merging `{}` conflicts: {e}", input.node);
            record.conflicts.push(conflict);
            return spent(
                git_fail(record, e, FailureClass::MergeConflict, &context),
                &resolvers,
            );
        }
        conflict.resolved_by = Some(format!("run: {command}"));
        steps.merged(|m| m.resolved += 1);
        record.conflicts.push(conflict);
    }
    // A task's own changes are measured from where it starts working; a merge's from the run's
    // base, since merging is its work.
    let start = match job.process {
        None => ws.start.clone(),
        Some(_) => match workspace::head(ws, &limits).await {
            Ok(c) => c,
            Err(e) => {
                return spent(
                    git_fail(record, e, FailureClass::SetupError, &|e| e),
                    &resolvers,
                )
            }
        },
    };
    record.base = Some(start.clone());
    if let Some(setup) = job.setup.clone() {
        let command = setup.command.clone();
        let end = steps
            .time("setup", runner.run(setup, stop.clone()))
            .await
            .end;
        if end != ProcessEnd::Exited(0) {
            let process = ProcessResult {
                end: if end == ProcessEnd::Cancelled {
                    end.clone()
                } else {
                    ProcessEnd::Exited(0)
                },
                stdout: Vec::new(),
            };
            return spent(
                fail(
                    record,
                    process,
                    FailureClass::SetupError,
                    format!("setup `{command}` failed: {}", end),
                ),
                &resolvers,
            );
        }
    }
    let mut result = run_command(&job, &runner, stop, steps).await;
    let mut succeeded = result.failure.is_none() && result.output.is_some();
    if succeeded {
        // A change that holds a secret's value is never committed.
        let refused = match secret_in_changes(&ws.path, &start, &copied, &limits).await {
            Ok(leak) => leak.map(|message| (FailureClass::Policy, message)),
            Err(e) => {
                let (process, class, message) = git_failure(e, FailureClass::SetupError, |e| {
                    format!("cannot check the result for secrets: {e}")
                });
                if process.end != ProcessEnd::Exited(0) {
                    result.process.end = process.end;
                }
                Some((class, message))
            }
        };
        if let Some(failure) = refused {
            result.output = None;
            result.failure = Some(failure);
            succeeded = false;
        }
    }
    if succeeded {
        let published = steps
            .time("workspace.commit", async {
                let commit = workspace::commit_all(ws, &copied, &limits).await?;
                let (changed, patch) =
                    workspace::changes(&ws.path, &start, Some(&commit), &copied, &limits).await?;
                // `[policy]`: a change it refuses is not published, and its commit is undone (the
                // files stay in the kept worktree, for inspection).
                if let Some(violation) = ws
                    .policy
                    .as_ref()
                    .and_then(|p| policy_violation(p, &changed, &patch))
                {
                    workspace::undo_commits(&ws.path, &start, &limits).await?;
                    return Ok(Err(violation));
                }
                workspace::publish(ws, &commit, &limits).await?;
                Ok::<_, GitError>(Ok((commit, changed, patch)))
            })
            .await;
        match published {
            Ok(Err(violation)) => {
                result.output = None;
                result.failure = Some((FailureClass::Policy, violation));
                succeeded = false;
            }
            Ok(Ok((commit, changed, patch))) => {
                record.commit = Some(commit.clone());
                record.branch = Some(ws.task_ref.clone());
                record.changed = changed;
                save_patch(&job, &patch, &mut record);
                if job.process.is_none() {
                    // A git merge's output says where its result is. `branch` is the same ref,
                    // under the name clusterfiles used when every node had a branch.
                    result.output = Some(serde_json::json!({
                        "ref": ws.task_ref,
                        "branch": ws.task_ref,
                        "commit": commit,
                        "files_changed": record.changed.len(),
                    }));
                }
                result.commit = Some(commit);
            }
            Err(e) => {
                let (process, class, message) = git_failure(e, FailureClass::SetupError, |e| {
                    format!("cannot commit the result: {e}")
                });
                result.output = None;
                result.failure = Some((class, message));
                if process.end != ProcessEnd::Exited(0) {
                    result.process.end = process.end;
                }
                succeeded = false;
            }
        }
    }
    if !succeeded {
        // The kept worktree of a failed attempt holds no value either (what git ignores aside).
        let _ = secret_in_changes(&ws.path, &start, &copied, &GitLimits::none()).await;
        // What the failed attempt changed, for `ccluster artifacts`: a clean-up step, not bounded
        // by the attempt's limits (it runs no hooks).
        if let Ok((changed, patch)) =
            workspace::changes(&ws.path, &start, None, &copied, &GitLimits::none()).await
        {
            record.changed = changed;
            save_patch(&job, &patch, &mut record);
        }
    }
    steps.time_sync("artifacts.collect", || {
        collect(&job, &ws.path.clone(), &mut record)
    });
    if succeeded {
        // The work is in the run's ref: the checkout is no longer needed.
        workspace::remove(ws).await;
        record.worktree = None;
    }
    result.artifacts = Some(record);
    spent(result, &resolvers)
}

/// What `[policy]` says of a change: its files with their line counts and the lines it adds (from
/// the patch), checked; the first violation in words.
fn policy_violation(
    policy: &crate::policy::ChangePolicy,
    changed: &[workspace::ChangedFile],
    patch: &[u8],
) -> Option<String> {
    let text = String::from_utf8_lossy(patch);
    let mut added: std::collections::HashMap<&str, String> = std::collections::HashMap::new();
    let mut current: Option<&str> = None;
    for line in text.lines() {
        if let Some(path) = line.strip_prefix("+++ ") {
            current = path.strip_prefix("b/");
        } else if line.starts_with("diff --git ") {
            current = None;
        } else if let (Some(file), Some(rest)) = (current, line.strip_prefix('+')) {
            let entry = added.entry(file).or_default();
            entry.push_str(rest);
            entry.push('\n');
        }
    }
    let changes: Vec<crate::policy::Changed<'_>> = changed
        .iter()
        .map(|c| crate::policy::Changed {
            path: &c.path,
            added: c.added.unwrap_or(0),
            removed: c.removed.unwrap_or(0),
            added_text: added.get(c.path.as_str()).map_or("", String::as_str),
        })
        .collect();
    policy.violation(&changes)
}

/// Runs the task's command (or nothing, for a merge) and reads its output: a shell task's from
/// stdout, an agent's from its stream-json, read line by line as it arrives.
async fn run_command(
    job: &Job,
    runner: &Arc<dyn Runner>,
    stop: watch::Receiver<Stop>,
    steps: &Steps,
) -> JobResult {
    let mut result = JobResult {
        output: None,
        failure: None,
        commit: None,
        artifacts: None,
        usage: None,
        process: no_process(),
        steps: Vec::new(),
        merges: None,
    };
    let Some(spec) = job.process.clone() else {
        result.output = Some(Value::Null);
        return result;
    };
    let Some(agent) = &job.agent else {
        result.process = steps.time("runner.run", runner.run(spec, stop)).await;
        if result.process.end == ProcessEnd::Exited(0) {
            match shell_output(job.output, &String::from_utf8_lossy(&result.process.stdout)) {
                Ok(v) => result.output = Some(v),
                Err(e) => result.failure = Some((FailureClass::ExitCode, e)),
            }
        }
        return result;
    };
    let mut turns = AgentSpans::default();
    let agent_run = run_agent(spec, runner, stop, agent.prices.clone(), |p| {
        turns.progress(&p);
        let (kind, detail) = match p {
            crate::agent::Progress::Turn(n) => ("turn", n.to_string()),
            crate::agent::Progress::Tool { name, detail } => {
                ("tool", format!("{name} {detail}").trim_end().to_string())
            }
            crate::agent::Progress::Denied { tool, reason } => {
                ("denied", format!("{tool}: {reason}"))
            }
            crate::agent::Progress::Cost(usd) => ("cost", format!("{usd:.6}")),
            crate::agent::Progress::ApiRetry {
                attempt,
                status,
                error,
                delay_ms,
            } => (
                "api_retry",
                match delay_ms {
                    Some(ms) => format!("#{attempt} after {status} ({error}), again in {ms} ms"),
                    None => format!("#{attempt} after {status} ({error})"),
                },
            ),
        };
        let _ = agent.progress.send(super::Event::TaskProgress {
            run: agent.run.clone(),
            task: agent.node.clone(),
            attempt: job.attempt,
            kind: kind.into(),
            detail,
            time_ms: crate::store::now_ms(),
        });
    });
    let (process, transcript) = steps.time("runner.run", agent_run).await;

    // An attempt cut short still cost something: what the CLI had spent by then.
    let config_dir = job
        .process
        .as_ref()
        .and_then(|p| p.env.iter().find(|(k, _)| k == "CLAUDE_CONFIG_DIR"))
        .map(|(_, v)| std::path::PathBuf::from(v));
    result.usage = transcript.usage_so_far(config_dir.as_deref());
    match process.end {
        // ccluster's own verdicts stand: its watchdog, a cancel, a failed start.
        ProcessEnd::TimedOut
        | ProcessEnd::Cancelled
        | ProcessEnd::SpawnFailed(_)
        | ProcessEnd::Unstartable(_)
        | ProcessEnd::Failed(..) => {}
        ref end => match transcript.outcome(end, agent.wants_structured) {
            Ok(v) => result.output = Some(v),
            Err(failure) => result.failure = Some(failure),
        },
    }
    result.process = process;
    result
}

/// An agent's turns and tool calls as spans, from its stream-json: a turn lasts from its model
/// response to the next one (or the end), a tool call from the response that asks for it to the
/// next response, which comes once every call of the turn is answered.
#[derive(Default)]
struct AgentSpans {
    turn: Option<tracing::Span>,
    tools: Vec<tracing::Span>,
}

impl AgentSpans {
    fn progress(&mut self, p: &crate::agent::Progress) {
        use crate::agent::Progress;
        match p {
            Progress::Turn(n) => {
                self.tools.clear();
                self.turn = None;
                self.turn = Some(tracing::info_span!(
                    "agent.turn",
                    otel.name = "agent turn",
                    gen_ai.operation.name = "chat",
                    ccluster.turn = n,
                ));
            }
            Progress::Tool { name, detail } => {
                let parent = self.turn.clone().unwrap_or_else(tracing::Span::current);
                self.tools.push(tracing::info_span!(
                    parent: &parent,
                    "agent.tool",
                    otel.name = %format!("tool {name}"),
                    gen_ai.operation.name = "execute_tool",
                    gen_ai.tool.name = %name,
                    ccluster.tool.detail = %crate::secrets::redact_text(detail),
                ));
            }
            Progress::Denied { tool, reason } => {
                let parent = self.turn.clone().unwrap_or_else(tracing::Span::current);
                tracing::info!(
                    parent: &parent,
                    tool = %tool,
                    reason = %crate::secrets::redact_text(reason),
                    "tool denied"
                );
            }
            Progress::ApiRetry {
                attempt, status, ..
            } => {
                let parent = self.turn.clone().unwrap_or_else(tracing::Span::current);
                tracing::info!(parent: &parent, attempt, status = %status, "model API retry");
            }
            Progress::Cost(_) => {}
        }
    }
}

/// Runs a `claude` worker, reading its stream-json line by line as it arrives: each progress step
/// goes to `on_progress`, and the transcript (the result, the usage) comes back with the process.
async fn run_agent(
    mut spec: ProcessSpec,
    runner: &Arc<dyn Runner>,
    stop: watch::Receiver<Stop>,
    prices: std::sync::Arc<crate::agent::prices::Overrides>,
    mut on_progress: impl FnMut(crate::agent::Progress),
) -> (ProcessResult, crate::agent::Transcript) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    spec.lines = Some(tx);
    // Tool paths are shown relative to where the worker runs.
    let cwd = spec
        .cwd
        .display()
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let process = runner.run(spec, stop);
    let read = async {
        let mut transcript = crate::agent::Transcript::in_dir(cwd);
        transcript.prices = prices;
        while let Some(line) = rx.recv().await {
            for p in transcript.feed(&line) {
                on_progress(p);
            }
        }
        transcript
    };
    tokio::join!(process, read)
}

/// Looks for the run's secrets in the files a commit of the worktree would take. Each file that
/// holds one is masked in place (the kept worktree and its patch hold no value) and named, with
/// the secret's name, in the message; `None` when there is nothing to refuse.
async fn secret_in_changes(
    dir: &std::path::Path,
    start: &str,
    copied: &[String],
    limits: &workspace::GitLimits,
) -> Result<Option<String>, GitError> {
    let Some(redactor) = crate::secrets::active() else {
        return Ok(None);
    };
    let files = workspace::uncommitted_files(dir, start, copied, limits).await?;
    let mut found = Vec::new();
    for file in files {
        let path = dir.join(&file);
        // Regular files only: a link is committed as its target's name, not its content.
        let regular = std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file());
        let Some(file_read) = regular.then(|| std::fs::File::open(&path).ok()).flatten() else {
            continue;
        };
        if let Ok(Some(name)) = redactor.find_in(std::io::BufReader::new(file_read)) {
            found.push(format!("`{file}` holds the value of secret `{name}`"));
            crate::secrets::redact_file(&redactor, &path);
        }
    }
    if found.is_empty() {
        return Ok(None);
    }
    // Commits the task made on its own hold the value: the worktree no longer points at them.
    let undone = match workspace::undo_commits(dir, start, limits).await {
        Ok(()) => String::new(),
        Err(e) => format!(" (its own commits could not be undone: {e})"),
    };
    Ok(Some(format!(
        "{}: the change is not committed (the file is masked in the kept worktree){undone}",
        found.join("; ")
    )))
}

fn save_patch(job: &Job, patch: &[u8], record: &mut ArtifactRecord) {
    if patch.is_empty() {
        return;
    }
    let _ = crate::store::create_private_dir_all(&job.artifact_dir);
    let patch = match crate::secrets::active() {
        Some(r) => r.redact_bytes(patch).into_owned(),
        None => patch.to_vec(),
    };
    if crate::store::write_private(&job.artifact_dir.join("patch.diff"), &patch).is_ok() {
        record.patch = Some("patch.diff".into());
    }
}

/// Keeps the files matching `artifacts` and counts the reports matching `reports`.
fn collect(job: &Job, root: &std::path::Path, record: &mut ArtifactRecord) {
    // In a workspace, globs are relative to the clusterfile's directory, as everywhere else.
    let root = match &job.workspace {
        Some(ws) => ws
            .path
            .join(workspace::relative_to(&job.copy_from, &ws.repo)),
        None => root.to_path_buf(),
    };
    if !job.artifacts.is_empty() {
        let files = artifacts::matching(&root, &job.artifacts);
        if artifacts::copy_files(&root, &files, &job.artifact_dir.join("files")).is_ok() {
            record.files = files;
        }
    }
    if !job.reports.is_empty() {
        let files = artifacts::matching(&root, &job.reports);
        record.reports = artifacts::test_reports(&root, &files);
        let _ = artifacts::copy_files(&root, &files, &job.artifact_dir.join("files"));
    }
}
