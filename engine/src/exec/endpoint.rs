//! The git endpoint of a run whose pods cannot see the driver's disk: it serves the repository to
//! the run's pods over git's smart HTTP protocol (through `git http-backend`), behind a per-run
//! token, lets them push only to the run's own refs, and optionally relays the model API to them.
//!
//! What pods reach is a **transport repository**, a bare repository under the state directory that
//! borrows the served repository's objects (`objects/info/alternates`): nothing is copied when it
//! starts, pushed objects land in it (never in the user's repository), and only its own refs, the
//! start commits [`Endpoint::offer`] named, are advertised. [`Endpoint::take`] brings a pushed
//! commit into the served repository.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{
    header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode,
};
use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::workspace::git_sync;
use crate::workspace::names::{is_object_id, RefName};

/// The identity `git http-backend` records for the pods (`REMOTE_USER`): receive-pack is only
/// enabled over HTTP for an authenticated user, and every request that reaches it has passed the
/// token check.
const POD_USER: &str = "ccluster-pod";

/// The largest CGI header block read from `git http-backend` before its body.
const MAX_CGI_HEAD: usize = 64 << 10;

/// Headers that belong to one connection and are never forwarded by the model relay (RFC 9110
/// 7.6.1), besides `Host`, which names the model API instead.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// The `pre-receive` hook of the transport repository. Pods may only create or move refs of their
/// run (`refs/ccluster/<run>/...`, not its `start/` refs) to commits, never delete a ref; and a
/// pushed ref may only reach objects the pod was given (reachable from the transport's refs) or
/// sent itself (in the push's quarantine). The last rule matters because the transport repository
/// sees all of the user's objects through its alternates: without it, a pod that knows the id of a
/// commit it was not given could point a ref at it and fetch it through that ref.
const PRE_RECEIVE: &str = r#"#!/bin/sh
# Written by ccluster: the refs and objects the run's pods may push.
prefix="$1"
zero=$(git hash-object --stdin </dev/null | tr 0-9a-f 0)
status=0
while read -r old new ref; do
    case "$ref" in
    "${prefix}start/"*) echo "ccluster: refusing $ref: the start refs of the run are read-only" >&2; status=1; continue ;;
    "$prefix"?*) ;;
    *) echo "ccluster: refusing $ref: pods may only push to ${prefix}<name>" >&2; status=1; continue ;;
    esac
    if [ "$new" = "$zero" ]; then
        echo "ccluster: refusing to delete $ref" >&2; status=1; continue
    fi
    if [ "$(git cat-file -t "$new" 2>/dev/null)" != commit ]; then
        echo "ccluster: refusing $ref: it must point at a commit" >&2; status=1; continue
    fi
    # Objects the push makes reachable that were not reachable from the transport's refs must
    # have come with the push itself.
    missing=$(git rev-list --objects "$new" --not --all | cut -d' ' -f1 |
        GIT_OBJECT_DIRECTORY="$GIT_QUARANTINE_PATH" GIT_ALTERNATE_OBJECT_DIRECTORIES= \
        git cat-file --batch-check='%(objectname)' | grep -c ' missing$')
    if [ -z "$GIT_QUARANTINE_PATH" ] || [ "$missing" != 0 ]; then
        echo "ccluster: refusing $ref: it refers to objects the run did not offer and the push did not send" >&2
        status=1
    fi
done
exit $status
"#;

