//! The Claude Code worker: the `claude` command line and clean environment of an attempt, its
//! stream-json read line by line as it arrives (progress, then the final result), the failure
//! classes the retry policy sees, and the usage and cost it reports. Facts about the CLI this
//! relies on are in `../shared/claude-cli.md` (Claude Code 2.1.331) and tested end to end.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::exec::ProcessEnd;
use crate::model::raw::FailureClass;
use crate::model::raw::StringOrObject;
use crate::model::workflow::AgentSettings;

pub mod gateway;
pub mod prices;
pub mod transcript_view;

/// The Claude Code version ccluster is tested with (installed by the test suite when missing).
pub const PINNED_VERSION: &str = "2.1.331";

/// Finds the `claude` executable: `CCLUSTER_CLAUDE_BIN`, else the clusterfile's `bin`, else
/// `claude` on `PATH`.
pub fn find_bin(configured: Option<&str>) -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("CCLUSTER_CLAUDE_BIN").filter(|b| !b.is_empty()) {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "CCLUSTER_CLAUDE_BIN is `{}`, which is not a file",
                bin.display()
            ))
        };
    }
    if let Some(bin) = configured {
        let bin = PathBuf::from(bin);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "`claude.bin` is `{}`, which is not a file",
                bin.display()
            ))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("claude"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "the `claude` CLI is not on PATH; install it with `npm install -g @anthropic-ai/claude-code@{PINNED_VERSION}`, or set CCLUSTER_CLAUDE_BIN"
            )
        })
}

/// How workers authenticate, as the user has it set up. Only names are ever shown, never values.
#[derive(Clone, Debug, PartialEq)]
pub enum Auth {
    ApiKey,
    AuthToken,
    OAuthToken,
    Bedrock,
    Vertex,
    /// A `claude login` session: its credentials file is copied into each worker's config dir.
    Subscription(PathBuf),
    /// `apply --rehearse`: the scripted server, no credentials.
    Rehearsal,
}

/// Variables carried into workers for each kind of auth (plus routing and cloud settings).
const AUTH_VARS: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_BASE_URL",
    "ANTHROPIC_CUSTOM_HEADERS",
    "CLAUDE_CODE_USE_BEDROCK",
    "CLAUDE_CODE_USE_VERTEX",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_BEARER_TOKEN_BEDROCK",
    "ANTHROPIC_VERTEX_PROJECT_ID",
    "CLOUD_ML_REGION",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "NO_PROXY",
];

/// The variables of `AUTH_VARS` (and the scripted server's token) that are credentials: a
/// runner that can keep them from sight does (see `ProcessSpec::secret_env`).
pub const SECRET_VARS: &[&str] = &[
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_AUTH_TOKEN",
    "CLAUDE_CODE_OAUTH_TOKEN",
    "ANTHROPIC_CUSTOM_HEADERS",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_BEARER_TOKEN_BEDROCK",
];

/// Where workers reach the model when nothing says otherwise.
pub const DEFAULT_MODEL_API: &str = "https://api.anthropic.com";

fn set(name: &str) -> bool {
    std::env::var_os(name).is_some_and(|v| !v.is_empty())
}

