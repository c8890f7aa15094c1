//! The gateway's state: an atomically swapped `Runtime` built from one config, plus
//! the state that must survive reloads (backends, rate-limit counters, JWKS caches).

use crate::auth::{Authenticator, JwksCache, KeyError};
use crate::balance::{BackendRegistry, Pool};
use crate::config::{Config, ConfigError};
use crate::observe::AccessLog;
use crate::proxy::{Upstream, Upstreams};
use crate::ratelimit::LimiterRegistry;
use crate::routing::Router;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Resolve(Vec<crate::resolve::ResolveError>),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    // `error`, not `source`: the message already ends with it, and an error chain
    // (`{:#}`) would print it twice.
    #[error("listener {name}: cannot bind {addr}: {error}")]
    Bind {
        name: String,
        addr: String,
        error: std::io::Error,
    },
    // `error`, not `source`, as for `Bind` (hostile s16-F8: "Too many open files (os
    // error 24): Too many open files (os error 24)").
    #[error("worker {index}: cannot start its thread or runtime: {error}")]
    Worker {
        index: usize,
        error: std::io::Error,
    },
    #[error("no config file to reload from")]
    NoConfigPath,
}

/// Everything derived from one config generation.
pub struct Runtime {
    pub cfg: Config,
    pub router: Router,
    pub upstreams: Upstreams,
    pub auth: Authenticator,
    pub limiters: crate::ratelimit::Limiters,
    /// Shared by every generation: a reload does not forgive failed logins.
    pub auth_failures: Arc<crate::auth::FailureLimiter>,
    /// 1 for the config the gateway started with, +1 per applied reload.
    pub generation: u64,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

impl Runtime {
    fn stop_tasks(&self) {
        if let Ok(mut t) = self.tasks.lock() {
            for h in t.drain(..) {
                h.abort();
            }
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop_tasks();
    }
}

/// A JWKS cache and its refresher task, kept while some config uses the URL.
type JwksEntry = (Arc<JwksCache>, Arc<tokio::task::JoinHandle<()>>);

pub struct Shared {
    pub runtime: ArcSwap<Runtime>,
    backends: BackendRegistry,
    pub limiters: LimiterRegistry,
    pub auth_failures: Arc<crate::auth::FailureLimiter>,
    jwks: Mutex<HashMap<String, JwksEntry>>,
    pub access_log: Arc<AccessLog>,
    pub config_path: Option<PathBuf>,
    /// Serialises reloads so SIGHUP and the file watcher cannot interleave.
    reload_lock: tokio::sync::Mutex<()>,
    /// Last known addresses of backends given by DNS name.
    pub dns: crate::resolve::DnsCache,
    /// Sampled request traces (`[admin]`), kept across reloads.
    pub traces: Arc<crate::trace::TraceBuffer>,
    /// Tunnels cut at the drain's limit so far (`RunningGateway::cut` says how many).
    pub tunnels_cut: std::sync::atomic::AtomicU64,
    /// Config generations built so far.
    generations: std::sync::atomic::AtomicU64,
    /// The listeners as the config at start named them: what is bound (a reload does not
    /// rebind), so what reload warnings and the admin listener compare with.
    pub bound: Arc<Config>,
}

/// Cheap to clone handle on the running gateway.
#[derive(Clone)]
pub struct Gateway {
    pub shared: Arc<Shared>,
}

impl Gateway {
    /// Build from a validated config. Must run inside a Tokio runtime (it starts
    /// health checks and JWKS refreshers).
    pub fn new(cfg: Config, config_path: Option<PathBuf>) -> Result<Gateway, GatewayError> {
        let errors = cfg.validate();
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors).into());
        }
        crate::stats::prometheus();
        let access_log = Arc::new(AccessLog::new());
        let shared = Arc::new(Shared {
            runtime: ArcSwap::from_pointee(Runtime {
                cfg: cfg.clone(),
                router: Router::new(&[]),
                upstreams: Upstreams::new(),
                auth: Authenticator::new(None, &[], None)?,
                limiters: Default::default(),
                auth_failures: Arc::default(),
                generation: 0,
                tasks: Mutex::new(Vec::new()),
            }),
            backends: BackendRegistry::default(),
            limiters: LimiterRegistry::default(),
            auth_failures: Arc::default(),
            jwks: Mutex::new(HashMap::new()),
            access_log,
            config_path,
            reload_lock: tokio::sync::Mutex::new(()),
            dns: Default::default(),
            traces: Arc::new(crate::trace::TraceBuffer::new(trace_capacity(&cfg))),
            tunnels_cut: std::sync::atomic::AtomicU64::new(0),
            generations: Default::default(),
            bound: Arc::new(cfg.clone()),
        });
        shared
            .dns
            .resolve_missing_blocking(&cfg)
            .map_err(GatewayError::Resolve)?;
        let gw = Gateway { shared };
        let rt = gw.build_runtime(cfg)?;
        gw.shared.runtime.store(Arc::new(rt));
        let weak = Arc::downgrade(&gw.shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(30)).await;
                let Some(s) = weak.upgrade() else { break };
                s.limiters.sweep();
                let window = s.runtime.load().cfg.auth.failure_limit.window_ms;
                s.auth_failures.sweep(Duration::from_millis(window));
            }
        });
        Ok(gw)
    }

    pub fn runtime(&self) -> Arc<Runtime> {
        self.shared.runtime.load_full()
    }

    fn build_runtime(&self, cfg: Config) -> Result<Runtime, GatewayError> {
        let jwks = match cfg.auth.jwt.as_ref().and_then(|j| {
            j.jwks_url
                .clone()
                .map(|u| (u, j.jwks_refresh_secs, j.jwks_ca_file.clone()))
        }) {
            None => None,
            Some((url, every, ca)) => {
                let key = jwks_key(&url, ca.as_deref());
                let mut map = self.shared.jwks.lock().unwrap_or_else(|p| p.into_inner());
                let cache = match map.get(&key) {
                    Some((cache, _)) => cache.clone(),
                    None => {
                        let cache = JwksCache::new(&url, ca.as_deref())?;
                        let h = crate::auth::spawn_jwks_refresh(
                            cache.clone(),
                            Duration::from_secs(every),
                        );
                        map.insert(key, (cache.clone(), Arc::new(h)));
                        cache
                    }
                };
                Some(cache)
            }
        };
        let auth = Authenticator::new(cfg.auth.jwt.as_ref(), &cfg.auth.api_keys, jwks)?;
        let limiters = cfg
            .rate_limits
            .iter()
            .map(|(n, c)| (n.clone(), self.shared.limiters.get(n, c)))
            .collect();
        // Health checkers start last: nothing after this point can fail and leave
        // them running for a runtime that never went live.
        let mut tasks = Vec::new();
        let mut upstreams = Upstreams::new();
        for (name, pcfg) in &cfg.pools {
            let pcfg = self.shared.dns.expand(pcfg);
            let up = Arc::new(Upstream::new(Pool::new(name, &pcfg, &self.shared.backends)));
            for b in &up.pool.backends {
                b.set_healthy(b.is_healthy());
            }
            if let Some(h) = crate::health::spawn_checks(up.clone()) {
                tasks.push(h);
            }
            upstreams.insert(name.clone(), up);
        }
        tasks.extend(spawn_refresh(
            Arc::downgrade(&self.shared),
            &cfg,
        ));
        let generation = self
            .shared
            .generations
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        Ok(Runtime {
            generation,
            router: Router::new(&cfg.routes),
            upstreams,
            auth,
            limiters,
            auth_failures: self.shared.auth_failures.clone(),
            tasks: Mutex::new(tasks),
            cfg,
        })
    }

    /// Apply a new config to new requests. In-flight requests keep the old runtime
    /// through their `Arc`; balancer state is shared via the registries.
    pub async fn reload(&self, mut cfg: Config) -> Result<(), GatewayError> {
        let _g = self.shared.reload_lock.lock().await;
        let errors = cfg.validate();
        if !errors.is_empty() {
            return Err(ConfigError::Invalid(errors).into());
        }
        self.shared
            .dns
            .refresh(&cfg)
            .await
            .map_err(GatewayError::Resolve)?;
        let old = self.runtime();
        for change in listener_changes(&self.shared.bound, &cfg) {
            tracing::warn!("{change}");
        }
        if let Some(note) = crate::fd_limit::fit_default(&mut cfg, crate::fd_limit::current()) {
            tracing::info!("{note}");
        }
        if let Some(w) = crate::fd_limit::shortfall(&cfg, crate::fd_limit::current()) {
            tracing::warn!("{w}");
        }
        let rt = self.build_runtime(cfg)?;
        self.shared.traces.set_capacity(trace_capacity(&rt.cfg));
        self.shared.runtime.store(Arc::new(rt));
        old.stop_tasks();
        self.drop_unused_jwks();
        tracing::info!("configuration reloaded");
        Ok(())
    }

    fn drop_unused_jwks(&self) {
        let rt = self.runtime();
        let keep = rt
            .cfg
            .auth
            .jwt
            .as_ref()
            .and_then(|j| Some(jwks_key(j.jwks_url.as_deref()?, j.jwks_ca_file.as_deref())));
        if let Ok(mut map) = self.shared.jwks.lock() {
            map.retain(|url, (_, h)| {
                let keep = keep.as_deref() == Some(url.as_str());
                if !keep {
                    h.abort();
                }
                keep
            });
        }
    }

    /// Reload from the config file; on failure the running config stays and every
    /// error is logged.
    pub async fn reload_from_file(&self) -> Result<(), GatewayError> {
        let path = self
            .shared
            .config_path
            .clone()
            .ok_or(GatewayError::NoConfigPath)?;
        let result = match Config::load(&path) {
            Ok(cfg) => self.reload(cfg).await,
            Err(e) => Err(e.into()),
        };
        if let Err(e) = &result {
            match e {
                GatewayError::Config(ConfigError::Invalid(errs)) => {
                    for fe in errs {
                        tracing::error!(path = %fe.path, "invalid reload, keeping running config: {}", fe.message);
                    }
                }
                other => tracing::error!("reload failed, keeping running config: {other}"),
            }
        }
        result
    }
}

