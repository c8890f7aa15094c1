//! The `--metrics` HTTP endpoint (hyper): `GET /metrics` (and `HEAD`) 200, other paths 404, other
//! methods 405.
//!
//! Anyone who can reach the port can connect, so it must not be able to starve the daemon:
//! - at most [`MAX_CONNECTIONS`] connections at a time; beyond that the listener is not accepted
//!   from, so waiting connections sit in the kernel's backlog and hold none of our descriptors;
//! - at most [`MAX_PER_ADDRESS`] of them from one client address; more are closed at once, so one
//!   host's idle connections cannot hold every slot while a scraper elsewhere waits in the backlog.
//!   On loopback every local process can be 127.0.0.1 (or any of 127/8), so there an unprivileged
//!   user's connections count against that user (the socket's owner, from `/proc/net/tcp`), over
//!   all loopback addresses: one local user's idle connections cannot lock the operator out;
//! - a connection is accepted only outside the descriptor reserve ([`limits::outside_reserve`]),
//!   which stays free for health probes and the API socket;
//! - a request head must arrive within [`HEAD_TIMEOUT`] of the connection (or of the previous
//!   response, so idle keep-alive connections close too), and no connection lives longer than
//!   [`MAX_CONNECTION_AGE`].
//!
//! The scrape itself runs in the daemon's control loop: a request sends a [`ScrapeReply`] there
//! and waits for the rendered text.

use std::{
    collections::HashMap,
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, header, server::conn::http1, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot, Semaphore},
};

use crate::limits;

/// Concurrent metrics connections; a Prometheus server needs one.
pub const MAX_CONNECTIONS: usize = 64;
/// Concurrent metrics connections from one client address.
pub const MAX_PER_ADDRESS: usize = 8;
/// Time to send a request head, from the connection's start or the previous response.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Even a busy keep-alive connection is closed after this (it reconnects).
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// Pause before looking at the descriptor reserve again, or after a failed accept.
const BACKOFF: Duration = Duration::from_millis(100);
/// Refusals (reserve reached, accept errors) are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Both ends of the connection a request came on, put in its extensions by [`serve_with`] (the
/// dashboard looks up who owns the client's socket).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionAddrs {
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

/// Asks the control loop for the current exposition text (or why it could not be read).
pub type ScrapeReply = oneshot::Sender<Result<String, String>>;

/// Serves `listener` until the runtime stops; scrapes are answered through `scrapes`.
pub async fn serve(listener: TcpListener, scrapes: mpsc::Sender<ScrapeReply>) {
    serve_with(listener, "metrics", MAX_CONNECTION_AGE, move |request| answer(request, scrapes.clone())).await
}

/// The serving machinery of the metrics endpoint with another handler (the dashboard uses it):
/// the same connection caps, descriptor reserve and head timeout; `max_age` bounds each
/// connection's life (a dashboard's event stream lives longer than a scrape). `what` names the
/// listener in its log lines.
pub async fn serve_with<H, F, B>(listener: TcpListener, what: &'static str, max_age: Duration, handler: H)
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address: Arc<Mutex<HashMap<Client, usize>>> = Arc::default();
    let mut last_log: Option<Instant> = None;
    let mut log_limited = |message: &dyn std::fmt::Display| {
        if last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::warn!("{what} listener: {message}");
            last_log = Some(Instant::now());
        }
    };
    loop {
        // Never closed, so acquiring only waits.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else { return };
        while !limits::outside_reserve() {
            log_limited(&"not accepting: open file descriptors reached the reserve kept for health checks and the API");
            tokio::time::sleep(BACKOFF).await;
        }
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE and friends: retrying at once would spin; the slot is released.
                log_limited(&format_args!("accept failed: {e}"));
                tokio::time::sleep(BACKOFF).await;
                continue;
            }
        };
        let client = Client::of(peer, stream.local_addr().ok());
        let Some(per_address) = PerAddress::claim(&per_address, client) else {
            // Dropped here: closed at once, and the slot is free again for the next in the backlog.
            log_limited(&format_args!("refusing a connection from {client}: it already has {MAX_PER_ADDRESS} open"));
            continue;
        };
        let handler = handler.clone();
        let addrs = stream.local_addr().ok().map(|local| ConnectionAddrs { peer, local });
        tokio::spawn(async move {
            let _per_address = per_address;
            let service = service_fn(move |mut request: Request<Incoming>| {
                if let Some(addrs) = addrs {
                    request.extensions_mut().insert(addrs);
                }
                handler(request)
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            // Errors (timeouts, resets, malformed requests) end only this connection.
            let _ = tokio::time::timeout(max_age, connection).await;
            drop(slot);
        });
    }
}