/// The user's own Claude config dir (where `claude login` keeps its credentials).
fn user_config_dir() -> Option<PathBuf> {
    std::env::var_os("CLAUDE_CONFIG_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".claude")))
}

impl Auth {
    pub fn detect() -> Option<Auth> {
        if set("CLAUDE_CODE_USE_BEDROCK") {
            Some(Auth::Bedrock)
        } else if set("CLAUDE_CODE_USE_VERTEX") {
            Some(Auth::Vertex)
        } else if set("ANTHROPIC_API_KEY") {
            Some(Auth::ApiKey)
        } else if set("ANTHROPIC_AUTH_TOKEN") {
            Some(Auth::AuthToken)
        } else if set("CLAUDE_CODE_OAUTH_TOKEN") {
            Some(Auth::OAuthToken)
        } else {
            let credentials = user_config_dir()?.join(".credentials.json");
            credentials
                .is_file()
                .then_some(Auth::Subscription(credentials))
        }
    }

    /// In words, for people: which mechanism, never the secret.
    pub fn describe(&self) -> String {
        match self {
            Auth::ApiKey => "an API key (ANTHROPIC_API_KEY)".into(),
            Auth::AuthToken => "a bearer token (ANTHROPIC_AUTH_TOKEN)".into(),
            Auth::OAuthToken => {
                "an OAuth token from `claude setup-token` (CLAUDE_CODE_OAUTH_TOKEN)".into()
            }
            Auth::Bedrock => "Amazon Bedrock (CLAUDE_CODE_USE_BEDROCK)".into(),
            Auth::Vertex => "Google Vertex AI (CLAUDE_CODE_USE_VERTEX)".into(),
            Auth::Subscription(p) => format!("the `claude login` session in {}", p.display()),
            Auth::Rehearsal => "none: rehearsal against the scripted model server".into(),
        }
    }

    /// What a failing `detect` should tell the user.
    pub const MISSING: &'static str = "agent tasks need Claude credentials: set ANTHROPIC_API_KEY (or ANTHROPIC_AUTH_TOKEN, CLAUDE_CODE_OAUTH_TOKEN from `claude setup-token`, CLAUDE_CODE_USE_BEDROCK / CLAUDE_CODE_USE_VERTEX), or run `claude login`; or try the workflow with `apply --rehearse`";
}

/// Everything one attempt's worker needs.
pub struct Worker<'a> {
    pub bin: &'a Path,
    pub prompt: &'a str,
    pub settings: &'a AgentSettings,
    pub output_schema: Option<&'a Value>,
    /// A fresh UUID per attempt.
    pub session: &'a str,
    /// Continue this session instead of starting one (`--resume <id> -p "continue"`).
    pub resume: Option<&'a str>,
    /// What a resumed session is told (default `continue`): why its last answer was refused.
    pub resume_prompt: Option<&'a str>,
    /// `config/` and `tmp/` of this worker live here.
    pub dir: &'a Path,
    pub timeout: Option<Duration>,
    /// The task's retry policy: when it retries API failures itself, the CLI retries less.
    pub retry: &'a crate::model::workflow::RetryPolicy,
    pub auth: &'a Auth,
    /// Under rehearsal: where the scripted server is, and as which node it should answer.
    pub rehearsal: Option<Rehearsal<'a>>,
}

/// What a rehearsed worker needs to reach the scripted model server.
#[derive(Clone, Copy)]
pub struct Rehearsal<'a> {
    pub url: &'a str,
    /// The server's per-run secret, passed as the worker's API key.
    pub token: &'a str,
    /// The plan node it answers as.
    pub node: &'a str,
}

/// Files in the worker's directory that carry what could be too large for the command line (one
/// argument is limited to 128 KiB) or should not show in `ps`: the inline settings and the
/// appended system prompt. Written by [`Worker::prepare`]. (`--json-schema` takes only inline
/// JSON: the output schema stays on the command line.)
const SETTINGS_FILE: &str = "settings.json";
const SYSTEM_PROMPT_FILE: &str = "append-system-prompt.md";

