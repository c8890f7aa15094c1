//! The xdp-lb data plane: one XDP program, attached to every interface that faces clients or backends.
//!
//! Stages, each a function of its own: parse (`xdp_lb_common::packet`, shared with the host's tests
//! and fuzzers) → classify (service lookup, or NAT reply lookup) → [`schedule`] (connection table,
//! then Maglev) → rewrite (`xdp_lb_common::packet`) → [`forward`] (FIB + devmap).
//! Every packet that is not forwarded is counted under one reason (`xdp_lb_common::reasons`).
#![no_std]
#![no_main]
// Atomic read-modify-write on the BPF target is only reachable through the intrinsics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod forward;
mod frame;
mod maps;
mod schedule;

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, macros::xdp, programs::XdpContext};
use frame::XdpFrame;
use xdp_lb_common::{
    maps::{FlowKey, ServiceKey, SERVICE_FLAG_DSR},
    packet::{self, End, Frame, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    reasons::{self, Reason},
};


#[xdp]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    match balance(&ctx) {
        Ok(action) => action,
        Err(reason) => not_forwarded(reason),
    }
}

/// The benchmarks' reference: the least an XDP forwarder can do (swap the MACs and send the frame
/// back out), so `cargo xtask bench` can report xdp-lb's per-packet cost as a ratio to it. Never
/// attached by the daemon.
#[xdp]
pub fn xdp_tx_reference(ctx: XdpContext) -> u32 {
    let mut frame = XdpFrame::new(&ctx);
    let Some(eth) = frame.window(0, 12) else { return xdp_action::XDP_DROP };
    // SAFETY: six 16-bit words inside the checked 12 bytes.
    unsafe {
        for at in [0, 2, 4] {
            let dst = frame.load16(eth, at);
            frame.store16(eth, at, frame.load16(eth, at + 6));
            frame.store16(eth, at + 6, dst);
        }
    }
    xdp_action::XDP_TX
}

/// Counts why a packet was not forwarded and returns the matching verdict.
#[inline(always)]
fn not_forwarded(reason: Reason) -> u32 {
    maps::count_reason(reason);
    if reasons::is_pass(reason) {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<u32, Reason> {
    let mut frame = XdpFrame::new(ctx);
    let packet = packet::parse(&frame)?;
    let flow = packet.flow;
    let service_key = ServiceKey { addr: flow.dst, port: flow.dport, proto: flow.proto, _pad: 0 };
    if let Some(service) = maps::service(&service_key) {
        if packet.vlan {
            return Err(reasons::PASS_VLAN);
        }
        let chosen = match schedule::schedule(&packet, &service) {
            Ok(chosen) => chosen,
            Err(reasons::DROP_NO_BACKEND) => return reject(ctx, &mut frame, &packet),
            Err(reason) => return Err(reason),
        };
        let syn = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let tally = maps::Tally { bytes: packet.len, new_flow: chosen.new_flow, syn, syn_ack: false, reset: false };
        maps::count_forward(service.id, chosen.id, &tally);
        let hop = forward::Cached { hop: maps::next_hop(chosen.id), generation: chosen.backend.generation, now: chosen.now };
        if service.flags & SERVICE_FLAG_DSR != 0 {
            return forward::to_next_hop(ctx, &packet, &chosen.backend.addr, forward::Mode::Dsr, hop);
        }
        packet::translate(&mut frame, &packet, End::Destination, &chosen.backend.addr, chosen.backend.port)?;
        return forward::to_next_hop(ctx, &packet, &chosen.backend.addr, forward::Mode::Nat, hop);
    }
    if let Some(entry) = maps::nat_reverse(&flow) {
        if packet.vlan {
            // Like VIP traffic in a tag: the kernel's VLAN device owns the tagged path.
            return Err(reasons::PASS_VLAN);
        }
        // SAFETY: pointer from a map lookup in this run; the fields used are copied out first.
        let (vip, vport, service_id, backend_id) =
            unsafe { ((*entry).vip, (*entry).vport, (*entry).service_id, (*entry).backend_id) };
        let flags = packet.tcp_flags;
        let tally = maps::Tally {
            bytes: packet.len,
            new_flow: false,
            syn: false,
            syn_ack: flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK,
            reset: flags & TCP_RST != 0,
        };
        maps::count_forward(service_id, backend_id, &tally);
        if flags & (TCP_FIN | TCP_RST) != 0 {
            let forward = FlowKey { src: flow.dst, dst: vip, sport: flow.dport, dport: vport, proto: flow.proto, _pad: [0; 3] };
            if let Some(conn) = maps::conn(&forward) {
                // Only the backend that holds the flow closes it: after its 5-tuple was reused for a
                // connection to another backend, a late RST from the old one must not end the new.
                // SAFETY: pointer from a map lookup in this run.
                if unsafe { (*conn).backend_id } == backend_id {
                    schedule::track_close(conn, backend_id, flags);
                }
            }
        }
        packet::translate(&mut frame, &packet, End::Source, &vip, vport)?;
        // SAFETY: as above; the cache lives inside the flow's own entry.
        let hop = forward::Cached { hop: Some(unsafe { core::ptr::addr_of_mut!((*entry).client_hop) }), generation: 0, now: 0 };
        return forward::to_next_hop(ctx, &packet, &flow.dst, forward::Mode::Nat, hop);
    }
    Err(reasons::PASS_NOT_VIP)
}

/// Stage 3's failure for a service with no backend: answer TCP with a RST (sent back the way it
/// came) so the client fails at once; what cannot be answered (UDP, a RST, IPv4 options) is
/// dropped as `drop_no_backend`.
#[inline(always)]
fn reject(ctx: &XdpContext, frame: &mut XdpFrame, packet: &packet::Packet) -> Result<u32, Reason> {
    let len = packet::tcp_reset(frame, packet)?;
    let delta = len as i32 - frame.len() as i32;
    // SAFETY: shrinking the frame to the RST's headers; no packet pointer is used after this.
    if delta != 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
        return Err(reasons::DROP_NO_BACKEND);
    }
    maps::count_reason(reasons::REJECT_NO_BACKEND);
    // Back out of the interface it came in on, through the devmap rather than XDP_TX: a veth wakes
    // its peer for XDP_TX'd frames only if the peer runs an XDP program itself (a container's end
    // usually does not), while a redirect always flushes. Interfaces we are attached to are all in
    // TX_PORTS; XDP_TX is the fallback.
    Ok(maps::redirect(ctx.ingress_ifindex() as u32).unwrap_or(xdp_action::XDP_TX))
}

/// A flow key for the reply direction of `flow` once NAT has sent it to `backend`.
#[inline(always)]
pub(crate) fn reply_key(flow: &FlowKey, backend_addr: &[u32; 4], backend_port: u16) -> FlowKey {
    FlowKey {
        src: *backend_addr,
        dst: flow.src,
        sport: backend_port,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
