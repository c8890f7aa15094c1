//! Pinning in bpffs, so the data plane outlives the daemon: maps at `DIR/<MAP>`, one XDP link per
//! interface at `DIR/link_<iface>`. A restarted daemon reuses the maps (the connection table
//! survives) and swaps its program into the existing links atomically (BPF_LINK_UPDATE): there is
//! never a moment without a program on the interface.

use std::{
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::maps::{MapInfo, MapType};
use xdp_lb_common::{
    maps::{defaults, names, Backend, CONNTRACK_MAP_FLAGS, Conn, Counters, FlowKey, NatBackend, NatReverse, NextHop, Service, ServiceKey},
    reasons,
};

use crate::config;

/// `BPF_F_RDONLY_PROG`: the kernel adds it to every devmap it creates (programs may only redirect
/// through one), so a pinned `TX_PORTS` reports it although the program never asked for it.
const BPF_F_RDONLY_PROG: u32 = 1 << 7;

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{dir}: not on a bpffs mount; mount one first (`mount -t bpf bpf {dir}`) or pass --bpffs with a directory on one")]
    NotBpffs { dir: String },
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    /// The directory's lock is held: a daemon runs on these pins.
    #[error("another xdp-lb daemon is running on the pinned data plane {dir} ({holder}); stop it first, or give this one its own --bpffs (and --socket) to run a second instance")]
    Held { dir: String, holder: Holder },
    #[error("pinned map {map} was created for a different layout or size ({found}, this build needs {wanted}); a restart cannot adopt it: set [dataplane] back to the running sizes, or run `xdp-lb stop --detach` to remove the old data plane and then start (an outage: nothing is forwarded until the start and the connection table is lost)")]
    Incompatible { map: &'static str, found: String, wanted: String },
    /// Another type, flags, key or value: no setting brings it back, only a fresh data plane.
    #[error("pinned map {map} was made by another build of the data plane ({found}, this build needs {wanted}); a restart cannot adopt it: run `xdp-lb stop --detach` to remove the old data plane and then start this build (an outage: nothing is forwarded until the start and the connection table is lost)")]
    Layout { map: &'static str, found: String, wanted: String },
}

/// The names of the maps the daemon pins, one per map the program declares ([`expected_maps`]
/// lists their shapes; a test keeps the two equal). With [`LINK_PREFIX`], the only names xdp-lb
/// ever creates in a pin directory, and so the only ones it ever removes.
pub const MAP_NAMES: [&str; 13] = [
    names::SERVICES,
    names::BACKENDS,
    names::MAGLEV_RING,
    names::CONNTRACK,
    names::NAT_REVERSE,
    names::NAT_BACKENDS,
    names::TX_PORTS,
    names::SERVICE_STATS,
    names::BACKEND_STATS,
    names::REASONS,
    names::RR_COUNTERS,
    names::ACTIVE_FLOWS,
    names::NEXT_HOPS,
];

/// A pinned XDP link is `link_<iface>`.
pub const LINK_PREFIX: &str = "link_";

/// Whether `name` is one xdp-lb pins (a map of [`MAP_NAMES`] or a link).
pub fn is_own_pin(name: &str) -> bool {
    MAP_NAMES.contains(&name) || name.strip_prefix(LINK_PREFIX).is_some_and(|iface| !iface.is_empty())
}

/// Where the data plane is pinned.
#[derive(Clone, Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// Creates the directory (its parent must be on a bpffs).
    pub fn prepare(dir: &Path) -> Result<PinDir, PinError> {
        // Nothing is created before the check passes: a --bpffs outside any bpffs is refused
        // without leaving the directories it names behind.
        if !fresh::nearest_existing(dir).is_some_and(is_bpffs) {
            return Err(PinError::NotBpffs { dir: dir.display().to_string() });
        }
        // A directory that cannot be created is almost always one outside any bpffs (e.g. under a
        // /sys that `ip netns exec` remounted without /sys/fs/bpf): say that, not just "ENOENT".
        match std::fs::create_dir_all(dir) {
            // Not "mount a bpffs": systemd mounts /sys/fs/bpf mode 0700, so a daemon that is not
            // root cannot reach a directory there (dist/systemd/xdp-lb.service bind-mounts it).
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(PinError::Io {
                    path: dir.display().to_string(),
                    message: format!("{e}: this user cannot create or reach the pin directory (is a parent, such as a bpffs root of mode 0700, closed to it?)"),
                })
            }
            Err(_) => return Err(PinError::NotBpffs { dir: dir.display().to_string() }),
            Ok(()) if !is_bpffs(dir) => return Err(PinError::NotBpffs { dir: dir.display().to_string() }),
            Ok(()) => {}
        }
        Ok(PinDir(dir.to_path_buf()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn link(&self, iface: &str) -> PathBuf {
        self.0.join(format!("{LINK_PREFIX}{iface}"))
    }

    /// Interfaces that have a pinned link, i.e. a running data plane to adopt.
    pub fn linked_interfaces(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.0) else { return Vec::new() };
        let mut out: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix(LINK_PREFIX).filter(|i| !i.is_empty()).map(str::to_string))
            .collect();
        out.sort();
        out
    }

    /// Refuses to reuse pinned maps whose shape differs from what this build and config expect:
    /// aya would silently reuse them, and the program would read them wrongly. The shape is the
    /// map's type and flags (a connection table of another kind, e.g. one shared LRU instead of
    /// one per CPU) as well as its key size, value size and entries.
    pub fn check_compatible(&self, settings: &config::Dataplane) -> Result<(), PinError> {
        for wanted in expected_maps(settings) {
            let path = self.map(wanted.name);
            if !path.exists() {
                continue;
            }
            let io = |message: String| PinError::Io { path: path.display().to_string(), message };
            let info = MapInfo::from_pin(&path).map_err(|e| io(e.to_string()))?;
            let found = Shape {
                // A type this aya does not know is certainly not the one wanted.
                kind: info.map_type().ok(),
                flags: info.map_flags(),
                key: info.key_size(),
                value: info.value_size(),
                entries: info.max_entries(),
            };
            let want = wanted.shape();
            if found != want {
                // Only the entries differ: the config's sizes can be set back (see the message).
                let sizes_only = Shape { entries: want.entries, ..found } == want;
                let (map, found, wanted) = (wanted.name, found.to_string(), want.to_string());
                return Err(if sizes_only {
                    PinError::Incompatible { map, found, wanted }
                } else {
                    PinError::Layout { map, found, wanted }
                });
            }
        }
        Ok(())
    }

    /// The names in the directory that xdp-lb pins ([`is_own_pin`]), sorted.
    pub fn own_pins(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.0) else { return Vec::new() };
        let mut out: Vec<String> =
            entries.filter_map(|e| e.ok()?.file_name().to_str().filter(|n| is_own_pin(n)).map(str::to_string)).collect();
        out.sort();
        out
    }

    /// Removes xdp-lb's pins (links first, so the program detaches before its maps go), leaves
    /// anything else (another tool's pins: Hostile 9b J10), and removes the directory only if it
    /// is then empty and not a mount root (a bpffs root is never removed).
    pub fn remove_own(&self) -> Result<Vec<String>, PinError> {
        let io = |p: &Path, e: std::io::Error| PinError::Io { path: p.display().to_string(), message: e.to_string() };
        let mut removed = Vec::new();
        let (links, maps): (Vec<String>, Vec<String>) = self.own_pins().into_iter().partition(|n| n.starts_with(LINK_PREFIX));
        for name in links.into_iter().chain(maps) {
            let path = self.0.join(&name);
            std::fs::remove_file(&path).map_err(|e| io(&path, e))?;
            removed.push(path.display().to_string());
        }
        let empty = std::fs::read_dir(&self.0).is_ok_and(|mut d| d.next().is_none());
        if empty && !lock::is_mount_root(&self.0) {
            let _ = std::fs::remove_dir(&self.0);
        }
        Ok(removed)
    }
}

