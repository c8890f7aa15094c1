//! The answers to the CLI's requests.

use std::net::SocketAddr;

use xdp_lb_common::{
    addr, conntrack, hash,
    maps::{FlowKey, PROTO_TCP, PROTO_UDP},
};

use super::{pending::BackendEdit, Daemon, DaemonError};
use crate::{
    api::{BackendStatus, EndedFlow, Explanation, PinTarget, Request, Response, ReloadReply, ServiceChanges, ServiceStatus, StatsReply, StatusReply, StopReply},
    config::{Protocol, RawBackend, RawConfig, RawService, Scheduler},
    health::Health,
    plan, stats,
    tables::service_key,
};

impl Daemon {
    /// A stop that names a pin directory (`stop --bpffs`) is for the daemon that pins there; any
    /// other refuses it (run.rs only stops after an ok answer).
    fn check_stop(&self, pins: Option<&PinTarget>) -> Result<(), DaemonError> {
        let Some(target) = pins else { return Ok(()) };
        match self.dataplane.pin_path() {
            Some(own) if target.is(own) => Ok(()),
            own => Err(DaemonError::NotItsPins { own: own.map(|p| p.display().to_string()), asked: target.path.display().to_string() }),
        }
    }

    pub fn handle(&mut self, request: Request) -> Response {
        let change = match &request {
            Request::ServiceList
            | Request::BackendList { .. }
            | Request::Status
            | Request::Stats
            | Request::Explain { .. }
            | Request::Stop { .. }
            // Logs its own outcome, the same as SIGHUP.
            | Request::Reload { .. } => None,
            other => Some(serde_json::to_string(other).unwrap_or_default()),
        };
        // What the event log says about a change (the request itself is consumed below).
        let recorded = if change.is_some() { request.clone() } else { Request::Status };
        let result = match request {
            Request::ServiceAdd { service } => self.change(|d| add_service(d, service)).map(|_| serde_json::Value::Null),
            Request::ServiceUpdate { name, changes } => match self.check_change_refusal(&name, &changes) {
                Some(refusal) => Err(refusal),
                None => self.change(|d| update_service(d, &name, changes)).map(|_| serde_json::Value::Null),
            },
            Request::ServiceRemove { name } => self
                .change(|d| {
                    let before = d.services.len();
                    d.services.retain(|s| s.name != name);
                    if d.services.len() == before { Err(DaemonError::UnknownService(name)) } else { Ok(()) }
                })
                .map(|_| serde_json::Value::Null),
            Request::ServiceList => serde_json::to_value(&self.file.loaded.raw.services).map_err(Into::into),
            Request::BackendAdd { service, address, weight, backup } => self
                .change(|d| {
                    let s = find_service(d, &service)?;
                    if s.backends.iter().any(|b| same_address(&b.address, &address)) {
                        return Err(DaemonError::BackendExists { service, address });
                    }
                    let mut backend = RawBackend::new(address);
                    backend.weight = weight.unwrap_or(backend.weight);
                    backend.backup = backup;
                    s.backends.push(backend);
                    Ok(())
                })
                .map(|_| serde_json::Value::Null),
            Request::BackendRemove { service, address } => self
                .change(|d| {
                    let s = find_service(d, &service)?;
                    let before = s.backends.len();
                    s.backends.retain(|b| !same_address(&b.address, &address));
                    if s.backends.len() == before { Err(DaemonError::UnknownBackend { service, address }) } else { Ok(()) }
                })
                .map(|_| serde_json::Value::Null),
            // The drain's start goes into the file with it (a drain of a drained backend keeps its
            // start), so a restart does not start the drain timeout again.
            Request::BackendDrain { service, address } => {
                let since = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
                self.edit_backend(&service, &address, BackendEdit::Drain { since })
            }
            Request::BackendUndrain { service, address } => self.edit_backend(&service, &address, BackendEdit::Undrain),
            Request::BackendWeight { service, address, weight } => self.edit_backend(&service, &address, BackendEdit::Weight(weight)),
            Request::BackendList { service } => self.status(service.as_deref()).map(to_value),
            Request::Status => self.status(None).map(|services| {
                to_value(StatusReply {
                    config: self.config_status(),
                    interfaces: self.interface_status(),
                    services,
                    announce: self.announcer.status().cloned(),
                })
            }),
            Request::NodeDrain { drained } => self.drain_node(drained).map(|_| serde_json::Value::Null),
            Request::Reload { allow_empty } => self.reload(allow_empty).map(|services| to_value(ReloadReply { services })),
            Request::Stats => self.stats(),
            Request::Explain { source, destination, protocol } => self.explain(&source, &destination, &protocol),
            // The control loop acts on it after answering (see run.rs).
            Request::Stop { detach, pins } => self.check_stop(pins.as_ref()).map(|()| to_value(StopReply { stopping: true, detach })),
        };
        match (&result, change) {
            (Ok(_), Some(change)) => {
                tracing::info!(%change, "change applied");
                let (kind, service, backend, message) = crate::dashboard::events::describe(&recorded);
                self.events_mut().record(kind, service, backend, message);
            }
            (Err(error), Some(change)) => {
                log_refused(&change, error);
                let (_, service, backend, message) = crate::dashboard::events::describe(&recorded);
                self.events_mut().record_refusal(service, backend, format!("{message} refused: {error}"));
            }
            _ => {}
        }
        match result {
            Ok(data) => Response::ok(data),
            Err(e) => Response::error(e.to_string()),
        }
    }

