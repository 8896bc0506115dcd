//! Builds the [`Plan`] from a [`Workflow`].

use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::rc::Rc;

use indexmap::IndexMap;
use minijinja::value::Value as JinjaValue;
use minijinja::{context, Environment};
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;
use serde_json::Value;

use super::graph;
use crate::diagnostic::{Category, Diagnostic};
use crate::model::raw::{MergeStrategy, OnConflict, OnItemFailure, OutputMode, WorkspaceMode};
use crate::model::template::{self, is_runtime_name, Template};
use crate::model::workflow::{Action, AgentSettings, MapSpec, RetryPolicy, Task, When, Workflow};

/// A template's text in the plan: rendered now, or at run time (it reads an upstream output or an
/// input that has no value yet).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Text {
    pub template: String,
    /// `None` when the template can only be rendered at run time.
    pub rendered: Option<String>,
}

/// What a plan node does, with templates rendered where knowable.
#[allow(clippy::large_enum_variant)] // one per node; agent nodes dominate, boxing buys nothing
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PlannedAction {
    Agent {
        prompt: Text,
        settings: AgentSettings,
        #[serde(skip_serializing_if = "Option::is_none")]
        output_schema: Option<Value>,
        env: IndexMap<String, Text>,
    },
    Shell {
        run: Text,
        env: IndexMap<String, Text>,
        workdir: Option<Text>,
        output: OutputMode,
    },
    /// A template instance as a whole: its declared outputs, and the task whose branch is its result.
    Outputs {
        values: IndexMap<String, Text>,
        #[serde(skip_serializing_if = "Option::is_none")]
        result: Option<String>,
    },
    Merge {
        strategy: MergeStrategy,
        on_conflict: OnConflict,
        #[serde(skip_serializing_if = "Option::is_none")]
        resolve: Option<String>,
        /// With `on_conflict = "agent"`: the resolving agent's settings.
        #[serde(skip_serializing_if = "Option::is_none")]
        agent: Option<AgentSettings>,
    },
}

/// The template instance a task belongs to: `tasks.x` in its templates means `<prefix>.x`, and
/// `inputs` are the instance's.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannedScope {
    pub prefix: String,
    pub inputs: Value,
    pub vars: Value,
}

/// A task's own workspace: where it runs and how the workspace is prepared.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannedWorkspace {
    pub mode: WorkspaceMode,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub setup: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub copy: Vec<String>,
}

impl PlannedAction {
    pub fn kind(&self) -> &'static str {
        match self {
            PlannedAction::Agent { .. } => "agent",
            PlannedAction::Shell { .. } => "shell",
            PlannedAction::Merge { .. } => "merge",
            PlannedAction::Outputs { .. } => "outputs",
        }
    }
}

/// Whether the task's `when` lets it run.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WhenState {
    /// No `when`.
    Always,
    /// Evaluated at plan time.
    Known { expression: String, value: bool },
    /// Reads upstream outputs: evaluated when the task is ready.
    AtRunTime { expression: String },
}

/// A map whose list comes from upstream outputs; expanded when those finish.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DynamicMap {
    pub expression: String,
    pub from: Vec<String>,
}

/// One node of the plan: a task, one instance of a mapped task, or a dynamic map's placeholder.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannedTask {
    /// `build`, `theme[2]` (static instance) or `shard[*]` (dynamic map placeholder).
    pub id: String,
    pub task: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub item: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dynamic_map: Option<DynamicMap>,
    /// Ids of the plan nodes this one runs after.
    pub needs: Vec<String>,
    /// In a task graph: the instances of the same task this one runs after (also in `needs`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
    /// In a task graph with `on_conflict = "agent"`: the agent that resolves a conflicting merge
    /// of what an instance runs after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resolver: Option<AgentSettings>,
    pub when: WhenState,
    pub runner: String,
    pub timeout_ms: Option<u64>,
    pub retry: RetryPolicy,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<FanOut>,
    pub artifacts: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<String>,
    /// `None`: the task runs in the clusterfile's directory and leaves no branch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workspace: Option<PlannedWorkspace>,
    /// Tasks without a workspace: globs of the files it reads (absent: the repository's files).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sources: Option<Vec<String>>,
    /// Paths the task is told to change.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub touches: Vec<Text>,
    /// For a template's task: the instance it belongs to and its inputs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<std::sync::Arc<PlannedScope>>,
    /// The secrets the node gets (names and how they are delivered; never values).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<crate::secrets::SecretUse>,
    pub action: PlannedAction,
}

