//! Weighted Maglev lookup tables (Eisenbud et al., NSDI 2016) with exact quotas and stable rebuilds.
//!
//! Each backend walks its own permutation of the table's slots (derived from a hash of its identity)
//! and, in turn, claims its next preferred free slot. Two refinements over the paper:
//! - **Quotas.** A backend stops claiming once it owns its share `size × weight / Σweights` (largest
//!   remainder rounding), so shares are exact to one slot and proportional to weight.
//! - **Stable rebuilds.** Given the previous table, a surviving backend first keeps the slots it held
//!   (up to its new quota), and only the freed slots are handed out. Removing a backend therefore moves
//!   only the removed backend's slots; adding one takes only what the newcomer's quota needs.

use std::vec;
use std::vec::Vec;

/// A backend as Maglev sees it.
#[derive(Clone, Copy, Debug)]
pub struct Candidate<'a> {
    /// Stable identity (e.g. address and port bytes): decides the backend's permutation.
    pub identity: &'a [u8],
    /// Relative share of the table; 0 means "no new flows".
    pub weight: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum MaglevError {
    NotPrime(u32),
    PreviousSizeMismatch { expected: u32, got: usize },
    PreviousOwnerOutOfRange { slot: usize, owner: usize },
}


impl core::fmt::Display for MaglevError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MaglevError::NotPrime(n) => write!(f, "Maglev table size {n} is not a prime ≥ 3"),
            MaglevError::PreviousSizeMismatch { expected, got } => {
                write!(f, "previous table has {got} slots, expected {expected}")
            }
            MaglevError::PreviousOwnerOutOfRange { slot, owner } => {
                write!(f, "previous table slot {slot} names candidate {owner}, which does not exist")
            }
        }
    }
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
/// `previous`, if given, is the table being replaced with its owners already translated to indices
/// into `candidates` (`None` for slots whose backend is gone). Returns an empty table when no
/// candidate has a positive weight.
pub fn build(
    candidates: &[Candidate<'_>],
    size: u32,
    previous: Option<&[Option<usize>]>,
) -> Result<Vec<u32>, MaglevError> {
    if size < 3 || !is_prime(size) {
        return Err(MaglevError::NotPrime(size));
    }
    let m = size as usize;
    if let Some(prev) = previous {
        if prev.len() != m {
            return Err(MaglevError::PreviousSizeMismatch { expected: size, got: prev.len() });
        }
        if let Some((slot, owner)) =
            prev.iter().enumerate().find_map(|(s, o)| o.filter(|&o| o >= candidates.len()).map(|o| (s, o)))
        {
            return Err(MaglevError::PreviousOwnerOutOfRange { slot, owner });
        }
    }
    // Slots each candidate holds in the previous table: rounding favours keeping them.
    let mut held = vec![0u32; candidates.len()];
    for o in previous.into_iter().flatten().flatten() {
        held[*o] += 1;
    }
    let quotas = quotas(candidates, size, &held);
    if quotas.iter().all(|&q| q == 0) {
        return Ok(Vec::new());
    }

    const FREE: u32 = u32::MAX;
    let mut table = vec![FREE; m];
    let mut owned = vec![0u32; candidates.len()];
    let mut filled = 0usize;
    if let Some(prev) = previous {
        for (slot, owner) in prev.iter().enumerate() {
            if let Some(i) = *owner {
                if owned[i] < quotas[i] {
                    table[slot] = i as u32;
                    owned[i] += 1;
                    filled += 1;
                }
            }
        }
    }

    let perms: Vec<(u64, u64)> = candidates
        .iter()
        .map(|c| (identity_hash(c.identity, 0x5eed_0ff5) % m as u64, identity_hash(c.identity, 0x5eed_5c1b) % (m as u64 - 1) + 1))
        .collect();
    let mut next = vec![0u64; candidates.len()];
    // Quotas sum to `size`, and every permutation visits every slot (skip is coprime with a prime
    // size), so while a slot is free some backend below quota will find it.
    while filled < m {
        for i in 0..candidates.len() {
            if owned[i] >= quotas[i] {
                continue;
            }
            let (offset, skip) = perms[i];
            loop {
                let slot = ((offset + next[i] * skip) % m as u64) as usize;
                next[i] += 1;
                if table[slot] == FREE {
                    table[slot] = i as u32;
                    owned[i] += 1;
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

/// Each candidate's exact share of `size` slots, by largest remainder.
///
/// The slots left after rounding down go first to candidates that `held` more than their rounded-down
/// share in the previous table (so a rebuild never takes a slot from a candidate whose exact share did
/// not shrink: without this, removing a backend could cost a survivor a slot), then by remainder.
fn quotas(candidates: &[Candidate<'_>], size: u32, held: &[u32]) -> Vec<u32> {
    let total: u64 = candidates.iter().map(|c| c.weight as u64).sum();
    if total == 0 {
        return vec![0; candidates.len()];
    }
    let exact: Vec<(u64, u64)> =
        candidates.iter().map(|c| ((c.weight as u64 * size as u64) / total, (c.weight as u64 * size as u64) % total)).collect();
    let mut quotas: Vec<u32> = exact.iter().map(|&(q, _)| q as u32).collect();
    let mut left = size as u64 - exact.iter().map(|&(q, _)| q).sum::<u64>();
    let mut by_remainder: Vec<usize> = (0..candidates.len()).filter(|&i| candidates[i].weight > 0).collect();
    let would_lose = |i: usize| held[i] as u64 > exact[i].0;
    by_remainder.sort_by(|&a, &b| would_lose(b).cmp(&would_lose(a)).then(exact[b].1.cmp(&exact[a].1)).then(a.cmp(&b)));
    for &i in by_remainder.iter().cycle() {
        if left == 0 {
            break;
        }
        quotas[i] += 1;
        left -= 1;
    }
    quotas
}

/// FNV-1a over the identity, seeded, then SplitMix64's finaliser: stable across Rust versions.
fn identity_hash(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in data {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests;

impl core::error::Error for MaglevError {}
