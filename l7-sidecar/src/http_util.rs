//! HTTP helpers every stage uses: the response body type (from `body`), JSON error
//! responses and hop-by-hop header handling. A leaf below all stages.

use crate::ctx::Req;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

pub use crate::body::{Body, BoxError};

pub fn full(b: impl Into<Bytes>) -> Body {
    Body::full(b)
}

/// The `error` code of a JSON error response, as a response extension: a trace names why
/// a stage refused without reading the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorCode(pub String);

pub fn json_error<B>(
    req: &Req<B>,
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<Body> {
    json_error_with_id(status, code, message, req.ctx().request_id_str())
}

pub fn json_error_with_id(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> Response<Body> {
    let body = serde_json::json!({ "error": code, "message": message, "status": status.as_u16(), "request_id": request_id });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.extensions_mut().insert(ErrorCode(code.to_string()));
    r
}

pub(crate) use crate::hop_by_hop::HOP_BY_HOP;

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
fn is_hop_by_hop_token(token: &str) -> bool {
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
const HOP_BY_HOP_LENGTHS: u32 = 1 << 2 | 1 << 7 | 1 << 10 | 1 << 16 | 1 << 17 | 1 << 18 | 1 << 19;

/// Whether every token of a `Connection` value names a `HOP_BY_HOP` field (so
/// nothing else has to be removed for it), as in `keep-alive` or `Upgrade`. The
/// values nearly every message carries are told apart without splitting.
fn only_hop_by_hop_tokens(v: &HeaderValue) -> bool {
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

/// Remove the hop-by-hop fields and those `Connection` names. One pass over the
/// field names finds which are present (usually none, or just `Connection:
/// keep-alive`); nothing is looked up or removed otherwise, and each field present
/// is looked up once, to remove it. This runs on every request and every response.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut present = 0u16;
    // Names only: each name once, however many values it has.
    for k in h.keys() {
        let len = k.as_str().len();
        if len >= 32 || HOP_BY_HOP_LENGTHS & (1 << len) == 0 {
            continue;
        }
        if let Some(i) = hop_by_hop_index(k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Headers named in Connection are hop-by-hop too (HOP_BY_HOP[0] is Connection).
    if present & 1 != 0 {
        if h.len() == h.keys_len() {
            // No field has a second value, so `remove` hands back Connection's only
            // one: read where it is removed, without a lookup to read it first.
            if let Some(v) = h.remove(header::CONNECTION) {
                if !only_hop_by_hop_tokens(&v) {
                    remove_named(h, std::iter::once(&v));
                }
            }
        } else {
            let all: Vec<HeaderValue> = h.get_all(header::CONNECTION).iter().cloned().collect();
            h.remove(header::CONNECTION);
            remove_named(h, all.iter().filter(|v| !only_hop_by_hop_tokens(v)));
        }
    }
    for (i, n) in HOP_BY_HOP.iter().enumerate().skip(1) {
        if present & (1 << i) != 0 {
            h.remove(n);
        }
    }
}

/// Remove the fields the `Connection` values `values` name (other than those of
/// `HOP_BY_HOP`, which go anyway).
fn remove_named<'a>(h: &mut HeaderMap, values: impl Iterator<Item = &'a HeaderValue>) {
    let mut named: Vec<HeaderName> = Vec::new();
    for v in values {
        let Ok(v) = v.to_str() else { continue };
        for token in v.split(',').map(str::trim) {
            if token.is_empty() || is_hop_by_hop_token(token) {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                named.push(n);
            }
        }
    }
    for n in named {
        h.remove(n);
    }
}

/// Join several `cookie` fields into one, with "; " (RFC 9113 §8.2.3: an HTTP/2
/// client may send one per cookie; HTTP/1.1 has one field, and many servers read
/// only the first). A request with one field or none is left as it is.
///
/// Empty (or blank) fields are skipped: no stray "; " at either end, and no empty
/// Cookie field at all when every one is empty.
pub fn join_cookie_fields(h: &mut HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    if all.next().is_none() || all.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for v in h.get_all(header::COOKIE) {
        let v = v.as_bytes().trim_ascii();
        if v.is_empty() {
            continue;
        }
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(v);
    }
    if joined.is_empty() {
        h.remove(header::COOKIE);
        return;
    }
    // Each part was a valid value, and "; " is valid between them.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

pub fn is_upgrade(h: &HeaderMap) -> bool {
    let conn_upgrade = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        });
    conn_upgrade && upgrades_to_websocket(h)
}

/// Whether the `Upgrade` fields name WebSocket and nothing else, however the list is
/// written: over several field lines, with empty elements (RFC 9110 §5.6.1.2: ignored).
pub fn upgrades_to_websocket(h: &HeaderMap) -> bool {
    let mut named = false;
    for line in h.get_all(header::UPGRADE) {
        let Ok(line) = line.to_str() else {
            return false;
        };
        for protocol in line.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if !protocol.eq_ignore_ascii_case("websocket") {
                return false;
            }
            named = true;
        }
    }
    named
}

/// `strip_hop_by_hop`, but the WebSocket upgrade crosses: `Connection: upgrade` and
/// `Upgrade: websocket`, the only hop-by-hop fields the switch needs on the next hop.
pub fn strip_hop_by_hop_keeping_websocket(h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_index_agrees_with_the_table() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(n), Some(i), "{n}");
        }
        for other in ["host", "content-length", "x-upgrade", "connections", "t"] {
            let n = HeaderName::from_static(other);
            assert_eq!(hop_by_hop_index(&n), None, "{other}");
        }
    }

    #[test]
    fn strip_removes_hop_by_hop_and_named_headers_only() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["content-type", "host"]);
    }

    #[test]
    fn the_usual_connection_values_remove_only_hop_by_hop_fields() {
        for conn in ["KEEP-ALIVE", "close", "Close"] {
            let mut h = HeaderMap::new();
            h.insert(header::CONNECTION, HeaderValue::from_static(conn));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.append(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
            h.append(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            h.insert("x-kept", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
            left.sort_unstable();
            assert_eq!(left, ["content-type", "x-kept"], "{conn}");
            assert_eq!(h.len(), 2, "{conn}: every value of a removed field goes");
        }
        // A second Connection field still names fields to remove.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().map(HeaderName::as_str).collect::<Vec<_>>(), ["host"]);
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.insert(header::HOST, HeaderValue::from_static("x"));
        join_cookie_fields(&mut h);
        let all: Vec<&HeaderValue> = h.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, [&HeaderValue::from_static("a=1; b=2")]);
        let mut one = HeaderMap::new();
        one.insert(header::COOKIE, HeaderValue::from_static("a=1; b=2"));
        join_cookie_fields(&mut one);
        assert_eq!(one.get(header::COOKIE).map(HeaderValue::as_bytes), Some(&b"a=1; b=2"[..]));
    }

    #[test]
    fn connection_tokens_are_matched_in_any_case() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Keep-Alive, X-Hop, , close"),
        );
        h.append(header::CONNECTION, HeaderValue::from_static("x-other"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);
        assert!(is_hop_by_hop_token("Transfer-Encoding") && is_hop_by_hop_token("TE"));
        for n in &HOP_BY_HOP {
            assert!(HOP_BY_HOP_LENGTHS & (1 << n.as_str().len()) != 0, "{n}");
        }
        assert!(!is_hop_by_hop_token("transfer-encodings") && !is_hop_by_hop_token(""));
    }
}
