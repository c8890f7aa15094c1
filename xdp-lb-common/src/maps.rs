//! Map keys and values shared with the XDP program. Every type is `#[repr(C)]`, `Copy`, made of
//! fixed-width integers with explicit padding, and its size is asserted at compile time so both sides
//! agree byte for byte. Byte order is noted per field.

use core::mem::size_of;

use crate::addr::Addr;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Map names, as declared in the XDP program and opened by the control plane.
pub mod names {
    pub const SERVICES: &str = "SERVICES";
    pub const BACKENDS: &str = "BACKENDS";
    pub const MAGLEV_RING: &str = "MAGLEV_RING";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const NAT_REVERSE: &str = "NAT_REVERSE";
    pub const NAT_BACKENDS: &str = "NAT_BACKENDS";
    pub const TX_PORTS: &str = "TX_PORTS";
    pub const SERVICE_STATS: &str = "SERVICE_STATS";
    pub const RR_COUNTERS: &str = "RR_COUNTERS";
    pub const ACTIVE_FLOWS: &str = "ACTIVE_FLOWS";
    pub const NEXT_HOPS: &str = "NEXT_HOPS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const REASONS: &str = "REASONS";
}

/// Compiled-in map sizes; the control plane may override the large ones at load time.
pub mod defaults {
    pub const MAX_SERVICES: u32 = 256;
    pub const MAX_BACKENDS: u32 = 4096;
    /// Cells shared by all Maglev rings, each service using two rings while its table is replaced.
    pub const MAGLEV_CELLS: u32 = 1 << 22;
    /// Default ring size per service: prime, ~100 × the backends a service usually has.
    pub const RING_SIZE: u32 = 16_381;
    pub const CONNTRACK_ENTRIES: u32 = 1 << 20;
    pub const TX_PORTS: u32 = 64;
    /// `NAT_BACKENDS`: twice the backend ids, so entries of removed backends age out (LRU) long
    /// before a live backend's would.
    pub const NAT_BACKENDS: u32 = 2 * MAX_BACKENDS;
}

/// `map_flags` of the connection tables (`CONNTRACK`, `NAT_REVERSE`): `BPF_F_NO_COMMON_LRU`, one LRU
/// list per CPU as Katran's per-CPU tables, so CPUs do not contend on one list's lock when they
/// insert or evict. Each CPU then evicts only from its own share of the entries (max / CPUs).
pub const CONNTRACK_MAP_FLAGS: u32 = 1 << 1;

/// `Service::flags`: forward by rewriting only the destination MAC (L2 direct server return).
pub const SERVICE_FLAG_DSR: u32 = 1 << 0;
/// `Service::flags` bits 8..16 hold how a new flow picks its backend from the service's ring.
pub const SCHEDULER_SHIFT: u32 = 8;
pub const SCHEDULER_MASK: u32 = 0xff << SCHEDULER_SHIFT;
/// Ring slot = hash of the 5-tuple (Maglev). Also used for least-response-time, whose ring the
/// control plane builds from latency-derived weights.
pub const SCHED_MAGLEV: u32 = 0;
/// Ring slot = hash of the client address alone (session stickiness without shared state).
pub const SCHED_IP_HASH: u32 = 1;
/// Ring slot = a per-service counter: the ring is a (weighted) round-robin sequence.
pub const SCHED_SEQUENCE: u32 = 2;
/// The ring lists the candidates (at most [`LEAST_CONN_MAX`]); the one with the fewest active flows wins.
pub const SCHED_LEAST_CONN: u32 = 3;
/// Candidates a least-connections service may have (the XDP program scans them per new flow).
pub const LEAST_CONN_MAX: u32 = 32;

/// `Backend::flags`: failed its health checks; established flows are moved to other backends.
pub const BACKEND_FLAG_DOWN: u16 = 1 << 0;

/// `Conn::flags`: a FIN or RST was seen, so the flow no longer counts as active.
pub const CONN_FLAG_CLOSED: u32 = 1 << 0;
/// `Conn::flags`: the flow was counted in `ACTIVE_FLOWS` (NAT TCP flows only).
pub const CONN_FLAG_COUNTED: u32 = 1 << 1;
/// `Conn::flags`: the client sent a segment without SYN (its handshake ACK or later), so a SYN on
/// this entry can no longer be a retransmission of the SYN that created it.
pub const CONN_FLAG_ACKED: u32 = 1 << 2;

#[inline(always)]
pub const fn scheduler_of(flags: u32) -> u32 {
    (flags & SCHEDULER_MASK) >> SCHEDULER_SHIFT
}

/// Key of `SERVICES`: one virtual service.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// VIP, network order (IPv4 mapped into IPv6, see [`crate::addr`]).
    pub addr: Addr,
    /// VIP port, network order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    pub _pad: u8,
}

/// Value of `SERVICES`. Replaced as a whole by the control plane: pointing `ring_offset` at a freshly
/// written ring swaps the service's Maglev table atomically.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index into `SERVICE_STATS`.
    pub id: u32,
    /// First cell of the service's current ring in `MAGLEV_RING`.
    pub ring_offset: u32,
    /// Cells in the ring (prime); 0 when the service has no backend.
    pub ring_size: u32,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
}

