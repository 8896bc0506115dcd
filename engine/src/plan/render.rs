//! Plan output formats: text for people, JSON for tools (documented in docs/plan-json.md), DOT and
//! Mermaid for diagrams.

use std::fmt::Write;

use serde::Serialize;

use crate::model::RetryPolicy;

use super::build::{Plan, PlannedAction, PlannedTask, Summary, Text, WhenState};

/// Version of the JSON plan format; bumped on any incompatible change.
pub const PLAN_FORMAT_VERSION: u32 = 1;

#[derive(Serialize)]
struct JsonPlan<'a> {
    format_version: u32,
    workflow: JsonWorkflow<'a>,
    inputs: &'a indexmap::IndexMap<String, serde_json::Value>,
    summary: &'a Summary,
    /// Declared runners the tasks use (absent when all run locally).
    #[serde(skip_serializing_if = "indexmap::IndexMap::is_empty")]
    runners: &'a indexmap::IndexMap<String, crate::model::workflow::RunnerDecl>,
    policy: JsonPolicy<'a>,
    tasks: &'a [PlannedTask],
}

/// The run-wide part of the effective policy (each agent's limits are in its `settings`).
#[derive(Serialize)]
struct JsonPolicy<'a> {
    changes: &'a crate::policy::ChangePolicy,
    max_run_usd: Option<f64>,
}

#[derive(Serialize)]
struct JsonWorkflow<'a> {
    name: &'a str,
    description: Option<&'a str>,
}

pub fn to_json(plan: &Plan) -> String {
    let doc = JsonPlan {
        format_version: PLAN_FORMAT_VERSION,
        workflow: JsonWorkflow {
            name: &plan.name,
            description: plan.description.as_deref(),
        },
        inputs: &plan.inputs,
        summary: &plan.summary,
        runners: &plan.runners,
        policy: JsonPolicy {
            changes: &plan.policy,
            max_run_usd: plan.max_run_usd,
        },
        tasks: &plan.nodes,
    };
    let mut out =
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    out.push('\n');
    out
}

fn duration(ms: u64) -> String {
    humantime::format_duration(std::time::Duration::from_millis(ms)).to_string()
}

fn text_block(out: &mut String, label: &str, text: &Text) {
    match &text.rendered {
        Some(r) => {
            let _ = writeln!(out, "  {label}:");
            for line in r.trim_end_matches('\n').lines() {
                let _ = writeln!(out, "    | {line}");
            }
        }
        None => {
            let _ = writeln!(out, "  {label} (rendered at run time):");
            for line in text.template.trim_end_matches('\n').lines() {
                let _ = writeln!(out, "    : {line}");
            }
        }
    }
}

