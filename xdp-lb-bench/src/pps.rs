//! Per-packet cost (trafgen + kernel.bpf_stats_enabled) and the connection table.

use std::{
    net::SocketAddr,
    time::Duration,
};

use anyhow::Context;
use aya::{
    maps::{HashMap, Map, MapData},
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use xdp_lb_common::maps::{names, Conn, FlowKey};
use xdp_lb_testbed::{KeepAliveClient, Mode, Netns};

use crate::{
    l4::start_xdp,
    report::{ConntrackRow, PpsRow, Report},
    util, Bench, UDP_PORT,
};

#[derive(Clone, Debug, Default, Serialize)]
pub struct PacketRun {
    /// run_time_ns / run_cnt over the run.
    pub ns_per_packet: f64,
    pub run_cnt: u64,
    /// Packets the client's interface sent.
    pub offered: u64,
    /// Packets that arrived where the program should have sent them.
    pub forwarded: u64,
    pub secs: f64,
    pub offered_mpps: f64,
}

#[derive(Clone, Copy)]
enum Flows {
    /// To the lb's own address: not a VIP (parse, service and NAT-reply lookups, XDP_PASS).
    NotVip,
    /// One 5-tuple: established after the first packet.
    Fixed,
    /// A new source address in every packet.
    New,
}

fn trafgen_conf(b: &Bench, flows: Flows, offset: u64) -> anyhow::Result<String> {
    let da = util::mac(b.lb(), b.topo.client_iface())?;
    let sa = util::mac(b.client(), "eth0")?;
    let vip = b.topo.vip_v4();
    let mut dport = UDP_PORT;
    let ip = match flows {
        Flows::NotVip => {
            dport = 9;
            format!(
                "ipv4(saddr={}, daddr={}, ttl=64)",
                b.topo.client_addr_v4(),
                b.topo.lb_addr_v4()
            )
        }
        Flows::Fixed => format!(
            "ipv4(saddr={}, daddr={vip}, ttl=64)",
            b.topo.client_addr_v4()
        ),
        // 10.128.0.1, 10.128.0.2, ...: each packet a flow the table has not seen.
        Flows::New => {
            let first = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(10, 128, 0, 1)) + offset as u32,
            );
            format!("ipv4(saddr={first}, saddr=dinc(), daddr={vip}, ttl=64)")
        }
    };
    Ok(format!("{{\n  eth(da={da}, sa={sa}),\n  {ip},\n  udp(sport=40000, dport={dport}),\n  fill(0x58, 18)\n}}\n"))
}

/// Sends `count` packets from the client with trafgen and measures the program `prog_id`.
/// Where forwarded packets are counted.
enum Forward<'a> {
    /// rx packets of these interfaces.
    Rx(Vec<(&'a Netns, &'a str)>),
    /// XDP_TX by the program itself (veth's xdp_tx counters of the lb's client-facing interface).
    XdpTx,
    None,
}

fn forwarded_now(b: &Bench, fwd: &Forward) -> anyhow::Result<u64> {
    Ok(match fwd {
        Forward::Rx(list) => {
            let mut n = 0;
            for (ns, i) in list {
                n += util::if_stats(ns, i)?.rx;
            }
            n
        }
        Forward::XdpTx => {
            let iface = b.topo.client_iface();
            // veth counts every XDP_TX attempt under xdp_tx and the failed ones under xdp_tx_errors.
            util::ethtool_stat(b.lb(), iface, "_xdp_tx")?
        }
        Forward::None => 0,
    })
}

