//! The shipped Grafana dashboard (`dist/grafana/xdp-lb.json`): every query names a metric that
//! the binaries export — xdp-lb's from a real daemon's scrape, l7-sidecar's from the names its
//! source registers.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;
use xdp_lb_testbed::{http_get, Daemon, Family, IdentityServers, Topology};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const METRICS: &str = "127.0.0.1:9464";

fn config_one(topo: &Topology) -> String {
    format!(
        "[[services]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\n[[services.backends]]\naddress = \"{}\"\n",
        topo.vip_socket(Family::V4, 80),
        topo.backend_socket(Family::V4, 0, 80)
    )
}

/// The body of `GET /metrics` from inside the balancer's namespace.
fn scrape(topo: &Topology) -> String {
    let response = topo.lb().run(|| {
        let mut s = TcpStream::connect(METRICS.parse::<SocketAddr>().expect("addr"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {METRICS}\r\nConnection: close\r\n\r\n").as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    });
    let response = response.expect("scrape");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).expect("body")
}

/// PromQL expressions of the shipped Grafana dashboard, with their panel titles.
fn grafana_queries() -> Vec<(String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/grafana/xdp-lb.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let dashboard: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"));
    let mut out = Vec::new();
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let title = m.get("title").and_then(Value::as_str).unwrap_or(title);
                // Panel queries, and the template variables' `label_values(...)` definitions.
                for key in ["expr", "definition"] {
                    if let Some(expr) = m.get(key).and_then(Value::as_str) {
                        out.push((title.to_string(), expr.to_string()));
                    }
                }
                for v in m.values() {
                    walk(v, title, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    walk(&dashboard, "", &mut out);
    assert!(out.len() >= 10, "only {} queries in {path}", out.len());
    out
}

/// The metric names in a PromQL expression: identifiers with one of the binaries' prefixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("xdp_lb_") || word.starts_with("gateway_") {
                names.push(std::mem::take(&mut word));
            }
            word.clear();
        }
    }
    names
}

/// The metric names l7-sidecar registers (its `metrics::counter!/gauge!/histogram!` calls), with
/// the series a histogram exports.
fn l7_sidecar_metrics() -> Vec<String> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../l7-sidecar/src"))];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let Ok(text) = std::fs::read_to_string(&path) else { continue };
            for (kind, suffixes) in [("counter!(", &[""][..]), ("gauge!(", &[""][..]), ("histogram!(", &["_bucket", "_sum", "_count"][..])] {
                for (i, _) in text.match_indices(kind) {
                    let rest = text[i + kind.len()..].trim_start();
                    let Some(rest) = rest.strip_prefix('"') else { continue };
                    let name = &rest[..rest.find('"').expect("closing quote")];
                    out.extend(suffixes.iter().map(|s| format!("{name}{s}")));
                }
            }
        }
    }
    assert!(out.iter().any(|n| n == "gateway_requests_total"), "l7-sidecar's metrics not found: {out:?}");
    out
}

#[test]
fn every_grafana_query_names_a_metric_the_binaries_export() {
    let queries = grafana_queries();
    // xdp-lb's names from a real daemon's scrape, after traffic (so per-backend series exist).
    let topo = Topology::new("grafana", 1).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let daemon = Daemon::start_with_args(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config_one(&topo), &["--metrics", METRICS])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, 80);
    for _ in 0..5 {
        topo.client().run(|| http_get(vip)).unwrap_or_else(|e| panic!("request: {e}\n{}", daemon.log()));
    }
    std::thread::sleep(Duration::from_millis(1200)); // a successful health check, for its latency
    let scrape = scrape(&topo);
    daemon.stop().unwrap();
    let mut exported: Vec<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect();
    exported.extend(l7_sidecar_metrics());
    let mut missing = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for (title, expr) in &queries {
        let names = metric_names(expr);
        if names.is_empty() {
            missing.push(format!("panel {title:?}: {expr} names no xdp_lb_ or gateway_ metric"));
        }
        for name in names {
            if !exported.contains(&name) {
                missing.push(format!("panel {title:?}: {name} is not exported"));
            }
            used.insert(name);
        }
    }
    assert!(missing.is_empty(), "{}\nexported: {exported:?}", missing.join("\n"));
    assert!(used.iter().any(|n| n.starts_with("xdp_lb_")) && used.iter().any(|n| n.starts_with("gateway_")), "{used:?}");
}

#[test]
fn metric_names_are_found_in_promql() {
    assert_eq!(
        metric_names(r#"sum by (backend) (rate(xdp_lb_backend_packets_total{service=~"$service"}[$__rate_interval]))"#),
        ["xdp_lb_backend_packets_total"]
    );
    assert_eq!(
        metric_names("histogram_quantile(0.99, sum by (le) (rate(gateway_request_duration_seconds_bucket[5m]))) / xdp_lb_x"),
        ["gateway_request_duration_seconds_bucket", "xdp_lb_x"]
    );
}
