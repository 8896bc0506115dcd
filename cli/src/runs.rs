//! `apply`, `runs`, `status`, `retry` and `cancel`: running workflows and looking at their state
//! (`logs` is in `logs.rs`).

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ccluster_engine::exec::{self, ApplyOptions, Event, EventSink, LocalRunner};
use ccluster_engine::store::{RunRecord, RunState, Store, StoreError, TaskRecord, TaskState};

use crate::exit;

/// How `apply` reports progress.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// One line per event, with the time.
    Human,
    /// One JSON object per event and line (see docs/events.md).
    Json,
}

/// Where the state of a clusterfile lives: `--state-dir`, `CCLUSTER_STATE_DIR`, or `.ccluster/`
/// beside the clusterfile.
pub fn state_dir(explicit: Option<&Path>, clusterfile: &Path) -> PathBuf {
    explicit
        .map(Path::to_path_buf)
        .unwrap_or_else(|| exec::default_state_dir(clusterfile))
}

/// Prints a line to stdout; a closed pipe (`ccluster status | head`) ends the output quietly
/// instead of panicking like `println!`.
macro_rules! say {
    () => { say("") };
    ($($arg:tt)*) => { say(&format!($($arg)*)) };
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
}

fn clock(ms: u64) -> String {
    let secs = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60
    )
}

fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// Plain lines, written once per batch of events (one write per commit, not per line).
struct HumanEvents {
    out: std::io::BufWriter<std::io::Stdout>,
}

