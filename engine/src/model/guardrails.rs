//! Guardrails as the compiler applies them: the clusterfile's `[policy]` and an operator's policy
//! laid over it (`--policy FILE`, `ccluster serve --policy`), the stricter winning, become each
//! task's effective limits; a task that asks for more than a policy allows is an error at its
//! key, pointing at the policy's key too.

use std::path::Path;
use std::sync::Arc;

use super::raw::{NetworkMode, PermissionMode, RawClaude, RawClusterfile, RawPolicy};
use super::spanned::Spanned;
use super::workflow::{Action, AgentSettings, Workflow};
use crate::diagnostic::{Category, Diagnostic, SourceFile, Span};
use crate::policy::ChangePolicy;

/// What every agent is denied when the clusterfile's `[policy]` does not say `denied_tools`:
/// ccluster publishes results (`ccluster publish`); an agent pushing on its own would bypass the
/// checks a change passes before it is published.
pub const DEFAULT_DENIED_TOOLS: &[&str] = &["Bash(git push:*)"];

/// The most permissive mode a task may ask for when no policy says `max_permission_mode`:
/// everything but `bypassPermissions`, which also lets an agent act outside its worktree.
pub const DEFAULT_MAX_PERMISSION_MODE: PermissionMode = PermissionMode::Auto;

/// A policy given from outside the clusterfile: by whoever runs it (`--policy FILE`) or serves it
/// (`ccluster serve --policy FILE`). A file holding one `[policy]` table, in the clusterfile's
/// syntax. Its unset keys say nothing (they loosen nothing the clusterfile sets).
#[derive(Clone, Debug)]
pub struct OperatorPolicy {
    pub source: SourceFile,
    pub raw: RawPolicy,
}

impl OperatorPolicy {
    /// Reads a policy file (TOML, or KDL by its extension). Problems in it are diagnostics in
    /// that file.
    pub fn read(path: &Path) -> std::io::Result<Result<Arc<OperatorPolicy>, Vec<Diagnostic>>> {
        let text = std::fs::read_to_string(path)?;
        let source = SourceFile::new(path.display().to_string(), text);
        Ok(Self::parse(source, crate::syntax::Format::from_path(path)).map(Arc::new))
    }

    pub fn parse(
        source: SourceFile,
        format: crate::syntax::Format,
    ) -> Result<OperatorPolicy, Vec<Diagnostic>> {
        let (tree, syntax_errors) = crate::syntax::parse(&source.text, format);
        let here = |d: Vec<Diagnostic>| d.into_iter().map(|d| d.in_file(&source)).collect();
        let tree = match tree {
            Some(tree) if syntax_errors.is_empty() => tree,
            _ => return Err(here(syntax_errors)),
        };
        let mut diags = Vec::new();
        let raw = super::decode::decode_policy_file(&tree, &mut diags);
        // Globs are checked as the clusterfile's are.
        let _ = change_policy_of(Some(&raw), &mut diags);
        if diags.iter().any(Diagnostic::is_error) {
            return Err(here(diags));
        }
        Ok(OperatorPolicy { source, raw })
    }
}

/// One policy the tasks must keep to, and where it is written.
struct Layer<'a> {
    raw: &'a RawPolicy,
    /// `None`: the clusterfile.
    file: Option<&'a SourceFile>,
}

impl Layer<'_> {
    fn ceiling_of_mode(&self) -> Option<(PermissionMode, Option<Span>)> {
        match (&self.raw.max_permission_mode, self.file) {
            (Some(m), _) => Some((m.value, Some(m.span))),
            (None, None) => Some((DEFAULT_MAX_PERMISSION_MODE, None)),
            (None, Some(_)) => None,
        }
    }

    fn denied_tools(&self) -> Vec<(String, Option<Span>)> {
        match (&self.raw.denied_tools, self.file) {
            (Some(list), _) => list
                .value
                .iter()
                .map(|t| (t.value.clone(), Some(t.span)))
                .collect(),
            (None, None) => DEFAULT_DENIED_TOOLS
                .iter()
                .map(|t| (t.to_string(), None))
                .collect(),
            (None, Some(_)) => Vec::new(),
        }
    }

    /// Says where the policy's `key` is: a note when it is in the file the diagnostic points
    /// into, else words in the help.
    fn cite(
        &self,
        d: Diagnostic,
        span: Option<Span>,
        key_text: &str,
        same_file: bool,
        fix: &str,
    ) -> Diagnostic {
        match (self.file, span) {
            (None, Some(span)) if same_file => d
                .note(span, format!("the policy says `{key_text}`"))
                .help(fix.to_string()),
            (None, Some(_)) => d.help(format!(
                "the clusterfile's `[policy]` says `{key_text}`; {fix}"
            )),
            (None, None) => d.help(format!(
                "the built-in policy says `{key_text}` (set it in `[policy]` to change it); {fix}"
            )),
            (Some(file), span) => {
                let at = span.map_or(String::new(), |s| {
                    let (line, col) = file.line_col(s.start);
                    format!(":{line}:{col}")
                });
                d.help(format!(
                    "the operator's policy ({}{at}) says `{key_text}`; {fix}",
                    file.name
                ))
            }
        }
    }
}

