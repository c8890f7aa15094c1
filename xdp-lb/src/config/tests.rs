use super::*;

const EXAMPLE: &str = r#"
[[services]]
name = "web"
vip = "10.0.0.100:80"
protocol = "tcp"
mode = "nat"
scheduler = "maglev"
[[services.backends]]
address = "10.1.0.2:8080"
weight = 1
[[services.backends]]
address = "10.1.0.3:8080"
weight = 3

[[services]]
name = "dns6"
vip = "[2001:db8::100]:53"
protocol = "udp"
mode = "dsr"
scheduler = "ip-hash"
ring_size = 251
[[services.backends]]
address = "[2001:db8:1::2]:53"
"#;

fn errors_of(text: &str) -> Vec<String> {
    match Config::parse(text, "test.toml") {
        Err(ConfigError::Invalid { errors, .. }) => errors.iter().map(|e| e.to_string()).collect(),
        other => panic!("expected validation errors, got {other:?}"),
    }
}

#[test]
fn example_parses_with_defaults() {
    let c = Config::parse(EXAMPLE, "test.toml").unwrap();
    assert_eq!(c.dataplane.conntrack_entries, 1 << 20);
    assert_eq!(c.services.len(), 2);
    assert_eq!(c.services[0].ring_size, 16_381);
    assert_eq!(c.services[0].backends[1].weight, 3);
    assert_eq!(c.services[1].mode, Mode::Dsr);
    assert_eq!(c.services[1].scheduler, Scheduler::IpHash);
    assert_eq!(c.services[1].backends[0].weight, 1);
}

#[test]
fn shipped_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/xdp-lb.toml");
    Config::load(Path::new(path)).unwrap();
}

#[test]
fn reports_every_invalid_field_with_its_path() {
    let errors = errors_of(
        r#"
[dataplane]
conntrack_entries = 10
[[services]]
name = ""
vip = "10.0.0.300:80"
protocol = "sctp"
mode = "tunnel"
scheduler = "random"
ring_size = 1000
[[services.backends]]
address = "nonsense"
[[services.backends]]
address = "10.1.0.2:80"
weight = 70000
"#,
    );
    let expected = [
        "dataplane.conntrack_entries: 10 is below the minimum",
        "services[0].name: \"\" must start with a letter or digit",
        "services[0].vip: \"10.0.0.300:80\" is not an address",
        "services[0].protocol: \"sctp\" is not one of",
        "services[0].mode: \"tunnel\" is not one of",
        "services[0].scheduler: \"random\" is not one of: maglev, ip-hash, round-robin",
        "services[0].ring_size: 1000 is not a prime",
        "services[0].backends[0].address: \"nonsense\" is not an address",
        "services[0].backends[1].weight: 70000 is above the maximum",
    ];
    for e in expected {
        assert!(errors.iter().any(|got| got.starts_with(e)), "missing {e:?} in {errors:#?}");
    }
    assert_eq!(errors.len(), expected.len(), "{errors:#?}");
}

#[test]
fn refuses_mixed_families_dsr_port_changes_and_duplicates() {
    let errors = errors_of(
        r#"
[[services]]
name = "a"
vip = "10.0.0.100:80"
protocol = "tcp"
mode = "dsr"
[[services.backends]]
address = "[2001:db8::2]:80"
[[services.backends]]
address = "10.1.0.2:8080"
[[services.backends]]
address = "10.1.0.3:80"
[[services.backends]]
address = "10.1.0.3:80"
[[services]]
name = "a"
vip = "10.0.0.100:80"
protocol = "tcp"
"#,
    );
    for e in [
        "services[0].backends[0].address: [2001:db8::2]:80 is IPv6 but the VIP 10.0.0.100:80 is IPv4",
        "services[0].backends[1].address: port 8080 differs from the VIP's port 80",
        "services[0].backends[3].address: 10.1.0.3:80 is listed twice",
        "services[1].name: \"a\" is already used",
        "services[1].vip: 10.0.0.100:80/tcp is already used",
    ] {
        assert!(errors.iter().any(|got| got.starts_with(e)), "missing {e:?} in {errors:#?}");
    }
}

