//! Maglev table construction: never panics, fills every slot, gives each backend its exact share
//! (within one slot), and the table — read as identities — is a pure function of the weighted
//! candidates, the size and the seed: the candidates' order, removing and re-adding one, and
//! candidates of weight 0 change nothing; the fingerprint follows the table.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xdp_lb_common::maglev::{build, fingerprint, is_prime, Candidate, MaglevError};

/// Table sizes: primes up to 65537, small ones first so most runs are cheap.
const SIZES: &[u32] = &[3, 5, 7, 11, 13, 17, 31, 61, 67, 97, 101, 127, 251, 257, 509, 1021, 2039, 4093, 8191, 16381, 65521, 65537];

#[derive(Arbitrary, Debug)]
enum Change {
    None,
    /// Remove candidate `removed`, then add it back at the end of the list (as `backend add` does).
    RemoveThenAdd { removed: u8 },
    /// The same candidates in another order: rotated, then maybe reversed.
    Reorder { rotate: u8, reverse: bool },
    /// Another seed: a valid table again, and the fingerprint tells whether it differs.
    OtherSeed { seed: u64 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    size: u8,
    /// Any u32 instead of a listed prime (only used when ≤ 65537): not-prime sizes must be an error.
    raw_size: Option<u32>,
    seed: u64,
    candidates: Vec<(Vec<u8>, u32)>,
    change: Change,
}

/// Checks a successful build; returns the per-candidate slot counts.
fn check_table(table: &[u32], candidates: &[Candidate<'_>], size: u32) -> Vec<u64> {
    let total: u128 = candidates.iter().map(|c| c.weight as u128).sum();
    if total == 0 {
        assert!(table.is_empty(), "no positive weight must give an empty table");
        return vec![0; candidates.len()];
    }
    assert_eq!(table.len(), size as usize, "every slot is filled");
    let mut counts = vec![0u64; candidates.len()];
    for &owner in table {
        assert!((owner as usize) < candidates.len(), "slot names candidate {owner} of {}", candidates.len());
        counts[owner as usize] += 1;
    }
    for (i, c) in candidates.iter().enumerate() {
        // |count − size·w/total| < 1, in integers.
        let exact = size as u128 * c.weight as u128;
        let got = counts[i] as u128 * total;
        assert!(got.abs_diff(exact) < total, "candidate {i} (weight {}) has {} of {size} slots; weights {:?}", c.weight, counts[i], candidates.iter().map(|c| c.weight).collect::<Vec<_>>());
        if c.weight == 0 {
            assert_eq!(counts[i], 0, "a weight-0 candidate gets no slot");
        }
    }
    counts
}

/// Builds, checks, and returns the table as identities (what nodes compare).
fn build_checked<'a>(candidates: &[Candidate<'a>], size: u32, seed: u64) -> Vec<&'a [u8]> {
    let table = build(candidates, size, seed).expect("a prime size must build");
    check_table(&table, candidates, size);
    table.iter().map(|&i| candidates[i as usize].identity).collect()
}

fuzz_target!(|input: Input| {
    let size = match input.raw_size {
        Some(raw) if raw <= 65_537 => raw,
        _ => SIZES[input.size as usize % SIZES.len()],
    };
    let candidates: Vec<Candidate<'_>> = input
        .candidates
        .iter()
        .take(64)
        .map(|(id, weight)| Candidate { identity: &id[..id.len().min(64)], weight: *weight })
        .collect();
    let n = candidates.len();
    let seed = input.seed;

    if size < 3 || !is_prime(size) {
        assert_eq!(build(&candidates, size, seed), Err(MaglevError::NotPrime(size)));
        return;
    }
    let table = build_checked(&candidates, size, seed);
    if size <= 1021 {
        assert_eq!(build_checked(&candidates, size, seed), table, "builds are deterministic");
    }
    // Candidates of weight 0 play no part.
    let weighted: Vec<Candidate<'_>> = candidates.iter().copied().filter(|c| c.weight > 0).collect();
    if weighted.len() < n && size <= 4093 {
        assert_eq!(build_checked(&weighted, size, seed), table, "a weight-0 candidate changed the table");
    }

    let same_as = |other: &[&[u8]], what: &str| {
        assert!(other == table.as_slice(), "{what} changed the table; weights {:?}, size {size}", candidates.iter().map(|c| c.weight).collect::<Vec<_>>());
        assert_eq!(fingerprint(other), fingerprint(&table));
    };
    match input.change {
        Change::None => {}
        Change::RemoveThenAdd { removed } => {
            if n == 0 {
                return;
            }
            let removed = removed as usize % n;
            let mut rest: Vec<Candidate<'_>> = (0..n).filter(|&i| i != removed).map(|i| candidates[i]).collect();
            let during = build_checked(&rest, size, seed);
            assert!(during.iter().all(|&id| id != candidates[removed].identity || rest.iter().any(|c| c.identity == id && c.weight > 0)), "a removed candidate kept a slot");
            rest.push(candidates[removed]);
            same_as(&build_checked(&rest, size, seed), "removing and re-adding a candidate");
        }
        Change::Reorder { rotate, reverse } => {
            if n == 0 {
                return;
            }
            let r = rotate as usize % n;
            let mut reordered: Vec<Candidate<'_>> = candidates[r..].iter().chain(&candidates[..r]).copied().collect();
            if reverse {
                reordered.reverse();
            }
            same_as(&build_checked(&reordered, size, seed), "reordering the candidates");
        }
        Change::OtherSeed { seed: other } => {
            let other_table = build_checked(&candidates, size, other);
            assert_eq!(other_table == table, fingerprint(&other_table) == fingerprint(&table), "the fingerprint must follow the table");
        }
    }
});
