//! The daemon's state and its one control loop's operations: the desired configuration (the
//! `--config` file, the single source of truth, which CLI changes are written back to), what health
//! and passive checks observed, and the map programming that follows from both.

mod check_change;
mod error;
mod node_drain;
mod owner;
mod passive;
mod pending;
mod requests;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::mpsc::UnboundedReceiver;
use tracing::{debug, error, info, warn};

use crate::{
    announce::{self, Announcer},
    api::ConfigStatus,
    dashboard::events::{EventLog, Kind},
    config::{
        file::{self, Loaded},
        Config, Protocol, RawConfig, Scheduler,
    },
    dataplane::{self, Dataplane},
    health::{Health, HealthMonitor, Transition},
    neighbours,
    plan::{self, BackendKey, Observed, ServiceHealth},
    tables::{service_key, Tables},
};

pub use error::DaemonError;
pub use passive::Passive;

/// The config file as the daemon last read or wrote it.
struct ConfigFile {
    loaded: Loaded,
    /// When it was last read (start, reload) or written (CLI change).
    at: SystemTime,
}

pub struct Daemon {
    file: ConfigFile,
    config: Config,
    pub(crate) dataplane: Dataplane,
    pub(crate) tables: Tables,
    monitor: HealthMonitor,
    /// How the adopted data plane differed from the config at start (empty if nothing was adopted).
    start_differences: Vec<String>,
    /// When each drained backend started draining.
    drains: HashMap<BackendKey, DrainStart>,
    /// The drain starts the config file records (`drained_since`), for drains the daemon has not
    /// seen start (at start, after a reload).
    drain_since: HashMap<BackendKey, SystemTime>,
    passive: Passive,
    latency_weights: plan::latency::LatencyWeights,
    report: Vec<ServiceHealth>,
    /// The effective configuration last programmed (weights after health, backups, drain).
    effective: Config,
    /// The VIP routes BIRD announces (`[announce]`).
    announcer: Announcer,
    /// Held while `[announce]` is set: no other daemon in this namespace uses the table.
    table_lock: Option<announce::TableLock>,
    /// The interfaces the program was attached to, with their ifindex then.
    attached_ifaces: Vec<(String, u32)>,
    /// Why an attached interface is no longer the one attached to (see `check_interfaces`).
    interfaces_lost: Option<String>,
    /// Health, drain and admin transitions for the dashboard (bounded).
    events: EventLog,
    /// The last reload's rejection, against the text it rejected (see `pending`).
    rejected: Option<pending::Rejected>,
    /// VIPs found on an attached interface while running (an address added after the check at
    /// start, reload or change), as last logged, and when that was looked at.
    vips_on_host: (Vec<String>, Option<Instant>),
}

/// How often a running daemon looks for VIPs that became addresses of an attached interface.
const HOST_ADDRESS_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

