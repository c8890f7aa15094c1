//! The gateway as a stack of tower layers, one per concern. Each concern's module
//! exposes an `async fn(req, next) -> Response` stage; `middleware` turns it into a
//! `tower::Layer`, so every stage can be tested alone against a stub `next`.
//!
//! Stages share per-request data through extensions: request extensions carry what
//! outer stages learned (connection, config snapshot, ids, route, identity), response
//! extensions carry what inner stages learned (route name, user, upstream) back out to
//! the access log.

use crate::gateway::{Runtime, Shared};
use crate::proxy::{full, Body};
use http::{header, HeaderValue, Request, Response, StatusCode};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::task::{Context, Poll};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt as _};

/// The rest of the stack below a stage.
pub type Next<B> = BoxCloneService<Request<B>, Response<Body>, Infallible>;

/// Per connection, inserted before the stack runs.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub tls: bool,
    pub serve_metrics: bool,
    /// Raised by `guard::SmuggleGuard` when a request had both CL and TE.
    pub smuggled: Arc<AtomicBool>,
}

/// The config generation a request runs under, fixed when it arrives.
#[derive(Clone)]
pub struct Snapshot(pub Arc<Runtime>);

#[derive(Clone, Debug)]
pub struct RequestId(pub String);

#[derive(Clone, Debug)]
pub struct TraceId(pub String);

/// Response extensions read by the access log.
#[derive(Clone, Debug)]
pub struct RouteName(pub String);
#[derive(Clone, Debug)]
pub struct UserId(pub String);
#[derive(Clone, Debug)]
pub struct UpstreamAddr(pub String);

pub fn json_error<B>(
    req: &Request<B>,
    status: StatusCode,
    code: &str,
    message: &str,
) -> Response<Body> {
    let id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.as_str())
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

/// Turn `async fn(Request<B>, Next<B>) -> Response<Body>` into a tower layer.
#[derive(Clone)]
pub struct FnLayer<F> {
    f: F,
}

pub fn middleware<F>(f: F) -> FnLayer<F> {
    FnLayer { f }
}

impl<S, F: Clone> Layer<S> for FnLayer<F> {
    type Service = FnService<F, S>;
    fn layer(&self, inner: S) -> Self::Service {
        FnService {
            f: self.f.clone(),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct FnService<F, S> {
    f: F,
    inner: S,
}

impl<B, F, Fut, S> Service<Request<B>> for FnService<F, S>
where
    B: Send + 'static,
    F: Fn(Request<B>, Next<B>) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Every stage and the proxy are always ready; readiness is checked in `call`.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let next = BoxCloneService::new(self.inner.clone());
        let fut = (self.f)(req, next);
        Box::pin(async move { Ok(fut.await) })
    }
}

/// Run the rest of the stack.
pub async fn run<B>(next: Next<B>, req: Request<B>) -> Response<Body> {
    match next.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

/// The assembled stack for one connection. A named type on purpose: handing hyper
/// the boxed `dyn` service directly hits a rustc higher-ranked lifetime limitation
/// when the connection future is spawned.
#[derive(Clone)]
pub struct GatewayService(Next<hyper::body::Incoming>);

impl Service<Request<hyper::body::Incoming>> for GatewayService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<hyper::body::Incoming>) -> Self::Future {
        let fut = self.0.call(req);
        Box::pin(fut)
    }
}

/// The full stack for one connection, outermost first.
pub fn build(shared: Arc<Shared>, conn: ConnInfo) -> GatewayService {
    let snap = shared.clone();
    let log = shared.clone();
    let svc = ServiceBuilder::new()
        .layer(middleware(
            move |mut req: Request<hyper::body::Incoming>, next| {
                req.extensions_mut().insert(conn.clone());
                req.extensions_mut()
                    .insert(Snapshot(snap.runtime.load_full()));
                run(next, req)
            },
        ))
        .layer(middleware(crate::transform::request_id_stage))
        .layer(middleware(crate::observe::trace_stage))
        .layer(middleware(move |req, next| {
            crate::observe::access_log_stage(log.clone(), req, next)
        }))
        .layer(middleware(crate::guard::hardening_stage))
        .layer(middleware(crate::observe::metrics_stage))
        .layer(middleware(crate::routing::routing_stage))
        .layer(middleware(crate::auth::auth_stage))
        .layer(middleware(crate::ratelimit::rate_limit_stage))
        .layer(middleware(crate::transform::transform_stage))
        .service(crate::proxy::ProxyService);
    GatewayService(BoxCloneService::new(svc))
}

#[cfg(test)]
pub mod testing {
    //! Helpers to run one stage against a stub `next`.
    use super::*;

    pub fn stub<B: Send + 'static>(
        f: impl Fn(Request<B>) -> Response<Body> + Clone + Send + 'static,
    ) -> Next<B> {
        BoxCloneService::new(tower::service_fn(move |req| {
            let f = f.clone();
            async move { Ok::<_, Infallible>(f(req)) }
        }))
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
        let conn = ConnInfo {
            peer: "127.0.0.1:5555".parse().expect("addr"),
            tls: false,
            serve_metrics: false,
            smuggled: Arc::default(),
        };
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
