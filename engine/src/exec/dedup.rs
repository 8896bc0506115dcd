//! Deduplication inside a run: plan nodes of one task that would do the same work (the same
//! rendered command or prompt, settings, inputs and start commit) run once. The first runs; the
//! others wait for it, without a `--jobs` slot, and take its outcome. The cache does this across
//! runs (its key names the node, so it never does it within one); see `docs/state.md`.

use std::collections::HashMap;

use super::context;
use crate::plan::{PlannedAction, PlannedTask};
use crate::store::{now_ms, KeyParts, TaskRecord, TaskState};

/// The cache key parts that name the node rather than its work. `node` is the plan node id;
/// `item` holds the instance's `index` and `item`, which reach the work only through what the
/// templates render (already in `command`, `env`, `workdir`), so a map over `["a", "a"]` whose
/// prompt reads `item` is one work, and one whose prompt reads `index` is two.
const IDENTITY_PARTS: [&str; 2] = ["node", "item"];

/// The key of a node's work: its cache key parts without the node's identity, with its task's id
/// instead (two tasks doing the same thing are still two tasks, as for the cache). `None` for
/// nodes that run no process of their own (merges, a template instance's outputs): nothing to
/// save there.
pub(crate) fn work_key(plan: &PlannedTask, parts: &KeyParts) -> Option<String> {
    if !matches!(
        plan.action,
        PlannedAction::Shell { .. } | PlannedAction::Agent { .. }
    ) {
        return None;
    }
    let mut work = parts.clone();
    for part in IDENTITY_PARTS {
        work.remove(part);
    }
    work.insert("task".into(), plan.task.clone());
    Some(context::key_of(&work))
}

/// Which node of the run does each work, and which nodes wait for it.
#[derive(Default)]
pub(crate) struct Dedup {
    /// Work key → the node that does (or did, or took from the cache) that work in this run.
    originals: HashMap<String, usize>,
    /// Original → its duplicates waiting for it to end, in the order they came.
    waiting: HashMap<usize, Vec<usize>>,
}

impl Dedup {
    /// The node whose work `node` duplicates, if one came first; otherwise `node` becomes the
    /// original of that work.
    pub(crate) fn claim(&mut self, work: String, node: usize) -> Option<usize> {
        match self.originals.entry(work) {
            std::collections::hash_map::Entry::Occupied(e) => Some(*e.get()),
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(node);
                None
            }
        }
    }

    /// `duplicate` waits for `original` to end.
    pub(crate) fn wait_for(&mut self, original: usize, duplicate: usize) {
        self.waiting.entry(original).or_default().push(duplicate);
    }

    /// The duplicates waiting for `original`, which has just ended.
    pub(crate) fn take_waiting(&mut self, original: usize) -> Vec<usize> {
        self.waiting.remove(&original).unwrap_or_default()
    }
}

