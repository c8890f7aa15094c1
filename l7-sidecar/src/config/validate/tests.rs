//! One test per section function, each calling it directly on a hand-built section so a
//! failure points at one function.

use super::*;

fn run(f: impl FnOnce(&mut Errors)) -> Vec<String> {
    let mut e = Errors::default();
    f(&mut e);
    e.0.into_iter().map(|fe| fe.to_string()).collect()
}

fn paths(errs: &[String]) -> Vec<&str> {
    errs.iter()
        .map(|e| e.split(": ").next().unwrap_or(""))
        .collect()
}

fn parsed(text: &str) -> Config {
    toml::from_str(text).expect("parses")
}

#[test]
fn server_section() {
    assert!(run(|e| server(&ServerConfig::default(), e)).is_empty());
    let s = ServerConfig {
        max_body_bytes: 0,
        max_header_bytes: 100,
        header_read_timeout_ms: 0,
        dns_refresh_ms: 0,
        max_connections: 5,
        max_connections_per_ip: Some(6),
        ..ServerConfig::default()
    };
    let errs = run(|e| server(&s, e));
    assert_eq!(
        paths(&errs),
        [
            "server.max_body_bytes",
            "server.max_header_bytes",
            "server.header_read_timeout_ms",
            "server.dns_refresh_ms",
            "server.max_connections_per_ip",
        ],
        "{errs:?}"
    );
}

#[test]
fn observability_section() {
    let o = ObservabilityConfig {
        metrics_path: "metrics".into(),
        ..ObservabilityConfig::default()
    };
    assert_eq!(
        run(|e| observability(&o, e)),
        ["observability.metrics_path: must start with '/'"]
    );
}

#[test]
fn listeners_section() {
    let cfg = parsed(
        r#"
        [[listeners]]
        name = "a"
        bind = "127.0.0.1:80"
        [[listeners]]
        name = "a"
        bind = "localhost:80"
        tls = { certificates = [{ cert_file = "/nonexistent.crt", key_file = "/nonexistent.key" }] }
    "#,
    );
    let errs = run(|e| listeners(&cfg.listeners, e));
    assert_eq!(
        paths(&errs),
        [
            "listeners[1].name",
            "listeners[1].bind",
            "listeners[1].tls.certificates[0].cert_file",
            "listeners[1].tls.certificates[0].key_file",
        ],
        "{errs:?}"
    );
}

#[test]
fn listeners_on_one_address_are_refused_naming_both() {
    let cfg = parsed(
        r#"
        [[listeners]]
        name = "a"
        bind = "127.0.0.1:8080"
        [[listeners]]
        name = "b"
        bind = "0.0.0.0:8080"
        [[listeners]]
        name = "c"
        bind = "127.0.0.1:8081"
        [[listeners]]
        name = "d"
        bind = "[::1]:8080"
    "#,
    );
    let errs = run(|e| listeners(&cfg.listeners, e));
    assert_eq!(
        errs,
        ["listeners[1].bind: \"0.0.0.0:8080\" overlaps listeners[0].bind \"127.0.0.1:8080\""]
    );
}

#[test]
fn an_admin_listener_on_a_public_listeners_address_is_refused() {
    let cfg = parsed(
        r#"
        [[listeners]]
        name = "public"
        bind = "127.0.0.1:18080"
    "#,
    );
    for listen in ["127.0.0.1:18080", "0.0.0.0:18080"] {
        let a = AdminConfig {
            listen: listen.into(),
            trace_sample_rate: 0.1,
            trace_buffer: 10,
            replica: None,
        };
        let errs = run(|e| admin(&a, &cfg.listeners, e));
        assert_eq!(paths(&errs), ["admin.listen"], "{listen}: {errs:?}");
        assert!(errs[0].contains("listeners[0].bind"), "{errs:?}");
    }
    let elsewhere = AdminConfig {
        listen: "127.0.0.1:19901".into(),
        trace_sample_rate: 0.1,
        trace_buffer: 10,
        replica: None,
    };
    assert!(run(|e| admin(&elsewhere, &cfg.listeners, e)).is_empty());
}

#[test]
fn pool_section_with_health_check_and_passive() {
    let cfg = parsed(
        r#"
        [pools.p]
        algorithm = "round-robin"
        hash_on = "client-ip"
        backends = [{ address = "127.0.0.1:1" }, { address = "127.0.0.1:1", weight = 0 }]
        connect_timeout_ms = 0
        health_check = { path = "health", interval_ms = 0, rise = 0 }
        passive = { max_ejected_percent = 101, base_ejection_ms = 10, max_ejection_ms = 5 }
    "#,
    );
    let errs = run(|e| pool("pools.p", &cfg.pools["p"], e));
    assert_eq!(
        paths(&errs),
        [
            "pools.p.backends[1].address",
            "pools.p.backends[1].weight",
            "pools.p.connect_timeout_ms",
            "pools.p.hash_on",
            "pools.p.health_check.path",
            "pools.p.health_check.interval_ms",
            "pools.p.health_check.rise",
            "pools.p.passive.max_ejected_percent",
            "pools.p.passive.max_ejection_ms",
        ],
        "{errs:?}"
    );
    let empty = parsed("[pools.q]\nbackends = []\n");
    assert_eq!(
        run(|e| pool("pools.q", &empty.pools["q"], e)),
        ["pools.q.backends: needs at least one backend"]
    );
}