/// One map the program declares, as this build creates it.
#[derive(Clone, Copy, Debug)]
pub struct ExpectedMap {
    pub name: &'static str,
    pub kind: MapType,
    /// `map_flags` as the kernel reports them for the map (`BPF_F_*`).
    pub flags: u32,
    pub key: u32,
    pub value: u32,
    pub entries: u32,
}

impl ExpectedMap {
    fn shape(&self) -> Shape {
        Shape { kind: Some(self.kind), flags: self.flags, key: self.key, value: self.value, entries: self.entries }
    }
}

/// What decides whether a pinned map can be reused, as found or as wanted.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Shape {
    /// `None`: a type this build does not know.
    kind: Option<MapType>,
    flags: u32,
    key: u32,
    value: u32,
    entries: u32,
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Shape { kind, flags, key, value, entries } = self;
        match kind {
            Some(kind) => write!(f, "type {kind:?}")?,
            None => write!(f, "type unknown")?,
        }
        write!(f, ", flags {flags:#x}, key {key} B, value {value} B, {entries} entries")
    }
}

/// The entries the kernel gives a per-CPU LRU table (`BPF_F_NO_COMMON_LRU`) asked for `entries`:
/// rounded up to a multiple of the possible CPUs, each CPU's list getting an equal share (as it
/// then reports them). Rounded down instead where rounding up would overflow, as the kernel does.
pub fn per_cpu_entries(entries: u32, cpus: u32) -> u32 {
    let cpus = cpus.max(1);
    entries.div_ceil(cpus).checked_mul(cpus).unwrap_or(entries / cpus * cpus)
}