/// Gives `duplicate` the outcome of `original`, which has ended: its result (state, output,
/// commit, where it was cached from) after a success; after a failure, the same class, exit code
/// and message, said to be the original's; otherwise the original's skip or cancellation.
pub(crate) fn inherit(duplicate: &mut TaskRecord, original: &TaskRecord) {
    let from = &original.node;
    duplicate.deduplicated_from = Some(from.clone());
    duplicate.finished_ms = Some(now_ms());
    let (state, message) = match original.state {
        TaskState::Succeeded | TaskState::Cached => {
            duplicate.output = original.output.clone();
            duplicate.commit = original.commit.clone();
            duplicate.exit_code = original.exit_code;
            duplicate.cached_from = original.cached_from.clone();
            (
                original.state,
                format!("deduplicated: took the result of `{from}`, which does the same work"),
            )
        }
        TaskState::Failed => {
            duplicate.class = original.class;
            duplicate.exit_code = original.exit_code;
            (
                TaskState::Failed,
                format!(
                    "`{from}`, which does the same work, failed: {}",
                    original.message.as_deref().unwrap_or("")
                ),
            )
        }
        TaskState::Skipped => (
            TaskState::Skipped,
            format!("skipped: `{from}`, which does the same work, was skipped"),
        ),
        _ => (
            TaskState::Cancelled,
            format!("not run: `{from}`, which does the same work, was cancelled"),
        ),
    };
    duplicate.state = state;
    duplicate.message = Some(message);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(node: &str, index: usize, command: &str) -> KeyParts {
        [
            ("recipe", "ccluster-key-3".to_string()),
            ("node", node.to_string()),
            ("command", command.to_string()),
            ("item", format!("{index}")),
            ("upstream", "u".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// The first plan node of a clusterfile with one shell task `task`.
    fn shell(task: &str) -> PlannedTask {
        use crate::compile::{compile, Stage};
        use crate::plan::InputArgs;
        use crate::syntax::Format;
        let text = format!("version = 1\n[tasks.{task}]\nrun = \"echo\"\n");
        let source = crate::diagnostic::SourceFile::new("dedup.toml", text);
        let compiled = compile(
            &source,
            Format::Toml,
            std::path::Path::new("."),
            &InputArgs::default(),
            Stage::Plan,
        )
        .unwrap_or_else(|d| panic!("{d:?}"));
        compiled.plan.nodes[0].clone()
    }

    #[test]
    fn instances_with_the_same_work_share_a_key_whatever_their_id_and_index() {
        let plan = shell("build");
        let a = work_key(&plan, &parts("build[0]", 0, "c1")).unwrap();
        let b = work_key(&plan, &parts("build[1]", 1, "c1")).unwrap();
        let c = work_key(&plan, &parts("build[2]", 2, "c2")).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        // Another task with the same work is another work.
        let other = work_key(&shell("check"), &parts("check", 0, "c1")).unwrap();
        assert_ne!(a, other);
    }

    #[test]
    fn the_first_claim_is_the_original_and_later_ones_wait_for_it() {
        let mut d = Dedup::default();
        assert_eq!(d.claim("w".into(), 3), None);
        assert_eq!(d.claim("w".into(), 5), Some(3));
        assert_eq!(d.claim("v".into(), 5), None);
        d.wait_for(3, 5);
        d.wait_for(3, 7);
        assert_eq!(d.take_waiting(3), vec![5, 7]);
        assert!(d.take_waiting(3).is_empty());
    }

    fn record(node: &str, state: TaskState) -> TaskRecord {
        let mut r: TaskRecord = serde_json::from_value(serde_json::json!({
            "node": node, "task": "build", "order": 0, "state": state, "attempts": 0,
            "cache_key": null, "exit_code": null, "class": null, "started_ms": null,
            "finished_ms": null, "output": null, "message": null
        }))
        .unwrap();
        r.state = state;
        r
    }

    #[test]
    fn a_duplicate_takes_the_originals_result_failure_or_cancellation() {
        let mut ok = record("build[0]", TaskState::Cached);
        ok.output = Some(serde_json::json!("out"));
        ok.commit = Some("c0ffee".into());
        ok.cached_from = Some("run-1".into());
        let mut dup = record("build[1]", TaskState::Pending);
        inherit(&mut dup, &ok);
        assert_eq!(dup.state, TaskState::Cached);
        assert_eq!(dup.output, ok.output);
        assert_eq!(dup.commit.as_deref(), Some("c0ffee"));
        assert_eq!(dup.cached_from.as_deref(), Some("run-1"));
        assert_eq!(dup.deduplicated_from.as_deref(), Some("build[0]"));
        assert_eq!(dup.attempts, 0);

        let mut failed = record("build[0]", TaskState::Failed);
        failed.class = Some(crate::model::raw::FailureClass::Timeout);
        failed.message = Some("timed out after 1s".into());
        let mut dup = record("build[1]", TaskState::Pending);
        inherit(&mut dup, &failed);
        assert_eq!(dup.state, TaskState::Failed);
        assert_eq!(dup.class, failed.class);
        assert_eq!(
            dup.message.as_deref(),
            Some("`build[0]`, which does the same work, failed: timed out after 1s")
        );
        assert_eq!(dup.output, None);

        let mut dup = record("build[1]", TaskState::Pending);
        inherit(&mut dup, &record("build[0]", TaskState::Cancelled));
        assert_eq!(dup.state, TaskState::Cancelled);
        assert_eq!(
            dup.message.as_deref(),
            Some("not run: `build[0]`, which does the same work, was cancelled")
        );
    }
}
