//! The NAT reply path (stages 4 and 5 for a packet classify found in `NAT_REVERSE`): a backend's
//! reply is counted, closes its connection-table entry on FIN or RST, gets the VIP back as its source
//! and goes to the client through the next hop cached in its own entry.

use aya_ebpf::programs::XdpContext;
use xdp_lb_common::{
    packet::{self, End, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    reasons::Reason,
};

use crate::{
    forward,
    frame::XdpFrame,
    maps::{self, ReplyRef},
    schedule,
};

#[inline(always)]
pub fn to_client(ctx: &XdpContext, frame: &mut XdpFrame, packet: &Packet, entry: ReplyRef) -> Result<u32, Reason> {
    let flow = &packet.flow;
    let target = entry.target();
    let flags = packet.tcp_flags;
    let tally = maps::Tally {
        bytes: packet.len,
        new_flow: false,
        syn: false,
        syn_ack: flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK,
        reset: flags & TCP_RST != 0,
    };
    maps::count_forward(target.service_id, target.backend_id, &tally);
    if flags & (TCP_FIN | TCP_RST) != 0 {
        if let Some(conn) = maps::conn(&flow.request_to(&target.vip, target.vport)) {
            // Only the backend that holds the flow closes it: after its 5-tuple was reused for a
            // connection to another backend, a late RST from the old one must not end the new.
            if conn.backend_id() == target.backend_id {
                schedule::track_close(conn, target.backend_id, flags);
            }
        }
    }
    packet::translate(frame, packet, End::Source, &target.vip, target.vport)?;
    let hop = forward::Cached { hop: Some(entry.client_hop()), generation: 0, now: 0 };
    forward::to_next_hop(ctx, packet, &flow.dst, forward::Mode::Nat, hop)
}
