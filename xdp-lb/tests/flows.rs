//! Connection-table semantics end to end, with the real daemon and real TCP: a reused 5-tuple is a
//! new connection (placed by the current scheduler, counted as a new flow), active-flow counts come
//! back to exactly zero after churn and evictions, `explain` does not call a closed flow
//! established, and a service without backends refuses connections at once (RST).

use std::{
    collections::BTreeMap,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    os::fd::FromRawFd,
    path::Path,
    time::{Duration, Instant},
};

use xdp_lb_testbed::{
    config_toml, Daemon, Family, IdentityServers, KeepAliveClient, Mode, Protocol, Scheduler, ServiceConfig, Topology,
};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const BACKENDS: usize = 3;
const TIMEOUT: Duration = Duration::from_secs(2);

fn web(topo: &Topology, family: Family, scheduler: Scheduler, backends: usize) -> ServiceConfig {
    let addrs = (0..backends).map(|i| topo.backend_socket(family, i, HTTP_PORT));
    ServiceConfig::new("web", topo.vip_socket(family, HTTP_PORT), Protocol::Tcp, Mode::Nat, scheduler, addrs)
}

/// One `GET /` with `Connection: close` on a new connection, from `local_port` if given (bound with
/// SO_REUSEADDR), read to the end: the server closes first, so the client port is free again at
/// once (no TIME_WAIT on the client). Returns the body's last line (the identity server's name).
fn get(addr: SocketAddr, local_port: Option<u16>) -> io::Result<String> {
    let mut stream = match local_port {
        None => TcpStream::connect_timeout(&addr, TIMEOUT)?,
        Some(port) => connect_from(addr, port)?,
    };
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default().trim().to_string();
    if !response.starts_with("HTTP/1.1 200") || body.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected response {response:?}")));
    }
    Ok(body)
}

/// A connection to `addr` from local port `port` (IPv4), the port bound with SO_REUSEADDR.
fn connect_from(addr: SocketAddr, port: u16) -> io::Result<TcpStream> {
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 only") };
    // SAFETY: plain socket calls on a descriptor we own; the sockaddr_in outlives the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let set = libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, &one as *const _ as *const libc::c_void, 4);
        if set != 0 {
            return Err(io::Error::last_os_error());
        }
        let sockaddr = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sockaddr(std::net::Ipv4Addr::UNSPECIFIED, port);
        if libc::bind(fd, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        let remote = sockaddr(*v4.ip(), v4.port());
        if libc::connect(fd, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stream)
    }
}

fn tally(bodies: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for body in bodies {
        *counts.entry(body.clone()).or_default() += 1;
    }
    counts
}

fn check<T, E: std::fmt::Debug>(daemon: &Daemon, what: &str, result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e:?}\n--- xdp-lb stderr ---\n{}", daemon.log()))
}

