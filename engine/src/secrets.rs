//! Secrets: where a declared secret's value comes from (`env:`, `file:`, `command:`), resolving
//! the values when a run starts, handing them to the tasks that list them (variables or 0600
//! files outside the workspace), and masking them, with their common encodings, in everything
//! ccluster writes ([`Redactor`], installed for the run with [`install`]).

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use serde::Serialize;

/// Values shorter than this are refused when resolved: masking them would mask unrelated text
/// (and a short value is guessed anyway).
pub const MIN_SECRET_LEN: usize = 8;

/// How long a `command:` source may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The most a `file:` or `command:` source may give.
const MAX_SECRET_LEN: usize = 64 << 10;

/// Where a secret's value comes from, as written after `from =`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "source", rename_all = "snake_case")]
pub enum SecretSource {
    /// An environment variable of the ccluster process.
    Env(String),
    /// A file, relative to the clusterfile's directory; one trailing newline is dropped.
    File(String),
    /// A command run by `sh -c` in the clusterfile's directory; its stdout, one trailing newline
    /// dropped. Its stderr goes to ccluster's stderr.
    Command(String),
    /// A key of a Kubernetes Secret, read through the kubeconfig's current context (as `kubectl`
    /// finds it: `KUBECONFIG`, `~/.kube/config`, or in a pod its service account).
    Kubernetes {
        namespace: String,
        name: String,
        key: String,
    },
}

impl SecretSource {
    /// Parses `env:VAR`, `file:PATH`, `command:...` or `kubernetes:NAMESPACE/SECRET/KEY`; the error
    /// says what is wrong.
    pub fn parse(text: &str) -> Result<SecretSource, String> {
        let Some((scheme, rest)) = text.split_once(':') else {
            return Err("it has no `env:`, `file:`, `command:` or `kubernetes:` prefix".into());
        };
        match scheme {
            "kubernetes" => {
                let parts: Vec<&str> = rest.split('/').collect();
                let name_ok = |n: &str| {
                    !n.is_empty()
                        && n.len() <= 253
                        && n.chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c))
                };
                let key_ok = |k: &str| {
                    !k.is_empty()
                        && k.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
                };
                match parts.as_slice() {
                    [namespace, name, key] if name_ok(namespace) && name_ok(name) && key_ok(key) => {
                        Ok(SecretSource::Kubernetes {
                            namespace: namespace.to_string(),
                            name: name.to_string(),
                            key: key.to_string(),
                        })
                    }
                    _ => Err(format!(
                        "`kubernetes:{rest}` is not `kubernetes:NAMESPACE/SECRET/KEY` (names of lowercase letters, digits, `-` and `.`)"
                    )),
                }
            }
            "env" if is_env_name(rest) => Ok(SecretSource::Env(rest.into())),
            "env" => Err(format!(
                "`{rest}` is not an environment variable name (letters, digits and `_`, not starting with a digit)"
            )),
            "file" if !rest.trim().is_empty() => Ok(SecretSource::File(rest.into())),
            "command" if !rest.trim().is_empty() => Ok(SecretSource::Command(rest.into())),
            "file" | "command" => Err(format!("nothing follows `{scheme}:`")),
            other => Err(format!(
                "unknown source `{other}:`; expected `env:`, `file:`, `command:` or `kubernetes:`"
            )),
        }
    }

    /// The source as written: safe to show, it holds no value.
    pub fn describe(&self) -> String {
        match self {
            SecretSource::Env(v) => format!("env:{v}"),
            SecretSource::File(p) => format!("file:{p}"),
            SecretSource::Command(c) => format!("command:{c}"),
            SecretSource::Kubernetes {
                namespace,
                name,
                key,
            } => format!("kubernetes:{namespace}/{name}/{key}"),
        }
    }

    /// Reads the value. The error names the source, never a value.
    pub fn resolve(&self, base_dir: &Path) -> Result<String, String> {
        let value = match self {
            SecretSource::Env(var) => match std::env::var(var) {
                Ok(v) => v,
                Err(std::env::VarError::NotPresent) => {
                    return Err(format!("the environment variable `{var}` is not set"))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    return Err(format!("the environment variable `{var}` is not UTF-8"))
                }
            },
            SecretSource::File(path) => {
                let full = base_dir.join(path);
                let bytes = read_bounded(&full)
                    .map_err(|e| format!("cannot read `{}`: {e}", full.display()))?;
                let text = String::from_utf8(bytes)
                    .map_err(|_| format!("`{}` is not UTF-8 text", full.display()))?;
                strip_newline(text)
            }
            SecretSource::Command(command) => strip_newline(run_command(command, base_dir)?),
            SecretSource::Kubernetes {
                namespace,
                name,
                key,
            } => read_kubernetes_secret(namespace, name, key)?,
        };
        if value.len() < MIN_SECRET_LEN {
            return Err(format!(
                "its value is {} bytes long; values shorter than {MIN_SECRET_LEN} bytes cannot be masked safely",
                value.len()
            ));
        }
        Ok(value)
    }
}

