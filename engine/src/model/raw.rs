//! The raw clusterfile: what the file says, key by key, with spans; nothing resolved yet.
//!
//! These types are also the source of the JSON Schema (`ccluster schema`): their doc comments are the
//! schema's descriptions, so keep them short and user-facing.

use indexmap::IndexMap;
use schemars::JsonSchema;
use serde::Serialize;

use super::spanned::Spanned;
use crate::diagnostic::{SourceFile, Span};

/// A ccluster workflow: tasks (agent sessions, shell commands, merges) and the dependencies between
/// them. Reference: docs/clusterfile.md.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "ccluster clusterfile")]
pub struct RawClusterfile {
    /// Format version of the clusterfile. Only `1` exists.
    #[schemars(range(min = 1, max = 1), required)]
    pub version: Option<Spanned<i64>>,
    /// Whether a `version` key was written at all (possibly with a wrong value).
    #[serde(skip)]
    #[schemars(skip)]
    pub version_given: bool,
    /// Name and description of the workflow.
    pub workflow: Option<RawWorkflowMeta>,
    /// Declared parameters, set with `--var name=value` or `--vars file.toml|json`.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub inputs: IndexMap<String, RawInput>,
    /// Constants, available to templates as `vars.<name>`.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub vars: IndexMap<String, Spanned<serde_json::Value>>,
    /// Settings inherited by every task.
    pub defaults: Option<RawDefaults>,
    /// Named runners that tasks can select with `runner = "<name>"`. `local` always exists.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub runners: IndexMap<String, RawRunner>,
    /// Secrets, by name (letters, digits and `_`, not starting with a digit): resolved when a
    /// run starts, given only to the tasks that list them in `secrets`, and masked in everything
    /// ccluster writes.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub secrets: IndexMap<String, RawSecret>,
    /// Guardrails on what tasks may change, checked on each task's change before it is
    /// committed; a violation fails the attempt with class `policy` (never retried).
    pub policy: Option<RawPolicy>,
    /// Model prices (US dollars per million tokens) over ccluster's own table, by model name
    /// prefix (`"claude-sonnet-5"`): what running agents are priced at for budgets.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub prices: IndexMap<String, RawPrice>,
    /// The tasks, by id. An id is letters, digits, `_` and `-`, starting with a letter or `_`.
    #[serde(default)]
    pub tasks: IndexMap<String, RawTask>,
    /// When this workflow is used as a template: what the using task outputs, by name, as
    /// templates over this workflow's tasks (`result = "{{ tasks.merge.output.branch }}"`).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    pub outputs: IndexMap<String, Spanned<String>>,
}

#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawWorkflowMeta {
    /// Name of the workflow, shown in plans and reports.
    pub name: Option<Spanned<String>>,
    /// What the workflow does.
    pub description: Option<Spanned<String>>,
    /// Git ref the workspaces of a run start from (default: `HEAD` when the run starts).
    pub base: Option<Spanned<String>>,
    /// The task whose branch is the run's result (default: the last git merge task).
    pub result: Option<Spanned<String>>,
    /// `ccluster gc` keeps the worktrees of failed attempts (default `false`).
    pub keep_failed: Option<Spanned<bool>>,
    /// Publish the result when a run succeeds (not in a rehearsal): push it to a branch of a
    /// git remote and, with `pr = true`, open or update its pull request (docs/forges.md).
    pub publish: Option<super::publish::RawPublish>,
}

/// The type of an input parameter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputType {
    String,
    Number,
    Bool,
    List,
    Object,
}

impl InputType {
    pub const ALL: &'static [(&'static str, InputType)] = &[
        ("string", InputType::String),
        ("number", InputType::Number),
        ("bool", InputType::Bool),
        ("list", InputType::List),
        ("object", InputType::Object),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, t)| *t == self)
            .map_or("string", |(n, _)| n)
    }

    /// Whether a JSON value has this type.
    pub fn accepts(self, value: &serde_json::Value) -> bool {
        use serde_json::Value;
        matches!(
            (self, value),
            (InputType::String, Value::String(_))
                | (InputType::Number, Value::Number(_))
                | (InputType::Bool, Value::Bool(_))
                | (InputType::List, Value::Array(_))
                | (InputType::Object, Value::Object(_))
        )
    }
}

/// A declared parameter of the workflow.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    /// What the parameter means.
    pub description: Option<Spanned<String>>,
    /// The parameter's type (default `string`).
    #[serde(rename = "type")]
    pub ty: Option<Spanned<InputType>>,
    /// Value used when the parameter is not set.
    pub default: Option<Spanned<serde_json::Value>>,
    /// Whether the parameter must be set (default: true when there is no `default`).
    pub required: Option<Spanned<bool>>,
    /// A secret (a token, a password): its value is never written to run state and is shown as
    /// `***` in plans (default false). `ccluster retry` asks for it again.
    pub secret: Option<Spanned<bool>>,
    #[serde(skip)]
    #[schemars(skip)]
    pub name_span: Span,
    /// Decoding this table reported errors: later checks skip what would only be follow-ons.
    #[serde(skip)]
    #[schemars(skip)]
    pub decode_errors: bool,
}

