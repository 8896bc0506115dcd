//! The validated workflow: names resolved, defaults applied, durations parsed, dependencies checked
//! (unknown, self, cycles). Templates are parsed and their names checked, but not rendered yet.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::time::Duration;

use indexmap::IndexMap;
use serde::Serialize;

use super::fanout::check_fan_out_settings;
use super::raw::*;
use super::runners::{check_runner_name, resolve_runners};
pub use super::runners::{
    parse_memory, DockerSettings, KubernetesSettings, Mount, RunnerDecl, Toleration,
};
use super::spanned::Spanned;
use super::template::{self, Scope, Template};
use crate::diagnostic::{did_you_mean, Category, Diagnostic, Span};

/// A task id as written under `[tasks.<id>]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct TaskId(pub String);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TaskId {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Letters, digits, `_` and `-`, starting with a letter or `_`; `.` and `[` are reserved for
    /// template tasks (`api.plan`) and map instances (`theme[2]`).
    pub fn is_valid(id: &str) -> bool {
        let mut chars = id.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }
}

/// The help of `invalid-id`.
pub const ID_RULE: &str =
    "ids are letters, digits, `_` and `-`, starting with a letter or `_` (`.` and `[` are reserved)";

#[derive(Clone, Debug, Serialize)]
pub struct InputDecl {
    #[serde(rename = "type")]
    pub ty: InputType,
    pub default: Option<serde_json::Value>,
    pub required: bool,
    pub description: Option<String>,
    /// Kept out of run state and masked in plans.
    pub secret: bool,
    #[serde(skip)]
    pub span: Span,
}

impl Workflow {
    /// The input values to record or show: secret ones replaced by `***`.
    pub fn redacted_inputs(
        &self,
        values: &IndexMap<String, serde_json::Value>,
    ) -> IndexMap<String, serde_json::Value> {
        values
            .iter()
            .map(|(k, v)| {
                let secret = self.inputs.get(k).is_some_and(|d| d.secret);
                (
                    k.clone(),
                    if secret {
                        serde_json::Value::from(SECRET_MASK)
                    } else {
                        v.clone()
                    },
                )
            })
            .collect()
    }

    /// The text forms of the secret input values, to mask wherever they might be shown.
    pub fn secret_texts(&self, values: &IndexMap<String, serde_json::Value>) -> Vec<String> {
        let mut out = Vec::new();
        for (k, v) in values {
            if !self.inputs.get(k).is_some_and(|d| d.secret) {
                continue;
            }
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            // Very short values would mask unrelated text; they are not worth protecting this way.
            if text.len() >= 4 {
                let json = serde_json::to_string(&text).unwrap_or_default();
                out.push(json.trim_matches('"').to_string());
                out.push(text);
            }
        }
        out.sort_by_key(|s| std::cmp::Reverse(s.len()));
        out.dedup();
        out
    }
}

/// What a secret input's value is shown as.
pub const SECRET_MASK: &str = "***";

/// Replaces every secret text in `text` with [`SECRET_MASK`].
pub fn mask(mut text: String, secrets: &[String]) -> String {
    for s in secrets {
        if text.contains(s.as_str()) {
            text = text.replace(s.as_str(), SECRET_MASK);
        }
    }
    text
}

/// Effective agent settings of a task: task keys over `[defaults.claude]` over built-in defaults.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AgentSettings {
    pub model: Option<String>,
    pub permission_mode: &'static str,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub max_turns: Option<u32>,
    pub max_budget_usd: Option<f64>,
    pub append_system_prompt: Option<String>,
    pub settings: Option<StringOrObject>,
    /// Where the `claude` executable is, if set in the clusterfile (not part of cache keys).
    #[serde(skip)]
    pub bin: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Backoff {
    #[serde(with = "duration_ms", rename = "initial_ms")]
    pub initial: Duration,
    pub factor: f64,
    #[serde(with = "duration_ms", rename = "max_ms")]
    pub max: Duration,
    pub jitter: f64,
}

/// Effective retry policy. `limit` counts retries: at most `limit + 1` attempts.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetryPolicy {
    pub limit: u32,
    pub backoff: Backoff,
    pub on: Vec<FailureClass>,
    /// Agent tasks: continue the interrupted conversation instead of starting over.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resume_session: bool,
}

impl Default for RetryPolicy {
    /// No retries; backoff 1s, x2, at most 5m, ±10%; every class a retry can plausibly fix.
    fn default() -> Self {
        RetryPolicy {
            limit: 0,
            backoff: Backoff {
                initial: Duration::from_secs(1),
                factor: 2.0,
                max: Duration::from_secs(300),
                jitter: 0.1,
            },
            on: FailureClass::ALL
                .iter()
                .map(|(_, c)| *c)
                .filter(|c| c.retried_by_default())
                .collect(),
            resume_session: false,
        }
    }
}

mod duration_ms {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

/// What a task does. Agent is the large variant and the common one; boxing it would only add an
/// allocation per task.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Action {
    Agent {
        prompt: Template,
        settings: AgentSettings,
        output_schema: Option<serde_json::Value>,
        env: IndexMap<String, Template>,
    },
    Shell {
        run: Template,
        env: IndexMap<String, Template>,
        workdir: Option<Template>,
        output: OutputMode,
    },
    /// A template instance as a whole: its outputs, and the branch of its result.
    Outputs {
        values: IndexMap<String, Template>,
        result: Option<TaskId>,
    },
    Merge {
        strategy: MergeStrategy,
        on_conflict: OnConflict,
        /// With `on_conflict = "run"`: the command that resolves a conflicted worktree.
        resolve: Option<String>,
        /// With `on_conflict = "agent"`: the resolving agent's settings (from `[defaults.claude]`).
        agent: Option<AgentSettings>,
    },
}

#[derive(Clone, Debug)]
pub enum When {
    Literal(bool),
    Expression(Template),
}

#[derive(Clone, Debug)]
pub enum MapSpec {
    Static(Vec<serde_json::Value>),
    Expression(Template),
}

#[derive(Clone, Debug)]
pub struct Task {
    pub id: TaskId,
    pub span: Span,
    pub description: Option<String>,
    pub action: Action,
    pub needs: Vec<Spanned<TaskId>>,
    pub when: Option<When>,
    pub map: Option<MapSpec>,
    /// A fan-out's instance ids (`id`), and the ids each instance runs after (`after`).
    pub instance_id: Option<Template>,
    pub after: Option<Template>,
    /// A task graph's instance that starts from a conflicting merge: the resolving agent's
    /// settings (`on_conflict = "agent"`, from `[defaults.claude]`), or `None` (it fails).
    pub conflict_agent: Option<AgentSettings>,
    pub max_parallel: Option<u32>,
    pub on_item_failure: OnItemFailure,
    pub min_success: Option<u32>,
    pub retry: RetryPolicy,
    pub timeout: Option<Duration>,
    pub runner: String,
    pub artifacts: Vec<String>,
    pub reports: Vec<String>,
    /// Effective workspace: git merges always have a worktree, collect merges never.
    pub workspace: WorkspaceMode,
    pub setup: Option<String>,
    pub copy: Vec<String>,
    /// What the task reads, for its cache key (`None`: the default, the repository's files).
    pub sources: Option<Vec<String>>,
    pub sources_span: Option<Span>,
    /// Paths the task is told to change (templates), and where they were written.
    pub touches: Vec<Template>,
    pub touches_span: Option<Span>,
    /// For a template's task: where it comes from and how its inputs are bound.
    pub scope: Option<std::sync::Arc<super::raw::Origin>>,
    /// What the scripted model does for this task under `apply --rehearse`.
    pub rehearsal: Option<crate::scripted::TaskScript>,
    /// The secrets the task gets, and how.
    pub secrets: Vec<crate::secrets::SecretUse>,
}

impl Task {
    pub fn is_mapped(&self) -> bool {
        self.map.is_some()
    }

    /// Whether the task leaves a commit (a branch) behind when it succeeds: its own, or, for a
    /// template instance, its result task's.
    pub fn has_workspace(&self) -> bool {
        self.workspace != WorkspaceMode::None
            || matches!(
                self.action,
                Action::Outputs {
                    result: Some(_),
                    ..
                }
            )
    }
}

