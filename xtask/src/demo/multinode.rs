//! Scene 2 of the demo: two xdp-lb nodes behind a BIRD router. Both announce the VIP over BGP, the
//! router splits the flows over them (ECMP on the 5-tuple), and the demo drains one node and
//! restores it while a client holds keep-alive connections open and opens new ones, counting every
//! failure. The nodes build the same Maglev ring, so a flow that moves to the other node keeps its
//! backend: there should be none.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use xdp_lb_testbed::{
    interrupt, multinode::ANNOUNCE_TABLE, Daemon, Family, HttpServer, IdentityServers, Load, LoadConfig, MultiNode, PhaseTally,
};

const NODES: usize = 2;
const BACKENDS: usize = 3;
const PORT: u16 = 80;
/// How long each phase of the traffic runs.
const PHASE: Duration = Duration::from_secs(3);
/// The client stops after this whatever happens.
const LOAD_LIMIT: Duration = Duration::from_secs(60);
const CONVERGE: Duration = Duration::from_secs(10);
const DRAINED: usize = 1;

pub fn scene(binary: &Path) -> anyhow::Result<()> {
    println!("building testbed: client ── router ══ {NODES} nodes ── switch ── {BACKENDS} backends");
    println!("(BIRD on the router and on every node, configs from examples/bgp: eBGP, BFD 100 ms × 3, ECMP with `merge paths on`)");
    let topo = MultiNode::new("demo-mn", NODES, BACKENDS)?;
    interrupt::check()?;
    let _servers = (0..BACKENDS)
        .map(|j| {
            let any = std::net::SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), PORT);
            HttpServer::start(topo.backend(j), any, &IdentityServers::body(j))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let config = node_config(&topo);
    println!("starting xdp-lb on every node with:\n\n{config}");
    let daemons = (0..NODES)
        .map(|i| {
            Daemon::start(binary, topo.node(i), &topo.node_ifaces(), &config)
                .with_context(|| format!("starting xdp-lb in {}", topo.node(i).name()))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let took = topo.wait_router_nodes(Family::V4, &[0, 1], CONVERGE)?;
    println!("the router learned the VIP from both nodes ({} ms after the daemons were ready):", took.as_millis());
    print!("{}", topo.router().ip(&["route", "show", &topo.vip(Family::V4).to_string()])?);

    let load_config = LoadConfig {
        long_connections: 8,
        long_period: Duration::from_millis(20),
        new_period: Duration::from_millis(20),
        limit: LOAD_LIMIT,
    };
    let vip = topo.vip_socket(Family::V4, PORT);
    println!("\nclient: {} keep-alive connections to {vip} (a request every {} ms each) and a new connection every {} ms",
        load_config.long_connections, load_config.long_period.as_millis(), load_config.new_period.as_millis());
    let load = Load::start(topo.client(), vip, &load_config, "both nodes")?;
    share(&topo, "both nodes announce the VIP")?;

    load.phase("node-1 drained");
    let t0 = Instant::now();
    node_command(binary, &daemons[DRAINED], "drain")?;
    topo.wait_router_nodes(Family::V4, &[0], CONVERGE)?;
    println!("\n`xdp-lb node drain` on node-{DRAINED}: the router dropped it after {} ms", t0.elapsed().as_millis());
    share(&topo, &format!("node-{DRAINED} drained: its flows continue through node-0"))?;

    load.phase("node-1 restored");
    let t0 = Instant::now();
    node_command(binary, &daemons[DRAINED], "undrain")?;
    topo.wait_router_nodes(Family::V4, &[0, 1], CONVERGE)?;
    println!("\n`xdp-lb node undrain` on node-{DRAINED}: back on the router after {} ms", t0.elapsed().as_millis());
    share(&topo, "both nodes again")?;

    let failures = load.failures();
    let tallies = load.stop();
    print_tallies(&tallies);
    for d in daemons {
        d.stop()?;
    }
    if !failures.is_empty() {
        bail!("{} connections failed: {failures:#?}", failures.len());
    }
    println!("\nzero failed requests while a node left and came back");
    Ok(())
}

/// A DSR service (replies go from the backends straight to the client through the router) and the
/// announcement table BIRD exports from.
fn node_config(topo: &MultiNode) -> String {
    let mut out = format!("[announce]\ntable = {ANNOUNCE_TABLE}\ndrained = false\n\n");
    out.push_str(&format!(
        "[[services]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\nmode = \"dsr\"\nscheduler = \"maglev\"\n",
        topo.vip_socket(Family::V4, PORT)
    ));
    for j in 0..BACKENDS {
        out.push_str(&format!("[[services.backends]]\naddress = \"{}\"\n", topo.backend_socket(Family::V4, j, PORT)));
    }
    out
}

fn node_command(binary: &Path, daemon: &Daemon, command: &str) -> anyhow::Result<()> {
    let out = daemon.cli(binary, &["node", command])?;
    if !out.status.success() {
        bail!("xdp-lb node {command} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Lets the traffic run for one phase and shows how the router split it over the nodes.
fn share(topo: &MultiNode, what: &str) -> anyhow::Result<()> {
    let before = topo.packets_to_nodes()?;
    let end = Instant::now() + PHASE;
    while Instant::now() < end {
        interrupt::check()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = topo.packets_to_nodes()?;
    let sent: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    let total = sent.iter().sum::<u64>().max(1);
    println!("\n{what}: packets from the router in {} s (BGP and BFD included, ~10 a second)", PHASE.as_secs());
    for (i, n) in sent.iter().enumerate() {
        println!("  node-{i} {n:>7}  {:>3} %  {}", n * 100 / total, "#".repeat((n * 40 / total) as usize));
    }
    Ok(())
}

fn print_tallies(tallies: &[PhaseTally]) {
    println!("\n{:<18} {:>22} {:>8} {:>16} {:>8}", "phase", "keep-alive requests", "broken", "new connections", "failed");
    for t in tallies {
        println!("{:<18} {:>22} {:>8} {:>16} {:>8}", t.name, t.long_ok, t.long_broken, t.new_ok, t.new_failed);
    }
}
