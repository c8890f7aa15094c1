//! `cargo xtask bench`: xdp-lb against the alternatives, measured in one run on one topology.
//!
//! One veth topology (client, lb, three backends running nginx), then, section by section:
//! - `l4`: HTTP through xdp-lb nat / dsr, kernel ECMP routing to the backends, nftables DNAT,
//!   HAProxy (TCP) and nginx `stream`, keep-alive and one connection per request (wrk);
//! - `pps`: per-packet cost of the XDP program (bpf_stats) on many TCP flows, established and new,
//!   sent by an XDP generator in live-frames mode (`generator`), next to the trivial
//!   `xdp_tx_reference` program in interleaved slices (`traffic`); then the older single-UDP-flow
//!   rows (trafgen) and the BPF_PROG_TEST_RUN cross-check;
//! - `conntrack`: new flow vs established flow, and a table holding ~1M flows;
//! - `l7`: l7-sidecar (plain, and with JWT + rate limiting) vs nginx and HAProxy as HTTP proxies.
//!
//! Results: a Markdown table on stdout and in `<out>/latest.md`, the numbers in `<out>/latest.json`.

mod configs;
mod generator;
mod l4;
mod l7;
mod pps;
mod report;
mod testrun;
mod traffic;
mod util;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use xdp_lb_testbed::{Netns, Topology};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Section {
    L4,
    Pps,
    Conntrack,
    L7,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "xdp-lb benchmarks: L4 balancers, per-packet cost, connection table, L7 proxies")]
pub struct Args {
    /// Seconds per wrk measurement.
    #[arg(long, default_value_t = 8)]
    pub duration_secs: u64,
    /// Run only these sections (repeatable); all by default.
    #[arg(long, value_enum)]
    pub only: Vec<Section>,
    /// Where latest.md and latest.json go.
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
    /// L4 rounds over all contenders (the median round is reported).
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// L7 rounds over all contenders (each column's median is reported). More than L4's:
    /// the L7 ratios are close and one round's p99 varies by 2× on a shared machine (5 rounds
    /// left a 3 % p99 difference inside the rounds' spread; 11 narrow the median's).
    #[arg(long, default_value_t = 11)]
    pub l7_rounds: u32,
    /// Of the L7 rounds, how many (the first) also measure new connections (`Connection:
    /// close`, a connection per request) after the keep-alive run; 0: none.
    #[arg(long, default_value_t = 3)]
    pub l7_new_conn_rounds: u32,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    pub threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    pub connections: u32,
    /// Packets trafgen sends per per-packet measurement.
    #[arg(long, default_value_t = 2_000_000)]
    pub packets: u64,
    /// TCP flows (client source ports) of the `pps` section's established scenario.
    #[arg(long, default_value_t = 1024)]
    pub pps_flows: u16,
    /// Rounds of the `pps` section's many-flow scenarios (each round: one slice per scenario and program).
    #[arg(long, default_value_t = 5)]
    pub pps_rounds: u32,
    /// Seconds per slice of the `pps` section's many-flow scenarios (0.2 to 60).
    #[arg(long, default_value_t = 2.0)]
    pub slice_secs: f64,
    /// Flows put into the connection table for the `conntrack` section.
    #[arg(long, default_value_t = 1_000_000)]
    pub flows: u64,
    /// CPU trafgen is pinned to (single-flow rows and the `conntrack` section).
    #[arg(long, default_value_t = 1)]
    pub trafgen_cpu: u32,
    /// CPU the XDP generator of the `pps` section's many-flow scenarios runs on.
    #[arg(long, default_value_t = 1)]
    pub gen_cpu: u32,
    /// Run the receiving veths' NAPI (the measured program and the sinks) in kernel threads pinned to
    /// this CPU, apart from the generator's; without it veth runs them in softirq on the generator's
    /// CPU, which then offers only as much as the measured program takes.
    #[arg(long)]
    pub napi_cpu: Option<u32>,
    /// Run the generator (and `--napi-cpu`'s threads) at normal priority instead of SCHED_FIFO: on a
    /// shared machine it then offers only its fair share of a CPU.
    #[arg(long)]
    pub gen_normal_priority: bool,
    /// The xdp-lb binary.
    #[arg(long, default_value = "target/release/xdp-lb")]
    pub xdp_lb: PathBuf,
    /// The l7-sidecar binary (`cargo xtask bench` passes the shipped, profile-guided build).
    #[arg(long, default_value = "target/release/l7-sidecar")]
    pub l7_sidecar: PathBuf,
    /// A second l7-sidecar, measured as its own row without targets (`cargo xtask bench` passes
    /// the plain `cargo build --release` one, to show what profile guidance gains).
    #[arg(long)]
    pub l7_sidecar_plain: Option<PathBuf>,
}

