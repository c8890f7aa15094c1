//! The one response body type every stage returns, and the upstream body it usually
//! carries.
//!
//! A proxied response used to travel as boxes around wrappers around boxes (the
//! in-flight guard around a boxed access-log counter around a boxed upstream body):
//! every frame went through four dynamic calls and every request paid for the
//! allocations and the drops of each layer. `Body` is one concrete type instead: the
//! upstream stream, a buffered answer, or (for the rare transforms) a boxed body,
//! plus the request's in-flight guard and its access-log accounting as fields. A leaf
//! below the stages: it knows the upstream connection (`conns`), the backend's busy
//! count (`balance`) and the client connection's in-flight count (`idle`), no stage.

use crate::balance::ActiveGuard;
use crate::conns::{no_wake, Conn};
use crate::idle::InFlight;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Told once how many body bytes were sent, when the body ends or is dropped (the
/// access log: true size and duration of streamed responses).
pub trait BodyEnd: Send + Sync {
    fn ended(self: Box<Self>, bytes: u64);
}

// The whole `Inner` is boxed once per response (`Body`); boxing the streamed body
// again would be a second allocation per proxied request.
#[allow(clippy::large_enum_variant)]
enum Kind {
    /// A buffered answer in one frame (None: no frame left, or none at all).
    Full(Option<Bytes>),
    /// Streamed from a backend.
    Upstream(StreamedBody),
    /// Anything else (response transforms, tests).
    Boxed(BoxBody<Bytes, BoxError>),
}

/// Boxed, so that `Response<Body>` stays small: a response moves through every
/// stage on its way out, and past 128 bytes each move was a `memcpy` call (seen
/// as ten more per request in callgrind when the body was inline).
pub struct Body(Box<Inner>);

struct Inner {
    kind: Kind,
    /// Bytes sent so far; counted only while `end` waits for them.
    bytes: u64,
    end: Option<Box<dyn BodyEnd>>,
    /// The backend that answered (as text), for the access log: carried here
    /// rather than as a response extension, whose map costs an allocation and a
    /// hashed insert per response.
    upstream: Option<Arc<str>>,
    /// Keeps the request counted as in flight on its client connection until the
    /// body is sent or dropped (the idle watchdog must not cut it).
    _in_flight: Option<InFlight>,
}

impl Body {
    fn of(kind: Kind) -> Body {
        Body(Box::new(Inner {
            kind,
            bytes: 0,
            end: None,
            upstream: None,
            _in_flight: None,
        }))
    }

    pub fn empty() -> Body {
        Body::of(Kind::Full(None))
    }

    /// `b` in one frame (no frame if it is empty, as `http_body_util::Full`).
    pub fn full(b: impl Into<Bytes>) -> Body {
        let b = b.into();
        Body::of(Kind::Full((!b.is_empty()).then_some(b)))
    }

    /// Streamed from `backend` (its address as text).
    pub fn upstream(b: StreamedBody, backend: Arc<str>) -> Body {
        let mut body = Body::of(Kind::Upstream(b));
        body.0.upstream = Some(backend);
        body
    }

    /// Streamed from `backend` (its address as text) over the keep-alive connection
    /// `conn`, which goes back to the idle list once the body has been read to its
    /// end. The same as `Body::upstream(StreamedBody::new(..).with_conn(conn), ..)`,
    /// built in place: those moves were a `memcpy` each, per request.
    pub fn upstream_pooled(
        inner: Incoming,
        guard: ActiveGuard,
        deadline: Instant,
        conn: Conn,
        backend: Arc<str>,
    ) -> Body {
        Body(Box::new(Inner {
            kind: Kind::Upstream(StreamedBody {
                inner,
                _guard: guard,
                deadline,
                timer: None,
                conn: Some(conn),
                ended: false,
                watched: None,
                polled: false,
                first: None,
                last: None,
                ahead: 0,
                failed: None,
                request_id: None,
                client_h1: false,
                trailer_names: None,
            }),
            bytes: 0,
            end: None,
            upstream: Some(backend),
            _in_flight: None,
        }))
    }

    /// The backend a streamed body comes from.
    pub fn upstream_addr(&self) -> Option<&Arc<str>> {
        self.0.upstream.as_ref()
    }

    /// Name `backend` as where this body came from: a stage that rewrites an
    /// upstream body keeps the backend named for the access log.
    #[must_use]
    pub fn with_upstream(mut self, backend: Option<Arc<str>>) -> Body {
        self.0.upstream = backend;
        self
    }

    pub fn boxed<B>(b: B) -> Body
    where
        B: HttpBody<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        use http_body_util::BodyExt as _;
        Body::of(Kind::Boxed(b.map_err(Into::into).boxed()))
    }

    /// Call `end` with the bytes sent once the body ends or is dropped. A body has one
    /// such listener (the access log's); a second one replaces it, after the first
    /// has been told what was sent so far.
    pub fn on_end(&mut self, end: Box<dyn BodyEnd>) {
        self.0.finish();
        self.0.bytes = 0;
        self.0.end = Some(end);
    }

    /// Read what the upstream body already has, before the response head is handed
    /// to hyper (see `StreamedBody::prefetch`). An error here means nothing of the
    /// answer went out yet: the caller answers 502 instead. True if it read anything.
    pub fn prefetch(&mut self, cx: &mut Context<'_>) -> Result<bool, BoxError> {
        match &mut self.0.kind {
            Kind::Upstream(s) => s.prefetch(cx),
            Kind::Full(_) | Kind::Boxed(_) => Ok(false),
        }
    }

    /// Name the request (for the warning should the upstream body fail once the head
    /// went out) and say whether its client speaks HTTP/1, whose connection is then
    /// reset rather than closed (an HTTP/1.0 client could not tell a cut body from a
    /// whole one).
    pub fn set_request(&mut self, request_id: Arc<str>, client_h1: bool) {
        if let Kind::Upstream(s) = &mut self.0.kind {
            s.request_id = Some(request_id);
            s.client_h1 = client_h1;
        }
    }

    /// Keep `names` out of the upstream's trailers as well (a route's transform
    /// removed them from the head, or set them there): an upstream must not get
    /// round a removal by sending the field last. Trailers already read ahead are
    /// filtered now.
    pub fn keep_out_of_trailers(&mut self, names: Box<[http::HeaderName]>) {
        if let Kind::Upstream(s) = &mut self.0.kind {
            if let Some(t) = s.last.as_mut().and_then(Frame::trailers_mut) {
                trailers::strip(t, &names);
            }
            s.trailer_names = Some(names);
        }
    }

    /// Count the request as in flight until this body is gone.
    pub fn set_in_flight(&mut self, guard: Option<InFlight>) {
        self.0._in_flight = guard;
    }
}

