//! Whole-file parsing: defaults, durations, errors as `main` prints them, the example.

use super::*;

#[test]
fn route_hosts_with_ports_and_huge_weights_are_refused() {
    // Found by the gateway_config fuzz target: a host with a port validated but never matched,
    // and an unbounded weight would size the hash ring in terabytes.
    let text = r#"
        [pools.users]
        backends = [{ address = "127.0.0.1:1", weight = 4000000000 }]
        [[routes]]
        name = "r"
        host = "api.example.com:8080"
        path = "/users"
        pool = "users"
    "#;
    let Err(ConfigError::Invalid(errs)) = Config::parse(text) else {
        panic!("expected validation errors");
    };
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"routes[0].host"), "{paths:?}");
    assert!(
        paths.contains(&"pools.users.backends[0].weight"),
        "{paths:?}"
    );
}

/// A route host with an empty label could never match (`guard` refuses such a Host);
/// one trailing dot is a fully qualified name and routes like the name without it.
#[test]
fn route_hosts_with_empty_labels_are_refused() {
    let route = |host: &str| {
        format!(
            "[pools.p]\nbackends = [{{ address = \"127.0.0.1:1\" }}]\n[[routes]]\nname = \"r\"\nhost = \"{host}\"\npath = \"/\"\npool = \"p\"\n"
        )
    };
    for bad in [".", "..", "a..b", ".a", "a..", "*.", "*..a", "*.a..b"] {
        let Err(ConfigError::Invalid(errs)) = Config::parse(&route(bad)) else {
            panic!("{bad:?} accepted as a route host");
        };
        assert!(
            errs.iter().any(|e| e.path == "routes[0].host"
                && e.message.contains(&format!("{bad:?}"))
                && e.message.contains("empty label")),
            "{bad:?}: {errs:?}"
        );
    }
    for bad in ["a;b.example", "a~b", "a,b", "a%41", "*.a!b", "a*.b"] {
        let Err(ConfigError::Invalid(errs)) = Config::parse(&route(bad)) else {
            panic!("{bad:?} accepted as a route host");
        };
        assert!(
            errs.iter().any(|e| e.path == "routes[0].host" && e.message.contains("may only hold")),
            "{bad:?}: {errs:?}"
        );
    }
    for ok in ["a.example", "a.example.", "*.example.com", "*.example.com.", "a_b-1.example"] {
        assert!(Config::parse(&route(ok)).is_ok(), "{ok:?} refused");
    }
}

/// Hostile test r3b, 6: a bracketed IPv6 literal is a route host (requests may name
/// one); a route host no request could carry (too long, a number that is no
/// dotted-decimal IPv4 address, a malformed literal) is refused, saying why.
#[test]
fn route_hosts_follow_the_request_host_grammar() {
    let route = |host: &str| {
        format!(
            "[pools.p]\nbackends = [{{ address = \"127.0.0.1:1\" }}]\n[[routes]]\nname = \"r\"\nhost = \"{host}\"\npath = \"/\"\npool = \"p\"\n"
        )
    };
    for ok in ["[::1]", "[0::1]", "[2001:db8::1]", "[::ffff:127.0.0.1]", "127.0.0.1", "127.0.0.1."] {
        if let Err(e) = Config::parse(&route(ok)) {
            panic!("{ok:?} refused: {e}");
        }
    }
    let label64 = "a".repeat(64);
    let name254 = format!("{0}.{0}.{0}.{0}.ab", "a".repeat(62));
    for (bad, why) in [
        ("[::1", "IPv6"),
        ("[zz::1]", "IPv6"),
        ("[::1%eth0]", "IPv6"),
        ("[::1]:80", "IPv6"),
        ("::1", "brackets"),
        ("*.[::1]", "IPv6"),
        (label64.as_str(), "63"),
        (name254.as_str(), "253"),
        ("999.1.1.1", "IPv4"),
        ("127.1", "IPv4"),
        ("0x7f.0.0.1", "IPv4"),
        ("*.0.0.1", "IPv4"),
    ] {
        let Err(ConfigError::Invalid(errs)) = Config::parse(&route(bad)) else {
            panic!("{bad:?} accepted as a route host");
        };
        assert!(
            errs.iter().any(|e| e.path == "routes[0].host" && e.message.contains(why)),
            "{bad:?}: {errs:?}"
        );
        assert!(
            !errs.iter().any(|e| e.message.contains("no port, scheme or path") && bad.starts_with(['[', '*'])),
            "{bad:?}: the IPv6 message, not the generic one: {errs:?}"
        );
    }
}

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
    for want in [
        "listeners[0].bind",
        "pools.users.backends[0].weight",
        "routes[0].path",
        "routes[0].pool",
        "routes[0].rate_limit",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
}

