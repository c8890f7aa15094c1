//! Request/response transformation: request ids, forwarding and identity headers,
//! configured header edits and stripping internal fields from JSON bodies.

use crate::config::TransformConfig;
use crate::ctx::{owned, Identity, Req, RequestId};
// Re-exported where it used to live, for the fuzz target.
pub use crate::balance::cookie;
use crate::http_util::json_error_with_id;
use crate::http_util::{full, is_upgrade, strip_hop_by_hop, Body};
use crate::routing::Routed;
use crate::stage::{run, Either, Next};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const X_REQUEST_ID: &str = "x-request-id";
pub const X_USER_ID: &str = "x-user-id";
pub const X_USER_ROLE: &str = "x-user-role";

pub const REQUEST_ID: HeaderName = HeaderName::from_static(X_REQUEST_ID);
const USER_ID: HeaderName = HeaderName::from_static(X_USER_ID);
const USER_ROLE: HeaderName = HeaderName::from_static(X_USER_ROLE);
const FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
/// RFC 7239: the client's is dropped, none is set (`client_headers::GATEWAY_OWNED`).
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

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
    uuid_text(hi, lo)
}

/// `hi` and `lo` as UUID text: 8-4-4-4-12 lower-case hex digits.
fn uuid_text(hi: u64, lo: u64) -> [u8; 36] {
    // Formatted in place, two digits per table load: `format!` with five hex fields
    // is slow for every request, and so was a digit at a time.
    let mut hex = [0u8; 32];
    let (h, l) = (hi.to_be_bytes(), lo.to_be_bytes());
    for i in 0..8 {
        let [a, b] = HEX_PAIRS[usize::from(h[i])];
        let [c, d] = HEX_PAIRS[usize::from(l[i])];
        hex[2 * i] = a;
        hex[2 * i + 1] = b;
        hex[16 + 2 * i] = c;
        hex[17 + 2 * i] = d;
    }
    let mut id = *b"00000000-0000-0000-0000-000000000000";
    id[0..8].copy_from_slice(&hex[0..8]);
    id[9..13].copy_from_slice(&hex[8..12]);
    id[14..18].copy_from_slice(&hex[12..16]);
    id[19..23].copy_from_slice(&hex[16..20]);
    id[24..36].copy_from_slice(&hex[20..32]);
    id
}

/// Lower-case hex digits of every byte value.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    t
};

/// Returns the request id to use (and its header value), setting it on the request
/// headers. `client_sent`: whether the client may have sent one (else no lookup).
///
/// The client's first id is kept if valid; the upstream then gets that one value
/// alone: later ones would reach its logs unchecked, under the id the gateway logs
/// and returns. An invalid first id is replaced, and with it every other.
pub fn ensure_request_id(headers: &mut HeaderMap, client_sent: bool) -> (Arc<str>, HeaderValue) {
    if client_sent {
        // One lookup gives the first value and whether there are more.
        let mut all = headers.get_all(&REQUEST_ID).iter();
        let kept = all.next().and_then(|v| {
            let id = v.to_str().ok().filter(|id| valid_request_id(id))?;
            Some((Arc::<str>::from(id), v.clone()))
        });
        let several = all.next().is_some();
        if let Some((id, v)) = kept {
            if several {
                headers.insert(REQUEST_ID, v.clone());
            }
            return (id, v);
        }
    }
    let id = new_request_id_bytes();
    let id: Arc<str> = Arc::from(std::str::from_utf8(&id).unwrap_or_default());
    // The header value shares the id's allocation: `HeaderValue::from_bytes` copied
    // it into a buffer of its own, and the first clone of that (for the response)
    // allocated once more to make it shareable.
    let v = HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(SharedStr(id.clone())))
        .unwrap_or(HeaderValue::from_static(""));
    headers.insert(REQUEST_ID, v.clone());
    (id, v)
}

/// An `Arc<str>` as the owner of a `Bytes`: clones of the header value count
/// references on the id itself.
struct SharedStr(Arc<str>);

