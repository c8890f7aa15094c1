//! The answers to the CLI's requests.

use std::net::SocketAddr;

use xdp_lb_common::{
    addr,
    hash,
    maps::{FlowKey, PROTO_TCP, PROTO_UDP},
};

use super::Daemon;
use crate::{
    api::{BackendStatus, Explanation, Request, Response, ServiceChanges, ServiceStatus, StatsReply, StopReply},
    config::{Protocol, RawBackend, RawConfig, RawService, Scheduler},
    health::Health,
    plan, stats,
    tables::service_key,
};

impl Daemon {
    pub fn handle(&mut self, request: Request) -> Response {
        let change = match &request {
            Request::ServiceList | Request::BackendList { .. } | Request::Status | Request::Stats | Request::Explain { .. } | Request::Stop { .. } => None,
            other => Some(serde_json::to_string(other).unwrap_or_default()),
        };
        let result = match request {
            Request::ServiceAdd { service } => self.change(|d| add_service(d, service)).map(|_| serde_json::Value::Null),
            Request::ServiceUpdate { name, changes } => {
                self.change(|d| update_service(d, &name, changes)).map(|_| serde_json::Value::Null)
            }
            Request::ServiceRemove { name } => self
                .change(|d| {
                    let before = d.services.len();
                    d.services.retain(|s| s.name != name);
                    if d.services.len() == before { Err(unknown_service(&name)) } else { Ok(()) }
                })
                .map(|_| serde_json::Value::Null),
            Request::ServiceList => Ok(serde_json::to_value(&self.desired.services).unwrap_or_default()),
            Request::BackendAdd { service, address, weight, backup } => self
                .change(|d| {
                    let s = find_service(d, &service)?;
                    if s.backends.iter().any(|b| same_address(&b.address, &address)) {
                        return Err(format!("backend {address} is already in service {service}"));
                    }
                    s.backends.push(RawBackend { address, weight: weight.unwrap_or(1), backup, drained: false, health_check: None });
                    Ok(())
                })
                .map(|_| serde_json::Value::Null),
            Request::BackendRemove { service, address } => self
                .change(|d| {
                    let s = find_service(d, &service)?;
                    let before = s.backends.len();
                    s.backends.retain(|b| !same_address(&b.address, &address));
                    if s.backends.len() == before { Err(unknown_backend(&service, &address)) } else { Ok(()) }
                })
                .map(|_| serde_json::Value::Null),
            Request::BackendDrain { service, address } => self.edit_backend(&service, &address, |b| b.drained = true),
            Request::BackendUndrain { service, address } => self.edit_backend(&service, &address, |b| b.drained = false),
            Request::BackendWeight { service, address, weight } => {
                self.edit_backend(&service, &address, |b| b.weight = weight)
            }
            Request::BackendList { service } => self.status(service.as_deref()),
            Request::Status => self.status(None),
            Request::Stats => self.stats(),
            Request::Explain { source, destination, protocol } => self.explain(&source, &destination, &protocol),
            // The control loop acts on it after answering (see run.rs).
            Request::Stop { detach } => Ok(to_value(StopReply { stopping: true, detach })),
        };
        match (&result, change) {
            (Ok(_), Some(change)) => tracing::info!(%change, "change applied"),
            (Err(error), Some(change)) => tracing::warn!(%change, %error, "change refused; nothing changed"),
            _ => {}
        }
        match result {
            Ok(data) => Response::ok(data),
            Err(e) => Response::error(e),
        }
    }

    fn edit_backend(&mut self, service: &str, address: &str, edit: impl FnOnce(&mut RawBackend)) -> Result<serde_json::Value, String> {
        self.change(|d| {
            let s = find_service(d, service)?;
            let b = s
                .backends
                .iter_mut()
                .find(|b| same_address(&b.address, address))
                .ok_or_else(|| unknown_backend(service, address))?;
            edit(b);
            Ok(())
        })
        .map(|_| serde_json::Value::Null)
    }

