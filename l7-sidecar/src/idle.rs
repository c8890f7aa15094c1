//! Connection-level limits hyper does not give: closing connections that send nothing
//! (hyper's header timeout starts only at a request's first byte, and HTTP/2 has no
//! idle timeout at all) and a cap on connections per client address, so a few silent
//! sockets from one address cannot take every slot of `max_connections`. A leaf
//! module: the server and the pipeline use it, it uses neither.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use crate::smuggle::Smuggled;

/// What the idle watchdog of one connection needs to know.
///
/// Reads and writes only count themselves (`io`): they happen several times per
/// request, and a clock read each cost more than the rest of the bookkeeping. The
/// watchdog, which looks a few times per timeout, notes when it saw the count
/// change, so idleness is measured from the first look after the last byte: at
/// most one watchdog tick later than the byte itself, never earlier.
///
/// On HTTP/2 bytes are no activity (a PING or WINDOW_UPDATE every few seconds
/// would keep a connection without requests open for ever): only requests are, so
/// the watchdog follows the count of requests started instead.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    /// Reads and writes that moved bytes. Written only by the connection's task.
    io: AtomicU64,
    /// `io` at the watchdog's last look, and when (ms since `opened`) it last saw
    /// it change. Written only by the watchdog.
    seen_io: AtomicU64,
    last_io_ms: AtomicU64,
    any_read: AtomicBool,
    /// Requests started (high 32 bits, wrapping) and those whose response has not
    /// been fully sent (low 32 bits): one word, so counting a start costs the one
    /// atomic add the in-flight count needed anyway.
    requests: AtomicU64,
    /// Set when the gateway began to drain: requests the connection starts from then
    /// on are refused, not proxied (`pipeline::GatewayService`).
    draining: AtomicBool,
    /// A response was cut (its upstream body failed): the connection is reset when
    /// it closes, not ended with a FIN that an HTTP/1.0 client takes for the end of
    /// a whole body (`ActivityIo::abortive`).
    abort: AtomicBool,
    /// The tunnel an upgrade (WebSocket) answered with `101` leaves to run once hyper
    /// has handed the connection over (`hand_over_tunnel`).
    tunnel: TunnelSlot,
}

#[derive(Default)]
struct TunnelSlot(Mutex<Option<Tunnel>>);

impl std::fmt::Debug for TunnelSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TunnelSlot")
    }
}

/// What splices an upgraded client connection to its backend, until either side
/// closes (`splice`), and what to tell when the gateway ends it first (`cut`, called
/// just before the splice is dropped unfinished): how it ended is logged and counted.
pub struct Tunnel {
    pub splice: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    pub cut: Box<dyn FnOnce(TunnelCut) + Send>,
    /// Whether one side has shut its sending half (the tunnel goes on the other way):
    /// then a shorter silence ends it (`server.idle_timeout`, if shorter).
    pub half_closed: Box<dyn Fn() -> bool + Send + Sync>,
}

/// Why the gateway itself ended a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TunnelCut {
    /// No byte either way for `server.tunnel_idle_timeout` (for `server.idle_timeout`
    /// once one side has closed, if that is shorter).
    IdleTimeout,
    /// Still open at the drain's limit (`RunningGateway::cut`).
    Drain,
}