/// Every map the program declares, with the type, flags, key size, value size and entries it must
/// have.
pub fn expected_maps(settings: &config::Dataplane) -> Vec<ExpectedMap> {
    let s = |n: usize| n as u32;
    let map = |name, kind, flags, key, value, entries| ExpectedMap { name, kind, flags, key, value, entries };
    // Unknown CPUs (no /sys): 1, so a rounded table is refused rather than misread.
    let cpus = aya::util::nr_cpus().map_or(1, |n| n as u32);
    let conntrack_entries = per_cpu_entries(settings.conntrack_entries, cpus);
    vec![
        map(names::SERVICES, MapType::Hash, 0, s(size_of::<ServiceKey>()), s(size_of::<Service>()), defaults::MAX_SERVICES),
        map(names::BACKENDS, MapType::Array, 0, 4, s(size_of::<Backend>()), defaults::MAX_BACKENDS),
        map(names::MAGLEV_RING, MapType::Array, 0, 4, 4, settings.maglev_cells),
        map(names::CONNTRACK, MapType::LruHash, CONNTRACK_MAP_FLAGS, s(size_of::<FlowKey>()), s(size_of::<Conn>()), conntrack_entries),
        map(names::NAT_REVERSE, MapType::LruHash, CONNTRACK_MAP_FLAGS, s(size_of::<FlowKey>()), s(size_of::<NatReverse>()), conntrack_entries),
        map(names::NAT_BACKENDS, MapType::LruHash, 0, s(size_of::<ServiceKey>()), s(size_of::<NatBackend>()), defaults::NAT_BACKENDS),
        map(names::TX_PORTS, MapType::DevMapHash, BPF_F_RDONLY_PROG, 4, 8, defaults::TX_PORTS),
        map(names::SERVICE_STATS, MapType::PerCpuArray, 0, 4, s(size_of::<Counters>()), defaults::MAX_SERVICES),
        map(names::BACKEND_STATS, MapType::PerCpuArray, 0, 4, s(size_of::<Counters>()), defaults::MAX_BACKENDS),
        map(names::REASONS, MapType::PerCpuArray, 0, 4, 8, reasons::COUNT),
        map(names::RR_COUNTERS, MapType::Array, 0, 4, 8, defaults::MAX_SERVICES),
        map(names::ACTIVE_FLOWS, MapType::Array, 0, 4, 8, defaults::MAX_BACKENDS),
        map(names::NEXT_HOPS, MapType::PerCpuArray, 0, 4, s(size_of::<NextHop>()), defaults::MAX_BACKENDS),
    ]
}

fn is_bpffs(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return false };
    // SAFETY: statfs writes into a zeroed struct we own; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

mod fresh;
mod lock;
pub use fresh::FreshPins;
pub use lock::{Holder, PinLock};

#[cfg(test)]
mod tests;
