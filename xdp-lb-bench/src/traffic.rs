//! Per-packet cost on traffic that looks like traffic (issue 12): many TCP flows, established and
//! new, each program in its own copy of the topology, fed in interleaved slices.
//!
//! - Every program's output frames are dropped on arrival by `xdp_drop_sink` on the receiving veth
//!   (the backends' for xdp-lb, the client's for the MAC-swap reference): all programs meet the
//!   same cheap end, and backends never answer, so no reply mixes into a program's average.
//! - Established: TCP ACKs from `--pps-flows` source ports of the client to the VIP. Each slice is
//!   preceded by an unmeasured pass over every flow, which (re)creates its connection-table entry.
//! - New: TCP SYNs, each from a source address no earlier packet used (a connection-table miss,
//!   the scheduler and the inserts every new flow pays).
//! - Established, full table: the established flows again after the new ones filled the tables.
//! - Slices: per scenario, in the order above, `--pps-rounds` rounds; in each, every program gets
//!   one slice of `--slice-secs` seconds, the programs' order rotating per round. Single runs of map-heavy
//!   programs vary ±20–40 % on a shared VM; interleaving spreads that drift over all programs.
//! - Cost: Δrun_time_ns / Δrun_cnt (kernel.bpf_stats_enabled) over all slices of a scenario; the
//!   net cost subtracts the trivial program's, measured on the same traffic in the same run (it
//!   removes the two clock reads bpf_stats adds per run, ~35–55 ns in a VM).

use std::net::Ipv4Addr;

use anyhow::Context;
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use xdp_lb_common::maps::names;
use xdp_lb_testbed::{Daemon, Mode, Netns, Topology};

use crate::{report::Report, util, Bench, HTTP_PORT};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// The established flows on a table that holds little else.
    Established,
    /// New flows (SYNs); they fill the table and then evict.
    New,
    /// The established flows again, once the new flows filled the table: their entries now lie
    /// scattered over the table's memory, as on a balancer that has run for a while.
    EstablishedFull,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Established => "established",
            Scenario::New => "new",
            Scenario::EstablishedFull => "established, full table",
        }
    }

    fn sends_syns(self) -> bool {
        self == Scenario::New
    }
}

/// In this order: the New phase changes the tables the later one measures.
const SCENARIOS: [Scenario; 3] = [Scenario::Established, Scenario::New, Scenario::EstablishedFull];

/// The reference program's row key; net costs subtract its cost.
pub const REFERENCE: &str = "xdp_tx_reference";

/// Client source ports of the established flows start here.
const FIRST_PORT: u16 = 10_000;

/// One scenario's result for one program, over all its slices.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TrafficRow {
    pub scenario: String,
    pub key: String,
    pub name: String,
    /// Σ run_time_ns / Σ run_cnt over the slices.
    pub ns_per_packet: f64,
    /// Each slice's ns/packet, in order.
    pub slices: Vec<f64>,
    pub run_cnt: u64,
    /// Packets the client sent in the measured slices.
    pub offered: u64,
    pub offered_mpps: f64,
    /// Frames the sinks dropped on the receiving veths (what the program sent on).
    pub forwarded: u64,
    pub note: String,
}

/// A program under test in its own copy of the topology, and what keeps it attached.
struct Contender {
    key: &'static str,
    name: &'static str,
    // Drop order: programs and daemon before their namespaces.
    _programs: Vec<Ebpf>,
    daemon: Option<Daemon>,
    topo: Topology,
    prog_id: u32,
    /// (namespace, interface) of the veth ends where the sink drops the program's output.
    sinks: Vec<Sink>,
    /// Source addresses the `New` slices used so far.
    new_sources: u64,
    totals: [Totals; 3],
}

#[derive(Clone, Copy)]
enum Sink {
    Client,
    Backend(usize),
}