#[test]
fn unknown_fields_and_bad_toml_are_syntax_errors_naming_the_file() {
    for text in ["[[services]]\nname = \"a\"\nvipp = \"1.2.3.4:80\"\n", "this is not toml"] {
        let err = Config::parse(text, "bad.toml").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax { .. }), "{err}");
        assert!(err.to_string().starts_with("bad.toml is not valid TOML"), "{err}");
    }
}

#[test]
fn rings_must_fit_the_shared_cells() {
    let errors = errors_of("[dataplane]\nmaglev_cells = 1000\n[[services]]\nname = \"a\"\nvip = \"10.0.0.1:80\"\nprotocol = \"tcp\"\nring_size = 503\n");
    assert!(errors[0].starts_with("dataplane.maglev_cells: 1000 cells cannot hold"), "{errors:?}");
}

#[test]
fn least_conn_needs_nat_tcp_and_few_backends() {
    let mut text = String::from("[[services]]\nname = \"a\"\nvip = \"10.0.0.1:80\"\nprotocol = \"udp\"\nmode = \"dsr\"\nscheduler = \"least-conn\"\n");
    for i in 0..33 {
        text += &format!("[[services.backends]]\naddress = \"10.1.0.{}:80\"\n", i + 2);
    }
    let errors = errors_of(&text);
    for e in [
        "services[0].scheduler: least-conn needs mode \"nat\"",
        "services[0].scheduler: least-conn counts TCP connections",
        "services[0].backends: service a has 33 backends; least-conn handles at most 32",
    ] {
        assert!(errors.iter().any(|got| got.starts_with(e)), "missing {e:?} in {errors:#?}");
    }
}

#[test]
fn every_scheduler_name_parses() {
    for name in Scheduler::NAMES.split(", ") {
        assert_eq!(Scheduler::parse(name).map(Scheduler::name), Some(name));
    }
}

/// One service with the given VIP and backend lines, for the address-rule tests.
fn service_with(vip: &str, backends: &[&str]) -> String {
    let mut text = format!("[[services]]\nname = \"s\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\n");
    for b in backends {
        text += &format!("[[services.backends]]\naddress = \"{b}\"\n");
    }
    text
}

fn assert_refused(text: &str, expected: &str) {
    let errors = errors_of(text);
    assert!(errors.iter().any(|got| got.starts_with(expected)), "missing {expected:?} in {errors:#?}");
}

#[test]
fn refuses_vips_that_cannot_be_balanced() {
    for (vip, why) in [
        ("255.255.255.255:80", "is the broadcast address"),
        ("0.0.0.0:80", "is unspecified"),
        ("224.0.0.1:80", "is a multicast address"),
        ("239.1.2.3:53", "is a multicast address"),
        ("127.0.0.1:80", "is a loopback address"),
        ("169.254.1.1:80", "is a link-local address"),
        ("[::]:80", "is unspecified"),
        ("[::1]:80", "is a loopback address"),
        ("[ff02::1]:80", "is a multicast address"),
        ("[fe80::1]:80", "is a link-local address"),
        ("[::ffff:10.0.0.1]:80", "is an IPv4-mapped IPv6 address"),
        ("10.0.0.1:0", "has port 0"),
        ("10.0.0.1:65536", "has port 65536, above the maximum of 65535"),
        ("[2001:db8::1]:70000", "has port 70000, above the maximum of 65535"),
    ] {
        assert_refused(&service_with(vip, &["10.1.0.2:80"]), &format!("services[0].vip: {vip} {why}"));
    }
}

