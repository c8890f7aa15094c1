//! client ── lb ── backend-0 .. backend-(N-1): one namespace each, a veth pair per link, dual stack.
//!
//! ```text
//!  client eth0 10.200.0.2 / fd00:200::2      ──  lb to-client 10.200.0.1 / fd00:200::1
//!  lb to-b<i> 10.201.<i>.1 / fd00:201:<i>::1  ──  backend-<i> eth0 10.201.<i>.2 / fd00:201:<i>::2
//! ```
//! The VIPs (10.200.100.100, fd00:200:100::100) are not owned by the lb: the client reaches them
//! through its default route via the lb, and every backend holds them on `lo` for direct server return.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::{ensure, Context};

use crate::netns::{unique_prefix, Netns};

pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 200, 100, 100);
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0x100, 0, 0, 0, 0, 0x100);

/// The interface name on the client and backend side of each veth pair.
const PEER_IFACE: &str = "eth0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn pick(self, v4: impl Into<IpAddr>, v6: impl Into<IpAddr>) -> IpAddr {
        match self {
            Family::V4 => v4.into(),
            Family::V6 => v6.into(),
        }
    }

    pub fn pick_str(self, v4: &'static str, v6: &'static str) -> &'static str {
        match self {
            Family::V4 => v4,
            Family::V6 => v6,
        }
    }
}

pub struct Topology {
    prefix: String,
    // Field order is drop order: backends and lb go before the client, harmless either way since
    // deleting a namespace also deletes the veth ends inside it.
    backends: Vec<Netns>,
    lb: Netns,
    client: Netns,
}

impl Topology {
    /// Builds the namespaces and links; `tag` (a few characters) makes failures easy to attribute.
    pub fn new(tag: &str, backends: usize) -> anyhow::Result<Topology> {
        ensure!((1..=250).contains(&backends), "backends must be in 1..=250, got {backends}");
        let prefix = unique_prefix(tag);
        let client = Netns::new(&format!("{prefix}-client"))?;
        let lb = Netns::new(&format!("{prefix}-lb"))?;
        let backends =
            (0..backends).map(|i| Netns::new(&format!("{prefix}-backend-{i}"))).collect::<anyhow::Result<Vec<_>>>()?;
        let topo = Topology { prefix, backends, lb, client };
        topo.configure().with_context(|| format!("building topology {}", topo.prefix))?;
        Ok(topo)
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn client(&self) -> &Netns {
        &self.client
    }
    pub fn lb(&self) -> &Netns {
        &self.lb
    }
    pub fn backend(&self, i: usize) -> &Netns {
        &self.backends[i]
    }
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The lb's interface towards the client.
    pub fn client_iface(&self) -> &'static str {
        "to-client"
    }
    /// The lb's interface towards backend `i`.
    pub fn backend_iface(&self, i: usize) -> String {
        format!("to-b{i}")
    }
    /// Every lb interface: what the daemon attaches to.
    pub fn lb_ifaces(&self) -> Vec<String> {
        let mut all = vec![self.client_iface().to_string()];
        all.extend((0..self.backends.len()).map(|i| self.backend_iface(i)));
        all
    }

