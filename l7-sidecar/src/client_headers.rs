//! The client's header section, cleaned before any stage reads it or adds to it.
//!
//! - Hop-by-hop headers, and every header the client names in `Connection`, are
//!   removed first. Done later (as before), a client could list `X-User-Id`,
//!   `X-Request-Id` or `traceparent` in `Connection` and have the gateway strip its
//!   own headers on the way out (CVE-2022-31813). WebSocket upgrades keep exactly
//!   `Connection: upgrade` and their `Upgrade` header.
//! - Headers whose name becomes a gateway-owned name after `_` → `-` (`X_User_Id`)
//!   are dropped: CGI/WSGI upstreams read both spellings as `HTTP_X_USER_ID`.
//! - The number of fields the client sent is recorded before the gateway adds any,
//!   so `server.max_headers` limits the client alone.
//!
//! All of it starts with one pass over the client's names with cheap comparisons
//! (`scan`); the usual request has nothing to remove and costs no further lookup.

use crate::config::TransformConfig;
use crate::ctx::{owned, Req};
use crate::http_util::{hop_by_hop_index, is_upgrade, strip_hop_by_hop, strip_hop_by_hop_keeping_websocket};
use http::{header, HeaderMap, HeaderName, HeaderValue};
use std::collections::BTreeMap;

/// Headers only the gateway sets (transform-added names are owned too). The client's
/// `Forwarded` is dropped and none is set: its `for`/`proto` would otherwise reach an
/// upstream reading it while `X-Forwarded-*` say otherwise.
pub const GATEWAY_OWNED: [&str; 10] = [
    "x-request-id",
    "x-user-id",
    "x-user-role",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "traceparent",
    "forwarded",
    "x-real-ip",
    "x-forwarded-port",
];

/// Remove hop-by-hop headers and those the client named in `Connection`.
pub fn strip_client_hop_by_hop(h: &mut HeaderMap) {
    let upgrade = is_upgrade(h);
    // `Connection: Host` must not remove Host: the upstream would then see the
    // backend's address as Host. Kept as sent (all values) for the Host checks.
    let hosts: Vec<HeaderValue> = if h.contains_key(header::CONNECTION) {
        h.get_all(header::HOST).iter().cloned().collect()
    } else {
        Vec::new()
    };
    if upgrade {
        strip_hop_by_hop_keeping_websocket(h);
    } else {
        strip_hop_by_hop(h);
    }
    if !h.contains_key(header::HOST) {
        for v in hosts {
            h.append(header::HOST, v);
        }
    }
}

/// Drop `_` spellings of gateway-owned names; `owned_extra` are further names
/// (any case, `_` or `-`), such as those transforms add or remove: a name matches
/// after case folding and `_` → `-`. The one variant matcher for the gateway's names
/// and configured removals alike.
pub fn drop_owned_variants<'a>(
    h: &mut HeaderMap,
    owned_extra: impl Iterator<Item = &'a str> + Clone,
) {
    // Names with `_` are rare: the usual request costs one scan of its keys.
    if !h.keys().any(|k| k.as_str().contains('_')) {
        return;
    }
    let variants: Vec<HeaderName> = h
        .keys()
        .filter(|k| k.as_str().contains('_'))
        .filter(|k| {
            let folded = k.as_str().replace('_', "-");
            GATEWAY_OWNED.contains(&folded.as_str())
                || owned_extra
                    .clone()
                    .any(|o| o.replace('_', "-").eq_ignore_ascii_case(&folded))
        })
        .cloned()
        .collect();
    for n in variants {
        tracing::debug!(header = %n, "dropped variant of a gateway-owned header");
        h.remove(n);
    }
}

/// The `owned` bit of a gateway-owned name (exact spelling), 0 for any other name.
/// A `match` on the text: a length switch and one comparison per name.
fn owned_bit(name: &str) -> u16 {
    match name {
        "x-request-id" => owned::REQUEST_ID,
        "x-user-id" => owned::USER_ID,
        "x-user-role" => owned::USER_ROLE,
        "x-forwarded-for" => owned::FORWARDED_FOR,
        "x-forwarded-proto" => owned::FORWARDED_PROTO,
        "x-forwarded-host" => owned::FORWARDED_HOST,
        "traceparent" => owned::TRACEPARENT,
        "forwarded" => owned::FORWARDED,
        "x-real-ip" => owned::REAL_IP,
        "x-forwarded-port" => owned::FORWARDED_PORT,
        _ => 0,
    }
}

/// What one pass over the client's header names found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Scan {
    /// Bits of `http_util::HOP_BY_HOP` indices present.
    hop: u16,
    /// `owned` bits of the gateway-owned names present.
    owned: u16,
    /// Some name contains `_` (a possible variant of an owned name).
    underscore: bool,
    /// `Expect` is there: never forwarded (`proxy`), and dropped here, where finding
    /// it costs one comparison per name instead of a lookup per request.
    expect: bool,
}

const CONNECTION_BIT: u16 = 1;
const TRANSFER_ENCODING_BIT: u16 = 1 << 7;
const UPGRADE_BIT: u16 = 1 << 8;

