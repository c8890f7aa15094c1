//! Robustness: well over 100,000 random and mutated frames through the real, verified XDP program
//! (BPF_PROG_TEST_RUN), against services in NAT and DSR mode, IPv4 and IPv6, TCP and UDP.
//!
//! Every frame is judged by an independent model of the program's contract, written here from the
//! README (not from the eBPF code): a header-level parser that predicts the verdict and the one reason
//! counter that must move, a model of the connection table (which flows were scheduled, so which
//! backend replies are NAT replies), and byte-level checks of the output:
//!
//! * never `XDP_ABORTED`, never an unknown verdict;
//! * `XDP_TX`/`XDP_REDIRECT` only for a packet to a VIP:port/protocol of the config (untagged, not a
//!   fragment, TCP/UDP right after the IP header, a backend to send it to) or a reply from a backend
//!   to a flow the model saw scheduled — and only to a resolved next hop;
//! * a forwarded frame differs from its input only in the MACs, the translated address and port and
//!   the checksum fields; the checksums stay exactly as right (or wrong) as they were (one's-complement
//!   residual preserved), frames whose checksums were right come out right (recomputed in full with
//!   xdp-lb-common's checksum functions), and a zero UDP checksum stays zero;
//! * a frame that is not forwarded comes out unchanged — except a NAT packet the FIB could not
//!   finish, which is handed to the kernel translated (MACs untouched);
//! * exactly one reason counter moves for a frame not forwarded, none for a forwarded one;
//! * a flow keeps its backend for the whole run (the table is small, so LRU evictions happen: an
//!   evicted flow is placed again by Maglev, which must pick the same backend);
//! * the per-service packet counters add up to the frames the model says were scheduled.
//!
//! IPv6 frames with IPv4-mapped addresses (`::ffff:a.b.c.d`) must be passed untouched as not for a
//! VIP: the data plane keeps IPv4 addresses in that form, so they must never meet IPv4 services or
//! flows (`ipv6_packets_with_ipv4_mapped_addresses_are_not_balanced` checks it on its own).
//!
//! Reproduce a run with `XDP_LB_FUZZ_SEED=<seed printed at the start>`; `XDP_LB_FUZZ_FRAMES` sets the
//! number of random frames (default 110,000, on top of the truncation sweep).

#[path = "fixtures/contract.rs"]
mod contract;
#[path = "fixtures/harness.rs"]
mod harness;
#[path = "fixtures/mutate.rs"]
mod mutate;

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use aya::programs::{TestRun, TestRunOptions};
use contract::*;
use harness::*;
use mutate::*;

const XDP_ABORTED: u32 = 0;
/// The veths' MTU in the fixture namespace: longer IP packets fail the FIB's MTU check.
const MTU: usize = 1500;
/// Bounds the whole run, whatever the frame count.
const TIME_LIMIT: Duration = Duration::from_secs(240);
const CONNTRACK_ENTRIES: u32 = 4096;

// ---------------------------------------------------------------------------------------------
// The services and the fixture namespace's neighbours.

struct Svc {
    name: &'static str,
    vip: IpAddr,
    port: u16,
    proto: u8,
    dsr: bool,
    backends: Vec<(IpAddr, u16)>,
}

fn v4(s: &str) -> IpAddr {
    IpAddr::V4(s.parse().unwrap())
}
fn v6(s: &str) -> IpAddr {
    IpAddr::V6(s.parse().unwrap())
}

fn services() -> Vec<Svc> {
    let svc = |name, vip: IpAddr, port, proto, dsr, backends: Vec<(IpAddr, u16)>| Svc { name, vip, port, proto, dsr, backends };
    let (t, u) = (PROTO_TCP, PROTO_UDP);
    vec![
        svc("nat4-tcp", v4("10.200.100.100"), 80, t, false, vec![(v4("10.201.0.2"), 8080), (v4("10.201.0.3"), 8080), (v4("10.201.0.4"), 8080)]),
        svc("nat4-tcp-same-port", v4("10.200.100.100"), 443, t, false, vec![(v4("10.201.0.2"), 443)]),
        svc("nat4-udp", v4("10.200.100.100"), 53, u, false, vec![(v4("10.201.0.2"), 5353), (v4("10.201.0.3"), 5353)]),
        svc("dsr4-tcp", v4("10.200.100.101"), 80, t, true, vec![(v4("10.201.0.2"), 80), (v4("10.201.0.3"), 80)]),
        svc("dsr4-udp", v4("10.200.100.101"), 53, u, true, vec![(v4("10.201.0.4"), 53)]),
        svc("nat6-tcp", v6("fd00:200:100::100"), 80, t, false, vec![(v6("fd00:201::2"), 8080)]),
        svc("nat6-udp", v6("fd00:200:100::100"), 53, u, false, vec![(v6("fd00:201::2"), 5353)]),
        svc("dsr6-tcp", v6("fd00:200:100::101"), 80, t, true, vec![(v6("fd00:201::2"), 80)]),
        svc("dsr6-udp", v6("fd00:200:100::101"), 53, u, true, vec![(v6("fd00:201::2"), 53)]),
        svc("empty", v4("10.200.100.102"), 80, t, false, vec![]),
        svc("nat4-unresolved", v4("10.200.100.103"), 80, t, false, vec![(v4("10.201.0.9"), 8080)]),
        svc("dsr4-unresolved", v4("10.200.100.104"), 80, t, true, vec![(v4("10.201.0.9"), 80)]),
    ]
}

