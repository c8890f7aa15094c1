use super::*;
use proptest::prelude::*;
use std::format;
use std::string::String;

const SEED: u64 = DEFAULT_SEED;

fn identities(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("10.1.{}.{}:80", i / 250, i % 250 + 2)).collect()
}

fn candidates<'a>(ids: &'a [String], weights: &[u32]) -> Vec<Candidate<'a>> {
    ids.iter().zip(weights).map(|(id, &weight)| Candidate { identity: id.as_bytes(), weight }).collect()
}

fn counts(table: &[u32], n: usize) -> Vec<usize> {
    let mut c = vec![0usize; n];
    for &o in table {
        c[o as usize] += 1;
    }
    c
}

/// The table as identities: what must agree across nodes (indices depend on each node's order).
fn by_identity<'a>(table: &[u32], candidates: &[Candidate<'a>]) -> Vec<&'a [u8]> {
    table.iter().map(|&i| candidates[i as usize].identity).collect()
}

fn build_ids<'a>(candidates: &[Candidate<'a>], size: u32, seed: u64) -> Vec<&'a [u8]> {
    by_identity(&build(candidates, size, seed).unwrap(), candidates)
}

#[test]
fn rejects_sizes_that_are_not_prime() {
    let ids = identities(1);
    let c = candidates(&ids, &[1]);
    assert_eq!(build(&c, 16_380, SEED), Err(MaglevError::NotPrime(16_380)));
    assert_eq!(build(&c, 1, SEED), Err(MaglevError::NotPrime(1)));
    assert_eq!(build(&c, 2, SEED), Err(MaglevError::NotPrime(2)));
    assert!(build(&c, 65_537, SEED).is_ok());
}

#[test]
fn no_weight_means_empty_table() {
    let ids = identities(2);
    assert!(build(&candidates(&ids, &[0, 0]), 251, SEED).unwrap().is_empty());
    assert!(build(&[], 251, SEED).unwrap().is_empty());
}

#[test]
fn zero_weight_backend_gets_no_slot_and_changes_nothing() {
    let ids = identities(3);
    let with_zero = candidates(&ids, &[1, 0, 1]);
    let table = build(&with_zero, 16_381, SEED).unwrap();
    assert_eq!(counts(&table, 3)[1], 0);
    let without = [with_zero[0], with_zero[2]];
    assert_eq!(by_identity(&table, &with_zero), build_ids(&without, 16_381, SEED));
}

#[test]
fn is_deterministic_and_order_of_slots_is_scattered() {
    let ids = identities(3);
    let c = candidates(&ids, &[1, 1, 1]);
    let a = build(&c, 16_381, SEED).unwrap();
    assert_eq!(a, build(&c, 16_381, SEED).unwrap());
    // Not blocks of one backend: the first 30 slots name at least two different backends.
    assert!(a[..30].iter().any(|&o| o != a[0]));
}

/// Pins the layout: rings must agree between nodes running different builds of xdp-lb, so the
/// hashes may never change silently (a change here is a breaking change for mixed fleets).
#[test]
fn layout_and_fingerprint_are_pinned() {
    let ids = identities(3);
    let c = candidates(&ids, &[1, 2, 3]);
    let table = build(&c, 13, SEED).unwrap();
    assert_eq!(table, [2, 2, 2, 1, 2, 0, 2, 1, 2, 1, 2, 1, 0]);
    assert_eq!(fingerprint(&by_identity(&table, &c)), 0xf6dd_c2e2_57cc_1408);
}

#[test]
fn identity_is_address_bytes_then_port() {
    let v4 = identity("10.1.2.3:8080".parse().unwrap());
    assert_eq!(v4, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3, 0x1f, 0x90]);
    // Two spellings of one IPv6 address are one identity.
    assert_eq!(identity("[2001:db8::1]:80".parse().unwrap()), identity("[2001:db8:0::0:1]:80".parse().unwrap()));
    assert_ne!(identity("[2001:db8::1]:80".parse().unwrap()), identity("[2001:db8::1]:81".parse().unwrap()));
}

