//! The per-new-flow schedulers and flow tracking, through the real loaded program (BPF_PROG_TEST_RUN):
//! round-robin cycles, weighted round-robin follows weights, least-conn picks the backend with the
//! fewest open flows (closes counted from FIN/RST in either direction), and the passive counters
//! (SYNs forwarded, SYN-ACKs and RSTs returned) move.

#[path = "fixtures/harness.rs"]
mod harness;
#[path = "fixtures/packet.rs"]
mod packet;

use harness::*;
use packet::{Frame, L3, L4, TCP_SYN};

const CONFIG: &str = r#"
[dataplane]
conntrack_entries = 4096
maglev_cells = 8192

[[services]]
name = "rr"
vip = "10.200.100.110:80"
protocol = "tcp"
scheduler = "round-robin"
[[services.backends]]
address = "10.201.0.2:80"
[[services.backends]]
address = "10.201.0.3:80"
[[services.backends]]
address = "10.201.0.4:80"

[[services]]
name = "wrr"
vip = "10.200.100.111:80"
protocol = "tcp"
scheduler = "weighted-round-robin"
[[services.backends]]
address = "10.201.0.2:80"
weight = 3
[[services.backends]]
address = "10.201.0.3:80"
weight = 1

[[services]]
name = "lc"
vip = "10.200.100.112:80"
protocol = "tcp"
scheduler = "least-conn"
[[services.backends]]
address = "10.201.0.2:80"
[[services.backends]]
address = "10.201.0.3:80"
[[services.backends]]
address = "10.201.0.4:80"
"#;

const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
/// Offset of the TCP flags byte in an untagged IPv4 frame without options.
const TCP_FLAGS: usize = L3 + 20 + 13;

/// A TCP segment from client port `sport` to `vip` with `flags`; returns the backend it was sent to.
fn send(h: &Harness, sport: u16, vip: &str, flags: u8) -> String {
    let mut frame = Frame::new(L4::Tcp, &format!("10.200.0.2:{sport}"), vip).bytes();
    set_tcp_flags(&mut frame, flags);
    let (verdict, out) = h.run("fxc", &frame);
    assert_eq!(verdict, XDP_REDIRECT, "port {sport} to {vip}: verdict {verdict}, output {}", hex(&out));
    format!("{}.{}.{}.{}", out[L3 + 16], out[L3 + 17], out[L3 + 18], out[L3 + 19])
}

/// The backend `backend` (address without port) answers client port `sport` with `flags`.
fn reply(h: &Harness, backend: &str, sport: u16, flags: u8) {
    let mut frame = Frame::new(L4::Tcp, &format!("{backend}:80"), &format!("10.200.0.2:{sport}"))
        .with_macs([0x02, 0, 0, 0, 0xbb, 0x02], LB_BACKEND_MAC)
        .bytes();
    set_tcp_flags(&mut frame, flags);
    let (verdict, out) = h.run("fxb", &frame);
    assert_eq!(verdict, XDP_REDIRECT, "reply from {backend} to port {sport}: output {}", hex(&out));
}

/// Sets the flags byte; the checksum does not matter to the program (it only updates it).
fn set_tcp_flags(frame: &mut [u8], flags: u8) {
    frame[TCP_FLAGS] = flags;
}

fn active(h: &Harness, service: &str, backend: &str) -> u64 {
    let (id, _) = h.backend(service, &format!("{backend}:80"));
    h.dataplane.active_flows(id).unwrap()
}

#[test]
fn round_robin_cycles_through_backends_in_order() {
    let ns = fixture_namespace();
    ns.run(|| {
        let h = Harness::new(CONFIG);
        let picks: Vec<String> = (0..9).map(|i| send(&h, 42_000 + i, "10.200.100.110:80", SYN)).collect();
        let expected: Vec<&str> = ["10.201.0.2", "10.201.0.3", "10.201.0.4"].repeat(3);
        assert_eq!(picks, expected);
        // An established flow stays put while the sequence moves on.
        assert_eq!(send(&h, 42_000, "10.200.100.110:80", ACK), "10.201.0.2");
    });
}

#[test]
fn weighted_round_robin_follows_the_weights() {
    let ns = fixture_namespace();
    ns.run(|| {
        let h = Harness::new(CONFIG);
        let picks: Vec<String> = (0..400).map(|i| send(&h, 43_000 + i, "10.200.100.111:80", SYN)).collect();
        let heavy = picks.iter().filter(|p| *p == "10.201.0.2").count();
        assert_eq!(heavy, 300, "3:1 weights over 400 new flows");
        // Smooth: the light backend is never waited on for more than three heavy picks in a row.
        assert!(!picks.windows(4).any(|w| w.iter().all(|p| p == "10.201.0.2")), "{picks:?}");
    });
}

const LC_BACKENDS: [&str; 3] = ["10.201.0.2", "10.201.0.3", "10.201.0.4"];