/// Runs the CLI with `--json` and parses its output.
fn cli_json(daemon: &Daemon, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = check(daemon, "running the CLI", daemon.cli(Path::new(XDP_LB), &all));
    assert!(out.status.success(), "xdp-lb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("xdp-lb {args:?} printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// Every `active_flows` number in `status --json`.
fn active_flows(daemon: &Daemon) -> Vec<u64> {
    fn collect(v: &serde_json::Value, out: &mut Vec<u64>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    if k == "active_flows" {
                        if let Some(n) = v.as_u64() {
                            out.push(n);
                        }
                    } else {
                        collect(v, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    collect(&cli_json(daemon, &["status"]), &mut out);
    out
}

/// After a switch from ip-hash to Maglev, a client that reuses its ports gets Maglev's shares: its
/// new connections are not steered by the closed entries of its earlier ones.
#[test]
fn a_scheduler_switch_applies_to_reused_ports() {
    const CONNECTIONS: u16 = 1_500;
    const FIRST_PORT: u16 = 20_000;
    let topo = Topology::new("ctswitch", BACKENDS).expect("building the testbed");
    let _servers = IdentityServers::start_all(&topo, HTTP_PORT, UDP_PORT).expect("starting identity servers");
    let config = |s: Scheduler| config_toml(&[web(&topo, Family::V4, s, BACKENDS)]);
    let mut daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config(Scheduler::IpHash))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, HTTP_PORT);
    let round = || -> Result<Vec<String>, String> {
        (FIRST_PORT..FIRST_PORT + CONNECTIONS).map(|p| get(vip, Some(p)).map_err(|e| format!("port {p}: {e}"))).collect()
    };
    let before = check(&daemon, "connections under ip-hash", topo.client().run(round));
    assert_eq!(tally(&before).len(), 1, "ip-hash: one client, one backend: {:?}", tally(&before));

    let switched = daemon.reconfigure(&config(Scheduler::Maglev));
    check(&daemon, "switching to maglev", switched);
    let after = check(&daemon, "the same ports under maglev", topo.client().run(round));
    let counts = tally(&after);
    eprintln!("after the switch to maglev, {CONNECTIONS} reused-port connections: {counts:?}");
    // Maglev over equal weights: a third each. The 5-tuples are fixed, so the split is too.
    let share = CONNECTIONS as f64 / BACKENDS as f64;
    for i in 0..BACKENDS {
        let n = counts.get(&IdentityServers::body(i)).copied().unwrap_or(0) as f64;
        assert!(
            (n - share).abs() <= CONNECTIONS as f64 * 0.05,
            "backend-{i} got {n} of {CONNECTIONS} reused-port connections after the switch (expected {share:.0} ± 5 %): {counts:?}"
        );
    }
    let stats = daemon.stop_stats().unwrap_or_else(|e| panic!("{e:?}"));
    let web = stats.service("web").unwrap_or_else(|| panic!("no service web: {stats:#?}"));
    let total = 2 * CONNECTIONS as u64;
    assert!(
        web.new_flows.abs_diff(total) * 100 <= total,
        "{total} connections (one SYN each) but {} new flows: {web:#?}",
        web.new_flows
    );
}

/// Churn through a connection table far smaller than the connections: keep-alive connections lose
/// their entries to eviction while open, ports are reused, and still every active-flow count comes
/// back to exactly 0 once everything is closed, and every connection is one new flow.
#[test]
fn active_flows_return_to_zero_after_churn_and_evictions() {
    const SHORT: usize = 10_000;
    const LONG: usize = 40;
    let topo = Topology::new("ctchurn", BACKENDS).expect("building the testbed");
    let _servers = IdentityServers::start_all(&topo, HTTP_PORT, UDP_PORT).expect("starting identity servers");
    // 2,000 client ports for 10,000 connections through a 1,024-entry table: ports are reused five
    // times each and the table evicts all along, the idle keep-alive connections' entries included.
    topo.client().sysctl("net.ipv4.ip_local_port_range", "40000 41999").expect("narrowing the client's ports");
    // Maglev: a live flow whose entry was evicted is placed again on the same backend. (Least-conn
    // and round-robin cannot do that: such a flow may land elsewhere and be reset.)
    let service = config_toml(&[web(&topo, Family::V4, Scheduler::Maglev, BACKENDS)]);
    let config = format!("[dataplane]\nconntrack_entries = 1024\n\n{service}");
    let daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config).unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, HTTP_PORT);

    let started = Instant::now();
    let mut long: Vec<KeepAliveClient> = check(
        &daemon,
        "opening keep-alive connections",
        topo.client().run(|| (0..LONG).map(|_| KeepAliveClient::connect(vip)).collect::<io::Result<Vec<_>>>()),
    );
    for (i, c) in long.iter_mut().enumerate() {
        check(&daemon, &format!("keep-alive {i} first round trip"), c.get());
    }
    let short = topo.client().run(|| {
        let mut done = 0;
        for i in 0..SHORT {
            assert!(started.elapsed() < Duration::from_secs(240), "10,000 connections took over 240 s ({i} done)");
            get(vip, None).map_err(|e| format!("connection {i}: {e}"))?;
            done += 1;
        }
        Ok::<usize, String>(done)
    });
    let short = check(&daemon, "short connections", short);
    // The keep-alive connections' entries were evicted long ago: they carry on regardless.
    for (i, c) in long.iter_mut().enumerate() {
        check(&daemon, &format!("keep-alive {i} after the churn"), c.get());
    }
    drop(long);

    let deadline = Instant::now() + Duration::from_secs(15);
    let mut counts = active_flows(&daemon);
    while counts.iter().any(|&n| n != 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
        counts = active_flows(&daemon);
    }
    assert_eq!(counts.len(), BACKENDS, "status shows active flows per backend: {counts:?}");
    assert!(counts.iter().all(|&n| n == 0), "active flows after everything closed: {counts:?}\n{}", daemon.log());

    let stats = daemon.stop_stats().unwrap_or_else(|e| panic!("{e:?}"));
    let web = stats.service("web").unwrap_or_else(|| panic!("no service web: {stats:#?}"));
    let syns = (short + LONG) as u64;
    eprintln!("{short} short connections in {:?}; new flows {} for {syns} SYNs; {:?}", started.elapsed(), web.new_flows, stats.reasons);
    assert!(
        web.new_flows.abs_diff(syns) * 100 <= syns,
        "{syns} connections (one SYN each) but {} new flows: {web:#?}",
        web.new_flows
    );
}

/// `explain` of a flow that has ended does not call it established.
#[test]
fn explain_does_not_call_a_closed_flow_established() {
    let topo = Topology::new("ctexplain", BACKENDS).expect("building the testbed");
    let _servers = IdentityServers::start_all(&topo, HTTP_PORT, UDP_PORT).expect("starting identity servers");
    let daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config_toml(&[web(&topo, Family::V4, Scheduler::Maglev, BACKENDS)]))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, HTTP_PORT);
    let mut conn = check(&daemon, "connecting", topo.client().run(|| KeepAliveClient::connect(vip)));
    check(&daemon, "a round trip", conn.get());
    let client = conn.local_addr().expect("local address").to_string();
    let explain = || cli_json(&daemon, &["explain", &client, &vip.to_string()]);
    let open = explain();
    assert_eq!(open["reason"], "connection-table", "an open connection: {open}");
    assert!(open["explanation"].as_str().unwrap_or_default().contains("established"), "{open}");
    drop(conn);
    std::thread::sleep(Duration::from_millis(300));
    let closed = explain();
    let text = closed["explanation"].as_str().unwrap_or_default();
    assert!(text.starts_with("not established"), "a closed connection: {closed}");
    assert_ne!(closed["reason"], "connection-table", "{closed}");
    assert!(closed["ended_flow"]["backend"].is_string(), "{closed}");
}

