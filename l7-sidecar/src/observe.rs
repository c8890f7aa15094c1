//! Observability: Prometheus metrics, the JSON access log and W3C trace context.

use http::{HeaderMap, HeaderValue};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use std::sync::OnceLock;
use tokio::sync::broadcast;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide recorder once; later gateways in the same process share it.
pub fn prometheus() -> Option<&'static PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            let buckets = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
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

/// Writes one JSON line per request; tests subscribe to the same records.
pub struct AccessLog {
    enabled: bool,
    tx: broadcast::Sender<AccessRecord>,
}

impl AccessLog {
    pub fn new(enabled: bool) -> AccessLog {
        AccessLog { enabled, tx: broadcast::channel(1024).0 }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<AccessRecord> {
        self.tx.subscribe()
    }

    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    pub fn log(&self, rec: AccessRecord) {
        if self.enabled {
            if let Ok(line) = serde_json::to_string(&rec) {
                tracing::info!(target: "access_log", "{line}");
            }
        }
        let _ = self.tx.send(rec);
    }
}

pub fn record_request(route: &str, status: u16, secs: f64) {
    metrics::counter!("gateway_requests_total", "route" => route.to_string(), "status" => status.to_string()).increment(1);
    metrics::histogram!("gateway_request_duration_seconds", "route" => route.to_string()).record(secs);
}

pub fn record_rate_limited(route: &str) {
    metrics::counter!("gateway_ratelimit_rejections_total", "route" => route.to_string()).increment(1);
}

pub fn record_auth_failure(route: &str, reason: &'static str) {
    metrics::counter!("gateway_auth_failures_total", "route" => route.to_string(), "reason" => reason).increment(1);
}

/// RFC 3339 UTC timestamp with milliseconds, without pulling in a date crate.
pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
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
    let parsed = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(parse_traceparent);
    let (trace_id, flags) = parsed.unwrap_or_else(|| (format!("{:016x}{:016x}", fastrand::u64(1..), fastrand::u64(..)), "01".into()));
    let span = format!("{:016x}", fastrand::u64(1..));
    if let Ok(v) = HeaderValue::from_str(&format!("00-{trace_id}-{span}-{flags}")) {
        headers.insert("traceparent", v);
    }
    trace_id
}

fn parse_traceparent(v: &str) -> Option<(String, String)> {
    let parts: Vec<&str> = v.trim().split('-').collect();
    let [version, trace, span, flags] = parts.as_slice() else { return None };
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let ok = hex(version, 2)
        && *version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2);
    ok.then(|| (trace.to_string(), flags.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_kept_or_created() {
        let mut h = HeaderMap::new();
        h.insert("traceparent", HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(propagate_traceparent(&mut h), "4bf92f3577b34da6a3ce929d0e0e4736");
        let tp = h["traceparent"].to_str().expect("ascii");
        assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && !tp.contains("00f067aa0ba902b7"), "{tp}");
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
}
