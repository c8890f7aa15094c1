//! `auth_stage` alone: given only its authenticator, failure limiter and limit,
//! against a stub `next` — no gateway is built.

use super::*;
use crate::ctx::UserId;
use crate::http_util::Body;
use crate::routing::testing::routed;
use crate::routing::Routed;
use crate::stage::testing::stub;
use http::Request;
use http::{Response, StatusCode};

fn toml() -> String {
    format!(
        r#"
        [pools.p]
        backends = [{{ address = "127.0.0.1:9" }}]
        [[auth.api_keys]]
        name = "partner"
        sha256 = "{}"
        user_id = "p1"
        [auth.failure_limit]
        max_failures = 2
        window_ms = 60000
        [[routes]]
        name = "r"
        path = "/"
        pool = "p"
        auth = "api-key"
        "#,
        hash_api_key("k-123")
    )
}

#[tokio::test]
async fn auth_stage_alone_passes_identity_on_and_limits_guessing() {
    let toml = toml();
    let (cfg, _) = routed(&toml, Request::get("/x"));
    let auth = Authenticator::new(None, &cfg.auth.api_keys, None).expect("authenticator");
    let failures = FailureLimiter::default();
    let limit = &cfg.auth.failure_limit;
    let next = stub(|r: Routed<()>| {
        let user = r.req.ctx().identity.as_ref().map(|i| i.user_id.clone());
        let mut resp = Response::new(crate::http_util::full("ok"));
        resp.headers_mut()
            .insert("x-seen-user", user.unwrap_or_default().parse().expect("hv"));
        resp
    });
    let call = |key: &'static str| {
        let (_, r) = routed(&toml, Request::get("/x").header("x-api-key", key));
        auth_stage(&auth, &failures, limit, r, next.clone())
    };
    let resp = call("k-123").await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-seen-user"], "p1", "identity reaches next");
    assert_eq!(
        resp.extensions().get::<UserId>().map(UserId::as_str),
        Some("p1")
    );
    for _ in 0..2 {
        assert_eq!(call("wrong").await.status(), StatusCode::UNAUTHORIZED);
    }
    let resp = call("k-123").await;
    assert_eq!(
        resp.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "the address is blocked after max_failures wrong keys"
    );
    assert!(resp.headers().contains_key(header::RETRY_AFTER));
}

/// A JWT route (`/`, any role) and a route needing role `ops` (`/ops`), with a
/// failure limit of 2.
fn jwt_toml() -> &'static str {
    r#"
    [pools.p]
    backends = [{ address = "127.0.0.1:9" }]
    [auth.jwt]
    leeway_secs = 2
    [[auth.jwt.keys]]
    algorithm = "HS256"
    secret = "stage-secret-0123456789"
    [auth.failure_limit]
    max_failures = 2
    window_ms = 60000
    [[routes]]
    name = "ops"
    path = "/ops"
    pool = "p"
    auth = "jwt"
    roles = ["ops"]
    [[routes]]
    name = "any"
    path = "/"
    pool = "p"
    auth = "jwt"
    "#
}

fn jwt_token(exp: u64) -> String {
    let claims = serde_json::json!({"sub": "u1", "role": "user", "exp": exp});
    super::tests::token(claims, "stage-secret-0123456789")
}

/// `auth_stage` on `req` against a `next` that answers 200 naming the user it got.
async fn jwt_call(
    auth: &Authenticator,
    failures: &FailureLimiter,
    req: http::request::Builder,
) -> Response<Body> {
    let (cfg, r) = routed(jwt_toml(), req);
    let next = stub(|r: Routed<()>| {
        let user = r.req.ctx().identity.as_ref().map(|i| i.user_id.clone());
        let mut resp = Response::new(crate::http_util::full("ok"));
        resp.headers_mut()
            .insert("x-seen-user", user.unwrap_or_default().parse().expect("hv"));
        resp
    });
    auth_stage(auth, failures, &cfg.auth.failure_limit, r, next).await
}

fn jwt_auth() -> Authenticator {
    let (cfg, _) = routed(jwt_toml(), Request::get("/"));
    Authenticator::new(cfg.auth.jwt.as_ref(), &[], None).expect("authenticator")
}

fn user_of(resp: &Response<Body>) -> Option<&str> {
    resp.extensions().get::<UserId>().map(UserId::as_str)
}

