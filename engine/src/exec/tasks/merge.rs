//! A git merge: no command of its own (the job merges its inputs into a worktree of the run's
//! base); on a conflict, what resolves it: the task's `merge.run` command, or a `claude` worker
//! (`on_conflict = "agent"`), both working in the conflicted worktree.

use std::time::Duration;

use super::agent::{rehearsal, worker_process};
use super::{Attempt, Commands};
use crate::exec::options::ApplyError;
use crate::exec::runner::ProcessSpec;
use crate::model::raw::OutputMode;
use crate::plan::PlannedAction;

/// What the agent that resolves a conflicted merge is told; `{{conflicts}}` becomes the listing.
const RESOLVER_PROMPT: &str = "A git merge is in progress in this repository and it conflicts. \
Conflicted files, with the tasks whose changes collide:\n{{conflicts}}\n\
Resolve every conflict so that the intent of both sides is kept, and remove every conflict \
marker (<<<<<<<, =======, >>>>>>>). Do not commit and do not abort the merge: ccluster checks \
the result and commits it.";

/// The merge's resolving process, if it has one.
pub(crate) fn commands(a: &Attempt) -> Result<Commands, ApplyError> {
    let plan = a.cx.plan;
    let resolve = match &plan.action {
        PlannedAction::Merge {
            agent: Some(settings),
            ..
        } => Some(resolver(a, settings, "resolve.")?),
        PlannedAction::Merge { resolve, .. } => resolve
            .as_ref()
            .map(|r| a.spec(r.clone(), "resolve.", a.ws_root.clone())),
        _ => None,
    };
    Ok(Commands::new(None, OutputMode::Text, resolve))
}

/// The agent that resolves a conflicted merge in the attempt's worktree (a merge task's, or a
/// task graph instance's start): the job puts the conflict listing into its prompt in place of
/// `{{conflicts}}`. `stream` prefixes its log files.
pub(crate) fn resolver(
    a: &Attempt,
    settings: &crate::model::workflow::AgentSettings,
    stream: &str,
) -> Result<ProcessSpec, ApplyError> {
    let (cx, plan) = (a.cx, a.cx.plan);
    let Some(agents) = cx.agents else {
        return Err(ApplyError::Internal(
            "agent resolver without a worker set-up".into(),
        ));
    };
    let dir = cx.paths.workers().join(format!("{}.resolve", a.file_name));
    let url = agents.server.as_ref().map(|s| s.url());
    let session = crate::agent::new_session_id();
    let worker = crate::agent::Worker {
        bin: &agents.bin,
        prompt: RESOLVER_PROMPT,
        settings,
        output_schema: None,
        session: &session,
        resume: None,
        resume_prompt: None,
        dir: &dir,
        timeout: plan.timeout_ms.map(Duration::from_millis),
        retry: &plan.retry,
        auth: &agents.auth,
        rehearsal: rehearsal(agents, url.as_deref(), &plan.id),
    };
    let mut s = worker_process(
        a,
        &worker,
        format!("claude -p <resolve the conflicts of {}>", plan.id),
        stream,
        a.ws_root.clone(),
    )?;
    s.env.extend(worker.env());
    Ok(s)
}
