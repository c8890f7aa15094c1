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
        "services[0].name: must not be empty",
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
        "services[0].backends[0].address: [2001:db8::2]:80 is not of the VIP's address family",
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
        "services[0].backends: 33 backends, least-conn supports at most 32",
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