    fn status(&self, only: Option<&str>) -> Result<serde_json::Value, String> {
        if let Some(name) = only {
            if !self.config.services.iter().any(|s| s.name == name) {
                return Err(unknown_service(name));
            }
        }
        let statuses = super::statuses(self);
        let passive_down = self.passive.down();
        let mut out = Vec::new();
        for (s, eff) in self.config.services.iter().zip(&self.effective.services) {
            if only.is_some_and(|n| n != s.name) {
                continue;
            }
            let installed = self.tables.services().find(|i| i.config.name == s.name);
            let report = self.report.iter().find(|r| r.name == s.name);
            let mut backends = Vec::new();
            for (b, e) in s.backends.iter().zip(&eff.backends) {
                let status = plan::probe_target(s, b).and_then(|(t, _)| statuses.get(&t).cloned());
                let id = installed.and_then(|i| i.backend_ids.get(&b.address)).copied();
                let sees_ends = s.mode == crate::config::Mode::Nat && s.protocol == Protocol::Tcp;
                backends.push(BackendStatus {
                    address: b.address.to_string(),
                    weight: b.weight,
                    effective_weight: e.weight,
                    backup: b.backup,
                    drained: b.drained,
                    health: match (&b.health_check, status.as_ref().map(|s| s.health)) {
                        (None, _) => "unchecked",
                        (_, Some(Health::Up)) => "up",
                        (_, Some(Health::Down)) => "down",
                        _ => "unknown",
                    }
                    .into(),
                    down: e.down,
                    passive_down: passive_down.contains(&(s.name.clone(), b.address)),
                    active_flows: id.filter(|_| sees_ends).and_then(|id| self.dataplane.active_flows(id).ok()),
                    last_check: status.as_ref().and_then(|st| match (st.last_ok, &st.last_error) {
                        (Some(true), _) => Some("ok".to_string()),
                        (_, Some(err)) => Some(err.clone()),
                        _ => None,
                    }),
                    check_latency_us: status.and_then(|st| st.last_latency_us),
                });
            }
            out.push(ServiceStatus {
                name: s.name.clone(),
                vip: s.vip.to_string(),
                protocol: protocol_name(s.protocol).into(),
                mode: if s.mode == crate::config::Mode::Nat { "nat" } else { "dsr" }.into(),
                scheduler: s.scheduler.name().into(),
                state: match report {
                    Some(r) if r.all_down => "all-down",
                    Some(r) if r.on_backups => "on-backups",
                    _ => "ok",
                }
                .into(),
                backends,
            });
        }
        Ok(to_value(out))
    }

    fn stats(&self) -> Result<serde_json::Value, String> {
        let snapshot = stats::snapshot(&self.dataplane, &self.tables).map_err(|e| e.to_string())?;
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Ok(to_value(StatsReply { unix_ms: now_ms, snapshot }))
    }

    fn explain(&self, source: &str, destination: &str, protocol: &str) -> Result<serde_json::Value, String> {
        let src: SocketAddr = source.parse().map_err(|_| format!("source \"{source}\" is not an address with a port"))?;
        let dst: SocketAddr = destination.parse().map_err(|_| format!("destination \"{destination}\" is not an address with a port"))?;
        let (proto, protocol) = match protocol {
            "tcp" => (PROTO_TCP, Protocol::Tcp),
            "udp" => (PROTO_UDP, Protocol::Udp),
            other => return Err(format!("protocol \"{other}\" is not one of: tcp, udp")),
        };
        let key = service_key(dst, protocol);
        let installed = self
            .tables
            .services()
            .find(|i| service_key(i.config.vip, i.config.protocol) == key)
            .ok_or_else(|| format!("{dst}/{} is not a virtual service: the packet would be passed to the kernel", protocol_name(protocol)))?;
        let name_of = |id: u32| installed.backend_ids.iter().find(|(_, &v)| v == id).map(|(a, _)| a.to_string());
        let flow = FlowKey {
            src: addr::from_ip(src.ip()),
            dst: addr::from_ip(dst.ip()),
            sport: src.port().to_be(),
            dport: dst.port().to_be(),
            proto,
            _pad: [0; 3],
        };
        if let Some(conn) = self.dataplane.conntrack_entry(&flow) {
            if let Some(backend) = name_of(conn.backend_id).filter(|_| self.tables.generation(conn.backend_id) == conn.generation) {
                let explanation = format!("an established flow: the connection table pins it to {backend}");
                return Ok(explained(installed, Some(backend), "connection-table", None, explanation));
            }
        }
        if installed.table.is_empty() {
            let explanation = "the service has no backend in its ring: new flows are dropped".to_string();
            return Ok(explained(installed, None, "no-backend", None, explanation));
        }
        let size = installed.table.len() as u32;
        let (slot, how) = match installed.config.scheduler {
            Scheduler::IpHash => (hash::client_hash(&flow.src) % size, "ip-hash of the client address"),
            Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => {
                let explanation = "a new flow takes the next backend of the round-robin sequence; it depends on arrival order".to_string();
                return Ok(explained(installed, None, "round-robin", None, explanation));
            }
            Scheduler::LeastConn => {
                let best = installed.table.iter().min_by_key(|&&id| self.dataplane.active_flows(id).unwrap_or(0)).copied();
                let backend = best.and_then(name_of);
                let explanation = format!("a new flow goes to the backend with the fewest active flows, now {}", backend.clone().unwrap_or_default());
                return Ok(explained(installed, backend, "least-conn", None, explanation));
            }
            _ => (hash::flow_hash(&flow) % size, "Maglev: hash of the 5-tuple"),
        };
        let backend = name_of(installed.table[slot as usize]);
        let explanation = format!("a new flow: {how} selects slot {slot} of {size}, which holds {}", backend.clone().unwrap_or_default());
        Ok(explained(installed, backend, "maglev", Some((slot, size)), explanation))
    }
}