impl Worker<'_> {
    /// `claude -p --session-id ... --output-format stream-json --verbose ...`. The prompt is not
    /// on the command line: it goes to the CLI's stdin ([`Worker::stdin`]), which `-p` reads when
    /// no prompt argument is given.
    pub fn argv(&self) -> Vec<String> {
        let s = self.settings;
        let file = |name: &str| self.dir.join(name).display().to_string();
        let mut argv = vec![self.bin.display().to_string()];
        match self.resume {
            Some(id) => argv.extend([
                "--resume".into(),
                id.into(),
                "-p".into(),
                self.resume_prompt.unwrap_or("continue").into(),
            ]),
            None => argv.extend(["-p".into(), "--session-id".into(), self.session.to_string()]),
        }
        argv.extend([
            "--output-format".into(),
            "stream-json".into(),
            "--verbose".into(),
            "--permission-mode".into(),
            s.permission_mode.to_string(),
        ]);
        if let Some(m) = &s.model {
            argv.extend(["--model".into(), m.clone()]);
        }
        if !s.allowed_tools.is_empty() {
            argv.push("--allowedTools".into());
            argv.extend(s.allowed_tools.iter().cloned());
        }
        if !s.disallowed_tools.is_empty() {
            argv.push("--disallowedTools".into());
            argv.extend(s.disallowed_tools.iter().cloned());
        }
        if let Some(t) = s.max_turns {
            argv.extend(["--max-turns".into(), t.to_string()]);
        }
        if let Some(b) = s.max_budget_usd {
            argv.extend(["--max-budget-usd".into(), b.to_string()]);
        }
        if s.append_system_prompt.is_some() {
            argv.extend([
                "--append-system-prompt-file".into(),
                file(SYSTEM_PROMPT_FILE),
            ]);
        }
        match &s.settings {
            Some(StringOrObject::String(path)) => {
                argv.extend(["--settings".into(), path.clone()]);
            }
            Some(StringOrObject::Object(_)) => {
                argv.extend(["--settings".into(), file(SETTINGS_FILE)]);
            }
            None => {}
        }
        if let Some(schema) = self.output_schema {
            argv.extend(["--json-schema".into(), schema.to_string()]);
        }
        argv
    }

    /// What the CLI reads on stdin: the prompt of a new session (a resumed one is told
    /// `continue` on the command line).
    pub fn stdin(&self) -> Option<Vec<u8>> {
        self.resume
            .is_none()
            .then(|| self.prompt.as_bytes().to_vec())
    }

    /// The worker's environment, besides what the task declares: its own config and temp dirs,
    /// the credentials, and bounded waits (`API_TIMEOUT_MS`, `CLAUDE_CODE_MAX_RETRIES`,
    /// `CLAUDE_BYTE_STREAM_IDLE_TIMEOUT_MS`) derived from the task's timeout, so the CLI gives up
    /// before ccluster's own watchdog has to kill it.
    pub fn env(&self) -> Vec<(String, String)> {
        let config = self.dir.join("config");
        let tmp = self.dir.join("tmp");
        let mut env = vec![
            (
                "CLAUDE_CONFIG_DIR".to_string(),
                config.display().to_string(),
            ),
            ("CLAUDE_CODE_TMPDIR".to_string(), tmp.display().to_string()),
            (
                "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(),
                "1".into(),
            ),
            ("DISABLE_TELEMETRY".into(), "1".into()),
            ("DISABLE_AUTOUPDATER".into(), "1".into()),
        ];
        // One API call may take a quarter of the attempt's time, within the CLI's own bounds.
        let quarter = self
            .timeout
            .map_or(Duration::from_secs(300), |t| t / 4)
            .clamp(Duration::from_secs(10), Duration::from_secs(600));
        env.push(("API_TIMEOUT_MS".into(), quarter.as_millis().to_string()));
        // The CLI's in-process retries are cheap (no restart); with the quarter-timeout above, 3
        // retries fit the attempt. When the task's policy retries API failures itself, the CLI
        // gives up sooner and lets a fresh attempt (with backoff) take over.
        let policy_retries_api = self.retry.limit > 0
            && self.retry.on.iter().any(|c| {
                matches!(
                    c,
                    FailureClass::RateLimit | FailureClass::Overloaded | FailureClass::ApiError
                )
            });
        let retries = if policy_retries_api { "2" } else { "3" };
        env.push(("CLAUDE_CODE_MAX_RETRIES".into(), retries.into()));
        env.push((
            "CLAUDE_BYTE_STREAM_IDLE_TIMEOUT_MS".into(),
            quarter
                .min(Duration::from_secs(300))
                .as_millis()
                .to_string(),
        ));
        match (self.rehearsal, self.auth) {
            (Some(r), _) => {
                env.push(("ANTHROPIC_BASE_URL".into(), r.url.to_string()));
                env.push(("ANTHROPIC_API_KEY".into(), r.token.to_string()));
                env.push((
                    "ANTHROPIC_CUSTOM_HEADERS".into(),
                    format!("X-Ccluster-Task: {}", r.node),
                ));
            }
            _ => {
                for name in AUTH_VARS {
                    if let Ok(v) = std::env::var(name) {
                        env.push((name.to_string(), v));
                    }
                }
            }
        }
        // As root, bypassPermissions needs to know it runs in a sandbox (a worktree).
        if self.settings.permission_mode == "bypassPermissions" && nix::unistd::geteuid().is_root()
        {
            env.push(("IS_SANDBOX".into(), "1".into()));
        }
        env
    }

    /// The model API the worker talks to: the scripted server, `ANTHROPIC_BASE_URL`, or
    /// Anthropic's. (Bedrock and Vertex are reached at their clouds' hosts, which a runner's
    /// `allow_hosts` must name.)
    pub fn model_api(&self) -> String {
        match self.rehearsal {
            Some(r) => r.url.to_string(),
            None => std::env::var("ANTHROPIC_BASE_URL")
                .ok()
                .filter(|u| !u.is_empty())
                .unwrap_or_else(|| DEFAULT_MODEL_API.to_string()),
        }
    }

    /// Makes the worker's directories; a `claude login` session's credentials are copied in.
    pub fn prepare(&self) -> std::io::Result<()> {
        let config = self.dir.join("config");
        crate::store::create_private_dir_all(&config)?;
        crate::store::create_private_dir_all(&self.dir.join("tmp"))?;
        // What `argv` names instead of passing it inline; settings may hold secrets (`env`), so
        // the files are the owner's only.
        let private =
            |name: &str, bytes: &[u8]| crate::store::write_private(&self.dir.join(name), bytes);
        if let Some(StringOrObject::Object(v)) = &self.settings.settings {
            private(SETTINGS_FILE, &serde_json::to_vec(v)?)?;
        }
        if let Some(p) = &self.settings.append_system_prompt {
            private(SYSTEM_PROMPT_FILE, p.as_bytes())?;
        }
        if let (Auth::Subscription(credentials), true) = (self.auth, self.rehearsal.is_none()) {
            let target = config.join(".credentials.json");
            std::fs::copy(credentials, &target)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
        }
        Ok(())
    }
}