impl Daemon {
    /// Programs the loaded config file into a loaded (not yet attached) data plane. A pinned data
    /// plane that serves services is adopted; if the file has none, the daemon refuses to start
    /// (leaving the data plane as it is) unless `allow_empty`.
    pub fn new(loaded: Loaded, dataplane: Dataplane, allow_empty: bool) -> Result<(Daemon, UnboundedReceiver<Transition>), DaemonError> {
        let config = loaded.config.clone();
        if config.announce.is_some() && !dataplane.is_pinned() {
            return Err(DaemonError::AnnounceUnpinned { path: loaded.path.display().to_string() });
        }
        if let Some(a) = config.announce {
            announce::check_no_rule_looks_up(a.table)?;
        }
        let table_lock = config.announce.map(|a| announce::TableLock::acquire(a.table)).transpose()?;
        let mut tables = Tables::new(config.dataplane.maglev_cells, dataplane::MAX_SERVICES, dataplane::MAX_BACKENDS);
        let mut start_differences = Vec::new();
        if dataplane.is_pinned() {
            let adopted = tables.adopt(&config, &dataplane).map_err(DaemonError::Adopt)?;
            if adopted > 0 {
                let running: Vec<&crate::config::Service> = tables.services().map(|i| &i.config).collect();
                if config.services.is_empty() && !allow_empty {
                    return Err(DaemonError::EmptyAtStart { path: loaded.path.display().to_string(), running: running.len() });
                }
                start_differences = differences(&running, &config);
                let shares: Vec<(&crate::config::Service, BTreeMap<SocketAddr, usize>)> =
                    tables.services().map(|i| (&i.config, ring_shares(&i.table, &i.backend_ids))).collect();
                start_differences.extend(share_differences(&shares, &config));
                info!(services = adopted, "adopted the running data plane's services; established flows keep their backends");
                if !start_differences.is_empty() {
                    warn!(
                        path = %loaded.path.display(),
                        "the adopted data plane differs from the config file, which wins:\n  {}",
                        start_differences.join("\n  ")
                    );
                }
            }
        }
        let (monitor, transitions) = HealthMonitor::new();
        let drain_since = drain_since_of(&loaded.raw);
        let mut daemon = Daemon {
            file: ConfigFile { loaded, at: SystemTime::now() },
            effective: config.clone(),
            config,
            dataplane,
            tables,
            monitor,
            start_differences,
            drains: HashMap::new(),
            drain_since,
            passive: Passive::default(),
            latency_weights: plan::latency::LatencyWeights::default(),
            report: Vec::new(),
            announcer: Announcer::default(),
            table_lock,
            attached_ifaces: Vec::new(),
            interfaces_lost: None,
            events: EventLog::default(),
            rejected: None,
            vips_on_host: (Vec::new(), None),
        };
        match daemon.replan() {
            // An adopted layout with no room for a ring's spare: the daemon still starts, keeps
            // health-checking and setting down flags, and `status` shows the error.
            Ok(()) | Err(crate::tables::ApplyError::RingSpace { .. }) => {}
            Err(e) => return Err(DaemonError::Program(e)),
        }
        if let Some(problem) = owner::problem(&daemon.file.loaded.path) {
            warn!("{problem}");
        }
        Ok((daemon, transitions))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The recent health, drain and admin transitions (the dashboard's event log).
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    pub(crate) fn events_mut(&mut self) -> &mut EventLog {
        &mut self.events
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
    pub fn replan(&mut self) -> Result<(), crate::tables::ApplyError> {
        let now = Instant::now();
        let drained: HashSet<BackendKey> = self
            .config
            .services
            .iter()
            .flat_map(|s| s.backends.iter().filter(|b| b.drained).map(|b| (s.name.clone(), b.address)))
            .collect();
        self.drains.retain(|k, _| drained.contains(k));
        for k in drained {
            let since = self.drain_since.get(&k).copied();
            self.drains.entry(k).or_insert_with(|| DrainStart::new(since, SystemTime::now(), now));
        }
        let expired: HashSet<BackendKey> = self
            .drains
            .iter()
            .filter(|((service, _), since)| {
                self.config.services.iter().any(|s| &s.name == service && since.elapsed(now) >= s.drain_timeout)
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
                latency_weights: Some(self.latency_weights.weights()),
            },
        );
        for r in &report {
            let before = self.report.iter().find(|p| p.name == r.name);
            if r.all_down && before.is_none_or(|b| !b.all_down) {
                error!(service = %r.name, "ALL BACKENDS DOWN: the service's all_down policy now applies");
                self.events.record(Kind::AllDown, Some(&r.name), None, "all backends down: the service's all_down policy applies");
            } else if !r.all_down && before.is_some_and(|b| b.all_down) {
                info!(service = %r.name, serving = r.serving, "service has healthy backends again");
            }
            if r.on_backups && before.is_none_or(|b| !b.on_backups) {
                warn!(service = %r.name, backups = r.serving, "no primary backend is healthy: backups take over");
            }
        }
        let applied = self.tables.apply_planned(&effective, &self.config, &mut self.dataplane);
        // A ring that could not be placed leaves every other change (and every down flag) applied:
        // what is planned is what runs, but for that service's ring (reported in `status`).
        if matches!(applied, Ok(()) | Err(crate::tables::ApplyError::RingSpace { .. })) {
            self.report = report;
            self.effective = effective;
        }
        if let Err(e @ crate::tables::ApplyError::RingSpace { .. }) = &applied {
            error!("{e}");
        }
        // Also after a failed apply: what is installed now decides what is announced.
        self.announce();
        applied
    }

    /// Brings the announce table to what the services, their health, the drain and the attach
    /// state call for (see [`announce::desired`]).
    fn announce(&mut self) {
        let views: Vec<announce::ServiceView> = self
            .config
            .services
            .iter()
            .map(|s| {
                let key = service_key(s.vip, s.protocol);
                let effective = self.effective.services.iter().find(|e| e.name == s.name);
                // In the ring and known to work: a check confirmed it, it has none, or the
                // service failed open (issue 11 F1: Unknown must not start an announcement).
                let confirmed = effective.map_or(0, |e| {
                    let fail_open = e.all_down == crate::config::AllDown::FailOpen && self.report.iter().any(|r| r.name == s.name && r.all_down);
                    e.backends
                        .iter()
                        .filter(|b| b.weight > 0 && !b.down)
                        .filter(|b| fail_open || plan::probe_target(e, b).is_none_or(|(t, _)| self.monitor.status(&t).is_some_and(|st| st.health == Health::Up)))
                        .count()
                });
                announce::ServiceView {
                    name: s.name.clone(),
                    vip: s.vip.ip(),
                    programmed: self.tables.services().any(|i| i.config.name == s.name && service_key(i.config.vip, i.config.protocol) == key),
                    serving: self.report.iter().find(|r| r.name == s.name).map_or(0, |r| r.serving),
                    confirmed,
                    usable: s.backends.iter().filter(|b| !b.drained && b.weight > 0).count(),
                }
            })
            .collect();
        self.announcer.reconcile(self.config.announce, &views);
    }

    /// The XDP program is attached to every interface: VIPs may be announced from now on. The
    /// announce table is reconciled: routes a previous daemon left are adopted or removed.
    pub fn start_announcing(&mut self, ifaces: &[String]) {
        self.attached_ifaces = ifaces.iter().filter_map(|i| crate::dataplane::ifindex(i).ok().map(|index| (i.clone(), index))).collect();
        self.announcer.set_attached();
        self.announce();
    }

    /// Issue 11 F11: an interface deleted (or deleted and re-created: a new ifindex, no XDP on
    /// it) leaves the node unable to forward what it attracts. Checked every tick; while any
    /// interface is not the one attached to, every VIP is withdrawn with the interface named.
    fn check_interfaces(&mut self) {
        let problems: Vec<String> = self
            .attached_ifaces
            .iter()
            .filter_map(|(name, index)| match crate::dataplane::ifindex(name) {
                Ok(now) if now == *index => None,
                Ok(now) => Some(format!("interface {name} was re-created (ifindex {index}, now {now}) without the XDP program")),
                Err(_) => Some(format!("interface {name} (ifindex {index}) is gone")),
            })
            .collect();
        let why = (!problems.is_empty()).then(|| format!("{}; restart with `xdp-lb stop --detach` then `xdp-lb run` to attach again", problems.join("; ")));
        if why != self.interfaces_lost {
            if let Some(why) = &why {
                error!("{why}: withdrawing every VIP announcement");
            }
            self.announcer.set_not_attached(why.clone());
            self.interfaces_lost = why;
        }
    }

    /// The attached interfaces and their XDP mode now, as `ip -d link` would show it.
    pub fn interface_status(&self) -> Vec<crate::api::InterfaceStatus> {
        let mut netlink = announce::netlink::Netlink::open();
        self.attached_ifaces
            .iter()
            .map(|(name, index)| {
                let attached = netlink.as_mut().map_err(|e| e.to_string()).and_then(|n| n.xdp_attached(*index).map_err(|e| e.to_string()));
                let (mode, error) = match attached {
                    Ok(1) => ("native", None),
                    Ok(2) => ("generic", None),
                    Ok(3) => ("offload", None),
                    Ok(4) => ("several", None),
                    Ok(_) => ("none", None),
                    Err(e) => ("unknown", Some(e)),
                };
                crate::api::InterfaceStatus { name: name.clone(), mode: mode.into(), error }
            })
            .collect()
    }

    /// Withdraws every VIP route (`xdp-lb stop`, SIGTERM, SIGINT); a crash leaves them.
    pub fn withdraw_announcements(&mut self) {
        self.announcer.withdraw_all();
    }

    /// The announcement state, `None` while `[announce]` is not configured.
    pub fn announce_status(&self) -> Option<&announce::AnnounceStatus> {
        self.announcer.status()
    }

    /// Applies a CLI change: refused if the file was edited by hand since it was read (the edit
    /// must be reloaded first), validated, programmed, then written into the config file. If the
    /// file cannot be written, the data plane is restored: no change runs unless it is persisted.
    pub fn change(&mut self, edit: impl FnOnce(&mut RawConfig) -> Result<(), DaemonError>) -> Result<(), DaemonError> {
        let path = self.path_text();
        match std::fs::read_to_string(&self.file.loaded.path) {
            Ok(on_disk) if on_disk == self.file.loaded.text => {}
            Ok(on_disk) => return Err(self.pending_refusal(&on_disk)),
            Err(source) => return Err(DaemonError::ReadBack { path, source }),
        }
        let mut next = self.file.loaded.raw.clone();
        edit(&mut next)?;
        self.drain_since = drain_since_of(&next);
        let config = next.validate().map_err(|errors| DaemonError::InvalidChange { path: path.clone(), errors })?;
        // Only what this change introduces: a VIP that became a host address while it ran is
        // logged by `tick`, and must not block an unrelated change (a drain in an incident).
        let running = |name: &str, vip| self.config.services.iter().any(|s| s.name == name && s.vip == vip);
        let on_host: Vec<_> = self
            .vips_on_attached(&config)
            .into_iter()
            .filter(|e| !matches!(&e.location, crate::config::Location::Service { index, name, .. } if running(name, config.services[*index].vip)))
            .collect();
        if !on_host.is_empty() {
            return Err(DaemonError::InvalidChange { path, errors: on_host });
        }
        if let Some(refusal) = self.resize(&config) {
            return Err(refusal);
        }
        let text = file::patch(&self.file.loaded.text, &self.file.loaded.raw, &next).map_err(|source| DaemonError::Edit { path: path.clone(), source })?;
        let on_disk = self.file.loaded.text.clone();
        self.program_and_write(config.clone(), &on_disk, &text, path)?;
        self.file = ConfigFile { loaded: Loaded { path: self.file.loaded.path.clone(), text, raw: next, config }, at: SystemTime::now() };
        neighbours::warm(self.config.services.iter().flat_map(|s| s.backends.iter().map(|b| b.address)));
        Ok(())
    }

    /// Re-reads the config file (SIGHUP and `xdp-lb reload`): every error is listed and the running
    /// state stays. A file without services while services run is refused unless `allow_empty`.
    /// Returns how many services now run.
    pub fn reload(&mut self, allow_empty: bool) -> Result<usize, DaemonError> {
        let result = self.try_reload(allow_empty);
        self.note_reload(result.as_ref().map(|_| ()));
        match &result {
            Ok(services) => {
                info!(services, path = %self.file.loaded.path.display(), "config reloaded");
                if let Some(problem) = owner::problem(&self.file.loaded.path) {
                    warn!("{problem}");
                }
                self.events.record(Kind::Reload, None, None, format!("config reloaded: {services} service(s)"));
            }
            Err(e) => {
                error!("reload rejected, keeping the running configuration: {e}");
                self.events.record(Kind::Refused, None, None, format!("reload rejected: {e}"));
            }
        }
        result
    }

    fn try_reload(&mut self, allow_empty: bool) -> Result<usize, DaemonError> {
        let loaded = file::load(&self.file.loaded.path)?;
        let on_host = self.vips_on_attached(&loaded.config);
        if !on_host.is_empty() {
            return Err(crate::config::ConfigError::invalid_in(&self.path_text(), &loaded.text, on_host).into());
        }
        self.drain_since = drain_since_of(&loaded.raw);
        if loaded.config.services.is_empty() && !self.config.services.is_empty() && !allow_empty {
            return Err(DaemonError::EmptyReload { path: self.path_text(), running: self.config.services.len() });
        }
        if let Some(refusal) = self.resize(&loaded.config) {
            return Err(refusal);
        }
        if loaded.config.announce.is_some() && !self.dataplane.is_pinned() {
            return Err(DaemonError::AnnounceUnpinned { path: self.path_text() });
        }
        if let Some(a) = loaded.config.announce {
            announce::check_no_rule_looks_up(a.table)?;
        }
        // A table another daemon here announces into is refused before anything changes.
        let moved_to = match (loaded.config.announce, &self.table_lock) {
            (Some(a), held) if held.as_ref().is_none_or(|l| l.table() != a.table) => Some(announce::TableLock::acquire(a.table)?),
            _ => None,
        };
        // A new hash_seed needs nothing else: programming rebuilds every ring with it.
        self.program(loaded.config.clone())?;
        if loaded.config.announce.is_none() {
            self.table_lock = None;
        } else if moved_to.is_some() {
            self.table_lock = moved_to;
        }
        self.file = ConfigFile { loaded, at: SystemTime::now() };
        // The file now runs as it is: what differed at start no longer describes anything.
        self.start_differences.clear();
        neighbours::warm(self.config.services.iter().flat_map(|s| s.backends.iter().map(|b| b.address)));
        Ok(self.config.services.len())
    }

    /// An address added to an attached interface while the daemon runs is not refused anywhere: the
    /// VIP was accepted before. Logged as an error (once per change) so the operator learns that
    /// this host's own traffic to that port is being balanced.
    fn check_vips_on_host(&mut self) {
        if self.attached_ifaces.is_empty() || self.vips_on_host.1.is_some_and(|at| at.elapsed() < HOST_ADDRESS_CHECK) {
            return;
        }
        let path = self.path_text();
        let found: Vec<String> = self.vips_on_attached(&self.config).iter().map(|e| format!("{path}: {e}")).collect();
        if found != self.vips_on_host.0 {
            for problem in &found {
                error!("{problem}; remove the address from the interface or move the service to another VIP");
            }
            if found.is_empty() {
                info!("no VIP is an address of an attached interface any more");
            }
        }
        self.vips_on_host = (found, Some(Instant::now()));
    }

    /// Services of `config` whose VIP is this host's own address on an attached interface.
    fn vips_on_attached(&self, config: &Config) -> Vec<crate::config::FieldError> {
        crate::host::check_vips(config, &self.attached_ifaces)
    }

    /// The refusal for a `config` whose map sizes differ from the running ones (`hash_seed` may
    /// change: it only changes the rings).
    fn resize(&self, config: &Config) -> Option<DaemonError> {
        let sizes = |d: &crate::config::Dataplane| format!("conntrack_entries = {}, maglev_cells = {}", d.conntrack_entries, d.maglev_cells);
        let (running, wanted) = (sizes(&self.config.dataplane), sizes(&config.dataplane));
        (running != wanted).then(|| DaemonError::Resize { path: self.path_text(), running, wanted })
    }

    /// Programs `config`; on failure the previous one is programmed again. Returns the previous.
    /// Programs `config`, then writes `text` over the file if it still holds `on_disk`. A hand edit
    /// made meanwhile or a failed write puts the previous configuration back, so nothing runs that
    /// the file does not say and no edit is overwritten.
    pub(super) fn program_and_write(&mut self, config: Config, on_disk: &str, text: &str, path: String) -> Result<(), DaemonError> {
        let previous = self.program(config)?;
        // The file is checked again right before the rename: a hand edit made while the change was
        // programmed and written refuses the change rather than being overwritten.
        if let Err(failure) = file::replace_if_unchanged(&self.file.loaded.path, on_disk, text.as_bytes()).map(|window| {
            tracing::debug!(window_us = window.as_micros() as u64, "config written; time between the last content check and the rename")
        }) {
            self.config = previous;
            if let Err(restore) = self.replan() {
                error!("restoring the data plane after the refused write failed too: {restore}");
            }
            return Err(match failure {
                file::WriteError::Changed => DaemonError::EditedOnDisk { path },
                file::WriteError::Io(source) => DaemonError::persist(path, source, &self.file.loaded.path),
            });
        }
        Ok(())
    }

    fn program(&mut self, config: Config) -> Result<Config, DaemonError> {
        let failing_before = self.tables.ring_error_capacities().clone();
        let previous = std::mem::replace(&mut self.config, config);
        // A service that already could not place its ring does not refuse changes to the others;
        // a change that makes another ring fail, or asks a failing one for another size, is refused.
        let made_worse =
            |tables: &Tables| tables.ring_error_capacities().iter().any(|(name, capacity)| failing_before.get(name) != Some(capacity));
        match self.replan() {
            Err(crate::tables::ApplyError::RingSpace { .. }) if !made_worse(&self.tables) => Ok(previous),
            Ok(()) => Ok(previous),
            Err(e) => {
                self.restore(previous);
                Err(DaemonError::Program(e))
            }
        }
    }

    fn restore(&mut self, previous: Config) {
        self.config = previous;
        if let Err(restore) = self.replan() {
            error!("restoring the previous configuration failed too: {restore}");
        }
    }

    fn path_text(&self) -> String {
        self.file.loaded.path.display().to_string()
    }

    /// The config file: where, when read, whether it changed on disk since, and how the adopted
    /// data plane differed from it at start.
    pub fn config_status(&self) -> ConfigStatus {
        let (changed_on_disk, disk_error, rejected_edit) = match std::fs::read_to_string(&self.file.loaded.path) {
            Ok(text) => (text != self.file.loaded.text, None, self.rejection_of(&text)),
            Err(e) => (true, Some(e.to_string()), None),
        };
        ConfigStatus {
            path: self.path_text(),
            loaded_unix_ms: self.file.at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0),
            changed_on_disk,
            disk_error,
            rejected_edit,
            owner_problem: owner::problem(&self.file.loaded.path),
            services: self.config.services.len(),
            start_differences: self.start_differences.clone(),
        }
    }

    pub fn config_path(&self) -> &Path {
        &self.file.loaded.path
    }

    /// Applies a batch of health transitions with one replan: a reload of thousands of backends
    /// produces thousands of transitions within seconds, and one replan each kept the control loop
    /// (and so `status` and scrapes) busy for minutes.
    pub fn on_transitions(&mut self, batch: &[Transition]) {
        for t in batch {
            self.note_transition(t);
        }
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        match self.replan() {
            Ok(()) => {
                debug!(transitions = batch.len(), took_ms = started.elapsed().as_millis() as u64, "replanned after health transitions");
                for t in batch {
                    let (kind, what) = match (t.from, t.to) {
                        (_, crate::health::Health::Down) => (Kind::Removed, "out of the ring: new flows go to the others, established ones move"),
                        (crate::health::Health::Down, crate::health::Health::Up) => (Kind::Restored, "back in the ring"),
                        _ => continue,
                    };
                    for backend in self.backends_checked_by(&t.target) {
                        self.events.record(kind, Some(&t.target.service), Some(backend.to_string()), what);
                    }
                }
            }
            Err(e) => error!(transitions = batch.len(), "reprogramming after health transitions failed: {e}"),
        }
    }

    /// The backends whose health `target` probes (several when they share a check address).
    fn backends_checked_by(&self, target: &crate::health::Target) -> Vec<SocketAddr> {
        self.config
            .services
            .iter()
            .filter(|s| s.name == target.service)
            .flat_map(|s| s.backends.iter().filter(|b| plan::probe_target(s, b).is_some_and(|(t, _)| &t == target)).map(|b| b.address))
            .collect()
    }

    fn note_transition(&mut self, t: &Transition) {
        info!(service = %t.target.service, target = %t.target.addr, from = ?t.from, to = ?t.to, reason = %t.reason, "health transition");
        if t.to == crate::health::Health::Down {
            for backend in self.backends_checked_by(&t.target) {
                self.events.record(Kind::Detected, Some(&t.target.service), Some(backend.to_string()), format!("health check failed: {}", t.reason));
            }
        }
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
                    self.events.record(Kind::Restored, Some(&k.0), Some(k.1.to_string()), "passive hold ended: active checks see it up");
                }
            }
        }
    }

    /// Periodic work: passive checks, drain timeouts, least-response-time weights.
    pub fn tick(&mut self) {
        if self.config.announce.is_some() {
            self.check_interfaces();
        }
        self.check_vips_on_host();
        let serving: HashSet<BackendKey> = self
            .effective
            .services
            .iter()
            .flat_map(|s| s.backends.iter().filter(|b| b.weight > 0 && !b.down).map(|b| (s.name.clone(), b.address)))
            .collect();
        crate::flows::reconcile_when_due(&mut self.dataplane, &self.tables);
        let mut changed = self.passive.observe(&self.config, &serving, &self.tables, &self.dataplane, &mut self.events);
        changed |= self.update_latency_weights();
        let now = Instant::now();
        let drain_ended: Vec<BackendKey> = self
            .drains
            .iter()
            .filter(|((service, address), since)| {
                let timeout = self.config.services.iter().find(|s| &s.name == service).map(|s| s.drain_timeout);
                let down_now = timeout.is_some_and(|t| since.elapsed(now) >= t);
                let was_down = self.effective_backend(service, address).is_some_and(|b| b.down);
                down_now && !was_down
            })
            .map(|(k, _)| k.clone())
            .collect();
        for (service, address) in &drain_ended {
            self.events.record(Kind::Removed, Some(service), Some(address.to_string()), "drain timeout over: its established flows move to other backends");
        }
        changed |= !drain_ended.is_empty();
        if changed {
            if let Err(e) = self.replan() {
                error!("reprogramming failed: {e}");
            }
        } else if self.config.announce.is_some() {
            // Puts back a route someone removed by hand, retries a failed one.
            self.announce();
        }
    }

    fn effective_backend(&self, service: &str, address: &std::net::SocketAddr) -> Option<&crate::config::Backend> {
        self.effective.services.iter().find(|s| s.name == service)?.backends.iter().find(|b| &b.address == address)
    }

    /// Least-response-time services: weights from the health checks' latency averages, changed
    /// only for real, lasting differences (see [`plan::latency`]) so the rings do not churn.
    fn update_latency_weights(&mut self) -> bool {
        let samples = plan::latency::samples(&self.config, &self.monitor.statuses());
        let changes = self.latency_weights.tick(&samples);
        for c in &changes {
            info!(service = %c.key.0, backend = %c.key.1, weight = c.weight, "least-response-time weight");
        }
        !changes.is_empty()
    }
}