/// Fan-out settings, on instances of mapped tasks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FanOut {
    pub max_parallel: Option<u32>,
    pub on_item_failure: OnItemFailure,
    pub min_success: Option<u32>,
    /// A task graph's instance ids (`id`, a template) and dependencies (`after`, an expression).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub tasks: usize,
    pub nodes: usize,
    pub agent: usize,
    pub shell: usize,
    pub merge: usize,
    pub static_instances: usize,
    pub dynamic_maps: usize,
    pub skipped: usize,
}

/// The sealed plan. `nodes` are in a deterministic topological order (declaration order of tasks,
/// then instance index); `graph` holds the same nodes (weight = position in `nodes`) and an edge
/// from each dependency to its dependent.
#[derive(Clone, Debug)]
pub struct Plan {
    pub name: String,
    pub description: Option<String>,
    pub inputs: IndexMap<String, Value>,
    pub summary: Summary,
    pub nodes: Vec<PlannedTask>,
    pub graph: DiGraph<usize, ()>,
    /// The declared runners the plan's nodes use (not `local`), as checked: where they run.
    pub runners: IndexMap<String, crate::model::workflow::RunnerDecl>,
    /// What every task's change may hold (`[policy]` and an operator's, the stricter winning).
    pub policy: crate::policy::ChangePolicy,
    /// The run's agent budget, US dollars.
    pub max_run_usd: Option<f64>,
}

/// Renders a workflow's templates at plan time. Each template is parsed and analysed once (the
/// first time it is used) and then rendered for every instance: a map of 10,000 items parses its
/// prompt once, not 10,000 times.
struct Renderer<'e, 'w> {
    env: &'e Environment<'w>,
    base: JinjaValue,
    /// Inputs that have a value; a template that reads another input is rendered at run time.
    known_inputs: &'w IndexMap<String, Value>,
    all_inputs_known: bool,
    /// Compiled templates, keyed by the address of the `Template` in the workflow, which neither
    /// moves nor changes while the plan is built.
    cache: RefCell<HashMap<usize, Rc<Compiled<'e, 'w>>>>,
}

/// A template compiled once, with the free names it reads.
struct Compiled<'e, 'w> {
    names: BTreeSet<String>,
    code: Code<'e, 'w>,
}

enum Code<'e, 'w> {
    /// No template syntax: the text renders as itself.
    Literal,
    Template(minijinja::Template<'e, 'w>),
    Expression(minijinja::Expression<'e, 'w>),
    /// A syntax error, reported by the validator already.
    Invalid,
}

/// A template context and whether `item`/`index` are in it.
struct Ctx {
    value: JinjaValue,
    item_known: bool,
    /// A template's task: its `inputs` are the template instance's, all known.
    scoped: bool,
}

impl<'e, 'w> Renderer<'e, 'w> {
    fn compiled(&self, t: &'w Template, expression: bool) -> Rc<Compiled<'e, 'w>> {
        let key = t as *const Template as usize;
        if let Some(done) = self.cache.borrow().get(&key) {
            return done.clone();
        }
        let compiled = if !expression && t.is_literal() {
            Compiled {
                names: BTreeSet::new(),
                code: Code::Literal,
            }
        } else if expression {
            match self.env.compile_expression(t.as_expression()) {
                Ok(e) => Compiled {
                    names: e.undeclared_variables(true).into_iter().collect(),
                    code: Code::Expression(e),
                },
                Err(_) => Compiled {
                    names: BTreeSet::new(),
                    code: Code::Invalid,
                },
            }
        } else {
            match self.env.template_from_str(&t.source) {
                Ok(tpl) => Compiled {
                    names: tpl.undeclared_variables(true).into_iter().collect(),
                    code: Code::Template(tpl),
                },
                Err(_) => Compiled {
                    names: BTreeSet::new(),
                    code: Code::Invalid,
                },
            }
        };
        let compiled = Rc::new(compiled);
        self.cache.borrow_mut().insert(key, compiled.clone());
        compiled
    }