/// What the worker reported about its work.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
    /// As the CLI computes it from its price table (for a resumed session: this process only).
    pub cost_usd: f64,
    pub turns: u32,
    pub session_id: String,
    pub duration_ms: u64,
    /// Tool calls the CLI denied (its permission rules).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub denials: u32,
    /// The attempt ended without its result (timed out, cancelled, killed): the figures are what
    /// the CLI had spent by then (its session's `cost-state`), else the tokens streamed so far.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
    /// The model that did most of the work (most output tokens), as the result names it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Usage {
    /// Both usages together (an attempt's worker and its merge's resolving agents).
    pub fn plus(a: Option<Usage>, b: Option<&Usage>) -> Option<Usage> {
        match (a, b) {
            (None, None) => None,
            (Some(a), None) => Some(a),
            (None, Some(b)) => Some(b.clone()),
            (Some(mut a), Some(b)) => {
                a.input_tokens += b.input_tokens;
                a.output_tokens += b.output_tokens;
                a.cache_read_input_tokens += b.cache_read_input_tokens;
                a.cache_creation_input_tokens += b.cache_creation_input_tokens;
                a.cost_usd += b.cost_usd;
                a.turns += b.turns;
                a.denials += b.denials;
                a.partial |= b.partial;
                a.duration_ms += b.duration_ms;
                if a.model.is_empty() {
                    a.model = b.model.clone();
                }
                Some(a)
            }
        }
    }

    pub fn tokens(&self) -> u64 {
        self.input_tokens
            + self.output_tokens
            + self.cache_read_input_tokens
            + self.cache_creation_input_tokens
    }
}

/// A step worth reporting while the worker runs.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// A new model response began (1 for the first).
    Turn(u32),
    Tool {
        name: String,
        detail: String,
    },
    Denied {
        tool: String,
        reason: String,
    },
    ApiRetry {
        attempt: u64,
        status: String,
        error: String,
        /// How long the CLI waits before it asks again (a `retry-after` it was given, or its
        /// own backoff).
        delay_ms: Option<u64>,
    },
    /// What the attempt's responses have cost so far, in US dollars, priced as they stream
    /// ([`prices`]): the tokens each response reported, and for its output, at least a token
    /// per four characters of what it said (the stream reports output tokens only as the
    /// response starts).
    Cost(f64),
}

