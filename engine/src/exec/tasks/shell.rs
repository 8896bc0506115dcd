//! A shell task: its command under `sh -c` (or its program, for plain words), in its workspace or
//! the clusterfile's directory; its stdout becomes its output, as text or JSON.

use super::{Attempt, Commands};
use crate::model::raw::OutputMode;

/// The shell task's one process; the shared environment and workspace are all it needs.
pub(crate) fn commands(a: &Attempt, output: OutputMode) -> Commands {
    Commands::new(
        Some(a.spec(a.cx.rendered.command.clone(), "", a.cwd.clone())),
        output,
        None,
    )
}
