//! A SYN flood against a small connection table (`[dataplane] conntrack_entries = 4096`), with the real
//! daemon in the namespace testbed: established keep-alive connections must keep working — every
//! request answered, by the same backend — during and after the flood.
//!
//! The flood: 50,000 TCP SYNs (at most 10 s) from random sources in 198.18.0.0/15 (RFC 2544's
//! benchmarking range, routed nowhere) and random ports to the VIP, crafted with a raw IPv4 socket
//! (IP_HDRINCL) in the client namespace. The backends answer with SYN-ACKs that the balancer
//! translates and hands to its kernel, which has no route to 198.18/15 and drops them.
//!
//! Besides asserting, the test reports what a full table does (it prints it; run with --nocapture):
//! how full CONNTRACK and NAT_REVERSE are, whether the entries of busy and of idle connections were
//! evicted, what an evicted connection does on its next packet, and which counters moved. The maps
//! are read straight from the daemon's pins.
//!
//! Idle connections are the hard case: the flood's SYN-ACKs touch their NAT_REVERSE entries, its SYNs
//! never touch their CONNTRACK entries again, so under LRU pressure an idle connection can keep its
//! CONNTRACK entry and lose its NAT_REVERSE entry. Its next request hits CONNTRACK, which writes the
//! reply entry back before the backend answers (this test found the bug where it did not).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, PerCpuArray};
use xdp_lb_common::{
    addr,
    maps::{names, Backend, Conn, Counters, FlowKey, NatReverse},
    reasons,
};
use xdp_lb_testbed::{config_toml, cpus, http_get, Daemon, Family, IdentityServers, KeepAliveClient, Mode, Protocol, Scheduler, RawSyns, ServiceConfig, Syn, Topology};

#[path = "fixtures/contract.rs"]
mod contract;
#[path = "fixtures/mutate.rs"]
mod mutate;

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const PORT: u16 = 80;
const CONNTRACK_ENTRIES: u32 = 4096;
const SYNS: usize = 50_000;
const FLOOD_LIMIT: Duration = Duration::from_secs(10);
/// SYNs per burst, one burst every BURST_PAUSE: 10,000 SYNs/s per CPU, so on 2 CPUs the flood
/// takes about 2.5 s.
const BURST: usize = 100;
const BURST_PAUSE: Duration = Duration::from_millis(10);
const ACTIVE: usize = 4;
const IDLE: usize = 4;
const REQUEST_EVERY: Duration = Duration::from_millis(20);
/// Bounds every client loop.
const CLIENT_LIMIT: Duration = Duration::from_secs(40);

/// The daemon's pinned maps, opened read-only in spirit (we only look things up).
struct Pinned {
    conntrack: BpfHashMap<MapData, FlowKey, Conn>,
    nat_reverse: BpfHashMap<MapData, FlowKey, NatReverse>,
    backends: Array<MapData, Backend>,
    backend_stats: PerCpuArray<MapData, Counters>,
    service_stats: PerCpuArray<MapData, Counters>,
    reasons: PerCpuArray<MapData, u64>,
    active_flows: Array<MapData, u64>,
}

fn open<T: TryFrom<Map, Error = aya::maps::MapError>>(dir: &Path, name: &str) -> T {
    let data = MapData::from_pin(dir.join(name)).unwrap_or_else(|e| panic!("opening pinned map {name}: {e}"));
    T::try_from(Map::from_map_data(data).unwrap()).unwrap_or_else(|e| panic!("pinned map {name}: {e}"))
}

impl Pinned {
    fn open(dir: &Path) -> Pinned {
        Pinned {
            conntrack: open(dir, names::CONNTRACK),
            nat_reverse: open(dir, names::NAT_REVERSE),
            backends: open(dir, names::BACKENDS),
            backend_stats: open(dir, names::BACKEND_STATS),
            service_stats: open(dir, names::SERVICE_STATS),
            reasons: open(dir, names::REASONS),
            active_flows: open(dir, names::ACTIVE_FLOWS),
        }
    }

    fn entries(&self) -> (usize, usize) {
        (self.conntrack.keys().filter(|k| k.is_ok()).count(), self.nat_reverse.keys().filter(|k| k.is_ok()).count())
    }

