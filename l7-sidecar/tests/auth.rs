//! Authentication through the gateway: JWT (HS256, RS256, ES256 via JWKS), API keys,
//! roles, identity headers and the rejection paths.
mod common;
use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::sync::atomic::Ordering;
use std::time::Duration;

const RSA_PRIVATE: &str = include_str!("fixtures/rsa_private.pem");
const RSA_PUBLIC: &str = include_str!("fixtures/rsa_public.pem");

fn claims(sub: &str, roles: &[&str]) -> serde_json::Value {
    serde_json::json!({"sub": sub, "roles": roles, "iss": "test-issuer", "aud": "api", "exp": now() + 300})
}

fn cfg(up: &std::sync::Arc<Upstream>, jwt_extra: &str) -> String {
    format!(
        r#"{}{}
        [auth.jwt]
        issuer = "test-issuer"
        audience = "api"
        role_claim = "roles"
        {jwt_extra}
        [[auth.api_keys]]
        name = "partner"
        sha256 = "{}"
        user_id = "partner-1"
        roles = ["partner"]
        [[routes]]
        name = "jwt"
        path = "/jwt"
        pool = "p"
        auth = "jwt"
        [[routes]]
        name = "admin"
        path = "/admin"
        pool = "p"
        auth = "jwt"
        roles = ["admin"]
        [[routes]]
        name = "key"
        path = "/key"
        pool = "p"
        auth = "api-key"
        [[routes]]
        name = "either"
        path = "/either"
        pool = "p"
        auth = "either"
        [[routes]]
        name = "open"
        path = "/open"
        pool = "p"
        "#,
        listener("public"),
        pool("p", &[up], ""),
        l7_sidecar::auth::hash_api_key("secret-key-1")
    )
}

fn hs_keys() -> String {
    format!(
        "[[auth.jwt.keys]]\nalgorithm = \"HS256\"\nsecret = \"hs-secret\"\n[[auth.jwt.keys]]\nkid = \"rsa1\"\nalgorithm = \"RS256\"\npublic_key_pem = '''{RSA_PUBLIC}'''\n"
    )
}

