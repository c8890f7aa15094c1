//! L4: HTTP from the client namespace through each balancer in the lb namespace to the same backends.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context;
use xdp_lb_testbed::{config_toml, Daemon, Mode, Netns, Protocol, Scheduler, ServiceConfig};

use crate::{
    configs,
    report::{L4Row, Report},
    util::{self, Proc},
    Bench, HTTP_PORT,
};

/// The VIP on the lb's loopback, for the proxies that terminate connections there.
pub struct VipOnLb<'a>(&'a Netns, String);
impl<'a> VipOnLb<'a> {
    pub fn add(ns: &'a Netns, vip: &str) -> anyhow::Result<Self> {
        ns.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
        Ok(VipOnLb(ns, vip.to_string()))
    }
}
impl Drop for VipOnLb<'_> {
    fn drop(&mut self) {
        let _ = self
            .0
            .ip(&["addr", "del", &format!("{}/32", self.1), "dev", "lo"]);
    }
}

/// A multipath route for the VIP on the lb, hashed on the 5-tuple (`fib_multipath_hash_policy` 1,
/// per namespace); removed on drop.
struct EcmpRoute<'a>(&'a Netns, String);
impl<'a> EcmpRoute<'a> {
    fn add(b: &'a Bench) -> anyhow::Result<Self> {
        b.lb().sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        let vip = format!("{}/32", b.topo.vip_v4());
        let mut args = vec!["route".to_string(), "add".into(), vip.clone()];
        for i in 0..b.topo.backend_count() {
            args.extend(["nexthop", "via"].map(String::from));
            args.push(b.topo.backend_addr_v4(i).to_string());
            args.push("dev".into());
            args.push(b.topo.backend_iface(i));
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        b.lb().ip(&argv).context("adding the ECMP route for the VIP")?;
        Ok(EcmpRoute(b.lb(), vip))
    }
}
impl Drop for EcmpRoute<'_> {
    fn drop(&mut self) {
        let _ = self.0.ip(&["route", "del", &self.1]);
    }
}

struct Nft<'a>(&'a Netns);
impl Drop for Nft<'_> {
    fn drop(&mut self) {
        let _ = self.0.exec("nft", &["delete", "table", "ip", "xlbbench"]);
    }
}

pub fn xdp_config(b: &Bench, mode: Mode) -> String {
    let backends = |port: u16| -> Vec<SocketAddr> {
        (0..b.topo.backend_count())
            .map(|i| SocketAddr::new(b.topo.backend_addr_v4(i).into(), port))
            .collect()
    };
    config_toml(&[
        ServiceConfig::new(
            "web",
            b.vip(),
            Protocol::Tcp,
            mode,
            Scheduler::Maglev,
            backends(HTTP_PORT),
        ),
        ServiceConfig::new(
            "udp",
            SocketAddr::new(b.topo.vip_v4().into(), crate::UDP_PORT),
            Protocol::Udp,
            mode,
            Scheduler::Maglev,
            backends(crate::UDP_PORT),
        ),
    ])
}

pub fn start_xdp(b: &Bench, mode: Mode) -> anyhow::Result<Daemon> {
    let ifaces = b.topo.lb_ifaces();
    Daemon::start_with_args(&b.args.xdp_lb, b.lb(), &ifaces, &xdp_config(b, mode), &[])
        .with_context(|| format!("starting xdp-lb ({})", mode.as_str()))
}

/// Keep-alive and connection-per-request runs against `target`.
fn measure(b: &Bench, name: &str, target: SocketAddr) -> anyhow::Result<L4Row> {
    let answer = util::check_http(b.client(), target)?;
    eprintln!("  {name}: {target} answers {answer:?}");
    let url = format!("http://{target}/");
    let keepalive = util::wrk(b.client(), &url, &b.wrk_opts(&[]))?;
    eprintln!(
        "  {name} keep-alive: {:.0} req/s p50 {:.3} ms p99 {:.3} ms errors {}",
        keepalive.rps, keepalive.p50_ms, keepalive.p99_ms, keepalive.errors
    );
    std::thread::sleep(Duration::from_millis(500));
    let close_hdr = ["Connection: close".to_string()];
    let close = util::wrk(b.client(), &url, &b.wrk_opts(&close_hdr))?;
    eprintln!(
        "  {name} new conn: {:.0} req/s p50 {:.3} ms p99 {:.3} ms errors {}",
        close.rps, close.p50_ms, close.p99_ms, close.errors
    );
    // Let TIME_WAIT sockets and the proxies settle before the next contender.
    std::thread::sleep(Duration::from_secs(1));
    Ok(L4Row {
        name: name.to_string(),
        keepalive: Some(keepalive),
        new_conn: Some(close),
        note: String::new(),
        keepalive_rounds: Vec::new(),
        new_conn_rounds: Vec::new(),
    })
}

fn record(r: &mut Report, key: &str, name: &str, result: anyhow::Result<L4Row>) {
    match result {
        Ok(mut row) => {
            row.name = name.to_string();
            r.l4.push((key.to_string(), row));
        }
        Err(e) => {
            eprintln!("  {name}: failed: {e:#}");
            r.l4.push((
                key.to_string(),
                L4Row {
                    name: name.to_string(),
                    keepalive: None,
                    new_conn: None,
                    note: format!("failed: {e:#}"),
                    keepalive_rounds: Vec::new(),
                    new_conn_rounds: Vec::new(),
                },
            ));
        }
    }
}

