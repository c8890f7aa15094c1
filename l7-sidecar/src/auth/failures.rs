//! Failed-authentication limit per client address. Without it a client can guess API
//! keys without end and make the gateway verify RS256 signatures for free. Checked
//! before any verification, so a client over the limit costs one map lookup.
//!
//! Fixed window per address: the window starts at the address's first failure; once
//! it has `max_failures` failures it is refused (429) until the window ends. Only
//! invalid credentials count: missing ones (a browser's first try) and valid tokens
//! lacking a role do not. IPv6 clients are counted per /64, which is what one host
//! usually gets. Lives in `Shared`, so a reload does not reset the counts.
//!
//! Counting a failure and deciding its answer are one step under one lock
//! (`record`): requests that all passed `blocked` before any of them failed still
//! get exactly `max_failures` 401s between them, the rest 429.
//!
//! The table holds at most `max_addresses` addresses. When a newcomer finds it full,
//! finished windows go first, then the addresses with the fewest failures (the
//! oldest window first among equals); an address over its limit in an open window
//! is never dropped, or an attacker with enough addresses could free its own. If
//! every address in the table is locked out, newcomers share one overflow window:
//! together they get `max_failures` failures, then every address without an entry
//! is refused until that window ends — except with a token verified before (in the
//! token cache, `auth_stage`): the overflow refuses new verifications, not clients
//! already signed in. Counting them nowhere would let an attacker
//! with more addresses than the table guess freely; this fails closed, bounded to
//! one window, and is logged so the operator can raise `max_addresses`.

use crate::config::AuthFailureLimitConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct FailureLimiter {
    entries: Mutex<Table>,
    /// Windows on record (addresses plus the overflow one), stored under the lock
    /// after each change: with no failures on record (the usual state) `blocked`
    /// answers without taking the lock.
    tracked: AtomicUsize,
}

#[derive(Default)]
struct Table {
    by_addr: HashMap<IpAddr, Window>,
    /// Shared by the addresses that found the table full of locked-out ones.
    overflow: Option<Window>,
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
}

impl Window {
    fn finished(&self, window: Duration, now: Instant) -> bool {
        now.saturating_duration_since(self.start) >= window
    }

    /// How long until the window ends, if it holds at least `at_least` failures.
    fn wait(&self, at_least: u32, window: Duration, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.start);
        (self.failures >= at_least && elapsed < window).then(|| window - elapsed)
    }

    /// Count one failure (a finished window starts afresh); `Some(wait)` if this
    /// one is over `max`.
    fn count(&mut self, max: u32, window: Duration, now: Instant) -> Option<Duration> {
        if self.finished(window, now) {
            *self = Window {
                start: now,
                failures: 0,
            };
        }
        self.failures = self.failures.saturating_add(1);
        self.wait(max.saturating_add(1), window, now)
    }
}

impl FailureLimiter {
    /// How long `ip` must wait, if it is over the limit.
    pub fn blocked(
        &self,
        cfg: &AuthFailureLimitConfig,
        ip: IpAddr,
        now: Instant,
    ) -> Option<Duration> {
        if cfg.max_failures == 0 || self.tracked.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let window = Duration::from_millis(cfg.window_ms);
        let t = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        match t.by_addr.get(&crate::idle::address_key(ip)) {
            Some(w) => w.wait(cfg.max_failures, window, now),
            None => t.overflow?.wait(cfg.max_failures, window, now),
        }
    }

    /// Whether `ip` has a window of its own (failures on record), as opposed to
    /// being blocked only by the shared overflow window.
    pub fn has_window(&self, ip: IpAddr) -> bool {
        let t = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        t.by_addr.contains_key(&crate::idle::address_key(ip))
    }

    /// Count one failed authentication of `ip`. `Some(wait)`: this failure is over
    /// the limit, answer it as `blocked` would (429); `None`: within it (401).
    pub fn record(
        &self,
        cfg: &AuthFailureLimitConfig,
        ip: IpAddr,
        now: Instant,
    ) -> Option<Duration> {
        if cfg.max_failures == 0 {
            return None;
        }
        let window = Duration::from_millis(cfg.window_ms);
        let key = crate::idle::address_key(ip);
        let mut t = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = Window {
            start: now,
            failures: 0,
        };
        let verdict = if let Some(w) = t.by_addr.get_mut(&key) {
            w.count(cfg.max_failures, window, now)
        } else if t.by_addr.len() < cfg.max_addresses || t.make_room(cfg, window, now) {
            let w = t.by_addr.entry(key).or_insert(fresh);
            w.count(cfg.max_failures, window, now)
        } else {
            if t.overflow.is_none() {
                tracing::warn!(
                    addresses = t.by_addr.len(),
                    "auth failure table full of locked-out addresses; newcomers share one window (raise auth.failure_limit.max_addresses)"
                );
            }
            t.overflow
                .get_or_insert(fresh)
                .count(cfg.max_failures, window, now)
        };
        self.tracked.store(t.tracked(), Ordering::Relaxed);
        verdict
    }

