//! A run's task graph for the dashboard, grouped by task: a mapped task's instances (10,000 of
//! them, if need be) are one group with counts per state, and edges join groups. The driver writes
//! the grouped plan beside the run's files when the run starts (`runs/<run>/graph.json`); the server
//! lays it out (a layer per longest path from the roots) and colours it from the task records.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::plan::Plan;
use crate::store::{TaskRecord, TaskState};

/// The file a run's grouped plan is kept in.
pub const GRAPH_FILE: &str = "graph.json";

/// The plan grouped by task, as the driver saw it at the start.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PlanGroups {
    pub tasks: Vec<PlanGroup>,
    /// `[workflow] max_run_usd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<f64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanGroup {
    pub task: String,
    /// `agent`, `shell`, `outputs` or `merge`.
    pub kind: String,
    /// Tasks this one needs (any instance of them).
    pub needs: Vec<String>,
    /// Its plan nodes known at the start (not a dynamic map's, which come with its expansion).
    #[serde(default)]
    pub nodes: Vec<String>,
    /// The plan position of its first node: its records' `order` is this shifted, plus the
    /// instance.
    #[serde(default)]
    pub first: u64,
}

impl PlanGroups {
    pub fn of(plan: &Plan, budget_usd: Option<f64>) -> PlanGroups {
        let task_of: HashMap<&str, &str> = plan
            .nodes
            .iter()
            .map(|n| (n.id.as_str(), n.task.as_str()))
            .collect();
        let mut tasks: Vec<PlanGroup> = Vec::new();
        let mut at: HashMap<&str, usize> = HashMap::new();
        for (pos, node) in plan.nodes.iter().enumerate() {
            let i = *at.entry(node.task.as_str()).or_insert_with(|| {
                tasks.push(PlanGroup {
                    task: node.task.clone(),
                    kind: node.action.kind().to_string(),
                    needs: Vec::new(),
                    nodes: Vec::new(),
                    first: pos as u64,
                });
                tasks.len() - 1
            });
            if node.dynamic_map.is_none() {
                tasks[i].nodes.push(node.id.clone());
            }
            for need in &node.needs {
                let need_task = task_of.get(need.as_str()).copied().unwrap_or(need.as_str());
                if need_task != node.task && !tasks[i].needs.iter().any(|n| n == need_task) {
                    tasks[i].needs.push(need_task.to_string());
                }
            }
        }
        PlanGroups { tasks, budget_usd }
    }

    /// Writes it into the run's directory; a failure only costs the dashboard its edges.
    pub fn write(&self, run_dir: &Path) {
        if let Ok(text) = serde_json::to_vec(self) {
            let _ = crate::store::private_file()
                .create(true)
                .write(true)
                .truncate(true)
                .open(run_dir.join(GRAPH_FILE))
                .and_then(|mut f| std::io::Write::write_all(&mut f, &text));
        }
    }

    pub fn read(run_dir: &Path) -> Option<PlanGroups> {
        serde_json::from_slice(&std::fs::read(run_dir.join(GRAPH_FILE)).ok()?).ok()
    }

    /// Pending records for the plan's nodes that `tasks` does not have yet: a live snapshot holds
    /// only the records that changed.
    pub fn pending_besides(&self, tasks: &[TaskRecord]) -> Vec<TaskRecord> {
        let known: std::collections::HashSet<&str> =
            tasks.iter().map(|t| t.node.as_str()).collect();
        let mut out = Vec::new();
        for group in &self.tasks {
            for (k, node) in group.nodes.iter().enumerate() {
                if known.contains(node.as_str()) {
                    continue;
                }
                out.push(TaskRecord::pending(
                    node.clone(),
                    group.task.clone(),
                    (group.first << 32) + k as u64,
                ));
            }
        }
        out
    }
}

/// The graph as the API gives it.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Graph {
    pub groups: Vec<Group>,
    pub edges: Vec<Edge>,
}