#[tokio::test]
async fn jwt_hs256_and_rs256_accepted_failures_rejected() {
    let up = upstream("p").await;
    let gw = start_gateway(&cfg(&up, &hs_keys())).await;
    let c = client();
    let b = base(&gw);
    let tok = hs256("hs-secret", claims("alice", &["user"]));
    let r = get(
        &c,
        &format!("{b}/jwt"),
        &[
            ("Authorization", &format!("Bearer {tok}")),
            ("X-User-Id", "mallory"),
            ("X-User-Role", "admin"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(
        seen.headers["x-user-id"], "alice",
        "identity from the token, spoof dropped"
    );
    assert_eq!(seen.headers["x-user-role"], "user");

    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa1".into());
    let rs = jsonwebtoken::encode(
        &h,
        &claims("bob", &[]),
        &EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("rsa key"),
    )
    .expect("rs256");
    let r = get(
        &c,
        &format!("{b}/jwt"),
        &[("Authorization", &format!("Bearer {rs}"))],
    )
    .await;
    assert_eq!(
        r.status,
        200,
        "RS256 accepted: {:?}",
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(up.last().headers["x-user-id"], "bob");

    let r = get(&c, &format!("{b}/jwt"), &[]).await;
    assert_eq!(r.status, 401);
    assert!(
        r.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer")),
        "challenge sent"
    );
    let mut expired = claims("alice", &[]);
    expired["exp"] = (now() - 3600).into();
    let mut wrong_aud = claims("alice", &[]);
    wrong_aud["aud"] = "other".into();
    let mut future = claims("alice", &[]);
    future["nbf"] = (now() + 3600).into();
    for (what, t) in [
        ("expired", hs256("hs-secret", expired)),
        ("wrong audience", hs256("hs-secret", wrong_aud)),
        ("not yet valid", hs256("hs-secret", future)),
        ("bad signature", hs256("other", claims("alice", &[]))),
        ("garbage", "abc.def.ghi".to_string()),
    ] {
        let r = get(
            &c,
            &format!("{b}/jwt"),
            &[("Authorization", &format!("Bearer {t}"))],
        )
        .await;
        assert_eq!(r.status, 401, "{what}");
        assert!(
            r.header("www-authenticate")
                .is_some_and(|v| v.contains("invalid_token")),
            "{what}"
        );
    }
    let admin = hs256("hs-secret", claims("alice", &["user"]));
    assert_eq!(
        get(
            &c,
            &format!("{b}/admin"),
            &[("Authorization", &format!("Bearer {admin}"))]
        )
        .await
        .status,
        403
    );
    let admin = hs256("hs-secret", claims("root", &["admin"]));
    assert_eq!(
        get(
            &c,
            &format!("{b}/admin"),
            &[("Authorization", &format!("Bearer {admin}"))]
        )
        .await
        .status,
        200
    );

    let metrics =
        String::from_utf8_lossy(&get(&c, &format!("{b}/metrics"), &[]).await.body).to_string();
    assert!(
        metrics.contains("gateway_auth_failures_total"),
        "auth failures exported"
    );
}

#[tokio::test]
async fn alg_none_and_algorithm_confusion_are_rejected() {
    let up = upstream("p").await;
    let gw = start_gateway(&cfg(&up, &hs_keys())).await;
    let c = client();
    let b = base(&gw);
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
        b64.encode(claims("alice", &[]).to_string())
    );
    // HS256 "signed" with the RSA public key, the classic confusion attack.
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa1".into());
    let confused = jsonwebtoken::encode(
        &h,
        &claims("alice", &[]),
        &EncodingKey::from_secret(RSA_PUBLIC.as_bytes()),
    )
    .expect("hs");
    for (what, t) in [("alg none", none), ("confusion", confused)] {
        let r = get(
            &c,
            &format!("{b}/jwt"),
            &[("Authorization", &format!("Bearer {t}"))],
        )
        .await;
        assert_eq!(r.status, 401, "{what}");
    }
    assert_eq!(up.hits(), 0, "nothing reached the upstream");
}

#[tokio::test]
async fn api_keys_and_either_mode() {
    let up = upstream("p").await;
    let gw = start_gateway(&cfg(&up, &hs_keys())).await;
    let c = client();
    let b = base(&gw);
    let r = get(&c, &format!("{b}/key"), &[("X-API-Key", "secret-key-1")]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().headers["x-user-id"], "partner-1");
    let r = get(&c, &format!("{b}/key"), &[("X-API-Key", "wrong")]).await;
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .is_some_and(|v| v.starts_with("ApiKey")));
    assert_eq!(get(&c, &format!("{b}/key"), &[]).await.status, 401);
    assert_eq!(
        get(&c, &format!("{b}/either"), &[("X-API-Key", "secret-key-1")])
            .await
            .status,
        200
    );
    let tok = hs256("hs-secret", claims("alice", &[]));
    assert_eq!(
        get(
            &c,
            &format!("{b}/either"),
            &[("Authorization", &format!("Bearer {tok}"))]
        )
        .await
        .status,
        200
    );
    assert_eq!(get(&c, &format!("{b}/either"), &[]).await.status, 401);
    // Open routes still never forward client-supplied identity.
    assert_eq!(
        get(&c, &format!("{b}/open"), &[("X-User-Id", "admin")])
            .await
            .status,
        200
    );
    assert!(
        up.last().headers.get("x-user-id").is_none(),
        "spoofed X-User-Id stripped"
    );
}

fn es256_key() -> (EncodingKey, serde_json::Value) {
    let kp = rcgen::KeyPair::generate().expect("p256 key");
    let raw = kp.public_key_raw();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64.encode(&raw[1..33]), "y": b64.encode(&raw[33..65]), "alg": "ES256", "use": "sig"});
    (EncodingKey::from_ec_der(&kp.serialize_der()), jwk)
}

fn es_token(key: &EncodingKey, kid: &str, sub: &str) -> String {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(&h, &claims(sub, &[]), key).expect("es256")
}

fn jwks(keys: &[(&str, &serde_json::Value)]) -> String {
    let keys: Vec<_> = keys
        .iter()
        .map(|(kid, jwk)| {
            let mut j = (*jwk).clone();
            j["kid"] = (*kid).into();
            j
        })
        .collect();
    serde_json::json!({ "keys": keys }).to_string()
}

