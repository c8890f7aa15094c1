//! The maps shared with the control plane, and the small typed accessors the stages use.

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMapHash, HashMap, LruHashMap, PerCpuArray},
};
use xdp_lb_common::{
    maps::{defaults, Backend, Conn, Counters, FlowKey, NatReverse, Service, ServiceKey},
    reasons::{self, Reason},
};

#[map]
static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(defaults::MAX_SERVICES, 0);

#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(defaults::MAX_BACKENDS, 0);

#[map]
static MAGLEV_RING: Array<u32> = Array::with_max_entries(defaults::MAGLEV_CELLS, 0);

#[map]
static CONNTRACK: LruHashMap<FlowKey, Conn> = LruHashMap::with_max_entries(defaults::CONNTRACK_ENTRIES, 0);

#[map]
static NAT_REVERSE: LruHashMap<FlowKey, NatReverse> =
    LruHashMap::with_max_entries(defaults::CONNTRACK_ENTRIES, 0);

/// Interfaces the program may redirect to (the ones it is attached to), keyed by ifindex.
#[map]
static TX_PORTS: DevMapHash = DevMapHash::with_max_entries(defaults::TX_PORTS, 0);

#[map]
static SERVICE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(defaults::MAX_SERVICES, 0);

#[map]
static BACKEND_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(defaults::MAX_BACKENDS, 0);

#[map]
static REASONS: PerCpuArray<u64> = PerCpuArray::with_max_entries(reasons::COUNT, 0);

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

#[inline(always)]
pub fn conn(flow: &FlowKey) -> Option<Conn> {
    // SAFETY: copied out immediately.
    unsafe { CONNTRACK.get(flow).copied() }
}

#[inline(always)]
pub fn remember_conn(flow: &FlowKey, conn: &Conn) {
    // An LRU map evicts the least recently used flow when full, so insertion cannot fail for lack of
    // room; ignoring the (memory-allocation) error only costs the flow its stickiness.
    let _ = CONNTRACK.insert(flow, conn, 0);
}

#[inline(always)]
pub fn nat_reverse(flow: &FlowKey) -> Option<NatReverse> {
    // SAFETY: copied out immediately.
    unsafe { NAT_REVERSE.get(flow).copied() }
}

#[inline(always)]
pub fn remember_nat_reverse(reply: &FlowKey, value: &NatReverse) {
    let _ = NAT_REVERSE.insert(reply, value, 0);
}

#[inline(always)]
pub fn is_tx_port(ifindex: u32) -> bool {
    TX_PORTS.get(ifindex).is_some()
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

#[inline(always)]
pub fn count_forward(service_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    bump(&SERVICE_STATS, service_id, bytes, new_flow);
    bump(&BACKEND_STATS, backend_id, bytes, new_flow);
}

#[inline(always)]
fn bump(map: &PerCpuArray<Counters>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            (*c).new_flows += new_flow as u64;
        }
    }
}
