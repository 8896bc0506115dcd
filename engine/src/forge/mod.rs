//! Forges: where a run's result goes after the run, as a pushed branch, a pull request and a
//! review. [`Forge`] is the small seam the publishing and reviewing code talks to (GitHub through
//! octocrab today, [`github::GitHub`]; GitLab and Gitea/Forgejo can follow), [`ForgeError`] the
//! errors people see, and [`RepoId`] the `owner/name` read from a remote's URL.

pub mod diff;
pub mod github;
pub mod publish;
pub mod review;

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest pull request or review body GitHub accepts, in characters.
pub const MAX_BODY_CHARS: usize = 65_536;

/// A repository on a forge: `owner/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RepoId {
    pub owner: String,
    pub name: String,
}

impl RepoId {
    /// `owner/name` as given to `--repo`.
    pub fn parse(text: &str) -> Result<RepoId, String> {
        let (owner, name) = text
            .split_once('/')
            .ok_or_else(|| format!("`{}` is not `owner/name`", text.escape_debug()))?;
        let ok = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !ok(owner) || !ok(name) {
            return Err(format!(
                "`{}` is not `owner/name` (letters, digits, `-`, `_` and `.`)",
                text.escape_debug()
            ));
        }
        Ok(RepoId {
            owner: owner.into(),
            name: name.into(),
        })
    }

    /// The repository a remote URL names: `https://host/owner/name(.git)`,
    /// `ssh://git@host[:port]/owner/name(.git)`, or scp-like `git@host:owner/name(.git)`. The last
    /// two path segments are taken, so GitHub Enterprise URLs with a path prefix work too.
    pub fn from_remote_url(url: &str) -> Result<RepoId, String> {
        let url = url.trim();
        let path = if let Some((_, rest)) = url.split_once("://") {
            // Drop credentials and host: what follows the first `/` after them is the path.
            rest.split_once('/').map(|(_, p)| p).unwrap_or("")
        } else if let Some((host, path)) = url.split_once(':') {
            // scp-like syntax; a Windows drive letter or a local path has no user@host before `:`.
            if host.contains('/') {
                ""
            } else {
                path
            }
        } else {
            ""
        };
        let path = path.trim_end_matches('/');
        let path = path.strip_suffix(".git").unwrap_or(path);
        let mut parts = path.rsplit('/').filter(|s| !s.is_empty());
        match (parts.next(), parts.next()) {
            (Some(name), Some(owner)) => RepoId::parse(&format!("{owner}/{name}")).map_err(|_| {
                format!(
                    "cannot read `owner/name` from the remote URL `{}`",
                    url.escape_debug()
                )
            }),
            _ => Err(format!(
                "cannot read `owner/name` from the remote URL `{}`: give --repo owner/name",
                url.escape_debug()
            )),
        }
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// A pull request as ccluster needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PullRequest {
    pub number: u64,
    /// The page people open.
    pub url: String,
    pub title: String,
    pub state: String,
    pub draft: bool,
    pub head_ref: String,
    pub head_sha: String,
    pub base_ref: String,
    pub base_sha: String,
}

/// What a new pull request says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPullRequest {
    pub title: String,
    pub body: String,
    /// The branch with the change (in the same repository).
    pub head: String,
    pub base: String,
    pub draft: bool,
}

/// A review already on a pull request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Review {
    pub id: u64,
    pub body: String,
    /// `PENDING`, `COMMENTED`, `APPROVED`, `CHANGES_REQUESTED`, `DISMISSED`.
    pub state: String,
}

/// One inline comment of a new review: on `line` of `path` as it is after the change (the
/// `RIGHT` side of the diff).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct InlineComment {
    pub path: String,
    pub line: u64,
    pub side: &'static str,
    pub body: String,
}

/// A review to post: always a `COMMENT` (ccluster neither approves nor blocks a change).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewReview {
    /// The head commit the review is about: GitHub places comments on that commit's diff.
    pub commit_id: String,
    pub body: String,
    pub comments: Vec<InlineComment>,
}

