//! `ccluster`: the command line. Thin by design: arguments, rendering and exit codes; all logic
//! lives in `ccluster-engine`.

/// The single-threaded async runtime `apply` runs on (the scripted model server has its own);
/// `None` (said on stderr) when it cannot start.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            None
        }
    }
}

/// Prints a line to stdout; a closed pipe (`ccluster doctor | head -1`) ends the output quietly
/// instead of panicking like `println!`.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ccluster_engine::model::compose::FileLoader;
use ccluster_engine::model::workflow::mask;
use ccluster_engine::plan::{self, InputArgs};
use ccluster_engine::{compile_file_with, render, Diagnostic, SourceFile, Stage};
use clap::{Args, Parser, Subcommand, ValueEnum};

mod attach;
mod forge;
mod github;
mod live;
mod logs;
mod observe;
mod results;
mod runs;
mod state;
#[cfg(target_os = "linux")]
mod supervisor;
mod templates;

/// Exit codes, as documented in the README.
mod exit {
    pub const SUCCESS: u8 = 0;
    /// A task failed (`apply`), or the run could not go on (a state write failed).
    pub const TASK_FAILED: u8 = 1;
    /// The clusterfile, the command line or the state directory cannot be used.
    pub const INVALID_INPUT: u8 = 2;
    /// The run was cancelled (Ctrl-C, SIGTERM, SIGHUP, SIGQUIT, `ccluster cancel`).
    pub const CANCELLED: u8 = 130;
}

