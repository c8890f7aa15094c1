//! Per-request context: what the connection and the outer stages learned about a
//! request, carried to inner stages as typed fields of `ReqCtx` (one struct made
//! once per request, boxed together with the request: a stage boundary moves one
//! pointer) and back out to the access log (response extensions; the untraced
//! pipeline hands it the matched route directly). Nothing here knows about any
//! stage.

use http::{HeaderValue, Request};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Per connection, inserted before the pipeline runs.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP as text (for X-Forwarded-For, logs and rate-limit keys),
    /// formatted once per connection rather than per request.
    pub client_ip: HeaderValue,
    pub tls: bool,
    /// The listener's port as text for `X-Forwarded-Port`, formatted once per
    /// connection; `None` when unknown (the header is then not set).
    pub listener_port: Option<HeaderValue>,
    pub serve_metrics: bool,
    /// Accepted by the `[admin]` listener: answered by `admin`, never by the pipeline.
    pub admin: bool,
    /// Filled by `guard::SmuggleGuard`: which request of the connection had both
    /// CL and TE.
    pub smuggled: Arc<crate::smuggle::Smuggled>,
    /// Requests handed to the pipeline so far (numbers them for `RequestIndex`).
    pub requests: Arc<AtomicU64>,
    /// The connection's idle watchdog state.
    pub activity: Arc<crate::idle::Activity>,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool, serve_metrics: bool) -> ConnInfo {
        ConnInfo {
            peer,
            // An IP address is always a valid header value.
            client_ip: HeaderValue::try_from(peer.ip().to_string())
                .unwrap_or(HeaderValue::from_static("")),
            tls,
            listener_port: None,
            serve_metrics,
            admin: false,
            smuggled: Arc::default(),
            requests: Arc::default(),
            activity: crate::idle::Activity::new(),
        }
    }

    pub fn client_ip_str(&self) -> &str {
        self.client_ip.to_str().unwrap_or_default()
    }
}

/// Why a request's framing is refused, judged on the headers as hyper parsed them
/// (before hop-by-hop headers are stripped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadFraming(pub &'static str);

/// Who the caller is, as authentication established it. Shared (`Arc`) between the
/// token cache and the requests of the same caller.
#[derive(Debug, Clone)]
pub struct Identity {
    pub user_id: String,
    pub roles: Vec<String>,
    /// Set when the caller used an API key (rate limiting can key on it).
    pub api_key: Option<String>,
    /// `X-User-Id` and `X-User-Role` values, made on first use: a cached token's
    /// requests reuse them instead of validating and copying the strings again.
    headers: std::sync::OnceLock<IdentityHeaders>,
}

/// Header values of an identity (`None`: not a valid header value, or no roles).
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    pub user_id: Option<HeaderValue>,
    pub roles: Option<HeaderValue>,
}

impl Identity {
    pub fn new(user_id: String, roles: Vec<String>, api_key: Option<String>) -> Identity {
        Identity {
            user_id,
            roles,
            api_key,
            headers: std::sync::OnceLock::new(),
        }
    }

    pub fn headers(&self) -> &IdentityHeaders {
        self.headers.get_or_init(|| IdentityHeaders {
            user_id: HeaderValue::from_str(&self.user_id).ok(),
            roles: (!self.roles.is_empty())
                .then(|| HeaderValue::from_str(&self.roles.join(",")).ok())
                .flatten(),
        })
    }
}

// The cached header values are derived data: equality is the identity's fields'.
impl PartialEq for Identity {
    fn eq(&self, o: &Identity) -> bool {
        self.user_id == o.user_id && self.roles == o.roles && self.api_key == o.api_key
    }
}

impl Eq for Identity {}

/// Bits of `ReqCtx::client_owned`: which gateway-owned names the client sent, found
/// by the one pass over its header names (`client_headers`). A stage that sets such
/// a header reads or removes the client's copy only when its bit is set, instead of
/// hashing the name once more for the usual request that has none.
pub mod owned {
    pub const REQUEST_ID: u16 = 1;
    pub const USER_ID: u16 = 1 << 1;
    pub const USER_ROLE: u16 = 1 << 2;
    pub const FORWARDED_FOR: u16 = 1 << 3;
    pub const FORWARDED_PROTO: u16 = 1 << 4;
    pub const FORWARDED_HOST: u16 = 1 << 5;
    pub const TRACEPARENT: u16 = 1 << 6;
    /// RFC 7239 `Forwarded`: the gateway drops the client's and sets none.
    pub const FORWARDED: u16 = 1 << 7;
    pub const REAL_IP: u16 = 1 << 8;
    pub const FORWARDED_PORT: u16 = 1 << 9;
    /// Nothing known: every stage looks (a request no client-header pass has seen).
    pub const UNKNOWN: u16 = u16::MAX;
}