/// A declared secret: where its value comes from.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSecret {
    /// `env:VAR` (a variable of ccluster's environment), `file:PATH` (relative to the
    /// clusterfile's directory; one trailing newline dropped), `command:CMD` (run by `sh -c` in
    /// the clusterfile's directory; its stdout, one trailing newline dropped) or
    /// `kubernetes:NAMESPACE/SECRET/KEY` (a key of a Kubernetes Secret, through the kubeconfig's
    /// current context). Read when a run starts; a value shorter than 8 bytes is refused.
    #[schemars(required, regex(pattern = r"^(env|file|command|kubernetes):.+$"))]
    pub from: Option<Spanned<String>>,
    #[serde(skip)]
    #[schemars(skip)]
    pub name_span: Span,
}

/// A secret a task lists: its name (delivered in the variable of that name), or a table saying
/// how it is delivered.
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RawSecretRefSchema {
    /// The secret's name: the task gets its value in the environment variable of that name.
    Name(String),
    Table(RawSecretRefTable),
}

/// How a task gets a secret: in a variable (`env`, default: the secret's name), or in a file
/// (`file`, a name: a 0600 file outside the workspace, whose path is in the variable `env`,
/// default `<NAME>_FILE`).
#[derive(Clone, Debug, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawSecretRefTable {
    /// The secret's name, as declared under `[secrets]`.
    pub name: String,
    /// The variable the value (or, with `file`, the file's path) is in.
    #[schemars(regex(pattern = r"^[A-Za-z_][A-Za-z0-9_]*$"))]
    pub env: Option<String>,
    /// Deliver the value as a file of this name (no `/`) instead of a variable.
    pub file: Option<String>,
}

/// A secret a task lists, as written (see [`RawSecretRefSchema`]).
#[derive(Clone, Debug, Serialize)]
pub struct RawSecretRef {
    pub name: Spanned<String>,
    pub env: Option<Spanned<String>>,
    pub file: Option<Spanned<String>>,
}

/// Agent (Claude Code) settings of a task, or of every task under `[defaults.claude]`.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawClaude {
    /// Model name or alias (`opus`, `sonnet`, `haiku`, or a full model id).
    pub model: Option<Spanned<String>>,
    /// Claude Code permission mode (default `acceptEdits`).
    pub permission_mode: Option<Spanned<PermissionMode>>,
    /// Tools the agent may use without asking, e.g. `"Bash(cargo *)"`.
    pub allowed_tools: Option<Spanned<Vec<Spanned<String>>>>,
    /// Tools the agent may not use.
    pub disallowed_tools: Option<Spanned<Vec<Spanned<String>>>>,
    /// Upper bound on agent turns (model requests) per attempt.
    #[schemars(range(min = 1))]
    pub max_turns: Option<Spanned<i64>>,
    /// Upper bound on the cost of one attempt, in US dollars.
    #[schemars(range(min = 0))]
    pub max_budget_usd: Option<Spanned<f64>>,
    /// Text appended to the agent's system prompt.
    pub append_system_prompt: Option<Spanned<String>>,
    /// Claude Code settings: a path to a settings JSON file, or the settings inline.
    pub settings: Option<Spanned<StringOrObject>>,
    /// The `claude` executable, relative to the clusterfile (default: `claude` on `PATH`);
    /// `CCLUSTER_CLAUDE_BIN` overrides it.
    pub bin: Option<Spanned<String>>,
}

/// An environment value as it may be written; numbers and booleans are taken as their text.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only describes the schema
pub enum EnvValue {
    String(String),
    Number(f64),
    Bool(bool),
}

/// A string, or a table written inline.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum StringOrObject {
    String(String),
    Object(serde_json::Map<String, serde_json::Value>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub enum PermissionMode {
    #[serde(rename = "acceptEdits")]
    AcceptEdits,
    #[serde(rename = "auto")]
    Auto,
    #[serde(rename = "bypassPermissions")]
    BypassPermissions,
    #[serde(rename = "default")]
    Default,
    #[serde(rename = "dontAsk")]
    DontAsk,
    #[serde(rename = "manual")]
    Manual,
    #[serde(rename = "plan")]
    Plan,
}

impl PermissionMode {
    pub const ALL: &'static [(&'static str, PermissionMode)] = &[
        ("acceptEdits", PermissionMode::AcceptEdits),
        ("auto", PermissionMode::Auto),
        ("bypassPermissions", PermissionMode::BypassPermissions),
        ("default", PermissionMode::Default),
        ("dontAsk", PermissionMode::DontAsk),
        ("manual", PermissionMode::Manual),
        ("plan", PermissionMode::Plan),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("default", |(n, _)| n)
    }

    /// How much a mode lets an agent do without asking (which a `-p` session cannot): `plan`
    /// changes nothing; `dontAsk`, `default` and `manual` allow only what `allowed_tools` lists;
    /// `acceptEdits` also edits the worktree; `auto` lets a classifier approve the rest;
    /// `bypassPermissions` allows everything, also outside the worktree.
    pub fn permissiveness(self) -> u8 {
        match self {
            PermissionMode::Plan => 0,
            PermissionMode::DontAsk | PermissionMode::Default | PermissionMode::Manual => 1,
            PermissionMode::AcceptEdits => 2,
            PermissionMode::Auto => 3,
            PermissionMode::BypassPermissions => 4,
        }
    }

    pub fn from_name(name: &str) -> Option<PermissionMode> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }
}

