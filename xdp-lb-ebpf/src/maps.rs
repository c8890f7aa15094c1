//! The maps shared with the control plane, and the small typed accessors the stages use.
//!
//! Raw pointers into map values stay in this module: a lookup that the stages update in place returns
//! a handle ([`ConnRef`], [`ReplyRef`], [`HopSlot`]) whose methods are the only reads and writes.
//! A handle is valid for the program run that looked it up (the kernel keeps an element alive until
//! the program returns, even if another CPU deletes it), and it is never stored beyond that.

use core::intrinsics::{atomic_or, atomic_xadd, AtomicOrdering::SeqCst};

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use xdp_lb_common::{
    addr::Addr,
    maps::{defaults, Backend, CONNTRACK_MAP_FLAGS, Conn, Counters, FlowKey, NatBackend, NatReverse, NextHop, Service, ServiceKey},
    reasons::{self, Reason},
};

#[map]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(defaults::MAX_SERVICES, 0);

#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(defaults::MAX_BACKENDS, 0);

#[map]
static MAGLEV_RING: Array<u32> = Array::with_max_entries(defaults::MAGLEV_CELLS, 0);

#[map]
static CONNTRACK: LruHashMap<FlowKey, Conn> =
    LruHashMap::with_max_entries(defaults::CONNTRACK_ENTRIES, CONNTRACK_MAP_FLAGS);

#[map]
static NAT_REVERSE: LruHashMap<FlowKey, NatReverse> =
    LruHashMap::with_max_entries(defaults::CONNTRACK_ENTRIES, CONNTRACK_MAP_FLAGS);

/// A NAT backend's last service flow, to restore an evicted reply entry (see `NatBackend`).
#[map]
static NAT_BACKENDS: LruHashMap<ServiceKey, NatBackend> = LruHashMap::with_max_entries(defaults::NAT_BACKENDS, 0);

/// Interfaces the program may redirect to (the ones it is attached to), keyed by ifindex.
#[map]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(defaults::TX_PORTS, 0);

#[map]
static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(defaults::MAX_SERVICES, 0);

#[map]
static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(defaults::MAX_BACKENDS, 0);

#[map]
static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reasons::COUNT, 0);

/// Per-service position in a round-robin sequence (shared across CPUs, advanced atomically).
#[map]
static RR_COUNTERS: Array<u64> = Array::with_max_entries(defaults::MAX_SERVICES, 0);

/// Per-CPU next-hop cache per backend (see `NextHop`).
#[map]
static NEXT_HOPS: PerCpuArray<NextHop> = PerCpuArray::with_max_entries(defaults::MAX_BACKENDS, 0);

/// Per-backend open NAT TCP flows (opened minus closed), for least-connections and `status`.
#[map]
static ACTIVE_FLOWS: Array<u64> = Array::with_max_entries(defaults::MAX_BACKENDS, 0);

#[inline(always)]
pub fn service(key: &ServiceKey) -> Option<Service> {
    // SAFETY: the value is copied out before any other map call; concurrent updates replace whole
    // elements, so a copy is never torn in a way that matters (ring_offset and ring_size come together).
    unsafe { SERVICES.get(key).copied() }
}

#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    BACKENDS.get(id).copied()
}

#[inline(always)]
pub fn ring_cell(index: u32) -> Option<u32> {
    MAGLEV_RING.get(index).copied()
}

/// The connection-table entry of a flow, in place: its flags are updated atomically.
#[inline(always)]
pub fn conn(flow: &FlowKey) -> Option<ConnRef> {
    CONNTRACK.get_ptr_mut(flow).map(ConnRef)
}

#[inline(always)]
pub fn remember_conn(flow: &FlowKey, conn: &Conn) {
    // An LRU map evicts the least recently used flow when full, so insertion cannot fail for lack of
    // room; ignoring the (memory-allocation) error only costs the flow its stickiness.
    let _ = CONNTRACK.insert(flow, conn, 0);
}

/// A flow's reply entry, in place: its cached client next hop is refreshed through the handle.
#[inline(always)]
pub fn nat_reverse(flow: &FlowKey) -> Option<ReplyRef> {
    NAT_REVERSE.get_ptr_mut(flow).map(ReplyRef)
}

#[inline(always)]
pub fn nat_backend(backend: &ServiceKey) -> Option<NatBackend> {
    // SAFETY: copied out at once; entries are replaced whole.
    unsafe { NAT_BACKENDS.get(backend).copied() }
}

#[inline(always)]
pub fn remember_nat_backend(backend: &ServiceKey, value: &NatBackend) {
    let _ = NAT_BACKENDS.insert(backend, value, 0);
}

#[inline(always)]
pub fn remember_nat_reverse(reply: &FlowKey, value: &NatReverse) {
    let _ = NAT_REVERSE.insert(reply, value, 0);
}

#[inline(always)]
pub fn redirect(ifindex: u32) -> Result<u32, u32> {
    TX_PORTS.redirect(ifindex, 0)
}

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(counter) = REASONS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, and XDP programs do not preempt each other on one CPU.
        unsafe { *counter += 1 };
    }
}

/// What one forwarded packet adds to its service's and backend's counters.
pub struct Tally {
    pub bytes: u64,
    pub new_flow: bool,
    pub syn: bool,
    pub syn_ack: bool,
    pub reset: bool,
}

#[inline(always)]
pub fn count_forward(service_id: u32, backend_id: u32, tally: &Tally) {
    bump(&SERVICE_STATS, service_id, tally);
    bump(&BACKEND_STATS, backend_id, tally);
}

