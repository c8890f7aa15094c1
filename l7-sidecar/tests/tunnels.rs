//! How a WebSocket (upgrade) tunnel ended is recorded: its request's access-log line is
//! written at the tunnel's end (status 101) with the end's reason, the tunnel's
//! duration and the bytes it carried each way, and the ends are counted by reason.
//! Before, the line was written when the `101` was sent and nothing said how or when
//! the tunnel ended, or what it carried.
mod common;

use common::*;
use l7_sidecar::observe::AccessRecord;
use l7_sidecar::RunningGateway;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::broadcast;

fn ws_gateway_cfg(up: SocketAddr, server: &str) -> String {
    format!(
        "[server]\n{server}{}[pools.ws]\nbackends = [{{ address = \"{up}\" }}]\n[[routes]]\nname = \"ws\"\npath = \"/ws\"\npool = \"ws\"\nwebsocket = true\n",
        listener("public")
    )
}

/// A gateway in front of `upgrade_backend`, and its access log.
async fn ws_gateway(server: &str) -> (RunningGateway, SocketAddr, broadcast::Receiver<AccessRecord>, tokio::task::JoinHandle<()>) {
    let (up, task) = upgrade_backend().await;
    let gw = start_gateway(&ws_gateway_cfg(up, server)).await;
    let log = gw.gateway.shared.access_log.subscribe();
    (gw, up, log, task)
}

/// An upgraded connection to `path` through the gateway.
async fn tunnel_to(gw: &RunningGateway, path: &str) -> TcpStream {
    upgraded(gw.addr("public").expect("addr"), path).await
}

async fn echo(s: &mut TcpStream, what: &[u8]) {
    s.write_all(what).await.expect("write");
    let mut back = vec![0u8; what.len()];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back)).await.expect("echo in time").expect("echo");
    assert_eq!(back, what);
}

/// The next line of a 101 (the tunnel's), within `wait`.
async fn tunnel_line(log: &mut broadcast::Receiver<AccessRecord>, wait: Duration) -> Option<AccessRecord> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, log.recv()).await {
            Ok(Ok(r)) if r.status == 101 => return Some(r),
            Ok(Ok(_)) => {}
            _ => return None,
        }
    }
}

/// Reads until the gateway ends the client's side (EOF or reset), within 5 s.
async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await.expect("the tunnel ends");
    got
}

/// The line is the tunnel's end, not its `101`'s: nothing is logged while it is open.
#[tokio::test]
async fn a_tunnel_the_client_closes_is_logged_at_its_end_with_its_bytes() {
    let (gw, up, mut log, task) = ws_gateway("").await;
    let mut s = tunnel_to(&gw, "/ws").await;
    echo(&mut s, b"hello").await;
    echo(&mut s, b"12345678").await;
    assert!(tunnel_line(&mut log, Duration::from_millis(300)).await.is_none(), "no line while the tunnel is open");
    s.shutdown().await.expect("shutdown");
    assert!(read_to_end(&mut s).await.is_empty());
    drop(s);
    let r = tunnel_line(&mut log, Duration::from_secs(5)).await.expect("the tunnel's line at its end");
    let t = r.tunnel.clone().expect("tunnel fields");
    assert_eq!(t.end, "client_closed", "{r:?}");
    assert_eq!((t.bytes_to_backend, t.bytes_to_client, r.bytes), (13, 13, 13), "{r:?}");
    assert_eq!(t.error, None);
    assert!(t.duration_ms >= 300.0 && t.duration_ms < 5000.0, "{r:?}");
    assert!(r.latency_ms >= t.duration_ms, "the request's time includes its tunnel's: {r:?}");
    assert_eq!(r.upstream.as_deref(), Some(up.to_string().as_str()));
    assert_eq!((r.route.as_deref(), r.path.as_str()), (Some("ws"), "/ws"));
    assert!(!r.request_id.is_empty(), "{r:?}");
    assert!(tunnel_line(&mut log, Duration::from_millis(200)).await.is_none(), "one line per request");
    task.abort();
}

