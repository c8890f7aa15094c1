//! Balancing algorithms, active/passive health, timeouts and retries over real HTTP.
mod common;
use common::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn route(pool: &str) -> String {
    format!("[[routes]]\nname = \"r\"\npath = \"/\"\npool = \"{pool}\"\n")
}

async fn services(c: &Client, url: &str, n: usize, headers: &[(&str, &str)]) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let r = get(c, url, headers).await;
        assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
        out.push(r.json()["service"].as_str().unwrap_or_default().to_string());
    }
    out
}

fn counts(v: &[String]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for s in v {
        *m.entry(s.clone()).or_default() += 1;
    }
    m
}

#[tokio::test]
async fn round_robin_and_smooth_weighted_round_robin() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let weighted = format!(
        "[pools.w]\nalgorithm = \"weighted-round-robin\"\nbackends = [{{ address = \"{}\", weight = 3 }}, {{ address = \"{}\", weight = 1 }}]\n",
        a.addr, b.addr
    );
    let cfg = format!(
        "{}{}{weighted}{}[[routes]]\nname = \"w\"\npath = \"/w\"\npool = \"w\"\n",
        listener("public"),
        pool("rr", &[&a, &b], "algorithm = \"round-robin\""),
        route("rr")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let rr = services(&c, &format!("{}/x", base(&gw)), 10, &[]).await;
    assert!(
        rr.windows(2).all(|w| w[0] != w[1]),
        "round robin alternates: {rr:?}"
    );
    let w = services(&c, &format!("{}/w", base(&gw)), 8, &[]).await;
    assert_eq!(counts(&w).get("a"), Some(&6), "3:1 weights: {w:?}");
    assert!(
        !w.windows(4).any(|x| x.iter().all(|s| s == "a")),
        "smooth: no run of 4 on the heavy backend: {w:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_avoids_busy_backend() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let cfg = format!(
        "{}{}{}",
        listener("public"),
        pool("p", &[&a, &b], "algorithm = \"least-connections\""),
        route("p")
    );
    let gw = start_gateway(&cfg).await;
    let busy = gw.gateway.runtime().upstreams["p"]
        .pool
        .backends
        .iter()
        .position(|x| x.addr == a.addr)
        .expect("a in pool");
    let backend = gw.gateway.runtime().upstreams["p"].pool.backends[busy].clone();
    // Pretend a holds many long requests.
    backend.active.fetch_add(50, Ordering::SeqCst);
    let c = client();
    let got = services(&c, &format!("{}/x", base(&gw)), 20, &[]).await;
    backend.active.fetch_sub(50, Ordering::SeqCst);
    assert_eq!(counts(&got).get("b"), Some(&20), "{got:?}");
}

#[tokio::test]
async fn least_response_time_prefers_fast_backend() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let cfg = format!(
        "{}{}{}",
        listener("public"),
        pool("p", &[&a, &b], "algorithm = \"least-response-time\""),
        route("p")
    );
    let gw = start_gateway(&cfg).await;
    let rt = gw.gateway.runtime();
    let slow = rt.upstreams["p"]
        .pool
        .backends
        .iter()
        .find(|x| x.addr == a.addr)
        .expect("a")
        .clone();
    slow.observe_latency(Duration::from_millis(500));
    let c = client();
    let got = services(&c, &format!("{}/x", base(&gw)), 20, &[]).await;
    assert_eq!(
        counts(&got).get("b"),
        Some(&20),
        "peak EWMA keeps traffic off the slow backend: {got:?}"
    );
}

#[tokio::test]
async fn hashing_is_sticky_by_ip_header_and_cookie() {
    let ups = [
        upstream("a").await,
        upstream("b").await,
        upstream("c").await,
    ];
    let refs: Vec<_> = ups.iter().collect();
    let cfg = format!(
        "{}{}{}{}[[routes]]\nname = \"h\"\npath = \"/h\"\npool = \"h\"\n[[routes]]\nname = \"k\"\npath = \"/k\"\npool = \"k\"\n",
        listener("public"),
        pool("ip", &refs, "algorithm = \"ip-hash\""),
        pool("h", &refs, "algorithm = \"consistent-hash\"\nhash_on = \"header:X-Account\""),
        pool("k", &refs, "algorithm = \"consistent-hash\"\nhash_on = \"cookie:session\"")
    ) + &route("ip");
    let gw = start_gateway(&cfg).await;
    let c = client();
    let b = base(&gw);
    let ip = services(&c, &format!("{b}/x"), 6, &[]).await;
    assert_eq!(counts(&ip).len(), 1, "same client IP, same backend: {ip:?}");
    let mut seen = std::collections::HashSet::new();
    for acct in 0..30 {
        let acct = format!("acct-{acct}");
        let s = services(&c, &format!("{b}/h"), 3, &[("X-Account", &acct)]).await;
        assert_eq!(counts(&s).len(), 1, "sticky per header value: {s:?}");
        seen.insert(s[0].clone());
        let cookie = format!("theme=dark; session={acct}");
        let s = services(&c, &format!("{b}/k"), 3, &[("Cookie", &cookie)]).await;
        assert_eq!(counts(&s).len(), 1, "sticky per cookie: {s:?}");
    }
    assert!(
        seen.len() >= 2,
        "different keys spread over backends: {seen:?}"
    );
}

