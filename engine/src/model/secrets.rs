//! The `[secrets]` table and the tasks' `secrets` lists, checked: names, sources, the secrets a
//! task lists (unknown ones with a "did you mean"), how each is delivered. Values are never read
//! here: a run reads them when it starts (`crate::secrets`).

use std::collections::HashSet;

use indexmap::IndexMap;

use super::raw::{RawClusterfile, RawTask};
use crate::diagnostic::{did_you_mean, Category, Diagnostic, Span};
use crate::secrets::{is_env_name, is_file_name, Delivery, SecretSource, SecretUse};

/// A declared secret, checked.
#[derive(Clone, Debug)]
pub struct SecretDecl {
    pub source: SecretSource,
    pub span: Span,
}

/// Checks `[secrets.<name>]`: a name a variable can have, and a `from` that parses.
pub fn resolve_declarations(
    raw: &RawClusterfile,
    diags: &mut Vec<Diagnostic>,
) -> IndexMap<String, Option<SecretDecl>> {
    let mut out = IndexMap::new();
    for (name, secret) in &raw.secrets {
        if !is_env_name(name) {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-secret-name",
                    format!("invalid secret name `{}`", super::fetch::printable(name)),
                )
                .at(secret.name_span, "not a valid secret name")
                .help("a secret's name is letters, digits and `_`, not starting with a digit: it is the variable a task gets it in"),
            );
        }
        let source = match &secret.from {
            Some(from) => match SecretSource::parse(&from.value) {
                Ok(source) => Some(source),
                Err(problem) => {
                    diags.push(
                        Diagnostic::error(
                            Category::InvalidValue,
                            "invalid-secret-source",
                            format!("invalid `from` of secret `{name}`: {problem}"),
                        )
                        .at(from.span, "not a secret source")
                        .help("write `from = \"env:VAR\"`, `from = \"file:path\"` or `from = \"command:...\"`"),
                    );
                    None
                }
            },
            None => {
                diags.push(
                    Diagnostic::error(
                        Category::InvalidValue,
                        "missing-key",
                        format!("secret `{name}` has no `from`"),
                    )
                    .at(secret.name_span, "where does its value come from?")
                    .help("add `from = \"env:VAR\"`, `from = \"file:path\"` or `from = \"command:...\"`"),
                );
                None
            }
        };
        out.insert(
            name.clone(),
            source.map(|source| SecretDecl {
                source,
                span: secret.name_span,
            }),
        );
    }
    out
}

/// Checks a task's `secrets` against the declarations; `process` says whether the task runs a
/// process of its own (a shell or agent task), the only ones that can be given secrets.
pub fn resolve_uses(
    id: &str,
    rt: &RawTask,
    declared: &IndexMap<String, Option<SecretDecl>>,
    process: bool,
    env_keys: &[&str],
    diags: &mut Vec<Diagnostic>,
) -> Vec<SecretUse> {
    let Some(list) = &rt.secrets else {
        return Vec::new();
    };
    if !process {
        diags.push(
            Diagnostic::error(
                Category::TaskKind,
                "key-not-for-kind",
                format!(
                    "`secrets` applies to shell and agent tasks only, and task `{id}` is not one"
                ),
            )
            .at(list.span, "only for shell and agent tasks")
            .help("remove `secrets`: only a task that runs a process can use a secret"),
        );
        return Vec::new();
    }
    let mut uses = Vec::new();
    let mut names = HashSet::new();
    let mut vars: IndexMap<String, Span> = IndexMap::new();
    for r in &list.value {
        let name = &r.name.value;
        if !declared.contains_key(name) {
            let mut d = Diagnostic::error(
                Category::InvalidValue,
                "unknown-secret",
                format!(
                    "task `{id}` uses the unknown secret `{}`",
                    super::fetch::printable(name)
                ),
            )
            .at(r.name.span, "not declared under `[secrets]`");
            d = match did_you_mean(name, declared.keys().map(String::as_str)) {
                Some(best) => d.help(format!("did you mean `{best}`?")),
                None => d.help(format!(
                    "declare it: `[secrets.{name}]` with `from = \"env:{name}\"`"
                )),
            };
            diags.push(d);
            continue;
        }
        if !names.insert(name.clone()) {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "duplicate-secret",
                    format!("task `{id}` lists secret `{name}` twice"),
                )
                .at(r.name.span, "listed again here")
                .help("list each secret once"),
            );
            continue;
        }
        if let Some(file) = r.file.as_ref().filter(|f| !is_file_name(&f.value)) {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-secret-file",
                    format!("invalid file name `{}` for secret `{name}`", super::fetch::printable(&file.value)),
                )
                .at(file.span, "not a plain file name")
                .help("a secret's file is a name without `/` (`gh-token`): ccluster chooses its directory"),
            );
            continue;
        }
        let var = match (&r.env, &r.file) {
            (Some(env), _) => env.clone(),
            (None, Some(_)) => super::spanned::Spanned::new(format!("{name}_FILE"), r.name.span),
            (None, None) => r.name.clone(),
        };
        if !is_env_name(&var.value) {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "invalid-secret-env",
                    format!(
                        "invalid variable name `{}` for secret `{name}`",
                        super::fetch::printable(&var.value)
                    ),
                )
                .at(var.span, "not a variable name")
                .help("letters, digits and `_`, not starting with a digit"),
            );
            continue;
        }
        if let Some(first) = vars.get(&var.value) {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "duplicate-secret-env",
                    format!(
                        "task `{id}` gets two secrets in the variable `{}`",
                        var.value
                    ),
                )
                .at(var.span, "this one")
                .note(*first, "and this one")
                .help("give one of them another variable with `env = \"...\"`"),
            );
            continue;
        }
        if env_keys.contains(&var.value.as_str()) || var.value.starts_with("CCLUSTER_") {
            diags.push(
                Diagnostic::error(
                    Category::InvalidValue,
                    "duplicate-secret-env",
                    format!(
                        "task `{id}` gets secret `{name}` in `{}`, a variable it already sets",
                        var.value
                    ),
                )
                .at(var.span, "set twice")
                .help("give the secret another variable with `env = \"...\"`"),
            );
            continue;
        }
        vars.insert(var.value.clone(), var.span);
        uses.push(SecretUse {
            name: name.clone(),
            delivery: match &r.file {
                Some(file) => Delivery::File {
                    file: file.value.clone(),
                    env: var.value,
                },
                None => Delivery::Env(var.value),
            },
        });
    }
    uses
}

/// Warns of declared secrets no task uses: they are not read when a run starts.
pub fn check_unused(raw: &RawClusterfile, used: &HashSet<String>, diags: &mut Vec<Diagnostic>) {
    for (name, secret) in &raw.secrets {
        if !used.contains(name) {
            diags.push(
                Diagnostic::warning(
                    Category::InvalidValue,
                    "unused-secret",
                    format!("secret `{name}` is declared but no task uses it"),
                )
                .at(secret.name_span, "never used")
                .help("list it in a task's `secrets`, or remove it"),
            );
        }
    }
}
