//! Run state, in sled under `.ccluster/`: runs, task instances, attempts, dynamic map expansions
//! and the result cache. One process at a time drives a state directory (a lock file held with
//! `flock`, which the kernel releases when the holder dies, even by `kill -9`). Every write that
//! must survive a crash is followed by [`Store::commit`] (an fsync) before the change is acted on.

mod archive;
mod portable;
mod private;
mod records;

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use archive::{Archive, RunArchive, RunRecords, ARCHIVE_FILE};
pub use portable::{
    check_repo, export_run, import, read_archive, sha256_hex, CheckedRepo, Exported, Imported,
    Manifest, PortableError, VerifiedArchive, ARCHIVE_FORMAT, ARCHIVE_VERSION,
};
pub use private::{
    create_private_dir_all, is_state_dir, private_file, write_private, LooseState,
    PRIVATE_DIR_MODE, PRIVATE_FILE_MODE,
};
pub use records::*;

/// Version of the on-disk format. Bump it on any incompatible change; an older ccluster refuses a
/// newer state instead of misreading it.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_KEY: &[u8] = b"format_version";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("another ccluster process (pid {pid}) is driving the state in `{dir}`")]
    Locked { pid: String, dir: PathBuf },
    #[error("the state in `{dir}` was written by a newer ccluster (format {found}; this one reads format {FORMAT_VERSION})")]
    NewerFormat { found: u32, dir: PathBuf },
    #[error("cannot use the state directory `{dir}`: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("state database error in `{dir}`: {source}")]
    Db { dir: PathBuf, source: sled::Error },
    #[error("corrupt state record `{key}`: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

/// Makes the writes made before [`Committer::commit`] durable.
pub struct Committer {
    db: sled::Db,
    dir: PathBuf,
    sync: Option<Arc<DiskSync>>,
    archiver: Option<Arc<archive::Archiver>>,
}

impl Committer {
    pub fn commit(self) -> Result<(), StoreError> {
        commit(
            &self.db,
            self.sync.as_deref(),
            self.archiver.as_deref(),
            &self.dir,
        )
    }
}

/// What sled 0.34's `flush` leaves undone for a power loss (it survives a process crash as it
/// is): it writes the log with `pwrite` + `sync_file_range`, which neither persists the file's
/// size nor flushes the disk's write cache, and never syncs the files of large values
/// (`blobs/`). After each flush, ccluster syncs the new blob files and their directory, then
/// `fdatasync`s the log, so a commit means on the disk.
struct DiskSync {
    /// sled's log, `db/db`, opened again: a sync is of the file, whichever descriptor asks.
    log: File,
    blobs: PathBuf,
    /// Blob files already synced.
    synced_blobs: Mutex<HashSet<std::ffi::OsString>>,
}

impl DiskSync {
    fn open(db: &Path) -> std::io::Result<DiskSync> {
        let sync = DiskSync {
            log: File::open(db.join("db"))?,
            blobs: db.join("blobs"),
            synced_blobs: Mutex::new(HashSet::new()),
        };
        // Files made before this process (or by sled's opening) are synced once, with the
        // directories that name them.
        sync.sync()?;
        for dir in [db, db.parent().unwrap_or(db)] {
            File::open(dir)?.sync_all()?;
        }
        if let Ok(conf) = File::open(db.join("conf")) {
            conf.sync_all()?;
        }
        Ok(sync)
    }

    /// Blobs first: a log entry must never be on the disk without the value it points to.
    fn sync(&self) -> std::io::Result<()> {
        let mut synced = self
            .synced_blobs
            .lock()
            .map_err(|_| std::io::Error::other("a blob sync panicked"))?;
        let mut new_blob = false;
        if let Ok(entries) = std::fs::read_dir(&self.blobs) {
            for entry in entries.flatten() {
                if !synced.contains(&entry.file_name()) {
                    match File::open(entry.path()).and_then(|blob| blob.sync_all()) {
                        // sled removed it meanwhile (a value rewritten): nothing to keep.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        result => result?,
                    }
                    synced.insert(entry.file_name());
                    new_blob = true;
                }
            }
        }
        if new_blob {
            File::open(&self.blobs)?.sync_all()?;
        }
        self.log.sync_data()
    }
}