/// Without `[admin]` nothing is traced; the buffer stays minimal.
/// The listener changes in `new` against what is `bound` (the config at start: a reload does
/// not rebind), each a sentence naming its field and what happens until a restart.
fn listener_changes(bound: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    let binds = |c: &Config| c.listeners.iter().map(|l| (l.name.clone(), l.bind.clone())).collect::<Vec<_>>();
    let (before, after) = (binds(bound), binds(new));
    if before != after {
        let show = |v: &[(String, String)]| {
            v.iter().map(|(n, b)| format!("{n}={b}")).collect::<Vec<_>>().join(", ")
        };
        out.push(format!(
            "listeners [{}] differ from the bound [{}]: not applied until a restart, the bound ones keep serving",
            show(&after),
            show(&before)
        ));
    }
    let admin = |c: &Config| c.admin.as_ref().map(|a| a.listen.clone());
    match (admin(bound), admin(new)) {
        (a, b) if a == b => {}
        (Some(a), Some(b)) => out.push(format!(
            "admin.listen {b:?} differs from the bound {a:?}: not applied until a restart, the bound listener answers 404 until then"
        )),
        (Some(a), None) => out.push(format!(
            "[admin] removed: the bound listener on {a:?} answers 404 until a restart closes it"
        )),
        (None, Some(b)) => out.push(format!("[admin] added on {b:?}: not listening until a restart")),
        (None, None) => {}
    }
    // The file watcher is started with the start's interval (`reload::spawn_file_watch`).
    let (was, now) = (bound.server.reload_poll_ms, new.server.reload_poll_ms);
    if was != now {
        out.push(format!(
            "server.reload_poll {now} ms differs from the {was} ms at start: not applied until a restart (0 = SIGHUP only)"
        ));
    }
    out
}