    fn knowable(&self, names: &BTreeSet<String>, ctx: &Ctx) -> bool {
        let item_known = ctx.item_known;
        names.iter().all(|n| {
            !is_runtime_name(n)
                && (item_known || !(n == "item" || n == "index" || n.starts_with("item.")))
                && match n.strip_prefix("inputs.") {
                    _ if ctx.scoped => true,
                    Some(rest) => self
                        .known_inputs
                        .contains_key(rest.split('.').next().unwrap_or(rest)),
                    None => n != "inputs" || self.all_inputs_known,
                }
        })
    }

    /// The context of one plan node; `item_known` is false for a dynamic map's placeholder.
    fn context(
        &self,
        instance: Option<(usize, &Value)>,
        item_known: bool,
        scope: Option<&PlannedScope>,
    ) -> Ctx {
        let base = match scope {
            Some(s) => context! {
                inputs => JinjaValue::from_serialize(&s.inputs),
                vars => JinjaValue::from_serialize(&s.vars),
                ..self.base.clone()
            },
            None => self.base.clone(),
        };
        let value = match instance {
            Some((index, item)) => {
                context! { item => JinjaValue::from_serialize(item), index => index, ..base }
            }
            None => base,
        };
        Ctx {
            value,
            item_known,
            scoped: scope.is_some(),
        }
    }

    /// The values a template instance's inputs take: its `with` values (templates rendered in the
    /// scope that uses it) over its inputs' defaults.
    fn scope_inputs(
        &self,
        decl: &crate::model::raw::ScopeDecl,
        diags: &mut Vec<Diagnostic>,
    ) -> serde_json::Map<String, Value> {
        let outer = decl.parent.as_ref().map(|p| {
            let inputs = self.scope_inputs(p, diags);
            context! {
                inputs => JinjaValue::from_serialize(&inputs),
                vars => JinjaValue::from_serialize(&p.vars),
                ..self.base.clone()
            }
        });
        let ctx = outer.unwrap_or_else(|| self.base.clone());
        let mut out: serde_json::Map<String, Value> = decl
            .defaults
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in &decl.with {
            let value = match v.as_str() {
                Some(text) if text.contains("{{") => {
                    let t = text.trim();
                    // `"{{ inputs.files }}"` keeps its type (a list stays a list).
                    let whole =
                        t.starts_with("{{") && t.ends_with("}}") && t.matches("{{").count() == 1;
                    let evaluated = if whole {
                        self.env
                            .compile_expression(t[2..t.len() - 2].trim())
                            .and_then(|e| e.eval(&ctx))
                            .map(|v| serde_json::to_value(&v).unwrap_or(Value::Null))
                    } else {
                        self.env.render_str(text, &ctx).map(Value::String)
                    };
                    match evaluated {
                        Ok(v) => v,
                        Err(e) => {
                            diags.push(Diagnostic::error(
                                Category::Template,
                                "parameter-value",
                                format!("cannot evaluate the `with` value `{k}` (`{text}`): {e}"),
                            ).help("`with` values may use the using workflow's inputs and vars, not task outputs"));
                            Value::Null
                        }
                    }
                }
                _ => v.clone(),
            };
            // A rendered value must still be of the input's type.
            if let Some(ty) = decl.types.get(k) {
                if !value.is_null() && !ty.accepts(&value) {
                    diags.push(
                        Diagnostic::error(
                            Category::Template,
                            "parameter-type",
                            format!(
                                "`{k}` of template `{}` is a {}, but its `with` value gives {value}",
                                decl.template,
                                ty.name()
                            ),
                        )
                        .help(format!("pass a {} for `{k}`", ty.name())),
                    );
                }
            }
            out.insert(k.clone(), value);
        }
        out
    }

