//! Upstream HTTP/1.1 keep-alive connections, kept per runtime and driven by the
//! request that uses them, speaking HTTP/1.1 through our own codec (`h1`).
//!
//! hyper-util's pooled client shares one locked pool between threads and spawns a
//! task per request to hand the connection back when it is ready again; at ~10 µs
//! per request that was the largest user-space cost of proxying. Here a connection
//! goes back to the idle list when the response body has been read to its end (see
//! `body::StreamedBody`), without a task. Nor does a connection have a task of its own:
//! the request's future writes the request and reads the response head (`send`), then
//! the response body reads the body's bytes as the client's connection pulls them
//! (`poll_body`): nothing of a backend's answer is read ahead of a client that is not
//! reading. hyper's client connection did this before; its general state machine, body
//! channel and copied header map cost ~14k instructions per request, the codec a
//! fraction of that (README, "own HTTP/1.1 upstream client").
//!
//! An idle connection is polled by nobody: a backend's close is noticed when the
//! connection is next used. `send` first asks the socket's readiness (no system call
//! when nothing arrived); a connection the backend closed, reset or wrote to while it
//! sat idle, or that ends before any byte of the response, hands the request back
//! unsent (`SendError::NotSent`), and it goes on the next connection (see `forward`).
//!
//! On a single-threaded runtime (each of the
//! binary's workers) the idle list is the thread's own (a `thread_local!`: no lock,
//! and a connection is only ever driven and used by the thread that opened it). On a
//! multi-threaded runtime, whose tasks move between threads, per-thread lists would
//! leave connections idle on one thread while another opens new ones, so those share
//! one locked list. Keyed by the backend's resolved `SocketAddr`, so pools and config
//! generations that name the same backend share its connections.
//!
//! Each connection also keeps the timer that bounds the requests sent on it
//! (`deadline_passed`): re-armed only when it fires, instead of a timer registered
//! and cancelled per request.

use bytes::{Bytes, BytesMut};
use h1::{Decoder, H1Error, Head};
use http::{HeaderMap, HeaderValue, Method};
use std::cell::RefCell;
use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncWrite;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

pub mod h1;

/// Idle connections older than this are closed rather than reused: a backend's own
/// keep-alive timeout is usually longer (nginx 75 s, Go 90 s), so reuse rarely races it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Per backend and worker thread; more than the concurrency to one backend is waste.
pub const MAX_IDLE_PER_BACKEND: usize = 512;
/// Every this many releases on a runtime, idle lists of all backends drop their
/// expired connections: an idle connection is polled by nobody, so one to a backend
/// that gets no more requests would otherwise keep its socket until the process ends.
const SWEEP_EVERY: u32 = 1024;
/// The first read of a response asks for this much; reads that fill the buffer
/// double it for the next, up to `MAX_READ` (large bodies in fewer reads).
const FIRST_READ: usize = 8 * 1024;
const MAX_READ: usize = 64 * 1024;
/// A connection put back idle keeps buffers up to this size; larger ones (after a
/// large body or request) are freed, so idle connections stay small.
const IDLE_BUFFER: usize = 16 * 1024;
/// Request bodies up to this size are copied behind the head and go in one write;
/// larger ones are written from their own buffer after it.
const INLINE_BODY: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr}: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    /// The request's own deadline passed first (no retry can help then).
    #[error("connect to {addr}: request deadline passed")]
    Deadline { addr: SocketAddr },
}

/// Why a request sent on a connection got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Response(#[from] H1Error),
    #[error("upstream connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed before a response")]
    Closed,
    /// The request's deadline passed before its response head arrived.
    #[error("no response before the request deadline")]
    Deadline,
    /// A pooled connection the backend had closed (or reset, or sent stray bytes on)
    /// while it sat idle: noticed before any response byte, so the request did not get
    /// an answer there and may go on another connection.
    #[error("pooled connection closed before a response")]
    NotSent,
}