/// With every backend gone, a TCP connect to the VIP fails at once with "connection refused" (a RST
/// from the data plane) in both families, instead of hanging until the connect timeout.
#[test]
fn connections_to_a_service_without_backends_are_refused_at_once() {
    let topo = Topology::new("ctrefuse", 1).expect("building the testbed");
    let mut services = vec![web(&topo, Family::V4, Scheduler::Maglev, 0)];
    let mut v6 = web(&topo, Family::V6, Scheduler::Maglev, 0);
    v6.name = "web6".into();
    services.push(v6);
    let daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config_toml(&services))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let mut problems = Vec::new();
    for family in [Family::V4, Family::V6] {
        let vip = topo.vip_socket(family, HTTP_PORT);
        for attempt in 0..5 {
            let started = Instant::now();
            let result = topo.client().run(|| TcpStream::connect_timeout(&vip, Duration::from_secs(3)));
            let took = started.elapsed();
            match result {
                Ok(_) => problems.push(format!("{family:?} attempt {attempt}: connected to a VIP without backends")),
                Err(e) if e.kind() != io::ErrorKind::ConnectionRefused => problems.push(format!("{family:?} attempt {attempt}: {e} after {took:?}")),
                Err(_) if took >= Duration::from_secs(1) => problems.push(format!("{family:?} attempt {attempt}: refused only after {took:?}")),
                Err(_) => eprintln!("{family:?} attempt {attempt}: refused after {took:?}"),
            }
        }
    }
    let log = daemon.log();
    let stats = daemon.stop_stats().unwrap_or_else(|e| panic!("{e:?}"));
    assert!(problems.is_empty(), "{}
reasons: {:?}
{log}", problems.join("\n"), stats.reasons);
    assert_eq!(stats.reason("reject_no_backend"), 10, "reasons: {:?}", stats.reasons);
}


