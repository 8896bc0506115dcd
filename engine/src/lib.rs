//! ccluster's engine: the clusterfile compiler (syntax → model → plan) and, in later stages, the
//! executor, runners and agents. The `ccluster` binary is a thin shell over this crate.

pub mod agent;
pub mod ci;
pub mod compile;
pub mod diagnostic;
pub mod library;
pub mod model;
pub mod plan;
pub mod policy;
pub mod render;
pub mod report;
pub mod schema;
pub mod scripted;
pub mod secrets;
pub mod serve;
pub mod syntax;
pub mod telemetry;

pub use compile::{compile, compile_file, compile_file_with, compile_with, Compiled, Stage};
pub use diagnostic::{Diagnostic, SourceFile};
pub mod exec;
pub mod forge;
pub mod store;
pub mod workspace;