/// An event in words, as both the plain lines and the live view print it.
pub fn describe(event: &Event) -> String {
    let state_word = |state: &RunState| {
        serde_json::to_value(state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    match event {
        Event::RunStarted { run, workflow, nodes, .. } => format!("run {run} of `{workflow}`: {nodes} plan node{}", if *nodes == 1 { "" } else { "s" }),
        Event::TaskStarted { task, attempt, .. } if *attempt > 1 => format!("start   {task} (attempt {attempt})"),
        Event::TaskStarted { task, .. } => format!("start   {task}"),
        Event::TaskRetrying { task, attempt, class, delay_ms, message, .. } => {
            format!("retry   {task}: attempt {attempt} failed ({message}, {}); next in {}", class.name(), duration(*delay_ms))
        }
        Event::TaskSucceeded { task, duration_ms, .. } => format!("done    {task} in {}", duration(*duration_ms)),
        Event::TaskCached { task, from_run, .. } => format!("cached  {task} (from run {from_run})"),
        Event::TaskDeduplicated { task, from_task, .. } => format!("dedup   {task} (result of {from_task}, the same work)"),
        Event::TaskFailed { task, message, .. } => format!("FAILED  {task}: {message}"),
        Event::TaskSkipped { task, reason, .. } => format!("skip    {task}: {reason}"),
        Event::TaskCancelled { task, reason, .. } => format!("cancel  {task}: {reason}"),
        Event::MapExpanded {
            task,
            items,
            graph: None,
            ..
        } => format!("map     {task}: {items} instances"),
        Event::MapExpanded {
            task,
            items,
            graph: Some(graph),
            ..
        } => {
            let edges: usize = graph.iter().map(|i| i.after.len()).sum();
            format!(
                "graph   {task}: {items} instances, {edges} dependenc{}",
                if edges == 1 { "y" } else { "ies" }
            )
        }
                Event::TaskProgress { task, kind, detail, .. } => format!("  ·     {task}: {kind} {detail}"),
        Event::Warning { task, message, .. } => format!("warning {task}: {message}"),
        Event::RunFinished { run, state, succeeded, cached, failed, skipped, cancelled, duration_ms, .. } => format!(
            "run {run} {} in {}: {succeeded} succeeded, {cached} cached, {failed} failed, {skipped} skipped, {cancelled} cancelled",
            state_word(state),
            duration(*duration_ms)
        ),
    }
}

fn event_time(event: &Event) -> u64 {
    match event {
        Event::RunStarted { time_ms, .. }
        | Event::TaskStarted { time_ms, .. }
        | Event::TaskRetrying { time_ms, .. }
        | Event::TaskSucceeded { time_ms, .. }
        | Event::TaskCached { time_ms, .. }
        | Event::TaskDeduplicated { time_ms, .. }
        | Event::TaskFailed { time_ms, .. }
        | Event::TaskSkipped { time_ms, .. }
        | Event::TaskCancelled { time_ms, .. }
        | Event::MapExpanded { time_ms, .. }
        | Event::TaskProgress { time_ms, .. }
        | Event::Warning { time_ms, .. }
        | Event::RunFinished { time_ms, .. } => *time_ms,
    }
}

impl EventSink for HumanEvents {
    fn emit(&mut self, event: &Event) {
        // An agent's cost as it grows is for machines (JSON events); people get it at the end.
        if matches!(event, Event::TaskProgress { kind, .. } if kind == "cost") {
            return;
        }
        let _ = writeln!(self.out, "{} {}", clock(event_time(event)), describe(event));
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

struct JsonEvents {
    out: std::io::BufWriter<std::io::Stdout>,
}

impl EventSink for JsonEvents {
    fn emit(&mut self, event: &Event) {
        let _ = serde_json::to_writer(&mut self.out, event);
        let _ = self.out.write_all(b"\n");
    }

    fn flush(&mut self) {
        let _ = self.out.flush();
    }
}

fn open_store(dir: &Path) -> Result<Store, u8> {
    let store = Store::open(dir).map_err(|e| {
        eprintln!("error: {e}");
        // On stderr: stdout may carry JSON events, and the runner reads both.
        crate::github::error(&e.to_string(), crate::github::Stream::Stderr);
        if let StoreError::Locked { .. } = e {
            eprintln!("  help: wait for it, or stop it with `ccluster cancel`; `ccluster status` shows its progress");
        }
        exit::INVALID_INPUT
    })?;
    warn_if_loose(&store);
    Ok(store)
}

/// Says when the state directory was found open to other users.
pub(crate) fn warn_if_loose(store: &Store) {
    if let Some(loose) = &store.loose {
        eprintln!(
            "warning: the state directory {} {loose}",
            store.dir().display()
        );
        if !loose.tightened {
            eprintln!(
                "  help: it holds files that are not ccluster's, so its mode is left alone; `chmod 700 {}` if only you should read it",
                store.dir().display()
            );
        }
    }
}

pub struct ApplyArgs<'a> {
    pub clusterfile: &'a Path,
    /// The clusterfile's text, kept with the run for `retry`.
    pub source: &'a str,
    /// Tasks or plan nodes to run even when cached (`retry --task`).
    pub rerun: Vec<String>,
    pub state_dir: PathBuf,
    /// `--jobs`; `None`: [`default_jobs`].
    pub jobs: Option<usize>,
    /// `--agents`; `None`: [`default_agents`].
    pub agents: Option<usize>,
    /// Not `--no-adapt`.
    pub adapt_agents: bool,
    /// `--advertise-addr`: where pods of a Kubernetes runner reach this machine.
    pub advertise: Option<String>,
    pub fresh: bool,
    pub grace: Duration,
    pub output: OutputFormat,
    /// `--rehearse`: agents answer from the scripted model server (with this script).
    pub rehearse: Option<ccluster_engine::scripted::Script>,
    pub keep_going: bool,
    /// The texts of the templates the clusterfile used, kept with the run.
    pub templates: std::collections::BTreeMap<String, String>,
}

/// Tasks running at once when `--jobs` does not say: one per CPU for this machine's work, and a
/// Kubernetes runner's `max_parallel` (32 unless it says) for the pods it places elsewhere.
pub fn default_jobs(compiled: &ccluster_engine::Compiled) -> usize {
    use ccluster_engine::model::raw::RunnerKind;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut used: Vec<&str> = compiled
        .plan
        .nodes
        .iter()
        .map(|n| n.runner.as_str())
        .collect();
    used.sort_unstable();
    used.dedup();
    let remote: usize = used
        .into_iter()
        .filter_map(|name| compiled.workflow.runners.get(name))
        .filter(|decl| decl.kind == RunnerKind::Kubernetes)
        .map(|decl| decl.max_parallel.map_or(32, |m| m as usize))
        .sum();
    cpus + remote
}

/// What one agent worker takes in memory (the `claude` CLI, measured at 200–250 MB).
const AGENT_MEMORY: u64 = 250 << 20;
/// The most agents run at once unless asked: past this, rate limits rather than the machine are
/// what holds a run back.
const MAX_DEFAULT_AGENTS: usize = 8;

/// Agent tasks running at once when `--agents` does not say: `[defaults] max_agents`, else what
/// the memory available now allows, at most [`MAX_DEFAULT_AGENTS`], at least 1.
pub fn default_agents(compiled: &ccluster_engine::Compiled) -> usize {
    if let Some(n) = compiled.workflow.max_agents {
        return n;
    }
    let available = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(2 * AGENT_MEMORY, |kb| kb * 1024);
    ((available / AGENT_MEMORY) as usize).clamp(1, MAX_DEFAULT_AGENTS)
}

/// What the Kubernetes runners of the state's runs (as the latest run of each clusterfile
/// declared them) left in their namespaces, as `namespace kind/name`: deleted unless `dry_run`.
/// A cluster that cannot be reached is said, not an error: `gc` goes on.
pub fn kubernetes_leftovers(
    state: &Path,
    runs: &[ccluster_engine::store::RunRecord],
    dry_run: bool,
) -> Vec<String> {
    use ccluster_engine::model::raw::RunnerKind;
    let mut latest: Vec<&ccluster_engine::store::RunRecord> = runs.iter().collect();
    latest.sort_by(|a, b| b.id.cmp(&a.id));
    let mut seen_sources = std::collections::HashSet::new();
    let mut seen_runners = std::collections::HashSet::new();
    let mut left = Vec::new();
    let Some(runtime) = crate::runtime() else {
        return left;
    };
    for run in latest {
        if !run.source.contains("kubernetes") || !seen_sources.insert(run.source.clone()) {
            continue;
        }
        let clusterfile = PathBuf::from(&run.clusterfile);
        let source = ccluster_engine::SourceFile::new(run.clusterfile.clone(), run.source.clone());
        let mut loader = ccluster_engine::model::compose::FileLoader {
            replay: Some(run.templates.clone()),
            ..Default::default()
        };
        let Ok(compiled) = ccluster_engine::compile_with(
            &source,
            ccluster_engine::syntax::Format::from_path(&clusterfile),
            &clusterfile
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            &Default::default(),
            ccluster_engine::Stage::Validate,
            &mut loader,
        ) else {
            continue;
        };
        for (name, decl) in &compiled.workflow.runners {
            let (RunnerKind::Kubernetes, Some(image), Some(settings)) =
                (decl.kind, &decl.image, &decl.kubernetes)
            else {
                continue;
            };
            let key = format!("{name}\0{:?}\0{:?}", settings.context, settings.namespace);
            if !seen_runners.insert(key) {
                continue;
            }
            match runtime.block_on(exec::kubernetes::KubernetesRunner::connect(
                name,
                image,
                settings.clone(),
                None,
            )) {
                Ok(runner) => {
                    let namespace = settings
                        .namespace
                        .clone()
                        .unwrap_or_else(|| "(the context's)".into());
                    for item in runtime.block_on(runner.sweep_state(state, dry_run)) {
                        left.push(format!("{item} in namespace {namespace}"));
                    }
                }
                Err(e) => eprintln!(
                    "note: runner `{name}`: {e}; what a crash left there is not collected"
                ),
            }
        }
    }
    left
}

/// The runners the plan's tasks name, made (and a Docker daemon reached, its images checked)
/// before anything starts.
fn runners_for(
    compiled: &ccluster_engine::Compiled,
    base_dir: &Path,
    advertise: Option<&str>,
    runtime: &tokio::runtime::Runtime,
) -> Result<exec::runner::Runners, String> {
    use ccluster_engine::model::raw::RunnerKind;
    let mut runners = exec::runner::Runners::local(std::sync::Arc::new(LocalRunner::new(
        // An escape hatch: every command through `sh -c`, simple ones too.
        std::env::var_os("CCLUSTER_ALWAYS_SHELL").is_some_and(|v| !v.is_empty() && v != "0"),
    )));
    let mut named: Vec<&str> = compiled
        .plan
        .nodes
        .iter()
        .map(|n| n.runner.as_str())
        .collect();
    named.sort_unstable();
    named.dedup();
    for name in named.into_iter().filter(|n| *n != "local") {
        let Some(decl) = compiled.workflow.runners.get(name) else {
            continue;
        };
        match (decl.kind, &decl.image, &decl.docker) {
            (RunnerKind::Local, ..) => {
                let local = runners.get("local").clone();
                runners = runners.with(name, local);
            }
            (RunnerKind::Docker, Some(image), Some(settings)) => {
                // Agents (a task's, a merge's resolver) sit on the `api-only` network by default.
                let agents = compiled.plan.nodes.iter().any(|n| {
                    n.runner == name
                        && matches!(
                            n.action,
                            ccluster_engine::plan::PlannedAction::Agent { .. }
                                | ccluster_engine::plan::PlannedAction::Merge {
                                    agent: Some(_),
                                    ..
                                }
                        )
                });
                let runner = runtime
                    .block_on(exec::docker::DockerRunner::connect(
                        name,
                        image,
                        settings.clone(),
                        base_dir,
                        agents,
                    ))
                    .map_err(|e| format!("runner `{name}`: {e}\n  help: start the Docker daemon, or point DOCKER_HOST at one; the image must be on it (or `pull` allowed)"))?;
                runners = runners.with(name, std::sync::Arc::new(runner));
            }
            (RunnerKind::Kubernetes, Some(image), _) => {
                let Some(settings) = decl.kubernetes.clone() else {
                    continue;
                };
                let runner = runtime
                    .block_on(exec::kubernetes::KubernetesRunner::connect(
                        name,
                        image,
                        settings,
                        advertise.map(str::to_string),
                    ))
                    .map_err(|e| format!("runner `{name}`: {e}\n  help: KUBECONFIG (or ~/.kube/config, or the pod's own service account) must reach the cluster, and its user may do what docs/runners.md lists"))?;
                runners = runners.with(name, std::sync::Arc::new(runner));
            }
            // Not built: `check_supported` says so.
            _ => {}
        }
    }
    Ok(runners)
}

pub fn apply(compiled: &ccluster_engine::Compiled, args: ApplyArgs<'_>) -> u8 {
    let Some(runtime) = crate::runtime() else {
        return exit::TASK_FAILED;
    };
    let base_dir = args
        .clusterfile
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let runners = match runners_for(compiled, &base_dir, args.advertise.as_deref(), &runtime) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INVALID_INPUT;
        }
    };
    if let Err(e) = exec::check_supported(compiled, &runners) {
        eprintln!("error: {e}");
        return exit::INVALID_INPUT;
    }
    let store = match open_store(&args.state_dir) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Some(pid) = &store.took_over_from {
        eprintln!(
            "note: process {pid} ended without releasing {}; its state is taken over",
            args.state_dir.display()
        );
    }
    let workdir = args
        .clusterfile
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let rehearse = args.rehearse.clone();
    let opts = ApplyOptions {
        jobs: args.jobs.unwrap_or_else(|| default_jobs(compiled)).max(1),
        agents: args
            .agents
            .unwrap_or_else(|| default_agents(compiled))
            .max(1),
        adapt_agents: args.adapt_agents,
        fresh: args.fresh,
        grace: args.grace,
        workdir: std::fs::canonicalize(&workdir).unwrap_or(workdir),
        clusterfile: args.clusterfile.display().to_string(),
        source: args.source.to_string(),
        rerun: args.rerun,
        rehearse,
        keep_going: args.keep_going,
        templates: args.templates.clone(),
    };
    let mut human = HumanEvents {
        out: std::io::BufWriter::new(std::io::stdout()),
    };
    let mut json = JsonEvents {
        out: std::io::BufWriter::new(std::io::stdout()),
    };
    let mut live;
    let plain: &mut dyn EventSink = match args.output {
        // On a terminal, a live view; elsewhere (CI, pipes), plain timestamped lines.
        OutputFormat::Human if std::io::stdout().is_terminal() => {
            live = crate::live::LiveView::new();
            &mut live
        }
        OutputFormat::Human => &mut human,
        OutputFormat::Json => &mut json,
    };
    // Under GitHub Actions, the same output plus annotations and grouped logs of failed tasks.
    let github = crate::github::active();
    let mut annotated;
    let sink: &mut dyn EventSink = match github {
        true => {
            annotated = crate::github::GitHubEvents {
                inner: plain,
                state_dir: args.state_dir.clone(),
                stream: github_stream(args.output),
            };
            &mut annotated
        }
        false => plain,
    };
    let has_agents = compiled.plan.nodes.iter().any(|n| {
        matches!(
            n.action,
            ccluster_engine::plan::PlannedAction::Agent { .. }
                | ccluster_engine::plan::PlannedAction::Merge { agent: Some(_), .. }
        )
    });
    if has_agents {
        // Say which credentials workers get (never the secret itself) before anything starts.
        let auth = match &args.rehearse {
            Some(_) => Some(ccluster_engine::agent::Auth::Rehearsal),
            None => ccluster_engine::agent::Auth::detect(),
        };
        if let Some(auth) = auth {
            eprintln!("agents authenticate with {}", auth.describe());
        }
    }
    if compiled.plan.nodes.iter().any(|n| n.workspace.is_some()) {
        if let Ok(repo) = ccluster_engine::workspace::Repo::discover(&opts.workdir) {
            if repo.is_dirty() {
                eprintln!(
                    "warning: {} has uncommitted changes; workspaces start from {} and will not see them",
                    repo.root.display(),
                    compiled.workflow.base.as_deref().unwrap_or("HEAD")
                );
            }
        }
    }
    let result = runtime.block_on(exec::apply(compiled, &store, runners, &opts, sink));
    if let Err(e) = &result {
        crate::github::error(&e.to_string(), github_stream(args.output));
    }
    if let (true, Ok(summary)) = (github, &result) {
        // Whatever the run's end (succeeded, failed, cancelled), its report goes to the job
        // summary, from the records this process still holds.
        job_summary(&store, &summary.run);
    }
    match result {
        Ok(summary) => {
            if args.output == OutputFormat::Human
                && summary.state == RunState::Succeeded
                && summary.succeeded == 0
                && summary.cached > 0
                && summary.failed == 0
            {
                say!("up to date: nothing to run ({} cached)", summary.cached);
            }
            if let (OutputFormat::Human, Some(branch)) = (args.output, &summary.result) {
                say!("result: branch {branch}");
                say!(
                    "  export it: ccluster export {} --patch result.diff   or   --branch NAME",
                    summary.run
                );
                say!(
                    "  each task's commit: git for-each-ref refs/ccluster/runs/{}/",
                    summary.run
                );
            }
            match summary.state {
                RunState::Succeeded => exit::SUCCESS,
                RunState::Cancelled => exit::CANCELLED,
                _ => exit::TASK_FAILED,
            }
        }
        Err(exec::ApplyError::Agent(e)) => {
            eprintln!("error: {e}");
            exit::INVALID_INPUT
        }
        Err(exec::ApplyError::Secret(e)) => {
            for line in e.lines() {
                eprintln!("error: {line}");
            }
            eprintln!(
                "  hint: nothing was run; set what the secret is read from, or change its `from`"
            );
            exit::INVALID_INPUT
        }
        Err(exec::ApplyError::Workspace(e)) => {
            eprintln!("error: {e}");
            eprintln!("  hint: run `git init && git commit --allow-empty -m init` in the clusterfile's directory, or set `[workflow] base` to an existing ref");
            exit::INVALID_INPUT
        }
        Err(e) => {
            // A failed state write stops the run: nothing after it can be trusted to resume.
            eprintln!("error: {e}");
            exit::TASK_FAILED
        }
    }
}

/// Where workflow commands go beside `apply`'s output: stdout, unless it carries JSON events.
fn github_stream(output: OutputFormat) -> crate::github::Stream {
    match output {
        OutputFormat::Json => crate::github::Stream::Stderr,
        OutputFormat::Human => crate::github::Stream::Stdout,
    }
}

/// Appends run `id`'s Markdown report to the GitHub job summary.
fn job_summary(store: &Store, id: &str) {
    let report = store
        .run(id)
        .map_err(|e| e.to_string())
        .and_then(|run| run.ok_or_else(|| format!("run {id} is not recorded")))
        .and_then(|run| ccluster_engine::report::build(store, &run).map_err(|e| e.to_string()));
    match report {
        Ok(report) => crate::github::summary(&ccluster_engine::report::to_markdown(&report)),
        Err(e) => eprintln!("warning: no report for the job summary: {e}"),
    }
}

/// A run and its tasks, from the database, or from the live snapshot while another process holds
/// the state.
pub(crate) struct RunView {
    pub run: RunRecord,
    pub tasks: Vec<TaskRecord>,
    pub live: bool,
}

/// Live views of runs in progress, from their `live.jsonl` (see the dispatcher): the run record,
/// then task records, the last one of each node winning.
fn snapshots(dir: &Path) -> Vec<RunView> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("runs")) else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join(exec::LIVE_FILE)) else {
            continue;
        };
        let mut lines = text.lines();
        let Some(Ok(run)) = lines.next().map(serde_json::from_str::<RunRecord>) else {
            continue;
        };
        let mut tasks: Vec<TaskRecord> = Vec::new();
        let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        // A line cut short by a concurrent append is skipped.
        for record in lines.filter_map(|l| serde_json::from_str::<TaskRecord>(l).ok()) {
            match at.get(&record.node) {
                Some(&i) => tasks[i] = record,
                None => {
                    at.insert(record.node.clone(), tasks.len());
                    tasks.push(record);
                }
            }
        }
        // Nodes that have not changed yet have no record there: the run's grouped plan lists
        // them, pending.
        if let Some(plan) = ccluster_engine::serve::graph::PlanGroups::read(&entry.path()) {
            let pending = plan.pending_besides(&tasks);
            tasks.extend(pending);
        }
        tasks.sort_by_key(|t| t.order);
        ccluster_engine::store::read_live_costs(&entry.path(), &mut tasks);
        out.push(RunView {
            run,
            tasks,
            live: true,
        });
    }
    out.sort_by(|a, b| a.run.id.cmp(&b.run.id));
    out
}

