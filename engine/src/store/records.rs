//! The records kept in the state: what each run, task instance and attempt did.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::raw::FailureClass;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Found `running` by a later process: the process that drove it died.
    Interrupted,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RunRecord {
    /// `20261125-081038.412-3fa2`: sorts by start time.
    pub id: String,
    pub workflow: String,
    /// The clusterfile's path as given to `apply`.
    pub clusterfile: String,
    pub state: RunState,
    pub pid: u32,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// Input values the run was planned with.
    pub inputs: serde_json::Value,
    /// The clusterfile's text as the run compiled it: `ccluster retry` runs exactly this again,
    /// whatever the file says now.
    #[serde(default)]
    pub source: String,
    /// The git repository of the workspaces (none when no task has one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// The commit workspaces start from, resolved when the run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    /// The plan node whose branch is the run's result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    /// `[workflow] keep_failed`: `gc` keeps worktrees of failed attempts.
    #[serde(default)]
    pub keep_failed: bool,
    /// Where the run keeps its plan nodes' commits, one ref each: `refs/ccluster/runs/<run>/`.
    /// Absent in runs made before those refs existed: they kept them as branches
    /// (`refs/heads/ccluster/<run>/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_refs: Option<String>,
    /// The templates the clusterfile used, by name, as the run compiled them: `retry` uses
    /// exactly these, whatever the files or refs say now.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub templates: std::collections::BTreeMap<String, String>,
    /// `apply --rehearse`: agents talked to the scripted model server (`retry` does so again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rehearsed: bool,
    /// Who or what started the run: `alice (cli)`, `alice (cli, GitHub Actions)`, `server`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<String>,
    /// The operator's policy the run was held to (`--policy FILE`, a server's): `retry` holds it
    /// to the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<KeptPolicy>,
}

/// A policy file as a run kept it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeptPolicy {
    /// The file's path as it was given.
    pub file: String,
    pub text: String,
}

impl RunRecord {
    /// The prefix of the run's per-node refs, whichever layout the run was made with.
    pub fn task_refs_prefix(&self) -> String {
        self.task_refs
            .clone()
            .unwrap_or_else(|| crate::workspace::names::legacy_task_refs_prefix(&self.id))
    }

    /// The ref holding a plan node's commit in this run (`refs/ccluster/runs/<run>/edit/2`).
    pub fn task_ref(&self, node: &str) -> String {
        crate::workspace::names::node_ref(&self.task_refs_prefix(), node)
    }

    /// The run's result branch, `refs/heads/ccluster/<run>/<result node>`, when it has a result
    /// task.
    pub fn result_branch(&self) -> Option<String> {
        self.result
            .as_ref()
            .map(|r| crate::workspace::names::result_branch(&self.id, r))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    Pending,
    Running,
    /// Failed an attempt and waits for the next one.
    Retrying,
    Succeeded,
    /// Not run: a result with the same cache key exists.
    Cached,
    Failed,
    Skipped,
    /// Not run, or stopped, because the run was cancelled or failed first.
    Cancelled,
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        !matches!(
            self,
            TaskState::Pending | TaskState::Running | TaskState::Retrying
        )
    }

    pub fn is_success(self) -> bool {
        matches!(self, TaskState::Succeeded | TaskState::Cached)
    }
}

/// One plan node (a task, or one instance of a mapped task) in one run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TaskRecord {
    pub node: String,
    pub task: String,
    /// Position in the plan, for listing in plan order.
    pub order: u64,
    pub state: TaskState,
    pub attempts: u32,
    pub cache_key: Option<String>,
    pub exit_code: Option<i32>,
    pub class: Option<FailureClass>,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    pub output: Option<serde_json::Value>,
    /// Why it was skipped, cancelled or failed, in words.
    pub message: Option<String>,
    /// For a cached node: the run whose result it reuses (its logs are there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_from: Option<String>,
    /// For a task with a workspace that succeeded: its commit (also its branch's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// Agent tasks: what every attempt so far cost, in US dollars, and its tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Agent tasks: tool calls the CLI denied, over every attempt so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denials: Option<u32>,
    /// In a task graph: the instances this one ran after (the expanded graph's edges).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// For a node that did not run because another node of the run does the same work: that
    /// node, whose outcome (success, failure or cancellation) it took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deduplicated_from: Option<String>,
    /// A running agent's cost so far, priced as its responses stream (US dollars): read from
    /// the run's `live-costs.json` for a run in progress, never stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_cost_usd: Option<f64>,
}

