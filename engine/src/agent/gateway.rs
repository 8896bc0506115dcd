//! The model gateway: a relay on 127.0.0.1 between a run's local agent workers and the model API
//! that paces their requests to the API's rate limit. Each worker's CLI would otherwise meet the
//! limit on its own and back off on its own (with jitter, a second or more a time, and a few tries
//! before its attempt fails); the gateway learns the pace the API allows from its refusals, sends
//! requests at that pace, and takes a rate-limit refusal that says when to come back (429 with
//! `retry-after`) upon itself: it waits as asked and sends the request again, so the worker sees
//! a slower answer instead of an error. Other answers (529, 429 without `retry-after`, errors)
//! reach the worker as they came, after slowing the pace down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use tokio::time::Instant;

/// The pace after the first refusal, and the slowest it gets.
const FIRST_INTERVAL: Duration = Duration::from_millis(100);
const MAX_INTERVAL: Duration = Duration::from_secs(10);
/// How much slower a refusal makes the pace, and how much faster each answered request.
const SLOWER: f64 = 1.25;
const FASTER: f64 = 0.93;
/// How long the gateway keeps one request, over how many refusals, before it hands the refusal to
/// the worker (whose own retries and timeouts then decide): well within the CLI's shortest
/// request timeout ccluster gives it (10 s) times its retries.
const MAX_HELD: Duration = Duration::from_secs(30);
const MAX_REFUSALS: u32 = 8;
/// The largest request body relayed (a request is kept whole, to be sent again).
const MAX_REQUEST: usize = 64 << 20;

/// The pace: the least time between two requests sent. Where the API says its request limit
/// (`anthropic-ratelimit-requests-limit` and `-remaining`, on every answer), what it has left is
/// sent at once and the rest at the limit's rate; other refusals (a token limit, an API that does
/// not say) slow it down and answers speed it up again.
#[derive(Debug)]
struct Pace {
    interval: Duration,
    /// When the next request may be sent.
    next: Instant,
    /// The last slow-down: the refusals of one moment are one slow-down.
    last_cut: Option<Instant>,
    /// The API's request limit, a minute, as it last said it.
    limit_per_minute: Option<f64>,
    /// Requests the API had left at its last answer, less those sent since.
    left: f64,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            interval: Duration::ZERO,
            next: Instant::now(),
            last_cut: None,
            limit_per_minute: None,
            left: 0.0,
        }
    }
}

/// A client of the model API.
type ModelApiClient = Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

/// The client of the model API: `http://` or `https://` (TLS with the system's roots).
fn model_api_client() -> Result<ModelApiClient, String> {
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_provider_and_native_roots(rustls::crypto::ring::default_provider())
        .map_err(|e| format!("cannot read the system's root certificates: {e}"))?
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(hyper_util::rt::TokioExecutor::new()).build(https))
}

/// What an answer says of the API's request limit: (requests a minute, requests left).
fn request_limit(headers: &HeaderMap) -> Option<(f64, f64)> {
    let number = |name: &str| {
        headers
            .get(name)?
            .to_str()
            .ok()?
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.is_finite() && *n >= 0.0)
    };
    Some((
        number("anthropic-ratelimit-requests-limit").filter(|l| *l > 0.0)?,
        number("anthropic-ratelimit-requests-remaining")?,
    ))
}

/// What the gateway shares between requests.
struct Shared {
    /// `scheme://authority[/path]` of the model API, without a trailing `/`.
    upstream: String,
    client: ModelApiClient,
    pace: Mutex<Pace>,
    counts: Mutex<Counts>,
}

/// What the gateway did, for the run's report of it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counts {
    pub requests: u64,
    /// Refusals the gateway waited out and sent again.
    pub held: u64,
    /// Refusals handed to the worker.
    pub passed_on: u64,
}

