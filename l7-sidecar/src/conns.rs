//! Upstream HTTP/1.1 keep-alive connections, kept per runtime and driven by the
//! request that uses them.
//!
//! hyper-util's pooled client shares one locked pool between threads and spawns a
//! task per request to hand the connection back when it is ready again; at ~10 µs
//! per request that was the largest user-space cost of proxying. Here a connection
//! goes back to the idle list when the response body has been read to its end (see
//! `body::StreamedBody`), without a task. Nor does a connection have a task of its own:
//! hyper's `Connection` (the HTTP/1 state machine that writes the request and reads
//! the response) travels with its `SendRequest` and is polled by whoever uses it —
//! the request's future while it waits for the response head, then the response
//! body as the client's connection pulls it (`Conn::poll_drive`). A spawned
//! connection task instead costs two cross-task wake-ups per request (request queued
//! → connection task; response head → request task) and lets the backend's bytes be
//! read ahead of a client that is not reading. An idle connection is polled by nobody:
//! a backend's close is noticed when the connection is next used. A connection whose
//! last exchange finished is handed out without polling it; if the backend had closed
//! it, sending reads that close before writing and hands the request back unsent
//! (`SendError::NotSent`), and it goes on the next connection (see `forward`).
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

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use sync_wrapper::SyncWrapper;
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// Idle connections older than this are closed rather than reused: a backend's own
/// keep-alive timeout is usually longer (nginx 75 s, Go 90 s), so reuse rarely races it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Per backend and worker thread; more than the concurrency to one backend is waste.
pub const MAX_IDLE_PER_BACKEND: usize = 512;
/// Every this many releases on a runtime, idle lists of all backends drop their
/// expired connections: an idle connection is polled by nobody, so one to a backend
/// that gets no more requests would otherwise keep its socket until the process ends.
const SWEEP_EVERY: u32 = 1024;
/// How often each worker looks through its idle connections (`sweep_forever`): after
/// a burst and then quiet there are no releases to trigger `SWEEP_EVERY`, and
/// connections the backends closed meanwhile would hold their descriptors in
/// CLOSE-WAIT until the process ends.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connect to {addr}: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("HTTP/1.1 handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// The request's own deadline passed first (no retry can help then).
    #[error("connect to {addr}: request deadline passed")]
    Deadline { addr: SocketAddr },
}

/// Why a request sent on a connection got no response head.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// hyper answers every queued request when its connection ends; this is the
    /// guard should a future version not.
    #[error("connection closed before a response")]
    Closed,
    /// The request's deadline passed before its response head arrived.
    #[error("no response before the request deadline")]
    Deadline,
    /// The connection had ended before the request was written (a pooled
    /// connection the backend closed while it sat idle): here it is back, unsent.
    #[error("connection closed before the request was sent")]
    NotSent(Box<http::Request<UpBody>>),
}

/// What requests to a backend carry: `forward` buffers bodies (to retry them), so a
/// plain `Full` does, without the allocation of a boxed body per request.
pub type UpBody = Full<Bytes>;

type Io = TokioIo<TcpStream>;

/// A context whose wake-ups go nowhere, for futures that only the connection's own
/// progress can complete (its driver is polled with the real one).
pub(crate) fn no_wake() -> Context<'static> {
    Context::from_waker(std::task::Waker::noop())
}

/// hyper's connection state machine, polled by the connection's current user.
/// `SyncWrapper`: the response body it travels in must be `Sync` (`BoxBody`), and it
/// is only ever used through `&mut`.
struct Driver {
    /// Boxed: hyper's connection state is several hundred bytes, and a `Conn` moves
    /// by value per request (idle list, checkout, response body).
    /// None once dropped early (`close`).
    conn: Option<Box<SyncWrapper<Connection<Io, UpBody>>>>,
    /// The connection future returned: it must not be polled again.
    done: bool,
}

impl Driver {
    /// Let the connection write and read what it can. False once it has ended
    /// (closed by either side, or failed).
    fn poll(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut().filter(|_| !self.done) else {
            return false;
        };
        match std::pin::Pin::new(conn.get_mut()).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection ended with error");
                }
                self.done = true;
                false
            }
        }
    }

    /// Drop hyper's connection: requests still queued on it are handed back to their
    /// senders (`SendError::NotSent`).
    fn close(&mut self) {
        self.conn = None;
        self.done = true;
    }
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

