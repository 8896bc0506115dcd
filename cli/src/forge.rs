//! `publish` and `review`: a run's result pushed to a git remote and opened (or updated) as a
//! pull request with the run's report as its body; `builtin:review` run on a pull request's diff
//! and posted as one review that replaces ccluster's earlier one. The forge work itself is in
//! `ccluster_engine::forge`; this is arguments, the token, git plumbing and messages.

/// Prints a line to stdout; a closed pipe ends the output quietly instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

use std::path::{Path, PathBuf};

use ccluster_engine::forge::diff::Commentable;
use ccluster_engine::forge::github::{GitHub, DEFAULT_API_URL};
use ccluster_engine::forge::publish::{self, PullRequestSettings, Pushed};
use ccluster_engine::forge::review::{build_review, AngleOutput, Finding};
use ccluster_engine::forge::{self as forges, Forge, RepoId};
use ccluster_engine::secrets::{self, Redactor, SecretSource};
use ccluster_engine::store::TaskState;
use ccluster_engine::workspace::{git_sync, RefName, Repo};
use clap::Args;

use crate::exit;

/// The secret that holds the forge token when nothing else says.
pub const DEFAULT_TOKEN_SECRET: &str = "GITHUB_TOKEN";

/// Which forge and repository, and with what token.
#[derive(Args, Clone, Debug, Default)]
pub struct ForgeArgs {
    /// The repository on the forge, `owner/name` (default: read from the remote's URL).
    #[arg(long, value_name = "OWNER/NAME")]
    pub repo: Option<String>,
    /// The forge's API (GitHub Enterprise Server: `https://HOST/api/v3`).
    #[arg(long, env = "GITHUB_API_URL", value_name = "URL", default_value = DEFAULT_API_URL)]
    pub api_url: String,
    /// The secret holding the token: a `[secrets.NAME]` declaration of the run's clusterfile,
    /// else the environment variable NAME.
    #[arg(long, value_name = "NAME", default_value = DEFAULT_TOKEN_SECRET)]
    pub token_secret: String,
}

/// What `publish` does, from the command line or a workflow's `publish` table.
#[derive(Clone, Debug, Default)]
pub struct PublishOptions {
    pub run: Option<String>,
    pub remote: String,
    pub branch: Option<String>,
    pub pr: bool,
    pub draft: bool,
    pub base: Option<String>,
    pub title: Option<String>,
    pub labels: Vec<String>,
    pub reviewers: Vec<String>,
    pub review: bool,
    pub force: bool,
    pub forge: ForgeArgs,
    /// With `review`: rehearse the review (the scripted model server, with this script).
    pub rehearse: Option<ccluster_engine::scripted::Script>,
}

/// The token: a declared secret of the clusterfile `source` (named `file`: its extension says
/// TOML or KDL; resolved from `base_dir`), else the environment variable of that name. Installed
/// in the redactor, so no message shows it.
fn token(name: &str, source: Option<(&str, &Path)>, base_dir: &Path) -> Result<String, String> {
    let declared = source.and_then(|(text, file)| {
        use ccluster_engine::syntax::{self, Format};
        // A clusterfile that no longer parses declares nothing: the variable is tried.
        let (node, _) = syntax::parse(text, Format::from_path(file));
        let raw = ccluster_engine::model::decode::decode(&node?, &mut Vec::new());
        let from = raw.secrets.get(name)?.from.as_ref()?;
        Some(from.value.clone())
    });
    let value = match declared {
        Some(from) => SecretSource::parse(&from)
            .and_then(|s| s.resolve(base_dir))
            .map_err(|e| format!("secret `{name}`: {e}"))?,
        None => match std::env::var(name) {
            Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
            _ => {
                return Err(format!(
                    "no forge token: set the environment variable `{name}`, or declare \
                     `[secrets.{name}]` in the clusterfile (or name another with --token-secret)"
                ))
            }
        },
    };
    secrets::install(Redactor::new(&[(name.to_string(), value.clone())]));
    Ok(value)
}

/// The URL of `remote` (a remote's name, or a URL or path as given).
fn remote_url(repo: &Path, remote: &str) -> Result<String, String> {
    if remote.starts_with('-') {
        return Err(format!("`{}` is not a remote", remote.escape_debug()));
    }
    match git_sync(repo, &["remote", "get-url", "--", remote]) {
        Ok(url) => Ok(url.trim().to_string()),
        Err(_) if remote.contains('/') || remote.contains(':') => Ok(remote.to_string()),
        Err(_) => Err(format!(
            "`{}` is not a remote of {}: `git remote -v` lists them",
            remote.escape_debug(),
            repo.display()
        )),
    }
}