#[test]
fn connection_and_auth_failure_limits_default_on_and_validate() {
    let cfg = Config::parse("").expect("empty config is valid");
    assert_eq!(cfg.server.first_byte_timeout_ms, 10_000);
    assert_eq!(cfg.server.idle_timeout_ms, 10_000);
    assert_eq!(cfg.server.per_ip_cap(), 1_000, "well below max_connections");
    assert_eq!(cfg.auth.failure_limit.max_failures, 30);
    assert_eq!(cfg.auth.failure_limit.window_ms, 60_000);
    let text = "[server]\nmax_connections = 10\nmax_connections_per_ip = 11\nidle_timeout_ms = 0\nfirst_byte_timeout_ms = 0\n[auth.failure_limit]\nwindow_ms = 0\n";
    let Err(ConfigError::Invalid(errs)) = Config::parse(text) else {
        panic!("expected validation errors");
    };
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "server.max_connections_per_ip",
        "server.idle_timeout_ms",
        "server.first_byte_timeout_ms",
        "auth.failure_limit.window_ms",
    ] {
        assert!(paths.contains(&want), "missing {want} in {paths:?}");
    }
    // Hostile test s16-F8: `first_byte_timeout = "0s"` was reported as
    // `server.first_byte_timeout_ms`, a key the file did not contain.
    let text = "[server]\nfirst_byte_timeout = \"0s\"\ntunnel_idle_timeout = \"0ms\"\n[auth.failure_limit]\nwindow = \"0s\"\n[pools.p]\nbackends = [{ address = \"127.0.0.1:1\" }]\nconnect_timeout = \"0s\"\n";
    let Err(ConfigError::Invalid(errs)) = Config::parse(text) else {
        panic!("expected validation errors");
    };
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "server.first_byte_timeout",
            "server.tunnel_idle_timeout",
            "pools.p.connect_timeout",
            "auth.failure_limit.window"
        ]
    );
}

/// What `main` prints for an error: anyhow's `Debug`, the message then every cause.
fn as_main_prints(err: ConfigError) -> String {
    format!("{:?}", anyhow::Error::from(err).context("loading gw.toml"))
}

#[test]
fn toml_and_io_errors_are_printed_once() {
    let err = Config::parse("[server\nmax_body_bytes = 1\n").expect_err("syntax error");
    let shown = as_main_prints(err);
    assert_eq!(shown.matches("[server").count(), 1, "{shown}");

    let err = Config::load(Path::new("/nonexistent/gw.toml")).expect_err("missing file");
    let shown = as_main_prints(err);
    assert_eq!(shown.matches("No such file").count(), 1, "{shown}");
}

#[test]
fn durations_as_strings_fill_the_integer_fields() {
    let cfg = Config::parse(
        r#"
        [server]
        idle_timeout = "1m"
        header_read_timeout = "1.5s"
        dns_refresh = "10s"
        body_read_timeout = "3s"
        [pools.p]
        backends = [{ address = "127.0.0.1:1" }]
        connect_timeout = "250ms"
        request_timeout_ms = 7000
        health_check = { interval = "2s", timeout = "500ms" }
        passive = { base_ejection = "10s", max_ejection = "5m" }
        [auth.failure_limit]
        window = "2m"
        [auth.jwt]
        jwks_url = "http://127.0.0.1:1/jwks"
        jwks_refresh = "5m"
        jwks_min_refetch = "15s"
        leeway = "1m"
        [rate_limits.r]
        algorithm = "fixed-window"
        limit = 5
        window = "1h"
    "#,
    )
    .expect("valid");
    assert_eq!(cfg.server.idle_timeout_ms, 60_000);
    assert_eq!(cfg.server.header_read_timeout_ms, 1_500);
    assert_eq!(cfg.server.dns_refresh_ms, 10_000);
    assert_eq!(cfg.server.body_read_timeout_ms, 3_000);
    assert_eq!(cfg.server.first_byte_timeout_ms, 10_000, "default kept");
    let p = &cfg.pools["p"];
    assert_eq!((p.connect_timeout_ms, p.request_timeout_ms), (250, 7_000));
    let hc = p.health_check.as_ref().expect("health check");
    assert_eq!((hc.interval_ms, hc.timeout_ms), (2_000, 500));
    assert_eq!(
        (p.passive.base_ejection_ms, p.passive.max_ejection_ms),
        (10_000, 300_000)
    );
    assert_eq!(cfg.auth.failure_limit.window_ms, 120_000);
    let j = cfg.auth.jwt.as_ref().expect("jwt");
    assert_eq!(
        (j.jwks_refresh_secs, j.jwks_min_refetch_secs, j.leeway_secs),
        (300, 15, 60)
    );
    assert_eq!(cfg.rate_limits["r"].window_ms, 3_600_000);
}

