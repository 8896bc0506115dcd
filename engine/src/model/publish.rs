//! `[workflow] publish = { ... }`: where a successful run's result goes (a branch of a git
//! remote, a pull request, a review), as written ([`RawPublish`], with spans) and as checked
//! ([`Publish`]). `ccluster publish` takes the same settings from its command line.

use schemars::JsonSchema;
use serde::Serialize;

use super::spanned::Spanned;
use crate::diagnostic::{Category, Diagnostic, Span};

/// Publish the result when a run succeeds: push it to a branch of a git remote and, with
/// `pr = true`, open or update that branch's pull request with the run's report as its body.
#[derive(Clone, Debug, Default, PartialEq, Serialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RawPublish {
    /// The git remote to push to: a remote's name or a URL (default `origin`).
    pub remote: Option<Spanned<String>>,
    /// The branch (default `ccluster/<workflow name>`, the same for every run: publishing
    /// again updates it and its pull request).
    pub branch: Option<Spanned<String>>,
    /// Open (or update) the branch's pull request (default `false`: push only).
    pub pr: Option<Spanned<bool>>,
    /// Open the pull request as a draft.
    pub draft: Option<Spanned<bool>>,
    /// The branch the pull request merges into (default: the remote's default branch).
    pub base: Option<Spanned<String>>,
    /// The pull request's title (default `ccluster: <workflow name>`).
    pub title: Option<Spanned<String>>,
    /// Labels added to the pull request.
    pub labels: Option<Spanned<Vec<Spanned<String>>>>,
    /// Users (or `org/team`) asked to review the pull request.
    pub reviewers: Option<Spanned<Vec<Spanned<String>>>>,
    /// Then run `builtin:review` on the pull request and post its review.
    pub review: Option<Spanned<bool>>,
    /// The repository on the forge, `owner/name` (default: read from the remote's URL).
    pub repo: Option<Spanned<String>>,
    /// The secret holding the forge token: a `[secrets.NAME]` declaration, else the
    /// environment variable NAME (default `GITHUB_TOKEN`).
    pub token: Option<Spanned<String>>,
    #[serde(skip)]
    #[schemars(skip)]
    pub span: Span,
}

/// `[workflow] publish`, checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Publish {
    pub remote: String,
    pub branch: Option<String>,
    pub pr: bool,
    pub draft: bool,
    pub base: Option<String>,
    pub title: Option<String>,
    pub labels: Vec<String>,
    pub reviewers: Vec<String>,
    pub review: bool,
    pub repo: Option<String>,
    pub token: String,
}

/// Checks `raw`, reporting each problem at its value.
pub fn resolve(raw: &RawPublish, diags: &mut Vec<Diagnostic>) -> Option<Publish> {
    let before = diags.len();
    let invalid = |span: Span, message: String, label: &str, help: &str| {
        Diagnostic::error(Category::InvalidValue, "invalid-publish", message)
            .at(span, label.to_string())
            .help(help.to_string())
    };
    if let Some(b) = &raw.branch {
        if let Err(e) = crate::workspace::RefName::branch(&b.value) {
            diags.push(invalid(
                b.span,
                format!("invalid publish branch: {e}"),
                "not a branch name",
                "a branch name as `git branch` takes it: `ccluster/widgets`",
            ));
        }
    }
    if let Some(r) = &raw.remote {
        if r.value.trim().is_empty() || r.value.starts_with('-') {
            diags.push(invalid(
                r.span,
                format!("invalid publish remote `{}`", r.value.escape_debug()),
                "not a remote",
                "a remote's name (`origin`) or a URL",
            ));
        }
    }
    if let Some(r) = &raw.repo {
        if let Err(e) = crate::forge::RepoId::parse(&r.value) {
            diags.push(invalid(
                r.span,
                format!("invalid publish repo: {e}"),
                "not `owner/name`",
                "the repository on the forge, as `owner/name`",
            ));
        }
    }
    if let Some(t) = &raw.token {
        if !crate::secrets::is_env_name(&t.value) {
            diags.push(invalid(
                t.span,
                format!("invalid publish token `{}`", t.value.escape_debug()),
                "not a secret name",
                "the name of a `[secrets.NAME]` declaration or an environment variable: `GITHUB_TOKEN`",
            ));
        }
    }
    let pr = raw.pr.as_ref().is_some_and(|p| p.value);
    if !pr {
        // Settings of the pull request without one: surely a forgotten `pr = true`.
        let set_bool = |b: &Option<Spanned<bool>>| b.as_ref().filter(|b| b.value).map(|b| b.span);
        let set_text = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.span);
        let set_list = |l: &Option<Spanned<Vec<Spanned<String>>>>| l.as_ref().map(|l| l.span);
        for (key, span) in [
            ("draft", set_bool(&raw.draft)),
            ("review", set_bool(&raw.review)),
            ("base", set_text(&raw.base)),
            ("title", set_text(&raw.title)),
            ("labels", set_list(&raw.labels)),
            ("reviewers", set_list(&raw.reviewers)),
        ] {
            if let Some(span) = span {
                diags.push(invalid(
                    span,
                    format!(
                        "publish `{key}` is a setting of the pull request, and `pr` is not `true`"
                    ),
                    "needs `pr = true`",
                    "add `pr = true` to `publish`, or leave this out",
                ));
            }
        }
    }
    if diags[before..].iter().any(|d| d.is_error()) {
        return None;
    }
    let text = |s: &Option<Spanned<String>>| s.as_ref().map(|s| s.value.clone());
    let list = |l: &Option<Spanned<Vec<Spanned<String>>>>| {
        l.as_ref()
            .map(|l| l.value.iter().map(|s| s.value.clone()).collect())
            .unwrap_or_default()
    };
    Some(Publish {
        remote: text(&raw.remote).unwrap_or_else(|| "origin".into()),
        branch: text(&raw.branch),
        pr,
        draft: raw.draft.as_ref().is_some_and(|d| d.value),
        base: text(&raw.base),
        title: text(&raw.title),
        labels: list(&raw.labels),
        reviewers: list(&raw.reviewers),
        review: raw.review.as_ref().is_some_and(|r| r.value),
        repo: text(&raw.repo),
        token: text(&raw.token).unwrap_or_else(|| "GITHUB_TOKEN".into()),
    })
}
