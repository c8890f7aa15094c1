//! Upstream answers with broken or lenient framing, and request fields rewritten on
//! their way upstream (issue 10, black-box findings 4–8 and 11). Each case is a raw
//! TCP backend that sends exactly the bytes in question.
mod common;
use common::*;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One step of a canned answer: bytes to write, or a pause.
enum Step {
    Send(&'static [u8]),
    Wait(u64),
}
use Step::{Send, Wait};

/// The canned answer for the last path segment of a request; the connection is
/// closed after the answers that say so (`close`).
fn script(key: &str) -> (Vec<Step>, bool) {
    let ok: &'static [u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    match key {
        // Finding 4: invalid chunked bodies, all in the head's segment.
        "chjunk" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nok\r\n0\r\n\r\n")], true),
        "chhuge" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffffff\r\nok\r\n0\r\n\r\n")], true),
        "ch0x" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n0\r\n\r\n")], true),
        "chneg" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-2\r\nok\r\n0\r\n\r\n")], true),
        "chnocrlf" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n")], true),
        "chnozero" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n")], true),
        "trlnul" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nX-T: a\0b\r\n\r\n")], true),
        // A body cut after the head went out (a pause, then the close).
        "cutch" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"), Wait(300)], true),
        "cutcl" => (vec![Send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"), Wait(300)], true),
        // More than prefetch reads ahead (64 KiB) of a 128 KiB chunk, then the close.
        "cutbig" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20000\r\n"), Send(&BIG), Wait(300)], true),
        "cutbignow" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n20000\r\n"), Send(&BIG)], true),
        // Finding 5: trailers with connection-specific and forbidden fields.
        "trailers" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-md5\r\n\r\n2\r\nok\r\n0\r\nX-Md5: abc\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: gzip\r\nUpgrade: h2c\r\nProxy-Connection: close\r\nContent-Length: 99\r\nHost: evil\r\nTE: trailers\r\nAuthorization: x\r\nSet-Cookie: s=1\r\nContent-Type: text/evil\r\nX-Kept: 1\r\n\r\n")], false),
        // Several chunks and trailers in the head's segment: all read ahead at once.
        "chmulti" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n3\r\nabc\r\n1\r\n!\r\n0\r\nX-T: 1\r\n\r\n")], false),
        // Finding 11: lenient framing.
        "cllist" => (vec![Send(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok")], false),
        "clzeros" => (vec![Send(b"HTTP/1.1 200 OK\r\nContent-Length: 0002\r\n\r\nok")], false),
        "tegzip" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")], true),
        "tegzip2" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")], true),
        "s600" => (vec![Send(b"HTTP/1.1 600 Odd\r\nContent-Length: 2\r\n\r\nok")], true),
        "s999" => (vec![Send(b"HTTP/1.1 999 Odd\r\nContent-Length: 2\r\n\r\nok")], true),
        "v10" => (vec![Send(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")], true),
        // Finding 8: a body the upstream stops sending (cut at the request deadline).
        "stall" => (vec![Send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello"), Wait(5_000)], true),
        // Finding 1 (s15b): names removed from the head, or owned by the gateway, as trailers.
        "trgw" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nServer: evil\r\n\r\n2\r\nok\r\n0\r\nServer: evil\r\nX-Secret-Internal: 1\r\nX-Request-Id: forged\r\nX-User-Id: admin\r\nX-User-Role: admin\r\nStrict-Transport-Security: max-age=0\r\nRateLimit-Remaining: 99\r\nRateLimit-Limit: 99\r\nRateLimit-Reset: 1\r\nRateLimit-Policy: 9;w=1\r\nX-Frame-Options: ALLOW\r\nX-Kept: 1\r\n\r\n")], false),
        // Finding 10 (s15b): chunked twice is "chunked, chunked" (RFC 9112 §6.1).
        "te2" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")], true),
        "te2one" => (vec![Send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")], true),
        _ => (vec![Send(ok)], false),
    }
}

/// Body bytes of `cutbig`: more than the 64 KiB read ahead before the head goes out.
static BIG: [u8; 80 * 1024] = [b'a'; 80 * 1024];

struct Raw {
    addr: SocketAddr,
    /// Every request head received, in order.
    heads: Arc<Mutex<Vec<String>>>,
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
    let heads = Arc::new(Mutex::new(Vec::new()));
    let h = heads.clone();
    let task = tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = read_request(&mut s, &mut buf).await {
                    let path = head.split(' ').nth(1).unwrap_or("/").to_string();
                    let key = path.rsplit('/').next().unwrap_or("").to_string();
                    h.lock().expect("heads").push(head);
                    let (steps, close) = script(&key);
                    for step in steps {
                        match step {
                            Send(b) => {
                                if s.write_all(b).await.is_err() {
                                    return;
                                }
                            }
                            Wait(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                        }
                    }
                    if close {
                        return;
                    }
                }
            });
        }
    });
    Raw { addr, heads, task }
}

fn cfg(up: SocketAddr, request_timeout_ms: u64) -> String {
    format!(
        "{}[pools.t]\nbackends = [{{ address = \"{up}\" }}]\nretries = 0\nrequest_timeout_ms = {request_timeout_ms}\n[[routes]]\nname = \"t\"\npath = \"/\"\npool = \"t\"\n",
        listener("public")
    )
}

/// Send `req` on a new raw connection and read until the gateway closes it (or 5 s).
/// Returns what arrived and whether the connection ended with a reset.
async fn raw_exchange(addr: SocketAddr, req: &[u8]) -> (Vec<u8>, bool) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(req).await.expect("write");
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!("no close in time; got {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(0)) => return (got, false),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Ok(Err(e)) => panic!("read: {e}"),
        }
    }
}

/// The next access-log record (within 5 s).
async fn next_record(
    log: &mut tokio::sync::broadcast::Receiver<l7_sidecar::observe::AccessRecord>,
) -> l7_sidecar::observe::AccessRecord {
    tokio::time::timeout(Duration::from_secs(5), log.recv())
        .await
        .expect("log in time")
        .expect("record")
}

/// Finding 4: a chunked body that is invalid from the start never lets the head out:
/// the client gets the usual 502 with its request id, and the log says 502.
#[tokio::test]
async fn an_invalid_chunked_body_before_anything_went_out_is_a_502() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let mut log = gw.gateway.shared.access_log.subscribe();
    let c = client();
    for key in ["chjunk", "chhuge", "ch0x", "chneg", "chnocrlf", "chnozero", "trlnul"] {
        let r = get(&c, &format!("{}/raw/{key}", base(&gw)), &[]).await;
        assert_eq!(r.status, 502, "{key}: {:?}", String::from_utf8_lossy(&r.body));
        let j = r.json();
        assert_eq!(j["error"], "upstream_error", "{key}: {j}");
        let rid = r.header("x-request-id").expect("request id header");
        assert_eq!(j["request_id"], rid.as_str(), "{key}: {j}");
        let rec = next_record(&mut log).await;
        assert_eq!(rec.status, 502, "{key}: the access log tells what the client got");
        assert_eq!(rec.bytes, r.body.len() as u64, "{key}: bytes sent");
    }
}

/// Findings 4 and 7: a body cut after the head went out ends the client connection
/// abortively (HTTP/1.0, which has no other way to tell a cut from an end), and the
/// access log counts the bytes the client got.
#[tokio::test]
async fn a_body_cut_after_the_head_resets_the_client_connection() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    for (key, version) in [("cutch", "1.0"), ("cutcl", "1.0"), ("cutch", "1.1")] {
        let req = format!("GET /raw/{key} HTTP/{version}\r\nHost: x\r\n\r\n");
        let (got, reset) = raw_exchange(addr, req.as_bytes()).await;
        let text = String::from_utf8_lossy(&got).to_string();
        assert!(text.starts_with("HTTP/1."), "{key} {version}: {text}");
        assert!(text.contains("hello"), "{key} {version}: {text}");
        assert!(!text.ends_with("0\r\n\r\n"), "{key} {version}: no last chunk: {text}");
        assert!(reset, "{key} HTTP/{version}: the cut is a reset, not a FIN: {text}");
        let rec = next_record(&mut log).await;
        assert_eq!(rec.bytes, 5, "{key} {version}: the bytes the client got");
    }
}

async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
        .await
        .expect("h2 handshake");
    tokio::spawn(conn);
    send
}

/// Finding 5: trailers keep their own fields and lose connection-specific and
/// forbidden ones over HTTP/2, where a connection-specific field used to reset the
/// stream; an HTTP/1.1 client that asked for trailers gets none of those either.
#[tokio::test]
async fn trailers_lose_connection_specific_and_forbidden_fields() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let addr = gw.addr("public").expect("addr");
    let mut send = h2_client(addr).await;
    let req = http::Request::get("http://x/raw/trailers")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .expect("in time")
        .expect("h2 response");
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.expect("body and trailers, no reset");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(&collected.to_bytes()[..], b"ok");
    let mut names: Vec<&str> = trailers.keys().map(http::HeaderName::as_str).collect();
    names.sort_unstable();
    assert_eq!(names, ["x-kept", "x-md5"], "h2: {trailers:?}");

    let req = http::Request::get("http://x/raw/chmulti")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = send.send_request(req).await.expect("h2 response");
    let collected = resp.into_body().collect().await.expect("body and trailers");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(&collected.to_bytes()[..], b"okabc!", "chunks read ahead keep their order");
    assert_eq!(trailers.get("x-t").map(|v| v.as_bytes()), Some(&b"1"[..]));

    let (got, _) = raw_exchange(
        addr,
        b"GET /raw/trailers HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    let text = String::from_utf8_lossy(&got).to_lowercase();
    let tail = text.split("\r\n0\r\n").nth(1).unwrap_or_else(|| panic!("h1: no last chunk: {text}"));
    // hyper sends HTTP/1.1 trailers only when the head declares them in `Trailer`,
    // which the gateway strips with the other hop-by-hop fields: none arrive, and
    // certainly none of the refused ones.
    for bad in ["host", "content-length", "keep-alive", "upgrade", "authorization", "set-cookie", "content-type", "te:", "transfer-encoding", "proxy-connection"] {
        assert!(!tail.contains(bad), "h1 trailers keep no {bad}: {tail}");
    }
}

/// s15b finding 1: what a route's transform removes from the head, and the names
/// the gateway owns on a response (request id, identity, HSTS, rate-limit fields),
/// do not come back as trailers; other trailers still pass.
#[tokio::test]
async fn removed_and_gateway_owned_names_are_not_passed_as_trailers() {
    let up = raw_upstream().await;
    let toml = format!(
        "{}[transforms.t]\nresponse_headers_remove = [\"Server\", \"X-Secret-Internal\"]\nresponse_headers_add = {{ \"X-Frame-Options\" = \"DENY\" }}\n[[routes]]\nname = \"tr\"\npath = \"/tr\"\npool = \"t\"\ntransform = \"t\"\n",
        cfg(up.addr, 3000)
    );
    let gw = start_gateway(&toml).await;
    let addr = gw.addr("public").expect("addr");
    let mut send = h2_client(addr).await;
    for (path, kept) in [
        ("/tr/trgw", &["x-kept"][..]),
        // A route without a transform keeps `Server` and `X-Secret-Internal`
        // (nothing removed them from its head either).
        ("/raw/trgw", &["server", "x-frame-options", "x-kept", "x-secret-internal"][..]),
    ] {
        let req = http::Request::get(format!("http://x{path}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
            .await
            .expect("in time")
            .expect("h2 response");
        assert_eq!(resp.status(), 200, "{path}");
        let collected = resp.into_body().collect().await.expect("body and trailers");
        let trailers = collected.trailers().cloned().expect("trailers");
        let mut names: Vec<&str> = trailers.keys().map(http::HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, kept, "{path}: {trailers:?}");
    }
}

/// s15b finding 8: empty h2 cookie fields are skipped in the join, and when all
/// are empty no Cookie field goes upstream at all.
#[tokio::test]
async fn empty_h2_cookie_fields_are_skipped() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let addr = gw.addr("public").expect("addr");
    let mut send = h2_client(addr).await;
    for (fields, want) in [
        (&["", "a=1"][..], Some("a=1")),
        (&["a=1", ""][..], Some("a=1")),
        (&["a=1", "", "b=2"][..], Some("a=1; b=2")),
        (&["", ""][..], None),
    ] {
        let mut req = http::Request::get("http://x/raw/cookies");
        for f in fields {
            req = req.header("cookie", *f);
        }
        let resp = send
            .send_request(req.body(Full::new(Bytes::new())).expect("request"))
            .await
            .expect("h2 response");
        assert_eq!(resp.status(), 200);
        let head = up.heads.lock().expect("heads").last().cloned().expect("a request upstream");
        let cookies: Vec<&str> = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("cookie:"))
            .map(|l| l[7..].trim())
            .collect();
        assert_eq!(cookies, want.into_iter().collect::<Vec<_>>(), "{fields:?}: {head}");
    }
}

/// s15b finding 8: an h2 client's cookie fields count as the one Cookie field they
/// are joined into toward `max_headers`.
#[tokio::test]
async fn h2_cookie_fields_count_as_one_toward_max_headers() {
    let up = raw_upstream().await;
    let toml = cfg(up.addr, 3000).replacen("[pools.t]", "[server]\nmax_headers = 10\n[pools.t]", 1);
    let gw = start_gateway(&toml).await;
    let addr = gw.addr("public").expect("addr");
    let mut send = h2_client(addr).await;
    let mut req = http::Request::get("http://x/raw/cookies");
    for i in 0..30 {
        req = req.header("cookie", format!("c{i}=1"));
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("h2 response");
    assert_eq!(resp.status(), 200, "30 cookie fields are one field");
    let mut req = http::Request::get("http://x/raw/many");
    for i in 0..30 {
        req = req.header(format!("x-h{i}"), "1");
    }
    let resp = send
        .send_request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("h2 response");
    assert_eq!(resp.status(), 431, "30 other fields are still too many");
}

/// Finding 6: cookies an HTTP/2 client sends as several fields reach an HTTP/1.1
/// upstream as one field joined with "; " (RFC 9113 §8.2.3).
#[tokio::test]
async fn h2_cookie_fields_are_joined_for_an_http1_upstream() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let addr = gw.addr("public").expect("addr");
    let mut send = h2_client(addr).await;
    let req = http::Request::get("http://x/raw/cookies")
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .header("cookie", "c=3")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = send.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    let head = up.heads.lock().expect("heads").last().cloned().expect("a request upstream");
    let cookies: Vec<&str> = head
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("cookie:"))
        .collect();
    assert_eq!(cookies.len(), 1, "one Cookie field: {head}");
    assert!(cookies[0].ends_with("a=1; b=2; c=3"), "{head}");
}

/// Finding 11: a Content-Length list of one value, or with leading zeros, reaches
/// the client as the single plain number (RFC 9110 §8.6).
#[tokio::test]
async fn a_lenient_content_length_is_normalised() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let addr = gw.addr("public").expect("addr");
    for key in ["cllist", "clzeros"] {
        let req = format!("GET /raw/{key} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let (got, _) = raw_exchange(addr, req.as_bytes()).await;
        let text = String::from_utf8_lossy(&got).to_lowercase();
        let cls: Vec<&str> = text.lines().filter(|l| l.starts_with("content-length:")).collect();
        assert_eq!(cls, ["content-length: 2"], "{key}: {text}");
        assert!(text.ends_with("\r\n\r\nok"), "{key}: {text}");
    }
}

/// Finding 11: codings the gateway cannot pass on, and status codes outside
/// RFC 9110's 100–599, are refused with a 502.
#[tokio::test]
async fn unrepresentable_codings_and_statuses_are_a_502() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let c = client();
    for key in ["tegzip", "tegzip2", "te2", "te2one", "s600", "s999"] {
        let r = get(&c, &format!("{}/raw/{key}", base(&gw)), &[]).await;
        assert_eq!(r.status, 502, "{key}: {:?}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["error"], "upstream_error", "{key}");
    }
}

/// Finding 11: an upstream's HTTP/1.0 status line does not make the gateway answer
/// its HTTP/1.1 client as HTTP/1.0 on a connection it keeps alive.
#[tokio::test]
async fn an_http10_upstream_answer_goes_out_as_http11() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let addr = gw.addr("public").expect("addr");
    let (got, _) = raw_exchange(addr, b"GET /raw/v10 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

/// Finding 11: the gateway answers `100 Continue` itself (it buffers the body), so
/// the upstream gets the body without an `Expect` it would answer again.
#[tokio::test]
async fn expect_continue_is_answered_here_and_not_forwarded() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let addr = gw.addr("public").expect("addr");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"PUT /raw/expect HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n")
        .await
        .expect("write head");
    let mut chunk = [0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
        .await
        .expect("100 in time")
        .expect("read");
    assert!(chunk[..n].starts_with(b"HTTP/1.1 100"), "{:?}", String::from_utf8_lossy(&chunk[..n]));
    s.write_all(b"hello").await.expect("write body");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&got));
    let head = up.heads.lock().expect("heads").last().cloned().expect("a request upstream");
    assert!(!head.to_ascii_lowercase().contains("expect:"), "{head}");
    assert!(head.contains("PUT /raw/expect"), "{head}");
}

