//! Publishing a run's result: pushing its commit to a branch of a real git remote, opening or
//! updating the branch's pull request, and posting a review that replaces ccluster's earlier one.
//! Publishing again updates the same branch and pull request instead of opening another.

use std::path::Path;

use super::review::{retire_earlier, Retire, SUPERSEDED};
use super::{Forge, ForgeError, NewPullRequest, NewReview, PullRequest, Review};
use crate::workspace::{git_sync, RefName};

/// Where ccluster records, per branch, the commit it last pushed there: the lease for the next
/// push (`refs/ccluster/published/<branch>` in the local repository).
pub fn published_ref(branch: &RefName) -> Result<RefName, String> {
    let short = branch.short_branch().unwrap_or(branch.as_str());
    RefName::new(format!("refs/ccluster/published/{short}"))
}

/// What a push did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pushed {
    /// The remote branch did not exist.
    Created,
    /// The remote branch moved from this commit.
    Updated(String),
    /// The remote branch already was at the commit.
    UpToDate,
}

/// Pushes `commit` to `branch` of `remote` (a remote's name or URL) from the repository at
/// `repo`. The remote branch is overwritten only when it is where ccluster left it (the commit
/// recorded under [`published_ref`], checked by git itself with `--force-with-lease`), or with
/// `force`: a branch someone else pushed to is never lost by surprise.
pub fn push(
    repo: &Path,
    remote: &str,
    branch: &RefName,
    commit: &str,
    force: bool,
) -> Result<Pushed, String> {
    if remote.starts_with('-') {
        return Err(format!(
            "`{}` is not a remote: it starts with `-`",
            remote.escape_debug()
        ));
    }
    let listed = git_sync(
        repo,
        &["ls-remote", "--end-of-options", remote, branch.as_str()],
    )?;
    let current = listed
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .find(|(_, name)| *name == branch.as_str())
        .map(|(sha, _)| sha.to_string());
    let record = published_ref(branch)?;
    let recorded = git_sync(
        repo,
        &[
            "rev-parse",
            "--verify",
            "--quiet",
            "--end-of-options",
            &format!("{record}^{{commit}}"),
        ],
    )
    .ok()
    .map(|s| s.trim().to_string());
    let short = branch.short_branch().unwrap_or(branch.as_str());
    if current.as_deref() == Some(commit) {
        git_sync(repo, &["update-ref", record.as_str(), commit])?;
        return Ok(Pushed::UpToDate);
    }
    if let Some(current) = &current {
        if recorded.as_deref() != Some(current.as_str()) && !force {
            return Err(format!(
                "branch `{short}` on `{remote}` is at {}, which ccluster did not push there{}; \
                 refusing to overwrite it: publish to another --branch, or pass --force",
                &current[..current.len().min(12)],
                match &recorded {
                    Some(r) => format!(" (it last pushed {})", &r[..r.len().min(12)]),
                    None => String::new(),
                }
            ));
        }
    }
    // The lease: the remote branch must still be what was just seen (absent: must not exist),
    // so a push that lands between `ls-remote` and this one is not overwritten either.
    let lease = format!(
        "--force-with-lease={}:{}",
        branch.as_str(),
        current.as_deref().unwrap_or("")
    );
    let refspec = format!("{commit}:{}", branch.as_str());
    git_sync(
        repo,
        &[
            "push",
            "--porcelain",
            &lease,
            "--end-of-options",
            remote,
            &refspec,
        ],
    )
    .map_err(|e| format!("pushing to `{remote}`: {e}"))?;
    git_sync(repo, &["update-ref", record.as_str(), commit])?;
    Ok(match current {
        Some(old) => Pushed::Updated(old),
        None => Pushed::Created,
    })
}

/// What the pull request says and who looks at it.
#[derive(Clone, Debug, Default)]
pub struct PullRequestSettings {
    pub title: String,
    pub body: String,
    pub base: String,
    pub draft: bool,
    pub labels: Vec<String>,
    pub reviewers: Vec<String>,
}

/// Opens the pull request of `branch`, or updates the open one (title and body): one pull
/// request per branch however often the run is published; then adds its labels and reviewers
/// ([`label_and_request_reviews`]). Whether it was created comes with it.
pub async fn upsert_pull_request<F: Forge>(
    forge: &F,
    branch: &str,
    settings: &PullRequestSettings,
) -> Result<(PullRequest, bool), ForgeError> {
    let open = forge.find_pull_request(branch).await?;
    let (pull, created) = upsert_found_pull_request(forge, branch, settings, open).await?;
    label_and_request_reviews(forge, pull.number, settings).await?;
    Ok((pull, created))
}

/// Adds the labels and requests the reviews `settings` lists, each time it is published
/// (GitHub ignores what is already there). Apart from the upsert, so that a pull request that
/// is open is said to be even when a reviewer cannot be asked (GitHub refuses the author).
pub async fn label_and_request_reviews<F: Forge>(
    forge: &F,
    number: u64,
    settings: &PullRequestSettings,
) -> Result<(), ForgeError> {
    if !settings.labels.is_empty() {
        forge.add_labels(number, &settings.labels).await?;
    }
    if !settings.reviewers.is_empty() {
        forge.request_reviewers(number, &settings.reviewers).await?;
    }
    Ok(())
}

/// The pull request part of [`upsert_pull_request`] (no labels or reviewers), with the branch's
/// open pull request already looked up (before the push, so that a token or repository the
/// forge refuses stops `publish` before it pushes).
pub async fn upsert_found_pull_request<F: Forge>(
    forge: &F,
    branch: &str,
    settings: &PullRequestSettings,
    open: Option<PullRequest>,
) -> Result<(PullRequest, bool), ForgeError> {
    let (pull, created) = match open {
        Some(open) => (
            forge
                .update_pull_request(open.number, &settings.title, &settings.body)
                .await?,
            false,
        ),
        None => {
            let new = NewPullRequest {
                title: settings.title.clone(),
                body: settings.body.clone(),
                head: branch.to_string(),
                base: settings.base.clone(),
                draft: settings.draft,
            };
            match forge.create_pull_request(&new).await {
                Ok(pull) => (pull, true),
                // Opened in the meantime (or missed by the listing): update that one.
                Err(ForgeError::AlreadyExists { message }) => {
                    let open = forge
                        .find_pull_request(branch)
                        .await?
                        .ok_or(ForgeError::AlreadyExists { message })?;
                    (
                        forge
                            .update_pull_request(open.number, &settings.title, &settings.body)
                            .await?,
                        false,
                    )
                }
                Err(e) => return Err(e),
            }
        }
    };
    Ok((pull, created))
}

/// Posts `review` on pull request `number`, then retires ccluster's earlier reviews there
/// (deletes pending ones; submitted ones get a "superseded" body and lose their inline
/// comments). The new one is posted first, so a failure leaves the old review in place.
/// Returns the new review and how many were retired.
pub async fn post_review<F: Forge>(
    forge: &F,
    number: u64,
    review: &NewReview,
) -> Result<(Review, usize), ForgeError> {
    let earlier = forge.list_reviews(number).await?;
    let posted = forge.create_review(number, review).await?;
    let retire = retire_earlier(&earlier, Some(posted.id));
    for r in &retire {
        match r {
            Retire::DeletePending(id) => forge.delete_pending_review(number, *id).await?,
            Retire::Supersede(id) => {
                forge.update_review(number, *id, SUPERSEDED).await?;
                for comment in forge.review_comment_ids(number, *id).await? {
                    forge.delete_review_comment(comment).await?;
                }
            }
        }
    }
    Ok((posted, retire.len()))
}