impl AsRef<[u8]> for SharedStr {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// Identity headers come only from the gateway: whatever the client sent is dropped.
/// `client_owned`: the `ctx::owned` bits of what the client may have sent.
pub fn set_identity_headers(headers: &mut HeaderMap, id: Option<&Identity>, client_owned: u16) {
    if client_owned & owned::USER_ID != 0 {
        headers.remove(USER_ID);
    }
    if client_owned & owned::USER_ROLE != 0 {
        headers.remove(USER_ROLE);
    }
    if let Some(id) = id {
        let values = id.headers();
        if let Some(v) = &values.user_id {
            headers.insert(USER_ID, v.clone());
        }
        if let Some(v) = &values.roles {
            headers.insert(USER_ROLE, v.clone());
        }
    }
}

/// Set `name` to the gateway's `value` (replacing every client value), or, with no
/// value, remove the client's copies if it sent any (`client_sent`).
fn set_or_drop(headers: &mut HeaderMap, name: HeaderName, value: Option<&HeaderValue>, client_sent: bool) {
    match value {
        Some(v) => {
            headers.insert(name, v.clone());
        }
        None if client_sent => {
            headers.remove(name);
        }
        None => {}
    }
}

/// `X-Forwarded-For` (the client's list, the peer appended), `-Proto`, `-Host`,
/// `-Port` (`port`: the listener's) and `X-Real-IP` (the peer) from the connection;
/// the client's `Forwarded` is dropped. `client_owned` as for `set_identity_headers`:
/// the client's copies are only looked up or removed when they may be there.
pub fn set_forwarded_headers(
    headers: &mut HeaderMap,
    client: &HeaderValue,
    proto: &str,
    host: Option<&HeaderValue>,
    port: Option<&HeaderValue>,
    client_owned: u16,
) {
    // Every line the client sent, in order: repeated lines are one list (RFC 9110 §5.3),
    // and a proxy in front may have added its entry as a line of its own.
    let mut list: Vec<u8> = Vec::new();
    if client_owned & owned::FORWARDED_FOR != 0 {
        for prev in headers.get_all(&FORWARDED_FOR) {
            if prev.to_str().is_ok_and(|p| !p.trim().is_empty()) {
                list.extend_from_slice(prev.as_bytes());
                list.extend_from_slice(b", ");
            }
        }
    }
    let xff = if list.is_empty() {
        Some(client.clone())
    } else {
        // "prev, client" built in one buffer (no `format!`); every part is visible
        // ASCII already, so the value stays valid.
        list.extend_from_slice(client.as_bytes());
        HeaderValue::from_maybe_shared(bytes::Bytes::from(list)).ok()
    };
    if let Some(v) = xff {
        headers.insert(FORWARDED_FOR, v);
    }
    headers.insert(
        FORWARDED_PROTO,
        HeaderValue::from_static(if proto == "https" { "https" } else { "http" }),
    );
    set_or_drop(headers, FORWARDED_HOST, host, client_owned & owned::FORWARDED_HOST != 0);
    // `insert` replaces every client value.
    headers.insert(REAL_IP, client.clone());
    set_or_drop(headers, FORWARDED_PORT, port, client_owned & owned::FORWARDED_PORT != 0);
    if client_owned & owned::FORWARDED != 0 {
        headers.remove(FORWARDED);
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
    add_headers(headers, add);
}

fn add_headers(headers: &mut HeaderMap, add: &std::collections::BTreeMap<String, String>) {
    for (k, v) in add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            headers.insert(n, v);
        }
    }
}

