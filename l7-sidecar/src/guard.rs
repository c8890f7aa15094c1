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

/// The Host checks: routing, `X-Forwarded-Host` and the upstream all use the host, so
/// it must be one unambiguous authority. RFC 9112 §3.2: HTTP/1.1 needs exactly one Host
/// (400 otherwise). A request target with an authority (HTTP/1 absolute-form, HTTP/2
/// `:authority`) names the host itself (RFC 9112 §3.2.2, RFC 9113 §8.3.1); a Host naming
/// another one makes the request ambiguous to every hop before us, so it is refused on
/// both protocols rather than one of the two silently preferred.
pub fn host_error<B>(req: &Request<B>) -> Result<(), &'static str> {
    checked_host(req).map(|_| ())
}

/// `host_error`'s checks; on success the request's one host, if any: the target's
/// authority when it has one, else the Host header.
fn checked_host<B>(req: &Request<B>) -> Result<Option<HeaderValue>, &'static str> {
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
    // The request target's authority obeys the same rule: RFC 9110 §4.2.4 and RFC 9113
    // §8.3.1 forbid userinfo there, and a password in it would otherwise reach the
    // upstream and the traces.
    let authority = req.uri().authority().map(|a| a.as_str().as_bytes());
    if let Some(a) = authority {
        if !valid_authority(a) {
            return Err("invalid authority in the request target");
        }
    }
    if req.version() == Version::HTTP_11 && host.is_none() {
        return Err("missing Host header");
    }
    match (host, authority) {
        (Some(h), Some(a)) if h.as_bytes() == a => Ok(Some(h.clone())),
        (Some(h), Some(a)) => {
            let default_port = match req.uri().scheme_str() {
                Some("http") => Some(80),
                Some("https") => Some(443),
                _ => None,
            };
            if !same_authority(h.as_bytes(), a, default_port) {
                return Err(if req.version() == Version::HTTP_2 {
                    "Host differs from :authority"
                } else {
                    "Host differs from the request target's authority"
                });
            }
            Ok(HeaderValue::from_bytes(a).ok())
        }
        // Visible ASCII (`valid_authority`): always a header value.
        (None, Some(a)) => Ok(HeaderValue::from_bytes(a).ok()),
        (h, None) => Ok(h.cloned()),
    }
}

/// Whether two authorities `valid_authority` accepted name the same host and port,
/// as RFC 9110 §4.2.3 compares them: the name without case or one trailing dot
/// (`routing::route_host`), a missing port as the scheme's default.
fn same_authority(a: &[u8], b: &[u8], default_port: Option<u16>) -> bool {
    let (ha, pa) = split_authority(a);
    let (hb, pb) = split_authority(b);
    ha.eq_ignore_ascii_case(hb) && pa.or(default_port) == pb.or(default_port)
}

/// `host[:port]` of a valid authority: the host without one trailing dot, and the port.
fn split_authority(v: &[u8]) -> (&[u8], Option<u16>) {
    // An IPv6 literal's colons are inside the brackets; a port's is after them.
    let (host, port) = match v.iter().rposition(|b| *b == b':') {
        Some(i) if !v[i..].contains(&b']') => (&v[..i], port(&v[i + 1..])),
        _ => (v, None),
    };
    (host.strip_suffix(b".").unwrap_or(host), port)
}

/// A port: 1–5 digits, at most 65535 (`:99999` is no port, and `a:` names none).
fn port(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 {
        return None;
    }
    let mut n: u32 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u32::from(d - b'0');
    }
    u16::try_from(n).ok()
}

/// Bytes of a DNS-style host name (letters, digits, `-`, `_`, `.`; IPv4 addresses are
/// such names too), as a table: one load per byte instead of a chain of comparisons
/// (this runs on every request). RFC 3986 would also allow sub-delims and `%` in a
/// reg-name, but no DNS name has them and `,` / `;` let one Host read as a list to
/// the upstream (`X-Forwarded-Host: evil.example,api.example.com`).
const NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        i += 1;
    }
    t
};

