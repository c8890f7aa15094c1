//! The xdp-lb data plane: one XDP program, attached to every interface that faces clients or backends.
//!
//! Five stages, each in a module of its own, composed in [`balance`]:
//! 1. parse (`xdp_lb_common::packet`, shared with the host's tests and fuzzers);
//! 2. [`classify`]: a service's packet, a NAT flow's reply (the [`reply`] path), or the kernel's;
//! 3. [`schedule`]: connection table, then the service's scheduler over its ring ([`reject`] when
//!    there is no backend);
//! 4. rewrite (`xdp_lb_common::packet`): NAT translation, nothing for DSR;
//! 5. [`forward`]: next hop (cached, else the FIB) and out through `XDP_TX` or the devmap.
//!
//! Every packet that is not forwarded is counted under one reason (`xdp_lb_common::reasons`).
#![no_std]
#![no_main]
// Atomic read-modify-write on the BPF target is only reachable through the intrinsics.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod classify;
mod forward;
mod frame;
mod generator;
mod maps;
mod reject;
mod reply;
mod schedule;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use classify::Class;
use frame::XdpFrame;
use xdp_lb_common::{
    maps::{Service, SERVICE_FLAG_DSR},
    packet::{self, End, Frame, Packet, TCP_ACK, TCP_SYN},
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

/// The benchmarks' receiving end: drops every frame on arrival, so each program's output meets the
/// same cheap end and backends never answer (their replies would mix into the measured program's
/// average). Never attached by the daemon.
#[xdp]
pub fn xdp_drop_sink(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
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
    match classify::classify(&packet)? {
        Class::Service(service) => to_backend(ctx, &mut frame, &packet, &service),
        Class::Reply(entry) => reply::to_client(ctx, &mut frame, &packet, entry),
    }
}

/// Stages 3 to 5 for a client's packet to a service.
#[inline(always)]
fn to_backend(ctx: &XdpContext, frame: &mut XdpFrame, packet: &Packet, service: &Service) -> Result<u32, Reason> {
    let chosen = match schedule::schedule(packet, service) {
        Ok(chosen) => chosen,
        Err(reasons::DROP_NO_BACKEND) => return reject::reject(ctx, frame, packet),
        Err(reason) => return Err(reason),
    };
    // A SYN from the backend's own address is no evidence for the passive checks: its kernel drops
    // it as a martian, so it goes unanswered whatever the backend's health.
    let syn = packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && !reply::same_addr(&packet.flow.src, &chosen.backend.addr);
    let tally = maps::Tally { bytes: packet.len, new_flow: chosen.new_flow, syn, syn_ack: false, reset: false };
    maps::count_forward(service.id, chosen.id, &tally);
    let hop = forward::Cached { hop: maps::next_hop(chosen.id), generation: chosen.backend.generation, now: chosen.now };
    let addr = &chosen.backend.addr;
    if service.flags & SERVICE_FLAG_DSR != 0 {
        return forward::to_next_hop(ctx, packet, addr, forward::Mode::Dsr, hop);
    }
    packet::translate(frame, packet, End::Destination, addr, chosen.backend.port)?;
    forward::to_next_hop(ctx, packet, addr, forward::Mode::Nat, hop)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