fn packet_run(
    b: &Bench,
    prog_id: u32,
    flows: Flows,
    count: u64,
    fwd: &Forward,
) -> anyhow::Result<PacketRun> {
    xdp_lb_testbed::interrupt::check()?;
    let conf = b.dir().join(match flows {
        Flows::Fixed => "fixed.trafgen",
        Flows::New => "new.trafgen",
        Flows::NotVip => "notvip.trafgen",
    });
    let fwd_before = forwarded_now(b, fwd)?;
    let client_before = util::if_stats(b.client(), "eth0")?;
    let (t0, c0) = util::prog_stats(prog_id)?;
    let secs = util::trafgen(b.client(), &conf, count, b.args.trafgen_cpu, |sent| trafgen_conf(b, flows, sent))?;
    // Let the last packets drain through the rings.
    std::thread::sleep(Duration::from_millis(300));
    let (t1, c1) = util::prog_stats(prog_id)?;
    let client_after = util::if_stats(b.client(), "eth0")?;
    let forwarded = forwarded_now(b, fwd)?.saturating_sub(fwd_before);
    let run_cnt = c1 - c0;
    let offered = client_after.tx - client_before.tx;
    Ok(PacketRun {
        ns_per_packet: if run_cnt > 0 {
            (t1 - t0) as f64 / run_cnt as f64
        } else {
            0.0
        },
        run_cnt,
        offered,
        forwarded,
        secs,
        offered_mpps: offered as f64 / secs / 1e6,
    })
}

/// Turns GRO off and on at the client's end of the client link: resets its NAPI ring.
fn rearm_client(b: &Bench) -> anyhow::Result<()> {
    b.client()
        .exec_ok("ethtool", &["-K", "eth0", "gro", "off"])?;
    b.client()
        .exec_ok("ethtool", &["-K", "eth0", "gro", "on"])?;
    Ok(())
}

/// Loads `xdp_tx_reference` from the daemon's object and attaches it (native mode) to the lb's
/// client-facing veth. Detached when the returned object drops.
fn attach_reference(b: &Bench) -> anyhow::Result<(Ebpf, u32)> {
    let iface = b.topo.client_iface();
    b.lb()
        .run(|| -> anyhow::Result<(Ebpf, u32)> {
            let mut ebpf = EbpfLoader::new()
                .map_max_entries(names::CONNTRACK, 1024)
                .map_max_entries(names::NAT_REVERSE, 1024)
                .load(xdp_lb::dataplane::program_object())
                .context("loading the eBPF object")?;
            let prog: &mut Xdp = ebpf
                .program_mut(xdp_lb::dataplane::REFERENCE_PROGRAM_NAME)
                .context("no xdp_tx_reference in the object")?
                .try_into()?;
            prog.load().context("loading xdp_tx_reference")?;
            prog.attach(iface, XdpMode::Driver)
                .context("attaching xdp_tx_reference (native)")?;
            let id = prog.info()?.id();
            Ok((ebpf, id))
        })
        .and_then(|(mut ebpf, id)| {
            // The bounced frames land in the client's end of the veth, which only drains frames sent
            // by XDP_TX when it runs XDP itself (GRO alone leaves them in its ring): attach xdp_lb
            // with empty maps there, which passes everything to the client's kernel.
            b.client().run(move || -> anyhow::Result<(Ebpf, u32)> {
                let pass: &mut Xdp = ebpf
                    .program_mut(xdp_lb::dataplane::PROGRAM_NAME)
                    .context("no xdp_lb in the object")?
                    .try_into()?;
                pass.load().context("loading xdp_lb")?;
                pass.attach("eth0", XdpMode::Driver)
                    .context("attaching xdp_lb to the client's eth0")?;
                Ok((ebpf, id))
            })
        })
}

fn backend_ifaces(b: &Bench) -> Forward<'_> {
    Forward::Rx(
        (0..b.topo.backend_count())
            .map(|i| (b.topo.backend(i), "eth0"))
            .collect(),
    )
}

