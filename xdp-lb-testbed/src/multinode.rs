//! Several balancer nodes behind one router (issue 11): the router spreads a VIP over every node
//! that announces it (eBGP from each node's BIRD, ECMP with an L4 hash), the nodes reach shared
//! backends on one L2 segment, and the backends answer the client directly (DSR) through the router.
//!
//! ```text
//!                                       ┌ to-n0 ── uplink 10.202.0.2  node-0 ─ backends 10.201.0.1 ┐
//! client 10.200.0.2 ── router 10.200.0.1┼ to-n1 ── uplink 10.202.1.2  node-1 ─ backends 10.201.0.2 ┼ switch (bridge)
//!                              10.202.i.1└ ...                                                       │   ├ backend-j 10.201.0.(10+j)
//!                      router backends 10.201.0.254 ─────────────────────────────────────────────────┘   └ ...
//! ```
//! Every node runs BIRD, which learns the routes in the node's kernel table [`ANNOUNCE_TABLE`] (what
//! xdp-lb's `[announce]` maintains, or a test by hand with [`MultiNode::announce_by_hand`]) and
//! exports just those to the router: BFD 100 ms × 3, no graceful restart (a dead node's routes
//! must go, not linger), `merge paths on` in the router's kernel protocol and
//! `fib_multipath_hash_policy=1` in its namespace (5-tuple ECMP: one flow stays on one node).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};

use crate::{
    bird::Bird,
    netns::{unique_prefix, Netns},
    route_watch::RouteWatch,
    topology::VIP_V4,
};

/// The kernel routing table whose routes a node's BIRD announces: xdp-lb's `[announce] table`.
pub const ANNOUNCE_TABLE: u32 = 100;
/// The route protocol number of routes the tests add by hand to [`ANNOUNCE_TABLE`].
pub const HAND_PROTO: u32 = 250;
pub const ROUTER_ASN: u32 = 65000;
/// Node `i` is AS `NODE_ASN_BASE + i`.
pub const NODE_ASN_BASE: u32 = 65001;
/// BFD on every router–node session: probes every 100 ms, down after 3 missed.
pub const BFD_INTERVAL_MS: u32 = 100;
pub const BFD_MULTIPLIER: u32 = 3;

/// A node's interface towards the router.
pub const UPLINK: &str = "uplink";
/// A node's interface on the backends' segment.
pub const BACKENDS_LINK: &str = "backends";
const PEER_IFACE: &str = "eth0";
const BRIDGE: &str = "br0";
const SESSIONS_TIMEOUT: Duration = Duration::from_secs(20);

pub struct MultiNode {
    prefix: String,
    // Field order is drop order: routing daemons first, then the namespaces, the files last.
    router_bird: Bird,
    node_birds: Vec<Bird>,
    backends: Vec<Netns>,
    nodes: Vec<Netns>,
    switch: Netns,
    router: Netns,
    client: Netns,
    dir: tempfile::TempDir,
}

