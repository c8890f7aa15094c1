//! The operator commands: each builds one API request, sends it to the daemon and prints the
//! answer as a table (or as JSON with `--json`). Any error exits non-zero with one line.
//!
//! Everything goes to stdout through [`out`], which turns a closed pipe (`xdp-lb status | head -1`)
//! into [`StdoutClosed`] instead of a panic; `main` exits 0 on it.

use std::{
    fmt::Display,
    io::Write,
    path::Path,
    time::Duration,
};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde::Serialize;
use xdp_lb::{
    api::{self, Explanation, Request, ServiceChanges, ServiceList, ServiceStatus, StatsReply},
    config::{RawHealthCheck, RawService},
    stats::Snapshot,
};

/// Whoever read our output has gone (`| head`): not an error, there is just nobody left to tell.
#[derive(Debug, thiserror::Error)]
#[error("stdout was closed by its reader")]
pub struct StdoutClosed;

/// Prints one line on stdout.
pub fn out(line: impl Display) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
        _ => anyhow::Error::new(e).context("writing to stdout"),
    })
}

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Add a virtual service.
    // --vip and --protocol are optional for `update` but required here: clap reports them (exit 2).
    #[command(mut_arg("vip", |a| a.required(true)), mut_arg("protocol", |a| a.required(true)))]
    Add {
        name: String,
        #[command(flatten)]
        settings: ServiceSettings,
    },
    /// Change settings of a service (only the options given). Changing --vip or --protocol, or
    /// switching to --mode dsr, breaks established connections and needs --force.
    Update {
        name: String,
        #[command(flatten)]
        settings: ServiceSettings,
        #[command(flatten)]
        flags: UpdateFlags,
    },
    /// Remove a service and stop balancing its VIP.
    Remove { name: String },
    /// List the services (desired state).
    List,
}

#[derive(Args)]
pub struct ServiceSettings {
    /// VIP and port, e.g. 10.0.0.100:80 or [2001:db8::100]:80.
    #[arg(long)]
    vip: Option<String>,
    /// tcp | udp
    #[arg(long, value_parser = ["tcp", "udp"])]
    protocol: Option<String>,
    /// nat | dsr
    #[arg(long)]
    mode: Option<String>,
    /// maglev | ip-hash | round-robin | weighted-round-robin | least-conn | least-response-time
    #[arg(long)]
    scheduler: Option<String>,
    /// Maglev ring size (a prime).
    #[arg(long)]
    ring_size: Option<u32>,
    /// drop | fail-open: what to do when no backend is healthy.
    #[arg(long)]
    all_down: Option<String>,
    #[arg(long)]
    drain_timeout_ms: Option<u64>,
    /// Health check: tcp | http | none.
    #[arg(long)]
    check: Option<String>,
    #[arg(long)]
    check_port: Option<u16>,
    #[arg(long)]
    check_path: Option<String>,
    /// Accepted HTTP status range, e.g. 200-399.
    #[arg(long)]
    check_expect: Option<String>,
    #[arg(long)]
    check_interval_ms: Option<u64>,
    #[arg(long)]
    check_timeout_ms: Option<u64>,
    #[arg(long)]
    rise: Option<u32>,
    #[arg(long)]
    fall: Option<u32>,
    /// Passive checks (count unanswered SYNs; NAT TCP only): true | false.
    #[arg(long)]
    passive_checks: Option<bool>,
}

#[derive(Args)]
pub struct UpdateFlags {
    /// Apply a change that breaks established connections (--vip, --protocol, --mode dsr).
    #[arg(long)]
    force: bool,
}

impl ServiceSettings {
    fn health_check(&self) -> Option<RawHealthCheck> {
        let h = RawHealthCheck {
            kind: self.check.clone(),
            port: self.check_port,
            path: self.check_path.clone(),
            expect: self.check_expect.clone(),
            interval_ms: self.check_interval_ms,
            timeout_ms: self.check_timeout_ms,
            rise: self.rise,
            fall: self.fall,
        };
        (h != RawHealthCheck::default()).then_some(h)
    }
}

