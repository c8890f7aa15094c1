//! `auth_stage` alone: given only its authenticator, failure limiter and limit,
//! against a stub `next` — no gateway is built.

use super::*;
use crate::routing::testing::routed;
use crate::stage::testing::stub;
use http::Request;

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
    assert_eq!(resp.extensions().get::<UserId>().map(|u| u.0.as_str()), Some("p1"));
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
