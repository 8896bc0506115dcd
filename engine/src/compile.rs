//! The compiler driver: source text → syntax tree → raw model → validated workflow → plan, with every
//! problem collected along the way.

use std::path::Path;

use crate::diagnostic::{Diagnostic, Diagnostics, SourceFile};
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
    let mut diags = Vec::new();
    let (tree, syntax_errors) = syntax::parse(&source.text, format);
    diags.extend(syntax_errors);
    let raw = tree
        .as_ref()
        .map(|t| decode::decode(t, &mut diags))
        .unwrap_or_default();
    let workflow = workflow::resolve(&raw, &source.text, base_dir, &mut diags);

    let mut all = Diagnostics::default();
    let has_errors = diags.iter().any(Diagnostic::is_error);
    all.extend(diags);
    if has_errors {
        return Err(all.into_sorted());
    }

    let mut plan_diags = Vec::new();
    let values = plan::inputs::resolve(&workflow, args, stage == Stage::Plan, &mut plan_diags);
    let plan = plan::build(&workflow, &values, &mut plan_diags);
    all.extend(plan_diags);
    if all.has_errors() {
        return Err(all.into_sorted());
    }
    Ok(Compiled {
        workflow,
        plan,
        warnings: all.into_sorted(),
    })
}

/// Reads and compiles a clusterfile from disk; the format follows the extension.
pub fn compile_file(
    path: &Path,
    display_name: &str,
    args: &InputArgs,
    stage: Stage,
) -> std::io::Result<(SourceFile, Result<Compiled, Vec<Diagnostic>>)> {
    let text = std::fs::read_to_string(path)?;
    let source = SourceFile::new(display_name, text);
    let base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let result = compile(&source, Format::from_path(path), &base_dir, args, stage);
    Ok((source, result))
}
