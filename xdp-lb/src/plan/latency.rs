//! Least-response-time weights with hysteresis.
//!
//! Health-check latencies on a LAN are sub-millisecond and noisy: scaling weights by the raw
//! ratio of EWMAs swung them 1↔11 every second and rebuilt the Maglev ring each time (moving new
//! flows around for nothing). Two rules keep the weights still unless a difference is real:
//!
//! - **Floor**: a backend counts as faster than the slowest one only if it is faster by at least
//!   [`MIN_DIFFERENCE_US`] *and* by [`MIN_RELATIVE`] of the slowest latency. Below that, it gets its
//!   configured weight.
//! - **Persistence**: a new weight (one that differs from the current one by more than
//!   [`MIN_RELATIVE`]) is adopted only after it has been the target for [`PERSIST_TICKS`]
//!   consecutive ticks; one outlier tick resets nothing but does not change anything either.
//!
//! The decision is a pure function of the samples and the previous state, so it is unit-tested
//! with sequences of EWMA values instead of a running daemon.

use std::collections::{BTreeMap, HashMap};

use super::{latency_weights, probe_target, BackendKey};
use crate::{
    config::{Config, Scheduler},
    health::{Status, Target},
};

/// Latency differences below this never change weights: at this scale the check's own jitter
/// (scheduling, the kernel's loopback/veth path) dominates what the backend contributes.
pub const MIN_DIFFERENCE_US: f64 = 1_000.0;
/// A difference must also be this share of the slowest latency, and a weight change this share of
/// the current weight.
pub const MIN_RELATIVE: f64 = 0.25;
/// Consecutive ticks a new weight must be wanted before it is applied (the daemon ticks every
/// 500 ms, so 1.5 s).
pub const PERSIST_TICKS: u32 = 3;

/// One backend's input for a tick: its key, configured weight and latency EWMA in µs.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub key: BackendKey,
    pub base: u32,
    pub latency_us: f64,
}

/// A weight that changed in this tick (for the daemon's log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub key: BackendKey,
    pub weight: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Pending {
    weight: u32,
    ticks: u32,
}

/// The applied latency weights plus the changes waiting to persist.
#[derive(Debug, Default)]
pub struct LatencyWeights {
    applied: HashMap<BackendKey, u32>,
    pending: HashMap<BackendKey, Pending>,
}

impl LatencyWeights {
    /// The weights the planner uses (backends absent here keep their configured weight).
    pub fn weights(&self) -> &HashMap<BackendKey, u32> {
        &self.applied
    }

    /// Feeds one tick of samples, grouped per least-response-time service. Backends absent from
    /// `services` (removed, or without a latency yet) are forgotten. Returns the weights applied
    /// in this tick; the ring needs rebuilding only if it is non-empty.
    pub fn tick(&mut self, services: &[Vec<Sample>]) -> Vec<Change> {
        let present: std::collections::HashSet<&BackendKey> = services.iter().flatten().map(|s| &s.key).collect();
        self.applied.retain(|k, _| present.contains(k));
        self.pending.retain(|k, _| present.contains(k));
        let mut changes = Vec::new();
        for samples in services {
            let slowest = samples.iter().map(|s| s.latency_us).fold(0.0, f64::max);
            for s in samples {
                let wanted = target_weight(s.base, s.latency_us, slowest);
                let current = self.applied.get(&s.key).copied().unwrap_or(s.base);
                if !differs(wanted, current) {
                    self.pending.remove(&s.key);
                    continue;
                }
                let pending = self.pending.entry(s.key.clone()).or_insert(Pending { weight: wanted, ticks: 0 });
                // Still wanting "about the same" new weight counts toward persistence; a target
                // that jumped elsewhere starts over.
                pending.ticks = if differs(wanted, pending.weight) { 1 } else { pending.ticks + 1 };
                pending.weight = wanted;
                if pending.ticks >= PERSIST_TICKS {
                    self.pending.remove(&s.key);
                    if wanted == s.base {
                        self.applied.remove(&s.key);
                    } else {
                        self.applied.insert(s.key.clone(), wanted);
                    }
                    changes.push(Change { key: s.key.clone(), weight: wanted });
                }
            }
        }
        changes
    }
}

/// This tick's samples: per least-response-time service, every backend whose health check has a
/// latency average yet.
pub fn samples(config: &Config, statuses: &BTreeMap<Target, Status>) -> Vec<Vec<Sample>> {
    config
        .services
        .iter()
        .filter(|s| s.scheduler == Scheduler::LeastResponseTime)
        .map(|s| {
            s.backends
                .iter()
                .filter_map(|b| {
                    let (target, _) = probe_target(s, b)?;
                    let latency_us = statuses.get(&target)?.latency_ewma_us?;
                    Some(Sample { key: (s.name.clone(), b.address), base: b.weight, latency_us })
                })
                .collect()
        })
        .collect()
}

/// The weight a backend should have now: its configured weight unless it is faster than the
/// slowest backend by both the absolute floor and the relative threshold.
pub fn target_weight(base: u32, latency_us: f64, slowest_us: f64) -> u32 {
    let difference = slowest_us - latency_us;
    if difference < MIN_DIFFERENCE_US || difference < MIN_RELATIVE * slowest_us {
        return base;
    }
    latency_weights(base, latency_us, slowest_us)
}

