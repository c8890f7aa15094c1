//! Who owns a loopback client's TCP socket: the `uid` column of `/proc/net/tcp` / `/proc/net/tcp6`
//! (of the calling process's network namespace). Loopback is not an authentication boundary on a
//! multi-user host, so the daemon's dashboard accepts a change from loopback without the token only
//! from a root-owned client socket; the demo's host relay (xtask) applies the same rule with this
//! same lookup, so both decide alike.

use std::vec::Vec;

use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The uid owning the TCP socket whose local address is `peer` and whose remote address is
/// `ours` (the client's end of one of our connections), or `None` if no such socket is listed.
pub fn owner_uid(peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .find_map(|table| find_owner(&table, peer, ours))
}

/// [`owner_uid`] over the text of one table.
pub fn find_owner(table: &str, peer: SocketAddr, ours: SocketAddr) -> Option<u32> {
    let (peer, ours) = (canonical(peer), canonical(ours));
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, uid) = (parse_address(fields.get(1)?)?, parse_address(fields.get(2)?)?, fields.get(7)?);
        (canonical(local) == peer && canonical(remote) == ours).then(|| uid.parse().ok()).flatten()
    })
}

/// An IPv4-mapped IPv6 address as IPv4, so both tables compare alike.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6): the kernel prints each 32-bit word of
/// the address as it lies in memory (so in host byte order), and the port in host order.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (address, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| address.get(i * 8..i * 8 + 8).and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes);
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(0)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use std::string::String;

    use super::*;

    fn hex4(ip: Ipv4Addr) -> String {
        std::format!("{:08X}", u32::from_ne_bytes(ip.octets()))
    }

    #[test]
    fn finds_the_clients_socket_and_not_ours() {
        let ours: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:51000".parse().unwrap();
        let lo = hex4(Ipv4Addr::LOCALHOST);
        let table = std::format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {lo}:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0\n\
             1: {lo}:1F90 {lo}:C738 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0\n\
             2: {lo}:C738 {lo}:1F90 01 00000000:00000000 00:00000000 00000000 65534        0 3 1 0\n"
        );
        assert_eq!(find_owner(&table, peer, ours), Some(65534), "the client's end, not the daemon's accepted socket");
        assert_eq!(find_owner(&table, "127.0.0.1:51001".parse().unwrap(), ours), None);
    }

    #[test]
    fn reads_ipv6_and_mapped_addresses() {
        let words = |ip: Ipv6Addr| {
            ip.octets().chunks(4).map(|c| std::format!("{:08X}", u32::from_ne_bytes(c.try_into().unwrap()))).collect::<std::string::String>()
        };
        let one = words(Ipv6Addr::LOCALHOST);
        let mapped = words(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        let table = std::format!(
            "header\n0: {one}:C738 {one}:1F90 01 0:0 0:0 0 0 0 1\n1: {mapped}:C739 {mapped}:1F90 01 0:0 0:0 0 1000 0 1\n"
        );
        assert_eq!(find_owner(&table, "[::1]:51000".parse().unwrap(), "[::1]:8080".parse().unwrap()), Some(0));
        assert_eq!(find_owner(&table, "127.0.0.1:51001".parse().unwrap(), "127.0.0.1:8080".parse().unwrap()), Some(1000));
    }

    /// The real table: a socket this test opens is found with this process's uid.
    #[test]
    fn finds_a_real_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let uid = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m)).unwrap();
        assert_eq!(owner_uid(client.local_addr().unwrap(), listener.local_addr().unwrap()), Some(uid));
    }
}
