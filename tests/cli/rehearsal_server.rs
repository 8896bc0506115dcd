//! The scripted model server as a process: its per-run token under `apply --rehearse` (reaching
//! the workers, never the records), and `ccluster model-server` at the descriptor limit.

use std::io::{BufRead, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::apply::{Applied, Sandbox};
use crate::support::{claude_bin, git};

pub(crate) use crate::support::files_under;

/// A task whose worker writes its API key, reversed, into its workspace: the only way to see the
/// token from outside, since ccluster never shows it (reversed, so that the worker's own change,
/// kept as the task's patch, does not hold it as it is).
const KEY_WRITER: &str = r#"version = 1
[tasks.spy]
prompt = "write your key"
claude = { allowed_tools = ["Bash"] }
rehearsal = { turns = [{ tools = [{ name = "Bash", input = { command = "printenv ANTHROPIC_API_KEY | rev > key.txt", description = "key" } }] }, { text = "done" }] }
"#;

fn rehearsed_key(s: &Sandbox) -> (String, Applied) {
    let done = Applied::from_output(
        s.command(&[
            "apply",
            "--rehearse",
            "--fresh",
            "--output",
            "json",
            "--grace-period",
            "1s",
        ])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .output()
        .unwrap(),
    );
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    let status = s.status();
    let run = status["run"]["id"].as_str().unwrap().to_string();
    let key = git(
        s.path(),
        &["show", &format!("refs/ccluster/runs/{run}/spy:key.txt")],
    );
    (key.trim().chars().rev().collect(), done)
}

#[test]
fn rehearsed_workers_get_a_fresh_random_token_that_no_record_holds() {
    let s = Sandbox::new(KEY_WRITER);
    std::fs::write(s.path().join(".gitignore"), ".ccluster/\n").unwrap();
    git(s.path(), &["init", "-q", "-b", "main"]);
    git(s.path(), &["add", "-A"]);
    git(s.path(), &["commit", "-q", "-m", "init"]);

    let (first, done) = rehearsed_key(&s);
    assert_eq!(first.len(), 64, "{first}");
    assert!(first.bytes().all(|b| b.is_ascii_hexdigit()), "{first}");
    assert!(!done.stdout.contains(&first) && !done.stderr.contains(&first));
    // Nothing ccluster keeps holds it: records, logs, the rehearsal log, the worker's transcript
    // and config directory.
    for file in files_under(&s.path().join(".ccluster")) {
        let bytes = std::fs::read(&file).unwrap_or_default();
        assert!(
            !bytes.windows(first.len()).any(|w| w == first.as_bytes()),
            "the token reached {}",
            file.display()
        );
    }
    let (second, _) = rehearsed_key(&s);
    assert_eq!(second.len(), 64);
    assert_ne!(first, second, "each run has its own token");
}

/// CPU time (user + system) of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn at_the_descriptor_limit_the_server_waits_instead_of_spinning() {
    let token = "model-server-test-token";
    let mut server = Command::new("sh")
        .args(["-c", "ulimit -n 48 && exec \"$0\" model-server"])
        .arg(env!("CARGO_BIN_EXE_ccluster"))
        .env("CCLUSTER_MODEL_SERVER_TOKEN", token)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(server.stderr.take().unwrap());
    let mut url = String::new();
    stderr.read_line(&mut url).unwrap();
    let addr = url.trim().trim_start_matches("http://").to_string();
    // A token chosen in the environment is not printed.
    let mut rest = String::new();
    let pid = server.id();

    // More idle connections than the process has descriptors for: accepting fails with EMFILE
    // until one closes.
    let idle: Vec<TcpStream> = (0..80)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(pid) - before;
    // A spinning accept loop burns a whole core (about 100 ticks a second).
    assert!(spent < 30, "{spent} ticks in one second");

    // Once they close, the server answers again.
    drop(idle);
    let body = r#"{"model":"m","stream":false,"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /v1/messages HTTP/1.1\r\nx-api-key: {token}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    for _ in 0..50 {
        let mut stream = TcpStream::connect(&addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        answer.clear();
        let _ = stream.read_to_string(&mut answer);
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = server.kill();
    let _ = server.wait();
    stderr.read_to_string(&mut rest).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(!rest.contains(token), "{rest}");
}
