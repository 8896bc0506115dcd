//! The nesting limit of a clusterfile: how deep tables and lists may nest, and the diagnostic for a
//! document that goes deeper.
//!
//! Parsing, lowering, decoding, converting to JSON and even dropping a document tree recurse once
//! per level, so a hostile file nested thousands of levels deep would overflow the stack instead
//! of being reported. Real clusterfiles nest a handful of levels; 64 leaves room for deep `vars`
//! while keeping every value, once embedded in a plan or a run record, well under the 128 levels
//! `serde_json` reads back.

use super::node::{Node, NodeValue};
use crate::diagnostic::{Category, Diagnostic, Span};

/// The most tables and lists a value may be nested in, counting the document's own top-level
/// tables (`[vars]`, `tasks { }`) as the first level.
pub const MAX_NESTING: usize = 64;

/// The diagnostic for a table or list opened at `span`, one level deeper than allowed.
pub fn too_deep(span: Span) -> Diagnostic {
    Diagnostic::error(
        Category::Syntax,
        "too-deep",
        format!("nesting deeper than {MAX_NESTING} levels"),
    )
    .at(span, format!("level {} opens here", MAX_NESTING + 1))
    .help(format!(
        "tables and lists may nest at most {MAX_NESTING} levels deep; flatten the value, or keep \
         deeply nested data in a file the task reads"
    ))
}

/// The first table or list (in document order) nested deeper than [`MAX_NESTING`], as a
/// diagnostic. Walks with its own stack, so it is safe on any tree the parser could build.
pub fn check(root: &Node) -> Option<Diagnostic> {
    let mut stack: Vec<(&Node, usize)> = vec![(root, 0)];
    while let Some((node, level)) = stack.pop() {
        let children: Vec<&Node> = match &node.value {
            NodeValue::Array(items) => items.iter().collect(),
            NodeValue::Table(entries) => entries.iter().map(|(_, v)| v).collect(),
            _ => continue,
        };
        if level > MAX_NESTING {
            // Its first character: the bracket or brace (or name) that opens it.
            return Some(too_deep(Span::new(node.span.start, node.span.start + 1)));
        }
        // Reversed, so the first child is looked at first.
        stack.extend(children.into_iter().rev().map(|c| (c, level + 1)));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested_lists(levels: usize) -> Node {
        let mut node = Node::new(NodeValue::Integer(1), Span::new(0, 1));
        for i in 0..levels {
            node = Node::new(NodeValue::Array(vec![node]), Span::new(i, i + 1));
        }
        node
    }

    #[test]
    fn allows_the_limit_and_reports_one_level_more() {
        // The root table is level 0; a list under it is level 1.
        let root = |levels| {
            Node::new(
                NodeValue::Table(vec![(
                    super::super::Key {
                        name: "a".into(),
                        span: Span::new(0, 1),
                    },
                    nested_lists(levels),
                )]),
                Span::new(0, 1),
            )
        };
        assert!(check(&root(MAX_NESTING)).is_none());
        let d = check(&root(MAX_NESTING + 1)).expect("too deep");
        assert_eq!(d.code, "too-deep");
    }

    #[test]
    fn a_very_deep_tree_is_reported_without_recursion() {
        // Dropping a tree this deep recurses too, so it is taken apart level by level below.
        let mut tree = nested_lists(200_000);
        assert!(check(&tree).is_some());
        while let NodeValue::Array(items) = &mut tree.value {
            let Some(inner) = items.pop() else { break };
            tree = inner;
        }
    }
}
