//! The gateway's single TOML file: serde structs with defaults, then `validate()`
//! which collects every problem (with its path) instead of stopping at the first.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

pub mod addr;
mod duration;
mod secret;
mod validate;

pub use duration::DurationText;
pub use secret::{Secret, SecretSource};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The cause is part of the message and deliberately not a `source`: error reporters
    // (anyhow's `{:#}`, `Error:` from main) print the chain, which printed it twice.
    #[error("cannot read {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("cannot parse TOML: {0}")]
    Parse(toml::de::Error),
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  - {e}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<FieldError>),
}

/// One invalid field, e.g. `routes[2].pool: unknown pool "x"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
    #[serde(default)]
    pub auth: AuthConfig,
    #[serde(default)]
    pub rate_limits: BTreeMap<String, RateLimitConfig>,
    #[serde(default)]
    pub transforms: BTreeMap<String, TransformConfig>,
    #[serde(default)]
    pub observability: ObservabilityConfig,
    /// The admin listener (traces, route lookups); off when absent.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
}

/// `[admin]`: a listener of its own for operators and the xdp-lb dashboard: sampled
/// request traces (`GET /admin/traces`), route lookups (`GET /admin/route`) and the
/// metrics. GET only; it never runs the gateway pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// `IP:port`.
    pub listen: String,
    /// Share of requests traced, 0.0–1.0.
    #[serde(default = "default_trace_sample_rate")]
    pub trace_sample_rate: f64,
    /// Traces kept; the oldest is dropped first.
    #[serde(default = "default_trace_buffer")]
    pub trace_buffer: usize,
    /// This replica's name in traces; default: `listen`.
    #[serde(default)]
    pub replica: Option<String>,
}

/// The most traces `trace_buffer` may keep (a trace is well under 2 KiB).
pub const MAX_TRACE_BUFFER: usize = 65_536;

fn default_trace_sample_rate() -> f64 {
    0.01
}
fn default_trace_buffer() -> usize {
    256
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout_ms: u64,
    /// A request body that sends no byte for this long gets 408 and the connection is
    /// closed; also the grace period before `body_min_rate_bytes_per_sec` applies.
    pub body_read_timeout_ms: u64,
    /// After `body_read_timeout_ms`, a request body must have averaged at least this
    /// many bytes per second (408 otherwise), so a trickle cannot hold a slot; 0 = off.
    pub body_min_rate_bytes_per_sec: u64,
    /// A new connection that sends no byte for this long is closed.
    pub first_byte_timeout_ms: u64,
    /// A connection with no request in flight that moves no byte for this long is
    /// closed (HTTP/1 keep-alive and HTTP/2 alike).
    pub idle_timeout_ms: u64,
    /// An upgraded (WebSocket) tunnel that moves no byte either way for this long is
    /// closed.
    pub tunnel_idle_timeout_ms: u64,
    /// Open connections per listener. Unwritten: 10 000, or fewer where the open-file
    /// limit holds fewer (`fd_limit::fit_default`).
    pub max_connections: usize,
    /// Whether the file wrote `max_connections` (a written value is kept as written).
    #[serde(skip)]
    pub max_connections_written: bool,
    /// Open connections allowed per client address (IPv6: per /64). Unset: a tenth
    /// of `max_connections`, at least 1.
    pub max_connections_per_ip: Option<usize>,
    /// How often the config file is checked for changes; 0 disables polling.
    pub reload_poll_ms: u64,
    /// Backends given by DNS name (`host:port`) are resolved again this often.
    pub dns_refresh_ms: u64,
    // String twins of the `_ms` fields ("10s"); see `duration.rs`.
    pub header_read_timeout: Option<DurationText>,
    pub body_read_timeout: Option<DurationText>,
    pub first_byte_timeout: Option<DurationText>,
    pub idle_timeout: Option<DurationText>,
    pub tunnel_idle_timeout: Option<DurationText>,
    pub reload_poll: Option<DurationText>,
    pub dns_refresh: Option<DurationText>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_response_bytes: 8 << 20,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout_ms: 10_000,
            body_read_timeout_ms: 10_000,
            body_min_rate_bytes_per_sec: 1024,
            first_byte_timeout_ms: 10_000,
            idle_timeout_ms: 10_000,
            tunnel_idle_timeout_ms: 3_600_000,
            max_connections: 10_000,
            max_connections_written: false,
            max_connections_per_ip: None,
            reload_poll_ms: 1_000,
            dns_refresh_ms: 30_000,
            header_read_timeout: None,
            body_read_timeout: None,
            first_byte_timeout: None,
            idle_timeout: None,
            tunnel_idle_timeout: None,
            reload_poll: None,
            dns_refresh: None,
        }
    }
}