/// A request as `Conn::send` writes it. Borrowed: a retry sends the same one again.
pub struct Outgoing<'a> {
    pub method: &'a Method,
    /// Origin-form target (path and query).
    pub target: &'a str,
    pub headers: &'a HeaderMap,
    /// Written as `Host` when `headers` have none.
    pub host: Option<&'a HeaderValue>,
    pub body: &'a Bytes,
    /// The request may be sent again even if the backend may have received it
    /// (an idempotent method, RFC 9110 §9.2.2): a reused connection that ends after
    /// the request was written, before any byte of the answer, then hands it back
    /// (`SendError::NotSent`). Otherwise that is an error (the backend may have acted
    /// on it), as with hyper's client, which handed back only requests not written.
    pub replayable: bool,
}

/// A response head as `Conn::send` returns it; its body is read with `decoder` from
/// the connection (see `body::StreamedBody`).
pub struct Response {
    /// Without hop-by-hop fields unless `hop_by_hop_left`.
    pub head: http::response::Parts,
    pub decoder: Decoder,
    /// `Connection` named other fields: `http_util::strip_hop_by_hop` must still run.
    pub hop_by_hop_left: bool,
}

/// A context whose wake-ups go nowhere, for polls whose wake-up is registered
/// elsewhere (or not wanted).
pub(crate) fn no_wake() -> Context<'static> {
    Context::from_waker(std::task::Waker::noop())
}

struct Idle {
    conn: Conn,
    /// When it stops being reused (idle since + `IDLE_TIMEOUT`): a comparison per
    /// checkout rather than the subtraction of two clock readings.
    expires: Instant,
}

