//! End to end: the real daemon attached in a namespace testbed (client ── lb ── backends), real TCP and
//! UDP traffic from the client to the VIPs, answers from identity servers that name the backend.
//! Needs root (CI runs as root). Set XDP_LB_TESTBED_ECHO=1 to see the daemon's log live.

use std::{collections::BTreeMap, fmt::Debug, net::SocketAddr, path::Path, time::Duration};

use xdp_lb_testbed::{
    config_toml, http_get, ping, udp_request, Daemon, Family, HttpServer, IdentityServers, KeepAliveClient, Mode,
    Protocol, Scheduler, ServiceConfig, Topology,
};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
/// A server on the lb's own address: traffic to it must reach the lb's kernel untouched.
const LB_LOCAL_PORT: u16 = 8080;
/// Backends 0..3 serve from the start; backend 3 joins and leaves during the keep-alive test.
const SERVING: usize = 3;
const EXTRA: usize = 3;
const NEW_CONNECTIONS: usize = 600;
const ROUND_TRIPS: usize = 1_000;
const ADD_AT: usize = 300;
const REMOVE_AT: usize = 700;
/// New connections opened while the extra backend is in the service, to prove the reload took effect.
const PROBES: usize = 60;

#[test]
fn nat_ipv4() {
    balances(Mode::Nat, Family::V4);
}

#[test]
fn nat_ipv6() {
    balances(Mode::Nat, Family::V6);
}

#[test]
fn dsr_ipv4() {
    balances(Mode::Dsr, Family::V4);
}

#[test]
fn dsr_ipv6() {
    balances(Mode::Dsr, Family::V6);
}

