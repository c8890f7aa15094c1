//! Buffering bodies: the client's request body (for retries) and upstream answers
//! that are rewritten or merged. The streamed upstream body is `crate::body`'s.

use bytes::Bytes;
use hyper::body::Body as HttpBody;
use tokio::time::Instant;

pub use crate::body::StreamedBody;

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

/// How a request body must arrive.
#[derive(Debug, Clone, Copy)]
pub struct RequestBodyLimits {
    pub max_bytes: usize,
    /// Longest gap between body bytes; also the grace period before `min_rate` applies.
    pub idle: std::time::Duration,
    /// Average bytes per second required after `idle` (0 = off).
    pub min_rate: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RequestBodyError {
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("request body sent no byte for {0:?}")]
    Stalled(std::time::Duration),
    #[error("request body slower than {0} bytes/s")]
    TooSlow(u64),
    #[error("reading request body: {0}")]
    Read(String),
    /// The client went away mid-body (closed or reset its connection, reset its
    /// HTTP/2 stream): not a malformed body, a client gone (logged 499).
    #[error("the client went away mid-body: {0}")]
    ClientGone(String),
}

/// Whether a body read failed because the client left rather than because what it
/// sent was malformed: an early end of the stream, a reset connection, or an HTTP/2
/// reset or lost connection, anywhere in the error's sources.
fn client_gone(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset, UnexpectedEof};
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe) {
                return true;
            }
        }
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            if (h2.is_reset() && h2.is_remote()) || h2.is_io() || h2.is_go_away() {
                return true;
            }
        }
        if err.downcast_ref::<hyper::Error>().is_some_and(|h| h.is_incomplete_message()) {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Buffer a client's request body within `limits`. Without this a client that sends
/// headers and then stalls (or trickles) its body holds a connection slot forever:
/// hyper's header timeout ends with the headers, and the idle watchdog does not cut
/// a request in flight. A declared length over the limit is refused before reading.
pub async fn collect_request<B>(
    mut body: B,
    limits: RequestBodyLimits,
) -> Result<Bytes, RequestBodyError>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: std::error::Error + 'static,
{
    use http_body_util::BodyExt as _;
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let max = limits.max_bytes;
    if body.size_hint().lower() > max as u64 {
        return Err(RequestBodyError::TooLarge(max));
    }
    let start = Instant::now();
    let mut last = start;
    let mut buf = Vec::new();
    loop {
        let idle_deadline = last + limits.idle;
        // The body may fall behind `min_rate` only during the first `idle`.
        let rate_deadline = (limits.min_rate > 0).then(|| {
            start
                + limits.idle
                + std::time::Duration::from_secs_f64(buf.len() as f64 / limits.min_rate as f64)
        });
        let deadline = rate_deadline.map_or(idle_deadline, |r| r.min(idle_deadline));
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) if deadline < idle_deadline => {
                return Err(RequestBodyError::TooSlow(limits.min_rate))
            }
            Err(_) => return Err(RequestBodyError::Stalled(limits.idle)),
            Ok(None) => return Ok(Bytes::from(buf)),
            Ok(Some(Err(e))) if client_gone(&e) => {
                return Err(RequestBodyError::ClientGone(e.to_string()))
            }
            Ok(Some(Err(e))) => return Err(RequestBodyError::Read(e.to_string())),
            Ok(Some(Ok(frame))) => {
                last = Instant::now();
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > max {
                        return Err(RequestBodyError::TooLarge(max));
                    }
                    buf.extend_from_slice(&data);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use std::time::Duration;

    type Frames = futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, std::io::Error>>;

    fn limits(min_rate: u64) -> RequestBodyLimits {
        RequestBodyLimits {
            max_bytes: 10,
            idle: Duration::from_millis(200),
            min_rate,
        }
    }

    fn trickle(every: Duration, n: usize) -> StreamBody<Frames> {
        use futures_util::StreamExt as _;
        let s = futures_util::stream::iter(0..n)
            .then(move |_| async move {
                tokio::time::sleep(every).await;
                Ok(Frame::data(Bytes::from_static(b"a")))
            })
            .boxed();
        StreamBody::new(s)
    }

    #[tokio::test]
    async fn request_body_limits() {
        let ok = collect_request(trickle(Duration::from_millis(50), 3), limits(0)).await;
        assert_eq!(ok.expect("body").as_ref(), b"aaa");
        let stalled = collect_request(trickle(Duration::from_millis(300), 3), limits(0)).await;
        assert!(
            matches!(stalled, Err(RequestBodyError::Stalled(_))),
            "{stalled:?}"
        );
        // Never a 200 ms gap, but 1 byte per 150 ms is below 100 bytes/s.
        let slow = collect_request(trickle(Duration::from_millis(150), 9), limits(100)).await;
        assert!(
            matches!(slow, Err(RequestBodyError::TooSlow(100))),
            "{slow:?}"
        );
        let big = collect_request(trickle(Duration::from_millis(1), 11), limits(0)).await;
        assert!(
            matches!(big, Err(RequestBodyError::TooLarge(10))),
            "{big:?}"
        );
    }
}
