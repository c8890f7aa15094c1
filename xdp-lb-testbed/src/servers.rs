//! Identity servers: every answer is the server's name (`backend-<i>`), so a client can tell which
//! backend the balancer picked. They count what they served so tests can compare with the client side.

use std::{
    collections::BTreeSet,
    io::{self, BufRead, BufReader, Write},
    net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{netns::Netns, topology::Topology};

/// How often blocked calls come back to look at the stop flag.
const POLL: Duration = Duration::from_millis(50);
/// No server thread outlives this, even if nobody stops it.
const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);
/// A keep-alive connection idle this long is closed.
const IDLE_LIMIT: Duration = Duration::from_secs(60);
const MAX_REQUESTS_PER_CONNECTION: u64 = 1_000_000;

/// HTTP/1.1 server answering every request with its body; keep-alive unless the client asks to close.
pub struct HttpServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    peers: Arc<Mutex<BTreeSet<IpAddr>>>,
    locals: Arc<Mutex<BTreeSet<IpAddr>>>,
    accept: Option<JoinHandle<()>>,
    addr: SocketAddr,
}

impl HttpServer {
    /// Listens on `addr` inside `ns`; `[::]:port` serves both families.
    pub fn start(ns: &Netns, addr: SocketAddr, body: &str) -> anyhow::Result<HttpServer> {
        let listener =
            ns.run(|| TcpListener::bind(addr)).with_context(|| format!("binding HTTP {addr} in {}", ns.name()))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let peers = Arc::new(Mutex::new(BTreeSet::new()));
        let locals = Arc::new(Mutex::new(BTreeSet::new()));
        let seen = Seen { peers: peers.clone(), locals: locals.clone() };
        let (s, c, b) = (stop.clone(), served.clone(), body.to_string());
        // The listener already lives in the namespace; the thread only needs to be a thread.
        let accept = std::thread::Builder::new()
            .name(format!("http-{body}"))
            .spawn(move || accept_loop(listener, s, c, seen, b))?;
        Ok(HttpServer { stop, served, peers, locals, accept: Some(accept), addr })
    }

    /// The distinct client addresses that connected (IPv4-mapped ones as IPv4): with NAT or DSR the
    /// backend must see the real client, not the balancer.
    pub fn peers(&self) -> BTreeSet<IpAddr> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The distinct local addresses clients connected to: a backend behind NAT is addressed by its own
    /// address, one behind direct server return by the VIP.
    pub fn locals(&self) -> BTreeSet<IpAddr> {
        self.locals.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Requests answered so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.accept.take() {
            let _ = handle.join();
        }
    }
}

fn accept_loop(listener: TcpListener, stop: Arc<AtomicBool>, served: Arc<AtomicU64>, seen: Seen, body: String) {
    let started = Instant::now();
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
        match listener.accept() {
            Ok((stream, peer)) => {
                let (s, c, b, seen) = (stop.clone(), served.clone(), body.clone(), seen.clone());
                if let Ok(handle) = std::thread::Builder::new().name(format!("conn-{body}")).spawn(move || {
                    // Errors are the client's business (resets, timeouts): just close.
                    let _ = serve_connection(stream, peer, &seen, &s, &c, &b);
                }) {
                    connections.push(handle);
                }
                connections.retain(|h| !h.is_finished());
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wait_readable(&listener),
            Err(_) => std::thread::sleep(POLL),
        }
    }
    for handle in connections {
        let _ = handle.join();
    }
}

/// Who sent requests to an HTTP server, and on which of its addresses. Connections that send no
/// request (the balancer's TCP health checks) are not counted.
#[derive(Clone)]
struct Seen {
    peers: Arc<Mutex<BTreeSet<IpAddr>>>,
    locals: Arc<Mutex<BTreeSet<IpAddr>>>,
}

impl Seen {
    fn record(&self, stream: &TcpStream, peer: SocketAddr) {
        self.peers.lock().unwrap_or_else(|p| p.into_inner()).insert(peer.ip().to_canonical());
        if let Ok(local) = stream.local_addr() {
            self.locals.lock().unwrap_or_else(|p| p.into_inner()).insert(local.ip().to_canonical());
        }
    }
}

fn wait_readable(listener: &TcpListener) {
    let mut fd = libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut fd, 1, POLL.as_millis() as i32) };
}

fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    seen: &Seen,
    stop: &AtomicBool,
    served: &AtomicU64,
    body: &str,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    for i in 0..MAX_REQUESTS_PER_CONNECTION {
        let Some(close) = read_head(&mut reader, stop)?.map(|head| asks_to_close(&head)) else { return Ok(()) };
        if i == 0 {
            seen.record(&writer, peer);
        }
        let connection = if close { "close" } else { "keep-alive" };
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        // Counted before the answer leaves, so a client holding the answer always sees it counted.
        served.fetch_add(1, Ordering::Relaxed);
        writer.write_all(response.as_bytes())?;
        if close {
            return Ok(());
        }
    }
    Ok(())
}