/// What a forge does for ccluster. Each call is one request (lists read one page of 100: a
/// pull request with more open reviews by ccluster than that is not a case worth a loop).
// Callers run on ccluster's single-threaded runtime and never need the futures to be `Send`.
#[allow(async_fn_in_trait)]
pub trait Forge {
    /// The open pull request whose head is `branch` of this repository, if any.
    async fn find_pull_request(&self, branch: &str) -> Result<Option<PullRequest>, ForgeError>;
    async fn get_pull_request(&self, number: u64) -> Result<PullRequest, ForgeError>;
    /// The pull request's change as a unified diff.
    async fn pull_request_diff(&self, number: u64) -> Result<String, ForgeError>;
    async fn create_pull_request(&self, new: &NewPullRequest) -> Result<PullRequest, ForgeError>;
    async fn update_pull_request(
        &self,
        number: u64,
        title: &str,
        body: &str,
    ) -> Result<PullRequest, ForgeError>;
    async fn add_labels(&self, number: u64, labels: &[String]) -> Result<(), ForgeError>;
    async fn request_reviewers(&self, number: u64, reviewers: &[String]) -> Result<(), ForgeError>;
    async fn list_reviews(&self, number: u64) -> Result<Vec<Review>, ForgeError>;
    async fn create_review(&self, number: u64, review: &NewReview) -> Result<Review, ForgeError>;
    /// Replaces a submitted review's body (GitHub cannot delete a submitted review).
    async fn update_review(&self, number: u64, id: u64, body: &str) -> Result<(), ForgeError>;
    /// Deletes a review not submitted yet.
    async fn delete_pending_review(&self, number: u64, id: u64) -> Result<(), ForgeError>;
    /// The ids of a review's inline comments.
    async fn review_comment_ids(&self, number: u64, review: u64) -> Result<Vec<u64>, ForgeError>;
    async fn delete_review_comment(&self, comment: u64) -> Result<(), ForgeError>;
}

/// What went wrong talking to a forge, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgeError {
    #[error("the forge refused the token (401 Bad credentials): check that {token} holds a valid, unexpired token")]
    Unauthorized { token: String },
    #[error("the forge's rate limit is spent (403){}", reset_phrase(*reset))]
    RateLimited {
        /// When the limit resets (seconds since the epoch), from `x-ratelimit-reset`.
        reset: Option<u64>,
    },
    #[error("the forge refused {what} (403 Forbidden): {message}; the token may lack the `contents` or `pull_requests` write permission")]
    Forbidden { what: String, message: String },
    #[error("{what} was not found (404): the repository or pull request does not exist, or the token cannot see it")]
    NotFound { what: String },
    #[error("a pull request for this branch already exists (422): {message}")]
    AlreadyExists { message: String },
    #[error("the forge refused {what} (422): {message}")]
    Invalid { what: String, message: String },
    #[error("cannot reach the forge's API for {what}: {message}; check --api-url (GITHUB_API_URL) and the network")]
    Unreachable { what: String, message: String },
    #[error("{what}: {message}")]
    Other { what: String, message: String },
}

/// `until 2026-12-04T21:45:00Z (in 12m)`, from a reset time in seconds since the epoch.
fn reset_phrase(reset: Option<u64>) -> String {
    let Some(reset) = reset else {
        return ": wait and try again".into();
    };
    let at = UNIX_EPOCH + Duration::from_secs(reset);
    let wait = at
        .duration_since(SystemTime::now())
        .map(|d| Duration::from_secs(d.as_secs()))
        .unwrap_or_default();
    format!(
        " until {} (in {}): try again then",
        humantime::format_rfc3339_seconds(at),
        humantime::format_duration(wait)
    )
}