/// The state directory the command reads, for hints about it.
static READ_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

pub(crate) fn load_runs(dir: &Path) -> Result<Vec<RunView>, u8> {
    let _ = READ_DIR.set(dir.to_path_buf());
    if !dir.join("db").exists() {
        return Ok(Vec::new());
    }
    match Store::open_reader(dir) {
        Ok(store) => {
            warn_if_loose(&store);
            let mut views = Vec::new();
            for run in store.runs().map_err(report)? {
                let mut tasks = store.tasks(&run.id).map_err(report)?;
                tasks.sort_by_key(|t| t.order);
                views.push(RunView {
                    run,
                    tasks,
                    live: false,
                });
            }
            Ok(views)
        }
        Err(StoreError::Locked { pid, .. }) => {
            eprintln!("(a run is in progress in process {pid}: showing its latest snapshot)");
            Ok(history_while_driven(dir))
        }
        Err(e) => Err(report(e)),
    }
}

/// While another process drives the state: the finished runs from their archives, and the runs
/// in progress from their live snapshots.
fn history_while_driven(dir: &Path) -> Vec<RunView> {
    let mut views: Vec<RunView> = ccluster_engine::store::Archive::new(dir)
        .runs()
        .iter()
        .map(|archive| {
            let mut tasks = archive.tasks.clone();
            tasks.sort_by_key(|t| t.order);
            RunView {
                run: archive.run.clone(),
                tasks,
                live: false,
            }
        })
        .collect();
    for live in snapshots(dir) {
        if !views.iter().any(|v| v.run.id == live.run.id) {
            views.push(live);
        }
    }
    views.sort_by(|a, b| a.run.id.cmp(&b.run.id));
    views
}

