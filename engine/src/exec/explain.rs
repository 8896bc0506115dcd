//! `plan --explain`: for each plan node, whether `apply` would run it or it is satisfied by a
//! cached result, and why, naming the parts of its cache key that changed since it last succeeded.
//! It walks the plan as `apply` would, using cached outputs where `apply` would use real ones.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;
use serde_json::Value;

use super::context::{self, RunScope, Upstream};
use crate::compile::Compiled;
use crate::model::Action;
use crate::plan::{PlannedTask, WhenState};
use crate::store::{Store, StoreError};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// A result with the same cache key exists: `apply` would not run it.
    Satisfied,
    /// `apply` would run it.
    Run,
    /// `apply` would skip it (`when` is false, or what it needs is skipped).
    Skip,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Explanation {
    pub task: String,
    pub verdict: Verdict,
    pub reason: String,
    /// Cache key parts that differ from the node's last success (`command`, `env`, `upstream`...).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// With `sources` among them: the files that changed (`src/a.rs`, `b.rs (deleted)`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
}

/// What is known of a task while walking the plan.
enum Known {
    /// Every node satisfied or skipped: their (node id, key, output, commit), in instance order (a
    /// skipped node has an empty key and a null output, as in `apply`).
    Satisfied(Vec<(String, String, Value, Option<String>)>),
    Skipped,
    WillRun,
}

