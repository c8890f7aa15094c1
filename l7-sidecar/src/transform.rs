//! Request/response transformation: request ids, forwarding and identity headers,
//! configured header edits and stripping internal fields from JSON bodies.

use crate::auth::Identity;
use crate::config::TransformConfig;
// Re-exported where it used to live, for the fuzz target.
use crate::ctx::{ConnInfo, RequestId};
pub use crate::balance::cookie;
use crate::http_util::json_error_with_id;
use crate::http_util::{full, is_upgrade, strip_hop_by_hop, Body};
use crate::routing::Routed;
use crate::stage::{run, Next};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const X_REQUEST_ID: &str = "x-request-id";
pub const X_USER_ID: &str = "x-user-id";
pub const X_USER_ROLE: &str = "x-user-role";

const REQUEST_ID: HeaderName = HeaderName::from_static(X_REQUEST_ID);
const USER_ID: HeaderName = HeaderName::from_static(X_USER_ID);
const USER_ROLE: HeaderName = HeaderName::from_static(X_USER_ROLE);
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// A client-sent id is kept only if it is short and plain, so it is safe to log.
pub fn valid_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

pub fn new_request_id() -> String {
    String::from_utf8_lossy(&new_request_id_bytes()).into_owned()
}

/// A new UUIDv4 request id as ASCII, without an allocation.
fn new_request_id_bytes() -> [u8; 36] {
    let hi = fastrand::u64(..);
    let lo = fastrand::u64(..);
    // UUIDv4 layout: version and variant bits set.
    let hi = (hi & 0xffff_ffff_ffff_0fff) | 0x4000;
    let lo = (lo & 0x3fff_ffff_ffff_ffff) | 0x8000_0000_0000_0000;
    // Formatted in place: `format!` with five hex fields is slow for every request.
    let mut id = *b"00000000-0000-0000-0000-000000000000";
    let put = |out: &mut [u8], v: u64| crate::observe::put_hex(out, u128::from(v));
    put(&mut id[0..8], hi >> 32);
    put(&mut id[9..13], (hi >> 16) & 0xffff);
    put(&mut id[14..18], hi & 0xffff);
    put(&mut id[19..23], lo >> 48);
    put(&mut id[24..36], lo & 0xffff_ffff_ffff);
    id
}

/// Returns the request id to use (and its header value), setting it on the request
/// headers.
pub fn ensure_request_id(headers: &mut HeaderMap) -> (Arc<str>, HeaderValue) {
    if let Some(v) = headers.get(&REQUEST_ID) {
        if let Some(id) = v.to_str().ok().filter(|v| valid_request_id(v)) {
            return (Arc::from(id), v.clone());
        }
    }
    // Straight from the bytes: a `String` first was one allocation and copy more.
    let id = new_request_id_bytes();
    let v = HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static(""));
    headers.insert(REQUEST_ID, v.clone());
    (Arc::from(v.to_str().unwrap_or_default()), v)
}

/// Identity headers come only from the gateway: whatever the client sent is dropped.
pub fn set_identity_headers(headers: &mut HeaderMap, id: Option<&Identity>) {
    headers.remove(USER_ID);
    headers.remove(USER_ROLE);
    if let Some(id) = id {
        if let Ok(v) = HeaderValue::from_str(&id.user_id) {
            headers.insert(USER_ID, v);
        }
        if let Ok(v) = HeaderValue::from_str(&id.roles.join(",")) {
            if !id.roles.is_empty() {
                headers.insert(USER_ROLE, v);
            }
        }
    }
}

pub fn set_forwarded_headers(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    proto: &str,
    host: Option<&HeaderValue>,
) {
    let xff = match headers.get(&FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => {
            let client = client.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{prev}, {client}")).ok()
        }
        _ => Some(client.clone()),
    };
    if let Some(v) = xff {
        headers.insert(FORWARDED_FOR, v);
    }
    headers.insert(
        FORWARDED_PROTO,
        HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
    );
    if let Some(h) = host {
        headers.insert(FORWARDED_HOST, h.clone());
    }
}

