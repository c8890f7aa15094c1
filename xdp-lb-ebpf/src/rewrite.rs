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

use crate::{
    parse::{ptr_at, Packet},
    wire,
};

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
        // SAFETY: bounds checked by ptr_at; 2-byte aligned (see wire.rs).
        unsafe {
            match end {
                End::Source => wire::store_addr((*ip).src_addr.as_mut_ptr(), new_addr),
                End::Destination => wire::store_addr((*ip).dst_addr.as_mut_ptr(), new_addr),
            }
        }
    } else {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, packet.l3_offset).ok_or(reasons::DROP_BAD_IP_HEADER)?;
        // SAFETY: bounds checked by ptr_at; 2-byte aligned (see wire.rs).
        unsafe {
            let check = (*ip).check.as_mut_ptr();
            wire::store16(check, checksum::update_u32(wire::load16(check), old_addr[3], new_addr[3]));
            match end {
                End::Source => wire::store32((*ip).src_addr.as_mut_ptr(), new_addr[3]),
                End::Destination => wire::store32((*ip).dst_addr.as_mut_ptr(), new_addr[3]),
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
        // SAFETY: bounds checked by ptr_at; 2-byte aligned.
        unsafe {
            let check = (*tcp).check.as_mut_ptr();
            wire::store16(check, update(wire::load16(check)));
            match end {
                End::Source => wire::store16((*tcp).source.as_mut_ptr(), new_port),
                End::Destination => wire::store16((*tcp).dest.as_mut_ptr(), new_port),
            }
        }
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, packet.l4_offset).ok_or(reasons::DROP_TRUNCATED_L4)?;
        // SAFETY: bounds checked by ptr_at; 2-byte aligned.
        unsafe {
            let check = (*udp).check.as_mut_ptr();
            let original = wire::load16(check);
            wire::store16(check, checksum::udp_finish(original, update(original)));
            match end {
                End::Source => wire::store16((*udp).src.as_mut_ptr(), new_port),
                End::Destination => wire::store16((*udp).dst.as_mut_ptr(), new_port),
            }
        }
    }
    Ok(())
}
