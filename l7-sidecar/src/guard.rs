//! Request-smuggling checks, on every request of a connection.
//!
//! Most framing attacks are refused by hyper's own parser, on every request: differing
//! or invalid `Content-Length`s, `Transfer-Encoding` whose last coding is not
//! `chunked`, `Transfer-Encoding` in HTTP/1.0, obs-folded header lines. This module
//! adds, judged on what hyper parsed, a `Transfer-Encoding` other than exactly one
//! `chunked` (no other transfer coding is decoded here), and, from the raw-byte
//! detector in `crate::smuggle`, requests that had both `Content-Length` and
//! `Transfer-Encoding` (hyper hides that). Then header count and path checks.

pub use crate::ctx::BadFraming;
use crate::ctx::Req;
use crate::http_util::json_error;
use crate::http_util::Body;
use crate::stage::{Answer, Next};
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode, Version};

pub use crate::smuggle::{SmuggleGuard, Smuggled};

fn bad_request<B>(req: &Req<B>, code: &str, message: &str, close: bool) -> Response<Body> {
    let mut r = json_error(req, StatusCode::BAD_REQUEST, code, message);
    if close {
        // The connection's framing is in doubt: do not read another request from it.
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// Why a request's framing is refused, judged on the headers as hyper parsed them
/// (before hop-by-hop headers are stripped: `client_headers` calls this first).
/// `flagged`: the raw-byte detector saw this request with both CL and TE.
pub fn framing_error(h: &HeaderMap, flagged: bool) -> Option<BadFraming> {
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

/// The Host checks: routing, `X-Forwarded-Host` and the upstream all use Host, so it
/// must be one unambiguous authority. RFC 9112 §3.2: HTTP/1.1 needs exactly one Host
/// (400 otherwise); RFC 9113 §8.3.1: in HTTP/2 a `host` that differs from
/// `:authority` makes the request malformed.
pub fn host_error<B>(req: &Request<B>) -> Result<(), &'static str> {
    checked_host(req).map(|_| ())
}

/// `host_error`'s checks; on success the one Host header value, if any.
fn checked_host<B>(req: &Request<B>) -> Result<Option<&HeaderValue>, &'static str> {
    let mut all = req.headers().get_all(header::HOST).iter();
    let host = all.next();
    if all.next().is_some() {
        return Err("several Host headers");
    }
    if let Some(h) = host {
        if !valid_authority(h.as_bytes()) {
            return Err("invalid Host header");
        }
    }
    // The request target's authority (HTTP/1 absolute-form, HTTP/2 `:authority`) obeys
    // the same rule: RFC 9110 §4.2.4 and RFC 9113 §8.3.1 forbid userinfo there, and a
    // password in it would otherwise reach the upstream and the traces.
    if let Some(a) = req.uri().authority() {
        if !valid_authority(a.as_str().as_bytes()) {
            return Err("invalid authority in the request target");
        }
    }
    if req.version() == Version::HTTP_2 {
        if let (Some(h), Some(a)) = (host, req.uri().authority()) {
            if !h.as_bytes().eq_ignore_ascii_case(a.as_str().as_bytes()) {
                return Err("Host differs from :authority");
            }
        }
    } else if req.version() == Version::HTTP_11 && host.is_none() {
        return Err("missing Host header");
    }
    Ok(host)
}

/// Bytes of an RFC 3986 reg-name (unreserved, sub-delims, `%`), as a table: one load
/// per byte instead of a chain of comparisons (this runs on every request).
const REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        i += 1;
    }
    t
};

