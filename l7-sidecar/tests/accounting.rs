//! Every request the gateway sees gets exactly one access-log line and one count in
//! the request metrics, however it ends: answered, answered with its body cut,
//! dropped before the response head (client gone: `499`), cut at shutdown, or
//! refused by the HTTP/1 parser before any service call (issue 10, F-f and F-b).
mod common;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use l7_sidecar::observe::AccessRecord;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::broadcast;

fn cfg(up: SocketAddr, server: &str) -> String {
    format!(
        "[server]\n{server}\n{}[pools.t]\nbackends = [{{ address = \"{up}\" }}]\n[[routes]]\nname = \"t\"\npath = \"/\"\npool = \"t\"\n",
        listener("public")
    )
}

/// Every record with request id `id` that arrives within `wait`.
async fn records_for(
    log: &mut broadcast::Receiver<AccessRecord>,
    id: &str,
    wait: Duration,
) -> Vec<AccessRecord> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(r)) = tokio::time::timeout_at(deadline, log.recv()).await {
        if r.request_id == id {
            got.push(r);
        }
    }
    got
}

/// Every record (any id) that arrives within `wait`.
async fn all_records(
    log: &mut broadcast::Receiver<AccessRecord>,
    wait: Duration,
) -> Vec<AccessRecord> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Ok(r)) = tokio::time::timeout_at(deadline, log.recv()).await {
        got.push(r);
    }
    got
}

/// An upstream that sends a response head and one body chunk, then holds the body.
async fn half_body_upstream() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n";
                let _ = s.write_all(head.as_bytes()).await;
                let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
            });
        }
    });
    addr
}

fn one(recs: &[AccessRecord], what: &str) -> AccessRecord {
    assert_eq!(recs.len(), 1, "{what}: exactly one line, got {recs:?}");
    recs[0].clone()
}

