//! Connection-level limits hyper does not give: closing connections that send nothing
//! (hyper's header timeout starts only at a request's first byte, and HTTP/2 has no
//! idle timeout at all) and a cap on connections per client address, so a few silent
//! sockets from one address cannot take every slot of `max_connections`. A leaf
//! module: the server and the pipeline use it, it uses neither.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// What the idle watchdog of one connection needs to know.
///
/// Reads and writes only count themselves (`io`): they happen several times per
/// request, and a clock read each cost more than the rest of the bookkeeping. The
/// watchdog, which looks a few times per timeout, notes when it saw the count
/// change, so idleness is measured from the first look after the last byte: at
/// most one watchdog tick later than the byte itself, never earlier.
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
    /// Requests whose response has not been fully sent.
    in_flight: AtomicUsize,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            io: AtomicU64::new(0),
            seen_io: AtomicU64::new(0),
            last_io_ms: AtomicU64::new(0),
            any_read: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
        })
    }

    fn touch(&self) {
        // One writer: a plain increment, no locked read-modify-write.
        let n = self.io.load(Ordering::Relaxed);
        self.io.store(n.wrapping_add(1), Ordering::Relaxed);
    }

    /// Requests whose response has not been fully sent (or dropped).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Counts a request as in flight until the guard (kept by its response body) drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// True once the client sent nothing for `first_byte` after connecting, or, with
    /// no request in flight, moved no bytes for `idle`.
    /// Call from one watchdog only: it also notes activity seen since its last call.
    pub fn expired(&self, now: Instant, first_byte: Duration, idle: Duration) -> bool {
        let since_open = now.saturating_duration_since(self.opened);
        let io = self.io.load(Ordering::Relaxed);
        if io != self.seen_io.load(Ordering::Relaxed) {
            self.seen_io.store(io, Ordering::Relaxed);
            let ms = u64::try_from(since_open.as_millis()).unwrap_or(u64::MAX);
            self.last_io_ms.store(ms, Ordering::Relaxed);
        }
        if !self.any_read.load(Ordering::Relaxed) {
            return since_open >= first_byte;
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return false;
        }
        let last = Duration::from_millis(self.last_io_ms.load(Ordering::Relaxed));
        since_open.saturating_sub(last) >= idle
    }
}

pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Records byte movement on a connection for `Activity`.
pub struct ActivityIo<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> ActivityIo<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        ActivityIo { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ActivityIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for ActivityIo<S> {
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
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
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

    #[test]
    fn expiry_rules() {
        let a = Activity::new();
        let s = Duration::from_secs(1);
        let at = |ms: u64| Instant::now() + Duration::from_millis(ms);
        assert!(!a.expired(at(0), s, s));
        assert!(a.expired(at(1500), s, s), "no first byte");
        a.any_read.store(true, Ordering::Relaxed);
        a.touch();
        let req = a.start_request();
        assert!(!a.expired(at(5000), s, s), "request in flight");
        drop(req);
        // The watchdog saw the bytes at 5000 (its last look): idle from there on.
        assert!(!a.expired(at(5500), s, s), "not a whole timeout since seen");
        assert!(a.expired(at(6100), s, s), "idle after the response");
        a.touch();
        assert!(!a.expired(at(6200), s, s), "bytes again: not idle");
        assert!(!a.expired(at(7000), s, s));
        assert!(a.expired(at(7300), s, s), "idle a timeout after they were seen");
    }
}
