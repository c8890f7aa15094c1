//! The daemon's TOML configuration: serde structs with defaults, then [`RawConfig::validate`], which
//! reports every invalid field with its path and yields the typed [`Config`] the rest of the daemon uses.

use std::{net::SocketAddr, path::Path, time::Duration};

pub mod file;

use serde::{Deserialize, Serialize};
use xdp_lb_common::maps::defaults;

use crate::health::CheckSpec;

mod location;
mod validate;

pub use location::{render_for_cli, FieldError, Location};
pub use validate::{valid_name, MAX_BACKENDS_TOTAL};

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub dataplane: RawDataplane,
    #[serde(default)]
    pub services: Vec<RawService>,
    /// Announcing the VIPs through a BGP daemon (absent: announcements off, one node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce: Option<RawAnnounce>,
}

/// `[announce]`: the daemon keeps one route per announced VIP address in a kernel routing table
/// that BIRD's kernel protocol learns from and exports over BGP (see [`crate::announce`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RawAnnounce {
    /// The kernel routing table the daemon owns (1..=252).
    #[serde(default = "default_announce_table")]
    pub table: u32,
    /// Node drain: every VIP withdrawn, traffic that still arrives is forwarded. Written by
    /// `xdp-lb node drain|undrain`.
    #[serde(default)]
    pub drained: bool,
}

fn default_announce_table() -> u32 {
    DEFAULT_ANNOUNCE_TABLE
}

/// The routing table `[announce]` uses when `table` is not given.
pub const DEFAULT_ANNOUNCE_TABLE: u32 = 100;
/// Highest table `[announce] table` may name: 253, 254 and 255 are the kernel's default, main and
/// local tables (0 means "unspecified"), and routes there would change this node's forwarding.
pub const MAX_ANNOUNCE_TABLE: u32 = 252;

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawDataplane {
    /// Flows tracked by the connection table (and by the NAT reply table).
    pub conntrack_entries: u32,
    /// Cells shared by all services' Maglev rings.
    pub maglev_cells: u32,
    /// Seeds the Maglev permutations. Every node announcing one VIP must use the same seed, so that
    /// all build the same ring from the same backends.
    pub hash_seed: u64,
}

impl Default for RawDataplane {
    fn default() -> Self {
        Self {
            conntrack_entries: defaults::CONNTRACK_ENTRIES,
            maglev_cells: defaults::MAGLEV_CELLS,
            hash_seed: xdp_lb_common::maglev::DEFAULT_SEED,
        }
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
    /// When the drain began (RFC 3339, UTC), written by `xdp-lb backend drain` next to `drained =
    /// true`, so a restart during a drain keeps its timeout instead of starting it again. Absent
    /// (a hand-written drain): the drain counts from when the daemon read it.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "time_text")]
    pub drained_since: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<RawHealthCheck>,
}

/// A time written quoted (`"2026-12-02T07:30:00Z"`) or as a TOML datetime (unquoted), kept as text:
/// validation says what is wrong with it, naming the field.
fn time_text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    use serde::de::Error;
    match Option::<toml::Value>::deserialize(d)? {
        None => Ok(None),
        Some(toml::Value::String(text)) => Ok(Some(text)),
        Some(toml::Value::Datetime(time)) => Ok(Some(time.to_string())),
        Some(other) => Err(D::Error::custom(format!("expected a time like \"2026-12-02T07:30:00Z\", found a {}", other.type_str()))),
    }
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
    /// `None`: announcements off.
    pub announce: Option<Announce>,
}

/// A validated `[announce]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Announce {
    pub table: u32,
    pub drained: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dataplane {
    pub conntrack_entries: u32,
    pub maglev_cells: u32,
    /// Seed of every Maglev ring (see [`RawDataplane::hash_seed`]).
    pub hash_seed: u64,
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

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The I/O error is part of the message, not a `source`: a chain printer (`{:#}`) would
    /// print it twice.
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path} is not valid TOML for xdp-lb: {message}")]
    Syntax {
        path: String,
        message: String,
        /// 1-based line of the error, when the parser gives its place (for `check --json`).
        line: Option<usize>,
    },
    #[error("{path} has {} invalid field(s):\n  {}", errors.len(), errors.iter().map(|e| located(path, e)).collect::<Vec<_>>().join("\n  "))]
    Invalid { path: String, errors: Vec<FieldError> },
}

/// The 1-based line a TOML error points at.
fn line_of_error(e: &toml::de::Error, text: &str) -> Option<usize> {
    e.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1)
}

