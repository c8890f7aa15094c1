//! Maglev table construction: never panics, fills every slot, gives each backend its exact share
//! (within one slot), and a rebuild after removing a backend moves only that backend's slots.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use xdp_lb_common::maglev::{build, is_prime, Candidate, MaglevError};

/// Table sizes: primes up to 65537, small ones first so most runs are cheap.
const SIZES: &[u32] = &[3, 5, 7, 11, 13, 17, 31, 61, 67, 97, 101, 127, 251, 257, 509, 1021, 2039, 4093, 8191, 16381, 65521, 65537];

#[derive(Arbitrary, Debug)]
enum Previous {
    None,
    /// Build once with every candidate, then again without `removed` (the other weights unchanged).
    Removal { removed: u8 },
    /// An arbitrary previous table (owners modulo `candidates + 1`, the extra value meaning gone).
    Arbitrary { owners: Vec<u8> },
    /// A previous table of the wrong length, or naming a candidate that does not exist.
    Invalid { len_delta: i8, bad_slot: u16 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    size: u8,
    /// Any u32 instead of a listed prime (only used when ≤ 65537): not-prime sizes must be an error.
    raw_size: Option<u32>,
    candidates: Vec<(Vec<u8>, u32)>,
    previous: Previous,
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

    let first = build(&candidates, size, None);
    if size < 3 || !is_prime(size) {
        assert_eq!(first, Err(MaglevError::NotPrime(size)));
        return;
    }
    let table = first.expect("a prime size and no previous table must build");
    check_table(&table, &candidates, size);
    if size <= 1021 {
        assert_eq!(build(&candidates, size, None).as_ref(), Ok(&table), "builds are deterministic");
    }

    match input.previous {
        Previous::None => {}
        Previous::Removal { removed } => {
            if n == 0 || table.is_empty() {
                return;
            }
            let removed = removed as usize % n;
            let survivors: Vec<usize> = (0..n).filter(|&i| i != removed).collect();
            let after_candidates: Vec<Candidate<'_>> = survivors.iter().map(|&i| candidates[i]).collect();
            let previous: Vec<Option<usize>> =
                table.iter().map(|&o| survivors.iter().position(|&s| s == o as usize)).collect();
            let after = build(&after_candidates, size, Some(&previous)).expect("a valid previous table must build");
            check_table(&after, &after_candidates, size);
            if after.is_empty() {
                return;
            }
            for slot in 0..size as usize {
                if table[slot] as usize != removed {
                    assert_eq!(
                        survivors[after[slot] as usize],
                        table[slot] as usize,
                        "slot {slot} moved from candidate {} to {} although only candidate {removed} was removed; weights {:?}, size {size}",
                        table[slot],
                        survivors[after[slot] as usize],
                        candidates.iter().map(|c| c.weight).collect::<Vec<_>>()
                    );
                }
            }
        }
        Previous::Arbitrary { owners } => {
            if owners.is_empty() {
                return;
            }
            let previous: Vec<Option<usize>> = (0..size as usize)
                .map(|s| {
                    let o = owners[s % owners.len()] as usize % (n + 1);
                    (o < n).then_some(o)
                })
                .collect();
            let after = build(&candidates, size, Some(&previous)).expect("a valid previous table must build");
            let counts = check_table(&after, &candidates, size);
            if after.is_empty() {
                return;
            }
            // A candidate keeps every slot it held, up to its share.
            let mut kept = vec![0u64; n];
            for (slot, owner) in previous.iter().enumerate() {
                if let Some(o) = *owner {
                    if after[slot] as usize == o {
                        kept[o] += 1;
                    }
                }
            }
            for i in 0..n {
                let held = previous.iter().filter(|&&o| o == Some(i)).count() as u64;
                assert_eq!(kept[i], held.min(counts[i]), "candidate {i} held {held} slots, kept {}, owns {}", kept[i], counts[i]);
            }
        }
        Previous::Invalid { len_delta, bad_slot } => {
            let len = (size as i64 + len_delta as i64).max(0) as usize;
            let mut previous = vec![None; len];
            if len == size as usize {
                if len == 0 {
                    return;
                }
                previous[bad_slot as usize % len] = Some(n + bad_slot as usize % 3);
                assert!(matches!(build(&candidates, size, Some(&previous)), Err(MaglevError::PreviousOwnerOutOfRange { .. })));
            } else {
                assert_eq!(
                    build(&candidates, size, Some(&previous)),
                    Err(MaglevError::PreviousSizeMismatch { expected: size, got: len })
                );
            }
        }
    }
});
