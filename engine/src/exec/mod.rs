//! Execution: `apply` drives a compiled plan to the end on a runner, checkpointing in the store.

pub mod context;
pub mod direct;
mod dispatcher;
pub mod docker;
pub mod egress;
pub mod events;
pub mod explain;
pub mod fingerprint;
pub mod job;
pub mod lines;
pub mod reaper;
pub mod runner;

pub use dispatcher::{
    apply, check_supported, default_state_dir, log_path, rehearsal_script, ApplyError,
    ApplyOptions, RunSummary, LIVE_FILE, PASSED_ENV,
};
pub use events::{Event, EventSink};
pub use runner::{LocalRunner, ProcessEnd, ProcessResult, ProcessSpec, Runner, Stop};
