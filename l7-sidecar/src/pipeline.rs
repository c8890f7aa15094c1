//! The gateway's request pipeline, composed in one place: the only module that
//! imports every stage (the shape of linkerd2-proxy's `push_*` chain). Each stage
//! is handed its own state explicitly — its slice of the config generation the
//! request runs under, its registries — so no stage reads a gateway-wide runtime,
//! and each can be tested alone with a stub `next`.
//!
//! Stages share per-request data through the request's context (`ctx::ReqCtx`,
//! boxed with the request in a `ctx::Req`): what outer stages learned (connection,
//! ids, identity, the accepted Host) as typed fields; response extensions carry
//! what inner stages learned (user, upstream; the route, for traced requests) back
//! out to the access log. The matched route is not in the context: stages below
//! routing take a `Routed` request, so "no route" cannot happen there.
//!
//! An untraced request (the usual case) runs the stages above routing — access log,
//! hardening, metrics, routing — as plain calls in one future (`Untraced`), which
//! hands the matched route to the access log itself; a traced one runs them as
//! stages, each noted by its `Traced` wrapper. Both run the same checks in the same
//! order: the stage functions are thin wrappers around those calls.
//!
//! The steps that never answer a request (client-header clean-up, request id,
//! trace context) run before the stages, as plain calls in `GatewayService::start`;
//! the request id's response header is set where the answer leaves
//! (`ResponseFuture`), so none of them needs a future of its own.

use crate::ctx::{ConnInfo, Req, ReqCtx};
use crate::gateway::{Runtime, Shared};
use crate::http_util::Body;
use crate::routing::Routed;
use crate::stage::{stage, Next, Stage};
use crate::trace::{Hop, StageKind, Traced, Tracer};
use http::{HeaderValue, Request, Response};
use hyper::body::Incoming;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

/// `Traced` for the stages above routing, with the request type fixed.
fn traced<F, Fut, N>(kind: StageKind, tracer: &Tracer, f: F, next: N) -> Traced<F, N>
where
    F: FnOnce(Req<Incoming>, Hop<N>) -> Fut,
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

/// A traced stage's place below routing for an untraced request: the stage alone.
fn plain_routed<F, Fut, N>(_: StageKind, _: &Tracer, f: F, next: N) -> Stage<F, N>
where
    F: FnOnce(Routed<Incoming>, N) -> Fut,
{
    Stage::new(f, next)
}

/// The innermost stage: forward to the upstream pool.
struct Proxy(Arc<Runtime>, Tracer);

impl Next<Routed<Incoming>> for Proxy {
    #[allow(clippy::manual_async_fn)]
    fn run(self, r: Routed<Incoming>) -> impl Future<Output = Response<Body>> + Send {
        // Boxed where it is made: the upstream exchange is the largest future of the
        // request, and the stages above that have nothing to do hand it on as is
        // (`stage::Either::Pass`), so each would otherwise copy all of it.
        //
        // Written straight into its allocation (`Box::write`) rather than built on
        // the stack and copied in whole, as `Box::pin` of the block did.
        Box::into_pin(Box::write(Box::new_uninit(), async move {
            let Proxy(rt, tracer) = self;
            let mark = tracer.as_ref().map(|t| t.enter(StageKind::Upstream));
            let mut resp = crate::proxy::proxy(&rt.upstreams, &rt.cfg.server, r).await;
            if let (Some(t), Some(mark)) = (&tracer, mark) {
                // A streamed body names its backend itself; traces read extensions.
                if let Some(a) = resp.body().upstream_addr().cloned() {
                    resp.extensions_mut().insert(crate::ctx::UpstreamAddr(a));
                }
                t.exit(mark, &resp);
            }
            resp
        }))
    }
}

