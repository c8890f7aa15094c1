//! Observability: Prometheus metrics, the JSON access log and W3C trace context.
//!
//! All of it runs on every request, so it is built to be cheap there: metric
//! handles are registered once per route, the access record is only assembled when
//! someone reads it, and log lines are written by a background thread.

use crate::body::BodyEnd;
use crate::ctx::{owned, Req, TraceId, UpstreamAddr, UserId};
use crate::http_util::{full, Body};
use crate::routing::MatchedRoute;
use crate::stage::{run, Answer, Next};
use std::future::Future;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response};
pub use crate::stats::{
    prometheus, record_auth_failure, record_rate_limited, record_tunnel_end, render_metrics,
    RouteMetrics,
};
use crate::stats::unrouted;
use serde::Serialize;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Instant, SystemTime};
use tokio::sync::broadcast;

#[derive(Debug, Clone, Serialize)]
pub struct AccessRecord {
    pub time: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub latency_ms: f64,
    pub bytes: u64,
    pub client_ip: String,
    pub upstream: Option<String>,
    pub route: Option<String>,
    pub request_id: String,
    pub user_id: Option<String>,
    pub trace_id: String,
    /// Why the request got no answer of the pipeline's: set only for what hyper's
    /// HTTP/1 parser refused itself (`ParserRejection`) and for requests refused
    /// because the gateway drains (`DRAINING`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Set only on the line of an upgrade answered `101`, written when its tunnel
    /// ended (`TunnelLog`): how it ended, how long it lived, what it carried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelRecord>,
}

/// How a tunnel (an upgrade answered `101`) ended, on its access-log line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TunnelRecord {
    /// `client_closed`, `backend_closed`, `idle_timeout`, `drain` or `error`.
    pub end: &'static str,
    /// From the `101` to the end.
    pub duration_ms: f64,
    /// Bytes the tunnel carried from the client to the backend.
    pub bytes_to_backend: u64,
    /// Bytes it carried from the backend to the client (also the line's `bytes`).
    pub bytes_to_client: u64,
    /// The I/O error that ended it, or that came after one side closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `client` or `backend`: the side that closed its sending half first, when one
    /// did. A tunnel one side has closed goes on the other way (TCP half-close) until
    /// that side closes too, or `idle_timeout` / `drain` ends it: then this says who left.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closed_first: Option<&'static str>,
}

/// Lines waiting for the writer thread; past this they are dropped (and counted)
/// rather than letting a stuck stdout stall requests or grow memory.
const LOG_QUEUE: usize = 16 * 1024;

/// Writes one JSON object per line to stdout (diagnostics go to stderr, so the
/// access log can be piped as-is); tests subscribe to the same records.
///
/// Lines go through a bounded queue to a writer thread that batches them into few
/// `write` calls, flushing whenever the queue runs dry, so a line is never held back
/// for long and a request never waits on stdout.
pub struct AccessLog {
    tx: broadcast::Sender<AccessRecord>,
    lines: OnceLock<mpsc::SyncSender<Line>>,
    dropped: AtomicU64,
}

/// What the writer thread is sent: a line, or a request to flush what it has and
/// say so (`AccessLog::flush`, at exit).
enum Line {
    Text(Vec<u8>),
    Flush(mpsc::SyncSender<()>),
}

impl Default for AccessLog {
    fn default() -> Self {
        Self::new()
    }
}

