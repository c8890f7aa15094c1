//! [`RawConfig::validate`]: every rule a configuration must meet. Each failure names its place
//! (a [`Location`]) and, where a limit was hit, the limit.

use std::{
    collections::HashSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use xdp_lb_common::{
    maglev::is_prime,
    maps::{defaults, LEAST_CONN_MAX},
    sequence::smooth_weighted_len,
};

use super::{
    AllDown, Announce, Backend, Config, Dataplane, FieldError, HealthCheck, Location, Mode, Protocol, RawConfig, RawHealthCheck, Scheduler,
    Service, MAX_ANNOUNCE_TABLE, MAX_CHECK_PATH_LEN, MAX_CONNTRACK_ENTRIES, MAX_DRAIN_TIMEOUT_MS, MAX_HASH_SEED, MAX_RISE_FALL, MAX_MAGLEV_CELLS, MAX_NAME_LEN, MAX_WEIGHT, MIN_CONNTRACK_ENTRIES, MIN_MAGLEV_CELLS,
};
use crate::health::{CheckKind, CheckSpec, MAX_INTERVAL};

/// Backend ids start at 1 (0 marks an empty ring cell), so one id of the map is never used.
pub const MAX_BACKENDS_TOTAL: u32 = defaults::MAX_BACKENDS - 1;


impl RawConfig {
    /// Checks every field, collecting all problems rather than stopping at the first.
    pub fn validate(&self) -> Result<Config, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |location: Location, message: String| errors.push(FieldError::new(location, message));

        let dp = &self.dataplane;
        let dataplane = |field| Location::Dataplane { field };
        if let Some(m) = outside(dp.conntrack_entries.into(), MIN_CONNTRACK_ENTRIES.into(), MAX_CONNTRACK_ENTRIES.into()) {
            err(dataplane("conntrack_entries"), m);
        }
        if let Some(m) = outside(dp.maglev_cells.into(), MIN_MAGLEV_CELLS.into(), MAX_MAGLEV_CELLS.into()) {
            err(dataplane("maglev_cells"), m);
        }
        if dp.hash_seed > MAX_HASH_SEED {
            let why = "TOML integers are signed 64-bit, so a larger seed could not be written into the config file";
            err(dataplane("hash_seed"), format!("{} is above the maximum of {MAX_HASH_SEED} ({why})", dp.hash_seed));
        }
        let announce = self.announce.as_ref().map(|a| {
            if !(1..=MAX_ANNOUNCE_TABLE).contains(&a.table) {
                err(
                    Location::Announce { field: "table" },
                    format!(
                        "{} is not a routing table xdp-lb can own: give one between 1 and {MAX_ANNOUNCE_TABLE} that no `ip rule` \
                         looks up (253-255 are the kernel's default, main and local tables, 0 means none)",
                        a.table
                    ),
                );
            }
            Announce { table: a.table, drained: a.drained }
        });
        if self.services.len() > defaults::MAX_SERVICES as usize {
            err(Location::Services, format!("{} services; xdp-lb handles at most {}", self.services.len(), defaults::MAX_SERVICES));
        }

        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        // Every backend address with its service: a VIP that is another service's backend would
        // catch that backend's traffic (same-service overlaps are `against_vip`'s).
        let backend_addresses: Vec<(std::net::SocketAddr, &str)> = self
            .services
            .iter()
            .flat_map(|s| s.backends.iter().filter_map(|b| b.address.parse().ok().map(|a| (a, s.name.as_str()))))
            .collect();
        let mut services = Vec::new();
        let mut ring_cells: u64 = 0;
        let mut backend_count = 0usize;
        for (i, s) in self.services.iter().enumerate() {
            let at = |field| Location::Service { index: i, name: s.name.clone(), field };
            if !valid_name(&s.name) {
                let rule = "must start with a letter or digit, continue with letters, digits, '.', '_' or '-'";
                err(at("name"), format!("{:?} {rule}, and be at most {MAX_NAME_LEN} characters", s.name));
            } else if !names.insert(s.name.as_str()) {
                err(at("name"), format!("\"{}\" is already used by another service", s.name));
            }
            let vip = address(&s.vip, Role::Vip).map_err(|m| err(at("vip"), m)).ok();
            let protocol = match s.protocol.as_str() {
                "tcp" => Some(Protocol::Tcp),
                "udp" => Some(Protocol::Udp),
                other => {
                    err(at("protocol"), format!("\"{other}\" is not one of: tcp, udp"));
                    None
                }
            };
            let mode = match s.mode.as_str() {
                "nat" => Some(Mode::Nat),
                "dsr" => Some(Mode::Dsr),
                other => {
                    err(at("mode"), format!("\"{other}\" is not one of: nat, dsr"));
                    None
                }
            };
            if mode == Some(Mode::Nat) && announce.is_some() {
                // Router ECMP may hand a flow's next packet, or after a node change all of it, to
                // another node, and a NAT flow's replies come back to the node that translated it:
                // only dsr (replies bypass the balancer) keeps established flows across nodes.
                err(
                    at("mode"),
                    "\"nat\" cannot be announced from several nodes ([announce] is set): replies return to the node \
                     that translated the flow, and router ECMP does not send the flow's packets there after a node \
                     change; use mode = \"dsr\" (the default is nat), or remove [announce]"
                        .into(),
                );
            }
            let scheduler = Scheduler::parse(&s.scheduler);
            if scheduler.is_none() {
                err(at("scheduler"), format!("\"{}\" is not one of: {}", s.scheduler, Scheduler::NAMES));
            }
            if let Some(bad @ (Scheduler::RoundRobin | Scheduler::WeightedRoundRobin | Scheduler::LeastConn | Scheduler::LeastResponseTime)) = scheduler {
                if announce.is_some() {
                    // Every node must send a flow to the same backend, or a flow the router moves
                    // to another node (drain, a node lost) is reset: only a pure function of the
                    // configuration and the flow's addresses gives that (issue 11 F9).
                    let depends_on = if bad == Scheduler::LeastResponseTime { "this node's own health-check latencies" } else { "this node's arrival order or connection counts" };
                    err(
                        at("scheduler"),
                        format!(
                            "\"{}\" cannot be announced from several nodes ([announce] is set): its choice depends on {depends_on}, \
                             so nodes disagree and a flow the router moves to another node reaches another backend; \
                             use scheduler = \"maglev\" or \"ip-hash\", or remove [announce]",
                            s.scheduler
                        ),
                    );
                }
            }
            if s.ring_size < 3 || !is_prime(s.ring_size) {
                err(at("ring_size"), format!("{} is not a prime number of at least 3 (e.g. 251, 16381, 65537)", s.ring_size));
            }
            if scheduler == Some(Scheduler::LeastConn) {
                if mode == Some(Mode::Dsr) {
                    err(at("scheduler"), "least-conn needs mode \"nat\": in dsr mode replies bypass the balancer, so it cannot see connections end".into());
                }
                if protocol == Some(Protocol::Udp) {
                    err(at("scheduler"), "least-conn counts TCP connections; UDP has no connection end to count".into());
                }
                if s.backends.len() > LEAST_CONN_MAX as usize {
                    err(at("backends"), format!("service {} has {} backends; least-conn handles at most {LEAST_CONN_MAX}", s.name, s.backends.len()));
                }
            }
            let all_down = match s.all_down.as_str() {
                "drop" => AllDown::Drop,
                "fail-open" => AllDown::FailOpen,
                other => {
                    err(at("all_down"), format!("\"{other}\" is not one of: drop, fail-open"));
                    AllDown::Drop
                }
            };
            if let Some(m) = outside(s.drain_timeout_ms, 0, MAX_DRAIN_TIMEOUT_MS) {
                err(at("drain_timeout_ms"), format!("{m} (one week)"));
            }
            let tcp_default = protocol == Some(Protocol::Tcp);
            let service_check = health_check(s.health_check.as_ref(), None, tcp_default, &mut |field, m| err(at(field), m));
            let passive_checks = s.passive_checks.unwrap_or(mode == Some(Mode::Nat) && protocol == Some(Protocol::Tcp));
            if s.passive_checks == Some(true) && (mode == Some(Mode::Dsr) || protocol == Some(Protocol::Udp)) {
                err(at("passive_checks"), "passive checks need a nat-mode TCP service (they count the SYN-ACKs that only NAT sees)".into());
            }
            let weights: Vec<u32> = s.backends.iter().map(|b| b.weight).collect();
            ring_cells += 2 * match scheduler {
                Some(Scheduler::RoundRobin | Scheduler::LeastConn) => s.backends.len() as u64,
                Some(Scheduler::WeightedRoundRobin) => smooth_weighted_len(&weights),
                _ => s.ring_size as u64,
            };
            if let (Some(vip), Some(protocol)) = (vip, protocol) {
                if !vips.insert((vip, protocol)) {
                    err(at("vip"), format!("{vip}/{} is already used by another service", s.protocol));
                }
                if let Some((_, owner)) = backend_addresses.iter().find(|(a, owner)| *a == vip && *owner != s.name) {
                    err(at("vip"), format!("{vip} is a backend of service {owner}: its traffic would be caught by this VIP"));
                }
            }

            let mut backends = Vec::new();
            let mut seen = HashSet::new();
            for (j, b) in s.backends.iter().enumerate() {
                let at = |field| Location::Backend { service: i, service_name: s.name.clone(), index: j, address: b.address.clone(), field };
                backend_count += 1;
                if let Some(since) = &b.drained_since {
                    if !b.drained {
                        err(at("drained_since"), format!("{since:?} is set but drained is not: remove drained_since or set drained = true"));
                    } else if humantime::parse_rfc3339_weak(since).is_err() {
                        err(at("drained_since"), format!("{since:?} is not a UTC time like \"2026-12-02T07:30:00Z\" (RFC 3339, ending in Z: other offsets are not read)"));
                    }
                }
                if b.weight > MAX_WEIGHT {
                    err(at("weight"), format!("{} is above the maximum of {MAX_WEIGHT}", b.weight));
                }
                let address = address(&b.address, Role::Backend).map_err(|m| err(at("address"), m)).ok();
                if let Some(address) = address {
                    if !seen.insert(address) {
                        err(at("address"), format!("{address} is listed twice in this service"));
                    }
                    if let Some(vip) = vip {
                        if let Some(m) = against_vip(&b.address, address, vip, mode) {
                            err(at("address"), m);
                        }
                    }
                }
                let check = match &b.health_check {
                    None => service_check.clone(),
                    Some(own) => {
                        // An invalid service check is reported once, at the service; the backend
                        // then reports only its own fields.
                        let inherited = service_check.as_ref().and(s.health_check.as_ref());
                        let check = health_check(Some(own), inherited, tcp_default, &mut |field, m| err(at(field), m));
                        service_check.as_ref().and(check)
                    }
                };
                let (Some(address), Some(check)) = (address, check) else { continue };
                backends.push(Backend { address, weight: b.weight, backup: b.backup, drained: b.drained, health_check: check, down: false });
            }
            if let (Some(vip), Some(protocol), Some(mode), Some(scheduler)) = (vip, protocol, mode, scheduler) {
                services.push(Service {
                    name: s.name.clone(),
                    vip,
                    protocol,
                    mode,
                    scheduler,
                    ring_size: s.ring_size,
                    all_down,
                    drain_timeout: Duration::from_millis(s.drain_timeout_ms),
                    passive_checks,
                    backends,
                });
            }
        }
        if backend_count > MAX_BACKENDS_TOTAL as usize {
            err(Location::Services, format!("{backend_count} backends in all services; xdp-lb handles at most {MAX_BACKENDS_TOTAL}"));
        }
        if ring_cells > dp.maglev_cells as u64 {
            err(
                dataplane("maglev_cells"),
                format!(
                    "{} cells cannot hold the services' rings: they need {ring_cells} (two rings per service, so a table can be replaced while the old one serves); maglev_cells can be at most {MAX_MAGLEV_CELLS}",
                    dp.maglev_cells
                ),
            );
        }

        if errors.is_empty() {
            Ok(Config {
                dataplane: Dataplane { conntrack_entries: dp.conntrack_entries, maglev_cells: dp.maglev_cells, hash_seed: dp.hash_seed },
                services,
                announce,
            })
        } else {
            Err(errors)
        }
    }
}

