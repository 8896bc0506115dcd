//! What a run is asked to do ([`ApplyOptions`]) and how it can fail to ([`ApplyError`]): shared
//! by the dispatcher and the task kinds it hands attempts to.

use std::path::PathBuf;
use std::time::Duration;

use crate::store::StoreError;

/// Settings of one `apply`.
#[derive(Clone, Debug)]
pub struct ApplyOptions {
    /// Processes running at once (and agents too, when `agents` is 0).
    pub jobs: usize,
    /// Agent attempts running at once, apart from `jobs`; 0: agents take `jobs` slots.
    pub agents: usize,
    /// Fewer agent slots while the model API refuses requests (429, 529), more again as they
    /// pass (`--no-adapt` turns it off).
    pub adapt_agents: bool,
    /// Ignore cached results.
    pub fresh: bool,
    /// Time between SIGTERM and SIGKILL when a task must stop.
    pub grace: Duration,
    /// Directory shell tasks run in (the clusterfile's), against which `workdir` is resolved.
    pub workdir: PathBuf,
    /// The clusterfile as the user named it (runs and "last success" records are filed under it).
    pub clusterfile: String,
    /// The clusterfile's text, kept with the run for `ccluster retry`.
    pub source: String,
    /// Tasks (ids) or plan nodes (`build[2]`) to run even when a cached result exists.
    pub rerun: Vec<String>,
    /// `apply --rehearse`: agents talk to the scripted model server, driven by this script (the
    /// clusterfile's `rehearsal` tables are added to it).
    pub rehearse: Option<crate::scripted::Script>,
    /// A failed task does not stop the run: only what depends on it is not run (`make -k`).
    pub keep_going: bool,
    /// The texts of the templates the clusterfile used, kept with the run.
    pub templates: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Unsupported(String),
    /// A bug in ccluster, not in the workflow: a supervisor or the state writer panicked.
    #[error("internal error: {0}")]
    Internal(String),
    /// Workspaces cannot be made (no git repository, no such base).
    #[error("{0}")]
    Workspace(String),
    /// Agent workers cannot run (no `claude` CLI, no credentials).
    #[error("{0}")]
    Agent(String),
    /// A secret cannot be read (its variable unset, its file missing, its command failing, its
    /// value too short). The message names the secret and its source, never a value.
    #[error("{0}")]
    Secret(String),
    #[error("cannot create `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}
