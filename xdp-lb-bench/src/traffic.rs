//! Per-packet cost on traffic that looks like traffic (issue 12): many TCP flows, established and
//! new, each program in its own copy of the topology, fed in interleaved slices.
//!
//! - The generator is `xdp_generator` run with BPF_PROG_TEST_RUN in live-frames mode
//!   ([`crate::generator`]) on the client's veth: its frames enter the lb's XDP ring as xdp_frames,
//!   without the socket buffer and qdisc trafgen paid per frame (trafgen offered 0.07–0.24 Mpps).
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
//! - Accounting per slice: frames offered (generator runs), taken into the lb's XDP ring or refused
//!   by it (the client veth's xdp_xmit counters), seen by the program (run_cnt) and forwarded (the
//!   sinks' drops). With `--napi-cpu` the receiving side runs on a CPU of its own and the generator
//!   can offer more than the program takes; without it both share the generator's CPU.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Context;
use aya::{
    programs::{Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use serde::Serialize;
use xdp_lb_common::maps::names;
use xdp_lb_testbed::{Daemon, Mode, Netns, Topology};

use crate::{
    generator::{Endpoints, Generator, Pattern},
    report::Report,
    util, Bench, HTTP_PORT,
};

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
    /// Frames the generator handed to the kernel in the measured slices.
    pub offered: u64,
    pub offered_mpps: f64,
    /// Frames the lb's veth took into its XDP ring (the rest it refused: ring full).
    pub delivered: u64,
    pub ring_drops: u64,
    /// run_cnt per second of the slices: the rate the program kept up with.
    pub seen_mpps: f64,
    /// CPU time of the generator's thread per frame offered (with the receivers' softirq work
    /// when they share its CPU), and its share of the slices' wall-clock time.
    pub gen_cpu_ns_per_frame: f64,
    pub gen_cpu_share: f64,
    /// Frames the sinks dropped on the receiving veths (what the program sent on).
    pub forwarded: u64,
    pub note: String,
}

fn mpps(frames: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        frames as f64 / secs / 1e6
    } else {
        0.0
    }
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
    /// The established and the new-flow generator (loaded on first use).
    generators: [Option<Generator>; 2],
    totals: [Totals; 3],
}

#[derive(Clone, Copy)]
enum Sink {
    Client,
    Backend(usize),
}

/// Counters read before and after a slice.
struct Counters {
    run_time: u64,
    run_cnt: u64,
    delivered: u64,
    ring_drops: u64,
    forwarded: u64,
}

#[derive(Default)]
struct Totals {
    run_time: u64,
    run_cnt: u64,
    offered: u64,
    delivered: u64,
    ring_drops: u64,
    gen_cpu_secs: f64,
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
        generators: [None, None],
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
        generators: [None, None],
        totals: Default::default(),
    })
}

impl Contender {
    /// The measured program's veth runs its NAPI on `cpu` (see `--napi-cpu`). The sinks stay in
    /// softirq, which then runs on that same CPU: threads of their own at the same priority would
    /// wait behind the program's thread while their rings overflow.
    fn napi_on_cpu(&self, cpu: u32, realtime: bool) -> anyhow::Result<()> {
        util::napi_on_cpu(self.topo.lb(), self.topo.client_iface(), cpu, realtime)?;
        Ok(())
    }

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