/// The forge client for the repository behind `remote`.
fn connect(
    repo: &Path,
    remote: &str,
    args: &ForgeArgs,
    source: Option<(&str, &Path)>,
    base_dir: &Path,
) -> Result<GitHub, String> {
    let id = match &args.repo {
        Some(r) => RepoId::parse(r)?,
        None => RepoId::from_remote_url(&remote_url(repo, remote)?)?,
    };
    let token = token(&args.token_secret, source, base_dir)?;
    GitHub::new(&args.api_url, &token, &args.token_secret, id).map_err(|e| e.to_string())
}

/// The remote's default branch (what its `HEAD` points at), else `main`.
fn default_base(repo: &Path, remote: &str) -> String {
    git_sync(
        repo,
        &["ls-remote", "--symref", "--end-of-options", remote, "HEAD"],
    )
    .ok()
    .and_then(|out| {
        out.lines().find_map(|l| {
            l.strip_prefix("ref: refs/heads/")
                .and_then(|r| r.split('\t').next())
                .map(str::to_owned)
        })
    })
    .unwrap_or_else(|| "main".into())
}

/// `ccluster publish` (and `[workflow] publish` after a successful run).
pub fn publish(state_dir: &Path, opts: &PublishOptions) -> u8 {
    let (store, run) = match crate::results::open_run(state_dir, opts.run.as_deref()) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let built = match ccluster_engine::report::build(store.as_ref(), &run) {
        Ok(r) => r,
        Err(e) => return crate::runs::report(e),
    };
    // Closed now: `--review` starts a run of its own in this state directory.
    drop(store);
    let (Some(repo), Some(result)) = (&run.repo, &built.result) else {
        eprintln!(
            "error: run {} has no result to publish: {}",
            run.id,
            match &run.result {
                Some(task) => format!("its result task `{task}` did not succeed"),
                None => "it has no git merge task, and `[workflow] result` is not set".into(),
            }
        );
        return exit::INVALID_INPUT;
    };
    let repo = PathBuf::from(repo);
    let goal = (run.clusterfile == "builtin:goal")
        .then(|| run.inputs.get("goal").and_then(|g| g.as_str()))
        .flatten();
    let branch_name = opts
        .branch
        .clone()
        .unwrap_or_else(|| forges::default_branch(&run.workflow, goal));
    let branch = match RefName::branch(&branch_name) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: --branch: {e}");
            return exit::INVALID_INPUT;
        }
    };
    // Everything the forge needs is checked before anything is pushed.
    let base_dir = Path::new(&run.clusterfile)
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| repo.clone());
    let source =
        (!run.source.is_empty()).then_some((run.source.as_str(), Path::new(&run.clusterfile)));
    let Some(rt) = crate::runtime() else {
        return exit::TASK_FAILED;
    };
    let forge = if opts.pr {
        // octocrab starts its client's worker on the runtime it is built in.
        let _entered = rt.enter();
        match connect(&repo, &opts.remote, &opts.forge, source, &base_dir) {
            Ok(f) => Some(f),
            Err(e) => {
                eprintln!("error: {e}");
                return exit::INVALID_INPUT;
            }
        }
    } else {
        None
    };
    // The forge is asked first: a token or repository it refuses stops before anything is
    // pushed.
    let open = match &forge {
        Some(forge) => match rt.block_on(forge.find_pull_request(&branch_name)) {
            Ok(open) => open,
            Err(e) => {
                eprintln!("error: {e}");
                return exit::TASK_FAILED;
            }
        },
        None => None,
    };
    match publish::push(&repo, &opts.remote, &branch, &result.commit, opts.force) {
        Ok(pushed) => out!(
            "{branch_name} on {}: {}",
            opts.remote,
            match pushed {
                Pushed::Created => format!("created at {}", short(&result.commit)),
                Pushed::Updated(old) =>
                    format!("updated {} -> {}", short(&old), short(&result.commit)),
                Pushed::UpToDate => format!("already at {}", short(&result.commit)),
            }
        ),
        Err(e) => {
            eprintln!("error: {}", secrets::redact_text(&e));
            return exit::TASK_FAILED;
        }
    }
    let Some(forge) = forge else {
        return exit::SUCCESS;
    };
    let title = opts
        .title
        .clone()
        .unwrap_or_else(|| forges::default_title(&run.workflow, goal));
    let body = forges::fit_body(
        &ccluster_engine::report::to_markdown(&built),
        &format!("`ccluster report {}`", run.id),
    );
    let settings = PullRequestSettings {
        title,
        body,
        base: opts
            .base
            .clone()
            .unwrap_or_else(|| default_base(&repo, &opts.remote)),
        draft: opts.draft,
        labels: opts.labels.clone(),
        reviewers: opts.reviewers.clone(),
    };
    let pull = match rt.block_on(publish::upsert_found_pull_request(
        &forge,
        &branch_name,
        &settings,
        open,
    )) {
        Ok((pull, created)) => {
            out!(
                "{} pull request #{}: {}",
                if created { "opened" } else { "updated" },
                pull.number,
                pull.url
            );
            pull
        }
        Err(e) => {
            eprintln!("error: {e}");
            return exit::TASK_FAILED;
        }
    };
    if let Err(e) = rt.block_on(publish::label_and_request_reviews(
        &forge,
        pull.number,
        &settings,
    )) {
        eprintln!(
            "error: {e} (pull request #{} is open: {})",
            pull.number, pull.url
        );
        return exit::TASK_FAILED;
    }
    drop(rt);
    if opts.review {
        return review(
            state_dir,
            &ReviewOptions {
                pr: pull.number,
                remote: opts.remote.clone(),
                forge: opts.forge.clone(),
                rehearse: opts.rehearse.clone(),
            },
        );
    }
    exit::SUCCESS
}

