//! Failed-authentication limit per client address. Without it a client can guess API
//! keys without end and make the gateway verify RS256 signatures for free. Checked
//! before any verification, so a client over the limit costs one map lookup.
//!
//! Fixed window per address: the window starts at the address's first failure; once
//! it has `max_failures` failures it is refused (429) until the window ends. Only
//! invalid credentials count: missing ones (a browser's first try) and valid tokens
//! lacking a role do not. IPv6 clients are counted per /64, which is what one host
//! usually gets. Lives in `Shared`, so a reload does not reset the counts.

use crate::config::AuthFailureLimitConfig;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct FailureLimiter {
    entries: Mutex<HashMap<IpAddr, Window>>,
    /// `entries.len()`, stored under the lock after each change: with no failures
    /// on record (the usual state) `blocked` answers without taking the lock.
    tracked: AtomicUsize,
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
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
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let w = map.get(&crate::idle::address_key(ip))?;
        let elapsed = now.saturating_duration_since(w.start);
        (w.failures >= cfg.max_failures && elapsed < window).then(|| window - elapsed)
    }

    /// Count one failed authentication of `ip`.
    pub fn record(&self, cfg: &AuthFailureLimitConfig, ip: IpAddr, now: Instant) {
        if cfg.max_failures == 0 {
            return;
        }
        let window = Duration::from_millis(cfg.window_ms);
        let key = crate::idle::address_key(ip);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if !map.contains_key(&key) && map.len() >= cfg.max_addresses {
            map.retain(|_, w| now.saturating_duration_since(w.start) < window);
            if map.len() >= cfg.max_addresses {
                // Still full: forget everyone rather than grow without bound.
                tracing::warn!(addresses = map.len(), "auth failure table full; cleared");
                map.clear();
            }
        }
        let w = map.entry(key).or_insert(Window {
            start: now,
            failures: 0,
        });
        if now.saturating_duration_since(w.start) >= window {
            *w = Window {
                start: now,
                failures: 0,
            };
        }
        w.failures = w.failures.saturating_add(1);
        self.tracked.store(map.len(), Ordering::Relaxed);
    }

    /// Forget windows that ended (run periodically).
    pub fn sweep(&self, window: Duration) {
        let now = Instant::now();
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, w| now.saturating_duration_since(w.start) < window);
        self.tracked.store(map.len(), Ordering::Relaxed);
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
        assert!(l.entries.lock().expect("lock").len() <= 2);
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
