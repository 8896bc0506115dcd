//! The dashboard in a real headless Chromium, against a real `ccluster serve`, while real rehearsed
//! runs (`apply --rehearse`, the real `claude` CLI against the scripted model) go on: what a person
//! would see, checked through chromedriver's WebDriver API.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::apply::Sandbox;
use crate::support::{claude_bin, root};

/// A child process killed (by its PID) and reaped when the test is done with it, whatever happens.
struct Reaped {
    child: Child,
    what: &'static str,
}

impl Reaped {
    fn new(child: Child, what: &'static str) -> Reaped {
        Reaped { child, what }
    }

    /// Waits for the process to exit by itself, for at most `timeout`; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not end within {timeout:?}",
                self.what
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// A TCP port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP client for loopback only: no proxy from the environment, and error statuses are
/// answers to look at rather than errors.
pub(crate) fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .proxy(None)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into()
}

/// Where a test leaves its screenshots: kept after the test, under the target directory.
fn artifacts_dir(test: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("dashboard")
        .join(test);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

// ---------------------------------------------------------------------------------------------
// `ccluster serve`

struct Server {
    process: Reaped,
    base: String,
    log: PathBuf,
}

impl Server {
    /// Starts `ccluster serve` on a free loopback port over `repo` and waits for its health check.
    fn start(repo: &Path, logs: &Path) -> Server {
        let port = free_port();
        let log = logs.join("serve.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ccluster"))
            .args(["serve", "--addr", &format!("127.0.0.1:{port}"), "--repo"])
            .arg(repo)
            .current_dir(repo)
            .env("CCLUSTER_CLAUDE_BIN", claude_bin())
            .env_remove("CCLUSTER_STATE_DIR")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start ccluster serve");
        let mut server = Server {
            process: Reaped::new(child, "ccluster serve"),
            base: format!("http://127.0.0.1:{port}"),
            log,
        };
        let agent = http();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = agent.get(format!("{}/api/v1/health", server.base)).call() {
                if r.status() == 200 {
                    break;
                }
            }
            if let Some(status) = server.process.child.try_wait().unwrap() {
                panic!("ccluster serve exited ({status}): {}", server.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "ccluster serve never answered /api/v1/health: {}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Chromium through chromedriver's WebDriver API (W3C)

/// The key WebDriver names `Enter`, `Escape` and `Tab` with (W3C WebDriver, "Keyboard actions").
const ENTER: &str = "\u{E007}";
const ESCAPE: &str = "\u{E00C}";
const TAB: &str = "\u{E004}";

/// The key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Browser {
    http: ureq::Agent,
    driver: String,
    session: String,
    _driver_process: Reaped,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium session through it. Chromium
    /// and chromedriver come from `scripts/chromium-for-tests.sh`; the test fails when they
    /// cannot be had.
    fn start() -> Browser {
        let (chromium, chromedriver) = chromium_bins();
        let port = free_port();
        let driver_log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(&chromedriver)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(driver_log.reopen().unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {chromedriver}: {e}"));
        let driver_process = Reaped::new(child, "chromedriver");
        let driver = format!("http://127.0.0.1:{port}");
        let http = http();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("{driver}/status"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_json::<Value>().ok())
                .is_some_and(|v| v["value"]["ready"] == true);
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver never became ready: {}",
                std::fs::read_to_string(driver_log.path()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".to_string(),
            "--disable-gpu".to_string(),
            format!("--user-data-dir={}", profile.path().display()),
            "--window-size=1440,900".to_string(),
            // Nothing beyond loopback: no host name resolves, and everything else would go to a
            // proxy that is not there (loopback bypasses proxies).
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"
                .to_string(),
            "--proxy-server=http://127.0.0.1:9".to_string(),
            "--no-first-run".to_string(),
            "--disable-background-networking".to_string(),
            "--disable-component-update".to_string(),
            "--disable-sync".to_string(),
            "--disable-extensions".to_string(),
            "--disable-dev-shm-usage".to_string(),
        ];
        let answer = webdriver(
            &http,
            "POST",
            &format!("{driver}/session"),
            Some(json!({
                "capabilities": {
                    "alwaysMatch": {
                        "browserName": "chrome",
                        // A dialog stays up until the test answers it.
                        "unhandledPromptBehavior": "ignore",
                        // The page's console, read back by `script_errors`.
                        "goog:loggingPrefs": { "browser": "ALL" },
                        "goog:chromeOptions": { "binary": chromium, "args": args },
                    }
                }
            })),
        )
        .unwrap_or_else(|e| panic!("cannot start a Chromium session: {e}"));
        let session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {answer}"))
            .to_string();
        Browser {
            http,
            driver,
            session,
            _driver_process: driver_process,
            _profile: profile,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}/session/{}{path}", self.driver, self.session);
        webdriver(&self.http, method, &url, body)
    }

    fn must(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.call(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn goto(&self, url: &str) {
        self.must("POST", "/url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page with `arguments`; its return value.
    fn js(&self, script: &str, args: Value) -> Value {
        self.must(
            "POST",
            "/execute/sync",
            Some(json!({ "script": script, "args": args })),
        )
    }

    /// The element matching `css`, if any.
    fn find(&self, css: &str) -> Option<String> {
        self.call(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        )
        .ok()
        .and_then(|v| v[ELEMENT].as_str().map(str::to_string))
    }

    /// Waits for the element matching `css` (the test fails after `timeout`).
    fn wait_for(&self, css: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(id) = self.find(css) {
                return id;
            }
            assert!(
                Instant::now() < deadline,
                "no `{css}` on the page after {timeout:?}; the page shows:\n{}",
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until `script` returns something truthy (not null, false, 0 or ""); that value.
    fn wait_js(&self, what: &str, timeout: Duration, script: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.js(script, json!([]));
            let truthy = match &v {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                _ => true,
            };
            if truthy {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not so after {timeout:?}; the page shows:\n{}",
                self.text("body")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the element matching `css` as a mouse would (WebDriver's element click). A live
    /// page may replace the element between finding and clicking it: then it is found again.
    fn click(&self, css: &str) {
        for _ in 0..5 {
            let id = self.wait_for(css, Duration::from_secs(10));
            match self.call("POST", &format!("/element/{id}/click"), Some(json!({}))) {
                Ok(_) => return,
                Err(e) if e.contains("stale element") => continue,
                Err(e) => panic!("click on `{css}`: {e}"),
            }
        }
        panic!("`{css}` was replaced every time it was clicked");
    }

    /// Types `text` into the element matching `css` (focusing it first).
    fn type_into(&self, css: &str, text: &str) {
        let id = self.wait_for(css, Duration::from_secs(10));
        self.must(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        );
    }

    /// Replaces the value of the input matching `css` by typing `text` into it.
    fn set_value(&self, css: &str, text: &str) {
        let id = self.wait_for(css, Duration::from_secs(10));
        self.must("POST", &format!("/element/{id}/clear"), Some(json!({})));
        self.type_into(css, text);
    }

    /// Waits for the page's dialog (`confirm`), checks it says `expected`, and accepts it.
    fn accept_dialog(&self, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let text = loop {
            if let Ok(text) = self.call("GET", "/alert/text", None) {
                break text;
            }
            assert!(Instant::now() < deadline, "no dialog came up");
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            text.as_str().is_some_and(|t| t.contains(expected)),
            "the dialog says {text}"
        );
        self.must("POST", "/alert/accept", Some(json!({})));
    }

    /// Presses and releases `key` where the focus is.
    fn press(&self, key: &str) {
        self.must(
            "POST",
            "/actions",
            Some(
                json!({ "actions": [{ "type": "key", "id": "keyboard", "actions": [
                { "type": "keyDown", "value": key }, { "type": "keyUp", "value": key }
            ] }] }),
            ),
        );
    }

    /// The visible text of the element matching `css` ("" when there is none).
    fn text(&self, css: &str) -> String {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({
                "script": "const e = document.querySelector(arguments[0]); return e ? (e.innerText ?? e.textContent) : '';",
                "args": [css],
            })),
        )
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
    }

    /// An attribute of the element matching `css` (None when the element or attribute is not there).
    fn attr(&self, css: &str, name: &str) -> Option<String> {
        let id = self.find(css)?;
        self.call("GET", &format!("/element/{id}/attribute/{name}"), None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// Errors the page's scripts logged or threw since the last call (chromedriver's log of the
    /// browser console). Failed requests are left out: the page asks for things that may not be
    /// there (a diff of a task that changed nothing) and says so itself.
    fn script_errors(&self) -> Vec<String> {
        let log = self.must("POST", "/se/log", Some(json!({ "type": "browser" })));
        log.as_array()
            .into_iter()
            .flatten()
            .filter(|entry| entry["level"] == "SEVERE")
            .filter_map(|entry| entry["message"].as_str())
            .filter(|m| !m.contains("Failed to load resource"))
            .map(str::to_string)
            .collect()
    }

    /// Saves a PNG of the window.
    fn screenshot(&self, path: &Path) {
        let b64 = self.must("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("base64 screenshot"));
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::write(path, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call("DELETE", "", None);
    }
}

/// One WebDriver call: its `value`, or the error WebDriver answered with.
fn webdriver(
    http: &ureq::Agent,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let answer = match (method, body) {
        ("GET", _) => http.get(url).call(),
        ("DELETE", _) => http.delete(url).call(),
        (_, Some(body)) => http.post(url).send_json(&body),
        (_, None) => http.post(url).send_json(json!({})),
    };
    let mut answer = answer.map_err(|e| format!("{method} {url}: {e}"))?;
    let status = answer.status();
    let v: Value = answer
        .body_mut()
        .with_config()
        .limit(64 * 1024 * 1024)
        .read_json()
        .map_err(|e| format!("{method} {url}: {status}, not JSON: {e}"))?;
    if status.is_success() {
        Ok(v["value"].clone())
    } else {
        Err(format!(
            "{status} {}: {}",
            v["value"]["error"], v["value"]["message"]
        ))
    }
}

/// Chromium and chromedriver, installed by `scripts/chromium-for-tests.sh` when missing.
fn chromium_bins() -> (String, String) {
    static BINS: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    BINS.get_or_init(|| {
        let out = Command::new(root().join("scripts/chromium-for-tests.sh"))
            .output()
            .expect("run scripts/chromium-for-tests.sh");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "cannot get Chromium and chromedriver: {}{}",
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        let get = |key: &str| {
            stdout
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {stdout}"))
                .to_string()
        };
        (get("CHROMIUM="), get("CHROMEDRIVER="))
    })
    .clone()
}

/// Standard base64 (the screenshots WebDriver sends).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text
        .bytes()
        .filter(|c| !c.is_ascii_whitespace() && *c != b'=')
        .map(value)
        .collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | (u32::from(*d) << (18 - 6 * i)));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Runs to watch

/// `apply --rehearse` in the sandbox, as a separate process, with the pinned `claude` CLI.
fn spawn_rehearsal(s: &Sandbox, extra: &[&str]) -> Reaped {
    let mut args = vec![
        "apply",
        "--rehearse",
        "--output",
        "json",
        "--grace-period",
        "1s",
    ];
    args.extend_from_slice(extra);
    let child = s
        .command(&args)
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start ccluster apply");
    Reaped::new(child, "ccluster apply")
}

/// The `data-state` of every graph box, `group=state`, sorted: what the graph shows.
const GRAPH_STATES: &str = "return [...document.querySelectorAll('#graph [data-group]')]\
    .map(e => e.dataset.group + '=' + e.dataset.state).sort().join(' ');";

const SECOND: Duration = Duration::from_secs(1);

/// Shell tasks held by gate files (the test opens them), a worktree task that writes a file, and
/// an agent whose scripted model answers slowly, turn by turn.
const WATCHED: &str = r#"version = 1
[workflow]
name = "watched"
result = "write"

[defaults]
max_run_usd = 5.0

[tasks.prepare]
run = "while [ ! -f GATE/prepare ]; do sleep 0.1; done; echo '{\"items\": [\"a\", \"b\", \"c\"]}'"
output = "json"

[tasks.fan]
needs = ["prepare"]
map = "{{ tasks.prepare.output.items }}"
run = "echo waiting for the gate; while [ ! -f GATE/fan ]; do sleep 0.1; done; echo released {{ item }}"

[tasks.write]
needs = ["prepare"]
workspace = "worktree"
run = "printf 'hello from the dashboard\n' > greeting.txt; echo 'wrote <img src=x onerror=window.pwned=1>'"

[tasks.notes]
needs = ["prepare"]
prompt = "Write three notes"
env = { CLAUDE_CODE_MAX_RETRIES = "1" }

[tasks.flaky]
needs = ["prepare"]
run = "if [ ! -f GATE/flaky-failed ]; then touch GATE/flaky-failed; echo first try fails; exit 3; fi; echo second try"
retry = { limit = 1, backoff = { initial = "3s", jitter = 0.0 } }

[tasks.finish]
needs = ["fan", "write", "notes"]
run = "echo finished"
"#;

const WATCHED_SCRIPT: &str = r#"turn_delay_ms = 1200

[tasks.notes]
# A 429 that does not say when to come back passes the run's model gateway: the worker retries it.
faults = [{ status = 429 }]
turns = [
  { text = "Writing the first note", tools = [{ name = "Write", input = { file_path = "{{cwd}}/notes/one.md", content = "one\n" } }] },
  { tools = [{ name = "Write", input = { file_path = "/tmp/ccluster-dashboard-outside-the-tree.txt", content = "x" } }] },
  { tools = [{ name = "Write", input = { file_path = "{{cwd}}/notes/two.md", content = "two\n" } }] },
  { tools = [{ name = "Write", input = { file_path = "{{cwd}}/notes/three.md", content = "three\n" } }] },
  { tools = [{ name = "Read", input = { file_path = "{{cwd}}/notes/one.md" } }] },
  { text = "three notes written" },
]
"#;

#[test]
fn dashboard_shows_a_rehearsed_run_live_its_graph_transcript_and_diff() {
    let artifacts = artifacts_dir("live");
    let gates = tempfile::tempdir().unwrap();
    let s = Sandbox::in_repo(
        &WATCHED.replace("GATE", &gates.path().display().to_string()),
        &[("README", "base\n")],
    );
    s.file("script.toml", WATCHED_SCRIPT).unwrap();
    let server = Server::start(s.path(), &artifacts);
    let browser = Browser::start();

    // The runs list is open before the run starts: the run appears on it by itself.
    browser.goto(&format!("{}/#/", server.base));
    browser.wait_for("#runs", 10 * SECOND);
    let mut apply = spawn_rehearsal(&s, &["--script", "script.toml", "--jobs", "4"]);
    let row = "#runs [data-run]";
    browser.wait_for(row, 60 * SECOND);
    let run = browser.attr(row, "data-run").unwrap();
    browser.wait_js(
        "the run's row says it is running, with its workflow",
        30 * SECOND,
        "const r = document.querySelector('#runs [data-run]'); \
         return r.dataset.state === 'running' && r.innerText.includes('watched');",
    );
    browser.screenshot(&artifacts.join("runs.png"));

    // Enter on the row opens the run.
    let row_id = browser.find(row).unwrap();
    browser.must(
        "POST",
        &format!("/element/{row_id}/value"),
        Some(json!({ "text": ENTER })),
    );
    browser.wait_js(
        "the run page is open",
        10 * SECOND,
        &format!("return location.hash === '#/runs/{run}';"),
    );
    browser.wait_for(
        "#graph [data-group='prepare'][data-state='running']",
        30 * SECOND,
    );
    // The fan-out maps over what `prepare` will print: its box waits for its instances.
    assert_eq!(
        browser
            .attr("#graph [data-group='fan']", "data-count")
            .as_deref(),
        Some("0")
    );
    assert!(browser
        .text("#graph [data-group='fan']")
        .contains("instances to come"));
    let edges = browser.js(
        "return document.querySelectorAll('#graph path.edge').length;",
        json!([]),
    );
    assert_eq!(
        edges, 7,
        "prepare→fan,write,notes,flaky; fan,write,notes→finish"
    );
    assert_eq!(
        browser.js(GRAPH_STATES, json!([])),
        "fan=pending finish=pending flaky=pending notes=pending prepare=running write=pending"
    );
    assert!(
        browser.text("#summary").contains("0/5"),
        "{}",
        browser.text("#summary")
    );
    // From here on, the page is never reloaded: every change below comes over the event stream.
    browser.js("window.stillTheSamePage = true;", json!([]));

    std::fs::write(gates.path().join("prepare"), "").unwrap();
    browser.wait_for(
        "#graph [data-group='prepare'][data-state='succeeded']",
        30 * SECOND,
    );
    // A task that fails once waits for its retry, then succeeds at its second attempt.
    browser.wait_for(
        "#graph [data-node='flaky'][data-state='retrying']",
        30 * SECOND,
    );
    // The map is expanded: one box for the fan-out still, now counting its three instances.
    browser.wait_for("#graph [data-group='fan'][data-count='3']", 30 * SECOND);
    assert!(browser.find("#graph [data-node='fan[0]']").is_none());
    browser.wait_for(
        "#graph [data-group='fan'][data-state='running']",
        30 * SECOND,
    );
    browser.wait_for(
        "#graph [data-node='notes'][data-state='running']",
        60 * SECOND,
    );

    // The agent's transcript grows while it works.
    browser.click("#graph [data-node='notes']");
    browser.wait_js(
        "the task panel shows the agent",
        10 * SECOND,
        "const p = document.getElementById('task-panel'); \
         return !p.hidden && p.innerText.includes('notes') && location.hash.endsWith('/tasks/notes');",
    );
    let count = "return document.querySelectorAll('#transcript li').length;";
    let first = browser
        .wait_js("the transcript has entries", 60 * SECOND, count)
        .as_u64()
        .unwrap();
    browser.wait_js(
        "the transcript grows as the agent works",
        60 * SECOND,
        &format!("return document.querySelectorAll('#transcript li').length > {first};"),
    );
    browser.wait_js(
        "a tool call is in the transcript",
        60 * SECOND,
        "return [...document.querySelectorAll('#transcript li[data-kind=\"tool\"]')]\
            .some(e => e.innerText.includes('Write'));",
    );
    browser.screenshot(&artifacts.join("transcript-running.png"));
    if std::env::var("CCLUSTER_UPDATE_SCREENSHOT").as_deref() == Ok("1") {
        browser.screenshot(&root().join("docs/dashboard.png"));
    }

    // The CLI's own retry of a rate-limited call, and a tool call the permissions refused.
    browser.wait_js(
        "the transcript shows the API retry and the denied tool call",
        60 * SECOND,
        "return document.querySelector('#transcript li[data-kind=\"api_retry\"]') \
            && [...document.querySelectorAll('#transcript li[data-kind=\"denied\"]')]\
                .some(e => e.innerText.includes('Write'));",
    );
    browser.screenshot(&artifacts.join("transcript.png"));

    // The finished worktree task's diff, rendered as a diff.
    browser.wait_for(
        "#graph [data-node='write'][data-state='succeeded']",
        60 * SECOND,
    );
    browser.click("#graph [data-node='write']");
    browser.wait_js(
        "the panel shows `write`",
        10 * SECOND,
        "return location.hash.endsWith('/tasks/write') && document.getElementById('tab-diff');",
    );
    browser.click("#tab-diff");
    let added = browser.wait_js(
        "the diff shows the added line",
        20 * SECOND,
        "const l = [...document.querySelectorAll('#diff .line.add')]\
            .find(e => e.textContent.includes('hello from the dashboard')); \
         return l ? getComputedStyle(l).backgroundColor : null;",
    );
    let context = browser.js(
        "const l = document.querySelector('#diff .line.ctx, #diff .line.meta'); \
         return l ? getComputedStyle(l).backgroundColor : 'none';",
        json!([]),
    );
    assert_ne!(added, context, "added lines are coloured");
    assert!(browser.text("#diff").contains("greeting.txt"));
    browser.screenshot(&artifacts.join("diff.png"));

    // Esc closes the panel.
    browser.press(ESCAPE);
    browser.wait_js(
        "Esc closed the panel",
        5 * SECOND,
        &format!(
            "return document.getElementById('task-panel').hidden && location.hash === '#/runs/{run}';"
        ),
    );

    // A running task's log, followed: what it prints next appears by itself.
    browser.click(".task-row[data-node='fan[0]']");
    browser.click("#tab-log");
    browser.wait_js(
        "the log shows what the task printed so far",
        20 * SECOND,
        "return document.getElementById('log')?.textContent.includes('waiting for the gate');",
    );
    // The fan-out's instances finish; then the run.
    std::fs::write(gates.path().join("fan"), "").unwrap();
    browser.wait_js(
        "the followed log shows the task's last line",
        30 * SECOND,
        "const log = document.getElementById('log')?.textContent ?? ''; \
         return log.includes('waiting for the gate') && log.includes('released a');",
    );
    browser.screenshot(&artifacts.join("log.png"));
    browser.press(ESCAPE);
    browser.wait_js(
        "every box is succeeded",
        120 * SECOND,
        "return [...document.querySelectorAll('#graph [data-group]')]\
            .every(e => e.dataset.state === 'succeeded');",
    );
    assert_eq!(apply.wait_exit(60 * SECOND), 0);
    browser.wait_js(
        "the run is shown succeeded, with every task done",
        30 * SECOND,
        "return document.querySelector('#run-state .badge')?.textContent === 'succeeded' \
            && document.getElementById('summary').innerText.includes('8/8');",
    );
    // The cost so far against the run's budget, with a meter.
    let cost = browser.text("#summary [data-stat='cost']");
    assert!(cost.contains("of $5.00"), "{cost}");
    assert_eq!(
        browser.js(
            "return Number(document.querySelector('#summary meter.budget')?.max);",
            json!([])
        ),
        5.0
    );
    // `flaky`'s two attempts: the failed one, then the one that succeeded.
    assert_eq!(
        browser.text(".task-row[data-node='flaky'] .t-attempts"),
        "×2"
    );
    browser.click(".task-row[data-node='flaky']");
    browser.click("#tab-attempts");
    let attempts = browser.wait_js(
        "the attempts tab lists both attempts",
        20 * SECOND,
        "const rows = [...document.querySelectorAll('#attempts tbody tr')]; \
         return rows.length === 2 ? rows.map(r => r.innerText.replace(/\\s+/g, ' ')) : null;",
    );
    let attempts: Vec<&str> = attempts
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        attempts[0].contains("failed") && attempts[0].contains(" 3 "),
        "{attempts:?}"
    );
    assert!(attempts[1].contains("succeeded"), "{attempts:?}");
    browser.press(ESCAPE);
    // `write`'s artifacts: its patch, a link that downloads the diff.
    browser.click(".task-row[data-node='write']");
    browser.click("#tab-artifacts");
    let patch = browser.wait_js(
        "the patch is among the artifacts, as a link",
        20 * SECOND,
        "const a = [...document.querySelectorAll('#artifacts a')]\
            .find(a => a.textContent.endsWith('patch.diff')); \
         return a ? a.getAttribute('href') : null;",
    );
    let patch = patch.as_str().unwrap().to_string();
    let body = browser.js(
        "return fetch(arguments[0]).then(r => r.text());",
        json!([patch]),
    );
    assert!(
        body.as_str().unwrap().contains("+hello from the dashboard"),
        "{patch}: {body}"
    );
    browser.press(ESCAPE);
    assert_eq!(
        browser.js("return window.stillTheSamePage === true;", json!([])),
        true,
        "the page was reloaded"
    );
    browser.screenshot(&artifacts.join("finished.png"));

    // Text from the work is shown as text, never made into elements.
    assert_eq!(
        browser.text(".task-row[data-node='write'] .t-msg"),
        "wrote <img src=x onerror=window.pwned=1>"
    );
    assert_eq!(
        browser.js(
            "return document.querySelectorAll('img').length + (window.pwned ? 100 : 0);",
            json!([])
        ),
        0
    );

    // The run's report and the diff of its result.
    browser.click("#tab-report");
    browser.wait_js(
        "the report is drawn from its markdown: the run in its heading, a table of the tasks",
        30 * SECOND,
        &format!(
            "const r = document.getElementById('report-body'); \
             return r && r.querySelector('h2, h3')?.textContent.includes('{run}') \
                && [...r.querySelectorAll('table td code')].some(c => c.textContent === 'notes') \
                && !r.textContent.includes('**');"
        ),
    );
    browser.screenshot(&artifacts.join("report.png"));
    // The finished agent's transcript ends with its result and what it cost.
    browser.click("#tab-tasks");
    browser.click(".task-row[data-node='notes']");
    browser.wait_js(
        "the transcript ends with the result and its cost",
        30 * SECOND,
        "const last = [...document.querySelectorAll('#transcript li')].pop(); \
         return last?.dataset.kind === 'result' \
            && last.querySelector('.entry-cost')?.textContent.startsWith('$') \
            && last.innerText.includes('three notes written');",
    );
    browser.press(ESCAPE);
    browser.click("#tab-result");
    browser.wait_js(
        "the result's diff shows the file `write` added",
        30 * SECOND,
        "return [...document.querySelectorAll('#result-diff .line.add')]\
            .some(e => e.textContent.includes('hello from the dashboard'));",
    );
    eprintln!("screenshots in {}", artifacts.display());
    assert_eq!(browser.script_errors(), Vec::<String>::new());
}

#[test]
fn dashboard_cancels_a_run_and_works_with_the_keyboard() {
    let artifacts = artifacts_dir("cancel");
    let s = Sandbox::in_repo(
        r#"version = 1
[workflow]
name = "cancellable"

[tasks.slow]
run = "sleep 120"

[tasks.after]
needs = ["slow"]
run = "echo never"
"#,
        &[],
    );
    let server = Server::start(s.path(), &artifacts);
    let browser = Browser::start();
    let mut apply = spawn_rehearsal(&s, &[]);
    browser.goto(&format!("{}/#/", server.base));
    browser.click("#runs [data-run]");
    browser.wait_for(
        "#graph [data-node='slow'][data-state='running']",
        60 * SECOND,
    );

    // Tab reaches the graph's boxes; the focused one is drawn with a focus ring; Enter opens it.
    browser.js("document.activeElement?.blur(); window.focus();", json!([]));
    let mut reached = false;
    for _ in 0..20 {
        browser.press(TAB);
        let focused = browser.js(
            "return document.activeElement?.getAttribute('data-node');",
            json!([]),
        );
        if focused == "slow" {
            reached = true;
            break;
        }
    }
    assert!(reached, "Tab never reached the `slow` box");
    let ring = browser.js(
        "return getComputedStyle(document.activeElement.querySelector('.node-box')).strokeWidth;",
        json!([]),
    );
    assert_eq!(ring, "3px", "the focused box shows its focus");
    browser.press(ENTER);
    browser.wait_js(
        "Enter opened the task panel",
        10 * SECOND,
        "return !document.getElementById('task-panel').hidden && location.hash.endsWith('/tasks/slow');",
    );
    browser.wait_for("#log", 10 * SECOND);
    browser.press(ESCAPE);
    browser.wait_js(
        "Esc closed it, and the focus is back on the box",
        10 * SECOND,
        "return document.getElementById('task-panel').hidden \
            && document.activeElement?.matches('#graph [data-node=\"slow\"]');",
    );

    // In the task list: arrows move between rows, Enter opens one.
    browser.type_into("#filter", "");
    browser.press(TAB);
    browser.press(TAB);
    browser.wait_js(
        "a task row has the focus",
        5 * SECOND,
        "return document.activeElement?.classList.contains('task-row');",
    );
    browser.js(
        "document.querySelector('.task-row[data-node=\"slow\"]').focus();",
        json!([]),
    );
    browser.press("\u{E015}"); // ArrowDown
    assert_eq!(
        browser.js(
            "return document.activeElement?.getAttribute('data-node');",
            json!([])
        ),
        "after"
    );
    let outline = browser.js(
        "return getComputedStyle(document.activeElement).outlineStyle;",
        json!([]),
    );
    assert_eq!(outline, "solid", "the focused row shows its focus");
    browser.press(ENTER);
    browser.wait_js(
        "Enter on the row opened its task",
        10 * SECOND,
        "return location.hash.endsWith('/tasks/after');",
    );
    browser.press(ESCAPE);

    // Cancel from the page: the run ends cancelled, and the page says so.
    assert_eq!(
        browser.attr("#retry", "disabled").as_deref(),
        Some("true"),
        "a running run cannot be retried"
    );
    browser.click("#cancel");
    browser.accept_dialog("Cancel run");
    assert_eq!(apply.wait_exit(60 * SECOND), 130, "the apply was cancelled");
    browser.wait_js(
        "the page shows the run cancelled",
        30 * SECOND,
        "return document.querySelector('#run-state .badge')?.textContent === 'cancelled' \
            && document.querySelector('#graph [data-node=\"slow\"]').dataset.state === 'cancelled' \
            && document.querySelector('#graph [data-node=\"after\"]').dataset.state === 'cancelled';",
    );
    assert_eq!(browser.attr("#cancel", "disabled").as_deref(), Some("true"));
    assert_eq!(
        browser.attr("#retry", "disabled"),
        None,
        "it can be retried"
    );
    browser.screenshot(&artifacts.join("cancelled.png"));
    let cancelled = browser.js("return location.hash;", json!([]));

    // Retry from the page: the server starts the run again and the page follows it; it is
    // cancelled in turn.
    browser.click("#retry");
    browser.wait_js(
        "the retried run is shown running",
        60 * SECOND,
        "return document.querySelector('#run-state .badge')?.textContent === 'running' \
            && document.querySelector('#graph [data-node=\"slow\"]')?.dataset.state === 'running';",
    );
    let retried = browser.js("return location.hash;", json!([]));
    eprintln!("retry of {cancelled} is {retried}");
    browser.click("#cancel");
    browser.accept_dialog("Cancel run");
    browser.wait_js(
        "the retried run is shown cancelled",
        60 * SECOND,
        "return document.querySelector('#run-state .badge')?.textContent === 'cancelled';",
    );
    // The runs list says who started which.
    browser.goto(&format!("{}/#/", server.base));
    browser.wait_js(
        "the runs list shows the retry as started from the dashboard",
        30 * SECOND,
        "const rows = [...document.querySelectorAll('#runs [data-run]')]; \
         return rows.some(r => r.innerText.includes('server (dashboard/API)')) \
            && rows.some(r => r.innerText.includes('(cli'));",
    );

    // Start a run from the page: a clusterfile that is not there is said; the plan of the one
    // that is, checked; the run started, shown running, and cancelled.
    browser.click("#new-run");
    browser.wait_for("#start-form:not([hidden])", 5 * SECOND);
    browser.set_value("#start-clusterfile", "missing.toml");
    browser.click("#start-plan");
    browser.wait_js(
        "the page says the clusterfile is missing",
        30 * SECOND,
        "return document.querySelector('#start-result .notice.error')?.innerText.includes('missing.toml');",
    );
    browser.set_value("#start-clusterfile", "clusterfile.toml");
    browser.click("#start-plan");
    browser.wait_js(
        "the page shows the plan's size",
        30 * SECOND,
        "return document.getElementById('start-result').innerText.includes('2 plan nodes');",
    );
    browser.click("#start-submit");
    browser.wait_js(
        "the started run is shown running",
        60 * SECOND,
        &format!(
            "return location.hash.startsWith('#/runs/') && location.hash !== {retried} \
                && document.querySelector('#graph [data-node=\"slow\"]')?.dataset.state === 'running';"
        ),
    );
    browser.click("#cancel");
    browser.accept_dialog("Cancel run");
    browser.wait_js(
        "the started run is shown cancelled",
        60 * SECOND,
        "return document.querySelector('#run-state .badge')?.textContent === 'cancelled';",
    );
    assert_eq!(browser.script_errors(), Vec::<String>::new());
}

/// A fan-out of 10,000 shell tasks, held by a gate file until the test opens it.
fn wide_clusterfile(gate: &Path) -> String {
    let items: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
    format!(
        r#"version = 1
[workflow]
name = "wide"

[tasks.list]
run = "echo ready"

[tasks.work]
needs = ["list"]
map = [{}]
run = "while [ ! -f {} ]; do sleep 0.2; done; echo {{{{ item }}}}"

[tasks.sum]
needs = ["work"]
run = "echo done"
"#,
        items.join(", "),
        gate.display()
    )
}

/// How many elements the page holds: the graph's and the task list's stay bounded at any size.
const DOM_SIZES: &str = "return { graph: document.querySelectorAll('#graph svg *').length, \
    boxes: document.querySelectorAll('#graph .node').length, \
    rows: document.querySelectorAll('.task-row').length, \
    all: document.getElementsByTagName('*').length };";

#[test]
fn dashboard_stays_usable_on_a_run_of_10000_tasks() {
    let artifacts = artifacts_dir("wide");
    let gates = tempfile::tempdir().unwrap();
    let gate = gates.path().join("go");
    let s = Sandbox::in_repo(&wide_clusterfile(&gate), &[]);
    let server = Server::start(s.path(), &artifacts);
    let browser = Browser::start();
    // Its events are not read here: they go nowhere (a pipe nobody reads would stop the run).
    let apply = s
        .command(&["apply", "--jobs", "4"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut apply = Reaped::new(apply, "ccluster apply");
    browser.goto(&format!("{}/#/", server.base));
    browser.wait_for("#runs [data-run][data-state='running']", 60 * SECOND);

    // The run page with 10,000 instances: one box for them, counts per state.
    let opened = Instant::now();
    browser.click("#runs [data-run]");
    browser.wait_for(
        "#graph [data-group='work'][data-count='10000'][data-state='running']",
        60 * SECOND,
    );
    browser.wait_js(
        "the task list counts every task",
        30 * SECOND,
        "return document.querySelector('.list-count')?.textContent === '10002 of 10002 tasks';",
    );
    let open_time = opened.elapsed();
    let sizes = browser.js(DOM_SIZES, json!([]));
    eprintln!("10,002 tasks: the page was drawn in {open_time:?}; elements: {sizes}");
    assert_eq!(sizes["boxes"], 3, "{sizes}");
    assert!(sizes["graph"].as_u64().unwrap() < 100, "{sizes}");
    assert!(sizes["rows"].as_u64().unwrap() < 100, "{sizes}");
    assert!(
        open_time < 30 * SECOND,
        "the page took {open_time:?} to show"
    );
    assert!(
        browser
            .text("#graph [data-group='work']")
            .contains("running")
            || browser
                .attr("#graph [data-group='work']", "aria-label")
                .unwrap_or_default()
                .contains("running"),
        "{}",
        browser.text("#graph")
    );

    // Enter on the box lists its instances; End goes to the last one, which is drawn, alone
    // with its neighbours.
    let work = browser.find("#graph [data-group='work']").unwrap();
    browser.must(
        "POST",
        &format!("/element/{work}/value"),
        Some(json!({ "text": ENTER })),
    );
    browser.wait_js(
        "the list shows the fan-out's instances",
        10 * SECOND,
        "return document.querySelector('.list-count')?.textContent === '10000 of 10002 tasks' \
            && document.activeElement?.getAttribute('data-node') === 'work[0]';",
    );
    browser.press("\u{E010}"); // End
    browser.wait_js(
        "End focuses the last instance",
        10 * SECOND,
        "return document.activeElement?.getAttribute('data-node') === 'work[9999]';",
    );
    let sizes = browser.js(DOM_SIZES, json!([]));
    assert!(sizes["rows"].as_u64().unwrap() < 100, "{sizes}");
    browser.press(ENTER);
    browser.wait_js(
        "the last instance's panel is open",
        10 * SECOND,
        "return location.hash.endsWith('/tasks/work%5B9999%5D') \
            && document.getElementById('task-panel').innerText.includes('work[9999]');",
    );
    browser.press(ESCAPE);
    browser.screenshot(&artifacts.join("wide-running.png"));

    // 10,000 tasks end within seconds; their events stream in, and the page keeps up.
    let released = Instant::now();
    std::fs::write(&gate, "").unwrap();
    assert_eq!(apply.wait_exit(300 * SECOND), 0);
    let run_ended = Instant::now();
    eprintln!(
        "the run ended {:?} after the gate opened",
        released.elapsed()
    );
    browser.wait_js(
        "every task is shown done",
        120 * SECOND,
        "return document.getElementById('summary')?.innerText.includes('10002/10002') \
            && document.querySelector('#graph [data-group=\"work\"]').dataset.state === 'succeeded' \
            && document.querySelector('#run-state .badge')?.textContent === 'succeeded';",
    );
    eprintln!(
        "the page showed the 10,000 tasks done {:?} after the gate opened, {:?} after the run ended",
        released.elapsed(),
        run_ended.elapsed()
    );
    let sizes = browser.js(DOM_SIZES, json!([]));
    assert!(sizes["rows"].as_u64().unwrap() < 100, "{sizes}");
    browser.screenshot(&artifacts.join("wide-finished.png"));
    assert_eq!(browser.script_errors(), Vec::<String>::new());
}