pub(crate) fn report(e: StoreError) -> u8 {
    eprintln!("error: {e}");
    exit::INVALID_INPUT
}

fn state_name<T: serde::Serialize>(s: &T) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub fn runs(dir: &Path, json: bool) -> u8 {
    let views = match load_runs(dir) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if json {
        let list: Vec<serde_json::Value> = views
            .iter()
            .map(|v| {
                serde_json::json!({
                    "id": v.run.id,
                    "state": v.run.state,
                    "workflow": v.run.workflow,
                    "clusterfile": v.run.clusterfile,
                    "tasks": v.tasks.len(),
                    "started_ms": v.run.started_ms,
                    "finished_ms": v.run.finished_ms,
                })
            })
            .collect();
        say(&serde_json::to_string_pretty(&list).unwrap_or_default());
        return exit::SUCCESS;
    }
    if views.is_empty() {
        say!("no runs yet in {}", dir.display());
        hint_nearby(dir);
        return exit::SUCCESS;
    }
    say!(
        "{:<26} {:<12} {:<24} {:>6} {:>9}  CLUSTERFILE",
        "RUN",
        "STATE",
        "WORKFLOW",
        "TASKS",
        "DURATION"
    );
    for v in &views {
        let took = v.run.finished_ms.map_or("-".to_string(), |f| {
            duration(f.saturating_sub(v.run.started_ms))
        });
        say!(
            "{:<26} {:<12} {:<24} {:>6} {:>9}  {}",
            v.run.id,
            state_name(&v.run.state),
            v.run.workflow,
            v.tasks.len(),
            took,
            v.run.clusterfile
        );
    }
    exit::SUCCESS
}

