//! Addresses as the data plane stores them: 16 bytes in network order, IPv4 as IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`), held as four `u32` words loaded straight from packet memory (so the words are
//! in network byte order, whatever the host's endianness).

/// An IPv4 or IPv6 address in the data plane's layout.
pub type Addr = [u32; 4];

/// The third word of an IPv4-mapped address: bytes `00 00 ff ff`.
pub const V4_MAPPED_PREFIX: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Maps an IPv4 address (its 4 network-order bytes loaded as one word) into the shared layout.
#[inline(always)]
pub const fn from_v4_word(v4: u32) -> Addr {
    [0, 0, V4_MAPPED_PREFIX, v4]
}

#[inline(always)]
pub const fn is_v4_mapped(addr: &Addr) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_PREFIX
}

#[inline(always)]
pub fn from_bytes(bytes: [u8; 16]) -> Addr {
    let mut words = [0u32; 4];
    for (i, word) in words.iter_mut().enumerate() {
        *word = u32::from_ne_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
    }
    words
}

#[inline(always)]
pub fn to_bytes(addr: &Addr) -> [u8; 16] {
    let mut bytes = [0u8; 16];
    for (i, word) in addr.iter().enumerate() {
        bytes[4 * i..4 * i + 4].copy_from_slice(&word.to_ne_bytes());
    }
    bytes
}

#[cfg(any(feature = "std", test))]
pub fn from_ip(ip: core::net::IpAddr) -> Addr {
    match ip {
        core::net::IpAddr::V4(v4) => from_v4_word(u32::from_ne_bytes(v4.octets())),
        core::net::IpAddr::V6(v6) => from_bytes(v6.octets()),
    }
}

#[cfg(any(feature = "std", test))]
pub fn to_ip(addr: &Addr) -> core::net::IpAddr {
    if is_v4_mapped(addr) {
        core::net::IpAddr::V4(core::net::Ipv4Addr::from(addr[3].to_ne_bytes()))
    } else {
        core::net::IpAddr::V6(core::net::Ipv6Addr::from(to_bytes(addr)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::net::IpAddr;

    #[test]
    fn round_trips_both_families() {
        for text in ["10.0.0.100", "0.0.0.0", "255.255.255.255", "2001:db8::100", "::1", "::ffff:1.2.3.4"] {
            let ip: IpAddr = text.parse().unwrap();
            let back = to_ip(&from_ip(ip));
            // An IPv4-mapped IPv6 address is the data plane's IPv4 form, so it comes back as IPv4.
            assert_eq!(back.to_canonical(), ip.to_canonical(), "{text}");
        }
    }

    #[test]
    fn v4_layout_is_mapped_network_order() {
        let addr = from_ip("10.1.2.3".parse().unwrap());
        assert_eq!(to_bytes(&addr), [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 1, 2, 3]);
        assert!(is_v4_mapped(&addr));
    }
}
