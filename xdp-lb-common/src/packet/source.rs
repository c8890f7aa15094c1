//! Sources no real client can have. A backend's kernel drops a packet from such a source as a
//! martian (loopback, multicast, "this network", its own address), so a SYN from one is never
//! answered: forwarded, it only teaches the passive checks that a healthy backend ignores SYNs.
//! Checked on new flows only (an established flow never has such a source), a few compares on the
//! parsed header.

use super::Packet;
use crate::addr::{Addr, V4_MAPPED_PREFIX};

/// `::1` as the data plane stores it (the last word, in network order).
const V6_LOOPBACK_LAST: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

/// Whether `packet`'s source can never be a real client: IPv4 0/8, 127/8, 169.254/16 (link-local),
/// 224/4 (multicast), 240/4 (reserved, with 255.255.255.255); IPv6 `::`, `::1`, `fe80::/10`
/// (link-local), `ff00::/8`, IPv4-mapped (`::ffff:0:0/96`); or the packet's own destination (a VIP
/// never sends to itself). Link-local sources are never forwarded off their link (RFC 3927, RFC
/// 4291): a backend behind the balancer cannot answer them, so they are martians here too.
#[inline(always)]
pub fn martian_source(packet: &Packet) -> bool {
    let src = &packet.flow.src;
    let dst = &packet.flow.dst;
    if src[0] == dst[0] && src[1] == dst[1] && src[2] == dst[2] && src[3] == dst[3] {
        return true;
    }
    if packet.ipv6 { martian_v6(src) } else { martian_v4(src[3]) }
}

/// `word` holds the address's four bytes in network order, as loaded from the packet.
#[inline(always)]
fn martian_v4(word: u32) -> bool {
    let [first, second, ..] = word.to_ne_bytes();
    first == 0 || first == 127 || first >= 224 || (first == 169 && second == 254)
}

#[inline(always)]
fn martian_v6(src: &Addr) -> bool {
    let [first, second, ..] = src[0].to_ne_bytes();
    if first == 0xff || (first == 0xfe && second & 0xc0 == 0x80) {
        return true;
    }
    src[0] == 0 && src[1] == 0 && (src[2] == V4_MAPPED_PREFIX || (src[2] == 0 && (src[3] == 0 || src[3] == V6_LOOPBACK_LAST)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr, maps::FlowKey};
    use core::net::IpAddr;

    fn packet(src: &str, dst: &str, ipv6: bool) -> Packet {
        let ip = |s: &str| addr::from_ip(s.parse::<IpAddr>().unwrap());
        Packet {
            flow: FlowKey { src: ip(src), dst: ip(dst), sport: 1, dport: 80, proto: 6, _pad: [0; 3] },
            l3_offset: 14,
            l4_offset: 34,
            ipv6,
            vlan: false,
            len: 60,
            ip_len: 46,
            tcp_flags: 0,
        }
    }

    #[test]
    fn ipv4_martians_are_refused_and_clients_are_not() {
        for src in ["0.0.0.0", "0.1.2.3", "127.0.0.1", "127.1.2.3", "224.0.0.9", "239.255.255.255", "240.0.0.1", "255.255.255.255", "169.254.1.1", "169.254.0.0", "10.9.9.9"] {
            assert!(martian_source(&packet(src, "10.9.9.9", false)), "{src}");
        }
        for src in ["1.0.0.1", "10.0.0.1", "126.255.255.255", "128.0.0.1", "192.0.2.7", "223.255.255.255", "169.253.1.1", "169.255.1.1", "168.254.1.1"] {
            assert!(!martian_source(&packet(src, "10.9.9.9", false)), "{src}");
        }
    }

    #[test]
    fn ipv6_martians_are_refused_and_clients_are_not() {
        for src in ["::", "::1", "ff02::1", "ff0e::9", "::ffff:10.0.0.1", "::ffff:127.0.0.1", "fe80::1", "febf::1", "fd00::9"] {
            assert!(martian_source(&packet(src, "fd00::9", true)), "{src}");
        }
        for src in ["::2", "2001:db8::1", "fd00::2", "fec0::1", "fe00::1", "fe7f::1", "100::1", "::1:0:0:1"] {
            assert!(!martian_source(&packet(src, "fd00::9", true)), "{src}");
        }
    }

    /// IPv4 packets carry their addresses in the IPv4-mapped form: that form is only bogus in IPv6.
    #[test]
    fn the_mapped_form_is_only_refused_in_ipv6_packets() {
        assert!(!martian_source(&packet("10.0.0.1", "10.9.9.9", false)));
        assert!(martian_source(&packet("10.0.0.1", "10.9.9.9", true)));
    }
}