    /// Generator's frames for `scenario` from this copy's client, loaded on first use and kept: the
    /// New generator's counter goes on across slices, so no source address is ever used twice.
    fn generator<'g>(
        generators: &'g mut [Option<Generator>; 2],
        topo: &Topology,
        b: &Bench,
        scenario: Scenario,
    ) -> anyhow::Result<&'g mut Generator> {
        let slot = usize::from(scenario.sends_syns());
        if generators[slot].is_none() {
            let ends = Endpoints {
                src_mac: util::parse_mac(&util::mac(topo.client(), "eth0")?)?,
                dst_mac: util::parse_mac(&util::mac(topo.lb(), topo.client_iface())?)?,
                src: topo.client_addr_v4(),
                dst: topo.vip_v4(),
                dport: HTTP_PORT,
            };
            let pattern = if scenario.sends_syns() {
                // 10.128.0.0 upwards: never the client's, a backend's or the VIP's subnet. Only the
                // lb's XDP program sees these packets (the sinks drop them), so nothing routes back.
                Pattern::New { first_addr: Ipv4Addr::new(10, 128, 0, 0) }
            } else {
                Pattern::Established { first_port: FIRST_PORT, flows: b.args.pps_flows }
            };
            let mut generator = Generator::load(&ends, pattern)?;
            // A veth pair of its own in the client's namespace, which nothing sends to (see
            // `Generator::park_on`); it goes with the namespace.
            let park = format!("gen{slot}");
            if topo.client().ip(&["link", "show", "dev", &park]).is_err() {
                topo.client().ip(&["link", "add", &park, "type", "veth", "peer", "name", &format!("{park}p")])?;
            }
            generator.park_on(topo.client(), &park)?;
            generators[slot] = Some(generator);
        }
        Ok(generators[slot].as_mut().expect("loaded above"))
    }

    /// One measured slice of `scenario`, `--slice-secs` long.
    fn slice(&mut self, b: &Bench, scenario: Scenario) -> anyhow::Result<f64> {
        let flows = u64::from(b.args.pps_flows);
        let cpu = b.args.gen_cpu;
        if !scenario.sends_syns() {
            // Every flow twice, unmeasured: entries evicted by a New slice are back before the
            // measurement starts (twice, in case the receiving ring dropped some).
            Self::generator(&mut self.generators, &self.topo, b, scenario)?.send(
                self.topo.client(),
                "eth0",
                cpu,
                !b.args.gen_normal_priority,
                Duration::from_secs(10),
                2 * flows,
            )?;
            std::thread::sleep(Duration::from_millis(50));
        }
        let before = self.counters()?;
        let sent = Self::generator(&mut self.generators, &self.topo, b, scenario)?.send(
            self.topo.client(),
            "eth0",
            cpu,
            !b.args.gen_normal_priority,
            Duration::from_secs_f64(b.args.slice_secs),
            u64::MAX,
        )?;
        // Let the last frames drain through the rings.
        std::thread::sleep(Duration::from_millis(100));
        let after = self.counters()?;
        let t = &mut self.totals[scenario as usize];
        let (run_time, run_cnt) = (after.run_time - before.run_time, after.run_cnt - before.run_cnt);
        let ns = run_time as f64 / run_cnt.max(1) as f64;
        t.run_time += run_time;
        t.run_cnt += run_cnt;
        t.offered += sent.frames;
        t.gen_cpu_secs += sent.cpu_secs;
        t.delivered += after.delivered - before.delivered;
        t.ring_drops += after.ring_drops - before.ring_drops;
        t.secs += sent.secs;
        t.forwarded += after.forwarded - before.forwarded;
        t.slices.push(ns);
        Ok(ns)
    }

    fn counters(&self) -> anyhow::Result<Counters> {
        let (run_time, run_cnt) = util::prog_stats(self.prog_id)?;
        let client = self.topo.client();
        Ok(Counters {
            run_time,
            run_cnt,
            // veth counts frames sent into its peer's XDP ring as the sender's tx_queue_N_xdp_xmit,
            // and those the full ring refused as tx_queue_N_xdp_xmit_errors.
            delivered: util::ethtool_stat(client, "eth0", "_xdp_xmit")?,
            ring_drops: util::ethtool_stat(client, "eth0", "_xdp_xmit_errors")?,
            forwarded: self.forwarded_now()?,
        })
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
                    offered_mpps: mpps(t.offered, t.secs),
                    delivered: t.delivered,
                    ring_drops: t.ring_drops,
                    seen_mpps: mpps(t.run_cnt, t.secs),
                    gen_cpu_ns_per_frame: t.gen_cpu_secs * 1e9 / t.offered.max(1) as f64,
                    gen_cpu_share: if t.secs > 0.0 { t.gen_cpu_secs / t.secs } else { 0.0 },
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
    let realtime = !b.args.gen_normal_priority;
    if let Some(cpu) = b.args.napi_cpu {
        anyhow::ensure!(cpu != b.args.gen_cpu, "--napi-cpu {cpu} is the generator's CPU (--gen-cpu)");
        for c in &contenders {
            c.napi_on_cpu(cpu, realtime).with_context(|| format!("{}: NAPI threads on CPU {cpu}", c.name))?;
        }
    }
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
                "  {} {}: {:.1} ns/packet over {} runs ({:.2} Mpps); offered {} ({:.2} Mpps; sender CPU {:.0} ns/frame, {:.0} % of the time), into the lb's ring {}, refused by it {}, forwarded {}",
                row.scenario,
                row.name,
                row.ns_per_packet,
                row.run_cnt,
                row.seen_mpps,
                row.offered,
                row.offered_mpps,
                row.gen_cpu_ns_per_frame,
                row.gen_cpu_share * 100.0,
                row.delivered,
                row.ring_drops,
                row.forwarded
            );
            r.traffic.push(row);
        }
    }
    Ok(())
}
