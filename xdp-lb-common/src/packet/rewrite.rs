//! Stage 4: rewrite a parsed packet. NAT translates one end's address and port with incremental
//! checksum updates (client → VIP becomes client → backend; backend → client becomes VIP → client);
//! every forwarded frame gets the next hop's MAC addresses.

use core::mem::offset_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use super::{
    parse::{IPV4_HEADER_LEN, IPV6_HEADER_LEN, TCP_HEADER_LEN, UDP_HEADER_LEN},
    Frame, Packet,
};
use crate::{
    addr::Addr,
    checksum,
    maps::PROTO_TCP,
    reasons::{self, Reason},
};

const IPV4_CHECK_AT: usize = offset_of!(Ipv4Hdr, check);
const TCP_CHECK_AT: usize = offset_of!(TcpHdr, check);
const UDP_CHECK_AT: usize = offset_of!(UdpHdr, check);

/// Which end of the flow is rewritten.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    Source,
    Destination,
}

/// Replaces `end`'s address and port in the parsed `packet` and updates the IPv4 header checksum and
/// the TCP/UDP checksum (a zero "no checksum" UDP field stays zero). The address family must be the
/// packet's: the control plane refuses mixed-family services.
#[inline(always)]
pub fn translate<F: Frame>(
    frame: &mut F,
    packet: &Packet,
    end: End,
    new_addr: &Addr,
    new_port: u16,
) -> Result<(), Reason> {
    let flow = &packet.flow;
    let (old_addr, old_port) = match end {
        End::Source => (&flow.src, flow.sport),
        End::Destination => (&flow.dst, flow.dport),
    };
    if packet.ipv6 {
        let ip = frame.window(packet.l3_offset, IPV6_HEADER_LEN).ok_or(reasons::DROP_BAD_IP_HEADER)?;
        let at = if end == End::Source { offset_of!(Ipv6Hdr, src_addr) } else { offset_of!(Ipv6Hdr, dst_addr) };
        // SAFETY: an address inside the checked 40-byte header.
        unsafe { frame.store_addr(ip, at, new_addr) };
    } else {
        let ip = frame.window(packet.l3_offset, IPV4_HEADER_LEN).ok_or(reasons::DROP_BAD_IP_HEADER)?;
        let at = if end == End::Source { offset_of!(Ipv4Hdr, src_addr) } else { offset_of!(Ipv4Hdr, dst_addr) };
        // SAFETY: the checksum and an address inside the checked 20-byte header.
        unsafe {
            let check = frame.load16(ip, IPV4_CHECK_AT);
            frame.store16(ip, IPV4_CHECK_AT, checksum::update_u32(check, old_addr[3], new_addr[3]));
            frame.store32(ip, at, new_addr[3]);
        }
    }
    // The pseudo-header covers the addresses, so the L4 checksum changes with them and the port.
    let update = |check: u16| -> u16 {
        let c = checksum::update_addr(check, old_addr, new_addr);
        checksum::update_u16(c, old_port, new_port)
    };
    // TCP and UDP both start with the source port, then the destination port.
    let port_at = if end == End::Source { offset_of!(UdpHdr, src) } else { offset_of!(UdpHdr, dst) };
    if flow.proto == PROTO_TCP {
        let tcp = frame.window(packet.l4_offset, TCP_HEADER_LEN).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: the checksum and a port inside the checked 20-byte header.
        unsafe {
            let check = frame.load16(tcp, TCP_CHECK_AT);
            frame.store16(tcp, TCP_CHECK_AT, update(check));
            frame.store16(tcp, port_at, new_port);
        }
    } else {
        let udp = frame.window(packet.l4_offset, UDP_HEADER_LEN).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: the checksum and a port inside the checked 8-byte header.
        unsafe {
            let original = frame.load16(udp, UDP_CHECK_AT);
            frame.store16(udp, UDP_CHECK_AT, checksum::udp_finish(original, update(original)));
            frame.store16(udp, port_at, new_port);
        }
    }
    Ok(())
}

/// Sets the Ethernet destination and source MAC addresses.
#[inline(always)]
pub fn set_macs<F: Frame>(frame: &mut F, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), Reason> {
    let eth = frame.window(0, offset_of!(EthHdr, ether_type)).ok_or(reasons::DROP_SHORT_FRAME)?;
    let word = |mac: &[u8; 6], at: usize| u16::from_ne_bytes([mac[at], mac[at + 1]]);
    // SAFETY: six 16-bit words inside the checked 12 bytes.
    unsafe {
        let (d, s) = (offset_of!(EthHdr, dst_addr), offset_of!(EthHdr, src_addr));
        frame.store16(eth, d, word(dst, 0));
        frame.store16(eth, d + 2, word(dst, 2));
        frame.store16(eth, d + 4, word(dst, 4));
        frame.store16(eth, s, word(src, 0));
        frame.store16(eth, s + 2, word(src, 2));
        frame.store16(eth, s + 4, word(src, 4));
    }
    Ok(())
}