impl Args {
    pub fn wants(&self, s: Section) -> bool {
        self.only.is_empty() || self.only.contains(&s)
    }
    pub fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_secs.max(1))
    }
}

pub const HTTP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 9000;
pub const L7_PORT: u16 = 8080;

/// What every section shares: the topology, the backends' nginx, a scratch directory.
pub struct Bench {
    pub args: Args,
    pub dir: tempfile::TempDir,
    // Drop order: backends' servers before the topology.
    pub backends: Vec<util::Proc>,
    pub topo: Topology,
}

impl Bench {
    pub fn lb(&self) -> &Netns {
        self.topo.lb()
    }
    pub fn client(&self) -> &Netns {
        self.topo.client()
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
    pub fn vip(&self) -> SocketAddr {
        SocketAddr::new(self.topo.vip_v4().into(), HTTP_PORT)
    }
    /// Backend HTTP addresses as `IP:port`.
    pub fn backend_addrs(&self) -> Vec<String> {
        (0..self.topo.backend_count())
            .map(|i| format!("{}:{HTTP_PORT}", self.topo.backend_addr_v4(i)))
            .collect()
    }
    pub fn backend_ips(&self) -> Vec<String> {
        (0..self.topo.backend_count())
            .map(|i| self.topo.backend_addr_v4(i).to_string())
            .collect()
    }
    pub fn wrk_opts<'a>(&self, headers: &'a [String]) -> util::WrkOptions<'a> {
        util::WrkOptions {
            threads: self.args.threads,
            connections: self.args.connections,
            duration: self.args.duration(),
            headers,
        }
    }
}

/// Measures one section of the report.
type SectionRun = fn(&Bench, &mut report::Report) -> anyhow::Result<()>;

fn main() {
    let args = Args::parse();
    if let Err(e) = run(args) {
        eprintln!("xdp-lb-bench: error: {e:#}");
        std::process::exit(1);
    }
}

/// Restores a sysctl when dropped.
struct SysctlGuard {
    path: &'static str,
    old: String,
}
impl SysctlGuard {
    fn set(path: &'static str, value: &str) -> anyhow::Result<SysctlGuard> {
        let old = util::read_trim(path);
        std::fs::write(path, value).with_context(|| format!("writing {path}"))?;
        Ok(SysctlGuard { path, old })
    }
}
impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if !self.old.is_empty() {
            let _ = std::fs::write(self.path, &self.old);
        }
    }
}

