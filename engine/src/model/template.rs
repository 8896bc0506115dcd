//! Templates: strict minijinja rendering, and the static checks that find undefined names at validate
//! time wherever the value is knowable.

use std::collections::BTreeSet;

use minijinja::{Environment, UndefinedBehavior};

use crate::diagnostic::{did_you_mean, Category, Diagnostic, Span};

/// A template as written in the clusterfile.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(transparent)]
pub struct Template {
    pub source: String,
    /// Span of the whole string value in the file.
    #[serde(skip)]
    pub span: Span,
    /// File offset of the template's first character when the file holds the text verbatim (no
    /// escapes), so errors inside the template point at the exact spot; else the value's start.
    #[serde(skip)]
    pub origin: Option<usize>,
}

impl Template {
    /// Finds where the template text starts in the file: after the quote of a TOML/KDL string.
    pub fn new(source: String, span: Span, file: &str) -> Template {
        let raw = file.get(span.start..span.end).unwrap_or("");
        let hashes = raw.len() - raw.trim_start_matches('#').len();
        let after_hashes = &raw[hashes..];
        let mut skip = hashes
            + if after_hashes.starts_with("\"\"\"") || after_hashes.starts_with("'''") {
                3
            } else if after_hashes.starts_with('"') || after_hashes.starts_with('\'') {
                1
            } else {
                0
            };
        let rest = &raw[skip.min(raw.len())..];
        if skip >= 3 && rest.starts_with("\r\n") {
            skip += 2;
        } else if skip >= 3 && rest.starts_with('\n') {
            skip += 1;
        }
        let origin = span.start + skip;
        let verbatim = file.get(origin..origin + source.len()) == Some(source.as_str());
        Template {
            origin: verbatim.then_some(origin),
            source,
            span,
        }
    }

    /// A span into the file for a byte range of the template, as exact as the file allows.
    pub fn span_of(&self, range: Option<std::ops::Range<usize>>) -> Span {
        match (self.origin, range) {
            (Some(origin), Some(r)) if r.end <= self.source.len() => Span::new(
                origin + r.start,
                origin + r.end.max(r.start + 1).min(self.source.len()),
            ),
            _ => self.span,
        }
    }

    /// Span of the first mention of `name` in the template, for "undefined name" errors.
    pub fn span_of_name(&self, name: &str) -> Span {
        let found = self.source.match_indices(name).find(|(i, _)| {
            let before = self.source[..*i].chars().next_back();
            !before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '.')
        });
        self.span_of(found.map(|(i, _)| i..i + name.len()))
    }

    /// Whether the text has no template syntax at all, so it is its own rendering (most `run`
    /// commands): no need to compile it.
    pub fn is_literal(&self) -> bool {
        !(self.source.contains("{{") || self.source.contains("{%") || self.source.contains("{#"))
    }

    /// The expression inside `{{ … }}`, or the whole text when it has no braces (`when`, `map`).
    pub fn as_expression(&self) -> &str {
        let t = self.source.trim();
        match t.strip_prefix("{{").and_then(|t| t.strip_suffix("}}")) {
            Some(inner) if !inner.contains("{{") && !inner.contains("}}") => inner.trim(),
            _ => t,
        }
    }
}

