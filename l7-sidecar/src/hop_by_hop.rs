//! Which header fields are hop-by-hop (RFC 9110 §7.6.1): the table and the cheap
//! name tests `http_util::strip_hop_by_hop` and the upstream client's response parser
//! (`conns::h1`) share. A leaf.

use http::{header, HeaderName, HeaderValue};

/// `static`, not `const`: a const array would be built (and dropped) at every use.
pub(crate) static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The index of `name` in `HOP_BY_HOP`. A `match` on the name's text compiles to a
/// length switch and one comparison; comparing it with each of the nine `HeaderName`s
/// cost a few hundred instructions per header map (measured with callgrind).
pub(crate) fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    hop_by_hop_text_index(name.as_str().as_bytes())
}

/// `hop_by_hop_index` of a lower-case name's bytes.
fn hop_by_hop_text_index(name: &[u8]) -> Option<usize> {
    Some(match name {
        b"connection" => 0,
        b"keep-alive" => 1,
        b"proxy-connection" => 2,
        b"proxy-authenticate" => 3,
        b"proxy-authorization" => 4,
        b"te" => 5,
        b"trailer" => 6,
        b"transfer-encoding" => 7,
        b"upgrade" => 8,
        _ => return None,
    })
}

/// Whether a `Connection` token (any case) names a field of `HOP_BY_HOP`.
pub(crate) fn is_hop_by_hop_token(token: &str) -> bool {
    let mut lower = [0u8; 19];
    let Some(buf) = lower.get_mut(..token.len()) else {
        return false;
    };
    for (d, s) in buf.iter_mut().zip(token.bytes()) {
        *d = s.to_ascii_lowercase();
    }
    hop_by_hop_text_index(buf).is_some()
}

/// Lengths of the `HOP_BY_HOP` names, as a bit set: most fields (`content-type`,
/// `date`, `server`, ...) are told apart by their length alone.
pub(crate) const HOP_BY_HOP_LENGTHS: u32 =
    1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;

/// Whether every token of a `Connection` value names a `HOP_BY_HOP` field (so
/// nothing else has to be removed for it), as in `keep-alive` or `Upgrade`. The
/// values nearly every message carries are told apart without splitting.
pub(crate) fn only_hop_by_hop_tokens(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    // Exact spellings first: a byte comparison, where ignoring case costs a few
    // instructions per byte.
    if b == b"keep-alive"
        || b == b"close"
        || b.eq_ignore_ascii_case(b"keep-alive")
        || b.eq_ignore_ascii_case(b"close")
    {
        return true;
    }
    v.to_str().is_ok_and(|v| {
        v.split(',')
            .map(str::trim)
            .all(|t| t.is_empty() || is_hop_by_hop_token(t))
    })
}