    fn render(
        &self,
        t: &'w Template,
        ctx: &Ctx,
        field: &str,
        task: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> Text {
        let compiled = self.compiled(t, false);
        let rendered = match &compiled.code {
            Code::Literal => Some(t.source.clone()),
            Code::Template(tpl) if self.knowable(&compiled.names, ctx) => {
                match tpl.render(&ctx.value) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        let e = self.named_undefined(e, t, ctx);
                        diags.push(template::render_error(t, &e, field, task));
                        None
                    }
                }
            }
            _ => None,
        };
        Text {
            template: t.source.clone(),
            rendered,
        }
    }

    fn render_env(
        &self,
        env: &'w IndexMap<String, Template>,
        ctx: &Ctx,
        task: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> IndexMap<String, Text> {
        env.iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    self.render(v, ctx, &format!("env.{k}"), task, diags),
                )
            })
            .collect()
    }

    /// An undefined-value error with the attribute it could not find named in its detail.
    fn named_undefined(&self, e: minijinja::Error, t: &Template, ctx: &Ctx) -> minijinja::Error {
        if e.kind() != minijinja::ErrorKind::UndefinedError {
            return e;
        }
        match template::undefined_attribute(self.env, &t.source, &ctx.value) {
            Some(what) => minijinja::Error::new(minijinja::ErrorKind::UndefinedError, what),
            None => e,
        }
    }

    /// Evaluates an expression: `Some(Some(value))` when knowable now, `Some(None)` when only at run
    /// time, `None` after reporting an error.
    fn eval(
        &self,
        t: &'w Template,
        ctx: &Ctx,
        field: &str,
        task: &str,
        diags: &mut Vec<Diagnostic>,
    ) -> Option<Option<JinjaValue>> {
        let compiled = self.compiled(t, true);
        match &compiled.code {
            Code::Expression(e) if self.knowable(&compiled.names, ctx) => {
                let evaluated = e.eval(&ctx.value).and_then(|v| {
                    // An expression that names nothing (a misspelt attribute) is an error, not a
                    // false `when` or an empty value.
                    if v.is_undefined() {
                        Err(minijinja::Error::from(minijinja::ErrorKind::UndefinedError))
                    } else {
                        Ok(v)
                    }
                });
                match evaluated {
                    Ok(v) => Some(Some(v)),
                    Err(err) => {
                        let err = self.named_undefined(err, t, ctx);
                        diags.push(template::render_error(t, &err, field, task));
                        None
                    }
                }
            }
            _ => Some(None),
        }
    }
}