#[tokio::test]
async fn jwks_keys_fetched_rotated_and_kept_on_failure() {
    let up = upstream("p").await;
    let idp = upstream("idp").await;
    let (k1, j1) = es256_key();
    let (k2, j2) = es256_key();
    *idp.jwks.lock().expect("jwks") = jwks(&[("k1", &j1)]);
    let extra = format!(
        "jwks_url = \"http://{}/jwks.json\"\njwks_refresh_secs = 3600\njwks_min_refetch_secs = 1\n",
        idp.addr
    );
    let gw = start_gateway(&cfg(&up, &extra)).await;
    let c = client();
    let url = format!("{}/jwt", base(&gw));
    eventually(Duration::from_secs(5), "initial JWKS fetch", || {
        idp.jwks_fetches.load(Ordering::SeqCst) >= 1
    })
    .await;
    let mut ok = false;
    for _ in 0..50 {
        if get(
            &c,
            &url,
            &[(
                "Authorization",
                &format!("Bearer {}", es_token(&k1, "k1", "carol")),
            )],
        )
        .await
        .status
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "ES256 token with JWKS key k1 accepted");
    assert_eq!(up.last().headers["x-user-id"], "carol");

    // Rotation: an unknown kid triggers a (rate-limited) refetch.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    *idp.jwks.lock().expect("jwks") = jwks(&[("k1", &j1), ("k2", &j2)]);
    let r = get(
        &c,
        &url,
        &[(
            "Authorization",
            &format!("Bearer {}", es_token(&k2, "k2", "dave")),
        )],
    )
    .await;
    assert_eq!(r.status, 200, "new kid fetched on demand");
    let fetches = idp.jwks_fetches.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    for _ in 0..5 {
        let r = get(
            &c,
            &url,
            &[(
                "Authorization",
                &format!("Bearer {}", es_token(&k2, "unknown", "eve")),
            )],
        )
        .await;
        assert_eq!(r.status, 401);
    }
    // One refetch per second at most, however slow this machine is.
    let allowed = fetches + 1 + started.elapsed().as_secs() as usize;
    assert!(
        idp.jwks_fetches.load(Ordering::SeqCst) <= allowed,
        "unknown-kid refetches are rate limited"
    );

    // A broken JWKS response keeps the last good keys.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    *idp.jwks.lock().expect("jwks") = "not json".into();
    let r = get(
        &c,
        &url,
        &[(
            "Authorization",
            &format!("Bearer {}", es_token(&k2, "nope", "eve")),
        )],
    )
    .await;
    assert_eq!(r.status, 401);
    let r = get(
        &c,
        &url,
        &[(
            "Authorization",
            &format!("Bearer {}", es_token(&k1, "k1", "carol")),
        )],
    )
    .await;
    assert_eq!(r.status, 200, "last good keys kept");
}

/// A JWKS endpoint behind TLS with a test CA, served on 127.0.0.1.
async fn https_jwks(
    body: String,
    dir: &std::path::Path,
) -> (std::net::SocketAddr, String, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).expect("cert");
    let ca_path = dir.join("jwks-ca.pem");
    std::fs::write(&ca_path, ck.cert.pem()).expect("write ca");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_slice(ck.key_pair.serialize_pem().as_bytes())
            .expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(vec![ck.cert.der().clone()], key)
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        for _ in 0..100 {
            let Ok((tcp, _)) = l.accept().await else {
                continue;
            };
            let (acceptor, body) = (acceptor.clone(), body.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, ca_path.display().to_string(), task)
}

#[tokio::test]
async fn jwks_over_https_with_configured_ca() {
    let up = upstream("p").await;
    let (k1, j1) = es256_key();
    let dir = tempfile::tempdir().expect("tempdir");
    let (addr, ca, task) = https_jwks(jwks(&[("tls-k1", &j1)]), dir.path()).await;
    let extra = format!(
        "jwks_url = \"https://127.0.0.1:{}/jwks.json\"\njwks_ca_file = \"{ca}\"\njwks_refresh_secs = 3600\njwks_min_refetch_secs = 1\n",
        addr.port()
    );
    let gw = start_gateway(&cfg(&up, &extra)).await;
    let c = client();
    let url = format!("{}/jwt", base(&gw));
    let mut status = 0;
    for _ in 0..100 {
        status = get(
            &c,
            &url,
            &[(
                "Authorization",
                &format!("Bearer {}", es_token(&k1, "tls-k1", "frank")),
            )],
        )
        .await
        .status
        .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200, "key fetched from the https JWKS endpoint");
    assert_eq!(up.last().headers["x-user-id"], "frank");
    task.abort();
}

