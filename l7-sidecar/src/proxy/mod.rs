//! Forwarding to upstream pools: backend choice, timeouts, retries of idempotent
//! requests that got no response, passive health accounting, WebSocket tunnels and
//! JSON aggregation across pools.

mod aggregate;
mod body;
mod response;
mod tunnel;

pub use aggregate::aggregate;
pub use body::{
    collect_limited, collect_request, CollectError, RequestBodyError, RequestBodyLimits,
    StreamedBody,
};
pub use response::BadResponse;
pub use tunnel::tunnel;
use response::passable;
// Re-exported where they used to live, for the fuzz target and other callers.
pub use crate::http_util::{full, is_upgrade, strip_hop_by_hop, Body, BoxError};

use crate::balance::{ActiveGuard, HashInput, Pool};
use crate::conns::{self, ConnectError, SendError};
use crate::ctx::UpstreamAddr;
use crate::http_util::json_error;
use crate::config::{Algorithm, ServerConfig};
use crate::routing::{append_query, fill_template_with, Routed};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Body as _;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use std::sync::Arc;
use std::time::Duration;

pub type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Body>;

/// A config generation's upstreams by pool name. hashbrown's map (foldhash): every
/// request looks its pool up here, and SipHash cost more than the rest of the lookup.
/// The names come from the config, not from clients.
pub type Upstreams = hashbrown::HashMap<String, Arc<Upstream>>;

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
    /// What the client is told. Details (addresses, pool names, hyper's error) stay
    /// in the log, under the request id the client also gets.
    pub fn public_message(&self) -> &'static str {
        match self {
            ProxyError::NoBackend(_) => "no upstream available",
            ProxyError::Connect(_) | ProxyError::Upstream(_) => "upstream failed",
            ProxyError::Timeout => "upstream timed out",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(_) | ProxyError::Upstream(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

/// A pool plus the client its health checks use (connect timeout is per pool).
/// Proxied requests go through `conns` instead.
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
    /// Streamed from the backend (see `StreamedBody`), which it names
    /// (`Body::upstream_addr`).
    pub body: Body,
}

fn request_id<B>(req: &crate::ctx::Req<B>) -> Arc<str> {
    req.ctx()
        .request_id
        .as_ref()
        .map_or_else(|| Arc::from(""), |r| r.0.clone())
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// What is sent upstream: the client's request head, moved rather than copied, with
/// its buffered body.
pub struct Outgoing {
    pub method: Method,
    /// The origin-form request target (path and query only).
    pub target: http::Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The body of `forward`, as an expression (a labelled block) rather than a
/// function: `proxy` expands it in place, so its state is part of the request's
/// future instead of a second future built and then moved into it (two copies of
/// ~1.5 KiB per request, measured with callgrind).
///
/// `$rid`: the request id, for the warnings about refused attempts. `$attempted` (an
/// `Option<usize>` place) is left naming the pool index of the
/// backend last tried, so a failure's access-log line can name it.
macro_rules! forward_in_place {
    ($up:expr, $req:expr, $client_ip:expr, $attempted:expr, $rid:expr) => {
        'forward: {
            let rid: &str = $rid;
            let up: &Upstream = $up;
            let req: Outgoing = $req;
            let client_ip: std::net::IpAddr = $client_ip;
            // The request's one clock reading: deadline, balancing, idle bookkeeping.
            let now = tokio::time::Instant::now();
            let deadline = now + Duration::from_millis(up.pool.cfg.request_timeout_ms);
            let attempts = if idempotent(&req.method) {
                1 + up.pool.cfg.retries as usize
            } else {
                1
            };
            let Outgoing {
                method,
                target,
                headers,
                body,
            } = req;
            // The first attempt sends the client's header map itself. A copy is kept only
            // when a retry can happen: hyper consumes a request it has started to write. (A
            // list of the fields instead of a second map measured no cheaper: the map's own
            // clone copies its entries in one go.) A pool of one backend has no other backend
            // to retry on, so it keeps none.
            let mut spare = (attempts > 1 && up.pool.backends.len() > 1).then(|| headers.clone());
            let mut next = Some(headers);
            let mut target = Some(target);
            // Only backends that failed are recorded, so the usual request allocates nothing here.
            // In attempt order: a round-robin retry takes the backend after the last one.
            let mut tried = Vec::new();
            let mut last_err = None;
            let connect_timeout = Duration::from_millis(up.pool.cfg.connect_timeout_ms);
            'attempts: for attempt in 0..attempts {
                let last = attempt + 1 == attempts;
                if next.is_none() {
                    // A retry: the previous attempt's map went to hyper.
                    next = if last { spare.take() } else { spare.clone() };
                }
                let Some(for_hash) = next.as_ref() else {
                    break;
                };
                let hash = HashInput {
                    client_ip,
                    headers: for_hash,
                };
                let started = if attempt == 0 {
                    now
                } else {
                    tokio::time::Instant::now()
                };
                let Some(idx) = up.pool.pick_at(&hash, &tried, started.into_std()) else {
                    break;
                };
                let backend = &up.pool.backends[idx];
                $attempted = Some(idx);
                let guard = ActiveGuard::new(backend.clone());
                let mut conn = match conns::checkout(backend.addr, connect_timeout, started, deadline).await
                {
                    Ok(c) => c,
                    Err(ConnectError::Deadline { .. }) => break 'forward Err(ProxyError::Timeout),
                    Err(e) => {
                        // Nothing was sent: a failed connect is retried like a lost response.
                        last_err = Some(connect_failed(up, idx, &mut tried, &e));
                        continue;
                    }
                };
                let mut headers = next.take().unwrap_or_default();
                // Origin-form target on the connection to this backend; the client's Host is
                // kept (the backend authority stands in only when the client sent none, as
                // over HTTP/2).
                // A scan of the names rather than a hashed lookup: a request has a few
                // fields, and comparing a standard name is one byte.
                if !headers.keys().any(|k| k == header::HOST) {
                    if let Ok(v) = HeaderValue::from_str(backend.authority.as_str()) {
                        headers.insert(header::HOST, v);
                    }
                }
                let uri = match (last, &mut target) {
                    (true, t) => t.take().unwrap_or_default(),
                    (false, t) => t.clone().unwrap_or_default(),
                };
                let mut req = Request::new(conns::UpBody::new(body.clone()));
                *req.method_mut() = method.clone();
                *req.uri_mut() = uri;
                *req.headers_mut() = headers;
                let mut sent = conn.send(req, deadline).await;
                while let (Err(SendError::NotSent(_)), true) = (&sent, conn.reused) {
                    // A pooled connection the backend had closed while it sat idle: it never
                    // carried the request, which goes on the next one to the same backend
                    // (as `checkout` skips those it finds closed), costing no attempt.
                    let Err(SendError::NotSent(back)) = sent else {
                        break;
                    };
                    conn = match conns::checkout(backend.addr, connect_timeout, started, deadline).await {
                        Ok(c) => c,
                        Err(ConnectError::Deadline { .. }) => break 'forward Err(ProxyError::Timeout),
                        Err(e) => {
                            last_err = Some(connect_failed(up, idx, &mut tried, &e));
                            continue 'attempts;
                        }
                    };
                    sent = conn.send(*back, deadline).await;
                }
                let mut resp = match sent {
                    Ok(r) => r,
                    Err(SendError::Deadline) => break 'forward Err(ProxyError::Timeout),
                    Err(e) => {
                        // No response head arrived (on a reused connection: the backend closed
                        // or reset it, e.g. a replica that just died). RFC 9110 §9.2.2 lets
                        // idempotent requests be retried then; others have `attempts == 1`.
                        tried.push(idx);
                        up.pool.record_result(idx, true);
                        let detail = format!("{}: {e}{}", backend.addr, source_chain(&e));
                        tracing::debug!(pool = %up.pool.name, request_id = %rid, error = %detail, reused = conn.reused, "upstream attempt failed");
                        last_err = Some(ProxyError::Upstream(detail));
                        continue;
                    }
                };
                if let Err(why) = passable(&mut resp) {
                    // Not passed on, and the connection is dropped rather than released: its
                    // framing (or protocol) is no longer known. A failed attempt, as a
                    // response hyper could not parse is (including the retry of idempotent
                    // requests on another backend).
                    drop(resp);
                    drop(conn);
                    tried.push(idx);
                    up.pool.record_result(idx, true);
                    let detail = format!("{}: {why}", backend.addr);
                    tracing::warn!(pool = %up.pool.name, request_id = %rid, error = %detail, "upstream response refused");
                    last_err = Some(ProxyError::Upstream(detail));
                    continue;
                }
                // Latency to the response head: what peak-EWMA balancing compares. Only that
                // algorithm reads it, so other pools skip the clock read and the lock.
                if up.pool.cfg.algorithm == Algorithm::LeastResponseTime {
                    let head_at = std::time::Instant::now();
                    let rtt = head_at.saturating_duration_since(started.into_std());
                    backend.observe_latency_at(rtt, head_at);
                }
                let (mut parts, incoming) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                // The gateway speaks HTTP/1.1 to its clients whatever the backend's
                // status line said (hyper would write "HTTP/1.0" for an HTTP/1.0 answer
                // on a connection it keeps alive).
                parts.version = http::Version::HTTP_11;
                let mut body = Body::upstream_pooled(
                    incoming,
                    guard,
                    deadline,
                    conn,
                    backend.addr_text.clone(),
                );
                // What of the body already arrived is read now, while a body that is
                // broken from its start can still be answered with a 502 (hyper would
                // drop the head with it: the client got nothing, logged as a 200).
                let prefetched =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(body.prefetch(cx))).await;
                if let Err(why) = prefetched {
                    // As a refused head: a failed attempt, the connection dropped.
                    drop(body);
                    tried.push(idx);
                    up.pool.record_result(idx, true);
                    let detail = format!("{}: invalid response body: {why}", backend.addr);
                    tracing::warn!(pool = %up.pool.name, request_id = %rid, error = %detail, "upstream response refused");
                    last_err = Some(ProxyError::Upstream(detail));
                    continue;
                }
                up.pool.record_result(idx, parts.status.is_server_error());
                break 'forward Ok(UpstreamResponse { parts, body });
            }
            Err(last_err.unwrap_or_else(|| ProxyError::NoBackend(up.pool.name.clone())))
        }
    };
}