/// A validated workflow.
#[derive(Clone, Debug)]
pub struct Workflow {
    pub name: String,
    pub description: Option<String>,
    pub inputs: IndexMap<String, InputDecl>,
    pub vars: IndexMap<String, serde_json::Value>,
    pub runners: IndexMap<String, RunnerDecl>,
    /// In declaration order.
    pub tasks: Vec<Task>,
    /// Git ref workspaces start from; `None`: `HEAD` when the run starts.
    pub base: Option<String>,
    /// The task whose branch is the run's result.
    pub result: Option<TaskId>,
    /// `ccluster gc` keeps worktrees of failed attempts.
    pub keep_failed: bool,
    /// No agent task starts once the run's agents have spent this much (US dollars).
    pub max_run_usd: Option<f64>,
    /// `[defaults] max_agents`: agent tasks running at once.
    pub max_agents: Option<usize>,
    /// Declared secrets that some task uses, by name: read when a run starts.
    pub secrets: IndexMap<String, super::secrets::SecretDecl>,
    /// `[policy]`: what each task's change may hold, checked before it is committed.
    pub policy: crate::policy::ChangePolicy,
    /// The operator's policy laid over `[policy]`, kept with a run so `retry` keeps to it.
    pub operator_policy: Option<std::sync::Arc<super::guardrails::OperatorPolicy>>,
    /// `[prices]`: what running agents' responses are priced at, over the built-in table.
    pub prices: crate::agent::prices::Overrides,
    /// `[workflow] publish`: where the result goes when a run succeeds.
    pub publish: Option<super::publish::Publish>,
}

impl Workflow {
    pub fn task_index(&self) -> HashMap<&str, usize> {
        self.tasks
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.as_str(), i))
            .collect()
    }

    /// Each task's `needs`, as indices into `tasks` (unknown names, already reported, left out).
    pub fn need_indices(&self) -> Vec<Vec<usize>> {
        let index = self.task_index();
        self.tasks
            .iter()
            .map(|t| {
                t.needs
                    .iter()
                    .filter_map(|n| index.get(n.value.as_str()).copied())
                    .collect()
            })
            .collect()
    }
}

const AGENT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60 * 60);

/// Parses `90s`, `30m`, `1h30m`, `1h 30m`, `500ms`, `2d`: numbers with the units ms, s, m, h, d.
/// Stricter than humantime on purpose: `1M` (a month there) or `30 minutes` are mistakes here.
pub fn parse_duration_text(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("it is empty".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("expected a number at `{rest}`"));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("`{}` is too large", &rest[..digits]))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        let scale = match unit {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86400),
            "" => return Err(format!("`{number}` has no unit")),
            other => return Err(format!("unknown unit `{other}`")),
        };
        let part = u32::try_from(number)
            .ok()
            .and_then(|n| scale.checked_mul(n))
            .ok_or_else(|| format!("`{number}{unit}` is too long"))?;
        total = total.checked_add(part).ok_or("the duration is too long")?;
        rest = rest[unit_len..].trim_start();
    }
    Ok(total)
}

pub(super) fn parse_duration(
    s: &Spanned<String>,
    key: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<Duration> {
    let problem = match parse_duration_text(&s.value) {
        Ok(d) if !d.is_zero() => return Some(d),
        Ok(_) => "it is zero".to_string(),
        Err(e) => e,
    };
    diags.push(
        Diagnostic::error(
            Category::Duration,
            "invalid-duration",
            format!("invalid duration `{}` for `{key}`: {problem}", s.value),
        )
        .at(s.span, "not a duration")
        .help("durations are numbers with units ms, s, m, h, d: `90s`, `30m`, `1h30m`"),
    );
    None
}

/// Resolves a raw clusterfile. `base_dir` is where relative paths (`output_schema = "x.json"`) live.
pub fn resolve(
    raw: &RawClusterfile,
    file: &str,
    base_dir: &Path,
    operator: Option<&super::guardrails::OperatorPolicy>,
    diags: &mut Vec<Diagnostic>,
) -> Workflow {
    match &raw.version {
        None if raw.version_given => {}
        None => diags.push(
            Diagnostic::error(
                Category::InvalidValue,
                "missing-version",
                "the clusterfile has no `version`",
            )
            .at(Span::new(0, 0), "expected `version = 1` at the top")
            .help("add `version = 1` as the first line"),
        ),
        Some(v) if v.value != 1 => diags.push(
            Diagnostic::error(
                Category::InvalidValue,
                "unsupported-version",
                format!("unsupported clusterfile version {}", v.value),
            )
            .at(v.span, "this ccluster reads version 1")
            .help("set `version = 1`, or upgrade ccluster"),
        ),
        Some(_) => {}
    }

    let inputs = resolve_inputs(raw, diags);
    let vars: IndexMap<String, serde_json::Value> = raw
        .vars
        .iter()
        .map(|(k, v)| (k.clone(), v.value.clone()))
        .collect();
    let runners = resolve_runners(raw, diags);
    let no_defaults = RawDefaults::default();
    let raw_defaults = raw.defaults.as_ref().unwrap_or(&no_defaults);
    if let Some(runner) = &raw_defaults.runner {
        check_runner_name(runner, &runners, diags);
    }
    // Durations of `[defaults]` are parsed (and reported) once, whether or not a task inherits them.
    let defaults = Defaults {
        raw: raw_defaults,
        timeout: raw_defaults
            .timeout
            .as_ref()
            .and_then(|t| parse_duration(t, "timeout", diags)),
        retry: overlay_retry(&RetryPolicy::default(), raw_defaults.retry.as_ref(), diags),
    };
    let ids: indexmap::IndexSet<&str> = raw.tasks.keys().map(String::as_str).collect();
    if ids.is_empty() && raw.version.is_some() {
        diags.push(
            Diagnostic::warning(Category::TaskKind, "no-tasks", "the workflow has no tasks")
                .at(Span::new(0, 0), "nothing to run")
                .help("add a task: `[tasks.build]` with `run = \"...\"` or `prompt = \"...\"`"),
        );
    }
    for (id, task) in &raw.tasks {
        // Embedded tasks are `<id>.<task>`, each part checked by the same rule as it is embedded,
        // in the file it is written in (`compose::expand`); so are the ids of tasks that use a
        // template, which stand for the instance.
        if !TaskId::is_valid(id) && task.origin.is_none() {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-id",
                    format!("invalid task id `{}`", super::fetch::printable(id)),
                )
                .at(task.id_span, "not a valid id")
                .help(ID_RULE),
            );
        }
    }

    let declared = super::secrets::resolve_declarations(raw, diags);
    let secret_uses = |id: &str, rt: &RawTask, task: &Task, diags: &mut Vec<Diagnostic>| {
        let (process, env) = match &task.action {
            Action::Shell { env, .. } | Action::Agent { env, .. } => {
                (true, env.keys().map(String::as_str).collect::<Vec<_>>())
            }
            _ => (false, Vec::new()),
        };
        let uses = super::secrets::resolve_uses(id, rt, &declared, process, &env, diags);
        // A pod cannot see a file written on ccluster's machine.
        let on_kubernetes = runners
            .get(&task.runner)
            .is_some_and(|r| r.kind == RunnerKind::Kubernetes);
        if let (true, Some(list)) = (on_kubernetes, &rt.secrets) {
            if uses
                .iter()
                .any(|u| matches!(u.delivery, crate::secrets::Delivery::File { .. }))
            {
                diags.push(
                    Diagnostic::error(
                        Category::InvalidValue,
                        "secret-file-unsupported",
                        format!(
                            "task `{id}` runs on the kubernetes runner `{}`, which cannot deliver a secret as a file",
                            task.runner
                        ),
                    )
                    .at(list.span, "a `file` here")
                    .help("deliver it in a variable (leave out `file`), or run the task on another runner"),
                );
            }
        }
        uses
    };
    let mut tasks = Vec::new();
    for (id, rt) in &raw.tasks {
        match &rt.origin {
            // A template's task: its spans and templates are in the template's file.
            Some(origin) => {
                let mut own = Vec::new();
                let needs = resolve_needs(id, rt, &ids, &mut own);
                let mut task = resolve_task(
                    id,
                    rt,
                    needs,
                    &defaults,
                    &runners,
                    &origin.file.text,
                    base_dir,
                    &mut own,
                );
                task.scope = Some(origin.clone());
                task.secrets = secret_uses(id, rt, &task, &mut own);
                diags.extend(own.into_iter().map(|d| d.in_file(&origin.file)));
                tasks.push(task);
            }
            None => {
                let needs = resolve_needs(id, rt, &ids, diags);
                let mut task =
                    resolve_task(id, rt, needs, &defaults, &runners, file, base_dir, diags);
                task.secrets = secret_uses(id, rt, &task, diags);
                tasks.push(task);
            }
        }
    }

    let publish = raw
        .workflow
        .as_ref()
        .and_then(|w| w.publish.as_ref())
        .and_then(|p| super::publish::resolve(p, diags));
    let mut used: std::collections::HashSet<String> = tasks
        .iter()
        .flat_map(|t| t.secrets.iter().map(|u| u.name.clone()))
        .collect();
    // The forge token is read by `publish`, not by a task: declared for it, it is used.
    used.extend(publish.as_ref().map(|p| p.token.clone()));
    // A misspelt name in a task is reported already: "unused" would only repeat it.
    if !diags.iter().any(|d| d.code == "unknown-secret") {
        super::secrets::check_unused(raw, &used, diags);
    }
    let secrets = declared
        .into_iter()
        .filter(|(name, _)| used.contains(name))
        .filter_map(|(name, decl)| Some((name, decl?)))
        .collect();
    let meta = raw.workflow.as_ref();
    let workflow = Workflow {
        name: raw
            .workflow
            .as_ref()
            .and_then(|w| w.name.as_ref())
            .map(|n| n.value.clone())
            .unwrap_or_else(|| "workflow".into()),
        description: raw
            .workflow
            .as_ref()
            .and_then(|w| w.description.as_ref())
            .map(|d| d.value.clone()),
        inputs,
        vars,
        runners,
        tasks,
        base: meta.and_then(|w| w.base.as_ref()).map(|b| b.value.clone()),
        result: None,
        keep_failed: meta
            .and_then(|w| w.keep_failed.as_ref())
            .is_some_and(|k| k.value),
        max_run_usd: raw
            .defaults
            .as_ref()
            .and_then(|d| d.max_run_usd.as_ref())
            .map(|m| m.value),
        max_agents: raw
            .defaults
            .as_ref()
            .and_then(|d| d.max_agents.as_ref())
            .map(|m| m.value.max(1) as usize),
        secrets,
        policy: super::guardrails::change_policy(raw, operator, diags),
        operator_policy: operator.map(|o| std::sync::Arc::new(o.clone())),
        prices: super::guardrails::prices(raw, diags),
        publish,
    };
    let mut workflow = workflow;
    super::guardrails::apply(&mut workflow, raw, operator, diags);
    check_cycles(&workflow, diags);
    resolve_workspaces(&mut workflow, raw, diags);
    workflow.result = resolve_result(&workflow, meta, diags);
    check_templates(&workflow, raw, diags);
    check_fan_out_settings(&workflow, raw, diags);
    workflow
}

