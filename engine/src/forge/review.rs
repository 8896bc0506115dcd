//! Review findings → one pull request review, as pure functions: which findings become inline
//! comments (those on a line the diff shows), what the summary says (every other finding), and
//! which of ccluster's earlier reviews to retire so that posting again replaces instead of piling
//! up.

use serde::Deserialize;

use super::diff::Commentable;
use super::{InlineComment, NewReview, Review};

/// Hidden in the body of every review ccluster posts: how it finds its own reviews again.
pub const MARKER: &str = "<!-- ccluster:review -->";
/// What a retired review's body becomes (it does not contain [`MARKER`]: retired once is enough).
pub const SUPERSEDED: &str =
    "<!-- ccluster:review:superseded -->\n*Superseded by a newer ccluster review.*";

/// One finding, as `builtin:review`'s reviewers report them (`output_schema` of its `review`
/// task), with the angle it came from.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Finding {
    #[serde(default)]
    pub angle: String,
    pub severity: String,
    pub file: String,
    #[serde(default)]
    pub line: Option<u64>,
    pub message: String,
}

/// One reviewer's output: `{ "angle": ..., "findings": [...] }`.
#[derive(Clone, Debug, Deserialize)]
pub struct AngleOutput {
    pub angle: String,
    #[serde(default)]
    pub findings: Vec<Finding>,
}

impl AngleOutput {
    /// The findings with their angle filled in.
    pub fn into_findings(self) -> Vec<Finding> {
        let angle = self.angle;
        self.findings
            .into_iter()
            .map(|mut f| {
                if f.angle.is_empty() {
                    f.angle = angle.clone();
                }
                f
            })
            .collect()
    }
}

fn severity_rank(severity: &str) -> u8 {
    match severity {
        "high" => 0,
        "medium" => 1,
        "low" => 2,
        _ => 3,
    }
}

/// `./src/x.rs` and `/src/x.rs` name the diff's `src/x.rs`.
fn normalize_path(path: &str) -> &str {
    let path = path.trim();
    let path = path.strip_prefix("./").unwrap_or(path);
    path.trim_start_matches('/')
}

/// The review for `findings` on a pull request whose head is `head_sha` and whose diff shows
/// `commentable`: a finding whose file and line are in the diff becomes an inline comment on
/// the `RIGHT` side; every other finding is listed in the summary. `source` says where the
/// findings came from (a run id).
pub fn build_review(
    findings: &[Finding],
    commentable: &Commentable,
    head_sha: &str,
    source: &str,
) -> NewReview {
    let mut sorted: Vec<&Finding> = findings.iter().collect();
    // Most severe first; equal ones keep the reviewers' order.
    sorted.sort_by_key(|f| severity_rank(&f.severity));
    let mut comments = Vec::new();
    let mut elsewhere = Vec::new();
    for f in sorted {
        let path = normalize_path(&f.file);
        match f.line {
            Some(line) if commentable.contains(path, line) => comments.push(InlineComment {
                path: path.to_string(),
                line,
                side: "RIGHT",
                body: format!("**{}** ({}): {}", f.severity, f.angle, f.message),
            }),
            _ => elsewhere.push(f),
        }
    }
    let mut body = format!("{MARKER}\n## ccluster review\n\n");
    if findings.is_empty() {
        body.push_str("No findings.\n");
    } else {
        let count = |s: &str| findings.iter().filter(|f| f.severity == s).count();
        body.push_str(&format!(
            "{} finding{}: {} high, {} medium, {} low; {} inline, {} below.\n",
            findings.len(),
            if findings.len() == 1 { "" } else { "s" },
            count("high"),
            count("medium"),
            count("low"),
            comments.len(),
            elsewhere.len()
        ));
    }
    if !elsewhere.is_empty() {
        body.push_str("\n### Findings outside the diff\n\n");
        for f in elsewhere {
            let place = match f.line {
                Some(line) => format!("`{}:{line}`", normalize_path(&f.file)),
                None => format!("`{}`", normalize_path(&f.file)),
            };
            // One line per finding: a message's own newlines would break the list.
            let message = f.message.replace('\n', " ");
            body.push_str(&format!(
                "- **{}** ({}) {place}: {message}\n",
                f.severity, f.angle
            ));
        }
    }
    body.push_str(&format!("\n<sub>From ccluster run `{source}`.</sub>\n"));
    NewReview {
        commit_id: head_sha.to_string(),
        body,
        comments,
    }
}

