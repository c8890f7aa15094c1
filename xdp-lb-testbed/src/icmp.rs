//! ICMP echo ("ping") over a raw socket, so tests need no ping binary. Call it inside `Netns::run`.

use std::{
    io,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::FromRawFd,
    time::{Duration, Instant},
};

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

/// Sends one echo request to `addr` and waits up to `timeout` for the matching reply; returns the
/// round-trip time.
pub fn ping(addr: IpAddr, timeout: Duration) -> io::Result<Duration> {
    let (domain, proto) = match addr {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
    };
    // SAFETY: plain socket(2); the descriptor is checked and then owned by the UdpSocket below.
    let fd = unsafe { libc::socket(domain, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // A raw socket speaks sendto/recvfrom with sockaddrs just like UDP, so std's wrapper serves (ports
    // are ignored for raw sockets), with its timeouts and Drop.
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    let id = (std::process::id() as u16) ^ 0x5a5a;
    let seq = next_seq();
    let mut packet = [0u8; 16];
    packet[0] = if addr.is_ipv4() { ECHO_REQUEST_V4 } else { ECHO_REQUEST_V6 };
    packet[4..6].copy_from_slice(&id.to_be_bytes());
    packet[6..8].copy_from_slice(&seq.to_be_bytes());
    packet[8..].copy_from_slice(b"xdp-lb!!");
    if addr.is_ipv4() {
        // The kernel fills in the ICMPv6 checksum itself (it covers a pseudo-header), not ICMPv4's.
        let sum = checksum(&packet);
        packet[2..4].copy_from_slice(&sum.to_be_bytes());
    }
    let started = Instant::now();
    socket.send_to(&packet, SocketAddr::new(addr, 0))?;
    let mut buf = [0u8; 1500];
    // Raw sockets see every ICMP message of the namespace: skip those that are not our reply.
    for _ in 0..1000 {
        let left = timeout.checked_sub(started.elapsed()).filter(|d| !d.is_zero());
        let Some(left) = left else { break };
        socket.set_read_timeout(Some(left))?;
        let (n, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => break,
            Err(e) => return Err(e),
        };
        // IPv4 raw sockets deliver the IP header too; IPv6 ones do not.
        let icmp = if addr.is_ipv4() {
            let ihl = usize::from(buf[0] & 0x0f) * 4;
            &buf[ihl.min(n)..n]
        } else {
            &buf[..n]
        };
        let reply = if addr.is_ipv4() { ECHO_REPLY_V4 } else { ECHO_REPLY_V6 };
        if from.ip() == addr
            && icmp.len() >= 8
            && icmp[0] == reply
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            return Ok(started.elapsed());
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, format!("no echo reply from {addr} within {timeout:?}")))
}

fn next_seq() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static SEQ: AtomicU16 = AtomicU16::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
