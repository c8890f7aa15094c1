//! The exposition read back by a real parser: the Prometheus project's own Python client
//! (`text_string_to_metric_families`, Debian's python3-prometheus-client).

use std::{
    collections::BTreeMap,
    io::Write,
    process::{Command, Stdio},
};

use super::*;
use crate::stats::{BackendStats, ServiceStats};

/// Parses `text` with prometheus_client and returns, per family, its type and its samples as
/// `(sample name, labels, value)`.
type Families = BTreeMap<String, (String, Vec<(String, BTreeMap<String, String>, f64)>)>;

fn parse(text: &str) -> Families {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    if family.name in out:
        raise SystemExit("family %s appears twice" % family.name)
    out[family.name] = [family.type, [[s.name, s.labels, s.value] for s in family.samples]]
json.dump(out, sys.stdout)
"#;
    let mut child = // Debian's interpreter: the one python3-prometheus-client installs into (a pyenv python3
    // earlier on PATH would not see it).
    Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3 (cargo xtask setup installs it with python3-prometheus-client)");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write the scrape");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "prometheus_client rejected the scrape (is python3-prometheus-client installed?): {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser output")
}

const AWKWARD: [&str; 5] = ["a\"b", "back\\slash", "new\nline", "\\\"both\\\\\"", "trailing\\"];

fn scrape() -> Scrape {
    let service = |name: &str, n: u64| ServiceStats {
        name: name.to_string(),
        vip: "10.0.0.100:80".into(),
        protocol: "tcp".into(),
        packets: 100 + n,
        bytes: 10_000 + n,
        new_flows: 10 + n,
        backends: vec![BackendStats {
            address: "10.1.0.2:80".into(),
            weight: 1,
            packets: 50 + n,
            bytes: 5_000 + n,
            new_flows: 5 + n,
            syns: 6 + n,
            syn_acks: 4 + n,
            resets: n,
        }],
    };
    let names: Vec<String> = std::iter::once("web".to_string()).chain(AWKWARD.iter().map(|s| s.to_string())).collect();
    Scrape {
        stats: Snapshot {
            services: names.iter().enumerate().map(|(i, n)| service(n, i as u64)).collect(),
            reasons: xdp_lb_common::reasons::NAMES.iter().enumerate().map(|(i, r)| (r.to_string(), i as u64 * 3)).collect(),
        },
        services: names
            .iter()
            .enumerate()
            .map(|(i, n)| ServiceHealth { name: n.clone(), serving: i, on_backups: false, all_down: i == 0 })
            .collect(),
        backends: names
            .iter()
            .enumerate()
            .map(|(i, n)| BackendState {
                service: n.clone(),
                backend: "10.1.0.2:80".into(),
                up: i % 2 == 0,
                active_flows: Some(i as u64),
                check_latency_seconds: Some(0.000_25 * (i + 1) as f64),
            })
            .collect(),
        local_errors: vec![("process_fd_limit", 7), ("no_local_address", 0)],
        ring_errors: names.iter().enumerate().map(|(i, n)| (n.clone(), i == 1)).collect(),
        rings: vec![("web".into(), 0x00ab_cdef_0123_4567)],
        announced: vec![("10.0.0.100".into(), true), ("2001:db8::100".into(), false)],
    }
}