/// RFC 3986 authority without userinfo: `host[:port]`, host a reg-name, IPv4 or
/// bracketed IPv6 address; no path, query, `@` or empty host. A name may end in one
/// dot (fully qualified, routed as the same host: `routing::route_host`) but has no
/// empty label: `.`, `a..b` or `.a` name no host, and routing must not guess one.
pub fn valid_authority(v: &[u8]) -> bool {
    let rest = if let Some(inner) = v.strip_prefix(b"[") {
        let Some(end) = inner.iter().position(|b| *b == b']') else {
            return false;
        };
        let ip = &inner[..end];
        let ok = !ip.is_empty()
            && ip
                .iter()
                .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
        if !ok {
            return false;
        }
        &inner[end + 1..]
    } else {
        // One pass over the name: its bytes, and its labels (none empty, but for
        // the root label after one trailing dot: no leading dot, no two in a row).
        let mut end = v.len();
        let mut after_dot = true;
        for (i, &b) in v.iter().enumerate() {
            if b == b':' {
                end = i;
                break;
            }
            if !REG_NAME[usize::from(b)] {
                return false;
            }
            let dot = b == b'.';
            if dot && after_dot {
                return false;
            }
            after_dot = dot;
        }
        if end == 0 {
            return false;
        }
        &v[end..]
    };
    match rest {
        [] => true,
        [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
        _ => false,
    }
}

/// Reject smuggling attempts, header floods and unsafe paths before any routing
/// work, and normalise the path (see `crate::path`) for every later stage.
/// `max_headers`: `server.max_headers` of the request's config generation.
///
/// Answers itself or hands over the rest of the pipeline's future (`Answer`).
pub fn hardening_stage<B, N: Next<Req<B>>>(
    max_headers: usize,
    req: Req<B>,
    next: N,
) -> impl std::future::Future<Output = Response<Body>> + Send {
    match harden(max_headers, req) {
        Ok(req) => Answer::next(next.run(req)),
        Err(resp) => Answer::now(resp),
    }
}

/// The checks of `hardening_stage` as a plain call: the request (path normalised)
/// to go on with, or the answer refusing it. The untraced pipeline runs it inline,
/// without a stage future of its own.
pub fn harden<B>(max_headers: usize, mut req: Req<B>) -> Result<Req<B>, Response<Body>> {
    let ctx = req.ctx();
    let framing = match (ctx.framing, ctx.client_headers) {
        (Some(b), _) => Some(b),
        // The client-header pass (which counted the headers) judged them already.
        (None, Some(_)) => None,
        (None, None) => framing_error(req.headers(), ctx.conn.smuggled.flagged(ctx.index)),
    };
    if let Some(BadFraming(why)) = framing {
        return Err(bad_request(&req, "bad_request", why, true));
    }
    let host = match checked_host(&req) {
        Ok(host) => host.cloned(),
        Err(why) => {
            tracing::debug!(host = ?req.headers().get(header::HOST), reason = why, "refused Host");
            return Err(bad_request(&req, "bad_host", why, false));
        }
    };
    req.ctx_mut().host = host;
    let max = max_headers;
    // Only what the client sent counts, not the headers the gateway added since.
    let count = req.ctx().client_headers.unwrap_or(req.headers().len());
    if count > max {
        return Err(json_error(
            &req,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_many_headers",
            "too many headers",
        ));
    }
    match crate::path::normalize(req.uri().path()) {
        Ok(std::borrow::Cow::Borrowed(_)) => {}
        Ok(std::borrow::Cow::Owned(path)) => match crate::path::with_path(req.uri(), &path) {
            Some(uri) => *req.uri_mut() = uri,
            None => return Err(bad_request(&req, "bad_path", "invalid request path", false)),
        },
        Err(e) => {
            tracing::debug!(path = %req.uri().path(), error = %e, "refused path");
            return Err(bad_request(&req, "bad_path", "invalid request path", false));
        }
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_must_be_one_plain_authority() {
        for ok in [
            "a.example",
            "a.example:8080",
            "127.0.0.1",
            "[::1]",
            "[::1]:80",
            "x_y",
            // A fully qualified name: the root label's dot.
            "a.example.",
            "a.example.:8080",
            "a:1",
            "a:65535",
            "[::ffff:127.0.0.1]:443",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "", "a/x", "u@a", "a:8x", "a:123456", "[::1", "[]", "a b", ":80", "a?b", "a#b",
            // Only dots, or an empty label: no such name, and no route should guess.
            ".", "..", ".:80", "a..b", ".a", "a..", "a..:80",
            // Not `host[:port]` (hostile test r3, 5): lists, sub-delims and `%` in the
            // name, a port out of range or empty, an IPv6 literal that is not one.
            "evil.example,api.example.com:99999", "a,b", "a;x", "a~b", "a%41", "a!b", "a=b",
            "a:65536", "a:99999", "a:", "[::1]:", "[zz::1]", "[1:2]", "[::1]x",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
        let req = |v: http::Version, hosts: &[&str], uri: &str| {
            let mut b = Request::get(uri).version(v);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            b.body(()).expect("request")
        };
        assert!(host_error(&req(Version::HTTP_11, &["a"], "/")).is_ok());
        assert!(host_error(&req(Version::HTTP_10, &[], "/")).is_ok());
        assert!(host_error(&req(Version::HTTP_11, &[], "/")).is_err());
        assert!(host_error(&req(Version::HTTP_11, &["a", "a"], "/")).is_err());
        assert!(host_error(&req(Version::HTTP_2, &[], "http://a/")).is_ok());
        assert!(host_error(&req(Version::HTTP_2, &["A"], "http://a/")).is_ok());
        assert!(host_error(&req(Version::HTTP_2, &["b"], "http://a/")).is_err());
        // Userinfo in the target's authority, as HTTP/1.0 absolute-form or HTTP/2 send it.
        assert!(host_error(&req(Version::HTTP_10, &[], "http://u:secret@a/")).is_err());
        assert!(host_error(&req(Version::HTTP_2, &[], "http://u:secret@a/")).is_err());
        assert!(host_error(&req(Version::HTTP_11, &["a"], "http://u@a/")).is_err());
        assert!(host_error(&req(Version::HTTP_11, &["a..b"], "/")).is_err());
        assert!(host_error(&req(Version::HTTP_2, &[], "http://a..b/")).is_err());
        assert!(host_error(&req(Version::HTTP_2, &[], "http://a.b./")).is_ok());
    }

    /// `harden` notes the Host it accepted for routing and the transform, and only
    /// that: a refused request goes no further, one without Host notes none.
    #[test]
    fn harden_notes_the_accepted_host() {
        use crate::ctx::testing;
        let req = |hosts: &[&str]| {
            let mut b = Request::get("/x").version(Version::HTTP_11);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            testing::req(b.body(()).expect("request"))
        };
        let ok = harden(100, req(&["a.example:8080"])).unwrap_or_else(|r| panic!("{:?}", r.status()));
        assert_eq!(ok.ctx().host.as_ref().map(HeaderValue::as_bytes), Some(&b"a.example:8080"[..]));
        let refused = harden(100, req(&["a", "b"])).map(|_| ()).expect_err("two Hosts");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        let plain = testing::req(
            Request::get("/").version(Version::HTTP_10).body(()).expect("request"),
        );
        let plain = harden(100, plain).unwrap_or_else(|r| panic!("{:?}", r.status()));
        assert!(plain.ctx().host.is_none(), "no Host header, none noted");
    }

    /// Hostile test r3, 1: an HTTP/1 absolute-form target's authority is the host
    /// (RFC 9112 §3.2.2). A Host naming another is 400, as on HTTP/2; one naming the
    /// same (case, trailing dot, default port aside) is replaced by the authority, which
    /// routing and the upstream then see.
    #[test]
    fn absolute_form_authority_is_the_host() {
        use crate::ctx::testing;
        let req = |v: Version, uri: &str, hosts: &[&str]| {
            let mut b = Request::get(uri).version(v);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            testing::req(b.body(()).expect("request"))
        };
        for (v, uri, host) in [
            (Version::HTTP_11, "http://api.example.com/admin", "other.example.com"),
            (Version::HTTP_10, "http://api.example.com/admin", "other.example.com"),
            (Version::HTTP_11, "http://a.example:8080/", "a.example"),
            (Version::HTTP_11, "http://a.example/", "a.example:443"),
            (Version::HTTP_11, "https://a.example/", "a.example:80"),
            (Version::HTTP_11, "http://a.example/", "a.example.."),
            (Version::HTTP_2, "https://a.example/", "b.example"),
        ] {
            let refused = harden(100, req(v, uri, &[host])).map(|_| ()).expect_err(uri);
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{uri} {host}");
        }
        for (v, uri, hosts) in [
            (Version::HTTP_11, "http://API.example.com./x", &["api.example.com:80"][..]),
            (Version::HTTP_11, "https://a.example:443/x", &["A.Example."][..]),
            (Version::HTTP_11, "http://a.example:8080/x", &["a.example.:8080"][..]),
            (Version::HTTP_10, "http://a.example/x", &[][..]),
            (Version::HTTP_2, "https://a.example/x", &["a.example:443"][..]),
        ] {
            let ok = harden(100, req(v, uri, hosts)).unwrap_or_else(|r| panic!("{uri}: {:?}", r.status()));
            let authority = ok.uri().authority().expect("authority").as_str().to_owned();
            assert_eq!(ok.ctx().host.as_ref().map(HeaderValue::as_bytes), Some(authority.as_bytes()), "{uri}");
            if v != Version::HTTP_2 {
                let sent: Vec<_> = ok.headers().get_all(header::HOST).iter().collect();
                assert_eq!(sent, [authority.as_str()], "{uri}: forwarded as Host");
            }
        }
    }

    /// Hostile test r3, 7: `PRI` exists only as the HTTP/2 preface (RFC 9113 §3.4).
    #[test]
    fn pri_over_http1_is_refused() {
        use crate::ctx::testing;
        let pri = http::Method::from_bytes(b"PRI").expect("method");
        for v in [Version::HTTP_11, Version::HTTP_10] {
            let r = Request::builder().method(pri.clone()).uri("/pub").version(v);
            let r = testing::req(r.header(header::HOST, "a").body(()).expect("request"));
            let refused = harden(100, r).map(|_| ()).expect_err("PRI");
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        }
        let get = testing::req(Request::get("/pub").header(header::HOST, "a").body(()).expect("request"));
        assert!(harden(100, get).is_ok());
    }

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
        let framing_error = |r: &Request<()>| framing_error(r.headers(), false);
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
        // A request the raw-byte guard flagged.
        assert!(super::framing_error(&HeaderMap::new(), true).is_some());
    }

    /// The former implementation (comparison chain and label split), kept as the
    /// reference the table-driven `valid_authority` must agree with.
    fn reference_authority(v: &[u8]) -> bool {
        let (host_ok, rest) = if let Some(inner) = v.strip_prefix(b"[") {
            let Some(end) = inner.iter().position(|b| *b == b']') else {
                return false;
            };
            let ip = &inner[..end];
            let ok = !ip.is_empty()
                && ip
                    .iter()
                    .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'));
            (ok, &inner[end + 1..])
        } else {
            let end = v.iter().position(|b| *b == b':').unwrap_or(v.len());
            let name = &v[..end];
            let ok = labels_ok(name)
                && name.iter().all(|b| {
                    b.is_ascii_alphanumeric()
                        || matches!(
                            b,
                            b'-' | b'.'
                                | b'_'
                                | b'~'
                                | b'%'
                                | b'!'
                                | b'$'
                                | b'&'
                                | b'\''
                                | b'('
                                | b')'
                                | b'*'
                                | b'+'
                                | b','
                                | b';'
                                | b'='
                        )
                });
            (ok, &v[end..])
        };
        let port_ok = match rest {
            [] => true,
            [b':', digits @ ..] => digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit),
            _ => false,
        };
        host_ok && port_ok
    }

    /// A reg-name's labels: none empty, but for the root label after one trailing dot.
    fn labels_ok(name: &[u8]) -> bool {
        let name = name.strip_suffix(b".").unwrap_or(name);
        !name.is_empty() && name.split(|b| *b == b'.').all(|l| !l.is_empty())
    }

    proptest::proptest! {
        /// The table-driven check accepts exactly what the former one did: hosts
        /// built from the characters that matter (dots, colons, brackets, digits,
        /// reg-name and forbidden bytes), and arbitrary bytes.
        #[test]
        fn valid_authority_agrees_with_the_reference(
            shape in "[a.:1\\[\\]]{0,6}",
            v in "[a0.:\\[\\]_~%!$&'()*+,;=@/ ?#f-]{0,12}",
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..12),
        ) {
            // `shape`: short strings of the structural characters alone, so dots,
            // colons and brackets meet in every order.
            proptest::prop_assert_eq!(valid_authority(shape.as_bytes()), reference_authority(shape.as_bytes()), "{:?}", shape);
            proptest::prop_assert_eq!(valid_authority(v.as_bytes()), reference_authority(v.as_bytes()), "{:?}", v);
            proptest::prop_assert_eq!(valid_authority(&raw), reference_authority(&raw), "{:?}", raw);
        }
    }
}