/// The environment every template is rendered in: strict undefined, no auto-escaping, keep a
/// trailing newline (commands and prompts are whitespace-sensitive).
///
/// minijinja's strict mode still lets an undefined value through a few built-ins (`join` gives
/// `""`, `tojson` gives `null`, `x is none` is false...), so a misspelt attribute could render
/// empty or skip a task silently. Those are replaced by versions that refuse undefined values;
/// `default`, `is defined` and `is undefined` keep accepting them, as they are made for that.
pub fn environment<'source>() -> Environment<'source> {
    use minijinja::value::{Kwargs, Rest, StringInput};
    use minijinja::{filters, functions, tests, State, Value};
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.add_filter(
        "join",
        |state: &State, v: &Value, joiner: Option<StringInput<'_>>| {
            defined(v, "join")?;
            filters::join(state, v, joiner)
        },
    );
    env.add_filter(
        "tojson",
        |v: &Value, indent: Option<Value>, args: Kwargs| {
            defined(v, "tojson")?;
            filters::tojson(v, indent, args)
        },
    );
    for name in ["escape", "e"] {
        env.add_filter(name, move |state: &State, v: &Value| {
            defined(v, name)?;
            filters::escape(state, v)
        });
    }
    env.add_filter("pprint", |v: &Value| {
        defined(v, "pprint")?;
        Ok::<_, minijinja::Error>(filters::pprint(v))
    });
    env.add_filter(
        "groupby",
        |v: Value, attribute: Option<&str>, kwargs: Kwargs| {
            defined(&v, "groupby")?;
            filters::groupby(v, attribute, kwargs)
        },
    );
    env.add_filter("format", |state: &State, v: &Value, args: Rest<Value>| {
        defined(v, "format")?;
        for a in args.iter() {
            defined(a, "format")?;
        }
        filters::format(state, v, args)
    });
    env.add_function("dict", |value: Option<Value>, kwargs: Kwargs| {
        if let Some(v) = &value {
            defined(v, "dict")?;
        }
        for key in kwargs.args() {
            let v: Value = kwargs.peek(key)?;
            defined(&v, "dict")?;
        }
        functions::dict(value, kwargs)
    });
    macro_rules! strict_test {
        ($($name:literal => $test:expr),* $(,)?) => {$(
            env.add_test($name, |v: &Value| -> Result<bool, minijinja::Error> {
                defined(v, concat!("is ", $name))?;
                Ok($test(v))
            });
        )*};
    }
    strict_test! {
        "none" => tests::is_none,
        "string" => tests::is_string,
        "number" => tests::is_number,
        "mapping" => tests::is_mapping,
        "sequence" => tests::is_sequence,
        "iterable" => tests::is_iterable,
        "true" => tests::is_true,
        "false" => tests::is_false,
        "boolean" => tests::is_boolean,
        "integer" => tests::is_integer,
        "float" => tests::is_float,
    }
    env
}

fn defined(v: &minijinja::Value, by: &str) -> Result<(), minijinja::Error> {
    if v.is_undefined() {
        Err(minijinja::Error::new(
            minijinja::ErrorKind::UndefinedError,
            format!("`{by}` was given an undefined value"),
        ))
    } else {
        Ok(())
    }
}

/// Names the attribute a failed render could not find: the first dotted name in `source` that is
/// undefined while the value before its last step is defined, with the keys that value has
/// (`tasks.a.output.prts` is undefined; `tasks.a.output` has `parts`).
pub fn undefined_attribute(
    env: &Environment<'_>,
    source: &str,
    ctx: &minijinja::Value,
) -> Option<String> {
    let bytes = source.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let starts = (c.is_ascii_alphabetic() || c == b'_')
            && (i == 0
                || !(bytes[i - 1].is_ascii_alphanumeric()
                    || bytes[i - 1] == b'_'
                    || bytes[i - 1] == b'.'));
        if !starts {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < bytes.len()
            && (bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_' || bytes[j] == b'.')
        {
            j += 1;
        }
        let path = source[i..j].trim_end_matches('.');
        let steps: Vec<&str> = path.split('.').collect();
        for n in 2..=steps.len() {
            let parent = steps[..n - 1].join(".");
            let full = steps[..n].join(".");
            let eval = |p: &str| env.compile_expression(p).ok()?.eval(ctx).ok();
            let Some(parent_value) = eval(&parent) else {
                break;
            };
            if parent_value.is_undefined() {
                break;
            }
            if eval(&full).is_some_and(|v| v.is_undefined()) {
                let keys: Vec<String> = parent_value
                    .try_iter()
                    .map(|it| {
                        it.filter_map(|k| k.as_str().map(|s| format!("`{s}`")))
                            .collect()
                    })
                    .unwrap_or_default();
                let has = if parent_value.kind() == minijinja::value::ValueKind::Map {
                    if keys.is_empty() {
                        "no keys".to_string()
                    } else {
                        keys.join(", ")
                    }
                } else {
                    format!("no attributes (it is {})", parent_value.kind())
                };
                return Some(format!("`{full}` is undefined: `{parent}` has {has}"));
            }
        }
        i = j;
    }
    None
}

/// Names a template may start from, and what is known about them for one task.
pub struct Scope<'a> {
    pub inputs: &'a [&'a str],
    pub vars: &'a [&'a str],
    /// Tasks whose outputs this task can read (its transitive `needs`), with whether each is mapped.
    pub upstream: &'a [(&'a str, bool)],
    /// All task ids, to tell "unknown task" from "not upstream".
    pub all_tasks: &'a [&'a str],
    pub mapped: bool,
    pub task: &'a str,
    /// The output keys of tasks that use a template (its `[outputs]`), by the id this task
    /// names them with: `tasks.<id>.output.<key>` must name one of them.
    pub outputs: &'a std::collections::HashMap<String, Vec<String>>,
}