impl Inner {
    fn finish(&mut self) {
        if let Some(end) = self.end.take() {
            end.ended(self.bytes);
        }
    }

    fn inner_is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.is_none(),
            Kind::Upstream(s) => s.is_end_stream(),
            Kind::Boxed(b) => b.is_end_stream(),
        }
    }
}

impl Default for Body {
    fn default() -> Body {
        Body::empty()
    }
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.0.kind {
            Kind::Full(_) => "full",
            Kind::Upstream(_) => "upstream",
            Kind::Boxed(_) => "boxed",
        };
        f.debug_struct("Body").field("kind", &kind).finish_non_exhaustive()
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        if let Kind::Upstream(s) = &self.0.kind {
            if let Some(upstream_slow) = s.watched.as_ref().and_then(deadline::Registered::cut_at_deadline) {
                cut_at_deadline(s, self.0.upstream.as_deref(), upstream_slow);
            }
        }
        // The client went away (or hyper stopped early): log what was sent.
        self.0.finish();
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self.get_mut().0;
        let polled = match &mut this.kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
            Kind::Upstream(s) => {
                let p = Pin::new(&mut *s).poll_frame(cx);
                if let Poll::Ready(Some(Err(e))) = &p {
                    upstream_body_failed(s, this.upstream.as_deref(), this.bytes, e, this._in_flight.as_ref());
                }
                p
            }
            Kind::Boxed(b) => Pin::new(b).poll_frame(cx),
        };
        if this.end.is_some() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(d) = frame.data_ref() {
                        this.bytes += d.len() as u64;
                    }
                    // hyper stops polling once `is_end_stream` says so.
                    if this.inner_is_end_stream() {
                        this.finish();
                    }
                }
                Poll::Ready(_) => this.finish(),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.0.inner_is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream(s) => s.size_hint(),
            Kind::Boxed(b) => b.size_hint(),
        }
    }
}

