//! The admin listener (`[admin] listen`): served by the same accept loop as the gateway's
//! listeners (connection caps overall and per address, header and idle timeouts), but its
//! requests never enter the pipeline. GET only:
//!
//! - `/admin/traces?since=SEQ&limit=N`: sampled request traces ([`TracesReply`]);
//! - `/admin/route?method=M&host=H&path=P&header=NAME:VALUE` (`header` repeatable): which
//!   route and pool the gateway's own router picks for such a request ([`RouteReply`]);
//! - `observability.metrics_path`: the Prometheus text.
//!
//! Query values are percent-decoded (`%20`; a `+` stays a `+`).

use crate::gateway::{Runtime, Shared};
use crate::http_util::{full, json_error_with_id, Body};
use crate::routing::RouteMatch;
use crate::trace::TracesReply;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Traces per answer when `limit` is not given, and the most it may ask for.
pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

/// `GET /admin/route`: the router's decision for a described request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteReply {
    /// `found`, `not_found` or `method_not_allowed`.
    pub outcome: String,
    pub route: Option<String>,
    /// The route's pool (an aggregating route: its parts' pools joined by `+`).
    pub pool: Option<String>,
    /// The backends of that pool (or those pools) and their health.
    pub upstreams: Vec<UpstreamState>,
    /// With `method_not_allowed`: the methods that would match.
    pub allowed: Vec<String>,
    /// The config generation that answered: 1 at start, +1 per applied reload.
    pub version: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UpstreamState {
    pub pool: String,
    pub address: String,
    pub healthy: bool,
}

/// Answers one request of the admin listener.
pub fn answer<B>(shared: &Shared, req: &Request<B>) -> Response<Body> {
    let rt = shared.runtime.load_full();
    let running = rt.cfg.admin.as_ref().map(|a| &a.listen);
    if running.is_none() || running != shared.bound.admin.as_ref().map(|a| &a.listen) {
        // `[admin]` was removed or moved by a reload: this socket stays bound until a restart,
        // but it no longer shows routes, pools, backends or traces (nor again when a later
        // reload names a third address).
        return error(
            StatusCode::NOT_FOUND,
            "admin_disabled",
            "the running configuration has no [admin] on this listener's address; restart to apply it",
        );
    }
    let path = req.uri().path();
    let known = matches!(path, "/admin/traces" | "/admin/route")
        || path == rt.cfg.observability.metrics_path;
    if !known {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no admin endpoint {path}; see /admin/traces, /admin/route"),
        );
    }
    if req.method() != Method::GET {
        let mut r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "the admin listener answers GET only",
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return r;
    }
    let query = match Query::parse(req.uri().query().unwrap_or("")) {
        Ok(q) => q,
        Err(why) => return error(StatusCode::BAD_REQUEST, "bad_query", &why),
    };
    let answer = match path {
        "/admin/traces" => traces(shared, &rt, &query).map(|r| json(&r)),
        "/admin/route" => route(&rt, &query).map(|r| json(&r)),
        _ => {
            let mut r = Response::new(full(crate::stats::render_metrics()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(r)
        }
    };
    answer.unwrap_or_else(|why| error(StatusCode::BAD_REQUEST, "bad_query", &why))
}

fn traces(shared: &Shared, rt: &Runtime, q: &Query) -> Result<TracesReply, String> {
    q.only(&["since", "limit"])?;
    let since = match q.one("since")? {
        None => 0,
        Some(s) => s
            .parse::<u64>()
            .map_err(|_| format!("since: expected a trace sequence number, got {s:?}"))?,
    };
    let limit = match q.one("limit")? {
        None => DEFAULT_LIMIT,
        Some(s) => s
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| format!("limit: expected 1..={MAX_LIMIT}, got {s:?}"))?,
    };
    let (traces, next_seq, dropped) = shared.traces.since(since, limit);
    let admin = rt.cfg.admin.as_ref();
    Ok(TracesReply {
        replica: admin
            .map(|a| a.replica.clone().unwrap_or_else(|| a.listen.clone()))
            .unwrap_or_default(),
        sampling: admin.map_or(0.0, |a| a.trace_sample_rate),
        capacity: shared.traces.capacity(),
        next_seq,
        dropped,
        traces,
    })
}