/// s15b finding 9: `Expect` never goes upstream, also on a request without a body
/// (a GET, or a POST with `Content-Length: 0`).
#[tokio::test]
async fn expect_is_not_forwarded_without_a_body() {
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let addr = gw.addr("public").expect("addr");
    for req in [
        &b"GET /raw/expect3 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"[..],
        &b"POST /raw/expect4 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"[..],
    ] {
        let (got, _) = raw_exchange(addr, req).await;
        let text = String::from_utf8_lossy(&got).to_string();
        assert!(text.contains("200 OK"), "{text}");
        let head = up.heads.lock().expect("heads").last().cloned().expect("a request upstream");
        assert!(!head.to_ascii_lowercase().contains("expect:"), "{head}");
    }
}


fn request_id_of(head: &str) -> String {
    head.lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap_or_else(|| panic!("no request id: {head}"))
        .trim()
        .to_string()
}

/// Finding 4: a body the upstream cuts after the head went out is a warning that
/// names the request and the backend (it used to pass silently as a 200).
#[tokio::test]
async fn a_cut_body_is_warned_with_its_request_and_backend() {
    let logs = capture();
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let addr = gw.addr("public").expect("addr");
    for key in ["cutch", "cutcl"] {
        let req = format!("GET /raw/{key} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (got, _) = raw_exchange(addr, req.as_bytes()).await;
        let rid = request_id_of(&String::from_utf8_lossy(&got));
        let text = logs.text();
        let line = text
            .lines()
            .find(|l| l.contains(&rid))
            .unwrap_or_else(|| panic!("{key}: no warning names {rid}: {text}"));
        assert!(line.contains("WARN") && line.contains("cut"), "{key}: {line}");
        assert!(line.contains(&up.addr.to_string()), "{key}: names the backend: {line}");
    }
}

/// Finding 8: when the upstream stops sending a body, the deadline's warning blames
/// the upstream, not a client that was reading all along.
#[tokio::test]
async fn a_stalled_upstream_body_is_blamed_on_the_upstream() {
    let logs = capture();
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 400)).await;
    let addr = gw.addr("public").expect("addr");
    let (got, _) = raw_exchange(addr, b"GET /raw/stall HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let text = String::from_utf8_lossy(&got).to_string();
    assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("hello"), "{text}");
    let log = logs.text();
    assert!(!log.contains("not taken by the client"), "the client was reading: {log}");
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains("upstream") && l.contains("deadline")),
        "the upstream is named as the slow side: {log}"
    );
}

