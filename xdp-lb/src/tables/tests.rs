use super::*;
use crate::config::Config;

/// Records writes in order and keeps the resulting map contents, like the kernel would.
#[derive(Default)]
struct FakeMaps {
    log: Vec<String>,
    backends: HashMap<u32, m::Backend>,
    ring: HashMap<u32, u32>,
    services: HashMap<ServiceKey, m::Service>,
    /// Size of the ring array: reads past it fail, as the kernel's do.
    cells: Option<u32>,
}

impl MapReader for FakeMaps {
    fn service_entries(&self) -> Result<Vec<(ServiceKey, m::Service)>, ReadError> {
        Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
    }
    fn backend_entry(&self, id: u32) -> Result<m::Backend, ReadError> {
        Ok(self.backends.get(&id).copied().unwrap_or_default())
    }
    fn ring_cells(&self, offset: u32, size: u32) -> Result<Vec<u32>, ReadError> {
        (offset..offset.saturating_add(size))
            .map(|i| match self.cells {
                Some(cells) if i >= cells => Err(ReadError { map: "MAGLEV_RING", message: format!("index {i} out of bounds") }),
                _ => Ok(self.ring.get(&i).copied().unwrap_or(0)),
            })
            .collect()
    }
}

impl MapWriter for FakeMaps {
    fn write_backend(&mut self, id: u32, backend: &m::Backend) -> Result<(), WriteError> {
        self.log.push(format!("backend {id} gen {}", backend.generation));
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn write_ring(&mut self, offset: u32, cells: &[u32]) -> Result<(), WriteError> {
        self.log.push(format!("ring {offset}+{}", cells.len()));
        for (i, &c) in cells.iter().enumerate() {
            self.ring.insert(offset + i as u32, c);
        }
        Ok(())
    }
    fn write_service(&mut self, key: &ServiceKey, service: &m::Service) -> Result<(), WriteError> {
        self.log.push(format!("service {} ring {}+{}", service.id, service.ring_offset, service.ring_size));
        self.services.insert(*key, *service);
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), WriteError> {
        self.log.push("remove service".into());
        self.services.remove(key);
        Ok(())
    }
    fn clear_service_stats(&mut self, _id: u32) -> Result<(), WriteError> {
        Ok(())
    }
    fn clear_backend_stats(&mut self, _id: u32) -> Result<(), WriteError> {
        Ok(())
    }
}

fn config(backends: &[&str]) -> Config {
    let mut text = String::from("[[services]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nprotocol = \"tcp\"\nring_size = 251\n");
    for b in backends {
        text += &format!("[[services.backends]]\naddress = \"{b}\"\n");
    }
    Config::parse(&text, "test").unwrap()
}

/// Every slot of the service's live ring names a live backend of the service.
fn assert_consistent(maps: &FakeMaps) {
    for s in maps.services.values() {
        for cell in s.ring_offset..s.ring_offset + s.ring_size {
            let id = maps.ring[&cell];
            let b = maps.backends[&id];
            assert!(b.generation != 0 && b.service_id == s.id, "cell {cell} names dead backend {id}");
        }
    }
}

#[test]
fn removing_a_backend_switches_the_ring_before_clearing_it() {
    let mut maps = FakeMaps::default();
    let mut tables = Tables::new(10_000, 16, 64);
    tables.apply(&config(&["10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80"]), &mut maps).unwrap();
    assert_consistent(&maps);
    maps.log.clear();

    tables.apply(&config(&["10.1.0.2:80", "10.1.0.4:80"]), &mut maps).unwrap();
    assert_eq!(maps.log, ["ring 251+251", "service 0 ring 251+251", "backend 1 gen 0"]);
    assert_consistent(&maps);
}

#[test]
fn unchanged_config_writes_nothing_and_rings_are_reused_after_a_grace_apply() {
    let mut maps = FakeMaps::default();
    let mut tables = Tables::new(502, 16, 64);
    let a = config(&["10.1.0.2:80"]);
    let b = config(&["10.1.0.2:80", "10.1.0.3:80"]);
    tables.apply(&a, &mut maps).unwrap();
    maps.log.clear();
    tables.apply(&a, &mut maps).unwrap();
    assert!(maps.log.is_empty(), "{:?}", maps.log);
    // Only two rings fit: alternating configs must keep recycling the retired one.
    for i in 0..6 {
        tables.apply(if i % 2 == 0 { &b } else { &a }, &mut maps).unwrap();
        assert_consistent(&maps);
    }
}

#[test]
fn new_backend_ids_get_new_generations() {
    let mut maps = FakeMaps::default();
    let mut tables = Tables::new(10_000, 16, 64);
    tables.apply(&config(&["10.1.0.2:80"]), &mut maps).unwrap();
    let first = maps.backends[&0].generation;
    tables.apply(&config(&[]), &mut maps).unwrap();
    assert_eq!(maps.services.values().next().unwrap().ring_size, 0, "no backend: empty ring");
    tables.apply(&config(&["10.1.0.9:80"]), &mut maps).unwrap();
    assert_eq!(maps.backends[&0].service_id, 0);
    assert_ne!(maps.backends[&0].generation, first, "a reused id must not match old flows");
    assert_consistent(&maps);
}

/// The installed ring as backend addresses: what must agree across nodes (ids need not).
fn ring_addresses(tables: &Tables) -> Vec<SocketAddr> {
    let installed = tables.services().next().unwrap();
    let address_of: HashMap<u32, SocketAddr> = installed.backend_ids.iter().map(|(&a, &id)| (id, a)).collect();
    installed.table.iter().map(|id| address_of[id]).collect()
}

fn installed_with(text: &str) -> Tables {
    let mut tables = Tables::new(10_000, 16, 64);
    tables.apply(&Config::parse(text, "test").unwrap(), &mut FakeMaps::default()).unwrap();
    tables
}

fn seeded(seed: u64, backends: &[&str]) -> String {
    let mut text = format!("[dataplane]\nhash_seed = {seed}\n[[services]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nprotocol = \"tcp\"\nring_size = 251\n");
    for b in backends {
        text += &format!("[[services.backends]]\naddress = \"{b}\"\n");
    }
    text
}

/// Issue 11: a node that removed and re-added a backend must hold the ring a fresh node builds.
#[test]
fn remove_then_add_installs_the_ring_a_fresh_node_builds() {
    let mut maps = FakeMaps::default();
    let mut tables = Tables::new(10_000, 16, 64);
    tables.apply(&config(&["10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80"]), &mut maps).unwrap();
    let before = ring_addresses(&tables);
    let fingerprint = tables.ring_fingerprint("web").unwrap();
    tables.apply(&config(&["10.1.0.2:80", "10.1.0.4:80"]), &mut maps).unwrap();
    assert_ne!(tables.ring_fingerprint("web"), Some(fingerprint));
    tables.apply(&config(&["10.1.0.2:80", "10.1.0.4:80", "10.1.0.3:80"]), &mut maps).unwrap();
    assert_consistent(&maps);
    assert_eq!(ring_addresses(&tables), before);
    assert_eq!(tables.ring_fingerprint("web"), Some(fingerprint));
    // A fresh node, listing the backends in another order, agrees.
    let fresh = installed_with(&seeded(maglev::DEFAULT_SEED, &["10.1.0.4:80", "10.1.0.3:80", "10.1.0.2:80"]));
    assert_eq!(ring_addresses(&fresh), before);
    assert_eq!(fresh.ring_fingerprint("web"), Some(fingerprint));
    assert_eq!(fresh.ring_fingerprint("other"), None);
}

#[test]
fn fingerprint_is_of_the_installed_ring() {
    let tables = installed_with(&seeded(7, &["10.1.0.2:80", "10.1.0.3:80"]));
    let cells: Vec<[u8; maglev::IDENTITY_LEN]> = ring_addresses(&tables).into_iter().map(maglev::identity).collect();
    assert_eq!(tables.ring_fingerprint("web"), Some(maglev::fingerprint(&cells)));
    // A service without backends has an empty ring, and the empty ring's fingerprint.
    let empty = installed_with(&seeded(7, &[]));
    assert_eq!(empty.ring_fingerprint("web"), Some(maglev::fingerprint::<[u8; maglev::IDENTITY_LEN]>(&[])));
}

#[test]
fn the_seed_decides_the_ring_and_a_new_seed_rebuilds_it() {
    let backends = ["10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80"];
    let (a, b) = (installed_with(&seeded(1, &backends)), installed_with(&seeded(2, &backends)));
    assert_ne!(ring_addresses(&a), ring_addresses(&b));
    assert_ne!(a.ring_fingerprint("web"), b.ring_fingerprint("web"));

    let mut maps = FakeMaps::default();
    let mut tables = Tables::new(10_000, 16, 64);
    tables.apply(&Config::parse(&seeded(1, &backends), "test").unwrap(), &mut maps).unwrap();
    maps.log.clear();
    tables.apply(&Config::parse(&seeded(2, &backends), "test").unwrap(), &mut maps).unwrap();
    assert_eq!(maps.log, ["ring 251+251", "service 0 ring 251+251"], "same backends, new seed: a new ring");
    assert_eq!(ring_addresses(&tables), ring_addresses(&b));
    assert_consistent(&maps);
}

const CELLS: u32 = 10_000;
const MAX_SERVICES: u32 = 16;
const MAX_BACKENDS: u32 = 64;

fn two_services(web: &[&str], api: &[&str]) -> Config {
    let mut text = String::new();
    for (name, vip, backends) in [("web", "10.0.0.100:80", web), ("api", "10.0.0.101:80", api)] {
        text += &format!("[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\nring_size = 251\n");
        for b in backends {
            text += &format!("[[services.backends]]\naddress = \"{b}\"\n");
        }
    }
    Config::parse(&text, "test").unwrap()
}

/// Maps programmed by one daemon, and a fresh daemon's tables that adopted them.
fn programmed_then_adopted(first: &Config, adopt_with: &Config, corrupt: impl FnOnce(&mut FakeMaps)) -> (FakeMaps, Tables, Result<usize, ReadError>) {
    let mut maps = FakeMaps { cells: Some(CELLS), ..Default::default() };
    Tables::new(CELLS, MAX_SERVICES, MAX_BACKENDS).apply(first, &mut maps).unwrap();
    corrupt(&mut maps);
    let mut tables = Tables::new(CELLS, MAX_SERVICES, MAX_BACKENDS);
    let adopted = tables.adopt(adopt_with, &maps);
    (maps, tables, adopted)
}

fn service_entry(maps: &FakeMaps, vip: &str) -> m::Service {
    maps.services[&service_key(vip.parse().unwrap(), Protocol::Tcp)]
}

#[test]
fn adopting_a_consistent_set_keeps_ids_generations_and_slots() {
    let cfg = config(&["10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80"]);
    let (mut maps, mut tables, adopted) = programmed_then_adopted(&cfg, &cfg, |_| {});
    assert_eq!(adopted.unwrap(), 1);
    let backends_before = maps.backends.clone();
    let entry = service_entry(&maps, "10.0.0.100:80");
    let slots_before: Vec<u32> = (entry.ring_offset..entry.ring_offset + entry.ring_size).map(|c| maps.ring[&c]).collect();
    maps.log.clear();
    tables.apply(&cfg, &mut maps).unwrap();
    assert_consistent(&maps);
    assert_eq!(maps.backends, backends_before, "backends keep their ids and generations (their flows stay put)");
    let entry = service_entry(&maps, "10.0.0.100:80");
    let slots_after: Vec<u32> = (entry.ring_offset..entry.ring_offset + entry.ring_size).map(|c| maps.ring[&c]).collect();
    assert_eq!(slots_after, slots_before, "the rebuilt ring keeps every slot");
    assert!(maps.log.iter().all(|w| !w.starts_with("backend")), "no backend rewritten: {:?}", maps.log);
    // A new backend later gets a generation no adopted backend has.
    tables.apply(&config(&["10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80", "10.1.0.5:80"]), &mut maps).unwrap();
    let generations: Vec<u32> = maps.backends.values().map(|b| b.generation).filter(|&g| g != 0).collect();
    let unique: std::collections::HashSet<_> = generations.iter().collect();
    assert_eq!(unique.len(), generations.len(), "generations are unique: {generations:?}");
    assert_consistent(&maps);
}

#[test]
fn adopting_a_ring_with_a_dangling_backend_id_rebuilds_it() {
    // A ring cell names a backend id that is free: e.g. a daemon killed between writes.
    let cfg = config(&["10.1.0.2:80", "10.1.0.3:80"]);
    let dangle = |maps: &mut FakeMaps| {
        let entry = service_entry(maps, "10.0.0.100:80");
        maps.ring.insert(entry.ring_offset + 7, 40);
    };
    let (mut maps, mut tables, adopted) = programmed_then_adopted(&cfg, &cfg, dangle);
    adopted.unwrap();
    tables.apply(&cfg, &mut maps).unwrap();
    assert_consistent(&maps);

    // The same when the desired service has no backend left: its ring must not survive.
    let empty = config(&[]);
    let (mut maps, mut tables, adopted) = programmed_then_adopted(&cfg, &empty, |maps| {
        dangle(maps);
        for b in maps.backends.values_mut() {
            *b = m::Backend::default();
        }
    });
    adopted.unwrap();
    tables.apply(&empty, &mut maps).unwrap();
    assert_consistent(&maps);
    assert_eq!(service_entry(&maps, "10.0.0.100:80").ring_size, 0, "no backend: no ring");
}

#[test]
fn adopting_a_ring_outside_the_cells_rebuilds_it_inside() {
    let cfg = config(&["10.1.0.2:80", "10.1.0.3:80"]);
    for (offset, size) in [(CELLS - 10, 251), (u32::MAX - 5, 251)] {
        let (mut maps, mut tables, adopted) = programmed_then_adopted(&cfg, &cfg, |maps| {
            let key = service_key("10.0.0.100:80".parse().unwrap(), Protocol::Tcp);
            let entry = maps.services.get_mut(&key).unwrap();
            entry.ring_offset = offset;
            entry.ring_size = size;
        });
        assert_eq!(adopted.unwrap_or_else(|e| panic!("ring at {offset}+{size}: {e}")), 1);
        tables.apply(&cfg, &mut maps).unwrap();
        let entry = service_entry(&maps, "10.0.0.100:80");
        assert!(entry.ring_offset + entry.ring_size <= CELLS && entry.ring_size == 251, "{entry:?}");
        assert_consistent(&maps);
    }
}

#[test]
fn adopting_overlapping_rings_gives_each_service_its_own() {
    let cfg = two_services(&["10.1.0.2:80"], &["10.1.0.3:80"]);
    let (mut maps, mut tables, adopted) = programmed_then_adopted(&cfg, &cfg, |maps| {
        // api's entry points into web's ring.
        let web = service_entry(maps, "10.0.0.100:80");
        let key = service_key("10.0.0.101:80".parse().unwrap(), Protocol::Tcp);
        maps.services.get_mut(&key).unwrap().ring_offset = web.ring_offset;
    });
    assert_eq!(adopted.unwrap(), 2);
    tables.apply(&cfg, &mut maps).unwrap();
    assert_consistent(&maps);
    let (web, api) = (service_entry(&maps, "10.0.0.100:80"), service_entry(&maps, "10.0.0.101:80"));
    let (a, b) = ((web.ring_offset, web.ring_offset + web.ring_size), (api.ring_offset, api.ring_offset + api.ring_size));
    assert!(a.1 <= b.0 || b.1 <= a.0, "rings overlap: web {a:?}, api {b:?}");
}

#[test]
fn adopting_a_service_the_config_no_longer_has_removes_it_on_apply() {
    let both = two_services(&["10.1.0.2:80"], &["10.1.0.3:80", "10.1.0.4:80"]);
    let web_only = config(&["10.1.0.2:80"]);
    let (mut maps, mut tables, adopted) = programmed_then_adopted(&both, &web_only, |_| {});
    assert_eq!(adopted.unwrap(), 2, "both running services are adopted");
    let web_backend = maps.backends.iter().find(|(_, b)| b.generation != 0 && b.port == 80u16.to_be() && b.addr == addr::from_ip("10.1.0.2".parse().unwrap())).map(|(id, b)| (*id, *b)).unwrap();
    tables.apply(&web_only, &mut maps).unwrap();
    assert_eq!(maps.services.len(), 1, "api is gone from the map");
    assert!(!maps.services.contains_key(&service_key("10.0.0.101:80".parse().unwrap(), Protocol::Tcp)));
    let live: Vec<u32> = maps.backends.iter().filter(|(_, b)| b.generation != 0).map(|(id, _)| *id).collect();
    assert_eq!(live, [web_backend.0], "api's backends are cleared, web's kept");
    assert_eq!(maps.backends[&web_backend.0], web_backend.1);
    assert_eq!(tables.services().count(), 1);
    assert_consistent(&maps);
}

#[test]
fn a_failing_map_read_is_an_error_naming_the_map() {
    struct Broken;
    impl MapReader for Broken {
        fn service_entries(&self) -> Result<Vec<(ServiceKey, m::Service)>, ReadError> {
            Ok(Vec::new())
        }
        fn backend_entry(&self, id: u32) -> Result<m::Backend, ReadError> {
            Err(ReadError { map: "BACKENDS", message: format!("entry {id}: permission denied") })
        }
        fn ring_cells(&self, _: u32, _: u32) -> Result<Vec<u32>, ReadError> {
            Ok(Vec::new())
        }
    }
    let err = Tables::new(CELLS, MAX_SERVICES, MAX_BACKENDS).adopt(&config(&[]), &Broken).unwrap_err();
    assert!(err.to_string().contains("BACKENDS") && err.to_string().contains("entry 0"), "{err}");
}