/// Hostile findings 10 F-o / F-g / F-a: what the gateway checked is exactly what the
/// upstream reads — no padded or non-ASCII identity, no second credential, one
/// request id.
#[tokio::test]
async fn upstream_reads_exactly_what_the_gateway_checked() {
    let up = upstream("p").await;
    let gw = start_gateway(&cfg(&up, &hs_keys())).await;
    let c = client();
    let b = base(&gw);
    let bearer = |sub: &str, roles: &[&str]| {
        format!("Bearer {}", hs256("hs-secret", claims(sub, roles)))
    };
    let hits = up.hits();
    for (sub, roles) in [
        (" alice", &["user"][..]),
        ("alice ", &["user"]),
        ("unié", &["user"]),
        ("alice\t", &["user"]),
        ("alice", &["user", " admin"]),
        ("alice", &["admin\t"]),
    ] {
        let auth = bearer(sub, roles);
        let r = get(&c, &format!("{b}/jwt"), &[("Authorization", &auth)]).await;
        assert_eq!(r.status, 401, "sub {sub:?} roles {roles:?}");
        assert!(r.header("www-authenticate").is_some_and(|v| v.contains("invalid_token")));
    }
    let good = bearer("alice", &["user"]);
    for path in ["/jwt", "/either", "/key"] {
        let r = get(
            &c,
            &format!("{b}{path}"),
            &[
                ("Authorization", good.as_str()),
                ("Authorization", "Bearer OTHER-TOKEN-FOR-UPSTREAM"),
                ("X-API-Key", "secret-key-1"),
            ],
        )
        .await;
        assert_eq!(r.status, 401, "{path}: two Authorization fields");
    }
    assert_eq!(up.hits(), hits, "no refused request reached the upstream");

    let r = get(
        &c,
        &format!("{b}/jwt"),
        &[
            ("Authorization", good.as_str()),
            ("X-Request-Id", "one"),
            ("X-Request-Id", "bad value"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id").as_deref(), Some("one"));
    let seen = up.last();
    let ids: Vec<_> = seen.headers.get_all("x-request-id").iter().collect();
    assert_eq!(ids, ["one"], "the upstream gets only the id the gateway returns");
    assert_eq!(seen.headers["x-user-id"], "alice");
}

/// One request with `x-api-key: key` on a fresh connection from `local` (a
/// loopback address), its status.
async fn key_status_from(local: &str, gw: std::net::SocketAddr, key: &str) -> u16 {
    status_from(local, gw, &format!("GET /key HTTP/1.1\r\nX-Api-Key: {key}")).await
}

/// `head` (request line and fields, without the end of the head) sent on a fresh
/// connection from `local`, the answer's status.
async fn status_from(local: &str, gw: std::net::SocketAddr, head: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{local}:0").parse().expect("local addr"))
        .expect("bind local");
    let mut s = sock.connect(gw).await.expect("connect");
    let req = format!("{head}\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("answer within 5 s")
        .expect("read");
    let text = String::from_utf8_lossy(&buf);
    text.get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"))
}

/// Hostile findings s14-9 and s14-11d through the gateway on two workers: 100 RS256
/// tokens with a broken signature sent at once from one address (each verification
/// long enough for the workers to overlap) get exactly `max_failures` (5) 401s; that
/// address stays locked while 20 other addresses fill the 10-address table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_limit_is_exact_under_concurrency_and_survives_a_full_table() {
    let up = upstream("p").await;
    let toml = format!(
        "{}[auth.failure_limit]\nmax_failures = 5\nwindow = \"1m\"\nmax_addresses = 10\n",
        cfg(&up, &hs_keys())
    );
    let mut cfg = l7_sidecar::config::Config::parse(&toml).expect("config");
    cfg.observability.access_log = false;
    let gw = l7_sidecar::Gateway::new(cfg, None).expect("gateway");
    let gw = l7_sidecar::start_workers(gw, 2).await.expect("start");
    let addr = gw.addr("public").expect("addr");
    let attacker = "127.0.3.1";
    let mut pending = tokio::task::JoinSet::new();
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa1".into());
    let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).expect("rsa key");
    for i in 0..100 {
        let signed = jsonwebtoken::encode(&h, &claims(&format!("u{i}"), &[]), &key).expect("sign");
        let other = jsonwebtoken::encode(&h, &claims("mallory", &[]), &key).expect("sign");
        // u{i}'s header and payload with mallory's signature.
        let (body, _) = signed.rsplit_once('.').expect("jwt");
        let (_, sig) = other.rsplit_once('.').expect("jwt");
        let head = format!("GET /jwt HTTP/1.1\r\nAuthorization: Bearer {body}.{sig}");
        pending.spawn(async move { status_from(attacker, addr, &head).await });
    }
    let mut statuses = Vec::new();
    while let Some(s) = pending.join_next().await {
        statuses.push(s.expect("task"));
    }
    let count = |code| statuses.iter().filter(|&&s| s == code).count();
    assert_eq!((count(401), count(429)), (5, 95), "{statuses:?}");
    for i in 1..=20 {
        let s = key_status_from(&format!("127.0.1.{i}"), addr, "bad").await;
        assert_eq!(s, 401, "newcomer 127.0.1.{i}");
    }
    assert_eq!(
        key_status_from(attacker, addr, "secret-key-1").await,
        429,
        "still locked after 20 newcomers"
    );
    assert_eq!(key_status_from("127.0.2.1", addr, "secret-key-1").await, 200);
}