/// How the services a pinned data plane runs differ from `config`, one line each (empty if equal).
/// Services are matched by VIP and protocol, the way the data plane keys them.
pub fn differences(running: &[&crate::config::Service], config: &Config) -> Vec<String> {
    let proto = |p: Protocol| if p == Protocol::Tcp { "tcp" } else { "udp" };
    let mut out = Vec::new();
    for r in running {
        let key = service_key(r.vip, r.protocol);
        let Some(s) = config.services.iter().find(|s| service_key(s.vip, s.protocol) == key) else {
            out.push(format!("{}/{} runs with {} backend(s) but is not in the config: it will be removed", r.vip, proto(r.protocol), r.backends.len()));
            continue;
        };
        let running_backends: HashSet<SocketAddr> = r.backends.iter().map(|b| b.address).collect();
        let wanted: HashSet<SocketAddr> = s.backends.iter().map(|b| b.address).collect();
        let mut gone: Vec<_> = running_backends.difference(&wanted).collect();
        let mut new: Vec<_> = wanted.difference(&running_backends).collect();
        gone.sort();
        new.sort();
        for b in gone {
            out.push(format!("service {} ({}/{}): backend {b} runs but is not in the config: it will be removed", s.name, s.vip, proto(s.protocol)));
        }
        for b in new {
            out.push(format!("service {} ({}/{}): backend {b} is in the config but did not run: it will be added", s.name, s.vip, proto(s.protocol)));
        }
    }
    for s in &config.services {
        let key = service_key(s.vip, s.protocol);
        if !running.iter().any(|r| service_key(r.vip, r.protocol) == key) {
            out.push(format!("service {} ({}/{}) is in the config but did not run: it will be added", s.name, s.vip, proto(s.protocol)));
        }
    }
    out
}