fn lc_counts(h: &Harness) -> [u64; 3] {
    LC_BACKENDS.map(|b| active(h, "lc", b))
}

fn lc_count(h: &Harness, backend: &str) -> u64 {
    active(h, "lc", backend)
}

/// Ties between backends with equally few open flows go to a per-flow pick (not the first listed),
/// so these tests assert the rule — the fewest open flows — and find out where ties went.
#[test]
fn least_conn_sends_new_flows_to_the_backend_with_fewest_open_flows() {
    let ns = fixture_namespace();
    ns.run(|| {
        let h = Harness::new(CONFIG);
        let vip = "10.200.100.112:80";
        // Three flows: each goes to a backend with none yet, so one each.
        let first: Vec<String> = (0..3).map(|i| send(&h, 44_000 + i, vip, SYN)).collect();
        let mut sorted = first.clone();
        sorted.sort();
        assert_eq!(sorted, LC_BACKENDS, "three flows over three idle backends");
        let busiest = send(&h, 44_003, vip, SYN);
        assert_eq!(lc_count(&h, &busiest), 2);
        assert_eq!(lc_counts(&h).iter().sum::<u64>(), 4);
        let others: Vec<(u16, String)> =
            first.iter().enumerate().filter(|(_, b)| **b != busiest).map(|(i, b)| (44_000 + i as u16, b.clone())).collect();
        let ((closed_port, closed), (reset_port, reset)) = (others[0].clone(), others[1].clone());

        // The client closes one flow (FIN, counted once even if repeated): its backend is now the
        // only one with none open, so it gets the next flow ...
        send(&h, closed_port, vip, FIN | ACK);
        send(&h, closed_port, vip, FIN | ACK);
        assert_eq!(lc_count(&h, &closed), 0);
        assert_eq!(send(&h, 44_004, vip, SYN), closed);
        // ... and another backend resets its flow: the reply direction closes it too.
        reply(&h, &reset, reset_port, RST);
        assert_eq!(lc_count(&h, &reset), 0);
        assert_eq!(send(&h, 44_005, vip, SYN), reset);
        // A reused 5-tuple (new SYN after the close) is a new connection, placed by least-conn:
        // on one of the two backends with one flow, not the busiest with two.
        let again = send(&h, closed_port, vip, SYN);
        assert!(again == closed || again == reset, "{again} has the most open flows: {:?}", lc_counts(&h));
        assert_eq!(lc_count(&h, &again), 2);
    });
}

#[test]
fn passive_counters_see_syns_syn_acks_and_resets() {
    let ns = fixture_namespace();
    ns.run(|| {
        let h = Harness::new(CONFIG);
        let vip = "10.200.100.110:80";
        let backend = send(&h, 45_000, vip, SYN);
        send(&h, 45_000, vip, ACK); // not a SYN
        reply(&h, &backend, 45_000, SYN | ACK);
        reply(&h, &backend, 45_000, RST | ACK);
        let (_, c) = h.backend("rr", &format!("{backend}:80"));
        assert_eq!((c.syns, c.syn_acks, c.resets, c.new_flows), (1, 1, 1, 1), "{c:?}");
    });
}

#[test]
fn a_syn_on_a_closed_entry_is_placed_by_the_scheduler_and_counted_as_a_new_flow() {
    let ns = fixture_namespace();
    ns.run(|| {
        let h = Harness::new(CONFIG);
        let vip = "10.200.100.110:80";
        let (_, new_flows_before) = h.service_packets("rr");
        assert_eq!(send(&h, 46_000, vip, SYN), "10.201.0.2");
        assert_eq!(send(&h, 46_000, vip, ACK), "10.201.0.2");
        assert_eq!(send(&h, 46_000, vip, FIN | ACK), "10.201.0.2");
        // The last ACK after the FIN still reaches the backend that held the connection.
        assert_eq!(send(&h, 46_000, vip, ACK), "10.201.0.2");
        // The client reuses the 5-tuple (TIME_WAIT reuse): a new connection, so round-robin's next
        // backend, exactly as a fresh 5-tuple would get it.
        let syn = Frame::new(L4::Tcp, "10.200.0.2:46000", vip).with_tcp_flags(TCP_SYN);
        let (verdict, out) = h.run("fxc", &syn.bytes());
        let want = syn.clone().with_dst("10.201.0.3:80").with_macs(LB_BACKEND_MAC, [0x02, 0, 0, 0, 0xbb, 0x03]).bytes();
        assert_eq!((verdict, hex(&out)), (XDP_REDIRECT, hex(&want)));
        let (_, new_flows_after) = h.service_packets("rr");
        assert_eq!(new_flows_after - new_flows_before, 2, "two connections, two new flows");
        // Its packets follow the new entry.
        assert_eq!(send(&h, 46_000, vip, ACK), "10.201.0.3");
    });
}

