//! BPF_PROG_TEST_RUN measurements: a copy of the daemon's program loaded on the daemon's pinned maps
//! (exactly how a restarted daemon adopts them), run on frames we build, inside the lb namespace so
//! its FIB lookups see the lb's routes. Every call runs the program once (`repeat` = 1, because NAT
//! rewrites the frame in place), and the kernel's per-call duration is averaged.

use std::path::Path;

use anyhow::Context;
use aya::{
    programs::{TestRun, TestRunOptions, Xdp},
    EbpfLoader,
};
use serde::Serialize;

use crate::{Bench, UDP_PORT};

#[derive(Clone, Debug, Default, Serialize)]
pub struct TestRunCosts {
    pub calls: u32,
    /// xdp_tx_reference on the same frame.
    pub reference_ns: f64,
    /// One 5-tuple, established after the first call.
    pub established_ns: f64,
    /// A new source address in every call: connection-table miss, Maglev, insert.
    pub new_flow_ns: f64,
    /// To the lb's own address: parse and lookups, XDP_PASS.
    pub not_vip_ns: f64,
    /// Return value of the established-flow runs (4 = XDP_REDIRECT).
    pub established_action: u32,
}

fn frame(b: &Bench, src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> anyhow::Result<Vec<u8>> {
    let da = crate::util::parse_mac(&crate::util::mac(b.lb(), b.topo.client_iface())?)?;
    let sa = crate::util::parse_mac(&crate::util::mac(b.client(), "eth0")?)?;
    let payload = [0x58u8; 18];
    let udp_len = 8 + payload.len() as u16;
    let ip_len = 20 + udp_len;
    let mut f = Vec::new();
    f.extend_from_slice(&da);
    f.extend_from_slice(&sa);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes());
    f.extend_from_slice(&payload);
    Ok(f)
}

/// Measures with the daemon whose pins are in `pin_dir` running (its services programmed).
pub fn measure(b: &Bench, pin_dir: &Path, calls: u32) -> anyhow::Result<TestRunCosts> {
    let vip = b.topo.vip_v4().octets();
    let client = b.topo.client_addr_v4().octets();
    let lb = b.topo.lb_addr_v4().octets();
    let fixed = frame(b, client, vip, 40001, UDP_PORT)?;
    let not_vip = frame(b, client, lb, 40001, 9)?;
    let iface = b.topo.client_iface();
    let pin_dir = pin_dir.to_path_buf();
    b.lb().run(move || -> anyhow::Result<TestRunCosts> {
        let mut loader = EbpfLoader::new();
        let maps: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(&pin_dir)?
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .filter(|(n, _)| !n.starts_with("link_"))
            .collect();
        for (name, path) in &maps {
            loader.map_pin_path(name.as_str(), path.as_path());
        }
        let mut ebpf = loader
            .load(xdp_lb::dataplane::program_object())
            .context("loading the object on the daemon's pinned maps")?;
        for name in [
            xdp_lb::dataplane::PROGRAM_NAME,
            xdp_lb::dataplane::REFERENCE_PROGRAM_NAME,
        ] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .context("program missing")?
                .try_into()?;
            p.load().with_context(|| format!("loading {name}"))?;
        }
        let ifindex = xdp_lb::dataplane::ifindex(iface)?;
        let lb_prog: &Xdp = ebpf
            .program(xdp_lb::dataplane::PROGRAM_NAME)
            .context("xdp_lb")?
            .try_into()?;
        let reference: &Xdp = ebpf
            .program(xdp_lb::dataplane::REFERENCE_PROGRAM_NAME)
            .context("reference")?
            .try_into()?;
        let run = |prog: &Xdp, data: &[u8]| -> anyhow::Result<(u32, u64)> {
            let mut ctx = [0u32; 6];
            ctx[1] = data.len() as u32;
            ctx[3] = ifindex;
            let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let mut out = vec![0u8; data.len() + 256];
            let r = prog.test_run(TestRunOptions {
                data_in: Some(data),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_bytes),
                repeat: 1,
                ..Default::default()
            })?;
            Ok((r.return_value, r.duration.as_nanos() as u64))
        };
        let avg = |prog: &Xdp, data: &dyn Fn(u32) -> Vec<u8>| -> anyhow::Result<(f64, u32)> {
            let mut total = 0u64;
            let mut action = 0;
            for i in 0..calls {
                let (a, ns) = run(prog, &data(i))?;
                total += ns;
                action = a;
            }
            Ok((total as f64 / calls as f64, action))
        };
        // The first call creates the flow.
        run(lb_prog, &fixed)?;
        let (established_ns, established_action) = avg(lb_prog, &|_| fixed.clone())?;
        let (reference_ns, _) = avg(reference, &|_| fixed.clone())?;
        let (not_vip_ns, _) = avg(lb_prog, &|_| not_vip.clone())?;
        // New flows: 10.160.x.y sources, each once.
        let (new_flow_ns, _) = avg(lb_prog, &|i| {
            let src = (u32::from(std::net::Ipv4Addr::new(10, 160, 0, 1)) + i).to_be_bytes();
            let mut fresh = fixed.clone();
            fresh[26..30].copy_from_slice(&src);
            fresh
        })?;
        Ok(TestRunCosts {
            calls,
            reference_ns,
            established_ns,
            new_flow_ns,
            not_vip_ns,
            established_action,
        })
    })
}