/// A tunnel whose backend has said `goodbye` (7 bytes, after the client's 5) and shut
/// its side; the client's side is still open.
async fn left_by_the_backend(gw: &RunningGateway) -> TcpStream {
    let mut s = tunnel_to(gw, "/ws/bye").await;
    s.write_all(b"abcde").await.expect("write");
    let mut goodbye = [0u8; 7];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut goodbye)).await.expect("in time").expect("read");
    assert_eq!(&goodbye, b"goodbye");
    s
}

#[tokio::test]
async fn a_tunnel_the_backend_closes_says_so() {
    let (gw, _up, mut log, task) = ws_gateway("").await;
    let mut s = tunnel_to(&gw, "/ws/bye").await;
    s.write_all(b"abcde").await.expect("write");
    assert_eq!(read_to_end(&mut s).await, b"goodbye");
    drop(s);
    let r = tunnel_line(&mut log, Duration::from_secs(5)).await.expect("the tunnel's line");
    let t = r.tunnel.clone().expect("tunnel fields");
    assert_eq!(t.end, "backend_closed", "{r:?}");
    assert_eq!((t.bytes_to_backend, t.bytes_to_client, r.bytes), (5, 7, 7), "{r:?}");
    task.abort();
}

/// Hostile finding s17-T2: the backend closed first and the client stayed open and
/// silent; the tunnel went on one way (half-close) until the idle timeout, and its line
/// said only `idle_timeout`, hiding that the backend had left. It says who closed first.
#[tokio::test]
async fn a_half_closed_tunnel_that_idles_out_says_which_side_left() {
    let (gw, _up, mut log, task) = ws_gateway("tunnel_idle_timeout = \"300ms\"\n").await;
    let s = left_by_the_backend(&gw).await;
    // The client keeps its side open and says nothing.
    let r = tunnel_line(&mut log, Duration::from_secs(5)).await.expect("the tunnel's line");
    let t = r.tunnel.clone().expect("tunnel fields");
    assert_eq!((t.end, t.closed_first), ("idle_timeout", Some("backend")), "{r:?}");
    assert_eq!((t.bytes_to_backend, t.bytes_to_client), (5, 7), "{r:?}");
    drop(s);
    task.abort();
}

/// Hostile finding s17-T2 (the slot): a tunnel the backend had left held its connection
/// slot and both sockets for the whole `tunnel_idle_timeout` (an hour by default) while
/// the client stayed silent. Once one side has closed, `idle_timeout` of silence ends it.
#[tokio::test]
async fn a_half_closed_tunnel_ends_after_the_shorter_idle_timeout() {
    let (gw, _up, mut log, task) = ws_gateway("tunnel_idle_timeout = \"1h\"\nidle_timeout = \"300ms\"\n").await;
    let s = left_by_the_backend(&gw).await;
    let r = tunnel_line(&mut log, Duration::from_secs(5)).await.expect("ended well before the hour");
    let t = r.tunnel.clone().expect("tunnel fields");
    assert_eq!((t.end, t.closed_first), ("idle_timeout", Some("backend")), "{r:?}");
    assert!(t.duration_ms >= 300.0 && t.duration_ms < 3000.0, "{r:?}");
    drop(s);
    task.abort();
}

/// A tunnel nobody closed is not cut by the shorter `idle_timeout`.
#[tokio::test]
async fn an_open_tunnel_outlives_the_connection_idle_timeout() {
    let (gw, _up, mut log, task) = ws_gateway("tunnel_idle_timeout = \"1h\"\nidle_timeout = \"300ms\"\n").await;
    let mut s = tunnel_to(&gw, "/ws").await;
    echo(&mut s, b"ping").await;
    assert!(tunnel_line(&mut log, Duration::from_millis(1200)).await.is_none(), "still open after 4 × idle_timeout");
    echo(&mut s, b"pong").await;
    drop(s);
    task.abort();
}