/// The upstream body failed after the response head was handed to hyper: the
/// client's answer is cut (hyper ends an HTTP/1 connection without the last chunk,
/// and resets an HTTP/2 stream). Said once, naming the request and the backend; an
/// HTTP/1 client's connection is reset when it closes (`InFlight::abort_connection`).
#[cold]
#[inline(never)]
fn upstream_body_failed(
    s: &StreamedBody,
    backend: Option<&str>,
    sent: u64,
    e: &BoxError,
    in_flight: Option<&InFlight>,
) {
    tracing::warn!(
        request_id = s.request_id.as_deref().unwrap_or(""),
        upstream = backend.unwrap_or(""),
        bytes_sent = sent,
        error = %e,
        "upstream response body failed after the head went out; response cut"
    );
    if s.client_h1 {
        if let Some(f) = in_flight {
            f.abort_connection();
        }
    }
}

/// The request deadline passed while the body was sent, and the task sending it drops
/// it now (`deadline`): said once, naming the request and the backend like every
/// other per-request line, and blaming the side that was slow.
#[cold]
#[inline(never)]
fn cut_at_deadline(s: &StreamedBody, backend: Option<&str>, upstream_slow: bool) {
    let message = match (upstream_slow, s.client_h1) {
        (true, true) => "upstream did not send the response body before the request deadline; closing the connection",
        (true, false) => "upstream did not send the response body before the request deadline; resetting the HTTP/2 stream",
        (false, true) => "response not taken by the client before the request deadline; closing the connection",
        (false, false) => "response not taken by the HTTP/2 client before the request deadline; resetting the stream",
    };
    tracing::warn!(
        request_id = s.request_id.as_deref().unwrap_or(""),
        upstream = backend.unwrap_or(""),
        "{message}"
    );
}

/// Keeps the backend counted as busy until its body is fully sent (least-connections
/// sees real load) and cuts the stream at the request deadline, so a backend that
/// trickles its body cannot hold a client past the pool's `request_timeout_ms`.
pub struct StreamedBody {
    inner: Incoming,
    _guard: ActiveGuard,
    deadline: Instant,
    /// Without a pooled connection only (WebSocket refusals): made once the body has
    /// to be waited for. A pooled connection brings its own timer.
    timer: Option<Pin<Box<Sleep>>>,
    /// The keep-alive connection the body arrives on: polled with the body (it has
    /// no task of its own), released for reuse on drop once the body has ended (a
    /// body cut short leaves the connection unusable).
    conn: Option<Conn>,
    ended: bool,
    /// The deadline as published to the task sending the body to the client, which
    /// ends the body there should the client not take it in time (`deadline`).
    /// Set at the first poll.
    watched: Option<deadline::Registered>,
    polled: bool,
    /// What `prefetch` read, handed out before anything more is read: the data
    /// (several chunks joined into one frame), then trailers, if they came too.
    first: Option<Bytes>,
    last: Option<Frame<Bytes>>,
    /// Bytes in `first` (for `size_hint`).
    ahead: u64,
    /// The upstream body failed: handed to hyper at the next poll, after one yield
    /// (see `poll_frame`).
    failed: Option<BoxError>,
    /// The request, named should the body fail (`Body::set_request`).
    request_id: Option<Arc<str>>,
    client_h1: bool,
    /// Names the route's transform removes from or sets on the head, kept out of
    /// the trailers too (`Body::keep_out_of_trailers`); None on most routes.
    trailer_names: Option<Box<[http::HeaderName]>>,
}

