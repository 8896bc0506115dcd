//! Run-time rendering and cache keys: templates the plan could not render (they read upstream
//! outputs or `attempt`) are rendered when their task is ready, and every task instance gets a
//! key that hashes everything that decides its result.

use std::collections::BTreeMap;

use minijinja::value::Value as JinjaValue;
use minijinja::{context, Environment};
use serde_json::Value;

use crate::model::template;
use crate::plan::{PlannedAction, PlannedTask, Text};
use crate::store::KeyParts;

/// Version of the cache key recipe: changing what goes into keys must change this.
const KEY_RECIPE: &str = "ccluster-key-3";

/// The values every template of a run can read.
pub struct RunScope {
    env: Environment<'static>,
    base: JinjaValue,
}

/// An upstream result as templates see it: `tasks.<id>.output` or, mapped, `tasks.<id>.outputs`.
pub enum Upstream {
    Output(Value),
    Outputs(Vec<Value>),
}

/// The concrete commands of one attempt.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub command: String,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
}

impl RunScope {
    pub fn new(
        inputs: &indexmap::IndexMap<String, Value>,
        vars: &indexmap::IndexMap<String, Value>,
        name: &str,
        description: Option<&str>,
    ) -> RunScope {
        RunScope {
            env: template::environment(),
            base: context! {
                inputs => JinjaValue::from_serialize(inputs),
                vars => JinjaValue::from_serialize(vars),
                workflow => context! { name => name, description => description },
            },
        }
    }

    /// The scope of a compiled workflow: its planned input values, vars and name.
    pub fn of(compiled: &crate::compile::Compiled) -> RunScope {
        let wf = &compiled.workflow;
        RunScope::new(
            &compiled.plan.inputs,
            &wf.vars,
            &wf.name,
            wf.description.as_deref(),
        )
    }

    /// What templates see as `tasks`: each upstream task's `output` (or, mapped, `outputs`). Built
    /// once per task, shared by all its instances and attempts.
    pub fn tasks_value(upstream: &BTreeMap<String, Upstream>) -> JinjaValue {
        let tasks: BTreeMap<&str, JinjaValue> = upstream
            .iter()
            .map(|(id, u)| {
                let v = match u {
                    Upstream::Output(o) => context! { output => JinjaValue::from_serialize(o) },
                    Upstream::Outputs(list) => {
                        context! { outputs => JinjaValue::from_serialize(list) }
                    }
                };
                (id.as_str(), v)
            })
            .collect();
        JinjaValue::from(tasks)
    }

    /// The context of one node at one attempt. A template's task sees its instance's inputs and
    /// vars, and its fellow tasks without their `<prefix>.`.
    pub fn context(&self, node: &PlannedTask, tasks: &JinjaValue, attempt: u32) -> JinjaValue {
        if let Some(scope) = &node.scope {
            let prefix = format!("{}.", scope.prefix);
            let mut own: BTreeMap<String, JinjaValue> = BTreeMap::new();
            if let Ok(keys) = tasks.try_iter() {
                for key in keys {
                    let Some(name) = key.as_str() else { continue };
                    if let Some(rest) = name.strip_prefix(&prefix) {
                        if let Ok(v) = tasks.get_item(&key) {
                            own.insert(rest.to_string(), v);
                        }
                    }
                }
            }
            return context! {
                tasks => JinjaValue::from(own),
                item => node.item.as_ref().map(JinjaValue::from_serialize),
                index => node.index,
                attempt => attempt,
                inputs => JinjaValue::from_serialize(&scope.inputs),
                vars => JinjaValue::from_serialize(&scope.vars),
                ..self.base.clone()
            };
        }
        context! {
            tasks => tasks.clone(),
            item => node.item.as_ref().map(JinjaValue::from_serialize),
            index => node.index,
            attempt => attempt,
            ..self.base.clone()
        }
    }

    /// The paths a node's `touches` name at run time: each entry rendered; an entry that renders to
    /// a JSON list of strings (`"{{ item.files | tojson }}"`) names each of them.
    pub fn touches(&self, node: &PlannedTask, ctx: &JinjaValue) -> Vec<String> {
        let mut out = Vec::new();
        for t in &node.touches {
            let Ok(text) = self.text(t, Some(ctx)) else {
                continue;
            };
            match serde_json::from_str::<Vec<String>>(&text) {
                Ok(list) => out.extend(list),
                Err(_) => out.push(text),
            }
        }
        out
    }

