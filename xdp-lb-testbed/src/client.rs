//! Clients for the identity servers. A socket belongs to the namespace of the thread that creates it,
//! so call these inside `topology.client().run(|| ...)`; a connected [`KeepAliveClient`] may then be
//! used from any thread.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

const TIMEOUT: Duration = Duration::from_secs(2);
const UDP_TIMEOUT: Duration = Duration::from_millis(700);
const UDP_TRIES: usize = 4;
/// Identity bodies are tiny; anything bigger means we are talking to something else.
const MAX_BODY: usize = 64 * 1024;

/// One `GET /` on a new connection (`Connection: close`); returns the body.
pub fn http_get(addr: SocketAddr) -> io::Result<String> {
    let stream = connect(addr)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    writer.write_all(request(addr, true).as_bytes())?;
    read_response(&mut reader).map_err(|e| context(e, addr))
}

/// [`http_get`] that also says which local address (the client's half of the 5-tuple) it used:
/// `None` if the connection was never established.
pub fn http_get_traced(addr: SocketAddr) -> (Option<SocketAddr>, io::Result<String>) {
    let stream = match connect(addr) {
        Ok(s) => s,
        Err(e) => return (None, Err(e)),
    };
    let local = stream.local_addr().ok();
    let result = (|| {
        let mut writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        writer.write_all(request(addr, true).as_bytes())?;
        read_response(&mut reader).map_err(|e| context(e, addr))
    })();
    (local, result)
}

/// Many requests over one TCP connection.
pub struct KeepAliveClient {
    addr: SocketAddr,
    writer: TcpStream,
    reader: BufReader<TcpStream>,
    sent: u64,
}

impl KeepAliveClient {
    pub fn connect(addr: SocketAddr) -> io::Result<KeepAliveClient> {
        let stream = connect(addr)?;
        let writer = stream.try_clone()?;
        Ok(KeepAliveClient { addr, writer, reader: BufReader::new(stream), sent: 0 })
    }

    /// One request/response round trip; returns the body.
    pub fn get(&mut self) -> io::Result<String> {
        self.sent += 1;
        let n = self.sent;
        self.writer.write_all(request(self.addr, false).as_bytes()).map_err(|e| round_trip(e, self.addr, n))?;
        read_response(&mut self.reader).map_err(|e| round_trip(e, self.addr, n))
    }

    /// `n` round trips; stops at the first failure.
    pub fn get_many(&mut self, n: usize) -> io::Result<Vec<String>> {
        (0..n).map(|_| self.get()).collect()
    }

    /// The local (client) address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }
}

/// Sends one datagram to `addr` and returns the answer, retrying a few times on timeout.
pub fn udp_request(addr: SocketAddr) -> io::Result<String> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)?;
    socket.connect(addr)?;
    socket.set_read_timeout(Some(UDP_TIMEOUT))?;
    let mut buf = [0u8; 2048];
    let mut last = io::Error::new(io::ErrorKind::TimedOut, "no attempt");
    for _ in 0..UDP_TRIES {
        socket.send(b"who are you?")?;
        match socket.recv(&mut buf) {
            Ok(n) => return Ok(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(e) => last = e,
        }
    }
    Err(io::Error::new(last.kind(), format!("UDP {addr}: no answer after {UDP_TRIES} tries: {last}")))
}

fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| context(e, addr))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn request(addr: SocketAddr, close: bool) -> String {
    let connection = if close { "close" } else { "keep-alive" };
    format!("GET / HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: xdp-lb-testbed\r\nConnection: {connection}\r\n\r\n")
}

fn read_response(reader: &mut BufReader<TcpStream>) -> io::Result<String> {
    let mut status = String::new();
    if reader.read_line(&mut status)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a response"));
    }
    if !status.starts_with("HTTP/1.1 200") {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected status line {status:?}")));
    }
    let mut length = None;
    for _ in 0..100 {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside the headers"));
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let length = length
        .filter(|&n| n <= MAX_BODY)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "missing or huge Content-Length"))?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn context(e: io::Error, addr: SocketAddr) -> io::Error {
    io::Error::new(e.kind(), format!("HTTP {addr}: {e}"))
}

fn round_trip(e: io::Error, addr: SocketAddr, n: u64) -> io::Error {
    io::Error::new(e.kind(), format!("HTTP {addr}, keep-alive round trip #{n}: {e}"))
}
