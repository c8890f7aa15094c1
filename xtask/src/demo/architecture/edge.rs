//! The demo's edge as it should be deployed: the untrusted client side reaches only the VIP. The lb
//! namespace routes between all its links (the replicas reach the services through it), so without
//! a filter a client could connect straight to a replica's `[admin]` listener or to the services,
//! around the gateway's JWT check, roles, rate limit and field stripping.
//!
//! An nftables forward rule drops what the kernel would forward from the client's link. The VIP's
//! traffic never reaches it: xdp-lb rewrites and redirects those frames in XDP, before the kernel's
//! network stack (and so nftables) sees them. The rule before the drop counts any VIP packet that
//! does reach nftables; the demo checks that count stays 0 under the load.

use std::{
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{ensure, Context};
use xdp_lb_testbed::Topology;

use super::{gateway, services};

const TABLE: &str = "xlb_demo_edge";

/// Installs the filter in `topo`'s lb namespace (removed with the namespace).
pub fn install(topo: &Topology) -> anyhow::Result<()> {
    let client_link = topo.client_iface();
    let vip = topo.vip_v4().to_string();
    let lb = topo.lb();
    lb.exec_ok("nft", &["add", "table", "inet", TABLE])?;
    lb.exec_ok("nft", &["add", "chain", "inet", TABLE, "forward", "{ type filter hook forward priority 0; policy accept; }"])?;
    lb.exec_ok("nft", &["add", "rule", "inet", TABLE, "forward", "iifname", client_link, "ip", "daddr", &vip, "counter", "accept"])?;
    lb.exec_ok("nft", &["add", "rule", "inet", TABLE, "forward", "iifname", client_link, "counter", "drop"])?;
    Ok(())
}

/// Packets counted by the filter so far: (to the VIP, dropped).
pub fn counters(topo: &Topology) -> anyhow::Result<(u64, u64)> {
    let listing = topo.lb().exec_ok("nft", &["list", "chain", "inet", TABLE, "forward"])?;
    parse_counters(&listing).with_context(|| format!("no two counters in `nft list chain inet {TABLE} forward`:\n{listing}"))
}

fn parse_counters(listing: &str) -> Option<(u64, u64)> {
    let mut packets = listing.lines().filter_map(|line| {
        let rest = line.split_once("counter packets ")?.1;
        rest.split_whitespace().next()?.parse::<u64>().ok()
    });
    Some((packets.next()?, packets.next()?))
}

/// The addresses behind the VIP that the client side must not reach directly: a replica's public
/// and admin listeners, and a service. Connecting to each from the client namespace must fail.
pub fn client_reaches_only_the_vip(topo: &Topology) -> anyhow::Result<()> {
    let replica = topo.backend_addr_v4(0);
    let forbidden = [
        SocketAddr::new(replica.into(), gateway::ADMIN_PORT),
        SocketAddr::new(replica.into(), gateway::PORT),
        SocketAddr::new(services::ADDRESS.into(), services::FIRST_PORT),
    ];
    let reached: Vec<SocketAddr> = topo.client().run(|| {
        forbidden.iter().copied().filter(|a| TcpStream::connect_timeout(a, Duration::from_millis(500)).is_ok()).collect()
    });
    ensure!(reached.is_empty(), "the client namespace connected straight to {reached:?}");
    println!("the client namespace reaches only the VIP: connections to {forbidden:?} fail");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_two_counters_in_order() {
        let listing = "table inet xlb_demo_edge {\n\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\
                       \t\tiifname \"to-client\" ip daddr 10.200.100.100 counter packets 0 bytes 0 accept\n\
                       \t\tiifname \"to-client\" counter packets 6 bytes 360 drop\n\t}\n}\n";
        assert_eq!(super::parse_counters(listing), Some((0, 6)));
        assert_eq!(super::parse_counters("table inet x {}"), None);
    }
}
