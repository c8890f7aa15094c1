//! What the page shows: one [`View`] per update, joined from the daemon's `status` and `stats`
//! replies (the same data the CLI prints) and the event log, with rates over the time between two
//! stats replies. Plain data and pure functions, tested without a daemon.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::events::Event;
use crate::{
    api::{BackendStatus, StatsReply, StatusReply},
    config::Scheduler,
};

/// Newest events sent with each update.
pub const EVENTS_SHOWN: usize = 100;

/// What the control loop reads for one update.
#[derive(Debug)]
pub struct Probe {
    pub status: StatusReply,
    pub stats: StatsReply,
    pub events: Vec<Event>,
}

/// Whether the page may change anything, and how (see `http::Access`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Changes {
    /// A loopback listener: changes are allowed from the page as it is.
    Allowed,
    /// Another listener with a token: changes need it.
    NeedToken,
    /// Another listener without a token: read-only.
    ReadOnly,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct View {
    pub unix_ms: u64,
    /// Seconds the rates cover; `None` on the first update (no rates yet).
    pub interval_s: Option<f64>,
    pub changes: Changes,
    pub config_path: String,
    pub config_changed_on_disk: bool,
    /// Why the last reload rejected the edit on disk (hostile 9 H6): "reload first" would not help.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_rejected_edit: Option<String>,
    /// Every scheduler a service may be switched to.
    pub schedulers: Vec<String>,
    pub services: Vec<ServiceView>,
    pub reasons: Vec<ReasonView>,
    /// Newest first.
    pub events: Vec<Event>,
    /// The l7-sidecar replicas of `--gateway-admin` (empty without), as last polled.
    #[serde(default)]
    pub gateways: Vec<super::gateway::GatewayView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub mode: String,
    pub scheduler: String,
    /// "ok", "on-backups" or "all-down".
    pub state: String,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub packets_per_s: Option<f64>,
    pub new_flows_per_s: Option<f64>,
    /// Sum over the backends that report them.
    pub active_flows: Option<u64>,
    pub backends: Vec<BackendView>,
}