/// A failed connect to backend `idx`: counted against it (passive health), not tried
/// again by this request, logged; the error the request fails with if no attempt is left.
fn connect_failed(
    up: &Upstream,
    idx: usize,
    tried: &mut Vec<usize>,
    e: &ConnectError,
) -> ProxyError {
    tried.push(idx);
    up.pool.record_result(idx, true);
    tracing::debug!(pool = %up.pool.name, error = %e, "upstream connect failed");
    ProxyError::Connect(e.to_string())
}

/// Send a buffered request to the pool, all within the pool's request timeout.
/// Idempotent requests are retried on another backend (up to the pool's `retries`)
/// after any failure that left them without a response: a refused connection, but
/// also a pooled keep-alive connection the backend closed or reset before answering
/// (a replica that just died). The body is buffered, so it can be sent again.
///
/// The deadline is kept by the upstream connection's own timer (`conns`), not by a
/// timeout future per request; connecting is bounded by it too.
pub async fn forward(
    up: &Upstream,
    req: Outgoing,
    client_ip: std::net::IpAddr,
) -> Result<UpstreamResponse, ProxyError> {
    let mut _attempted = None;
    // Aggregation's parts: the id is in the headers the gateway set.
    let rid = req
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    forward_in_place!(up, req, client_ip, _attempted, &rid)
}

