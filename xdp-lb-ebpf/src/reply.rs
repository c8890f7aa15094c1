//! The NAT reply path (stages 4 and 5 for a packet classify found in `NAT_REVERSE`): a backend's
//! reply is counted, closes its connection-table entry on FIN or RST, gets the VIP back as its source
//! and goes to the client through the next hop cached in its own entry.

use aya_ebpf::programs::XdpContext;
use xdp_lb_common::{
    addr::Addr,
    maps::{FlowKey, NatReverse, NextHop, ServiceKey},
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

/// A backend's reply whose `NAT_REVERSE` entry is gone (the tables evict independently): its flow is
/// found again through the backend's `NAT_BACKENDS` entry (which VIP it serves) and the flow's
/// `CONNTRACK` entry, and its reply entry is written anew. Only while that connection entry still
/// sends the flow to this very backend (id, generation, address and port), so a packet from a
/// backend to anyone else, or after its flow moved, is left to the kernel.
#[inline(always)]
pub fn restore(flow: &FlowKey) -> Option<ReplyRef> {
    let source = ServiceKey { addr: flow.src, port: flow.sport, proto: flow.proto, _pad: 0 };
    let nat = maps::nat_backend(&source)?;
    let conn = maps::conn(&flow.request_to(&nat.vip, nat.vport))?.get();
    let backend = maps::backend(conn.backend_id)?;
    if conn.backend_id != nat.backend_id
        || backend.generation != conn.generation
        || backend.service_id != nat.service_id
        || backend.port != flow.sport
        || !same_addr(&backend.addr, &flow.src)
    {
        return None;
    }
    let entry = NatReverse {
        vip: nat.vip,
        vport: nat.vport,
        _pad: 0,
        service_id: nat.service_id,
        backend_id: nat.backend_id,
        _pad2: 0,
        client_hop: NextHop::default(),
    };
    maps::remember_nat_reverse(flow, &entry);
    maps::nat_reverse(flow)
}

/// Word by word: an array comparison may become a `bcmp` call, which BPF has not.
#[inline(always)]
pub fn same_addr(a: &Addr, b: &Addr) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}
