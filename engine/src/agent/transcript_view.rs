//! Agent transcripts for people: the `claude` CLI's stream-json, one event per line, told as
//! turns, the model's text, tool calls and their (shortened) results, permission denials, API
//! retries and the final result with its cost (`ccluster logs`; `--raw` keeps the JSON).

use std::collections::HashSet;
use std::io::Write;

use serde_json::Value;

use super::{Progress, Transcript};

/// How many lines of a tool's result are shown, and how many characters of each.
const RESULT_LINES: usize = 3;
const LINE_CHARS: usize = 160;

/// Renders one worker's transcript line by line, as it arrives.
#[derive(Default)]
pub struct TranscriptView {
    /// Turn numbering, tool details and the result, read as the engine reads them.
    transcript: Transcript,
    /// Tool calls the CLI denied: their error result repeats the denial, so it is not shown twice.
    denied: HashSet<String>,
    denials: Vec<String>,
    /// The model's last text, so a result that only repeats it is not printed again.
    last_text: Option<String>,
}

/// Whether the first line of a stream looks like a `claude` stream-json transcript: a JSON object
/// with a `type` and a `session_id` (the CLI's first line is `system/init`).
pub fn is_transcript(first_line: &[u8]) -> bool {
    serde_json::from_slice::<Value>(first_line)
        .is_ok_and(|v| v.is_object() && v["type"].is_string() && v["session_id"].is_string())
}

/// Text with the characters that steer a terminal written as escapes (`\u{1b}`): control
/// characters other than newline and tab, and the bidirectional overrides and isolates.
fn defanged(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' | '\t' => c.to_string(),
            '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                c.escape_unicode().to_string()
            }
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// At most `lines` lines of `text`, each cut at `chars` characters; says how many lines were left
/// out.
fn shorten(text: &str, lines: usize, chars: usize) -> Vec<String> {
    let all: Vec<&str> = text.trim_end().lines().collect();
    let mut out: Vec<String> = all
        .iter()
        .take(lines)
        .map(|l| {
            if l.chars().count() > chars {
                format!("{}…", l.chars().take(chars).collect::<String>())
            } else {
                (*l).to_string()
            }
        })
        .collect();
    if all.len() > lines {
        out.push(format!("… {} more lines", all.len() - lines));
    }
    out
}

/// The text of a tool result or message content: a string, or the text blocks of an array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

impl TranscriptView {
    pub fn new() -> TranscriptView {
        TranscriptView::default()
    }

    /// Writes one line of the transcript (without its newline) for people. A line that is not a
    /// JSON object is written as it is; events of no interest to a reader write nothing.
    pub fn render(&mut self, line: &[u8], out: &mut dyn Write) -> std::io::Result<()> {
        let mut told = Vec::new();
        if !self.tell(line, &mut told)? {
            out.write_all(line)?;
            return out.write_all(b"\n");
        }
        // JSON strings can hold any character: what the model or a tool wrote must not drive the
        // reader's terminal (escape sequences, carriage returns, bidi overrides), which the raw
        // JSON never could.
        out.write_all(defanged(&String::from_utf8_lossy(&told)).as_bytes())
    }

