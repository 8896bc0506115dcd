//! `state export` / `state import`: one run's state as a portable, verified archive (tar.gz: a
//! manifest with a SHA-256 per entry, the run's records, its run directory, and its refs as a git
//! bundle), so that a CI job on another machine resumes where an earlier one stopped.
//!
//! Import verifies everything (the gzip stream, every entry's hash and size, the format version,
//! the bundle's prerequisites in the clone) before it writes anything; then it takes the state's
//! exclusive lock, so it never writes while an `apply` drives the state.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{create_private_dir_all, io, write_private, RunRecord, Store, StoreError};
use crate::workspace::git_sync;

/// What the manifest's `format` says: the file is a ccluster state archive.
pub const ARCHIVE_FORMAT: &str = "ccluster-state";
/// The version of the archive's layout; an importer refuses another (newer or unknown) one.
pub const ARCHIVE_VERSION: u32 = 1;

const MANIFEST: &str = "manifest.json";
const RECORDS: &str = "records.json";
const BUNDLE: &str = "refs.bundle";
/// The run directory's files are under this prefix in the archive.
const RUN_FILES: &str = "run/";
/// Files that are never exported: the copy of Claude credentials a worker holds while it runs
/// (and that may stay when a worker never started), and the live snapshot of a run in progress.
const NEVER_EXPORTED: &[&str] = &[".credentials.json"];

#[derive(Debug, thiserror::Error)]
pub enum PortableError {
    #[error("the archive `{file}` is damaged: {detail}")]
    Damaged { file: PathBuf, detail: String },
    #[error("`{file}` is not a ccluster state archive: {detail}")]
    NotAnArchive { file: PathBuf, detail: String },
    #[error("the archive `{file}` has format version {found}; this ccluster reads version {ARCHIVE_VERSION}")]
    Version { file: PathBuf, found: u32 },
    #[error("cannot read the archive `{file}`: {source}")]
    Unreadable {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Repository(String),
    #[error("the state already has run {run}")]
    Exists { run: String },
    #[error("cannot read or write `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PortableError {
    /// Refusals (nothing was written) as opposed to failures while writing.
    pub fn is_refusal(&self) -> bool {
        !matches!(self, PortableError::Io { .. })
    }
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> PortableError + '_ {
    move |source| PortableError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file of the archive as the manifest lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// The first entry of the archive.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// The ccluster that wrote it.
    pub ccluster: String,
    pub run: String,
    pub workflow: String,
    /// The commit the run's workspaces started from (none for a run without workspaces).
    pub base: Option<String>,
    /// The clusterfile's path as the run recorded it, and the SHA-256 of its recorded text.
    pub clusterfile: String,
    pub clusterfile_sha256: String,
    /// Where the state and the repository were on the exporting machine: absolute paths in the
    /// records that start with them are moved to the importing machine's.
    pub state_dir: String,
    pub repo: Option<String>,
    pub created_ms: u64,
    /// The refs in the bundle (`refs.bundle`), by name, with their commits.
    pub refs: BTreeMap<String, String>,
    pub entries: Vec<ManifestEntry>,
}

/// The database records of one run, as raw JSON values by tree and key (values as they are
/// stored, so nothing a newer record holds is dropped on the way).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PortableRecords {
    pub trees: BTreeMap<String, BTreeMap<String, Value>>,
}

/// Per tree: which of its keys belong to a run (`<run>\0...`).
const RUN_TREES: &[&str] = &["tasks", "attempts", "artifacts", "expansions"];

pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Store {
    fn tree_named(&self, name: &str) -> Option<&sled::Tree> {
        Some(match name {
            "runs" => &self.runs,
            "tasks" => &self.tasks,
            "attempts" => &self.attempts,
            "artifacts" => &self.artifacts,
            "expansions" => &self.expansions,
            "cache" => &self.cache,
            "last_success" => &self.last_success,
            "sources" => &self.sources,
            _ => return None,
        })
    }

    fn raw_scan(&self, tree: &str, prefix: &str) -> Result<BTreeMap<String, Value>, StoreError> {
        let mut out = BTreeMap::new();
        let Some(t) = self.tree_named(tree) else {
            return Ok(out);
        };
        for item in t.scan_prefix(prefix.as_bytes()) {
            let (key, bytes) = item.map_err(|e| self.db_error(e))?;
            let key = String::from_utf8_lossy(&key).into_owned();
            let value = serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt {
                key: key.clone(),
                source,
            })?;
            out.insert(key, value);
        }
        Ok(out)
    }

    /// The records of `run`: its run, tasks, attempts, artifacts and map expansions; the cache
    /// entries it produced or took (so a later run resumes from them as this one did); the
    /// `last_success` key parts of its nodes (for `plan --explain`).
    pub fn portable_records(&self, run: &RunRecord) -> Result<PortableRecords, StoreError> {
        let mut records = PortableRecords::default();
        let mut runs = self.raw_scan("runs", &run.id)?;
        runs.retain(|k, _| *k == run.id);
        records.trees.insert("runs".into(), runs);
        let prefix = format!("{}\0", run.id);
        for tree in RUN_TREES {
            records
                .trees
                .insert(tree.to_string(), self.raw_scan(tree, &prefix)?);
        }
        let tasks = self.tasks(&run.id)?;
        let keys: BTreeSet<&str> = tasks
            .iter()
            .filter_map(|t| t.cache_key.as_deref())
            .collect();
        let mut cache = self.raw_scan("cache", "")?;
        cache.retain(|key, entry| keys.contains(key.as_str()) || entry["run"] == run.id.as_str());
        records.trees.insert("cache".into(), cache);
        let nodes: BTreeSet<String> = tasks
            .iter()
            .map(|t| format!("{}\0{}", run.clusterfile, t.node))
            .collect();
        let mut last = self.raw_scan("last_success", &format!("{}\0", run.clusterfile))?;
        last.retain(|key, _| nodes.contains(key));
        records.trees.insert("last_success".into(), last);
        Ok(records)
    }

    fn raw_put(&self, tree: &str, key: &str, value: &Value) -> Result<(), StoreError> {
        let Some(t) = self.tree_named(tree) else {
            return Ok(());
        };
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Corrupt {
            key: key.to_string(),
            source,
        })?;
        t.insert(key.as_bytes(), bytes)
            .map(|_| ())
            .map_err(|e| self.db_error(e))
    }

    fn raw_remove_prefix(&self, tree: &str, prefix: &str) -> Result<(), StoreError> {
        let Some(t) = self.tree_named(tree) else {
            return Ok(());
        };
        let keys: Vec<sled::IVec> = t
            .scan_prefix(prefix.as_bytes())
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| self.db_error(e))?;
        for key in keys {
            t.remove(key).map_err(|e| self.db_error(e))?;
        }
        Ok(())
    }
}

/// What [`export_run`] wrote.
#[derive(Debug)]
pub struct Exported {
    pub manifest: Manifest,
    pub bytes: u64,
}

/// Writes run `run`'s archive to `file` (through a temporary file beside it, renamed when whole).
pub fn export_run(store: &Store, run: &RunRecord, file: &Path) -> Result<Exported, PortableError> {
    let records = store.portable_records(run)?;
    let mut entries: Vec<(String, Vec<u8>, u32)> = Vec::new();
    let records_json = serde_json::to_vec_pretty(&records).map_err(|e| PortableError::Io {
        path: file.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    entries.push((RECORDS.into(), records_json, 0o600));

    let state_dir = std::path::absolute(store.dir()).map_err(io_at(store.dir()))?;
    let run_dir = state_dir.join("runs").join(&run.id);
    let mut files = Vec::new();
    collect_files(&run_dir, &run_dir, &mut files).map_err(io_at(&run_dir))?;
    for (rel, path) in files {
        let bytes = std::fs::read(&path).map_err(io_at(&path))?;
        let mode = std::fs::metadata(&path).map_err(io_at(&path))?.mode_bits();
        entries.push((format!("{RUN_FILES}{rel}"), bytes, mode));
    }

    let mut refs = BTreeMap::new();
    if let Some(repo) = run.repo.as_deref().map(Path::new) {
        refs = run_refs(repo, run, &records)?;
        if !refs.is_empty() {
            let bundle = make_bundle(repo, &refs, run.base.as_deref())?;
            entries.push((BUNDLE.into(), bundle, 0o600));
        }
    }

    let manifest = Manifest {
        format: ARCHIVE_FORMAT.into(),
        version: ARCHIVE_VERSION,
        ccluster: env!("CARGO_PKG_VERSION").into(),
        run: run.id.clone(),
        workflow: run.workflow.clone(),
        base: run.base.clone(),
        clusterfile: run.clusterfile.clone(),
        clusterfile_sha256: sha256_hex(run.source.as_bytes()),
        state_dir: state_dir.display().to_string(),
        repo: run.repo.clone(),
        created_ms: super::now_ms(),
        refs,
        entries: entries
            .iter()
            .map(|(path, bytes, _)| ManifestEntry {
                path: path.clone(),
                size: bytes.len() as u64,
                sha256: sha256_hex(bytes),
            })
            .collect(),
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest).map_err(|e| PortableError::Io {
        path: file.to_path_buf(),
        source: std::io::Error::other(e),
    })?;

    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "state".into());
    let tmp = parent.join(format!(".{name}.{}.partial", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let out = super::private_file()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let gz = flate2::write::GzEncoder::new(out, flate2::Compression::default());
        let mut tar = tar::Builder::new(gz);
        append(&mut tar, MANIFEST, &manifest_json, 0o600)?;
        for (path, bytes, mode) in &entries {
            append(&mut tar, path, bytes, *mode)?;
        }
        let out = tar.into_inner()?.finish()?;
        out.sync_all()?;
        std::fs::rename(&tmp, file)?;
        std::fs::File::open(&parent)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_at(file)(e));
    }
    let bytes = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    Ok(Exported { manifest, bytes })
}

trait ModeBits {
    fn mode_bits(&self) -> u32;
}

impl ModeBits for std::fs::Metadata {
    /// Private either way; an executable kept file stays executable by its owner.
    fn mode_bits(&self) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        match self.permissions().mode() & 0o100 {
            0 => 0o600,
            _ => 0o700,
        }
    }
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    bytes: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(bytes.len() as u64);
    header.set_mode(mode);
    header.set_entry_type(tar::EntryType::Regular);
    // The archive is the same whenever the state is: no times from this machine in it.
    header.set_mtime(0);
    tar.append_data(&mut header, path, bytes)
}

