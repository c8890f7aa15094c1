//! Sampled request traces for the admin listener (`GET /admin/traces`): what each stage
//! of the pipeline decided for a request (its verdict and reason) and how long it took
//! itself, in a bounded buffer.
//!
//! Cost: the decision to sample is one comparison with a thread-local random number
//! ([`sample`]); an unsampled request allocates nothing here, and each stage wrapper only
//! tests an empty `Option`. A trace holds method, host, path (never the query string),
//! route, pool, upstream, status and per-stage verdicts — never bodies, header values
//! (the host aside), credentials or query strings.

use crate::config::{AdminConfig, AuthMode, RouteConfig};
use crate::ctx::{Req, UpstreamAddr};
use std::net::SocketAddr;
use crate::http_util::{Body, ErrorCode};
use crate::routing::{MatchedRoute, Routed};
use crate::stage::Next;
use http::{header, Request, Response};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Stands for a host or path the gateway refused: its text is the client's, not a request's.
const INVALID: &str = "(invalid)";

/// The path as routing sees it (normalised, see `crate::path`), with the values of `;`
/// parameters (a classic carrier of session ids) cut: `/a;jsessionid=X` → `/a;`;
/// `(invalid)` for a path the gateway refuses.
/// `path()` never includes the query string.
fn traced_path(raw: &str) -> String {
    let Ok(normal) = crate::path::normalize(raw) else {
        return INVALID.to_string();
    };
    let mut out = String::with_capacity(normal.len().min(MAX_PATH));
    for (i, segment) in normal.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        // The `;` stays (routing sees `/h;x` as another path than `/h`), its value does not.
        match segment.split_once(';') {
            Some((name, _)) => {
                out.push_str(name);
                out.push(';');
            }
            None => out.push_str(segment),
        }
    }
    cut(&out, MAX_PATH)
}

/// Longest host, path and method kept in a trace (longer ones are cut).
const MAX_HOST: usize = 255;
const MAX_PATH: usize = 1024;
const MAX_METHOD: usize = 32;

/// The traced stages, in pipeline order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Log,
    Route,
    Auth,
    RateLimit,
    Transform,
    Upstream,
}

/// One stage of one trace.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StageTrace {
    pub stage: StageKind,
    /// `pass`, `skip` (nothing configured for the route), `match` (route), `deny` (401/403),
    /// `limited` (429), `no_route` (404/405), `reject` (another refusal), `response`
    /// (upstream answered) or `error` (no upstream answer).
    pub verdict: String,
    pub reason: String,
    /// Time spent in the stage itself, stages below it excluded.
    pub us: f64,
}

/// One sampled request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Trace {
    pub seq: u64,
    pub unix_ms: u64,
    pub replica: String,
    /// The connection's peer (`IP:port`): the client as xdp-lb's NAT keeps it, so the dashboard
    /// can explain the L4 decision of this very request. `None` from older replicas.
    #[serde(default)]
    pub client: Option<String>,
    pub method: String,
    pub host: String,
    /// Without the query string.
    pub path: String,
    pub route: Option<String>,
    pub pool: Option<String>,
    pub upstream: Option<String>,
    pub status: u16,
    /// Until the response head was ready (a streamed body is not included).
    pub total_us: f64,
    pub stages: Vec<StageTrace>,
}

/// `GET /admin/traces`: the newest `limit` traces with `seq >= since`, oldest first.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TracesReply {
    pub replica: String,
    /// The configured sample rate (0.0–1.0).
    pub sampling: f64,
    pub capacity: usize,
    /// Pass as `since` next time.
    pub next_seq: u64,
    /// Traces with `seq >= since` not returned: evicted from the buffer or over `limit`.
    pub dropped: u64,
    pub traces: Vec<Trace>,
}

/// The bounded buffer of finished traces; survives reloads (a reload may resize it).
pub struct TraceBuffer {
    ring: Mutex<Ring>,
}

struct Ring {
    traces: VecDeque<Trace>,
    capacity: usize,
    next_seq: u64,
}

