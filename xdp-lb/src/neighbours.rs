//! Keeps the kernel's neighbour (ARP/NDP) entries for backends resolved.
//!
//! The XDP program takes next-hop MAC addresses from the FIB; a backend whose neighbour entry is not
//! resolved yet cannot be reached from XDP. In NAT mode the program then hands the translated packet
//! to the kernel, which resolves it; in DSR mode it cannot (the packet is still addressed to the VIP),
//! so the control plane makes the kernel resolve every backend by sending it one empty UDP datagram
//! to the discard port.

use std::net::{SocketAddr, UdpSocket};

use tracing::debug;

const DISCARD_PORT: u16 = 9;

pub fn warm(backends: impl IntoIterator<Item = SocketAddr>) {
    for backend in backends {
        let target = SocketAddr::new(backend.ip(), DISCARD_PORT);
        let bind: SocketAddr = if backend.is_ipv4() { "0.0.0.0:0".parse().unwrap() } else { "[::]:0".parse().unwrap() };
        let result = UdpSocket::bind(bind).and_then(|socket| socket.send_to(&[], target));
        if let Err(error) = result {
            debug!(%backend, %error, "neighbour warm-up datagram not sent");
        }
    }
}