    /// A drain, undrain or weight change: also possible while the file holds an edit that does not
    /// run (see `pending`), so a broken edit cannot lock the operator out of a drain.
    fn edit_backend(&mut self, service: &str, address: &str, edit: BackendEdit) -> Result<serde_json::Value, DaemonError> {
        let result = self.change(|d| {
            let s = find_service(d, service)?;
            let b = s
                .backends
                .iter_mut()
                .find(|b| same_address(&b.address, address))
                .ok_or_else(|| DaemonError::UnknownBackend { service: service.to_string(), address: address.to_string() })?;
            edit.clone().apply(b);
            Ok(())
        });
        match result {
            // A valid edit waiting for a reload is not in the way: `xdp-lb reload` takes it.
            Err(DaemonError::EditRejected { .. } | DaemonError::EditInvalid { .. }) => {
                self.edit_backend_beside_an_edit(service, address, edit)
            }
            other => other,
        }
        .map(|_| serde_json::Value::Null)
    }

    fn status(&self, only: Option<&str>) -> Result<Vec<ServiceStatus>, DaemonError> {
        if let Some(name) = only {
            if !self.config.services.iter().any(|s| s.name == name) {
                return Err(DaemonError::UnknownService(name.to_string()));
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
                ring_fingerprint: self.tables.ring_fingerprint(&s.name).map(|f| format!("{f:016x}")),
                ring_error: self.tables.ring_errors().get(&s.name).cloned(),
                state: match report {
                    _ if self.tables.ring_errors().contains_key(&s.name) => "ring-error",
                    Some(r) if r.all_down => "all-down",
                    Some(r) if r.on_backups => "on-backups",
                    _ => "ok",
                }
                .into(),
                backends,
            });
        }
        Ok(out)
    }

    fn stats(&self) -> Result<serde_json::Value, DaemonError> {
        let snapshot = stats::snapshot(&self.dataplane, &self.tables)?;
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        Ok(to_value(StatsReply { unix_ms: now_ms, snapshot }))
    }

    fn explain(&self, source: &str, destination: &str, protocol: &str) -> Result<serde_json::Value, DaemonError> {
        let not_an_address = |what, value: &str| DaemonError::InvalidArgument { what, value: value.to_string(), problem: "is not an address with a port" };
        let src: SocketAddr = source.parse().map_err(|_| not_an_address("source", source))?;
        let dst: SocketAddr = destination.parse().map_err(|_| not_an_address("destination", destination))?;
        let (proto, protocol) = match protocol {
            "tcp" => (PROTO_TCP, Protocol::Tcp),
            "udp" => (PROTO_UDP, Protocol::Udp),
            other => {
                return Err(DaemonError::InvalidArgument { what: "protocol", value: other.to_string(), problem: "is not one of: tcp, udp" })
            }
        };
        let key = service_key(dst, protocol);
        let installed = self
            .tables
            .services()
            .find(|i| service_key(i.config.vip, i.config.protocol) == key)
            .ok_or(DaemonError::NotAService { destination: dst, protocol: protocol_name(protocol) })?;
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
                    let explanation = format!("{what}: the connection table pins it to {backend}");
                    return Ok(to_value(explained(installed, Some(backend), "connection-table", None, explanation)));
                }
            }
        }
        let mut placed = self.explain_new_flow(installed, &flow);
        if let Some((old, how)) = ended {
            placed.explanation = format!(
                "not established: the connection table holds a {how} flow to {old}, which only its last packets follow; \
                 a new connection (SYN) on this 5-tuple is placed by the scheduler — {}",
                placed.explanation
            );
            placed.ended_flow = Some(EndedFlow { backend: old, state: how.to_string() });
        }
        Ok(to_value(placed))
    }

    /// Where the scheduler would place a new connection of `flow`.
    fn explain_new_flow(&self, installed: &crate::tables::Installed, flow: &FlowKey) -> Explanation {
        let name_of = |id: u32| installed.backend_ids.iter().find(|(_, &v)| v == id).map(|(a, _)| a.to_string());
        if installed.table.is_empty() {
            let explanation = "the service has no backend in its ring: new flows are dropped".to_string();
            return explained(installed, None, "no-backend", None, explanation);
        }
        let size = installed.table.len() as u32;
        let (slot, how) = match installed.config.scheduler {
            Scheduler::IpHash => (hash::client_hash(&flow.src) % size, "ip-hash of the client address"),
            Scheduler::RoundRobin | Scheduler::WeightedRoundRobin => {
                let explanation = "a new flow takes the next backend of the round-robin sequence; it depends on arrival order".to_string();
                return explained(installed, None, "round-robin", None, explanation);
            }
            Scheduler::LeastConn => {
                let best = installed.table.iter().min_by_key(|&&id| self.dataplane.active_flows(id).unwrap_or(0)).copied();
                let backend = best.and_then(name_of);
                let explanation = format!("a new flow goes to the backend with the fewest active flows, now {}", backend.clone().unwrap_or_default());
                return explained(installed, backend, "least-conn", None, explanation);
            }
            _ => (hash::flow_hash(flow) % size, "Maglev: hash of the 5-tuple"),
        };
        let backend = name_of(installed.table[slot as usize]);
        let explanation = format!("a new flow: {how} selects slot {slot} of {size}, which holds {}", backend.clone().unwrap_or_default());
        explained(installed, backend, "maglev", Some((slot, size)), explanation)
    }
}

