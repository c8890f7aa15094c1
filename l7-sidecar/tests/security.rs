//! Regression tests for the outside security review (issue 10): each test names the
//! defect it covers and was seen failing before its fix.
mod common;
use bytes::Bytes;
use common::*;
use http_body_util::Full;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "security-secret";

fn token(sub: &str) -> String {
    hs256(
        SECRET,
        serde_json::json!({"sub": sub, "role": "member", "iss": "idp", "aud": "api", "exp": now() + 300}),
    )
}

fn bearer(sub: &str) -> String {
    format!("Bearer {}", token(sub))
}

/// A gateway in front of three echo upstreams: public (open), users and payments (JWT).
struct Setup {
    gw: l7_sidecar::RunningGateway,
    public: Arc<Upstream>,
    users: Arc<Upstream>,
    payments: Arc<Upstream>,
    orders: Arc<Upstream>,
}

async fn setup(server: &str) -> Setup {
    let public = upstream("public").await;
    let users = upstream("users").await;
    let payments = upstream("payments").await;
    let orders = upstream("orders").await;
    let cfg = format!(
        r#"
        [server]
        {server}
        {}{}{}{}{}
        [auth.jwt]
        issuer = "idp"
        audience = "api"
        [[auth.jwt.keys]]
        algorithm = "HS256"
        secret = "{SECRET}"
        [[auth.api_keys]]
        name = "partner"
        sha256 = "{}"
        user_id = "partner-1"

        [transforms.t]
        request_headers_add = {{ "X-Gateway" = "l7" }}
        strip_json_fields = ["internal_id", "password_hash"]

        [[routes]]
        name = "public"
        path = "/api/public"
        pool = "public"
        [[routes]]
        name = "slow"
        path = "/delay"
        pool = "public"
        [[routes]]
        name = "users"
        path = "/api/users"
        pool = "users"
        auth = "jwt"
        transform = "t"
        [[routes]]
        name = "v1-users"
        path = "/v1/users"
        pool = "users"
        auth = "jwt"
        [[routes]]
        name = "payments"
        path = "/api/payments"
        pool = "payments"
        auth = "jwt"
        [[routes]]
        name = "key"
        path = "/api/key"
        pool = "public"
        auth = "api-key"
        [[routes]]
        name = "summary"
        path = "/api/summary/{{id}}"
        path_match = "template"
        aggregate = [
          {{ name = "user", pool = "users", path = "/users/{{id}}" }},
          {{ name = "orders", pool = "orders", path = "/orders?user={{id}}" }},
        ]
        "#,
        listener("public"),
        pool("public", &[&public], ""),
        pool("users", &[&users], ""),
        pool("payments", &[&payments], ""),
        pool("orders", &[&orders], ""),
        l7_sidecar::auth::hash_api_key("right-key"),
    );
    Setup {
        gw: start_gateway(&cfg).await,
        public,
        users,
        payments,
        orders,
    }
}

/// Write `data` on a fresh connection and read until the peer closes or 3 s pass.
async fn raw_all(addr: SocketAddr, data: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(data).await.expect("write");
    read_for(&mut s, Duration::from_secs(3)).await
}

async fn read_for(s: &mut TcpStream, limit: Duration) -> String {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(limit, async {
        let mut chunk = [0u8; 4096];
        for _ in 0..1000 {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&buf).to_string()
}

/// True if the server closes `s` (EOF or reset) within `limit`.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    for _ in 0..100 {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
    false
}

async fn connect_from(local: &str, addr: SocketAddr) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{local}:0").parse().expect("local addr"))
        .expect("bind local");
    sock.connect(addr).await.expect("connect")
}

fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| text.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

