//! The `pps` section's traffic generator: `xdp_generator` (xdp-lb-ebpf/src/generator.rs) run with
//! `BPF_PROG_TEST_RUN` + `BPF_F_TEST_XDP_LIVE_FRAMES` on a template frame built here.
//!
//! In live-frames mode the kernel runs the program `repeat` times on frames from a page pool and
//! really transmits what it returns XDP_TX for, out of the interface named by `ingress_ifindex`, as
//! xdp_frames: on a veth they go straight into the peer's XDP ring, with no socket buffer and no qdisc
//! on the way (trafgen, one skb per frame through the qdisc and veth's skb path, offered 0.1–0.3 Mpps
//! here). The ifindex is resolved in the calling thread's namespace, so the runs happen on a thread
//! that entered the client's namespace, pinned to one CPU (the program's flow counter is per CPU).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use aya::{
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode},
    Ebpf, EbpfLoader,
};
use thiserror::Error;
use xdp_lb_common::{checksum, maps::names};
use xdp_lb_testbed::Netns;

/// The program's name in the object.
pub const PROGRAM: &str = "xdp_generator";

/// 60 bytes on the wire: Ethernet + IPv4 + TCP (no options, no payload) + 6 bytes of padding, as a
/// bare ACK or SYN arrives from a real client.
pub const FRAME_LEN: usize = 60;
const IP: usize = 14;
const TCP: usize = IP + 20;
/// What the program writes into every frame (the rest is padding).
const HEADER_LEN: usize = TCP + 20;
const TCP_ACK: u8 = 0x10;
const TCP_SYN: u8 = 0x02;

/// Frames the kernel runs per batch before it flushes them to the device (its default, NAPI's 64).
const BATCH: u32 = 64;
/// Runs of the first `BPF_PROG_TEST_RUN` call of a send; later calls aim at [`CALL_TIME`] from the
/// rate measured so far, and never past the end of the send's time.
const FIRST_CALL_RUNS: u64 = 1 << 14;
const CALL_TIME: Duration = Duration::from_millis(200);

/// What the generator varies per frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// TCP ACKs whose source port cycles over `flows` ports from `first_port`: established flows.
    Established { first_port: u16, flows: u16 },
    /// TCP SYNs, each from the next source address after `first_addr`: a new flow every frame.
    New { first_addr: Ipv4Addr },
}

/// The template's addresses.
#[derive(Clone, Copy, Debug)]
pub struct Endpoints {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub dport: u16,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("the established pattern needs at least one flow (flows = 0)")]
    NoFlows,
    #[error("the established pattern's ports {first_port}..{first_port}+{flows} reach past 65535")]
    PortsOverflow { first_port: u16, flows: u16 },
}

impl Pattern {
    pub fn validate(self) -> Result<(), PatternError> {
        if let Pattern::Established { first_port, flows } = self {
            if flows == 0 {
                return Err(PatternError::NoFlows);
            }
            if u32::from(first_port) + u32::from(flows) > 65_536 {
                return Err(PatternError::PortsOverflow { first_port, flows });
            }
        }
        Ok(())
    }
}