fn explained(
    installed: &crate::tables::Installed,
    backend: Option<String>,
    reason: &str,
    slot: Option<(u32, u32)>,
    explanation: String,
) -> Explanation {
    Explanation {
        service: installed.config.name.clone(),
        backend,
        reason: reason.into(),
        slot: slot.map(|(s, _)| s),
        ring_size: slot.map(|(_, size)| size),
        explanation,
        ended_flow: None,
    }
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

fn find_service<'a>(d: &'a mut RawConfig, name: &str) -> Result<&'a mut RawService, DaemonError> {
    d.services.iter_mut().find(|s| s.name == name).ok_or_else(|| DaemonError::UnknownService(name.to_string()))
}

/// Compares addresses as socket addresses when both parse (so "[::1]:80" matches "[0::1]:80").
pub(super) fn same_address(a: &str, b: &str) -> bool {
    match (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

fn add_service(d: &mut RawConfig, service: RawService) -> Result<(), DaemonError> {
    if d.services.iter().any(|s| s.name == service.name) {
        return Err(DaemonError::ServiceExists(service.name));
    }
    d.services.push(service);
    Ok(())
}

pub(super) fn update_service(d: &mut RawConfig, name: &str, c: ServiceChanges) -> Result<(), DaemonError> {
    let s = find_service(d, name)?;
    if c.is_empty() {
        return Err(DaemonError::NothingToChange { service: name.to_string() });
    }
    let disruptions = c.disruptions(s);
    if !disruptions.is_empty() {
        if !c.force {
            return Err(DaemonError::Disruptive { reasons: disruptions });
        }
        for what in &disruptions {
            tracing::warn!(service = ?name, "forced: {what}");
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

/// Logs a refused change. `change` and the error carry caller text (a service name from the
/// dashboard may hold a newline), so both are logged escaped: a caller cannot forge log lines.
fn log_refused(change: &str, error: &DaemonError) {
    tracing::warn!(change = ?change, error = ?error.to_string(), "change refused; nothing changed");
}

#[cfg(test)]
mod log_tests {
    use std::{
        io::Write,
        sync::{Arc, Mutex},
    };

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// hostile2 F12: a newline in a caller's service name does not start a log line of its own.
    #[test]
    fn a_refusal_log_line_cannot_be_forged() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
        let name = "web\n2026-12-02T01:40:00.000000Z  INFO xdp_lb::daemon: health transition FAKE";
        tracing::subscriber::with_default(subscriber, || {
            log_refused(name, &DaemonError::UnknownService(name.into()));
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.trim_end().lines().count(), 1, "one refusal, one line: {text}");
        assert!(text.contains("FAKE"), "{text}");
    }
}
