//! Upstream answers the gateway must not pass on: ambiguous framing (Content-Length
//! with Transfer-Encoding, differing Content-Lengths) and an unsolicited
//! `101 Switching Protocols`. Each is a 502 with the request id, the upstream
//! connection is not reused, and the backend is charged a failure (passive health).
mod common;
use common::*;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A raw HTTP/1.1 backend answering by path with canned bytes: `/clte` (Content-Length
/// 5 and chunked "abc"), `/dupcl` (two differing Content-Lengths), `/sw101` (101 to a
/// plain GET, then raw bytes), `/early103` and `/cont100` (informational heads before a
/// 200 "ok"), anything else 200 "ok". Counts connections and `/clte` requests.
struct Raw {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    /// `/clte` requests (not health checks).
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Raw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn raw_upstream() -> Raw {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let conns = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let (c, r) = (conns.clone(), requests.clone());
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = read_request(&mut s, &mut buf).await {
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    if path.starts_with("/clte") {
                        r.fetch_add(1, Ordering::SeqCst);
                    }
                    let answer: &[u8] = if path.starts_with("/clte") {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                    } else if path.starts_with("/dupcl") {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 5\r\n\r\nabc"
                    } else if path.starts_with("/early103") {
                        b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    } else if path.starts_with("/cont100") {
                        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    } else if path.starts_with("/sw101") {
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nRAW-AFTER-101"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Raw {
        addr,
        conns,
        requests,
        task,
    }
}

fn cfg(backends: &[SocketAddr], pool_extra: &str) -> String {
    let list = backends
        .iter()
        .map(|a| format!("{{ address = \"{a}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{}[pools.t]\nbackends = [{list}]\nretries = 0\n{pool_extra}\n[[routes]]\nname = \"t\"\npath = \"/\"\npool = \"t\"\n",
        listener("public")
    )
}

/// 502 `upstream_error` whose body names the request id the client got.
fn assert_upstream_error(r: &Reply, what: &str) {
    assert_eq!(
        r.status,
        502,
        "{what}: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    let j = r.json();
    assert_eq!(j["error"], "upstream_error", "{what}: {j}");
    let rid = r.header("x-request-id").expect("request id header");
    assert_eq!(j["request_id"], rid.as_str(), "{what}: {j}");
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_a_502_and_the_connection_is_dropped() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(&[up.addr], "")).await;
    let mut log = gw.gateway.shared.access_log.subscribe();
    let c = client();
    let r = get(&c, &format!("{}/clte", base(&gw)), &[]).await;
    assert_upstream_error(&r, "CL + TE");
    let rec = tokio::time::timeout(Duration::from_secs(5), log.recv())
        .await
        .expect("log in time")
        .expect("record");
    assert_eq!(rec.status, 502, "the access log tells what the client got");
    // Its framing cannot be trusted: the next request goes on a new connection.
    let ok = get(&c, &format!("{}/ok", base(&gw)), &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(&ok.body[..], b"ok");
    assert_eq!(up.conns.load(Ordering::SeqCst), 2, "connection not reused");
}

#[tokio::test]
async fn differing_content_lengths_are_a_502() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(&[up.addr], "")).await;
    let c = client();
    let r = get(&c, &format!("{}/dupcl", base(&gw)), &[]).await;
    assert_upstream_error(&r, "two Content-Lengths");
    let ok = get(&c, &format!("{}/ok", base(&gw)), &[]).await;
    assert_eq!(&ok.body[..], b"ok");
    assert_eq!(up.conns.load(Ordering::SeqCst), 2, "connection not reused");
}

#[tokio::test]
async fn an_unsolicited_101_is_a_502_and_the_client_connection_lives_on() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(&[up.addr], "")).await;
    let addr = gw.addr("public").expect("addr");
    // One raw client connection: the 502 and then the next answer on it.
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /sw101 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let read_until = |got: &mut Vec<u8>, needle: &'static [u8]| {
        let found = got.windows(needle.len()).any(|w| w == needle);
        found
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !read_until(&mut got, b"upstream_error") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no 502 in time; got {:?}", String::from_utf8_lossy(&got)))
            .expect("read");
        assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(!text.contains("RAW-AFTER-101"), "{text}");
    // The client connection still carries requests.
    got.clear();
    s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    while !got.ends_with(b"ok") {
        let n = tokio::time::timeout_at(deadline, s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| {
                panic!("no answer in time; got {:?}", String::from_utf8_lossy(&got))
            })
            .expect("read");
        assert!(n > 0, "closed; got {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(
        up.conns.load(Ordering::SeqCst),
        2,
        "the switched connection is not reused"
    );
}

/// A backend that keeps answering with broken framing is ejected like one answering 5xx.
#[tokio::test]
async fn broken_framing_counts_against_passive_health() {
    let bad = raw_upstream().await;
    let good = upstream("good").await;
    let passive = "algorithm = \"round-robin\"\n[pools.t.passive]\nconsecutive_failures = 2\nbase_ejection_ms = 30000\nmax_ejection_ms = 60000\nmax_ejected_percent = 50\n";
    let gw = start_gateway(&cfg(&[bad.addr, good.addr], passive)).await;
    let c = client();
    for _ in 0..10 {
        let r = get(&c, &format!("{}/clte", base(&gw)), &[]).await;
        assert!(r.status == 200 || r.status == 502, "{}", r.status);
    }
    assert_eq!(
        bad.requests.load(Ordering::SeqCst),
        2,
        "ejected after 2 consecutive bad answers"
    );
}

/// Informational heads other than 101 are skipped, and the connection stays in step.
#[tokio::test]
async fn other_informational_heads_do_not_desync_the_connection() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(&[up.addr], "")).await;
    let c = client();
    for path in ["/early103", "/cont100", "/ok", "/early103"] {
        let r = get(&c, &format!("{}{path}", base(&gw)), &[]).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(&r.body[..], b"ok", "{path}");
        assert!(
            r.header("link").is_none(),
            "{path}: no hint header leaks into the answer"
        );
    }
    assert_eq!(
        up.conns.load(Ordering::SeqCst),
        1,
        "one upstream connection throughout"
    );
}