    /// Backend id, address and counters of every backend in use.
    fn backend_table(&self) -> Vec<(u32, SocketAddr, Counters, u64)> {
        let mut out = Vec::new();
        for id in 0..64u32 {
            let Ok(b) = self.backends.get(&id, 0) else { continue };
            if b.generation == 0 {
                continue;
            }
            let addr = SocketAddr::new(addr::to_ip(&b.addr), u16::from_be(b.port));
            let c = sum(&self.backend_stats.get(&id, 0).unwrap());
            let active = xdp_lb_common::conntrack::active_count(self.active_flows.get(&id, 0).unwrap_or(0));
            out.push((id, addr, c, active));
        }
        out
    }

    fn service(&self, id: u32) -> Counters {
        sum(&self.service_stats.get(&id, 0).unwrap())
    }

    fn reasons(&self) -> BTreeMap<&'static str, u64> {
        reasons::NAMES.iter().enumerate().map(|(i, n)| (*n, self.reasons.get(&(i as u32), 0).unwrap().iter().sum())).collect()
    }
}

fn sum(values: &aya::maps::PerCpuValues<Counters>) -> Counters {
    let mut t = Counters::default();
    for c in values.iter() {
        t.packets += c.packets;
        t.bytes += c.bytes;
        t.new_flows += c.new_flows;
        t.syns += c.syns;
        t.syn_acks += c.syn_acks;
        t.resets += c.resets;
    }
    t
}

fn flow_key(src: SocketAddr, dst: SocketAddr) -> FlowKey {
    FlowKey {
        src: addr::from_ip(src.ip()),
        dst: addr::from_ip(dst.ip()),
        sport: src.port().to_be(),
        dport: dst.port().to_be(),
        proto: 6,
        _pad: [0; 3],
    }
}

/// A long-lived connection, the backend that first answered it and the flow keys of both directions.
struct Tracked {
    conn: KeepAliveClient,
    backend: String,
    forward: FlowKey,
    reverse: FlowKey,
}

fn track(topo: &Topology, vip: SocketAddr) -> Tracked {
    let mut conn = topo.client().run(|| KeepAliveClient::connect(vip)).expect("keep-alive connect");
    let backend = conn.get().expect("first request");
    let local = conn.local_addr().unwrap();
    let index: usize = backend.strip_prefix("backend-").unwrap().parse().unwrap();
    let backend_addr = topo.backend_socket(Family::V4, index, PORT);
    Tracked { conn, backend, forward: flow_key(local, vip), reverse: flow_key(backend_addr, local) }
}

