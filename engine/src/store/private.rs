//! Owner-only files and directories for the state: logs, transcripts and input values must not be
//! readable by other users of a shared machine.
//!
//! The process umask is left alone: ccluster runs tasks in the user's repository, and their files
//! must keep the modes the user expects. Instead every directory ccluster makes under the state is
//! created 0700 (the state directory first, so nothing inside is reachable by anyone else whatever
//! its own mode, sled's files included) and every file it writes there 0600.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the directories ccluster creates in the state.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of the files ccluster writes in the state.
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents, each readable by the owner only. Directories that exist
/// already keep their mode.
pub fn create_private_dir_all(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
}

/// Options that create a file readable by the owner only (when it does not exist yet).
pub fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(PRIVATE_FILE_MODE);
    options
}

/// Creates (or truncates) `path`, readable by the owner only, and writes `bytes` to it.
pub fn write_private(path: &Path, bytes: impl AsRef<[u8]>) -> std::io::Result<()> {
    let mut file: File = private_file()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.write_all(bytes.as_ref())
}

/// How an existing state directory was found open to other users.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LooseState {
    /// Its permission bits as found (`0o755`).
    pub mode: u32,
    /// Whether ccluster narrowed it to 0700 (only a directory holding nothing but state).
    pub tightened: bool,
}

impl std::fmt::Display for LooseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tightened {
            true => write!(
                f,
                "was readable by other users (mode {:04o}); its mode is now 0700",
                self.mode
            ),
            false => write!(
                f,
                "is readable by other users (mode {:04o}): its logs, transcripts and recorded inputs are exposed",
                self.mode
            ),
        }
    }
}

/// What a state directory may hold: anything else means it is shared with something that is not
/// ccluster's (`--state-dir` pointed at a directory in use), whose mode ccluster must not change.
const STATE_ENTRIES: &[&str] = &["lock", "db", "runs", "templates", "worktrees"];

/// Checks the mode of an existing state directory: `None` when no one but its owner can enter
/// it. When `tighten` is set and the directory holds nothing but state, it is narrowed to 0700.
pub fn check_state_dir(dir: &Path, tighten: bool) -> Option<LooseState> {
    let mode = std::fs::metadata(dir).ok()?.permissions().mode() & 0o7777;
    if mode & 0o077 == 0 {
        return None;
    }
    let only_state = std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .all(|e| STATE_ENTRIES.contains(&e.file_name().to_string_lossy().as_ref()))
    });
    let tightened = tighten
        && only_state
        && std::fs::set_permissions(dir, std::fs::Permissions::from_mode(PRIVATE_DIR_MODE)).is_ok();
    Some(LooseState { mode, tightened })
}

/// Whether `dir` is a ccluster state directory (its lock file and a sled database), wherever it
/// is: globs never descend into one.
pub fn is_state_dir(dir: &Path) -> bool {
    dir.join("lock").is_file() && dir.join("db").join("conf").is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn created_directories_and_files_are_the_owners_only() {
        let dir = tempfile::tempdir().unwrap();
        let deep = dir.path().join("a/b/c");
        create_private_dir_all(&deep).unwrap();
        for d in ["a", "a/b", "a/b/c"] {
            assert_eq!(mode(&dir.path().join(d)), 0o700, "{d}");
        }
        let file = deep.join("f");
        write_private(&file, b"x").unwrap();
        assert_eq!(mode(&file), 0o600);
    }

    #[test]
    fn a_loose_state_directory_is_tightened_only_when_it_holds_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(state.join("db")).unwrap();
        std::fs::write(state.join("lock"), "").unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Only checked: reported, left as it is.
        let found = check_state_dir(&state, false).unwrap();
        assert_eq!((found.mode, found.tightened), (0o755, false));
        assert_eq!(mode(&state), 0o755);
        // Someone else's file in it: reported, never changed.
        std::fs::write(state.join("notes.txt"), "").unwrap();
        assert!(!check_state_dir(&state, true).unwrap().tightened);
        assert_eq!(mode(&state), 0o755);
        std::fs::remove_file(state.join("notes.txt")).unwrap();
        let found = check_state_dir(&state, true).unwrap();
        assert_eq!((found.mode, found.tightened), (0o755, true));
        assert_eq!(mode(&state), 0o700);
        assert_eq!(check_state_dir(&state, true), None);
    }
}