/// Built-in functions of minijinja that static analysis reports as free names.
const GLOBALS: &[&str] = &[
    "range",
    "dict",
    "namespace",
    "debug",
    "loop",
    "self",
    "super",
    "caller",
    "varargs",
    "kwargs",
    "cycler",
    "joiner",
    "true",
    "false",
    "none",
    "True",
    "False",
    "None",
];

/// Whether a name path is only known at run time: an upstream output (`tasks.plan.output`) or the
/// attempt number (a retry renders again with `attempt` = 2, 3, ...).
pub fn is_runtime_name(path: &str) -> bool {
    path == "tasks" || path.starts_with("tasks.") || path == "attempt"
}

/// Checks the free names of a template against the scope. Returns the diagnostics.
pub fn check_names(
    template: &Template,
    names: &BTreeSet<String>,
    scope: &Scope<'_>,
    field: &str,
) -> Vec<Diagnostic> {
    let mut out = Vec::new();
    for path in names {
        let parts: Vec<&str> = path.split('.').collect();
        let undefined = |what: String, candidates: &[&str], span_name: &str| {
            let mut d = Diagnostic::error(
                Category::Template,
                "undefined-name",
                format!(
                    "undefined name `{path}` in the `{field}` of task `{}`",
                    scope.task
                ),
            )
            .at(template.span_of_name(span_name), what);
            if let Some(best) = did_you_mean(
                parts.last().copied().unwrap_or(""),
                candidates.iter().copied(),
            ) {
                d = d.help(format!("did you mean `{best}`?"));
            }
            d
        };
        match parts[0] {
            "inputs" => {
                if let Some(name) = parts.get(1) {
                    if !scope.inputs.contains(name) {
                        out.push(
                            undefined(format!("no input `{name}` is declared"), scope.inputs, path)
                                .help(
                                    did_you_mean(name, scope.inputs.iter().copied())
                                        .map(|b| format!("did you mean `inputs.{b}`?"))
                                        .unwrap_or_else(|| {
                                            format!("declare it under `[inputs.{name}]`")
                                        }),
                                ),
                        );
                    }
                }
            }
            "vars" => {
                if let Some(name) = parts.get(1) {
                    if !scope.vars.contains(name) {
                        out.push(
                            undefined(format!("no var `{name}` is defined"), scope.vars, path)
                                .help(
                                    did_you_mean(name, scope.vars.iter().copied())
                                        .map(|b| format!("did you mean `vars.{b}`?"))
                                        .unwrap_or_else(|| {
                                            format!("define it under `[vars]`: {name} = ...")
                                        }),
                                ),
                        );
                    }
                }
            }
            "workflow" => {
                if let Some(name) = parts.get(1) {
                    if !["name", "description"].contains(name) {
                        out.push(undefined(
                            "`workflow` has `name` and `description`".into(),
                            &["name", "description"],
                            path,
                        ));
                    }
                }
            }
            "tasks" => {
                let Some(id) = parts.get(1) else { continue };
                match scope.upstream.iter().find(|(u, _)| u == id) {
                    None if scope.all_tasks.contains(id) => out.push(
                        Diagnostic::error(
                            Category::Template,
                            "not-upstream",
                            format!(
                                "task `{}` reads `tasks.{id}` but does not need `{id}`",
                                scope.task
                            ),
                        )
                        .at(template.span_of_name(path), "not an upstream task")
                        .help(format!("add `\"{id}\"` to `needs` so `{id}` runs first")),
                    ),
                    None => {
                        let mut d = Diagnostic::error(
                            Category::Template,
                            "undefined-name",
                            format!("undefined name `{path}`: there is no task `{id}`"),
                        )
                        .at(template.span_of_name(path), "no such task");
                        let dashed = scope.all_tasks.iter().find(|t| t.starts_with(&format!("{id}-")));
                        if let Some(dashed) = dashed {
                            d = d.help(format!("`-` is subtraction in templates: read `{dashed}` as `tasks[\"{dashed}\"]`"));
                        } else if let Some(best) = did_you_mean(id, scope.all_tasks.iter().copied()) {
                            d = d.help(format!("did you mean `tasks.{best}`?"));
                        }
                        out.push(d);
                    }
                    Some((_, mapped)) => {
                        let Some(field_name) = parts.get(2) else {
                            continue;
                        };
                        let expected = if *mapped { "outputs" } else { "output" };
                        if let (true, Some(key), Some(declared)) = (
                            *field_name == expected && !*mapped,
                            parts.get(3),
                            scope.outputs.get(*id),
                        ) {
                            if !declared.iter().any(|d| d == key) {
                                let list = declared
                                    .iter()
                                    .map(|d| format!("`{d}`"))
                                    .collect::<Vec<_>>()
                                    .join(", ");
                                let mut d = Diagnostic::error(
                                    Category::Template,
                                    "undefined-name",
                                    format!("undefined name `{path}`: the template `{id}` uses declares no output `{key}`"),
                                )
                                .at(template.span_of_name(path), "no such output");
                                d = match did_you_mean(key, declared.iter().map(String::as_str)) {
                                    Some(best) => d.help(format!("did you mean `tasks.{id}.output.{best}`? Its `[outputs]`: {list}")),
                                    None if declared.is_empty() => d.help("the template declares no `[outputs]`"),
                                    None => d.help(format!("its `[outputs]`: {list}")),
                                };
                                out.push(d);
                            }
                        }
                        if *field_name != expected {
                            let why = if *mapped {
                                format!("`{id}` is mapped: its instances' outputs are the list `tasks.{id}.outputs`")
                            } else {
                                format!("`{id}` has one output: `tasks.{id}.output`")
                            };
                            out.push(
                                Diagnostic::error(
                                    Category::Template,
                                    "undefined-name",
                                    format!("undefined name `{path}`"),
                                )
                                .at(
                                    template.span_of_name(path),
                                    format!("use `tasks.{id}.{expected}`"),
                                )
                                .help(why),
                            );
                        }
                    }
                }
            }
            "item" | "index" if field == "map" => out.push(
                Diagnostic::error(Category::Template, "undefined-name", format!("undefined name `{}` in the `map` of task `{}`", parts[0], scope.task))
                    .at(template.span_of_name(parts[0]), "not defined while the list is computed")
                    .help("`item` and `index` exist in the task's other templates, once per item of the list `map` computes"),
            ),
            "item" | "index" if !scope.mapped => out.push(
                Diagnostic::error(
                    Category::Template,
                    "undefined-name",
                    format!(
                        "undefined name `{}` in task `{}`, which has no `map`",
                        parts[0], scope.task
                    ),
                )
                .at(
                    template.span_of_name(parts[0]),
                    "only defined in mapped tasks",
                )
                .help("`item` and `index` exist in tasks with `map = [...]`"),
            ),
            "item" | "index" | "attempt" => {}
            root if GLOBALS.contains(&root) => {}
            root => {
                let roots = [
                    "inputs", "vars", "workflow", "tasks", "item", "index", "attempt",
                ];
                let mut d = Diagnostic::error(
                    Category::Template,
                    "undefined-name",
                    format!(
                        "undefined name `{root}` in the `{field}` of task `{}`",
                        scope.task
                    ),
                )
                .at(template.span_of_name(root), "undefined");
                d = match did_you_mean(root, roots) {
                    Some(best) => d.help(format!("did you mean `{best}`?")),
                    None if scope.inputs.contains(&root) => d.help(format!("inputs are read as `inputs.{root}`")),
                    None if scope.vars.contains(&root) => d.help(format!("vars are read as `vars.{root}`")),
                    None => d.help("templates can read `inputs`, `vars`, `workflow`, `tasks.<id>.output`, `item`, `index` and `attempt`"),
                };
                out.push(d);
            }
        }
    }
    out
}

