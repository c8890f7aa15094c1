//! A snapshot of the data plane's counters, per service and backend plus the pass/drop reasons.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    config::Protocol,
    dataplane::{Dataplane, DataplaneError},
    tables::Tables,
};

#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub services: Vec<ServiceStats>,
    pub reasons: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Serialize)]
pub struct ServiceStats {
    pub name: String,
    pub vip: String,
    pub protocol: &'static str,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Debug, Serialize)]
pub struct BackendStats {
    pub address: String,
    pub weight: u32,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

pub fn snapshot(dataplane: &Dataplane, tables: &Tables) -> Result<Snapshot, DataplaneError> {
    let mut services = Vec::new();
    for installed in tables.services() {
        let c = dataplane.service_counters(installed.id)?;
        let mut backends = Vec::new();
        for b in &installed.config.backends {
            let bc = dataplane.backend_counters(installed.backend_ids[&b.address])?;
            backends.push(BackendStats {
                address: b.address.to_string(),
                weight: b.weight,
                packets: bc.packets,
                bytes: bc.bytes,
                new_flows: bc.new_flows,
            });
        }
        services.push(ServiceStats {
            name: installed.config.name.clone(),
            vip: installed.config.vip.to_string(),
            protocol: match installed.config.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            },
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            backends,
        });
    }
    Ok(Snapshot { services, reasons: dataplane.reason_counters()? })
}
