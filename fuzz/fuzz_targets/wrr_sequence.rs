//! Smooth weighted round robin: never panics, its length matches `smooth_weighted_len`, every
//! candidate appears exactly its reduced weight times (weight 0 never), and it is deterministic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xdp_lb_common::sequence::{smooth_weighted, smooth_weighted_len};

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fuzz_target!(|input: (Vec<u32>, bool)| {
    let (raw, bounded) = input;
    // The daemon accepts weights up to 65 535; unbounded weights are fuzzed too, but a sequence is
    // only built when it is short enough for a fuzz iteration (the length alone is checked always).
    let weights: Vec<u32> = raw.iter().take(64).map(|&w| if bounded { w % 65_536 } else { w }).collect();
    let len = smooth_weighted_len(&weights);
    let divisor = weights.iter().map(|&w| w as u64).filter(|&w| w > 0).fold(0, gcd);
    let reduced: Vec<u64> = weights.iter().map(|&w| if divisor == 0 { 0 } else { w as u64 / divisor }).collect();
    assert_eq!(len, reduced.iter().sum::<u64>(), "length is the sum of the reduced weights");
    if len > 20_000 {
        return;
    }
    let seq = smooth_weighted(&weights);
    assert_eq!(seq.len() as u64, len);
    let mut counts = vec![0u64; weights.len()];
    for &c in &seq {
        assert!(c < weights.len(), "index {c} out of {} candidates", weights.len());
        counts[c] += 1;
    }
    assert_eq!(counts, reduced, "each candidate appears in proportion to its weight");
    // Smoothness: over any prefix, a candidate is never more than one full turn ahead of its share.
    let n = weights.len() as u64;
    let mut seen = vec![0u64; weights.len()];
    for (p, &c) in seq.iter().enumerate() {
        seen[c] += 1;
        let p = p as u64 + 1;
        // seen/p may exceed w/len by at most (n-1)/p … expressed in integers: seen·len ≤ p·w + n·len.
        assert!(seen[c] * len <= p * reduced[c] + n * len, "candidate {c} bursts: {} in the first {p} of {len}", seen[c]);
    }
    if len <= 10_000 {
        assert_eq!(smooth_weighted(&weights), seq, "deterministic");
    }
});
