//! Just enough HTTP/1.1 for the scripted server: one request per connection (`Content-Length`
//! or chunked body), a plain response, and a Message turned into SSE frames.
//!
//! Every size is bounded ([`Limits`]) and every read is linear in the bytes received: the server
//! listens on a port any local process can reach, so a request is hostile until its token is
//! checked, which happens between the head and the body ([`read_head`], then [`read_body`]).

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The bounds of one connection.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// The request line and headers, in bytes (the CLI sends about 2 KiB).
    pub max_head: usize,
    pub max_headers: usize,
    /// The body, after dechunking: the Messages API's own request limit, so whatever the real API
    /// accepts is accepted here.
    pub max_body: usize,
    /// The whole request must arrive within this time (an idle or trickling client is dropped);
    /// each write of the answer gets as long.
    pub io_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_head: 64 << 10,
            max_headers: 128,
            max_body: 32 << 20,
            io_timeout: Duration::from_secs(30),
            max_connections: 128,
        }
    }
}

/// A chunk-size line (hex size plus extensions) or a trailer line longer than this is refused.
const MAX_LINE: usize = 1024;

/// Why no request came out of a connection.
#[derive(Debug)]
pub enum Failure {
    /// The client closed the connection before a whole request: nothing to answer.
    Gone,
    /// A malformed or oversized request: answered with this status, then closed.
    Reject(u16, String),
    Io(std::io::Error),
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Failure {
        Failure::Io(e)
    }
}

fn reject(status: u16, message: impl Into<String>) -> Failure {
    Failure::Reject(status, message.into())
}

/// The request line and headers, and the bytes read past them (the start of the body).
pub struct Head {
    /// Lower-cased names.
    pub headers: Vec<(String, String)>,
    rest: Vec<u8>,
}

impl Head {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads the request line and headers. The end of the head is looked for only in the bytes that
/// just arrived (and the 3 before them), so a head sent byte by byte costs no rescans.
pub async fn read_head(stream: &mut TcpStream, limits: &Limits) -> Result<Head, Failure> {
    let mut buf: Vec<u8> = Vec::with_capacity(4 << 10);
    let mut chunk = [0u8; 4 << 10];
    let head_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(Failure::Gone);
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = find(&buf[from..], b"\r\n\r\n") {
            break from + i;
        }
        if buf.len() > limits.max_head {
            return Err(reject(431, "request head too large"));
        }
    };
    if head_end > limits.max_head {
        return Err(reject(431, "request head too large"));
    }
    let text = String::from_utf8_lossy(&buf[..head_end]);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    if !request_line.contains(" HTTP/1.") {
        return Err(reject(400, "not an HTTP/1.x request line"));
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(reject(400, "a header line without `:`"));
        };
        if headers.len() == limits.max_headers {
            return Err(reject(431, "too many headers"));
        }
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let rest = buf[head_end + 4..].to_vec();
    Ok(Head { headers, rest })
}

/// How the body is delimited, from the headers; a request that is ambiguous about it (both
/// `Content-Length` and `Transfer-Encoding`, two different lengths) is refused.
enum Framing {
    Length(usize),
    Chunked,
}

fn framing(head: &Head, limits: &Limits) -> Result<Framing, Failure> {
    let encodings: Vec<&str> = head
        .headers
        .iter()
        .filter(|(k, _)| k == "transfer-encoding")
        .map(|(_, v)| v.as_str())
        .collect();
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(k, _)| k == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    if !encodings.is_empty() {
        if !lengths.is_empty() {
            return Err(reject(400, "both Content-Length and Transfer-Encoding"));
        }
        if encodings.len() > 1 || !encodings[0].eq_ignore_ascii_case("chunked") {
            return Err(reject(
                400,
                "only `Transfer-Encoding: chunked` is understood",
            ));
        }
        return Ok(Framing::Chunked);
    }
    let Some(first) = lengths.first() else {
        return Ok(Framing::Length(0));
    };
    if lengths.iter().any(|l| l != first) {
        return Err(reject(400, "conflicting Content-Length headers"));
    }
    let length = parse_decimal(first).ok_or_else(|| reject(400, "invalid Content-Length"))?;
    if length > limits.max_body {
        return Err(reject(
            413,
            format!("the body is larger than {} bytes", limits.max_body),
        ));
    }
    Ok(Framing::Length(length))
}

/// Digits only (no sign, no blanks), without overflow.
fn parse_decimal(text: &str) -> Option<usize> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.bytes().try_fold(0usize, |n, b| {
        n.checked_mul(10)?.checked_add(usize::from(b - b'0'))
    })
}

