//! The answers to the CLI's requests.

use std::net::SocketAddr;

use serde::Serialize;
use xdp_lb_common::{
    addr, conntrack, hash,
    maps::{FlowKey, PROTO_TCP, PROTO_UDP},
};

use super::Daemon;
use crate::{
    api::{Request, Response, ServiceChanges},
    config::{Protocol, RawBackend, RawConfig, RawService, Scheduler},
    health::Health,
    plan, stats,
    tables::service_key,
};

#[derive(Serialize)]
struct ServiceStatus {
    name: String,
    vip: String,
    protocol: &'static str,
    mode: &'static str,
    scheduler: &'static str,
    /// "ok", "on-backups" or "all-down".
    state: &'static str,
    backends: Vec<BackendStatus>,
}

#[derive(Serialize)]
struct BackendStatus {
    address: String,
    weight: u32,
    /// Weight in the ring right now (0: no new flows).
    effective_weight: u32,
    backup: bool,
    drained: bool,
    /// "up", "down", "unknown" or "unchecked".
    health: &'static str,
    /// Failed its checks: established flows are moved to other backends.
    down: bool,
    /// Held out by the passive checks (SYNs went unanswered).
    passive_down: bool,
    /// Open flows (NAT TCP services; `null` where the balancer cannot see flows end).
    active_flows: Option<u64>,
    last_check: Option<String>,
    check_latency_us: Option<u64>,
}

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
            Request::Stop { detach } => Ok(serde_json::json!({ "stopping": true, "detach": detach })),
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
                    },
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
                protocol: protocol_name(s.protocol),
                mode: if s.mode == crate::config::Mode::Nat { "nat" } else { "dsr" },
                scheduler: s.scheduler.name(),
                state: match report {
                    Some(r) if r.all_down => "all-down",
                    Some(r) if r.on_backups => "on-backups",
                    _ => "ok",
                },
                backends,
            });
        }
        serde_json::to_value(out).map_err(|e| e.to_string())
    }

    fn stats(&self) -> Result<serde_json::Value, String> {
        let snapshot = stats::snapshot(&self.dataplane, &self.tables).map_err(|e| e.to_string())?;
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Ok(serde_json::json!({ "unix_ms": now_ms, "snapshot": snapshot }))
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
        // A closed or expired entry still steers its flow's last packets, but not a new connection.
        let mut ended: Option<(String, &str)> = None;
        if let Some(conn) = self.dataplane.conntrack_entry(&flow) {
            if let Some(backend) = name_of(conn.backend_id).filter(|_| self.tables.generation(conn.backend_id) == conn.generation) {
                let state = conntrack::state(&conn, crate::flows::coarse_now_ns());
                let what = match state {
                    conntrack::State::Established => "an established flow",
                    conntrack::State::Opening => "a connection being opened (SYN forwarded, not yet acknowledged)",
                    conntrack::State::Closed => "closed",
                    conntrack::State::Expired => "expired (idle past its timeout)",
                };
                if matches!(state, conntrack::State::Closed | conntrack::State::Expired) {
                    ended = Some((backend, what));
                } else {
                    return Ok(serde_json::json!({
                        "service": installed.config.name, "backend": backend, "reason": "connection-table",
                        "explanation": format!("{what}: the connection table pins it to {backend}"),
                    }));
                }
            }
        }
        let placed = self.explain_new_flow(installed, &flow)?;
        Ok(match ended {
            None => placed,
            Some((old, how)) => {
                let mut v = placed;
                let text = v["explanation"].as_str().unwrap_or_default().to_string();
                v["explanation"] = serde_json::Value::String(format!(
                    "not established: the connection table holds a {how} flow to {old}, which only its last packets follow; a new connection (SYN) on this 5-tuple is placed by the scheduler — {text}"
                ));
                v["ended_flow"] = serde_json::json!({ "backend": old, "state": how });
                v
            }
        })
    }

    /// Where the scheduler would place a new connection of `flow`.
    fn explain_new_flow(&self, installed: &crate::tables::Installed, flow: &FlowKey) -> Result<serde_json::Value, String> {
        let name_of = |id: u32| installed.backend_ids.iter().find(|(_, &v)| v == id).map(|(a, _)| a.to_string());
        if installed.table.is_empty() {
            return Ok(serde_json::json!({ "service": installed.config.name, "backend": null, "reason": "no-backend",
                "explanation": "the service has no backend in its ring: new flows are dropped" }));
        }
        let size = installed.table.len() as u32;
        let (slot, how) = match installed.config.scheduler {
            Scheduler::IpHash => (hash::client_hash(&flow.src) % size, "ip-hash of the client address"),
            Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => {
                return Ok(serde_json::json!({ "service": installed.config.name, "backend": null, "reason": "round-robin",
                    "explanation": "a new flow takes the next backend of the round-robin sequence; it depends on arrival order" }));
            }
            Scheduler::LeastConn => {
                let best = installed.table.iter().min_by_key(|&&id| self.dataplane.active_flows(id).unwrap_or(0)).copied();
                let backend = best.and_then(name_of);
                return Ok(serde_json::json!({ "service": installed.config.name, "backend": backend, "reason": "least-conn",
                    "explanation": format!("a new flow goes to the backend with the fewest active flows, now {}", backend.clone().unwrap_or_default()) }));
            }
            _ => (hash::flow_hash(flow) % size, "Maglev: hash of the 5-tuple"),
        };
        let backend = name_of(installed.table[slot as usize]);
        Ok(serde_json::json!({
            "service": installed.config.name, "backend": backend, "reason": "maglev", "slot": slot, "ring_size": size,
            "explanation": format!("a new flow: {how} selects slot {slot} of {size}, which holds {}", backend.clone().unwrap_or_default()),
        }))
    }
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
