//! Finished runs archived beside the database, `runs/<run>/record.json`, so that they can be
//! read while another process drives the state: sled lets one process at a time open the
//! database, and a run in progress holds it for as long as it lasts.
//!
//! The writer archives a run once it has committed the run's final state (and again if a record
//! of that run changes later); the file is replaced atomically, so a reader sees a whole archive
//! or none. A finished run without one (archived by no ccluster yet) gets one the next time a
//! writer opens the state.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{ArtifactRecord, AttemptRecord, RunRecord, RunState, StoreError, TaskRecord};

/// The archive of a run, in its run directory.
pub const ARCHIVE_FILE: &str = "record.json";

/// Everything the database holds about one finished run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunArchive {
    pub run: RunRecord,
    /// In key order, as [`super::Store::tasks`] lists them.
    pub tasks: Vec<TaskRecord>,
    /// By plan node, in attempt order.
    pub attempts: BTreeMap<String, Vec<AttemptRecord>>,
    /// By plan node, in attempt order.
    pub artifacts: BTreeMap<String, Vec<ArtifactRecord>>,
}

/// Read access to the records of runs, from the database or from the archives.
pub trait RunRecords {
    /// Task records of a run, in key order.
    fn tasks(&self, run: &str) -> Result<Vec<TaskRecord>, StoreError>;
    /// Artifact records of a node's attempts, in attempt order.
    fn artifacts(&self, run: &str, node: &str) -> Result<Vec<ArtifactRecord>, StoreError>;
}

/// The writer's side: which runs need archiving, and the trees to archive them from. Shared by the
/// store and its committers.
pub(super) struct Archiver {
    pub(super) dir: PathBuf,
    pub(super) runs: sled::Tree,
    pub(super) tasks: sled::Tree,
    pub(super) attempts: sled::Tree,
    pub(super) artifacts: sled::Tree,
    /// Runs this process recorded as finished: a later write to one archives it again.
    finished: Mutex<HashSet<String>>,
    /// Runs to archive at the next commit.
    pending: Mutex<BTreeSet<String>>,
}

impl Archiver {
    pub(super) fn new(
        dir: &Path,
        runs: sled::Tree,
        tasks: sled::Tree,
        attempts: sled::Tree,
        artifacts: sled::Tree,
    ) -> Archiver {
        Archiver {
            dir: dir.to_path_buf(),
            runs,
            tasks,
            attempts,
            artifacts,
            finished: Mutex::new(HashSet::new()),
            pending: Mutex::new(BTreeSet::new()),
        }
    }

    /// Notes a run record written: a finished run is archived at the next commit.
    pub(super) fn run_written(&self, run: &RunRecord) {
        let (Ok(mut finished), Ok(mut pending)) = (self.finished.lock(), self.pending.lock())
        else {
            return;
        };
        if run.state == RunState::Running {
            finished.remove(&run.id);
        } else {
            finished.insert(run.id.clone());
            pending.insert(run.id.clone());
        }
    }

    /// Notes another record of `run` written: if the run is finished, its archive is redone.
    pub(super) fn record_written(&self, run: &str) {
        let (Ok(finished), Ok(mut pending)) = (self.finished.lock(), self.pending.lock()) else {
            return;
        };
        if finished.contains(run) {
            pending.insert(run.to_string());
        }
    }

    /// Finished runs that have no archive yet (recorded by an older ccluster): archived at the
    /// next commit.
    pub(super) fn find_unarchived(&self) {
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        for item in self.runs.iter().flatten() {
            let Ok(run) = serde_json::from_slice::<RunRecord>(&item.1) else {
                continue;
            };
            if run.state != RunState::Running && !archive_path(&self.dir, &run.id).exists() {
                pending.insert(run.id);
            }
        }
    }

    /// Archives the pending runs. Called after a commit, so an archive is never ahead of the
    /// durable state. Best effort: a run whose archive cannot be written is only invisible to
    /// readers while a writer holds the state, and the next writer tries again.
    pub(super) fn archive_pending(&self) {
        let pending = match self.pending.lock() {
            Ok(mut pending) if !pending.is_empty() => std::mem::take(&mut *pending),
            _ => return,
        };
        for run in pending {
            if let Ok(Some(archive)) = self.collect(&run) {
                let _ = write_archive(&self.dir, &archive);
            }
        }
    }