/// Builds the plan. Expects a workflow without errors (acyclic, names resolved).
pub fn build(
    workflow: &Workflow,
    inputs: &IndexMap<String, Value>,
    diags: &mut Vec<Diagnostic>,
) -> Plan {
    let env = template::environment();
    let renderer = Renderer {
        env: &env,
        base: context! {
            inputs => JinjaValue::from_serialize(inputs),
            vars => JinjaValue::from_serialize(&workflow.vars),
            workflow => context! { name => workflow.name.clone(), description => workflow.description.clone() },
        },
        known_inputs: inputs,
        all_inputs_known: workflow.inputs.keys().all(|k| inputs.contains_key(k)),
        cache: RefCell::new(HashMap::new()),
    };

    let order = task_order(workflow);
    let mut nodes: Vec<PlannedTask> = Vec::new();
    // Plan node ids of each task's instances, by task position.
    let mut instance_ids: Vec<Vec<String>> = vec![Vec::new(); workflow.tasks.len()];
    // Template instances' scopes, evaluated once each.
    let mut scopes: HashMap<usize, std::sync::Arc<PlannedScope>> = HashMap::new();
    let index = workflow.task_index();
    let mut summary = Summary {
        tasks: workflow.tasks.len(),
        ..Summary::default()
    };

    for &ti in &order {
        let task = &workflow.tasks[ti];
        let diags_before = diags.len();
        let needs: Vec<String> = task
            .needs
            .iter()
            .filter_map(|n| index.get(n.value.as_str()))
            .flat_map(|&j| instance_ids[j].iter().cloned())
            .collect();
        let scope = task.scope.as_ref().map(|origin| {
            let key = std::sync::Arc::as_ptr(origin) as usize;
            if let Some(done) = scopes.get(&key) {
                return std::sync::Arc::clone(done);
            }
            let planned = std::sync::Arc::new(PlannedScope {
                prefix: origin.prefix.clone(),
                inputs: Value::Object(renderer.scope_inputs(&origin.scope, diags)),
                vars: serde_json::to_value(&origin.scope.vars).unwrap_or(Value::Null),
            });
            scopes.insert(key, std::sync::Arc::clone(&planned));
            planned
        });
        let base_ctx = renderer.context(None, true, scope.as_deref());
        match &task.map {
            None => {
                                let mut node = plan_instance(&renderer, task, &base_ctx, task.id.to_string(), needs.clone(), diags);
                node.scope = scope.clone();
                instance_ids[ti].push(node.id.clone());
                nodes.push(node);
            }
            Some(MapSpec::Static(items)) => {
                warn_if_empty(items, task, diags);
                summary.static_instances += items.len();
                let first = nodes.len();
                                                expand(&renderer, task, items, &needs, &mut nodes, &mut instance_ids[ti], scope.as_ref(), diags);
                warn_if_overlapping(task, &nodes[first..], diags);
            }
            Some(MapSpec::Expression(m)) => match renderer.eval(m, &base_ctx, "map", task.id.as_str(), diags) {
                None => {}
                Some(Some(value)) => match list_of(&value) {
                    Some(items) => {
                        warn_if_empty(&items, task, diags);
                        summary.static_instances += items.len();
                        let first = nodes.len();
                                                                        expand(&renderer, task, &items, &needs, &mut nodes, &mut instance_ids[ti], scope.as_ref(), diags);
                        warn_if_overlapping(task, &nodes[first..], diags);
                    }
                    None => diags.push(
                        Diagnostic::error(Category::MapNotList, "map-not-list", format!("the `map` of task `{}` is not a list: it evaluates to {}", task.id, value.kind()))
                            .at(m.span, "not a list")
                            .help("`map` needs a list: `map = [\"a\", \"b\"]` or `map = \"{{ inputs.files }}\"` with a list input"),
                    ),
                },
                Some(None) => {
                    let from: BTreeSet<String> = renderer
                        .compiled(m, true)
                        .names
                        .iter()
                        .filter_map(|n| n.strip_prefix("tasks.").map(|r| r.split('.').next().unwrap_or(r).to_string()))
                        .collect();
                                        let placeholder_ctx = renderer.context(None, false, scope.as_deref());
                    let mut node = plan_instance(&renderer, task, &placeholder_ctx, format!("{}[*]", task.id), needs.clone(), diags);
                    node.scope = scope.clone();
                    node.dynamic_map = Some(DynamicMap {
                        expression: m.source.clone(),
                        from: from.into_iter().collect(),
                    });
                    summary.dynamic_maps += 1;
                    instance_ids[ti].push(node.id.clone());
                    nodes.push(node);
                }
            },
        }
        if instance_ids[ti].is_empty() {
            // An empty fan-out stands for its own dependencies, so its dependents still wait for them.
            instance_ids[ti] = needs;
        }
        // A template's task: its problems are in the template's file.
        if let Some(origin) = &task.scope {
            for d in &mut diags[diags_before..] {
                d.file.get_or_insert_with(|| origin.file.clone());
            }
        }
    }

    let graph = dependency_graph(&nodes);
    for node in &nodes {
        match node.action {
            PlannedAction::Agent { .. } => summary.agent += 1,
            PlannedAction::Shell { .. } => summary.shell += 1,
            PlannedAction::Merge { .. } | PlannedAction::Outputs { .. } => summary.merge += 1,
        }
        if matches!(node.when, WhenState::Known { value: false, .. }) {
            summary.skipped += 1;
        }
    }
    summary.nodes = nodes.len();

    let runners = workflow
        .runners
        .iter()
        .filter(|(name, _)| *name != "local" && nodes.iter().any(|n| &n.runner == *name))
        .map(|(name, decl)| (name.clone(), decl.clone()))
        .collect();
    Plan {
        name: workflow.name.clone(),
        description: workflow.description.clone(),
        inputs: inputs.clone(),
        summary,
        nodes,
        graph,
        runners,
        policy: workflow.policy.clone(),
        max_run_usd: workflow.max_run_usd,
    }
}

/// The plan's DAG: an edge from each node to every node that needs it.
fn dependency_graph(nodes: &[PlannedTask]) -> DiGraph<usize, ()> {
    let mut graph = DiGraph::<usize, ()>::with_capacity(nodes.len(), nodes.len());
    let ids: HashMap<&str, NodeIndex> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), graph.add_node(i)))
        .collect();
    for (i, node) in nodes.iter().enumerate() {
        for need in &node.needs {
            if let Some(&from) = ids.get(need.as_str()) {
                graph.add_edge(from, NodeIndex::new(i), ());
            }
        }
    }
    graph
}