/// `store` is `None` when nothing ever ran (there is no state yet): then nothing is cached.
pub fn explain(
    compiled: &Compiled,
    store: Option<&Store>,
    clusterfile: &str,
    fresh: bool,
    run_base: Option<&str>,
    fingerprints: &mut super::fingerprint::Fingerprints,
    rehearse: Option<&crate::scripted::Script>,
) -> Result<Vec<Explanation>, StoreError> {
    let wf = &compiled.workflow;
    let scope = RunScope::of(compiled);
    let index = wf.task_index();
    let need_indices = wf.need_indices();
    let ancestors = crate::model::workflow::upstream_reads(wf);
    let mut nodes_of: HashMap<&str, Vec<&PlannedTask>> = HashMap::new();
    for node in &compiled.plan.nodes {
        nodes_of.entry(node.task.as_str()).or_default().push(node);
    }
    let mut order: Vec<usize> = Vec::new();
    for node in &compiled.plan.nodes {
        let t = index[node.task.as_str()];
        if !order.contains(&t) {
            order.push(t);
        }
    }
    let mut known: Vec<Option<Known>> = (0..wf.tasks.len()).map(|_| None).collect();
    let mut out = Vec::new();
    let say = |task: &str, verdict: Verdict, reason: String| Explanation {
        task: task.to_string(),
        verdict,
        reason,
        changed: Vec::new(),
        files: Vec::new(),
    };

    for t in order {
        let task = &wf.tasks[t];
        let planned = nodes_of.get(task.id.as_str()).cloned().unwrap_or_default();
        let needs = &need_indices[t];
        if let Some(&n) = needs
            .iter()
            .find(|&&n| matches!(known[n], Some(Known::WillRun)))
        {
            for node in &planned {
                out.push(say(
                    &node.id,
                    Verdict::Run,
                    format!("`{}` will run first", wf.tasks[n].id),
                ));
            }
            known[t] = Some(Known::WillRun);
            continue;
        }
        let is_merge = matches!(task.action, Action::Merge { .. } | Action::Outputs { .. });
        let skipped: Vec<usize> = needs
            .iter()
            .copied()
            .filter(|&n| matches!(known[n], Some(Known::Skipped)))
            .collect();
        if !skipped.is_empty() && (!is_merge || skipped.len() == needs.len()) {
            for node in &planned {
                out.push(say(
                    &node.id,
                    Verdict::Skip,
                    format!("`{}` is skipped", wf.tasks[skipped[0]].id),
                ));
            }
            known[t] = Some(Known::Skipped);
            continue;
        }
        // Everything upstream is satisfied or skipped: its outputs are the cached ones.
        let results = |a: usize| match &known[a] {
            Some(Known::Satisfied(r)) => r.clone(),
            _ => Vec::new(),
        };
        let upstream: BTreeMap<String, Upstream> = ancestors[t]
            .iter()
            .map(|&a| {
                let outputs: Vec<Value> = results(a).into_iter().map(|(_, _, o, _)| o).collect();
                let value = if wf.tasks[a].is_mapped() {
                    Upstream::Outputs(outputs)
                } else {
                    Upstream::Output(outputs.into_iter().next().unwrap_or(Value::Null))
                };
                (wf.tasks[a].id.to_string(), value)
            })
            .collect();
        let tasks_value = RunScope::tasks_value(&upstream);
        let needed: Vec<(String, String, Value, Option<String>)> =
            needs.iter().flat_map(|&n| results(n)).collect();
        let needed_refs: Vec<(&str, &str, &Value)> = needed
            .iter()
            .map(|(a, b, c, _)| (a.as_str(), b.as_str(), c))
            .collect();
        // As in `apply`: a workspace builds on the commits of the needs that have one.
        let inputs: Vec<crate::workspace::Input> = needs
            .iter()
            .filter(|&&n| wf.tasks[n].has_workspace())
            .flat_map(|&n| results(n))
            .filter_map(|(node, _, _, commit)| {
                Some(crate::workspace::Input {
                    node,
                    commit: commit?,
                })
            })
            .collect();
        // As in `apply`: a task with a workspace of its own has a `base` key part; a shell or
        // agent task without one, its `sources`.
        let read = if task.workspace != crate::model::raw::WorkspaceMode::None {
            fingerprints
                .base(run_base.unwrap_or_default(), &inputs)
                .map(context::Read::Base)
        } else if matches!(task.action, Action::Shell { .. } | Action::Agent { .. }) {
            let sources = planned.first().and_then(|n| n.sources.clone());
            fingerprints
                .sources(sources.as_deref())
                .map(context::Read::Sources)
        } else {
            Ok(context::Read::Sources(None))
        };
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                for node in &planned {
                    out.push(say(
                        &node.id,
                        Verdict::Run,
                        format!("cannot fingerprint what it reads ({e})"),
                    ));
                }
                known[t] = Some(Known::WillRun);
                continue;
            }
        };
        let upstream_hash = context::upstream_hash(&needed_refs);

        let mut instances: Vec<PlannedTask> = planned.iter().map(|n| (*n).clone()).collect();
        if let Some(template) = planned.first().filter(|n| n.dynamic_map.is_some()) {
            let ctx = scope.context(template, &tasks_value, 1);
            let expression = template
                .dynamic_map
                .as_ref()
                .map(|m| m.expression.clone())
                .unwrap_or_default();
            let expanded = scope.list(&expression, &ctx).and_then(|items| {
                super::dispatcher::graph_of(&scope, template, &items, &tasks_value)
                    .map(|graph| (items, graph))
            });
            match expanded {
                Ok((items, graph)) => {
                    instances = items
                        .into_iter()
                        .enumerate()
                        .map(|(i, item)| {
                            let mut node = (*template).clone();
                            node.id = format!("{}[{i}]", task.id);
                            // As in `apply`: a task graph's instances are named by their ids.
                            if let Some(inst) = graph.as_ref().map(|g| &g[i]) {
                                node.id = crate::plan::graph::node_id(task.id.as_str(), &inst.id);
                                node.after = inst
                                    .after
                                    .iter()
                                    .map(|a| crate::plan::graph::node_id(task.id.as_str(), a))
                                    .collect();
                            }
                            node.index = Some(i);
                            node.item = Some(item);
                            node.dynamic_map = None;
                            node
                        })
                        .collect();
                }
                Err(e) => {
                    out.push(say(
                        &template.id,
                        Verdict::Run,
                        format!("its `map` cannot be expanded from cached outputs ({e})"),
                    ));
                    known[t] = Some(Known::WillRun);
                    continue;
                }
            }
        }

        let mut satisfied = Vec::new();
        let mut will_run = false;
        let mut all_skipped = !instances.is_empty();
        // A task graph's instances, each after those it runs after; their results are then put
        // back in list order, the order `apply` reads them in.
        let listed: Vec<String> = instances.iter().map(|n| n.id.clone()).collect();
        let instances = in_graph_order(instances);
        // Decided instances of this task: satisfied (with their commit), or not (`None`).
        let mut decided: HashMap<String, Option<Option<String>>> = HashMap::new();
        for node in &instances {
            // In a task graph, an instance builds on what it runs after, as in `apply`.
            let mut read = read.clone();
            if !node.after.is_empty() {
                if let Some(first) = node
                    .after
                    .iter()
                    .find(|a| !matches!(decided.get(*a), Some(Some(_))))
                {
                    let verdict = if decided.contains_key(first) {
                        Verdict::Skip
                    } else {
                        Verdict::Run
                    };
                    let reason = match verdict {
                        Verdict::Skip => format!("`{first}` is skipped"),
                        _ => format!("`{first}` will run first"),
                    };
                    if verdict == Verdict::Run {
                        will_run = true;
                        all_skipped = false;
                    } else {
                        decided.insert(node.id.clone(), None);
                    }
                    out.push(say(&node.id, verdict, reason));
                    continue;
                }
                if task.workspace != crate::model::raw::WorkspaceMode::None {
                    let mut after = node.after.clone();
                    let position = |id: &String| instances.iter().position(|n| &n.id == id);
                    after.sort_by_key(position);
                    let inputs: Vec<crate::workspace::Input> = after
                        .iter()
                        .filter_map(|a| {
                            Some(crate::workspace::Input {
                                node: a.clone(),
                                commit: decided.get(a).cloned().flatten().flatten()?,
                            })
                        })
                        .collect();
                    match fingerprints.base(run_base.unwrap_or_default(), &inputs) {
                        Ok(base) => read = context::Read::Base(base),
                        Err(e) => {
                            out.push(say(
                                &node.id,
                                Verdict::Run,
                                format!("cannot fingerprint what it reads ({e})"),
                            ));
                            will_run = true;
                            continue;
                        }
                    }
                }
            }
            let ctx = scope.context(node, &tasks_value, 1);
            let when = match &node.when {
                WhenState::Known {
                    value: false,
                    expression,
                } => Some(expression.clone()),
                WhenState::AtRunTime { expression } => match scope.condition(expression, &ctx) {
                    Ok(false) => Some(expression.clone()),
                    _ => None,
                },
                _ => None,
            };
            if let Some(expression) = when {
                out.push(say(
                    &node.id,
                    Verdict::Skip,
                    format!("`when` is false ({expression})"),
                ));
                // As in `apply`, a skipped instance counts in its task's results with no key or output.
                satisfied.push((node.id.clone(), String::new(), Value::Null, None));
                decided.insert(node.id.clone(), None);
                continue;
            }
            all_skipped = false;
            let rendered = match scope.render(node, Some(&ctx)) {
                Ok(r) => r,
                Err(e) => {
                    out.push(say(
                        &node.id,
                        Verdict::Run,
                        format!("cannot render it from cached outputs ({e})"),
                    ));
                    will_run = true;
                    continue;
                }
            };
            let mut parts = context::key_parts(node, &rendered, &upstream_hash, &read);
            if let (Some(script), crate::plan::PlannedAction::Agent { .. }) =
                (rehearse, &node.action)
            {
                // As in `apply --rehearse`: a rehearsed agent's key has its script.
                parts.insert(
                    "rehearsal".into(),
                    context::hash_of(&script.for_task(&node.id)),
                );
            }
            let key = context::key_of(&parts);
            let hit = match store {
                Some(store) => store.cached(&key)?,
                None => None,
            };
            match hit {
                Some(hit) if !fresh => {
                    out.push(say(
                        &node.id,
                        Verdict::Satisfied,
                        format!("cached from run {}", hit.run),
                    ));
                    decided.insert(node.id.clone(), Some(hit.commit.clone()));
                    satisfied.push((node.id.clone(), key, hit.output, hit.commit));
                }
                _ => {
                    will_run = true;
                    let mut e = say(&node.id, Verdict::Run, String::new());
                    if fresh {
                        e.reason = "--fresh ignores cached results".into();
                    } else if let Some(last) = store
                        .map(|s| s.last_success(clusterfile, &node.id))
                        .transpose()?
                        .flatten()
                    {
                        e.changed = context::changed_parts(&last, &parts);
                        e.reason = if e.changed.is_empty() {
                            "its last result is no longer cached".into()
                        } else {
                            let mut reason = format!(
                                "changed since it last succeeded: {}",
                                e.changed.join(", ")
                            );
                            // Which of the files it reads changed, when that was recorded.
                            if let (Some(store), Some(old), Some(new)) =
                                (store, last.get("sources"), parts.get("sources"))
                            {
                                let files = store
                                    .sources::<super::fingerprint::Manifest>(old)?
                                    .and_then(|m| fingerprints.changed_files(&m, new));
                                if let Some(files) = files.filter(|f| !f.is_empty()) {
                                    let more = files.len().saturating_sub(3);
                                    reason.push_str(&format!(
                                        " ({}",
                                        files[..files.len().min(3)].join(", ")
                                    ));
                                    if more > 0 {
                                        reason.push_str(&format!(" and {more} more"));
                                    }
                                    reason.push(')');
                                    e.files = files;
                                }
                            }
                            reason
                        };
                    } else {
                        e.reason = "it never succeeded".into();
                    }
                    out.push(e);
                }
            }
        }
        satisfied.sort_by_key(|(id, ..)| listed.iter().position(|l| l == id));
        known[t] = Some(if will_run {
            Known::WillRun
        } else if all_skipped {
            Known::Skipped
        } else {
            Known::Satisfied(satisfied)
        });
    }
    Ok(out)
}

/// A task's instances with each after the instances it runs after (a task graph's order), the
/// list order kept where the graph allows; a plain map's as they are.
fn in_graph_order(instances: Vec<PlannedTask>) -> Vec<PlannedTask> {
    if instances.iter().all(|n| n.after.is_empty()) {
        return instances;
    }
    let mut placed: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut left = instances;
    let mut out = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let (ready, waiting): (Vec<PlannedTask>, Vec<PlannedTask>) = left
            .into_iter()
            .partition(|n| n.after.iter().all(|a| placed.contains(a)));
        if ready.is_empty() {
            // A cycle cannot reach here (the graph was checked); keep the rest as listed.
            out.extend(waiting);
            break;
        }
        placed.extend(ready.iter().map(|n| n.id.clone()));
        out.extend(ready);
        left = waiting;
    }
    out
}