/// Hex digits only, without overflow.
fn parse_hex(text: &str) -> Option<usize> {
    if text.is_empty() {
        return None;
    }
    text.chars().try_fold(0usize, |n, c| {
        n.checked_mul(16)?.checked_add(c.to_digit(16)? as usize)
    })
}

/// Reads the body the head announced (at most `limits.max_body` bytes).
pub async fn read_body(
    stream: &mut TcpStream,
    head: Head,
    limits: &Limits,
) -> Result<Vec<u8>, Failure> {
    match framing(&head, limits)? {
        Framing::Length(length) => {
            let mut body = head.rest;
            if body.len() >= length {
                body.truncate(length);
                return Ok(body);
            }
            // Grown as bytes arrive, not reserved from the announced length up front.
            let missing = (length - body.len()) as u64;
            stream.take(missing).read_to_end(&mut body).await?;
            if body.len() < length {
                return Err(Failure::Gone);
            }
            Ok(body)
        }
        Framing::Chunked => {
            let mut dechunker = Dechunker::new(limits);
            if dechunker.feed(&head.rest)? {
                return Ok(dechunker.body);
            }
            let mut chunk = [0u8; 16 << 10];
            loop {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Err(Failure::Gone);
                }
                if dechunker.feed(&chunk[..n])? {
                    return Ok(dechunker.body);
                }
            }
        }
    }
}

/// Where a chunked body is at.
#[derive(Debug, PartialEq)]
enum ChunkState {
    /// Reading a chunk-size line (into `line`).
    Size,
    /// This many bytes of chunk data still to come.
    Data(usize),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines, until an empty one; the count seen so far.
    Trailer(usize),
    Done,
}

/// Decodes a chunked body as its bytes arrive: each byte is looked at once, whatever the pieces
/// it comes in, and the decoded size is checked before a chunk is taken.
struct Dechunker {
    state: ChunkState,
    line: Vec<u8>,
    body: Vec<u8>,
    max_body: usize,
    max_trailers: usize,
}

impl Dechunker {
    fn new(limits: &Limits) -> Dechunker {
        Dechunker {
            state: ChunkState::Size,
            line: Vec::new(),
            body: Vec::new(),
            max_body: limits.max_body,
            max_trailers: limits.max_headers,
        }
    }

    /// Takes the next bytes; `true` once the body is complete (later bytes are ignored).
    fn feed(&mut self, mut input: &[u8]) -> Result<bool, Failure> {
        while !input.is_empty() && self.state != ChunkState::Done {
            if let ChunkState::Data(remaining) = self.state {
                let take = remaining.min(input.len());
                self.body.extend_from_slice(&input[..take]);
                input = &input[take..];
                self.state = if take == remaining {
                    ChunkState::DataEnd
                } else {
                    ChunkState::Data(remaining - take)
                };
                continue;
            }
            // Every other state reads a line.
            let Some(newline) = input.iter().position(|&b| b == b'\n') else {
                self.push_line(input)?;
                return Ok(false);
            };
            self.push_line(&input[..newline])?;
            input = &input[newline + 1..];
            let line = std::mem::take(&mut self.line);
            let line = String::from_utf8_lossy(line.strip_suffix(b"\r").unwrap_or(&line));
            self.state = match self.state {
                ChunkState::Size => {
                    let size_text = line.split(';').next().unwrap_or_default().trim();
                    let size =
                        parse_hex(size_text).ok_or_else(|| reject(400, "invalid chunk size"))?;
                    match self.body.len().checked_add(size) {
                        _ if size == 0 => ChunkState::Trailer(0),
                        Some(total) if total <= self.max_body => ChunkState::Data(size),
                        _ => {
                            return Err(reject(
                                413,
                                format!("the body is larger than {} bytes", self.max_body),
                            ))
                        }
                    }
                }
                ChunkState::DataEnd if line.is_empty() => ChunkState::Size,
                ChunkState::DataEnd => {
                    return Err(reject(400, "chunk data longer than its size"));
                }
                ChunkState::Trailer(_) if line.is_empty() => ChunkState::Done,
                ChunkState::Trailer(n) if n < self.max_trailers => ChunkState::Trailer(n + 1),
                ChunkState::Trailer(_) => return Err(reject(431, "too many trailers")),
                ChunkState::Data(_) | ChunkState::Done => unreachable!("handled above"),
            };
        }
        Ok(self.state == ChunkState::Done)
    }

