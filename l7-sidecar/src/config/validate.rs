//! `Config::validate`: every invalid field is reported with its path. One function per
//! section, each pure over its slice of the config (plus the names it refers to), so each
//! is tested alone in `validate/tests.rs`.

use super::*;
use std::collections::HashSet;
use std::net::SocketAddr;

#[cfg(test)]
mod tests;

/// Weights weigh hash-ring entries (100 per unit), so they are bounded like the L4 daemon's.
pub const MAX_BACKEND_WEIGHT: u32 = 65_535;

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

/// Collects problems; every section function appends to one of these.
#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            path: path.into(),
            message: message.into(),
        });
    }

    /// The common "must be > 0" check.
    fn positive(&mut self, path: impl Into<String>, value: u64) {
        if value == 0 {
            self.add(path, "must be > 0");
        }
    }

    /// `positive` for a duration that can be written `key = "10s"` or `key_ms = 10000`:
    /// the error names the spelling the file used (`path_ms` ends in `_ms`).
    fn positive_duration(&mut self, path_ms: impl Into<String>, text: &Option<DurationText>, value: u64) {
        if value == 0 {
            self.add(written(path_ms.into(), text), "must be > 0");
        }
    }
}

/// `path_ms` (`...timeout_ms`), or without its `_ms` when the file wrote the duration
/// as text: an error names the key the operator wrote (hostile s16-F8).
fn written(path_ms: String, text: &Option<DurationText>) -> String {
    match path_ms.strip_suffix("_ms") {
        Some(base) if text.is_some() => base.to_string(),
        _ => path_ms,
    }
}

impl Config {
    /// All problems at once, so one edit-reload cycle can fix them all.
    pub fn validate(&self) -> Vec<FieldError> {
        let mut e = Errors::default();
        server(&self.server, &mut e);
        observability(&self.observability, &mut e);
        listeners(&self.listeners, &mut e);
        for (name, pool) in &self.pools {
            self::pool(&format!("pools.{name}"), pool, &mut e);
        }
        auth(&self.auth, &mut e);
        for (name, rl) in &self.rate_limits {
            rate_limit(&format!("rate_limits.{name}"), rl, &mut e);
        }
        for (name, t) in &self.transforms {
            transform(&format!("transforms.{name}"), t, &mut e);
        }
        routes(self, &mut e);
        if let Some(a) = &self.admin {
            admin(a, &self.listeners, &mut e);
        }
        e.0
    }
}

fn server(s: &ServerConfig, e: &mut Errors) {
    if s.max_body_bytes == 0 {
        e.add("server.max_body_bytes", "must be > 0");
    }
    if s.max_header_bytes < 8192 {
        e.add("server.max_header_bytes", "must be >= 8192");
    }
    if s.max_headers == 0 {
        e.add("server.max_headers", "must be > 0");
    }
    e.positive_duration("server.header_read_timeout_ms", &s.header_read_timeout, s.header_read_timeout_ms);
    e.positive_duration("server.body_read_timeout_ms", &s.body_read_timeout, s.body_read_timeout_ms);
    if s.max_connections == 0 {
        e.add("server.max_connections", "must be > 0");
    }
    e.positive_duration("server.first_byte_timeout_ms", &s.first_byte_timeout, s.first_byte_timeout_ms);
    e.positive_duration("server.idle_timeout_ms", &s.idle_timeout, s.idle_timeout_ms);
    e.positive_duration("server.tunnel_idle_timeout_ms", &s.tunnel_idle_timeout, s.tunnel_idle_timeout_ms);
    e.positive_duration("server.dns_refresh_ms", &s.dns_refresh, s.dns_refresh_ms);
    match s.max_connections_per_ip {
        Some(0) => e.add("server.max_connections_per_ip", "must be > 0"),
        Some(n) if n > s.max_connections => e.add(
            "server.max_connections_per_ip",
            "must be <= server.max_connections",
        ),
        _ => {}
    }
}

