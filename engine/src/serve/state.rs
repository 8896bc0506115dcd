//! What the server reads of a state directory, without ever opening its database (a driver holds
//! it for as long as a run lasts): finished runs from their archives (`runs/<run>/record.json`),
//! runs in progress from their live snapshots (`runs/<run>/live.jsonl`, read incrementally), and
//! whether a run's driver is still alive. Parsed files are kept until they change.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::exec::LIVE_FILE;
use crate::store::{RunArchive, RunRecord, RunState, TaskRecord, ARCHIVE_FILE};

/// A repository served: its name in the API, its top directory and its state directory.
#[derive(Clone, Debug)]
pub struct Repo {
    pub name: String,
    pub root: PathBuf,
    pub state: PathBuf,
}

/// One run as the server sees it now.
#[derive(Clone, Debug)]
pub struct RunView {
    pub repo: usize,
    pub run: RunRecord,
    pub tasks: Arc<Vec<TaskRecord>>,
    /// Its archive, for a finished run (attempts and artifacts are there).
    pub archive: Option<Arc<RunArchive>>,
    /// Read from a live snapshot: a driver is (or was, until it died) running it.
    pub live: bool,
}

/// A live snapshot read so far.
#[derive(Default)]
struct LiveFile {
    offset: u64,
    /// Bytes after the last whole line.
    partial: Vec<u8>,
    run: Option<RunRecord>,
    tasks: Vec<TaskRecord>,
    at: HashMap<String, usize>,
    /// Shared with views until the next change.
    shared: Option<Arc<Vec<TaskRecord>>>,
    /// The run's grouped plan, read once: its nodes are pending until a record says otherwise.
    plan: Option<Option<crate::serve::graph::PlanGroups>>,
}

/// An archive read, and the file's size and time when read.
struct ArchiveFile {
    stamp: (u64, std::time::SystemTime),
    archive: Arc<RunArchive>,
    tasks: Arc<Vec<TaskRecord>>,
}

/// The reader of the served repositories' states.
pub struct States {
    pub repos: Vec<Repo>,
    archives: Mutex<HashMap<PathBuf, ArchiveFile>>,
    lives: Mutex<HashMap<PathBuf, LiveFile>>,
}

impl States {
    pub fn new(repos: Vec<Repo>) -> States {
        States {
            repos,
            archives: Mutex::new(HashMap::new()),
            lives: Mutex::new(HashMap::new()),
        }
    }

    /// Every run of every repository, oldest first.
    pub fn runs(&self) -> Vec<RunView> {
        let mut out = Vec::new();
        for (i, repo) in self.repos.iter().enumerate() {
            let Ok(entries) = std::fs::read_dir(repo.state.join("runs")) else {
                continue;
            };
            let mut ids: Vec<String> = entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            ids.sort();
            for id in ids {
                if let Some(view) = self.read_run(i, &id) {
                    out.push(view);
                }
            }
        }
        out.sort_by(|a, b| a.run.id.cmp(&b.run.id));
        out
    }

    /// One run by id (or a unique prefix of one, or `latest`).
    pub fn run(&self, id: &str) -> Option<RunView> {
        if is_plain_id(id) {
            for i in 0..self.repos.len() {
                if let Some(view) = self.read_run(i, id) {
                    return Some(view);
                }
            }
        }
        let runs = self.runs();
        if id == "latest" {
            return runs.into_iter().next_back();
        }
        let mut matching = runs.into_iter().filter(|v| v.run.id.starts_with(id));
        match (matching.next(), matching.next()) {
            (Some(view), None) => Some(view),
            _ => None,
        }
    }

    /// The run directory of a run.
    pub fn run_dir(&self, view: &RunView) -> PathBuf {
        self.repos[view.repo].state.join("runs").join(&view.run.id)
    }

