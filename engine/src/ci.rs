//! CI output: GitHub Actions workflow commands (`::error file=...::`, `::group::`) and the job
//! summary, as pure formatting the CLI prints; other CI systems keep the plain timestamped lines.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::diagnostic::{Diagnostic, Severity, SourceFile};

/// How the CLI talks to the CI system it runs under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CiMode {
    /// `GITHUB_ACTIONS=true`: annotations, log groups and the job summary besides the usual output.
    GitHubActions,
    /// Anything else (a terminal, a pipe, `CI=true` of another system): the usual output only.
    Plain,
}

impl CiMode {
    /// From the environment: GitHub sets `GITHUB_ACTIONS=true` in every step, and only there.
    pub fn detect() -> CiMode {
        CiMode::from_var(std::env::var("GITHUB_ACTIONS").ok().as_deref())
    }

    pub fn from_var(github_actions: Option<&str>) -> CiMode {
        match github_actions {
            Some("true") => CiMode::GitHubActions,
            _ => CiMode::Plain,
        }
    }
}

/// The level of a workflow command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Error,
    Warning,
    Notice,
}

impl Level {
    fn command(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warning => "warning",
            Level::Notice => "notice",
        }
    }
}

/// One GitHub annotation: what `::error file=F,line=L,...::message` says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Annotation {
    pub level: Option<Level>,
    pub file: Option<String>,
    pub line: Option<usize>,
    pub col: Option<usize>,
    pub end_line: Option<usize>,
    pub end_column: Option<usize>,
    pub title: Option<String>,
    pub message: String,
}

