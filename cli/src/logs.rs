//! `logs`: a run's task logs — every attempt of every matching plan node, both streams, each chunk
//! under a tail-style header — copied as bytes through a fixed buffer; `-f` waits for the run and
//! the task to appear and follows new attempts and map instances until the run ends; agent
//! transcripts are told for people unless `--raw`.

use std::collections::{HashMap, HashSet};
use std::io::{BufWriter, Read, Seek, SeekFrom, StdoutLock, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ccluster_engine::agent::transcript_view::{is_transcript, TranscriptView};
use ccluster_engine::exec;
use ccluster_engine::store::{RunRecord, RunState, Store, TaskRecord, TaskState};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

use crate::exit;
use crate::runs::{find_run, load_runs};

/// How often `-f` looks for new bytes, files and records.
const POLL: Duration = Duration::from_millis(100);
/// How long `-f` waits for a run, or a task of it, that is not there yet.
const APPEAR_WITHIN: Duration = Duration::from_secs(30);
/// The read buffer: memory stays flat however long a log is.
const CHUNK: usize = 64 * 1024;
/// The longest transcript line that is rendered; a longer one is copied as it is, so memory stays
/// bounded for a tool result of any size.
const MAX_LINE: usize = 1 << 20;

/// The streams of an attempt, in the order they are shown (a workspace's setup and a merge's
/// resolving command log beside the task's command), with their header words, and whether the
/// stream may be an agent's transcript.
const STREAMS: [(&str, &str, bool); 6] = [
    ("setup.out", "setup stdout", false),
    ("setup.err", "setup stderr", false),
    ("resolve.out", "resolve stdout", true),
    ("resolve.err", "resolve stderr", false),
    ("out", "stdout", true),
    ("err", "stderr", false),
];

pub struct LogsArgs<'a> {
    /// The first positional: a run, or (when it cannot be a run id) a task of the latest run.
    pub run: Option<&'a str>,
    pub task: Option<&'a str>,
    pub follow: bool,
    pub raw: bool,
}

/// Run ids start with their date (`20261125-…`) and task ids with a letter or `_`, so a lone
/// positional is a run exactly when it starts with a digit (or is `latest`).
fn names_a_run(arg: &str) -> bool {
    arg == "latest" || arg.starts_with(|c: char| c.is_ascii_digit())
}

pub fn logs(dir: &Path, args: LogsArgs<'_>) -> u8 {
    let (run, task) = match (args.run, args.task) {
        (Some(first), None) if !names_a_run(first) => (None, Some(first)),
        given => given,
    };
    // `latest` is the default run.
    let run = run.filter(|r| *r != "latest");
    if args.follow {
        return follow(dir, run, task, args.raw);
    }
    let view = match load_runs(dir).and_then(|v| find_run(v, run)) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let mut known = HashSet::new();
    let files = select(dir, &view.run.id, &view.tasks, task, args.raw, &mut known);
    if task.is_some_and(|id| files.is_empty() && !view.tasks.iter().any(|t| matches(t, id))) {
        let running = view.live && view.run.state == RunState::Running;
        return no_task(&view.run.id, running, &view.tasks, task.unwrap_or_default());
    }
    let mut printer = Printer::new();
    for (i, mut file) in files.into_iter().enumerate() {
        // A closed stdout (`logs | head`) ends the output quietly.
        if file.drain(i, &mut printer, None).is_err() || file.finish(i, &mut printer).is_err() {
            return exit::SUCCESS;
        }
    }
    let _ = printer.finish();
    exit::SUCCESS
}

/// Whether a record is selected by a task id (all its instances), a plan node, or a template
/// instance's id (its embedded tasks `<id>.<task>`).
fn matches(t: &TaskRecord, id: &str) -> bool {
    t.node == id
        || t.task == id
        || t.task
            .strip_prefix(id)
            .is_some_and(|rest| rest.starts_with('.'))
}

