//! The daemon's TOML configuration: serde structs with defaults, then [`RawConfig::validate`], which
//! reports every invalid field with its path and yields the typed [`Config`] the rest of the daemon uses.

use std::{collections::HashSet, fmt, net::SocketAddr, path::Path, time::Duration};

pub mod file;

use crate::health::{CheckKind, CheckSpec};

use serde::{Deserialize, Serialize};
use xdp_lb_common::{
    maglev::is_prime,
    maps::{defaults, LEAST_CONN_MAX},
    sequence::smooth_weighted_len,
};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub dataplane: RawDataplane,
    #[serde(default)]
    pub services: Vec<RawService>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDataplane {
    /// Flows tracked by the connection table (and by the NAT reply table).
    pub conntrack_entries: u32,
    /// Cells shared by all services' Maglev rings.
    pub maglev_cells: u32,
}

impl Default for RawDataplane {
    fn default() -> Self {
        Self { conntrack_entries: defaults::CONNTRACK_ENTRIES, maglev_cells: defaults::MAGLEV_CELLS }
    }
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawService {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
    #[serde(default = "default_ring_size")]
    pub ring_size: u32,
    /// What to do when no backend is healthy: "drop" (default) or "fail-open".
    #[serde(default = "default_all_down")]
    pub all_down: String,
    /// How long a drained backend's established flows may continue.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
    #[serde(default)]
    pub passive_checks: Option<bool>,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Receives traffic only while no primary backend is healthy.
    #[serde(default, skip_serializing_if = "is_false")]
    pub backup: bool,
    /// No new flows; established ones continue until they end or the drain timeout passes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub drained: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
}

/// Active health check settings; every field has a default.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    /// "tcp" (connect), "http" (GET path, status in `expect`) or "none".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Port to check instead of the backend's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Accepted status codes, "200-399".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rise: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fall: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn default_mode() -> String {
    "nat".into()
}
fn default_scheduler() -> String {
    "maglev".into()
}
fn default_ring_size() -> u32 {
    defaults::RING_SIZE
}
fn default_weight() -> u32 {
    1
}
fn default_all_down() -> String {
    "drop".into()
}
fn default_drain_timeout_ms() -> u64 {
    300_000
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Nat,
    Dsr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheduler {
    Maglev,
    IpHash,
    RoundRobin,
    WeightedRoundRobin,
    LeastConn,
    LeastResponseTime,
}

impl Scheduler {
    pub const NAMES: &'static str = "maglev, ip-hash, round-robin, weighted-round-robin, least-conn, least-response-time";

    pub fn parse(name: &str) -> Option<Scheduler> {
        Some(match name {
            "maglev" => Scheduler::Maglev,
            "ip-hash" => Scheduler::IpHash,
            "round-robin" => Scheduler::RoundRobin,
            "weighted-round-robin" => Scheduler::WeightedRoundRobin,
            "least-conn" => Scheduler::LeastConn,
            "least-response-time" => Scheduler::LeastResponseTime,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Scheduler::Maglev => "maglev",
            Scheduler::IpHash => "ip-hash",
            Scheduler::RoundRobin => "round-robin",
            Scheduler::WeightedRoundRobin => "weighted-round-robin",
            Scheduler::LeastConn => "least-conn",
            Scheduler::LeastResponseTime => "least-response-time",
        }
    }

    /// Whether the service's ring is a Maglev table (else a sequence or a candidate list).
    pub fn uses_maglev(self) -> bool {
        matches!(self, Scheduler::Maglev | Scheduler::IpHash | Scheduler::LeastResponseTime)
    }
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub dataplane: Dataplane,
    pub services: Vec<Service>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dataplane {
    pub conntrack_entries: u32,
    pub maglev_cells: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: String,
    pub vip: SocketAddr,
    pub protocol: Protocol,
    pub mode: Mode,
    pub scheduler: Scheduler,
    pub ring_size: u32,
    pub all_down: AllDown,
    pub drain_timeout: Duration,
    /// Count SYNs against SYN-ACKs per backend and mark silent ones down (NAT TCP only).
    pub passive_checks: bool,
    pub backends: Vec<Backend>,
}

/// The policy when no backend of a service is healthy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllDown {
    /// New flows are dropped (counted as `drop_no_backend`): clients fail fast.
    Drop,
    /// Health is ignored and every non-drained primary gets traffic: a broken health check
    /// cannot take the whole service down.
    FailOpen,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    pub address: SocketAddr,
    pub weight: u32,
    pub backup: bool,
    pub drained: bool,
    /// `None` when health checks are off for this backend.
    pub health_check: Option<HealthCheck>,
    /// Set by the planner (not the config): failed its checks, so its flows move elsewhere.
    pub down: bool,
}

/// A validated health check: what to probe and how often.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: Option<u16>,
    pub spec: CheckSpec,
}

/// One invalid field: where it is and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not valid TOML for xdp-lb: {message}")]
    Syntax { path: String, message: String },
    #[error("{path} has {} invalid field(s):\n  {}", errors.len(), errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid { path: String, errors: Vec<FieldError> },
}

