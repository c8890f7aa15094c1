//! The gateway's request pipeline, composed in one place: the only module that
//! imports every stage. Stages share per-request data through extensions: request
//! extensions carry what outer stages learned (connection, ids, route, identity),
//! response extensions carry what inner stages learned (route, user, upstream)
//! back out to the access log.

use crate::ctx::{ConnInfo, RequestIndex};
use crate::gateway::{Runtime, Shared};
use crate::http_util::Body;
use crate::stage::{stage, Next};
use http::{Request, Response};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

/// The config generation a request runs under, fixed when it arrives.
#[derive(Clone)]
pub struct Snapshot(pub Arc<Runtime>);

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
    use super::*;

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
