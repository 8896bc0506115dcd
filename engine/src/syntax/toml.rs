//! TOML → [`Node`], keeping spans and recovering from syntax errors so all of them are reported.

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::depth;
use super::node::{Key, Node, NodeValue};
use crate::diagnostic::{Category, Diagnostic, Span};

pub fn parse(text: &str) -> (Option<Node>, Vec<Diagnostic>) {
    let (table, errors) = DeTable::parse_recoverable(text);
    // The parser stops arrays, inline tables and dotted keys at its own depth (80); what it built
    // up to there is measured against the clusterfile's limit below instead, with one diagnostic.
    let (too_deep, errors): (Vec<_>, Vec<_>) = errors.iter().partition(|e| {
        let m = e.message();
        m.contains("recurse further") || m.contains("recursion limit")
    });
    let mut diagnostics: Vec<Diagnostic> = errors
        .into_iter()
        .map(|e| {
            let span = e.span().map(Span::from).unwrap_or_default();
            let message = e.message().trim().to_string();
            let first_line = message.lines().next().unwrap_or("invalid TOML").to_string();
            let d = Diagnostic::error(Category::Syntax, "toml-syntax", format!("TOML syntax error: {first_line}"))
                .at(span, first_line.clone());
            if first_line.contains("duplicate key") {
                d.help("each key, and each `[tasks.<id>]` table, may appear only once; task ids must be unique")
            } else {
                d.help("see the TOML reference at https://toml.io/en/v1.0.0")
            }
        })
        .collect();
    let span = Span::from(table.span());
    let root = Node::new(lower_table(table.get_ref()), span);
    match depth::check(&root) {
        Some(d) => diagnostics.push(d),
        None => diagnostics.extend(
            too_deep
                .first()
                .map(|e| depth::too_deep(e.span().map(Span::from).unwrap_or_default())),
        ),
    }
    (Some(root), diagnostics)
}

fn lower_table(table: &DeTable<'_>) -> NodeValue {
    NodeValue::Table(
        table
            .iter()
            .map(|(k, v)| {
                (
                    Key {
                        name: k.get_ref().to_string(),
                        span: k.span().into(),
                    },
                    lower(v),
                )
            })
            .collect(),
    )
}

fn lower(value: &Spanned<DeValue<'_>>) -> Node {
    let span = Span::from(value.span());
    let v = match value.get_ref() {
        DeValue::String(s) => NodeValue::String(s.to_string()),
        DeValue::Integer(i) => match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
            Ok(n) => NodeValue::Integer(n),
            // Out of i64 range: keep it as a float so the decoder reports a type/range problem.
            Err(_) => NodeValue::Float(f64::INFINITY),
        },
        DeValue::Float(f) => NodeValue::Float(
            f.as_str()
                .replace('_', "")
                .parse::<f64>()
                .unwrap_or(f64::NAN),
        ),
        DeValue::Boolean(b) => NodeValue::Bool(*b),
        DeValue::Datetime(d) => NodeValue::Datetime(d.to_string()),
        DeValue::Array(items) => NodeValue::Array(items.iter().map(lower).collect()),
        DeValue::Table(t) => lower_table(t),
    };
    Node::new(v, span)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_spans_of_keys_and_values() {
        let text = "[tasks.a]\nrun = \"echo\"\n";
        let (root, errors) = parse(text);
        assert!(errors.is_empty());
        let NodeValue::Table(top) = root.unwrap().value else {
            panic!()
        };
        let NodeValue::Table(tasks) = &top[0].1.value else {
            panic!()
        };
        let NodeValue::Table(a) = &tasks[0].1.value else {
            panic!()
        };
        let (key, value) = &a[0];
        assert_eq!(&text[key.span.start..key.span.end], "run");
        assert_eq!(&text[value.span.start..value.span.end], "\"echo\"");
    }

    #[test]
    fn reports_several_syntax_errors() {
        let (_, errors) = parse("a = \nb = = 2\n[x\n");
        assert!(errors.len() >= 2, "{errors:?}");
    }
}