/// sled's flush, then, for a writer, the syncs it leaves undone, then the archives of runs that
/// finished (never ahead of what is durable).
fn commit(
    db: &sled::Db,
    sync: Option<&DiskSync>,
    archiver: Option<&archive::Archiver>,
    dir: &Path,
) -> Result<(), StoreError> {
    db.flush().map_err(|source| StoreError::Db {
        dir: dir.to_path_buf(),
        source,
    })?;
    if let Some(sync) = sync {
        sync.sync().map_err(io(dir))?;
    }
    if let Some(archiver) = archiver {
        archiver.archive_pending();
    }
    Ok(())
}

/// The state of one directory, locked for this process (exclusively for a writer, shared for
/// readers).
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    runs: sled::Tree,
    tasks: sled::Tree,
    attempts: sled::Tree,
    expansions: sled::Tree,
    cache: sled::Tree,
    last_success: sled::Tree,
    artifacts: sled::Tree,
    /// What each `sources` fingerprint was made of, for `plan --explain`.
    sources: sled::Tree,
    /// Held for the life of the store; dropping it unlocks.
    lock: Flock<File>,
    writer: bool,
    /// A writer's syncs to the disk after sled's flushes; a reader writes nothing.
    sync: Option<Arc<DiskSync>>,
    /// A writer's archives of finished runs, for readers while it holds the database.
    archiver: Option<Arc<archive::Archiver>>,
    /// Pid found in the lock file when this process took it over from a dead one.
    pub took_over_from: Option<String>,
    /// Set when the state directory was found open to other users (see [`Store::open`]).
    pub loose: Option<LooseState>,
}

fn io(dir: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        dir: dir.to_path_buf(),
        source,
    }
}

/// How long an open waits for a lock held briefly by someone else (a `status` reading, or the
/// database being opened by another reader), before saying the state is busy.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_secs(3);

fn locked_error(file: &mut File, dir: &Path) -> StoreError {
    let mut pid = String::new();
    let _ = file.rewind();
    let _ = file.read_to_string(&mut pid);
    let pid = pid.trim().to_string();
    StoreError::Locked {
        pid: if pid.is_empty() {
            "unknown".into()
        } else {
            pid
        },
        dir: dir.to_path_buf(),
    }
}