    fn push_line(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        if self.line.len() + bytes.len() > MAX_LINE {
            return Err(reject(400, "a chunk-size or trailer line is too long"));
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

pub async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    extra_headers: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        529 => "Overloaded",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{extra_headers}connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// After an answer sent before the request was read in full: reads (and drops) what the client
/// still sends, for a bounded time and amount, before the connection closes. Closing with unread
/// bytes makes the kernel reset the connection, and a reset can destroy the answer before the
/// client reads it.
pub async fn linger(stream: &mut TcpStream) {
    let drain = async {
        let mut sink = [0u8; 16 << 10];
        let mut total = 0usize;
        while total < (1 << 20) {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}

/// A complete Message as the SSE frames of a streamed response: `message_start`, each block
/// (text as `text_delta`, tool input as `input_json_delta`), `message_delta`, `message_stop`.
pub fn sse_frames(message: &Value) -> String {
    let mut out = String::new();
    let mut frame = |event: &str, data: Value| {
        out.push_str(&format!("event: {event}\ndata: {data}\n\n"));
    };
    let usage = &message["usage"];
    frame(
        "message_start",
        json!({"type": "message_start", "message": {
            "id": message["id"], "type": "message", "role": "assistant", "model": message["model"],
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0,
                      "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}
        }}),
    );
    let empty = Vec::new();
    for (i, block) in message["content"]
        .as_array()
        .unwrap_or(&empty)
        .iter()
        .enumerate()
    {
        match block["type"].as_str() {
            Some("tool_use") => {
                frame(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i, "content_block": {"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}),
                );
                frame(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i, "delta": {"type": "input_json_delta", "partial_json": block["input"].to_string()}}),
                );
            }
            _ => {
                frame(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}),
                );
                frame(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": block["text"]}}),
                );
            }
        }
        frame(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": i}),
        );
    }
    frame(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": message["stop_reason"], "stop_sequence": null}, "usage": {"output_tokens": usage["output_tokens"]}}),
    );
    frame("message_stop", json!({"type": "message_stop"}));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dechunks `data` fed in pieces of `step` bytes.
    fn dechunk(data: &[u8], step: usize, max_body: usize) -> Result<Option<Vec<u8>>, Failure> {
        let limits = Limits {
            max_body,
            ..Limits::default()
        };
        let mut d = Dechunker::new(&limits);
        for piece in data.chunks(step) {
            if d.feed(piece)? {
                return Ok(Some(d.body));
            }
        }
        Ok(None)
    }

    fn status_of(result: Result<Option<Vec<u8>>, Failure>) -> u16 {
        match result {
            Err(Failure::Reject(status, _)) => status,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn chunked_bodies_are_reassembled_whatever_the_pieces() {
        let data = b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nx-trailer: 1\r\n\r\n";
        for step in [1, 2, 5, data.len()] {
            assert_eq!(
                dechunk(data, step, 100).unwrap().as_deref(),
                Some(&b"abcde"[..])
            );
        }
        assert_eq!(dechunk(b"3\r\nab", 1, 100).unwrap(), None);
        // Complete only with the empty line that ends the (empty) trailer.
        assert_eq!(dechunk(b"0\r\n", 1, 100).unwrap(), None);
        assert_eq!(
            dechunk(b"0\r\n\r\n", 1, 100).unwrap().as_deref(),
            Some(&b""[..])
        );
    }

    #[test]
    fn chunk_sizes_that_overflow_or_exceed_the_limit_are_refused() {
        // More hex digits than a usize holds: no overflow, no panic.
        for size in [
            "ffffffffffffffffff",
            "10000000000000000",
            "-1",
            "+5",
            "0x10",
            "",
            " ",
            "zz",
        ] {
            let data = format!("{size}\r\nabc\r\n0\r\n\r\n");
            assert_eq!(status_of(dechunk(data.as_bytes(), 7, 100)), 400, "{size}");
        }
        // Fits a usize, adds up past the limit (and past usize::MAX with what came before).
        for size in ["ffffffffffffffff", "65"] {
            let data = format!("5\r\nabcde\r\n{size}\r\n");
            assert_eq!(status_of(dechunk(data.as_bytes(), 3, 100)), 413, "{size}");
        }
        // A size line or a trailer that never ends.
        let endless = format!("5;{}", "x".repeat(4 << 10));
        assert_eq!(status_of(dechunk(endless.as_bytes(), 100, 100)), 400);
        let trailers = format!("0\r\n{}", "t: 1\r\n".repeat(200));
        assert_eq!(status_of(dechunk(trailers.as_bytes(), 100, 100)), 431);
        // Data longer than announced.
        assert_eq!(status_of(dechunk(b"1\r\nab\r\n0\r\n\r\n", 1, 100)), 400);
    }

    #[test]
    fn numbers_are_parsed_strictly_and_without_overflow() {
        assert_eq!(parse_decimal("123"), Some(123));
        for bad in ["", "+1", "-1", " 1", "1e3", "99999999999999999999999"] {
            assert_eq!(parse_decimal(bad), None, "{bad}");
        }
        assert_eq!(parse_hex("fF"), Some(255));
        assert_eq!(parse_hex("ffffffffffffffffff"), None);
    }
}
