//! TLS with SNI and ALPN, WebSocket pass-through and protocol hardening.
mod common;
use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct TestCert {
    der: CertificateDer<'static>,
    cert_path: String,
    key_path: String,
}

fn make_cert(dir: &std::path::Path, name: &str) -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("self-signed cert");
    let cert_path = dir.join(format!("{name}.crt"));
    let key_path = dir.join(format!("{name}.key"));
    std::fs::write(&cert_path, ck.cert.pem()).expect("write cert");
    std::fs::write(&key_path, ck.key_pair.serialize_pem()).expect("write key");
    TestCert {
        der: ck.cert.der().clone(),
        cert_path: cert_path.display().to_string(),
        key_path: key_path.display().to_string(),
    }
}

async fn tls_connect(
    addr: std::net::SocketAddr,
    sni: &str,
    roots: &[&TestCert],
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let mut store = rustls::RootCertStore::empty();
    for c in roots {
        store.add(c.der.clone()).expect("add root");
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await.expect("tcp connect");
    let name = ServerName::try_from(sni.to_string()).expect("server name");
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(name, tcp),
    )
    .await
    .expect("handshake in time")
    .unwrap_or_else(|e| panic!("TLS handshake for {sni} failed: {e}"))
}

#[tokio::test]
async fn tls_picks_certificate_by_sni_and_negotiates_h2_or_http1() {
    let up = upstream("p").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = (
        make_cert(dir.path(), "a.test"),
        make_cert(dir.path(), "b.test"),
    );
    let cfg = format!(
        "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\
         [[listeners.tls.certificates]]\ncert_file = \"{}\"\nkey_file = \"{}\"\nserver_names = [\"a.test\"]\n\
         [[listeners.tls.certificates]]\ncert_file = \"{}\"\nkey_file = \"{}\"\nserver_names = [\"b.test\"]\n{}\
         [[routes]]\nname = \"r\"\npath = \"/\"\npool = \"p\"\n",
        a.cert_path,
        a.key_path,
        b.cert_path,
        b.key_path,
        pool("p", &[&up], "")
    );
    let gw = start_gateway(&cfg).await;
    let addr = gw.addr("public").expect("listener");

    // Trusting only b's cert: connecting as b.test works only if SNI picked b.
    let tls = tls_connect(addr, "b.test", &[&b], &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]), "ALPN h2");
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = http::Request::get("https://b.test/over-h2")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = send.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    assert_eq!(up.last().headers["x-forwarded-proto"], "https");
    assert_eq!(
        up.last().headers["host"],
        "b.test",
        "HTTP/2 :authority becomes Host upstream"
    );

    let tls = tls_connect(addr, "a.test", &[&a], &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1 handshake");
    tokio::spawn(conn);
    let req = http::Request::get("/over-h1")
        .header("host", "a.test")
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = send.send_request(req).await.expect("h1 response");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("over-h1"));

    // Unknown SNI falls back to the first certificate (a), which a b-only client rejects.
    let mut store = rustls::RootCertStore::empty();
    store.add(b.der.clone()).expect("root");
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(store)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("tcp");
    let r = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("a.test").expect("name"), tcp)
        .await;
    assert!(r.is_err(), "a.test must not be served b's certificate");
}

