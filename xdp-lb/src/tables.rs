//! Turns a validated [`Config`] into map contents, and a changed config into the smallest safe
//! sequence of map writes: new backends first, then each changed service's new Maglev ring in free
//! cells, then the service entry that points at it (the atomic switch), and only then are removed
//! backends cleared. A packet therefore never sees a service pointing at a half-written ring or at a
//! backend that is gone.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
};

use xdp_lb_common::{
    addr,
    maglev::{self, Candidate},
    sequence,
    maps::{self as m, ServiceKey},
};

use crate::config::{self, Config, Mode, Protocol, Scheduler};


/// The writes the control plane makes to the data plane's maps.
pub trait MapWriter {
    fn write_backend(&mut self, id: u32, backend: &m::Backend) -> Result<(), WriteError>;
    fn write_ring(&mut self, offset: u32, cells: &[u32]) -> Result<(), WriteError>;
    fn write_service(&mut self, key: &ServiceKey, service: &m::Service) -> Result<(), WriteError>;
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), WriteError>;
    fn clear_service_stats(&mut self, id: u32) -> Result<(), WriteError>;
    fn clear_backend_stats(&mut self, id: u32) -> Result<(), WriteError>;
}

/// The reads adoption makes from a running data plane's maps (a restarted daemon rebuilding its
/// bookkeeping), behind a trait so that path is unit-tested with fake maps.
pub trait MapReader {
    /// Every entry of `SERVICES`.
    fn service_entries(&self) -> Result<Vec<(ServiceKey, m::Service)>, ReadError>;
    fn backend_entry(&self, id: u32) -> Result<m::Backend, ReadError>;
    /// `MAGLEV_RING[offset..offset + size]`.
    fn ring_cells(&self, offset: u32, size: u32) -> Result<Vec<u32>, ReadError>;
}

