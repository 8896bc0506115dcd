//! What an attempt leaves besides its output: files matching `artifacts` globs, copied into the
//! run's state, and JUnit XML test reports matching `reports` globs, counted.

use std::path::Path;

use quick_xml::events::Event as XmlEvent;
use serde::{Deserialize, Serialize};

/// Counts of one JUnit XML report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestReport {
    /// Relative to the workspace.
    pub path: String,
    pub passed: u32,
    pub failed: u32,
    pub skipped: u32,
}

/// Files under `root` matching any of `globs` (relative paths, sorted, no directories). A glob
/// that cannot match outside `root` (`..`, absolute) is ignored.
pub fn matching(root: &Path, globs: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let options = glob::MatchOptions {
        require_literal_leading_dot: false,
        ..glob::MatchOptions::new()
    };
    for pattern in globs {
        if pattern.starts_with('/') || pattern.split('/').any(|c| c == "..") {
            continue;
        }
        let full = root.join(pattern);
        let Ok(paths) = glob::glob_with(&full.to_string_lossy(), options) else {
            continue;
        };
        for path in paths.flatten() {
            // Never follow into git's own files, and never a link out of the workspace.
            let Ok(rel) = path.strip_prefix(root) else {
                continue;
            };
            if rel.components().any(|c| c.as_os_str() == ".git") {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_file() {
                out.push(rel.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Copies `files` (relative to `from`) under `to`, keeping their relative paths; copies are
/// readable by their owner only.
pub fn copy_files(from: &Path, files: &[String], to: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for f in files {
        let target = to.join(f);
        if let Some(parent) = target.parent() {
            crate::store::create_private_dir_all(parent)?;
        }
        std::fs::copy(from.join(f), &target)?;
        // The owner's bits only (an executable stays executable).
        let mode =
            std::fs::metadata(&target)?.permissions().mode() & crate::store::PRIVATE_DIR_MODE;
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))?;
    }
    Ok(())
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
}