pub const MAX_WEIGHT: u32 = 65_535;
const MIN_CONNTRACK_ENTRIES: u32 = 1_024;

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: display.clone(), source })?;
        Self::parse(&text, &display)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Self::parse_with_raw(text, origin).map(|(_, config)| config)
    }

    /// [`Config::parse`], also returning the raw form (what the daemon edits for CLI changes).
    pub fn parse_with_raw(text: &str, origin: &str) -> Result<(RawConfig, Config), ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax { path: origin.to_string(), message: e.to_string() })?;
        let config = raw.validate().map_err(|errors| ConfigError::Invalid { path: origin.to_string(), errors })?;
        Ok((raw, config))
    }
}

impl RawConfig {
    /// Checks every field, collecting all problems rather than stopping at the first.
    pub fn validate(&self) -> Result<Config, Vec<FieldError>> {
        let mut errors = Vec::new();
        let mut err = |path: String, message: String| errors.push(FieldError { path, message });

        let dp = &self.dataplane;
        if dp.conntrack_entries < MIN_CONNTRACK_ENTRIES {
            err("dataplane.conntrack_entries".into(), format!("{} is below the minimum of {MIN_CONNTRACK_ENTRIES}", dp.conntrack_entries));
        }
        if self.services.len() > defaults::MAX_SERVICES as usize {
            err("services".into(), format!("{} services, at most {} are supported", self.services.len(), defaults::MAX_SERVICES));
        }

        let mut names = HashSet::new();
        let mut vips = HashSet::new();
        let mut services = Vec::new();
        let mut ring_cells: u64 = 0;
        let mut backend_count = 0usize;
        for (i, s) in self.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            if s.name.trim().is_empty() {
                err(at("name"), "must not be empty".into());
            } else if !names.insert(s.name.as_str()) {
                err(at("name"), format!("\"{}\" is already used by another service", s.name));
            }
            let vip = parse_socket_addr(&s.vip).map_err(|m| err(at("vip"), m)).ok();
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
            let scheduler = Scheduler::parse(&s.scheduler);
            if scheduler.is_none() {
                err(at("scheduler"), format!("\"{}\" is not one of: {}", s.scheduler, Scheduler::NAMES));
            }
            if s.ring_size < 3 || !is_prime(s.ring_size) {
                err(at("ring_size"), format!("{} is not a prime number ≥ 3 (e.g. 251, 16381, 65537)", s.ring_size));
            }
            if scheduler == Some(Scheduler::LeastConn) {
                if mode == Some(Mode::Dsr) {
                    err(at("scheduler"), "least-conn needs mode \"nat\": in dsr mode replies bypass the balancer, so it cannot see connections end".into());
                }
                if protocol == Some(Protocol::Udp) {
                    err(at("scheduler"), "least-conn counts TCP connections; UDP has no connection end to count".into());
                }
                if s.backends.len() > LEAST_CONN_MAX as usize {
                    err(at("backends"), format!("{} backends, least-conn supports at most {LEAST_CONN_MAX}", s.backends.len()));
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
            let tcp_default = protocol == Some(Protocol::Tcp);
            let service_check = health_check(s.health_check.as_ref(), None, tcp_default).map_err(|m| err(at("health_check"), m)).ok().flatten();
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
            }

            let mut backends = Vec::new();
            let mut seen = HashSet::new();
            for (j, b) in s.backends.iter().enumerate() {
                let at = |field: &str| format!("services[{i}].backends[{j}].{field}");
                backend_count += 1;
                if b.weight > MAX_WEIGHT {
                    err(at("weight"), format!("{} is above the maximum of {MAX_WEIGHT}", b.weight));
                }
                let Ok(address) = parse_socket_addr(&b.address).map_err(|m| err(at("address"), m)) else { continue };
                if !seen.insert(address) {
                    err(at("address"), format!("{address} is listed twice in this service"));
                }
                if let Some(vip) = vip {
                    if vip.is_ipv4() != address.is_ipv4() {
                        err(at("address"), format!("{address} is not of the VIP's address family ({vip})"));
                    }
                    if mode == Some(Mode::Dsr) && address.port() != vip.port() {
                        err(at("address"), format!("port {} differs from the VIP's port {}: direct server return cannot translate ports", address.port(), vip.port()));
                    }
                }
                let check = match &b.health_check {
                    None => Ok(service_check.clone()),
                    Some(own) => health_check(Some(own), s.health_check.as_ref(), tcp_default),
                };
                let Ok(check) = check.map_err(|m| err(at("health_check"), m)) else { continue };
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
        if backend_count > defaults::MAX_BACKENDS as usize - 1 {
            err("services".into(), format!("{backend_count} backends in all, at most {} are supported", defaults::MAX_BACKENDS - 1));
        }
        if ring_cells > dp.maglev_cells as u64 {
            err(
                "dataplane.maglev_cells".into(),
                format!("{} cells cannot hold the services' rings: they need {ring_cells} (twice each ring_size, so a table can be replaced while the old one serves)", dp.maglev_cells),
            );
        }

        if errors.is_empty() {
            Ok(Config { dataplane: Dataplane { conntrack_entries: dp.conntrack_entries, maglev_cells: dp.maglev_cells }, services })
        } else {
            Err(errors)
        }
    }
}

/// The effective check: `own` fields over `inherited` ones over the defaults. TCP services are
/// checked by default (TCP connect); UDP services only when configured (a UDP port cannot be probed
/// generically), e.g. `kind = "http"` with `port` of a health endpoint.
fn health_check(own: Option<&RawHealthCheck>, inherited: Option<&RawHealthCheck>, tcp_service: bool) -> Result<Option<HealthCheck>, String> {
    let pick = |f: fn(&RawHealthCheck) -> Option<String>| own.and_then(f).or_else(|| inherited.and_then(f));
    let pick_u64 = |f: fn(&RawHealthCheck) -> Option<u64>| own.and_then(f).or_else(|| inherited.and_then(f));
    let default_kind = if tcp_service || own.is_some() || inherited.is_some() { "tcp" } else { "none" };
    let kind = pick(|h| h.kind.clone()).unwrap_or_else(|| default_kind.to_string());
    let defaults = CheckSpec::default();
    let kind = match kind.as_str() {
        "none" => return Ok(None),
        "tcp" => CheckKind::Tcp,
        "http" => {
            let path = pick(|h| h.path.clone()).unwrap_or_else(|| "/".into());
            let expect = pick(|h| h.expect.clone()).unwrap_or_else(|| "200-399".into());
            let range = expect
                .split_once('-')
                .and_then(|(lo, hi)| Some(lo.trim().parse::<u16>().ok()?..=hi.trim().parse::<u16>().ok()?))
                .or_else(|| expect.trim().parse::<u16>().ok().map(|c| c..=c))
                .ok_or_else(|| format!("expect \"{expect}\" is not a status range like \"200-399\""))?;
            CheckKind::Http { path, expect: range }
        }
        other => return Err(format!("kind \"{other}\" is not one of: tcp, http, none")),
    };
    let spec = CheckSpec {
        kind,
        interval: pick_u64(|h| h.interval_ms).map(Duration::from_millis).unwrap_or(defaults.interval),
        timeout: pick_u64(|h| h.timeout_ms).map(Duration::from_millis).unwrap_or(defaults.timeout),
        rise: pick_u64(|h| h.rise.map(u64::from)).map(|v| v as u32).unwrap_or(defaults.rise),
        fall: pick_u64(|h| h.fall.map(u64::from)).map(|v| v as u32).unwrap_or(defaults.fall),
    };
    spec.validate()?;
    let port = own.and_then(|h| h.port).or_else(|| inherited.and_then(|h| h.port));
    if port == Some(0) {
        return Err("port 0 cannot be checked".into());
    }
    Ok(Some(HealthCheck { port, spec }))
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("\"{text}\" is not an address with a port, like \"10.0.0.100:80\" or \"[2001:db8::100]:80\""))?;
    if addr.port() == 0 {
        return Err(format!("\"{text}\" has port 0"));
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err(format!("\"{text}\" is not a unicast address"));
    }
    Ok(addr)
}

#[cfg(test)]
mod tests;