/// A TOML error as one line, `line L, column C ("the line"): message` (the error's own text is a multi-line
/// excerpt of the file, and CLI errors are one line).
fn one_line(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().split_whitespace().collect::<Vec<_>>().join(" ");
    let Some(span) = e.span() else { return message };
    let before = &text[..span.start.min(text.len())];
    let line = line_of_error(e, text).unwrap_or(1);
    let column = before.rsplit('\n').next().unwrap_or_default().chars().count() + 1;
    let source_line = text.lines().nth(line - 1).unwrap_or_default().trim();
    let shown: String = source_line.chars().take(80).collect();
    format!("line {line}, column {column} ({shown:?}): {message}")
}

/// `xdp-lb.toml:12: services[0].vip: ...`, the way compilers name places.
fn located(origin: &str, e: &FieldError) -> String {
    match e.line {
        Some(line) => format!("{origin}:{line}: {e}"),
        None => format!("{origin}: {e}"),
    }
}

/// Largest backend weight; weights are relative, so this only bounds the rings' arithmetic.
pub const MAX_WEIGHT: u32 = 65_535;
/// Fewer entries than this would make a small flood evict every real flow.
pub const MIN_CONNTRACK_ENTRIES: u32 = 1_024;
/// Each entry is sized twice (`CONNTRACK` and `NAT_REVERSE`, ~100 bytes of key and value plus
/// the kernel's per-element overhead); beyond 16 Mi entries the kernel's allocation, not the
/// balancer, decides whether the maps can be created.
pub const MAX_CONNTRACK_ENTRIES: u32 = 1 << 24;
/// `MAGLEV_RING` is an array map: it cannot be empty.
pub const MIN_MAGLEV_CELLS: u32 = 1;
/// 4 bytes per cell: 256 MiB, room for 1,000 services of the default ring size, twice over.
pub const MAX_MAGLEV_CELLS: u32 = 1 << 26;
/// Largest `hash_seed`: TOML integers are signed 64-bit, so a larger seed could not be written
/// back into the config file.
pub const MAX_HASH_SEED: u64 = i64::MAX as u64;
/// Longest drain: a week. Also keeps the value inside TOML's signed 64-bit integers.
pub const MAX_DRAIN_TIMEOUT_MS: u64 = 7 * 24 * 60 * 60 * 1000;
/// Most consecutive probes `rise`/`fall` can ask for: more only delays detection by hours.
pub const MAX_RISE_FALL: u32 = 100;
/// Longest health-check path: it goes into every probe's request line.
pub const MAX_CHECK_PATH_LEN: usize = 1024;
/// Longest service name (see [`valid_name`]).
pub const MAX_NAME_LEN: usize = 63;

impl RawService {
    /// A service with every optional field at its default, as the config file's serde defaults.
    pub fn new(name: impl Into<String>, vip: impl Into<String>, protocol: impl Into<String>) -> RawService {
        RawService {
            name: name.into(),
            vip: vip.into(),
            protocol: protocol.into(),
            mode: default_mode(),
            scheduler: default_scheduler(),
            ring_size: default_ring_size(),
            all_down: default_all_down(),
            drain_timeout_ms: default_drain_timeout_ms(),
            health_check: None,
            passive_checks: None,
            backends: Vec::new(),
        }
    }
}

impl RawBackend {
    /// A backend with every optional field at its default, as the config file's serde defaults.
    pub fn new(address: impl Into<String>) -> RawBackend {
        RawBackend { address: address.into(), weight: default_weight(), backup: false, drained: false, drained_since: None, health_check: None }
    }
}

impl ConfigError {
    /// `errors` found in `text` (read from `origin`) after validation, e.g. against the host:
    /// each gets its line and they are listed in file order, as validation's own errors are.
    pub fn invalid_in(origin: &str, text: &str, mut errors: Vec<FieldError>) -> ConfigError {
        location::locate(&mut errors, text);
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        ConfigError::Invalid { path: origin.to_string(), errors }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: display.clone(), error })?;
        Self::parse(&text, &display)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        RawConfig::parse(text, origin).map(|(_, config)| config)
    }
}

impl RawConfig {
    /// Parses and validates a config file's text; `origin` names it in errors, whose
    /// fields carry the line they are on.
    pub fn parse(text: &str, origin: &str) -> Result<(RawConfig, Config), ConfigError> {
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::Syntax { path: origin.to_string(), message: one_line(&e, text), line: line_of_error(&e, text) })?;
        match raw.validate() {
            Ok(config) => Ok((raw, config)),
            // In file order, as a reader fixes them; the sort is stable within a line.
            Err(errors) => Err(ConfigError::invalid_in(origin, text, errors)),
        }
    }
}

/// Parses a backend weight given on the command line; the error (to follow the argument's name)
/// states the real limit, where a plain `u32` parse would quote `u32::MAX`.
pub fn parse_weight(text: &str) -> Result<u32, String> {
    match text.parse::<u64>() {
        Ok(weight) if weight <= MAX_WEIGHT as u64 => Ok(weight as u32),
        _ => Err(format!("must be a whole number between 0 and {MAX_WEIGHT}")),
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod announce_tests;