fn explained(
    installed: &crate::tables::Installed,
    backend: Option<String>,
    reason: &str,
    slot: Option<(u32, u32)>,
    explanation: String,
) -> serde_json::Value {
    to_value(Explanation {
        service: installed.config.name.clone(),
        backend,
        reason: reason.into(),
        slot: slot.map(|(s, _)| s),
        ring_size: slot.map(|(_, size)| size),
        explanation,
    })
}

/// The reply types serialise to JSON infallibly (strings, numbers, maps with string keys).
fn to_value(reply: impl serde::Serialize) -> serde_json::Value {
    serde_json::to_value(reply).unwrap_or_default()
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

fn find_service<'a>(d: &'a mut RawConfig, name: &str) -> Result<&'a mut RawService, String> {
    d.services.iter_mut().find(|s| s.name == name).ok_or_else(|| unknown_service(name))
}

fn unknown_service(name: &str) -> String {
    format!("unknown service \"{name}\"")
}

fn unknown_backend(service: &str, address: &str) -> String {
    format!("service \"{service}\" has no backend {address}")
}

/// Compares addresses as socket addresses when both parse (so "[::1]:80" matches "[0::1]:80").
fn same_address(a: &str, b: &str) -> bool {
    match (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn add_service(d: &mut RawConfig, service: RawService) -> Result<(), String> {
    if d.services.iter().any(|s| s.name == service.name) {
        return Err(format!("service \"{}\" already exists", service.name));
    }
    d.services.push(service);
    Ok(())
}

fn update_service(d: &mut RawConfig, name: &str, c: ServiceChanges) -> Result<(), String> {
    let s = find_service(d, name)?;
    if c.is_empty() {
        return Err(format!("nothing to change for service \"{name}\": give at least one of {}", crate::api::UPDATE_OPTIONS));
    }
    let disruptions = c.disruptions(s);
    if !disruptions.is_empty() {
        if !c.force {
            return Err(format!("refused: {}; pass --force to do it anyway", disruptions.join("; ")));
        }
        for what in &disruptions {
            tracing::warn!(service = %name, "forced: {what}");
        }
    }
    if let Some(v) = c.vip { s.vip = v; }
    if let Some(v) = c.protocol { s.protocol = v; }
    if let Some(v) = c.mode { s.mode = v; }
    if let Some(v) = c.scheduler { s.scheduler = v; }
    if let Some(v) = c.ring_size { s.ring_size = v; }
    if let Some(v) = c.all_down { s.all_down = v; }
    if let Some(v) = c.drain_timeout_ms { s.drain_timeout_ms = v; }
    if let Some(v) = c.health_check { s.health_check = Some(v); }
    if let Some(v) = c.passive_checks { s.passive_checks = Some(v); }
    Ok(())
}
