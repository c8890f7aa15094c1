//! Prometheus text exposition of the data plane's counters and the daemon's health view, served on
//! an opt-in listen address (`xdp-lb run --metrics 127.0.0.1:9100`).

use std::fmt::Write;

use crate::{daemon::Daemon, health::Health, plan, stats};

pub fn render(daemon: &Daemon) -> String {
    let mut out = String::new();
    let Ok(snapshot) = stats::snapshot(&daemon.dataplane, &daemon.tables) else {
        return "# xdp-lb: reading the counters failed\n".into();
    };
    let statuses = crate::daemon::statuses(daemon);
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    header(&mut out, "xdp_lb_service_packets_total", "counter", "Packets forwarded for the service, both directions.");
    for s in &snapshot.services {
        let _ = writeln!(out, "xdp_lb_service_packets_total{{service=\"{}\"}} {}", s.name, s.packets);
    }
    header(&mut out, "xdp_lb_service_all_backends_down", "gauge", "1 while no backend of the service is healthy (its all_down policy applies).");
    header(&mut out, "xdp_lb_service_serving_backends", "gauge", "Backends in the service's ring now.");
    for h in daemon.service_health() {
        let _ = writeln!(out, "xdp_lb_service_all_backends_down{{service=\"{}\"}} {}", h.name, h.all_down as u8);
        let _ = writeln!(out, "xdp_lb_service_serving_backends{{service=\"{}\"}} {}", h.name, h.serving);
    }
    header(&mut out, "xdp_lb_service_bytes_total", "counter", "Bytes forwarded for the service.");
    for s in &snapshot.services {
        let _ = writeln!(out, "xdp_lb_service_bytes_total{{service=\"{}\"}} {}", s.name, s.bytes);
    }
    header(&mut out, "xdp_lb_service_new_flows_total", "counter", "Flows scheduled for the service.");
    for s in &snapshot.services {
        let _ = writeln!(out, "xdp_lb_service_new_flows_total{{service=\"{}\"}} {}", s.name, s.new_flows);
    }
    for (metric, help) in [
        ("packets", "Packets forwarded to or from the backend."),
        ("bytes", "Bytes forwarded to or from the backend."),
        ("new_flows", "Flows scheduled to the backend."),
        ("syns", "TCP SYNs forwarded to the backend."),
        ("syn_acks", "SYN-ACKs returned by the backend (NAT)."),
        ("resets", "RSTs sent by the backend (NAT)."),
    ] {
        let name = format!("xdp_lb_backend_{metric}_total");
        header(&mut out, &name, "counter", help);
        for s in &snapshot.services {
            for b in &s.backends {
                let value = match metric {
                    "packets" => b.packets,
                    "bytes" => b.bytes,
                    "new_flows" => b.new_flows,
                    "syns" => b.syns,
                    "syn_acks" => b.syn_acks,
                    _ => b.resets,
                };
                let _ = writeln!(out, "{name}{{service=\"{}\",backend=\"{}\"}} {value}", s.name, b.address);
            }
        }
    }
    header(&mut out, "xdp_lb_backend_up", "gauge", "1 if the backend passes its health checks (or is unchecked), else 0.");
    header(&mut out, "xdp_lb_backend_active_flows", "gauge", "Open flows on the backend (NAT TCP services).");
    header(&mut out, "xdp_lb_backend_check_latency_seconds", "gauge", "Latency of the last successful health check.");
    for s in &daemon.config().services {
        let installed = daemon.tables.services().find(|i| i.config.name == s.name);
        for b in &s.backends {
            let status = plan::probe_target(s, b).and_then(|(t, _)| statuses.get(&t).cloned());
            let up = status.as_ref().is_none_or(|st| st.health != Health::Down);
            let labels = format!("service=\"{}\",backend=\"{}\"", s.name, b.address);
            let _ = writeln!(out, "xdp_lb_backend_up{{{labels}}} {}", up as u8);
            if let Some(id) = installed.and_then(|i| i.backend_ids.get(&b.address)) {
                if let Ok(active) = daemon.dataplane.active_flows(*id) {
                    let _ = writeln!(out, "xdp_lb_backend_active_flows{{{labels}}} {active}");
                }
            }
            if let Some(us) = status.and_then(|st| st.last_latency_us) {
                let _ = writeln!(out, "xdp_lb_backend_check_latency_seconds{{{labels}}} {}", us as f64 / 1e6);
            }
        }
    }
    header(&mut out, "xdp_lb_not_forwarded_total", "counter", "Packets passed to the kernel or dropped, by reason.");
    for (reason, value) in &snapshot.reasons {
        let _ = writeln!(out, "xdp_lb_not_forwarded_total{{reason=\"{reason}\"}} {value}");
    }
    out
}