/// The stream-json of one worker, read as it arrives.
#[derive(Default)]
pub struct Transcript {
    pub session: Option<String>,
    messages: HashSet<String>,
    /// The last `result` line.
    pub result: Option<Value>,
    /// The worker's directory: tool paths are shown relative to it.
    pub cwd: Option<String>,
    /// Tool calls denied so far (`system/permission_denied` events).
    pub denials: u32,
    /// Tokens each model response reported as it streamed, by message id: `[input, output,
    /// cache read, cache creation]`. What an attempt cut short had used.
    streamed: std::collections::HashMap<String, [u64; 4]>,
    /// Lines too long to be read (`exec::lines::MAX_LINE`), each replaced by a notice.
    overlong: u32,
    /// Each response's model and the characters of its content so far, by message id: what its
    /// live price is made of.
    priced: std::collections::HashMap<String, (String, u64)>,
    /// The last live cost said ([`Progress::Cost`]).
    live_cost: f64,
    /// The clusterfile's `[prices]`, over the built-in table.
    pub prices: std::sync::Arc<prices::Overrides>,
}

/// The last `cost-state` entry of a session's transcript (`<config>/projects/*/<session>.jsonl`):
/// what the CLI had spent, by its own price table.
fn cost_state(config_dir: &std::path::Path, session: &str) -> Option<Usage> {
    use std::io::BufRead;
    let file = format!("{session}.jsonl");
    let projects = std::fs::read_dir(config_dir.join("projects")).ok()?;
    let path = projects
        .flatten()
        .map(|p| p.path().join(&file))
        .find(|p| p.is_file())?;
    let reader = std::io::BufReader::new(std::fs::File::open(path).ok()?);
    let mut last: Option<Value> = None;
    for line in reader.lines().map_while(Result::ok) {
        if line.contains("\"cost-state\"") {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["type"] == "cost-state" {
                    last = Some(v);
                }
            }
        }
    }
    let v = last?;
    let mut u = Usage {
        cost_usd: v["totalCostUSD"].as_f64().unwrap_or(0.0),
        ..Usage::default()
    };
    for m in v["modelUsage"].as_object()?.values() {
        u.input_tokens += m["inputTokens"].as_u64().unwrap_or(0);
        u.output_tokens += m["outputTokens"].as_u64().unwrap_or(0);
        u.cache_read_input_tokens += m["cacheReadInputTokens"].as_u64().unwrap_or(0);
        u.cache_creation_input_tokens += m["cacheCreationInputTokens"].as_u64().unwrap_or(0);
    }
    Some(u)
}

/// A short description of a tool call: the path or command it acts on.
fn tool_detail(name: &str, input: &Value, cwd: Option<&str>) -> String {
    let mut text = match name {
        "Bash" => input["command"].as_str().unwrap_or_default().to_string(),
        _ => input["file_path"]
            .as_str()
            .or_else(|| input["pattern"].as_str())
            .or_else(|| input["path"].as_str())
            .unwrap_or_default()
            .to_string(),
    };
    if let Some(cwd) = cwd {
        text = text.replace(&format!("{cwd}/"), "");
    }
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > 80 {
        format!("{}…", line.chars().take(80).collect::<String>())
    } else {
        line.to_string()
    }
}

impl Transcript {
    /// The responses so far, priced: their reported tokens, with at least a token of output per
    /// four characters said.
    pub fn cost_so_far(&self) -> f64 {
        self.priced
            .iter()
            .map(|(id, (model, chars))| {
                let [input, output, read, write] =
                    self.streamed.get(id).copied().unwrap_or_default();
                prices::cost(
                    &self.prices,
                    model,
                    [input, output.max(chars / 4), read, write],
                )
            })
            .sum()
    }

    /// A transcript of a worker running in `cwd`.
    pub fn in_dir(cwd: String) -> Transcript {
        Transcript {
            cwd: Some(cwd),
            ..Transcript::default()
        }
    }

