//! Internet checksum arithmetic (RFC 1071 / RFC 1624).
//!
//! The incremental updates take every value exactly as it sits in packet memory (a `u16`/`u32` loaded
//! with native byte order) and return the new checksum field in the same form. One's-complement
//! addition commutes with byte swapping, so no conversion is needed on either endianness.

use crate::addr::Addr;

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    // Four folds reduce any sum of up to 2^32 words to 16 bits; written out so the verifier sees no loop.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
fn words32(v: u32) -> u64 {
    (v & 0xffff) as u64 + (v >> 16) as u64
}

/// New checksum after a 16-bit field changed from `old` to `new` (RFC 1624, eqn. 3).
#[inline(always)]
pub fn update_u16(check: u16, old: u16, new: u16) -> u16 {
    !fold((!check) as u64 + (!old) as u64 + new as u64)
}

/// New checksum after a 32-bit field changed from `old` to `new`.
#[inline(always)]
pub fn update_u32(check: u16, old: u32, new: u32) -> u16 {
    !fold((!check) as u64 + words32(!old) + words32(new))
}

/// New checksum after a 128-bit (IPv6 or mapped IPv4) address changed.
#[inline(always)]
pub fn update_addr(check: u16, old: &Addr, new: &Addr) -> u16 {
    let mut sum = (!check) as u64;
    sum += words32(!old[0]) + words32(!old[1]) + words32(!old[2]) + words32(!old[3]);
    sum += words32(new[0]) + words32(new[1]) + words32(new[2]) + words32(new[3]);
    !fold(sum)
}

/// A UDP checksum of 0 means "none" over IPv4 and must stay 0; a computed 0 is sent as 0xffff.
#[inline(always)]
pub fn udp_finish(original: u16, updated: u16) -> u16 {
    if original == 0 {
        0
    } else if updated == 0 {
        0xffff
    } else {
        updated
    }
}

/// One's-complement sum of `data` as big-endian 16-bit words (odd tail padded with zero).
pub fn sum_be(data: &[u8]) -> u64 {
    let mut sum = 0u64;
    let mut chunks = data.chunks_exact(2);
    for pair in &mut chunks {
        sum += u16::from_be_bytes([pair[0], pair[1]]) as u64;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u64) << 8;
    }
    sum
}

/// The checksum over `data` plus an already summed pseudo-header, as a big-endian value.
pub fn finish_be(sum: u64) -> u16 {
    !fold(sum)
}

/// Full IPv4 header checksum of `header` (its checksum field must be zeroed).
pub fn ipv4_header(header: &[u8]) -> u16 {
    finish_be(sum_be(header))
}

/// Full TCP/UDP checksum over an IPv4 pseudo-header and `segment` (checksum field zeroed).
pub fn l4_ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, segment: &[u8]) -> u16 {
    let pseudo = sum_be(&src) + sum_be(&dst) + proto as u64 + segment.len() as u64;
    finish_be(pseudo + sum_be(segment))
}

/// Full TCP/UDP checksum over an IPv6 pseudo-header and `segment` (checksum field zeroed).
pub fn l4_ipv6(src: [u8; 16], dst: [u8; 16], proto: u8, segment: &[u8]) -> u16 {
    let pseudo = sum_be(&src) + sum_be(&dst) + proto as u64 + segment.len() as u64;
    finish_be(pseudo + sum_be(segment))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{from_bytes, from_v4_word};
    use proptest::prelude::*;

    /// 0x0000 and 0xffff are the two zeros of one's complement and verify identically.
    fn same_checksum(a: u16, b: u16) -> bool {
        a == b || (a == 0 && b == 0xffff) || (a == 0xffff && b == 0)
    }

    fn native16(be: u16) -> u16 {
        u16::from_ne_bytes(be.to_be_bytes())
    }

    proptest! {
        #[test]
        fn ipv4_address_and_port_rewrite_matches_full_recomputation(
            src in any::<[u8; 4]>(), dst in any::<[u8; 4]>(), new_dst in any::<[u8; 4]>(),
            dport in any::<u16>(), new_dport in any::<u16>(),
            payload in proptest::collection::vec(any::<u8>(), 8..64),
        ) {
            let mut seg = payload.clone();
            seg[2..4].copy_from_slice(&dport.to_be_bytes());
            seg[6..8].copy_from_slice(&[0, 0]); // UDP-like layout: checksum at 6..8
            let before = l4_ipv4(src, dst, 17, &seg);

            let mut check = native16(before);
            check = update_u32(check, u32::from_ne_bytes(dst), u32::from_ne_bytes(new_dst));
            check = update_u16(check, native16(dport), native16(new_dport));

            seg[2..4].copy_from_slice(&new_dport.to_be_bytes());
            let full = l4_ipv4(src, new_dst, 17, &seg);
            prop_assert!(same_checksum(u16::from_be_bytes(check.to_ne_bytes()), full));
        }

        #[test]
        fn ipv6_address_rewrite_matches_full_recomputation(
            src in any::<[u8; 16]>(), dst in any::<[u8; 16]>(), new_dst in any::<[u8; 16]>(),
            payload in proptest::collection::vec(any::<u8>(), 20..80),
        ) {
            let mut seg = payload.clone();
            seg[16..18].copy_from_slice(&[0, 0]); // TCP layout: checksum at 16..18
            let before = l4_ipv6(src, dst, 6, &seg);
            let check = update_addr(native16(before), &from_bytes(dst), &from_bytes(new_dst));
            let full = l4_ipv6(src, new_dst, 6, &seg);
            prop_assert!(same_checksum(u16::from_be_bytes(check.to_ne_bytes()), full));
        }

        #[test]
        fn ipv4_header_rewrite_matches_full_recomputation(header in any::<[u8; 20]>(), new_dst in any::<[u8; 4]>()) {
            let mut h = header;
            h[10..12].copy_from_slice(&[0, 0]);
            let before = ipv4_header(&h);
            let old_dst = [h[16], h[17], h[18], h[19]];
            let check = update_u32(native16(before), u32::from_ne_bytes(old_dst), u32::from_ne_bytes(new_dst));
            h[16..20].copy_from_slice(&new_dst);
            prop_assert!(same_checksum(u16::from_be_bytes(check.to_ne_bytes()), ipv4_header(&h)));
        }

        #[test]
        fn mapped_address_update_equals_word_update(check in any::<u16>(), old in any::<u32>(), new in any::<u32>()) {
            // IPv4 addresses live mapped in 128 bits; the constant prefix must cancel out.
            prop_assert_eq!(update_addr(check, &from_v4_word(old), &from_v4_word(new)), update_u32(check, old, new));
        }
    }

    #[test]
    fn udp_zero_checksum_stays_absent_and_computed_zero_becomes_ffff() {
        assert_eq!(udp_finish(0, 0x1234), 0);
        assert_eq!(udp_finish(0x1111, 0), 0xffff);
        assert_eq!(udp_finish(0x1111, 0x2222), 0x2222);
    }

    #[test]
    fn known_ipv4_header_checksum() {
        // RFC 1071-style example header from Wikipedia's IPv4 checksum walkthrough.
        let h = [0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0, 0, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7];
        assert_eq!(ipv4_header(&h), 0xb861);
    }
}