// 1. Dot-segments and encoded separators.
#[tokio::test]
async fn dot_segments_are_normalised_before_routing_and_auth() {
    let s = setup("").await;
    let c = client();
    let base = base(&s.gw);
    for path in [
        "/api/public/../users",
        "/api/public/%2e%2e/users",
        "/api/public/%2E./users",
    ] {
        let r = get(&c, &format!("{base}{path}"), &[]).await;
        assert_eq!(r.status, 401, "{path} needs the users route's token");
    }
    assert_eq!(s.public.hits(), 0, "nothing reached the public pool");

    let auth = bearer("u1");
    let r = get(
        &c,
        &format!("{base}/api/public/%2e%2e/users/7"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.users.last().uri,
        "/api/users/7",
        "normalised path forwarded"
    );

    let r = get(
        &c,
        &format!("{base}/v1/users/../../api/payments"),
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(s.payments.last().uri, "/api/payments");
    assert_eq!(s.users.hits(), 1, "the users pool only saw the one request");

    // Merged slashes, decoded unreserved characters, untouched query.
    let r = get(
        &c,
        &format!("{base}//api//public/./%7Ea%41?q=/../x%2F"),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(s.public.last().uri, "/api/public/~aA?q=/../x%2F");

    // Encoded separators, NUL, bad escapes, overlong UTF-8 and dot-segments with
    // parameters are refused.
    for path in [
        "/api/public/..%2fusers",
        "/api/public/..%2Fusers",
        "/api/public/..%5cusers",
        "/api/public/%00",
        "/api/public/%zz",
        "/api/public/%4",
        "/api/public/%c0%ae%c0%ae/users",
        "/api/public/..;/users",
        "/api/public/.;x/users",
    ] {
        let r = get(&c, &format!("{base}{path}"), &[]).await;
        assert_eq!(r.status, 400, "{path}");
        assert_eq!(r.json()["error"], "bad_path", "{path}");
    }
    let r = raw_all(
        s.gw.addr("public").expect("addr"),
        b"GET /api/public/..\\users HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.starts_with("HTTP/1.1 400"), "raw backslash: {r:?}");
    assert_eq!(s.public.hits(), 1, "only the valid request reached public");
    assert_eq!(s.users.hits(), 1);
}

// 2. Connection-named headers cannot remove what the gateway sets.
#[tokio::test]
async fn client_connection_header_cannot_strip_gateway_headers() {
    let s = setup("").await;
    let c = client();
    let auth = bearer("u2");
    let r = get(
        &c,
        &format!("{}/api/users/1", base(&s.gw)),
        &[
            ("authorization", &auth),
            (
                "connection",
                "keep-alive, X-User-Id, X-User-Role, X-Forwarded-For, X-Forwarded-Proto, X-Request-Id, traceparent, X-Gateway",
            ),
            ("x-request-id", "client-id-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = s.users.last();
    for name in [
        "x-user-id",
        "x-user-role",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-request-id",
        "traceparent",
        "x-gateway",
    ] {
        assert!(
            seen.headers.contains_key(name),
            "{name} missing upstream: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.headers["x-user-id"], "u2");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert!(seen.headers.get("connection").is_none());
    assert_eq!(
        r.header("x-request-id").as_deref(),
        seen.headers["x-request-id"].to_str().ok(),
        "the id the upstream saw is the one the client gets"
    );
}

// 3. Underscore variants of gateway-owned names never reach the upstream.
#[tokio::test]
async fn underscore_variants_of_gateway_headers_are_dropped() {
    let s = setup("").await;
    let c = client();
    let auth = bearer("u3");
    let r = get(
        &c,
        &format!("{}/api/users/1", base(&s.gw)),
        &[
            ("authorization", &auth),
            ("X_User_Id", "root"),
            ("x_user_role", "admin"),
            ("X_Forwarded_For", "10.9.9.9"),
            ("x_request_id", "forged"),
            ("X_Gateway", "forged"),
            ("x_other", "kept"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = s.users.last();
    for (name, value) in &seen.headers {
        let folded = name.as_str().replace('_', "-");
        if folded != name.as_str() {
            assert_eq!(name.as_str(), "x_other", "variant {name} forwarded");
        }
        assert_ne!(value, "root");
        assert_ne!(value, "forged");
    }
    assert_eq!(seen.headers["x-user-id"], "u3");
    assert_eq!(
        seen.headers["x_other"], "kept",
        "other underscore names are untouched"
    );
}

/// An upstream that answers `/gz` gzip-encoded whatever the client accepts, `/bad`
/// with a body that claims JSON but is not, and anything else like the echo upstream
/// would, recording the Accept-Encoding it got.
async fn encoding_upstream() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        for _ in 0..1000 {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let seen = seen2.clone();
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let ae = req
                                .headers()
                                .get("accept-encoding")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_string();
                            seen.lock().expect("seen").push(ae.clone());
                            let json =
                                r#"{"id":1,"internal_id":9,"profile":{"password_hash":"x"}}"#;
                            let mut r = http::Response::new(Full::new(Bytes::from(json)));
                            r.headers_mut()
                                .insert("content-type", "application/json".parse().expect("ct"));
                            match req.uri().path() {
                                "/api/users/gz" => {
                                    r.headers_mut()
                                        .insert("content-encoding", "gzip".parse().expect("ce"));
                                }
                                "/api/users/bad" => {
                                    *r.body_mut() =
                                        Full::new(Bytes::from(r#"{"internal_id":9, oops"#));
                                }
                                _ if ae.contains("gzip") => {
                                    r.headers_mut()
                                        .insert("content-encoding", "gzip".parse().expect("ce"));
                                }
                                _ => {}
                            }
                            Ok::<_, hyper::Error>(r)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

// 4. Field stripping fails closed.
#[tokio::test]
async fn field_stripping_asks_for_identity_and_fails_closed() {
    let (addr, seen) = encoding_upstream().await;
    let cfg = format!(
        r#"{}
        [pools.users]
        backends = [{{ address = "{addr}" }}]
        [transforms.t]
        strip_json_fields = ["internal_id", "password_hash"]
        [[routes]]
        name = "users"
        path = "/api/users"
        pool = "users"
        transform = "t"
        "#,
        listener("public")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let r = get(
        &c,
        &format!("{}/api/users/1", base(&gw)),
        &[("accept-encoding", "gzip, br")],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        seen.lock().expect("seen").last().map(String::as_str),
        Some("identity")
    );
    assert!(r.header("content-encoding").is_none());
    assert_eq!(r.json(), serde_json::json!({"id": 1, "profile": {}}));
    for path in ["/api/users/gz", "/api/users/bad"] {
        let r = get(
            &c,
            &format!("{}{path}", base(&gw)),
            &[("accept-encoding", "gzip")],
        )
        .await;
        assert_eq!(r.status, 502, "{path}");
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            !body.contains("internal_id") && !body.contains("password_hash"),
            "{body}"
        );
    }
}

// 5. The smuggling guard holds for every request of a connection.
#[tokio::test]
async fn smuggling_guard_applies_to_every_request_on_a_connection() {
    let s = setup("").await;
    let addr = s.gw.addr("public").expect("addr");
    let chunked = "POST /api/public/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n";
    let cl = "POST /api/public/c HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
    for second in [
        "POST /api/public/b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /api/public/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
        "POST /api/public/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "POST /api/public/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // Refused by hyper's parser itself, on every request too.
        "POST /api/public/b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
        "POST /api/public/b HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "POST /api/public/b HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\nabc",
        "POST /api/public/b HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n b\r\nContent-Length: 3\r\n\r\nabc",
        "POST /api/public/b HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ] {
        for first in [chunked, cl] {
            let text = raw_all(addr, format!("{first}{second}").as_bytes()).await;
            assert_eq!(statuses(&text), vec![200, 400], "{first:?} then {second:?}: {text}");
        }
    }
    let uris: Vec<String> = s
        .public
        .seen
        .lock()
        .expect("seen")
        .iter()
        .map(|x| x.uri.clone())
        .collect();
    assert!(
        uris.iter().all(|u| u != "/api/public/b"),
        "smuggled request forwarded: {uris:?}"
    );
    // Ordinary keep-alive traffic still works after chunked and sized bodies.
    let text = raw_all(addr, format!("{chunked}{cl}{chunked}GET /api/public/d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await;
    assert_eq!(statuses(&text), vec![200, 200, 200, 200], "{text}");
}

// 6. Idle and silent connections are closed; one address cannot take every slot.
#[tokio::test]
async fn silent_and_idle_connections_are_closed() {
    let s = setup("first_byte_timeout_ms = 300\nidle_timeout_ms = 300").await;
    let addr = s.gw.addr("public").expect("addr");
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    assert!(
        closed_within(&mut silent, Duration::from_secs(3)).await,
        "silent socket closed"
    );

    let mut h2 = TcpStream::connect(addr).await.expect("connect");
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .expect("preface");
    assert!(
        closed_within(&mut h2, Duration::from_secs(3)).await,
        "silent h2 closed"
    );

    let mut ka = TcpStream::connect(addr).await.expect("connect");
    ka.write_all(b"GET /api/public/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut ka, Duration::from_secs(3)).await,
        "idle keep-alive closed"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "not before the idle timeout"
    );

    // A request slower than the idle timeout is not cut.
    let c = client();
    let r = get(&c, &format!("{}/delay/800", base(&s.gw)), &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn per_address_connection_cap_keeps_other_clients_served() {
    let s =
        setup("max_connections = 20\nmax_connections_per_ip = 5\nfirst_byte_timeout_ms = 10000")
            .await;
    let addr = s.gw.addr("public").expect("addr");
    let mut hogs = Vec::new();
    for _ in 0..20 {
        hogs.push(connect_from("127.0.0.2", addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut open = 0;
    for h in &mut hogs {
        if !closed_within(h, Duration::from_millis(50)).await {
            open += 1;
        }
    }
    assert_eq!(open, 5, "only max_connections_per_ip silent sockets stay");
    let c = client();
    let r = get(&c, &format!("{}/api/public/x", base(&s.gw)), &[]).await;
    assert_eq!(r.status, 200, "a real client still gets in");
}

// 7. max_headers counts the client's fields only.
#[tokio::test]
async fn max_headers_counts_only_client_fields() {
    let s = setup("max_headers = 50").await;
    let addr = s.gw.addr("public").expect("addr");
    let mut req = String::from("GET /api/public/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for i in 0..48 {
        req.push_str(&format!("X-H{i}: v\r\n"));
    }
    let ok = raw_all(addr, format!("{req}\r\n").as_bytes()).await;
    assert!(
        ok.starts_with("HTTP/1.1 200"),
        "50 client fields allowed: {ok:?}"
    );
    let too_many = raw_all(addr, format!("{req}X-H48: v\r\n\r\n").as_bytes()).await;
    assert!(
        too_many.starts_with("HTTP/1.1 431"),
        "51 client fields refused: {too_many:?}"
    );
}

/// Hostile test r3b, 5: past the parser's field limit (max(100, `max_headers`))
/// hyper answers a bare 431 for too many fields and for a too-large head alike; the
/// log line and `gateway_rejected_requests_total` tell them apart by reason. Fields
/// split across several writes are counted too.
#[tokio::test]
async fn too_many_fields_and_a_too_large_head_are_logged_apart() {
    for max_headers in ["", "max_headers = 150"] {
        let s = setup(max_headers).await;
        let addr = s.gw.addr("public").expect("addr");
        let mut log = s.gw.gateway.shared.access_log.subscribe();
        let limit = if max_headers.is_empty() { 100 } else { 150 };
        let head = "GET /api/public/x HTTP/1.1\r\nHost: x\r\n";
        let many: String = (0..limit + 5).map(|i| format!("X-H{i}: v\r\n")).collect();
        let big = format!("X-Big: {}\r\n", "v".repeat(17 * 1024));
        for (what, parts, reason) in [
            ("too many fields", vec![format!("{head}{many}\r\n")], "too_many_headers"),
            (
                "too many fields, in three writes",
                vec![head.to_string(), many.clone(), "\r\n".to_string()],
                "too_many_headers",
            ),
            ("a 17 kB field", vec![format!("{head}{big}\r\n")], "head_too_large"),
        ] {
            let mut c = TcpStream::connect(addr).await.expect("connect");
            for p in &parts {
                c.write_all(p.as_bytes()).await.expect("write");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let text = read_for(&mut c, Duration::from_secs(3)).await;
            assert!(text.starts_with("HTTP/1.1 431"), "{what}: {text:?}");
            let mut reasons = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
            while let Ok(Ok(r)) = tokio::time::timeout_at(deadline, log.recv()).await {
                reasons.push(r.reason);
            }
            assert_eq!(reasons, [Some(reason)], "{what} ({max_headers:?})");
        }
    }
    let metrics = l7_sidecar::observe::render_metrics();
    assert!(
        metrics.contains("reason=\"too_many_headers\"") && metrics.contains("reason=\"head_too_large\""),
        "{metrics}"
    );
}

// 8. Values put into aggregation templates are encoded.
#[tokio::test]
async fn aggregation_template_values_are_encoded() {
    let s = setup("").await;
    let c = client();
    let base = base(&s.gw);
    let r = get(&c, &format!("{base}/api/summary/7&admin=true"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(s.orders.last().uri, "/orders?user=7%26admin%3Dtrue");
    assert_eq!(s.users.last().uri, "/users/7%26admin%3Dtrue");

    let r = get(&c, &format!("{base}/api/summary/7?x=1&user=8"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        s.orders.last().uri,
        "/orders?user=7",
        "a part with its own query gets none of the client's (2nd review, 8)"
    );
    assert_eq!(s.users.last().uri, "/users/7?x=1&user=8");

    let before = (s.users.hits(), s.orders.hits());
    for path in ["/api/summary/..", "/api/summary/%2e%2e", "/api/summary/."] {
        let r = get(&c, &format!("{base}{path}"), &[]).await;
        assert!(r.status.is_client_error(), "{path}: {}", r.status);
    }
    assert_eq!(
        (s.users.hits(), s.orders.hits()),
        before,
        "no dot-segment reached a part"
    );
}

// 9. Error bodies carry no upstream detail.
#[tokio::test]
async fn upstream_errors_do_not_leak_addresses() {
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("addr");
    let cfg = format!(
        "{}[pools.p]\nbackends = [{{ address = \"{dead}\" }}]\n[[routes]]\nname = \"r\"\npath = \"/\"\npool = \"p\"\n[[routes]]\nname = \"agg\"\npath = \"/agg/{{id}}\"\npath_match = \"template\"\naggregate = [{{ name = \"a\", pool = \"p\", path = \"/a/{{id}}\" }}]\n",
        listener("public")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    for path in ["/x", "/agg/1"] {
        let r = get(&c, &format!("{}{path}", base(&gw)), &[]).await;
        assert_eq!(r.status, 502, "{path}");
        let body = String::from_utf8_lossy(&r.body).to_string();
        assert!(
            !body.contains("127.0.0.1") && !body.contains(&dead.port().to_string()),
            "{body}"
        );
        let v = r.json();
        assert_eq!(
            v["request_id"].as_str(),
            r.header("x-request-id").as_deref(),
            "{body}"
        );
    }
}

// 10. Authentication failures are rate limited per client address.
#[tokio::test]
async fn auth_failures_are_rate_limited_per_address() {
    let public = upstream("public").await;
    let cfg = format!(
        r#"{}{}
        [auth.failure_limit]
        max_failures = 5
        window_ms = 60000
        [[auth.api_keys]]
        name = "partner"
        sha256 = "{}"
        user_id = "partner-1"
        [[routes]]
        name = "key"
        path = "/api/key"
        pool = "public"
        auth = "api-key"
        "#,
        listener("public"),
        pool("public", &[&public], ""),
        l7_sidecar::auth::hash_api_key("right-key"),
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let url = format!("{}/api/key", base(&gw));
    assert_eq!(
        get(&c, &url, &[("x-api-key", "right-key")]).await.status,
        200
    );
    // Missing credentials are not guesses and do not count.
    for _ in 0..10 {
        assert_eq!(get(&c, &url, &[]).await.status, 401);
    }
    for i in 0..5 {
        let r = get(&c, &url, &[("x-api-key", &format!("guess-{i}"))]).await;
        assert_eq!(r.status, 401, "guess {i}");
    }
    let r = get(&c, &url, &[("x-api-key", "guess-6")]).await;
    assert_eq!(r.status, 429);
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");
    // Over the limit the address is refused before any verification, even with the right key.
    assert_eq!(
        get(&c, &url, &[("x-api-key", "right-key")]).await.status,
        429
    );
    // Another address is not affected.
    let addr = gw.addr("public").expect("addr");
    let mut other = connect_from("127.0.0.2", addr).await;
    other
        .write_all(b"GET /api/key HTTP/1.1\r\nHost: x\r\nX-Api-Key: right-key\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let text = read_for(&mut other, Duration::from_secs(3)).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
}

/// An upstream that answers like a healthy replica until `dead` is raised, then reads
/// each request and closes the connection without a byte of response.
async fn dying_upstream() -> (SocketAddr, Arc<AtomicBool>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let dead = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicUsize::new(0));
    let (d, h) = (dead.clone(), hits.clone());
    tokio::spawn(async move {
        for _ in 0..1000 {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let (d, h) = (d.clone(), h.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                for _ in 0..1000 {
                    let Ok(n) = s.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        buf.drain(..end + 4);
                        h.fetch_add(1, Ordering::SeqCst);
                        if d.load(Ordering::SeqCst) {
                            return;
                        }
                        let body = r#"{"service":"dying"}"#;
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, dead, hits)
}

// 11. A replica that dies on a pooled connection does not fail idempotent requests.
#[tokio::test]
async fn idempotent_request_retried_when_pooled_connection_dies() {
    let (a, dead, a_hits) = dying_upstream().await;
    let b = upstream("b").await;
    let cfg = format!(
        "{}[pools.p]\nalgorithm = \"round-robin\"\nretries = 1\nbackends = [{{ address = \"{a}\" }}, {{ address = \"{}\" }}]\n[pools.p.passive]\nconsecutive_failures = 0\n[[routes]]\nname = \"r\"\npath = \"/\"\npool = \"p\"\n",
        listener("public"),
        b.addr
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let url = format!("{}/x", base(&gw));
    for _ in 0..2 {
        assert_eq!(get(&c, &url, &[]).await.status, 200);
    }
    dead.store(true, Ordering::SeqCst);
    let before = a_hits.load(Ordering::SeqCst);
    for i in 0..4 {
        let r = get(&c, &url, &[]).await;
        assert_eq!(
            r.status, 200,
            "GET {i} retried on the live replica: {:?}",
            r.body
        );
    }
    assert!(
        a_hits.load(Ordering::SeqCst) > before,
        "the dead replica was tried"
    );
    // POST is not idempotent: it may have been processed, so it is not retried.
    let mut post = Vec::new();
    for _ in 0..4 {
        post.push(send(&c, "POST", &url, &[], "x").await.status.as_u16());
    }
    assert!(post.contains(&502), "{post:?}");
}

// ---- Second review (issue 10 follow-up): each test was seen failing before its fix.

/// An upstream answering `/ct/...` with the Content-Type given in the `ct` query
/// parameter (percent-decoded) and `/two` with two Content-Type headers, always with a
/// JSON body holding `password_hash`.
async fn content_type_upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        for _ in 0..1000 {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let body = r#"{"id":1,"password_hash":"x"}"#;
                        let mut r = http::Response::new(Full::new(Bytes::from(body)));
                        let ct = req
                            .uri()
                            .query()
                            .and_then(|q| q.strip_prefix("ct="))
                            .map(|v| v.replace("%20", " ").replace("%3B", ";"))
                            .unwrap_or_default();
                        if req.uri().path() == "/api/users/two" {
                            r.headers_mut()
                                .append("content-type", "text/plain".parse().expect("ct"));
                            r.headers_mut()
                                .append("content-type", "application/json".parse().expect("ct"));
                        } else {
                            r.headers_mut()
                                .insert("content-type", ct.parse().expect("ct"));
                        }
                        Ok::<_, hyper::Error>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

// 2nd review, 2. Media types are case-insensitive; several Content-Types fail closed.
#[tokio::test]
async fn field_stripping_parses_media_types() {
    let addr = content_type_upstream().await;
    let cfg = format!(
        r#"{}
        [pools.users]
        backends = [{{ address = "{addr}" }}]
        [transforms.t]
        strip_json_fields = ["password_hash"]
        [[routes]]
        name = "users"
        path = "/api/users"
        pool = "users"
        transform = "t"
        "#,
        listener("public")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    for ct in [
        "application/json",
        "Application/JSON",
        "application/Json",
        "APPLICATION/JSON%3B%20charset=utf-8",
        "application/problem+JSON",
        "application/json%20%3B%20charset=utf-8",
    ] {
        let r = get(&c, &format!("{}/api/users/x?ct={ct}", base(&gw)), &[]).await;
        assert_eq!(r.status, 200, "{ct}");
        assert_eq!(r.json(), serde_json::json!({"id": 1}), "{ct}");
    }
    // Not JSON: passed unchanged.
    let r = get(&c, &format!("{}/api/users/x?ct=text/plain", base(&gw)), &[]).await;
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("password_hash"));
    let r = get(&c, &format!("{}/api/users/two", base(&gw)), &[]).await;
    assert_eq!(r.status, 502, "two Content-Types: {:?}", r.body);
    assert!(!String::from_utf8_lossy(&r.body).contains("password_hash"));
}

// 2nd review, 3. A configured issuer / audience is required, not only checked.
#[tokio::test]
async fn jwt_without_configured_iss_or_aud_is_refused() {
    let s = setup("").await;
    let c = client();
    let url = format!("{}/api/users/1", base(&s.gw));
    let exp = now() + 300;
    for (what, claims) in [
        (
            "no iss",
            serde_json::json!({"sub": "u", "aud": "api", "exp": exp}),
        ),
        (
            "no aud",
            serde_json::json!({"sub": "u", "iss": "idp", "exp": exp}),
        ),
        ("neither", serde_json::json!({"sub": "u", "exp": exp})),
    ] {
        let auth = format!("Bearer {}", hs256(SECRET, claims));
        let r = get(&c, &url, &[("authorization", &auth)]).await;
        assert_eq!(r.status, 401, "{what}");
    }
    assert_eq!(
        get(&c, &url, &[("authorization", &bearer("ok"))])
            .await
            .status,
        200
    );
    assert_eq!(s.users.hits(), 1);
}

// 2nd review, 6. Claims that cannot be told apart in identity headers are refused.
#[tokio::test]
async fn ambiguous_identity_claims_are_refused() {
    let s = setup("").await;
    let c = client();
    let url = format!("{}/api/users/1", base(&s.gw));
    let exp = now() + 300;
    for (what, claims) in [
        (
            "comma in role",
            serde_json::json!({"sub": "u", "role": ["user,admin"], "iss": "idp", "aud": "api", "exp": exp}),
        ),
        (
            "CRLF in sub",
            serde_json::json!({"sub": "u\r\nX-User-Role: admin", "iss": "idp", "aud": "api", "exp": exp}),
        ),
        (
            "DEL in sub",
            serde_json::json!({"sub": "u\u{7f}", "iss": "idp", "aud": "api", "exp": exp}),
        ),
        (
            "LF in role",
            serde_json::json!({"sub": "u", "role": "a\nb", "iss": "idp", "aud": "api", "exp": exp}),
        ),
    ] {
        let auth = format!("Bearer {}", hs256(SECRET, claims));
        let r = get(&c, &url, &[("authorization", &auth)]).await;
        assert_eq!(r.status, 401, "{what}");
    }
    let ok = hs256(
        SECRET,
        serde_json::json!({"sub": "u", "role": ["user", "admin"], "iss": "idp", "aud": "api", "exp": exp}),
    );
    let r = get(&c, &url, &[("authorization", &format!("Bearer {ok}"))]).await;
    assert_eq!(r.status, 200);
    assert_eq!(s.users.last().headers["x-user-role"], "user,admin");
    assert_eq!(s.users.hits(), 1);
}

// 2nd review, 7. The API key stays at the gateway; two of them are ambiguous.
#[tokio::test]
async fn api_key_is_not_forwarded_and_must_be_single() {
    let s = setup("").await;
    let addr = s.gw.addr("public").expect("addr");
    let c = client();
    let url = format!("{}/api/key", base(&s.gw));
    let r = get(&c, &url, &[("x-api-key", "right-key")]).await;
    assert_eq!(r.status, 200);
    let seen = s.public.last();
    assert!(
        seen.headers.get("x-api-key").is_none(),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.headers["x-user-id"], "partner-1");
    for pair in [
        "X-Api-Key: right-key\r\nX-Api-Key: wrong",
        "X-Api-Key: wrong\r\nX-Api-Key: right-key",
        "X-Api-Key: right-key\r\nX-Api-Key: right-key",
    ] {
        let text = raw_all(
            addr,
            format!("GET /api/key HTTP/1.1\r\nHost: x\r\n{pair}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 401"), "{pair}: {text}");
    }
    assert_eq!(s.public.hits(), 1);
}

// 2nd review, 8. Parts with a query template do not get the client's query.
#[tokio::test]
async fn aggregation_part_query_cannot_be_extended_by_the_client() {
    let s = setup("").await;
    let c = client();
    for q in [
        "User=9",
        "user[]=9",
        "user%00=9",
        "user+=9",
        "user=9",
        "x=1&USER=9",
    ] {
        let r = get(&c, &format!("{}/api/summary/7?{q}", base(&s.gw)), &[]).await;
        assert_eq!(r.status, 200, "{q}");
        assert_eq!(s.orders.last().uri, "/orders?user=7", "{q}");
        assert_eq!(s.users.last().uri, format!("/users/7?{q}"), "{q}");
    }
}

/// A gateway with one open route, one catch-all rewrite, and a second listener
/// (`admin`, metrics) for the connection-budget tests.
async fn hardening_gateway(server: &str) -> (l7_sidecar::RunningGateway, Arc<Upstream>) {
    let public = upstream("public").await;
    let cfg = format!(
        r#"
        [server]
        {server}
        {}
        [[listeners]]
        name = "admin"
        bind = "127.0.0.1:0"
        metrics = true
        {}
        [[routes]]
        name = "public"
        path = "/v1/public"
        pool = "public"
        [[routes]]
        name = "files"
        path = "/v1/files/{{*rest}}"
        path_match = "template"
        rewrite = "/files/{{rest}}"
        pool = "public"
        "#,
        listener("public").replace("metrics = true", "metrics = false"),
        pool("public", &[&public], ""),
    );
    (start_gateway(&cfg).await, public)
}

// 2nd review, 5. A catch-all keeps its `/`; `..;` segments are refused there too.
#[tokio::test]
async fn catch_all_rewrite_keeps_slashes() {
    let (gw, public) = hardening_gateway("").await;
    let c = client();
    let r = get(&c, &format!("{}/v1/files/a/b", base(&gw)), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(public.last().uri, "/files/a/b");
    let r = get(&c, &format!("{}/v1/files/a%20b/c%26d", base(&gw)), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(public.last().uri, "/files/a%20b/c%26d");
    for path in [
        "/v1/files/a/..%3b/b",
        "/v1/files/a/.%3Bx/b",
        "/v1/files/..%3B",
    ] {
        let r = get(&c, &format!("{}{path}", base(&gw)), &[]).await;
        assert_eq!(r.status, 400, "{path}");
    }
    assert_eq!(public.hits(), 2);
}

// 2nd review, 4. Host must be single, present (HTTP/1.1), valid, and kept.
#[tokio::test]
async fn host_header_is_validated_and_kept() {
    let (gw, public) = hardening_gateway("").await;
    let addr = gw.addr("public").expect("addr");
    for (what, head) in [
        (
            "two Host",
            "GET /v1/public HTTP/1.1\r\nHost: api.example.com\r\nHost: evil.example\r\n",
        ),
        ("no Host", "GET /v1/public HTTP/1.1\r\n"),
        (
            "path in Host",
            "GET /v1/public HTTP/1.1\r\nHost: api.example.com/x\r\n",
        ),
        ("empty Host", "GET /v1/public HTTP/1.1\r\nHost: \r\n"),
        (
            "userinfo in Host",
            "GET /v1/public HTTP/1.1\r\nHost: u@api.example.com\r\n",
        ),
        (
            "bad port",
            "GET /v1/public HTTP/1.1\r\nHost: api.example.com:8x\r\n",
        ),
        (
            "Connection: Host",
            "GET /v1/public HTTP/1.1\r\nHost: api.example.com\r\nHost: b\r\nConnection: Host\r\n",
        ),
    ] {
        let text = raw_all(addr, format!("{head}Connection: close\r\n\r\n").as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{what}: {text}");
    }
    assert_eq!(public.hits(), 0);
    let text = raw_all(
        addr,
        b"GET /v1/public HTTP/1.1\r\nHost: api.example.com:8080\r\nConnection: Host, close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = public.last();
    assert_eq!(
        seen.headers["host"], "api.example.com:8080",
        "Connection cannot remove Host"
    );
    assert_eq!(seen.headers["x-forwarded-host"], "api.example.com:8080");
    for ok in ["[::1]:80", "127.0.0.1", "API.example.com"] {
        let text = raw_all(
            addr,
            format!("GET /v1/public HTTP/1.1\r\nHost: {ok}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert!(text.starts_with("HTTP/1.1 200"), "{ok}: {text}");
    }
    // HTTP/1.0 may omit Host.
    let text = raw_all(addr, b"GET /v1/public HTTP/1.0\r\n\r\n").await;
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
        "{text}"
    );
}

// Hostile test r3, 1/5/7. An HTTP/1.1 absolute-form target and its Host must name one
// authority (as HTTP/2 `:authority` and `host` must); the routed and forwarded host is
// that authority. A Host that is not `host[:port]` (list, port out of range, `;`) is
// 400 `bad_host`, and `PRI` (reserved for the HTTP/2 preface) never reaches a backend.
#[tokio::test]
async fn absolute_form_host_values_and_pri_are_checked() {
    let (gw, public) = hardening_gateway("").await;
    let addr = gw.addr("public").expect("addr");
    for (what, head, code) in [
        (
            "target and Host differ",
            "GET http://api.example.com/v1/public HTTP/1.1\r\nHost: other.example.com\r\n",
            "bad_host",
        ),
        (
            "target port differs",
            "GET http://api.example.com:8080/v1/public HTTP/1.1\r\nHost: api.example.com\r\n",
            "bad_host",
        ),
        (
            "list in Host",
            "GET /v1/public HTTP/1.1\r\nHost: evil.example,api.example.com:99999\r\n",
            "bad_host",
        ),
        (
            "port above 65535",
            "GET /v1/public HTTP/1.1\r\nHost: api.example.com:99999\r\n",
            "bad_host",
        ),
        (
            "; in the name",
            "GET /v1/public HTTP/1.1\r\nHost: api.example.com;x\r\n",
            "bad_host",
        ),
        (
            "PRI over HTTP/1",
            "PRI /v1/public HTTP/1.1\r\nHost: api.example.com\r\n",
            "bad_request",
        ),
    ] {
        let text = raw_all(addr, format!("{head}Connection: close\r\n\r\n").as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{what}: {text}");
        assert!(text.contains(&format!("\"{code}\"")), "{what}: {text}");
        assert!(text.to_ascii_lowercase().contains("x-request-id:"), "{what}: {text}");
    }
    assert_eq!(public.hits(), 0);
    // Agreeing after normalisation (case, trailing dot, default port): routed and
    // forwarded by the target's authority.
    let text = raw_all(
        addr,
        b"GET http://API.example.com./v1/public HTTP/1.1\r\nHost: api.example.com:80\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = public.last();
    assert_eq!(seen.headers["host"], "API.example.com.");
    assert_eq!(seen.headers["x-forwarded-host"], "API.example.com.");
    // HTTP/1.0 absolute-form without Host keeps working, with the target's authority.
    let text = raw_all(addr, b"GET http://api.example.com/v1/public HTTP/1.0\r\n\r\n").await;
    assert!(text.contains(" 200 "), "{text}");
    assert_eq!(public.last().headers["host"], "api.example.com");
}

// Hostile test r3b, 6. Host names are DNS-length-checked and a numeric name must be
// a dotted-decimal IPv4 address; ports have one spelling; an absolute-form target's
// scheme is the listener's; HTTP/2 refuses `PRI` and a request naming no host.
#[tokio::test]
async fn host_lengths_schemes_and_http2_host_rules_are_checked() {
    let (gw, public) = hardening_gateway("").await;
    let addr = gw.addr("public").expect("addr");
    let long_label = "a".repeat(64);
    let long_name = vec!["abcdefghi"; 500].join(".");
    for (what, head, code) in [
        ("5,000-character name", format!("GET /v1/public HTTP/1.1\r\nHost: {long_name}\r\n"), "bad_host"),
        ("64-character label", format!("GET /v1/public HTTP/1.1\r\nHost: {long_label}.example\r\n"), "bad_host"),
        ("999.1.1.1", "GET /v1/public HTTP/1.1\r\nHost: 999.1.1.1\r\n".into(), "bad_host"),
        ("0x7f.1", "GET /v1/public HTTP/1.1\r\nHost: 0x7f.1\r\n".into(), "bad_host"),
        ("port 0", "GET /v1/public HTTP/1.1\r\nHost: api.example.com:0\r\n".into(), "bad_host"),
        ("port 0080", "GET http://api.example.com:0080/v1/public HTTP/1.1\r\nHost: api.example.com\r\n".into(), "bad_host"),
        ("ftp target", "GET ftp://api.example.com/v1/public HTTP/1.1\r\nHost: api.example.com\r\n".into(), "bad_request"),
        ("ws target", "GET ws://api.example.com/v1/public HTTP/1.1\r\nHost: api.example.com\r\n".into(), "bad_request"),
        ("https target on plain HTTP", "GET https://api.example.com/v1/public HTTP/1.1\r\nHost: api.example.com\r\n".into(), "bad_request"),
    ] {
        let text = raw_all(addr, format!("{head}Connection: close\r\n\r\n").as_bytes()).await;
        assert!(text.starts_with("HTTP/1.1 400"), "{what}: {text}");
        assert!(text.contains(&format!("\"{code}\"")), "{what}: {text}");
    }
    assert_eq!(public.hits(), 0);

    use http_body_util::Empty;
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let pri = http::Method::from_bytes(b"PRI").expect("method");
    let req = http::Request::builder()
        .method(pri)
        .uri(format!("http://{addr}/v1/public"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = h2.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 400, "PRI over HTTP/2");
    // h2 sends a request in origin-form (no `:authority`) when it is marked HTTP/1.1.
    let req = http::Request::get("/v1/public")
        .version(http::Version::HTTP_11)
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = h2.send_request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 400, "neither :authority nor host");
    let body = http_body_util::BodyExt::collect(resp.into_body()).await.expect("body").to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"bad_host\""), "{body:?}");
    let req = http::Request::get(format!("http://{addr}/v1/public"))
        .body(Empty::<Bytes>::new())
        .expect("request");
    assert_eq!(h2.send_request(req).await.expect("h2 response").status(), 200);
    assert_eq!(public.hits(), 1);
}

// 2nd review, 1. A stalled or trickled request body is cut with 408; an oversized
// Content-Length is refused before reading.
#[tokio::test]
async fn stalled_request_bodies_are_cut() {
    let (gw, public) =
        hardening_gateway("body_read_timeout_ms = 500\nbody_min_rate_bytes_per_sec = 1024").await;
    let addr = gw.addr("public").expect("addr");
    let started = std::time::Instant::now();
    let text = raw_all(
        addr,
        b"POST /v1/public HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 1000\r\n\r\nabc",
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 408"), "stalled: {text:?}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // One byte every 100 ms never leaves a 500 ms gap, but is far below the minimum rate.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"POST /v1/public HTTP/1.1\r\nHost: api.example.com\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .expect("head");
    let started = std::time::Instant::now();
    for _ in 0..40 {
        if s.write_all(b"1\r\na\r\n").await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text = read_for(&mut s, Duration::from_secs(2)).await;
    assert!(text.starts_with("HTTP/1.1 408"), "trickled: {text:?}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // A Content-Length above max_body_bytes gets 413 without any body sent.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        b"POST /v1/public HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 5000000\r\n\r\n",
    )
    .await
    .expect("head");
    let text = read_for(&mut s, Duration::from_millis(400)).await;
    assert!(text.starts_with("HTTP/1.1 413"), "oversized: {text:?}");
    assert_eq!(public.hits(), 0);

    // A normal body still arrives.
    let c = client();
    let r = send(
        &c,
        "POST",
        &format!("{}/v1/public", base(&gw)),
        &[],
        "hello",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(public.last().body, "hello");
}

// 2nd review, 1. The reported flood: 4 addresses × 21 stalled bodies.
#[tokio::test]
async fn stalled_body_flood_frees_its_slots_and_spares_the_admin_listener() {
    let (gw, _public) = hardening_gateway(
        "max_connections = 60\nmax_connections_per_ip = 20\nbody_read_timeout_ms = 1000",
    )
    .await;
    let addr = gw.addr("public").expect("addr");
    let admin = gw.addr("admin").expect("admin");
    let mut socks = Vec::new();
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        for _ in 0..21 {
            let mut s = connect_from(ip, addr).await;
            let _ = s
                .write_all(b"POST /v1/public HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 1000\r\n\r\nabc")
                .await;
            socks.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // While the flood holds the public listener's slots, the admin listener answers.
    let mut m = TcpStream::connect(admin).await.expect("admin");
    m.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let text = read_for(&mut m, Duration::from_secs(2)).await;
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "admin during flood: {text:?}"
    );
    // Every stalled socket is answered and closed by the body timeout.
    let mut closed = 0;
    for s in &mut socks {
        if closed_within(s, Duration::from_secs(3)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, socks.len(), "all stalled sockets closed");
    let c = client();
    let r = get(&c, &format!("{}/v1/public", base(&gw)), &[]).await;
    assert_eq!(r.status, 200, "slots are free again");
}

// 2nd review, 1 and 4 over HTTP/2: a stream without END_STREAM gets 408; a `host`
// header differing from `:authority` is malformed.
#[tokio::test]
async fn http2_stalled_stream_and_host_mismatch() {
    use futures_util::StreamExt as _;
    type H2Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;
    let (gw, public) = hardening_gateway("body_read_timeout_ms = 500").await;
    let h2: hyper_util::client::legacy::Client<_, H2Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .http2_only(true)
            .build_http();
    let url = format!("{}/v1/public", base(&gw));
    let once = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from_static(b"abc")))
    });
    let stalled = http_body_util::StreamBody::new(once.chain(futures_util::stream::pending()));
    let req = http::Request::post(&url)
        .body(http_body_util::BodyExt::boxed(stalled))
        .expect("request");
    let started = std::time::Instant::now();
    let resp = tokio::time::timeout(Duration::from_secs(5), h2.request(req))
        .await
        .expect("answered before 5 s")
        .expect("h2 response");
    assert_eq!(resp.status(), 408);
    assert!(started.elapsed() < Duration::from_secs(3));

    let empty = || {
        use http_body_util::BodyExt as _;
        http_body_util::Empty::<Bytes>::new()
            .map_err(|e| match e {})
            .boxed()
    };
    let req = http::Request::get(&url)
        .header("host", "evil.example")
        .body(empty())
        .expect("request");
    let resp = h2.request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 400, "host differs from :authority");
    let req = http::Request::get(&url).body(empty()).expect("request");
    let resp = h2.request(req).await.expect("h2 response");
    assert_eq!(resp.status(), 200);
    assert_eq!(public.hits(), 1);
}

/// Hostile finding F-l: a configured removal matches the name after case folding and
/// `_` ↔ `-` (CGI/WSGI/PHP read `X_Debug` as `HTTP_X_DEBUG`), and the client's
/// `Forwarded`, `X-Real-IP` and `X-Forwarded-Port` never reach the upstream: the
/// gateway sets `X-Real-IP` and `X-Forwarded-Port` from the connection and drops
/// `Forwarded`.
#[tokio::test]
async fn removals_match_variants_and_forwarding_headers_are_gateway_owned() {
    let up = upstream("u").await;
    let cfg = format!(
        "{}{}[transforms.rm]\nrequest_headers_remove = [\"X-Debug\", \"x_trace_me\"]\n\
         [[routes]]\nname = \"r\"\npath = \"/\"\npool = \"p\"\ntransform = \"rm\"\n",
        listener("public"),
        pool("p", &[&up], ""),
    );
    let gw = start_gateway(&cfg).await;
    let port = gw.addr("public").expect("public").port().to_string();
    let c = client();
    let url = format!("{}/x", base(&gw));
    let r = get(
        &c,
        &url,
        &[
            ("X_Debug", "3"),
            ("x-DEBUG", "1"),
            ("X-Trace-Me", "1"),
            ("x_TRACE_me", "1"),
            ("x-debugger", "kept"),
            ("Forwarded", "for=1.2.3.4;proto=https"),
            ("X-Real-IP", "1.2.3.4"),
            ("X_Real_IP", "1.2.3.4"),
            ("X-Forwarded-Port", "443"),
            ("x_forwarded_port", "443"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    for gone in [
        "x_debug",
        "x-debug",
        "x-trace-me",
        "x_trace_me",
        "forwarded",
        "x_real_ip",
        "x_forwarded_port",
    ] {
        assert!(
            seen.headers.get(gone).is_none(),
            "{gone} forwarded: {:?}",
            seen.headers
        );
    }
    assert_eq!(seen.headers["x-debugger"], "kept");
    let all = |n: &str| -> Vec<String> {
        seen.headers
            .get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap_or_default().to_string())
            .collect()
    };
    assert_eq!(all("x-real-ip"), ["127.0.0.1"]);
    assert_eq!(all("x-forwarded-port"), [port.as_str()]);
    // Named in Connection: the client's copy is dropped, the gateway's still set.
    let r = get(
        &c,
        &url,
        &[
            (
                "connection",
                "keep-alive, X-Real-IP, X-Forwarded-Port, Forwarded",
            ),
            ("X-Real-IP", "1.2.3.4"),
            ("Forwarded", "for=1.2.3.4"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert!(seen.headers.get("forwarded").is_none());
    assert_eq!(seen.headers["x-real-ip"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-port"], port.as_str());
}
