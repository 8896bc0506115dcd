//! Fan-out settings checked against the task they are on: `max_parallel`, `on_item_failure` and
//! `min_success` without `map`, `min_success` that can never be met, and a task graph's `id`,
//! `after` and `on_conflict` where they mean nothing.

use super::raw::{OnConflict, OnItemFailure, RawClusterfile};
use super::workflow::{MapSpec, Workflow};
use crate::diagnostic::{Category, Diagnostic};

/// Fan-out settings that make no sense where they are.
pub(super) fn check_fan_out_settings(
    workflow: &Workflow,
    raw: &RawClusterfile,
    diags: &mut Vec<Diagnostic>,
) {
    for task in &workflow.tasks {
        let Some(rt) = raw.tasks.get(task.id.as_str()) else {
            continue;
        };
        if !task.is_mapped() {
            for (key, span) in [
                ("max_parallel", rt.max_parallel.as_ref().map(|s| s.span)),
                (
                    "on_item_failure",
                    rt.on_item_failure.as_ref().map(|s| s.span),
                ),
                ("min_success", rt.min_success.as_ref().map(|s| s.span)),
            ] {
                if let Some(span) = span {
                    diags.push(
                        Diagnostic::warning(
                            Category::InvalidValue,
                            "no-effect",
                            format!("`{key}` has no effect: task `{}` has no `map`", task.id),
                        )
                        .at(span, "ignored without `map`"),
                    );
                }
            }
        }
        for (key, span) in [
            ("id", rt.id.as_ref().map(|s| s.span)),
            ("after", rt.after.as_ref().map(|s| s.span)),
        ] {
            if let (Some(span), false) = (span, task.is_mapped()) {
                diags.push(
                    Diagnostic::error(
                        Category::InvalidValue,
                        "needs-map",
                        format!("`{key}` names instances of a fan-out: task `{}` has no `map`", task.id),
                    )
                    .at(span, "without `map`")
                    .help("add `map = \"{{ tasks.<planner>.output.<list> }}\"` (or a list), one instance per item"),
                );
            }
        }
        if let Some(c) = &rt.on_conflict {
            if rt.after.is_none() {
                diags.push(
                    Diagnostic::warning(
                        Category::InvalidValue,
                        "no-effect",
                        format!("`on_conflict` has no effect: task `{}` is not a task graph (no `after`)", task.id),
                    )
                    .at(c.span, "ignored without `after`")
                    .help("for a merge task, `on_conflict` goes in its `merge` table"),
                );
            } else if c.value == OnConflict::Run {
                diags.push(
                    Diagnostic::error(
                        Category::InvalidValue,
                        "invalid-value",
                        format!(
                            "`on_conflict = \"run\"` is for merge tasks; task `{}` is a task graph",
                            task.id
                        ),
                    )
                    .at(c.span, "not for a task graph")
                    .help("use `\"agent\"` (an agent resolves the conflict) or `\"fail\"`"),
                );
            }
        }
        if let (Some(after), None, true) = (&rt.after, &rt.id, task.is_mapped()) {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "after-needs-id",
                    format!("`after` of task `{}` names instances, which need ids", task.id),
                )
                .at(after.span, "instances have no `id`")
                .help("add `id = \"{{ item.id }}\"`: each instance's id, which `after` lists refer to"),
            );
        }
        if let Some(ms) = &rt.min_success {
            if task.on_item_failure == OnItemFailure::FailFast && task.is_mapped() {
                diags.push(
                    Diagnostic::error(
                        Category::InvalidValue,
                        "min-success-needs-continue",
                        "`min_success` needs `on_item_failure = \"continue\"`",
                    )
                    .at(ms.span, "fail_fast fails at the first failed instance")
                    .help("set `on_item_failure = \"continue\"` to tolerate failed instances"),
                );
            }
            if let Some(MapSpec::Static(items)) = &task.map {
                if ms.value as usize > items.len() {
                    diags.push(
                        Diagnostic::error(
                            Category::InvalidValue,
                            "out-of-range",
                            format!(
                                "`min_success` is {} but `map` has only {} items",
                                ms.value,
                                items.len()
                            ),
                        )
                        .at(ms.span, "can never be reached"),
                    );
                }
            }
        }
    }
}