fn edit(
    headers: &mut HeaderMap,
    remove: &[String],
    add: &std::collections::BTreeMap<String, String>,
) {
    for name in remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
    for (k, v) in add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(n, v);
        }
    }
}

pub fn apply_request(t: &TransformConfig, headers: &mut HeaderMap) {
    edit(headers, &t.request_headers_remove, &t.request_headers_add);
}

pub fn apply_response(t: &TransformConfig, headers: &mut HeaderMap) {
    edit(headers, &t.response_headers_remove, &t.response_headers_add);
}

/// Remove the named fields at any depth; returns None if the body is not JSON.
pub fn strip_json_fields(body: &[u8], fields: &[String]) -> Option<Vec<u8>> {
    let mut v: serde_json::Value = serde_json::from_slice(body).ok()?;
    strip_value(&mut v, fields, 0);
    serde_json::to_vec(&v).ok()
}

fn strip_value(v: &mut serde_json::Value, fields: &[String], depth: usize) {
    // serde_json's parser already caps nesting at 128, this keeps us within it.
    if depth > 256 {
        return;
    }
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|k, _| !fields.contains(k));
            for child in map.values_mut() {
                strip_value(child, fields, depth + 1);
            }
        }
        serde_json::Value::Array(items) => {
            for child in items {
                strip_value(child, fields, depth + 1);
            }
        }
        _ => {}
    }
}

pub fn is_json(headers: &HeaderMap) -> bool {
    matches!(json_media_type(headers), Ok(true))
}

/// Why a response's media type cannot be judged (the stripping stage fails closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MediaTypeError {
    #[error("several Content-Type headers")]
    Several,
    #[error("Content-Type is not visible ASCII")]
    Unreadable,
}

/// Whether the response is typed JSON: `application/json` or any `+json` subtype.
/// Type and subtype compare case-insensitively (RFC 9110 §8.3.1) and parameters are
/// ignored, so `APPLICATION/JSON; charset=utf-8` is JSON. Several Content-Type
/// headers are an error: upstream and client could each read another one.
pub fn json_media_type(headers: &HeaderMap) -> Result<bool, MediaTypeError> {
    let mut all = headers.get_all(http::header::CONTENT_TYPE).iter();
    let Some(v) = all.next() else {
        return Ok(false);
    };
    if all.next().is_some() {
        return Err(MediaTypeError::Several);
    }
    let v = v.to_str().map_err(|_| MediaTypeError::Unreadable)?;
    let essence = v.split(';').next().unwrap_or_default().trim();
    let Some((ty, sub)) = essence.split_once('/') else {
        return Ok(false);
    };
    // `to_str` guarantees ASCII, so slicing by bytes is on char boundaries.
    let suffix_json = sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json");
    Ok((ty.eq_ignore_ascii_case("application") && sub.eq_ignore_ascii_case("json")) || suffix_json)
}

/// Outermost id stage: every request and response carries `X-Request-Id`.
pub async fn request_id_stage<B>(mut req: Request<B>, next: impl Next<Request<B>>) -> Response<Body> {
    let (id, value) = ensure_request_id(req.headers_mut());
    req.extensions_mut().insert(RequestId(id));
    let mut resp = run(next, req).await;
    resp.headers_mut().insert(REQUEST_ID, value);
    resp
}