/// A command's message (the part after `::`): GitHub reads `%`, CR and LF as escapes, so they are
/// escaped, and a multi-line message stays one command.
pub fn escape_data(text: &str) -> String {
    text.replace('%', "%25")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// A property value (`file=`, `title=`): as [`escape_data`], and `:` and `,` too, which would
/// otherwise end the property list or the value.
pub fn escape_property(text: &str) -> String {
    escape_data(text).replace(':', "%3A").replace(',', "%2C")
}

impl Annotation {
    /// The workflow command, one line without its newline.
    pub fn to_command(&self) -> String {
        let mut props = Vec::new();
        if let Some(file) = &self.file {
            props.push(format!("file={}", escape_property(file)));
        }
        let numbers = [
            ("line", self.line),
            ("col", self.col),
            ("endLine", self.end_line),
            ("endColumn", self.end_column),
        ];
        for (name, value) in numbers {
            if let Some(v) = value {
                props.push(format!("{name}={v}"));
            }
        }
        if let Some(title) = &self.title {
            props.push(format!("title={}", escape_property(title)));
        }
        let level = self.level.unwrap_or(Level::Error).command();
        let props = if props.is_empty() {
            String::new()
        } else {
            format!(" {}", props.join(","))
        };
        format!("::{level}{props}::{}", escape_data(&self.message))
    }
}

/// Where GitHub looks for an annotated file: a path relative to the repository's checkout
/// (`GITHUB_WORKSPACE`). `name` is the clusterfile's path as typed, relative to `cwd`.
pub fn annotation_path(name: &str, cwd: &Path, workspace: Option<&Path>) -> String {
    let path = Path::new(name);
    let absolute: PathBuf = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    let absolute = normalize(&absolute);
    match workspace.map(normalize) {
        Some(ws) => match absolute.strip_prefix(&ws) {
            Ok(rel) => rel.display().to_string(),
            Err(_) => name.to_string(),
        },
        None => name
            .strip_prefix("./")
            .map(str::to_string)
            .unwrap_or_else(|| name.to_string()),
    }
}

/// `a/./b/../c` → `a/c`, without touching the file system (the file may be a template's name).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// One annotation per diagnostic, pointing at its span (the file it is in: the clusterfile, or
/// the template it names). `path_of` turns a source name into the path GitHub wants.
pub fn diagnostic_annotations(
    diagnostics: &[Diagnostic],
    source: &SourceFile,
    path_of: &dyn Fn(&str) -> String,
) -> Vec<Annotation> {
    diagnostics
        .iter()
        .map(|d| {
            let file = d.file.as_ref().unwrap_or(source);
            let (start, end) = match d.span {
                Some(span) => (
                    Some(file.line_col(span.start)),
                    Some(file.line_col(span.end)),
                ),
                None => (None, None),
            };
            let mut message = d.message.clone();
            if !d.label.is_empty() {
                message.push_str(&format!(" ({})", d.label));
            }
            if let Some(help) = &d.help {
                message.push_str(&format!("\nhelp: {help}"));
            }
            Annotation {
                level: Some(match d.severity {
                    Severity::Error => Level::Error,
                    Severity::Warning => Level::Warning,
                }),
                // Builtins (`builtin:docs`) and recorded names are not files in the checkout.
                file: (!file.name.contains(':') || Path::new(&file.name).exists())
                    .then(|| path_of(&file.name)),
                line: start.map(|(l, _)| l),
                col: start.map(|(_, c)| c),
                end_line: end.map(|(l, _)| l),
                end_column: end.map(|(_, c)| c),
                title: Some(format!("ccluster: {}", d.code)),
                message,
            }
        })
        .collect()
}

/// The annotation of a task that failed for good: `title=task <node> failed (<class>)`.
pub fn task_failed(node: &str, class: Option<&str>, message: &str) -> Annotation {
    Annotation {
        level: Some(Level::Error),
        title: Some(format!("task {node} failed ({})", class.unwrap_or("error"))),
        message: message.to_string(),
        ..Annotation::default()
    }
}

/// A warning the run reported about a task.
pub fn task_warning(node: &str, message: &str) -> Annotation {
    Annotation {
        level: Some(Level::Warning),
        title: Some(format!("task {node}")),
        message: message.to_string(),
        ..Annotation::default()
    }
}

/// Opens a collapsed group in the job's log; [`END_GROUP`] closes it. Groups do not nest.
pub fn group(title: &str) -> String {
    format!("::group::{}", escape_data(title))
}

pub const END_GROUP: &str = "::endgroup::";

/// At most this much of a log is printed in a failed task's group: the end, where the error is.
pub const LOG_TAIL_BYTES: u64 = 64 * 1024;

/// The last [`LOG_TAIL_BYTES`] of a log file, from a line start; `None` when it does not exist.
/// A line that reads as a workflow command (`::...`) is printed as text, not obeyed: the task's
/// output must not forge annotations or end the group.
pub fn log_tail(path: &Path) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let skipped = len.saturating_sub(LOG_TAIL_BYTES);
    file.seek(SeekFrom::Start(skipped)).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    // Cut in the middle of a line: start at the next one.
    let start = match skipped {
        0 => 0,
        _ => bytes.iter().position(|b| *b == b'\n').map_or(0, |i| i + 1),
    };
    let text = String::from_utf8_lossy(&bytes[start..]);
    let mut out = String::new();
    let dropped = skipped + start as u64;
    if dropped > 0 {
        out.push_str(&format!("[... {dropped} bytes before this]\n"));
    }
    for line in text.lines() {
        out.push_str(&defang(line));
        out.push('\n');
    }
    Some(out)
}

/// A line printed inside a group that GitHub would otherwise read as a command.
fn defang(line: &str) -> String {
    match line.trim_start().starts_with("::") {
        true => format!(" {line}"),
        false => line.to_string(),
    }
}

/// Appends `markdown` to the job summary file (`$GITHUB_STEP_SUMMARY`): several steps (and
/// several commands in one step) each add their part.
pub fn append_step_summary(path: &Path, markdown: &str) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(markdown.as_bytes())?;
    if !markdown.ends_with('\n') {
        file.write_all(b"\n")?;
    }
    Ok(())
}