/// The template frame for `pattern`: the first frame the generator's sequence would send (the
/// program rewrites the varying field of every frame, this one included).
pub fn template(ends: &Endpoints, pattern: Pattern) -> Vec<u8> {
    let (src, sport, flags) = match pattern {
        Pattern::Established { first_port, .. } => (ends.src, first_port, TCP_ACK),
        Pattern::New { first_addr } => (first_addr, 40_000, TCP_SYN),
    };
    let mut f = vec![0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&ends.dst_mac);
    f[6..12].copy_from_slice(&ends.src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip = &mut f[IP..TCP];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&ends.dst.octets());
    let check = checksum::ipv4_header(ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    let tcp = &mut f[TCP..TCP + 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&ends.dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    if flags & TCP_ACK != 0 {
        tcp[8..12].copy_from_slice(&1u32.to_be_bytes());
    }
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
    let check = checksum::l4_ipv4(src.octets(), ends.dst.octets(), 6, tcp);
    tcp[16..18].copy_from_slice(&check.to_be_bytes());
    f
}

/// The frame's headers as the program's `GEN_TEMPLATE` holds them: 16-bit words in memory order.
fn header_words(frame: &[u8]) -> [u16; HEADER_LEN / 2] {
    let mut words = [0u16; HEADER_LEN / 2];
    for (w, pair) in words.iter_mut().zip(frame[..HEADER_LEN].chunks_exact(2)) {
        *w = u16::from_ne_bytes([pair[0], pair[1]]);
    }
    words
}

/// What one [`Generator::send`] did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sent {
    /// Frames handed to the kernel (program runs).
    pub frames: u64,
    /// Wall-clock seconds.
    pub secs: f64,
    /// CPU seconds of the sending thread: the generator, and whatever the receivers' NAPI did in
    /// softirq on its CPU (all of it, without `--napi-cpu`). Below `secs`, others had the CPU.
    pub cpu_secs: f64,
}

/// CPU time of the calling thread.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to fill; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A loaded generator: its own copy of the object (the configuration is in read-only globals, fixed
/// at load), so every pattern and every topology copy has its own flow counter.
pub struct Generator {
    ebpf: Ebpf,
    frame: Vec<u8>,
    /// Frames handed to the kernel so far (runs of the program).
    pub runs: u64,
}

impl Generator {
    pub fn load(ends: &Endpoints, pattern: Pattern) -> anyhow::Result<Generator> {
        pattern.validate()?;
        let (mode, flows, first_port, first_addr) = match pattern {
            Pattern::Established { first_port, flows } => (0u32, u32::from(flows), u32::from(first_port), 0),
            Pattern::New { first_addr } => (1u32, 1, 0, u32::from(first_addr)),
        };
        let frame = template(ends, pattern);
        let mut ebpf = EbpfLoader::new()
            // Only the generator runs from this copy: the data plane's big maps stay small.
            .map_max_entries(names::CONNTRACK, 1)
            .map_max_entries(names::NAT_REVERSE, 1)
            .map_max_entries(names::MAGLEV_RING, 1)
            .override_global("GEN_MODE", &mode, true)
            .override_global("GEN_FLOWS", &flows, true)
            .override_global("GEN_FIRST_PORT", &first_port, true)
            .override_global("GEN_FIRST_ADDR", &first_addr, true)
            .override_global("GEN_TEMPLATE", &header_words(&frame), true)
            .load(xdp_lb::dataplane::program_object())
            .context("loading the eBPF object for the generator")?;
        let prog: &mut Xdp = ebpf.program_mut(PROGRAM).context("no xdp_generator in the object")?.try_into()?;
        prog.load().context("loading xdp_generator")?;
        Ok(Generator { ebpf, frame, runs: 0 })
    }

    /// Attaches the program (native mode) to `iface` in `ns`, an interface that receives nothing.
    ///
    /// Every BPF_PROG_TEST_RUN of an XDP program adds it to the kernel's XDP dispatcher and removes
    /// it afterwards, and each change waits for an RCU grace period (`bpf_dispatcher_change_prog` →
    /// `synchronize_rcu`): on this VM the sending thread slept in them for half of every slice. A
    /// program attached to a device stays in the dispatcher, and the test runs' changes are no-ops.
    pub fn park_on(&mut self, ns: &Netns, iface: &str) -> anyhow::Result<()> {
        let prog: &mut Xdp = self.ebpf.program_mut(PROGRAM).context("no xdp_generator")?.try_into()?;
        let iface = iface.to_string();
        ns.run(|| prog.attach(&iface, XdpMode::Driver).map(|_| ()))
            .with_context(|| format!("attaching xdp_generator to {iface} in {}", ns.name()))
    }

    fn program(&self) -> anyhow::Result<&Xdp> {
        Ok(self.ebpf.program(PROGRAM).context("no xdp_generator")?.try_into()?)
    }

    /// Sends frames out of `iface` in `ns` from a thread pinned to `cpu`, for `duration` or until
    /// `max_frames` were handed to the kernel, whichever comes first. Returns the frames and seconds.
    ///
    /// With `realtime`, the thread runs under SCHED_FIFO: on a machine shared with other work, a
    /// normal thread gets only its fair share of the CPU and offers that much (0.3–0.5 Mpps at a load
    /// average of 8 on 2 CPUs). The kernel's RT throttling still leaves others 5 % of the CPU.
    pub fn send(
        &mut self,
        ns: &Netns,
        iface: &str,
        cpu: u32,
        realtime: bool,
        duration: Duration,
        max_frames: u64,
    ) -> anyhow::Result<Sent> {
        let prog = self.program()?;
        let frame = &self.frame;
        let iface = iface.to_string();
        let sent = ns.run(move || -> anyhow::Result<Sent> {
            pin_to_cpu(cpu)?;
            if realtime {
                set_fifo(0)?;
            }
            let ifindex = xdp_lb::dataplane::ifindex(&iface).with_context(|| format!("interface {iface}"))?;
            // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
            let ctx: Vec<u8> =
                [0, FRAME_LEN as u32, 0, ifindex, 0, 0].iter().flat_map(|w: &u32| w.to_ne_bytes()).collect();
            let started = Instant::now();
            let cpu_before = thread_cpu_secs();
            let mut frames = 0u64;
            while frames < max_frames && started.elapsed() < duration {
                if xdp_lb_testbed::interrupt::interrupted() {
                    bail!("interrupted");
                }
                let elapsed = started.elapsed();
                let runs = if frames == 0 {
                    FIRST_CALL_RUNS
                } else {
                    let rate = frames as f64 / elapsed.as_secs_f64().max(1e-6);
                    let left = duration.saturating_sub(elapsed).min(CALL_TIME);
                    ((rate * left.as_secs_f64()) as u64).max(u64::from(BATCH))
                };
                let repeat = runs.min(max_frames - frames).min(u64::from(u32::MAX)) as u32;
                let result = prog.test_run(TestRunOptions {
                    data_in: Some(frame),
                    ctx_in: Some(&ctx),
                    repeat,
                    attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
                    ..Default::default()
                });
                match result {
                    Ok(r) if r.return_value == 0 => frames += u64::from(repeat),
                    Ok(r) => bail!("BPF_PROG_TEST_RUN (live frames) returned {}", r.return_value),
                    Err(e) => {
                        if xdp_lb_testbed::interrupt::interrupted() {
                            bail!("interrupted");
                        }
                        return Err(e).context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES");
                    }
                }
            }
            Ok(Sent { frames, secs: started.elapsed().as_secs_f64(), cpu_secs: thread_cpu_secs() - cpu_before })
        })?;
        self.runs += sent.frames;
        Ok(sent)
    }
}

/// The SCHED_FIFO priority of the generator and of `--napi-cpu`'s NAPI threads: above every normal
/// thread, below the kernel's own RT threads (watchdogs at 99).
pub const FIFO_PRIORITY: i32 = 10;

/// Puts `pid` (0: the calling thread) under SCHED_FIFO at [`FIFO_PRIORITY`].
pub fn set_fifo(pid: i32) -> anyhow::Result<()> {
    let param = libc::sched_param { sched_priority: FIFO_PRIORITY };
    // SAFETY: a valid sched_param; only the scheduling policy of `pid` changes.
    if unsafe { libc::sched_setscheduler(pid, libc::SCHED_FIFO, &param) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("SCHED_FIFO for pid {pid}"));
    }
    Ok(())
}

