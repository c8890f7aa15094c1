//! Why a packet was not forwarded to a backend: the index into the `REASONS` per-CPU counter array.
//!
//! Operators debug the data path with these counters, so every `XDP_PASS` and `XDP_DROP` the program
//! returns is counted under exactly one reason.

pub type Reason = u32;

/// Not IPv4 or IPv6 (ARP, LLDP, unknown ethertypes): the kernel's.
pub const PASS_NOT_IP: Reason = 0;
/// IP but neither TCP nor UDP (ICMP, ICMPv6, ...).
pub const PASS_NOT_TCP_UDP: Reason = 1;
/// IPv6 whose next header is an extension header: we only classify TCP/UDP directly after the header.
pub const PASS_IPV6_EXT: Reason = 2;
/// IPv4 fragment (first or not): later fragments carry no ports, so none of them can be balanced
/// consistently; the kernel reassembles or drops them.
pub const PASS_FRAGMENT: Reason = 3;
/// TCP/UDP not addressed to any virtual service (the host's own traffic) and not a NAT reply.
pub const PASS_NOT_VIP: Reason = 4;
/// A VIP packet inside an 802.1Q tag: the kernel's VLAN device owns the tagged path.
pub const PASS_VLAN: Reason = 5;
/// NAT packet whose next hop has no resolved neighbour yet: handed (already translated) to the
/// kernel, which resolves the neighbour and forwards it.
pub const PASS_FIB_NO_NEIGH: Reason = 6;
/// The FIB's egress interface is not one the program is attached to (not in the `TX_PORTS` devmap).
pub const PASS_NO_TX_PORT: Reason = 7;
/// Frame shorter than an Ethernet (+ VLAN) header.
pub const DROP_SHORT_FRAME: Reason = 8;
/// IPv4 header with IHL < 5, or reaching past the end of the frame; truncated IPv6 header.
pub const DROP_BAD_IP_HEADER: Reason = 9;
/// TCP or UDP header cut short by the end of the frame.
pub const DROP_TRUNCATED_L4: Reason = 10;
/// Packet for a service that has no backend right now.
pub const DROP_NO_BACKEND: Reason = 11;
/// The FIB has no usable route to the backend or client (unreachable, blackhole, prohibit).
pub const DROP_FIB_UNREACHABLE: Reason = 12;
/// DSR packet whose backend's neighbour is unresolved: it cannot be handed to the kernel (the
/// destination is the VIP, which the balancer does not own).
pub const DROP_DSR_NO_NEIGH: Reason = 13;
/// The chosen Maglev slot or backend entry could not be read (control plane mid-update).
pub const DROP_NO_BACKEND_ENTRY: Reason = 14;

/// The FIB sent the packet to the kernel for another reason: the destination is local, forwarding is
/// disabled on the interface, or the packet exceeds the egress MTU (the kernel then answers with ICMP).
pub const PASS_FIB_OTHER: Reason = 15;

/// TCP to a service with no backend, answered with a RST sent back out of the ingress interface
/// (`XDP_TX`) so the client fails at once instead of waiting for its connect timeout.
pub const REJECT_NO_BACKEND: Reason = 16;

pub const COUNT: u32 = 17;

/// Names in index order, as shown by the CLI and the metrics.
pub const NAMES: [&str; COUNT as usize] = [
    "pass_not_ip",
    "pass_not_tcp_udp",
    "pass_ipv6_ext_header",
    "pass_fragment",
    "pass_not_vip",
    "pass_vlan",
    "pass_fib_no_neigh",
    "pass_no_tx_port",
    "drop_short_frame",
    "drop_bad_ip_header",
    "drop_truncated_l4",
    "drop_no_backend",
    "drop_fib_unreachable",
    "drop_dsr_no_neigh",
    "drop_no_backend_entry",
    "pass_fib_other",
    "reject_no_backend",
];

/// Whether a reason's packets were passed to the kernel.
pub const fn is_pass(reason: Reason) -> bool {
    reason <= PASS_NO_TX_PORT || reason == PASS_FIB_OTHER
}

/// Whether a reason's packets were answered (rewritten into a reply and sent back with `XDP_TX`).
/// Packets neither passed nor answered were dropped.
pub const fn is_tx(reason: Reason) -> bool {
    reason == REJECT_NO_BACKEND
}
