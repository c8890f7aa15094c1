//! The loaded XDP program and its maps: loading with configured map sizes, attaching to interfaces
//! (native mode, falling back to generic), writing the maps ([`MapWriter`]) and reading the counters.

use std::collections::BTreeMap;

use aya::{
    maps::{Array, DevMapHash, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
        Xdp, XdpMode,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use tracing::{info, warn};
use xdp_lb_common::{
    maps::{defaults, names, Backend, Conn, Counters, FlowKey, NatReverse, Service, ServiceKey},
    reasons,
};

use crate::{
    config,
    flows::{FlowMapError, FlowMaps, WalkClock},
    pins::{self, PinDir, PinError},
    tables::{MapReader, MapWriter, ReadError, WriteError},
};

/// The XDP object built from `xdp-lb-ebpf` by build.rs.
static PROGRAM_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/xdp-lb.bpf.o"));
pub const PROGRAM_NAME: &str = "xdp_lb";
/// A trivial MAC-swap-and-XDP_TX program in the same object: the benchmarks' per-packet reference.
pub const REFERENCE_PROGRAM_NAME: &str = "xdp_tx_reference";
/// An XDP_DROP-everything program in the same object: the benchmarks' receiving end.
pub const SINK_PROGRAM_NAME: &str = "xdp_drop_sink";

/// The compiled eBPF object (both programs), for tools that load it themselves (benchmarks).
pub fn program_object() -> &'static [u8] {
    PROGRAM_OBJECT
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("loading the XDP program into the kernel (verifier): {0}")]
    Verify(#[source] aya::programs::ProgramError),
    #[error("interface {iface:?} (from --iface): {message}")]
    Interface { iface: String, message: String },
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: aya::maps::MapError },
    #[error(transparent)]
    Pin(#[from] PinError),
}

/// How an interface ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    Native,
    Generic,
    /// A pinned link of a previous daemon, now running this daemon's program.
    Adopted,
}

pub struct Dataplane {
    ebpf: Ebpf,
    maps: Maps,
    pins: Option<PinDir>,
    /// Links this daemon owns: detached on exit (unpinned mode only).
    attached: Vec<(String, XdpLinkId)>,
    /// Pinned links: they stay when the daemon exits.
    pinned: Vec<(String, FdLink)>,
    /// `CONNTRACK`'s size, which bounds a walk over it.
    conntrack_entries: u32,
    flow_walk: WalkClock,
}

struct Maps {
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    ring: Array<MapData, u32>,
    conntrack: HashMap<MapData, FlowKey, Conn>,
    nat_reverse: HashMap<MapData, FlowKey, NatReverse>,
    tx_ports: DevMapHash<MapData>,
    service_stats: PerCpuArray<MapData, Counters>,
    backend_stats: PerCpuArray<MapData, Counters>,
    reasons: PerCpuArray<MapData, u64>,
    rr_counters: Array<MapData, u64>,
    active_flows: Array<MapData, u64>,
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DataplaneError> {
    let map = ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DataplaneError::Map { map: name, source })
}