/// The family's sample values keyed by label set.
fn values(families: &Families, family: &str) -> BTreeMap<BTreeMap<String, String>, f64> {
    let (_, samples) = families.get(family).unwrap_or_else(|| panic!("no family {family} in {families:?}"));
    samples.iter().map(|(_, labels, value)| (labels.clone(), *value)).collect()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

#[test]
fn every_family_is_typed_and_appears_once() {
    let families = parse(&exposition(&scrape()));
    for name in [
        "xdp_lb_service_packets",
        "xdp_lb_service_bytes",
        "xdp_lb_service_new_flows",
        "xdp_lb_backend_packets",
        "xdp_lb_backend_bytes",
        "xdp_lb_backend_new_flows",
        "xdp_lb_backend_syns",
        "xdp_lb_backend_syn_acks",
        "xdp_lb_backend_resets",
        "xdp_lb_not_forwarded",
        "xdp_lb_health_check_local_errors",
    ] {
        assert_eq!(families.get(name).map(|f| f.0.as_str()), Some("counter"), "{name}: {families:?}");
    }
    for name in [
        "xdp_lb_service_all_backends_down",
        "xdp_lb_service_serving_backends",
        "xdp_lb_backend_up",
        "xdp_lb_backend_active_flows",
        "xdp_lb_backend_check_latency_seconds",
        "xdp_lb_service_ring_info",
        "xdp_lb_service_ring_error",
        "xdp_lb_vip_announced",
    ] {
        assert_eq!(families.get(name).map(|f| f.0.as_str()), Some("gauge"), "{name}: {families:?}");
    }
    let untyped: Vec<&String> = families.iter().filter(|(_, (kind, _))| kind == "unknown" || kind == "untyped").map(|(n, _)| n).collect();
    assert!(untyped.is_empty(), "untyped families: {untyped:?}");
}

#[test]
fn a_ring_that_could_not_be_rebuilt_shows_in_its_gauge() {
    let families = parse(&exposition(&scrape()));
    let failed = values(&families, "xdp_lb_service_ring_error");
    assert_eq!(failed.get(&labels(&[("service", "web")])), Some(&0.0), "{failed:?}");
    assert_eq!(failed.get(&labels(&[("service", AWKWARD[0])])), Some(&1.0), "{failed:?}");
}

#[test]
fn each_vip_address_has_its_announcement_gauge() {
    let families = parse(&exposition(&scrape()));
    let announced = values(&families, "xdp_lb_vip_announced");
    assert_eq!(announced.get(&labels(&[("vip", "10.0.0.100")])), Some(&1.0), "{announced:?}");
    assert_eq!(announced.get(&labels(&[("vip", "2001:db8::100")])), Some(&0.0), "{announced:?}");
    let off = Scrape { announced: Vec::new(), ..scrape() };
    assert!(!parse(&exposition(&off)).contains_key("xdp_lb_vip_announced"), "announcements off: no gauge");
}

#[test]
fn awkward_label_values_round_trip() {
    let scrape = scrape();
    let families = parse(&exposition(&scrape));
    let packets = values(&families, "xdp_lb_service_packets");
    for s in &scrape.stats.services {
        assert_eq!(packets.get(&labels(&[("service", &s.name)])), Some(&(s.packets as f64)), "service {:?}: {packets:?}", s.name);
    }
    assert_eq!(packets.len(), scrape.stats.services.len(), "{packets:?}");
    let resets = values(&families, "xdp_lb_backend_resets");
    let up = values(&families, "xdp_lb_backend_up");
    let latency = values(&families, "xdp_lb_backend_check_latency_seconds");
    for (i, name) in AWKWARD.iter().enumerate() {
        let backend = labels(&[("service", name), ("backend", "10.1.0.2:80")]);
        assert_eq!(resets.get(&backend), Some(&((i + 1) as f64)), "{name:?}: {resets:?}");
        assert_eq!(up.get(&backend), Some(&(((i + 1) % 2 == 0) as u8 as f64)), "{name:?}");
        assert_eq!(latency.get(&backend), Some(&(0.000_25 * (i + 2) as f64)), "{name:?}");
    }
}

#[test]
fn values_match_the_snapshot_and_every_reason_is_listed() {
    let scrape = scrape();
    let families = parse(&exposition(&scrape));
    let reasons = values(&families, "xdp_lb_not_forwarded");
    assert_eq!(reasons.len(), xdp_lb_common::reasons::NAMES.len());
    for (i, r) in xdp_lb_common::reasons::NAMES.iter().enumerate() {
        assert_eq!(reasons.get(&labels(&[("reason", r)])), Some(&(i as f64 * 3.0)), "{r}");
    }
    let web = labels(&[("service", "web")]);
    assert_eq!(values(&families, "xdp_lb_service_new_flows").get(&web), Some(&10.0));
    assert_eq!(values(&families, "xdp_lb_service_bytes").get(&web), Some(&10_000.0));
    assert_eq!(values(&families, "xdp_lb_service_all_backends_down").get(&web), Some(&1.0));
    assert_eq!(values(&families, "xdp_lb_service_serving_backends").get(&labels(&[("service", AWKWARD[2])])), Some(&3.0));
    assert_eq!(values(&families, "xdp_lb_service_ring_info").get(&labels(&[("service", "web"), ("fingerprint", "00abcdef01234567")])), Some(&1.0));
    let local = values(&families, "xdp_lb_health_check_local_errors");
    assert_eq!(local.get(&labels(&[("reason", "process_fd_limit")])), Some(&7.0));
    assert_eq!(local.get(&labels(&[("reason", "no_local_address")])), Some(&0.0));
}

#[test]
fn a_removed_service_disappears_from_the_next_scrape() {
    let mut scrape = scrape();
    let before = exposition(&scrape);
    assert!(before.contains("service=\"web\""));
    scrape.stats.services.retain(|s| s.name != "web");
    scrape.services.retain(|s| s.name != "web");
    scrape.backends.retain(|b| b.service != "web");
    scrape.rings.retain(|(s, _)| s != "web");
    scrape.ring_errors.retain(|(s, _)| s != "web");
    let after = exposition(&scrape);
    assert!(!after.contains("service=\"web\""), "{after}");
}