/// An empty fan-out has no instances; it succeeds at once and its dependents wait only for its own
/// upstream tasks (see [`build`]). Usually a mistake, so say so.
fn warn_if_empty(items: &[Value], task: &Task, diags: &mut Vec<Diagnostic>) {
    if items.is_empty() {
        diags.push(
            Diagnostic::warning(
                Category::MapNotList,
                "empty-map",
                format!(
                    "the `map` of task `{}` is empty: it has no instances",
                    task.id
                ),
            )
            .at(task.span, "no instances")
            .help("tasks that need it run once its own dependencies are done"),
        );
    }
}

/// Whether two `touches` entries can name the same file: equal, one a directory of the other, or
/// one a glob that matches the other.
fn paths_overlap(a: &str, b: &str) -> bool {
    let a = a.trim_end_matches('/');
    let b = b.trim_end_matches('/');
    let inside = |x: &str, dir: &str| x.strip_prefix(dir).is_some_and(|r| r.starts_with('/'));
    let glob = |pattern: &str, path: &str| {
        glob::Pattern::new(pattern)
            .is_ok_and(|p| p.matches(path) || p.matches(&format!("{path}/x")))
    };
    a == b || inside(a, b) || inside(b, a) || glob(a, b) || glob(b, a)
}

/// The first (at most three) pairs of instances whose paths overlap, with what they share
/// (`` `src/a.rs` ``): what `plan` and, for a dynamic map, `apply` warn about.
pub fn overlaps(instances: &[(&str, Vec<&str>)]) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for (i, (a, pa)) in instances.iter().enumerate() {
        for (b, pb) in &instances[i + 1..] {
            let shared = pa
                .iter()
                .flat_map(|x| pb.iter().map(move |y| (*x, *y)))
                .find(|(x, y)| paths_overlap(x, y));
            if let Some((x, y)) = shared {
                let what = if x == y {
                    format!("`{x}`")
                } else {
                    format!("`{x}` and `{y}`")
                };
                out.push((a.to_string(), b.to_string(), what));
                if out.len() == 3 {
                    return out;
                }
            }
        }
    }
    out
}

/// Instances of a fan-out told to change the same paths will likely conflict when merged: say so
/// before any work starts (only what is rendered at plan time can be compared).
fn warn_if_overlapping(task: &Task, instances: &[PlannedTask], diags: &mut Vec<Diagnostic>) {
    let Some(span) = task.touches_span else {
        return;
    };
    let rendered: Vec<(&str, Vec<&str>)> = instances
        .iter()
        .map(|n| {
            (
                n.id.as_str(),
                n.touches
                    .iter()
                    .filter_map(|t| t.rendered.as_deref())
                    .collect(),
            )
        })
        .collect();
    for (a, b, what) in overlaps(&rendered) {
        diags.push(
            Diagnostic::warning(
                Category::TaskKind,
                "overlapping-touches",
                format!("instances `{a}` and `{b}` of task `{}` are told to change {what}", task.id),
            )
            .at(span, "overlapping paths")
            .help("their branches may conflict when merged: give each instance its own files, or set `on_conflict` on the merge"),
        );
    }
}

fn list_of(value: &JinjaValue) -> Option<Vec<Value>> {
    if value.kind() != minijinja::value::ValueKind::Seq {
        return None;
    }
    serde_json::to_value(value).ok().and_then(|v| match v {
        Value::Array(items) => Some(items),
        _ => None,
    })
}