/// Hostile finding s15b-5: an attempt's refused answer (a retried GET's first
/// backend included) was warned about without the request id, so it could not be
/// tied to the request.
#[tokio::test]
async fn a_refused_attempt_is_warned_with_its_request_id() {
    let logs = capture();
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 3000)).await;
    let c = client();
    let r = get(&c, &format!("{}/raw/chjunk", base(&gw)), &[]).await;
    assert_eq!(r.status, 502);
    let rid = r.header("x-request-id").expect("request id header");
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("upstream response refused"))
        .unwrap_or_else(|| panic!("no refused-attempt warning: {text}"));
    assert!(line.contains(rid.as_str()), "names the request: {line}");
}

/// Black-box finding: over HTTP/2 an upstream body that breaks after more than 64 KiB
/// (so after the head was handed to hyper) did not read as over HTTP/1. Both warn
/// and log a 200 with the bytes handed on; but when the upstream closed right after
/// its bytes (`cutbignow`), hyper reset the stream in the same turn, and the reset
/// dropped the head and data still queued: the HTTP/2 client got RST_STREAM alone
/// (curl: no status, 0 bytes) against a log line of 200 and 80 KiB. Now, as over
/// HTTP/1, the client gets the head and the bytes handed on (as far as its window
/// allows), then the reset. `cutbig` closes a while after its last bytes.
#[tokio::test]
async fn a_body_cut_after_64_kib_is_warned_and_logged_over_http2_as_over_http1() {
    let logs = capture();
    let up = raw_upstream().await;
    let gw = start_gateway(&cfg(up.addr, 5000)).await;
    let addr = gw.addr("public").expect("addr");
    let mut log = gw.gateway.shared.access_log.subscribe();
    for key in ["cutbig", "cutbignow"] {
        // HTTP/1: the reference.
        let req = format!("GET /raw/{key} HTTP/1.1\r\nHost: x\r\n\r\n");
        let (got, _) = raw_exchange(addr, req.as_bytes()).await;
        let rid = request_id_of(&String::from_utf8_lossy(&got));
        let h1 = next_record(&mut log).await;
        assert_eq!((h1.status, h1.request_id.as_str()), (200, rid.as_str()), "{key}");
        assert!(h1.bytes <= BIG.len() as u64, "{key} h1: counted {} bytes", h1.bytes);
        assert!(
            logs.text().lines().any(|l| l.contains(&rid) && l.contains("WARN") && l.contains("cut")),
            "{key} h1 warns: {}",
            logs.text()
        );
        // HTTP/2, with the protocol's default windows (64 KiB, as curl and browsers):
        // the gateway has to wait for WINDOW_UPDATEs in the middle of the body.
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .handshake(TokioIo::new(tcp))
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        let req = http::Request::get(format!("http://x/raw/{key}"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        // The reset may overtake the head in the client (the response then fails).
        let mut received = 0u64;
        let reset = tokio::time::timeout(Duration::from_secs(5), async {
            let resp = send.send_request(req).await?;
            assert_eq!(resp.status(), 200, "{key}");
            let mut body = resp.into_body();
            loop {
                match body.frame().await {
                    Some(Ok(f)) => received += f.data_ref().map_or(0, |d| d.len() as u64),
                    Some(Err(e)) => return Err(e),
                    None => return Ok(()),
                }
            }
        })
        .await
        .expect("the stream ends in time");
        assert!(reset.is_err(), "{key} h2: the cut body is a reset stream, not a clean end");
        assert!(received >= 65_535, "{key} h2: the head and a window's worth of bytes arrived first, got {received}");
        let h2 = next_record(&mut log).await;
        let rid = h2.request_id.clone();
        assert_eq!(h2.status, 200, "{key}: the head went out");
        let text = logs.text();
        let line = text
            .lines()
            .find(|l| l.contains(&rid))
            .unwrap_or_else(|| panic!("{key} h2: no warning names {rid}: {text}"));
        assert!(line.contains("WARN") && line.contains("cut"), "{key} h2: {line}");
        assert!(line.contains(&up.addr.to_string()), "{key} h2: names the backend: {line}");
    }
}