/// `prefetch` reads ahead at most this much: what hyper would have buffered before
/// its first flush anyway, not the whole of a large body.
const PREFETCH_MAX_BYTES: u64 = 64 * 1024;

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
            conn: None,
            ended: false,
            watched: None,
            polled: false,
            first: None,
            last: None,
            ahead: 0,
            failed: None,
            request_id: None,
            client_h1: false,
            trailer_names: None,
        }
    }

    /// Read the frames the upstream has already sent, without waiting (the usual
    /// small body came with the head). hyper writes a response head only together
    /// with the body frames that follow it, and drops both when the body then fails:
    /// a body invalid from its start (bad chunk size, bad trailers) gave the client
    /// no byte at all, logged as a 200. Read here, the failure is known while the
    /// gateway can still answer 502.
    /// True if it read anything (a frame or the end).
    pub fn prefetch(&mut self, cx: &mut Context<'_>) -> Result<bool, BoxError> {
        let mut read = false;
        while !self.ended && !self.inner.is_end_stream() && self.ahead < PREFETCH_MAX_BYTES {
            let polled = self.poll_inner(cx);
            read |= polled.is_ready();
            match polled {
                Poll::Pending => break,
                Poll::Ready(None) => self.ended = true,
                Poll::Ready(Some(Err(e))) => return Err(e.into()),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        self.ahead += data.len() as u64;
                        self.first = Some(match self.first.take() {
                            None => data,
                            // Several chunks already there (rare): one frame, copied
                            // once, up to `PREFETCH_MAX_BYTES`.
                            Some(before) => {
                                let mut joined = bytes::BytesMut::with_capacity(before.len() + data.len());
                                joined.extend_from_slice(&before);
                                joined.extend_from_slice(&data);
                                joined.freeze()
                            }
                        });
                    }
                    Err(mut other) => {
                        filter_trailers(&mut other, self.trailer_names.as_deref());
                        // Trailers end the body: nothing is read after them.
                        self.last = Some(other);
                        break;
                    }
                },
            }
        }
        Ok(read)
    }

    /// The next frame of `inner`, moving the connection along when it has none yet.
    #[inline]
    fn poll_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        // Nobody else polls the connection: when `inner` has nothing yet, let the
        // connection read the body's next bytes into it (a small body usually came
        // with the head and is there already). `inner` is fed only by the
        // connection, so while the connection runs, asking `inner` registers no
        // wake-up (one would poll the client connection's whole task again); the
        // connection's own registrations wake us. An ended connection ends `inner`
        // too (with an error if the body was cut short).
        match self.conn.as_mut() {
            Some(c) => match Pin::new(&mut self.inner).poll_frame(&mut no_wake()) {
                Poll::Pending if c.poll_drive(cx) => {
                    Pin::new(&mut self.inner).poll_frame(&mut no_wake())
                }
                // Ended: whatever `inner` still says, it says now.
                Poll::Pending => Pin::new(&mut self.inner).poll_frame(cx),
                ready => ready,
            },
            None => Pin::new(&mut self.inner).poll_frame(cx),
        }
    }

    /// The next frame read ahead by `prefetch`, if any.
    #[inline]
    fn take_prefetched(&mut self) -> Option<Frame<Bytes>> {
        match self.first.take() {
            Some(d) => {
                self.ahead = 0;
                Some(Frame::data(d))
            }
            None => self.last.take(),
        }
    }

    /// The body failed after its head went out: hyper cuts the answer when told. An
    /// HTTP/2 stream is reset at once, and the reset drops what is still queued for
    /// it on the connection, the head included: the client got RST_STREAM alone,
    /// while the log said 200 and counted the bytes handed on. So the error waits
    /// one turn of the (single-threaded) worker first, in which the connection's task,
    /// woken by what was queued, writes it (as far as the client's window allows);
    /// the client gets the head and those bytes, then the reset, as an HTTP/1 client
    /// gets them before its connection is reset. Rare, so it costs nothing else.
    #[cold]
    #[inline(never)]
    fn fail_after_a_yield(&mut self, e: BoxError, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.failed = Some(e);
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Hand `conn` back to the idle list when this body is dropped after its end.
    #[must_use]
    pub fn with_conn(mut self, conn: Conn) -> StreamedBody {
        self.conn = Some(conn);
        self
    }
}

