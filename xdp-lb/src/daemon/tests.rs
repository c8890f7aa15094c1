use std::time::Duration;

use super::differences;
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
    Config { dataplane: Dataplane { conntrack_entries: 1024, maglev_cells: 1024, hash_seed: 0 }, services }
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