fn config_text(svcs: &[Svc]) -> String {
    let mut out = format!("[dataplane]\nconntrack_entries = {CONNTRACK_ENTRIES}\nmaglev_cells = 8192\n\n");
    for s in svcs {
        let vip = match s.vip {
            IpAddr::V4(a) => format!("{a}:{}", s.port),
            IpAddr::V6(a) => format!("[{a}]:{}", s.port),
        };
        let proto = if s.proto == PROTO_TCP { "tcp" } else { "udp" };
        let mode = if s.dsr { "dsr" } else { "nat" };
        let _ = writeln!(out, "[[services]]\nname = \"{}\"\nvip = \"{vip}\"\nprotocol = \"{proto}\"\nmode = \"{mode}\"\nring_size = 251", s.name);
        for (addr, port) in &s.backends {
            let a = match addr {
                IpAddr::V4(a) => format!("{a}:{port}"),
                IpAddr::V6(a) => format!("[{a}]:{port}"),
            };
            let _ = writeln!(out, "[[services.backends]]\naddress = \"{a}\"");
        }
        out.push('\n');
    }
    out
}

/// An IPv6 source the kernel's FIB will not forward from (multicast, link-local, loopback,
/// unspecified): the FIB answers "not forwarded", so the packet goes to the kernel.
fn odd_v6_source(info: &L4Info) -> bool {
    match info.src {
        IpAddr::V6(a) => a.is_multicast() || a.is_loopback() || a.is_unspecified() || (a.segments()[0] & 0xffc0) == 0xfe80,
        IpAddr::V4(_) => false,
    }
}

/// A source no real client can have (README, *Reasons*: `drop_martian_source`): IPv4 0/8, 127/8,
/// 169.254/16, 224/4, 240/4; IPv6 `::`, `::1`, `fe80::/10`, `ff00::/8`; or the destination itself.
fn martian_source(info: &L4Info) -> bool {
    info.src == info.dst
        || match info.src {
            IpAddr::V4(a) => matches!(a.octets()[0], 0 | 127 | 224..) || a.is_link_local(),
            IpAddr::V6(a) => a.is_unspecified() || a.is_loopback() || a.octets()[0] == 0xff || (a.segments()[0] & 0xffc0) == 0xfe80,
        }
}

/// [`next_hop`] for a packet of `info`'s family (an IPv4 address in an IPv6 packet has no route).
fn hop_for(info: &L4Info, ip: IpAddr) -> Option<(&'static str, [u8; 6], [u8; 6])> {
    if info.v6 != ip.is_ipv6() {
        return None;
    }
    next_hop(ip)
}

/// Where the fixture namespace's FIB sends a packet for `ip`: a resolved neighbour (egress interface,
/// its MAC, the neighbour's MAC), or `None` (unresolved, local, broadcast, no route).
fn next_hop(ip: IpAddr) -> Option<(&'static str, [u8; 6], [u8; 6])> {
    let bb = |last: u8| [0x02, 0, 0, 0, 0xbb, last];
    match ip.to_string().as_str() {
        "10.200.0.2" | "fd00:200::2" => Some(("fxc", LB_CLIENT_MAC, CLIENT_MAC)),
        "10.201.0.2" | "fd00:201::2" => Some(("fxb", LB_BACKEND_MAC, bb(2))),
        "10.201.0.3" => Some(("fxb", LB_BACKEND_MAC, bb(3))),
        "10.201.0.4" => Some(("fxb", LB_BACKEND_MAC, bb(4))),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// The connection model and the judge.

type FlowId = (IpAddr, u16, IpAddr, u16, u8);

#[derive(Default)]
struct Model {
    /// Client flow → backend chosen (address, port) for NAT, or backend MAC for DSR.
    sticky: HashMap<FlowId, (IpAddr, u16)>,
    sticky_dsr: HashMap<FlowId, [u8; 6]>,
    /// Reply flow (backend → client) → (VIP, VIP port, service index).
    reverse: HashMap<FlowId, (IpAddr, u16, usize)>,
    /// Reply flows, for the generator.
    replies: Vec<FlowId>,
    /// Packets each service must have counted.
    counted: BTreeMap<&'static str, u64>,
}

#[derive(Default)]
struct Tally {
    frames: u64,
    refused: u64,
    verdicts: BTreeMap<&'static str, u64>,
    reasons: BTreeMap<&'static str, u64>,
    forwarded_requests: u64,
    forwarded_dsr: u64,
    forwarded_replies: u64,
    replies_evicted: u64,
    translated_passed: u64,
    full_checksums_verified: u64,
    forwarded_malformed: BTreeMap<&'static str, u64>,
    cross_checked: u64,
    mapped_passed: u64,
    martian_dropped: u64,
    tagged_replies_passed: u64,
    by_kind: BTreeMap<&'static str, u64>,
}

fn verdict_name(v: u32) -> &'static str {
    match v {
        XDP_ABORTED => "XDP_ABORTED",
        XDP_DROP => "XDP_DROP",
        XDP_PASS => "XDP_PASS",
        XDP_TX => "XDP_TX",
        XDP_REDIRECT => "XDP_REDIRECT",
        _ => "unknown",
    }
}

struct Judge<'a> {
    harness: &'a Harness,
    svcs: &'a [Svc],
    model: Model,
    tally: Tally,
}