/// The job summary's part for a clusterfile that did not compile: no run, so no report, but the
/// problems are listed where people look first.
pub fn diagnostics_summary(diagnostics: &[Diagnostic], source: &SourceFile) -> String {
    let mut out = format!("## ccluster: `{}` is not valid\n\n", source.name);
    for d in diagnostics {
        let file = d.file.as_ref().unwrap_or(source);
        let at = match d.span {
            Some(span) => {
                let (line, col) = file.line_col(span.start);
                format!("{}:{line}:{col}", file.name)
            }
            None => file.name.clone(),
        };
        let kind = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        out.push_str(&format!(
            "- **{kind}** `{}` at `{at}`: {}\n",
            d.code,
            d.message.replace('\n', " ")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::{Category, Span};

    #[test]
    fn data_escapes_percent_and_line_breaks_only() {
        assert_eq!(
            escape_data("50% done\r\nnext: a,b"),
            "50%25 done%0D%0Anext: a,b"
        );
    }

    #[test]
    fn properties_also_escape_colon_and_comma() {
        assert_eq!(escape_property("a:b,c%\n"), "a%3Ab%2Cc%25%0A");
    }

    #[test]
    fn an_annotation_lists_only_the_properties_it_has() {
        let full = Annotation {
            level: Some(Level::Error),
            file: Some("ci/cluster, file.toml".into()),
            line: Some(3),
            col: Some(5),
            end_line: Some(3),
            end_column: Some(9),
            title: Some("ccluster: unknown-key".into()),
            message: "unknown key `promt`\nhelp: did you mean `prompt`?".into(),
        };
        assert_eq!(
            full.to_command(),
            "::error file=ci/cluster%2C file.toml,line=3,col=5,endLine=3,endColumn=9,\
             title=ccluster%3A unknown-key::unknown key `promt`%0Ahelp: did you mean `prompt`?"
        );
        let bare = Annotation {
            level: Some(Level::Warning),
            message: "m".into(),
            ..Annotation::default()
        };
        assert_eq!(bare.to_command(), "::warning::m");
    }

    #[test]
    fn a_failed_task_is_titled_with_its_node_and_class() {
        assert_eq!(
            task_failed("build[2]", Some("exit_code"), "exited with 1").to_command(),
            "::error title=task build[2] failed (exit_code)::exited with 1"
        );
    }

    #[test]
    fn diagnostics_point_at_their_span_from_one() {
        let source = SourceFile::new("clusterfile.toml", "version = 1\n[task.a]\npromt = \"x\"\n");
        let d = Diagnostic::error(Category::UnknownKey, "unknown-key", "unknown key `promt`")
            .at(Span::new(21, 26), "here")
            .help("did you mean `prompt`?");
        let got = diagnostic_annotations(&[d], &source, &|n| n.to_string());
        assert_eq!(
            got[0].to_command(),
            "::error file=clusterfile.toml,line=3,col=1,endLine=3,endColumn=6,\
             title=ccluster%3A unknown-key::unknown key `promt` (here)%0Ahelp: did you mean `prompt`?"
        );
        let summary = diagnostics_summary(
            &[Diagnostic::warning(Category::Input, "w", "two\nlines")],
            &source,
        );
        assert!(summary.contains("- **warning** `w` at `clusterfile.toml`: two lines"));
    }

    #[test]
    fn paths_are_relative_to_the_checkout() {
        let ws = Path::new("/home/runner/work/repo/repo");
        assert_eq!(
            annotation_path("clusterfile.toml", &ws.join("ci"), Some(ws)),
            "ci/clusterfile.toml"
        );
        assert_eq!(
            annotation_path("../x.toml", &ws.join("ci"), Some(ws)),
            "x.toml"
        );
        assert_eq!(
            annotation_path("/elsewhere/c.toml", ws, Some(ws)),
            "/elsewhere/c.toml"
        );
        assert_eq!(annotation_path("./c.toml", ws, None), "c.toml");
    }

    #[test]
    fn only_github_actions_gets_workflow_commands() {
        assert_eq!(CiMode::from_var(Some("true")), CiMode::GitHubActions);
        assert_eq!(CiMode::from_var(Some("false")), CiMode::Plain);
        assert_eq!(CiMode::from_var(None), CiMode::Plain);
    }

    #[test]
    fn a_log_tail_cannot_forge_commands_and_starts_at_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.1.err");
        std::fs::write(&path, "ok\n::endgroup::\n::error::forged\n").unwrap();
        assert_eq!(
            log_tail(&path).unwrap(),
            "ok\n ::endgroup::\n ::error::forged\n"
        );
        let long = format!("{}\nlast line\n", "x".repeat(LOG_TAIL_BYTES as usize + 10));
        std::fs::write(&path, long).unwrap();
        let tail = log_tail(&path).unwrap();
        assert!(
            tail.starts_with(&format!(
                "[... {} bytes before this]\nlast line\n",
                LOG_TAIL_BYTES + 11
            )),
            "{tail:.60}"
        );
        assert!(tail.ends_with("last line\n"));
        assert!(log_tail(&dir.path().join("none")).is_none());
    }

    #[test]
    fn the_summary_is_appended_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("summary.md");
        append_step_summary(&path, "# one").unwrap();
        append_step_summary(&path, "# two\n").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "# one\n# two\n");
    }
}