fn run(mut args: Args) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root (cargo xtask bench does): the benchmarks create namespaces and attach XDP programs");
    }
    // l7-sidecar only matters to the L7 section (a `--only pps` run needs no l7-sidecar build).
    let needs_l7 = args.wants(Section::L7);
    for bin in [Some(&args.xdp_lb), needs_l7.then_some(&args.l7_sidecar)].into_iter().flatten() {
        if !bin.exists() {
            bail!(
                "{} not found (build with cargo build --release -p xdp-lb -p l7-sidecar)",
                bin.display()
            );
        }
    }
    args.xdp_lb = std::fs::canonicalize(&args.xdp_lb)?;
    if needs_l7 {
        args.l7_sidecar = std::fs::canonicalize(&args.l7_sidecar)?;
        if let Some(plain) = &args.l7_sidecar_plain {
            args.l7_sidecar_plain = Some(
                std::fs::canonicalize(plain).with_context(|| format!("--l7-sidecar-plain {}", plain.display()))?,
            );
        }
    }
    xdp_lb_testbed::interrupt::catch_sigint()?;
    util::ensure_packages()?;
    let started = Instant::now();

    let mut report = report::Report::new(&args);
    eprintln!("xdp-lb-bench: building the topology");
    let topo = Topology::new("bench", 3)?;
    topo.pin_neighbours()?;
    // Proxies in the lb open a connection per request too.
    for (k, v) in [
        ("net.ipv4.tcp_tw_reuse", "1"),
        ("net.ipv4.ip_local_port_range", "1024 65000"),
        ("net.core.somaxconn", "4096"),
    ] {
        topo.lb().sysctl(k, v)?;
        topo.client().sysctl(k, v)?;
    }
    // A queue on the client's sending end: veth pushes back (NETDEV_TX_BUSY) when its peer's ring is
    // full, and trafgen (on the qdisc path) then waits instead of failing.
    topo.client().exec_ok(
        "tc",
        &[
            "qdisc", "replace", "dev", "eth0", "root", "pfifo", "limit", "4096",
        ],
    )?;
    let dir = tempfile::Builder::new().prefix("xdp-lb-bench-").tempdir()?;
    let mut bench = Bench {
        args: args.clone(),
        dir,
        backends: Vec::new(),
        topo,
    };
    for i in 0..bench.topo.backend_count() {
        let ns = bench.topo.backend(i);
        ns.sysctl("net.core.somaxconn", "4096")?;
        let conf = bench.dir().join(format!("nginx-b{i}.conf"));
        std::fs::write(&conf, configs::nginx_backend(bench.dir(), i))?;
        let log = bench.dir().join(format!("nginx-b{i}.log"));
        let conf_s = conf.display().to_string();
        let err_s = bench
            .dir()
            .join(format!("nginx-b{i}.early.err"))
            .display()
            .to_string();
        let p = util::Proc::spawn(ns, "nginx", &["-e", &err_s, "-c", &conf_s], &log)?;
        bench.backends.push(p);
    }
    for i in 0..bench.topo.backend_count() {
        let addr = SocketAddr::new(bench.topo.backend_addr_v4(i).into(), HTTP_PORT);
        util::wait_listening(bench.lb(), addr, Duration::from_secs(10)).with_context(|| {
            format!(
                "backend nginx {i}: {}",
                std::fs::read_to_string(bench.dir().join(format!("nginx-b{i}.log")))
                    .unwrap_or_default()
            )
        })?;
    }

    let mut failures = Vec::new();
    let sections: [(Section, SectionRun); 4] = [
        (Section::L4, l4::run),
        (Section::Pps, pps::run_pps),
        (Section::Conntrack, pps::run_conntrack),
        (Section::L7, l7::run),
    ];
    for (section, f) in sections {
        if !args.wants(section) {
            continue;
        }
        xdp_lb_testbed::interrupt::check()?;
        eprintln!("xdp-lb-bench: section {section:?}");
        let t = Instant::now();
        // bpf_stats only where a section reads run_time_ns: it adds two clock reads to every XDP
        // program run (~50–100 ns in this VM), which would handicap xdp-lb's rows of `l4` alone.
        let _stats = match section {
            Section::Pps | Section::Conntrack => Some(SysctlGuard::set("/proc/sys/kernel/bpf_stats_enabled", "1")?),
            Section::L4 | Section::L7 => None,
        };
        if let Err(e) = f(&bench, &mut report) {
            if xdp_lb_testbed::interrupt::interrupted() {
                return Err(e);
            }
            eprintln!("xdp-lb-bench: section {section:?} failed: {e:#}");
            failures.push(format!("{section:?}: {e:#}"));
        }
        eprintln!(
            "xdp-lb-bench: section {section:?} took {:.0} s",
            t.elapsed().as_secs_f64()
        );
    }
    report.failures = failures;
    report.total_secs = started.elapsed().as_secs_f64();
    report.loadavg_at_end = util::read_trim("/proc/loadavg");
    drop(bench);

    let md = report.markdown();
    println!("{md}");
    std::fs::create_dir_all(&args.out)?;
    std::fs::write(args.out.join("latest.md"), &md)?;
    std::fs::write(
        args.out.join("latest.json"),
        serde_json::to_string_pretty(&report.json())?,
    )?;
    eprintln!(
        "xdp-lb-bench: wrote {} and {}",
        args.out.join("latest.md").display(),
        args.out.join("latest.json").display()
    );
    if !report.failures.is_empty() {
        bail!("{} section(s) failed", report.failures.len());
    }
    Ok(())
}
