//! The HTTP/1.1 client codec of pooled upstream connections (RFC 9112), without I/O:
//! a request head encoded into the connection's write buffer, a response head parsed
//! from its read buffer, the response body decoded from it frame by frame.
//!
//! Purpose-built for the one exchange the proxy makes: a buffered request (its body's
//! length known) and a streamed response. hyper's client connection did the same
//! through a general state machine, a body channel and a header map built by
//! copying; here header values are slices of the frozen head (`Bytes`), not copies.
//!
//! Limits: a response head (and a chunked body's trailer section) of at most
//! `MAX_HEAD` bytes and `MAX_HEADERS` fields; a chunk-size line of at most
//! `MAX_CHUNK_LINE` bytes. Past them the response is refused (the client gets 502).

use crate::hop_by_hop::{hop_by_hop_index, only_hop_by_hop_tokens};
use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

mod decode;
pub use decode::{Decoder, Step};

/// Response head (status line and fields) size limit. nginx's default buffer for
/// it is 4–8 KiB; hyper's client allowed ~400 KiB. 64 KiB bounds the memory a
/// backend can make a connection hold while still passing big cookie sets.
pub const MAX_HEAD: usize = 64 * 1024;
/// Fields per response head (and per trailer section): hyper's client default.
pub const MAX_HEADERS: usize = 100;
/// A chunk-size line with its extensions (which are ignored).
pub const MAX_CHUNK_LINE: usize = 4096;

/// Why a response could not be read. Each names the part of the message at fault.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("invalid response head: {0}")]
    Head(httparse::Error),
    #[error("response head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("invalid status code {0} in the response status line")]
    Status(u16),
    #[error("invalid Content-Length in the response head")]
    ContentLength,
    #[error("Transfer-Encoding in an HTTP/1.0 response")]
    TransferEncodingInHttp10,
    #[error("invalid header field {name:?} in the response head")]
    Field { name: String },
    #[error("invalid chunk size line in the response body")]
    ChunkSize,
    #[error("chunk data not followed by CRLF in the response body")]
    ChunkEnd,
    #[error("invalid trailer section of the chunked response body: {0}")]
    Trailers(String),
    #[error("connection closed after {got} of {want} response body bytes")]
    ShortBody { got: u64, want: u64 },
    #[error("connection closed inside a chunked response body")]
    ShortChunked,
    #[error("reading the response body: {0}")]
    Read(std::io::Error),
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// HEAD request, 1xx, 204, 304.
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes (no framing, or a Transfer-Encoding not ending in chunked).
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// The reason phrase when it is not the status' canonical one (passed on as
    /// hyper passes it: `hyper::ext::ReasonPhrase`).
    pub reason: Option<Bytes>,
    pub framing: Framing,
    /// The connection may carry another request after this response's body: HTTP/1.1
    /// without `Connection: close`, and no protocol switch.
    pub keep_alive: bool,
    /// `headers` still hold hop-by-hop fields: `Connection` named others, and
    /// `http_util::strip_hop_by_hop` must remove them. Otherwise they were left out
    /// while the map was built (the same fields, without the map lookups after).
    pub hop_by_hop_left: bool,
}

/// Write the request head for `body_len` body bytes into `dst`.
///
/// `headers` go as given (the caller stripped hop-by-hop fields and set Host; `host`
/// is written first when the map has none), except `Content-Length` and
/// `Transfer-Encoding`: the body is always sent with its length. `Content-Length` is
/// written when the body is not empty or the map carried one (as hyper sent a `Full`
/// body: a bodiless GET gets none, a `Content-Length: 0` POST keeps it).
pub fn encode_request(
    dst: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    host: Option<&HeaderValue>,
    body_len: usize,
) {
    dst.reserve(64 + target.len() + headers.len() * 32);
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    dst.extend_from_slice(b" HTTP/1.1\r\n");
    if let Some(h) = host {
        put_field(dst, b"host", h.as_bytes());
    }
    let mut had_length = false;
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            had_length = true;
            continue;
        }
        if name == header::TRANSFER_ENCODING {
            continue;
        }
        put_field(dst, name.as_str().as_bytes(), value.as_bytes());
    }
    if body_len > 0 || had_length {
        let digits = itoa_buf(body_len as u64);
        put_field(dst, b"content-length", digits.as_bytes());
    }
    dst.extend_from_slice(b"\r\n");
}