pub fn run_pps(b: &Bench, r: &mut Report) -> anyhow::Result<()> {
    // Many flows first (the numbers the README quotes); a failure there still leaves the rest.
    if let Err(e) = crate::traffic::run(b, r) {
        if xdp_lb_testbed::interrupt::interrupted() {
            return Err(e);
        }
        eprintln!("  many-flow scenarios failed: {e:#}");
        r.notes.push(format!("many-flow per-packet scenarios failed: {e:#}"));
    }
    let n = b.args.packets;
    // Reference first: MAC swap + XDP_TX back to the client.
    let res = (|| {
        let (ebpf, id) = attach_reference(b)?;
        // Re-arm the client end's NAPI now that its peer runs XDP, so XDP_TX frames are received.
        rearm_client(b)?;
        let run = packet_run(b, id, Flows::Fixed, n, &Forward::XdpTx);
        let errors =
            util::ethtool_stat(b.lb(), b.topo.client_iface(), "_xdp_tx_errors").unwrap_or(0);
        drop(ebpf);
        // Whatever happened, leave the client's receive path working for the next sections.
        rearm_client(b)?;
        run.map(|r| (r, errors))
    })();
    let errors = res.as_ref().map(|(_, e)| *e).unwrap_or(0);
    push(
        r,
        "xdp_tx_reference",
        "XDP_TX reference (MAC swap), single UDP flow",
        res.map(|(r, _)| r),
    );
    if errors > 0 {
        if let Some(row) = r.pps.last_mut() {
            row.note = format!("{errors} XDP_TX errors (the client end's veth ring was full)");
        }
    }
    for mode in [Mode::Dsr, Mode::Nat] {
        let res = (|| {
            let daemon = start_xdp(b, mode)?;
            let id = util::xdp_prog_id(b.lb(), b.topo.client_iface())?;
            let run = packet_run(b, id, Flows::Fixed, n, &backend_ifaces(b))?;
            // The same program on a packet that is not for a VIP: parse and lookups only.
            match crate::testrun::measure(b, daemon.pin_dir(), 100_000) {
                Ok(t) => {
                    eprintln!("  test_run {}: {t:?}", mode.as_str());
                    r.testrun.push((mode.as_str().to_string(), t));
                }
                Err(e) => r.notes.push(format!(
                    "BPF_PROG_TEST_RUN ({}) failed: {e:#}",
                    mode.as_str()
                )),
            }
            let pass = if mode == Mode::Nat {
                Some(packet_run(b, id, Flows::NotVip, n / 2, &Forward::None))
            } else {
                None
            };
            let stats = daemon.stop_stats()?;
            let drops: u64 = stats
                .reasons
                .iter()
                .filter(|(k, _)| k.starts_with("drop_"))
                .map(|(_, v)| v)
                .sum();
            eprintln!(
                "  xdp-lb {}: reasons {:?}",
                mode.as_str(),
                stats
                    .reasons
                    .iter()
                    .filter(|(_, v)| **v > 0)
                    .collect::<Vec<_>>()
            );
            Ok::<_, anyhow::Error>((run, drops, pass))
        })();
        match res {
            Ok((run, drops, pass)) => {
                push(
                    r,
                    &format!("xdp_{}", mode.as_str()),
                    &format!("xdp-lb {} (single established UDP flow)", mode.as_str()),
                    Ok(run),
                );
                if let Some(row) = r.pps.last_mut() {
                    row.xdp_drops = Some(drops);
                }
                if let Some(pass) = pass {
                    push(
                        r,
                        "xdp_nat_not_vip",
                        "xdp-lb, packet not for a VIP (parse + lookups, XDP_PASS)",
                        pass,
                    );
                    if let Some(row) = r.pps.last_mut() {
                        row.note = "not forwarded by design (passed to the lb's kernel)".into();
                    }
                }
            }
            Err(e) => push(
                r,
                &format!("xdp_{}", mode.as_str()),
                &format!("xdp-lb {}", mode.as_str()),
                Err(e),
            ),
        }
    }
    Ok(())
}

