//! The codec against byte fixtures, every fixture also fed in two pieces split at
//! every offset (a read may end anywhere).

use super::*;

#[derive(Debug, PartialEq)]
struct Whole {
    status: u16,
    framing: Framing,
    keep_alive: bool,
    body: Vec<u8>,
    trailers: Option<HeaderMap>,
    /// Bytes left in the buffer after the body.
    rest: Vec<u8>,
}

/// Parse one response out of `parts` fed in order, then decode its body; `eof` after
/// the last part.
fn run(parts: &[&[u8]], head_request: bool, eof: bool) -> Result<Whole, H1Error> {
    let mut buf = BytesMut::new();
    let mut feed = parts.iter();
    let head = loop {
        if let Some(h) = parse_head(&mut buf, head_request)? {
            break h;
        }
        match feed.next() {
            Some(p) => buf.extend_from_slice(p),
            None => panic!("head incomplete"),
        }
    };
    let mut dec = Decoder::new(head.framing);
    let mut body = Vec::new();
    let mut trailers = None;
    loop {
        match dec.decode(&mut buf)? {
            Step::Frame(f) => match f.into_data() {
                Ok(d) => body.extend_from_slice(&d),
                Err(f) => trailers = f.into_trailers().ok(),
            },
            Step::End => break,
            Step::NeedMore => match feed.next() {
                Some(p) => buf.extend_from_slice(p),
                None if eof => {
                    dec.eof()?;
                    break;
                }
                None => panic!("body incomplete"),
            },
        }
    }
    // What arrived after the body stays in the buffer.
    for p in feed {
        buf.extend_from_slice(p);
    }
    Ok(Whole {
        status: head.status.as_u16(),
        framing: head.framing,
        keep_alive: head.keep_alive,
        body,
        trailers,
        rest: buf.to_vec(),
    })
}

/// `run` on `bytes` whole and split in two at every offset: all must agree.
fn each_split(bytes: &[u8], head_request: bool, eof: bool) -> Result<Whole, String> {
    let whole = run(&[bytes], head_request, eof).map_err(|e| e.to_string());
    for at in 0..=bytes.len() {
        let (a, b) = bytes.split_at(at);
        let split = run(&[a, b], head_request, eof).map_err(|e| e.to_string());
        assert_eq!(split, whole, "split at {at}");
    }
    // And one byte at a time.
    let bytes_one: Vec<&[u8]> = bytes.chunks(1).collect();
    assert_eq!(
        run(&bytes_one, head_request, eof).map_err(|e| e.to_string()),
        whole,
        "byte by byte"
    );
    whole
}

#[test]
fn content_length_body() {
    let w = each_split(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
        false,
        false,
    )
    .unwrap();
    assert_eq!(
        (w.status, w.framing, w.keep_alive),
        (200, Framing::Length(5), true)
    );
    assert_eq!(w.body, b"hello");
    assert!(w.rest.is_empty());
}

#[test]
fn header_values_are_kept_as_sent() {
    let mut buf = BytesMut::from(
        &b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nX-Obs: caf\xc3\xa9\r\n\r\n"[..],
    );
    let h = parse_head(&mut buf, false).unwrap().unwrap();
    let cookies: Vec<_> = h.headers.get_all("set-cookie").iter().collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    assert_eq!(h.headers["x-obs"].as_bytes(), b"caf\xc3\xa9");
    assert!(h.reason.is_none(), "canonical reason");
    assert!(buf.is_empty());
}

#[test]
fn a_custom_reason_phrase_is_kept() {
    let mut buf = BytesMut::from(&b"HTTP/1.1 200 Fine\r\nContent-Length: 0\r\n\r\n"[..]);
    let h = parse_head(&mut buf, false).unwrap().unwrap();
    assert_eq!(h.reason.as_deref(), Some(&b"Fine"[..]));
}

