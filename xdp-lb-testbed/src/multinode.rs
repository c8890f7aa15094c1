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
//! Every link is dual stack; the IPv6 prefixes mirror the IPv4 ones: `fd00:200::/64` (client),
//! `fd00:202:i::/64` (router–node `i`), `fd00:201::/64` (the segment: node `i` is `::(1+i)`,
//! backend `j` `::(0x10+j)`, the router `::fe`). The VIPs are the single-balancer testbed's
//! (10.200.100.100, fd00:200:100::100), held by every backend on `lo`. The BGP sessions run over
//! IPv4 and carry both families.
//!
//! BIRD runs on the router and on every node with the configs the project ships
//! (`examples/bgp/router-bird.conf`, `node-bird.conf`, addresses filled in): each node's BIRD
//! learns the routes xdp-lb's `[announce]` keeps in the node's kernel table [`ANNOUNCE_TABLE`] and
//! exports just those; BFD 100 ms × 3, no graceful restart (a dead node's routes must go, not
//! linger), `merge paths on` in the router's kernel protocol. The testbed adds only
//! `fib_multipath_hash_policy=1` (IPv4 and IPv6) in the router's namespace (5-tuple ECMP: one flow
//! stays on one node), and BIRD's log on stderr; the examples' short `error wait time` brings a resumed hung node back
//! in seconds.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};

use crate::{
    bird::Bird,
    netns::{unique_prefix, Netns},
    route_watch::RouteWatch,
    topology::{Family, VIP_V4, VIP_V6},
};

/// The kernel routing table whose routes a node's BIRD announces: xdp-lb's `[announce] table`.
pub const ANNOUNCE_TABLE: u32 = 100;
pub const ROUTER_ASN: u32 = 65000;
/// Every node's AS (one AS for all, as in `examples/bgp`: equal AS paths, so the router merges them).
pub const NODES_ASN: u32 = 65010;

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
        let router_bird = Bird::start(&router, dir.path(), "router", &router_config(nodes.len())?)
            .with_context(|| format!("starting BIRD in {}", router.name()))?;
        let node_birds = nodes
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                Bird::start(ns, dir.path(), &format!("node-{i}"), &node_config(i)?)
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

    pub fn client_addr(&self, family: Family) -> IpAddr {
        family.pick(Ipv4Addr::new(10, 200, 0, 2), Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2))
    }
    /// Node `i`'s address towards the router (the BGP session runs over IPv4).
    pub fn node_uplink_addr(&self, i: usize) -> Ipv4Addr {
        node_uplink_addr(i)
    }
    /// Node `i`'s address on the backends' segment (its health checks come from it).
    pub fn node_backend_side_addr(&self, family: Family, i: usize) -> IpAddr {
        family.pick(Ipv4Addr::new(10, 201, 0, 1 + i as u8), Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 1 + i as u16))
    }
    pub fn backend_addr(&self, family: Family, j: usize) -> IpAddr {
        family.pick(backend_addr(j), backend_addr_v6(j))
    }
    pub fn backend_socket(&self, family: Family, j: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.backend_addr(family, j), port)
    }
    /// The VIPs are the single-balancer testbed's ([`crate::topology::VIP_V4`], `VIP_V6`).
    pub fn vip(&self, family: Family) -> IpAddr {
        family.pick(VIP_V4, VIP_V6)
    }
    pub fn vip_socket(&self, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.vip(family), port)
    }

    /// The nodes the router sends the VIP of `family` to now, in node order (none: no route).
    pub fn router_nodes(&self, family: Family) -> anyhow::Result<Vec<usize>> {
        let flag = family.pick_str("-4", "-6");
        let out = self.router.ip(&[flag, "-o", "route", "show", &self.vip(family).to_string()])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        let mut nodes: Vec<usize> = words.windows(2).filter(|w| w[0] == "dev").filter_map(|w| node_of_device(w[1])).collect();
        nodes.sort_unstable();
        Ok(nodes)
    }

    /// Follows the router's route to the VIP of `family` (see [`RouteWatch`]); its events list
    /// the nodes as devices, [`node_of_device`] names them.
    pub fn watch_router(&self, family: Family) -> anyhow::Result<RouteWatch> {
        RouteWatch::start(&self.router, self.vip(family))
    }

    /// Waits until the router's route to the VIP of `family` goes through exactly `expected` nodes
    /// (none: no route); an error names what it holds instead.
    pub fn wait_router_nodes(&self, family: Family, expected: &[usize], timeout: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let mut want = expected.to_vec();
        want.sort_unstable();
        loop {
            let now = self.router_nodes(family)?;
            if now == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the router sends {} to nodes {now:?}, not {want:?}, after {timeout:?}; BGP sessions: {:?}",
                    self.vip(family),
                    self.router_bird.bgp_sessions().unwrap_or_default()
                );
            }
            crate::interrupt::check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// The node behind a router interface (`to-n2` → 2).
pub fn node_of_device(device: &str) -> Option<usize> {
    device.strip_prefix("to-n")?.parse().ok()
}

fn node_uplink_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, i as u8, 2)
}

