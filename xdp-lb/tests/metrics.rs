//! The opt-in Prometheus endpoint: after real traffic, a scrape (read by the Prometheus project's
//! own parser) shows per-service and per-backend counters, health state, active flows and the
//! pass/drop reasons; and a flood of idle connections to it cannot take the backends down.

use std::{
    io::{ErrorKind, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;
use xdp_lb_testbed::{
    config_toml, http_get, Daemon, Family, IdentityServers, Mode, Protocol, Scheduler, ServiceConfig, Topology,
};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const METRICS: &str = "127.0.0.1:9464";

/// One HTTP/1.1 exchange with the metrics port from inside the balancer's namespace; returns the
/// raw response.
fn exchange(topo: &Topology, request: &str) -> std::io::Result<String> {
    let request = request.to_string();
    topo.lb().run(move || {
        let mut s = TcpStream::connect(METRICS)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
}

fn scrape(topo: &Topology, daemon: &Daemon) -> String {
    let response = exchange(topo, "GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .unwrap_or_else(|e| panic!("scrape: {e}\n{}", daemon.log()));
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    let (_, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no body: {response}"));
    body.to_string()
}

/// `(family, type, sample name, labels, value)` for every sample, as prometheus_client's
/// `text_string_to_metric_families` reads the text (it fails on malformed input).
fn parse(text: &str) -> Vec<(String, String, String, Value, f64)> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    for s in f.samples:
        out.append([f.name, f.type, s.name, s.labels, s.value])
json.dump(out, sys.stdout)
"#;
    // Debian's interpreter, the one python3-prometheus-client installs into.
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 with python3-prometheus-client");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(out.status.success(), "prometheus_client rejected the scrape: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("parser output")
}

fn value(samples: &[(String, String, String, Value, f64)], sample: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .find(|(_, _, name, l, _)| name == sample && labels.iter().all(|(k, v)| l.get(*k).and_then(Value::as_str) == Some(*v)))
        .map(|s| s.4)
        .unwrap_or_else(|| panic!("no {sample}{labels:?} in {samples:?}"))
}

#[test]
fn metrics_endpoint_reports_counters_health_and_reasons() {
    let topo = Topology::new("metrics", 2).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let backends = (0..2).map(|i| topo.backend_socket(Family::V4, i, 80));
    let config = config_toml(&[ServiceConfig::new("web", topo.vip_socket(Family::V4, 80), Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends)]);
    let daemon = Daemon::start_with_args(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config, &["--metrics", METRICS])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, 80);
    for _ in 0..20 {
        topo.client().run(|| http_get(vip)).unwrap_or_else(|e| panic!("request: {e}\n{}", daemon.log()));
    }
    // Health checks need a moment to report the backends up.
    std::thread::sleep(Duration::from_millis(1200));
    let body = scrape(&topo, &daemon);
    let samples = parse(&body);
    let untyped: Vec<&String> = samples.iter().filter(|s| s.1 == "unknown" || s.1 == "untyped").map(|s| &s.2).collect();
    assert!(untyped.is_empty(), "untyped samples {untyped:?} in\n{body}");
    let web = [("service", "web")];
    assert_eq!(value(&samples, "xdp_lb_service_new_flows_total", &web), 20.0);
    assert!(value(&samples, "xdp_lb_service_packets_total", &web) >= 100.0);
    let backend0 = topo.backend_socket(Family::V4, 0, 80).to_string();
    let b0 = [("service", "web"), ("backend", backend0.as_str())];
    assert_eq!(value(&samples, "xdp_lb_backend_up", &b0), 1.0);
    assert_eq!(value(&samples, "xdp_lb_backend_active_flows", &b0), 0.0, "every connection closed");
    assert!(value(&samples, "xdp_lb_backend_check_latency_seconds", &b0) > 0.0);
    assert!(value(&samples, "xdp_lb_not_forwarded_total", &[("reason", "pass_not_vip")]) > 0.0, "health-check replies pass");
    assert_eq!(value(&samples, "xdp_lb_health_check_local_errors_total", &[("reason", "process_fd_limit")]), 0.0);
    assert_eq!(value(&samples, "xdp_lb_service_all_backends_down", &web), 0.0);
    assert_eq!(value(&samples, "xdp_lb_service_serving_backends", &web), 2.0);

    // The values are the ones `stats` reports (read just after the scrape: counters only grow,
    // and only by the little traffic of the moment — health checks and their replies).
    let stats = daemon.cli(Path::new(XDP_LB), &["--json", "stats", "--interval-ms", "100"]).expect("stats");
    assert!(stats.status.success(), "{}", String::from_utf8_lossy(&stats.stderr));
    let stats: Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
    for reason in xdp_lb_common::reasons::NAMES {
        let scraped = value(&samples, "xdp_lb_not_forwarded_total", &[("reason", reason)]);
        let now = stats["reasons"][reason].as_f64().unwrap_or_else(|| panic!("no {reason} in {stats:#}"));
        assert!(scraped <= now && now - scraped < 500.0, "{reason}: scraped {scraped}, stats {now}");
    }

    // Only GET /metrics is served.
    let missing = exchange(&topo, "GET / HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").expect("404");
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post = exchange(&topo, "POST /metrics HTTP/1.1\r\nHost: lb\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").expect("405");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");
    daemon.stop().unwrap();
}

/// The daemon's file-descriptor limit in the flood tests, soft and hard (the daemon raises its soft
/// limit to the hard one, so both must be low). Low enough that the descriptor reserve (32 for the
/// checks plus 33 for the API here), not the connection cap (64), is what stops the metrics
/// listener: the daemon itself holds ~35.
const FD_LIMIT: u32 = 128;
/// Idle connections the flood holds: well over the limit.
const FLOOD: usize = 300;

/// `xdp-lb` started through `prlimit`, so it runs with [`FD_LIMIT`] descriptors.
fn limited_binary(dir: &Path) -> PathBuf {
    limited_binary_with(dir, FD_LIMIT, FD_LIMIT)
}

/// `xdp-lb` started through `prlimit` with this soft and hard descriptor limit.
fn limited_binary_with(dir: &Path, soft: u32, hard: u32) -> PathBuf {
    let path = dir.join("xdp-lb-limited");
    let script = format!("#!/bin/sh\nexec prlimit --nofile={soft}:{hard} -- {XDP_LB} \"$@\"\n");
    std::fs::write(&path, script).expect("write wrapper");
    let mut perms = std::fs::metadata(&path).expect("wrapper").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).expect("chmod wrapper");
    path
}

/// Every backend's `health` in `status --json`.
fn healths(daemon: &Daemon) -> Vec<String> {
    let out = daemon.cli(Path::new(XDP_LB), &["--json", "status"]).expect("status");
    assert!(out.status.success(), "status failed under the flood: {}\n{}", String::from_utf8_lossy(&out.stderr), daemon.log());
    let status: Value = serde_json::from_slice(&out.stdout).expect("status JSON");
    let mut found = Vec::new();
    fn walk(v: &Value, found: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let (Some(Value::String(h)), Some(_)) = (m.get("health"), m.get("address")) {
                    found.push(h.clone());
                }
                m.values().for_each(|v| walk(v, found));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, found)),
            _ => {}
        }
    }
    walk(&status, &mut found);
    found
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// systemd's default soft limit (1024) is far below its hard one: the daemon raises its own soft
/// limit to the hard one at start, before anything opens descriptors.
#[test]
fn the_daemon_raises_its_soft_descriptor_limit_at_start() {
    const SOFT: u32 = 256;
    const HARD: u32 = 4096;
    let topo = Topology::new("fdraise", 1).expect("testbed");
    let backends = (0..1).map(|i| topo.backend_socket(Family::V4, i, 80));
    let config = config_toml(&[ServiceConfig::new("web", topo.vip_socket(Family::V4, 80), Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = limited_binary_with(dir.path(), SOFT, HARD);
    let daemon = Daemon::start(&binary, topo.lb(), &topo.lb_ifaces(), &config).unwrap_or_else(|e| panic!("{e:?}"));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).expect("limits");
    let nofile: Vec<String> =
        limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default().split_whitespace().skip(3).take(2).map(String::from).collect();
    assert_eq!(nofile, [HARD.to_string(), HARD.to_string()], "soft and hard RLIMIT_NOFILE of the running daemon:\n{limits}");
    let log = daemon.log();
    assert!(log.contains(&format!("soft_before={SOFT}")) && log.contains(&format!("soft={HARD}")), "the raise is not logged:\n{log}");
}

#[test]
fn idle_metrics_connections_cannot_exhaust_the_daemon() {
    let topo = Topology::new("fdflood", 2).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let backends = (0..2).map(|i| topo.backend_socket(Family::V4, i, 80));
    let config = config_toml(&[ServiceConfig::new("web", topo.vip_socket(Family::V4, 80), Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = limited_binary(dir.path());
    let daemon = Daemon::start_with_args(&binary, topo.lb(), &topo.lb_ifaces(), &config, &["--metrics", METRICS])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).expect("limits");
    let nofile = limits.lines().find(|l| l.starts_with("Max open files")).unwrap_or_default().to_string();
    assert!(nofile.split_whitespace().filter(|w| *w == FD_LIMIT.to_string()).count() == 2, "{nofile}");
    let vip = topo.vip_socket(Family::V4, 80);
    let deadline = Instant::now() + Duration::from_secs(10);
    while healths(&daemon).iter().any(|h| h != "up") {
        assert!(Instant::now() < deadline, "backends never came up: {:?}\n{}", healths(&daemon), daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let idle_fds = open_fds(daemon.pid());

    // The flood: idle connections, never a byte sent.
    let mut flood: Vec<TcpStream> = topo.lb().run(|| {
        let addr: SocketAddr = METRICS.parse().expect("addr");
        (0..FLOOD).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()).collect()
    });
    let flood_started = Instant::now();
    assert!(flood.len() > FD_LIMIT as usize, "only {} flood connections got through the backlog", flood.len());

    // Several check intervals (500 ms) under the flood: the VIP serves, the API answers, nothing
    // goes down.
    let mut peak = 0;
    while flood_started.elapsed() < Duration::from_secs(4) {
        topo.client().run(|| http_get(vip)).unwrap_or_else(|e| panic!("VIP request under the flood: {e}\n{}", daemon.log()));
        let h = healths(&daemon);
        assert!(h.iter().all(|h| h == "up"), "{h:?}\n{}", daemon.log());
        peak = peak.max(open_fds(daemon.pid()));
        std::thread::sleep(Duration::from_millis(250));
    }
    // The metrics listener stops at the reserve; probes and API clients use a few more.
    assert!(peak + 16 <= FD_LIMIT as usize, "the daemon ate into its descriptor reserve: {peak} of {FD_LIMIT}");

    // The daemon closes the idle connections it accepted (5 s head timeout).
    let mut closed = 0;
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    }
    let deadline = Instant::now() + Duration::from_secs(8);
    while closed == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        closed = 0;
        for s in &mut flood {
            let mut buf = [0u8; 1];
            closed += usize::from(match s.read(&mut buf) {
                Ok(0) => true,
                Err(e) => e.kind() == ErrorKind::ConnectionReset,
                Ok(_) => false,
            });
        }
    }
    let closed_after = flood_started.elapsed();
    assert!(closed > 0, "no idle connection was closed by the daemon\n{}", daemon.log());
    drop(flood);

    let log = daemon.log();
    assert!(!log.contains("backend is down") && !log.contains("ALL BACKENDS DOWN"), "{log}");
    // Once the flood is gone, scrapes work again and show no local probe error: the reserve kept
    // descriptors for the checks.
    let local = local_errors_after_the_flood(&topo, &daemon);
    eprintln!(
        "fd flood: limit {FD_LIMIT}, daemon idle {idle_fds} fds, peak {peak} under {FLOOD} connections; \
         {closed} closed by the daemon within {closed_after:?}; local probe errors {local}"
    );
    assert_eq!(local, 0.0, "health probes hit a local error");
    daemon.stop().unwrap();
}

/// Issue 9: one host holding 600 idle connections used to take every connection slot, so a scrape
/// from elsewhere waited behind the backlog for ~44 s. Now one address gets at most 8 connections;
/// the rest are closed at once, and another address is served promptly.
#[test]
fn one_host_flooding_the_metrics_port_does_not_delay_other_scrapers() {
    const FLOOD_FROM_ONE_HOST: usize = 600;
    const SERVED_WITHIN: Duration = Duration::from_secs(3);
    let topo = Topology::new("mflood1", 1).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let backends = (0..1).map(|i| topo.backend_socket(Family::V4, i, 80));
    let config = config_toml(&[ServiceConfig::new("web", topo.vip_socket(Family::V4, 80), Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends)]);
    let daemon = Daemon::start_with_args(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config, &["--metrics", METRICS])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let addr: SocketAddr = METRICS.parse().expect("addr");

    // The flood from 127.0.0.1: idle connections, never a byte sent.
    let mut flood: Vec<TcpStream> = topo
        .lb()
        .run(|| (0..FLOOD_FROM_ONE_HOST).filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()).collect());
    assert!(flood.len() > 100, "only {} flood connections got through the backlog", flood.len());

    // A scrape from another address (127.0.0.2) is answered promptly.
    let started = Instant::now();
    let response = topo.lb().run(move || -> std::io::Result<String> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let stream = runtime.block_on(async {
            let socket = tokio::net::TcpSocket::new_v4()?;
            socket.bind("127.0.0.2:0".parse().expect("addr"))?;
            tokio::time::timeout(SERVED_WITHIN, socket.connect(addr)).await.map_err(|_| std::io::Error::from(ErrorKind::TimedOut))?
        })?;
        let mut s = stream.into_std()?;
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(SERVED_WITHIN))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    });
    let took = started.elapsed();
    let response = response.unwrap_or_else(|e| panic!("scrape from 127.0.0.2 under the flood failed after {took:?}: {e}\n{}", daemon.log()));
    assert!(response.starts_with("HTTP/1.1 200"), "{}", &response[..response.len().min(300)]);
    assert!(took < SERVED_WITHIN, "scrape took {took:?}");

    // The flood's connections beyond the per-address cap were closed at once (not after the 5 s
    // head timeout): read them within a second.
    let mut closed = 0;
    for s in &mut flood {
        s.set_read_timeout(Some(Duration::from_millis(2))).expect("timeout");
        let mut buf = [0u8; 1];
        closed += usize::from(match s.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == ErrorKind::ConnectionReset,
            Ok(_) => false,
        });
    }
    assert!(closed + 8 >= flood.len() - 64, "only {closed} of {} closed right away", flood.len());
    eprintln!("metrics per-address cap: {} flood connections, {closed} closed at once; other scraper served in {took:?}", flood.len());
}

