//! Per-request context: what the connection and the outer stages learned about a
//! request, carried to inner stages (request extensions) and back out to the access
//! log (response extensions). A leaf: nothing here knows about any stage.

use http::HeaderValue;
use std::fmt;
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

/// How many header fields the client sent (before any stage added one).
#[derive(Clone, Copy, Debug)]
pub struct ClientHeaderCount(pub usize);

/// Position of a request among those of its connection (0-based, arrival order).
#[derive(Clone, Copy, Debug)]
pub struct RequestIndex(pub u64);

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
#[derive(Clone, Debug)]
pub struct UserId(pub String);
/// The backend address (or the aggregated pools) that answered.
#[derive(Clone, Debug)]
pub struct UpstreamAddr(pub Arc<str>);