#[tokio::test]
async fn websocket_echoes_through_gateway() {
    let ws_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind ws upstream");
    let ws_addr = ws_listener.local_addr().expect("addr");
    let echo = tokio::spawn(async move {
        for _ in 0..4 {
            let Ok((s, _)) = ws_listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                // Bounded: a test conversation is a handful of messages.
                for _ in 0..1000 {
                    let Some(Ok(m)) = ws.next().await else { break };
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let cfg = format!(
        "[observability]\naccess_log = false\n{}[pools.ws]\nbackends = [{{ address = \"{ws_addr}\" }}]\n[[routes]]\nname = \"ws\"\npath = \"/ws\"\npool = \"ws\"\nwebsocket = true\n\
         [[routes]]\nname = \"plain\"\npath = \"/plain\"\npool = \"ws\"\n",
        listener("public")
    );
    let gw = start_gateway(&cfg).await;
    let addr = gw.addr("public").expect("listener");
    let (mut ws, resp) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/echo")),
    )
    .await
    .expect("ws connect in time")
    .expect("ws handshake through gateway");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        let msg = format!("hello {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::Text(msg.clone()))
            .await
            .expect("send");
        let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("echo in time")
            .expect("frame")
            .expect("ok frame");
        assert_eq!(got.into_text().expect("text"), msg);
    }
    // A reload keeps the open WebSocket.
    let cfg2 = l7_sidecar::Config::parse(&cfg.replace("name = \"plain\"", "name = \"plain2\""))
        .expect("valid");
    gw.gateway.reload(cfg2).await.expect("reload");
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "after reload".into(),
    ))
    .await
    .expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("frame")
        .expect("ok");
    assert_eq!(got.into_text().expect("text"), "after reload");
    // Upgrades on routes without websocket = true are refused.
    let r = tokio_tungstenite::connect_async(format!("ws://{addr}/plain")).await;
    assert!(r.is_err(), "upgrade refused on a non-websocket route");
    echo.abort();
}

async fn raw(addr: std::net::SocketAddr, data: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(data).await.expect("write");
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        for _ in 0..1000 {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
                        // Headers complete; give the body a moment then stop.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        if let Ok(Ok(n)) =
                            tokio::time::timeout(Duration::from_millis(50), s.read(&mut chunk))
                                .await
                        {
                            buf.extend_from_slice(&chunk[..n]);
                        }
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).to_string()
}

#[tokio::test]
async fn hardening_limits_and_smuggling() {
    let up = upstream("p").await;
    let cfg = format!(
        "[server]\nmax_body_bytes = 1024\nmax_headers = 20\nmax_header_bytes = 8192\nheader_read_timeout_ms = 300\n{}{}[[routes]]\nname = \"r\"\npath = \"/\"\npool = \"p\"\n",
        listener("public"),
        pool("p", &[&up], "")
    );
    let gw = start_gateway(&cfg).await;
    let addr = gw.addr("public").expect("listener");

    let r = raw(addr, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n").await;
    assert!(r.starts_with("HTTP/1.1 400"), "CL+TE rejected: {r:?}");

    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..40 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let r = raw(addr, many.as_bytes()).await;
    assert!(
        r.starts_with("HTTP/1.1 431") || r.is_empty(),
        "too many headers refused: {r:?}"
    );

    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let r = raw(addr, big.as_bytes()).await;
    assert!(
        r.starts_with("HTTP/1.1 431") || r.is_empty(),
        "oversized header refused: {r:?}"
    );

    let body = "b".repeat(4096);
    let c = client();
    let r = send(&c, "POST", &format!("http://{addr}/upload"), &[], &body).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "payload_too_large");

    // Slowloris: a header that never finishes is cut off.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("server closes slow client in time");
    assert!(started.elapsed() < Duration::from_secs(3));
    let text = String::from_utf8_lossy(&buf[..n.unwrap_or(0)]).to_string();
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text:?}"
    );

    // Garbage never panics the gateway; it keeps serving.
    for junk in [
        &b"\x00\xff\xfe garbage\r\n\r\n"[..],
        b"GET /%ff%00/../../etc HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
    ] {
        let _ = raw(addr, junk).await;
    }
    assert_eq!(
        get(&c, &format!("http://{addr}/still-alive"), &[])
            .await
            .status,
        200
    );
    assert!(
        up.seen
            .lock()
            .expect("seen")
            .iter()
            .all(|s| s.uri != "/upload"),
        "oversized body never forwarded"
    );
}

#[tokio::test]
async fn connection_limit_closes_excess_connections() {
    let up = upstream("p").await;
    let cfg = format!(
        "[server]\nmax_connections = 2\nheader_read_timeout_ms = 3000\n{}{}[[routes]]\nname = \"r\"\npath = \"/\"\npool = \"p\"\n",
        listener("public"),
        pool("p", &[&up], "")
    );
    let gw = start_gateway(&cfg).await;
    let addr = gw.addr("public").expect("listener");
    let _c1 = TcpStream::connect(addr).await.expect("c1");
    let _c2 = TcpStream::connect(addr).await.expect("c2");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c3 = TcpStream::connect(addr).await.expect("c3 tcp accept");
    let _ = c3.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), c3.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "third connection closed without an answer");
    drop((_c1, _c2));
    let c = client();
    let mut ok = false;
    for _ in 0..50 {
        if tokio::time::timeout(
            Duration::from_secs(1),
            c.request(
                http::Request::get(format!("http://{addr}/x"))
                    .body(Full::new(Bytes::new()))
                    .expect("req"),
            ),
        )
        .await
        .is_ok_and(|r| r.is_ok_and(|r| r.status() == 200))
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "capacity returns once connections close");
}
