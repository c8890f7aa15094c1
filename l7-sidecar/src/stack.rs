//! The gateway as a pipeline of stages, one per concern. Each concern's module
//! exposes an `async fn(req, next) -> Response` stage, where `next` is the rest of the
//! pipeline, so every stage can be tested alone against a stub `next`.
//!
//! Stages are composed statically (`Stage<F, N>` below): a request runs through one
//! future, boxed once per request, instead of a boxed, cloned tower service and a
//! boxed future per stage. With a dozen stages that per-stage boxing, cloning and
//! dynamic dispatch cost more than the proxying itself.
//!
//! Stages share per-request data through extensions: request extensions carry what
//! outer stages learned (connection, config snapshot, ids, route, identity), response
//! extensions carry what inner stages learned (route, user, upstream) back out to
//! the access log.

use crate::gateway::{Runtime, Shared};
use crate::proxy::{full, Body};
use http::{header, HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

/// The rest of the pipeline below a stage. Running it consumes it: a stage calls it
/// at most once, and the pipeline is cloned (cheaply: stages are plain functions)
/// per request.
pub trait Next<B>: Send + 'static {
    fn run(self, req: Request<B>) -> impl Future<Output = Response<Body>> + Send;
}

/// Run the rest of the pipeline.
pub fn run<B, N: Next<B>>(next: N, req: Request<B>) -> impl Future<Output = Response<Body>> + Send {
    next.run(req)
}

/// One stage in front of the rest of the pipeline.
#[derive(Clone)]
pub struct Stage<F, N> {
    f: F,
    next: N,
}

impl<B, F, Fut, N> Next<B> for Stage<F, N>
where
    F: FnOnce(Request<B>, N) -> Fut + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send,
    N: Send + 'static,
{
    fn run(self, req: Request<B>) -> impl Future<Output = Response<Body>> + Send {
        (self.f)(req, self.next)
    }
}

/// Put `f` in front of `next`; the request body type is fixed to hyper's so the
/// stage functions' generic parameters are inferred.
fn stage<F, Fut, N>(f: F, next: N) -> Stage<F, N>
where
    F: FnOnce(Request<Incoming>, N) -> Fut,
{
    Stage { f, next }
}

/// Per connection, inserted before the pipeline runs.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP as text (for X-Forwarded-For, logs and rate-limit keys),
    /// formatted once per connection rather than per request.
    pub client_ip: HeaderValue,
    pub tls: bool,
    pub serve_metrics: bool,
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

/// The config generation a request runs under, fixed when it arrives.
#[derive(Clone)]
pub struct Snapshot(pub Arc<Runtime>);

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
#[derive(Clone)]
pub struct MatchedRoute(pub Arc<crate::routing::Route>);
#[derive(Clone, Debug)]
pub struct UserId(pub String);
/// The backend address (or the aggregated pools) that answered.
#[derive(Clone, Debug)]
pub struct UpstreamAddr(pub Arc<str>);

pub fn json_error<B>(
    req: &Request<B>,
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<Body> {
    let id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| &*r.0)
        .unwrap_or_default();
    json_error_with_id(status, code, message, id)
}