/// Request side: identity and forwarding headers, configured edits, hop-by-hop
/// removal. Response side: configured edits and JSON field stripping.
///
/// `transforms` and `max_response` come from the request's config generation.
pub async fn transform_stage<B>(
    transforms: &BTreeMap<String, TransformConfig>,
    max_response: usize,
    Routed { mut req, route }: Routed<B>,
    next: impl Next<Routed<B>>,
) -> Response<Body> {
    let t = route
        .route
        .cfg
        .transform
        .as_ref()
        .and_then(|n| transforms.get(n));
    let identity = req.extensions().get::<Identity>().cloned();
    let (client, tls) = req
        .extensions()
        .get::<ConnInfo>()
        .map_or((HeaderValue::from_static("127.0.0.1"), false), |c| {
            (c.client_ip.clone(), c.tls)
        });
    let host = route.host.clone();
    let upgrade = is_upgrade(req.headers());
    let rid = req.extensions().get::<RequestId>().map(|r| r.0.clone());
    let h = req.headers_mut();
    set_identity_headers(h, identity.as_ref());
    set_forwarded_headers(
        h,
        &client,
        if tls { "https" } else { "http" },
        host.as_ref(),
    );
    // HTTP/2 carries the host in :authority; upstreams speak HTTP/1.1 and need Host.
    if !h.contains_key(http::header::HOST) {
        if let Some(v) = host {
            h.insert(http::header::HOST, v);
        }
    }
    if let Some(t) = t {
        apply_request(t, h);
        if !t.strip_json_fields.is_empty() {
            // Fields can only be stripped from a body we can read.
            h.insert(
                http::header::ACCEPT_ENCODING,
                HeaderValue::from_static("identity"),
            );
        }
    }
    if !upgrade {
        strip_hop_by_hop(h);
    }
    let mut resp = run(next, Routed { req, route }).await;
    let Some(t) = t else { return resp };
    apply_response(t, resp.headers_mut());
    if t.strip_json_fields.is_empty() {
        return resp;
    }
    let rid = rid.as_deref().unwrap_or_default();
    // Fail closed: a body we cannot read is never passed on from a stripping route.
    let fail = |why: &str| {
        tracing::warn!(request_id = %rid, reason = why, "cannot strip fields from upstream response");
        json_error_with_id(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            "invalid upstream response",
            rid,
        )
    };
    if is_encoded(resp.headers()) {
        return fail("upstream sent an encoded body");
    }
    match json_media_type(resp.headers()) {
        Ok(true) => {}
        Ok(false) => return resp,
        Err(e) => return fail(&e.to_string()),
    }
    let (mut parts, body) = resp.into_parts();
    let upstream = body.upstream_addr().cloned();
    // Rewriting needs the whole body; the limit bounds what one response may cost.
    let bytes = match Box::pin(crate::proxy::collect_limited(body, max_response)).await {
        Ok(b) => b,
        Err(e) => return fail(&e.to_string()),
    };
    let out = if bytes.is_empty() {
        // HEAD, 204, 304: nothing to strip.
        bytes
    } else {
        match strip_json_fields(&bytes, &t.strip_json_fields) {
            Some(stripped) => bytes::Bytes::from(stripped),
            None => return fail("body is not JSON"),
        }
    };
    parts.headers.remove(http::header::CONTENT_LENGTH);
    Response::from_parts(parts, full(out).with_upstream(upstream))
}