/// A restarted daemon (adopting the pinned maps and connections) reports the open connections
/// exactly, and exactly 0 once they are closed.
#[test]
fn active_flows_are_exact_across_a_daemon_restart() {
    const OPEN: usize = 30;
    let topo = Topology::new("ctrestart", BACKENDS).expect("building the testbed");
    let _servers = IdentityServers::start_all(&topo, HTTP_PORT, UDP_PORT).expect("starting identity servers");
    let mut daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config_toml(&[web(&topo, Family::V4, Scheduler::Maglev, BACKENDS)]))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, HTTP_PORT);
    let mut conns: Vec<KeepAliveClient> = check(
        &daemon,
        "opening keep-alive connections",
        topo.client().run(|| (0..OPEN).map(|_| KeepAliveClient::connect(vip)).collect::<io::Result<Vec<_>>>()),
    );
    for c in conns.iter_mut() {
        check(&daemon, "a round trip", c.get());
    }
    let restarted = daemon.restart();
    check(&daemon, "restarting the daemon", restarted);
    let wait_for = |want: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut total: u64 = active_flows(&daemon).iter().sum();
        while total != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            total = active_flows(&daemon).iter().sum();
        }
        assert_eq!(total, want, "{what}: active flows {:?}\n{}", active_flows(&daemon), daemon.log());
    };
    wait_for(OPEN as u64, "after the restart, with every connection open");
    for c in conns.iter_mut() {
        check(&daemon, "a round trip after the restart", c.get());
    }
    drop(conns);
    wait_for(0, "after every connection closed");
}

/// H4: live idle connections survive short connections in a small table sized by README's rule
/// (per CPU: open connections + the connections closed in the last minute). Round-robin (which
/// cannot re-find an evicted flow's backend) with `conntrack_entries = 1024`; three idle keep-alive
/// connections, then a burst of short connections from the same CPU filling three quarters of that
/// CPU's share: closed flows keep their entries (60 s) and the idle ones keep theirs.
#[test]
fn idle_connections_survive_a_burst_of_short_connections_the_table_is_sized_for() {
    const IDLE: usize = 3;
    let topo = Topology::new("ctlinger", BACKENDS).expect("building the testbed");
    let _servers = IdentityServers::start_all(&topo, HTTP_PORT, UDP_PORT).expect("starting identity servers");
    let maglev = config_toml(&[web(&topo, Family::V4, Scheduler::Maglev, BACKENDS)]);
    // (The testbed's config writer knows Maglev and ip-hash only.)
    let service = maglev.replace("scheduler = \"maglev\"", "scheduler = \"round-robin\"");
    assert_ne!(service, maglev, "round-robin set");
    let config = format!("[dataplane]\nconntrack_entries = 1024\n\n{service}");
    let daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config).unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, HTTP_PORT);
    // Not a multiple of the backends: a round-robin placing an evicted idle flow again must not
    // land on its old backend by the sequence's arithmetic.
    let mut burst = 1024 / xdp_lb_testbed::cpus::possible() * 3 / 4;
    while burst.is_multiple_of(BACKENDS) {
        burst += 1;
    }
    let started = Instant::now();
    let outcome = topo.client().run(move || {
        xdp_lb_testbed::cpus::pin_current_thread(0);
        let mut idle = (0..IDLE).map(|_| KeepAliveClient::connect(vip)).collect::<io::Result<Vec<_>>>().map_err(|e| e.to_string())?;
        let first: Vec<String> = idle.iter_mut().map(|c| c.get()).collect::<io::Result<_>>().map_err(|e| e.to_string())?;
        for i in 0..burst {
            assert!(started.elapsed() < Duration::from_secs(120), "the burst took over 120 s");
            get(vip, None).map_err(|e| format!("burst, connection {i}: {e}"))?;
        }
        let mut after = Vec::new();
        for (i, c) in idle.iter_mut().enumerate() {
            after.push(c.get().map_err(|e| format!("idle connection {i} after the bursts: {e}"))?);
        }
        Ok::<_, String>((first, after))
    });
    let (first, after) = check(&daemon, "idle connections through a burst", outcome);
    assert_eq!(after, first, "an idle connection moved to another backend");
    eprintln!("{IDLE} idle connections survived {burst} short connections in {:?}", started.elapsed());
}

