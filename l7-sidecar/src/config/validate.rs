//! `Config::validate`: every invalid field is reported with its path.

use super::*;
use std::net::SocketAddr;

/// Weights weigh hash-ring entries (100 per unit), so they are bounded like the L4 daemon's.
pub const MAX_BACKEND_WEIGHT: u32 = 65_535;

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

impl Config {
    /// All problems at once, so one edit-reload cycle can fix them all.
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
        if s.body_read_timeout_ms == 0 {
            err("server.body_read_timeout_ms".into(), "must be > 0".into());
        }
        if s.max_connections == 0 {
            err("server.max_connections".into(), "must be > 0".into());
        }
        if s.first_byte_timeout_ms == 0 {
            err("server.first_byte_timeout_ms".into(), "must be > 0".into());
        }
        if s.idle_timeout_ms == 0 {
            err("server.idle_timeout_ms".into(), "must be > 0".into());
        }
        match s.max_connections_per_ip {
            Some(0) => err("server.max_connections_per_ip".into(), "must be > 0".into()),
            Some(n) if n > s.max_connections => err(
                "server.max_connections_per_ip".into(),
                "must be <= server.max_connections".into(),
            ),
            _ => {}
        }
        let fl = &self.auth.failure_limit;
        if fl.max_failures > 0 && fl.window_ms == 0 {
            err("auth.failure_limit.window_ms".into(), "must be > 0".into());
        }
        if fl.max_addresses == 0 {
            err(
                "auth.failure_limit.max_addresses".into(),
                "must be > 0".into(),
            );
        }
        if !self.observability.metrics_path.starts_with('/') {
            err(
                "observability.metrics_path".into(),
                "must start with '/'".into(),
            );
        }

