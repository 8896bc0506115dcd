//! Task graphs in the dispatcher: linking a graph's instances by their `after` ids, expanding and
//! checking a graph from upstream outputs (`graph_of`), checking a planner's answer before its
//! success is recorded (`graph_problems`, which fails it as `plan_invalid`), and what an instance
//! builds on (`inputs_of`: its predecessors' commits). See `plan::graph` for the checks.

use std::collections::HashMap;

use minijinja::value::Value as JinjaValue;
use serde_json::Value;

use super::Dispatcher;
use crate::exec::context::RunScope;
use crate::plan::PlannedTask;
use crate::store::TaskState;
use crate::workspace::Input;

impl Dispatcher<'_> {
    /// Links a task graph's instances (a group's nodes) by their `after` ids.
    pub(super) fn link_graph(&mut self, group: usize) {
        let nodes = self.groups[group].nodes.clone();
        let by_id: HashMap<String, usize> = nodes
            .iter()
            .map(|&n| (self.nodes[n].plan.id.clone(), n))
            .collect();
        for &n in &nodes {
            let after: Vec<usize> = self.nodes[n]
                .plan
                .after
                .iter()
                .filter_map(|id| by_id.get(id).copied())
                .collect();
            for &a in &after {
                self.nodes[a].blocks.push(n);
            }
            self.nodes[n].waiting = after.len();
            self.nodes[n].after = after;
        }
    }

    /// Whether the output a node's attempt just gave is a valid task graph for each fan-out that
    /// reads it and can be expanded now (all it needs has succeeded, this node being the last):
    /// `Some(why not)` fails the attempt (`plan_invalid`), and the planner is told on its retry.
    /// A fan-out that also waits for other tasks is checked when it expands instead.
    pub(super) fn graph_problems(&mut self, node: usize, output: &Value) -> Option<String> {
        let group = self.nodes[node].group;
        if self.groups[group].mapped {
            return None;
        }
        for d in self.groups[group].dependents.clone() {
            let g = &self.groups[d];
            let (Some(expression), Some(template)) = (g.dynamic.clone(), g.template.clone()) else {
                continue;
            };
            if template
                .fan_out
                .as_ref()
                .and_then(|f| f.id.as_ref())
                .is_none()
            {
                continue;
            }
            let others_done = g
                .needs
                .iter()
                .all(|&n| n == group || self.groups[n].outcome == Some(TaskState::Succeeded));
            if !others_done {
                continue;
            }
            // As the fan-out will see it once this attempt's output is recorded.
            let kept = self.nodes[node].record.output.replace(output.clone());
            let (tasks, _) = self.upstream_now(d);
            self.nodes[node].record.output = kept;
            let ctx = self.scope.context(&template, &tasks, 1);
            let checked = self
                .scope
                .list(&expression, &ctx)
                .map_err(|e| {
                    crate::plan::graph::describe(
                        &template.task,
                        &[format!("its `map` ({expression}) cannot be evaluated: {e}")],
                    )
                })
                .and_then(|items| self.graph_of(&template, &items, &tasks));
            if let Err(message) = checked {
                return Some(message);
            }
        }
        None
    }

    /// See [`graph_of`].
    pub(super) fn graph_of(
        &self,
        template: &PlannedTask,
        items: &[Value],
        tasks: &JinjaValue,
    ) -> Result<Option<Vec<crate::plan::graph::Instance>>, String> {
        graph_of(&self.scope, template, items, tasks)
    }

    /// What a node builds on: for an instance of a graph that runs after others, their results
    /// (in the graph's order: its start is their merge); else its task's (see [`Self::inputs`]).
    pub(super) fn inputs_of(&self, node: usize) -> Vec<Input> {
        let n = &self.nodes[node];
        if n.after.is_empty() {
            return self.inputs(n.group);
        }
        let mut after = n.after.clone();
        after.sort_by_key(|&a| self.nodes[a].order);
        after
            .iter()
            .filter_map(|&a| {
                let r = &self.nodes[a].record;
                Some(Input {
                    node: r.node.clone(),
                    commit: r.commit.clone()?,
                })
            })
            .collect()
    }
}

/// The instances of a task graph (`id`, `after`) over `items`, checked; `None` for a plain
/// map. `Err`: what is wrong, as the planner is told.
pub(crate) fn graph_of(
    scope: &RunScope,
    template: &PlannedTask,
    items: &[Value],
    tasks: &JinjaValue,
) -> Result<Option<Vec<crate::plan::graph::Instance>>, String> {
    use crate::plan::graph;
    let Some(fan) = &template.fan_out else {
        return Ok(None);
    };
    let Some(id_source) = &fan.id else {
        return Ok(None);
    };
    let text = |source: &str| crate::plan::Text {
        template: source.to_string(),
        rendered: None,
    };
    let mut instances = Vec::with_capacity(items.len());
    let mut problems = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let mut node = template.clone();
        node.index = Some(i);
        node.item = Some(item.clone());
        let ctx = scope.context(&node, tasks, 1);
        let id = match scope.value(&text(id_source), &ctx) {
            Ok(Value::String(s)) => graph::id_of(&s),
            Ok(Value::Number(n)) => n.to_string(),
            Ok(other) => {
                problems.push(format!("instance {} has no id (`id` gave {other})", i + 1));
                continue;
            }
            Err(e) => {
                problems.push(format!("instance {}: cannot evaluate `id`: {e}", i + 1));
                continue;
            }
        };
        let after = match &fan.after {
            None => Vec::new(),
            Some(source) => match scope
                .value(&text(source), &ctx)
                .and_then(|v| graph::after_of(&v))
            {
                Ok(after) => after,
                Err(e) => {
                    problems.push(format!("instance `{id}`: {e}"));
                    Vec::new()
                }
            },
        };
        instances.push(graph::Instance { id, after });
    }
    problems.extend(graph::problems(&instances));
    if problems.is_empty() {
        Ok(Some(instances))
    } else {
        Err(graph::describe(&template.task, &problems))
    }
}