/// Everything a balanced service promises, for one forwarding mode and address family.
fn balances(mode: Mode, family: Family) {
    let tag = format!("{}{}", mode.as_str(), if family == Family::V4 { 4 } else { 6 });
    let topo = Topology::new(&tag, SERVING + 1).expect("building the testbed");
    let servers = IdentityServers::start_all(&topo, HTTP_PORT, UDP_PORT).expect("starting identity servers");
    let lb_local = SocketAddr::new(topo.lb_addr(family), LB_LOCAL_PORT);
    let lb_server = HttpServer::start(topo.lb(), lb_local, "lb").expect("starting the lb's own server");

    let config = |backends: usize| config_toml(&services(&topo, mode, family, Scheduler::Maglev, backends));
    let mut daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config(SERVING))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(family, HTTP_PORT);
    let client = topo.client();

    // Traffic that is not for a VIP goes to the lb's kernel as if there were no XDP program.
    let lb_addr = topo.lb_addr(family);
    check(&daemon, "ping the lb's own address", client.run(|| ping(lb_addr, Duration::from_secs(2))));
    let body = check(&daemon, "TCP to the lb's own server", client.run(|| http_get(lb_local)));
    assert_eq!(body, "lb");

    // UDP: every datagram (each from a fresh source port) is answered by a serving backend.
    let dns = topo.vip_socket(family, UDP_PORT);
    let answers = check(&daemon, "UDP to the VIP", client.run(|| numbered(30, |_| udp_request(dns))));
    assert_only_serving(&answers, &daemon, "UDP answers");

    // Spread: new connections land on every backend, each within ±25 % of an equal share.
    let bodies =
        check(&daemon, "new connections to the VIP", client.run(|| numbered(NEW_CONNECTIONS, |_| http_get(vip))));
    let counts = tally(&bodies);
    assert_only_serving(&bodies, &daemon, "new connections");
    let share = NEW_CONNECTIONS / SERVING;
    for i in 0..SERVING {
        let n = counts.get(&IdentityServers::body(i)).copied().unwrap_or(0);
        assert!(
            n * 4 >= share * 3 && n * 4 <= share * 5,
            "{mode:?}/{family:?}: backend-{i} got {n} of {NEW_CONNECTIONS} connections (equal share {share} ± 25 %): {counts:?}"
        );
    }

    // A long-lived connection stays on its backend while the service gains and loses a backend.
    let mut conn = check(&daemon, "keep-alive connect", client.run(|| KeepAliveClient::connect(vip)));
    let mut pinned = None;
    let mut extra_hits = 0;
    for i in 0..ROUND_TRIPS {
        if i == ADD_AT {
            let reloaded = daemon.reconfigure(&config(SERVING + 1));
            check(&daemon, "adding backend-3", reloaded);
            let probes = check(&daemon, "probes with backend-3", client.run(|| numbered(PROBES, |_| http_get(vip))));
            extra_hits = probes.iter().filter(|b| **b == IdentityServers::body(EXTRA)).count();
            assert!(
                extra_hits > 0,
                "backend-3 was added but got none of {PROBES} new connections: {:?}\n{}",
                tally(&probes),
                daemon.log()
            );
        }
        if i == REMOVE_AT {
            let reloaded = daemon.reconfigure(&config(SERVING));
            check(&daemon, "removing backend-3", reloaded);
            let probes = check(&daemon, "probes without backend-3", client.run(|| numbered(PROBES, |_| http_get(vip))));
            assert_only_serving(&probes, &daemon, "new connections after removing backend-3");
        }
        let body = check(&daemon, &format!("keep-alive round trip {i}"), conn.get());
        let first = pinned.get_or_insert_with(|| body.clone());
        assert_eq!(
            &body,
            first,
            "{mode:?}/{family:?}: round trip {i} of one connection changed backend\n{}",
            daemon.log()
        );
    }
    drop(conn);

    // The backends saw the real client (no source NAT), addressed to their own address (NAT) or to the
    // VIP (DSR), and served exactly what the client received.
    let client_addr = topo.client_addr(family);
    for s in &servers {
        let peers = s.http.peers();
        assert!(
            peers.iter().all(|p| *p == client_addr),
            "backend-{} saw clients {peers:?}, expected only {client_addr}",
            s.index
        );
        let expected = match mode {
            Mode::Nat => topo.backend_addr(family, s.index),
            Mode::Dsr => topo.vip(family),
        };
        let locals = s.http.locals();
        assert!(
            locals.iter().all(|l| *l == expected),
            "{mode:?}: backend-{} was addressed as {locals:?}, expected {expected}",
            s.index
        );
    }
    let sent = (NEW_CONNECTIONS + ROUND_TRIPS + 2 * PROBES) as u64;
    let served: u64 = servers.iter().map(|s| s.http.served()).sum();
    assert_eq!(served, sent, "HTTP requests served by backends vs answered through the VIP");
    assert_eq!(
        servers[EXTRA].http.served(),
        extra_hits as u64,
        "backend-3 served more than the probes while it was in"
    );
    assert_eq!(lb_server.served(), 1, "the lb's own server");

    let log = daemon.log();
    let stats = daemon.stop_stats().unwrap_or_else(|e| panic!("{e:?}"));
    // Shown by the test harness only if an assertion below fails.
    eprintln!("{mode:?}/{family:?} counters:\n{}", stats.render());
    let web = stats.service("web").unwrap_or_else(|| panic!("no service `web` in {stats:#?}"));
    assert!(
        web.new_flows >= NEW_CONNECTIONS as u64 && web.packets > 0 && web.bytes > 0,
        "web counters: {web:#?}\n{log}"
    );
    let dns_stats = stats.service("dns").unwrap_or_else(|| panic!("no service `dns` in {stats:#?}"));
    assert!(dns_stats.packets > 0 && dns_stats.new_flows > 0, "dns counters: {dns_stats:#?}");
    let per_backend: u64 = web.backends.iter().map(|b| b.new_flows).sum();
    assert!(per_backend >= NEW_CONNECTIONS as u64, "web backends' new flows add up to {per_backend}: {web:#?}");
    // The lb's own TCP server and the ping were handed to the kernel, and counted as such.
    assert!(stats.reason("pass_not_vip") > 0, "reasons: {:?}", stats.reasons);
    assert!(stats.reason("pass_not_tcp_udp") > 0, "reasons: {:?}", stats.reasons);
}

/// With `ip-hash` every connection from one client address goes to the same backend, in both families.
#[test]
fn ip_hash_keeps_a_client_on_one_backend() {
    let topo = Topology::new("iphash", SERVING).expect("building the testbed");
    let _servers = IdentityServers::start_all(&topo, HTTP_PORT, UDP_PORT).expect("starting identity servers");
    let mut services = services(&topo, Mode::Nat, Family::V4, Scheduler::IpHash, SERVING);
    services.extend(services_named(&topo, Mode::Nat, Family::V6, Scheduler::IpHash, SERVING, "6"));
    let daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config_toml(&services))
        .unwrap_or_else(|e| panic!("{e:?}"));
    for family in [Family::V4, Family::V6] {
        let vip = topo.vip_socket(family, HTTP_PORT);
        let bodies =
            check(&daemon, "connections to an ip-hash VIP", topo.client().run(|| numbered(100, |_| http_get(vip))));
        let counts = tally(&bodies);
        assert_eq!(counts.len(), 1, "{family:?}: one client spread over several backends: {counts:?}");
        assert_only_serving(&bodies, &daemon, "ip-hash");
        let dns = topo.vip_socket(family, UDP_PORT);
        let answers = check(&daemon, "UDP to an ip-hash VIP", topo.client().run(|| numbered(20, |_| udp_request(dns))));
        assert_eq!(tally(&answers).len(), 1, "{family:?}: UDP from one client spread: {:?}", tally(&answers));
    }
    let stats = daemon.stop_stats().unwrap_or_else(|e| panic!("{e:?}"));
    for name in ["web", "web6"] {
        let s = stats.service(name).unwrap_or_else(|| panic!("no service `{name}` in {stats:#?}"));
        assert!(s.new_flows >= 100, "{name}: {s:#?}");
        let used = s.backends.iter().filter(|b| b.new_flows > 0).count();
        assert_eq!(used, 1, "{name}: new flows over several backends: {s:#?}");
    }
}