#[tokio::test]
async fn active_health_check_removes_and_restores_backend() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let hc = "[pools.p.health_check]\npath = \"/health\"\ninterval_ms = 50\ntimeout_ms = 200\nrise = 2\nfall = 2\n";
    let cfg = format!(
        "{}{}{}",
        listener("public"),
        pool("p", &[&a, &b], hc),
        route("p")
    );
    let gw = start_gateway(&cfg).await;
    let rt = gw.gateway.runtime();
    let ba = rt.upstreams["p"]
        .pool
        .backends
        .iter()
        .find(|x| x.addr == a.addr)
        .expect("a")
        .clone();
    a.healthy.store(false, Ordering::SeqCst);
    eventually(Duration::from_secs(5), "a marked unhealthy", || {
        !ba.is_healthy()
    })
    .await;
    let c = client();
    let got = services(&c, &format!("{}/x", base(&gw)), 6, &[]).await;
    assert_eq!(counts(&got).get("b"), Some(&6), "{got:?}");
    a.healthy.store(true, Ordering::SeqCst);
    eventually(Duration::from_secs(5), "a healthy again", || {
        ba.is_healthy()
    })
    .await;
    let metrics = get(&c, &format!("{}/metrics", base(&gw)), &[]).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains("gateway_upstream_healthy"),
        "health gauge exported"
    );
}

#[tokio::test]
async fn passive_ejection_after_consecutive_5xx_with_growing_time() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let passive = "[pools.p.passive]\nconsecutive_failures = 2\nbase_ejection_ms = 2000\nmax_ejection_ms = 8000\nmax_ejected_percent = 50\n";
    let cfg = format!(
        "{}{}{}",
        listener("public"),
        pool(
            "p",
            &[&a, &b],
            &format!("algorithm = \"round-robin\"\nretries = 0\n{passive}")
        ),
        route("p")
    );
    let gw = start_gateway(&cfg).await;
    let rt = gw.gateway.runtime();
    let ba = rt.upstreams["p"]
        .pool
        .backends
        .iter()
        .find(|x| x.addr == a.addr)
        .expect("a")
        .clone();
    a.force_status.store(503, Ordering::SeqCst);
    let c = client();
    let url = format!("{}/x", base(&gw));
    for _ in 0..4 {
        get(&c, &url, &[]).await;
    }
    assert!(
        ba.is_ejected(std::time::Instant::now()),
        "a ejected after 2 consecutive 5xx"
    );
    let got = services(&c, &url, 4, &[]).await;
    assert_eq!(
        counts(&got).get("b"),
        Some(&4),
        "ejected backend gets no traffic: {got:?}"
    );
    // b failing too must not eject it: at most 50% of the pool.
    b.force_status.store(503, Ordering::SeqCst);
    for _ in 0..4 {
        get(&c, &url, &[]).await;
    }
    let bb = rt.upstreams["p"]
        .pool
        .backends
        .iter()
        .find(|x| x.addr == b.addr)
        .expect("b")
        .clone();
    assert!(
        !bb.is_ejected(std::time::Instant::now()),
        "max_ejected_percent respected"
    );
    b.force_status.store(0, Ordering::SeqCst);
    eventually(Duration::from_secs(8), "ejection expires", || {
        !ba.is_ejected(std::time::Instant::now())
    })
    .await;
    for _ in 0..6 {
        get(&c, &url, &[]).await;
    }
    assert_eq!(ba.ejection_count(), 2, "ejected again after returning");
    let metrics =
        String::from_utf8_lossy(&get(&c, &format!("{}/metrics", base(&gw)), &[]).await.body)
            .to_string();
    assert!(
        metrics.contains("gateway_upstream_ejections_total"),
        "ejections exported"
    );
}