/// What the gateway knows about one request, as fields: made once when the request
/// arrives, filled in by the stages in order. Fields instead of `http::Extensions`
/// entries: no `TypeId` hashing and no box per entry.
#[derive(Debug)]
pub struct ReqCtx {
    pub conn: Arc<ConnInfo>,
    /// Position of the request among those of its connection (0-based, arrival order).
    pub index: u64,
    /// How many header fields the client sent (before any stage added one); `None`
    /// until the client-header pass counted them.
    pub client_headers: Option<usize>,
    /// The framing verdict of the client-header pass (`None`: acceptable or not judged).
    pub framing: Option<BadFraming>,
    /// Gateway-owned names the client sent (`owned` bits).
    pub client_owned: u16,
    /// A WebSocket upgrade (Connection: upgrade and Upgrade: websocket).
    pub upgrade: bool,
    pub request_id: Option<RequestId>,
    pub trace_id: Option<TraceId>,
    /// Set by the auth stage.
    pub identity: Option<Arc<Identity>>,
    /// Whether the access log reads the user stages note on the response (`UserId`):
    /// only for a record it builds. `true` until the access log said otherwise.
    pub log_reads_user: bool,
    /// The request's one Host header value as the Host checks accepted it
    /// (`guard::harden`); `None`: no Host header, or not checked yet. Routing and the
    /// transform read it here instead of looking the header up again.
    pub host: Option<HeaderValue>,
}

impl ReqCtx {
    pub fn new(conn: Arc<ConnInfo>, index: u64) -> ReqCtx {
        ReqCtx {
            conn,
            index,
            client_headers: None,
            framing: None,
            client_owned: owned::UNKNOWN,
            upgrade: false,
            request_id: None,
            trace_id: None,
            identity: None,
            log_reads_user: true,
            host: None,
        }
    }

    /// The request id, or "" before the request-id step ran.
    pub fn request_id_str(&self) -> &str {
        self.request_id.as_ref().map_or("", |r| &r.0)
    }

    /// Whether the client may have sent a header with this `owned` bit.
    pub fn client_sent(&self, bit: u16) -> bool {
        self.client_owned & bit != 0
    }
}

/// A request and its context, boxed once: stages pass this 8-byte handle instead of
/// moving the ~250-byte `Request` from stage to stage. Derefs to the request.
pub struct Req<B>(Box<ReqParts<B>>);

struct ReqParts<B> {
    req: Request<B>,
    ctx: ReqCtx,
}

impl<B> Req<B> {
    pub fn new(req: Request<B>, ctx: ReqCtx) -> Req<B> {
        Req(Box::new(ReqParts { req, ctx }))
    }

    pub fn ctx(&self) -> &ReqCtx {
        &self.0.ctx
    }

    pub fn ctx_mut(&mut self) -> &mut ReqCtx {
        &mut self.0.ctx
    }

    /// The request and its context, both borrowed (a stage edits headers while
    /// reading the context).
    pub fn split_mut(&mut self) -> (&mut Request<B>, &mut ReqCtx) {
        let p = &mut *self.0;
        (&mut p.req, &mut p.ctx)
    }

    pub fn into_parts(self) -> (Request<B>, ReqCtx) {
        let p = *self.0;
        (p.req, p.ctx)
    }

    pub fn into_request(self) -> Request<B> {
        self.0.req
    }
}

impl<B> Deref for Req<B> {
    type Target = Request<B>;
    fn deref(&self) -> &Request<B> {
        &self.0.req
    }
}

impl<B> DerefMut for Req<B> {
    fn deref_mut(&mut self) -> &mut Request<B> {
        &mut self.0.req
    }
}

#[cfg(test)]
pub mod testing {
    //! Requests with a context, for stage tests.
    use super::*;

    pub fn conn() -> Arc<ConnInfo> {
        Arc::new(ConnInfo::new("127.0.0.1:1".parse().expect("addr"), false, false))
    }

    pub fn req<B>(r: Request<B>) -> Req<B> {
        Req::new(r, ReqCtx::new(conn(), 0))
    }
}

/// Shared rather than owned: several stages and the error paths keep a copy.
#[derive(Clone, Debug)]
pub struct RequestId(pub Arc<str>);

/// W3C trace id of the request (never zero).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceId(pub u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// Response extensions read by the access log.
///
/// The authenticated caller: shared with the request's context (an `Arc` clone per
/// request, not a copy of the user id).
#[derive(Clone, Debug)]
pub struct UserId(pub Arc<Identity>);

impl UserId {
    pub fn as_str(&self) -> &str {
        &self.0.user_id
    }
}
/// The backend address (or the aggregated pools) that answered.
#[derive(Clone, Debug)]
pub struct UpstreamAddr(pub Arc<str>);