/// `--rounds` rounds over all contenders (so slow drifts of a shared machine hit every contender),
/// then per contender the median round, keep-alive and new-connection separately.
pub fn run(b: &Bench, r: &mut Report) -> anyhow::Result<()> {
    let rounds = b.args.rounds.max(1);
    let mut all: Vec<(String, L4Row)> = Vec::new();
    for round in 0..rounds {
        eprintln!("  round {}/{rounds}", round + 1);
        let mut one = Report::new(&b.args);
        run_round(b, &mut one)?;
        all.extend(one.l4);
    }
    let mut keys: Vec<String> = Vec::new();
    for (k, _) in &all {
        if !keys.contains(k) {
            keys.push(k.clone());
        }
    }
    for key in keys {
        let rows: Vec<&L4Row> = all
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, r)| r)
            .collect();
        let median =
            |pick: &dyn Fn(&L4Row) -> Option<crate::util::Wrk>| -> Option<crate::util::Wrk> {
                let mut v: Vec<crate::util::Wrk> = rows.iter().filter_map(|r| pick(r)).collect();
                v.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                v.get(v.len().saturating_sub(1) / 2).cloned()
            };
        let keepalive = median(&|r| r.keepalive.clone());
        let new_conn = median(&|r| r.new_conn.clone());
        let ka_rounds: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.keepalive.as_ref().map(|w| w.rps.round()))
            .collect();
        let nc_rounds: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.new_conn.as_ref().map(|w| w.rps.round()))
            .collect();
        let mut notes: Vec<String> = Vec::new();
        if rounds > 1 {
            notes.push(format!(
                "rounds keep-alive {ka_rounds:?}, new-conn {nc_rounds:?}"
            ));
        }
        for row in &rows {
            if !row.note.is_empty()
                && !notes.contains(&row.note)
                && (row.note.starts_with("failed") || notes.len() < 2)
            {
                notes.push(row.note.clone());
            }
        }
        r.l4.push((
            key,
            L4Row {
                name: rows[0].name.clone(),
                keepalive,
                new_conn,
                note: notes.join("; "),
                keepalive_rounds: ka_rounds,
                new_conn_rounds: nc_rounds,
            },
        ));
    }
    Ok(())
}

fn run_round(b: &Bench, r: &mut Report) -> anyhow::Result<()> {
    let vip = b.vip();
    let vip_ip = b.topo.vip_v4().to_string();
    let backends = b.backend_addrs();

    // 1. Kernel ECMP: the lb routes the VIP to the three backends (which hold it on lo, as for
    //    dsr) over a multipath route hashed on the 5-tuple. The kernel's own stateless L4 balancer:
    //    the same work as xdp-lb dsr, done by the lb's routing stack.
    let res = (|| {
        let _route = EcmpRoute::add(b)?;
        measure(b, "kernel-ecmp", vip)
    })();
    record(r, "kernel_ecmp", "kernel ECMP routing (L4 hash, 3 backends)", res);

    // 2. nftables DNAT, numgen round robin.
    let res = (|| {
        let file = b.dir().join("dnat.nft");
        std::fs::write(
            &file,
            configs::nft_dnat(&vip_ip, HTTP_PORT, &b.backend_ips()),
        )?;
        let _guard = Nft(b.lb());
        b.lb()
            .exec_ok("nft", &["-f", &file.display().to_string()])?;
        measure(b, "nftables", vip)
    })();
    record(r, "nftables", "nftables DNAT (numgen inc mod 3)", res);

    // 3. HAProxy, TCP mode.
    let res = (|| {
        let _vip = VipOnLb::add(b.lb(), &vip_ip)?;
        let cfg = b.dir().join("haproxy-tcp.cfg");
        std::fs::write(&cfg, configs::haproxy("tcp", &vip.to_string(), &backends))?;
        let log = b.dir().join("haproxy-tcp.log");
        let mut p = Proc::spawn(
            b.lb(),
            "haproxy",
            &["-db", "-f", &cfg.display().to_string()],
            &log,
        )?;
        util::wait_listening(b.client(), vip, Duration::from_secs(10))?;
        p.check(&log)?;
        measure(b, "haproxy-tcp", vip)
    })();
    record(r, "haproxy_tcp", "HAProxy (mode tcp, 2 threads)", res);

    // 4. nginx stream.
    let res = (|| {
        let _vip = VipOnLb::add(b.lb(), &vip_ip)?;
        let cfg = b.dir().join("nginx-stream.conf");
        std::fs::write(
            &cfg,
            configs::nginx_stream(b.dir(), &vip.to_string(), &backends),
        )?;
        let log = b.dir().join("nginx-stream.log");
        let err = b.dir().join("nginx-stream.early.err").display().to_string();
        let mut p = Proc::spawn(
            b.lb(),
            "nginx",
            &["-e", &err, "-c", &cfg.display().to_string()],
            &log,
        )?;
        util::wait_listening(b.client(), vip, Duration::from_secs(10))?;
        p.check(&log)?;
        measure(b, "nginx-stream", vip)
    })();
    record(r, "nginx_stream", "nginx stream (2 workers)", res);

    // 5./6. xdp-lb.
    for (mode, key) in [(Mode::Nat, "xdp_nat"), (Mode::Dsr, "xdp_dsr")] {
        let res = (|| {
            let daemon = start_xdp(b, mode)?;
            let mut row = measure(b, key, vip)?;
            let stats = daemon.stop_stats()?;
            let drops: Vec<String> = stats
                .reasons
                .iter()
                .filter(|(k, v)| k.starts_with("drop_") && **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let web = stats
                .service("web")
                .map(|s| (s.packets, s.new_flows))
                .unwrap_or_default();
            row.note = format!(
                "XDP forwarded {} packets, {} new flows{}",
                web.0,
                web.1,
                if drops.is_empty() {
                    String::new()
                } else {
                    format!("; drops: {}", drops.join(", "))
                }
            );
            Ok(row)
        })();
        record(r, key, &format!("xdp-lb {}", mode.as_str()), res);
    }
    Ok(())
}
