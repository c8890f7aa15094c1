//! Tokens that verified recently. Clients send the same token with every request,
//! and checking its signature and parsing its claims is most of what auth costs, so
//! a token seen again is taken from here: only while it has not expired (`exp` plus
//! the leeway, as at verification) and for at most `TOKEN_CACHE_TTL`. A config
//! reload builds a new `Authenticator`, so new keys or rules start from empty.
//!
//! Bounded in entries and in bytes (`auth.jwt.token_cache_max_entries` / `_bytes`;
//! tokens are client-chosen and may be kilobytes each): when a new token would pass
//! either bound, tokens past their time go, and if that is not enough the oldest,
//! down to 3/4 of both bounds, so the scan is paid once per quarter of the cache,
//! not per insertion.

use super::Identity;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How long a verified token may be accepted again without re-checking it; also how
/// long a key removed from the JWKS can go on vouching for tokens it signed.
pub(super) const TOKEN_CACHE_TTL: Duration = Duration::from_secs(30);
/// What an entry costs beside its token's bytes: the map's slot, `Verified`, the
/// key's allocation header.
const ENTRY_OVERHEAD: usize = 96;

/// Tokens are client-chosen: hashbrown's default hasher (foldhash, seeded at random
/// per process and map) keeps HashDoS resistance at a fraction of SipHash's cost
/// over a few hundred bytes of token.
///
/// Keyed by the token's bytes as they are in the request's header: a lookup makes no
/// copy and no `&str` of them (a token in the cache was a valid `&str` when it went
/// in, so equal bytes are one too).
pub(super) struct TokenCache {
    inner: std::sync::Mutex<Inner>,
}

struct Inner {
    entries: hashbrown::HashMap<TokenKey, Verified>,
    /// The entries' cost: token bytes plus `ENTRY_OVERHEAD` each.
    bytes: usize,
    /// At most this many tokens.
    max_entries: usize,
    /// At most this many bytes, as `bytes` counts them.
    max_bytes: usize,
}

/// A cached token: compared on all its bytes, hashed on its last `HASHED_TAIL`.
/// A JWT ends in its signature, and any two tokens that verified differ there (a
/// different payload or key signs differently), so the tail tells cached tokens
/// apart as well as all of a token would, for a fraction of the hashing. Only
/// verified tokens go in, so a client cannot fill one bucket with look-alikes.
#[derive(PartialEq, Eq)]
struct TokenKey(Box<[u8]>);

/// `TokenKey`, borrowed from the request's header.
#[derive(Clone, Copy)]
struct TokenRef<'a>(&'a [u8]);

const HASHED_TAIL: usize = 32;

impl std::hash::Hash for TokenRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        h.write(&self.0[self.0.len().saturating_sub(HASHED_TAIL)..]);
    }
}

// `TokenKey` and `TokenRef` hash alike (hashbrown finds a key by its `TokenRef`).
impl std::hash::Hash for TokenKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        TokenRef(&self.0).hash(h);
    }
}

impl hashbrown::Equivalent<TokenKey> for TokenRef<'_> {
    fn equivalent(&self, key: &TokenKey) -> bool {
        *self.0 == *key.0
    }
}

struct Verified {
    identity: Arc<Identity>,
    /// The wall-clock time from which the token counts as expired: the start of the
    /// second after `exp` plus the leeway (`jsonwebtoken` compares whole seconds).
    /// Compared with the clock as it is, not turned into seconds since the epoch.
    expires: SystemTime,
    /// When the cache stops vouching for it (`TOKEN_CACHE_TTL` after it went in);
    /// also its age, for eviction.
    stale: Instant,
}

fn cost(token_len: usize) -> usize {
    token_len + ENTRY_OVERHEAD
}

impl TokenCache {
    pub(super) fn new(max_entries: usize, max_bytes: usize) -> TokenCache {
        TokenCache {
            inner: std::sync::Mutex::new(Inner {
                entries: hashbrown::HashMap::new(),
                bytes: 0,
                max_entries,
                max_bytes,
            }),
        }
    }

