//! The operator commands: each builds one API request, sends it to the daemon and prints the
//! answer as a table (or as JSON with `--json`). Any error exits non-zero with one line.

use std::{path::Path, time::Duration};

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use serde_json::Value;
use xdp_lb::{
    api::{self, Request, ServiceChanges},
    config::{RawHealthCheck, RawService},
    stats::Snapshot,
};

#[derive(Subcommand)]
pub enum ServiceCommand {
    /// Add a virtual service.
    Add {
        name: String,
        #[command(flatten)]
        settings: ServiceSettings,
    },
    /// Change settings of a service (only the options given).
    Update {
        name: String,
        #[command(flatten)]
        settings: ServiceSettings,
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
    #[arg(long)]
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

pub struct Client<'a> {
    pub socket: &'a Path,
    pub json: bool,
}

impl Client<'_> {
    fn call(&self, request: &Request) -> Result<Value> {
        let response = api::call(self.socket, request)?;
        if !response.ok {
            bail!("{}", response.error.unwrap_or_else(|| "the daemon refused the request".into()));
        }
        Ok(response.data)
    }

    fn done(&self, what: &str) -> Result<()> {
        if self.json {
            println!("{{\"ok\":true}}");
        } else {
            println!("{what}");
        }
        Ok(())
    }

