//! Hostile 9 H8: a health-check change under which no backend passes (a typo in `--check-path`)
//! took the whole service down within a second or two, with rc 0. Before such an update is
//! applied, the new check probes the service's backends once; if some backend serves now and none
//! passes the new check, the update is refused unless `--force`, like the other updates that break
//! a serving service.
//!
//! The probes run on a runtime of their own in a scoped thread (the control loop's runtime is
//! single-threaded and waits here), all at once, each bounded by the check's timeout and at most
//! [`PROBE_CAP`]: the control loop stalls at most that long, once, for an operator's update.

use std::{net::SocketAddr, time::Duration};

use super::{Daemon, DaemonError};
use crate::{
    api::ServiceChanges,
    config::RawConfig,
    health::{self, CheckSpec},
    plan,
};

/// The longest the pre-check waits for a probe, whatever the check's own timeout.
const PROBE_CAP: Duration = Duration::from_secs(2);
/// Backends probed at most (the first ones in the file): enough to find one that passes.
const MAX_PROBED: usize = 32;

impl Daemon {
    /// The refusal of `changes` to service `name` when its new health check would take every
    /// backend down while some serve now; `None` to go ahead.
    pub(super) fn check_change_refusal(&self, name: &str, changes: &ServiceChanges) -> Option<DaemonError> {
        if changes.health_check.is_none() || changes.force {
            return None;
        }
        let serving_now = self.report.iter().find(|r| r.name == name).is_some_and(|r| r.serving > 0 && !r.all_down);
        if !serving_now {
            // Already down: the new check may be the fix; nothing more to lose.
            return None;
        }
        // The service as it would be: a change that does not validate is refused later, by the
        // usual path, with its field errors.
        let mut next: RawConfig = self.file.loaded.raw.clone();
        super::requests::update_service(&mut next, name, changes.clone()).ok()?;
        let config = next.validate().ok()?;
        let service = config.services.iter().find(|s| s.name == name)?;
        let targets: Vec<(SocketAddr, CheckSpec)> = service
            .backends
            .iter()
            .filter(|b| b.weight > 0 && !b.drained)
            .filter_map(|b| plan::probe_target(service, b).map(|(t, spec)| (t.addr, spec)))
            .take(MAX_PROBED)
            .collect();
        if targets.is_empty() {
            // No check any more (`--check none`) or nothing to check: nothing can fail.
            return None;
        }
        let results = probe_all(targets);
        if results.iter().any(|(_, r)| r.is_ok()) {
            return None;
        }
        let failures: Vec<String> = results.iter().map(|(addr, r)| format!("{addr}: {}", r.as_ref().err().map_or("", String::as_str))).collect();
        Some(DaemonError::CheckFailsEverywhere { service: name.to_string(), failures: failures.join("; ") })
    }
}

/// One probe of each target, all at once; each result is `Err(reason)` or `Ok(())`.
fn probe_all(targets: Vec<(SocketAddr, CheckSpec)>) -> Vec<(SocketAddr, Result<(), String>)> {
    let run = move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => return targets.iter().map(|(a, _)| (*a, Err(format!("cannot probe: {e}")))).collect(),
        };
        runtime.block_on(async {
            let tasks: Vec<_> = targets
                .into_iter()
                .map(|(addr, spec)| {
                    let task = tokio::spawn(async move {
                        let limit = spec.timeout.min(PROBE_CAP);
                        match tokio::time::timeout(limit, health::probe(addr, &spec)).await {
                            Ok(result) => result.map_err(|e| e.to_string()),
                            Err(_) => Err(format!("timeout after {} ms", limit.as_millis())),
                        }
                    });
                    (addr, task)
                })
                .collect();
            let mut out = Vec::new();
            for (addr, task) in tasks {
                out.push((addr, task.await.unwrap_or_else(|e| Err(format!("probe task failed: {e}")))));
            }
            out
        })
    };
    std::thread::scope(|s| s.spawn(run).join().unwrap_or_default())
}