#[tokio::test]
async fn a_tunnel_closed_for_tunnel_idle_timeout_says_so() {
    let (gw, _up, mut log, task) = ws_gateway("tunnel_idle_timeout = \"300ms\"\n").await;
    let mut s = tunnel_to(&gw, "/ws").await;
    echo(&mut s, b"ping").await;
    read_to_end(&mut s).await;
    let r = tunnel_line(&mut log, Duration::from_secs(5)).await.expect("the tunnel's line");
    let t = r.tunnel.clone().expect("tunnel fields");
    assert_eq!(t.end, "idle_timeout", "{r:?}");
    assert_eq!((t.bytes_to_backend, t.bytes_to_client), (4, 4), "{r:?}");
    // Idle for the timeout, noticed within a quarter of it (one watchdog tick) or so.
    assert!(t.duration_ms >= 300.0 && t.duration_ms < 2000.0, "{r:?}");
    task.abort();
}

/// A client that resets its connection ends the tunnel with an I/O error, named.
#[tokio::test]
async fn a_tunnel_reset_by_the_client_is_an_error_with_its_cause() {
    let (gw, _up, mut log, task) = ws_gateway("").await;
    let mut s = tunnel_to(&gw, "/ws").await;
    echo(&mut s, b"ping").await;
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).expect("linger");
    drop(s);
    let r = tunnel_line(&mut log, Duration::from_secs(5)).await.expect("the tunnel's line");
    let t = r.tunnel.clone().expect("tunnel fields");
    assert_eq!(t.end, "error", "{r:?}");
    assert!(t.error.as_deref().is_some_and(|e| e.contains("reset")), "{r:?}");
    assert_eq!((t.bytes_to_backend, t.bytes_to_client), (4, 4), "{r:?}");
    task.abort();
}

fn counter(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A tunnel still open at the drain's limit is cut: its line says `drain`, the cut
/// is said once at WARN with how many tunnels it cut, and the metrics count it.
#[tokio::test]
async fn tunnels_cut_by_the_drain_are_logged_counted_and_warned_about_once() {
    let logs = capture();
    let before = l7_sidecar::observe::render_metrics();
    let (gw, _up, mut log, task) = ws_gateway("").await;
    let mut a = tunnel_to(&gw, "/ws").await;
    let mut b = tunnel_to(&gw, "/ws").await;
    echo(&mut a, b"ping").await;
    echo(&mut b, b"pingpong").await;
    assert!(!gw.drain(Duration::from_millis(300)).await, "the tunnels hold the drain");
    assert!(tunnel_line(&mut log, Duration::from_millis(100)).await.is_none(), "open until the cut");
    assert!(gw.cut(Duration::from_secs(2)).await, "the cut ends them");
    let mut lines = Vec::new();
    for _ in 0..2 {
        lines.push(tunnel_line(&mut log, Duration::from_secs(5)).await.expect("each tunnel's line"));
    }
    lines.sort_by_key(|r| r.bytes);
    for (r, n) in lines.iter().zip([4, 8]) {
        let t = r.tunnel.clone().expect("tunnel fields");
        assert_eq!(t.end, "drain", "{r:?}");
        assert_eq!((t.bytes_to_backend, t.bytes_to_client), (n, n), "{r:?}");
        assert!(t.duration_ms >= 300.0, "{r:?}");
    }
    read_to_end(&mut a).await;
    let text = logs.text();
    assert_eq!(text.matches("drain limit reached: cut 2 WebSocket/upgrade tunnel(s)").count(), 1, "{text}");
    let after = l7_sidecar::observe::render_metrics();
    let delta = |what: &str| counter(&after, what) - counter(&before, what);
    // Other tests of this binary end tunnels too, but none by a drain.
    assert_eq!(delta("gateway_tunnel_ends_total{reason=\"drain\"}"), 2, "{after}");
    assert!(delta("gateway_tunnel_bytes_total{direction=\"to_backend\"}") >= 12, "{after}");
    assert!(delta("gateway_tunnel_bytes_total{direction=\"to_client\"}") >= 12, "{after}");
    task.abort();
}

/// A backend that answers every request with `answer` (then holds the connection for a
/// while), and the heads it received.
async fn answering(answer: &'static [u8]) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    answering_after(Duration::ZERO, answer).await
}

/// `answering`, each answer `delay` after the request.
async fn answering_after(delay: Duration, answer: &'static [u8]) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                if let Some(head) = read_request(&mut s, &mut buf).await {
                    let _ = tx.send(head);
                    tokio::time::sleep(delay).await;
                    let _ = s.write_all(answer).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            });
        }
    });
    (addr, rx)
}