impl MultiNode {
    /// Builds the namespaces and links and starts BIRD on the router and on every node; returns once
    /// every BGP session is established (no node announces anything yet).
    pub fn new(tag: &str, nodes: usize, backends: usize) -> anyhow::Result<MultiNode> {
        ensure!((1..=8).contains(&nodes), "nodes must be in 1..=8, got {nodes}");
        ensure!((1..=200).contains(&backends), "backends must be in 1..=200, got {backends}");
        let prefix = unique_prefix(tag);
        let client = Netns::new(&format!("{prefix}-client"))?;
        let router = Netns::new(&format!("{prefix}-router"))?;
        let switch = Netns::new(&format!("{prefix}-switch"))?;
        let nodes = (0..nodes).map(|i| Netns::new(&format!("{prefix}-node-{i}"))).collect::<anyhow::Result<Vec<_>>>()?;
        let backends =
            (0..backends).map(|j| Netns::new(&format!("{prefix}-backend-{j}"))).collect::<anyhow::Result<Vec<_>>>()?;
        let dir = tempfile::Builder::new().prefix("xdp-lb-multinode-").tempdir()?;
        wire(&client, &router, &switch, &nodes, &backends).with_context(|| format!("building topology {prefix}"))?;
        let router_bird = Bird::start(&router, dir.path(), "router", &router_config(nodes.len()))
            .with_context(|| format!("starting BIRD in {}", router.name()))?;
        let node_birds = nodes
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                Bird::start(ns, dir.path(), &format!("node-{i}"), &node_config(i))
                    .with_context(|| format!("starting BIRD in {}", ns.name()))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let topo = MultiNode { prefix, router_bird, node_birds, backends, nodes, switch, router, client, dir };
        topo.wait_sessions(SESSIONS_TIMEOUT)?;
        Ok(topo)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn client(&self) -> &Netns {
        &self.client
    }
    pub fn router(&self) -> &Netns {
        &self.router
    }
    /// The namespace holding the backends' bridge.
    pub fn switch(&self) -> &Netns {
        &self.switch
    }
    pub fn node(&self, i: usize) -> &Netns {
        &self.nodes[i]
    }
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
    pub fn backend(&self, j: usize) -> &Netns {
        &self.backends[j]
    }
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }
    pub fn router_bird(&self) -> &Bird {
        &self.router_bird
    }
    pub fn node_bird(&self, i: usize) -> &Bird {
        &self.node_birds[i]
    }
    pub fn node_bird_mut(&mut self, i: usize) -> &mut Bird {
        &mut self.node_birds[i]
    }
    /// Where the BIRD configs, sockets and logs are.
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The interfaces xdp-lb attaches to on every node.
    pub fn node_ifaces(&self) -> [&'static str; 2] {
        [UPLINK, BACKENDS_LINK]
    }

    pub fn client_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, 2)
    }
    /// Node `i`'s address towards the router: the next hop the router installs for it.
    pub fn node_uplink_addr(&self, i: usize) -> Ipv4Addr {
        node_uplink_addr(i)
    }
    /// Node `i`'s address on the backends' segment (its health checks come from it).
    pub fn node_backend_side_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, 0, 1 + i as u8)
    }
    pub fn backend_addr(&self, j: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, 0, 10 + j as u8)
    }
    pub fn backend_socket(&self, j: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.backend_addr(j).into(), port)
    }
    pub fn vip(&self) -> Ipv4Addr {
        VIP_V4
    }
    pub fn vip_socket(&self, port: u16) -> SocketAddr {
        SocketAddr::new(VIP_V4.into(), port)
    }

    /// Which node a router next hop belongs to.
    pub fn node_of_gateway(&self, gateway: IpAddr) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| IpAddr::from(node_uplink_addr(i)) == gateway)
    }

    /// The nodes the router sends the VIP to now, in node order.
    pub fn router_nodes(&self) -> anyhow::Result<Vec<usize>> {
        let out = self.router.ip(&["-o", "route", "show", &VIP_V4.to_string()])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        let mut nodes: Vec<usize> = words
            .windows(2)
            .filter(|w| w[0] == "via")
            .filter_map(|w| w[1].parse().ok().and_then(|g| self.node_of_gateway(g)))
            .collect();
        nodes.sort_unstable();
        Ok(nodes)
    }

    /// Follows the router's route to the VIP (see [`RouteWatch`]).
    pub fn watch_router(&self) -> anyhow::Result<RouteWatch> {
        RouteWatch::start(&self.router, VIP_V4.into())
    }

    /// Waits until the router's route to the VIP goes through exactly `expected` nodes (none: no
    /// route); an error names what it holds instead.
    pub fn wait_router_nodes(&self, expected: &[usize], timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut want = expected.to_vec();
        want.sort_unstable();
        loop {
            let now = self.router_nodes()?;
            if now == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the router sends {VIP_V4} to nodes {now:?}, not {want:?}, after {timeout:?}; BGP sessions: {:?}",
                    self.router_bird.bgp_sessions().unwrap_or_default()
                );
            }
            crate::interrupt::check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Adds the route xdp-lb's `[announce]` would add for the VIP on node `i` (a blackhole in
    /// [`ANNOUNCE_TABLE`], which the node's own forwarding never consults).
    pub fn announce_by_hand(&self, i: usize) -> anyhow::Result<()> {
        let (table, proto) = (ANNOUNCE_TABLE.to_string(), HAND_PROTO.to_string());
        let vip = format!("{VIP_V4}/32");
        self.nodes[i].ip(&["route", "replace", "blackhole", &vip, "table", &table, "proto", &proto]).map(drop)
    }

    /// Removes the route [`MultiNode::announce_by_hand`] added.
    pub fn withdraw_by_hand(&self, i: usize) -> anyhow::Result<()> {
        let (table, proto) = (ANNOUNCE_TABLE.to_string(), HAND_PROTO.to_string());
        let vip = format!("{VIP_V4}/32");
        self.nodes[i].ip(&["route", "del", "blackhole", &vip, "table", &table, "proto", &proto]).map(drop)
    }

    /// The routes in node `i`'s announce table (`ip route show table 100`).
    pub fn announce_table(&self, i: usize) -> anyhow::Result<String> {
        self.nodes[i].ip(&["route", "show", "table", &ANNOUNCE_TABLE.to_string()])
    }

    /// Packets the router sent to each node so far (its veth counters): how the ECMP hash split the
    /// traffic.
    pub fn packets_to_nodes(&self) -> anyhow::Result<Vec<u64>> {
        (0..self.nodes.len())
            .map(|i| {
                let path = format!("/sys/class/net/to-n{i}/statistics/tx_packets");
                // sysfs shows the devices of the namespace it was mounted in: read it through
                // `ip netns exec`, which mounts the router's own /sys.
                let out = self.router.exec_ok("cat", &[&path])?;
                out.trim().parse::<u64>().with_context(|| format!("{path} in {}: {out:?}", self.router.name()))
            })
            .collect()
    }

    /// Waits until the router's BGP session with every node is established.
    pub fn wait_sessions(&self, timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            let sessions = self.router_bird.bgp_sessions()?;
            let up = sessions.iter().filter(|(_, info)| info.starts_with("Established")).count();
            if up == self.nodes.len() {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!("BGP sessions not all established after {timeout:?}: {sessions:?}\n--- router BIRD ---\n{}", self.router_bird.output());
            }
            crate::interrupt::check()?;
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn node_uplink_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, i as u8, 2)
}