/// Retry policy: `limit` counts retries, so a task runs at most `limit + 1` times.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    /// Number of retries after the first attempt (default 0).
    #[schemars(range(min = 0))]
    pub limit: Option<Spanned<i64>>,
    /// Delay between attempts.
    pub backoff: Option<RawBackoff>,
    /// Failure classes that are retried (default: every class but `auth`, `budget`,
    /// `setup_error` and `merge_conflict`).
    pub on: Option<Spanned<Vec<Spanned<FailureClass>>>>,
    /// Agent tasks: a retry after an interrupted attempt continues its conversation, in its
    /// workspace, instead of starting over (default `false`).
    pub resume_session: Option<Spanned<bool>>,
}

/// Exponential backoff: the n-th retry waits `initial * factor^(n-1)`, at most `max`, randomised by
/// ± `jitter` (a fraction).
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawBackoff {
    /// First delay, a duration like `"1s"` (default `"1s"`).
    pub initial: Option<Spanned<String>>,
    /// Multiplier per retry, at least 1 (default 2).
    #[schemars(range(min = 1))]
    pub factor: Option<Spanned<f64>>,
    /// Cap on the delay (default `"5m"`).
    pub max: Option<Spanned<String>>,
    /// Random spread as a fraction between 0 and 1 (default 0.1).
    #[schemars(range(min = 0, max = 1))]
    pub jitter: Option<Spanned<f64>>,
}

/// Why an attempt failed; retry policies select on these.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    serde::Deserialize,
    JsonSchema,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// A shell command exited non-zero (or printed no JSON with `output = "json"`), or an agent
    /// exited non-zero after a successful result.
    ExitCode,
    /// The task ran past its `timeout`.
    Timeout,
    /// The process was ended by a signal it did not get from ccluster.
    Signal,
    /// The process could not be started.
    SpawnError,
    /// The workspace could not be made, or its `setup` command failed.
    SetupError,
    /// A git merge conflicted and was not resolved.
    MergeConflict,
    /// The model API answered 429.
    RateLimit,
    /// The model API answered 529.
    Overloaded,
    /// Other model API failures: 5xx, timeouts, broken streams.
    ApiError,
    /// Authentication failed (401/403); never retried.
    Auth,
    /// The agent reached `max_turns`.
    MaxTurns,
    /// The agent reached `max_budget_usd`.
    Budget,
    /// The agent did not produce a valid structured output.
    StructuredOutput,
    /// The worker was killed.
    Killed,
    /// The agent ended without a result.
    NoResult,
    /// The container was killed for using more memory than its runner's `memory`.
    Oom,
    /// A planner's output is not a valid task graph for the fan-out that reads it (a duplicate
    /// or unknown id, a cycle, too many instances): the retry tells the planner what is wrong.
    PlanInvalid,
    /// The cluster lost the attempt: its pod was evicted, its node lost, or the pod or Job
    /// deleted by someone else (`kubernetes` runners).
    Infra,
    /// The attempt's image could not be pulled, or does not exist where the runner looks
    /// (never retried: the message names the image and the reason).
    Image,
    /// No node could take the attempt's pod for longer than the runner's
    /// `unschedulable_timeout` (the message gives the scheduler's reason).
    Unschedulable,
    /// The attempt broke a rule of the run: its change holds the value of a secret, and was not
    /// committed (the message names the file and the secret, never the value). Never retried.
    Policy,
}

impl FailureClass {
    pub const ALL: &'static [(&'static str, FailureClass)] = &[
        ("exit_code", FailureClass::ExitCode),
        ("timeout", FailureClass::Timeout),
        ("signal", FailureClass::Signal),
        ("spawn_error", FailureClass::SpawnError),
        ("setup_error", FailureClass::SetupError),
        ("merge_conflict", FailureClass::MergeConflict),
        ("rate_limit", FailureClass::RateLimit),
        ("overloaded", FailureClass::Overloaded),
        ("api_error", FailureClass::ApiError),
        ("auth", FailureClass::Auth),
        ("max_turns", FailureClass::MaxTurns),
        ("budget", FailureClass::Budget),
        ("structured_output", FailureClass::StructuredOutput),
        ("killed", FailureClass::Killed),
        ("no_result", FailureClass::NoResult),
        ("oom", FailureClass::Oom),
        ("plan_invalid", FailureClass::PlanInvalid),
        ("infra", FailureClass::Infra),
        ("image", FailureClass::Image),
        ("unschedulable", FailureClass::Unschedulable),
        ("policy", FailureClass::Policy),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, c)| *c == self)
            .map_or("exit_code", |(n, _)| n)
    }

    /// Classes retried when a policy does not say `on`: everything a retry can plausibly fix.
    pub fn retried_by_default(self) -> bool {
        !matches!(
            self,
            FailureClass::Auth
                | FailureClass::Budget
                | FailureClass::SetupError
                | FailureClass::MergeConflict
                | FailureClass::Oom
                | FailureClass::Image
                | FailureClass::Unschedulable
                | FailureClass::Policy
        )
    }
}

