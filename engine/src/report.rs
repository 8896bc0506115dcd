//! The run report: what a run did, task by task (state, attempts, time, cost, changes, tests,
//! conflicts), as JSON or as Markdown fit for a pull request body. Built from the run's records
//! only, so it can be made at any time after the run.

use std::fmt::Write;

use serde::Serialize;

use crate::store::{
    ArtifactRecord, RunRecord, RunRecords, RunState, StoreError, TaskRecord, TaskState,
};
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
    /// Why a budget stopped the run (its agents were stopped and nothing more started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_by_budget: Option<String>,
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
    /// Agent tasks: tool calls the CLI denied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denials: Option<u32>,
    /// In a task graph: the instances this one ran after.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// The full ref holding the node's commit: `refs/ccluster/runs/<run>/<node>` (a branch under
    /// `refs/heads/ccluster/<run>/` in runs made before those refs existed).
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    pub git_ref: Option<String>,
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
    /// The node of the run whose outcome it took, doing the same work (see `docs/state.md`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deduplicated_from: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub tasks: usize,
    pub succeeded: usize,
    pub cached: usize,
    pub failed: usize,
    pub skipped: usize,
    pub cancelled: usize,
    /// Of the above, nodes that took the outcome of another doing the same work.
    #[serde(skip_serializing_if = "is_zero")]
    pub deduplicated: usize,
    pub attempts: u32,
    pub cost_usd: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denials: Option<u32>,
    pub tests: Option<TestCounts>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A cost as `status` and the report both show it: four decimals, since one agent turn can cost
/// less than a cent.
pub fn usd(cost: f64) -> String {
    format!("${cost:.4}")
}

/// The artifact record of a node's last attempt in `run` (for a cached node, in the run it reuses;
/// for a deduplicated one, its original's).
fn last_artifacts(
    store: &dyn RunRecords,
    run: &str,
    task: &TaskRecord,
) -> Result<Option<ArtifactRecord>, StoreError> {
    let (from, node) = task.result_source(run);
    Ok(store.artifacts(from, node)?.pop())
}

