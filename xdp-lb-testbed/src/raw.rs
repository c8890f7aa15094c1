//! Spoofed TCP SYNs through a raw IPv4 socket (IP_HDRINCL): any source address, as an attacker
//! sends them. Used by the SYN-flood and fail-safe tests; must be used inside a namespace.

use std::{io, net::Ipv4Addr};

use xdp_lb_common::checksum;

/// A raw IPv4 socket that sends whole packets to one destination address.
pub struct RawSyns {
    fd: libc::c_int,
    dst: Ipv4Addr,
    sin: libc::sockaddr_in,
}

/// One SYN: its source, ports, sequence number and IP id.
pub struct Syn {
    pub src: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ip_id: u16,
}

impl RawSyns {
    pub fn open(dst: Ipv4Addr) -> io::Result<RawSyns> {
        // SAFETY: plain socket(2); the descriptor is closed on drop.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(dst.octets()) },
            sin_zero: [0; 8],
        };
        Ok(RawSyns { fd, dst, sin })
    }

    /// Sends one SYN; `Err` when the kernel refuses it (e.g. ENOBUFS under pressure).
    pub fn send(&self, syn: &Syn) -> io::Result<()> {
        let packet = self.packet(syn);
        // SAFETY: a valid buffer and sockaddr for the duration of the call.
        let n = unsafe {
            libc::sendto(
                self.fd,
                packet.as_ptr().cast(),
                packet.len(),
                0,
                (&self.sin as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        if n == packet.len() as isize {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn packet(&self, syn: &Syn) -> [u8; 40] {
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&syn.sport.to_be_bytes());
        tcp[2..4].copy_from_slice(&syn.dport.to_be_bytes());
        tcp[4..8].copy_from_slice(&syn.seq.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x02; // SYN
        tcp[14..16].copy_from_slice(&64_240u16.to_be_bytes());
        let c = checksum::l4_ipv4(syn.src.octets(), self.dst.octets(), 6, &tcp);
        tcp[16..18].copy_from_slice(&c.to_be_bytes());
        let mut packet = [0u8; 40];
        packet[0] = 0x45;
        packet[2..4].copy_from_slice(&40u16.to_be_bytes());
        packet[4..6].copy_from_slice(&syn.ip_id.to_be_bytes());
        packet[8] = 64;
        packet[9] = 6;
        packet[12..16].copy_from_slice(&syn.src.octets());
        packet[16..20].copy_from_slice(&self.dst.octets());
        let c = checksum::ipv4_header(&packet[..20]);
        packet[10..12].copy_from_slice(&c.to_be_bytes());
        packet[20..].copy_from_slice(&tcp);
        packet
    }
}

impl Drop for RawSyns {
    fn drop(&mut self) {
        // SAFETY: our descriptor, closed once.
        unsafe { libc::close(self.fd) };
    }
}