/// Regular files under `dir`, as paths relative to `root` ('/'-separated), sorted; the live
/// snapshot and credentials are left out, and so is anything that is not a regular file (a
/// symlink could point anywhere on this machine).
fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir == root => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut entries: Vec<_> = entries.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let kind = entry.file_type()?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else if kind.is_file() {
            let rel = path
                .strip_prefix(root)
                .map_err(std::io::Error::other)?
                .to_string_lossy()
                .into_owned();
            if NEVER_EXPORTED.contains(&name.as_str()) || rel == crate::exec::LIVE_FILE {
                continue;
            }
            out.push((rel, path));
        }
    }
    Ok(())
}

/// The refs a run's resumption needs: its task refs and result branch, and the keep refs of the
/// cache entries it carries (a cached workspace result is used only while its commit exists).
fn run_refs(
    repo: &Path,
    run: &RunRecord,
    records: &PortableRecords,
) -> Result<BTreeMap<String, String>, PortableError> {
    let mut patterns = vec![
        run.task_refs_prefix(),
        format!("refs/heads/ccluster/{}/", run.id),
    ];
    if let Some(cache) = records.trees.get("cache") {
        patterns.extend(cache.keys().map(|key| format!("refs/ccluster/keep/{key}")));
    }
    let mut refs = BTreeMap::new();
    for chunk in patterns.chunks(200) {
        let mut args = vec!["for-each-ref", "--format=%(objectname) %(refname)"];
        args.extend(chunk.iter().map(String::as_str));
        let listed = git_sync(repo, &args).map_err(PortableError::Repository)?;
        for line in listed.lines() {
            if let Some((commit, name)) = line.split_once(' ') {
                refs.insert(name.to_string(), commit.to_string());
            }
        }
    }
    Ok(refs)
}

/// A bundle of `refs`, without what the base holds when it can (the importing clone has the base:
/// it is the commit it resumes from), else whole.
fn make_bundle(
    repo: &Path,
    refs: &BTreeMap<String, String>,
    base: Option<&str>,
) -> Result<Vec<u8>, PortableError> {
    let dir = tempfile::tempdir().map_err(io_at(&std::env::temp_dir()))?;
    let path = dir.path().join("refs.bundle");
    let path_text = path.display().to_string();
    let mut args = vec!["bundle", "create", "--quiet", path_text.as_str()];
    args.extend(refs.keys().map(String::as_str));
    let exclude = base.map(|b| format!("^{b}"));
    let mut with_base = args.clone();
    if let Some(ex) = &exclude {
        with_base.push(ex);
    }
    // Every ref at the base (tasks that changed nothing) leaves an empty bundle, which git
    // refuses: then the refs go whole.
    if git_sync(repo, &with_base).is_err() {
        git_sync(repo, &args).map_err(PortableError::Repository)?;
    }
    std::fs::read(&path).map_err(io_at(&path))
}

/// An archive read and verified in memory: nothing was written anywhere.
#[derive(Debug)]
pub struct VerifiedArchive {
    pub file: PathBuf,
    pub manifest: Manifest,
    pub records: PortableRecords,
    /// Run directory files: path relative to `runs/<run>/`, bytes, mode.
    pub files: Vec<(String, Vec<u8>, u32)>,
    pub bundle: Option<Vec<u8>>,
}