#[test]
fn chunked_body_with_extensions_and_trailers() {
    let w = each_split(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
          3;ext=1\r\nabc\r\n\
          A \t;name=\"q\"\r\n0123456789\r\n\
          0\r\nX-Sum: 42\r\nX-More: y\r\n\r\n",
        false,
        false,
    )
    .unwrap();
    assert_eq!(w.framing, Framing::Chunked);
    assert_eq!(w.body, b"abc0123456789");
    let t = w.trailers.expect("trailers");
    assert_eq!(t["x-sum"], "42");
    assert_eq!(t["x-more"], "y");
    assert!(w.keep_alive && w.rest.is_empty());
}

#[test]
fn chunked_body_without_trailers() {
    let w = each_split(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        false,
        false,
    )
    .unwrap();
    assert_eq!(
        (w.framing, &w.body[..], w.trailers.is_none()),
        (Framing::Chunked, &b"hi"[..], true)
    );
}

#[test]
fn bad_chunk_framing_is_an_error() {
    for bad in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2 x\r\nab\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n11111111111111111\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
    ] {
        let e = each_split(bad, false, false).expect_err("refused");
        assert!(e.contains("chunk"), "{e}");
    }
}

#[test]
fn a_chunked_body_cut_short_is_an_error() {
    for cut in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"[..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n",
    ] {
        let e = run(&[cut], false, true).expect_err("cut");
        assert!(matches!(e, H1Error::ShortChunked), "{e}");
    }
}

