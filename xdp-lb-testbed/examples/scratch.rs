//! Scratch debugging harness (temporary).
use std::{path::Path, time::Duration};
use xdp_lb_testbed::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = if args[2] == "dsr" { Mode::Dsr } else { Mode::Nat };
    let family = if args[3] == "6" { Family::V6 } else { Family::V4 };
    let topo = Topology::new("scr", 3).unwrap();
    let _servers = IdentityServers::start_all(&topo, 80, 53).unwrap();
    let services: Vec<ServiceConfig> = [("web", Protocol::Tcp, 80u16), ("dns", Protocol::Udp, 53)].into_iter().map(|(n, p, port)| {
        ServiceConfig::new(n, topo.vip_socket(family, port), p, mode, Scheduler::Maglev, (0..3).map(|i| topo.backend_socket(family, i, port)))
    }).collect();
    let daemon = Daemon::start(Path::new(&args[1]), topo.lb(), &topo.lb_ifaces(), &config_toml(&services)).unwrap();
    let mut dumps = Vec::new();
    for (label, ns) in [("client", topo.client()), ("lb", topo.lb()), ("b0", topo.backend(0)), ("b1", topo.backend(1)), ("b2", topo.backend(2))] {
        let mut cmd = ns.command("tcpdump");
        cmd.args(["-i", "any", "-nn", "-l", "-e", "-vv"]).stdout(std::fs::File::create(format!("/tmp/scr-{label}.txt")).unwrap()).stderr(std::process::Stdio::null());
        dumps.push(ns.spawn(&mut cmd).unwrap());
    }
    std::thread::sleep(Duration::from_secs(1));
    let vip = topo.vip_socket(family, 80);
    let dns = topo.vip_socket(family, 53);
    println!("http: {:?}", topo.client().run(|| http_get(vip)));
    println!("udp: {:?}", topo.client().run(|| udp_request(dns)));
    if args.len() > 4 { std::thread::sleep(Duration::from_secs(args[4].parse().unwrap())); }
    println!("{}", daemon.log());
    let stats = daemon.stop_stats().unwrap();
    println!("{}", stats.render());
}