fn observability(o: &ObservabilityConfig, e: &mut Errors) {
    if !o.metrics_path.starts_with('/') {
        e.add("observability.metrics_path", "must start with '/'");
    }
}

/// Two listening addresses the kernel would let one socket group share or refuse: the same
/// port on the same address, or on a wildcard address and any other it covers (`[::]` is
/// dual-stack by default, so it covers IPv4 too).
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |w: SocketAddr, o: SocketAddr| {
        w.ip().is_unspecified() && (w.is_ipv4() == o.is_ipv4() || w.is_ipv6())
    };
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || covers(a, b) || covers(b, a))
}

fn listeners(ls: &[ListenerConfig], e: &mut Errors) {
    let mut names = HashSet::new();
    let mut bound: Vec<(usize, SocketAddr)> = Vec::new();
    for (i, l) in ls.iter().enumerate() {
        let p = format!("listeners[{i}]");
        if !names.insert(l.name.as_str()) {
            e.add(
                format!("{p}.name"),
                format!("duplicate listener name {:?}", l.name),
            );
        }
        match l.bind.parse::<SocketAddr>() {
            Err(_) => e.add(
                format!("{p}.bind"),
                format!("not an IP:port address: {:?}", l.bind),
            ),
            // Listeners share their sockets' port group (SO_REUSEPORT): two on one address
            // would split each other's connections instead of failing.
            Ok(addr) => {
                if let Some((j, _)) = bound.iter().find(|(_, b)| overlap(*b, addr)) {
                    e.add(
                        format!("{p}.bind"),
                        format!("{:?} overlaps listeners[{j}].bind {:?}", l.bind, ls[*j].bind),
                    );
                }
                bound.push((i, addr));
            }
        }
        if let Some(tls) = &l.tls {
            if tls.certificates.is_empty() {
                e.add(
                    format!("{p}.tls.certificates"),
                    "needs at least one certificate",
                );
            }
            for (j, c) in tls.certificates.iter().enumerate() {
                for (field, f) in [("cert_file", &c.cert_file), ("key_file", &c.key_file)] {
                    file_exists(&format!("{p}.tls.certificates[{j}].{field}"), f, e);
                }
            }
        }
    }
}

fn admin(a: &AdminConfig, ls: &[ListenerConfig], e: &mut Errors) {
    match a.listen.parse::<SocketAddr>() {
        Err(_) => e.add("admin.listen", format!("not an IP:port address: {:?}", a.listen)),
        // On a public listener's address the kernel would hand half the public connections
        // to the admin listener and serve the admin endpoints on the public port.
        Ok(admin) => {
            let public = ls
                .iter()
                .enumerate()
                .find(|(_, l)| l.bind.parse().is_ok_and(|b| overlap(b, admin)));
            if let Some((i, l)) = public {
                e.add(
                    "admin.listen",
                    format!(
                        "{:?} overlaps listeners[{i}].bind {:?}: the admin listener needs an address of its own",
                        a.listen, l.bind
                    ),
                );
            }
        }
    }
    if !(0.0..=1.0).contains(&a.trace_sample_rate) {
        e.add(
            "admin.trace_sample_rate",
            format!("must be between 0.0 and 1.0, got {}", a.trace_sample_rate),
        );
    }
    if a.trace_buffer == 0 || a.trace_buffer > MAX_TRACE_BUFFER {
        e.add(
            "admin.trace_buffer",
            format!("must be 1..={MAX_TRACE_BUFFER}, got {}", a.trace_buffer),
        );
    }
    // The admin listener is reported (and looked up) under this name.
    if let Some(i) = ls.iter().position(|l| l.name == "admin") {
        e.add(
            format!("listeners[{i}].name"),
            "\"admin\" is the [admin] listener's name; choose another",
        );
    }
}

fn file_exists(path: &str, file: &str, e: &mut Errors) {
    if !Path::new(file).is_file() {
        e.add(path, format!("file not found: {file:?}"));
    }
}

