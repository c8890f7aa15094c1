//! `xdp-lb run`: validate, load, program, attach; then serve signals until told to stop.

use std::path::Path;

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};
use xdp_lb::{
    config::{Config, Mode},
    dataplane::{self, Dataplane},
    neighbours, stats,
    tables::Tables,
};

/// DSR cannot fall back to the kernel for an unresolved neighbour, so refresh them regularly.
const NEIGHBOUR_REFRESH: std::time::Duration = std::time::Duration::from_secs(15);

pub fn run(config_path: &Path, ifaces: &[String]) -> Result<()> {
    let config = Config::load(config_path)?;
    warn_if_forwarding_disabled();

    // Every --iface must exist before anything is loaded or attached.
    for iface in ifaces {
        dataplane::ifindex(iface)?;
    }
    let mut dataplane = Dataplane::load(&config.dataplane)?;
    let mut tables = Tables::new(config.dataplane.maglev_cells, dataplane::MAX_SERVICES, dataplane::MAX_BACKENDS);
    tables.apply(&config, &mut dataplane).context("programming the services")?;
    for iface in ifaces {
        // On failure, dropping `dataplane` detaches whatever was attached before.
        dataplane.attach(iface)?;
    }
    log_services(&config);
    neighbours::warm(backend_addresses(&config));
    info!(interfaces = ifaces.len(), services = config.services.len(), "xdp-lb ready");

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(serve(config_path, config, &mut dataplane, &mut tables))?;

    dataplane.detach_all();
    let snapshot = stats::snapshot(&dataplane, &tables)?;
    println!("{}", serde_json::to_string_pretty(&snapshot)?);
    Ok(())
}

async fn serve(config_path: &Path, mut config: Config, dataplane: &mut Dataplane, tables: &mut Tables) -> Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut refresh = tokio::time::interval(NEIGHBOUR_REFRESH);
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                match reload(config_path, &config, dataplane, tables) {
                    Ok(new) => {
                        config = new;
                        info!(services = config.services.len(), "config reloaded");
                    }
                    Err(error) => error!("reload rejected, keeping the running configuration: {error:#}"),
                }
            }
            _ = refresh.tick() => {
                neighbours::warm(config.services.iter().filter(|s| s.mode == Mode::Dsr).flat_map(|s| s.backends.iter().map(|b| b.address)));
            }
            _ = terminate.recv() => { info!("SIGTERM: detaching"); return Ok(()); }
            _ = interrupt.recv() => { info!("SIGINT: detaching"); return Ok(()); }
        }
    }
}

fn reload(path: &Path, running: &Config, dataplane: &mut Dataplane, tables: &mut Tables) -> Result<Config> {
    let new = Config::load(path)?;
    if new.dataplane != running.dataplane {
        anyhow::bail!("[dataplane] sizes cannot change while running (restart xdp-lb to resize the maps)");
    }
    tables.apply(&new, dataplane).context("programming the services")?;
    log_services(&new);
    neighbours::warm(backend_addresses(&new));
    Ok(new)
}

fn backend_addresses(config: &Config) -> impl Iterator<Item = std::net::SocketAddr> + '_ {
    config.services.iter().flat_map(|s| s.backends.iter().map(|b| b.address))
}

fn log_services(config: &Config) {
    for s in &config.services {
        info!(
            service = %s.name, vip = %s.vip, protocol = ?s.protocol, mode = ?s.mode, scheduler = ?s.scheduler,
            backends = s.backends.len(), ring_size = s.ring_size, "service programmed"
        );
    }
}

fn warn_if_forwarding_disabled() {
    for (file, what) in [("/proc/sys/net/ipv4/ip_forward", "IPv4"), ("/proc/sys/net/ipv6/conf/all/forwarding", "IPv6")] {
        if std::fs::read_to_string(file).map(|v| v.trim() == "0").unwrap_or(false) {
            warn!("{what} forwarding is disabled ({file} = 0): the FIB refuses to forward, so VIP traffic of that family goes to the kernel instead of the backends");
        }
    }
}