#[inline(always)]
fn bump(map: &PerCpuArray<Counters>, index: u32, t: &Tally) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += t.bytes;
            // Most packets are none of these: skip four read-modify-writes for them.
            if t.new_flow | t.syn | t.syn_ack | t.reset {
                (*c).new_flows += t.new_flow as u64;
                (*c).syns += t.syn as u64;
                (*c).syn_acks += t.syn_ack as u64;
                (*c).resets += t.reset as u64;
            }
        }
    }
}

/// Advances the service's round-robin position, returning the previous one.
#[inline(always)]
pub fn next_in_sequence(service_id: u32) -> u32 {
    match RR_COUNTERS.get_ptr_mut(service_id) {
        // SAFETY: the pointer is valid and aligned, and shared only through atomic operations
        // (core's Atomic* types have no read-modify-write on the BPF target; the intrinsics lower to
        // BPF atomic instructions). SeqCst, not Relaxed: LLVM 22's BPF backend encodes relaxed
        // read-modify-writes without the FETCH bit yet reads the register as the old value.
        Some(p) => unsafe { atomic_xadd::<u64, u64, { SeqCst }>(p, 1) as u32 },
        None => 0,
    }
}

#[inline(always)]
pub fn active_flows(backend_id: u32) -> u64 {
    ACTIVE_FLOWS.get(backend_id).copied().unwrap_or(0)
}

/// Adds `delta` (`conntrack::ACTIVE_OPEN` or `ACTIVE_CLOSE`) to a backend's active flows.
#[inline(always)]
pub fn add_active_flows(backend_id: u32, delta: u64) {
    if let Some(p) = ACTIVE_FLOWS.get_ptr_mut(backend_id) {
        // SAFETY: as above.
        unsafe { atomic_xadd::<u64, u64, { SeqCst }>(p, delta) };
    }
}

/// The clock connection entries are stamped with: the coarse monotonic clock (the time of the last
/// tick, 1–10 ms old), the daemon reads it as CLOCK_MONOTONIC_COARSE. A full read is ~10 % of an
/// established packet's time on a VM.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: a helper with no arguments.
    unsafe { aya_ebpf::helpers::bpf_ktime_get_coarse_ns() }
}

/// The cached next hop for backend `id`, in place (per-CPU: no other CPU writes it).
#[inline(always)]
pub fn next_hop(id: u32) -> Option<HopSlot> {
    NEXT_HOPS.get_ptr_mut(id).map(HopSlot)
}

/// A `CONNTRACK` entry, in place.
#[derive(Clone, Copy)]
pub struct ConnRef(*mut Conn);

impl ConnRef {
    /// A copy of the entry (its flags may change under it: they are updated with atomics).
    #[inline(always)]
    pub fn get(self) -> Conn {
        // SAFETY: a pointer from a lookup in this run (see the module's comment): valid and aligned.
        unsafe { *self.0 }
    }

    #[inline(always)]
    pub fn backend_id(self) -> u32 {
        // SAFETY: as in `get`.
        unsafe { (*self.0).backend_id }
    }

    /// Stamps the entry's last packet; a racing writer stores a time as recent.
    #[inline(always)]
    pub fn set_last_seen(self, now: u64) {
        // SAFETY: as in `get`.
        unsafe { (*self.0).last_seen_ns = now };
    }

    /// Sets `bits` in the entry's flags; returns the flags before.
    #[inline(always)]
    pub fn set_flags(self, bits: u32) -> u32 {
        // SAFETY: as in `get`; concurrent updates of the flags go through atomics only.
        unsafe { atomic_or::<u32, u32, { SeqCst }>(core::ptr::addr_of_mut!((*self.0).flags), bits) }
    }
}

/// A `NAT_REVERSE` entry, in place.
#[derive(Clone, Copy)]
pub struct ReplyRef(*mut NatReverse);

/// What a reply entry says about its flow (copied out of the entry).
pub struct ReplyTarget {
    pub vip: Addr,
    pub vport: u16,
    pub service_id: u32,
    pub backend_id: u32,
}

impl ReplyRef {
    #[inline(always)]
    pub fn target(self) -> ReplyTarget {
        // SAFETY: a pointer from a lookup in this run; the control plane never rewrites an entry.
        unsafe {
            let e = &*self.0;
            ReplyTarget { vip: e.vip, vport: e.vport, service_id: e.service_id, backend_id: e.backend_id }
        }
    }

    /// The way back to the client, cached inside the flow's own entry.
    #[inline(always)]
    pub fn client_hop(self) -> HopSlot {
        // SAFETY: as in `target`; a field of the same element.
        HopSlot(unsafe { core::ptr::addr_of_mut!((*self.0).client_hop) })
    }
}

/// A next-hop cache slot, in place: a backend's (per CPU, in `NEXT_HOPS`) or a NAT client's (in its
/// `NAT_REVERSE` entry).
#[derive(Clone, Copy)]
pub struct HopSlot(*mut NextHop);

impl HopSlot {
    #[inline(always)]
    pub fn get(&self) -> &NextHop {
        // SAFETY: a pointer from a lookup in this run, valid while the handle lives. A client's slot
        // is shared between CPUs, but its flow's packets arrive on one CPU (RSS), and a racing writer
        // writes the same FIB answer.
        unsafe { &*self.0 }
    }

    #[inline(always)]
    pub fn set(self, hop: NextHop) {
        // SAFETY: as in `get`.
        unsafe { *self.0 = hop };
    }
}