async fn h2_sender(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

fn h2_get(addr: SocketAddr, path: &str, id: &str) -> http::Request<Empty<Bytes>> {
    http::Request::get(format!("http://{addr}{path}"))
        .header("x-request-id", id)
        .body(Empty::new())
        .expect("request")
}

#[tokio::test]
async fn a_client_gone_before_the_head_is_logged_once_as_499_over_h1_and_h2() {
    let up = upstream("slow").await;
    let gw = start_gateway(&cfg(up.addr, "")).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();

    // HTTP/1: the client closes while the upstream still works on the request.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /delay/1500 HTTP/1.1\r\nHost: a\r\nX-Request-Id: abort-h1\r\n\r\n")
        .await
        .expect("write");
    eventually(Duration::from_secs(3), "upstream got the h1 request", || up.hits() >= 1).await;
    drop(s);
    let r = one(
        &records_for(&mut log, "abort-h1", Duration::from_millis(2500)).await,
        "h1 abort",
    );
    assert_eq!(r.status, 499, "{r:?}");
    assert_eq!(r.route.as_deref(), Some("t"));
    assert_eq!(r.path, "/delay/1500");
    assert_eq!(r.method, "GET");
    assert!(r.latency_ms > 0.0);

    // HTTP/2: the client resets the stream (dropping its response future).
    let mut send = h2_sender(addr).await;
    let hits = up.hits();
    let pending = tokio::spawn(send.send_request(h2_get(addr, "/delay/1500", "abort-h2")));
    eventually(Duration::from_secs(3), "upstream got the h2 request", || up.hits() > hits).await;
    pending.abort();
    let r = one(
        &records_for(&mut log, "abort-h2", Duration::from_millis(2500)).await,
        "h2 reset",
    );
    assert_eq!(r.status, 499, "{r:?}");
    assert_eq!(r.route.as_deref(), Some("t"));

    let metrics = l7_sidecar::observe::render_metrics();
    assert!(
        metrics.contains("gateway_requests_total{route=\"t\",status=\"499\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn answered_and_body_cut_requests_get_exactly_one_line_over_h1_and_h2() {
    let up = upstream("ok").await;
    let gw = start_gateway(&cfg(up.addr, "")).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();

    // Answered, HTTP/1.
    let r = get(&client(), &format!("{}/x", base(&gw)), &[("x-request-id", "ok-h1")]).await;
    assert_eq!(r.status, 200);
    let rec = one(&records_for(&mut log, "ok-h1", Duration::from_millis(500)).await, "h1 answered");
    assert_eq!(rec.status, 200);
    // Answered, HTTP/2.
    let mut send = h2_sender(addr).await;
    let resp = send.send_request(h2_get(addr, "/x", "ok-h2")).await.expect("h2");
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.expect("body");
    let rec = one(&records_for(&mut log, "ok-h2", Duration::from_millis(500)).await, "h2 answered");
    assert_eq!(rec.status, 200);

    // Answered, then the body cut by the client: the line says what was sent.
    let half = half_body_upstream().await;
    let gw2 = start_gateway(&cfg(half, "")).await;
    let addr2 = gw2.addr("public").expect("addr");
    let mut log2 = gw2.gateway.shared.access_log.subscribe();
    let mut s = tokio::net::TcpStream::connect(addr2).await.expect("connect");
    s.write_all(b"GET /h HTTP/1.1\r\nHost: a\r\nX-Request-Id: cut-h1\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.expect("read head");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
    drop(s);
    let rec = one(&records_for(&mut log2, "cut-h1", Duration::from_millis(1500)).await, "h1 cut");
    assert_eq!(rec.status, 200);
    let mut send = h2_sender(addr2).await;
    let resp = send.send_request(h2_get(addr2, "/h", "cut-h2")).await.expect("h2");
    assert_eq!(resp.status(), 200);
    drop(resp);
    let rec = one(&records_for(&mut log2, "cut-h2", Duration::from_millis(1500)).await, "h2 cut");
    assert_eq!(rec.status, 200);
}

/// Raw bytes in, the whole answer out (the gateway closes after a parse error).
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn parser_rejections_are_logged_and_counted() {
    let up = upstream("never").await;
    let gw = start_gateway(&cfg(up.addr, "")).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let mut many = String::from("GET / HTTP/1.1\r\nHost: a\r\n");
    for i in 0..120 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let cases: [(&[u8], u16); 5] = [
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: \x01\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 400),
        (many.as_bytes(), 431),
    ];
    for (req, status) in cases {
        let answer = raw(addr, req).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer:?} for {:?}",
            String::from_utf8_lossy(req)
        );
        let recs = all_records(&mut log, Duration::from_millis(300)).await;
        let rec = one(&recs, &String::from_utf8_lossy(req));
        assert_eq!(rec.status, status, "{rec:?}");
        assert_eq!(rec.client_ip, "127.0.0.1");
        assert!(rec.route.is_none());
    }
    assert_eq!(up.hits(), 0);
    let metrics = l7_sidecar::observe::render_metrics();
    for want in [
        "gateway_rejected_requests_total{status=\"400\"",
        "gateway_rejected_requests_total{status=\"431\"",
        "gateway_requests_total{route=\"none\",status=\"431\"}",
    ] {
        assert!(metrics.contains(want), "{want} in {metrics}");
    }
}

#[tokio::test]
async fn max_headers_is_answered_by_the_gateway_with_its_usual_error() {
    let up = upstream("never").await;
    let gw = start_gateway(&cfg(up.addr, "max_headers = 20")).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let mut req = String::from("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Request-Id: mh-1\r\n");
    for i in 0..18 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    let answer = raw(addr, format!("{req}\r\n").as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    assert!(answer.to_ascii_lowercase().contains("x-request-id: mh-1"), "{answer:?}");
    assert!(answer.contains("too_many_headers"), "{answer:?}");
    let rec = one(&records_for(&mut log, "mh-1", Duration::from_millis(500)).await, "431");
    assert_eq!(rec.status, 431);
    assert_eq!(up.hits(), 0);
}

#[tokio::test]
async fn a_request_cut_at_the_drain_limit_is_logged_before_exit() {
    let up = upstream("slow").await;
    let gw = start_gateway(&cfg(up.addr, "")).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /delay/3000 HTTP/1.1\r\nHost: a\r\nX-Request-Id: cut-at-exit\r\n\r\n")
        .await
        .expect("write");
    eventually(Duration::from_secs(3), "upstream got the request", || up.hits() >= 1).await;
    assert!(!gw.drain(Duration::from_millis(200)).await, "still in flight");
    assert!(gw.cut(Duration::from_secs(1)).await, "cut connections closed");
    // Logged by the time `cut` returns, not when the upstream answers.
    let r = one(&records_for(&mut log, "cut-at-exit", Duration::from_millis(100)).await, "cut");
    assert_eq!(r.status, 499, "{r:?}");
    assert!(gw.gateway.shared.access_log.flush(Duration::from_secs(1)));
    drop(s);
}

/// Refusals still name who and where: a 403 the user who lacked the role, a 502 the
/// backend that failed (hostile test r3, finding 6: both were `null`).
#[tokio::test]
async fn a_refused_user_and_a_failed_backend_are_named_in_the_log() {
    // A port that was bound and released: connecting to it is refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let toml = format!(
        "{}[pools.dead]\nbackends = [{{ address = \"{dead}\" }}]\n\
         [auth.jwt]\nissuer = \"idp\"\naudience = \"api\"\n[[auth.jwt.keys]]\nalgorithm = \"HS256\"\nsecret = \"acct\"\n\
         [[routes]]\nname = \"admin\"\npath = \"/admin\"\npool = \"dead\"\nauth = \"jwt\"\nroles = [\"admin\"]\n\
         [[routes]]\nname = \"down\"\npath = \"/down\"\npool = \"dead\"\n",
        listener("public")
    );
    let gw = start_gateway(&toml).await;
    let mut log = gw.gateway.shared.access_log.subscribe();
    let c = client();
    let b = base(&gw);
    let token = format!(
        "Bearer {}",
        hs256(
            "acct",
            serde_json::json!({"sub": "alice", "role": "user", "iss": "idp", "aud": "api", "exp": now() + 600})
        )
    );
    let r = get(
        &c,
        &format!("{b}/admin"),
        &[("Authorization", &token), ("X-Request-Id", "acct-403")],
    )
    .await;
    assert_eq!(r.status, 403);
    let rec = one(
        &records_for(&mut log, "acct-403", Duration::from_secs(2)).await,
        "403",
    );
    assert_eq!(rec.user_id.as_deref(), Some("alice"), "{rec:?}");

    let r = get(&c, &format!("{b}/down"), &[("X-Request-Id", "acct-502")]).await;
    assert_eq!(r.status, 502);
    assert!(
        !String::from_utf8_lossy(&r.body).contains(&dead.port().to_string()),
        "the client is not told the backend"
    );
    let rec = one(
        &records_for(&mut log, "acct-502", Duration::from_secs(2)).await,
        "502",
    );
    assert_eq!(rec.upstream, Some(dead.to_string()), "{rec:?}");
}

/// An upload the client abandons mid-body (closing the connection: Content-Length,
/// chunked, after `Expect: 100-continue`; or resetting its HTTP/2 stream) is a client
/// gone: logged 499 with no bytes sent, and nothing reaches the upstream. A body that
/// is malformed stays a 400 (hostile r3b §6: all were logged 400 "cannot read
/// request body", 125 bytes).
#[tokio::test]
async fn an_upload_abandoned_mid_body_is_499_and_a_malformed_one_400() {
    let up = upstream("never").await;
    let gw = start_gateway(&cfg(up.addr, "")).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let cases: [(&str, &[u8], bool); 3] = [
        ("cl", b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\nX-Request-Id: up-cl\r\n\r\nfirst bytes", false),
        ("chunked", b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-Request-Id: up-chunked\r\n\r\n5\r\nfirst\r\n", false),
        ("expect", b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\nExpect: 100-continue\r\nX-Request-Id: up-expect\r\n\r\n", true),
    ];
    for (name, head, expect) in cases {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(head).await.expect("write");
        if expect {
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
                .await
                .expect("100 Continue in time")
                .expect("read");
            assert!(buf[..n].starts_with(b"HTTP/1.1 100"), "{:?}", String::from_utf8_lossy(&buf[..n]));
            s.write_all(b"some of the body").await.expect("write");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(s);
        let r = one(&records_for(&mut log, &format!("up-{name}"), Duration::from_millis(1500)).await, name);
        assert_eq!((r.status, r.bytes), (499, 0), "{name}: {r:?}");
        assert_eq!(r.route.as_deref(), Some("t"), "{name}: {r:?}");
    }

    // HTTP/2: the client resets its stream mid-body.
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    let (tx, body) = piped_body();
    let req = http::Request::post(format!("http://{addr}/up"))
        .header("x-request-id", "up-h2")
        .body(body)
        .expect("request");
    tx.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"first")))).await.expect("frame");
    let pending = tokio::spawn(send.send_request(req));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // An error from the body makes hyper's client reset the stream.
    tx.send(Err(std::io::Error::other("client gave up"))).await.expect("frame");
    let _ = tokio::time::timeout(Duration::from_secs(2), pending).await;
    let r = one(&records_for(&mut log, "up-h2", Duration::from_millis(1500)).await, "h2");
    assert_eq!((r.status, r.bytes), (499, 0), "h2: {r:?}");

    // Malformed: a chunk size that is no number.
    let answer = raw(
        addr,
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nX-Request-Id: up-bad\r\n\r\nzz\r\nfirst\r\n0\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let r = one(&records_for(&mut log, "up-bad", Duration::from_millis(1500)).await, "malformed");
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(up.hits(), 0, "no upload reached the upstream");
}

type FrameResult = Result<hyper::body::Frame<Bytes>, std::io::Error>;
type FrameStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = FrameResult> + Send>>;

/// A request body fed from a channel of frames (for a client that stops mid-body).
fn piped_body() -> (
    tokio::sync::mpsc::Sender<FrameResult>,
    http_body_util::StreamBody<FrameStream>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel::<FrameResult>(4);
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
    (tx, http_body_util::StreamBody::new(Box::pin(stream)))
}

/// HTTP/2 streams still waiting on their upstream when the drain runs out are logged
/// (499, as every request dropped before its answer) by the time `cut` returns, so
/// before the process exits; before, they ran in tasks of their own that the exit
/// simply ended, and got no line.
#[tokio::test]
async fn http2_streams_cut_at_the_drain_limit_are_logged_before_exit() {
    let up = upstream("slow").await;
    // On a worker thread of its own, as the binary serves: the streams' tasks are
    // not run by the test's runtime while it waits.
    let mut c = l7_sidecar::Config::parse(&cfg(up.addr, "")).expect("config");
    c.observability.access_log = false;
    let gw = l7_sidecar::Gateway::new(c, None).expect("gateway");
    let gw = l7_sidecar::server::start_workers(gw, 1).await.expect("start");
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let mut send = h2_sender(addr).await;
    let a = tokio::spawn(send.send_request(h2_get(addr, "/delay/3000", "cut-h2-a")));
    let b = tokio::spawn(send.send_request(h2_get(addr, "/delay/3000", "cut-h2-b")));
    eventually(Duration::from_secs(3), "upstream got both", || up.hits() >= 2).await;
    assert!(!gw.drain(Duration::from_millis(200)).await, "still in flight");
    assert!(gw.cut(Duration::from_secs(1)).await, "cut connections closed");
    let recs = all_records(&mut log, Duration::from_millis(1)).await;
    for id in ["cut-h2-a", "cut-h2-b"] {
        let mine: Vec<_> = recs.iter().filter(|r| r.request_id == id).cloned().collect();
        let r = one(&mine, id);
        assert_eq!(r.status, 499, "{r:?}");
    }
    a.abort();
    b.abort();
}

/// A traced (sampled) request dropped before its answer names its route like an
/// untraced one (hostile r3 leftover: the traced path logged no route).
#[tokio::test]
async fn a_traced_request_dropped_before_its_answer_names_its_route() {
    let up = upstream("slow").await;
    let toml = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntrace_sample_rate = 1.0\n{}",
        cfg(up.addr, "")
    );
    let gw = start_gateway(&toml).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /delay/1500 HTTP/1.1\r\nHost: a\r\nX-Request-Id: traced-gone\r\n\r\n")
        .await
        .expect("write");
    eventually(Duration::from_secs(3), "upstream got the request", || up.hits() >= 1).await;
    drop(s);
    let r = one(&records_for(&mut log, "traced-gone", Duration::from_millis(1200)).await, "traced");
    assert_eq!(r.status, 499, "{r:?}");
    assert_eq!(r.route.as_deref(), Some("t"), "{r:?}");
}

/// A request dropped while its upstream works names the backend it was sent to and
/// the user it authenticated as, as answered requests do (hostile r3b §6: both were
/// empty on 499 lines).
#[tokio::test]
async fn a_request_dropped_while_the_upstream_works_names_backend_and_user() {
    let up = upstream("slow").await;
    let toml = format!(
        "{}[pools.t]\nbackends = [{{ address = \"{}\" }}]\n\
         [auth.jwt]\nissuer = \"idp\"\naudience = \"api\"\n[[auth.jwt.keys]]\nalgorithm = \"HS256\"\nsecret = \"acct\"\n\
         [[routes]]\nname = \"t\"\npath = \"/\"\npool = \"t\"\nauth = \"jwt\"\n",
        listener("public"),
        up.addr
    );
    let gw = start_gateway(&toml).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    let token = hs256(
        "acct",
        serde_json::json!({"sub": "alice", "iss": "idp", "aud": "api", "exp": now() + 600}),
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET /delay/1500 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\nX-Request-Id: gone-named\r\n\r\n")
            .as_bytes(),
    )
    .await
    .expect("write");
    eventually(Duration::from_secs(3), "upstream got the request", || up.hits() >= 1).await;
    drop(s);
    let r = one(&records_for(&mut log, "gone-named", Duration::from_millis(1200)).await, "gone");
    assert_eq!(r.status, 499, "{r:?}");
    assert_eq!(r.user_id.as_deref(), Some("alice"), "{r:?}");
    assert_eq!(r.upstream, Some(up.addr.to_string()), "{r:?}");
}