#[test]
fn auth_section() {
    let cfg = parsed(
        r#"
        [auth.failure_limit]
        window_ms = 0
        max_addresses = 0
        [auth.jwt]
        jwks_url = "ftp://x"
        jwks_refresh_secs = 0
        token_cache_max_bytes = 0
        [[auth.jwt.keys]]
        algorithm = "HS256"
        secret = ""
        [[auth.jwt.keys]]
        algorithm = "RS256"
        secret = "x"
        [[auth.jwt.keys]]
        algorithm = "none"
        [[auth.api_keys]]
        name = "k"
        sha256 = "abc"
        user_id = ""
    "#,
    );
    let errs = run(|e| auth(&cfg.auth, e));
    assert_eq!(
        paths(&errs),
        [
            "auth.failure_limit.window_ms",
            "auth.failure_limit.max_addresses",
            "auth.jwt.jwks_url",
            "auth.jwt.jwks_refresh_secs",
            "auth.jwt.token_cache_max_bytes",
            "auth.jwt.keys[0].secret",
            "auth.jwt.keys[1].secret",
            "auth.jwt.keys[1].public_key_pem",
            "auth.jwt.keys[2].algorithm",
            "auth.api_keys[0].sha256",
            "auth.api_keys[0].user_id",
        ],
        "{errs:?}"
    );
}

/// A leeway past the current Unix time overflowed in `jsonwebtoken`'s `now -
/// leeway` (a panic in debug builds, every token expired in release).
#[test]
fn jwt_leeway_is_at_most_a_day() {
    let parse = |jwt: &str| {
        Config::parse(&format!(
            "[auth.jwt]\n{jwt}\n[[auth.jwt.keys]]\nalgorithm = \"HS256\"\nsecret = \"x\"\n"
        ))
    };
    for ok in ["leeway_secs = 86400", "leeway = \"30s\""] {
        assert!(parse(ok).is_ok(), "{ok}");
    }
    for (jwt, field) in [
        ("leeway_secs = 86401", "auth.jwt.leeway_secs: "),
        ("leeway_secs = 9223372036854775807", "auth.jwt.leeway_secs: "),
        ("leeway = \"86401s\"", "auth.jwt.leeway: "),
    ] {
        let err = parse(jwt).expect_err("refused").to_string();
        assert!(err.contains(field) && err.contains("at most 86400"), "{jwt}: {err}");
    }
}

#[test]
fn rate_limit_section() {
    let cfg = parsed(
        r#"
        [rate_limits.r]
        algorithm = "fixed-window"
        limit = 0
        burst = 0
        max_keys = 0
    "#,
    );
    let errs = run(|e| rate_limit("rate_limits.r", &cfg.rate_limits["r"], e));
    assert_eq!(
        paths(&errs),
        [
            "rate_limits.r.limit",
            "rate_limits.r.window_ms",
            "rate_limits.r.burst",
            "rate_limits.r.burst",
            "rate_limits.r.max_keys",
        ],
        "{errs:?}"
    );
    assert!(errs[1].contains("window = \"1m\""), "{errs:?}");
}

#[test]
fn transform_section() {
    let cfg = parsed(
        r#"
        [transforms.t]
        request_headers_add = { "bad header" = "v" }
        response_headers_remove = ["ok", "bad header"]
    "#,
    );
    let errs = run(|e| transform("transforms.t", &cfg.transforms["t"], e));
    assert_eq!(
        paths(&errs),
        [
            "transforms.t.request_headers_add.bad header",
            "transforms.t.response_headers_remove[1]",
        ],
        "{errs:?}"
    );
}

#[test]
fn routes_section_match_target_rewrite_policies() {
    let cfg = parsed(
        r#"
        [pools.p]
        backends = [{ address = "127.0.0.1:1" }]
        [rate_limits.by-user]
        algorithm = "fixed-window"
        key = "user-id"
        limit = 1
        window_ms = 1000
        [[routes]]
        name = "r"
        host = "a:80"
        path = "/x/{id}"
        methods = ["FETCH"]
        pool = "p"
        strip_prefix = "/x"
        rewrite = "y"
        [[routes]]
        name = "r"
        path = "/"
        aggregate = [{ name = "a", pool = "ghost", path = "nope" }]
        auth = "jwt"
        rate_limit = "by-user"
        transform = "ghost"
        [[routes]]
        name = "s"
        path = "/s"
        roles = ["admin"]
        rate_limit = "by-user"
    "#,
    );
    let errs = run(|e| routes(&cfg, e));
    assert_eq!(
        paths(&errs),
        [
            "routes[0].host",
            "routes[0].path_match",
            "routes[0].methods[0]",
            "routes[0].rewrite",
            "routes[0].rewrite",
            "routes[1].name",
            "routes[1].aggregate[0].pool",
            "routes[1].aggregate[0].path",
            "routes[1].auth",
            "routes[1].transform",
            "routes[2].pool",
            "routes[2].roles",
            "routes[2].rate_limit",
        ],
        "{errs:?}"
    );
}
