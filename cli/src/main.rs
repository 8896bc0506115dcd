//! `ccluster`: the command line. Thin by design: arguments, rendering and exit codes; all logic
//! lives in `ccluster-engine`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use ccluster_engine::plan::{self, InputArgs};
use ccluster_engine::{compile_file, render, Diagnostic, SourceFile, Stage};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Exit codes, as documented in the README.
mod exit {
    pub const SUCCESS: u8 = 0;
    /// A task failed (used by `apply`).
    #[allow(dead_code)]
    pub const TASK_FAILED: u8 = 1;
    /// The clusterfile or the command line is invalid.
    pub const INVALID_INPUT: u8 = 2;
    /// The run was cancelled (Ctrl-C).
    #[allow(dead_code)]
    pub const CANCELLED: u8 = 130;
}

#[derive(Parser)]
#[command(
    name = "ccluster",
    version,
    about = "Run Claude Code as a coding cluster from a clusterfile",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a clusterfile and report every problem found.
    Validate {
        #[command(flatten)]
        file: FileArgs,
        /// How to print diagnostics.
        #[arg(long, value_enum, default_value_t = DiagnosticFormat::Human)]
        format: DiagnosticFormat,
    },
    /// Compile a clusterfile into its execution plan and print it.
    Plan {
        #[command(flatten)]
        file: FileArgs,
        #[arg(long, value_enum, default_value_t = PlanFormat::Text)]
        format: PlanFormat,
    },
    /// Print the JSON Schema of the clusterfile format.
    Schema,
}

#[derive(Args)]
struct FileArgs {
    /// The clusterfile (`.toml`, or `.kdl` by extension).
    #[arg(default_value = "clusterfile.toml")]
    file: PathBuf,
    /// Set an input: `--var name=value` (lists and objects as JSON).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// Read input values from a TOML or JSON file.
    #[arg(long = "vars", value_name = "FILE")]
    vars_files: Vec<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum PlanFormat {
    Text,
    Json,
    Dot,
    Mermaid,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DiagnosticFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Validate { file, format } => validate(&file, format),
        Command::Plan { file, format } => plan_command(&file, format),
        Command::Schema => {
            print(&ccluster_engine::schema::clusterfile_schema());
            exit::SUCCESS
        }
    };
    ExitCode::from(code)
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`ccluster plan | head`) is not an error worth a panic.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Diagnostics for a person on stderr: colored on a terminal unless `NO_COLOR` is set.
fn human(diagnostics: &[Diagnostic], source: &SourceFile) -> String {
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    render::human(diagnostics, source, color)
}

fn input_args(file: &FileArgs) -> Result<InputArgs, String> {
    let mut args = InputArgs::default();
    for path in &file.vars_files {
        args.load_file(path)?;
    }
    for pair in &file.vars {
        args.push_pair(pair)?;
    }
    Ok(args)
}

/// Compiles, printing diagnostics; returns the compilation when it has no errors.
fn compile(
    file: &FileArgs,
    stage: Stage,
    format: DiagnosticFormat,
) -> Result<(SourceFile, ccluster_engine::Compiled), u8> {
    let args = input_args(file).map_err(|e| {
        eprintln!("error: {e}");
        exit::INVALID_INPUT
    })?;
    let name = file.file.display().to_string();
    let (source, result) = compile_file(&file.file, &name, &args, stage).map_err(|e| {
        eprintln!("error: cannot read `{name}`: {e}");
        if e.kind() == std::io::ErrorKind::NotFound {
            eprintln!(
                "  help: run it in a directory with a clusterfile.toml, or pass the file's path"
            );
        }
        exit::INVALID_INPUT
    })?;
    match result {
        Ok(compiled) => {
            if format == DiagnosticFormat::Human {
                eprint!("{}", human(&compiled.warnings, &source));
            }
            Ok((source, compiled))
        }
        Err(diagnostics) => {
            match format {
                DiagnosticFormat::Human => {
                    eprint!("{}", human(&diagnostics, &source))
                }
                DiagnosticFormat::Json => print(&render::json(&diagnostics, &source)),
            }
            Err(exit::INVALID_INPUT)
        }
    }
}

fn validate(file: &FileArgs, format: DiagnosticFormat) -> u8 {
    match compile(file, Stage::Validate, format) {
        Ok((source, c)) => {
            match format {
                DiagnosticFormat::Human => print(&format!(
                    "{}: valid ({} tasks, {} plan nodes)\n",
                    file.file.display(),
                    c.plan.summary.tasks,
                    c.plan.summary.nodes
                )),
                DiagnosticFormat::Json => {
                    print(&render::json(&c.warnings, &source));
                }
            }
            exit::SUCCESS
        }
        Err(code) => code,
    }
}

fn plan_command(file: &FileArgs, format: PlanFormat) -> u8 {
    match compile(file, Stage::Plan, DiagnosticFormat::Human) {
        Ok((_, c)) => {
            print(&match format {
                PlanFormat::Text => plan::to_text(&c.plan),
                PlanFormat::Json => plan::to_json(&c.plan),
                PlanFormat::Dot => plan::to_dot(&c.plan),
                PlanFormat::Mermaid => plan::to_mermaid(&c.plan),
            });
            exit::SUCCESS
        }
        Err(code) => code,
    }
}
