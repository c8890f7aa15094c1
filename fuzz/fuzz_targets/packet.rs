//! The data plane's parser and rewriter (`xdp_lb_common::packet`, the code the XDP program runs)
//! over arbitrary frames, judged by the test suite's independent parse contract:
//! - `parse` gives exactly the contract's verdict: the same reason for a frame it refuses, the same
//!   fields for a frame it accepts (and etherparse agrees wherever it reads the frame as plain
//!   Ethernet + IP + TCP/UDP);
//! - no access strays outside a bounds-checked window or is misaligned (`SliceFrame` asserts both:
//!   in the kernel such an access is a verifier rejection);
//! - the RST refusing a segment (`tcp_reset`) is well formed, and a frame it refuses is untouched;
//! - NAT rewriting of either end plus the MAC rewrite changes only those fields and their checksums,
//!   keeps every checksum exactly as right or wrong as it was, and keeps a zero UDP checksum zero.
#![no_main]

#[path = "../../xdp-lb/tests/fixtures/contract.rs"]
mod contract;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use arbitrary::Arbitrary;
use contract::{check_output, cross_check, parse_contract, End as ContractEnd, L4Info, Parsed};
use libfuzzer_sys::fuzz_target;
use xdp_lb_common::{
    addr::{self, Addr},
    packet::{self, End, Packet, SliceFrame},
    reasons,
};

#[derive(Arbitrary, Debug)]
struct Input<'a> {
    rewrite_source: bool,
    new_addr: [u8; 16],
    new_port: u16,
    dmac: [u8; 6],
    smac: [u8; 6],
    /// The rest of the input, byte for byte (a `Vec` would interleave continuation bytes).
    frame: &'a [u8],
}

fn ip_of(a: &Addr, v6: bool) -> IpAddr {
    let bytes = addr::to_bytes(a);
    if v6 {
        IpAddr::V6(Ipv6Addr::from(bytes))
    } else {
        assert!(addr::is_v4_mapped(a), "IPv4 address not kept in mapped form: {a:?}");
        IpAddr::V4(Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]))
    }
}

fn is_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_some())
}

/// The parsed packet must be exactly what the contract read.
fn check_fields(frame: &[u8], p: &Packet, i: &L4Info) {
    let got = (
        p.vlan,
        p.ipv6,
        p.l3_offset,
        p.l4_offset,
        p.flow.proto,
        ip_of(&p.flow.src, p.ipv6),
        ip_of(&p.flow.dst, p.ipv6),
        u16::from_be(p.flow.sport),
        u16::from_be(p.flow.dport),
        p.ip_len as usize,
        p.len as usize,
    );
    let want = (i.vlan, i.v6, i.l3, i.l4, i.proto, i.src, i.dst, i.sport, i.dport, i.ip_len, frame.len());
    assert_eq!(got, want, "parsed fields (left) differ from the contract's (right)");
    let flags = if i.proto == contract::PROTO_TCP { frame[i.l4 + 13] } else { 0 };
    assert_eq!(p.tcp_flags, flags, "TCP flags");
    assert_eq!(p.flow._pad, [0; 3], "flow key padding must be zero: it is hashed and compared as bytes");
}

fuzz_target!(|input: Input| {
    let original = input.frame.to_vec();
    let mut bytes = original.clone();
    let parsed = packet::parse(&SliceFrame::new(&mut bytes));
    assert_eq!(bytes, original, "parsing wrote to the frame");
    let contract = parse_contract(&original);
    if let Err(e) = cross_check(&original, &contract) {
        panic!("the contract disagrees with etherparse: {e}");
    }
    let info = match (&contract, parsed) {
        (Parsed::L4(i), _) if i.v6 && (is_mapped(i.src) || is_mapped(i.dst)) => {
            assert_eq!(parsed, Err(reasons::PASS_NOT_VIP), "IPv6 with an IPv4-mapped address must not be balanced");
            return;
        }
        (Parsed::L4(i), Ok(p)) => {
            check_fields(&original, &p, i);
            (i.clone(), p)
        }
        (other, Ok(p)) => panic!("parsed {p:?}, the contract says {other:?}"),
        (other, Err(reason)) => {
            assert_eq!(Some(reasons::NAMES[reason as usize]), other.reason(), "reason for {other:?}");
            return;
        }
    };
    let (i, p) = info;

    // Refusing the segment with a RST (a service without backends): a refused frame is untouched,
    // an answered one is headers only, addresses and ports swapped, both checksums right.
    let mut rst = original.clone();
    match packet::tcp_reset(&mut SliceFrame::new(&mut rst), &p) {
        Err(_) => assert_eq!(rst, original, "a frame refused a RST was changed"),
        Ok(len) => {
            assert_eq!(len, i.l4 + 20, "RST length");
            rst.truncate(len);
            let Parsed::L4(o) = parse_contract(&rst) else { panic!("the RST does not parse: {rst:02x?}") };
            assert_eq!((o.src, o.dst, o.sport, o.dport), (i.dst, i.src, i.dport, i.sport), "RST addresses and ports");
            assert_eq!(contract::checksums_valid(&rst, &o), Some((true, true)), "RST checksums: {rst:02x?}");
        }
    }

    // Rewrite one end (to an address of the packet's family) and the MACs, as the data plane does.
    let new_ip = if i.v6 {
        let a = Ipv6Addr::from(input.new_addr);
        if a.to_ipv4_mapped().is_some() {
            return; // never configured: the control plane refuses mixed-family services
        }
        IpAddr::V6(a)
    } else {
        IpAddr::V4(Ipv4Addr::new(input.new_addr[12], input.new_addr[13], input.new_addr[14], input.new_addr[15]))
    };
    let new_addr = match new_ip {
        IpAddr::V4(a) => addr::from_bytes(a.to_ipv6_mapped().octets()),
        IpAddr::V6(a) => addr::from_bytes(a.octets()),
    };
    let (end, contract_end) =
        if input.rewrite_source { (End::Source, ContractEnd::Src) } else { (End::Destination, ContractEnd::Dst) };
    let mut out = original.clone();
    let mut frame = SliceFrame::new(&mut out);
    packet::translate(&mut frame, &p, end, &new_addr, input.new_port.to_be()).expect("translating a parsed packet");
    packet::set_macs(&mut frame, &input.dmac, &input.smac).expect("setting the MACs of a parsed packet");
    if let Err(e) = check_output(&original, &out, &i, Some((input.dmac, input.smac)), Some((contract_end, new_ip, input.new_port))) {
        panic!("rewrite of {end:?} to {new_ip}:{}: {e}", input.new_port);
    }
});