fn put_field(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

/// Decimal digits of `n`, without a formatter.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: u64) -> Digits {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Digits { buf, start: i }
}

/// Field positions in the head buffer: name start/end, value start/end.
type Indices = [u32; 4];

/// Parse the response head at the start of `buf`, consuming it (and any interim `1xx`
/// heads before it, which are skipped; `101` is returned, for the caller to refuse).
/// `Ok(None)`: incomplete, read more. `head_request`: the request was HEAD (no body).
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, H1Error> {
    parse_head_with(buf, head_request, true)
}

/// `parse_head`; `strip`: leave hop-by-hop fields out of the map where that is the
/// same as `strip_hop_by_hop` on it (see `Head::hop_by_hop_left`).
pub(crate) fn parse_head_with(
    buf: &mut BytesMut,
    head_request: bool,
    strip: bool,
) -> Result<Option<Head>, H1Error> {
    loop {
        if buf.is_empty() {
            return Ok(None);
        }
        let mut idx: [Indices; MAX_HEADERS] = [[0; 4]; MAX_HEADERS];
        let (len, code, version, reason_at, n) = {
            let mut fields = [std::mem::MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
            let mut res = httparse::Response::new(&mut []);
            let bytes: &[u8] = buf;
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut res,
                bytes,
                &mut fields,
            ) {
                Ok(httparse::Status::Complete(len)) => {
                    if len > MAX_HEAD {
                        return Err(H1Error::HeadTooLarge);
                    }
                    let base = bytes.as_ptr() as usize;
                    let at = |s: &[u8]| (s.as_ptr() as usize - base) as u32;
                    for (i, f) in res.headers.iter().enumerate() {
                        let ns = at(f.name.as_bytes());
                        let vs = at(f.value);
                        idx[i] = [ns, ns + f.name.len() as u32, vs, vs + f.value.len() as u32];
                    }
                    let reason = res.reason.unwrap_or("");
                    let reason_at = (at(reason.as_bytes()), reason.len() as u32);
                    (
                        len,
                        res.code.unwrap_or(0),
                        res.version.unwrap_or(0),
                        reason_at,
                        res.headers.len(),
                    )
                }
                Ok(httparse::Status::Partial) => {
                    if buf.len() > MAX_HEAD {
                        return Err(H1Error::HeadTooLarge);
                    }
                    return Ok(None);
                }
                Err(httparse::Error::TooManyHeaders) => {
                    return Err(H1Error::Head(httparse::Error::TooManyHeaders))
                }
                Err(e) => return Err(H1Error::Head(e)),
            }
        };
        let status = StatusCode::from_u16(code).map_err(|_| H1Error::Status(code))?;
        if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
            // 100 Continue, 103 Early Hints…: the real answer follows.
            buf.advance(len);
            continue;
        }
        let head = buf.split_to(len).freeze();
        return build_head(
            &head,
            &idx[..n],
            status,
            version,
            reason_at,
            head_request,
            strip,
        )
        .map(Some);
    }
}

