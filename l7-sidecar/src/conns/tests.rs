use super::*;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};

/// A GET of `/` with `headers` (Host `b` written when they have none).
pub(crate) fn get_req<'a>(headers: &'a HeaderMap, body: &'a Bytes) -> Outgoing<'a> {
    static HOST: HeaderValue = HeaderValue::from_static("b");
    Outgoing {
        method: &Method::GET,
        target: "/",
        headers,
        host: Some(&HOST),
        body,
        replayable: true,
    }
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

#[tokio::test]
async fn a_refused_connect_names_the_address() {
    // Bind then drop: nothing listens there now.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let e = checkout(addr, Duration::from_secs(2), Instant::now(), soon())
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains(&addr.to_string()), "{e}");
}

/// Polls `timer_passed` once.
fn passed_now(timer: &mut Pin<Box<Sleep>>, deadline: Instant) -> bool {
    timer_passed(timer, &mut no_wake(), deadline)
}

/// The connection's timer is left armed for an earlier request's deadline (no timer
/// wheel work per request); when that one fires, it must not end a later request.
#[tokio::test]
async fn the_connection_timer_fires_only_for_the_current_deadline() {
    let start = Instant::now();
    let mut timer = Box::pin(tokio::time::sleep_until(start + Duration::from_millis(20)));
    let later = start + Duration::from_millis(150);
    assert!(!passed_now(&mut timer, later));
    tokio::time::sleep(Duration::from_millis(40)).await;
    assert!(
        !passed_now(&mut timer, later),
        "the earlier deadline is no timeout now"
    );
    std::future::poll_fn(|cx| {
        if timer_passed(&mut timer, cx, later) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    assert!(
        Instant::now() >= later,
        "woken at the later deadline, not before"
    );
    // A shorter deadline than the armed one (another pool's timeout) moves it closer.
    let far = Instant::now() + Duration::from_secs(60);
    assert!(!passed_now(&mut timer, far));
    let near = Instant::now() + Duration::from_millis(20);
    let waited = tokio::time::timeout(
        Duration::from_secs(5),
        std::future::poll_fn(|cx| {
            if timer_passed(&mut timer, cx, near) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }),
    )
    .await;
    assert!(waited.is_ok(), "the nearer deadline fired");
}

/// A backend that accepts and never answers: `send` gives up at the deadline.
#[tokio::test]
async fn send_fails_at_the_request_deadline() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let hold = tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        drop(s);
    });
    let start = Instant::now();
    let deadline = start + Duration::from_millis(100);
    let mut c = checkout(addr, Duration::from_secs(2), start, deadline)
        .await
        .unwrap();
    let e = c
        .send(&get_req(&HeaderMap::new(), &Bytes::new()), deadline)
        .await
        .err()
        .expect("no answer");
    assert!(matches!(e, SendError::Deadline), "{e}");
    assert!(Instant::now() >= deadline);
    hold.abort();
}

/// A raw backend: reads request heads (and `Content-Length` bodies) off one
/// connection, hands each request's bytes to the test, and answers each with
/// `answer`, then with `later` (if any) 50 ms after the first answer.
async fn raw_backend(
    answer: &'static [u8],
    later: Option<&'static [u8]>,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = vec![0u8; 64 * 1024];
                let mut first = true;
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = tx.send(buf.drain(..end + 4 + len).collect());
                    // No body to a HEAD request.
                    let answer = if head.starts_with("head ") {
                        let at = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                        &answer[..at + 4]
                    } else {
                        answer
                    };
                    if s.write_all(answer).await.is_err() {
                        return;
                    }
                    if let (true, Some(later)) = (first, later) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = s.write_all(later).await;
                    }
                    first = false;
                }
            });
        }
    });
    (addr, rx)
}

