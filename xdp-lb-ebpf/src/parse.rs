//! Stage 1: bounds-checked parsing of Ethernet (+ one 802.1Q tag), IPv4/IPv6 and the TCP/UDP ports.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
    vlan::VlanHdr,
};
use crate::wire;
use xdp_lb_common::{
    addr::{self, Addr},
    maps::{FlowKey, PROTO_TCP, PROTO_UDP},
    reasons::{self, Reason},
};

const ETH_P_IP: u16 = 0x0800u16.to_be();
const ETH_P_IPV6: u16 = 0x86ddu16.to_be();
const ETH_P_8021Q: u16 = 0x8100u16.to_be();
const ETH_P_8021AD: u16 = 0x88a8u16.to_be();
const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 "more fragments" flag and fragment offset, in network order.
const IPV4_FRAGMENT_MASK: u16 = 0x3fffu16.to_be();

/// What the later stages need to know about a parsed TCP/UDP packet.
pub struct Packet {
    pub flow: FlowKey,
    pub l3_offset: usize,
    pub l4_offset: usize,
    pub ipv6: bool,
    pub vlan: bool,
    /// Frame length in bytes.
    pub len: u64,
    /// IP packet length (host order), for the FIB's MTU check.
    pub ip_len: u16,
    /// TCP flags byte (`TCP_*`); 0 for UDP.
    pub tcp_flags: u8,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;
/// Offset of the flags byte in the TCP header.
const TCP_FLAGS_OFFSET: usize = 13;

/// A pointer to a `T` at `offset`, if the whole `T` lies inside the frame. The one place packet
/// bounds are checked, so the verifier sees every access guarded.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(reasons::DROP_SHORT_FRAME)?;
    // SAFETY: ptr_at checked the header lies inside the frame.
    let mut ether_type = unsafe { (*eth).ether_type };
    let mut l3_offset = EthHdr::LEN;
    let mut vlan = false;
    if ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD {
        let tag: *const VlanHdr = ptr_at(ctx, EthHdr::LEN).ok_or(reasons::DROP_SHORT_FRAME)?;
        // SAFETY: bounds checked by ptr_at.
        ether_type = unsafe { (*tag).ether_type };
        l3_offset += VlanHdr::LEN;
        vlan = true;
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    if ether_type == ETH_P_IP {
        parse_ipv4(ctx, l3_offset, vlan, len)
    } else if ether_type == ETH_P_IPV6 {
        parse_ipv6(ctx, l3_offset, vlan, len)
    } else {
        Err(reasons::PASS_NOT_IP)
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &XdpContext, l3_offset: usize, vlan: bool, len: u64) -> Result<Packet, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3_offset).ok_or(reasons::DROP_BAD_IP_HEADER)?;
    // SAFETY: bounds checked by ptr_at; the header is 2-byte aligned (see wire.rs).
    let (vihl, frags, proto, tot_len, src, dst) = unsafe {
        (
            (*ip).vihl,
            wire::load16((*ip).frags.as_ptr()),
            (*ip).proto,
            wire::load16((*ip).tot_len.as_ptr()),
            wire::load32((*ip).src_addr.as_ptr()),
            wire::load32((*ip).dst_addr.as_ptr()),
        )
    };
    let header_len = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(reasons::DROP_BAD_IP_HEADER);
    }
    // Options must lie inside the frame too: check one byte at the header's end.
    ptr_at::<u8>(ctx, l3_offset + header_len - 1).ok_or(reasons::DROP_BAD_IP_HEADER)?;
    if frags & IPV4_FRAGMENT_MASK != 0 {
        return Err(reasons::PASS_FRAGMENT);
    }
    let l4_offset = l3_offset + header_len;
    let (sport, dport, tcp_flags) = ports(ctx, proto, l4_offset)?;
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
fn parse_ipv6(ctx: &XdpContext, l3_offset: usize, vlan: bool, len: u64) -> Result<Packet, Reason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3_offset).ok_or(reasons::DROP_BAD_IP_HEADER)?;
    // SAFETY: bounds checked by ptr_at; the header is 2-byte aligned (see wire.rs).
    let (version, next_hdr, payload_len, src, dst) = unsafe {
        (
            (*ip).vcf[0] >> 4,
            (*ip).next_hdr,
            wire::load16((*ip).payload_len.as_ptr()),
            wire::load_addr((*ip).src_addr.as_ptr()),
            wire::load_addr((*ip).dst_addr.as_ptr()),
        )
    };
    if version != 6 {
        return Err(reasons::DROP_BAD_IP_HEADER);
    }
    if next_hdr != PROTO_TCP && next_hdr != PROTO_UDP {
        return Err(if next_hdr == IPPROTO_ICMPV6 { reasons::PASS_NOT_TCP_UDP } else { reasons::PASS_IPV6_EXT });
    }
    let l4_offset = l3_offset + Ipv6Hdr::LEN;
    let (sport, dport, tcp_flags) = ports(ctx, next_hdr, l4_offset)?;
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
        ip_len: u16::from_be(payload_len).saturating_add(Ipv6Hdr::LEN as u16),
        tcp_flags,
    })
}

/// Source and destination port (network order) and the TCP flags, requiring the whole TCP or UDP
/// header.
#[inline(always)]
fn ports(ctx: &XdpContext, proto: u8, l4_offset: usize) -> Result<(u16, u16, u8), Reason> {
    if proto == PROTO_TCP {
        let tcp: *const TcpHdr = ptr_at(ctx, l4_offset).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: bounds checked by ptr_at (the flags byte is inside the 20-byte header); 2-byte aligned.
        Ok(unsafe {
            (
                wire::load16((*tcp).source.as_ptr()),
                wire::load16((*tcp).dest.as_ptr()),
                *(tcp as *const u8).add(TCP_FLAGS_OFFSET),
            )
        })
    } else if proto == PROTO_UDP {
        let udp: *const UdpHdr = ptr_at(ctx, l4_offset).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: bounds checked by ptr_at; 2-byte aligned.
        Ok(unsafe { (wire::load16((*udp).src.as_ptr()), wire::load16((*udp).dst.as_ptr()), 0) })
    } else {
        Err(reasons::PASS_NOT_TCP_UDP)
    }
}

#[inline(always)]
fn flow_key(src: Addr, dst: Addr, sport: u16, dport: u16, proto: u8) -> FlowKey {
    FlowKey { src, dst, sport, dport, proto, _pad: [0; 3] }
}
