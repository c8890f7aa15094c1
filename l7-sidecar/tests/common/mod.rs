//! Shared test support: real upstream HTTP servers on 127.0.0.1 and a small client.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use l7_sidecar::{Config, Gateway, RunningGateway};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What an upstream saw of one request.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Requests an upstream remembers (the oldest half is dropped when full).
const MAX_SEEN: usize = 1024;

pub struct Upstream {
    pub name: String,
    pub addr: SocketAddr,
    pub seen: Mutex<Vec<Seen>>,
    pub healthy: AtomicBool,
    /// When non-zero every non-health request is answered with this status.
    pub force_status: AtomicU16,
    pub jwks: Mutex<String>,
    pub jwks_fetches: AtomicUsize,
    pub hits: AtomicUsize,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .expect("seen lock")
            .last()
            .cloned()
            .unwrap_or_else(|| panic!("upstream {} saw no request", self.name))
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// Start an upstream that answers JSON describing the request (with internal fields
/// the gateway is expected to strip), `/health`, `/fail`, `/delay/{ms}` and `/jwks.json`.
pub async fn upstream(name: &str) -> Arc<Upstream> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<Arc<Upstream>>();
    let task = tokio::spawn(async move {
        let Ok(up) = rx.await else { return };
        let weak = Arc::downgrade(&up);
        drop(up);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let Some(up) = weak.upgrade() else { return };
            let weak = Arc::downgrade(&up);
            drop(up);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let weak = weak.clone();
                    async move {
                        match weak.upgrade() {
                            Some(up) => answer(up, req).await,
                            None => Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::new()))),
                        }
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let up = Arc::new(Upstream {
        name: name.to_string(),
        addr,
        seen: Mutex::new(Vec::new()),
        healthy: AtomicBool::new(true),
        force_status: AtomicU16::new(0),
        jwks: Mutex::new(String::new()),
        jwks_fetches: AtomicUsize::new(0),
        hits: AtomicUsize::new(0),
        task,
    });
    tx.send(up.clone())
        .unwrap_or_else(|_| panic!("upstream task gone"));
    up
}

async fn answer(
    up: Arc<Upstream>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, hyper::Error> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let path = parts.uri.path().to_string();
    let json = |status: u16, v: serde_json::Value| {
        let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
        *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        r.headers_mut()
            .insert("content-type", "application/json".parse().expect("ct"));
        r.headers_mut()
            .insert("x-internal-debug", "yes".parse().expect("hv"));
        Ok(r)
    };
    if path == "/health" {
        let ok = up.healthy.load(Ordering::SeqCst);
        return json(
            if ok { 200 } else { 500 },
            serde_json::json!({"healthy": ok}),
        );
    }
    if path == "/jwks.json" {
        up.jwks_fetches.fetch_add(1, Ordering::SeqCst);
        let text = up.jwks.lock().expect("jwks").clone();
        return Ok(Response::new(Full::new(Bytes::from(text))));
    }
    up.hits.fetch_add(1, Ordering::SeqCst);
    {
        let mut seen = up.seen.lock().expect("seen");
        // Bounded, so long runs (the soak test) measure the gateway's memory, not this log's.
        if seen.len() >= MAX_SEEN {
            seen.drain(..MAX_SEEN / 2);
        }
        seen.push(Seen {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers: unshared(&parts.headers),
            body: Bytes::copy_from_slice(&body),
        });
    }
    if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|m| m.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(10_000))).await;
    }
    let forced = up.force_status.load(Ordering::SeqCst);
    let status = if forced != 0 {
        forced
    } else if path == "/fail" {
        500
    } else {
        200
    };
    let h = |n: &str| {
        parts
            .headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    json(
        status,
        serde_json::json!({
            "service": up.name,
            "method": parts.method.as_str(),
            "uri": parts.uri.to_string(),
            "user_id": h("x-user-id"),
            "request_id": h("x-request-id"),
            "body_len": body.len(),
            "internal_id": 12345,
            "profile": { "password_hash": "secret", "name": "n" },
        }),
    )
}

/// A copy of `headers` that owns its bytes. hyper parses header values (and small
/// bodies) as slices of the connection's read buffer, so keeping a plain clone keeps
/// that whole buffer (8 KiB or more) alive per remembered request: with `MAX_SEEN`
/// entries per upstream that was tens of MiB, which the soak test saw as growth.
fn unshared(headers: &HeaderMap) -> HeaderMap {
    let mut copy = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        let value = http::HeaderValue::from_bytes(value.as_bytes())
            .unwrap_or_else(|e| panic!("header {name} was valid when parsed: {e}"));
        copy.append(name.clone(), value);
    }
    copy
}