fn resolve_inputs(
    raw: &RawClusterfile,
    diags: &mut Vec<Diagnostic>,
) -> IndexMap<String, InputDecl> {
    let mut inputs = IndexMap::new();
    for (name, input) in &raw.inputs {
        let ty = input.ty.as_ref().map_or(InputType::String, |t| t.value);
        if let Some(default) = input.default.as_ref().filter(|_| !input.decode_errors) {
            if !ty.accepts(&default.value) {
                diags.push(
                    Diagnostic::error(
                        Category::WrongType,
                        "wrong-type",
                        format!("the default of input `{name}` is not a {}", ty.name()),
                    )
                    .at(default.span, format!("expected a {}", ty.name()))
                    .help(format!("make the default a {} or change `type`", ty.name())),
                );
            }
        }
        inputs.insert(
            name.clone(),
            InputDecl {
                ty,
                default: input.default.as_ref().map(|d| d.value.clone()),
                required: input
                    .required
                    .as_ref()
                    .map_or(input.default.is_none(), |r| r.value),
                description: input.description.as_ref().map(|d| d.value.clone()),
                secret: input.secret.as_ref().is_some_and(|s| s.value),
                span: input.name_span,
            },
        );
    }
    inputs
}

fn resolve_needs(
    id: &str,
    rt: &RawTask,
    ids: &indexmap::IndexSet<&str>,
    diags: &mut Vec<Diagnostic>,
) -> Vec<Spanned<TaskId>> {
    let mut needs: Vec<Spanned<TaskId>> = Vec::new();
    let mut listed: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for need in rt.needs.iter().flat_map(|n| n.value.iter()) {
        if need.value == id {
            diags.push(
                Diagnostic::error(
                    Category::Cycle,
                    "self-dependency",
                    format!("task `{id}` needs itself"),
                )
                .at(need.span, "a task cannot need itself")
                .help("remove it from `needs`"),
            );
        } else if !ids.contains(need.value.as_str()) {
            let mut d = Diagnostic::error(
                Category::UnknownNeed,
                "unknown-need",
                format!("task `{id}` needs `{}`, which does not exist", need.value),
            )
            .at(need.span, "no such task");
            d = match did_you_mean(&need.value, ids.iter().copied()) {
                Some(best) => d.help(format!("did you mean `{best}`?")),
                None => d.help(format!("tasks are declared as `[tasks.{}]`", need.value)),
            };
            diags.push(d);
        } else if !listed.insert(need.value.as_str()) {
            diags.push(
                Diagnostic::warning(
                    Category::UnknownNeed,
                    "repeated-need",
                    format!("task `{id}` lists `{}` twice in `needs`", need.value),
                )
                .at(need.span, "listed again here"),
            );
        } else {
            needs.push(Spanned::new(TaskId(need.value.clone()), need.span));
        }
    }
    needs
}

/// `[defaults]` with its durations parsed once.
struct Defaults<'a> {
    raw: &'a RawDefaults,
    timeout: Option<Duration>,
    retry: RetryPolicy,
}