/// A configured request removal takes every spelling of the name that means the same
/// to an upstream: any case, and `_` for `-` either way (CGI/WSGI/PHP read `X_Debug`
/// and `X-Debug` both as `HTTP_X_DEBUG`).
pub fn apply_request(t: &TransformConfig, headers: &mut HeaderMap) {
    let remove = &t.request_headers_remove;
    if !remove.is_empty() {
        for name in remove {
            // The `-` spelling; `_` spellings are dropped below.
            let dashed = match name.contains('_') {
                true => std::borrow::Cow::Owned(name.replace('_', "-")),
                false => std::borrow::Cow::Borrowed(name.as_str()),
            };
            if let Ok(n) = HeaderName::from_bytes(dashed.as_bytes()) {
                headers.remove(n);
            }
        }
        crate::client_headers::drop_owned_variants(headers, remove.iter().map(String::as_str));
    }
    add_headers(headers, &t.request_headers_add);
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

/// The one Content-Type's media type without parameters (`None`: no Content-Type).
/// Several Content-Type headers are an error: upstream and client could each read
/// another one.
fn media_type_essence(headers: &HeaderMap) -> Result<Option<&str>, MediaTypeError> {
    let mut all = headers.get_all(http::header::CONTENT_TYPE).iter();
    let Some(v) = all.next() else {
        return Ok(None);
    };
    if all.next().is_some() {
        return Err(MediaTypeError::Several);
    }
    let v = v.to_str().map_err(|_| MediaTypeError::Unreadable)?;
    Ok(Some(v.split(';').next().unwrap_or_default().trim()))
}

/// Whether the response is typed JSON: `application/json` or any `+json` subtype.
/// Type and subtype compare case-insensitively (RFC 9110 §8.3.1) and parameters are
/// ignored, so `APPLICATION/JSON; charset=utf-8` is JSON. Several Content-Type
/// headers are an error: upstream and client could each read another one.
pub fn json_media_type(headers: &HeaderMap) -> Result<bool, MediaTypeError> {
    let Some(essence) = media_type_essence(headers)? else {
        return Ok(false);
    };
    let Some((ty, sub)) = essence.split_once('/') else {
        return Ok(false);
    };
    // `to_str` guarantees ASCII, so slicing by bytes is on char boundaries.
    let suffix_json = sub.len() > 5 && sub[sub.len() - 5..].eq_ignore_ascii_case("+json");
    Ok((ty.eq_ignore_ascii_case("application") && sub.eq_ignore_ascii_case("json")) || suffix_json)
}

/// Whether a stripping route must treat the response as JSON (strip its fields, or
/// refuse it when it does not parse): unless its one Content-Type is a well-formed
/// media type that does not mention JSON, it is. So JSON under another label
/// (`text/json`, `application/x-json`), a list (`application/json, text/html`), a
/// malformed value or none at all cannot carry the fields out; `text/html` passes.
pub fn read_as_json(headers: &HeaderMap) -> Result<bool, MediaTypeError> {
    let Some(essence) = media_type_essence(headers)? else {
        return Ok(true);
    };
    // RFC 9110 §5.6.2 token characters.
    let token = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    let well_formed = essence
        .split_once('/')
        .is_some_and(|(ty, sub)| token(ty) && token(sub));
    let mentions_json = essence
        .as_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"json"));
    Ok(!well_formed || mentions_json)
}

/// Every request and response carries `X-Request-Id`: keep the client's (if valid)
/// or make one, note it in the request's context and return it for the response
/// (set on the way out, where the pipeline's answer leaves: `pipeline.rs`).
pub fn assign_request_id<B>(req: &mut Req<B>) -> HeaderValue {
    let (r, ctx) = req.split_mut();
    let (id, value) = ensure_request_id(r.headers_mut(), ctx.client_sent(owned::REQUEST_ID));
    ctx.request_id = Some(RequestId(id));
    value
}