    /// The identity of `token` if it verified recently and has not expired since.
    /// `now`: the caller's monotonic clock reading (for the cache's own age limit);
    /// expiry is judged on the wall clock, as at verification.
    pub(super) fn get(&self, token: &[u8], now: Instant) -> Option<Arc<Identity>> {
        let mut inner = self.inner.lock().ok()?;
        let hit = inner.entries.get(&TokenRef(token))?;
        if now < hit.stale && SystemTime::now() < hit.expires {
            return Some(hit.identity.clone());
        }
        if inner.entries.remove(&TokenRef(token)).is_some() {
            inner.bytes -= cost(token.len());
        }
        None
    }

    /// `valid_until`: the last Unix second in which the token counts as unexpired.
    pub(super) fn put(&self, token: &str, identity: &Arc<Identity>, valid_until: u64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let now = Instant::now();
        let stale = now + TOKEN_CACHE_TTL;
        // An `exp` past what `SystemTime` holds (2^63 s) is far future: the cache's
        // own age limit is the one that applies.
        let expires = std::time::UNIX_EPOCH
            .checked_add(Duration::from_secs(valid_until.saturating_add(1)))
            .unwrap_or_else(|| SystemTime::now() + TOKEN_CACHE_TTL);
        let key = TokenKey(token.as_bytes().into());
        if let Some(old) = inner.entries.remove(&TokenRef(&key.0)) {
            drop(old);
            inner.bytes -= cost(token.len());
        }
        let c = cost(token.len());
        if c > inner.max_bytes / 4 {
            // Would take a quarter of the cache alone (a head that large is refused
            // long before; this is the bound's guard, not a case that happens).
            return;
        }
        if inner.entries.len() >= inner.max_entries || inner.bytes + c > inner.max_bytes {
            inner.evict(now);
        }
        inner.bytes += c;
        inner.entries.insert(
            key,
            Verified {
                identity: identity.clone(),
                expires,
                stale,
            },
        );
    }

    /// (entries, bytes as the bound counts them).
    #[cfg(test)]
    pub(super) fn size(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("lock");
        (inner.entries.len(), inner.bytes)
    }
}

