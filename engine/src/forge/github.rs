//! GitHub (and GitHub Enterprise, through its API base URL) behind the [`Forge`] seam, with
//! octocrab as the client: it carries the token, the base URL and GitHub's error bodies and
//! rate-limit headers; ccluster reads only the fields it needs from the JSON answers, so new or
//! missing optional fields in a GitHub Enterprise version do not break it.

use std::time::Duration;

use octocrab::Octocrab;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use super::{Forge, ForgeError, NewPullRequest, NewReview, PullRequest, RepoId, Review};

/// GitHub's public API; GitHub Enterprise Server's is `https://HOST/api/v3`.
pub const DEFAULT_API_URL: &str = "https://api.github.com";

/// The REST API version ccluster's requests follow.
const API_VERSION: &str = "2022-11-28";

/// A repository on GitHub, with a client that holds the token.
pub struct GitHub {
    client: Octocrab,
    repo: RepoId,
    /// Where the token came from (`GITHUB_TOKEN`), for the 401 message; never the token.
    token_name: String,
}

#[derive(Deserialize)]
struct PullJson {
    number: u64,
    html_url: String,
    title: String,
    state: String,
    #[serde(default)]
    draft: Option<bool>,
    head: RefJson,
    base: RefJson,
}

#[derive(Deserialize)]
struct RefJson {
    #[serde(rename = "ref")]
    name: String,
    sha: String,
}

impl From<PullJson> for PullRequest {
    fn from(p: PullJson) -> PullRequest {
        PullRequest {
            number: p.number,
            url: p.html_url,
            title: p.title,
            state: p.state,
            draft: p.draft.unwrap_or(false),
            head_ref: p.head.name,
            head_sha: p.head.sha,
            base_ref: p.base.name,
            base_sha: p.base.sha,
        }
    }
}

#[derive(Deserialize)]
struct ReviewJson {
    id: u64,
    #[serde(default)]
    body: Option<String>,
    state: String,
}

impl From<ReviewJson> for Review {
    fn from(r: ReviewJson) -> Review {
        Review {
            id: r.id,
            body: r.body.unwrap_or_default(),
            state: r.state,
        }
    }
}

#[derive(Deserialize)]
struct IdJson {
    id: u64,
}

impl GitHub {
    /// A client of `repo` at `api_url` (no request is made yet).
    pub fn new(
        api_url: &str,
        token: &str,
        token_name: &str,
        repo: RepoId,
    ) -> Result<GitHub, ForgeError> {
        let other = |message: String| ForgeError::Other {
            what: "setting up the GitHub client".into(),
            message,
        };
        let client = Octocrab::builder()
            .base_uri(api_url.trim_end_matches('/'))
            .map_err(|e| other(format!("`{api_url}` is not a URL: {e}")))?
            .personal_token(token.to_string())
            // A forge that stops answering fails the command instead of hanging it.
            .set_connect_timeout(Some(Duration::from_secs(30)))
            .set_read_timeout(Some(Duration::from_secs(120)))
            .set_write_timeout(Some(Duration::from_secs(120)))
            .add_header(
                http::HeaderName::from_static("x-github-api-version"),
                API_VERSION.into(),
            )
            .build()
            .map_err(|e| other(e.to_string()))?;
        Ok(GitHub {
            client,
            repo,
            token_name: token_name.into(),
        })
    }

    fn route(&self, rest: &str) -> String {
        format!("/repos/{}/{}{rest}", self.repo.owner, self.repo.name)
    }

