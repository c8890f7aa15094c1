//! Packet fixtures run through the real, verified XDP program with BPF_PROG_TEST_RUN.
//!
//! Each case is a description, an input frame, the interface it arrives on, the expected verdict, the
//! expected output bytes and the counter that must move. The FIB lookups resolve against a namespace
//! built for the purpose: two veth interfaces with fixed MACs and permanent neighbour entries, so
//! the output bytes are fully determined.

#[path = "fixtures/harness.rs"]
mod harness;
#[path = "fixtures/packet.rs"]
mod packet;

use std::collections::BTreeMap;

use aya::programs::{TestRun, TestRunOptions};
use harness::*;
use packet::{arp_request, icmp_echo, tcp_rst, Frame, ACK_SEQ, L3, L4, SEQ, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

const CONFIG: &str = r#"
[dataplane]
conntrack_entries = 4096
maglev_cells = 8192

[[services]]
name = "nat4-tcp"
vip = "10.200.100.100:80"
protocol = "tcp"
ring_size = 251
[[services.backends]]
address = "10.201.0.2:8080"

[[services]]
name = "nat4-udp"
vip = "10.200.100.100:53"
protocol = "udp"
ring_size = 251
[[services.backends]]
address = "10.201.0.2:5353"

[[services]]
name = "dsr4-tcp"
vip = "10.200.100.101:80"
protocol = "tcp"
mode = "dsr"
ring_size = 251
[[services.backends]]
address = "10.201.0.2:80"

[[services]]
name = "dsr4-udp"
vip = "10.200.100.101:53"
protocol = "udp"
mode = "dsr"
ring_size = 251
[[services.backends]]
address = "10.201.0.2:53"

[[services]]
name = "nat6-tcp"
vip = "[fd00:200:100::100]:80"
protocol = "tcp"
ring_size = 251
[[services.backends]]
address = "[fd00:201::2]:8080"

[[services]]
name = "nat6-udp"
vip = "[fd00:200:100::100]:53"
protocol = "udp"
ring_size = 251
[[services.backends]]
address = "[fd00:201::2]:5353"

[[services]]
name = "dsr6-tcp"
vip = "[fd00:200:100::101]:80"
protocol = "tcp"
mode = "dsr"
ring_size = 251
[[services.backends]]
address = "[fd00:201::2]:80"

[[services]]
name = "dsr6-udp"
vip = "[fd00:200:100::101]:53"
protocol = "udp"
mode = "dsr"
ring_size = 251
[[services.backends]]
address = "[fd00:201::2]:53"

[[services]]
name = "empty"
vip = "10.200.100.102:80"
protocol = "tcp"
ring_size = 251

[[services]]
name = "empty6"
vip = "[fd00:200:100::102]:80"
protocol = "tcp"
ring_size = 251

[[services]]
name = "empty-udp"
vip = "10.200.100.102:53"
protocol = "udp"
ring_size = 251

[[services]]
name = "lc4"
vip = "10.200.100.105:80"
protocol = "tcp"
scheduler = "least-conn"
[[services.backends]]
address = "10.201.0.2:8080"
[[services.backends]]
address = "10.201.0.3:8080"
[[services.backends]]
address = "10.201.0.4:8080"

[[services]]
name = "nat4-unresolved"
vip = "10.200.100.103:80"
protocol = "tcp"
ring_size = 251
[[services.backends]]
address = "10.201.0.9:8080"

[[services]]
name = "dsr4-unresolved"
vip = "10.200.100.104:80"
protocol = "tcp"
mode = "dsr"
ring_size = 251
[[services.backends]]
address = "10.201.0.9:80"
"#;

#[derive(Clone, Copy)]
enum Expect {
    /// Forwarded with this verdict; the service's packet counter moves.
    Forward(u32, &'static str),
    /// Not forwarded: this verdict, this reason counter moves, output identical to input.
    NotForwarded(u32, &'static str),
    /// Handed to the kernel after translation (no MAC change), counted under the reason.
    PassTranslated(&'static str),
    /// Answered with a RST sent back out of the ingress interface (a redirect to it: see the
    /// program's `reject`), counted as `reject_no_backend`.
    Reject,
}

struct Case {
    name: &'static str,
    iface: &'static str,
    input: Vec<u8>,
    expect: Expect,
    /// Expected output frame; `None` means "unchanged".
    output: Option<Vec<u8>>,
}

fn case(name: &'static str, iface: &'static str, input: Vec<u8>, expect: Expect, output: Option<Vec<u8>>) -> Case {
    Case { name, iface, input, expect, output }
}

/// The forwarding cases for one family: NAT in both directions and DSR, TCP and UDP.
fn forwarding_cases(v6: bool) -> Vec<Case> {
    let (client, vip_nat, vip_dsr, backend) = if v6 {
        ("[fd00:200::2]:40000", "[fd00:200:100::100]", "[fd00:200:100::101]", "[fd00:201::2]")
    } else {
        ("10.200.0.2:40000", "10.200.100.100", "10.200.100.101", "10.201.0.2")
    };
    let fam = if v6 { "6" } else { "4" };
    let mut cases = Vec::new();
    for (l4, vport, bport, proto) in [(L4::Tcp, 80, 8080, "tcp"), (L4::Udp, 53, 5353, "udp")] {
        let nat_name: &'static str = Box::leak(format!("nat{fam}-{proto}").into_boxed_str());
        let dsr_name: &'static str = Box::leak(format!("dsr{fam}-{proto}").into_boxed_str());
        let request = Frame::new(l4, client, &format!("{vip_nat}:{vport}"));
        let translated = request.clone().with_dst(&format!("{backend}:{bport}")).with_macs(LB_BACKEND_MAC, BACKEND_MAC);
        cases.push(case(
            Box::leak(format!("NAT {proto}/IPv{fam}: client → VIP is rewritten to the backend and redirected").into_boxed_str()),
            "fxc",
            request.bytes(),
            Expect::Forward(XDP_REDIRECT, nat_name),
            Some(translated.bytes()),
        ));
        // The reply comes back from the backend; the connection above created the reverse entry.
        let reply = Frame::new(l4, &format!("{backend}:{bport}"), client)
            .with_macs(BACKEND_MAC, LB_BACKEND_MAC);
        let reply_out = Frame::new(l4, &format!("{vip_nat}:{vport}"), client).with_macs(LB_CLIENT_MAC, CLIENT_MAC);
        cases.push(case(
            Box::leak(format!("NAT {proto}/IPv{fam}: backend reply is rewritten back to the VIP").into_boxed_str()),
            "fxb",
            reply.bytes(),
            Expect::Forward(XDP_REDIRECT, nat_name),
            Some(reply_out.bytes()),
        ));
        let dsr = Frame::new(l4, client, &format!("{vip_dsr}:{vport}"));
        cases.push(case(
            Box::leak(format!("DSR {proto}/IPv{fam}: only the MACs change").into_boxed_str()),
            "fxc",
            dsr.bytes(),
            Expect::Forward(XDP_REDIRECT, dsr_name),
            Some(dsr.clone().with_macs(LB_BACKEND_MAC, BACKEND_MAC).bytes()),
        ));
        cases.push(case(
            Box::leak(format!("DSR {proto}/IPv{fam}: backend on the ingress interface goes out by XDP_TX").into_boxed_str()),
            "fxb",
            dsr.bytes(),
            Expect::Forward(XDP_TX, dsr_name),
            Some(dsr.clone().with_macs(LB_BACKEND_MAC, BACKEND_MAC).bytes()),
        ));
    }
    cases
}

fn set_ipv4_byte(mut frame: Vec<u8>, offset: usize, value: u8) -> Vec<u8> {
    frame[L3 + offset] = value;
    frame
}

/// New flows from sources no client can have are dropped before any scheduler sees them: the
/// backends would drop them as martians, and the SYNs nobody answers would make the passive checks
/// take healthy backends out (the spoofing that took a whole service down).
fn martian_source_cases() -> Vec<Case> {
    let v4 = ["0.0.0.0", "0.1.2.3", "127.0.0.1", "127.1.2.3", "224.0.0.9", "239.1.1.1", "240.0.0.1", "255.255.255.255", "169.254.1.1", "10.200.100.100"];
    let v6 = ["::", "::1", "fe80::1", "febf::9", "ff02::1", "ff0e::9", "fd00:200:100::100"];
    let mut cases = Vec::new();
    for (src, vip) in v4.iter().map(|s| (*s, "10.200.100.100")).chain(v6.iter().map(|s| (*s, "[fd00:200:100::100]"))) {
        let src_port = if src.contains(':') { format!("[{src}]:40010") } else { format!("{src}:40010") };
        for (l4, port, what) in [(L4::Tcp, 80, "SYN"), (L4::Udp, 53, "UDP")] {
            let frame = Frame::new(l4, &src_port, &format!("{vip}:{port}")).with_tcp_flags(TCP_SYN);
            let name: &'static str = Box::leak(format!("{what} from {src} to a NAT VIP is dropped as a martian source").into_boxed_str());
            cases.push(case(name, "fxc", frame.bytes(), Expect::NotForwarded(XDP_DROP, "drop_martian_source"), None));
        }
    }
    let dsr = Frame::new(L4::Tcp, "127.0.0.1:40010", "10.200.100.101:80").with_tcp_flags(TCP_SYN);
    cases.push(case("SYN from 127.0.0.1 to a DSR VIP is dropped as a martian source", "fxc", dsr.bytes(), Expect::NotForwarded(XDP_DROP, "drop_martian_source"), None));
    // Not a RST to 127.0.0.1 either: the source check comes before the no-backend answer.
    let empty = Frame::new(L4::Tcp, "224.0.0.9:40010", "10.200.100.102:80").with_tcp_flags(TCP_SYN);
    cases.push(case("SYN from 224.0.0.9 to a service without backends is dropped, not answered", "fxc", empty.bytes(), Expect::NotForwarded(XDP_DROP, "drop_martian_source"), None));
    // The edges of the refused ranges are clients like any other.
    for src in ["1.0.0.1", "126.255.255.255", "128.0.0.1", "223.255.255.255", "169.253.255.255", "169.255.0.1"] {
        let frame = Frame::new(L4::Tcp, &format!("{src}:40011"), "10.200.100.100:80").with_tcp_flags(TCP_SYN);
        let out = frame.clone().with_dst("10.201.0.2:8080").with_macs(LB_BACKEND_MAC, BACKEND_MAC).bytes();
        let name: &'static str = Box::leak(format!("SYN from {src} (next to a refused range) is forwarded").into_boxed_str());
        cases.push(case(name, "fxc", frame.bytes(), Expect::Forward(XDP_REDIRECT, "nat4-tcp"), Some(out)));
    }
    cases
}

fn special_cases() -> Vec<Case> {
    let tcp = Frame::new(L4::Tcp, "10.200.0.2:40001", "10.200.100.100:80");
    let udp = Frame::new(L4::Udp, "10.200.0.2:40001", "10.200.100.100:53");
    let mut udp_no_checksum = udp.bytes();
    udp_no_checksum[L3 + 20 + 6..L3 + 20 + 8].copy_from_slice(&[0, 0]);
    let mut udp_no_checksum_out =
        udp.clone().with_dst("10.201.0.2:5353").with_macs(LB_BACKEND_MAC, BACKEND_MAC).bytes();
    udp_no_checksum_out[L3 + 20 + 6..L3 + 20 + 8].copy_from_slice(&[0, 0]);

    let mut first_fragment = tcp.bytes();
    first_fragment[L3 + 6] |= 0x20; // more fragments
    let mut later_fragment = tcp.bytes();
    later_fragment[L3 + 7] = 0x10; // offset 16 × 8 bytes
    let mut ipv6_hop_by_hop = Frame::new(L4::Tcp, "[fd00:200::2]:40001", "[fd00:200:100::100]:80").bytes();
    ipv6_hop_by_hop[L3 + 6] = 0; // next header: hop-by-hop options
    let mut unknown_ethertype = tcp.bytes();
    unknown_ethertype[12..14].copy_from_slice(&[0x88, 0xb5]);
    let mut bare_vlan = tcp.bytes()[..14].to_vec();
    bare_vlan[12..14].copy_from_slice(&[0x81, 0x00]);
    let tcp_bytes = tcp.bytes();
    let truncated_tcp = tcp_bytes[..L3 + 20 + 10].to_vec();
    let truncated_udp = udp.bytes()[..L3 + 20 + 6].to_vec();
    let empty_syn = Frame::new(L4::Tcp, "10.200.0.2:40002", "10.200.100.102:80").with_tcp_flags(TCP_SYN).with_payload(&[]);
    let empty_syn6 = Frame::new(L4::Tcp, "[fd00:200::2]:40002", "[fd00:200:100::102]:80").with_tcp_flags(TCP_SYN).with_payload(&[]);
    let empty_syn_data = Frame::new(L4::Tcp, "10.200.0.2:40003", "10.200.100.102:80").with_tcp_flags(TCP_SYN);
    let empty_ack = Frame::new(L4::Tcp, "10.200.0.2:40004", "10.200.100.102:80").with_tcp_flags(TCP_ACK);
    let empty_fin6 = Frame::new(L4::Tcp, "[fd00:200::2]:40004", "[fd00:200:100::102]:80").with_tcp_flags(TCP_FIN | TCP_ACK);
    let mut truncated_ipv4 = tcp_bytes[..L3 + 12].to_vec();
    truncated_ipv4.resize(L3 + 12, 0);

    vec![
        case("UDP with no checksum (0) keeps it 0 after NAT", "fxc", udp_no_checksum, Expect::Forward(XDP_REDIRECT, "nat4-udp"), Some(udp_no_checksum_out)),
        case(
            "NAT with an unresolved backend neighbour: translated, handed to the kernel",
            "fxc",
            Frame::new(L4::Tcp, "10.200.0.2:40002", "10.200.100.103:80").bytes(),
            Expect::PassTranslated("pass_fib_no_neigh"),
            Some(Frame::new(L4::Tcp, "10.200.0.2:40002", "10.201.0.9:8080").bytes()),
        ),
        case("DSR with an unresolved backend neighbour is dropped", "fxc", Frame::new(L4::Tcp, "10.200.0.2:40002", "10.200.100.104:80").bytes(), Expect::NotForwarded(XDP_DROP, "drop_dsr_no_neigh"), None),
        // A service without backends answers TCP with a RST (RFC 793's reply for a closed port):
        // the client fails at once instead of retransmitting its SYN until its connect timeout.
        case("SYN to a service without backends: RST|ACK of seq + 1, sent back (IPv4)", "fxc", empty_syn.bytes(), Expect::Reject, Some(tcp_rst(&empty_syn, 0, Some(SEQ + 1)))),
        case("SYN to a service without backends: RST|ACK of seq + 1, sent back (IPv6)", "fxc", empty_syn6.bytes(), Expect::Reject, Some(tcp_rst(&empty_syn6, 0, Some(SEQ + 1)))),
        case("SYN with data to a service without backends: acknowledged past the data, data cut off", "fxc", empty_syn_data.bytes(), Expect::Reject, Some(tcp_rst(&empty_syn_data, 0, Some(SEQ + 1 + 18)))),
        case("segment with ACK to a service without backends: RST in the peer's sequence space (IPv4)", "fxc", empty_ack.bytes(), Expect::Reject, Some(tcp_rst(&empty_ack, ACK_SEQ, None))),
        case("FIN|ACK with data to a service without backends: RST in the peer's sequence space (IPv6)", "fxc", empty_fin6.bytes(), Expect::Reject, Some(tcp_rst(&empty_fin6, ACK_SEQ, None))),
        case("RST to a service without backends is dropped, never answered", "fxc", empty_syn.clone().with_tcp_flags(TCP_RST).bytes(), Expect::NotForwarded(XDP_DROP, "drop_no_backend"), None),
        case("UDP to a service without backends is dropped", "fxc", Frame::new(L4::Udp, "10.200.0.2:40002", "10.200.100.102:53").bytes(), Expect::NotForwarded(XDP_DROP, "drop_no_backend"), None),
        case("VLAN-tagged SYN to a service without backends is left to the kernel", "fxc", empty_syn.clone().with_vlan(7).bytes(), Expect::NotForwarded(XDP_PASS, "pass_vlan"), None),
        case("TCP to a non-VIP address passes", "fxc", tcp.clone().with_dst("10.200.0.1:22").bytes(), Expect::NotForwarded(XDP_PASS, "pass_not_vip"), None),
        case("TCP to the VIP on another port passes", "fxc", tcp.clone().with_dst("10.200.100.100:81").bytes(), Expect::NotForwarded(XDP_PASS, "pass_not_vip"), None),
        case("UDP to the TCP-only VIP port passes", "fxc", Frame::new(L4::Udp, "10.200.0.2:40001", "10.200.100.100:80").bytes(), Expect::NotForwarded(XDP_PASS, "pass_not_vip"), None),
        case("IPv6 TCP to a non-VIP address passes", "fxc", Frame::new(L4::Tcp, "[fd00:200::2]:40001", "[fd00:200::1]:22").bytes(), Expect::NotForwarded(XDP_PASS, "pass_not_vip"), None),
        case("VLAN-tagged TCP to the VIP is left to the kernel", "fxc", tcp.clone().with_vlan(7).bytes(), Expect::NotForwarded(XDP_PASS, "pass_vlan"), None),
        case("VLAN-tagged IPv6 TCP to the VIP is left to the kernel", "fxc", Frame::new(L4::Tcp, "[fd00:200::2]:40001", "[fd00:200:100::100]:80").with_vlan(7).bytes(), Expect::NotForwarded(XDP_PASS, "pass_vlan"), None),
        case("VLAN-tagged TCP to a non-VIP passes", "fxc", tcp.clone().with_dst("10.200.0.1:22").with_vlan(7).bytes(), Expect::NotForwarded(XDP_PASS, "pass_not_vip"), None),
        case("ARP passes", "fxc", arp_request([10, 200, 0, 1]), Expect::NotForwarded(XDP_PASS, "pass_not_ip"), None),
        case("unknown ethertype passes", "fxc", unknown_ethertype, Expect::NotForwarded(XDP_PASS, "pass_not_ip"), None),
        case("ICMP echo to the VIP passes", "fxc", icmp_echo("10.200.0.2", "10.200.100.100"), Expect::NotForwarded(XDP_PASS, "pass_not_tcp_udp"), None),
        case("ICMPv6 echo to the VIP passes", "fxc", icmp_echo("fd00:200::2", "fd00:200:100::100"), Expect::NotForwarded(XDP_PASS, "pass_not_tcp_udp"), None),
        case("IPv6 with a hop-by-hop header passes", "fxc", ipv6_hop_by_hop, Expect::NotForwarded(XDP_PASS, "pass_ipv6_ext_header"), None),
        case("first IPv4 fragment to the VIP passes", "fxc", first_fragment, Expect::NotForwarded(XDP_PASS, "pass_fragment"), None),
        case("later IPv4 fragment to the VIP passes", "fxc", later_fragment, Expect::NotForwarded(XDP_PASS, "pass_fragment"), None),
        case("IPv4 with IHL < 5 is dropped", "fxc", set_ipv4_byte(tcp.bytes(), 0, 0x44), Expect::NotForwarded(XDP_DROP, "drop_bad_ip_header"), None),
        case("IPv4 whose IHL reaches past the frame is dropped", "fxc", set_ipv4_byte(truncated_tcp.clone(), 0, 0x4f), Expect::NotForwarded(XDP_DROP, "drop_bad_ip_header"), None),
        case("IPv4 header cut short is dropped", "fxc", truncated_ipv4, Expect::NotForwarded(XDP_DROP, "drop_bad_ip_header"), None),
        case("truncated TCP header to the VIP is dropped", "fxc", truncated_tcp, Expect::NotForwarded(XDP_DROP, "drop_truncated_l4"), None),
        case("truncated UDP header to the VIP is dropped", "fxc", truncated_udp, Expect::NotForwarded(XDP_DROP, "drop_truncated_l4"), None),
        case("VLAN tag cut short is dropped", "fxc", bare_vlan, Expect::NotForwarded(XDP_DROP, "drop_short_frame"), None),
    ]
}

#[test]
fn fixtures() {
    let ns = fixture_namespace();
    ns.run(|| {
        let harness = Harness::new(CONFIG);
        let mut cases = forwarding_cases(false);
        cases.extend(forwarding_cases(true));
        cases.extend(special_cases());
        cases.extend(martian_source_cases());
        let mut failures = Vec::new();
        for c in &cases {
            let reasons_before = harness.reasons();
            let service_before = match c.expect {
                Expect::Forward(_, service) => Some(harness.service_packets(service)),
                _ => None,
            };
            let (verdict, output) = harness.run(c.iface, &c.input);
            let reasons_after = harness.reasons();
            let moved: Vec<_> = reasons_after.iter().filter(|(k, v)| reasons_before[*k] != **v).map(|(k, _)| *k).collect();
            let expected_output = c.output.clone().unwrap_or_else(|| c.input.clone());
            let (want_verdict, want_moved): (u32, Vec<&str>) = match c.expect {
                Expect::Forward(v, _) => (v, vec![]),
                Expect::NotForwarded(v, reason) => (v, vec![reason]),
                Expect::PassTranslated(reason) => (XDP_PASS, vec![reason]),
                Expect::Reject => (XDP_REDIRECT, vec!["reject_no_backend"]),
            };
            let mut problems = Vec::new();
            if verdict != want_verdict {
                problems.push(format!("verdict {verdict}, expected {want_verdict}"));
            }
            if output != expected_output {
                problems.push(format!("output differs:\n      got  {}\n      want {}", hex(&output), hex(&expected_output)));
            }
            if moved != want_moved {
                problems.push(format!("reason counters moved {moved:?}, expected {want_moved:?}"));
            }
            if let (Expect::Forward(_, service), Some((packets, _))) = (c.expect, service_before) {
                if harness.service_packets(service).0 != packets + 1 {
                    problems.push(format!("service {service} packet counter did not move"));
                }
            }
            if !problems.is_empty() {
                failures.push(format!("{}:\n    {}", c.name, problems.join("\n    ")));
            }
        }
        assert!(failures.is_empty(), "{} of {} fixtures failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    });
}

#[test]
fn established_flow_keeps_its_backend_and_counts_one_new_flow() {
    let ns = fixture_namespace();
    ns.run(|| {
        let harness = Harness::new(CONFIG);
        let syn = Frame::new(L4::Tcp, "10.200.0.2:41000", "10.200.100.100:80").bytes();
        let (_, new_flows_before) = harness.service_packets("nat4-tcp");
        for _ in 0..5 {
            assert_eq!(harness.run("fxc", &syn).0, XDP_REDIRECT);
        }
        let (_, new_flows_after) = harness.service_packets("nat4-tcp");
        assert_eq!(new_flows_after - new_flows_before, 1, "five packets of one flow are one new flow");
    });
}

/// The forward path no longer looks at a NAT flow's reply entry on every packet, so a reply whose
/// entry was evicted (the two tables evict independently) must find its flow on its own: through its
/// backend and the flow's connection entry. Before, it passed untranslated (`pass_not_vip`) until
/// the client's next packet wrote the entry back — and the client reset the connection meanwhile.
#[test]
fn a_reply_whose_entry_was_evicted_is_translated_and_writes_it_back() {
    let ns = fixture_namespace();
    ns.run(|| {
        let mut harness = Harness::new(CONFIG);
        let (client, backend) = ("10.200.0.2:41002", "10.201.0.2:8080");
        let syn = Frame::new(L4::Tcp, client, "10.200.100.100:80").with_tcp_flags(TCP_SYN).bytes();
        assert_eq!(harness.run("fxc", &syn).0, XDP_REDIRECT);
        let reply_key = |client: &str| {
            let (c, b): (std::net::SocketAddr, std::net::SocketAddr) = (client.parse().unwrap(), backend.parse().unwrap());
            xdp_lb_common::maps::FlowKey {
                src: xdp_lb_common::addr::from_ip(b.ip()),
                dst: xdp_lb_common::addr::from_ip(c.ip()),
                sport: b.port().to_be(),
                dport: c.port().to_be(),
                proto: 6,
                _pad: [0; 3],
            }
        };
        assert!(harness.dataplane.evict_nat_reverse(&reply_key(client)), "the SYN wrote a reply entry");
        let syn_ack = |client: &str| {
            Frame::new(L4::Tcp, backend, client).with_tcp_flags(TCP_SYN | TCP_ACK).with_macs(BACKEND_MAC, LB_BACKEND_MAC)
        };
        let (verdict, out) = harness.run("fxb", &syn_ack(client).bytes());
        let want = Frame::new(L4::Tcp, "10.200.100.100:80", client).with_tcp_flags(TCP_SYN | TCP_ACK).with_macs(LB_CLIENT_MAC, CLIENT_MAC);
        assert_eq!((verdict, hex(&out)), (XDP_REDIRECT, hex(&want.bytes())), "the reply is translated back to the VIP");
        let entry = harness.dataplane.nat_reverse_entry(&reply_key(client)).expect("the reply entry is back");
        assert_eq!((entry.vport, entry.service_id), (80u16.to_be(), harness.service("nat4-tcp").id));
        // A packet from the same backend to a client port with no flow is still the kernel's.
        let reasons = harness.reasons();
        let stray = syn_ack("10.200.0.2:41003").bytes();
        assert_eq!(harness.run("fxb", &stray), (XDP_PASS, stray.clone()));
        assert_eq!(harness.reasons()["pass_not_vip"], reasons["pass_not_vip"] + 1);
        assert!(harness.dataplane.nat_reverse_entry(&reply_key("10.200.0.2:41003")).is_none());
    });
}

#[test]
fn frames_shorter_than_ethernet_are_refused_or_dropped_never_aborted() {
    let ns = fixture_namespace();
    ns.run(|| {
        let harness = Harness::new(CONFIG);
        for len in [0usize, 1, 13] {
            let input = vec![0u8; len];
            let mut ctx = [0u32; 6];
            ctx[1] = len as u32;
            ctx[3] = harness.ifindex["fxc"];
            let ctx_bytes: Vec<u8> = ctx.iter().flat_map(|w| w.to_ne_bytes()).collect();
            let mut out = vec![0u8; 64];
            // The kernel itself refuses test frames shorter than an Ethernet header (EINVAL); if it
            // ever accepts one, the program must drop it.
            if let Ok(r) = harness.dataplane.program().test_run(TestRunOptions {
                data_in: Some(&input),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx_bytes),
                ..Default::default()
            }) {
                assert_eq!(r.return_value, XDP_DROP, "{len}-byte frame");
            }
        }
    });
}

/// A SYN from the backend's own address reaches the backend (a backend may be a client of another
/// backend's service; this one is not) but is no evidence for the passive checks: the backend's
/// kernel drops it as a martian, so it can never be answered.
#[test]
fn a_syn_from_the_backends_own_address_is_not_counted_for_passive_checks() {
    let ns = fixture_namespace();
    ns.run(|| {
        let harness = Harness::new(CONFIG);
        let (_, before) = harness.backend("nat4-tcp", "10.201.0.2:8080");
        let spoofed = Frame::new(L4::Tcp, "10.201.0.2:40020", "10.200.100.100:80").with_tcp_flags(TCP_SYN).with_payload(&[]);
        assert_eq!(harness.run("fxc", &spoofed.bytes()).0, XDP_REDIRECT);
        let (_, after) = harness.backend("nat4-tcp", "10.201.0.2:8080");
        assert_eq!(after.syns, before.syns, "a SYN from the backend itself was counted");
        let real = Frame::new(L4::Tcp, "10.200.0.2:40020", "10.200.100.100:80").with_tcp_flags(TCP_SYN).with_payload(&[]);
        assert_eq!(harness.run("fxc", &real.bytes()).0, XDP_REDIRECT);
        let (_, after) = harness.backend("nat4-tcp", "10.201.0.2:8080");
        assert_eq!(after.syns, before.syns + 1, "a client's SYN must count");
    });
}

/// Least-conn with every backend idle: sequential short connections (SYN, then RST, so never more
/// than one open) spread over the tied backends instead of all landing on the first listed.
#[test]
fn least_conn_spreads_sequential_connections_over_tied_backends() {
    let ns = fixture_namespace();
    ns.run(|| {
        let harness = Harness::new(CONFIG);
        let mut landed: BTreeMap<[u8; 4], u32> = BTreeMap::new();
        for port in 0..60u16 {
            let client = format!("10.200.0.2:{}", 42000 + port);
            let syn = Frame::new(L4::Tcp, &client, "10.200.100.105:80").with_tcp_flags(TCP_SYN).with_payload(&[]);
            let (verdict, out) = harness.run("fxc", &syn.bytes());
            assert_eq!(verdict, XDP_REDIRECT, "SYN {port}");
            // The translated destination address: the chosen backend.
            let backend: [u8; 4] = out[L3 + 16..L3 + 20].try_into().unwrap();
            *landed.entry(backend).or_default() += 1;
            let rst = Frame::new(L4::Tcp, &client, "10.200.100.105:80").with_tcp_flags(TCP_RST).with_payload(&[]);
            assert_eq!(harness.run("fxc", &rst.bytes()).0, XDP_REDIRECT, "RST {port}");
        }
        for last in [2u8, 3, 4] {
            let bucket = landed.get(&[10, 201, 0, last]).copied().unwrap_or(0);
            assert!(bucket >= 8, "10.201.0.{last}:8080 got {bucket} of 60 sequential connections: {landed:?}");
        }
    });
}