/// A run's git endpoint (and model relay), serving until [`Endpoint::stop`] or drop.
pub struct Endpoint {
    run: String,
    repo_git_dir: PathBuf,
    transport: PathBuf,
    token: String,
    base_url: String,
    /// What the server answers with (the relay's target may be set after start).
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

/// What every request handler shares.
struct Shared {
    /// `/git/<run>.git/`: the only repository path served.
    git_prefix: String,
    /// `Bearer <token>`, what `Authorization` must say.
    expected_authorization: String,
    token: String,
    transport: PathBuf,
    /// Set at start, or later by [`Endpoint::relay`] (the first agent of the run names it).
    model_api: std::sync::RwLock<Option<ModelApi>>,
}

impl Shared {
    fn model_api(&self) -> Option<ModelApi> {
        self.model_api
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The model API the relay reaches: an `http://` URL's authority and path.
#[derive(Clone)]
struct ModelApi {
    /// `host:port`, what the relay connects to and sends as `Host`.
    authority: String,
    /// The URL's path without its final `/` (`""` for the root).
    base_path: String,
}

impl ModelApi {
    fn parse(url: &str) -> Result<ModelApi, String> {
        let Some(rest) = url.strip_prefix("http://") else {
            return Err(format!(
                "the model API `{}` cannot be relayed: only http:// URLs are (pods reach https:// model APIs directly)",
                url.escape_debug()
            ));
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if authority.is_empty() || authority.contains('@') || path.contains(['?', '#']) {
            return Err(format!(
                "the model API `{}` is not a URL the relay can use (http://host[:port][/path])",
                url.escape_debug()
            ));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
            && !authority.ends_with(']')
        {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        Ok(ModelApi {
            authority,
            base_path: path.trim_end_matches('/').to_string(),
        })
    }
}

impl Endpoint {
    /// Starts the endpoint of run `run` listening on `listen` (e.g. `192.0.2.1:0`), serving the
    /// repository whose git common dir is `repo_git_dir`, through its transport repository at
    /// `transport` (made here, or reused when a previous start of the same run left it: what pods
    /// pushed then can still be taken; removed by [`Endpoint::stop`]). `advertise` is the
    /// `host[:port]` pods use (without a port: the bound port). With `model_api`, the endpoint also
    /// relays that (`http://`) model API at [`Endpoint::model_url`].
    pub async fn start(
        run: &str,
        repo_git_dir: &Path,
        transport: &Path,
        listen: SocketAddr,
        advertise: &str,
        model_api: Option<&str>,
    ) -> Result<Endpoint, String> {
        Endpoint::start_with_token(
            run,
            repo_git_dir,
            transport,
            listen,
            advertise,
            model_api,
            new_token()?,
        )
        .await
    }

    /// [`Endpoint::start`] with a given token: for a driver that restarts while pods it started
    /// still hold the previous token (it must then listen on the same address, too).
    pub async fn start_with_token(
        run: &str,
        repo_git_dir: &Path,
        transport: &Path,
        listen: SocketAddr,
        advertise: &str,
        model_api: Option<&str>,
        token: String,
    ) -> Result<Endpoint, String> {
        check_run_id(run)?;
        if token.len() < 32 || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("the endpoint's token must be at least 32 letters or digits".into());
        }
        let model_api = model_api.map(ModelApi::parse).transpose()?;
        let repo_git_dir = std::path::absolute(repo_git_dir)
            .map_err(|e| format!("cannot resolve {}: {e}", repo_git_dir.display()))?;
        let transport = std::path::absolute(transport)
            .map_err(|e| format!("cannot resolve {}: {e}", transport.display()))?;
        let Some(transport_name) = transport.file_name().and_then(|n| n.to_str()) else {
            return Err(format!(
                "the transport repository {} needs a file name",
                transport.display()
            ));
        };
        let transport_name = transport_name.to_string();
        let run_owned = run.to_string();
        let (repo_dir, transport_dir) = (repo_git_dir.clone(), transport.clone());
        tokio::task::spawn_blocking(move || make_transport(&run_owned, &repo_dir, &transport_dir))
            .await
            .map_err(|e| format!("cannot make the transport repository: {e}"))??;

        let listener = TcpListener::bind(listen)
            .await
            .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("cannot read the address listened on: {e}"))?
            .port();
        let base_url = format!("http://{}", with_port(advertise, port)?);

        let shared = Arc::new(Shared {
            git_prefix: format!("/git/{run}.git/"),
            expected_authorization: format!("Bearer {token}"),
            token: token.clone(),
            transport: transport.clone(),
            model_api: std::sync::RwLock::new(model_api),
        });
        let shared_for_relay = Arc::clone(&shared);
        let app = axum::Router::new().fallback(move |request: Request<Body>| {
            let shared = Arc::clone(&shared);
            let transport_name = transport_name.clone();
            async move { handle(&shared, &transport_name, request).await }
        });
        let server = tokio::spawn(async move {
            // Serving ends when the task is aborted; an accept error is the listener's end.
            let _ = axum::serve(listener, app).await;
        });
        Ok(Endpoint {
            run: run.to_string(),
            repo_git_dir,
            transport,
            token,
            base_url,
            shared: shared_for_relay,
            server: Some(server),
        })
    }

    /// The repository's URL for pods: `http://<advertise>/git/<run>.git`.
    pub fn git_url(&self) -> String {
        format!("{}/git/{}.git", self.base_url, self.run)
    }

    /// The run's token (256 random bits, hex): pods send it as `Authorization: Bearer <token>`.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The model API's relay for pods, `http://<advertise>/model/<token>`, when relaying. It holds
    /// the token: hand it to pods as a secret, like the token itself.
    pub fn model_url(&self) -> Option<String> {
        self.shared
            .model_api()
            .is_some()
            .then(|| format!("{}/model/{}", self.base_url, self.token))
    }

    /// Relays `model_api` (an `http://` URL) from now on, unless the endpoint relays one already;
    /// returns [`Endpoint::model_url`]. A run's agents share one model API.
    pub fn relay(&self, model_api: &str) -> Result<String, String> {
        let parsed = ModelApi::parse(model_api)?;
        {
            let mut current = self
                .shared
                .model_api
                .write()
                .unwrap_or_else(|e| e.into_inner());
            match &*current {
                Some(api) if api.authority != parsed.authority || api.base_path != parsed.base_path => {
                    return Err(format!(
                        "the run's endpoint relays another model API already; it cannot relay `{}` too",
                        model_api.escape_debug()
                    ))
                }
                Some(_) => {}
                None => *current = Some(parsed),
            }
        }
        self.model_url()
            .ok_or_else(|| "the endpoint does not relay".to_string())
    }

    /// The ref a pod pushes `name` to (and [`Endpoint::take`] sets in the served repository).
    pub fn result_ref(&self, name: &str) -> String {
        format!("refs/ccluster/{}/{name}", self.run)
    }

    /// Makes `refs/ccluster/<run>/start/<name>` of the transport repository point at `commit` (a
    /// commit of the served repository) and returns that ref: what a pod fetches.
    pub fn offer(&self, name: &str, commit: &str) -> Result<String, String> {
        let start_ref = RefName::new(format!("refs/ccluster/{}/start/{name}", self.run))?;
        if !is_object_id(commit) {
            return Err(format!("`{}` is not a commit id", commit.escape_debug()));
        }
        git_sync(
            &self.transport,
            &[
                "cat-file",
                "-e",
                "--end-of-options",
                &format!("{commit}^{{commit}}"),
            ],
        )
        .map_err(|_| format!("{commit} is not a commit of the served repository"))?;
        git_sync(
            &self.transport,
            &["update-ref", "--no-deref", start_ref.as_str(), commit],
        )?;
        Ok(start_ref.as_str().to_string())
    }

    /// Brings what a pod pushed to `refs/ccluster/<run>/<name>` into the served repository's
    /// object store and sets the same ref there; returns the commit, or `None` when nothing was
    /// pushed there.
    pub fn take(&self, name: &str) -> Result<Option<String>, String> {
        let pushed = RefName::new(format!("refs/ccluster/{}/{name}", self.run))?;
        if name.starts_with("start/") {
            return Err(format!("{pushed} is a start ref, not a pod's result"));
        }
        let Ok(commit) = git_sync(
            &self.transport,
            &["show-ref", "--verify", "--hash", "--", pushed.as_str()],
        ) else {
            return Ok(None);
        };
        let commit = commit.trim().to_string();
        if !is_object_id(&commit) {
            return Err(format!(
                "{pushed} of the transport repository names no commit"
            ));
        }
        let transport = self.transport.to_string_lossy().into_owned();
        git_sync(
            &self.repo_git_dir,
            &[
                "fetch",
                "--quiet",
                "--no-tags",
                "--no-write-fetch-head",
                "--no-recurse-submodules",
                "--end-of-options",
                &transport,
                &format!("+{pushed}:{pushed}"),
            ],
        )?;
        Ok(Some(commit))
    }

    /// Stops serving and removes the transport repository.
    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
        let transport = self.transport.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(transport)).await;
    }
}

impl Drop for Endpoint {
    /// Stops listening (the transport repository stays: [`Endpoint::stop`] removes it).
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

/// The `sh` lines a pod runs before its task: fetch `start_ref` from `git_url` into the existing,
/// empty directory `dir` and check it out detached (a shallow fetch: history is not fetched). The
/// token is read from the environment variable `token_var` at run time (it is never written in
/// the script) and given to git through its environment for that one command, so it is neither
/// on a command line nor in the checkout's configuration, and the task's own git commands do not
/// send it anywhere. `token_var` must be a shell variable name.
pub fn fetch_script(git_url: &str, token_var: &str, start_ref: &str, dir: &str) -> String {
    debug_assert!(
        token_var.is_empty() || is_shell_name(token_var),
        "{token_var} is not a variable name"
    );
    format!(
        "( set -eu\n  cd -- {dir}\n  git init -q .\n  {auth} git fetch -q --no-tags --depth=1 -- {url} {start_ref}\n  git -c advice.detachedHead=false checkout -q --detach FETCH_HEAD\n) || {{ echo 'ccluster: cannot fetch the start commit of the task' >&2; exit 1; }}\n",
        dir = sh_quote(dir),
        auth = auth_env(token_var),
        url = sh_quote(git_url),
        start_ref = sh_quote(start_ref),
    )
}

/// The `sh` lines a pod runs after its task: commit everything in `dir` (`git add -A`, so
/// `.gitignore` decides what is left out; as `ccluster <ccluster@localhost>`; no commit when
/// nothing changed, as for a local workspace) and push the checkout's `HEAD` to
/// `refs/ccluster/<run>/<name>` (forced: a retry replaces an earlier attempt's push).
pub fn push_script(git_url: &str, token_var: &str, run: &str, name: &str, dir: &str) -> String {
    debug_assert!(
        token_var.is_empty() || is_shell_name(token_var),
        "{token_var} is not a variable name"
    );
    let identity = "GIT_AUTHOR_NAME=ccluster GIT_AUTHOR_EMAIL=ccluster@localhost \
                    GIT_COMMITTER_NAME=ccluster GIT_COMMITTER_EMAIL=ccluster@localhost";
    format!(
        "( set -eu\n  cd -- {dir}\n  git add -A\n  git diff --cached --quiet || {identity} git -c core.hooksPath=/dev/null commit -q --no-verify -m {message}\n  {auth} git push -q --no-verify -- {url} {refspec}\n) || {{ echo 'ccluster: cannot push the result of the task' >&2; exit 1; }}\n",
        dir = sh_quote(dir),
        message = sh_quote(&format!("ccluster: {name} (run {run})")),
        auth = auth_env(token_var),
        url = sh_quote(git_url),
        refspec = sh_quote(&format!("+HEAD:refs/ccluster/{run}/{name}")),
    )
}

/// The variables that give one git command the token's header and keep it from prompting: git
/// reads `GIT_CONFIG_COUNT`/`KEY`/`VALUE` as `-c` options, without a command line showing them.
pub(crate) fn auth_env(token_var: &str) -> String {
    // No token (a remote of the user's): its own credentials apply.
    if token_var.is_empty() {
        return "GIT_TERMINAL_PROMPT=0".into();
    }
    format!(
        "GIT_TERMINAL_PROMPT=0 GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=http.extraHeader \
         GIT_CONFIG_VALUE_0=\"Authorization: Bearer ${{{token_var}}}\""
    )
}

fn is_shell_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b == b'_' || b.is_ascii_alphabetic())
        && bytes.all(|b| b == b'_' || b.is_ascii_alphanumeric())
}

/// `value` quoted for `sh`: inside single quotes, each `'` written as `'\''`.
fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// A run id as it appears in the endpoint's URL and refs: letters, digits, `.`, `_`, `-`, not
/// starting with `.` or `-`.
fn check_run_id(run: &str) -> Result<(), String> {
    let fine = !run.is_empty()
        && !run.starts_with(['.', '-'])
        && !run.contains("..")
        && !run.ends_with(".lock")
        && run
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if fine {
        Ok(())
    } else {
        Err(format!(
            "`{}` cannot name a run's git endpoint",
            run.escape_debug()
        ))
    }
}

/// `advertise` with `port` when it names none (`host`, `1.2.3.4`, `[::1]`).
fn with_port(advertise: &str, port: u16) -> Result<String, String> {
    let bad = || {
        format!(
            "`{}` is not a host[:port] pods can reach",
            advertise.escape_debug()
        )
    };
    if advertise.is_empty() || advertise.contains(['/', '@', '?', '#', ' ']) {
        return Err(bad());
    }
    let has_port = match advertise.strip_prefix('[') {
        Some(rest) => {
            let (_, after) = rest.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(p) => {
                    p.parse::<u16>().map_err(|_| bad())?;
                    true
                }
                None if after.is_empty() => false,
                None => return Err(bad()),
            }
        }
        None => match advertise.split_once(':') {
            Some((_, p)) => {
                p.parse::<u16>().map_err(|_| bad())?;
                true
            }
            None => false,
        },
    };
    Ok(if has_port {
        advertise.to_string()
    } else {
        format!("{advertise}:{port}")
    })
}

