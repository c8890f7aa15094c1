//! The gateway's request pipeline, composed in one place: the only module that
//! imports every stage (the shape of linkerd2-proxy's `push_*` chain). Each stage
//! is handed its own state explicitly — its slice of the config generation the
//! request runs under, its registries — so no stage reads a gateway-wide runtime,
//! and each can be tested alone with a stub `next`.
//!
//! Stages share per-request data through `ctx` types in extensions: request
//! extensions carry what outer stages learned (connection, ids, identity), response
//! extensions carry what inner stages learned (route, user, upstream) back out to
//! the access log. The matched route is not an extension: stages below routing take
//! a `Routed` request, so "no route" cannot happen there.

use crate::ctx::{ConnInfo, RequestIndex};
use crate::gateway::{Runtime, Shared};
use crate::http_util::Body;
use crate::routing::Routed;
use crate::stage::{stage, Next};
use crate::trace::{Hop, StageKind, Traced, Tracer};
use http::{Request, Response};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

/// `Traced` for the stages above routing, with the request type fixed.
fn traced<F, Fut, N>(kind: StageKind, tracer: &Tracer, f: F, next: N) -> Traced<F, N>
where
    F: FnOnce(Request<Incoming>, Hop<N>) -> Fut,
{
    Traced::new(kind, tracer, f, next)
}

/// `Traced` for the stages below routing.
fn traced_routed<F, Fut, N>(kind: StageKind, tracer: &Tracer, f: F, next: N) -> Traced<F, N>
where
    F: FnOnce(Routed<Incoming>, Hop<N>) -> Fut,
{
    Traced::new(kind, tracer, f, next)
}

/// The innermost stage: forward to the upstream pool.
struct Proxy(Arc<Runtime>, Tracer);

impl Next<Routed<Incoming>> for Proxy {
    #[allow(clippy::manual_async_fn)]
    fn run(self, r: Routed<Incoming>) -> impl Future<Output = Response<Body>> + Send {
        async move {
            let Proxy(rt, tracer) = self;
            let mark = tracer.as_ref().map(|t| t.enter(StageKind::Upstream));
            let resp = crate::proxy::proxy(&rt.upstreams, &rt.cfg.server, r).await;
            if let (Some(t), Some(mark)) = (&tracer, mark) {
                t.exit(mark, &resp);
            }
            resp
        }
    }
}

/// The full pipeline for one request, outermost stage first. `rt` is the config
/// generation the request runs under, fixed when it arrives; each stage holds a
/// reference-counted handle on it and reads only its own part.
///
/// `tracer` records what the traced stages (access log, routing, auth, rate limit,
/// transform, upstream) decided, when the request was sampled (`trace::sample`).
pub fn pipeline(shared: &Shared, rt: Arc<Runtime>, tracer: &Tracer) -> impl Next<Request<Incoming>> {
    let p = Proxy(rt.clone(), tracer.clone());
    let s = rt.clone();
    let p = traced_routed(
        StageKind::Transform,
        tracer,
        move |r, next| async move {
            let max_response = s.cfg.server.max_response_bytes;
            crate::transform::transform_stage(&s.cfg.transforms, max_response, r, next).await
        },
        p,
    );
    let s = rt.clone();
    let p = traced_routed(
        StageKind::RateLimit,
        tracer,
        move |r, next| async move { crate::ratelimit::rate_limit_stage(&s.limiters, r, next).await },
        p,
    );
    let s = rt.clone();
    let p = traced_routed(
        StageKind::Auth,
        tracer,
        move |r, next| async move {
            let limit = &s.cfg.auth.failure_limit;
            crate::auth::auth_stage(&s.auth, &s.auth_failures, limit, r, next).await
        },
        p,
    );
    let s = rt.clone();
    let p = traced(
        StageKind::Route,
        tracer,
        move |req, next| async move { crate::routing::routing_stage(&s.router, req, next).await },
        p,
    );
    let s = rt.clone();
    let p = stage(
        move |req, next| async move {
            crate::observe::metrics_stage(&s.cfg.observability.metrics_path, req, next).await
        },
        p,
    );
    let max_headers = rt.cfg.server.max_headers;
    let p = stage(
        move |req, next| crate::guard::hardening_stage(max_headers, req, next),
        p,
    );
    let log = shared.access_log.clone();
    let write = rt.cfg.observability.access_log;
    let p = traced(
        StageKind::Log,
        tracer,
        move |req, next| crate::observe::access_log_stage(log, write, req, next),
        p,
    );
    let p = stage(crate::observe::trace_stage, p);
    let p = stage(crate::transform::request_id_stage, p);
    stage(
        move |req, next| async move {
            crate::client_headers::client_headers_stage(&rt.cfg.transforms, req, next).await
        },
        p,
    )
}

/// The pipeline as the service hyper calls for each request on one connection.
#[derive(Clone)]
pub struct GatewayService {
    shared: Arc<Shared>,
    conn: ConnInfo,
}

/// The service for one connection.
pub fn build(shared: Arc<Shared>, conn: ConnInfo) -> GatewayService {
    GatewayService { shared, conn }
}

impl tower::Service<Request<Incoming>> for GatewayService {
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
        if self.conn.admin {
            // The admin listener never runs the gateway's stages.
            return ResponseFuture {
                fut: Box::pin(crate::admin::serve(self.shared.clone(), req)),
                in_flight: Some(in_flight),
            };
        }
        req.extensions_mut().insert(self.conn.clone());
        let rt = self.shared.runtime.load_full();
        let tracer = crate::trace::sample(rt.cfg.admin.as_ref(), rt.cfg.observability.access_log, &req);
        let pipeline = pipeline(&self.shared, rt, &tracer);
        // Boxed straight away: the pipeline future is several KiB, and every
        // further move of it (into a wrapping `async` block, say) is a memcpy.
        let fut: Pin<Box<dyn Future<Output = Response<Body>> + Send>> = match tracer {
            None => Box::pin(pipeline.run(req)),
            Some(recorder) => {
                let buffer = self.shared.traces.clone();
                let fut = Box::pin(pipeline.run(req));
                Box::pin(async move {
                    let resp = fut.await;
                    recorder.finish(&resp, &buffer);
                    resp
                })
            }
        };
        ResponseFuture {
            fut,
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
