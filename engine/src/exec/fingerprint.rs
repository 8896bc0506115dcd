//! What a task reads, as cache key parts: the files of a task without a workspace (its `sources`
//! globs, or by default the repository's tracked files as they are on disk), and the trees a
//! workspace task starts from. The clusterfile and its lock file are left out of both, so that
//! editing the clusterfile re-runs only the tasks whose own definitions changed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fingerprints of one run (or one `plan --explain`), each computed once.
pub struct Fingerprints {
    /// The repository's top directory, when the clusterfile is in one.
    root: Option<PathBuf>,
    /// The clusterfile's directory: `sources` globs are relative to it.
    base_dir: PathBuf,
    /// Repository-relative paths that never count: the clusterfile and `clusterfile.lock`.
    excluded: Vec<String>,
    /// Never read as a source: ccluster's own state.
    state_dir: PathBuf,
    repository: Option<String>,
    trees: HashMap<String, String>,
    globs: HashMap<Vec<String>, String>,
    /// The files behind each `sources` fingerprint computed, to record and to compare.
    entries: HashMap<String, Vec<Entry>>,
    /// The fingerprints whose manifest was handed out to be recorded: once per run is enough
    /// (making one reads the repository's tree, which 1,000 tiny tasks must not do each).
    recorded: std::collections::HashSet<String>,
}

/// One file as it enters a fingerprint: its path and the id of its content (`<mode> <oid>` for
/// a tracked file, the BLAKE3 hash for a declared source, `deleted`).
type Entry = (String, String);

/// What a `sources` fingerprint was made of, kept in the state so that `plan --explain` can name
/// the files that changed since. The repository's files are kept as the commit they were at and
/// the files that differed from it on disk, not as thousands of entries.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Manifest {
    Files(Vec<Entry>),
    Repository {
        head: String,
        /// Entries that differ from `head`'s tree; `absent` for a file `head` has and the
        /// fingerprint did not.
        differing: Vec<Entry>,
    },
}