impl Judge<'_> {
    /// Runs one frame and checks everything; an error describes what broke.
    fn frame(&mut self, iface: &'static str, input: &[u8], kind: &'static str) -> Result<(), String> {
        self.tally.frames += 1;
        *self.tally.by_kind.entry(kind).or_default() += 1;
        let parsed = parse_contract(input);
        match cross_check(input, &parsed) {
            Ok(true) => self.tally.cross_checked += 1,
            Ok(false) => {}
            Err(e) => return Err(format!("oracle disagreement: {e}")),
        }
        let before = self.harness.reasons();
        let Some((verdict, out)) = run(self.harness, iface, input) else {
            if input.len() < 14 {
                self.tally.refused += 1;
                return Ok(());
            }
            return Err(format!("BPF_PROG_TEST_RUN refused a {}-byte frame", input.len()));
        };
        let after = self.harness.reasons();
        let moved: Vec<&'static str> = after.iter().filter(|(k, v)| before[*k] != **v).map(|(k, _)| *k).collect();
        *self.tally.verdicts.entry(verdict_name(verdict)).or_default() += 1;
        for m in &moved {
            *self.tally.reasons.entry(m).or_default() += 1;
        }
        if !matches!(verdict, XDP_DROP | XDP_PASS | XDP_TX | XDP_REDIRECT) {
            return Err(format!("verdict {verdict} ({})", verdict_name(verdict)));
        }
        let forwarded = matches!(verdict, XDP_TX | XDP_REDIRECT);
        // A refused connection is answered (sent back out) and counted: the one forwarded reason.
        if forwarded && !moved.is_empty() && moved != ["reject_no_backend"] {
            return Err(format!("forwarded, yet reason counters moved: {moved:?}"));
        }
        if !forwarded && moved.len() != 1 {
            return Err(format!("{} with reason counters {moved:?} (exactly one must move)", verdict_name(verdict)));
        }
        let reason = moved.first().copied();
        if let Some(r) = reason {
            let pass = r.starts_with("pass_");
            if pass != (verdict == XDP_PASS) {
                return Err(format!("verdict {} with reason {r}", verdict_name(verdict)));
            }
        }

        let info = match &parsed {
            Parsed::L4(i) => i.clone(),
            other => {
                let want = other.reason().unwrap();
                if reason != Some(want) {
                    return Err(format!("{} / {reason:?}, expected {want} ({other:?})", verdict_name(verdict)));
                }
                return if out == input { Ok(()) } else { Err("not forwarded, yet the output differs from the input".into()) };
            }
        };

        // IPv4-mapped IPv6 addresses are bogus on the wire, and the data plane keeps IPv4 addresses in
        // that form: such packets must not meet IPv4 services or flows.
        if info.v6 && (info.src.to_canonical().is_ipv4() || info.dst.to_canonical().is_ipv4()) {
            self.tally.mapped_passed += 1;
            if reason != Some("pass_not_vip") || out != input {
                return Err(format!("IPv4-mapped IPv6: {} / {reason:?}, expected pass_not_vip unchanged", verdict_name(verdict)));
            }
            return Ok(());
        }
        // Classify: service, then NAT reply, then nothing.
        let svc_index = self.svcs.iter().position(|s| s.vip == info.dst && s.port == info.dport && s.proto == info.proto);
        if let Some(si) = svc_index {
            let svc = &self.svcs[si];
            let expect_unchanged = |want: &str| -> Result<(), String> {
                if reason != Some(want) {
                    return Err(format!("{} / {reason:?}, expected {want}", verdict_name(verdict)));
                }
                if out != input {
                    return Err("not forwarded, yet the output differs from the input".into());
                }
                Ok(())
            };
            if info.vlan {
                return expect_unchanged("pass_vlan");
            }
            // No flow from such a source is ever placed, so none is established either.
            if martian_source(&info) {
                self.tally.martian_dropped += 1;
                return expect_unchanged("drop_martian_source");
            }
            if svc.backends.is_empty() {
                if !reset_expected(input, &info) {
                    return expect_unchanged("drop_no_backend");
                }
                if reason != Some("reject_no_backend") || verdict != XDP_REDIRECT {
                    return Err(format!("{} / {reason:?}, expected a RST (XDP_REDIRECT / reject_no_backend)", verdict_name(verdict)));
                }
                return check_reset(input, &out, &info);
            }
            *self.model.counted.entry(svc.name).or_default() += 1;
            let flow: FlowId = (info.src, info.sport, info.dst, info.dport, info.proto);
            if svc.dsr {
                let hop = hop_for(&info, svc.backends[0].0);
                if info.ip_len > MTU || (odd_v6_source(&info) && reason == Some("pass_fib_other")) {
                    return expect_unchanged("pass_fib_other");
                }
                let Some((egress, smac, _)) = hop else { return expect_unchanged("drop_dsr_no_neigh") };
                let want_verdict = if egress == iface { XDP_TX } else { XDP_REDIRECT };
                if verdict != want_verdict {
                    return Err(format!("DSR: {} / {reason:?}, expected {}", verdict_name(verdict), verdict_name(want_verdict)));
                }
                let dmac: [u8; 6] = out[0..6].try_into().unwrap();
                if !svc.backends.iter().any(|(b, _)| next_hop(*b).map(|h| h.2) == Some(dmac)) {
                    return Err(format!("DSR: sent to MAC {} which is none of {}'s backends", hex(&dmac), svc.name));
                }
                if let Some(prev) = self.model.sticky_dsr.insert(flow, dmac) {
                    if prev != dmac {
                        return Err(format!("DSR flow {flow:?} moved from MAC {} to {}", hex(&prev), hex(&dmac)));
                    }
                }
                check_output(input, &out, &info, Some((dmac, smac)), None)?;
                self.tally.forwarded_dsr += 1;
                self.note_forwarded_malformed(input, &info);
                return Ok(());
            }
            // NAT: the output names the backend (the rewrite happens before the FIB lookup).
            let backend = {
                let at = if info.v6 { info.l3 + 24 } else { info.l3 + 16 };
                let addr = if info.v6 {
                    IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(&out[at..at + 16]).unwrap()))
                } else {
                    IpAddr::V4(Ipv4Addr::new(out[at], out[at + 1], out[at + 2], out[at + 3]))
                };
                (addr.to_canonical(), be16(&out, info.l4 + 2))
            };
            if !svc.backends.contains(&backend) {
                return Err(format!(
                    "NAT {}: {} / {reason:?} with destination {}:{}, none of the service's backends",
                    svc.name,
                    verdict_name(verdict),
                    backend.0,
                    backend.1
                ));
            }
            if let Some(prev) = self.model.sticky.insert(flow, backend) {
                if prev != backend {
                    return Err(format!("NAT flow {flow:?} moved from {prev:?} to {backend:?}"));
                }
            }
            let reply: FlowId = (backend.0, backend.1, info.src, info.sport, info.proto);
            if self.model.reverse.insert(reply, (svc.vip, svc.port, si)).is_none() {
                self.model.replies.push(reply);
            }
            let rewrite = Some((End::Dst, backend.0, backend.1));
            return self.judge_translated(input, &out, iface, verdict, reason, &info, backend.0, rewrite, false);
        }
        let reply: FlowId = (info.src, info.sport, info.dst, info.dport, info.proto);
        if let Some(&(vip, vport, si)) = self.model.reverse.get(&reply) {
            if reason == Some("pass_not_vip") {
                // Evicted from the (deliberately small) LRU table: left to the kernel, untouched.
                self.tally.replies_evicted += 1;
                return if out == input { Ok(()) } else { Err("pass_not_vip, yet the output differs".into()) };
            }
            // Tagged replies are the kernel's VLAN device's, like tagged VIP traffic.
            if info.vlan {
                if reason != Some("pass_vlan") || out != input {
                    return Err(format!("tagged NAT reply: {} / {reason:?}, expected pass_vlan unchanged", verdict_name(verdict)));
                }
                return Ok(());
            }
            *self.model.counted.entry(self.svcs[si].name).or_default() += 1;
            let rewrite = Some((End::Src, vip, vport));
            return self.judge_translated(input, &out, iface, verdict, reason, &info, info.dst, rewrite, true);
        }
        if reason != Some("pass_not_vip") || out != input {
            return Err(format!(
                "TCP/UDP to no VIP and no known NAT flow: {} / {reason:?}, output {}",
                verdict_name(verdict),
                if out == input { "unchanged" } else { "changed" }
            ));
        }
        Ok(())
    }

    /// A NAT packet (request or reply) that was translated: forwarded to a resolved next hop with its
    /// MACs, or handed to the kernel translated with the MACs untouched.
    #[allow(clippy::too_many_arguments)]
    fn judge_translated(
        &mut self,
        input: &[u8],
        out: &[u8],
        iface: &'static str,
        verdict: u32,
        reason: Option<&'static str>,
        info: &L4Info,
        hop_addr: IpAddr,
        rewrite: Option<(End, IpAddr, u16)>,
        is_reply: bool,
    ) -> Result<(), String> {
        let what = if is_reply { "NAT reply" } else { "NAT request" };
        let hop = hop_for(info, hop_addr);
        // The kernel does not forward IPv6 from a multicast or link-local source.
        let refused = info.ip_len > MTU || (odd_v6_source(info) && reason == Some("pass_fib_other"));
        match (hop, refused) {
            (Some((egress, smac, dmac)), false) => {
                let want_verdict = if egress == iface { XDP_TX } else { XDP_REDIRECT };
                if verdict != want_verdict {
                    return Err(format!("{what}: {} / {reason:?}, expected {}", verdict_name(verdict), verdict_name(want_verdict)));
                }
                if check_output(input, out, info, Some((dmac, smac)), rewrite)? {
                    self.tally.full_checksums_verified += 1;
                }
                if is_reply {
                    self.tally.forwarded_replies += 1;
                } else {
                    self.tally.forwarded_requests += 1;
                }
                self.note_forwarded_malformed(input, info);
                Ok(())
            }
            (hop, too_long) => {
                let allowed: &[&str] = if too_long || (hop.is_some()) {
                    &["pass_fib_other"]
                } else {
                    &["pass_fib_no_neigh", "pass_fib_other", "drop_fib_unreachable"]
                };
                if !reason.is_some_and(|r| allowed.contains(&r)) {
                    return Err(format!(
                        "{what} to unresolved/unroutable {hop_addr} (IP length {}): {} / {reason:?}, expected one of {allowed:?}",
                        info.ip_len,
                        verdict_name(verdict)
                    ));
                }
                check_output(input, out, info, None, rewrite)?;
                self.tally.translated_passed += 1;
                Ok(())
            }
        }
    }

    /// Statistics: forwarded frames that a strict parser (etherparse) or a checksum check rejects —
    /// the program checks headers, not lengths or checksums, so the backend's kernel drops these.
    fn note_forwarded_malformed(&mut self, input: &[u8], info: &L4Info) {
        let key = if !lengths_consistent(input, info) {
            Some("IP length inconsistent with the frame")
        } else if etherparse::SlicedPacket::from_ethernet(input).is_err() {
            Some("rejected by etherparse (e.g. TCP data offset < 5)")
        } else {
            match checksums_valid(input, info) {
                Some((true, true)) => None,
                _ => Some("wrong checksum (kept wrong)"),
            }
        };
        if let Some(k) = key {
            *self.tally.forwarded_malformed.entry(k).or_default() += 1;
        }
    }
}

