//! The dispatcher: owns the run's state, decides what runs next (critical path first, under the
//! `--jobs` limit and each fan-out's `max_parallel`), and records every state change durably before
//! acting on it. Processes run on a [`Runner`]; the dispatcher never knows which. How an attempt
//! of each kind of task is made (its paths, workspace, command line, credentials) is the business
//! of [`super::tasks`], which is handed a [`TaskContext`].
//!
//! One loop, one `select!`: a process finished, a retry's backoff elapsed, or a signal arrived.
//! Writes of one loop turn are committed together (one fsync) before the turn's events are
//! reported and its processes started; tiny tasks' starts are committed ahead of a free slot.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use minijinja::value::Value as JinjaValue;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::context::{self, Read, RunScope, Upstream};
use super::dedup::{self, Dedup};
use super::events::{Event, EventSink};
use super::job::{self, Job, JobResult};
pub use super::options::{ApplyError, ApplyOptions};
use super::runner::{ProcessEnd, Runners, Stop};
use super::tasks::agent::{agents_for, Agents};
use super::tasks::{self, log_path, Prepared, RunPaths, TaskContext, WorkspaceInputs};
use crate::compile::Compiled;
use crate::model::raw::{FailureClass, MergeStrategy, OnItemFailure};
use crate::model::workflow::{upstream_reads, RetryPolicy};
use crate::plan::{PlannedAction, PlannedTask, WhenState};
use crate::store::{
    now_ms, AttemptRecord, CacheEntry, KeyParts, RunRecord, RunState, Store, StoreError,
    TaskRecord, TaskState,
};
use crate::workspace::{self, Input, Repo};

mod adapt;
mod graph;
mod interrupted;
mod traced;

pub(crate) use graph::graph_of;
use interrupted::{clean_interrupted, reap_orphans};
/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    pub run: String,
    pub state: RunState,
    pub succeeded: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
    pub cancelled: usize,
    /// The result task's branch, when it succeeded.
    pub result: Option<String>,
}

/// Refuses what this version cannot execute yet, before anything starts: a task on a runner
/// that was not made for the run, or an agent task on a container runner.
pub fn check_supported(compiled: &Compiled, runners: &Runners) -> Result<(), ApplyError> {
    for node in &compiled.plan.nodes {
        if !runners.has(&node.runner) {
            return Err(ApplyError::Unsupported(format!(
                "task `{}` uses runner `{}`, which this version cannot run",
                node.task, node.runner
            )));
        }
    }
    Ok(())
}

struct Node {
    /// Shared, so handing it around costs a reference count, not a copy.
    plan: Rc<PlannedTask>,
    group: usize,
    order: u64,
    record: TaskRecord,
    parts: Option<KeyParts>,
    attempt_started_ms: u64,
    /// The finished attempt's agent usage, until its record is written.
    usage: Option<crate::agent::Usage>,
    /// The last agent attempt's session and worker directory (for `retry.resume_session`).
    session: Option<(String, PathBuf)>,
    /// In a task graph: the instances this one runs after, those that run after it, and how
    /// many of the former have not settled yet.
    after: Vec<usize>,
    blocks: Vec<usize>,
    waiting: usize,
    /// The attempt running now continues an earlier one's session.
    resumed: bool,
    /// What the session has cost so far, as the CLI last reported it.
    session_cost: f64,
    /// Its spans, while open (see [`traced`]).
    spans: traced::NodeSpans,
}

/// A task of the workflow: its plan nodes (one, or a fan-out's instances) and its aggregate state.
struct Group {
    id: String,
    /// Its recent attempts' mean run time (a moving average): how far ahead its starts are armed.
    typical_run: Option<Duration>,
    mapped: bool,
    /// A map expression still to expand.
    dynamic: Option<String>,
    nodes: Vec<usize>,
    needs: Vec<usize>,
    ancestors: Vec<usize>,
    dependents: Vec<usize>,
    released: bool,
    /// Set once every node is terminal (or the fan-out failed fast).
    outcome: Option<TaskState>,
    running: u32,
    parked: Vec<usize>,
    max_parallel: Option<u32>,
    on_item_failure: OnItemFailure,
    min_success: Option<u32>,
    is_merge: bool,
    /// Leaves a commit per node: what dependents with a workspace build on.
    has_workspace: bool,
    /// Length of the longest chain of tasks from here to the end: ready work on long chains first.
    depth: u32,
    /// The task's first plan node: what a dynamic map's instances are made from.
    template: Option<PlannedTask>,
    /// Needs not settled yet: at zero the task is released.
    unsettled_needs: usize,
    /// Nodes that reached a terminal state.
    settled_nodes: usize,
    /// What templates of this task see as `tasks`, and the hash of its needs' results: both fixed
    /// once the task is released, so computed once for all its instances.
    upstream: Option<(JinjaValue, String)>,
    /// The `order` of this task's next record: its plan position, shifted, plus the instance.
    next_order: u64,
}

// One per loop turn and short-lived: boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Finished {
        node: usize,
        result: JobResult,
        elapsed: Duration,
    },
    RetryDue(usize),
}

struct Dispatcher<'a> {
    store: &'a Store,
    opts: &'a ApplyOptions,
    run: RunRecord,
    scope: RunScope,
    nodes: Vec<Node>,
    groups: Vec<Group>,
    ready: BinaryHeap<(u32, Reverse<u64>, usize)>,
    events: Vec<Event>,
    running: usize,
    /// Processes whose start is being committed: they hold a `--jobs` slot already.
    reserved: usize,
    /// Attempts whose start is durable, waiting for a `--jobs` slot: when a task ends, the next
    /// starts at once instead of after a sync (see [`Dispatcher::start_armed`]).
    armed: VecDeque<(usize, Job)>,
    /// All attempts' mean run time (a moving average): the estimate for a task none of whose
    /// attempts has ended yet.
    typical_run: Option<Duration>,
    timers: usize,
    stopping: Option<String>,
    cancelled: bool,
    /// Where the run keeps its logs, workers, worktrees and artifacts.
    paths: RunPaths,
    dirty: bool,
    last_snapshot: Option<Instant>,
    /// A commit happened since the last snapshot (which is throttled to [`SNAPSHOT_EVERY`]).
    snapshot_due: bool,
    /// Nodes whose record changed and is not committed yet.
    changed: Vec<usize>,
    /// Nodes whose changed record is committed but not yet in the live view.
    committed_changes: Vec<usize>,
    live_started: bool,
    /// The repository workspaces are made from, when a task has one.
    repo: Option<Repo>,
    /// The clusterfile's directory inside the repository.
    subdir: PathBuf,
    /// Branches of cached nodes, set together when the run ends.
    cached_refs: Vec<(String, String)>,
    /// What tasks read (files, trees), for their cache keys.
    fingerprints: super::fingerprint::Fingerprints,
    /// Reused results rewritten onto this run's base: (old base, commit) → commit.
    transplanted: HashMap<(String, String), String>,
    /// How agent workers run, when the plan has agent tasks.
    agents: Option<Agents>,
    /// Where tasks run (asked, before a first attempt, for work to adopt).
    runners: Runners,
    /// Progress of running agents, reported as it comes.
    progress: mpsc::UnboundedSender<Event>,
    progress_rx: Option<mpsc::UnboundedReceiver<Event>>,
    /// What the run's agents have spent so far (US dollars).
    spent_usd: f64,
    /// What running agent attempts have cost so far, priced as their responses stream.
    live_usd: HashMap<usize, f64>,
    /// Each running agent attempt's own stop: a run whose budget is crossed stops its agents,
    /// not its processes, and a task whose budget is crossed stops that agent alone. Whatever
    /// stops the run stops agents too.
    agent_stops: HashMap<usize, watch::Sender<Stop>>,
    /// How the run's agents have been told to stop (new agent attempts start told so).
    agents_stopped: Stop,
    /// Agents stopped for crossing their task's `max_budget_usd`: why, for their attempt's end.
    over_task_budget: HashMap<usize, String>,
    max_run_usd: Option<f64>,
    /// Node ids looked up so far (a cost event names its node by id).
    node_ids: HashMap<String, usize>,
    /// `live_usd` changed since `live-costs.json` was written.
    live_costs_changed: bool,
    /// `[policy]`: what a task's change may hold.
    change_policy: crate::policy::ChangePolicy,
    /// Which node of the run does each work, and which duplicates wait for it.
    dedup: Dedup,
    /// The run's secrets, resolved when it started; in memory only.
    secrets: crate::secrets::SecretValues,
    /// Declared runners with a `max_parallel`: their attempts running (or armed) and the nodes
    /// held back for a slot.
    runner_slots: HashMap<String, RunnerSlots>,
    /// With `--agents`: slots for processes (`--jobs`) and for agent attempts apart, since agents
    /// wait on the model rather than use CPUs. `None`: agents take `--jobs` slots too.
    kind_slots: Option<[RunnerSlots; 2]>,
    /// The agent slots' level as the API's rate limits allow (see [`adapt`]); `None` with
    /// `--no-adapt`, or when agents have no slots of their own.
    agent_level: Option<adapt::AgentLevel>,
    /// The wait the API last asked of each node's worker: a retry of a rate-limited attempt
    /// waits at least this long.
    asked_to_wait: HashMap<usize, Duration>,
    /// Agent attempts started whose worker has not said anything yet: a worker's start is
    /// CPU-bound, so only [`Dispatcher::boot_slots`] start at once (unless `--no-adapt`).
    booting: std::collections::HashSet<usize>,
    boot_slots: Option<usize>,
    /// The run's span: the root of its trace.
    run_span: tracing::Span,
}

/// A runner's `max_parallel`, as the dispatcher keeps it.
struct RunnerSlots {
    max: usize,
    running: usize,
    parked: Vec<usize>,
}

/// The places of [`Dispatcher::kind_slots`].
const PROCESS_SLOTS: usize = 0;
const AGENT_SLOTS: usize = 1;

const SNAPSHOT_EVERY: Duration = Duration::from_millis(500);

/// Tasks shorter than this (on average) get their starts committed ahead of a free slot: for them a
/// sync per start would cost as much as the task. Longer tasks start only as a slot frees.
const ARM_AHEAD_BELOW: Duration = Duration::from_millis(20);
/// At most this many batches of `--jobs` starts are committed ahead.
const MAX_ARM_DEPTH: usize = 8;
/// How long a commit may wait to gather more changes while every slot is busy and enough starts
/// are armed: it bounds how late an event is reported.
const COMMIT_HOLD: Duration = Duration::from_millis(10);

/// The live view of a running run, for `ccluster status` from another terminal.
pub const LIVE_FILE: &str = "live.jsonl";

/// Said by every task a run's spent budget stopped or kept from starting (the report finds it).
pub const RUN_BUDGET_SPENT: &str = "the run's agent budget is spent";

/// How soon a repeated stop signal counts as the same one (see `drive`).
const SIGNAL_ECHO: Duration = Duration::from_millis(100);