impl Drop for StreamedBody {
    fn drop(&mut self) {
        // hyper stops polling once `is_end_stream` says so, hence the second test.
        if self.ended || self.inner.is_end_stream() {
            if let Some(c) = self.conn.take() {
                c.release();
            }
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
        let this = &mut *self;
        if !this.polled {
            this.polled = true;
            this.watched = deadline::register(this.deadline);
        }
        if let Some(f) = this.take_prefetched() {
            return Poll::Ready(Some(Ok(f)));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(e) = this.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        match this.poll_inner(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => this.fail_after_a_yield(e.into(), cx),
            Poll::Ready(Some(Ok(mut f))) => {
                if let Some(w) = &this.watched {
                    w.waiting_for_upstream(false);
                }
                filter_trailers(&mut f, this.trailer_names.as_deref());
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Pending => {
                // The upstream is the slow side now: should the deadline pass, the
                // task's watch blames it, not the client (`deadline::Watch`).
                if let Some(w) = &this.watched {
                    w.waiting_for_upstream(true);
                }
                let passed = match this.conn.as_mut() {
                    Some(c) => c.deadline_passed(cx, this.deadline),
                    None => {
                        let deadline = this.deadline;
                        let timer = this
                            .timer
                            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                        timer.as_mut().poll(cx).is_ready()
                    }
                };
                if passed {
                    this.fail_after_a_yield(BodyTimeout.into(), cx)
                } else {
                    Poll::Pending
                }
            }
        }
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.ahead == 0
            && self.first.is_none()
            && self.last.is_none()
            && self.failed.is_none()
            && (self.ended || self.inner.is_end_stream())
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        let ahead = self.ahead;
        if ahead == 0 {
            return self.inner.size_hint();
        }
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + ahead);
        if let Some(u) = inner.upper() {
            hint.set_upper(u + ahead);
        }
        hint
    }
}

/// Trailers lose the fields that must not travel in them: hop-by-hop ones (which
/// made hyper reset an HTTP/2 client's stream) and those RFC 9110 §6.5.1 forbids
/// there (framing, routing, request modifiers, authentication, response control,
/// content handling). Data frames pass untouched.
#[inline]
fn filter_trailers(f: &mut Frame<Bytes>, route: Option<&[http::HeaderName]>) {
    if let Some(t) = f.trailers_mut() {
        trailers::strip(t, route.unwrap_or_default());
    }
}

pub mod deadline;
mod trailers;

#[cfg(test)]
mod conn_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Count(Arc<AtomicU64>);
    impl BodyEnd for Count {
        fn ended(self: Box<Self>, bytes: u64) {
            // +1 so that "told zero bytes" differs from "never told".
            self.0.store(bytes + 1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn every_kind_reports_its_bytes_once_at_its_end() {
        let stream = http_body_util::StreamBody::new(futures_util::stream::iter([
            Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cde"))),
        ]));
        for (body, want) in [
            (Body::full("hello"), 5),
            (Body::empty(), 0),
            (Body::boxed(stream), 5),
        ] {
            let told = Arc::new(AtomicU64::new(0));
            let mut body = body;
            body.on_end(Box::new(Count(told.clone())));
            let got = body.collect().await.expect("body").to_bytes();
            assert_eq!(got.len() as u64, want);
            assert_eq!(told.load(Ordering::SeqCst), want + 1, "told at the end");
        }
    }

    #[tokio::test]
    async fn a_dropped_body_reports_what_was_sent_and_releases_its_guard() {
        let activity = crate::idle::Activity::new();
        let told = Arc::new(AtomicU64::new(0));
        let mut body = Body::full("hello");
        body.on_end(Box::new(Count(told.clone())));
        body.set_in_flight(Some(activity.start_request()));
        assert_eq!(activity.in_flight(), 1);
        drop(body);
        assert_eq!(told.load(Ordering::SeqCst), 1, "nothing was sent");
        assert_eq!(activity.in_flight(), 0);
    }

    #[test]
    fn an_empty_full_body_has_no_frame() {
        assert!(Body::full(Bytes::new()).is_end_stream());
        assert!(!Body::full("x").is_end_stream());
        assert_eq!(Body::full("xyz").size_hint().exact(), Some(3));
    }
}
