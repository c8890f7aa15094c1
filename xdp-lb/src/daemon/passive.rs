//! Passive health checks: in NAT mode the balancer sees both directions, so a backend that keeps
//! receiving SYNs but answers none (no SYN-ACK, no RST) is not serving, whatever its health endpoint
//! says. A RST is an answer: the host is alive and refusing, which the active checks see at once.
//!
//! Unanswered SYNs are cheap to fake: anyone who can reach the VIP can send SYNs a backend will
//! never answer (the data plane drops the sources it can tell — see `drop_martian_source` — but not
//! every unanswerable one). So passive evidence alone takes out at most [`MAX_EJECTION_PERCENT`] of
//! a service's backends, and never the last one in the ring, as Envoy's outlier detection caps
//! ejections with `max_ejection_percent`. A backend that really died also fails its active checks,
//! which are not capped.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
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
/// At most this share of a service's backends is out of the ring on passive evidence alone
/// (rounded down: none of 1, one of 2 or 3, two of 4 or 5).
pub const MAX_EJECTION_PERCENT: usize = 50;

/// Whether passive evidence may take one more of a service's backends out: fewer than
/// [`MAX_EJECTION_PERCENT`] of its `backends` are out on passive evidence (`ejected`) now, and
/// another backend stays in the ring (`serving` counts the ones in it, this one included).
pub fn may_eject(backends: usize, ejected: usize, serving: usize) -> bool {
    ejected < backends * MAX_EJECTION_PERCENT / 100 && serving > 1
}

/// One backend's counters as sampled on a tick: SYNs sent to it, and its answers (SYN-ACKs and RSTs).
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub syns: u64,
    pub answers: u64,
}