fn pool(p: &str, pool: &PoolConfig, e: &mut Errors) {
    if pool.backends.is_empty() {
        e.add(format!("{p}.backends"), "needs at least one backend");
    }
    let mut seen = HashSet::new();
    for (j, b) in pool.backends.iter().enumerate() {
        if !seen.insert(b.address.as_str()) {
            // Backend state is keyed by address, so a duplicate would share it.
            e.add(
                format!("{p}.backends[{j}].address"),
                format!("duplicate backend {:?}", b.address),
            );
        }
        if let Err(why) = super::addr::BackendAddr::parse(&b.address) {
            e.add(format!("{p}.backends[{j}].address"), why.to_string());
        }
        if b.weight == 0 || b.weight > MAX_BACKEND_WEIGHT {
            e.add(
                format!("{p}.backends[{j}].weight"),
                format!("must be 1..={MAX_BACKEND_WEIGHT}"),
            );
        }
    }
    e.positive_duration(format!("{p}.connect_timeout_ms"), &pool.connect_timeout, pool.connect_timeout_ms);
    e.positive_duration(format!("{p}.request_timeout_ms"), &pool.request_timeout, pool.request_timeout_ms);
    hash_on(p, pool, e);
    if let Some(hc) = &pool.health_check {
        health_check(&format!("{p}.health_check"), hc, e);
    }
    passive(&format!("{p}.passive"), &pool.passive, e);
}

fn hash_on(p: &str, pool: &PoolConfig, e: &mut Errors) {
    match (&pool.algorithm, &pool.hash_on) {
        // One parser for validation and for the pool (`HashOn::parse`), so they cannot disagree.
        (Algorithm::ConsistentHash, Some(h)) => {
            if let Err(message) = super::HashOn::parse(Some(h)) {
                e.add(format!("{p}.hash_on"), message);
            }
        }
        (Algorithm::ConsistentHash, None) => {}
        (_, Some(_)) => e.add(
            format!("{p}.hash_on"),
            "only valid with algorithm = \"consistent-hash\"",
        ),
        _ => {}
    }
}

fn health_check(p: &str, hc: &HealthCheckConfig, e: &mut Errors) {
    if !hc.path.starts_with('/') {
        e.add(format!("{p}.path"), "must start with '/'");
    }
    e.positive_duration(format!("{p}.interval_ms"), &hc.interval, hc.interval_ms);
    e.positive_duration(format!("{p}.timeout_ms"), &hc.timeout, hc.timeout_ms);
    e.positive(format!("{p}.rise"), hc.rise.into());
    e.positive(format!("{p}.fall"), hc.fall.into());
}

fn passive(p: &str, pc: &PassiveConfig, e: &mut Errors) {
    if pc.max_ejected_percent > 100 {
        e.add(format!("{p}.max_ejected_percent"), "must be <= 100");
    }
    if pc.max_ejection_ms < pc.base_ejection_ms {
        e.add(
            written(format!("{p}.max_ejection_ms"), &pc.max_ejection),
            format!("must be >= {}", written("base_ejection_ms".into(), &pc.base_ejection)),
        );
    }
}

fn auth(a: &AuthConfig, e: &mut Errors) {
    let fl = &a.failure_limit;
    if fl.max_failures > 0 && fl.window_ms == 0 {
        e.add(written("auth.failure_limit.window_ms".into(), &fl.window), "must be > 0");
    }
    if fl.max_addresses == 0 {
        e.add("auth.failure_limit.max_addresses", "must be > 0");
    }
    if let Some(jwt) = &a.jwt {
        self::jwt(jwt, e);
    }
    for (i, k) in a.api_keys.iter().enumerate() {
        api_key(&format!("auth.api_keys[{i}]"), k, e);
    }
}

const MAX_JWT_LEEWAY_SECS: u64 = 86_400;

