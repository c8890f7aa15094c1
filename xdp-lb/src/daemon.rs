//! The daemon's state and its one control loop's operations: the desired configuration (config file
//! plus every CLI change, persisted to the state file), what health and passive checks observed,
//! and the map programming that follows from both.

mod passive;
mod requests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{bail, Context, Result};
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{error, info, warn};

use crate::{
    config::{Config, RawConfig, Scheduler},
    dataplane::{self, Dataplane},
    health::{HealthMonitor, Transition},
    neighbours,
    plan::{self, BackendKey, Observed, ServiceHealth},
    tables::Tables,
};

pub use passive::Passive;

pub struct Daemon {
    desired: RawConfig,
    config: Config,
    pub(crate) dataplane: Dataplane,
    pub(crate) tables: Tables,
    monitor: HealthMonitor,
    state_file: Option<PathBuf>,
    /// When each drained backend started draining.
    drains: HashMap<BackendKey, Instant>,
    passive: Passive,
    latency_weights: HashMap<BackendKey, u32>,
    report: Vec<ServiceHealth>,
    /// The effective configuration last programmed (weights after health, backups, drain).
    effective: Config,
}

impl Daemon {
    /// Programs `desired` into a loaded (not yet attached) data plane.
    pub fn new(
        desired: RawConfig,
        dataplane: Dataplane,
        state_file: Option<PathBuf>,
    ) -> Result<(Daemon, UnboundedReceiver<Transition>)> {
        let config = desired.validate().map_err(|errors| anyhow::anyhow!("{}", join_errors(&errors)))?;
        let mut tables = Tables::new(config.dataplane.maglev_cells, dataplane::MAX_SERVICES, dataplane::MAX_BACKENDS);
        if dataplane.is_pinned() {
            let adopted = tables.adopt(&config, &dataplane).context("adopting the pinned maps")?;
            if adopted > 0 {
                info!(services = adopted, "adopted the running data plane's services; established flows keep their backends");
            }
        }
        let (monitor, transitions) = HealthMonitor::new();
        let mut daemon = Daemon {
            desired,
            effective: config.clone(),
            config,
            dataplane,
            tables,
            monitor,
            state_file,
            drains: HashMap::new(),
            passive: Passive::default(),
            latency_weights: HashMap::new(),
            report: Vec::new(),
        };
        daemon.replan().context("programming the services")?;
        daemon.persist()?;
        Ok((daemon, transitions))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// Per service: how many backends serve, whether backups do, whether all are down.
    pub fn service_health(&self) -> &[ServiceHealth] {
        &self.report
    }

    /// The counters of every installed service and backend.
    pub fn snapshot(&self) -> Result<crate::stats::Snapshot, crate::dataplane::DataplaneError> {
        crate::stats::snapshot(&self.dataplane, &self.tables)
    }

    /// Recomputes the effective services from the desired ones and what was observed, and programs
    /// the difference.
    pub fn replan(&mut self) -> Result<()> {
        let now = Instant::now();
        let drained: HashSet<BackendKey> = self
            .config
            .services
            .iter()
            .flat_map(|s| s.backends.iter().filter(|b| b.drained).map(|b| (s.name.clone(), b.address)))
            .collect();
        self.drains.retain(|k, _| drained.contains(k));
        for k in drained {
            self.drains.entry(k).or_insert(now);
        }
        let expired: HashSet<BackendKey> = self
            .drains
            .iter()
            .filter(|((service, _), since)| {
                self.config.services.iter().any(|s| &s.name == service && now.duration_since(**since) >= s.drain_timeout)
            })
            .map(|(k, _)| k.clone())
            .collect();

        self.monitor.set_targets(
            self.config.services.iter().flat_map(|s| s.backends.iter().filter_map(|b| plan::probe_target(s, b))),
        );
        let statuses = self.monitor.statuses();
        let passive_down = self.passive.down();
        let (effective, report) = plan::plan(
            &self.config,
            &Observed {
                health: Some(&statuses),
                passive_down: Some(&passive_down),
                drain_expired: Some(&expired),
                latency_weights: Some(&self.latency_weights),
            },
        );
        for r in &report {
            let before = self.report.iter().find(|p| p.name == r.name);
            if r.all_down && before.is_none_or(|b| !b.all_down) {
                error!(service = %r.name, "ALL BACKENDS DOWN: the service's all_down policy now applies");
            } else if !r.all_down && before.is_some_and(|b| b.all_down) {
                info!(service = %r.name, serving = r.serving, "service has healthy backends again");
            }
            if r.on_backups && before.is_none_or(|b| !b.on_backups) {
                warn!(service = %r.name, backups = r.serving, "no primary backend is healthy: backups take over");
            }
        }
        self.tables.apply(&effective, &mut self.dataplane)?;
        self.report = report;
        self.effective = effective;
        Ok(())
    }

    /// Applies a change to the desired configuration: validated first, refused whole if invalid or
    /// if programming fails (the running state is then restored), persisted once applied.
    pub fn change(&mut self, edit: impl FnOnce(&mut RawConfig) -> Result<(), String>) -> Result<(), String> {
        let mut next = self.desired.clone();
        edit(&mut next)?;
        let config = next.validate().map_err(|errors| join_errors(&errors))?;
        if config.dataplane != self.config.dataplane {
            return Err("[dataplane] sizes cannot change while running (restart xdp-lb to resize the maps)".into());
        }
        let previous = std::mem::replace(&mut self.config, config);
        if let Err(e) = self.replan() {
            self.config = previous;
            if let Err(restore) = self.replan() {
                error!("restoring the previous configuration failed too: {restore:#}");
            }
            return Err(format!("programming the data plane failed: {e:#}"));
        }
        self.desired = next;
        neighbours::warm(self.config.services.iter().flat_map(|s| s.backends.iter().map(|b| b.address)));
        self.persist().map_err(|e| format!("applied, but persisting the state failed: {e:#}"))
    }

    /// Re-reads the config file (SIGHUP): it replaces the desired state, including CLI changes.
    pub fn reload(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let raw: RawConfig = toml::from_str(&text).with_context(|| format!("{} is not valid TOML for xdp-lb", path.display()))?;
        self.change(|desired| {
            *desired = raw;
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    pub fn on_transition(&mut self, t: &Transition) {
        info!(service = %t.target.service, target = %t.target.addr, from = ?t.from, to = ?t.to, reason = %t.reason, "health transition");
        if t.to == crate::health::Health::Up {
            // The active checks see it serving again: a passive hold must not keep it out longer.
            let keys: Vec<BackendKey> = self
                .config
                .services
                .iter()
                .filter(|s| s.name == t.target.service)
                .flat_map(|s| s.backends.iter().filter(|b| plan::probe_target(s, b).is_some_and(|(target, _)| target == t.target)).map(|b| (s.name.clone(), b.address)))
                .collect();
            for k in keys {
                if self.passive.clear(&k) {
                    info!(service = %k.0, backend = %k.1, "passive hold ended: active checks see the backend up");
                }
            }
        }
        if let Err(e) = self.replan() {
            error!("reprogramming after a health transition failed: {e:#}");
        }
    }

    /// Periodic work: passive checks, drain timeouts, least-response-time weights.
    pub fn tick(&mut self) {
        let serving: HashSet<BackendKey> = self
            .effective
            .services
            .iter()
            .flat_map(|s| s.backends.iter().filter(|b| b.weight > 0 && !b.down).map(|b| (s.name.clone(), b.address)))
            .collect();
        crate::flows::reconcile_when_due(&mut self.dataplane, &self.tables);
        let mut changed = self.passive.observe(&self.config, &serving, &self.tables, &self.dataplane);
        changed |= self.update_latency_weights();
        let now = Instant::now();
        changed |= self.drains.iter().any(|((service, address), since)| {
            let timeout = self.config.services.iter().find(|s| &s.name == service).map(|s| s.drain_timeout);
            let down_now = timeout.is_some_and(|t| now.duration_since(*since) >= t);
            let was_down = self.effective_backend(service, address).is_some_and(|b| b.down);
            down_now && !was_down
        });
        if changed {
            if let Err(e) = self.replan() {
                error!("reprogramming failed: {e:#}");
            }
        }
    }

    fn effective_backend(&self, service: &str, address: &std::net::SocketAddr) -> Option<&crate::config::Backend> {
        self.effective.services.iter().find(|s| s.name == service)?.backends.iter().find(|b| &b.address == address)
    }

    /// Least-response-time services: weights from the health checks' latency averages, changed only
    /// when one moves by more than 25 % so the tables do not churn.
    fn update_latency_weights(&mut self) -> bool {
        let statuses = self.monitor.statuses();
        let mut changed = false;
        for s in self.config.services.iter().filter(|s| s.scheduler == Scheduler::LeastResponseTime) {
            let latencies: Vec<(BackendKey, u32, f64)> = s
                .backends
                .iter()
                .filter_map(|b| {
                    let (target, _) = plan::probe_target(s, b)?;
                    let latency = statuses.get(&target)?.latency_ewma_us?;
                    Some(((s.name.clone(), b.address), b.weight, latency))
                })
                .collect();
            let slowest = latencies.iter().map(|(_, _, l)| *l).fold(0.0, f64::max);
            for (key, base, latency) in latencies {
                let weight = plan::latency_weights(base, latency, slowest);
                let old = self.latency_weights.get(&key).copied().unwrap_or(base);
                if (weight as f64 - old as f64).abs() > 0.25 * old as f64 {
                    info!(service = %key.0, backend = %key.1, latency_us = latency as u64, weight, "least-response-time weight");
                    self.latency_weights.insert(key, weight);
                    changed = true;
                }
            }
        }
        changed
    }

    fn persist(&self) -> Result<()> {
        let Some(path) = &self.state_file else { return Ok(()) };
        let text = toml::to_string_pretty(&self.desired).context("serialising the state")?;
        write_atomically(path, text.as_bytes())
    }
}

/// Writes `path` so that a crash leaves either the old or the new file, never a torn one.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("state")));
    let mut file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Loads the desired state: the state file if there is one (it holds CLI changes), else the config.
pub fn load_desired(config_path: &Path, state_file: Option<&Path>) -> Result<RawConfig> {
    let (path, origin) = match state_file {
        Some(state) if state.exists() => (state, "state file"),
        _ => (config_path, "config file"),
    };
    let text = std::fs::read_to_string(path).with_context(|| format!("reading the {origin} {}", path.display()))?;
    let raw: RawConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{} is not valid TOML for xdp-lb: {e}", path.display()))?;
    if let Err(errors) = raw.validate() {
        bail!("{} has {} invalid field(s):\n  {}", path.display(), errors.len(), join_errors(&errors).replace("; ", "\n  "));
    }
    info!(%origin, path = %path.display(), "desired state loaded");
    Ok(raw)
}

fn join_errors(errors: &[crate::config::FieldError]) -> String {
    errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}

/// Health of every checked target, for status and metrics.
pub fn statuses(daemon: &Daemon) -> BTreeMap<crate::health::Target, crate::health::Status> {
    daemon.monitor.statuses()
}