impl Dataplane {
    /// Loads and verifies the program with the map sizes from `settings`. Attaches nothing. With
    /// `pins`, the maps are pinned there — or, if a previous daemon pinned them, reused as they are.
    pub fn load(settings: &config::Dataplane, pins: Option<PinDir>) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(names::CONNTRACK, settings.conntrack_entries)
            .map_max_entries(names::NAT_REVERSE, settings.conntrack_entries)
            .map_max_entries(names::MAGLEV_RING, settings.maglev_cells);
        let map_paths: Vec<(&'static str, std::path::PathBuf)> = match &pins {
            Some(dir) => {
                dir.check_compatible(settings)?;
                pins::expected_maps(settings).into_iter().map(|m| (m.name, dir.map(m.name))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(PROGRAM_OBJECT)?;
        let program: &mut Xdp = ebpf
            .program_mut(PROGRAM_NAME)
            .ok_or(DataplaneError::Verify(aya::programs::ProgramError::NotLoaded))?
            .try_into()
            .map_err(DataplaneError::Verify)?;
        program.load().map_err(DataplaneError::Verify)?;
        let maps = Maps {
            services: take(&mut ebpf, names::SERVICES)?,
            backends: take(&mut ebpf, names::BACKENDS)?,
            ring: take(&mut ebpf, names::MAGLEV_RING)?,
            conntrack: take(&mut ebpf, names::CONNTRACK)?,
            nat_reverse: take(&mut ebpf, names::NAT_REVERSE)?,
            tx_ports: take(&mut ebpf, names::TX_PORTS)?,
            service_stats: take(&mut ebpf, names::SERVICE_STATS)?,
            backend_stats: take(&mut ebpf, names::BACKEND_STATS)?,
            reasons: take(&mut ebpf, names::REASONS)?,
            rr_counters: take(&mut ebpf, names::RR_COUNTERS)?,
            active_flows: take(&mut ebpf, names::ACTIVE_FLOWS)?,
        };
        Ok(Self {
            ebpf,
            maps,
            pins,
            attached: Vec::new(),
            pinned: Vec::new(),
            conntrack_entries: settings.conntrack_entries,
            flow_walk: WalkClock::default(),
        })
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf.program(PROGRAM_NAME).expect("checked at load").try_into().expect("checked at load")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf.program_mut(PROGRAM_NAME).expect("checked at load").try_into().expect("checked at load")
    }

    /// Attaches to `iface` in native (driver) mode, or generic mode if the driver cannot, and lets
    /// the program redirect to it. With pins, an interface that already has a pinned link gets this
    /// program swapped in atomically; otherwise the new link is pinned.
    pub fn attach(&mut self, iface: &str) -> Result<AttachMode, DataplaneError> {
        let ifindex = ifindex(iface)?;
        let interface_error = |message: String| DataplaneError::Interface { iface: iface.to_string(), message };
        if let Some(link_pin) = self.pins.as_ref().map(|p| p.link(iface)).filter(|p| p.exists()) {
            let fd: FdLink = PinnedLink::from_pin(&link_pin).map_err(|e| interface_error(format!("opening {}: {e}", link_pin.display())))?.into();
            let xdp_link = XdpLink::try_from(fd).map_err(|e| interface_error(format!("pinned link is not an XDP link: {e}")))?;
            let id = self.program_mut().attach_to_link(xdp_link).map_err(|e| interface_error(format!("replacing the program on the pinned link: {e}")))?;
            let fd: FdLink = self.program_mut().take_link(id).map_err(|e| interface_error(e.to_string()))?.try_into().map_err(|e: aya::programs::links::LinkError| interface_error(e.to_string()))?;
            self.pinned.push((iface.to_string(), fd));
            self.add_tx_port(iface)?;
            info!(%iface, ifindex, "adopted the running data plane: program replaced atomically, maps and connections kept");
            return Ok(AttachMode::Adopted);
        }
        let (link, mode) = match self.program_mut().attach(iface, XdpMode::Driver) {
            Ok(link) => (link, AttachMode::Native),
            // Hostile 9 H10: EBUSY/EEXIST mean another program holds the interface, not that the
            // driver lacks native XDP; generic mode would be refused the same way.
            Err(native) if interface_busy(&native) => {
                return Err(interface_error(format!(
                    "the interface is busy: another XDP program is attached to it (another xdp-lb daemon, or another tool); \
                     detach it first ({native})"
                )));
            }
            Err(native) => {
                warn!(%iface, error = %native, "native XDP is not available; falling back to generic (skb) mode, which is much slower");
                let link = self
                    .program_mut()
                    .attach(iface, XdpMode::Skb)
                    .map_err(|generic| interface_error(format!("attach failed in native mode ({native}) and generic mode ({generic})")))?;
                (link, AttachMode::Generic)
            }
        };
        self.maps.tx_ports.insert(ifindex, ifindex, None, 0).map_err(|e| interface_error(format!("adding to TX_PORTS: {e}")))?;
        match self.pins.clone() {
            Some(pins) => {
                let xdp_link = self.program_mut().take_link(link).map_err(|e| interface_error(e.to_string()))?;
                let fd = FdLink::try_from(xdp_link).map_err(|e| {
                    interface_error(format!("the kernel attached without a bpf_link, which cannot be pinned: {e}"))
                })?;
                let pinned = fd.pin(pins.link(iface)).map_err(|e| interface_error(format!("pinning the link: {e}")))?;
                self.pinned.push((iface.to_string(), pinned.into()));
            }
            None => self.attached.push((iface.to_string(), link)),
        }
        info!(%iface, ifindex, ?mode, pinned = self.pins.is_some(), "attached");
        Ok(mode)
    }

    /// Detaches the pinned links of interfaces not in `listed` and removes their pins (H9: a
    /// restart with an interface left out of `--iface` must not leave it running the previous
    /// program on the shared maps with no daemon in charge). The previous daemon is gone, so the
    /// pin is the link's last reference: unpinning detaches it. Returns the interfaces detached.
    pub fn detach_unlisted(&mut self, listed: &[String]) -> Vec<Result<String, DataplaneError>> {
        let Some(pins) = self.pins.clone() else { return Vec::new() };
        let mut out = Vec::new();
        for iface in pins.linked_interfaces().into_iter().filter(|i| !listed.contains(i)) {
            let link = pins.link(&iface);
            if let Err(e) = std::fs::remove_file(&link) {
                out.push(Err(DataplaneError::Interface { iface, message: format!("removing the pinned link {}: {e}", link.display()) }));
                continue;
            }
            // No redirects to it any more (an interface that is gone has no entry to remove).
            if let Ok(index) = ifindex(&iface) {
                let _ = self.maps.tx_ports.remove(index);
            }
            out.push(Ok(iface));
        }
        out
    }

    /// The directory the data plane is pinned in, as this daemon was given it (`None` with --no-pin).
    pub fn pin_path(&self) -> Option<&std::path::Path> {
        self.pins.as_ref().map(PinDir::path)
    }

    /// Whether the data plane stays when the daemon exits.
    pub fn is_pinned(&self) -> bool {
        self.pins.is_some()
    }

    /// Detaches everything and removes the pins (`xdp-lb stop --detach`).
    pub fn remove_pins(&mut self) -> Result<Vec<String>, DataplaneError> {
        self.pinned.clear();
        match &self.pins {
            Some(pins) => Ok(pins.remove_own()?),
            None => Ok(Vec::new()),
        }
    }

    /// Detaches from every interface this daemon attached without pinning, most recent first.
    pub fn detach_all(&mut self) {
        while let Some((iface, link)) = self.attached.pop() {
            match self.program_mut().detach(link) {
                Ok(()) => info!(%iface, "detached"),
                Err(error) => warn!(%iface, %error, "detach failed"),
            }
        }
    }

    /// Registers an interface the program may redirect to without attaching to it (used by tests).
    pub fn add_tx_port(&mut self, iface: &str) -> Result<(), DataplaneError> {
        let ifindex = ifindex(iface)?;
        self.maps
            .tx_ports
            .insert(ifindex, ifindex, None, 0)
            .map_err(|e| DataplaneError::Interface { iface: iface.to_string(), message: format!("adding to TX_PORTS: {e}") })
    }

    pub fn reason_counters(&self) -> Result<BTreeMap<&'static str, u64>, DataplaneError> {
        let mut out = BTreeMap::new();
        for (i, name) in reasons::NAMES.iter().enumerate() {
            let values = self.maps.reasons.get(&(i as u32), 0).map_err(|source| DataplaneError::Map { map: names::REASONS, source })?;
            out.insert(*name, values.iter().sum());
        }
        Ok(out)
    }

    pub fn service_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        sum_per_cpu(&self.maps.service_stats, id, names::SERVICE_STATS)
    }

