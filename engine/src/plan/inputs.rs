//! Input values: `--var name=value` strings typed by their declaration, `--vars` files, defaults.

use std::path::Path;

use indexmap::IndexMap;
use serde_json::Value;

use crate::diagnostic::{did_you_mean, Category, Diagnostic};
use crate::model::raw::InputType;
use crate::model::Workflow;

/// Input values as given on the command line, before they are checked against the declarations.
#[derive(Clone, Debug, Default)]
pub struct InputArgs {
    /// Typed values from `--vars` files, in order (later files win).
    pub values: IndexMap<String, Value>,
    /// `--var name=value` pairs, in order (they win over files).
    pub pairs: Vec<(String, String)>,
    /// A policy laid over the clusterfile's `[policy]` (`--policy FILE`, `serve --policy`): the
    /// stricter wins.
    pub policy: Option<std::sync::Arc<crate::model::guardrails::OperatorPolicy>>,
}

impl InputArgs {
    /// Parses a `name=value` argument.
    pub fn push_pair(&mut self, arg: &str) -> Result<(), String> {
        let (name, value) = arg
            .split_once('=')
            .ok_or_else(|| format!("`--var {arg}` is not `name=value`"))?;
        self.pairs
            .push((name.trim().to_string(), value.to_string()));
        Ok(())
    }

    /// Loads a `--vars` file: a TOML or JSON table (by extension; `.json` is JSON, else TOML).
    pub fn load_file(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
        let table: Value = if path.extension().is_some_and(|e| e == "json") {
            serde_json::from_str(&text)
                .map_err(|e| format!("`{}` is not valid JSON: {e}", path.display()))?
        } else {
            let t: toml::Table = toml::from_str(&text)
                .map_err(|e| format!("`{}` is not valid TOML: {e}", path.display()))?;
            serde_json::to_value(t).map_err(|e| e.to_string())?
        };
        let Value::Object(map) = table else {
            return Err(format!(
                "`{}` must hold a table of input values",
                path.display()
            ));
        };
        self.values.extend(map);
        Ok(())
    }
}

/// Converts a `--var` string to the declared type.
fn typed(ty: InputType, raw: &str) -> Result<Value, String> {
    match ty {
        InputType::String => Ok(Value::String(raw.to_string())),
        InputType::Number => raw
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| {
                raw.trim()
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .ok_or(())
            })
            .map_err(|_| format!("`{raw}` is not a number")),
        InputType::Bool => match raw.trim() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(format!("`{raw}` is not `true` or `false`")),
        },
        InputType::List | InputType::Object => {
            let v: Value =
                serde_json::from_str(raw).map_err(|e| format!("`{raw}` is not JSON: {e}"))?;
            if ty.accepts(&v) {
                Ok(v)
            } else {
                Err(format!("`{raw}` is not a JSON {}", ty.name()))
            }
        }
    }
}

/// Resolves the value of every input. Missing required inputs are errors only when `require` is
/// set (`plan`, `apply`); `validate` checks the file without them.
pub fn resolve(
    workflow: &Workflow,
    args: &InputArgs,
    require: bool,
    diags: &mut Vec<Diagnostic>,
) -> IndexMap<String, Value> {
    let names: Vec<&str> = workflow.inputs.keys().map(String::as_str).collect();
    let unknown = |name: &str| {
        let d = Diagnostic::error(
            Category::Input,
            "unknown-input",
            format!("`{name}` is not an input of this workflow"),
        );
        match did_you_mean(name, names.iter().copied()) {
            Some(best) => d.help(format!("did you mean `{best}`?")),
            None if names.is_empty() => d.help("this workflow declares no `[inputs]`"),
            None => d.help(format!(
                "declared inputs: {}",
                names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    };
    let mut given: IndexMap<String, Value> = IndexMap::new();
    // Inputs given with a value of the wrong type: already reported, so not "missing" as well.
    let mut rejected: Vec<&str> = Vec::new();
    for (name, value) in &args.values {
        match workflow.inputs.get(name) {
            None => diags.push(unknown(name)),
            Some(decl) if !decl.ty.accepts(value) => {
                rejected.push(name);
                diags.push(
                    Diagnostic::error(
                        Category::Input,
                        "wrong-input-type",
                        format!("input `{name}` must be a {}, found {value}", decl.ty.name()),
                    )
                    .at(decl.span, "declared here"),
                );
            }
            Some(_) => {
                given.insert(name.clone(), value.clone());
            }
        }
    }
    for (name, raw) in &args.pairs {
        match workflow.inputs.get(name) {
            None => diags.push(unknown(name)),
            Some(decl) => match typed(decl.ty, raw) {
                Ok(v) => {
                    given.insert(name.clone(), v);
                }
                Err(e) => {
                    rejected.push(name);
                    diags.push(Diagnostic::error(
                        Category::Input,
                        "wrong-input-type",
                        format!("input `{name}` must be a {}: {e}", decl.ty.name()),
                    )
                    .at(decl.span, "declared here")
                    .help(match decl.ty {
                        InputType::List | InputType::Object => {
                            "lists and objects are given as JSON: --var files='[\"a.rs\",\"b.rs\"]'"
                        }
                        _ => "set it with --var name=value",
                    }));
                }
            },
        }
    }
    let mut values = IndexMap::new();
    for (name, decl) in &workflow.inputs {
        if let Some(v) = given.shift_remove(name).or_else(|| decl.default.clone()) {
            values.insert(name.clone(), v);
        } else if decl.required && require && !rejected.contains(&name.as_str()) {
            diags.push(
                Diagnostic::error(
                    Category::Input,
                    "missing-input",
                    format!("required input `{name}` is not set"),
                )
                .at(decl.span, "declared here")
                .help(format!(
                    "set it with --var {name}=..., or give it a `default`"
                )),
            );
        }
    }
    values
}