/// The stages below routing in order, with `$wrap_routed` putting each traced stage
/// in front of the rest (traced or plain); written once for both pipelines.
macro_rules! compose_routed_stages {
    ($rt:expr, $tracer:expr, $wrap_routed:ident) => {{
        let rt = $rt;
        let tracer = $tracer;
        let p = Proxy(rt.clone(), tracer.clone());
        let s = rt.clone();
        let p = $wrap_routed(
            StageKind::Transform,
            tracer,
            move |r, next| async move {
                let max_response = s.cfg.server.max_response_bytes;
                crate::transform::transform_stage(&s.cfg.transforms, max_response, r, next).await
            },
            p,
        );
        let s = rt.clone();
        let p = $wrap_routed(
            StageKind::RateLimit,
            tracer,
            move |r, next| async move { crate::ratelimit::rate_limit_stage(&s.limiters, r, next).await },
            p,
        );
        let s = rt.clone();
        $wrap_routed(
            StageKind::Auth,
            tracer,
            move |r, next| async move {
                let limit = &s.cfg.auth.failure_limit;
                crate::auth::auth_stage(&s.auth, &s.auth_failures, limit, r, next).await
            },
            p,
        )
    }};
}
use compose_routed_stages as compose_routed;

/// The full pipeline for one request, outermost stage first. `rt` is the config
/// generation the request runs under, fixed when it arrives; each stage holds a
/// reference-counted handle on it and reads only its own part.
///
/// `tracer` records what the traced stages (access log, routing, auth, rate limit,
/// transform, upstream) decided, when the request was sampled (`trace::sample`).
pub fn pipeline(shared: &Shared, rt: Arc<Runtime>, tracer: &Tracer) -> impl Next<Req<Incoming>> {
    let p = compose_routed!(rt.clone(), tracer, traced_routed);
    let s = rt.clone();
    let p = traced(
        StageKind::Route,
        tracer,
        move |req, next| async move {
            // `routing::routing_stage`, with the route noted for the line of a request
            // dropped before its answer (the untraced pipeline hands it over itself).
            let key = crate::observe::RequestKey::of(req.ctx());
            match crate::routing::route(&s.router, req) {
                Err(resp) => resp,
                Ok(routed) => {
                    let route = routed.route.route.clone();
                    let witness = crate::observe::Witness::new(key).route(route.clone());
                    let mut resp = crate::stage::run(next, routed).await;
                    witness.disarm();
                    resp.extensions_mut().insert(crate::routing::MatchedRoute(route));
                    resp
                }
            }
        },
        p,
    );
    let s = rt.clone();
    let p = stage(
        move |req, next| crate::observe::metrics_stage(&s.cfg.observability.metrics_path, req, next),
        p,
    );
    let max_headers = rt.cfg.server.max_headers;
    let p = stage(
        move |req, next| crate::guard::hardening_stage(max_headers, req, next),
        p,
    );
    let log = shared.access_log.clone();
    let write = rt.cfg.observability.access_log;
    traced(
        StageKind::Log,
        tracer,
        move |req, next| crate::observe::access_log_stage(log, write, req, next),
        p,
    )
}

/// The same pipeline for a request that is not traced (the usual case): the stages
/// above routing, which have nothing to wait for, run as plain calls in one future
/// (`Untraced`); the stages below as plain stages, without the `Traced` and `Hop`
/// wrappers a sampled request's stages note their verdicts through.
pub fn untraced_pipeline(shared: &Shared, rt: Arc<Runtime>) -> impl Next<Req<Incoming>> {
    Untraced {
        log: shared.access_log.clone(),
        rt,
    }
}

/// The untraced pipeline: access log, hardening, metrics and routing as calls in
/// one `async` block rather than four nested stage futures (each a state machine
/// of its own, polled through, and moved into its parent when made), and the
/// matched route handed to the access log directly instead of through a response
/// extension (a map allocated per response). Same stages, same order as `pipeline`.
struct Untraced {
    log: Arc<crate::observe::AccessLog>,
    rt: Arc<Runtime>,
}