/// A `RUN` argument: none or `latest` is the latest run; otherwise a run id or a prefix of exactly
/// one run's id.
/// The task records of run `id` (an id, a prefix, or `latest`), for `plan --run`.
pub fn run_records(dir: &Path, id: &str) -> Result<Vec<ccluster_engine::store::TaskRecord>, u8> {
    let id = (id != "latest").then_some(id);
    load_runs(dir)
        .and_then(|v| find_run(v, id))
        .map(|view| view.tasks)
}

pub(crate) fn find_run(views: Vec<RunView>, id: Option<&str>) -> Result<RunView, u8> {
    let Some(id) = id.filter(|id| *id != "latest") else {
        return views.into_iter().last().ok_or_else(|| {
            eprintln!("error: no runs yet");
            match READ_DIR.get().filter(|d| !d.join("db").exists()) {
                Some(dir) if !nearby_state_dirs(dir).is_empty() => hint_nearby(dir),
                _ => eprintln!("  help: `ccluster apply` starts one"),
            }
            exit::INVALID_INPUT
        });
    };
    let mut matching: Vec<RunView> = views
        .into_iter()
        .filter(|v| v.run.id.starts_with(id))
        .collect();
    if let Some(exact) = matching.iter().position(|v| v.run.id == id) {
        return Ok(matching.swap_remove(exact));
    }
    match matching.len() {
        1 => Ok(matching.remove(0)),
        0 => {
            eprintln!("error: no run `{id}`");
            eprintln!("  help: `ccluster runs` lists the runs; `latest` names the latest");
            Err(exit::INVALID_INPUT)
        }
        n => {
            eprintln!("error: `{id}` is ambiguous: {n} runs start with it");
            for v in &matching {
                eprintln!("  {}  {}", v.run.id, state_name(&v.run.state));
            }
            eprintln!("  help: give more of the run id");
            Err(exit::INVALID_INPUT)
        }
    }
}