    fn collect(&self, id: &str) -> Result<Option<RunArchive>, StoreError> {
        let Some(run) = get::<RunRecord>(&self.dir, &self.runs, id)? else {
            return Ok(None);
        };
        let tasks: Vec<TaskRecord> = scan(&self.dir, &self.tasks, &format!("{id}\0"))?;
        let mut attempts = BTreeMap::new();
        let mut artifacts = BTreeMap::new();
        for task in &tasks {
            let prefix = format!("{id}\0{}\0", task.node);
            attempts.insert(task.node.clone(), scan(&self.dir, &self.attempts, &prefix)?);
            let kept: Vec<ArtifactRecord> = scan(&self.dir, &self.artifacts, &prefix)?;
            if !kept.is_empty() {
                artifacts.insert(task.node.clone(), kept);
            }
        }
        Ok(Some(RunArchive {
            run,
            tasks,
            attempts,
            artifacts,
        }))
    }
}

fn corrupt(key: &[u8], source: serde_json::Error) -> StoreError {
    StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    }
}

fn db_error(dir: &Path) -> impl Fn(sled::Error) -> StoreError + '_ {
    move |source| StoreError::Db {
        dir: dir.to_path_buf(),
        source,
    }
}

fn get<T: DeserializeOwned>(
    dir: &Path,
    tree: &sled::Tree,
    key: &str,
) -> Result<Option<T>, StoreError> {
    match tree.get(key.as_bytes()).map_err(db_error(dir))? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| corrupt(key.as_bytes(), e)),
    }
}

fn scan<T: DeserializeOwned>(
    dir: &Path,
    tree: &sled::Tree,
    prefix: &str,
) -> Result<Vec<T>, StoreError> {
    tree.scan_prefix(prefix.as_bytes())
        .map(|item| {
            let (key, bytes) = item.map_err(db_error(dir))?;
            serde_json::from_slice(&bytes).map_err(|e| corrupt(&key, e))
        })
        .collect()
}

fn archive_path(dir: &Path, run: &str) -> PathBuf {
    dir.join("runs").join(run).join(ARCHIVE_FILE)
}

