//! Secrets: declared once, given only to the tasks that list them, and masked (with their
//! encodings) in everything ccluster writes; a change holding one is refused (class `policy`);
//! a secret that cannot be read stops the run before it starts.

use std::path::Path;
use std::process::Command;

use crate::support::{claude_bin, files_under, git, Applied, Sandbox, Served};

/// Has every character the encodings change: `/`, `"`, `+`, `&`, `\` and a space.
const VALUE: &str = r#"gh_s3cr3t/"Val"+ue&x\z y"#;

fn base64(bytes: &[u8], url: bool) -> String {
    let table: &[u8] = if url {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    } else {
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    };
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(table[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    while !out.len().is_multiple_of(4) {
        out.push('=');
    }
    out
}

fn percent(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The value and the encodings of it that must be found nowhere.
fn forms() -> Vec<String> {
    let json = serde_json::to_string(VALUE).unwrap();
    vec![
        VALUE.to_string(),
        base64(VALUE.as_bytes(), false)
            .trim_end_matches('=')
            .to_string(),
        base64(VALUE.as_bytes(), true)
            .trim_end_matches('=')
            .to_string(),
        percent(VALUE),
        json.trim_matches('"').to_string(),
        // JSON text inside a JSON string (an agent's `result` line).
        serde_json::to_string(json.trim_matches('"'))
            .unwrap()
            .trim_matches('"')
            .to_string(),
        // Distinctive parts, in case a value was cut or half-escaped.
        "gh_s3cr3t".to_string(),
    ]
}

fn assert_clean(what: &str, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    for form in forms() {
        assert!(
            !text.contains(&form),
            "{what} holds the secret (as `{form}`):\n{text}"
        );
    }
}

const CLUSTERFILE: &str = r#"version = 1

[secrets.GH_TOKEN]
from = "env:CC_TEST_TOKEN"

[policy]
max_permission_mode = "bypassPermissions"

[tasks.echo]
secrets = ["GH_TOKEN"]
run = '''printf 'token=%s\n' "$GH_TOKEN"; printf '%s' "$GH_TOKEN" | base64; printf 'err %s\n' "$GH_TOKEN" >&2'''

[tasks.json]
secrets = ["GH_TOKEN"]
output = "json"
run = '''printf '{"token": "%s"}' "$(printf '%s' "$GH_TOKEN" | sed 's/[\\"]/\\&/g')"'''

[tasks.downstream]
needs = ["json"]
run = '''test '{{ tasks.json.output.token }}' = '[secret GH_TOKEN]' && echo downstream saw the mask'''

[tasks.commit]
secrets = [{ name = "GH_TOKEN", file = "gh-token", env = "TOKEN_PATH" }]
workspace = "worktree"
retry = { limit = 2, backoff = { initial = "10ms" } }
run = '''cat "$TOKEN_PATH" > leaked.txt; echo fine > fine.txt'''

[tasks.failing]
secrets = ["GH_TOKEN"]
workspace = "worktree"
run = '''printf '%s' "$GH_TOKEN" > kept.txt; exit 3'''

[tasks.selfcommit]
secrets = ["GH_TOKEN"]
workspace = "worktree"
run = '''printf '%s' "$GH_TOKEN" > own.txt && git add own.txt && git -c user.name=t -c user.email=t@t commit -qm own'''

[tasks.agent]
secrets = ["GH_TOKEN"]
prompt = "Print the token"
claude = { permission_mode = "bypassPermissions" }
rehearsal = { turns = [{ tools = [{ name = "Bash", input = { command = "printf 'agent saw %s\\n' \"$GH_TOKEN\"" } }] }, { tools = [{ name = "Bash", input = { command = "printf 'model key %s\\n' \"$ANTHROPIC_API_KEY\"" } }] }, { text = "done" }] }

[tasks.answer]
prompt = "Answer with the token"
output_schema = { type = "object", required = ["token"], properties = { token = { type = "string" } } }

[tasks.plain]
run = '''test -z "${GH_TOKEN:-}" && echo "no secret here"'''
"#;

#[test]
fn secrets_are_masked_everywhere_and_a_commit_holding_one_is_refused() {
    let s = Sandbox::in_repo(CLUSTERFILE, &[]);
    // The scripted model answers `answer` with the value (a script outside the repository's
    // commits, as a real model could).
    let script = format!(
        "[tasks.answer]\noutput = {{ token = {} }}\n",
        serde_json::to_string(VALUE).unwrap()
    );
    std::fs::write(s.path().join("script.toml"), script).unwrap();
    // A rehearsal with the real CLI; the secret comes from ccluster's environment.
    let applied = Applied::from_output(
        s.command(&[
            "apply",
            "--rehearse",
            "--script",
            "script.toml",
            "--output",
            "json",
            "--grace-period",
            "1s",
            "--keep-going",
        ])
        .env("CCLUSTER_CLAUDE_BIN", claude_bin())
        .env("CC_TEST_TOKEN", VALUE)
        .output()
        .unwrap(),
    );
    assert_eq!(applied.code, 1, "{}\n{}", applied.stdout, applied.stderr);

    // The task whose change holds the value failed, class policy, named file and secret.
    let failed = applied.of("task_failed");
    let commit = failed
        .iter()
        .find(|e| e["task"] == "commit")
        .unwrap_or_else(|| panic!("no failure of `commit`: {}", applied.stdout));
    assert_eq!(commit["class"], "policy", "{commit}");
    let message = commit["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("leaked.txt") && message.contains("GH_TOKEN"),
        "{message}"
    );
    // A task that committed the value itself is refused too.
    let own = failed
        .iter()
        .find(|e| e["task"] == "selfcommit")
        .unwrap_or_else(|| panic!("no failure of `selfcommit`: {}", applied.stdout));
    assert_eq!(own["class"], "policy", "{own}");
    assert!(own["message"]
        .as_str()
        .unwrap_or_default()
        .contains("`own.txt`"));
    // Only those tasks (and the one that exits 3) failed, and they were not retried.
    assert_eq!(failed.len(), 3, "{}", applied.stdout);
    assert_eq!(
        applied
            .of("task_started")
            .iter()
            .filter(|e| e["task"] == "commit")
            .count(),
        1
    );

    // What the tasks printed and returned is there, masked.
    let status = s.status();
    let json = crate::support::task(&status, "json");
    assert_eq!(json["output"]["token"], "[secret GH_TOKEN]", "{json}");
    let answer = crate::support::task(&status, "answer");
    assert_eq!(
        answer["state"], "succeeded",
        "the agent's structured output: {answer}"
    );
    assert_eq!(answer["output"]["token"], "[secret GH_TOKEN]", "{answer}");
    let run = s.run_id();
    let logs = s.path().join(".ccluster/runs").join(&run).join("logs");
    let echo = std::fs::read_to_string(logs.join("echo.1.out")).unwrap();
    assert!(echo.contains("token=[secret GH_TOKEN]"), "{echo}");
    assert_eq!(
        echo.lines()
            .filter(|l| l.contains("[secret GH_TOKEN]"))
            .count(),
        2,
        "the value and its base64 are both masked: {echo}"
    );
    let err = std::fs::read_to_string(logs.join("echo.1.err")).unwrap();
    assert_eq!(err.trim(), "err [secret GH_TOKEN]");
    let agent = std::fs::read_to_string(logs.join("agent.1.out")).unwrap();
    assert!(
        agent.contains("agent saw [secret GH_TOKEN]"),
        "the agent's Bash tool ran with the secret: {agent}"
    );
    // What the task downstream read of that output is the mask, as a cached result would give.
    let downstream = std::fs::read_to_string(logs.join("downstream.1.out")).unwrap();
    assert_eq!(downstream.trim(), "downstream saw the mask");
    // The credential ccluster gave the agent (here the rehearsal server's token) is masked too.
    assert!(
        agent.contains("model key [secret ANTHROPIC_API_KEY]"),
        "the agent's credential: {agent}"
    );
    let plain = std::fs::read_to_string(logs.join("plain.1.out")).unwrap();
    assert_eq!(plain.trim(), "no secret here");
    // The kept worktree of the refused change holds the mask, not the value.
    let kept = files_under(&s.path().join(".ccluster/worktrees"));
    let leaked = kept
        .iter()
        .find(|p| p.ends_with("leaked.txt"))
        .unwrap_or_else(|| panic!("no kept leaked.txt in {kept:?}"));
    assert_eq!(
        std::fs::read_to_string(leaked).unwrap(),
        "[secret GH_TOKEN]"
    );
    // So does a failed attempt's.
    let kept_file = kept
        .iter()
        .find(|p| p.ends_with("kept.txt"))
        .unwrap_or_else(|| panic!("no kept.txt in {kept:?}"));
    assert_eq!(
        std::fs::read_to_string(kept_file).unwrap(),
        "[secret GH_TOKEN]"
    );

    // Nowhere: the event stream, ccluster's stderr, every file of the state, every commit, the
    // report in both forms.
    assert_clean("the event stream", applied.stdout.as_bytes());
    assert_clean("ccluster's stderr", applied.stderr.as_bytes());
    let state = files_under(&s.path().join(".ccluster"));
    assert!(state.len() > 10, "{state:?}");
    for file in &state {
        let bytes = std::fs::read(file).unwrap_or_default();
        assert_clean(&file.display().to_string(), &bytes);
    }
    assert_clean(
        "the commits",
        git(s.path(), &["log", "-p", "--all"]).as_bytes(),
    );
    for format in [&["report"][..], &["report", "-o", "json"][..]] {
        let report = s.command(format).output().unwrap();
        assert!(report.status.success(), "{report:?}");
        assert_clean("the report", &report.stdout);
    }
    let logs = s.command(&["logs", &run, "agent"]).output().unwrap();
    assert_clean("`ccluster logs`", &logs.stdout);
    // The secret file went with its attempt.
    assert!(!secret_files_left(&run), "secret files outlived the run");

    // What `ccluster serve` answers, read from the same files.
    let served = Served::start(&[s.path()]);
    let mut paths = vec![
        "/api/v1/runs".to_string(),
        format!("/api/v1/runs/{run}"),
        format!("/api/v1/runs/{run}/graph"),
        format!("/api/v1/runs/{run}/artifacts"),
        format!("/api/v1/runs/{run}/report"),
        format!("/api/v1/runs/{run}/report?format=markdown"),
        format!("/api/v1/runs/{run}/events"),
        format!("/api/v1/runs/{run}/tasks/agent/transcript"),
    ];
    for node in [
        "echo",
        "json",
        "downstream",
        "commit",
        "failing",
        "selfcommit",
        "agent",
        "answer",
        "plain",
    ] {
        paths.push(format!("/api/v1/runs/{run}/tasks/{node}"));
        paths.push(format!("/api/v1/runs/{run}/tasks/{node}/logs"));
        paths.push(format!("/api/v1/runs/{run}/tasks/{node}/logs?stream=err"));
        paths.push(format!("/api/v1/runs/{run}/tasks/{node}/diff"));
    }
    let artifacts = served.json(&format!("/api/v1/runs/{run}/artifacts"), 200);
    let artifacts = artifacts.as_array().cloned().unwrap_or_default();
    // The refused changes' patches at least, masked.
    assert!(
        artifacts.iter().filter(|a| a["kind"] == "patch").count() >= 2,
        "{artifacts:?}"
    );
    for a in &artifacts {
        paths.push(format!(
            "/api/v1/runs/{run}/artifacts/{}/{}/{}",
            a["node"].as_str().unwrap(),
            a["attempt"],
            a["path"].as_str().unwrap()
        ));
    }
    let mut answered = 0;
    for path in &paths {
        let (code, body) = served.get(path);
        answered += usize::from(code == 200);
        assert_clean(&format!("GET {path}"), body.as_bytes());
    }
    assert!(answered >= paths.len() - 8, "{answered} of {}", paths.len());
}

/// Whether any secret file of `run` is left where ccluster writes them.
fn secret_files_left(run: &str) -> bool {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(std::path::PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir);
    let uid = Command::new("id").arg("-u").output().unwrap();
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_string();
    base.join(format!("ccluster-secrets-{uid}"))
        .join(run)
        .exists()
}

#[test]
fn a_secret_file_is_private_outside_the_workspace_and_gone_after_its_attempt() {
    let s = Sandbox::in_repo(
        r#"version = 1
[secrets.A]
from = "env:CC_TEST_FILE_TOKEN"
[secrets.B]
from = "command:printf '%s\n' \"$CC_TEST_FILE_TOKEN\""

[tasks.check]
workspace = "worktree"
secrets = ["A", { name = "B", file = "b-token" }]
run = '''test "$(cat "$B_FILE")" = "$A" && stat -c '%a' "$B_FILE" && case "$B_FILE" in "$PWD"*|*/.ccluster/*) echo inside;; *) echo outside;; esac && echo "$B_FILE" > path.txt'''
"#,
        &[],
    );
    let out = s
        .command(&["apply", "--output", "json"])
        .env("CC_TEST_FILE_TOKEN", "file-token-12345")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let run = s.run_id();
    let log = std::fs::read_to_string(
        s.path()
            .join(".ccluster/runs")
            .join(&run)
            .join("logs/check.1.out"),
    )
    .unwrap();
    assert_eq!(log, "600\noutside\n");
    let branch = format!("refs/ccluster/runs/{run}/check");
    let path = git(s.path(), &["show", &format!("{branch}:path.txt")]);
    assert!(path.trim().ends_with("/b-token"), "{path}");
    assert!(
        !Path::new(path.trim()).exists(),
        "{path} outlived its attempt"
    );
    assert!(!secret_files_left(&run));

    // A directory for secret files that others could open (made by someone else first, in a
    // shared temporary directory) gets no file: the node fails without an attempt.
    let runtime = tempfile::tempdir().unwrap();
    let uid = Command::new("id").arg("-u").output().unwrap();
    let root = runtime.path().join(format!(
        "ccluster-secrets-{}",
        String::from_utf8_lossy(&uid.stdout).trim()
    ));
    std::fs::create_dir(&root).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = s
        .command(&["apply", "--fresh", "--output", "json"])
        .env("CC_TEST_FILE_TOKEN", "file-token-12345")
        .env("XDG_RUNTIME_DIR", runtime.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("must be a directory of this user's, closed to others"),
        "{stdout}"
    );
    assert!(files_under(&root).is_empty());
}

#[test]
fn a_secret_that_cannot_be_read_stops_the_run_before_it_starts() {
    let s = Sandbox::new(
        r#"version = 1
[secrets.GH_TOKEN]
from = "env:CC_TEST_UNSET_TOKEN"
[secrets.SHORT]
from = "command:printf 'abc'"
[secrets.FAILING]
from = "command:exit 3"
[secrets.MISSING]
from = "file:no-such-file"
[tasks.use]
secrets = ["GH_TOKEN", "SHORT", "FAILING", "MISSING"]
run = "touch ran"
"#,
    );
    let out = s
        .command(&["apply", "--output", "json"])
        .env_remove("CC_TEST_UNSET_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for expected in [
        "secret `GH_TOKEN` (from `env:CC_TEST_UNSET_TOKEN`) cannot be read: the environment variable `CC_TEST_UNSET_TOKEN` is not set",
        "secret `SHORT` (from `command:printf 'abc'`) cannot be read: its value is 3 bytes long",
        "secret `FAILING` (from `command:exit 3`) cannot be read",
        "secret `MISSING` (from `file:no-such-file`) cannot be read",
    ] {
        assert!(stderr.contains(expected), "no `{expected}` in {stderr}");
    }
    assert!(!stderr.contains("abc'\n") && !s.path().join("ran").exists());
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "no run started: {out:?}"
    );
}

#[test]
fn unknown_secrets_and_bad_sources_are_diagnostics() {
    let s = Sandbox::new(
        r#"version = 1
[secrets.GH_TOKEN]
from = "env:GH_TOKEN"
[secrets.BAD]
from = "vault:x"
[secrets.UNUSED]
from = "env:UNUSED"
[tasks.use]
secrets = ["GH_TOKNE", { name = "GH_TOKEN", file = "a/b" }, "BAD"]
run = "true"
[tasks.merge]
needs = ["use"]
merge = { strategy = "collect" }
secrets = ["GH_TOKEN"]
"#,
    );
    let out = s.command(&["validate", "-o", "json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let diags = report["diagnostics"].as_array().unwrap();
    let find = |code: &str| {
        diags
            .iter()
            .find(|d| d["code"] == code)
            .unwrap_or_else(|| panic!("no {code} in {report:#}"))
    };
    let unknown = find("unknown-secret");
    assert_eq!(unknown["help"], "did you mean `GH_TOKEN`?");
    assert_eq!(unknown["line"], 9);
    let source = find("invalid-secret-source");
    assert!(
        source["message"]
            .as_str()
            .unwrap()
            .contains("unknown source `vault:`"),
        "{source}"
    );
    assert_eq!(source["line"], 5);
    find("invalid-secret-file");
    let kind = find("key-not-for-kind");
    assert_eq!(kind["line"], 14);
    // With a misspelt name reported, "unused" would only repeat it.
    assert!(
        !diags.iter().any(|d| d["code"] == "unused-secret"),
        "{report:#}"
    );
    s.write(
        r#"version = 1
[secrets.GH_TOKEN]
from = "env:GH_TOKEN"
[secrets.UNUSED]
from = "env:UNUSED"
[tasks.use]
secrets = ["GH_TOKEN"]
run = "true"
"#,
    );
    let out = s.command(&["validate", "-o", "json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let unused = &report["diagnostics"][0];
    assert_eq!(unused["code"], "unused-secret", "{report:#}");
    assert_eq!(unused["severity"], "warning");
    assert_eq!(unused["line"], 4);
    // Plans show which secrets a task gets, never a value (none is read).
    s.write(
        r#"version = 1
[secrets.GH_TOKEN]
from = "env:CC_TEST_PLAN_TOKEN"
[tasks.use]
secrets = ["GH_TOKEN", { name = "GH_TOKEN", file = "t", env = "T" }]
run = "true"
"#,
    );
    let out = s.command(&["validate"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("duplicate-secret"));
    s.write(
        r#"version = 1
[secrets.GH_TOKEN]
from = "env:CC_TEST_PLAN_TOKEN"
[tasks.use]
secrets = [{ name = "GH_TOKEN", file = "t" }]
run = "true"
"#,
    );
    let out = s
        .command(&["plan"])
        .env("CC_TEST_PLAN_TOKEN", "plan-token-value")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("secrets: GH_TOKEN (file t, path in GH_TOKEN_FILE)"),
        "{text}"
    );
    assert!(!text.contains("plan-token-value"));
}

#[test]
fn secret_files_on_kubernetes_and_a_templates_own_secrets_are_reported() {
    let s = Sandbox::new(
        r#"version = 1
[secrets.GH_TOKEN]
from = "env:GH_TOKEN"
[runners.cluster]
kind = "kubernetes"
image = "alpine:3"
[tasks.pod]
runner = "cluster"
secrets = [{ name = "GH_TOKEN", file = "t" }]
run = "true"
[tasks.lib]
use = "./lib.toml"
"#,
    );
    s.file(
        "lib.toml",
        r#"version = 1
[secrets.OWN]
from = "env:OWN"
[tasks.inner]
secrets = ["GH_TOKEN"]
run = "true"
"#,
    )
    .unwrap();
    let out = s.command(&["validate", "-o", "json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let diags = report["diagnostics"].as_array().unwrap();
    let unsupported = diags
        .iter()
        .find(|d| d["code"] == "secret-file-unsupported")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(unsupported["line"], 9);
    let ignored = diags
        .iter()
        .find(|d| d["code"] == "ignored-key" && d["file"] == "lib.toml")
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(ignored["line"], 2);
    // The template's task names the clusterfile's secret: no unknown-secret.
    assert!(
        !diags.iter().any(|d| d["code"] == "unknown-secret"),
        "{report:#}"
    );
}

#[test]
fn retry_reads_the_secrets_again_and_never_from_the_state() {
    let s = Sandbox::new(
        r#"version = 1
[secrets.GH_TOKEN]
from = "env:CC_TEST_RETRY_TOKEN"
[tasks.use]
secrets = ["GH_TOKEN"]
run = '''test "$(printf %s "$GH_TOKEN" | rev)" = "eulav-nekot-yrter" && test -f fixed'''
"#,
    );
    let first = s
        .command(&["apply", "--output", "json"])
        .env("CC_TEST_RETRY_TOKEN", "retry-token-value")
        .output()
        .unwrap();
    assert_eq!(first.status.code(), Some(1), "{first:?}");
    std::fs::write(s.path().join("fixed"), "").unwrap();
    // Without its source, the retry cannot start: nothing kept the value.
    let refused = s
        .command(&["retry", "--output", "json"])
        .env_remove("CC_TEST_RETRY_TOKEN")
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr)
        .contains("secret `GH_TOKEN` (from `env:CC_TEST_RETRY_TOKEN`) cannot be read"));
    let retried = s
        .command(&["retry", "--output", "json"])
        .env("CC_TEST_RETRY_TOKEN", "retry-token-value")
        .output()
        .unwrap();
    assert_eq!(retried.status.code(), Some(0), "{retried:?}");
    for file in files_under(&s.path().join(".ccluster")) {
        assert!(
            !String::from_utf8_lossy(&std::fs::read(&file).unwrap_or_default())
                .contains("retry-token-value"),
            "{}",
            file.display()
        );
    }
}

#[test]
fn secrets_read_the_same_in_kdl() {
    let toml = r#"version = 1
[secrets.GH_TOKEN]
from = "env:GH_TOKEN"
[secrets.NPM]
from = "command:pass show npm"
[tasks.one]
run = "true"
secrets = ["GH_TOKEN"]
[tasks.two]
run = "true"
secrets = ["GH_TOKEN", { name = "NPM", file = "npm", env = "NPM_PATH" }]
"#;
    let kdl = r#"version 1
secrets {
  GH_TOKEN from="env:GH_TOKEN"
  NPM from="command:pass show npm"
}
tasks {
  one {
    run "true"
    secrets "GH_TOKEN"
  }
  two {
    run "true"
    secrets {
      - "GH_TOKEN"
      - name="NPM" file="npm" env="NPM_PATH"
    }
  }
}
"#;
    let s = Sandbox::new(toml);
    s.file("clusterfile.kdl", kdl).unwrap();
    let plan = |file: &str| {
        let out = s.command(&["plan", file, "-o", "json"]).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (from_toml, from_kdl) = (plan("clusterfile.toml"), plan("clusterfile.kdl"));
    assert_eq!(from_toml["tasks"], from_kdl["tasks"]);
    assert_eq!(
        from_toml["tasks"][1]["secrets"][1],
        serde_json::json!({"name": "NPM", "delivery": {"file": {"file": "npm", "env": "NPM_PATH"}}})
    );
}
