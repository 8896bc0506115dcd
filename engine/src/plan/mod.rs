//! Planning: a validated workflow + input values → a sealed [`Plan`], a DAG of task instances with
//! static fan-outs expanded, templates rendered where knowable and effective settings resolved.

mod build;
pub mod graph;
pub mod inputs;
mod render;

pub use build::{
    build, overlaps, DynamicMap, Plan, PlannedAction, PlannedTask, RunNode, Summary, Text,
    WhenState,
};
pub use inputs::InputArgs;
pub use render::{to_dot, to_json, to_mermaid, to_text};