/// The report of `run`, from the database or, while another process holds it, from the archives.
pub fn build(store: &dyn RunRecords, run: &RunRecord) -> Result<RunReport, StoreError> {
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
        if let Some(d) = t.denials {
            *totals.denials.get_or_insert(0) += d;
        }
        totals.attempts += t.attempts;
        if t.deduplicated_from.is_some() {
            totals.deduplicated += 1;
        }
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
            denials: t.denials,
            after: t.after.clone(),
            git_ref: t.commit.as_ref().map(|_| run.task_ref(&t.node)),
            commit: t.commit.clone(),
            changed: artifacts
                .as_ref()
                .map(|a| a.changed.clone())
                .unwrap_or_default(),
            tests,
            conflicts: artifacts.map(|a| a.conflicts).unwrap_or_default(),
            message: t.message.clone(),
            cached_from: t.cached_from.clone(),
            deduplicated_from: t.deduplicated_from.clone(),
        });
    }
    let result = run.result.as_ref().and_then(|r| {
        let task = tasks.iter().find(|t| t.node == *r)?;
        Some(ResultBranch {
            task: r.clone(),
            branch: run
                .result_branch()?
                .trim_start_matches("refs/heads/")
                .to_string(),
            commit: task.commit.clone()?,
            changed: task.changed.clone(),
        })
    });
    let stopped_by_budget = tasks
        .iter()
        .filter_map(|t| t.message.as_deref())
        .find(|m| m.contains(crate::exec::RUN_BUDGET_SPENT))
        .map(|m| {
            m.trim_start_matches("stopped: ")
                .trim_start_matches("not run: ")
                .to_string()
        });
    Ok(RunReport {
        stopped_by_budget,
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

/// One line of text: line breaks, other control characters and the characters that reorder
/// text (bidirectional overrides) would change what the line shows.
fn one_line(text: &str) -> impl Iterator<Item = char> + '_ {
    text.chars().map(|c| match c {
        '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' => '\u{FFFD}',
        c if c.is_control() => ' ',
        c => c,
    })
}

/// Text that renders as written: every character that could open Markdown or HTML (emphasis,
/// links and images, code, raw HTML and entities, tables, strike-through, math) is escaped with a
/// backslash, which CommonMark allows before any ASCII punctuation. Safe in table cells too.
fn text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in one_line(raw) {
        if matches!(
            c,
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '&' | '!' | '|' | '~' | '$'
        ) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A code span showing `raw` literally (nothing is markup inside one, HTML included): fenced with
/// one backtick more than the longest run of backticks inside, padded with a space when the
/// content would otherwise touch the fence or lose its own edge spaces.
fn code(raw: &str) -> String {
    let content: String = one_line(raw).collect();
    let mut longest = 0;
    let mut run = 0;
    for c in content.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest + 1);
    let pad = content.is_empty()
        || content.starts_with('`')
        || content.ends_with('`')
        || (content.starts_with(' ') && content.ends_with(' ') && content.trim() != "");
    let pad = if pad { " " } else { "" };
    format!("{fence}{pad}{content}{pad}{fence}")
}

/// A code span in a table cell: GitHub splits the row at every `|` not escaped, even inside code,
/// and takes `\|` there as a `|`.
fn code_cell(raw: &str) -> String {
    code(raw).replace('|', "\\|")
}

/// Text inside raw HTML (the `<summary>` of a task's changes), where Markdown is not read.
fn html(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    for c in one_line(raw) {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The edges of the run's task graphs, as a Mermaid diagram (which forges draw): what ran after
/// what. Node names are shown as quoted labels, their quotes and angle brackets escaped.
fn graph_section(r: &RunReport, out: &mut String) {
    if r.tasks.iter().all(|t| t.after.is_empty()) {
        return;
    }
    let key: std::collections::HashMap<&str, usize> = r
        .tasks
        .iter()
        .enumerate()
        .map(|(i, t)| (t.node.as_str(), i))
        .collect();
    let label = |node: &str| {
        node.replace('"', "#quot;")
            .replace('<', "#lt;")
            .replace('>', "#gt;")
    };
    out.push_str("\n### Task graph\n\n```mermaid\nflowchart LR\n");
    for (i, t) in r.tasks.iter().enumerate() {
        if t.after.is_empty() && !r.tasks.iter().any(|o| o.after.contains(&t.node)) {
            continue;
        }
        let _ = writeln!(out, "  n{i}[\"{} ({})\"]", label(&t.node), snake(&t.state));
    }
    for (i, t) in r.tasks.iter().enumerate() {
        for a in &t.after {
            if let Some(j) = key.get(a.as_str()) {
                let _ = writeln!(out, "  n{j} --> n{i}");
            }
        }
    }
    out.push_str("```\n");
}

pub fn to_markdown(r: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## ccluster run {} of {}: {}\n",
        code(&r.run),
        code(&r.workflow),
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
    if t.deduplicated > 0 {
        let _ = write!(
            out,
            "; {} deduplicated (the same work as another task, not run again)",
            t.deduplicated
        );
    }
    if let Some(ms) = r.finished_ms.map(|f| f.saturating_sub(r.started_ms)) {
        let _ = write!(out, "; {}", seconds(ms));
    }
    if let Some(c) = t.cost_usd {
        let _ = write!(out, "; agents cost {}", usd(c));
    }
    if let Some(d) = t.denials {
        let _ = write!(
            out,
            "; {d} tool call{} denied",
            if d == 1 { "" } else { "s" }
        );
    }
    out.push_str(".\n\n");
    if let Some(why) = &r.stopped_by_budget {
        let _ = writeln!(
            out,
            "**Stopped by its budget:** {}; its running agents were stopped and nothing more started.\n",
            text(why)
        );
    }
    if let Some(res) = &r.result {
        let _ = writeln!(
            out,
            "**Result:** branch {} (commit {}, from {}): {}.\n",
            code(&res.branch),
            code(short(&res.commit)),
            code(&res.task),
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
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            code_cell(&task.node),
            match &task.deduplicated_from {
                Some(from) => format!(
                    "{}, deduplicated from {}",
                    snake(&task.state),
                    code_cell(from)
                ),
                None => snake(&task.state),
            },
            task.attempts,
            task.duration_ms.map_or("—".into(), seconds),
            task.cost_usd.map_or("—".into(), usd),
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
    graph_section(r, &mut out);
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
                "- {}: {}",
                code(&t.node),
                text(t.message.as_deref().unwrap_or_default())
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
                .map(|f| {
                    let tasks: Vec<String> = f.tasks.iter().map(|t| code(t)).collect();
                    format!("{} (changed by {})", code(&f.path), tasks.join(", "))
                })
                .collect::<Vec<_>>()
                .join(", ");
            let outcome = match &c.resolved_by {
                Some(by) => format!("resolved by {}", code(by)),
                None => "not resolved".into(),
            };
            let _ = writeln!(
                out,
                "- {} merging {}: {files}; {outcome}",
                code(&t.node),
                code(&c.input)
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
                html(&t.node),
                diffstat(&t.changed)
            );
            out.push_str("| file | + | − |\n|---|---:|---:|\n");
            for f in &t.changed {
                let n = |v: Option<u64>| v.map_or("bin".into(), |v| v.to_string());
                let _ = writeln!(
                    out,
                    "| {} | {} | {} |",
                    code_cell(&f.path),
                    n(f.added),
                    n(f.removed)
                );
            }
            out.push_str("\n</details>\n");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace::ConflictedFile;

    const IMG: &str = "<img src=x onerror=alert(1)>";

    fn changed(path: &str) -> ChangedFile {
        ChangedFile {
            path: path.into(),
            added: Some(1),
            removed: Some(0),
        }
    }

    /// A run whose every name and message is chosen by someone hostile.
    fn hostile() -> RunReport {
        let task = |node: &str, state, message: Option<&str>| TaskReport {
            node: node.into(),
            state,
            attempts: 1,
            duration_ms: Some(1500),
            cost_usd: None,
            tokens: None,
            denials: None,
            after: Vec::new(),
            git_ref: None,
            commit: None,
            changed: Vec::new(),
            tests: None,
            conflicts: Vec::new(),
            message: message.map(str::to_string),
            cached_from: None,
            deduplicated_from: None,
        };
        let mut edit = task("edit[`x` | <b>y</b>]", TaskState::Succeeded, None);
        edit.git_ref = Some("refs/ccluster/runs/r/edit/**x**".into());
        edit.commit = Some("0123456789abcdef".into());
        edit.changed = vec![
            changed("<b>x</b>.md"),
            changed("*a*.txt"),
            changed("a|b`c``d.txt"),
            changed("`edge`"),
            changed("[link](javascript:alert(1)).md"),
        ];
        let mut join = task(
            "join",
            TaskState::Failed,
            Some(&format!(
                "{IMG} and **bold**\n# heading\n| a | b |\n[x](http://e) ![i](http://e/i.png) ~~s~~ $x$ `c` \\* &lt;\u{202E}txt.exe"
            )),
        );
        join.conflicts = vec![Conflict {
            input: "<i>in</i>".into(),
            files: vec![ConflictedFile {
                path: "_under_ `tick`".into(),
                tasks: vec!["a*b".into(), IMG.into()],
            }],
            resolved_by: Some("fix ``it`` <script>".into()),
        }];
        RunReport {
            stopped_by_budget: None,
            run: "20261125-084844.031-1213".into(),
            workflow: "w <script>alert(1)</script>".into(),
            state: RunState::Failed,
            started_ms: 0,
            finished_ms: Some(2000),
            base: None,
            result: Some(ResultBranch {
                task: "**t**".into(),
                branch: "ccluster/r/<b>t</b>".into(),
                commit: "0123456789abcdef".into(),
                changed: vec![changed("<b>x</b>.md")],
            }),
            totals: Totals {
                tasks: 2,
                succeeded: 1,
                failed: 1,
                attempts: 2,
                ..Totals::default()
            },
            tasks: vec![edit, join],
        }
    }

    #[test]
    fn every_name_and_message_renders_as_written() {
        let md = to_markdown(&hostile());
        insta::assert_snapshot!(md);
        // Outside code spans, no `<` opens HTML (but ccluster's own `<details>` blocks) and no
        // `*`, `_`, `[`, `~` or `$` opens emphasis, a link, strike-through or math.
        for line in md
            .lines()
            .filter(|l| !l.starts_with("<details>") && *l != "</details>")
        {
            let outside = outside_code(line);
            for (i, c) in outside.char_indices() {
                if matches!(c, '<' | '*' | '_' | '[' | '~' | '$') && !line.starts_with("**") {
                    assert!(outside[..i].ends_with('\\'), "`{c}` unescaped in {line}");
                }
            }
        }
        assert!(md.contains(r"\<img src=x onerror=alert(1)\> and \*\*bold\*\* # heading"));
        // The message stays on its own list item: its line breaks are gone.
        assert_eq!(md.lines().filter(|l| l.contains("onerror")).count(), 2);
    }

    /// The text of a line outside its code spans, as CommonMark finds them: a run of backticks
    /// not escaped opens one, closed by the next run of the same length.
    fn outside_code(line: &str) -> String {
        let chars: Vec<char> = line.chars().collect();
        let run_at = |i: usize| chars[i..].iter().take_while(|c| **c == '`').count();
        let mut out = String::new();
        let mut i = 0;
        while i < chars.len() {
            let escaped = out.ends_with('\\');
            if chars[i] != '`' || escaped {
                out.push(chars[i]);
                i += 1;
                continue;
            }
            let open = run_at(i);
            let mut j = i + open;
            let close = loop {
                if j >= chars.len() {
                    break None;
                }
                let run = run_at(j);
                match run {
                    0 => j += 1,
                    n if n == open => break Some(j + n),
                    n => j += n,
                }
            };
            match close {
                Some(end) => i = end,
                None => {
                    out.extend(&chars[i..i + open]);
                    i += open;
                }
            }
        }
        out
    }

    #[test]
    fn code_spans_hold_any_backticks() {
        assert_eq!(code("plain"), "`plain`");
        assert_eq!(code("a`b"), "``a`b``");
        assert_eq!(code("`x`"), "`` `x` ``");
        assert_eq!(code("a``b`"), "``` a``b` ```");
        assert_eq!(code(" a "), "`  a  `");
        assert_eq!(code_cell("a|b"), r"`a\|b`");
        assert_eq!(text("a\nb\tc"), "a b c");
    }
}
