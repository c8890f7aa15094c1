//! Answering a TCP segment for a service with no backend with a RST, built in place: the client then
//! fails at once ("connection refused") instead of retransmitting its SYN until its connect timeout.
//!
//! The reply follows RFC 793's reset generation for a closed port: if the segment carries an ACK,
//! the RST takes its sequence number from that ACK; otherwise the RST has sequence 0 and acknowledges
//! everything the segment occupied (payload, plus one for SYN and one for FIN). The frame keeps its
//! Ethernet (and VLAN) header with the MACs swapped, gets the addresses and ports swapped, and is cut
//! to the IP and TCP headers (the caller trims the tail to the returned length).

use core::mem::offset_of;

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use super::{
    parse::{IPV4_HEADER_LEN, IPV6_HEADER_LEN, TCP_HEADER_LEN},
    Frame, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};
use crate::{
    maps::PROTO_TCP,
    reasons::{self, Reason},
};

/// Hop limit of the RSTs we originate (Linux's default).
const TTL: u8 = 64;
/// IPv4 "don't fragment", network order.
const IPV4_DF: u16 = 0x4000u16.to_be();
const TCP_SEQ_AT: usize = offset_of!(TcpHdr, seq);
const TCP_ACK_SEQ_AT: usize = offset_of!(TcpHdr, ack_seq);
/// The data-offset/flags word.
const TCP_OFF_FLAGS_AT: usize = offset_of!(TcpHdr, _bitfield_1);
const TCP_WINDOW_AT: usize = offset_of!(TcpHdr, window);
const TCP_CHECK_AT: usize = offset_of!(TcpHdr, check);
const TCP_URG_AT: usize = offset_of!(TcpHdr, urg_ptr);