#[derive(Subcommand)]
pub enum BackendCommand {
    /// Add a backend to a service.
    Add {
        service: String,
        address: String,
        /// 0 to 65535 (see README, Limits).
        #[arg(long)]
        weight: Option<String>,
        /// Only receives traffic while no primary backend is healthy.
        #[arg(long)]
        backup: bool,
    },
    /// Remove a backend; its flows move to the others.
    Remove { service: String, address: String },
    /// No new flows; established ones continue until they end or the drain timeout passes.
    Drain { service: String, address: String },
    /// Take new flows again.
    Undrain { service: String, address: String },
    /// Set a backend's weight.
    Weight { service: String, address: String, weight: String },
    /// List backends with their state.
    List { service: Option<String> },
}

/// Weights are parsed here rather than by clap so that the error names xdp-lb's limit (not
/// `u32::MAX`) and stays one `xdp-lb: error:` line: `--weight 99999999999: must be ...`.
fn weight_arg(name: &str, text: &str) -> Result<u32> {
    xdp_lb::config::parse_weight(text).map_err(|problem| anyhow::anyhow!("{name} {text}: {problem}"))
}

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Withdraw every VIP announcement of this node; traffic that still arrives is forwarded.
    /// Written to `[announce] drained` in the config file, so it survives restarts and reloads.
    Drain,
    /// Announce the VIPs again (those whose services qualify).
    Undrain,
}

pub struct Client<'a> {
    pub socket: &'a Path,
    pub json: bool,
}