/// The file a run in progress keeps its running agents' costs so far in: `{node: usd}`.
pub const LIVE_COSTS_FILE: &str = "live-costs.json";

/// Lays the costs so far of a run in progress (its `runs/<run>/` directory) over its records.
pub fn read_live_costs(run_dir: &std::path::Path, tasks: &mut [TaskRecord]) {
    let Ok(text) = std::fs::read(run_dir.join(LIVE_COSTS_FILE)) else {
        return;
    };
    let Ok(costs) = serde_json::from_slice::<std::collections::HashMap<String, f64>>(&text) else {
        return;
    };
    for t in tasks {
        if t.state == TaskState::Running {
            t.live_cost_usd = costs.get(&t.node).copied();
        }
    }
}

impl TaskRecord {
    /// A node that has not started: its record before anything happened to it.
    pub fn pending(node: String, task: String, order: u64) -> TaskRecord {
        TaskRecord {
            node,
            task,
            order,
            state: TaskState::Pending,
            attempts: 0,
            cache_key: None,
            exit_code: None,
            class: None,
            started_ms: None,
            finished_ms: None,
            output: None,
            message: None,
            cached_from: None,
            commit: None,
            cost_usd: None,
            tokens: None,
            denials: None,
            after: Vec::new(),
            deduplicated_from: None,
            live_cost_usd: None,
        }
    }

    /// The run and plan node whose attempts made this node's result: another run's for a cached
    /// node, the original's for a deduplicated one (their artifacts and logs are there).
    pub fn result_source<'a>(&'a self, run: &'a str) -> (&'a str, &'a str) {
        (
            self.cached_from.as_deref().unwrap_or(run),
            self.deduplicated_from.as_deref().unwrap_or(&self.node),
        )
    }
}

/// An attempt that ended (one that was running when ccluster died has no record: its task record
/// still says `running`, with the attempt's number).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttemptRecord {
    /// 1 for the first attempt.
    pub attempt: u32,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub succeeded: bool,
    pub class: Option<FailureClass>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub message: Option<String>,
    pub stdout: String,
    pub stderr: String,
    /// An agent attempt's tokens, cost, turns and session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::agent::Usage>,
}

/// A successful result, by cache key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    pub run: String,
    pub node: String,
    pub output: serde_json::Value,
    pub finished_ms: u64,
    /// The result's commit, for a task with a workspace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

/// What an attempt left besides its output, kept under `runs/<run>/artifacts/<node>.<attempt>/`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ArtifactRecord {
    pub attempt: u32,
    /// The directory holding the attempt's files.
    pub dir: String,
    /// The commit the workspace started from (after merging what it builds on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    /// The ref holding the commit: `refs/ccluster/runs/<run>/<node>`; runs made before those refs
    /// existed recorded the branch's short name, `ccluster/<run>/<node>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    /// A failed attempt's workspace, kept for inspection until `ccluster gc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktree: Option<String>,
    /// `patch.diff` in `dir`, when the attempt changed files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(default)]
    pub changed: Vec<crate::workspace::ChangedFile>,
    /// Files kept by `artifacts` globs, under `dir/files/`.
    #[serde(default)]
    pub files: Vec<String>,
    #[serde(default)]
    pub reports: Vec<crate::workspace::artifacts::TestReport>,
    #[serde(default)]
    pub conflicts: Vec<crate::workspace::Conflict>,
}

/// The parts a cache key is made of, each hashed, so a changed key can be explained part by part.
pub type KeyParts = BTreeMap<String, String>;