/// Sends `request` on a new connection to the gateway; the response's head.
async fn head_of(gw: &RunningGateway, request: &[u8]) -> String {
    let mut s = TcpStream::connect(gw.addr("public").expect("addr")).await.expect("connect");
    s.write_all(request).await.expect("write");
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await.expect("answered in time") {
            Ok(1) => got.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Sends `request` on a new connection to the gateway; the response's status line.
async fn status_line_of(gw: &RunningGateway, request: &[u8]) -> String {
    head_of(gw, request).await.lines().next().unwrap_or_default().to_string()
}

/// A WebSocket upgrade request for `/ws`, without a body.
fn ws_upgrade(method: &str, version: &str) -> String {
    format!("{method} /ws {version}\r\nHost: x\r\n{UPGRADE_HEADERS}\r\n")
}

/// Hostile finding s17-T1: an upgrade request's body was dropped while its
/// `Content-Length` went on to the backend, which waited for the body until the
/// request timeout (504); a chunked one was tunnelled without its body. Refused now.
#[tokio::test]
async fn an_upgrade_request_with_a_body_is_refused() {
    let (up, mut heads) = answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await;
    let gw = start_gateway(&ws_gateway_cfg(up, "")).await;
    for framing in ["Content-Length: 5\r\n\r\nHELLO", "Transfer-Encoding: chunked\r\n\r\n5\r\nHELLO\r\n0\r\n\r\n"] {
        let req = format!("POST /ws HTTP/1.1\r\nHost: x\r\n{UPGRADE_HEADERS}{framing}");
        assert_eq!(status_line_of(&gw, req.as_bytes()).await, "HTTP/1.1 400 Bad Request", "{framing:?}");
    }
    assert!(heads.try_recv().is_err(), "the backend was not asked");
    // Without a body it goes through.
    let req = ws_upgrade("GET", "HTTP/1.1");
    assert_eq!(status_line_of(&gw, req.as_bytes()).await, "HTTP/1.1 101 Switching Protocols");
}

/// Hostile findings s17-T5 and s17-T7: a backend's `HTTP/1.0` status line reached the
/// client of an upgrade request as is (other routes answer in HTTP/1.1), and a `101`
/// switching to another protocol than WebSocket (here h2c) was tunnelled as if it were
/// the one asked for.
#[tokio::test]
async fn a_backends_answer_to_an_upgrade_is_checked_and_given_in_http_1_1() {
    let cases: [(&'static [u8], &str); 2] = [
        (b"HTTP/1.0 403 Forbidden\r\nContent-Length: 2\r\n\r\nno", "HTTP/1.1 403 Forbidden"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", "HTTP/1.1 502 Bad Gateway"),
    ];
    for (answer, client_gets) in cases {
        let (up, _heads) = answering(answer).await;
        let gw = start_gateway(&ws_gateway_cfg(up, "")).await;
        let req = ws_upgrade("GET", "HTTP/1.1");
        assert_eq!(status_line_of(&gw, req.as_bytes()).await, client_gets, "{}", String::from_utf8_lossy(answer));
    }
}

/// Hostile finding s17-T6: an `Upgrade` in an HTTP/1.0 request was forwarded and the
/// backend's 101 ended in a broken tunnel. RFC 9110 §7.8: it is ignored; the request is
/// proxied as a plain one, without `Upgrade`.
#[tokio::test]
async fn an_http_1_0_upgrade_is_ignored() {
    let (up, mut heads) = answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let gw = start_gateway(&ws_gateway_cfg(up, "")).await;
    let req = ws_upgrade("GET", "HTTP/1.0");
    let status = status_line_of(&gw, req.as_bytes()).await;
    assert!(status.ends_with(" 200 OK"), "{status}");
    let head = heads.recv().await.expect("forwarded").to_ascii_lowercase();
    assert!(!head.contains("upgrade"), "{head}");
}

/// Hostile finding s17-T4: the `upstream failure` WARN of a timed-out request named the
/// route, the request id and the error, not the backend that failed (other errors carry
/// it in their text); an upgrade's named it for no error.
#[tokio::test]
async fn the_upstream_failure_warning_names_the_backend() {
    let logs = capture();
    // Reads the request and never answers: a timeout, whose error names no address
    // (hyper's errors are prefixed with the backend's).
    let (dead, _heads) = answering(b"").await;
    let cfg = ws_gateway_cfg(dead, "").replace("[pools.ws]\n", "[pools.ws]\nrequest_timeout_ms = 300\n");
    let gw = start_gateway(&cfg).await;
    let mut access = gw.gateway.shared.access_log.subscribe();
    for (id, upgrade) in [("dead-plain", ""), ("dead-upgrade", UPGRADE_HEADERS)] {
        let req = format!("GET /ws HTTP/1.1\r\nHost: x\r\nX-Request-Id: {id}\r\n{upgrade}\r\n");
        assert_eq!(status_line_of(&gw, req.as_bytes()).await, "HTTP/1.1 504 Gateway Timeout", "{id}");
    }
    let mut lines = Vec::new();
    for _ in 0..50 {
        let text = logs.text();
        lines = text.lines().filter(|l| l.contains("upstream failure") && l.contains("dead-")).map(str::to_owned).collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    for l in &lines {
        assert!(l.contains(&format!("upstream={dead}")), "{l}");
    }
    // And the access log's lines name it, the upgrade's too (it was null).
    for _ in 0..2 {
        let r = tokio::time::timeout(Duration::from_secs(5), access.recv()).await.expect("line").expect("record");
        assert_eq!((r.status, r.upstream.as_deref()), (504, Some(&*dead.to_string())), "{r:?}");
    }
}

/// The hop-by-hop fields of the backend's connection (and those its `Connection`
/// names) stay on that connection, whether it declines an upgrade (its answer relayed
/// like any response: they reached the client as is) or switches (hostile s18-3:
/// `Keep-Alive`, `Proxy-Authenticate` and the named fields crossed with the `101`;
/// only the upgrade itself does: `Connection: upgrade` and `Upgrade: websocket`).
#[tokio::test]
async fn the_backends_hop_by_hop_fields_stay_on_its_connection() {
    struct Case {
        answer: &'static [u8],
        status: &'static str,
        kept: &'static [&'static str],
        stripped: &'static [&'static str],
    }
    let cases = [
        Case {
            answer: b"HTTP/1.1 403 Forbidden\r\nConnection: close, X-Backend-Hop\r\nX-Backend-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-Kept: yes\r\nContent-Length: 2\r\n\r\nno",
            status: "http/1.1 403 forbidden\r\n",
            kept: &["\r\nx-kept: yes\r\n"],
            stripped: &["x-backend-hop", "keep-alive:", "connection: close"],
        },
        Case {
            answer: b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: x\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
            status: "http/1.1 101 switching protocols\r\n",
            kept: &["\r\nconnection: upgrade\r\n", "\r\nupgrade: websocket\r\n", "\r\nsec-websocket-accept: "],
            stripped: &["x-secret", "keep-alive", "proxy-authenticate"],
        },
    ];
    for case in cases {
        let (up, _) = answering(case.answer).await;
        let gw = start_gateway(&ws_gateway_cfg(up, "")).await;
        let head = head_of(&gw, ws_upgrade("GET", "HTTP/1.1").as_bytes()).await.to_ascii_lowercase();
        assert!(head.starts_with(case.status), "{head}");
        for kept in case.kept {
            assert!(head.contains(kept), "{kept:?} missing: {head}");
        }
        for hop in case.stripped {
            assert!(!head.contains(hop), "{hop} relayed: {head}");
        }
    }
}

/// A gateway whose `/ws` route (WebSocket) goes to a round-robin pool over `first` and
/// `second`, with the pool settings `pool` and passive health `passive` (TOML lines).
async fn two_backend_ws_gateway(first: SocketAddr, second: SocketAddr, pool: &str, passive: &str) -> RunningGateway {
    start_gateway(&format!(
        "{}[pools.ws]\nalgorithm = \"round-robin\"\n{pool}backends = [{{ address = \"{first}\" }}, {{ address = \"{second}\" }}]\n\
         [pools.ws.passive]\n{passive}[[routes]]\nname = \"ws\"\npath = \"/ws\"\npool = \"ws\"\nwebsocket = true\n",
        listener("public")
    ))
    .await
}

/// A backend that answers upgrades with a `101` to another protocol fails every one
/// (`502` without a retry), so passive health ejects it like a backend failing otherwise. Its answer
/// was first counted a success (resetting the failure count), then a failure: the
/// count never passed 1 and the backend kept its share of upgrades.
#[tokio::test]
async fn a_backend_answering_upgrades_with_another_protocol_is_ejected() {
    let (bad, _) = answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n").await;
    let (good, _) = answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await;
    let passive = "consecutive_failures = 2\nbase_ejection_ms = 60000\nmax_ejection_ms = 60000\nmax_ejected_percent = 50\n";
    let gw = two_backend_ws_gateway(bad, good, "retries = 0\n", passive).await;
    let req = ws_upgrade("GET", "HTTP/1.1");
    let mut refused = 0;
    for _ in 0..8 {
        if status_line_of(&gw, req.as_bytes()).await.ends_with(" 502 Bad Gateway") {
            refused += 1;
        }
    }
    assert_eq!(refused, 2, "the bad backend answered 2 upgrades, then was ejected");
}

/// A backend that reads a request, then resets its connection before answering.
async fn resetting() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut buf = Vec::new();
            if read_request(&mut s, &mut buf).await.is_some() {
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
            }
        }
    });
    addr
}