impl ServerConfig {
    /// The effective per-address connection cap.
    pub fn per_ip_cap(&self) -> usize {
        self.max_connections_per_ip
            .unwrap_or(self.max_connections / 10)
            .max(1)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: String,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Serve the Prometheus endpoint on this listener.
    #[serde(default)]
    pub metrics: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The first certificate is the default when SNI matches none.
    pub certificates: Vec<CertConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    pub cert_file: String,
    pub key_file: String,
    #[serde(default)]
    pub server_names: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum PathMatch {
    Exact,
    #[default]
    Prefix,
    Template,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    #[default]
    None,
    Jwt,
    ApiKey,
    Either,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default)]
    pub host: Option<String>,
    pub path: String,
    #[serde(default)]
    pub path_match: PathMatch,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub pool: Option<String>,
    #[serde(default)]
    pub strip_prefix: Option<String>,
    /// Replacement path; `{name}` is filled from template parameters.
    #[serde(default)]
    pub rewrite: Option<String>,
    #[serde(default)]
    pub auth: AuthMode,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub rate_limit: Option<String>,
    #[serde(default)]
    pub transform: Option<String>,
    #[serde(default)]
    pub websocket: bool,
    #[serde(default)]
    pub aggregate: Vec<AggregatePart>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatePart {
    /// Key of this part in the merged JSON object.
    pub name: String,
    pub pool: String,
    /// Upstream path; `{name}` is filled from template parameters.
    pub path: String,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Algorithm {
    #[default]
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    LeastResponseTime,
    IpHash,
    ConsistentHash,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    #[serde(default)]
    pub algorithm: Algorithm,
    /// For `consistent-hash`: `client-ip`, `header:NAME` or `cookie:NAME`.
    #[serde(default)]
    pub hash_on: Option<String>,
    pub backends: Vec<BackendConfig>,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    #[serde(default)]
    pub connect_timeout: Option<DurationText>,
    #[serde(default)]
    pub request_timeout: Option<DurationText>,
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub passive: PassiveConfig,
}

/// What a `consistent-hash` pool hashes on: `hash_on` parsed once, when the pool is
/// built from config, so a request never re-parses the string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashOn {
    #[default]
    ClientIp,
    Header(http::HeaderName),
    Cookie(String),
}

impl HashOn {
    /// `None` (the default) hashes on the client address. The error is the message
    /// validation reports under `pools.NAME.hash_on`.
    pub fn parse(text: Option<&str>) -> Result<HashOn, String> {
        let Some(h) = text else {
            return Ok(HashOn::ClientIp);
        };
        let bad = || format!("expected client-ip, header:NAME or cookie:NAME, got {h:?}");
        if h == "client-ip" {
            Ok(HashOn::ClientIp)
        } else if let Some(n) = h.strip_prefix("header:") {
            http::HeaderName::from_bytes(n.as_bytes())
                .map(HashOn::Header)
                .map_err(|_| bad())
        } else if let Some(n) = h.strip_prefix("cookie:").filter(|n| !n.is_empty()) {
            Ok(HashOn::Cookie(n.to_string()))
        } else {
            Err(bad())
        }
    }
}

fn default_connect_timeout() -> u64 {
    1_000
}
fn default_request_timeout() -> u64 {
    15_000
}
fn default_retries() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// `IP:port`, or `host:port` resolved at start and every `dns_refresh`.
    pub address: String,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    pub interval: Option<DurationText>,
    pub timeout: Option<DurationText>,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/health".into(),
            interval_ms: 5_000,
            timeout_ms: 1_000,
            rise: 2,
            fall: 3,
            interval: None,
            timeout: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveConfig {
    /// Consecutive 5xx or connection failures before ejection; 0 disables.
    pub consecutive_failures: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    pub max_ejected_percent: u32,
    pub base_ejection: Option<DurationText>,
    pub max_ejection: Option<DurationText>,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
            base_ejection: None,
            max_ejection: None,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    #[serde(default)]
    pub failure_limit: AuthFailureLimitConfig,
}

/// Failed authentications allowed per client address (IPv6: per /64) and window
/// before the address gets 429 without its credentials being checked.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthFailureLimitConfig {
    /// 0 disables the limit.
    pub max_failures: u32,
    pub window_ms: u64,
    /// Addresses tracked at once; when full, finished windows are dropped first.
    pub max_addresses: usize,
    pub window: Option<DurationText>,
}

