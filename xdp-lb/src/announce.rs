//! VIP announcements through a BGP daemon on the node (BIRD): the daemon keeps one blackhole host
//! route per announced VIP address in a routing table of its own (`[announce] table`), marked with
//! protocol [`ROUTE_PROTO`]; BIRD's kernel protocol learns that table and exports the routes over
//! BGP. No `ip rule` may point at the table (checked at start and reload), so the routes never
//! change this node's forwarding; they show in `ip route show table N` and survive BIRD restarts
//! (BIRD re-learns them). One daemon per table and network namespace ([`TableLock`]).
//!
//! The daemon touches only routes of its own protocol in that table. A crash leaves them (the
//! pinned data plane keeps forwarding, but nothing health-checks until a daemon runs again);
//! `xdp-lb stop` removes them; if the node dies, BFD withdraws the BGP session and so the routes.

mod lock;
pub(crate) mod netlink;
pub mod plan;
#[cfg(test)]
mod tests;

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

pub use lock::{LockError, TableLock};
pub use netlink::{Netlink, NetlinkError, Route};
pub use plan::{desired, Node, ServiceView, VipPlan, Withdrawn};

use crate::config::Announce;

/// `rtm_protocol` of the daemon's routes (`ip route ... proto 247`). Not assigned in
/// `/etc/iproute2/rt_protos`; BIRD learns routes of any protocol but its own as "alien" routes.
pub const ROUTE_PROTO: u8 = 247;

