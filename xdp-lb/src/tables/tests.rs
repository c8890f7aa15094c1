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

/// `web` (Maglev, `ring_size`) and `echo` (round-robin), three backends each, in `cells` cells.
fn web_and_echo(cells: u32, web_ring: u32) -> Config {
    let mut text = format!("[dataplane]\nmaglev_cells = {cells}\n");
    text += &format!("[[services]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nprotocol = \"tcp\"\nring_size = {web_ring}\n");
    for i in 2..5 {
        text += &format!("[[services.backends]]\naddress = \"10.1.0.{i}:80\"\n");
    }
    text += "[[services]]\nname = \"echo\"\nvip = \"10.0.0.100:7\"\nprotocol = \"tcp\"\nscheduler = \"round-robin\"\n";
    for i in 2..5 {
        text += &format!("[[services.backends]]\naddress = \"10.2.0.{i}:7\"\n");
    }
    Config::parse(&text, "test").unwrap()
}

/// What the planner makes of `desired` when `down` failed its checks: out of the ring, marked down.
fn with_down(desired: &Config, down: &[SocketAddr]) -> Config {
    let mut effective = desired.clone();
    for b in effective.services.iter_mut().flat_map(|s| s.backends.iter_mut()) {
        if down.contains(&b.address) {
            b.weight = 0;
            b.down = true;
        }
    }
    effective
}

fn backend_flags(maps: &FakeMaps, address: &str) -> u16 {
    let address: SocketAddr = address.parse().unwrap();
    let (ip, port) = (addr::from_ip(address.ip()), address.port().to_be());
    maps.backends.values().find(|b| b.generation != 0 && b.addr == ip && b.port == port).unwrap().flags
}

/// The tester's H7: `maglev_cells = 65536`, a second service, then `--ring-size 32749` for web.
/// Validation's sum allows it (2 × 32749 + 6 ≤ 65536), but no two runs of 32749 free cells exist
/// while web's ring serves: the resize is refused at once, and health transitions keep working.
#[test]
fn a_resize_whose_rebuilds_could_not_be_placed_is_refused_at_once() {
    let mut maps = FakeMaps { cells: Some(65_536), ..Default::default() };
    let mut tables = Tables::new(65_536, MAX_SERVICES, MAX_BACKENDS);
    let start = web_and_echo(65_536, 251);
    tables.apply(&start, &mut maps).unwrap();
    let resized = web_and_echo(65_536, 32_749);
    let err = tables.apply(&resized, &mut maps).expect_err("the resize must be refused when it is made, not at the next rebuild");
    let text = err.to_string();
    assert!(text.contains("service web") && text.contains("ring_size") && text.contains("65536") && text.contains("32749"), "{text}");
    assert_eq!(service_entry(&maps, "10.0.0.100:80").ring_size, 251, "the refused resize changed nothing");
    assert_consistent(&maps);
    // A backend goes down and comes back: both reprogram.
    let down: SocketAddr = "10.1.0.3:80".parse().unwrap();
    tables.apply_planned(&with_down(&start, &[down]), &start, &mut maps).unwrap();
    assert_ne!(backend_flags(&maps, "10.1.0.3:80") & m::BACKEND_FLAG_DOWN, 0);
    assert!(tables.services().find(|i| i.config.name == "web").unwrap().table.iter().all(|&id| maps.backends[&id].flags == 0));
    tables.apply(&start, &mut maps).unwrap();
    assert!(tables.ring_errors().is_empty(), "{:?}", tables.ring_errors());
    // A resize that fits is taken, and its rebuilds fit too.
    let fits = web_and_echo(65_536, 16_381);
    tables.apply(&fits, &mut maps).unwrap();
    tables.apply_planned(&with_down(&fits, &[down]), &fits, &mut maps).unwrap();
    tables.apply(&fits, &mut maps).unwrap();
    assert_consistent(&maps);
}

