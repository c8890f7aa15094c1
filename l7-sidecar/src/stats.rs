//! Prometheus metrics: the process-wide recorder and the counters stages bump.
//! A leaf, so routing, auth and rate limiting can count without importing the
//! access-log stage.

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

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
                Ok(h) => {
                    spawn_upkeep(h.clone(), METRICS_UPKEEP);
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// How often recorded histogram samples are folded into their buckets. The exporter
/// keeps every sample (8 bytes each) until then; `install_recorder` leaves this to us.
pub const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// Without this, every request's duration sample stays in memory until someone
/// scrapes `/metrics` (a gateway nobody scrapes grows by 8 bytes per request, for
/// ever). A plain thread rather than a Tokio task: the recorder is process-wide and
/// outlives any one runtime, and a busy runtime must not delay the drain.
fn spawn_upkeep(handle: PrometheusHandle, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            handle.run_upkeep();
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the metrics upkeep thread");
    }
}

pub fn render_metrics() -> String {
    prometheus().map(|h| h.render()).unwrap_or_default()
}

/// Per-route request metrics, registered on first use and then reused: building a
/// metric key from name and labels and looking it up costs more per request than
/// incrementing it.
#[derive(Default)]
pub struct RouteMetrics {
    duration: OnceLock<Histogram>,
    by_status: RwLock<Vec<(u16, Counter)>>,
}

impl RouteMetrics {
    pub fn record(&self, route: &str, status: u16, secs: f64) {
        self.count(route, status);
        self.duration
            .get_or_init(|| {
                metrics::histogram!("gateway_request_duration_seconds", "route" => route.to_string())
            })
            .record(secs);
    }

    /// Count an answer in `gateway_requests_total` without a duration sample (one
    /// hyper's parser gave before the request was timed).
    #[inline]
    pub fn count(&self, route: &str, status: u16) {
        // Counted under the read lock: a clone of the handle (a reference count
        // taken and dropped) is only needed to register a new status.
        let counted = self.by_status.read().ok().is_some_and(|v| {
            v.iter()
                .find(|(s, _)| *s == status)
                .map(|(_, c)| c.increment(1))
                .is_some()
        });
        if !counted {
            let c = metrics::counter!("gateway_requests_total", "route" => route.to_string(), "status" => status.to_string());
            if let Ok(mut v) = self.by_status.write() {
                if !v.iter().any(|(s, _)| *s == status) {
                    v.push((status, c.clone()));
                }
            }
            c.increment(1);
        }
    }
}

/// Requests that matched no route.
pub fn unrouted() -> &'static RouteMetrics {
    static NONE: OnceLock<RouteMetrics> = OnceLock::new();
    NONE.get_or_init(RouteMetrics::default)
}

pub fn record_rate_limited(route: &str) {
    metrics::counter!("gateway_ratelimit_rejections_total", "route" => route.to_string())
        .increment(1);
}

pub fn record_auth_failure(route: &str, reason: &'static str) {
    metrics::counter!("gateway_auth_failures_total", "route" => route.to_string(), "reason" => reason).increment(1);
}

/// A tunnel (an upgrade answered `101`) ended: `gateway_tunnel_ends_total{reason}` and
/// the bytes it carried, `gateway_tunnel_bytes_total{direction}` (added at its end).
/// Once per tunnel, so the handles are not kept.
pub fn record_tunnel_end(end: &'static str, to_backend: u64, to_client: u64) {
    metrics::counter!("gateway_tunnel_ends_total", "reason" => end).increment(1);
    metrics::counter!("gateway_tunnel_bytes_total", "direction" => "to_backend").increment(to_backend);
    metrics::counter!("gateway_tunnel_bytes_total", "direction" => "to_client").increment(to_client);
}
