//! The shipped workflows from the command line: `templates` lists them, `init` starts a
//! clusterfile from one.

/// Prints a line to stdout; a closed pipe (`ccluster doctor | head -1`) ends the output quietly
/// instead of panicking like `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

use std::io::Write;
use std::path::Path;

use ccluster_engine::library::{self, BUILTINS};

use crate::exit;

pub fn list(json: bool) -> u8 {
    let mut out = std::io::stdout().lock();
    if json {
        let list: Vec<serde_json::Value> = BUILTINS
            .iter()
            .map(|b| {
                let s = ccluster_engine::compile::summary(b);
                let inputs: serde_json::Map<String, serde_json::Value> = s
                    .inputs
                    .iter()
                    .map(|(name, decl)| {
                        (
                            name.clone(),
                            serde_json::json!({
                                "type": decl.ty.name(),
                                "required": decl.required,
                                "default": decl.default,
                                "description": decl.description,
                            }),
                        )
                    })
                    .collect();
                serde_json::json!({
                    "name": b.name,
                    "use": format!("builtin:{}", b.name),
                    "description": s.description,
                    "inputs": inputs,
                })
            })
            .collect();
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&list).unwrap_or_default()
        );
        return exit::SUCCESS;
    }
    for b in BUILTINS {
        let s = ccluster_engine::compile::summary(b);
        let _ = writeln!(out, "{:<17} {}", b.name, s.description);
        for (name, decl) in &s.inputs {
            let value = match (&decl.default, decl.required) {
                (Some(d), _) => format!("default {d}"),
                (None, true) => "required".to_string(),
                (None, false) => "optional".to_string(),
            };
            let _ = writeln!(
                out,
                "{:<17}   --var {name}=<{}>  {value}{}",
                "",
                decl.ty.name(),
                decl.description
                    .as_deref()
                    .map(|d| format!(": {d}"))
                    .unwrap_or_default()
            );
        }
    }
    let _ = writeln!(
        out,
        "\nStart from one: `ccluster init --template NAME`; the goal driver: `ccluster run --goal \"...\"`."
    );
    exit::SUCCESS
}

/// A minimal clusterfile: one shell task, commented, to grow from.
const MINIMAL: &str = r#"# A clusterfile: tasks (agent sessions, shell commands, merges) and what each needs.
# Reference: docs/clusterfile.md. Editor support: `ccluster schema > clusterfile.schema.json`.
version = 1

[workflow]
name = "my-workflow"

[tasks.hello]
run = "echo hello from ccluster"

# An agent task works in a git worktree of its own and leaves a commit
# (`git for-each-ref refs/ccluster/runs/` lists them):
# [tasks.readme]
# prompt = "Improve the README's first paragraph."
"#;

pub fn init(dir: &Path, template: Option<&str>, force: bool) -> u8 {
    let text = match template {
        None => MINIMAL.to_string(),
        Some(name) => match library::find(name) {
            Some(b) => b.as_user_file(),
            None => {
                eprintln!("error: no built-in template `{name}`");
                eprintln!(
                    "  help: `ccluster templates` lists them: {}",
                    BUILTINS
                        .iter()
                        .map(|b| b.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return exit::INVALID_INPUT;
            }
        },
    };
    let path = dir.join("clusterfile.toml");
    if path.exists() && !force {
        eprintln!("error: {} exists already", path.display());
        eprintln!("  help: pass --force to replace it");
        return exit::INVALID_INPUT;
    }
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("error: cannot write {}: {e}", path.display());
        return exit::INVALID_INPUT;
    }
    // Run state never belongs in the repository.
    let ignore = dir.join(".gitignore");
    let current = std::fs::read_to_string(&ignore).unwrap_or_default();
    if !current
        .lines()
        .any(|l| l.trim() == ".ccluster/" || l.trim() == ".ccluster")
    {
        let mut text = current.clone();
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(".ccluster/\n");
        if let Err(e) = std::fs::write(&ignore, text) {
            eprintln!("error: cannot write {}: {e}", ignore.display());
            return exit::INVALID_INPUT;
        }
    }
    out!("wrote {} (and .ccluster/ in .gitignore)", path.display());
    out!("next:");
    out!("  ccluster validate            # check it");
    out!("  ccluster plan                # see the tasks it makes");
    out!("  ccluster apply --rehearse    # run it against the scripted model: free, no key");
    out!("  ccluster apply               # run it for real");
    exit::SUCCESS
}

/// The CI systems `init --ci` writes a pipeline for.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CiSystem {
    Github,
    Gitlab,
}

/// The shipped pipelines (`workflows/ci/`), inside the binary.
const GITHUB_WORKFLOW: &str = include_str!("../../workflows/ci/github.yml");
const GITLAB_PIPELINE: &str = include_str!("../../workflows/ci/gitlab-ci.yml");

/// `init --ci`: the pipeline, written at the top of the repository `dir` is in (where GitHub and
/// GitLab look), naming the clusterfile of `dir` by its path from there.
pub fn init_ci(dir: &Path, system: CiSystem, force: bool) -> u8 {
    let top = match ccluster_engine::workspace::Repo::discover(dir) {
        Ok(repo) => repo.root,
        Err(e) => {
            eprintln!("error: {} is not in a git repository: {e}", dir.display());
            eprintln!("  help: CI runs a repository's pipeline; run `git init` first");
            return exit::INVALID_INPUT;
        }
    };
    let here = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let clusterfile = match here.strip_prefix(&top) {
        Ok(rel) if !rel.as_os_str().is_empty() => {
            format!("{}/clusterfile.toml", rel.display())
        }
        _ => "clusterfile.toml".to_string(),
    };
    let (template, path) = match system {
        CiSystem::Github => (GITHUB_WORKFLOW, top.join(".github/workflows/ccluster.yml")),
        CiSystem::Gitlab => (GITLAB_PIPELINE, top.join(".gitlab-ci.yml")),
    };
    let text = template.replace("clusterfile.toml", &clusterfile);
    if path.exists() && !force {
        if system == CiSystem::Gitlab {
            // A project has one .gitlab-ci.yml: the job is for the user to merge into it.
            eprintln!(
                "{} exists already: add this job to it (or pass --force to replace it)",
                path.display()
            );
            let _ = std::io::stdout().lock().write_all(text.as_bytes());
            return exit::SUCCESS;
        }
        eprintln!("error: {} exists already", path.display());
        eprintln!("  help: pass --force to replace it");
        return exit::INVALID_INPUT;
    }
    if let Some(parent) = path.parent() {
        if let Err(e) = std::fs::create_dir_all(parent) {
            eprintln!("error: cannot create {}: {e}", parent.display());
            return exit::INVALID_INPUT;
        }
    }
    if let Err(e) = std::fs::write(&path, text) {
        eprintln!("error: cannot write {}: {e}", path.display());
        return exit::INVALID_INPUT;
    }
    out!("wrote {} (applies {clusterfile})", path.display());
    out!("next:");
    out!("  set the ANTHROPIC_API_KEY secret of the repository (agents need it)");
    out!("  commit it; docs/ci.md explains the state it keeps between jobs");
    exit::SUCCESS
}
