//! Which VIP addresses this node should announce: a pure function of the services, their health,
//! the node drain and whether the XDP program is attached, so every rule is unit-tested without
//! netlink or BIRD.

use std::{collections::BTreeMap, fmt, net::IpAddr};

/// What the announcement of one service depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    /// Installed in the data plane's maps.
    pub programmed: bool,
    /// Backends in its ring now (under `all_down = "fail-open"` that counts the failed-open ones).
    pub serving: usize,
}

/// Why a VIP is not announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Withdrawn {
    /// `xdp-lb node drain`: every VIP is withdrawn.
    NodeDrained,
    /// The XDP program is not (yet, or no longer) attached.
    NotAttached,
    /// No service on the address qualifies; each is listed under its reason.
    Services { all_down: Vec<String>, not_programmed: Vec<String> },
    /// The route could not be added (the kernel's answer, or a foreign route in the table).
    RouteFailed(String),
}

impl fmt::Display for Withdrawn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Withdrawn::NodeDrained => f.write_str("node drained"),
            Withdrawn::NotAttached => f.write_str("XDP program not attached"),
            Withdrawn::Services { all_down, not_programmed } => {
                let mut parts = Vec::new();
                if !all_down.is_empty() {
                    parts.push(format!("all backends down (service {})", all_down.join(", ")));
                }
                if !not_programmed.is_empty() {
                    parts.push(format!("service not programmed ({})", not_programmed.join(", ")));
                }
                f.write_str(&parts.join("; "))
            }
            Withdrawn::RouteFailed(why) => write!(f, "route not added: {why}"),
        }
    }
}

/// The decision for one VIP address: announced when `withdrawn` is `None`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipPlan {
    pub vip: IpAddr,
    pub withdrawn: Option<Withdrawn>,
}

/// One entry per VIP address of `services`, in address order. An address is announced while the
/// XDP program is attached, the node is not drained, and at least one service on it is programmed
/// and has a serving backend (several services on one address: any one of them is enough, since
/// the route carries the address, not a port).
pub fn desired(services: &[ServiceView], attached: bool, drained: bool) -> Vec<VipPlan> {
    let mut by_vip: BTreeMap<IpAddr, Vec<&ServiceView>> = BTreeMap::new();
    for s in services {
        by_vip.entry(s.vip).or_default().push(s);
    }
    by_vip
        .into_iter()
        .map(|(vip, services)| {
            let withdrawn = if drained {
                Some(Withdrawn::NodeDrained)
            } else if !attached {
                Some(Withdrawn::NotAttached)
            } else if services.iter().any(|s| s.programmed && s.serving > 0) {
                None
            } else {
                let names = |pick: fn(&ServiceView) -> bool| services.iter().filter(|s| pick(s)).map(|s| s.name.clone()).collect();
                Some(Withdrawn::Services { all_down: names(|s| s.programmed), not_programmed: names(|s| !s.programmed) })
            };
            VipPlan { vip, withdrawn }
        })
        .collect()
}
