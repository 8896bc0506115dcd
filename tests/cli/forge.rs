//! `publish` and `review` against real git remotes (a bare repository served by `git daemon` on
//! 127.0.0.1) and a fake GitHub in this test process: it serves exactly the REST operations
//! ccluster uses and checks every request body and every response it sends against GitHub's
//! published OpenAPI description (a trimmed copy in `tests/fixtures/github/`). Results and review
//! findings come from rehearsed runs: the real `claude` CLI against the scripted model server.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::apply::Sandbox;
use crate::support::{claude_bin, git, root};

/// What the tests use as a token: long enough to be masked, easy to find in output.
const TOKEN: &str = "ghp_forgeTestToken0123456789abcdef";

// ---------------------------------------------------------------------------------------------
// GitHub's OpenAPI description, as schemas to validate against.

/// The trimmed description, with OpenAPI 3.0's `nullable` turned into JSON Schema.
fn spec() -> &'static Value {
    static SPEC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    SPEC.get_or_init(|| {
        let path = root().join("tests/fixtures/github/api.github.com.trimmed.json");
        let text = std::fs::read_to_string(&path).expect("the trimmed GitHub description");
        let mut spec: Value = serde_json::from_str(&text).unwrap();
        nullable_to_json_schema(&mut spec);
        spec
    })
}

/// OpenAPI 3.0 says `nullable: true` beside a type; JSON Schema says `null` is one of the types.
fn nullable_to_json_schema(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (_, child) in map.iter_mut() {
                nullable_to_json_schema(child);
            }
            if map.remove("nullable") == Some(Value::Bool(true)) {
                if let Some(Value::Array(values)) = map.get_mut("enum") {
                    values.push(Value::Null);
                }
                match map.get("type").cloned() {
                    Some(Value::String(t)) => {
                        map.insert("type".into(), json!([t, "null"]));
                    }
                    _ => {
                        let inner = Value::Object(std::mem::take(map));
                        map.insert("anyOf".into(), json!([inner, { "type": "null" }]));
                    }
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(nullable_to_json_schema),
        _ => {}
    }
}

/// Follows a `$ref` into the description (`#/components/responses/not_found`).
fn resolve(v: &Value) -> &Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => spec()
            .pointer(r.trim_start_matches('#'))
            .unwrap_or_else(|| panic!("no {r} in the description")),
        None => v,
    }
}

/// The problems of `instance` against `schema` (whose `$ref`s point into the description).
fn violations(schema: &Value, instance: &Value) -> Vec<String> {
    let mut root = schema.as_object().cloned().unwrap_or_default();
    root.insert("components".into(), spec()["components"].clone());
    let validator = jsonschema::validator_for(&Value::Object(root)).expect("a valid schema");
    validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .take(5)
        .collect()
}

/// The operation of the description that serves `method path`, and its path parameters.
fn operation(
    method: &str,
    path: &str,
) -> Option<(String, &'static Value, HashMap<String, String>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    for (template, item) in spec()["paths"].as_object()? {
        let parts: Vec<&str> = template.trim_matches('/').split('/').collect();
        if parts.len() != segments.len() {
            continue;
        }
        let mut params = HashMap::new();
        let fits = parts.iter().zip(&segments).all(|(t, s)| {
            match t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
                Some(name) => {
                    params.insert(name.to_string(), s.to_string());
                    true
                }
                None => t == s,
            }
        });
        if let (true, Some(op)) = (fits, item.get(method.to_ascii_lowercase())) {
            return Some((template.clone(), op, params));
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// The fake GitHub.

/// One request ccluster made.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    /// The operation's path template (`/repos/{owner}/{repo}/pulls`).
    operation: String,
    path: String,
    query: String,
    body: Value,
    authorization: String,
    api_version: String,
}

/// An answer to give once instead of the real one.
struct Fault {
    method: &'static str,
    /// The path template it applies to.
    operation: &'static str,
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
}

#[derive(Default)]
struct Hub {
    /// The API's base path (`/api/v3` on GitHub Enterprise Server; empty on github.com).
    prefix: String,
    /// The bare repository the pull requests' branches live in.
    bare: PathBuf,
    owner: String,
    repo: String,
    pulls: Vec<Value>,
    /// Per pull request number: its reviews.
    reviews: HashMap<u64, Vec<Value>>,
    /// Review comments, each with its review id.
    comments: Vec<Value>,
    next_id: u64,
    seen: Vec<Seen>,
    /// Requests or responses that do not match the description.
    violations: Vec<String>,
    faults: Vec<Fault>,
    /// Leave the open pull requests out of the next listing (as a listing that raced a creation).
    hide_next_listing: bool,
}

struct FakeGitHub {
    hub: Arc<Mutex<Hub>>,
    url: String,
    _thread: std::thread::JoinHandle<()>,
}

impl FakeGitHub {
    fn start(bare: &Path, owner: &str, repo: &str) -> FakeGitHub {
        FakeGitHub::start_at(bare, owner, repo, "")
    }

    /// With the API under `prefix`, as GitHub Enterprise Server's `/api/v3`.
    fn start_at(bare: &Path, owner: &str, repo: &str, prefix: &str) -> FakeGitHub {
        let hub = Arc::new(Mutex::new(Hub {
            prefix: prefix.into(),
            bare: bare.to_path_buf(),
            owner: owner.into(),
            repo: repo.into(),
            next_id: 1000,
            ..Hub::default()
        }));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}{prefix}", listener.local_addr().unwrap());
        let state = hub.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let app = axum::Router::new().fallback(handle).with_state(state);
                axum::serve(listener, app).await.unwrap();
            });
        });
        FakeGitHub {
            hub,
            url,
            _thread: thread,
        }
    }

    fn hub(&self) -> std::sync::MutexGuard<'_, Hub> {
        self.hub.lock().unwrap()
    }

    /// The requests since the last call, as `METHOD template`.
    fn take_seen(&self) -> Vec<Seen> {
        std::mem::take(&mut self.hub().seen)
    }

    fn assert_no_violations(&self) {
        let v = self.hub().violations.clone();
        assert!(
            v.is_empty(),
            "requests or responses off GitHub's description:\n{}",
            v.join("\n")
        );
    }
}

fn ops(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .map(|s| format!("{} {}", s.method, s.operation))
        .collect()
}