impl AccessLog {
    pub fn new() -> AccessLog {
        AccessLog {
            tx: broadcast::channel(1024).0,
            lines: OnceLock::new(),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AccessRecord> {
        self.tx.subscribe()
    }

    /// Whether a record would be read by anyone, i.e. worth assembling.
    pub fn wanted(&self, write: bool) -> bool {
        write || self.tx.receiver_count() > 0
    }

    /// Lines dropped because stdout could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// `write` comes from the current config, so a reload can switch it.
    pub fn log(&self, rec: AccessRecord, write: bool) {
        if write {
            let mut line = Vec::with_capacity(384);
            if serde_json::to_writer(&mut line, &rec).is_ok() {
                line.push(b'\n');
                if self.writer().try_send(Line::Text(line)).is_err() {
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("gateway_access_log_dropped_total").increment(1);
                }
            }
        }
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(rec);
        }
    }

    /// Wait (blocking, at most `timeout`) until every line logged so far is written
    /// to stdout: the process is about to exit, and the writer thread with it. True
    /// if it was.
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let Some(lines) = self.lines.get() else {
            return true;
        };
        let deadline = Instant::now() + timeout;
        let (ack, done) = mpsc::sync_channel(1);
        let mut ask = Line::Flush(ack);
        loop {
            match lines.try_send(ask) {
                Ok(()) => break,
                Err(mpsc::TrySendError::Full(back)) if Instant::now() < deadline => {
                    ask = back;
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                Err(_) => return false,
            }
        }
        done.recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .is_ok()
    }

    fn writer(&self) -> &mpsc::SyncSender<Line> {
        self.lines.get_or_init(|| {
            let (tx, rx) = mpsc::sync_channel::<Line>(LOG_QUEUE);
            // Ends when the `AccessLog` (the only sender) is dropped.
            let spawned = std::thread::Builder::new()
                .name("access-log".into())
                .spawn(move || write_lines(&rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the access log writer");
            }
            tx
        })
    }
}

fn write_lines(rx: &mpsc::Receiver<Line>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let mut acks = Vec::new();
    while let Ok(line) = rx.recv() {
        // A closed stdout must not fail (or panic) anything: errors are ignored.
        let mut put = |line| match line {
            Line::Text(line) => {
                let _ = out.write_all(&line);
            }
            Line::Flush(ack) => acks.push(ack),
        };
        put(line);
        while let Ok(line) = rx.try_recv() {
            put(line);
        }
        let _ = out.flush();
        for ack in acks.drain(..) {
            let _ = ack.try_send(());
        }
    }
}

pub fn now_rfc3339() -> String {
    rfc3339(SystemTime::now())
}

/// RFC 3339 UTC timestamp with milliseconds, without pulling in a date crate.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60,
        d.subsec_millis()
    )
}

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Lower-case hex of `v` into `out`, most significant digit first, zero padded.
pub(crate) fn put_hex(out: &mut [u8], mut v: u128) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in out.iter_mut().rev() {
        *b = DIGITS[(v & 0xf) as usize];
        v >>= 4;
    }
}

/// W3C trace context: keep the trace id, start a new span id for our hop.
/// Returns the trace id. `client_sent`: whether the client may have sent one.
pub fn propagate_traceparent(headers: &mut HeaderMap, client_sent: bool) -> TraceId {
    let parsed = client_sent
        .then(|| headers.get(&TRACEPARENT))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let (trace, flags) = parsed.unwrap_or_else(|| {
        let trace = (u128::from(fastrand::u64(1..)) << 64) | u128::from(fastrand::u64(..));
        (trace, 1)
    });
    // "00-" trace "-" span "-" flags, formatted in place: this runs on every request.
    let mut v = *b"00-00000000000000000000000000000000-0000000000000000-00";
    put_hex(&mut v[3..35], trace);
    put_hex(&mut v[36..52], u128::from(fastrand::u64(1..)));
    put_hex(&mut v[53..55], u128::from(flags));
    if let Ok(v) = HeaderValue::from_bytes(&v) {
        headers.insert(TRACEPARENT, v);
    }
    TraceId(trace)
}

