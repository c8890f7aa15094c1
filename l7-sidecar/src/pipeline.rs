//! The per-request chain: hardening checks → routing → auth → rate limit →
//! request transformation → proxy / aggregate / tunnel → response transformation →
//! access log and metrics. Exposed as a `tower::Service`.

use crate::auth::AuthError;
use crate::balance::HashInput;
use crate::config::{RateKey, TransformConfig};
use crate::gateway::{Runtime, Shared};
use crate::observe::{self, AccessRecord};
use crate::proxy::{self, full, Body};
use crate::ratelimit::Decision;
use crate::routing::{fill_template, RouteMatch};
use crate::transform;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    pub serve_metrics: bool,
}

#[derive(Clone)]
pub struct GatewayService {
    pub shared: Arc<Shared>,
    pub conn: ConnInfo,
}

impl tower::Service<Request<Incoming>> for GatewayService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let shared = self.shared.clone();
        let conn = self.conn;
        Box::pin(async move { Ok(handle(shared, conn, req).await) })
    }
}

pub fn json_error(status: StatusCode, code: &str, message: &str, request_id: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": code, "message": message, "status": status.as_u16(), "request_id": request_id });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// What the access log and metrics need, filled in as the request moves along.
struct Outcome {
    route: Option<String>,
    upstream: Option<String>,
    user_id: Option<String>,
    limit: Option<Decision>,
    transform: Option<TransformConfig>,
}

async fn handle(shared: Arc<Shared>, conn: ConnInfo, mut req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let rt = shared.runtime.load_full();
    let request_id = transform::ensure_request_id(req.headers_mut());
    let trace_id = observe::propagate_traceparent(req.headers_mut());
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut out = Outcome { route: None, upstream: None, user_id: None, limit: None, transform: None };

    let mut resp = process(&rt, conn, req, &request_id, &mut out).await;

    if let Some(t) = &out.transform {
        transform::apply_response(t, resp.headers_mut());
    }
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert(transform::X_REQUEST_ID, v);
    }
    if let Some(d) = out.limit {
        h.insert("ratelimit-limit", d.limit.into());
        h.insert("ratelimit-remaining", d.remaining.into());
        h.insert("ratelimit-reset", d.reset_secs.into());
        if !d.allowed {
            h.insert(header::RETRY_AFTER, d.retry_after_secs.into());
        }
    }
    let status = resp.status().as_u16();
    let bytes = hyper::body::Body::size_hint(resp.body()).exact().unwrap_or(0);
    let elapsed = started.elapsed();
    let route_label = out.route.clone().unwrap_or_else(|| "none".into());
    observe::record_request(&route_label, status, elapsed.as_secs_f64());
    shared.access_log.log(AccessRecord {
        time: observe::now_rfc3339(),
        method: method.to_string(),
        path,
        status,
        latency_ms: elapsed.as_secs_f64() * 1000.0,
        bytes,
        client_ip: conn.peer.ip().to_string(),
        upstream: out.upstream,
        route: out.route,
        request_id,
        user_id: out.user_id,
        trace_id,
    });
    resp
}

