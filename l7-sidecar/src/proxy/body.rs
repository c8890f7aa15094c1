//! The upstream response body as it streams to the client.

use super::BoxError;
use crate::balance::ActiveGuard;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

/// Keeps the backend counted as busy until its body is fully sent (least-connections
/// sees real load) and cuts the stream at the request deadline, so a backend that
/// trickles its body cannot hold a client past the pool's `request_timeout_ms`.
pub struct StreamedBody {
    inner: Incoming,
    _guard: ActiveGuard,
    deadline: Instant,
    /// Made only once the body has to be waited for: most bodies arrive with their
    /// head, and a timer per request would cost an allocation and a timer entry.
    timer: Option<Pin<Box<Sleep>>>,
}

#[derive(Debug, thiserror::Error)]
#[error("upstream body not finished before the request deadline")]
pub struct BodyTimeout;

impl StreamedBody {
    pub fn new(inner: Incoming, guard: ActiveGuard, deadline: Instant) -> StreamedBody {
        StreamedBody {
            inner,
            _guard: guard,
            deadline,
            timer: None,
        }
    }
}

impl HttpBody for StreamedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(f) => Poll::Ready(f.map(|r| r.map_err(Into::into))),
            Poll::Pending => {
                let deadline = self.deadline;
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(BodyTimeout.into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading body: {0}")]
    Read(String),
}

/// Buffer a body up to `max` bytes.
///
/// Hand-rolled rather than `http_body_util::Limited`: `Limited` over a body whose
/// error is already `BoxError` needs `BoxError: From<BoxError>` for every lifetime
/// inside async fns, which rustc cannot prove.
pub async fn collect_limited(mut body: super::Body, max: usize) -> Result<Bytes, CollectError> {
    use http_body_util::BodyExt as _;
    let mut buf = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CollectError::Read(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > max {
                return Err(CollectError::TooLarge(max));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(buf))
}
