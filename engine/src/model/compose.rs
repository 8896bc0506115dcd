//! Reuse: a task that says `use = "<template>"` is replaced by the template's tasks, embedded as
//! `<id>.<task>` with the template's inputs bound to the task's `with` values, plus the task itself
//! as the template's outputs. Templates come from a path, from the binary (`builtin:`), or from a
//! git repository at a ref (`git+<url>#<ref>:<path>`, pinned in `clusterfile.lock`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::Value;

use super::decode;
use super::raw::{InputType, RawClusterfile, RawTask};
use super::spanned::Spanned;
use crate::diagnostic::{Category, Diagnostic, SourceFile, Span};
use crate::syntax::{self, Format};

/// How deep templates may use templates.
pub const MAX_DEPTH: usize = 8;

/// The binding of a template's inputs where it is used.
#[derive(Debug)]
pub struct ScopeDecl {
    /// `with` values: JSON, or strings with templates over the using workflow's inputs and vars.
    pub with: IndexMap<String, Value>,
    /// The template's declared defaults, for inputs `with` leaves out.
    pub defaults: IndexMap<String, Value>,
    /// The template's `[vars]`.
    pub vars: IndexMap<String, Value>,
    /// Every input the template declares (what its templates may read as `inputs.<name>`).
    pub declared: Vec<String>,
    /// Their types, to check `with` values once rendered.
    pub types: IndexMap<String, InputType>,
    /// The template's name, for messages.
    pub template: String,
    /// The scope `with` values are evaluated in: the using template's, or `None` for the
    /// clusterfile itself.
    pub parent: Option<Arc<ScopeDecl>>,
}

/// Where an embedded task comes from.
#[derive(Debug)]
pub struct Origin {
    /// The template file (its spans point into it).
    pub file: SourceFile,
    /// The task-id prefix of its template instance (`api`, `api.inner`): `tasks.x` in its
    /// templates means `<prefix>.x`.
    pub prefix: String,
    pub scope: Arc<ScopeDecl>,
}

/// The outputs task that stands for a template instance.
#[derive(Clone, Debug)]
pub struct OutputsOf {
    pub values: IndexMap<String, Spanned<String>>,
    /// The embedded task whose branch is the instance's result (the template's `result`, or its
    /// last git merge).
    pub result: Option<String>,
}

/// Finds template texts.
pub trait Loader {
    /// The text of `spec` used from a file in `from_dir`: a stable name to show and record (also
    /// the key of `replay`), the text, and the directory its own relative uses start from.
    fn load(&mut self, spec: &str, from_dir: &Path) -> Result<(String, String, PathBuf), String>;
}

/// The loader of a clusterfile on disk: paths, `builtin:`, and `git+` sources (fetched into a
/// cache and pinned in a lock file). Every text it served is kept, so a run can record them; with
/// `replay`, it serves only the recorded texts (a retried or resumed run never sees newer ones).
#[derive(Default)]
pub struct FileLoader {
    /// Where fetched repositories are kept (`<state>/templates`).
    pub cache: Option<PathBuf>,
    /// `clusterfile.lock`: `git+` spec → commit.
    pub lock: BTreeMap<String, String>,
    /// Resolve refs again instead of using the lock (`ccluster update`).
    pub refresh: bool,
    /// The lock changed: it should be written back.
    pub lock_changed: bool,
    /// Texts served, by name.
    pub served: BTreeMap<String, String>,
    pub replay: Option<BTreeMap<String, String>>,
}

/// `a/./b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir if out.file_name().is_some() => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

impl FileLoader {
    /// The name a spec is recorded under.
    fn name_of(spec: &str, from_dir: &Path) -> String {
        if spec.starts_with("builtin:") || spec.starts_with("git+") {
            spec.to_string()
        } else {
            normalize(&from_dir.join(spec)).display().to_string()
        }
    }

