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