/// Takes a lock on the lock file. A writer (`apply`) waits up to [`LOCK_PATIENCE`] for readers to
/// let go, and for a writer that is going away (after a `kill -9` of the `apply` the shell started,
/// its worker lives on for the moment it takes to kill it: `exec::reaper::going_away`); a reader
/// gives up at once if a writer holds it (the run's live view is read instead).
fn take_lock(dir: &Path, writer: bool) -> Result<Flock<File>, StoreError> {
    let start = std::time::Instant::now();
    let arg = if writer {
        FlockArg::LockExclusiveNonblock
    } else {
        FlockArg::LockSharedNonblock
    };
    loop {
        let file = private_file()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
            .map_err(io(dir))?;
        match Flock::lock(file, arg) {
            Ok(lock) => return Ok(lock),
            Err((mut file, _)) => {
                let held_by_writer = Flock::lock(
                    file.try_clone().map_err(io(dir))?,
                    FlockArg::LockSharedNonblock,
                )
                .is_err();
                let mut leaving = || {
                    let mut pid = String::new();
                    let _ = file.rewind();
                    let _ = file.read_to_string(&mut pid);
                    pid.trim()
                        .parse()
                        .is_ok_and(crate::exec::reaper::going_away)
                };
                if !writer || (held_by_writer && !leaving()) || start.elapsed() >= LOCK_PATIENCE {
                    return Err(locked_error(&mut file, dir));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}

impl Store {
    /// Opens (creating if needed) the state in `dir` for driving a run: one process at a time.
    ///
    /// A new state directory is made 0700. An existing one that other users may enter is
    /// narrowed to 0700 when it holds nothing but state (it was made by an older ccluster, or by
    /// hand), and left as it is otherwise (`--state-dir` pointed at a shared directory, whose mode
    /// is not ccluster's to change); either way [`Store::loose`] says so, for a warning.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let loose = match dir.is_dir() {
            true => private::check_state_dir(dir, true),
            false => {
                create_private_dir_all(dir).map_err(io(dir))?;
                None
            }
        };
        let mut lock = take_lock(dir, true)?;
        // A pid left in the file means its writer died without letting go (a clean exit empties
        // it): the kernel dropped that lock, and this process takes over.
        let mut previous = Vec::new();
        let _ = lock.read_to_end(&mut previous);
        let previous = String::from_utf8_lossy(&previous).trim().to_string();
        lock.set_len(0).map_err(io(dir))?;
        lock.rewind().map_err(io(dir))?;
        write!(lock, "{}", std::process::id()).map_err(io(dir))?;
        lock.sync_all().map_err(io(dir))?;
        let mut store = Store::open_db(dir, lock, true)?;
        store.took_over_from = (!previous.is_empty()).then_some(previous);
        store.loose = loose;
        Ok(store)
    }

    /// Opens the state for reading (`status`, `runs`, `logs`, `plan --explain`): refused with
    /// [`StoreError::Locked`] while a run is driven.
    pub fn open_reader(dir: &Path) -> Result<Store, StoreError> {
        let lock = take_lock(dir, false)?;
        let opened = match Store::open_db(dir, lock, false) {
            Err(StoreError::Db { .. }) if !unfinished_snapshots(&dir.join("db")).is_empty() => {
                // A kill during a snapshot left a partial one, and no writer has run since to
                // discard it. Only with the lock to itself may a reader discard it (no other
                // process has the database open); then it reads as usual.
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dir.join("lock"))
                    .map_err(io(dir))?;
                let alone = Flock::lock(file, FlockArg::LockExclusiveNonblock)
                    .map_err(|(mut file, _)| locked_error(&mut file, dir))?;
                discard_unfinished_snapshots(&dir.join("db"));
                alone
                    .relock(FlockArg::LockShared)
                    .map_err(|e| io(dir)(e.into()))?;
                Store::open_db(dir, alone, false)
            }
            opened => opened,
        };
        // A reader only tells: changing the directory is for the process that drives it.
        opened.map(|mut store| {
            store.loose = private::check_state_dir(dir, false);
            store
        })
    }

    fn open_db(dir: &Path, lock: Flock<File>, writer: bool) -> Result<Store, StoreError> {
        let db_err = |source| StoreError::Db {
            dir: dir.to_path_buf(),
            source,
        };
        if writer {
            // sled would make its directory with the process's default mode.
            create_private_dir_all(&dir.join("db")).map_err(io(dir))?;
            discard_unfinished_snapshots(&dir.join("db"));
        }
        let start = std::time::Instant::now();
        // Two readers may race for sled's own file lock: the loser waits its turn.
        let db = loop {
            match sled::Config::new()
                .path(dir.join("db"))
                .flush_every_ms(None)
                // sled's default cache is 1 GiB; run state is small and mostly written, not re-read.
                .cache_capacity(32 << 20)
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("lock") =>
                {
                    if start.elapsed() >= LOCK_PATIENCE {
                        return Err(db_err(sled::Error::Io(e)));
                    }
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(db_err(e)),
            }
        };
        match db.get(FORMAT_KEY).map_err(db_err)? {
            Some(v) => {
                let found = v
                    .as_ref()
                    .try_into()
                    .map(u32::from_be_bytes)
                    .unwrap_or(u32::MAX);
                if found > FORMAT_VERSION {
                    return Err(StoreError::NewerFormat {
                        found,
                        dir: dir.to_path_buf(),
                    });
                }
            }
            None if writer => {
                db.insert(FORMAT_KEY, &FORMAT_VERSION.to_be_bytes())
                    .map_err(db_err)?;
                db.flush().map_err(db_err)?;
            }
            None => {}
        }
        let tree = |name: &str| db.open_tree(name).map_err(db_err);
        let sync = match writer {
            true => Some(Arc::new(DiskSync::open(&dir.join("db")).map_err(io(dir))?)),
            false => None,
        };
        let (runs, tasks, attempts, artifacts) = (
            tree("runs")?,
            tree("tasks")?,
            tree("attempts")?,
            tree("artifacts")?,
        );
        let archiver = writer.then(|| {
            let archiver = archive::Archiver::new(
                dir,
                runs.clone(),
                tasks.clone(),
                attempts.clone(),
                artifacts.clone(),
            );
            archiver.find_unarchived();
            Arc::new(archiver)
        });
        Ok(Store {
            sync,
            archiver,
            runs,
            tasks,
            attempts,
            expansions: tree("expansions")?,
            cache: tree("cache")?,
            last_success: tree("last_success")?,
            artifacts,
            sources: tree("sources")?,
            db,
            dir: dir.to_path_buf(),
            lock,
            writer,
            took_over_from: None,
            loose: None,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A handle that makes every write so far durable, usable from another thread (so the
    /// dispatcher can go on while the disk syncs).
    pub fn committer(&self) -> Committer {
        Committer {
            db: self.db.clone(),
            dir: self.dir.clone(),
            sync: self.sync.clone(),
            archiver: self.archiver.clone(),
        }
    }

    /// Makes every write so far durable. Called before a recorded change is acted on or reported.
    pub fn commit(&self) -> Result<(), StoreError> {
        commit(
            &self.db,
            self.sync.as_deref(),
            self.archiver.as_deref(),
            &self.dir,
        )
    }

    /// Notes a write of a record of `run`, whose archive is then redone if the run is finished.
    fn written(&self, run: &str) {
        if let Some(archiver) = &self.archiver {
            archiver.record_written(run);
        }
    }

    fn db_error(&self, source: sled::Error) -> StoreError {
        StoreError::Db {
            dir: self.dir.clone(),
            source,
        }
    }

    fn put<T: Serialize>(&self, tree: &sled::Tree, key: &str, value: &T) -> Result<(), StoreError> {
        // The run's secrets never reach the state: every record is masked as it is written.
        let bytes = crate::secrets::json_bytes(value).map_err(|source| StoreError::Corrupt {
            key: key.to_string(),
            source,
        })?;
        tree.insert(key.as_bytes(), bytes)
            .map(|_| ())
            .map_err(|e| self.db_error(e))
    }

    fn get<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match tree.get(key.as_bytes()).map_err(|e| self.db_error(e))? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Corrupt {
                        key: key.to_string(),
                        source,
                    })
            }
        }
    }

    fn scan<T: DeserializeOwned>(
        &self,
        tree: &sled::Tree,
        prefix: &str,
    ) -> Result<Vec<T>, StoreError> {
        tree.scan_prefix(prefix.as_bytes())
            .map(|item| {
                let (key, bytes) = item.map_err(|e| self.db_error(e))?;
                serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                    key: String::from_utf8_lossy(&key).into_owned(),
                    source,
                })
            })
            .collect()
    }

    pub fn put_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        self.put(&self.runs, &run.id, run)?;
        if let Some(archiver) = &self.archiver {
            archiver.run_written(run);
        }
        Ok(())
    }

    pub fn run(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        self.get(&self.runs, id)
    }

    /// All runs, oldest first (run ids sort by start time).
    pub fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        self.scan(&self.runs, "")
    }

    pub fn put_task(&self, run: &str, task: &TaskRecord) -> Result<(), StoreError> {
        self.written(run);
        self.put(&self.tasks, &format!("{run}\0{}", task.node), task)
    }

    /// Task records of a run, in key order (use the record's `order` for plan order).
    pub fn tasks(&self, run: &str) -> Result<Vec<TaskRecord>, StoreError> {
        self.scan(&self.tasks, &format!("{run}\0"))
    }

    pub fn put_attempt(
        &self,
        run: &str,
        node: &str,
        attempt: &AttemptRecord,
    ) -> Result<(), StoreError> {
        self.written(run);
        self.put(
            &self.attempts,
            &format!("{run}\0{node}\0{:08}", attempt.attempt),
            attempt,
        )
    }

    pub fn attempts(&self, run: &str, node: &str) -> Result<Vec<AttemptRecord>, StoreError> {
        self.scan(&self.attempts, &format!("{run}\0{node}\0"))
    }

    pub fn put_expansion(
        &self,
        run: &str,
        task: &str,
        items: &[serde_json::Value],
    ) -> Result<(), StoreError> {
        self.put(&self.expansions, &format!("{run}\0{task}"), &items)
    }

    pub fn put_artifacts(
        &self,
        run: &str,
        node: &str,
        record: &ArtifactRecord,
    ) -> Result<(), StoreError> {
        self.written(run);
        self.put(
            &self.artifacts,
            &format!("{run}\0{node}\0{:08}", record.attempt),
            record,
        )
    }

    /// Artifact records of a node's attempts, in attempt order.
    pub fn artifacts(&self, run: &str, node: &str) -> Result<Vec<ArtifactRecord>, StoreError> {
        self.scan(&self.artifacts, &format!("{run}\0{node}\0"))
    }

    /// Every cache entry (for `gc`).
    pub fn cache_entries(&self) -> Result<Vec<CacheEntry>, StoreError> {
        self.scan(&self.cache, "")
    }

    pub fn put_cache(&self, key: &str, entry: &CacheEntry) -> Result<(), StoreError> {
        self.put(&self.cache, key, entry)
    }

    pub fn cached(&self, key: &str) -> Result<Option<CacheEntry>, StoreError> {
        self.get(&self.cache, key)
    }

    /// The key parts of a plan node's last success, for explaining why it would run again.
    pub fn put_last_success(
        &self,
        clusterfile: &str,
        node: &str,
        parts: &KeyParts,
    ) -> Result<(), StoreError> {
        self.put(&self.last_success, &format!("{clusterfile}\0{node}"), parts)
    }

    /// Records what a `sources` fingerprint was made of, once.
    pub fn put_sources<T: Serialize>(&self, id: &str, manifest: &T) -> Result<(), StoreError> {
        if self
            .sources
            .contains_key(id.as_bytes())
            .map_err(|e| self.db_error(e))?
        {
            return Ok(());
        }
        self.put(&self.sources, id, manifest)
    }

    pub fn sources<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>, StoreError> {
        self.get(&self.sources, id)
    }

    pub fn last_success(
        &self,
        clusterfile: &str,
        node: &str,
    ) -> Result<Option<KeyParts>, StoreError> {
        self.get(&self.last_success, &format!("{clusterfile}\0{node}"))
    }
}

