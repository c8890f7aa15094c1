//! Prometheus metrics of the data plane's counters and the daemon's health view, served on an
//! opt-in listen address (`xdp-lb run --metrics 127.0.0.1:9464`, see [`serve`]).
//!
//! Each scrape gathers a [`Scrape`] (plain data) from the daemon and renders it with
//! `metrics-exporter-prometheus` (the stack l7-sidecar uses) into a recorder built for that scrape
//! alone: families come out grouped and typed, label values escaped, and a removed service or
//! backend disappears with the next scrape instead of lingering in a global registry.

pub mod serve;
#[cfg(test)]
mod tests;

use metrics::{Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::PrometheusBuilder;

use crate::{
    daemon::Daemon,
    dataplane::DataplaneError,
    health::Health,
    plan::{self, ServiceHealth},
    stats::{self, Snapshot},
};

/// Everything one scrape shows.
#[derive(Debug)]
pub struct Scrape {
    /// Per-service and per-backend counters and the pass/drop reasons (every one in
    /// `xdp_lb_common::reasons`, as read from the data plane).
    pub stats: Snapshot,
    pub services: Vec<ServiceHealth>,
    pub backends: Vec<BackendState>,
    /// Health probes that failed on this host, per reason label.
    pub local_errors: Vec<(&'static str, u64)>,
    /// Per service, the fingerprint of its installed ring (see `maglev::fingerprint`).
    pub rings: Vec<(String, u64)>,
    /// Per VIP address, whether it is announced (empty while `[announce]` is off).
    pub announced: Vec<(String, bool)>,
    /// Per service, whether its ring could not be rebuilt in the last reprogramming.
    pub ring_errors: Vec<(String, bool)>,
}

/// A backend's health view.
#[derive(Debug)]
pub struct BackendState {
    pub service: String,
    pub backend: String,
    /// Passes its health checks, or is unchecked.
    pub up: bool,
    /// Open flows (read for every installed backend; meaningful for NAT TCP services).
    pub active_flows: Option<u64>,
    /// Latency of the last successful check.
    pub check_latency_seconds: Option<f64>,
}

/// Reads what a scrape shows from the daemon (the data plane's maps and the health monitor).
pub fn collect(daemon: &Daemon) -> Result<Scrape, DataplaneError> {
    let stats = stats::snapshot(&daemon.dataplane, &daemon.tables)?;
    let statuses = crate::daemon::statuses(daemon);
    let mut backends = Vec::new();
    for s in &daemon.config().services {
        let installed = daemon.tables.services().find(|i| i.config.name == s.name);
        for b in &s.backends {
            let status = plan::probe_target(s, b).and_then(|(t, _)| statuses.get(&t).cloned());
            backends.push(BackendState {
                service: s.name.clone(),
                backend: b.address.to_string(),
                up: status.as_ref().is_none_or(|st| st.health != Health::Down),
                active_flows: installed
                    .and_then(|i| i.backend_ids.get(&b.address))
                    .and_then(|id| daemon.dataplane.active_flows(*id).ok()),
                check_latency_seconds: status.and_then(|st| st.last_latency_us).map(|us| us as f64 / 1e6),
            });
        }
    }
    Ok(Scrape {
        stats,
        services: daemon.service_health().to_vec(),
        backends,
        local_errors: crate::daemon::health_local_errors(daemon),
        rings: daemon
            .config()
            .services
            .iter()
            .filter_map(|s| Some((s.name.clone(), daemon.tables.ring_fingerprint(&s.name)?)))
            .collect(),
        ring_errors: daemon.config().services.iter().map(|s| (s.name.clone(), daemon.tables.ring_errors().contains_key(&s.name))).collect(),
        announced: daemon.announce_status().map(|a| a.vips.iter().map(|v| (v.vip.clone(), v.announced)).collect()).unwrap_or_default(),
    })
}

/// The exposition text for the daemon's current state.
pub fn render(daemon: &Daemon) -> Result<String, DataplaneError> {
    Ok(exposition(&collect(daemon)?))
}

/// Renders a scrape in the Prometheus text format.
pub fn exposition(scrape: &Scrape) -> String {
    let out = Exposition { recorder: PrometheusBuilder::new().build_recorder() };
    for s in &scrape.stats.services {
        let labels = || vec![label("service", &s.name)];
        out.counter("xdp_lb_service_packets_total", "Packets forwarded for the service, both directions.", labels(), s.packets);
        out.counter("xdp_lb_service_bytes_total", "Bytes forwarded for the service.", labels(), s.bytes);
        out.counter("xdp_lb_service_new_flows_total", "Flows scheduled for the service.", labels(), s.new_flows);
        for b in &s.backends {
            let labels = || vec![label("service", &s.name), label("backend", &b.address)];
            for (name, help, value) in [
                ("xdp_lb_backend_packets_total", "Packets forwarded to or from the backend.", b.packets),
                ("xdp_lb_backend_bytes_total", "Bytes forwarded to or from the backend.", b.bytes),
                ("xdp_lb_backend_new_flows_total", "Flows scheduled to the backend.", b.new_flows),
                ("xdp_lb_backend_syns_total", "TCP SYNs forwarded to the backend.", b.syns),
                ("xdp_lb_backend_syn_acks_total", "SYN-ACKs returned by the backend (NAT).", b.syn_acks),
                ("xdp_lb_backend_resets_total", "RSTs sent by the backend (NAT).", b.resets),
            ] {
                out.counter(name, help, labels(), value);
            }
        }
    }
    for h in &scrape.services {
        let labels = || vec![label("service", &h.name)];
        out.gauge(
            "xdp_lb_service_all_backends_down",
            "1 while no backend of the service is healthy (its all_down policy applies).",
            labels(),
            f64::from(u8::from(h.all_down)),
        );
        out.gauge("xdp_lb_service_serving_backends", "Backends in the service's ring now.", labels(), h.serving as f64);
    }
    for (service, fingerprint) in &scrape.rings {
        out.gauge(
            "xdp_lb_service_ring_info",
            "Always 1; the fingerprint label hashes the installed ring as backend addresses, equal on nodes that agree.",
            vec![label("service", service), label("fingerprint", &format!("{fingerprint:016x}"))],
            1.0,
        );
    }
    for (service, failed) in &scrape.ring_errors {
        out.gauge(
            "xdp_lb_service_ring_error",
            "1 while the service's ring could not be rebuilt (it serves its previous ring; see xdp-lb status).",
            vec![label("service", service)],
            f64::from(u8::from(*failed)),
        );
    }
    for (vip, announced) in &scrape.announced {
        out.gauge(
            "xdp_lb_vip_announced",
            "1 while this node announces the VIP address (its route is in the [announce] table), else 0.",
            vec![label("vip", vip)],
            f64::from(u8::from(*announced)),
        );
    }
    for b in &scrape.backends {
        let labels = || vec![label("service", &b.service), label("backend", &b.backend)];
        out.gauge(
            "xdp_lb_backend_up",
            "1 if the backend passes its health checks (or is unchecked), else 0.",
            labels(),
            f64::from(u8::from(b.up)),
        );
        if let Some(active) = b.active_flows {
            out.gauge("xdp_lb_backend_active_flows", "Open flows on the backend (NAT TCP services).", labels(), active as f64);
        }
        if let Some(seconds) = b.check_latency_seconds {
            out.gauge("xdp_lb_backend_check_latency_seconds", "Latency of the last successful health check.", labels(), seconds);
        }
    }
    for (reason, value) in &scrape.stats.reasons {
        out.counter(
            "xdp_lb_not_forwarded_total",
            "Packets passed to the kernel or dropped, by reason.",
            vec![label("reason", reason)],
            *value,
        );
    }
    for (reason, value) in &scrape.local_errors {
        out.counter(
            "xdp_lb_health_check_local_errors_total",
            "Health probes that failed on this host (file descriptors, ports, memory, local firewall) and so left the backend's health unchanged.",
            vec![label("reason", reason)],
            *value,
        );
    }
    out.recorder.handle().render()
}

/// A label whose value survives the exporter's escaping unchanged.
///
/// `metrics-exporter-prometheus` escapes `"` and newlines but treats a backslash that precedes
/// another character as the start of an escape sequence already present in the value, so
/// `a\"b` or `a\\b` would come out as `a"b` and `a\b` after parsing. Doubling every backslash
/// first makes each one an "existing escape" the exporter keeps, so every value round-trips.
fn label(key: &'static str, value: &str) -> Label {
    Label::new(key, value.replace('\\', "\\\\"))
}

struct Exposition {
    recorder: metrics_exporter_prometheus::PrometheusRecorder,
}

static METADATA: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

impl Exposition {
    fn counter(&self, name: &'static str, help: &'static str, labels: Vec<Label>, value: u64) {
        self.recorder.describe_counter(KeyName::from_const_str(name), None, SharedString::const_str(help));
        self.recorder.register_counter(&Key::from_parts(name, labels), &METADATA).absolute(value);
    }

    fn gauge(&self, name: &'static str, help: &'static str, labels: Vec<Label>, value: f64) {
        self.recorder.describe_gauge(KeyName::from_const_str(name), None, SharedString::const_str(help));
        self.recorder.register_gauge(&Key::from_parts(name, labels), &METADATA).set(value);
    }
}
