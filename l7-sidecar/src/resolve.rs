//! Backends given by DNS name (`address = "users.internal:8080"`). Names are resolved when
//! the gateway starts (a name that does not resolve then is an error: the gateway refuses
//! to start, and `--check` fails) and again every `server.dns_refresh` with tokio's
//! `lookup_host`. getaddrinfo reports no TTL, so this is a fixed period, not the record's
//! TTL. A name that stops resolving keeps its last known addresses and is logged.
//!
//! Each resolved address becomes one backend with the name's weight. Backend state lives
//! in the `BackendRegistry` keyed by (pool, address), so an address present before and
//! after a re-resolution keeps its connection counts, health and ejections.

pub use crate::config::addr::{AddrError, BackendAddr};
use crate::config::{BackendConfig, Config, PoolConfig};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Mutex;

/// A name failed to resolve and has no earlier addresses to fall back on.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot resolve {name:?}: {reason}")]
pub struct ResolveError {
    pub path: String,
    pub name: String,
    pub reason: String,
}

/// Named backends of a config: `host:port` → the first field path that uses it.
fn names(cfg: &Config) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (pool, p) in &cfg.pools {
        for (j, b) in p.backends.iter().enumerate() {
            if let Ok(BackendAddr::Name { .. }) = BackendAddr::parse(&b.address) {
                out.entry(key(&b.address))
                    .or_insert_with(|| format!("pools.{pool}.backends[{j}].address"));
            }
        }
    }
    out
}

fn key(address: &str) -> String {
    match BackendAddr::parse(address) {
        Ok(BackendAddr::Name { host, port }) => format!("{host}:{port}"),
        _ => address.to_string(),
    }
}

/// Whether any pool names a backend by DNS name.
pub fn uses_names(cfg: &Config) -> bool {
    !names(cfg).is_empty()
}

/// Last known addresses of every name. Shared by every runtime of a gateway, so a name
/// that stops resolving keeps what it had.
#[derive(Default)]
pub struct DnsCache {
    known: Mutex<HashMap<String, Vec<SocketAddr>>>,
}

impl DnsCache {
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<SocketAddr>>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Resolve the names not yet known, blocking (getaddrinfo): for `Gateway::new`, which
    /// is synchronous and runs once at start.
    pub fn resolve_missing_blocking(&self, cfg: &Config) -> Result<(), Vec<ResolveError>> {
        use std::net::ToSocketAddrs as _;
        let mut errors = Vec::new();
        for (name, path) in names(cfg) {
            if self.known().contains_key(&name) {
                continue;
            }
            match name.to_socket_addrs() {
                Ok(addrs) => self.store(&name, &path, addrs.collect(), &mut errors),
                Err(e) => errors.push(ResolveError {
                    path,
                    name,
                    reason: e.to_string(),
                }),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// Resolve every name again with tokio's resolver. Returns whether any name's
    /// addresses changed; errors only for names with no addresses at all.
    pub async fn refresh(&self, cfg: &Config) -> Result<bool, Vec<ResolveError>> {
        self.refresh_with(cfg, |name| async move {
            tokio::net::lookup_host(name.as_str())
                .await
                .map(|a| a.collect::<Vec<_>>())
        })
        .await
    }

    /// `refresh` with the lookup given, so tests can make names appear, move and vanish.
    pub async fn refresh_with<F, Fut>(
        &self,
        cfg: &Config,
        lookup: F,
    ) -> Result<bool, Vec<ResolveError>>
    where
        F: Fn(String) -> Fut,
        Fut: Future<Output = std::io::Result<Vec<SocketAddr>>>,
    {
        let mut errors = Vec::new();
        let mut changed = false;
        for (name, path) in names(cfg) {
            let before = self.known().get(&name).cloned();
            match lookup(name.clone()).await {
                Ok(addrs) => {
                    self.store(&name, &path, addrs, &mut errors);
                    changed |= self.known().get(&name) != before.as_ref();
                }
                Err(e) if before.is_some() => {
                    tracing::warn!(name = %name, error = %e, "name no longer resolves; keeping its last known addresses");
                }
                Err(e) => errors.push(ResolveError {
                    path,
                    name,
                    reason: e.to_string(),
                }),
            }
        }
        if errors.is_empty() {
            Ok(changed)
        } else {
            Err(errors)
        }
    }

    fn store(
        &self,
        name: &str,
        path: &str,
        mut addrs: Vec<SocketAddr>,
        errors: &mut Vec<ResolveError>,
    ) {
        // Sorted so the same answer in another order is no change (and pools stay stable).
        addrs.sort_unstable();
        addrs.dedup();
        let mut known = self.known();
        if addrs.is_empty() {
            if !known.contains_key(name) {
                errors.push(ResolveError {
                    path: path.to_string(),
                    name: name.to_string(),
                    reason: "no addresses".into(),
                });
            }
            return;
        }
        known.insert(name.to_string(), addrs);
    }

    /// `pool` with every named backend replaced by one backend per known address (same
    /// weight). An address listed twice (by a name and literally) is kept once.
    pub fn expand(&self, pool: &PoolConfig) -> PoolConfig {
        let known = self.known();
        let mut seen = HashSet::new();
        let mut backends = Vec::new();
        for b in &pool.backends {
            let addrs = match BackendAddr::parse(&b.address) {
                Ok(BackendAddr::Ip(a)) => vec![a],
                Ok(BackendAddr::Name { .. }) => {
                    known.get(&key(&b.address)).cloned().unwrap_or_default()
                }
                Err(_) => Vec::new(),
            };
            for a in addrs {
                if seen.insert(a) {
                    backends.push(BackendConfig {
                        address: a.to_string(),
                        weight: b.weight,
                    });
                }
            }
        }
        PoolConfig {
            backends,
            ..pool.clone()
        }
    }
}

#[cfg(test)]
mod tests;