/// J1: a client that sends its request and half-closes (`shutdown(SHUT_WR)`, like `nc -N`) sends
/// nothing more while the server works; its flow is "closed" (a FIN was seen) yet alive. An answer
/// that takes 10 s must still be translated back to it (with a 5 s linger the walk removed the
/// entries and the answer left the lb untranslated, `pass_not_vip`: the client timed out).
#[test]
fn a_half_closed_client_gets_a_slow_answer() {
    const PORT: u16 = 7070;
    const ANSWER_AFTER: Duration = Duration::from_secs(10);
    let topo = Topology::new("halfclose", BACKENDS).expect("building the testbed");
    let servers: Vec<_> = (0..BACKENDS)
        .map(|i| {
            let addr = topo.backend_socket(Family::V4, i, PORT);
            topo.backend(i).spawn_thread(move || slow_answers(addr, ANSWER_AFTER)).expect("starting a slow server")
        })
        .collect();
    let addrs = (0..BACKENDS).map(|i| topo.backend_socket(Family::V4, i, PORT));
    let service = ServiceConfig::new("slow", topo.vip_socket(Family::V4, PORT), Protocol::Tcp, Mode::Nat, Scheduler::Maglev, addrs);
    let daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config_toml(&[service])).unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, PORT);
    let outcome = topo.client().run(move || {
        let started = Instant::now();
        let mut stream = TcpStream::connect_timeout(&vip, TIMEOUT).map_err(|e| format!("connect: {e}"))?;
        stream.write_all(b"question\n").map_err(|e| format!("write: {e}"))?;
        stream.shutdown(std::net::Shutdown::Write).map_err(|e| format!("shutdown: {e}"))?;
        stream.set_read_timeout(Some(ANSWER_AFTER + Duration::from_secs(10))).map_err(|e| e.to_string())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).map_err(|e| format!("no answer after {:?}: {e}", started.elapsed()))?;
        Ok::<_, String>((answer, started.elapsed()))
    });
    let (answer, took) = check(&daemon, "a half-closed client waiting for a slow answer", outcome);
    assert_eq!(answer, "late answer\n");
    assert!(took >= ANSWER_AFTER, "the answer came after {took:?}, before the server's delay");
    drop(daemon);
    // The servers that got no question end by themselves (60 s).
    drop(servers);
}

/// Answers every connection that sends something, once it has read to the end, after `delay`;
/// connections that send nothing (health checks) are closed. Ends by itself after 60 s.
fn slow_answers(addr: SocketAddr, delay: Duration) {
    let listener = std::net::TcpListener::bind(addr).expect("binding the slow server");
    listener.set_nonblocking(true).expect("nonblocking listener");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answered = false;
    while !answered && Instant::now() < deadline {
        match listener.accept() {
            Ok((mut stream, _)) => {
                stream.set_nonblocking(false).expect("blocking stream");
                stream.set_read_timeout(Some(Duration::from_secs(5))).expect("read timeout");
                let mut question = Vec::new();
                if stream.read_to_end(&mut question).is_ok() && !question.is_empty() {
                    std::thread::sleep(delay);
                    let _ = stream.write_all(b"late answer\n");
                    answered = true;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("accepting: {e}"),
        }
    }
}