fn build_head(
    head: &Bytes,
    idx: &[Indices],
    status: StatusCode,
    version: u8,
    (reason_start, reason_len): (u32, u32),
    head_request: bool,
    strip: bool,
) -> Result<Head, H1Error> {
    let version = if version == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut keep_alive = version == Version::HTTP_11;
    let mut headers = HeaderMap::with_capacity(idx.len());
    // What framing needs is noted on the way: no lookups in the map afterwards.
    let mut te_last: Option<HeaderValue> = None;
    let mut length: Result<Option<u64>, H1Error> = Ok(None);
    for &[ns, ne, vs, ve] in idx {
        let raw = &head[ns as usize..ne as usize];
        let name = HeaderName::from_bytes(raw).map_err(|_| H1Error::Field {
            name: String::from_utf8_lossy(raw).into_owned(),
        })?;
        let value =
            HeaderValue::from_maybe_shared(head.slice(vs as usize..ve as usize)).map_err(|_| {
                H1Error::Field {
                    name: name.as_str().to_owned(),
                }
            })?;
        if name == header::CONTENT_LENGTH {
            if let Ok(prev) = length {
                length = content_length(prev, &value);
            }
        }
        match hop_by_hop_index(&name) {
            None => {}
            Some(hop) if strip => {
                // Hop-by-hop: not passed on (what `strip_hop_by_hop` would remove).
                if hop == HOP_CONNECTION {
                    if has_token(value.as_bytes(), b"close") {
                        keep_alive = false;
                    }
                    if !only_hop_by_hop_tokens(&value) {
                        // It names other fields to remove, maybe ones already in the
                        // map: done over the whole map instead (`hop_by_hop_left`).
                        return build_head(
                            head,
                            idx,
                            status,
                            version_byte(version),
                            (reason_start, reason_len),
                            head_request,
                            false,
                        );
                    }
                } else if hop == HOP_TRANSFER_ENCODING {
                    te_last = Some(value);
                }
                continue;
            }
            Some(hop) => {
                if hop == HOP_CONNECTION && has_token(value.as_bytes(), b"close") {
                    keep_alive = false;
                } else if hop == HOP_TRANSFER_ENCODING {
                    te_last = Some(value.clone());
                }
            }
        }
        headers.append(name, value);
    }
    let reason = {
        let r = &head[reason_start as usize..(reason_start + reason_len) as usize];
        (status.canonical_reason().map(str::as_bytes) != Some(r))
            .then(|| head.slice(reason_start as usize..(reason_start + reason_len) as usize))
    };
    let framing = framing(status, version, te_last.as_ref(), length, head_request)?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        keep_alive = false;
    }
    Ok(Head {
        status,
        version,
        headers,
        reason,
        framing,
        keep_alive,
        hop_by_hop_left: !strip,
    })
}

fn version_byte(v: Version) -> u8 {
    u8::from(v == Version::HTTP_11)
}

/// `HOP_BY_HOP` indices (`hop_by_hop`) of the fields framing and reuse read.
const HOP_CONNECTION: usize = 0;
const HOP_TRANSFER_ENCODING: usize = 7;

/// One more Content-Length field, after `prev`: comma-separated values, all equal.
fn content_length(prev: Option<u64>, value: &HeaderValue) -> Result<Option<u64>, H1Error> {
    let mut length = prev;
    for part in value.as_bytes().split(|&b| b == b',') {
        let n = digits(trim(part)).ok_or(H1Error::ContentLength)?;
        if length.is_some_and(|l| l != n) {
            return Err(H1Error::ContentLength);
        }
        length = Some(n);
    }
    Ok(length)
}

/// RFC 9112 §6.3, in its order (as hyper's client decides it). `te_last`: the last
/// Transfer-Encoding field; `length`: the Content-Length fields' agreed value.
fn framing(
    status: StatusCode,
    version: Version,
    te_last: Option<&HeaderValue>,
    length: Result<Option<u64>, H1Error>,
    head_request: bool,
) -> Result<Framing, H1Error> {
    if head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(Framing::Empty);
    }
    if let Some(last) = te_last {
        if version == Version::HTTP_10 {
            return Err(H1Error::TransferEncodingInHttp10);
        }
        let chunked = last
            .as_bytes()
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|t| trim(t).eq_ignore_ascii_case(b"chunked"));
        return Ok(if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        });
    }
    Ok(length?.map_or(Framing::Close, Framing::Length))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A decimal number without sign, as a length (overflow is invalid).
fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Whether a comma-separated field value has `token` (any case).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests;
