//! Stage 4 (NAT only): translate addresses and ports with incremental checksum updates.
//! Client → VIP becomes client → backend; backend → client becomes VIP → client.

use aya_ebpf::programs::XdpContext;
use network_types::{ip::Ipv4Hdr, ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr};
use xdp_lb_common::{
    addr::Addr,
    checksum,
    maps::PROTO_TCP,
    reasons::{self, Reason},
};

use crate::parse::{ptr_at, Packet};

/// Which end of the flow is rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Source,
    Destination,
}

#[inline(always)]
pub fn destination(ctx: &XdpContext, packet: &Packet, addr: &Addr, port: u16) -> Result<(), Reason> {
    translate(ctx, packet, End::Destination, addr, port)
}

#[inline(always)]
pub fn source(ctx: &XdpContext, packet: &Packet, addr: &Addr, port: u16) -> Result<(), Reason> {
    translate(ctx, packet, End::Source, addr, port)
}

#[inline(always)]
fn translate(ctx: &XdpContext, packet: &Packet, end: End, new_addr: &Addr, new_port: u16) -> Result<(), Reason> {
    let flow = &packet.flow;
    let (old_addr, old_port) = match end {
        End::Source => (&flow.src, flow.sport),
        End::Destination => (&flow.dst, flow.dport),
    };
    // The family always matches: the control plane refuses mixed-family services.
    if packet.ipv6 {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, packet.l3_offset).ok_or(reasons::DROP_BAD_IP_HEADER)?;
        let bytes = xdp_lb_common::addr::to_bytes(new_addr);
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            match end {
                End::Source => (*ip).src_addr = bytes,
                End::Destination => (*ip).dst_addr = bytes,
            }
        }
    } else {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, packet.l3_offset).ok_or(reasons::DROP_BAD_IP_HEADER)?;
        let new_v4 = new_addr[3].to_ne_bytes();
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let check = u16::from_ne_bytes((*ip).check);
            (*ip).check = checksum::update_u32(check, old_addr[3], new_addr[3]).to_ne_bytes();
            match end {
                End::Source => (*ip).src_addr = new_v4,
                End::Destination => (*ip).dst_addr = new_v4,
            }
        }
    }
    // The pseudo-header covers the addresses, so the L4 checksum changes with them and the port.
    let update = |check: u16| -> u16 {
        let c = checksum::update_addr(check, old_addr, new_addr);
        checksum::update_u16(c, old_port, new_port)
    };
    if flow.proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, packet.l4_offset).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            (*tcp).check = update(u16::from_ne_bytes((*tcp).check)).to_ne_bytes();
            match end {
                End::Source => (*tcp).source = new_port.to_ne_bytes(),
                End::Destination => (*tcp).dest = new_port.to_ne_bytes(),
            }
        }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, packet.l4_offset).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            let original = u16::from_ne_bytes((*udp).check);
            (*udp).check = checksum::udp_finish(original, update(original)).to_ne_bytes();
            match end {
                End::Source => (*udp).src = new_port.to_ne_bytes(),
                End::Destination => (*udp).dst = new_port.to_ne_bytes(),
            }
        }
    }
    Ok(())
}