impl Inner {
    /// Drop tokens past their time, then, if still over 3/4 of either bound, the
    /// oldest until under both.
    fn evict(&mut self, now: Instant) {
        let wall = SystemTime::now();
        self.entries
            .retain(|_, v| now < v.stale && wall < v.expires);
        self.bytes = self.entries.keys().map(|k| cost(k.0.len())).sum();
        let (max_n, max_bytes) = (self.max_entries / 4 * 3, self.max_bytes / 4 * 3);
        if self.entries.len() <= max_n && self.bytes <= max_bytes {
            return;
        }
        // Oldest first: `stale` is insertion time plus the same TTL for all.
        let mut ages: Vec<(Instant, usize)> = self
            .entries
            .iter()
            .map(|(k, v)| (v.stale, cost(k.0.len())))
            .collect();
        ages.sort_unstable_by_key(|&(stale, _)| stale);
        let (mut n, mut bytes) = (self.entries.len(), self.bytes);
        let mut cutoff = None;
        for (stale, c) in ages {
            if n <= max_n && bytes <= max_bytes {
                break;
            }
            n -= 1;
            bytes -= c;
            cutoff = Some(stale);
        }
        if let Some(cutoff) = cutoff {
            self.entries.retain(|_, v| v.stale > cutoff);
            self.bytes = self.entries.keys().map(|k| cost(k.0.len())).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        super::super::tests::now()
    }

    /// The configuration's defaults.
    const MAX_ENTRIES: usize = 10_000;
    const MAX_BYTES: usize = 4 << 20;

    impl Default for TokenCache {
        fn default() -> TokenCache {
            TokenCache::new(MAX_ENTRIES, MAX_BYTES)
        }
    }

    #[test]
    fn token_cache_honours_expiry() {
        let cache = TokenCache::default();
        let id = Arc::new(Identity::new("u".into(), vec![], None));
        cache.put("fresh", &id, now() + 60);
        cache.put("expired", &id, now() - 1);
        let now = Instant::now();
        assert_eq!(cache.get(b"fresh", now), Some(id.clone()));
        assert_eq!(cache.get(b"expired", now), None);
        assert_eq!(cache.get(b"unknown", now), None);
        assert_eq!(cache.get(b"fresh", now + TOKEN_CACHE_TTL), None, "too old");
        // Tokens alike in their hashed tail are still told apart by all their bytes.
        let tail = "s".repeat(HASHED_TAIL);
        let other = Arc::new(Identity::new("v".into(), vec![], None));
        cache.put(&format!("a.{tail}"), &id, self::now() + 60);
        cache.put(&format!("b.{tail}"), &other, self::now() + 60);
        assert_eq!(cache.get(format!("a.{tail}").as_bytes(), now), Some(id));
        assert_eq!(cache.get(format!("b.{tail}").as_bytes(), now), Some(other));
        assert_eq!(cache.get(tail.as_bytes(), now), None, "the tail alone");
    }

    /// Hostile finding s14-11b: 3000 distinct valid 8 KB tokens were all kept
    /// (+32 MB RSS). The cache holds at most `MAX_ENTRIES` tokens and
    /// `MAX_BYTES` of them, and the newest stay.
    #[test]
    fn token_cache_is_bounded_in_entries_and_bytes() {
        let cache = TokenCache::default();
        let id = Arc::new(Identity::new("u".into(), vec![], None));
        let big = |i: usize| format!("{}{i:08}", "x".repeat(8 * 1024));
        for i in 0..3000 {
            cache.put(&big(i), &id, now() + 600);
            let (n, bytes) = cache.size();
            assert!(n <= MAX_ENTRIES, "{n} entries after {i}");
            assert!(bytes <= MAX_BYTES, "{bytes} bytes after {i}");
        }
        let at = Instant::now();
        assert!(
            cache.get(big(2999).as_bytes(), at).is_some(),
            "the newest stays"
        );
        assert!(
            cache.get(big(0).as_bytes(), at).is_none(),
            "the oldest went"
        );
        // Small tokens: bounded by count, and a full cache is not simply emptied.
        let cache = TokenCache::default();
        for i in 0..MAX_ENTRIES + 10 {
            cache.put(&format!("t{i}"), &id, now() + 600);
        }
        let (n, _) = cache.size();
        assert!(n <= MAX_ENTRIES, "{n}");
        assert!(n >= MAX_ENTRIES / 2, "{n}: most are kept");
        let last = format!("t{}", MAX_ENTRIES + 9);
        assert!(cache.get(last.as_bytes(), at).is_some());
    }

    /// `auth.jwt.token_cache_max_entries` reaches the authenticator's cache: with
    /// room for 2 tokens, the third verified one pushes out the oldest.
    #[tokio::test]
    async fn the_configured_bound_applies() {
        use super::super::tests::{cfg, token};
        use crate::config::AuthMode;
        let mut c = cfg();
        c.token_cache_max_entries = 2;
        let a = super::super::Authenticator::new(Some(&c), &[], None).expect("auth");
        let bearer = |sub: &str| {
            let claims =
                serde_json::json!({"sub": sub, "iss": "iss", "aud": "aud", "exp": now() + 60});
            let mut h = http::HeaderMap::new();
            let v = format!("Bearer {}", token(claims, "s3cret"));
            h.insert(http::header::AUTHORIZATION, v.parse().expect("hv"));
            h
        };
        let cached = |h: &http::HeaderMap| {
            a.authenticate_cached(AuthMode::Jwt, &[], h, Instant::now())
                .is_some()
        };
        let (first, second, third) = (bearer("a"), bearer("b"), bearer("c"));
        for h in [&first, &second, &third] {
            a.authenticate(AuthMode::Jwt, &[], h).await.expect("valid");
        }
        assert!(!cached(&first), "the oldest went");
        assert!(cached(&third));
    }
}
