//! Parsing and rewriting of the frames the data plane balances, written once over the [`Frame`]
//! trait: the XDP program runs it over packet memory, the host (unit tests, fuzzers) over byte
//! slices, where [`SliceFrame`] also checks that no access strays outside a bounds-checked window.

mod frame;
mod parse;
mod reject;
mod rewrite;
mod source;

pub use frame::{Frame, SliceFrame, SliceWindow};
pub use parse::{parse, Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};
pub use reject::tcp_reset;
pub use rewrite::{set_macs, translate, End};
pub use source::martian_source;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{addr, checksum, reasons};

    /// Ethernet + IPv4 + TCP from 10.0.0.1:40000 to 10.0.0.2:80 with "hi" as payload, checksums right.
    fn tcp_frame() -> [u8; 56] {
        let mut f = [0u8; 56];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip.copy_from_slice(&[0x45, 0, 0, 42, 0, 1, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        let check = checksum::ipv4_header(ip);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        f[34..38].copy_from_slice(&[0x9c, 0x40, 0, 80]);
        f[46] = 0x50;
        f[47] = TCP_SYN;
        f[54..56].copy_from_slice(b"hi");
        let check = checksum::l4_ipv4([10, 0, 0, 1], [10, 0, 0, 2], 6, &f[34..56]);
        f[50..52].copy_from_slice(&check.to_be_bytes());
        f
    }

    #[test]
    fn parses_a_tcp_frame() {
        let mut f = tcp_frame();
        let p = parse(&SliceFrame::new(&mut f)).unwrap();
        assert_eq!((p.l3_offset, p.l4_offset, p.ipv6, p.vlan, p.len, p.ip_len), (14, 34, false, false, 56, 42));
        assert_eq!(p.flow.src, addr::from_v4_word(u32::from_ne_bytes([10, 0, 0, 1])));
        assert_eq!((u16::from_be(p.flow.sport), u16::from_be(p.flow.dport), p.flow.proto), (40000, 80, 6));
        assert_eq!(p.tcp_flags, TCP_SYN);
    }

    #[test]
    fn refusals_name_the_first_bad_layer() {
        let mut f = tcp_frame();
        assert_eq!(parse(&SliceFrame::new(&mut f[..13])), Err(reasons::DROP_SHORT_FRAME));
        assert_eq!(parse(&SliceFrame::new(&mut f[..33])), Err(reasons::DROP_BAD_IP_HEADER));
        assert_eq!(parse(&SliceFrame::new(&mut f[..53])), Err(reasons::DROP_TRUNCATED_L4));
        f[20] = 0x20; // more fragments
        assert_eq!(parse(&SliceFrame::new(&mut f)), Err(reasons::PASS_FRAGMENT));
    }

    #[test]
    fn translating_there_and_back_restores_every_byte() {
        let original = tcp_frame();
        let mut f = original;
        let backend = addr::from_v4_word(u32::from_ne_bytes([192, 168, 7, 9]));
        let p = parse(&SliceFrame::new(&mut f)).unwrap();
        translate(&mut SliceFrame::new(&mut f), &p, End::Destination, &backend, 8080u16.to_be()).unwrap();
        assert_eq!(&f[30..34], &[192, 168, 7, 9]);
        assert_eq!(&f[36..38], &8080u16.to_be_bytes());
        assert_eq!(checksum::ipv4_header(&f[14..34]), 0, "IPv4 header checksum after the rewrite");
        let q = parse(&SliceFrame::new(&mut f)).unwrap();
        translate(&mut SliceFrame::new(&mut f), &q, End::Destination, &p.flow.dst, p.flow.dport).unwrap();
        assert_eq!(f, original);
    }
}
