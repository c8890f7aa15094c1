//! Per-route rate limiting: fixed window, sliding window (weighted previous window)
//! and token bucket. Keys are bounded: idle ones are evicted when the map fills up.

use crate::config::{RateAlgorithm, RateKey, RateLimitConfig};
use crate::http_util::json_error;
use crate::http_util::Body;
use crate::routing::Routed;
use crate::stage::{Annotated, Annotation, Either, Next};
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the limit resets (or a token is back).
    pub reset_secs: u64,
    /// For rejections: seconds to wait before retrying.
    pub retry_after_secs: u64,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Window {
        start: Instant,
        count: u64,
        prev: u64,
    },
    Bucket {
        tokens: f64,
        at: Instant,
    },
}

struct Entry {
    state: State,
    last_seen: Instant,
}

/// Whose budget a request uses. One limiter is one policy, so the policy's name
/// needs no place in the key; the kinds cannot collide (different variants).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    Ip(IpAddr),
    /// An API key or a user id (a policy keys on one of them).
    Name(Box<str>),
}

/// `Key`, borrowed: looked up without making a `String` per request.
#[derive(Clone, Copy, Debug)]
pub enum KeyRef<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

// `Key` and `KeyRef` hash alike (hashbrown finds a `Key` by its `KeyRef`).
impl Hash for Key {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.as_ref().hash(h);
    }
}

impl Hash for KeyRef<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        match self {
            // One integer per address, not a discriminant and a length-prefixed
            // octet slice: each `write` is a round of the hasher.
            KeyRef::Ip(IpAddr::V4(a)) => h.write_u64(u64::from(a.to_bits())),
            KeyRef::Ip(IpAddr::V6(a)) => {
                h.write_u8(2);
                h.write_u128(a.to_bits());
            }
            KeyRef::Name(n) => {
                h.write_u8(1);
                n.hash(h);
            }
        }
    }
}

impl Key {
    fn as_ref(&self) -> KeyRef<'_> {
        match self {
            Key::Ip(ip) => KeyRef::Ip(*ip),
            Key::Name(n) => KeyRef::Name(n),
        }
    }
}

impl KeyRef<'_> {
    fn to_owned_key(self) -> Key {
        match self {
            KeyRef::Ip(ip) => Key::Ip(ip),
            KeyRef::Name(n) => Key::Name(n.into()),
        }
    }
}

impl hashbrown::Equivalent<Key> for KeyRef<'_> {
    fn equivalent(&self, key: &Key) -> bool {
        match (self, key) {
            (KeyRef::Ip(a), Key::Ip(b)) => a == b,
            (KeyRef::Name(a), Key::Name(b)) => *a == &**b,
            _ => false,
        }
    }
}

/// Keys are client-chosen (addresses, API keys, user ids): hashbrown's default
/// hasher is foldhash seeded at random per process and per map, which keeps
/// HashDoS resistance at a fraction of SipHash's cost.
type Entries = hashbrown::HashMap<Key, Entry>;

pub struct Limiter {
    pub cfg: RateLimitConfig,
    entries: Mutex<Entries>,
    /// `RateLimit-Limit` as sent with every answer: the same for every request.
    limit_value: HeaderValue,
    /// `RateLimit-Remaining` of a caller whose budget was full: the number (the
    /// reported limit − 1) and its header value.
    full_remaining: (u64, HeaderValue),
}

fn ceil_secs(d: Duration) -> u64 {
    d.as_millis().div_ceil(1000) as u64
}

impl Limiter {
    pub fn new(cfg: RateLimitConfig) -> Limiter {
        // What `check_at` reports as the limit (the bucket's capacity for a bucket).
        let capacity = match cfg.algorithm {
            RateAlgorithm::TokenBucket => cfg.burst.unwrap_or(cfg.limit),
            _ => cfg.limit,
        };
        Limiter {
            cfg,
            limit_value: number(capacity),
            full_remaining: (
                capacity.saturating_sub(1),
                number(capacity.saturating_sub(1)),
            ),
            entries: Mutex::new(Entries::default()),
        }
    }