/// Connections opened to backends since start, all threads (diagnostics, tests).
static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many upstream connections have been opened since the process started.
pub fn opened() -> u64 {
    OPENED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Idle connections by backend address. A list searched from the front rather
/// than a hash map: a process talks to the handful of backends of its config,
/// and comparing a few addresses is cheaper than hashing one (SipHash cost ~150
/// instructions per checkout and per release).
#[derive(Default)]
struct IdleMap {
    by_addr: Vec<(SocketAddr, Vec<Idle>)>,
    releases: u32,
}

impl IdleMap {
    fn list(&mut self, addr: SocketAddr) -> Option<&mut Vec<Idle>> {
        self.by_addr
            .iter_mut()
            .find(|(a, _)| *a == addr)
            .map(|(_, l)| l)
    }
}

thread_local! {
    /// The idle list of the single-threaded runtime running on this thread.
    static LOCAL: RefCell<IdleMap> = RefCell::new(IdleMap::default());
}

/// The idle list of multi-threaded runtimes (and of drops outside any runtime).
static SHARED: LazyLock<Mutex<IdleMap>> = LazyLock::new(Mutex::default);

thread_local! {
    /// Set on the binary's worker threads (`dedicate_thread`).
    static DEDICATED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Declare that the calling thread runs one single-threaded runtime for the rest of
/// its life (the binary's workers): its connections then use the thread's own idle
/// list without asking tokio, per checkout and release, which runtime is current.
pub fn dedicate_thread() {
    DEDICATED.with(|d| d.set(true));
}

/// Run `f` on the idle list that belongs to the calling runtime.
fn with_idle<R>(f: impl FnOnce(&mut IdleMap) -> R) -> R {
    let single = DEDICATED.with(std::cell::Cell::get)
        || tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    if single {
        LOCAL.with(|m| f(&mut m.borrow_mut()))
    } else {
        f(&mut SHARED.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A connection checked out for one request: the socket and its two buffers, driven
/// by whoever uses it (the request's future, then the response body).
pub struct Conn {
    io: TcpStream,
    /// Bytes read and not yet consumed: the response head, then the body's bytes as
    /// the body decodes them (frames are split off it, not copied).
    rbuf: BytesMut,
    /// The request as written (head, and a small body behind it).
    wbuf: Vec<u8>,
    /// How much the next read asks for (`FIRST_READ` doubling to `MAX_READ`).
    read_size: usize,
    /// The last response allows another exchange (HTTP/1.1, no `Connection: close`,
    /// length-delimited or bodiless); its body must still have ended (`release`).
    keep_alive: bool,
    /// Bounds the wait for the current request's response (`deadline_passed`).
    /// Boxed: `Sleep` is not `Unpin`, and a `Conn` moves.
    timer: Pin<Box<Sleep>>,
    /// When the current request started: counts as "idle since" when the
    /// connection is released (a little early, which only shortens its reuse).
    started: Instant,
    pub addr: SocketAddr,
    /// Taken from the idle list (it may have died since; see `forward`).
    pub reused: bool,
}

impl Conn {
    /// Send `req` and read until its response head has arrived (skipping interim
    /// `1xx` heads). The body is then read with the returned decoder through
    /// `poll_body` (`StreamedBody` does). Fails with `SendError::Deadline` once
    /// `deadline` passes, with `SendError::NotSent` when a reused connection turns
    /// out closed before the request was written, or (`replayable` requests) before
    /// any byte of a response.
    pub async fn send(
        &mut self,
        req: &Outgoing<'_>,
        deadline: Instant,
    ) -> Result<Response, SendError> {
        self.keep_alive = false;
        if self.reused && self.closed_while_idle() {
            return Err(SendError::NotSent);
        }
        self.wbuf.clear();
        h1::encode_request(
            &mut self.wbuf,
            req.method,
            req.target,
            req.headers,
            req.host,
            req.body.len(),
        );
        let inline = req.body.len() <= INLINE_BODY;
        if inline {
            self.wbuf.extend_from_slice(req.body);
        }
        let rest: &[u8] = if inline { &[] } else { req.body };
        let reused = self.reused;
        if let Err(e) = self.write_all(rest, deadline).await {
            return Err(match e {
                SendError::Io(_) if reused => SendError::NotSent,
                e => e,
            });
        }
        let head_request = *req.method == Method::HEAD;
        let head = self
            .read_head(head_request, reused && req.replayable, deadline)
            .await?;
        self.keep_alive = head.keep_alive;
        let decoder = Decoder::new(head.framing);
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = head.status;
        parts.version = head.version;
        parts.headers = head.headers;
        if let Some(r) = head.reason {
            if let Ok(r) = hyper::ext::ReasonPhrase::try_from(r) {
                parts.extensions.insert(r);
            }
        }
        Ok(Response {
            head: parts,
            decoder,
            hop_by_hop_left: head.hop_by_hop_left,
        })
    }

    /// Whether the backend closed (or reset, or wrote to) the connection while it
    /// sat idle. Asks the readiness tokio already has (no system call unless the
    /// socket is readable): a connection whose last read emptied the socket is
    /// readable again only if the backend sent something since.
    fn closed_while_idle(&mut self) -> bool {
        match self.io.poll_read_ready(&mut no_wake()) {
            Poll::Pending => false,
            Poll::Ready(Err(_)) => true,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                // EOF, an error, or bytes no request asked for: not usable.
                !matches!(self.io.try_read(&mut probe), Err(e) if e.kind() == ErrorKind::WouldBlock)
            }
        }
    }

    /// Write `wbuf`, then `rest`.
    async fn write_all(&mut self, rest: &[u8], deadline: Instant) -> Result<(), SendError> {
        let mut done = 0;
        let total = self.wbuf.len() + rest.len();
        std::future::poll_fn(|cx| {
            while done < total {
                let chunk = if done < self.wbuf.len() {
                    &self.wbuf[done..]
                } else {
                    &rest[done - self.wbuf.len()..]
                };
                match Pin::new(&mut self.io).poll_write(cx, chunk) {
                    Poll::Ready(Ok(0)) => {
                        return Poll::Ready(Err(SendError::Io(ErrorKind::WriteZero.into())))
                    }
                    Poll::Ready(Ok(n)) => done += n,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(SendError::Io(e))),
                    Poll::Pending if timer_passed(&mut self.timer, cx, deadline) => {
                        return Poll::Ready(Err(SendError::Deadline))
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// `replay`: an end before any byte of the answer is `NotSent` (else `Closed`).
    async fn read_head(
        &mut self,
        head_request: bool,
        replay: bool,
        deadline: Instant,
    ) -> Result<Head, SendError> {
        let mut got_any = !self.rbuf.is_empty();
        std::future::poll_fn(|cx| loop {
            if let Some(head) = h1::parse_head(&mut self.rbuf, head_request)? {
                return Poll::Ready(Ok(head));
            }
            match self.poll_fill(cx) {
                Poll::Ready(Ok(0)) if replay && !got_any => {
                    return Poll::Ready(Err(SendError::NotSent))
                }
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(SendError::Closed)),
                Poll::Ready(Ok(_)) => got_any = true,
                Poll::Ready(Err(e)) if replay && !got_any && lost(&e) => {
                    return Poll::Ready(Err(SendError::NotSent))
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(SendError::Io(e))),
                Poll::Pending if timer_passed(&mut self.timer, cx, deadline) => {
                    return Poll::Ready(Err(SendError::Deadline))
                }
                Poll::Pending => return Poll::Pending,
            }
        })
        .await
    }

    /// Read what the backend sent into `rbuf`: the byte count, 0 at its close.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 2 {
            self.rbuf.reserve(self.read_size);
        }
        let spare = self.rbuf.capacity() - self.rbuf.len();
        let n = std::task::ready!(tokio_util::io::poll_read_buf(
            Pin::new(&mut self.io),
            cx,
            &mut self.rbuf
        ))?;
        if n == spare && self.read_size < MAX_READ {
            self.read_size *= 2;
        }
        Poll::Ready(Ok(n))
    }

    /// The response body's next frame, read from the connection as needed (only as
    /// the body's reader asks: nothing is read ahead of it). `Ready(None)` at its end;
    /// after an error, the body never ends (and the connection is not reused).
    pub fn poll_body(
        &mut self,
        decoder: &mut Decoder,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, H1Error>>> {
        loop {
            match decoder.decode(&mut self.rbuf) {
                Ok(h1::Step::Frame(f)) => return Poll::Ready(Some(Ok(f))),
                Ok(h1::Step::End) => return Poll::Ready(None),
                Ok(h1::Step::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            match std::task::ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    self.keep_alive = false;
                    return Poll::Ready(decoder.eof().err().map(Err));
                }
                Ok(_) => {}
                Err(e) => {
                    self.keep_alive = false;
                    decoder.fail();
                    return Poll::Ready(Some(Err(H1Error::Read(e))));
                }
            }
        }
    }

    /// Whether `deadline` has passed; if not, `cx` is woken when it does.
    pub fn deadline_passed(&mut self, cx: &mut Context<'_>, deadline: Instant) -> bool {
        timer_passed(&mut self.timer, cx, deadline)
    }

    /// Put the connection back for the next request. Only call once its response
    /// body has ended (`Decoder::is_done`): HTTP/1.1 cannot start the next exchange
    /// before. Not put back when the response did not allow it, or the backend sent
    /// more than the response.
    pub fn release(mut self) {
        if !self.keep_alive || !self.rbuf.is_empty() {
            return;
        }
        // Idle connections keep small buffers only (`tests/memory.rs`).
        if self.rbuf.capacity() > IDLE_BUFFER {
            self.rbuf = BytesMut::new();
        }
        if self.wbuf.capacity() > IDLE_BUFFER {
            self.wbuf = Vec::new();
        }
        self.read_size = FIRST_READ;
        let now = self.started;
        with_idle(|m| {
            m.releases = m.releases.wrapping_add(1);
            if m.releases % SWEEP_EVERY == 0 {
                m.by_addr.retain_mut(|(_, list)| {
                    list.retain(|i| now < i.expires);
                    !list.is_empty()
                });
            }
            let addr = self.addr;
            if m.list(addr).is_none() {
                m.by_addr.push((addr, Vec::new()));
            }
            let Some(list) = m.list(addr) else { return };
            if list.len() >= MAX_IDLE_PER_BACKEND {
                // The oldest is the most likely to be closed by the backend soon.
                list.remove(0);
            }
            list.push(Idle {
                conn: self,
                expires: now + IDLE_TIMEOUT,
            });
        });
    }
}

/// A reused connection the backend closed meanwhile fails the first write or read
/// with one of these (rather than with end of file).
fn lost(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

/// `timer` has fired for `deadline` (else `cx` is woken when it does).
///
/// The timer may still be armed for an earlier request's deadline: it then fires
/// early once and is moved on to this one. Deadlines only grow on one connection
/// (now + the pool's timeout), so the timer is re-armed about once per timeout
/// rather than registered and cancelled in the timer wheel per request.
fn timer_passed(timer: &mut Pin<Box<Sleep>>, cx: &mut Context<'_>, deadline: Instant) -> bool {
    if timer.deadline() > deadline {
        // A shorter timeout than the previous request's (another pool's).
        timer.as_mut().reset(deadline);
    }
    loop {
        match timer.as_mut().poll(cx) {
            Poll::Pending => return false,
            Poll::Ready(()) if timer.deadline() >= deadline => return true,
            // An earlier request's deadline: arm for this one (and register `cx`).
            Poll::Ready(()) => timer.as_mut().reset(deadline),
        }
    }
}

/// The most recently used idle connection to `addr`, else a new one. An idle
/// connection the backend closed meanwhile is noticed when the request is sent on it
/// (`SendError::NotSent`), and the request goes on the next (see `forward`). `now`:
/// when the request started; `deadline`: when it must have its response.
pub async fn checkout(
    addr: SocketAddr,
    connect_timeout: Duration,
    now: Instant,
    deadline: Instant,
) -> Result<Conn, ConnectError> {
    if let Some(mut conn) = pop_idle(addr, now) {
        conn.reused = true;
        conn.started = now;
        return Ok(conn);
    }
    // Boxed: dialing is rare, and its future would otherwise enlarge (and be copied
    // with) every request's future.
    Box::pin(connect(addr, connect_timeout, now, deadline)).await
}

fn pop_idle(addr: SocketAddr, now: Instant) -> Option<Conn> {
    with_idle(|m| {
        let list = m.list(addr)?;
        while let Some(idle) = list.pop() {
            if now < idle.expires {
                return Some(idle.conn);
            }
        }
        None
    })
}

async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    now: Instant,
    deadline: Instant,
) -> Result<Conn, ConnectError> {
    let until = deadline.min(now + timeout);
    let stream = match tokio::time::timeout_at(until, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
        Err(_) if until == deadline => return Err(ConnectError::Deadline { addr }),
        Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
    };
    // Requests and responses are small writes: do not let Nagle hold them back.
    stream
        .set_nodelay(true)
        .map_err(|source| ConnectError::Io { addr, source })?;
    OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Conn {
        io: stream,
        rbuf: BytesMut::new(),
        wbuf: Vec::new(),
        read_size: FIRST_READ,
        keep_alive: false,
        timer: Box::pin(tokio::time::sleep_until(deadline)),
        started: now,
        addr,
        reused: false,
    })
}

/// Idle connections the calling runtime holds to `addr` (for tests and diagnostics).
pub fn idle_count(addr: SocketAddr) -> usize {
    with_idle(|m| m.list(addr).map_or(0, |l| l.len()))
}

#[cfg(test)]
pub(crate) mod tests;
