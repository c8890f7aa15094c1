//! Passive health checks: in NAT mode the balancer sees both directions, so a backend that keeps
//! receiving SYNs but answers none (no SYN-ACK, no RST) is not serving, whatever its health endpoint
//! says. A RST is an answer: the host is alive and refusing, which the active checks see at once.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::{
    config::Config,
    dashboard::events::{EventLog, Kind},
    dataplane::Dataplane,
    plan::BackendKey,
    tables::Tables,
};

/// Samples kept per backend: with the daemon's 500 ms tick, a 2 s window.
const WINDOW: usize = 5;
/// Unanswered SYNs within the window that mark a backend down.
const UNANSWERED_SYNS: u64 = 3;
/// How long a passive failure keeps a backend out before it is tried again.
const HOLD: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Passive {
    samples: HashMap<BackendKey, VecDeque<(u64, u64)>>,
    down_until: HashMap<BackendKey, Instant>,
}

impl Passive {
    pub fn down(&self) -> HashSet<BackendKey> {
        let now = Instant::now();
        self.down_until.iter().filter(|(_, until)| **until > now).map(|(k, _)| k.clone()).collect()
    }

    /// Ends a backend's passive hold (its active checks just saw it come back up).
    pub fn clear(&mut self, key: &BackendKey) -> bool {
        self.samples.remove(key);
        self.down_until.remove(key).is_some()
    }

    /// Takes one sample of every checked backend's SYN and answer counters; returns whether any
    /// backend's passive state changed. Backends already out of the ring (`serving` says which are
    /// in) are not judged: the SYNs they got before leaving it would count against them. Holds
    /// that start or end are recorded in `events`.
    pub fn observe(
        &mut self,
        config: &Config,
        serving: &HashSet<BackendKey>,
        tables: &Tables,
        dataplane: &Dataplane,
        events: &mut EventLog,
    ) -> bool {
        let now = Instant::now();
        let mut changed = false;
        let mut seen = HashSet::new();
        for installed in tables.services() {
            let Some(service) = config.services.iter().find(|s| s.name == installed.config.name) else { continue };
            if !service.passive_checks {
                continue;
            }
            for (address, &id) in &installed.backend_ids {
                let Ok(c) = dataplane.backend_counters(id) else { continue };
                let key = (service.name.clone(), *address);
                seen.insert(key.clone());
                if !serving.contains(&key) {
                    self.samples.remove(&key);
                    continue;
                }
                let window = self.samples.entry(key.clone()).or_default();
                window.push_back((c.syns, c.syn_acks + c.resets));
                if window.len() > WINDOW {
                    window.pop_front();
                }
                let (first, last) = (window[0], window[window.len() - 1]);
                let unanswered = last.0.saturating_sub(first.0);
                if unanswered >= UNANSWERED_SYNS && last.1 == first.1 && !self.down_until.contains_key(&key) {
                    warn!(service = %key.0, backend = %key.1, unanswered, "passive check: SYNs are not answered; backend marked down");
                    let message = format!("passive check: {unanswered} SYNs unanswered; out of the ring for {} s", HOLD.as_secs());
                    events.record(Kind::Detected, Some(&key.0), Some(key.1.to_string()), message);
                    self.down_until.insert(key.clone(), now + HOLD);
                    window.clear();
                    changed = true;
                }
            }
        }
        self.samples.retain(|k, _| seen.contains(k));
        let before = self.down_until.len();
        let samples = &mut self.samples;
        self.down_until.retain(|k, until| {
            let keep = *until > now && seen.contains(k);
            if !keep {
                samples.remove(k);
            }
            if !keep {
                info!(service = %k.0, backend = %k.1, "passive check: hold time over, backend tried again");
                events.record(Kind::Restored, Some(&k.0), Some(k.1.to_string()), "passive hold over: back in the ring, tried again");
            }
            keep
        });
        changed || self.down_until.len() != before
    }
}