fn no_task(run: &str, running: bool, tasks: &[TaskRecord], id: &str) -> u8 {
    eprintln!("error: run {run} has no task `{id}`");
    if running {
        eprintln!("  note: the run is in progress, and a task is listed once it starts: `-f` waits for it");
    }
    let mut ids: Vec<&str> = tasks.iter().map(|t| t.task.as_str()).collect();
    ids.dedup();
    if !ids.is_empty() {
        eprintln!("  help: its tasks: {}", ids.join(", "));
    }
    exit::INVALID_INPUT
}

/// A plan node's log file name stem: `build[2]` → `build.2`.
fn stem_of(node: &str) -> String {
    exec::log_path(Path::new(""), node, 0, "x")
        .to_string_lossy()
        .trim_end_matches(".0.x")
        .to_string()
}

/// The plan node a stem stands for when no record says (`build.2` → `build[2]`).
fn node_of(stem: &str) -> String {
    let mut parts = stem.split('.');
    let mut node = parts.next().unwrap_or_default().to_string();
    for index in parts {
        node.push_str(&format!("[{index}]"));
    }
    node
}

/// `<stem>.<attempt>.<stream>` → the stem, the attempt and the stream's place in [`STREAMS`].
fn parse_name(name: &str) -> Option<(&str, u32, usize)> {
    // The two-part streams come first, so `build.1.setup.out` is not read as stream `out`.
    STREAMS.iter().enumerate().find_map(|(i, (ext, ..))| {
        let rest = name.strip_suffix(ext)?.strip_suffix('.')?;
        let (stem, attempt) = rest.rsplit_once('.')?;
        Some((stem, attempt.parse().ok()?, i))
    })
}

