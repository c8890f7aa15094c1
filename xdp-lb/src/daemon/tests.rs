use std::time::Duration;

use super::{differences, share_differences};
use crate::config::{AllDown, Backend, Config, Dataplane, Mode, Protocol, Scheduler, Service};

fn service(name: &str, vip: &str, backends: &[&str]) -> Service {
    Service {
        name: name.into(),
        vip: vip.parse().unwrap(),
        protocol: Protocol::Tcp,
        mode: Mode::Nat,
        scheduler: Scheduler::Maglev,
        ring_size: 251,
        all_down: AllDown::Drop,
        drain_timeout: Duration::ZERO,
        passive_checks: false,
        backends: backends
            .iter()
            .map(|a| Backend { address: a.parse().unwrap(), weight: 1, backup: false, drained: false, health_check: None, down: false })
            .collect(),
    }
}

fn config(services: Vec<Service>) -> Config {
    Config { dataplane: Dataplane { conntrack_entries: 1024, maglev_cells: 1024, hash_seed: 0 }, services, announce: None }
}

#[test]
fn equal_states_have_no_differences() {
    let web = service("web", "10.0.0.1:80", &["10.0.1.1:80"]);
    assert!(differences(&[&web], &config(vec![web.clone()])).is_empty());
}

#[test]
fn every_difference_is_listed() {
    let running_web = service("web", "10.0.0.1:80", &["10.0.1.1:80", "10.0.1.2:80"]);
    let running_old = service("adopted-3", "10.0.0.9:80", &["10.0.9.1:80"]);
    let wanted = config(vec![service("web", "10.0.0.1:80", &["10.0.1.2:80", "10.0.1.3:80"]), service("api", "10.0.0.2:80", &[])]);
    let d = differences(&[&running_web, &running_old], &wanted);
    let all = d.join("\n");
    assert_eq!(d.len(), 4, "{all}");
    assert!(all.contains("10.0.0.9:80/tcp runs with 1 backend(s) but is not in the config"), "{all}");
    assert!(all.contains("backend 10.0.1.1:80 runs but is not in the config"), "{all}");
    assert!(all.contains("backend 10.0.1.3:80 is in the config but did not run"), "{all}");
    assert!(all.contains("service api (10.0.0.2:80/tcp) is in the config but did not run"), "{all}");
}

/// Weights, drains and backups changed while no daemon ran show in the adopted rings' shares.
#[test]
fn weight_and_drain_changes_show_in_the_ring_shares() {
    let (a, b, c) = ("10.0.1.1:80".parse().unwrap(), "10.0.1.2:80".parse().unwrap(), "10.0.1.3:80".parse().unwrap());
    let running = service("web", "10.0.0.1:80", &["10.0.1.1:80", "10.0.1.2:80", "10.0.1.3:80"]);
    // Ran: a and b half each, c drained (no cells).
    let cells: std::collections::BTreeMap<std::net::SocketAddr, usize> = [(a, 125), (b, 126), (c, 0)].into();
    let same = config(vec![{
        let mut s = running.clone();
        s.backends[2].drained = true;
        s
    }]);
    assert!(share_differences(&[(&running, cells.clone())], &same).is_empty(), "{:?}", share_differences(&[(&running, cells.clone())], &same));

    let mut edited = running.clone();
    edited.backends[0].weight = 3; // a: 50% ran, 3 of 3 + 1 (c) wanted
    edited.backends[1].drained = true; // b: ran, now drained
    let d = share_differences(&[(&running, cells)], &config(vec![edited]));
    let all = d.join("\n");
    assert_eq!(d.len(), 3, "{all}");
    assert!(all.contains("backend 10.0.1.1:80 got about 50% of new flows, the config's weight 3 gives it 75%"), "{all}");
    assert!(all.contains("backend 10.0.1.2:80 took new flows (50% of the ring) but is drained in the config"), "{all}");
    assert!(all.contains("backend 10.0.1.3:80 took no new flows"), "{all}");
}

/// H11: a drain the file says began 3 s before the daemon read it has 3 s behind it already.
#[test]
fn a_drain_start_from_the_file_counts_the_time_before_the_restart() {
    let now = std::time::Instant::now();
    let wall = std::time::SystemTime::now();
    let three = std::time::Duration::from_secs(3);
    let started = super::DrainStart::new(Some(wall - three), wall, now);
    assert_eq!(started.elapsed(now), three);
    assert_eq!(started.elapsed(now + three), 2 * three);
    // Unknown (a hand-written drain) or in the future (the clock was stepped back): from now.
    assert_eq!(super::DrainStart::new(None, wall, now).elapsed(now), std::time::Duration::ZERO);
    assert_eq!(super::DrainStart::new(Some(wall + three), wall, now).elapsed(now), std::time::Duration::ZERO);
}

#[test]
fn drained_since_is_read_from_the_file_and_checked() {
    let text = |backend: &str| {
        format!("[[services]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nprotocol = \"tcp\"\n[[services.backends]]\naddress = \"10.1.0.2:80\"\n{backend}\n")
    };
    let raw: crate::config::RawConfig = toml::from_str(&text("drained = true\ndrained_since = \"2026-12-02T07:30:00Z\"")).unwrap();
    let since = super::drain_since_of(&raw);
    let key = ("web".to_string(), "10.1.0.2:80".parse().unwrap());
    assert_eq!(since.get(&key), Some(&humantime::parse_rfc3339("2026-12-02T07:30:00Z").unwrap()));
    let refused = |backend: &str| Config::parse(&text(backend), "xdp-lb.toml").unwrap_err().to_string();
    let e = refused("drained_since = \"2026-12-02T07:30:00Z\"");
    assert!(e.contains("services[0].backends[0].drained_since") && e.contains("drained is not"), "{e}");
    let e = refused("drained = true\ndrained_since = \"yesterday\"");
    assert!(e.contains("drained_since") && e.contains("RFC 3339"), "{e}");
    // J6: a valid RFC 3339 time with an offset is refused for what it is (not UTC), and an
    // unquoted TOML datetime is read like the quoted one (it was "invalid type: map").
    let e = refused("drained = true\ndrained_since = \"2026-12-02T08:00:00+14:00\"");
    assert!(e.contains("drained_since") && e.contains("ending in Z"), "{e}");
    let raw: crate::config::RawConfig = toml::from_str(&text("drained = true\ndrained_since = 2026-12-02T07:30:00Z")).unwrap();
    assert_eq!(super::drain_since_of(&raw).get(&key), Some(&humantime::parse_rfc3339("2026-12-02T07:30:00Z").unwrap()));
    let e = refused("drained = true\ndrained_since = 7");
    assert!(e.contains("drained_since") && e.contains("expected a time like"), "{e}");
}