/// `[workflow] publish`, after a successful `apply`: the run just made, published as the table
/// says. A rehearsal publishes nothing (its result is made up): it says how to publish it.
pub fn publish_after_run(
    state_dir: &Path,
    settings: &ccluster_engine::model::publish::Publish,
    rehearsal: bool,
) -> u8 {
    if rehearsal {
        eprintln!(
            "note: a rehearsal is not published (`[workflow] publish`); `ccluster publish` publishes it anyway"
        );
        return exit::SUCCESS;
    }
    let code = publish(
        state_dir,
        &PublishOptions {
            run: None,
            remote: settings.remote.clone(),
            branch: settings.branch.clone(),
            pr: settings.pr,
            draft: settings.draft,
            base: settings.base.clone(),
            title: settings.title.clone(),
            labels: settings.labels.clone(),
            reviewers: settings.reviewers.clone(),
            review: settings.review,
            force: false,
            forge: ForgeArgs {
                repo: settings.repo.clone(),
                api_url: std::env::var("GITHUB_API_URL")
                    .ok()
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| DEFAULT_API_URL.into()),
                token_secret: settings.token.clone(),
            },
            rehearse: None,
        },
    );
    if code != exit::SUCCESS {
        eprintln!(
            "error: the run succeeded, but publishing it failed: `ccluster publish` tries again"
        );
    }
    code
}

/// After a successful `retry`: the run it made (the latest), published as its own clusterfile
/// text's `[workflow] publish` says, if it says anything.
pub fn publish_after_retry(state_dir: &Path) -> u8 {
    let (store, run) = match crate::results::open_run(state_dir, None) {
        Ok(x) => x,
        Err(code) => return code,
    };
    drop(store);
    let settings = {
        use ccluster_engine::syntax::{self, Format};
        let (node, _) = syntax::parse(&run.source, Format::from_path(Path::new(&run.clusterfile)));
        let mut diags = Vec::new();
        node.map(|n| ccluster_engine::model::decode::decode(&n, &mut diags))
            .and_then(|raw| raw.workflow?.publish)
            .and_then(|p| ccluster_engine::model::publish::resolve(&p, &mut diags))
    };
    match settings {
        Some(settings) => publish_after_run(state_dir, &settings, run.rehearsed),
        None => exit::SUCCESS,
    }
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(10)]
}

/// What `review` does.
#[derive(Clone, Debug)]
pub struct ReviewOptions {
    pub pr: u64,
    pub remote: String,
    pub forge: ForgeArgs,
    pub rehearse: Option<ccluster_engine::scripted::Script>,
}

