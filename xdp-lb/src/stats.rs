//! A snapshot of the data plane's counters, per service and backend plus the pass/drop reasons.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{
    config::Protocol,
    dataplane::{Dataplane, DataplaneError},
    tables::Tables,
};

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct Snapshot {
    pub services: Vec<ServiceStats>,
    pub reasons: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct ServiceStats {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendStats>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
pub struct BackendStats {
    pub address: String,
    pub weight: u32,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub syns: u64,
    pub syn_acks: u64,
    pub resets: u64,
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
                syns: bc.syns,
                syn_acks: bc.syn_acks,
                resets: bc.resets,
            });
        }
        services.push(ServiceStats {
            name: installed.config.name.clone(),
            vip: installed.config.vip.to_string(),
            protocol: match installed.config.protocol {
                Protocol::Tcp => "tcp",
                Protocol::Udp => "udp",
            }
            .to_string(),
            packets: c.packets,
            bytes: c.bytes,
            new_flows: c.new_flows,
            backends,
        });
    }
    let reasons = dataplane.reason_counters()?.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    Ok(Snapshot { services, reasons })
}