#[derive(Debug, thiserror::Error)]
#[error("reading map {map}: {message}")]
pub struct ReadError {
    pub map: &'static str,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
#[error("writing map {map}: {message}")]
pub struct WriteError {
    pub map: &'static str,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("no free service id: at most {0} services")]
    ServiceIds(u32),
    #[error("no free backend id: at most {0} backends")]
    BackendIds(u32),
    #[error(
        "service {service}: {field} needs two runs of {capacity} contiguous free Maglev cells (one serves while the next \
         table is built in the other; one may reuse the running ring's cells), but the largest free runs of the {cells} \
         cells of dataplane.maglev_cells are {free_runs} (fragmented by earlier changes): choose a smaller {field}, \
         remove a service, or raise maglev_cells (a resize: `xdp-lb stop --detach` and a start)"
    )]
    RingSpace { service: String, field: &'static str, capacity: u32, cells: u32, free_runs: String },
    #[error(transparent)]
    Maglev(#[from] maglev::MaglevError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// What is installed for one service.
#[derive(Clone, Debug)]
pub struct Installed {
    pub id: u32,
    pub config: config::Service,
    /// (offset, size) of its ring in `MAGLEV_RING`; `None` while it has no backend with weight.
    pub ring: Option<(u32, u32)>,
    /// The service's two slots, (offset, capacity): `live` holds the running ring (it starts at
    /// `ring`'s offset), `spare` is where the next one is built. See [`Tables`].
    live: Option<(u32, u32)>,
    spare: Option<(u32, u32)>,
    /// Backend id per ring slot.
    pub table: Vec<u32>,
    /// [`maglev::fingerprint`] of `table` read as backend addresses: equal on every node whose ring
    /// sends each slot to the same backend (ids differ between nodes, addresses do not).
    pub fingerprint: u64,
    /// The `[dataplane] hash_seed` the ring was built with.
    pub seed: u64,
    /// Backend address → backend id.
    pub backend_ids: BTreeMap<SocketAddr, u32>,
}

/// The control plane's view of the maps.
///
/// Cells: every service owns two slots of `MAGLEV_RING`, each as large as the largest ring its
/// desired configuration can produce ([`ring_capacity`]: what validation counts, so validation's
/// sum is also what the slots take). A rebuild writes the spare slot, switches the service entry to
/// it, and the old live slot becomes the spare; it is written no earlier than the next apply, when
/// packets still reading the old ring are long done. So every rebuild a health transition, drain or
/// weight change causes fits in the service's own cells and cannot fail for lack of space. Only a
/// change of capacity (a new service, a new `ring_size`, backends or weights that change a
/// sequence's length) allocates new slots, and if the free cells are too fragmented for them, that
/// change is refused before anything is written ([`ApplyError::RingSpace`]): never accepted and
/// failing later. (No compaction: a refused resize is fixed by a smaller ring or a fresh layout.)
/// A data plane adopted at restart keeps its running rings where they are; a service whose spare
/// cannot be placed there keeps running its ring, and the error is kept per service
/// ([`Tables::ring_errors`]) while its backends' down flags are still written.
pub struct Tables {
    /// Size of `MAGLEV_RING`.
    cells: u32,
    max_services: u32,
    max_backends: u32,
    free_cells: Vec<(u32, u32)>,
    /// Rings replaced during the last apply: still possibly read by packets in flight, so they are
    /// reused only from the next apply on.
    retired: Vec<(u32, u32)>,
    services: BTreeMap<ServiceKey, Installed>,
    used_service_ids: Vec<bool>,
    used_backend_ids: Vec<bool>,
    /// Generation of each backend id's current owner.
    generations: Vec<u32>,
    next_generation: u32,
    /// Per service name, why its ring could not be rebuilt in the last apply (see [`Tables`]).
    ring_errors: BTreeMap<String, String>,
    /// Per failing service, the slot capacity it could not place.
    ring_error_capacities: BTreeMap<String, u32>,
}

pub fn service_key(vip: SocketAddr, protocol: Protocol) -> ServiceKey {
    ServiceKey {
        addr: addr::from_ip(vip.ip()),
        port: vip.port().to_be(),
        proto: match protocol {
            Protocol::Tcp => m::PROTO_TCP,
            Protocol::Udp => m::PROTO_UDP,
        },
        _pad: 0,
    }
}

impl Tables {
    pub fn new(maglev_cells: u32, max_services: u32, max_backends: u32) -> Self {
        Self {
            cells: maglev_cells,
            max_services,
            max_backends,
            free_cells: vec![(0, maglev_cells)],
            retired: Vec::new(),
            services: BTreeMap::new(),
            used_service_ids: vec![false; max_services as usize],
            used_backend_ids: vec![false; max_backends as usize],
            generations: vec![0; max_backends as usize],
            next_generation: 1,
            ring_errors: BTreeMap::new(),
            ring_error_capacities: BTreeMap::new(),
        }
    }

    /// Per service name, why its ring could not be rebuilt in the last apply: it still runs its
    /// previous ring (the down flags of its backends are set all the same).
    pub fn ring_errors(&self) -> &BTreeMap<String, String> {
        &self.ring_errors
    }

    /// Per service whose ring could not be placed, the slot capacity it needed: a change that
    /// leaves a service failing with the same capacity did not make it fail.
    pub fn ring_error_capacities(&self) -> &BTreeMap<String, u32> {
        &self.ring_error_capacities
    }

    /// The generation of backend `id`'s current owner (0: free).
    pub fn generation(&self, id: u32) -> u32 {
        self.generations.get(id as usize).copied().unwrap_or(0)
    }

    pub fn services(&self) -> impl Iterator<Item = &Installed> {
        self.services.values()
    }

    /// The fingerprint of the ring installed for the service named `service` (see
    /// [`Installed::fingerprint`]); `None` if no such service is installed. Nodes announcing one VIP
    /// agree on its Maglev ring exactly when their fingerprints are equal. (Round-robin and
    /// least-conn rings follow the config's listing order, so only Maglev-based schedulers'
    /// fingerprints are comparable across differently written configs.)
    pub fn ring_fingerprint(&self, service: &str) -> Option<u64> {
        self.services.values().find(|i| i.config.name == service).map(|i| i.fingerprint)
    }

    /// Rebuilds this bookkeeping from the maps of a running data plane (a restarted daemon adopting
    /// pinned maps), so the next [`Tables::apply`] changes only what differs: backends keep their ids
    /// and generations (their flows stay put), rings are rebuilt from the running ones.
    pub fn adopt(&mut self, config: &Config, dataplane: &dyn MapReader) -> Result<usize, ReadError> {
        let by_key: HashMap<ServiceKey, &config::Service> =
            config.services.iter().map(|s| (service_key(s.vip, s.protocol), s)).collect();
        let mut adopted = 0;
        // One pass over the backend array, not one per service.
        let live_backends: Vec<(u32, m::Backend)> = (0..self.max_backends)
            .map(|id| dataplane.backend_entry(id).map(|b| (id, b)))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|(_, b)| b.generation != 0)
            .collect();
        for (key, entry) in dataplane.service_entries()? {
            let id = entry.id as usize;
            if id >= self.used_service_ids.len() || self.used_service_ids[id] {
                continue;
            }
            self.used_service_ids[id] = true;
            // A ring outside the cells or over another service's (a crash mid-write, a smaller
            // maglev_cells) is not read: the next apply builds this service a fresh one.
            let ring = (entry.ring_size > 0)
                .then_some((entry.ring_offset, entry.ring_size))
                .filter(|&(offset, size)| self.cells_free(offset, size));
            if ring.is_none() && entry.ring_size > 0 {
                tracing::warn!(
                    vip = %SocketAddr::new(addr::to_ip(&key.addr), u16::from_be(key.port)),
                    offset = entry.ring_offset,
                    size = entry.ring_size,
                    cells = self.cells,
                    "the pinned service entry points at an invalid ring; rebuilding it"
                );
            }
            let table = match ring {
                Some((offset, size)) => {
                    self.reserve_cells(offset, size);
                    dataplane.ring_cells(offset, size)?
                }
                None => Vec::new(),
            };
            let mut backend_ids = BTreeMap::new();
            let mut backends = Vec::new();
            for &(backend_id, b) in live_backends.iter().filter(|(_, b)| b.service_id == entry.id) {
                let address = SocketAddr::new(addr::to_ip(&b.addr), u16::from_be(b.port));
                self.used_backend_ids[backend_id as usize] = true;
                self.generations[backend_id as usize] = b.generation;
                self.next_generation = self.next_generation.max(b.generation.wrapping_add(1)).max(1);
                backend_ids.insert(address, backend_id);
                // Weight unknown: forces a ring rebuild from the desired state, which gives the
                // running ring again if it was built from the same backends and seed.
                backends.push(config::Backend {
                    address,
                    weight: u32::MAX,
                    backup: false,
                    drained: false,
                    health_check: None,
                    down: b.flags & m::BACKEND_FLAG_DOWN != 0,
                });
            }
            let mut adopted_config = match by_key.get(&key) {
                Some(s) => (*s).clone(),
                // Gone from the desired state while no daemon ran: the next apply removes it.
                None => config::Service {
                    name: format!("adopted-{}", entry.id),
                    vip: SocketAddr::new(addr::to_ip(&key.addr), u16::from_be(key.port)),
                    protocol: if key.proto == m::PROTO_UDP { Protocol::Udp } else { Protocol::Tcp },
                    mode: config::Mode::Nat,
                    scheduler: Scheduler::Maglev,
                    ring_size: entry.ring_size.max(3),
                    all_down: config::AllDown::Drop,
                    drain_timeout: std::time::Duration::ZERO,
                    passive_checks: false,
                    backends: Vec::new(),
                },
            };
            adopted_config.backends = backends;
            // Never "unchanged": the next apply rebuilds every adopted ring from the config, so a
            // ring naming a backend id that is free or another service's does not survive even when
            // the weights happen to match (e.g. a service with no backend left).
            adopted_config.ring_size = 0;
            let fingerprint = fingerprint_of(&table, &backend_ids);
            // The running ring's seed is unknown; the forced rebuild uses the configured one.
            let seed = config.dataplane.hash_seed;
            // The running ring's slot is only as large as the ring: the first apply gives the
            // service a spare (and a larger slot if its config needs one).
            self.services.insert(key, Installed { id: entry.id, config: adopted_config, ring, live: ring, spare: None, table, fingerprint, seed, backend_ids });
            adopted += 1;
        }
        Ok(adopted)
    }

    /// `[offset, offset + size)` lies inside the cells and entirely in one free range.
    fn cells_free(&self, offset: u32, size: u32) -> bool {
        let Some(end) = offset.checked_add(size) else { return false };
        end <= self.cells && self.free_cells.iter().any(|&(o, l)| o <= offset && end <= o + l)
    }

    /// Marks `[offset, offset + size)` as used.
    fn reserve_cells(&mut self, offset: u32, size: u32) {
        reserve_in(&mut self.free_cells, offset, size);
    }

    /// Makes the maps match `config`. On error the maps may hold a mix of old and new services, but
    /// every service entry is consistent (points at a complete ring of live backends).
    pub fn apply(&mut self, config: &Config, maps: &mut dyn MapWriter) -> Result<(), ApplyError> {
        self.apply_planned(config, config, maps)
    }

    /// [`Tables::apply`] for an effective configuration (weights after health, drain, backups)
    /// planned from `desired`, whose rings size each service's slots: a backend that is down now
    /// must still find room when it comes back.
    ///
    /// A service whose ring cannot be placed keeps its running ring, its backends' down flags are
    /// written all the same (established flows on a failed backend move), the other services are
    /// applied, and the first such error is returned (every one is in [`Tables::ring_errors`]).
    pub fn apply_planned(&mut self, config: &Config, desired: &Config, maps: &mut dyn MapWriter) -> Result<(), ApplyError> {
        let capacities: HashMap<String, u32> = desired.services.iter().map(|s| (s.name.clone(), ring_capacity(s))).collect();
        for range in std::mem::take(&mut self.retired) {
            self.release_cells(range);
        }
        let wanted: HashMap<ServiceKey, &config::Service> =
            config.services.iter().map(|s| (service_key(s.vip, s.protocol), s)).collect();

        let gone: Vec<ServiceKey> = self.services.keys().filter(|k| !wanted.contains_key(k)).copied().collect();
        for key in gone {
            self.remove(&key, maps)?;
        }
        self.ring_errors.retain(|name, _| config.services.iter().any(|s| &s.name == name));
        self.ring_error_capacities.retain(|name, _| self.ring_errors.contains_key(name));
        // One service's ring that cannot be placed does not stop the others' changes.
        let mut first_ring_error = None;
        for service in &config.services {
            let capacity = capacities.get(&service.name).copied().unwrap_or_else(|| ring_capacity(service));
            match self.upsert(service, capacity, config.dataplane.hash_seed, maps) {
                Ok(()) => {
                    self.ring_errors.remove(&service.name);
                    self.ring_error_capacities.remove(&service.name);
                }
                Err(e @ ApplyError::RingSpace { capacity, .. }) => {
                    self.ring_error_capacities.insert(service.name.clone(), capacity);
                    self.ring_errors.insert(service.name.clone(), e.to_string());
                    first_ring_error.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        first_ring_error.map_or(Ok(()), Err)
    }

    fn remove(&mut self, key: &ServiceKey, maps: &mut dyn MapWriter) -> Result<(), ApplyError> {
        let installed = self.services.remove(key).expect("caller passes installed keys");
        maps.remove_service(key)?;
        for &id in installed.backend_ids.values() {
            self.free_backend(id, maps)?;
        }
        // The live ring may still be read by packets in flight; the spare is at least an apply old.
        if let Some(live) = installed.live {
            self.retired.push(live);
        }
        if let Some(spare) = installed.spare {
            self.release_cells(spare);
        }
        self.used_service_ids[installed.id as usize] = false;
        Ok(())
    }

    fn upsert(&mut self, service: &config::Service, capacity: u32, seed: u64, maps: &mut dyn MapWriter) -> Result<(), ApplyError> {
        let key = service_key(service.vip, service.protocol);
        let is_new = !self.services.contains_key(&key);
        let mut installed = match self.services.get(&key) {
            Some(existing) if existing.config == *service && existing.seed == seed && slots_fit(existing, capacity) => return Ok(()),
            Some(existing) => existing.clone(),
            None => {
                let id = take_id(&mut self.used_service_ids).ok_or(ApplyError::ServiceIds(self.max_services))?;
                maps.clear_service_stats(id)?;
                let fingerprint = maglev::fingerprint::<[u8; maglev::IDENTITY_LEN]>(&[]);
                Installed {
                    id,
                    config: service.clone(),
                    ring: None,
                    live: None,
                    spare: None,
                    table: Vec::new(),
                    fingerprint,
                    seed,
                    backend_ids: BTreeMap::new(),
                }
            }
        };
        let old_backend_ids = installed.backend_ids.clone();

        // 1. Backends that are new to this service get an id and a fresh generation; backends coming
        //    back up are marked up before any ring can name them.
        let was_down: HashMap<SocketAddr, bool> = installed.config.backends.iter().map(|b| (b.address, b.down)).collect();
        let mut backend_ids = BTreeMap::new();
        let mut going_down = Vec::new();
        for b in &service.backends {
            let id = match old_backend_ids.get(&b.address) {
                Some(&id) => id,
                None => {
                    let id = take_id(&mut self.used_backend_ids).ok_or(ApplyError::BackendIds(self.max_backends))?;
                    self.generations[id as usize] = self.next_generation;
                    self.next_generation = self.next_generation.checked_add(1).unwrap_or(1);
                    maps.clear_backend_stats(id)?;
                    self.write_backend(maps, id, installed.id, b)?;
                    backend_ids.insert(b.address, id);
                    continue;
                }
            };
            match (was_down.get(&b.address).copied().unwrap_or(false), b.down) {
                (true, false) => self.write_backend(maps, id, installed.id, b)?,
                (false, true) => going_down.push((id, b.clone())),
                _ => {}
            }
            backend_ids.insert(b.address, id);
        }

        // 2. The new ring: a pure function of the backends, their effective weights, the ring size
        //    and the seed, so every node with the same desired state builds the same one, whatever
        //    changes led there.
        let weights = |s: &config::Service| s.backends.iter().map(|b| (b.address, b.weight)).collect::<Vec<_>>();
        let ring_unchanged = installed.config.ring_size == service.ring_size
            && installed.config.scheduler == service.scheduler
            && weights(&installed.config) == weights(service)
            && installed.seed == seed
            && !installed.table.is_empty();
        let rebuilt = if ring_unchanged { None } else { Some(ring_cells(service, &backend_ids, seed)?) };
        // A ring equal to the running one (a restart's adopted ring, a change that moves no slot)
        // is kept where it is.
        let rebuilt = rebuilt.filter(|t| *t != installed.table || installed.ring.is_some() == t.is_empty());
        let capacity = capacity.max(rebuilt.as_ref().map_or(0, |t| t.len() as u32));
        let slots_fit = slots_fit(&installed, capacity);
        // New slots (a new service, another capacity, an adopted ring) move even an unchanged ring.
        let next = match rebuilt {
            Some(table) => Some(table),
            None if !slots_fit => Some(installed.table.clone()),
            None => None,
        };
        let placed = match &next {
            None => Ok(installed.ring),
            Some(table) if slots_fit => Ok(self.write_spare(&mut installed, table, maps)?),
            Some(table) => self.reslot(&mut installed, table, capacity, service, maps),
        };
        let ring = match placed {
            Ok(ring) => ring,
            Err(e @ ApplyError::RingSpace { .. }) if !is_new => {
                // The running ring stays, but a failed backend is still marked down: its
                // established flows move (and its failure is reported, see `ring_errors`).
                for (id, b) in &going_down {
                    self.write_backend(maps, *id, installed.id, b)?;
                }
                // New backends keep their ids; removed ones stay until a ring without them runs.
                // The bookkeeping records the down flags as written, so the next apply clears them
                // when their backends recover (the config stays the old one: the ring is retried).
                for b in &mut installed.config.backends {
                    if let Some(now) = service.backends.iter().find(|n| n.address == b.address) {
                        b.down = now.down;
                    }
                }
                let added = service.backends.iter().filter(|b| !old_backend_ids.contains_key(&b.address)).cloned();
                installed.config.backends.extend(added.collect::<Vec<_>>());
                installed.backend_ids.extend(backend_ids);
                self.services.insert(key, installed);
                return Err(e);
            }
            Err(e) => {
                if is_new {
                    // Nothing of it was switched on: give back what it took.
                    for &id in backend_ids.values() {
                        self.free_backend(id, maps)?;
                    }
                    self.used_service_ids[installed.id as usize] = false;
                }
                return Err(e);
            }
        };
        if let Some(table) = next {
            installed.fingerprint = fingerprint_of(&table, &backend_ids);
            installed.table = table;
        }
        installed.seed = seed;

        // 3. The switch: one update of the service entry.
        let (ring_offset, ring_size) = ring.unwrap_or((0, 0));
        let mut flags = 0;
        if service.mode == Mode::Dsr {
            flags |= m::SERVICE_FLAG_DSR;
        }
        let scheduler = match service.scheduler {
            Scheduler::Maglev | Scheduler::LeastResponseTime => m::SCHED_MAGLEV,
            Scheduler::IpHash => m::SCHED_IP_HASH,
            Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => m::SCHED_SEQUENCE,
            Scheduler::LeastConn => m::SCHED_LEAST_CONN,
        };
        flags |= scheduler << m::SCHEDULER_SHIFT;
        maps.write_service(&key, &m::Service { id: installed.id, ring_offset, ring_size, flags })?;

        // 4. Backends that went down (their flows move on their next packet) and backends that left
        //    (their flows reschedule, since their generation no longer matches).
        for (id, b) in &going_down {
            self.write_backend(maps, *id, installed.id, b)?;
        }
        for (address, &id) in &old_backend_ids {
            if !backend_ids.contains_key(address) {
                self.free_backend(id, maps)?;
            }
        }
        installed.ring = ring;
        installed.backend_ids = backend_ids;
        installed.config = service.clone();
        self.services.insert(key, installed);
        Ok(())
    }

    fn write_backend(&self, maps: &mut dyn MapWriter, id: u32, service_id: u32, b: &config::Backend) -> Result<(), ApplyError> {
        let entry = m::Backend {
            addr: addr::from_ip(b.address.ip()),
            port: b.address.port().to_be(),
            flags: if b.down { m::BACKEND_FLAG_DOWN } else { 0 },
            service_id,
            generation: self.generations[id as usize],
        };
        Ok(maps.write_backend(id, &entry)?)
    }

    fn free_backend(&mut self, id: u32, maps: &mut dyn MapWriter) -> Result<(), ApplyError> {
        maps.write_backend(id, &m::Backend::default())?;
        self.used_backend_ids[id as usize] = false;
        Ok(())
    }

    /// A rebuild within the service's slots: writes the spare, which becomes live at the switch
    /// (the caller writes the service entry next); the old live slot becomes the spare.
    fn write_spare(&mut self, installed: &mut Installed, table: &[u32], maps: &mut dyn MapWriter) -> Result<Option<(u32, u32)>, ApplyError> {
        if table.is_empty() {
            return Ok(None);
        }
        let spare = installed.spare.expect("slots_fit checked");
        maps.write_ring(spare.0, table)?;
        installed.spare = installed.live;
        installed.live = Some(spare);
        Ok(Some((spare.0, table.len() as u32)))
    }

    /// New slots of `capacity` for the service, planned on a copy of the free list so a refusal
    /// changes nothing: the new live slot must not overlap the running ring (written now, while it
    /// serves); the new spare may take the running ring's cells, since it is written no earlier
    /// than the next apply. The running ring's other cells are retired (reused from the next apply).
    fn reslot(
        &mut self,
        installed: &mut Installed,
        table: &[u32],
        capacity: u32,
        service: &config::Service,
        maps: &mut dyn MapWriter,
    ) -> Result<Option<(u32, u32)>, ApplyError> {
        let mut free = self.free_cells.clone();
        // The spare is not read by any packet: its cells are free now.
        if let Some(spare) = installed.spare {
            release_into(&mut free, spare);
        }
        let refused = |free: &[(u32, u32)]| ApplyError::RingSpace {
            service: service.name.clone(),
            field: capacity_field(service),
            capacity,
            cells: self.cells,
            free_runs: {
                let mut runs: Vec<u32> = free.iter().map(|r| r.1).collect();
                runs.sort_unstable_by(|a, b| b.cmp(a));
                match runs.as_slice() {
                    [] => "none".to_string(),
                    [one] => one.to_string(),
                    [a, b, ..] => format!("{a} and {b}"),
                }
            },
        };
        let (live, spare) = if capacity == 0 {
            (None, None)
        } else {
            let largest_now = free.clone();
            let live = take_from(&mut free, capacity).ok_or_else(|| refused(&largest_now))?;
            if let Some(old) = installed.live {
                release_into(&mut free, old);
            }
            let spare = take_from(&mut free, capacity).ok_or_else(|| refused(&largest_now))?;
            (Some((live, capacity)), Some((spare, capacity)))
        };
        if let Some((offset, size)) = installed.live {
            // Cells of the running ring the new spare did not take: still read by packets in flight.
            let end = offset + size;
            for (o, e) in [(offset, spare.map_or(end, |s| s.0.clamp(offset, end))), (spare.map_or(end, |s| (s.0 + s.1).clamp(offset, end)), end)] {
                if e > o {
                    reserve_in(&mut free, o, e - o);
                    self.retired.push((o, e - o));
                }
            }
        }
        self.free_cells = free;
        installed.live = live;
        installed.spare = spare;
        match live {
            Some((offset, _)) if !table.is_empty() => {
                maps.write_ring(offset, table)?;
                Ok(Some((offset, table.len() as u32)))
            }
            _ => Ok(None),
        }
    }

    fn release_cells(&mut self, range: (u32, u32)) {
        release_into(&mut self.free_cells, range);
    }
}

/// The cells a service's slot needs: the largest ring its desired configuration can produce, as
/// validation counts it (a ring of `ring_size` for Maglev-based schedulers, one cell per backend
/// for round-robin and least-conn, the weighted sequence's length for weighted round-robin).
pub fn ring_capacity(service: &config::Service) -> u32 {
    let n = match service.scheduler {
        Scheduler::RoundRobin | Scheduler::LeastConn => service.backends.len() as u64,
        Scheduler::WeightedRoundRobin => {
            sequence::smooth_weighted_len(&service.backends.iter().map(|b| b.weight).collect::<Vec<_>>())
        }
        Scheduler::Maglev | Scheduler::IpHash | Scheduler::LeastResponseTime => u64::from(service.ring_size),
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The service's two slots are there and exactly `capacity` large (none for 0).
fn slots_fit(installed: &Installed, capacity: u32) -> bool {
    if capacity == 0 {
        installed.live.is_none() && installed.spare.is_none()
    } else {
        installed.live.is_some_and(|l| l.1 == capacity) && installed.spare.is_some_and(|s| s.1 == capacity)
    }
}

/// The setting that decides a service's [`ring_capacity`], for errors.
fn capacity_field(service: &config::Service) -> &'static str {
    match service.scheduler {
        Scheduler::RoundRobin | Scheduler::LeastConn => "its backend count",
        Scheduler::WeightedRoundRobin => "its weighted sequence (sum of weights / their gcd)",
        Scheduler::Maglev | Scheduler::IpHash | Scheduler::LeastResponseTime => "ring_size",
    }
}

/// First fit over free cell ranges.
fn take_from(free: &mut Vec<(u32, u32)>, size: u32) -> Option<u32> {
    let i = free.iter().position(|&(_, len)| len >= size)?;
    let (offset, len) = free[i];
    if len == size {
        free.remove(i);
    } else {
        free[i] = (offset + size, len - size);
    }
    Some(offset)
}

/// Adds a range to a free list, merging neighbours so large rings keep fitting after many
/// replacements.
fn release_into(free: &mut Vec<(u32, u32)>, range: (u32, u32)) {
    free.push(range);
    free.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(free.len());
    for &(o, l) in free.iter() {
        match merged.last_mut() {
            Some((mo, ml)) if *mo + *ml == o => *ml += l,
            _ => merged.push((o, l)),
        }
    }
    *free = merged;
}

/// Removes `[offset, offset + size)` from a free list.
fn reserve_in(free: &mut Vec<(u32, u32)>, offset: u32, size: u32) {
    let end = offset + size;
    let mut next = Vec::with_capacity(free.len() + 1);
    for &(o, l) in free.iter() {
        let e = o + l;
        if e <= offset || o >= end {
            next.push((o, l));
            continue;
        }
        if o < offset {
            next.push((o, offset - o));
        }
        if e > end {
            next.push((end, e - end));
        }
    }
    *free = next;
}

/// The ring for the service's scheduler, as backend ids: a Maglev table (a pure function of the
/// backends' addresses and weights, the ring size and `seed`), a round-robin sequence, or the
/// least-conn candidates (both in the config's order, which their documented tie-breaks follow).
fn ring_cells(service: &config::Service, backend_ids: &BTreeMap<SocketAddr, u32>, seed: u64) -> Result<Vec<u32>, ApplyError> {
    let id_of = |i: usize| backend_ids[&service.backends[i].address];
    let with_weight = || (0..service.backends.len()).filter(|&i| service.backends[i].weight > 0);
    Ok(match service.scheduler {
        Scheduler::RoundRobin | Scheduler::LeastConn => with_weight().map(id_of).collect(),
        Scheduler::WeightedRoundRobin => {
            let weights: Vec<u32> = service.backends.iter().map(|b| b.weight).collect();
            sequence::smooth_weighted(&weights).into_iter().map(id_of).collect()
        }
        Scheduler::Maglev | Scheduler::IpHash | Scheduler::LeastResponseTime => {
            let identities: Vec<[u8; maglev::IDENTITY_LEN]> = service.backends.iter().map(|b| maglev::identity(b.address)).collect();
            let candidates: Vec<Candidate<'_>> = service
                .backends
                .iter()
                .zip(&identities)
                .map(|(b, identity)| Candidate { identity, weight: b.weight })
                .collect();
            let slots = maglev::build(&candidates, service.ring_size, seed)?;
            slots.iter().map(|&i| id_of(i as usize)).collect()
        }
    })
}

/// [`maglev::fingerprint`] of a ring of backend ids, read as the backends' addresses. A cell whose id
/// names no backend of the service (only possible in an adopted ring) counts as an empty identity.
fn fingerprint_of(table: &[u32], backend_ids: &BTreeMap<SocketAddr, u32>) -> u64 {
    let identity_of: HashMap<u32, [u8; maglev::IDENTITY_LEN]> = backend_ids.iter().map(|(&a, &id)| (id, maglev::identity(a))).collect();
    let cells: Vec<&[u8]> = table.iter().map(|id| identity_of.get(id).map_or(&[][..], |i| &i[..])).collect();
    maglev::fingerprint(&cells)
}

fn take_id(used: &mut [bool]) -> Option<u32> {
    let id = used.iter().position(|u| !u)?;
    used[id] = true;
    Some(id as u32)
}

#[cfg(test)]
mod tests;
