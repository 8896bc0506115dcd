//! The egress proxy behind a `docker` runner's `network = "api-only"`: containers on a network
//! without a route out reach the world only through it, and it lets through only the model API's
//! host and the runner's `allow_hosts`. It speaks HTTP `CONNECT` (what HTTPS clients send to a
//! proxy) and plain HTTP with an absolute URI; anything else, and any other host, is refused with
//! `403`, reported, and never connected to: a refused name is not even resolved. Each client (a
//! container, known by its address on the network) has rules of its own and is told its refusals.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The largest request head read (the request line and headers).
const MAX_HEAD: usize = 16 << 10;

/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Hosts a client may reach: `host`, `host:port`, or `*.domain` (its subdomains, any port).
#[derive(Clone, Debug, Default)]
pub struct Allow {
    rules: Vec<(String, Option<u16>)>,
}

impl Allow {
    /// From `allow_hosts` entries (checked when the clusterfile was) and the model API's URL.
    pub fn new<'a>(hosts: impl IntoIterator<Item = &'a str>) -> Allow {
        let rules = hosts
            .into_iter()
            .map(|h| match h.rsplit_once(':') {
                Some((host, port)) if port.parse::<u16>().is_ok() => {
                    (host.to_ascii_lowercase(), port.parse().ok())
                }
                _ => (h.to_ascii_lowercase(), None),
            })
            .collect();
        Allow { rules }
    }

    /// The host (and port) of a URL such as `ANTHROPIC_BASE_URL`'s, as a rule.
    pub fn host_of_url(url: &str) -> Option<String> {
        let rest = url.split_once("://")?.1;
        let authority = rest.split(['/', '?', '#']).next()?;
        let authority = authority.rsplit_once('@').map_or(authority, |(_, a)| a);
        (!authority.is_empty()).then(|| authority.to_string())
    }

    pub fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.to_ascii_lowercase();
        self.rules.iter().any(|(rule, rule_port)| {
            let name_matches = match rule.strip_prefix("*.") {
                Some(domain) => host
                    .strip_suffix(domain)
                    .is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
                None => *rule == host,
            };
            name_matches && rule_port.is_none_or(|p| p == port)
        })
    }
}

/// A connection the proxy refused from a client it does not know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Who asked (a container's address).
    pub client: SocketAddr,
    /// What it asked for: `host:port`, or what it sent when that was not a proxy request.
    pub target: String,
}

/// One client of the proxy (a container): where it may go, and where its refusals are told.
#[derive(Clone)]
pub struct Client {
    pub allow: Allow,
    /// Each refused target (`host:port`, or the request line when it was no proxy request).
    pub refused: mpsc::UnboundedSender<String>,
}

/// The proxy's clients by address. A container's address is known only once it started, and it
/// may connect at once: a connection from an address not admitted yet waits a moment for it.
#[derive(Clone, Default)]
pub struct Clients(Arc<Mutex<HashMap<IpAddr, Client>>>);

/// How long a connection from an unknown address waits for its container to be admitted.
const ADMISSION_WAIT: Duration = if cfg!(test) {
    Duration::from_millis(300)
} else {
    Duration::from_secs(5)
};

impl Clients {
    /// Admits `ip` with its rules until the returned guard is dropped.
    pub fn admit(&self, ip: IpAddr, client: Client) -> Admission {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(ip, client);
        Admission {
            clients: self.clone(),
            ip,
        }
    }

