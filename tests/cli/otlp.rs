//! The OTLP receiver tests export to (`tests/otlp/receiver.py`, built on the official protocol
//! definitions: opentelemetry-proto and grpcio from PyPI, installed by
//! `scripts/otlp-receiver-for-tests.sh` when missing), and what it received: spans with their
//! parents and attributes, metrics with their points. Shared by the `cli` and `kubernetes` test
//! binaries.

use std::collections::HashMap;
use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::support::root;

/// Lines `KEY=value` a setup script printed, by key.
pub(crate) fn script_output(script: &str) -> HashMap<String, String> {
    let out = Command::new(root().join(script))
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The test OTLP receiver, stopped (by its pid) when dropped.
pub(crate) struct Receiver {
    child: Child,
    pub(crate) grpc: String,
    pub(crate) http: String,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    pub(crate) fn start() -> Receiver {
        Receiver::start_in(None)
    }

    /// In the network namespace `netns` (a path under /proc or /run/netns), for a `ccluster`
    /// that runs there; `None`: this process's.
    pub(crate) fn start_in(netns: Option<&str>) -> Receiver {
        static SETUP: std::sync::OnceLock<HashMap<String, String>> = std::sync::OnceLock::new();
        let setup = SETUP.get_or_init(|| script_output("scripts/otlp-receiver-for-tests.sh"));
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("otlp.jsonl");
        let mut command = match netns {
            Some(netns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={netns}"))
                    .arg("--")
                    .arg(&setup["PYTHON"]);
                c
            }
            None => Command::new(&setup["PYTHON"]),
        };
        let mut child = command
            .arg(&setup["RECEIVER"])
            .arg("--out")
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the OTLP receiver");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let ready: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the receiver said {line:?}: {e}"));
        Receiver {
            grpc: format!("http://{}", ready["grpc"].as_str().unwrap()),
            http: ready["http"].as_str().unwrap().to_string(),
            child,
            out,
            _dir: dir,
        }
    }

    /// Every request of `signal` received so far.
    pub(crate) fn requests(&self, signal: &str) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| r["signal"] == signal)
            .collect()
    }

    /// Every span received, with its resource's attributes beside it.
    pub(crate) fn spans(&self) -> Vec<Span> {
        let mut out = Vec::new();
        for request in self.requests("traces") {
            for rs in request["request"]["resource_spans"].as_array().unwrap() {
                let resource = attributes(&rs["resource"]["attributes"]);
                for ss in rs["scope_spans"].as_array().into_iter().flatten() {
                    for s in ss["spans"].as_array().into_iter().flatten() {
                        out.push(Span {
                            name: s["name"].as_str().unwrap_or_default().to_string(),
                            trace: s["trace_id"].as_str().unwrap_or_default().to_string(),
                            id: s["span_id"].as_str().unwrap_or_default().to_string(),
                            parent: s["parent_span_id"]
                                .as_str()
                                .filter(|p| !p.is_empty())
                                .map(str::to_string),
                            error: s["status"]["code"] == "STATUS_CODE_ERROR",
                            attributes: attributes(&s["attributes"]),
                            resource: resource.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// The names of the metrics received, with their data points.
    pub(crate) fn metrics(&self) -> HashMap<String, Vec<Value>> {
        let mut out: HashMap<String, Vec<Value>> = HashMap::new();
        for request in self.requests("metrics") {
            for rm in request["request"]["resource_metrics"].as_array().unwrap() {
                for sm in rm["scope_metrics"].as_array().into_iter().flatten() {
                    for m in sm["metrics"].as_array().into_iter().flatten() {
                        let points = ["sum", "gauge", "histogram"]
                            .iter()
                            .flat_map(|kind| m[kind]["data_points"].as_array().cloned())
                            .flatten();
                        out.entry(m["name"].as_str().unwrap().to_string())
                            .or_default()
                            .extend(points);
                    }
                }
            }
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// Stops a server the test started: SIGTERM to its pid, then waits for it.
pub(crate) fn stop(child: &mut Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}

#[derive(Clone, Debug)]
pub(crate) struct Span {
    pub(crate) name: String,
    pub(crate) trace: String,
    pub(crate) id: String,
    pub(crate) parent: Option<String>,
    pub(crate) error: bool,
    pub(crate) attributes: HashMap<String, String>,
    pub(crate) resource: HashMap<String, String>,
}

/// OTLP attributes as strings (`int_value`s are strings in OTLP's JSON already).
pub(crate) fn attributes(list: &Value) -> HashMap<String, String> {
    list.as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let v = &a["value"];
            let value = v
                .as_object()
                .and_then(|o| o.values().next())
                .map(|x| match x {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .unwrap_or_default();
            (a["key"].as_str().unwrap().to_string(), value)
        })
        .collect()
}