/// A task and all its instances.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Group {
    /// The task id (also the group's id).
    pub id: String,
    pub kind: String,
    /// Its plan nodes, in plan order (`build[0]`, `build[1]`, ...; just `build` when not mapped).
    pub nodes: Vec<String>,
    pub count: usize,
    /// Nodes by state.
    pub counts: BTreeMap<String, usize>,
    /// The group's state, as one: `failed` if any failed, else `running` if any runs (or
    /// retries), else `pending` if any waits, else `cancelled`, `skipped`, then `succeeded`.
    pub state: String,
    /// Columns for drawing: the longest path from a root, in groups.
    pub layer: usize,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct Edge {
    pub from: String,
    pub to: String,
}

fn state_name(s: TaskState) -> &'static str {
    match s {
        TaskState::Pending => "pending",
        TaskState::Running => "running",
        TaskState::Retrying => "retrying",
        TaskState::Succeeded => "succeeded",
        TaskState::Cached => "cached",
        TaskState::Failed => "failed",
        TaskState::Skipped => "skipped",
        TaskState::Cancelled => "cancelled",
    }
}

/// The graph of a run from its grouped plan (when it has one) and its task records; tasks the
/// records name that the plan did not (a dynamic map's instances) join their task's group.
pub fn graph(plan: Option<&PlanGroups>, tasks: &[TaskRecord]) -> Graph {
    let mut groups: Vec<Group> = Vec::new();
    let mut at: HashMap<String, usize> = HashMap::new();
    let mut needs: Vec<Vec<String>> = Vec::new();
    let mut add = |id: &str, kind: &str, groups: &mut Vec<Group>, needs: &mut Vec<Vec<String>>| {
        *at.entry(id.to_string()).or_insert_with(|| {
            groups.push(Group {
                id: id.to_string(),
                kind: kind.to_string(),
                nodes: Vec::new(),
                count: 0,
                counts: BTreeMap::new(),
                state: String::new(),
                layer: 0,
            });
            needs.push(Vec::new());
            groups.len() - 1
        })
    };
    if let Some(plan) = plan {
        for t in &plan.tasks {
            let i = add(&t.task, &t.kind, &mut groups, &mut needs);
            needs[i] = t.needs.clone();
        }
    }
    for t in tasks {
        let i = add(&t.task, "task", &mut groups, &mut needs);
        let g = &mut groups[i];
        g.nodes.push(t.node.clone());
        g.count += 1;
        *g.counts.entry(state_name(t.state).to_string()).or_default() += 1;
    }
    let index: HashMap<String, usize> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| (g.id.clone(), i))
        .collect();
    // Layers: longest path from a root, found by relaxing in rounds (the graph is a DAG; a bound
    // on the rounds keeps a malformed file from looping).
    let mut layer = vec![0usize; groups.len()];
    for _ in 0..groups.len() {
        let mut changed = false;
        for (i, n) in needs.iter().enumerate() {
            for need in n {
                if let Some(&j) = index.get(need) {
                    if layer[i] < layer[j] + 1 {
                        layer[i] = layer[j] + 1;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    let mut edges = Vec::new();
    for (i, g) in groups.iter_mut().enumerate() {
        g.layer = layer[i];
        g.state = group_state(&g.counts).to_string();
        for need in &needs[i] {
            if index.contains_key(need) {
                edges.push(Edge {
                    from: need.clone(),
                    to: g.id.clone(),
                });
            }
        }
    }
    Graph { groups, edges }
}

fn group_state(counts: &BTreeMap<String, usize>) -> &'static str {
    let has = |s: &str| counts.get(s).is_some_and(|n| *n > 0);
    if counts.is_empty() {
        "pending"
    } else if has("failed") {
        "failed"
    } else if has("running") || has("retrying") {
        "running"
    } else if has("pending") {
        "pending"
    } else if has("cancelled") {
        "cancelled"
    } else if has("skipped") && !has("succeeded") && !has("cached") {
        "skipped"
    } else {
        "succeeded"
    }
}