fn damaged(file: &Path, detail: impl Into<String>) -> PortableError {
    PortableError::Damaged {
        file: file.to_path_buf(),
        detail: detail.into(),
    }
}

/// A path from the archive that stays inside where it is unpacked: relative, no `..`.
fn safe_relative(path: &str) -> bool {
    !path.is_empty()
        && Path::new(path)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
}

/// Reads and verifies `file`: the gzip stream whole (its CRC catches a flipped byte, its length
/// a truncation), the manifest's format and version, every entry's size and SHA-256, no entry
/// missing or extra, no path leaving the run directory.
pub fn read_archive(file: &Path) -> Result<VerifiedArchive, PortableError> {
    let compressed = std::fs::read(file).map_err(|source| PortableError::Unreadable {
        file: file.to_path_buf(),
        source,
    })?;
    if compressed.len() < 2 || compressed[..2] != [0x1f, 0x8b] {
        return Err(PortableError::NotAnArchive {
            file: file.to_path_buf(),
            detail: "it is not gzip-compressed".into(),
        });
    }
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(&compressed[..])
        .read_to_end(&mut raw)
        .map_err(|e| damaged(file, format!("{e} (truncated or corrupted)")))?;
    let mut unpacked: BTreeMap<String, (Vec<u8>, u32)> = BTreeMap::new();
    let mut tar = tar::Archive::new(&raw[..]);
    for entry in tar.entries().map_err(|e| damaged(file, e.to_string()))? {
        let mut entry = entry.map_err(|e| damaged(file, e.to_string()))?;
        let kind = entry.header().entry_type();
        let path = entry
            .path()
            .map_err(|e| damaged(file, e.to_string()))?
            .to_string_lossy()
            .into_owned();
        if kind.is_dir() {
            continue;
        }
        if !kind.is_file() || !safe_relative(&path) {
            return Err(damaged(
                file,
                format!("entry `{path}` is not a plain file inside the archive"),
            ));
        }
        let mode = entry.header().mode().unwrap_or(0o600);
        let mut bytes = Vec::new();
        entry
            .read_to_end(&mut bytes)
            .map_err(|e| damaged(file, e.to_string()))?;
        if unpacked.insert(path.clone(), (bytes, mode)).is_some() {
            return Err(damaged(file, format!("entry `{path}` appears twice")));
        }
    }
    let (manifest_bytes, _) =
        unpacked
            .remove(MANIFEST)
            .ok_or_else(|| PortableError::NotAnArchive {
                file: file.to_path_buf(),
                detail: format!("it has no {MANIFEST}"),
            })?;
    let head: Value = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| damaged(file, format!("{MANIFEST}: {e}")))?;
    if head["format"] != ARCHIVE_FORMAT {
        return Err(PortableError::NotAnArchive {
            file: file.to_path_buf(),
            detail: format!("its manifest's format is {}", head["format"]),
        });
    }
    match head["version"].as_u64() {
        Some(v) if v == ARCHIVE_VERSION as u64 => {}
        found => {
            return Err(PortableError::Version {
                file: file.to_path_buf(),
                found: found
                    .and_then(|v| u32::try_from(v).ok())
                    .unwrap_or(u32::MAX),
            })
        }
    }
    let manifest: Manifest =
        serde_json::from_value(head).map_err(|e| damaged(file, format!("{MANIFEST}: {e}")))?;
    let listed: BTreeSet<&str> = manifest.entries.iter().map(|e| e.path.as_str()).collect();
    if let Some(extra) = unpacked.keys().find(|p| !listed.contains(p.as_str())) {
        return Err(damaged(
            file,
            format!("entry `{extra}` is not in the manifest"),
        ));
    }
    for entry in &manifest.entries {
        let Some((bytes, _)) = unpacked.get(&entry.path) else {
            return Err(damaged(file, format!("entry `{}` is missing", entry.path)));
        };
        if bytes.len() as u64 != entry.size || sha256_hex(bytes) != entry.sha256 {
            return Err(damaged(
                file,
                format!(
                    "entry `{}` does not match its SHA-256 in the manifest",
                    entry.path
                ),
            ));
        }
    }
    let (records_bytes, _) = unpacked
        .remove(RECORDS)
        .ok_or_else(|| damaged(file, format!("it has no {RECORDS}")))?;
    let records: PortableRecords = serde_json::from_slice(&records_bytes)
        .map_err(|e| damaged(file, format!("{RECORDS}: {e}")))?;
    let run = records
        .trees
        .get("runs")
        .and_then(|runs| runs.get(&manifest.run))
        .ok_or_else(|| {
            damaged(
                file,
                format!("{RECORDS} has no record of run {}", manifest.run),
            )
        })?;
    serde_json::from_value::<RunRecord>(run.clone())
        .map_err(|e| damaged(file, format!("the run record: {e}")))?;
    // A run id names a directory and a ref component: nothing but what ccluster makes them of.
    let is_name = |id: &str| {
        !id.is_empty()
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
    };
    if !is_name(&manifest.run) {
        return Err(damaged(
            file,
            format!("run id `{}` is not a name", manifest.run),
        ));
    }
    // Only the run's own refs and keep refs may be restored: never a branch of the user's.
    let run_refs = [
        format!("refs/ccluster/runs/{}/", manifest.run),
        format!("refs/heads/ccluster/{}/", manifest.run),
        "refs/ccluster/keep/".to_string(),
    ];
    if let Some(name) = manifest.refs.keys().find(|name| {
        !run_refs
            .iter()
            .any(|prefix| name.starts_with(prefix.as_str()))
    }) {
        return Err(damaged(
            file,
            format!("ref `{name}` is not one of the run's"),
        ));
    }
    let bundle = unpacked.remove(BUNDLE).map(|(b, _)| b);
    let mut files = Vec::new();
    for (path, (bytes, mode)) in unpacked {
        match path.strip_prefix(RUN_FILES) {
            Some(rel) if safe_relative(rel) => files.push((rel.to_string(), bytes, mode)),
            _ => return Err(damaged(file, format!("unexpected entry `{path}`"))),
        }
    }
    Ok(VerifiedArchive {
        file: file.to_path_buf(),
        manifest,
        records,
        files,
        bundle,
    })
}