/// Hostile finding s18-1: upgrades were never retried on another backend (plain GETs
/// are, after a failure that left them without a response): with one of two backends
/// refusing connections, resetting them before answering, or switching to another
/// protocol, every upgrade sent to it failed until passive health ejected it.
#[tokio::test]
async fn an_upgrade_is_retried_on_another_backend_after_a_failed_attempt() {
    let (good, _) = answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await;
    let (wrong_protocol, _) = answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n").await;
    let refusing: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    for bad in [refusing, resetting().await, wrong_protocol] {
        // Passive health off: every upgrade meets the bad backend's turn.
        let gw = two_backend_ws_gateway(bad, good, "retries = 1\n", "consecutive_failures = 0\n").await;
        let req = ws_upgrade("GET", "HTTP/1.1");
        for i in 0..4 {
            assert_eq!(status_line_of(&gw, req.as_bytes()).await, "HTTP/1.1 101 Switching Protocols", "upgrade {i}, bad backend {bad}");
        }
    }
}

/// Hostile finding s18-2: only the first `Upgrade` field line of a backend's `101` was
/// checked, so `Upgrade: websocket` + `Upgrade: h2c` opened a tunnel (the same list on
/// one line was refused).
#[tokio::test]
async fn a_101_naming_more_than_websocket_in_several_lines_is_refused() {
    let (up, _) = answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n").await;
    let gw = start_gateway(&ws_gateway_cfg(up, "")).await;
    let req = ws_upgrade("GET", "HTTP/1.1");
    assert_eq!(status_line_of(&gw, req.as_bytes()).await, "HTTP/1.1 502 Bad Gateway");
}