#[tokio::test]
async fn retries_idempotent_requests_on_connection_failure() {
    let a = upstream("a").await;
    // A port that refuses connections: bind then drop.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let cfg = format!(
        "{}[pools.p]\nalgorithm = \"round-robin\"\nretries = 1\nbackends = [{{ address = \"{dead}\" }}, {{ address = \"{}\" }}]\n[pools.p.passive]\nconsecutive_failures = 0\n{}",
        listener("public"),
        a.addr,
        route("p")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let url = format!("{}/x", base(&gw));
    for i in 0..4 {
        let r = get(&c, &url, &[]).await;
        assert_eq!(r.status, 200, "GET {i} retried on the live backend");
    }
    // POST is not idempotent: when it lands on the dead backend it is not retried.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(send(&c, "POST", &url, &[], "x").await.status.as_u16());
    }
    assert!(
        statuses.contains(&502) && statuses.contains(&200),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn no_backend_gives_502_503_504_with_json() {
    let slow = upstream("slow").await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let cfg = format!(
        "{}[pools.dead]\nbackends = [{{ address = \"{dead}\" }}]\nretries = 0\n{}[pools.slow]\nbackends = [{{ address = \"{}\" }}]\nrequest_timeout_ms = 200\n\
         [[routes]]\nname = \"d\"\npath = \"/dead\"\npool = \"dead\"\n[[routes]]\nname = \"s\"\npath = \"/delay\"\npool = \"slow\"\n",
        listener("public"),
        "[pools.dead.passive]\nconsecutive_failures = 1\nbase_ejection_ms = 60000\nmax_ejection_ms = 60000\nmax_ejected_percent = 100\n",
        slow.addr
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let b = base(&gw);
    let r = get(&c, &format!("{b}/dead"), &[]).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["error"].as_str()),
        (502, Some("upstream_error"))
    );
    let r = get(&c, &format!("{b}/dead"), &[]).await;
    assert_eq!(
        r.status,
        503,
        "the only backend is ejected now: {:?}",
        r.json()
    );
    let r = get(&c, &format!("{b}/delay/2000"), &[]).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["status"], 504);
}

/// A backend that answers each connection's first request and closes the connection
/// 30 ms later, while the gateway holds it idle (a backend's keep-alive timeout).
async fn closes_idle_after_one() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                // The head, then the body its Content-Length announces (POST "x").
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            });
        }
    });
    (addr, accepted)
}

/// A pooled connection the backend closed while it sat idle never carried the next
/// request: even a POST goes on a new connection, and the backend is not blamed.
#[tokio::test]
async fn a_pooled_connection_closed_while_idle_costs_no_attempt() {
    let (addr, accepted) = closes_idle_after_one().await;
    let cfg = format!(
        "{}[pools.p]\nretries = 0\nbackends = [{{ address = \"{addr}\" }}]\n[pools.p.passive]\nconsecutive_failures = 1\n{}",
        listener("public"),
        route("p")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let url = format!("{}/x", base(&gw));
    for i in 0..4 {
        let r = send(&c, "POST", &url, &[], "x").await;
        assert_eq!(r.status, 200, "POST {i}: {:?}", r.body);
        // Past the backend's close of the connection the gateway keeps idle.
        tokio::time::sleep(Duration::from_millis(80)).await;
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        4,
        "one connection per request"
    );
}

/// A backend that accepts connections, counts them and closes each without an
/// answer: a failed attempt the test can count.
async fn counting_dead_backend() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = n.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    (addr, n)
}

/// Hostile finding: with round-robin, `retries = 1` and one dead backend, every
/// request tried the dead one first, because the retry's pick moved the shared
/// position too. A retry takes the backend after the request's own pick and leaves
/// the position alone, so successive requests alternate their first pick.
#[tokio::test]
async fn round_robin_retries_do_not_move_the_shared_position() {
    // Two backends, one failing: half the first attempts go to it, not all.
    let a = upstream("a").await;
    let (bad, bad_hits) = counting_dead_backend().await;
    let cfg = format!(
        "{}[pools.p]\nalgorithm = \"round-robin\"\nretries = 1\nbackends = [{{ address = \"{bad}\" }}, {{ address = \"{}\" }}]\n[pools.p.passive]\nconsecutive_failures = 0\n{}",
        listener("public"),
        a.addr,
        route("p")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let url = format!("{}/x", base(&gw));
    for i in 0..6 {
        let r = get(&c, &url, &[]).await;
        assert_eq!(r.status, 200, "GET {i} retried on the live backend");
    }
    assert_eq!(a.hits(), 6);
    assert_eq!(
        bad_hits.load(Ordering::SeqCst),
        3,
        "first attempts alternate: every second request starts at the failing backend"
    );
    drop(gw);
    // Hostile test r3b, 6: three backends, the first refusing connections (a closed
    // port). First picks go dead, a, b in turn; the retries after dead take turns
    // over a and b, so both serve half (it was a 20 : b 10, the successor carrying
    // the dead one's whole share). The dead port's first attempts are a third.
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let cfg = format!(
        "{}[pools.p]\nalgorithm = \"round-robin\"\nretries = 1\nbackends = [{{ address = \"{dead}\" }}, {{ address = \"{}\" }}, {{ address = \"{}\" }}]\n[pools.p.passive]\nconsecutive_failures = 0\n{}",
        listener("public"),
        a.addr,
        b.addr,
        route("p")
    );
    let gw = start_gateway(&cfg).await;
    let url = format!("{}/x", base(&gw));
    let got = services(&c, &url, 30, &[]).await;
    assert_eq!(
        (counts(&got).get("a"), counts(&got).get("b")),
        (Some(&15), Some(&15)),
        "{got:?}"
    );
    assert_eq!((a.hits(), b.hits()), (15, 15), "one attempt each, none repeated");
}