    pub fn service(&self, command: ServiceCommand) -> Result<()> {
        match command {
            ServiceCommand::Add { name, settings } => {
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
            ServiceCommand::Update { name, settings } => {
                let changes = ServiceChanges {
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
                self.call(&Request::ServiceUpdate { name: name.clone(), changes })?;
                self.done(&format!("service {name} updated"))
            }
            ServiceCommand::Remove { name } => {
                self.call(&Request::ServiceRemove { name: name.clone() })?;
                self.done(&format!("service {name} removed"))
            }
            ServiceCommand::List => {
                let data = self.call(&Request::ServiceList)?;
                if self.json {
                    return print_json(&data);
                }
                let rows = array(&data)
                    .iter()
                    .map(|s| {
                        vec![
                            text(&s["name"]),
                            text(&s["vip"]),
                            text(&s["protocol"]),
                            text(&s["mode"]),
                            text(&s["scheduler"]),
                            array(&s["backends"]).len().to_string(),
                        ]
                    })
                    .collect();
                print_table(&["SERVICE", "VIP", "PROTO", "MODE", "SCHEDULER", "BACKENDS"], rows);
                Ok(())
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
            BackendCommand::List { service } => return self.status(service),
        };
        self.call(&request)?;
        self.done(&done)
    }

    pub fn status(&self, service: Option<String>) -> Result<()> {
        if service.is_none() && !self.json {
            let status = self.call(&Request::Status)?;
            let config: api::ConfigStatus = serde_json::from_value(status["config"].clone())?;
            print_config_status(&config);
        }
        let data = self.call(&Request::BackendList { service })?;
        if self.json {
            return print_json(&data);
        }
        let mut rows = Vec::new();
        for s in array(&data) {
            println!(
                "{} {} {}/{} {} [{}]",
                text(&s["name"]),
                text(&s["vip"]),
                text(&s["protocol"]),
                text(&s["mode"]),
                text(&s["scheduler"]),
                text(&s["state"])
            );
            rows.clear();
            for b in array(&s["backends"]) {
                let mut flags = Vec::new();
                if b["backup"] == true {
                    flags.push("backup");
                }
                if b["drained"] == true {
                    flags.push("drained");
                }
                if b["down"] == true {
                    flags.push("down");
                }
                rows.push(vec![
                    format!("  {}", text(&b["address"])),
                    text(&b["health"]),
                    format!("{}/{}", b["effective_weight"], b["weight"]),
                    if b["active_flows"].is_null() { "-".into() } else { b["active_flows"].to_string() },
                    match (&b["last_check"], &b["check_latency_us"]) {
                        (Value::Null, _) => "-".into(),
                        (c, Value::Number(us)) if c == "ok" => format!("ok {us}µs"),
                        (c, _) => text(c),
                    },
                    flags.join(","),
                ]);
            }
            print_table(&["  BACKEND", "HEALTH", "WEIGHT", "FLOWS", "LAST CHECK", "FLAGS"], std::mem::take(&mut rows));
        }
        Ok(())
    }

    /// Counters as rates over `interval`; with `watch`, again every interval (`count` times, or until
    /// interrupted).
    pub fn stats(&self, watch: bool, interval: Duration, count: Option<u32>) -> Result<()> {
        let take = || -> Result<(u64, Snapshot)> {
            let data = self.call(&Request::Stats)?;
            Ok((data["unix_ms"].as_u64().unwrap_or(0), serde_json::from_value(data["snapshot"].clone())?))
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
            let services: Vec<Value> = b
                .services
                .iter()
                .zip(&a.services)
                .map(|(s, s0)| {
                    serde_json::json!({
                        "name": s.name, "packets_per_s": rate(s0.packets, s.packets), "bits_per_s": 8.0 * rate(s0.bytes, s.bytes),
                        "new_flows_per_s": rate(s0.new_flows, s.new_flows),
                        "backends": s.backends.iter().zip(&s0.backends).map(|(x, x0)| serde_json::json!({
                            "address": x.address, "packets_per_s": rate(x0.packets, x.packets), "bits_per_s": 8.0 * rate(x0.bytes, x.bytes),
                            "new_flows_per_s": rate(x0.new_flows, x.new_flows) })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            return print_json(&serde_json::json!({ "interval_s": secs, "services": services, "reasons": b.reasons }));
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
        print_table(&["SERVICE / BACKEND", "PACKETS/S", "BITS/S", "NEW FLOWS/S"], rows);
        let reasons: Vec<Vec<String>> =
            b.reasons.iter().filter(|(_, v)| **v > 0).map(|(k, v)| vec![k.clone(), v.to_string()]).collect();
        if !reasons.is_empty() {
            print_table(&["NOT FORWARDED (REASON)", "PACKETS"], reasons);
        }
        println!();
        Ok(())
    }

    /// Stops the daemon; with `detach` the data plane goes too — directly through its pins when no
    /// daemon is running.
    pub fn reload(&self, allow_empty: bool) -> Result<()> {
        let data = self.call(&Request::Reload { allow_empty })?;
        if self.json {
            return print_json(&data);
        }
        println!("config reloaded: {} service(s)", data["services"]);
        Ok(())
    }

    pub fn stop(&self, detach: bool, bpffs: &Path) -> Result<()> {
        match api::call(self.socket, &Request::Stop { detach }) {
            Ok(r) if r.ok => self.done(if detach { "xdp-lb stopped; data plane detached" } else { "xdp-lb stopped; the data plane keeps forwarding" }),
            Ok(r) => bail!("{}", r.error.unwrap_or_default()),
            Err(api::ClientError::NotRunning { .. }) if detach => {
                if !bpffs.exists() {
                    bail!("no daemon is running and nothing is pinned at {}", bpffs.display());
                }
                let removed = xdp_lb::pins::PinDir::prepare(bpffs)?.remove_all()?;
                self.done(&format!("no daemon was running; removed {} pins from {}: data plane detached", removed.len(), bpffs.display()))
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn explain(&self, source: String, destination: String, protocol: String) -> Result<()> {
        let data = self.call(&Request::Explain { source, destination, protocol })?;
        if self.json {
            return print_json(&data);
        }
        println!("{}: {}", text(&data["service"]), text(&data["explanation"]));
        Ok(())
    }
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn print_json(v: &Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn human_bits(bps: f64) -> String {
    match bps {
        b if b >= 1e9 => format!("{:.2}G", b / 1e9),
        b if b >= 1e6 => format!("{:.2}M", b / 1e6),
        b if b >= 1e3 => format!("{:.1}k", b / 1e3),
        b => format!("{b:.0}"),
    }
}

fn print_table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row);
    }
}

/// The header of `status`: which file runs, and whether it was edited since.
fn print_config_status(c: &api::ConfigStatus) {
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    println!("config {} ({} service(s), read or written {} s ago)", c.path, c.services, now_ms.saturating_sub(c.loaded_unix_ms) / 1000);
    match (&c.disk_error, c.changed_on_disk) {
        (Some(e), _) => println!("  the file cannot be read now: {e}"),
        (None, true) => println!("  EDITED ON DISK since: not running yet; `xdp-lb reload` applies it (CLI changes are refused until then)"),
        (None, false) => {}
    }
    if !c.start_differences.is_empty() {
        println!("  at start the adopted data plane differed from the file:");
        for d in &c.start_differences {
            println!("    {d}");
        }
    }
    println!();
}
