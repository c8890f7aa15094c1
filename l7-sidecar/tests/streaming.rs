//! Responses stream through the gateway; the request deadline also bounds the body.
mod common;
use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An upstream that sends the head and a first chunk, then waits for `release`.
async fn trickle_upstream() -> (std::net::SocketAddr, tokio::sync::mpsc::Sender<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(4);
    tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf).await;
        let head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n5\r\nfirst\r\n";
        if s.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        if rx.recv().await.is_some() {
            let _ = s.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await;
        }
        // Keep the socket open until the test ends.
        let _ = s.read(&mut buf).await;
    });
    (addr, tx)
}

fn cfg(addr: std::net::SocketAddr, timeout_ms: u64) -> String {
    format!(
        "{}[pools.t]\nbackends = [{{ address = \"{addr}\" }}]\nrequest_timeout_ms = {timeout_ms}\n[[routes]]\nname = \"t\"\npath = \"/\"\npool = \"t\"\n",
        listener("public")
    )
}

#[tokio::test]
async fn response_streams_before_upstream_finishes() {
    let (addr, release) = trickle_upstream().await;
    let gw = start_gateway(&cfg(addr, 10_000)).await;
    let mut log = gw.gateway.shared.access_log.subscribe();
    let c = client();
    let req = http::Request::get(format!("{}/s", base(&gw)))
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .expect("head in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first chunk arrives while the upstream still holds the rest")
        .expect("frame")
        .expect("ok frame");
    assert_eq!(
        first.into_data().expect("data"),
        Bytes::from_static(b"first")
    );
    release.send(()).await.expect("release upstream");
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .expect("rest in time")
        .expect("rest")
        .to_bytes();
    assert_eq!(rest, Bytes::from_static(b"second"));
    let rec = tokio::time::timeout(Duration::from_secs(5), log.recv())
        .await
        .expect("log in time")
        .expect("record");
    assert_eq!(rec.bytes, 11, "access log counts streamed bytes");
}

#[tokio::test]
async fn slow_body_is_cut_at_the_request_deadline() {
    let (addr, _release) = trickle_upstream().await;
    let gw = start_gateway(&cfg(addr, 1000)).await;
    let c = client();
    let req = http::Request::get(format!("{}/s", base(&gw)))
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = tokio::time::timeout(Duration::from_secs(5), c.request(req))
        .await
        .expect("head in time")
        .expect("response");
    let started = std::time::Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .expect("body ends in time");
    assert!(
        r.is_err(),
        "truncated body is reported as an error to the client"
    );
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn drain_finishes_in_flight_requests_then_refuses_new_ones() {
    let up = upstream("p").await;
    let gw = start_gateway(&format!(
        "{}{}[[routes]]\nname = \"r\"\npath = \"/\"\npool = \"p\"\n",
        listener("public"),
        pool("p", &[&up], "")
    ))
    .await;
    let url = format!("{}/delay/1500", base(&gw));
    let c = client();
    // An idle keep-alive connection must not hold the drain up.
    assert_eq!(
        get(&c, &format!("{}/warm", base(&gw)), &[]).await.status,
        200
    );
    let in_flight = tokio::spawn({
        let c = client();
        async move { get(&c, &url, &[]).await.status }
    });
    eventually(
        Duration::from_secs(5),
        "request reached the upstream",
        || up.hits() >= 2,
    )
    .await;
    let started = std::time::Instant::now();
    assert!(
        gw.drain(Duration::from_secs(5)).await,
        "all connections closed"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "drain waited for the in-flight request"
    );
    assert_eq!(
        in_flight.await.expect("request task"),
        200,
        "in-flight request completed"
    );
    let addr = gw.addr("public").expect("addr");
    let refused =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await;
    assert!(
        !matches!(refused, Ok(Ok(_))),
        "no new connections after drain"
    );
}
