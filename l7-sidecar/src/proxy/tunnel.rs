//! WebSocket (HTTP/1.1 upgrade) pass-through.

use super::{full, Body, ProxyError, Upstream};
use crate::balance::{ActiveGuard, HashInput};
use crate::http_util::{strip_hop_by_hop_keeping_websocket, upgrades_to_websocket};
use crate::idle::TunnelCut;
use crate::observe::{record_tunnel_end, TunnelLog, TunnelRecord};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Pass a WebSocket (or any HTTP/1.1 upgrade) through: forward the handshake, then
/// splice the two upgraded connections together. The splice is handed to the client
/// connection's task (`client`), which runs it once hyper has let the connection go:
/// a tunnel then counts as an open connection (limits, drain) until it ends. Its
/// end (who closed, the idle timeout, the drain's cut or an error), duration and
/// bytes each way are counted and complete the request's access-log line
/// (`observe::TunnelLog`, in the `101`'s extensions).
///
/// The handshake is retried on another backend as an idempotent request is (up to the
/// pool's `retries`, within its request timeout) after an attempt that got no answer
/// to pass on: a failed connect, a connection closed or reset before the answer, a
/// `101` to another protocol than WebSocket. `attempted` is left naming the backend
/// last tried (the access log's `upstream`, also if the request is dropped meanwhile).
pub async fn tunnel<B>(
    up: Arc<Upstream>,
    client: &crate::idle::Activity,
    mut req: Request<B>,
    path_and_query: &str,
    hash: &HashInput<'_>,
    request_id: Arc<str>,
    attempted: &mut Option<usize>,
) -> Result<Response<Body>, ProxyError>
where
    B: Send + 'static,
{
    let attempts = if super::idempotent(req.method()) {
        1 + up.pool.cfg.retries as usize
    } else {
        1
    };
    let deadline = tokio::time::Instant::now() + Duration::from_millis(up.pool.cfg.request_timeout_ms);
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut tried = Vec::new();
    let mut last_err = None;
    let mut answered = None;
    for _ in 0..attempts {
        let Some(idx) = up.pool.pick(hash, &tried) else {
            break;
        };
        *attempted = Some(idx);
        let backend = &up.pool.backends[idx];
        match handshake(&up, idx, &req, path_and_query, deadline).await {
            Ok(answer) => {
                let status = match &answer {
                    Answer::Switched(r) => r.status(),
                    Answer::Declined(r) => r.status(),
                };
                up.pool.record_result(idx, status.is_server_error());
                answered = Some((idx, answer));
                break;
            }
            // No attempt after the request timeout (hostile s18b-F1: the next backend's
            // connect failed at once and was blamed).
            Err(HandshakeError::Deadline) => return Err(ProxyError::Timeout),
            Err(HandshakeError::Unreachable(e)) => {
                tracing::debug!(pool = %up.pool.name, request_id = %request_id, upstream = %backend.addr_text, error = %e, "upgrade attempt failed");
                last_err = Some(e);
            }
            Err(HandshakeError::Refused(why)) => {
                // As other answers refused: a WARN naming the backend, which is counted.
                tracing::warn!(pool = %up.pool.name, request_id = %request_id, upstream = %backend.addr_text, error = %why, "upstream response refused");
                last_err = Some(ProxyError::Upstream(format!("{}: {why}", backend.addr)));
            }
        }
        tried.push(idx);
        up.pool.record_result(idx, true);
    }
    let Some((idx, answer)) = answered else {
        return Err(last_err.unwrap_or_else(|| ProxyError::NoBackend(up.pool.name.clone())));
    };
    let backend = up.pool.backends[idx].clone();
    let mut resp = match answer {
        Answer::Declined(r) => return Ok(r),
        Answer::Switched(r) => r,
    };
    // The client asked in HTTP/1.1 (an HTTP/1.0 request's Upgrade is ignored): it is
    // answered in HTTP/1.1 whatever version the backend spoke (hostile s17-T5). Of the
    // backend connection's hop-by-hop fields only the upgrade crosses (hostile s18-3:
    // `Keep-Alive`, `Proxy-Authenticate` and fields its `Connection` named did).
    *resp.version_mut() = http::Version::HTTP_11;
    strip_hop_by_hop_keeping_websocket(resp.headers_mut());
    let server_upgrade = hyper::upgrade::on(&mut resp);
    let guard = ActiveGuard::new(backend.clone());
    let log = TunnelLog::default();
    let end = Arc::new(End::new(log.clone(), request_id, backend.addr_text.clone()));
    let splice_end = end.clone();
    client.hand_over_tunnel(crate::idle::Tunnel {
        splice: Box::pin(async move {
            let _guard = guard;
            let end = splice_end;
            let upgraded = match (client_upgrade.await, server_upgrade.await) {
                (Ok(c), Ok(s)) => (c, s),
                (Err(e), _) | (_, Err(e)) => {
                    end.finish(How::Failed(format!("upgrade failed: {e}")));
                    return;
                }
            };
            let mut c = Metered::new(TokioIo::new(upgraded.0), Side::Client, end.meter.clone());
            let mut s = Metered::new(TokioIo::new(upgraded.1), Side::Backend, end.meter.clone());
            let how = match tokio::io::copy_bidirectional(&mut c, &mut s).await {
                Ok(_) => How::Closed,
                Err(e) => How::Failed(e.to_string()),
            };
            end.finish(how);
        }),
        half_closed: {
            let meter = end.meter.clone();
            Box::new(move || meter.closed_first().is_some())
        },
        cut: Box::new(move |why| end.finish(How::Cut(why))),
    });
    let (parts, _) = resp.into_parts();
    let mut resp = Response::from_parts(parts, full(Bytes::new()));
    resp.extensions_mut().insert(log);
    Ok(resp)
}