/// Request side: identity and forwarding headers, configured edits, hop-by-hop
/// removal. Response side: configured edits and JSON field stripping.
///
/// `transforms` and `max_response` come from the request's config generation.
///
/// A route without a transform (the usual case) needs no response side: the rest of
/// the pipeline's future is handed over as is, with no future of this stage's own.
pub fn transform_stage<'a, B: Send + 'static, N: Next<Routed<B>>>(
    transforms: &'a BTreeMap<String, TransformConfig>,
    max_response: usize,
    mut routed: Routed<B>,
    next: N,
) -> impl std::future::Future<Output = Response<Body>> + Send + 'a {
    match transform_request(transforms, &mut routed) {
        None => Either::pass(next.run(routed)),
        Some(t) => {
            let rid = routed.req.ctx().request_id.as_ref().map(|r| r.0.clone());
            // Boxed: most routes have no transform, and an inline response-side
            // future would make every request's pipeline future that much larger.
            Either::work(Box::pin(transform_response(t, max_response, rid, run(next, routed))))
        }
    }
}

/// The request side of `transform_stage`; returns the route's transform, if any.
fn transform_request<'a, B>(
    transforms: &'a BTreeMap<String, TransformConfig>,
    Routed { req, route }: &mut Routed<B>,
) -> Option<&'a TransformConfig> {
    let (r, ctx) = req.split_mut();
    let t = route
        .route
        .cfg
        .transform
        .as_ref()
        .and_then(|n| transforms.get(n));
    // The client-header pass knows whether this is an upgrade; a request it has not
    // seen (`client_headers` unset) is asked directly.
    let upgrade = match ctx.client_headers {
        Some(_) => ctx.upgrade,
        None => is_upgrade(r.headers()),
    };
    let host = route.host.clone();
    let h = r.headers_mut();
    set_identity_headers(h, ctx.identity.as_deref(), ctx.client_owned);
    set_forwarded_headers(
        h,
        &ctx.conn.client_ip,
        if ctx.conn.tls { "https" } else { "http" },
        host.as_ref(),
        ctx.conn.listener_port.as_ref(),
        ctx.client_owned,
    );
    // HTTP/2 carries the host in :authority; upstreams speak HTTP/1.1 and need Host.
    // A Host the checks accepted (`ctx.host`) is there: no lookup.
    if ctx.host.is_none() && !h.contains_key(http::header::HOST) {
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
    // The client's hop-by-hop headers are gone already (`client_headers`); only
    // configured edits can have added some since.
    if !upgrade && (t.is_some() || ctx.client_headers.is_none()) {
        strip_hop_by_hop(h);
    }
    t
}

