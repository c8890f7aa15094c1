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
use crate::host::{same_host, split_authority};
pub use crate::host::valid_authority;
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
    // HTTP/1.1 needs a Host (RFC 9112 §3.2); HTTP/2 a `:authority` or `host` (RFC 9113
    // §8.3.1): without one the upstream would see the backend's address as the host.
    if host.is_none() && authority.is_none() {
        match req.version() {
            Version::HTTP_11 => return Err("missing Host header"),
            Version::HTTP_2 => return Err("missing :authority and Host"),
            _ => {}
        }
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
/// (`routing::route_host`), an IPv6 literal by address, a missing port as the
/// scheme's default.
fn same_authority(a: &[u8], b: &[u8], default_port: Option<u16>) -> bool {
    let (ha, pa) = split_authority(a);
    let (hb, pb) = split_authority(b);
    same_host(ha, hb) && pa.or(default_port) == pb.or(default_port)
}

/// Why an absolute-form target's scheme is refused (origin-form has none). Only
/// `http` and `https` are proxied here (`ftp://` or `ws://` name no resource of this
/// gateway), and over HTTP/1 the scheme must be the connection's: RFC 9110 §4.2.2 /
/// §7.4 serve an `https` resource only over a secured connection, and an `http`
/// target on TLS would be compared with port 80 while forwarded as `https`. HTTP/2's
/// `:scheme` may differ from the connection (a TLS terminator in front speaks h2c
/// with `:scheme https`, RFC 9113 §8.3.1): there only the name is checked.
fn scheme_error<B>(req: &Req<B>) -> Option<&'static str> {
    let scheme = req.uri().scheme_str()?;
    let https = if scheme.eq_ignore_ascii_case("https") {
        true
    } else if scheme.eq_ignore_ascii_case("http") {
        false
    } else {
        return Some("the request target's scheme is neither http nor https");
    };
    if req.version() == Version::HTTP_2 || https == req.ctx().conn.tls {
        return None;
    }
    Some(if https {
        "https request target on a plain-HTTP listener"
    } else {
        "http request target on a TLS listener"
    })
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

/// Whether `count` headers are still over `max` once an HTTP/2 client's cookie
/// fields count as the one field they are joined into (RFC 9113 §8.2.3 lets a
/// client split cookies so they compress well). Asked only past the limit.
fn over_with_cookies_as_one(h2: bool, count: usize, max: usize, h: &http::HeaderMap) -> bool {
    if !h2 {
        return true;
    }
    let crumbs = h.get_all(header::COOKIE).iter().count();
    count - crumbs.saturating_sub(1).min(count) > max
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
    // RFC 9113 §3.4: `PRI` exists only as the start of the HTTP/2 preface, which the
    // HTTP/2 layer consumes; as a request method (HTTP/1, or a `:method` on HTTP/2)
    // it is a confused (or probing) client, and no backend should see it. HTTP/2 has
    // no `Connection: close` (its framing is not in doubt).
    let h2 = req.version() == Version::HTTP_2;
    if req.method().as_str() == "PRI" {
        return Err(bad_request(
            &req,
            "bad_request",
            "PRI is reserved for the HTTP/2 connection preface",
            !h2,
        ));
    }
    if let Some(why) = scheme_error(&req) {
        return Err(bad_request(&req, "bad_request", why, false));
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
    if count > max && over_with_cookies_as_one(h2, count, max, req.headers()) {
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
        use crate::ctx::{ConnInfo, ReqCtx};
        // An `https` target arrives on a TLS listener (`scheme_error`).
        let req = |v: Version, uri: &str, hosts: &[&str]| {
            let mut b = Request::get(uri).version(v);
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            let tls = uri.starts_with("https:");
            let conn = std::sync::Arc::new(ConnInfo::new("127.0.0.1:1".parse().expect("addr"), tls, false));
            Req::new(b.body(()).expect("request"), ReqCtx::new(conn, 0))
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

    /// Hostile test r3b, 6: `PRI` over HTTP/2 is a method no backend knows either
    /// (the preface is consumed by the HTTP/2 layer, never a request): 400, as over
    /// HTTP/1, without `Connection: close` (a connection header is not HTTP/2).
    #[test]
    fn pri_over_http2_is_refused() {
        use crate::ctx::testing;
        let pri = http::Method::from_bytes(b"PRI").expect("method");
        let r = Request::builder().method(pri).uri("http://a/pub").version(Version::HTTP_2);
        let refused = harden(100, testing::req(r.body(()).expect("request")))
            .map(|_| ())
            .expect_err("PRI over HTTP/2");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert!(refused.headers().get(header::CONNECTION).is_none());
    }

    /// Hostile test r3b, 6: an HTTP/2 request with neither `:authority` nor `host`
    /// names no host, like an HTTP/1.1 request without Host: 400 `bad_host`, not
    /// routed with the backend's address as its Host.
    #[test]
    fn http2_without_authority_or_host_is_refused() {
        use crate::ctx::testing;
        let req = |uri: &str, host: Option<&str>| {
            let mut b = Request::get(uri).version(Version::HTTP_2);
            if let Some(h) = host {
                b = b.header(header::HOST, h);
            }
            testing::req(b.body(()).expect("request"))
        };
        assert_eq!(host_error(&req("/x", None)), Err("missing :authority and Host"));
        let refused = harden(100, req("/x", None)).map(|_| ()).expect_err("no host");
        assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
        assert!(harden(100, req("/x", Some("a.example"))).is_ok(), "host alone names it");
        assert!(harden(100, req("http://a.example/x", None)).is_ok(), ":authority alone");
    }

    /// Hostile test r3b, 6: an absolute-form target's scheme must be `http` or
    /// `https` and the listener's own (RFC 9110 §4.2.2 / §7.4: an `https` resource is
    /// only served over a secured connection); otherwise the target is compared with
    /// one default port and forwarded with another scheme's `X-Forwarded-Proto`.
    /// HTTP/2's `:scheme` may differ from the connection (a TLS terminator in front
    /// speaks h2c with `:scheme https`, RFC 9113 §8.3.1), but only names http(s).
    #[test]
    fn absolute_form_scheme_must_be_the_listeners() {
        use crate::ctx::{testing, ConnInfo, Req, ReqCtx};
        let req = |v: Version, uri: &str, tls: bool| {
            let conn = std::sync::Arc::new(ConnInfo::new("127.0.0.1:1".parse().expect("addr"), tls, false));
            let r = Request::get(uri).version(v).header(header::HOST, "a.example");
            Req::new(r.body(()).expect("request"), ReqCtx::new(conn, 0))
        };
        for (v, uri, tls) in [
            (Version::HTTP_11, "ftp://a.example/x", false),
            (Version::HTTP_11, "ws://a.example/x", false),
            (Version::HTTP_11, "wss://a.example/x", true),
            (Version::HTTP_11, "https://a.example/x", false),
            (Version::HTTP_11, "http://a.example/x", true),
            (Version::HTTP_10, "https://a.example/x", false),
            (Version::HTTP_2, "ftp://a.example/x", false),
        ] {
            let refused = harden(100, req(v, uri, tls)).map(|_| ()).expect_err(uri);
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{uri} tls={tls}");
        }
        for (v, uri, tls) in [
            (Version::HTTP_11, "http://a.example/x", false),
            (Version::HTTP_11, "HTTP://a.example/x", false),
            (Version::HTTP_11, "https://a.example/x", true),
            (Version::HTTP_2, "https://a.example/x", false),
            (Version::HTTP_2, "http://a.example/x", true),
        ] {
            assert!(harden(100, req(v, uri, tls)).is_ok(), "{uri} tls={tls}");
        }
        // Origin-form has no scheme to check.
        assert!(harden(100, testing::req(Request::get("/x").header(header::HOST, "a").body(()).expect("request"))).is_ok());
    }

    /// Hostile test r3b, 6: an IPv6 literal is one host however it is spelled, so a
    /// target `[0::1]` and a Host `[::1]` agree (and one cannot be routed as another).
    #[test]
    fn ipv6_target_and_host_compare_by_address() {
        use crate::ctx::testing;
        let r = Request::get("http://[0::1]/x").version(Version::HTTP_11).header(header::HOST, "[::1]:80");
        assert!(harden(100, testing::req(r.body(()).expect("request"))).is_ok());
        let r = Request::get("http://[::2]/x").version(Version::HTTP_11).header(header::HOST, "[::1]");
        assert!(harden(100, testing::req(r.body(()).expect("request"))).is_err());
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
}
