//! Active health checks: GET a path on every backend; `rise` successes in a row mark
//! it healthy, `fall` failures in a row unhealthy. Counters live on the shared
//! `Backend`, so a reload that restarts the checkers keeps each backend's state.

use crate::config::HealthCheckConfig;
use crate::http_util::full;
use crate::proxy::Upstream;
use bytes::Bytes;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub fn spawn_checks(up: Arc<Upstream>) -> Option<tokio::task::JoinHandle<()>> {
    let hc = up.pool.cfg.health_check.clone()?;
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(hc.interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let checks = up.pool.backends.iter().map(|b| {
                let b = b.clone();
                let client = up.client.clone();
                let hc = hc.clone();
                async move {
                    let ok = probe(&client, b.addr, &hc).await;
                    apply(&b, ok, &hc);
                }
            });
            let handles: Vec<_> = checks.map(tokio::spawn).collect();
            for h in handles {
                let _ = h.await;
            }
        }
    }))
}

async fn probe(
    client: &crate::proxy::HttpClient,
    addr: std::net::SocketAddr,
    hc: &HealthCheckConfig,
) -> bool {
    let Ok(req) = http::Request::get(format!("http://{addr}{}", hc.path)).body(full(Bytes::new()))
    else {
        return false;
    };
    match tokio::time::timeout(Duration::from_millis(hc.timeout_ms), client.request(req)).await {
        Ok(Ok(resp)) => resp.status().is_success(),
        _ => false,
    }
}

fn apply(b: &crate::balance::Backend, ok: bool, hc: &HealthCheckConfig) {
    if ok {
        b.health_fall.store(0, Ordering::Relaxed);
        let n = b.health_rise.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= hc.rise {
            b.set_healthy(true);
        }
    } else {
        b.health_rise.store(0, Ordering::Relaxed);
        let n = b.health_fall.fetch_add(1, Ordering::Relaxed) + 1;
        if n >= hc.fall {
            b.set_healthy(false);
        }
    }
}
