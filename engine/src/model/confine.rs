//! Files a clusterfile names (path templates, `output_schema` files) are read only from inside
//! its repository: where that is, and how a file is read without leaving it.

use std::path::{Path, PathBuf};

use super::fetch;

/// The largest template file read from disk; anything bigger is not a workflow someone wrote.
const MAX_TEMPLATE_BYTES: u64 = 16 << 20;

/// The directory path templates used from `dir` must stay inside: the top of its git
/// repository, else `dir` itself; canonical, so symbolic links cannot lead out of it.
///
/// The top is the nearest directory holding `.git` (a directory, or the file of a linked worktree
/// or submodule), found by looking, as git itself starts: the compiler runs no program.
pub fn confinement_root(dir: &Path) -> PathBuf {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return dir.to_path_buf();
    };
    dir.ancestors()
        .find(|d| std::fs::symlink_metadata(d.join(".git")).is_ok())
        .unwrap_or(&dir)
        .to_path_buf()
}

/// Reads a file a clusterfile names (`what`: "templates", "`output_schema` files") as
/// a path template is read: a regular file of at most 16 MiB inside `root`.
pub(crate) fn read_inside(path: &Path, root: &Path, what: &str) -> Result<String, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let shown = fetch::printable(&path.display().to_string());
    let real = std::fs::canonicalize(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    if !real.starts_with(root) {
        return Err(format!(
            "`{shown}` is outside the repository ({}); {what} are read only from inside it",
            root.display()
        ));
    }
    let regular = |meta: std::io::Result<std::fs::Metadata>| {
        let meta = meta.map_err(|e| format!("cannot read `{shown}`: {e}"))?;
        if !meta.is_file() {
            return Err(format!("`{shown}` is not a regular file"));
        }
        if meta.len() > MAX_TEMPLATE_BYTES {
            return Err(format!(
                "`{shown}` is larger than {} MiB",
                MAX_TEMPLATE_BYTES >> 20
            ));
        }
        Ok(())
    };
    regular(std::fs::metadata(&real))?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&real)
        .map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    regular(file.metadata())?;
    // A directory on the way swapped for a link after the check: where the open file really is
    // (where the system says; elsewhere the checks above stand alone).
    if let Ok(opened) = std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())) {
        if !opened.starts_with(root) {
            return Err(format!(
                "`{shown}` is outside the repository ({})",
                root.display()
            ));
        }
    }
    let mut bytes = Vec::new();
    file.take(MAX_TEMPLATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    if bytes.len() as u64 > MAX_TEMPLATE_BYTES {
        return Err(format!(
            "`{shown}` is larger than {} MiB",
            MAX_TEMPLATE_BYTES >> 20
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("`{shown}` is not UTF-8 text"))
}
