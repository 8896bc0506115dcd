//! Execution: `apply` drives a compiled plan to the end on a runner, checkpointing in the store.

pub mod context;
mod dedup;
pub mod direct;
mod dispatcher;
pub mod docker;
pub mod egress;
pub mod endpoint;
pub mod events;
pub mod explain;
pub mod fingerprint;
pub mod job;
pub mod kubernetes;
pub mod lines;
mod options;
pub mod reaper;
pub mod runner;
mod tasks;

pub use dispatcher::{
    apply, check_supported, default_state_dir, ApplyError, ApplyOptions, RunSummary, LIVE_FILE,
    RUN_BUDGET_SPENT,
};
pub use events::{
    AttemptFacts, AttemptUsage, Event, EventLog, EventSink, MergeCount, StepTime, EVENTS_FILE,
};
pub use runner::{LocalRunner, ProcessEnd, ProcessResult, ProcessSpec, Runner, Stop};
pub use tasks::agent::rehearsal_script;
pub use tasks::{log_path, PASSED_ENV};