/// `value` against an inclusive range, in words (no Rust range syntax reaches users).
fn outside(value: u64, min: u64, max: u64) -> Option<String> {
    if value < min {
        Some(format!("{value} is below the minimum of {min}"))
    } else if value > max {
        Some(format!("{value} is above the maximum of {max}"))
    } else {
        None
    }
}

/// `[A-Za-z0-9][A-Za-z0-9._-]{0,62}`: names appear in tables, logs, metric labels and file
/// paths, where spaces, newlines or slashes would break them.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name.len() <= MAX_NAME_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Vip,
    Backend,
}

/// Parses an address and refuses those the data plane cannot balance to or from.
fn address(text: &str, role: Role) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text.parse().map_err(|_| match port_out_of_range(text) {
        Some(port) => format!("{text} has port {port}, above the maximum of {}", u16::MAX),
        None => format!("\"{text}\" is not an address with a port, like \"10.0.0.100:80\" or \"[2001:db8::100]:80\""),
    })?;
    if addr.port() == 0 {
        return Err(format!("{text} has port 0"));
    }
    let why = match addr.ip() {
        IpAddr::V4(a) if a.is_unspecified() => Some("is unspecified: it names no host"),
        IpAddr::V4(a) if a.is_broadcast() => Some("is the broadcast address: it names every host on the link"),
        IpAddr::V4(a) if a.is_multicast() => Some("is a multicast address: xdp-lb balances unicast traffic only"),
        IpAddr::V4(a) if a.is_loopback() => Some(loopback(role)),
        IpAddr::V4(a) if a.is_link_local() => Some("is a link-local address, which xdp-lb does not route"),
        IpAddr::V6(a) if a.is_unspecified() => Some("is unspecified: it names no host"),
        IpAddr::V6(a) if a.is_multicast() => Some("is a multicast address: xdp-lb balances unicast traffic only"),
        IpAddr::V6(a) if a.is_loopback() => Some(loopback(role)),
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => Some("is a link-local address, which xdp-lb does not route"),
        // The data plane stores IPv4 addresses in this form, so it passes IPv6 packets carrying
        // them to the kernel rather than let them meet IPv4 services or flows.
        IpAddr::V6(a) if a.to_ipv4_mapped().is_some() => {
            Some("is an IPv4-mapped IPv6 address, which the data plane never balances (write the IPv4 address instead)")
        }
        _ => None,
    };
    match why {
        Some(why) => Err(format!("{text} {why}")),
        None => Ok(addr),
    }
}