#[allow(clippy::too_many_arguments)]
fn resolve_task(
    id: &str,
    rt: &RawTask,
    needs: Vec<Spanned<TaskId>>,
    resolved: &Defaults<'_>,
    runners: &IndexMap<String, RunnerDecl>,
    file: &str,
    base_dir: &Path,
    diags: &mut Vec<Diagnostic>,
) -> Task {
    let defaults = resolved.raw;
    let tpl = |s: &Spanned<String>| Template::new(s.value.clone(), s.span, file);

    let given: Vec<&str> = [
        ("prompt", rt.prompt.is_some()),
        ("run", rt.run.is_some()),
        ("merge", rt.merge.is_some()),
        ("use", rt.outputs_of.is_some()),
    ]
    .into_iter()
    .filter_map(|(k, set)| set.then_some(k))
    .collect();
    if given.len() > 1 || (given.is_empty() && !rt.decode_errors) {
        let message = if given.is_empty() {
            format!("task `{id}` has none of `prompt`, `run` or `merge`")
        } else {
            format!(
                "task `{id}` has both {}",
                given
                    .iter()
                    .map(|k| format!("`{k}`"))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )
        };
        diags.push(
            Diagnostic::error(Category::TaskKind, "task-kind", message)
                .at(rt.id_span, "a task is exactly one of agent, shell or merge")
                .help("set exactly one of `prompt = \"...\"` (agent), `run = \"...\"` (shell) or `merge = { strategy = \"git\" }`"),
        );
    }

    let not_for = |key: &str, span: Span, kind: &str, diags: &mut Vec<Diagnostic>| {
        diags.push(
            Diagnostic::error(
                Category::TaskKind,
                "key-not-for-kind",
                format!("`{key}` applies to {kind} tasks only, and task `{id}` is not one"),
            )
            .at(span, format!("only for {kind} tasks"))
            .help(format!(
                "remove `{key}`, or make `{id}` {} {kind} task",
                if kind.starts_with('a') { "an" } else { "a" }
            )),
        );
    };

    // `env` is for processes: shell commands and agent workers (merged over `[defaults.env]`).
    let env = || -> IndexMap<String, Template> {
        let mut env: IndexMap<String, Template> = defaults
            .env
            .iter()
            .map(|(k, v)| (k.clone(), tpl(v)))
            .collect();
        env.extend(rt.env.iter().map(|(k, v)| (k.clone(), tpl(v))));
        env
    };
    let action = if let Some(o) = &rt.outputs_of {
        Action::Outputs {
            values: o.values.iter().map(|(k, v)| (k.clone(), tpl(v))).collect(),
            result: o.result.clone().map(TaskId),
        }
    } else if let Some(prompt) = &rt.prompt {
        if let Some(w) = &rt.workdir {
            not_for("workdir", w.span, "shell", diags);
        }
        let output_schema = rt
            .output_schema
            .as_ref()
            .and_then(|s| load_output_schema(s, base_dir, diags));
        if let Some(o) = &rt.output {
            not_for("output", o.span, "shell", diags);
        }
        Action::Agent {
            prompt: tpl(prompt),
            settings: agent_settings(defaults.claude.as_ref(), rt.claude.as_ref()),
            output_schema,
            env: env(),
        }
    } else if let Some(merge) = &rt.merge {
        let strategy = merge
            .strategy
            .as_ref()
            .map_or(MergeStrategy::Git, |s| s.value);
        if let (MergeStrategy::Collect, Some(run)) = (strategy, &merge.run) {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-value",
                    "`merge.run` applies to `strategy = \"git\"` only",
                )
                .at(run.span, "a collect merge has no conflicts to resolve"),
            );
        }
        if let (MergeStrategy::Collect, Some(oc)) = (strategy, &merge.on_conflict) {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-value",
                    "`on_conflict` applies to `strategy = \"git\"` only",
                )
                .at(oc.span, "a collect merge has no conflicts"),
            );
        }
        if needs.is_empty() && rt.needs.as_ref().is_none_or(|n| n.value.is_empty()) {
            diags.push(
                Diagnostic::error(
                    Category::TaskKind,
                    "empty-merge",
                    format!("merge task `{id}` needs no task, so it has nothing to merge"),
                )
                .at(rt.id_span, "nothing to merge")
                .help("list the tasks to merge in `needs`"),
            );
        }
        // A resolving command implies `on_conflict = "run"`.
        let on_conflict = merge.on_conflict.as_ref().map_or(
            if merge.run.is_some() {
                OnConflict::Run
            } else {
                OnConflict::Fail
            },
            |o| o.value,
        );
        match (&merge.run, on_conflict) {
            (None, OnConflict::Run) => diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "missing-key",
                    format!("merge task `{id}` says `on_conflict = \"run\"` but has no `run`"),
                )
                .at(merge.on_conflict.as_ref().map_or(rt.id_span, |o| o.span), "nothing to run")
                .help("add the resolving command: `merge = { strategy = \"git\", on_conflict = \"run\", run = \"./resolve.sh\" }`"),
            ),
            (Some(run), OnConflict::Fail | OnConflict::Agent) => diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-value",
                    "`merge.run` is only used with `on_conflict = \"run\"`",
                )
                .at(run.span, "never run")
                .help("set `on_conflict = \"run\"`, or remove `run`"),
            ),
            _ => {}
        }
        Action::Merge {
            strategy,
            on_conflict,
            resolve: merge.run.as_ref().map(|r| r.value.clone()),
            agent: (on_conflict == OnConflict::Agent)
                .then(|| agent_settings(defaults.claude.as_ref(), None)),
        }
    } else {
        let run = rt
            .run
            .as_ref()
            .map(tpl)
            .unwrap_or_else(|| Template::new(String::new(), rt.id_span, ""));
        Action::Shell {
            run,
            env: env(),
            workdir: rt.workdir.as_ref().or(defaults.workdir.as_ref()).map(tpl),
            output: rt.output.as_ref().map_or(OutputMode::Text, |o| o.value),
        }
    };
    if !matches!(action, Action::Agent { .. }) && rt.prompt.is_none() {
        if let Some(c) = rt.claude.as_ref().and_then(first_claude_span) {
            not_for("claude", c, "agent", diags);
        }
        if let Some(s) = &rt.output_schema {
            not_for("output_schema", s.span, "agent", diags);
        }
    }
    if rt.merge.is_some() && rt.prompt.is_none() && rt.run.is_none() {
        if let Some(o) = &rt.output {
            not_for("output", o.span, "shell", diags);
        }
        if let Some(w) = &rt.workdir {
            not_for("workdir", w.span, "shell", diags);
        }
        if let Some(span) = rt.env.values().map(|v| v.span).min() {
            not_for("env", span, "shell or agent", diags);
        }
    }

    let runner = rt.runner.as_ref().or(defaults.runner.as_ref());
    if let Some(r) = &rt.runner {
        check_runner_name(r, runners, diags);
    }
    let timeout = match &rt.timeout {
        Some(t) => parse_duration(t, "timeout", diags),
        None => resolved
            .timeout
            .or(matches!(action, Action::Agent { .. }).then_some(AGENT_TIMEOUT_DEFAULT)),
    };

    let map = rt.map.as_ref().map(|m| match &m.value {
        RawMap::List(items) => MapSpec::Static(items.clone()),
        RawMap::Expression(e) => MapSpec::Expression(Template::new(e.clone(), m.span, file)),
    });
    let instance_id = rt
        .id
        .as_ref()
        .map(|t| Template::new(t.value.clone(), t.span, file));
    let after = rt
        .after
        .as_ref()
        .map(|t| Template::new(t.value.clone(), t.span, file));
    let when = rt.when.as_ref().map(|w| match &w.value {
        RawWhen::Bool(b) => When::Literal(*b),
        RawWhen::Expression(e) => When::Expression(Template::new(e.clone(), w.span, file)),
    });

    Task {
        id: TaskId(id.to_string()),
        span: rt.id_span,
        description: rt.description.as_ref().map(|d| d.value.clone()),
        action,
        needs,
        when,
        map,
        instance_id,
        after,
        conflict_agent: rt
            .on_conflict
            .as_ref()
            .filter(|c| c.value == OnConflict::Agent && rt.after.is_some())
            .map(|_| agent_settings(defaults.claude.as_ref(), None)),
        max_parallel: rt
            .max_parallel
            .as_ref()
            .or(defaults.max_parallel.as_ref())
            .map(|m| m.value as u32),
        on_item_failure: rt
            .on_item_failure
            .as_ref()
            .or(defaults.on_item_failure.as_ref())
            .map_or(OnItemFailure::FailFast, |o| o.value),
        min_success: rt.min_success.as_ref().map(|m| m.value as u32),
        retry: overlay_retry(&resolved.retry, rt.retry.as_ref(), diags),
        timeout,
        runner: runner.map_or_else(|| "local".to_string(), |r| r.value.clone()),
        artifacts: strings(rt.artifacts.as_ref().or(defaults.artifacts.as_ref())),
        reports: strings(rt.reports.as_ref().or(defaults.reports.as_ref())),
        // Settled by `resolve_workspaces` once every task is known.
        workspace: WorkspaceMode::None,
        setup: rt
            .setup
            .as_ref()
            .or(defaults.setup.as_ref())
            .map(|s| s.value.clone()),
        copy: strings(rt.copy.as_ref().or(defaults.copy.as_ref())),
        sources: rt.sources.as_ref().map(|s| {
            s.value
                .iter()
                .filter(|g| check_source_glob(g, diags))
                .map(|g| g.value.clone())
                .collect()
        }),
        sources_span: rt.sources.as_ref().map(|s| s.span),
        touches: rt
            .touches
            .as_ref()
            .map(|t| t.value.iter().map(tpl).collect())
            .unwrap_or_default(),
                touches_span: rt.touches.as_ref().map(|t| t.span),
        scope: None,
        rehearsal: rt.rehearsal.as_ref().and_then(|r| {
            if rt.prompt.is_none() && !rt.decode_errors {
                not_for("rehearsal", r.span, "agent", diags);
                return None;
            }
            match serde_json::from_value::<crate::scripted::TaskScript>(r.value.clone()) {
                Ok(script) => Some(script),
                Err(e) => {
                    diags.push(
                        Diagnostic::error(
                            Category::InvalidValue,
                            "invalid-rehearsal",
                            format!("invalid `rehearsal` for task `{id}`: {e}"),
                        )
                        .at(r.span, "not a rehearsal script")
                        .help("keys: `output` (the structured output), `files` (path = content), `turns`, `faults`, `usage`"),
                    );
                    None
                }
            }
        }),
        secrets: Vec::new(),
    }
}

/// A `sources` glob names files under the clusterfile's directory: relative, without `..`, and a
/// valid glob.
fn check_source_glob(glob: &Spanned<String>, diags: &mut Vec<Diagnostic>) -> bool {
    let g = glob.value.as_str();
    let problem = if g.is_empty() {
        Some("an empty glob".to_string())
    } else if g.starts_with('/') {
        Some("an absolute path".to_string())
    } else if g.split('/').any(|c| c == "..") {
        Some("a path that leaves the clusterfile's directory".to_string())
    } else {
        glob::Pattern::new(g)
            .err()
            .map(|e| format!("not a glob ({e})"))
    };
    match problem {
        None => true,
        Some(p) => {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-source",
                    format!("`sources` entry `{g}` is {p}"),
                )
                .at(glob.span, "not a source glob")
                .help("`sources` are globs relative to the clusterfile's directory, like `src/**/*.rs`"),
            );
            false
        }
    }
}

fn strings(list: Option<&Spanned<Vec<Spanned<String>>>>) -> Vec<String> {
    list.map(|a| a.value.iter().map(|s| s.value.clone()).collect())
        .unwrap_or_default()
}

