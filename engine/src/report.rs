//! The run report: what a run did, task by task (state, attempts, time, cost, changes, tests,
//! conflicts), as JSON or as Markdown fit for a pull request body. Built from the run's records
//! only, so it can be made at any time after the run.

use std::fmt::Write;

use serde::Serialize;

use crate::store::{ArtifactRecord, RunRecord, RunState, Store, StoreError, TaskRecord, TaskState};
use crate::workspace::{ChangedFile, Conflict};

#[derive(Clone, Debug, Serialize)]
pub struct RunReport {
    pub run: String,
    pub workflow: String,
    pub state: RunState,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    /// The commit the run's workspaces started from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<ResultBranch>,
    pub tasks: Vec<TaskReport>,
    pub totals: Totals,
}

#[derive(Clone, Debug, Serialize)]
pub struct ResultBranch {
    pub task: String,
    pub branch: String,
    pub commit: String,
    pub changed: Vec<ChangedFile>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct TestCounts {
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
}

#[derive(Clone, Debug, Serialize)]
pub struct TaskReport {
    pub node: String,
    pub state: TaskState,
    pub attempts: u32,
    pub duration_ms: Option<u64>,
    /// Known for agent tasks only.
    pub cost_usd: Option<f64>,
    pub tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub branch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    pub changed: Vec<ChangedFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tests: Option<TestCounts>,
    pub conflicts: Vec<Conflict>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached_from: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub tasks: usize,
    pub succeeded: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
    pub cancelled: usize,
    pub attempts: u32,
    pub cost_usd: Option<f64>,
    pub tests: Option<TestCounts>,
}

/// The artifact record of a node's last attempt in `run` (for a cached node, in the run it reuses).
fn last_artifacts(
    store: &Store,
    run: &str,
    task: &TaskRecord,
) -> Result<Option<ArtifactRecord>, StoreError> {
    let from = task.cached_from.as_deref().unwrap_or(run);
    Ok(store.artifacts(from, &task.node)?.pop())
}

pub fn build(store: &Store, run: &RunRecord) -> Result<RunReport, StoreError> {
    let mut records = store.tasks(&run.id)?;
    records.sort_by_key(|t| t.order);
    let mut tasks = Vec::new();
    let mut totals = Totals::default();
    for t in &records {
        let artifacts = last_artifacts(store, &run.id, t)?;
        let tests = artifacts
            .as_ref()
            .filter(|a| !a.reports.is_empty())
            .map(|a| {
                let mut c = TestCounts::default();
                for r in &a.reports {
                    c.passed += r.passed;
                    c.failed += r.failed;
                    c.skipped += r.skipped;
                }
                c
            });
        if let Some(c) = &tests {
            let total = totals.tests.get_or_insert_with(TestCounts::default);
            total.passed += c.passed;
            total.failed += c.failed;
            total.skipped += c.skipped;
        }
        totals.tasks += 1;
        if let Some(c) = t.cost_usd {
            *totals.cost_usd.get_or_insert(0.0) += c;
        }
        totals.attempts += t.attempts;
        match t.state {
            TaskState::Succeeded => totals.succeeded += 1,
            TaskState::Cached => totals.cached += 1,
            TaskState::Failed => totals.failed += 1,
            TaskState::Skipped => totals.skipped += 1,
            _ => totals.cancelled += 1,
        }
        tasks.push(TaskReport {
            node: t.node.clone(),
            state: t.state,
            attempts: t.attempts,
            duration_ms: match (t.started_ms, t.finished_ms) {
                (Some(s), Some(f)) if t.cached_from.is_none() => Some(f.saturating_sub(s)),
                _ => None,
            },
            cost_usd: t.cost_usd,
            tokens: t.tokens,
            branch: t.commit.as_ref().map(|_| {
                format!(
                    "ccluster/{}/{}",
                    run.id,
                    crate::workspace::node_ref_name(&t.node)
                )
            }),
            commit: t.commit.clone(),
            changed: artifacts
                .as_ref()
                .map(|a| a.changed.clone())
                .unwrap_or_default(),
            tests,
            conflicts: artifacts.map(|a| a.conflicts).unwrap_or_default(),
            message: t.message.clone(),
            cached_from: t.cached_from.clone(),
        });
    }
    let result = run.result.as_ref().and_then(|r| {
        let task = tasks.iter().find(|t| t.node == *r)?;
        Some(ResultBranch {
            task: r.clone(),
            branch: task.branch.clone()?,
            commit: task.commit.clone()?,
            changed: task.changed.clone(),
        })
    });
    Ok(RunReport {
        run: run.id.clone(),
        workflow: run.workflow.clone(),
        state: run.state,
        started_ms: run.started_ms,
        finished_ms: run.finished_ms,
        base: run.base.clone(),
        result,
        tasks,
        totals,
    })
}

fn snake<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

fn short(commit: &str) -> &str {
    &commit[..commit.len().min(10)]
}

/// `3 files, +10 −2`.
fn diffstat(files: &[ChangedFile]) -> String {
    if files.is_empty() {
        return "no changes".into();
    }
    let added: u64 = files.iter().filter_map(|f| f.added).sum();
    let removed: u64 = files.iter().filter_map(|f| f.removed).sum();
    format!(
        "{} file{}, +{added} −{removed}",
        files.len(),
        if files.len() == 1 { "" } else { "s" }
    )
}

fn seconds(ms: u64) -> String {
    if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{:02}s", ms / 60_000, ms / 1000 % 60)
    }
}

