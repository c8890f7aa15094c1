//! Upstream HTTP/1.1 keep-alive connections, kept per runtime.
//!
//! hyper-util's pooled client shares one locked pool between threads and spawns a
//! task per request to hand the connection back when it is ready again; at ~10 µs
//! per request that was the largest user-space cost of proxying. Here a connection
//! goes back to the idle list when the response body has been read to its end (see
//! `StreamedBody`), without a task. On a single-threaded runtime (each of the
//! binary's workers) the idle list is the thread's own (a `thread_local!`: no lock,
//! and a connection is only ever driven and used by the thread that opened it). On a
//! multi-threaded runtime, whose tasks move between threads, per-thread lists would
//! leave connections idle on one thread while another opens new ones, so those share
//! one locked list. Keyed by the backend's resolved `SocketAddr`, so pools and config
//! generations that name the same backend share its connections.

use bytes::Bytes;
use http_body_util::Full;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// Idle connections older than this are closed rather than reused: a backend's own
/// keep-alive timeout is usually longer (nginx 75 s, Go 90 s), so reuse rarely races it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Per backend and worker thread; more than the concurrency to one backend is waste.
pub const MAX_IDLE_PER_BACKEND: usize = 512;

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
}

/// What requests to a backend carry: `forward` buffers bodies (to retry them), so a
/// plain `Full` does, without the allocation of a boxed body per request.
pub type UpBody = Full<Bytes>;

struct Idle {
    sender: SendRequest<UpBody>,
    since: Instant,
}

/// Connections opened to backends since start, all threads (diagnostics, tests).
static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many upstream connections have been opened since the process started.
pub fn opened() -> u64 {
    OPENED.load(std::sync::atomic::Ordering::Relaxed)
}

type IdleMap = HashMap<SocketAddr, Vec<Idle>>;

thread_local! {
    /// The idle list of the single-threaded runtime running on this thread.
    static LOCAL: RefCell<IdleMap> = RefCell::new(HashMap::new());
}

/// The idle list of multi-threaded runtimes (and of drops outside any runtime).
static SHARED: LazyLock<Mutex<IdleMap>> = LazyLock::new(Mutex::default);

/// Run `f` on the idle list that belongs to the calling runtime.
fn with_idle<R>(f: impl FnOnce(&mut IdleMap) -> R) -> R {
    let single = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
    if single {
        LOCAL.with(|m| f(&mut m.borrow_mut()))
    } else {
        f(&mut SHARED.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// A connection checked out for one request.
pub struct Conn {
    pub sender: SendRequest<UpBody>,
    pub addr: SocketAddr,
    /// Taken from the idle list (it may have died since; see `forward`).
    pub reused: bool,
}

impl Conn {
    /// Put the connection back for the next request. Only call once its response
    /// has been read to the end: HTTP/1.1 cannot start the next exchange before.
    pub fn release(self) {
        if self.sender.is_closed() {
            return;
        }
        with_idle(|m| {
            let list = m.entry(self.addr).or_default();
            if list.len() >= MAX_IDLE_PER_BACKEND {
                // The oldest is the most likely to be closed by the backend soon.
                list.remove(0);
            }
            list.push(Idle {
                sender: self.sender,
                since: Instant::now(),
            });
        });
    }
}

/// The most recently used idle connection to `addr` that is still open and ready,
/// else a new one. Dead idle connections are dropped here and cost the request
/// nothing: they never carried it.
pub async fn checkout(addr: SocketAddr, connect_timeout: Duration) -> Result<Conn, ConnectError> {
    while let Some(mut sender) = pop_idle(addr) {
        // Usually ready at once; right after a response the connection task may
        // still be finishing it. An error means the backend closed it meanwhile.
        if sender.ready().await.is_ok() {
            return Ok(Conn {
                sender,
                addr,
                reused: true,
            });
        }
    }
    // Boxed: dialing is rare, and its future would otherwise enlarge (and be copied
    // with) every request's future.
    Box::pin(connect(addr, connect_timeout)).await
}

fn pop_idle(addr: SocketAddr) -> Option<SendRequest<UpBody>> {
    with_idle(|m| {
        let list = m.get_mut(&addr)?;
        let now = Instant::now();
        while let Some(idle) = list.pop() {
            if !idle.sender.is_closed() && now.duration_since(idle.since) < IDLE_TIMEOUT {
                return Some(idle.sender);
            }
        }
        None
    })
}

async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Conn, ConnectError> {
    let stream = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
        Err(_) => return Err(ConnectError::Timeout { addr, timeout }),
    };
    // Requests and responses are small writes: do not let Nagle hold them back.
    stream
        .set_nodelay(true)
        .map_err(|source| ConnectError::Io { addr, source })?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|source| ConnectError::Handshake { addr, source })?;
    OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Spawned on this worker's runtime, next to the requests that use it.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "upstream connection ended with error");
        }
    });
    Ok(Conn {
        sender,
        addr,
        reused: false,
    })
}

/// Idle connections the calling runtime holds to `addr` (for tests and diagnostics).
pub fn idle_count(addr: SocketAddr) -> usize {
    with_idle(|m| m.get(&addr).map_or(0, Vec::len))
}

#[cfg(test)]
mod tests;