async fn handle(
    axum::extract::State(hub): axum::extract::State<Arc<Mutex<Hub>>>,
    request: axum::extract::Request,
) -> axum::response::Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    let method = parts.method.as_str().to_string();
    let path = parts.uri.path().to_string();
    let query = parts.uri.query().unwrap_or("").to_string();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut hub = hub.lock().unwrap();
    // GitHub Enterprise serves the API under `/api/v3`: the client must keep the base's path.
    let Some(path) = path.strip_prefix(hub.prefix.as_str()).map(str::to_owned) else {
        let problem = format!(
            "{method} {path}: not under the API's base path {}",
            hub.prefix
        );
        hub.violations.push(problem);
        return respond(404, vec![], json!({ "message": "Not Found" }));
    };
    let Some((template, op, params)) = operation(&method, &path) else {
        hub.violations.push(format!(
            "{method} {path}: not an operation ccluster should use"
        ));
        return respond(404, vec![], json!({ "message": "Not Found" }));
    };
    let body: Value = if bytes.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => {
                hub.violations
                    .push(format!("{method} {path}: body is not JSON: {e}"));
                Value::Null
            }
        }
    };
    hub.seen.push(Seen {
        method: method.clone(),
        operation: template.clone(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
        authorization: header("authorization"),
        api_version: header("x-github-api-version"),
    });
    // Its query parameters must be ones the operation declares, with values of their schema.
    for (name, value) in query.split('&').filter_map(|kv| kv.split_once('=')) {
        let declared = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(resolve)
            .find(|p| p["in"] == "query" && p["name"] == name);
        match declared {
            None => hub.violations.push(format!(
                "request {method} {path}: undeclared query parameter `{name}`"
            )),
            Some(p) => {
                // Query values are text: numbers are checked as numbers.
                let value = value
                    .parse::<i64>()
                    .map(Value::from)
                    .unwrap_or(json!(value));
                for v in violations(&p["schema"], &value) {
                    hub.violations
                        .push(format!("request {method} {path}: query `{name}`: {v}"));
                }
            }
        }
    }
    // The request against the operation's request body schema.
    if let Some(schema) = op
        .get("requestBody")
        .and_then(|b| b.pointer("/content/application~1json/schema"))
    {
        for v in violations(schema, &body) {
            hub.violations.push(format!("request {method} {path}: {v}"));
        }
    } else if !body.is_null() {
        hub.violations.push(format!(
            "request {method} {path}: a body where the operation takes none"
        ));
    }
    if params.get("owner").map(String::as_str) != Some(hub.owner.as_str())
        || params.get("repo").map(String::as_str) != Some(hub.repo.as_str())
    {
        return checked(
            &mut hub,
            op,
            &method,
            &path,
            404,
            vec![],
            json!({
                "message": "Not Found",
                "documentation_url": "https://docs.github.com/rest"
            }),
        );
    }
    if let Some(i) = hub
        .faults
        .iter()
        .position(|f| f.method == method && f.operation == template)
    {
        let f = hub.faults.remove(i);
        return checked(&mut hub, op, &method, &path, f.status, f.headers, f.body);
    }
    if header("authorization") != format!("Bearer {TOKEN}") {
        return checked(
            &mut hub,
            op,
            &method,
            &path,
            401,
            vec![],
            json!({
                "message": "Bad credentials",
                "documentation_url": "https://docs.github.com/rest"
            }),
        );
    }
    let number = |name: &str| {
        params
            .get(name)
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let (status, answer) = match (method.as_str(), template.as_str()) {
        ("GET", "/repos/{owner}/{repo}/pulls") => {
            let head = query_param(&query, "head");
            let hide = std::mem::take(&mut hub.hide_next_listing);
            let list: Vec<Value> = hub
                .pulls
                .iter()
                .filter(|p| !hide && p["state"] == "open")
                .filter(|p| head.is_empty() || p["head"]["label"] == head.as_str())
                .map(simple)
                .collect();
            (200, Value::Array(list))
        }
        ("POST", "/repos/{owner}/{repo}/pulls") => {
            let head = body["head"].as_str().unwrap_or("").to_string();
            if hub
                .pulls
                .iter()
                .any(|p| p["head"]["ref"] == head.as_str() && p["state"] == "open")
            {
                (
                    422,
                    json!({
                        "message": "Validation Failed",
                        "errors": [{ "resource": "PullRequest", "code": "custom",
                            "message": format!("A pull request already exists for {}:{head}.", hub.owner) }],
                        "documentation_url": "https://docs.github.com/rest/pulls/pulls#create-a-pull-request"
                    }),
                )
            } else {
                let number = hub.pulls.len() as u64 + 1;
                let pull = new_pull(&hub, number, &body);
                hub.pulls.push(pull.clone());
                (201, pull)
            }
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}") => {
            let n = number("pull_number");
            match hub.pulls.iter().find(|p| p["number"] == n).cloned() {
                Some(pull) if header("accept").contains("diff") => {
                    let diff = git(
                        &hub.bare,
                        &[
                            "diff",
                            &format!(
                                "{}...{}",
                                pull["base"]["sha"].as_str().unwrap(),
                                pull["head"]["sha"].as_str().unwrap()
                            ),
                        ],
                    );
                    // The diff media type is not JSON: nothing in the description to check it by.
                    return axum::response::Response::builder()
                        .status(200)
                        .header("content-type", "application/vnd.github.diff; charset=utf-8")
                        .body(axum::body::Body::from(diff))
                        .unwrap();
                }
                Some(pull) => (200, refresh(&hub, pull)),
                None => (
                    404,
                    json!({ "message": "Not Found", "documentation_url": "https://docs.github.com/rest" }),
                ),
            }
        }
        ("PATCH", "/repos/{owner}/{repo}/pulls/{pull_number}") => {
            let n = number("pull_number");
            let hubref = &mut *hub;
            match hubref.pulls.iter_mut().find(|p| p["number"] == n) {
                Some(p) => {
                    for key in ["title", "body", "state", "base"] {
                        if let Some(v) = body.get(key) {
                            p[key] = v.clone();
                        }
                    }
                    let p = p.clone();
                    (200, refresh(hubref, p))
                }
                None => (404, json!({ "message": "Not Found" })),
            }
        }
        ("POST", "/repos/{owner}/{repo}/issues/{issue_number}/labels") => {
            let n = number("issue_number");
            let template = spec()["components"]["examples"]["label-items"]["value"][0].clone();
            let names: Vec<String> = body["labels"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.as_str().map(str::to_owned))
                .collect();
            let hubref = &mut *hub;
            let Some(p) = hubref.pulls.iter_mut().find(|p| p["number"] == n) else {
                return respond(404, vec![], json!({ "message": "Not Found" }));
            };
            let mut labels: Vec<Value> = p["labels"].as_array().cloned().unwrap_or_default();
            for name in names {
                if !labels.iter().any(|l| l["name"] == name.as_str()) {
                    let mut l = template.clone();
                    l["name"] = json!(name);
                    labels.push(l);
                }
            }
            p["labels"] = Value::Array(labels.clone());
            (200, Value::Array(labels))
        }
        ("POST", "/repos/{owner}/{repo}/pulls/{pull_number}/requested_reviewers") => {
            let n = number("pull_number");
            let user = spec()["components"]["examples"]["pull-request"]["value"]["user"].clone();
            let hubref = &mut *hub;
            let Some(p) = hubref.pulls.iter_mut().find(|p| p["number"] == n) else {
                return respond(404, vec![], json!({ "message": "Not Found" }));
            };
            // GitHub refuses to ask the author; the description gives that 422 no body.
            if body["reviewers"]
                .as_array()
                .is_some_and(|r| r.iter().any(|r| *r == p["user"]["login"]))
            {
                return checked(&mut hub, op, &method, &path, 422, vec![], Value::Null);
            }
            let mut reviewers = p["requested_reviewers"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            for login in body["reviewers"].as_array().into_iter().flatten() {
                if !reviewers.iter().any(|r| r["login"] == *login) {
                    let mut u = user.clone();
                    u["login"] = login.clone();
                    reviewers.push(u);
                }
            }
            p["requested_reviewers"] = Value::Array(reviewers);
            let p = p.clone();
            (201, simple(&p))
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews") => {
            let n = number("pull_number");
            (
                200,
                Value::Array(hub.reviews.get(&n).cloned().unwrap_or_default()),
            )
        }
        ("POST", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews") => {
            let n = number("pull_number");
            hub.next_id += 1;
            let id = hub.next_id;
            let mut review =
                spec()["components"]["examples"]["pull-request-review"]["value"].clone();
            review["id"] = json!(id);
            review["body"] = body["body"].clone();
            review["commit_id"] = body["commit_id"].clone();
            review["state"] = json!(match body["event"].as_str() {
                Some("COMMENT") => "COMMENTED",
                Some("APPROVE") => "APPROVED",
                Some("REQUEST_CHANGES") => "CHANGES_REQUESTED",
                _ => "PENDING",
            });
            for c in body["comments"].as_array().cloned().unwrap_or_default() {
                hub.next_id += 1;
                let mut comment =
                    spec()["components"]["examples"]["review-comment-items"]["value"][0].clone();
                comment["id"] = json!(hub.next_id);
                comment["pull_request_review_id"] = json!(id);
                for key in ["path", "line", "side", "body"] {
                    comment[key] = c[key].clone();
                }
                hub.comments.push(comment);
            }
            hub.reviews.entry(n).or_default().push(review.clone());
            (200, review)
        }
        ("PUT", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews/{review_id}") => {
            let (n, id) = (number("pull_number"), number("review_id"));
            match hub
                .reviews
                .get_mut(&n)
                .and_then(|rs| rs.iter_mut().find(|r| r["id"] == id))
            {
                Some(r) => {
                    r["body"] = body["body"].clone();
                    (200, r.clone())
                }
                None => (404, json!({ "message": "Not Found" })),
            }
        }
        ("DELETE", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews/{review_id}") => {
            let (n, id) = (number("pull_number"), number("review_id"));
            let reviews = hub.reviews.entry(n).or_default();
            match reviews.iter().position(|r| r["id"] == id) {
                Some(i) if reviews[i]["state"] == "PENDING" => (200, reviews.remove(i)),
                Some(_) => (
                    422,
                    json!({ "message": "Unprocessable Entity", "errors": ["Can not delete a non-pending pull request review"] }),
                ),
                None => (404, json!({ "message": "Not Found" })),
            }
        }
        ("GET", "/repos/{owner}/{repo}/pulls/{pull_number}/reviews/{review_id}/comments") => {
            let id = number("review_id");
            let list: Vec<Value> = hub
                .comments
                .iter()
                .filter(|c| c["pull_request_review_id"] == id)
                .cloned()
                .collect();
            (200, Value::Array(list))
        }
        ("DELETE", "/repos/{owner}/{repo}/pulls/comments/{comment_id}") => {
            let id = number("comment_id");
            match hub.comments.iter().position(|c| c["id"] == id) {
                Some(i) => {
                    hub.comments.remove(i);
                    return checked(&mut hub, op, &method, &path, 204, vec![], Value::Null);
                }
                None => (404, json!({ "message": "Not Found" })),
            }
        }
        _ => (404, json!({ "message": "Not Found" })),
    };
    checked(&mut hub, op, &method, &path, status, vec![], answer)
}

fn query_param(query: &str, name: &str) -> String {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.replace("%3A", ":").replace("%2F", "/").replace('+', " "))
        .unwrap_or_default()
}