    fn git(&mut self, spec: &str) -> Result<String, String> {
        let rest = &spec["git+".len()..];
        let (url, tail) = rest
            .rsplit_once('#')
            .ok_or_else(|| format!("`{spec}` has no `#<ref>:<path>`"))?;
        let (reference, path) = tail
            .split_once(':')
            .ok_or_else(|| format!("`{spec}` has no `:<path>` after its ref"))?;
        let cache = self
            .cache
            .clone()
            .ok_or("git templates need a state directory to fetch into")?;
        let repo = cache
            .join("git")
            .join(&blake3::hash(url.as_bytes()).to_hex()[..16]);
        if !repo.join("HEAD").exists() {
            std::fs::create_dir_all(&repo).map_err(|e| e.to_string())?;
            crate::workspace::git_sync(&repo, &["init", "--quiet", "--bare"])?;
        }
        let locked = self.lock.get(spec).cloned().filter(|_| !self.refresh);
        let commit = match locked {
            Some(commit) => {
                let present = crate::workspace::git_sync(
                    &repo,
                    &["cat-file", "-e", &format!("{commit}^{{commit}}")],
                )
                .is_ok();
                if !present {
                    // The pinned commit may no longer be at the ref: fetch everything.
                    crate::workspace::git_sync(
                        &repo,
                        &["fetch", "--quiet", url, "+refs/*:refs/remotes/origin/*"],
                    )
                    .map_err(|e| format!("cannot fetch `{url}`: {e}"))?;
                }
                commit
            }
            None => {
                crate::workspace::git_sync(&repo, &["fetch", "--quiet", url, reference])
                    .map_err(|e| format!("cannot fetch `{reference}` of `{url}`: {e}"))?;
                let commit = crate::workspace::git_sync(&repo, &["rev-parse", "FETCH_HEAD"])?
                    .trim()
                    .to_string();
                self.lock.insert(spec.to_string(), commit.clone());
                self.lock_changed = true;
                commit
            }
        };
        crate::workspace::git_sync(&repo, &["show", &format!("{commit}:{path}")])
            .map_err(|e| format!("`{path}` is not in `{url}` at {commit}: {e}"))
    }

    /// Reads a lock file (`[git]` table of spec = commit); a missing file is an empty lock.
    pub fn read_lock(path: &Path) -> Result<BTreeMap<String, String>, String> {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(BTreeMap::new());
        };
        #[derive(serde::Deserialize)]
        struct Lock {
            #[serde(default)]
            git: BTreeMap<String, Entry>,
        }
        #[derive(serde::Deserialize)]
        struct Entry {
            commit: String,
        }
        let lock: Lock = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(lock.git.into_iter().map(|(k, v)| (k, v.commit)).collect())
    }

    pub fn write_lock(&self, path: &Path) -> std::io::Result<()> {
        let mut text = String::from(
            "# The commits `git+` templates resolved to; `ccluster update` refreshes them.\n",
        );
        for (spec, commit) in &self.lock {
            text.push_str(&format!(
                "\n[git.{}]\ncommit = \"{commit}\"\n",
                serde_json::to_string(spec).unwrap_or_default()
            ));
        }
        std::fs::write(path, text)
    }
}