/// Markdown cells must not break the table.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

pub fn to_markdown(r: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## ccluster run `{}` of `{}`: {}\n",
        r.run,
        r.workflow,
        snake(&r.state)
    );
    let t = &r.totals;
    let _ = write!(
        out,
        "{} tasks: {} succeeded, {} cached, {} failed, {} skipped, {} cancelled; {} attempt{}",
        t.tasks,
        t.succeeded,
        t.cached,
        t.failed,
        t.skipped,
        t.cancelled,
        t.attempts,
        if t.attempts == 1 { "" } else { "s" }
    );
    if let Some(ms) = r.finished_ms.map(|f| f.saturating_sub(r.started_ms)) {
        let _ = write!(out, "; {}", seconds(ms));
    }
    if let Some(c) = t.cost_usd {
        let _ = write!(out, "; agents cost ${c:.2}");
    }
    out.push_str(".\n\n");
    if let Some(res) = &r.result {
        let _ = writeln!(
            out,
            "**Result:** branch `{}` (commit `{}`, from `{}`): {}.\n",
            res.branch,
            short(&res.commit),
            res.task,
            diffstat(&res.changed)
        );
    }
    if let Some(tests) = &t.tests {
        let _ = writeln!(
            out,
            "**Tests:** {} passed, {} failed, {} skipped.\n",
            tests.passed, tests.failed, tests.skipped
        );
    }
    out.push_str("| task | state | attempts | duration | cost | tokens | changes | tests |\n");
    out.push_str("|---|---|---:|---:|---:|---:|---|---|\n");
    for task in &r.tasks {
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} |",
            task.node,
            snake(&task.state),
            task.attempts,
            task.duration_ms.map_or("—".into(), seconds),
            task.cost_usd.map_or("—".into(), |c| format!("${c:.2}")),
            task.tokens.map_or("—".into(), |n| n.to_string()),
            if task.commit.is_some() || !task.changed.is_empty() {
                diffstat(&task.changed)
            } else {
                "—".into()
            },
            task.tests.as_ref().map_or("—".into(), |c| format!(
                "{} passed, {} failed, {} skipped",
                c.passed, c.failed, c.skipped
            )),
        );
    }
    let problems: Vec<&TaskReport> = r
        .tasks
        .iter()
        .filter(|t| matches!(t.state, TaskState::Failed) && t.message.is_some())
        .collect();
    if !problems.is_empty() {
        out.push_str("\n### Failures\n\n");
        for t in problems {
            let _ = writeln!(
                out,
                "- `{}`: {}",
                t.node,
                cell(t.message.as_deref().unwrap_or_default())
            );
        }
    }
    let conflicts: Vec<(&TaskReport, &Conflict)> = r
        .tasks
        .iter()
        .flat_map(|t| t.conflicts.iter().map(move |c| (t, c)))
        .collect();
    if !conflicts.is_empty() {
        out.push_str("\n### Conflicts\n\n");
        for (t, c) in conflicts {
            let files = c
                .files
                .iter()
                .map(|f| format!("`{}` (changed by {})", f.path, f.tasks.join(", ")))
                .collect::<Vec<_>>()
                .join(", ");
            let outcome = match &c.resolved_by {
                Some(by) => format!("resolved by `{}`", cell(by)),
                None => "not resolved".into(),
            };
            let _ = writeln!(
                out,
                "- `{}` merging `{}`: {files}; {outcome}",
                t.node, c.input
            );
        }
    }
    let changed: Vec<&TaskReport> = r.tasks.iter().filter(|t| !t.changed.is_empty()).collect();
    if !changed.is_empty() {
        out.push_str("\n### Changes by task\n");
        for t in changed {
            let _ = writeln!(
                out,
                "\n<details><summary><code>{}</code>: {}</summary>\n",
                t.node,
                diffstat(&t.changed)
            );
            out.push_str("| file | + | − |\n|---|---:|---:|\n");
            for f in &t.changed {
                let n = |v: Option<u64>| v.map_or("bin".into(), |v| v.to_string());
                let _ = writeln!(
                    out,
                    "| `{}` | {} | {} |",
                    cell(&f.path),
                    n(f.added),
                    n(f.removed)
                );
            }
            out.push_str("\n</details>\n");
        }
    }
    out
}