// The plan's growing lists and the task's settings, passed as they are: a struct would only wrap
// them for this one call.
#[allow(clippy::too_many_arguments)]
fn expand<'w>(
    renderer: &Renderer<'_, 'w>,
    task: &'w Task,
    items: &[Value],
    needs: &[String],
    nodes: &mut Vec<PlannedTask>,
    ids: &mut Vec<String>,
    scope: Option<&std::sync::Arc<PlannedScope>>,
    diags: &mut Vec<Diagnostic>,
) {
    nodes.reserve(items.len());
    let first = nodes.len();
    let mut instances: Vec<graph::Instance> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let ctx = renderer.context(Some((i, item)), true, scope.map(|s| &**s));
        // A graph's instance: its id, and the instances it runs after.
        let instance = task
            .instance_id
            .as_ref()
            .and_then(|t| {
                renderer
                    .render(t, &ctx, "id", task.id.as_str(), diags)
                    .rendered
            })
            .map(|id| {
                let id = graph::id_of(&id);
                let after = match &task.after {
                    Some(t) => match renderer.eval(t, &ctx, "after", task.id.as_str(), diags) {
                        Some(Some(v)) => {
                            let v = serde_json::to_value(&v).unwrap_or(Value::Null);
                            graph::after_of(&v).unwrap_or_else(|e| {
                                diags.push(invalid_graph(task, &[format!("instance `{id}`: {e}")]));
                                Vec::new()
                            })
                        }
                        _ => Vec::new(),
                    },
                    None => Vec::new(),
                };
                graph::Instance { id, after }
            });
        let node_id = match &instance {
            Some(inst) => graph::node_id(task.id.as_str(), &inst.id),
            None => format!("{}[{i}]", task.id),
        };
        let mut node_needs = needs.to_vec();
        if let Some(inst) = &instance {
            let after: Vec<String> = inst
                .after
                .iter()
                .map(|a| graph::node_id(task.id.as_str(), a))
                .collect();
            node_needs.extend(after.iter().cloned());
            instances.push(inst.clone());
        }
        let mut node = plan_instance(renderer, task, &ctx, node_id, node_needs, diags);
        if let Some(inst) = &instance {
            node.after = inst
                .after
                .iter()
                .map(|a| graph::node_id(task.id.as_str(), a))
                .collect();
        }
        node.index = Some(i);
        node.scope = scope.cloned();
        node.item = Some(item.clone());
        ids.push(node.id.clone());
        nodes.push(node);
    }
    if task.instance_id.is_some() {
        let problems = graph::problems(&instances);
        if !problems.is_empty() {
            diags.push(invalid_graph(task, &problems));
            // Nothing of a broken graph is planned: its edges would point nowhere.
            nodes.truncate(first);
            ids.truncate(ids.len() - items.len());
        }
    }
}

/// A task graph known at plan time that cannot run: each problem, at the task's `map`.
fn invalid_graph(task: &Task, problems: &[String]) -> Diagnostic {
    let mut d = Diagnostic::error(
        Category::InvalidValue,
        "invalid-graph",
        format!(
            "the instances of task `{}` do not form a valid graph: {}",
            task.id,
            problems.join("; ")
        ),
    )
    .at(task.span, "this fan-out");
    if let Some(id) = &task.instance_id {
        d = d
            .at(id.span, "instance ids")
            .note(task.span, "this fan-out");
    }
    d.help("each instance needs a unique id (letters, digits, `_`, `-`), and `after` may name only other instances, without a cycle")
}

fn plan_instance<'w>(
    renderer: &Renderer<'_, 'w>,
    task: &'w Task,
    ctx: &Ctx,
    id: String,
    needs: Vec<String>,
    diags: &mut Vec<Diagnostic>,
) -> PlannedTask {
    let name = task.id.as_str();
    let when = match &task.when {
        None => WhenState::Always,
        Some(When::Literal(b)) => WhenState::Known {
            expression: b.to_string(),
            value: *b,
        },
        Some(When::Expression(t)) => match renderer.eval(t, ctx, "when", name, diags) {
            Some(Some(v)) => WhenState::Known {
                expression: t.source.clone(),
                value: v.is_true(),
            },
            Some(None) | None => WhenState::AtRunTime {
                expression: t.source.clone(),
            },
        },
    };
    let action = match &task.action {
        Action::Agent {
            prompt,
            settings,
            output_schema,
            env,
        } => PlannedAction::Agent {
            prompt: renderer.render(prompt, ctx, "prompt", name, diags),
            settings: settings.clone(),
            output_schema: output_schema.clone(),
            env: renderer.render_env(env, ctx, name, diags),
        },
        Action::Shell {
            run,
            env,
            workdir,
            output,
        } => PlannedAction::Shell {
            run: renderer.render(run, ctx, "run", name, diags),
            env: renderer.render_env(env, ctx, name, diags),
            workdir: workdir
                .as_ref()
                .map(|w| renderer.render(w, ctx, "workdir", name, diags)),
            output: *output,
        },
        Action::Outputs { values, result } => PlannedAction::Outputs {
            values: values
                .iter()
                .map(|(k, v)| (k.clone(), renderer.render(v, ctx, "outputs", name, diags)))
                .collect(),
            result: result.as_ref().map(|r| r.to_string()),
        },
        Action::Merge {
            strategy,
            on_conflict,
            resolve,
            agent,
        } => PlannedAction::Merge {
            strategy: *strategy,
            on_conflict: *on_conflict,
            resolve: resolve.clone(),
            agent: agent.clone(),
        },
    };
    PlannedTask {
        id,
        task: task.id.to_string(),
        description: task.description.clone(),
        index: None,
        item: None,
        dynamic_map: None,
        needs,
        after: Vec::new(),
        resolver: task.conflict_agent.clone(),
        when,
        runner: task.runner.clone(),
        timeout_ms: task.timeout.map(|d| d.as_millis() as u64),
        retry: task.retry.clone(),
        fan_out: task.is_mapped().then_some(FanOut {
            max_parallel: task.max_parallel,
            on_item_failure: task.on_item_failure,
            min_success: task.min_success,
            id: task.instance_id.as_ref().map(|t| t.source.clone()),
            after: task.after.as_ref().map(|t| t.source.clone()),
        }),
        artifacts: task.artifacts.clone(),
        reports: task.reports.clone(),
        sources: task.sources.clone(),
        touches: task
            .touches
            .iter()
            .map(|t| renderer.render(t, ctx, "touches", name, diags))
            .collect(),
        scope: None,
        secrets: task.secrets.clone(),
        workspace: (task.workspace != WorkspaceMode::None).then(|| PlannedWorkspace {
            mode: task.workspace,
            setup: task.setup.clone(),
            copy: task.copy.clone(),
        }),
        action,
    }
}