fn router_side_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, i as u8, 1)
}

const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const ROUTER_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 254);

fn wire(client: &Netns, router: &Netns, switch: &Netns, nodes: &[Netns], backends: &[Netns]) -> anyhow::Result<()> {
    for ns in [client, router, switch].into_iter().chain(nodes).chain(backends) {
        // Before the veths exist, so every interface inherits them.
        for (key, value) in [("net.ipv4.conf.all.rp_filter", "0"), ("net.ipv4.conf.default.rp_filter", "0")] {
            ns.sysctl(key, value)?;
        }
    }
    router.sysctl("net.ipv4.ip_forward", "1")?;
    // ECMP by the 5-tuple: with the default (addresses only) every flow of the one client would
    // take the same node.
    router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;

    veth(client, PEER_IFACE, "10.200.0.2/24", router, "to-client", "10.200.0.1/24")?;
    client.ip(&["route", "add", "default", "via", &ROUTER_CLIENT_SIDE.to_string()])?;

    switch.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    switch.ip(&["link", "set", BRIDGE, "up"])?;
    let port = |name: &str| -> anyhow::Result<()> {
        switch.ip(&["link", "set", name, "master", BRIDGE])?;
        switch.ip(&["link", "set", name, "up"]).map(drop)
    };
    veth(router, BACKENDS_LINK, &format!("{ROUTER_BACKEND_SIDE}/24"), switch, "r", "")?;
    port("r")?;

    for (i, node) in nodes.iter().enumerate() {
        // The kernel's FIB, which gives XDP its next hops, answers only when forwarding is on.
        node.sysctl("net.ipv4.ip_forward", "1")?;
        veth(router, &format!("to-n{i}"), &format!("{}/24", router_side_addr(i)), node, UPLINK, &format!("{}/24", node_uplink_addr(i)))?;
        veth(node, BACKENDS_LINK, &format!("10.201.0.{}/24", 1 + i), switch, &format!("n{i}"), "")?;
        port(&format!("n{i}"))?;
        // The switch port receives what the node's XDP program redirects into its veth: GRO there
        // gives it the NAPI that delivers such frames (see the testbed's veth notes).
        switch.exec_ok("ethtool", &["-K", &format!("n{i}"), "gro", "on"])?;
    }
    for (j, backend) in backends.iter().enumerate() {
        veth(backend, PEER_IFACE, &format!("10.201.0.{}/24", 10 + j), switch, &format!("b{j}"), "")?;
        port(&format!("b{j}"))?;
        backend.ip(&["route", "add", "default", "via", &ROUTER_BACKEND_SIDE.to_string()])?;
        // Direct server return: the backend accepts and answers from the VIP but never answers ARP
        // for it.
        backend.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
        for scope in ["all", PEER_IFACE] {
            backend.sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
            backend.sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
        }
    }
    Ok(())
}