#[derive(Default)]
struct Totals {
    run_time: u64,
    run_cnt: u64,
    offered: u64,
    secs: f64,
    forwarded: u64,
    slices: Vec<f64>,
}

/// Loads the daemon's object with its large maps shrunk (only the small programs of it run here).
fn load_object() -> anyhow::Result<Ebpf> {
    EbpfLoader::new()
        .map_max_entries(names::CONNTRACK, 1024)
        .map_max_entries(names::NAT_REVERSE, 1024)
        .map_max_entries(names::MAGLEV_RING, 1024)
        .load(xdp_lb::dataplane::program_object())
        .context("loading the eBPF object")
}

/// Attaches `program` of `ebpf` (loaded into the kernel on first use) to `iface` in `ns`, native mode.
fn attach(ns: &Netns, mut ebpf: Ebpf, program: &'static str, iface: &str) -> anyhow::Result<Ebpf> {
    let iface = iface.to_string();
    ns.run(move || -> anyhow::Result<Ebpf> {
        let prog: &mut Xdp = ebpf.program_mut(program).with_context(|| format!("no {program} in the object"))?.try_into()?;
        if prog.fd().is_err() {
            prog.load().with_context(|| format!("loading {program}"))?;
        }
        prog.attach(&iface, XdpMode::Driver).with_context(|| format!("attaching {program} to {iface} (native)"))?;
        Ok(ebpf)
    })
    .with_context(|| format!("in {}", ns.name()))
}

/// The xdp-lb configuration of a copy: one TCP service, no health checks (the sinks would fail
/// them) and no passive checks (SYNs never see a SYN-ACK here).
fn config(topo: &Topology, mode: Mode) -> String {
    let mut c = format!(
        "[[services]]\nname = \"pps\"\nvip = \"{}:{HTTP_PORT}\"\nprotocol = \"tcp\"\nmode = \"{}\"\npassive_checks = false\n[services.health_check]\nkind = \"none\"\n",
        topo.vip_v4(),
        mode.as_str()
    );
    for i in 0..topo.backend_count() {
        c.push_str(&format!("[[services.backends]]\naddress = \"{}:{HTTP_PORT}\"\n", topo.backend_addr_v4(i)));
    }
    c
}

fn new_topology(tag: &str) -> anyhow::Result<Topology> {
    let topo = Topology::new(tag, 3)?;
    topo.pin_neighbours()?;
    // A queue on the client's sending end: veth pushes back when its peer's ring is full, and
    // trafgen (on the qdisc path) then waits instead of failing.
    topo.client().exec_ok("tc", &["qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit", "4096"])?;
    Ok(topo)
}

fn reference() -> anyhow::Result<Contender> {
    let topo = new_topology("ppsref")?;
    let ebpf = attach(topo.lb(), load_object()?, xdp_lb::dataplane::REFERENCE_PROGRAM_NAME, topo.client_iface())?;
    let ebpf = attach(topo.client(), ebpf, xdp_lb::dataplane::SINK_PROGRAM_NAME, "eth0")?;
    let prog_id = util::xdp_prog_id(topo.lb(), topo.client_iface())?;
    Ok(Contender {
        key: REFERENCE,
        name: "trivial: MAC swap + XDP_TX",
        _programs: vec![ebpf],
        daemon: None,
        topo,
        prog_id,
        sinks: vec![Sink::Client],
        new_sources: 0,
        totals: Default::default(),
    })
}

