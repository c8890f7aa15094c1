//! Incremental checksum updates (what the XDP program does on NAT/DSR rewrites) must equal a full
//! recomputation over the rewritten packet, modulo one's complement's two zeros.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xdp_lb_common::{
    addr::{from_bytes, from_v4_word},
    checksum::{ipv4_header, l4_ipv4, l4_ipv6, udp_finish, update_addr, update_u16, update_u32},
};

#[derive(Arbitrary, Debug)]
struct Input {
    v6: bool,
    udp: bool,
    /// IPv4 only: update addresses as mapped 128-bit values (`update_addr`) instead of words.
    mapped: bool,
    /// IPv4 UDP only: the sender left the checksum out (0), which must stay 0.
    no_udp_checksum: bool,
    src: [u8; 16],
    dst: [u8; 16],
    new_src: [u8; 16],
    new_dst: [u8; 16],
    sport: u16,
    dport: u16,
    new_sport: u16,
    new_dport: u16,
    /// IPv4 header bytes (options included: `ihl_extra` 32-bit words of them).
    ip_header: [u8; 60],
    ihl_extra: u8,
    /// One more 16-bit header word to rewrite (index into the header's words, never the checksum).
    ip_word: u8,
    ip_word_value: u16,
    /// L4 header bytes after the ports, then the payload.
    segment: Vec<u8>,
}

fn same_checksum(a: u16, b: u16) -> bool {
    a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
}

/// A big-endian value as the data plane loads it from packet memory.
fn native16(be: u16) -> u16 {
    u16::from_ne_bytes(be.to_be_bytes())
}

fn wire(native: u16) -> u16 {
    u16::from_be_bytes(native.to_ne_bytes())
}

fn v4(a: &[u8; 16]) -> [u8; 4] {
    [a[12], a[13], a[14], a[15]]
}

fn l4(input: &Input, src: &[u8; 16], dst: &[u8; 16], proto: u8, seg: &[u8]) -> u16 {
    if input.v6 {
        l4_ipv6(*src, *dst, proto, seg)
    } else {
        l4_ipv4(v4(src), v4(dst), proto, seg)
    }
}

fn addr_update(input: &Input, check: u16, old: &[u8; 16], new: &[u8; 16]) -> u16 {
    if input.v6 {
        update_addr(check, &from_bytes(*old), &from_bytes(*new))
    } else if input.mapped {
        let (o, n) = (u32::from_ne_bytes(v4(old)), u32::from_ne_bytes(v4(new)));
        update_addr(check, &from_v4_word(o), &from_v4_word(n))
    } else {
        update_u32(check, u32::from_ne_bytes(v4(old)), u32::from_ne_bytes(v4(new)))
    }
}

fuzz_target!(|input: Input| {
    // --- L4 checksum over the pseudo-header: rewrite both addresses and both ports. ---
    let (proto, check_at, header_len) = if input.udp { (17u8, 6usize, 8usize) } else { (6, 16, 20) };
    let mut seg = vec![0u8; header_len];
    let tail = input.segment.len().min(4096);
    seg.extend_from_slice(&input.segment[..tail]);
    for (i, b) in input.segment.iter().take(header_len - 4).enumerate() {
        seg[4 + i] = *b;
    }
    seg[0..2].copy_from_slice(&input.sport.to_be_bytes());
    seg[2..4].copy_from_slice(&input.dport.to_be_bytes());
    if input.udp {
        let len = seg.len() as u16;
        seg[4..6].copy_from_slice(&len.to_be_bytes());
    }
    seg[check_at..check_at + 2].copy_from_slice(&[0, 0]);

    let computed = l4(&input, &input.src, &input.dst, proto, &seg);
    // What the sender put on the wire: UDP sends a computed 0 as 0xffff; IPv4 UDP may send none (0).
    let on_wire = if input.udp && !input.v6 && input.no_udp_checksum {
        0
    } else if input.udp && computed == 0 {
        0xffff
    } else {
        computed
    };

    let original = native16(on_wire);
    let mut check = original;
    check = addr_update(&input, check, &input.src, &input.new_src);
    check = addr_update(&input, check, &input.dst, &input.new_dst);
    check = update_u16(check, native16(input.sport), native16(input.new_sport));
    check = update_u16(check, native16(input.dport), native16(input.new_dport));
    if input.udp {
        check = udp_finish(original, check);
    }
    let incremental = wire(check);

    seg[0..2].copy_from_slice(&input.new_sport.to_be_bytes());
    seg[2..4].copy_from_slice(&input.new_dport.to_be_bytes());
    let full = l4(&input, &input.new_src, &input.new_dst, proto, &seg);

    if input.udp && on_wire == 0 {
        assert_eq!(incremental, 0, "IPv4 UDP without checksum must stay without one");
    } else if input.udp {
        assert_ne!(incremental, 0, "a UDP checksum must never become 0 (\"none\")");
        let expected = if full == 0 { 0xffff } else { full };
        assert!(same_checksum(incremental, expected), "UDP: incremental {incremental:#06x}, full {full:#06x}");
    } else {
        assert!(same_checksum(incremental, full), "TCP: incremental {incremental:#06x}, full {full:#06x}");
    }

    // --- IPv4 header checksum: rewrite the addresses and one more 16-bit word (TTL/protocol, id...). ---
    let len = 20 + 4 * (input.ihl_extra as usize % 11);
    let mut h = input.ip_header[..len].to_vec();
    h[10..12].copy_from_slice(&[0, 0]);
    h[12..16].copy_from_slice(&v4(&input.src));
    h[16..20].copy_from_slice(&v4(&input.dst));
    let before = ipv4_header(&h);
    let mut check = native16(before);
    check = update_u32(check, u32::from_ne_bytes(v4(&input.src)), u32::from_ne_bytes(v4(&input.new_src)));
    check = update_u32(check, u32::from_ne_bytes(v4(&input.dst)), u32::from_ne_bytes(v4(&input.new_dst)));
    let mut word = input.ip_word as usize % (len / 2);
    if word == 5 {
        word = 4; // the checksum itself is not a field to rewrite
    }
    h[12..16].copy_from_slice(&v4(&input.new_src));
    h[16..20].copy_from_slice(&v4(&input.new_dst));
    // Read after the address rewrite: the word may be part of an address.
    let old = u16::from_be_bytes([h[2 * word], h[2 * word + 1]]);
    check = update_u16(check, native16(old), native16(input.ip_word_value));
    h[2 * word..2 * word + 2].copy_from_slice(&input.ip_word_value.to_be_bytes());
    let full = ipv4_header(&h);
    assert!(same_checksum(wire(check), full), "IPv4 header: incremental {:#06x}, full {full:#06x}", wire(check));
});
