//! Issue 11 §4: several xdp-lb nodes behind a router that spreads the VIPs over them by ECMP, each
//! node announcing them over BGP from BIRD (`xdp_lb_testbed::MultiNode`: router, three nodes, four
//! shared DSR backends, one client; an IPv4 and an IPv6 service). Long-lived keep-alive connections
//! and a stream of new ones run throughout, in both families, and every scenario counts its broken
//! connections:
//!
//! - (a) the router holds one next hop per announcing node, and traffic reaches every node;
//! - (b) a drained node is withdrawn within 100 ms and its flows carry on through the others;
//! - (c) a node whose BIRD hangs (SIGSTOP) is withdrawn by BFD within 500 ms;
//! - (d) restarting a node's xdp-lb breaks nothing;
//! - (e) one backend removed and re-added on every node in different orders: the nodes agree on
//!   1,000 flows afterwards, and only connections that backend held break;
//! - (f) all backends down: every node withdraws both VIPs.
//!
//! One topology for all of it (building it and starting three daemons is most of the cost). Needs
//! root and Debian's `bird2` (`cargo xtask setup`).

#[path = "control/support.rs"]
#[allow(dead_code)]
mod support;

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use xdp_lb_testbed::{
    load::{Failure, Kind},
    multinode::{node_of_device, ANNOUNCE_TABLE},
    route_watch::Hop,
    Daemon, Family, HttpServer, IdentityServers, Load, LoadConfig, MultiNode, PhaseTally, RouteWatch,
};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const NODES: usize = 3;
const BACKENDS: usize = 4;
const PORT: u16 = 80;
/// The backend that (e) removes and re-adds.
const MOVED: usize = 2;
const FLOWS: usize = 1_000;
/// Issue 11's bounds.
const DRAIN_WITHDRAWAL: Duration = Duration::from_millis(100);
const BFD_WITHDRAWAL: Duration = Duration::from_millis(500);
/// Everything the clients do stops after this, whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(100);
const CONVERGE: Duration = Duration::from_secs(10);

/// DSR services (replies go from the backends to the client through the router, not back through
/// the node), one per family on the same backends, with fast health checks so (f) sees every
/// backend down within half a second. Every node lists the backends in another order: the rings
/// must not care.
fn config(topo: &MultiNode, node: usize) -> String {
    let mut out = format!("[announce]\ntable = {ANNOUNCE_TABLE}\ndrained = false\n\n");
    for (name, family) in [("web", Family::V4), ("web6", Family::V6)] {
        out.push_str(&format!(
            "[[services]]\nname = \"{name}\"\nvip = \"{}\"\nprotocol = \"tcp\"\nmode = \"dsr\"\nscheduler = \"maglev\"\npassive_checks = false\n",
            topo.vip_socket(family, PORT)
        ));
        out.push_str("health_check = { kind = \"tcp\", interval_ms = 100, timeout_ms = 100, fall = 2, rise = 2 }\n");
        for k in 0..BACKENDS {
            let j = (k + node) % BACKENDS;
            out.push_str(&format!("[[services.backends]]\naddress = \"{}\"\n", topo.backend_socket(family, j, PORT)));
        }
        out.push('\n');
    }
    out
}

struct Cluster {
    // Drop order: the daemons, then the backends' servers, the topology (BIRD, namespaces) last.
    daemons: Vec<Daemon>,
    servers: Vec<Option<HttpServer>>,
    topo: MultiNode,
}

impl Cluster {
    fn start() -> Cluster {
        let topo = MultiNode::new("mn", NODES, BACKENDS).unwrap_or_else(|e| panic!("building the multi-node testbed: {e:?}"));
        let servers = (0..BACKENDS).map(|j| Some(start_server(&topo, j))).collect();
        let daemons = (0..NODES)
            .map(|i| {
                Daemon::start(Path::new(XDP_LB), topo.node(i), &topo.node_ifaces(), &config(&topo, i))
                    .unwrap_or_else(|e| panic!("starting xdp-lb on node {i}: {e:?}"))
            })
            .collect();
        Cluster { daemons, servers, topo }
    }

    fn vip(&self, family: Family) -> SocketAddr {
        self.topo.vip_socket(family, PORT)
    }