#[test]
fn a_retransmitted_syn_keeps_its_backend_and_is_not_a_new_flow() {
    let ns = fixture_namespace();
    ns.run(|| {
        let h = Harness::new(CONFIG);
        let vip = "10.200.100.110:80";
        assert_eq!(send(&h, 46_100, vip, SYN), "10.201.0.2");
        // Round-robin would now give .3: the retransmission must not follow it.
        assert_eq!(send(&h, 46_100, vip, SYN), "10.201.0.2");
        assert_eq!(send(&h, 46_100, vip, SYN), "10.201.0.2");
        assert_eq!(send(&h, 46_101, vip, SYN), "10.201.0.3");
        let (_, new_flows) = h.service_packets("rr");
        assert_eq!(new_flows, 2);
    });
}

#[test]
fn a_syn_on_an_established_entry_is_a_new_connection_and_frees_the_old_count() {
    let ns = fixture_namespace();
    ns.run(|| {
        let h = Harness::new(CONFIG);
        let vip = "10.200.100.112:80";
        let old = send(&h, 47_000, vip, SYN);
        assert_eq!(send(&h, 47_000, vip, ACK), old);
        // The client vanished without a FIN; its port comes back with a new connection. It is
        // placed while the old one still counts, so on another backend.
        let new = send(&h, 47_000, vip, SYN);
        assert_ne!(new, old);
        let want = LC_BACKENDS.map(|b| u64::from(b == new));
        assert_eq!(lc_counts(&h), want, "the old flow's count freed, the new one counted on {new}");
    });
}

#[test]
fn a_late_reset_from_the_old_backend_does_not_close_the_reused_flow() {
    let ns = fixture_namespace();
    ns.run(|| {
        let h = Harness::new(CONFIG);
        let vip = "10.200.100.112:80";
        let old = send(&h, 47_100, vip, SYN);
        send(&h, 47_100, vip, ACK);
        send(&h, 47_100, vip, FIN | ACK);
        assert_eq!(lc_counts(&h), [0, 0, 0]);
        // Keep the old backend busy with one open flow (closing the ones that land elsewhere), so
        // the reused port must go to another backend.
        let busy = (47_101..47_200)
            .find(|&port| {
                let landed = send(&h, port, vip, SYN);
                if landed != old {
                    send(&h, port, vip, RST);
                }
                landed == old
            })
            .expect("some port of 100 lands on the old backend");
        assert_eq!(lc_count(&h, &old), 1, "port {busy}");
        // The client reuses port 47100: least-conn places it on a backend with no flow.
        let new = send(&h, 47_100, vip, SYN);
        assert_ne!(new, old);
        assert_eq!(lc_count(&h, &new), 1);
        let before = lc_counts(&h);
        // A late RST from the old backend for the old connection must not end the new one.
        reply(&h, &old, 47_100, RST | ACK);
        assert_eq!(lc_counts(&h), before);
        // The new backend's own RST does.
        reply(&h, &new, 47_100, RST | ACK);
        assert_eq!(lc_count(&h, &new), 0);
        assert_eq!(lc_count(&h, &old), 1);
    });
}

#[test]
fn a_flow_picked_up_by_its_fin_is_never_counted_open() {
    let ns = fixture_namespace();
    ns.run(|| {
        let h = Harness::new(CONFIG);
        let vip = "10.200.100.112:80";
        // Its entry was evicted: the close is the first packet the table sees of it.
        send(&h, 48_000, vip, FIN | ACK);
        send(&h, 48_001, vip, RST);
        let counts = ["10.201.0.2", "10.201.0.3", "10.201.0.4"].map(|b| active(&h, "lc", b));
        assert_eq!(counts, [0, 0, 0]);
    });
}

/// Issue 9 H7: a ring the daemon could not rebuild may still name a backend it marked down. New
/// flows that land on its cells try the next ones instead of going to the dead server; flows of
/// the other backends are untouched.
#[test]
fn new_flows_skip_a_backend_marked_down_that_the_ring_still_names() {
    use xdp_lb::tables::MapWriter;
    let ns = fixture_namespace();
    ns.run(|| {
        let mut h = Harness::new(CONFIG);
        let (id, _) = h.backend("rr", "10.201.0.3:80");
        let mut entry = h.dataplane.backend_entry(id).unwrap();
        entry.flags |= xdp_lb_common::maps::BACKEND_FLAG_DOWN;
        h.dataplane.write_backend(id, &entry).unwrap();
        let picks: Vec<String> = (0..9).map(|i| send(&h, 44_000 + i, "10.200.100.110:80", SYN)).collect();
        assert!(!picks.iter().any(|p| p == "10.201.0.3"), "a new flow went to the backend marked down: {picks:?}");
        // Its cell's flows go to the next cell's backend; the others keep their own.
        assert_eq!(picks, ["10.201.0.2", "10.201.0.4", "10.201.0.4"].repeat(3));
    });
}