#[derive(Default)]
pub struct Passive {
    samples: HashMap<BackendKey, VecDeque<Sample>>,
    down_until: HashMap<BackendKey, Instant>,
    /// Backends whose SYNs go unanswered but that the ejection cap keeps in (logged once).
    capped: HashSet<BackendKey>,
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
            let samples: Vec<(SocketAddr, Sample)> = installed
                .backend_ids
                .iter()
                .filter_map(|(address, &id)| {
                    let c = dataplane.backend_counters(id).ok()?;
                    Some((*address, Sample { syns: c.syns, answers: c.syn_acks + c.resets }))
                })
                .collect();
            seen.extend(samples.iter().map(|(address, _)| (service.name.clone(), *address)));
            changed |= self.judge(now, &service.name, installed.backend_ids.len(), &samples, serving, events);
        }
        self.samples.retain(|k, _| seen.contains(k));
        self.capped.retain(|k| seen.contains(k));
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

    /// Adds one sample per backend of `service` (which has `backends` in all) and marks down those
    /// whose SYNs went unanswered for the whole window, as far as [`may_eject`] allows; returns
    /// whether one was marked down.
    fn judge(
        &mut self,
        now: Instant,
        service: &str,
        backends: usize,
        samples: &[(SocketAddr, Sample)],
        serving: &HashSet<BackendKey>,
        events: &mut EventLog,
    ) -> bool {
        let mut changed = false;
        for (address, sample) in samples {
            let key = (service.to_string(), *address);
            if !serving.contains(&key) {
                self.samples.remove(&key);
                self.capped.remove(&key);
                continue;
            }
            let window = self.samples.entry(key.clone()).or_default();
            window.push_back(*sample);
            if window.len() > WINDOW {
                window.pop_front();
            }
            let (first, last) = (window[0], window[window.len() - 1]);
            let unanswered = last.syns.saturating_sub(first.syns);
            if unanswered < UNANSWERED_SYNS || last.answers != first.answers || self.down_until.contains_key(&key) {
                self.capped.remove(&key);
                continue;
            }
            let ejected = self.down_until.iter().filter(|((s, _), until)| s == service && **until > now).count();
            let in_ring = serving.iter().filter(|(s, _)| s == service).count();
            if !may_eject(backends, ejected, in_ring) {
                if self.capped.insert(key.clone()) {
                    warn!(
                        service, backend = %address, unanswered, ejected, backends,
                        "passive check: SYNs are not answered, but the backend stays in: passive checks alone take out at most {MAX_EJECTION_PERCENT}% of a service's backends and never the last one in the ring (its active checks decide)"
                    );
                }
                continue;
            }
            self.capped.remove(&key);
            warn!(service, backend = %address, unanswered, "passive check: SYNs are not answered; backend marked down");
            let message = format!("passive check: {unanswered} SYNs unanswered; out of the ring for {} s", HOLD.as_secs());
            events.record(Kind::Detected, Some(service), Some(address.to_string()), message);
            self.down_until.insert(key.clone(), now + HOLD);
            window.clear();
            changed = true;
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_keeps_half_of_the_backends_and_the_last_one_in_the_ring() {
        // One backend: passive evidence alone never takes it out.
        assert!(!may_eject(1, 0, 1));
        // Two or three: one may go, not a second.
        assert!(may_eject(2, 0, 2) && !may_eject(2, 1, 1));
        assert!(may_eject(3, 0, 3) && !may_eject(3, 1, 2));
        // Four: two may go.
        assert!(may_eject(4, 1, 3) && !may_eject(4, 2, 2));
        // Never the last one in the ring, whatever the share (the others failed active checks).
        assert!(!may_eject(4, 0, 1));
    }

    fn key(service: &str, address: &str) -> BackendKey {
        (service.to_string(), address.parse().unwrap())
    }

    /// The spoofing the tester did: every backend of a three-backend service receives SYNs it never
    /// answers. Before the cap all three went down (`[all-down]`, real clients got RSTs).
    #[test]
    fn unanswered_syns_on_every_backend_take_out_one_of_three() {
        let addresses: Vec<SocketAddr> = ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"].iter().map(|a| a.parse().unwrap()).collect();
        let serving: HashSet<BackendKey> = addresses.iter().map(|a| ("web".to_string(), *a)).collect();
        let mut passive = Passive::default();
        let mut events = EventLog::default();
        let now = Instant::now();
        let mut marked = 0;
        for tick in 0..WINDOW as u64 * 3 {
            let samples: Vec<_> = addresses.iter().map(|a| (*a, Sample { syns: tick * 2, answers: 0 })).collect();
            // The ring shrinks as the daemon replans after a mark.
            let down = passive.down();
            let in_ring: HashSet<BackendKey> = serving.difference(&down).cloned().collect();
            if passive.judge(now, "web", addresses.len(), &samples, &in_ring, &mut events) {
                marked += 1;
            }
        }
        assert_eq!(marked, 1, "marks: {:?}", passive.down());
        assert_eq!(passive.down().len(), 1);
        assert_eq!(passive.capped.len(), 2, "the other two are noted as kept in by the cap");
    }

    #[test]
    fn a_single_backend_is_never_taken_out_by_passive_evidence() {
        let serving: HashSet<BackendKey> = [key("solo", "10.0.0.1:80")].into();
        let mut passive = Passive::default();
        let mut events = EventLog::default();
        let now = Instant::now();
        for tick in 0..WINDOW as u64 * 2 {
            let samples = [("10.0.0.1:80".parse().unwrap(), Sample { syns: tick * 5, answers: 0 })];
            assert!(!passive.judge(now, "solo", 1, &samples, &serving, &mut events));
        }
        assert!(passive.down().is_empty());
    }

    /// The cap leaves the ordinary case alone: one backend of several that ignores its SYNs while
    /// the others answer goes down as before.
    #[test]
    fn one_silent_backend_among_answering_ones_still_goes_down() {
        let serving: HashSet<BackendKey> = [key("web", "10.0.0.1:80"), key("web", "10.0.0.2:80"), key("web", "10.0.0.3:80")].into();
        let mut passive = Passive::default();
        let mut events = EventLog::default();
        let now = Instant::now();
        let mut changed = false;
        for tick in 0..WINDOW as u64 {
            let samples = [
                ("10.0.0.1:80".parse().unwrap(), Sample { syns: tick, answers: tick }),
                ("10.0.0.2:80".parse().unwrap(), Sample { syns: tick * 3, answers: 0 }),
                ("10.0.0.3:80".parse().unwrap(), Sample { syns: tick, answers: tick }),
            ];
            changed |= passive.judge(now, "web", 3, &samples, &serving, &mut events);
        }
        assert!(changed);
        assert_eq!(passive.down(), [key("web", "10.0.0.2:80")].into());
    }
}
