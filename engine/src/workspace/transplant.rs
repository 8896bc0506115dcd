//! Moving a reused result onto the run's base: a cached commit was made on an older base that
//! differs from this run's only in the clusterfile and its lock file (otherwise its key would
//! differ). It is rewritten with this run's versions of those files and parents, so the result
//! branch never undoes a clusterfile edit.

use std::collections::HashMap;
use std::path::Path;

/// Rewrites commits made on `from` onto `to`, remembering what it rewrote.
pub struct Transplant<'a> {
    root: &'a Path,
    /// Repository-relative paths that may differ between the two bases.
    paths: &'a [String],
    from: String,
    to: String,
    done: &'a mut HashMap<(String, String), String>,
}

impl<'a> Transplant<'a> {
    pub fn new(
        root: &'a Path,
        paths: &'a [String],
        from: &str,
        to: &str,
        done: &'a mut HashMap<(String, String), String>,
    ) -> Transplant<'a> {
        Transplant {
            root,
            paths,
            from: from.to_string(),
            to: to.to_string(),
            done,
        }
    }

    /// The commit standing for `commit` on the new base. Each of the `paths` a commit left as the
    /// old base had it takes the new base's version; one the task changed keeps its change.
    pub fn commit(&mut self, commit: &str) -> Result<String, String> {
        if self.from == self.to {
            return Ok(commit.to_string());
        }
        if git(
            self.root,
            &["merge-base", "--is-ancestor", &self.from, commit],
            &[],
        )
        .is_err()
        {
            return Err(format!(
                "commit {commit} does not descend from the base it was made on"
            ));
        }
        // Iterative, parents first: merges of many results must not recurse deeply.
        let mut stack = vec![(commit.to_string(), false)];
        while let Some((c, expanded)) = stack.pop() {
            if c == self.from || self.done.contains_key(&(self.from.clone(), c.clone())) {
                continue;
            }
            let parents = self.parents(&c)?;
            if !expanded {
                stack.push((c.clone(), true));
                for p in parents {
                    stack.push((p, false));
                }
                if stack.len() > 100_000 {
                    return Err("the reused result's history does not lead to its base".into());
                }
                continue;
            }
            if parents.is_empty() {
                return Err(format!(
                    "commit {c} does not descend from the base it was made on"
                ));
            }
            let mapped: Vec<String> = parents.iter().map(|p| self.mapped(p)).collect();
            let rewritten = self.rewrite(&c, &mapped)?;
            self.done.insert((self.from.clone(), c), rewritten);
        }
        Ok(self.mapped(commit))
    }

    fn mapped(&self, commit: &str) -> String {
        if commit == self.from {
            return self.to.clone();
        }
        self.done
            .get(&(self.from.clone(), commit.to_string()))
            .cloned()
            .unwrap_or_else(|| commit.to_string())
    }

    fn parents(&self, commit: &str) -> Result<Vec<String>, String> {
        let out = git(self.root, &["rev-parse", &format!("{commit}^@")], &[])?;
        Ok(out.split_whitespace().map(str::to_string).collect())
    }

    /// One entry of a tree at a path: `<mode> <type> <oid>`, or `None` when absent.
    fn entry(&self, commit: &str, path: &str) -> Result<Option<String>, String> {
        let out = git(self.root, &["ls-tree", "-z", commit, "--", path], &[])?;
        Ok(out
            .split('\0')
            .find_map(|r| r.split_once('\t').filter(|(_, p)| *p == path))
            .map(|(meta, _)| meta.to_string()))
    }

    fn rewrite(&self, commit: &str, parents: &[String]) -> Result<String, String> {
        let mut updates = String::new();
        for path in self.paths {
            let old = self.entry(&self.from, path)?;
            let now = self.entry(commit, path)?;
            let new = self.entry(&self.to, path)?;
            if now != old || now == new {
                continue;
            }
            match new {
                Some(meta) => {
                    let mut f = meta.split(' ');
                    let (mode, oid) = (f.next().unwrap_or(""), f.nth(1).unwrap_or(""));
                    updates.push_str(&format!("{mode} {oid}\t{path}\n"));
                }
                None => updates.push_str(&format!(
                    "0 0000000000000000000000000000000000000000\t{path}\n"
                )),
            }
        }
        let old_parents = self.parents(commit)?;
        if updates.is_empty() && old_parents == parents {
            return Ok(commit.to_string());
        }
        let tree = if updates.is_empty() {
            git(
                self.root,
                &["rev-parse", &format!("{commit}^{{tree}}")],
                &[],
            )?
        } else {
            // A scratch index of our own: the user's index is never touched.
            static COUNT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let index = std::env::temp_dir().join(format!(
                "ccluster-transplant-{}-{}.index",
                std::process::id(),
                COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let index_env = [("GIT_INDEX_FILE", index.as_os_str())];
            let tree = git_env(self.root, &["read-tree", commit], &index_env, None)
                .and_then(|_| {
                    git_env(
                        self.root,
                        &["update-index", "--index-info"],
                        &index_env,
                        Some(updates.as_bytes()),
                    )
                })
                .and_then(|_| git_env(self.root, &["write-tree"], &index_env, None));
            let _ = std::fs::remove_file(&index);
            tree?
        };
        // The same authorship, dates and message: the same result on another base.
        let meta = git(
            self.root,
            &[
                "show",
                "-s",
                "--format=%an%x00%ae%x00%ad%x00%cn%x00%ce%x00%cd%x00%B",
                "--date=raw",
                commit,
            ],
            &[],
        )?;
        let f: Vec<&str> = meta.splitn(7, '\0').collect();
        if f.len() < 7 {
            return Err(format!("cannot read commit {commit}"));
        }
        let mut args = vec!["commit-tree".to_string(), tree.trim().to_string()];
        for p in parents {
            args.push("-p".into());
            args.push(p.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = [
            ("GIT_AUTHOR_NAME", f[0]),
            ("GIT_AUTHOR_EMAIL", f[1]),
            ("GIT_AUTHOR_DATE", f[2]),
            ("GIT_COMMITTER_NAME", f[3]),
            ("GIT_COMMITTER_EMAIL", f[4]),
            ("GIT_COMMITTER_DATE", f[5]),
        ];
        let env: Vec<(&str, &std::ffi::OsStr)> = env
            .iter()
            .map(|(k, v)| (*k, std::ffi::OsStr::new(*v)))
            .collect();
        let message = f[6].trim_end_matches('\n').to_string() + "\n";
        Ok(git_env(self.root, &args, &env, Some(message.as_bytes()))?
            .trim()
            .to_string())
    }
}

fn git(root: &Path, args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<String, String> {
    git_env(root, args, env, None)
}

/// Plumbing only (no hooks run for these), in git's clean environment plus `env`.
fn git_env(
    root: &Path,
    args: &[&str],
    env: &[(&str, &std::ffi::OsStr)],
    stdin: Option<&[u8]>,
) -> Result<String, String> {
    super::git_sync_with(root, args, env, stdin)
        .map(|out| String::from_utf8_lossy(&out).into_owned())
}