    async fn find(&self, ip: IpAddr) -> Option<Client> {
        let deadline = tokio::time::Instant::now() + ADMISSION_WAIT;
        loop {
            if let Some(c) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&ip) {
                return Some(c.clone());
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A client's admission; its address is forgotten when dropped (a later container may get it).
pub struct Admission {
    clients: Clients,
    ip: IpAddr,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.clients
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.ip);
    }
}

/// A running proxy; stops when dropped.
pub struct EgressProxy {
    pub addr: SocketAddr,
    /// Who may go where.
    pub clients: Clients,
    /// Every request refused because its client was never admitted, as it happens.
    pub refused: mpsc::UnboundedReceiver<Refusal>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts a proxy listening on `bind` (the address containers reach it at), for no client yet.
pub async fn start(bind: SocketAddr) -> std::io::Result<EgressProxy> {
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    let (tx, refused) = mpsc::unbounded_channel();
    let clients = Clients::default();
    let known = clients.clone();
    let task = tokio::spawn(async move {
        loop {
            let (client, from) = match listener.accept().await {
                Ok(c) => c,
                // At the descriptor limit: wait instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (known, tx) = (known.clone(), tx.clone());
            tokio::spawn(async move {
                let found = known.find(from.ip()).await;
                let allow = found.as_ref().map(|c| c.allow.clone()).unwrap_or_default();
                if let Err(target) = serve(client, &allow).await {
                    match found {
                        Some(c) => {
                            let _ = c.refused.send(target);
                        }
                        None => {
                            let _ = tx.send(Refusal {
                                client: from,
                                target,
                            });
                        }
                    }
                }
            });
        }
    });
    Ok(EgressProxy {
        addr,
        clients,
        refused,
        task,
    })
}

/// Reads the request head: the bytes up to and including the blank line, and what followed.
async fn read_head(client: &mut TcpStream) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let read = async {
        loop {
            let n = client.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            let searched_from = buf.len().saturating_sub(3);
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf[searched_from..]
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
            {
                let end = searched_from + i + 4;
                let rest = buf.split_off(end);
                return Some((buf, rest));
            }
            if buf.len() > MAX_HEAD {
                return None;
            }
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT, read)
        .await
        .ok()
        .flatten()
}

/// `host:port` → (host, port); `[v6]:port` too.
fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((host, port)) => Some((host.to_string(), port.parse().ok()?)),
        None => Some((authority.to_string(), default_port)),
    }
}

/// Serves one client; `Err(target)` when it was refused.
async fn serve(mut client: TcpStream, allow: &Allow) -> Result<(), String> {
    let Some((head, rest)) = read_head(&mut client).await else {
        return Ok(());
    };
    let text = String::from_utf8_lossy(&head).into_owned();
    let request_line = text.lines().next().unwrap_or_default().to_string();
    let mut words = request_line.split_whitespace();
    let (method, target, version) = (
        words.next().unwrap_or_default(),
        words.next().unwrap_or_default(),
        words.next().unwrap_or("HTTP/1.1"),
    );
    // Where the client wants to go, and what to send the server first.
    let (host, port, first_bytes, tunnel) = if method.eq_ignore_ascii_case("CONNECT") {
        let Some((host, port)) = split_host_port(target, 443) else {
            deny(&mut client).await;
            return Err(request_line);
        };
        (host, port, Vec::new(), true)
    } else if let Some(after) = target.strip_prefix("http://") {
        let (authority, path) = match after.find('/') {
            Some(i) => (&after[..i], &after[i..]),
            None => (after, "/"),
        };
        let Some((host, port)) = split_host_port(authority, 80) else {
            deny(&mut client).await;
            return Err(request_line);
        };
        // The server gets the request in origin form, as if sent to it directly.
        let mut forwarded = format!("{method} {path} {version}").into_bytes();
        forwarded.extend_from_slice(&head[request_line.len()..]);
        forwarded.extend_from_slice(&rest);
        (host, port, forwarded, false)
    } else {
        deny(&mut client).await;
        return Err(request_line);
    };
    if !allow.allows(&host, port) {
        deny(&mut client).await;
        return Err(format!("{host}:{port}"));
    }
    let Ok(mut server) = TcpStream::connect((host.as_str(), port)).await else {
        let _ = client
            .write_all(
                b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
        return Ok(());
    };
    if tunnel {
        if client
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .await
            .is_err()
        {
            return Ok(());
        }
        if !rest.is_empty() && server.write_all(&rest).await.is_err() {
            return Ok(());
        }
    } else if server.write_all(&first_bytes).await.is_err() {
        return Ok(());
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
    Ok(())
}

async fn deny(client: &mut TcpStream) {
    let body = "ccluster: this host is not allowed (network = \"api-only\"; see the runner's allow_hosts)\n";
    let _ = client
        .write_all(
            format!(
                "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_match_hosts_ports_and_subdomains() {
        let allow = Allow::new(["api.anthropic.com", "crates.io:443", "*.npmjs.org"]);
        assert!(allow.allows("api.anthropic.com", 443));
        assert!(allow.allows("API.Anthropic.com", 8443));
        assert!(allow.allows("crates.io", 443));
        assert!(!allow.allows("crates.io", 80));
        assert!(allow.allows("registry.npmjs.org", 443));
        assert!(
            !allow.allows("npmjs.org", 443),
            "the domain itself is not its subdomains"
        );
        assert!(!allow.allows("evilnpmjs.org", 443));
        assert!(!allow.allows("api.anthropic.com.evil.net", 443));
        assert_eq!(
            Allow::host_of_url("http://127.0.0.1:4040/v1"),
            Some("127.0.0.1:4040".into())
        );
        assert_eq!(
            Allow::host_of_url("https://user:pw@api.anthropic.com"),
            Some("api.anthropic.com".into())
        );
        assert_eq!(Allow::host_of_url("nonsense"), None);
    }

    /// A server on loopback that answers every connection with `hello` and what it read first.
    async fn upstream() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let _ = s.write_all(b"hello:").await;
                    let _ = s.write_all(&buf[..n]).await;
                });
            }
        });
        addr
    }

    async fn ask(proxy: SocketAddr, request: &str) -> String {
        let mut c = TcpStream::connect(proxy).await.unwrap();
        c.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn only_allowed_hosts_are_reached_and_every_refusal_is_reported() {
        let server = upstream().await;
        let allowed = format!("127.0.0.1:{}", server.port());
        let mut proxy = start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        // Nobody is admitted yet: refused, and told as an unknown client's refusal (after the
        // admission wait).
        let got = ask(proxy.addr, &format!("CONNECT {allowed} HTTP/1.1\r\n\r\n")).await;
        assert!(got.starts_with("HTTP/1.1 403"), "{got}");
        let refusal = proxy.refused.recv().await.unwrap();
        assert_eq!(refusal.target, allowed);
        assert!(refusal.client.ip().is_loopback());
        let (tx, mut refused) = mpsc::unbounded_channel();
        let admission = proxy.clients.admit(
            "127.0.0.1".parse().unwrap(),
            Client {
                allow: Allow::new([allowed.as_str()]),
                refused: tx,
            },
        );

        // A tunnel to the allowed host carries bytes both ways.
        let got = ask(
            proxy.addr,
            &format!("CONNECT {allowed} HTTP/1.1\r\nHost: {allowed}\r\n\r\nping"),
        )
        .await;
        assert!(got.starts_with("HTTP/1.1 200"), "{got}");
        assert!(got.ends_with("hello:ping"), "{got}");
        // Plain HTTP is forwarded in origin form.
        let got = ask(
            proxy.addr,
            &format!("GET http://{allowed}/v1/x HTTP/1.1\r\nHost: {allowed}\r\n\r\n"),
        )
        .await;
        assert!(
            got.starts_with("hello:GET /v1/x HTTP/1.1\r\nHost:"),
            "{got}"
        );

        // Another port of the same host, a name (never resolved), a request that is not for a
        // proxy: refused, each reported.
        let other_port = format!("127.0.0.1:{}", server.port().wrapping_add(1).max(1));
        for (request, target) in [
            (
                format!("CONNECT {other_port} HTTP/1.1\r\n\r\n"),
                other_port.clone(),
            ),
            (
                "CONNECT example.invalid:443 HTTP/1.1\r\n\r\n".to_string(),
                "example.invalid:443".to_string(),
            ),
            (
                "GET http://example.invalid/ HTTP/1.1\r\n\r\n".to_string(),
                "example.invalid:80".to_string(),
            ),
            (
                "GET /relative HTTP/1.1\r\n\r\n".to_string(),
                "GET /relative HTTP/1.1".to_string(),
            ),
        ] {
            let got = ask(proxy.addr, &request).await;
            assert!(got.starts_with("HTTP/1.1 403"), "{request}: {got}");
            let refused = tokio::time::timeout(Duration::from_secs(5), refused.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(refused, target);
        }
        // Once its admission is dropped, the address is nobody's again.
        drop(admission);
        assert!(proxy.clients.0.lock().unwrap().is_empty());
    }
}