/// Whether two weights differ by more than [`MIN_RELATIVE`] of the first's size.
fn differs(new: u32, old: u32) -> bool {
    (new as f64 - old as f64).abs() > MIN_RELATIVE * old.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u8) -> BackendKey {
        ("web".into(), format!("10.1.0.{i}:80").parse().unwrap())
    }

    fn one_service(latencies: &[f64]) -> Vec<Vec<Sample>> {
        vec![latencies.iter().enumerate().map(|(i, &l)| Sample { key: key(i as u8 + 1), base: 1, latency_us: l }).collect()]
    }

    /// A deterministic pseudo-random sequence (xorshift), so the noise is reproducible.
    fn noise(seed: &mut u64) -> f64 {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        (*seed % 10_000) as f64 / 10_000.0
    }

    #[test]
    fn sub_millisecond_noise_never_changes_weights() {
        let mut lw = LatencyWeights::default();
        let mut seed = 0x9e37_79b9_7f4a_7c15;
        // 10 minutes of ticks: EWMAs wandering between 40 µs and 900 µs, the ratio often > 10×.
        for tick in 0..1200 {
            let a = 40.0 + 860.0 * noise(&mut seed);
            let b = 40.0 + 860.0 * noise(&mut seed);
            let changes = lw.tick(&one_service(&[a, b]));
            assert!(changes.is_empty(), "tick {tick}: {a:.0} µs vs {b:.0} µs changed {changes:?}");
        }
        assert!(lw.weights().is_empty());
    }

    #[test]
    fn a_real_difference_changes_weights_once_after_persisting() {
        let mut lw = LatencyWeights::default();
        let mut seed = 42;
        let mut all = Vec::new();
        for tick in 0..600 {
            // 0.5 ms vs 5 ms EWMAs, each wandering ±5 %.
            let fast = 500.0 * (0.95 + 0.1 * noise(&mut seed));
            let slow = 5_000.0 * (0.95 + 0.1 * noise(&mut seed));
            for c in lw.tick(&one_service(&[fast, slow])) {
                all.push((tick, c));
            }
        }
        assert_eq!(all.len(), 1, "{all:?}");
        let (tick, change) = &all[0];
        assert_eq!(*tick, PERSIST_TICKS as usize - 1, "applied after {PERSIST_TICKS} ticks");
        assert_eq!(change.key, key(1));
        assert!((9..=11).contains(&change.weight), "about 10× the base weight: {change:?}");
        assert_eq!(lw.weights().get(&key(2)), None, "the slow backend keeps its configured weight");
    }

    #[test]
    fn a_single_outlier_tick_changes_nothing() {
        let mut lw = LatencyWeights::default();
        for tick in 0..20 {
            let fast = if tick % 5 == 0 { 300.0 } else { 4_800.0 };
            assert!(lw.tick(&one_service(&[fast, 5_000.0])).is_empty(), "tick {tick}");
        }
    }

    #[test]
    fn weights_return_to_the_configured_value_when_the_difference_goes_away() {
        let mut lw = LatencyWeights::default();
        for _ in 0..PERSIST_TICKS {
            lw.tick(&one_service(&[500.0, 5_000.0]));
        }
        assert_eq!(lw.weights().get(&key(1)), Some(&10));
        let mut changes = Vec::new();
        for _ in 0..PERSIST_TICKS {
            changes.extend(lw.tick(&one_service(&[4_900.0, 5_000.0])));
        }
        assert_eq!(changes, vec![Change { key: key(1), weight: 1 }]);
        assert!(lw.weights().is_empty());
    }

    #[test]
    fn removed_backends_are_forgotten() {
        let mut lw = LatencyWeights::default();
        for _ in 0..PERSIST_TICKS {
            lw.tick(&one_service(&[500.0, 5_000.0]));
        }
        assert!(!lw.weights().is_empty());
        lw.tick(&[]);
        assert!(lw.weights().is_empty());
    }

    #[test]
    fn the_floor_needs_both_absolute_and_relative_differences() {
        assert_eq!(target_weight(1, 100.0, 900.0), 1, "8× faster but only 0.8 ms");
        assert_eq!(target_weight(1, 40_000.0, 41_500.0), 1, "1.5 ms faster but under 25 %");
        assert_eq!(target_weight(1, 1_000.0, 4_000.0), 4);
    }

    #[test]
    fn samples_come_from_least_response_time_services_with_a_latency() {
        let text = "[[services]]\nname = \"lrt\"\nvip = \"10.0.0.100:80\"\nprotocol = \"tcp\"\nscheduler = \"least-response-time\"\n\
                    [[services.backends]]\naddress = \"10.1.0.1:80\"\nweight = 2\n[[services.backends]]\naddress = \"10.1.0.2:80\"\n\
                    [[services]]\nname = \"mag\"\nvip = \"10.0.0.101:80\"\nprotocol = \"tcp\"\n\
                    [[services.backends]]\naddress = \"10.1.0.3:80\"\n";
        let config = Config::parse(text, "test").expect("config");
        let with_latency = |addr: &str, service: &str| {
            let status = Status {
                health: crate::health::Health::Up,
                last_ok: Some(true),
                last_error: None,
                last_latency_us: Some(700),
                latency_ewma_us: Some(700.0),
                consecutive_ok: 2,
                consecutive_fail: 0,
                checked_at_unix_ms: None,
            };
            (Target { service: service.into(), addr: addr.parse().unwrap() }, status)
        };
        // 10.1.0.2 has no latency yet; 10.1.0.3 is in a Maglev service.
        let statuses: BTreeMap<Target, Status> = [with_latency("10.1.0.1:80", "lrt"), with_latency("10.1.0.3:80", "mag")].into();
        let got = samples(&config, &statuses);
        assert_eq!(got, vec![vec![Sample { key: ("lrt".into(), "10.1.0.1:80".parse().unwrap()), base: 2, latency_us: 700.0 }]]);
    }
}