/// The key a task's agent setting was taken from: the task's own `claude` table, or `[defaults]`.
struct Asked<'a, T> {
    value: &'a T,
    span: Span,
    /// Written in another file than the clusterfile (a template's task).
    elsewhere: Option<&'a SourceFile>,
    /// Inherited from `[defaults.claude]`, not the task's own.
    inherited: bool,
}

impl<T> Asked<'_, T> {
    /// Who asks: the task, or `[defaults.claude]` for every task that inherits it.
    fn who(&self, task: &str) -> String {
        if self.inherited {
            "`[defaults.claude]`".to_string()
        } else {
            task.to_string()
        }
    }
}

fn asked<'a, T>(
    task: Option<&'a RawClaude>,
    task_file: Option<&'a SourceFile>,
    defaults: Option<&'a RawClaude>,
    f: impl Fn(&'a RawClaude) -> Option<&'a Spanned<T>>,
) -> Option<Asked<'a, T>> {
    if let Some(s) = task.and_then(&f) {
        return Some(Asked {
            value: &s.value,
            span: s.span,
            elsewhere: task_file,
            inherited: false,
        });
    }
    defaults.and_then(&f).map(|s| Asked {
        value: &s.value,
        span: s.span,
        elsewhere: None,
        inherited: true,
    })
}

fn over(code: &'static str, message: String) -> Diagnostic {
    Diagnostic::error(Category::InvalidValue, code, message)
}

fn place<T>(d: Diagnostic, a: &Asked<'_, T>, label: String) -> Diagnostic {
    let d = d.at(a.span, label);
    match a.elsewhere {
        Some(file) => d.in_file(file),
        None => d,
    }
}

/// Whether the rule `allowed` (a tool name, or a tool with a pattern) covers the rule `rule`.
fn covers(allowed: &str, rule: &str) -> bool {
    allowed == rule
        || rule
            .split_once('(')
            .is_some_and(|(tool, _)| tool == allowed)
}