fn xdp_lb(b: &Bench, mode: Mode) -> anyhow::Result<Contender> {
    let topo = new_topology(&format!("pps{}", mode.as_str()))?;
    let daemon = Daemon::start_with_args(&b.args.xdp_lb, topo.lb(), &topo.lb_ifaces(), &config(&topo, mode), &[])
        .with_context(|| format!("starting xdp-lb ({})", mode.as_str()))?;
    let mut ebpf = load_object()?;
    let mut sinks = Vec::new();
    for i in 0..topo.backend_count() {
        ebpf = attach(topo.backend(i), ebpf, xdp_lb::dataplane::SINK_PROGRAM_NAME, "eth0")?;
        sinks.push(Sink::Backend(i));
    }
    let prog_id = util::xdp_prog_id(topo.lb(), topo.client_iface())?;
    let (key, name) = match mode {
        Mode::Dsr => ("xdp_dsr", "xdp-lb dsr"),
        Mode::Nat => ("xdp_nat", "xdp-lb nat"),
    };
    Ok(Contender {
        key,
        name,
        _programs: vec![ebpf],
        daemon: Some(daemon),
        topo,
        prog_id,
        sinks,
        new_sources: 0,
        totals: Default::default(),
    })
}

impl Contender {
    fn forwarded_now(&self) -> anyhow::Result<u64> {
        let mut n = 0;
        for sink in &self.sinks {
            let ns = match *sink {
                Sink::Client => self.topo.client(),
                Sink::Backend(i) => self.topo.backend(i),
            };
            n += util::ethtool_stat(ns, "eth0", "_xdp_drops")?;
        }
        Ok(n)
    }

    /// trafgen's packet description for `scenario`, `sent` packets into the slice.
    fn conf(&self, scenario: Scenario, flows: u16, sent: u64) -> anyhow::Result<String> {
        let topo = &self.topo;
        let da = util::mac(topo.lb(), topo.client_iface())?;
        let sa = util::mac(topo.client(), "eth0")?;
        let vip = topo.vip_v4();
        let (ip, tcp) = match scenario {
            Scenario::Established | Scenario::EstablishedFull => {
                let last = u32::from(FIRST_PORT) + u32::from(flows) - 1;
                (
                    format!("ipv4(saddr={}, daddr={vip}, ttl=64)", topo.client_addr_v4()),
                    format!("tcp(sp=dinc({FIRST_PORT}, {last}), dp={HTTP_PORT}, ack, seq=1, aseq=1)"),
                )
            }
            Scenario::New => {
                // 10.128.0.0 upwards: never the client's, a backend's or the VIP's subnet. Only the
                // lb's XDP program sees these packets (the sinks drop them), so nothing routes back.
                let first = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)).wrapping_add((self.new_sources + sent) as u32));
                (
                    format!("ipv4(saddr={first}, saddr=dinc(), daddr={vip}, ttl=64)"),
                    format!("tcp(sp=40000, dp={HTTP_PORT}, syn, seq=1)"),
                )
            }
        };
        // 60-byte frames: Ethernet + IPv4 + TCP + 6 bytes.
        Ok(format!("{{\n  eth(da={da}, sa={sa}),\n  {ip},\n  {tcp},\n  fill(0x58, 6)\n}}\n"))
    }

    /// One measured slice of `scenario`, `--slice-secs` long.
    fn slice(&mut self, b: &Bench, scenario: Scenario) -> anyhow::Result<f64> {
        let flows = b.args.pps_flows;
        let conf_path = b.dir().join(format!("{}-{}.trafgen", self.key, scenario as usize));
        let client = self.topo.client();
        if !scenario.sends_syns() {
            // Every flow once (twice, for packets a full ring dropped), unmeasured: entries evicted
            // by a New slice are back before the measurement starts.
            util::trafgen(client, &conf_path, 2 * u64::from(flows), b.args.trafgen_cpu, |sent| {
                self.conf(scenario, flows, sent)
            })?;
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let forwarded = self.forwarded_now()?;
        let offered = util::if_stats(client, "eth0")?.tx;
        let (t0, c0) = util::prog_stats(self.prog_id)?;
        let duration = std::time::Duration::from_secs_f64(b.args.slice_secs);
        let (_, secs) = util::trafgen_for(client, &conf_path, duration, b.args.trafgen_cpu, |sent| {
            self.conf(scenario, flows, sent)
        })?;
        // Let the last packets drain through the rings.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let (t1, c1) = util::prog_stats(self.prog_id)?;
        let offered = util::if_stats(client, "eth0")?.tx.saturating_sub(offered);
        let forwarded = self.forwarded_now()?.saturating_sub(forwarded);
        if scenario.sends_syns() {
            self.new_sources += offered;
        }
        let t = &mut self.totals[scenario as usize];
        let ns = (t1 - t0) as f64 / (c1 - c0).max(1) as f64;
        t.run_time += t1 - t0;
        t.run_cnt += c1 - c0;
        t.offered += offered;
        t.secs += secs;
        t.forwarded += forwarded;
        t.slices.push(ns);
        Ok(ns)
    }

    fn rows(&self) -> Vec<TrafficRow> {
        SCENARIOS
            .iter()
            .map(|&scenario| {
                let t = &self.totals[scenario as usize];
                TrafficRow {
                    scenario: scenario.as_str().into(),
                    key: self.key.into(),
                    name: self.name.into(),
                    ns_per_packet: t.run_time as f64 / t.run_cnt.max(1) as f64,
                    slices: t.slices.clone(),
                    run_cnt: t.run_cnt,
                    offered: t.offered,
                    offered_mpps: if t.secs > 0.0 { t.offered as f64 / t.secs / 1e6 } else { 0.0 },
                    forwarded: t.forwarded,
                    note: String::new(),
                }
            })
            .collect()
    }

    /// The non-zero pass/drop reasons of an xdp-lb copy (none for the reference).
    fn reasons(&self) -> String {
        let Some(daemon) = &self.daemon else { return String::new() };
        match daemon.stats() {
            Ok(stats) => {
                let r: Vec<String> =
                    stats.reasons.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect();
                if r.is_empty() { String::new() } else { format!("not forwarded: {}", r.join(", ")) }
            }
            Err(e) => format!("reading its counters failed: {e:#}"),
        }
    }
}

