//! Stage 3's failure for a service with no backend: answer TCP with a RST (sent back the way it
//! came) so the client fails at once; what cannot be answered (UDP, a RST, IPv4 options) is
//! dropped as `drop_no_backend`.

use aya_ebpf::{bindings::xdp_action, helpers::bpf_xdp_adjust_tail, programs::XdpContext};
use xdp_lb_common::{
    packet::{self, Frame, Packet},
    reasons::{self, Reason},
};

use crate::{frame::XdpFrame, maps};

#[inline(always)]
pub fn reject(ctx: &XdpContext, frame: &mut XdpFrame, packet: &Packet) -> Result<u32, Reason> {
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
