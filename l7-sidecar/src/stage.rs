//! The shape of a stage: an `async fn(req, next) -> Response`, where `next` is the
//! rest of the pipeline, so every stage can be tested alone against a stub `next`.
//!
//! Stages are composed statically (`Stage<F, N>` below): a request runs through one
//! future, boxed once per request, instead of a boxed, cloned tower service and a
//! boxed future per stage. With a dozen stages that per-stage boxing, cloning and
//! dynamic dispatch cost more than the proxying itself.

use crate::http_util::Body;
use http::{Request, Response};
use hyper::body::Incoming;
use std::future::Future;

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
pub fn stage<F, Fut, N>(f: F, next: N) -> Stage<F, N>
where
    F: FnOnce(Request<Incoming>, N) -> Fut,
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
}