/// A `Content-Encoding` other than `identity`.
pub fn is_encoded(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[test]
    fn media_types_compare_case_insensitively() {
        let ct = |vals: &[&str]| {
            let mut h = HeaderMap::new();
            for v in vals {
                h.append(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_str(v).expect("hv"),
                );
            }
            json_media_type(&h)
        };
        for yes in [
            "application/json",
            "Application/JSON",
            "APPLICATION/JSON; charset=utf-8",
            "application/problem+JSON",
            "application/vnd.api+json ; x=1",
        ] {
            assert_eq!(ct(&[yes]), Ok(true), "{yes}");
        }
        for no in [
            "text/plain",
            "application/jsonx",
            "json",
            "+json",
            "application/x+jsonp",
        ] {
            assert_eq!(ct(&[no]), Ok(false), "{no}");
        }
        assert_eq!(ct(&[]), Ok(false));
        assert_eq!(
            ct(&["text/plain", "application/json"]),
            Err(MediaTypeError::Several)
        );
    }

    #[test]
    fn request_id_kept_or_generated() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(&*ensure_request_id(&mut h).0, "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("bad id with spaces"));
        let (id, v) = ensure_request_id(&mut h);
        assert_ne!(&*id, "bad id with spaces");
        assert_eq!(id.len(), 36, "uuid-like: {id}");
        assert_eq!(v, &*id);
        assert_eq!(h[X_REQUEST_ID], &*id);
        let b = id.as_bytes();
        assert!(
            b[14] == b'4' && matches!(b[19], b'8' | b'9' | b'a' | b'b'),
            "v4: {id}"
        );
    }

    #[test]
    fn strips_nested_fields() {
        let body = br#"{"id":1,"internal_id":9,"items":[{"password_hash":"x","n":2}]}"#;
        let out =
            strip_json_fields(body, &["internal_id".into(), "password_hash".into()]).expect("json");
        assert_eq!(
            String::from_utf8_lossy(&out),
            r#"{"id":1,"items":[{"n":2}]}"#
        );
        assert!(strip_json_fields(b"not json", &[]).is_none());
    }

    #[test]
    fn spoofed_identity_is_replaced() {
        let mut h = HeaderMap::new();
        h.insert(X_USER_ID, HeaderValue::from_static("admin"));
        set_identity_headers(&mut h, None);
        assert!(h.get(X_USER_ID).is_none());
        let id = Identity {
            user_id: "u7".into(),
            roles: vec!["a".into(), "b".into()],
            api_key: None,
        };
        set_identity_headers(&mut h, Some(&id));
        assert_eq!(h.get(X_USER_ID).map(|v| v.as_bytes()), Some(&b"u7"[..]));
        assert_eq!(h.get(X_USER_ROLE).map(|v| v.as_bytes()), Some(&b"a,b"[..]));
    }

    #[tokio::test]
    async fn request_id_stage_alone() {
        use crate::stage::testing::stub;
        let next = stub(|req: Request<()>| {
            let id = req
                .extensions()
                .get::<RequestId>()
                .map(|r| r.0.to_string())
                .unwrap_or_default();
            assert_eq!(
                req.headers()[X_REQUEST_ID],
                id.as_str(),
                "upstream sees the same id"
            );
            Response::new(full(id))
        });
        let req = Request::builder()
            .header(X_REQUEST_ID, "given-1")
            .body(())
            .expect("req");
        let resp = request_id_stage(req, next.clone()).await;
        assert_eq!(resp.headers()[X_REQUEST_ID], "given-1");
        let resp = request_id_stage(Request::new(()), next).await;
        assert_eq!(resp.headers()[X_REQUEST_ID].len(), 36, "generated");
    }

    #[tokio::test]
    async fn transform_stage_alone() {
        use crate::routing::testing::routed;
        use crate::stage::testing::stub;
        let toml = r#"
            [pools.p]
            backends = [{ address = "127.0.0.1:9" }]
            [transforms.t]
            request_headers_add = { "X-Gw" = "1" }
            response_headers_remove = ["Server"]
            strip_json_fields = ["secret"]
            [[routes]]
            name = "r"
            path = "/"
            pool = "p"
            transform = "t"
        "#;
        let (cfg, r) = routed(
            toml,
            Request::get("/x")
                .header(X_USER_ID, "spoof")
                .header("connection", "keep-alive"),
        );
        let next = stub(|Routed { req, .. }: Routed<()>| {
            assert_eq!(req.headers()["x-gw"], "1");
            assert!(
                req.headers().get(X_USER_ID).is_none(),
                "spoofed identity removed"
            );
            assert!(
                req.headers().get("connection").is_none(),
                "hop-by-hop removed"
            );
            assert_eq!(req.headers()["x-forwarded-for"], "127.0.0.1");
            let mut r = Response::new(full(r#"{"a":1,"secret":2}"#));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            r.headers_mut()
                .insert("server", HeaderValue::from_static("x"));
            r
        });
        let resp = transform_stage(&cfg.transforms, 1 << 20, r, next).await;
        assert!(resp.headers().get("server").is_none());
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], br#"{"a":1}"#);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        set_forwarded_headers(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            "https",
            Some(&HeaderValue::from_static("api.example.com")),
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
    }
}