/// What an import will do in a repository: its bundle verified against the clone.
pub struct CheckedRepo {
    pub root: PathBuf,
    bundle: Option<tempfile::NamedTempFile>,
}

/// Checks that the clone at `repo` can take the archive's refs: the base commit is there, and
/// `git bundle verify` finds every prerequisite. Writes nothing in the repository.
pub fn check_repo(archive: &VerifiedArchive, repo: &Path) -> Result<CheckedRepo, PortableError> {
    let root = crate::workspace::Repo::discover(repo)
        .map_err(|e| {
            PortableError::Repository(format!(
                "run {} has refs to restore, and `{}` is not in a git repository: {e}",
                archive.manifest.run,
                repo.display()
            ))
        })?
        .root;
    if let Some(base) = &archive.manifest.base {
        let found = git_sync(&root, &["cat-file", "-e", &format!("{base}^{{commit}}")]);
        if found.is_err() {
            return Err(PortableError::Repository(format!(
                "the repository `{}` does not have the run's base commit {base}; fetch it (in CI: a checkout with its history, `fetch-depth: 0`) and import again",
                root.display()
            )));
        }
    }
    let bundle = match &archive.bundle {
        None => None,
        Some(bytes) => {
            let mut tmp = tempfile::NamedTempFile::new().map_err(io_at(&std::env::temp_dir()))?;
            tmp.write_all(bytes).map_err(io_at(tmp.path()))?;
            let path = tmp.path().display().to_string();
            git_sync(&root, &["bundle", "verify", "--quiet", &path]).map_err(|e| {
                PortableError::Repository(format!(
                    "the archive's git bundle cannot be applied to `{}` (it lacks commits the bundle builds on): {e}",
                    root.display()
                ))
            })?;
            // The bundle holds the refs the manifest lists, at the commits it lists.
            let heads = git_sync(&root, &["bundle", "list-heads", &path])
                .map_err(PortableError::Repository)?;
            let heads: BTreeMap<String, String> = heads
                .lines()
                .filter_map(|l| l.split_once(' '))
                .map(|(commit, name)| (name.to_string(), commit.to_string()))
                .collect();
            if heads != archive.manifest.refs {
                return Err(damaged(
                    &archive.file,
                    "its git bundle's refs differ from the manifest's",
                ));
            }
            Some(tmp)
        }
    };
    Ok(CheckedRepo { root, bundle })
}

/// What [`import`] did.
#[derive(Debug, Default)]
pub struct Imported {
    pub run: String,
    pub replaced: bool,
    pub cache_entries: usize,
    pub refs: usize,
    pub files: usize,
}