    /// Waits until the router sends both VIPs to exactly `expected`; returns the longer wait.
    fn router_nodes(&self, expected: &[usize], what: &str) -> Duration {
        [Family::V4, Family::V6]
            .map(|f| self.topo.wait_router_nodes(f, expected, CONVERGE).unwrap_or_else(|e| panic!("{what}: {e:?}\n{}", self.logs())))
            .into_iter()
            .max()
            .unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for (i, d) in self.daemons.iter().enumerate() {
            out.push_str(&format!("--- xdp-lb on node {i} ---\n{}\n", tail(&d.log(), 40)));
        }
        out.push_str(&format!("--- router BIRD ---\n{}\n", tail(&self.topo.router_bird().output(), 20)));
        out
    }

    fn cli_ok(&self, node: usize, args: &[&str]) -> String {
        support::cli_ok(&self.daemons[node], args)
    }

    /// `explain` for a flow from `source` to the VIP of its family on `node`, over the API socket.
    fn explain(&self, node: usize, source: SocketAddr) -> Value {
        let family = if source.is_ipv4() { Family::V4 } else { Family::V6 };
        let destination = self.vip(family).to_string();
        let request = json!({"command": "explain", "source": source.to_string(), "destination": destination, "protocol": "tcp"});
        self.daemons[node].request(&request).unwrap_or_else(|e| panic!("explain {source} on node {node}: {e:?}"))
    }

    /// The nodes whose connection table holds an open flow from `source`.
    fn nodes_tracking(&self, source: SocketAddr) -> Vec<usize> {
        (0..NODES).filter(|&i| self.explain(i, source)["reason"] == "connection-table").collect()
    }

    /// The backend each node's ring gives a new flow from each of `flows`.
    fn ring_answers(&self, node: usize, flows: &[SocketAddr]) -> Vec<String> {
        flows
            .iter()
            .map(|&src| {
                let e = self.explain(node, src);
                let backend = match e["ended_flow"].is_null() && e["reason"] == "connection-table" {
                    // A 5-tuple the client really used: not a ring answer.
                    true => panic!("{src} is an open flow on node {node}: {e:#}"),
                    false => &e["backend"],
                };
                backend.as_str().unwrap_or_else(|| panic!("no backend for {src} on node {node}: {e:#}")).to_string()
            })
            .collect()
    }

    fn announced(&self, node: usize) -> Value {
        support::json(&self.daemons[node], &["status"])["announce"].take()
    }
}

fn start_server(topo: &MultiNode, j: usize) -> HttpServer {
    let addr = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), PORT);
    HttpServer::start(topo.backend(j), addr, &IdentityServers::body(j)).unwrap_or_else(|e| panic!("backend {j}: {e:?}"))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The nodes a route goes through.
fn nodes_of(hops: &[Hop]) -> BTreeSet<usize> {
    hops.iter().filter_map(|h| node_of_device(&h.device)).collect()
}

