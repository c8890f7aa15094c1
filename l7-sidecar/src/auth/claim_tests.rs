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

/// Hostile finding s14-10: a role claim that is neither a string nor a list of
/// strings refuses the token; a missing claim, or `null`, is "no roles".
#[tokio::test]
async fn a_role_claim_of_another_type_refuses_the_token() {
    let a = Authenticator::new(Some(&cfg()), &[], None).expect("auth");
    for role in [
        serde_json::json!(5),
        serde_json::json!(true),
        serde_json::json!({"admin": true}),
        serde_json::json!(1.5),
    ] {
        let r = check(&a, "alice".into(), role.clone()).await;
        assert!(
            matches!(r, Err(AuthError::Invalid(_))),
            "role {role}: {r:?}"
        );
    }
    let id = check(&a, "alice".into(), serde_json::Value::Null)
        .await
        .expect("null role")
        .expect("identity");
    assert!(id.roles.is_empty());
    let no_claim =
        serde_json::json!({"sub": "alice", "iss": "iss", "aud": "aud", "exp": now() + 60});
    let t = token(no_claim, "s3cret");
    let id = a
        .authenticate(AuthMode::Jwt, &[], &headers(&[format!("Bearer {t}")]))
        .await
        .expect("no role claim")
        .expect("identity");
    assert!(id.roles.is_empty());
}

/// `claims` plus the given time claims.
async fn check_times(
    a: &Authenticator,
    times: serde_json::Value,
) -> Result<Option<Arc<Identity>>, AuthError> {
    let mut c = serde_json::json!({"sub": "alice", "iss": "iss", "aud": "aud"});
    for (k, v) in times.as_object().expect("object") {
        c[k] = v.clone();
    }
    let t = token(c, "s3cret");
    a.authenticate(AuthMode::Jwt, &[], &headers(&[format!("Bearer {t}")]))
        .await
}

/// Hostile finding s14-11a: an `nbf` that is not a NumericDate (not a number, or
/// not one a u64 holds) was ignored and the token accepted. `exp` of a wrong type
/// was already refused (it is required); both are checked here.
#[tokio::test]
async fn time_claims_of_a_wrong_type_or_range_refuse_the_token() {
    let a = Authenticator::new(Some(&cfg()), &[], None).expect("auth");
    let exp = serde_json::json!(now() + 60);
    for bad in [
        serde_json::json!("later"),
        serde_json::json!(1e20),
        serde_json::json!(-1),
        serde_json::json!(true),
        serde_json::json!([1]),
        serde_json::json!({"t": 1}),
    ] {
        let r = check_times(&a, serde_json::json!({"exp": exp, "nbf": bad})).await;
        assert!(matches!(r, Err(AuthError::Invalid(_))), "nbf {bad}: {r:?}");
        let r = check_times(&a, serde_json::json!({"exp": bad})).await;
        assert!(matches!(r, Err(AuthError::Invalid(_))), "exp {bad}: {r:?}");
    }
    let r = check_times(&a, serde_json::json!({"exp": null})).await;
    assert!(matches!(r, Err(AuthError::Invalid(_))), "exp null: {r:?}");
    for good in [
        serde_json::json!(null),
        serde_json::json!(now() - 10),
        serde_json::json!(now() as f64 - 10.5),
    ] {
        let r = check_times(&a, serde_json::json!({"exp": exp, "nbf": good})).await;
        assert!(matches!(r, Ok(Some(_))), "nbf {good}: {r:?}");
    }
}

/// A far-future `exp` (2^63, beyond what `SystemTime` holds) or a fractional one is
/// accepted and cached like any other, not re-verified on every request.
#[tokio::test]
async fn far_future_and_fractional_exp_are_accepted_and_cached() {
    let a = Authenticator::new(Some(&cfg()), &[], None).expect("auth");
    for exp in [
        serde_json::json!(1u64 << 63),
        serde_json::json!(u64::MAX),
        serde_json::json!(now() as f64 + 60.5),
    ] {
        let c = serde_json::json!({"sub": "alice", "iss": "iss", "aud": "aud", "exp": exp});
        let h = headers(&[format!("Bearer {}", token(c, "s3cret"))]);
        let r = a.authenticate(AuthMode::Jwt, &[], &h).await;
        assert!(matches!(r, Ok(Some(_))), "exp {exp}: {r:?}");
        assert!(
            matches!(
                a.authenticate_cached(AuthMode::Jwt, &[], &h, Instant::now()),
                Some(Ok(_))
            ),
            "exp {exp}: cached"
        );
    }
}

/// An HS256 token over `payload` exactly as written (duplicate names and number
/// spellings that `serde_json::json!` cannot express).
fn raw_token(payload: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let msg = format!(
        "{}.{}",
        b64.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        b64.encode(payload)
    );
    let key = jsonwebtoken::EncodingKey::from_secret(b"s3cret");
    let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key, jsonwebtoken::Algorithm::HS256).expect("sign");
    format!("{msg}.{sig}")
}

async fn raw_check(a: &Authenticator, payload: &str) -> Result<Option<Arc<Identity>>, AuthError> {
    let t = raw_token(payload);
    a.authenticate(AuthMode::Jwt, &[], &headers(&[format!("Bearer {t}")])).await
}

/// Hostile finding s15b-6: `"role":"user","role":"admin"` passed as admin (the last
/// wins in the gateway's map; an upstream re-verifying the token may keep the first).
/// A claim named twice refuses the token, whichever claim it is.
#[tokio::test]
async fn a_claim_named_twice_refuses_the_token() {
    let a = Authenticator::new(Some(&cfg()), &[], None).expect("auth");
    let exp = now() + 60;
    let base = format!(r#""iss":"iss","aud":"aud","exp":{exp}"#);
    let ok = raw_check(&a, &format!(r#"{{"sub":"alice","role":"user",{base}}}"#)).await;
    assert!(matches!(ok, Ok(Some(_))), "{ok:?}");
    for dup in [
        format!(r#"{{"sub":"alice","role":"user","role":"admin",{base}}}"#),
        format!(r#"{{"sub":"alice","role":null,"role":"admin",{base}}}"#),
        format!(r#"{{"sub":"alice","x":1,"x":2,{base}}}"#),
    ] {
        let r = raw_check(&a, &dup).await;
        assert!(matches!(r, Err(AuthError::Invalid(ref m)) if m.contains("twice")), "{dup}: {r:?}");
    }
}

/// Hostile finding s15b-7: numeric subjects that are not 64-bit integers became
/// lossy float strings (`1e2` → `100.0`, 2^64 and 2^64 + 1 both
/// `1.8446744073709552e+19`). Integers pass as written; other numbers refuse.
#[tokio::test]
async fn a_numeric_subject_must_be_a_64_bit_integer() {
    let a = Authenticator::new(Some(&cfg()), &[], None).expect("auth");
    let exp = now() + 60;
    for (sub, id) in [("42", "42"), ("-7", "-7"), ("18446744073709551615", "18446744073709551615")] {
        let r = raw_check(&a, &format!(r#"{{"sub":{sub},"iss":"iss","aud":"aud","exp":{exp}}}"#)).await;
        let got = r.expect("integer subject").expect("identity");
        assert_eq!(got.user_id, id);
    }
    for sub in ["1e2", "5.5", "-0.0", "18446744073709551616", "18446744073709551617"] {
        let r = raw_check(&a, &format!(r#"{{"sub":{sub},"iss":"iss","aud":"aud","exp":{exp}}}"#)).await;
        assert!(matches!(r, Err(AuthError::Invalid(_))), "sub {sub}: {r:?}");
    }
}