/// Writes a run's archive atomically: a temporary file, synced, renamed over the old one, and the
/// directory synced, so a reader (or a crash) finds the old archive or the new one, whole.
pub(super) fn write_archive(dir: &Path, archive: &RunArchive) -> std::io::Result<()> {
    let run_dir = dir.join("runs").join(&archive.run.id);
    super::create_private_dir_all(&run_dir)?;
    let temp = run_dir.join(format!("{ARCHIVE_FILE}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut file = super::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&temp)?;
        file.write_all(&serde_json::to_vec(archive)?)?;
        file.sync_all()?;
        std::fs::rename(&temp, run_dir.join(ARCHIVE_FILE))?;
        std::fs::File::open(&run_dir)?.sync_all()
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// The archives of a state directory, for reading finished runs while another process holds the
/// database. Each is read once, when first asked for.
pub struct Archive {
    dir: PathBuf,
    read: Mutex<HashMap<String, Option<std::sync::Arc<RunArchive>>>>,
}

impl Archive {
    pub fn new(dir: &Path) -> Archive {
        Archive {
            dir: dir.to_path_buf(),
            read: Mutex::new(HashMap::new()),
        }
    }

    /// A run's archive; `None` when it has none (in progress, or not archived yet).
    pub fn run(&self, id: &str) -> Option<std::sync::Arc<RunArchive>> {
        let mut read = self.read.lock().ok()?;
        read.entry(id.to_string())
            .or_insert_with(|| {
                let text = std::fs::read(archive_path(&self.dir, id)).ok()?;
                serde_json::from_slice(&text).ok().map(std::sync::Arc::new)
            })
            .clone()
    }

    /// Every archived run, oldest first.
    pub fn runs(&self) -> Vec<std::sync::Arc<RunArchive>> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("runs")) else {
            return Vec::new();
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        ids.sort();
        ids.iter().filter_map(|id| self.run(id)).collect()
    }
}

impl RunRecords for Archive {
    /// Fails for a run without an archive: an empty list would pass for a run of no tasks.
    fn tasks(&self, run: &str) -> Result<Vec<TaskRecord>, StoreError> {
        match self.run(run) {
            Some(archive) => Ok(archive.tasks.clone()),
            None => Err(StoreError::Io {
                dir: self.dir.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!(
                        "run {run} cannot be read while another process holds the state (it has no {ARCHIVE_FILE} yet)"
                    ),
                ),
            }),
        }
    }

    fn artifacts(&self, run: &str, node: &str) -> Result<Vec<ArtifactRecord>, StoreError> {
        Ok(self
            .run(run)
            .and_then(|a| a.artifacts.get(node).cloned())
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn run(id: &str, state: RunState) -> RunRecord {
        RunRecord {
            id: id.into(),
            workflow: "w".into(),
            clusterfile: "c".into(),
            state,
            pid: 1,
            started_ms: 1,
            finished_ms: None,
            inputs: serde_json::Value::Null,
            source: String::new(),
            repo: None,
            base: None,
            result: None,
            keep_failed: false,
            task_refs: None,
            templates: Default::default(),
            rehearsed: false,
            started_by: None,
            policy: None,
        }
    }

    fn task(node: &str, message: &str) -> TaskRecord {
        TaskRecord {
            node: node.into(),
            task: node.into(),
            order: 0,
            state: crate::store::TaskState::Succeeded,
            attempts: 1,
            cache_key: None,
            exit_code: Some(0),
            class: None,
            started_ms: None,
            finished_ms: None,
            output: None,
            message: Some(message.into()),
            cached_from: None,
            commit: None,
            cost_usd: None,
            tokens: None,
            denials: None,
            after: Vec::new(),
            deduplicated_from: None,
            live_cost_usd: None,
        }
    }

    #[test]
    fn a_finished_run_is_archived_after_its_commit_and_again_when_it_changes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("runs/r1").join(ARCHIVE_FILE);
        let store = Store::open(dir.path()).unwrap();
        store.put_run(&run("r1", RunState::Running)).unwrap();
        store.put_task("r1", &task("a", "first")).unwrap();
        store.commit().unwrap();
        assert!(!file.exists(), "a run in progress has no archive");
        store.put_run(&run("r1", RunState::Succeeded)).unwrap();
        store
            .put_artifacts(
                "r1",
                "a",
                &ArtifactRecord {
                    attempt: 1,
                    files: vec!["out.txt".into()],
                    ..ArtifactRecord::default()
                },
            )
            .unwrap();
        assert!(!file.exists(), "never ahead of the commit");
        store.commit().unwrap();
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let archive = Archive::new(dir.path());
        let read = archive.run("r1").unwrap();
        assert_eq!(read.run.state, RunState::Succeeded);
        assert_eq!(read.tasks, store.tasks("r1").unwrap());
        assert_eq!(
            RunRecords::artifacts(&archive, "r1", "a").unwrap()[0].files,
            ["out.txt"]
        );
        // A later write to the finished run is archived too.
        store.put_task("r1", &task("a", "second")).unwrap();
        store.commit().unwrap();
        let again = Archive::new(dir.path());
        assert_eq!(
            again.tasks("r1").unwrap()[0].message.as_deref(),
            Some("second")
        );
        // No temporary file is left.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("runs/r1"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, [ARCHIVE_FILE]);
    }

    #[test]
    fn runs_finished_before_archives_existed_are_archived_by_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_run(&run("old", RunState::Failed)).unwrap();
            store.put_task("old", &task("a", "m")).unwrap();
            store.commit().unwrap();
        }
        let file = dir.path().join("runs/old").join(ARCHIVE_FILE);
        std::fs::remove_file(&file).unwrap();
        assert!(Archive::new(dir.path()).tasks("old").is_err());
        let store = Store::open(dir.path()).unwrap();
        store.commit().unwrap();
        assert_eq!(Archive::new(dir.path()).tasks("old").unwrap().len(), 1);
        drop(store);
    }
}