/// What a fan-out does when one of its instances fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnItemFailure {
    /// Stop scheduling new instances; let running ones finish; the task fails.
    FailFast,
    /// Run every instance; the task succeeds when at least `min_success` instances did.
    Continue,
}

impl OnItemFailure {
    pub const ALL: &'static [(&'static str, OnItemFailure)] = &[
        ("fail_fast", OnItemFailure::FailFast),
        ("continue", OnItemFailure::Continue),
    ];
}

/// How a shell task's stdout becomes its output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    /// Trimmed stdout text (the default).
    Text,
    /// The last JSON value printed on stdout.
    Json,
}

impl OutputMode {
    pub const ALL: &'static [(&'static str, OutputMode)] =
        &[("text", OutputMode::Text), ("json", OutputMode::Json)];
}

/// Settings every task inherits unless it sets its own.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawDefaults {
    pub claude: Option<RawClaude>,
    pub retry: Option<RawRetry>,
    /// Default timeout, a duration like `"30m"`.
    pub timeout: Option<Spanned<String>>,
    /// Default runner name (default `local`).
    pub runner: Option<Spanned<String>>,
    /// Environment variables given to every shell task (templates).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(with = "IndexMap<String, EnvValue>")]
    pub env: IndexMap<String, Spanned<String>>,
    /// Default working directory of shell tasks, relative to the task's workspace (template).
    pub workdir: Option<Spanned<String>>,
    #[schemars(range(min = 1))]
    pub max_parallel: Option<Spanned<i64>>,
    pub on_item_failure: Option<Spanned<OnItemFailure>>,
    /// Globs of files kept as artifacts of every task.
    pub artifacts: Option<Spanned<Vec<Spanned<String>>>>,
    /// Globs of JUnit XML test reports of every task.
    pub reports: Option<Spanned<Vec<Spanned<String>>>>,
    /// Upper bound on what the run's agents may spend, in US dollars: no agent task starts once
    /// it is reached.
    #[schemars(range(min = 0))]
    pub max_run_usd: Option<Spanned<f64>>,
    /// Agent tasks running at once, apart from `--jobs` (processes): agents wait on the model,
    /// not on CPUs. Default: what memory allows (about 250 MB a worker), at most 8.
    #[schemars(range(min = 1))]
    pub max_agents: Option<Spanned<i64>>,
    /// Default workspace of agent and shell tasks.
    pub workspace: Option<Spanned<WorkspaceMode>>,
    /// Command run in every fresh workspace before its task (`sh -c`).
    pub setup: Option<Spanned<String>>,
    /// Globs of files copied from the main checkout into every fresh workspace (`.env`).
    pub copy: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[prices."<model prefix>"]`: what a model's tokens cost, US dollars per million.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    #[schemars(range(min = 0))]
    pub input: Option<Spanned<f64>>,
    #[schemars(range(min = 0))]
    pub output: Option<Spanned<f64>>,
    /// Default: a tenth of `input`.
    #[schemars(range(min = 0))]
    pub cache_read: Option<Spanned<f64>>,
    /// Default: 1.25 times `input`.
    #[schemars(range(min = 0))]
    pub cache_write: Option<Spanned<f64>>,
    #[serde(skip)]
    #[schemars(skip)]
    pub name_span: crate::diagnostic::Span,
}

/// `[policy]`: what the tasks of the workflow may change.
#[derive(Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Globs of the paths a task may change (relative to the repository; `**` crosses
    /// directories): a change to any other path is refused. Default: every path.
    pub allowed_paths: Option<Spanned<Vec<Spanned<String>>>>,
    /// Globs of paths no task may change (`.github/**`, `**/.env`).
    pub denied_paths: Option<Spanned<Vec<Spanned<String>>>>,
    /// At most this many files changed by one task's attempt.
    #[schemars(range(min = 1))]
    pub max_files_changed: Option<Spanned<i64>>,
    /// At most this many lines changed (added plus removed) by one task's attempt.
    #[schemars(range(min = 1))]
    pub max_lines_changed: Option<Spanned<i64>>,
    /// Refuse a change that adds what looks like a credential (a private key, an AWS, GitHub,
    /// Anthropic, Slack or Google key or token). Default `true`.
    pub forbid_credentials: Option<Spanned<bool>>,
    /// The tool rules an agent task may list in `allowed_tools` (a bare tool name, `"Bash"`, also
    /// covers its rules, `"Bash(cargo *)"`). Default: any.
    pub allowed_tools: Option<Spanned<Vec<Spanned<String>>>>,
    /// Tool rules every agent is denied (added to its `disallowed_tools`); no task may allow
    /// one. Default `["Bash(git push:*)"]`: ccluster publishes results, agents do not push.
    pub denied_tools: Option<Spanned<Vec<Spanned<String>>>>,
    /// The most permissive `permission_mode` a task may ask for, in the order `plan` <
    /// `dontAsk` = `default` = `manual` < `acceptEdits` < `auto` < `bypassPermissions`.
    /// Default `auto`: `bypassPermissions` only where the policy says so.
    pub max_permission_mode: Option<Spanned<PermissionMode>>,
    /// A ceiling on each agent task's `max_turns` (and its value where a task sets none).
    #[schemars(range(min = 1))]
    pub max_turns: Option<Spanned<i64>>,
    /// A ceiling on each agent task's `max_budget_usd` (and its value where a task sets none).
    #[schemars(range(min = 0))]
    pub max_budget_usd: Option<Spanned<f64>>,
    /// A ceiling on `[defaults] max_run_usd` (and its value where the workflow sets none).
    #[schemars(range(min = 0))]
    pub max_run_usd: Option<Spanned<f64>>,
    /// The widest network a `docker` or `kubernetes` runner may give tasks: `none` < `api-only`
    /// < `bridge`. Default: unlimited (runners default to `api-only` for agents and `bridge` for
    /// shell tasks).
    pub network: Option<Spanned<NetworkMode>>,
}

/// Where a task runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum WorkspaceMode {
    /// A git worktree of its own (detached); its commit is kept as `refs/ccluster/runs/<run>/<task>`.
    Worktree,
    /// A shared-object clone of its own, for repositories where worktrees do not suit.
    Copy,
    /// The clusterfile's directory, read-only by convention.
    None,
}

impl WorkspaceMode {
    pub const ALL: &'static [(&'static str, WorkspaceMode)] = &[
        ("worktree", WorkspaceMode::Worktree),
        ("copy", WorkspaceMode::Copy),
        ("none", WorkspaceMode::None),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, m)| *m == self)
            .map_or("none", |(n, _)| n)
    }
}

/// Where a runner places task processes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunnerKind {
    Local,
    Docker,
    Kubernetes,
}

impl RunnerKind {
    pub const ALL: &'static [(&'static str, RunnerKind)] = &[
        ("local", RunnerKind::Local),
        ("docker", RunnerKind::Docker),
        ("kubernetes", RunnerKind::Kubernetes),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("local", |(n, _)| n)
    }
}

/// When a `docker` or `kubernetes` runner pulls its image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PullPolicy {
    /// Never: the image must be on the machine.
    Never,
    /// When the machine does not have it (the default).
    Missing,
    /// Before every run.
    Always,
}

impl PullPolicy {
    pub const ALL: &'static [(&'static str, PullPolicy)] = &[
        ("never", PullPolicy::Never),
        ("missing", PullPolicy::Missing),
        ("always", PullPolicy::Always),
    ];
}

/// What a container may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// Nothing: no network at all.
    None,
    /// Only the model API's host and the runner's `allow_hosts` (`docker`: through ccluster's
    /// egress proxy; `kubernetes`: by a NetworkPolicy, which also allows ccluster's git endpoint).
    ApiOnly,
    /// Docker's default bridge network; on `kubernetes`, the cluster's network with no
    /// NetworkPolicy.
    Bridge,
}

impl NetworkMode {
    pub const ALL: &'static [(&'static str, NetworkMode)] = &[
        ("none", NetworkMode::None),
        ("api-only", NetworkMode::ApiOnly),
        ("bridge", NetworkMode::Bridge),
    ];

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, k)| *k == self)
            .map_or("none", |(n, _)| n)
    }

    /// How much of the network a mode opens: `none` < `api-only` < `bridge`.
    pub fn reach(self) -> u8 {
        match self {
            NetworkMode::None => 0,
            NetworkMode::ApiOnly => 1,
            NetworkMode::Bridge => 2,
        }
    }
}

/// A named runner.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawRunner {
    /// `local` (a process on this machine), `docker` or `kubernetes`.
    pub kind: Option<Spanned<RunnerKind>>,
    /// Container image (`docker`, `kubernetes`).
    pub image: Option<Spanned<String>>,
    /// `kubernetes`: namespace of the task pods (default: the context's, else `default`).
    pub namespace: Option<Spanned<String>>,
    /// Upper bound on tasks running at once on this runner.
    #[schemars(range(min = 1))]
    pub max_parallel: Option<Spanned<i64>>,
    /// `docker`, `kubernetes`: when to pull the image: `never`, `missing` (default), `always`.
    pub pull: Option<Spanned<PullPolicy>>,
    /// `docker`: the user the task runs as, `uid[:gid]` or a name in the image (default: the
    /// invoking user's uid:gid, so files written in the worktree stay theirs).
    pub user: Option<Spanned<String>>,
    /// `docker`: CPUs the container may use (`1.5`).
    pub cpus: Option<Spanned<f64>>,
    /// `docker`: memory limit, bytes or with a unit: `512m`, `2g` (powers of 1024).
    pub memory: Option<Spanned<String>>,
    /// `docker`: the most processes the container may have.
    #[schemars(range(min = 1))]
    pub pids: Option<Spanned<i64>>,
    /// `docker`, `kubernetes`: `none`, `api-only` (the default for agent tasks) or `bridge` (the
    /// default for shell tasks).
    pub network: Option<Spanned<NetworkMode>>,
    /// `docker`: more host paths mounted read-only, `"<host path>:<container path>"`.
    pub mounts: Option<Spanned<Vec<Spanned<String>>>>,
    /// `docker`, `kubernetes`: environment variables set in every container of this runner.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(with = "IndexMap<String, EnvValue>")]
    pub env: IndexMap<String, Spanned<String>>,
    /// `docker`, `kubernetes`, under `network = "api-only"`: hosts besides the model API's that
    /// tasks may reach (`crates.io`, `registry.npmjs.org:443`).
    pub allow_hosts: Option<Spanned<Vec<Spanned<String>>>>,
    /// `kubernetes`: the kubeconfig context (default: the current one, or the in-cluster config).
    pub context: Option<Spanned<String>>,
    /// `kubernetes`: the service account the task pods run as (default: the namespace's `default`).
    pub service_account: Option<Spanned<String>>,
    /// `kubernetes`: resource requests and limits of a task's container.
    pub resources: Option<Spanned<RawResources>>,
    /// `kubernetes`: labels a node must have to run the task pods.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(with = "IndexMap<String, String>")]
    pub node_selector: IndexMap<String, Spanned<String>>,
    /// `kubernetes`: taints of nodes the task pods tolerate.
    pub tolerations: Option<Spanned<Vec<RawToleration>>>,
    /// `kubernetes`: names of Secrets in the namespace holding registry credentials for `image`.
    pub image_pull_secrets: Option<Spanned<Vec<Spanned<String>>>>,
    /// `kubernetes`: labels added to the task Jobs and pods (keys under `dev.ccluster.` and
    /// `ccluster.dev/` are ccluster's own).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(with = "IndexMap<String, String>")]
    pub labels: IndexMap<String, Spanned<String>>,
    /// `kubernetes`: annotations added to the task Jobs and pods.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(with = "IndexMap<String, String>")]
    pub annotations: IndexMap<String, Spanned<String>>,
    /// `kubernetes`: seconds after which Kubernetes deletes a finished Job itself.
    #[schemars(range(min = 0, max = 2147483647))]
    pub ttl_seconds_after_finished: Option<Spanned<i64>>,
    /// `kubernetes`: a git remote of the repository (`"origin"`) the pods fetch from and push to,
    /// instead of ccluster's own endpoint (for clusters that cannot reach this machine).
    pub remote: Option<Spanned<String>>,
    /// `kubernetes`: how long a pod may stay unschedulable before its attempt fails (a duration,
    /// default `"5m"`).
    pub unschedulable_timeout: Option<Spanned<String>>,
    #[serde(skip)]
    #[schemars(skip)]
    pub name_span: Span,
    #[serde(skip)]
    #[schemars(skip)]
    pub decode_errors: bool,
}

/// A `kubernetes` runner's resource requests and limits, by resource name (`cpu`, `memory`,
/// `ephemeral-storage`, or an extended resource `<domain>/<name>`), as Kubernetes quantities:
/// `cpu = "500m"`, `memory = "512Mi"`.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawResources {
    /// What the scheduler reserves for a task's container.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(with = "IndexMap<String, Quantity>")]
    pub requests: IndexMap<String, Spanned<String>>,
    /// The most a task's container may use (over its memory limit it is killed: class `oom`).
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(with = "IndexMap<String, Quantity>")]
    pub limits: IndexMap<String, Spanned<String>>,
}

/// A Kubernetes quantity: `"250m"`, `"1.5"`, `"512Mi"`, `"1G"`, or a bare number.
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)] // only describes the schema
pub enum Quantity {
    String(String),
    Number(f64),
}

/// A taint a `kubernetes` runner's pods tolerate.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawToleration {
    /// The taint's key (none, with `operator = "Exists"`: every taint).
    pub key: Option<Spanned<String>>,
    /// `Equal` (the default: the taint's value is `value`) or `Exists` (any value).
    pub operator: Option<Spanned<TolerationOperator>>,
    /// The taint's value, with `operator = "Equal"`.
    pub value: Option<Spanned<String>>,
    /// The taint effect tolerated: `NoSchedule`, `PreferNoSchedule` or `NoExecute` (none: all).
    pub effect: Option<Spanned<TaintEffect>>,
    /// With `effect = "NoExecute"`: how long a pod stays on the node once the taint appears.
    #[schemars(range(min = 0, max = u32::MAX))]
    pub toleration_seconds: Option<Spanned<i64>>,
    #[serde(skip)]
    #[schemars(skip)]
    pub span: Span,
}

/// How a toleration matches a taint's value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub enum TolerationOperator {
    Equal,
    Exists,
}

impl TolerationOperator {
    pub const ALL: &'static [(&'static str, TolerationOperator)] = &[
        ("Equal", TolerationOperator::Equal),
        ("Exists", TolerationOperator::Exists),
    ];

    pub fn name(self) -> &'static str {
        match self {
            TolerationOperator::Equal => "Equal",
            TolerationOperator::Exists => "Exists",
        }
    }
}

/// What a taint does to pods that do not tolerate it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

impl TaintEffect {
    pub const ALL: &'static [(&'static str, TaintEffect)] = &[
        ("NoSchedule", TaintEffect::NoSchedule),
        ("PreferNoSchedule", TaintEffect::PreferNoSchedule),
        ("NoExecute", TaintEffect::NoExecute),
    ];

    pub fn name(self) -> &'static str {
        match self {
            TaintEffect::NoSchedule => "NoSchedule",
            TaintEffect::PreferNoSchedule => "PreferNoSchedule",
            TaintEffect::NoExecute => "NoExecute",
        }
    }
}

/// A merge (fan-in) task's settings.
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawMerge {
    /// `git` merges the branches of the tasks it needs; `collect` gathers their outputs into a list.
    pub strategy: Option<Spanned<MergeStrategy>>,
    /// What a conflicting git merge does: `fail` (default), hand it to an `agent`, or `run` the
    /// command in `run`.
    pub on_conflict: Option<Spanned<OnConflict>>,
    /// With `on_conflict = "run"`: a command (`sh -c`) run in the conflicted worktree to resolve it.
    pub run: Option<Spanned<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MergeStrategy {
    Git,
    Collect,
}

impl MergeStrategy {
    pub const ALL: &'static [(&'static str, MergeStrategy)] = &[
        ("git", MergeStrategy::Git),
        ("collect", MergeStrategy::Collect),
    ];
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    Fail,
    Agent,
    Run,
}

impl OnConflict {
    pub const ALL: &'static [(&'static str, OnConflict)] = &[
        ("fail", OnConflict::Fail),
        ("agent", OnConflict::Agent),
        ("run", OnConflict::Run),
    ];
}

/// `map`: a literal list, or a template expression that evaluates to a list.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RawMap {
    List(Vec<serde_json::Value>),
    Expression(String),
}

/// `when`: a template expression (`"{{ inputs.docs }}"`) or a literal boolean.
#[derive(Clone, Debug, PartialEq, Serialize, JsonSchema)]
#[serde(untagged)]
pub enum RawWhen {
    Bool(bool),
    Expression(String),
}

/// A task: exactly one of `prompt` (agent), `run` (shell) or `merge` (fan-in).
#[derive(Clone, Debug, Default, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawTask {
    /// What the task is for, shown in plans and reports.
    pub description: Option<Spanned<String>>,
    /// Agent task: the prompt, a template.
    pub prompt: Option<Spanned<String>>,
    /// Shell task: the command, a template run by `sh -c`.
    pub run: Option<Spanned<String>>,
    /// Merge task: fan-in of the tasks it needs.
    pub merge: Option<RawMerge>,
    /// Agent settings, merged key by key over `[defaults.claude]`.
    pub claude: Option<RawClaude>,
    /// Agent task: JSON Schema of a structured output, inline or as a path to a JSON file.
    pub output_schema: Option<Spanned<StringOrObject>>,
    /// Shell task: how stdout becomes the output (`text` or `json`).
    pub output: Option<Spanned<OutputMode>>,
    /// Shell task: environment variables (templates), merged over `[defaults.env]`.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(with = "IndexMap<String, EnvValue>")]
    pub env: IndexMap<String, Spanned<String>>,
    /// Shell task: working directory relative to the workspace (template).
    pub workdir: Option<Spanned<String>>,
    /// Shell and agent tasks: the secrets the task gets, by name (in the variable of that name),
    /// or as `{ name, env, file }`. A task gets no other secret.
    #[schemars(with = "Option<Vec<RawSecretRefSchema>>")]
    pub secrets: Option<Spanned<Vec<RawSecretRef>>>,
    /// Ids of the tasks this one runs after.
    pub needs: Option<Spanned<Vec<Spanned<String>>>>,
    /// Run only when this is true; otherwise the task is skipped.
    pub when: Option<Spanned<RawWhen>>,
    /// Fan-out: one instance per item, with `item` and `index` in the template context.
    pub map: Option<Spanned<RawMap>>,
    /// Fan-out: each instance's id, a template over `item` and `index` (letters, digits, `_` and
    /// `-`): the instances are `<task>[<id>]` instead of `<task>[<index>]`, and `after` names them.
    pub id: Option<Spanned<String>>,
    /// Fan-out with `id`: the ids of the instances this one runs after, a template giving a list
    /// (`"{{ item.depends_on }}"`). An instance starts from the merge of their results; the
    /// fan-out is then a task graph.
    pub after: Option<Spanned<String>>,
    /// Task graph: what a conflict does when an instance starts from the merge of what it runs
    /// after: `fail` (default), or hand it to an `agent` (with `[defaults.claude]` settings).
    pub on_conflict: Option<Spanned<OnConflict>>,
    /// Upper bound on instances of this fan-out running at once.
    #[schemars(range(min = 1))]
    pub max_parallel: Option<Spanned<i64>>,
    /// What a failing instance does to the fan-out (`fail_fast` or `continue`).
    pub on_item_failure: Option<Spanned<OnItemFailure>>,
    /// With `continue`: how many instances must succeed (default: all).
    #[schemars(range(min = 0))]
    pub min_success: Option<Spanned<i64>>,
    pub retry: Option<RawRetry>,
    /// Time limit of one attempt, a duration like `"30m"`.
    pub timeout: Option<Spanned<String>>,
    /// Runner name (default from `[defaults]`, else `local`).
    pub runner: Option<Spanned<String>>,
    /// Globs of files kept as artifacts, relative to the workspace.
    pub artifacts: Option<Spanned<Vec<Spanned<String>>>>,
    /// Globs of JUnit XML test reports, relative to the workspace.
    pub reports: Option<Spanned<Vec<Spanned<String>>>>,
    /// `worktree`, `copy` or `none` (default: `worktree` for agent tasks and for shell tasks that
    /// need a task with a workspace, else `none`).
    pub workspace: Option<Spanned<WorkspaceMode>>,
    /// Command run in the fresh workspace before the task (`sh -c`).
    pub setup: Option<Spanned<String>>,
    /// Globs of files copied from the main checkout into the fresh workspace.
    pub copy: Option<Spanned<Vec<Spanned<String>>>>,
    /// Tasks without a workspace: globs of the files the task reads, relative to the
    /// clusterfile's directory; their contents are in its cache key. Default: every file the
    /// repository tracks, as it is on disk (none outside a repository). `[]`: none.
    pub sources: Option<Spanned<Vec<Spanned<String>>>>,
    /// Paths or globs (templates) the task is told to change: `plan` warns when instances of a
    /// fan-out overlap, since their merge may conflict.
    pub touches: Option<Spanned<Vec<Spanned<String>>>>,
    /// Embed a workflow template here: `./path.toml`, `builtin:<name>`, or
    /// `git+<url>#<ref>:<path>`. Its tasks run as `<id>.<task>`; tasks that need this one wait for
    /// all of them, and its `[outputs]` are this task's output.
    #[serde(rename = "use")]
    pub use_: Option<Spanned<String>>,
    /// The template's parameters (its `[inputs]`): values, or templates over this workflow's
    /// inputs and vars.
    #[serde(default, skip_serializing_if = "IndexMap::is_empty")]
    #[schemars(with = "IndexMap<String, serde_json::Value>")]
    pub with: IndexMap<String, Spanned<serde_json::Value>>,
    /// Where an embedded task came from (set when a template is expanded).
    #[serde(skip)]
    #[schemars(skip)]
    pub origin: Option<std::sync::Arc<Origin>>,
    /// The `with` key was written.
    #[serde(skip)]
    #[schemars(skip)]
    pub with_span: Option<Span>,
    /// Agent tasks: what the scripted model does under `apply --rehearse` (`output`, `files`,
    /// `turns`, `faults`).
    #[schemars(with = "Option<crate::scripted::TaskScript>")]
    pub rehearsal: Option<Spanned<serde_json::Value>>,
    #[serde(skip)]
    #[schemars(skip)]
    pub id_span: Span,
    #[serde(skip)]
    #[schemars(skip)]
    pub decode_errors: bool,
    /// A `map` key was written (possibly with a wrong value): `item` and `index` are meant to exist.
    #[serde(skip)]
    #[schemars(skip)]
    pub map_given: bool,
    /// Set for the task that stands for a template instance: its outputs.
    #[serde(skip)]
    #[schemars(skip)]
    pub outputs_of: Option<OutputsOf>,
}