/// 256 bits from the kernel's random source, as hex: unlike the process's PRNG, not predictable
/// from other values it gave.
fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .map_err(|e| format!("cannot read random bytes for the endpoint's token: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether two byte strings are equal, in a time that depends on their lengths only.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Makes (or refreshes) the transport repository: bare, borrowing the served repository's
/// objects, with the settings and hook that bound what pods may fetch and push.
fn make_transport(run: &str, repo_git_dir: &Path, transport: &Path) -> Result<(), String> {
    let objects = repo_git_dir.join("objects");
    if !objects.is_dir() {
        return Err(format!(
            "{} is not a git directory (it has no objects)",
            repo_git_dir.display()
        ));
    }
    if !transport.join("objects").is_dir() {
        if let Some(parent) = transport.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        let path = transport.to_string_lossy().into_owned();
        git_sync(
            Path::new("/"),
            // No template: the hooks directory holds ccluster's hook and nothing else.
            &[
                "init",
                "--quiet",
                "--bare",
                "--template=",
                "--end-of-options",
                &path,
            ],
        )?;
    }
    let info = transport.join("objects/info");
    std::fs::create_dir_all(&info).map_err(|e| format!("cannot create {}: {e}", info.display()))?;
    let mut alternates = objects.to_string_lossy().into_owned();
    alternates.push('\n');
    std::fs::write(info.join("alternates"), alternates)
        .map_err(|e| format!("cannot write the transport's alternates: {e}"))?;

    let hooks = transport.join("hooks");
    std::fs::create_dir_all(&hooks)
        .map_err(|e| format!("cannot create {}: {e}", hooks.display()))?;
    let hook = hooks.join("pre-receive");
    let prefix = format!("refs/ccluster/{run}/");
    // The hook takes the run's prefix as its argument through a tiny wrapper: no run id is
    // spliced into the script's code.
    std::fs::write(hooks.join("pre-receive.sh"), PRE_RECEIVE)
        .and_then(|()| {
            std::fs::write(
                &hook,
                format!(
                    "#!/bin/sh\nexec sh \"$(dirname \"$0\")/pre-receive.sh\" {}\n",
                    sh_quote(&prefix)
                ),
            )
        })
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))
        })
        .map_err(|e| format!("cannot write the transport's hook: {e}"))?;

    let hooks_path = hooks.to_string_lossy().into_owned();
    let settings: &[(&str, &str)] = &[
        // The hook above, whatever a global `core.hooksPath` says.
        ("core.hooksPath", &hooks_path),
        // Fetches see the transport's refs only, and may want only what they reach: pinned here
        // so that no global setting loosens it (protocol v2, which ignores these, is not spoken:
        // see `git_cgi`).
        ("uploadpack.allowAnySHA1InWant", "false"),
        ("uploadpack.allowReachableSHA1InWant", "false"),
        ("uploadpack.allowTipSHA1InWant", "false"),
        // Partial clones (`--filter=blob:none`) of a start commit.
        ("uploadpack.allowFilter", "true"),
        // receive-pack would advertise the tips of the user's refs (the alternate's) as `.have`
        // lines: `true` lists none.
        ("core.alternateRefsCommand", "true"),
        // Pushed objects are checked before anything reads them.
        ("receive.fsckObjects", "true"),
        ("receive.autogc", "false"),
        // A push is kept as the pack it came in, even of one object: unpacked, an object the
        // user's repository has already (an identical file of an earlier run) would be skipped,
        // and the hook would find it neither offered nor sent.
        ("receive.unpackLimit", "1"),
        ("receive.denyDeletes", "true"),
        ("http.receivepack", "true"),
    ];
    for (key, value) in settings {
        git_sync(transport, &["config", "--local", key, value])?;
    }
    Ok(())
}

