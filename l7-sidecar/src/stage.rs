//! The shape of a stage: an `async fn(req, next) -> Response`, where `next` is the
//! rest of the pipeline, so every stage can be tested alone against a stub `next`.
//!
//! Stages are composed statically (`Stage<F, N>` below): a request runs through one
//! future, boxed once per request, instead of a boxed, cloned tower service and a
//! boxed future per stage. With a dozen stages that per-stage boxing, cloning and
//! dynamic dispatch cost more than the proxying itself.

use crate::ctx::Req;
use crate::http_util::Body;
use http::Response;
use hyper::body::Incoming;
use std::future::Future;

/// The rest of the pipeline below a stage, taking requests of type `R`: a
/// `ctx::Req<B>` (the boxed request and its context) above routing, a `routing::Routed<B>` (request plus its matched
/// route) below it. Running it consumes it: a stage calls it at most once.
pub trait Next<R>: Send + 'static {
    fn run(self, req: R) -> impl Future<Output = Response<Body>> + Send;
}

/// Run the rest of the pipeline, in a box of its own.
///
/// Boxed because an `async` stage holds the future of the rest of the pipeline inline,
/// and that future is first built and then moved into its parent's state: each stage
/// copied everything below it, about 80 KiB of memcpy per request with a dozen
/// stages (measured with a uprobe on memcpy; the largest user-space cost in `perf`).
/// A box per stage costs an allocation from a thread-local heap instead.
pub fn run<R, N: Next<R>>(next: N, req: R) -> impl Future<Output = Response<Body>> + Send {
    Box::pin(next.run(req))
}

pin_project_lite::pin_project! {
    /// What a stage that only looks at the request returns: its own answer, or the
    /// rest of the pipeline's future itself. Such a stage adds no future (and no box,
    /// no copy of the request into one) of its own to the request's.
    #[project = AnswerProj]
    pub enum Answer<F> {
        Now { resp: Option<Response<Body>> },
        Next { #[pin] fut: F },
    }
}

impl<F> Answer<F> {
    pub fn now(resp: Response<Body>) -> Answer<F> {
        Answer::Now { resp: Some(resp) }
    }

    pub fn next(fut: F) -> Answer<F> {
        Answer::Next { fut }
    }
}

impl<F: Future<Output = Response<Body>>> Future for Answer<F> {
    type Output = Response<Body>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Response<Body>> {
        match self.project() {
            // Polled again after its answer (a caller's bug): a 500 rather than a panic.
            AnswerProj::Now { resp } => std::task::Poll::Ready(
                resp.take()
                    .unwrap_or_else(|| crate::http_util::json_error_with_id(
                        http::StatusCode::INTERNAL_SERVER_ERROR,
                        "internal",
                        "internal error",
                        "",
                    )),
            ),
            AnswerProj::Next { fut } => fut.poll(cx),
        }
    }
}

pin_project_lite::pin_project! {
    /// What a stage that often has nothing to do returns: the rest of the pipeline's
    /// future itself (`Pass`, no future, box or copy of the request of its own) or
    /// its own work (`Work`).
    #[project = EitherProj]
    pub enum Either<P, W> {
        Pass { #[pin] fut: P },
        Work { #[pin] fut: W },
    }
}

impl<P, W> Either<P, W> {
    pub fn pass(fut: P) -> Either<P, W> {
        Either::Pass { fut }
    }

    pub fn work(fut: W) -> Either<P, W> {
        Either::Work { fut }
    }
}

impl<P, W> Future for Either<P, W>
where
    P: Future<Output = Response<Body>>,
    W: Future<Output = Response<Body>>,
{
    type Output = Response<Body>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Response<Body>> {
        match self.project() {
            EitherProj::Pass { fut } => fut.poll(cx),
            EitherProj::Work { fut } => fut.poll(cx),
        }
    }
}

/// A note a stage leaves on the answer of the rest of the pipeline (the user for the
/// access log, the rate-limit budget headers).
pub trait Annotation {
    fn apply(self, resp: &mut Response<Body>);
}

pin_project_lite::pin_project! {
    /// The rest of the pipeline's future, its answer marked with `note` (if any).
    /// For stages that let the request through and only add to its answer: no future
    /// of their own, and only the note in every request's future.
    pub struct Annotated<F, A> {
        #[pin]
        fut: F,
        note: Option<A>,
    }
}

impl<F, A> Annotated<F, A> {
    pub fn new(fut: F, note: Option<A>) -> Annotated<F, A> {
        Annotated { fut, note }
    }
}

impl<F: Future<Output = Response<Body>>, A: Annotation> Future for Annotated<F, A> {
    type Output = Response<Body>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Response<Body>> {
        let this = self.project();
        let mut resp = std::task::ready!(this.fut.poll(cx));
        if let Some(note) = this.note.take() {
            note.apply(&mut resp);
        }
        std::task::Poll::Ready(resp)
    }
}

/// One stage in front of the rest of the pipeline.
#[derive(Clone)]
pub struct Stage<F, N> {
    f: F,
    next: N,
}

impl<F, N> Stage<F, N> {
    /// Put `f` in front of `next`. Callers usually go through a helper that fixes the
    /// request type (`stage` below), so closures' argument types are inferred.
    pub fn new(f: F, next: N) -> Stage<F, N> {
        Stage { f, next }
    }
}

impl<R, F, Fut, N> Next<R> for Stage<F, N>
where
    F: FnOnce(R, N) -> Fut + Send + 'static,
    Fut: Future<Output = Response<Body>> + Send,
    N: Send + 'static,
{
    fn run(self, req: R) -> impl Future<Output = Response<Body>> + Send {
        (self.f)(req, self.next)
    }
}

/// Put `f` in front of `next`; the request type is fixed to hyper's so the stage
/// functions' generic parameters are inferred.
pub fn stage<F, Fut, N>(f: F, next: N) -> Stage<F, N>
where
    F: FnOnce(Req<Incoming>, N) -> Fut,
{
    Stage { f, next }
}

#[cfg(test)]
pub mod testing {
    //! Helpers to run one stage against a stub `next`.
    use super::*;
    use crate::http_util::full;

    #[derive(Clone)]
    pub struct Stub<F>(F);

    impl<R, F> Next<R> for Stub<F>
    where
        R: Send + 'static,
        F: FnOnce(R) -> Response<Body> + Send + 'static,
    {
        #[allow(clippy::manual_async_fn)]
        fn run(self, req: R) -> impl Future<Output = Response<Body>> + Send {
            async move { (self.0)(req) }
        }
    }

    pub fn stub<R: Send + 'static>(
        f: impl Fn(R) -> Response<Body> + Clone + Send + 'static,
    ) -> Stub<impl Fn(R) -> Response<Body> + Clone + Send + 'static> {
        Stub(f)
    }

    pub fn ok<R>(_: R) -> Response<Body> {
        Response::new(full("ok"))
    }
}