    /// Forget windows that ended (run periodically).
    pub fn sweep(&self, window: Duration) {
        let now = Instant::now();
        let mut t = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        t.by_addr.retain(|_, w| !w.finished(window, now));
        if t.overflow.is_some_and(|w| w.finished(window, now)) {
            t.overflow = None;
        }
        self.tracked.store(t.tracked(), Ordering::Relaxed);
    }
}

impl Table {
    fn tracked(&self) -> usize {
        self.by_addr.len() + usize::from(self.overflow.is_some())
    }

    /// Free at least one place in a full table: finished windows first, then the
    /// entries with the fewest failures, oldest first, never one over its limit in
    /// an open window. A batch of 1/64 of the table goes at once, so a flood of
    /// newcomers pays the scan once per batch, not once each. `false`: every
    /// entry is locked out.
    fn make_room(&mut self, cfg: &AuthFailureLimitConfig, window: Duration, now: Instant) -> bool {
        self.by_addr.retain(|_, w| !w.finished(window, now));
        if self.by_addr.len() < cfg.max_addresses {
            return true;
        }
        let mut open: Vec<(u32, Instant, IpAddr)> = self
            .by_addr
            .iter()
            .filter(|(_, w)| w.failures < cfg.max_failures)
            .map(|(ip, w)| (w.failures, w.start, *ip))
            .collect();
        if open.is_empty() {
            return false;
        }
        let batch = (cfg.max_addresses / 64).clamp(1, open.len());
        open.select_nth_unstable(batch - 1);
        for (_, _, ip) in &open[..batch] {
            self.by_addr.remove(ip);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(max: u32) -> AuthFailureLimitConfig {
        AuthFailureLimitConfig {
            max_failures: max,
            window_ms: 60_000,
            max_addresses: 2,
            window: None,
        }
    }

    #[test]
    fn blocks_after_max_failures_until_the_window_ends() {
        let l = FailureLimiter::default();
        let c = cfg(3);
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(l.blocked(&c, ip, t0), None);
            l.record(&c, ip, t0);
        }
        assert_eq!(l.blocked(&c, ip, t0), Some(Duration::from_secs(60)));
        let later = t0 + Duration::from_secs(61);
        assert_eq!(l.blocked(&c, ip, later), None, "window over");
        let other: IpAddr = "192.0.2.2".parse().expect("ip");
        assert_eq!(l.blocked(&c, other, t0), None);
        assert_eq!(l.blocked(&cfg(0), ip, t0), None, "0 disables");
    }

    #[test]
    fn ipv6_counts_per_64_and_table_is_bounded() {
        let l = FailureLimiter::default();
        let c = cfg(2);
        let t0 = Instant::now();
        l.record(&c, "2001:db8::1".parse().expect("ip"), t0);
        l.record(&c, "2001:db8::2".parse().expect("ip"), t0);
        assert!(l
            .blocked(&c, "2001:db8::3".parse().expect("ip"), t0)
            .is_some());
        for i in 0..10u8 {
            l.record(&c, IpAddr::from([10, 0, 0, i]), t0);
        }
        assert!(l.entries.lock().expect("lock").by_addr.len() <= 2);
    }

    fn limit(max_failures: u32, max_addresses: usize) -> AuthFailureLimitConfig {
        AuthFailureLimitConfig {
            max_failures,
            window_ms: 60_000,
            max_addresses,
            window: None,
        }
    }

    fn v4(c: u8, d: u8) -> IpAddr {
        IpAddr::from([127, 0, c, d])
    }

    /// Hostile finding s14-9: an address over its limit stayed locked only until 20
    /// other addresses filled the table, which was then cleared.
    #[test]
    fn a_locked_address_is_not_evicted_for_newcomers() {
        let l = FailureLimiter::default();
        let c = limit(5, 10);
        let a = v4(3, 1);
        let t0 = Instant::now();
        for _ in 0..8 {
            l.record(&c, a, t0);
        }
        assert!(l.blocked(&c, a, t0).is_some(), "locked");
        for i in 1..=20 {
            l.record(&c, v4(1, i), t0 + Duration::from_secs(5));
        }
        let t10 = t0 + Duration::from_secs(10);
        assert_eq!(l.blocked(&c, a, t10), Some(Duration::from_secs(50)));
        assert!(l.entries.lock().expect("lock").by_addr.len() <= 10);
    }

    /// When full: finished windows go first, then the entries with the fewest
    /// failures, the oldest first among equals.
    #[test]
    fn eviction_takes_finished_windows_then_fewest_failures_oldest_first() {
        let l = FailureLimiter::default();
        let c = limit(5, 3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (two, one_old, one_new) = (v4(0, 1), v4(0, 2), v4(0, 3));
        l.record(&c, two, at(0));
        l.record(&c, two, at(0));
        l.record(&c, one_old, at(1));
        l.record(&c, one_new, at(2));
        l.record(&c, v4(0, 4), at(3));
        let has = |ip| l.entries.lock().expect("lock").by_addr.contains_key(&ip);
        assert!(!has(one_old), "fewest failures, oldest first");
        assert!(has(two) && has(one_new) && has(v4(0, 4)));
        // At 60 s `two`'s window (started at 0 s) has finished: it goes, although
        // it has more failures than the others.
        l.record(&c, v4(0, 5), at(60));
        assert!(!has(two), "finished window first");
        assert!(has(one_new) && has(v4(0, 4)) && has(v4(0, 5)));
    }

    /// A table full of locked-out addresses: newcomers share one overflow window
    /// (`max_failures` failures among them all), then are refused until it ends;
    /// the locked addresses stay locked.
    #[test]
    fn newcomers_to_a_table_of_locked_addresses_share_one_window() {
        let l = FailureLimiter::default();
        let c = limit(2, 2);
        let t0 = Instant::now();
        for ip in [v4(0, 1), v4(0, 2)] {
            assert_eq!(l.record(&c, ip, t0), None, "first failure: 401");
            assert!(l.record(&c, ip, t0).is_none(), "second failure: 401");
            assert!(l.blocked(&c, ip, t0).is_some());
        }
        assert_eq!(l.blocked(&c, v4(1, 1), t0), None, "a newcomer is free");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.record(&c, v4(1, 1), t1), None, "overflow failure 1");
        assert_eq!(l.record(&c, v4(1, 2), t1), None, "overflow failure 2");
        assert_eq!(
            l.record(&c, v4(1, 3), t1),
            Some(Duration::from_secs(60)),
            "over the shared limit: 429"
        );
        assert_eq!(l.blocked(&c, v4(1, 4), t1), Some(Duration::from_secs(60)));
        for ip in [v4(0, 1), v4(0, 2)] {
            assert!(l.blocked(&c, ip, t1).is_some(), "{ip} stays locked");
        }
        let later = t1 + Duration::from_secs(60);
        assert_eq!(l.blocked(&c, v4(1, 4), later), None, "overflow window over");
        assert_eq!(
            l.record(&c, v4(1, 4), later),
            None,
            "room again: counted alone"
        );
        assert!(l
            .entries
            .lock()
            .expect("lock")
            .by_addr
            .contains_key(&v4(1, 4)));
    }

    /// Counting and deciding are one step: however many threads fail at once,
    /// exactly `max_failures` failures are answered 401 (`record` gives `None`).
    #[test]
    fn concurrent_failures_get_exactly_max_failures_within_the_limit() {
        let l = FailureLimiter::default();
        let c = limit(5, 100);
        let ip = v4(9, 9);
        let t0 = Instant::now();
        let within = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..50 {
                        if l.record(&c, ip, t0).is_none() {
                            within.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(within.load(Ordering::Relaxed), 5);
    }

    /// The lock-free "nothing on record" answer follows the table: an address is
    /// blocked as soon as its failures are recorded, and free once a sweep forgot
    /// them.
    #[test]
    fn blocked_follows_record_and_sweep() {
        let l = FailureLimiter::default();
        let c = cfg(1);
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let t0 = Instant::now();
        assert_eq!(l.blocked(&c, ip, t0), None, "nothing recorded");
        l.record(&c, ip, t0);
        assert!(l.blocked(&c, ip, t0).is_some(), "recorded");
        l.sweep(Duration::ZERO);
        assert_eq!(l.blocked(&c, ip, Instant::now()), None, "swept");
        assert_eq!(l.tracked.load(Ordering::Relaxed), 0);
    }
}