/// State directories near `dir` (below the working directory, up to three levels, and in its
/// parents), for the hint when `dir` has none.
pub(crate) fn nearby_state_dirs(dir: &Path) -> Vec<PathBuf> {
    fn walk(at: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(at) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if path.join("db").is_dir() && path.join("lock").exists() {
                out.push(path.strip_prefix(".").unwrap_or(&path).to_path_buf());
                continue;
            }
            if depth > 0 && !matches!(name.as_ref(), ".git" | "target" | "node_modules") {
                walk(&path, depth - 1, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new("."), 3, &mut out);
    let mut up = std::env::current_dir().ok();
    while let Some(d) = up {
        let candidate = d.join(".ccluster");
        if candidate.join("db").is_dir() {
            out.push(candidate);
        }
        up = d.parent().map(Path::to_path_buf);
    }
    let here = std::fs::canonicalize(dir).ok();
    out.retain(|p| std::fs::canonicalize(p).ok() != here);
    out.sort();
    out.dedup();
    out.truncate(5);
    out
}

/// Says where state directories are, when `dir` has none.
pub(crate) fn hint_nearby(dir: &Path) {
    if dir.join("db").exists() {
        return;
    }
    let found = nearby_state_dirs(dir);
    if let Some(first) = found.first() {
        let list: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "  help: no state in {}; found some in {}: pass `--state-dir {}`",
            dir.display(),
            list.join(", "),
            first.display()
        );
    }
}

pub fn status(dir: &Path, run: Option<&str>, json: bool) -> u8 {
    let view = match load_runs(dir).and_then(|v| find_run(v, run)) {
        Ok(v) => v,
        Err(code) => return code,
    };
    if json {
        let doc = serde_json::json!({ "run": view.run, "live": view.live, "tasks": view.tasks });
        say!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return exit::SUCCESS;
    }
    let r = &view.run;
    say!(
        "run {} of `{}` ({}): {}{}",
        r.id,
        r.workflow,
        r.clusterfile,
        state_name(&r.state),
        if view.live { " (live)" } else { "" }
    );
    say!(
        "{:<28} {:<10} {:>8} {:>9} {:>5} {:>9} {:>9}  MESSAGE",
        "TASK",
        "STATE",
        "ATTEMPTS",
        "DURATION",
        "EXIT",
        "COST",
        "TOKENS"
    );
    let (mut cost, mut tokens, mut denials) = (0.0, 0, 0);
    for t in &view.tasks {
        let took = match (t.started_ms, t.finished_ms) {
            (Some(s), Some(f)) => duration(f.saturating_sub(s)),
            _ => "-".into(),
        };
        let exit_code = t.exit_code.map_or("-".to_string(), |c| c.to_string());
        cost += t.cost_usd.unwrap_or(0.0) + t.live_cost_usd.unwrap_or(0.0);
        tokens += t.tokens.unwrap_or(0);
        denials += t.denials.unwrap_or(0);
        say!(
            "{:<28} {:<10} {:>8} {:>9} {:>5} {:>9} {:>9}  {}",
            t.node,
            state_name(&t.state),
            t.attempts,
            took,
            exit_code,
            match (t.cost_usd, t.live_cost_usd) {
                // A running agent: what it has spent so far, beside its ended attempts'.
                (spent, Some(so_far)) => format!(
                    "{}~",
                    ccluster_engine::report::usd(spent.unwrap_or(0.0) + so_far)
                ),
                (Some(spent), None) => ccluster_engine::report::usd(spent),
                (None, None) => "-".into(),
            },
            t.tokens.map_or("-".into(), |n| n.to_string()),
            t.message
                .as_deref()
                .unwrap_or("")
                .lines()
                .next()
                .unwrap_or("")
        );
    }
    // A task graph's edges: what each instance ran (or runs) after.
    let edges: Vec<_> = view.tasks.iter().filter(|t| !t.after.is_empty()).collect();
    if !edges.is_empty() {
        say!("graph:");
        for t in edges {
            say!("  {:<26} after {}", t.node, t.after.join(", "));
        }
    }
    if tokens > 0 {
        let denied = match denials {
            0 => String::new(),
            1 => ", 1 tool call denied".to_string(),
            n => format!(", {n} tool calls denied"),
        };
        say!(
            "agents: {}, {tokens} tokens{denied}",
            ccluster_engine::report::usd(cost)
        );
    }
    exit::SUCCESS
}

pub fn cancel(dir: &Path, run: Option<&str>) -> u8 {
    // The run in progress is the one with a live view whose process is still there.
    let live = snapshots(dir).into_iter().rev().find(|v| {
        v.run.state == RunState::Running && ccluster_engine::serve::state::driver_alive(v.run.pid)
    });
    let Some(live) = live else {
        eprintln!("error: no run is in progress in {}", dir.display());
        eprintln!("  help: `cancel` stops a run in progress; `ccluster runs` lists the runs of this state");
        return exit::INVALID_INPUT;
    };
    if let Some(id) = run {
        if !live.run.id.starts_with(id) {
            eprintln!("error: the run in progress is {}, not `{id}`", live.run.id);
            eprintln!("  help: `ccluster cancel` without a run cancels the run in progress");
            return exit::INVALID_INPUT;
        }
    }
    let pid = live.run.pid as i32;
    // SIGTERM: the run stops as on Ctrl-C (tasks stopped gracefully, state checkpointed, exit 130).
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    ) {
        Ok(()) => {
            say(&format!("cancelling run {} (process {pid})", live.run.id));
            exit::SUCCESS
        }
        Err(e) => {
            eprintln!("error: cannot signal process {pid}: {e}");
            exit::TASK_FAILED
        }
    }
}

