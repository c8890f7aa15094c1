use super::*;
use proptest::prelude::*;
use std::format;
use std::string::String;

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

#[test]
fn rejects_sizes_that_are_not_prime() {
    let ids = identities(1);
    let c = candidates(&ids, &[1]);
    assert_eq!(build(&c, 16_380, None), Err(MaglevError::NotPrime(16_380)));
    assert_eq!(build(&c, 1, None), Err(MaglevError::NotPrime(1)));
    assert!(build(&c, 65_537, None).is_ok());
}

#[test]
fn no_weight_means_empty_table() {
    let ids = identities(2);
    assert!(build(&candidates(&ids, &[0, 0]), 251, None).unwrap().is_empty());
    assert!(build(&[], 251, None).unwrap().is_empty());
}

#[test]
fn zero_weight_backend_gets_no_slot() {
    let ids = identities(3);
    let table = build(&candidates(&ids, &[1, 0, 1]), 16_381, None).unwrap();
    assert_eq!(counts(&table, 3)[1], 0);
}

#[test]
fn is_deterministic_and_order_of_slots_is_scattered() {
    let ids = identities(3);
    let c = candidates(&ids, &[1, 1, 1]);
    let a = build(&c, 16_381, None).unwrap();
    assert_eq!(a, build(&c, 16_381, None).unwrap());
    // Not blocks of one backend: the first 30 slots name at least two different backends.
    assert!(a[..30].iter().any(|&o| o != a[0]));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn equal_weights_are_balanced_within_one_percent(n in 1usize..40, size in prop::sample::select(vec![251u32, 1_021, 16_381, 65_537])) {
        let ids = identities(n);
        let table = build(&candidates(&ids, &vec![1; n]), size, None).unwrap();
        prop_assert_eq!(table.len(), size as usize);
        let fair = size as f64 / n as f64;
        for (i, &c) in counts(&table, n).iter().enumerate() {
            prop_assert!((c as f64 - fair).abs() <= (size as f64 * 0.01).max(1.0), "backend {} has {} of {}", i, c, size);
        }
    }

    #[test]
    fn shares_are_proportional_to_weights(weights in prop::collection::vec(1u32..100, 1..20)) {
        let ids = identities(weights.len());
        let size = 16_381u32;
        let table = build(&candidates(&ids, &weights), size, None).unwrap();
        let total: u32 = weights.iter().sum();
        for (i, &c) in counts(&table, weights.len()).iter().enumerate() {
            let exact = size as f64 * weights[i] as f64 / total as f64;
            prop_assert!((c as f64 - exact).abs() <= 1.0, "backend {} weight {} has {} slots, exact share {}", i, weights[i], c, exact);
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_slots(n in 2usize..30, removed_seed in any::<usize>(), weights_seed in any::<u64>()) {
        let ids = identities(n);
        let weights: Vec<u32> = (0..n).map(|i| 1 + ((weights_seed >> (i % 60)) & 3) as u32).collect();
        let size = 16_381u32;
        let before = build(&candidates(&ids, &weights), size, None).unwrap();

        let removed = removed_seed % n;
        let survivors: Vec<usize> = (0..n).filter(|&i| i != removed).collect();
        let ids_after: Vec<String> = survivors.iter().map(|&i| ids[i].clone()).collect();
        let weights_after: Vec<u32> = survivors.iter().map(|&i| weights[i]).collect();
        let previous: Vec<Option<usize>> = before.iter().map(|&o| survivors.iter().position(|&s| s == o as usize)).collect();
        let after = build(&candidates(&ids_after, &weights_after), size, Some(&previous)).unwrap();

        for slot in 0..size as usize {
            if before[slot] as usize != removed {
                prop_assert_eq!(survivors[after[slot] as usize], before[slot] as usize, "slot {} moved", slot);
            }
        }
        // And the result is still exactly proportional.
        let total: u32 = weights_after.iter().sum();
        for (i, &c) in counts(&after, survivors.len()).iter().enumerate() {
            let exact = size as f64 * weights_after[i] as f64 / total as f64;
            prop_assert!((c as f64 - exact).abs() <= 1.0);
        }
    }

    #[test]
    fn adding_a_backend_takes_only_its_share(n in 1usize..30) {
        let ids = identities(n + 1);
        let size = 16_381u32;
        let before = build(&candidates(&ids[..n], &vec![1; n]), size, None).unwrap();
        let previous: Vec<Option<usize>> = before.iter().map(|&o| Some(o as usize)).collect();
        let after = build(&candidates(&ids, &vec![1; n + 1]), size, Some(&previous)).unwrap();
        let moved = (0..size as usize).filter(|&s| before[s] != after[s]).count();
        // Every moved slot went to the newcomer, and it got its fair share.
        prop_assert!((0..size as usize).all(|s| before[s] == after[s] || after[s] as usize == n));
        prop_assert_eq!(moved, counts(&after, n + 1)[n]);
        prop_assert!((moved as f64 - size as f64 / (n + 1) as f64).abs() <= 1.0);
    }
}

#[test]
fn previous_table_is_validated() {
    let ids = identities(2);
    let c = candidates(&ids, &[1, 1]);
    assert_eq!(
        build(&c, 251, Some(&vec![Some(0); 250])),
        Err(MaglevError::PreviousSizeMismatch { expected: 251, got: 250 })
    );
    assert_eq!(
        build(&c, 251, Some(&vec![Some(5); 251])),
        Err(MaglevError::PreviousOwnerOutOfRange { slot: 0, owner: 5 })
    );
}

#[test]
fn removing_a_backend_never_costs_a_survivor_a_slot() {
    for (size, weights, removed) in [(3u32, vec![5u32, 1, 1], 2usize), (16_381, vec![43_356, 5, 1, 1, 3], 3)] {
        let ids = identities(weights.len());
        let before = build(&candidates(&ids, &weights), size, None).unwrap();
        let survivors: Vec<usize> = (0..weights.len()).filter(|&i| i != removed).collect();
        let ids_after: Vec<String> = survivors.iter().map(|&i| ids[i].clone()).collect();
        let weights_after: Vec<u32> = survivors.iter().map(|&i| weights[i]).collect();
        let previous: Vec<Option<usize>> = before.iter().map(|&o| survivors.iter().position(|&s| s == o as usize)).collect();
        let after = build(&candidates(&ids_after, &weights_after), size, Some(&previous)).unwrap();
        for slot in 0..size as usize {
            if before[slot] as usize != removed {
                assert_eq!(survivors[after[slot] as usize], before[slot] as usize, "size {size} weights {weights:?}: slot {slot} moved");
            }
        }
    }
}
