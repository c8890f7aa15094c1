//! Round-robin sequences for the `round-robin` and `weighted-round-robin` schedulers: the XDP
//! program walks the sequence with a per-service counter, one step per new flow.

use std::vec::Vec;

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Smooth weighted round robin (as nginx does it): over one period each candidate appears `weight`
/// times (weights reduced by their common divisor), and heavy candidates are interleaved with the
/// others rather than served in bursts. Candidates with weight 0 never appear.
pub fn smooth_weighted(weights: &[u32]) -> Vec<usize> {
    let divisor = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
    if divisor == 0 {
        return Vec::new();
    }
    let reduced: Vec<i64> = weights.iter().map(|&w| (w / divisor) as i64).collect();
    let total: i64 = reduced.iter().sum();
    let mut current = std::vec![0i64; weights.len()];
    let mut sequence = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..reduced.len() {
            current[i] += reduced[i];
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        sequence.push(best);
    }
    sequence
}

/// Length of [`smooth_weighted`]'s sequence, without building it.
pub fn smooth_weighted_len(weights: &[u32]) -> u64 {
    let divisor = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
    if divisor == 0 {
        return 0;
    }
    weights.iter().map(|&w| (w / divisor) as u64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn interleaves_instead_of_bursting() {
        assert_eq!(smooth_weighted(&[5, 1, 1]), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_weighted(&[1, 1, 1]), [0, 1, 2]);
        assert_eq!(smooth_weighted(&[2, 4]), [1, 0, 1]);
        assert!(smooth_weighted(&[0, 0]).is_empty());
    }

    proptest! {
        #[test]
        fn each_candidate_appears_in_proportion_to_its_weight(weights in prop::collection::vec(0u32..20, 1..10)) {
            let seq = smooth_weighted(&weights);
            prop_assert_eq!(seq.len() as u64, smooth_weighted_len(&weights));
            let divisor = weights.iter().copied().filter(|&w| w > 0).fold(0, gcd);
            for (i, &w) in weights.iter().enumerate() {
                let expected = w.checked_div(divisor).unwrap_or(0) as usize;
                prop_assert_eq!(seq.iter().filter(|&&c| c == i).count(), expected);
            }
        }
    }
}