/// `plan --explain`: what `apply` would run, and why.
pub struct ExplainArgs<'a> {
    /// As `apply --fresh` would.
    pub fresh: bool,
    pub json: bool,
    /// As `apply --rehearse` would, with this script.
    pub rehearse: Option<&'a ccluster_engine::scripted::Script>,
}

pub fn explain(
    compiled: &ccluster_engine::Compiled,
    dir: &Path,
    clusterfile: &Path,
    args: ExplainArgs<'_>,
) -> u8 {
    let ExplainArgs {
        fresh,
        json,
        rehearse,
    } = args;
    use ccluster_engine::exec::explain::{explain, Verdict};
    // With no state yet, nothing is cached: explaining must not create a state directory.
    let store = match dir.join("db").exists() {
        true => match Store::open_reader(dir).map_err(report) {
            Ok(s) => Some(s),
            Err(code) => return code,
        },
        false => None,
    };
    // Workspace tasks start from the base commit: it is part of their cache keys.
    let run_base = compiled
        .plan
        .nodes
        .iter()
        .any(|n| n.workspace.is_some())
        .then(|| {
            let dir = clusterfile
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let repo = ccluster_engine::workspace::Repo::discover(dir).ok()?;
            repo.resolve(compiled.workflow.base.as_deref().unwrap_or("HEAD"))
                .ok()
        })
        .flatten();
    let base_dir = clusterfile
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut fingerprints =
        ccluster_engine::exec::fingerprint::Fingerprints::new(clusterfile, base_dir, dir);
    let explained = match explain(
        compiled,
        store.as_ref(),
        &clusterfile.display().to_string(),
        fresh,
        run_base.as_deref(),
        &mut fingerprints,
        rehearse,
    ) {
        Ok(e) => e,
        Err(e) => return report(e),
    };
    if json {
        let mut plan: serde_json::Value =
            serde_json::from_str(&ccluster_engine::plan::to_json(&compiled.plan))
                .unwrap_or_default();
        plan["explain"] = serde_json::to_value(&explained).unwrap_or_default();
        let text = serde_json::to_string_pretty(&plan).unwrap_or_default();
        say(&ccluster_engine::model::workflow::mask(
            text,
            &compiled.workflow.secret_texts(&compiled.plan.inputs),
        ));
        return exit::SUCCESS;
    }
    let count = |v: Verdict| explained.iter().filter(|e| e.verdict == v).count();
    say!(
        "{} to run, {} satisfied by cached results, {} skipped",
        count(Verdict::Run),
        count(Verdict::Satisfied),
        count(Verdict::Skip),
    );
    for e in &explained {
        say!(
            "  {:<10} {:<28} {}",
            state_name(&e.verdict),
            e.task,
            e.reason
        );
    }
    exit::SUCCESS
}

pub struct RetryArgs<'a> {
    pub run: Option<&'a str>,
    /// `--var name=value`: the values of secret inputs, which runs do not keep.
    pub vars: Vec<String>,
    /// `--policy FILE`: instead of the operator's policy the run kept.
    pub policy: Option<PathBuf>,
    pub tasks: Vec<String>,
    /// `--jobs`; `None`: [`default_jobs`].
    pub jobs: Option<usize>,
    /// `--agents`; `None`: [`default_agents`].
    pub agents: Option<usize>,
    /// Not `--no-adapt`.
    pub adapt_agents: bool,
    /// `--advertise-addr`: where pods of a Kubernetes runner reach this machine.
    pub advertise: Option<String>,
    pub grace: Duration,
    pub output: OutputFormat,
    pub keep_going: bool,
}