/// A config the daemon rejects on SIGHUP leaves the running services in place.
#[test]
fn rejected_reload_keeps_the_running_config() {
    let topo = Topology::new("reject", SERVING).expect("building the testbed");
    let _servers = IdentityServers::start_all(&topo, HTTP_PORT, UDP_PORT).expect("starting identity servers");
    let services = services(&topo, Mode::Nat, Family::V4, Scheduler::Maglev, SERVING);
    let mut daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config_toml(&services))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, HTTP_PORT);
    let before = check(&daemon, "before the reload", topo.client().run(|| numbered(30, |_| http_get(vip))));
    assert_only_serving(&before, &daemon, "before the reload");

    // Direct server return cannot change the port, so this backend is invalid for a DSR service.
    let mut invalid = services.clone();
    invalid[0].mode = Mode::Dsr;
    invalid[0].backends[0].address.set_port(HTTP_PORT + 1);
    let result = daemon.reconfigure(&config_toml(&invalid));
    let error = format!("{:?}", result.expect_err("the daemon accepted a DSR backend on another port"));
    assert!(error.contains("rejected"), "{error}");

    let after = check(&daemon, "after the rejected reload", topo.client().run(|| numbered(60, |_| http_get(vip))));
    assert_only_serving(&after, &daemon, "after the rejected reload");
    assert_eq!(tally(&after).len(), SERVING, "still balanced over every backend: {:?}", tally(&after));
    let stats = daemon.stop_stats().unwrap_or_else(|e| panic!("{e:?}"));
    let web = stats.service("web").unwrap_or_else(|| panic!("no service `web` in {stats:#?}"));
    assert!(web.new_flows >= 90, "{web:#?}");
}

/// A TCP service `web` on port 80 and a UDP service `dns` on port 53 of the family's VIP, with the
/// first `backends` backends.
fn services(topo: &Topology, mode: Mode, family: Family, scheduler: Scheduler, backends: usize) -> Vec<ServiceConfig> {
    services_named(topo, mode, family, scheduler, backends, "")
}

fn services_named(
    topo: &Topology,
    mode: Mode,
    family: Family,
    scheduler: Scheduler,
    backends: usize,
    suffix: &str,
) -> Vec<ServiceConfig> {
    [("web", Protocol::Tcp, HTTP_PORT), ("dns", Protocol::Udp, UDP_PORT)]
        .into_iter()
        .map(|(name, protocol, port)| {
            // DSR cannot rewrite ports, so backends listen on the VIP's port; NAT uses the same for simplicity.
            let addrs = (0..backends).map(|i| topo.backend_socket(family, i, port));
            ServiceConfig::new(
                &format!("{name}{suffix}"),
                topo.vip_socket(family, port),
                protocol,
                mode,
                scheduler,
                addrs,
            )
        })
        .collect()
}

/// Runs `f` `n` times, stopping at the first error, which names the attempt.
fn numbered<T>(n: usize, mut f: impl FnMut(usize) -> std::io::Result<T>) -> Result<Vec<T>, String> {
    (0..n).map(|i| f(i).map_err(|e| format!("attempt {} of {n}: {e}", i + 1))).collect()
}

fn tally(bodies: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for body in bodies {
        *counts.entry(body.clone()).or_default() += 1;
    }
    counts
}

fn assert_only_serving(bodies: &[String], daemon: &Daemon, what: &str) {
    let serving: Vec<String> = (0..SERVING).map(IdentityServers::body).collect();
    let counts = tally(bodies);
    assert!(
        counts.keys().all(|b| serving.contains(b)),
        "{what}: answers from outside {serving:?}: {counts:?}\n{}",
        daemon.log()
    );
}

/// Unwraps, or panics with what was being done and the daemon's log so far.
fn check<T, E: Debug>(daemon: &Daemon, what: &str, result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e:?}\n--- xdp-lb stderr ---\n{}", daemon.log()))
}
