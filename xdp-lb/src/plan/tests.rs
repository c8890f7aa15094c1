use super::*;
use crate::health::Status;

fn config(extra: &str, backends: &[(&str, &str)]) -> Config {
    let mut text = format!("[[services]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nprotocol = \"tcp\"\nring_size = 251\n{extra}\n");
    for (addr, opts) in backends {
        text += &format!("[[services.backends]]\naddress = \"{addr}\"\n{opts}\n");
    }
    Config::parse(&text, "test").unwrap()
}

fn status(health: Health) -> Status {
    Status {
        health,
        last_ok: None,
        last_error: None,
        last_latency_us: None,
        latency_ewma_us: None,
        consecutive_ok: 0,
        consecutive_fail: 0,
        checked_at_unix_ms: None,
    }
}

fn health(down: &[&str]) -> BTreeMap<Target, Status> {
    down.iter()
        .map(|a| (Target { service: "web".into(), addr: a.parse().unwrap() }, status(Health::Down)))
        .collect()
}

fn weights_and_down(c: &Config) -> Vec<(u32, bool)> {
    c.services[0].backends.iter().map(|b| (b.weight, b.down)).collect()
}

#[test]
fn failed_backend_leaves_the_ring_and_is_marked_down_others_untouched() {
    let c = config("", &[("10.1.0.2:80", "weight = 2"), ("10.1.0.3:80", "weight = 1")]);
    let h = health(&["10.1.0.3:80"]);
    let (eff, report) = plan(&c, &Observed { health: Some(&h), ..Default::default() });
    assert_eq!(weights_and_down(&eff), [(2, false), (0, true)]);
    assert_eq!(report[0].serving, 1);
    assert!(!report[0].all_down);
}

#[test]
fn backups_serve_only_while_no_primary_is_healthy() {
    let c = config("", &[("10.1.0.2:80", ""), ("10.1.0.9:80", "backup = true")]);
    let (eff, _) = plan(&c, &Observed::default());
    assert_eq!(weights_and_down(&eff), [(1, false), (0, false)]);
    let h = health(&["10.1.0.2:80"]);
    let (eff, report) = plan(&c, &Observed { health: Some(&h), ..Default::default() });
    assert_eq!(weights_and_down(&eff), [(0, true), (1, false)]);
    assert!(report[0].on_backups);
}

#[test]
fn all_down_drops_or_fails_open_as_configured() {
    let h = health(&["10.1.0.2:80", "10.1.0.3:80"]);
    let obs = Observed { health: Some(&h), ..Default::default() };
    let drop = config("", &[("10.1.0.2:80", ""), ("10.1.0.3:80", "")]);
    let (eff, report) = plan(&drop, &obs);
    assert_eq!(weights_and_down(&eff), [(0, true), (0, true)]);
    assert!(report[0].all_down);
    let open = config("all_down = \"fail-open\"", &[("10.1.0.2:80", ""), ("10.1.0.3:80", "")]);
    let (eff, report) = plan(&open, &obs);
    assert_eq!(weights_and_down(&eff), [(1, false), (1, false)]);
    assert!(report[0].all_down);
}

#[test]
fn drained_backend_gets_no_new_flows_and_is_cut_off_after_its_timeout() {
    let c = config("", &[("10.1.0.2:80", ""), ("10.1.0.3:80", "drained = true")]);
    let (eff, _) = plan(&c, &Observed::default());
    assert_eq!(weights_and_down(&eff), [(1, false), (0, false)]);
    let expired: HashSet<BackendKey> = [("web".to_string(), "10.1.0.3:80".parse().unwrap())].into();
    let (eff, _) = plan(&c, &Observed { drain_expired: Some(&expired), ..Default::default() });
    assert_eq!(weights_and_down(&eff), [(1, false), (0, true)]);
}

#[test]
fn passive_failures_count_like_failed_checks() {
    let c = config("", &[("10.1.0.2:80", ""), ("10.1.0.3:80", "")]);
    let passive: HashSet<BackendKey> = [("web".to_string(), "10.1.0.2:80".parse().unwrap())].into();
    let (eff, _) = plan(&c, &Observed { passive_down: Some(&passive), ..Default::default() });
    assert_eq!(weights_and_down(&eff), [(0, true), (1, false)]);
}

#[test]
fn checks_on_another_port_are_keyed_by_that_port() {
    let c = config("[services.health_check]\nkind = \"http\"\nport = 8081\npath = \"/healthz\"", &[("10.1.0.2:80", "")]);
    let (target, spec) = probe_target(&c.services[0], &c.services[0].backends[0]).unwrap();
    assert_eq!(target.addr, "10.1.0.2:8081".parse().unwrap());
    assert!(matches!(spec.kind, crate::health::CheckKind::Http { ref path, .. } if path == "/healthz"));
}

#[test]
fn latency_weights_favour_fast_backends_within_bounds() {
    assert_eq!(latency_weights(1, 1_000.0, 1_000.0), 1);
    assert_eq!(latency_weights(1, 250.0, 1_000.0), 4);
    assert_eq!(latency_weights(3, 1.0, 1_000_000.0), 300, "scale capped at 100×");
    assert_eq!(latency_weights(5, 0.0, 10.0), 5, "no measurement: configured weight");
}