    pub fn backend_counters(&self, id: u32) -> Result<Counters, DataplaneError> {
        sum_per_cpu(&self.maps.backend_stats, id, names::BACKEND_STATS)
    }

    /// Open NAT TCP flows on a backend (opened minus closed, as the data plane saw them).
    pub fn active_flows(&self, backend_id: u32) -> Result<u64, DataplaneError> {
        let value = self.maps.active_flows.get(&backend_id, 0).map_err(|source| DataplaneError::Map { map: names::ACTIVE_FLOWS, source })?;
        Ok(xdp_lb_common::conntrack::active_count(value))
    }

    /// Every service entry in the map (to adopt a running data plane).
    pub fn service_entries(&self) -> Result<Vec<(ServiceKey, Service)>, DataplaneError> {
        self.maps.services.iter().collect::<Result<Vec<_>, _>>().map_err(|source| DataplaneError::Map { map: names::SERVICES, source })
    }

    pub fn backend_entry(&self, id: u32) -> Result<Backend, DataplaneError> {
        self.maps.backends.get(&id, 0).map_err(|source| DataplaneError::Map { map: names::BACKENDS, source })
    }

    pub fn ring_cells(&self, offset: u32, size: u32) -> Result<Vec<u32>, DataplaneError> {
        (offset..offset + size)
            .map(|i| self.maps.ring.get(&i, 0).map_err(|source| DataplaneError::Map { map: names::MAGLEV_RING, source }))
            .collect()
    }