fn jwt(jwt: &JwtConfig, e: &mut Errors) {
    if jwt.keys.is_empty() && jwt.jwks_url.is_none() {
        e.add("auth.jwt", "needs keys or jwks_url");
    }
    if let Some(u) = &jwt.jwks_url {
        let scheme_ok = u.starts_with("http://") || u.starts_with("https://");
        if !scheme_ok || u.parse::<http::Uri>().is_err() {
            e.add(
                "auth.jwt.jwks_url",
                format!("must be an http:// or https:// URL, got {u:?}"),
            );
        }
    }
    if let Some(f) = &jwt.jwks_ca_file {
        file_exists("auth.jwt.jwks_ca_file", f, e);
        if jwt.jwks_url.is_none() {
            e.add("auth.jwt.jwks_ca_file", "only used with jwks_url");
        }
    }
    e.positive("auth.jwt.jwks_refresh_secs", jwt.jwks_refresh_secs);
    // Clock skew, not a validity extension; and `jsonwebtoken` computes `now -
    // leeway` and `now + leeway` unchecked (a leeway past now overflowed there).
    if jwt.leeway_secs > MAX_JWT_LEEWAY_SECS {
        let field = match jwt.leeway {
            Some(_) => "auth.jwt.leeway",
            None => "auth.jwt.leeway_secs",
        };
        e.add(field, format!("must be at most {MAX_JWT_LEEWAY_SECS} s (1 day)"));
    }
    e.positive(
        "auth.jwt.token_cache_max_entries",
        jwt.token_cache_max_entries as u64,
    );
    e.positive(
        "auth.jwt.token_cache_max_bytes",
        jwt.token_cache_max_bytes as u64,
    );
    for (i, k) in jwt.keys.iter().enumerate() {
        jwt_key(&format!("auth.jwt.keys[{i}]"), k, e);
    }
}

fn jwt_key(p: &str, k: &JwtKeyConfig, e: &mut Errors) {
    match k.algorithm.as_str() {
        "HS256" => {
            // An env/file secret that could not be read was reported when it was loaded.
            if k.secret.as_ref().is_none_or(|s| s.is_known_empty()) {
                e.add(format!("{p}.secret"), "HS256 needs a non-empty secret");
            }
            if k.public_key_pem.is_some() || k.public_key_file.is_some() {
                e.add(
                    format!("{p}.public_key_pem"),
                    "HS256 takes a secret, not a public key",
                );
            }
        }
        "RS256" | "ES256" => {
            if k.secret.is_some() {
                e.add(
                    format!("{p}.secret"),
                    format!("{} takes a public key, not a secret", k.algorithm),
                );
            }
            match (&k.public_key_pem, &k.public_key_file) {
                (None, None) => e.add(
                    format!("{p}.public_key_pem"),
                    "public_key_pem or public_key_file required",
                ),
                (Some(_), Some(_)) => e.add(
                    format!("{p}.public_key_file"),
                    "give only one of public_key_pem / public_key_file",
                ),
                (None, Some(f)) => file_exists(&format!("{p}.public_key_file"), f, e),
                _ => {}
            }
        }
        other => e.add(
            format!("{p}.algorithm"),
            format!("unsupported algorithm {other:?} (HS256, RS256, ES256)"),
        ),
    }
}

fn api_key(p: &str, k: &ApiKeyConfig, e: &mut Errors) {
    if k.sha256.len() != 64 || hex::decode(&k.sha256).is_err() {
        e.add(
            format!("{p}.sha256"),
            "must be 64 hex characters (SHA-256 of the key)",
        );
    }
    if k.user_id.is_empty() {
        e.add(format!("{p}.user_id"), "must not be empty");
    }
}

fn rate_limit(p: &str, rl: &RateLimitConfig, e: &mut Errors) {
    e.positive(format!("{p}.limit"), rl.limit);
    if rl.window_ms == 0 {
        e.add(
            format!("{p}.window_ms"),
            "must be > 0 (write window = \"1m\" or window_ms = 60000)",
        );
    }
    if rl.burst == Some(0) {
        e.add(format!("{p}.burst"), "must be > 0");
    }
    if rl.burst.is_some() && rl.algorithm != RateAlgorithm::TokenBucket {
        e.add(format!("{p}.burst"), "only valid for token-bucket");
    }
    if rl.max_keys == 0 {
        e.add(format!("{p}.max_keys"), "must be > 0");
    }
}