impl Fingerprints {
    /// `clusterfile`: the clusterfile's path (relative to the working directory or absolute).
    pub fn new(clusterfile: &Path, base_dir: &Path, state_dir: &Path) -> Fingerprints {
        let base_dir = if base_dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base_dir.to_path_buf()
        };
        let root = git(&base_dir, &["rev-parse", "--show-toplevel"], None)
            .ok()
            .map(|s| PathBuf::from(String::from_utf8_lossy(&s).trim_end_matches('\n')));
        let mut excluded = Vec::new();
        if let Some(root) = &root {
            let canonical = |p: &Path| std::fs::canonicalize(p).ok();
            let file = clusterfile.file_name().map(PathBuf::from);
            if let (Some(dir), Some(root), Some(file)) =
                (canonical(&base_dir), canonical(root), file)
            {
                if let Ok(rel) = dir.strip_prefix(&root) {
                    for name in [file, PathBuf::from("clusterfile.lock")] {
                        excluded.push(rel.join(name).to_string_lossy().into_owned());
                    }
                }
            }
        }
        Fingerprints {
            root,
            base_dir,
            excluded,
            state_dir: std::fs::canonicalize(state_dir).unwrap_or_else(|_| state_dir.to_path_buf()),
            repository: None,
            trees: HashMap::new(),
            globs: HashMap::new(),
            entries: HashMap::new(),
            recorded: Default::default(),
        }
    }

    /// The repository-relative paths left out of every fingerprint.
    pub fn excluded(&self) -> &[String] {
        &self.excluded
    }

    /// The `sources` key part of a task without a workspace: its globs' files by content; with
    /// none declared, the repository's tracked files as they are on disk (`None` outside a
    /// repository: there, an undeclared task is keyed on its definition alone); `None` for
    /// `sources = []`.
    pub fn sources(&mut self, declared: Option<&[String]>) -> Result<Option<String>, String> {
        match declared {
            Some([]) => Ok(None),
            Some(globs) => {
                if let Some(hit) = self.globs.get(globs) {
                    return Ok(Some(hit.clone()));
                }
                let entries = self.glob_entries(globs)?;
                let id = digest(&entries);
                self.globs.insert(globs.to_vec(), id.clone());
                self.entries.insert(id.clone(), entries);
                Ok(Some(id))
            }
            None => {
                if self.root.is_none() {
                    return Ok(None);
                }
                if self.repository.is_none() {
                    let entries = self.repository_entries()?;
                    let id = digest(&entries);
                    self.entries.insert(id.clone(), entries);
                    self.repository = Some(id);
                }
                Ok(self.repository.clone())
            }
        }
    }

    /// The id of a commit's tree without the clusterfile and its lock file.
    pub fn tree(&mut self, commit: &str) -> Result<String, String> {
        if let Some(hit) = self.trees.get(commit) {
            return Ok(hit.clone());
        }
        let root = self
            .root
            .clone()
            .ok_or("workspaces need a git repository")?;
        let out = git(
            &root,
            &["ls-tree", "-r", "-z", "--full-tree", commit, "--"],
            None,
        )?;
        let mut entries: Vec<Entry> = Vec::new();
        for record in out.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let record = String::from_utf8_lossy(record);
            // `<mode> <type> <oid>\t<path>`
            let Some((meta, path)) = record.split_once('\t') else {
                continue;
            };
            if self.excluded.iter().any(|e| e == path) {
                continue;
            }
            entries.push((path.to_string(), meta.to_string()));
        }
        let id = digest(&entries);
        self.trees.insert(commit.to_string(), id.clone());
        Ok(id)
    }

    /// The `base` key part of a workspace task: the tree it starts from, or, when it builds on
    /// needed tasks' results, their node ids and trees (in `needs` order, instances in index
    /// order). Trees, not commits: a result reused on a newer base is the same tree.
    pub fn base(
        &mut self,
        run_base: &str,
        inputs: &[crate::workspace::Input],
    ) -> Result<String, String> {
        if inputs.is_empty() {
            return self.tree(run_base);
        }
        let mut parts = Vec::with_capacity(inputs.len());
        for input in inputs {
            parts.push((input.node.clone(), self.tree(&input.commit)?));
        }
        Ok(super::context::hash_of(&parts))
    }

    /// The tracked files of the repository: their index entries, with the content of those that
    /// differ on disk hashed as git would (deleted ones marked).
    fn repository_entries(&self) -> Result<Vec<Entry>, String> {
        let root = self.root.as_deref().ok_or("not in a git repository")?;
        let listed = git(root, &["ls-files", "-s", "-z", "--full-name"], None)?;
        let mut entries: Vec<Entry> = Vec::new();
        for record in listed.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let record = String::from_utf8_lossy(record);
            // `<mode> <oid> <stage>\t<path>`
            let Some((meta, path)) = record.split_once('\t') else {
                continue;
            };
            if self.excluded.iter().any(|e| e == path) || self.in_state_dir(root, path) {
                continue;
            }
            let mut f = meta.split(' ');
            let (mode, oid) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
            entries.push((path.to_string(), format!("{mode} {oid}")));
        }
        // Files whose content on disk differs from the index (by stat; content decides below).
        let changed = git(root, &["diff-files", "--name-only", "-z"], None)?;
        let changed: Vec<String> = changed
            .split(|&b| b == 0)
            .filter(|r| !r.is_empty())
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect();
        let (present, deleted): (Vec<&String>, Vec<&String>) = changed
            .iter()
            .partition(|p| std::fs::symlink_metadata(root.join(p)).is_ok());
        let mut now: HashMap<&str, String> = HashMap::new();
        for path in deleted {
            now.insert(path, "deleted".into());
        }
        if !present.is_empty() {
            // The blob ids git would give them: a file whose stat changed but content did not
            // keeps its id, so a touched file does not change the key.
            let mut paths = Vec::new();
            for p in &present {
                paths.extend_from_slice(p.as_bytes());
                paths.push(b'\n');
            }
            let out = git(root, &["hash-object", "--stdin-paths"], Some(&paths))?;
            let ids = String::from_utf8_lossy(&out);
            for (p, id) in present.iter().zip(ids.lines()) {
                now.insert(p, id.to_string());
            }
        }
        for (path, meta) in &mut entries {
            if let Some(id) = now.get(path.as_str()) {
                *meta = if id == "deleted" {
                    id.clone()
                } else {
                    let mode = meta.split(' ').next().unwrap_or("");
                    format!("{mode} {id}")
                };
            }
        }
        Ok(entries)
    }

    /// The manifest of a `sources` fingerprint this run computed, the first time it is asked for
    /// in this run; `None` afterwards.
    pub fn manifest_to_record(&mut self, id: &str) -> Option<Manifest> {
        if !self.recorded.insert(id.to_string()) {
            return None;
        }
        self.manifest(id)
    }

    /// The manifest of a `sources` fingerprint this run computed.
    pub fn manifest(&self, id: &str) -> Option<Manifest> {
        let entries = self.entries.get(id)?;
        if self.repository.as_deref() != Some(id) {
            return Some(Manifest::Files(entries.clone()));
        }
        let root = self.root.as_deref()?;
        let head = git(root, &["rev-parse", "--verify", "--quiet", "HEAD"], None).ok()?;
        let head = String::from_utf8_lossy(&head).trim().to_string();
        let at_head = self.head_entries(&head).ok()?;
        let now: HashMap<&str, &str> = entries
            .iter()
            .map(|(p, m)| (p.as_str(), m.as_str()))
            .collect();
        let before: HashMap<&str, &str> = at_head
            .iter()
            .map(|(p, m)| (p.as_str(), m.as_str()))
            .collect();
        let mut differing: Vec<Entry> = entries
            .iter()
            .filter(|(p, m)| before.get(p.as_str()) != Some(&m.as_str()))
            .cloned()
            .collect();
        differing.extend(
            at_head
                .iter()
                .filter(|(p, _)| !now.contains_key(p.as_str()))
                .map(|(p, _)| (p.clone(), "absent".to_string())),
        );
        Some(Manifest::Repository { head, differing })
    }

    /// The files that differ between a recorded manifest and a fingerprint of this run, as
    /// `path` or `path (deleted)` / `path (new)`, sorted; `None` when the old one cannot be read.
    pub fn changed_files(&self, old: &Manifest, new_id: &str) -> Option<Vec<String>> {
        let new = self.entries.get(new_id)?;
        let old: Vec<Entry> = match old {
            Manifest::Files(entries) => entries.clone(),
            Manifest::Repository { head, differing } => {
                let mut at: HashMap<String, String> =
                    self.head_entries(head).ok()?.into_iter().collect();
                for (p, m) in differing {
                    if m == "absent" {
                        at.remove(p);
                    } else {
                        at.insert(p.clone(), m.clone());
                    }
                }
                at.into_iter().collect()
            }
        };
        let old: HashMap<&str, &str> = old.iter().map(|(p, m)| (p.as_str(), m.as_str())).collect();
        let now: HashMap<&str, &str> = new.iter().map(|(p, m)| (p.as_str(), m.as_str())).collect();
        let mut out: Vec<String> = Vec::new();
        for (p, m) in &now {
            match old.get(p) {
                None if *m != "deleted" => out.push(format!("{p} (new)")),
                Some(o) if o != m => out.push(if *m == "deleted" {
                    format!("{p} (deleted)")
                } else {
                    p.to_string()
                }),
                _ => {}
            }
        }
        for p in old.keys().filter(|p| !now.contains_key(*p)) {
            out.push(format!("{p} (deleted)"));
        }
        out.sort();
        Some(out)
    }

    /// A commit's files as the default fingerprint counts them: `<mode> <oid>` by path.
    fn head_entries(&self, commit: &str) -> Result<Vec<Entry>, String> {
        let root = self.root.as_deref().ok_or("not in a git repository")?;
        let out = git(
            root,
            &["ls-tree", "-r", "-z", "--full-tree", commit, "--"],
            None,
        )?;
        let mut entries = Vec::new();
        for record in out.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let record = String::from_utf8_lossy(record);
            let Some((meta, path)) = record.split_once('\t') else {
                continue;
            };
            if self.excluded.iter().any(|e| e == path) || self.in_state_dir(root, path) {
                continue;
            }
            let mut f = meta.split(' ');
            let (mode, oid) = (f.next().unwrap_or(""), f.nth(1).unwrap_or(""));
            entries.push((path.to_string(), format!("{mode} {oid}")));
        }
        Ok(entries)
    }

    fn in_state_dir(&self, root: &Path, path: &str) -> bool {
        root.join(path).starts_with(&self.state_dir)
    }

    /// The regular files the globs match under the clusterfile's directory, each with the hash
    /// of its content. The walk is the artifacts' (`workspace::artifacts::matching`): it never
    /// follows a symbolic link nor enters `.git` or a state directory.
    fn glob_entries(&self, globs: &[String]) -> Result<Vec<Entry>, String> {
        let base = std::fs::canonicalize(&self.base_dir)
            .map_err(|e| format!("cannot read {}: {e}", self.base_dir.display()))?;
        let mut entries: Vec<Entry> = Vec::new();
        for rel in crate::workspace::artifacts::matching(&base, globs) {
            let path = base.join(&rel);
            if !std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
                continue;
            }
            let bytes =
                std::fs::read(&path).map_err(|e| format!("cannot read source `{rel}`: {e}"))?;
            entries.push((rel, blake3::hash(&bytes).to_hex().to_string()));
        }
        entries.sort();
        entries.dedup();
        Ok(entries)
    }
}

