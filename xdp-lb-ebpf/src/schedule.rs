//! Stage 3, schedule: pick the backend. An established flow keeps the backend the connection table remembers
//! (while that backend is still in the service and up); a new flow is placed by the service's
//! scheduler over its ring.

use xdp_lb_common::{
    conntrack, hash,
    maps::{
        self as m, scheduler_of, Backend, Conn, FlowKey, NatBackend, NatReverse, NextHop, Service, ServiceKey,
        BACKEND_FLAG_DOWN, CONN_FLAG_ACKED, CONN_FLAG_CLOSED, CONN_FLAG_COUNTED, LEAST_CONN_MAX, PROTO_TCP, SERVICE_FLAG_DSR,
    },
    packet::{self, Packet, TCP_FIN, TCP_RST, TCP_SYN},
    reasons::{self, Reason},
};

use crate::{
    maps::{self, ConnRef},
    reply::same_addr,
};

pub struct Chosen {
    pub id: u32,
    pub backend: Backend,
    pub new_flow: bool,
    /// The coarse clock as read for the connection table (forwarding reuses it).
    pub now: u64,
}

#[inline(always)]
pub fn schedule(packet: &Packet, service: &Service) -> Result<Chosen, Reason> {
    let flow = &packet.flow;
    let now = maps::now();
    // An entry this packet does not follow: its flow is over (or its backend failed), and it may
    // still be counted as active on its old backend.
    let mut replaced: Option<ConnRef> = None;
    if let Some(conn) = maps::conn(flow) {
        let Conn { backend_id, generation, flags, last_seen_ns: last_seen, .. } = conn.get();
        if let Some(backend) = maps::backend(backend_id) {
            if backend.generation == generation && backend.service_id == service.id {
                if !conntrack::follows_entry(flags, last_seen, packet.tcp_flags, now) {
                    // A new connection on a reused 5-tuple: the scheduler places it.
                    replaced = Some(conn);
                } else if backend.flags & BACKEND_FLAG_DOWN == 0 {
                    track_close(conn, backend_id, packet.tcp_flags);
                    touch(conn, flags, last_seen, packet.tcp_flags, now);
                    // No look at the flow's reply entry here: the two tables evict independently,
                    // but a reply that lost its entry finds the flow again (`reply::restore`), so
                    // an established NAT packet costs one table lookup, not two.
                    return Ok(Chosen { id: backend_id, backend, new_flow: false, now });
                } else {
                    // Its backend failed: move the flow now rather than let the client wait on a dead server.
                    replaced = Some(conn);
                }
            }
        }
    }
    // Only a new flow's source is judged: no flow from such a source is ever established, so the
    // established path above costs nothing more.
    if packet::martian_source(packet) {
        return Err(reasons::DROP_MARTIAN_SOURCE);
    }
    let mut chosen = place_new_flow(flow, service)?;
    chosen.now = now;
    if let Some(old) = replaced {
        let old_id = old.backend_id();
        if old.set_flags(CONN_FLAG_CLOSED) & (CONN_FLAG_CLOSED | CONN_FLAG_COUNTED) == CONN_FLAG_COUNTED {
            maps::add_active_flows(old_id, conntrack::ACTIVE_CLOSE);
        }
    }
    let flags = conntrack::initial_flags(service.flags & SERVICE_FLAG_DSR == 0 && flow.proto == PROTO_TCP, packet.tcp_flags);
    maps::remember_conn(
        flow,
        &Conn { backend_id: chosen.id, generation: chosen.backend.generation, flags, _pad: 0, last_seen_ns: now },
    );
    if flags & CONN_FLAG_COUNTED != 0 {
        maps::add_active_flows(chosen.id, conntrack::ACTIVE_OPEN);
    }
    if service.flags & SERVICE_FLAG_DSR == 0 {
        let reply = flow.reply_from(&chosen.backend.addr, chosen.backend.port);
        remember_reply(flow, service, chosen.id, &reply);
        remember_backend(flow, service, chosen.id, &chosen.backend);
    }
    Ok(chosen)
}

/// Keeps the entry's last-seen time (to the granularity the daemon's ageing needs) and marks it
/// past its handshake at the client's first segment without SYN; plain reads first, so most packets
/// write nothing.
#[inline(always)]
fn touch(conn: ConnRef, flags: u32, last_seen: u64, tcp_flags: u8, now: u64) {
    if conntrack::needs_touch(last_seen, now) {
        conn.set_last_seen(now);
    }
    if flags & CONN_FLAG_ACKED == 0 && tcp_flags & TCP_SYN == 0 {
        conn.set_flags(CONN_FLAG_ACKED);
    }
}