fn transform(p: &str, t: &TransformConfig, e: &mut Errors) {
    for (field, map) in [
        ("request_headers_add", &t.request_headers_add),
        ("response_headers_add", &t.response_headers_add),
    ] {
        for (k, v) in map {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                e.add(format!("{p}.{field}.{k}"), "invalid header name");
            }
            if http::HeaderValue::from_str(v).is_err() {
                e.add(format!("{p}.{field}.{k}"), "invalid header value");
            }
        }
    }
    for (field, list) in [
        ("request_headers_remove", &t.request_headers_remove),
        ("response_headers_remove", &t.response_headers_remove),
    ] {
        for (j, k) in list.iter().enumerate() {
            if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                e.add(
                    format!("{p}.{field}[{j}]"),
                    format!("invalid header name {k:?}"),
                );
            }
        }
    }
}

fn routes(cfg: &Config, e: &mut Errors) {
    let mut names = HashSet::new();
    for (i, r) in cfg.routes.iter().enumerate() {
        let p = format!("routes[{i}]");
        if !names.insert(r.name.as_str()) {
            e.add(
                format!("{p}.name"),
                format!("duplicate route name {:?}", r.name),
            );
        }
        route_match(&p, r, e);
        route_target(&p, r, cfg, e);
        route_rewrite(&p, r, e);
        route_policies(&p, r, cfg, e);
    }
}