/// The port of `host:port` when the host is an IP address and only the port is too large.
fn port_out_of_range(text: &str) -> Option<u64> {
    let (host, port) = text.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port: u64 = port.parse().ok()?;
    (host.parse::<IpAddr>().is_ok() && port > u16::MAX as u64).then_some(port)
}

fn loopback(role: Role) -> &'static str {
    match role {
        Role::Vip => "is a loopback address: traffic to it never arrives on a network interface",
        Role::Backend => "is a loopback address: the balancer cannot forward packets to it",
    }
}

/// A backend must be reachable from the VIP's traffic without translation the mode cannot do.
fn against_vip(text: &str, address: SocketAddr, vip: SocketAddr, mode: Option<Mode>) -> Option<String> {
    let family = |a: SocketAddr| if a.is_ipv4() { "IPv4" } else { "IPv6" };
    if address == vip {
        return Some(format!("{text} is the VIP itself: packets would come straight back to the balancer"));
    }
    if address.ip() == vip.ip() {
        return Some(format!("{text} is the VIP's own address: packets would come straight back to the balancer"));
    }
    if address.is_ipv4() != vip.is_ipv4() {
        return Some(format!(
            "{text} is {} but the VIP {vip} is {}: neither nat nor dsr translates between address families",
            family(address),
            family(vip)
        ));
    }
    if mode == Some(Mode::Dsr) && address.port() != vip.port() {
        return Some(format!("port {} differs from the VIP's port {}: direct server return cannot translate ports", address.port(), vip.port()));
    }
    None
}

