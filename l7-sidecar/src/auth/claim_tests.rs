//! What a verified token may say about who the caller is (hostile findings 10 F-o,
//! F-g): identity values go to `X-User-Id` / `X-User-Role`, where an upstream's
//! parser must read exactly what the gateway checked.

use super::tests::{cfg, now, token};
use super::*;

fn claims(sub: serde_json::Value, role: serde_json::Value) -> serde_json::Value {
    serde_json::json!({"sub": sub, "role": role, "iss": "iss", "aud": "aud", "exp": now() + 60})
}

fn headers(values: &[String]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(header::AUTHORIZATION, v.parse().expect("header value"));
    }
    h
}

async fn check(
    a: &Authenticator,
    sub: serde_json::Value,
    role: serde_json::Value,
) -> Result<Option<Arc<Identity>>, AuthError> {
    let t = token(claims(sub, role), "s3cret");
    a.authenticate(AuthMode::Jwt, &[], &headers(&[format!("Bearer {t}")]))
        .await
}

#[tokio::test]
async fn user_ids_outside_visible_ascii_are_refused() {
    let a = Authenticator::new(Some(&cfg()), &[], None).expect("auth");
    for sub in [
        "unié",
        "\u{2028}sep",
        "alice\t",
        " alice",
        "alice ",
        "al ice",
        "",
        "a\u{7f}",
    ] {
        let r = check(&a, sub.into(), "user".into()).await;
        assert!(
            matches!(r, Err(AuthError::Invalid(_))),
            "sub {sub:?}: {r:?}"
        );
    }
    for sub in [
        "alice",
        "auth0|5f1c",
        "alice@example.com",
        "~!#$%&'*+-.^_`{}",
    ] {
        let id = check(&a, sub.into(), "user".into())
            .await
            .expect(sub)
            .expect("identity");
        assert_eq!(id.user_id, sub);
        assert_eq!(
            id.headers().user_id.as_ref().map(|v| v.as_bytes()),
            Some(sub.as_bytes())
        );
    }
    let id = check(&a, 42.into(), "user".into())
        .await
        .expect("numeric sub")
        .expect("identity");
    assert_eq!(id.user_id, "42");
}

#[tokio::test]
async fn every_role_must_be_visible_ascii_and_one_bad_role_refuses_the_token() {
    let a = Authenticator::new(Some(&cfg()), &[], None).expect("auth");
    for role in [
        serde_json::json!(" admin"),
        serde_json::json!("admin "),
        serde_json::json!("admin\t"),
        serde_json::json!(""),
        serde_json::json!("a,b"),
        serde_json::json!("rôle"),
        serde_json::json!(["user", " admin"]),
        serde_json::json!(["user", ""]),
        serde_json::json!(["user", "super admin"]),
        // Not a silently dropped role: the token is refused.
        serde_json::json!(["user", 7]),
        serde_json::json!(["user", null]),
    ] {
        let r = check(&a, "alice".into(), role.clone()).await;
        assert!(
            matches!(r, Err(AuthError::Invalid(_))),
            "role {role}: {r:?}"
        );
    }
    let id = check(&a, "alice".into(), serde_json::json!(["user", "admin"]))
        .await
        .expect("valid roles")
        .expect("identity");
    assert_eq!(
        id.headers().roles.as_ref().map(|v| v.as_bytes()),
        Some(&b"user,admin"[..])
    );
}

#[tokio::test]
async fn several_authorization_headers_are_refused_on_every_auth_mode() {
    let keys = [ApiKeyConfig {
        name: "partner".into(),
        sha256: hash_api_key("k-123"),
        user_id: "p1".into(),
        roles: vec![],
    }];
    let a = Authenticator::new(Some(&cfg()), &keys, None).expect("auth");
    let good = token(claims("alice".into(), "user".into()), "s3cret");
    let mut h = headers(&[
        format!("Bearer {good}"),
        "Bearer OTHER-TOKEN-FOR-UPSTREAM".into(),
    ]);
    for mode in [AuthMode::Jwt, AuthMode::Either] {
        let r = a.authenticate(mode, &[], &h).await;
        assert!(matches!(r, Err(AuthError::Invalid(_))), "{mode:?}: {r:?}");
    }
    // An API key does not make a second credential for the upstream harmless.
    h.insert(API_KEY, HeaderValue::from_static("k-123"));
    let r = a.authenticate(AuthMode::ApiKey, &[], &h).await;
    assert!(matches!(r, Err(AuthError::Invalid(_))), "api-key: {r:?}");
    // One field is still fine, and a route without auth does not look.
    let one = headers(&[format!("Bearer {good}")]);
    assert!(a.authenticate(AuthMode::Jwt, &[], &one).await.is_ok());
    assert_eq!(a.authenticate(AuthMode::None, &[], &h).await, Ok(None));
}

#[test]
fn api_key_identities_are_checked_when_the_authenticator_is_built() {
    let key = |user_id: &str, roles: &[&str]| ApiKeyConfig {
        name: "k".into(),
        sha256: hash_api_key("k"),
        user_id: user_id.into(),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    };
    assert!(Authenticator::new(None, &[key("p1", &["partner"])], None).is_ok());
    for (k, field) in [
        (key("partner acme", &[]), "auth.api_keys[1].user_id"),
        (
            key("p1", &["partner", " admin"]),
            "auth.api_keys[1].roles[1]",
        ),
        (key("p1", &["a,b"]), "auth.api_keys[1].roles[0]"),
    ] {
        let err = Authenticator::new(None, &[key("ok", &[]), k], None)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.starts_with(field), "{field}: {err}");
    }
}