/// The body cut to fit GitHub's limit, with a note saying where the rest is. Cuts at a line
/// boundary so a table or a code fence is not broken mid-line (a fence left open is closed).
pub fn fit_body(body: &str, rest_is_at: &str) -> String {
    if body.chars().count() <= MAX_BODY_CHARS {
        return body.to_string();
    }
    let note = format!(
        "\n\n---\n*This text was cut to fit the forge's limit of {MAX_BODY_CHARS} characters; the whole of it: {rest_is_at}.*\n"
    );
    // Room for the note and a closing fence.
    let room = MAX_BODY_CHARS - note.chars().count() - 8;
    let cut_at = body
        .char_indices()
        .nth(room)
        .map(|(i, _)| i)
        .unwrap_or(body.len());
    let head = &body[..cut_at];
    let head = match head.rfind('\n') {
        Some(i) if i > 0 => &head[..i],
        _ => head,
    };
    let mut out = head.to_string();
    if head
        .lines()
        .filter(|l| l.trim_start().starts_with("```"))
        .count()
        % 2
        == 1
    {
        out.push_str("\n```");
    }
    out.push_str(&note);
    out
}

/// The branch a run is published to when `--branch` does not say: one per workflow, so that
/// every run of it updates the same branch and pull request (as Renovate and release-please do);
/// `run --goal` runs get one per goal.
pub fn default_branch(workflow: &str, goal: Option<&str>) -> String {
    match goal {
        Some(goal) => format!("ccluster/goal-{}", slug(goal, 40)),
        None => format!("ccluster/{}", slug(workflow, 60)),
    }
}

/// The pull request's title when `--title` does not say: the goal of a `run --goal` run, else
/// the workflow's name.
pub fn default_title(workflow: &str, goal: Option<&str>) -> String {
    match goal.map(str::trim).filter(|g| !g.is_empty()) {
        Some(goal) => {
            let line = goal.lines().next().unwrap_or(goal);
            let mut title: String = line.chars().take(120).collect();
            if title.len() < line.len() {
                title.push('…');
            }
            title
        }
        None => format!("ccluster: {workflow}"),
    }
}

/// Lower-case letters, digits and single `-`, at most `max` characters.
fn slug(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
        if out.len() >= max {
            break;
        }
    }
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() {
        "run".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_urls_of_every_form_name_the_repository() {
        let want = RepoId {
            owner: "acme".into(),
            name: "widgets".into(),
        };
        for url in [
            "https://github.com/acme/widgets.git",
            "https://github.com/acme/widgets",
            "https://x-access-token:abc@github.com/acme/widgets.git",
            "git@github.com:acme/widgets.git",
            "ssh://git@github.com/acme/widgets.git",
            "ssh://git@ghe.example.com:2222/acme/widgets",
            "https://ghe.example.com/scm/acme/widgets.git/",
            "git://127.0.0.1:9418/acme/widgets.git",
        ] {
            assert_eq!(RepoId::from_remote_url(url).as_ref(), Ok(&want), "{url}");
        }
        assert!(RepoId::from_remote_url("/srv/git/widgets.git").is_err());
        assert!(RepoId::from_remote_url("https://github.com/").is_err());
        assert!(RepoId::parse("acme/../x").is_err());
    }

    #[test]
    fn long_bodies_are_cut_with_a_note_and_fences_closed() {
        let body = format!("```\n{}", "x".repeat(100) + "\n").repeat(1000);
        let fitted = fit_body(&body, "`ccluster report RUN`");
        assert!(fitted.chars().count() <= MAX_BODY_CHARS);
        assert!(fitted.contains("cut to fit"));
        assert_eq!(
            fitted.lines().filter(|l| l.starts_with("```")).count() % 2,
            0
        );
        assert_eq!(fit_body("short", "x"), "short");
    }

    #[test]
    fn default_names() {
        assert_eq!(
            default_branch("Feature Fanout", None),
            "ccluster/feature-fanout"
        );
        assert_eq!(
            default_branch("goal", Some("Add a --verbose flag to the CLI!")),
            "ccluster/goal-add-a-verbose-flag-to-the-cli"
        );
        assert_eq!(default_title("review", None), "ccluster: review");
        assert_eq!(default_title("goal", Some("Fix it\nmore")), "Fix it");
    }

    #[test]
    fn rate_limit_messages_say_when() {
        let e = ForgeError::RateLimited {
            reset: Some(4_102_444_800),
        };
        assert!(e.to_string().contains("until 2100-01-01T00:00:00Z"), "{e}");
    }
}
