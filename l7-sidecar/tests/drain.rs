//! Graceful shutdown against clients that keep asking (hostile test r3b, finding 1)
//! and an HTTP/1 client that closes with pipelined requests still queued (finding 2):
//! nothing started after the drain began, or after the client left, reaches an
//! upstream, and the drain ends within its grace.
mod common;

use common::*;
use l7_sidecar::observe::AccessRecord;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::broadcast;

fn cfg(up: SocketAddr) -> String {
    format!(
        "[server]\nidle_timeout_ms = 30000\nheader_read_timeout_ms = 30000\nfirst_byte_timeout_ms = 30000\n{}[pools.t]\nbackends = [{{ address = \"{up}\" }}]\n[[routes]]\nname = \"t\"\npath = \"/\"\npool = \"t\"\n",
        listener("public")
    )
}

/// Every record that arrives within `wait`.
async fn records(log: &mut broadcast::Receiver<AccessRecord>, wait: Duration) -> Vec<AccessRecord> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(r)) = tokio::time::timeout_at(deadline, log.recv()).await {
        got.push(r);
    }
    got
}

/// One HTTP/2 frame as the server sent it.
#[derive(Debug)]
struct Frame {
    kind: u8,
    stream: u32,
    payload: Vec<u8>,
}

fn frames(mut bytes: &[u8]) -> Vec<Frame> {
    let mut out = Vec::new();
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes.len() < 9 + len {
            break;
        }
        out.push(Frame {
            kind: bytes[3],
            stream: u32::from_be_bytes([bytes[5], bytes[6], bytes[7], bytes[8]]) & 0x7fff_ffff,
            payload: bytes[9..9 + len].to_vec(),
        });
        bytes = &bytes[9 + len..];
    }
    out
}

/// An h2c connection past its handshake; PINGs the server sends are never ACKed. The
/// reader task returns when the connection ended and everything the server sent.
async fn h2c(
    addr: SocketAddr,
) -> (
    tokio::net::tcp::OwnedWriteHalf,
    tokio::task::JoinHandle<(Instant, Vec<u8>)>,
) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("server SETTINGS in time")
        .expect("read");
    assert!(n >= 9 && buf[3] == 0x04, "a SETTINGS frame first");
    s.write_all(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00").await.expect("ack");
    let (mut rd, wr) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(Duration::from_secs(20), rd.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => return (Instant::now(), got),
            }
        }
    });
    (wr, reader)
}

/// HEADERS (END_STREAM | END_HEADERS) on stream `id`: GET http://x/delay/50, HPACK
/// literals without indexing.
fn get_frame(id: u32) -> Vec<u8> {
    let block: &[u8] = b"\x82\x86\x04\x09/delay/50\x01\x01x";
    let mut f = vec![0, 0, block.len() as u8, 1, 5];
    f.extend_from_slice(&id.to_be_bytes());
    f.extend_from_slice(block);
    f
}

/// Finding 1: an HTTP/2 client that never ACKs the shutdown PING and opens a stream
/// every 300 ms after the drain began gets each refused (RST_STREAM REFUSED_STREAM,
/// safe to retry elsewhere), none reaches the upstream, each is logged and counted
/// (503, reason `draining`), and they do not extend the grace: the connection closes
/// and the drain ends within about a second. Before, every stream was proxied and
/// the drain lasted until its limit.
#[tokio::test]
async fn http2_streams_opened_during_a_drain_are_refused_and_do_not_hold_it() {
    let up = upstream("u").await;
    let gw = start_gateway(&cfg(up.addr)).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let (mut wr, reader) = h2c(addr).await;
    // One request before the drain is served normally.
    wr.write_all(&get_frame(1)).await.expect("request");
    eventually(Duration::from_secs(3), "first request reached the upstream", || up.hits() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sender = tokio::spawn(async move {
        // Bounded: 20 streams, 6 s.
        let mut sent = 0u32;
        for i in 1u32..=20 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if wr.write_all(&get_frame(2 * i + 1)).await.is_err() {
                break;
            }
            sent += 1;
        }
        sent
    });
    let started = Instant::now();
    assert!(gw.drain(Duration::from_secs(8)).await, "drained");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(2500), "the drain took {took:?}");
    let (closed_at, got) = tokio::time::timeout(Duration::from_secs(3), reader)
        .await
        .expect("connection closed")
        .expect("reader");
    assert!(closed_at.duration_since(started) < Duration::from_millis(2500));
    let sent = sender.await.expect("sender");
    assert!(sent >= 2, "streams were opened during the drain: {sent}");
    assert_eq!(up.hits(), 1, "nothing started after the drain began was proxied");
    let refused: Vec<u32> = frames(&got)
        .iter()
        .filter(|f| f.kind == 3 && f.payload == [0, 0, 0, 7])
        .map(|f| f.stream)
        .collect();
    assert!(!refused.is_empty(), "streams refused with REFUSED_STREAM: {:?}", frames(&got));
    assert!(!refused.contains(&1), "the stream before the drain was answered");
    let recs = records(&mut log, Duration::from_millis(300)).await;
    let drained: Vec<_> = recs.iter().filter(|r| r.status == 503).collect();
    assert_eq!(drained.len(), refused.len(), "one line per refused stream: {recs:?}");
    assert!(drained.iter().all(|r| r.reason == Some("draining") && r.path == "/delay/50"), "{drained:?}");
    assert_eq!(recs.iter().filter(|r| r.status == 200).count(), 1, "{recs:?}");
    let metrics = l7_sidecar::observe::render_metrics();
    assert!(
        metrics.contains("gateway_rejected_requests_total{status=\"503\",reason=\"draining\"}"),
        "{metrics}"
    );
}