/// Send `req` on a checked-out connection, read the response to its end and release
/// the connection; the body's bytes, and whether the connection was reused.
async fn exchange(addr: SocketAddr, req: &Outgoing<'_>) -> Result<(Vec<u8>, bool), SendError> {
    let mut c = checkout(addr, Duration::from_secs(2), Instant::now(), soon())
        .await
        .unwrap();
    let reused = c.reused;
    let mut resp = c.send(req, soon()).await?;
    let mut body = Vec::new();
    let got = std::future::poll_fn(|cx| loop {
        match c.poll_body(&mut resp.decoder, cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Ok(d) = f.into_data() {
                    body.extend_from_slice(&d);
                }
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    })
    .await;
    got?;
    assert!(resp.decoder.is_done());
    c.release();
    Ok((body, reused))
}

/// What hyper's client sent for a buffered (`Full`) body, byte for byte: a length only
/// when there is a body (or the client's request named one), none for a bodiless GET,
/// HEAD or PUT; a large body after the head, on the same keep-alive connection.
#[tokio::test]
async fn requests_go_out_as_hyper_sent_them() {
    let (addr, mut seen) =
        raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", None).await;
    let none = HeaderMap::new();
    let mut with_zero = HeaderMap::new();
    with_zero.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    let mut own_host = HeaderMap::new();
    own_host.insert(
        http::header::HOST,
        HeaderValue::from_static("client.example"),
    );
    own_host.append("x-many", HeaderValue::from_static("1"));
    own_host.append("x-many", HeaderValue::from_static("2"));
    let empty = Bytes::new();
    let small = Bytes::from_static(b"hello");
    let large = Bytes::from(vec![b'L'; 3 * INLINE_BODY]);
    let mut cases: Vec<(Outgoing<'_>, Vec<u8>)> = Vec::new();
    let with = |method: &'static Method, target, headers, body| Outgoing {
        method,
        target,
        headers,
        host: None,
        body,
        replayable: true,
    };
    cases.push((
        get_req(&none, &empty),
        b"GET / HTTP/1.1\r\nhost: b\r\n\r\n".to_vec(),
    ));
    cases.push((
        with(&Method::GET, "/p?q=1", &own_host, &empty),
        b"GET /p?q=1 HTTP/1.1\r\nhost: client.example\r\nx-many: 1\r\nx-many: 2\r\n\r\n".to_vec(),
    ));
    cases.push((
        with(&Method::HEAD, "/", &none, &empty),
        b"HEAD / HTTP/1.1\r\n\r\n".to_vec(),
    ));
    cases.push((
        with(&Method::PUT, "/", &none, &empty),
        b"PUT / HTTP/1.1\r\n\r\n".to_vec(),
    ));
    cases.push((
        with(&Method::POST, "/", &with_zero, &empty),
        b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n".to_vec(),
    ));
    cases.push((
        with(&Method::POST, "/", &none, &small),
        b"POST / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello".to_vec(),
    ));
    let mut big = format!(
        "PUT /big HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
        large.len()
    )
    .into_bytes();
    big.extend_from_slice(&large);
    cases.push((with(&Method::PUT, "/big", &none, &large), big));
    for (i, (req, want)) in cases.iter().enumerate() {
        let (body, reused) = exchange(addr, req)
            .await
            .unwrap_or_else(|e| panic!("case {i}: {e}"));
        // HEAD's answer has no body, whatever its Content-Length says.
        let expect: &[u8] = if *req.method == Method::HEAD {
            b""
        } else {
            b"ok"
        };
        assert_eq!(body, expect, "case {i}");
        assert_eq!(reused, i > 0, "case {i}: one keep-alive connection");
        let got = seen.recv().await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want),
            "case {i}"
        );
    }
}

/// Bytes a backend sends after a complete response, while the connection sits idle,
/// answer no request: the connection is not used again (they would be read as the
/// next request's response).
#[tokio::test]
async fn bytes_sent_on_an_idle_connection_keep_it_from_reuse() {
    let (addr, _seen) = raw_backend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        Some(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"),
    )
    .await;
    let (h, b) = (HeaderMap::new(), Bytes::new());
    assert_eq!(exchange(addr, &get_req(&h, &b)).await.unwrap().0, b"ok");
    assert_eq!(idle_count(addr), 1, "released after a complete response");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e = exchange(addr, &get_req(&h, &b))
        .await
        .expect_err("not used");
    assert!(matches!(e, SendError::NotSent), "{e}");
    // The next connection is a new one, answered in step.
    let (body, reused) = exchange(addr, &get_req(&h, &b)).await.unwrap();
    assert_eq!((&body[..], reused), (&b"ok"[..], false));
}

/// A reused connection the backend closed (EOF before any byte of the answer) hands
/// an idempotent request back as not answered; a new connection that does the same is
/// an error, and so is a reused one for a request that is not replayable (a POST the
/// backend may have acted on is not sent twice).
#[tokio::test]
async fn a_close_before_the_answer_is_not_sent_only_on_a_reused_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        for _ in 0..2 {
            // One answer, then read the next request and close unanswered.
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            let _ = s.read(&mut buf).await;
            drop(s);
        }
        // Then: close at once after reading the request.
        let (mut s, _) = l.accept().await.unwrap();
        let _ = s.read(&mut buf).await;
        drop(s);
    });
    let (h, b) = (HeaderMap::new(), Bytes::new());
    exchange(addr, &get_req(&h, &b)).await.unwrap();
    let e = exchange(addr, &get_req(&h, &b)).await.expect_err("closed");
    assert!(matches!(e, SendError::NotSent), "{e}");
    exchange(addr, &get_req(&h, &b)).await.unwrap();
    let post = Outgoing {
        method: &Method::POST,
        replayable: false,
        ..get_req(&h, &b)
    };
    let e = exchange(addr, &post).await.expect_err("closed");
    assert!(matches!(e, SendError::Closed), "{e}");
    let e = exchange(addr, &get_req(&h, &b)).await.expect_err("closed");
    assert!(matches!(e, SendError::Closed), "{e}");
}

/// A connection put back idle after a large body keeps only small buffers: the read
/// buffer grew for the body (up to `MAX_READ`), and hundreds of idle connections must
/// not each hold that.
#[tokio::test]
async fn an_idle_connection_keeps_only_small_buffers() {
    let mut answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    answer.resize(answer.len() + (1 << 20), b'x');
    let answer: &'static [u8] = Box::leak(answer.into_boxed_slice());
    let (addr, _seen) = raw_backend(answer, None).await;
    let (h, b) = (HeaderMap::new(), Bytes::new());
    let (body, _) = exchange(addr, &get_req(&h, &b)).await.unwrap();
    assert_eq!(body.len(), 1 << 20);
    let (rcap, wcap, read_size) = with_idle(|m| {
        let c = &m.list(addr).expect("released")[0].conn;
        (c.rbuf.capacity(), c.wbuf.capacity(), c.read_size)
    });
    assert!(
        rcap <= IDLE_BUFFER && wcap <= IDLE_BUFFER,
        "read {rcap}, write {wcap}"
    );
    assert_eq!(
        read_size, FIRST_READ,
        "the next response starts small again"
    );
}
