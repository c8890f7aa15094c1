use super::*;
use crate::config::Config;

/// Records writes in order and keeps the resulting map contents, like the kernel would.
#[derive(Default)]
struct FakeMaps {
    log: Vec<String>,
    backends: HashMap<u32, m::Backend>,
    ring: HashMap<u32, u32>,
    services: HashMap<ServiceKey, m::Service>,
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
    fn remove_service(&mut self, _key: &ServiceKey) -> Result<(), WriteError> {
        self.log.push("remove service".into());
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
