//! What an attempt leaves besides its output: files matching `artifacts` globs, copied into the
//! run's state, and JUnit XML test reports matching `reports` globs, counted.

use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use quick_xml::events::Event as XmlEvent;
use serde::{Deserialize, Serialize};

/// Counts of one JUnit XML report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TestReport {
    /// Relative to the workspace.
    pub path: String,
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
}

/// How glob patterns match paths: `*` stays within one name and matches names starting with `.`.
const MATCH: glob::MatchOptions = glob::MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// Files under `root` matching any of `globs` (relative paths, sorted, no directories). A glob
/// that cannot match outside `root` (`..`, absolute) is ignored.
///
/// The tree is walked without following symbolic links (a link, to a file or to a directory, is
/// never matched nor entered: it could lead out of `root`, or in circles), and never into `.git`
/// or a ccluster state directory (an `artifacts = ["**/*"]` would otherwise copy the state into
/// itself, runs and credentials included, and double it every run).
pub fn matching(root: &Path, globs: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for pattern in globs {
        if pattern.starts_with('/') || pattern.split('/').any(|c| c == "..") {
            continue;
        }
        let parts: Vec<&str> = pattern
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let Ok(whole) = glob::Pattern::new(&parts.join("/")) else {
            continue;
        };
        let Ok(per_part) = parts
            .iter()
            .map(|p| glob::Pattern::new(p))
            .collect::<Result<Vec<_>, _>>()
        else {
            continue;
        };
        let glob = Glob {
            whole,
            parts: per_part,
            recursive_from: parts.iter().position(|p| *p == "**"),
        };
        walk(root, PathBuf::new(), 0, &glob, &mut out);
    }
    out.sort();
    out.dedup();
    out
}

/// One compiled glob: the whole pattern, and each of its `/`-separated parts for pruning the walk.
struct Glob {
    whole: glob::Pattern,
    parts: Vec<glob::Pattern>,
    /// The index of the first `**` part: from there, any depth may match.
    recursive_from: Option<usize>,
}

impl Glob {
    /// Whether a directory at `depth` (0: a child of the root) named `name` may hold matches.
    fn may_enter(&self, depth: usize, name: &str) -> bool {
        match self.recursive_from {
            Some(from) if depth >= from => true,
            _ => depth + 1 < self.parts.len() && self.parts[depth].matches_with(name, MATCH),
        }
    }
}

fn walk(root: &Path, rel: PathBuf, depth: usize, glob: &Glob, out: &mut Vec<String>) {
    let Ok(entries) = std::fs::read_dir(root.join(&rel)) else {
        return;
    };
    for entry in entries.flatten() {
        // The entry's own type: a symbolic link is a link here, whatever it points to.
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if name == ".git" {
            continue;
        }
        let path = rel.join(name);
        if kind.is_dir() {
            if glob.may_enter(depth, name) && !crate::store::is_state_dir(&root.join(&path)) {
                walk(root, path, depth + 1, glob, out);
            }
        } else if kind.is_file() && glob.whole.matches_path_with(&path, MATCH) {
            out.push(path.to_string_lossy().into_owned());
        }
    }
}

