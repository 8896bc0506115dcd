//! The spanned document tree both syntaxes lower into.

use crate::diagnostic::Span;

/// A table key with where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Key {
    pub name: String,
    pub span: Span,
}

/// A value with where it was written.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: NodeValue,
    pub span: Span,
    /// Set for a KDL node written with a single argument (`needs "build"`): the decoder may read it
    /// as a one-element list where a list is expected.
    pub bare_scalar: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeValue {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    /// TOML datetimes are kept as their text; no clusterfile key takes one.
    Datetime(String),
    Null,
    Array(Vec<Node>),
    /// Entries in source order; a key may repeat only in KDL (reported by the decoder).
    Table(Vec<(Key, Node)>),
}

impl Node {
    pub fn new(value: NodeValue, span: Span) -> Self {
        Node {
            value,
            span,
            bare_scalar: false,
        }
    }

    /// The name of this value's type, as the diagnostics say it.
    pub fn type_name(&self) -> &'static str {
        match self.value {
            NodeValue::String(_) => "a string",
            NodeValue::Integer(_) => "an integer",
            NodeValue::Float(_) => "a float",
            NodeValue::Bool(_) => "a boolean",
            NodeValue::Datetime(_) => "a datetime",
            NodeValue::Null => "null",
            NodeValue::Array(_) => "a list",
            NodeValue::Table(_) => "a table",
        }
    }

    /// Converts to JSON, for free-form values (`vars`, input defaults, inline schemas).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.value {
            NodeValue::String(s) | NodeValue::Datetime(s) => Value::String(s.clone()),
            NodeValue::Integer(i) => Value::from(*i),
            NodeValue::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number)
            }
            NodeValue::Bool(b) => Value::Bool(*b),
            NodeValue::Null => Value::Null,
            NodeValue::Array(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            NodeValue::Table(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(k, v)| (k.name.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }
}
