//! The daemon's config parser never panics on any text (errors are fine), and a config it accepts
//! can be installed into (fake) data-plane maps, changed and installed again without a panic, with
//! every ring cell naming a live backend of its own service.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use xdp_lb::{
    config::Config,
    tables::{MapWriter, Tables, WriteError},
};
use xdp_lb_common::maps::{self as m, defaults, ServiceKey};

#[derive(Default)]
struct FakeMaps {
    backends: HashMap<u32, m::Backend>,
    ring: HashMap<u32, u32>,
    services: HashMap<ServiceKey, m::Service>,
}

impl MapWriter for FakeMaps {
    fn write_backend(&mut self, id: u32, backend: &m::Backend) -> Result<(), WriteError> {
        self.backends.insert(id, *backend);
        Ok(())
    }
    fn write_ring(&mut self, offset: u32, cells: &[u32]) -> Result<(), WriteError> {
        for (i, &c) in cells.iter().enumerate() {
            self.ring.insert(offset + i as u32, c);
        }
        Ok(())
    }
    fn write_service(&mut self, key: &ServiceKey, service: &m::Service) -> Result<(), WriteError> {
        self.services.insert(*key, *service);
        Ok(())
    }
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), WriteError> {
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

fn assert_consistent(maps: &FakeMaps) {
    for s in maps.services.values() {
        for cell in s.ring_offset..s.ring_offset + s.ring_size {
            let id = maps.ring[&cell];
            let b = maps.backends[&id];
            assert!(b.generation != 0 && b.service_id == s.id, "service {} cell {cell} names backend {id} of service {} gen {}", s.id, b.service_id, b.generation);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = Config::parse(text, "fuzz.toml") else { return };

    // Ring building is O(ring_size) per service: keep one iteration under a few milliseconds.
    let cells: u64 = config.services.iter().map(|s| s.ring_size as u64).sum();
    if cells > 1 << 18 {
        return;
    }
    let mut tables = Tables::new(config.dataplane.maglev_cells, defaults::MAX_SERVICES, defaults::MAX_BACKENDS);
    let mut maps = FakeMaps::default();
    if tables.apply(&config, &mut maps).is_err() {
        return;
    }
    assert_consistent(&maps);
    // Re-applying the same config, then one with the first service gone and every other service's
    // first backend gone, then the original again: the change paths.
    tables.apply(&config, &mut maps).expect("re-applying an installed config");
    assert_consistent(&maps);
    let mut changed = config.clone();
    if !changed.services.is_empty() {
        changed.services.remove(0);
    }
    for s in &mut changed.services {
        if !s.backends.is_empty() {
            s.backends.remove(0);
        }
    }
    if tables.apply(&changed, &mut maps).is_ok() {
        assert_consistent(&maps);
        if tables.apply(&config, &mut maps).is_ok() {
            assert_consistent(&maps);
        }
    }
});
