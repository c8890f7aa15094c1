//! Stage 1 of the data plane: Ethernet (+ one 802.1Q/802.1ad tag), IPv4 (any IHL) or IPv6, and the
//! TCP/UDP ports. Anything else is a [`Reason`] the packet is passed or dropped for.

use core::mem::offset_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};

use super::Frame;
use crate::{
    addr::{self, Addr},
    maps::{FlowKey, PROTO_TCP, PROTO_UDP},
    reasons::{self, Reason},
};

// Header sizes and field offsets come from network-types' wire layouts.
const ETH_HEADER_LEN: usize = EthHdr::LEN;
const VLAN_TAG_LEN: usize = VlanHdr::LEN;
pub(super) const IPV4_HEADER_LEN: usize = Ipv4Hdr::LEN;
pub(super) const IPV6_HEADER_LEN: usize = Ipv6Hdr::LEN;
pub(super) const TCP_HEADER_LEN: usize = TcpHdr::LEN;
pub(super) const UDP_HEADER_LEN: usize = UdpHdr::LEN;
/// The TCP flags byte: the second byte of the data-offset/flags word (network-types' bitfield).
const TCP_FLAGS_AT: usize = offset_of!(TcpHdr, _bitfield_1) + 1;

const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();
const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 "more fragments" flag and fragment offset, in network order.
const IPV4_FRAGMENT_MASK: u16 = 0x3fffu16.to_be();

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// What the later stages need to know about a parsed TCP/UDP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub flow: FlowKey,
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub ipv6: bool,
    pub vlan: bool,
    /// Frame length in bytes.
    pub len: u64,
    /// IP packet length (host order) as the header states it, for the FIB's MTU check.
    pub ip_len: u16,
    /// TCP flags byte (`TCP_*`); 0 for UDP.
    pub tcp_flags: u8,
}

#[inline(always)]
pub fn parse<F: Frame>(frame: &F) -> Result<Packet, Reason> {
    let eth = frame.window(0, ETH_HEADER_LEN).ok_or(reasons::DROP_SHORT_FRAME)?;
    // SAFETY: inside the checked window, at an even offset.
    let mut ether_type = unsafe { frame.load16(eth, offset_of!(EthHdr, ether_type)) };
    let mut l3_offset = ETH_HEADER_LEN;
    let mut vlan = false;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let tag = frame.window(ETH_HEADER_LEN, VLAN_TAG_LEN).ok_or(reasons::DROP_SHORT_FRAME)?;
        // SAFETY: the tag's inner ethertype, inside the checked window.
        ether_type = unsafe { frame.load16(tag, offset_of!(VlanHdr, ether_type)) };
        l3_offset += VLAN_TAG_LEN;
        vlan = true;
    }
    let len = frame.len() as u64;
    if ether_type == ETH_P_IP {
        parse_ipv4(frame, l3_offset, vlan, len)
    } else if ether_type == ETH_P_IPV6 {
        parse_ipv6(frame, l3_offset, vlan, len)
    } else {
        Err(reasons::PASS_NOT_IP)
    }
}

