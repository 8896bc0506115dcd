//! KDL → [`Node`]. The mapping, documented in `docs/clusterfile.md`:
//! a node with children is a table of its children; a node with properties and no arguments is a
//! table of its properties (merged with its children); a node with one argument is that value; with
//! several arguments, a list; a child named `-` is a list element (for lists of tables).

use kdl::{KdlDocument, KdlNode, KdlValue};

use super::depth;
use super::node::{Key, Node, NodeValue};
use crate::diagnostic::{Category, Diagnostic, Span};

pub fn parse(text: &str) -> (Option<Node>, Vec<Diagnostic>) {
    // The KDL parser recurses once per block and would overflow the stack on a deep enough file
    // before it could report anything: the depth is measured on the text first.
    if let Some(at) = too_deep_brace(text, depth::MAX_NESTING) {
        return (None, vec![depth::too_deep(Span::new(at, at + 1))]);
    }
    match text.parse::<KdlDocument>() {
        Ok(doc) => {
            let mut diagnostics = Vec::new();
            let value = lower_document(&doc, text, &mut diagnostics);
            let span = Span::new(0, text.len());
            let root = Node::new(value, span);
            // A node with several arguments is a list one level below its block.
            if let Some(d) = depth::check(&root) {
                return (None, vec![d]);
            }
            (Some(root), diagnostics)
        }
        Err(err) => {
            let mut diagnostics: Vec<Diagnostic> = err
                .diagnostics
                .iter()
                .map(|d| {
                    let span = Span::new(d.span.offset(), d.span.offset() + d.span.len());
                    let message = d
                        .message
                        .clone()
                        .unwrap_or_else(|| "invalid KDL".to_string());
                    let label = d.label.clone().unwrap_or_else(|| message.clone());
                    Diagnostic::error(
                        Category::Syntax,
                        "kdl-syntax",
                        format!("KDL syntax error: {message}"),
                    )
                    .at(span, label)
                    .help(d.help.clone().unwrap_or_else(|| {
                        "see the KDL v2 reference at https://kdl.dev".to_string()
                    }))
                })
                .collect();
            if diagnostics.is_empty() {
                diagnostics.push(
                    Diagnostic::error(Category::Syntax, "kdl-syntax", "KDL syntax error")
                        .at(Span::new(0, text.len()), "not a valid KDL document"),
                );
            }
            (None, diagnostics)
        }
    }
}