#[test]
fn a_length_body_cut_short_says_how_much_came() {
    let e = run(
        &[b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"],
        false,
        true,
    )
    .expect_err("cut");
    assert!(matches!(e, H1Error::ShortBody { got: 3, want: 10 }), "{e}");
}

#[test]
fn no_framing_reads_until_close_and_is_not_reused() {
    let w = each_split(b"HTTP/1.1 200 OK\r\nX: y\r\n\r\nuntil close", false, true).unwrap();
    assert_eq!(
        (w.framing, &w.body[..]),
        (Framing::Close, &b"until close"[..])
    );
    // Transfer-Encoding without chunked last: also until close.
    let w = each_split(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nzz",
        false,
        true,
    )
    .unwrap();
    assert_eq!((w.framing, &w.body[..]), (Framing::Close, &b"zz"[..]));
}

#[test]
fn interim_heads_are_skipped() {
    let w = each_split(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n\
          HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok",
        false,
        false,
    )
    .unwrap();
    assert_eq!((w.status, &w.body[..]), (201, &b"ok"[..]));
}

#[test]
fn switching_protocols_is_returned_without_body_or_reuse() {
    let w = run(
        &[b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\nraw"],
        false,
        false,
    )
    .unwrap();
    assert_eq!(
        (w.status, w.framing, w.keep_alive),
        (101, Framing::Empty, false)
    );
    assert_eq!(w.rest, b"raw");
}

#[test]
fn bodiless_responses_have_no_body_whatever_they_say() {
    for (resp, head) in [
        (&b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n"[..], true),
        (
            b"HTTP/1.1 204 No Content\r\nContent-Length: 50\r\n\r\n",
            false,
        ),
        (
            b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
        ),
    ] {
        let w = each_split(resp, head, false).unwrap();
        assert_eq!(
            (w.framing, w.body.len(), w.keep_alive),
            (Framing::Empty, 0, true)
        );
    }
}

#[test]
fn bytes_after_the_response_stay_in_the_buffer() {
    let w = run(
        &[b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA"],
        false,
        false,
    )
    .unwrap();
    assert_eq!((&w.body[..], &w.rest[..]), (&b"ok"[..], &b"EXTRA"[..]));
}

#[test]
fn content_length_values_must_agree() {
    let w = each_split(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\ncontent-length: 2\r\n\r\nok",
        false,
        false,
    )
    .unwrap();
    assert_eq!(w.framing, Framing::Length(2));
    for bad in [
        &b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: \r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999999\r\n\r\nok",
    ] {
        let e = run(&[bad], false, false).expect_err("refused");
        assert!(matches!(e, H1Error::ContentLength), "{e}");
    }
}

#[test]
fn connection_close_and_http10_are_not_reused() {
    let w = run(
        &[b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n"],
        false,
        false,
    )
    .unwrap();
    assert!(!w.keep_alive);
    let w = run(
        &[b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"],
        false,
        false,
    )
    .unwrap();
    assert!(!w.keep_alive);
    let e = run(
        &[b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"],
        false,
        false,
    )
    .expect_err("TE in 1.0");
    assert!(matches!(e, H1Error::TransferEncodingInHttp10), "{e}");
}

#[test]
fn bad_heads_are_refused() {
    for bad in [
        &b"HTTP/2.0 200 OK\r\n\r\n"[..],
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: a\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x01b\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
    ] {
        let mut buf = BytesMut::from(bad);
        assert!(
            parse_head(&mut buf, false).is_err(),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn over_limit_heads_are_refused() {
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let e = parse_head(&mut BytesMut::from(&many[..]), false).expect_err("too many");
    assert!(e.to_string().contains("too many headers"), "{e}");
    // A head still incomplete past the size limit is refused before it ends…
    let mut big = b"HTTP/1.1 200 OK\r\nx-big: ".to_vec();
    big.resize(MAX_HEAD + 1, b'a');
    let e = parse_head(&mut BytesMut::from(&big[..]), false).expect_err("too large");
    assert!(matches!(e, H1Error::HeadTooLarge), "{e}");
    // …and a complete one over it too.
    big.extend_from_slice(b"\r\n\r\n");
    let e = parse_head(&mut BytesMut::from(&big[..]), false).expect_err("too large");
    assert!(matches!(e, H1Error::HeadTooLarge), "{e}");
}

fn encoded(
    method: Method,
    target: &str,
    headers: &[(&str, &str)],
    host: Option<&str>,
    body: usize,
) -> String {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let host = host.map(|h| HeaderValue::from_str(h).unwrap());
    let mut out = Vec::new();
    encode_request(&mut out, &method, target, &map, host.as_ref(), body);
    String::from_utf8(out).unwrap()
}

#[test]
fn request_heads() {
    assert_eq!(
        encoded(
            Method::GET,
            "/a?b=1",
            &[("host", "h"), ("x-a", "1"), ("x-a", "2")],
            None,
            0
        ),
        "GET /a?b=1 HTTP/1.1\r\nhost: h\r\nx-a: 1\r\nx-a: 2\r\n\r\n"
    );
    // The body's length, whatever the map said; Transfer-Encoding never.
    assert_eq!(
        encoded(
            Method::POST,
            "/",
            &[("content-length", "9"), ("transfer-encoding", "chunked")],
            Some("b:1"),
            1234
        ),
        "POST / HTTP/1.1\r\nhost: b:1\r\ncontent-length: 1234\r\n\r\n"
    );
    // An empty-bodied POST keeps its `Content-Length: 0`; one without sends none (as hyper).
    assert_eq!(
        encoded(Method::POST, "/", &[("content-length", "0")], None, 0),
        "POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"
    );
    assert_eq!(
        encoded(Method::PUT, "/", &[], None, 0),
        "PUT / HTTP/1.1\r\n\r\n"
    );
    assert_eq!(
        encoded(Method::HEAD, "", &[], None, 0),
        "HEAD / HTTP/1.1\r\n\r\n"
    );
    assert_eq!(
        encoded(Method::from_bytes(b"PURGE").unwrap(), "/x", &[], None, 10),
        "PURGE /x HTTP/1.1\r\ncontent-length: 10\r\n\r\n"
    );
}

#[test]
fn digits_of_lengths() {
    for n in [0u64, 7, 10, 1234, u64::MAX] {
        assert_eq!(itoa_buf(n).as_bytes(), n.to_string().as_bytes());
    }
}

/// The indices `build_head` compares with are those of the shared table.
#[test]
fn hop_by_hop_indices_match_the_table() {
    use crate::hop_by_hop::hop_by_hop_index;
    assert_eq!(hop_by_hop_index(&header::CONNECTION), Some(HOP_CONNECTION));
    assert_eq!(
        hop_by_hop_index(&header::TRANSFER_ENCODING),
        Some(HOP_TRANSFER_ENCODING)
    );
}