/// The log files of a run that `task` selects (all without one) and that are not `known` yet, in
/// plan order, then attempt, then stream. A cached node's are those of the run it came from.
fn select(
    dir: &Path,
    run: &str,
    records: &[TaskRecord],
    task: Option<&str>,
    raw: bool,
    known: &mut HashSet<PathBuf>,
) -> Vec<LogFile> {
    let by_stem: HashMap<String, &TaskRecord> =
        records.iter().map(|t| (stem_of(&t.node), t)).collect();
    let filter = task.map(stem_of);
    // A task id selects all its instances (`build` → `build.0`, `build.1`, …): ids never hold
    // `.`, so the prefix cannot catch another task. Files are matched by name, not only through
    // records, so an instance's logs show even before the live view lists it.
    let wanted = |stem: &str| match &filter {
        None => true,
        Some(f) => {
            stem == f
                || stem
                    .strip_prefix(f.as_str())
                    .is_some_and(|r| r.starts_with('.'))
                || by_stem
                    .get(stem)
                    .is_some_and(|t| task.is_some_and(|id| matches(t, id)))
        }
    };
    let logs_of = |run: &str| dir.join("runs").join(run).join("logs");
    let mut found: Vec<((u64, String, u32, usize), LogFile)> = Vec::new();
    let mut look = |logs: &Path, note: &str, only: Option<&HashSet<String>>| {
        for entry in std::fs::read_dir(logs).into_iter().flatten().flatten() {
            let name = entry.file_name();
            let Some((stem, attempt, stream)) = name.to_str().and_then(parse_name) else {
                continue;
            };
            let selected = match only {
                Some(stems) => stems.contains(stem),
                None => wanted(stem),
            };
            if !selected {
                continue;
            }
            let path = entry.path();
            if known.contains(&path) {
                continue;
            }
            let record = by_stem.get(stem);
            let node = record.map_or_else(|| node_of(stem), |t| t.node.clone());
            let (_, words, transcript) = STREAMS[stream];
            let key = (
                record.map_or(u64::MAX, |t| t.order),
                stem.to_string(),
                attempt,
                stream,
            );
            known.insert(path.clone());
            found.push((
                key,
                LogFile {
                    header: format!("==> {node}{note} attempt {attempt} {words} <=="),
                    path,
                    offset: 0,
                    decoder: if transcript && !raw {
                        Decoder::Sniffing(Vec::new())
                    } else {
                        Decoder::Bytes
                    },
                },
            ));
        }
    };
    look(&logs_of(run), "", None);
    // A cached node ran in an earlier run: its logs are that run's (each run's folder read once).
    let mut cached: HashMap<&str, HashSet<String>> = HashMap::new();
    for t in records {
        if let (TaskState::Cached, Some(source)) = (t.state, &t.cached_from) {
            if task.is_none_or(|id| matches(t, id)) {
                cached.entry(source).or_default().insert(stem_of(&t.node));
            }
        }
    }
    for (source, stems) in &cached {
        look(
            &logs_of(source),
            &format!(" (cached from run {source})"),
            Some(stems),
        );
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    found.into_iter().map(|(_, f)| f).collect()
}

/// How a file's bytes are shown.
enum Decoder {
    /// Copied as they are.
    Bytes,
    /// A stdout that may be an agent's transcript: held until its first line tells.
    Sniffing(Vec<u8>),
    Transcript {
        view: Box<TranscriptView>,
        /// The line being read.
        line: Vec<u8>,
        /// Inside a line too long to render, which is being copied as it is.
        overlong: bool,
    },
}

/// One log file being shown: how far it was read and how it is decoded.
struct LogFile {
    path: PathBuf,
    header: String,
    offset: u64,
    decoder: Decoder,
}

impl LogFile {
    /// Turns bytes read from the file into what is shown.
    fn take(&mut self, bytes: &[u8], out: &mut Vec<u8>) {
        if let Decoder::Sniffing(held) = &mut self.decoder {
            held.extend_from_slice(bytes);
            // Only a stream starting with `{` can be stream-json: any other is shown at once,
            // even a partial line (a shell task's `Working...`).
            let decided = match held.iter().position(|b| *b == b'\n') {
                _ if held.first().is_some_and(|b| *b != b'{') => Some(false),
                Some(end) => Some(is_transcript(&held[..end])),
                None => (held.len() > MAX_LINE).then_some(false),
            };
            let Some(transcript) = decided else {
                return;
            };
            let held = std::mem::take(held);
            if transcript {
                self.decoder = Decoder::Transcript {
                    view: Box::default(),
                    line: Vec::new(),
                    overlong: false,
                };
                return self.take(&held, out);
            }
            self.decoder = Decoder::Bytes;
            return out.extend_from_slice(&held);
        }
        match &mut self.decoder {
            Decoder::Bytes | Decoder::Sniffing(_) => out.extend_from_slice(bytes),
            Decoder::Transcript {
                view,
                line,
                overlong,
            } => {
                let mut rest = bytes;
                while !rest.is_empty() {
                    let (piece, ended) = match rest.iter().position(|b| *b == b'\n') {
                        Some(end) => (&rest[..end], true),
                        None => (rest, false),
                    };
                    rest = &rest[(piece.len() + usize::from(ended))..];
                    if *overlong {
                        out.extend_from_slice(piece);
                    } else {
                        line.extend_from_slice(piece);
                        if line.len() > MAX_LINE {
                            out.append(line);
                            *overlong = true;
                        }
                    }
                    if ended {
                        if *overlong {
                            out.push(b'\n');
                            *overlong = false;
                        } else {
                            // Writing to a Vec cannot fail.
                            let _ = view.render(line, out);
                            line.clear();
                        }
                    }
                }
            }
        }
    }

    /// Shows what was written since the last call, a fixed buffer at a time. Only a failed
    /// write to stdout is an error; a file that cannot be read yet is retried on the next call.
    fn drain(
        &mut self,
        id: usize,
        printer: &mut Printer,
        interrupt: Option<&Interrupt>,
    ) -> std::io::Result<()> {
        // A stat first: most files have not grown since the last poll.
        if std::fs::metadata(&self.path).map_or(true, |m| m.len() <= self.offset) {
            return Ok(());
        }
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return Ok(());
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Ok(());
        }
        let mut buf = vec![0u8; CHUNK];
        let mut shown = Vec::with_capacity(CHUNK);
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) | Err(_) => return Ok(()),
                Ok(n) => n,
            };
            self.offset += n as u64;
            self.take(&buf[..n], &mut shown);
            printer.emit(id, &self.header, &shown)?;
            shown.clear();
            if interrupt.is_some_and(Interrupt::fired) {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
        }
    }

    /// The file is complete: shows what was held back (a last line without its newline).
    fn finish(&mut self, id: usize, printer: &mut Printer) -> std::io::Result<()> {
        let mut shown = Vec::new();
        match std::mem::replace(&mut self.decoder, Decoder::Bytes) {
            Decoder::Sniffing(held) => shown = held,
            Decoder::Transcript { mut view, line, .. } if !line.is_empty() => {
                let _ = view.render(&line, &mut shown);
            }
            _ => {}
        }
        printer.emit(id, &self.header, &shown)
    }
}