fn is_upgrade(h: &HeaderMap) -> bool {
    let conn_upgrade = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")));
    conn_upgrade && h.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

async fn process(
    rt: &Runtime,
    conn: ConnInfo,
    mut req: Request<Incoming>,
    request_id: &str,
    out: &mut Outcome,
) -> Response<Body> {
    let cfg = &rt.cfg;
    // Request smuggling guard: the two framings must never both be present.
    if req.headers().contains_key(header::CONTENT_LENGTH) && req.headers().contains_key(header::TRANSFER_ENCODING) {
        return json_error(StatusCode::BAD_REQUEST, "bad_request", "both Content-Length and Transfer-Encoding", request_id);
    }
    if req.headers().len() > cfg.server.max_headers {
        return json_error(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "too_many_headers", "too many headers", request_id);
    }
    if conn.serve_metrics && req.uri().path() == cfg.observability.metrics_path {
        let mut r = Response::new(full(observe::render_metrics()));
        r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
        return r;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let (route, params) = match rt.router.lookup(host.as_deref(), req.method(), req.uri().path(), req.headers()) {
        RouteMatch::Found { route, params } => (route, params),
        RouteMatch::NotFound => return json_error(StatusCode::NOT_FOUND, "not_found", "no route matches this request", request_id),
        RouteMatch::MethodNotAllowed { allowed } => {
            let mut r = json_error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", "method not allowed on this route", request_id);
            let allow = allowed.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ");
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            return r;
        }
    };
    let rc = &route.cfg;
    out.route = Some(rc.name.clone());
    out.transform = rc.transform.as_ref().and_then(|t| cfg.transforms.get(t)).cloned();

    let identity = match rt.auth.authenticate(rc.auth, &rc.roles, req.headers()).await {
        Ok(id) => id,
        Err(e) => {
            observe::record_auth_failure(&rc.name, e.reason());
            tracing::debug!(route = %rc.name, error = %e, "auth failed");
            return match e {
                AuthError::Forbidden(_) => json_error(StatusCode::FORBIDDEN, "forbidden", "not allowed", request_id),
                AuthError::Missing | AuthError::Invalid(_) => {
                    let mut r = json_error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string(), request_id);
                    let challenge = match (rc.auth, &e) {
                        (crate::config::AuthMode::ApiKey, _) => "ApiKey realm=\"gateway\"".to_string(),
                        (_, AuthError::Invalid(_)) => "Bearer realm=\"gateway\", error=\"invalid_token\"".to_string(),
                        _ => "Bearer realm=\"gateway\"".to_string(),
                    };
                    if let Ok(v) = HeaderValue::from_str(&challenge) {
                        r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                    }
                    r
                }
            };
        }
    };
    out.user_id = identity.as_ref().map(|i| i.user_id.clone());

    if let Some(limiter) = rc.rate_limit.as_ref().and_then(|n| rt.limiters.get(n)) {
        let key = match limiter.cfg.key {
            RateKey::ClientIp => Some(format!("ip:{}", conn.peer.ip())),
            RateKey::ApiKey => identity.as_ref().and_then(|i| i.api_key.as_ref()).map(|k| format!("key:{k}")),
            RateKey::UserId => identity.as_ref().map(|i| format!("user:{}", i.user_id)),
        }
        // Callers without the configured key share their IP's budget.
        .unwrap_or_else(|| format!("ip:{}", conn.peer.ip()));
        let d = limiter.check(&format!("{}|{key}", rc.rate_limit.as_deref().unwrap_or_default()));
        out.limit = Some(d);
        if !d.allowed {
            observe::record_rate_limited(&rc.name);
            return json_error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "rate limit exceeded", request_id);
        }
    }

    let websocket = is_upgrade(req.headers());
    {
        let h = req.headers_mut();
        transform::set_identity_headers(h, identity.as_ref());
        transform::set_forwarded_headers(h, conn.peer.ip(), if conn.tls { "https" } else { "http" }, host.as_deref());
        if let Some(t) = &out.transform {
            transform::apply_request(t, h);
        }
        if !websocket {
            proxy::strip_hop_by_hop(h);
        }
    }
    let query = req.uri().query().map(|q| format!("?{q}")).unwrap_or_default();
    let upstream_pq = format!("{}{query}", route.upstream_path(req.uri().path(), &params));
    let client_ip = conn.peer.ip();

    if websocket {
        if !rc.websocket {
            return json_error(StatusCode::BAD_REQUEST, "upgrade_not_allowed", "websocket not enabled on this route", request_id);
        }
        let Some(up) = rc.pool.as_ref().and_then(|p| rt.upstreams.get(p)).cloned() else {
            return json_error(StatusCode::BAD_GATEWAY, "bad_gateway", "route has no pool", request_id);
        };
        let headers = req.headers().clone();
        let hash = HashInput { client_ip, headers: &headers };
        return match proxy::tunnel(up, req, &upstream_pq, &hash).await {
            Ok((r, backend)) => {
                out.upstream = Some(backend.to_string());
                r
            }
            Err(e) => json_error(e.status(), "upstream_error", &e.to_string(), request_id),
        };
    }

    let (parts, body) = req.into_parts();
    let body = match http_body_util::Limited::new(body, cfg.server.max_body_bytes).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => {
            return json_error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "request body too large", request_id)
        }
        Err(_) => return json_error(StatusCode::BAD_REQUEST, "bad_request", "cannot read request body", request_id),
    };

    let hash = HashInput { client_ip, headers: &parts.headers };
    let max_resp = cfg.server.max_response_bytes;
    let (mut rparts, mut rbody) = if !rc.aggregate.is_empty() {
        let mut jobs = Vec::new();
        for a in &rc.aggregate {
            let Some(up) = rt.upstreams.get(&a.pool) else { continue };
            jobs.push((a.name.clone(), up.clone(), format!("{}{query}", fill_template(&a.path, &params))));
        }
        out.upstream = Some(rc.aggregate.iter().map(|a| a.pool.as_str()).collect::<Vec<_>>().join(","));
        match proxy::aggregate(jobs, &parts.headers, client_ip, max_resp).await {
            Ok(b) => {
                let mut r = Response::new(());
                r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
                (r.into_parts().0, b)
            }
            Err(e) => return json_error(e.status(), "upstream_error", &e.to_string(), request_id),
        }
    } else {
        let Some(up) = rc.pool.as_ref().and_then(|p| rt.upstreams.get(p)) else {
            return json_error(StatusCode::BAD_GATEWAY, "bad_gateway", "route has no pool", request_id);
        };
        match proxy::forward(up, &parts.method, &upstream_pq, &parts.headers, body, &hash, max_resp).await {
            Ok(r) => {
                out.upstream = Some(r.backend.to_string());
                (r.parts, r.body)
            }
            Err(e) => {
                tracing::warn!(route = %rc.name, error = %e, "upstream failure");
                return json_error(e.status(), "upstream_error", &e.to_string(), request_id);
            }
        }
    };
    if let Some(t) = &out.transform {
        if !t.strip_json_fields.is_empty() && transform::is_json(&rparts.headers) {
            if let Some(stripped) = transform::strip_json_fields(&rbody, &t.strip_json_fields) {
                rbody = Bytes::from(stripped);
            }
        }
    }
    rparts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(rparts, full(rbody))
}
