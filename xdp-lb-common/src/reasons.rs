//! Why a packet was not forwarded to a backend: the index into the `REASONS` per-CPU counter array.
//!
//! Operators debug the data path with these counters, so every `XDP_PASS` and `XDP_DROP` the program
//! returns is counted under exactly one reason.
//!
//! The table below is the only definition: each line gives a reason's constant, its number, the name
//! the CLI and the metrics show, and what the program does with its packets. The constants, [`NAMES`],
//! [`COUNT`], [`kind`], [`is_pass`] and [`is_tx`] are generated from it, and the build fails if two
//! reasons share a number or a number is skipped. The numbers index a map that outlives the program
//! (it is pinned, and a new binary adopts it): never renumber, only append.

pub type Reason = u32;

/// What the program does with a packet counted under a reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Handed to the kernel's network stack (`XDP_PASS`).
    Pass,
    /// Dropped (`XDP_DROP`).
    Drop,
    /// Answered: rewritten into a reply and sent back out (`XDP_TX` or a redirect).
    Tx,
}

macro_rules! reasons {
    ($( $(#[doc = $doc:literal])* $name:ident = $value:literal, $label:literal, $kind:ident; )*) => {
        $( $(#[doc = $doc])* pub const $name: Reason = $value; )*

        /// How many reasons there are (the size of the `REASONS` map).
        pub const COUNT: u32 = [$($value),*].len() as u32;

        /// Names indexed by reason, as shown by the CLI and the metrics.
        pub const NAMES: [&str; COUNT as usize] = {
            let mut names = [""; COUNT as usize];
            let mut taken = [false; COUNT as usize];
            $(
                // An index past COUNT fails the build here (a gap in the numbers).
                assert!(!taken[$value as usize], concat!("two reasons have the number of ", stringify!($name)));
                taken[$value as usize] = true;
                names[$value as usize] = $label;
            )*
            names
        };

        const KINDS: [Kind; COUNT as usize] = {
            let mut kinds = [Kind::Drop; COUNT as usize];
            $( kinds[$value as usize] = Kind::$kind; )*
            kinds
        };
    };
}

reasons! {
    /// Not IPv4 or IPv6 (ARP, LLDP, unknown ethertypes): the kernel's.
    PASS_NOT_IP = 0, "pass_not_ip", Pass;
    /// IP but neither TCP nor UDP (ICMP, ICMPv6, ...).
    PASS_NOT_TCP_UDP = 1, "pass_not_tcp_udp", Pass;
    /// IPv6 whose next header is an extension header: we only classify TCP/UDP directly after the header.
    PASS_IPV6_EXT = 2, "pass_ipv6_ext_header", Pass;
    /// IPv4 fragment (first or not): later fragments carry no ports, so none of them can be balanced
    /// consistently; the kernel reassembles or drops them.
    PASS_FRAGMENT = 3, "pass_fragment", Pass;
    /// TCP/UDP not addressed to any virtual service (the host's own traffic) and not a NAT reply.
    PASS_NOT_VIP = 4, "pass_not_vip", Pass;
    /// A VIP packet inside an 802.1Q tag: the kernel's VLAN device owns the tagged path.
    PASS_VLAN = 5, "pass_vlan", Pass;
    /// NAT packet whose next hop has no resolved neighbour yet: handed (already translated) to the
    /// kernel, which resolves the neighbour and forwards it.
    PASS_FIB_NO_NEIGH = 6, "pass_fib_no_neigh", Pass;
    /// The FIB's egress interface is not one the program is attached to (not in the `TX_PORTS` devmap).
    PASS_NO_TX_PORT = 7, "pass_no_tx_port", Pass;
    /// Frame shorter than an Ethernet (+ VLAN) header.
    DROP_SHORT_FRAME = 8, "drop_short_frame", Drop;
    /// IPv4 header with IHL < 5, or reaching past the end of the frame; truncated IPv6 header.
    DROP_BAD_IP_HEADER = 9, "drop_bad_ip_header", Drop;
    /// TCP or UDP header cut short by the end of the frame.
    DROP_TRUNCATED_L4 = 10, "drop_truncated_l4", Drop;
    /// Packet for a service that has no backend right now.
    DROP_NO_BACKEND = 11, "drop_no_backend", Drop;
    /// The FIB has no usable route to the backend or client (unreachable, blackhole, prohibit).
    DROP_FIB_UNREACHABLE = 12, "drop_fib_unreachable", Drop;
    /// DSR packet whose backend's neighbour is unresolved: it cannot be handed to the kernel (the
    /// destination is the VIP, which the balancer does not own).
    DROP_DSR_NO_NEIGH = 13, "drop_dsr_no_neigh", Drop;
    /// The chosen Maglev slot or backend entry could not be read (control plane mid-update).
    DROP_NO_BACKEND_ENTRY = 14, "drop_no_backend_entry", Drop;
    /// The FIB sent the packet to the kernel for another reason: the destination is local, forwarding is
    /// disabled on the interface, or the packet exceeds the egress MTU (the kernel then answers with ICMP).
    PASS_FIB_OTHER = 15, "pass_fib_other", Pass;
    /// TCP to a service with no backend, answered with a RST sent back out of the ingress interface
    /// so the client fails at once instead of waiting for its connect timeout.
    REJECT_NO_BACKEND = 16, "reject_no_backend", Tx;
    /// A new flow to a service from a source no real client can have (IPv4 0/8, 127/8, 224/4,
    /// 240/4; IPv6 ::, ::1, ff00::/8, IPv4-mapped; the VIP itself): backends drop such packets as
    /// martians, so forwarding them only feeds the passive checks SYNs nobody can answer.
    DROP_MARTIAN_SOURCE = 17, "drop_martian_source", Drop;
}

// `is_pass` and `is_tx` test one bit of a mask: a single shift on the data path.
const _: () = assert!(COUNT <= 32, "the kind masks hold 32 reasons");

const fn mask_of(kind: Kind) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < COUNT as usize {
        if KINDS[i] as u8 == kind as u8 {
            mask |= 1 << i;
        }
        i += 1;
    }
    mask
}

const PASS_MASK: u32 = mask_of(Kind::Pass);
const TX_MASK: u32 = mask_of(Kind::Tx);

/// What the program does with a reason's packets; `None` for a number that is no reason.
pub const fn kind(reason: Reason) -> Option<Kind> {
    if reason < COUNT { Some(KINDS[reason as usize]) } else { None }
}

/// Whether a reason's packets were passed to the kernel.
#[inline(always)]
pub const fn is_pass(reason: Reason) -> bool {
    reason < COUNT && (PASS_MASK >> reason) & 1 != 0
}

/// Whether a reason's packets were answered (rewritten into a reply and sent back with `XDP_TX`).
/// Packets neither passed nor answered were dropped.
#[inline(always)]
pub const fn is_tx(reason: Reason) -> bool {
    reason < COUNT && (TX_MASK >> reason) & 1 != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers as pinned maps hold them. A reason that moves makes an upgraded daemon report the
    /// old program's counts under the wrong names: this list only ever grows.
    const PINNED: [(&str, Reason, Kind); 18] = [
        ("pass_not_ip", 0, Kind::Pass),
        ("pass_not_tcp_udp", 1, Kind::Pass),
        ("pass_ipv6_ext_header", 2, Kind::Pass),
        ("pass_fragment", 3, Kind::Pass),
        ("pass_not_vip", 4, Kind::Pass),
        ("pass_vlan", 5, Kind::Pass),
        ("pass_fib_no_neigh", 6, Kind::Pass),
        ("pass_no_tx_port", 7, Kind::Pass),
        ("drop_short_frame", 8, Kind::Drop),
        ("drop_bad_ip_header", 9, Kind::Drop),
        ("drop_truncated_l4", 10, Kind::Drop),
        ("drop_no_backend", 11, Kind::Drop),
        ("drop_fib_unreachable", 12, Kind::Drop),
        ("drop_dsr_no_neigh", 13, Kind::Drop),
        ("drop_no_backend_entry", 14, Kind::Drop),
        ("pass_fib_other", 15, Kind::Pass),
        ("reject_no_backend", 16, Kind::Tx),
        ("drop_martian_source", 17, Kind::Drop),
    ];

    #[test]
    fn no_reason_moves() {
        assert!(COUNT as usize >= PINNED.len(), "a reason was removed");
        for (name, value, kind) in PINNED {
            assert_eq!(NAMES[value as usize], name, "reason {value} was renamed or moved");
            assert_eq!(super::kind(value), Some(kind), "{name} changed kind");
        }
        let constants = [
            PASS_NOT_IP, PASS_NOT_TCP_UDP, PASS_IPV6_EXT, PASS_FRAGMENT, PASS_NOT_VIP, PASS_VLAN,
            PASS_FIB_NO_NEIGH, PASS_NO_TX_PORT, DROP_SHORT_FRAME, DROP_BAD_IP_HEADER, DROP_TRUNCATED_L4,
            DROP_NO_BACKEND, DROP_FIB_UNREACHABLE, DROP_DSR_NO_NEIGH, DROP_NO_BACKEND_ENTRY, PASS_FIB_OTHER,
            REJECT_NO_BACKEND, DROP_MARTIAN_SOURCE,
        ];
        for (constant, (name, value, _)) in constants.into_iter().zip(PINNED) {
            assert_eq!(constant, value, "the constant for {name}");
        }
    }

    #[test]
    fn names_say_what_happens_to_the_packets() {
        for reason in 0..COUNT {
            let name = NAMES[reason as usize];
            let prefix = name.split('_').next().unwrap();
            let want = match prefix {
                "pass" => Kind::Pass,
                "drop" => Kind::Drop,
                "reject" => Kind::Tx,
                other => panic!("{name}: unknown prefix {other}"),
            };
            assert_eq!(kind(reason), Some(want), "{name}");
            assert_eq!(is_pass(reason), want == Kind::Pass, "{name}");
            assert_eq!(is_tx(reason), want == Kind::Tx, "{name}");
        }
        assert_eq!(kind(COUNT), None);
        assert!(!is_pass(COUNT) && !is_tx(COUNT) && !is_pass(u32::MAX));
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in NAMES.iter().enumerate() {
            assert!(!a.is_empty(), "reason {i} has no name");
            assert!(!NAMES[i + 1..].contains(a), "{a} twice");
        }
    }
}
