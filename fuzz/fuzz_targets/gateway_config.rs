//! The gateway's config parser and validator never panic on any text; a config they accept builds
//! its router, pools and rate limiters without a panic, and every exact/prefix route is reachable:
//! a request made of the route's own host, path, method and headers finds a route.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use l7_sidecar::{
    balance::{BackendRegistry, HashInput, Pool},
    config::{Config, PathMatch},
    ratelimit::Limiter,
    routing::{RouteMatch, Router},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(cfg) = Config::parse(text) else { return };

    let router = Router::new(&cfg.routes);
    for r in &cfg.routes {
        if r.path_match == PathMatch::Template {
            continue;
        }
        let host = r.host.as_ref().map(|h| match h.strip_prefix("*.") {
            Some(suffix) => format!("a.{suffix}"),
            None => h.clone(),
        });
        let method = r.methods.first().and_then(|m| m.parse::<Method>().ok()).unwrap_or(Method::GET);
        let mut headers = HeaderMap::new();
        for (k, v) in &r.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                headers.append(k, v);
            }
        }
        match router.lookup(host.as_deref(), &method, &r.path, &headers) {
            RouteMatch::Found { route, params } => {
                let _ = route.upstream_path(&r.path, &params);
            }
            RouteMatch::MethodNotAllowed { .. } | RouteMatch::NotFound => {
                panic!("route {:?} (host {:?}, path {:?}, {method}) is unreachable by its own request", r.name, r.host, r.path)
            }
        }
    }

    let registry = BackendRegistry::default();
    let empty = HeaderMap::new();
    for (name, pool_cfg) in &cfg.pools {
        // Pool::new builds 100 hash-ring entries per unit of weight (validation caps a weight at
        // 65 535): large but legal pools only make the fuzzer slow, so they are skipped here.
        if pool_cfg.backends.iter().map(|b| b.weight as u64).sum::<u64>() > 10_000 {
            continue;
        }
        let pool = Pool::new(name, pool_cfg, &registry);
        let input = HashInput { client_ip: [10, 0, 0, 1].into(), headers: &empty };
        // A `host:port` backend has no address until DNS answers (never, in this harness), so
        // only a pool of literal addresses must have a backend at once.
        let literal = pool_cfg.backends.iter().all(|b| b.address.parse::<std::net::SocketAddr>().is_ok());
        let Some(first) = pool.pick(&input, &[]) else {
            assert!(!literal, "a fresh pool of literal addresses has an available backend");
            continue;
        };
        assert!(first < pool.backends.len());
        pool.record_result(first, true);
        // After failures (and maybe ejections) a pick may find nothing, but never out of range.
        for _ in 0..3 {
            if let Some(picked) = pool.pick(&input, &[first]) {
                assert!(picked < pool.backends.len() && picked != first);
                pool.record_result(picked, true);
            }
        }
    }
    for rl in cfg.rate_limits.values() {
        let limiter = Limiter::new(rl.clone());
        for key in ["a", "b", "a"] {
            let d = limiter.check(key);
            assert!(d.remaining <= d.limit);
        }
    }
});
