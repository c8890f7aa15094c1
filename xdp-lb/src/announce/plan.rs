//! Which VIP addresses this node should announce: a pure function of the services, their health,
//! the node's state and what is announced now, so every rule is unit-tested without netlink or
//! BIRD.
//!
//! Announcing is asymmetric on purpose. A VIP that is not announced starts only on evidence
//! (a backend a health check confirmed up, an unchecked backend, or a fail-open service): a
//! backend nobody has checked yet (`Unknown`) must not attract this node's ECMP share. A VIP that
//! is announced (including a route a previous daemon left, adopted after a restart) goes only on a
//! confirmed all-down, so a restart does not flap routes that are still wanted.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

/// What the announcement of one service depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceView {
    pub name: String,
    pub vip: IpAddr,
    /// Installed in the data plane's maps.
    pub programmed: bool,
    /// Backends in its ring now (under `all_down = "fail-open"` that counts the failed-open ones).
    /// A backend whose health is still unknown counts.
    pub serving: usize,
    /// Of those, the ones known to work: confirmed up by their health check, unchecked
    /// (check kind `none`), or failed open.
    pub confirmed: usize,
    /// Backends the configuration lets serve at all (not drained, weight above 0).
    pub usable: usize,
}

/// The node-wide conditions of announcing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Node {
    /// `xdp-lb node drain`.
    pub drained: bool,
    /// Why the XDP program is not attached where it should be (`None`: attached everywhere).
    pub not_attached: Option<String>,
    /// The kernel forwards this family (`net.ipv4.conf.all.forwarding`): without it the FIB
    /// refuses to forward and VIP traffic of that family goes to the node's own kernel.
    pub ipv4_forwarding: bool,
    /// `net.ipv6.conf.all.forwarding`, same meaning.
    pub ipv6_forwarding: bool,
}

impl Node {
    /// Attached, not drained, forwarding both families.
    pub fn ready() -> Node {
        Node { drained: false, not_attached: None, ipv4_forwarding: true, ipv6_forwarding: true }
    }
}

/// Why a VIP is not announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Withdrawn {
    /// `xdp-lb node drain`: every VIP is withdrawn.
    NodeDrained,
    /// The XDP program is not (yet, or no longer) attached; the reason says where.
    NotAttached(String),
    /// The node does not forward this address family (the sysctl named).
    ForwardingOff(&'static str),
    /// No service on the address qualifies; each is listed under its reason.
    Services { all_down: Vec<String>, not_programmed: Vec<String>, no_usable: Vec<String>, unconfirmed: Vec<String> },
    /// The route could not be added (the kernel's answer, or a foreign route in the table).
    RouteFailed(String),
}

impl fmt::Display for Withdrawn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Withdrawn::NodeDrained => f.write_str("node drained"),
            Withdrawn::NotAttached(why) if why.is_empty() => f.write_str("XDP program not attached"),
            Withdrawn::NotAttached(why) => write!(f, "XDP program not attached: {why}"),
            Withdrawn::ForwardingOff(sysctl) => write!(f, "this node does not forward the VIP's address family ({sysctl} = 0)"),
            Withdrawn::Services { all_down, not_programmed, no_usable, unconfirmed } => {
                let mut parts = Vec::new();
                if !all_down.is_empty() {
                    parts.push(format!("all backends down (service {})", all_down.join(", ")));
                }
                if !no_usable.is_empty() {
                    parts.push(format!("no backend may serve: all drained or weight 0 (service {})", no_usable.join(", ")));
                }
                if !unconfirmed.is_empty() {
                    parts.push(format!("no backend confirmed up by a health check yet (service {})", unconfirmed.join(", ")));
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
/// XDP program is attached, the node is not drained and forwards the address's family, and a
/// service on it is programmed and qualifies (several services on one address: any one of them is
/// enough, since the route carries the address, not a port). `announced` holds the addresses
/// whose routes are in the table now: those stay while a service has a serving backend (even one
/// not checked yet); the others need a confirmed one (see the module comment).
pub fn desired(services: &[ServiceView], node: &Node, announced: &BTreeSet<IpAddr>) -> Vec<VipPlan> {
    let mut by_vip: BTreeMap<IpAddr, Vec<&ServiceView>> = BTreeMap::new();
    for s in services {
        by_vip.entry(s.vip).or_default().push(s);
    }
    by_vip
        .into_iter()
        .map(|(vip, services)| {
            let forwarding_off = match vip {
                IpAddr::V4(_) if !node.ipv4_forwarding => Some("net.ipv4.conf.all.forwarding"),
                IpAddr::V6(_) if !node.ipv6_forwarding => Some("net.ipv6.conf.all.forwarding"),
                _ => None,
            };
            let is_on = announced.contains(&vip);
            let qualifies = |s: &ServiceView| s.programmed && if is_on { s.serving > 0 } else { s.confirmed > 0 };
            let withdrawn = if node.drained {
                Some(Withdrawn::NodeDrained)
            } else if let Some(why) = &node.not_attached {
                Some(Withdrawn::NotAttached(why.clone()))
            } else if let Some(sysctl) = forwarding_off {
                Some(Withdrawn::ForwardingOff(sysctl))
            } else if services.iter().any(|s| qualifies(s)) {
                None
            } else {
                let names = |pick: &dyn Fn(&ServiceView) -> bool| services.iter().filter(|s| pick(s)).map(|s| s.name.clone()).collect();
                Some(Withdrawn::Services {
                    not_programmed: names(&|s| !s.programmed),
                    no_usable: names(&|s| s.programmed && s.usable == 0),
                    all_down: names(&|s| s.programmed && s.usable > 0 && s.serving == 0),
                    unconfirmed: names(&|s| s.programmed && s.serving > 0),
                })
            };
            VipPlan { vip, withdrawn }
        })
        .collect()
}
