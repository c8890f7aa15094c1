//! Forwarding to upstream pools: backend choice, timeouts, retries of idempotent
//! requests after connection failures, passive health accounting, WebSocket
//! tunnels and JSON aggregation across pools.

use crate::balance::{ActiveGuard, HashInput, Pool};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;
pub type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Body>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut c = HttpConnector::new();
    c.set_connect_timeout(Some(connect_timeout));
    c.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(c)
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no healthy backend in pool {0}")]
    NoBackend(String),
    #[error("cannot connect to upstream: {0}")]
    Connect(String),
    #[error("upstream failed: {0}")]
    Upstream(String),
    #[error("upstream timed out")]
    Timeout,
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// A pool plus the client that reaches it (connect timeout is per pool).
pub struct Upstream {
    pub pool: Pool,
    pub client: HttpClient,
}

impl Upstream {
    pub fn new(pool: Pool) -> Upstream {
        let client = http_client(Duration::from_millis(pool.cfg.connect_timeout_ms));
        Upstream { pool, client }
    }
}

pub struct UpstreamResponse {
    pub parts: http::response::Parts,
    pub body: Bytes,
    pub backend: SocketAddr,
}

const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"];

pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named in Connection are hop-by-hop too.
    let named: Vec<String> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in HOP_BY_HOP {
        h.remove(*n);
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE)
}

/// Send a buffered request to the pool, retrying idempotent requests on another
/// backend after a connection failure, all within the pool's request timeout.
pub async fn forward(
    up: &Upstream,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
    hash: &HashInput<'_>,
    max_response: usize,
) -> Result<UpstreamResponse, ProxyError> {
    let timeout = Duration::from_millis(up.pool.cfg.request_timeout_ms);
    match tokio::time::timeout(timeout, forward_inner(up, method, path_and_query, headers, body, hash, max_response)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyError::Timeout),
    }
}

async fn forward_inner(
    up: &Upstream,
    method: &Method,
    pq: &str,
    headers: &HeaderMap,
    body: Bytes,
    hash: &HashInput<'_>,
    max_response: usize,
) -> Result<UpstreamResponse, ProxyError> {
    let attempts = if idempotent(method) { 1 + up.pool.cfg.retries as usize } else { 1 };
    let mut tried = Vec::new();
    let mut last_err = None;
    for _ in 0..attempts {
        let Some(idx) = up.pool.pick(hash, &tried) else { break };
        tried.push(idx);
        let backend = up.pool.backends[idx].clone();
        let mut req = Request::builder().method(method.clone()).uri(format!("http://{}{}", backend.addr, pq));
        if let Some(h) = req.headers_mut() {
            *h = headers.clone();
        }
        let req = req.body(full(body.clone())).map_err(|e| ProxyError::Upstream(e.to_string()))?;
        let _guard = ActiveGuard::new(backend.clone());
        let started = Instant::now();
        let resp = match up.client.request(req).await {
            Ok(r) => r,
            Err(e) if e.is_connect() => {
                up.pool.record_result(idx, true);
                last_err = Some(ProxyError::Connect(format!("{}: {e}", backend.addr)));
                continue;
            }
            Err(e) => {
                // The request may have reached the backend, so it is not retried.
                up.pool.record_result(idx, true);
                return Err(ProxyError::Upstream(format!("{}: {e}", backend.addr)));
            }
        };
        let (mut parts, incoming) = resp.into_parts();
        let body = match http_body_util::Limited::new(incoming, max_response).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                up.pool.record_result(idx, true);
                return Err(ProxyError::Upstream(format!("{}: reading body: {e}", backend.addr)));
            }
        };
        backend.observe_latency(started.elapsed());
        up.pool.record_result(idx, parts.status.is_server_error());
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(http::header::CONTENT_LENGTH);
        return Ok(UpstreamResponse { parts, body, backend: backend.addr });
    }
    Err(last_err.unwrap_or_else(|| ProxyError::NoBackend(up.pool.name.clone())))
}

/// Pass a WebSocket (or any HTTP/1.1 upgrade) through: forward the handshake, then
/// splice the two upgraded connections together.
pub async fn tunnel(
    up: Arc<Upstream>,
    mut req: Request<hyper::body::Incoming>,
    path_and_query: &str,
    hash: &HashInput<'_>,
) -> Result<(Response<Body>, SocketAddr), ProxyError> {
    let idx = up.pool.pick(hash, &[]).ok_or_else(|| ProxyError::NoBackend(up.pool.name.clone()))?;
    let backend = up.pool.backends[idx].clone();
    let connect = Duration::from_millis(up.pool.cfg.connect_timeout_ms);
    let stream = match tokio::time::timeout(connect, tokio::net::TcpStream::connect(backend.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            up.pool.record_result(idx, true);
            return Err(ProxyError::Connect(e.to_string()));
        }
        Err(_) => {
            up.pool.record_result(idx, true);
            return Err(ProxyError::Connect("connect timeout".into()));
        }
    };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream)).await.map_err(|e| ProxyError::Upstream(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut up_req = Request::builder().method(req.method().clone()).uri(path_and_query);
    if let Some(h) = up_req.headers_mut() {
        *h = req.headers().clone();
    }
    let up_req = up_req.body(full(Bytes::new())).map_err(|e| ProxyError::Upstream(e.to_string()))?;
    let timeout = Duration::from_millis(up.pool.cfg.request_timeout_ms);
    let mut resp = match tokio::time::timeout(timeout, sender.send_request(up_req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            up.pool.record_result(idx, true);
            return Err(ProxyError::Upstream(e.to_string()));
        }
        Err(_) => return Err(ProxyError::Timeout),
    };
    up.pool.record_result(idx, resp.status().is_server_error());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Ok((Response::from_parts(parts, full(body)), backend.addr));
    }
    let server_upgrade = hyper::upgrade::on(&mut resp);
    let guard = ActiveGuard::new(backend.clone());
    tokio::spawn(async move {
        let _guard = guard;
        if let (Ok(c), Ok(s)) = (client_upgrade.await, server_upgrade.await) {
            let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(s)).await;
        }
    });
    let (parts, _) = resp.into_parts();
    Ok((Response::from_parts(parts, full(Bytes::new())), backend.addr))
}

/// Fan out GETs to several pools in parallel and merge the JSON answers under their names.
pub async fn aggregate(
    parts: Vec<(String, Arc<Upstream>, String)>,
    headers: &HeaderMap,
    client_ip: std::net::IpAddr,
    max_response: usize,
) -> Result<Bytes, ProxyError> {
    let mut tasks = Vec::new();
    for (name, up, path) in parts {
        let headers = headers.clone();
        tasks.push(tokio::spawn(async move {
            let hash = HashInput { client_ip, headers: &headers };
            let r = forward(&up, &Method::GET, &path, &headers, Bytes::new(), &hash, max_response).await;
            (name, r)
        }));
    }
    let mut merged = serde_json::Map::new();
    for t in tasks {
        let (name, r) = t.await.map_err(|e| ProxyError::Upstream(e.to_string()))?;
        let r = r?;
        if !r.parts.status.is_success() {
            return Err(ProxyError::Upstream(format!("part {name} answered {}", r.parts.status)));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&r.body).map_err(|e| ProxyError::Upstream(format!("part {name} is not JSON: {e}")))?;
        merged.insert(name, v);
    }
    serde_json::to_vec(&serde_json::Value::Object(merged)).map(Bytes::from).map_err(|e| ProxyError::Upstream(e.to_string()))
}