fn new_run_id() -> String {
    let now = now_ms();
    let secs = now / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    // Milliseconds keep ids in start order (one process drives a state at a time); the random
    // suffix keeps them unique across state directories.
    format!(
        "{year:04}{month:02}{day:02}-{:02}{:02}{:02}.{:03}-{:04x}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now % 1000,
        fastrand::u16(..)
    )
}

fn backoff_delay(policy: &RetryPolicy, failed_attempt: u32) -> Duration {
    let b = &policy.backoff;
    let exp = b
        .factor
        .powi(failed_attempt.saturating_sub(1).min(64) as i32);
    let base = (b.initial.as_secs_f64() * exp).min(b.max.as_secs_f64());
    let spread = 1.0 + b.jitter * (fastrand::f64() * 2.0 - 1.0);
    Duration::from_secs_f64((base * spread).max(0.0))
}

/// Who or what started a run, for lists of runs: `CCLUSTER_STARTED_BY` when set (`ccluster serve`
/// sets `server`), else the user, and the CI system when one is recognised.
fn started_by() -> String {
    if let Ok(by) = std::env::var("CCLUSTER_STARTED_BY") {
        if !by.trim().is_empty() {
            return by;
        }
    }
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()));
    let ci = [
        ("GITHUB_ACTIONS", "GitHub Actions"),
        ("GITLAB_CI", "GitLab CI"),
        ("BUILDKITE", "Buildkite"),
        ("CI", "CI"),
    ]
    .into_iter()
    .find(|(var, _)| std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "false"));
    match ci {
        Some((_, name)) => format!("{user} (cli, {name})"),
        None => format!("{user} (cli)"),
    }
}

/// Runs a compiled workflow to the end (or until cancelled), recording everything in `store`.
pub async fn apply(
    compiled: &Compiled,
    store: &Store,
    runners: Runners,
    opts: &ApplyOptions,
    sink: &mut dyn EventSink,
) -> Result<RunSummary, ApplyError> {
    check_supported(compiled, &runners)?;
    // Secrets are read before anything else happens: one that cannot be read stops the run
    // before it starts.
    let secrets = crate::secrets::resolve_declared(
        compiled
            .workflow
            .secrets
            .iter()
            .map(|(name, decl)| (name.as_str(), &decl.source)),
        &opts.workdir,
    )
    .map_err(ApplyError::Secret)?;
    // Workspaces need the repository and the commit they start from, before anything runs.
    let (repo, base) = if compiled.plan.nodes.iter().any(|n| n.workspace.is_some()) {
        let repo = Repo::discover(&opts.workdir).map_err(|e| {
            ApplyError::Workspace(format!(
                "tasks with a workspace need the clusterfile to be in a git repository: {e}"
            ))
        })?;
        let rev = compiled.workflow.base.as_deref().unwrap_or("HEAD");
        let base = repo
            .resolve(rev)
            .map_err(|e| ApplyError::Workspace(format!("cannot find the base of the run: {e}")))?;
        (Some(repo), Some(base))
    } else {
        (None, None)
    };
    let repo_root = repo.as_ref().map(|r| r.root.clone());
    // What killed runs left with the runners: work this run may adopt is kept, with its
    // workspace; the rest is removed.
    let state_dir = std::path::absolute(store.dir()).unwrap_or_else(|_| store.dir().into());
    let mut kept: Vec<PathBuf> = Vec::new();
    for runner in runners.all() {
        kept.extend(runner.recover(&state_dir).await);
    }
    // A run still marked running belongs to a process that died (we hold the lock). Its task
    // processes may have outlived it: stop them before their tasks run again.
    for mut old in store.runs()? {
        if old.state == RunState::Running {
            reap_orphans(&old.id);
            clean_interrupted(store, &old, &kept);
            let _ = std::fs::remove_file(store.dir().join("runs").join(&old.id).join(LIVE_FILE));
            old.state = RunState::Interrupted;
            store.put_run(&old)?;
        }
    }
    let agents = agents_for(compiled, opts).await?;
    // From here on, every value is masked in what the run writes, and so are the credentials
    // agents get.
    let mut masked = secrets.pairs().to_vec();
    if let Some(agents) = &agents {
        masked.extend(tasks::agent::credentials(agents));
    }
    masked.extend(crate::telemetry::agents::forwarded_secrets());
    crate::secrets::install(crate::secrets::Redactor::new(&masked));
    let id = new_run_id();
    let run_id = id.clone();
    let run = RunRecord {
        task_refs: Some(workspace::names::task_refs_prefix(&id)),
        id,
        workflow: compiled.plan.name.clone(),
        clusterfile: opts.clusterfile.clone(),
        state: RunState::Running,
        pid: std::process::id(),
        started_ms: now_ms(),
        finished_ms: None,
        // Secret inputs never reach the state: `retry` asks for them again.
        inputs: serde_json::to_value(compiled.workflow.redacted_inputs(&compiled.plan.inputs))
            .unwrap_or_default(),
        source: opts.source.clone(),
        repo: repo.as_ref().map(|r| r.root.display().to_string()),
        base,
        result: compiled.workflow.result.as_ref().map(|r| r.to_string()),
        keep_failed: compiled.workflow.keep_failed,
        rehearsed: opts.rehearse.is_some(),
        templates: opts.templates.clone(),
        started_by: Some(started_by()),
        policy: compiled
            .workflow
            .operator_policy
            .as_ref()
            .map(|p| crate::store::KeptPolicy {
                file: p.source.name.clone(),
                text: p.source.text.to_string(),
            }),
    };
    let paths = RunPaths::new(store.dir(), &run.id);
    crate::store::create_private_dir_all(&paths.logs).map_err(|source| ApplyError::Io {
        path: paths.logs.clone(),
        source,
    })?;
    store.put_run(&run)?;
    if let Some(server) = agents.as_ref().and_then(|a| a.server.as_ref()) {
        // What the scripted model was asked, for the curious and for tests.
        let _ = server.log_to(
            &store
                .dir()
                .join("runs")
                .join(&run.id)
                .join("rehearsal.jsonl"),
        );
    }

    let scope = RunScope::of(compiled);
    let (progress_tx, progress_rx) = mpsc::unbounded_channel();
    let runner_slots = compiled
        .workflow
        .runners
        .iter()
        .filter_map(|(name, decl)| {
            let max = decl.max_parallel? as usize;
            Some((
                name.clone(),
                RunnerSlots {
                    max: max.max(1),
                    running: 0,
                    parked: Vec::new(),
                },
            ))
        })
        .collect();
    let mut d = Dispatcher {
        store,
        opts,
        run,
        scope,
        nodes: Vec::new(),
        groups: Vec::new(),
        ready: BinaryHeap::new(),
        events: Vec::new(),
        running: 0,
        reserved: 0,
        armed: VecDeque::new(),
        typical_run: None,
        timers: 0,
        stopping: None,
        cancelled: false,
        paths,
        dirty: true,
        // The first snapshot comes after SNAPSHOT_EVERY: short runs never need one.
        last_snapshot: Some(Instant::now()),
        snapshot_due: false,
        changed: Vec::new(),
        committed_changes: Vec::new(),
        live_started: false,
        subdir: repo
            .as_ref()
            .map(|r| workspace::relative_to(&opts.workdir, &r.root))
            .unwrap_or_default(),
        repo,
        cached_refs: Vec::new(),
        fingerprints: super::fingerprint::Fingerprints::new(
            Path::new(&opts.clusterfile),
            &opts.workdir,
            store.dir(),
        ),
        transplanted: HashMap::new(),
        agents,
        runners: runners.clone(),
        progress: progress_tx,
        progress_rx: Some(progress_rx),
        spent_usd: 0.0,
        live_usd: HashMap::new(),
        agent_stops: HashMap::new(),
        agents_stopped: Stop::No,
        over_task_budget: HashMap::new(),
        max_run_usd: compiled.workflow.max_run_usd,
        node_ids: HashMap::new(),
        live_costs_changed: false,
        change_policy: compiled.workflow.policy.clone(),
        dedup: Dedup::default(),
        runner_slots,
        agent_level: (opts.agents > 0 && opts.adapt_agents)
            .then(|| adapt::AgentLevel::new(opts.agents)),
        asked_to_wait: HashMap::new(),
        booting: std::collections::HashSet::new(),
        // Two a CPU: each takes about a second of CPU before its first request, and many at once
        // only delay each other's (24 at once on 2 CPUs: 7.5 s to the first request).
        boot_slots: opts
            .adapt_agents
            .then(|| 2 * std::thread::available_parallelism().map_or(1, |n| n.get())),
        kind_slots: (opts.agents > 0).then(|| {
            [opts.jobs, opts.agents].map(|max| RunnerSlots {
                max: max.max(1),
                running: 0,
                parked: Vec::new(),
            })
        }),
        secrets,
        run_span: crate::telemetry::spans::run(&run_id, &compiled.plan.name),
    };
    d.build(compiled)?;
    crate::serve::graph::PlanGroups::of(&compiled.plan, compiled.workflow.max_run_usd)
        .write(&d.paths.run);
    // The live view exists from the start, so `status` and `cancel` see the run at once.
    d.snapshot();
    d.events.push(Event::RunStarted {
        run: d.run.id.clone(),
        workflow: d.run.workflow.clone(),
        nodes: d.nodes.len(),
        max_run_usd: d.max_run_usd,
        time_ms: now_ms(),
    });
    // Every event also goes to the run's event log, which `ccluster serve` streams.
    let mut sink = super::EventLog::new(&d.paths.run.join(super::EVENTS_FILE), sink);
    let secret_files = crate::secrets::files_root(&d.run.id);
    let run_span = d.run_span.clone();
    let summary = {
        use tracing::Instrument as _;
        d.drive(runners.clone(), &mut sink)
            .instrument(run_span.clone())
            .await
    };
    traced::run_ended(&run_span, &summary);
    drop(run_span);
    // Whatever an attempt left of its secret files goes with the run.
    let _ = std::fs::remove_dir_all(&secret_files);
    // Kept work nothing adopted is removed with its workspace (adopted work's was moved).
    for runner in runners.all() {
        runner.release().await;
    }
    if !kept.is_empty() {
        for dir in kept.iter().filter(|d| d.exists()) {
            let _ = std::fs::remove_dir_all(dir);
        }
        if let Some(repo) = &repo_root {
            let _ = workspace::git_sync(repo, &["worktree", "prune"]);
        }
    }
    summary
}