#[test]
fn duration_errors_name_the_field_and_both_keys() {
    let text = r#"
        [server]
        idle_timeout = "15 parsecs"
        reload_poll = "1s"
        reload_poll_ms = 1000
        body_read_timeout = "soon"
        [pools.p]
        backends = [{ address = "127.0.0.1:1" }]
        health_check = { timeout = "soon" }
        [auth.jwt]
        jwks_url = "http://127.0.0.1:1/jwks"
        leeway = "1.5s"
    "#;
    let Err(ConfigError::Invalid(errs)) = Config::parse(text) else {
        panic!("expected validation errors");
    };
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(
        shown.iter().any(|e| e
            .starts_with("server.idle_timeout: \"15 parsecs\" is not a duration (")
            && e.ends_with("examples: 500ms, 15s, 2m)")),
        "{shown:?}"
    );
    assert!(
        shown.contains(
            &"server.reload_poll: give either reload_poll or reload_poll_ms, not both".to_string()
        ),
        "{shown:?}"
    );
    assert!(
        shown
            .iter()
            .any(|e| e.starts_with("pools.p.health_check.timeout: \"soon\"")),
        "{shown:?}"
    );
    assert!(
        shown
            .iter()
            .any(|e| e.starts_with("auth.jwt.leeway: \"1.5s\"") && e.contains("whole seconds")),
        "{shown:?}"
    );
    assert!(
        shown
            .iter()
            .any(|e| e.starts_with("server.body_read_timeout: \"soon\" is not a duration")),
        "{shown:?}"
    );
    assert_eq!(errs.len(), 5, "{shown:?}");

    // A number where a duration string goes is a type error that says what to write.
    let err = Config::parse("[server]\nidle_timeout = 15\n").expect_err("integer");
    assert!(
        err.to_string().contains("a duration string such as"),
        "{err}"
    );
}

#[test]
fn the_example_config_parses_with_string_durations_and_an_env_secret() {
    std::env::set_var("GATEWAY_JWT_SECRET", "example-secret-for-tests");
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/gateway.toml"
    ));
    let cfg = Config::load(path).expect("example is valid");
    assert_eq!(cfg.pools["users"].request_timeout_ms, 5_000);
    assert!(cfg.warnings().is_empty(), "{:?}", cfg.warnings());
}

#[test]
fn unknown_field_is_a_parse_error() {
    let err = Config::parse("[server]\nmax_bdy = 3\n").expect_err("unknown field must fail");
    assert!(err.to_string().contains("max_bdy"), "{err}");
}

#[test]
fn admin_section_defaults_and_every_bad_field() {
    let cfg = Config::parse("[admin]\nlisten = \"127.0.0.1:9901\"\n").expect("valid");
    let a = cfg.admin.expect("admin");
    assert_eq!((a.trace_sample_rate, a.trace_buffer), (0.01, 256));
    assert!(Config::parse("").expect("valid").admin.is_none(), "off when absent");
    let text = r#"
        [[listeners]]
        name = "admin"
        bind = "127.0.0.1:8080"
        [admin]
        listen = "localhost"
        trace_sample_rate = 1.5
        trace_buffer = 0
    "#;
    let Err(ConfigError::Invalid(errs)) = Config::parse(text) else {
        panic!("expected validation errors");
    };
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    for p in [
        "admin.listen",
        "admin.trace_sample_rate",
        "admin.trace_buffer",
        "listeners[0].name",
    ] {
        assert!(paths.contains(&p), "{p} not reported: {errs:?}");
    }
    let nan = Config::parse("[admin]\nlisten = \"127.0.0.1:1\"\ntrace_sample_rate = nan\n");
    assert!(matches!(nan, Err(ConfigError::Invalid(_))), "NaN is not a rate");
}