/// Settles each task's workspace. Git merges always have a worktree and collect merges none; an
/// agent task defaults to a worktree; a shell task defaults to one when a task it needs has one
/// (it builds on that work), else it runs in the clusterfile's directory. Tasks are visited in
/// dependency order so a chain of shell tasks inherits from its start.
fn resolve_workspaces(wf: &mut Workflow, raw: &RawClusterfile, diags: &mut Vec<Diagnostic>) {
    let default = raw
        .defaults
        .as_ref()
        .and_then(|d| d.workspace.as_ref())
        .map(|w| w.value);
    let needs = wf.need_indices();
    // Kahn's order; tasks on a cycle (already reported) keep `none`.
    let mut waiting: Vec<usize> = needs.iter().map(Vec::len).collect();
    let mut dependents = vec![Vec::new(); wf.tasks.len()];
    for (t, ns) in needs.iter().enumerate() {
        for &n in ns {
            dependents[n].push(t);
        }
    }
    let mut queue: std::collections::VecDeque<usize> =
        (0..wf.tasks.len()).filter(|&t| waiting[t] == 0).collect();
    while let Some(t) = queue.pop_front() {
        let rt = raw.tasks.get(wf.tasks[t].id.as_str());
        let given = rt.and_then(|r| r.workspace.as_ref());
        let mode = match &wf.tasks[t].action {
            Action::Outputs { .. } => WorkspaceMode::None,
            Action::Merge { strategy, .. } => {
                if let Some(w) = given {
                    diags.push(
                        Diagnostic::error(
                            Category::TaskKind,
                            "key-not-for-kind",
                            format!("`workspace` does not apply to merge task `{}`", wf.tasks[t].id),
                        )
                        .at(w.span, "set by the merge strategy")
                        .help("remove `workspace`: a git merge always works in a worktree of its own, a collect merge in none"),
                    );
                }
                match strategy {
                    MergeStrategy::Git => WorkspaceMode::Worktree,
                    MergeStrategy::Collect => WorkspaceMode::None,
                }
            }
            Action::Agent { .. } => given
                .map(|w| w.value)
                .or(default)
                .unwrap_or(WorkspaceMode::Worktree),
            Action::Shell { .. } => given.map(|w| w.value).or(default).unwrap_or_else(|| {
                if needs[t].iter().any(|&n| wf.tasks[n].has_workspace()) {
                    WorkspaceMode::Worktree
                } else {
                    WorkspaceMode::None
                }
            }),
        };
        wf.tasks[t].workspace = mode;
        if mode == WorkspaceMode::None {
            if let Some(rt) = rt {
                for (key, span) in [
                    ("setup", rt.setup.as_ref().map(|s| s.span)),
                    ("copy", rt.copy.as_ref().map(|s| s.span)),
                ] {
                    if let Some(span) = span {
                        diags.push(
                            Diagnostic::warning(
                                Category::TaskKind,
                                "unused-key",
                                format!(
                                    "`{key}` is unused: task `{}` has no workspace",
                                    wf.tasks[t].id
                                ),
                            )
                            .at(span, "prepares a workspace")
                            .help("set `workspace = \"worktree\"`, or remove the key"),
                        );
                    }
                }
            }
        } else if let Some(span) = rt.and_then(|rt| rt.sources.as_ref()).map(|s| s.span) {
            diags.push(
                Diagnostic::warning(
                    Category::TaskKind,
                    "unused-key",
                    format!(
                        "`sources` is unused: task `{}` has a workspace",
                        wf.tasks[t].id
                    ),
                )
                .at(span, "files read from the checkout")
                .help("a task with a workspace works on commits, which are in its cache key already; remove the key"),
            );
        }
        for &d in &dependents[t] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                queue.push_back(d);
            }
        }
    }
}

/// `[workflow] result`, or the last git merge task.
fn resolve_result(
    wf: &Workflow,
    meta: Option<&RawWorkflowMeta>,
    diags: &mut Vec<Diagnostic>,
) -> Option<TaskId> {
    if let Some(r) = meta.and_then(|m| m.result.as_ref()) {
        return match wf.tasks.iter().find(|t| t.id.as_str() == r.value) {
            Some(t) if t.has_workspace() && !t.is_mapped() => Some(t.id.clone()),
            Some(t) => {
                diags.push(
                    Diagnostic::error(
                        Category::InvalidValue,
                        "invalid-result",
                        format!("the result task `{}` leaves no single branch", t.id),
                    )
                    .at(
                        r.span,
                        if t.is_mapped() {
                            "a fan-out has one branch per instance"
                        } else {
                            "a task without a workspace"
                        },
                    )
                    .help("name a git merge task, or a task with a workspace that is not mapped"),
                );
                None
            }
            None => {
                let mut d = Diagnostic::error(
                    Category::UnknownNeed,
                    "unknown-task",
                    format!("`result` names task `{}`, which does not exist", r.value),
                )
                .at(r.span, "unknown task");
                if let Some(best) = did_you_mean(&r.value, wf.tasks.iter().map(|t| t.id.as_str())) {
                    d = d.help(format!("did you mean `{best}`?"));
                }
                diags.push(d);
                None
            }
        };
    }
    wf.tasks
        .iter()
        .rev()
        .find(|t| {
            matches!(
                t.action,
                Action::Merge {
                    strategy: MergeStrategy::Git,
                    ..
                } | Action::Outputs {
                    result: Some(_),
                    ..
                }
            )
        })
        .map(|t| t.id.clone())
}

fn first_claude_span(c: &RawClaude) -> Option<Span> {
    [
        c.model.as_ref().map(|s| s.span),
        c.permission_mode.as_ref().map(|s| s.span),
        c.allowed_tools.as_ref().map(|s| s.span),
        c.disallowed_tools.as_ref().map(|s| s.span),
        c.max_turns.as_ref().map(|s| s.span),
        c.max_budget_usd.as_ref().map(|s| s.span),
        c.append_system_prompt.as_ref().map(|s| s.span),
        c.settings.as_ref().map(|s| s.span),
    ]
    .into_iter()
    .flatten()
    .min()
}

fn agent_settings(defaults: Option<&RawClaude>, task: Option<&RawClaude>) -> AgentSettings {
    fn pick<'a, T>(
        task: Option<&'a RawClaude>,
        defaults: Option<&'a RawClaude>,
        f: impl Fn(&'a RawClaude) -> Option<&'a Spanned<T>>,
    ) -> Option<&'a T> {
        task.and_then(&f)
            .or_else(|| defaults.and_then(&f))
            .map(|s| &s.value)
    }
    let list = |v: Option<&Vec<Spanned<String>>>| {
        v.map(|l| l.iter().map(|s| s.value.clone()).collect())
            .unwrap_or_default()
    };
    AgentSettings {
        model: pick(task, defaults, |c| c.model.as_ref()).cloned(),
        permission_mode: pick(task, defaults, |c| c.permission_mode.as_ref())
            .copied()
            .unwrap_or(PermissionMode::AcceptEdits)
            .name(),
        allowed_tools: list(pick(task, defaults, |c| c.allowed_tools.as_ref())),
        disallowed_tools: list(pick(task, defaults, |c| c.disallowed_tools.as_ref())),
        max_turns: pick(task, defaults, |c| c.max_turns.as_ref()).map(|m| *m as u32),
        max_budget_usd: pick(task, defaults, |c| c.max_budget_usd.as_ref()).copied(),
        append_system_prompt: pick(task, defaults, |c| c.append_system_prompt.as_ref()).cloned(),
        settings: pick(task, defaults, |c| c.settings.as_ref()).cloned(),
        bin: pick(task, defaults, |c| c.bin.as_ref()).cloned(),
    }
}

/// Lays the keys a `retry` table sets over `base` (the built-in policy, or `[defaults.retry]`
/// already laid over it): each key, and each `backoff` key, is inherited on its own.
fn overlay_retry(
    base: &RetryPolicy,
    raw: Option<&RawRetry>,
    diags: &mut Vec<Diagnostic>,
) -> RetryPolicy {
    let mut policy = base.clone();
    let Some(raw) = raw else { return policy };
    if let Some(limit) = &raw.limit {
        policy.limit = limit.value.clamp(0, u32::MAX as i64) as u32;
    }
    if let Some(r) = &raw.resume_session {
        policy.resume_session = r.value;
    }
    if let Some(b) = &raw.backoff {
        if let Some(d) = b
            .initial
            .as_ref()
            .and_then(|s| parse_duration(s, "initial", diags))
        {
            policy.backoff.initial = d;
        }
        if let Some(d) = b.max.as_ref().and_then(|s| parse_duration(s, "max", diags)) {
            policy.backoff.max = d;
        }
        if let Some(f) = &b.factor {
            policy.backoff.factor = f.value;
        }
        if let Some(j) = &b.jitter {
            policy.backoff.jitter = j.value;
        }
    }
    if let Some(on) = &raw.on {
        // `auth` and `policy` were reported by the decoder; they are never retried.
        let mut classes: Vec<FailureClass> = on
            .value
            .iter()
            .map(|c| c.value)
            .filter(|c| !matches!(c, FailureClass::Auth | FailureClass::Policy))
            .collect();
        classes.sort();
        classes.dedup();
        policy.on = classes;
    }
    policy
}