/// Writes chunks to stdout, each under its file's header when the file changes (as `tail` does
/// with several files).
struct Printer {
    out: BufWriter<StdoutLock<'static>>,
    current: Option<usize>,
    at_line_start: bool,
}

impl Printer {
    fn new() -> Printer {
        Printer {
            out: BufWriter::with_capacity(CHUNK, std::io::stdout().lock()),
            current: None,
            at_line_start: true,
        }
    }

    fn emit(&mut self, id: usize, header: &str, bytes: &[u8]) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        if self.current != Some(id) {
            if !self.at_line_start {
                self.out.write_all(b"\n")?;
            }
            self.out.write_all(header.as_bytes())?;
            self.out.write_all(b"\n")?;
            self.current = Some(id);
        }
        self.out.write_all(bytes)?;
        self.at_line_start = bytes.ends_with(b"\n");
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn finish(&mut self) -> std::io::Result<()> {
        if !self.at_line_start {
            self.out.write_all(b"\n")?;
        }
        self.out.flush()
    }
}

/// Ctrl-C while following: read as a pending signal between reads, so `logs -f` ends with
/// exit code 130 and nothing on stderr.
struct Interrupt(Option<SignalFd>);

impl Interrupt {
    fn install() -> Interrupt {
        let mut mask = SigSet::empty();
        mask.add(Signal::SIGINT);
        if mask.thread_block().is_err() {
            return Interrupt(None);
        }
        Interrupt(SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK).ok())
    }

    fn fired(&self) -> bool {
        self.0
            .as_ref()
            .is_some_and(|fd| matches!(fd.read_signal(), Ok(Some(_))))
    }
}

/// The process driving the state, if any: it holds the lock file exclusively, with its pid in
/// it. Checked without opening the database, which a reader must not hold while a run starts.
fn driver(dir: &Path) -> Option<u32> {
    use nix::fcntl::{Flock, FlockArg};
    let file = std::fs::File::open(dir.join("lock")).ok()?;
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        // Nobody drives it (the shared lock is dropped at once).
        Ok(_) => None,
        Err(_) => std::fs::read_to_string(dir.join("lock"))
            .ok()
            .and_then(|pid| pid.trim().parse().ok())
            // Held, but the pid is not written yet: a writer all the same.
            .or(Some(0)),
    }
}

/// The run records a run's live view holds so far, read as the file grows.
struct LiveTail {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    run: Option<RunRecord>,
    tasks: Vec<TaskRecord>,
    at: HashMap<String, usize>,
}

impl LiveTail {
    fn new(dir: &Path, run: &str) -> LiveTail {
        LiveTail {
            path: dir.join("runs").join(run).join(exec::LIVE_FILE),
            offset: 0,
            partial: Vec::new(),
            run: None,
            tasks: Vec::new(),
            at: HashMap::new(),
        }
    }

    /// Reads what was appended; false when there is no live view (the run is not running).
    fn refresh(&mut self) -> bool {
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return false;
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return true;
        }
        let mut buf = vec![0u8; CHUNK];
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            self.offset += n as u64;
            self.partial.extend_from_slice(&buf[..n]);
            while let Some(end) = self.partial.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.partial.drain(..=end).collect();
                self.record(&line[..end]);
            }
        }
        true
    }

    /// The run record first, then task records; the last line of a node wins.
    fn record(&mut self, line: &[u8]) {
        if self.run.is_none() {
            self.run = serde_json::from_slice(line).ok();
            return;
        }
        let Ok(record) = serde_json::from_slice::<TaskRecord>(line) else {
            return;
        };
        match self.at.get(&record.node) {
            Some(&i) => self.tasks[i] = record,
            None => {
                self.at.insert(record.node.clone(), self.tasks.len());
                self.tasks.push(record);
            }
        }
    }
}