        let mut names = std::collections::HashSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let p = format!("listeners[{i}]");
            if !names.insert(l.name.clone()) {
                err(
                    format!("{p}.name"),
                    format!("duplicate listener name {:?}", l.name),
                );
            }
            if l.bind.parse::<SocketAddr>().is_err() {
                err(
                    format!("{p}.bind"),
                    format!("not an IP:port address: {:?}", l.bind),
                );
            }
            if let Some(tls) = &l.tls {
                if tls.certificates.is_empty() {
                    err(
                        format!("{p}.tls.certificates"),
                        "needs at least one certificate".into(),
                    );
                }
                for (j, c) in tls.certificates.iter().enumerate() {
                    for (field, f) in [("cert_file", &c.cert_file), ("key_file", &c.key_file)] {
                        if !Path::new(f).is_file() {
                            err(
                                format!("{p}.tls.certificates[{j}].{field}"),
                                format!("file not found: {f:?}"),
                            );
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
            let mut seen = std::collections::HashSet::new();
            for (j, b) in pool.backends.iter().enumerate() {
                if !seen.insert(b.address.as_str()) {
                    // Backend state is keyed by address, so a duplicate would share it.
                    err(
                        format!("{p}.backends[{j}].address"),
                        format!("duplicate backend {:?}", b.address),
                    );
                }
                if b.address.parse::<SocketAddr>().is_err() {
                    err(
                        format!("{p}.backends[{j}].address"),
                        format!("not an IP:port address: {:?}", b.address),
                    );
                }
                if b.weight == 0 || b.weight > MAX_BACKEND_WEIGHT {
                    err(
                        format!("{p}.backends[{j}].weight"),
                        format!("must be 1..={MAX_BACKEND_WEIGHT}"),
                    );
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
                        || h.strip_prefix("header:")
                            .is_some_and(|n| http::HeaderName::from_bytes(n.as_bytes()).is_ok())
                        || h.strip_prefix("cookie:").is_some_and(|n| !n.is_empty());
                    if !ok {
                        err(
                            format!("{p}.hash_on"),
                            format!("expected client-ip, header:NAME or cookie:NAME, got {h:?}"),
                        );
                    }
                }
                (Algorithm::ConsistentHash, None) => {}
                (_, Some(_)) => err(
                    format!("{p}.hash_on"),
                    "only valid with algorithm = \"consistent-hash\"".into(),
                ),
                _ => {}
            }
            if let Some(hc) = &pool.health_check {
                if !hc.path.starts_with('/') {
                    err(
                        format!("{p}.health_check.path"),
                        "must start with '/'".into(),
                    );
                }
                if hc.interval_ms == 0 {
                    err(
                        format!("{p}.health_check.interval_ms"),
                        "must be > 0".into(),
                    );
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
                err(
                    format!("{p}.passive.max_ejected_percent"),
                    "must be <= 100".into(),
                );
            }
            if pool.passive.max_ejection_ms < pool.passive.base_ejection_ms {
                err(
                    format!("{p}.passive.max_ejection_ms"),
                    "must be >= base_ejection_ms".into(),
                );
            }
        }

        if let Some(jwt) = &self.auth.jwt {
            if jwt.keys.is_empty() && jwt.jwks_url.is_none() {
                err("auth.jwt".into(), "needs keys or jwks_url".into());
            }
            if let Some(u) = &jwt.jwks_url {
                let scheme_ok = u.starts_with("http://") || u.starts_with("https://");
                if !scheme_ok || u.parse::<http::Uri>().is_err() {
                    err(
                        "auth.jwt.jwks_url".into(),
                        format!("must be an http:// or https:// URL, got {u:?}"),
                    );
                }
            }
            if let Some(f) = &jwt.jwks_ca_file {
                if !Path::new(f).is_file() {
                    err(
                        "auth.jwt.jwks_ca_file".into(),
                        format!("file not found: {f:?}"),
                    );
                }
                if jwt.jwks_url.is_none() {
                    err(
                        "auth.jwt.jwks_ca_file".into(),
                        "only used with jwks_url".into(),
                    );
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
                            err(
                                format!("{p}.secret"),
                                "HS256 needs a non-empty secret".into(),
                            );
                        }
                        if k.public_key_pem.is_some() || k.public_key_file.is_some() {
                            err(
                                format!("{p}.public_key_pem"),
                                "HS256 takes a secret, not a public key".into(),
                            );
                        }
                    }
                    "RS256" | "ES256" => {
                        if k.secret.is_some() {
                            err(
                                format!("{p}.secret"),
                                format!("{} takes a public key, not a secret", k.algorithm),
                            );
                        }
                        match (&k.public_key_pem, &k.public_key_file) {
                            (None, None) => err(
                                format!("{p}.public_key_pem"),
                                "public_key_pem or public_key_file required".into(),
                            ),
                            (Some(_), Some(_)) => err(
                                format!("{p}.public_key_file"),
                                "give only one of public_key_pem / public_key_file".into(),
                            ),
                            (None, Some(f)) if !Path::new(f).is_file() => err(
                                format!("{p}.public_key_file"),
                                format!("file not found: {f:?}"),
                            ),
                            _ => {}
                        }
                    }
                    other => err(
                        format!("{p}.algorithm"),
                        format!("unsupported algorithm {other:?} (HS256, RS256, ES256)"),
                    ),
                }
            }
        }
        for (i, k) in self.auth.api_keys.iter().enumerate() {
            if k.sha256.len() != 64 || hex::decode(&k.sha256).is_err() {
                err(
                    format!("auth.api_keys[{i}].sha256"),
                    "must be 64 hex characters (SHA-256 of the key)".into(),
                );
            }
            if k.user_id.is_empty() {
                err(
                    format!("auth.api_keys[{i}].user_id"),
                    "must not be empty".into(),
                );
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
            for (field, map) in [
                ("request_headers_add", &t.request_headers_add),
                ("response_headers_add", &t.response_headers_add),
            ] {
                for (k, v) in map {
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                        err(format!("{p}.{field}.{k}"), "invalid header name".into());
                    }
                    if http::HeaderValue::from_str(v).is_err() {
                        err(format!("{p}.{field}.{k}"), "invalid header value".into());
                    }
                }
            }
            for (field, list) in [
                ("request_headers_remove", &t.request_headers_remove),
                ("response_headers_remove", &t.response_headers_remove),
            ] {
                for (j, k) in list.iter().enumerate() {
                    if http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                        err(
                            format!("{p}.{field}[{j}]"),
                            format!("invalid header name {k:?}"),
                        );
                    }
                }
            }
        }

        let mut route_names = std::collections::HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let p = format!("routes[{i}]");
            if !route_names.insert(r.name.clone()) {
                err(
                    format!("{p}.name"),
                    format!("duplicate route name {:?}", r.name),
                );
            }
            if !r.path.starts_with('/') {
                err(format!("{p}.path"), "must start with '/'".into());
            }
            // Requests are matched on their host without the port, so a route host with a port (or
            // a trailing ':') could never match.
            if let Some(host) = &r.host {
                if host.is_empty()
                    || host.contains(':')
                    || host.contains('/')
                    || host.chars().any(char::is_whitespace)
                {
                    err(format!("{p}.host"), format!("{host:?} is not a host name (no port, scheme or path; ports never take part in matching)"));
                }
            }
            let has_braces = r.path.contains('{');
            if has_braces && r.path_match != PathMatch::Template {
                err(
                    format!("{p}.path_match"),
                    "a path with {params} needs path_match = \"template\"".into(),
                );
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
                if http::HeaderName::from_bytes(k.as_bytes()).is_err()
                    || http::HeaderValue::from_str(v).is_err()
                {
                    err(
                        format!("{p}.headers.{k}"),
                        "invalid header name or value".into(),
                    );
                }
            }
            match (&r.pool, r.aggregate.is_empty()) {
                (None, true) => err(
                    format!("{p}.pool"),
                    "a route needs a pool or aggregate parts".into(),
                ),
                (Some(_), false) => err(
                    format!("{p}.aggregate"),
                    "give either pool or aggregate, not both".into(),
                ),
                (None, false) if r.websocket => err(
                    format!("{p}.websocket"),
                    "websocket needs a pool, not aggregate parts".into(),
                ),
                (Some(pool), true) if !self.pools.contains_key(pool) => {
                    err(format!("{p}.pool"), format!("unknown pool {pool:?}"))
                }
                _ => {}
            }
            for (j, a) in r.aggregate.iter().enumerate() {
                if !self.pools.contains_key(&a.pool) {
                    err(
                        format!("{p}.aggregate[{j}].pool"),
                        format!("unknown pool {:?}", a.pool),
                    );
                }
                if !a.path.starts_with('/') {
                    err(
                        format!("{p}.aggregate[{j}].path"),
                        "must start with '/'".into(),
                    );
                }
            }
            if let Some(sp) = &r.strip_prefix {
                if !sp.starts_with('/') {
                    err(format!("{p}.strip_prefix"), "must start with '/'".into());
                }
                if r.rewrite.is_some() {
                    err(
                        format!("{p}.rewrite"),
                        "give either strip_prefix or rewrite, not both".into(),
                    );
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
                AuthMode::Jwt if !has_jwt => err(
                    format!("{p}.auth"),
                    "jwt auth needs an [auth.jwt] section".into(),
                ),
                AuthMode::ApiKey if !has_keys => err(
                    format!("{p}.auth"),
                    "api-key auth needs [[auth.api_keys]]".into(),
                ),
                AuthMode::Either if !has_jwt && !has_keys => err(
                    format!("{p}.auth"),
                    "either auth needs [auth.jwt] or [[auth.api_keys]]".into(),
                ),
                AuthMode::None if !r.roles.is_empty() => err(
                    format!("{p}.roles"),
                    "roles need auth other than none".into(),
                ),
                _ => {}
            }
            if let Some(rl) = &r.rate_limit {
                if !self.rate_limits.contains_key(rl) {
                    err(
                        format!("{p}.rate_limit"),
                        format!("unknown rate limit policy {rl:?}"),
                    );
                } else if r.auth == AuthMode::None && self.rate_limits[rl].key != RateKey::ClientIp
                {
                    err(
                        format!("{p}.rate_limit"),
                        "keying by api key or user id needs auth on the route".into(),
                    );
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