impl Loader for FileLoader {
    fn load(&mut self, spec: &str, from_dir: &Path) -> Result<(String, String, PathBuf), String> {
        let name = Self::name_of(spec, from_dir);
        if let Some(replay) = &self.replay {
            // A path template's own relative uses start from its directory, as when it was read.
            let dir = if spec.starts_with("builtin:") || spec.starts_with("git+") {
                from_dir.to_path_buf()
            } else {
                Path::new(&name)
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default()
            };
            return replay
                .get(&name)
                .map(|t| (name.clone(), t.clone(), dir))
                .ok_or_else(|| format!("the run recorded no template `{name}`"));
        }
        let (text, dir) = if let Some(b) = spec.strip_prefix("builtin:") {
            let builtin = crate::library::find(b).ok_or_else(|| {
                format!(
                    "no built-in template `{b}` (there are: {})",
                    crate::library::BUILTINS
                        .iter()
                        .map(|b| b.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            (builtin.text.to_string(), from_dir.to_path_buf())
        } else if spec.starts_with("git+") {
            (self.git(spec)?, from_dir.to_path_buf())
        } else {
            let path = from_dir.join(spec);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("cannot read `{}`: {e}", path.display()))?;
            (
                text,
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
            )
        };
        self.served.insert(name.clone(), text.clone());
        Ok((name, text, dir))
    }
}

/// Gives a template's task the settings of its template's `[defaults]` that it does not set.
fn fold_defaults(t: &mut RawTask, d: &super::raw::RawDefaults) {
    fn fill<T: Clone>(slot: &mut Option<T>, from: &Option<T>) {
        if slot.is_none() {
            slot.clone_from(from);
        }
    }
    // As `[defaults]` do, each setting goes only to the kinds of task it applies to.
    let (agent, shell) = (t.prompt.is_some(), t.run.is_some());
    fill(&mut t.timeout, &d.timeout);
    fill(&mut t.runner, &d.runner);
    if shell {
        fill(&mut t.workdir, &d.workdir);
    }
    fill(&mut t.max_parallel, &d.max_parallel);
    fill(&mut t.on_item_failure, &d.on_item_failure);
    fill(&mut t.artifacts, &d.artifacts);
    fill(&mut t.reports, &d.reports);
    if agent || shell {
        fill(&mut t.workspace, &d.workspace);
        fill(&mut t.setup, &d.setup);
        fill(&mut t.copy, &d.copy);
    }
    if agent || shell {
        for (k, v) in &d.env {
            t.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    if let (true, Some(dc)) = (agent, &d.claude) {
        let c = t.claude.get_or_insert_with(Default::default);
        fill(&mut c.model, &dc.model);
        fill(&mut c.permission_mode, &dc.permission_mode);
        fill(&mut c.allowed_tools, &dc.allowed_tools);
        fill(&mut c.disallowed_tools, &dc.disallowed_tools);
        fill(&mut c.max_turns, &dc.max_turns);
        fill(&mut c.max_budget_usd, &dc.max_budget_usd);
        fill(&mut c.append_system_prompt, &dc.append_system_prompt);
        fill(&mut c.settings, &dc.settings);
        fill(&mut c.bin, &dc.bin);
    }
    if let Some(dr) = &d.retry {
        let r = t.retry.get_or_insert_with(Default::default);
        fill(&mut r.limit, &dr.limit);
        fill(&mut r.backoff, &dr.backoff);
        fill(&mut r.on, &dr.on);
        fill(&mut r.resume_session, &dr.resume_session);
    }
}

fn error(
    code: &'static str,
    message: String,
    span: Span,
    label: &str,
    file: Option<&SourceFile>,
) -> Diagnostic {
    let d = Diagnostic::error(Category::Template, code, message).at(span, label);
    match file {
        Some(f) => d.in_file(f),
        None => d,
    }
}

/// Where a diagnostic of a template is: `name:line:col`.
fn place(file: &SourceFile, span: Option<Span>) -> String {
    let (line, col) = file.line_col(span.map_or(0, |s| s.start));
    format!("{}:{line}:{col}", file.name)
}

/// Replaces every task that `use`s a template in `raw` (the file `file`, or the clusterfile when
/// `file` is `None`) by the template's tasks and an outputs task.
pub fn expand(
    raw: &mut RawClusterfile,
    file: Option<&SourceFile>,
    dir: &Path,
    loader: &mut dyn Loader,
    chain: &mut Vec<String>,
    parent: Option<Arc<ScopeDecl>>,
    diags: &mut Vec<Diagnostic>,
) {
    if !raw.tasks.values().any(|t| t.use_.is_some()) {
        return;
    }
    let tasks = std::mem::take(&mut raw.tasks);
    for (id, task) in tasks {
        let Some(spec) = task.use_.clone() else {
            raw.tasks.insert(id, task);
            continue;
        };
        // The using task stays, as the template's outputs (empty if the template cannot be used),
        // so what needs it still finds it.
        let mut outputs = RawTask {
            id_span: task.id_span,
            description: task.description.clone(),
            needs: task.needs.clone(),
            outputs_of: Some(OutputsOf {
                values: IndexMap::new(),
                result: None,
            }),
            origin: task.origin.clone(),
            ..RawTask::default()
        };
        for (key, given) in [
            ("prompt", task.prompt.as_ref().map(|s| s.span)),
            ("run", task.run.as_ref().map(|s| s.span)),
            ("map", task.map.as_ref().map(|s| s.span)),
            ("when", task.when.as_ref().map(|s| s.span)),
            ("timeout", task.timeout.as_ref().map(|s| s.span)),
            ("workspace", task.workspace.as_ref().map(|s| s.span)),
            ("runner", task.runner.as_ref().map(|s| s.span)),
            ("output_schema", task.output_schema.as_ref().map(|s| s.span)),
            ("env", task.env.values().map(|v| v.span).min()),
        ] {
            if let Some(span) = given {
                diags.push(
                    error("use-with-kind", format!("task `{id}` has both `use` and `{key}`"), span, "not with `use`", file)
                        .help("a task that uses a template is that template: keep `use`, `with`, `needs` and `description` only"),
                );
            }
        }
        if chain.len() > MAX_DEPTH {
            diags.push(
                error(
                    "template-depth",
                    format!(
                        "templates nest deeper than {MAX_DEPTH} levels: {}",
                        chain.join(" -> ")
                    ),
                    spec.span,
                    "too deep",
                    file,
                )
                .help("a template that uses itself through others never ends; flatten the chain"),
            );
            raw.tasks.insert(id, outputs);
            continue;
        }
        let (name, text, tdir) = match loader.load(&spec.value, dir) {
            Ok(found) => found,
            Err(e) => {
                diags.push(
                    error("template-source", format!("cannot use `{}`: {e}", spec.value), spec.span, "this template", file)
                        .help("a template is `./path.toml` (relative to this file), `builtin:<name>` (`ccluster templates`), or `git+<url>#<ref>:<path>`"),
                );
                raw.tasks.insert(id, outputs);
                continue;
            }
        };
        if chain.contains(&name) {
            let mut cycle = chain.clone();
            cycle.push(name.clone());
            diags.push(
                error(
                    "template-cycle",
                    format!(
                        "templates use each other in a cycle: {}",
                        cycle.join(" -> ")
                    ),
                    spec.span,
                    "closes the cycle",
                    file,
                )
                .help("break the cycle: a template cannot use itself, directly or through others"),
            );
            raw.tasks.insert(id, outputs);
            continue;
        }
        let tfile = SourceFile::new(name.clone(), text);
        let format = Format::from_path(Path::new(&name));
        let (tree, syntax_errors) = syntax::parse(&tfile.text, format);
        let mut tdiags = syntax_errors;
        let mut traw = match tree {
            Some(tree) if tdiags.is_empty() => decode::decode(&tree, &mut tdiags),
            _ => RawClusterfile::default(),
        };
        // The template's own problems are reported in its own file.
        let template_errors = tdiags.iter().any(Diagnostic::is_error);
        diags.extend(tdiags.into_iter().map(|d| d.in_file(&tfile)));
        if template_errors {
            diags.push(
                error(
                    "template-invalid",
                    format!("template `{name}` has errors (reported above)"),
                    spec.span,
                    "used here",
                    file,
                )
                .help(format!("check it alone: `ccluster validate {name}`")),
            );
            raw.tasks.insert(id, outputs);
            continue;
        }

        // Its parameters: every `with` key must be an input; every required input given.
        let declared: IndexMap<String, (Option<Value>, bool, InputType, Span)> = traw
            .inputs
            .iter()
            .map(|(k, i)| {
                let default = i.default.as_ref().map(|d| d.value.clone());
                let required = i.required.as_ref().map_or(default.is_none(), |r| r.value);
                let ty = i.ty.as_ref().map_or(InputType::String, |t| t.value);
                (k.clone(), (default, required, ty, i.name_span))
            })
            .collect();
        let inputs_at = place(&tfile, declared.values().next().map(|d| d.3));
        for (key, value) in &task.with {
            match declared.get(key) {
                None => {
                    let mut d = error(
                        "unknown-parameter",
                        format!("template `{name}` has no input `{key}`"),
                        value.span,
                        "not a parameter of the template",
                        file,
                    );
                    d = d.help(if declared.is_empty() {
                        format!("`{name}` declares no `[inputs]`")
                    } else {
                        format!(
                            "its inputs, declared at {inputs_at}: {}",
                            declared
                                .keys()
                                .map(|k| format!("`{k}`"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    });
                    diags.push(d);
                }
                Some((_, _, ty, at)) => {
                    let is_template = value.value.as_str().is_some_and(|s| s.contains("{{"));
                    if !is_template && !ty.accepts(&value.value) {
                        diags.push(
                            error(
                                "parameter-type",
                                format!(
                                    "`{key}` of template `{name}` is a {}, not this",
                                    ty.name()
                                ),
                                value.span,
                                &format!("expected a {}", ty.name()),
                                file,
                            )
                            .help(format!(
                                "the input is declared at {}",
                                place(&tfile, Some(*at))
                            )),
                        );
                    }
                }
            }
        }
        for (key, (_, required, ty, at)) in &declared {
            if *required && !task.with.contains_key(key) {
                diags.push(
                    error(
                        "missing-parameter",
                        format!("template `{name}` needs its input `{key}`"),
                        spec.span,
                        "the template is used here",
                        file,
                    )
                    .help(format!(
                        "add `with = {{ {key} = <{}> }}`; the input is declared at {}",
                        ty.name(),
                        place(&tfile, Some(*at))
                    )),
                );
            }
        }

        let scope = Arc::new(ScopeDecl {
            with: task
                .with
                .iter()
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect(),
            defaults: declared
                .iter()
                .filter_map(|(k, d)| d.0.clone().map(|v| (k.clone(), v)))
                .collect(),
            vars: traw
                .vars
                .iter()
                .map(|(k, v)| (k.clone(), v.value.clone()))
                .collect(),
            declared: declared.keys().cloned().collect(),
            types: declared.iter().map(|(k, d)| (k.clone(), d.2)).collect(),
            template: name.clone(),
            parent: parent.clone(),
        });
        chain.push(name.clone());
        expand(
            &mut traw,
            Some(&tfile),
            &tdir,
            loader,
            chain,
            Some(scope.clone()),
            diags,
        );
        chain.pop();

        // Embed: `<id>.<task>`; internal needs renamed, entry tasks take the using task's needs.
        let internal: HashSet<String> = traw.tasks.keys().cloned().collect();
        let result = traw
            .workflow
            .as_ref()
            .and_then(|w| w.result.as_ref())
            .map(|r| r.value.clone())
            .or_else(|| {
                traw.tasks
                    .iter()
                    .rev()
                    .find(|(_, t)| {
                        t.merge.as_ref().is_some_and(|m| {
                            m.strategy
                                .as_ref()
                                .is_none_or(|s| s.value == super::raw::MergeStrategy::Git)
                        })
                    })
                    .map(|(k, _)| k.clone())
            });
        let mut embedded = Vec::new();
        for (tid, mut tt) in std::mem::take(&mut traw.tasks) {
            // The template's `[defaults]` are its tasks' own settings; the using file's defaults
            // fill in only what neither says.
            if let Some(d) = &traw.defaults {
                fold_defaults(&mut tt, d);
            }
            let new_id = format!("{id}.{tid}");
            let own_needs: Vec<Spanned<String>> = tt
                .needs
                .as_ref()
                .map(|n| n.value.clone())
                .unwrap_or_default();
            if own_needs.is_empty() {
                tt.needs = task.needs.clone();
            } else if let Some(needs) = tt.needs.as_mut() {
                for n in needs.value.iter_mut() {
                    if internal.contains(n.value.split('.').next().unwrap_or_default()) {
                        n.value = format!("{id}.{}", n.value);
                    }
                }
            }
            tt.origin = Some(Arc::new(match tt.origin.take() {
                // Embedded by a template this one uses: one level deeper.
                Some(inner) => Origin {
                    file: inner.file.clone(),
                    prefix: format!("{id}.{}", inner.prefix),
                    scope: inner.scope.clone(),
                },
                None => Origin {
                    file: tfile.clone(),
                    prefix: id.clone(),
                    scope: scope.clone(),
                },
            }));
            if let Some(o) = tt.outputs_of.as_mut() {
                o.result = o.result.take().map(|r| format!("{id}.{r}"));
            }
            embedded.push(new_id.clone());
            raw.tasks.insert(new_id, tt);
        }
        outputs.needs = Some(Spanned::new(
            embedded
                .iter()
                .map(|e| Spanned::new(e.clone(), spec.span))
                .collect(),
            spec.span,
        ));
        outputs.outputs_of = Some(OutputsOf {
            values: traw.outputs.clone(),
            result: result.map(|r| format!("{id}.{r}")),
        });
        outputs.origin = Some(Arc::new(Origin {
            file: tfile.clone(),
            prefix: id.clone(),
            scope: scope.clone(),
        }));
        raw.tasks.insert(id, outputs);
    }
}