#[derive(Parser)]
#[command(
    name = "ccluster",
    version,
    about = "Run Claude Code as a coding cluster from a clusterfile",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    logs: observe::LogArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Check a clusterfile and report every problem found.
    Validate {
        #[command(flatten)]
        file: FileArgs,
        /// How to print diagnostics (`--format` is an old spelling).
        #[arg(long, short = 'o', alias = "format", value_enum, default_value_t = DiagnosticFormat::Human)]
        output: DiagnosticFormat,
        /// Fetch `git+` templates that are not pinned and cached yet (and pin them), instead of
        /// reporting them.
        #[arg(long)]
        fetch: bool,
    },
    /// Compile a clusterfile into its execution plan and print it.
    Plan {
        #[command(flatten)]
        file: FileArgs,
        /// How to print the plan (`--format` is an old spelling).
        #[arg(long, short = 'o', alias = "format", value_enum, default_value_t = PlanFormat::Text)]
        output: PlanFormat,
        /// Say for each task whether `apply` would run it or it is satisfied by a cached result,
        /// and why (text: a table; json: an `explain` list beside the plan).
        #[arg(long)]
        explain: bool,
        /// With --explain: as `apply --fresh` would.
        #[arg(long, requires = "explain")]
        fresh: bool,
        /// With --explain: as `apply --rehearse` would (rehearsed agents have keys of their own).
        #[arg(long, requires = "explain")]
        rehearse: bool,
        /// Fetch `git+` templates that are not pinned and cached yet (and pin them), instead of
        /// reporting them.
        #[arg(long)]
        fetch: bool,
        /// The plan as run RUN (a run id or prefix, or `latest`) expanded it: its dynamic maps
        /// and task graphs replaced by the run's instances and their edges.
        #[arg(long, value_name = "RUN", conflicts_with = "explain")]
        run: Option<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Run a workflow: every task whose result is not cached, in dependency order.
    Apply {
        #[command(flatten)]
        file: FileArgs,
        /// Ignore cached results: run every task.
        #[arg(long)]
        fresh: bool,
        /// Rehearse: agents run the real `claude` CLI against ccluster's scripted model server
        /// (no key, no tokens): each writes a note of its task and answers, with a structured
        /// output that fits its schema. Tests a workflow end to end for free.
        #[arg(long)]
        rehearse: bool,
        /// With --rehearse: what the scripted model does per task (TOML: `[tasks.<id>]` with
        /// `output`, `files`, `turns`, `faults`).
        #[arg(long, value_name = "FILE", requires = "rehearse")]
        script: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Serve the HTTP API, live event streams and web dashboard over repositories' run state.
    Serve {
        /// The address to listen on. Loopback only unless `--insecure`: the API has no
        /// authentication yet.
        #[arg(long, default_value = "127.0.0.1:7878")]
        addr: std::net::SocketAddr,
        /// A repository whose runs (its `.ccluster/` state) are served; repeat for several
        /// (default: the current directory).
        #[arg(long = "repo", value_name = "DIR")]
        repos: Vec<PathBuf>,
        /// Listen on a non-loopback address although anyone who can reach it can start and
        /// cancel runs.
        #[arg(long)]
        insecure: bool,
        /// A policy every run the server plans or starts is held to, over each clusterfile's
        /// `[policy]`: the stricter wins.
        #[arg(long, value_name = "FILE", env = "CCLUSTER_POLICY")]
        policy: Option<PathBuf>,
    },
    /// List the runs of a state directory.
    Runs {
        #[arg(long, short = 'o', value_enum, default_value_t = ListFormat::Human)]
        output: ListFormat,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Show a run's tasks: state, attempts, duration, exit code (default: the latest run).
    Status {
        /// A run id, a unique prefix of one, or `latest` (the default).
        run: Option<String>,
        /// `json`: the run and its task records.
        #[arg(long, short = 'o', value_enum, default_value_t = ListFormat::Human)]
        output: ListFormat,
        /// The same as `--output json` (an old spelling).
        #[arg(long, hide = true)]
        json: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// A shell where a running task works (its worktree; the clusterfile's directory for a task
    /// without one), or one command after `--`. The task keeps running. A lone argument that is
    /// not a run id is a task of the latest run.
    Attach {
        /// A run id or prefix, or `latest`.
        run: Option<String>,
        /// The task id or plan node (`build[2]`) that is running.
        task: Option<String>,
        /// Run this instead of a shell (after `--`).
        #[arg(last = true)]
        command: Vec<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Print a run's task logs (default: the latest run): every attempt of each matching plan
    /// node, both streams, under `==> node attempt N stream <==` headers; agent transcripts are
    /// rendered for people. A lone argument that is not a run id is a task of the latest run.
    Logs {
        /// A run id or prefix, or `latest`.
        run: Option<String>,
        /// A task id (`build`, all its instances) or plan node (`build[2]`).
        task: Option<String>,
        /// Follow: wait for the run and task to appear, print every attempt and instance as it
        /// logs, until the run ends.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Print agent transcripts as the CLI's stream-json lines, unchanged.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Run a past run again with its clusterfile text and inputs: what failed or never ran runs,
    /// what succeeded stays (default: the latest run).
    Retry {
        run: Option<String>,
        /// Also run this task (or plan node) again even though it succeeded; repeatable.
        #[arg(long = "task", value_name = "ID")]
        tasks: Vec<String>,
        /// The value of a secret input (runs do not keep them): `--var token=...`.
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// Hold the retry to this operator's policy instead of the one the run kept.
        #[arg(long, value_name = "FILE", env = "CCLUSTER_POLICY")]
        policy: Option<PathBuf>,
        #[command(flatten)]
        options: RunArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Stop the run in progress, as Ctrl-C would (from another terminal).
    Cancel {
        run: Option<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List what a run's tasks left (patches, changed files, kept files, test reports), or print one.
    Artifacts {
        /// A run id, a unique prefix of one, or `latest` (the default); when it names no run
        /// and no TASK follows, it is the task of the latest run.
        run: Option<String>,
        /// A task id (`edit`: every instance) or plan node (`edit[2]`).
        task: Option<String>,
        /// `json`: the listing as one JSON document.
        #[arg(long, short = 'o', value_enum, default_value_t = ListFormat::Human)]
        output: ListFormat,
        /// Print this artifact of the task's last attempt (`patch.diff`, or a kept file's path).
        #[arg(long, value_name = "PATH", requires = "task")]
        get: Option<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Summarize a run for a pull request: tasks, attempts, time, cost, changes, tests, conflicts.
    Report {
        /// Default: the latest run.
        run: Option<String>,
        /// Markdown or JSON (`--format` is an old spelling).
        #[arg(long, short = 'o', alias = "format", value_enum, default_value_t = ReportFormat::Md)]
        output: ReportFormat,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Export a run's result (its result task's branch) as one patch against the base, or a branch.
    Export {
        /// Default: the latest run.
        run: Option<String>,
        /// Write the patch here (`-`: stdout); apply it with `git apply`.
        #[arg(long, value_name = "FILE", required_unless_present = "branch")]
        patch: Option<PathBuf>,
        /// Create a branch with this name at the result.
        #[arg(long, value_name = "NAME")]
        branch: Option<String>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Move a run's state between clones: `state export RUN FILE`, `state import FILE` (to resume a
    /// CI run on another machine).
    State {
        #[command(subcommand)]
        command: StateCommand,
    },
    /// Push a run's result to a branch of a git remote and, with --pr, open or update its pull
    /// request with the run's report as the body (GitHub; docs/forges.md). Publishing again
    /// updates the same branch and pull request.
    Publish {
        /// Default: the latest run.
        run: Option<String>,
        /// The git remote to push to (a remote's name or a URL).
        #[arg(long, default_value = "origin")]
        remote: String,
        /// The branch to push to (default: `ccluster/<workflow>`; `ccluster/goal-<goal>` for
        /// `run --goal` runs).
        #[arg(long, value_name = "NAME")]
        branch: Option<String>,
        /// Open (or update) the branch's pull request.
        #[arg(long)]
        pr: bool,
        /// Open the pull request as a draft.
        #[arg(long, requires = "pr")]
        draft: bool,
        /// The branch the pull request merges into (default: the remote's default branch).
        #[arg(long, requires = "pr", value_name = "BRANCH")]
        base: Option<String>,
        /// The pull request's title (default: the goal, or `ccluster: <workflow>`).
        #[arg(long, requires = "pr")]
        title: Option<String>,
        /// Add this label to the pull request; repeatable.
        #[arg(long = "label", value_name = "LABEL", requires = "pr")]
        labels: Vec<String>,
        /// Request a review from this user (or `org/team`); repeatable.
        #[arg(long = "reviewer", value_name = "LOGIN", requires = "pr")]
        reviewers: Vec<String>,
        /// Then run `builtin:review` on the pull request and post its review.
        #[arg(long, requires = "pr")]
        review: bool,
        /// With --review: rehearse the review (reviewers run against the scripted model server).
        #[arg(long, requires = "review")]
        rehearse: bool,
        /// With --rehearse: the rehearsal script of the review.
        #[arg(long, value_name = "FILE", requires = "rehearse")]
        script: Option<PathBuf>,
        /// Overwrite the remote branch even when someone else pushed to it since ccluster did.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        forge: forge::ForgeArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Run `builtin:review` on a pull request's change and post one review: a summary, and
    /// inline comments on the lines of the diff the findings name. Posting again replaces
    /// ccluster's earlier review (docs/forges.md).
    Review {
        /// The pull request's number.
        #[arg(long, value_name = "N")]
        pr: u64,
        /// The git remote the pull request's commits are fetched from.
        #[arg(long, default_value = "origin")]
        remote: String,
        /// Rehearse the review: reviewers run against the scripted model server.
        #[arg(long)]
        rehearse: bool,
        /// With --rehearse: the rehearsal script (`[tasks."review[0]"] output = {...}`).
        #[arg(long, value_name = "FILE", requires = "rehearse")]
        script: Option<PathBuf>,
        #[command(flatten)]
        forge: forge::ForgeArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Remove the worktrees and refs finished runs left (result branches stay).
    Gc {
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Leave the N most recent finished runs alone (their worktrees and refs).
        #[arg(long, value_name = "N")]
        keep: Option<usize>,
        #[command(flatten)]
        state: StateArgs,
    },
    /// List the built-in workflow templates with their descriptions and parameters.
    Templates {
        #[arg(long, short = 'o', value_enum, default_value_t = ListFormat::Human)]
        output: ListFormat,
    },
    /// Resolve the refs of `git+` templates again and pin the new commits in clusterfile.lock.
    Update {
        #[command(flatten)]
        file: FileArgs,
    },
    /// Write a commented clusterfile.toml here (from a built-in template, or a minimal one) and add
    /// `.ccluster/` to .gitignore.
    Init {
        /// A built-in template (`ccluster templates` lists them).
        #[arg(long)]
        template: Option<String>,
        /// Write a CI pipeline that applies the clusterfile and keeps its state between jobs,
        /// instead of a clusterfile: `github` writes `.github/workflows/ccluster.yml`, `gitlab`
        /// writes `.gitlab-ci.yml` (or prints the job when that file exists), at the top of the
        /// repository.
        #[arg(long, value_enum, conflicts_with = "template")]
        ci: Option<templates::CiSystem>,
        /// Replace an existing clusterfile.toml (with --ci: the pipeline file).
        #[arg(long)]
        force: bool,
    },
    /// Drive a goal through the built-in `goal` workflow in this repository: plan subtasks, build
    /// them in parallel worktrees, merge, test and fix, document. Same state, resume and report as
    /// `apply`.
    Run {
        /// What to achieve.
        #[arg(long)]
        goal: String,
        /// Set another input of the `goal` workflow: `--var test_command="cargo test"`.
        #[arg(long = "var", value_name = "NAME=VALUE")]
        vars: Vec<String>,
        /// Rehearse against the scripted model server (no key, no tokens).
        #[arg(long)]
        rehearse: bool,
        /// An operator's policy laid over the workflow's: the stricter wins.
        #[arg(long, value_name = "FILE", env = "CCLUSTER_POLICY")]
        policy: Option<PathBuf>,
        #[command(flatten)]
        run: RunArgs,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Check this machine for agent work: the `claude` CLI and its version, credentials (which
    /// kind, never the secret), git, and whether this directory is in a repository.
    Doctor {
        #[arg(long, short = 'o', value_enum, default_value_t = ListFormat::Human)]
        output: ListFormat,
    },
    /// Print the JSON Schema of the clusterfile format.
    Schema {
        /// The OpenAPI 3.1 description of `ccluster serve`'s HTTP API instead
        /// (`schema/openapi.json`, also served at `/openapi.json`).
        #[arg(long)]
        openapi: bool,
    },
    /// Serve the scripted model API on 127.0.0.1 until killed (for benchmarks and experiments):
    /// prints its URL (and its token, unless CCLUSTER_MODEL_SERVER_TOKEN chose it), logs requests
    /// as JSON lines to stdout.
    #[command(hide = true)]
    ModelServer {
        /// A script (TOML); without one, every task gets the rehearsal default.
        #[arg(long)]
        script: Option<PathBuf>,
        /// Wait this long before each answer.
        #[arg(long, default_value_t = 0)]
        turn_delay_ms: u64,
    },
}

#[derive(Subcommand)]
enum StateCommand {
    /// Write run RUN's state (records, logs, artifacts, the cache entries it made or used, and its
    /// refs as a git bundle) to FILE, a verified tar.gz archive. Credentials are never included.
    Export {
        /// A run id, a unique prefix of one, or `latest`.
        run: String,
        /// The archive to write (replaced whole, never left half-written).
        file: PathBuf,
        #[command(flatten)]
        state: StateArgs,
    },
    /// Restore an archive written by `state export` into this clone's state (and its refs into
    /// this repository), after verifying all of it; then `apply` resumes the run.
    Import {
        /// The archive.
        file: PathBuf,
        /// Replace the run if the state already has it (refused otherwise).
        #[arg(long)]
        force: bool,
        /// The repository the run's refs go into (default: the one of the current directory).
        #[arg(long, value_name = "DIR", default_value = ".")]
        repo: PathBuf,
        #[command(flatten)]
        state: StateArgs,
    },
}

/// How commands that print data print it: for people, or one JSON document.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ReportFormat {
    Md,
    Json,
}

/// How `apply` and `retry` run tasks and report progress.
#[derive(Args)]
struct RunArgs {
    /// Tasks running at once (default: the number of CPUs, plus each Kubernetes runner's
    /// `max_parallel`, 32 unless it says).
    #[arg(long, short = 'j')]
    jobs: Option<usize>,
    /// Agent tasks running at once, apart from `--jobs`: agents wait on the model, not on CPUs
    /// (default: `[defaults] max_agents`, else what memory allows at about 250 MB a worker, at
    /// most 8).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    agents: Option<u32>,
    /// Keep the agent slots whatever the model API says (by default they halve when it
    /// answers 429 or 529, and grow back as requests pass).
    #[arg(long)]
    no_adapt: bool,
    /// Time a stopping task gets between SIGTERM and SIGKILL.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    grace_period: Duration,
    /// Progress as lines for people, or one JSON event per line.
    #[arg(long, short = 'o', value_enum, default_value_t = runs::OutputFormat::Human)]
    output: runs::OutputFormat,
    /// Keep going after a task fails: everything that does not depend on it still runs.
    #[arg(long, short = 'k')]
    keep_going: bool,
    /// The address (`IP[:PORT]`) of this machine where a Kubernetes runner's pods reach the
    /// run's git endpoint (default: the address the API server is reached from).
    #[arg(long, env = "CCLUSTER_ADVERTISE_ADDR", value_name = "IP[:PORT]")]
    advertise_addr: Option<String>,
    /// Serve the run's metrics as Prometheus text at `http://ADDR/metrics` while it runs
    /// (port 0: any free port, said on stderr).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

impl RunArgs {
    /// `--jobs`, when given.
    fn jobs(&self) -> Option<usize> {
        self.jobs
    }
}

#[derive(Args)]
struct StateArgs {
    /// Where run state lives (default: `.ccluster/` beside the clusterfile).
    #[arg(long, env = "CCLUSTER_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// The clusterfile whose state to use (for the default state directory).
    #[arg(long, default_value = "clusterfile.toml", hide = true)]
    clusterfile: PathBuf,
}

impl StateArgs {
    fn dir(&self, clusterfile: Option<&std::path::Path>) -> PathBuf {
        runs::state_dir(
            self.state_dir.as_deref(),
            clusterfile.unwrap_or(&self.clusterfile),
        )
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    ccluster_engine::model::workflow::parse_duration_text(text)
}

#[derive(Args)]
struct FileArgs {
    /// The clusterfile (`.toml`, or `.kdl` by extension; without one, `clusterfile.toml`, else
    /// `clusterfile.kdl`).
    #[arg(default_value = "clusterfile.toml")]
    file: PathBuf,
    /// Set an input: `--var name=value` (lists and objects as JSON).
    #[arg(long = "var", value_name = "NAME=VALUE")]
    vars: Vec<String>,
    /// Read input values from a TOML or JSON file.
    #[arg(long = "vars", value_name = "FILE")]
    vars_files: Vec<PathBuf>,
    /// An operator's policy laid over the clusterfile's `[policy]` (a file holding one
    /// `[policy]` table): the stricter of the two wins.
    #[arg(long, value_name = "FILE", env = "CCLUSTER_POLICY")]
    policy: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PlanFormat {
    Text,
    Json,
    Dot,
    Mermaid,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum DiagnosticFormat {
    Human,
    Json,
    /// For `apply -o json`: the JSON document on one line, as the event stream it stands in for.
    #[value(skip)]
    JsonLine,
}

impl FileArgs {
    /// The default `clusterfile.toml` becomes `clusterfile.kdl` when only that one exists.
    fn settle_default(&mut self) {
        let toml = std::path::Path::new("clusterfile.toml");
        let kdl = std::path::Path::new("clusterfile.kdl");
        if self.file == toml && !toml.exists() && kdl.exists() {
            self.file = kdl.to_path_buf();
        }
    }
}

/// `ccluster serve`.
fn serve(
    addr: std::net::SocketAddr,
    repos: Vec<PathBuf>,
    insecure: bool,
    policy: Option<PathBuf>,
    metrics: Option<ccluster_engine::telemetry::MetricsText>,
) -> u8 {
    // Read now, so a broken policy stops the server rather than every run it starts.
    if let Err(code) = read_policy(policy.as_deref()) {
        return code;
    }
    let policy = match policy.map(std::path::absolute).transpose() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: cannot find the policy file: {e}");
            return exit::INVALID_INPUT;
        }
    };
    if !addr.ip().is_loopback() {
        if !insecure {
            eprintln!(
                "error: {addr} is not a loopback address, and the API has no authentication yet\n  \
                 = help: listen on 127.0.0.1 (the default), or pass --insecure to accept that \
                 anyone who reaches {addr} can start and cancel runs"
            );
            return exit::INVALID_INPUT;
        }
        eprintln!("warning: serving on {addr} without authentication (--insecure)");
    }
    let repos = if repos.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        repos
    };
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            eprintln!("error: cannot find the ccluster binary: {e}");
            return exit::INVALID_INPUT;
        }
    };
    let Some(rt) = runtime() else {
        return exit::INVALID_INPUT;
    };
    let config = ccluster_engine::serve::ServeConfig {
        addr,
        repos,
        exe,
        policy,
        metrics,
    };
    match rt.block_on(ccluster_engine::serve::serve(config)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            exit::INVALID_INPUT
        }
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    match &mut cli.command {
        Command::Validate { file, .. }
        | Command::Plan { file, .. }
        | Command::Apply { file, .. }
        | Command::Update { file } => file.settle_default(),
        _ => {}
    }
    if matches!(
        cli.command,
        Command::Apply { .. }
            | Command::Retry { .. }
            | Command::Run { .. }
            | Command::Review { .. }
            | Command::Publish { review: true, .. }
    ) {
        // Commands that run tasks work under supervising processes: no task outlives ccluster.
        #[cfg(target_os = "linux")]
        supervisor::split();
    }
    // After the split: the exporters' threads belong to the process that runs the tasks.
    let metrics_addr = match &cli.command {
        Command::Apply { run, .. } | Command::Run { run, .. } => run.metrics_addr,
        Command::Retry { options, .. } => options.metrics_addr,
        _ => None,
    };
    let serving = matches!(cli.command, Command::Serve { .. });
    let telemetry = match observe::start(&cli.logs, metrics_addr, serving) {
        Ok(t) => t,
        Err(code) => return ExitCode::from(code),
    };
    let code = match cli.command {
        Command::Validate {
            file,
            output,
            fetch,
        } => validate(&file, output, fetch),
        Command::Plan {
            file,
            output,
            explain,
            fresh,
            rehearse,
            fetch,
            run,
            state,
        } => {
            let dir = state.dir(Some(&file.file));
            let explain = explain.then(|| (dir.clone(), fresh, rehearse));
            let run = run.map(|r| (dir, r));
            plan_command(&file, output, explain, run, fetch)
        }
        Command::Apply {
            file,
            fresh,
            rehearse,
            script,
            run,
            state,
        } => match compile_recording(
            &file,
            Stage::Plan,
            // Under `--output json`, a tool reads compile errors from stdout as JSON too.
            match run.output {
                runs::OutputFormat::Json => DiagnosticFormat::JsonLine,
                _ => DiagnosticFormat::Human,
            },
            Some(&state.dir(Some(&file.file))),
            Templates::Fetch,
        ) {
            Ok((source, compiled, templates)) => {
                let rehearse = match rehearsal_script(rehearse, script.as_deref()) {
                    Ok(r) => r,
                    Err(code) => return ExitCode::from(code),
                };
                let rehearsing = rehearse.is_some();
                let code = runs::apply(
                    &compiled,
                    runs::ApplyArgs {
                        clusterfile: &file.file,
                        source: &source.text,
                        rerun: Vec::new(),
                        state_dir: state.dir(Some(&file.file)),
                        jobs: run.jobs(),
                        agents: run.agents.map(|n| n as usize),
                        adapt_agents: !run.no_adapt,
                        advertise: run.advertise_addr.clone(),
                        fresh,
                        grace: run.grace_period,
                        output: run.output,
                        keep_going: run.keep_going,
                        rehearse,
                        templates,
                    },
                );
                match &compiled.workflow.publish {
                    Some(settings) if code == exit::SUCCESS => {
                        forge::publish_after_run(&state.dir(Some(&file.file)), settings, rehearsing)
                    }
                    _ => code,
                }
            }
            Err(code) => code,
        },
        Command::Retry {
            run,
            tasks,
            vars,
            policy,
            options,
            state,
        } => match runs::retry(
            &state.dir(None),
            runs::RetryArgs {
                run: run.as_deref(),
                vars,
                policy,
                tasks,
                jobs: options.jobs(),
                agents: options.agents.map(|n| n as usize),
                adapt_agents: !options.no_adapt,
                advertise: options.advertise_addr.clone(),
                grace: options.grace_period,
                output: options.output,
                keep_going: options.keep_going,
            },
        ) {
            // A retry that makes the run succeed publishes it as `apply` would.
            exit::SUCCESS => forge::publish_after_retry(&state.dir(None)),
            code => code,
        },
        Command::Serve {
            addr,
            repos,
            insecure,
            policy,
        } => serve(addr, repos, insecure, policy, telemetry.metrics_text()),
        Command::Runs { output, state } => runs::runs(&state.dir(None), output == ListFormat::Json),
        Command::Status {
            run,
            output,
            json,
            state,
        } => runs::status(
            &state.dir(None),
            run.as_deref(),
            json || output == ListFormat::Json,
        ),
        Command::Attach {
            run,
            task,
            command,
            state,
        } => attach::attach(
            &state.dir(None),
            attach::AttachArgs {
                run: run.as_deref(),
                task: task.as_deref(),
                command: &command,
            },
        ),
        Command::Logs {
            run,
            task,
            follow,
            raw,
            state,
        } => logs::logs(
            &state.dir(None),
            logs::LogsArgs {
                run: run.as_deref(),
                task: task.as_deref(),
                follow,
                raw,
            },
        ),
        Command::Cancel { run, state } => runs::cancel(&state.dir(None), run.as_deref()),
        Command::Artifacts {
            run,
            task,
            output,
            get,
            state,
        } => results::artifacts(
            &state.dir(None),
            run.as_deref(),
            task.as_deref(),
            get.as_deref(),
            output == ListFormat::Json,
        ),
        Command::Report { run, output, state } => results::report(
            &state.dir(None),
            run.as_deref(),
            output == ReportFormat::Json,
        ),
        Command::Export {
            run,
            patch,
            branch,
            state,
        } => results::export(
            &state.dir(None),
            run.as_deref(),
            patch.as_deref(),
            branch.as_deref(),
        ),
        Command::State {
            command: StateCommand::Export { run, file, state },
        } => state::export(&state.dir(None), &run, &file),
        Command::State {
            command:
                StateCommand::Import {
                    file,
                    force,
                    repo,
                    state,
                },
        } => state::import(&state.dir(None), &file, &repo, force),
        Command::Publish {
            run,
            remote,
            branch,
            pr,
            draft,
            base,
            title,
            labels,
            reviewers,
            review,
            rehearse,
            script,
            force,
            forge,
            state,
        } => {
            let rehearse = match rehearsal_script(rehearse, script.as_deref()) {
                Ok(r) => r,
                Err(code) => return ExitCode::from(code),
            };
            forge::publish(
                &state.dir(None),
                &forge::PublishOptions {
                    run,
                    remote,
                    branch,
                    pr,
                    draft,
                    base,
                    title,
                    labels,
                    reviewers,
                    review,
                    force,
                    forge,
                    rehearse,
                },
            )
        }
        Command::Review {
            pr,
            remote,
            rehearse,
            script,
            forge,
            state,
        } => {
            let rehearse = match rehearsal_script(rehearse, script.as_deref()) {
                Ok(r) => r,
                Err(code) => return ExitCode::from(code),
            };
            forge::review(
                &state.dir(None),
                &forge::ReviewOptions {
                    pr,
                    remote,
                    forge,
                    rehearse,
                },
            )
        }
        Command::Gc {
            dry_run,
            keep,
            state,
        } => results::gc(&state.dir(None), dry_run, keep),
        Command::ModelServer {
            script,
            turn_delay_ms,
        } => model_server(script.as_deref(), turn_delay_ms),
        Command::Doctor { output } => doctor(output == ListFormat::Json),
        Command::Templates { output } => templates::list(output == ListFormat::Json),
        Command::Update { file } => {
            match compile_recording(
                &file,
                Stage::Validate,
                DiagnosticFormat::Human,
                None,
                Templates::Refresh,
            ) {
                Ok((_, _, used)) => {
                    let git: Vec<&String> = used.keys().filter(|k| k.starts_with("git+")).collect();
                    out!(
                        "{} git template{} resolved and pinned",
                        git.len(),
                        if git.len() == 1 { "" } else { "s" }
                    );
                    exit::SUCCESS
                }
                Err(code) => code,
            }
        }
        Command::Init {
            ci: Some(system),
            force,
            ..
        } => templates::init_ci(std::path::Path::new("."), system, force),
        Command::Init {
            template, force, ..
        } => templates::init(std::path::Path::new("."), template.as_deref(), force),
        Command::Run {
            goal,
            vars,
            rehearse,
            policy,
            run,
            state,
        } => run_goal(goal, vars, rehearse, policy, run, state),
        Command::Schema { openapi: false } => {
            print(&ccluster_engine::schema::clusterfile_schema());
            exit::SUCCESS
        }
        Command::Schema { openapi: true } => {
            let _ = std::io::stdout()
                .lock()
                .write_all(ccluster_engine::serve::openapi_json().as_bytes());
            exit::SUCCESS
        }
    };
    // For benchmarks: ccluster's own CPU time and memory, without its children's.
    if let Some(path) = std::env::var_os("CCLUSTER_SELF_USAGE") {
        if let Ok(u) = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF) {
            let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
            let _ = std::fs::write(
                path,
                format!(
                    "{:.3} {:.3} {}\n",
                    secs(u.user_time()),
                    secs(u.system_time()),
                    u.max_rss()
                ),
            );
        }
    }
    ExitCode::from(code)
}

/// The rehearsal script of `--rehearse [--script FILE]`; `Err` (said on stderr) when the file
/// cannot be read or parsed.
fn rehearsal_script(
    rehearse: bool,
    script: Option<&std::path::Path>,
) -> Result<Option<ccluster_engine::scripted::Script>, u8> {
    match (rehearse, script) {
        (false, _) => Ok(None),
        (true, None) => Ok(Some(ccluster_engine::scripted::Script::default())),
        (true, Some(path)) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| ccluster_engine::scripted::Script::from_toml(&t))
        {
            Ok(s) => Ok(Some(s)),
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                eprintln!("  help: the rehearsal script's format is in docs/agents.md (\"The rehearsal script\")");
                Err(exit::INVALID_INPUT)
            }
        },
    }
}

/// `run --goal`: the built-in `goal` workflow, compiled from the text inside the binary, applied
/// in the current directory. Its text is kept with the run, so `retry` works as for any run.
fn run_goal(
    goal: String,
    vars: Vec<String>,
    rehearse: bool,
    policy: Option<PathBuf>,
    run: RunArgs,
    state: StateArgs,
) -> u8 {
    let Some(builtin) = ccluster_engine::library::find("goal") else {
        eprintln!("error: the built-in goal workflow is missing");
        return exit::TASK_FAILED;
    };
    let mut args = InputArgs::default();
    if let Err(e) = args.push_pair(&format!("goal={goal}")) {
        eprintln!("error: {e}");
        return exit::INVALID_INPUT;
    }
    for pair in &vars {
        if let Err(e) = args.push_pair(pair) {
            eprintln!("error: {e}");
            return exit::INVALID_INPUT;
        }
    }
    args.policy = match read_policy(policy.as_deref()) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let name = "builtin:goal";
    let source = SourceFile::new(name, builtin.text);
    let compiled = match ccluster_engine::compile(
        &source,
        ccluster_engine::syntax::Format::Toml,
        std::path::Path::new("."),
        &args,
        Stage::Plan,
    ) {
        Ok(c) => c,
        Err(diagnostics) => {
            eprint!("{}", human(&diagnostics, &source));
            return exit::INVALID_INPUT;
        }
    };
    let clusterfile = std::path::PathBuf::from(name);
    runs::apply(
        &compiled,
        runs::ApplyArgs {
            clusterfile: &clusterfile,
            source: builtin.text,
            rerun: Vec::new(),
            state_dir: state.dir(Some(std::path::Path::new("clusterfile.toml"))),
            jobs: run.jobs(),
            agents: run.agents.map(|n| n as usize),
            adapt_agents: !run.no_adapt,
            advertise: run.advertise_addr.clone(),
            fresh: false,
            grace: run.grace_period,
            output: run.output,
            keep_going: run.keep_going,
            rehearse: rehearse.then(ccluster_engine::scripted::Script::default),
            templates: Default::default(),
        },
    )
}

fn doctor(json: bool) -> u8 {
    use ccluster_engine::agent::{self, Auth};
    let mut missing = 0;
    let mut checks: Vec<serde_json::Value> = Vec::new();
    let mut line = |ok: bool, what: &str, detail: String| {
        if !ok {
            missing += 1;
        }
        if json {
            checks.push(serde_json::json!({ "check": what, "ok": ok, "detail": detail }));
        } else {
            out!("{} {what:<12} {detail}", if ok { "ok  " } else { "MISS" });
        }
    };
    line(true, "ccluster", env!("CARGO_PKG_VERSION").to_string());
    match agent::find_bin(None) {
        Ok(bin) => {
            let version = std::process::Command::new(&bin)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
            match version {
                Some(v) => {
                    let pinned = v.starts_with(agent::PINNED_VERSION);
                    let note = if pinned {
                        String::new()
                    } else {
                        format!(" (ccluster is tested with {})", agent::PINNED_VERSION)
                    };
                    line(true, "claude", format!("{v} at {}{note}", bin.display()));
                }
                None => line(false, "claude", format!("{} does not run", bin.display())),
            }
        }
        Err(e) => line(false, "claude", e),
    }
    match Auth::detect() {
        Some(auth) => line(true, "credentials", auth.describe()),
        None => line(false, "credentials", Auth::MISSING.to_string()),
    }
    match std::process::Command::new("git").arg("--version").output() {
        Ok(o) if o.status.success() => line(
            true,
            "git",
            String::from_utf8_lossy(&o.stdout).trim().to_string(),
        ),
        _ => line(false, "git", "not found: workspaces need git".into()),
    }
    match ccluster_engine::workspace::Repo::discover(std::path::Path::new(".")) {
        Ok(repo) => line(true, "repository", repo.root.display().to_string()),
        Err(_) => line(
            false,
            "repository",
            "this directory is not in a git repository: tasks with workspaces need one".into(),
        ),
    }
    if json {
        let doc = serde_json::json!({ "ok": missing == 0, "checks": checks });
        out!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
    } else if missing > 0 {
        out!("(`ccluster apply --rehearse` needs only the claude CLI and git)");
    }
    if missing == 0 {
        exit::SUCCESS
    } else {
        exit::TASK_FAILED
    }
}

fn model_server(script: Option<&std::path::Path>, turn_delay_ms: u64) -> u8 {
    use ccluster_engine::scripted::{Script, Server};
    let mut script = match script.map(std::fs::read_to_string).transpose() {
        Ok(text) => match text.as_deref().map(Script::from_toml).transpose() {
            Ok(s) => s.unwrap_or_default(),
            Err(e) => {
                eprintln!("error: invalid script: {e}");
                eprintln!("  help: the rehearsal script's format is in docs/agents.md (\"The rehearsal script\")");
                return exit::INVALID_INPUT;
            }
        },
        Err(e) => {
            eprintln!("error: cannot read the script: {e}");
            return exit::INVALID_INPUT;
        }
    };
    script.turn_delay_ms = script.turn_delay_ms.max(turn_delay_ms);
    // Clients must send the token as their API key: the one chosen in the environment, or a fresh
    // one, said once on stderr after the URL.
    let chosen = std::env::var(MODEL_SERVER_TOKEN)
        .ok()
        .filter(|t| !t.is_empty());
    let say_token = chosen.is_none();
    let started = match chosen {
        Some(token) => Server::start_with_token(script, Some(PathBuf::from("/dev/stdout")), token),
        None => Server::start(script, Some(PathBuf::from("/dev/stdout"))),
    };
    match started {
        Ok(server) => {
            eprintln!("{}", server.url());
            if say_token {
                eprintln!("token: {}", server.token());
            }
            // The server runs on its own thread until the process is killed.
            loop {
                std::thread::park();
            }
        }
        Err(e) => {
            eprintln!("error: cannot start the server: {e}");
            exit::TASK_FAILED
        }
    }
}

/// The variable that chooses the token `ccluster model-server` requires.
const MODEL_SERVER_TOKEN: &str = "CCLUSTER_MODEL_SERVER_TOKEN";

/// `1 task`, `2 tasks`.
fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed pipe (`ccluster plan | head`) is not an error worth a panic.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Diagnostics for a person on stderr: colored on a terminal unless `NO_COLOR` is set.
fn human(diagnostics: &[Diagnostic], source: &SourceFile) -> String {
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    render::human(diagnostics, source, color)
}

/// Reads an operator's policy file, printing its problems.
fn read_policy(
    path: Option<&std::path::Path>,
) -> Result<Option<std::sync::Arc<ccluster_engine::model::guardrails::OperatorPolicy>>, u8> {
    let Some(path) = path else { return Ok(None) };
    match ccluster_engine::model::guardrails::OperatorPolicy::read(path) {
        Ok(Ok(policy)) => Ok(Some(policy)),
        Ok(Err(diagnostics)) => {
            let source = diagnostics
                .iter()
                .find_map(|d| d.file.clone())
                .unwrap_or_else(|| SourceFile::new(path.display().to_string(), ""));
            eprint!("{}", human(&diagnostics, &source));
            Err(exit::INVALID_INPUT)
        }
        Err(e) => {
            eprintln!("error: cannot read the policy `{}`: {e}", path.display());
            Err(exit::INVALID_INPUT)
        }
    }
}

fn input_args(file: &FileArgs) -> Result<InputArgs, String> {
    let mut args = InputArgs::default();
    for path in &file.vars_files {
        args.load_file(path)?;
    }
    for pair in &file.vars {
        args.push_pair(pair)?;
    }
    Ok(args)
}

/// Compiles, printing diagnostics; returns the compilation when it has no errors.
/// How a command gets `git+` templates.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Templates {
    /// Only from commits pinned in the lock file and already cached: no network (`validate` and
    /// `plan` without `--fetch`).
    Cached,
    /// Fetch what is not pinned or cached yet, and pin it.
    Fetch,
    /// Resolve every ref again and pin the commits (`update`).
    Refresh,
}

impl Templates {
    fn fetch_if(fetch: bool) -> Templates {
        if fetch {
            Templates::Fetch
        } else {
            Templates::Cached
        }
    }
}

/// The template loader of a clusterfile: path templates are confined to its repository, `git+`
/// templates are fetched (when `templates` allows) into the state directory and pinned in
/// `clusterfile.lock` beside the clusterfile.
fn loader_for(
    clusterfile: &std::path::Path,
    state_dir: Option<&std::path::Path>,
    templates: Templates,
) -> Result<FileLoader, u8> {
    let dir = clusterfile
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let lock = FileLoader::read_lock(&dir.join("clusterfile.lock")).map_err(|e| {
        eprintln!("error: {e}");
        exit::INVALID_INPUT
    })?;
    let state = state_dir
        .map(std::path::Path::to_path_buf)
        .or_else(|| std::env::var_os("CCLUSTER_STATE_DIR").map(PathBuf::from))
        .unwrap_or_else(|| ccluster_engine::exec::default_state_dir(clusterfile));
    Ok(FileLoader {
        cache: Some(state.join("templates")),
        lock,
        refresh: templates == Templates::Refresh,
        fetch: templates != Templates::Cached,
        root: Some(ccluster_engine::model::confine::confinement_root(&dir)),
        ..FileLoader::default()
    })
}

/// Writes `clusterfile.lock` when resolving `git+` templates pinned something new.
fn save_lock(clusterfile: &std::path::Path, loader: &FileLoader) -> Result<(), u8> {
    if !loader.lock_changed {
        return Ok(());
    }
    let dir = clusterfile
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let path = dir.join("clusterfile.lock");
    loader.write_lock(&path).map_err(|e| {
        eprintln!("error: cannot write {}: {e}", path.display());
        exit::INVALID_INPUT
    })?;
    eprintln!("pinned git templates in {}", path.display());
    Ok(())
}

fn compile(
    file: &FileArgs,
    stage: Stage,
    format: DiagnosticFormat,
    templates: Templates,
) -> Result<(SourceFile, ccluster_engine::Compiled), u8> {
    compile_recording(file, stage, format, None, templates).map(|(s, c, _)| (s, c))
}

/// Compiles, and returns the texts of the templates it used (for the run record).
fn compile_recording(
    file: &FileArgs,
    stage: Stage,
    format: DiagnosticFormat,
    state_dir: Option<&std::path::Path>,
    templates: Templates,
) -> Result<
    (
        SourceFile,
        ccluster_engine::Compiled,
        std::collections::BTreeMap<String, String>,
    ),
    u8,
> {
    let mut args = input_args(file).map_err(|e| {
        eprintln!("error: {e}");
        exit::INVALID_INPUT
    })?;
    args.policy = read_policy(file.policy.as_deref())?;
    let name = file.file.display().to_string();
    let mut loader = loader_for(&file.file, state_dir, templates)?;
    let (source, result) = compile_file_with(&file.file, &name, &args, stage, &mut loader)
        .map_err(|e| {
            eprintln!("error: cannot read `{name}`: {e}");
            if e.kind() == std::io::ErrorKind::NotFound {
                eprintln!(
                "  help: run it in a directory with a clusterfile.toml, or pass the file's path"
            );
            }
            exit::INVALID_INPUT
        })?;
    if templates == Templates::Refresh {
        // `update`: the lock holds what the clusterfile uses now, nothing else.
        let before = loader.lock.len();
        let used = loader.served.clone();
        loader.lock.retain(|spec, _| used.contains_key(spec));
        loader.lock_changed |= loader.lock.len() != before;
    }
    save_lock(&file.file, &loader)?;
    match result {
        Ok(compiled) => {
            if format == DiagnosticFormat::Human {
                eprint!("{}", human(&compiled.warnings, &source));
            }
            github::diagnostics(&compiled.warnings, &source, github_stream(format));
            Ok((source, compiled, loader.served))
        }
        Err(diagnostics) => {
            github::diagnostics(&diagnostics, &source, github_stream(format));
            match format {
                DiagnosticFormat::Human => {
                    eprint!("{}", human(&diagnostics, &source))
                }
                DiagnosticFormat::Json => print(&render::json(&diagnostics, &source)),
                DiagnosticFormat::JsonLine => {
                    print(&format!("{}\n", render::json_value(&diagnostics, &source)))
                }
            }
            Err(exit::INVALID_INPUT)
        }
    }
}

/// Where GitHub workflow commands go beside diagnostics printed in `format`.
fn github_stream(format: DiagnosticFormat) -> github::Stream {
    match format {
        DiagnosticFormat::Human => github::Stream::Stdout,
        DiagnosticFormat::Json | DiagnosticFormat::JsonLine => github::Stream::Stderr,
    }
}

fn validate(file: &FileArgs, format: DiagnosticFormat, fetch: bool) -> u8 {
    match compile(file, Stage::Validate, format, Templates::fetch_if(fetch)) {
        Ok((source, c)) => {
            if let Some(refusal) = what_apply_refuses_here(&file.file, &c) {
                github::diagnostics(
                    std::slice::from_ref(&refusal),
                    &source,
                    github_stream(format),
                );
                match format {
                    DiagnosticFormat::Human => eprint!("{}", human(&[refusal], &source)),
                    _ => print(&render::json(&[refusal], &source)),
                }
                return exit::INVALID_INPUT;
            }
            match format {
                DiagnosticFormat::Human => print(&format!(
                    "{}: valid ({}, {})\n",
                    file.file.display(),
                    plural(c.plan.summary.tasks, "task", "tasks"),
                    plural(c.plan.summary.nodes, "plan node", "plan nodes")
                )),
                DiagnosticFormat::Json | DiagnosticFormat::JsonLine => {
                    print(&render::json(&c.warnings, &source));
                }
            }
            exit::SUCCESS
        }
        Err(code) => code,
    }
}

/// What `apply` would refuse about where the clusterfile is, before running anything, which the
/// compiler cannot see: tasks with a workspace outside a git repository, or a base that does not
/// resolve there.
fn what_apply_refuses_here(
    clusterfile: &std::path::Path,
    compiled: &ccluster_engine::Compiled,
) -> Option<Diagnostic> {
    use ccluster_engine::diagnostic::Category;
    if !compiled.plan.nodes.iter().any(|n| n.workspace.is_some()) {
        return None;
    }
    let dir = match clusterfile.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let repo = match ccluster_engine::workspace::Repo::discover(dir) {
        Ok(repo) => repo,
        Err(e) => {
            return Some(
                Diagnostic::error(
                    Category::InvalidValue,
                    "no-repository",
                    format!("tasks with a workspace need the clusterfile to be in a git repository: {e}"),
                )
                .help("run `git init` and commit, or remove `workspace` from the tasks (`apply` refuses to start here)"),
            );
        }
    };
    let rev = compiled.workflow.base.as_deref().unwrap_or("HEAD");
    match repo.resolve(rev) {
        Ok(_) => None,
        Err(e) => Some(
            Diagnostic::error(
                Category::InvalidValue,
                "no-base",
                format!("cannot find the base of the run, `{rev}`: {e}"),
            )
            .help(if rev == "HEAD" {
                "commit something first: workspaces start from a commit".to_string()
            } else {
                format!("`[workflow] base` must name a commit of this repository; `git rev-parse {rev}` shows what git makes of it")
            }),
        ),
    }
}

fn plan_command(
    file: &FileArgs,
    format: PlanFormat,
    explain: Option<(PathBuf, bool, bool)>,
    run: Option<(PathBuf, String)>,
    fetch: bool,
) -> u8 {
    let c = match compile(
        file,
        Stage::Plan,
        match format {
            PlanFormat::Json => DiagnosticFormat::Json,
            _ => DiagnosticFormat::Human,
        },
        Templates::fetch_if(fetch),
    ) {
        Ok((_, c)) => c,
        Err(code) => return code,
    };
    if let Some((dir, fresh, rehearse)) = explain {
        let script = rehearse.then(|| {
            ccluster_engine::exec::rehearsal_script(
                &c,
                &ccluster_engine::scripted::Script::default(),
            )
        });
        return runs::explain(
            &c,
            &dir,
            &file.file,
            runs::ExplainArgs {
                fresh,
                json: format == PlanFormat::Json,
                rehearse: script.as_ref(),
            },
        );
    }
    // As a run expanded it: its instances (and a task graph's edges) for the placeholders.
    let expanded = match &run {
        Some((dir, id)) => match runs::run_records(dir, id) {
            Ok(records) => {
                let nodes: Vec<plan::RunNode<'_>> = records
                    .iter()
                    .map(|r| plan::RunNode {
                        node: &r.node,
                        task: &r.task,
                        after: &r.after,
                    })
                    .collect();
                Some(c.plan.as_run(&nodes))
            }
            Err(code) => return code,
        },
        None => None,
    };
    let shown = expanded.as_ref().unwrap_or(&c.plan);
    let text = match format {
        PlanFormat::Text => plan::to_text(shown),
        PlanFormat::Json => plan::to_json(shown),
        PlanFormat::Dot => plan::to_dot(shown),
        PlanFormat::Mermaid => plan::to_mermaid(shown),
    };
    // Secret inputs, and whatever templates rendered from them, are shown as `***`.
    print(&mask(text, &c.workflow.secret_texts(&c.plan.inputs)));
    exit::SUCCESS
}