impl RunRecords for Store {
    fn tasks(&self, run: &str) -> Result<Vec<TaskRecord>, StoreError> {
        Store::tasks(self, run)
    }

    fn artifacts(&self, run: &str, node: &str) -> Result<Vec<ArtifactRecord>, StoreError> {
        Store::artifacts(self, run, node)
    }
}

/// sled 0.34 writes a snapshot to `snap.<lsn>.generating`, syncs it and renames it to
/// `snap.<lsn>`: the rename is what makes it valid. A process killed before the rename leaves the
/// partial file, and sled then reads it as the newest snapshot and refuses to open ("Read
/// corrupted data", spacejam/sled#1527). Such a file is never valid, so the exclusive writer
/// removes it before opening (and a reader that failed to open, once it has the lock to itself).
fn unfinished_snapshots(db: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(db) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|entry| {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            name.starts_with("snap.") && name.ends_with(".generating")
        })
        .map(|entry| entry.path())
        .collect()
}

fn discard_unfinished_snapshots(db: &Path) {
    for snapshot in unfinished_snapshots(db) {
        let _ = std::fs::remove_file(snapshot);
    }
}

impl Drop for Store {
    /// A clean exit empties the lock file, so a pid found there later means a writer died.
    fn drop(&mut self) {
        if self.writer {
            let _ = self.commit();
            let _ = self.lock.set_len(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_is_refused_while_the_first_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        match Store::open(dir.path()) {
            Err(StoreError::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Locked, got {:?}", other.err()),
        }
        drop(first);
        Store::open(dir.path()).expect("reopens once the lock is released");
    }

    #[test]
    fn a_garbage_lock_file_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("lock"), b"\xff\x00not a pid").unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert!(store.took_over_from.is_some());
        let pid = std::fs::read_to_string(dir.path().join("lock")).unwrap();
        assert_eq!(pid, std::process::id().to_string());
    }

    #[test]
    fn a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .db
                .insert(FORMAT_KEY, &(FORMAT_VERSION + 1).to_be_bytes())
                .unwrap();
            store.commit().unwrap();
        }
        match Store::open(dir.path()) {
            Err(StoreError::NewerFormat { found, .. }) => assert_eq!(found, FORMAT_VERSION + 1),
            other => panic!("expected NewerFormat, got {:?}", other.err()),
        }
    }

    #[test]
    fn an_unfinished_snapshot_left_by_a_kill_does_not_stop_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .put_run(&RunRecord {
                    id: "r1".into(),
                    workflow: "w".into(),
                    clusterfile: "c".into(),
                    state: RunState::Succeeded,
                    pid: 1,
                    started_ms: 1,
                    finished_ms: Some(2),
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
                })
                .unwrap();
            store.commit().unwrap();
        }
        leave_partial_snapshot(dir.path());
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.runs().unwrap().len(), 1);
    }

    /// What a kill during sled's snapshot writing leaves: a partial, newest-looking snapshot.
    fn leave_partial_snapshot(dir: &Path) -> PathBuf {
        let partial = dir.join("db").join("snap.7FFFFFFFFFFFFFFF.generating");
        std::fs::write(&partial, b"partial snapshot bytes").unwrap();
        partial
    }

    fn cache_entry() -> CacheEntry {
        CacheEntry {
            run: "r1".into(),
            node: "build".into(),
            output: serde_json::json!("ok"),
            finished_ms: 1,
            commit: None,
        }
    }

    #[test]
    fn a_reader_alone_discards_an_unfinished_snapshot_too() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_cache("k", &cache_entry()).unwrap();
            store.commit().unwrap();
        }
        let partial = leave_partial_snapshot(dir.path());
        // `ccluster status` after a crash, before any `apply`.
        let store = Store::open_reader(dir.path()).unwrap();
        assert!(store.cached("k").unwrap().is_some());
        assert!(!partial.exists());
    }

    #[test]
    fn a_large_value_kept_in_a_blob_file_commits_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut entry = cache_entry();
        entry.output = serde_json::json!("x".repeat(200_000));
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_cache("k", &entry).unwrap();
            // Syncs the new blob file (and its directory) before the log.
            store.commit().unwrap();
            let blobs = std::fs::read_dir(dir.path().join("db").join("blobs")).unwrap();
            assert!(
                blobs.count() > 0,
                "sled keeps a value this large in a blob file"
            );
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.cached("k").unwrap(), Some(entry));
    }

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let entry = cache_entry();
        {
            let store = Store::open(dir.path()).unwrap();
            store.put_cache("k", &entry).unwrap();
            store.commit().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.cached("k").unwrap(), Some(entry));
    }
}