fn route(rt: &Runtime, q: &Query) -> Result<RouteReply, String> {
    q.only(&["method", "host", "path", "header"])?;
    let method = match q.one("method")? {
        None => Method::GET,
        Some(m) => Method::from_bytes(m.as_bytes()).map_err(|_| format!("method: not an HTTP method: {m:?}"))?,
    };
    let host = q.one("host")?.filter(|h| !h.is_empty());
    if let Some(h) = host {
        if !crate::guard::valid_authority(h.as_bytes()) {
            return Err(format!("host: not host[:port]: {h:?}"));
        }
    }
    let target = q.one("path")?.ok_or("path: required (e.g. path=/v1/users/7)")?;
    // What a browser's address bar or a log line holds: the query and fragment are not part
    // of the path routing sees.
    let raw_path = target.split(['?', '#']).next().unwrap_or_default();
    if !raw_path.starts_with('/') {
        return Err(format!("path: must start with '/': {target:?}"));
    }
    // Normalised as the hardening stage does before routing.
    let path = crate::path::normalize(raw_path)
        .map_err(|e| format!("path: the gateway refuses {raw_path:?}: {e}"))?;
    let mut headers = HeaderMap::new();
    for h in q.all("header") {
        let (name, value) = h
            .split_once(':')
            .ok_or_else(|| format!("header: expected NAME:VALUE, got {h:?}"))?;
        let name = HeaderName::from_bytes(name.trim().as_bytes())
            .map_err(|_| format!("header: not a header name: {name:?}"))?;
        let value = HeaderValue::from_str(value.trim())
            .map_err(|_| format!("header {name}: not a header value"))?;
        headers.append(name, value);
    }
    if let Some(h) = host {
        headers.insert(header::HOST, HeaderValue::from_str(h).map_err(|_| "host: invalid")?);
    }
    let mut reply = RouteReply {
        outcome: "not_found".into(),
        route: None,
        pool: None,
        upstreams: vec![],
        allowed: vec![],
        version: rt.generation,
    };
    match rt.router.lookup(host, &method, &path, &headers) {
        RouteMatch::Found { route, .. } => {
            let cfg = &route.cfg;
            let pools: Vec<&str> = match &cfg.pool {
                Some(p) => vec![p.as_str()],
                None => cfg.aggregate.iter().map(|a| a.pool.as_str()).collect(),
            };
            reply.outcome = "found".into();
            reply.route = Some(cfg.name.clone());
            reply.pool = (!pools.is_empty()).then(|| pools.join("+"));
            for pool in pools {
                let Some(up) = rt.upstreams.get(pool) else { continue };
                reply.upstreams.extend(up.pool.backends.iter().map(|b| UpstreamState {
                    pool: pool.to_string(),
                    address: b.addr_text.to_string(),
                    healthy: b.is_healthy(),
                }));
            }
        }
        RouteMatch::MethodNotAllowed { allowed } => {
            reply.outcome = "method_not_allowed".into();
            reply.allowed = allowed.iter().map(ToString::to_string).collect();
        }
        RouteMatch::NotFound => {}
    }
    Ok(reply)
}

/// A decoded query string, in order.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: &str) -> Result<Query, String> {
        let decode = |s: &str| {
            String::from_utf8(crate::path::percent_decode(s))
                .map_err(|_| format!("{s:?} does not decode to UTF-8"))
        };
        let mut out = Vec::new();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            out.push((decode(k)?, decode(v)?));
        }
        Ok(Query(out))
    }

    /// Refuses parameters the endpoint does not know (a typo must not be ignored).
    fn only(&self, known: &[&str]) -> Result<(), String> {
        match self.0.iter().find(|(k, _)| !known.contains(&k.as_str())) {
            Some((k, _)) => Err(format!("unknown parameter {k:?}; this endpoint takes {}", known.join(", "))),
            None => Ok(()),
        }
    }

    fn one<'a>(&'a self, key: &'a str) -> Result<Option<&'a str>, String> {
        let mut it = self.all(key);
        let first = it.next();
        if it.next().is_some() {
            return Err(format!("{key}: given more than once"));
        }
        Ok(first)
    }

    fn all<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.0.iter().filter(move |(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

fn json(value: &impl Serialize) -> Response<Body> {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "{}".into());
    let mut r = Response::new(full(text));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_error_with_id(status, code, message, "")
}

/// Keeps the shared state alive for a response built later (the pipeline's future type).
pub async fn serve<B>(shared: Arc<Shared>, req: Request<B>) -> Response<Body> {
    answer(&shared, &req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode_and_refuse_unknown_or_repeated_parameters() {
        let q = Query::parse("path=%2Fv1%2Fusers&header=X-Version%3A2&header=a:b").expect("query");
        assert_eq!(q.one("path").expect("once"), Some("/v1/users"));
        assert_eq!(q.all("header").collect::<Vec<_>>(), ["X-Version:2", "a:b"]);
        assert!(q.one("header").unwrap_err().contains("more than once"));
        let e = q.only(&["path"]).unwrap_err();
        assert!(e.contains("\"header\""), "{e}");
        assert!(Query::parse("path=%FF").is_err(), "not UTF-8");
    }
}