/// `retry`: runs a past run's clusterfile text again, with the same inputs. What succeeded stays
/// cached (unless named with `--task`); what failed or never ran runs.
pub fn retry(dir: &Path, args: RetryArgs<'_>) -> u8 {
    let view = match load_runs(dir).and_then(|v| find_run(v, args.run)) {
        Ok(v) => v,
        Err(code) => return code,
    };
    let run = view.run;
    if run.source.is_empty() {
        eprintln!(
            "error: run {} kept no clusterfile text (it was made by an older ccluster)",
            run.id
        );
        return exit::INVALID_INPUT;
    }
    let clusterfile = PathBuf::from(&run.clusterfile);
    let mut inputs = ccluster_engine::plan::InputArgs::default();
    let mut withheld: Vec<String> = Vec::new();
    if let serde_json::Value::Object(values) = &run.inputs {
        for (name, value) in values {
            if value == ccluster_engine::model::workflow::SECRET_MASK {
                withheld.push(name.clone());
            } else {
                inputs.values.insert(name.clone(), value.clone());
            }
        }
    }
    for pair in &args.vars {
        if let Err(e) = inputs.push_pair(pair) {
            eprintln!("error: {e}");
            return exit::INVALID_INPUT;
        }
    }
    if let Some(missing) = withheld
        .iter()
        .find(|w| !inputs.pairs.iter().any(|(n, _)| n == *w))
    {
        eprintln!(
            "error: input `{missing}` is secret, so run {} did not keep it",
            run.id
        );
        eprintln!(
            "  help: give it again: ccluster retry {} --var {missing}=...",
            run.id
        );
        return exit::INVALID_INPUT;
    }
    inputs.policy = match (&args.policy, &run.policy) {
        (Some(path), _) => match crate::read_policy(Some(path)) {
            Ok(p) => p,
            Err(code) => return code,
        },
        (None, Some(kept)) => {
            let source = ccluster_engine::SourceFile::new(kept.file.clone(), kept.text.clone());
            let format = ccluster_engine::syntax::Format::from_path(Path::new(&kept.file));
            match ccluster_engine::model::guardrails::OperatorPolicy::parse(source.clone(), format)
            {
                Ok(p) => Some(std::sync::Arc::new(p)),
                Err(diagnostics) => {
                    eprint!(
                        "{}",
                        ccluster_engine::render::human(&diagnostics, &source, false)
                    );
                    return exit::INVALID_INPUT;
                }
            }
        }
        (None, None) => None,
    };
    let source = ccluster_engine::SourceFile::new(run.clusterfile.clone(), run.source.clone());
    let base_dir = clusterfile
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let format = ccluster_engine::syntax::Format::from_path(&clusterfile);
    // The templates as the run had them, never newer ones.
    let mut loader = ccluster_engine::model::compose::FileLoader {
        replay: Some(run.templates.clone()),
        ..Default::default()
    };
    let compiled = match ccluster_engine::compile_with(
        &source,
        format,
        &base_dir,
        &inputs,
        ccluster_engine::Stage::Plan,
        &mut loader,
    ) {
        Ok(c) => c,
        Err(diagnostics) => {
            eprint!(
                "{}",
                ccluster_engine::render::human(&diagnostics, &source, false)
            );
            return exit::INVALID_INPUT;
        }
    };
    let known: Vec<&str> = compiled
        .plan
        .nodes
        .iter()
        .flat_map(|n| [n.id.as_str(), n.task.as_str()])
        .collect();
    if let Some(unknown) = args.tasks.iter().find(|t| !known.contains(&t.as_str())) {
        eprintln!("error: run {} has no task `{unknown}`", run.id);
        eprintln!(
            "  help: `--task` takes a task id or a plan node (`build[2]`); `ccluster status {}` lists them",
            run.id
        );
        return exit::INVALID_INPUT;
    }
    if args.output == OutputFormat::Human {
        say!(
            "retrying run {} ({}), with its clusterfile text and inputs",
            run.id,
            run.clusterfile
        );
    }
    // What failed (or never finished) in the run being retried runs again, even when an older
    // run left a cache entry for the same key: `retry` never turns a failure into "cached".
    let mut rerun = args.tasks;
    rerun.extend(
        view.tasks
            .iter()
            .filter(|t| match t.state {
                TaskState::Failed | TaskState::Retrying | TaskState::Running => true,
                // Stopped while it ran; one cancelled before its start may still be cached.
                TaskState::Cancelled => t.attempts > 0,
                _ => false,
            })
            .map(|t| t.node.clone()),
    );
    apply(
        &compiled,
        ApplyArgs {
            clusterfile: &clusterfile,
            source: &run.source,
            rerun,
            state_dir: dir.to_path_buf(),
            jobs: args.jobs,
            agents: args.agents,
            adapt_agents: args.adapt_agents,
            advertise: args.advertise.clone(),
            fresh: false,
            grace: args.grace,
            output: args.output,
            // A rehearsed run is retried as a rehearsal (with the clusterfile's own scripts).
            rehearse: run
                .rehearsed
                .then(ccluster_engine::scripted::Script::default),
            keep_going: args.keep_going,
            templates: run.templates.clone(),
        },
    )
}