/// A template syntax error as a diagnostic.
pub fn syntax_error(
    template: &Template,
    err: &minijinja::Error,
    field: &str,
    task: &str,
) -> Diagnostic {
    let detail = err
        .detail()
        .map(str::to_string)
        .unwrap_or_else(|| err.kind().to_string());
    Diagnostic::error(
        Category::Template,
        "template-syntax",
        format!("template syntax error in the `{field}` of task `{task}`: {detail}"),
    )
    .at(template.span_of(err.range()), detail)
    .help("templates use minijinja (Jinja2) syntax: `{{ expression }}`, `{% if … %}…{% endif %}`")
}

/// A render (evaluation) error as a diagnostic.
pub fn render_error(
    template: &Template,
    err: &minijinja::Error,
    field: &str,
    task: &str,
) -> Diagnostic {
    let detail = err
        .detail()
        .map(str::to_string)
        .unwrap_or_else(|| err.kind().to_string());
    Diagnostic::error(
        Category::Template,
        "template-render",
        format!("cannot render the `{field}` of task `{task}`: {detail}"),
    )
    .at(template.span_of(err.range()), detail)
    .help("rendering is strict: every name and attribute must exist")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_points_after_the_quote() {
        let file = "run = \"echo {{ x }}\"";
        let t = Template::new("echo {{ x }}".into(), Span::new(6, 20), file);
        assert_eq!(t.origin, Some(7));
        let s = t.span_of_name("x");
        assert_eq!(&file[s.start..s.end], "x");
    }

    #[test]
    fn multiline_strings_skip_the_first_newline() {
        let file = "p = \"\"\"\nhello {{ y }}\n\"\"\"";
        let t = Template::new("hello {{ y }}\n".into(), Span::new(4, file.len()), file);
        assert_eq!(t.origin, Some(8));
    }

    #[test]
    fn escapes_fall_back_to_the_value_span() {
        let file = "run = \"a\\tb\"";
        let t = Template::new("a\tb".into(), Span::new(6, 12), file);
        assert_eq!(t.origin, None);
        assert_eq!(t.span_of(Some(0..1)), Span::new(6, 12));
    }

    #[test]
    fn expression_strips_braces() {
        let t = Template::new("{{ inputs.files }}".into(), Span::default(), "");
        assert_eq!(t.as_expression(), "inputs.files");
        let t = Template::new("inputs.n > 2".into(), Span::default(), "");
        assert_eq!(t.as_expression(), "inputs.n > 2");
    }
}
