//! The whole chain in one gateway: auth → rate limit → routing → transformation →
//! access log, plus the rejection paths, a WebSocket, TLS with SNI and a reload under load.
mod common;
use common::*;
use futures_util::{SinkExt, StreamExt};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn gateway_toml(
    users: &Upstream,
    orders: &Upstream,
    ws: std::net::SocketAddr,
    cert: &(String, String),
    orders_limit: u64,
) -> String {
    format!(
        r#"
        [observability]
        access_log = false
        [[listeners]]
        name = "public"
        bind = "127.0.0.1:0"
        metrics = true
        [[listeners]]
        name = "tls"
        bind = "127.0.0.1:0"
        [[listeners.tls.certificates]]
        cert_file = "{cert_file}"
        key_file = "{key_file}"
        server_names = ["api.test"]

        [pools.users]
        algorithm = "least-response-time"
        backends = [{{ address = "{users}" }}]
        [pools.orders]
        algorithm = "round-robin"
        backends = [{{ address = "{orders}" }}]
        [pools.ws]
        backends = [{{ address = "{ws}" }}]

        [auth.jwt]
        issuer = "idp"
        audience = "api"
        [[auth.jwt.keys]]
        algorithm = "HS256"
        secret = "pipeline-secret"

        [rate_limits.per-user]
        algorithm = "fixed-window"
        key = "user-id"
        limit = {orders_limit}
        window_ms = 60000

        [transforms.public]
        request_headers_add = {{ "X-Gateway" = "l7" }}
        strip_json_fields = ["internal_id", "password_hash"]

        [[routes]]
        name = "users"
        path = "/api/users/{{id}}"
        path_match = "template"
        rewrite = "/users/{{id}}"
        pool = "users"
        auth = "jwt"
        rate_limit = "per-user"
        transform = "public"
        [[routes]]
        name = "orders"
        path = "/api/orders"
        strip_prefix = "/api"
        pool = "orders"
        auth = "jwt"
        rate_limit = "per-user"
        transform = "public"
        [[routes]]
        name = "ws"
        path = "/ws"
        pool = "ws"
        websocket = true
        "#,
        cert_file = cert.0,
        key_file = cert.1,
        users = users.addr,
        orders = orders.addr,
    )
}