    pub fn check(&self, key: &str) -> Decision {
        self.check_at(key, Instant::now())
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn check_at(&self, key: &str, now: Instant) -> Decision {
        self.check_key_at(KeyRef::Name(key), now)
    }

    pub fn check_key_at(&self, key: KeyRef<'_>, now: Instant) -> Decision {
        let window = Duration::from_millis(self.cfg.window_ms);
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        // A known caller (the usual one) costs one lookup.
        if let Some(entry) = map.get_mut(&key) {
            return self.decide(entry, now, window);
        }
        if map.len() >= self.cfg.max_keys {
            Self::evict(&mut map, now, window, self.cfg.max_keys);
        }
        let initial = match self.cfg.algorithm {
            RateAlgorithm::TokenBucket => State::Bucket {
                tokens: self.capacity() as f64,
                at: now,
            },
            _ => State::Window {
                start: now,
                count: 0,
                prev: 0,
            },
        };
        // Looked up by `KeyRef`: an owned key is only made for a new caller.
        let entry = map.entry(key.to_owned_key()).or_insert(Entry {
            state: initial,
            last_seen: now,
        });
        self.decide(entry, now, window)
    }

    /// Count a request against `entry`'s budget.
    fn decide(&self, entry: &mut Entry, now: Instant, window: Duration) -> Decision {
        entry.last_seen = now;
        match (&mut entry.state, self.cfg.algorithm) {
            (State::Window { start, count, prev }, alg) => {
                let elapsed = now.saturating_duration_since(*start);
                if elapsed >= window {
                    let windows = (elapsed.as_nanos() / window.as_nanos().max(1)) as u32;
                    // Only the directly preceding window weighs into the sliding estimate.
                    *prev = if windows == 1 { *count } else { 0 };
                    *start += window * windows;
                    *count = 0;
                }
                let into = now.saturating_duration_since(*start);
                let reset = window.saturating_sub(into);
                let used = if alg == RateAlgorithm::SlidingWindow {
                    let w = 1.0 - into.as_secs_f64() / window.as_secs_f64();
                    (*prev as f64 * w).floor() as u64 + *count
                } else {
                    *count
                };
                let limit = self.cfg.limit;
                if used < limit {
                    *count += 1;
                    Decision {
                        allowed: true,
                        limit,
                        remaining: limit - used - 1,
                        reset_secs: ceil_secs(reset),
                        retry_after_secs: 0,
                    }
                } else {
                    let retry = ceil_secs(reset).max(1);
                    Decision {
                        allowed: false,
                        limit,
                        remaining: 0,
                        reset_secs: ceil_secs(reset),
                        retry_after_secs: retry,
                    }
                }
            }
            (State::Bucket { tokens, at }, _) => {
                let cap = self.capacity() as f64;
                let rate_per_sec = self.cfg.limit as f64 / window.as_secs_f64();
                // Times may come a little out of order (read by requests on
                // other threads before this one took the lock); refilling from the
                // latest one only never counts a stretch of time twice.
                if now > *at {
                    *tokens = (*tokens
                        + now.saturating_duration_since(*at).as_secs_f64() * rate_per_sec)
                        .min(cap);
                    *at = now;
                }
                let allowed = *tokens >= 1.0;
                if allowed {
                    *tokens -= 1.0;
                }
                let to_full = ((cap - *tokens) / rate_per_sec).ceil() as u64;
                let to_one = if *tokens >= 1.0 {
                    0
                } else {
                    ((1.0 - *tokens) / rate_per_sec).ceil().max(1.0) as u64
                };
                Decision {
                    allowed,
                    limit: self.capacity(),
                    remaining: tokens.floor() as u64,
                    reset_secs: to_full,
                    retry_after_secs: if allowed { 0 } else { to_one },
                }
            }
        }
    }

    fn capacity(&self) -> u64 {
        self.cfg.burst.unwrap_or(self.cfg.limit)
    }

    /// Drop keys idle for two windows; if still full, drop the least recently seen.
    fn evict(map: &mut Entries, now: Instant, window: Duration, max: usize) {
        map.retain(|_, e| now.saturating_duration_since(e.last_seen) < window * 2);
        if map.len() >= max {
            let mut ages: Vec<(Instant, Key)> =
                map.iter().map(|(k, e)| (e.last_seen, k.clone())).collect();
            ages.sort_unstable_by_key(|(at, _)| *at);
            let drop = map.len() - max + 1 + max / 10;
            for (_, k) in ages.into_iter().take(drop) {
                map.remove(&k);
            }
        }
    }

    /// Periodic sweep so memory shrinks even when no new keys arrive.
    pub fn sweep(&self) {
        let window = Duration::from_millis(self.cfg.window_ms);
        if let Ok(mut map) = self.entries.lock() {
            let now = Instant::now();
            map.retain(|_, e| now.saturating_duration_since(e.last_seen) < window * 2);
        }
    }
}

/// Limiters by policy name; a reload keeps a policy's counters unless its settings changed.
#[derive(Default)]
pub struct LimiterRegistry {
    limiters: Mutex<HashMap<String, Arc<Limiter>>>,
}

impl LimiterRegistry {
    pub fn get(&self, name: &str, cfg: &RateLimitConfig) -> Arc<Limiter> {
        let mut map = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(name) {
            Some(l) if l.cfg == *cfg => l.clone(),
            _ => {
                let l = Arc::new(Limiter::new(cfg.clone()));
                map.insert(name.to_string(), l.clone());
                l
            }
        }
    }