/// Checks one agent's settings against the policies and lays the policies' limits over them.
fn guard_agent(
    settings: &mut AgentSettings,
    who: &str,
    task: Option<&RawClaude>,
    task_file: Option<&SourceFile>,
    defaults: Option<&RawClaude>,
    layers: &[Layer<'_>],
    diags: &mut Vec<Diagnostic>,
) {
    for layer in layers {
        // The permission mode.
        if let Some((ceiling, ceiling_span)) = layer.ceiling_of_mode() {
            let mode = PermissionMode::from_name(settings.permission_mode)
                .unwrap_or(PermissionMode::AcceptEdits);
            if mode.permissiveness() > ceiling.permissiveness() {
                match asked(task, task_file, defaults, |c| c.permission_mode.as_ref()) {
                    Some(a) => {
                        let d = place(
                            over(
                                "policy-permission-mode",
                                format!(
                                    "{} asks for `permission_mode = \"{}\"`, more than the policy allows",
                                    a.who(who),
                                    mode.name()
                                ),
                            ),
                            &a,
                            format!("at most `{}` is allowed", ceiling.name()),
                        );
                        diags.push(layer.cite(
                            d,
                            ceiling_span,
                            &format!("max_permission_mode = \"{}\"", ceiling.name()),
                            a.elsewhere.is_none(),
                            "ask for a narrower mode (and list the tools it needs in `allowed_tools`), or widen the policy",
                        ));
                    }
                    // The built-in mode is above the ceiling: the ceiling is the mode.
                    None => settings.permission_mode = ceiling.name(),
                }
            }
        }
        // Turns and the task's budget.
        if let Some(max) = &layer.raw.max_turns {
            let ceiling = max.value.max(1) as u32;
            match settings.max_turns {
                Some(turns) if turns > ceiling => {
                    if let Some(a) = asked(task, task_file, defaults, |c| c.max_turns.as_ref()) {
                        let d = place(
                            over(
                                "policy-max-turns",
                                format!(
                                    "{} asks for {turns} turns, more than the policy allows",
                                    a.who(who)
                                ),
                            ),
                            &a,
                            format!("at most {ceiling}"),
                        );
                        diags.push(layer.cite(
                            d,
                            Some(max.span),
                            &format!("max_turns = {ceiling}"),
                            a.elsewhere.is_none(),
                            "lower `max_turns`, or raise the policy's",
                        ));
                    }
                }
                Some(_) => {}
                None => settings.max_turns = Some(ceiling),
            }
        }
        if let Some(max) = &layer.raw.max_budget_usd {
            match settings.max_budget_usd {
                Some(usd) if usd > max.value => {
                    if let Some(a) = asked(task, task_file, defaults, |c| c.max_budget_usd.as_ref())
                    {
                        let d = place(
                            over(
                                "policy-max-budget",
                                format!(
                                    "{} asks for a budget of ${usd}, more than the policy allows",
                                    a.who(who)
                                ),
                            ),
                            &a,
                            format!("at most ${}", max.value),
                        );
                        diags.push(layer.cite(
                            d,
                            Some(max.span),
                            &format!("max_budget_usd = {}", max.value),
                            a.elsewhere.is_none(),
                            "lower `max_budget_usd`, or raise the policy's",
                        ));
                    }
                }
                Some(_) => {}
                None => settings.max_budget_usd = Some(max.value),
            }
        }
        // Tools: what a task allows must be within what the policy allows, and never what it
        // denies; what it denies every agent is denied.
        let denied = layer.denied_tools();
        let allowed_keys = asked(task, task_file, defaults, |c| c.allowed_tools.as_ref());
        if let Some(a) = &allowed_keys {
            for rule in a.value.iter() {
                let one = Asked {
                    value: &rule.value,
                    span: rule.span,
                    elsewhere: a.elsewhere,
                    inherited: a.inherited,
                };
                if let Some((d_rule, d_span)) = denied.iter().find(|(d, _)| covers(d, &rule.value))
                {
                    let d = place(
                        over(
                            "policy-denied-tool",
                            format!(
                                "{} allows `{}`, which the policy denies",
                                one.who(who),
                                rule.value
                            ),
                        ),
                        &one,
                        "denied by the policy".to_string(),
                    );
                    diags.push(layer.cite(
                        d,
                        *d_span,
                        &format!("denied_tools = [\"{d_rule}\", ...]"),
                        a.elsewhere.is_none(),
                        "remove it from `allowed_tools`, or from the policy's `denied_tools`",
                    ));
                    continue;
                }
                if let Some(list) = &layer.raw.allowed_tools {
                    if !list.value.iter().any(|p| covers(&p.value, &rule.value)) {
                        let d = place(
                            over(
                                "policy-tool-not-allowed",
                                format!(
                                    "{} allows `{}`, which the policy does not allow",
                                    one.who(who),
                                    rule.value
                                ),
                            ),
                            &one,
                            "not in the policy's `allowed_tools`".to_string(),
                        );
                        let names: Vec<&str> =
                            list.value.iter().map(|t| t.value.as_str()).collect();
                        diags.push(layer.cite(
                            d,
                            Some(list.span),
                            &format!("allowed_tools = {names:?}"),
                            a.elsewhere.is_none(),
                            "allow only tools the policy lists, or add this one to it",
                        ));
                    }
                }
            }
        }
        for (rule, _) in denied {
            if !settings.disallowed_tools.contains(&rule) {
                settings.disallowed_tools.push(rule);
            }
        }
    }
}

/// The layers in force: the clusterfile's `[policy]` (built-in defaults where it is silent),
/// then the operator's.
fn layers<'a>(
    raw: &'a RawClusterfile,
    operator: Option<&'a OperatorPolicy>,
    none: &'a RawPolicy,
) -> Vec<Layer<'a>> {
    let mut out = vec![Layer {
        raw: raw.policy.as_ref().unwrap_or(none),
        file: None,
    }];
    if let Some(op) = operator {
        out.push(Layer {
            raw: &op.raw,
            file: Some(&op.source),
        });
    }
    out
}