/// Tasks in topological order; among ready tasks, the first declared goes first (stable output).
fn task_order(workflow: &Workflow) -> Vec<usize> {
    let index = workflow.task_index();
    let n = workflow.tasks.len();
    let mut pending: Vec<usize> = workflow
        .tasks
        .iter()
        .map(|t| {
            t.needs
                .iter()
                .filter(|d| index.contains_key(d.value.as_str()))
                .count()
        })
        .collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, t) in workflow.tasks.iter().enumerate() {
        for need in &t.needs {
            if let Some(&j) = index.get(need.value.as_str()) {
                dependents[j].push(i);
            }
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> =
        (0..n).filter(|&i| pending[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &dependents[i] {
            pending[d] -= 1;
            if pending[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    order
}

/// A node of a run, as its record has it: for drawing a run's expanded plan.
pub struct RunNode<'a> {
    pub node: &'a str,
    pub task: &'a str,
    pub after: &'a [String],
}

impl Plan {
    /// The plan as a run expanded it: each dynamic map's placeholder (`task[*]`) replaced by the
    /// run's instances of it, with their edges (a task graph's `after`); what needed a
    /// placeholder needs its instances. Nodes the run never reached stay as planned.
    pub fn as_run(&self, run: &[RunNode<'_>]) -> Plan {
        let mut instances: HashMap<&str, Vec<&RunNode<'_>>> = HashMap::new();
        for r in run {
            instances.entry(r.task).or_default().push(r);
        }
        let mut replaced: HashMap<String, Vec<String>> = HashMap::new();
        let mut nodes: Vec<PlannedTask> = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            match (
                node.dynamic_map.is_some(),
                instances.get(node.task.as_str()),
            ) {
                (true, Some(found)) => {
                    replaced.insert(
                        node.id.clone(),
                        found.iter().map(|r| r.node.to_string()).collect(),
                    );
                    for r in found {
                        let mut n = node.clone();
                        n.id = r.node.to_string();
                        n.dynamic_map = None;
                        n.after = r.after.to_vec();
                        n.needs.extend(r.after.iter().cloned());
                        nodes.push(n);
                    }
                }
                _ => nodes.push(node.clone()),
            }
        }
        for n in &mut nodes {
            n.needs = n
                .needs
                .iter()
                .flat_map(|need| match replaced.get(need) {
                    Some(ids) => ids.clone(),
                    None => vec![need.clone()],
                })
                .collect();
        }
        let graph = dependency_graph(&nodes);
        let mut summary = self.summary.clone();
        summary.nodes = nodes.len();
        Plan {
            name: self.name.clone(),
            description: self.description.clone(),
            inputs: self.inputs.clone(),
            summary,
            nodes,
            graph,
            runners: self.runners.clone(),
            policy: self.policy.clone(),
            max_run_usd: self.max_run_usd,
        }
    }
}