/// Longest request head read; a longer one ends the connection.
const MAX_HEAD: usize = 16 * 1024;

/// Reads one request head (requests carry no body here). `None` when the client closed, went idle,
/// sent more than [`MAX_HEAD`] or the server stops. Shared by the demo's services.
pub fn read_head(reader: &mut BufReader<TcpStream>, stop: &AtomicBool) -> io::Result<Option<String>> {
    let idle_since = Instant::now();
    let mut head = String::new();
    loop {
        if stop.load(Ordering::Relaxed) || idle_since.elapsed() > IDLE_LIMIT || head.len() > MAX_HEAD {
            return Ok(None);
        }
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(None),
            Ok(_) => {
                // A timeout mid-line leaves the partial line in `line`: keep it, so nothing is lost.
                head.push_str(&line);
                if head.ends_with("\r\n\r\n") || head == "\r\n" {
                    return Ok(Some(head));
                }
            }
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                head.push_str(&line);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether the request head asks to close the connection.
fn asks_to_close(head: &str) -> bool {
    head.lines()
        .any(|l| l.to_ascii_lowercase().starts_with("connection:") && l.to_ascii_lowercase().contains("close"))
}

/// UDP server answering every datagram with its body, from the address the datagram was sent to: it
/// binds one socket per address, because a wildcard socket would answer a VIP (direct server return)
/// from the backend's own address.
pub struct UdpServer {
    stop: Arc<AtomicBool>,
    served: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
}

impl UdpServer {
    pub fn start(ns: &Netns, addrs: &[SocketAddr], body: &str) -> anyhow::Result<UdpServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicU64::new(0));
        let mut server = UdpServer { stop: stop.clone(), served: served.clone(), threads: Vec::new() };
        for &addr in addrs {
            let socket =
                ns.run(|| UdpSocket::bind(addr)).with_context(|| format!("binding UDP {addr} in {}", ns.name()))?;
            socket.set_read_timeout(Some(POLL))?;
            let (s, c, b) = (stop.clone(), served.clone(), body.to_string());
            let handle =
                std::thread::Builder::new().name(format!("udp-{body}")).spawn(move || udp_loop(socket, &s, &c, &b))?;
            server.threads.push(handle);
        }
        Ok(server)
    }

    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for handle in self.threads.drain(..) {
            let _ = handle.join();
        }
    }
}

fn udp_loop(socket: UdpSocket, stop: &AtomicBool, served: &AtomicU64, body: &str) {
    let started = Instant::now();
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) && started.elapsed() < MAX_LIFETIME {
        if let Ok((_, from)) = socket.recv_from(&mut buf) {
            // Counted before the answer leaves, as for HTTP.
            served.fetch_add(1, Ordering::Relaxed);
            let _ = socket.send_to(body.as_bytes(), from);
        }
    }
}

/// The HTTP and UDP identity servers of one backend namespace.
pub struct IdentityServers {
    pub index: usize,
    pub http: HttpServer,
    pub udp: UdpServer,
}

impl IdentityServers {
    /// The body backend `index` answers with.
    pub fn body(index: usize) -> String {
        format!("backend-{index}")
    }

    /// Starts both servers in backend `index` of `topo`: HTTP on `[::]:http_port`, UDP on
    /// `udp_port` of the backend's own addresses and of the VIPs (both families).
    pub fn start(topo: &Topology, index: usize, http_port: u16, udp_port: u16) -> anyhow::Result<IdentityServers> {
        let ns = topo.backend(index);
        let body = Self::body(index);
        let http = HttpServer::start(ns, SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), http_port), &body)?;
        let udp_addrs = [
            SocketAddr::new(topo.backend_addr_v4(index).into(), udp_port),
            SocketAddr::new(topo.backend_addr_v6(index).into(), udp_port),
            SocketAddr::new(topo.vip_v4().into(), udp_port),
            SocketAddr::new(topo.vip_v6().into(), udp_port),
        ];
        let udp = UdpServer::start(ns, &udp_addrs, &body)?;
        Ok(IdentityServers { index, http, udp })
    }

    /// Identity servers on every backend of `topo`.
    pub fn start_all(topo: &Topology, http_port: u16, udp_port: u16) -> anyhow::Result<Vec<IdentityServers>> {
        (0..topo.backend_count()).map(|i| Self::start(topo, i, http_port, udp_port)).collect()
    }

    /// HTTP requests plus UDP datagrams served.
    pub fn served(&self) -> u64 {
        self.http.served() + self.udp.served()
    }
}