/// Checks the workflow's agents, budget and runners against the policies, and lays the
/// policies' limits over them (run after the tasks are resolved, before workspaces take the
/// change policy).
pub fn apply(
    workflow: &mut Workflow,
    raw: &RawClusterfile,
    operator: Option<&OperatorPolicy>,
    diags: &mut Vec<Diagnostic>,
) {
    let none = RawPolicy::default();
    let layers = layers(raw, operator, &none);
    let defaults = raw.defaults.as_ref().and_then(|d| d.claude.as_ref());
    let found_before = diags.len();
    for task in &mut workflow.tasks {
        let raw_task = raw.tasks.get(task.id.as_str());
        let task_file = raw_task.and_then(|t| t.origin.as_ref()).map(|o| &o.file);
        let who = format!("task `{}`", task.id);
        if let Action::Agent { settings, .. } = &mut task.action {
            guard_agent(
                settings,
                &who,
                raw_task.and_then(|t| t.claude.as_ref()),
                task_file,
                defaults,
                &layers,
                diags,
            );
        }
        // The agents that resolve conflicts (a git merge's, a task graph's) take `[defaults]`.
        let resolvers = match &mut task.action {
            Action::Merge {
                agent: Some(settings),
                ..
            } => vec![settings],
            _ => Vec::new(),
        };
        for settings in resolvers.into_iter().chain(task.conflict_agent.as_mut()) {
            guard_agent(
                settings,
                &format!("the agent resolving {who}'s conflicts"),
                None,
                None,
                defaults,
                &layers,
                diags,
            );
        }
    }
    // A `[defaults.claude]` key over the policy is one error, not one per task inheriting it.
    let mut seen = std::collections::HashSet::new();
    let mut i = found_before;
    while i < diags.len() {
        let d = &diags[i];
        let key = (d.code, d.span, d.file.as_ref().map(|f| f.name.clone()));
        if seen.insert(key) {
            i += 1;
        } else {
            diags.remove(i);
        }
    }
    // The run's budget.
    for layer in &layers {
        let Some(max) = &layer.raw.max_run_usd else {
            continue;
        };
        match workflow.max_run_usd {
            Some(usd) if usd > max.value => {
                if let Some(asked) = raw.defaults.as_ref().and_then(|d| d.max_run_usd.as_ref()) {
                    let d = over(
                        "policy-max-run-budget",
                        format!("the run's budget of ${usd} is more than the policy allows"),
                    )
                    .at(asked.span, format!("at most ${}", max.value));
                    diags.push(layer.cite(
                        d,
                        Some(max.span),
                        &format!("max_run_usd = {}", max.value),
                        true,
                        "lower `max_run_usd`, or raise the policy's",
                    ));
                }
            }
            Some(_) => {}
            None => workflow.max_run_usd = Some(max.value),
        }
    }
    // Runners' networks.
    for (name, runner) in &mut workflow.runners {
        let network = match (&mut runner.docker, &mut runner.kubernetes) {
            (Some(d), _) => &mut d.network,
            (None, Some(k)) => &mut k.network,
            (None, None) => continue,
        };
        for layer in &layers {
            let Some(max) = &layer.raw.network else {
                continue;
            };
            match network {
                Some(n) if n.reach() > max.value.reach() => {
                    if let Some(asked) = raw.runners.get(name).and_then(|r| r.network.as_ref()) {
                        let d = over(
                            "policy-network",
                            format!(
                                "runner `{name}` opens `network = \"{}\"`, more than the policy allows",
                                n.name()
                            ),
                        )
                        .at(asked.span, format!("at most `{}`", max.value.name()));
                        diags.push(layer.cite(
                            d,
                            Some(max.span),
                            &format!("network = \"{}\"", max.value.name()),
                            true,
                            "narrow the runner's network (widen `api-only` with `allow_hosts`), or widen the policy",
                        ));
                    }
                }
                Some(_) => {}
                // The runner's defaults by kind (agents `api-only`, shell tasks `bridge`) are
                // narrowed to the ceiling; a ceiling of `bridge` narrows nothing.
                None if max.value != NetworkMode::Bridge => *network = Some(max.value),
                None => {}
            }
        }
    }
}