/// Checks the response against the operation's schema for its status, then sends it.
fn checked(
    hub: &mut Hub,
    op: &Value,
    method: &str,
    path: &str,
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
) -> axum::response::Response {
    let documented = op["responses"].get(status.to_string()).map(resolve);
    let schema = match documented {
        Some(r) => r.pointer("/content/application~1json/schema").cloned(),
        // Statuses an operation does not list (401, a rate-limited 403): GitHub's error body.
        None => Some(json!({ "$ref": "#/components/schemas/basic-error" })),
    };
    match (&schema, &body) {
        (Some(schema), body) => {
            for v in violations(schema, body) {
                hub.violations
                    .push(format!("response {status} to {method} {path}: {v}"));
            }
        }
        (None, Value::Null) => {}
        (None, _) => hub.violations.push(format!(
            "response {status} to {method} {path}: a body where none is described"
        )),
    }
    respond(status, headers, body)
}

fn respond(
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Value,
) -> axum::response::Response {
    let mut b = axum::response::Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(k, v);
    }
    if body.is_null() {
        return b.body(axum::body::Body::empty()).unwrap();
    }
    b.header("content-type", "application/json; charset=utf-8")
        .body(axum::body::Body::from(body.to_string()))
        .unwrap()
}

/// A new pull request from GitHub's own example, with what the request said.
fn new_pull(hub: &Hub, number: u64, body: &Value) -> Value {
    let mut p = spec()["components"]["examples"]["pull-request"]["value"].clone();
    let (owner, repo) = (&hub.owner, &hub.repo);
    let head = body["head"].as_str().unwrap_or("");
    let base = body["base"].as_str().unwrap_or("");
    p["number"] = json!(number);
    p["id"] = json!(number + 500);
    p["url"] = json!(format!(
        "https://api.github.com/repos/{owner}/{repo}/pulls/{number}"
    ));
    p["html_url"] = json!(format!("https://github.com/{owner}/{repo}/pull/{number}"));
    p["title"] = body["title"].clone();
    p["body"] = body["body"].clone();
    p["draft"] = json!(body["draft"].as_bool().unwrap_or(false));
    p["state"] = json!("open");
    p["labels"] = json!([]);
    p["requested_reviewers"] = json!([]);
    // GitHub's own example team lacks fields its schema requires: no teams here.
    p["requested_teams"] = json!([]);
    p["head"]["ref"] = json!(head);
    p["head"]["label"] = json!(format!("{owner}:{head}"));
    p["base"]["ref"] = json!(base);
    p["base"]["label"] = json!(format!("{owner}:{base}"));
    refresh(hub, p)
}