fn load_output_schema(
    s: &Spanned<StringOrObject>,
    base_dir: &Path,
    diags: &mut Vec<Diagnostic>,
) -> Option<serde_json::Value> {
    let schema_error = |message: String, label: &str, help: &str| {
        Diagnostic::error(Category::OutputSchema, "invalid-output-schema", message)
            .at(s.span, label.to_string())
            .help(help.to_string())
    };
    let value = match &s.value {
        StringOrObject::Object(m) => serde_json::Value::Object(m.clone()),
        StringOrObject::String(text) if text.trim_start().starts_with('{') => {
            match serde_json::from_str(text) {
                Ok(v) => v,
                Err(e) => {
                    diags.push(schema_error(format!("`output_schema` is not valid JSON: {e}"), "invalid JSON", "write the schema as a TOML table, a JSON string, or a path to a .json file"));
                    return None;
                }
            }
        }
        StringOrObject::String(path) => {
            // Confined as path templates are: a clusterfile from a pull request must not get a
            // file from elsewhere (a JSON credentials file) into the plan, nor hang on a FIFO.
            let full = base_dir.join(path);
            let root = super::confine::confinement_root(base_dir);
            let text = match super::confine::read_inside(&full, &root, "`output_schema` files") {
                Ok(t) => t,
                Err(e) => {
                    diags.push(schema_error(
                        format!("`output_schema`: {e}"),
                        "unreadable file",
                        "paths are relative to the clusterfile's directory, inside its repository",
                    ));
                    return None;
                }
            };
            match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    diags.push(schema_error(
                        format!("`output_schema` file `{path}` is not valid JSON: {e}"),
                        "invalid JSON file",
                        "the file must hold one JSON Schema object",
                    ));
                    return None;
                }
            }
        }
    };
    if !value.is_object() {
        diags.push(schema_error(
            "`output_schema` must be a JSON Schema object".into(),
            "not an object",
            "e.g. { type = \"object\", properties = { ... } }",
        ));
        return None;
    }
    // The validator panics on some inputs (an unknown `$schema` draft); bad input must never panic.
    let checked = std::panic::catch_unwind(|| {
        jsonschema::validator_for(&value).map(|_| ()).map_err(|e| {
            let at = e.instance_path.to_string();
            if at.is_empty() {
                e.to_string()
            } else {
                format!("{e} (at `{at}`)")
            }
        })
    });
    match checked {
        Ok(Ok(())) => Some(value),
        Ok(Err(e)) => {
            diags.push(schema_error(
                format!("`output_schema` is not a valid JSON Schema: {e}"),
                "invalid JSON Schema",
                "see https://json-schema.org/understanding-json-schema",
            ));
            None
        }
        Err(_) => {
            diags.push(schema_error(
                "`output_schema` is not a valid JSON Schema".into(),
                "invalid JSON Schema",
                "check `$schema` names a known draft",
            ));
            None
        }
    }
}

/// How many tasks of a dependency cycle its diagnostic names.
const CYCLE_SHOWN: usize = 16;

/// Reports every dependency cycle, naming the whole chain (or its ends, when it is long).
fn check_cycles(workflow: &Workflow, diags: &mut Vec<Diagnostic>) {
    use petgraph::graph::DiGraph;
    let index = workflow.task_index();
    let mut graph = DiGraph::<usize, ()>::with_capacity(workflow.tasks.len(), 0);
    let nodes: Vec<_> = (0..workflow.tasks.len())
        .map(|i| graph.add_node(i))
        .collect();
    for (i, task) in workflow.tasks.iter().enumerate() {
        for need in &task.needs {
            if let Some(&j) = index.get(need.value.as_str()) {
                graph.add_edge(nodes[i], nodes[j], ());
            }
        }
    }
    // Kosaraju's walk is iterative: a chain of many thousand tasks cannot overflow the stack.
    let mut sccs: Vec<Vec<usize>> = petgraph::algo::kosaraju_scc(&graph)
        .into_iter()
        .filter(|c| c.len() > 1)
        .map(|c| {
            let mut members: Vec<usize> = c.iter().map(|n| graph[*n]).collect();
            members.sort();
            members
        })
        .collect();
    sccs.sort();
    let direct = workflow.need_indices();
    let mut in_component = vec![false; workflow.tasks.len()];
    for members in sccs {
        for &m in &members {
            in_component[m] = true;
        }
        // Walk from the first-declared member along `needs` edges inside the component until back
        // (a depth-first walk with its own stack, each member entered once).
        let start = members[0];
        let mut path = vec![start];
        let mut next_edge = vec![0usize];
        let mut seen: std::collections::HashSet<usize> = std::collections::HashSet::from([start]);
        let mut found = false;
        while let (Some(&current), Some(edge)) = (path.last(), next_edge.last_mut()) {
            let Some(&next) = direct[current].get(*edge) else {
                path.pop();
                next_edge.pop();
                continue;
            };
            *edge += 1;
            if !in_component[next] {
                continue;
            }
            if next == start {
                found = true;
                break;
            }
            if seen.insert(next) {
                path.push(next);
                next_edge.push(0);
            }
        }
        for &m in &members {
            in_component[m] = false;
        }
        let chain: Vec<&str> = if found {
            path.iter()
                .map(|&i| workflow.tasks[i].id.as_str())
                .collect()
        } else {
            members
                .iter()
                .map(|&i| workflow.tasks[i].id.as_str())
                .collect()
        };
        // A cycle through thousands of tasks is named by its ends and its length: every task in
        // the message, and a pointer for every edge, would make a report nobody can read (and
        // one slow to draw).
        let text = if chain.len() > CYCLE_SHOWN {
            format!(
                "{} -> ... -> {} -> {} ({} tasks)",
                chain[..CYCLE_SHOWN / 2].join(" -> "),
                chain[chain.len() - CYCLE_SHOWN / 2..].join(" -> "),
                chain[0],
                chain.len()
            )
        } else {
            format!("{} -> {}", chain.join(" -> "), chain[0])
        };
        let first = &workflow.tasks[start];
        let edge_span = first
            .needs
            .iter()
            .find(|n| {
                path.get(1)
                    .is_some_and(|&p| workflow.tasks[p].id == n.value)
            })
            .map_or(first.span, |n| n.span);
        let mut d = Diagnostic::error(
            Category::Cycle,
            "cycle",
            format!("dependency cycle: {text}"),
        )
        .at(
            edge_span,
            format!(
                "`{}` needs `{}`",
                first.id,
                chain.get(1).unwrap_or(&chain[0])
            ),
        )
        .help("each task needs the next; remove one of these `needs` to break the cycle");
        for (at, &i) in path.iter().enumerate().skip(1).take(CYCLE_SHOWN - 1) {
            let t = &workflow.tasks[i];
            let next = path.get(at + 1).copied().unwrap_or(start);
            if let Some(n) = t.needs.iter().find(|n| n.value == workflow.tasks[next].id) {
                d = d.note(
                    n.span,
                    format!("`{}` needs `{}`", t.id, workflow.tasks[next].id),
                );
            }
        }
        diags.push(d);
    }
}

/// How many tasks a walk back from a task may visit before its question is left to the batched
/// pass of [`Ancestry::answer`]: a template usually names a task a few `needs` up.
const WALK_BUDGET: usize = 256;

/// Answers "which of these tasks does this task transitively need" without storing every task's
/// full ancestor set (n²/2 entries for a chain of n tasks: a gigabyte at 10,000).
///
/// A question is first tried by a short walk back along `needs` that stops as soon as everything
/// asked for is found; its visited marks are generation stamps, so starting one costs nothing
/// however large the graph is. The questions a short walk cannot settle (a task far up a long
/// chain) are answered together: one pass over the tasks in dependency order per 64 distinct
/// tasks asked about, with one machine word per task. Memory stays linear in tasks and edges.
/// Safe on cyclic graphs (the walks visit each task once; with a cycle, which is reported
/// anyway, the batched pass falls back to full walks), so templates are checked even then.
pub struct Ancestry {
    direct: Vec<Vec<usize>>,
    /// `visited[i] == generation`: task `i` was reached by the current walk.
    visited: Vec<u32>,
    generation: u32,
    stack: Vec<usize>,
}

impl Ancestry {
    pub fn new(workflow: &Workflow) -> Ancestry {
        Ancestry::of_needs(workflow.need_indices())
    }

    /// From each task's direct `needs`, as indices.
    fn of_needs(direct: Vec<Vec<usize>>) -> Ancestry {
        Ancestry {
            visited: vec![0; direct.len()],
            direct,
            generation: 0,
            stack: Vec::new(),
        }
    }

    /// Walks the transitive needs of `task` (not `task` itself), each once, until `visit` says
    /// stop or `budget` tasks were visited. Returns whether the walk was cut short by the budget.
    fn walk(&mut self, task: usize, budget: usize, mut visit: impl FnMut(usize) -> bool) -> bool {
        if self.generation == u32::MAX {
            self.visited.fill(0);
            self.generation = 0;
        }
        self.generation += 1;
        let generation = self.generation;
        self.visited[task] = generation;
        self.stack.clear();
        self.stack.extend(&self.direct[task]);
        let mut visits = 0;
        while let Some(i) = self.stack.pop() {
            if self.visited[i] == generation {
                continue;
            }
            if visits == budget {
                return true;
            }
            visits += 1;
            self.visited[i] = generation;
            if visit(i) {
                return false;
            }
            self.stack.extend(&self.direct[i]);
        }
        false
    }

