//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016) with exact quotas, built as a pure
//! function of the candidates, the table size and a hash seed.
//!
//! Several balancer nodes behind router ECMP must send a flow to the same backend without sharing
//! state, so every node must compute the same table from the same configuration — whatever order it
//! lists the backends in and whatever changes it went through to get there. Hence no input here
//! depends on history (there is no "previous table"), candidates are sorted by their identity before
//! anything else looks at them, and the hashes are spelled out (FNV-1a and SplitMix64's finaliser),
//! never `DefaultHasher`, whose output may change between Rust releases.
//!
//! Each backend walks its own permutation of the table's slots (derived from a seeded hash of its
//! identity) and, in turn, claims its next preferred free slot. One refinement over the paper:
//! **quotas** — a backend stops claiming once it owns its share `size × weight / Σweights` (largest
//! remainder rounding), so shares are exact to one slot and proportional to weight. Minimal
//! disruption comes from Maglev's own property: when a backend leaves or joins, the others' preferred
//! slots stay where they were, so few of their slots move (measured in `tests.rs`,
//! `disruption_is_close_to_ideal`).

use std::net::SocketAddr;
use std::vec;
use std::vec::Vec;

/// The hash seed when the configuration names none. All nodes that announce one VIP must use the
/// same seed (any value, as long as it is the same everywhere).
pub const DEFAULT_SEED: u64 = 0;

/// A backend as Maglev sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Stable identity (see [`identity`]): decides the backend's permutation and its place in the
    /// candidates' canonical order, so it must be the same on every node.
    pub identity: &'a [u8],
    /// Relative share of the table; 0 means "no new flows" (and the candidate plays no part).
    pub weight: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum MaglevError {
    NotPrime(u32),
}

impl core::fmt::Display for MaglevError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MaglevError::NotPrime(n) => write!(f, "Maglev table size {n} is not a prime ≥ 3"),
        }
    }
}

impl core::error::Error for MaglevError {}

/// Bytes of an [`identity`]: 16 address bytes and 2 port bytes.
pub const IDENTITY_LEN: usize = 18;

/// A backend's identity: its address in the data plane's 16-byte layout (IPv4 as `::ffff:a.b.c.d`)
/// followed by its port, both in network order. Fixed-width bytes, not text, so no formatting choice
/// (`[::1]:80` vs `[0::1]:80`) can make two nodes disagree.
pub fn identity(address: SocketAddr) -> [u8; IDENTITY_LEN] {
    let mut out = [0u8; IDENTITY_LEN];
    out[..16].copy_from_slice(&crate::addr::to_bytes(&crate::addr::from_ip(address.ip())));
    out[16..].copy_from_slice(&address.port().to_be_bytes());
    out
}

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    if n.is_multiple_of(2) {
        return n == 2;
    }
    let mut d = 3u32;
    while (d as u64) * (d as u64) <= n as u64 {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 2;
    }
    true
}

/// Builds a table of `size` slots, each holding an index into `candidates`.
///
/// The table, read as identities (`candidates[slot].identity`), depends only on the set of
/// candidates with a positive weight, `size` and `seed`: not on the candidates' order, and not on
/// candidates of weight 0. Returns an empty table when no candidate has a positive weight.
pub fn build(candidates: &[Candidate<'_>], size: u32, seed: u64) -> Result<Vec<u32>, MaglevError> {
    if size < 3 || !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    let m = size as usize;
    // The canonical order: by identity, then weight (only equal identities, which a valid config
    // never has, need the tie-break). Everything below works on positions in this order.
    let mut order: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].weight > 0).collect();
    order.sort_by(|&a, &b| candidates[a].identity.cmp(candidates[b].identity).then(candidates[a].weight.cmp(&candidates[b].weight)));
    if order.is_empty() {
        return Ok(Vec::new());
    }
    let weights: Vec<u32> = order.iter().map(|&i| candidates[i].weight).collect();
    let quotas = quotas(&weights, size);

    let (offset_seed, skip_seed) = (mix64(seed ^ 0x5eed_0ff5), mix64(seed ^ 0x5eed_5c1b));
    let perms: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let id = candidates[i].identity;
            (identity_hash(id, offset_seed) % m as u64, identity_hash(id, skip_seed) % (m as u64 - 1) + 1)
        })
        .collect();

    const FREE: u32 = u32::MAX;
    let mut table = vec![FREE; m];
    let mut owned = vec![0u32; order.len()];
    let mut next = vec![0u64; order.len()];
    let mut filled = 0usize;
    // Quotas sum to `size`, and every permutation visits every slot (skip is coprime with a prime
    // size), so while a slot is free some backend below quota will find it.
    while filled < m {
        for k in 0..order.len() {
            if owned[k] >= quotas[k] {
                continue;
            }
            let (offset, skip) = perms[k];
            loop {
                let slot = ((offset + next[k] * skip) % m as u64) as usize;
                next[k] += 1;
                if table[slot] == FREE {
                    table[slot] = order[k] as u32;
                    owned[k] += 1;
                    filled += 1;
                    break;
                }
            }
            if filled == m {
                break;
            }
        }
    }
    Ok(table)
}

/// Each weight's exact share of `size` slots, by largest remainder; ties go to the earlier position
/// (the canonical order, so every node breaks them alike). Weights are all positive.
fn quotas(weights: &[u32], size: u32) -> Vec<u32> {
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    let exact: Vec<(u64, u64)> = weights.iter().map(|&w| ((w as u64 * size as u64) / total, (w as u64 * size as u64) % total)).collect();
    let mut quotas: Vec<u32> = exact.iter().map(|&(q, _)| q as u32).collect();
    let left = size as u64 - exact.iter().map(|&(q, _)| q).sum::<u64>();
    // Fewer slots are left than there are weights (each remainder is below one slot).
    let mut by_remainder: Vec<usize> = (0..weights.len()).collect();
    by_remainder.sort_by(|&a, &b| exact[b].1.cmp(&exact[a].1).then(a.cmp(&b)));
    for &k in by_remainder.iter().take(left as usize) {
        quotas[k] += 1;
    }
    quotas
}

/// A stable 64-bit fingerprint of a table read as identities, one per slot in slot order (e.g.
/// [`identity`] of the backend each slot names). Two nodes whose rings send every slot to the same
/// backends have the same fingerprint, whatever internal ids their backends have; a different
/// backend in any slot, or a different size, changes it (up to 64-bit hash collisions).
pub fn fingerprint<I: AsRef<[u8]>>(cells: &[I]) -> u64 {
    // A chain of a bijective mixer over per-cell hashes: order-sensitive, and cheap enough for a
    // ring of 65,537 slots at every install.
    let mut h = mix64(cells.len() as u64 ^ 0xf1f0_9e1d_0000_0000);
    for cell in cells {
        h = mix64(h ^ identity_hash(cell.as_ref(), 0xf1f0_c311));
    }
    h
}

/// FNV-1a over the identity, seeded, then SplitMix64's finaliser: stable across Rust versions.
fn identity_hash(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix64(h)
}

/// SplitMix64's finaliser: a bijection on u64 that spreads every input bit over the output.
fn mix64(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests;
