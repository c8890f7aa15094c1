//! From the desired configuration and what the daemon has observed (health checks, passive checks,
//! drain timers, latencies) to the effective services the data plane gets: which backends are in
//! each ring with what weight, and which are marked down so their flows move.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
};

use crate::{
    config::{AllDown, Backend, Config, Scheduler, Service},
    health::{CheckSpec, Health, Status, Target},
};

/// A backend as the daemon tracks it: its service's name and its address.
pub type BackendKey = (String, SocketAddr);

/// What the daemon has observed, as input to [`plan`].
#[derive(Default)]
pub struct Observed<'a> {
    pub health: Option<&'a BTreeMap<Target, Status>>,
    /// Backends the passive checks caught ignoring SYNs.
    pub passive_down: Option<&'a HashSet<BackendKey>>,
    /// Drained backends whose drain timeout has passed.
    pub drain_expired: Option<&'a HashSet<BackendKey>>,
    /// Latency-derived weights for least-response-time services.
    pub latency_weights: Option<&'a HashMap<BackendKey, u32>>,
}

/// One service's outcome, for status and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    pub name: String,
    /// Backends in the ring.
    pub serving: usize,
    /// Backups serving because no primary is healthy.
    pub on_backups: bool,
    /// No backend is healthy; the all-down policy applies.
    pub all_down: bool,
}

/// The health-check target of a backend, if it is checked.
pub fn probe_target(service: &Service, backend: &Backend) -> Option<(Target, CheckSpec)> {
    let check = backend.health_check.as_ref()?;
    let addr = SocketAddr::new(backend.address.ip(), check.port.unwrap_or(backend.address.port()));
    Some((Target { service: service.name.clone(), addr }, check.spec.clone()))
}

pub fn plan(config: &Config, observed: &Observed<'_>) -> (Config, Vec<ServiceHealth>) {
    let mut effective = config.clone();
    let mut report = Vec::new();
    for service in &mut effective.services {
        let key = |b: &Backend| (service.name.clone(), b.address);
        let healthy: Vec<bool> = service
            .backends
            .iter()
            .map(|b| {
                let checked_down = probe_target(service, b)
                    .and_then(|(t, _)| observed.health.and_then(|h| h.get(&t)))
                    .is_some_and(|s| s.health == Health::Down);
                let passive_down = observed.passive_down.is_some_and(|p| p.contains(&key(b)));
                !checked_down && !passive_down
            })
            .collect();
        let eligible = |i: usize, backup: bool| {
            let b = &service.backends[i];
            healthy[i] && !b.drained && b.weight > 0 && b.backup == backup
        };
        let n = service.backends.len();
        let primaries: Vec<usize> = (0..n).filter(|&i| eligible(i, false)).collect();
        let backups: Vec<usize> = (0..n).filter(|&i| eligible(i, true)).collect();
        let all_down = primaries.is_empty() && backups.is_empty();
        let fail_open = all_down && service.all_down == AllDown::FailOpen;
        let serving: Vec<usize> = if !primaries.is_empty() {
            primaries
        } else if !backups.is_empty() {
            backups.clone()
        } else if fail_open {
            (0..n).filter(|&i| !service.backends[i].backup && !service.backends[i].drained && service.backends[i].weight > 0).collect()
        } else {
            Vec::new()
        };
        report.push(ServiceHealth {
            name: service.name.clone(),
            serving: serving.len(),
            on_backups: !backups.is_empty() && serving == backups,
            all_down,
        });
        let lrt = service.scheduler == Scheduler::LeastResponseTime;
        let name = service.name.clone();
        for (i, b) in service.backends.iter_mut().enumerate() {
            let k = (name.clone(), b.address);
            let expired = observed.drain_expired.is_some_and(|d| d.contains(&k));
            b.down = (!healthy[i] && !fail_open) || (b.drained && expired);
            b.weight = if !serving.contains(&i) {
                0
            } else if lrt {
                observed.latency_weights.and_then(|w| w.get(&k)).copied().unwrap_or(b.weight)
            } else {
                b.weight
            };
        }
    }
    (effective, report)
}

/// Least-response-time weights: each backend's configured weight scaled by how much faster than
/// the slowest backend it answers its health checks, so traffic shifts toward fast backends without
/// starving slow ones. Latencies are the checks' EWMAs, already smoothed; [`latency`] decides when
/// a difference is real enough to act on.
pub fn latency_weights(base: u32, latency_us: f64, slowest_us: f64) -> u32 {
    if latency_us <= 0.0 || slowest_us <= 0.0 {
        return base;
    }
    let scale = (slowest_us / latency_us).clamp(1.0, 100.0);
    ((base as f64) * scale).round().clamp(1.0, 65_535.0) as u32
}

pub mod latency;

#[cfg(test)]
mod tests;