impl Client<'_> {
    fn call(&self, request: &Request) -> Result<api::Response> {
        let response = api::call(self.socket, request)?;
        if !response.ok {
            bail!("{}", one_line(&response.error.unwrap_or_else(|| "the daemon refused the request".into())));
        }
        Ok(response)
    }

    /// Sends `request` and decodes its answer into the type the daemon serialised.
    fn ask<T: serde::de::DeserializeOwned>(&self, request: &Request, what: &str) -> Result<T> {
        Ok(self.call(request)?.decode(what)?)
    }

    fn done(&self, what: &str) -> Result<()> {
        if self.json {
            out("{\"ok\":true}")
        } else {
            out(what)
        }
    }

    pub fn service(&self, command: ServiceCommand) -> Result<()> {
        match command {
            ServiceCommand::Add { name, settings } => {
                // clap requires both for `add` (see the variant); this only guards a future refactor.
                let (Some(vip), Some(protocol)) = (settings.vip.clone(), settings.protocol.clone()) else {
                    bail!("service add needs --vip and --protocol");
                };
                // Options not given keep the config file's defaults, defined once in RawService::new.
                let mut service = RawService::new(name.clone(), vip, protocol);
                service.mode = settings.mode.clone().unwrap_or(service.mode);
                service.scheduler = settings.scheduler.clone().unwrap_or(service.scheduler);
                service.ring_size = settings.ring_size.unwrap_or(service.ring_size);
                service.all_down = settings.all_down.clone().unwrap_or(service.all_down);
                service.drain_timeout_ms = settings.drain_timeout_ms.unwrap_or(service.drain_timeout_ms);
                service.health_check = settings.health_check();
                service.passive_checks = settings.passive_checks;
                self.call(&Request::ServiceAdd { service })?;
                self.done(&format!("service {name} added"))
            }
            ServiceCommand::Update { name, settings, flags } => {
                let changes = ServiceChanges {
                    force: flags.force,
                    health_check: settings.health_check(),
                    vip: settings.vip,
                    protocol: settings.protocol,
                    mode: settings.mode,
                    scheduler: settings.scheduler,
                    ring_size: settings.ring_size,
                    all_down: settings.all_down,
                    drain_timeout_ms: settings.drain_timeout_ms,
                    passive_checks: settings.passive_checks,
                };
                if changes.is_empty() {
                    bail!("service update {name}: nothing to change; give at least one of {}", api::UPDATE_OPTIONS);
                }
                self.call(&Request::ServiceUpdate { name: name.clone(), changes })?;
                self.done(&format!("service {name} updated"))
            }
            ServiceCommand::Remove { name } => {
                self.call(&Request::ServiceRemove { name: name.clone() })?;
                self.done(&format!("service {name} removed"))
            }
            ServiceCommand::List => {
                let services: ServiceList = self.ask(&Request::ServiceList, "service list")?;
                if self.json {
                    return print_json(&services);
                }
                let rows = services
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            s.vip.clone(),
                            s.protocol.clone(),
                            s.mode.clone(),
                            s.scheduler.clone(),
                            s.backends.len().to_string(),
                        ]
                    })
                    .collect();
                print_table(&["SERVICE", "VIP", "PROTO", "MODE", "SCHEDULER", "BACKENDS"], rows)
            }
        }
    }

    pub fn backend(&self, command: BackendCommand) -> Result<()> {
        let (request, done) = match command {
            BackendCommand::Add { service, address, weight, backup } => {
                let weight = weight.map(|w| weight_arg("--weight", &w)).transpose()?;
                let done = format!("backend {address} added to {service}");
                (Request::BackendAdd { service, address, weight, backup }, done)
            }
            BackendCommand::Remove { service, address } => {
                let done = format!("backend {address} removed from {service}");
                (Request::BackendRemove { service, address }, done)
            }
            BackendCommand::Drain { service, address } => {
                let done = format!("backend {address} of {service} is draining");
                (Request::BackendDrain { service, address }, done)
            }
            BackendCommand::Undrain { service, address } => {
                let done = format!("backend {address} of {service} takes new flows again");
                (Request::BackendUndrain { service, address }, done)
            }
            BackendCommand::Weight { service, address, weight } => {
                let weight = weight_arg("weight", &weight)?;
                let done = format!("backend {address} of {service} has weight {weight}");
                (Request::BackendWeight { service, address, weight }, done)
            }
            BackendCommand::List { service } => return self.show(service, false),
        };
        self.call(&request)?;
        self.done(&done)
    }

    pub fn node(&self, command: NodeCommand) -> Result<()> {
        let drained = matches!(command, NodeCommand::Drain);
        self.call(&Request::NodeDrain { drained })?;
        self.done(if drained {
            "node drained: every VIP announcement withdrawn; traffic that still arrives is forwarded"
        } else {
            "node undrained: VIPs whose services serve are announced again"
        })
    }

    /// `status`: the config file's state and the services (`--json`: the whole reply).
    pub fn status(&self, service: Option<String>) -> Result<()> {
        self.show(service, true)
    }

    /// `whole`: the config part too (`status`); otherwise only the services (`backend list`,
    /// whose `--json` output is the list).
    fn show(&self, service: Option<String>, whole: bool) -> Result<()> {
        // One request, so the header and the table describe the same moment.
        let services: Vec<ServiceStatus> = match service {
            Some(_) => self.ask(&Request::BackendList { service }, "status")?,
            None => {
                let status: api::StatusReply = self.ask(&Request::Status, "status")?;
                if self.json && whole {
                    return print_json(&status);
                }
                if !self.json {
                    print_config_status(&status.config)?;
                    let interfaces: Vec<String> = status
                        .interfaces
                        .iter()
                        .map(|i| match &i.error {
                            Some(e) => format!("{} ({}: {e})", i.name, i.mode),
                            None => format!("{} ({})", i.name, i.mode),
                        })
                        .collect();
                    out(format_args!("interfaces {}", if interfaces.is_empty() { "none".to_string() } else { interfaces.join(", ") }))?;
                    if let Some(a) = &status.announce {
                        print_announce_status(a)?;
                    }
                }
                status.services
            }
        };
        if self.json {
            return print_json(&services);
        }
        for s in &services {
            let ring = s.ring_fingerprint.as_deref().map(|f| format!(" ring {f}")).unwrap_or_default();
            out(format_args!("{} {} {}/{} {} [{}]{ring}", s.name, s.vip, s.protocol, s.mode, s.scheduler, s.state))?;
            if let Some(e) = &s.ring_error {
                out(format_args!("  RING NOT REBUILT (the previous ring serves; failed backends are marked down): {e}"))?;
            }
            let rows = s
                .backends
                .iter()
                .map(|b| {
                    let flags: Vec<&str> =
                        [(b.backup, "backup"), (b.drained, "drained"), (b.down, "down")].into_iter().filter(|f| f.0).map(|f| f.1).collect();
                    vec![
                        format!("  {}", b.address),
                        b.health.clone(),
                        format!("{}/{}", b.effective_weight, b.weight),
                        b.active_flows.map_or_else(|| "-".into(), |n| n.to_string()),
                        match (&b.last_check, b.check_latency_us) {
                            (None, _) => "-".into(),
                            (Some(c), Some(us)) if c == "ok" => format!("ok {us}µs"),
                            (Some(c), _) => c.clone(),
                        },
                        flags.join(","),
                    ]
                })
                .collect();
            print_table(&["  BACKEND", "HEALTH", "WEIGHT", "FLOWS", "LAST CHECK", "FLAGS"], rows)?;
        }
        Ok(())
    }

    /// Counters as rates over `interval`; with `watch`, again every interval (`count` times, or until
    /// interrupted).
    pub fn stats(&self, watch: bool, interval: Duration, count: Option<u32>) -> Result<()> {
        let take = || -> Result<(u64, Snapshot)> {
            let reply: StatsReply = self.ask(&Request::Stats, "stats")?;
            Ok((reply.unix_ms, reply.snapshot))
        };
        let mut before = take()?;
        let rounds = if watch { count.unwrap_or(u32::MAX) } else { 1 };
        for _ in 0..rounds {
            std::thread::sleep(interval);
            let after = take()?;
            self.print_rates(&before, &after)?;
            before = after;
        }
        Ok(())
    }

    fn print_rates(&self, (t0, a): &(u64, Snapshot), (t1, b): &(u64, Snapshot)) -> Result<()> {
        let secs = ((t1.saturating_sub(*t0)) as f64 / 1000.0).max(0.001);
        let rate = |x: u64, y: u64| (y.saturating_sub(x)) as f64 / secs;
        if self.json {
            let services = b
                .services
                .iter()
                .zip(&a.services)
                .map(|(s, s0)| ServiceRates {
                    name: s.name.clone(),
                    packets_per_s: rate(s0.packets, s.packets),
                    bits_per_s: 8.0 * rate(s0.bytes, s.bytes),
                    new_flows_per_s: rate(s0.new_flows, s.new_flows),
                    backends: s
                        .backends
                        .iter()
                        .zip(&s0.backends)
                        .map(|(x, x0)| BackendRates {
                            address: x.address.clone(),
                            packets_per_s: rate(x0.packets, x.packets),
                            bits_per_s: 8.0 * rate(x0.bytes, x.bytes),
                            new_flows_per_s: rate(x0.new_flows, x.new_flows),
                        })
                        .collect(),
                })
                .collect();
            // One compact object per line, so `--watch` is a stream a script can read line by line.
            let report = RatesReport { interval_s: secs, services, reasons: &b.reasons };
            return out(serde_json::to_string(&report)?);
        }
        let mut rows = Vec::new();
        for (s, s0) in b.services.iter().zip(&a.services) {
            rows.push(vec![
                format!("{} {}", s.name, s.vip),
                format!("{:.0}", rate(s0.packets, s.packets)),
                human_bits(8.0 * rate(s0.bytes, s.bytes)),
                format!("{:.0}", rate(s0.new_flows, s.new_flows)),
            ]);
            for (x, x0) in s.backends.iter().zip(&s0.backends) {
                rows.push(vec![
                    format!("  {}", x.address),
                    format!("{:.0}", rate(x0.packets, x.packets)),
                    human_bits(8.0 * rate(x0.bytes, x.bytes)),
                    format!("{:.0}", rate(x0.new_flows, x.new_flows)),
                ]);
            }
        }
        print_table(&["SERVICE / BACKEND", "PACKETS/S", "BITS/S", "NEW FLOWS/S"], rows)?;
        let reasons: Vec<Vec<String>> =
            b.reasons.iter().filter(|(_, v)| **v > 0).map(|(k, v)| vec![k.clone(), v.to_string()]).collect();
        if !reasons.is_empty() {
            print_table(&["NOT FORWARDED (REASON)", "PACKETS"], reasons)?;
        }
        out("")
    }

    /// Re-reads the daemon's config file (as SIGHUP does).
    pub fn reload(&self, allow_empty: bool) -> Result<()> {
        let reply: api::ReloadReply = self.ask(&Request::Reload { allow_empty }, "reload")?;
        if self.json {
            return print_json(&reply);
        }
        out(format_args!("config reloaded: {} service(s)", reply.services))
    }

    /// Stops the daemon on the socket; with `bpffs`, only if that is its pin directory (it refuses
    /// otherwise), so a stop meant for another instance never takes this one down.
    pub fn stop(&self, detach: bool, bpffs: Option<&Path>) -> Result<()> {
        let pins = bpffs.map(api::PinTarget::of);
        match api::call(self.socket, &Request::Stop { detach, pins }) {
            Ok(r) if r.ok => self.done(if detach { "xdp-lb stopped; data plane detached" } else { "xdp-lb stopped; the data plane keeps forwarding" }),
            Ok(r) => bail!("the daemon on {}: {}", self.socket.display(), r.error.unwrap_or_default()),
            Err(api::ClientError::NotRunning { .. } | api::ClientError::Stale { .. }) if detach => {
                // The default pin directory is the main instance's: a stop aimed at another
                // instance's socket must not remove it when that instance is not running.
                let bpffs = match bpffs {
                    Some(dir) => dir,
                    None if self.socket != Path::new(api::DEFAULT_SOCKET) => bail!(
                        "no daemon answers on {}; to remove its data plane without it, name its pin directory with \
                         --bpffs (the default, {}, is the main instance's)",
                        self.socket.display(),
                        api::DEFAULT_BPFFS_DIR
                    ),
                    None => Path::new(api::DEFAULT_BPFFS_DIR),
                };
                if !bpffs.exists() {
                    bail!("no daemon is running and nothing is pinned at {}", bpffs.display());
                }
                let dir = xdp_lb::pins::PinDir::prepare(bpffs)?;
                // Hostile 9b J9: "no daemon on --socket" does not mean none runs on these pins.
                // Held while removing, so no daemon starts on them meanwhile.
                let _lock = match dir.lock() {
                    Ok(lock) => lock,
                    Err(xdp_lb::pins::PinError::Held { dir, holder }) => bail!(
                        "no daemon answers on {}, but a daemon is running on {dir} ({holder}): nothing was removed; \
                         to stop it and detach its data plane, use its socket: xdp-lb --socket {} stop --detach --bpffs {dir}",
                        self.socket.display(),
                        holder.socket.as_deref().map_or_else(|| "<its socket>".to_string(), |s| s.display().to_string()),
                    ),
                    Err(e) => return Err(e.into()),
                };
                if dir.own_pins().is_empty() {
                    bail!("no daemon is running and no xdp-lb pins are at {}: nothing was removed", bpffs.display());
                }
                // Only xdp-lb's own names (Hostile 9b J10): another tool's pins and a bpffs root stay.
                let removed = dir.remove_own()?;
                self.done(&format!("no daemon was running; removed {} pins from {}: data plane detached", removed.len(), bpffs.display()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn explain(&self, source: String, destination: String, protocol: String) -> Result<()> {
        let e: Explanation = self.ask(&Request::Explain { source, destination, protocol }, "explain")?;
        if self.json {
            return print_json(&e);
        }
        out(format_args!("{}: {}", e.service, e.explanation))
    }
}

/// `--json stats`: rates per second over the interval.
#[derive(Serialize)]
struct RatesReport<'a> {
    interval_s: f64,
    services: Vec<ServiceRates>,
    reasons: &'a std::collections::BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct ServiceRates {
    name: String,
    packets_per_s: f64,
    bits_per_s: f64,
    new_flows_per_s: f64,
    backends: Vec<BackendRates>,
}

#[derive(Serialize)]
struct BackendRates {
    address: String,
    packets_per_s: f64,
    bits_per_s: f64,
    new_flows_per_s: f64,
}

fn print_json(v: &impl Serialize) -> Result<()> {
    out(serde_json::to_string_pretty(v)?)
}

fn human_bits(bps: f64) -> String {
    match bps {
        b if b >= 1e9 => format!("{:.2}G", b / 1e9),
        b if b >= 1e6 => format!("{:.2}M", b / 1e6),
        b if b >= 1e3 => format!("{:.1}k", b / 1e3),
        b => format!("{b:.0}"),
    }
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) -> Result<()> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        out(parts.join("  ").trim_end())
    };
    line(header.iter().map(|h| h.to_string()).collect())?;
    for row in rows {
        line(row)?;
    }
    Ok(())
}

/// The header of `status`: which file runs, and whether it was edited since.
fn print_config_status(c: &api::ConfigStatus) -> Result<()> {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    out(format_args!("config {} ({} service(s), read or written {} s ago)", c.path, c.services, now_ms.saturating_sub(c.loaded_unix_ms) / 1000))?;
    match (&c.disk_error, &c.rejected_edit, c.changed_on_disk) {
        (Some(e), _, _) => out(format_args!("  the file cannot be read now: {e}"))?,
        // Hostile 9 H6: a reload will not apply it, so saying it would was wrong.
        (None, Some(error), _) => {
            out("  EDITED ON DISK since, and the reload REJECTED the edit: the running configuration stays. Fix or revert")?;
            out("  the edit, then `xdp-lb reload`. Until then CLI changes are refused, except backend drain, undrain and weight.")?;
            out(format_args!("    {error}"))?
        }
        (None, None, true) => out("  EDITED ON DISK since: not running yet; `xdp-lb reload` applies it (CLI changes are refused until then)")?,
        (None, None, false) => {}
    }
    if let Some(problem) = &c.owner_problem {
        out(format_args!("  WARNING: {problem}"))?;
    }
    if !c.start_differences.is_empty() {
        out("  at start the adopted data plane differed from the file:")?;
        for d in &c.start_differences {
            out(format_args!("    {d}"))?;
        }
    }
    out("")
}

fn print_announce_status(a: &xdp_lb::announce::AnnounceStatus) -> Result<()> {
    let drained = if a.node_drained { ", NODE DRAINED (`xdp-lb node undrain` announces again)" } else { "" };
    out(format_args!("announce: routing table {}{drained}", a.table))?;
    let rows = a
        .vips
        .iter()
        .map(|v| vec![format!("  {}", v.vip), if v.announced { "announced" } else { "withdrawn" }.into(), v.reason.clone().unwrap_or_default()])
        .collect();
    print_table(&["  VIP", "STATE", "REASON"], rows)?;
    out("")
}

/// A daemon error as one line (the CLI's errors are one line each): a list the daemon sends on
/// several lines (a reload's invalid fields) is joined with "; ".
fn one_line(message: &str) -> String {
    let mut out = String::new();
    for line in message.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    out
}