/// hyper_util's errors say little on their own ("client error (SendRequest)").
fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = String::new();
    let mut cur = e.source();
    for _ in 0..4 {
        let Some(s) = cur else { break };
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// `pq` (the upstream path and query) as an origin-form URI. When it is the client's
/// own path and query, as on routes without rewrite or prefix stripping, the parsed one
/// is reused instead of parsing it again.
fn origin_form(client: &http::Uri, pq: &str) -> Option<http::Uri> {
    match client.path_and_query() {
        Some(own) if own.as_str() == pq => Some(http::Uri::from(own.clone())),
        _ => http::Uri::try_from(pq).ok(),
    }
}

/// The innermost stage: send the (already checked and transformed) request on.
/// `upstreams` and `limits` (body size limits) come from the request's config
/// generation.
pub async fn proxy(
    upstreams: &Upstreams,
    limits: &ServerConfig,
    Routed { req, route: ctx }: Routed<hyper::body::Incoming>,
) -> Response<Body> {
    let client_ip = req.ctx().conn.peer.ip();
    let key = crate::observe::RequestKey::of(req.ctx());
    let user = req.ctx().identity.clone();
    let rc = &ctx.route.cfg;
    // Owned: the request is taken apart below, and aggregation appends it per part.
    let query = req.uri().query().map(str::to_owned);
    let query = query.as_deref();
    let mut pq = match ctx.route.upstream_path(req.uri().path(), &ctx.params) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(route = %rc.name, error = %e, "refused template value");
            return json_error(
                &req,
                StatusCode::BAD_REQUEST,
                "bad_path",
                "invalid request path",
            );
        }
    };
    if let Some(q) = query {
        pq.reserve(q.len() + 1);
        pq.push('?');
        pq.push_str(q);
    }
    let pool = rc.pool.as_ref().and_then(|p| upstreams.get(p));

    // A request the client-header pass has seen and found no upgrade in has no
    // `Connection` left (that pass strips it; `transform` strips what a configured
    // edit adds), so it skips the lookup; any other is asked directly.
    // The client-header pass ran (it also dropped `Expect`, see below).
    let cleaned = req.ctx().client_headers.is_some();
    let ctx_says_no = cleaned && !req.ctx().upgrade;
    let upgrade = !ctx_says_no && is_upgrade(req.headers());
    if upgrade {
        if !rc.websocket {
            return json_error(
                &req,
                StatusCode::BAD_REQUEST,
                "upgrade_not_allowed",
                "websocket not enabled on this route",
            );
        }
        let Some(up) = pool else {
            return json_error(
                &req,
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "route has no pool",
            );
        };
        // The tunnel forwards the head alone: a body (Content-Length or chunked) would
        // be announced to the backend and never sent (hostile s17-T1: the backend then
        // waited for it until the request timeout). WebSocket handshakes have none.
        if !hyper::body::Body::is_end_stream(req.body()) {
            return json_error(
                &req,
                StatusCode::BAD_REQUEST,
                "upgrade_with_body",
                "an upgrade request must not have a body",
            );
        }
        let headers = req.headers().clone();
        let rid = request_id(&req);
        let hash = HashInput {
            client_ip,
            headers: &headers,
        };
        // Boxed: the rare paths would otherwise make every request's future larger.
        let conn = req.ctx().conn.clone();
        let mut attempted = Attempted::new(key, &up.pool, user);
        let tunnelled = Box::pin(tunnel(
            up.clone(),
            &conn.activity,
            req.into_request(),
            &pq,
            &hash,
            rid.clone(),
            &mut attempted.index,
        ))
        .await;
        attempted.armed = false;
        let backend = attempted.index.and_then(|i| up.pool.backends.get(i));
        let mut r = match tunnelled {
            Ok(mut r) => {
                // A declined upgrade's answer is streamed like any other (upgrades
                // are HTTP/1 only): its warnings name the request too.
                r.body_mut().set_request(rid, true);
                r
            }
            Err(e) => {
                let upstream = backend.map_or("", |b| &*b.addr_text);
                tracing::warn!(route = %rc.name, request_id = %rid, upstream = %upstream, error = %e, "upstream failure");
                crate::http_util::json_error_with_id(e.status(), "upstream_error", e.public_message(), &rid)
            }
        };
        // The access log names the backend (the client is told none).
        if let Some(b) = backend {
            r.extensions_mut().insert(UpstreamAddr(b.addr_text.clone()));
        }
        return r;
    }

    let max_body = limits.max_body_bytes;
    let max_resp = limits.max_response_bytes;
    let rid = request_id(&req);
    let err = |status: StatusCode, code: &str, msg: &str| {
        crate::http_util::json_error_with_id(status, code, msg, &rid)
    };
    let (mut parts, body) = req.into_request().into_parts();
    let client_h1 = parts.version < http::Version::HTTP_2;
    if !client_h1 {
        // RFC 9113 §8.2.3: HTTP/2 clients may split cookies into several fields,
        // which must be one again for an HTTP/1.1 upstream.
        crate::http_util::join_cookie_fields(&mut parts.headers);
    }
    let has_body = !body.is_end_stream();
    let body_limits = RequestBodyLimits {
        max_bytes: max_body,
        idle: Duration::from_millis(limits.body_read_timeout_ms),
        min_rate: limits.body_min_rate_bytes_per_sec,
    };
    // Buffered so a retry can resend it; the limits bound memory and time per request.
    // A request without a body (GET, `Content-Length: 0`) skips the machinery.
    let collected = if has_body {
        collect_request(body, body_limits).await
    } else {
        Ok(Bytes::new())
    };
    let body = match collected {
        Ok(b) => b,
        Err(e) => {
            tracing::debug!(route = %rc.name, request_id = %rid, error = %e, "refused request body");
            if let RequestBodyError::ClientGone(_) = e {
                // Nobody to answer: logged as a client gone, nothing sent (the
                // answer only closes the connection).
                return client_gone_answer();
            }
            let (status, code, msg) = match e {
                RequestBodyError::TooLarge(_) => (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body too large",
                ),
                RequestBodyError::Stalled(_) | RequestBodyError::TooSlow(_) => (
                    StatusCode::REQUEST_TIMEOUT,
                    "request_timeout",
                    "request body not received in time",
                ),
                RequestBodyError::Read(_) | RequestBodyError::ClientGone(_) => (
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "cannot read request body",
                ),
            };
            let mut r = err(status, code, msg);
            if parts.version < http::Version::HTTP_2 {
                // The rest of the body is unread: the connection cannot carry another request.
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return r;
        }
    };

    // With a body, hyper answered `100 Continue` when the body was read: the whole
    // body goes upstream at once, with nothing left for the upstream to wait for.
    // Without one there is nothing to continue with, and an upstream that answered
    // `100` (or `417`) would only confuse the exchange: never forwarded. The
    // client-header pass dropped it already when it ran (`client_headers`: no
    // lookup per request).
    if has_body || !cleaned {
        parts.headers.remove(header::EXPECT);
    }

    if !rc.aggregate.is_empty() {
        let mut jobs = Vec::with_capacity(rc.aggregate.len());
        for a in &rc.aggregate {
            let Some(up) = upstreams.get(&a.pool) else {
                continue;
            };
            let path = match fill_template_with(&a.path, &ctx.params, &ctx.route.catch_all_names())
            {
                Ok(p) => append_query(p, query),
                Err(e) => {
                    tracing::debug!(route = %rc.name, error = %e, "refused template value");
                    return err(StatusCode::BAD_REQUEST, "bad_path", "invalid request path");
                }
            };
            jobs.push((a.name.clone(), up.clone(), path));
        }
        let pools = rc
            .aggregate
            .iter()
            .map(|a| a.pool.as_str())
            .collect::<Vec<_>>()
            .join(",");
        return match Box::pin(aggregate(jobs, &parts.headers, client_ip, max_resp)).await {
            Ok(b) => {
                let mut r = Response::new(full(b));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                r.extensions_mut().insert(UpstreamAddr(pools.into()));
                r
            }
            Err(e) => {
                tracing::warn!(route = %rc.name, request_id = %rid, error = %e, "aggregation failure");
                err(e.status(), "upstream_error", e.public_message())
            }
        };
    }

    let Some(up) = pool else {
        return err(StatusCode::BAD_GATEWAY, "bad_gateway", "route has no pool");
    };
    let Some(target) = origin_form(&parts.uri, &pq) else {
        tracing::warn!(route = %rc.name, request_id = %rid, "upstream target is no valid URI");
        return err(StatusCode::BAD_GATEWAY, "upstream_error", "upstream failed");
    };
    let out = Outgoing {
        method: parts.method,
        target,
        headers: parts.headers,
        body,
    };
    let mut attempted = Attempted::new(key, &up.pool, user);
    // Disarmed in each arm rather than after a binding of the result: moving that
    // result costs a copy of the response head per request.
    match forward_in_place!(up, out, client_ip, attempted.index, &rid) {
        // The body names the backend for the access log (no response extension).
        Ok(r) => {
            attempted.armed = false;
            let mut body = r.body;
            // Moved: the request id is needed further only on the failure path.
            body.set_request(rid, client_h1);
            Response::from_parts(r.parts, body)
        }
        Err(e) => {
            attempted.armed = false;
            let failed = attempted.index.and_then(|i| up.pool.backends.get(i));
            let upstream = failed.map_or("", |b| &*b.addr_text);
            tracing::warn!(route = %rc.name, request_id = %rid, upstream = %upstream, error = %e, "upstream failure");
            let mut r = err(e.status(), "upstream_error", e.public_message());
            // The access log names the backend that failed (the client is told none).
            if let Some(b) = failed {
                r.extensions_mut().insert(UpstreamAddr(b.addr_text.clone()));
            }
            r
        }
    }
}


