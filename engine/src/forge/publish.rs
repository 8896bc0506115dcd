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

#[cfg(test)]
mod tests {
    //! The orchestration over an in-memory forge: the seam is all it needs.

    use std::cell::RefCell;

    use super::*;
    use crate::forge::review::MARKER;
    use crate::forge::InlineComment;

    #[derive(Default)]
    struct Memory {
        pulls: RefCell<Vec<PullRequest>>,
        reviews: RefCell<Vec<(Review, Vec<u64>)>>,
        calls: RefCell<Vec<String>>,
        /// The listing misses open pull requests once (as one that raced a creation).
        blind_once: RefCell<bool>,
    }

    impl Memory {
        fn called(&self, what: impl Into<String>) {
            self.calls.borrow_mut().push(what.into());
        }
    }

    fn pull(number: u64, branch: &str, title: &str) -> PullRequest {
        PullRequest {
            number,
            url: format!("https://forge.example/pr/{number}"),
            title: title.into(),
            state: "open".into(),
            draft: false,
            head_ref: branch.into(),
            head_sha: "h".into(),
            base_ref: "main".into(),
            base_sha: "b".into(),
        }
    }

    impl Forge for Memory {
        async fn find_pull_request(&self, branch: &str) -> Result<Option<PullRequest>, ForgeError> {
            self.called("find");
            if self.blind_once.replace(false) {
                return Ok(None);
            }
            Ok(self
                .pulls
                .borrow()
                .iter()
                .find(|p| p.head_ref == branch)
                .cloned())
        }
        async fn get_pull_request(&self, number: u64) -> Result<PullRequest, ForgeError> {
            self.pulls
                .borrow()
                .iter()
                .find(|p| p.number == number)
                .cloned()
                .ok_or(ForgeError::NotFound {
                    what: format!("#{number}"),
                })
        }
        async fn pull_request_diff(&self, _: u64) -> Result<String, ForgeError> {
            Ok(String::new())
        }
        async fn create_pull_request(
            &self,
            new: &NewPullRequest,
        ) -> Result<PullRequest, ForgeError> {
            self.called("create");
            if self.pulls.borrow().iter().any(|p| p.head_ref == new.head) {
                return Err(ForgeError::AlreadyExists {
                    message: "exists".into(),
                });
            }
            let p = pull(self.pulls.borrow().len() as u64 + 1, &new.head, &new.title);
            self.pulls.borrow_mut().push(p.clone());
            Ok(p)
        }
        async fn update_pull_request(
            &self,
            number: u64,
            title: &str,
            _: &str,
        ) -> Result<PullRequest, ForgeError> {
            self.called(format!("update {number}"));
            let mut pulls = self.pulls.borrow_mut();
            let p = pulls.iter_mut().find(|p| p.number == number).unwrap();
            p.title = title.into();
            Ok(p.clone())
        }
        async fn add_labels(&self, number: u64, labels: &[String]) -> Result<(), ForgeError> {
            self.called(format!("labels {number} {}", labels.join(",")));
            Ok(())
        }
        async fn request_reviewers(&self, number: u64, who: &[String]) -> Result<(), ForgeError> {
            self.called(format!("reviewers {number} {}", who.join(",")));
            Ok(())
        }
        async fn list_reviews(&self, _: u64) -> Result<Vec<Review>, ForgeError> {
            Ok(self
                .reviews
                .borrow()
                .iter()
                .map(|(r, _)| r.clone())
                .collect())
        }
        async fn create_review(&self, _: u64, new: &NewReview) -> Result<Review, ForgeError> {
            // Ids are never reused, as on a forge.
            let id = 100 + self.calls.borrow().len() as u64;
            self.called(format!("review {id}"));
            let review = Review {
                id,
                body: new.body.clone(),
                state: "COMMENTED".into(),
            };
            let comments = (0..new.comments.len() as u64)
                .map(|i| id * 10 + i)
                .collect();
            self.reviews.borrow_mut().push((review.clone(), comments));
            Ok(review)
        }
        async fn update_review(&self, _: u64, id: u64, body: &str) -> Result<(), ForgeError> {
            self.called(format!("supersede {id}"));
            for (r, _) in self
                .reviews
                .borrow_mut()
                .iter_mut()
                .filter(|(r, _)| r.id == id)
            {
                r.body = body.into();
            }
            Ok(())
        }
        async fn delete_pending_review(&self, _: u64, id: u64) -> Result<(), ForgeError> {
            self.called(format!("delete {id}"));
            self.reviews.borrow_mut().retain(|(r, _)| r.id != id);
            Ok(())
        }
        async fn review_comment_ids(&self, _: u64, review: u64) -> Result<Vec<u64>, ForgeError> {
            Ok(self
                .reviews
                .borrow()
                .iter()
                .find(|(r, _)| r.id == review)
                .map(|(_, c)| c.clone())
                .unwrap_or_default())
        }
        async fn delete_review_comment(&self, comment: u64) -> Result<(), ForgeError> {
            self.called(format!("delete comment {comment}"));
            for (_, comments) in self.reviews.borrow_mut().iter_mut() {
                comments.retain(|c| *c != comment);
            }
            Ok(())
        }
    }

    fn settings(title: &str) -> PullRequestSettings {
        PullRequestSettings {
            title: title.into(),
            body: "report".into(),
            base: "main".into(),
            labels: vec!["ccluster".into()],
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn one_pull_request_per_branch_created_then_updated() {
        let forge = Memory::default();
        let (p, created) = upsert_pull_request(&forge, "ccluster/w", &settings("one"))
            .await
            .unwrap();
        assert!(created);
        let (q, created) = upsert_pull_request(&forge, "ccluster/w", &settings("two"))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!((p.number, q.title.as_str()), (1, "two"));
        // The listing missed it: the creation is refused, and the one there is updated.
        *forge.blind_once.borrow_mut() = true;
        let (r, created) = upsert_pull_request(&forge, "ccluster/w", &settings("three"))
            .await
            .unwrap();
        assert!(!created);
        assert_eq!((r.number, forge.pulls.borrow().len()), (1, 1));
        assert_eq!(
            *forge.calls.borrow(),
            [
                "find",
                "create",
                "labels 1 ccluster",
                "find",
                "update 1",
                "labels 1 ccluster",
                "find",
                "create",
                "find",
                "update 1",
                "labels 1 ccluster",
            ]
        );
    }

    #[tokio::test]
    async fn a_new_review_retires_the_earlier_ones() {
        let forge = Memory::default();
        let review = |body: &str| NewReview {
            commit_id: "h".into(),
            body: format!("{MARKER}\n{body}"),
            comments: vec![InlineComment {
                path: "a".into(),
                line: 1,
                side: "RIGHT",
                body: "x".into(),
            }],
        };
        forge.reviews.borrow_mut().push((
            Review {
                id: 7,
                body: format!("{MARKER}\npending"),
                state: "PENDING".into(),
            },
            vec![],
        ));
        let (first, retired) = post_review(&forge, 1, &review("first")).await.unwrap();
        assert_eq!(retired, 1);
        let (_, retired) = post_review(&forge, 1, &review("second")).await.unwrap();
        assert_eq!(retired, 1);
        let reviews = forge.reviews.borrow();
        let old = reviews.iter().find(|(r, _)| r.id == first.id).unwrap();
        assert_eq!(old.0.body, SUPERSEDED);
        assert!(old.1.is_empty(), "its comments are deleted");
        assert!(
            !reviews.iter().any(|(r, _)| r.id == 7),
            "the pending one is deleted"
        );
    }
}
