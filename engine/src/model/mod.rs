//! The clusterfile model: raw (as written, with spans) → validated [`Workflow`].

pub mod compose;
pub mod confine;
pub mod decode;
mod fanout;
pub mod fetch;
pub mod guardrails;
pub mod k8s_values;
pub mod publish;
pub mod raw;
pub mod runners;
pub mod secrets;
pub mod spanned;
pub mod template;
pub mod workflow;

pub use raw::RawClusterfile;
pub use spanned::Spanned;
pub use template::Template;
pub use workflow::{Action, AgentSettings, MapSpec, RetryPolicy, Task, TaskId, When, Workflow};