/// When a drain began, as the daemon counts it: an instant of this process plus what had passed
/// before it (a drain the config file says began before this daemon started).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainStart {
    at: Instant,
    before: Duration,
}

impl DrainStart {
    /// A drain seen at `now` (wall clock `wall`), which began at `since` if the file says so. A
    /// `since` in the future (a clock stepped back) counts as now.
    pub fn new(since: Option<SystemTime>, wall: SystemTime, now: Instant) -> DrainStart {
        let before = since.and_then(|s| wall.duration_since(s).ok()).unwrap_or_default();
        DrainStart { at: now, before }
    }

    pub fn elapsed(&self, now: Instant) -> Duration {
        self.before + now.saturating_duration_since(self.at)
    }
}

/// The `drained_since` of every drained backend in `raw` (validated, so each parses).
fn drain_since_of(raw: &RawConfig) -> HashMap<BackendKey, SystemTime> {
    raw.services
        .iter()
        .flat_map(|s| {
            s.backends.iter().filter(|b| b.drained).filter_map(move |b| {
                let address = b.address.parse().ok()?;
                let since = humantime::parse_rfc3339_weak(b.drained_since.as_deref()?).ok()?;
                Some(((s.name.clone(), address), since))
            })
        })
        .collect()
}

/// Ring cells per backend address of an adopted ring.
fn ring_shares(table: &[u32], ids: &BTreeMap<SocketAddr, u32>) -> BTreeMap<SocketAddr, usize> {
    ids.iter().map(|(address, id)| (*address, table.iter().filter(|&&cell| cell == *id).count())).collect()
}