/// The effective check of a service (`inherited` = None) or of a backend with its own table
/// (`inherited` = the service's): `own` fields over `inherited` ones over the defaults. TCP
/// services are checked by default (TCP connect); UDP services only when configured (a UDP port
/// cannot be probed generically). Problems are reported through `err` against the field of `own`
/// that holds them; `None` when there is one, or when checks are off.
fn health_check(
    own: Option<&RawHealthCheck>,
    inherited: Option<&RawHealthCheck>,
    tcp_service: bool,
    err: &mut dyn FnMut(&'static str, String),
) -> Option<Option<HealthCheck>> {
    let mut problems: Vec<(&'static str, String)> = Vec::new();
    if let Some(own) = own {
        check_fields(own, &mut |field, message| problems.push((field, message)));
    }
    let pick = |f: fn(&RawHealthCheck) -> Option<String>| own.and_then(f).or_else(|| inherited.and_then(f));
    let pick_u64 = |f: fn(&RawHealthCheck) -> Option<u64>| own.and_then(f).or_else(|| inherited.and_then(f));
    let default_kind = if tcp_service || own.is_some() || inherited.is_some() { "tcp" } else { "none" };
    let defaults = CheckSpec::default();
    let kind = match pick(|h| h.kind.clone()).as_deref().unwrap_or(default_kind) {
        "none" => CheckKind::Tcp,
        "http" => CheckKind::Http {
            path: pick(|h| h.path.clone()).unwrap_or_else(|| "/".into()),
            expect: status_range(&pick(|h| h.expect.clone()).unwrap_or_else(|| "200-399".into())).unwrap_or(200..=399),
        },
        _ => CheckKind::Tcp,
    };
    let off = pick(|h| h.kind.clone()).as_deref().unwrap_or(default_kind) == "none";
    let spec = CheckSpec {
        kind,
        interval: pick_u64(|h| h.interval_ms).map(Duration::from_millis).unwrap_or(defaults.interval),
        timeout: pick_u64(|h| h.timeout_ms).map(Duration::from_millis).unwrap_or(defaults.timeout),
        rise: pick_u64(|h| h.rise.map(u64::from)).map(|v| v as u32).unwrap_or(defaults.rise),
        fall: pick_u64(|h| h.fall.map(u64::from)).map(|v| v as u32).unwrap_or(defaults.fall),
    };
    // The one rule across fields, reported by the table that sets either field; a backend that
    // only inherits both repeats nothing its service already reported.
    let timing_conflict = !off && problems.is_empty() && spec.timeout > spec.interval;
    if timing_conflict && own.is_some_and(|h| h.timeout_ms.is_some() || h.interval_ms.is_some()) {
        let written = |h: Option<&RawHealthCheck>| h.is_some_and(|h| h.timeout_ms.is_some());
        let source = if written(own) || written(inherited) { "" } else { " (the default)" };
        problems.push((
            "health_check.timeout_ms",
            format!(
                "{}{source} must not exceed the interval ({} ms): probes would pile up behind each other",
                spec.timeout.as_millis(),
                spec.interval.as_millis()
            ),
        ));
    }
    let failed = !problems.is_empty() || timing_conflict;
    for (field, message) in problems {
        err(field, message);
    }
    if failed {
        return None;
    }
    if off {
        return Some(None);
    }
    // Every rule of `CheckSpec::validate` is checked above against its field; this only guards
    // against the two drifting apart.
    if let Err(message) = spec.validate() {
        err("health_check", message);
        return None;
    }
    Some(Some(HealthCheck { port: own.and_then(|h| h.port).or_else(|| inherited.and_then(|h| h.port)), spec }))
}

/// The rules for each field of one `health_check` table, on its own.
fn check_fields(h: &RawHealthCheck, fail: &mut dyn FnMut(&'static str, String)) {
    if let Some(kind) = &h.kind {
        if !matches!(kind.as_str(), "tcp" | "http" | "none") {
            fail("health_check.kind", format!("\"{kind}\" is not one of: tcp, http, none"));
        }
    }
    if h.port == Some(0) {
        fail("health_check.port", "0 cannot be probed; leave port out to check the backend's own port".into());
    }
    if let Some(path) = &h.path {
        if path.chars().count() > MAX_CHECK_PATH_LEN {
            fail("health_check.path", format!("{} characters; at most {MAX_CHECK_PATH_LEN}", path.chars().count()));
        } else if let Some(problem) = crate::health::path_problem(path) {
            fail("health_check.path", format!("{path:?} {problem}"));
        }
    }
    if let Some(expect) = &h.expect {
        if status_range(expect).is_none() {
            fail("health_check.expect", format!("\"{expect}\" is not a status code or range of codes between 100 and 599, like \"200-399\""));
        }
    }
    let max_interval = MAX_INTERVAL.as_millis() as u64;
    if let Some(interval) = h.interval_ms {
        if interval == 0 || interval > max_interval {
            fail("health_check.interval_ms", format!("{interval} must be between 1 and {max_interval} (one day)"));
        }
    }
    if let Some(timeout) = h.timeout_ms {
        if timeout == 0 || timeout > max_interval {
            fail("health_check.timeout_ms", format!("{timeout} must be between 1 and {max_interval} (one day)"));
        }
    }
    for (field, value) in [("health_check.rise", h.rise), ("health_check.fall", h.fall)] {
        if let Some(v) = value.filter(|&v| v == 0 || v > MAX_RISE_FALL) {
            fail(field, format!("{v} must be between 1 and {MAX_RISE_FALL}"));
        }
    }
}

/// "200-399" or "204": a non-empty range of HTTP status codes.
fn status_range(expect: &str) -> Option<std::ops::RangeInclusive<u16>> {
    let (lo, hi) = match expect.split_once('-') {
        Some((lo, hi)) => (lo.trim().parse::<u16>().ok()?, hi.trim().parse::<u16>().ok()?),
        None => {
            let code = expect.trim().parse::<u16>().ok()?;
            (code, code)
        }
    };
    (100 <= lo && lo <= hi && hi <= 599).then_some(lo..=hi)
}