/// A token answered from the token cache goes through every check a verified one
/// does: it expires on time, needs the route's role, is refused beside a second
/// Authorization header and from a blocked address.
#[tokio::test]
async fn a_cached_token_meets_every_check() {
    let auth = jwt_auth();
    let failures = FailureLimiter::default();
    let t = jwt_token(super::tests::now() + 600);
    let bearer = format!("Bearer {t}");
    for _ in 0..2 {
        let resp = jwt_call(
            &auth,
            &failures,
            Request::get("/").header("authorization", &bearer),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-seen-user"], "u1");
        assert_eq!(user_of(&resp), Some("u1"));
    }
    let cached = |h: &HeaderMap| auth.authenticate_cached(AuthMode::Jwt, &[], h, Instant::now());
    let mut h = HeaderMap::new();
    h.insert(header::AUTHORIZATION, bearer.parse().expect("hv"));
    assert!(matches!(cached(&h), Some(Ok(_))), "served from the cache");
    // What `authenticate` accepts around the token, the cache accepts too.
    for same in [format!("bearer {t}"), format!("Bearer  {t} \t")] {
        let resp = jwt_call(
            &auth,
            &failures,
            Request::get("/").header("authorization", same),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK);
    }
    // ... and what it refuses, the cache refuses.
    let resp = jwt_call(
        &auth,
        &failures,
        Request::get("/").header("authorization", format!("Bearer{t}")),
    )
    .await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "no space after the scheme: not a bearer token"
    );
    let resp = jwt_call(
        &auth,
        &failures,
        Request::get("/")
            .header("authorization", &bearer)
            .header("authorization", &bearer),
    )
    .await;
    assert_eq!(
        resp.status(),
        StatusCode::UNAUTHORIZED,
        "several Authorization headers"
    );
    let resp = jwt_call(
        &auth,
        &failures,
        Request::get("/ops").header("authorization", &bearer),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN, "role ops is missing");
    assert_eq!(user_of(&resp), Some("u1"), "the refused user is logged");
    // Two wrong tokens (one was the doubled header above) block the address.
    let wrong = super::tests::token(
        serde_json::json!({"sub": "u1", "exp": super::tests::now() + 600}),
        "other",
    );
    let resp = jwt_call(
        &auth,
        &failures,
        Request::get("/").header("authorization", format!("Bearer {wrong}")),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let resp = jwt_call(
        &auth,
        &failures,
        Request::get("/").header("authorization", &bearer),
    )
    .await;
    assert_eq!(
        resp.status(),
        StatusCode::TOO_MANY_REQUESTS,
        "a blocked address is refused before the cache is asked"
    );
}

/// A token verified while valid is refused (401) once it expires (`exp` plus the
/// leeway, 2 s here), although the token cache still holds it.
#[tokio::test]
async fn a_cached_token_is_refused_once_it_expires() {
    let auth = jwt_auth();
    let failures = FailureLimiter::default();
    // Already past `exp`, but within the leeway.
    let exp = super::tests::now() - 1;
    let bearer = format!("Bearer {}", jwt_token(exp));
    let resp = jwt_call(
        &auth,
        &failures,
        Request::get("/").header("authorization", &bearer),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK, "within the leeway");
    let resp = jwt_call(
        &auth,
        &failures,
        Request::get("/").header("authorization", &bearer),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK, "from the cache");
    while super::tests::now() <= exp + 2 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let resp = jwt_call(
        &auth,
        &failures,
        Request::get("/").header("authorization", &bearer),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "expired");
    assert!(resp.headers()[header::WWW_AUTHENTICATE]
        .to_str()
        .expect("ascii")
        .contains("invalid_token"));
}

/// Hostile finding s14-11d: requests that all passed the "blocked?" check before
/// any of them failed were all answered 401. Counting a failure and deciding its
/// answer are one step, so exactly `max_failures` (2) are 401, the rest 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_bad_credentials_get_exactly_max_failures_401s() {
    let toml = toml();
    let (cfg, _) = routed(&toml, Request::get("/x"));
    let auth = Authenticator::new(None, &cfg.auth.api_keys, None).expect("authenticator");
    let failures = FailureLimiter::default();
    let limit = &cfg.auth.failure_limit;
    // Every request is admitted past the limit check before any is verified.
    let pending: Vec<_> = (0..20)
        .map(|_| {
            let (_, r) = routed(&toml, Request::get("/x").header("x-api-key", "wrong"));
            auth_stage(&auth, &failures, limit, r, crate::stage::testing::stub(ok))
        })
        .collect();
    let mut statuses = Vec::new();
    for resp in futures_util::future::join_all(pending).await {
        statuses.push(resp.status());
    }
    let count = |s| statuses.iter().filter(|&&x| x == s).count();
    assert_eq!(count(StatusCode::UNAUTHORIZED), 2, "{statuses:?}");
    assert_eq!(count(StatusCode::TOO_MANY_REQUESTS), 18, "{statuses:?}");
}