/// Copies `files` (relative to `from`, as [`matching`] found them) under `to`, keeping their
/// relative paths; copies are readable by their owner only. Files are read and written without
/// following symbolic links: a task that swapped a directory for a link since the files were
/// matched, or a link committed in a workspace where a copy goes, makes the copy fail rather than
/// read or write outside.
pub fn copy_files(from: &Path, files: &[String], to: &Path) -> std::io::Result<()> {
    let from_real = std::fs::canonicalize(from)?;
    for f in files {
        let rel = Path::new(f);
        if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(refused(f, "is not a plain relative path"));
        }
        let source = from.join(rel);
        if let Some(parent) = rel.parent() {
            if std::fs::canonicalize(from.join(parent))? != from_real.join(parent) {
                return Err(refused(f, "is reached through a symbolic link"));
            }
        }
        // Non-blocking: a file swapped for a FIFO must not hang the run on its open.
        let mut input = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
            .open(&source)?;
        let meta = input.metadata()?;
        if !meta.is_file() {
            return Err(refused(f, "is not a regular file"));
        }
        // A directory on the way swapped for a link between the check above and the open: where
        // the open file really is, as the system says (where it does not, the check stands alone).
        let opened = std::fs::read_link(format!("/proc/self/fd/{}", input.as_raw_fd()));
        if opened.is_ok_and(|real| real != from_real.join(rel)) {
            return Err(refused(f, "is reached through a symbolic link"));
        }
        let dir = private_dirs(to, rel.parent().unwrap_or(Path::new("")))
            .map_err(|e| std::io::Error::new(e.kind(), format!("`{f}`: {e}")))?;
        let target = dir.join(rel.file_name().unwrap_or_default());
        // The owner's bits only (an executable stays executable).
        let mode = meta.permissions().mode() & crate::store::PRIVATE_DIR_MODE;
        let mut output = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&target)
            .map_err(|e| match e.raw_os_error() {
                Some(nix::libc::ELOOP) => refused(f, "is a symbolic link where it is copied to"),
                _ => e,
            })?;
        match crate::secrets::active() {
            // Kept files are masked as they are copied, through the masker of a stream.
            Some(redactor) => {
                use std::io::{Read, Write};
                let mut stream = redactor.stream();
                let mut buf = vec![0u8; 64 << 10];
                let mut masked = Vec::new();
                loop {
                    let n = input.read(&mut buf)?;
                    masked.clear();
                    if n == 0 {
                        stream.finish(&mut masked);
                        output.write_all(&masked)?;
                        break;
                    }
                    stream.push(&buf[..n], &mut masked);
                    output.write_all(&masked)?;
                }
            }
            None => {
                std::io::copy(&mut input, &mut output)?;
            }
        }
        output.set_permissions(std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn refused(file: &str, why: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("`{file}` {why}: not copied"),
    )
}

/// `to/rel`, made one directory at a time (0700), refusing to go through anything that is not a
/// real directory: `create_dir_all` would follow a link and make directories where it points.
fn private_dirs(to: &Path, rel: &Path) -> std::io::Result<PathBuf> {
    crate::store::create_private_dir_all(to)?;
    let mut dir = to.to_path_buf();
    for part in rel.components() {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} is not a directory", dir.display()),
                ))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::DirBuilder::new()
                    .mode(crate::store::PRIVATE_DIR_MODE)
                    .create(&dir)?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(dir)
}

/// Counts the test cases of a JUnit XML file: a `<testcase>` with a `<failure>` or `<error>` child
/// failed, one with `<skipped>` was skipped, any other passed. `None` when it is not XML.
pub fn junit_counts(path: &Path) -> Option<(u32, u32, u32)> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut reader = quick_xml::Reader::from_str(&text);
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    // The state of the test case being read: None outside one.
    let mut current: Option<u8> = None;
    const PASS: u8 = 0;
    const FAIL: u8 = 1;
    const SKIP: u8 = 2;
    let mut close = |state: u8| match state {
        FAIL => failed += 1,
        SKIP => skipped += 1,
        _ => passed += 1,
    };
    let mut saw_root = false;
    loop {
        match reader.read_event() {
            Ok(XmlEvent::Start(e)) => {
                saw_root = true;
                match e.local_name().as_ref() {
                    b"testcase" => current = Some(PASS),
                    b"failure" | b"error" if current.is_some() => current = Some(FAIL),
                    b"skipped" if current == Some(PASS) => current = Some(SKIP),
                    _ => {}
                }
            }
            Ok(XmlEvent::Empty(e)) => {
                saw_root = true;
                match e.local_name().as_ref() {
                    b"testcase" => close(PASS),
                    b"failure" | b"error" if current.is_some() => current = Some(FAIL),
                    b"skipped" if current == Some(PASS) => current = Some(SKIP),
                    _ => {}
                }
            }
            Ok(XmlEvent::End(e)) if e.local_name().as_ref() == b"testcase" => {
                if let Some(state) = current.take() {
                    close(state);
                }
            }
            Ok(XmlEvent::Eof) => break,
            Err(_) => return None,
            _ => {}
        }
    }
    saw_root.then_some((passed, failed, skipped))
}