    /// The connection-table entry of a flow, if any (for tests and diagnostics).
    pub fn conntrack_entry(&self, flow: &FlowKey) -> Option<Conn> {
        self.maps.conntrack.get(flow, 0).ok()
    }

    /// The reply entry of a NAT flow, keyed by its reply (backend → client), if any (for tests and
    /// diagnostics).
    pub fn nat_reverse_entry(&self, reply: &FlowKey) -> Option<NatReverse> {
        self.maps.nat_reverse.get(reply, 0).ok()
    }

    /// Removes a reply entry as an LRU eviction would (for tests); whether there was one.
    pub fn evict_nat_reverse(&mut self, reply: &FlowKey) -> bool {
        self.maps.nat_reverse.remove(reply).is_ok()
    }

}

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.detach_all();
    }
}

/// The index of a network interface in this network namespace.
pub fn ifindex(iface: &str) -> Result<u32, DataplaneError> {
    let name = std::ffi::CString::new(iface)
        .map_err(|_| DataplaneError::Interface { iface: iface.to_string(), message: "contains a NUL byte".into() })?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(DataplaneError::Interface { iface: iface.to_string(), message: "no such network interface".into() });
    }
    Ok(index)
}

fn sum_per_cpu(map: &PerCpuArray<MapData, Counters>, id: u32, name: &'static str) -> Result<Counters, DataplaneError> {
    let values = map.get(&id, 0).map_err(|source| DataplaneError::Map { map: name, source })?;
    let mut total = Counters::default();
    for v in values.iter() {
        total.add(v);
    }
    Ok(total)
}

fn write_error(map: &'static str) -> impl Fn(aya::maps::MapError) -> WriteError {
    move |e| WriteError { map, message: e.to_string() }
}

fn zero_per_cpu<T: aya::Pod + Default>(map: &mut PerCpuArray<MapData, T>, id: u32, name: &'static str) -> Result<(), WriteError> {
    let cpus = nr_cpus().map_err(|(_, e)| WriteError { map: name, message: format!("counting CPUs: {e}") })?;
    let zeros = PerCpuValues::try_from((0..cpus).map(|_| T::default()).collect::<Vec<_>>())
        .map_err(|e| WriteError { map: name, message: e.to_string() })?;
    map.set(id, zeros, 0).map_err(write_error(name))
}

impl MapWriter for Dataplane {
    fn write_backend(&mut self, id: u32, backend: &Backend) -> Result<(), WriteError> {
        self.maps.backends.set(id, backend, 0).map_err(write_error(names::BACKENDS))
    }

    fn write_ring(&mut self, offset: u32, cells: &[u32]) -> Result<(), WriteError> {
        for (i, cell) in cells.iter().enumerate() {
            self.maps.ring.set(offset + i as u32, cell, 0).map_err(write_error(names::MAGLEV_RING))?;
        }
        Ok(())
    }

    fn write_service(&mut self, key: &ServiceKey, service: &Service) -> Result<(), WriteError> {
        self.maps.services.insert(key, service, 0).map_err(write_error(names::SERVICES))
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), WriteError> {
        self.maps.services.remove(key).map_err(write_error(names::SERVICES))
    }

    fn clear_service_stats(&mut self, id: u32) -> Result<(), WriteError> {
        self.maps.rr_counters.set(id, 0, 0).map_err(write_error(names::RR_COUNTERS))?;
        zero_per_cpu(&mut self.maps.service_stats, id, names::SERVICE_STATS)
    }