/// A veth pair `a_if` (in `a`, address `a_addr`) ↔ `b_if` (in `b`, `b_addr`; empty for none), both
/// up, with GRO on and TX checksum offload off at both ends (see the testbed's veth notes).
fn veth(a: &Netns, a_if: &str, a_addr: &str, b: &Netns, b_if: &str, b_addr: &str) -> anyhow::Result<()> {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    for (ns, iface, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
        if !addr.is_empty() {
            ns.ip(&["addr", "add", addr, "dev", iface])?;
        }
        ns.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        ns.ip(&["link", "set", iface, "up"])?;
    }
    for (ns, iface) in [(a, a_if), (b, b_if)] {
        ns.exec_ok("ethtool", &["-K", iface, "gro", "on", "tx", "off"])?;
    }
    Ok(())
}

/// Timers shared by both ends of every session: BGP starts at once (`connect delay time 0`: the
/// default 5 s slows the first session), comes back within seconds of an error (the default wait is
/// 60 s), and a session that ends drops its routes at once (graceful restart would keep a dead
/// node's route for 120 s).
fn session_options() -> String {
    "bfd on; connect delay time 0; error wait time 1, 2; graceful restart off; hold time 9; keepalive time 3;".into()
}

fn bfd_block(interfaces: &str) -> String {
    format!(
        "protocol bfd {{\n  interface \"{interfaces}\" {{ min rx interval {BFD_INTERVAL_MS} ms; min tx interval {BFD_INTERVAL_MS} ms; multiplier {BFD_MULTIPLIER}; }};\n}}\n"
    )
}

const LOG: &str = "log stderr { info, remote, warning, error, auth, fatal, bug };\n";

/// The router: learns the VIP from every node and installs all equal paths (`merge paths on`).
pub fn router_config(nodes: usize) -> String {
    let mut out = String::from(LOG);
    out.push_str(&format!("router id {ROUTER_CLIENT_SIDE};\nprotocol device {{ }}\n"));
    out.push_str("protocol kernel {\n  ipv4 { import none; export all; };\n  merge paths on;\n}\n");
    out.push_str(&bfd_block("to-n*"));
    out.push_str(&format!(
        "template bgp nodes {{\n  local as {ROUTER_ASN};\n  {}\n  ipv4 {{ import all; export none; }};\n}}\n",
        session_options()
    ));
    for i in 0..nodes {
        out.push_str(&format!(
            "protocol bgp node{i} from nodes {{ local {} as {ROUTER_ASN}; neighbor {} as {}; }}\n",
            router_side_addr(i),
            node_uplink_addr(i),
            NODE_ASN_BASE + i as u32
        ));
    }
    out
}

/// Node `i`: learns the routes of its announce table (added by xdp-lb, or by hand) and exports
/// just those to the router.
pub fn node_config(i: usize) -> String {
    let mut out = String::from(LOG);
    out.push_str(&format!("router id {};\nprotocol device {{ }}\n", node_uplink_addr(i)));
    // `learn`: import routes that other programs put in the kernel table.
    out.push_str(&format!(
        "protocol kernel announced {{\n  ipv4 {{ import all; export none; }};\n  learn;\n  kernel table {ANNOUNCE_TABLE};\n}}\n"
    ));
    out.push_str(&bfd_block(UPLINK));
    out.push_str(&format!(
        "protocol bgp to_router {{\n  local {} as {};\n  neighbor {} as {ROUTER_ASN};\n  {}\n  ipv4 {{ import none; export where proto = \"announced\"; next hop self; }};\n}}\n",
        node_uplink_addr(i),
        NODE_ASN_BASE + i as u32,
        router_side_addr(i),
        session_options()
    ));
    out
}