fn scan(h: &HeaderMap) -> Scan {
    let mut s = Scan::default();
    for k in h.keys() {
        match hop_by_hop_index(k) {
            Some(i) => s.hop |= 1 << i,
            None => {
                s.owned |= owned_bit(k.as_str());
                s.expect |= k == header::EXPECT;
            }
        }
        s.underscore |= k.as_str().as_bytes().contains(&b'_');
    }
    s
}

/// The outermost step: clean the client's headers before anything else reads them,
/// and note in the request's context what was found (header count, framing verdict,
/// gateway-owned names sent, upgrade). `transforms`: the request's config
/// generation's transforms, whose added header names are gateway-owned too.
pub fn clean_client_headers<B>(transforms: &BTreeMap<String, TransformConfig>, req: &mut Req<B>) {
    let (r, ctx) = req.split_mut();
    let version = r.version();
    let h = r.headers_mut();
    ctx.client_headers = Some(h.len());
    let found = scan(h);
    ctx.client_owned = found.owned;
    // Judged before stripping, which removes Transfer-Encoding; the 400 is sent by
    // `hardening_stage`. Without Transfer-Encoding only the raw-byte detector's flag
    // can make the framing bad (CL and TE together need TE).
    let flagged = ctx.conn.smuggled.flagged(ctx.index);
    if flagged || found.hop & TRANSFER_ENCODING_BIT != 0 {
        ctx.framing = crate::guard::framing_error(h, flagged);
    }
    if found.hop != 0 {
        strip_client_hop_by_hop(h);
        ctx.upgrade = found.hop & (CONNECTION_BIT | UPGRADE_BIT) == CONNECTION_BIT | UPGRADE_BIT
            && is_upgrade(h);
        if ctx.upgrade && version != http::Version::HTTP_11 {
            // RFC 9110 §7.8: an Upgrade in an HTTP/1.0 request is ignored (hostile
            // s17-T6: it was forwarded, and the backend's 101 ended in a broken tunnel).
            h.remove(header::UPGRADE);
            h.remove(header::CONNECTION);
            ctx.upgrade = false;
        }
    }
    if found.expect {
        // hyper answers `100 Continue` from its own parse state, not from this map.
        h.remove(header::EXPECT);
    }
    if found.underscore {
        let added = transforms
            .values()
            .flat_map(|t| t.request_headers_add.keys().map(String::as_str));
        drop_owned_variants(h, added);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::testing;

    fn cleaned(headers: &[(&str, &str)]) -> Req<()> {
        let mut b = http::Request::get("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut req = testing::req(b.body(()).expect("request"));
        clean_client_headers(&BTreeMap::new(), &mut req);
        req
    }

    #[test]
    fn the_usual_request_is_left_alone_and_its_owned_names_noted() {
        let req = cleaned(&[("host", "a"), ("accept", "*/*"), ("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(req.headers().len(), 3);
        let ctx = req.ctx();
        assert_eq!(ctx.client_headers, Some(3));
        assert_eq!(ctx.client_owned, owned::FORWARDED_FOR);
        assert_eq!(ctx.framing, None);
        assert!(!ctx.upgrade);
        let every: Vec<(&str, &str)> = GATEWAY_OWNED.iter().map(|n| (*n, "v")).collect();
        assert_eq!(cleaned(&every).ctx().client_owned, 0x3ff, "one bit per owned name");
    }

    #[test]
    fn one_pass_strips_judges_framing_and_drops_variants() {
        let req = cleaned(&[
            ("host", "a"),
            ("connection", "upgrade, x-secret"),
            ("upgrade", "websocket"),
            ("x-secret", "1"),
            ("x_user_id", "spoof"),
            ("transfer-encoding", "gzip, chunked"),
        ]);
        let mut left: Vec<&str> = req.headers().keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["connection", "host", "upgrade"]);
        assert!(req.ctx().upgrade);
        assert!(req.ctx().framing.is_some(), "judged before Transfer-Encoding was stripped");
        // A flag from the raw-byte detector counts without Transfer-Encoding.
        let mut r = testing::req(http::Request::get("/").body(()).expect("request"));
        let mut g = crate::smuggle::SmuggleGuard::new((), r.ctx().conn.smuggled.clone());
        g.scan_for_test(
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        clean_client_headers(&BTreeMap::new(), &mut r);
        assert!(r.ctx().framing.is_some());
    }

    #[test]
    fn connection_cannot_name_away_later_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-User-Id, x-request-id, TE"),
        );
        h.insert("x-user-id", HeaderValue::from_static("spoof"));
        h.insert("x-request-id", HeaderValue::from_static("client"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-other", HeaderValue::from_static("kept"));
        strip_client_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-other"], "kept");
    }

    #[test]
    fn upgrade_keeps_only_what_the_tunnel_needs() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, X-Forwarded-For"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-forwarded-for", HeaderValue::from_static("1.2.3.4"));
        strip_client_hop_by_hop(&mut h);
        assert!(is_upgrade(&h));
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert!(h.get("x-forwarded-for").is_none());
    }

    #[test]
    fn underscore_variants_dropped_others_kept() {
        let mut h = HeaderMap::new();
        for n in [
            "x_user_id",
            "x_forwarded_for",
            "x_real_ip",
            "X_Forwarded_Port",
            "x_gw",
            "x_other",
            "x-user-id",
        ] {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_static("v"),
            );
        }
        drop_owned_variants(&mut h, ["X-Gw"].into_iter());
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(left, ["x-user-id", "x_other"]);
    }
}