    /// Tells a JSON line; false (nothing written) when it is not a JSON object.
    fn tell(&mut self, line: &[u8], out: &mut dyn Write) -> std::io::Result<bool> {
        let parsed = std::str::from_utf8(line)
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(text).ok().map(|v| (text, v)))
            .filter(|(_, v)| v.is_object());
        let Some((text, v)) = parsed else {
            return Ok(false);
        };
        if v["type"] == "system" && v["subtype"] == "init" {
            if let Some(cwd) = v["cwd"].as_str() {
                self.transcript.cwd.get_or_insert_with(|| cwd.to_string());
            }
        }
        let progress = self.transcript.feed(text);
        let cwd = self.transcript.cwd.clone();
        let relative = |s: &str| match &cwd {
            Some(cwd) => s.replace(&format!("{cwd}/"), ""),
            None => s.to_string(),
        };
        match (v["type"].as_str().unwrap_or(""), v["subtype"].as_str()) {
            ("system", Some("init")) => writeln!(
                out,
                "session {} · model {} · {} · in {}",
                v["session_id"].as_str().unwrap_or("?"),
                v["model"].as_str().unwrap_or("?"),
                v["permissionMode"].as_str().unwrap_or("?"),
                v["cwd"].as_str().unwrap_or("?"),
            )?,
            ("assistant", _) => {
                let synthetic = v["message"]["model"] == "<synthetic>";
                let mut tools = progress.iter().filter_map(|p| match p {
                    Progress::Tool { name, detail } => Some((name, detail)),
                    _ => None,
                });
                for p in &progress {
                    if let Progress::Turn(n) = p {
                        writeln!(out, "--- turn {n} ---")?;
                    }
                }
                for block in v["message"]["content"].as_array().into_iter().flatten() {
                    match block["type"].as_str() {
                        Some("text") => {
                            let said = block["text"].as_str().unwrap_or_default();
                            if synthetic {
                                writeln!(out, "! {said}")?;
                            } else {
                                writeln!(out, "{said}")?;
                                self.last_text = Some(said.trim().to_string());
                            }
                        }
                        Some("tool_use") => match tools.next() {
                            Some((name, detail)) if !detail.is_empty() => {
                                writeln!(out, "> {name}: {detail}")?
                            }
                            Some((name, _)) => writeln!(out, "> {name}")?,
                            None => {}
                        },
                        Some("thinking") => {
                            let thought = block["thinking"].as_str().unwrap_or_default();
                            for l in shorten(thought, 1, LINE_CHARS) {
                                writeln!(out, "(thinking) {l}")?;
                            }
                        }
                        _ => {}
                    }
                }
            }
            ("user", _) => {
                let content = &v["message"]["content"];
                if let Value::String(said) = content {
                    for l in shorten(said, RESULT_LINES, LINE_CHARS) {
                        writeln!(out, "user: {l}")?;
                    }
                }
                for block in content.as_array().into_iter().flatten() {
                    match block["type"].as_str() {
                        Some("tool_result") => {
                            let id = block["tool_use_id"].as_str().unwrap_or_default();
                            if self.denied.contains(id) {
                                continue;
                            }
                            let result = relative(&content_text(&block["content"]));
                            let error = block["is_error"] == true;
                            let lines = shorten(&result, RESULT_LINES, LINE_CHARS);
                            if lines.is_empty() {
                                writeln!(
                                    out,
                                    "  | {}",
                                    if error { "error" } else { "(no output)" }
                                )?;
                            }
                            for (i, l) in lines.iter().enumerate() {
                                match (error, i) {
                                    (true, 0) => writeln!(out, "  | error: {l}")?,
                                    _ => writeln!(out, "  | {l}")?,
                                }
                            }
                        }
                        Some("text") => {
                            let said = block["text"].as_str().unwrap_or_default();
                            for l in shorten(said, RESULT_LINES, LINE_CHARS) {
                                writeln!(out, "user: {l}")?;
                            }
                        }
                        _ => {}
                    }
                }
            }
            ("system", Some("permission_denied")) => {
                let tool = v["tool_name"].as_str().unwrap_or("?");
                if let Some(id) = v["tool_use_id"].as_str() {
                    self.denied.insert(id.to_string());
                }
                self.denials.push(tool.to_string());
                let reason = progress.iter().find_map(|p| match p {
                    Progress::Denied { reason, .. } => Some(reason.clone()),
                    _ => None,
                });
                writeln!(out, "! DENIED {tool}: {}", reason.unwrap_or_default())?;
                if let Some(message) = v["message"].as_str() {
                    for l in shorten(message, 1, LINE_CHARS) {
                        writeln!(out, "  | {l}")?;
                    }
                }
            }
            ("system", Some("api_retry")) => {
                for p in &progress {
                    if let Progress::ApiRetry {
                        attempt,
                        status,
                        error,
                        ..
                    } = p
                    {
                        writeln!(out, "! API retry #{attempt} after {status} ({error})")?;
                    }
                }
            }
            ("system", Some(subtype)) => match v["status"].as_str() {
                Some(status) => writeln!(out, "· {subtype}: {status}")?,
                None => writeln!(out, "· {subtype}")?,
            },
            ("result", _) => self.render_result(&v, out)?,
            // Partial messages (`--include-partial-messages`) repeat what the whole ones say.
            ("stream_event", _) => {}
            (other, _) => writeln!(out, "· {other}")?,
        }
        Ok(true)
    }

    fn render_result(&mut self, v: &Value, out: &mut dyn Write) -> std::io::Result<()> {
        let failed = v["is_error"] != false;
        let mut head = format!(
            "=== result: {}",
            if failed {
                format!(
                    "FAILED ({})",
                    v["terminal_reason"]
                        .as_str()
                        .or_else(|| v["subtype"].as_str())
                        .unwrap_or("error")
                )
            } else {
                "success".to_string()
            }
        );
        if let Some(turns) = v["num_turns"].as_u64() {
            head.push_str(&format!(", {turns} turns"));
        }
        if let Some(cost) = v["total_cost_usd"].as_f64() {
            head.push_str(&format!(", ${cost:.4}"));
        }
        if let Some(ms) = v["duration_ms"].as_u64() {
            head.push_str(&format!(", {:.1}s", ms as f64 / 1000.0));
        }
        writeln!(out, "{head}")?;
        // The result's own list holds every denial of the session, including any this view did
        // not see (a transcript that starts mid-way).
        let listed: Vec<String> = v["permission_denials"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["tool_name"].as_str().map(str::to_string))
            .collect();
        let denials = if listed.len() >= self.denials.len() {
            listed
        } else {
            self.denials.clone()
        };
        if !denials.is_empty() {
            writeln!(
                out,
                "=== {} permission denial{}: {}",
                denials.len(),
                if denials.len() == 1 { "" } else { "s" },
                denials.join(", ")
            )?;
        }
        let text = v["result"].as_str().map(str::to_string).or_else(|| {
            v["errors"].as_array().map(|e| {
                e.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        });
        if let Some(text) = text.filter(|t| !t.trim().is_empty()) {
            if self.last_text.as_deref() != Some(text.trim()) || failed {
                writeln!(out, "{}", text.trim_end())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(lines: &[&str]) -> String {
        let mut view = TranscriptView::new();
        let mut out = Vec::new();
        for l in lines {
            view.render(l.as_bytes(), &mut out).unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn turns_tools_results_denials_and_the_result_read_as_text() {
        let text = render(&[
            r#"{"type":"system","subtype":"init","cwd":"/w","session_id":"s1","model":"m","permissionMode":"acceptEdits"}"#,
            r#"{"type":"assistant","message":{"id":"a","model":"m","content":[{"type":"text","text":"Looking."}]},"session_id":"s1"}"#,
            r#"{"type":"assistant","message":{"id":"a","model":"m","content":[{"type":"tool_use","id":"t1","name":"Edit","input":{"file_path":"/w/src/a.rs"}}]},"session_id":"s1"}"#,
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t1","content":"1\n2\n3\n4\n5"}]},"session_id":"s1"}"#,
            r#"{"type":"assistant","message":{"id":"b","model":"m","content":[{"type":"tool_use","id":"t2","name":"Bash","input":{"command":"cargo test"}}]},"session_id":"s1"}"#,
            r#"{"type":"system","subtype":"permission_denied","tool_name":"Bash","tool_use_id":"t2","decision_reason":"not allowed","message":"Claude requested permissions"}"#,
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t2","is_error":true,"content":"Claude requested permissions"}]}}"#,
            "not json at all",
            r#"{"type":"result","subtype":"success","is_error":false,"num_turns":2,"total_cost_usd":0.5,"duration_ms":1500,"result":"done","permission_denials":[{"tool_name":"Bash"}]}"#,
        ]);
        assert_eq!(
            text,
            "session s1 · model m · acceptEdits · in /w\n\
             --- turn 1 ---\nLooking.\n\
             > Edit: src/a.rs\n  | 1\n  | 2\n  | 3\n  | … 2 more lines\n\
             --- turn 2 ---\n> Bash: cargo test\n\
             ! DENIED Bash: not allowed\n  | Claude requested permissions\n\
             not json at all\n\
             === result: success, 2 turns, $0.5000, 1.5s\n\
             === 1 permission denial: Bash\ndone\n"
        );
    }

    #[test]
    fn a_failed_result_says_why_and_non_utf8_lines_pass_through() {
        let mut view = TranscriptView::new();
        let mut out = Vec::new();
        view.render(b"\xff\xfe raw", &mut out).unwrap();
        view.render(
            br#"{"type":"result","subtype":"error_max_turns","is_error":true,"terminal_reason":"max_turns","errors":["Reached maximum number of turns (3)"]}"#,
            &mut out,
        )
        .unwrap();
        assert_eq!(
            out,
            b"\xff\xfe raw\n=== result: FAILED (max_turns)\nReached maximum number of turns (3)\n"
        );
    }

    #[test]
    fn text_from_the_model_or_tools_cannot_steer_the_terminal() {
        let text = render(&[
            r#"{"type":"assistant","message":{"id":"a","content":[{"type":"text","text":"hi\u001b[2J\r\u009b31m\u202eevil\tok"}]}}"#,
            r#"{"type":"user","message":{"content":[{"type":"tool_result","tool_use_id":"t","content":"\u001b]0;title\u0007x"}]}}"#,
            r#"{"type":"system","subtype":"permission_denied","tool_name":"W\u001b[1mrite","decision_reason":"\u001b[8m"}"#,
        ]);
        assert!(
            !text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "{text:?}"
        );
        assert!(!text.contains('\u{202e}'), "{text:?}");
        assert!(
            text.contains("hi\\u{1b}[2J\\u{d}\\u{9b}31m\\u{202e}evil\tok"),
            "{text}"
        );
        assert!(text.contains("  | \\u{1b}]0;title\\u{7}x"), "{text}");
        assert!(
            text.contains("! DENIED W\\u{1b}[1mrite: \\u{1b}[8m"),
            "{text}"
        );
    }

    #[test]
    fn only_stream_json_is_taken_for_a_transcript() {
        assert!(is_transcript(
            br#"{"type":"system","subtype":"init","session_id":"x"}"#
        ));
        assert!(!is_transcript(b"{\"type\":\"x\"}"));
        assert!(!is_transcript(b"hello"));
        assert!(!is_transcript(b"[1,2]"));
    }
}
