use super::*;
use crate::{
    addr,
    packet::{parse, translate, End, SliceFrame, TCP_ACK},
};
use proptest::prelude::*;

fn v4(a: [u8; 4]) -> Addr {
    addr::from_v4_word(u32::from_ne_bytes(a))
}

/// Ethernet + IPv4 + TCP (ACK), no payload; checksums are not checked by the parser.
fn tcp_frame(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> [u8; 54] {
    let mut f = [0u8; 54];
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14..26].copy_from_slice(&[0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0]);
    f[26..30].copy_from_slice(&src);
    f[30..34].copy_from_slice(&dst);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[46] = 0x50;
    f[47] = TCP_ACK;
    f
}

#[test]
fn the_reply_key_is_what_the_backend_answers_with() {
    let mut f = tcp_frame([10, 0, 0, 1], 40000, [10, 0, 0, 100], 80);
    let client = parse(&SliceFrame::new(&mut f)).unwrap();
    let backend = v4([192, 168, 7, 9]);
    translate(&mut SliceFrame::new(&mut f), &client, End::Destination, &backend, 8080u16.to_be()).unwrap();
    // The backend answers the translated packet: addresses and ports swapped.
    let mut reply = tcp_frame([192, 168, 7, 9], 8080, [10, 0, 0, 1], 40000);
    let seen_by_backend = parse(&SliceFrame::new(&mut f)).unwrap().flow;
    assert_eq!((seen_by_backend.dst, u16::from_be(seen_by_backend.dport)), (backend, 8080));
    let answer = parse(&SliceFrame::new(&mut reply)).unwrap().flow;
    assert_eq!(client.flow.reply_from(&backend, 8080u16.to_be()), answer);
    assert_eq!(answer.request_to(&client.flow.dst, client.flow.dport), client.flow);
}

proptest! {
    #[test]
    fn the_reply_key_reverses_the_translated_flow(
        src in any::<[u32; 4]>(), dst in any::<[u32; 4]>(), backend in any::<[u32; 4]>(),
        sport in any::<u16>(), dport in any::<u16>(), bport in any::<u16>(), proto in prop::sample::select(&[PROTO_TCP, PROTO_UDP][..]),
    ) {
        let flow = FlowKey { src, dst, sport, dport, proto, _pad: [0; 3] };
        let reply = flow.reply_from(&backend, bport);
        prop_assert_eq!((reply.src, reply.sport, reply.dst, reply.dport, reply.proto), (backend, bport, src, sport, proto));
        prop_assert_eq!(reply._pad, [0; 3]);
        prop_assert_eq!(reply.request_to(&dst, dport), flow);
        // Untranslated (the backend is the destination), it is the flow reversed: twice is the flow.
        let reversed = flow.reply_from(&dst, dport);
        prop_assert_eq!(reversed.reply_from(&reversed.dst, reversed.dport), flow);
    }
}