#[inline(always)]
fn parse_ipv4<F: Frame>(frame: &F, l3_offset: usize, vlan: bool, len: u64) -> Result<Packet, Reason> {
    let ip = frame.window(l3_offset, IPV4_HEADER_LEN).ok_or(reasons::DROP_BAD_IP_HEADER)?;
    // SAFETY: fields of the checked 20-byte header at their even offsets.
    let (vihl, tot_len, frags, proto, src, dst) = unsafe {
        (
            frame.load8(ip, offset_of!(Ipv4Hdr, vihl)),
            frame.load16(ip, offset_of!(Ipv4Hdr, tot_len)),
            frame.load16(ip, offset_of!(Ipv4Hdr, frags)),
            frame.load8(ip, offset_of!(Ipv4Hdr, proto)),
            frame.load32(ip, offset_of!(Ipv4Hdr, src_addr)),
            frame.load32(ip, offset_of!(Ipv4Hdr, dst_addr)),
        )
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < IPV4_HEADER_LEN {
        return Err(reasons::DROP_BAD_IP_HEADER);
    }
    // Options must lie inside the frame too.
    frame.window(l3_offset, header_len).ok_or(reasons::DROP_BAD_IP_HEADER)?;
    if frags & IPV4_FRAGMENT_MASK != 0 {
        return Err(reasons::PASS_FRAGMENT);
    }
    let l4_offset = l3_offset + header_len;
    let (sport, dport, tcp_flags) = ports(frame, proto, l4_offset)?;
    Ok(Packet {
        flow: flow_key(addr::from_v4_word(src), addr::from_v4_word(dst), sport, dport, proto),
        l3_offset,
        l4_offset,
        ipv6: false,
        vlan,
        len,
        ip_len: u16::from_be(tot_len),
        tcp_flags,
    })
}

#[inline(always)]
fn parse_ipv6<F: Frame>(frame: &F, l3_offset: usize, vlan: bool, len: u64) -> Result<Packet, Reason> {
    let ip = frame.window(l3_offset, IPV6_HEADER_LEN).ok_or(reasons::DROP_BAD_IP_HEADER)?;
    // SAFETY: fields of the checked 40-byte header at their even offsets.
    let (version, payload_len, next_hdr, src, dst) = unsafe {
        (
            frame.load8(ip, offset_of!(Ipv6Hdr, vcf)) >> 4,
            frame.load16(ip, offset_of!(Ipv6Hdr, payload_len)),
            frame.load8(ip, offset_of!(Ipv6Hdr, next_hdr)),
            frame.load_addr(ip, offset_of!(Ipv6Hdr, src_addr)),
            frame.load_addr(ip, offset_of!(Ipv6Hdr, dst_addr)),
        )
    };
    if version != 6 {
        return Err(reasons::DROP_BAD_IP_HEADER);
    }
    if next_hdr != PROTO_TCP && next_hdr != PROTO_UDP {
        return Err(if next_hdr == IPPROTO_ICMPV6 { reasons::PASS_NOT_TCP_UDP } else { reasons::PASS_IPV6_EXT });
    }
    let l4_offset = l3_offset + IPV6_HEADER_LEN;
    let (sport, dport, tcp_flags) = ports(frame, next_hdr, l4_offset)?;
    // IPv4 addresses are kept in their IPv4-mapped IPv6 form, so an IPv6 packet carrying a mapped
    // address would otherwise match IPv4 services and flows. On the wire such packets are bogus.
    if addr::is_v4_mapped(&src) || addr::is_v4_mapped(&dst) {
        return Err(reasons::PASS_NOT_VIP);
    }
    Ok(Packet {
        flow: flow_key(src, dst, sport, dport, next_hdr),
        l3_offset,
        l4_offset,
        ipv6: true,
        vlan,
        len,
        ip_len: u16::from_be(payload_len).saturating_add(IPV6_HEADER_LEN as u16),
        tcp_flags,
    })
}

/// Source and destination port (network order) and the TCP flags, requiring the whole TCP or UDP
/// header.
#[inline(always)]
fn ports<F: Frame>(frame: &F, proto: u8, l4_offset: usize) -> Result<(u16, u16, u8), Reason> {
    if proto == PROTO_TCP {
        let tcp = frame.window(l4_offset, TCP_HEADER_LEN).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: ports and flags of the checked 20-byte header.
        Ok(unsafe {
            (
                frame.load16(tcp, offset_of!(TcpHdr, source)),
                frame.load16(tcp, offset_of!(TcpHdr, dest)),
                frame.load8(tcp, TCP_FLAGS_AT),
            )
        })
    } else if proto == PROTO_UDP {
        let udp = frame.window(l4_offset, UDP_HEADER_LEN).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: ports of the checked 8-byte header.
        Ok(unsafe { (frame.load16(udp, offset_of!(UdpHdr, src)), frame.load16(udp, offset_of!(UdpHdr, dst)), 0) })
    } else {
        Err(reasons::PASS_NOT_TCP_UDP)
    }
}

#[inline(always)]
fn flow_key(src: Addr, dst: Addr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey { src, dst, sport, dport, proto, _pad: [0; 3] }
}