/// A run's id, or why it is not known yet.
enum Pick {
    Found(String),
    Ambiguous(Vec<String>),
    NotYet,
}

/// The run to follow: the one named (by id or unique prefix), else the one in progress, else the
/// latest. Read from the runs' folders and live views, so it works while a run holds the state.
fn pick_run(dir: &Path, run: Option<&str>) -> Pick {
    let mut ids: Vec<String> = std::fs::read_dir(dir.join("runs"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|id| names_a_run(id))
        .collect();
    ids.sort();
    if let Some(wanted) = run {
        if ids.iter().any(|id| id == wanted) {
            return Pick::Found(wanted.to_string());
        }
        let mut starting: Vec<String> = ids
            .into_iter()
            .filter(|id| id.starts_with(wanted))
            .collect();
        return match starting.len() {
            0 => Pick::NotYet,
            1 => Pick::Found(starting.remove(0)),
            _ => Pick::Ambiguous(starting),
        };
    }
    match driver(dir) {
        // A run is being driven: follow it once its live view names it.
        Some(pid) => {
            ids.iter()
                .rev()
                .find(|id| {
                    let mut live = LiveTail::new(dir, id);
                    live.refresh()
                        && live.run.as_ref().is_some_and(|r| {
                            r.state == RunState::Running && (pid == 0 || r.pid == pid)
                        })
                })
                .map_or(Pick::NotYet, |id| Pick::Found(id.clone()))
        }
        None => ids.pop().map_or(Pick::NotYet, Pick::Found),
    }
}

/// The records of a run that is no longer driven: from its archive, written when it finished,
/// else from the database (none while another run holds it: the files are shown all the same,
/// named by their file names).
fn stored_tasks(dir: &Path, run: &str) -> Option<Vec<TaskRecord>> {
    let mut tasks = match ccluster_engine::store::Archive::new(dir).run(run) {
        Some(archive) => archive.tasks.clone(),
        None if dir.join("db").exists() => Store::open_reader(dir).ok()?.tasks(run).ok()?,
        None => return None,
    };
    tasks.sort_by_key(|t| t.order);
    Some(tasks)
}

/// `logs -f`: like `kubectl logs -f`, waits for the run and the task, then shows every attempt's
/// streams as they grow, until the run ends and every file is read to its end.
fn follow(dir: &Path, run: Option<&str>, task: Option<&str>, raw: bool) -> u8 {
    let interrupt = Interrupt::install();
    let started = Instant::now();
    let run_id = loop {
        match pick_run(dir, run) {
            Pick::Found(id) => break id,
            Pick::Ambiguous(ids) => {
                eprintln!(
                    "error: `{}` names more than one run: {}",
                    run.unwrap_or_default(),
                    ids.join(", ")
                );
                eprintln!("  help: give more of the run id");
                return exit::INVALID_INPUT;
            }
            Pick::NotYet => {}
        }
        if started.elapsed() >= APPEAR_WITHIN {
            match run {
                Some(r) => eprintln!(
                    "error: no run `{r}` appeared in {}s",
                    APPEAR_WITHIN.as_secs()
                ),
                None => eprintln!(
                    "error: no run started in {} within {}s",
                    dir.display(),
                    APPEAR_WITHIN.as_secs()
                ),
            }
            eprintln!("  help: `ccluster runs` lists the runs; start one with `ccluster apply`");
            return exit::INVALID_INPUT;
        }
        if interrupt.fired() {
            return exit::CANCELLED;
        }
        std::thread::sleep(POLL);
    };
    let mut live = LiveTail::new(dir, &run_id);
    let mut printer = Printer::new();
    let mut files: Vec<LogFile> = Vec::new();
    let mut known = HashSet::new();
    let mut matched = task.is_none();
    let mut waiting_said = false;
    loop {
        // Decided before reading: whatever the run wrote before it ended is read below.
        let has_view = live.refresh();
        let running = has_view
            && live.run.as_ref().is_some_and(|r| {
                r.state == RunState::Running && driver(dir).is_some_and(|pid| pid == r.pid)
            });
        let stored;
        let records: &[TaskRecord] = if running || has_view {
            &live.tasks
        } else {
            stored = stored_tasks(dir, &run_id).unwrap_or_else(|| live.tasks.clone());
            &stored
        };
        let new = select(dir, &run_id, records, task, raw, &mut known);
        matched |= !new.is_empty() || task.is_some_and(|id| records.iter().any(|t| matches(t, id)));
        files.extend(new);
        for (i, file) in files.iter_mut().enumerate() {
            match file.drain(i, &mut printer, Some(&interrupt)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    let _ = printer.finish();
                    return exit::CANCELLED;
                }
                Err(_) => return exit::SUCCESS,
            }
        }
        if printer.flush().is_err() {
            return exit::SUCCESS;
        }
        if let (false, Some(id)) = (matched, task) {
            if !running {
                return no_task(&run_id, false, records, id);
            }
            // A task is listed once it starts, which may be long after the run did: keep
            // waiting while the run runs, but say so.
            if !waiting_said && started.elapsed() >= APPEAR_WITHIN {
                waiting_said = true;
                eprintln!(
                    "(run {run_id} has not started a task `{id}` yet; waiting until it does or the run ends)"
                );
            }
        }
        if !running {
            for (i, file) in files.iter_mut().enumerate() {
                if file.finish(i, &mut printer).is_err() {
                    return exit::SUCCESS;
                }
            }
            let _ = printer.finish();
            return exit::SUCCESS;
        }
        if interrupt.fired() {
            let _ = printer.finish();
            return exit::CANCELLED;
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_names_are_read_back_to_node_attempt_and_stream() {
        assert_eq!(parse_name("build.2.1.out"), Some(("build.2", 1, 4)));
        assert_eq!(parse_name("build.12.setup.err"), Some(("build", 12, 1)));
        assert_eq!(parse_name("m.1.resolve.out"), Some(("m", 1, 2)));
        assert_eq!(parse_name("live.jsonl"), None);
        assert_eq!(parse_name("a.x.out"), None);
        assert_eq!(node_of("build.2"), "build[2]");
        assert_eq!(stem_of("build[2]"), "build.2");
    }

    fn sniffing() -> LogFile {
        LogFile {
            path: PathBuf::new(),
            header: String::new(),
            offset: 0,
            decoder: Decoder::Sniffing(Vec::new()),
        }
    }

    #[test]
    fn a_transcript_split_across_reads_renders_whole_lines_and_an_overlong_line_passes_through() {
        let mut file = sniffing();
        let mut out = Vec::new();
        let init = br#"{"type":"system","subtype":"init","session_id":"s","cwd":"/w"}"#;
        // Cut mid-line: nothing is shown until the line is whole.
        file.take(&init[..10], &mut out);
        assert!(out.is_empty());
        file.take(&init[10..], &mut out);
        file.take(b"\n", &mut out);
        assert!(String::from_utf8_lossy(&out).starts_with("session s"));
        out.clear();
        let long = vec![b'x'; MAX_LINE + 10];
        file.take(&long, &mut out);
        file.take(b"tail\n", &mut out);
        assert_eq!(out.len(), long.len() + "tail\n".len());
        out.clear();
        file.take(b"plain\n", &mut out);
        assert_eq!(out, b"plain\n");
    }

    #[test]
    fn a_stream_that_is_not_json_is_shown_at_once() {
        let mut file = sniffing();
        let mut out = Vec::new();
        file.take(b"Working...", &mut out);
        assert_eq!(out, b"Working...");
        let mut json = sniffing();
        out.clear();
        json.take(b"{\"a\":1}\nrest", &mut out);
        assert_eq!(out, b"{\"a\":1}\nrest");
    }

    #[test]
    fn a_lone_positional_is_a_run_only_when_it_can_be_a_run_id() {
        assert!(names_a_run("20261125-081038.412-3fa2"));
        assert!(names_a_run("2026"));
        assert!(names_a_run("latest"));
        assert!(!names_a_run("build"));
        assert!(!names_a_run("_x"));
    }
}