/// One backend row: its `status` as the CLI gets it (flattened: the page reads `address`,
/// `health`, `drained`, ... at the top level, so a field added to the API reaches the page
/// without a second definition here), and its counters and rates.
#[derive(Debug, Serialize, Deserialize)]
pub struct BackendView {
    #[serde(flatten)]
    pub status: BackendStatus,
    pub packets: u64,
    pub new_flows: u64,
    pub packets_per_s: Option<f64>,
    pub new_flows_per_s: Option<f64>,
    /// This backend's part of the service's new flows over the interval (0–1).
    pub new_flow_share: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ReasonView {
    pub reason: String,
    pub packets: u64,
    pub per_s: Option<f64>,
}

/// Every scheduler name, as `service update --scheduler` takes them.
pub fn scheduler_names() -> Vec<String> {
    Scheduler::NAMES.split(", ").map(str::to_owned).collect()
}

/// Joins `probe` into a view; rates come from `previous`, the stats reply of the last update.
pub fn build(probe: &Probe, previous: Option<&StatsReply>, changes: Changes) -> View {
    let now = &probe.stats;
    let secs = previous.map(|p| (now.unix_ms.saturating_sub(p.unix_ms) as f64 / 1000.0).max(0.001));
    let rate = |before: Option<u64>, after: u64| -> Option<f64> { Some(after.saturating_sub(before?) as f64 / secs?) };
    let mut services = Vec::new();
    for status in &probe.status.services {
        let counters = now.snapshot.services.iter().find(|s| s.name == status.name);
        let before = previous.and_then(|p| p.snapshot.services.iter().find(|s| s.name == status.name));
        let mut backends: Vec<BackendView> = status
            .backends
            .iter()
            .map(|b| {
                let c = counters.and_then(|s| s.backends.iter().find(|x| x.address == b.address));
                let c0 = before.and_then(|s| s.backends.iter().find(|x| x.address == b.address));
                let (packets, new_flows) = c.map_or((0, 0), |c| (c.packets, c.new_flows));
                BackendView {
                    status: b.clone(),
                    packets,
                    new_flows,
                    packets_per_s: rate(c0.map(|c| c.packets), packets),
                    new_flows_per_s: rate(c0.map(|c| c.new_flows), new_flows),
                    new_flow_share: None,
                }
            })
            .collect();
        let new_flows_per_s: Option<f64> = backends.iter().map(|b| b.new_flows_per_s).sum();
        for b in &mut backends {
            b.new_flow_share = match (b.new_flows_per_s, new_flows_per_s) {
                (Some(mine), Some(all)) if all > 0.0 => Some(mine / all),
                _ => None,
            };
        }
        let active: Vec<u64> = backends.iter().filter_map(|b| b.status.active_flows).collect();
        services.push(ServiceView {
            name: status.name.clone(),
            vip: status.vip.clone(),
            protocol: status.protocol.clone(),
            mode: status.mode.clone(),
            scheduler: status.scheduler.clone(),
            state: status.state.clone(),
            packets: counters.map_or(0, |c| c.packets),
            bytes: counters.map_or(0, |c| c.bytes),
            new_flows: counters.map_or(0, |c| c.new_flows),
            packets_per_s: counters.and_then(|c| rate(before.map(|b| b.packets), c.packets)),
            new_flows_per_s: counters.and_then(|c| rate(before.map(|b| b.new_flows), c.new_flows)),
            active_flows: (!active.is_empty()).then(|| active.iter().sum()),
            backends,
        });
    }
    let reasons_before: BTreeMap<&String, u64> =
        previous.map(|p| p.snapshot.reasons.iter().map(|(k, v)| (k, *v)).collect()).unwrap_or_default();
    let reasons = now
        .snapshot
        .reasons
        .iter()
        .map(|(reason, &packets)| ReasonView { reason: reason.clone(), packets, per_s: rate(reasons_before.get(reason).copied(), packets) })
        .collect();
    View {
        unix_ms: now.unix_ms,
        interval_s: secs,
        changes,
        config_path: probe.status.config.path.clone(),
        config_changed_on_disk: probe.status.config.changed_on_disk,
        config_rejected_edit: probe.status.config.rejected_edit.clone(),
        schedulers: scheduler_names(),
        services,
        reasons,
        events: probe.events.iter().take(EVENTS_SHOWN).cloned().collect(),
        gateways: vec![],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        api::{ConfigStatus, ServiceStatus},
        stats::{BackendStats, ServiceStats, Snapshot},
    };

    fn backend_status(address: &str) -> BackendStatus {
        BackendStatus {
            address: address.into(),
            weight: 1,
            effective_weight: 1,
            backup: false,
            drained: false,
            health: "up".into(),
            down: false,
            passive_down: false,
            active_flows: Some(2),
            last_check: Some("ok".into()),
            check_latency_us: Some(150),
        }
    }

    fn stats(unix_ms: u64, per_backend: &[(u64, u64)], not_vip: u64) -> StatsReply {
        let backends: Vec<BackendStats> = per_backend
            .iter()
            .enumerate()
            .map(|(i, &(packets, new_flows))| BackendStats {
                address: format!("10.0.0.{}:80", i + 1),
                weight: 1,
                packets,
                bytes: packets * 100,
                new_flows,
                syns: 0,
                syn_acks: 0,
                resets: 0,
            })
            .collect();
        StatsReply {
            unix_ms,
            snapshot: Snapshot {
                services: vec![ServiceStats {
                    name: "web".into(),
                    vip: "10.0.0.100:80".into(),
                    protocol: "tcp".into(),
                    packets: backends.iter().map(|b| b.packets).sum(),
                    bytes: backends.iter().map(|b| b.bytes).sum(),
                    new_flows: backends.iter().map(|b| b.new_flows).sum(),
                    backends,
                }],
                reasons: [("pass_not_vip".to_string(), not_vip)].into(),
            },
        }
    }

    fn probe(stats: StatsReply) -> Probe {
        Probe {
            status: StatusReply {
                config: ConfigStatus {
                    path: "/etc/xdp-lb.toml".into(),
                    loaded_unix_ms: 0,
                    changed_on_disk: false,
                    disk_error: None,
                    rejected_edit: None,
                    owner_problem: None,
                    services: 1,
                    start_differences: vec![],
                },
                interfaces: vec![],
                services: vec![ServiceStatus {
                    name: "web".into(),
                    vip: "10.0.0.100:80".into(),
                    protocol: "tcp".into(),
                    mode: "nat".into(),
                    scheduler: "maglev".into(),
                    state: "ok".into(),
                    ring_fingerprint: None,
                    ring_error: None,
                    backends: vec![backend_status("10.0.0.1:80"), backend_status("10.0.0.2:80")],
                }],
                announce: None,
            },
            stats,
            events: vec![],
        }
    }

    /// Hostile 9 H6: the page names a rejected edit instead of saying "reload first".
    #[test]
    fn a_rejected_edit_reaches_the_page() {
        let mut p = probe(stats(12_000, &[(300, 40), (150, 15)], 27));
        p.status.config.changed_on_disk = true;
        p.status.config.rejected_edit = Some("unknown field `bogus`".into());
        let view = build(&p, None, Changes::ReadOnly);
        assert_eq!(view.config_rejected_edit.as_deref(), Some("unknown field `bogus`"));
        assert!(serde_json::to_string(&view).unwrap().contains("config_rejected_edit"));
    }

    #[test]
    fn rates_and_shares_over_the_interval() {
        let before = stats(10_000, &[(100, 10), (50, 5)], 7);
        let now = probe(stats(12_000, &[(300, 40), (150, 15)], 27));
        let view = build(&now, Some(&before), Changes::Allowed);
        assert_eq!(view.interval_s, Some(2.0));
        let web = &view.services[0];
        assert_eq!(web.new_flows_per_s, Some(20.0));
        assert_eq!(web.packets_per_s, Some(150.0));
        assert_eq!(web.active_flows, Some(4));
        let b = &web.backends;
        assert_eq!((b[0].packets_per_s, b[0].new_flows_per_s), (Some(100.0), Some(15.0)));
        assert_eq!((b[1].packets_per_s, b[1].new_flows_per_s), (Some(50.0), Some(5.0)));
        assert_eq!((b[0].new_flow_share, b[1].new_flow_share), (Some(0.75), Some(0.25)));
        assert_eq!(view.reasons[0].per_s, Some(10.0));
        assert_eq!(view.reasons[0].packets, 27);
        assert!(view.schedulers.iter().any(|s| s == "round-robin"), "{:?}", view.schedulers);
    }

    /// The page reads a backend's status fields where the CLI's JSON has them: every field of
    /// `BackendStatus`, with its value, is in the backend's row as sent to the page.
    #[test]
    fn a_backend_row_carries_every_status_field_under_its_api_name() {
        let mut status = backend_status("10.0.0.1:80");
        status.drained = true;
        status.passive_down = true;
        let before = stats(10_000, &[(100, 10), (50, 5)], 7);
        let mut now = probe(stats(12_000, &[(300, 40), (150, 15)], 27));
        now.status.services[0].backends[0] = status.clone();
        let view = build(&now, Some(&before), Changes::Allowed);
        let row = serde_json::to_value(&view.services[0].backends[0]).expect("row");
        let api = serde_json::to_value(&status).expect("status");
        for (field, value) in api.as_object().expect("an object") {
            assert_eq!(row.get(field), Some(value), "{field} in {row:#}");
        }
        assert_eq!(row["new_flows_per_s"], 15.0);
        // And back: what the page gets decodes into the same types.
        let back: View = serde_json::from_value(serde_json::to_value(&view).expect("view")).expect("decode");
        assert_eq!(back.services[0].backends[0].status, status);
    }

    #[test]
    fn the_first_update_has_totals_but_no_rates() {
        let view = build(&probe(stats(12_000, &[(300, 40), (150, 15)], 27)), None, Changes::ReadOnly);
        let web = &view.services[0];
        assert_eq!(web.new_flows, 55);
        assert_eq!(web.new_flows_per_s, None);
        assert_eq!(web.backends[0].new_flow_share, None);
        assert_eq!(view.reasons[0].per_s, None);
    }

    #[test]
    fn a_backend_added_since_the_last_update_has_no_rate_yet() {
        let before = stats(10_000, &[(100, 10)], 0);
        let view = build(&probe(stats(11_000, &[(300, 40), (150, 15)], 0)), Some(&before), Changes::Allowed);
        let b = &view.services[0].backends;
        assert_eq!(b[0].new_flows_per_s, Some(30.0));
        assert_eq!(b[1].new_flows_per_s, None);
        assert_eq!(b[1].new_flow_share, None, "no share without every backend's rate");
    }
}