pub fn run(b: &Bench, r: &mut Report) -> anyhow::Result<()> {
    anyhow::ensure!(b.args.pps_flows >= 1, "--pps-flows must be at least 1");
    anyhow::ensure!(
        (0.2..=60.0).contains(&b.args.slice_secs),
        "--slice-secs {} must be between 0.2 and 60",
        b.args.slice_secs
    );
    anyhow::ensure!(
        u32::from(FIRST_PORT) + u32::from(b.args.pps_flows) <= 65_536,
        "--pps-flows {} reaches past port 65535 (source ports start at {FIRST_PORT})",
        b.args.pps_flows
    );
    eprintln!("  building three copies of the topology (trivial, dsr, nat)");
    let mut contenders = vec![reference()?, xdp_lb(b, Mode::Dsr)?, xdp_lb(b, Mode::Nat)?];
    let rounds = b.args.pps_rounds.max(1);
    for scenario in SCENARIOS {
        for round in 0..rounds {
            let n = contenders.len();
            for k in 0..n {
                // Rotate who goes first, so no program always follows the same one.
                let c = &mut contenders[(k + round as usize) % n];
                xdp_lb_testbed::interrupt::check()?;
                let ns = c.slice(b, scenario).with_context(|| {
                    format!("{} ({}), round {}", c.name, scenario.as_str(), round + 1)
                })?;
                eprintln!("  round {} {} {}: {ns:.1} ns/packet", round + 1, scenario.as_str(), c.name);
            }
        }
    }
    for c in &contenders {
        let note = c.reasons();
        for mut row in c.rows() {
            row.note = note.clone();
            eprintln!(
                "  {} {}: {:.1} ns/packet over {} runs; offered {} ({:.2} Mpps), forwarded {}",
                row.scenario, row.name, row.ns_per_packet, row.run_cnt, row.offered, row.offered_mpps, row.forwarded
            );
            r.traffic.push(row);
        }
    }
    Ok(())
}