/// Sends `count` TCP SYNs from random 198.18.0.0/15 addresses and ports to `vip`, at most `limit`.
/// Returns how many were sent and how long it took. Must run inside the client namespace.
fn flood(vip: SocketAddr, count: usize, seed: u64, limit: Duration) -> (usize, Duration) {
    let IpAddr::V4(dst) = vip.ip() else { panic!("IPv4 VIP") };
    let raw = RawSyns::open(dst).unwrap_or_else(|e| panic!("raw socket: {e}"));
    let mut rng = mutate::Rng::new(seed);
    let started = Instant::now();
    let mut sent = 0;
    while sent < count && started.elapsed() < limit {
        for _ in 0..BURST.min(count - sent) {
            let src = Ipv4Addr::new(198, 18 + (rng.u8() & 1), rng.u8(), rng.u8());
            let syn = Syn { src, sport: 1024 + (rng.u16() % 64_000), dport: vip.port(), seq: rng.u32(), ip_id: rng.u16() };
            if raw.send(&syn).is_ok() {
                sent += 1;
            } else {
                // ENOBUFS under pressure: back off a little and go on.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        std::thread::sleep(BURST_PAUSE);
    }
    (sent, started.elapsed())
}

/// The flood, sent from one thread pinned to each CPU: each CPU has its own LRU list of
/// `CONNTRACK_ENTRIES / CPUs` entries and handles the packets its thread sends, so a flood from one
/// CPU (as the scheduler may place a single sender) fills only that CPU's share.
fn flood_from_every_cpu(vip: SocketAddr, seed: u64) -> (usize, Duration) {
    let cpus = cpus::possible();
    std::thread::scope(|s| {
        let senders: Vec<_> = (0..cpus)
            .map(|cpu| {
                s.spawn(move || {
                    cpus::pin_current_thread(cpu);
                    flood(vip, SYNS / cpus, seed.wrapping_add(cpu as u64), FLOOD_LIMIT)
                })
            })
            .collect();
        senders.into_iter().map(|h| h.join().unwrap()).fold((0, Duration::ZERO), |(n, t), (sent, took)| (n + sent, t.max(took)))
    })
}

#[test]
fn established_connections_survive_a_syn_flood_that_fills_the_connection_table() {
    let seed = mutate::Rng::seed_from_env("XDP_LB_FLOOD_SEED");
    println!("syn_flood: seed {seed} (XDP_LB_FLOOD_SEED={seed} reproduces the SYN sources)");
    let topo = Topology::new("synf", 3).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, PORT, 53).expect("servers");
    let vip = topo.vip_socket(Family::V4, PORT);
    let backends = (0..3).map(|i| topo.backend_socket(Family::V4, i, PORT));
    let config = format!(
        "[dataplane]\nconntrack_entries = {CONNTRACK_ENTRIES}\n\n{}",
        config_toml(&[ServiceConfig::new("web", vip, Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends)])
    );
    let daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config).unwrap_or_else(|e| panic!("{e:?}"));
    let maps = Pinned::open(daemon.pin_dir());

    // Idle connections: one request now, then silence until the flood is over.
    let mut idle: Vec<Tracked> = (0..IDLE).map(|_| track(&topo, vip)).collect();
    // Busy connections: a request every 20 ms, from before the flood until after it.
    let busy: Vec<Tracked> = (0..ACTIVE).map(|_| track(&topo, vip)).collect();
    let busy_keys: Vec<(FlowKey, FlowKey)> = busy.iter().map(|t| (t.forward, t.reverse)).collect();
    let present = |keys: &[(FlowKey, FlowKey)]| -> (usize, usize) {
        (
            keys.iter().filter(|(f, _)| maps.conntrack.get(f, 0).is_ok()).count(),
            keys.iter().filter(|(_, r)| maps.nat_reverse.get(r, 0).is_ok()).count(),
        )
    };
    let idle_keys: Vec<(FlowKey, FlowKey)> = idle.iter().map(|t| (t.forward, t.reverse)).collect();
    assert_eq!(present(&idle_keys), (IDLE, IDLE), "idle connections' entries before the flood");
    assert_eq!(present(&busy_keys), (ACTIVE, ACTIVE), "busy connections' entries before the flood");

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = busy
        .into_iter()
        .map(|mut t| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let (mut ok, mut errors, mut moved) = (0usize, Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) && started.elapsed() < CLIENT_LIMIT {
                    match t.conn.get() {
                        Ok(b) if b == t.backend => ok += 1,
                        Ok(b) => moved.push(b),
                        Err(e) => {
                            errors.push(e.to_string());
                            break;
                        }
                    }
                    std::thread::sleep(REQUEST_EVERY);
                }
                (t.backend, ok, errors, moved)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));

    let service_before = maps.service(0);
    let backends_before = maps.backend_table();
    let reasons_before = maps.reasons();
    let entries_before = maps.entries();
    let logs_before = daemon.log().lines().count();

    // Sample the table while the flood runs (from a scoped thread, so the flood keeps its pace).
    let sampling = AtomicBool::new(true);
    let (flood_result, samples) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut samples = Vec::new();
            let started = Instant::now();
            while sampling.load(Ordering::Relaxed) && started.elapsed() < FLOOD_LIMIT + Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(500));
                samples.push((started.elapsed(), maps.entries(), present(&busy_keys)));
            }
            samples
        });
        let result = topo.client().run(|| flood_from_every_cpu(vip, seed));
        sampling.store(false, Ordering::Relaxed);
        (result, sampler.join().unwrap())
    });
    let (sent, flood_time) = flood_result;
    std::thread::sleep(Duration::from_millis(300)); // SYN-ACKs in flight
    let entries_after = maps.entries();
    let busy_after = present(&busy_keys);
    let idle_after = present(&idle_keys);
    let service_after = maps.service(0);
    let backends_after = maps.backend_table();
    let reasons_after = maps.reasons();

    // The idle connections speak again: the client speaks first, so an evicted flow is placed anew
    // (Maglev, same backend set → same backend) and both table entries are written again.
    let idle_entries: Vec<(bool, bool)> =
        idle_keys.iter().map(|(f, r)| (maps.conntrack.get(f, 0).is_ok(), maps.nat_reverse.get(r, 0).is_ok())).collect();
    let idle_results: Vec<(String, Result<String, String>)> = std::thread::scope(|s| {
        let handles: Vec<_> =
            idle.iter_mut().map(|t| s.spawn(move || (t.backend.clone(), t.conn.get().map_err(|e| e.to_string())))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let idle_restored = present(&idle_keys);
    let service_after_idle = maps.service(0);
    // Busy connections go on for another second after the flood.
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let busy_results: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    // Eviction, reproduced exactly: remove a live connection's entries by hand, as LRU eviction does,
    // and see what its next request does.
    let mut conntrack_rw: BpfHashMap<MapData, FlowKey, Conn> = open(daemon.pin_dir(), names::CONNTRACK);
    let mut reverse_rw: BpfHashMap<MapData, FlowKey, NatReverse> = open(daemon.pin_dir(), names::NAT_REVERSE);
    let mut evicted = Vec::new();
    for (what, drop_forward, drop_reverse) in
        [("CONNTRACK only", true, false), ("both entries", true, true), ("NAT_REVERSE only", false, true)]
    {
        let mut t = track(&topo, vip);
        let flows_before = maps.service(0).new_flows;
        if drop_forward {
            conntrack_rw.remove(&t.forward).expect("removing the CONNTRACK entry");
        }
        if drop_reverse {
            reverse_rw.remove(&t.reverse).expect("removing the NAT_REVERSE entry");
        }
        let result = t.conn.get().map_err(|e| e.to_string());
        let new_flows = maps.service(0).new_flows - flows_before;
        let restored = (maps.conntrack.get(&t.forward, 0).is_ok(), maps.nat_reverse.get(&t.reverse, 0).is_ok());
        evicted.push((what, t.backend.clone(), result, new_flows, restored));
    }
    // New connections still work.
    let fresh: Vec<Result<String, String>> = topo.client().run(|| (0..30).map(|_| http_get(vip).map_err(|e| e.to_string())).collect());
    let health_log: Vec<String> =
        daemon.log().lines().skip(logs_before).filter(|l| l.contains("backend is")).map(str::to_string).collect();

    // ---- report ----
    println!("syn_flood: sent {sent} SYNs in {:.2} s ({:.0}/s) from 198.18.0.0/15 to {vip}", flood_time.as_secs_f64(), sent as f64 / flood_time.as_secs_f64());
    println!(
        "  table (CONNTRACK, NAT_REVERSE) entries of {CONNTRACK_ENTRIES}: before {entries_before:?}, after {entries_after:?}"
    );
    for (t, entries, busy_present) in &samples {
        println!("    t={:.1} s: entries {entries:?}, busy connections' entries present {busy_present:?} of {ACTIVE}", t.as_secs_f64());
    }
    println!("  busy connections' entries present after the flood (conntrack, reverse): {busy_after:?} of {ACTIVE}");
    println!("  idle connections' entries present after the flood: {idle_after:?} of {IDLE}; after they spoke again: {idle_restored:?}");
    println!(
        "  service web: packets +{}, new_flows +{} during the flood; new_flows +{} when the {IDLE} idle connections spoke again",
        service_after.packets - service_before.packets,
        service_after.new_flows - service_before.new_flows,
        service_after_idle.new_flows - service_after.new_flows
    );
    for ((id, addr, a, active_a), (_, _, b, active_b)) in backends_before.iter().zip(&backends_after) {
        println!(
            "  backend {id} {addr}: new_flows +{}, syns +{}, syn_acks +{}, resets +{}, active_flows {} → {}",
            b.new_flows - a.new_flows,
            b.syns - a.syns,
            b.syn_acks - a.syn_acks,
            b.resets - a.resets,
            *active_a as i64,
            *active_b as i64
        );
    }
    let moved: BTreeMap<_, _> =
        reasons_after.iter().filter(|(k, v)| reasons_before[*k] != **v).map(|(k, v)| (*k, v - reasons_before[*k])).collect();
    println!("  reason counters moved: {moved:?}");
    println!("  health transitions logged during the test: {health_log:?}");

    // ---- assertions ----
    let mut problems = Vec::new();
    if sent < SYNS * 9 / 10 {
        problems.push(format!("only {sent} of {SYNS} SYNs sent within {FLOOD_LIMIT:?}"));
    }
    if entries_after.0 < CONNTRACK_ENTRIES as usize * 9 / 10 {
        problems.push(format!("the table never filled ({entries_after:?} of {CONNTRACK_ENTRIES}): the test exercised nothing"));
    }
    for (what, backend, result, new_flows, restored) in &evicted {
        println!(
            "  evicting {what} of a live connection on {backend} (by hand): next request {result:?}, new_flows +{new_flows}, \
             entries afterwards (conntrack, reverse) {restored:?}"
        );
    }
    for (backend, ok, errors, moved) in &busy_results {
        println!("  busy connection on {backend}: {ok} requests answered, {} failed, {} answered elsewhere", errors.len(), moved.len());
        if !errors.is_empty() || !moved.is_empty() {
            problems.push(format!("busy connection on {backend}: errors {errors:?}, answered by {moved:?}"));
        }
        if *ok < 100 {
            problems.push(format!("busy connection on {backend}: only {ok} requests"));
        }
    }
    for ((backend, result), (conntrack, reverse)) in idle_results.iter().zip(&idle_entries) {
        println!(
            "  idle connection on {backend}: after the flood CONNTRACK entry {}, NAT_REVERSE entry {}; next request: {result:?}",
            if *conntrack { "kept" } else { "evicted" },
            if *reverse { "kept" } else { "evicted" }
        );
        match result {
            Ok(b) if b == backend => {}
            other => problems.push(format!(
                "idle connection on {backend}, first request after the flood: {other:?} — its CONNTRACK entry was {}, its \
                 NAT_REVERSE entry {}{}",
                if *conntrack { "kept" } else { "evicted" },
                if *reverse { "kept" } else { "evicted" },
                if *conntrack && !*reverse {
                    ": the request hits CONNTRACK, which does not write NAT_REVERSE again, so the backend's replies \
                     find no reverse entry and go to the balancer's kernel untranslated (pass_not_vip); the connection is dead"
                } else {
                    ""
                }
            )),
        }
    }
    for (what, backend, result, new_flows, restored) in &evicted {
        let ok = result.as_ref().is_ok_and(|b| b == backend);
        match *what {
            // Placed anew by Maglev over an unchanged backend set: the same backend, one new flow.
            "CONNTRACK only" | "both entries" if !(ok && *new_flows == 1 && *restored == (true, true)) => problems.push(format!(
                "after evicting {what} of a live connection on {backend}: {result:?}, new_flows +{new_flows}, entries {restored:?}"
            )),
            // Only the reply entry gone: the next client packet hits CONNTRACK, which restores it;
            // no new flow, same backend.
            "NAT_REVERSE only" if !(ok && *new_flows == 0 && *restored == (true, true)) => problems.push(format!(
                "after evicting the NAT reply entry of a live connection on {backend}: {result:?}, new_flows +{new_flows}, entries {restored:?}"
            )),
            _ => {}
        }
    }
    let fresh_failed: Vec<_> = fresh.iter().filter_map(|r| r.as_ref().err()).collect();
    if !fresh_failed.is_empty() {
        problems.push(format!("{} of 30 new connections after the flood failed: {fresh_failed:?}", fresh_failed.len()));
    }
    assert!(problems.is_empty(), "seed {seed}:\n{}\n--- daemon log ---\n{}", problems.join("\n"), daemon.log());
}