/// Hostile 9 H3: at a low descriptor limit, a metrics flood from many addresses plus more idle API
/// clients than the API serves made health probes fail with EMFILE (inconclusive: a backend dying
/// then stays in), because the API's 32 clients and the checks shared one reserve of 32.
#[test]
fn a_metrics_flood_and_a_full_api_leave_descriptors_for_the_health_checks() {
    const SOURCES: u8 = 100;
    const PER_SOURCE: usize = 3;
    const API_CLIENTS: usize = 40;
    let topo = Topology::new("fdapi", 2).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let backends = (0..2).map(|i| topo.backend_socket(Family::V4, i, 80));
    let config = config_toml(&[ServiceConfig::new("web", topo.vip_socket(Family::V4, 80), Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends)]);
    let dir = tempfile::tempdir().expect("tempdir");
    let binary = limited_binary(dir.path());
    let daemon = Daemon::start_with_args(&binary, topo.lb(), &topo.lb_ifaces(), &config, &["--metrics", METRICS])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while healths(&daemon).iter().any(|h| h != "up") {
        assert!(Instant::now() < deadline, "backends never came up: {:?}\n{}", healths(&daemon), daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let idle_fds = open_fds(daemon.pid());

    // Idle metrics connections from 100 loopback addresses (the per-address cap is 8).
    let addr: SocketAddr = METRICS.parse().expect("addr");
    let flood: Vec<TcpStream> = topo.lb().run(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let mut out = Vec::new();
        for source in 10..10 + SOURCES {
            for _ in 0..PER_SOURCE {
                let connected = runtime.block_on(async {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind(SocketAddr::from(([127, 0, 0, source], 0)))?;
                    tokio::time::timeout(Duration::from_millis(300), socket.connect(addr))
                        .await
                        .map_err(|_| std::io::Error::from(ErrorKind::TimedOut))?
                });
                if let Ok(stream) = connected.and_then(|s| s.into_std()) {
                    out.push(stream);
                }
            }
        }
        out
    });
    assert!(flood.len() > 100, "only {} flood connections", flood.len());
    // Let the metrics listener accept up to the reserve, then fill every API slot and more.
    std::thread::sleep(Duration::from_millis(500));
    let after_metrics = open_fds(daemon.pid());
    let api: Vec<std::os::unix::net::UnixStream> =
        (0..API_CLIENTS).filter_map(|_| std::os::unix::net::UnixStream::connect(daemon.socket()).ok()).collect();
    assert!(api.len() >= 32, "only {} API clients connected", api.len());
    // Several check intervals (500 ms) with the API full.
    let held = Instant::now();
    let mut peak = 0;
    while held.elapsed() < Duration::from_secs(3) {
        peak = peak.max(open_fds(daemon.pid()));
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(api);
    drop(flood);

    let local = local_errors_after_the_flood(&topo, &daemon);
    eprintln!(
        "fd flood + full API: limit {FD_LIMIT}, idle {idle_fds} fds, {after_metrics} after the metrics flood, peak {peak} \
         with the API full; local probe errors {local}"
    );
    assert_eq!(local, 0.0, "health probes failed on this host (descriptors):\n{}", daemon.log());
    assert!(!daemon.log().contains("Too many open files"), "{}", daemon.log());
    daemon.stop().unwrap();
}

/// Scrapes until the metrics port answers again (10 s at most) and sums the health checks' local
/// errors: 0 when the descriptor reserve kept descriptors for the checks through the flood.
fn local_errors_after_the_flood(topo: &Topology, daemon: &Daemon) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    let body = loop {
        match exchange(topo, "GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n") {
            Ok(r) if r.starts_with("HTTP/1.1 200") => break r,
            other => assert!(Instant::now() < deadline, "no scrape after the flood: {other:?}\n{}", daemon.log()),
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let samples = parse(body.split_once("\r\n\r\n").map_or("", |(_, b)| b));
    samples.iter().filter(|s| s.2 == "xdp_lb_health_check_local_errors_total").map(|s| s.4).sum()
}
