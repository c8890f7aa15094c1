//! The gateway's single TOML file: serde structs with defaults, then `validate()`
//! which collects every problem (with its path) instead of stopping at the first.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot parse TOML: {0}")]
    Parse(#[from] toml::de::Error),
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub header_read_timeout_ms: u64,
    pub max_connections: usize,
    /// How often the config file is checked for changes; 0 disables polling.
    pub reload_poll_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1 << 20,
            max_response_bytes: 8 << 20,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout_ms: 10_000,
            max_connections: 10_000,
            reload_poll_ms: 1_000,
        }
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
    #[serde(default = "default_retries")]
    pub retries: u32,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub passive: PassiveConfig,
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
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            path: "/health".into(),
            interval_ms: 5_000,
            timeout_ms: 1_000,
            rise: 2,
            fall: 3,
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
}

impl Default for PassiveConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_ms: 300_000,
            max_ejected_percent: 50,
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
    #[serde(default)]
    pub jwks_url: Option<String>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtKeyConfig {
    #[serde(default)]
    pub kid: Option<String>,
    /// HS256, RS256 or ES256.
    pub algorithm: String,
    #[serde(default)]
    pub secret: Option<String>,
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
    pub window_ms: u64,
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
}

impl Default for ObservabilityConfig {
    fn default() -> Self {
        Self {
            metrics_path: "/metrics".into(),
            access_log: true,
        }
    }
}

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text)
    }

    /// Parse and validate: an invalid file never yields a `Config`.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let cfg: Config = toml::from_str(text)?;
        let errors = cfg.validate();
        if errors.is_empty() {
            Ok(cfg)
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }

    pub fn validate(&self) -> Vec<FieldError> {
        let mut errs = Vec::new();
        let mut err = |path: String, message: String| errs.push(FieldError { path, message });

        let s = &self.server;
        if s.max_body_bytes == 0 {
            err("server.max_body_bytes".into(), "must be > 0".into());
        }
        if s.max_header_bytes < 8192 {
            err("server.max_header_bytes".into(), "must be >= 8192".into());
        }
        if s.max_headers == 0 {
            err("server.max_headers".into(), "must be > 0".into());
        }
        if s.header_read_timeout_ms == 0 {
            err("server.header_read_timeout_ms".into(), "must be > 0".into());
        }
        if s.max_connections == 0 {
            err("server.max_connections".into(), "must be > 0".into());
        }
        if !self.observability.metrics_path.starts_with('/') {
            err("observability.metrics_path".into(), "must start with '/'".into());
        }

        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let p = format!("listeners[{i}]");
            if !names.insert(l.name.clone()) {
                err(format!("{p}.name"), format!("duplicate listener name {:?}", l.name));
            }
            if l.bind.parse::<SocketAddr>().is_err() {
                err(format!("{p}.bind"), format!("not an IP:port address: {:?}", l.bind));
            }
            if let Some(tls) = &l.tls {
                if tls.certificates.is_empty() {
                    err(format!("{p}.tls.certificates"), "needs at least one certificate".into());
                }
                for (j, c) in tls.certificates.iter().enumerate() {
                    for (field, f) in [("cert_file", &c.cert_file), ("key_file", &c.key_file)] {
                        if !Path::new(f).is_file() {
                            err(format!("{p}.tls.certificates[{j}].{field}"), format!("file not found: {f:?}"));
                        }
                    }
                }
            }
        }

        for (name, pool) in &self.pools {
            let p = format!("pools.{name}");
            if pool.backends.is_empty() {
                err(format!("{p}.backends"), "needs at least one backend".into());
            }
            for (j, b) in pool.backends.iter().enumerate() {
                if b.address.parse::<SocketAddr>().is_err() {
                    err(format!("{p}.backends[{j}].address"), format!("not an IP:port address: {:?}", b.address));
                }
                if b.weight == 0 {
                    err(format!("{p}.backends[{j}].weight"), "must be > 0".into());
                }
            }
            if pool.connect_timeout_ms == 0 {
                err(format!("{p}.connect_timeout_ms"), "must be > 0".into());
            }
            if pool.request_timeout_ms == 0 {
                err(format!("{p}.request_timeout_ms"), "must be > 0".into());
            }
            match (&pool.algorithm, &pool.hash_on) {
                (Algorithm::ConsistentHash, Some(h)) => {
                    let ok = h == "client-ip"
                        || h.strip_prefix("header:").is_some_and(|n| http::HeaderName::from_bytes(n.as_bytes()).is_ok())
                        || h.strip_prefix("cookie:").is_some_and(|n| !n.is_empty());
                    if !ok {
                        err(format!("{p}.hash_on"), format!("expected client-ip, header:NAME or cookie:NAME, got {h:?}"));
                    }
                }
                (Algorithm::ConsistentHash, None) => {}
                (_, Some(_)) => err(format!("{p}.hash_on"), "only valid with algorithm = \"consistent-hash\"".into()),
                _ => {}
            }
            if let Some(hc) = &pool.health_check {
                if !hc.path.starts_with('/') {
                    err(format!("{p}.health_check.path"), "must start with '/'".into());
                }
                if hc.interval_ms == 0 {
                    err(format!("{p}.health_check.interval_ms"), "must be > 0".into());
                }
                if hc.timeout_ms == 0 {
                    err(format!("{p}.health_check.timeout_ms"), "must be > 0".into());
                }
                if hc.rise == 0 {
                    err(format!("{p}.health_check.rise"), "must be > 0".into());
                }
                if hc.fall == 0 {
                    err(format!("{p}.health_check.fall"), "must be > 0".into());
                }
            }
            if pool.passive.max_ejected_percent > 100 {
                err(format!("{p}.passive.max_ejected_percent"), "must be <= 100".into());
            }
            if pool.passive.max_ejection_ms < pool.passive.base_ejection_ms {
                err(format!("{p}.passive.max_ejection_ms"), "must be >= base_ejection_ms".into());
            }
        }

        if let Some(jwt) = &self.auth.jwt {
            if jwt.keys.is_empty() && jwt.jwks_url.is_none() {
                err("auth.jwt".into(), "needs keys or jwks_url".into());
            }
            if let Some(u) = &jwt.jwks_url {
                if !u.starts_with("http://") || u.parse::<http::Uri>().is_err() {
                    err("auth.jwt.jwks_url".into(), format!("must be an http:// URL, got {u:?}"));
                }
            }
            if jwt.jwks_refresh_secs == 0 {
                err("auth.jwt.jwks_refresh_secs".into(), "must be > 0".into());
            }
            for (i, k) in jwt.keys.iter().enumerate() {
                let p = format!("auth.jwt.keys[{i}]");
                match k.algorithm.as_str() {
                    "HS256" => {
                        if k.secret.as_deref().is_none_or(str::is_empty) {
                            err(format!("{p}.secret"), "HS256 needs a non-empty secret".into());
                        }
                        if k.public_key_pem.is_some() || k.public_key_file.is_some() {
                            err(format!("{p}.public_key_pem"), "HS256 takes a secret, not a public key".into());
                        }
                    }
                    "RS256" | "ES256" => {
                        if k.secret.is_some() {
                            err(format!("{p}.secret"), format!("{} takes a public key, not a secret", k.algorithm));
                        }
                        match (&k.public_key_pem, &k.public_key_file) {
                            (None, None) => err(format!("{p}.public_key_pem"), "public_key_pem or public_key_file required".into()),
                            (Some(_), Some(_)) => err(format!("{p}.public_key_file"), "give only one of public_key_pem / public_key_file".into()),
                            (None, Some(f)) if !Path::new(f).is_file() => {
                                err(format!("{p}.public_key_file"), format!("file not found: {f:?}"))
                            }
                            _ => {}
                        }
                    }
                    other => err(format!("{p}.algorithm"), format!("unsupported algorithm {other:?} (HS256, RS256, ES256)")),
                }
            }
        }
        for (i, k) in self.auth.api_keys.iter().enumerate() {
            if k.sha256.len() != 64 || hex::decode(&k.sha256).is_err() {
                err(format!("auth.api_keys[{i}].sha256"), "must be 64 hex characters (SHA-256 of the key)".into());
            }
            if k.user_id.is_empty() {
                err(format!("auth.api_keys[{i}].user_id"), "must not be empty".into());
            }
        }

        for (name, rl) in &self.rate_limits {
            let p = format!("rate_limits.{name}");
            if rl.limit == 0 {
                err(format!("{p}.limit"), "must be > 0".into());
            }
            if rl.window_ms == 0 {
                err(format!("{p}.window_ms"), "must be > 0".into());
            }
            if rl.burst == Some(0) {
                err(format!("{p}.burst"), "must be > 0".into());
            }
            if rl.burst.is_some() && rl.algorithm != RateAlgorithm::TokenBucket {
                err(format!("{p}.burst"), "only valid for token-bucket".into());
            }
            if rl.max_keys == 0 {
                err(format!("{p}.max_keys"), "must be > 0".into());
            }
        }

        for (name, t) in &self.transforms {
            let p = format!("transforms.{name}");
            for (field, map) in [("request_headers_add", &t.request_headers_add), ("response_headers_add", &t.response_headers_add)] {
                for (k, v) in map {
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                        err(format!("{p}.{field}.{k}"), "invalid header name".into());
                    }
                    if http::HeaderValue::from_str(v).is_err() {
                        err(format!("{p}.{field}.{k}"), "invalid header value".into());
                    }
                }
            }
            for (field, list) in [("request_headers_remove", &t.request_headers_remove), ("response_headers_remove", &t.response_headers_remove)] {
                for (j, k) in list.iter().enumerate() {
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                        err(format!("{p}.{field}[{j}]"), format!("invalid header name {k:?}"));
                    }
                }
            }
        }

        let mut route_names = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let p = format!("routes[{i}]");
            if !route_names.insert(r.name.clone()) {
                err(format!("{p}.name"), format!("duplicate route name {:?}", r.name));
            }
            if !r.path.starts_with('/') {
                err(format!("{p}.path"), "must start with '/'".into());
            }
            let has_braces = r.path.contains('{');
            if has_braces && r.path_match != PathMatch::Template {
                err(format!("{p}.path_match"), "a path with {params} needs path_match = \"template\"".into());
            }
            if r.path_match == PathMatch::Template {
                let mut router = matchit::Router::new();
                if let Err(e) = router.insert(r.path.as_str(), ()) {
                    err(format!("{p}.path"), format!("invalid template: {e}"));
                }
            }
            for (j, m) in r.methods.iter().enumerate() {
                if !METHODS.contains(&m.as_str()) {
                    err(format!("{p}.methods[{j}]"), format!("unknown method {m:?}"));
                }
            }
            for (k, v) in &r.headers {
                if http::HeaderName::from_bytes(k.as_bytes()).is_err() || http::HeaderValue::from_str(v).is_err() {
                    err(format!("{p}.headers.{k}"), "invalid header name or value".into());
                }
            }
            match (&r.pool, r.aggregate.is_empty()) {
                (None, true) => err(format!("{p}.pool"), "a route needs a pool or aggregate parts".into()),
                (Some(_), false) => err(format!("{p}.aggregate"), "give either pool or aggregate, not both".into()),
                (Some(pool), true) if !self.pools.contains_key(pool) => {
                    err(format!("{p}.pool"), format!("unknown pool {pool:?}"))
                }
                _ => {}
            }
            for (j, a) in r.aggregate.iter().enumerate() {
                if !self.pools.contains_key(&a.pool) {
                    err(format!("{p}.aggregate[{j}].pool"), format!("unknown pool {:?}", a.pool));
                }
                if !a.path.starts_with('/') {
                    err(format!("{p}.aggregate[{j}].path"), "must start with '/'".into());
                }
            }
            if let Some(sp) = &r.strip_prefix {
                if !sp.starts_with('/') {
                    err(format!("{p}.strip_prefix"), "must start with '/'".into());
                }
                if r.rewrite.is_some() {
                    err(format!("{p}.rewrite"), "give either strip_prefix or rewrite, not both".into());
                }
            }
            if let Some(rw) = &r.rewrite {
                if !rw.starts_with('/') {
                    err(format!("{p}.rewrite"), "must start with '/'".into());
                }
            }
            let has_jwt = self.auth.jwt.is_some();
            let has_keys = !self.auth.api_keys.is_empty();
            match r.auth {
                AuthMode::Jwt if !has_jwt => err(format!("{p}.auth"), "jwt auth needs an [auth.jwt] section".into()),
                AuthMode::ApiKey if !has_keys => err(format!("{p}.auth"), "api-key auth needs [[auth.api_keys]]".into()),
                AuthMode::Either if !has_jwt && !has_keys => {
                    err(format!("{p}.auth"), "either auth needs [auth.jwt] or [[auth.api_keys]]".into())
                }
                AuthMode::None if !r.roles.is_empty() => err(format!("{p}.roles"), "roles need auth other than none".into()),
                _ => {}
            }
            if let Some(rl) = &r.rate_limit {
                if !self.rate_limits.contains_key(rl) {
                    err(format!("{p}.rate_limit"), format!("unknown rate limit policy {rl:?}"));
                } else if r.auth == AuthMode::None && self.rate_limits[rl].key != RateKey::ClientIp {
                    err(format!("{p}.rate_limit"), "keying by api key or user id needs auth on the route".into());
                }
            }
            if let Some(t) = &r.transform {
                if !self.transforms.contains_key(t) {
                    err(format!("{p}.transform"), format!("unknown transform {t:?}"));
                }
            }
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_invalid_field_with_path() {
        let text = r#"
            [[listeners]]
            name = "a"
            bind = "nope"
            [pools.users]
            algorithm = "round-robin"
            backends = [{ address = "127.0.0.1:1", weight = 0 }]
            [[routes]]
            name = "r"
            path = "users"
            pool = "missing"
            rate_limit = "nope"
        "#;
        let Err(ConfigError::Invalid(errs)) = Config::parse(text) else {
            panic!("expected validation errors");
        };
        let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
        for want in ["listeners[0].bind", "pools.users.backends[0].weight", "routes[0].path", "routes[0].pool", "routes[0].rate_limit"] {
            assert!(paths.contains(&want), "missing {want} in {paths:?}");
        }
    }

    #[test]
    fn unknown_field_is_a_parse_error() {
        let err = Config::parse("[server]\nmax_bdy = 3\n").expect_err("unknown field must fail");
        assert!(err.to_string().contains("max_bdy"), "{err}");
    }
}