/// A connection checked out for one request: the handle requests are sent with and
/// the connection itself, which only makes progress while its user polls it.
pub struct Conn {
    sender: SendRequest<UpBody>,
    driver: Driver,
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
    /// Send `req` and drive the connection until the response head arrives. The
    /// response body arrives only while `poll_drive` is called (`StreamedBody` does).
    /// Fails with `SendError::Deadline` once `deadline` passes.
    pub async fn send(
        &mut self,
        req: http::Request<UpBody>,
        deadline: Instant,
    ) -> Result<http::Response<Incoming>, SendError> {
        let mut response = pin!(self.sender.try_send_request(req));
        let driver = &mut self.driver;
        let timer = &mut self.timer;
        let answer = |r: Result<_, hyper::client::conn::TrySendError<_>>| {
            r.map_err(|mut e| match e.take_message() {
                Some(req) => SendError::NotSent(Box::new(req)),
                None => SendError::Hyper(e.into_error()),
            })
        };
        std::future::poll_fn(|cx| {
            // First the connection (writes the request, reads the head and hands it
            // to `response`), then the answer. Only the connection completes
            // `response`, so asking it registers no wake-up: one would only poll
            // this whole task (the client's connection) again for nothing.
            let open = driver.poll(cx);
            match response.as_mut().poll(&mut no_wake()) {
                Poll::Ready(r) => Poll::Ready(answer(r)),
                Poll::Pending if !open => {
                    // Ended with the request still queued (it read the backend's
                    // close before writing): dropping the connection hands it back.
                    driver.close();
                    match response.as_mut().poll(&mut no_wake()) {
                        Poll::Ready(r) => Poll::Ready(answer(r)),
                        Poll::Pending => Poll::Ready(Err(SendError::Closed)),
                    }
                }
                Poll::Pending if timer_passed(timer, cx, deadline) => {
                    Poll::Ready(Err(SendError::Deadline))
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Whether `deadline` has passed; if not, `cx` is woken when it does.
    pub fn deadline_passed(&mut self, cx: &mut Context<'_>, deadline: Instant) -> bool {
        timer_passed(&mut self.timer, cx, deadline)
    }

    /// Move the connection on (the response body's bytes into its `Incoming`).
    /// False once the connection has ended.
    pub fn poll_drive(&mut self, cx: &mut Context<'_>) -> bool {
        self.driver.poll(cx)
    }

    /// Ready for the next request: the previous exchange is finished on the wire.
    /// Only the connection makes `sender` ready, so that registers no wake-up.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        if !self.driver.poll(cx) {
            return Poll::Ready(false);
        }
        self.sender.poll_ready(&mut no_wake()).map(|r| r.is_ok())
    }

    /// Put the connection back for the next request. Only call once its response
    /// has been read to the end: HTTP/1.1 cannot start the next exchange before.
    pub fn release(self) {
        if self.driver.done || self.sender.is_closed() {
            return;
        }
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

/// Run on each worker thread for its life: every `SWEEP_INTERVAL`, close the idle
/// connections that expired or that their backend closed (`sweep_idle`).
pub async fn sweep_forever() {
    loop {
        tokio::time::sleep(SWEEP_INTERVAL).await;
        sweep_idle(Instant::now());
    }
}

/// Drop the calling runtime's idle connections that expired by `now` or whose
/// backend closed them: polling one reads what arrived while it sat idle (nothing,
/// or the close), without a wake-up (nobody waits on an idle connection).
fn sweep_idle(now: Instant) {
    with_idle(|m| {
        m.by_addr.retain_mut(|(_, list)| {
            list.retain_mut(|i| {
                now < i.expires
                    && !i.conn.sender.is_closed()
                    && !matches!(i.conn.poll_ready(&mut no_wake()), Poll::Ready(false))
            });
            !list.is_empty()
        });
    });
}

/// The most recently used idle connection to `addr` that is still open and ready,
/// else a new one. Dead idle connections are dropped here and cost the request
/// nothing: they never carried it. `now`: when the request started; `deadline`:
/// when it must have its response.
pub async fn checkout(
    addr: SocketAddr,
    connect_timeout: Duration,
    now: Instant,
    deadline: Instant,
) -> Result<Conn, ConnectError> {
    while let Some(mut conn) = pop_idle(addr, now) {
        if conn.sender.is_ready() {
            // Its last exchange is finished (the connection was polled to the end
            // of the body). A close the backend sent meanwhile is read when the
            // request is sent, which then hands it back unsent (`NotSent`) for the
            // next connection: no poll of hyper's whole connection here.
            conn.reused = true;
            conn.started = now;
            return Ok(conn);
        }
        // Polling it reads what the backend sent while it sat idle: nothing, or its
        // close. Usually ready at once; an exchange hyper still finishes takes a poll.
        // First without a wake-up: the request queued next would wake whoever
        // polled the connection last, i.e. this task, for nothing (`send` polls it
        // right after with the real one).
        let first = conn.poll_ready(&mut no_wake());
        let ready = match first {
            Poll::Ready(r) => r,
            Poll::Pending => {
                let waited = std::future::poll_fn(|cx| match conn.poll_ready(cx) {
                    Poll::Ready(r) => Poll::Ready(Ok(r)),
                    Poll::Pending if conn.deadline_passed(cx, deadline) => Poll::Ready(Err(())),
                    Poll::Pending => Poll::Pending,
                });
                match waited.await {
                    Ok(r) => r,
                    Err(()) => return Err(ConnectError::Deadline { addr }),
                }
            }
        };
        if ready {
            conn.reused = true;
            conn.started = now;
            return Ok(conn);
        }
    }
    // Boxed: dialing is rare, and its future would otherwise enlarge (and be copied
    // with) every request's future.
    Box::pin(connect(addr, connect_timeout, now, deadline)).await
}

fn pop_idle(addr: SocketAddr, now: Instant) -> Option<Conn> {
    with_idle(|m| {
        let list = m.list(addr)?;
        while let Some(idle) = list.pop() {
            if !idle.conn.sender.is_closed() && now < idle.expires {
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
    // Flattened writes, as the server side's (see `server::serve_conn`).
    let (sender, conn) = http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Conn {
        sender,
        driver: Driver {
            conn: Some(Box::new(SyncWrapper::new(conn))),
            done: false,
        },
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
mod tests;