fn node_uplink_addr_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x202, i as u16, 0, 0, 0, 0, 2)
}

fn router_side_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, i as u8, 1)
}

fn router_side_addr_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x202, i as u16, 0, 0, 0, 0, 1)
}

fn backend_addr(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 0, 10 + j as u8)
}

fn backend_addr_v6(j: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0x10 + j as u16)
}

const ROUTER_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const ROUTER_BACKEND_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 254);
const ROUTER_BACKEND_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x201, 0, 0, 0, 0, 0, 0xfe);

fn wire(client: &Netns, router: &Netns, switch: &Netns, nodes: &[Netns], backends: &[Netns]) -> anyhow::Result<()> {
    for ns in [client, router, switch].into_iter().chain(nodes).chain(backends) {
        // Before the veths exist, so every interface inherits them.
        for (key, value) in [
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ] {
            ns.sysctl(key, value)?;
        }
    }
    // The kernel's FIB, which gives XDP its next hops, answers only when forwarding is on.
    for ns in std::iter::once(router).chain(nodes) {
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
    }
    // ECMP by the 5-tuple: with the default (addresses only) every flow of the one client would
    // take the same node.
    router.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
    router.sysctl("net.ipv6.fib_multipath_hash_policy", "1")?;
    client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;

    veth((client, PEER_IFACE, &["10.200.0.2/24", "fd00:200::2/64"]), (router, "to-client", &["10.200.0.1/24", "fd00:200::1/64"]))?;
    client.ip(&["route", "add", "default", "via", &ROUTER_CLIENT_SIDE.to_string()])?;
    client.ip(&["-6", "route", "add", "default", "via", "fd00:200::1"])?;

    switch.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
    switch.ip(&["link", "set", BRIDGE, "up"])?;
    let port = |name: &str| -> anyhow::Result<()> {
        switch.ip(&["link", "set", name, "master", BRIDGE])?;
        switch.ip(&["link", "set", name, "up"]).map(drop)
    };
    let router_backend_side = [format!("{ROUTER_BACKEND_SIDE}/24"), format!("{ROUTER_BACKEND_SIDE_V6}/64")];
    veth((router, BACKENDS_LINK, &[&router_backend_side[0], &router_backend_side[1]]), (switch, "r", &[]))?;
    port("r")?;

    for (i, node) in nodes.iter().enumerate() {
        let (r4, r6) = (format!("{}/24", router_side_addr(i)), format!("{}/64", router_side_addr_v6(i)));
        let (n4, n6) = (format!("{}/24", node_uplink_addr(i)), format!("{}/64", node_uplink_addr_v6(i)));
        veth((router, &format!("to-n{i}"), &[&r4, &r6]), (node, UPLINK, &[&n4, &n6]))?;
        let (b4, b6) = (format!("10.201.0.{}/24", 1 + i), format!("fd00:201::{:x}/64", 1 + i));
        veth((node, BACKENDS_LINK, &[&b4, &b6]), (switch, &format!("n{i}"), &[]))?;
        port(&format!("n{i}"))?;
        // The switch port receives what the node's XDP program redirects into its veth: GRO there
        // gives it the NAPI that delivers such frames (see the testbed's veth notes).
        switch.exec_ok("ethtool", &["-K", &format!("n{i}"), "gro", "on"])?;
    }
    for (j, backend) in backends.iter().enumerate() {
        let (b4, b6) = (format!("{}/24", backend_addr(j)), format!("{}/64", backend_addr_v6(j)));
        veth((backend, PEER_IFACE, &[&b4, &b6]), (switch, &format!("b{j}"), &[]))?;
        port(&format!("b{j}"))?;
        backend.ip(&["route", "add", "default", "via", &ROUTER_BACKEND_SIDE.to_string()])?;
        backend.ip(&["-6", "route", "add", "default", "via", &ROUTER_BACKEND_SIDE_V6.to_string()])?;
        // Direct server return: the backend accepts and answers from the VIPs but never answers
        // ARP for them (nodad: binding to a tentative address fails).
        backend.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
        backend.ip(&["addr", "add", &format!("{VIP_V6}/128"), "dev", "lo", "nodad"])?;
        for scope in ["all", PEER_IFACE] {
            backend.sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
            backend.sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
        }
    }
    Ok(())
}