/// Moves absolute paths of the exporting machine (its state directory, its repository) to this
/// one's, in every string of a record.
fn move_paths(value: &mut Value, moves: &[(String, String)]) {
    match value {
        Value::String(s) => {
            for (from, to) in moves {
                if let Some(rest) = s.strip_prefix(from.as_str()) {
                    if rest.is_empty() || rest.starts_with('/') {
                        *s = format!("{to}{rest}");
                        break;
                    }
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| move_paths(v, moves)),
        Value::Object(map) => map.values_mut().for_each(|v| move_paths(v, moves)),
        _ => {}
    }
}

/// Restores a verified archive into the state in `dir` (created if missing) and, when it carries
/// refs, into the checked repository. Takes the state's exclusive lock first: refused while
/// another process drives the state. A run the state already has is refused unless `force`, which
/// replaces its records and files. Cache entries merge: an imported entry replaces a local one
/// with the same key only when it is newer (each key keeps its last success).
pub fn import(
    dir: &Path,
    mut archive: VerifiedArchive,
    repo: Option<CheckedRepo>,
    force: bool,
) -> Result<Imported, PortableError> {
    let run_id = archive.manifest.run.clone();
    let run_dir = dir.join("runs").join(&run_id);
    // Checked before the state is opened (opening writes the lock file's pid): a refusal leaves
    // the directory as it was.
    if !force && run_dir.exists() {
        return Err(PortableError::Exists { run: run_id });
    }
    let store = Store::open(dir)?;
    let exists = store.run(&run_id)?.is_some();
    if exists && !force {
        return Err(PortableError::Exists { run: run_id });
    }
    let state_abs = std::path::absolute(dir).map_err(io_at(dir))?;
    let mut moves = vec![(
        archive.manifest.state_dir.clone(),
        state_abs.display().to_string(),
    )];
    if let (Some(from), Some(checked)) = (&archive.manifest.repo, &repo) {
        moves.push((from.clone(), checked.root.display().to_string()));
    }
    // Longest first: a state directory inside the repository moves as itself.
    moves.sort_by_key(|(from, _)| std::cmp::Reverse(from.len()));
    for tree in archive.records.trees.values_mut() {
        for value in tree.values_mut() {
            move_paths(value, &moves);
        }
    }

    // Which cache entries win: absent here, or newer than the one here.
    let mut cache_wins = Vec::new();
    if let Some(cache) = archive.records.trees.get("cache") {
        for (key, entry) in cache {
            let local: Option<Value> = store.get(&store.cache, key).unwrap_or(None);
            let newer = match &local {
                None => true,
                Some(local) => {
                    entry["finished_ms"].as_u64().unwrap_or(0)
                        > local["finished_ms"].as_u64().unwrap_or(0)
                }
            };
            if newer {
                cache_wins.push(key.clone());
            }
        }
    }

    // The run directory, staged beside its place and renamed into it whole.
    let runs = dir.join("runs");
    create_private_dir_all(&runs).map_err(io(dir))?;
    let staging = runs.join(format!(".import-{run_id}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    let staged = (|| -> std::io::Result<()> {
        create_private_dir_all(&staging)?;
        for (rel, bytes, mode) in &archive.files {
            let path = staging.join(rel);
            if let Some(parent) = path.parent() {
                create_private_dir_all(parent)?;
            }
            write_private(&path, bytes)?;
            use std::os::unix::fs::PermissionsExt;
            let mode = if mode & 0o100 != 0 { 0o700 } else { 0o600 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        }
        Ok(())
    })();
    if let Err(e) = staged {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(io_at(&staging)(e));
    }

    // Refs: the run's, and the keep refs of the cache entries that win.
    let mut refs = 0;
    if let Some(checked) = &repo {
        if let Some(bundle) = &checked.bundle {
            let wanted: Vec<String> = archive
                .manifest
                .refs
                .keys()
                .filter(|name| match name.strip_prefix("refs/ccluster/keep/") {
                    Some(key) => cache_wins.iter().any(|k| k == key),
                    None => true,
                })
                .map(|name| format!("+{name}:{name}"))
                .collect();
            if !wanted.is_empty() {
                let path = bundle.path().display().to_string();
                let mut args = vec![
                    "fetch",
                    // Every ref or none: a failed fetch leaves the repository as it was.
                    "--atomic",
                    "--quiet",
                    "--no-tags",
                    "--no-write-fetch-head",
                    path.as_str(),
                ];
                args.extend(wanted.iter().map(String::as_str));
                if let Err(e) = git_sync(&checked.root, &args) {
                    let _ = std::fs::remove_dir_all(&staging);
                    return Err(PortableError::Repository(e));
                }
                refs = wanted.len();
            }
        }
    }

    if force {
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    if let Err(e) = std::fs::rename(&staging, &run_dir) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(io_at(&run_dir)(e));
    }

    let clusterfile_prefix = format!("{}\0", archive.manifest.clusterfile);
    let written = (|| -> Result<usize, StoreError> {
        let prefix = format!("{run_id}\0");
        if exists {
            for tree in RUN_TREES {
                store.raw_remove_prefix(tree, &prefix)?;
            }
        }
        let mut cache_entries = 0;
        for (tree, values) in &archive.records.trees {
            for (key, value) in values {
                let belongs = match tree.as_str() {
                    "runs" => *key == run_id,
                    "cache" => {
                        let wins = cache_wins.contains(key);
                        cache_entries += usize::from(wins);
                        wins
                    }
                    "last_success" => key.starts_with(&clusterfile_prefix),
                    t if RUN_TREES.contains(&t) => key.starts_with(&prefix),
                    _ => false,
                };
                if belongs {
                    store.raw_put(tree, key, value)?;
                }
            }
        }
        if let Some(run) = archive
            .records
            .trees
            .get("runs")
            .and_then(|r| r.get(&run_id))
        {
            if let (Ok(run), Some(archiver)) = (
                serde_json::from_value::<RunRecord>(run.clone()),
                &store.archiver,
            ) {
                // A finished run's `record.json` is written again, with this machine's paths.
                archiver.run_written(&run);
            }
        }
        store.commit()?;
        Ok(cache_entries)
    })();
    match written {
        Ok(cache_entries) => Ok(Imported {
            run: run_id,
            replaced: exists,
            cache_entries,
            refs,
            files: archive.files.len(),
        }),
        Err(e) => {
            // The records did not land: the files go too, so the state has no half-run.
            let _ = std::fs::remove_dir_all(&run_dir);
            // A failure while writing, not a refusal: the refs may have been fetched already.
            Err(PortableError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::other(e.to_string()),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{CacheEntry, RunState, TaskRecord, TaskState, ARCHIVE_FILE};

    fn run_record(id: &str, state_dir: &Path) -> RunRecord {
        RunRecord {
            id: id.into(),
            workflow: "w".into(),
            clusterfile: "clusterfile.toml".into(),
            state: RunState::Failed,
            pid: 1,
            started_ms: 1,
            finished_ms: Some(2),
            inputs: serde_json::Value::Null,
            source: "version = 1\n".into(),
            repo: None,
            base: None,
            result: Some(state_dir.join("runs").display().to_string()),
            keep_failed: false,
            task_refs: None,
            templates: Default::default(),
            rehearsed: false,
            started_by: None,
            policy: None,
        }
    }

    /// A state with one run (`r1`: a succeeded task and its cache entry, a log, a credentials
    /// copy), and another run's cache entry that must not travel.
    fn state_with_a_run(dir: &Path) -> RunRecord {
        let store = Store::open(dir).unwrap();
        let run = run_record("r1", dir);
        store.put_run(&run).unwrap();
        let mut task = TaskRecord::pending("t".into(), "t".into(), 0);
        task.state = TaskState::Succeeded;
        task.cache_key = Some("k1".into());
        store.put_task("r1", &task).unwrap();
        let entry = |run: &str| CacheEntry {
            run: run.into(),
            node: "t".into(),
            output: serde_json::json!("out"),
            finished_ms: 5,
            commit: None,
        };
        store.put_cache("k1", &entry("r1")).unwrap();
        store.put_cache("k2", &entry("r0")).unwrap();
        store.commit().unwrap();
        let logs = dir.join("runs/r1/logs");
        std::fs::create_dir_all(&logs).unwrap();
        std::fs::write(logs.join("t.1.out"), "hello\n").unwrap();
        let config = dir.join("runs/r1/workers/t.1/config");
        std::fs::create_dir_all(&config).unwrap();
        std::fs::write(config.join(".credentials.json"), "secret").unwrap();
        run
    }

    #[test]
    fn a_run_moves_with_its_records_files_and_cache_but_not_credentials() {
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let run = state_with_a_run(from.path());
        let file = from.path().join("r1.tgz");
        {
            let store = Store::open_reader(from.path()).unwrap();
            let done = export_run(&store, &run, &file).unwrap();
            assert!(done.manifest.refs.is_empty());
        }
        let archive = read_archive(&file).unwrap();
        let names: Vec<&str> = archive.files.iter().map(|(p, _, _)| p.as_str()).collect();
        // The finished run's `record.json` travels; the credentials copy never does.
        assert_eq!(names, ["logs/t.1.out", ARCHIVE_FILE]);
        let target = to.path().join("state");
        let done = import(&target, archive, None, false).unwrap();
        assert_eq!((done.cache_entries, done.files), (1, 2));
        let store = Store::open_reader(&target).unwrap();
        let imported = store.run("r1").unwrap().unwrap();
        // Paths of the exporting state now name this one.
        let moved = std::path::absolute(&target).unwrap().join("runs");
        assert_eq!(imported.result.as_deref(), Some(moved.to_str().unwrap()));
        assert_eq!(store.tasks("r1").unwrap().len(), 1);
        assert!(store.cached("k1").unwrap().is_some());
        assert!(store.cached("k2").unwrap().is_none());
        drop(store);
        assert_eq!(
            std::fs::read_to_string(target.join("runs/r1/logs/t.1.out")).unwrap(),
            "hello\n"
        );
        let again = import(&target, read_archive(&file).unwrap(), None, false);
        assert!(matches!(again, Err(PortableError::Exists { .. })));
    }

    /// A hand-made archive with `manifest` (entries and hashes filled in) and `entries`.
    fn craft(dir: &Path, mut manifest: Value, entries: &[(&str, &[u8])]) -> PathBuf {
        manifest["entries"] = entries
            .iter()
            .map(|(path, bytes)| {
                serde_json::json!({"path": path, "size": bytes.len(), "sha256": sha256_hex(bytes)})
            })
            .collect();
        let file = dir.join("crafted.tgz");
        let out = std::fs::File::create(&file).unwrap();
        let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
            out,
            flate2::Compression::default(),
        ));
        append(
            &mut tar,
            MANIFEST,
            &serde_json::to_vec(&manifest).unwrap(),
            0o600,
        )
        .unwrap();
        for (path, bytes) in entries {
            // `append_data` refuses `..`: a raw header is what a hostile archive would carry.
            let mut header = tar::Header::new_old();
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_size(bytes.len() as u64);
            header.set_mode(0o600);
            header.set_entry_type(tar::EntryType::Regular);
            header.set_cksum();
            tar.append(&header, *bytes).unwrap();
        }
        tar.into_inner().unwrap().finish().unwrap();
        file
    }

    fn manifest_for(dir: &Path, refs: Value) -> Value {
        let run = serde_json::to_value(run_record("r1", dir)).unwrap();
        serde_json::json!({
            "format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "ccluster": "0", "run": "r1",
            "workflow": "w", "base": null, "clusterfile": "clusterfile.toml",
            "clusterfile_sha256": "", "state_dir": "/x", "repo": null, "created_ms": 0,
            "refs": refs, "entries": [], "_run": run,
        })
    }

    fn records(dir: &Path) -> Vec<u8> {
        let run = serde_json::to_value(run_record("r1", dir)).unwrap();
        serde_json::to_vec(&serde_json::json!({"trees": {"runs": {"r1": run}}})).unwrap()
    }

    #[test]
    fn hostile_archives_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let records = records(dir.path());
        let escaping = craft(
            dir.path(),
            manifest_for(dir.path(), serde_json::json!({})),
            &[("records.json", &records), ("run/../../evil", b"x")],
        );
        let err = read_archive(&escaping).unwrap_err().to_string();
        assert!(err.contains("not a plain file inside the archive"), "{err}");

        let foreign_ref = craft(
            dir.path(),
            manifest_for(
                dir.path(),
                serde_json::json!({"refs/heads/main": "0000000000000000000000000000000000000000"}),
            ),
            &[("records.json", &records)],
        );
        let err = read_archive(&foreign_ref).unwrap_err().to_string();
        assert!(
            err.contains("ref `refs/heads/main` is not one of the run's"),
            "{err}"
        );

        let mut newer = manifest_for(dir.path(), serde_json::json!({}));
        newer["version"] = (ARCHIVE_VERSION + 1).into();
        let newer = craft(dir.path(), newer, &[("records.json", &records)]);
        assert!(matches!(
            read_archive(&newer),
            Err(PortableError::Version { found, .. }) if found == ARCHIVE_VERSION + 1
        ));
    }

    #[test]
    fn paths_move_only_at_a_component_boundary() {
        let mut value = serde_json::json!({
            "a": "/old/state/runs/x", "b": ["/old/state"], "c": "/old/stateful", "d": "rel/old/state",
        });
        move_paths(&mut value, &[("/old/state".into(), "/new".into())]);
        assert_eq!(
            value,
            serde_json::json!({"a": "/new/runs/x", "b": ["/new"], "c": "/old/stateful", "d": "rel/old/state"})
        );
    }
}