/// Whom a connection counts against: its address, or on loopback its socket's owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Client {
    Address(IpAddr),
    LocalUser(u32),
}

impl Client {
    fn of(peer: SocketAddr, local: Option<SocketAddr>) -> Client {
        let owner = || crate::dashboard::http::peer::owner_uid(peer, local?);
        match peer.ip().to_canonical().is_loopback().then(owner).flatten() {
            // Root's own clients (the operator's tools) keep the per-address count.
            Some(uid) if uid != 0 => Client::LocalUser(uid),
            _ => Client::Address(peer.ip()),
        }
    }
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Address(ip) => write!(f, "{ip}"),
            Client::LocalUser(uid) => write!(f, "local uid {uid}"),
        }
    }
}

/// One connection counted against its client while it lives.
struct PerAddress {
    counts: Arc<Mutex<HashMap<Client, usize>>>,
    ip: Client,
}

impl PerAddress {
    /// Counts a connection from `ip`, or `None` when it already has [`MAX_PER_ADDRESS`].
    fn claim(counts: &Arc<Mutex<HashMap<Client, usize>>>, ip: Client) -> Option<PerAddress> {
        let mut map = counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(PerAddress { counts: Arc::clone(counts), ip })
    }
}

impl Drop for PerAddress {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

async fn answer(request: Request<Incoming>, scrapes: mpsc::Sender<ScrapeReply>) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.uri().path() != "/metrics" {
        return Ok(plain(StatusCode::NOT_FOUND, "not found: the only path is /metrics\n"));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed: use GET\n");
        response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static("GET, HEAD"));
        return Ok(response);
    }
    let (tx, rx) = oneshot::channel();
    let text = match scrapes.send(tx).await {
        Ok(()) => rx.await.unwrap_or_else(|_| Err("the daemon is shutting down".into())),
        Err(_) => Err("the daemon is shutting down".into()),
    };
    Ok(match text {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
            response
        }
        Err(why) => plain(StatusCode::SERVICE_UNAVAILABLE, &format!("metrics unavailable: {why}\n")),
    })
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(text.to_owned())));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
    };

    use super::*;

    /// A server on loopback whose control loop answers every scrape with `text`.
    async fn start(text: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, mut rx) = mpsc::channel::<ScrapeReply>(4);
        tokio::spawn(serve(listener, tx));
        tokio::spawn(async move {
            while let Some(reply) = rx.recv().await {
                let _ = reply.send(Ok(text.to_string()));
            }
        });
        addr
    }

    async fn exchange(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(request.as_bytes()).await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.expect("answered in time").expect("read");
        out
    }

    #[tokio::test]
    async fn routes_and_methods() {
        let addr = start("xdp_lb_x 1\n").await;
        let ok = exchange(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(ok.starts_with("HTTP/1.1 200 OK"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.ends_with("xdp_lb_x 1\n"), "{ok}");
        let missing = exchange(addr, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let post = exchange(addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await;
        assert!(post.starts_with("HTTP/1.1 405"), "{post}");
        assert!(post.to_ascii_lowercase().contains("allow: get, head"), "{post}");
    }

    async fn connect_from(addr: std::net::SocketAddr, source: [u8; 4]) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind((std::net::Ipv4Addr::from(source), 0).into()).expect("bind a loopback source");
        socket.connect(addr).await.expect("connect")
    }

    /// One address gets MAX_PER_ADDRESS connections; more are closed at once, and another
    /// address is still served.
    #[tokio::test]
    async fn one_address_gets_at_most_its_share() {
        let addr = start("xdp_lb_x 1\n").await;
        let mut held = Vec::new();
        for _ in 0..MAX_PER_ADDRESS {
            held.push(connect_from(addr, [127, 0, 3, 1]).await);
        }
        let mut extra = connect_from(addr, [127, 0, 3, 1]).await;
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(1), extra.read(&mut buf)).await.expect("closed at once, not after the head timeout");
        assert!(matches!(n, Ok(0) | Err(_)), "the extra connection is closed: {n:?}");
        let mut other = connect_from(addr, [127, 0, 3, 2]).await;
        other.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(2), other.read_to_string(&mut out)).await.expect("served promptly").expect("read");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        drop(held);
    }

    #[tokio::test]
    async fn the_cap_holds_and_idle_connections_are_closed() {
        let addr = start("xdp_lb_x 1\n").await;
        let started = Instant::now();
        // As many idle connections as the cap, MAX_PER_ADDRESS from each of several loopback
        // addresses: they take every slot (the backlog is FIFO).
        let mut idle = Vec::new();
        for i in 0..MAX_CONNECTIONS {
            idle.push(connect_from(addr, [127, 0, 1, (i / MAX_PER_ADDRESS) as u8 + 1]).await);
        }
        // One more from yet another address, with a real request: it waits in the backlog, unanswered, …
        let mut late = connect_from(addr, [127, 0, 2, 1]).await;
        late.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut out = String::new();
        let early = tokio::time::timeout(Duration::from_secs(1), late.read_to_string(&mut out)).await;
        assert!(early.is_err(), "answered while every slot was taken: {out}");
        // … until the idle ones time out and free their slots.
        tokio::time::timeout(HEAD_TIMEOUT * 3, late.read_to_string(&mut out)).await.expect("answered in time").expect("read");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        let waited = started.elapsed();
        assert!(waited >= HEAD_TIMEOUT - Duration::from_millis(200), "idle connections closed too early: {waited:?}");
        for (i, s) in idle.iter_mut().enumerate() {
            let mut buf = [0u8; 16];
            let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await.expect("closed in time");
            assert!(matches!(n, Ok(0) | Err(_)), "idle connection {i} closed by the server, not answered: {n:?}");
        }
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let addr = start("xdp_lb_x 1\n").await;
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("answered").expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 OK"), "{}", String::from_utf8_lossy(&buf[..n]));
        let answered = Instant::now();
        // Kept alive, then idle: the server closes it once the next head is overdue.
        let n = tokio::time::timeout(HEAD_TIMEOUT * 3, s.read(&mut buf)).await.expect("closed in time");
        assert!(matches!(n, Ok(0) | Err(_)), "closed, not answered: {n:?}");
        let idle = answered.elapsed();
        assert!(idle >= HEAD_TIMEOUT - Duration::from_millis(200), "closed too early: {idle:?}");
    }

    /// An unprivileged local user's connections count against that user over every loopback
    /// address: holding them cannot lock the operator (root, or another user) out.
    #[tokio::test]
    async fn a_local_user_gets_its_share_over_all_loopback_addresses() {
        let addr = start("xdp_lb_x 1\n").await;
        // As `nobody`: one connection from each of 64 loopback addresses, all held open; prints
        // how many the server closed at once.
        let script = format!(
            "import socket,time\nheld=[]\nfor i in range(64):\n s=socket.socket()\n s.bind(('127.0.9.%d'%(i+1),0))\n s.connect(('127.0.0.1',{}))\n held.append(s)\ntime.sleep(1.5)\nclosed=0\nfor s in held:\n s.setblocking(False)\n try:\n  closed+=s.recv(1)==b''\n except BlockingIOError: pass\n except OSError: closed+=1\nprint(closed,flush=True)\ntime.sleep(3)\n",
            addr.port()
        );
        let mut child = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3", "-c", &script])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("setpriv and python3");
        let stdout = child.stdout.take().expect("stdout");
        let read = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
        });
        let line = tokio::time::timeout(Duration::from_secs(10), read).await.expect("the script reports").expect("join").expect("read");
        let closed: usize = line.trim().parse().expect("a count");
        assert_eq!(closed, 64 - MAX_PER_ADDRESS, "nobody keeps {MAX_PER_ADDRESS} connections in all");
        // While nobody holds its share, root from 127.0.0.1 is served at once.
        let mut root = connect_from(addr, [127, 0, 0, 1]).await;
        root.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.expect("write");
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(2), root.read_to_string(&mut out)).await.expect("served promptly").expect("read");
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        let _ = child.kill();
        let _ = child.wait();
    }
}
