//! Stage 5: find the next hop in the kernel's FIB and send the frame there: `XDP_TX` when it leaves
//! through the interface it came in on, `XDP_REDIRECT` through the `TX_PORTS` devmap otherwise.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{self, bpf_fib_lookup as FibParams, xdp_action},
    helpers::bpf_fib_lookup,
    programs::XdpContext,
};
use xdp_lb_common::{
    addr::Addr,
    maps::NextHop,
    packet::{self, Packet},
    reasons::{self, Reason},
};

use crate::{
    frame::XdpFrame,
    maps::{self, HopSlot},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Addresses already translated: if the FIB cannot finish the job, the kernel can.
    Nat,
    /// Only the MAC changes: the destination is still the VIP, which the kernel cannot route.
    Dsr,
}

/// How long a cached next hop (a backend's or a NAT client's) is reused before the FIB is asked
/// again: route and neighbour changes take effect within this time.
const NEXT_HOP_TTL_NS: u64 = 500_000_000;

/// A next-hop cache slot for this packet's destination: a backend's (per CPU, in `NEXT_HOPS`) or a
/// client's (per NAT flow, in its `NAT_REVERSE` entry).
pub struct Cached {
    pub hop: Option<HopSlot>,
    /// The backend's generation (ids are reused); 0 for a client.
    pub generation: u32,
    /// The coarse clock if this run has read it already (the connection table did), else 0.
    pub now: u64,
}

/// Sends the frame toward `next_hop`. The FIB's answer is cached in `cached` for
/// [`NEXT_HOP_TTL_NS`], so established flows skip the lookup.
#[inline(always)]
pub fn to_next_hop(ctx: &XdpContext, packet: &Packet, next_hop: &Addr, mode: Mode, cached: Cached) -> Result<u32, Reason> {
    let Cached { hop, generation, now } = cached;
    // The next-hop caches expire by the coarse clock (see `maps::now`).
    let now = if hop.is_some() && now == 0 { maps::now() } else { now };
    if let Some(hop) = &hop {
        let h = hop.get();
        if h.ifindex != 0 && h.generation == generation && now < h.expires_ns && packet.ip_len <= h.max_ip_len {
            return send(ctx, h.ifindex, &h.smac, &h.dmac);
        }
    }
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
        bindings::BPF_FIB_LKUP_RET_SUCCESS => {
            if let Some(hop) = hop {
                let old = hop.get();
                let same = old.ifindex == fib.ifindex && old.generation == generation && now < old.expires_ns;
                let max_ip_len = if same && old.max_ip_len > packet.ip_len { old.max_ip_len } else { packet.ip_len };
                hop.set(NextHop {
                    ifindex: fib.ifindex,
                    generation,
                    expires_ns: now + NEXT_HOP_TTL_NS,
                    max_ip_len,
                    smac: fib.smac,
                    dmac: fib.dmac,
                    _pad: [0; 2],
                });
            }
            send(ctx, fib.ifindex, &fib.smac, &fib.dmac)
        }
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
fn send(ctx: &XdpContext, ifindex: u32, smac: &[u8; 6], dmac: &[u8; 6]) -> Result<u32, Reason> {
    let action = if ifindex == ctx.ingress_ifindex() as u32 {
        xdp_action::XDP_TX
    } else {
        // The devmap lookup doubles as the check that the port is ours. It only records where the
        // frame goes (the kernel sends it after the program returns), so the MACs can change after
        // it — and a frame handed to the kernel keeps the addresses it accepts.
        maps::redirect(ifindex).map_err(|_| reasons::PASS_NO_TX_PORT)?
    };
    packet::set_macs(&mut XdpFrame::new(ctx), dmac, smac)?;
    Ok(action)
}