    pub fn feed(&mut self, line: &str) -> Vec<Progress> {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return Vec::new();
        };
        if let Some(s) = v["session_id"].as_str() {
            self.session.get_or_insert_with(|| s.to_string());
        }
        let mut out = Vec::new();
        match (v["type"].as_str(), v["subtype"].as_str()) {
            (Some("ccluster_overlong_line"), _) => self.overlong += 1,
            (Some("assistant"), _) => {
                let message = &v["message"];
                if let Some(id) = message["id"].as_str() {
                    if message["model"] != "<synthetic>" && self.messages.insert(id.to_string()) {
                        out.push(Progress::Turn(self.messages.len() as u32));
                    }
                    let u = &message["usage"];
                    if u.is_object() {
                        let n = |k: &str| u[k].as_u64().unwrap_or(0);
                        // Every block of one response repeats its usage: keep the largest.
                        let e = self.streamed.entry(id.to_string()).or_default();
                        for (slot, key) in e.iter_mut().zip([
                            "input_tokens",
                            "output_tokens",
                            "cache_read_input_tokens",
                            "cache_creation_input_tokens",
                        ]) {
                            *slot = (*slot).max(n(key));
                        }
                    }
                }
                if let Some(id) = message["id"].as_str() {
                    if message["model"] != "<synthetic>" {
                        let chars: u64 = message["content"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|b| {
                                b["text"]
                                    .as_str()
                                    .map_or_else(|| b["input"].to_string().len(), str::len)
                                    as u64
                            })
                            .sum();
                        let entry = self.priced.entry(id.to_string()).or_insert_with(|| {
                            (message["model"].as_str().unwrap_or("").to_string(), 0)
                        });
                        entry.1 += chars;
                        let cost = self.cost_so_far();
                        if cost > self.live_cost {
                            self.live_cost = cost;
                            out.push(Progress::Cost(cost));
                        }
                    }
                }
                for block in message["content"].as_array().into_iter().flatten() {
                    if block["type"] == "tool_use" {
                        let name = block["name"].as_str().unwrap_or_default().to_string();
                        let detail = tool_detail(&name, &block["input"], self.cwd.as_deref());
                        out.push(Progress::Tool { detail, name });
                    }
                }
            }
            (Some("system"), Some("permission_denied")) => {
                self.denials += 1;
                out.push(Progress::Denied {
                    tool: v["tool_name"].as_str().unwrap_or_default().to_string(),
                    reason: v["decision_reason"]
                        .as_str()
                        .or_else(|| v["message"].as_str())
                        .unwrap_or_default()
                        .to_string(),
                })
            }
            (Some("system"), Some("api_retry")) => out.push(Progress::ApiRetry {
                attempt: v["attempt"].as_u64().unwrap_or(0),
                status: match &v["error_status"] {
                    Value::Null => "no answer".into(),
                    s => s.to_string(),
                },
                error: v["error"].as_str().unwrap_or_default().to_string(),
                delay_ms: v["retry_delay_ms"].as_u64(),
            }),
            (Some("result"), _) => self.result = Some(v),
            _ => {}
        }
        out
    }

    /// What the attempt used: its result's figures when it reported one; else, for an attempt cut
    /// short, the CLI's last `cost-state` in its session transcript under `config_dir` (written as
    /// it exits on SIGTERM), else the tokens streamed so far at no known cost.
    pub fn usage_so_far(&self, config_dir: Option<&std::path::Path>) -> Option<Usage> {
        if self.result.is_some() {
            return self.usage();
        }
        let session = self.session.clone()?;
        let mut u = config_dir
            .and_then(|dir| cost_state(dir, &session))
            .unwrap_or_else(|| {
                let sum = |i: usize| self.streamed.values().map(|v| v[i]).sum::<u64>();
                Usage {
                    input_tokens: sum(0),
                    output_tokens: sum(1),
                    cache_read_input_tokens: sum(2),
                    cache_creation_input_tokens: sum(3),
                    ..Usage::default()
                }
            });
        u.session_id = session;
        u.turns = self.messages.len() as u32;
        if u.model.is_empty() {
            u.model = self
                .priced
                .values()
                .map(|(model, _)| model.clone())
                .find(|m| !m.is_empty())
                .unwrap_or_default();
        }
        u.denials = self.denials;
        u.partial = true;
        Some(u)
    }

    /// Usage as the last result reports it (tokens and cost summed over models).
    pub fn usage(&self) -> Option<Usage> {
        let r = self.result.as_ref()?;
        let listed = r["permission_denials"].as_array().map_or(0, Vec::len) as u32;
        let mut u = Usage {
            denials: self.denials.max(listed),
            cost_usd: r["total_cost_usd"].as_f64().unwrap_or(0.0),
            turns: r["num_turns"].as_u64().unwrap_or(0) as u32,
            session_id: r["session_id"]
                .as_str()
                .map(str::to_string)
                .or_else(|| self.session.clone())
                .unwrap_or_default(),
            duration_ms: r["duration_ms"].as_u64().unwrap_or(0),
            ..Usage::default()
        };
        if let Some(models) = r["modelUsage"].as_object() {
            u.model = models
                .iter()
                .max_by_key(|(_, m)| m["outputTokens"].as_u64().unwrap_or(0))
                .map(|(name, _)| name.clone())
                .unwrap_or_default();
            for m in models.values() {
                u.input_tokens += m["inputTokens"].as_u64().unwrap_or(0);
                u.output_tokens += m["outputTokens"].as_u64().unwrap_or(0);
                u.cache_read_input_tokens += m["cacheReadInputTokens"].as_u64().unwrap_or(0);
                u.cache_creation_input_tokens +=
                    m["cacheCreationInputTokens"].as_u64().unwrap_or(0);
            }
        } else {
            let usage = &r["usage"];
            u.input_tokens = usage["input_tokens"].as_u64().unwrap_or(0);
            u.output_tokens = usage["output_tokens"].as_u64().unwrap_or(0);
            u.cache_read_input_tokens = usage["cache_read_input_tokens"].as_u64().unwrap_or(0);
            u.cache_creation_input_tokens =
                usage["cache_creation_input_tokens"].as_u64().unwrap_or(0);
        }
        Some(u)
    }

    /// The attempt's output, or why it failed. Success needs a result with `is_error == false`
    /// and, when a schema was asked for, a `structured_output`, which becomes the output;
    /// otherwise the result text is the output.
    pub fn outcome(
        &self,
        end: &ProcessEnd,
        wants_structured: bool,
    ) -> Result<Value, (FailureClass, String)> {
        let Some(r) = &self.result else {
            return Err(match end {
                ProcessEnd::Exited(143) | ProcessEnd::Signaled(_) => (
                    FailureClass::Killed,
                    format!("the worker was killed ({})", end),
                ),
                _ if self.overlong > 0 => (
                    FailureClass::NoResult,
                    format!(
                        "the worker ended without a result that could be read ({end}): {} \
                         stream-json line(s) longer than {} MiB were not read (the log has them)",
                        self.overlong,
                        crate::exec::lines::MAX_LINE >> 20
                    ),
                ),
                _ => (
                    FailureClass::NoResult,
                    format!("the worker ended without a result ({})", end),
                ),
            });
        };
        let text = r["result"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                r["errors"].as_array().map(|e| {
                    e.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join("; ")
                })
            })
            .unwrap_or_default();
        match r["subtype"].as_str() {
            Some("error_max_turns") => return Err((FailureClass::MaxTurns, text)),
            Some("error_max_budget_usd") => return Err((FailureClass::Budget, text)),
            Some("error_max_structured_output_retries") => {
                return Err((FailureClass::StructuredOutput, text))
            }
            Some("error_during_execution") => return Err((FailureClass::Killed, text)),
            _ => {}
        }
        if r["is_error"].as_bool().unwrap_or(true) {
            let status = r["api_error_status"].as_u64();
            let class = match status {
                Some(429) => FailureClass::RateLimit,
                Some(529) => FailureClass::Overloaded,
                Some(401) | Some(403) => FailureClass::Auth,
                _ if text.contains("Not logged in") || text.contains("Failed to authenticate") => {
                    FailureClass::Auth
                }
                _ if text.contains("529") || text.contains("Overloaded") => {
                    FailureClass::Overloaded
                }
                _ => FailureClass::ApiError,
            };
            return Err((class, text));
        }
        if wants_structured {
            return match r.get("structured_output") {
                Some(v) if !v.is_null() => Ok(v.clone()),
                _ => Err((
                    FailureClass::StructuredOutput,
                    "the agent finished without the structured output its `output_schema` asks for"
                        .into(),
                )),
            };
        }
        Ok(Value::String(text))
    }
}

