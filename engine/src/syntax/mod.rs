//! The syntax layer: TOML or KDL text → one spanned document tree ([`Node`]), so both formats feed the
//! same decoder and compile to the same model.

mod depth;
mod kdl;
mod node;
mod toml;

pub use depth::MAX_NESTING;
pub use node::{Key, Node, NodeValue};

use crate::diagnostic::Diagnostic;

/// The input formats a clusterfile can be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Kdl,
}

impl Format {
    /// `.kdl` files are KDL; everything else is TOML.
    pub fn from_path(path: &std::path::Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("kdl") => Format::Kdl,
            _ => Format::Toml,
        }
    }
}

/// Parses text into a document tree. Syntax errors are returned as diagnostics; the tree is whatever
/// could be recovered (TOML recovers and keeps going; KDL gives up on the first broken document).
pub fn parse(text: &str, format: Format) -> (Option<Node>, Vec<Diagnostic>) {
    match format {
        Format::Toml => toml::parse(text),
        Format::Kdl => kdl::parse(text),
    }
}
