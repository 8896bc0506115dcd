//! The compiler driver: source text → syntax tree → raw model → validated workflow → plan, with every
//! problem collected along the way.

use std::path::Path;

use crate::diagnostic::{in_report_order, Diagnostic, SourceFile};
use crate::library::Builtin;
use crate::model::workflow::InputDecl;
use crate::model::{decode, workflow, Workflow};
use crate::plan::{self, InputArgs, Plan};
use crate::syntax::{self, Format};

/// How much the compiler requires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Check the file: required inputs may be missing (templates that read them are checked
    /// statically only).
    Validate,
    /// Build a plan to run: every required input must have a value.
    Plan,
}

/// A successful compilation, with its warnings.
#[derive(Debug)]
pub struct Compiled {
    pub workflow: Workflow,
    pub plan: Plan,
    pub warnings: Vec<Diagnostic>,
}

/// Compiles a clusterfile. On failure, returns every diagnostic (errors and warnings) in report
/// order. `base_dir` is the directory relative paths in the file are resolved against.
pub fn compile(
    source: &SourceFile,
    format: Format,
    base_dir: &Path,
    args: &InputArgs,
    stage: Stage,
) -> Result<Compiled, Vec<Diagnostic>> {
    compile_with(
        source,
        format,
        base_dir,
        args,
        stage,
        &mut crate::model::compose::FileLoader::default(),
    )
}

/// [`compile`], with templates (`use = ...`) found by `loader`.
pub fn compile_with(
    source: &SourceFile,
    format: Format,
    base_dir: &Path,
    args: &InputArgs,
    stage: Stage,
    loader: &mut dyn crate::model::compose::Loader,
) -> Result<Compiled, Vec<Diagnostic>> {
    let (tree, syntax_errors) = syntax::parse(&source.text, format);
    // After a syntax error, the recovered tree holds placeholders: checking it would only add
    // follow-on errors that point at the wrong places. Report the syntax errors alone.
    let tree = match tree {
        Some(tree) if syntax_errors.is_empty() => tree,
        _ => return Err(in_report_order(syntax_errors)),
    };
    let has_errors = |diags: &[Diagnostic]| diags.iter().any(Diagnostic::is_error);

    let mut diags = Vec::new();
    let mut raw = decode::decode(&tree, &mut diags);
    // Each stage's input is let go as soon as the next stage has it: with 10,000 tasks each is
    // tens of megabytes.
    drop(tree);
    crate::model::compose::expand(
        &mut raw,
        None,
        base_dir,
        loader,
        &mut vec![source.name.clone()],
        None,
        &mut diags,
    );
    let workflow = workflow::resolve(
        &raw,
        &source.text,
        base_dir,
        args.policy.as_deref(),
        &mut diags,
    );
    drop(raw);
    if has_errors(&diags) {
        return Err(in_report_order(diags));
    }
    let values = plan::inputs::resolve(&workflow, args, stage == Stage::Plan, &mut diags);
    let plan = plan::build(&workflow, &values, &mut diags);
    if has_errors(&diags) {
        return Err(in_report_order(diags));
    }
    Ok(Compiled {
        workflow,
        plan,
        warnings: in_report_order(diags),
    })
}

/// Reads and compiles a clusterfile from disk; the format follows the extension.
pub fn compile_file(
    path: &Path,
    display_name: &str,
    args: &InputArgs,
    stage: Stage,
) -> std::io::Result<(SourceFile, Result<Compiled, Vec<Diagnostic>>)> {
    compile_file_with(
        path,
        display_name,
        args,
        stage,
        &mut crate::model::compose::FileLoader::default(),
    )
}

/// [`compile_file`], with templates found by `loader`.
pub fn compile_file_with(
    path: &Path,
    display_name: &str,
    args: &InputArgs,
    stage: Stage,
    loader: &mut dyn crate::model::compose::Loader,
) -> std::io::Result<(SourceFile, Result<Compiled, Vec<Diagnostic>>)> {
    let text = std::fs::read_to_string(path)?;
    let source = SourceFile::new(display_name, text);
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let result = compile_with(
        &source,
        Format::from_path(path),
        &base_dir,
        args,
        stage,
        loader,
    );
    Ok((source, result))
}

/// What a template is for and the parameters it takes (its `[inputs]`).
pub struct Summary {
    pub description: String,
    pub inputs: Vec<(String, InputDecl)>,
}

/// What a built-in workflow says of itself, from compiling it (empty if it does not compile,
/// which a test rules out).
pub fn summary(builtin: &Builtin) -> Summary {
    let source = SourceFile::new(format!("builtin:{}", builtin.name), builtin.text);
    match compile(
        &source,
        Format::Toml,
        Path::new("."),
        &InputArgs::default(),
        Stage::Validate,
    ) {
        Ok(c) => Summary {
            description: c.workflow.description.clone().unwrap_or_default(),
            inputs: c.workflow.inputs.into_iter().collect(),
        },
        Err(_) => Summary {
            description: String::new(),
            inputs: Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    //! Property tests: whatever the bytes, the compiler returns diagnostics and never panics. The
    //! long coverage-guided run lives in `fuzz/` (cargo fuzz); this is its quick CI counterpart.
    use proptest::prelude::*;

    use super::*;
    use crate::library::{find, BUILTINS};

    const SEEDS: &[&str] = &[
        include_str!("../../workflows/feature-fanout.toml"),
        include_str!("../../workflows/feature-fanout.kdl"),
        include_str!("../../workflows/tests-per-module.toml"),
        include_str!("../../tests/fixtures/kitchen-sink.toml"),
    ];

    fn compile_both(text: &str) {
        let source = SourceFile::new("prop.toml", text);
        for format in [Format::Toml, Format::Kdl] {
            for stage in [Stage::Validate, Stage::Plan] {
                if let Err(diags) = compile(
                    &source,
                    format,
                    Path::new("."),
                    &InputArgs::default(),
                    stage,
                ) {
                    assert!(diags.iter().any(Diagnostic::is_error));
                    let _ = crate::render::human(&diags, &source, false);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,200}") {
            compile_both(&text);
        }

        #[test]
        fn mutated_valid_files_never_panic(seed in 0..SEEDS.len(), edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4, "\\PC{0,6}"), 1..6)) {
            let mut text = SEEDS[seed].to_string();
            for (at, op, insert) in edits {
                let mut i = at.index(text.len() + 1);
                while !text.is_char_boundary(i) { i -= 1; }
                match op {
                    0 => text.insert_str(i, &insert),
                    1 => { let end = (i + insert.len()).min(text.len()); let mut e = end; while !text.is_char_boundary(e) { e -= 1; } text.replace_range(i..e.max(i), ""); }
                    2 => { let line_end = text[i..].find('\n').map_or(text.len(), |n| i + n); text.replace_range(i..line_end, &insert); }
                    _ => { let copy = text[i..].lines().next().unwrap_or("").to_string(); text.insert_str(i, &format!("{copy}\n")); }
                }
            }
            compile_both(&text);
        }
    }

    #[test]
    fn every_builtin_compiles_and_describes_itself() {
        for b in BUILTINS {
            let s = summary(b);
            assert!(!s.description.is_empty(), "{} has no description", b.name);
        }
        assert!(summary(find("goal").unwrap())
            .inputs
            .iter()
            .any(|(n, d)| n == "goal" && d.required));
    }
}