fn digest(entries: &[Entry]) -> String {
    let mut h = blake3::Hasher::new();
    for (path, id) in entries {
        h.update(path.as_bytes());
        h.update(b"\0");
        h.update(id.as_bytes());
        h.update(b"\0");
    }
    h.finalize().to_hex()[..16].to_string()
}

/// Runs a read-only git command (in git's clean environment, hooks off, no optional locks, no
/// file system monitor); its stdout.
fn git(dir: &Path, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let args: Vec<&str> = ["-c", "core.fsmonitor=false"]
        .into_iter()
        .chain(args.iter().copied())
        .collect();
    crate::workspace::git_sync_with(dir, &args, &[], stdin)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn sh(dir: &Path, script: &str) {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@localhost")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@localhost")
            .status()
            .unwrap()
            .success();
        assert!(ok, "{script}");
    }

    fn repository(dir: &Path) -> Option<String> {
        Fingerprints::new(&dir.join("clusterfile.toml"), dir, &dir.join(".ccluster"))
            .sources(None)
            .unwrap()
    }

    #[test]
    fn the_default_follows_tracked_files_on_disk_but_not_the_clusterfile_or_untracked_files() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        sh(
            dir,
            "git init -q && echo a > a.rs && echo v1 > clusterfile.toml && git add . && git commit -qm 1",
        );
        let first = repository(dir).expect("a repository has a default");
        sh(dir, "echo v2 > clusterfile.toml && echo out > untracked.txt && mkdir -p .ccluster && echo x > .ccluster/x");
        assert_eq!(
            repository(dir).as_ref(),
            Some(&first),
            "clusterfile, untracked and state do not count"
        );
        sh(dir, "touch a.rs");
        assert_eq!(
            repository(dir).as_ref(),
            Some(&first),
            "a touched file keeps its content id"
        );
        sh(dir, "echo b > a.rs");
        let edited = repository(dir).unwrap();
        assert_ne!(edited, first, "an uncommitted edit counts");
        sh(dir, "git rm -qf a.rs && git commit -qm gone");
        let deleted = repository(dir).unwrap();
        assert_ne!(deleted, first);
        assert_ne!(deleted, edited);
    }

    #[test]
    fn a_manifest_is_handed_out_to_be_recorded_once_per_run() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        sh(
            dir,
            "git init -q && echo a > a.rs && git add . && git commit -qm 1",
        );
        let mut prints =
            Fingerprints::new(&dir.join("clusterfile.toml"), dir, &dir.join(".ccluster"));
        let id = prints.sources(None).unwrap().unwrap();
        assert!(matches!(
            prints.manifest_to_record(&id),
            Some(Manifest::Repository { .. })
        ));
        // Every later success of the run shares it: reading the tree again would cost each one.
        assert!(prints.manifest_to_record(&id).is_none());
        assert!(prints.manifest(&id).is_some());
    }

    #[test]
    fn declared_sources_hash_content_and_stay_inside_the_directory() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("src/a.rs"), "a").unwrap();
        std::fs::write(outside.path().join("secret"), "s").unwrap();
        std::os::unix::fs::symlink(outside.path(), dir.join("src/out")).unwrap();
        let globs = vec!["src/**/*".to_string()];
        let key = |dir: &Path| {
            Fingerprints::new(&dir.join("clusterfile.toml"), dir, &dir.join(".ccluster"))
                .sources(Some(&globs))
                .unwrap()
                .unwrap()
        };
        let first = key(dir);
        std::fs::write(outside.path().join("secret"), "changed").unwrap();
        assert_eq!(
            key(dir),
            first,
            "a symlink out of the directory is not followed"
        );
        std::fs::write(dir.join("src/a.rs"), "b").unwrap();
        assert_ne!(key(dir), first);
        let mut none = Fingerprints::new(&dir.join("c.toml"), dir, &dir.join(".ccluster"));
        assert_eq!(
            none.sources(Some(&[])).unwrap(),
            None,
            "`sources = []` opts out"
        );
        assert_eq!(
            none.sources(None).unwrap(),
            None,
            "no repository, no default"
        );
    }
}