/// Hostile finding s18-4: an upgrade whose client left before the backend answered was
/// logged 499 with no `upstream`, though the backend had the request (other requests
/// dropped meanwhile name it).
#[tokio::test]
async fn an_upgrade_dropped_before_its_answer_names_its_backend() {
    let (up, _) = answering_after(
        Duration::from_secs(1),
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    )
    .await;
    let gw = start_gateway(&ws_gateway_cfg(up, "")).await;
    let mut log = gw.gateway.shared.access_log.subscribe();
    let mut s = TcpStream::connect(gw.addr("public").expect("addr")).await.expect("connect");
    s.write_all(ws_upgrade("GET", "HTTP/1.1").as_bytes()).await.expect("write");
    tokio::time::sleep(Duration::from_millis(300)).await;
    drop(s);
    let r = tokio::time::timeout(Duration::from_secs(5), log.recv()).await.expect("a line in time").expect("line");
    assert_eq!((r.status, r.upstream.as_deref()), (499, Some(up.to_string().as_str())), "{r:?}");
}

/// An address whose connects hang: a listener that never accepts, its queue full.
/// The returned sockets keep the queue full.
fn blackhole() -> (SocketAddr, Vec<std::net::TcpStream>) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().expect("addr").into()).expect("bind");
    s.listen(0).expect("listen");
    let addr = s.local_addr().expect("addr").as_socket().expect("inet");
    let mut fill = Vec::new();
    // Connects that complete fill the queue; the first one that does not is dropped.
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(c) => fill.push(c),
            Err(_) => break,
        }
    }
    std::mem::forget(s);
    (addr, fill)
}

