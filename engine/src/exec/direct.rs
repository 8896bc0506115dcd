//! Simple commands run without a shell, as GNU make does: a `run` that is only words (no quoting,
//! expansion, redirection, operator or builtin) means the same to `sh -c` as to `execve`, and
//! skipping the shell halves the cost of a tiny task. Anything else goes to `/bin/sh -c`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// A simple command, resolved: the program's path, its argv (the first being the command's first
/// word, as the shell would pass it), and the `PWD` the shell would have exported.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Direct {
    pub program: PathBuf,
    pub argv: Vec<String>,
    /// `PWD`, when the environment has none: `sh` exports it (dash does), so the direct run does too.
    pub pwd: Option<String>,
}

/// Words `sh` gives a meaning of its own as a command's first word: POSIX and dash builtins (whose
/// behaviour may differ from the programs of the same name: dash's `echo` is not coreutils'), and
/// reserved words. The characters the other builtins and words need (`! { } [ .`) are refused
/// anyway.
const SHELL_WORDS: &[&str] = &[
    ".", ":", "alias", "bg", "break", "case", "cd", "chdir", "command", "continue", "do", "done",
    "echo", "elif", "else", "esac", "eval", "exec", "exit", "export", "false", "fc", "fg", "fi",
    "for", "getopts", "hash", "if", "in", "jobs", "kill", "local", "printf", "pwd", "read",
    "readonly", "return", "set", "shift", "test", "then", "times", "trap", "true", "type",
    "ulimit", "umask", "unalias", "unset", "until", "wait", "while",
];

/// The words of `command`, if `sh -c` would run it as a plain program with these arguments.
pub fn simple_words(command: &str) -> Option<Vec<&str>> {
    // Only characters that mean nothing to the shell, anywhere in a word.
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./,:+@%=".contains(c);
    let words: Vec<&str> = command
        .split([' ', '\t'])
        .filter(|w| !w.is_empty())
        .collect();
    let first = *words.first()?;
    let refused = words.iter().any(|w| !w.chars().all(plain))
        // `NAME=value cmd` is an assignment; `./x` and `dir/x` are relative to the task's directory.
        || first.contains('=')
        || (first.contains('/') && !first.starts_with('/'))
        || SHELL_WORDS.contains(&first);
    (!refused).then_some(words)
}

/// Finds simple commands' programs on the task's `PATH`, as `sh` would, remembering what it found
/// (as `sh`'s own `hash` does).
#[derive(Debug, Default)]
pub struct Resolver {
    found: Mutex<HashMap<(String, String), PathBuf>>,
}

impl Resolver {
    /// How to run `command` without a shell in `env` and `cwd`, if it is a simple command whose
    /// program is found. `None`: run it with `sh -c`.
    pub fn direct(&self, command: &str, env: &[(String, String)], cwd: &Path) -> Option<Direct> {
        let words = simple_words(command)?;
        let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
        let program = if words[0].starts_with('/') {
            PathBuf::from(words[0])
        } else {
            // dash reads `%` in a PATH entry as its own marker (`/dir%builtin`).
            let path = var("PATH").filter(|p| !p.contains('%'))?;
            let key = (path.to_string(), words[0].to_string());
            let mut found = self.found.lock().ok()?;
            match found.get(&key) {
                Some(p) => p.clone(),
                None => {
                    let p = search(path, words[0])?;
                    found.insert(key, p.clone());
                    p
                }
            }
        };
        // dash keeps an inherited `PWD` that names the directory it runs in, and exports the
        // physical directory otherwise.
        let pwd = match var("PWD") {
            Some(pwd) if pwd.starts_with('/') && same_file(Path::new(pwd), cwd) => None,
            _ => Some(std::fs::canonicalize(cwd).ok()?.to_str()?.to_string()),
        };
        Some(Direct {
            program,
            argv: words.iter().map(|w| w.to_string()).collect(),
            pwd,
        })
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// The first executable file named `name` in the directories of `path`. A relative or empty entry
/// (the current directory) sends the command to the shell: it would be the task's, not ours.
fn search(path: &str, name: &str) -> Option<PathBuf> {
    for dir in path.split(':') {
        if !dir.starts_with('/') {
            return None;
        }
        let candidate = Path::new(dir).join(name);
        let is_file = std::fs::metadata(&candidate).is_ok_and(|m| m.is_file());
        if is_file && nix::unistd::access(&candidate, nix::unistd::AccessFlags::X_OK).is_ok() {
            return Some(candidate);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_words_outside_the_shells_vocabulary_are_simple() {
        assert_eq!(simple_words("touch out/t1"), Some(vec!["touch", "out/t1"]));
        assert_eq!(
            simple_words("  cargo  test\t-p x --jobs=2 "),
            Some(vec!["cargo", "test", "-p", "x", "--jobs=2"])
        );
        assert_eq!(simple_words("/usr/bin/env"), Some(vec!["/usr/bin/env"]));
        for shell in [
            "",
            "   ",
            "echo hi",
            "cd dir",
            "true",
            ". ./env",
            ": x",
            "test -f x",
            "FOO=1 make",
            "./script.sh",
            "bin/tool x",
            "touch $HOME/x",
            "touch 'a b'",
            "touch \"a\"",
            "ls *.rs",
            "ls a?",
            "ls [ab]",
            "make > log",
            "make < in",
            "a && b",
            "a; b",
            "a | b",
            "a &",
            "touch ~/x",
            "touch a # comment",
            "touch `x`",
            "touch a\\ b",
            "make\nmake",
            "if x",
            "{ x; }",
            "touch é",
        ] {
            assert_eq!(simple_words(shell), None, "{shell:?} needs the shell");
        }
    }

    #[test]
    fn programs_are_found_on_the_tasks_path_as_the_shell_finds_them() {
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&first).unwrap();
        std::fs::create_dir_all(&second).unwrap();
        // Not executable in the first directory: the shell skips it, so do we.
        std::fs::write(first.join("tool"), "").unwrap();
        std::fs::write(second.join("tool"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(second.join("tool"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let path = format!("{}:{}", first.display(), second.display());
        let env = vec![("PATH".to_string(), path)];
        let resolver = Resolver::default();
        let direct = resolver.direct("tool x", &env, dir.path()).unwrap();
        assert_eq!(direct.program, second.join("tool"));
        assert_eq!(direct.argv, ["tool", "x"]);
        let physical = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(direct.pwd.as_deref(), physical.to_str());

        assert_eq!(resolver.direct("missing", &env, dir.path()), None);
        assert_eq!(resolver.direct("tool", &[], dir.path()), None, "no PATH");
        let relative = vec![("PATH".to_string(), ".".to_string())];
        assert_eq!(resolver.direct("tool", &relative, dir.path()), None);
        // An inherited PWD is kept when it names the directory, replaced when it does not.
        let pwd = |value: &str| vec![env[0].clone(), ("PWD".to_string(), value.to_string())];
        let kept = pwd(&dir.path().join("a").join("..").display().to_string());
        assert_eq!(
            resolver.direct("tool", &kept, dir.path()).unwrap().pwd,
            None
        );
        let wrong = resolver.direct("tool", &pwd("/"), dir.path()).unwrap();
        assert_eq!(wrong.pwd.as_deref(), physical.to_str());
    }
}
