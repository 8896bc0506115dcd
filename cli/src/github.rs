//! GitHub Actions mode of the CLI (`GITHUB_ACTIONS=true`): annotations for diagnostics and failed
//! tasks, the failed task's log in a collapsed group, and the run's report in the job summary. The
//! formatting is `ccluster_engine::ci`'s; this module only decides where it is written.

use std::io::Write;
use std::path::{Path, PathBuf};

use ccluster_engine::ci::{self, Annotation, CiMode};
use ccluster_engine::exec::{Event, EventSink};
use ccluster_engine::{Diagnostic, SourceFile};

/// True under GitHub Actions.
pub fn active() -> bool {
    CiMode::detect() == CiMode::GitHubActions
}

/// Where workflow commands go: stdout, which the runner reads, unless stdout carries a JSON
/// document or JSON lines (`-o json`), which a command line would break; then stderr, which the
/// runner reads as well.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

fn write_lines(stream: Stream, lines: &[String]) {
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    // A closed pipe is not worth a panic.
    let _ = match stream {
        Stream::Stdout => std::io::stdout().lock().write_all(text.as_bytes()),
        Stream::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
    };
}

/// The path GitHub wants for a source name: relative to `GITHUB_WORKSPACE`.
fn path_of(name: &str) -> String {
    let cwd = std::env::current_dir().unwrap_or_default();
    let workspace = std::env::var_os("GITHUB_WORKSPACE").map(PathBuf::from);
    ci::annotation_path(name, &cwd, workspace.as_deref())
}

/// Annotations for a compilation's diagnostics; for errors, a section of the job summary too.
pub fn diagnostics(diagnostics: &[Diagnostic], source: &SourceFile, stream: Stream) {
    if !active() || diagnostics.is_empty() {
        return;
    }
    let lines: Vec<String> = ci::diagnostic_annotations(diagnostics, source, &path_of)
        .iter()
        .map(Annotation::to_command)
        .collect();
    write_lines(stream, &lines);
    if diagnostics.iter().any(Diagnostic::is_error) {
        summary(&ci::diagnostics_summary(diagnostics, source));
    }
}

/// An error that stops a command before or outside any task (a locked state, a missing
/// repository, a failed state write), as an annotation of the job.
pub fn error(message: &str, stream: Stream) {
    if !active() {
        return;
    }
    let annotation = Annotation {
        level: Some(ci::Level::Error),
        title: Some("ccluster".into()),
        message: message.to_string(),
        ..Annotation::default()
    };
    write_lines(stream, &[annotation.to_command()]);
}

/// Appends to `$GITHUB_STEP_SUMMARY` when it is set; a failure to is said, never fatal.
pub fn summary(markdown: &str) {
    if !active() {
        return;
    }
    let Some(path) = std::env::var_os("GITHUB_STEP_SUMMARY").filter(|p| !p.is_empty()) else {
        return;
    };
    if let Err(e) = ci::append_step_summary(Path::new(&path), markdown) {
        eprintln!(
            "warning: cannot append to the job summary {}: {e}",
            Path::new(&path).display()
        );
    }
}

/// Wraps the sink `apply` prints through: a task that failed for good gets an annotation and its
/// log's tail in a group, a warning a `::warning`. The wrapped sink's own output is unchanged.
pub struct GitHubEvents<'a> {
    pub inner: &'a mut dyn EventSink,
    /// The state directory: logs are `runs/<run>/logs/<node>.<attempt>.{out,err}`.
    pub state_dir: PathBuf,
    pub stream: Stream,
}

impl GitHubEvents<'_> {
    fn failed(&self, run: &str, task: &str, attempt: u32, class: Option<&str>, message: &str) {
        let mut lines = vec![ci::task_failed(task, class, message).to_command()];
        if attempt > 0 {
            let logs = self.state_dir.join("runs").join(run).join("logs");
            for stream in ["out", "err"] {
                let path = ccluster_engine::exec::log_path(&logs, task, attempt, stream);
                if let Some(tail) = ci::log_tail(&path) {
                    lines.push(ci::group(&format!(
                        "{task} attempt {attempt} std{stream} ({})",
                        path.display()
                    )));
                    lines.push(tail.trim_end_matches('\n').to_string());
                    lines.push(ci::END_GROUP.to_string());
                }
            }
        }
        write_lines(self.stream, &lines);
    }
}

impl EventSink for GitHubEvents<'_> {
    fn emit(&mut self, event: &Event) {
        self.inner.emit(event);
        match event {
            Event::TaskFailed {
                run,
                task,
                attempt,
                class,
                message,
                ..
            } => {
                // The plain lines written so far come first, then the annotation.
                self.inner.flush();
                self.failed(run, task, *attempt, class.map(|c| c.name()), message);
            }
            Event::Warning { task, message, .. } => {
                self.inner.flush();
                write_lines(self.stream, &[ci::task_warning(task, message).to_command()]);
            }
            _ => {}
        }
    }

    fn flush(&mut self) {
        self.inner.flush();
    }
}