/// Rewrites the parsed TCP `packet` into the RST that refuses it and returns the frame length the
/// RST needs (the caller trims the frame to it). Refused with [`reasons::DROP_NO_BACKEND`] (the
/// packet is then dropped as before) for what must not or cannot be answered: a RST (never answer
/// one), UDP, IPv4 with options, a data offset below 5 or past the IP packet, an IP length past
/// the frame.
#[inline(always)]
pub fn tcp_reset<F: Frame>(frame: &mut F, packet: &Packet) -> Result<usize, Reason> {
    let refuse = reasons::DROP_NO_BACKEND;
    if packet.flow.proto != PROTO_TCP || packet.tcp_flags & TCP_RST != 0 {
        return Err(refuse);
    }
    let (l3, l4) = (packet.l3_offset, packet.l4_offset);
    let ip_header_len = if packet.ipv6 { IPV6_HEADER_LEN } else { IPV4_HEADER_LEN };
    // IPv4 options would have to be cut out from between the headers; such SYNs are rare.
    if l4 != l3 + ip_header_len {
        return Err(refuse);
    }
    let ip_len = packet.ip_len as usize;
    if l3 + ip_len > frame.len() {
        return Err(refuse);
    }
    let tcp = frame.window(l4, TCP_HEADER_LEN).ok_or(reasons::DROP_TRUNCATED_L4)?;
    // SAFETY: fields of the checked 20-byte header at even offsets.
    let (seq, ack_seq, data_offset) =
        unsafe { (frame.load32(tcp, TCP_SEQ_AT), frame.load32(tcp, TCP_ACK_SEQ_AT), frame.load8(tcp, TCP_OFF_FLAGS_AT) >> 4) };
    let tcp_header_len = data_offset as usize * 4;
    if tcp_header_len < TCP_HEADER_LEN || ip_header_len + tcp_header_len > ip_len {
        return Err(refuse);
    }
    let flags = packet.tcp_flags;
    let (rst_seq, rst_ack, rst_flags) = if flags & TCP_ACK != 0 {
        (ack_seq, 0, TCP_RST)
    } else {
        let occupied = (ip_len - ip_header_len - tcp_header_len) as u32
            + (flags & TCP_SYN != 0) as u32
            + (flags & TCP_FIN != 0) as u32;
        (0, u32::from_be(seq).wrapping_add(occupied).to_be(), TCP_RST | TCP_ACK)
    };

    swap_macs(frame)?;
    let flow = &packet.flow;
    // The pseudo-header's sum (addresses swapped: the sum does not care) with protocol and length.
    let mut sum = (PROTO_TCP as u16).to_be() as u64 + (TCP_HEADER_LEN as u16).to_be() as u64;
    if packet.ipv6 {
        let ip = frame.window(l3, IPV6_HEADER_LEN).ok_or(reasons::DROP_BAD_IP_HEADER)?;
        // SAFETY: fields of the checked 40-byte header at even offsets.
        unsafe {
            frame.store16(ip, offset_of!(Ipv6Hdr, payload_len), (TCP_HEADER_LEN as u16).to_be());
            frame.store16(ip, offset_of!(Ipv6Hdr, next_hdr), u16::from_ne_bytes([PROTO_TCP, TTL]));
            frame.store_addr(ip, offset_of!(Ipv6Hdr, src_addr), &flow.dst);
            frame.store_addr(ip, offset_of!(Ipv6Hdr, dst_addr), &flow.src);
        }
        // Written out: an iterator over the two addresses compiles to a loop the verifier cannot bound.
        sum += words(flow.src[0]) + words(flow.src[1]) + words(flow.src[2]) + words(flow.src[3]);
        sum += words(flow.dst[0]) + words(flow.dst[1]) + words(flow.dst[2]) + words(flow.dst[3]);
    } else {
        let ip = frame.window(l3, IPV4_HEADER_LEN).ok_or(reasons::DROP_BAD_IP_HEADER)?;
        // SAFETY: fields of the checked 20-byte header at even offsets.
        unsafe {
            frame.store16(ip, offset_of!(Ipv4Hdr, tot_len), ((IPV4_HEADER_LEN + TCP_HEADER_LEN) as u16).to_be());
            frame.store16(ip, offset_of!(Ipv4Hdr, id), 0);
            frame.store16(ip, offset_of!(Ipv4Hdr, frags), IPV4_DF);
            frame.store16(ip, offset_of!(Ipv4Hdr, ttl), u16::from_ne_bytes([TTL, PROTO_TCP]));
            frame.store16(ip, offset_of!(Ipv4Hdr, check), 0);
            frame.store32(ip, offset_of!(Ipv4Hdr, src_addr), flow.dst[3]);
            frame.store32(ip, offset_of!(Ipv4Hdr, dst_addr), flow.src[3]);
            let mut header = 0u64;
            let mut at = 0;
            while at < IPV4_HEADER_LEN {
                header += frame.load16(ip, at) as u64;
                at += 2;
            }
            frame.store16(ip, offset_of!(Ipv4Hdr, check), !fold(header));
        }
        sum += words(flow.src[3]) + words(flow.dst[3]);
    }
    // SAFETY: the checked 20-byte TCP header, even offsets.
    unsafe {
        frame.store16(tcp, offset_of!(TcpHdr, source), flow.dport);
        frame.store16(tcp, offset_of!(TcpHdr, dest), flow.sport);
        frame.store32(tcp, TCP_SEQ_AT, rst_seq);
        frame.store32(tcp, TCP_ACK_SEQ_AT, rst_ack);
        frame.store16(tcp, TCP_OFF_FLAGS_AT, u16::from_ne_bytes([(TCP_HEADER_LEN as u8 / 4) << 4, rst_flags]));
        frame.store16(tcp, TCP_WINDOW_AT, 0);
        frame.store16(tcp, TCP_CHECK_AT, 0);
        frame.store16(tcp, TCP_URG_AT, 0);
        let mut at = 0;
        while at < TCP_HEADER_LEN {
            sum += frame.load16(tcp, at) as u64;
            at += 2;
        }
        frame.store16(tcp, TCP_CHECK_AT, !fold(sum));
    }
    Ok(l4 + TCP_HEADER_LEN)
}

/// The two 16-bit halves of a word in memory order, summed (one's complement sums commute with the
/// byte order, so memory-order words give the memory-order checksum).
#[inline(always)]
fn words(w: u32) -> u64 {
    (w & 0xffff) as u64 + (w >> 16) as u64
}

#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