type End<'a> = (&'a Netns, &'a str, &'a [&'a str]);

/// A veth pair between two namespaces, each end with its addresses (IPv6 without DAD), both up,
/// with GRO on and TX checksum offload off at both ends (see the testbed's veth notes).
fn veth((a, a_if, a_addrs): End, (b, b_if, b_addrs): End) -> anyhow::Result<()> {
    a.ip(&["link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name()])?;
    for (ns, iface, addrs) in [(a, a_if, a_addrs), (b, b_if, b_addrs)] {
        for addr in addrs {
            if addr.contains(':') {
                ns.ip(&["addr", "add", addr, "dev", iface, "nodad"])?;
            } else {
                ns.ip(&["addr", "add", addr, "dev", iface])?;
            }
        }
        ns.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
        ns.ip(&["link", "set", iface, "up"])?;
    }
    for (ns, iface) in [(a, a_if), (b, b_if)] {
        ns.exec_ok("ethtool", &["-K", iface, "gro", "on", "tx", "off"])?;
    }
    Ok(())
}

/// The BIRD configs the project ships for operators: the testbed runs exactly these, with the
/// addresses filled in.
const NODE_EXAMPLE: &str = include_str!("../../examples/bgp/node-bird.conf");
const ROUTER_EXAMPLE: &str = include_str!("../../examples/bgp/router-bird.conf");
const LOG: &str = "log stderr { info, remote, warning, error, auth, fatal, bug };";
/// The examples' retry after a failed session (BFD down): seconds rather than BIRD's default
/// 60–300 s wait, so a resumed node comes back (checked by the rendering test).
#[cfg(test)]
const ERROR_WAIT: &str = "error wait time 1, 2;";

/// The router (`examples/bgp/router-bird.conf`): one eBGP session per node (the example's sample
/// neighbours replaced), each from the router's address on that node's link.
pub fn router_config(nodes: usize) -> anyhow::Result<String> {
    let sample = ROUTER_EXAMPLE.find("protocol bgp node1 from").context("router-bird.conf has no `protocol bgp node1 from`")?;
    let mut out = ROUTER_EXAMPLE[..sample].to_string();
    out = set_define(&out, "ROUTER_ADDR", &ROUTER_CLIENT_SIDE.to_string())?;
    out = set_define(&out, "ROUTER_AS", &ROUTER_ASN.to_string())?;
    out = set_define(&out, "NODES_AS", &NODES_ASN.to_string())?;
    out = set_define(&out, "VIP_PREFIXES4", &format!("[ {VIP_V4}/32 ]"))?;
    out = set_define(&out, "VIP_PREFIXES6", &format!("[ {VIP_V6}/128 ]"))?;
    out = replace_once(&out, "log syslog all;", LOG)?;
    for i in 0..nodes {
        out.push_str(&format!(
            "protocol bgp node{i} from xdp_lb_node {{\n    local {} as ROUTER_AS;\n    neighbor {} as NODES_AS;\n}}\n",
            router_side_addr(i),
            node_uplink_addr(i)
        ));
    }
    Ok(out)
}

/// Node `i` (`examples/bgp/node-bird.conf`): learns xdp-lb's routes in [`ANNOUNCE_TABLE`] and
/// exports just those to the router.
pub fn node_config(i: usize) -> anyhow::Result<String> {
    let mut out = NODE_EXAMPLE.to_string();
    out = set_define(&out, "NODE_ADDR", &node_uplink_addr(i).to_string())?;
    out = set_define(&out, "NODE_AS", &NODES_ASN.to_string())?;
    out = set_define(&out, "ROUTER_ADDR", &router_side_addr(i).to_string())?;
    out = set_define(&out, "ROUTER_AS", &ROUTER_ASN.to_string())?;
    out = set_define(&out, "VIP_TABLE", &ANNOUNCE_TABLE.to_string())?;
    out = replace_once(&out, "log syslog all;", LOG)?;
    Ok(out)
}

/// Replaces the line `define NAME = ...;` with `define NAME = value;`.
fn set_define(config: &str, name: &str, value: &str) -> anyhow::Result<String> {
    let prefix = format!("define {name} =");
    let mut found = false;
    let lines: Vec<String> = config
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                found = true;
                format!("{prefix} {value};")
            } else {
                l.to_string()
            }
        })
        .collect();
    ensure!(found, "the example BIRD config has no `{prefix} ...` line");
    Ok(lines.join("\n") + "\n")
}

fn replace_once(config: &str, from: &str, to: &str) -> anyhow::Result<String> {
    ensure!(config.matches(from).count() == 1, "the example BIRD config should hold `{from}` once");
    Ok(config.replace(from, to))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped examples still have what the testbed fills in; `bird -p` (in `Bird::start`)
    /// checks the result parses.
    #[test]
    fn renders_the_example_configs() {
        let router = router_config(3).unwrap();
        assert!(router.contains("define ROUTER_AS = 65000;") && router.contains(ERROR_WAIT) && router.contains(LOG), "{router}");
        assert!(router.contains("protocol bgp node2 from xdp_lb_node {\n    local 10.202.2.1 as ROUTER_AS;\n    neighbor 10.202.2.2 as NODES_AS;"), "{router}");
        assert!(!router.contains("203.0.113"), "a sample address is left: {router}");
        let node = node_config(1).unwrap();
        assert!(node.contains("define NODE_ADDR = 10.202.1.2;") && node.contains("define VIP_TABLE = 100;"), "{node}");
        assert!(!node.contains("203.0.113") && node.contains(ERROR_WAIT), "{node}");
    }

    #[test]
    fn a_missing_define_is_named() {
        let e = set_define("router id 1.2.3.4;\n", "NODE_AS", "1").unwrap_err();
        assert!(e.to_string().contains("define NODE_AS ="), "{e}");
    }
}