/// HTTP/1: a head finished after the drain began (its first bytes came before, so
/// the connection was not idle) is answered 503 with `Retry-After` and
/// `Connection: close`, not proxied; before, it reached the upstream.
#[tokio::test]
async fn an_http1_request_completed_during_a_drain_is_answered_503_not_proxied() {
    let up = upstream("u").await;
    let gw = start_gateway(&cfg(up.addr)).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /delay/50 HTTP/1.1\r\nHost: a\r\n").await.expect("half a head");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let finish = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.write_all(b"X-Request-Id: late-h1\r\n\r\n").await.expect("rest of the head");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    assert!(gw.drain(Duration::from_secs(5)).await, "drained");
    let answer = finish.await.expect("client");
    assert_eq!(up.hits(), 0, "not proxied: {answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(lower.contains("retry-after:") && lower.contains("connection: close"), "{answer}");
    let recs = records(&mut log, Duration::from_millis(300)).await;
    assert_eq!(recs.len(), 1, "{recs:?}");
    assert_eq!((recs[0].status, recs[0].reason), (503, Some("draining")), "{recs:?}");
}

/// An HTTP/1 keep-alive connection whose request was in flight when the drain began
/// gets that answer, then is closed: a request sent after it is not proxied.
#[tokio::test]
async fn an_http1_request_after_the_in_flight_one_is_not_proxied_during_a_drain() {
    let up = upstream("u").await;
    let gw = start_gateway(&cfg(up.addr)).await;
    let addr = gw.addr("public").expect("addr");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /delay/800 HTTP/1.1\r\nHost: a\r\n\r\n").await.expect("write");
    eventually(Duration::from_secs(3), "reached the upstream", || up.hits() == 1).await;
    let client = tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("answer in time")
            .expect("read");
        let first = String::from_utf8_lossy(&buf[..n]).into_owned();
        let _ = s.write_all(b"GET /delay/10 HTTP/1.1\r\nHost: a\r\n\r\n").await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut rest)).await;
        (first, rest)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(gw.drain(Duration::from_secs(5)).await, "drained");
    let (first, rest) = client.await.expect("client");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    assert_eq!(up.hits(), 1, "the second request was not proxied");
}

/// Finding 2: three pipelined slow requests in one write, then the client closes.
/// The one in flight is logged 499 (the client is gone), not with the upstream's
/// status, and the queued ones are never sent upstream (and get no line: they were
/// never started). Before, request 0 was logged 200 and request 1 was proxied.
#[tokio::test]
async fn a_client_gone_with_pipelined_requests_queued_is_499_and_stops_them() {
    let up = upstream("u").await;
    let gw = start_gateway(&cfg(up.addr)).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut burst = Vec::new();
    for i in 0..3 {
        burst.extend_from_slice(
            format!("GET /delay/1500 HTTP/1.1\r\nHost: a\r\nX-Request-Id: pipe-{i}\r\n\r\n").as_bytes(),
        );
    }
    s.write_all(&burst).await.expect("write");
    eventually(Duration::from_secs(3), "request 0 reached the upstream", || up.hits() == 1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let closed = Instant::now();
    drop(s);
    let recs = records(&mut log, Duration::from_millis(3500)).await;
    assert_eq!(up.hits(), 1, "no pipelined request sent upstream after the close: {recs:?}");
    let first: Vec<_> = recs.iter().filter(|r| r.request_id == "pipe-0").collect();
    assert_eq!(first.len(), 1, "{recs:?}");
    assert_eq!((first[0].status, first[0].bytes), (499, 0), "{recs:?}");
    assert!(
        first[0].latency_ms < (closed.elapsed().as_millis() as f64) + 1000.0
            && first[0].latency_ms < 1400.0,
        "logged when the client left, not when the upstream answered: {recs:?}"
    );
    assert_eq!(recs.len(), 1, "the queued requests were never started: {recs:?}");
}

/// The watch for a client's close reads ahead of hyper while it holds pipelined
/// requests: what it reads (here a third request sent while the first is in flight)
/// is handed to hyper whole and in order, and every request is answered.
#[tokio::test]
async fn pipelined_requests_read_ahead_are_all_answered_in_order() {
    let up = upstream("u").await;
    let gw = start_gateway(&cfg(up.addr)).await;
    let addr = gw.addr("public").expect("addr");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = |i: usize| format!("GET /delay/300?n={i} HTTP/1.1\r\nHost: a\r\nX-Request-Id: ra-{i}\r\n\r\n");
    s.write_all(format!("{}{}", req(0), req(1)).as_bytes()).await.expect("write");
    eventually(Duration::from_secs(3), "request 0 reached the upstream", || up.hits() == 1).await;
    // Read ahead by the gateway (hyper holds request 1), not by hyper.
    s.write_all(req(2).as_bytes()).await.expect("write");
    s.write_all(b"GET /delay/1?n=3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("answered in time")
        .expect("read");
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 4, "{text}");
    let order: Vec<usize> = (0..3).map(|i| text.find(&format!("ra-{i}")).expect("each id answered")).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "in order: {text}");
    assert_eq!(up.hits(), 4);
}