/// What to do with one of ccluster's earlier reviews once the new one is posted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Retire {
    /// Not submitted yet: GitHub lets it be deleted.
    DeletePending(u64),
    /// Submitted: GitHub keeps submitted reviews, so its body becomes [`SUPERSEDED`] and its
    /// inline comments are deleted.
    Supersede(u64),
}

/// ccluster's earlier reviews among `reviews` (by [`MARKER`]), other than `keep`, and how to
/// retire each.
pub fn retire_earlier(reviews: &[Review], keep: Option<u64>) -> Vec<Retire> {
    reviews
        .iter()
        .filter(|r| Some(r.id) != keep && r.body.contains(MARKER))
        .map(|r| {
            if r.state == "PENDING" {
                Retire::DeletePending(r.id)
            } else {
                Retire::Supersede(r.id)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(severity: &str, file: &str, line: Option<u64>, message: &str) -> Finding {
        Finding {
            angle: "correctness".into(),
            severity: severity.into(),
            file: file.into(),
            line,
            message: message.into(),
        }
    }

    const DIFF: &str = "\
diff --git a/src/lib.rs b/src/lib.rs
--- a/src/lib.rs
+++ b/src/lib.rs
@@ -1,2 +1,3 @@
 fn one() {}
+fn two() {}
 fn three() {}
";

    #[test]
    fn findings_in_the_diff_go_inline_on_the_right_and_the_rest_to_the_summary() {
        let c = Commentable::from_unified_diff(DIFF);
        let findings = vec![
            finding("low", "./src/lib.rs", Some(3), "context line"),
            finding("high", "src/lib.rs", Some(2), "added line"),
            finding("medium", "src/lib.rs", Some(40), "not in a hunk"),
            finding("high", "README.md", None, "no line"),
        ];
        let review = build_review(&findings, &c, "abc123", "run-1");
        assert_eq!(review.commit_id, "abc123");
        let places: Vec<(&str, u64, &str)> = review
            .comments
            .iter()
            .map(|c| (c.path.as_str(), c.line, c.side))
            .collect();
        assert_eq!(
            places,
            vec![("src/lib.rs", 2, "RIGHT"), ("src/lib.rs", 3, "RIGHT")]
        );
        assert_eq!(
            review.comments[0].body,
            "**high** (correctness): added line"
        );
        assert!(review.body.starts_with(MARKER));
        assert!(review
            .body
            .contains("4 findings: 2 high, 1 medium, 1 low; 2 inline, 2 below."));
        assert!(review.body.contains("`README.md`: no line"));
        assert!(review.body.contains("`src/lib.rs:40`: not in a hunk"));
        assert!(!review.body.contains("added line"));
    }

    #[test]
    fn no_findings_is_said() {
        let review = build_review(&[], &Commentable::default(), "abc", "run-1");
        assert!(review.comments.is_empty());
        assert!(review.body.contains("No findings."));
    }

    #[test]
    fn only_cclusters_earlier_reviews_are_retired_as_github_permits() {
        let review = |id, body: &str, state: &str| Review {
            id,
            body: body.into(),
            state: state.into(),
        };
        let reviews = vec![
            review(1, &format!("{MARKER}\nold"), "COMMENTED"),
            review(2, "a person's review", "APPROVED"),
            review(3, &format!("{MARKER}\ndraft"), "PENDING"),
            review(4, SUPERSEDED, "COMMENTED"),
            review(5, &format!("{MARKER}\nnew"), "COMMENTED"),
        ];
        assert_eq!(
            retire_earlier(&reviews, Some(5)),
            vec![Retire::Supersede(1), Retire::DeletePending(3)]
        );
    }
}