/// How long after `t0` both routes satisfied `ok` (the later of the two), or a panic naming `what`.
fn both(watches: &[RouteWatch; 2], t0: Instant, ok: impl Fn(&[Hop]) -> bool + Copy, cluster: &Cluster, what: &str) -> [Duration; 2] {
    [0, 1].map(|k| {
        let family = ["IPv4", "IPv6"][k];
        watches[k].wait(t0, CONVERGE, ok).unwrap_or_else(|| panic!("{what} ({family}): not within {CONVERGE:?}\n{}", cluster.logs()))
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn all_nodes() -> Vec<usize> {
    (0..NODES).collect()
}

fn without(node: usize) -> Vec<usize> {
    (0..NODES).filter(|&i| i != node).collect()
}

/// Client addresses for 1,000 flows that no client really opened (the explain answers come from
/// the rings, not from connection tables).
fn synthetic_flows() -> Vec<SocketAddr> {
    (0..FLOWS).map(|i| SocketAddr::from(([198, 51, 100, 10 + (i % 4) as u8], 20_000 + (i / 4) as u16 * 7))).collect()
}

fn print_tallies(family: &str, tallies: &[PhaseTally]) {
    println!("\n{:<44} {:>9} {:>7} {:>9} {:>7}", format!("phase ({family})"), "long ok", "broken", "new ok", "failed");
    for t in tallies {
        println!("{:<44} {:>9} {:>7} {:>9} {:>7}", t.name, t.long_ok, t.long_broken, t.new_ok, t.new_failed);
    }
}

/// The client traffic of both families; phases change together.
struct Loads {
    v4: Load,
    v6: Load,
}

impl Loads {
    fn phase(&self, name: &str) {
        self.v4.phase(name);
        self.v6.phase(name);
    }

    fn settle(&self) {
        self.v4.settle(Duration::from_secs(2));
        self.v6.settle(Duration::from_secs(2));
    }

    fn assert_unbroken(&self, cluster: &Cluster, phase: &str) {
        assert_unbroken(&self.v4, cluster, phase, "IPv4");
        assert_unbroken(&self.v6, cluster, phase, "IPv6");
    }
}

fn assert_unbroken(load: &Load, cluster: &Cluster, phase: &str, family: &str) {
    let tally = load.tallies().into_iter().find(|t| t.name == phase).unwrap_or_else(|| panic!("no phase {phase}"));
    let failures: Vec<Failure> = load.failures().into_iter().filter(|f| f.phase == phase).collect();
    assert!(
        tally.long_broken == 0 && tally.new_failed == 0 && tally.long_ok > 0 && tally.new_ok > 0,
        "{phase} ({family}): {} long connections broke and {} new ones failed (of {} and {} answered): {failures:#?}\n{}",
        tally.long_broken,
        tally.new_failed,
        tally.long_ok,
        tally.new_ok,
        cluster.logs()
    );
}

#[test]
fn nodes_behind_an_ecmp_router_keep_every_connection_through_drain_hang_restart_and_backend_changes() {
    let started = Instant::now();
    let mut cluster = Cluster::start();
    let watches = [Family::V4, Family::V6].map(|f| cluster.topo.watch_router(f).expect("ip monitor in the router"));
    // What each scenario took, IPv4 and IPv6 VIP, from the router's kernel routes.
    let mut measured: Vec<(String, [Duration; 2])> = Vec::new();

    // (a) Every node announces both VIPs: one next hop each.
    cluster.router_nodes(&all_nodes(), "(a) every node announces");
    for i in 0..NODES {
        let announce = cluster.announced(i);
        let vips = announce["vips"].as_array().map_or(0, |v| v.iter().filter(|v| v["announced"] == true).count());
        assert!(vips == 2 && announce["node_drained"] == false, "(a) node {i} should announce both VIPs: {announce:#}");
    }

    let config = |long_connections| LoadConfig {
        long_connections,
        long_period: Duration::from_millis(20),
        new_period: Duration::from_millis(20),
        limit: LOAD_LIMIT,
    };
    let packets_before = cluster.topo.packets_to_nodes().expect("router counters");
    let steady = "(a) steady";
    let loads = Loads {
        v4: Load::start(cluster.topo.client(), cluster.vip(Family::V4), &config(24), steady).expect("IPv4 client load"),
        v6: Load::start(cluster.topo.client(), cluster.vip(Family::V6), &config(24), steady).expect("IPv6 client load"),
    };
    std::thread::sleep(Duration::from_millis(1500));
    let packets_after = cluster.topo.packets_to_nodes().expect("router counters");
    let shares: Vec<u64> = packets_after.iter().zip(&packets_before).map(|(a, b)| a - b).collect();
    println!("packets the router sent to each node in 1.5 s of load: {shares:?}");
    assert!(shares.iter().all(|&n| n > 50), "ECMP should spread the flows over every node: {shares:?}");
    loads.assert_unbroken(&cluster, steady);

    // (b) Drain node 1: withdrawn within 100 ms; its flows go on through the other nodes.
    let drained = 1;
    let on_drained: Vec<SocketAddr> = [&loads.v4, &loads.v6]
        .iter()
        .flat_map(|l| l.long_connections())
        .map(|c| c.local)
        .filter(|&src| cluster.nodes_tracking(src) == [drained])
        .collect();
    let phase = "(b) drain node 1";
    loads.phase(phase);
    let t0 = Instant::now();
    cluster.cli_ok(drained, &["node", "drain"]);
    let took = both(&watches, t0, |h| !nodes_of(h).contains(&drained) && !h.is_empty(), &cluster, "(b) withdrawal");
    measured.push(("(b) node drain → router drops its next hop".into(), took));
    for family in [Family::V4, Family::V6] {
        assert_eq!(cluster.topo.router_nodes(family).expect("route"), without(drained), "(b) {family:?}");
    }
    assert!(took.iter().all(|t| *t <= DRAIN_WITHDRAWAL), "(b) the drained node was withdrawn after {took:?}, more than {DRAIN_WITHDRAWAL:?}");
    std::thread::sleep(Duration::from_millis(1000));
    loads.assert_unbroken(&cluster, phase);
    // The flows node 1 carried are now tracked by another node too: they really moved.
    let moved: Vec<SocketAddr> =
        on_drained.iter().copied().filter(|&src| cluster.nodes_tracking(src).iter().any(|&n| n != drained)).collect();
    println!("(b) {} long connections ran through node {drained} only; {} of them continue through another node", on_drained.len(), moved.len());
    assert!(on_drained.iter().any(SocketAddr::is_ipv4) && on_drained.iter().any(SocketAddr::is_ipv6),
        "(b) node {drained} should carry long connections of both families: {on_drained:?}");
    assert_eq!(moved.len(), on_drained.len(), "(b) flows of the drained node that did not move: {on_drained:?} vs {moved:?}");

    let phase = "(b) undrain node 1";
    loads.phase(phase);
    let t0 = Instant::now();
    cluster.cli_ok(drained, &["node", "undrain"]);
    let took = both(&watches, t0, |h| nodes_of(h).len() == NODES, &cluster, "(b) re-announcement");
    measured.push(("(b) node undrain → router adds it back".into(), took));
    loads.settle();
    loads.assert_unbroken(&cluster, phase);

    // (c) Node 2's BIRD hangs: BFD withdraws it.
    let hung = 2;
    let phase = "(c) BIRD on node 2 hung";
    loads.phase(phase);
    let t0 = Instant::now();
    cluster.topo.node_bird_mut(hung).pause().expect("SIGSTOP");
    let took = [0, 1].map(|k| watches[k].wait(t0, CONVERGE, |h| !nodes_of(h).contains(&hung) && !h.is_empty()));
    let resumed = cluster.topo.node_bird_mut(hung).resume();
    let took = took.map(|t| t.unwrap_or_else(|| panic!("(c) BFD did not withdraw the hung node\n{}", cluster.logs())));
    resumed.expect("SIGCONT");
    measured.push(("(c) BIRD SIGSTOP → BFD withdraws the node".into(), took));
    assert!(took.iter().all(|t| *t <= BFD_WITHDRAWAL), "(c) BFD withdrew the hung node after {took:?}, more than {BFD_WITHDRAWAL:?}");
    let t0 = Instant::now();
    let back = both(&watches, t0, |h| nodes_of(h).len() == NODES, &cluster, "(c) the resumed node comes back");
    measured.push(("(c) SIGCONT → session and route back".into(), back));
    loads.settle();
    loads.assert_unbroken(&cluster, phase);

    // (d) Restart node 0's xdp-lb.
    let phase = "(d) xdp-lb on node 0 restarted";
    loads.phase(phase);
    let t0 = Instant::now();
    cluster.daemons[0].restart().unwrap_or_else(|e| panic!("(d) restart: {e:?}"));
    let ready = t0.elapsed();
    cluster.router_nodes(&all_nodes(), "(d) after the restart");
    // SIGTERM withdraws the node (a deliberate stop), the new daemon announces it again.
    let [v4, v6] = [0, 1].map(|k| {
        let events = watches[k].history(t0);
        let gone = events.iter().position(|e| !nodes_of(&e.hops).contains(&0));
        let gone = gone.unwrap_or_else(|| panic!("(d) the stopping daemon did not withdraw node 0: {events:?}\n{}", cluster.logs()));
        let back = events[gone..].iter().find(|e| nodes_of(&e.hops).contains(&0)).expect("node 0 is back (checked above)");
        (events[gone].at - t0, back.at - t0)
    });
    measured.push(("(d) SIGTERM → router drops the node".into(), [v4.0, v6.0]));
    measured.push(("(d) SIGTERM → node back on the router".into(), [v4.1, v6.1]));
    measured.push(("(d) SIGTERM → new daemon ready".into(), [ready, ready]));
    loads.settle();
    loads.assert_unbroken(&cluster, phase);

    // (e) Remove one IPv4 backend on every node and add it back, in different orders.
    let moved_addr = cluster.topo.backend_socket(Family::V4, MOVED, PORT).to_string();
    let flows = synthetic_flows();
    let before: Vec<Vec<String>> = (0..NODES).map(|i| cluster.ring_answers(i, &flows)).collect();
    assert!(before.iter().all(|a| *a == before[0]), "(e) the nodes disagree before any change");
    let phase_e = "(e) backend removed and re-added";
    loads.phase(phase_e);
    for node in [0, 2, 1] {
        cluster.cli_ok(node, &["backend", "remove", "web", &moved_addr]);
        std::thread::sleep(Duration::from_millis(200));
    }
    let during: Vec<Vec<String>> = (0..NODES).map(|i| cluster.ring_answers(i, &flows)).collect();
    assert!(during.iter().all(|a| *a == during[0]), "(e) the nodes disagree with backend {MOVED} removed everywhere");
    assert!(during[0].iter().all(|b| *b != moved_addr), "(e) a removed backend still gets new flows");
    for node in [1, 0, 2] {
        cluster.cli_ok(node, &["backend", "add", "web", &moved_addr]);
        std::thread::sleep(Duration::from_millis(200));
    }
    loads.settle();
    let after: Vec<Vec<String>> = (0..NODES).map(|i| cluster.ring_answers(i, &flows)).collect();
    for (i, answers) in after.iter().enumerate() {
        let differ = answers.iter().zip(&before[0]).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "(e) after removing and re-adding backend {MOVED}, node {i} differs from before on {differ} of {FLOWS} flows");
    }
    // Only connections the removed backend held may break: long ones that it answered, new ones
    // whose 5-tuple the ring gives it. The IPv6 service did not change: none of its may break.
    let moved_body = IdentityServers::body(MOVED);
    let in_e: Vec<Failure> = loads.v4.failures().into_iter().filter(|f| f.phase == phase_e).collect();
    let unexcused: Vec<&Failure> = in_e
        .iter()
        .filter(|f| match (f.kind, &f.backend, f.local) {
            (Kind::Long, Some(b), _) => *b != moved_body,
            (Kind::New, _, Some(src)) => cluster.explain(0, src)["backend"] != moved_addr.as_str(),
            _ => true,
        })
        .collect();
    println!("(e) {} connections held by backend {MOVED} broke, as they may", in_e.len() - unexcused.len());
    assert!(unexcused.is_empty(), "(e) connections not held by backend {MOVED} broke: {unexcused:#?}\n{}", cluster.logs());
    assert_unbroken(&loads.v6, &cluster, phase_e, "IPv6");

    // (f) Every backend down: every node withdraws both VIPs.
    loads.phase("(f) all backends down");
    let t0 = Instant::now();
    for server in &mut cluster.servers {
        server.take();
    }
    let took = both(&watches, t0, <[Hop]>::is_empty, &cluster, "(f) the VIP withdrawn everywhere");
    measured.push(("(f) last backend stopped → withdrawn everywhere".into(), took));
    for i in 0..NODES {
        let announce = cluster.announced(i);
        let vips = announce["vips"].as_array().map_or(0, |v| v.iter().filter(|v| v["announced"] == false).count());
        assert_eq!(vips, 2, "(f) node {i} should withdraw both VIPs: {announce:#}");
    }

    let Loads { v4, v6 } = loads;
    print_tallies("IPv4", &v4.stop());
    print_tallies("IPv6", &v6.stop());
    println!("\nconvergence, from the router's kernel routes (ip monitor), ms:");
    println!("  {:<52} {:>8} {:>8}", "", "IPv4", "IPv6");
    for (what, [v4, v6]) in &measured {
        println!("  {what:<52} {:>8} {:>8}", ms(*v4), ms(*v6));
    }
    for (k, family) in ["IPv4", "IPv6"].iter().enumerate() {
        println!("the router's next hops for the {family} VIP over the run (nodes):");
        for e in watches[k].history(started) {
            println!("  {:>9.3} s  {:?}", (e.at - started).as_secs_f64(), nodes_of(&e.hops));
        }
    }
    println!("whole test: {:.1} s", started.elapsed().as_secs_f64());
}