/// The change policy in force: the clusterfile's, and the operator's over it.
pub fn change_policy(
    raw: &RawClusterfile,
    operator: Option<&OperatorPolicy>,
    diags: &mut Vec<Diagnostic>,
) -> ChangePolicy {
    let mut policy = change_policy_of(raw.policy.as_ref(), diags);
    if let Some(op) = operator {
        // Its globs were checked when it was read.
        let theirs = change_policy_of(Some(&op.raw), &mut Vec::new());
        policy.tighten(theirs);
    }
    policy
}

/// One `[policy]` as the checks take it; a glob that is not one is an error at its place.
fn change_policy_of(raw: Option<&RawPolicy>, diags: &mut Vec<Diagnostic>) -> ChangePolicy {
    let Some(raw) = raw else {
        return ChangePolicy {
            forbid_credentials: true,
            ..Default::default()
        };
    };
    let mut globs = |list: &Option<Spanned<Vec<Spanned<String>>>>, key: &str| -> Vec<String> {
        let mut out = Vec::new();
        for g in list.iter().flat_map(|l| l.value.iter()) {
            match glob::Pattern::new(&g.value) {
                Ok(_) if !g.value.is_empty() => out.push(g.value.clone()),
                result => diags.push(
                    Diagnostic::error(
                        Category::InvalidValue,
                        "invalid-glob",
                        format!(
                            "`{key}` entry `{}` is not a glob{}",
                            g.value,
                            result.err().map(|e| format!(" ({e})")).unwrap_or_default()
                        ),
                    )
                    .at(g.span, "not a glob")
                    .help("paths are globs relative to the repository, like `src/**` or `**/.env`"),
                ),
            }
        }
        out
    };
    let allowed = globs(&raw.allowed_paths, "allowed_paths");
    ChangePolicy {
        allowed_paths: if raw.allowed_paths.is_some() {
            vec![allowed]
        } else {
            Vec::new()
        },
        denied_paths: globs(&raw.denied_paths, "denied_paths"),
        max_files_changed: raw
            .max_files_changed
            .as_ref()
            .map(|m| m.value.max(1) as u64),
        max_lines_changed: raw
            .max_lines_changed
            .as_ref()
            .map(|m| m.value.max(1) as u64),
        forbid_credentials: raw.forbid_credentials.as_ref().is_none_or(|f| f.value),
    }
}

/// `[prices]`, checked: what budgets price running agents' responses at. `input` and `output`
/// are required; the cache prices default to the ratios every Claude model has (a read a tenth of
/// `input`, a write 1.25 times).
pub fn prices(
    raw: &RawClusterfile,
    diags: &mut Vec<Diagnostic>,
) -> crate::agent::prices::Overrides {
    let mut out = crate::agent::prices::Overrides::new();
    for (model, p) in &raw.prices {
        let (Some(input), Some(output)) = (&p.input, &p.output) else {
            let missing = if p.input.is_none() { "input" } else { "output" };
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "missing-key",
                    format!("the price of `{model}` has no `{missing}`"),
                )
                .at(p.name_span, format!("`{missing}` is required"))
                .help("prices are US dollars per million tokens: `{ input = 3, output = 15 }`"),
            );
            continue;
        };
        out.insert(
            model.clone(),
            crate::agent::prices::Price {
                input: input.value,
                output: output.value,
                cache_read: p
                    .cache_read
                    .as_ref()
                    .map_or(input.value / 10.0, |c| c.value),
                cache_write: p
                    .cache_write
                    .as_ref()
                    .map_or(input.value * 1.25, |c| c.value),
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tool_name_covers_its_rules() {
        assert!(covers("Bash", "Bash"));
        assert!(covers("Bash", "Bash(cargo *)"));
        assert!(covers("Bash(cargo *)", "Bash(cargo *)"));
        assert!(!covers("Bash(cargo *)", "Bash"));
        assert!(!covers("Bash(cargo *)", "Bash(rm *)"));
        assert!(!covers("Edit", "Bash(cargo *)"));
    }

    #[test]
    fn permission_modes_rank_by_what_they_allow() {
        use PermissionMode::*;
        assert!(Plan.permissiveness() < Default.permissiveness());
        assert_eq!(DontAsk.permissiveness(), Manual.permissiveness());
        assert!(AcceptEdits.permissiveness() < Auto.permissiveness());
        assert!(Auto.permissiveness() < BypassPermissions.permissiveness());
    }
}
