//! Task graphs: a fan-out whose instances have ids (`id`) and run after one another (`after`).
//! The same checks hold where the list is known at plan time and when a planner's output arrives
//! at run time: ids well formed and unique, references known, no cycle, a size limit. Each problem
//! is a sentence for people, and for the planner that is asked to answer again.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

/// The most instances one graph may have: a planner that returns more is told so.
pub const MAX_INSTANCES: usize = 500;

/// One instance of a graph: its id, and the ids of the instances it runs after.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub after: Vec<String>,
}

/// The node id of instance `id` of task `task`: `build[scaffold]`.
pub fn node_id(task: &str, id: &str) -> String {
    format!("{task}[{id}]")
}

/// An instance id as `id` rendered it: the text, trimmed.
pub fn id_of(rendered: &str) -> String {
    rendered.trim().to_string()
}

/// The ids `after` gave: a list of strings (an empty or null value is no dependency).
pub fn after_of(value: &Value) -> Result<Vec<String>, String> {
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.trim().to_string()),
                Value::Number(n) => Ok(n.to_string()),
                other => Err(format!("an entry of `after` is {}, not an id", kind(other))),
            })
            .collect(),
        other => Err(format!("`after` gave {}, not a list of ids", kind(other))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Every problem of the graph, in the order of the instances; empty when it is valid.
pub fn problems(instances: &[Instance]) -> Vec<String> {
    let mut out = Vec::new();
    if instances.len() > MAX_INSTANCES {
        out.push(format!(
            "the graph has {} instances; at most {MAX_INSTANCES} are allowed",
            instances.len()
        ));
        return out;
    }
    let mut first: HashMap<&str, usize> = HashMap::new();
    for (i, inst) in instances.iter().enumerate() {
        if inst.id.is_empty() {
            out.push(format!("instance {} has an empty id", i + 1));
        } else if !inst
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            out.push(format!(
                "instance {} has the id `{}`: an id is letters, digits, `_` and `-`",
                i + 1,
                inst.id
            ));
        }
        if let Some(&j) = first.get(inst.id.as_str()) {
            out.push(format!(
                "instances {} and {} both have the id `{}`: ids must be unique",
                j + 1,
                i + 1,
                inst.id
            ));
        } else {
            first.insert(&inst.id, i);
        }
    }
    let ids: Vec<&str> = instances.iter().map(|i| i.id.as_str()).collect();
    for inst in instances {
        for dep in &inst.after {
            if dep == &inst.id {
                out.push(format!("`{}` runs after itself", inst.id));
            } else if !first.contains_key(dep.as_str()) {
                let hint = crate::diagnostic::did_you_mean(dep, ids.iter().copied())
                    .map(|best| format!("; did you mean `{best}`?"))
                    .unwrap_or_default();
                out.push(format!(
                    "`{}` runs after `{dep}`, which no instance has{hint}",
                    inst.id
                ));
            }
        }
    }
    if let Some(cycle) = cycle(instances, &first) {
        out.push(format!("the instances form a cycle: {}", cycle.join(" → ")));
    }
    out
}

/// A cycle among the instances (self-references aside), as the chain of its ids back to the
/// first: depth-first, in instance order, so the same graph names the same cycle.
fn cycle(instances: &[Instance], index: &HashMap<&str, usize>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut marks = vec![Mark::New; instances.len()];
    for start in 0..instances.len() {
        if marks[start] != Mark::New {
            continue;
        }
        // (instance, next edge to follow); the path is the stack.
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        marks[start] = Mark::OnPath;
        while let Some(&mut (at, ref mut edge)) = stack.last_mut() {
            let deps = &instances[at].after;
            if *edge == deps.len() {
                marks[at] = Mark::Done;
                stack.pop();
                continue;
            }
            let dep = &deps[*edge];
            *edge += 1;
            let Some(&next) = index.get(dep.as_str()) else {
                continue;
            };
            if next == at {
                continue;
            }
            match marks[next] {
                Mark::New => {
                    marks[next] = Mark::OnPath;
                    stack.push((next, 0));
                }
                Mark::OnPath => {
                    // Along the path each instance runs after the next one: reversed, the path is
                    // in the order of running. Named from its first instance in list order.
                    let from = stack.iter().position(|(n, _)| *n == next).unwrap_or(0);
                    let mut ring: Vec<usize> =
                        stack[from..].iter().rev().map(|(n, _)| *n).collect();
                    let first = ring
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, n)| **n)
                        .map_or(0, |(i, _)| i);
                    ring.rotate_left(first);
                    ring.push(ring[0]);
                    return Some(ring.iter().map(|n| instances[*n].id.clone()).collect());
                }
                Mark::Done => {}
            }
        }
    }
    None
}