fn trace_capacity(cfg: &Config) -> usize {
    cfg.admin.as_ref().map_or(1, |a| a.trace_buffer)
}

/// A JWKS cache is reused only for the same URL trusted the same way.
fn jwks_key(url: &str, ca_file: Option<&str>) -> String {
    format!("{url}|{}", ca_file.unwrap_or_default())
}

/// Re-resolve the config's names every `server.dns_refresh`, rebuilding the runtime when
/// an address set changed (here rather than in `resolve`, which must not depend on the
/// gateway). None when no backend is named. The task belongs to one runtime
/// and is stopped with it; the next runtime starts its own.
fn spawn_refresh(
    shared: std::sync::Weak<Shared>,
    cfg: &Config,
) -> Option<tokio::task::JoinHandle<()>> {
    if !crate::resolve::uses_names(cfg) {
        return None;
    }
    let every = std::time::Duration::from_millis(cfg.server.dns_refresh_ms.max(1));
    Some(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(shared) = shared.upgrade() else {
                break;
            };
            let gw = Gateway { shared };
            let cfg = gw.runtime().cfg.clone();
            match gw.shared.dns.refresh(&cfg).await {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!("backend addresses changed after re-resolving names");
                    if let Err(e) = gw.reload(cfg).await {
                        tracing::error!("cannot apply re-resolved addresses: {e}");
                    }
                }
                Err(errors) => {
                    for e in errors {
                        tracing::warn!("{e}");
                    }
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_changes_a_reload_cannot_apply_are_named() {
        let parse = |admin: &str, bind: &str| {
            Config::parse(&format!("[[listeners]]\nname = \"p\"\nbind = \"{bind}\"\n{admin}")).expect("config")
        };
        let admin = |listen: &str| format!("[admin]\nlisten = \"{listen}\"\n");
        let base = parse(&admin("127.0.0.1:9901"), "127.0.0.1:80");
        assert!(listener_changes(&base, &base).is_empty());
        assert_eq!(
            listener_changes(&base, &parse(&admin("127.0.0.1:9902"), "127.0.0.1:80")),
            ["admin.listen \"127.0.0.1:9902\" differs from the bound \"127.0.0.1:9901\": not applied until a restart, the bound listener answers 404 until then"]
        );
        let removed = listener_changes(&base, &parse("", "127.0.0.1:80"));
        assert!(removed.len() == 1 && removed[0].starts_with("[admin] removed"), "{removed:?}");
        let added = listener_changes(&parse("", "127.0.0.1:80"), &base);
        assert!(added.len() == 1 && added[0].starts_with("[admin] added"), "{added:?}");
        // Hostile test s16-F7: a reload silently kept the start's file-poll interval.
        let poll = Config::parse("[server]\nreload_poll_ms = 0\n[[listeners]]\nname = \"p\"\nbind = \"127.0.0.1:80\"\n[admin]\nlisten = \"127.0.0.1:9901\"\n").expect("config");
        assert_eq!(
            listener_changes(&base, &poll),
            ["server.reload_poll 0 ms differs from the 1000 ms at start: not applied until a restart (0 = SIGHUP only)"]
        );
        assert_eq!(
            listener_changes(&base, &parse(&admin("127.0.0.1:9901"), "127.0.0.1:81")),
            ["listeners [p=127.0.0.1:81] differ from the bound [p=127.0.0.1:80]: not applied until a restart, the bound ones keep serving"]
        );
    }
}