impl TraceBuffer {
    pub fn new(capacity: usize) -> TraceBuffer {
        TraceBuffer {
            ring: Mutex::new(Ring {
                traces: VecDeque::new(),
                capacity: capacity.max(1),
                next_seq: 0,
            }),
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // A panic while holding the lock leaves a consistent ring (every update is one step).
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_capacity(&self, capacity: usize) {
        let mut r = self.ring();
        r.capacity = capacity.max(1);
        while r.traces.len() > r.capacity {
            r.traces.pop_front();
        }
    }

    pub fn capacity(&self) -> usize {
        self.ring().capacity
    }

    pub fn len(&self) -> usize {
        self.ring().traces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Numbers the trace and keeps it, dropping the oldest when full.
    pub fn push(&self, mut trace: Trace) {
        let mut r = self.ring();
        trace.seq = r.next_seq;
        r.next_seq += 1;
        if r.traces.len() >= r.capacity {
            r.traces.pop_front();
        }
        r.traces.push_back(trace);
    }

    /// The newest `limit` traces with `seq >= since`, oldest first; `next_seq`; how many
    /// with `seq >= since` were not returned.
    pub fn since(&self, since: u64, limit: usize) -> (Vec<Trace>, u64, u64) {
        let r = self.ring();
        // Beyond what this process numbered: the caller saw an earlier run of the replica.
        let since = if since > r.next_seq { 0 } else { since };
        let newer: Vec<&Trace> = r.traces.iter().filter(|t| t.seq >= since).collect();
        let skip = newer.len().saturating_sub(limit);
        let out: Vec<Trace> = newer[skip..].iter().map(|t| (*t).clone()).collect();
        let first = out.first().map_or(r.next_seq, |t| t.seq);
        (out, r.next_seq, first - since)
    }
}

/// A sampled request's recorder; `None` for the (usual) unsampled request.
pub type Tracer = Option<Arc<Recorder>>;

/// Whether to trace this request: one random comparison, and an allocation only if yes.
/// `log_written`: whether this config generation writes access log lines; `client`:
/// the connection's peer, if known.
pub fn sample<B>(
    admin: Option<&AdminConfig>,
    log_written: bool,
    req: &Request<B>,
    client: Option<SocketAddr>,
) -> Tracer {
    let a = admin?;
    if a.trace_sample_rate <= 0.0 || fastrand::f64() >= a.trace_sample_rate {
        return None;
    }
    let replica = a.replica.clone().unwrap_or_else(|| a.listen.clone());
    Some(Arc::new(Recorder::new(req, client, replica, log_written)))
}

/// What one request's stages did, filled in as it runs.
pub struct Recorder {
    started: Instant,
    unix_ms: u64,
    replica: String,
    client: Option<String>,
    method: String,
    host: String,
    path: String,
    log_written: bool,
    spans: Mutex<Vec<Span>>,
}

struct Span {
    kind: StageKind,
    entered: Instant,
    handoff: Option<Instant>,
    returned: Option<Instant>,
    verdict: &'static str,
    reason: String,
    us: f64,
}

fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Given by a stage's request type: the route, once routing found one.
pub trait RouteView {
    fn route_cfg(&self) -> Option<&RouteConfig>;
}

impl<B> RouteView for Req<B> {
    fn route_cfg(&self) -> Option<&RouteConfig> {
        None
    }
}

impl<B> RouteView for Routed<B> {
    fn route_cfg(&self) -> Option<&RouteConfig> {
        Some(&self.route.route.cfg)
    }
}

impl Recorder {
    pub fn new<B>(
        req: &Request<B>,
        client: Option<SocketAddr>,
        replica: String,
        log_written: bool,
    ) -> Recorder {
        // A request refused for its Host is traced without it: its host is whatever the
        // client chose to write there (markup, a second Host, a password).
        // A target's authority is the host routed by (`guard`), a Host only agrees with it.
        let host = match crate::guard::host_error(req) {
            Ok(()) => req
                .uri()
                .authority()
                .map(|a| a.as_str())
                .or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()))
                .unwrap_or_default(),
            Err(_) => INVALID,
        };
        Recorder {
            started: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64,
            replica,
            client: client.map(|c| c.to_string()),
            method: cut(req.method().as_str(), MAX_METHOD),
            host: cut(host, MAX_HOST),
            path: traced_path(req.uri().path()),
            log_written,
            spans: Mutex::new(Vec::with_capacity(6)),
        }
    }

    fn spans(&self) -> std::sync::MutexGuard<'_, Vec<Span>> {
        self.spans.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A stage starts; returns its mark.
    pub fn enter(&self, kind: StageKind) -> usize {
        let mut spans = self.spans();
        spans.push(Span {
            kind,
            entered: Instant::now(),
            handoff: None,
            returned: None,
            verdict: "",
            reason: String::new(),
            us: 0.0,
        });
        spans.len() - 1
    }

    /// The stage hands the request on: it let it pass (or had nothing to do for it).
    pub fn handoff(&self, mark: usize, route: Option<&RouteConfig>) {
        let now = Instant::now();
        let mut spans = self.spans();
        let Some(s) = spans.get_mut(mark) else { return };
        s.handoff = Some(now);
        let (verdict, reason) = passed(s.kind, route, self.log_written);
        s.verdict = verdict;
        s.reason = reason;
    }

    /// The rest of the pipeline answered the stage.
    pub fn returned(&self, mark: usize) {
        let now = Instant::now();
        if let Some(s) = self.spans().get_mut(mark) {
            s.returned = Some(now);
        }
    }

    /// The stage is done; `resp` is what it answers.
    pub fn exit(&self, mark: usize, resp: &Response<Body>) {
        let now = Instant::now();
        let mut spans = self.spans();
        let Some(s) = spans.get_mut(mark) else { return };
        let own = match (s.handoff, s.returned) {
            (Some(h), Some(r)) => (h - s.entered) + (now - r),
            (Some(h), None) => h - s.entered,
            _ => now - s.entered,
        };
        s.us = micros(own);
        if s.handoff.is_none() {
            let (verdict, reason) = answered(s.kind, resp);
            s.verdict = verdict;
            s.reason = reason;
        }
    }

    /// The request has its response head: the trace goes into `buffer`.
    pub fn finish(&self, resp: &Response<Body>, buffer: &TraceBuffer) {
        let ext = resp.extensions();
        let route = ext.get::<MatchedRoute>().map(|r| &r.0.cfg);
        let pool = route.and_then(|r| match &r.pool {
            Some(p) => Some(p.clone()),
            None if !r.aggregate.is_empty() => Some(
                r.aggregate
                    .iter()
                    .map(|a| a.pool.as_str())
                    .collect::<Vec<_>>()
                    .join("+"),
            ),
            None => None,
        });
        let stages = self
            .spans()
            .iter()
            .map(|s| StageTrace {
                stage: s.kind,
                verdict: s.verdict.to_string(),
                reason: s.reason.clone(),
                us: s.us,
            })
            .collect();
        buffer.push(Trace {
            seq: 0,
            unix_ms: self.unix_ms,
            replica: self.replica.clone(),
            client: self.client.clone(),
            method: self.method.clone(),
            host: self.host.clone(),
            path: self.path.clone(),
            route: route.map(|r| r.name.clone()),
            pool,
            upstream: ext.get::<UpstreamAddr>().map(|u| u.0.to_string()),
            status: resp.status().as_u16(),
            total_us: micros(self.started.elapsed()),
            stages,
        });
    }
}

fn micros(d: Duration) -> f64 {
    // 0.1 µs is finer than the clock calls cost; more digits would only be noise.
    (d.as_secs_f64() * 10_000_000.0).round() / 10.0
}

/// Verdict and reason of a stage that handed the request on.
fn passed(kind: StageKind, route: Option<&RouteConfig>, log_written: bool) -> (&'static str, String) {
    match (kind, route) {
        (StageKind::Log, _) if log_written => ("pass", "access log line when the body ends".into()),
        (StageKind::Log, _) => ("pass", "access log off".into()),
        (StageKind::Route, Some(r)) => ("match", r.name.clone()),
        (StageKind::Auth, Some(r)) => match r.auth {
            AuthMode::None => ("skip", "route needs no auth".into()),
            AuthMode::Jwt => ("pass", "jwt".into()),
            AuthMode::ApiKey => ("pass", "api-key".into()),
            AuthMode::Either => ("pass", "jwt or api-key".into()),
        },
        (StageKind::RateLimit, Some(r)) => match &r.rate_limit {
            None => ("skip", "route has no rate limit".into()),
            Some(name) => ("pass", name.clone()),
        },
        (StageKind::Transform, Some(r)) => match &r.transform {
            None => ("pass", "forwarding headers only".into()),
            Some(name) => ("pass", name.clone()),
        },
        _ => ("pass", String::new()),
    }
}

/// Verdict and reason of a stage that answered the request itself.
fn answered(kind: StageKind, resp: &Response<Body>) -> (&'static str, String) {
    let status = resp.status().as_u16();
    let code = resp.extensions().get::<ErrorCode>().map(|c| c.0.clone());
    if kind == StageKind::Upstream {
        return match resp.extensions().get::<UpstreamAddr>() {
            Some(a) => ("response", format!("{status} from {}", a.0)),
            None => ("error", code.unwrap_or_else(|| format!("status {status}"))),
        };
    }
    let verdict = match (kind, status) {
        (_, 401 | 403) => "deny",
        (_, 429) => "limited",
        (StageKind::Route, 404 | 405) => "no_route",
        _ => "reject",
    };
    (verdict, code.unwrap_or_else(|| format!("status {status}")))
}

/// A traced stage: `f` in front of `next`, recorded when the request is sampled.
pub struct Traced<F, N> {
    kind: StageKind,
    tracer: Tracer,
    f: F,
    next: N,
}

impl<F, N> Traced<F, N> {
    pub fn new(kind: StageKind, tracer: &Tracer, f: F, next: N) -> Traced<F, N> {
        Traced {
            kind,
            tracer: tracer.clone(),
            f,
            next,
        }
    }
}

impl<R, F, Fut, N> Next<R> for Traced<F, N>
where
    F: FnOnce(R, Hop<N>) -> Fut + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send,
    N: Send + 'static,
{
    fn run(self, req: R) -> impl Future<Output = Response<Body>> + Send {
        let mark = self.tracer.as_ref().map_or(0, |t| t.enter(self.kind));
        let hop = Hop {
            next: self.next,
            tracer: self.tracer.clone(),
            mark,
        };
        Noted {
            fut: (self.f)(req, hop),
            tracer: self.tracer,
            mark,
            exit: true,
        }
    }
}

/// The rest of the pipeline as a traced stage sees it: notes when the stage hands over
/// and when the answer comes back.
pub struct Hop<N> {
    next: N,
    tracer: Tracer,
    mark: usize,
}

impl<R: RouteView, N: Next<R>> Next<R> for Hop<N> {
    fn run(self, req: R) -> impl Future<Output = Response<Body>> + Send {
        if let Some(t) = &self.tracer {
            t.handoff(self.mark, req.route_cfg());
        }
        Noted {
            fut: self.next.run(req),
            tracer: self.tracer,
            mark: self.mark,
            exit: false,
        }
    }
}

pin_project_lite::pin_project! {
    /// `fut`, noting in the trace when it is ready (the stage's exit, or the rest of the
    /// pipeline's answer). A hand-written future rather than an `async` block: a block
    /// that awaits a future it captured holds it twice, which doubles the pipeline's
    /// future at every traced stage.
    struct Noted<Fut> {
        #[pin]
        fut: Fut,
        tracer: Tracer,
        mark: usize,
        exit: bool,
    }
}

impl<Fut: Future<Output = Response<Body>>> Future for Noted<Fut> {
    type Output = Response<Body>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Response<Body>> {
        let this = self.project();
        let resp = std::task::ready!(this.fut.poll(cx));
        if let Some(t) = this.tracer.as_ref() {
            if *this.exit {
                t.exit(*this.mark, &resp);
            } else {
                t.returned(*this.mark);
            }
        }
        std::task::Poll::Ready(resp)
    }
}

#[cfg(test)]
mod tests;