impl Next<Req<Incoming>> for Untraced {
    #[allow(clippy::manual_async_fn)]
    fn run(self, mut req: Req<Incoming>) -> impl Future<Output = Response<Body>> + Send {
        async move {
            let Untraced { log, rt } = self;
            let write = rt.cfg.observability.access_log;
            // Also the request's drop guard: a request dropped before its answer is
            // logged and counted when this is dropped (`LogStart`'s `Drop`).
            let mut start = crate::observe::LogStart::begin(log, write, &req);
            req.ctx_mut().log_reads_user = start.reads_user();
            let resp = match above_routing(&rt, req) {
                Err(resp) => resp,
                Ok(routed) => {
                    start.set_route(routed.route.route.clone());
                    let tracer: Tracer = None;
                    let rest = compose_routed!(rt, &tracer, plain_routed);
                    rest.run(routed).await
                }
            };
            start.finish(resp)
        }
    }
}

/// Hardening, metrics and routing, in the order of `pipeline`: the routed request,
/// or the answer of the first of them that answers.
fn above_routing(rt: &Runtime, req: Req<Incoming>) -> Result<Routed<Incoming>, Response<Body>> {
    let req = crate::guard::harden(rt.cfg.server.max_headers, req)?;
    if let Some(resp) = crate::observe::metrics_answer(&rt.cfg.observability.metrics_path, &req) {
        return Err(resp);
    }
    crate::routing::route(&rt.router, req)
}

/// The pipeline as the service hyper calls for each request on one connection.
///
/// A `hyper::service::Service` of its own rather than a tower service behind
/// `TowerToHyperService` and tower-http's `CatchPanic`: those add a state machine per
/// request and box every response body twice more (`UnsyncBoxBody` around a
/// `boxed_unsync`), so each body frame went through five boxed layers. Panics are
/// caught here instead, in `call` and in every poll of the response future.
#[derive(Clone)]
pub struct GatewayService {
    shared: Arc<Shared>,
    /// Shared with every request's context: one reference count per request.
    conn: Arc<ConnInfo>,
}

/// The service for one connection.
pub fn build(shared: Arc<Shared>, conn: ConnInfo) -> GatewayService {
    GatewayService {
        shared,
        conn: Arc::new(conn),
    }
}

/// What hyper sends back: the pipeline's body, which also keeps the request counted
/// as in flight until hyper drops it (`Body::set_in_flight`).
pub type ResponseBody = Body;

/// The answer to a request whose handling panicked: a bug in one request must not take
/// the connection (or the process) down.
pub fn panic_response() -> Response<Body> {
    crate::http_util::json_error_with_id(
        http::StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "internal error",
        "",
    )
}

type PipelineFuture = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// The steps before the stages, in order: clean the client's headers, give the
/// request its id, continue the trace. None of them answers; the request id's value
/// is returned for the response (see `ResponseFuture`).
pub fn prepare<B>(
    rt: &Runtime,
    req: &mut Req<B>,
) -> HeaderValue {
    crate::client_headers::clean_client_headers(&rt.cfg.transforms, req);
    let id = crate::transform::assign_request_id(req);
    crate::observe::start_trace(rt.cfg.observability.trace_context, req);
    id
}