    pub fn sweep(&self) {
        let all: Vec<Arc<Limiter>> = self
            .limiters
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for l in all {
            l.sweep();
        }
    }
}

const LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// A header value for `n`; the small numbers most answers carry (seconds to reset
/// or retry) without an allocation.
fn number(n: u64) -> HeaderValue {
    const SMALL: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match SMALL.get(n as usize) {
        Some(s) if n < 10 => HeaderValue::from_static(s),
        _ => n.into(),
    }
}

/// `d` is `limiter`'s decision: its limit is the limiter's (`limit_value`).
fn set_headers(h: &mut HeaderMap, limiter: &Limiter, d: &Decision) {
    set_budget_headers(h, limiter, d.remaining, d.reset_secs);
    if !d.allowed {
        h.insert(header::RETRY_AFTER, number(d.retry_after_secs));
    }
}

/// The headers every answer gets: `limiter`'s limit, and what a decision said
/// remains and when it resets.
fn set_budget_headers(h: &mut HeaderMap, limiter: &Limiter, remaining: u64, reset_secs: u64) {
    h.insert(LIMIT, limiter.limit_value.clone());
    // A caller well under its limit finds its budget full, less this request:
    // rendered once, not per answer.
    let remaining = if remaining == limiter.full_remaining.0 {
        limiter.full_remaining.1.clone()
    } else {
        number(remaining)
    };
    h.insert(REMAINING, remaining);
    h.insert(RESET, number(reset_secs));
}

/// This config generation's policies by name. Looked up per request: foldhash
/// (hashbrown's default) rather than SipHash; the names come from the config.
pub type Limiters = hashbrown::HashMap<String, Arc<Limiter>>;

/// Apply the route's policy, keyed by client IP, API key or user id. `limiters`:
/// this config generation's policies by name (their counters outlive reloads).
///
/// The decision needs nothing to wait for, so it is made here, before the rest of
/// the pipeline's future: the stage adds no `async` state machine and no box of its
/// own, only the decision to the rest's future, whose answer gets the headers.
pub fn rate_limit_stage<'a, B: Send + 'static, N: Next<Routed<B>>>(
    limiters: &'a Limiters,
    r: Routed<B>,
    next: N,
) -> impl std::future::Future<Output = Response<Body>> + Send + 'a {
    let Some(limiter) = r
        .route
        .route
        .cfg
        .rate_limit
        .as_ref()
        .and_then(|n| limiters.get(n))
    else {
        return Either::pass(Annotated::new(next.run(r), None::<Budget<'_>>));
    };
    let (rctx, ctx) = (r.req.ctx(), &r.route);
    let id = rctx.identity.as_ref();
    // Callers without the configured key share their IP's budget.
    let key = match limiter.cfg.key {
        RateKey::ClientIp => None,
        RateKey::ApiKey => id.and_then(|i| i.api_key.as_deref()).map(KeyRef::Name),
        RateKey::UserId => id.map(|i| KeyRef::Name(&i.user_id)),
    }
    .unwrap_or(KeyRef::Ip(rctx.conn.peer.ip()));
    let d = limiter.check_key_at(key, Instant::now());
    if !d.allowed {
        crate::stats::record_rate_limited(&ctx.route.cfg.name);
        let mut resp = json_error(
            &r.req,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "rate limit exceeded",
        );
        set_headers(resp.headers_mut(), limiter, &d);
        // Boxed: inline, a response would make the pass-through future (every
        // request's) that much larger.
        return Either::work(Box::pin(std::future::ready(resp)));
    }
    Either::pass(Annotated::new(
        next.run(r),
        Some(Budget {
            limiter,
            remaining: d.remaining,
            reset: d.reset_secs,
        }),
    ))
}

/// The decision that let a request through, as its answer's budget headers. Only
/// what the headers need: it is part of every rate-limited request's future.
struct Budget<'a> {
    limiter: &'a Limiter,
    remaining: u64,
    reset: u64,
}

impl Annotation for Budget<'_> {
    fn apply(self, resp: &mut Response<Body>) {
        set_budget_headers(resp.headers_mut(), self.limiter, self.remaining, self.reset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RateKey;

    fn limiter(alg: RateAlgorithm, limit: u64, burst: Option<u64>, max_keys: usize) -> Limiter {
        Limiter::new(RateLimitConfig {
            algorithm: alg,
            key: RateKey::ClientIp,
            limit,
            window_ms: 1000,
            burst,
            max_keys,
            window: None,
        })
    }

    #[test]
    fn fixed_window_limits_and_resets() {
        let l = limiter(RateAlgorithm::FixedWindow, 2, None, 10);
        let t = Instant::now();
        assert!(l.check_at("a", t).allowed);
        let d = l.check_at("a", t);
        assert!(d.allowed && d.remaining == 0, "{d:?}");
        let d = l.check_at("a", t);
        assert!(!d.allowed && d.retry_after_secs >= 1, "{d:?}");
        assert!(l.check_at("b", t).allowed, "keys are independent");
        assert!(
            l.check_at("a", t + Duration::from_millis(1001)).allowed,
            "new window"
        );
    }

    #[test]
    fn sliding_window_weighs_previous_window() {
        let l = limiter(RateAlgorithm::SlidingWindow, 4, None, 10);
        let t = Instant::now();
        for _ in 0..4 {
            assert!(l.check_at("a", t).allowed);
        }
        // A quarter into the next window 3 of the previous 4 still count.
        let t2 = t + Duration::from_millis(1250);
        assert!(l.check_at("a", t2).allowed);
        assert!(!l.check_at("a", t2).allowed);
    }

    #[test]
    fn token_bucket_allows_burst_then_refills() {
        let l = limiter(RateAlgorithm::TokenBucket, 10, Some(3), 10);
        let t = Instant::now();
        for i in 0..3 {
            assert!(l.check_at("a", t).allowed, "burst request {i}");
        }
        let d = l.check_at("a", t);
        assert!(!d.allowed && d.retry_after_secs == 1, "{d:?}");
        assert!(
            l.check_at("a", t + Duration::from_millis(150)).allowed,
            "refilled at 10/s"
        );
    }

    /// Times can come a little out of order (read before the lock is taken, by
    /// requests on several threads): an earlier time than the bucket's last must
    /// not make the next refill count the same stretch twice.
    #[test]
    fn token_bucket_counts_time_once_when_requests_come_out_of_order() {
        let l = limiter(RateAlgorithm::TokenBucket, 10, Some(3), 10);
        let t = Instant::now();
        for _ in 0..3 {
            assert!(l.check_at("a", t).allowed);
        }
        let later = t + Duration::from_millis(150);
        assert!(l.check_at("a", later).allowed, "1.5 tokens back, 0.5 left");
        assert!(!l.check_at("a", t + Duration::from_millis(100)).allowed);
        let d = l.check_at("a", later);
        assert!(
            !d.allowed,
            "no time passed since {later:?}: still 0.5 tokens: {d:?}"
        );
    }

    #[tokio::test]
    async fn stage_alone_sets_headers_and_rejects() {
        use crate::routing::testing::routed;
        use crate::stage::testing::{ok, stub};
        use http::Request;
        let toml = r#"
            [pools.p]
            backends = [{ address = "127.0.0.1:9" }]
            [rate_limits.two]
            algorithm = "fixed-window"
            limit = 2
            window_ms = 60000
            [[routes]]
            name = "r"
            path = "/"
            pool = "p"
            rate_limit = "two"
        "#;
        let (cfg, first) = routed(toml, Request::get("/x"));
        let registry = LimiterRegistry::default();
        let limiters: Limiters = cfg
            .rate_limits
            .iter()
            .map(|(n, c)| (n.clone(), registry.get(n, c)))
            .collect();
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let conn = first.req.ctx().conn.clone();
            let req = crate::ctx::Req::new(Request::new(()), crate::ctx::ReqCtx::new(conn, 0));
            let r = Routed {
                req,
                route: first.route.clone(),
            };
            let resp = rate_limit_stage(&limiters, r, stub(ok)).await;
            assert!(resp.headers().contains_key("ratelimit-limit"));
            statuses.push(resp.status().as_u16());
        }
        assert_eq!(statuses, [200, 200, 429]);
    }

    #[test]
    fn header_values_match_the_decision() {
        for n in [0, 1, 9, 10, 99, 100_000_000, u64::MAX] {
            assert_eq!(number(n), n.to_string().as_str());
        }
        for (alg, burst) in [
            (RateAlgorithm::FixedWindow, None),
            (RateAlgorithm::SlidingWindow, Some(7)),
            (RateAlgorithm::TokenBucket, None),
            (RateAlgorithm::TokenBucket, Some(7)),
        ] {
            let l = limiter(alg, 5, burst, 10);
            let d = l.check_at("a", Instant::now());
            let mut h = HeaderMap::new();
            set_headers(&mut h, &l, &d);
            assert_eq!(h[LIMIT], d.limit.to_string().as_str(), "{alg:?} {burst:?}");
            assert_eq!(h[REMAINING], d.remaining.to_string().as_str());
        }
    }

    /// Every request's `RateLimit-Remaining` is its own decision's, also where the
    /// pre-rendered "full budget" value could be mistaken for it (a window policy
    /// with a `burst` that is not its limit).
    #[test]
    fn remaining_header_follows_every_decision() {
        for (alg, limit, burst) in [
            (RateAlgorithm::FixedWindow, 10, Some(5)),
            (RateAlgorithm::SlidingWindow, 10, Some(5)),
            (RateAlgorithm::FixedWindow, 3, None),
            (RateAlgorithm::TokenBucket, 10, Some(5)),
            (RateAlgorithm::TokenBucket, 4, None),
        ] {
            let l = limiter(alg, limit, burst, 10);
            let t = Instant::now();
            for i in 0..12 {
                let d = l.check_at("a", t);
                let mut h = HeaderMap::new();
                set_headers(&mut h, &l, &d);
                let what = format!("{alg:?} limit {limit} burst {burst:?} request {i}");
                assert_eq!(h[REMAINING], d.remaining.to_string().as_str(), "{what}");
                assert_eq!(h[LIMIT], d.limit.to_string().as_str(), "{what}");
                assert_eq!(h.contains_key(header::RETRY_AFTER), !d.allowed, "{what}");
            }
        }
    }

    #[test]
    fn key_kinds_are_separate_budgets() {
        let l = limiter(RateAlgorithm::FixedWindow, 1, None, 10);
        let t = Instant::now();
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        assert!(l.check_key_at(KeyRef::Ip(ip), t).allowed);
        assert!(!l.check_key_at(KeyRef::Ip(ip), t).allowed, "same address");
        // A user id or API key that reads like the address is another caller.
        assert!(l.check_key_at(KeyRef::Name("10.0.0.1"), t).allowed);
        assert!(!l.check_at("10.0.0.1", t).allowed, "found again by &str");
        assert_eq!(l.len(), 2);
    }

    #[test]
    fn idle_keys_are_evicted() {
        let l = limiter(RateAlgorithm::FixedWindow, 5, None, 100);
        let t = Instant::now();
        for i in 0..100 {
            l.check_at(&format!("k{i}"), t);
        }
        l.check_at("late", t + Duration::from_secs(5));
        assert!(l.len() <= 100, "bounded: {}", l.len());
        assert_eq!(l.len(), 1, "idle keys dropped");
    }
}