/// The response side of `transform_stage` for a route with transform `t`: configured
/// edits and JSON field stripping on what `inner` (the rest of the pipeline) answers.
async fn transform_response(
    t: &TransformConfig,
    max_response: usize,
    rid: Option<Arc<str>>,
    inner: impl std::future::Future<Output = Response<Body>>,
) -> Response<Body> {
    let mut resp = inner.await;
    apply_response(t, resp.headers_mut());
    if !t.response_headers_remove.is_empty() || !t.response_headers_add.is_empty() {
        let names = t.response_headers_remove.iter().chain(t.response_headers_add.keys());
        let names = names.filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()).collect();
        resp.body_mut().keep_out_of_trailers(names);
    }
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
    match read_as_json(resp.headers()) {
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
    use http::Request;
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

    proptest::proptest! {
        /// The table-driven formatting writes what `format!` would.
        #[test]
        fn uuid_text_matches_format(hi in proptest::num::u64::ANY, lo in proptest::num::u64::ANY) {
            let want = format!(
                "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
                hi >> 32,
                (hi >> 16) & 0xffff,
                hi & 0xffff,
                lo >> 48,
                lo & 0xffff_ffff_ffff
            );
            let got = uuid_text(hi, lo);
            proptest::prop_assert_eq!(String::from_utf8_lossy(&got), want);
        }
    }

    #[test]
    fn request_id_kept_or_generated() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(&*ensure_request_id(&mut h, true).0, "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("bad id with spaces"));
        let (id, v) = ensure_request_id(&mut h, true);
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
    fn upstream_gets_exactly_the_one_request_id_the_gateway_keeps() {
        let ids = |h: &HeaderMap| -> Vec<String> {
            h.get_all(X_REQUEST_ID)
                .iter()
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                .collect()
        };
        for later in ["two", "bad value"] {
            let mut h = HeaderMap::new();
            h.append(X_REQUEST_ID, HeaderValue::from_static("one"));
            h.append(X_REQUEST_ID, HeaderValue::from_str(later).expect("hv"));
            let (id, v) = ensure_request_id(&mut h, true);
            assert_eq!((&*id, v.as_bytes()), ("one", &b"one"[..]));
            assert_eq!(ids(&h), ["one"], "later value {later:?} dropped");
        }
        let mut h = HeaderMap::new();
        h.append(X_REQUEST_ID, HeaderValue::from_static("bad id"));
        h.append(X_REQUEST_ID, HeaderValue::from_static("two"));
        let (id, _) = ensure_request_id(&mut h, true);
        assert_eq!(id.len(), 36, "generated: {id}");
        assert_eq!(ids(&h), [&*id]);
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
        set_identity_headers(&mut h, None, owned::UNKNOWN);
        assert!(h.get(X_USER_ID).is_none());
        let id = Identity::new("u7".into(), vec!["a".into(), "b".into()], None);
        set_identity_headers(&mut h, Some(&id), owned::UNKNOWN);
        assert_eq!(h.get(X_USER_ID).map(|v| v.as_bytes()), Some(&b"u7"[..]));
        assert_eq!(h.get(X_USER_ROLE).map(|v| v.as_bytes()), Some(&b"a,b"[..]));
    }

    #[test]
    fn request_id_assigned_to_the_context_and_the_request() {
        use crate::ctx::testing;
        let mut req = testing::req(
            Request::builder()
                .header(X_REQUEST_ID, "given-1")
                .body(())
                .expect("req"),
        );
        assert_eq!(assign_request_id(&mut req), "given-1");
        assert_eq!(req.ctx().request_id_str(), "given-1");
        let mut req = testing::req(Request::new(()));
        let v = assign_request_id(&mut req);
        assert_eq!(v.len(), 36, "generated");
        assert_eq!(req.headers()[X_REQUEST_ID], v, "upstream sees the same id");
        assert_eq!(req.ctx().request_id_str(), v);
        // Told the client sent none, a client's id is not even looked at.
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("given-2"));
        assert_ne!(&*ensure_request_id(&mut h, false).0, "given-2");
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

    /// Hostile finding F11: JSON under another label (or none) went out unstripped.
    /// Whatever could be read as JSON is stripped or refused; only a response typed as
    /// plainly another media type passes as it came.
    #[tokio::test]
    async fn mislabelled_json_is_stripped_or_refused_never_passed() {
        use crate::routing::testing::routed;
        use crate::stage::testing::stub;
        let toml = r#"
            [pools.p]
            backends = [{ address = "127.0.0.1:9" }]
            [transforms.t]
            strip_json_fields = ["secret"]
            [[routes]]
            name = "r"
            path = "/"
            pool = "p"
            transform = "t"
        "#;
        let run = |ct: Option<&'static str>, body: &'static str| {
            let (cfg, r) = routed(toml, Request::get("/x"));
            async move {
                let next = stub(move |_: Routed<()>| {
                    let mut r = Response::new(full(body));
                    if let Some(ct) = ct {
                        r.headers_mut()
                            .insert("content-type", HeaderValue::from_static(ct));
                    }
                    r
                });
                let resp = transform_stage(&cfg.transforms, 1 << 20, r, next).await;
                let status = resp.status();
                let body = resp.into_body().collect().await.expect("body").to_bytes();
                (status, String::from_utf8_lossy(&body).into_owned())
            }
        };
        let json = r#"{"a":1,"secret":2}"#;
        for ct in [
            None,
            Some("text/json"),
            Some("application/x-json"),
            Some("application/json, text/html"),
            Some("application/ json"),
            Some("Application/X-JSON; charset=utf-8"),
        ] {
            assert_eq!(run(ct, json).await, (StatusCode::OK, r#"{"a":1}"#.into()), "{ct:?}");
        }
        // Labelled JSON but not JSON: refused, not passed on.
        for ct in [None, Some("application/json-seq"), Some("text/json")] {
            let (status, body) = run(ct, "\u{1e}secret stuff").await;
            assert_eq!(status, StatusCode::BAD_GATEWAY, "{ct:?}: {body}");
            assert!(!body.contains("secret"), "{body}");
        }
        // Plainly another media type: passed as it came.
        assert_eq!(
            run(Some("text/html; charset=utf-8"), "<p>secret</p>").await,
            (StatusCode::OK, "<p>secret</p>".into())
        );
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
            Some(&HeaderValue::from_static("8443")),
            owned::FORWARDED_FOR,
        );
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example.com");
        assert_eq!(h["x-forwarded-port"], "8443");
        assert_eq!(h["x-real-ip"], "127.0.0.1");
    }

    /// Hostile r3b finding 4: of two `X-Forwarded-For` lines only the first was kept
    /// (a proxy in front that adds its entry as a new line lost it).
    #[test]
    fn forwarded_for_keeps_every_line_the_client_sent() {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("6.6.6.6"));
        h.append("x-forwarded-for", HeaderValue::from_static(" "));
        h.append("x-forwarded-for", HeaderValue::from_static("7.7.7.7, 8.8.8.8"));
        set_forwarded_headers(
            &mut h,
            &HeaderValue::from_static("127.0.0.1"),
            "http",
            None,
            None,
            owned::FORWARDED_FOR,
        );
        let all: Vec<_> = h.get_all("x-forwarded-for").iter().collect();
        assert_eq!(all, ["6.6.6.6, 7.7.7.7, 8.8.8.8, 127.0.0.1"]);
    }

    /// Hostile finding F-l: the client's `Forwarded`, `X-Real-IP` and
    /// `X-Forwarded-Port` passed through while `X-Forwarded-*` were rewritten.
    #[test]
    fn client_forwarding_headers_are_replaced_or_dropped() {
        let mut h = HeaderMap::new();
        h.append("forwarded", HeaderValue::from_static("for=1.2.3.4;proto=https"));
        h.append("x-real-ip", HeaderValue::from_static("1.2.3.4"));
        h.append("x-real-ip", HeaderValue::from_static("5.6.7.8"));
        h.append("x-forwarded-port", HeaderValue::from_static("443"));
        h.append("x-forwarded-host", HeaderValue::from_static("evil.example"));
        let client = HeaderValue::from_static("127.0.0.1");
        let sent = owned::FORWARDED | owned::REAL_IP | owned::FORWARDED_PORT | owned::FORWARDED_HOST;
        set_forwarded_headers(&mut h, &client, "http", None, None, sent);
        assert!(h.get("forwarded").is_none());
        assert!(h.get("x-forwarded-host").is_none(), "no host known: the client's is not kept");
        assert!(h.get("x-forwarded-port").is_none(), "no listener port known: none");
        let real: Vec<_> = h.get_all("x-real-ip").iter().collect();
        assert_eq!(real, [&client]);
    }

    /// Hostile finding F-l: `request_headers_remove = ["X-Debug"]` forwarded `X_Debug`.
    #[test]
    fn request_removals_take_every_spelling() {
        let t = TransformConfig {
            request_headers_remove: vec!["X-Debug".into(), "x_TRACE_me".into()],
            ..TransformConfig::default()
        };
        let mut h = HeaderMap::new();
        for n in ["x-debug", "X_Debug", "x_DEBUG", "x-trace-me", "X_Trace_Me", "x-debugger", "x_other"] {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).expect("name"),
                HeaderValue::from_static("v"),
            );
        }
        apply_request(&t, &mut h);
        let mut left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["x-debugger", "x_other"]);
    }
}
