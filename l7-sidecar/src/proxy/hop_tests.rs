//! The upstream client's parser (`conns::h1`) leaves hop-by-hop fields out of the
//! response map while building it, instead of `strip_hop_by_hop` over the map after.

use crate::conns::h1;
use crate::http_util::strip_hop_by_hop;
use bytes::BytesMut;

/// Leaving hop-by-hop fields out while the map is built must remove exactly what
/// `strip_hop_by_hop` removes from the whole map (a security check: a field the
/// backend's `Connection` names must not reach the client).
#[test]
fn hop_by_hop_fields_left_out_while_parsing_match_strip_hop_by_hop() {
    let heads: &[&[u8]] = &[
        b"HTTP/1.1 200 OK\r\nServer: n\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nCONNECTION: Keep-Alive, Upgrade\r\nUpgrade: h2c\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Secret: 1\r\nConnection: x-secret\r\nX-Other: 2\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nConnection: X-Secret, keep-alive\r\nx-secret: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: caf\xc3\xa9\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-t\r\nTE: trailers\r\nProxy-Authenticate: Basic\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: x\r\nX-Kept: y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: ,  ,\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nConnection: keep-alive\r\nKeep-Alive: x\r\n\r\n",
    ];
    for raw in heads {
        let text = String::from_utf8_lossy(raw);
        let fast = h1::parse_head(&mut BytesMut::from(*raw), false)
            .unwrap()
            .unwrap();
        let full = h1::parse_head_with(&mut BytesMut::from(*raw), false, false)
            .unwrap()
            .unwrap();
        assert!(full.hop_by_hop_left);
        let mut fast_map = fast.headers.clone();
        if fast.hop_by_hop_left {
            strip_hop_by_hop(&mut fast_map);
        }
        let mut full_map = full.headers.clone();
        strip_hop_by_hop(&mut full_map);
        assert_eq!(fast_map, full_map, "{text}");
        assert_eq!(
            (fast.framing, fast.keep_alive),
            (full.framing, full.keep_alive),
            "{text}"
        );
    }
    // The usual response (Connection: keep-alive) needs no pass over the map.
    let usual = h1::parse_head(&mut BytesMut::from(heads[0]), false)
        .unwrap()
        .unwrap();
    assert!(!usual.hop_by_hop_left);
    assert!(!usual.headers.contains_key(http::header::CONNECTION));
}