/// One request started and in flight, in `Activity::requests`.
const START: u64 = (1 << 32) | 1;
/// The in-flight half of `Activity::requests`.
const IN_FLIGHT: u64 = (1 << 32) - 1;

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            io: AtomicU64::new(0),
            seen_io: AtomicU64::new(0),
            last_io_ms: AtomicU64::new(0),
            any_read: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            abort: AtomicBool::new(false),
            tunnel: TunnelSlot::default(),
        })
    }

    fn touch(&self) {
        // One writer: a plain increment, no locked read-modify-write.
        let n = self.io.load(Ordering::Relaxed);
        self.io.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// Requests whose response has not been fully sent (or dropped).
    pub fn in_flight(&self) -> usize {
        (self.requests.load(Ordering::Relaxed) & IN_FLIGHT) as usize
    }

    /// Requests started and in flight as one value (see `RequestsQuiet`): unchanged
    /// only while none started or ended.
    #[inline]
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// From now on the connection's new requests are refused (the gateway drains).
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Whether requests starting now must be refused (see `set_draining`).
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Counts a request as started, and in flight until the guard (kept by its
    /// response body) drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(START, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// True once the client sent nothing for `first_byte` after connecting, or, with
    /// no request in flight, moved no bytes (on HTTP/2, `h2`: started no request)
    /// for `idle`. Call from one watchdog only: it also notes activity seen since its
    /// last call.
    pub fn expired(&self, now: Instant, first_byte: Duration, idle: Duration, h2: bool) -> bool {
        let since_open = now.saturating_duration_since(self.opened);
        let requests = self.requests.load(Ordering::Relaxed);
        let busy = requests & IN_FLIGHT != 0;
        // The change the watchdog follows; a request in flight counts as one at every
        // look, so idleness starts at the look after it ended at the earliest.
        let mark = if h2 { requests >> 32 } else { self.io.load(Ordering::Relaxed) };
        if busy || mark != self.seen_io.load(Ordering::Relaxed) {
            self.seen_io.store(mark, Ordering::Relaxed);
            let ms = u64::try_from(since_open.as_millis()).unwrap_or(u64::MAX);
            self.last_io_ms.store(ms, Ordering::Relaxed);
        }
        if !self.any_read.load(Ordering::Relaxed) {
            return since_open >= first_byte;
        }
        if busy {
            return false;
        }
        let last = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
        since_open.saturating_sub(last) >= idle
    }
}

impl Activity {
    /// Leave `tunnel` to the connection's own task, which runs it once hyper has
    /// handed the upgraded connection over: the tunnel keeps the connection counted
    /// (limits, drain) and is ended by the drain's cut like any request.
    pub fn hand_over_tunnel(&self, tunnel: Tunnel) {
        *self.tunnel.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(tunnel);
    }

    /// The tunnel handed over, if any (see `hand_over_tunnel`).
    pub fn take_tunnel(&self) -> Option<Tunnel> {
        self.tunnel.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// Reset the connection when it closes (`abort`): also for a client cut at the
    /// request deadline, whose unread response a FIN would leave queued in the
    /// kernel (megabytes per connection) after the gateway stopped counting it.
    pub fn abort_connection(&self) {
        self.abort.store(true, Ordering::Relaxed);
    }
}

pub struct InFlight(Arc<Activity>);

impl InFlight {
    /// Reset this request's connection when it closes (`Activity::abort`).
    pub fn abort_connection(&self) {
        self.0.abort_connection();
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// During a drain: whether a connection has had no request in flight and none
/// started for a while, from `Activity::requests` values sampled now and then.
pub struct RequestsQuiet {
    last: u64,
    since: Instant,
}

impl RequestsQuiet {
    pub fn new(requests: u64, now: Instant) -> Self {
        RequestsQuiet {
            last: requests,
            since: now,
        }
    }

    /// True if `requests` has not changed since `grace` ago and none is in flight.
    pub fn for_at_least(&mut self, requests: u64, now: Instant, grace: Duration) -> bool {
        if requests != self.last || requests & IN_FLIGHT != 0 {
            self.last = requests;
            self.since = now;
            return false;
        }
        now.saturating_duration_since(self.since) >= grace
    }
}

/// Records byte movement on a connection for `Activity`, and notices an HTTP/1
/// client that left while hyper holds pipelined requests of its (`read_ahead`).
pub struct ActivityIo<S> {
    inner: S,
    activity: Arc<Activity>,
    /// The HTTP/1 framing seen so far (`SmuggleGuard`, above this layer): whether
    /// hyper has read a request it has not started yet.
    framing: Arc<Smuggled>,
    /// Bytes read ahead (`read_ahead`), handed out before anything more is read.
    ahead: Vec<u8>,
    ahead_from: usize,
    /// `ahead` holds bytes or the end of the stream was read ahead: reads look there
    /// first (one flag for the usual read to test).
    has_ahead: bool,
    /// The read ahead found the end of the stream (or an error): reads end too.
    eof: bool,
    /// Called on drop if a response was cut (`Activity::abort`): sets SO_LINGER 0,
    /// so closing resets the connection.
    on_abort: Option<fn(&S)>,
}

impl<S> Drop for ActivityIo<S> {
    fn drop(&mut self) {
        if let Some(f) = self.on_abort {
            if self.activity.abort.load(Ordering::Relaxed) {
                f(&self.inner);
            }
        }
    }
}

impl ActivityIo<tokio::net::TcpStream> {
    /// Reset the connection on close after a cut response (see `Activity::abort`).
    #[must_use]
    pub fn abortive(mut self) -> Self {
        self.on_abort = Some(|s| {
            let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
        });
        self
    }
}

/// At most this much is read ahead of hyper, per connection: a client pipelining
/// more than that is not watched for closing beyond it.
const MAX_READ_AHEAD: usize = 64 * 1024;

impl<S> ActivityIo<S> {
    pub fn new(inner: S, activity: Arc<Activity>, framing: Arc<Smuggled>) -> Self {
        ActivityIo {
            inner,
            activity,
            framing,
            ahead: Vec::new(),
            ahead_from: 0,
            has_ahead: false,
            eof: false,
            on_abort: None,
        }
    }

    /// Whether hyper holds (part of) an HTTP/1 request it has not started while one
    /// is in flight. hyper notices a client's close while a request is in flight only
    /// by reading, and it does not read while its buffer has bytes: with pipelined
    /// requests buffered, a client that left went unnoticed until the answer was
    /// written to the closed socket, and the next request was sent upstream
    /// (hostile r3b, finding 2). Cheap: a few atomic loads per flush.
    #[inline]
    fn hyper_holds_a_request(&self) -> bool {
        // Started requests (high half of `requests`, wrapping 32 bits) and heads seen:
        // on HTTP/2 the guard sees no heads, so the difference is negative.
        let requests = self.activity.requests();
        let started = (requests >> 32) as u32;
        let unstarted = (self.framing.heads() as u32).wrapping_sub(started) as i32;
        (unstarted > 0 || self.framing.head_in_progress().is_some()) && requests & IN_FLIGHT != 0
    }
}

impl<S: AsyncRead + Unpin> ActivityIo<S> {
    /// Read what the client sent beyond what hyper took, keeping it for hyper's next
    /// reads, to see the connection's end: `Ready(error)` once the client closed (or
    /// the connection failed), which ends the connection through hyper (its requests
    /// in flight are dropped, each logged 499, and the buffered ones never start).
    /// `Pending` otherwise, with the task woken when more arrives.
    #[cold]
    #[inline(never)]
    fn read_ahead(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        while !self.eof && self.ahead.len() < MAX_READ_AHEAD {
            let len = self.ahead.len();
            self.ahead.resize(len + 4096, 0);
            let mut rb = ReadBuf::new(&mut self.ahead[len..]);
            let r = Pin::new(&mut self.inner).poll_read(cx, &mut rb);
            let n = rb.filled().len();
            self.ahead.truncate(len + n);
            match r {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) if n > 0 => {
                    self.activity.touch();
                    self.has_ahead = true;
                }
                Poll::Ready(Ok(())) => {
                    self.eof = true;
                    self.has_ahead = true;
                    return Poll::Ready(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the client closed the connection with requests in flight",
                    ));
                }
                Poll::Ready(Err(e)) => {
                    self.eof = true;
                    self.has_ahead = true;
                    return Poll::Ready(e);
                }
            }
        }
        Poll::Pending
    }

    /// Hand out what `read_ahead` kept: bytes, then the end of the stream.
    #[cold]
    #[inline(never)]
    fn read_from_ahead(&mut self, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let rest = &self.ahead[self.ahead_from..];
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.ahead_from += n;
        if self.ahead_from == self.ahead.len() {
            self.ahead = Vec::new();
            self.ahead_from = 0;
            self.has_ahead = self.eof;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.has_ahead {
            return self.read_from_ahead(buf);
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            if !self.activity.any_read.load(Ordering::Relaxed) {
                self.activity.any_read.store(true, Ordering::Relaxed);
            }
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ActivityIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    /// hyper flushes at every turn of its HTTP/1 loop, also while it waits for an
    /// answer without reading: the place to watch for the client's close when hyper
    /// cannot (`hyper_holds_a_request`).
    #[inline]
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if self.hyper_holds_a_request() {
            if let Poll::Ready(gone) = self.read_ahead(cx) {
                return Poll::Ready(Err(gone));
            }
        }
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The key per-address limits (connections here, failed logins in `auth`) count a
/// client under: its address, or for IPv6 its /64 (one host usually holds a whole /64).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        v4 => v4,
    }
}

/// Open connections per client address (IPv6 per /64, see `address_key`).
#[derive(Default)]
pub struct PerAddress {
    open: Mutex<HashMap<IpAddr, usize>>,
}

pub struct AddressPermit {
    table: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    /// A permit for one more connection from `ip`, or None if it has `cap` already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr, cap: usize) -> Option<AddressPermit> {
        let key = address_key(ip);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(key).or_insert(0);
        if *n >= cap {
            return None;
        }
        *n += 1;
        Some(AddressPermit {
            table: self.clone(),
            key,
        })
    }
}

impl Drop for AddressPermit {
    fn drop(&mut self) {
        let mut open = self.table.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_address_cap_and_release() {
        let t = Arc::new(PerAddress::default());
        let ip: IpAddr = "192.0.2.9".parse().expect("ip");
        let a = t.try_acquire(ip, 2).expect("first");
        let _b = t.try_acquire(ip, 2).expect("second");
        assert!(t.try_acquire(ip, 2).is_none(), "third refused");
        assert!(t
            .try_acquire("192.0.2.10".parse().expect("ip"), 2)
            .is_some());
        drop(a);
        assert!(t.try_acquire(ip, 2).is_some(), "released");
    }

    impl Activity {
        fn expired_h1(&self, now: Instant, first_byte: Duration, idle: Duration) -> bool {
            self.expired(now, first_byte, idle, false)
        }
    }

    /// HTTP/2: bytes are no activity, started requests are; idleness starts after
    /// the last request ended, however long it was in flight.
    #[test]
    fn http2_expiry_follows_requests_not_bytes() {
        let a = Activity::new();
        let s = Duration::from_secs(1);
        let at = |ms: u64| Instant::now() + Duration::from_millis(ms);
        a.any_read.store(true, Ordering::Relaxed);
        a.touch();
        assert!(!a.expired(at(500), s, s, true));
        a.touch();
        assert!(a.expired(at(1100), s, s, true), "bytes alone: idle");
        let req = a.start_request();
        assert!(!a.expired(at(1200), s, s, true), "request in flight");
        assert!(!a.expired(at(5000), s, s, true), "still in flight");
        drop(req);
        assert!(!a.expired(at(5500), s, s, true), "ended less than a timeout ago");
        assert!(a.expired(at(6100), s, s, true), "a timeout after it ended");
        // One started and ended between two looks counts too.
        drop(a.start_request());
        assert!(!a.expired(at(6200), s, s, true));
        assert!(!a.expired(at(7100), s, s, true));
        assert!(a.expired(at(7300), s, s, true));
    }

    #[test]
    fn requests_quiet_after_grace_with_none_in_flight() {
        let a = Activity::new();
        let g = Duration::from_millis(500);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut q = RequestsQuiet::new(a.requests(), t0);
        let req = a.start_request();
        assert_eq!(a.in_flight(), 1);
        assert!(!q.for_at_least(a.requests(), at(100), g));
        assert!(!q.for_at_least(a.requests(), at(900), g), "in flight");
        drop(req);
        assert_eq!(a.in_flight(), 0);
        assert!(!q.for_at_least(a.requests(), at(1000), g), "just ended");
        assert!(!q.for_at_least(a.requests(), at(1400), g));
        assert!(q.for_at_least(a.requests(), at(1500), g), "quiet for the grace");
        drop(a.start_request());
        assert!(!q.for_at_least(a.requests(), at(1600), g), "a new one started");
    }

    #[test]
    fn expiry_rules() {
        let a = Activity::new();
        let s = Duration::from_secs(1);
        let at = |ms: u64| Instant::now() + Duration::from_millis(ms);
        assert!(!a.expired_h1(at(0), s, s));
        assert!(a.expired_h1(at(1500), s, s), "no first byte");
        a.any_read.store(true, Ordering::Relaxed);
        a.touch();
        let req = a.start_request();
        assert!(!a.expired_h1(at(5000), s, s), "request in flight");
        drop(req);
        // The watchdog saw the bytes at 5000 (its last look): idle from there on.
        assert!(!a.expired_h1(at(5500), s, s), "not a whole timeout since seen");
        assert!(a.expired_h1(at(6100), s, s), "idle after the response");
        a.touch();
        assert!(!a.expired_h1(at(6200), s, s), "bytes again: not idle");
        assert!(!a.expired_h1(at(7000), s, s));
        assert!(a.expired_h1(at(7300), s, s), "idle a timeout after they were seen");
    }
}
