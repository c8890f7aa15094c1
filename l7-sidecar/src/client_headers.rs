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

use crate::ctx::ClientHeaderCount;
use crate::http_util::{is_upgrade, strip_hop_by_hop, Body};
use crate::config::TransformConfig;
use crate::stage::Next;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use std::collections::BTreeMap;

/// Headers only the gateway sets (transform-added names are owned too).
pub const GATEWAY_OWNED: [&str; 7] = [
    "x-request-id",
    "x-user-id",
    "x-user-role",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "traceparent",
];

/// Remove hop-by-hop headers and those the client named in `Connection`.
pub fn strip_client_hop_by_hop(h: &mut HeaderMap) {
    let upgrade = is_upgrade(h)
        .then(|| h.get(header::UPGRADE).cloned())
        .flatten();
    // `Connection: Host` must not remove Host: the upstream would then see the
    // backend's address as Host. Kept as sent (all values) for the Host checks.
    let hosts: Vec<HeaderValue> = if h.contains_key(header::CONNECTION) {
        h.get_all(header::HOST).iter().cloned().collect()
    } else {
        Vec::new()
    };
    strip_hop_by_hop(h);
    if !h.contains_key(header::HOST) {
        for v in hosts {
            h.append(header::HOST, v);
        }
    }
    if let Some(proto) = upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, proto);
    }
}

/// Drop `_` spellings of gateway-owned names; `owned_extra` are further owned names
/// (lower case), such as those transforms add.
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

/// The outermost stage: clean the client's headers before anything else runs.
/// `transforms`: the request's config generation's transforms, whose added header
/// names are gateway-owned too.
///
/// Hands over the rest of the pipeline's future itself: no future of its own.
pub fn client_headers_stage<B, N: Next<Request<B>>>(
    transforms: &BTreeMap<String, TransformConfig>,
    mut req: Request<B>,
    next: N,
) -> impl std::future::Future<Output = Response<Body>> + Send {
    let count = req.headers().len();
    req.extensions_mut().insert(ClientHeaderCount(count));
    // Judged now: stripping removes Transfer-Encoding; the 400 is sent by
    // `hardening_stage`, inside the request-id stage.
    if let Some(bad) = crate::guard::framing_error(&req) {
        req.extensions_mut().insert(bad);
    }
    let h = req.headers_mut();
    strip_client_hop_by_hop(h);
    let added = transforms
        .values()
        .flat_map(|t| t.request_headers_add.keys().map(String::as_str));
    drop_owned_variants(h, added);
    next.run(req)
}

#[cfg(test)]
mod tests {
    use super::*;

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