/// Hostile finding s18b-F1: when the request timeout passed during a connect, the
/// upgrade went on to another backend with no time left, failed its connect at once
/// and blamed it (502 naming the healthy backend, which passive health then ejected).
/// As for other requests: no attempt after the deadline, 504, nobody blamed.
#[tokio::test]
async fn an_upgrade_out_of_time_is_a_504_that_blames_no_other_backend() {
    let (good, _) = answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await;
    let (hole, _queue) = blackhole();
    let pool = "retries = 1\nconnect_timeout = \"3s\"\nrequest_timeout = \"400ms\"\n";
    let gw = two_backend_ws_gateway(hole, good, pool, "consecutive_failures = 1\nmax_ejected_percent = 100\n").await;
    let req = ws_upgrade("GET", "HTTP/1.1");
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(status_line_of(&gw, req.as_bytes()).await);
    }
    statuses.sort();
    assert_eq!(
        statuses,
        ["HTTP/1.1 101 Switching Protocols", "HTTP/1.1 101 Switching Protocols", "HTTP/1.1 504 Gateway Timeout", "HTTP/1.1 504 Gateway Timeout"],
        "the connecting backend's turns time out, the other's succeed"
    );
}

/// Hostile finding s18b-F2: a declined upgrade's answer skipped the checks every other
/// answer passes (a status outside 100–599, `Content-Length` with `Transfer-Encoding`,
/// a coding other than `chunked`, a body broken in what arrived with the head): passed
/// on as is, not retried, not counted. Now a failed attempt, retried on another backend.
#[tokio::test]
async fn a_bad_answer_to_an_upgrade_is_a_failed_attempt() {
    let (good, _) = answering(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await;
    let bad_answers: [&'static [u8]; 6] = [
        b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        // Broken further in, but all there with the head (hostile s18b-3: relayed, then cut).
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n",
        b"HTTP/1.1 403 Forbidden\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
    ];
    for answer in bad_answers {
        let (bad, _) = answering(answer).await;
        let gw = two_backend_ws_gateway(bad, good, "retries = 1\n", "consecutive_failures = 0\n").await;
        for i in 0..4 {
            let status = status_line_of(&gw, ws_upgrade("GET", "HTTP/1.1").as_bytes()).await;
            assert_eq!(status, "HTTP/1.1 101 Switching Protocols", "upgrade {i}, bad answer {}", String::from_utf8_lossy(answer));
        }
    }
}

/// Hostile finding s18b-F3: a `101` whose `Upgrade` fields name WebSocket alone, but
/// as `websocket,` (an empty list element, RFC 9110 §5.6.1.2: ignored) or on two lines,
/// was refused.
#[tokio::test]
async fn a_101_naming_websocket_alone_in_any_list_form_is_a_tunnel() {
    let answers: [&'static [u8]; 2] = [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket,\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\n\r\n",
    ];
    for answer in answers {
        let (up, _) = answering(answer).await;
        let gw = start_gateway(&ws_gateway_cfg(up, "")).await;
        let status = status_line_of(&gw, ws_upgrade("GET", "HTTP/1.1").as_bytes()).await;
        assert_eq!(status, "HTTP/1.1 101 Switching Protocols", "{}", String::from_utf8_lossy(answer));
    }
}