impl GatewayService {
    /// The request's pipeline future and the X-Request-Id its response gets.
    fn start(&self, req: Request<Incoming>) -> (PipelineFuture, Option<HeaderValue>) {
        let index = self.conn.requests.fetch_add(1, Ordering::Relaxed);
        if self.conn.admin {
            // The admin listener never runs the gateway's stages.
            return (Box::pin(crate::admin::serve(self.shared.clone(), req)), None);
        }
        let rt = self.shared.runtime.load_full();
        let tracer = crate::trace::sample(
            rt.cfg.admin.as_ref(),
            rt.cfg.observability.access_log,
            &req,
            Some(self.conn.peer),
        );
        let mut req = Req::new(req, ReqCtx::new(self.conn.clone(), index));
        let id = prepare(&rt, &mut req);
        // Boxed straight away: the pipeline future is several KiB, and every
        // further move of it (into a wrapping `async` block, say) is a memcpy.
        let fut: PipelineFuture = match tracer {
            // Written straight into the box (`Box::write`), not built on the stack
            // and copied in.
            None => {
                let fut = Box::write(
                    Box::new_uninit(),
                    untraced_pipeline(&self.shared, rt).run(req),
                );
                Box::into_pin(fut)
            }
            Some(recorder) => {
                let buffer = self.shared.traces.clone();
                let fut = Box::pin(pipeline(&self.shared, rt, &Some(recorder.clone())).run(req));
                Box::pin(async move {
                    let resp = fut.await;
                    recorder.finish(&resp, &buffer);
                    resp
                })
            }
        };
        (fut, Some(id))
    }
}

/// Why a request got no answer: the gateway drains, and the request (an HTTP/2
/// stream) started after the drain began. hyper resets the stream with the reason
/// it finds in an error's sources, so the client reads REFUSED_STREAM: not
/// processed, safe to retry on another connection (RFC 9113 §8.7).
#[derive(Debug, thiserror::Error)]
#[error("request refused: the gateway is draining")]
pub struct Draining(#[source] h2::Error);

impl Draining {
    fn new() -> Draining {
        Draining(h2::Error::from(h2::Reason::REFUSED_STREAM))
    }
}

/// How long a client refused during a drain is told to wait (`Retry-After`, s): by
/// then another instance, or this one restarted, takes its connection.
const DRAIN_RETRY_AFTER: HeaderValue = HeaderValue::from_static("1");

impl GatewayService {
    /// A request started after the drain began: never proxied, and not counted as in
    /// flight (so it does not hold the drain). Logged and counted as the gateway's
    /// answer (503, reason `draining`). HTTP/2: the stream is reset with
    /// REFUSED_STREAM (`Draining`); HTTP/1: a 503 with `Retry-After` and
    /// `Connection: close` (hyper closes after it anyway).
    #[cold]
    #[inline(never)]
    fn refuse_draining(&self, req: &Request<Incoming>) -> ResponseFuture {
        let h2 = req.version() == http::Version::HTTP_2;
        let (answer, bytes) = if h2 {
            (None, 0)
        } else {
            let mut resp = crate::http_util::json_error_with_id(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "the gateway is shutting down; retry on a new connection",
                "",
            );
            let h = resp.headers_mut();
            h.insert(http::header::RETRY_AFTER, DRAIN_RETRY_AFTER);
            h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            let bytes = hyper::body::Body::size_hint(resp.body()).exact().unwrap_or(0);
            (Some(resp), bytes)
        };
        let write = self.shared.runtime.load().cfg.observability.access_log;
        crate::observe::record_draining(&self.shared.access_log, write, &self.conn, req, bytes);
        ResponseFuture {
            fut: answer.map(Err),
            refuse: h2,
            in_flight: None,
            request_id: None,
        }
    }
}

impl hyper::service::Service<Request<Incoming>> for GatewayService {
    type Response = Response<ResponseBody>;
    type Error = Draining;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        if self.conn.activity.draining() {
            return self.refuse_draining(&req);
        }
        // In flight until hyper drops the response body: the idle watchdog must not
        // close a connection whose response is still being produced.
        let in_flight = self.conn.activity.start_request();
        let (fut, request_id) =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.start(req))) {
                Ok((fut, id)) => (Ok(fut), id),
                Err(_) => (Err(panic_response()), None),
            };
        ResponseFuture {
            fut: Some(fut),
            refuse: false,
            in_flight: Some(in_flight),
            request_id,
        }
    }
}