/// The pull request with its head and base commits as the repository has them now.
fn refresh(hub: &Hub, mut p: Value) -> Value {
    for side in ["head", "base"] {
        let name = p[side]["ref"].as_str().unwrap_or("").to_string();
        let sha = git(&hub.bare, &["rev-parse", &format!("refs/heads/{name}")]);
        p[side]["sha"] = json!(sha.trim());
    }
    p
}

/// A listing's item (`pull-request-simple`): the full object less what only `GET` gives.
fn simple(p: &Value) -> Value {
    let mut s = p.clone();
    if let Some(map) = s.as_object_mut() {
        for key in [
            "merged",
            "mergeable",
            "rebaseable",
            "mergeable_state",
            "merged_by",
            "comments",
            "review_comments",
            "maintainer_can_modify",
            "commits",
            "additions",
            "deletions",
            "changed_files",
        ] {
            map.remove(key);
        }
    }
    s
}

// ---------------------------------------------------------------------------------------------
// A git remote: a bare repository served by `git daemon` on 127.0.0.1.

struct Daemon {
    child: Child,
    url: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare repository `<base>/<owner>/<name>.git` served read-write over `git://`.
fn serve_git(base: &Path, owner: &str, name: &str) -> (PathBuf, Daemon) {
    let bare = base.join(owner).join(format!("{name}.git"));
    std::fs::create_dir_all(&bare).unwrap();
    git(&bare, &["init", "-q", "--bare", "-b", "main"]);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("git")
        .args([
            "daemon",
            "--reuseaddr",
            "--listen=127.0.0.1",
            &format!("--port={port}"),
            &format!("--base-path={}", base.display()),
            "--export-all",
            "--enable=receive-pack",
            "--informative-errors",
        ])
        .arg(base)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("git daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "git daemon never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("git://127.0.0.1:{port}/{owner}/{name}.git");
    (bare, Daemon { child, url })
}

// ---------------------------------------------------------------------------------------------
// The runs.

/// A workflow whose agent rewrites `src/lib.rs` in its worktree and whose git merge is the
/// result.
const WIDGETS: &str = r#"version = 1
[workflow]
name = "widgets"

[defaults]
timeout = "2m"

[tasks.edit]
prompt = "Add a function to src/lib.rs"

[tasks.merge]
needs = ["edit"]
merge = { strategy = "git" }
"#;

const LIB_BEFORE: &str = "pub fn one() -> u32 {\n    1\n}\n\npub fn three() -> u32 {\n    3\n}\n\npub fn four() -> u32 {\n    4\n}\n";
/// `two()` appended: lines 12 to 15 are added, 9 to 11 are the hunk's context, 1 is outside it.
const LIB_AFTER: &str = "pub fn one() -> u32 {\n    1\n}\n\npub fn three() -> u32 {\n    3\n}\n\npub fn four() -> u32 {\n    4\n}\n\npub fn two() -> u32 {\n    2\n}\n";

/// The rehearsed agent writes the new `src/lib.rs`.
fn edit_script() -> String {
    format!(
        "[tasks.edit]\nfiles = {{ \"src/lib.rs\" = {} }}\n",
        serde_json::to_string(LIB_AFTER).unwrap()
    )
}

/// Four reviewers (the default angles): two findings on lines of the diff, one on a line outside
/// any hunk, one on a file the change does not touch, and two angles with nothing to say.
fn review_script() -> String {
    let findings = [
        json!({ "angle": "correctness", "findings": [
            { "severity": "high", "file": "src/lib.rs", "line": 13, "message": "two() is never called" },
            { "severity": "low", "file": "src/lib.rs", "line": 1, "message": "one() could be const" },
        ]}),
        json!({ "angle": "security", "findings": [] }),
        json!({ "angle": "tests", "findings": [
            { "severity": "medium", "file": "src/lib.rs", "line": 10, "message": "four() and two() repeat each other" },
            { "severity": "medium", "file": "README.md", "message": "say what two() is for" },
        ]}),
        json!({ "angle": "docs", "findings": [] }),
    ];
    let mut script = String::new();
    for (i, f) in findings.iter().enumerate() {
        script.push_str(&format!(
            "[tasks.\"review[{i}]\"]\noutput = {}\n",
            toml_inline(f)
        ));
    }
    script
}

/// A JSON value as a TOML inline value.
fn toml_inline(v: &Value) -> String {
    match v {
        Value::Object(m) => format!(
            "{{ {} }}",
            m.iter()
                .map(|(k, v)| format!("{k} = {}", toml_inline(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Array(a) => format!(
            "[{}]",
            a.iter().map(toml_inline).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

/// A repository with `origin` at the daemon's URL and `main` pushed there.
fn widgets_repo(remote: &str) -> Sandbox {
    let s = Sandbox::in_repo(
        WIDGETS,
        &[("src/lib.rs", LIB_BEFORE), ("README.md", "widgets\n")],
    );
    git(s.path(), &["remote", "add", "origin", remote]);
    git(s.path(), &["push", "-q", "origin", "main"]);
    s
}

/// `ccluster ARGS` in the sandbox, with the forge's URL and the token.
fn forge_cmd(s: &Sandbox, hub: &FakeGitHub, args: &[&str]) -> (i32, String, String) {
    let out = s
        .command(args)
        .env("GITHUB_API_URL", &hub.url)
        .env("GITHUB_TOKEN", TOKEN)
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !stdout.contains(TOKEN) && !stderr.contains(TOKEN),
        "the token was shown:\n{stdout}\n{stderr}"
    );
    (out.status.code().unwrap_or(-1), stdout, stderr)
}

fn rehearsed_run(s: &Sandbox) {
    std::fs::write(s.path().join("edit.toml"), edit_script()).unwrap();
    let applied = crate::agents::rehearse(s, &["--script", "edit.toml"]);
    assert_eq!(applied.code, 0, "{}\n{}", applied.stdout, applied.stderr);
}

#[test]
fn forge_publish_opens_then_updates_one_pull_request_and_review_replaces_its_review() {
    let remotes = tempfile::tempdir().unwrap();
    let (bare, daemon) = serve_git(remotes.path(), "acme", "widgets");
    let hub = FakeGitHub::start(&bare, "acme", "widgets");
    let s = widgets_repo(&daemon.url);
    rehearsed_run(&s);
    let run = s.run_id();

    // First publish: the branch is created on the remote, the pull request opened with the
    // report as its body, then labelled and its reviewers requested.
    let (code, stdout, stderr) = forge_cmd(
        &s,
        &hub,
        &[
            "publish",
            "--pr",
            "--label",
            "ccluster",
            "--reviewer",
            "alice",
            "--base",
            "main",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("ccluster/widgets on origin: created at"),
        "{stdout}"
    );
    assert!(
        stdout.contains("opened pull request #1: https://github.com/acme/widgets/pull/1"),
        "{stdout}"
    );
    let report_json = s.command(&["report", &run, "-o", "json"]).output().unwrap();
    let report_json: Value = serde_json::from_slice(&report_json.stdout).unwrap();
    let result = report_json["result"]["commit"].as_str().unwrap();
    let pushed = git(&bare, &["rev-parse", "refs/heads/ccluster/widgets"]);
    assert_eq!(pushed.trim(), result);
    let seen = hub.take_seen();
    assert_eq!(
        ops(&seen),
        vec![
            "GET /repos/{owner}/{repo}/pulls",
            "POST /repos/{owner}/{repo}/pulls",
            "POST /repos/{owner}/{repo}/issues/{issue_number}/labels",
            "POST /repos/{owner}/{repo}/pulls/{pull_number}/requested_reviewers",
        ]
    );
    assert!(seen
        .iter()
        .all(|r| r.authorization == format!("Bearer {TOKEN}") && r.api_version == "2022-11-28"));
    assert!(
        seen[0].query.contains("head=acme%3Accluster%2Fwidgets")
            || seen[0].query.contains("head=acme:ccluster/widgets"),
        "{}",
        seen[0].query
    );
    let report = s.command(&["report", &run]).output().unwrap();
    let report = String::from_utf8_lossy(&report.stdout).into_owned();
    assert_eq!(seen[1].body["body"], report.as_str());
    assert_eq!(seen[1].body["title"], "ccluster: widgets");
    assert_eq!(seen[1].body["head"], "ccluster/widgets");
    assert_eq!(seen[1].body["base"], "main");
    assert_eq!(seen[2].body, json!({ "labels": ["ccluster"] }));
    assert_eq!(seen[3].body, json!({ "reviewers": ["alice"] }));

    // Second publish: the same branch (already there) and the same pull request, updated.
    let (code, stdout, stderr) =
        forge_cmd(&s, &hub, &["publish", "--pr", "--title", "Widgets: two()"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("ccluster/widgets on origin: already at"),
        "{stdout}"
    );
    assert!(stdout.contains("updated pull request #1"), "{stdout}");
    let seen = hub.take_seen();
    assert_eq!(
        ops(&seen),
        vec![
            "GET /repos/{owner}/{repo}/pulls",
            "PATCH /repos/{owner}/{repo}/pulls/{pull_number}",
        ]
    );
    assert_eq!(seen[1].path, "/repos/acme/widgets/pulls/1");
    assert_eq!(seen[1].body["title"], "Widgets: two()");
    assert_eq!(seen[1].body["body"], report.as_str());
    assert_eq!(hub.hub().pulls.len(), 1);

    // A review of the pull request: inline comments on the diff's lines (RIGHT side), the rest
    // in the summary.
    std::fs::write(s.path().join("review.toml"), review_script()).unwrap();
    let (code, stdout, stderr) = forge_cmd(
        &s,
        &hub,
        &[
            "review",
            "--pr",
            "1",
            "--rehearse",
            "--script",
            "review.toml",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("on pull request #1: 4 findings, 2 inline, 2 in the summary"),
        "{stdout}"
    );
    let seen = hub.take_seen();
    let posted: Vec<&Seen> = seen
        .iter()
        .filter(|r| r.method == "POST" && r.operation.ends_with("/reviews"))
        .collect();
    assert_eq!(posted.len(), 1, "{:?}", ops(&seen));
    let review = &posted[0].body;
    assert_eq!(review["event"], "COMMENT");
    assert_eq!(review["commit_id"], result);
    let places: Vec<(String, u64, String)> = review["comments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["path"].as_str().unwrap().to_string(),
                c["line"].as_u64().unwrap(),
                c["side"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        places,
        vec![
            ("src/lib.rs".to_string(), 13, "RIGHT".to_string()),
            ("src/lib.rs".to_string(), 10, "RIGHT".to_string()),
        ]
    );
    let body = review["body"].as_str().unwrap();
    insta::with_settings!({ filters => vec![(r"\d{8}-\d{6}\.\d{3}-[0-9a-f]{4}", "[run]")] }, {
        insta::assert_snapshot!("forge_review_body", body);
        insta::assert_json_snapshot!("forge_review_comments", review["comments"]);
    });
    assert!(body.starts_with("<!-- ccluster:review -->"), "{body}");
    assert!(
        body.contains("`src/lib.rs:1`: one() could be const"),
        "{body}"
    );
    assert!(
        body.contains("`README.md`: say what two() is for"),
        "{body}"
    );
    let first_review = hub.hub().reviews[&1][0]["id"].as_u64().unwrap();
    // A pending review of ccluster's (left by an interrupted post, say) is deleted, as GitHub
    // permits for pending reviews only; a person's review is left alone.
    {
        let mut h = hub.hub();
        let mut pending = spec()["components"]["examples"]["pull-request-review"]["value"].clone();
        pending["id"] = json!(77);
        pending["state"] = json!("PENDING");
        pending["body"] = json!("<!-- ccluster:review -->\nunfinished");
        let mut person = pending.clone();
        person["id"] = json!(78);
        person["state"] = json!("APPROVED");
        person["body"] = json!("LGTM");
        h.reviews.get_mut(&1).unwrap().extend([pending, person]);
    }

    // Posting again replaces it: the new review is posted, the old one (submitted, so it cannot
    // be deleted) says it is superseded and loses its inline comments.
    // (The same findings: the reviewers' results for an unchanged diff are cached.)
    let (code, stdout, stderr) = forge_cmd(
        &s,
        &hub,
        &[
            "review",
            "--pr",
            "1",
            "--rehearse",
            "--script",
            "review.toml",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("2 earlier ccluster reviews superseded"),
        "{stdout}"
    );
    let seen = hub.take_seen();
    let kinds = ops(&seen);
    let deleted: Vec<&str> = seen
        .iter()
        .filter(|r| r.method == "DELETE" && r.operation.ends_with("/reviews/{review_id}"))
        .map(|r| r.path.as_str())
        .collect();
    assert_eq!(deleted, vec!["/repos/acme/widgets/pulls/1/reviews/77"]);
    assert!(
        kinds.contains(
            &"PUT /repos/{owner}/{repo}/pulls/{pull_number}/reviews/{review_id}".to_string()
        ),
        "{kinds:?}"
    );
    assert_eq!(
        kinds
            .iter()
            .filter(|k| *k == "DELETE /repos/{owner}/{repo}/pulls/comments/{comment_id}")
            .count(),
        2
    );
    {
        let h = hub.hub();
        let reviews = &h.reviews[&1];
        // The first, the person's and the new one.
        assert_eq!(reviews.len(), 3);
        assert!(reviews.iter().any(|r| r["id"] == 78 && r["body"] == "LGTM"));
        let old = reviews.iter().find(|r| r["id"] == first_review).unwrap();
        assert!(
            old["body"].as_str().unwrap().contains("Superseded"),
            "{old}"
        );
        assert!(h
            .comments
            .iter()
            .all(|c| c["pull_request_review_id"] != first_review));
        assert_eq!(h.comments.len(), 2);
        let new_review = reviews
            .iter()
            .find(|r| r["id"] != first_review && r["id"] != 78)
            .unwrap()["id"]
            .clone();
        assert!(h
            .comments
            .iter()
            .all(|c| c["pull_request_review_id"] == new_review));
    }
    // Neither the runs nor the reviews left the token in the state directory.
    for file in crate::support::files_under(&s.path().join(".ccluster")) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(TOKEN),
            "{} holds the token",
            file.display()
        );
    }
    hub.assert_no_violations();
}

#[test]
fn forge_errors_are_said_plainly() {
    let remotes = tempfile::tempdir().unwrap();
    let (bare, daemon) = serve_git(remotes.path(), "acme", "widgets");
    // As on GitHub Enterprise Server: the API under `/api/v3` of its host.
    let hub = FakeGitHub::start_at(&bare, "acme", "widgets", "/api/v3");
    // A shell task's result: no agent needed to have something to publish.
    let s = Sandbox::in_repo(
        "version = 1\n[workflow]\nname = \"errs\"\n[tasks.edit]\nworkspace = \"worktree\"\nrun = \"echo two > two.txt\"\n[tasks.merge]\nneeds = [\"edit\"]\nmerge = { strategy = \"git\" }\n",
        &[("README.md", "errs\n")],
    );
    git(s.path(), &["remote", "add", "origin", &daemon.url]);
    git(s.path(), &["push", "-q", "origin", "main"]);
    let out = s.command(&["apply"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 401: a bad token.
    hub.hub().faults.push(Fault {
        method: "GET",
        operation: "/repos/{owner}/{repo}/pulls",
        status: 401,
        headers: vec![],
        body: json!({ "message": "Bad credentials", "documentation_url": "https://docs.github.com/rest" }),
    });
    let (code, _, stderr) = forge_cmd(&s, &hub, &["publish", "--pr", "--base", "main"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("the forge refused the token (401 Bad credentials): check that GITHUB_TOKEN holds a valid, unexpired token"),
        "{stderr}"
    );
    // The forge is asked before the push: nothing was pushed.
    assert!(git(&bare, &["branch", "--list", "ccluster/errs"])
        .trim()
        .is_empty());

    // 403 with the rate limit spent: when it resets.
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    hub.hub().faults.push(Fault {
        method: "GET",
        operation: "/repos/{owner}/{repo}/pulls",
        status: 403,
        headers: vec![
            ("x-ratelimit-limit", "5000".into()),
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", reset.to_string()),
        ],
        body: json!({ "message": "API rate limit exceeded for user ID 1.", "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api" }),
    });
    let (code, _, stderr) = forge_cmd(&s, &hub, &["publish", "--pr", "--base", "main"]);
    assert_eq!(code, 1, "{stderr}");
    let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(reset));
    assert!(
        stderr.contains(&format!(
            "the forge's rate limit is spent (403) until {at} (in "
        )),
        "{stderr}"
    );

    // 404: a repository the token cannot see.
    let (code, _, stderr) = forge_cmd(
        &s,
        &hub,
        &["publish", "--pr", "--base", "main", "--repo", "acme/hidden"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("was not found (404): the repository or pull request does not exist, or the token cannot see it"),
        "{stderr}"
    );
    let (code, _, stderr) = forge_cmd(&s, &hub, &["review", "--pr", "7"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("pull request #7 of acme/widgets was not found (404)"),
        "{stderr}"
    );

    // 422 "already exists": a pull request the listing missed is found and updated, not doubled.
    let (code, stdout, stderr) = forge_cmd(&s, &hub, &["publish", "--pr", "--base", "main"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("opened pull request #1"), "{stdout}");
    hub.hub().hide_next_listing = true;
    hub.take_seen();
    let (code, stdout, stderr) = forge_cmd(&s, &hub, &["publish", "--pr", "--base", "main"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("updated pull request #1"), "{stdout}");
    assert_eq!(
        ops(&hub.take_seen()),
        vec![
            "GET /repos/{owner}/{repo}/pulls",
            "POST /repos/{owner}/{repo}/pulls",
            "GET /repos/{owner}/{repo}/pulls",
            "PATCH /repos/{owner}/{repo}/pulls/{pull_number}",
        ]
    );
    assert_eq!(hub.hub().pulls.len(), 1);

    // A forge nobody answers at.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let (code, _, stderr) = forge_cmd(&s, &hub, &["publish", "--pr", "--api-url", &nowhere]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot reach the forge's API for the pull requests of acme/widgets"),
        "{stderr}"
    );

    // A reviewer GitHub refuses (the author): the pull request is open all the same, and said.
    let (code, stdout, stderr) = forge_cmd(
        &s,
        &hub,
        &["publish", "--pr", "--base", "main", "--reviewer", "octocat"],
    );
    assert_eq!(code, 1, "{stderr}");
    assert!(stdout.contains("updated pull request #1"), "{stdout}");
    assert!(
        stderr.contains("the forge refused requesting reviewers for pull request #1 (422)")
            && stderr.contains("(pull request #1 is open: https://github.com/acme/widgets/pull/1)"),
        "{stderr}"
    );

    // No token at all: said before anything is pushed (exit 2).
    let out = s
        .command(&["publish", "--pr", "--branch", "other"])
        .env("GITHUB_API_URL", &hub.url)
        .env_remove("GITHUB_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("no forge token: set the environment variable `GITHUB_TOKEN`"));
    assert!(git(&bare, &["branch", "--list", "other"]).trim().is_empty());

    // Someone else pushed to the branch: not overwritten without --force.
    let other = tempfile::tempdir().unwrap();
    git(other.path(), &["clone", "-q", &daemon.url, "c"]);
    let clone = other.path().join("c");
    git(&clone, &["checkout", "-q", "ccluster/errs"]);
    std::fs::write(clone.join("theirs.txt"), "theirs\n").unwrap();
    git(&clone, &["add", "theirs.txt"]);
    git(&clone, &["commit", "-q", "-m", "theirs"]);
    git(&clone, &["push", "-q", "origin", "ccluster/errs"]);
    let theirs = git(&clone, &["rev-parse", "HEAD"]);
    let (code, _, stderr) = forge_cmd(&s, &hub, &["publish"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("which ccluster did not push there"),
        "{stderr}"
    );
    assert_eq!(
        git(&bare, &["rev-parse", "refs/heads/ccluster/errs"]),
        theirs
    );
    let (code, stdout, stderr) = forge_cmd(&s, &hub, &["publish", "--force"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("updated"), "{stdout}");

    // A bad branch name is refused (exit 2).
    let (code, _, stderr) = forge_cmd(&s, &hub, &["publish", "--branch", "-x"]);
    assert_eq!(code, 2, "{stderr}");
    hub.assert_no_violations();
}

#[test]
fn forge_workflow_publish_opens_the_pull_request_when_the_run_succeeds() {
    let remotes = tempfile::tempdir().unwrap();
    let (bare, daemon) = serve_git(remotes.path(), "acme", "gadgets");
    let hub = FakeGitHub::start(&bare, "acme", "gadgets");
    // The token comes from a declared secret, read by `publish` only (no task lists it).
    let s = Sandbox::in_repo(
        r#"version = 1
[workflow]
name = "gadgets"
publish = { pr = true, base = "main", labels = ["automated"], token = "FORGE_TOKEN" }

[secrets.FORGE_TOKEN]
from = "env:MY_FORGE_TOKEN"

[tasks.edit]
workspace = "worktree"
run = "echo gadget > gadget.txt"

[tasks.merge]
needs = ["edit"]
merge = { strategy = "git" }
"#,
        &[("README.md", "gadgets\n")],
    );
    git(s.path(), &["remote", "add", "origin", &daemon.url]);
    git(s.path(), &["push", "-q", "origin", "main"]);

    // A rehearsal's result is made up: it is not published.
    let out = s
        .command(&["apply", "--rehearse"])
        .env("GITHUB_API_URL", &hub.url)
        .env("MY_FORGE_TOKEN", TOKEN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("a rehearsal is not published"));
    assert!(hub.take_seen().is_empty());

    let out = s
        .command(&["apply", "--fresh"])
        .env("GITHUB_API_URL", &hub.url)
        .env("MY_FORGE_TOKEN", TOKEN)
        .env_remove("GITHUB_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains(TOKEN) && !stderr.contains(TOKEN));
    assert!(
        stdout.contains("ccluster/gadgets on origin: created at"),
        "{stdout}"
    );
    assert!(stdout.contains("opened pull request #1"), "{stdout}");
    let seen = hub.take_seen();
    assert_eq!(
        ops(&seen),
        vec![
            "GET /repos/{owner}/{repo}/pulls",
            "POST /repos/{owner}/{repo}/pulls",
            "POST /repos/{owner}/{repo}/issues/{issue_number}/labels",
        ]
    );
    assert_eq!(seen[1].body["title"], "ccluster: gadgets");
    assert_eq!(seen[2].body, json!({ "labels": ["automated"] }));

    // A retry that succeeds publishes too: the same branch and pull request, updated.
    let out = s
        .command(&["retry", "--task", "edit"])
        .env("GITHUB_API_URL", &hub.url)
        .env("MY_FORGE_TOKEN", TOKEN)
        .output()
        .unwrap();
    let retried = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{retried}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(retried.contains("updated pull request #1"), "{retried}");
    assert_eq!(
        ops(&hub.take_seen()),
        vec![
            "GET /repos/{owner}/{repo}/pulls",
            "PATCH /repos/{owner}/{repo}/pulls/{pull_number}",
            "POST /repos/{owner}/{repo}/issues/{issue_number}/labels",
        ]
    );
    // Nothing ccluster wrote holds the token.
    for file in crate::support::files_under(&s.path().join(".ccluster")) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(TOKEN),
            "{} holds the token",
            file.display()
        );
    }
    hub.assert_no_violations();
}

/// docs/forges.md's worked example: `run --goal`, then `publish --pr --review`: an open pull
/// request titled with the goal, the report as its body, and a review with inline comments.
#[test]
fn forge_run_goal_to_a_reviewed_pull_request() {
    let remotes = tempfile::tempdir().unwrap();
    let (bare, daemon) = serve_git(remotes.path(), "acme", "greeter");
    let hub = FakeGitHub::start(&bare, "acme", "greeter");
    let s = Sandbox::new("");
    std::fs::remove_file(s.path().join("clusterfile.toml")).unwrap();
    s.file("README.md", "greeter\n").unwrap();
    s.file(".gitignore", ".ccluster/\n").unwrap();
    git(s.path(), &["init", "-q", "-b", "main"]);
    s.commit_all("init");
    git(s.path(), &["remote", "add", "origin", &daemon.url]);
    git(s.path(), &["push", "-q", "origin", "main"]);

    let goal = "Add a greeting to the README";
    let (code, stdout, stderr) = forge_cmd(&s, &hub, &["run", "--goal", goal, "--rehearse"]);
    assert_eq!(code, 0, "{stdout}\n{stderr}");

    // The rehearsed planner's note is in the change: a finding on its first line goes inline; one
    // on README.md (unchanged) goes to the summary.
    let findings = json!({ "angle": "docs", "findings": [
        { "severity": "medium", "file": ".ccluster-rehearsal/plan.md", "line": 1, "message": "say what the plan is for" },
        { "severity": "low", "file": "README.md", "line": 1, "message": "the README does not greet yet" },
    ]});
    let quiet = json!({ "angle": "other", "findings": [] });
    let mut script = format!(
        "[tasks.\"review[0]\"]\noutput = {}\n",
        toml_inline(&findings)
    );
    for i in 1..4 {
        script.push_str(&format!(
            "[tasks.\"review[{i}]\"]\noutput = {}\n",
            toml_inline(&quiet)
        ));
    }
    std::fs::write(s.path().join("review.toml"), script).unwrap();
    let (code, stdout, stderr) = forge_cmd(
        &s,
        &hub,
        &[
            "publish",
            "--pr",
            "--draft",
            "--review",
            "--rehearse",
            "--script",
            "review.toml",
        ],
    );
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert!(
        stdout.contains("ccluster/goal-add-a-greeting-to-the-readme on origin: created at"),
        "{stdout}"
    );
    assert!(stdout.contains("opened pull request #1"), "{stdout}");
    assert!(
        stdout.contains("2 findings, 1 inline, 1 in the summary"),
        "{stdout}"
    );
    let h = hub.hub();
    let pull = &h.pulls[0];
    assert_eq!(pull["title"], goal);
    assert_eq!(pull["draft"], true);
    assert_eq!(pull["base"]["ref"], "main", "the remote's default branch");
    assert!(pull["body"]
        .as_str()
        .unwrap()
        .contains("of `goal`: succeeded"));
    assert_eq!(h.comments.len(), 1);
    assert_eq!(h.comments[0]["path"], ".ccluster-rehearsal/plan.md");
    assert_eq!(h.comments[0]["line"], 1);
    assert_eq!(h.comments[0]["side"], "RIGHT");
    drop(h);
    hub.assert_no_violations();
}

#[test]
fn forge_publish_without_pr_pushes_to_a_bare_repository_on_disk() {
    let remotes = tempfile::tempdir().unwrap();
    let bare = remotes.path().join("plain.git");
    std::fs::create_dir_all(&bare).unwrap();
    git(&bare, &["init", "-q", "--bare", "-b", "main"]);
    let s = Sandbox::in_repo(
        "version = 1\n[workflow]\nname = \"plain\"\n[tasks.edit]\nworkspace = \"worktree\"\nrun = \"echo one > one.txt\"\n[tasks.merge]\nneeds = [\"edit\"]\nmerge = { strategy = \"git\" }\n",
        &[],
    );
    let out = s.command(&["apply"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let remote = bare.to_string_lossy().into_owned();
    // No forge, so no token needed: a plain push to a path.
    let out = s
        .command(&["publish", "--remote", &remote, "--branch", "results/plain"])
        .env_remove("GITHUB_TOKEN")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("results/plain on {remote}: created at")),
        "{stdout}"
    );
    let pushed = git(&bare, &["rev-parse", "refs/heads/results/plain"]);
    let recorded = git(
        s.path(),
        &["rev-parse", "refs/ccluster/published/results/plain"],
    );
    assert_eq!(pushed, recorded);
    assert_eq!(
        git(&bare, &["show", "refs/heads/results/plain:one.txt"]),
        "one\n"
    );
}

/// The fake's checks are not vacuous: off-description bodies and answers are caught.
#[test]
fn forge_fake_github_catches_what_is_off_the_description() {
    let (template, op, params) = operation("POST", "/repos/acme/widgets/pulls").unwrap();
    assert_eq!(template, "/repos/{owner}/{repo}/pulls");
    assert_eq!(params["owner"], "acme");
    let schema = op
        .pointer("/requestBody/content/application~1json/schema")
        .unwrap();
    assert!(violations(
        schema,
        &json!({ "title": "t", "head": "h", "base": "main" })
    )
    .is_empty());
    assert!(!violations(schema, &json!({ "title": "t", "base": "main" })).is_empty());
    assert!(!violations(
        schema,
        &json!({ "head": "h", "base": "main", "draft": "yes" })
    )
    .is_empty());
    let created = resolve(&op["responses"]["201"])
        .pointer("/content/application~1json/schema")
        .unwrap();
    let mut pull = spec()["components"]["examples"]["pull-request"]["value"].clone();
    pull["requested_teams"] = json!([]);
    assert!(
        violations(created, &pull).is_empty(),
        "{:?}",
        violations(created, &pull)
    );
    pull["number"] = json!("one");
    assert!(!violations(created, &pull).is_empty());
    let (_, review, _) = operation("POST", "/repos/acme/widgets/pulls/1/reviews").unwrap();
    let schema = review
        .pointer("/requestBody/content/application~1json/schema")
        .unwrap();
    // (The description leaves `side` a free string: the tests assert `RIGHT` themselves.)
    let comment = json!({ "path": "a", "line": 1, "side": "RIGHT", "body": "x" });
    let event = |e: &str| json!({ "event": e, "comments": [comment] });
    assert!(violations(schema, &event("COMMENT")).is_empty());
    assert!(!violations(schema, &event("LGTM")).is_empty());
    let no_body = json!({ "event": "COMMENT", "comments": [{ "path": "a", "line": 1 }] });
    assert!(!violations(schema, &no_body).is_empty());
    assert!(operation("POST", "/repos/acme/widgets/merges").is_none());
}