#[test]
fn fingerprint_depends_on_order_and_size() {
    let (a, b) = (identity("10.0.0.1:80".parse().unwrap()), identity("10.0.0.2:80".parse().unwrap()));
    assert_ne!(fingerprint(&[a, b]), fingerprint(&[b, a]));
    assert_ne!(fingerprint(&[a, b]), fingerprint(&[a, b, a]));
    assert_ne!(fingerprint(&[a]), fingerprint::<[u8; IDENTITY_LEN]>(&[]));
    assert_eq!(fingerprint(&[a, b]), fingerprint(&[a.to_vec(), b.to_vec()]));
}

/// Share of slots whose backend differs between two tables (as identities).
fn moved(a: &[&[u8]], b: &[&[u8]]) -> f64 {
    a.iter().zip(b).filter(|(x, y)| x != y).count() as f64 / a.len() as f64
}

/// Worst share of slots that move when one backend of `n` leaves (each of up to 10 backends tried)
/// and when one joins, for the default ring size; `weight(i)` gives backend i's weight.
fn disruption(n: usize, weight: impl Fn(usize) -> u32) -> (f64, f64) {
    let size = crate::maps::defaults::RING_SIZE;
    let ids = identities(n + 1);
    let weights: Vec<u32> = (0..=n).map(weight).collect();
    let all = candidates(&ids, &weights);
    let base = build_ids(&all[..n], size, SEED);
    let mut leave: f64 = 0.0;
    for removed in (0..n).step_by(n.div_ceil(10)) {
        let rest: Vec<Candidate<'_>> = (0..n).filter(|&i| i != removed).map(|i| all[i]).collect();
        leave = leave.max(moved(&base, &build_ids(&rest, size, SEED)));
    }
    let join = moved(&base, &build_ids(&all, size, SEED));
    (leave, join)
}

/// Minimal disruption is Maglev's own property now that rings have no history: measured here
/// against the ideal (only the leaving backend's 1/N, or the newcomer's 1/(N+1), moves). Run with
/// `--nocapture` to see the numbers quoted in the README.
#[test]
fn disruption_is_close_to_ideal() {
    const BOUND: f64 = 2.0;
    std::println!("backends  weights  leave: moved   ideal  ×ideal  join: moved   ideal  ×ideal");
    for (label, weight) in [("equal", (|_| 1) as fn(usize) -> u32), ("1-4", |i| 1 + (i as u32 * 7) % 4)] {
        for n in [3usize, 5, 10, 50] {
            let (leave, join) = disruption(n, weight);
            let total: u32 = (0..=n).map(weight).sum();
            // The ideal for weights: the leaving or joining backend's own share.
            let ideal_leave = (0..n).step_by(n.div_ceil(10)).map(|i| weight(i) as f64 / (total - weight(n)) as f64).fold(0.0, f64::max);
            let ideal_join = weight(n) as f64 / total as f64;
            std::println!(
                "{n:>8}  {label:>7}  {:>11.2}%  {:>6.2}%  {:>6.2}  {:>10.2}%  {:>6.2}%  {:>6.2}",
                leave * 100.0,
                ideal_leave * 100.0,
                leave / ideal_leave,
                join * 100.0,
                ideal_join * 100.0,
                join / ideal_join
            );
            assert!(leave <= BOUND * ideal_leave, "{n} backends ({label}): {:.2}% moved when one left, ideal {:.2}%", leave * 100.0, ideal_leave * 100.0);
            assert!(join <= BOUND * ideal_join, "{n} backends ({label}): {:.2}% moved when one joined, ideal {:.2}%", join * 100.0, ideal_join * 100.0);
        }
    }
}