#[test]
fn refuses_backends_that_cannot_receive_balanced_traffic() {
    for (backend, why) in [
        ("127.0.0.1:8080", "is a loopback address"),
        ("127.1.2.3:8080", "is a loopback address"),
        ("255.255.255.255:8080", "is the broadcast address"),
        ("0.0.0.0:8080", "is unspecified"),
        ("224.0.0.5:8080", "is a multicast address"),
        ("10.1.0.2:0", "has port 0"),
        ("10.0.0.100:80", "is the VIP itself"),
        ("10.0.0.100:8080", "is the VIP's own address"),
    ] {
        assert_refused(&service_with("10.0.0.100:80", &[backend]), &format!("services[0].backends[0].address: {backend} {why}"));
    }
    for (backend, why) in [
        ("[::1]:8080", "is a loopback address"),
        ("[::]:8080", "is unspecified"),
        ("[ff02::2]:8080", "is a multicast address"),
        ("[::ffff:10.1.0.2]:8080", "is an IPv4-mapped IPv6 address"),
    ] {
        assert_refused(&service_with("[2001:db8::100]:80", &[backend]), &format!("services[0].backends[0].address: {backend} {why}"));
    }
}

#[test]
fn refuses_a_backend_of_the_other_family_naming_both() {
    assert_refused(
        &service_with("10.0.0.100:80", &["[2001:db8::2]:80"]),
        "services[0].backends[0].address: [2001:db8::2]:80 is IPv6 but the VIP 10.0.0.100:80 is IPv4",
    );
    assert_refused(
        &service_with("[2001:db8::100]:80", &["10.1.0.2:80"]),
        "services[0].backends[0].address: 10.1.0.2:80 is IPv4 but the VIP [2001:db8::100]:80 is IPv6",
    );
}

#[test]
fn refuses_conntrack_and_cell_counts_outside_the_limits() {
    assert_refused(
        "[dataplane]\nconntrack_entries = 4000000000\n",
        &format!("dataplane.conntrack_entries: 4000000000 is above the maximum of {MAX_CONNTRACK_ENTRIES}"),
    );
    assert_refused("[dataplane]\nmaglev_cells = 4000000000\n", &format!("dataplane.maglev_cells: 4000000000 is above the maximum of {MAX_MAGLEV_CELLS}"));
    assert_refused("[dataplane]\nmaglev_cells = 0\n", "dataplane.maglev_cells: 0 is below the minimum");
}

#[test]
fn hash_seed_has_a_fixed_default_and_is_kept() {
    assert_eq!(Config::parse(EXAMPLE, "test.toml").unwrap().dataplane.hash_seed, xdp_lb_common::maglev::DEFAULT_SEED);
    let c = Config::parse("[dataplane]\nhash_seed = 9223372036854775807\n", "test.toml").unwrap();
    assert_eq!(c.dataplane.hash_seed, MAX_HASH_SEED);
    // It survives the state file's round trip (the daemon saves RawConfig as TOML).
    let (raw, _) = RawConfig::parse("[dataplane]\nhash_seed = 42\n", "test.toml").unwrap();
    let saved = toml::to_string(&raw).unwrap();
    assert_eq!(Config::parse(&saved, "state.toml").unwrap().dataplane.hash_seed, 42);
}

#[test]
fn refuses_hash_seeds_toml_cannot_hold() {
    // Only reachable through RawConfig built in code: a TOML file cannot spell such a number.
    let mut raw = RawConfig::default();
    raw.dataplane.hash_seed = u64::MAX;
    let errors: Vec<String> = raw.validate().unwrap_err().iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errors,
        [format!("dataplane.hash_seed: {} is above the maximum of {MAX_HASH_SEED} (TOML integers are signed 64-bit, so a larger seed could not be written into the config file)", u64::MAX)]
    );
    // A negative or non-integer seed in a file is refused by the parser, naming the key and line.
    for (text, what) in [("[dataplane]\n\nhash_seed = -1\n", "-1"), ("[dataplane]\n\nhash_seed = \"x\"\n", "string")] {
        match Config::parse(text, "xdp-lb.toml") {
            Err(e @ ConfigError::Syntax { .. }) => {
                let e = e.to_string();
                assert!(e.contains("line 3") && e.contains("hash_seed") && e.contains(what), "{e}");
            }
            other => panic!("expected a syntax error for {text:?}, got {other:?}"),
        }
    }
}

