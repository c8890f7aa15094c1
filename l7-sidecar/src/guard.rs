//! Request-smuggling checks, on every request of a connection.
//!
//! Most framing attacks are refused by hyper's own parser, on every request: differing
//! or invalid `Content-Length`s, `Transfer-Encoding` whose last coding is not
//! `chunked`, `Transfer-Encoding` in HTTP/1.0, obs-folded header lines. This module
//! adds, judged on what hyper parsed, a `Transfer-Encoding` other than exactly one
//! `chunked` (no other transfer coding is decoded here), and, from the raw-byte
//! detector in `crate::smuggle`, requests that had both `Content-Length` and
//! `Transfer-Encoding` (hyper hides that). Then header count and path checks.

use crate::ctx::{ClientHeaderCount, ConnInfo, RequestIndex};
use crate::http_util::json_error;
use crate::http_util::Body;
use crate::stage::{run, Next};
use http::{header, HeaderValue, Request, Response, StatusCode};

pub use crate::smuggle::{SmuggleGuard, Smuggled};

fn bad_request<B>(req: &Request<B>, code: &str, message: &str, close: bool) -> Response<Body> {
    let mut r = json_error(req, StatusCode::BAD_REQUEST, code, message);
    if close {
        // The connection's framing is in doubt: do not read another request from it.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Why a request's framing is refused, judged on the headers as hyper parsed them
/// (before hop-by-hop headers are stripped: `client_headers_stage` calls this first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadFraming(pub &'static str);

pub fn framing_error<B>(req: &Request<B>) -> Option<BadFraming> {
    let index = req.extensions().get::<RequestIndex>().map_or(0, |i| i.0);
    let flagged = req
        .extensions()
        .get::<ConnInfo>()
        .is_some_and(|c| c.smuggled.flagged(index));
    let h = req.headers();
    if flagged
        || (h.contains_key(header::CONTENT_LENGTH) && h.contains_key(header::TRANSFER_ENCODING))
    {
        return Some(BadFraming("both Content-Length and Transfer-Encoding"));
    }
    // hyper accepts any list ending in `chunked`; only a single plain `chunked` is
    // unambiguous for every server behind us.
    let mut te = h.get_all(header::TRANSFER_ENCODING).iter();
    let te_ok = match (te.next(), te.next()) {
        (None, _) => true,
        (Some(v), None) => v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"),
        (Some(_), Some(_)) => false,
    };
    (!te_ok).then_some(BadFraming("unsupported Transfer-Encoding"))
}

/// Reject smuggling attempts, header floods and unsafe paths before any routing
/// work, and normalise the path (see `crate::path`) for every later stage.
/// `max_headers`: `server.max_headers` of the request's config generation.
pub async fn hardening_stage<B>(
    max_headers: usize,
    mut req: Request<B>,
    next: impl Next<Request<B>>,
) -> Response<Body> {
    let framing = match req.extensions().get::<BadFraming>() {
        Some(b) => Some(*b),
        None => framing_error(&req),
    };
    if let Some(BadFraming(why)) = framing {
        return bad_request(&req, "bad_request", why, true);
    }
    let max = max_headers;
    // Only what the client sent counts, not the headers the gateway added since.
    let count = req
        .extensions()
        .get::<ClientHeaderCount>()
        .map_or(req.headers().len(), |c| c.0);
    if count > max {
        return json_error(
            &req,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            "too many headers",
        );
    }
    match crate::path::normalize(req.uri().path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => {}
        Ok(std::borrow::Cow::Owned(path)) => match crate::path::with_path(req.uri(), &path) {
            Some(uri) => *req.uri_mut() = uri,
            None => return bad_request(&req, "bad_path", "invalid request path", false),
        },
        Err(e) => {
            tracing::debug!(path = %req.uri().path(), error = %e, "refused path");
            return bad_request(&req, "bad_path", "invalid request path", false);
        }
    }
    run(next, req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_judged_on_parsed_headers() {
        let req = |te: &[&str], cl: bool| {
            let mut b = Request::post("/");
            for v in te {
                b = b.header(header::TRANSFER_ENCODING, *v);
            }
            if cl {
                b = b.header(header::CONTENT_LENGTH, "3");
            }
            b.body(()).expect("request")
        };
        assert_eq!(framing_error(&req(&[], true)), None);
        assert_eq!(framing_error(&req(&["chunked"], false)), None);
        assert_eq!(framing_error(&req(&[" Chunked "], false)), None);
        for bad in [
            req(&["chunked"], true),
            req(&["gzip, chunked"], false),
            req(&["chunked", "chunked"], false),
        ] {
            assert!(framing_error(&bad).is_some(), "{:?}", bad.headers());
        }
        // A request at or after the one the raw-byte guard flagged.
        let conn = ConnInfo::new("127.0.0.1:1".parse().expect("addr"), false, false);
        let mut flagged = req(&[], false);
        flagged.extensions_mut().insert(conn.clone());
        flagged.extensions_mut().insert(RequestIndex(0));
        assert_eq!(framing_error(&flagged), None);
        let mut g = SmuggleGuard::new((), conn.smuggled.clone());
        g.scan_for_test(
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        assert!(framing_error(&flagged).is_some());
    }
}
