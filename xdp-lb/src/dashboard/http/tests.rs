use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::*;
use crate::{
    api::{ConfigStatus, StatusReply},
    stats::Snapshot,
};

fn empty_probe(unix_ms: u64) -> Probe {
    Probe {
        status: StatusReply {
            config: ConfigStatus {
                path: "/tmp/xdp-lb.toml".into(),
                loaded_unix_ms: 0,
                changed_on_disk: false,
                disk_error: None,
                rejected_edit: None,
                owner_problem: None,
                services: 0,
                start_differences: vec![],
            },
            interfaces: vec![],
            services: vec![],
            announce: None,
        },
        stats: api::StatsReply { unix_ms, snapshot: Snapshot { services: vec![], reasons: Default::default() } },
        events: vec![],
    }
}

/// A dashboard on loopback whose control loop answers probes with an empty daemon and records
/// the API requests it is sent (answering each with ok).
async fn start() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let (addr, seen, _) = start_counting().await;
    (addr, seen)
}

/// [`start`], also counting the probes the control loop answered.
async fn start_counting() -> (SocketAddr, Arc<Mutex<Vec<String>>>, Arc<std::sync::atomic::AtomicUsize>) {
    let probed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&probed);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (probe_tx, mut probes) = mpsc::channel::<ProbeReply>(4);
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(4);
    tokio::spawn(serve(listener, probe_tx, jobs_tx, None, vec![]));
    let mut clock = 1_000;
    tokio::spawn(async move {
        while let Some(reply) = probes.recv().await {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            clock += 1_000;
            let _ = reply.send(Ok(empty_probe(clock)));
        }
    });
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Some((request, reply)) = jobs.recv().await {
            record.lock().unwrap().push(serde_json::to_string(&request).unwrap());
            let _ = reply.send(api::Response::ok(serde_json::Value::Null));
        }
    });
    (addr, seen, probed)
}

async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await.expect("answered in time").expect("read");
    out
}

