//! Diagnostics: every problem the compiler finds, with a span into the source file and a hint.

use std::fmt;
use std::sync::Arc;

use miette::{LabeledSpan, NamedSource, SourceCode};

/// A byte range in a source file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span {
            start,
            end: end.max(start),
        }
    }
}

impl From<std::ops::Range<usize>> for Span {
    fn from(r: std::ops::Range<usize>) -> Self {
        Span::new(r.start, r.end)
    }
}

/// Where a diagnostic sorts in a report: the order the reference promises (syntax errors first, then
/// unknown keys, wrong types, ...). Within a category, diagnostics sort by position in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Category {
    Syntax,
    UnknownKey,
    WrongType,
    InvalidValue,
    DuplicateId,
    UnknownNeed,
    Cycle,
    TaskKind,
    Template,
    Duration,
    OutputSchema,
    MapNotList,
    Input,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

/// A secondary pointer into the source ("first defined here").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub span: Span,
    pub label: String,
}

/// One problem found in a clusterfile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub category: Category,
    /// Stable short code, e.g. `unknown-key`, for tooling and docs.
    pub code: &'static str,
    pub message: String,
    /// Where in the file; `None` for problems that are not in the file (e.g. a missing `--var`).
    pub span: Option<Span>,
    pub label: String,
    pub notes: Vec<Note>,
    pub help: Option<String>,
    /// The file the span points into, when it is not the clusterfile being compiled (a template
    /// it uses).
    pub file: Option<SourceFile>,
}

impl Diagnostic {
    pub fn error(category: Category, code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            category,
            code,
            message: message.into(),
            span: None,
            label: String::new(),
            notes: Vec::new(),
            help: None,
            file: None,
        }
    }

    pub fn warning(category: Category, code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(category, code, message)
        }
    }

    pub fn at(mut self, span: Span, label: impl Into<String>) -> Self {
        self.span = Some(span);
        self.label = label.into();
        self
    }

    pub fn note(mut self, span: Span, label: impl Into<String>) -> Self {
        self.notes.push(Note {
            span,
            label: label.into(),
        });
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    /// Marks the diagnostic as being about `file` (a template), unless it already names one.
    pub fn in_file(mut self, file: &SourceFile) -> Self {
        self.file.get_or_insert_with(|| file.clone());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

/// The text of a clusterfile and the name it is shown under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceFile {
    pub name: String,
    pub text: Arc<str>,
}

impl SourceFile {
    pub fn new(name: impl Into<String>, text: impl Into<Arc<str>>) -> Self {
        SourceFile {
            name: name.into(),
            text: text.into(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(&self.text, offset.min(self.text.len()));
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        (line, col)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Sorts diagnostics into the documented, stable report order (errors first, then by category,
/// then by position) and drops exact repeats.
pub fn in_report_order(mut items: Vec<Diagnostic>) -> Vec<Diagnostic> {
    items.sort_by(|a, b| {
        (a.severity, a.category, a.span.map(|s| s.start), &a.message).cmp(&(
            b.severity,
            b.category,
            b.span.map(|s| s.start),
            &b.message,
        ))
    });
    items.dedup();
    items
}

/// A diagnostic bound to its source, ready for miette's renderer.
pub struct Report<'a> {
    pub diagnostic: &'a Diagnostic,
    pub source: &'a SourceFile,
    named: NamedSource<Arc<str>>,
}

impl<'a> Report<'a> {
    pub fn new(diagnostic: &'a Diagnostic, source: &'a SourceFile) -> Self {
        Report {
            diagnostic,
            source,
            named: NamedSource::new(source.name.clone(), source.text.clone()),
        }
    }

    /// `clusterfile.toml:12:9`, or just the file name when the problem has no position.
    pub fn location(&self) -> String {
        match self.diagnostic.span {
            Some(span) => {
                let (line, col) = self.source.line_col(span.start);
                format!("{}:{line}:{col}", self.source.name)
            }
            None => self.source.name.clone(),
        }
    }
}

impl fmt::Debug for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.diagnostic, f)
    }
}

impl fmt::Display for Report<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.diagnostic.message)
    }
}

impl std::error::Error for Report<'_> {}

impl miette::Diagnostic for Report<'_> {
    fn severity(&self) -> Option<miette::Severity> {
        Some(match self.diagnostic.severity {
            Severity::Error => miette::Severity::Error,
            Severity::Warning => miette::Severity::Warning,
        })
    }

    fn help<'b>(&'b self) -> Option<Box<dyn fmt::Display + 'b>> {
        self.diagnostic
            .help
            .as_ref()
            .map(|h| Box::new(h) as Box<dyn fmt::Display>)
    }

    fn source_code(&self) -> Option<&dyn SourceCode> {
        self.diagnostic.span.map(|_| &self.named as &dyn SourceCode)
    }

    fn labels(&self) -> Option<Box<dyn Iterator<Item = LabeledSpan> + '_>> {
        let span = self.diagnostic.span?;
        // Spans from parsers may end past the text or inside a character; miette needs neither.
        let text = &self.source.text;
        let clamp = |s: Span| {
            let start = floor_char_boundary(text, s.start.min(text.len()));
            let end = floor_char_boundary(text, s.end.min(text.len())).max(start);
            (start, end - start)
        };
        let (start, len) = clamp(span);
        let label = (!self.diagnostic.label.is_empty()).then(|| self.diagnostic.label.clone());
        let primary = LabeledSpan::new_primary_with_span(label, (start, len));
        let notes = self.diagnostic.notes.iter().map(move |n| {
            let (start, len) = clamp(n.span);
            LabeledSpan::new_with_span(Some(n.label.clone()), (start, len))
        });
        Some(Box::new(std::iter::once(primary).chain(notes)))
    }
}

/// The closest candidate to `name`, for "did you mean" hints.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_characters_from_one() {
        let src = SourceFile::new("f.toml", "ab\ncdé\nf");
        assert_eq!(src.line_col(0), (1, 1));
        assert_eq!(src.line_col(4), (2, 2));
        assert_eq!(src.line_col(8), (3, 1));
        assert_eq!(src.line_col(999), (3, 2));
    }

    #[test]
    fn did_you_mean_finds_close_names_only() {
        assert_eq!(did_you_mean("promt", ["prompt", "run"]), Some("prompt"));
        assert_eq!(did_you_mean("zzz", ["prompt", "run"]), None);
    }
}