/// Weights from a seed: 1 to 4 each.
fn weights_from(n: usize, seed: u64) -> Vec<u32> {
    (0..n).map(|i| 1 + ((seed >> ((2 * i) % 62)) & 3) as u32).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn equal_weights_are_balanced_within_one_percent(n in 1usize..40, size in prop::sample::select(vec![251u32, 1_021, 16_381, 65_537])) {
        let ids = identities(n);
        let table = build(&candidates(&ids, &vec![1; n]), size, SEED).unwrap();
        prop_assert_eq!(table.len(), size as usize);
        let fair = size as f64 / n as f64;
        for (i, &c) in counts(&table, n).iter().enumerate() {
            prop_assert!((c as f64 - fair).abs() <= (size as f64 * 0.01).max(1.0), "backend {} has {} of {}", i, c, size);
        }
    }

    #[test]
    fn shares_are_proportional_to_weights(weights in prop::collection::vec(1u32..100, 1..20), seed in any::<u64>()) {
        let ids = identities(weights.len());
        let size = 16_381u32;
        let table = build(&candidates(&ids, &weights), size, seed).unwrap();
        let total: u32 = weights.iter().sum();
        for (i, &c) in counts(&table, weights.len()).iter().enumerate() {
            let exact = size as f64 * weights[i] as f64 / total as f64;
            prop_assert!((c as f64 - exact).abs() <= 1.0, "backend {} weight {} has {} slots, exact share {}", i, weights[i], c, exact);
        }
    }

    /// A node that lists its backends in another order builds the same ring.
    #[test]
    fn candidate_order_does_not_matter(n in 1usize..30, weights_seed in any::<u64>(), order in any::<prop::sample::Index>(), seed in any::<u64>(), size in prop::sample::select(vec![251u32, 16_381])) {
        let ids = identities(n);
        let weights = weights_from(n, weights_seed);
        let c = candidates(&ids, &weights);
        // A permutation: rotate, then reverse (covers moves of every element for some rotation).
        let r = order.index(n);
        let mut permuted: Vec<Candidate<'_>> = c[r..].iter().chain(&c[..r]).copied().collect();
        if weights_seed & 1 == 1 {
            permuted.reverse();
        }
        let (a, b) = (build_ids(&c, size, seed), build_ids(&permuted, size, seed));
        prop_assert!(a == b, "rotating by {} changed the ring", r);
        prop_assert_eq!(fingerprint(&a), fingerprint(&b));
    }

    /// The defect of issue 11: removing a backend and adding it back must give the very table
    /// the node had before (and so the one every other node has).
    #[test]
    fn remove_then_add_returns_the_identical_table(n in 2usize..30, removed in any::<prop::sample::Index>(), weights_seed in any::<u64>(), seed in any::<u64>()) {
        let ids = identities(n);
        let weights = weights_from(n, weights_seed);
        let c = candidates(&ids, &weights);
        let size = 16_381u32;
        let before = build_ids(&c, size, seed);
        let removed = removed.index(n);
        let rest: Vec<Candidate<'_>> = (0..n).filter(|&i| i != removed).map(|i| c[i]).collect();
        let during = build_ids(&rest, size, seed);
        prop_assert!(during != before);
        prop_assert!(during.iter().all(|&id| id != c[removed].identity));
        // Re-added at the end of the list, as `backend add` does.
        let mut back = rest.clone();
        back.push(c[removed]);
        prop_assert!(build_ids(&back, size, seed) == before);
    }

    #[test]
    fn different_seeds_give_different_tables(n in 2usize..30, a in any::<u64>(), b in any::<u64>()) {
        prop_assume!(a != b);
        let ids = identities(n);
        let c = candidates(&ids, &vec![1; n]);
        let (ta, tb) = (build_ids(&c, 16_381, a), build_ids(&c, 16_381, b));
        prop_assert!(ta != tb, "seeds {} and {} built the same table", a, b);
        prop_assert_ne!(fingerprint(&ta), fingerprint(&tb));
    }

    /// Fingerprints of two builds are equal exactly when the tables (as identities) are: checked on
    /// pairs that differ in one input — a weight, a backend, the seed, the size — or in none.
    #[test]
    fn fingerprint_equals_iff_tables_equal(
        n in 1usize..12,
        weights_seed in any::<u64>(),
        change in 0u8..5,
        which in any::<prop::sample::Index>(),
        seed in any::<u64>(),
    ) {
        let ids = identities(n + 1);
        let weights = weights_from(n, weights_seed);
        let c = candidates(&ids, &weights);
        let size = 251u32;
        let mut other: Vec<Candidate<'_>> = c.clone();
        let (mut other_size, mut other_seed) = (size, seed);
        let i = which.index(n);
        match change {
            0 => {}
            1 => other[i].weight += 1,
            2 => other[i].identity = ids[n].as_bytes(),
            3 => other_seed = seed.wrapping_add(1),
            _ => other_size = 257,
        }
        let a = build_ids(&c, size, seed);
        let b = build_ids(&other, other_size, other_seed);
        prop_assert_eq!(a == b, fingerprint(&a) == fingerprint(&b), "change {}: tables equal {}", change, a == b);
    }
}
