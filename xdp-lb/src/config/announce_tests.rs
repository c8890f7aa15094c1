//! `[announce]`: parsing, defaults, validation and the writer that `xdp-lb node drain` uses.

use super::*;

const ANNOUNCED: &str = r#"# node 1 of 3
[announce]
table = 100        # BIRD's kernel protocol learns this table

[[services]]
name = "web"
vip = "10.0.0.100:80"
protocol = "tcp"
mode = "dsr"
[[services.backends]]
address = "10.1.0.2:80"
"#;

fn errors_of(text: &str) -> Vec<String> {
    match RawConfig::parse(text, "node.toml") {
        Err(ConfigError::Invalid { errors, .. }) => errors.iter().map(|e| format!("{}: {e}", e.line.unwrap_or(0))).collect(),
        other => panic!("expected validation errors, got {other:?}"),
    }
}

#[test]
fn absent_means_announcements_off() {
    let text = ANNOUNCED.replace("[announce]\ntable = 100        # BIRD's kernel protocol learns this table\n", "");
    let (_, config) = RawConfig::parse(&text, "node.toml").unwrap();
    assert_eq!(config.announce, None);
}

#[test]
fn table_and_drained_are_read_with_their_defaults() {
    let (_, config) = RawConfig::parse(ANNOUNCED, "node.toml").unwrap();
    assert_eq!(config.announce, Some(Announce { table: 100, drained: false }));
    let text = ANNOUNCED.replace("table = 100        # BIRD's kernel protocol learns this table", "drained = true");
    let (_, config) = RawConfig::parse(&text, "node.toml").unwrap();
    assert_eq!(config.announce, Some(Announce { table: DEFAULT_ANNOUNCE_TABLE, drained: true }));
}

#[test]
fn a_table_the_kernel_owns_or_out_of_range_is_refused_with_its_line() {
    for table in [0, 253, 254, 255, 256, 70_000] {
        let text = ANNOUNCED.replace("table = 100 ", &format!("table = {table} "));
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{table}: {errors:?}");
        assert!(errors[0].starts_with(&format!("3: announce.table: {table} is not a routing table")), "{table}: {errors:?}");
        assert!(errors[0].contains("between 1 and 252"), "{errors:?}");
    }
    for table in [1, 252] {
        let text = ANNOUNCED.replace("table = 100 ", &format!("table = {table} "));
        RawConfig::parse(&text, "node.toml").unwrap_or_else(|e| panic!("table {table}: {e}"));
    }
}

#[test]
fn unknown_announce_fields_are_refused() {
    let text = ANNOUNCED.replace("[announce]\n", "[announce]\nasn = 65001\n");
    let Err(ConfigError::Syntax { message, .. }) = RawConfig::parse(&text, "node.toml") else { panic!("accepted an unknown field") };
    assert!(message.contains("asn"), "{message}");
}

#[test]
fn nat_services_are_refused_when_announcing_and_the_error_names_the_field() {
    // Written out, and by default (mode is nat unless given).
    for text in [ANNOUNCED.replace("mode = \"dsr\"", "mode = \"nat\""), ANNOUNCED.replace("mode = \"dsr\"\n", "")] {
        let errors = errors_of(&text);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("services[0].mode: \"nat\" cannot be announced from several nodes"), "{errors:?}");
        assert!(errors[0].contains("use mode = \"dsr\""), "{errors:?}");
    }
    // Without [announce], NAT stays what it was.
    let single = ANNOUNCED.replace("[announce]\ntable = 100        # BIRD's kernel protocol learns this table\n", "").replace("mode = \"dsr\"", "mode = \"nat\"");
    RawConfig::parse(&single, "node.toml").unwrap();
}

#[test]
fn a_cli_change_to_nat_names_the_option() {
    let (mut raw, _) = RawConfig::parse(ANNOUNCED, "node.toml").unwrap();
    raw.services[0].mode = "nat".into();
    let errors = raw.validate().unwrap_err();
    let rendered = render_for_cli(&errors);
    assert!(rendered.starts_with("service web: --mode: \"nat\" cannot be announced"), "{rendered}");
}