pub async fn start_gateway(toml: &str) -> RunningGateway {
    let mut cfg =
        Config::parse(toml).unwrap_or_else(|e| panic!("test config must be valid: {e}\n{toml}"));
    // Keep test output readable; records still reach `AccessLog::subscribe`.
    cfg.observability.access_log = false;
    let gw = Gateway::new(cfg, None).unwrap_or_else(|e| panic!("gateway must build: {e}"));
    l7_sidecar::start(gw)
        .await
        .unwrap_or_else(|e| panic!("gateway must start: {e}"))
}

pub fn listener(name: &str) -> String {
    format!("[[listeners]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nmetrics = true\n")
}

pub fn pool(name: &str, ups: &[&Arc<Upstream>], extra: &str) -> String {
    let backends = ups
        .iter()
        .map(|u| format!("{{ address = \"{}\" }}", u.addr))
        .collect::<Vec<_>>()
        .join(", ");
    format!("[pools.{name}]\nbackends = [{backends}]\n{extra}\n")
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    }
}

pub type Client = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

pub fn client() -> Client {
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http()
}

/// One request with a 10 s cap so a hung gateway fails the test instead of hanging it.
pub async fn send(
    c: &Client,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(10), c.request(req))
        .await
        .unwrap_or_else(|_| panic!("{method} {url} timed out"))
        .unwrap_or_else(|e| panic!("{method} {url} failed: {e}"));
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .unwrap_or_else(|e| panic!("reading body of {url}: {e}"))
        .to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(c: &Client, url: &str, headers: &[(&str, &str)]) -> Reply {
    send(c, "GET", url, headers, "").await
}

pub fn base(gw: &RunningGateway) -> String {
    format!(
        "http://{}",
        gw.addr("public")
            .unwrap_or_else(|| panic!("no listener named public"))
    )
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

pub fn hs256(secret: &str, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encode jwt")
}

/// Poll `cond` every 20 ms for at most `limit`.
pub async fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("condition not met within {limit:?}: {what}");
}

/// For raw-socket upstreams: the next request's head (as text) from `s`, its
/// Content-Length body read and dropped; `buf` keeps what arrived after it (a
/// pipelined request). `None` once the connection ends.
pub async fn read_request(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_string();
    let body_len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < end + 4 + body_len {
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    buf.drain(..end + 4 + body_len);
    Some(head)
}

/// A port free a moment ago on 127.0.0.1 (bound, read, released): for a gateway
/// started as a separate process, which binds it itself.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// WARN-and-above log lines of this test binary, as an operator would read them.
#[derive(Clone, Default)]
pub struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("log buffer")).to_string()
    }
}

/// The log of this test binary: one global subscriber, installed by the first test
/// that asks (a per-test default subscriber misses events whose call sites another
/// test's thread registered first). Tests run in parallel and share it: each finds
/// its own lines by request id.
pub fn capture() -> Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("first subscriber");
        logs
    })
    .clone()
}

/// A backend that accepts any upgrade (101), then echoes what it receives; on a path
/// with `/bye` it reads 5 bytes instead, answers `goodbye` and closes.
pub async fn upgrade_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let Some(head) = read_request(&mut s, &mut buf).await else {
                    return;
                };
                let answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
                if s.write_all(answer).await.is_err() {
                    return;
                }
                if head.contains("/bye") {
                    let mut five = [0u8; 5];
                    let have = buf.len().min(5);
                    five[..have].copy_from_slice(&buf[..have]);
                    if s.read_exact(&mut five[have..]).await.is_ok() {
                        let _ = s.write_all(b"goodbye").await;
                    }
                    return;
                }
                if s.write_all(&buf).await.is_err() {
                    return;
                }
                let (mut rd, mut wr) = s.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    (addr, task)
}

/// The header fields of a WebSocket upgrade request.
pub const UPGRADE_HEADERS: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

/// A connection to `addr` upgraded on `path` (its `101` head read, byte by byte up to
/// its end: what follows is the tunnel's).
pub async fn upgraded(addr: SocketAddr, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}\r\n").as_bytes())
        .await
        .expect("write");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.expect("head in time").expect("read");
        assert_eq!(n, 1, "the head ended early: {}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}