/// The reports among `files` (relative to `root`), counted; files that are not JUnit XML are left out.
pub fn test_reports(root: &Path, files: &[String]) -> Vec<TestReport> {
    files
        .iter()
        .filter_map(|f| {
            let (passed, failed, skipped) = junit_counts(&root.join(f))?;
            Some(TestReport {
                path: f.clone(),
                passed,
                failed,
                skipped,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_cases_are_counted_by_their_children() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.xml");
        std::fs::write(
            &path,
            r#"<?xml version="1.0"?>
<testsuites><testsuite name="s">
  <testcase name="a"/>
  <testcase name="b"><failure message="boom"/></testcase>
  <testcase name="c"><error>x</error></testcase>
  <testcase name="d"><skipped/></testcase>
  <testcase name="e"><system-out>ok</system-out></testcase>
</testsuite></testsuites>"#,
        )
        .unwrap();
        assert_eq!(junit_counts(&path), Some((2, 2, 1)));
        std::fs::write(&path, "not xml <<<").unwrap();
        assert_eq!(junit_counts(&path), None);
    }

    #[test]
    fn globs_stay_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("out/deep")).unwrap();
        std::fs::write(dir.path().join("out/a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("out/deep/b.txt"), "b").unwrap();
        std::fs::write(dir.path().join("c.log"), "c").unwrap();
        let found = matching(
            dir.path(),
            &["out/**/*.txt".into(), "*.log".into(), "../*".into()],
        );
        assert_eq!(found, ["c.log", "out/a.txt", "out/deep/b.txt"]);
    }

    /// What `glob::glob_with` finds (the matcher before the walk was ccluster's own): the
    /// reference for trees without links or state.
    fn glob_crate(root: &Path, pattern: &str) -> Vec<String> {
        let options = glob::MatchOptions {
            require_literal_leading_dot: false,
            ..glob::MatchOptions::new()
        };
        let mut out: Vec<String> = glob::glob_with(&root.join(pattern).to_string_lossy(), options)
            .unwrap()
            .flatten()
            .filter(|p| p.is_file())
            .map(|p| p.strip_prefix(root).unwrap().to_string_lossy().into_owned())
            .filter(|p| !p.split('/').any(|c| c == ".git"))
            .collect();
        out.sort();
        out
    }

    fn tree(files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for f in files {
            let path = dir.path().join(f);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, f).unwrap();
        }
        dir
    }

    #[test]
    fn globs_match_as_the_glob_crate_does() {
        let dir = tree(&[
            "out/a.txt",
            "out/deep/b.txt",
            "out/deep/deeper/c.txt",
            "out/deep/x.log",
            "c.log",
            ".env",
            "src/a/main.rs",
            ".hidden/x/y",
            ".git/HEAD",
            "config/k.toml",
            "top.txt",
        ]);
        for pattern in [
            "*",
            "**/*",
            "out/**/*.txt",
            "*.log",
            ".env",
            "out/*",
            "**/b.txt",
            "out/deep/b.txt",
            "o*/d*/*",
            ".*",
            "out/",
            "./c.log",
            "out//a.txt",
            "**/deep",
            "nonexistent/**/*",
            "[co]*",
            "out/**/deep/*",
            "**/**/*.txt",
            "**/*.log",
            "out/deep",
            "*/*",
            "*/*/*",
            "?ut/*.txt",
            "**/x/*",
            ".git/*",
        ] {
            let found = matching(dir.path(), &[pattern.to_string()]);
            assert_eq!(found, glob_crate(dir.path(), pattern), "pattern {pattern}");
        }
    }

    #[test]
    fn a_trailing_double_star_matches_the_files_below() {
        // The glob crate matches directories only there; `config/**` is documented to copy a
        // directory's files.
        let dir = tree(&["config/k.toml", "config/sub/l.toml", "other.txt"]);
        assert_eq!(
            matching(dir.path(), &["config/**".into()]),
            ["config/k.toml", "config/sub/l.toml"]
        );
        assert_eq!(matching(dir.path(), &["**".into()]).len(), 3);
    }

    #[test]
    fn symbolic_links_are_neither_matched_nor_entered() {
        let outside = tree(&["secret.txt", "deep/secret.txt"]);
        let dir = tree(&["out/a.txt"]);
        let link = |target: &Path, name: &str| {
            std::os::unix::fs::symlink(target, dir.path().join(name)).unwrap();
        };
        link(outside.path(), "out/outside");
        link(&outside.path().join("secret.txt"), "out/secret.txt");
        link(&outside.path().join("deep"), "deep");
        // Links inside the tree too: one in circles, one to a sibling.
        link(dir.path(), "out/loop");
        link(&dir.path().join("out"), "again");
        // Not a regular file either: a FIFO would block whoever reads it.
        nix::unistd::mkfifo(
            &dir.path().join("out/fifo"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        let kept: &[&str] = &["out/a.txt"];
        for (pattern, expected) in [
            ("**/*", kept),
            ("**", kept),
            ("out/*", kept),
            ("out/outside/*", &[]),
            ("out/secret.txt", &[]),
            ("deep/secret.txt", &[]),
            ("*/secret.txt", &[]),
            ("again/a.txt", &[]),
            ("out/loop/out/a.txt", &[]),
            ("out/fifo", &[]),
        ] {
            assert_eq!(
                matching(dir.path(), &[pattern.to_string()]),
                expected,
                "pattern {pattern}"
            );
        }
    }

    #[test]
    fn state_directories_are_never_entered() {
        let dir = tree(&[
            "a.txt",
            ".ccluster/lock",
            ".ccluster/db/conf",
            ".ccluster/runs/r/logs/t.1.out",
            "sub/state/lock",
            "sub/state/db/conf",
            "sub/state/runs/r/x",
            // Looks a little like one, is not: kept.
            "notstate/lock",
            "notstate/db/other",
        ]);
        assert_eq!(
            matching(dir.path(), &["**/*".into(), ".ccluster/runs/**/*".into()]),
            ["a.txt", "notstate/db/other", "notstate/lock"]
        );
    }

    #[test]
    fn copies_are_the_owners_only_and_never_written_through_a_link() {
        use std::os::unix::fs::PermissionsExt;
        let from = tree(&["run.sh", "conf/a.toml"]);
        std::fs::set_permissions(
            from.path().join("run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let to = tempfile::tempdir().unwrap();
        let files = matching(from.path(), &["**/*".into()]);
        copy_files(from.path(), &files, to.path()).unwrap();
        let mode = |p: &str| {
            std::fs::metadata(to.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(
            (mode("run.sh"), mode("conf/a.toml"), mode("conf")),
            (0o700, 0o600, 0o700)
        );

        // Where the copies go, a link (committed by an earlier task, say) leads outside.
        let outside = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), to.path().join("conf")).unwrap();
        let err = copy_files(from.path(), &["conf/a.toml".into()], to.path()).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        std::fs::remove_file(to.path().join("conf")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("run.sh"), to.path().join("run.sh"))
            .unwrap();
        let err = copy_files(from.path(), &["run.sh".into()], to.path()).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);

        // Where they come from, a directory swapped for a link since the files were matched.
        std::fs::rename(from.path().join("conf"), outside.path().join("conf")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("conf"), from.path().join("conf")).unwrap();
        let err = copy_files(from.path(), &["conf/a.toml".into()], to.path()).unwrap_err();
        assert!(err.to_string().contains("symbolic link"), "{err}");
    }
}
