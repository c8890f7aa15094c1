use super::*;

fn web(mode: &str) -> RawService {
    RawService {
        name: "web".into(),
        vip: "10.0.0.100:80".into(),
        protocol: "tcp".into(),
        mode: mode.into(),
        scheduler: "maglev".into(),
        ring_size: 251,
        all_down: "drop".into(),
        drain_timeout_ms: 1000,
        health_check: None,
        passive_checks: None,
        backends: Vec::new(),
    }
}

#[test]
fn an_update_without_options_is_empty_whatever_force_says() {
    assert!(ServiceChanges::default().is_empty());
    assert!(ServiceChanges { force: true, ..Default::default() }.is_empty());
    assert!(!ServiceChanges { passive_checks: Some(false), ..Default::default() }.is_empty());
    assert!(!ServiceChanges { health_check: Some(RawHealthCheck::default()), ..Default::default() }.is_empty());
}

#[test]
fn vip_protocol_and_dsr_changes_are_disruptive_and_say_why() {
    let nat = web("nat");
    let vip = ServiceChanges { vip: Some("10.0.0.101:80".into()), ..Default::default() };
    let d = vip.disruptions(&nat);
    assert_eq!(d.len(), 1, "{d:?}");
    assert!(d[0].contains("10.0.0.100:80") && d[0].contains("10.0.0.101:80") && d[0].contains("established"), "{d:?}");
    let proto = ServiceChanges { protocol: Some("udp".into()), ..Default::default() };
    assert!(proto.disruptions(&nat)[0].contains("udp"));
    let dsr = ServiceChanges { mode: Some("dsr".into()), ..Default::default() };
    let d = dsr.disruptions(&nat);
    assert!(d.len() == 1 && d[0].contains("loopback"), "{d:?}");
    let all = ServiceChanges { vip: Some("10.0.0.101:80".into()), protocol: Some("udp".into()), mode: Some("dsr".into()), ..Default::default() };
    assert_eq!(all.disruptions(&nat).len(), 3);
}

#[test]
fn changes_that_keep_connections_are_not_disruptive() {
    let nat = web("nat");
    for harmless in [
        ServiceChanges { vip: Some("10.0.0.100:80".into()), ..Default::default() },
        ServiceChanges { protocol: Some("TCP".into()), ..Default::default() },
        ServiceChanges { mode: Some("nat".into()), ..Default::default() },
        ServiceChanges { scheduler: Some("least-conn".into()), ..Default::default() },
    ] {
        assert!(harmless.disruptions(&nat).is_empty(), "{harmless:?}");
    }
    // Already DSR: asking for DSR again breaks nothing; going back to NAT is not refused either.
    let dsr = web("dsr");
    assert!(ServiceChanges { mode: Some("dsr".into()), ..Default::default() }.disruptions(&dsr).is_empty());
    assert!(ServiceChanges { mode: Some("nat".into()), ..Default::default() }.disruptions(&dsr).is_empty());
}

#[test]
fn requests_from_older_clients_without_force_still_parse() {
    let r: Request = serde_json::from_str(r#"{"command":"service-update","name":"web","changes":{"mode":"dsr"}}"#).unwrap();
    let Request::ServiceUpdate { changes, .. } = r else { panic!("{r:?}") };
    assert!(!changes.force);
}

#[test]
fn only_changes_have_an_outcome_to_lose() {
    assert!(Request::ServiceRemove { name: "web".into() }.is_change());
    assert!(Request::Stop { detach: false, pins: None }.is_change());
    assert!(!Request::Status.is_change());
    assert!(!Request::Stats.is_change());
}


#[test]
fn a_stop_from_an_older_client_names_no_pin_directory() {
    let r: Request = serde_json::from_str(r#"{"command":"stop","detach":true}"#).unwrap();
    let Request::Stop { detach, pins } = r else { panic!("{r:?}") };
    assert!(detach && pins.is_none());
}

/// The daemon may see its pin directory under another path than the operator (the units
/// bind-mount it), so the directory's identity decides, not its name.
#[test]
fn a_pin_target_is_its_directory_under_any_name() {
    let base = std::env::temp_dir().join(format!("xdp-lb-pin-target-{}", std::process::id()));
    let (own, other) = (base.join("own"), base.join("other"));
    std::fs::create_dir_all(&own).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    std::os::unix::fs::symlink(&own, base.join("alias")).unwrap();
    let target = PinTarget::of(&base.join("alias"));
    assert!(target.is(&own), "the same directory through another name");
    assert!(!PinTarget::of(&other).is(&own), "another directory");
    assert!(!PinTarget::of(&base.join("missing")).is(&own), "a directory the CLI cannot see is not this one");
    assert!(PinTarget { path: own.clone(), id: None }.is(&own), "unseen by the CLI, but the same path");
    std::fs::remove_dir_all(&base).unwrap();
}