impl Default for AuthFailureLimitConfig {
    fn default() -> Self {
        Self {
            max_failures: 30,
            window_ms: 60_000,
            max_addresses: 100_000,
            window: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    #[serde(default)]
    pub keys: Vec<JwtKeyConfig>,
    /// `http://` or `https://`.
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// PEM CA bundle trusted for an https JWKS URL instead of the built-in web roots.
    #[serde(default)]
    pub jwks_ca_file: Option<String>,
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_secs: u64,
    /// Minimum spacing of refetches triggered by an unknown `kid`.
    #[serde(default = "default_jwks_min_refetch")]
    pub jwks_min_refetch_secs: u64,
    #[serde(default = "default_user_claim")]
    pub user_id_claim: String,
    #[serde(default = "default_role_claim")]
    pub role_claim: String,
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Bounds of the verified-token cache: tokens, and their bytes (each counted
    /// with ~100 bytes of overhead).
    #[serde(default = "default_token_cache_max_entries")]
    pub token_cache_max_entries: usize,
    #[serde(default = "default_token_cache_max_bytes")]
    pub token_cache_max_bytes: usize,
    #[serde(default)]
    pub jwks_refresh: Option<DurationText>,
    #[serde(default)]
    pub jwks_min_refetch: Option<DurationText>,
    #[serde(default)]
    pub leeway: Option<DurationText>,
}

fn default_jwks_refresh() -> u64 {
    300
}
fn default_jwks_min_refetch() -> u64 {
    10
}
fn default_user_claim() -> String {
    "sub".into()
}
fn default_role_claim() -> String {
    "role".into()
}
fn default_leeway() -> u64 {
    30
}
fn default_token_cache_max_entries() -> usize {
    10_000
}
fn default_token_cache_max_bytes() -> usize {
    4 << 20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    #[serde(default)]
    pub kid: Option<String>,
    /// HS256, RS256 or ES256.
    pub algorithm: String,
    /// Inline string, `{ env = "VAR" }` or `{ file = "/path" }`.
    #[serde(default)]
    pub secret: Option<Secret>,
    #[serde(default)]
    pub public_key_pem: Option<String>,
    #[serde(default)]
    pub public_key_file: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    /// Hex SHA-256 of the key: the config never holds the key itself.
    pub sha256: String,
    pub user_id: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RateAlgorithm {
    FixedWindow,
    SlidingWindow,
    TokenBucket,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RateKey {
    #[default]
    ClientIp,
    ApiKey,
    UserId,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    pub algorithm: RateAlgorithm,
    #[serde(default)]
    pub key: RateKey,
    /// Requests allowed per window (token bucket: refill per window).
    pub limit: u64,
    /// Required unless `window` is given.
    #[serde(default)]
    pub window_ms: u64,
    #[serde(default)]
    pub window: Option<DurationText>,
    /// Token bucket capacity; defaults to `limit`.
    #[serde(default)]
    pub burst: Option<u64>,
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

fn default_max_keys() -> usize {
    100_000
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformConfig {
    pub request_headers_add: BTreeMap<String, String>,
    pub request_headers_remove: Vec<String>,
    pub response_headers_add: BTreeMap<String, String>,
    pub response_headers_remove: Vec<String>,
    pub strip_json_fields: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObservabilityConfig {
    pub metrics_path: String,
    pub access_log: bool,
    /// Take part in W3C trace context: continue (or start) the client's trace with a
    /// span of our own in `traceparent`. Off, the header passes through untouched.
    pub trace_context: bool,
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            metrics_path: "/metrics".into(),
            access_log: true,
            trace_context: true,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Io {
            path: path.display().to_string(),
            error,
        })?;
        Config::parse(&text)
    }

    /// Parse and validate: an invalid file never yields a `Config`.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // Parsed twice: the plain table tells which keys were written (defaults cannot).
        let raw: toml::Table = toml::from_str(text).map_err(ConfigError::Parse)?;
        let mut cfg: Config = toml::from_str(text).map_err(ConfigError::Parse)?;
        cfg.server.max_connections_written = raw
            .get("server")
            .and_then(toml::Value::as_table)
            .is_some_and(|server| server.contains_key("max_connections"));
        let mut errors = cfg.resolve_durations(&raw);
        errors.extend(cfg.load_secrets());
        errors.extend(cfg.validate());
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

#[cfg(test)]
mod tests;