/// A route host (after `*.`) holds only what a request's Host may (`host::valid_authority`).
fn host_chars_ok(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    name.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A route host's labels (after `*.` and one trailing dot) are not empty.
fn host_labels_ok(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty() && name.split('.').all(|l| !l.is_empty())
}

/// Why a route host could never match a request's host (`crate::host` is the
/// grammar requests are held to, 400 `bad_host` otherwise), if it could not.
fn route_host_error(host: &str) -> Option<String> {
    let name = host.strip_prefix("*.").unwrap_or(host);
    if host.starts_with('[') || name.starts_with('[') {
        return Some(if name.len() != host.len() {
            "cannot be a wildcard over an IPv6 literal".to_string()
        } else if crate::host::ipv6_literal(host.as_bytes()).is_none() {
            "is not an IPv6 literal: [address] with an address, no zone id and no port".to_string()
        } else {
            return None;
        });
    }
    // Requests are matched on their host without the port, so a route host with a port (or
    // a trailing ':') could never match.
    if host.is_empty() || host.contains(':') || host.contains('/') || host.chars().any(char::is_whitespace) {
        return Some("is not a host name (no port, scheme or path; ports never take part in matching; an IPv6 literal needs brackets: \"[::1]\")".to_string());
    }
    if !host_chars_ok(host) {
        // The gateway refuses a Host with any other character (400 bad_host).
        return Some("may only hold letters, digits, '-', '_' and '.' (after an optional \"*.\"): no request Host could match it".to_string());
    }
    if !host_labels_ok(host) {
        return Some("has an empty label (only one trailing dot is allowed)".to_string());
    }
    crate::host::name_problem(name).map(|why| format!("{why}: no request Host could match it"))
}

/// What a request must look like to take the route: host, path, methods, headers.
fn route_match(p: &str, r: &RouteConfig, e: &mut Errors) {
    if !r.path.starts_with('/') {
        e.add(format!("{p}.path"), "must start with '/'");
    }
    if let Some(host) = &r.host {
        if let Some(why) = route_host_error(host) {
            e.add(format!("{p}.host"), format!("{host:?} {why}"));
        }
    }
    if r.path.contains('{') && r.path_match != PathMatch::Template {
        e.add(
            format!("{p}.path_match"),
            "a path with {params} needs path_match = \"template\"",
        );
    }
    if r.path_match == PathMatch::Template {
        let mut router = matchit::Router::new();
        if let Err(err) = router.insert(r.path.as_str(), ()) {
            e.add(format!("{p}.path"), format!("invalid template: {err}"));
        }
    }
    for (j, m) in r.methods.iter().enumerate() {
        if !METHODS.contains(&m.as_str()) {
            e.add(format!("{p}.methods[{j}]"), format!("unknown method {m:?}"));
        }
    }
    for (k, v) in &r.headers {
        if http::HeaderName::from_bytes(k.as_bytes()).is_err()
            || http::HeaderValue::from_str(v).is_err()
        {
            e.add(format!("{p}.headers.{k}"), "invalid header name or value");
        }
    }
}

/// Where the route sends requests: one pool, or aggregate parts over several.
fn route_target(p: &str, r: &RouteConfig, cfg: &Config, e: &mut Errors) {
    match (&r.pool, r.aggregate.is_empty()) {
        (None, true) => e.add(
            format!("{p}.pool"),
            "a route needs a pool or aggregate parts",
        ),
        (Some(_), false) => e.add(
            format!("{p}.aggregate"),
            "give either pool or aggregate, not both",
        ),
        (None, false) if r.websocket => e.add(
            format!("{p}.websocket"),
            "websocket needs a pool, not aggregate parts",
        ),
        (Some(pool), true) if !cfg.pools.contains_key(pool) => {
            e.add(format!("{p}.pool"), format!("unknown pool {pool:?}"))
        }
        _ => {}
    }
    for (j, a) in r.aggregate.iter().enumerate() {
        if !cfg.pools.contains_key(&a.pool) {
            e.add(
                format!("{p}.aggregate[{j}].pool"),
                format!("unknown pool {:?}", a.pool),
            );
        }
        if !a.path.starts_with('/') {
            e.add(format!("{p}.aggregate[{j}].path"), "must start with '/'");
        }
    }
}

fn route_rewrite(p: &str, r: &RouteConfig, e: &mut Errors) {
    if let Some(sp) = &r.strip_prefix {
        if !sp.starts_with('/') {
            e.add(format!("{p}.strip_prefix"), "must start with '/'");
        }
        if r.rewrite.is_some() {
            e.add(
                format!("{p}.rewrite"),
                "give either strip_prefix or rewrite, not both",
            );
        }
    }
    if let Some(rw) = &r.rewrite {
        if !rw.starts_with('/') {
            e.add(format!("{p}.rewrite"), "must start with '/'");
        }
    }
}

/// Auth, rate limit and transform: each must name something the config defines.
fn route_policies(p: &str, r: &RouteConfig, cfg: &Config, e: &mut Errors) {
    let has_jwt = cfg.auth.jwt.is_some();
    let has_keys = !cfg.auth.api_keys.is_empty();
    match r.auth {
        AuthMode::Jwt if !has_jwt => {
            e.add(format!("{p}.auth"), "jwt auth needs an [auth.jwt] section")
        }
        AuthMode::ApiKey if !has_keys => {
            e.add(format!("{p}.auth"), "api-key auth needs [[auth.api_keys]]")
        }
        AuthMode::Either if !has_jwt && !has_keys => e.add(
            format!("{p}.auth"),
            "either auth needs [auth.jwt] or [[auth.api_keys]]",
        ),
        AuthMode::None if !r.roles.is_empty() => {
            e.add(format!("{p}.roles"), "roles need auth other than none")
        }
        _ => {}
    }
    if let Some(rl) = &r.rate_limit {
        match cfg.rate_limits.get(rl) {
            None => e.add(
                format!("{p}.rate_limit"),
                format!("unknown rate limit policy {rl:?}"),
            ),
            Some(policy) if r.auth == AuthMode::None && policy.key != RateKey::ClientIp => e.add(
                format!("{p}.rate_limit"),
                "keying by api key or user id needs auth on the route",
            ),
            Some(_) => {}
        }
    }
    if let Some(t) = &r.transform {
        if !cfg.transforms.contains_key(t) {
            e.add(format!("{p}.transform"), format!("unknown transform {t:?}"));
        }
    }
}
