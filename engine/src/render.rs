//! Rendering diagnostics for people (miette, with source excerpts and carets) and for tools (JSON).

use miette::{GraphicalReportHandler, GraphicalTheme};

use crate::diagnostic::{Diagnostic, Report, Severity, SourceFile};

/// Every diagnostic with its excerpt, then a one-line count.
pub fn human(diagnostics: &[Diagnostic], source: &SourceFile, color: bool) -> String {
    if diagnostics.is_empty() {
        return String::new();
    }
    let theme = if color {
        GraphicalTheme::unicode()
    } else {
        GraphicalTheme::unicode_nocolor()
    };
    let handler = GraphicalReportHandler::new_themed(theme)
        .with_width(100)
        .with_links(false);
    let mut out = String::new();
    for d in diagnostics {
        let report = Report::new(d, d.file.as_ref().unwrap_or(source));
        let kind = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        out.push_str(&format!(
            "{kind}[{}]: {}: {}\n",
            d.code,
            report.location(),
            d.message
        ));
        if handler.render_report(&mut out, &report).is_err() {
            out.push_str("  (could not render the source excerpt)\n");
        }
        out.push('\n');
    }
    let errors = diagnostics.iter().filter(|d| d.is_error()).count();
    let warnings = diagnostics.len() - errors;
    let plural = |n: usize, w: &str| format!("{n} {w}{}", if n == 1 { "" } else { "s" });
    if errors > 0 {
        out.push_str(&format!(
            "{}: {} found, {}\n",
            source.name,
            plural(errors, "error"),
            plural(warnings, "warning")
        ));
    }
    out
}

/// One JSON document: `{"diagnostics": [{severity, code, message, file, line, column, ...}]}`,
/// pretty-printed.
pub fn json(diagnostics: &[Diagnostic], source: &SourceFile) -> String {
    let mut text =
        serde_json::to_string_pretty(&json_value(diagnostics, source)).unwrap_or_default();
    text.push('\n');
    text
}

/// The document [`json`] prints.
pub fn json_value(diagnostics: &[Diagnostic], source: &SourceFile) -> serde_json::Value {
    let items: Vec<serde_json::Value> = diagnostics
        .iter()
                .map(|d| {
            let source = d.file.as_ref().unwrap_or(source);
            let (line, column) = d.span.map(|s| source.line_col(s.start)).map_or((None, None), |(l, c)| (Some(l), Some(c)));
            serde_json::json!({
                "severity": match d.severity { Severity::Error => "error", Severity::Warning => "warning" },
                "code": d.code,
                "message": d.message,
                "file": source.name,
                "line": line,
                "column": column,
                "label": d.label,
                "help": d.help,
            })
        })
        .collect();
    serde_json::json!({ "diagnostics": items })
}