impl Dispatcher<'_> {
    fn build(&mut self, compiled: &Compiled) -> Result<(), ApplyError> {
        let wf = &compiled.workflow;
        let index = wf.task_index();
        // Only the upstream tasks a task's templates read go into its `tasks` value.
        let all_ancestors = upstream_reads(wf);
        let mut first_node: HashMap<&str, &PlannedTask> = HashMap::with_capacity(wf.tasks.len());
        // Each task's records sort by its place in the plan, a dynamic map's instances included
        // (they are made later, but belong where their placeholder is).
        let mut first_pos: HashMap<&str, u64> = HashMap::with_capacity(wf.tasks.len());
        for (pos, node) in compiled.plan.nodes.iter().enumerate() {
            first_node.entry(node.task.as_str()).or_insert(node);
            first_pos.entry(node.task.as_str()).or_insert(pos as u64);
        }
        for ((i, task), needs) in wf.tasks.iter().enumerate().zip(wf.need_indices()) {
            // A task mapped over an empty list has no plan node: it still takes part (it succeeds).
            let template = first_node.get(task.id.as_str()).map(|n| (*n).clone());
            self.groups.push(Group {
                id: task.id.to_string(),
                typical_run: None,
                mapped: task.is_mapped(),
                dynamic: template
                    .as_ref()
                    .and_then(|t| t.dynamic_map.as_ref())
                    .map(|m| m.expression.clone()),
                nodes: Vec::new(),
                unsettled_needs: needs.len(),
                needs,
                ancestors: all_ancestors[i].to_vec(),
                dependents: Vec::new(),
                released: false,
                outcome: None,
                running: 0,
                parked: Vec::new(),
                max_parallel: task.max_parallel,
                on_item_failure: task.on_item_failure,
                min_success: task.min_success,
                // A template instance waits like a merge: it runs unless all it needs was skipped.
                is_merge: matches!(
                    task.action,
                    crate::model::Action::Merge { .. } | crate::model::Action::Outputs { .. }
                ),
                has_workspace: task.has_workspace(),
                depth: 0,
                template,
                settled_nodes: 0,
                upstream: None,
                next_order: first_pos.get(task.id.as_str()).copied().unwrap_or(0) << 32,
            });
        }
        for g in 0..self.groups.len() {
            for n in self.groups[g].needs.clone() {
                self.groups[n].dependents.push(g);
            }
        }
        // Depth, from the last task of the plan's topological order back to the first.
        let mut seen = vec![false; self.groups.len()];
        let mut order = Vec::with_capacity(self.groups.len());
        for node in &compiled.plan.nodes {
            if let Some(&g) = index.get(node.task.as_str()) {
                if !std::mem::replace(&mut seen[g], true) {
                    order.push(g);
                }
            }
        }
        for &g in order.iter().rev() {
            let depth = self.groups[g]
                .dependents
                .iter()
                .map(|&d| self.groups[d].depth)
                .max()
                .unwrap_or(0)
                + 1;
            self.groups[g].depth = depth;
        }
        for node in &compiled.plan.nodes {
            if node.dynamic_map.is_some() {
                continue;
            }
            let g = index[node.task.as_str()];
            self.add_node(g, node.clone())?;
        }
        for g in 0..self.groups.len() {
            if self.groups[g]
                .nodes
                .iter()
                .any(|&n| !self.nodes[n].plan.after.is_empty())
            {
                self.link_graph(g);
            }
        }
        Ok(())
    }

    fn add_node(&mut self, group: usize, plan: PlannedTask) -> Result<usize, ApplyError> {
        let order = self.groups[group].next_order;
        self.groups[group].next_order += 1;
        let record = TaskRecord {
            after: plan.after.clone(),
            ..TaskRecord::pending(plan.id.clone(), plan.task.clone(), order)
        };
        // Pending nodes are not written: a node's record is first written when it starts or
        // settles, which halves the writes of a run (readers of a run in progress list the
        // others, pending, from its grouped plan: `serve::graph`).
        self.nodes.push(Node {
            plan: Rc::new(plan),
            group,
            order,
            record,
            parts: None,
            attempt_started_ms: 0,
            usage: None,
            session: None,
            resumed: false,
            session_cost: 0.0,
            spans: traced::NodeSpans::default(),
            after: Vec::new(),
            blocks: Vec::new(),
            waiting: 0,
        });
        let ix = self.nodes.len() - 1;
        self.groups[group].nodes.push(ix);
        Ok(ix)
    }

    fn save(&mut self, node: usize) -> Result<(), ApplyError> {
        self.store
            .put_task(&self.run.id, &self.nodes[node].record)?;
        self.dirty = true;
        self.changed.push(node);
        Ok(())
    }

    /// The `tasks` template value and the upstream hash of a released task (computed once).
    fn upstream(&mut self, group: usize) -> (JinjaValue, String) {
        if let Some(done) = &self.groups[group].upstream {
            return done.clone();
        }
        let value = self.upstream_now(group);
        self.groups[group].upstream = Some(value.clone());
        value
    }

    /// The `tasks` value and upstream hash of `group` as the records say now (not kept).
    fn upstream_now(&self, group: usize) -> (JinjaValue, String) {
        let outputs: BTreeMap<String, Upstream> = self.groups[group]
            .ancestors
            .iter()
            .map(|&a| {
                let g = &self.groups[a];
                let mut outputs = g
                    .nodes
                    .iter()
                    .map(|&n| self.nodes[n].record.output.clone().unwrap_or(Value::Null));
                let value = if g.mapped {
                    Upstream::Outputs(outputs.collect())
                } else {
                    Upstream::Output(outputs.next().unwrap_or(Value::Null))
                };
                (g.id.clone(), value)
            })
            .collect();
        let needed: Vec<(&str, &str, &Value)> = self.groups[group]
            .needs
            .iter()
            .flat_map(|&g| self.groups[g].nodes.iter())
            .map(|&n| {
                let r = &self.nodes[n].record;
                (
                    r.node.as_str(),
                    r.cache_key.as_deref().unwrap_or(""),
                    r.output.as_ref().unwrap_or(&Value::Null),
                )
            })
            .collect();
        (
            RunScope::tasks_value(&outputs),
            context::upstream_hash(&needed),
        )
    }

    /// Marks a node terminal without running it.
    fn settle(&mut self, node: usize, state: TaskState, message: String) -> Result<(), ApplyError> {
        let n = &mut self.nodes[node];
        n.record.state = state;
        n.record.message = Some(message.clone());
        n.record.finished_ms.get_or_insert(now_ms());
        let (run, task) = (self.run.id.clone(), n.plan.id.clone());
        self.events.push(match state {
            TaskState::Skipped => Event::TaskSkipped {
                run,
                task,
                reason: message,
                time_ms: now_ms(),
            },
            _ => Event::TaskCancelled {
                run,
                task,
                reason: message,
                time_ms: now_ms(),
            },
        });
        self.save(node)?;
        self.node_done(node)
    }

    /// All needs of `group` are settled: skip, cancel, expand or queue its nodes.
    fn release(&mut self, group: usize) -> Result<(), ApplyError> {
        if self.groups[group].released {
            return Ok(());
        }
        self.groups[group].released = true;
        let needs = self.groups[group].needs.clone();
        let failed = needs.iter().find(|&&n| {
            matches!(
                self.groups[n].outcome,
                Some(TaskState::Failed | TaskState::Cancelled)
            )
        });
        let skipped: Vec<usize> = needs
            .iter()
            .copied()
            .filter(|&n| self.groups[n].outcome == Some(TaskState::Skipped))
            .collect();
        let verdict = if let Some(&f) = failed {
            Some((
                TaskState::Cancelled,
                format!("not run: `{}` did not succeed", self.groups[f].id),
            ))
        } else if let Some(reason) = &self.stopping {
            Some((TaskState::Cancelled, reason.clone()))
        } else if !skipped.is_empty()
            && (!self.groups[group].is_merge || skipped.len() == needs.len())
        {
            Some((
                TaskState::Skipped,
                format!("skipped: `{}` was skipped", self.groups[skipped[0]].id),
            ))
        } else {
            None
        };
        if let Some(expression) = self.groups[group].dynamic.take() {
            match verdict {
                None => self.expand(group, &expression)?,
                Some(_) => {
                    // Nothing to expand: the placeholder `task[*]` takes the verdict, so the task
                    // still shows in the records.
                    if let Some(template) = self.groups[group].template.clone() {
                        self.add_node(group, template)?;
                    }
                }
            }
        }
        let nodes = self.groups[group].nodes.clone();
        if nodes.is_empty() {
            self.groups[group].outcome = Some(verdict.map_or(TaskState::Succeeded, |(s, _)| s));
            return self.group_done(group);
        }
        for node in nodes {
            // A map that could not be expanded has failed its placeholder already: each node
            // ends with exactly one terminal event.
            if self.nodes[node].record.state.is_terminal() {
                continue;
            }
            if let Some((state, message)) = &verdict {
                self.settle(node, *state, message.clone())?;
                continue;
            }
            // An instance of a graph starts when what it runs after has settled.
            if self.nodes[node].waiting == 0 {
                self.start_when_ready(group, node)?;
            }
        }
        Ok(())
    }

    /// A released node whose instances before it (in a graph) have succeeded: queued, or skipped
    /// when its `when` is false.
    fn start_when_ready(&mut self, group: usize, node: usize) -> Result<(), ApplyError> {
        {
            match self.nodes[node].plan.when.clone() {
                WhenState::Known {
                    value: false,
                    expression,
                } => {
                    self.settle(
                        node,
                        TaskState::Skipped,
                        format!("skipped: `when` is false ({expression})"),
                    )?;
                }
                WhenState::AtRunTime { expression } => {
                    let (tasks, _) = self.upstream(group);
                    let ctx = self.scope.context(&self.nodes[node].plan, &tasks, 1);
                    match self.scope.condition(&expression, &ctx) {
                        Ok(true) => self.enqueue(node),
                        Ok(false) => self.settle(
                            node,
                            TaskState::Skipped,
                            format!("skipped: `when` is false ({expression})"),
                        )?,
                        Err(e) => {
                            self.fail_without_attempt(node, format!("cannot evaluate `when`: {e}"))?
                        }
                    }
                }
                _ => self.enqueue(node),
            }
        }
        Ok(())
    }

    fn expand(&mut self, group: usize, expression: &str) -> Result<(), ApplyError> {
        let Some(template) = self.groups[group].template.clone() else {
            return Ok(());
        };
        let (tasks, _) = self.upstream(group);
        let ctx = self.scope.context(&template, &tasks, 1);
        let items = match self.scope.list(expression, &ctx) {
            Ok(items) => items,
            Err(e) => {
                // Keep one node to carry the failure in the records.
                let mut node = template.clone();
                node.dynamic_map = None;
                let ix = self.add_node(group, node)?;
                return self.fail_without_attempt(ix, format!("cannot expand `map`: {e}"));
            }
        };
        // A task graph: each instance's id and what it runs after, checked as a whole.
        let instances = match self.graph_of(&template, &items, &tasks) {
            Ok(instances) => instances,
            Err(message) => {
                let mut node = template.clone();
                node.dynamic_map = None;
                let ix = self.add_node(group, node)?;
                return self.fail_without_attempt(ix, message);
            }
        };
        // The expansion is checkpointed with the instances it creates.
        self.store
            .put_expansion(&self.run.id, &self.groups[group].id, &items)?;
        let id = self.groups[group].id.clone();
        for (i, item) in items.iter().enumerate() {
            let mut node = template.clone();
            node.id = format!("{id}[{i}]");
            node.index = Some(i);
            node.item = Some(item.clone());
            node.dynamic_map = None;
            if let Some(inst) = instances.as_ref().map(|all| &all[i]) {
                node.id = crate::plan::graph::node_id(&id, &inst.id);
                node.after = inst
                    .after
                    .iter()
                    .map(|a| crate::plan::graph::node_id(&id, a))
                    .collect();
                node.needs.extend(node.after.iter().cloned());
            }
            self.add_node(group, node)?;
        }
        if instances.is_some() {
            self.link_graph(group);
        }
        self.dirty = true;
        self.events.push(Event::MapExpanded {
            run: self.run.id.clone(),
            task: id.clone(),
            items: items.len(),
            graph: instances.as_ref().map(|all| {
                all.iter()
                    .map(|i| super::events::GraphInstance {
                        node: crate::plan::graph::node_id(&id, &i.id),
                        after: i
                            .after
                            .iter()
                            .map(|a| crate::plan::graph::node_id(&id, a))
                            .collect(),
                    })
                    .collect()
            }),
            time_ms: now_ms(),
        });
        // What `plan` could not know: do the instances say they will change the same paths?
        if !template.touches.is_empty() {
            let nodes = self.groups[group].nodes.clone();
            let touched: Vec<(String, Vec<String>)> = nodes
                .iter()
                .map(|&n| {
                    let plan = &self.nodes[n].plan;
                    let ctx = self.scope.context(plan, &tasks, 1);
                    (plan.id.clone(), self.scope.touches(plan, &ctx))
                })
                .collect();
            let touched: Vec<(&str, Vec<&str>)> = touched
                .iter()
                .map(|(n, paths)| (n.as_str(), paths.iter().map(String::as_str).collect()))
                .collect();
            for (a, b, what) in crate::plan::overlaps(&touched) {
                self.events.push(Event::Warning {
                    run: self.run.id.clone(),
                    task: id.clone(),
                    message: format!(
                        "instances `{a}` and `{b}` are told to change {what}: their branches may conflict when merged"
                    ),
                    time_ms: now_ms(),
                });
            }
        }
        Ok(())
    }

    fn enqueue(&mut self, node: usize) {
        let n = &mut self.nodes[node];
        n.spans.ready_since.get_or_insert_with(Instant::now);
        let n = &self.nodes[node];
        self.ready
            .push((self.groups[n.group].depth, Reverse(n.order), node));
    }

    fn fail_without_attempt(&mut self, node: usize, message: String) -> Result<(), ApplyError> {
        let n = &mut self.nodes[node];
        n.record.state = TaskState::Failed;
        n.record.message = Some(message.clone());
        n.record.finished_ms = Some(now_ms());
        self.events.push(Event::TaskFailed {
            run: self.run.id.clone(),
            task: n.plan.id.clone(),
            attempt: n.record.attempts,
            class: None,
            exit_code: None,
            message,
            duration_ms: None,
            facts: Default::default(),
            time_ms: now_ms(),
        });
        self.save(node)?;
        self.node_done(node)
    }

    /// A node became terminal: its group's count, then the duplicates that waited for it.
    fn node_done(&mut self, node: usize) -> Result<(), ApplyError> {
        self.task_span_ended(node);
        self.group_node_done(node)?;
        for duplicate in self.dedup.take_waiting(node) {
            if !self.nodes[duplicate].record.state.is_terminal() {
                self.take_outcome(duplicate, node)?;
            }
        }
        Ok(())
    }

    /// A node became terminal: settle its group when it was the last one, or fail it fast.
    fn group_node_done(&mut self, node: usize) -> Result<(), ApplyError> {
        let group = self.nodes[node].group;
        let state = self.nodes[node].record.state;
        // In a graph: what runs after this node starts once all it runs after succeeded, and is
        // skipped (and so, in turn, what runs after it) when one of them did not.
        for b in std::mem::take(&mut self.nodes[node].blocks) {
            if self.nodes[b].record.state.is_terminal() {
                continue;
            }
            self.nodes[b].waiting -= 1;
            if !state.is_success() {
                let reason = format!("skipped: `{}` did not succeed", self.nodes[node].plan.id);
                self.settle(b, TaskState::Skipped, reason)?;
            } else if self.nodes[b].waiting == 0 {
                self.start_when_ready(group, b)?;
            }
        }
        self.groups[group].settled_nodes += 1;
        let g = &self.groups[group];
        if g.outcome.is_some() {
            return Ok(());
        }
        if state == TaskState::Failed && g.on_item_failure == OnItemFailure::FailFast {
            // Fail fast: the task fails now; its instances not started yet will not start.
            self.groups[group].outcome = Some(TaskState::Failed);
            return self.group_done(group);
        }
        if g.settled_nodes < g.nodes.len() {
            return Ok(());
        }
        let states: Vec<TaskState> = g
            .nodes
            .iter()
            .map(|&n| self.nodes[n].record.state)
            .collect();
        let ok = states.iter().filter(|s| s.is_success()).count();
        let skipped = states.iter().filter(|s| **s == TaskState::Skipped).count();
        let cancelled = states.contains(&TaskState::Cancelled);
        let outcome = if skipped == states.len() {
            TaskState::Skipped
        } else if cancelled && !g.mapped {
            TaskState::Cancelled
        } else {
            let needed = g.min_success.map_or(states.len() - skipped, |m| m as usize);
            if ok >= needed {
                TaskState::Succeeded
            } else {
                TaskState::Failed
            }
        };
        self.groups[group].outcome = Some(outcome);
        self.group_done(group)
    }

    /// The run stops: nothing new starts, and tasks waiting for a retry are cancelled now rather
    /// than when their backoff ends.
    fn stop(&mut self, reason: String) -> Result<(), ApplyError> {
        if self.stopping.is_some() {
            return Ok(());
        }
        self.stopping = Some(reason.clone());
        let waiting: Vec<usize> = (0..self.nodes.len())
            .filter(|&n| self.nodes[n].record.state == TaskState::Retrying)
            .collect();
        self.timers = 0;
        for node in waiting {
            self.settle(node, TaskState::Cancelled, reason.clone())?;
        }
        Ok(())
    }

    fn group_done(&mut self, group: usize) -> Result<(), ApplyError> {
        if self.groups[group].outcome == Some(TaskState::Failed) && !self.opts.keep_going {
            self.stop(format!(
                "not run: the run is stopping because `{}` failed",
                self.groups[group].id
            ))?;
        }
        for d in self.groups[group].dependents.clone() {
            self.groups[d].unsettled_needs -= 1;
            if self.groups[d].unsettled_needs == 0 {
                self.release(d)?;
            }
        }
        Ok(())
    }

    /// How many batches of `--jobs` starts may be committed ahead of a free slot, when `node` is
    /// next: up to [`MAX_ARM_DEPTH`] for a shell task without workspace whose attempts are tiny
    /// (its own recent ones, else the run's); none for longer ones, before any attempt ended, or
    /// for agents and tasks with a workspace, which never take a millisecond.
    fn arm_depth(&self, node: usize) -> usize {
        let plan = &self.nodes[node].plan;
        if !matches!(plan.action, PlannedAction::Shell { .. }) || plan.workspace.is_some() {
            return 0;
        }
        let group = &self.groups[self.nodes[node].group];
        let Some(typical) = group.typical_run.or(self.typical_run) else {
            return 0;
        };
        let ratio = ARM_AHEAD_BELOW.as_secs_f64() / typical.as_secs_f64().max(1e-6);
        (ratio.round() as usize).min(MAX_ARM_DEPTH)
    }

    /// Whether this turn's writes must be committed now, rather than gathered with the next
    /// turns': a slot is free, or fewer than half the deepest arming's starts are left armed, or
    /// the run is stopping.
    fn commit_now(&self) -> bool {
        self.running < self.capacity()
            || self.armed.len() < MAX_ARM_DEPTH / 2 * self.capacity()
            || self.stopping.is_some()
    }

    /// Attempts running at once: `--jobs` processes, plus `--agents` agents when they have slots
    /// of their own.
    fn capacity(&self) -> usize {
        self.opts.jobs + self.kind_slots.as_ref().map_or(0, |s| s[AGENT_SLOTS].max)
    }

    /// Which of [`Dispatcher::kind_slots`] a node takes.
    pub(super) fn kind_of(&self, node: usize) -> usize {
        match self.nodes[node].plan.action {
            crate::plan::PlannedAction::Agent { .. } => AGENT_SLOTS,
            _ => PROCESS_SLOTS,
        }
    }

    /// Takes ready nodes while there is room, and prepares their attempts. Room is `--jobs`
    /// running plus, for a node of a task with tiny attempts, [`Dispatcher::arm_depth`] batches
    /// armed: their starts are committed ahead. Nodes are taken in order: the first that does not
    /// fit stops the taking.
    fn launch(&mut self, spawns: &mut Vec<(usize, Job)>) -> Result<(), ApplyError> {
        let mut parked = Vec::new();
        while self.stopping.is_none() {
            let Some(&(_, _, node)) = self.ready.peek() else {
                break;
            };
            let group = self.nodes[node].group;
            let taken = self.running + self.armed.len() + self.reserved + spawns.len();
            if taken >= (1 + self.arm_depth(node)) * self.capacity() {
                break;
            }
            self.ready.pop();
            if self.groups[group].outcome == Some(TaskState::Failed) {
                // Its fan-out failed fast (the run goes on under --keep-going): not started.
                let reason = format!("not run: `{}` failed fast", self.groups[group].id);
                self.settle(node, TaskState::Cancelled, reason)?;
                continue;
            }
            if let Some(max) = self.groups[group].max_parallel {
                if self.groups[group].running >= max {
                    parked.push(node);
                    continue;
                }
            }
            // The runner's `max_parallel` holds it back too, until one of its attempts ends.
            let plan = self.nodes[node].plan.clone();
            if let Some(slots) = self.runner_slots.get_mut(&plan.runner) {
                if slots.running >= slots.max {
                    slots.parked.push(node);
                    continue;
                }
            }
            // Processes and agents each within their own slots; no new agent while the API asks
            // its workers to wait.
            let kind = self.kind_of(node);
            let held = kind == AGENT_SLOTS
                && (self.agent_level.as_mut().is_some_and(|l| l.holding())
                    || self.boot_slots.is_some_and(|b| self.booting.len() >= b));
            if let Some(slots) = &mut self.kind_slots {
                if slots[kind].running >= slots[kind].max || held {
                    slots[kind].parked.push(node);
                    continue;
                }
            }
            if let Some(job) = self.prepare(node)? {
                self.groups[group].running += 1;
                if let Some(slots) = self.runner_slots.get_mut(&plan.runner) {
                    slots.running += 1;
                }
                if let Some(slots) = &mut self.kind_slots {
                    slots[kind].running += 1;
                }
                if kind == AGENT_SLOTS && self.boot_slots.is_some() {
                    self.booting.insert(node);
                }
                spawns.push((node, job));
            }
        }
        for node in parked {
            let group = self.nodes[node].group;
            self.groups[group].parked.push(node);
        }
        Ok(())
    }

    /// An attempt of `node` ended (or was refused): its runner's slot is free, and what its
    /// `max_parallel` held back goes back in the queue, in its order.
    fn free_runner_slot(&mut self, node: usize) {
        self.booting.remove(&node);
        let kind = self.kind_of(node);
        if let Some(slots) = &mut self.kind_slots {
            slots[kind].running = slots[kind].running.saturating_sub(1);
            for parked in std::mem::take(&mut slots[kind].parked) {
                self.enqueue(parked);
            }
        }
        let plan = self.nodes[node].plan.clone();
        let Some(slots) = self.runner_slots.get_mut(&plan.runner) else {
            return;
        };
        slots.running = slots.running.saturating_sub(1);
        for parked in std::mem::take(&mut slots.parked) {
            self.enqueue(parked);
        }
    }

    /// A reused result's commit on this run's base (see [`workspace::transplant`]); `None` when it
    /// cannot be moved, and then the node runs.
    fn rebased(
        &mut self,
        from_run: &str,
        commit: &str,
        run_base: &str,
    ) -> Result<Option<String>, ApplyError> {
        let Some(repo) = &self.repo else {
            return Ok(Some(commit.to_string()));
        };
        let Some(old_base) = self.store.run(from_run)?.and_then(|r| r.base) else {
            return Ok(Some(commit.to_string()));
        };
        let moved = workspace::transplant::Transplant::new(
            &repo.root,
            self.fingerprints.excluded(),
            &old_base,
            run_base,
            &mut self.transplanted,
        )
        .commit(commit);
        Ok(moved.ok())
    }

    /// The results a workspace node builds on: the commits of its needs that have a workspace, in
    /// `needs` order, instances in index order.
    fn inputs(&self, group: usize) -> Vec<Input> {
        self.groups[group]
            .needs
            .iter()
            .filter(|&&g| self.groups[g].has_workspace)
            .flat_map(|&g| self.groups[g].nodes.iter())
            .filter_map(|&n| {
                let r = &self.nodes[n].record;
                Some(Input {
                    node: r.node.clone(),
                    commit: r.commit.clone()?,
                })
            })
            .collect()
    }

    /// Renders a node's attempt and checks the cache; completes a node that runs no process.
    /// Returns the job to start, if any: preparing it is the task kind's (see [`tasks`]).
    fn prepare(&mut self, node: usize) -> Result<Option<Job>, ApplyError> {
        let group = self.nodes[node].group;
        let attempt = self.nodes[node].record.attempts + 1;
        // What its templates see as `tasks`, and the hash of its needs' results.
        let (seen, upstream_hash) = self.upstream(group);
        let plan = self.nodes[node].plan.clone();
        // Most plans are rendered at plan time: a context is only built for what is not.
        let deferred = has_deferred(&plan);
        let ctx = deferred.then(|| self.scope.context(&plan, &seen, attempt));
        let rendered = match self.scope.render(&plan, ctx.as_ref()) {
            Ok(r) => r,
            Err(e) => {
                self.fail_without_attempt(node, format!("cannot render {e}"))?;
                return Ok(None);
            }
        };
        let inputs = if plan.workspace.is_some() {
            self.inputs_of(node)
        } else {
            Vec::new()
        };
        let run_base = self.run.base.clone().unwrap_or_default();
        if attempt == 1
            && self.settle_from_cache(
                node,
                &plan,
                &seen,
                &upstream_hash,
                &rendered,
                &inputs,
                &run_base,
            )?
        {
            return Ok(None);
        }
        if let PlannedAction::Merge {
            strategy: MergeStrategy::Collect,
            ..
        } = plan.action
        {
            // A collect merge runs no process: it succeeds at once, with what its needs gave.
            let output = tasks::collect::output(
                self.groups[group]
                    .needs
                    .iter()
                    .flat_map(|&g| self.groups[g].nodes.iter())
                    .map(|&n| &self.nodes[n].record),
            );
            self.succeed_at_once(node, attempt, output, None)?;
            return Ok(None);
        }
        if let PlannedAction::Outputs { values, result } = &plan.action {
            // A template instance: its outputs from its tasks' results; its result's commit.
            let cx = self.task_context(node, &plan, &rendered, &seen, attempt, &inputs, &run_base);
            let values = tasks::outputs::values(&cx, values);
            let output = match values {
                Ok(output) => output,
                Err(message) => {
                    self.fail_without_attempt(node, message)?;
                    return Ok(None);
                }
            };
            let commit = result.as_ref().and_then(|r| {
                self.nodes
                    .iter()
                    .find(|n| n.plan.id == *r)
                    .and_then(|n| n.record.commit.clone())
            });
            if let Some(c) = &commit {
                let refs = self.refs_of(&plan.id);
                self.cached_refs
                    .extend(refs.into_iter().map(|r| (r, c.clone())));
            }
            self.succeed_at_once(node, attempt, output, commit)?;
            return Ok(None);
        }
        let is_agent = matches!(plan.action, PlannedAction::Agent { .. });
        if let Some(reason) = is_agent.then(|| self.budget_spent()).flatten() {
            self.stop(reason.clone())?;
            self.settle(node, TaskState::Cancelled, reason)?;
            return Ok(None);
        }
        let mut cx = self.task_context(node, &plan, &rendered, &seen, attempt, &inputs, &run_base);
        // A first attempt may take over the same work (same node, same cache key) that a killed
        // ccluster left with the runner, instead of doing it again.
        if attempt == 1
            && matches!(
                plan.action,
                PlannedAction::Shell { .. } | PlannedAction::Agent { .. }
            )
        {
            if let Some(key) = cx.cache_key {
                cx.adopted = self.runners.get(&plan.runner).adopt(&plan.id, key);
            }
        }
        let resumed = cx.resume.is_some();
        let prepared = tasks::prepare(&cx)?;
        let (job, session) = match prepared {
            Prepared::Job { job, session } => (job, session),
            Prepared::Refused(reason) => {
                self.fail_without_attempt(node, reason)?;
                return Ok(None);
            }
        };
        if let Some(session) = session {
            let n = &mut self.nodes[node];
            n.session = Some(session);
            n.resumed = resumed;
            if !resumed {
                // A new session: nothing of it has been counted yet.
                n.session_cost = 0.0;
            }
        }

        let now = now_ms();
        let n = &mut self.nodes[node];
        n.record.attempts = attempt;
        n.record.state = TaskState::Running;
        n.record.started_ms.get_or_insert(now);
        // The task record (running, attempt n) is the durable mark that attempt n may have
        // started; the attempt's own record is written when it ends. `task_started` is reported
        // when the process really starts (`start_armed`).
        n.attempt_started_ms = now;
        self.save(node)?;
        Ok(Some(job))
    }

    /// What a task kind is given to prepare the node's attempt: the dispatcher's state, read.
    #[allow(clippy::too_many_arguments)]
    fn task_context<'s>(
        &'s self,
        node: usize,
        plan: &'s PlannedTask,
        rendered: &'s context::Rendered,
        seen: &'s JinjaValue,
        attempt: u32,
        inputs: &'s [Input],
        run_base: &'s str,
    ) -> TaskContext<'s> {
        let n = &self.nodes[node];
        TaskContext {
            plan,
            rendered,
            attempt,
            scope: &self.scope,
            tasks: seen,
            run: &self.run,
            paths: &self.paths,
            workdir: &self.opts.workdir,
            cache_key: n.record.cache_key.as_deref(),
            grace: self.opts.grace,
            workspace: match (&self.repo, &plan.workspace) {
                (Some(repo), Some(_)) => Some(WorkspaceInputs {
                    repo,
                    subdir: &self.subdir,
                    inputs,
                    run_base,
                    result_branch: self.result_branch_of(&plan.id),
                    pool_size: self.capacity(),
                    policy: &self.change_policy,
                }),
                _ => None,
            },
            agents: self.agents.as_ref(),
            resume: tasks::agent::resume(plan, attempt, n.session.as_ref(), n.record.class),
            progress: &self.progress,
            adopted: None,
            feedback: (attempt > 1)
                .then(|| tasks::agent::feedback(n.record.class, n.record.message.as_deref()))
                .flatten(),
            secrets: &self.secrets,
        }
    }

    /// Computes a first attempt's cache key and settles the node from the cache when it can.
    /// Returns whether the node is settled (cached, or failed: what it reads cannot be read).
    #[allow(clippy::too_many_arguments)]
    fn settle_from_cache(
        &mut self,
        node: usize,
        plan: &PlannedTask,
        seen: &JinjaValue,
        upstream_hash: &str,
        rendered: &context::Rendered,
        inputs: &[Input],
        run_base: &str,
    ) -> Result<bool, ApplyError> {
        let first = if plan_reads_attempt(plan) {
            self.scope
                .render(plan, Some(&self.scope.context(plan, seen, 1)))
                .unwrap_or_else(|_| rendered.clone())
        } else {
            rendered.clone()
        };
        let read = if plan.workspace.is_some() {
            self.fingerprints.base(run_base, inputs).map(Read::Base)
        } else if matches!(
            plan.action,
            PlannedAction::Shell { .. } | PlannedAction::Agent { .. }
        ) {
            self.fingerprints
                .sources(plan.sources.as_deref())
                .map(Read::Sources)
        } else {
            Ok(Read::Sources(None))
        };
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                self.fail_without_attempt(node, format!("cannot fingerprint what it reads: {e}"))?;
                return Ok(true);
            }
        };
        let mut parts = context::key_parts(plan, &first, upstream_hash, &read);
        if self.opts.rehearse.is_some() && matches!(plan.action, PlannedAction::Agent { .. }) {
            parts.insert(
                "rehearsal".into(),
                tasks::agent::rehearsal_part(self.agents.as_ref(), &plan.id),
            );
        }
        let key = context::key_of(&parts);
        let work = dedup::work_key(plan, &parts);
        self.nodes[node].record.cache_key = Some(key.clone());
        self.nodes[node].parts = Some(parts);
        let forced = self
            .opts
            .rerun
            .iter()
            .any(|r| *r == plan.id || *r == plan.task);
        if self.opts.fresh || forced {
            return self.deduplicate(node, work, false);
        }
        let Some(mut hit) = self.store.cached(&key)? else {
            return self.deduplicate(node, work, true);
        };
        // A workspace result is only reusable while its commit exists, and on this
        // run's base: a clusterfile edit alone leaves its key, so its commit moves.
        let usable = match (&self.repo, &plan.workspace) {
            (Some(repo), Some(_)) => match hit.commit.as_deref().filter(|c| repo.has_commit(c)) {
                Some(c) => match self.rebased(&hit.run, c, run_base)? {
                    Some(moved) => {
                        hit.commit = Some(moved);
                        true
                    }
                    None => false,
                },
                None => false,
            },
            _ => true,
        };
        if !usable {
            return self.deduplicate(node, work, true);
        }
        // A cached node stands for its work in this run: its duplicates take its result.
        if let Some(work) = work {
            self.dedup.claim(work, node);
        }
        let refs = self.refs_of(&plan.id);
        let n = &mut self.nodes[node];
        n.record.state = TaskState::Cached;
        n.record.output = Some(hit.output);
        n.record.finished_ms = Some(now_ms());
        n.record.message = Some(format!("cached from run {} ({})", hit.run, hit.node));
        n.record.cached_from = Some(hit.run.clone());
        n.record.commit = hit.commit.clone();
        if let Some(commit) = hit.commit {
            self.cached_refs
                .extend(refs.into_iter().map(|r| (r, commit.clone())));
        }
        self.events.push(Event::TaskCached {
            run: self.run.id.clone(),
            task: plan.id.clone(),
            from_run: hit.run,
            time_ms: now_ms(),
        });
        self.save(node)?;
        self.node_done(node)?;
        Ok(true)
    }

    /// Deduplication inside the run (see [`dedup`]): whether `node` is settled or waiting because
    /// another node of the run does the same `work`. A node that may not read the cache
    /// (`--fresh`, `retry --task`) takes no result the original took from the cache: it runs.
    fn deduplicate(
        &mut self,
        node: usize,
        work: Option<String>,
        may_read_cache: bool,
    ) -> Result<bool, ApplyError> {
        let Some(original) = work.and_then(|w| self.dedup.claim(w, node)) else {
            return Ok(false);
        };
        let state = self.nodes[original].record.state;
        if state == TaskState::Cached && !may_read_cache {
            return Ok(false);
        }
        if state.is_terminal() {
            self.take_outcome(node, original)?;
        } else {
            // It waits without a slot; the original's end settles it (`node_done`).
            self.dedup.wait_for(original, node);
        }
        Ok(true)
    }

    /// `node` takes the outcome of `original`, which does the same work and has ended.
    fn take_outcome(&mut self, node: usize, original: usize) -> Result<(), ApplyError> {
        let source = self.nodes[original].record.clone();
        dedup::inherit(&mut self.nodes[node].record, &source);
        let (run, task, time_ms) = (
            self.run.id.clone(),
            self.nodes[node].plan.id.clone(),
            now_ms(),
        );
        let r = &self.nodes[node].record;
        let event = match r.state {
            state if state.is_success() => {
                // Its own refs name the same commit; set with the cached nodes' at the end.
                if let Some(commit) = r.commit.clone() {
                    let refs = self.refs_of(&task);
                    self.cached_refs
                        .extend(refs.into_iter().map(|r| (r, commit.clone())));
                }
                self.events.push(Event::TaskDeduplicated {
                    run,
                    task,
                    from_task: source.node,
                    time_ms,
                });
                return self.succeeded(node);
            }
            TaskState::Failed => Event::TaskFailed {
                run,
                task,
                attempt: 0,
                class: r.class,
                exit_code: r.exit_code,
                message: r.message.clone().unwrap_or_default(),
                duration_ms: None,
                facts: Default::default(),
                time_ms,
            },
            TaskState::Skipped => Event::TaskSkipped {
                run,
                task,
                reason: r.message.clone().unwrap_or_default(),
                time_ms,
            },
            _ => Event::TaskCancelled {
                run,
                task,
                reason: r.message.clone().unwrap_or_default(),
                time_ms,
            },
        };
        self.events.push(event);
        self.save(node)?;
        self.node_done(node)
    }

    /// Why an agent may not start now: the run's `max_run_usd` is spent.
    fn budget_spent(&self) -> Option<String> {
        let max = self.max_run_usd?;
        (self.spent_usd >= max).then(|| {
            format!(
                "not run: {RUN_BUDGET_SPENT} (${:.2} of `max_run_usd = {max}`)",
                self.spent_usd
            )
        })
    }

    /// Starts armed attempts (their starts are durable) while `--jobs` allows. One that may no
    /// longer start (the run is stopping, its fan-out failed fast, the agent budget is spent) is
    /// cancelled instead, its attempt given back: it is known never to have run.
    fn start_armed(
        &mut self,
        procs: &mut JoinSet<(usize, JobResult, Duration)>,
        runners: &Runners,
        stop: &watch::Receiver<Stop>,
        sink: &mut dyn EventSink,
    ) -> Result<(), ApplyError> {
        let mut started = false;
        while self.running < self.capacity() || self.stopping.is_some() {
            let Some((node, job)) = self.armed.pop_front() else {
                break;
            };
            let group = self.nodes[node].group;
            let budget = match (&self.stopping, &job.agent) {
                (None, Some(_)) => self.budget_spent(),
                _ => None,
            };
            let refused = if let Some(reason) = self.stopping.clone() {
                Some(reason)
            } else if self.groups[group].outcome == Some(TaskState::Failed) {
                Some(format!("not run: `{}` failed fast", self.groups[group].id))
            } else {
                budget.clone()
            };
            if let Some(reason) = refused {
                self.groups[group].running -= 1;
                self.free_runner_slot(node);
                let r = &mut self.nodes[node].record;
                r.attempts -= 1;
                if r.attempts == 0 {
                    r.started_ms = None;
                }
                if budget.is_some() {
                    self.stop(reason.clone())?;
                }
                self.settle(node, TaskState::Cancelled, reason)?;
                continue;
            }
            let now = now_ms();
            let runner = runners.get(&self.nodes[node].plan.runner).clone();
            let n = &mut self.nodes[node];
            n.attempt_started_ms = now;
            let queued = n.spans.ready_since.take().map(|t| t.elapsed());
            sink.emit(&Event::TaskStarted {
                run: self.run.id.clone(),
                task: n.plan.id.clone(),
                attempt: n.record.attempts,
                kind: Some(n.plan.action.kind().to_string()),
                runner: Some(runner.kind().to_string()),
                queued_ms: queued.map(|q| q.as_millis() as u64),
                time_ms: now,
            });
            started = true;
            self.running += 1;
            let (job, span) = self.attempt_span(node, job);
            let stop = if job.agent.is_some() {
                let (tx, rx) = watch::channel(self.agents_stopped);
                self.agent_stops.insert(node, tx);
                rx
            } else {
                stop.clone()
            };
            let fut = tracing::Instrument::instrument(job::run(job, runner, stop), span);
            let t0 = Instant::now();
            procs.spawn(async move { (node, fut.await, t0.elapsed()) });
        }
        if started {
            sink.flush();
        }
        Ok(())
    }

    /// A node that runs no process (a collect merge, a template instance's outputs) succeeds as
    /// soon as it is ready.
    fn succeed_at_once(
        &mut self,
        node: usize,
        attempt: u32,
        output: Value,
        commit: Option<String>,
    ) -> Result<(), ApplyError> {
        let now = now_ms();
        let n = &mut self.nodes[node];
        n.record.attempts = attempt;
        n.record.started_ms = Some(now);
        n.record.finished_ms = Some(now);
        n.record.state = TaskState::Succeeded;
        n.record.output = Some(output);
        n.record.commit = commit;
        self.events.push(Event::TaskSucceeded {
            run: self.run.id.clone(),
            task: n.plan.id.clone(),
            attempt,
            duration_ms: 0,
            facts: Default::default(),
            time_ms: now,
        });
        self.succeeded(node)
    }

    /// The result branch (`refs/heads/ccluster/<run>/<node>`) when `node` is the run's result.
    fn result_branch_of(&self, node: &str) -> Option<String> {
        self.run
            .result_branch()
            .filter(|_| self.run.result.as_deref() == Some(node))
    }

    /// The refs a plan node's commit is published as: its ref of the run
    /// (`refs/ccluster/runs/<run>/edit/2`), and the result branch for the run's result.
    fn refs_of(&self, node: &str) -> Vec<String> {
        let mut refs = vec![self.run.task_ref(node)];
        refs.extend(self.result_branch_of(node));
        refs
    }

    /// Records a success: the task, the cache entry and the key parts for `plan --explain`.
    fn succeeded(&mut self, node: usize) -> Result<(), ApplyError> {
        let n = &self.nodes[node];
        if let (Some(key), Some(output)) = (&n.record.cache_key, &n.record.output) {
            self.store.put_cache(
                key,
                &CacheEntry {
                    run: self.run.id.clone(),
                    node: n.plan.id.clone(),
                    output: output.clone(),
                    finished_ms: now_ms(),
                    commit: n.record.commit.clone(),
                },
            )?;
        }
        if let Some(parts) = &n.parts {
            self.store
                .put_last_success(&self.opts.clusterfile, &n.plan.id, parts)?;
            // What its sources were, so `plan --explain` can later name the files that changed.
            if let Some(manifest) = parts
                .get("sources")
                .and_then(|id| Some((id, self.fingerprints.manifest_to_record(id)?)))
            {
                self.store.put_sources(manifest.0, &manifest.1)?;
            }
        }
        self.save(node)?;
        self.node_done(node)
    }
    fn finished(
        &mut self,
        node: usize,
        mut result: JobResult,
        elapsed: Duration,
        retry_tx: &mpsc::UnboundedSender<usize>,
    ) -> Result<(), ApplyError> {
        let end = result.process.end.clone();
        let mut facts = traced::facts_of(&result);
        // An output is masked before anything reads it: the tasks downstream see what a cached
        // result would give them, and their keys match it.
        if let (Some(redactor), Some(output)) = (crate::secrets::active(), result.output.as_mut()) {
            redactor.redact_json(output);
        }
        // A planner's graph is checked before its success is: a bad one fails the attempt.
        if result.failure.is_none() && end == ProcessEnd::Exited(0) {
            let output = result.output.clone().unwrap_or(Value::Null);
            if let Some(message) = self.graph_problems(node, &output) {
                result.failure = Some((FailureClass::PlanInvalid, message));
            }
        }
        let group = self.nodes[node].group;
        self.groups[group].running -= 1;
        self.free_runner_slot(node);
        self.agent_ended(node, result.failure.as_ref().map(|(class, _)| *class));
        let average = |typical: Option<Duration>| {
            Some(typical.map_or(elapsed, |t| t.mul_f64(0.8) + elapsed.mul_f64(0.2)))
        };
        self.groups[group].typical_run = average(self.groups[group].typical_run);
        self.typical_run = average(self.typical_run);
        // Instances held back by `max_parallel` go back in the queue, in their order.
        for parked in std::mem::take(&mut self.groups[group].parked) {
            self.enqueue(parked);
        }
        let plan = self.nodes[node].plan.clone();
        let attempt = self.nodes[node].record.attempts;
        if let Some(record) = &result.artifacts {
            self.store.put_artifacts(&self.run.id, &plan.id, record)?;
        }
        tasks::agent::forget_credentials(
            self.agents.as_ref(),
            &self.paths,
            &plan.id,
            attempt,
            self.nodes[node]
                .session
                .as_ref()
                .map(|(_, dir)| dir.as_path()),
        );
        let mut usage = result.usage.clone();
        if let Some(u) = usage.as_mut() {
            // A resumed session reports its whole cost so far: count only this attempt's part.
            let before = std::mem::replace(&mut self.nodes[node].session_cost, u.cost_usd);
            if self.nodes[node].resumed {
                u.cost_usd = (u.cost_usd - before).max(0.0);
            }
        }
        self.live_costs_changed |= self.live_usd.remove(&node).is_some();
        self.agent_stops.remove(&node);
        let over_budget = self.over_task_budget.remove(&node);
        if let Some(u) = &usage {
            self.spent_usd += u.cost_usd;
            let r = &mut self.nodes[node].record;
            r.cost_usd = Some(r.cost_usd.unwrap_or(0.0) + u.cost_usd);
            r.tokens = Some(r.tokens.unwrap_or(0) + u.tokens());
            if u.denials > 0 {
                r.denials = Some(r.denials.unwrap_or(0) + u.denials);
            }
        }
        if let (Some(u), Some(f)) = (&usage, facts.usage.as_mut()) {
            // This attempt's part of a resumed session's cost.
            f.cost_usd = u.cost_usd;
        }
        self.nodes[node].usage = usage;
        let duration_ms = elapsed.as_millis() as u64;
        let (class, exit_code, signal, message) = match (&result.failure, &end) {
            // Stopped by ccluster for its task's budget (the CLI may have ended it first, by
            // the same budget: then it says so itself, below).
            (_, ProcessEnd::Cancelled) if over_budget.is_some() => (
                Some(FailureClass::Budget),
                None,
                None,
                over_budget.unwrap_or_default(),
            ),
            (_, ProcessEnd::Cancelled) => (None, None, None, "cancelled".to_string()),
            (Some((class, message)), end) => (
                Some(*class),
                match end {
                    // A failure before or after the command (workspace, merge) has no exit code.
                    ProcessEnd::Exited(c)
                        if plan_has_process(&plan)
                            && !matches!(
                                class,
                                FailureClass::SetupError
                                    | FailureClass::MergeConflict
                                    | FailureClass::PlanInvalid
                            ) =>
                    {
                        Some(*c)
                    }
                    _ => None,
                },
                None,
                message.clone(),
            ),
            (None, ProcessEnd::Exited(0)) => {
                self.record_attempt(node, attempt, true, None, Some(0), None, None)?;
                let n = &mut self.nodes[node];
                n.record.state = TaskState::Succeeded;
                n.record.exit_code = plan_has_process(&plan).then_some(0);
                n.record.class = None;
                n.record.output = Some(result.output.unwrap_or(Value::Null));
                n.record.commit = result.commit;
                n.record.finished_ms = Some(now_ms());
                n.record.message = None;
                self.attempt_span_ended(node, "succeeded", None, None, &facts);
                self.events.push(Event::TaskSucceeded {
                    run: self.run.id.clone(),
                    task: plan.id.clone(),
                    attempt,
                    duration_ms,
                    facts,
                    time_ms: now_ms(),
                });
                return self.succeeded(node);
            }
            (None, ProcessEnd::Exited(code)) => (
                Some(FailureClass::ExitCode),
                Some(*code),
                None,
                end.to_string(),
            ),
            (None, ProcessEnd::Signaled(sig)) => (
                Some(FailureClass::Signal),
                None,
                Some(*sig),
                end.to_string(),
            ),
            (None, ProcessEnd::TimedOut) => (
                Some(FailureClass::Timeout),
                None,
                None,
                format!(
                    "timed out after {}",
                    humantime::format_duration(Duration::from_millis(plan.timeout_ms.unwrap_or(0)))
                ),
            ),
            (None, ProcessEnd::SpawnFailed(e) | ProcessEnd::Unstartable(e)) => {
                (Some(FailureClass::SpawnError), None, None, e.clone())
            }
            (None, ProcessEnd::OutOfMemory) => {
                (Some(FailureClass::Oom), None, None, end.to_string())
            }
            (None, ProcessEnd::Failed(class, message)) => {
                (Some(*class), None, None, message.clone())
            }
        };
        self.record_attempt(
            node,
            attempt,
            false,
            class,
            exit_code,
            signal,
            Some(message.clone()),
        )?;
        let n = &mut self.nodes[node];
        n.record.exit_code = exit_code;
        n.record.class = class;
        n.record.message = Some(message.clone());
        let Some(class) = class else {
            self.attempt_span_ended(node, "cancelled", None, Some(&message), &facts);
            let n = &mut self.nodes[node];
            // Stopped while it ran: by a cancel, or by the run's spent budget.
            let reason = match &self.stopping {
                Some(r) if r.starts_with("stopped:") => r.clone(),
                _ => "stopped: the run was cancelled".to_string(),
            };
            n.record.state = TaskState::Cancelled;
            n.record.finished_ms = Some(now_ms());
            n.record.message = Some(reason.clone());
            self.events.push(Event::TaskCancelled {
                run: self.run.id.clone(),
                task: plan.id.clone(),
                reason,
                time_ms: now_ms(),
            });
            self.save(node)?;
            return self.node_done(node);
        };
        let retry = &plan.retry;
        // A command too large for the system is refused the same way every time.
        let retryable = !matches!(end, ProcessEnd::Unstartable(_));
        if attempt <= retry.limit
            && retry.on.contains(&class)
            && retryable
            && self.stopping.is_none()
        {
            let mut delay = backoff_delay(retry, attempt);
            // A worker the API told to wait is not sent back sooner.
            if matches!(class, FailureClass::RateLimit | FailureClass::Overloaded) {
                if let Some(asked) = self.asked_to_wait.get(&node) {
                    delay = delay.max(*asked);
                }
            }
            self.attempt_span_ended(node, "retried", Some(class), Some(&message), &facts);
            let n = &mut self.nodes[node];
            n.record.state = TaskState::Retrying;
            self.events.push(Event::TaskRetrying {
                run: self.run.id.clone(),
                task: plan.id.clone(),
                attempt,
                class,
                delay_ms: delay.as_millis() as u64,
                message,
                duration_ms: Some(duration_ms),
                facts,
                time_ms: now_ms(),
            });
            self.save(node)?;
            self.timers += 1;
            let tx = retry_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(node);
            });
            return Ok(());
        }
        n.record.state = TaskState::Failed;
        n.record.finished_ms = Some(now_ms());
        self.attempt_span_ended(node, "failed", Some(class), Some(&message), &facts);
        self.events.push(Event::TaskFailed {
            run: self.run.id.clone(),
            task: plan.id.clone(),
            attempt,
            class: Some(class),
            exit_code,
            message,
            duration_ms: Some(duration_ms),
            facts,
            time_ms: now_ms(),
        });
        self.save(node)?;
        self.node_done(node)
    }

    #[allow(clippy::too_many_arguments)]
    fn record_attempt(
        &mut self,
        node: usize,
        attempt: u32,
        succeeded: bool,
        class: Option<FailureClass>,
        exit_code: Option<i32>,
        signal: Option<i32>,
        message: Option<String>,
    ) -> Result<(), ApplyError> {
        let usage = self.nodes[node].usage.take();
        let id = &self.nodes[node].plan.id;
        self.store.put_attempt(
            &self.run.id,
            id,
            &AttemptRecord {
                attempt,
                started_ms: self.nodes[node].attempt_started_ms,
                finished_ms: now_ms(),
                succeeded,
                class,
                exit_code,
                signal,
                message,
                stdout: log_path(&self.paths.logs, id, attempt, "out")
                    .display()
                    .to_string(),
                stderr: log_path(&self.paths.logs, id, attempt, "err")
                    .display()
                    .to_string(),
                usage,
            },
        )?;
        Ok(())
    }

    /// Commits this turn's writes, then reports its events (never the other way round).
    fn commit(&mut self, sink: &mut dyn EventSink) -> Result<(), ApplyError> {
        if self.dirty {
            self.store.commit()?;
            self.dirty = false;
        }
        for event in self.events.drain(..) {
            sink.emit(&event);
        }
        sink.flush();
        Ok(())
    }

    /// The live view of the run, for `ccluster status` from another terminal (the database is
    /// locked while a run is driven). Appends the records that changed since the last call to `runs/<run>/live.jsonl` (the run
    /// record first, then task records; the last line of a node wins). Written after a commit, so
    /// never ahead of the durable state; appending keeps it cheap for 10,000-task runs.
    fn snapshot(&mut self) {
        use std::io::Write;
        self.last_snapshot = Some(Instant::now());
        self.snapshot_due = false;
        let path = self
            .store
            .dir()
            .join("runs")
            .join(&self.run.id)
            .join(LIVE_FILE);
        let mut out = Vec::new();
        if !self.live_started {
            self.live_started = true;
            out.extend(crate::secrets::json_bytes(&self.run).unwrap_or_default());
            out.push(b'\n');
        }
        let mut changed = std::mem::take(&mut self.committed_changes);
        changed.sort_unstable();
        changed.dedup();
        for node in changed {
            out.extend(crate::secrets::json_bytes(&self.nodes[node].record).unwrap_or_default());
            out.push(b'\n');
        }
        let file = crate::store::private_file()
            .create(true)
            .append(true)
            .open(&path);
        if let Ok(mut file) = file {
            let _ = file.write_all(&out);
        }
        if std::mem::take(&mut self.live_costs_changed) {
            self.write_live_costs();
        }
    }

    /// What running agents have cost so far, for `status` and `serve` (replaced whole, so a
    /// reader never sees half of it; informational, not part of the run's state).
    fn write_live_costs(&self) {
        let dir = self.store.dir().join("runs").join(&self.run.id);
        let costs: std::collections::BTreeMap<&str, f64> = self
            .live_usd
            .iter()
            .map(|(node, usd)| (self.nodes[*node].plan.id.as_str(), *usd))
            .collect();
        let tmp = dir.join(format!("{}.tmp", crate::store::LIVE_COSTS_FILE));
        if std::fs::write(&tmp, serde_json::to_vec(&costs).unwrap_or_default()).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(crate::store::LIVE_COSTS_FILE));
        }
    }

    /// The node named `id`.
    fn node_named(&mut self, id: &str) -> Option<usize> {
        if let Some(&node) = self.node_ids.get(id) {
            return Some(node);
        }
        let node = self.nodes.iter().position(|n| n.plan.id == id)?;
        self.node_ids.insert(id.to_string(), node);
        Some(node)
    }

    async fn drive(
        mut self,
        runners: Runners,
        sink: &mut dyn EventSink,
    ) -> Result<RunSummary, ApplyError> {
        let started = Instant::now();
        let (stop_tx, stop_rx) = watch::channel(Stop::No);
        let (retry_tx, mut retry_rx) = mpsc::unbounded_channel::<usize>();
        let mut procs: JoinSet<(usize, JobResult, Duration)> = JoinSet::new();
        // SIGHUP (the terminal closed) and SIGQUIT stop the run as SIGINT and SIGTERM do, rather
        // than killing ccluster with its tasks left running.
        let listen = |kind: tokio::signal::unix::SignalKind, name: &str| {
            tokio::signal::unix::signal(kind).map_err(|source| ApplyError::Io {
                path: PathBuf::from(name),
                source,
            })
        };
        use tokio::signal::unix::SignalKind;
        let mut interrupt = listen(SignalKind::interrupt(), "SIGINT")?;
        let mut terminate = listen(SignalKind::terminate(), "SIGTERM")?;
        let mut hangup = listen(SignalKind::hangup(), "SIGHUP")?;
        let mut quit = listen(SignalKind::quit(), "SIGQUIT")?;
        // A signal sent to ccluster's whole process group reaches it twice: directly, and
        // forwarded by its supervisor (the process the shell started). The copy that follows
        // within `SIGNAL_ECHO` is the same request, not a second Ctrl-C.
        let mut last_signal: Option<Instant> = None;
        let mut signalled = |this: &mut Self| -> Result<(), ApplyError> {
            if last_signal.is_some_and(|t| t.elapsed() < SIGNAL_ECHO) {
                return Ok(());
            }
            last_signal = Some(Instant::now());
            this.cancel(&stop_tx)
        };

        for g in 0..self.groups.len() {
            if self.groups[g].needs.is_empty() {
                self.release(g)?;
            }
        }
        // Group commit, pipelined: this turn's writes (attempts started, results) are synced on a
        // blocking thread while the loop goes on collecting the next turn's; a batch's events are
        // reported and its processes armed only once its sync is done. Armed attempts wait for a
        // slot; for tiny tasks several batches are armed ahead (`arm_depth`), so a slot that frees
        // is filled without waiting for a sync.
        let mut staged: Vec<(usize, Job)> = Vec::new();
        let mut committing: (Vec<Event>, Vec<(usize, Job)>) = (Vec::new(), Vec::new());
        let mut flush: Option<tokio::task::JoinHandle<Result<(), StoreError>>> = None;
        let mut committing_changed: Vec<usize> = Vec::new();
        let mut progress = self
            .progress_rx
            .take()
            .ok_or_else(|| ApplyError::Internal("the run was driven twice".into()))?;
        let mut hold_until: Option<tokio::time::Instant> = None;
        loop {
            self.start_armed(&mut procs, &runners, &stop_rx, sink)?;
            self.launch(&mut staged)?;
            let pending = self.dirty || !self.events.is_empty() || !staged.is_empty();
            let urgent =
                self.commit_now() || hold_until.is_some_and(|t| t <= tokio::time::Instant::now());
            if flush.is_none() && pending && !urgent && hold_until.is_none() {
                hold_until = Some(tokio::time::Instant::now() + COMMIT_HOLD);
            }
            if flush.is_none() && pending && urgent {
                hold_until = None;
                self.dirty = false;
                committing = (
                    std::mem::take(&mut self.events),
                    std::mem::take(&mut staged),
                );
                committing_changed = std::mem::take(&mut self.changed);
                self.reserved = committing.1.len();
                let committer = self.store.committer();
                flush = Some(tokio::task::spawn_blocking(move || committer.commit()));
            }
            if flush.is_none()
                && self.running == 0
                && self.armed.is_empty()
                && self.timers == 0
                && (self.ready.is_empty() || self.stopping.is_some())
            {
                break;
            }
            let wake = tokio::select! {
                synced = async { flush.as_mut().expect("guarded").await }, if flush.is_some() => {
                    flush = None;
                    synced.map_err(|e| ApplyError::Internal(format!("the state writer crashed: {e}")))??;
                    let (events, spawns) = std::mem::take(&mut committing);
                    for event in &events {
                        sink.emit(event);
                    }
                    sink.flush();
                    self.reserved = 0;
                    // Started at the top of the loop, now or when a slot frees.
                    self.armed.extend(spawns);
                    // Only what this sync made durable goes into the live view.
                    self.committed_changes.append(&mut committing_changed);
                    self.snapshot_due = true;
                    if self.last_snapshot.is_none_or(|t| t.elapsed() >= SNAPSHOT_EVERY) {
                        self.snapshot();
                    }
                    None
                }
                Some(done) = procs.join_next(), if self.running > 0 => match done {
                    Ok((node, result, elapsed)) => Some(Wake::Finished { node, result, elapsed }),
                    Err(e) => return Err(ApplyError::Internal(format!("a task supervisor crashed: {e}"))),
                },
                Some(node) = retry_rx.recv(), if self.timers > 0 => Some(Wake::RetryDue(node)),
                Some(event) = progress.recv() => {
                    // Progress is not state: it is reported as it comes, never checkpointed.
                    let mut refusals = Vec::new();
                    let mut costs = Vec::new();
                    let mut spoke = Vec::new();
                    let mut note = |event: &Event| {
                        if let Event::TaskProgress { task, kind, detail, .. } = event {
                            spoke.push(task.clone());
                            if kind == "api_retry" {
                                if let Some(wait) = adapt::refusal(detail) {
                                    refusals.push((task.clone(), wait));
                                }
                            } else if kind == "cost" {
                                if let Ok(usd) = detail.parse::<f64>() {
                                    costs.push((task.clone(), usd));
                                }
                            }
                        }
                    };
                    note(&event);
                    sink.emit(&event);
                    while let Ok(event) = progress.try_recv() {
                        note(&event);
                        sink.emit(&event);
                    }
                    sink.flush();
                    for task in spoke {
                        self.agent_booted(&task);
                    }
                    for (task, wait) in refusals {
                        self.agent_refused(&task, wait);
                    }
                    for (task, usd) in costs {
                        self.agent_cost(&task, usd)?;
                    }
                    None
                }
                _ = tokio::time::sleep_until(self.agents_held_until().unwrap_or_else(tokio::time::Instant::now)), if self.agents_held_until().is_some() => {
                    if let Some(level) = &mut self.agent_level {
                        level.holding();
                    }
                    self.release_agents();
                    None
                }
                _ = tokio::time::sleep(SNAPSHOT_EVERY), if self.snapshot_due => { self.snapshot(); None }
                _ = tokio::time::sleep_until(hold_until.unwrap_or_else(tokio::time::Instant::now)), if flush.is_none() && hold_until.is_some() => None,
                _ = interrupt.recv() => { signalled(&mut self)?; None }
                _ = terminate.recv() => { signalled(&mut self)?; None }
                _ = hangup.recv() => { signalled(&mut self)?; None }
                _ = quit.recv() => { signalled(&mut self)?; None }
            };
            let mut wakes: Vec<Wake> = wake.into_iter().collect();
            // Take whatever else finished meanwhile, so one commit covers it all.
            while let Some(Ok((node, result, elapsed))) = procs.try_join_next() {
                wakes.push(Wake::Finished {
                    node,
                    result,
                    elapsed,
                });
            }
            for wake in wakes {
                match wake {
                    Wake::Finished {
                        node,
                        result,
                        elapsed,
                    } => {
                        self.running -= 1;
                        self.finished(node, result, elapsed, &retry_tx)?;
                    }
                    Wake::RetryDue(node) => {
                        // A retry cancelled by a stop is already settled.
                        if self.nodes[node].record.state == TaskState::Retrying {
                            self.timers -= 1;
                            self.enqueue(node);
                        }
                    }
                }
            }
        }
        // Whatever never started: the run stopped before it.
        let reason = self.stopping.clone().unwrap_or_else(|| "not run".into());
        for node in 0..self.nodes.len() {
            if !self.nodes[node].record.state.is_terminal() {
                self.settle(node, TaskState::Cancelled, reason.clone())?;
            }
        }
        for g in 0..self.groups.len() {
            if self.groups[g].outcome.is_none() {
                self.groups[g].outcome = Some(TaskState::Cancelled);
            }
        }
        let count = |s: &[TaskState]| {
            self.nodes
                .iter()
                .filter(|n| s.contains(&n.record.state))
                .count()
        };
        let summary = RunSummary {
            run: self.run.id.clone(),
            state: if self.cancelled {
                RunState::Cancelled
            } else if self
                .groups
                .iter()
                .any(|g| matches!(g.outcome, Some(TaskState::Failed | TaskState::Cancelled)))
            {
                RunState::Failed
            } else {
                RunState::Succeeded
            },
            succeeded: count(&[TaskState::Succeeded]),
            cached: count(&[TaskState::Cached]),
            failed: count(&[TaskState::Failed]),
            skipped: count(&[TaskState::Skipped]),
            cancelled: count(&[TaskState::Cancelled]),
            result: self.run.result.as_ref().and_then(|r| {
                self.nodes
                    .iter()
                    .find(|n| n.plan.id == *r && n.record.commit.is_some())
                    .and_then(|_| self.run.result_branch())
                    .map(|b| b.trim_start_matches("refs/heads/").to_string())
            }),
        };
        if let Some(repo) = &self.repo {
            // Cached nodes reuse earlier commits: give them this run's refs too.
            if let Err(e) = repo.set_refs(&self.cached_refs) {
                return Err(ApplyError::Workspace(format!(
                    "cannot set the refs of cached tasks: {e}"
                )));
            }
        }
        self.run.state = summary.state;
        self.run.finished_ms = Some(now_ms());
        self.store.put_run(&self.run)?;
        self.dirty = true;
        self.events.push(Event::RunFinished {
            run: summary.run.clone(),
            state: summary.state,
            succeeded: summary.succeeded,
            cached: summary.cached,
            failed: summary.failed,
            skipped: summary.skipped,
            cancelled: summary.cancelled,
            duration_ms: started.elapsed().as_millis() as u64,
            time_ms: now_ms(),
        });
        self.commit(sink)?;
        // The run is over: its state is in the database, readable once the lock is released.
        let dir = self.store.dir().join("runs").join(&self.run.id);
        let _ = std::fs::remove_file(dir.join(LIVE_FILE));
        let _ = std::fs::remove_file(dir.join(crate::store::LIVE_COSTS_FILE));
        Ok(summary)
    }

    /// First Ctrl-C (or SIGTERM): stop launching, stop running tasks gracefully. Second: at once.
    fn cancel(&mut self, stop: &watch::Sender<Stop>) -> Result<(), ApplyError> {
        let level = if self.cancelled {
            Stop::Now
        } else {
            Stop::Graceful
        };
        self.cancelled = true;
        let _ = stop.send(level);
        self.stop_agents(level);
        self.stop("not run: the run was cancelled".into())
    }
}

