//! Stage 5: find the next hop in the kernel's FIB and send the frame there: `XDP_TX` when it leaves
//! through the interface it came in on, `XDP_REDIRECT` through the `TX_PORTS` devmap otherwise.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{self, bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use network_types::eth::EthHdr;
use xdp_lb_common::{
    addr::Addr,
    reasons::{self, Reason},
};

use crate::{maps, parse::{ptr_at, Packet}};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Addresses already translated: if the FIB cannot finish the job, the kernel can.
    Nat,
    /// Only the MAC changes: the destination is still the VIP, which the kernel cannot route.
    Dsr,
}

#[inline(always)]
pub fn to_next_hop(ctx: &XdpContext, packet: &Packet, next_hop: &Addr, mode: Mode) -> Result<u32, Reason> {
    // SAFETY: a zeroed bpf_fib_lookup is a valid (empty) request; the fields we use are set below.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    let flow = &packet.flow;
    fib.l4_protocol = flow.proto;
    fib.sport = flow.sport;
    fib.dport = flow.dport;
    fib.__bindgen_anon_1.tot_len = packet.ip_len;
    fib.ifindex = ctx.ingress_ifindex() as u32;
    if packet.ipv6 {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = flow.src;
        fib.__bindgen_anon_4.ipv6_dst = *next_hop;
    } else {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = flow.src[3];
        fib.__bindgen_anon_4.ipv4_dst = next_hop[3];
    }
    // SAFETY: fib is a properly sized, initialised bpf_fib_lookup on our stack.
    let rc = unsafe {
        bpf_fib_lookup(ctx.ctx as *mut _, &mut fib, size_of::<FibParams>() as i32, 0)
    } as u32;
    match rc {
        bindings::BPF_FIB_LKUP_RET_SUCCESS => transmit(ctx, &fib),
        bindings::BPF_FIB_LKUP_RET_NO_NEIGH => Err(match mode {
            Mode::Nat => reasons::PASS_FIB_NO_NEIGH,
            Mode::Dsr => reasons::DROP_DSR_NO_NEIGH,
        }),
        bindings::BPF_FIB_LKUP_RET_BLACKHOLE
        | bindings::BPF_FIB_LKUP_RET_UNREACHABLE
        | bindings::BPF_FIB_LKUP_RET_PROHIBIT => Err(reasons::DROP_FIB_UNREACHABLE),
        _ => Err(reasons::PASS_FIB_OTHER),
    }
}

#[inline(always)]
fn transmit(ctx: &XdpContext, fib: &FibParams) -> Result<u32, Reason> {
    let same_port = fib.ifindex == ctx.ingress_ifindex() as u32;
    // Check before touching the MACs: a frame handed to the kernel must keep addresses it accepts.
    if !same_port && !maps::is_tx_port(fib.ifindex) {
        return Err(reasons::PASS_NO_TX_PORT);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(reasons::DROP_SHORT_FRAME)?;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*eth).dst_addr = fib.dmac;
        (*eth).src_addr = fib.smac;
    }
    if same_port {
        return Ok(xdp_action::XDP_TX);
    }
    // Only fails if the control plane removed the port between the check above and here.
    maps::redirect(fib.ifindex).map_err(|_| reasons::PASS_NO_TX_PORT)
}