fn push(r: &mut Report, key: &str, name: &str, res: anyhow::Result<PacketRun>) {
    match res {
        Ok(run) => {
            eprintln!(
                "  {name}: {:.1} ns/packet over {} runs; offered {} ({:.2} Mpps), forwarded {}",
                run.ns_per_packet, run.run_cnt, run.offered, run.offered_mpps, run.forwarded
            );
            r.pps.push(PpsRow {
                key: key.into(),
                name: name.into(),
                run: Some(run),
                xdp_drops: None,
                note: String::new(),
            });
        }
        Err(e) => {
            eprintln!("  {name}: failed: {e:#}");
            r.pps.push(PpsRow {
                key: key.into(),
                name: name.into(),
                run: None,
                xdp_drops: None,
                note: format!("failed: {e:#}"),
            });
        }
    }
}

fn count_entries(path: &std::path::Path) -> anyhow::Result<u64> {
    let data = MapData::from_pin(path).with_context(|| format!("opening {}", path.display()))?;
    let map: HashMap<MapData, FlowKey, Conn> = HashMap::try_from(Map::LruHashMap(data))?;
    let mut n = 0;
    for k in map.keys() {
        if k.is_ok() {
            n += 1;
        }
    }
    Ok(n)
}

pub fn run_conntrack(b: &Bench, r: &mut Report) -> anyhow::Result<()> {
    let vip: SocketAddr = b.vip();
    for mode in [Mode::Nat, Mode::Dsr] {
        let res = (|| -> anyhow::Result<ConntrackRow> {
            let daemon = start_xdp(b, mode)?;
            let id = util::xdp_prog_id(b.lb(), b.topo.client_iface())?;
            let fwd = backend_ifaces(b);
            // An established keep-alive connection that must survive the fill.
            util::check_http(b.client(), vip)?;
            let mut ka = b
                .client()
                .run(|| KeepAliveClient::connect(vip))
                .context("keep-alive connection to the VIP")?;
            let first = ka.get()?.trim().to_string();
            let empty = packet_run(b, id, Flows::Fixed, b.args.packets, &fwd)?;
            eprintln!(
                "  {}: established, empty table: {:.1} ns/packet",
                mode.as_str(),
                empty.ns_per_packet
            );
            let new = packet_run(b, id, Flows::New, b.args.flows, &fwd)?;
            eprintln!(
                "  {}: new flows: {:.1} ns/packet over {} packets",
                mode.as_str(),
                new.ns_per_packet,
                new.run_cnt
            );
            let entries =
                count_entries(&daemon.pin_dir().join(names::CONNTRACK)).unwrap_or_else(|e| {
                    eprintln!("  counting CONNTRACK: {e:#}");
                    0
                });
            let full = packet_run(b, id, Flows::Fixed, b.args.packets, &fwd)?;
            eprintln!(
                "  {}: established, {entries} flows tracked: {:.1} ns/packet",
                mode.as_str(),
                full.ns_per_packet
            );
            let after = ka.get().map(|s| s.trim().to_string());
            let keepalive_ok = match &after {
                Ok(body) => *body == first,
                Err(_) => false,
            };
            let mut new_ok = 0;
            for _ in 0..20 {
                if b.client()
                    .run(|| xdp_lb_testbed::http_get(vip))
                    .map(|s| s.starts_with("backend-"))
                    .unwrap_or(false)
                {
                    new_ok += 1;
                }
            }
            let note = match after {
                Ok(body) if body == first => format!("keep-alive connection still on {first}"),
                Ok(body) => format!("keep-alive connection moved from {first} to {body}"),
                Err(e) => format!("keep-alive connection broken: {e}"),
            };
            daemon.stop()?;
            Ok(ConntrackRow {
                mode: mode.as_str().into(),
                established_empty: empty,
                new_flows: new,
                established_full: full,
                tracked_flows: entries,
                keepalive_ok,
                new_connections_ok: new_ok,
                new_connections_tried: 20,
                note,
            })
        })();
        match res {
            Ok(row) => r.conntrack.push(row),
            Err(e) => {
                eprintln!("  conntrack {}: failed: {e:#}", mode.as_str());
                r.notes
                    .push(format!("conntrack {}: failed: {e:#}", mode.as_str()));
            }
        }
    }
    Ok(())
}
