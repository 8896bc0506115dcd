//! Which lines of a pull request a review may comment on: GitHub accepts an inline comment only
//! on a line inside one of the diff's hunks, so the unified diff's hunks are read for the lines
//! of each file after the change (the `RIGHT` side: added lines and context lines).

use std::collections::{BTreeMap, BTreeSet};

/// Per file (its path after the change), the line numbers after the change that the diff shows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commentable {
    files: BTreeMap<String, BTreeSet<u64>>,
}

impl Commentable {
    /// Reads a unified diff as `git diff` and GitHub's `application/vnd.github.diff` give it.
    pub fn from_unified_diff(diff: &str) -> Commentable {
        let mut files: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
        let mut current: Option<String> = None;
        // The next line number on the right side, while inside a hunk.
        let mut right: Option<u64> = None;
        // Lines still expected in the hunk on each side: a hunk ends when both reach zero, so a
        // removed line that reads `--- x` is not taken for a file header.
        let (mut left_left, mut right_left) = (0u64, 0u64);
        for line in diff.lines() {
            if left_left == 0 && right_left == 0 {
                right = None;
            }
            if right.is_none() {
                if line.starts_with("diff --git ") {
                    current = None;
                } else if let Some(path) = line.strip_prefix("+++ ") {
                    current = strip_side(path);
                } else if let Some(header) = line.strip_prefix("@@ ") {
                    if let Some((old, new)) = hunk_ranges(header) {
                        left_left = old.1;
                        right_left = new.1;
                        right = Some(new.0);
                    }
                }
                continue;
            }
            let Some(next) = right.as_mut() else { continue };
            match line.as_bytes().first() {
                Some(b'+') => {
                    if let Some(path) = &current {
                        files.entry(path.clone()).or_default().insert(*next);
                    }
                    *next += 1;
                    right_left = right_left.saturating_sub(1);
                }
                Some(b'-') => left_left = left_left.saturating_sub(1),
                // `\ No newline at end of file` belongs to the line before it.
                Some(b'\\') => {}
                _ => {
                    if let Some(path) = &current {
                        files.entry(path.clone()).or_default().insert(*next);
                    }
                    *next += 1;
                    left_left = left_left.saturating_sub(1);
                    right_left = right_left.saturating_sub(1);
                }
            }
        }
        Commentable { files }
    }

    /// Whether `line` of `path` (after the change) is in the diff.
    pub fn contains(&self, path: &str, line: u64) -> bool {
        self.files.get(path).is_some_and(|l| l.contains(&line))
    }

    /// Whether the diff changes `path` at all.
    pub fn has_file(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }
}

/// `b/src/x.rs` → `src/x.rs`; `/dev/null` (a deleted file) → none.
fn strip_side(path: &str) -> Option<String> {
    let path = path.split('\t').next().unwrap_or(path).trim_end();
    if path == "/dev/null" {
        return None;
    }
    let path = path.trim_matches('"');
    Some(path.strip_prefix("b/").unwrap_or(path).to_string())
}

/// `-12,5 +14,7 @@ fn x()` → ((12, 5), (14, 7)); a missing count is 1.
fn hunk_ranges(header: &str) -> Option<((u64, u64), (u64, u64))> {
    let mut parts = header.split_whitespace();
    let old = parts.next()?.strip_prefix('-')?;
    let new = parts.next()?.strip_prefix('+')?;
    let range = |r: &str| -> Option<(u64, u64)> {
        match r.split_once(',') {
            Some((start, count)) => Some((start.parse().ok()?, count.parse().ok()?)),
            None => Some((r.parse().ok()?, 1)),
        }
    };
    Some((range(old)?, range(new)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIFF: &str = "\
diff --git a/src/lib.rs b/src/lib.rs
index 1111111..2222222 100644
--- a/src/lib.rs
+++ b/src/lib.rs
@@ -1,3 +1,4 @@
 fn one() {}
--- not a header: a removed line
+fn two() {}
+fn three() {}
 fn four() {}
@@ -20,2 +21,2 @@ fn later()
-old
+new
 same
diff --git a/gone.txt b/gone.txt
deleted file mode 100644
--- a/gone.txt
+++ /dev/null
@@ -1 +0,0 @@
-bye
diff --git a/new.txt b/new.txt
new file mode 100644
--- /dev/null
+++ b/new.txt
@@ -0,0 +1,2 @@
+hello
+world
\\ No newline at end of file
";

    #[test]
    fn right_side_lines_are_added_and_context_lines() {
        let c = Commentable::from_unified_diff(DIFF);
        let lines = |p: &str| -> Vec<u64> { (0..40).filter(|l| c.contains(p, *l)).collect() };
        assert_eq!(lines("src/lib.rs"), vec![1, 2, 3, 4, 21, 22]);
        assert_eq!(lines("new.txt"), vec![1, 2]);
        assert!(!c.has_file("gone.txt"));
        assert!(!c.contains("src/lib.rs", 10));
    }
}