/// `ccluster review --pr N`: `builtin:review` on the pull request's change, in a worktree of its
/// head, then one review posted (replacing ccluster's earlier one).
pub fn review(state_dir: &Path, opts: &ReviewOptions) -> u8 {
    let cwd = match std::env::current_dir() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: cannot read the current directory: {e}");
            return exit::INVALID_INPUT;
        }
    };
    let repo = match Repo::discover(&cwd) {
        Ok(r) => r.root,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INVALID_INPUT;
        }
    };
    // The review's run goes to this state directory whatever the working directory becomes.
    let state_dir = cwd.join(state_dir);
    // The secrets this directory's clusterfile declares (the TOML one, else the KDL one).
    let source = ["clusterfile.toml", "clusterfile.kdl"]
        .iter()
        .find_map(|name| {
            std::fs::read_to_string(cwd.join(name))
                .ok()
                .map(|text| (text, PathBuf::from(name)))
        });
    let Some(rt) = crate::runtime() else {
        return exit::TASK_FAILED;
    };
    // octocrab starts its client's worker on the runtime it is built in; the review's own run
    // (below) starts another runtime, so this one is entered only here and in `block_on`.
    let connected = {
        let _entered = rt.enter();
        connect(
            &repo,
            &opts.remote,
            &opts.forge,
            source
                .as_ref()
                .map(|(text, file)| (text.as_str(), file.as_path())),
            &cwd,
        )
    };
    let forge = match connected {
        Ok(f) => f,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::INVALID_INPUT;
        }
    };
    let number = opts.pr;
    let fetched = rt.block_on(async {
        let pull = forge.get_pull_request(number).await?;
        let diff = forge.pull_request_diff(number).await?;
        Ok::<_, forges::ForgeError>((pull, diff))
    });
    let (pull, diff) = match fetched {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::TASK_FAILED;
        }
    };
    let base = match fetch_pull(&repo, &opts.remote, &pull) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {}", secrets::redact_text(&e));
            return exit::TASK_FAILED;
        }
    };
    let findings = match run_review(&repo, &state_dir, &pull, &base, opts.rehearse.clone()) {
        Ok(f) => f,
        Err(code) => return code,
    };
    let (run_id, findings) = findings;
    let review = build_review(
        &findings,
        &Commentable::from_unified_diff(&diff),
        &pull.head_sha,
        &run_id,
    );
    let inline = review.comments.len();
    match rt.block_on(publish::post_review(&forge, number, &review)) {
        Ok((posted, retired)) => {
            out!(
                "posted review {} on pull request #{number}: {} finding{}, {inline} inline, {} in the summary{}",
                posted.id,
                findings.len(),
                if findings.len() == 1 { "" } else { "s" },
                findings.len() - inline,
                if retired > 0 {
                    format!("; {retired} earlier ccluster review{} superseded", if retired == 1 { "" } else { "s" })
                } else {
                    String::new()
                }
            );
            exit::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            exit::TASK_FAILED
        }
    }
}

/// Brings the pull request's head and base commits into the local repository (GitHub's
/// `refs/pull/N/head` when the remote has it, else the head branch) and returns the commit the
/// change is compared with: the merge base, as GitHub's own diff of a pull request.
fn fetch_pull(repo: &Path, remote: &str, pull: &forges::PullRequest) -> Result<String, String> {
    let local = |side: &str| format!("refs/ccluster/review/pr-{}/{side}", pull.number);
    let head_sources = [
        format!("refs/pull/{}/head", pull.number),
        format!("refs/heads/{}", pull.head_ref),
    ];
    let mut fetched = false;
    let mut last = String::new();
    for src in &head_sources {
        let spec = format!("+{src}:{}", local("head"));
        match git_sync(
            repo,
            &[
                "fetch",
                "--no-tags",
                "--quiet",
                "--end-of-options",
                remote,
                &spec,
            ],
        ) {
            Ok(_) => {
                fetched = true;
                break;
            }
            Err(e) => last = e,
        }
    }
    if !fetched {
        return Err(format!(
            "cannot fetch the head of pull request #{} from `{remote}`: {last}",
            pull.number
        ));
    }
    let spec = format!("+refs/heads/{}:{}", pull.base_ref, local("base"));
    git_sync(
        repo,
        &[
            "fetch",
            "--no-tags",
            "--quiet",
            "--end-of-options",
            remote,
            &spec,
        ],
    )
    .map_err(|e| format!("cannot fetch the base `{}`: {e}", pull.base_ref))?;
    git_sync(
        repo,
        &[
            "cat-file",
            "-e",
            "--end-of-options",
            &format!("{}^{{commit}}", pull.head_sha),
        ],
    )
    .map_err(|_| {
        format!(
            "the pull request's head {} is not on `{remote}`'s branches: was it pushed?",
            short(&pull.head_sha)
        )
    })?;
    let base = if git_sync(
        repo,
        &["cat-file", "-e", &format!("{}^{{commit}}", pull.base_sha)],
    )
    .is_ok()
    {
        pull.base_sha.clone()
    } else {
        local("base")
    };
    git_sync(
        repo,
        &["merge-base", "--end-of-options", &base, &pull.head_sha],
    )
    .map(|s| s.trim().to_string())
}