    fn text(&self, text: &Text, ctx: Option<&JinjaValue>) -> Result<String, String> {
        match (&text.rendered, ctx) {
            (Some(done), _) => Ok(done.clone()),
            (None, Some(ctx)) => self
                .env
                .render_str(&text.template, ctx)
                .map_err(|e| self.describe(&e, &text.template, ctx)),
            (None, None) => Err("needs a run-time context".into()),
        }
    }

    /// A value of a template's `[outputs]`: `"{{ expr }}"` alone keeps the expression's type (an
    /// object stays an object); any other text renders to a string.
    pub fn value(&self, text: &Text, ctx: &JinjaValue) -> Result<Value, String> {
        let t = text.template.trim();
        if t.starts_with("{{") && t.ends_with("}}") && t.matches("{{").count() == 1 {
            let expr = self
                .env
                .compile_expression(t[2..t.len() - 2].trim())
                .map_err(|e| describe(&e))?;
            let v = expr.eval(ctx).map_err(|e| self.describe(&e, t, ctx))?;
            if v.is_undefined() {
                return Err(self.undefined(t, ctx));
            }
            return serde_json::to_value(&v).map_err(|e| e.to_string());
        }
        self.text(text, Some(ctx)).map(Value::String)
    }

    /// Renders what a shell node runs at this attempt.
    /// `ctx` may be `None` when every template of the node was rendered at plan time.
    pub fn render(&self, node: &PlannedTask, ctx: Option<&JinjaValue>) -> Result<Rendered, String> {
        match &node.action {
            PlannedAction::Shell {
                run, env, workdir, ..
            } => Ok(Rendered {
                command: self.text(run, ctx).map_err(|e| format!("`run`: {e}"))?,
                env: self.env_vars(env, ctx)?,
                workdir: workdir
                    .as_ref()
                    .map(|w| self.text(w, ctx))
                    .transpose()
                    .map_err(|e| format!("`workdir`: {e}"))?,
            }),
            PlannedAction::Agent { prompt, env, .. } => Ok(Rendered {
                command: self
                    .text(prompt, ctx)
                    .map_err(|e| format!("`prompt`: {e}"))?,
                env: self.env_vars(env, ctx)?,
                workdir: None,
            }),
            PlannedAction::Merge { .. } | PlannedAction::Outputs { .. } => Ok(Rendered {
                command: String::new(),
                env: Vec::new(),
                workdir: None,
            }),
        }
    }

    fn env_vars(
        &self,
        env: &indexmap::IndexMap<String, Text>,
        ctx: Option<&JinjaValue>,
    ) -> Result<Vec<(String, String)>, String> {
        env.iter()
            .map(|(k, v)| {
                self.text(v, ctx)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| format!("`env.{k}`: {e}"))
            })
            .collect()
    }

    /// Evaluates a `when` expression at run time.
    pub fn condition(&self, expression: &str, ctx: &JinjaValue) -> Result<bool, String> {
        let t = template::Template::new(expression.to_string(), Default::default(), "");
        let value = self
            .env
            .compile_expression(t.as_expression())
            .and_then(|e| e.eval(ctx))
            .map_err(|e| self.describe(&e, expression, ctx))?;
        // An undefined guard is a typo, not "false": a misspelt deploy guard must not skip the
        // deploy and report green.
        if value.is_undefined() {
            return Err(self.undefined(expression, ctx));
        }
        Ok(value.is_true())
    }

    /// Evaluates a dynamic `map` expression to its list.
    pub fn list(&self, expression: &str, ctx: &JinjaValue) -> Result<Vec<Value>, String> {
        let t = template::Template::new(expression.to_string(), Default::default(), "");
        let value = self
            .env
            .compile_expression(t.as_expression())
            .and_then(|e| e.eval(ctx))
            .map_err(|e| self.describe(&e, expression, ctx))?;
        if value.is_undefined() {
            return Err(self.undefined(expression, ctx));
        }
        if value.kind() != minijinja::value::ValueKind::Seq {
            return Err(format!(
                "the `map` expression gave {}, not a list",
                value.kind()
            ));
        }
        match serde_json::to_value(&value) {
            Ok(Value::Array(items)) => Ok(items),
            _ => Err("the `map` expression gave a list that is not plain data".into()),
        }
    }
}