/// The boxed pipeline future (or an answer ready now: a panic's 500, a drain's 503),
/// as the `Result` hyper expects. Its response body carries the request's `InFlight`
/// guard.
pub struct ResponseFuture {
    fut: Option<Result<PipelineFuture, Response<Body>>>,
    /// No answer: the HTTP/2 stream is reset (`Draining`); `fut` is `None`.
    refuse: bool,
    in_flight: Option<crate::idle::InFlight>,
    /// Every response carries the request's id (also the answers of stages that
    /// refused it): set here, on the way out, rather than by a stage of its own.
    request_id: Option<HeaderValue>,
}

impl Future for ResponseFuture {
    type Output = Result<Response<ResponseBody>, Draining>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let resp = match this.fut.as_mut() {
            Some(Ok(fut)) => {
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(resp)) => resp,
                    // The future panicked: it must not be polled again.
                    Err(_) => panic_response(),
                }
            }
            Some(Err(_)) => match this.fut.take() {
                Some(Err(resp)) => resp,
                _ => panic_response(),
            },
            None if this.refuse => {
                this.refuse = false;
                return Poll::Ready(Err(Draining::new()));
            }
            None => panic_response(),
        };
        this.fut = None;
        let mut resp = resp;
        if let Some(id) = this.request_id.take() {
            resp.headers_mut().insert(crate::transform::REQUEST_ID, id);
        }
        resp.body_mut().set_in_flight(this.in_flight.take());
        Poll::Ready(Ok(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    fn conn() -> ConnInfo {
        ConnInfo::new("127.0.0.1:1".parse().expect("addr"), false, false)
    }

    /// A panic inside a stage answers 500 and ends the request's in-flight count, as
    /// tower-http's `CatchPanic` did before the service was hyper's own.
    #[tokio::test]
    async fn a_panicking_pipeline_answers_500_and_leaves_the_connection_idle() {
        let c = conn();
        fn boom() -> Response<Body> {
            panic!("a bug in a stage")
        }
        let fut: PipelineFuture = Box::pin(async { boom() });
        let rf = ResponseFuture {
            fut: Some(Ok(fut)),
            refuse: false,
            in_flight: Some(c.activity.start_request()),
            request_id: Some(HeaderValue::from_static("id-1")),
        };
        let resp = rf.await.expect("an answer");
        assert_eq!(resp.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(resp.headers()["x-request-id"], "id-1", "set on the way out");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(
            String::from_utf8_lossy(&body).contains("\"internal\""),
            "{body:?}"
        );
        // The body (and its guard) is gone: nothing is in flight any more.
        assert_eq!(c.activity.in_flight(), 0);
    }

    /// A pipeline that panics after an await (its access-log guard stored in the
    /// future) is logged once, with the 500 it answers, not as a dropped request.
    #[tokio::test]
    async fn a_panicking_pipeline_is_logged_once_as_500() {
        let c = Arc::new(conn());
        let log = Arc::new(crate::observe::AccessLog::new());
        let mut rx = log.subscribe();
        let req = Req::new(Request::get("/p").body(()).expect("req"), ReqCtx::new(c.clone(), 0));
        fn boom() -> Response<Body> {
            panic!("a bug in a stage")
        }
        let fut: PipelineFuture = Box::pin(async move {
            let start = crate::observe::LogStart::begin(log, false, &req);
            tokio::task::yield_now().await;
            start.finish(boom())
        });
        let rf = ResponseFuture {
            fut: Some(Ok(fut)),
            refuse: false,
            in_flight: Some(c.activity.start_request()),
            request_id: None,
        };
        let resp = rf.await.expect("an answer");
        assert_eq!(resp.status(), http::StatusCode::INTERNAL_SERVER_ERROR);
        drop(resp);
        let r = rx.try_recv().expect("a record");
        assert_eq!(r.status, 500, "{r:?}");
        assert!(rx.try_recv().is_err(), "exactly one");
    }
}