/// `host[:port]`: host a DNS-style name (`NAME`), an IPv4 address or a bracketed IPv6
/// literal, port 1–5 digits up to 65535; no userinfo, path, query or empty host. A
/// name may end in one dot (fully qualified, routed as the same host:
/// `routing::route_host`) but has no empty label: `.`, `a..b` or `.a` name no host,
/// and routing must not guess one.
pub fn valid_authority(v: &[u8]) -> bool {
    let rest = if let Some(inner) = v.strip_prefix(b"[") {
        let Some(end) = inner.iter().position(|b| *b == b']') else {
            return false;
        };
        // Brackets are rare in a Host: std's exact parser costs nothing that matters.
        let ip = std::str::from_utf8(&inner[..end]).ok();
        if ip.and_then(|s| s.parse::<std::net::Ipv6Addr>().ok()).is_none() {
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
            if !NAME[usize::from(b)] {
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
        [b':', digits @ ..] => port(digits).is_some(),
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
    // RFC 9113 §3.4: `PRI` exists only as the start of the HTTP/2 preface; over HTTP/1
    // it is a confused (or probing) client, and no backend should see the method.
    if req.method().as_str() == "PRI" && req.version() != Version::HTTP_2 {
        return Err(bad_request(
            &req,
            "bad_request",
            "PRI is reserved for the HTTP/2 connection preface",
            true,
        ));
    }
    let host = match checked_host(&req) {
        Ok(host) => host,
        Err(why) => {
            tracing::debug!(host = ?req.headers().get(header::HOST), reason = why, "refused Host");
            return Err(bad_request(&req, "bad_host", why, false));
        }
    };
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
    // The host routed by is the one forwarded: with a target authority, the upstream's
    // Host is that authority, not a differently spelled (or absent) Host header.
    if let Some(h) = &host {
        if req.uri().authority().is_some() && req.headers().get(header::HOST) != Some(h) {
            req.headers_mut().insert(header::HOST, h.clone());
        }
    }
    req.ctx_mut().host = host;
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

    /// A second, plain implementation (comparison chain, label split, integer parse)
    /// that the table-driven `valid_authority` must agree with.
    fn reference_authority(v: &[u8]) -> bool {
        let (host_ok, rest) = if let Some(inner) = v.strip_prefix(b"[") {
            let Some(end) = inner.iter().position(|b| *b == b']') else {
                return false;
            };
            let ok = std::str::from_utf8(&inner[..end])
                .is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok());
            (ok, &inner[end + 1..])
        } else {
            let end = v.iter().position(|b| *b == b':').unwrap_or(v.len());
            let name = &v[..end];
            let ok = labels_ok(name)
                && name
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            (ok, &v[end..])
        };
        let port_ok = match rest {
            [] => true,
            [b':', digits @ ..] => {
                (1..=5).contains(&digits.len())
                    && digits.iter().all(u8::is_ascii_digit)
                    && std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| d.parse::<u32>().ok())
                        .is_some_and(|p| p <= 65535)
            }
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
        /// The table-driven check accepts exactly what the reference does: hosts
        /// built from the characters that matter (dots, colons, brackets, digits,
        /// reg-name and forbidden bytes), ports, IPv6 literals, and arbitrary bytes.
        #[test]
        fn valid_authority_agrees_with_the_reference(
            shape in "[a.:1\\[\\]]{0,6}",
            v in "[a0.:\\[\\]_~%!$&'()*+,;=@/ ?#f-]{0,12}",
            port in "[a-z]{1,4}(:[0-9]{0,7})?",
            ip6 in "\\[[0-9a-f:.]{0,12}\\](:[0-9]{0,6})?",
            raw in proptest::collection::vec(proptest::num::u8::ANY, 0..12),
        ) {
            // `shape`: short strings of the structural characters alone, so dots,
            // colons and brackets meet in every order.
            proptest::prop_assert_eq!(valid_authority(shape.as_bytes()), reference_authority(shape.as_bytes()), "{:?}", shape);
            proptest::prop_assert_eq!(valid_authority(v.as_bytes()), reference_authority(v.as_bytes()), "{:?}", v);
            proptest::prop_assert_eq!(valid_authority(&raw), reference_authority(&raw), "{:?}", raw);
            // Ports around the 5-digit / 65535 limits, and bracketed literals.
            proptest::prop_assert_eq!(valid_authority(port.as_bytes()), reference_authority(port.as_bytes()), "{:?}", port);
            proptest::prop_assert_eq!(valid_authority(ip6.as_bytes()), reference_authority(ip6.as_bytes()), "{:?}", ip6);
        }
    }
}
