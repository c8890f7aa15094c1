//! Trailers from a backend, cleaned before they are passed on. Here rather than
//! next to the head's hop-by-hop strip (`http_util`), which imports `body`.

use http::{header, HeaderMap, HeaderName};

/// Fields that must not travel in trailers besides the hop-by-hop ones
/// (`hop_by_hop::HOP_BY_HOP`: HTTP/2 forbids them outright, and hyper reset an HTTP/2
/// client's whole stream for one): those RFC 9110 §6.5.1 forbids there: message
/// framing, routing, request modifiers (controls, conditionals, range),
/// authentication, response control data and content handling. A recipient may not
/// merge them into the head, and a part that would act on them must not see them
/// only at the end.
static NOT_IN_TRAILERS: [HeaderName; 26] = [
    header::CONTENT_LENGTH,
    header::HOST,
    header::CACHE_CONTROL,
    header::EXPECT,
    header::MAX_FORWARDS,
    header::PRAGMA,
    header::RANGE,
    header::IF_MATCH,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::IF_UNMODIFIED_SINCE,
    header::IF_RANGE,
    header::AUTHORIZATION,
    header::WWW_AUTHENTICATE,
    header::SET_COOKIE,
    header::COOKIE,
    header::AGE,
    header::EXPIRES,
    header::DATE,
    header::LOCATION,
    header::RETRY_AFTER,
    header::VARY,
    header::CONTENT_ENCODING,
    header::CONTENT_TYPE,
    header::CONTENT_RANGE,
    header::WARNING,
];

/// Names the gateway sets on a response head (request id, the identity it
/// asserts upstream, the rate-limit fields) or that an operator sets for it (HSTS):
/// an upstream's trailer of the same name would contradict or forge them (an HTTP/2
/// client saw a second, forged `x-request-id`). `Retry-After` is in
/// `NOT_IN_TRAILERS` already.
///
/// Spelled here rather than taken from `transform`: `body` is a leaf below the
/// stages (`tests/module_graph.rs`).
static GATEWAY_OWNED: [HeaderName; 9] = [
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-user-id"),
    HeaderName::from_static("x-user-role"),
    header::STRICT_TRANSPORT_SECURITY,
    HeaderName::from_static("ratelimit-limit"),
    HeaderName::from_static("ratelimit-remaining"),
    HeaderName::from_static("ratelimit-reset"),
    HeaderName::from_static("ratelimit-policy"),
    HeaderName::from_static("ratelimit"),
];

/// Remove from trailers the hop-by-hop fields, those of `NOT_IN_TRAILERS` and
/// `GATEWAY_OWNED`, those a `Connection` trailer names, and `route` (the names the
/// route's transform removes from or sets on the head). Runs only on trailers,
/// which few responses have.
pub fn strip(t: &mut HeaderMap, route: &[HeaderName]) {
    let named: Vec<HeaderName> = t
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    let hop_by_hop = crate::hop_by_hop::HOP_BY_HOP.iter();
    let fixed = NOT_IN_TRAILERS.iter().chain(GATEWAY_OWNED.iter());
    for n in named.iter().chain(hop_by_hop).chain(fixed).chain(route) {
        if t.contains_key(n) {
            t.remove(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn trailers_keep_only_fields_allowed_there() {
        let mut t = HeaderMap::new();
        for (n, v) in [
            ("x-md5", "abc"),
            ("connection", "close, X-Hop"),
            ("x-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "gzip"),
            ("upgrade", "h2c"),
            ("proxy-connection", "close"),
            ("te", "trailers"),
            ("content-length", "99"),
            ("host", "evil"),
            ("authorization", "x"),
            ("set-cookie", "s=1"),
            ("content-type", "text/evil"),
            ("server-timing", "db;dur=5"),
            ("x-request-id", "forged"),
            ("x-user-id", "admin"),
            ("x-user-role", "admin"),
            ("strict-transport-security", "max-age=0"),
            ("ratelimit-remaining", "99"),
            ("server", "evil"),
        ] {
            t.append(HeaderName::from_static(n), HeaderValue::from_static(v));
        }
        strip(&mut t, &[header::SERVER]);
        let mut left: Vec<&str> = t.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["server-timing", "x-md5"]);
    }
}