/// One test run; `None` if the kernel refused the frame.
fn run(harness: &Harness, iface: &'static str, input: &[u8]) -> Option<(u32, Vec<u8>)> {
    let mut ctx = [0u32; 6];
    ctx[1] = input.len() as u32;
    ctx[3] = harness.ifindex[iface];
    let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let mut out = vec![0u8; input.len() + 256];
    let result = harness
        .dataplane
        .program()
        .test_run(TestRunOptions { data_in: Some(input), data_out: Some(&mut out), ctx_in: Some(&ctx_bytes), ..Default::default() })
        .ok()?;
    out.truncate(result.data_size_out as usize);
    Some((result.return_value, out))
}

// ---------------------------------------------------------------------------------------------
// The generator.

const CLIENT4: &str = "10.200.0.2";
const CLIENT6: &str = "fd00:200::2";

fn random_client(rng: &mut Rng, want_v6: bool) -> IpAddr {
    match (want_v6, rng.below(10)) {
        (false, 0..=5) => v4(CLIENT4),
        (false, 6) => IpAddr::V4(Ipv4Addr::new(10, 200, 0, rng.u8())),
        (false, _) => IpAddr::V4(Ipv4Addr::from(rng.u32())),
        (true, 0..=5) => v6(CLIENT6),
        (true, 6) => IpAddr::V6(Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, rng.u16(), rng.u16())),
        (true, _) => IpAddr::V6(Ipv6Addr::from(rng.u64() as u128 | ((rng.u64() as u128) << 64))),
    }
}