pub fn json_error_with_id(
    status: StatusCode,
    code: &str,
    message: &str,
    request_id: &str,
) -> Response<Body> {
    let body = serde_json::json!({ "error": code, "message": message, "status": status.as_u16(), "request_id": request_id });
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// The innermost stage: forward to the upstream pool.
#[derive(Clone, Copy)]
pub struct Proxy;

impl Next<Incoming> for Proxy {
    fn run(self, req: Request<Incoming>) -> impl Future<Output = Response<Body>> + Send {
        crate::proxy::proxy(req)
    }
}

/// The full pipeline, outermost stage first.
pub fn pipeline(shared: Arc<Shared>) -> impl Next<Incoming> + Clone {
    let p = stage(crate::transform::transform_stage, Proxy);
    let p = stage(crate::ratelimit::rate_limit_stage, p);
    let p = stage(crate::auth::auth_stage, p);
    let p = stage(crate::routing::routing_stage, p);
    let p = stage(crate::observe::metrics_stage, p);
    let p = stage(crate::guard::hardening_stage, p);
    let p = stage(
        move |req, next| crate::observe::access_log_stage(shared, req, next),
        p,
    );
    let p = stage(crate::observe::trace_stage, p);
    let p = stage(crate::transform::request_id_stage, p);
    stage(crate::client_headers::client_headers_stage, p)
}

/// The pipeline as the service hyper calls for each request on one connection.
#[derive(Clone)]
pub struct GatewayService<P> {
    shared: Arc<Shared>,
    conn: ConnInfo,
    pipeline: P,
}

/// The service for one connection.
pub fn build(shared: Arc<Shared>, conn: ConnInfo) -> GatewayService<impl Next<Incoming> + Clone> {
    GatewayService {
        pipeline: pipeline(shared.clone()),
        shared,
        conn,
    }
}

impl<P: Next<Incoming> + Clone> tower::Service<Request<Incoming>> for GatewayService<P> {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<Incoming>) -> Self::Future {
        let index = self.conn.requests.fetch_add(1, Ordering::Relaxed);
        req.extensions_mut().insert(RequestIndex(index));
        // In flight until hyper drops the response body: the idle watchdog must not
        // close a connection whose response is still being produced.
        let in_flight = self.conn.activity.start_request();
        req.extensions_mut().insert(self.conn.clone());
        req.extensions_mut()
            .insert(Snapshot(self.shared.runtime.load_full()));
        // Boxed straight away: the pipeline future is several KiB, and every
        // further move of it (into a wrapping `async` block, say) is a memcpy.
        ResponseFuture {
            fut: Box::pin(self.pipeline.clone().run(req)),
            in_flight: Some(in_flight),
        }
    }
}

/// The boxed pipeline future, as the `Result` tower expects.
/// Its response body carries the request's `InFlight` guard.
pub struct ResponseFuture {
    fut: Pin<Box<dyn Future<Output = Response<Body>> + Send>>,
    in_flight: Option<crate::idle::InFlight>,
}

impl Future for ResponseFuture {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = std::task::ready!(self.fut.as_mut().poll(cx));
        let guard = self.in_flight.take();
        Poll::Ready(Ok(match guard {
            Some(g) => {
                use http_body_util::BodyExt as _;
                resp.map(|b| crate::idle::InFlightBody::new(b, g).boxed())
            }
            None => resp,
        }))
    }
}

#[cfg(test)]
pub mod testing {
    //! Helpers to run one stage against a stub `next`.
    use super::*;

    #[derive(Clone)]
    pub struct Stub<F>(F);

    impl<B, F> Next<B> for Stub<F>
    where
        B: Send + 'static,
        F: FnOnce(Request<B>) -> Response<Body> + Send + 'static,
    {
        #[allow(clippy::manual_async_fn)]
        fn run(self, req: Request<B>) -> impl Future<Output = Response<Body>> + Send {
            async move { (self.0)(req) }
        }
    }

    pub fn stub<B: Send + 'static>(
        f: impl Fn(Request<B>) -> Response<Body> + Clone + Send + 'static,
    ) -> Stub<impl Fn(Request<B>) -> Response<Body> + Clone + Send + 'static> {
        Stub(f)
    }

    pub fn ok<B>(_: Request<B>) -> Response<Body> {
        Response::new(full("ok"))
    }

    /// A request as the stages below routing see it: connection, snapshot and
    /// matched route in its extensions. Needs a Tokio runtime (the gateway starts tasks).
    pub fn routed(toml: &str, builder: http::request::Builder) -> (crate::Gateway, Request<()>) {
        let cfg = crate::Config::parse(toml).unwrap_or_else(|e| panic!("test config: {e}"));
        let gw = crate::Gateway::new(cfg, None).unwrap_or_else(|e| panic!("gateway: {e}"));
        let mut req = builder.body(()).unwrap_or_else(|e| panic!("request: {e}"));
        let rt = gw.runtime();
        let crate::routing::RouteMatch::Found { route, params } =
            rt.router
                .lookup(None, req.method(), req.uri().path(), req.headers())
        else {
            panic!("test request must match a route");
        };
        let conn = ConnInfo::new("127.0.0.1:5555".parse().expect("addr"), false, false);
        req.extensions_mut().insert(conn);
        req.extensions_mut().insert(crate::routing::RouteCtx {
            route,
            params,
            host: None,
        });
        req.extensions_mut().insert(Snapshot(rt));
        (gw, req)
    }
}
