use super::*;
use bytes::Bytes;

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
    let e = checkout(addr, Duration::from_secs(2), Instant::now(), soon()).await.err().unwrap();
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
    assert!(!passed_now(&mut timer, later), "the earlier deadline is no timeout now");
    std::future::poll_fn(|cx| {
        if timer_passed(&mut timer, cx, later) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    assert!(Instant::now() >= later, "woken at the later deadline, not before");
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
    let mut c = checkout(addr, Duration::from_secs(2), start, deadline).await.unwrap();
    let req = http::Request::get("/")
        .header(http::header::HOST, "b")
        .body(UpBody::new(Bytes::new()))
        .unwrap();
    let e = c.send(req, deadline).await.expect_err("no answer");
    assert!(matches!(e, SendError::Deadline), "{e}");
    assert!(Instant::now() >= deadline);
    hold.abort();
}

/// Hostile test s16-F4: after a burst and then quiet, idle connections the backend had
/// closed stayed in CLOSE-WAIT (each holding a descriptor) for as long as the process
/// ran: only a checkout or the 1024th release looked at them. The worker's periodic
/// sweep drops them, and those past their idle timeout.
#[tokio::test]
async fn the_sweep_drops_idle_connections_the_backend_closed_or_that_expired() {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(l.accept().await.unwrap().0);
        }
        held
    });
    let now = Instant::now();
    let first = checkout(addr, Duration::from_secs(2), now, soon()).await.unwrap();
    let second = checkout(addr, Duration::from_secs(2), now, soon()).await.unwrap();
    first.release();
    second.release();
    let mut held = accepted.await.unwrap();
    assert_eq!(idle_count(addr), 2);
    sweep_idle(Instant::now());
    assert_eq!(idle_count(addr), 2, "open and fresh: kept");
    // The backend closes one of them.
    drop(held.pop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    sweep_idle(Instant::now());
    assert_eq!(idle_count(addr), 1, "the one the backend closed is dropped");
    sweep_idle(now + IDLE_TIMEOUT + Duration::from_secs(1));
    assert_eq!(idle_count(addr), 0, "past its idle timeout");
}