/// Answers one request: the git service, the model relay, or 404.
async fn handle(shared: &Shared, transport_name: &str, request: Request<Body>) -> Response<Body> {
    let path = request.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/model/") {
        if shared.model_api().is_none() {
            return status(StatusCode::NOT_FOUND);
        }
        let (token, rest) = rest.split_once('/').unwrap_or((rest, ""));
        if !constant_time_eq(token.as_bytes(), shared.token.as_bytes()) {
            return unauthorized();
        }
        let rest = rest.to_string();
        return relay(shared, &rest, request).await;
    }
    let Some(service_path) = path.strip_prefix(&shared.git_prefix) else {
        return status(StatusCode::NOT_FOUND);
    };
    let query = request.uri().query().unwrap_or("");
    let served = match (request.method(), service_path) {
        (&Method::GET, "info/refs") => {
            matches!(
                query,
                "service=git-upload-pack" | "service=git-receive-pack"
            )
        }
        (&Method::POST, "git-upload-pack" | "git-receive-pack") => true,
        _ => false,
    };
    if !served {
        return status(StatusCode::NOT_FOUND);
    }
    let authorized = request
        .headers()
        .get(header::AUTHORIZATION)
        .is_some_and(|v| constant_time_eq(v.as_bytes(), shared.expected_authorization.as_bytes()));
    if !authorized {
        return unauthorized();
    }
    let service_path = service_path.to_string();
    git_cgi(shared, transport_name, &service_path, request).await
}

fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = code;
    response
}

fn unauthorized() -> Response<Body> {
    let mut response = status(StatusCode::UNAUTHORIZED);
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"ccluster\""),
    );
    response
}