    pub fn client_addr_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, 2)
    }
    pub fn client_addr_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 2)
    }
    /// The lb's own address on the client link.
    pub fn lb_addr_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 200, 0, 1)
    }
    pub fn lb_addr_v6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 1)
    }
    pub fn backend_addr_v4(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, i as u8, 2)
    }
    pub fn backend_addr_v6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x201, i as u16, 0, 0, 0, 0, 2)
    }
    fn lb_backend_side_v4(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 201, i as u8, 1)
    }
    fn lb_backend_side_v6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x201, i as u16, 0, 0, 0, 0, 1)
    }
    pub fn vip_v4(&self) -> Ipv4Addr {
        VIP_V4
    }
    pub fn vip_v6(&self) -> Ipv6Addr {
        VIP_V6
    }

    pub fn client_addr(&self, family: Family) -> IpAddr {
        family.pick(self.client_addr_v4(), self.client_addr_v6())
    }
    pub fn lb_addr(&self, family: Family) -> IpAddr {
        family.pick(self.lb_addr_v4(), self.lb_addr_v6())
    }
    pub fn backend_addr(&self, family: Family, i: usize) -> IpAddr {
        family.pick(self.backend_addr_v4(i), self.backend_addr_v6(i))
    }
    pub fn vip(&self, family: Family) -> IpAddr {
        family.pick(self.vip_v4(), self.vip_v6())
    }
    pub fn vip_socket(&self, family: Family, port: u16) -> SocketAddr {
        SocketAddr::new(self.vip(family), port)
    }
    pub fn backend_socket(&self, family: Family, i: usize, port: u16) -> SocketAddr {
        SocketAddr::new(self.backend_addr(family, i), port)
    }

    fn configure(&self) -> anyhow::Result<()> {
        for ns in self.all() {
            // Before the veths exist, so every interface inherits these defaults.
            for (key, value) in [
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ] {
                ns.sysctl(key, value)?;
            }
        }
        let lb = &self.lb;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        lb.sysctl("net.ipv6.conf.all.forwarding", "1")?;

        self.link(
            self.client_iface(),
            &self.client,
            self.lb_addr_v4(),
            self.lb_addr_v6(),
            self.client_addr_v4(),
            self.client_addr_v6(),
        )?;
        self.client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        self.client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;

        for (i, backend) in self.backends.iter().enumerate() {
            self.link(
                &self.backend_iface(i),
                backend,
                self.lb_backend_side_v4(i),
                self.lb_backend_side_v6(i),
                self.backend_addr_v4(i),
                self.backend_addr_v6(i),
            )?;
            // Direct server return: the backend accepts (and answers from) the VIPs, but must never
            // answer ARP for them, or it would steal them from the path through the lb.
            backend.ip(&["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"])?;
            // nodad: even on lo the address is briefly tentative otherwise, and binding to it fails.
            backend.ip(&["addr", "add", &format!("{VIP_V6}/128"), "dev", "lo", "nodad"])?;
            for scope in ["all", PEER_IFACE] {
                backend.sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
                backend.sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
            }
        }
        Ok(())
    }

    /// Creates the veth pair `lb_iface` (in lb) ↔ eth0 (in `peer`), addresses both ends, points the
    /// peer's default routes at the lb.
    fn link(
        &self,
        lb_iface: &str,
        peer: &Netns,
        lb_v4: Ipv4Addr,
        lb_v6: Ipv6Addr,
        peer_v4: Ipv4Addr,
        peer_v6: Ipv6Addr,
    ) -> anyhow::Result<()> {
        let lb = &self.lb;
        lb.ip(&["link", "add", lb_iface, "type", "veth", "peer", "name", PEER_IFACE, "netns", peer.name()])?;
        lb.ip(&["addr", "add", &format!("{lb_v4}/24"), "dev", lb_iface])?;
        lb.ip(&["addr", "add", &format!("{lb_v6}/64"), "dev", lb_iface, "nodad"])?;
        peer.ip(&["addr", "add", &format!("{peer_v4}/24"), "dev", PEER_IFACE])?;
        peer.ip(&["addr", "add", &format!("{peer_v6}/64"), "dev", PEER_IFACE, "nodad"])?;
        let ends = [(lb, lb_iface), (peer, PEER_IFACE)];
        for (ns, iface) in ends {
            ns.sysctl(&format!("net.ipv4.conf.{iface}.rp_filter"), "0")?;
            ns.ip(&["link", "set", iface, "up"])?;
        }
        for (ns, iface) in ends {
            // A frame XDP redirects into a veth is only delivered if the receiving end has NAPI, which
            // GRO (or an XDP program) enables. The kernel marks the *other* end as a redirect target
            // only when GRO changes while the device is up, hence after `link set up`. And XDP
            // forwarding bypasses the kernel's completion of partial checksums, so the senders must
            // compute full ones (tx off).
            ns.exec_ok("ethtool", &["-K", iface, "gro", "on", "tx", "off"])?;
        }
        peer.ip(&["route", "add", "default", "via", &lb_v4.to_string()])?;
        peer.ip(&["-6", "route", "add", "default", "via", &lb_v6.to_string()])?;
        Ok(())
    }

    /// Pins the lb's neighbour entries for the client and every backend. The daemon resolves backends
    /// itself (the XDP program drops DSR packets whose next hop is unresolved), and the end-to-end
    /// tests rely on that; benchmarks may pin them so no measurement waits for ARP or NDP.
    pub fn pin_neighbours(&self) -> anyhow::Result<()> {
        let client = (self.client_iface().to_string(), &self.client, self.client_addr_v4(), self.client_addr_v6());
        let backends = self.backends.iter().enumerate().map(|(i, ns)| {
            (self.backend_iface(i), ns, self.backend_addr_v4(i), self.backend_addr_v6(i))
        });
        for (lb_iface, peer, v4, v6) in std::iter::once(client).chain(backends) {
            let mac = mac_of(peer, PEER_IFACE)?;
            let dev = lb_iface.as_str();
            self.lb.ip(&["neigh", "replace", &v4.to_string(), "lladdr", &mac, "dev", dev, "nud", "permanent"])?;
            self.lb.ip(&["-6", "neigh", "replace", &v6.to_string(), "lladdr", &mac, "dev", dev, "nud", "permanent"])?;
        }
        Ok(())
    }

    fn all(&self) -> impl Iterator<Item = &Netns> {
        [&self.client, &self.lb].into_iter().chain(self.backends.iter())
    }
}

fn mac_of(ns: &Netns, iface: &str) -> anyhow::Result<String> {
    let out = ns.ip(&["-o", "link", "show", "dev", iface])?;
    let mut words = out.split_whitespace();
    words
        .find(|w| *w == "link/ether")
        .and_then(|_| words.next())
        .map(str::to_string)
        .with_context(|| format!("no MAC in `ip -o link show dev {iface}` of {}: {out}", ns.name()))
}
