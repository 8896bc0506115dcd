//! The scripted server under hostile clients: raw TCP connections to a started [`Server`], each
//! checking what comes back and that the server still answers afterwards.

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream as StdStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

/// A request carrying this header makes its handler panic while it holds the server's state.
pub(super) const PANIC_HEADER: &str = "x-test-panic";

/// A started server with its request log.
struct Running {
    server: Server,
    log: tempfile::NamedTempFile,
}

impl Running {
    fn with(limits: Limits) -> Running {
        let log = tempfile::NamedTempFile::new().unwrap();
        let server = Server::start_with(
            Script::default(),
            Some(log.path().to_path_buf()),
            new_token().unwrap(),
            limits,
        )
        .unwrap();
        Running { server, log }
    }

    fn new() -> Running {
        Running::with(Limits {
            io_timeout: Duration::from_secs(5),
            ..Limits::default()
        })
    }

    fn token(&self) -> String {
        self.server.token().to_string()
    }

    fn connect(&self) -> StdStream {
        let stream = StdStream::connect(self.server.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        stream
    }

    /// Sends `bytes` on a new connection; the status line's code and the whole answer.
    fn send(&self, bytes: &[u8]) -> (u16, String) {
        let mut stream = self.connect();
        stream.write_all(bytes).unwrap();
        answer_of(&mut stream)
    }

    /// The records the server logged.
    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(self.log.path())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// A well-formed request with the token is still answered.
    fn assert_alive(&self) {
        let (status, answer) = self.send(&request(&[&key(&self.token())], &message_body()));
        assert_eq!(status, 200, "{answer}");
    }
}

/// Reads to the end: the status code (0 when nothing came) and the text.
fn answer_of(stream: &mut StdStream) -> (u16, String) {
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn key(token: &str) -> String {
    format!("x-api-key: {token}")
}

/// The first request of a task: the default script answers it with a note.
fn message_body() -> Value {
    json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": "hello"}]})
}

/// A request for the structured output (turn 1) under `schema`.
fn schema_body(schema: Value) -> Value {
    json!({
        "model": "m", "stream": false,
        "messages": [{"role": "user", "content": "plan"}, {"role": "assistant", "content": "ok"}],
        "tools": [{"name": "StructuredOutput", "input_schema": schema}],
    })
}

/// `POST /v1/messages` with `headers` and `body` (its `Content-Length` added).
fn request(headers: &[&str], body: &Value) -> Vec<u8> {
    let body = body.to_string();
    let mut head = String::from("POST /v1/messages?beta=true HTTP/1.1\r\nhost: localhost\r\n");
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(body.as_bytes());
    bytes
}

/// A head with `headers` and a raw body as is.
fn raw(headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut bytes = b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\n".to_vec();
    for h in headers {
        bytes.extend_from_slice(h.as_bytes());
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(b"\r\n");
    bytes.extend_from_slice(body);
    bytes
}

#[test]
fn a_prompt_marker_names_the_task() {
    assert_eq!(
        prompt_marker("do it [ccluster-task: build[2]] now").as_deref(),
        Some("build[2]")
    );
    assert_eq!(
        prompt_marker("[ccluster-task: plan]").as_deref(),
        Some("plan")
    );
    assert_eq!(prompt_marker("nothing here"), None);
}

#[test]
fn each_server_has_its_own_random_token() {
    let (a, b) = (Running::new(), Running::new());
    for token in [a.token(), b.token()] {
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|c| c.is_ascii_hexdigit()));
    }
    assert_ne!(a.token(), b.token());
}

#[test]
fn requests_without_the_token_get_401_and_nothing_from_the_script() {
    let s = Running::new();
    let token = s.token();
    let upper = token.to_ascii_uppercase();
    let mut other = token.clone().into_bytes();
    other[63] = if other[63] == b'0' { b'1' } else { b'0' };
    let other = String::from_utf8(other).unwrap();
    let wrong: Vec<Vec<String>> = vec![
        vec![],
        vec![key("")],
        vec![key("rehearsal")],
        vec![key(&other)],
        vec![key(&token[..63])],
        vec![key(&format!("{token}0"))],
        vec![key(&upper)],
        vec![key(&format!("Bearer {token}"))],
        vec![format!("authorization: {token}")],
        vec![format!("authorization: Basic {token}")],
        vec![format!("authorization: Bearer {other}")],
        vec![format!("x-api-key-2: {token}")],
        vec![format!("x-ccluster-task: {token}")],
        vec![format!("cookie: key={token}")],
    ];
    for headers in &wrong {
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        let (status, answer) = s.send(&request(&headers, &message_body()));
        assert_eq!(status, 401, "{headers:?}: {answer}");
        assert!(answer.contains("authentication_error"), "{answer}");
        assert!(!answer.contains("tool_use"), "{answer}");
    }
    // In the path or the body, the token is not a credential either.
    let in_path = String::from_utf8(request(&[], &json!({"key": token})))
        .unwrap()
        .replacen("?beta=true", &format!("?key={token}"), 1);
    assert_eq!(s.send(in_path.as_bytes()).0, 401);
    // A stranger's large body is refused without being read, and the refusal still arrives.
    let big = vec![b'x'; 1 << 20];
    let head = format!("content-length: {}", big.len());
    assert_eq!(s.send(&raw(&[&head], &big)).0, 401);
    assert!(
        s.records().is_empty(),
        "refused requests were answered from the script"
    );

    // The token is accepted the two ways the CLI sends a key.
    for header in [key(&token), format!("authorization: Bearer {token}")] {
        let (status, answer) = s.send(&request(&[&header], &message_body()));
        assert_eq!(status, 200, "{answer}");
    }
    assert_eq!(s.records().len(), 2);
    let log = std::fs::read_to_string(s.log.path()).unwrap();
    assert!(!log.contains(&token), "the token reached the log");
}

#[test]
fn oversized_or_ambiguous_framing_is_refused_without_panicking() {
    let s = Running::new();
    let auth = key(&s.token());
    let chunked = "transfer-encoding: chunked";
    let cases: Vec<(Vec<String>, Vec<u8>, u16)> = vec![
        // Chunk sizes: more digits than a usize holds, and one that fits but is too large.
        (
            vec![chunked.into()],
            b"ffffffffffffffffff\r\nx\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (vec![chunked.into()], b"ffffffffffffffff\r\n".to_vec(), 413),
        (
            vec![chunked.into()],
            b"3\r\nabc\r\nffffffffffffffff\r\n".to_vec(),
            413,
        ),
        (vec![chunked.into()], b"-5\r\n".to_vec(), 400),
        (vec![chunked.into()], b"5 5\r\n".to_vec(), 400),
        // Lengths.
        (vec!["content-length: 4000000000".into()], Vec::new(), 413),
        (
            vec![format!("content-length: {}", (32 << 20) + 1)],
            Vec::new(),
            413,
        ),
        (
            vec!["content-length: 99999999999999999999999".into()],
            Vec::new(),
            400,
        ),
        (vec!["content-length: -1".into()], Vec::new(), 400),
        (vec!["content-length: 0x10".into()], Vec::new(), 400),
        (
            vec!["content-length: 2".into(), "content-length: 3".into()],
            b"ab".to_vec(),
            400,
        ),
        (
            vec!["content-length: 2".into(), chunked.into()],
            b"ab".to_vec(),
            400,
        ),
        (
            vec!["transfer-encoding: gzip, chunked".into()],
            b"0\r\n\r\n".to_vec(),
            400,
        ),
        // Heads.
        (
            vec![format!("x-big: {}", "a".repeat(70 << 10))],
            Vec::new(),
            431,
        ),
        (
            (0..200).map(|i| format!("x-{i}: 1")).collect(),
            Vec::new(),
            431,
        ),
        (vec!["no colon here".into()], Vec::new(), 400),
    ];
    for (headers, body, expected) in &cases {
        let mut all: Vec<&str> = vec![&auth];
        all.extend(headers.iter().map(String::as_str));
        let (status, answer) = s.send(&raw(&all, body));
        assert_eq!(status, *expected, "{headers:?}: {answer}");
    }
    // A request line that is not HTTP.
    assert_eq!(s.send(b"hello\r\n\r\n").0, 400);
    // Sizes are checked only once the token is: a stranger learns nothing more than 401.
    let (status, _) = s.send(&raw(&["content-length: 4000000000"], b""));
    assert_eq!(status, 401);
    assert!(s.records().is_empty());
    s.assert_alive();
}

#[test]
fn schemas_asking_for_huge_values_get_a_bounded_error() {
    let s = Running::new();
    let auth = key(&s.token());
    let nested = |levels: usize| {
        let mut schema = json!({"type": "string"});
        for _ in 0..levels {
            schema = json!({"type": "array", "minItems": 1000, "items": schema});
        }
        schema
    };
    // Deeper than values are made up, within the nesting a request body may have.
    let mut deep = json!({"type": "string"});
    for _ in 0..100 {
        deep = json!({"type": "array", "maxItems": 1, "items": deep});
    }
    let schemas = [
        json!({"type": "object", "properties": {"text": {"type": "string", "minLength": 4_000_000_000u64}}}),
        json!({"type": "string", "minLength": u64::MAX}),
        json!({"type": "array", "minItems": 4_000_000_000u64, "items": {"type": "string"}}),
        json!({"type": "object", "properties": {"parts": {"type": "array", "minItems": u64::MAX}}}),
        // Each array within bounds, a billion values together.
        nested(3),
        // A large `const` copied into many items.
        json!({"type": "array", "minItems": 1000, "items": {"const": "c".repeat(100_000)}}),
        json!({"type": "array", "minItems": 1000, "items": {"enum": [vec!["x"; 1000]]}}),
        deep,
    ];
    for schema in &schemas {
        let started = Instant::now();
        let (status, answer) = s.send(&request(&[&auth], &schema_body(schema.clone())));
        assert_eq!(status, 400, "{answer}");
        assert!(answer.contains("rehearsal `output`"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Within bounds, a value is still made up and satisfies the schema.
    let fine = json!({"type": "object", "properties": {
        "title": {"type": "string", "minLength": 1000},
        "parts": {"type": "array", "minItems": 50, "items": {"type": "string", "maxLength": 4}},
    }});
    let (status, answer) = s.send(&request(&[&auth], &schema_body(fine.clone())));
    assert_eq!(status, 200, "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let message: Value = serde_json::from_str(body).unwrap();
    let value = &message["content"][0]["input"];
    assert!(jsonschema::validator_for(&fine).unwrap().is_valid(value));
    assert_eq!(value["parts"].as_array().unwrap().len(), 50);
    let records = s.records();
    assert_eq!(records.len(), schemas.len() + 1);
    assert!(records[..schemas.len()]
        .iter()
        .all(|r| r["answer"] == "400"));
}

#[test]
fn a_prompt_repeating_cwd_cannot_multiply_the_answer() {
    let s = Running::new();
    // The note of the first turn quotes the prompt; `{{cwd}}` in it becomes the (long) directory.
    let dir = format!("/{}", "d".repeat(4000));
    let prompt = format!(
        "Primary working directory: {dir}\n{}",
        "{{cwd}}".repeat(100_000)
    );
    let body =
        json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": prompt}]});
    let (status, answer) = s.send(&request(&[&key(&s.token())], &body));
    assert_eq!(status, 400, "{}", &answer[..answer.len().min(500)]);
    // A directory longer than a path is ignored, so the same prompt is answered (small).
    let dir = format!("/{}", "d".repeat(5000));
    let prompt = format!(
        "Primary working directory: {dir}\n{}",
        "{{cwd}}".repeat(100_000)
    );
    let body =
        json!({"model": "m", "stream": false, "messages": [{"role": "user", "content": prompt}]});
    let (status, answer) = s.send(&request(&[&key(&s.token())], &body));
    assert_eq!(status, 200);
    assert!(answer.len() < 4 << 20);
}

#[test]
fn idle_and_trickling_connections_are_closed_after_the_timeout() {
    let timeout = Duration::from_millis(200);
    let s = Running::with(Limits {
        io_timeout: timeout,
        ..Limits::default()
    });
    let token = s.token();
    let full = request(&[&key(&token)], &message_body());
    // Silent; a partial head; a whole head and part of the body.
    let body_start = full.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 6;
    for sent in [
        &b""[..],
        b"POST /v1/messages HTTP/1.1\r\nx-a",
        &full[..body_start],
    ] {
        let started = Instant::now();
        let mut stream = s.connect();
        stream.write_all(sent).unwrap();
        let (status, answer) = answer_of(&mut stream);
        assert_eq!((status, answer.as_str()), (0, ""));
        let took = started.elapsed();
        assert!(took >= timeout && took < Duration::from_secs(5), "{took:?}");
    }
    // A byte every 50 ms keeps no connection alive past the timeout either.
    let mut stream = s.connect();
    let mut writer = stream.try_clone().unwrap();
    let started = Instant::now();
    let trickle = std::thread::spawn(move || {
        for byte in b"POST / HTTP/1.1\r\n".iter().cycle().take(200) {
            if writer.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut sink = [0u8; 64];
    match stream.read(&mut sink) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the server to close the connection, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    trickle.join().unwrap();
    s.assert_alive();
}

#[test]
fn connections_beyond_the_limit_wait_until_one_closes() {
    let s = Running::with(Limits {
        max_connections: 2,
        io_timeout: Duration::from_secs(10),
        ..Limits::default()
    });
    let idle: Vec<StdStream> = (0..2).map(|_| s.connect()).collect();
    // More clients than slots: they wait in the backlog, taking no handler.
    let waiting: Vec<StdStream> = (0..20).map(|_| s.connect()).collect();
    let mut third = s.connect();
    third
        .write_all(&request(&[&key(&s.token())], &message_body()))
        .unwrap();
    third
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut first = [0u8; 1];
    let kind = third.read(&mut first).map(|_| ()).unwrap_err().kind();
    assert!(
        matches!(kind, ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{kind:?}"
    );
    // Slots free as connections close: the silent waiters' turn comes (and they are timed out
    // in their turn), then the third's.
    drop(idle);
    drop(waiting);
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (status, answer) = answer_of(&mut third);
    assert_eq!(status, 200, "{answer}");
}

#[test]
fn a_request_sent_byte_by_byte_is_read() {
    let s = Running::new();
    let body = message_body().to_string();
    let chunked = format!(
        "{:x}\r\n{}\r\n{:x};ext\r\n{}\r\n0\r\n\r\n",
        5,
        &body[..5],
        body.len() - 5,
        &body[5..]
    );
    let auth = key(&s.token());
    for bytes in [
        request(&[&auth], &message_body()),
        raw(&[&auth, "transfer-encoding: chunked"], chunked.as_bytes()),
    ] {
        let mut stream = s.connect();
        for (i, byte) in bytes.iter().enumerate() {
            stream.write_all(&[*byte]).unwrap();
            if i % 8 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        let (status, answer) = answer_of(&mut stream);
        assert_eq!(status, 200, "{answer}");
    }
}

#[test]
fn a_long_chunked_body_is_read_in_linear_time() {
    // 16 MiB in 64-byte chunks: rescanning what came before after every read took minutes.
    let s = Running::new();
    let mut message = message_body();
    message["padding"] = Value::String("p".repeat(16 << 20));
    let body = message.to_string();
    let mut encoded = Vec::with_capacity(body.len() * 2);
    for piece in body.as_bytes().chunks(64) {
        encoded.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        encoded.extend_from_slice(piece);
        encoded.extend_from_slice(b"\r\n");
    }
    encoded.extend_from_slice(b"0\r\n\r\n");
    let started = Instant::now();
    let (status, _) = s.send(&raw(
        &[&key(&s.token()), "transfer-encoding: chunked"],
        &encoded,
    ));
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn a_panicking_handler_ends_its_own_connection_only() {
    let s = Running::new();
    let auth = key(&s.token());
    let (status, answer) = s.send(&request(
        &[&auth, &format!("{PANIC_HEADER}: 1")],
        &message_body(),
    ));
    assert_eq!((status, answer.as_str()), (0, ""));
    // The state it held is still usable, and the next request is answered.
    s.assert_alive();
    assert_eq!(s.records().len(), 1);
}

#[test]
fn the_server_answers_while_its_starters_thread_is_busy() {
    // `apply` starts the server from its single-threaded runtime and then keeps that thread busy;
    // the server must not depend on it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let s = Running::new();
        let (addr, token) = (s.server.addr, s.token());
        let client = std::thread::spawn(move || {
            let mut stream = StdStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream
                .write_all(&request(&[&key(&token)], &message_body()))
                .unwrap();
            answer_of(&mut stream).0
        });
        // Blocks this runtime's only thread until the client is answered.
        assert_eq!(client.join().unwrap(), 200);
    });
}

#[test]
fn a_dropped_server_stops_listening() {
    let s = Running::new();
    let addr = s.server.addr;
    s.assert_alive();
    drop(s);
    assert!(StdStream::connect(addr).is_err());
}

#[test]
fn made_up_strings_respect_their_length_bounds() {
    let schema = json!({"type": "object", "properties": {
        "long": {"type": "string", "minLength": 100},
        "short": {"type": "string", "maxLength": 3},
        "items": {"type": "array", "minItems": 5, "items": {"type": "string", "minLength": 12}},
    }});
    let value = script::example_of(&schema).unwrap();
    assert!(
        jsonschema::validator_for(&schema).unwrap().is_valid(&value),
        "{value}"
    );
    assert!(script::example_of(&json!({"type": "string", "minLength": 65537})).is_err());
    assert!(script::example_of(&json!({"type": "string", "minLength": 65536})).is_ok());
    assert!(script::example_of(&json!({"type": "array", "minItems": 1001})).is_err());
    assert!(script::example_of(&json!({"type": "array", "minItems": 1001, "maxItems": 4})).is_ok());
}