fn post_request(path: &str, host: &str, extra: &str, body: &str) -> String {
    format!("POST {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}

#[tokio::test]
async fn the_page_is_served_and_loads_nothing_from_elsewhere() {
    let (addr, _) = start().await;
    for (path, kind) in [("/", "text/html"), ("/app.js", "text/javascript"), ("/style.css", "text/css")] {
        let answer = exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{path}: {answer}");
        assert!(answer.contains(kind), "{path}: {answer}");
        assert!(answer.contains("default-src 'self'"), "{path} has no content security policy: {answer}");
    }
    // Offline: no asset names another host.
    for text in [INDEX_HTML, APP_JS, STYLE_CSS] {
        assert!(!text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"), "an external reference in {text}");
    }
    let missing = exchange(addr, "GET /nope HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let wrong = exchange(addr, &post_request("/", "127.0.0.1", "", "")).await;
    assert!(wrong.starts_with("HTTP/1.1 405"), "{wrong}");
}

#[tokio::test]
async fn the_stream_sends_an_update_a_second_with_rates_from_the_second_on() {
    let (addr, _) = start().await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.expect("write");
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    let started = std::time::Instant::now();
    while text.matches("data: ").count() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.expect("an update in time").expect("read");
        assert!(n > 0, "closed: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(started.elapsed() < Duration::from_millis(2500), "two updates took {:?}", started.elapsed());
    assert!(text.contains("text/event-stream"), "{text}");
    let views: Vec<View> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect();
    assert_eq!(views[0].interval_s, None);
    assert_eq!(views[1].interval_s, Some(1.0), "rates over the fake clock's second");
    assert_eq!(views[0].changes, Changes::Allowed, "a loopback listener allows changes");
}

/// Reads from an event stream until it has sent `n` updates.
async fn updates(s: &mut TcpStream, n: usize) -> String {
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while text.matches("data: ").count() < n {
        let read = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf)).await.expect("an update in time").expect("read");
        assert!(read > 0, "closed: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..read]));
    }
    text
}

/// The control loop is read once per update whatever the number of open pages: each read costs
/// it a `status` and a `stats` (megabytes with thousands of backends).
#[tokio::test]
async fn many_pages_cost_the_control_loop_one_read_per_update() {
    let (addr, _, probed) = start_counting().await;
    let mut streams = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /api/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.expect("write");
        streams.push(s);
    }
    for s in &mut streams {
        updates(s, 3).await;
    }
    let reads = probed.load(std::sync::atomic::Ordering::Relaxed);
    assert!(reads <= 5, "6 pages with 3 updates each took {reads} reads of the daemon");
    drop(streams);
}

#[tokio::test]
async fn a_scheduler_switch_is_the_cli_request_and_needs_the_header_and_a_loopback_host() {
    let (addr, seen) = start().await;
    let body = r#"{"service":"web","scheduler":"round-robin"}"#;
    let no_header = exchange(addr, &post_request("/api/scheduler", "127.0.0.1", "", body)).await;
    assert!(no_header.starts_with("HTTP/1.1 403"), "{no_header}");
    assert!(no_header.contains(CSRF_HEADER), "the refusal names the header: {no_header}");
    let rebound = exchange(addr, &post_request("/api/scheduler", "evil.example:8080", "X-XDP-LB-Dashboard: 1\r\n", body)).await;
    assert!(rebound.starts_with("HTTP/1.1 421") && rebound.contains("evil.example"), "{rebound}");
    let cross = exchange(addr, &post_request("/api/scheduler", "127.0.0.1", "X-XDP-LB-Dashboard: 1\r\nOrigin: http://evil.example\r\n", body)).await;
    assert!(cross.starts_with("HTTP/1.1 403") && cross.contains("Origin"), "{cross}");
    assert!(seen.lock().unwrap().is_empty(), "a refused change reached the daemon");
    let ok = exchange(
        addr,
        &post_request("/api/scheduler", &addr.to_string(), &format!("X-XDP-LB-Dashboard: 1\r\nOrigin: http://{addr}\r\n"), body),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let sent = seen.lock().unwrap().clone();
    assert_eq!(sent.len(), 1);
    let request: api::Request = serde_json::from_str(&sent[0]).unwrap();
    match request {
        api::Request::ServiceUpdate { name, changes } => {
            assert_eq!(name, "web");
            assert_eq!(changes.scheduler.as_deref(), Some("round-robin"));
            assert!(!changes.is_empty() && changes.vip.is_none() && !changes.force);
        }
        other => panic!("not a service update: {other:?}"),
    }
    let malformed = exchange(addr, &post_request("/api/drain", "127.0.0.1", "X-XDP-LB-Dashboard: 1\r\n", r#"{"service":"web"}"#)).await;
    assert!(malformed.starts_with("HTTP/1.1 400") && malformed.contains("missing field"), "{malformed}");
    let big = "x".repeat(MAX_BODY + 10);
    let too_big = exchange(addr, &post_request("/api/drain", "127.0.0.1", "X-XDP-LB-Dashboard: 1\r\n", &big)).await;
    assert!(too_big.starts_with("HTTP/1.1 413"), "{too_big}");
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn beyond_loopback_a_change_needs_the_token() {
    let read_only = Access { loopback: false, token: None };
    let plain = headers(&[("host", "192.0.2.1:8080"), (CSRF_HEADER, "1")]);
    let (status, why) = read_only.refuse_change(&plain, || false).expect("refused");
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(why.contains("read-only"), "{why}");
    let tokened = Access { loopback: false, token: Some("s3cret".into()) };
    let (_, why) = tokened.refuse_change(&plain, || false).expect("refused without the token");
    assert!(why.contains("token"), "{why}");
    let wrong = headers(&[("host", "192.0.2.1:8080"), (CSRF_HEADER, "1"), ("authorization", "Bearer nope")]);
    assert_eq!(tokened.refuse_change(&wrong, || false).map(|r| r.0), Some(StatusCode::UNAUTHORIZED));
    let right = headers(&[("host", "192.0.2.1:8080"), (CSRF_HEADER, "1"), ("authorization", "Bearer s3cret")]);
    assert_eq!(tokened.refuse_change(&right, || false), None);
    let no_csrf = headers(&[("host", "192.0.2.1:8080"), ("authorization", "Bearer s3cret")]);
    assert!(tokened.refuse_change(&no_csrf, || false).is_some(), "the token does not replace the CSRF header");
    assert_eq!(read_only.changes(), Changes::ReadOnly);
    assert_eq!(tokened.changes(), Changes::NeedToken);
}

#[test]
fn loopback_hosts() {
    for host in ["127.0.0.1", "127.0.0.1:9000", "localhost:80", "LOCALHOST", "[::1]:80", "[::1]", "127.5.6.7"] {
        assert!(is_loopback_host(host), "{host}");
    }
    for host in ["", "evil.example", "localhost.evil.example:80", "192.0.2.1:80", "[2001:db8::1]:80", "127.0.0.1.nip.io"] {
        assert!(!is_loopback_host(host), "{host}");
    }
}

/// DNS rebinding (hostile2 F4): on a loopback listener every request, reads included, needs a
/// loopback `Host`, or a page of another name re-resolved to 127.0.0.1 reads the whole state.
#[tokio::test]
async fn every_request_on_loopback_needs_a_loopback_host() {
    let (addr, seen) = start().await;
    for path in ["/", "/app.js", "/api/snapshot", "/api/stream"] {
        let answer = exchange(addr, &format!("GET {path} HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 421"), "{path}: {answer}");
        assert!(answer.contains("evil.example") && answer.contains("loopback"), "{path}: the refusal names the Host: {answer}");
    }
    let explain = r#"{"source":"10.0.0.1:1234","destination":"10.0.0.2:80","protocol":"tcp"}"#;
    let answer = exchange(addr, &post_request("/api/explain", "evil.example", "X-XDP-LB-Dashboard: 1\r\n", explain)).await;
    assert!(answer.starts_with("HTTP/1.1 421"), "{answer}");
    assert!(seen.lock().unwrap().is_empty(), "a rebound explain reached the daemon");
    let fine = exchange(addr, &format!("GET /api/snapshot HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")).await;
    assert!(fine.starts_with("HTTP/1.1 200"), "{fine}");
}

/// hostile2 F5: an Origin, when present, is exactly `http://<Host>` (host case-insensitive):
/// `null` and another scheme are refused.
#[tokio::test]
async fn an_origin_must_be_this_dashboard_exactly() {
    let (addr, seen) = start().await;
    let body = r#"{"service":"web","scheduler":"maglev"}"#;
    let port = addr.port();
    let host = format!("localhost:{port}");
    for origin in ["null".to_string(), format!("https://localhost:{port}"), "http://localhost".into(), format!("http://localhost:{port}/")] {
        let answer = exchange(addr, &post_request("/api/scheduler", &host, &format!("X-XDP-LB-Dashboard: 1\r\nOrigin: {origin}\r\n"), body)).await;
        assert!(answer.starts_with("HTTP/1.1 403") && answer.contains("Origin"), "{origin}: {answer}");
    }
    assert!(seen.lock().unwrap().is_empty(), "a change with a foreign Origin reached the daemon");
    let upper = exchange(addr, &post_request("/api/scheduler", &host, &format!("X-XDP-LB-Dashboard: 1\r\nOrigin: http://LOCALHOST:{port}\r\n"), body)).await;
    assert!(upper.starts_with("HTTP/1.1 200"), "{upper}");
}

/// hostile2 F16: a POST whose body never arrives is answered (and closed) after the body timeout.
#[tokio::test]
async fn a_body_that_never_arrives_times_out() {
    let (addr, seen) = start().await;
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"POST /api/scheduler HTTP/1.1\r\nHost: 127.0.0.1\r\nX-XDP-LB-Dashboard: 1\r\nContent-Length: 1000\r\n\r\n{").await.expect("write");
    let started = std::time::Instant::now();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(9), s.read_to_string(&mut out)).await.expect("answered and closed in time").expect("read");
    assert!(out.starts_with("HTTP/1.1 408") && out.contains("body"), "{out}");
    assert!(started.elapsed() >= Duration::from_secs(4), "too early: {:?}", started.elapsed());
    assert!(seen.lock().unwrap().is_empty());
}

/// hostile2 F15: the `Bearer` scheme is case-insensitive (RFC 7235).
#[test]
fn the_bearer_scheme_is_case_insensitive() {
    let tokened = Access { loopback: false, token: Some("s3cret".into()) };
    for auth in ["bearer s3cret", "BEARER s3cret", "Bearer  s3cret"] {
        let h = headers(&[("host", "192.0.2.1:8080"), (CSRF_HEADER, "1"), ("authorization", auth)]);
        assert_eq!(tokened.refuse_change(&h, || false), None, "{auth}");
    }
}

/// Runs curl as `user` (via setpriv; root keeps root) POSTing a scheduler switch; returns
/// `(status, body)`.
async fn post_as(user: Option<&str>, addr: SocketAddr) -> (String, String) {
    let url = format!("http://{addr}/api/scheduler");
    let mut command = match user {
        Some(user) => {
            let mut c = std::process::Command::new("setpriv");
            c.args([&format!("--reuid={user}"), "--regid=nogroup", "--clear-groups", "curl"]);
            c
        }
        None => std::process::Command::new("curl"),
    };
    command.args(["-s", "-m", "5", "-w", "\n%{http_code}", "-H", "X-XDP-LB-Dashboard: 1", "-H", "content-type: application/json", "-X", "POST"]);
    command.args(["-d", r#"{"service":"web","scheduler":"maglev"}"#, &url]);
    let out = tokio::task::spawn_blocking(move || command.output().expect("run curl")).await.unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.to_string())
}

/// hostile2 F10: loopback is no authentication boundary; a change from loopback without the
/// token needs a root-owned socket, the same rule as the API socket. Reads stay open.
#[tokio::test]
async fn a_change_from_loopback_needs_root_or_the_token() {
    assert!(nix_is_root(), "run as root: this test drops to nobody");
    let (addr, seen) = start().await;
    let (status, body) = post_as(Some("nobody"), addr).await;
    assert_eq!(status, "403", "{body}");
    assert!(body.contains("changes from loopback need root or the token"), "{body}");
    assert!(seen.lock().unwrap().is_empty(), "an unprivileged change reached the daemon");
    let (status, body) = post_as(None, addr).await;
    assert_eq!(status, "200", "{body}");
    assert_eq!(seen.lock().unwrap().len(), 1);
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

#[tokio::test]
async fn a_route_question_names_a_backend_without_gateway_and_needs_the_header() {
    let (addr, _) = start().await;
    let host = addr.to_string();
    let body = r#"{"backend":"10.0.0.9:80","method":"GET","path":"/users"}"#;
    let out = exchange(addr, &post_request("/api/route", &host, "X-XDP-LB-Dashboard: 1\r\n", body)).await;
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    assert!(out.contains("no --gateway-admin for backend 10.0.0.9:80") && out.contains("none"), "{out}");
    let out = exchange(addr, &post_request("/api/route", &host, "", body)).await;
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    let out = exchange(addr, &post_request("/api/route", &host, "X-XDP-LB-Dashboard: 1\r\n", r#"{"backend":1}"#)).await;
    assert!(out.starts_with("HTTP/1.1 400") && out.contains("/api/route"), "{out}");
}