    /// An octocrab error in ccluster's words; `what` names the request (`creating the pull
    /// request on acme/widgets`).
    fn error(&self, what: String, e: octocrab::Error) -> ForgeError {
        let octocrab::Error::GitHub { source, .. } = e else {
            // Connection errors and the like: octocrab's text and its causes (`client error
            // (Connect)` alone does not say "connection refused"), with any secret masked.
            let mut message = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                let text = c.to_string();
                if !message.contains(&text) {
                    message = format!("{message}: {text}");
                }
                cause = c.source();
            }
            let message = crate::secrets::redact_text(&message).into_owned();
            return match e {
                octocrab::Error::Service { .. } | octocrab::Error::Hyper { .. } => {
                    ForgeError::Unreachable { what, message }
                }
                _ => ForgeError::Other { what, message },
            };
        };
        let header = |name: &str| {
            source
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let details: Vec<String> = source
            .errors
            .iter()
            .flatten()
            .map(|e| match e.get("message").and_then(|m| m.as_str()) {
                Some(m) => m.to_string(),
                None => e.to_string(),
            })
            .collect();
        let message = if details.is_empty() {
            source.message.clone()
        } else {
            format!("{}: {}", source.message, details.join("; "))
        };
        let message = crate::secrets::redact_text(&message).into_owned();
        match source.status_code.as_u16() {
            401 => ForgeError::Unauthorized {
                token: self.token_name.clone(),
            },
            // GitHub answers a spent primary limit with 403 (or 429) and `x-ratelimit-remaining:
            // 0`; a secondary limit says so in its message.
            403 | 429
                if header("x-ratelimit-remaining").as_deref() == Some("0")
                    || message.to_ascii_lowercase().contains("rate limit") =>
            {
                // A secondary limit says how long to wait in `retry-after` (seconds) instead.
                let retry_after = header("retry-after")
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .and_then(|secs| {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .ok()?;
                        Some(now.as_secs() + secs)
                    });
                ForgeError::RateLimited {
                    reset: source.rate_limit_reset.or(retry_after),
                }
            }
            403 => ForgeError::Forbidden { what, message },
            404 => ForgeError::NotFound { what },
            422 if message.contains("already exists") => ForgeError::AlreadyExists { message },
            422 => ForgeError::Invalid { what, message },
            status => ForgeError::Other {
                what,
                message: format!("the forge answered {status}: {message}"),
            },
        }
    }

    async fn get<T: DeserializeOwned>(&self, what: String, route: String) -> Result<T, ForgeError> {
        self.client
            .get(route, None::<&()>)
            .await
            .map_err(|e| self.error(what, e))
    }
}

impl Forge for GitHub {
    async fn find_pull_request(&self, branch: &str) -> Result<Option<PullRequest>, ForgeError> {
        let head = format!("{}:{branch}", self.repo.owner);
        let query = [
            ("state", "open"),
            ("head", head.as_str()),
            ("per_page", "100"),
        ];
        let pulls: Vec<PullJson> = self
            .client
            .get(self.route("/pulls"), Some(&query))
            .await
            .map_err(|e| self.error(format!("the pull requests of {}", self.repo), e))?;
        // The filter is GitHub's; checking the head again costs nothing.
        Ok(pulls
            .into_iter()
            .find(|p| p.head.name == branch)
            .map(PullRequest::from))
    }

    async fn get_pull_request(&self, number: u64) -> Result<PullRequest, ForgeError> {
        let pull: PullJson = self
            .get(
                format!("pull request #{number} of {}", self.repo),
                self.route(&format!("/pulls/{number}")),
            )
            .await?;
        Ok(pull.into())
    }

    async fn pull_request_diff(&self, number: u64) -> Result<String, ForgeError> {
        self.client
            .pulls(&self.repo.owner, &self.repo.name)
            .get_diff(number)
            .await
            .map_err(|e| self.error(format!("the diff of pull request #{number}"), e))
    }

    async fn create_pull_request(&self, new: &NewPullRequest) -> Result<PullRequest, ForgeError> {
        let body = json!({
            "title": new.title,
            "head": new.head,
            "base": new.base,
            "body": new.body,
            "draft": new.draft,
            "maintainer_can_modify": false,
        });
        let pull: PullJson = self
            .client
            .post(self.route("/pulls"), Some(&body))
            .await
            .map_err(|e| self.error(format!("opening a pull request on {}", self.repo), e))?;
        Ok(pull.into())
    }

    async fn update_pull_request(
        &self,
        number: u64,
        title: &str,
        body: &str,
    ) -> Result<PullRequest, ForgeError> {
        let pull: PullJson = self
            .client
            .patch(
                self.route(&format!("/pulls/{number}")),
                Some(&json!({ "title": title, "body": body })),
            )
            .await
            .map_err(|e| self.error(format!("updating pull request #{number}"), e))?;
        Ok(pull.into())
    }

