//! Reuse: a task that says `use = "<template>"` is replaced by the template's tasks, embedded as
//! `<id>.<task>` with the template's inputs bound to the task's `with` values, plus the task itself
//! as the template's outputs. Templates come from a path, from the binary (`builtin:`), or from a
//! git repository at a ref (`git+<url>#<ref>:<path>`, pinned in `clusterfile.lock`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indexmap::IndexMap;
use serde_json::Value;

use super::confine;
use super::decode;
use super::fetch;
use super::raw::{InputType, RawClusterfile, RawTask};
pub use super::raw::{Origin, OutputsOf, ScopeDecl};
use super::spanned::Spanned;
use super::workflow::TaskId;
use crate::diagnostic::{Category, Diagnostic, SourceFile, Span};
use crate::syntax::{self, Format, Node, NodeValue};

/// How deep templates may use templates.
pub const MAX_DEPTH: usize = 8;

/// Why a template could not be had, and what to do about it.
#[derive(Debug)]
pub struct LoadError {
    pub message: String,
    /// A hint better than the generic one ("a template is `./path.toml`, ...").
    pub help: Option<String>,
}

impl From<String> for LoadError {
    fn from(message: String) -> Self {
        LoadError {
            message,
            help: None,
        }
    }
}

/// Finds template texts.
pub trait Loader {
    /// The text of `spec` used from a file in `from_dir`: a stable name to show and record (also
    /// the key of `replay`), the text, and the directory its own relative uses start from.
    fn load(&mut self, spec: &str, from_dir: &Path)
        -> Result<(String, String, PathBuf), LoadError>;
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
    /// May fetch `git+` repositories; without it only commits already pinned and cached are read
    /// (`validate` and `plan` reach no network unless asked to).
    pub fetch: bool,
    /// The directory path templates must be inside (canonical): the repository of the
    /// clusterfile, or its directory outside a repository. `None`: found from the directory of
    /// the first `load`, which is the clusterfile's.
    pub root: Option<PathBuf>,
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

/// Reads a path template: only a regular file inside `root` once every symbolic link is
/// resolved. Checked before the file is opened (a FIFO would block, a device never end) and again
/// on the open file, which is opened without following a link and without blocking, so swapping
/// the file in between gains nothing.
fn read_confined(path: &Path, root: &Path) -> Result<String, String> {
    confine::read_inside(path, root, "templates")
        .map_err(|e| e.replace("is not UTF-8 text", "is not UTF-8 text, so not a template"))
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

    fn git(&mut self, spec: &str) -> Result<String, LoadError> {
        // Checked before anything else, so `validate` refuses what `apply` would.
        let parsed = fetch::GitSpec::parse(spec)?;
        let not_fetching = |what: String| LoadError {
            message: format!("{what}, and this command fetches nothing unless asked to"),
            help: Some("run `ccluster update` to fetch and pin it, or pass `--fetch`".into()),
        };
        let cache = self
            .cache
            .clone()
            .ok_or("git templates need a state directory to fetch into".to_string())?;
        let repo = fetch::CachedRepo::new(&cache, parsed.url);
        let locked = self.lock.get(spec).cloned().filter(|_| !self.refresh);
        let commit = match locked {
            Some(commit) => {
                if !repo.has(&commit) {
                    if !self.fetch {
                        return Err(not_fetching(format!(
                            "its pinned commit {} is not in the cache",
                            fetch::printable(&commit)
                        )));
                    }
                    // The pinned commit may no longer be at the ref: fetch everything.
                    repo.fetch_all(parsed.url)?;
                }
                commit
            }
            None => {
                if !self.fetch {
                    return Err(not_fetching(
                        "it is not pinned in clusterfile.lock yet".to_string(),
                    ));
                }
                let commit = repo.fetch_ref(parsed.url, parsed.reference)?;
                self.lock.insert(spec.to_string(), commit.clone());
                self.lock_changed = true;
                commit
            }
        };
        Ok(repo.read(&commit, parsed.path)?)
    }

    /// Reads a lock file (`[git]` table of spec = commit); a missing file is an empty lock. A pin
    /// that is not a full commit id is refused: it would reach git's command line.
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
        if let Some((spec, entry)) = lock
            .git
            .iter()
            .find(|(_, e)| !fetch::is_commit_id(&e.commit))
        {
            return Err(format!(
                "{}: `{}` is pinned to `{}`, which is not a full commit id",
                path.display(),
                fetch::printable(spec),
                fetch::printable(&entry.commit)
            ));
        }
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
    fn load(
        &mut self,
        spec: &str,
        from_dir: &Path,
    ) -> Result<(String, String, PathBuf), LoadError> {
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
                .ok_or_else(|| format!("the run recorded no template `{name}`").into());
        }
        let (text, dir) = if let Some(b) = spec.strip_prefix("builtin:") {
            let builtin = crate::library::find(b).ok_or_else(|| {
                format!(
                    "no built-in template `{}` (there are: {})",
                    fetch::printable(b),
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
            let root = self
                .root
                .get_or_insert_with(|| confine::confinement_root(from_dir))
                .clone();
            let path = from_dir.join(spec);
            let text = read_confined(&path, &root)?;
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

/// Why a parsed file is not a template, if it is not: it must be valid TOML or KDL and say
/// `version` at its top, as every workflow file does.
fn not_a_template(
    tree: Option<&Node>,
    syntax_errors: &[Diagnostic],
    file: &SourceFile,
    format: Format,
) -> Option<String> {
    let syntax = match format {
        Format::Toml => "TOML",
        Format::Kdl => "KDL",
    };
    if let Some(first) = syntax_errors.first() {
        return Some(format!(
            "it is not valid {syntax} (first error at {})",
            place(file, first.span)
        ));
    }
    let declares_version = tree.is_some_and(|t| match &t.value {
        NodeValue::Table(entries) => entries
            .iter()
            .any(|(k, v)| k.name == "version" && matches!(v.value, NodeValue::Integer(_))),
        _ => false,
    });
    (!declares_version).then(|| format!("it has no `version` at its top (read as {syntax})"))
}

/// Task ids go into git ref names and ref-update scripts, so every id of every file obeys one
/// rule: a template's own ids as the clusterfile's (embedded, each is one `.`-separated part of
/// `<id>.<task>`). The clusterfile's ids are checked when the workflow is resolved, except those
/// of tasks that use a template, which are checked here as they become embedded ids.
fn check_ids(raw: &RawClusterfile, file: Option<&SourceFile>, diags: &mut Vec<Diagnostic>) {
    for (id, task) in &raw.tasks {
        if (file.is_some() || task.use_.is_some()) && !TaskId::is_valid(id) {
            let d = Diagnostic::error(
                Category::InvalidValue,
                "invalid-id",
                format!("invalid task id `{}`", fetch::printable(id)),
            )
            .at(task.id_span, "not a valid id")
            .help(super::workflow::ID_RULE);
            diags.push(match file {
                Some(f) => d.in_file(f),
                None => d,
            });
        }
    }
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
    check_ids(raw, file, diags);
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
                    error("template-source", format!("cannot use `{}`: {}", fetch::printable(&spec.value), e.message), spec.span, "this template", file)
                        .help(e.help.unwrap_or_else(|| "a template is `./path.toml` (inside this repository, relative to this file), `builtin:<name>` (`ccluster templates`), or `git+<url>#<ref>:<path>`".into())),
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
        // A file that is not a workflow file is never quoted: it may be anything the spec could
        // name (an environment file, a key), and its excerpt would print it. Only its position
        // is told.
        if let Some(why) = not_a_template(tree.as_ref(), &syntax_errors, &tfile, format) {
            diags.push(
                error(
                    "template-invalid",
                    format!("`{}` is not a template: {why}", fetch::printable(&name)),
                    spec.span,
                    "used here",
                    file,
                )
                .help(if spec.value.starts_with("builtin:") || spec.value.starts_with("git+") {
                    "a template is a workflow file: `version = 1` at its top, then its tables; its text is not shown here".to_string()
                } else {
                    format!("a template is a workflow file: `version = 1` at its top, then its tables; its text is not shown here (to see its own errors: `ccluster validate {}`)", fetch::printable(&name))
                }),
            );
            raw.tasks.insert(id, outputs);
            continue;
        }
        let mut tdiags = syntax_errors;
        let mut traw = match tree {
            Some(tree) if tdiags.is_empty() => decode::decode(&tree, &mut tdiags),
            _ => RawClusterfile::default(),
        };
        // Secrets are the using clusterfile's: its tasks' `secrets` name those.
        if let Some(secret) = traw.secrets.values().next() {
            tdiags.push(
                Diagnostic::warning(
                    crate::diagnostic::Category::InvalidValue,
                    "ignored-key",
                    format!("template `{name}` declares `[secrets]`, which are not read"),
                )
                .at(secret.name_span, "ignored")
                .help("declare secrets in the clusterfile that uses the template; its tasks' `secrets` name those"),
            );
        }
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