fn random_port(rng: &mut Rng) -> u16 {
    if rng.chance(70) { 1024 + rng.below(2048) as u16 } else { rng.u16() }
}

fn random_payload(rng: &mut Rng) -> Vec<u8> {
    let n = match rng.below(20) {
        0 => 0,
        1 => rng.range(1300, 1500),
        _ => rng.below(300),
    };
    rng.bytes(n)
}

fn l4_for(rng: &mut Rng, proto: u8, sport: u16, dport: u16) -> L4Spec {
    if proto == PROTO_TCP {
        let flags = if rng.chance(50) { *rng.pick(&[0x02, 0x10, 0x18, 0x11, 0x04, 0x12]) } else { rng.u8() };
        let options = if rng.chance(15) { { let n = rng.below(41); rng.bytes(n) } } else { Vec::new() };
        L4Spec::Tcp { sport, dport, seq: rng.u32(), ack: rng.u32(), flags, window: rng.u16(), options }
    } else {
        L4Spec::Udp { sport, dport, zero_checksum: rng.chance(15) }
    }
}

/// Extras on a valid frame: IPv4 options and fragments, IPv6 extension headers, VLAN tags.
fn decorate(rng: &mut Rng, spec: &mut Spec) {
    match &mut spec.ip {
        Ip::V4 { options, frag, .. } => {
            if rng.chance(20) {
                let n = rng.range(1, 40);
                *options = if rng.chance(50) { vec![1; n] } else { rng.bytes(n) };
            }
            if rng.chance(5) {
                *frag = *rng.pick(&[0x2000, 0x0001, 0x20b9, 0x1fff, 0x6000]);
            }
        }
        Ip::V6 { ext, .. } => {
            if rng.chance(12) {
                for _ in 0..rng.range(1, 3) {
                    let kind = *rng.pick(&[0u8, 43, 44, 60, 51, 135, 139, 253]);
                    let len = rng.below(3) * 8 + 6;
                    ext.push((kind, rng.bytes(len)));
                }
            }
        }
    }
    if rng.chance(6) {
        spec.vlans.push((*rng.pick(&[ETH_8021Q, ETH_8021AD]), rng.u16()));
        if rng.chance(30) {
            spec.vlans.push((ETH_8021Q, rng.u16()));
        }
    }
}

/// A well-formed request to a random service (sometimes to a near miss: another port or protocol).
fn request(rng: &mut Rng, svcs: &[Svc]) -> Spec {
    let svc = rng.pick(svcs);
    let v6 = svc.vip.is_ipv6();
    let client = random_client(rng, v6);
    let mut dport = svc.port;
    let mut proto = svc.proto;
    if rng.chance(5) {
        dport = rng.u16();
    }
    if rng.chance(5) {
        proto = if proto == PROTO_TCP { PROTO_UDP } else { PROTO_TCP };
    }
    let mut dst = svc.vip;
    if rng.chance(3) {
        // An IPv6 packet to the IPv4-mapped form of an IPv4 VIP (or the reverse family mix-up):
        // not a VIP of the config; must not be balanced.
        if let IpAddr::V4(a) = svc.vip {
            dst = IpAddr::V6(a.to_ipv6_mapped());
        }
    }
    let src = match (client, dst) {
        (IpAddr::V4(c), IpAddr::V6(_)) => IpAddr::V6(c.to_ipv6_mapped()),
        (c, _) => c,
    };
    let sport = random_port(rng);
    let mut spec = Spec::new(src, dst, l4_for(rng, proto, sport, dport));
    spec.payload = random_payload(rng);
    decorate(rng, &mut spec);
    spec
}

/// A well-formed reply from a backend to a flow the model knows (or, sometimes, one it does not).
fn reply(rng: &mut Rng, model: &Model, svcs: &[Svc]) -> Spec {
    let (src, sport, dst, dport, proto) = if !model.replies.is_empty() && rng.chance(85) {
        // Recent flows are likelier still in the LRU table.
        let n = model.replies.len();
        let i = if rng.chance(70) { n - 1 - rng.below(n.min(2000)) } else { rng.below(n) };
        model.replies[i]
    } else {
        let svc = rng.pick(svcs);
        let (b, bport) = svc.backends.first().copied().unwrap_or((svc.vip, svc.port));
        (b, bport, random_client(rng, b.is_ipv6()), random_port(rng), svc.proto)
    };
    // A flow of an IPv4-mapped IPv6 packet may mix families: send it as IPv6.
    let as_v6 = |a: IpAddr| match a {
        IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
        v6 => v6,
    };
    let (src, dst) = if src.is_ipv4() != dst.is_ipv4() { (as_v6(src), as_v6(dst)) } else { (src, dst) };
    let mut spec = Spec::new(src, dst, l4_for(rng, proto, sport, dport));
    spec.src_mac = [0x02, 0, 0, 0, 0xbb, 0x02];
    spec.dst_mac = LB_BACKEND_MAC;
    spec.payload = random_payload(rng);
    if rng.chance(3) {
        if let (IpAddr::V4(s), IpAddr::V4(d)) = (src, dst) {
            spec = Spec::new(IpAddr::V6(s.to_ipv6_mapped()), IpAddr::V6(d.to_ipv6_mapped()), l4_for(rng, proto, sport, dport));
        }
    }
    if rng.chance(30) {
        decorate(rng, &mut spec);
    }
    spec
}