/// The message a graph's problems make: for the failed attempt, and for the planner's next turn.
pub fn describe(task: &str, problems: &[String]) -> String {
    let mut text = format!("the output is not a valid task graph for `{task}`:");
    for p in problems {
        text.push_str("\n- ");
        text.push_str(p);
    }
    text
}

/// Instances in an order where each comes after those it runs after (ties in list order); for a
/// graph that passed [`problems`].
pub fn levels(instances: &[Instance]) -> BTreeMap<usize, Vec<String>> {
    let index: HashMap<&str, usize> = instances
        .iter()
        .enumerate()
        .map(|(i, inst)| (inst.id.as_str(), i))
        .collect();
    let mut level: Vec<Option<usize>> = vec![None; instances.len()];
    fn depth(
        i: usize,
        instances: &[Instance],
        index: &HashMap<&str, usize>,
        level: &mut Vec<Option<usize>>,
        guard: usize,
    ) -> usize {
        if let Some(l) = level[i] {
            return l;
        }
        if guard > instances.len() {
            return 0;
        }
        let l = instances[i]
            .after
            .iter()
            .filter_map(|d| index.get(d.as_str()).copied())
            .map(|d| depth(d, instances, index, level, guard + 1) + 1)
            .max()
            .unwrap_or(0);
        level[i] = Some(l);
        l
    }
    let mut out: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for i in 0..instances.len() {
        let l = depth(i, instances, &index, &mut level, 0);
        out.entry(l).or_default().push(instances[i].id.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> Vec<Instance> {
        edges
            .iter()
            .map(|(id, after)| Instance {
                id: id.to_string(),
                after: after.iter().map(|s| s.to_string()).collect(),
            })
            .collect()
    }

    #[test]
    fn a_valid_graph_has_no_problem_and_levels_in_order() {
        let g = graph(&[
            ("scaffold", &[]),
            ("api", &["scaffold"]),
            ("ui", &["scaffold"]),
            ("tests", &["api", "ui"]),
            ("docs", &[]),
        ]);
        assert!(problems(&g).is_empty());
        let levels = levels(&g);
        assert_eq!(levels[&0], ["scaffold", "docs"]);
        assert_eq!(levels[&1], ["api", "ui"]);
        assert_eq!(levels[&2], ["tests"]);
    }

    #[test]
    fn every_problem_is_named_with_a_hint() {
        let g = graph(&[
            ("scaffold", &[]),
            ("tests", &["scafold"]),
            ("a", &["c"]),
            ("b", &["a"]),
            ("c", &["b"]),
            ("a", &[]),
            ("bad id", &["bad id"]),
        ]);
        assert_eq!(
            problems(&g),
            [
                "instances 3 and 6 both have the id `a`: ids must be unique",
                "instance 7 has the id `bad id`: an id is letters, digits, `_` and `-`",
                "`tests` runs after `scafold`, which no instance has; did you mean `scaffold`?",
                "`bad id` runs after itself",
                "the instances form a cycle: a → b → c → a",
            ]
        );
        let too_many: Vec<Instance> = (0..=MAX_INSTANCES)
            .map(|i| Instance {
                id: i.to_string(),
                after: Vec::new(),
            })
            .collect();
        assert_eq!(
            problems(&too_many),
            ["the graph has 501 instances; at most 500 are allowed"]
        );
    }

    #[test]
    fn after_takes_lists_of_ids_only() {
        assert_eq!(
            after_of(&serde_json::json!(["a", " b ", 3])),
            Ok(vec!["a".to_string(), "b".to_string(), "3".to_string()])
        );
        assert_eq!(after_of(&Value::Null), Ok(Vec::new()));
        assert!(after_of(&serde_json::json!("a")).is_err());
        assert!(after_of(&serde_json::json!([{"id": "a"}])).is_err());
    }
}