/// The backend a request is being sent to (`forward_in_place!`'s `$attempted`) and
/// the user it authenticated as: named on the access-log line if the request is
/// dropped meanwhile (the client left, shutdown cut it), through an
/// `observe::Witness`.
struct Attempted<'a> {
    key: crate::observe::RequestKey,
    pool: &'a Pool,
    user: Option<Arc<crate::ctx::Identity>>,
    index: Option<usize>,
    armed: bool,
}

impl<'a> Attempted<'a> {
    /// Armed, before any backend is tried.
    fn new(key: crate::observe::RequestKey, pool: &'a Pool, user: Option<Arc<crate::ctx::Identity>>) -> Self {
        Attempted {
            key,
            pool,
            user,
            index: None,
            armed: true,
        }
    }
}

impl Drop for Attempted<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.armed {
            let mut w = crate::observe::Witness::new(self.key).user(self.user.take());
            if let Some(b) = self.index.and_then(|i| self.pool.backends.get(i)) {
                w = w.upstream(b.addr_text.clone());
            }
            drop(w);
        }
    }
}

/// The answer to a request whose client left mid-body: status 499 (nginx's "client
/// closed request", as every request dropped by its client is logged), no body, and
/// the connection closed.
fn client_gone_answer() -> Response<crate::http_util::Body> {
    let mut r = Response::new(crate::http_util::Body::empty());
    *r.status_mut() = StatusCode::from_u16(crate::observe::CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

#[cfg(test)]
mod target_tests {
    use super::origin_form;

    #[test]
    fn the_upstream_target_is_origin_form() {
        let client: http::Uri = "http://a.example:8080/p/x?q=1".parse().expect("uri");
        let same = origin_form(&client, "/p/x?q=1").expect("valid");
        assert_eq!(same.to_string(), "/p/x?q=1");
        assert!(same.authority().is_none() && same.scheme().is_none());
        let rewritten = origin_form(&client, "/x?q=1").expect("valid");
        assert_eq!(rewritten.to_string(), "/x?q=1");
        assert!(
            origin_form(&client, "/bad path").is_none(),
            "a space is no URI"
        );
    }
}
