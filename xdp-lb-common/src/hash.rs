//! Flow hashing. The XDP program and the control plane (`explain`, tests) must compute identical
//! values, so this is the one definition both use.

use crate::{addr::Addr, maps::FlowKey};

const SEED: u32 = 0x9747_b28c;

/// One MurmurHash3 (x86, 32-bit) block step.
#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let k = word.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

/// MurmurHash3's finaliser: every input bit affects every output bit.
#[inline(always)]
fn finish(mut h: u32, len_bytes: u32) -> u32 {
    h ^= len_bytes;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn mix_addr(h: u32, addr: &Addr) -> u32 {
    mix(mix(mix(mix(h, addr[0]), addr[1]), addr[2]), addr[3])
}

/// Hash of the whole 5-tuple: spreads a client's connections over all backends.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h = mix_addr(SEED, &key.src);
    h = mix_addr(h, &key.dst);
    h = mix(h, (key.sport as u32) | ((key.dport as u32) << 16));
    h = mix(h, key.proto as u32);
    finish(h, 40)
}

/// Hash of the client address alone (`ip-hash`): every connection of a client meets the same backend.
#[inline(always)]
pub fn client_hash(src: &Addr) -> u32 {
    finish(mix_addr(SEED, src), 16)
}

/// Least-conn's tie-break: among backends with equally few active flows the one with the lowest
/// rank wins. The rank mixes the backend's id with the new flow's hash (murmur3's finaliser), so
/// ties go to each tied backend about equally often rather than always to the first listed, and a
/// scan in list order stays a scan in list order (no data-dependent start, which the verifier
/// would have to follow along every path).
#[inline(always)]
pub fn tie_rank(backend_id: u32, flow_hash: u32) -> u32 {
    let mut x = backend_id ^ flow_hash;
    x ^= x >> 16;
    x = x.wrapping_mul(0x85eb_ca6b);
    x ^= x >> 13;
    x = x.wrapping_mul(0xc2b2_ae35);
    x ^ (x >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::from_v4_word;

    fn key(src: u32, sport: u16) -> FlowKey {
        FlowKey {
            src: from_v4_word(src),
            dst: from_v4_word(0x6400_000a),
            sport,
            dport: 80u16.to_be(),
            proto: 6,
            _pad: [0; 3],
        }
    }

    #[test]
    fn every_field_changes_the_hash() {
        let base = key(0x0201_000a, 1000);
        let h = flow_hash(&base);
        let mut k = base;
        k.src[3] ^= 1 << 24;
        assert_ne!(flow_hash(&k), h, "src");
        k = base;
        k.dst[3] ^= 1;
        assert_ne!(flow_hash(&k), h, "dst");
        k = base;
        k.sport ^= 1;
        assert_ne!(flow_hash(&k), h, "sport");
        k = base;
        k.dport ^= 1;
        assert_ne!(flow_hash(&k), h, "dport");
        k = base;
        k.proto = 17;
        assert_ne!(flow_hash(&k), h, "proto");
    }

    #[test]
    fn is_deterministic_and_client_hash_ignores_ports() {
        assert_eq!(flow_hash(&key(1, 2)), flow_hash(&key(1, 2)));
        assert_eq!(client_hash(&key(7, 1).src), client_hash(&key(7, 2).src));
    }

    /// 30,000 new flows from one client, every backend tied: each of three consecutive ids (as
    /// the tables hand them out) wins within 5 % of a third of the time, and so does each of four
    /// scattered ones.
    #[test]
    fn ties_are_shared_evenly() {
        for ids in [&[0u32, 1, 2][..], &[5, 6, 7], &[10, 20, 30, 40]] {
            let mut all_wins = [0u32; 4];
            let wins = &mut all_wins[..ids.len()];
            for port in 1024..31_024u16 {
                let h = flow_hash(&key(0x0201_000a, port.to_be()));
                let best = (0..ids.len()).min_by_key(|&i| tie_rank(ids[i], h)).unwrap();
                wins[best] += 1;
            }
            let fair = 30_000 / ids.len() as u32;
            for (i, w) in wins.iter().enumerate() {
                assert!(w.abs_diff(fair) <= fair / 20, "ids {ids:?}: {} won {w} of 30000: {wins:?}", ids[i]);
            }
        }
    }

    #[test]
    fn source_ports_spread_evenly_over_buckets() {
        // 60_000 connections from one client into 3 buckets: each within 2 % of a third.
        let mut buckets = [0u32; 3];
        for port in 1024..61_024u16 {
            buckets[(flow_hash(&key(0x0201_000a, port.to_be())) % 3) as usize] += 1;
        }
        for (i, b) in buckets.iter().enumerate() {
            assert!((19_600..=20_400).contains(b), "bucket {i} got {b}: {buckets:?}");
        }
    }
}