    async fn add_labels(&self, number: u64, labels: &[String]) -> Result<(), ForgeError> {
        let _: serde_json::Value = self
            .client
            .post(
                self.route(&format!("/issues/{number}/labels")),
                Some(&json!({ "labels": labels })),
            )
            .await
            .map_err(|e| self.error(format!("labelling pull request #{number}"), e))?;
        Ok(())
    }

    async fn request_reviewers(&self, number: u64, reviewers: &[String]) -> Result<(), ForgeError> {
        // `org/team` names a team; anything else a user.
        let (teams, users): (Vec<&String>, Vec<&String>) =
            reviewers.iter().partition(|r| r.contains('/'));
        let teams: Vec<&str> = teams
            .iter()
            .filter_map(|t| t.split_once('/').map(|(_, slug)| slug))
            .collect();
        let mut body = json!({ "reviewers": users });
        if !teams.is_empty() {
            body["team_reviewers"] = json!(teams);
        }
        let _: serde_json::Value = self
            .client
            .post(
                self.route(&format!("/pulls/{number}/requested_reviewers")),
                Some(&body),
            )
            .await
            .map_err(|e| {
                self.error(
                    format!("requesting reviewers for pull request #{number}"),
                    e,
                )
            })?;
        Ok(())
    }

    async fn list_reviews(&self, number: u64) -> Result<Vec<Review>, ForgeError> {
        let reviews: Vec<ReviewJson> = self
            .get(
                format!("the reviews of pull request #{number}"),
                self.route(&format!("/pulls/{number}/reviews?per_page=100")),
            )
            .await?;
        Ok(reviews.into_iter().map(Review::from).collect())
    }

    async fn create_review(&self, number: u64, review: &NewReview) -> Result<Review, ForgeError> {
        let body = json!({
            "commit_id": review.commit_id,
            "body": review.body,
            "event": "COMMENT",
            "comments": review.comments,
        });
        let created: ReviewJson = self
            .client
            .post(self.route(&format!("/pulls/{number}/reviews")), Some(&body))
            .await
            .map_err(|e| self.error(format!("posting a review on pull request #{number}"), e))?;
        Ok(created.into())
    }

    async fn update_review(&self, number: u64, id: u64, body: &str) -> Result<(), ForgeError> {
        let _: ReviewJson = self
            .client
            .put(
                self.route(&format!("/pulls/{number}/reviews/{id}")),
                Some(&json!({ "body": body })),
            )
            .await
            .map_err(|e| self.error(format!("updating review {id}"), e))?;
        Ok(())
    }

    async fn delete_pending_review(&self, number: u64, id: u64) -> Result<(), ForgeError> {
        let _: ReviewJson = self
            .client
            .delete(
                self.route(&format!("/pulls/{number}/reviews/{id}")),
                None::<&()>,
            )
            .await
            .map_err(|e| self.error(format!("deleting pending review {id}"), e))?;
        Ok(())
    }

    async fn review_comment_ids(&self, number: u64, review: u64) -> Result<Vec<u64>, ForgeError> {
        let comments: Vec<IdJson> = self
            .get(
                format!("the comments of review {review}"),
                self.route(&format!(
                    "/pulls/{number}/reviews/{review}/comments?per_page=100"
                )),
            )
            .await?;
        Ok(comments.into_iter().map(|c| c.id).collect())
    }

    async fn delete_review_comment(&self, comment: u64) -> Result<(), ForgeError> {
        let what = || format!("deleting review comment {comment}");
        // 204 with no body: octocrab's raw call, then its error mapping.
        let response = self
            .client
            ._delete(
                self.route(&format!("/pulls/comments/{comment}")),
                None::<&()>,
            )
            .await
            .map_err(|e| self.error(what(), e))?;
        octocrab::map_github_error(response)
            .await
            .map_err(|e| self.error(what(), e))?;
        Ok(())
    }
}