pub fn to_text(plan: &Plan) -> String {
    let mut out = String::new();
    let s = &plan.summary;
    let _ = write!(out, "workflow `{}`", plan.name);
    if let Some(d) = &plan.description {
        let _ = write!(out, ": {d}");
    }
    out.push('\n');
    for (k, v) in &plan.inputs {
        let _ = writeln!(out, "input {k} = {v}");
    }
    let n = |count: usize, one: &str, many: &str| {
        format!("{count} {}", if count == 1 { one } else { many })
    };
    let _ = writeln!(
        out,
        "{}, {} ({} agent, {} shell, {} merge); {}, {}, {} skipped",
        n(s.tasks, "task", "tasks"),
        n(s.nodes, "plan node", "plan nodes"),
        s.agent,
        s.shell,
        s.merge,
        n(
            s.static_instances,
            "static map instance",
            "static map instances"
        ),
        n(s.dynamic_maps, "dynamic map", "dynamic maps"),
        s.skipped
    );
    let mut policy = format!("policy: {}", plan.policy.describe());
    if let Some(usd) = plan.max_run_usd {
        policy.push_str(&format!(" | run budget ${usd}"));
    }
    let _ = writeln!(out, "{policy}");
    for (name, r) in &plan.runners {
        let _ = write!(out, "runner {name}: {}", r.kind.name());
        if let Some(image) = &r.image {
            let _ = write!(out, " {image}");
        }
        if let Some(d) = &r.docker {
            let mut parts = vec![format!(
                "pull {}",
                serde_json::to_value(d.pull)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default()
            )];
            parts.push(format!("user {}", d.user.as_deref().unwrap_or("(yours)")));
            if let Some(c) = d.cpus {
                parts.push(format!("cpus {c}"));
            }
            if let Some(m) = d.memory_bytes {
                parts.push(format!("memory {} MiB", m >> 20));
            }
            if let Some(p) = d.pids {
                parts.push(format!("pids {p}"));
            }
            parts.push(format!(
                "network {}",
                d.network
                    .map_or("by task (agents api-only, shell bridge)", |n| n.name())
            ));
            for m in &d.mounts {
                parts.push(format!("mount {}:{} (read-only)", m.host, m.container));
            }
            if !d.allow_hosts.is_empty() {
                parts.push(format!("allow {}", d.allow_hosts.join(", ")));
            }
            if !d.env.is_empty() {
                parts.push(format!(
                    "env {}",
                    d.env.keys().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
            let _ = write!(out, " ({})", parts.join("; "));
        }
        if let Some(k) = &r.kubernetes {
            let _ = write!(out, " ({})", kubernetes_parts(k).join("; "));
        }
        out.push('\n');
    }
    let default_on = RetryPolicy::default().on;
    for (i, node) in plan.nodes.iter().enumerate() {
        out.push('\n');
        let _ = writeln!(out, "{}. {} [{}]", i + 1, node.id, node.action.kind());
        if let Some(d) = &node.description {
            let _ = writeln!(out, "  {d}");
        }
        if let Some(item) = &node.item {
            let _ = writeln!(out, "  item: {item}");
        }
        if let Some(m) = &node.dynamic_map {
            let _ = writeln!(
                out,
                "  map (expanded at run time from {}): {}",
                m.from.join(", "),
                m.expression
            );
        }
        if !node.needs.is_empty() {
            let _ = writeln!(out, "  needs: {}", abbreviate(&node.needs));
        }
        match &node.when {
            WhenState::Always => {}
            WhenState::Known {
                expression,
                value: true,
            } => {
                let _ = writeln!(out, "  when: {expression} (true)");
            }
            WhenState::Known {
                expression,
                value: false,
            } => {
                let _ = writeln!(out, "  when: {expression} (false: skipped)");
            }
            WhenState::AtRunTime { expression } => {
                let _ = writeln!(out, "  when: {expression} (evaluated at run time)");
            }
        }
        let r = &node.retry;
        let retry = if r.limit == 0 {
            "none".to_string()
        } else {
            format!(
                "{} (backoff {} x{} max {} jitter {}) on {}",
                r.limit,
                humantime::format_duration(r.backoff.initial),
                r.backoff.factor,
                humantime::format_duration(r.backoff.max),
                r.backoff.jitter,
                if r.on == default_on {
                    "the default classes".to_string()
                } else {
                    r.on.iter().map(|c| c.name()).collect::<Vec<_>>().join(",")
                }
            )
        };
        let _ = writeln!(
            out,
            "  runner: {} | timeout: {} | retries: {retry}",
            node.runner,
            node.timeout_ms.map_or("none".to_string(), duration)
        );
        if let Some(f) = &node.fan_out {
            let _ = writeln!(
                out,
                "  fan-out: max_parallel={} on_item_failure={} min_success={}",
                f.max_parallel.map_or("-".into(), |m| m.to_string()),
                snake(&f.on_item_failure),
                f.min_success.map_or("all".into(), |m| m.to_string())
            );
        }
        if let Some(ws) = &node.workspace {
            let mut line = format!("  workspace: {}", ws.mode.name());
            if let Some(setup) = &ws.setup {
                line.push_str(&format!(" | setup: {setup}"));
            }
            if !ws.copy.is_empty() {
                line.push_str(&format!(" | copy: {}", ws.copy.join(", ")));
            }
            let _ = writeln!(out, "{line}");
        }
        if !node.artifacts.is_empty() {
            let _ = writeln!(out, "  artifacts: {}", node.artifacts.join(", "));
        }
        if !node.reports.is_empty() {
            let _ = writeln!(out, "  reports: {}", node.reports.join(", "));
        }
        if !node.secrets.is_empty() {
            let list: Vec<String> = node
                .secrets
                .iter()
                .map(|u| match &u.delivery {
                    crate::secrets::Delivery::Env(var) => format!("{} (env {var})", u.name),
                    crate::secrets::Delivery::File { file, env } => {
                        format!("{} (file {file}, path in {env})", u.name)
                    }
                })
                .collect();
            let _ = writeln!(out, "  secrets: {}", list.join(", "));
        }
        match &node.action {
            PlannedAction::Agent {
                prompt,
                settings,
                output_schema,
                env,
            } => {
                let mut parts = vec![format!("permission_mode={}", settings.permission_mode)];
                if let Some(m) = &settings.model {
                    parts.insert(0, format!("model={m}"));
                }
                if let Some(t) = settings.max_turns {
                    parts.push(format!("max_turns={t}"));
                }
                if let Some(b) = settings.max_budget_usd {
                    parts.push(format!("max_budget_usd={b}"));
                }
                if !settings.allowed_tools.is_empty() {
                    parts.push(format!(
                        "allowed_tools={}",
                        settings.allowed_tools.join(",")
                    ));
                }
                if !settings.disallowed_tools.is_empty() {
                    parts.push(format!(
                        "disallowed_tools={}",
                        settings.disallowed_tools.join(",")
                    ));
                }
                if settings.append_system_prompt.is_some() {
                    parts.push("append_system_prompt=yes".into());
                }
                if settings.settings.is_some() {
                    parts.push("settings=yes".into());
                }
                if output_schema.is_some() {
                    parts.push("output_schema=yes".into());
                }
                let _ = writeln!(out, "  claude: {}", parts.join(" "));
                for (k, v) in env {
                    text_block(&mut out, &format!("env {k}"), v);
                }
                text_block(&mut out, "prompt", prompt);
            }
            PlannedAction::Shell {
                run,
                env,
                workdir,
                output,
            } => {
                if let Some(w) = workdir {
                    text_block(&mut out, "workdir", w);
                }
                for (k, v) in env {
                    text_block(&mut out, &format!("env {k}"), v);
                }
                if *output != crate::model::raw::OutputMode::Text {
                    let _ = writeln!(out, "  output: json");
                }
                text_block(&mut out, "run", run);
            }
            PlannedAction::Merge {
                strategy,
                on_conflict,
                resolve,
                ..
            } => {
                let _ = writeln!(
                    out,
                    "  merge: strategy={} on_conflict={}",
                    snake(strategy),
                    snake(on_conflict)
                );
                if let Some(r) = resolve {
                    let _ = writeln!(out, "  resolve: {r}");
                }
            }
            PlannedAction::Outputs { values, result } => {
                if let Some(r) = result {
                    let _ = writeln!(out, "  result: {r}");
                }
                for (k, v) in values {
                    text_block(&mut out, &format!("output {k}"), v);
                }
            }
        }
    }
    out
}

/// The serde name of an enum value (`fail_fast`), as written in clusterfiles.
fn snake<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// At most 8 ids, then a count: a merge of 10,000 instances stays readable.
fn abbreviate(ids: &[String]) -> String {
    if ids.len() <= 8 {
        ids.join(", ")
    } else {
        format!("{}, … ({} in all)", ids[..8].join(", "), ids.len())
    }
}

fn node_label(node: &PlannedTask) -> String {
    format!("{} ({})", node.id, node.action.kind())
}

pub fn to_dot(plan: &Plan) -> String {
    let mut out = String::from("digraph plan {\n  rankdir=LR;\n  node [shape=box];\n");
    for node in &plan.nodes {
        let style = if matches!(node.when, WhenState::Known { value: false, .. }) {
            ", style=dashed"
        } else {
            ""
        };
        let _ = writeln!(
            out,
            "  {:?} [label={:?}{style}];",
            node.id,
            node_label(node)
        );
    }
    for edge in plan.graph.raw_edges() {
        let from = &plan.nodes[plan.graph[edge.source()]].id;
        let to = &plan.nodes[plan.graph[edge.target()]].id;
        let _ = writeln!(out, "  {from:?} -> {to:?};");
    }
    out.push_str("}\n");
    out
}

pub fn to_mermaid(plan: &Plan) -> String {
    let mut out = String::from("flowchart LR\n");
    for (i, node) in plan.nodes.iter().enumerate() {
        let label = node_label(node).replace('"', "#quot;");
        let _ = writeln!(out, "  n{i}[\"{label}\"]");
    }
    for edge in plan.graph.raw_edges() {
        let _ = writeln!(
            out,
            "  n{} --> n{}",
            plan.graph[edge.source()],
            plan.graph[edge.target()]
        );
    }
    out
}

/// A `kubernetes` runner's settings on its `runner` line: what its pods get, defaults spelt out.
fn kubernetes_parts(k: &crate::model::workflow::KubernetesSettings) -> Vec<String> {
    let pairs = |m: &indexmap::IndexMap<String, String>, sep: &str| {
        m.iter()
            .map(|(k, v)| format!("{k}{sep}{v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut parts = vec![
        format!("context {}", k.context.as_deref().unwrap_or("(current)")),
        format!(
            "namespace {}",
            k.namespace.as_deref().unwrap_or("(the context's)")
        ),
    ];
    if let Some(sa) = &k.service_account {
        parts.push(format!("service account {sa}"));
    }
    parts.push(format!(
        "pull {}",
        crate::model::raw::PullPolicy::ALL
            .iter()
            .find(|(_, p)| *p == k.pull)
            .map_or("missing", |(n, _)| n)
    ));
    if !k.requests.is_empty() {
        parts.push(format!("requests {}", pairs(&k.requests, " ")));
    }
    if !k.limits.is_empty() {
        parts.push(format!("limits {}", pairs(&k.limits, " ")));
    }
    if !k.node_selector.is_empty() {
        parts.push(format!("node selector {}", pairs(&k.node_selector, "=")));
    }
    for t in &k.tolerations {
        // `dedicated=ci, NoSchedule`; `nvidia.com/gpu, any value, any effect`.
        let mut text = t.key.clone().unwrap_or_else(|| "every taint".to_string());
        match (t.operator.as_deref(), &t.value) {
            (Some("Exists"), _) if t.key.is_some() => text.push_str(", any value"),
            (Some("Exists"), _) => {}
            (_, value) => text.push_str(&format!("={}", value.as_deref().unwrap_or(""))),
        }
        text.push_str(&format!(
            ", {}",
            t.effect.as_deref().unwrap_or("any effect")
        ));
        if let Some(s) = t.toleration_seconds {
            text.push_str(&format!(" for {s}s"));
        }
        parts.push(format!("tolerate {text}"));
    }
    if !k.image_pull_secrets.is_empty() {
        parts.push(format!("pull secrets {}", k.image_pull_secrets.join(", ")));
    }
    if !k.labels.is_empty() {
        parts.push(format!("labels {}", pairs(&k.labels, "=")));
    }
    if !k.annotations.is_empty() {
        parts.push(format!(
            "annotations {}",
            k.annotations.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    if let Some(ttl) = k.ttl_seconds_after_finished {
        parts.push(format!("finished Jobs kept {ttl}s"));
    }
    parts.push(format!(
        "network {}",
        k.network
            .map_or("by task (agents api-only, shell bridge)", |n| n.name())
    ));
    if !k.allow_hosts.is_empty() {
        parts.push(format!("allow {}", k.allow_hosts.join(", ")));
    }
    if !k.env.is_empty() {
        parts.push(format!(
            "env {}",
            k.env.keys().cloned().collect::<Vec<_>>().join(", ")
        ));
    }
    parts.push(format!(
        "git {}",
        k.remote
            .as_ref()
            .map_or("over ccluster's endpoint".to_string(), |r| format!(
                "through remote {r}"
            ))
    ));
    parts.push(format!(
        "unschedulable for {} fails",
        humantime::format_duration(k.unschedulable_timeout)
    ));
    parts
}
