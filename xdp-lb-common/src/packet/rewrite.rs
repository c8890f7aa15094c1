//! Stage 4: rewrite a parsed packet. NAT translates one end's address and port with incremental
//! checksum updates (client → VIP becomes client → backend; backend → client becomes VIP → client);
//! every forwarded frame gets the next hop's MAC addresses.

use super::{Frame, Packet};
use crate::{
    addr::Addr,
    checksum,
    maps::PROTO_TCP,
    reasons::{self, Reason},
};

const IPV4_CHECK_AT: usize = 10;
const IPV4_SRC_AT: usize = 12;
const IPV4_DST_AT: usize = 16;
const IPV6_SRC_AT: usize = 8;
const IPV6_DST_AT: usize = 24;
const TCP_CHECK_AT: usize = 16;
const UDP_CHECK_AT: usize = 6;

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
        let ip = frame.window(packet.l3_offset, 40).ok_or(reasons::DROP_BAD_IP_HEADER)?;
        let at = if end == End::Source { IPV6_SRC_AT } else { IPV6_DST_AT };
        // SAFETY: an address inside the checked 40-byte header.
        unsafe { frame.store_addr(ip, at, new_addr) };
    } else {
        let ip = frame.window(packet.l3_offset, 20).ok_or(reasons::DROP_BAD_IP_HEADER)?;
        let at = if end == End::Source { IPV4_SRC_AT } else { IPV4_DST_AT };
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
    let port_at = if end == End::Source { 0 } else { 2 };
    if flow.proto == PROTO_TCP {
        let tcp = frame.window(packet.l4_offset, 20).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: the checksum and a port inside the checked 20-byte header.
        unsafe {
            let check = frame.load16(tcp, TCP_CHECK_AT);
            frame.store16(tcp, TCP_CHECK_AT, update(check));
            frame.store16(tcp, port_at, new_port);
        }
    } else {
        let udp = frame.window(packet.l4_offset, 8).ok_or(reasons::DROP_TRUNCATED_L4)?;
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
    let eth = frame.window(0, 12).ok_or(reasons::DROP_SHORT_FRAME)?;
    let word = |mac: &[u8; 6], at: usize| u16::from_ne_bytes([mac[at], mac[at + 1]]);
    // SAFETY: six 16-bit words inside the checked 12 bytes.
    unsafe {
        frame.store16(eth, 0, word(dst, 0));
        frame.store16(eth, 2, word(dst, 2));
        frame.store16(eth, 4, word(dst, 4));
        frame.store16(eth, 6, word(src, 0));
        frame.store16(eth, 8, word(src, 2));
        frame.store16(eth, 10, word(src, 4));
    }
    Ok(())
}