/// Value of the `BACKENDS` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address, network order.
    pub addr: Addr,
    /// Backend port, network order (NAT rewrites the destination port to it).
    pub port: u16,
    /// `BACKEND_FLAG_*` bits.
    pub flags: u16,
    /// The service this backend belongs to.
    pub service_id: u32,
    /// Bumped every time the id is (re)assigned; 0 means the slot is free. Connection-table entries
    /// remember it, so a flow never follows a reused id to a different server.
    pub generation: u32,
}

/// A flow as seen in one direction: key of `CONNTRACK` (client → VIP) and `NAT_REVERSE`
/// (backend → client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Network order.
    pub src: Addr,
    /// Network order.
    pub dst: Addr,
    /// Network order.
    pub sport: u16,
    /// Network order.
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl FlowKey {
    /// The key the backend's replies to this (client → VIP) flow carry once NAT has sent it to
    /// `backend_addr`:`backend_port` (both network order): backend → client, the `NAT_REVERSE` key.
    #[inline(always)]
    pub fn reply_from(&self, backend_addr: &Addr, backend_port: u16) -> FlowKey {
        FlowKey { src: *backend_addr, dst: self.src, sport: backend_port, dport: self.sport, proto: self.proto, _pad: [0; 3] }
    }

    /// The inverse of [`FlowKey::reply_from`]: for a reply key (backend → client), the client's flow
    /// to `vip`:`vport` (network order), the `CONNTRACK` key.
    #[inline(always)]
    pub fn request_to(&self, vip: &Addr, vport: u16) -> FlowKey {
        FlowKey { src: self.dst, dst: *vip, sport: self.dport, dport: vport, proto: self.proto, _pad: [0; 3] }
    }
}

/// Value of `CONNTRACK`: the backend a flow is pinned to. What an entry means (open, closed, a
/// SYN still being retransmitted, idle too long) is decided by [`crate::conntrack`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    pub backend_id: u32,
    /// `Backend::generation` when the flow was scheduled.
    pub generation: u32,
    /// `CONN_FLAG_*` bits, changed with atomic operations.
    pub flags: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` (CLOCK_MONOTONIC_COARSE) of the flow's last client packet, kept
    /// to [`crate::conntrack::LAST_SEEN_GRANULARITY_NS`] so most packets do not write it.
    pub last_seen_ns: u64,
}

/// Value of `NAT_REVERSE`: how to translate a backend's reply back into the VIP's name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatReverse {
    /// Network order.
    pub vip: Addr,
    /// Network order.
    pub vport: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
    pub _pad2: u32,
    /// The way back to the client, cached per flow like `NEXT_HOPS` caches the way to a backend
    /// (`generation` unused, 0), so replies skip `bpf_fib_lookup`. Empty (`ifindex` 0) when inserted.
    pub client_hop: NextHop,
}

/// Value of `NAT_BACKENDS`, keyed by a NAT backend's address, port and protocol (a [`ServiceKey`]
/// holding the backend's, network order): the service flow that backend was last given. It lets a
/// reply whose `NAT_REVERSE` entry was evicted find its flow's `CONNTRACK` entry (the key is
/// [`FlowKey::request_to`] the VIP) and restore the reply entry, so the forward path need not check
/// the reply entry on every packet. Written by the data plane when it places a new NAT flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NatBackend {
    /// Network order.
    pub vip: Addr,
    /// Network order.
    pub vport: u16,
    pub _pad: u16,
    pub service_id: u32,
    pub backend_id: u32,
}

/// Value of the per-CPU `NEXT_HOPS` array, indexed by backend id: the FIB's answer for the way to
/// that backend, kept briefly so established flows skip `bpf_fib_lookup` (its most expensive step).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// Egress interface; 0 = empty.
    pub ifindex: u32,
    /// `Backend::generation` of the backend it was looked up for (ids are reused).
    pub generation: u32,
    /// `bpf_ktime_get_coarse_ns()` after which the entry must be looked up again.
    pub expires_ns: u64,
    /// Largest IP packet (host order) the FIB accepted on this path: bigger ones ask the FIB again,
    /// which checks the MTU.
    pub max_ip_len: u16,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Value of the per-CPU `SERVICE_STATS` and `BACKEND_STATS` arrays (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    /// TCP SYNs forwarded to the backend (NAT and DSR).
    pub syns: u64,
    /// SYN-ACKs the backend answered with (NAT only: DSR replies bypass the balancer).
    pub syn_acks: u64,
    /// RSTs the backend sent (NAT only).
    pub resets: u64,
}

impl Counters {
    pub fn add(&mut self, other: &Counters) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.new_flows += other.new_flows;
        self.syns += other.syns;
        self.syn_acks += other.syn_acks;
        self.resets += other.resets;
    }
}

const _: () = assert!(size_of::<ServiceKey>() == 20);
const _: () = assert!(size_of::<Service>() == 16);
const _: () = assert!(size_of::<Backend>() == 28);
const _: () = assert!(size_of::<FlowKey>() == 40);
const _: () = assert!(size_of::<Conn>() == 24);
const _: () = assert!(size_of::<NatReverse>() == 64);
const _: () = assert!(size_of::<NatBackend>() == 28);
const _: () = assert!(size_of::<Counters>() == 48);
const _: () = assert!(size_of::<NextHop>() == 32);

#[cfg(test)]
mod tests;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), made only of integers, with every padding byte an explicit field.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Conn {}
    unsafe impl aya::Pod for super::NatReverse {}
    unsafe impl aya::Pod for super::NatBackend {}
    unsafe impl aya::Pod for super::Counters {}
    unsafe impl aya::Pod for super::NextHop {}
}