/// Runs `git http-backend` for one request (CGI): the request body streamed to its stdin, its
/// output parsed into a status and headers, the rest streamed back as the body.
async fn git_cgi(
    shared: &Shared,
    transport_name: &str,
    service_path: &str,
    request: Request<Body>,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let Some(project_root) = shared.transport.parent() else {
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend").env_clear();
    for key in ["PATH", "HOME", "USER", "TMPDIR"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    // No `GIT_PROTOCOL` (from the `Git-Protocol` header) reaches git: it speaks protocol v0, which
    // refuses a `want` that no advertised ref reaches. v2 serves any object the repository has,
    // and through its alternates the transport has all of the user's.
    cmd.env("LC_ALL", "C")
        .env("GIT_PROJECT_ROOT", project_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{transport_name}/{service_path}"))
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("QUERY_STRING", parts.uri.query().unwrap_or(""))
        .env("REMOTE_USER", POD_USER)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("SERVER_PROTOCOL", "HTTP/1.1");
    for (header_name, variable) in [
        (header::CONTENT_TYPE, "CONTENT_TYPE"),
        (header::CONTENT_LENGTH, "CONTENT_LENGTH"),
        (header::CONTENT_ENCODING, "HTTP_CONTENT_ENCODING"),
    ] {
        if let Some(value) = parts
            .headers
            .get(&header_name)
            .and_then(|v| v.to_str().ok())
        {
            cmd.env(variable, value);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    let Ok(mut child) = cmd.spawn() else {
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    };
    let (Some(mut stdin), Some(mut stdout)) = (child.stdin.take(), child.stdout.take()) else {
        return status(StatusCode::INTERNAL_SERVER_ERROR);
    };
    tokio::spawn(async move {
        let mut frames = body.into_data_stream();
        while let Some(Ok(chunk)) = frames.next().await {
            if stdin.write_all(&chunk).await.is_err() {
                break;
            }
        }
        // Dropping stdin closes it: the end of the request for git.
    });
    // The child is reaped when it ends; a client that goes away drops the body stream, and with
    // it stdout, which ends git's output (SIGPIPE).
    tokio::spawn(async move {
        let _ = child.wait().await;
    });

    let Ok((head, rest)) = read_cgi_head(&mut stdout).await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let mut response = Response::new(Body::from_stream(stream_after(rest, stdout)));
    for line in head.split("\r\n").flat_map(|l| l.split('\n')) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code = value.split(' ').next().and_then(|c| c.parse::<u16>().ok());
            match code.and_then(|c| StatusCode::from_u16(c).ok()) {
                Some(code) => *response.status_mut() = code,
                None => return status(StatusCode::BAD_GATEWAY),
            }
        } else if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}

/// Reads the CGI header block (up to its blank line); returns it and the body bytes read with it.
async fn read_cgi_head(stdout: &mut tokio::process::ChildStdout) -> Result<(String, Vec<u8>), ()> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let end = find(&buffer, b"\r\n\r\n")
            .map(|i| (i, 4))
            .or_else(|| find(&buffer, b"\n\n").map(|i| (i, 2)));
        if let Some((at, separator)) = end {
            let rest = buffer.split_off(at + separator);
            buffer.truncate(at);
            return Ok((String::from_utf8_lossy(&buffer).into_owned(), rest));
        }
        if buffer.len() > MAX_CGI_HEAD {
            return Err(());
        }
        let n = stdout.read(&mut chunk).await.map_err(|_| ())?;
        if n == 0 {
            return Err(());
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `first`, then what `reader` gives, chunk by chunk as it comes.
fn stream_after<R: AsyncRead + Unpin + Send + 'static>(
    first: Vec<u8>,
    reader: R,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    let first = (!first.is_empty()).then(|| Ok(Bytes::from(first)));
    let rest = futures_util::stream::unfold(reader, |mut reader| async move {
        let mut chunk = vec![0u8; 32 << 10];
        match reader.read(&mut chunk).await {
            Ok(0) => None,
            Ok(n) => {
                chunk.truncate(n);
                Some((Ok(Bytes::from(chunk)), reader))
            }
            Err(e) => Some((Err(e), reader)),
        }
    });
    futures_util::stream::iter(first).chain(rest)
}

/// Forwards a request to the model API (same method, headers but hop-by-hop ones and `Host`,
/// body), streaming the answer back as it comes: the model API answers with server-sent events.
async fn relay(shared: &Shared, rest: &str, request: Request<Body>) -> Response<Body> {
    let Some(api) = shared.model_api() else {
        return status(StatusCode::NOT_FOUND);
    };
    let (parts, body) = request.into_parts();
    let mut target = format!("{}/{rest}", api.base_path);
    if let Some(query) = parts.uri.query() {
        target.push('?');
        target.push_str(query);
    }
    let mut forwarded = Request::new(body);
    *forwarded.method_mut() = parts.method;
    let Ok(uri) = target.parse() else {
        return status(StatusCode::BAD_REQUEST);
    };
    *forwarded.uri_mut() = uri;
    copy_end_to_end(&parts.headers, forwarded.headers_mut());
    let Ok(host) = HeaderValue::from_str(&api.authority) else {
        return status(StatusCode::BAD_GATEWAY);
    };
    forwarded.headers_mut().insert(header::HOST, host);

    let Ok(stream) = tokio::net::TcpStream::connect(&api.authority).await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
    else {
        return status(StatusCode::BAD_GATEWAY);
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let Ok(answer) = sender.send_request(forwarded).await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let (answer_parts, answer_body) = answer.into_parts();
    let mut response = Response::new(Body::new(answer_body));
    *response.status_mut() = answer_parts.status;
    copy_end_to_end(&answer_parts.headers, response.headers_mut());
    response
}

/// Copies headers but the hop-by-hop ones (and those the `Connection` header names).
fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    let named_by_connection: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in from {
        let name_str = name.as_str();
        if HOP_BY_HOP.contains(&name_str) || named_by_connection.iter().any(|n| n == name_str) {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use std::time::Duration;
    use tokio::io::AsyncBufReadExt;

    const RUN: &str = "20261204-101010.000-abcd";
    const TOKEN_VAR: &str = "CCLUSTER_GIT_TOKEN";

    fn git(dir: &Path, args: &[&str]) -> String {
        let out = std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args([
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "-c",
                "core.hooksPath=/dev/null",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn git_ok(dir: &Path, args: &[&str]) -> bool {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .unwrap()
            .status
            .success()
    }

    /// A served repository: `main` with a start commit (and its parent), and a commit on another
    /// branch that is never offered.
    struct Served {
        dir: tempfile::TempDir,
        start: String,
        secret: String,
    }

    fn served() -> Served {
        let dir = tempfile::tempdir().unwrap();
        let repo = dir.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        git(&repo, &["init", "-q", "-b", "main"]);
        std::fs::write(repo.join("a.txt"), "one\n").unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "first"]);
        std::fs::create_dir(repo.join("src")).unwrap();
        std::fs::write(repo.join("src/b.txt"), "two\n").unwrap();
        std::fs::write(repo.join(".gitignore"), "*.log\n").unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "second"]);
        let start = git(&repo, &["rev-parse", "HEAD"]);
        git(&repo, &["switch", "-q", "-c", "private"]);
        std::fs::write(repo.join("secret.txt"), "not for pods\n").unwrap();
        git(&repo, &["add", "-A"]);
        git(&repo, &["commit", "-q", "-m", "secret"]);
        let secret = git(&repo, &["rev-parse", "HEAD"]);
        git(&repo, &["switch", "-q", "main"]);
        Served { dir, start, secret }
    }

    impl Served {
        fn repo(&self) -> PathBuf {
            self.dir.path().join("repo")
        }
        fn git_dir(&self) -> PathBuf {
            self.repo().join(".git")
        }
        fn transport(&self) -> PathBuf {
            self.dir
                .path()
                .join("state/transport")
                .join(format!("{RUN}.git"))
        }
        async fn endpoint(&self, model_api: Option<&str>) -> Endpoint {
            let listen = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
            Endpoint::start(
                RUN,
                &self.git_dir(),
                &self.transport(),
                listen,
                "127.0.0.1",
                model_api,
            )
            .await
            .unwrap()
        }
        /// A new empty directory, as a pod's checkout starts.
        fn empty_dir(&self, name: &str) -> PathBuf {
            let dir = self.dir.path().join("pods").join(name);
            std::fs::create_dir_all(&dir).unwrap();
            dir
        }
    }

    /// Runs `sh -c script` as a pod would, with the token variable set to `token`.
    async fn pod_sh(script: &str, token: &str) -> std::process::Output {
        tokio::process::Command::new("sh")
            .args(["-c", script])
            .env(TOKEN_VAR, token)
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("HOME", "/nonexistent")
            .output()
            .await
            .unwrap()
    }

    /// The git command a pod would run with the token's header.
    async fn pod_git(dir: &Path, args: &[&str], token: &str) -> std::process::Output {
        tokio::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_COUNT", "1")
            .env("GIT_CONFIG_KEY_0", "http.extraHeader")
            .env(
                "GIT_CONFIG_VALUE_0",
                format!("Authorization: Bearer {token}"),
            )
            .output()
            .await
            .unwrap()
    }

    fn stderr(out: &std::process::Output) -> String {
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// One HTTP/1.1 exchange on a fresh connection: the status and the whole answer.
    async fn http(endpoint: &Endpoint, request: &[u8]) -> (u16, Vec<u8>) {
        let authority = endpoint.git_url()["http://".len()..]
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let mut stream = tokio::net::TcpStream::connect(authority).await.unwrap();
        stream.write_all(request).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        let status = String::from_utf8_lossy(&answer[9..12]).parse().unwrap();
        (status, answer)
    }

    fn transport_refs(served: &Served) -> String {
        git(
            &served.transport(),
            &["for-each-ref", "--format=%(refname) %(objectname)"],
        )
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_pod_fetches_its_start_commit_and_its_push_is_taken_into_the_repository() {
        let served = served();
        let endpoint = served.endpoint(None).await;
        assert!(endpoint.git_url().starts_with("http://127.0.0.1:"));
        assert!(endpoint.git_url().ends_with(&format!("/git/{RUN}.git")));
        assert!(endpoint.token().len() >= 32);
        // Nothing is copied: the transport borrows the served repository's objects.
        let alternates =
            std::fs::read_to_string(served.transport().join("objects/info/alternates")).unwrap();
        assert_eq!(
            alternates.trim(),
            served.git_dir().join("objects").to_str().unwrap()
        );

        let start_ref = endpoint.offer("edit/2", &served.start).unwrap();
        assert_eq!(start_ref, format!("refs/ccluster/{RUN}/start/edit/2"));

        let pod = served.empty_dir("edit.2");
        let pod_str = pod.to_str().unwrap();
        let fetch = fetch_script(&endpoint.git_url(), TOKEN_VAR, &start_ref, pod_str);
        assert!(!fetch.contains(endpoint.token()));
        let out = pod_sh(&fetch, endpoint.token()).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(git(&pod, &["rev-parse", "HEAD"]), served.start);
        assert_eq!(
            std::fs::read_to_string(pod.join("src/b.txt")).unwrap(),
            "two\n"
        );
        assert_eq!(git(&pod, &["status", "--porcelain"]), "");
        // The token is in no file of the checkout.
        let config = std::fs::read_to_string(pod.join(".git/config")).unwrap();
        assert!(!config.contains(endpoint.token()) && !config.contains("127.0.0.1"));

        // The task changes a file, adds one, and leaves an ignored one.
        std::fs::write(pod.join("a.txt"), "changed\n").unwrap();
        std::fs::write(pod.join("src/new.txt"), "new\n").unwrap();
        std::fs::write(pod.join("build.log"), "ignored\n").unwrap();
        assert_eq!(endpoint.take("edit/2").unwrap(), None, "nothing pushed yet");
        let push = push_script(&endpoint.git_url(), TOKEN_VAR, RUN, "edit/2", pod_str);
        assert!(!push.contains(endpoint.token()));
        let out = pod_sh(&push, endpoint.token()).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let pushed = git(&pod, &["rev-parse", "HEAD"]);
        assert_eq!(
            git(&pod, &["log", "-1", "--format=%an <%ae> %cn <%ce>"]),
            "ccluster <ccluster@localhost> ccluster <ccluster@localhost>"
        );

        // The pushed objects are in the transport, not in the user's repository, until `take`.
        assert!(!git_ok(&served.git_dir(), &["cat-file", "-e", &pushed]));
        assert_eq!(endpoint.take("edit/2").unwrap(), Some(pushed.clone()));
        assert_eq!(
            git(
                &served.repo(),
                &["rev-parse", &format!("refs/ccluster/{RUN}/edit/2")]
            ),
            pushed
        );
        assert_eq!(
            git(&served.repo(), &["rev-parse", &format!("{pushed}^")]),
            served.start
        );
        let files = git(&served.repo(), &["ls-tree", "-r", "--name-only", &pushed]);
        assert_eq!(files, ".gitignore\na.txt\nsrc/b.txt\nsrc/new.txt");
        assert_eq!(
            git(&served.repo(), &["show", &format!("{pushed}:a.txt")]),
            "changed"
        );

        // A task that changed nothing pushes its start commit, as a local workspace's result is.
        let idle = served.empty_dir("idle");
        let out = pod_sh(
            &fetch_script(
                &endpoint.git_url(),
                TOKEN_VAR,
                &start_ref,
                idle.to_str().unwrap(),
            ),
            endpoint.token(),
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
        let out = pod_sh(
            &push_script(
                &endpoint.git_url(),
                TOKEN_VAR,
                RUN,
                "idle",
                idle.to_str().unwrap(),
            ),
            endpoint.token(),
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(endpoint.take("idle").unwrap(), Some(served.start.clone()));

        let transport = served.transport();
        endpoint.stop().await;
        assert!(!transport.exists());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_wrong_or_missing_token_is_refused_and_never_shown() {
        let served = served();
        let endpoint = served.endpoint(None).await;
        let start_ref = endpoint.offer("t", &served.start).unwrap();
        let url = endpoint.git_url();
        let wrong = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let mut almost = endpoint.token().to_string();
        almost.pop();
        almost.push(if endpoint.token().ends_with('0') {
            '1'
        } else {
            '0'
        });
        for token in [wrong, "", almost.as_str()] {
            let pod = served.empty_dir(&format!("wrong{}", token.len()));
            let out = pod_sh(
                &fetch_script(&url, TOKEN_VAR, &start_ref, pod.to_str().unwrap()),
                token,
            )
            .await;
            assert!(
                !out.status.success(),
                "fetch with token {token:?} succeeded"
            );
            let text = format!("{}{}", stderr(&out), String::from_utf8_lossy(&out.stdout));
            assert!(!text.contains(endpoint.token()), "{text}");
            assert!(!token.is_empty() || !text.contains(wrong));
        }

        // A pod with a good checkout and a wrong token cannot push.
        let pod = served.empty_dir("good");
        let pod_str = pod.to_str().unwrap();
        let out = pod_sh(
            &fetch_script(&url, TOKEN_VAR, &start_ref, pod_str),
            endpoint.token(),
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::write(pod.join("a.txt"), "x\n").unwrap();
        let out = pod_sh(&push_script(&url, TOKEN_VAR, RUN, "t", pod_str), &almost).await;
        assert!(!out.status.success());
        assert!(!stderr(&out).contains(endpoint.token()), "{}", stderr(&out));
        assert_eq!(endpoint.take("t").unwrap(), None);

        // What the server says: 401, for a missing header, a wrong one, HTTP Basic with the token
        // as password, the token in another scheme or with a different case.
        let basic = format!("Basic {}", base64_of(&format!("x:{}", endpoint.token())));
        let bearer_lower = format!("bearer {}", endpoint.token());
        let token_only = endpoint.token().to_string();
        let bearer_padded = format!("Bearer  {}", endpoint.token());
        for authorization in [
            None,
            Some(format!("Bearer {wrong}")),
            Some(basic),
            Some(bearer_lower),
            Some(token_only),
            Some(bearer_padded),
            Some(format!("Bearer {almost}")),
        ] {
            for path in [
                "info/refs?service=git-upload-pack",
                "info/refs?service=git-receive-pack",
            ] {
                let mut request = format!(
                    "GET /git/{RUN}.git/{path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                );
                if let Some(a) = &authorization {
                    request.push_str(&format!("Authorization: {a}\r\n"));
                }
                request.push_str("\r\n");
                let (status, answer) = http(&endpoint, request.as_bytes()).await;
                assert_eq!(status, 401, "{authorization:?} {path}");
                assert!(!String::from_utf8_lossy(&answer).contains(endpoint.token()));
            }
        }
        // The right token works through the same request.
        let request = format!(
            "GET /git/{RUN}.git/info/refs?service=git-upload-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {}\r\n\r\n",
            endpoint.token()
        );
        let (status, answer) = http(&endpoint, request.as_bytes()).await;
        assert_eq!(status, 200);
        assert!(String::from_utf8_lossy(&answer).contains(&start_ref));
        endpoint.stop().await;
    }

    fn base64_of(text: &str) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in text.as_bytes().chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, b)| n | (*b as u32) << (16 - 8 * i));
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn only_other_paths_are_not_found() {
        let served = served();
        let endpoint = served.endpoint(None).await;
        let token = endpoint.token().to_string();
        for (method, path) in [
            ("GET", format!("/git/{RUN}.git/HEAD")),
            ("GET", format!("/git/{RUN}.git/objects/info/alternates")),
            ("GET", format!("/git/{RUN}.git/config")),
            ("GET", format!("/git/{RUN}.git/info/refs")),
            (
                "GET",
                format!("/git/{RUN}.git/info/refs?service=git-upload-archive"),
            ),
            ("POST", format!("/git/{RUN}.git/git-upload-archive")),
            ("GET", format!("/git/{RUN}.git/git-upload-pack")),
            (
                "POST",
                format!("/git/{RUN}.git/info/refs?service=git-upload-pack"),
            ),
            (
                "GET",
                "/git/other.git/info/refs?service=git-upload-pack".to_string(),
            ),
            (
                "GET",
                format!("/git/{RUN}.git/../other.git/info/refs?service=git-upload-pack"),
            ),
            ("GET", format!("/model/{token}/v1/messages")),
            ("GET", "/".to_string()),
        ] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\nAuthorization: Bearer {token}\r\n\r\n"
            );
            let (status, _) = http(&endpoint, request.as_bytes()).await;
            assert_eq!(status, 404, "{method} {path}");
        }
        endpoint.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn pods_push_only_to_their_runs_refs() {
        let served = served();
        let endpoint = served.endpoint(None).await;
        let start_ref = endpoint.offer("s", &served.start).unwrap();
        let url = endpoint.git_url();
        let token = endpoint.token().to_string();
        let pod = served.empty_dir("pod");
        let out = pod_sh(
            &fetch_script(&url, TOKEN_VAR, &start_ref, pod.to_str().unwrap()),
            &token,
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::write(pod.join("a.txt"), "mine\n").unwrap();
        git(&pod, &["commit", "-q", "-am", "work"]);
        // A ref of the run, so that deleting and moving refs of the run can be tried too.
        let out = pod_git(
            &pod,
            &[
                "push",
                "-q",
                "--",
                &url,
                &format!("HEAD:refs/ccluster/{RUN}/mine"),
            ],
            &token,
        )
        .await;
        assert!(out.status.success(), "{}", stderr(&out));
        let before = transport_refs(&served);

        for refspec in [
            "HEAD:refs/heads/main".to_string(),
            "HEAD:refs/heads/x".to_string(),
            "HEAD:refs/tags/v1".to_string(),
            "HEAD:refs/ccluster/other-run/x".to_string(),
            format!("HEAD:refs/ccluster/{RUN}x/y"),
            "HEAD:refs/ccluster/runs/x".to_string(),
            format!("HEAD:refs/ccluster/{RUN}"),
            format!("+HEAD:{start_ref}"),
            format!("HEAD:refs/ccluster/{RUN}/start/new"),
            format!(":{start_ref}"),
            format!(":refs/ccluster/{RUN}/mine"),
            format!("HEAD^{{tree}}:refs/ccluster/{RUN}/tree"),
        ] {
            let out = pod_git(&pod, &["push", "--", &url, &refspec], &token).await;
            assert!(!out.status.success(), "{refspec} was accepted");
            assert!(!stderr(&out).contains(&token));
            assert_eq!(transport_refs(&served), before, "{refspec}");
        }
        let out = pod_git(&pod, &["push", "--", &url, "HEAD:refs/heads/main"], &token).await;
        assert!(
            stderr(&out).contains(&format!("pods may only push to refs/ccluster/{RUN}/<name>")),
            "{}",
            stderr(&out)
        );
        let out = pod_git(
            &pod,
            &["push", "--", &url, &format!("+HEAD:{start_ref}")],
            &token,
        )
        .await;
        assert!(
            stderr(&out).contains("start refs of the run are read-only"),
            "{}",
            stderr(&out)
        );
        // The user's repository got nothing.
        assert!(!git_ok(
            &served.git_dir(),
            &["rev-parse", "--verify", "refs/heads/x"]
        ));
        assert_eq!(git(&served.repo(), &["rev-parse", "main"]), served.start);
        endpoint.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_commit_that_was_not_offered_cannot_be_fetched_nor_pushed_to() {
        let served = served();
        let endpoint = served.endpoint(None).await;
        let start_ref = endpoint.offer("s", &served.start).unwrap();
        let url = endpoint.git_url();
        let token = endpoint.token().to_string();
        // The transport sees the secret commit (through its alternates), yet fetches may only
        // want what its refs reach, whichever protocol version the client asks for.
        assert!(git_ok(
            &served.transport(),
            &["cat-file", "-e", &served.secret]
        ));
        for version in ["0", "1", "2"] {
            let pod = served.empty_dir(&format!("v{version}"));
            git(&pod, &["init", "-q"]);
            let protocol = format!("protocol.version={version}");
            let out = pod_git(
                &pod,
                &["-c", &protocol, "fetch", "--", &url, &served.secret],
                &token,
            )
            .await;
            assert!(
                !out.status.success(),
                "protocol v{version} served the secret commit"
            );
            assert!(!git_ok(&pod, &["cat-file", "-e", &served.secret]));
            let out = pod_git(
                &pod,
                &[
                    "-c",
                    &protocol,
                    "fetch",
                    "--depth=1",
                    "--",
                    &url,
                    &served.secret,
                ],
                &token,
            )
            .await;
            assert!(
                !out.status.success(),
                "protocol v{version} served the secret commit shallowly"
            );
            // What was offered is served, by name and by id.
            let out = pod_git(
                &pod,
                &["-c", &protocol, "fetch", "--", &url, &served.start],
                &token,
            )
            .await;
            assert!(out.status.success(), "{}", stderr(&out));
            let out = pod_git(
                &pod,
                &["-c", &protocol, "fetch", "--", &url, &start_ref],
                &token,
            )
            .await;
            assert!(out.status.success(), "{}", stderr(&out));
        }

        // The push's advertisement does not name the user's refs (no `.have` of the alternate).
        let request = format!(
            "GET /git/{RUN}.git/info/refs?service=git-receive-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        let (status, answer) = http(&endpoint, request.as_bytes()).await;
        assert_eq!(status, 200);
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            !answer.contains(&served.secret) && !answer.contains(".have"),
            "{answer}"
        );

        // A pod that knows the secret commit's id cannot point a ref of the run at it (and fetch
        // it through that ref): a push of that ref with an empty pack.
        let target = format!("refs/ccluster/{RUN}/stolen");
        let zero = "0".repeat(40);
        let command = format!("{zero} {} {target}\0report-status\n", served.secret);
        let mut body = format!("{:04x}{command}0000", command.len() + 4).into_bytes();
        body.extend_from_slice(b"PACK\0\0\0\x02\0\0\0\0");
        body.extend_from_slice(&hex_bytes("029d08823bd8a8eab510ad6ac75c823cfd3ed31e"));
        let mut request = format!(
            "POST /git/{RUN}.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/x-git-receive-pack-request\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let (status, answer) = http(&endpoint, &request).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains(&format!("ng {target}")), "{answer}");
        assert!(!transport_refs(&served).contains("stolen"));
        // The same request for an offered commit's ancestor... is fine: the pod was given it.
        let parent = git(
            &served.repo(),
            &["rev-parse", &format!("{}^", served.start)],
        );
        let command = format!("{zero} {parent} {target}\0report-status\n");
        let mut body = format!("{:04x}{command}0000", command.len() + 4).into_bytes();
        body.extend_from_slice(b"PACK\0\0\0\x02\0\0\0\0");
        body.extend_from_slice(&hex_bytes("029d08823bd8a8eab510ad6ac75c823cfd3ed31e"));
        let mut request = format!(
            "POST /git/{RUN}.git/git-receive-pack HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/x-git-receive-pack-request\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(&body);
        let (_, answer) = http(&endpoint, &request).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.contains(&format!("ok {target}")), "{answer}");
        endpoint.stop().await;
    }

    fn hex_bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_model_relay_streams_chunk_by_chunk_and_checks_the_token() {
        // A model API that sends one event, waits until told, then sends another.
        let api = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_addr = api.local_addr().unwrap();
        let (go_on, mut wait) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (seen_tx, mut seen) = tokio::sync::mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let (stream, _) = api.accept().await.unwrap();
            let mut stream = tokio::io::BufReader::new(stream);
            let mut head = String::new();
            loop {
                let mut line = String::new();
                stream.read_line(&mut line).await.unwrap();
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let length: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let mut body = vec![0; length];
            stream.read_exact(&mut body).await.unwrap();
            seen_tx
                .send(format!("{head}{}", String::from_utf8_lossy(&body)))
                .unwrap();
            let stream = stream.get_mut();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let first = "event: one\ndata: {}\n\n";
            stream
                .write_all(format!("{:x}\r\n{first}\r\n", first.len()).as_bytes())
                .await
                .unwrap();
            stream.flush().await.unwrap();
            wait.recv().await.unwrap();
            let second = "event: two\ndata: {}\n\n";
            stream
                .write_all(format!("{:x}\r\n{second}\r\n0\r\n\r\n", second.len()).as_bytes())
                .await
                .unwrap();
        });

        let served = served();
        let endpoint = served
            .endpoint(Some(&format!("http://{api_addr}/api/")))
            .await;
        let model_url = endpoint.model_url().unwrap();
        assert_eq!(
            model_url,
            format!(
                "{}/model/{}",
                &endpoint.git_url()[..endpoint.git_url().find("/git/").unwrap()],
                endpoint.token()
            )
        );
        let authority = model_url["http://".len()..]
            .split('/')
            .next()
            .unwrap()
            .to_string();

        // A wrong token (or none) is refused, and the model API sees nothing.
        for path in [
            "/model/wrong/v1/messages".to_string(),
            "/model/v1/messages".to_string(),
            format!("/model/{}x/v1/messages", endpoint.token()),
        ] {
            let request = format!("POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{{}}");
            let (status, _) = http(&endpoint, request.as_bytes()).await;
            assert_eq!(status, 401, "{path}");
        }

        let mut client = tokio::net::TcpStream::connect(&authority).await.unwrap();
        let body = r#"{"stream":true}"#;
        client
            .write_all(
                format!(
                    "POST /model/{}/v1/messages?beta=true HTTP/1.1\r\nHost: {authority}\r\nx-api-key: sk-test\r\nConnection: keep-alive, x-drop-me\r\nx-drop-me: 1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    endpoint.token(),
                    body.len()
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        // The first event arrives while the model API still holds the second.
        while !String::from_utf8_lossy(&received).contains("event: one") {
            let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut chunk))
                .await
                .expect("the first event was not relayed before the answer ended")
                .unwrap();
            assert_ne!(n, 0);
            received.extend_from_slice(&chunk[..n]);
        }
        assert!(!String::from_utf8_lossy(&received).contains("event: two"));
        go_on.send(()).unwrap();
        while !String::from_utf8_lossy(&received).contains("event: two") {
            let n = tokio::time::timeout(Duration::from_secs(10), client.read(&mut chunk))
                .await
                .unwrap()
                .unwrap();
            assert_ne!(n, 0);
            received.extend_from_slice(&chunk[..n]);
        }
        let answer = String::from_utf8_lossy(&received);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer
            .to_ascii_lowercase()
            .contains("content-type: text/event-stream"));

        let request = seen.recv().await.unwrap();
        let lower = request.to_ascii_lowercase();
        assert!(
            request.starts_with("POST /api/v1/messages?beta=true HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            lower.contains(&format!("host: {api_addr}\r\n")),
            "{request}"
        );
        assert!(lower.contains("x-api-key: sk-test\r\n"));
        assert!(
            !lower.contains("x-drop-me") && !request.contains(endpoint.token()),
            "{request}"
        );
        assert!(request.ends_with(body));
        endpoint.stop().await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_restarted_endpoint_still_takes_what_pods_pushed_before() {
        let served = served();
        let endpoint = served.endpoint(None).await;
        let start_ref = endpoint.offer("n", &served.start).unwrap();
        let (url, token) = (endpoint.git_url(), endpoint.token().to_string());
        let pod = served.empty_dir("n");
        let pod_str = pod.to_str().unwrap();
        let out = pod_sh(&fetch_script(&url, TOKEN_VAR, &start_ref, pod_str), &token).await;
        assert!(out.status.success(), "{}", stderr(&out));
        std::fs::write(pod.join("a.txt"), "before the restart\n").unwrap();
        let out = pod_sh(&push_script(&url, TOKEN_VAR, RUN, "n", pod_str), &token).await;
        assert!(out.status.success(), "{}", stderr(&out));
        let pushed = git(&pod, &["rev-parse", "HEAD"]);

        // The driver goes away: dropping the endpoint stops it listening, the transport stays.
        let authority = url["http://".len()..]
            .split('/')
            .next()
            .unwrap()
            .to_string();
        drop(endpoint);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(tokio::net::TcpStream::connect(&authority).await.is_err());
        assert!(served.transport().join("objects").is_dir());

        // Started again with the same token on the same address, for pods still running.
        let listen: SocketAddr = authority.parse().unwrap();
        let endpoint = Endpoint::start_with_token(
            RUN,
            &served.git_dir(),
            &served.transport(),
            listen,
            "127.0.0.1",
            None,
            token.clone(),
        )
        .await
        .unwrap();
        assert_eq!(endpoint.git_url(), url);
        assert_eq!(endpoint.take("n").unwrap(), Some(pushed));
        std::fs::write(pod.join("a.txt"), "after the restart\n").unwrap();
        let out = pod_sh(&push_script(&url, TOKEN_VAR, RUN, "n", pod_str), &token).await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert_eq!(
            endpoint.take("n").unwrap(),
            Some(git(&pod, &["rev-parse", "HEAD"]))
        );
        assert!(Endpoint::start_with_token(
            "other",
            &served.git_dir(),
            &served.dir.path().join("t.git"),
            SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)),
            "127.0.0.1",
            None,
            "short".into(),
        )
        .await
        .is_err());
        endpoint.stop().await;
    }

    #[test]
    fn names_and_addresses_are_checked() {
        assert_eq!(with_port("10.0.0.1", 8080).unwrap(), "10.0.0.1:8080");
        assert_eq!(with_port("10.0.0.1:9", 8080).unwrap(), "10.0.0.1:9");
        assert_eq!(with_port("host.example", 1).unwrap(), "host.example:1");
        assert_eq!(with_port("[::1]", 1).unwrap(), "[::1]:1");
        assert_eq!(with_port("[::1]:2", 1).unwrap(), "[::1]:2");
        for bad in ["", "a:b", "a:99999", "[::1", "[::1]x", "a/b", "u@h", "a b"] {
            assert!(with_port(bad, 1).is_err(), "{bad}");
        }
        assert!(check_run_id(RUN).is_ok());
        for bad in [
            "", "-x", ".x", "a..b", "a/b", "a b", "a\nb", "x.lock", "a%2f",
        ] {
            assert!(check_run_id(bad).is_err(), "{bad:?}");
        }
        let api = ModelApi::parse("http://127.0.0.1:4000/base/").unwrap();
        assert_eq!(
            (api.authority.as_str(), api.base_path.as_str()),
            ("127.0.0.1:4000", "/base")
        );
        assert_eq!(
            ModelApi::parse("http://api.local").unwrap().authority,
            "api.local:80"
        );
        for bad in [
            "https://api.anthropic.com",
            "http://",
            "http://u:p@h/",
            "http://h/?q",
            "ftp://h",
        ] {
            assert!(ModelApi::parse(bad).is_err(), "{bad}");
        }
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn scripts_quote_what_they_are_given() {
        let hostile = "/tmp/it's $(touch /tmp/pwned) `x`";
        let script = fetch_script(
            "http://h:1/git/r.git",
            "TOKEN",
            "refs/ccluster/r/start/a",
            hostile,
        );
        assert!(script.contains(&sh_quote(hostile)));
        assert!(script.contains("Bearer ${TOKEN}"));
        let script = push_script("http://h:1/git/r.git", "TOKEN", "r", "it's", hostile);
        assert!(
            script.contains(&sh_quote(hostile))
                && script.contains(&sh_quote("+HEAD:refs/ccluster/r/it's"))
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn bad_arguments_are_errors() {
        let served = served();
        let listen = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0));
        let err = Endpoint::start(
            "a/b",
            &served.git_dir(),
            &served.transport(),
            listen,
            "127.0.0.1",
            None,
        )
        .await
        .err()
        .unwrap();
        assert!(err.contains("cannot name"), "{err}");
        let err = Endpoint::start(
            RUN,
            &served.dir.path().join("none"),
            &served.transport(),
            listen,
            "127.0.0.1",
            None,
        )
        .await
        .err()
        .unwrap();
        assert!(err.contains("not a git directory"), "{err}");
        let endpoint = served.endpoint(None).await;
        assert!(endpoint.offer("s", "HEAD").is_err());
        assert!(endpoint.offer("s", &"e".repeat(40)).is_err());
        assert!(endpoint.offer("a..b", &served.start).is_err());
        assert!(endpoint.offer("a\nb", &served.start).is_err());
        assert!(endpoint.take("start/s").is_err());
        assert!(endpoint.take("x y").is_err());
        assert_eq!(endpoint.take("nothing").unwrap(), None);
        endpoint.stop().await;
    }
}