fn pin_to_cpu(cpu: u32) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET stays inside it for cpu < CPU_SETSIZE, and
    // sched_setaffinity(0, ...) only affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        anyhow::ensure!((cpu as usize) < libc::CPU_SETSIZE as usize, "CPU {cpu} is out of range");
        libc::CPU_SET(cpu as usize, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("pinning the generator to CPU {cpu}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends() -> Endpoints {
        Endpoints {
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src: Ipv4Addr::new(10, 200, 0, 2),
            dst: Ipv4Addr::new(10, 200, 100, 100),
            dport: 80,
        }
    }

    /// The IPv4 and TCP checksums of `f` verify (sum to zero), and its fields as the bench reads them.
    fn check(f: &[u8]) -> (Ipv4Addr, u16, u8) {
        assert_eq!(f.len(), FRAME_LEN);
        assert_eq!(checksum::ipv4_header(&f[IP..TCP]), 0, "IPv4 header checksum of {f:02x?}");
        let src: [u8; 4] = f[IP + 12..IP + 16].try_into().unwrap();
        let dst: [u8; 4] = f[IP + 16..IP + 20].try_into().unwrap();
        assert_eq!(checksum::l4_ipv4(src, dst, 6, &f[TCP..TCP + 20]), 0, "TCP checksum of {f:02x?}");
        (Ipv4Addr::from(src), u16::from_be_bytes([f[TCP], f[TCP + 1]]), f[TCP + 13])
    }

    #[test]
    fn templates_have_valid_checksums() {
        let est = template(&ends(), Pattern::Established { first_port: 10_000, flows: 4 });
        assert_eq!(check(&est), (ends().src, 10_000, TCP_ACK));
        let new = template(&ends(), Pattern::New { first_addr: Ipv4Addr::new(10, 128, 0, 0) });
        assert_eq!(check(&new), (Ipv4Addr::new(10, 128, 0, 0), 40_000, TCP_SYN));
        assert_eq!(&est[0..6], &ends().dst_mac);
        assert_eq!(u16::from_be_bytes([est[TCP + 2], est[TCP + 3]]), 80);
    }

    #[test]
    fn bad_patterns_are_refused_with_the_reason() {
        assert_eq!(Pattern::Established { first_port: 1, flows: 0 }.validate(), Err(PatternError::NoFlows));
        let e = Pattern::Established { first_port: 65_000, flows: 1_000 }.validate().unwrap_err();
        assert!(e.to_string().contains("65000"), "{e}");
        assert_eq!(Pattern::Established { first_port: 64_512, flows: 1_024 }.validate(), Ok(()));
    }

    /// Runs the loaded program once (no live frames: the output comes back) on `input`.
    fn run_once(g: &Generator, input: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; FRAME_LEN + 64];
        let r = g
            .program()
            .unwrap()
            .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), repeat: 1, ..Default::default() })
            .expect("BPF_PROG_TEST_RUN (needs root)");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    const XDP_TX: u32 = 3;
    const XDP_ABORTED: u32 = 0;

    /// What a receiver may leave in a recycled page: xdp-lb nat rewrites addresses and ports, the
    /// reference swaps MACs.
    fn scribbled(f: &[u8]) -> Vec<u8> {
        let mut f = f.to_vec();
        for b in &mut f[..HEADER_LEN] {
            *b ^= 0x5a;
        }
        f
    }

    /// The eBPF side: each run writes the next flow and keeps both checksums valid, whether the
    /// kernel hands it the template (a fresh page) or a page a receiver rewrote (a recycled one).
    #[test]
    fn the_program_cycles_ports_with_valid_checksums() {
        let pattern = Pattern::Established { first_port: 10_000, flows: 3 };
        let g = Generator::load(&ends(), pattern).unwrap();
        let tpl = template(&ends(), pattern);
        let mut last = tpl.clone();
        let mut ports = Vec::new();
        for i in 0..7 {
            // Alternate fresh and recycled input.
            let input = if i % 2 == 0 { tpl.clone() } else { scribbled(&last) };
            let (action, out) = run_once(&g, &input);
            assert_eq!(action, XDP_TX);
            let (src, port, flags) = check(&out);
            assert_eq!((src, flags), (ends().src, TCP_ACK));
            assert_eq!(&out[..TCP], &tpl[..TCP], "Ethernet and IPv4 headers as in the template");
            ports.push(port);
            last = out;
        }
        assert_eq!(ports, [10_000, 10_001, 10_002, 10_000, 10_001, 10_002, 10_000]);
    }

    #[test]
    fn the_program_sends_every_syn_from_a_new_address() {
        let first = Ipv4Addr::new(10, 128, 255, 254);
        let pattern = Pattern::New { first_addr: first };
        let g = Generator::load(&ends(), pattern).unwrap();
        let tpl = template(&ends(), pattern);
        let mut last = tpl.clone();
        let mut sources = Vec::new();
        for i in 0..4 {
            let input = if i % 2 == 0 { tpl.clone() } else { scribbled(&last) };
            let (action, out) = run_once(&g, &input);
            assert_eq!(action, XDP_TX);
            let (src, port, flags) = check(&out);
            assert_eq!((port, flags), (40_000, TCP_SYN));
            assert_eq!(&out[..6], &ends().dst_mac);
            sources.push(src);
            last = out;
        }
        // Across the carry from the low 16 bits into the high ones, too.
        let want: Vec<Ipv4Addr> = (0..4).map(|i| Ipv4Addr::from(u32::from(first) + i)).collect();
        assert_eq!(sources, want);
    }

    #[test]
    fn the_program_refuses_a_frame_too_short_for_its_header() {
        let pattern = Pattern::Established { first_port: 10_000, flows: 3 };
        let g = Generator::load(&ends(), pattern).unwrap();
        let tpl = template(&ends(), pattern);
        assert_eq!(run_once(&g, &tpl[..HEADER_LEN - 1]).0, XDP_ABORTED);
        assert_eq!(run_once(&g, &tpl[..HEADER_LEN]).0, XDP_TX);
    }
}
