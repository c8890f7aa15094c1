//! `cargo xtask demo`: the stack at work in throw-away namespace testbeds, in three scenes
//! (`--scene`, default `architecture`).
//!
//! 1. `basic`: one balancer: client, lb and three backends; the daemon runs a NAT TCP service on
//!    the VIP, the client sends HTTP requests, the demo shows where they landed and what the daemon
//!    counted.
//! 2. `multinode`: two balancer nodes behind a router (issue 11): each node's BIRD announces the
//!    VIP over BGP, the router splits the flows over both by ECMP; one node is drained and restored
//!    while the client holds connections open and opens new ones, counting every failure (there
//!    must be none).
//! 3. `architecture`: clients → xdp-lb → three l7-sidecar replicas → users, orders, payments and
//!    users v2, with JWT auth and a rate limit, a mixed load, the live dashboard and a summary line
//!    a second (see `architecture.rs`).
//!
//! Everything is removed at the end, also on Ctrl-C: the first one stops at the next step and lets
//! every guard clean up.

pub mod architecture;
mod multinode;

use std::{collections::BTreeMap, io::Write, path::Path};

use anyhow::{ensure, Context};
use xdp_lb_testbed::{
    config_toml, http_get, interrupt, Daemon, Family, IdentityServers, Mode, Protocol, Scheduler, ServiceConfig,
    Topology,
};

const BACKENDS: usize = 3;
const REQUESTS: usize = 300;
const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Scene {
    Basic,
    Multinode,
    Architecture,
}

/// Runs `scene`; `arch` carries the binaries and options (the first two scenes need only xdp-lb).
pub fn run(scene: Scene, arch: &architecture::Options) -> anyhow::Result<()> {
    let xdp_lb_binary = arch.xdp_lb.as_path();
    ensure!(xdp_lb_binary.exists(), "no daemon binary at {} (build it first)", xdp_lb_binary.display());
    interrupt::catch_sigint().context("installing the Ctrl-C handler")?;
    let result = match scene {
        Scene::Basic => {
            println!("=== scene 1: one balancer ===\n");
            demo(xdp_lb_binary)
        }
        Scene::Multinode => {
            println!("=== scene 2: two balancer nodes behind a router (BGP, ECMP) ===\n");
            multinode::scene(xdp_lb_binary)
        }
        Scene::Architecture => {
            println!("=== the architecture: clients → xdp-lb → 3 l7-sidecar replicas → users, orders, payments, users v2 ===\n");
            architecture::scene(arch)
        }
    };
    // Every guard has dropped by now: namespaces, servers and daemon are gone, whatever happened.
    println!("\ntestbed removed");
    match result {
        // Whatever failed after Ctrl-C failed because of it: the details would only distract.
        Err(_) if interrupt::interrupted() => anyhow::bail!("interrupted by Ctrl-C"),
        other => other,
    }
}

fn demo(binary: &Path) -> anyhow::Result<()> {
    println!("building testbed: client ── lb ── {BACKENDS} backends (network namespaces, veth pairs)");
    let topo = Topology::new("demo", BACKENDS)?;
    interrupt::check()?;
    let _servers = IdentityServers::start_all(&topo, HTTP_PORT, UDP_PORT)?;
    let vip = topo.vip_socket(Family::V4, HTTP_PORT);
    let backends = (0..BACKENDS).map(|i| topo.backend_socket(Family::V4, i, HTTP_PORT));
    let service = ServiceConfig::new("web", vip, Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends);
    let config = config_toml(&[service]);
    println!("starting {} in {} with:\n\n{config}", binary.display(), topo.lb().name());
    let daemon = Daemon::start(binary, topo.lb(), &topo.lb_ifaces(), &config)?;

    println!("sending {REQUESTS} HTTP requests to {vip}, a new connection each");
    let bodies = topo.client().run(|| send(vip));
    let bodies = bodies.with_context(|| format!("daemon log:\n{}", daemon.log()))?;
    print_spread(&topo, &bodies);

    println!("\nstopping the daemon; its counters:\n");
    let stats = daemon.stop_stats()?;
    print!("{}", stats.render());
    Ok(())
}

fn send(vip: std::net::SocketAddr) -> anyhow::Result<Vec<String>> {
    let mut bodies = Vec::with_capacity(REQUESTS);
    for i in 0..REQUESTS {
        interrupt::check()?;
        bodies.push(http_get(vip).with_context(|| format!("request {} of {REQUESTS}", i + 1))?);
        if (i + 1) % 50 == 0 {
            print!(".");
            let _ = std::io::stdout().flush();
        }
    }
    println!();
    Ok(bodies)
}

fn print_spread(topo: &Topology, bodies: &[String]) {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for body in bodies {
        *counts.entry(body.as_str()).or_default() += 1;
    }
    println!("\n{:<12} {:<16} {:>8}  share", "backend", "address", "requests");
    for i in 0..BACKENDS {
        let name = IdentityServers::body(i);
        let n = counts.remove(name.as_str()).unwrap_or(0);
        let bar = "#".repeat(n * 40 / bodies.len().max(1));
        println!("{name:<12} {:<16} {n:>8}  {bar}", topo.backend_addr_v4(i).to_string());
    }
    for (other, n) in counts {
        println!("{other:<12} {:<16} {n:>8}  (unexpected answer)", "?");
    }
}