impl Shared {
    fn pace(&self) -> std::sync::MutexGuard<'_, Pace> {
        self.pace.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count(&self, f: impl FnOnce(&mut Counts)) {
        f(&mut self.counts.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Waits for this request's turn at the current pace.
    async fn turn(&self) {
        let at = {
            let mut p = self.pace();
            let now = Instant::now();
            if p.left >= 1.0 && p.next <= now {
                // The API has this one left: no wait.
                p.left -= 1.0;
                now
            } else {
                let spacing = p
                    .limit_per_minute
                    .map_or(Duration::ZERO, |l| Duration::from_secs_f64(60.0 / l))
                    .max(p.interval);
                let at = p.next.max(now);
                p.next = at + spacing;
                at
            }
        };
        tokio::time::sleep_until(at).await;
    }

    /// An answer said what the API's request limit has left.
    fn limit_said(&self, per_minute: f64, left: f64) {
        let mut p = self.pace();
        p.limit_per_minute = Some(per_minute);
        p.left = left;
    }

    /// The API refused a request: a slower pace (once per moment: the requests in flight when
    /// the limit was met all hear it), unless the refusal was the request limit the API says,
    /// which the pace follows already. Returns how long the refused request waits before its
    /// next turn: what the API asked, else the pace.
    fn refused(&self, asked: Option<Duration>, request_limit_met: bool) -> Duration {
        let mut p = self.pace();
        let now = Instant::now();
        let episode = p.interval.max(FIRST_INTERVAL);
        if request_limit_met {
            p.left = 0.0;
        } else if p.last_cut.is_none_or(|t| now.duration_since(t) >= episode) {
            p.interval = p
                .interval
                .mul_f64(SLOWER)
                .clamp(FIRST_INTERVAL, MAX_INTERVAL);
            p.last_cut = Some(now);
            // What was lined up under the old pace waits for the new one.
            p.next = p.next.max(now + p.interval);
        }
        asked.unwrap_or(p.interval).min(MAX_HELD)
    }

    /// A request was answered: a slightly faster pace, back to none at all.
    fn answered(&self) {
        let mut p = self.pace();
        p.interval = p.interval.mul_f64(FASTER);
        if p.interval < Duration::from_millis(2) {
            p.interval = Duration::ZERO;
        }
    }
}

/// A running gateway; it stops when dropped.
pub struct Gateway {
    url: String,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Starts a gateway to `upstream` (an `http://` or `https://` URL, with an optional path) on
    /// a free port of 127.0.0.1.
    pub async fn start(upstream: &str) -> Result<Gateway, String> {
        let upstream = upstream.trim_end_matches('/').to_string();
        if !(upstream.starts_with("http://") || upstream.starts_with("https://")) {
            return Err(format!(
                "the model API `{upstream}` is not an http:// or https:// URL"
            ));
        }
        let shared = Arc::new(Shared {
            upstream,
            client: model_api_client()?,
            pace: Mutex::new(Pace::new()),
            counts: Mutex::new(Counts::default()),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("cannot listen on 127.0.0.1: {e}"))?;
        let app = axum::Router::new()
            .fallback(relay)
            .with_state(Arc::clone(&shared));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Gateway {
            url: format!("http://{addr}"),
            shared,
            server,
        })
    }

    /// Where workers send their requests (their `ANTHROPIC_BASE_URL`).
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn counts(&self) -> Counts {
        *self.shared.counts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// What the API asked a refused request to wait, from `retry-after` (seconds).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    value
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
}

/// Headers that belong to one connection (RFC 9110 §7.6.1) and `Host`: never relayed.
fn end_to_end(from: &HeaderMap) -> HeaderMap {
    const HOP_BY_HOP: &[&str] = &[
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    ];
    let mut out = HeaderMap::new();
    for (name, value) in from {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

fn plain(status: StatusCode, text: &str) -> Response<Body> {
    let mut r = Response::new(Body::from(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Relays one request at the gateway's pace, waiting out rate-limit refusals that say when to
/// come back; the answer streams back as it comes (the model API answers with server-sent
/// events).
async fn relay(State(shared): State<Arc<Shared>>, request: Request<Body>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let Ok(body) = axum::body::to_bytes(body, MAX_REQUEST).await else {
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request is too large to relay",
        );
    };
    let target = format!(
        "{}{}",
        shared.upstream,
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let headers = end_to_end(&parts.headers);
    shared.count(|c| c.requests += 1);
    let since = Instant::now();
    let mut refusals = 0;
    loop {
        shared.turn().await;
        let mut forwarded = Request::new(Full::new(body.clone()));
        *forwarded.method_mut() = parts.method.clone();
        let Ok(uri) = target.parse() else {
            return plain(StatusCode::BAD_REQUEST, "not a path the model API has");
        };
        *forwarded.uri_mut() = uri;
        *forwarded.headers_mut() = headers.clone();
        let answer = match shared.client.request(forwarded).await {
            Ok(a) => a,
            Err(e) => {
                return plain(
                    StatusCode::BAD_GATEWAY,
                    &format!("the model API cannot be reached: {e}"),
                )
            }
        };
        let status = answer.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status.as_u16() == 529 {
            let asked = retry_after(answer.headers());
            let said = request_limit(answer.headers());
            if let Some((limit, left)) = said {
                shared.limit_said(limit, left);
            }
            let wait = shared.refused(asked, said.is_some_and(|(_, left)| left < 1.0));
            refusals += 1;
            let keep = status == StatusCode::TOO_MANY_REQUESTS
                && asked.is_some()
                && refusals <= MAX_REFUSALS
                && since.elapsed() + wait <= MAX_HELD;
            if keep {
                shared.count(|c| c.held += 1);
                drop(answer);
                tokio::time::sleep(wait).await;
                continue;
            }
            shared.count(|c| c.passed_on += 1);
        } else if status.is_success() {
            if let Some((limit, left)) = request_limit(answer.headers()) {
                shared.limit_said(limit, left);
            }
            shared.answered();
        }
        let (answer_parts, answer_body) = answer.into_parts();
        let mut response = Response::new(Body::new(answer_body));
        *response.status_mut() = answer_parts.status;
        *response.headers_mut() = end_to_end(&answer_parts.headers);
        return response;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        Shared {
            upstream: String::new(),
            client: model_api_client().unwrap(),
            pace: Mutex::new(Pace::new()),
            counts: Mutex::new(Counts::default()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn refusals_slow_the_pace_once_a_moment_and_answers_speed_it_up() {
        let s = shared();
        // Unpaced until the API refuses.
        assert_eq!(s.pace().interval, Duration::ZERO);
        // A refusal that says when: that request waits as asked.
        assert_eq!(
            s.refused(Some(Duration::from_secs(1)), false),
            Duration::from_secs(1)
        );
        assert_eq!(s.pace().interval, FIRST_INTERVAL);
        // The other requests refused at the same moment slow nothing more.
        s.refused(Some(Duration::from_secs(1)), false);
        assert_eq!(s.pace().interval, FIRST_INTERVAL);
        tokio::time::advance(Duration::from_millis(150)).await;
        s.refused(None, false);
        assert_eq!(s.pace().interval, FIRST_INTERVAL.mul_f64(SLOWER));
        // Requests answered bring the pace back, to none at all.
        for _ in 0..200 {
            s.answered();
        }
        assert_eq!(s.pace().interval, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn what_the_api_has_left_goes_at_once_and_the_rest_at_its_rate() {
        let s = shared();
        // 120 a minute, 2 left.
        s.limit_said(120.0, 2.0);
        let t0 = Instant::now();
        s.turn().await;
        s.turn().await;
        assert_eq!(Instant::now(), t0);
        s.turn().await;
        s.turn().await;
        s.turn().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(1000));
        // A refusal of the request limit the pace follows slows nothing.
        s.refused(Some(Duration::from_secs(1)), true);
        assert_eq!(s.pace().interval, Duration::ZERO);
    }

    #[test]
    fn the_request_limit_is_read_from_the_answers_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(request_limit(&h), None);
        h.insert(
            "anthropic-ratelimit-requests-limit",
            HeaderValue::from_static("50"),
        );
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            HeaderValue::from_static("49"),
        );
        assert_eq!(request_limit(&h), Some((50.0, 49.0)));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_are_sent_at_the_pace() {
        let s = shared();
        s.pace().interval = Duration::from_millis(500);
        let t0 = Instant::now();
        s.turn().await;
        s.turn().await;
        s.turn().await;
        assert_eq!(Instant::now() - t0, Duration::from_millis(1000));
    }

    /// Makes a CA and a certificate it signs for 127.0.0.1, with the system's `openssl`.
    fn certificates(dir: &std::path::Path) {
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir)
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509", "-days", "1", "-subj", "/CN=test CA"];
        ca.extend(ec);
        ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
        openssl(&ca);
        let mut csr = vec!["req", "-new", "-subj", "/CN=127.0.0.1"];
        csr.extend(ec);
        csr.extend(["-keyout", "server.key", "-out", "server.csr"]);
        openssl(&csr);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ]);
    }

    #[tokio::test]
    async fn an_https_model_api_is_reached_and_trusted_by_the_systems_roots() {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        certificates(dir.path());
        let chain: Vec<CertificateDer> =
            CertificateDer::pem_file_iter(dir.path().join("server.pem"))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.path().join("server.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        // The model API: one answer over TLS, and what it was asked.
        let api = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut asked = Vec::new();
            let mut buf = [0u8; 4096];
            while !asked.ends_with(b"\r\n\r\n{}") {
                let n = tls.read(&mut buf).await.unwrap();
                assert!(n > 0, "the request ended early");
                asked.extend_from_slice(&buf[..n]);
            }
            tls.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
                .await
                .unwrap();
            let _ = tls.shutdown().await;
            String::from_utf8_lossy(&asked).into_owned()
        });
        // The system's roots are what `SSL_CERT_FILE` names, as for any rustls-native-certs user
        // (only this test of the process reads them).
        std::env::set_var("SSL_CERT_FILE", dir.path().join("ca.pem"));
        let gateway = Gateway::start(&format!("https://127.0.0.1:{port}/base"))
            .await
            .unwrap();
        let mut worker =
            tokio::net::TcpStream::connect(gateway.url().trim_start_matches("http://"))
                .await
                .unwrap();
        worker
            .write_all(b"POST /v1/messages?beta=true HTTP/1.1\r\nhost: x\r\nx-api-key: the-key\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
            .await
            .unwrap();
        let mut answer = String::new();
        let read =
            tokio::time::timeout(Duration::from_secs(20), worker.read_to_string(&mut answer)).await;
        if read.is_err() {
            api.abort();
            panic!(
                "no answer from the gateway: {answer:?}; api task: {:?}",
                api.await
            );
        }
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("hello"), "{answer}");
        let asked = tokio::time::timeout(Duration::from_secs(10), api)
            .await
            .expect("the model API was asked")
            .unwrap();
        assert!(
            asked.starts_with("POST /base/v1/messages?beta=true HTTP/1.1"),
            "{asked}"
        );
        // The worker's credentials pass through; its Host does not.
        assert!(asked.contains("x-api-key: the-key"), "{asked}");
        assert!(
            asked.contains(&format!("host: 127.0.0.1:{port}")),
            "{asked}"
        );
    }

    #[test]
    fn retry_after_is_read_in_seconds() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("0.5"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(500)));
        // An HTTP date is not waited for by the gateway: the worker gets the refusal.
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Fri, 04 Dec 2026 21:00:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }
}