/// Records how to translate the backend's replies to `flow` back into the VIP's name.
#[inline(always)]
fn remember_reply(flow: &FlowKey, service: &Service, backend_id: u32, reply: &FlowKey) {
    maps::remember_nat_reverse(
        reply,
        &NatReverse {
            vip: flow.dst,
            vport: flow.dport,
            _pad: 0,
            service_id: service.id,
            backend_id,
            _pad2: 0,
            client_hop: NextHop::default(),
        },
    );
}

/// Records which service flow `backend` was last given (`NAT_BACKENDS`), so its replies can find
/// their flow after an eviction; written only when it changes (most new flows change nothing).
#[inline(always)]
fn remember_backend(flow: &FlowKey, service: &Service, backend_id: u32, backend: &Backend) {
    let key = ServiceKey { addr: backend.addr, port: backend.port, proto: flow.proto, _pad: 0 };
    let value = NatBackend { vip: flow.dst, vport: flow.dport, _pad: 0, service_id: service.id, backend_id };
    let stale = match maps::nat_backend(&key) {
        Some(old) => {
            old.backend_id != backend_id || old.service_id != service.id || old.vport != flow.dport || !same_addr(&old.vip, &flow.dst)
        }
        None => true,
    };
    if stale {
        maps::remember_nat_backend(&key, &value);
    }
}

/// Keeps `ACTIVE_FLOWS` honest for a counted flow: the first FIN or RST closes it. (A SYN never
/// reopens a closed entry: it is a new connection, placed by the scheduler.)
#[inline(always)]
pub fn track_close(conn: ConnRef, backend_id: u32, tcp_flags: u8) {
    if tcp_flags & (TCP_FIN | TCP_RST) != 0
        && conn.set_flags(CONN_FLAG_CLOSED) & (CONN_FLAG_CLOSED | CONN_FLAG_COUNTED) == CONN_FLAG_COUNTED
    {
        maps::add_active_flows(backend_id, conntrack::ACTIVE_CLOSE);
    }
}

/// Cells past a backend marked down that a new flow tries (see [`place_new_flow`]).
const DOWN_PROBES: u32 = 4;

#[inline(always)]
fn place_new_flow(flow: &FlowKey, service: &Service) -> Result<Chosen, Reason> {
    if service.ring_size == 0 {
        return Err(reasons::DROP_NO_BACKEND);
    }
    let (id, backend) = match scheduler_of(service.flags) {
        m::SCHED_LEAST_CONN => {
            let id = least_connections(flow, service)?;
            (id, maps::backend(id).ok_or(reasons::DROP_NO_BACKEND_ENTRY)?)
        }
        scheduler => {
            let position = match scheduler {
                m::SCHED_IP_HASH => hash::client_hash(&flow.src),
                m::SCHED_SEQUENCE => maps::next_in_sequence(service.id),
                _ => hash::flow_hash(flow),
            } % service.ring_size;
            // A ring never names a backend marked down, except when the daemon could not rebuild
            // it (a `ring-error` in status, issue 9 H7): then a new flow hashed to a failed
            // backend tries the next cells, a few, rather than go to a dead server. One flag test
            // per new flow; established flows never come here.
            let mut step = 0;
            loop {
                let cell = (position + step) % service.ring_size;
                let id = maps::ring_cell(service.ring_offset.wrapping_add(cell)).ok_or(reasons::DROP_NO_BACKEND_ENTRY)?;
                let backend = maps::backend(id).ok_or(reasons::DROP_NO_BACKEND_ENTRY)?;
                if backend.flags & BACKEND_FLAG_DOWN == 0 || step >= DOWN_PROBES {
                    break (id, backend);
                }
                step += 1;
            }
        }
    };
    if backend.generation == 0 || backend.service_id != service.id {
        return Err(reasons::DROP_NO_BACKEND_ENTRY);
    }
    Ok(Chosen { id, backend, new_flow: true, now: 0 })
}

/// The candidate with the fewest active flows; ties go to the lowest [`hash::tie_rank`] for this
/// flow. With ties broken by list order, sequential short connections (never more than one open)
/// would all land on the first backend. Computed for new flows only, so established flows pay
/// nothing for it.
#[inline(always)]
fn least_connections(flow: &FlowKey, service: &Service) -> Result<u32, Reason> {
    let h = hash::flow_hash(flow);
    let mut best: Option<(u32, u64)> = None;
    for i in 0..LEAST_CONN_MAX {
        if i >= service.ring_size {
            break;
        }
        let Some(id) = maps::ring_cell(service.ring_offset.wrapping_add(i)) else { break };
        // Active counts are at most i32::MAX (`conntrack::active_count`): the rank fits below them.
        let score = (conntrack::active_count(maps::active_flows(id)) << 32) | hash::tie_rank(id, h) as u64;
        if best.is_none_or(|(_, s)| score < s) {
            best = Some((id, score));
        }
    }
    best.map(|(id, _)| id).ok_or(reasons::DROP_NO_BACKEND_ENTRY)
}