fn other_protocol(rng: &mut Rng, svcs: &[Svc]) -> Spec {
    let svc = rng.pick(svcs);
    let client = random_client(rng, svc.vip.is_ipv6());
    let proto = *rng.pick(&[1u8, 2, 47, 50, 58, 132, 136, 255, 0, 41]);
    let mut spec = Spec::new(client, svc.vip, L4Spec::Other { proto });
    let n = rng.below(64);
    spec.payload = rng.bytes(n);
    spec
}

/// Trailing bytes after the IP packet (Ethernet padding, or junk).
fn pad(rng: &mut Rng, frame: &mut Vec<u8>) {
    let n = rng.range(1, 64);
    if rng.chance(50) {
        frame.resize(frame.len() + n, 0);
    } else {
        frame.extend(rng.bytes(n));
    }
}

fn header_len_guess(frame: &[u8]) -> usize {
    match parse_contract(frame) {
        Parsed::L4(i) => i.l4 + if i.proto == PROTO_TCP { 20 } else { 8 },
        _ => 80,
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn random_and_mutated_frames_are_never_aborted_or_misforwarded() {
    let seed = Rng::seed_from_env("XDP_LB_FUZZ_SEED");
    let frames: usize = std::env::var("XDP_LB_FUZZ_FRAMES").ok().and_then(|s| s.parse().ok()).unwrap_or(110_000);
    println!("random_frames: seed {seed} (reproduce with XDP_LB_FUZZ_SEED={seed}), {frames} random frames + truncation sweep");
    let svcs = services();
    let ns = fixture_namespace();
    ns.run(|| {
        let harness = Harness::new(&config_text(&svcs));
        let mut judge = Judge { harness: &harness, svcs: &svcs, model: Model::default(), tally: Tally::default() };
        let counters_before: BTreeMap<&str, u64> = svcs.iter().map(|s| (s.name, harness.service_packets(s.name).0)).collect();
        let mut rng = Rng::new(seed);
        let started = Instant::now();
        let mut failures: Vec<String> = Vec::new();
        let record = |n: usize, kind: &str, iface: &str, frame: &[u8], e: String, failures: &mut Vec<String>| {
            if failures.len() < 25 {
                failures.push(format!("frame #{n} ({kind}, on {iface}, {} bytes): {e}\n    input {}", frame.len(), hex(frame)));
            } else if failures.len() == 25 {
                failures.push("... (more failures not shown)".into());
            }
        };

        // 1. Truncation sweep: base frames of every shape, cut at every length.
        let mut bases: Vec<(&'static str, Vec<u8>)> = Vec::new();
        for svc in &svcs {
            let client = if svc.vip.is_ipv6() { v6(CLIENT6) } else { v4(CLIENT4) };
            let l4 = l4_for(&mut rng, svc.proto, 40_000, svc.port);
            let mut spec = Spec::new(client, svc.vip, l4);
            bases.push(("fxc", spec.bytes()));
            spec.vlans.push((ETH_8021Q, 7));
            bases.push(("fxc", spec.bytes()));
            spec.vlans.clear();
            if let Ip::V4 { options, .. } = &mut spec.ip {
                *options = vec![1; 12];
                bases.push(("fxc", spec.bytes()));
            }
            if let Ip::V6 { ext, .. } = &mut spec.ip {
                ext.push((0, vec![1, 0, 0, 0, 0, 0]));
                bases.push(("fxc", spec.bytes()));
            }
            if let Some(&(b, bport)) = svc.backends.first() {
                if !svc.dsr {
                    let mut r = Spec::new(b, client, l4_for(&mut rng, svc.proto, bport, 40_000));
                    r.src_mac = [0x02, 0, 0, 0, 0xbb, 0x02];
                    r.dst_mac = LB_BACKEND_MAC;
                    bases.push(("fxb", r.bytes()));
                }
            }
        }
        for (iface, base) in &bases {
            for len in 0..=base.len() {
                let frame = &base[..len];
                let n = judge.tally.frames as usize;
                if let Err(e) = judge.frame(iface, frame, "truncation sweep") {
                    record(n, "truncation sweep", iface, frame, e, &mut failures);
                }
            }
        }

        // 2. Random frames.
        let mut done = 0;
        while done < frames && started.elapsed() < TIME_LIMIT {
            done += 1;
            let (kind, iface, frame): (&'static str, &'static str, Vec<u8>) = match rng.below(100) {
                0..=21 => ("valid request", if rng.chance(85) { "fxc" } else { "fxb" }, request(&mut rng, &svcs).bytes()),
                22..=36 => ("valid reply", if rng.chance(85) { "fxb" } else { "fxc" }, reply(&mut rng, &judge.model, &svcs).bytes()),
                37..=41 => {
                    let mut f = if rng.chance(50) { request(&mut rng, &svcs).bytes() } else { reply(&mut rng, &judge.model, &svcs).bytes() };
                    pad(&mut rng, &mut f);
                    ("padded", *rng.pick(&["fxc", "fxb"]), f)
                }
                42..=66 => {
                    let mut f = if rng.chance(60) { request(&mut rng, &svcs).bytes() } else { reply(&mut rng, &judge.model, &svcs).bytes() };
                    let limit = header_len_guess(&f);
                    match rng.below(4) {
                        0 => {
                            let n = rng.range(1, 3);
                            flip_bits(&mut rng, &mut f, n)
                        }
                        1 | 2 => {
                            let n = rng.range(1, 4);
                            flip_header_bits(&mut rng, &mut f, limit, n)
                        }
                        _ => poke(&mut rng, &mut f),
                    }
                    ("bit flips", *rng.pick(&["fxc", "fxb"]), f)
                }
                67..=78 => {
                    let mut f = if rng.chance(60) { request(&mut rng, &svcs).bytes() } else { reply(&mut rng, &judge.model, &svcs).bytes() };
                    let len = if rng.chance(70) { rng.below(header_len_guess(&f) + 8) } else { rng.below(f.len() + 1) };
                    f.truncate(len);
                    ("truncated", *rng.pick(&["fxc", "fxb"]), f)
                }
                79..=83 => ("other IP protocol", "fxc", other_protocol(&mut rng, &svcs).bytes()),
                84..=91 => {
                    let mut f = garbage(&mut rng, 0, 1600);
                    if f.len() >= 14 && rng.chance(60) {
                        let et = *rng.pick(&[ETH_IPV4, ETH_IPV6, ETH_8021Q, ETH_8021AD]);
                        f[12..14].copy_from_slice(&et.to_be_bytes());
                        if f.len() > 14 && rng.chance(50) {
                            f[14] = if et == ETH_IPV6 { 0x60 } else { 0x40 | (f[14] & 0x0f) };
                        }
                    }
                    ("garbage", *rng.pick(&["fxc", "fxb"]), f)
                }
                _ => {
                    // A valid header with a garbage tail, or a valid frame spliced into garbage.
                    let mut f = request(&mut rng, &svcs).bytes();
                    let keep = rng.below(f.len() + 1);
                    f.truncate(keep);
                    f.extend(garbage(&mut rng, 0, 200));
                    ("spliced", *rng.pick(&["fxc", "fxb"]), f)
                }
            };
            let n = judge.tally.frames as usize;
            if let Err(e) = judge.frame(iface, &frame, kind) {
                record(n, kind, iface, &frame, e, &mut failures);
            }
        }
        let elapsed = started.elapsed();

        // The service counters moved by exactly the packets the model says were scheduled or replied.
        for svc in &svcs {
            let delta = harness.service_packets(svc.name).0 - counters_before[svc.name];
            let want = judge.model.counted.get(svc.name).copied().unwrap_or(0);
            if delta != want {
                failures.push(format!("service {} counted {delta} packets, the model {want}", svc.name));
            }
        }

        let t = &judge.tally;
        println!(
            "random_frames: seed {seed}: {} frames in {:.1} s ({:.1} µs/frame incl. checks); {} refused by the kernel (< 14 bytes)",
            t.frames,
            elapsed.as_secs_f64(),
            elapsed.as_secs_f64() * 1e6 / t.frames.max(1) as f64,
            t.refused
        );
        println!("  kinds: {:?}", t.by_kind);
        println!("  verdicts: {:?}", t.verdicts);
        println!("  reasons: {:?}", t.reasons);
        println!(
            "  forwarded: {} NAT requests, {} NAT replies, {} DSR; {} NAT packets handed to the kernel translated; \
             {} known replies evicted from the LRU table (passed); {} forwarded frames had right checksums that were re-verified in full",
            t.forwarded_requests, t.forwarded_replies, t.forwarded_dsr, t.translated_passed, t.replies_evicted, t.full_checksums_verified
        );
        println!("  forwarded although a strict parser would reject them (header-valid, body not): {:?}", t.forwarded_malformed);
        println!(
            "  {} VLAN-tagged NAT replies were passed to the kernel untouched, like tagged VIP traffic",
            t.tagged_replies_passed
        );
        println!(
            "  {} IPv6 frames carried IPv4-mapped addresses and were passed untouched",
            t.mapped_passed
        );
        println!("  {} new flows from martian sources were dropped", t.martian_dropped);
        println!("  oracle cross-checked against etherparse on {} frames; {} flows tracked", t.cross_checked, judge.model.sticky.len() + judge.model.sticky_dsr.len());

        assert!(t.frames >= 100_000 || frames < 100_000, "only {} frames ran within {TIME_LIMIT:?}", t.frames);
        assert!(failures.is_empty(), "seed {seed}: {} problem(s):\n{}", failures.len(), failures.join("\n"));
        if frames >= 100_000 {
            assert!(
                t.forwarded_requests > 1000 && t.forwarded_replies > 1000 && t.forwarded_dsr > 500,
                "too few forwarded frames to mean anything (seed {seed})"
            );
        }
    });
}

/// IPv6 packets whose addresses are IPv4-mapped (`::ffff:a.b.c.d`) are IPv6 packets: they are not
/// for an IPv4 VIP, and an IPv6 "reply" from `::ffff:<backend>` is no reply to an IPv4 flow. The data
/// plane stores IPv4 addresses in that very mapped form, so it must not let the two meet.
#[test]
fn ipv6_packets_with_ipv4_mapped_addresses_are_not_balanced() {
    let svcs = services();
    let ns = fixture_namespace();
    ns.run(|| {
        let harness = Harness::new(&config_text(&svcs));
        let mut problems = Vec::new();
        // An IPv4 flow first, so its NAT reply entry exists.
        let flow4 = Spec::tcp((v4(CLIENT4), 41_000), (v4("10.200.100.100"), 80), 0x02).bytes();
        let (verdict, out4) = run(&harness, "fxc", &flow4).unwrap();
        assert_eq!(verdict, XDP_REDIRECT, "the IPv4 flow itself");
        let backend = Ipv4Addr::new(out4[14 + 16], out4[14 + 17], out4[14 + 18], out4[14 + 19]);
        let mapped = |a: &str| IpAddr::V6(a.parse::<Ipv4Addr>().unwrap().to_ipv6_mapped());
        let cases = [
            ("SYN to ::ffff:<NAT VIP>", "fxc", Spec::tcp((mapped(CLIENT4), 41_001), (mapped("10.200.100.100"), 80), 0x02)),
            ("UDP to ::ffff:<NAT VIP>", "fxc", Spec::udp((mapped(CLIENT4), 41_001), (mapped("10.200.100.100"), 53))),
            ("SYN to ::ffff:<DSR VIP>", "fxc", Spec::tcp((mapped(CLIENT4), 41_001), (mapped("10.200.100.101"), 80), 0x02)),
            ("SYN to ::ffff:<VIP without backends>", "fxc", Spec::tcp((mapped(CLIENT4), 41_001), (mapped("10.200.100.102"), 80), 0x02)),
            (
                "IPv6 'reply' from ::ffff:<backend> to the IPv4 flow's client",
                "fxb",
                Spec::tcp((mapped(&backend.to_string()), 8080), (mapped(CLIENT4), 41_000), 0x12),
            ),
        ];
        for (name, iface, spec) in cases {
            let frame = spec.bytes();
            let before = harness.reasons();
            let syns_before: u64 = ["10.201.0.2:8080", "10.201.0.3:8080", "10.201.0.4:8080"].iter().map(|b| harness.backend("nat4-tcp", b).1.syns).sum();
            let packets_before: u64 = svcs.iter().map(|s| harness.service_packets(s.name).0).sum();
            let (verdict, out) = run(&harness, iface, &frame).unwrap();
            let after = harness.reasons();
            let moved: Vec<_> = after.iter().filter(|(k, v)| before[*k] != **v).map(|(k, _)| *k).collect();
            let syns: u64 = ["10.201.0.2:8080", "10.201.0.3:8080", "10.201.0.4:8080"].iter().map(|b| harness.backend("nat4-tcp", b).1.syns).sum::<u64>() - syns_before;
            let packets: u64 = svcs.iter().map(|s| harness.service_packets(s.name).0).sum::<u64>() - packets_before;
            if verdict != XDP_PASS || moved != ["pass_not_vip"] || out != frame || packets != 0 {
                problems.push(format!(
                    "{name}: {} / {moved:?}, output {}, {packets} packet(s) counted for a service, {syns} SYN(s) counted \
                     against nat4-tcp's backends (expected XDP_PASS / pass_not_vip, untouched, nothing counted)\n    out {}",
                    verdict_name(verdict),
                    if out == frame { "unchanged" } else { "REWRITTEN" },
                    hex(&out)
                ));
            }
        }
        assert!(problems.is_empty(), "IPv4-mapped IPv6 addresses are confused with IPv4 VIPs/flows:\n{}", problems.join("\n"));
    });
}

/// Whether a TCP segment to a service without backends is answered with a RST (README: not a RST
/// itself, no IPv4 options, a data offset that fits the IP packet, an IP packet inside the frame).
fn reset_expected(f: &[u8], i: &L4Info) -> bool {
    if i.proto != contract::PROTO_TCP {
        return false;
    }
    let header = if i.v6 { 40 } else { i.ihl };
    let doff = (f[i.l4 + 12] >> 4) as usize * 4;
    f[i.l4 + 13] & 0x04 == 0 && header == 20 + 20 * i.v6 as usize && i.l3 + i.ip_len <= f.len() && doff >= 20 && header + doff <= i.ip_len
}

/// `out` must be the RST RFC 793 prescribes for `input`: headers only, MACs, addresses and ports
/// swapped, sequence/acknowledgment from the segment, both checksums right.
fn check_reset(input: &[u8], out: &[u8], i: &L4Info) -> Result<(), String> {
    let fail = |what: &str| Err(format!("RST: {what}: in {} out {}", hex(input), hex(out)));
    if out.len() != i.l4 + 20 {
        return fail("length");
    }
    if out[0..6] != input[6..12] || out[6..12] != input[0..6] || out[12..i.l3] != input[12..i.l3] {
        return fail("Ethernet header");
    }
    let Parsed::L4(o) = parse_contract(out) else { return fail("does not parse") };
    if (o.src, o.dst, o.sport, o.dport, o.proto) != (i.dst, i.src, i.dport, i.sport, i.proto) {
        return fail("addresses and ports");
    }
    if checksums_valid(out, &o) != Some((true, true)) {
        return fail("checksums");
    }
    let be32 = |f: &[u8], at: usize| u32::from_be_bytes(f[at..at + 4].try_into().unwrap());
    let flags = input[i.l4 + 13];
    let (seq, ack, rst_flags) = if flags & 0x10 != 0 {
        (be32(input, i.l4 + 8), 0, 0x04)
    } else {
        let header = if i.v6 { 40 } else { i.ihl };
        let data = i.ip_len - header - (input[i.l4 + 12] >> 4) as usize * 4;
        let len = data as u32 + (flags & 0x02 != 0) as u32 + (flags & 0x01 != 0) as u32;
        (0, be32(input, i.l4 + 4).wrapping_add(len), 0x14)
    };
    if (be32(out, o.l4 + 4), be32(out, o.l4 + 8), out[o.l4 + 12], out[o.l4 + 13]) != (seq, ack, 0x50, rst_flags) {
        return fail("sequence, acknowledgment, data offset or flags");
    }
    Ok(())
}