/// How the adopted rings' shares of new flows differ from the weights, drains and backups in
/// `config`, one line each. The maps hold no weight, drained or backup flag, only each ring's
/// cells per backend: so a backend that got new flows but is drained, weight 0 or a backup in the
/// file (or the reverse) is listed, and for rings whose shares follow the weights (maglev, ip-hash,
/// weighted-round-robin) a share more than 5 points off the file's weights.
pub fn share_differences(running: &[(&crate::config::Service, BTreeMap<SocketAddr, usize>)], config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (r, cells) in running {
        let total: usize = cells.values().sum();
        let key = service_key(r.vip, r.protocol);
        let Some(s) = config.services.iter().find(|s| service_key(s.vip, s.protocol) == key) else { continue };
        let serving = |b: &crate::config::Backend| b.weight > 0 && !b.drained && !b.backup;
        let weights: u64 = s.backends.iter().filter(|b| serving(b)).map(|b| u64::from(b.weight)).sum();
        if total == 0 || weights == 0 {
            // Nothing ran, or only backups will: no share to compare.
            continue;
        }
        let proportional = matches!(s.scheduler, Scheduler::Maglev | Scheduler::IpHash | Scheduler::WeightedRoundRobin);
        let at = format!("service {} ({}/{})", s.name, s.vip, if s.protocol == Protocol::Tcp { "tcp" } else { "udp" });
        for b in &s.backends {
            let Some(&ran) = cells.get(&b.address) else { continue };
            let was_down = r.backends.iter().any(|rb| rb.address == b.address && rb.down);
            let ran_share = ran as f64 / total as f64;
            let wanted_share = if serving(b) { f64::from(b.weight) / weights as f64 } else { 0.0 };
            let how = if b.drained { "drained" } else if b.backup { "a backup" } else { "weight 0" };
            if ran > 0 && !serving(b) {
                out.push(format!(
                    "{at}: backend {} took new flows ({:.0}% of the ring) but is {how} in the config: it stops taking new flows",
                    b.address,
                    ran_share * 100.0
                ));
            } else if ran == 0 && serving(b) && !was_down {
                out.push(format!(
                    "{at}: backend {} took no new flows (drained, weight 0 or a backup when the data plane was programmed) but has weight {} in the config: it takes new flows",
                    b.address, b.weight
                ));
            } else if proportional && ran > 0 && (ran_share - wanted_share).abs() > 0.05 {
                out.push(format!(
                    "{at}: backend {} got about {:.0}% of new flows, the config's weight {} gives it {:.0}%: its weight changed",
                    b.address,
                    ran_share * 100.0,
                    b.weight,
                    wanted_share * 100.0
                ));
            }
        }
    }
    out
}

/// Health of every checked target, for status and metrics.
pub fn statuses(daemon: &Daemon) -> BTreeMap<crate::health::Target, crate::health::Status> {
    daemon.monitor.statuses()
}

/// Health probes that failed on this host, per reason, for the metrics.
pub fn health_local_errors(daemon: &Daemon) -> Vec<(&'static str, u64)> {
    daemon.monitor.local_errors()
}

#[cfg(test)]
mod tests;