fn token(sub: &str) -> String {
    format!(
        "Bearer {}",
        hs256(
            "pipeline-secret",
            serde_json::json!({"sub": sub, "role": "user", "iss": "idp", "aud": "api", "exp": now() + 600})
        )
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_pipeline() {
    let (users, orders) = (upstream("users").await, upstream("orders").await);
    let ws_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind ws");
    let ws_addr = ws_listener.local_addr().expect("ws addr");
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
                    if m.is_text() && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let ck = rcgen::generate_simple_self_signed(vec!["api.test".to_string()]).expect("cert");
    let cert = (
        dir.path().join("c.pem").display().to_string(),
        dir.path().join("k.pem").display().to_string(),
    );
    std::fs::write(&cert.0, ck.cert.pem()).expect("write cert");
    std::fs::write(&cert.1, ck.key_pair.serialize_pem()).expect("write key");

    let gw = start_gateway(&gateway_toml(&users, &orders, ws_addr, &cert, 5)).await;
    let mut log = gw.gateway.shared.access_log.subscribe();
    let c = client();
    let b = base(&gw);

    // 1. The happy path with a spoofed identity header.
    let alice = token("alice");
    let r = get(
        &c,
        &format!("{b}/api/users/42"),
        &[
            ("Authorization", &alice),
            ("X-User-Id", "admin"),
            ("X-Request-Id", "pipe-1"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let seen = users.last();
    assert_eq!(seen.uri, "/users/42", "routed and rewritten");
    assert_eq!(
        seen.headers["x-user-id"], "alice",
        "identity from the verified token, never the client"
    );
    assert_eq!(seen.headers["x-user-role"], "user");
    assert_eq!(seen.headers["x-request-id"], "pipe-1");
    assert_eq!(seen.headers["x-gateway"], "l7");
    let body = r.json();
    assert!(
        body.get("internal_id").is_none() && body["profile"].get("password_hash").is_none(),
        "fields stripped: {body}"
    );
    assert_eq!(r.header("x-request-id").as_deref(), Some("pipe-1"));
    assert_eq!(r.header("ratelimit-remaining").as_deref(), Some("4"));
    let rec = tokio::time::timeout(Duration::from_secs(5), log.recv())
        .await
        .expect("log in time")
        .expect("record");
    assert_eq!(
        (rec.status, rec.user_id.as_deref(), rec.request_id.as_str()),
        (200, Some("alice"), "pipe-1")
    );
    assert_eq!(rec.route.as_deref(), Some("users"));
    // The body was rewritten (fields stripped): the record still names the backend.
    assert_eq!(rec.upstream, Some(users.addr.to_string()), "upstream of a rewritten body");

    // 2. Rejections.
    let r = get(&c, &format!("{b}/api/users/42"), &[("X-User-Id", "alice")]).await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_some());
    assert_eq!(
        get(
            &c,
            &format!("{b}/nothing/here"),
            &[("Authorization", &alice)]
        )
        .await
        .status,
        404
    );
    let bob = token("bob");
    for _ in 0..5 {
        assert_eq!(
            get(&c, &format!("{b}/api/orders"), &[("Authorization", &bob)])
                .await
                .status,
            200
        );
    }
    let r = get(&c, &format!("{b}/api/orders"), &[("Authorization", &bob)]).await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        get(&c, &format!("{b}/api/orders"), &[("Authorization", &alice)])
            .await
            .status,
        200,
        "alice has her own budget"
    );
    let spoofed = users
        .seen
        .lock()
        .expect("seen")
        .iter()
        .chain(orders.seen.lock().expect("seen").iter())
        .any(|s| {
            s.headers.get("x-user-id").is_some_and(|v| v == "admin")
                || s.headers.get("x-user-id").is_none()
        });
    assert!(
        !spoofed,
        "no upstream request carried a client-chosen or missing identity"
    );

    // 3. WebSocket through the same gateway.
    let addr = gw.addr("public").expect("public");
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(format!("ws://{addr}/ws/chat")),
    )
    .await
    .expect("ws in time")
    .expect("ws handshake");
    ws.send(tokio_tungstenite::tungstenite::Message::Text("ping".into()))
        .await
        .expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("frame")
        .expect("ok");
    assert_eq!(got.into_text().expect("text"), "ping");

    // 4. TLS with SNI.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).expect("root");
    let tls_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(gw.addr("tls").expect("tls listener"))
        .await
        .expect("tcp");
    let name = rustls::pki_types::ServerName::try_from("api.test").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg))
        .connect(name, tcp)
        .await
        .expect("TLS handshake with SNI");
    tls.write_all(format!("GET /api/users/7 HTTP/1.1\r\nHost: api.test\r\nAuthorization: {alice}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp))
        .await
        .expect("tls response in time")
        .ok();
    assert!(
        String::from_utf8_lossy(&resp).starts_with("HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&resp)
    );
    assert_eq!(users.last().headers["x-forwarded-proto"], "https");

    // 5. Reload under load: every request succeeds while the config flips.
    // First lift the per-user limit so only the reloads can fail a request.
    let lifted = l7_sidecar::Config::parse(&gateway_toml(&users, &orders, ws_addr, &cert, 999))
        .expect("valid");
    gw.gateway.reload(lifted).await.expect("reload");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..6 {
        let (stop, done, url) = (stop.clone(), done.clone(), format!("{b}/api/users/{w}"));
        let auth = token(&format!("load-{w}"));
        workers.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..300 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let r = get(&c, &url, &[("Authorization", &auth)]).await;
                assert_eq!(
                    r.status,
                    200,
                    "dropped during reload: {:?}",
                    String::from_utf8_lossy(&r.body)
                );
                done.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for i in 0..10 {
        let cfg =
            l7_sidecar::Config::parse(&gateway_toml(&users, &orders, ws_addr, &cert, 1000 + i))
                .expect("valid reload");
        gw.gateway.reload(cfg).await.expect("reload");
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await
            .unwrap_or_else(|e| panic!("load worker failed: {e}"));
    }
    assert!(
        done.load(Ordering::SeqCst) >= 30,
        "load ran: {}",
        done.load(Ordering::SeqCst)
    );
    // The WebSocket opened before the reloads is still up.
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "still here".into(),
    ))
    .await
    .expect("send after reloads");
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("frame")
        .expect("ok");
    assert_eq!(got.into_text().expect("text"), "still here");
    echo.abort();
}