impl RunScope {
    /// An error of a template, naming the undefined attribute when that is what went wrong.
    fn describe(&self, e: &minijinja::Error, source: &str, ctx: &JinjaValue) -> String {
        if e.kind() == minijinja::ErrorKind::UndefinedError {
            if let Some(what) = template::undefined_attribute(&self.env, source, ctx) {
                return format!("undefined value: {what}");
            }
        }
        describe(e)
    }

    fn undefined(&self, source: &str, ctx: &JinjaValue) -> String {
        match template::undefined_attribute(&self.env, source, ctx) {
            Some(what) => format!("undefined value: {what}"),
            None => "undefined value".to_string(),
        }
    }
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(d) => format!("{} ({d})", e.kind()),
        None => e.kind().to_string(),
    }
}

fn hash(value: &impl serde::Serialize) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    blake3::hash(&bytes).to_hex()[..16].to_string()
}

/// What a node reads besides its definition and its needs' outputs (see
/// [`super::fingerprint::Fingerprints`]).
#[derive(Clone)]
pub enum Read {
    /// A task with a workspace: the tree it starts from.
    Base(String),
    /// A task without one: its sources' fingerprint, if it has any.
    Sources(Option<String>),
}

/// The parts of a node's cache key, documented in `docs/state.md`. Scheduling settings (retry,
/// timeout, max_parallel, fan-out policy) and descriptions are left out on purpose: changing them
/// does not change a result.
pub fn key_parts(node: &PlannedTask, rendered: &Rendered, upstream: &str, read: &Read) -> KeyParts {
    let mut parts = KeyParts::new();
    parts.insert("recipe".into(), KEY_RECIPE.into());
    // The plan node's id: two tasks that run the same command are still two tasks (their side
    // effects are the point), so one never takes the other's result.
    parts.insert("node".into(), node.id.clone());
    parts.insert("kind".into(), node.action.kind().into());
    parts.insert("command".into(), hash(&rendered.command));
    let mut env = rendered.env.clone();
    env.sort();
    parts.insert("env".into(), hash(&env));
    parts.insert("workdir".into(), hash(&rendered.workdir));
    let settings = match &node.action {
        PlannedAction::Shell { output, .. } => serde_json::json!({ "output": output }),
        PlannedAction::Agent {
            settings,
            output_schema,
            ..
        } => serde_json::json!({ "settings": settings, "output_schema": output_schema }),
        PlannedAction::Outputs { values, result } => {
            serde_json::json!({ "outputs": values, "result": result })
        }
        PlannedAction::Merge {
            strategy,
            on_conflict,
            resolve,
            agent,
        } => {
            serde_json::json!({ "strategy": strategy, "on_conflict": on_conflict, "resolve": resolve, "agent": agent })
        }
    };
    parts.insert("settings".into(), hash(&settings));
    if let Some(ws) = &node.workspace {
        parts.insert("workspace".into(), hash(ws));
    }
    match read {
        Read::Base(base) => {
            parts.insert("base".into(), base.clone());
        }
        Read::Sources(Some(sources)) => {
            parts.insert("sources".into(), sources.clone());
        }
        Read::Sources(None) => {}
    }
    parts.insert("item".into(), hash(&(&node.index, &node.item)));
    parts.insert("runner".into(), hash(&node.runner));
    // Which secrets a task gets, and how, changes what it does; their values are never hashed
    // (a key is written to the state). A part only when there are some: other keys stay as they
    // were.
    if !node.secrets.is_empty() {
        parts.insert("secrets".into(), hash(&node.secrets));
    }
    parts.insert("upstream".into(), upstream.to_string());
    parts
}

/// The hash of any value, as key parts are made.
pub fn hash_of(value: &impl serde::Serialize) -> String {
    hash(value)
}

/// The hash of what a task's needs produced: each needed plan node's id, key and output.
pub fn upstream_hash(upstream: &[(&str, &str, &Value)]) -> String {
    hash(&upstream)
}

/// The cache key from its parts.
pub fn key_of(parts: &KeyParts) -> String {
    blake3::hash(&serde_json::to_vec(parts).unwrap_or_default())
        .to_hex()
        .to_string()
}

/// The parts that differ between two keys, for `plan --explain`.
pub fn changed_parts(old: &KeyParts, new: &KeyParts) -> Vec<String> {
    new.iter()
        .filter(|(k, v)| old.get(*k) != Some(v))
        .map(|(k, _)| k.clone())
        .collect()
}