    fn read_run(&self, repo: usize, id: &str) -> Option<RunView> {
        if !is_plain_id(id) {
            return None;
        }
        let dir = self.repos[repo].state.join("runs").join(id);
        if let Some((archive, tasks)) = self.archive(&dir.join(ARCHIVE_FILE)) {
            return Some(RunView {
                repo,
                run: archive.run.clone(),
                tasks,
                archive: Some(archive),
                live: false,
            });
        }
        let (mut run, mut tasks) = self.live(&dir.join(LIVE_FILE))?;
        // A snapshot whose driver is gone is a run nobody drives any more: the next `apply`
        // marks it interrupted in the database; say so already.
        if run.state == RunState::Running && !driver_alive(run.pid) {
            run.state = RunState::Interrupted;
        }
        // Running agents' costs so far, while there are any.
        if run.state == RunState::Running && dir.join(crate::store::LIVE_COSTS_FILE).exists() {
            let mut with_costs = (*tasks).clone();
            crate::store::read_live_costs(&dir, &mut with_costs);
            tasks = Arc::new(with_costs);
        }
        Some(RunView {
            repo,
            run,
            tasks,
            archive: None,
            live: true,
        })
    }

    fn archive(&self, path: &Path) -> Option<(Arc<RunArchive>, Arc<Vec<TaskRecord>>)> {
        let meta = std::fs::metadata(path).ok()?;
        let stamp = (meta.len(), meta.modified().ok()?);
        let mut archives = self.archives.lock().ok()?;
        if let Some(read) = archives.get(path) {
            if read.stamp == stamp {
                return Some((read.archive.clone(), read.tasks.clone()));
            }
        }
        let archive: RunArchive = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let mut tasks = archive.tasks.clone();
        tasks.sort_by_key(|t| t.order);
        let read = ArchiveFile {
            stamp,
            archive: Arc::new(archive),
            tasks: Arc::new(tasks),
        };
        let out = (read.archive.clone(), read.tasks.clone());
        archives.insert(path.to_path_buf(), read);
        Some(out)
    }

    /// A live snapshot, reading only what was appended since the last call. The last record of a
    /// node wins; a line cut short by a concurrent append waits for its end.
    fn live(&self, path: &Path) -> Option<(RunRecord, Arc<Vec<TaskRecord>>)> {
        let mut file = std::fs::File::open(path).ok()?;
        let len = file.metadata().ok()?.len();
        let mut lives = self.lives.lock().ok()?;
        let live = lives.entry(path.to_path_buf()).or_default();
        if len < live.offset {
            // Replaced (a new driver started over): read it again.
            *live = LiveFile::default();
        }
        if len > live.offset {
            file.seek(SeekFrom::Start(live.offset)).ok()?;
            let mut bytes = std::mem::take(&mut live.partial);
            let read = (&mut file)
                .take(len - live.offset)
                .read_to_end(&mut bytes)
                .ok()?;
            live.offset += read as u64;
            let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            live.partial = bytes[whole..].to_vec();
            let mut changed = false;
            for line in bytes[..whole].split(|b| *b == b'\n') {
                if line.is_empty() {
                    continue;
                }
                if live.run.is_none() {
                    live.run = serde_json::from_slice(line).ok();
                    continue;
                }
                let Ok(record) = serde_json::from_slice::<TaskRecord>(line) else {
                    continue;
                };
                changed = true;
                match live.at.get(&record.node) {
                    Some(&i) => live.tasks[i] = record,
                    None => {
                        live.at.insert(record.node.clone(), live.tasks.len());
                        live.tasks.push(record);
                    }
                }
            }
            if changed {
                live.shared = None;
            }
        }
        let run = live.run.clone()?;
        let tasks = match &live.shared {
            Some(shared) => shared.clone(),
            None => {
                let plan = live.plan.get_or_insert_with(|| {
                    path.parent()
                        .and_then(crate::serve::graph::PlanGroups::read)
                });
                let mut tasks = live.tasks.clone();
                if let Some(plan) = plan {
                    tasks.extend(plan.pending_besides(&live.tasks));
                }
                tasks.sort_by_key(|t| t.order);
                let shared = Arc::new(tasks);
                live.shared = Some(shared.clone());
                shared
            }
        };
        Some((run, tasks))
    }
}

/// A run id as the driver makes them (`20261125-084844.632-fe21`): nothing that could walk out of
/// the runs directory.
pub fn is_plain_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.starts_with(|c: char| c.is_ascii_digit())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        && !id.contains("..")
}

/// Whether `pid` is a live ccluster process (a recorded pid may have been reused by another
/// program since its driver died).
pub fn driver_alive(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
        cmd.split(|b| *b == 0)
            .next()
            .is_some_and(|argv0| argv0.ends_with(b"ccluster"))
    })
}