    fn clear_backend_stats(&mut self, id: u32) -> Result<(), WriteError> {
        self.maps.active_flows.set(id, 0, 0).map_err(write_error(names::ACTIVE_FLOWS))?;
        zero_per_cpu(&mut self.maps.backend_stats, id, names::BACKEND_STATS)
    }
}

impl MapReader for Dataplane {
    fn service_entries(&self) -> Result<Vec<(ServiceKey, Service)>, ReadError> {
        Dataplane::service_entries(self).map_err(read_error)
    }

    fn backend_entry(&self, id: u32) -> Result<Backend, ReadError> {
        Dataplane::backend_entry(self, id).map_err(read_error)
    }

    fn ring_cells(&self, offset: u32, size: u32) -> Result<Vec<u32>, ReadError> {
        Dataplane::ring_cells(self, offset, size).map_err(read_error)
    }
}

fn read_error(e: DataplaneError) -> ReadError {
    match e {
        DataplaneError::Map { map, source } => ReadError { map, message: source.to_string() },
        other => ReadError { map: "?", message: other.to_string() },
    }
}

impl FlowMaps for Dataplane {
    fn conntrack_entries(&self) -> Result<Vec<(FlowKey, Conn)>, FlowMapError> {
        let error = |e: aya::maps::MapError| FlowMapError { map: names::CONNTRACK, message: e.to_string() };
        // Keys deleted or evicted during the walk make the kernel restart it from the first key:
        // duplicates are merged, and the walk is bounded so constant churn cannot keep it going.
        let mut seen = std::collections::HashMap::new();
        for item in self.maps.conntrack.iter().take(self.conntrack_entries as usize * 2) {
            match item {
                Ok((key, conn)) => {
                    seen.insert(key, conn);
                }
                // The entry went away between its key and its value.
                Err(aya::maps::MapError::KeyNotFound) => continue,
                Err(e) => return Err(error(e)),
            }
        }
        Ok(seen.into_iter().collect())
    }

    fn remove_conntrack_if_unchanged(&mut self, key: &FlowKey, seen: &Conn) -> Result<bool, FlowMapError> {
        // Re-read right before the delete: a SYN may have reused the 5-tuple since the walk.
        match self.maps.conntrack.get(key, 0) {
            Ok(now) if now == *seen => {}
            _ => return Ok(false),
        }
        match self.maps.conntrack.remove(key) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(FlowMapError { map: names::CONNTRACK, message: e.to_string() }),
        }
    }

    fn remove_reply_if_of(&mut self, reply: &FlowKey, flow: &FlowKey, backend_id: u32) -> Result<bool, FlowMapError> {
        match self.maps.nat_reverse.get(reply, 0) {
            Ok(e) if e.backend_id == backend_id && e.vip == flow.dst && e.vport == flow.dport => {}
            _ => return Ok(false),
        }
        match self.maps.nat_reverse.remove(reply) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            Err(e) => Err(FlowMapError { map: names::NAT_REVERSE, message: e.to_string() }),
        }
    }

    fn active_flows_raw(&self, backend_id: u32) -> Result<u64, FlowMapError> {
        self.maps.active_flows.get(&backend_id, 0).map_err(|e| FlowMapError { map: names::ACTIVE_FLOWS, message: e.to_string() })
    }

    fn set_active_flows(&mut self, backend_id: u32, value: u64) -> Result<(), FlowMapError> {
        self.maps.active_flows.set(backend_id, value, 0).map_err(|e| FlowMapError { map: names::ACTIVE_FLOWS, message: e.to_string() })
    }

    fn walk_clock(&mut self) -> &mut WalkClock {
        &mut self.flow_walk
    }
}

/// Sizes of the maps the control plane indexes by id (compiled into the object).
pub const MAX_SERVICES: u32 = defaults::MAX_SERVICES;
pub const MAX_BACKENDS: u32 = defaults::MAX_BACKENDS;

/// Whether an attach failed because the interface already has an XDP program (`EBUSY` from a
/// second link, `EEXIST` from the legacy netlink path), anywhere in the error's source chain.
fn interface_busy(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EBUSY) | Some(libc::EEXIST)) {
                return true;
            }
        }
        next = e.source();
    }
    false
}
