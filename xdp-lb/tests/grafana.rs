//! The shipped Grafana dashboards (`dist/grafana/*.json`): every query that names an xdp-lb
//! metric names one a real daemon's scrape has. (l7-sidecar's `gateway_` names are checked
//! against a real l7-sidecar's scrape in `l7-sidecar/tests/grafana.rs`.)

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use xdp_lb_testbed::{
    grafana::{exported_names, metric_names, queries},
    http_get, Daemon, Family, IdentityServers, Topology,
};

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

#[test]
fn every_grafana_query_names_a_metric_the_binaries_export() {
    let queries = queries(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana")).expect("the shipped dashboards");
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
    let exported = exported_names(&scrape);
    let mut missing = Vec::new();
    let mut used = std::collections::BTreeSet::new();
    for q in &queries {
        let names = metric_names(&q.expr);
        if names.is_empty() {
            missing.push(format!("{} panel {:?}: {} names no xdp_lb_ or gateway_ metric", q.file, q.title, q.expr));
        }
        for name in names.into_iter().filter(|n| n.starts_with("xdp_lb_")) {
            if !exported.contains(&name) {
                missing.push(format!("{} panel {:?}: {name} is not exported", q.file, q.title));
            }
            used.insert(name);
        }
    }
    assert!(missing.is_empty(), "{}\nexported: {exported:?}", missing.join("\n"));
    assert!(used.len() >= 5, "the dashboards use only {used:?} of xdp-lb's metrics");
}