/// Whether the tunnel still carries bytes both ways.
async fn echoes(s: &mut tokio::net::TcpStream) -> bool {
    if s.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"ping"
    )
}

/// Black-box finding: WebSocket tunnels were cut about 1.8 s into a drain whatever its
/// limit: a tunnel did not count as an open connection once upgraded (neither for the
/// drain nor for the connection limits), so the process exited as soon as the last
/// plain connection had closed. A tunnel is a request in progress: the drain waits
/// for it up to its limit (the binary's 30 s), and the cut after that ends it.
#[tokio::test]
async fn a_websocket_tunnel_lasts_until_the_drain_limit_then_is_cut() {
    let (up, task) = upgrade_backend().await;
    let gw = start_gateway(&format!(
        "{}[pools.ws]\nbackends = [{{ address = \"{up}\" }}]\n[[routes]]\nname = \"ws\"\npath = \"/ws\"\npool = \"ws\"\nwebsocket = true\n",
        listener("public")
    ))
    .await;
    let addr = gw.addr("public").expect("addr");
    let mut kept = upgraded(addr, "/ws").await;
    let mut closed_by_client = upgraded(addr, "/ws").await;
    assert!(echoes(&mut kept).await && echoes(&mut closed_by_client).await, "tunnels work");
    assert_eq!(gw.connections_per_worker().iter().sum::<usize>(), 2, "tunnels are open connections");
    let started = Instant::now();
    let (drained, ()) = tokio::join!(gw.drain(Duration::from_millis(2500)), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(closed_by_client);
        // Past the 1.8 s at which tunnels used to end.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(echoes(&mut kept).await, "the tunnel works 2 s into the drain");
    });
    assert!(!drained, "the open tunnel holds the drain to its limit");
    assert!(started.elapsed() >= Duration::from_millis(2500));
    assert_eq!(gw.connections_per_worker().iter().sum::<usize>(), 1, "the closed tunnel let go");
    assert!(gw.cut(Duration::from_secs(2)).await, "the cut ends the tunnel");
    let mut buf = [0u8; 16];
    let end = tokio::time::timeout(Duration::from_secs(2), kept.read(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0) | Err(_))), "the client sees its tunnel end: {end:?}");
    task.abort();
}

/// Hostile test s16-F1: a tunnel that moved no byte either way stayed open for ever
/// (the connection's idle timeout does not apply once upgraded, and nothing else
/// did), holding its slot and two sockets. `tunnel_idle_timeout` closes it; a tunnel
/// in use stays open past it.
#[tokio::test]
async fn a_tunnel_that_moves_no_byte_for_tunnel_idle_timeout_is_closed() {
    let (up, task) = upgrade_backend().await;
    let gw = start_gateway(&format!(
        "[server]\ntunnel_idle_timeout = \"400ms\"\n{}[pools.ws]\nbackends = [{{ address = \"{up}\" }}]\n[[routes]]\nname = \"ws\"\npath = \"/ws\"\npool = \"ws\"\nwebsocket = true\n",
        listener("public")
    ))
    .await;
    let addr = gw.addr("public").expect("addr");
    let mut idle = upgraded(addr, "/ws").await;
    let mut busy = upgraded(addr, "/ws").await;
    for _ in 0..8 {
        assert!(echoes(&mut busy).await, "a tunnel in use stays open");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let mut buf = [0u8; 4];
    let end = tokio::time::timeout(Duration::from_secs(2), idle.read(&mut buf)).await;
    assert!(matches!(end, Ok(Ok(0) | Err(_))), "the idle tunnel is closed: {end:?}");
    assert!(echoes(&mut busy).await, "the busy one still works");
    assert_eq!(gw.connections_per_worker().iter().sum::<usize>(), 1, "the idle one let go of its slot");
    task.abort();
}
