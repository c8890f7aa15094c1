//! The checks an upstream response head passes before it is handed on: framing the
//! gateway can represent, a status in range, one plain `Content-Length`.

use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use hyper::body::Body as _;

/// Why an upstream response head cannot be passed on.
#[derive(Debug, thiserror::Error)]
pub enum BadResponse {
    /// Upgrades go through `tunnel`; here the request asked for none, and after a
    /// 101 the connection no longer speaks HTTP.
    #[error("101 Switching Protocols to a request that asked for no upgrade")]
    UnsolicitedUpgrade,
    /// RFC 9112 §6.3: Transfer-Encoding wins, but a sender of both may be
    /// smuggling, and the Content-Length would go on next to the de-chunked body.
    #[error("response with both Content-Length and Transfer-Encoding")]
    LengthAndTransferEncoding,
    /// A transfer coding other than chunked (`gzip, chunked`): hyper removes the
    /// chunking only, and the gateway cannot say in a response head that the
    /// rest of the body is still coded (it is no content coding).
    #[error("response with transfer coding {0:?}, which cannot be passed on")]
    TransferCoding(String),
    /// RFC 9110 §15: status codes are 100–599; hyper reads any three digits.
    #[error("response status {0} outside 100-599")]
    Status(u16),
    /// A Content-Length list whose values are no plain numbers (hyper refuses
    /// lists whose numbers differ).
    #[error("response Content-Length {0:?} is no valid length")]
    ContentLength(String),
}

/// Refuse upstream answers whose framing is ambiguous or that switched protocols
/// unasked. (Several differing Content-Length values hyper refuses itself.) Cheap on
/// the usual response: the Content-Length lookup happens only when the body's length
/// is not known from it (chunked or close-delimited).
///
/// A Content-Length that hyper accepted in a lenient spelling (`2, 2`, `0002`) is
/// replaced by the plain number (RFC 9110 §8.6 lets a recipient do so), rather
/// than passed on for the client to read in its own way.
pub(super) fn passable(resp: &mut Response<hyper::body::Incoming>) -> Result<(), BadResponse> {
    let status = resp.status();
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(BadResponse::UnsolicitedUpgrade);
    }
    if status.as_u16() > 599 {
        return Err(BadResponse::Status(status.as_u16()));
    }
    if resp.body().size_hint().exact().is_none() {
        if resp.headers().contains_key(header::CONTENT_LENGTH) {
            return Err(BadResponse::LengthAndTransferEncoding);
        }
        return only_chunked(resp.headers());
    }
    normalise_content_length(resp.headers_mut())
}

/// Refuse transfer codings other than one `chunked` (see
/// `BadResponse::TransferCoding`): `chunked` twice, in one field or two, is
/// "chunked, chunked", which RFC 9112 §6.1 forbids and hyper decodes only once.
fn only_chunked(h: &HeaderMap) -> Result<(), BadResponse> {
    let mut chunked = 0;
    for v in h.get_all(header::TRANSFER_ENCODING) {
        let text = String::from_utf8_lossy(v.as_bytes());
        for c in text.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            if !c.eq_ignore_ascii_case("chunked") {
                return Err(BadResponse::TransferCoding(text.into_owned()));
            }
            chunked += 1;
            if chunked > 1 {
                return Err(BadResponse::TransferCoding(codings(h)));
            }
        }
    }
    Ok(())
}

/// Every Transfer-Encoding field, joined (for the error).
fn codings(h: &HeaderMap) -> String {
    let all: Vec<_> = h
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect();
    all.join(", ")
}

/// One Content-Length field of plain digits (no leading zero) stays as it is; any
/// other spelling of one number is replaced by that number.
fn normalise_content_length(h: &mut HeaderMap) -> Result<(), BadResponse> {
    let Some(v) = h.get(header::CONTENT_LENGTH) else {
        return Ok(());
    };
    let b = v.as_bytes();
    let plain = !b.is_empty()
        && b.iter().all(u8::is_ascii_digit)
        && (b[0] != b'0' || b.len() == 1);
    // No field with a second value (`len` counts values, `keys_len` names): then
    // Content-Length has this one only, without a second lookup to tell.
    if plain && (h.len() == h.keys_len() || h.get_all(header::CONTENT_LENGTH).iter().count() == 1) {
        return Ok(());
    }
    let mut value: Option<u64> = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        let bad = || BadResponse::ContentLength(String::from_utf8_lossy(v.as_bytes()).into_owned());
        for part in v.to_str().map_err(|_| bad())?.split(',').map(str::trim) {
            if part.is_empty() || !part.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            let n: u64 = part.parse().map_err(|_| bad())?;
            if value.is_some_and(|m| m != n) {
                return Err(bad());
            }
            value = Some(n);
        }
    }
    if let Some(n) = value {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cl(values: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(header::CONTENT_LENGTH, HeaderValue::from_static(v));
        }
        h.insert(header::DATE, HeaderValue::from_static("x"));
        h
    }

    #[test]
    fn content_length_spellings_of_one_number_become_that_number() {
        for (given, want) in [
            (&["2"][..], "2"),
            (&["0"][..], "0"),
            (&["2, 2"][..], "2"),
            (&["0002"][..], "2"),
            (&["2", "2"][..], "2"),
            (&["00"][..], "0"),
        ] {
            let mut h = cl(given);
            normalise_content_length(&mut h).unwrap_or_else(|e| panic!("{given:?}: {e}"));
            let all: Vec<&[u8]> = h.get_all(header::CONTENT_LENGTH).iter().map(HeaderValue::as_bytes).collect();
            assert_eq!(all, [want.as_bytes()], "{given:?}");
        }
        for bad in [&["2, 3"][..], &["2", "3"][..], &["+2"][..], &["2,"][..], &["x"][..]] {
            let mut h = cl(bad);
            assert!(
                matches!(normalise_content_length(&mut h), Err(BadResponse::ContentLength(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn only_the_chunked_coding_passes() {
        let mut h = HeaderMap::new();
        h.append(header::TRANSFER_ENCODING, HeaderValue::from_static("Chunked"));
        assert!(only_chunked(&h).is_ok());
        let mut twice = h.clone();
        twice.append(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        let e = only_chunked(&twice).expect_err("chunked twice");
        assert!(e.to_string().contains("Chunked, chunked"), "{e}");
        let one = HeaderMap::from_iter([(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked , chunked"))]);
        assert!(only_chunked(&one).is_err(), "chunked twice in one field");
        h.append(header::TRANSFER_ENCODING, HeaderValue::from_static("gzip"));
        let e = only_chunked(&h).expect_err("gzip");
        assert!(e.to_string().contains("gzip"), "{e}");
    }
}