    /// Every transitive need of `task`, in index order.
    pub fn all(&mut self, task: usize) -> Vec<usize> {
        let mut found = Vec::new();
        self.walk(task, usize::MAX, |i| {
            found.push(i);
            false
        });
        found.sort_unstable();
        found
    }

    /// Those of `wanted` that `task` transitively needs, in index order, or `None` when a walk of
    /// `budget` tasks could not tell.
    fn among_within(&mut self, task: usize, wanted: &[usize], budget: usize) -> Option<Vec<usize>> {
        let mut missing: BTreeSet<usize> = wanted.iter().copied().filter(|&w| w != task).collect();
        let mut found = Vec::new();
        if !missing.is_empty() {
            let cut = self.walk(task, budget, |i| {
                if missing.remove(&i) {
                    found.push(i);
                }
                missing.is_empty()
            });
            if cut {
                return None;
            }
        }
        found.sort_unstable();
        Some(found)
    }

    /// Tasks in an order where each comes after its needs; `None` when there is a cycle.
    fn dependency_order(&self) -> Option<Vec<usize>> {
        let n = self.direct.len();
        let mut waiting: Vec<usize> = self.direct.iter().map(Vec::len).collect();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (t, needs) in self.direct.iter().enumerate() {
            for &d in needs {
                dependents[d].push(t);
            }
        }
        let mut order: Vec<usize> = (0..n).filter(|&t| waiting[t] == 0).collect();
        let mut next = 0;
        while let Some(&t) = order.get(next) {
            next += 1;
            for &u in &dependents[t] {
                waiting[u] -= 1;
                if waiting[u] == 0 {
                    order.push(u);
                }
            }
        }
        (order.len() == n).then_some(order)
    }

    /// For each question `(task, wanted)`, those of `wanted` that `task` transitively needs, in
    /// index order.
    pub fn answer(&mut self, questions: &[(usize, Vec<usize>)]) -> Vec<Vec<usize>> {
        let mut found: Vec<Vec<usize>> = Vec::with_capacity(questions.len());
        let mut open: Vec<usize> = Vec::new();
        for (q, (task, wanted)) in questions.iter().enumerate() {
            found.push(match self.among_within(*task, wanted, WALK_BUDGET) {
                Some(f) => f,
                None => {
                    open.push(q);
                    Vec::new()
                }
            });
        }
        if open.is_empty() {
            return found;
        }
        let Some(order) = self.dependency_order() else {
            for q in open {
                let (task, wanted) = &questions[q];
                found[q] = self
                    .among_within(*task, wanted, usize::MAX)
                    .unwrap_or_default();
            }
            return found;
        };
        // The distinct tasks asked about, 64 to a pass: `reach[t]` has bit `b` set when `t`
        // transitively needs the pass's `b`-th task.
        let mut targets: Vec<usize> = open
            .iter()
            .flat_map(|&q| questions[q].1.iter().copied())
            .collect();
        targets.sort_unstable();
        targets.dedup();
        let mut asked: Vec<Vec<(usize, usize)>> = vec![Vec::new(); targets.len().div_ceil(64)];
        for &q in &open {
            for &w in &questions[q].1 {
                if let Ok(at) = targets.binary_search(&w) {
                    asked[at / 64].push((q, w));
                }
            }
        }
        let n = self.direct.len();
        let mut reach = vec![0u64; n];
        let mut bit = vec![0u64; n];
        for (pass, chunk) in targets.chunks(64).enumerate() {
            for (b, &t) in chunk.iter().enumerate() {
                bit[t] = 1 << b;
            }
            for &t in &order {
                reach[t] = self.direct[t]
                    .iter()
                    .fold(0, |bits, &d| bits | reach[d] | bit[d]);
            }
            for &(q, w) in &asked[pass] {
                if reach[questions[q].0] & bit[w] != 0 {
                    found[q].push(w);
                }
            }
            for &t in chunk {
                bit[t] = 0;
            }
        }
        for q in open {
            found[q].sort_unstable();
            found[q].dedup();
        }
        found
    }
}

/// The templates of a task: each with the field it is written in and whether it is an expression
/// (`when`, `map`) rather than text.
fn task_templates(task: &Task) -> Vec<(&Template, String, bool)> {
    let mut out: Vec<(&Template, String, bool)> = Vec::new();
    match &task.action {
        Action::Agent { prompt, env, .. } => {
            out.push((prompt, "prompt".into(), false));
            out.extend(env.iter().map(|(k, v)| (v, format!("env.{k}"), false)));
        }
        Action::Shell {
            run, env, workdir, ..
        } => {
            out.push((run, "run".into(), false));
            out.extend(env.iter().map(|(k, v)| (v, format!("env.{k}"), false)));
            if let Some(w) = workdir {
                out.push((w, "workdir".into(), false));
            }
        }
        Action::Outputs { values, .. } => {
            out.extend(
                values
                    .iter()
                    .map(|(k, v)| (v, format!("outputs.{k}"), false)),
            );
        }
        Action::Merge { .. } => {}
    }
    out.extend(task.touches.iter().map(|t| (t, "touches".into(), false)));
    if let Some(When::Expression(w)) = &task.when {
        out.push((w, "when".into(), true));
    }
    if let Some(MapSpec::Expression(m)) = &task.map {
        out.push((m, "map".into(), true));
    }
    if let Some(t) = &task.instance_id {
        out.push((t, "id".into(), false));
    }
    if let Some(t) = &task.after {
        out.push((t, "after".into(), true));
    }
    out
}

/// The free names of a template (`tasks.plan.output`, `inputs.x`), or its syntax error.
fn template_names(
    env: &minijinja::Environment<'_>,
    t: &Template,
    expression: bool,
) -> Result<BTreeSet<String>, minijinja::Error> {
    if expression {
        env.compile_expression(t.as_expression())
            .map(|e| e.undeclared_variables(true).into_iter().collect())
    } else {
        env.template_from_str(&t.source)
            .map(|tpl| tpl.undeclared_variables(true).into_iter().collect())
    }
}

/// What a task's templates read of `tasks`: the ids they name (`tasks.<id>...`, as written), and
/// whether one reads `tasks` as a whole (`tasks[name]`, `tasks | tojson`).
fn named_tasks<'n>(names: impl IntoIterator<Item = &'n String>) -> (BTreeSet<&'n str>, bool) {
    let mut named = BTreeSet::new();
    let mut whole = false;
    for name in names {
        match name.strip_prefix("tasks") {
            Some("") => whole = true,
            Some(rest) => {
                if let Some(id) = rest.strip_prefix('.') {
                    named.insert(id.split('.').next().unwrap_or(id));
                }
            }
            None => {}
        }
    }
    (named, whole)
}

/// The full id a task's template means by `tasks.<id>`: a template's task names its fellow tasks
/// without their `<prefix>.`.
fn full_task_id(task: &Task, id: &str) -> String {
    match &task.scope {
        Some(o) => format!("{}.{id}", o.prefix),
        None => id.to_string(),
    }
}

/// For each task, the upstream tasks (transitive `needs`) whose outputs its templates can read at
/// run time: the ones they name, or all of them when a template reads `tasks` as a whole. Only
/// these go into the `tasks` value a task's templates render with, so a long chain whose
/// templates read nothing upstream costs nothing (not n²/2 entries).
pub fn upstream_reads(workflow: &Workflow) -> Vec<Vec<usize>> {
    let env = template::environment();
    let index = workflow.task_index();
    let mut ancestry = Ancestry::new(workflow);
    // `None`: the task reads `tasks` as a whole.
    let wanted: Vec<Option<Vec<usize>>> = workflow
        .tasks
        .iter()
        .map(|task| {
            let names: Vec<BTreeSet<String>> = task_templates(task)
                .into_iter()
                .filter(|(t, _, expression)| *expression || !t.is_literal())
                .filter_map(|(t, _, expression)| template_names(&env, t, expression).ok())
                .collect();
            let (named, whole) = named_tasks(names.iter().flatten());
            (!whole).then(|| {
                named
                    .iter()
                    .filter_map(|id| index.get(full_task_id(task, id).as_str()).copied())
                    .collect()
            })
        })
        .collect();
    let questions: Vec<(usize, Vec<usize>)> = wanted
        .iter()
        .enumerate()
        .filter_map(|(i, w)| w.as_ref().map(|w| (i, w.clone())))
        .collect();
    let mut answers = ancestry.answer(&questions).into_iter();
    wanted
        .iter()
        .enumerate()
        .map(|(i, w)| match w {
            Some(_) => answers.next().unwrap_or_default(),
            None => ancestry.all(i),
        })
        .collect()
}