/// Whether any template of the node passes `test`.
fn any_text(plan: &PlannedTask, test: impl Fn(&crate::plan::Text) -> bool) -> bool {
    match &plan.action {
        PlannedAction::Shell {
            run, env, workdir, ..
        } => test(run) || env.values().any(&test) || workdir.as_ref().is_some_and(&test),
        PlannedAction::Agent { prompt, env, .. } => test(prompt) || env.values().any(&test),
        PlannedAction::Merge { .. } => false,
        PlannedAction::Outputs { values, .. } => values.values().any(&test),
    }
}

/// Whether the node runs a command of its own (a git merge does not).
fn plan_has_process(plan: &PlannedTask) -> bool {
    !matches!(plan.action, PlannedAction::Merge { .. })
}

/// Whether any template of the node is left for run time.
fn has_deferred(plan: &PlannedTask) -> bool {
    any_text(plan, |t| t.rendered.is_none())
}

/// Whether a template left for run time may read `attempt` (then the cache key is made from the
/// rendering of attempt 1, so retries do not change it).
fn plan_reads_attempt(plan: &PlannedTask) -> bool {
    any_text(plan, |t| {
        t.rendered.is_none() && t.template.contains("attempt")
    })
}

/// Where a clusterfile's state lives by default: `.ccluster/` beside it.
pub fn default_state_dir(clusterfile: &Path) -> PathBuf {
    clusterfile
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
        .join(".ccluster")
}