/// The trace id and flags of a valid `traceparent` value.
fn parse_traceparent(v: &str) -> Option<(u128, u8)> {
    let mut parts = v.trim().split('-');
    let (Some(version), Some(trace), Some(span), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    if !ok {
        return None;
    }
    Some((
        u128::from_str_radix(trace, 16).ok()?,
        u8::from_str_radix(flags, 16).ok()?,
    ))
}

/// Continue (or start) the W3C trace for this hop; with `on` false
/// (`observability.trace_context = false`) `traceparent` passes through untouched.
/// A step before the stages (it never answers): see `pipeline.rs`.
pub fn start_trace<B>(on: bool, req: &mut Req<B>) {
    if on {
        let (r, ctx) = req.split_mut();
        let trace = propagate_traceparent(r.headers_mut(), ctx.client_sent(owned::TRACEPARENT));
        ctx.trace_id = Some(trace);
    }
}

/// Serve the Prometheus text format on listeners that opted in. Answers itself or
/// hands over the rest of the pipeline's future (`Answer`).
pub fn metrics_stage<B, N: Next<Req<B>>>(
    metrics_path: &str,
    req: Req<B>,
    next: N,
) -> impl Future<Output = Response<Body>> + Send {
    match metrics_answer(metrics_path, &req) {
        Some(r) => Answer::now(r),
        None => Answer::next(next.run(req)),
    }
}

/// `metrics_stage`'s answer, if the request is for the metrics (a plain call: the
/// untraced pipeline runs it inline).
pub fn metrics_answer<B>(metrics_path: &str, req: &Req<B>) -> Option<Response<Body>> {
    let serve = req.ctx().conn.serve_metrics && metrics_path == req.uri().path();
    if !serve {
        return None;
    }
    let mut r = Response::new(full(render_metrics()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Some(r)
}

/// What the access record knows before the response: kept only when the record
/// will be read (log line written or a subscriber listening).
struct RequestSide {
    method: Method,
    path: String,
    client_ip: String,
    request_id: Option<Arc<str>>,
    trace_id: Option<TraceId>,
}

/// Time the rest of the stack, then write the access log line and request metrics
/// once the response body has been sent (`Pending`, told by the body itself).
/// `write`: whether this config generation writes log lines (subscribers get
/// records either way).
pub async fn access_log_stage<B>(
    log: Arc<AccessLog>,
    write: bool,
    mut req: Req<B>,
    next: impl Next<Req<B>>,
) -> Response<Body> {
    let start = LogStart::begin(log, write, &req);
    req.ctx_mut().log_reads_user = start.reads_user();
    let resp = run(next, req).await;
    start.finish(resp)
}

/// Status of a request dropped before its response head: the client went away
/// (HTTP/1 close, HTTP/2 `RST_STREAM`) or shutdown cut it — nginx's "client closed
/// request".
pub const CLIENT_CLOSED: u16 = 499;

/// The access log's part before the request goes on: when it started, and what the
/// record needs of the request (only if the record will be read). Split from
/// `access_log_stage` so the untraced pipeline runs it inline.
///
/// Also the request's drop guard: dropped without `finish` (the future holding it
/// was dropped before an answer), it logs and counts the request as `CLIENT_CLOSED`,
/// so every request gets exactly one line however it ends.
pub struct LogStart {
    started: Instant,
    request: Option<RequestSide>,
    route: Option<Arc<crate::routing::Route>>,
    /// `None` once `finish` took over: the guard is disarmed.
    log: Option<Arc<AccessLog>>,
    write: bool,
    /// Names the request to what the stages below it note if it is dropped
    /// (`Witness`).
    key: RequestKey,
}

impl LogStart {
    /// Whether `finish` reads the response's `UserId`: only for a record someone
    /// reads (`ReqCtx::log_reads_user`).
    pub fn reads_user(&self) -> bool {
        self.request.is_some()
    }

    pub fn begin<B>(log: Arc<AccessLog>, write: bool, req: &Req<B>) -> LogStart {
        let started = Instant::now();
        let ctx = req.ctx();
        let request = log.wanted(write).then(|| RequestSide {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            client_ip: ctx.conn.client_ip_str().to_string(),
            request_id: ctx.request_id.as_ref().map(|r| r.0.clone()),
            trace_id: ctx.trace_id,
        });
        LogStart {
            started,
            request,
            route: None,
            log: Some(log),
            write,
            key: RequestKey::of(ctx),
        }
    }

    /// The matched route, once known: named in the record even if the request is
    /// dropped before its answer.
    pub fn set_route(&mut self, route: Arc<crate::routing::Route>) {
        self.route = Some(route);
    }

    /// Hand the record's completion to the response body. The route is the one set
    /// (`set_route`), else the response's `MatchedRoute` extension.
    pub fn finish(mut self, mut resp: Response<Body>) -> Response<Body> {
        let Some(log) = self.log.take() else {
            return resp;
        };
        let ext = resp.extensions();
        let status = resp.status().as_u16();
        // A compare on every request; the extension is looked up for upgrades only.
        let tunnel = if status == 101 {
            ext.get::<TunnelLog>().cloned()
        } else {
            None
        };
        let pending = Pending {
            status,
            route: self
                .route
                .take()
                .or_else(|| ext.get::<MatchedRoute>().map(|r| r.0.clone())),
            upstream: resp
                .body()
                .upstream_addr()
                .or_else(|| ext.get::<UpstreamAddr>().map(|u| &u.0))
                .cloned(),
            user_id: ext.get::<UserId>().map(|u| u.as_str().to_owned()),
            request: self.request.take(),
            started: self.started,
            write: self.write,
            log,
        };
        match tunnel {
            Some(t) => t.wait(pending),
            None => resp.body_mut().on_end(Box::new(pending)),
        }
        resp
    }
}

impl Drop for LogStart {
    /// Inlined: runs on every request, where `finish` already disarmed it.
    #[inline]
    fn drop(&mut self) {
        if self.log.is_some() {
            self.dropped();
        }
    }
}

impl LogStart {
    /// The request was dropped before its answer (or its handling panicked).
    #[cold]
    #[inline(never)]
    fn dropped(&mut self) {
        let Some(log) = self.log.take() else { return };
        // Dropped while unwinding: the request's handling panicked, and its answer
        // is the 500 of `pipeline::panic_response`.
        let status = if std::thread::panicking() {
            500
        } else {
            CLIENT_CLOSED
        };
        // What the stages below knew, noted as they were dropped just before this.
        let note = take_note(self.key).unwrap_or_default();
        Pending {
            status,
            route: self.route.take().or(note.route),
            upstream: note.upstream,
            user_id: note.user.map(|u| u.user_id.clone()),
            request: self.request.take(),
            started: self.started,
            write: self.write,
            log,
        }
        .complete(0);
    }
}

/// One request among all of a thread's: its connection and its place on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestKey(usize, u64);

impl RequestKey {
    pub fn of(ctx: &crate::ctx::ReqCtx) -> RequestKey {
        RequestKey(Arc::as_ptr(&ctx.conn) as usize, ctx.index)
    }
}

/// What stages below the access log knew of a request dropped before its answer.
#[derive(Default)]
struct DropNote {
    route: Option<Arc<crate::routing::Route>>,
    upstream: Option<Arc<str>>,
    user: Option<Arc<crate::ctx::Identity>>,
}

thread_local! {
    /// The note of the request being dropped on this thread. A request's future is
    /// dropped from the inside out, on one thread: the stages' `Witness`es first,
    /// then its `LogStart`, which takes the note. So nothing is written here on the
    /// usual path, where every witness is disarmed.
    static DROPPED: std::cell::RefCell<Option<(RequestKey, DropNote)>> =
        const { std::cell::RefCell::new(None) };
}

fn take_note(key: RequestKey) -> Option<DropNote> {
    DROPPED
        .try_with(|d| match d.borrow_mut().take() {
            Some((k, note)) if k == key => Some(note),
            _ => None,
        })
        .ok()
        .flatten()
}

/// Held by a stage while it waits on what follows: if the request is dropped
/// meanwhile (the client left, shutdown cut it), what the stage knew reaches the
/// request's access-log line (its `LogStart`'s drop); `disarm` once answered. Costs
/// a few stores on the usual path.
pub struct Witness {
    key: RequestKey,
    route: Option<Arc<crate::routing::Route>>,
    upstream: Option<Arc<str>>,
    user: Option<Arc<crate::ctx::Identity>>,
    armed: bool,
}

impl Witness {
    pub fn new(key: RequestKey) -> Witness {
        Witness {
            key,
            route: None,
            upstream: None,
            user: None,
            armed: true,
        }
    }

    pub fn route(mut self, route: Arc<crate::routing::Route>) -> Witness {
        self.route = Some(route);
        self
    }

    pub fn user(mut self, user: Option<Arc<crate::ctx::Identity>>) -> Witness {
        self.user = user;
        self
    }

    pub fn upstream(mut self, upstream: Arc<str>) -> Witness {
        self.upstream = Some(upstream);
        self
    }

    /// The request was answered: nothing to note.
    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for Witness {
    /// Inlined: on the usual path the witness is disarmed and this is one test.
    #[inline]
    fn drop(&mut self) {
        if self.armed {
            self.note();
        }
    }
}

impl Witness {
    #[cold]
    #[inline(never)]
    fn note(&mut self) {
        let (route, upstream, user) = (self.route.take(), self.upstream.take(), self.user.take());
        let _ = DROPPED.try_with(|d| {
            let mut d = d.borrow_mut();
            let note = match &mut *d {
                Some((k, note)) if *k == self.key => note,
                other => &mut other.insert((self.key, DropNote::default())).1,
            };
            // Outer stages drop after inner ones: keep what the inner knew.
            note.route = note.route.take().or(route);
            note.upstream = note.upstream.take().or(upstream);
            note.user = note.user.take().or(user);
        });
    }
}

/// A request hyper's HTTP/1 parser answered itself (400, 414 or 431) before any
/// service call: known only from the error its connection ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParserRejection {
    pub status: u16,
    pub reason: &'static str,
}

impl ParserRejection {
    /// The rejection hyper answered, if `e` is one: the parse errors for which
    /// hyper's server writes an error response (`on_error` in hyper's `role.rs`).
    pub fn of(e: &hyper::Error) -> Option<ParserRejection> {
        if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
            return None;
        }
        // hyper's descriptions are fixed texts; its kinds are not public.
        let text = e.to_string().to_ascii_lowercase();
        let (status, reason) = if e.is_parse_too_large() {
            if text.contains("uri") {
                (414, "uri_too_long")
            } else {
                (431, "head_too_large")
            }
        } else if text.contains("content-length") {
            (400, "bad_content_length")
        } else if text.contains("transfer-encoding") {
            (400, "bad_transfer_encoding")
        } else if text.contains("header") {
            (400, "bad_header")
        } else if text.contains("uri") {
            (400, "bad_uri")
        } else if text.contains("method") {
            (400, "bad_method")
        } else if text.contains("version") {
            (400, "bad_version")
        } else {
            (400, "bad_request")
        };
        Some(ParserRejection { status, reason })
    }

    /// hyper answers 431 alike for too many fields and a head over its byte limit
    /// (both are its `Parse::TooLarge`, with one text). `fields`: the head's field
    /// lines as the raw-byte guard counted them (`Smuggled::head_fields`); more than
    /// the parser's `limit` makes the reason `too_many_headers`, as the gateway's own
    /// 431 for `max_headers` is named.
    pub fn with_fields(mut self, fields: u64, limit: usize) -> ParserRejection {
        if self.status == 431 && fields > limit as u64 {
            self.reason = "too_many_headers";
        }
        self
    }

    /// Count it (`gateway_rejected_requests_total{status,reason}`, and
    /// `gateway_requests_total{route="none"}` as every unrouted answer) and write
    /// its access-log line with what is known: client, status, reason.
    pub fn record(self, log: &AccessLog, write: bool, conn: &crate::ctx::ConnInfo) {
        record_rejection(log, write, conn, self, None, 0);
    }
}

/// A request the gateway refused before its pipeline because it drains (the
/// request started after the drain began: `pipeline::GatewayService`).
pub const DRAINING: ParserRejection = ParserRejection {
    status: 503,
    reason: "draining",
};

/// Count and log a request refused during a drain (`DRAINING`), as a parser
/// rejection is: its method and path are known, `bytes` is the answer's body (0 when
/// an HTTP/2 stream was reset instead).
pub fn record_draining<B>(
    log: &AccessLog,
    write: bool,
    conn: &crate::ctx::ConnInfo,
    req: &http::Request<B>,
    bytes: u64,
) {
    let what = (req.method(), req.uri().path());
    record_rejection(log, write, conn, DRAINING, Some(what), bytes);
}

/// `gateway_rejected_requests_total{status,reason}`, `gateway_requests_total{route=
/// "none"}` and the access-log line of a request refused before the pipeline.
fn record_rejection(
    log: &AccessLog,
    write: bool,
    conn: &crate::ctx::ConnInfo,
    r: ParserRejection,
    request: Option<(&Method, &str)>,
    bytes: u64,
) {
    metrics::counter!(
        "gateway_rejected_requests_total",
        "status" => r.status.to_string(),
        "reason" => r.reason
    )
    .increment(1);
    unrouted().count("none", r.status);
    if !log.wanted(write) {
        return;
    }
    let (method, path) = request.map_or((String::new(), String::new()), |(m, p)| {
        (m.to_string(), p.to_string())
    });
    let record = AccessRecord {
        time: now_rfc3339(),
        method,
        path,
        status: r.status,
        latency_ms: 0.0,
        bytes,
        client_ip: conn.client_ip_str().to_string(),
        upstream: None,
        route: None,
        request_id: String::new(),
        user_id: None,
        trace_id: String::new(),
        reason: Some(r.reason),
        tunnel: None,
    };
    log.log(record, write);
}

/// The access record and metrics of a response whose body is still being sent:
/// completed by the body when it ends (or the client goes away), so streamed
/// responses get a true size and duration.
struct Pending {
    status: u16,
    route: Option<Arc<crate::routing::Route>>,
    upstream: Option<Arc<str>>,
    user_id: Option<String>,
    request: Option<RequestSide>,
    started: Instant,
    write: bool,
    log: Arc<AccessLog>,
}

impl BodyEnd for Pending {
    fn ended(self: Box<Self>, bytes: u64) {
        (*self).complete(bytes);
    }
}

impl Pending {
    /// Inlined: on every request, in `ended` (the guard's `Drop` is the rare caller).
    #[inline]
    fn complete(self, bytes: u64) {
        let elapsed = self.started.elapsed();
        self.count(elapsed);
        self.write_line(elapsed, bytes, None);
    }

    /// The request metrics: `gateway_requests_total` and a duration sample.
    #[inline]
    fn count(&self, elapsed: std::time::Duration) {
        match &self.route {
            Some(r) => r
                .metrics
                .record(&r.cfg.name, self.status, elapsed.as_secs_f64()),
            None => unrouted().record("none", self.status, elapsed.as_secs_f64()),
        }
    }

    /// The line of a tunnel's request, at its end: the duration from the request to
    /// the tunnel's end and the bytes sent to the client, as nginx logs one.
    fn write_tunnel_line(self, t: TunnelRecord) {
        let elapsed = self.started.elapsed();
        self.write_line(elapsed, t.bytes_to_client, Some(t));
    }

    /// The access-log line, if someone reads it.
    #[inline]
    fn write_line(self, elapsed: std::time::Duration, bytes: u64, tunnel: Option<TunnelRecord>) {
        let p = self;
        let Some(req) = p.request else { return };
        // The wall clock is read only for a record someone reads: when the request
        // arrived is now minus its duration.
        let time = SystemTime::now().checked_sub(elapsed).unwrap_or_else(SystemTime::now);
        let record = AccessRecord {
            time: rfc3339(time),
            method: req.method.to_string(),
            path: req.path,
            status: p.status,
            latency_ms: elapsed.as_secs_f64() * 1000.0,
            bytes,
            client_ip: req.client_ip,
            upstream: p.upstream.map(|u| u.to_string()),
            route: p.route.map(|r| r.cfg.name.clone()),
            request_id: req.request_id.map(|r| r.to_string()).unwrap_or_default(),
            user_id: p.user_id,
            trace_id: req.trace_id.map(|t| t.to_string()).unwrap_or_default(),
            reason: None,
            tunnel,
        };
        p.log.log(record, p.write);
    }
}

/// The access-log line of an upgrade answered `101` waits for its tunnel to end, as
/// nginx's does: one request, one line, with how the tunnel ended, how long it lived
/// and the bytes it carried. The proxy puts one in the `101`'s extensions and tells
/// it the end (`ended`); `LogStart::finish` hands it the request's line (`wait`).
/// Whichever comes second writes the line. The request metrics are counted at the
/// `101`, with the handshake's duration: an hour-long tunnel is no slow request.
#[derive(Clone, Default)]
pub struct TunnelLog(Arc<std::sync::Mutex<TunnelLine>>);

#[derive(Default)]
enum TunnelLine {
    #[default]
    Open,
    Waiting(Pending),
    Ended(TunnelRecord),
    Written,
}

impl TunnelLog {
    fn wait(&self, p: Pending) {
        p.count(p.started.elapsed());
        let mut line = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::take(&mut *line) {
            TunnelLine::Ended(t) => {
                *line = TunnelLine::Written;
                drop(line);
                p.write_tunnel_line(t);
            }
            _ => *line = TunnelLine::Waiting(p),
        }
    }

    /// The tunnel ended (once; later calls are ignored): its request's line is
    /// written now, or as soon as it reaches the access log.
    pub fn ended(&self, t: TunnelRecord) {
        let mut line = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match std::mem::take(&mut *line) {
            TunnelLine::Waiting(p) => {
                *line = TunnelLine::Written;
                drop(line);
                p.write_tunnel_line(t);
            }
            TunnelLine::Open => *line = TunnelLine::Ended(t),
            done => *line = done,
        }
    }
}

impl std::fmt::Debug for TunnelLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelLog")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_kept_or_created() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        assert_eq!(
            propagate_traceparent(&mut h, true).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let tp = h["traceparent"].to_str().expect("ascii");
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
                && !tp.contains("00f067aa0ba902b7"),
            "{tp}"
        );
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("garbage"));
        let id = propagate_traceparent(&mut h, true).to_string();
        assert_eq!(id.len(), 32);
        assert!(parse_traceparent(h["traceparent"].to_str().expect("ascii")).is_some());
    }

    fn req(id: &str) -> Req<()> {
        let conn = crate::ctx::ConnInfo::new("127.0.0.1:9".parse().expect("addr"), false, false);
        let mut r = Req::new(
            http::Request::get("/p").body(()).expect("request"),
            crate::ctx::ReqCtx::new(Arc::new(conn), 0),
        );
        r.ctx_mut().request_id = Some(crate::ctx::RequestId(id.into()));
        r
    }

    /// A request whose future is dropped before its answer is logged once, as 499;
    /// one that was answered is logged by its body, not by the guard.
    #[test]
    fn the_log_start_logs_a_request_dropped_before_its_answer_once() {
        let log = Arc::new(AccessLog::new());
        let mut rx = log.subscribe();
        drop(LogStart::begin(log.clone(), false, &req("gone")));
        let r = rx.try_recv().expect("a record for the dropped request");
        assert_eq!((r.status, r.request_id.as_str(), r.path.as_str()), (499, "gone", "/p"));
        assert!(rx.try_recv().is_err(), "exactly one");

        let start = LogStart::begin(log.clone(), false, &req("answered"));
        let resp = start.finish(Response::new(full("ok")));
        assert!(rx.try_recv().is_err(), "nothing until the body ends");
        drop(resp);
        let r = rx.try_recv().expect("a record for the answered request");
        assert_eq!((r.status, r.request_id.as_str()), (200, "answered"));
        assert!(rx.try_recv().is_err(), "exactly one");
    }

    /// What a stage's armed `Witness` knew reaches the line of its own request only;
    /// a disarmed one (the usual path) notes nothing.
    #[test]
    fn a_witness_names_the_backend_on_its_own_requests_line_only() {
        let log = Arc::new(AccessLog::new());
        let mut rx = log.subscribe();
        let mine = req("mine");
        let start = LogStart::begin(log.clone(), false, &mine);
        drop(Witness::new(RequestKey::of(mine.ctx())).upstream("10.0.0.1:80".into()));
        drop(start);
        let r = rx.try_recv().expect("record");
        assert_eq!((r.status, r.upstream.as_deref()), (499, Some("10.0.0.1:80")));

        let other = req("other");
        let start = LogStart::begin(log.clone(), false, &other);
        drop(Witness::new(RequestKey::of(mine.ctx())).upstream("10.0.0.2:80".into()));
        drop(start);
        assert_eq!(rx.try_recv().expect("record").upstream, None, "another request's note");

        let start = LogStart::begin(log.clone(), false, &mine);
        Witness::new(RequestKey::of(mine.ctx())).upstream("10.0.0.3:80".into()).disarm();
        drop(start);
        assert_eq!(rx.try_recv().expect("record").upstream, None, "disarmed");
    }

    fn tunnel_end(end: &'static str) -> TunnelRecord {
        TunnelRecord {
            end,
            duration_ms: 1.0,
            bytes_to_backend: 3,
            bytes_to_client: 5,
            error: None,
            closed_first: None,
        }
    }

    fn upgraded(tunnel: &TunnelLog) -> Response<Body> {
        let mut resp = Response::new(Body::empty());
        *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
        resp.extensions_mut().insert(tunnel.clone());
        resp
    }

    /// A `101`'s line waits for its tunnel's end, whichever of the two reaches the
    /// `TunnelLog` first, and is written once, with the tunnel's bytes.
    #[test]
    fn a_tunnels_line_is_written_once_at_its_end() {
        let log = Arc::new(AccessLog::new());
        let mut rx = log.subscribe();
        let tunnel = TunnelLog::default();
        drop(LogStart::begin(log.clone(), false, &req("ws")).finish(upgraded(&tunnel)));
        assert!(rx.try_recv().is_err(), "nothing while the tunnel is open");
        tunnel.ended(tunnel_end("backend_closed"));
        tunnel.ended(tunnel_end("drain"));
        let r = rx.try_recv().expect("the line at the end");
        assert_eq!((r.status, r.bytes, r.request_id.as_str()), (101, 5, "ws"));
        assert_eq!(r.tunnel, Some(tunnel_end("backend_closed")), "the first end only");
        assert!(rx.try_recv().is_err(), "exactly one");

        // The tunnel ended before its 101 reached the access log.
        let tunnel = TunnelLog::default();
        tunnel.ended(tunnel_end("error"));
        assert!(rx.try_recv().is_err());
        drop(LogStart::begin(log.clone(), false, &req("early")).finish(upgraded(&tunnel)));
        let r = rx.try_recv().expect("the line");
        assert_eq!(r.tunnel.map(|t| t.end), Some("error"));
        assert!(rx.try_recv().is_err(), "exactly one");
    }

    /// Dropped while a panic unwinds, the request's answer is the panic's 500.
    #[test]
    fn the_log_start_of_a_panicking_request_logs_500() {
        let log = Arc::new(AccessLog::new());
        let mut rx = log.subscribe();
        let start = LogStart::begin(log.clone(), false, &req("boom"));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _start = start;
            panic!("a bug in a stage");
        }));
        assert!(r.is_err());
        assert_eq!(rx.try_recv().expect("record").status, 500);
    }

    /// Parse errors hyper answers itself map to the status it sent.
    #[tokio::test]
    async fn parser_rejections_carry_hyper_status() {
        for (head, want) in [
            (&b"GET / HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n"[..], Some((400, "bad_header"))),
            (b"GET / HTTP/1.1\r\nTransfer-Encoding: xchunked\r\n\r\n", Some((400, "bad_transfer_encoding"))),
            (b"GET / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n", Some((400, "bad_content_length"))),
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
        ] {
            let (client, server) = tokio::io::duplex(4096);
            let (_keep, mut w) = tokio::io::split(client);
            tokio::io::AsyncWriteExt::write_all(&mut w, head).await.expect("write");
            tokio::io::AsyncWriteExt::shutdown(&mut w).await.expect("shutdown");
            let svc = hyper::service::service_fn(|_r| async {
                Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Empty::<bytes::Bytes>::new()))
            });
            let served = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(server), svc);
            let r = tokio::time::timeout(std::time::Duration::from_secs(5), served)
                .await
                .expect("connection ended");
            let got = r.err().and_then(|e| ParserRejection::of(&e)).map(|p| (p.status, p.reason));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(head));
        }
    }

    #[test]
    fn timestamp_shape() {
        let t = now_rfc3339();
        assert_eq!(t.len(), 24, "{t}");
        assert!(t.starts_with("20") && t.ends_with('Z'), "{t}");
    }

    proptest::proptest! {
        #[test]
        fn traceparent_parse_never_panics(v in "\\PC{0,80}") {
            let _ = parse_traceparent(&v);
        }
    }
}