/// `[A-Za-z_][A-Za-z0-9_]*`: what a secret's name, and a variable it is delivered in, must be.
pub fn is_env_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A file name a secret is delivered in: one plain path component.
pub fn is_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name.len() <= 255
        && !name.contains(['/', '\0'])
}

fn strip_newline(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

fn read_bounded(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_LEN as u64 + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() > MAX_SECRET_LEN {
        return Err(std::io::Error::other(format!(
            "it is larger than {} KiB",
            MAX_SECRET_LEN >> 10
        )));
    }
    Ok(bytes)
}

/// Runs a `command:` source with ccluster's own environment (it is the user's command, like
/// `pass show ci/token`), stdin from `/dev/null`, stderr passed through, within
/// [`COMMAND_TIMEOUT`].
fn run_command(command: &str, dir: &Path) -> Result<String, String> {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start `{command}`: {e}"))?;
    let Some(mut stdout) = child.stdout.take() else {
        return Err(format!("cannot read the output of `{command}`"));
    };
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = (&mut stdout)
            .take(MAX_SECRET_LEN as u64 + 1)
            .read_to_end(&mut bytes);
        bytes
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{command}` did not finish within {} s",
                    COMMAND_TIMEOUT.as_secs()
                ));
            }
            Err(e) => return Err(format!("cannot wait for `{command}`: {e}")),
        }
    };
    let bytes = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!("`{command}` failed ({status})"));
    }
    if bytes.len() > MAX_SECRET_LEN {
        return Err(format!(
            "`{command}` printed more than {} KiB",
            MAX_SECRET_LEN >> 10
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("`{command}` printed something that is not UTF-8"))
}

/// Reads every secret of a run. The error lists each that cannot be read, with its source, and
/// no value.
pub fn resolve_declared<'s>(
    declared: impl IntoIterator<Item = (&'s str, &'s SecretSource)>,
    base_dir: &Path,
) -> Result<SecretValues, String> {
    let mut values = SecretValues::default();
    let mut problems = Vec::new();
    for (name, source) in declared {
        match source.resolve(base_dir) {
            Ok(value) => values.insert(name, value),
            Err(problem) => problems.push(format!(
                "secret `{name}` (from `{}`) cannot be read: {problem}",
                source.describe()
            )),
        }
    }
    if problems.is_empty() {
        Ok(values)
    } else {
        Err(problems.join("\n"))
    }
}

/// How a task gets one secret.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// The value in this environment variable.
    Env(String),
    /// The value in a 0600 file of this name, outside the workspace, whose path is in the
    /// environment variable `env`.
    File { file: String, env: String },
}

/// A secret a task lists (`secrets = ["GH_TOKEN"]`): its name and how it is delivered. Never its
/// value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct SecretUse {
    pub name: String,
    pub delivery: Delivery,
}

/// The run's resolved secrets, by name. Held in memory only.
#[derive(Clone, Default)]
pub struct SecretValues {
    values: Vec<(String, String)>,
}

impl std::fmt::Debug for SecretValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.values.iter().map(|(n, _)| n))
            .finish()
    }
}

impl SecretValues {
    pub fn insert(&mut self, name: &str, value: String) {
        self.values.push((name.to_string(), value));
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// (name, value) pairs, for a [`Redactor`].
    pub fn pairs(&self) -> &[(String, String)] {
        &self.values
    }
}

/// What a masked value is replaced by.
pub fn mask_of(name: &str) -> String {
    format!("[secret {name}]")
}

/// Masks known values and their encodings: base64 (standard and URL-safe, padded or not, also as
/// part of a longer encoded text at each of its three alignments), percent-encoding (upper and
/// lower case hex, `+` for spaces) and JSON string escaping (once, and twice: JSON text inside a
/// JSON string). One Aho-Corasick automaton,
/// leftmost-longest, so an encoding that contains another is masked whole.
pub struct Redactor {
    automaton: Option<AhoCorasick>,
    /// The secret's name of each pattern.
    names: Vec<String>,
    replacements: Vec<String>,
    longest: usize,
    /// The patterns themselves, and the bytes they start with: a stream keeps back only a tail
    /// that could be the start of one.
    patterns: Vec<Vec<u8>>,
    starts: [bool; 256],
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redactor")
            .field("patterns", &self.names.len())
            .finish()
    }
}

impl Redactor {
    /// A redactor for (name, value) pairs; values shorter than [`MIN_SECRET_LEN`] are left out.
    pub fn new(secrets: &[(String, String)]) -> Redactor {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut names = Vec::new();
        for (name, value) in secrets {
            if value.len() < MIN_SECRET_LEN {
                continue;
            }
            for form in encodings(value) {
                if form.len() >= MIN_SECRET_LEN && !patterns.contains(&form) {
                    patterns.push(form);
                    names.push(name.clone());
                }
            }
        }
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        let automaton = (!patterns.is_empty())
            .then(|| {
                AhoCorasick::builder()
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&patterns)
                    .ok()
            })
            .flatten();
        let replacements = names.iter().map(|n| mask_of(n)).collect();
        let mut starts = [false; 256];
        for p in &patterns {
            starts[p[0] as usize] = true;
        }
        Redactor {
            automaton,
            names,
            replacements,
            longest,
            patterns,
            starts,
        }
    }

    /// Whether a pattern could start at the beginning of `tail` (a stream's last bytes): `tail`
    /// is the start of a pattern, or a pattern is the start of `tail`.
    fn could_start(&self, tail: &[u8]) -> bool {
        tail.first().is_some_and(|b| self.starts[*b as usize])
            && self
                .patterns
                .iter()
                .any(|p| p.starts_with(tail) || tail.starts_with(p))
    }

    pub fn is_empty(&self) -> bool {
        self.automaton.is_none()
    }

    /// The name of the first secret found in `bytes`, if any.
    pub fn find(&self, bytes: &[u8]) -> Option<&str> {
        let m = self.automaton.as_ref()?.find(bytes)?;
        Some(self.names[m.pattern().as_usize()].as_str())
    }

    /// The name of the first secret found in what `reader` gives, read in pieces (a file of any
    /// size costs a fixed buffer).
    pub fn find_in(&self, mut reader: impl std::io::Read) -> std::io::Result<Option<&str>> {
        let Some(ac) = &self.automaton else {
            return Ok(None);
        };
        let keep = self.longest - 1;
        let mut buffer: Vec<u8> = Vec::with_capacity(keep + (64 << 10));
        let mut piece = vec![0u8; 64 << 10];
        loop {
            let n = reader.read(&mut piece)?;
            if n == 0 {
                return Ok(None);
            }
            buffer.extend_from_slice(&piece[..n]);
            if let Some(m) = ac.find(&buffer) {
                return Ok(Some(self.names[m.pattern().as_usize()].as_str()));
            }
            // A value cut at the end of this piece starts in its last (longest − 1) bytes.
            let cut = buffer.len().saturating_sub(keep);
            buffer.drain(..cut);
        }
    }

    pub fn redact_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        match &self.automaton {
            Some(ac) if ac.is_match(bytes) => {
                Cow::Owned(ac.replace_all_bytes(bytes, &self.replacements))
            }
            _ => Cow::Borrowed(bytes),
        }
    }

    pub fn redact_str<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match &self.automaton {
            Some(ac) if ac.is_match(text) => Cow::Owned(ac.replace_all(text, &self.replacements)),
            _ => Cow::Borrowed(text),
        }
    }

    /// Masks every string (and object key) of a JSON value in place.
    pub fn redact_json(&self, value: &mut serde_json::Value) {
        use serde_json::Value;
        if self.is_empty() {
            return;
        }
        // A walk with its own stack: values nest up to the parser's limit.
        let mut stack = vec![value];
        while let Some(v) = stack.pop() {
            match v {
                Value::String(s) => {
                    if let Cow::Owned(masked) = self.redact_str(s) {
                        *s = masked;
                    }
                }
                Value::Array(items) => stack.extend(items.iter_mut()),
                Value::Object(map) => {
                    if map.keys().any(|k| self.find(k.as_bytes()).is_some()) {
                        let old = std::mem::take(map);
                        for (k, item) in old {
                            map.insert(self.redact_str(&k).into_owned(), item);
                        }
                    }
                    stack.extend(map.values_mut());
                }
                _ => {}
            }
        }
    }

    /// `value` as JSON bytes, masked. The JSON text is searched first (the JSON-escaped form of
    /// each value is a pattern), so a value with nothing to mask costs one scan.
    pub fn json_bytes<T: Serialize + ?Sized>(&self, value: &T) -> serde_json::Result<Vec<u8>> {
        let bytes = serde_json::to_vec(value)?;
        if self
            .automaton
            .as_ref()
            .is_none_or(|ac| !ac.is_match(&bytes))
        {
            return Ok(bytes);
        }
        let mut tree = serde_json::to_value(value)?;
        self.redact_json(&mut tree);
        serde_json::to_vec(&tree)
    }

    /// A masker of a stream written in pieces: a value cut across two pieces is still caught.
    pub fn stream(self: &Arc<Self>) -> StreamRedactor {
        StreamRedactor {
            redactor: self.clone(),
            carry: Vec::new(),
        }
    }
}

/// The forms of a value that are masked.
fn encodings(value: &str) -> Vec<Vec<u8>> {
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
    use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
    let raw = value.as_bytes();
    let mut out = vec![raw.to_vec()];
    // JSON: what a value looks like inside a JSON string, and inside a JSON string that is itself
    // inside one (an agent's `result`, which holds its structured output as JSON text).
    let mut escaped = value.to_string();
    for _ in 0..2 {
        let Ok(json) = serde_json::to_string(&escaped) else {
            break;
        };
        escaped = json[1..json.len() - 1].to_string();
        out.push(escaped.as_bytes().to_vec());
    }
    // Base64, whole.
    for engine in [&STANDARD, &URL_SAFE] {
        out.push(engine.encode(raw).into_bytes());
    }
    // Base64 as part of a longer text (`user:token` in a Basic header): for each of the three
    // alignments, the characters that depend on the value alone.
    for shift in 0..3usize {
        let mut padded = vec![0u8; shift];
        padded.extend_from_slice(raw);
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            let text = engine.encode(&padded);
            let skip = (8 * shift).div_ceil(6);
            let partial = (8 * padded.len()) % 6 != 0;
            let end = text.len() - usize::from(partial);
            if skip < end {
                out.push(text.as_bytes()[skip..end].to_vec());
            }
        }
    }
    // Percent-encoding: everything but alphanumerics, and as encodeURIComponent leaves it.
    const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'_')
        .remove(b'.')
        .remove(b'!')
        .remove(b'~')
        .remove(b'*')
        .remove(b'\'')
        .remove(b'(')
        .remove(b')');
    for set in [NON_ALPHANUMERIC, COMPONENT] {
        let upper = utf8_percent_encode(value, set).to_string();
        let lower = lower_hex_escapes(&upper);
        out.push(upper.replace("%20", "+").into_bytes());
        out.push(lower.clone().into_bytes());
        out.push(upper.into_bytes());
    }
    out.retain(|form| !form.is_empty());
    out
}

/// `%2F` → `%2f`, leaving the rest.
fn lower_hex_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut after_percent = 0;
    for c in text.chars() {
        if c == '%' {
            after_percent = 2;
            out.push(c);
        } else if after_percent > 0 {
            after_percent -= 1;
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

/// Masks a stream written in pieces (a log file): of the last (longest pattern − 1) bytes of what
/// it was given, keeps back those from the first that could start a value the next piece ends (a
/// line like `waiting` goes out at once, so a followed log stays live).
pub struct StreamRedactor {
    redactor: Arc<Redactor>,
    carry: Vec<u8>,
}

impl StreamRedactor {
    /// Adds a piece; appends to `out` what can be written now.
    pub fn push(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        let Some(ac) = &self.redactor.automaton else {
            out.extend_from_slice(piece);
            return;
        };
        self.carry.extend_from_slice(piece);
        let buffer = std::mem::take(&mut self.carry);
        // A match starting before `cut` is whole in `buffer`, and so is every pattern that could
        // start there: it can be decided now.
        let cut = buffer.len().saturating_sub(self.redactor.longest - 1);
        let mut written = 0;
        for m in ac.find_iter(&buffer) {
            if m.start() >= cut {
                break;
            }
            out.extend_from_slice(&buffer[written..m.start()]);
            out.extend_from_slice(self.redactor.replacements[m.pattern().as_usize()].as_bytes());
            written = m.end();
        }
        let undecided = written.max(cut);
        let keep_from = (undecided..buffer.len())
            .find(|&q| self.redactor.could_start(&buffer[q..]))
            .unwrap_or(buffer.len());
        out.extend_from_slice(&buffer[written..keep_from]);
        self.carry = buffer[keep_from..].to_vec();
    }

    /// The end of the stream: what was kept back, masked.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let rest = std::mem::take(&mut self.carry);
        out.extend_from_slice(&self.redactor.redact_bytes(&rest));
    }
}

/// The redactor of the run this process drives. One run per process: `apply`, `retry` and `run`
/// each drive one; log writers, the store and the event log read it.
static ACTIVE: RwLock<Option<Arc<Redactor>>> = RwLock::new(None);

/// Makes `redactor` the one every writer uses from now on.
pub fn install(redactor: Redactor) {
    let redactor = (!redactor.is_empty()).then(|| Arc::new(redactor));
    if let Ok(mut active) = ACTIVE.write() {
        *active = redactor;
    }
}

/// The installed redactor, if it masks anything.
pub fn active() -> Option<Arc<Redactor>> {
    ACTIVE.read().ok().and_then(|a| a.clone())
}

/// `value` as JSON bytes, masked by the installed redactor.
pub fn json_bytes<T: Serialize + ?Sized>(value: &T) -> serde_json::Result<Vec<u8>> {
    match active() {
        Some(r) => r.json_bytes(value),
        None => serde_json::to_vec(value),
    }
}

/// `text` masked by the installed redactor.
pub fn redact_text(text: &str) -> Cow<'_, str> {
    match active() {
        Some(r) => Cow::Owned(r.redact_str(text).into_owned()),
        None => Cow::Borrowed(text),
    }
}

/// Masks, in place, every regular file under `dir` (not following links) that holds a value:
/// what a worker wrote there (an agent's session transcript) keeps no value once its attempt is
/// over.
pub fn redact_files_under(dir: &Path) {
    let Some(redactor) = active() else {
        return;
    };
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                redact_file(&redactor, &entry.path());
            }
        }
    }
}

/// Masks one file in place when it holds a value; returns whether it did.
pub fn redact_file(redactor: &Redactor, path: &Path) -> bool {
    let Ok(bytes) = std::fs::read(path) else {
        return false;
    };
    match redactor.redact_bytes(&bytes) {
        Cow::Owned(masked) => std::fs::write(path, masked).is_ok(),
        Cow::Borrowed(_) => false,
    }
}

/// The user's own directory of secret files: under `$XDG_RUNTIME_DIR` (memory, the user's only)
/// when there is one, else the temporary directory; never in the state or a workspace.
fn user_root() -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    base.join(format!("ccluster-secrets-{}", nix::unistd::getuid()))
}

/// The directory a run's secret files are written in (see [`write_secret_file`]).
pub fn files_root(run: &str) -> PathBuf {
    user_root().join(run)
}

/// Writes `value` as a 0600 file `name` in `<files_root(run)>/<attempt>/` and returns its path.
/// In a shared temporary directory someone else could have made the user's directory first: it
/// must be a real directory, the user's, and closed to others, or nothing is written. Below it
/// (0700) nobody else can change anything.
pub fn write_secret_file(
    run: &str,
    attempt: &str,
    name: &str,
    value: &str,
) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
    let root = user_root();
    match std::fs::DirBuilder::new().mode(0o700).create(&root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
        _ => {}
    }
    let meta = std::fs::symlink_metadata(&root)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::getuid().as_raw() || meta.mode() & 0o077 != 0 {
        return Err(std::io::Error::other(format!(
            "`{}` must be a directory of this user's, closed to others (mode 0700)",
            root.display()
        )));
    }
    let dir = root.join(run).join(attempt);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let path = dir.join(name);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&path)?;
    file.write_all(value.as_bytes())?;
    Ok(path)
}

/// Reads one key of a Kubernetes Secret through the kubeconfig's current context. On a thread of
/// its own, with a runtime of its own: secrets are read before a run starts, from synchronous code
/// that may itself run on a runtime's thread.
fn read_kubernetes_secret(namespace: &str, name: &str, key: &str) -> Result<String, String> {
    let (namespace, name, key) = (namespace.to_string(), name.to_string(), key.to_string());
    let read = move || -> Result<String, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start a runtime: {e}"))?;
        runtime.block_on(async {
            let config = kube::Config::infer()
                .await
                .map_err(|e| format!("cannot find a Kubernetes configuration: {e}"))?;
            let server = config.cluster_url.to_string();
            let client = kube::Client::try_from(config)
                .map_err(|e| format!("cannot make a Kubernetes client: {e}"))?;
            let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
                kube::Api::namespaced(client, &namespace);
            let secret = secrets.get(&name).await.map_err(|e| match &e {
                kube::Error::Api(s) if s.code == 404 => {
                    format!("the Secret `{name}` does not exist in namespace `{namespace}` on {server}")
                }
                kube::Error::Api(s) if s.code == 403 => format!(
                    "the Kubernetes API at {server} refuses to show Secret `{name}` in namespace `{namespace}` (it needs `get` on `secrets`)"
                ),
                _ => format!("cannot reach the Kubernetes API at {server}: {e}"),
            })?;
            let bytes = secret
                .data
                .and_then(|mut d| d.remove(&key))
                .ok_or_else(|| format!("the Secret `{name}` in namespace `{namespace}` has no key `{key}`"))?;
            String::from_utf8(bytes.0)
                .map_err(|_| format!("the key `{key}` of Secret `{name}` is not UTF-8 text"))
        })
    };
    std::thread::spawn(read)
        .join()
        .map_err(|_| "reading the Kubernetes Secret failed".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(value: &str) -> Arc<Redactor> {
        Arc::new(Redactor::new(&[("TOKEN".into(), value.into())]))
    }

    #[test]
    fn sources_parse_and_refuse() {
        assert_eq!(
            SecretSource::parse("env:GH_TOKEN"),
            Ok(SecretSource::Env("GH_TOKEN".into()))
        );
        assert_eq!(
            SecretSource::parse("command:pass show x"),
            Ok(SecretSource::Command("pass show x".into()))
        );
        assert!(SecretSource::parse("env:1BAD").is_err());
        assert!(SecretSource::parse("file:").is_err());
        assert!(SecretSource::parse("vault:x").is_err());
        assert!(SecretSource::parse("GH_TOKEN").is_err());
        assert_eq!(
            SecretSource::parse("kubernetes:ci/api-tokens/github.token"),
            Ok(SecretSource::Kubernetes {
                namespace: "ci".into(),
                name: "api-tokens".into(),
                key: "github.token".into(),
            })
        );
        assert_eq!(
            SecretSource::parse("kubernetes:ci/api-tokens/github.token")
                .unwrap()
                .describe(),
            "kubernetes:ci/api-tokens/github.token"
        );
        for bad in [
            "kubernetes:api-tokens/key",
            "kubernetes:ci/API/key",
            "kubernetes:ci/a/b/c",
            "kubernetes:ci//key",
        ] {
            assert!(SecretSource::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn short_values_and_failing_commands_are_refused_without_their_value() {
        let dir = std::env::temp_dir();
        let e = SecretSource::Command("printf short".into())
            .resolve(&dir)
            .unwrap_err();
        assert!(e.contains("shorter than 8"), "{e}");
        assert!(!e.contains("short\""));
        let e = SecretSource::Command("exit 3".into())
            .resolve(&dir)
            .unwrap_err();
        assert!(e.contains("failed"), "{e}");
        assert_eq!(
            SecretSource::Command("echo s3cr3t-value".into()).resolve(&dir),
            Ok("s3cr3t-value".into())
        );
    }

    #[test]
    fn every_encoding_is_masked() {
        let value = "tok/en+va lue\"x";
        let r = redactor(value);
        let b64 = base64::engine::general_purpose::STANDARD.encode(value);
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("u:{value}"));
        let url = percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
        let json = serde_json::to_string(value).unwrap();
        for text in [value.to_string(), b64, url] {
            let masked = r.redact_str(&text);
            assert_eq!(masked, "[secret TOKEN]".to_string(), "{text}");
        }
        assert_eq!(r.redact_str(&json), "\"[secret TOKEN]\"");
        let twice = serde_json::to_string(&serde_json::json!({ "result": json })).unwrap();
        assert_eq!(r.redact_str(&twice), r#"{"result":"\"[secret TOKEN]\""}"#);
        let masked = r.redact_str(&basic).into_owned();
        assert!(masked.contains("[secret TOKEN]"), "{basic} → {masked}");
    }

    #[test]
    fn a_value_cut_across_pieces_is_caught() {
        let value = "abcdefghijklmnop";
        let r = redactor(value);
        let text = format!("before {value} middle {value} after");
        for size in 1..text.len() {
            let mut stream = r.stream();
            let mut out = Vec::new();
            for piece in text.as_bytes().chunks(size) {
                stream.push(piece, &mut out);
            }
            stream.finish(&mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "before [secret TOKEN] middle [secret TOKEN] after",
                "pieces of {size}"
            );
        }
    }

    #[test]
    fn a_stream_keeps_back_only_what_could_start_a_value() {
        let r = redactor("abcdefghijklmnop");
        let mut stream = r.stream();
        let mut out = Vec::new();
        // Nothing here can start a value: all of it goes out at once, for followed logs.
        stream.push(b"waiting\n", &mut out);
        assert_eq!(out, b"waiting\n");
        // The start of one is kept back until the next piece says.
        stream.push(b"x abcd", &mut out);
        assert_eq!(out, b"waiting\nx ");
        stream.push(b"ex\n", &mut out);
        assert_eq!(out, b"waiting\nx abcdex\n");
    }

    #[test]
    fn a_value_is_found_in_a_reader_across_its_pieces() {
        let value = "abcdefghijklmnop";
        let r = redactor(value);
        let mut text = vec![b'x'; (64 << 10) - 5];
        text.extend_from_slice(value.as_bytes());
        text.extend_from_slice(b"tail");
        assert_eq!(r.find_in(&text[..]).unwrap(), Some("TOKEN"));
        assert_eq!(r.find_in(&text[..100]).unwrap(), None);
    }

    #[test]
    fn json_values_stay_json() {
        let r = redactor("12345678-secret");
        let v =
            serde_json::json!({"a": ["x 12345678-secret y"], "12345678-secret": 1, "n": 12345678});
        let bytes = r.json_bytes(&v).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"a": ["x [secret TOKEN] y"], "[secret TOKEN]": 1, "n": 12345678})
        );
    }
}