/// The task ids and declared outputs a template's tasks see, for one template instance: its
/// fellow tasks without their `<prefix>.`, in declaration order.
struct InstanceNames {
    ids: Vec<String>,
    outputs: HashMap<String, Vec<String>>,
}

/// Parses every template and checks the names it reads against what the task can see.
fn check_templates(workflow: &Workflow, raw: &RawClusterfile, diags: &mut Vec<Diagnostic>) {
    let env = template::environment();
    let index = workflow.task_index();
    let mut ancestry = Ancestry::new(workflow);
    let inputs: Vec<&str> = workflow.inputs.keys().map(String::as_str).collect();
    let vars: Vec<&str> = workflow.vars.keys().map(String::as_str).collect();
    let all: Vec<&str> = workflow.tasks.iter().map(|t| t.id.as_str()).collect();
    // The declared outputs of every task that uses a template, by full id.
    let declared_outputs: HashMap<String, Vec<String>> = workflow
        .tasks
        .iter()
        .filter_map(|t| match &t.action {
            Action::Outputs { values, .. } => {
                Some((t.id.to_string(), values.keys().cloned().collect()))
            }
            _ => None,
        })
        .collect();
    // What each template instance's tasks see, computed once per instance: the ids under its
    // prefix are a contiguous run of the sorted ids, so this stays near-linear with many
    // instances (a scan of every task per instance, or per task, is quadratic).
    let mut by_id: Vec<(&str, usize)> = all.iter().copied().zip(0..).collect();
    by_id.sort_unstable();
    let mut instances: HashMap<&str, InstanceNames> = HashMap::new();
    for task in &workflow.tasks {
        let Some(o) = &task.scope else { continue };
        if instances.contains_key(o.prefix.as_str()) {
            continue;
        }
        let dotted = format!("{}.", o.prefix);
        let first = by_id.partition_point(|(id, _)| *id < dotted.as_str());
        let mut under: Vec<(usize, &str)> = by_id[first..]
            .iter()
            .take_while(|(id, _)| id.starts_with(&dotted))
            .map(|&(id, i)| (i, &id[dotted.len()..]))
            .collect();
        under.sort_unstable();
        let outputs = under
            .iter()
            .filter_map(|(i, rest)| {
                declared_outputs
                    .get(all[*i])
                    .map(|keys| (rest.to_string(), keys.clone()))
            })
            .collect();
        let ids = under
            .into_iter()
            .map(|(_, rest)| rest.to_string())
            .collect();
        instances.insert(o.prefix.as_str(), InstanceNames { ids, outputs });
    }
    let instance_ids: HashMap<&str, Vec<&str>> = instances
        .iter()
        .map(|(prefix, names)| (*prefix, names.ids.iter().map(String::as_str).collect()))
        .collect();
    // Every task's templates, parsed, with their free names.
    let checks: Vec<Vec<_>> = workflow
        .tasks
        .iter()
        .map(|task| {
            task_templates(task)
                .into_iter()
                .filter(|(t, _, expression)| *expression || !t.is_literal())
                .map(|(t, field, expression)| {
                    let names = template_names(&env, t, expression);
                    (t, field, names)
                })
                .collect()
        })
        .collect();
    // Only the upstream tasks the templates name are looked for among the transitive needs, all
    // tasks' questions answered together.
    let named: Vec<Vec<(&str, usize)>> = workflow
        .tasks
        .iter()
        .zip(&checks)
        .map(|(task, checks)| {
            let (named, _) = named_tasks(
                checks
                    .iter()
                    .filter_map(|(_, _, names)| names.as_ref().ok())
                    .flatten(),
            );
            named
                .into_iter()
                .filter_map(|id| index.get(full_task_id(task, id).as_str()).map(|&j| (id, j)))
                .collect()
        })
        .collect();
    let questions: Vec<(usize, Vec<usize>)> = named
        .iter()
        .enumerate()
        .map(|(i, named)| (i, named.iter().map(|&(_, j)| j).collect()))
        .collect();
    let reachable = ancestry.answer(&questions);
    for (i, task) in workflow.tasks.iter().enumerate() {
        // A template's task sees the names of its template: its inputs and vars, and its fellow
        // tasks without their `<prefix>.`; its diagnostics point into the template's file.
        let origin = task.scope.as_ref();
        let upstream: Vec<(&str, bool)> = named[i]
            .iter()
            .filter(|(_, j)| reachable[i].binary_search(j).is_ok())
            .map(|&(id, j)| (id, workflow.tasks[j].is_mapped()))
            .collect();
        let instance = origin.and_then(|o| instances.get(o.prefix.as_str()));
        let scoped_inputs: Vec<&str> = origin
            .map(|o| o.scope.declared.iter().map(String::as_str).collect())
            .unwrap_or_default();
        let scoped_vars: Vec<&str> = origin
            .map(|o| o.scope.vars.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let before = diags.len();
        let scope = Scope {
            outputs: instance.map_or(&declared_outputs, |n| &n.outputs),
            inputs: if origin.is_some() {
                &scoped_inputs
            } else {
                &inputs
            },
            vars: if origin.is_some() {
                &scoped_vars
            } else {
                &vars
            },
            upstream: &upstream,
            all_tasks: match origin {
                Some(o) => instance_ids
                    .get(o.prefix.as_str())
                    .map_or(&[][..], Vec::as_slice),
                None => &all,
            },
            // A `map` with a wrong value was reported already; `item` is still meant to exist.
            mapped: task.is_mapped()
                || raw.tasks.get(task.id.as_str()).is_some_and(|t| t.map_given),
            task: task.id.as_str(),
        };
        for (t, field, names) in &checks[i] {
            // `item`/`index` do not exist yet while the list itself is computed.
            let map_scope;
            let scope = if field == "map" {
                map_scope = Scope {
                    mapped: false,
                    ..scope
                };
                &map_scope
            } else {
                &scope
            };
            match names {
                Ok(names) => diags.extend(template::check_names(t, names, scope, field)),
                Err(e) => diags.push(template::syntax_error(t, e, field, scope.task)),
            }
        }
        if let Some(o) = origin {
            for d in &mut diags[before..] {
                d.file.get_or_insert_with(|| o.file.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Ancestry;

    /// Every task's ancestors by brute force, to check the answers against.
    fn brute(direct: &[Vec<usize>], task: usize, wanted: &[usize]) -> Vec<usize> {
        let mut seen = vec![false; direct.len()];
        let mut stack = direct[task].clone();
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut seen[i], true) {
                stack.extend(&direct[i]);
            }
        }
        let mut out: Vec<usize> = wanted
            .iter()
            .copied()
            .filter(|&w| w != task && seen[w])
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// A chain of `n` tasks with a side branch every 7 tasks, joined again 3 tasks later.
    fn graph(n: usize) -> Vec<Vec<usize>> {
        (0..n)
            .map(|i| {
                let mut needs = Vec::new();
                if i > 0 {
                    needs.push(i - 1);
                }
                if i >= 10 && i % 7 == 0 {
                    needs.push(i - 10);
                }
                needs
            })
            .collect()
    }

    #[test]
    fn near_and_far_questions_match_a_full_walk() {
        let n = 3_000;
        let direct = graph(n);
        // Near (settled by a short walk), far (past the walk's budget, over 64 distinct tasks so
        // several batched passes run), downstream (never an ancestor) and the task itself.
        let questions: Vec<(usize, Vec<usize>)> = (0..n)
            .map(|i| {
                (
                    i,
                    vec![i.saturating_sub(1), i / 3, (i * 7) % n, i, (i + 5) % n],
                )
            })
            .collect();
        let answers = Ancestry::of_needs(direct.clone()).answer(&questions);
        for ((task, wanted), got) in questions.iter().zip(&answers) {
            assert_eq!(got, &brute(&direct, *task, wanted), "task {task}");
        }
    }

    #[test]
    fn a_cycle_is_answered_by_full_walks() {
        // 0 <- 1 <- ... <- 599 <- 0: every task needs every other.
        let n = 600;
        let direct: Vec<Vec<usize>> = (0..n).map(|i| vec![(i + n - 1) % n]).collect();
        let questions = vec![(0, vec![1, 300, 0]), (10, vec![11, 599])];
        let answers = Ancestry::of_needs(direct).answer(&questions);
        assert_eq!(answers, vec![vec![1, 300], vec![11, 599]]);
    }

    #[test]
    fn all_lists_every_transitive_need() {
        let direct = graph(100);
        let mut ancestry = Ancestry::of_needs(direct.clone());
        let everyone: Vec<usize> = (0..100).collect();
        for task in [0, 1, 50, 99] {
            assert_eq!(ancestry.all(task), brute(&direct, task, &everyone));
        }
    }
}