/// The announcement state for `status` (and the metrics).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnnounceStatus {
    pub table: u32,
    pub node_drained: bool,
    pub vips: Vec<VipStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipStatus {
    pub vip: String,
    /// Its route is in the table (so BIRD announces it).
    pub announced: bool,
    /// Why it is withdrawn (`None` while announced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Refuses a `table` that an `ip rule` looks up: the VIP blackhole routes would then drop this
/// node's own traffic to the VIPs (issue 11 F8). Checked at start and reload.
pub fn check_no_rule_looks_up(table: u32) -> Result<(), RuleError> {
    let rules = Netlink::open().and_then(|mut nl| nl.rules_looking_up(table)).map_err(|source| RuleError::Listing { table, source })?;
    if rules.is_empty() {
        Ok(())
    } else {
        Err(RuleError::LooksUp { table, rules })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error(
        "[announce] table {table} is looked up by `ip rule` {}: its blackhole VIP routes would drop this node's own \
         traffic to the VIPs; give [announce] a table no rule looks up, or remove the rule",
        rules.join(", ")
    )]
    LooksUp { table: u32, rules: Vec<String> },
    #[error("[announce] table {table}: checking that no `ip rule` looks it up: {source}")]
    Listing { table: u32, source: NetlinkError },
}

/// Keeps the announce table equal to the desired announcements.
#[derive(Default)]
pub struct Announcer {
    netlink: Option<Netlink>,
    /// Set once the XDP program is attached; until then the table is left as it is (a restarted
    /// daemon must not withdraw what its predecessor announced while it loads).
    attached: bool,
    /// The table whose routes were last reconciled (to clean it up when `[announce]` moves or goes).
    table: Option<u32>,
    status: Option<AnnounceStatus>,
    /// The last failure logged, so a persistent one is logged once, not every tick.
    last_error: Option<String>,
    /// Set while an attached interface is gone or lost the program (see [`Self::set_not_attached`]).
    not_attached: Option<String>,
}

impl Announcer {
    /// The XDP program is attached: from now on the table follows the desired state.
    pub fn set_attached(&mut self) {
        self.attached = true;
    }

    pub fn status(&self) -> Option<&AnnounceStatus> {
        self.status.as_ref()
    }

    /// Makes the table hold exactly the routes of the VIPs that qualify: removes this daemon's
    /// other routes (stale ones from before a restart included), adds the missing ones. Routes of
    /// other protocols are never touched. Failures are logged and shown in the status; the next
    /// call tries again.
    pub fn reconcile(&mut self, announce: Option<Announce>, services: &[ServiceView]) {
        if !self.attached {
            let loading = Node { not_attached: Some(String::new()), ..Node::ready() };
            self.status = announce.map(|a| {
                self.status_of(a, &desired(services, &Node { drained: a.drained, ..loading }, &BTreeSet::new()), &BTreeSet::new())
            });
            return;
        }
        if let Some(old) = self.table.filter(|t| announce.is_none_or(|a| a.table != *t)) {
            info!(table = old, "announcements moved or turned off: withdrawing every VIP from the old table");
            self.withdraw_table(old);
            self.table = None;
        }
        let Some(announce) = announce else {
            self.status = None;
            return;
        };
        self.table = Some(announce.table);
        let node = Node {
            drained: announce.drained,
            not_attached: self.not_attached.clone(),
            ipv4_forwarding: forwarding("/proc/sys/net/ipv4/conf/all/forwarding"),
            ipv6_forwarding: forwarding("/proc/sys/net/ipv6/conf/all/forwarding"),
        };
        let result = self.present(announce.table).and_then(|present| {
            // What is in the table now (ours, adopted after a restart included) decides which
            // VIPs merely stay and which must qualify afresh.
            let on: BTreeSet<IpAddr> = present.iter().filter(|r| is_host_route(r) && r.kind == netlink::RTN_BLACKHOLE).map(|r| r.dst).collect();
            let mut plans = desired(services, &node, &on);
            let installed = self.apply(announce.table, &mut plans, &present)?;
            Ok((plans, installed))
        });
        let (plans, installed) = match result {
            Ok(done) => {
                self.last_error = None;
                done
            }
            Err(e) => {
                self.note_error(format!("announce table {}: {e}", announce.table));
                // Unknown: show what was meant, and the failure, rather than guess.
                let mut plans = desired(services, &node, &BTreeSet::new());
                for p in plans.iter_mut().filter(|p| p.withdrawn.is_none()) {
                    p.withdrawn = Some(Withdrawn::RouteFailed(e.to_string()));
                }
                (plans, BTreeSet::new())
            }
        };
        let status = self.status_of(announce, &plans, &installed);
        if let Some(before) = &self.status {
            log_changes(before, &status);
        } else {
            for v in &status.vips {
                info!(vip = %v.vip, announced = v.announced, reason = v.reason.as_deref().unwrap_or(""), table = announce.table, "VIP announcement");
            }
        }
        self.status = Some(status);
    }

    /// Marks the node as not attached (an interface the program was attached to is gone or was
    /// re-created without it): every VIP is withdrawn, with `why` as the reason. `None` clears it.
    pub fn set_not_attached(&mut self, why: Option<String>) {
        self.not_attached = why;
    }

    fn present(&mut self, table: u32) -> Result<Vec<Route>, NetlinkError> {
        self.netlink()?.routes(table, ROUTE_PROTO)
    }

    /// Removes every route of this daemon from the table (`xdp-lb stop`, with or without
    /// `--detach`: the node is leaving or its daemon is going away on purpose).
    pub fn withdraw_all(&mut self) {
        if let Some(table) = self.table.take() {
            let removed = self.withdraw_table(table);
            info!(table, routes = removed, "withdrew every VIP announcement");
        }
        self.status = None;
    }

    fn withdraw_table(&mut self, table: u32) -> usize {
        let result = self.netlink().and_then(|nl| {
            let routes = nl.routes(table, ROUTE_PROTO)?;
            for r in &routes {
                nl.delete(table, ROUTE_PROTO, r)?;
            }
            Ok(routes.len())
        });
        result.unwrap_or_else(|e| {
            error!(table, "withdrawing the VIP routes failed: {e}; remove them with `ip route flush table {table} proto {ROUTE_PROTO}`");
            0
        })
    }

    /// Brings the table to `plans`; a route that cannot be added is marked in its plan. Returns the
    /// addresses whose routes are in the table afterwards.
    fn apply(&mut self, table: u32, plans: &mut [VipPlan], present: &[Route]) -> Result<BTreeSet<IpAddr>, NetlinkError> {
        let nl = self.netlink()?;
        let wanted: BTreeSet<IpAddr> = plans.iter().filter(|p| p.withdrawn.is_none()).map(|p| p.vip).collect();
        let mut installed = BTreeSet::new();
        for r in present {
            if is_host_route(r) && wanted.contains(&r.dst) && r.kind == netlink::RTN_BLACKHOLE {
                installed.insert(r.dst);
            } else {
                nl.delete(table, ROUTE_PROTO, r)?;
            }
        }
        let present: BTreeSet<IpAddr> = installed.clone();
        for p in plans.iter_mut().filter(|p| p.withdrawn.is_none() && !present.contains(&p.vip)) {
            match nl.add(table, ROUTE_PROTO, p.vip) {
                Ok(()) => {
                    installed.insert(p.vip);
                }
                Err(e) if e.errno() == Some(libc::EEXIST) => {
                    p.withdrawn = Some(Withdrawn::RouteFailed(format!(
                        "table {table} already has a route to {} of another protocol; xdp-lb never replaces it",
                        p.vip
                    )))
                }
                Err(e) => p.withdrawn = Some(Withdrawn::RouteFailed(e.to_string())),
            }
        }
        Ok(installed)
    }

    fn netlink(&mut self) -> Result<&mut Netlink, NetlinkError> {
        if self.netlink.is_none() {
            self.netlink = Some(Netlink::open()?);
        }
        Ok(self.netlink.as_mut().expect("just opened"))
    }

    fn status_of(&self, announce: Announce, plans: &[VipPlan], installed: &BTreeSet<IpAddr>) -> AnnounceStatus {
        AnnounceStatus {
            table: announce.table,
            node_drained: announce.drained,
            vips: plans
                .iter()
                .map(|p| VipStatus {
                    vip: p.vip.to_string(),
                    announced: p.withdrawn.is_none() && installed.contains(&p.vip),
                    reason: p.withdrawn.as_ref().map(ToString::to_string),
                })
                .collect(),
        }
    }

    fn note_error(&mut self, message: String) {
        if self.last_error.as_deref() != Some(&message) {
            error!("{message}; retrying every tick");
            self.last_error = Some(message);
        }
    }
}

/// A forwarding sysctl of this daemon's network namespace; unreadable counts as on (the kernel
/// without that family has no such file, and then has no VIPs of it either).
fn forwarding(path: &str) -> bool {
    std::fs::read_to_string(path).map_or(true, |v| v.trim() != "0")
}

fn is_host_route(r: &Route) -> bool {
    match r.dst {
        IpAddr::V4(_) => r.prefix_len == 32,
        IpAddr::V6(_) => r.prefix_len == 128,
    }
}

/// One log line per VIP whose announcement changed.
fn log_changes(before: &AnnounceStatus, after: &AnnounceStatus) {
    for v in &after.vips {
        let old = before.vips.iter().find(|o| o.vip == v.vip);
        if old.is_some_and(|o| o.announced == v.announced && o.reason == v.reason) {
            continue;
        }
        if v.announced {
            info!(vip = %v.vip, table = after.table, "VIP announced");
        } else if !old.is_some_and(|o| o.announced) {
            // Never announced (or already withdrawn): a new reason, not a withdrawal.
            info!(vip = %v.vip, reason = v.reason.as_deref().unwrap_or(""), table = after.table, "VIP not announced");
        } else {
            warn!(vip = %v.vip, reason = v.reason.as_deref().unwrap_or(""), table = after.table, "VIP withdrawn");
        }
    }
    for o in before.vips.iter().filter(|o| o.announced && !after.vips.iter().any(|v| v.vip == o.vip)) {
        info!(vip = %o.vip, table = after.table, "VIP withdrawn: no service uses it any more");
    }
}
