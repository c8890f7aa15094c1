//! Observability: Prometheus metrics, the JSON access log and W3C trace context.

use crate::gateway::Shared;
use crate::proxy::{full, Body};
use crate::stack::{
    run, ConnInfo, Next, RequestId, RouteName, Snapshot, TraceId, UpstreamAddr, UserId,
};
use http::{header, HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt as _;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::Instant;
use tokio::sync::broadcast;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide recorder once; later gateways in the same process share it.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let buckets = [
                0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let builder = PrometheusBuilder::new().set_buckets(&buckets).ok()?;
            match builder.install_recorder() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

pub fn render_metrics() -> String {
    prometheus().map(|h| h.render()).unwrap_or_default()
}

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
}

/// Writes one JSON object per line to stdout (diagnostics go to stderr, so the
/// access log can be piped as-is); tests subscribe to the same records.
pub struct AccessLog {
    tx: broadcast::Sender<AccessRecord>,
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
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AccessRecord> {
        self.tx.subscribe()
    }

    /// `write` comes from the current config, so a reload can switch it.
    pub fn log(&self, rec: AccessRecord, write: bool) {
        if write {
            if let Ok(line) = serde_json::to_string(&rec) {
                use std::io::Write as _;
                // A closed stdout must not fail (or panic) the request.
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
        }
        let _ = self.tx.send(rec);
    }
}

pub fn record_request(route: &str, status: u16, secs: f64) {
    metrics::counter!("gateway_requests_total", "route" => route.to_string(), "status" => status.to_string()).increment(1);
    metrics::histogram!("gateway_request_duration_seconds", "route" => route.to_string())
        .record(secs);
}

pub fn record_rate_limited(route: &str) {
    metrics::counter!("gateway_ratelimit_rejections_total", "route" => route.to_string())
        .increment(1);
}

pub fn record_auth_failure(route: &str, reason: &'static str) {
    metrics::counter!("gateway_auth_failures_total", "route" => route.to_string(), "reason" => reason).increment(1);
}

/// RFC 3339 UTC timestamp with milliseconds, without pulling in a date crate.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
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

/// W3C trace context: keep the trace id, start a new span id for our hop.
/// Returns the trace id.
pub fn propagate_traceparent(headers: &mut HeaderMap) -> String {
    let parsed = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let (trace_id, flags) = parsed.unwrap_or_else(|| {
        (
            format!("{:016x}{:016x}", fastrand::u64(1..), fastrand::u64(..)),
            "01".into(),
        )
    });
    let span = format!("{:016x}", fastrand::u64(1..));
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace_id}-{span}-{flags}")) {
        headers.insert("traceparent", v);
    }
    trace_id
}

fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let [version, trace, span, flags] = parts.as_slice() else {
        return None;
    };
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let ok = hex(version, 2)
        && *version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    ok.then(|| (trace.to_string(), flags.to_string()))
}

/// Continue (or start) the W3C trace for this hop.
pub async fn trace_stage<B>(mut req: Request<B>, next: Next<B>) -> Response<Body> {
    let trace = propagate_traceparent(req.headers_mut());
    req.extensions_mut().insert(TraceId(trace));
    run(next, req).await
}

/// Serve the Prometheus text format on listeners that opted in.
pub async fn metrics_stage<B>(req: Request<B>, next: Next<B>) -> Response<Body> {
    let serve = req
        .extensions()
        .get::<ConnInfo>()
        .is_some_and(|c| c.serve_metrics)
        && req
            .extensions()
            .get::<Snapshot>()
            .is_some_and(|s| s.0.cfg.observability.metrics_path == req.uri().path());
    if !serve {
        return run(next, req).await;
    }
    let mut r = Response::new(full(render_metrics()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}

/// Time the rest of the stack, then write the access log line and request metrics.
pub async fn access_log_stage<B>(
    shared: Arc<Shared>,
    req: Request<B>,
    next: Next<B>,
) -> Response<Body> {
    let started = Instant::now();
    let ext = req.extensions();
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let client_ip = ext
        .get::<ConnInfo>()
        .map(|c| c.peer.ip().to_string())
        .unwrap_or_default();
    let request_id = ext
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();
    let trace_id = ext
        .get::<TraceId>()
        .map(|t| t.0.clone())
        .unwrap_or_default();
    let write = ext
        .get::<Snapshot>()
        .is_none_or(|s| s.0.cfg.observability.access_log);
    let time = now_rfc3339();
    let resp = run(next, req).await;
    let ext = resp.extensions();
    let record = AccessRecord {
        time,
        method,
        path,
        status: resp.status().as_u16(),
        latency_ms: 0.0,
        bytes: 0,
        client_ip,
        upstream: ext.get::<UpstreamAddr>().map(|u| u.0.clone()),
        route: ext.get::<RouteName>().map(|r| r.0.clone()),
        request_id,
        user_id: ext.get::<UserId>().map(|u| u.0.clone()),
        trace_id,
    };
    let pending = Pending {
        record,
        started,
        write,
        shared,
    };
    resp.map(|inner| {
        LoggedBody {
            inner,
            bytes: 0,
            pending: Some(pending),
        }
        .boxed()
    })
}

struct Pending {
    record: AccessRecord,
    started: Instant,
    write: bool,
    shared: Arc<Shared>,
}

/// Counts the bytes actually sent and logs the request when its body ends (or the
/// client goes away), so streamed responses get a true size and duration.
struct LoggedBody {
    inner: Body,
    bytes: u64,
    pending: Option<Pending>,
}

impl LoggedBody {
    fn finish(&mut self) {
        let Some(mut p) = self.pending.take() else {
            return;
        };
        let elapsed = p.started.elapsed();
        p.record.latency_ms = elapsed.as_secs_f64() * 1000.0;
        p.record.bytes = self.bytes;
        record_request(
            p.record.route.as_deref().unwrap_or("none"),
            p.record.status,
            elapsed.as_secs_f64(),
        );
        p.shared.access_log.log(p.record, p.write);
    }
}

impl hyper::body::Body for LoggedBody {
    type Data = bytes::Bytes;
    type Error = crate::proxy::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish();
                }
            }
            std::task::Poll::Ready(_) => self.finish(),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.finish();
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
            propagate_traceparent(&mut h),
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
        let id = propagate_traceparent(&mut h);
        assert_eq!(id.len(), 32);
        assert!(parse_traceparent(h["traceparent"].to_str().expect("ascii")).is_some());
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