/// Runs `builtin:review` in a detached worktree of the pull request's head with `base` as its
/// `base` input; returns the run's id and every reviewer's findings.
fn run_review(
    repo: &Path,
    state_dir: &Path,
    pull: &forges::PullRequest,
    base: &str,
    rehearse: Option<ccluster_engine::scripted::Script>,
) -> Result<(String, Vec<Finding>), u8> {
    let Some(builtin) = ccluster_engine::library::find("review") else {
        eprintln!("error: the built-in review workflow is missing");
        return Err(exit::TASK_FAILED);
    };
    let worktree = std::env::temp_dir().join(format!(
        "ccluster-review-{}-pr{}",
        std::process::id(),
        pull.number
    ));
    let worktree_arg = worktree.to_string_lossy().into_owned();
    if let Err(e) = git_sync(
        repo,
        &[
            "worktree",
            "add",
            "--detach",
            "--force",
            "--quiet",
            &worktree_arg,
            &pull.head_sha,
        ],
    ) {
        eprintln!("error: {e}");
        return Err(exit::TASK_FAILED);
    }
    let before = std::env::current_dir().ok();
    let code = (|| {
        std::env::set_current_dir(&worktree).map_err(|e| {
            eprintln!("error: cannot enter {}: {e}", worktree.display());
            exit::TASK_FAILED
        })?;
        let mut args = ccluster_engine::plan::InputArgs::default();
        args.push_pair(&format!("base={base}")).map_err(|e| {
            eprintln!("error: {e}");
            exit::INVALID_INPUT
        })?;
        let source = ccluster_engine::SourceFile::new("builtin:review", builtin.text);
        let compiled = ccluster_engine::compile(
            &source,
            ccluster_engine::syntax::Format::Toml,
            Path::new("."),
            &args,
            ccluster_engine::Stage::Plan,
        )
        .map_err(|d| {
            eprint!("{}", crate::human(&d, &source));
            exit::INVALID_INPUT
        })?;
        let clusterfile = PathBuf::from("builtin:review");
        let code = crate::runs::apply(
            &compiled,
            crate::runs::ApplyArgs {
                clusterfile: &clusterfile,
                source: builtin.text,
                rerun: Vec::new(),
                state_dir: state_dir.to_path_buf(),
                jobs: None,
                agents: None,
                adapt_agents: true,
                advertise: None,
                fresh: false,
                grace: std::time::Duration::from_secs(5),
                output: crate::runs::OutputFormat::Human,
                keep_going: false,
                rehearse,
                templates: Default::default(),
            },
        );
        if code == exit::SUCCESS {
            Ok(())
        } else {
            Err(code)
        }
    })();
    if let Some(dir) = before {
        let _ = std::env::set_current_dir(dir);
    }
    let _ = git_sync(repo, &["worktree", "remove", "--force", &worktree_arg]);
    code?;
    let (store, run) = crate::results::open_run(state_dir, None)?;
    let tasks = store.tasks(&run.id).map_err(crate::runs::report)?;
    let mut findings = Vec::new();
    for t in tasks {
        if t.task != "review" || !matches!(t.state, TaskState::Succeeded | TaskState::Cached) {
            continue;
        }
        let Some(output) = t.output else { continue };
        match serde_json::from_value::<AngleOutput>(output) {
            Ok(o) => findings.extend(o.into_findings()),
            Err(e) => eprintln!("warning: {}: its findings cannot be read: {e}", t.node),
        }
    }
    Ok((run.id, findings))
}
