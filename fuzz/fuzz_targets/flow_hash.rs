//! Flow hashing: deterministic, equal to MurmurHash3 (x86, 32-bit) over the key's 40 bytes (so the
//! XDP program and the control plane agree on every input), `client_hash` depends on the source
//! address alone, and source ports spread evenly over buckets.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xdp_lb_common::{
    addr::from_bytes,
    hash::{client_hash, flow_hash},
    maps::FlowKey,
};

const SEED: u32 = 0x9747_b28c;

/// Reference MurmurHash3_x86_32, written from the specification (little-endian blocks).
fn murmur3_32(data: &[u8], seed: u32) -> u32 {
    let (c1, c2) = (0xcc9e_2d51u32, 0x1b87_3593u32);
    let mut h = seed;
    let mut blocks = data.chunks_exact(4);
    for b in &mut blocks {
        let k = u32::from_le_bytes([b[0], b[1], b[2], b[3]]).wrapping_mul(c1).rotate_left(15).wrapping_mul(c2);
        h = (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
    }
    let tail = blocks.remainder();
    if !tail.is_empty() {
        let mut k = 0u32;
        for (i, &b) in tail.iter().enumerate() {
            k |= (b as u32) << (8 * i);
        }
        h ^= k.wrapping_mul(c1).rotate_left(15).wrapping_mul(c2);
    }
    h ^= data.len() as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[derive(Arbitrary, Debug)]
struct Input {
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
    other_sport: u16,
    other_dst: [u8; 16],
    buckets: u8,
    spread: bool,
}

/// The key as the XDP program lays it out in memory (repr(C), little-endian host).
fn key_bytes(k: &FlowKey) -> [u8; 40] {
    let mut b = [0u8; 40];
    for (i, w) in k.src.iter().chain(k.dst.iter()).enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    b[32..34].copy_from_slice(&k.sport.to_ne_bytes());
    b[34..36].copy_from_slice(&k.dport.to_ne_bytes());
    b[36] = k.proto;
    b
}

fuzz_target!(|input: Input| {
    let key = FlowKey {
        src: from_bytes(input.src),
        dst: from_bytes(input.dst),
        sport: input.sport,
        dport: input.dport,
        proto: input.proto,
        _pad: [0; 3],
    };
    let h = flow_hash(&key);
    assert_eq!(h, flow_hash(&key), "deterministic");
    if cfg!(target_endian = "little") {
        assert_eq!(h, murmur3_32(&key_bytes(&key), SEED), "flow_hash is MurmurHash3 of the key");
        assert_eq!(client_hash(&key.src), murmur3_32(&input.src, SEED), "client_hash is MurmurHash3 of the source");
    }
    let other = FlowKey { sport: input.other_sport, dst: from_bytes(input.other_dst), ..key };
    assert_eq!(client_hash(&key.src), client_hash(&other.src), "client_hash ignores ports and destination");
    // With every other field fixed, each mixing step is a bijection of the port word.
    if input.other_sport != input.sport {
        assert_ne!(flow_hash(&FlowKey { sport: input.other_sport, ..key }), h, "two source ports collide");
    }

    if input.spread {
        // Every source port of one client over k buckets: each within 10 % of its share (~10 σ).
        let k = 2 + input.buckets as u32 % 7;
        let mut counts = vec![0u32; k as usize];
        let mut port_key = key;
        for port in 0..=u16::MAX {
            port_key.sport = port;
            counts[(flow_hash(&port_key) % k) as usize] += 1;
        }
        let share = 65_536 / k;
        for (b, &c) in counts.iter().enumerate() {
            assert!(c.abs_diff(share) <= share / 10, "bucket {b} of {k} got {c} of 65536 ports: {counts:?}");
        }
    }
});
