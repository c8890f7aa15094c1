//! Upstream connections as the response body uses them: released for reuse at the
//! body's end, not before; driven by the body's reader.

use super::*;
use crate::conns::{checkout, idle_count, UpBody};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A loopback HTTP/1.1 backend answering `body_len` bytes; counts accepted connections.
/// With `close_idle`, it closes each connection after its first response.
async fn backend(body_len: usize, close_idle: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Body::full(vec![
                        b'x';
                        body_len
                    ])))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .keep_alive(!close_idle)
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (addr, accepted)
}

fn soon() -> Instant {
    Instant::now() + Duration::from_secs(5)
}

/// One GET over a checked-out connection; reads `read` frames of the body (all if None).
async fn get(addr: SocketAddr, read_all: bool) -> bool {
    let mut c = checkout(addr, Duration::from_secs(2), Instant::now(), soon()).await.unwrap();
    let reused = c.reused;
    let req = http::Request::get("/")
        .header(http::header::HOST, "b")
        .body(UpBody::new(Bytes::new()))
        .unwrap();
    let resp = c.send(req, soon()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let guard =
        crate::balance::ActiveGuard::new(crate::balance::BackendRegistry::default().get("t", addr));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut body = StreamedBody::new(resp.into_body(), guard, deadline).with_conn(c);
    if read_all {
        while let Some(f) = body.frame().await {
            f.unwrap();
        }
    } else {
        // One frame of a large body, then give up on it (a client that went away).
        body.frame().await.unwrap().unwrap();
    }
    reused
}

#[tokio::test]
async fn sequential_requests_share_one_connection() {
    let (addr, accepted) = backend(100, false).await;
    let mut reused = Vec::new();
    for _ in 0..5 {
        reused.push(get(addr, true).await);
    }
    assert_eq!(reused, [false, true, true, true, true]);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "every request reused the connection"
    );
    assert_eq!(idle_count(addr), 1);
}

/// Tasks of a multi-threaded runtime move between its threads: idle connections must
/// be found from any of them, or each thread opens its own and the rest sit idle
/// (seen as memory growth per request in `tests/memory.rs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_threaded_runtime_reuses_connections_across_its_threads() {
    let (addr, accepted) = backend(100, false).await;
    for _ in 0..40 {
        tokio::spawn(get(addr, true)).await.expect("request task");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one connection carried every sequential request"
    );
}

#[tokio::test]
async fn a_body_not_read_to_its_end_does_not_return_its_connection() {
    let (addr, accepted) = backend(4 << 20, false).await;
    assert!(!get(addr, false).await);
    assert_eq!(
        idle_count(addr),
        0,
        "a half-read connection must not be reused"
    );
    assert!(
        !get(addr, true).await,
        "the next request needs a new connection"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_idle_connection_the_backend_closed_is_skipped() {
    let (addr, accepted) = backend(10, true).await;
    assert!(!get(addr, true).await);
    // Give the close time to arrive. It is read either by the body's last poll (then
    // the connection is never pooled) or at the next checkout, which then dials.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Not an error and not a retry: checkout just dials again.
    assert!(!get(addr, true).await);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

/// A connection has no task of its own: the request drives it while it waits for its
/// response, the body while it streams. A task per connection cost two cross-task
/// wake-ups per request.
#[tokio::test]
async fn upstream_connections_have_no_task_of_their_own() {
    let (addr, accepted) = backend(100, false).await;
    let metrics = tokio::runtime::Handle::current().metrics();
    for _ in 0..3 {
        get(addr, true).await;
    }
    // Backend side only: its accept loop and one task per accepted connection.
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(
        metrics.num_alive_tasks(),
        1 + 1,
        "a task besides the backend's accept loop and its connection"
    );
}

/// A body larger than the socket buffers arrives only while the body is polled: the
/// connection is driven by the body's reader, frame by frame, to its end, and then
/// serves the next request.
#[tokio::test]
async fn a_large_body_streams_through_the_request_driven_connection() {
    let (addr, accepted) = backend(8 << 20, false).await;
    let mut c = checkout(addr, Duration::from_secs(2), Instant::now(), soon()).await.unwrap();
    let req = http::Request::get("/")
        .header(http::header::HOST, "b")
        .body(UpBody::new(Bytes::new()))
        .unwrap();
    let resp = c.send(req, soon()).await.unwrap();
    let guard =
        crate::balance::ActiveGuard::new(crate::balance::BackendRegistry::default().get("t", addr));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut body = StreamedBody::new(resp.into_body(), guard, deadline).with_conn(c);
    let mut n = 0;
    while let Some(f) = body.frame().await {
        n += f.unwrap().into_data().map_or(0, |d| d.len());
    }
    drop(body);
    assert_eq!(n, 8 << 20);
    assert!(get(addr, true).await, "reused after its long body");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