/// Why one attempt at the handshake gave no answer to pass on.
enum HandshakeError {
    /// The request timeout passed: no further attempt.
    Deadline,
    /// The backend could not be reached or left before answering (another may be tried).
    Unreachable(ProxyError),
    /// The backend's answer is not one to pass on (another may be tried).
    Refused(String),
}

/// What a backend answered an upgrade with.
enum Answer {
    /// A `101` to WebSocket: the connection becomes the tunnel.
    Switched(Response<hyper::body::Incoming>),
    /// Any other answer, ready to relay like any response: checked as every answer is,
    /// without the backend connection's hop-by-hop fields, what of its body already
    /// arrived read.
    Declined(Response<Body>),
}

/// One attempt: the upgrade request to backend `idx` on a connection of its own (it
/// becomes the tunnel), and its answer.
async fn handshake<B>(
    up: &Upstream,
    idx: usize,
    req: &Request<B>,
    path_and_query: &str,
    deadline: tokio::time::Instant,
) -> Result<Answer, HandshakeError> {
    let backend = &up.pool.backends[idx];
    let unreachable = |e: String| HandshakeError::Unreachable(ProxyError::Upstream(e));
    let connect_by = tokio::time::Instant::now() + Duration::from_millis(up.pool.cfg.connect_timeout_ms);
    let stream = match tokio::time::timeout_at(connect_by.min(deadline), tokio::net::TcpStream::connect(backend.addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(HandshakeError::Unreachable(ProxyError::Connect(e.to_string()))),
        Err(_) if deadline <= connect_by => return Err(HandshakeError::Deadline),
        Err(_) => return Err(HandshakeError::Unreachable(ProxyError::Connect("connect timeout".into()))),
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    // Moved on here until the answer is known (so a declined answer's body can be read
    // ahead, see below), then by a task of its own.
    let mut conn = Driven { conn: Box::pin(conn.with_upgrades()), done: false };
    let mut up_req = Request::builder()
        .method(req.method().clone())
        .uri(path_and_query);
    if let Some(h) = up_req.headers_mut() {
        *h = req.headers().clone();
    }
    let up_req = up_req.body(full(Bytes::new())).map_err(|e| unreachable(e.to_string()))?;
    let answer = tokio::time::timeout_at(deadline, sender.send_request(up_req));
    let mut answer = std::pin::pin!(answer);
    let answer = std::future::poll_fn(|cx| {
        conn.poll(cx);
        answer.as_mut().poll(cx)
    })
    .await;
    let mut resp = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(HandshakeError::Deadline),
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if !upgrades_to_websocket(resp.headers()) {
            // A 101 to another protocol (or to none) than the client asked for: no
            // tunnel (hostile s17-T7: it was spliced as is; s18-2: only its first
            // `Upgrade` line was read).
            let upgrade: Vec<_> = resp.headers().get_all(http::header::UPGRADE).iter().collect();
            return Err(HandshakeError::Refused(format!("answered 101 with Upgrade {upgrade:?}, not websocket")));
        }
        conn.hand_over();
        return Ok(Answer::Switched(resp));
    }
    // Declined: checked and relayed as any answer is (hostile s18b-F2: a status over
    // 599, `Content-Length` with `Transfer-Encoding`, a broken body passed as is).
    super::passable(&mut resp).map_err(|why| HandshakeError::Refused(why.to_string()))?;
    let (mut parts, body) = resp.into_parts();
    super::strip_hop_by_hop(&mut parts.headers);
    parts.version = http::Version::HTTP_11;
    let body = super::StreamedBody::new(body, ActiveGuard::new(backend.clone()), deadline);
    let mut body = Body::upstream(body, backend.addr_text.clone());
    // What of the body the connection has already read (hostile s18b-3: a broken body
    // was relayed and cut, the connection being a task's that had not run yet).
    std::future::poll_fn(|cx| loop {
        conn.poll(cx);
        match body.prefetch(cx) {
            Ok(true) => {}
            done => return Poll::Ready(done),
        }
    })
    .await
    .map_err(|why| HandshakeError::Refused(format!("invalid response body: {why}")))?;
    conn.hand_over();
    Ok(Answer::Declined(Response::from_parts(parts, body)))
}

/// A tunnel's upstream connection while its handshake is answered: moved on by the
/// attempt itself, then handed to a task of its own (`hand_over`).
struct Driven {
    conn: Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>,
    done: bool,
}

impl Driven {
    /// Let the connection read and write what it can.
    fn poll(&mut self, cx: &mut Context<'_>) {
        if !self.done && self.conn.as_mut().poll(cx).is_ready() {
            self.done = true;
        }
    }

    /// The connection goes on in a task of its own (a tunnel's until its upgrade, a
    /// declined answer's until its body is read).
    fn hand_over(self) {
        if !self.done {
            let conn = self.conn;
            tokio::spawn(async move {
                let _ = conn.await;
            });
        }
    }
}

/// How a tunnel's splice ended, before it is told apart by who closed first.
enum How {
    /// Both sides closed (the first to close is in the `Meter`).
    Closed,
    /// An I/O error (or the upgrade itself failed).
    Failed(String),
    /// The gateway ended it.
    Cut(TunnelCut),
}

/// What one tunnel carried and which side closed first, counted by its two ends
/// (`Metered`) and read when it ends, also when the gateway cut it.
#[derive(Default)]
struct Meter {
    to_backend: AtomicU64,
    to_client: AtomicU64,
    /// `Side` as a number (`NO_SIDE` until one side closed).
    first_closed: AtomicU8,
}

const NO_SIDE: u8 = 0;

impl Meter {
    /// The side that closed first, if one has.
    fn closed_first(&self) -> Option<Side> {
        match self.first_closed.load(Ordering::Relaxed) {
            NO_SIDE => None,
            f if f == Side::Client as u8 => Some(Side::Client),
            _ => Some(Side::Backend),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Side {
    Client = 1,
    Backend = 2,
}

/// A tunnel's end: recorded once (access-log line, metrics), by its splice when it
/// finishes, by the gateway's cut, or on drop should neither have happened (the
/// connection's task itself was dropped).
struct End {
    opened: Instant,
    meter: Arc<Meter>,
    log: TunnelLog,
    request_id: Arc<str>,
    backend: Arc<str>,
    done: AtomicBool,
}

impl End {
    fn new(log: TunnelLog, request_id: Arc<str>, backend: Arc<str>) -> End {
        End {
            opened: Instant::now(),
            meter: Arc::default(),
            log,
            request_id,
            backend,
            done: AtomicBool::new(false),
        }
    }

    fn finish(&self, how: How) {
        if self.done.swap(true, Ordering::Relaxed) {
            return;
        }
        let first = self.meter.closed_first();
        // An error after one side closed (a write to the side that left) is the
        // close's consequence: the end is that side's, the error is kept.
        let (end, error) = match (how, first) {
            (How::Cut(TunnelCut::IdleTimeout), _) => ("idle_timeout", None),
            (How::Cut(TunnelCut::Drain), _) => ("drain", None),
            (how @ (How::Closed | How::Failed(_)), Some(Side::Client)) => ("client_closed", how.error()),
            (how @ (How::Closed | How::Failed(_)), Some(Side::Backend)) => ("backend_closed", how.error()),
            // Both sides read to their end, so one was first: not reached.
            (How::Closed, None) => ("client_closed", None),
            (How::Failed(e), None) => ("error", Some(e)),
        };
        let record = TunnelRecord {
            end,
            duration_ms: self.opened.elapsed().as_secs_f64() * 1000.0,
            bytes_to_backend: self.meter.to_backend.load(Ordering::Relaxed),
            bytes_to_client: self.meter.to_client.load(Ordering::Relaxed),
            error,
            closed_first: first.map(|side| match side {
                Side::Client => "client",
                Side::Backend => "backend",
            }),
        };
        tracing::debug!(
            request_id = %self.request_id,
            upstream = %self.backend,
            end,
            duration_ms = record.duration_ms,
            bytes_to_backend = record.bytes_to_backend,
            bytes_to_client = record.bytes_to_client,
            error = record.error.as_deref().unwrap_or(""),
            "tunnel ended"
        );
        record_tunnel_end(end, record.bytes_to_backend, record.bytes_to_client);
        self.log.ended(record);
    }
}

impl How {
    fn error(self) -> Option<String> {
        match self {
            How::Failed(e) => Some(e),
            How::Closed | How::Cut(_) => None,
        }
    }
}

impl Drop for End {
    fn drop(&mut self) {
        self.finish(How::Failed("the tunnel was dropped unfinished".into()));
    }
}

/// One end of a tunnel: counts the bytes written to it and notes whether its side
/// closed first (a read that found the end of the stream).
struct Metered<T> {
    io: T,
    side: Side,
    meter: Arc<Meter>,
}

impl<T> Metered<T> {
    fn new(io: T, side: Side, meter: Arc<Meter>) -> Self {
        Metered { io, side, meter }
    }

    fn written(&self) -> &AtomicU64 {
        match self.side {
            Side::Client => &self.meter.to_client,
            Side::Backend => &self.meter.to_backend,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() == before && buf.remaining() > 0 {
            let _ = self.meter.first_closed.compare_exchange(
                NO_SIDE,
                self.side as u8,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written().fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