/// Whatever sequence of resizes was accepted, every later health transition reprograms: each
/// service rebuilds within its own two slots.
#[test]
fn after_any_accepted_change_every_health_transition_reprograms() {
    const PRIMES: [u32; 8] = [3, 7, 31, 101, 251, 257, 509, 1021];
    let cells = 2_500;
    let mut maps = FakeMaps { cells: Some(cells), ..Default::default() };
    let mut tables = Tables::new(cells, MAX_SERVICES, MAX_BACKENDS);
    let backends: Vec<SocketAddr> =
        ["10.1.0.2:80", "10.1.0.3:80", "10.1.0.4:80", "10.2.0.2:7", "10.2.0.3:7", "10.2.0.4:7"].iter().map(|a| a.parse().unwrap()).collect();
    let (mut accepted, mut refused) = (0, 0);
    // A deterministic walk over ring sizes (a linear congruential sequence).
    let mut x: u64 = 12_345;
    for _ in 0..200 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        let desired = web_and_echo(cells, PRIMES[(x >> 33) as usize % PRIMES.len()]);
        match tables.apply(&desired, &mut maps) {
            Ok(()) => accepted += 1,
            Err(ApplyError::RingSpace { .. }) => {
                refused += 1;
                continue;
            }
            Err(e) => panic!("{e}"),
        }
        for mask in 1u32..(1 << backends.len()) {
            let down: Vec<SocketAddr> = (0..backends.len()).filter(|i| mask & (1 << i) != 0).map(|i| backends[i]).collect();
            tables.apply_planned(&with_down(&desired, &down), &desired, &mut maps).unwrap_or_else(|e| panic!("down {down:?}: {e}"));
            assert_consistent(&maps);
        }
        tables.apply(&desired, &mut maps).unwrap();
    }
    assert!(accepted > 50 && refused > 0, "the walk should both resize and meet refusals: {accepted} accepted, {refused} refused");
}

/// A restart adopts rings where the previous daemon left them; if web's spare cannot be placed in
/// what is left, web keeps running its ring, the error is kept for `status`, a failed backend is
/// still marked down in the data plane, and the other services are programmed.
#[test]
fn an_adopted_ring_without_room_still_gets_its_down_flags_and_others_are_programmed() {
    let cells = 600;
    let desired = web_and_echo(cells, 251);
    let mut maps = FakeMaps { cells: Some(cells), ..Default::default() };
    Tables::new(cells, MAX_SERVICES, MAX_BACKENDS).apply(&desired, &mut maps).unwrap();
    // Move web's running ring to the middle, as an older layout could have left it.
    let key = service_key("10.0.0.100:80".parse().unwrap(), Protocol::Tcp);
    let web = maps.services[&key];
    let cells_of_web: Vec<u32> = (web.ring_offset..web.ring_offset + web.ring_size).map(|c| maps.ring[&c]).collect();
    maps.write_ring(200, &cells_of_web).unwrap();
    maps.services.get_mut(&key).unwrap().ring_offset = 200;

    let mut tables = Tables::new(cells, MAX_SERVICES, MAX_BACKENDS);
    assert_eq!(tables.adopt(&desired, &maps).unwrap(), 2);
    let err = tables.apply(&desired, &mut maps).unwrap_err();
    assert!(err.to_string().contains("service web"), "{err}");
    assert!(tables.ring_errors().contains_key("web") && !tables.ring_errors().contains_key("echo"), "{:?}", tables.ring_errors());
    assert_eq!(service_entry(&maps, "10.0.0.100:80").ring_offset, 200, "web keeps serving its running ring");

    let (dead_web, dead_echo): (SocketAddr, SocketAddr) = ("10.1.0.3:80".parse().unwrap(), "10.2.0.3:7".parse().unwrap());
    assert!(tables.apply_planned(&with_down(&desired, &[dead_web, dead_echo]), &desired, &mut maps).is_err());
    assert_ne!(backend_flags(&maps, "10.1.0.3:80") & m::BACKEND_FLAG_DOWN, 0, "the failed web backend is marked down although its ring could not change");
    assert_ne!(backend_flags(&maps, "10.2.0.3:7") & m::BACKEND_FLAG_DOWN, 0);
    let echo = service_entry(&maps, "10.0.0.100:7");
    assert_eq!(echo.ring_size, 2, "echo's ring was rebuilt without its failed backend");
    // Back up: the flag is cleared again.
    let _ = tables.apply(&desired, &mut maps);
    assert_eq!(backend_flags(&maps, "10.1.0.3:80") & m::BACKEND_FLAG_DOWN, 0);
}