/// The offset of the first `{` that opens a block nested deeper than `limit`, found by scanning
/// the text without parsing it. Braces inside strings (quoted, multi-line and raw) and comments
/// (line, nested block) do not count; those inside a `/-` commented-out node do, as the parser
/// still reads them. Bytes are enough: every delimiter is ASCII, which UTF-8 never reuses inside a
/// multi-byte character.
fn too_deep_brace(text: &str, limit: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let starts = |at: usize, s: &[u8]| bytes.get(at..at + s.len()) == Some(s);
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'{' => {
                depth += 1;
                if depth > limit {
                    return Some(i);
                }
                i += 1;
            }
            b'}' => {
                depth = depth.saturating_sub(1);
                i += 1;
            }
            b'/' if starts(i, b"//") => {
                i = bytes[i..]
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(bytes.len(), |n| i + n + 1);
            }
            b'/' if starts(i, b"/*") => {
                let mut open = 0usize;
                while i < bytes.len() {
                    if starts(i, b"/*") {
                        open += 1;
                        i += 2;
                    } else if starts(i, b"*/") {
                        open -= 1;
                        i += 2;
                        if open == 0 {
                            break;
                        }
                    } else {
                        i += 1;
                    }
                }
            }
            b'"' => {
                // A quoted string, or a multi-line one (`"""`); `\` escapes the next character.
                let quote: &[u8] = if starts(i, b"\"\"\"") {
                    b"\"\"\""
                } else {
                    b"\""
                };
                i += quote.len();
                while i < bytes.len() && !starts(i, quote) {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += quote.len();
            }
            b'#' => {
                // A raw string `#"..."#` (any number of `#`, no escapes), or a keyword (`#true`).
                let hashes = bytes[i..].iter().take_while(|&&b| b == b'#').count();
                i += hashes;
                if bytes.get(i) == Some(&b'"') {
                    let mut end = vec![b'"'];
                    end.extend(std::iter::repeat_n(b'#', hashes));
                    i += 1;
                    while i < bytes.len() && !starts(i, &end) {
                        i += 1;
                    }
                    i += end.len();
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The span of a property entry covers `key=value`; diagnostics about the value should point at
/// the value alone (so a template error lands on the exact character).
fn property_value_span(text: &str, entry: Span) -> Span {
    match text.get(entry.start..entry.end).and_then(|s| s.find('=')) {
        Some(eq) => {
            let after = &text[entry.start + eq + 1..entry.end];
            let start = entry.start + eq + 1 + (after.len() - after.trim_start().len());
            Span::new(start, entry.end)
        }
        None => entry,
    }
}

fn span_of(s: miette::SourceSpan) -> Span {
    Span::new(s.offset(), s.offset() + s.len())
}

fn lower_document(doc: &KdlDocument, text: &str, diagnostics: &mut Vec<Diagnostic>) -> NodeValue {
    let nodes = doc.nodes();
    if !nodes.is_empty() && nodes.iter().all(|n| n.name().value() == "-") {
        return NodeValue::Array(
            nodes
                .iter()
                .map(|n| lower_node(n, text, diagnostics))
                .collect(),
        );
    }
    NodeValue::Table(
        nodes
            .iter()
            .map(|n| {
                let key = Key {
                    name: n.name().value().to_string(),
                    span: span_of(n.name().span()),
                };
                (key, lower_node(n, text, diagnostics))
            })
            .collect(),
    )
}

fn lower_value(v: &KdlValue, span: Span) -> Node {
    let value = match v {
        KdlValue::String(s) => NodeValue::String(s.clone()),
        KdlValue::Integer(i) => match i64::try_from(*i) {
            Ok(n) => NodeValue::Integer(n),
            Err(_) => NodeValue::Float(f64::INFINITY),
        },
        KdlValue::Float(f) => NodeValue::Float(*f),
        KdlValue::Bool(b) => NodeValue::Bool(*b),
        KdlValue::Null => NodeValue::Null,
    };
    Node::new(value, span)
}

fn lower_node(node: &KdlNode, text: &str, diagnostics: &mut Vec<Diagnostic>) -> Node {
    let span = span_of(node.span());
    let mut args = Vec::new();
    let mut props = Vec::new();
    for entry in node.entries() {
        let entry_span = span_of(entry.span());
        match entry.name() {
            Some(name) => props.push((
                Key {
                    name: name.value().to_string(),
                    span: span_of(name.span()),
                },
                lower_value(entry.value(), property_value_span(text, entry_span)),
            )),
            None => args.push(lower_value(entry.value(), entry_span)),
        }
    }
    let children = node
        .children()
        .map(|c| lower_document(c, text, diagnostics));

    let mixed = !args.is_empty() && (!props.is_empty() || children.is_some());
    if mixed {
        diagnostics.push(
            Diagnostic::error(
                Category::WrongType,
                "kdl-mixed-node",
                format!("node `{}` mixes arguments with properties or children", node.name().value()),
            )
            .at(span, "arguments and properties/children together")
            .help("write a value as arguments (`key \"value\"`) or a table as properties/children, not both"),
        );
    }
    match (args.len(), children) {
        (_, Some(NodeValue::Array(items))) if props.is_empty() && args.is_empty() => {
            Node::new(NodeValue::Array(items), span)
        }
        (_, children) if mixed || !props.is_empty() || children.is_some() => {
            let mut entries = props;
            match children {
                Some(NodeValue::Table(more)) => entries.extend(more),
                Some(NodeValue::Array(_)) => diagnostics.push(
                    Diagnostic::error(
                        Category::WrongType,
                        "kdl-mixed-node",
                        format!(
                            "node `{}` mixes properties with list elements",
                            node.name().value()
                        ),
                    )
                    .at(span, "properties and `-` elements together"),
                ),
                _ => {}
            }
            Node::new(NodeValue::Table(entries), span)
        }
        (0, _) => Node::new(NodeValue::Table(Vec::new()), span),
        (1, _) => {
            let mut value = args
                .pop()
                .unwrap_or_else(|| Node::new(NodeValue::Null, span));
            value.bare_scalar = true;
            value
        }
        _ => Node::new(NodeValue::Array(args), span),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_nodes_to_tables_values_and_lists() {
        let (root, errors) = parse("tasks {\n  a run=\"x\" {\n    needs \"b\" \"c\"\n  }\n}\n");
        assert!(errors.is_empty(), "{errors:?}");
        let json = root.unwrap().to_json();
        assert_eq!(
            json,
            serde_json::json!({"tasks": {"a": {"run": "x", "needs": ["b", "c"]}}})
        );
    }

    #[test]
    fn dash_children_make_a_list() {
        let (root, _) = parse("map {\n  - name=\"a\"\n  - name=\"b\"\n}\n");
        assert_eq!(
            root.unwrap().to_json(),
            serde_json::json!({"map": [{"name": "a"}, {"name": "b"}]})
        );
    }

    #[test]
    fn syntax_errors_are_diagnostics() {
        let (root, errors) = parse("tasks {\n");
        assert!(root.is_none());
        assert!(!errors.is_empty());
    }
}