fn ok(_: Routed<()>) -> Response<Body> {
    Response::new(crate::http_util::full("ok"))
}

/// Hostile finding s14-11c: auth schemes are case-insensitive (RFC 9110 §11.1),
/// on the verifying path and on the token cache's.
#[tokio::test]
async fn the_bearer_scheme_is_matched_in_any_case() {
    let auth = jwt_auth();
    let failures = FailureLimiter::default();
    let t = jwt_token(super::tests::now() + 600);
    for (i, scheme) in ["BEARER", "BeArEr", "bEARER"].iter().enumerate() {
        let resp = jwt_call(
            &auth,
            &failures,
            Request::get("/").header("authorization", format!("{scheme} {t}")),
        )
        .await;
        assert_eq!(resp.status(), StatusCode::OK, "{scheme} (request {i})");
        assert_eq!(resp.headers()["x-seen-user"], "u1");
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("{scheme} {t}").parse().expect("hv"),
        );
        assert!(
            matches!(
                auth.authenticate_cached(AuthMode::Jwt, &[], &h, Instant::now()),
                Some(Ok(_))
            ),
            "{scheme}: the cached path"
        );
    }
}

/// Another scheme than Bearer on a JWT route is a missing token, as before: 401,
/// and not counted toward the failure limit (2 here).
#[tokio::test]
async fn another_scheme_on_a_jwt_route_is_missing_credentials_and_not_counted() {
    let auth = jwt_auth();
    let failures = FailureLimiter::default();
    for value in ["Basic dXNlcjpwYXNz", "Token abc", "Bearer", "Bearerx abc"] {
        for _ in 0..3 {
            let resp = jwt_call(
                &auth,
                &failures,
                Request::get("/").header("authorization", value),
            )
            .await;
            assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{value}");
            let challenge = resp.headers()[header::WWW_AUTHENTICATE]
                .to_str()
                .expect("ascii");
            assert!(!challenge.contains("invalid_token"), "{value}: {challenge}");
        }
    }
    let t = jwt_token(super::tests::now() + 600);
    let resp = jwt_call(
        &auth,
        &failures,
        Request::get("/").header("authorization", format!("Bearer {t}")),
    )
    .await;
    assert_eq!(resp.status(), StatusCode::OK, "nothing was counted");
}

/// Newcomers to a failure table full of locked-out addresses share one overflow
/// window; once it is spent they are refused new verifications, but a client with a
/// token verified before (cached) still gets in: an attacker holding the table must
/// not lock out signed-in clients.
#[tokio::test]
async fn a_full_table_of_locked_addresses_refuses_verifications_not_signed_in_clients() {
    let toml = jwt_toml().replace("window_ms = 60000", "window_ms = 60000\n    max_addresses = 2");
    let auth = jwt_auth();
    let failures = FailureLimiter::default();
    let call = |req: http::request::Builder| {
        let (cfg, r) = routed(&toml, req);
        let (auth, failures) = (&auth, &failures);
        async move { auth_stage(auth, failures, &cfg.auth.failure_limit, r, crate::stage::testing::stub(ok)).await }
    };
    let bearer = |t: &str| format!("Bearer {t}");
    let now = super::tests::now();
    let signed_in = jwt_token(now + 600);
    let resp = call(Request::get("/").header(header::AUTHORIZATION, bearer(&signed_in))).await;
    assert_eq!(resp.status(), StatusCode::OK, "verified, now cached");
    // Two addresses lock the table; three newcomers spend the overflow window.
    let (cfg, _) = routed(&toml, Request::get("/"));
    let limit = &cfg.auth.failure_limit;
    let t0 = std::time::Instant::now();
    for last in [1u8, 2, 3] {
        for _ in 0..3 {
            failures.record(limit, std::net::IpAddr::from([10, 0, 0, last]), t0);
        }
    }
    assert!(failures.blocked(limit, "127.0.0.1".parse().expect("ip"), t0).is_some(), "newcomers refused");
    let resp = call(Request::get("/").header(header::AUTHORIZATION, bearer(&signed_in))).await;
    assert_eq!(resp.status(), StatusCode::OK, "a token verified before still passes");
    let fresh = jwt_token(now + 700);
    let resp = call(Request::get("/").header(header::AUTHORIZATION, bearer(&fresh))).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "a new verification is refused");
    let resp = call(Request::get("/")).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "no credentials: refused too");
}