/// Issue 11 F9: schedulers whose choice is not a pure function of the configuration and the flow
/// make nodes disagree; refused with `[announce]`, as NAT is.
#[test]
fn node_local_schedulers_are_refused_when_announcing() {
    for name in ["round-robin", "weighted-round-robin", "least-conn", "least-response-time"] {
        let text = ANNOUNCED.replace("mode = \"dsr\"\n", &format!("mode = \"dsr\"\nscheduler = \"{name}\"\n"));
        let errors = errors_of(&text);
        let want = format!("10: services[0].scheduler: \"{name}\" cannot be announced from several nodes");
        assert!(errors.iter().any(|e| e.starts_with(&want)), "{name}: {errors:?}");
        assert!(errors.iter().any(|e| e.contains("use scheduler = \"maglev\" or \"ip-hash\"")), "{errors:?}");
        // Without [announce] the scheduler's own rules apply, not this one.
        let single = text.replace("[announce]\ntable = 100        # BIRD's kernel protocol learns this table\n", "");
        if let Err(ConfigError::Invalid { errors, .. }) = RawConfig::parse(&single, "node.toml") {
            assert!(errors.iter().all(|e| !e.to_string().contains("cannot be announced")), "{errors:?}");
        }
    }
    for name in ["maglev", "ip-hash"] {
        RawConfig::parse(&ANNOUNCED.replace("mode = \"dsr\"\n", &format!("mode = \"dsr\"\nscheduler = \"{name}\"\n")), "node.toml").unwrap();
    }
}

#[test]
fn a_cli_scheduler_change_is_refused_naming_the_option() {
    let (mut raw, _) = RawConfig::parse(ANNOUNCED, "node.toml").unwrap();
    raw.services[0].scheduler = "round-robin".into();
    let rendered = render_for_cli(&raw.validate().unwrap_err());
    assert!(rendered.starts_with("service web: --scheduler: \"round-robin\" cannot be announced"), "{rendered}");
}

#[test]
fn a_table_error_from_the_cli_names_the_config_setting() {
    let (mut raw, _) = RawConfig::parse(ANNOUNCED, "node.toml").unwrap();
    raw.announce.as_mut().unwrap().table = 0;
    let rendered = render_for_cli(&raw.validate().unwrap_err());
    assert!(rendered.starts_with("[announce] table in the config file: 0 is not"), "{rendered}");
}

#[test]
fn node_drain_is_written_into_the_section_keeping_comments() {
    let (old, _) = RawConfig::parse(ANNOUNCED, "node.toml").unwrap();
    let mut new = old.clone();
    new.announce.as_mut().unwrap().drained = true;
    let out = file::patch(ANNOUNCED, &old, &new).unwrap();
    for comment in ["# node 1 of 3", "# BIRD's kernel protocol learns this table"] {
        assert!(out.contains(comment), "lost {comment:?}:\n{out}");
    }
    let (back, config) = RawConfig::parse(&out, "node.toml").unwrap();
    assert_eq!(config.announce, Some(Announce { table: 100, drained: true }), "{out}");
    // The key went into [announce], before the services.
    assert!(out.find("drained = true").unwrap() < out.find("[[services]]").unwrap(), "{out}");
    // And back: undrain.
    let mut undrained = back.clone();
    undrained.announce.as_mut().unwrap().drained = false;
    let again = file::patch(&out, &back, &undrained).unwrap();
    assert_eq!(RawConfig::parse(&again, "node.toml").unwrap().1.announce, Some(Announce { table: 100, drained: false }), "{again}");
}

#[test]
fn a_file_without_announce_is_written_without_it() {
    let text = ANNOUNCED.replace("[announce]\ntable = 100        # BIRD's kernel protocol learns this table\n", "");
    let (old, _) = RawConfig::parse(&text, "node.toml").unwrap();
    let mut new = old.clone();
    new.services[0].backends[0].weight = 2;
    let out = file::patch(&text, &old, &new).unwrap();
    assert!(!out.contains("announce"), "{out}");
}

#[test]
fn the_shipped_node_example_is_valid_and_announces() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/bgp/xdp-lb-node.toml");
    let config = Config::load(Path::new(path)).unwrap_or_else(|e| panic!("{e}"));
    assert!(config.announce.is_some_and(|a| !a.drained), "{config:?}");
    assert!(config.services.iter().all(|s| s.mode == Mode::Dsr));
}