#[inline(always)]
fn swap_macs<F: Frame>(frame: &mut F) -> Result<(), Reason> {
    let eth = frame.window(0, offset_of!(EthHdr, ether_type)).ok_or(reasons::DROP_SHORT_FRAME)?;
    let (d, s) = (offset_of!(EthHdr, dst_addr), offset_of!(EthHdr, src_addr));
    // SAFETY: six 16-bit words inside the checked 12 bytes.
    unsafe {
        for at in [0, 2, 4] {
            let dst = frame.load16(eth, d + at);
            frame.store16(eth, d + at, frame.load16(eth, s + at));
            frame.store16(eth, s + at, dst);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    // The crate is no_std unless its `std` feature is on; the tests build frames in vectors.
    extern crate std;
    use std::vec::Vec;

    use super::*;
    use crate::{checksum, packet::{parse, SliceFrame}};

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0xcc, 1];
    const LB_MAC: [u8; 6] = [2, 0, 0, 0, 0xaa, 1];
    /// A 4-byte TCP option (MSS 1460): the RST must not carry it.
    const MSS: [u8; 4] = [2, 4, 0x05, 0xb4];

    /// Ethernet + IP + TCP (with the MSS option) + `payload`, checksums computed in full.
    fn segment(v6: bool, flags: u8, seq: u32, ack: u32, payload: &[u8]) -> Vec<u8> {
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&40000u16.to_be_bytes());
        tcp.extend_from_slice(&80u16.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.extend_from_slice(&[0x60, flags, 0xfa, 0xf0, 0, 0, 0, 0]);
        tcp.extend_from_slice(&MSS);
        tcp.extend_from_slice(payload);
        let mut f = Vec::new();
        f.extend_from_slice(&LB_MAC);
        f.extend_from_slice(&CLIENT_MAC);
        if v6 {
            let (src, dst) = (v6_addr(2), v6_addr(0x100));
            let check = checksum::l4_ipv6(src, dst, 6, &tcp);
            tcp[16..18].copy_from_slice(&check.to_be_bytes());
            f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
            f.extend_from_slice(&(tcp.len() as u16).to_be_bytes());
            f.extend_from_slice(&[6, 63]);
            f.extend_from_slice(&src);
            f.extend_from_slice(&dst);
        } else {
            let check = checksum::l4_ipv4([10, 0, 0, 2], [10, 0, 0, 100], 6, &tcp);
            tcp[16..18].copy_from_slice(&check.to_be_bytes());
            f.extend_from_slice(&[0x08, 0x00]);
            let mut ip = [0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 63, 6, 0, 0, 10, 0, 0, 2, 10, 0, 0, 100];
            ip[2..4].copy_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
            let check = checksum::ipv4_header(&ip);
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            f.extend_from_slice(&ip);
        }
        f.extend_from_slice(&tcp);
        f
    }

    fn v6_addr(last: u16) -> [u8; 16] {
        let mut a = [0u8; 16];
        a[..4].copy_from_slice(&[0xfd, 0, 0, 0x10]);
        a[14..].copy_from_slice(&last.to_be_bytes());
        a
    }

    fn reject(frame: &mut Vec<u8>) -> Result<(), Reason> {
        let packet = parse(&SliceFrame::new(frame)).unwrap();
        let len = tcp_reset(&mut SliceFrame::new(frame), &packet)?;
        frame.truncate(len);
        Ok(())
    }

    /// Checks a RST frame in full: MACs, addresses and ports swapped, lengths, both checksums.
    fn check_rst(f: &[u8], v6: bool, seq: u32, ack: u32, flags: u8) {
        assert_eq!((&f[..6], &f[6..12]), (&CLIENT_MAC[..], &LB_MAC[..]), "MACs swapped");
        let (l4, tcp) = if v6 {
            assert_eq!(f.len(), 14 + 40 + 20);
            assert_eq!(&f[18..22], &[0, 20, 6, 64], "payload length, next header, hop limit");
            assert_eq!((&f[22..38], &f[38..54]), (&v6_addr(0x100)[..], &v6_addr(2)[..]));
            (54, checksum::l4_ipv6(v6_addr(0x100), v6_addr(2), 6, &f[54..]))
        } else {
            assert_eq!(f.len(), 14 + 20 + 20);
            assert_eq!(checksum::ipv4_header(&f[14..34]), 0, "IPv4 header checksum");
            assert_eq!(&f[14..24], &[0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6]);
            assert_eq!(&f[26..34], &[10, 0, 0, 100, 10, 0, 0, 2]);
            (34, checksum::l4_ipv4([10, 0, 0, 100], [10, 0, 0, 2], 6, &f[34..]))
        };
        assert_eq!(tcp, 0, "TCP checksum over the pseudo-header");
        let t = &f[l4..];
        assert_eq!((&t[0..2], &t[2..4]), (&80u16.to_be_bytes()[..], &40000u16.to_be_bytes()[..]), "ports swapped");
        assert_eq!(u32::from_be_bytes(t[4..8].try_into().unwrap()), seq, "sequence");
        assert_eq!(u32::from_be_bytes(t[8..12].try_into().unwrap()), ack, "acknowledgment");
        assert_eq!((t[12], t[13]), (0x50, flags), "data offset 5, flags");
        assert_eq!(&t[14..16], &[0, 0], "window");
        assert_eq!(&t[18..20], &[0, 0], "urgent pointer");
    }

    #[test]
    fn a_syn_is_refused_with_rst_ack_of_its_sequence_plus_one_in_both_families() {
        for v6 in [false, true] {
            let mut f = segment(v6, TCP_SYN, 0xffff_fffe, 0, &[]);
            reject(&mut f).unwrap();
            check_rst(&f, v6, 0, 0xffff_ffff, TCP_RST | TCP_ACK);
        }
    }

    #[test]
    fn a_syn_with_data_is_acknowledged_past_its_data_and_the_data_cut_off() {
        for v6 in [false, true] {
            let mut f = segment(v6, TCP_SYN, 1000, 0, b"hello");
            reject(&mut f).unwrap();
            check_rst(&f, v6, 0, 1006, TCP_RST | TCP_ACK);
        }
    }

    #[test]
    fn a_segment_with_an_ack_gets_a_rst_in_the_peers_sequence_space() {
        for v6 in [false, true] {
            let mut f = segment(v6, TCP_ACK | TCP_FIN, 1000, 77_777, b"x");
            reject(&mut f).unwrap();
            check_rst(&f, v6, 77_777, 0, TCP_RST);
        }
        let mut fin = segment(false, TCP_FIN, 1000, 0, b"ab");
        reject(&mut fin).unwrap();
        check_rst(&fin, false, 0, 1003, TCP_RST | TCP_ACK);
    }

    #[test]
    fn refuses_what_must_not_or_cannot_be_answered() {
        let mut rst = segment(false, TCP_RST | TCP_ACK, 1, 2, &[]);
        let before = rst.clone();
        assert_eq!(reject(&mut rst), Err(reasons::DROP_NO_BACKEND), "a RST is never answered");
        assert_eq!(rst, before, "a refused frame is left untouched");
        let mut bad_offset = segment(false, TCP_SYN, 1, 0, &[]);
        bad_offset[14 + 20 + 12] = 0x40;
        assert_eq!(reject(&mut bad_offset), Err(reasons::DROP_NO_BACKEND), "data offset 4");
        let mut past_ip = segment(true, TCP_SYN, 1, 0, &[]);
        past_ip[14 + 40 + 12] = 0xf0;
        assert_eq!(reject(&mut past_ip), Err(reasons::DROP_NO_BACKEND), "data offset past the packet");
        let mut ip_past_frame = segment(false, TCP_SYN, 1, 0, &[]);
        ip_past_frame[17] += 8;
        assert_eq!(reject(&mut ip_past_frame), Err(reasons::DROP_NO_BACKEND), "IP length past the frame");
    }

    #[test]
    fn ipv4_options_are_not_answered() {
        let mut f = segment(false, TCP_SYN, 1, 0, &[]);
        // Turn the frame into one with a 4-byte IPv4 option (NOPs) before the TCP header.
        f.splice(34..34, [1u8, 1, 1, 1]);
        f[14] = 0x46;
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[24..26].copy_from_slice(&[0, 0]);
        let check = checksum::ipv4_header(&f[14..38]);
        f[24..26].copy_from_slice(&check.to_be_bytes());
        assert_eq!(reject(&mut f), Err(reasons::DROP_NO_BACKEND));
    }
}
