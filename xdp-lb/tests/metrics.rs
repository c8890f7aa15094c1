//! The opt-in Prometheus endpoint: after real traffic, a scrape shows per-service and per-backend
//! counters, health state, active flows and the pass/drop reasons.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    time::Duration,
};

use xdp_lb_testbed::{
    config_toml, http_get, Daemon, Family, IdentityServers, Mode, Protocol, Scheduler, ServiceConfig, Topology,
};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");

#[test]
fn metrics_endpoint_reports_counters_health_and_reasons() {
    let topo = Topology::new("metrics", 2).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let backends = (0..2).map(|i| topo.backend_socket(Family::V4, i, 80));
    let config = config_toml(&[ServiceConfig::new("web", topo.vip_socket(Family::V4, 80), Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends)]);
    let daemon = Daemon::start_with_args(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config, &["--metrics", "127.0.0.1:9464"])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, 80);
    for _ in 0..20 {
        topo.client().run(|| http_get(vip)).unwrap_or_else(|e| panic!("request: {e}\n{}", daemon.log()));
    }
    // Health checks need a moment to report the backends up.
    std::thread::sleep(Duration::from_millis(1200));
    let scrape = topo.lb().run(|| -> std::io::Result<String> {
        let mut s = TcpStream::connect("127.0.0.1:9464")?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    });
    let body = scrape.unwrap_or_else(|e| panic!("scrape: {e}\n{}", daemon.log()));
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    let value = |prefix: &str| -> u64 {
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{body}")) as u64
    };
    assert_eq!(value("xdp_lb_service_new_flows_total{service=\"web\"}"), 20);
    assert!(value("xdp_lb_service_packets_total{service=\"web\"}") >= 100);
    let backend0 = format!("service=\"web\",backend=\"{}\"", topo.backend_socket(Family::V4, 0, 80));
    assert_eq!(value(&format!("xdp_lb_backend_up{{{backend0}}}")), 1);
    assert_eq!(value(&format!("xdp_lb_backend_active_flows{{{backend0}}}")), 0, "every connection closed");
    assert!(body.contains(&format!("xdp_lb_backend_check_latency_seconds{{{backend0}}}")), "{body}");
    assert!(body.contains("xdp_lb_not_forwarded_total{reason=\"pass_not_vip\"}"), "{body}");
    assert_eq!(value("xdp_lb_service_all_backends_down{service=\"web\"}"), 0);
    assert_eq!(value("xdp_lb_service_serving_backends{service=\"web\"}"), 2);
    daemon.stop().unwrap();
}