#[test]
fn service_names_are_restricted_to_a_safe_charset_and_length() {
    let rule = "must start with a letter or digit, continue with letters, digits, '.', '_' or '-', and be at most 63 characters";
    let long = "a".repeat(64);
    for name in ["web\\nadmin", "web admin", "-web", ".web", "web/1", "wéb", "web\\t", long.as_str()] {
        let text = format!("[[services]]\nname = \"{name}\"\nvip = \"10.0.0.1:80\"\nprotocol = \"tcp\"\n");
        assert_refused(&text, &format!("services[0].name: {:?} {rule}", name.replace("\\n", "\n").replace("\\t", "\t")));
    }
    let ok = "a".repeat(63);
    for name in ["web", "web-1.prod_eu", "9lives", ok.as_str()] {
        let text = format!("[[services]]\nname = \"{name}\"\nvip = \"10.0.0.1:80\"\nprotocol = \"tcp\"\n");
        Config::parse(&text, "test.toml").unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}

/// The whole `check` output for an invalid file, as the operator sees it.
fn report_of(text: &str) -> String {
    match Config::parse(text, "xdp-lb.toml") {
        Err(e @ ConfigError::Invalid { .. }) => e.to_string(),
        other => panic!("expected validation errors, got {other:?}"),
    }
}

#[test]
fn semantic_errors_name_the_line_of_the_field() {
    let report = report_of(
        r#"# line 1
[dataplane]
conntrack_entries = 10

[[services]]
name = "web"
vip = "10.0.0.100:80"
protocol = "tcp"
[[services.backends]]
address = "10.1.0.2:80"
[[services.backends]]
address = "127.0.0.1:80"
weight = 70000
[services.backends.health_check]
interval_ms = 0

[[services]]
name = "bad name"
vip = "10.0.0.101:80"
protocol = "tcp"
"#,
    );
    for line in [
        "xdp-lb.toml:3: dataplane.conntrack_entries: 10 is below the minimum of 1024",
        "xdp-lb.toml:12: services[0].backends[1].address: 127.0.0.1:80 is a loopback address",
        "xdp-lb.toml:13: services[0].backends[1].weight: 70000 is above the maximum of 65535",
        "xdp-lb.toml:15: services[0].backends[1].health_check.interval_ms: 0 must be between 1 and 86400000",
        "xdp-lb.toml:18: services[1].name: \"bad name\" must start with a letter or digit",
    ] {
        assert!(report.lines().any(|l| l.trim_start().starts_with(line)), "missing {line:?} in\n{report}");
    }
    let lines: Vec<usize> = report.lines().skip(1).map(|l| l.split(':').nth(1).and_then(|n| n.parse().ok()).expect("a line number")).collect();
    assert!(lines.is_sorted(), "errors in file order: {lines:?}\n{report}");
}

#[test]
fn an_error_about_an_unwritten_default_names_its_enclosing_table() {
    // ring_size is not written: the error points at the service's header line.
    let report = report_of("[dataplane]\nmaglev_cells = 100\n\n[[services]]\nname = \"a\"\nvip = \"10.0.0.1:80\"\nprotocol = \"tcp\"\n");
    assert!(report.contains("xdp-lb.toml:2: dataplane.maglev_cells: 100 cells cannot hold"), "{report}");
    // Inline tables work the same way as [[services]] headers.
    let report = report_of("services = [\n  { name = \"a\", vip = \"10.0.0.1:80\", protocol = \"tcp\" },\n  { name = \"b\", vip = \"0.0.0.0:80\", protocol = \"tcp\" },\n]\n");
    assert!(report.contains("xdp-lb.toml:3: services[1].vip: 0.0.0.0:80 is unspecified"), "{report}");
}

#[test]
fn health_check_errors_name_the_exact_field() {
    let text = r#"
[[services]]
name = "web"
vip = "10.0.0.100:80"
protocol = "tcp"
[services.health_check]
kind = "icmp"
port = 0
path = "healthz"
expect = "700-800"
interval_ms = 0
timeout_ms = 0
rise = 0
fall = 0
[[services]]
name = "api"
vip = "10.0.0.101:80"
protocol = "tcp"
[services.health_check]
interval_ms = 300
timeout_ms = 900
[[services]]
name = "udp"
vip = "10.0.0.102:53"
protocol = "udp"
[services.health_check]
interval_ms = 86400001
[[services.backends]]
address = "10.1.0.2:53"
[services.backends.health_check]
path = "/a b"
timeout_ms = 600
"#;
    let errors = errors_of(text);
    let expected = [
        "services[0].health_check.kind: \"icmp\" is not one of: tcp, http, none",
        "services[0].health_check.port: 0 cannot be probed",
        "services[0].health_check.path: \"healthz\" must start with '/'",
        "services[0].health_check.expect: \"700-800\" is not a status code or range of codes between 100 and 599",
        "services[0].health_check.interval_ms: 0 must be between 1 and 86400000",
        "services[0].health_check.timeout_ms: 0 must be between 1 and 86400000 (one day)",
        "services[0].health_check.rise: 0 must be between 1 and 100",
        "services[0].health_check.fall: 0 must be between 1 and 100",
        "services[1].health_check.timeout_ms: 900 must not exceed the interval (300 ms)",
        "services[2].health_check.interval_ms: 86400001 must be between 1 and 86400000",
        "services[2].backends[0].health_check.path: \"/a b\" must not contain whitespace",
    ];
    for e in expected {
        assert!(errors.iter().any(|got| got.starts_with(e)), "missing {e:?} in {errors:#?}");
    }
    assert_eq!(errors.len(), expected.len(), "nothing reported twice or at a vaguer path: {errors:#?}");
}

#[test]
fn a_backend_check_that_breaks_the_timing_rule_is_reported_at_the_backend() {
    let errors = errors_of(
        "[[services]]\nname = \"a\"\nvip = \"10.0.0.1:80\"\nprotocol = \"tcp\"\n[services.health_check]\ninterval_ms = 1000\n[[services.backends]]\naddress = \"10.1.0.2:80\"\n[services.backends.health_check]\ninterval_ms = 100\n",
    );
    assert_eq!(errors, ["services[0].backends[0].health_check.timeout_ms: 400 (the default) must not exceed the interval (100 ms): probes would pile up behind each other"]);
}

/// Every kind of error at once, so the wording of all of them can be checked together.
const EVERYTHING_WRONG: &str = r#"
[dataplane]
conntrack_entries = 4000000000
maglev_cells = 10
[[services]]
name = "bad name"
vip = "255.255.255.255:0"
protocol = "sctp"
mode = "tunnel"
scheduler = "random"
ring_size = 1000
all_down = "maybe"
passive_checks = true
[services.health_check]
kind = "icmp"
port = 0
path = "x"
expect = "99-700"
interval_ms = 0
timeout_ms = 0
rise = 0
fall = 0
[[services.backends]]
address = "nonsense"
weight = 70000
[[services.backends]]
address = "127.0.0.1:80"
[services.backends.health_check]
kind = "http"
path = "/a b"
expect = "300-200"
interval_ms = 100000000000
[[services]]
name = "lc"
vip = "[::ffff:10.0.0.1]:80"
protocol = "udp"
mode = "dsr"
scheduler = "least-conn"
passive_checks = true
[[services.backends]]
address = "10.0.0.5:81"
[[services.backends]]
address = "10.0.0.5:81"
[[services]]
name = "lc"
vip = "10.0.0.1:80"
protocol = "tcp"
mode = "dsr"
[[services.backends]]
address = "[2001:db8::1]:80"
[[services.backends]]
address = "10.0.0.1:81"
[[services.backends]]
address = "10.0.0.2:82"
[services.backends.health_check]
timeout_ms = 5000
"#;

#[test]
fn no_message_uses_rust_range_syntax_or_debug_formatting() {
    let errors = match Config::parse(EVERYTHING_WRONG, "xdp-lb.toml") {
        Err(ConfigError::Invalid { errors, .. }) => errors,
        other => panic!("expected validation errors, got {other:?}"),
    };
    assert!(errors.len() >= 30, "the fixture should trip most rules: {errors:#?}");
    let report = report_of(EVERYTHING_WRONG);
    let cli = render_for_cli(&errors);
    for text in [&report, &cli] {
        for bad in ["..=", "..", "Some(", "None", "\\n"] {
            assert!(!text.contains(bad), "{bad:?} in:\n{text}");
        }
    }
    assert!(errors.iter().all(|e| e.line.is_some()), "every error has a line: {errors:#?}");
}

/// A desired state as the CLI builds it: no file, so no lines and no paths the user wrote.
fn cli_state() -> RawConfig {
    let mut web = RawService::new("web", "10.0.0.100:80", "tcp");
    web.backends = vec![RawBackend::new("10.1.0.2:80"), RawBackend::new("10.1.0.3:80")];
    RawConfig { services: vec![web], ..RawConfig::default() }
}

fn cli_errors(edit: impl FnOnce(&mut RawConfig)) -> String {
    let mut state = cli_state();
    state.validate().expect("the starting state is valid");
    edit(&mut state);
    render_for_cli(&state.validate().expect_err("the edit should be refused"))
}

#[test]
fn cli_rendering_names_services_backends_and_flags_not_config_paths() {
    for (rendered, expected) in [
        (cli_errors(|c| c.services[0].backends[1].weight = 70000), "service web, backend 10.1.0.3:80: weight: 70000 is above the maximum of 65535"),
        (cli_errors(|c| c.services[0].backends.push(RawBackend::new("10.0.0.1:99999"))), "service web, backend 10.0.0.1:99999: 10.0.0.1:99999 has port 99999, above the maximum of 65535"),
        (cli_errors(|c| c.services[0].backends.push(RawBackend::new("10.0.0.1"))), "service web, backend 10.0.0.1: \"10.0.0.1\" is not an address with a port"),
        (cli_errors(|c| c.services[0].vip = "255.255.255.255:80".into()), "service web: --vip: 255.255.255.255:80 is the broadcast address"),
        (cli_errors(|c| c.services[0].ring_size = 1000), "service web: --ring-size: 1000 is not a prime number"),
        (
            cli_errors(|c| c.services[0].health_check = Some(RawHealthCheck { interval_ms: Some(0), ..RawHealthCheck::default() })),
            "service web: --check-interval-ms: 0 must be between 1 and 86400000",
        ),
        (
            cli_errors(|c| c.services[0].health_check = Some(RawHealthCheck { timeout_ms: Some(900), ..RawHealthCheck::default() })),
            "service web: --check-timeout-ms: 900 must not exceed the interval (500 ms)",
        ),
        (cli_errors(|c| c.services.push(RawService::new("a b", "10.0.0.101:80", "tcp"))), "service name: \"a b\" must start with a letter or digit"),
        (
            cli_errors(|c| {
                c.services[0].scheduler = "least-conn".into();
                c.services[0].backends = (0..40).map(|i| RawBackend::new(format!("10.1.0.{}:80", i + 2))).collect();
            }),
            "service web has 40 backends; least-conn handles at most 32",
        ),
        (cli_errors(|c| c.services[0].ring_size = 4_194_319), "[dataplane] maglev_cells in the config file: 4194304 cells cannot hold"),
    ] {
        assert!(rendered.starts_with(expected), "expected {expected:?}, got {rendered:?}");
        assert!(!rendered.contains("services[") && !rendered.contains("backends["), "a config path in {rendered:?}");
    }
}

#[test]
fn limits_are_named_in_the_errors_that_hit_them() {
    let mut many = RawConfig::default();
    many.dataplane.maglev_cells = MAX_MAGLEV_CELLS;
    for i in 0..=defaults::MAX_SERVICES {
        let mut s = RawService::new(format!("s{i}"), format!("10.0.{}.{}:80", i / 200, i % 200 + 1), "udp");
        s.ring_size = 251;
        many.services.push(s);
    }
    let errors: Vec<String> = many.validate().unwrap_err().iter().map(|e| e.to_string()).collect();
    assert_eq!(errors, [format!("services: {} services; xdp-lb handles at most {}", defaults::MAX_SERVICES + 1, defaults::MAX_SERVICES)]);

    let mut big = cli_state();
    big.services[0].scheduler = "round-robin".into();
    big.services[0].backends = (0..=MAX_BACKENDS_TOTAL).map(|i| RawBackend::new(format!("10.1.{}.{}:80", i / 250, i % 250 + 1))).collect();
    let errors: Vec<String> = big.validate().unwrap_err().iter().map(|e| e.to_string()).collect();
    assert_eq!(errors, [format!("services: {} backends in all services; xdp-lb handles at most {MAX_BACKENDS_TOTAL}", MAX_BACKENDS_TOTAL + 1)]);
}

#[test]
fn constructors_hold_the_same_defaults_as_the_file_format() {
    let from_file: RawConfig = toml::from_str("[[services]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nprotocol = \"tcp\"\n[[services.backends]]\naddress = \"10.1.0.2:80\"\n").unwrap();
    let mut built = RawService::new("web", "10.0.0.100:80", "tcp");
    built.backends.push(RawBackend::new("10.1.0.2:80"));
    assert_eq!(serde_json::to_value(&from_file.services[0]).unwrap(), serde_json::to_value(&built).unwrap());
}

#[test]
fn weights_from_the_command_line_name_the_real_limit() {
    assert_eq!(parse_weight("0"), Ok(0));
    assert_eq!(parse_weight("65535"), Ok(65_535));
    for bad in ["65536", "99999999999", "-1", "1.5", "heavy", ""] {
        assert_eq!(parse_weight(bad), Err("must be a whole number between 0 and 65535".to_string()), "{bad:?}");
    }
}

#[test]
fn readme_limits_match_the_constants() {
    let readme = include_str!("../../../README.md");
    let limits = &readme[readme.find("## Limits").expect("README has a Limits section")..];
    let limits = &limits[..limits[3..].find("\n## ").map_or(limits.len(), |end| end + 3)];
    let thousands = |n: u64| {
        let digits = n.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    for (what, value) in [
        ("MAX_SERVICES", defaults::MAX_SERVICES as u64),
        ("MAX_BACKENDS_TOTAL", MAX_BACKENDS_TOTAL as u64),
        ("LEAST_CONN_MAX", xdp_lb_common::maps::LEAST_CONN_MAX as u64),
        ("MAX_MAGLEV_CELLS", MAX_MAGLEV_CELLS as u64),
        ("MIN_CONNTRACK_ENTRIES", MIN_CONNTRACK_ENTRIES as u64),
        ("MAX_CONNTRACK_ENTRIES", MAX_CONNTRACK_ENTRIES as u64),
        ("MAX_WEIGHT", MAX_WEIGHT as u64),
        ("MAX_HASH_SEED", MAX_HASH_SEED),
        ("MAX_NAME_LEN", MAX_NAME_LEN as u64),
        ("MAX_INTERVAL", crate::health::MAX_INTERVAL.as_millis() as u64),
        ("TX_PORTS", defaults::TX_PORTS as u64),
    ] {
        let row = limits.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no Limits row names {what}"));
        assert!(row.contains(&format!(" {} ", thousands(value))) || row.contains(&format!(" {} (", thousands(value))), "{what} = {} is not in {row:?}", thousands(value));
    }
}

/// Values the CLI can send but TOML cannot hold (above i64::MAX), and absurd sizes, are refused
/// with a field error, before they reach the file writer.
#[test]
fn numbers_and_lengths_have_sane_maxima() {
    let base: RawConfig = toml::from_str(&service_with("10.0.0.1:80", &["10.0.1.1:80"])).unwrap();
    let messages = |edit: &dyn Fn(&mut RawConfig)| -> Vec<String> {
        let mut raw = base.clone();
        edit(&mut raw);
        raw.validate().err().unwrap_or_default().iter().map(|e| e.to_string()).collect()
    };
    type Edit = Box<dyn Fn(&mut RawConfig)>;
    let cases: Vec<(&str, Edit)> = vec![
        ("drain_timeout_ms: 18446744073709551615 is above the maximum of 604800000", Box::new(|r| r.services[0].drain_timeout_ms = u64::MAX)),
        ("drain_timeout_ms: 604800001 is above the maximum", Box::new(|r| r.services[0].drain_timeout_ms = 7 * 24 * 3600 * 1000 + 1)),
        ("health_check.timeout_ms: 18446744073709551615 must be between 1 and", Box::new(|r| {
            r.services[0].health_check = Some(RawHealthCheck { kind: Some("none".into()), timeout_ms: Some(u64::MAX), ..Default::default() })
        })),
        ("health_check.rise: 4294967295 must be between 1 and 100", Box::new(|r| {
            r.services[0].health_check = Some(RawHealthCheck { rise: Some(u32::MAX), ..Default::default() })
        })),
        ("health_check.fall: 101 must be between 1 and 100", Box::new(|r| {
            r.services[0].health_check = Some(RawHealthCheck { fall: Some(101), ..Default::default() })
        })),
        ("health_check.path: 20000 characters; at most 1024", Box::new(|r| {
            r.services[0].health_check = Some(RawHealthCheck { kind: Some("http".into()), path: Some(format!("/{}", "a".repeat(19_999))), ..Default::default() })
        })),
    ];
    for (expected, edit) in cases {
        let got = messages(&*edit);
        assert!(got.iter().any(|m| m.contains(expected)), "missing {expected:?} in {got:#?}");
    }
    // The limits themselves are accepted.
    assert!(messages(&|r| r.services[0].drain_timeout_ms = 7 * 24 * 3600 * 1000).is_empty());
    assert!(messages(&|r| r.services[0].health_check = Some(RawHealthCheck { rise: Some(100), fall: Some(100), ..Default::default() })).is_empty());
}

/// A TOML syntax error is one line naming the line and column (the CLI prints one error line).
#[test]
fn a_syntax_error_is_one_line_with_its_place() {
    let err = Config::parse("[[services]]\nname = \"a\"\nvip = = 3\n", "bad.toml").unwrap_err().to_string();
    assert!(!err.contains('\n'), "{err}");
    assert!(err.starts_with("bad.toml is not valid TOML for xdp-lb: line 3, column"), "{err}");
}

/// Issue 9: a VIP equal to another service's backend would catch that backend's traffic.
#[test]
fn a_vip_that_is_another_services_backend_is_refused() {
    let text = "[[services]]\nname = \"web\"\nvip = \"10.0.0.1:80\"\nprotocol = \"tcp\"\n[[services.backends]]\naddress = \"10.77.1.2:8080\"\n\
                [[services]]\nname = \"hijack\"\nvip = \"10.77.1.2:8080\"\nprotocol = \"tcp\"\n[[services.backends]]\naddress = \"10.77.1.3:8080\"\n";
    let errors = errors_of(text);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("services[1]") || errors[0].contains("hijack"), "names the service: {errors:?}");
    assert!(errors[0].contains("10.77.1.2:8080 is a backend of service web"), "{errors:?}");
}