/// The binding of a template's inputs where it is used.
#[derive(Debug)]
pub struct ScopeDecl {
    /// `with` values: JSON, or strings with templates over the using workflow's inputs and vars.
    pub with: IndexMap<String, serde_json::Value>,
    /// The template's declared defaults, for inputs `with` leaves out.
    pub defaults: IndexMap<String, serde_json::Value>,
    /// The template's `[vars]`.
    pub vars: IndexMap<String, serde_json::Value>,
    /// Every input the template declares (what its templates may read as `inputs.<name>`).
    pub declared: Vec<String>,
    /// Their types, to check `with` values once rendered.
    pub types: IndexMap<String, InputType>,
    /// The template's name, for messages.
    pub template: String,
    /// The scope `with` values are evaluated in: the using template's, or `None` for the
    /// clusterfile itself.
    pub parent: Option<std::sync::Arc<ScopeDecl>>,
}

/// Where an embedded task comes from.
#[derive(Debug)]
pub struct Origin {
    /// The template file (its spans point into it).
    pub file: SourceFile,
    /// The task-id prefix of its template instance (`api`, `api.inner`): `tasks.x` in its
    /// templates means `<prefix>.x`.
    pub prefix: String,
    pub scope: std::sync::Arc<ScopeDecl>,
}

/// The outputs task that stands for a template instance.
#[derive(Clone, Debug)]
pub struct OutputsOf {
    pub values: IndexMap<String, Spanned<String>>,
    /// The embedded task whose branch is the instance's result (the template's `result`, or its
    /// last git merge).
    pub result: Option<String>,
}