/// A new session id (a random UUID v4, as `--session-id` requires).
pub fn new_session_id() -> String {
    let mut b = [0u8; 16];
    for x in &mut b {
        *x = fastrand::u8(..);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript(lines: &[&str]) -> Transcript {
        let mut t = Transcript::default();
        for l in lines {
            t.feed(l);
        }
        t
    }

    #[test]
    fn a_result_line_too_long_to_read_is_named_as_the_reason() {
        let notice = crate::exec::lines::overlong_notice(20 << 20);
        let (class, message) = transcript(&[&notice])
            .outcome(&ProcessEnd::Exited(0), false)
            .unwrap_err();
        assert_eq!(class, FailureClass::NoResult);
        assert!(
            message.contains("1 stream-json line(s) longer than 16 MiB"),
            "{message}"
        );
    }

    #[test]
    fn results_are_classified_as_documented() {
        let end = ProcessEnd::Exited(1);
        let class = |line: &str| transcript(&[line]).outcome(&end, false).map_err(|(c, _)| c);
        assert_eq!(
            class(
                r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":429,"result":"API Error: Request rejected (429)"}"#
            ),
            Err(FailureClass::RateLimit)
        );
        assert_eq!(
            class(
                r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":529,"result":"x"}"#
            ),
            Err(FailureClass::Overloaded)
        );
        assert_eq!(
            class(
                r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":null,"result":"Request timed out."}"#
            ),
            Err(FailureClass::ApiError)
        );
        assert_eq!(
            class(
                r#"{"type":"result","subtype":"success","is_error":true,"api_error_status":401,"result":"Failed to authenticate."}"#
            ),
            Err(FailureClass::Auth)
        );
        assert_eq!(
            class(
                r#"{"type":"result","subtype":"error_max_turns","is_error":true,"errors":["Reached maximum number of turns (3)"]}"#
            ),
            Err(FailureClass::MaxTurns)
        );
        assert_eq!(
            class(r#"{"type":"result","subtype":"error_max_budget_usd","is_error":true}"#),
            Err(FailureClass::Budget)
        );
        assert_eq!(
            class(r#"{"type":"result","subtype":"success","is_error":false,"result":"ok"}"#),
            Ok(Value::String("ok".into()))
        );
        let t = transcript(&[
            r#"{"type":"result","subtype":"success","is_error":false,"result":"ok"}"#,
        ]);
        assert_eq!(
            t.outcome(&end, true).map_err(|(c, _)| c),
            Err(FailureClass::StructuredOutput)
        );
        assert_eq!(
            Transcript::default()
                .outcome(&ProcessEnd::Exited(143), false)
                .map_err(|(c, _)| c),
            Err(FailureClass::Killed)
        );
        assert_eq!(
            Transcript::default()
                .outcome(&ProcessEnd::Exited(0), false)
                .map_err(|(c, _)| c),
            Err(FailureClass::NoResult)
        );
    }

    #[test]
    fn a_rehearsed_worker_gets_the_servers_token_and_no_other_credentials() {
        let settings = AgentSettings {
            model: None,
            permission_mode: "acceptEdits",
            allowed_tools: Vec::new(),
            disallowed_tools: Vec::new(),
            max_turns: None,
            max_budget_usd: None,
            append_system_prompt: None,
            settings: None,
            bin: None,
        };
        let retry = crate::model::workflow::RetryPolicy::default();
        let worker = Worker {
            bin: Path::new("claude"),
            prompt: "p",
            settings: &settings,
            output_schema: None,
            session: "s",
            resume: None,
            resume_prompt: None,
            dir: Path::new("/tmp/w"),
            timeout: None,
            retry: &retry,
            auth: &Auth::Rehearsal,
            rehearsal: Some(Rehearsal {
                url: "http://127.0.0.1:9",
                token: "0123abcd",
                node: "build[2]",
            }),
        };
        let env = worker.env();
        let get = |name: &str| {
            env.iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(get("ANTHROPIC_API_KEY"), ["0123abcd"]);
        assert_eq!(get("ANTHROPIC_BASE_URL"), ["http://127.0.0.1:9"]);
        assert_eq!(
            get("ANTHROPIC_CUSTOM_HEADERS"),
            ["X-Ccluster-Task: build[2]"]
        );
        for other in AUTH_VARS.iter().filter(|v| {
            !matches!(
                **v,
                "ANTHROPIC_API_KEY" | "ANTHROPIC_BASE_URL" | "ANTHROPIC_CUSTOM_HEADERS"
            )
        }) {
            assert!(get(other).is_empty(), "{other}");
        }
    }

    #[test]
    fn session_ids_are_uuid_v4() {
        let id = new_session_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert_ne!(id, new_session_id());
    }
}
