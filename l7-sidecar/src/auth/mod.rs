//! Authentication: JWT (HS256 / RS256 / ES256, keys from config or a JWKS URL) and
//! hashed API keys. Each key is bound to one algorithm, so a token can never pick
//! how it is verified (no `alg: none`, no RS256-public-key-as-HMAC-secret).

use crate::config::{ApiKeyConfig, AuthMode, JwtConfig};
pub use crate::ctx::Identity;
use http::HeaderMap;
use http::{header, HeaderValue};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing credentials")]
    Missing,
    #[error("invalid credentials: {0}")]
    Invalid(String),
    /// Authenticated, but without a required role: the user is known (and logged).
    #[error("forbidden: user {user} lacks one of roles {roles:?}")]
    Forbidden { user: String, roles: Vec<String> },
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Invalid(_) => "invalid",
            AuthError::Forbidden { .. } => "forbidden",
        }
    }
}

type KeyMap = HashMap<String, (Algorithm, Arc<DecodingKey>)>;

mod cache;
mod claims;
mod failures;
mod jwks;
mod stage;
use cache::TokenCache;
use claims::{valid_identity_value, valid_role};
pub use failures::FailureLimiter;
pub use jwks::{spawn_jwks_refresh, JwksCache, JwksError};
pub use stage::auth_stage;

pub struct Authenticator {
    jwt: Option<JwtVerifier>,
    api_keys: HashMap<String, ApiKeyConfig>,
}

struct JwtVerifier {
    cfg: JwtConfig,
    /// Config keys: (kid, algorithm, key).
    keys: Vec<(Option<String>, Algorithm, Arc<DecodingKey>)>,
    jwks: Option<Arc<JwksCache>>,
    verified: TokenCache,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth.jwt.keys[{0}]: {1}")]
    Bad(usize, String),
    #[error("auth.jwt.jwks_url: {0}")]
    Jwks(String),
    /// `field` is the path, e.g. `auth.api_keys[2].roles[0]`.
    #[error("{field}: must be non-empty visible ASCII (no spaces or control characters{extra}), it is passed on in {header}")]
    ApiKeyIdentity {
        field: String,
        extra: &'static str,
        header: &'static str,
    },
}

/// An API key's user id and roles go upstream as they are, like a token's (see
/// `claims`): a bad one is a configuration error, not a silently missing header.
fn check_api_key_identities(keys: &[ApiKeyConfig]) -> Result<(), KeyError> {
    for (i, k) in keys.iter().enumerate() {
        if !valid_identity_value(&k.user_id) {
            return Err(KeyError::ApiKeyIdentity {
                field: format!("auth.api_keys[{i}].user_id"),
                extra: "",
                header: "X-User-Id",
            });
        }
        if let Some(j) = k.roles.iter().position(|r| !valid_role(r)) {
            return Err(KeyError::ApiKeyIdentity {
                field: format!("auth.api_keys[{i}].roles[{j}]"),
                extra: ", no ','",
                header: "X-User-Role",
            });
        }
    }
    Ok(())
}

/// The header clients send API keys in. The gateway consumes it: it is removed before
/// proxying on routes that accept API keys.
pub const API_KEY: &str = "x-api-key";

/// Whether `v` starts with "Bearer " (the scheme in any case, RFC 9110 §11.1, then
/// one space). One word compare, not a byte loop: it runs on every authenticated
/// request. Setting bit 5 folds exactly 'A'–'Z' onto 'a'–'z' among the letters
/// compared; the space is compared as is.
fn is_bearer(v: &[u8]) -> bool {
    let Some(&[a, b, c, d, e, f, g]) = v.first_chunk::<7>() else {
        return false;
    };
    const FOLD: u64 = 0x0000_2020_2020_2020;
    (u64::from_le_bytes([a, b, c, d, e, f, g, 0]) | FOLD) == u64::from_le_bytes(*b"bearer \0")
}

/// The token of an `Authorization: Bearer` value as bytes, unchecked: "Bearer " (in
/// any case) stripped, then spaces and tabs (the only whitespace a header value can
/// hold) trimmed, as `bearer_str` does on the checked `&str`.
fn bearer_bytes(v: &HeaderValue) -> Option<&[u8]> {
    let v = v.as_bytes();
    is_bearer(v).then(|| v[7..].trim_ascii())
}

/// `bearer_bytes` on a checked `&str`.
fn bearer_str(v: &str) -> Option<&str> {
    // The 7 bytes matched are ASCII, so byte 7 starts a character.
    is_bearer(v.as_bytes()).then(|| v[7..].trim_matches([' ', '\t']))
}

/// `id`, if it holds one of `roles` (or none are required).
fn check_roles(id: Arc<Identity>, roles: &[String]) -> Result<Arc<Identity>, AuthError> {
    if !roles.is_empty() && !roles.iter().any(|r| id.roles.contains(r)) {
        return Err(AuthError::Forbidden {
            user: id.user_id.clone(),
            roles: roles.to_vec(),
        });
    }
    Ok(id)
}

fn one_key(key: Option<&str>, several: bool) -> Result<&str, AuthError> {
    if several {
        return Err(AuthError::Invalid("several X-API-Key headers".into()));
    }
    key.ok_or(AuthError::Missing)
}

pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Authenticator {
    pub fn new(
        jwt: Option<&JwtConfig>,
        api_keys: &[ApiKeyConfig],
        jwks: Option<Arc<JwksCache>>,
    ) -> Result<Authenticator, KeyError> {
        check_api_key_identities(api_keys)?;
        let jwt = match jwt {
            None => None,
            Some(cfg) => {
                let mut keys = Vec::new();
                for (i, k) in cfg.keys.iter().enumerate() {
                    let pem = match (&k.public_key_pem, &k.public_key_file) {
                        (Some(p), _) => Some(p.clone()),
                        (None, Some(f)) => Some(
                            std::fs::read_to_string(f)
                                .map_err(|e| KeyError::Bad(i, e.to_string()))?,
                        ),
                        _ => None,
                    };
                    let (alg, key) = match k.algorithm.as_str() {
                        "HS256" => (
                            Algorithm::HS256,
                            DecodingKey::from_secret(
                                k.secret.as_ref().map_or(&[][..], |s| s.expose()),
                            ),
                        ),
                        "RS256" => (
                            Algorithm::RS256,
                            DecodingKey::from_rsa_pem(pem.unwrap_or_default().as_bytes())
                                .map_err(|e| KeyError::Bad(i, e.to_string()))?,
                        ),
                        "ES256" => (
                            Algorithm::ES256,
                            DecodingKey::from_ec_pem(pem.unwrap_or_default().as_bytes())
                                .map_err(|e| KeyError::Bad(i, e.to_string()))?,
                        ),
                        other => {
                            return Err(KeyError::Bad(i, format!("unsupported algorithm {other}")))
                        }
                    };
                    keys.push((k.kid.clone(), alg, Arc::new(key)));
                }
                Some(JwtVerifier {
                    cfg: cfg.clone(),
                    keys,
                    jwks,
                    verified: TokenCache::new(
                        cfg.token_cache_max_entries,
                        cfg.token_cache_max_bytes,
                    ),
                })
            }
        };
        let api_keys = api_keys
            .iter()
            .map(|k| (k.sha256.to_ascii_lowercase(), k.clone()))
            .collect();
        Ok(Authenticator { jwt, api_keys })
    }

    /// Authenticate per the route's mode and check its roles.
    pub async fn authenticate(
        &self,
        mode: AuthMode,
        roles: &[String],
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Identity>>, AuthError> {
        if mode == AuthMode::None {
            return Ok(None);
        }
        // One lookup gives the first field and whether there are more.
        let mut authorization = headers.get_all(header::AUTHORIZATION).iter();
        let first = authorization.next();
        if first.is_some() && authorization.next().is_some() {
            // The gateway would check one credential while the upstream (which may
            // verify the bearer itself) reads another.
            return Err(AuthError::Invalid("several Authorization headers".into()));
        }
        // Another scheme (`Basic ...`) is no bearer token: missing, not invalid, so
        // not counted toward the failure limit.
        let bearer = first.and_then(|v| v.to_str().ok()).and_then(bearer_str);
        // Looked up only where a mode reads them. Two keys are ambiguous: which one
        // "the" caller is depends on who reads them.
        let (api_key, several_keys) = if matches!(mode, AuthMode::ApiKey | AuthMode::Either) {
            let mut all = headers.get_all(API_KEY).iter();
            let first = all.next();
            (
                first.and_then(|v| v.to_str().ok()),
                first.is_some() && all.next().is_some(),
            )
        } else {
            (None, false)
        };
        let id = match mode {
            AuthMode::None => return Ok(None),
            AuthMode::Jwt => self.verify_jwt(bearer.ok_or(AuthError::Missing)?).await?,
            AuthMode::ApiKey => self.verify_api_key(one_key(api_key, several_keys)?)?,
            AuthMode::Either => match (bearer, api_key) {
                (Some(t), _) if self.jwt.is_some() => self.verify_jwt(t).await?,
                (_, Some(k)) => self.verify_api_key(one_key(Some(k), several_keys)?)?,
                _ => return Err(AuthError::Missing),
            },
        };
        check_roles(id, roles).map(Some)
    }

    /// `authenticate`'s verdict when it needs no verification: the request's bearer
    /// token is in the token cache (and unexpired). `None`: anything else, left to
    /// `authenticate`. `now`: the caller's monotonic clock reading.
    ///
    /// The same checks in the same order as `authenticate` takes for such a request:
    /// one Authorization header, a JWT mode, the cached token, the roles. The token
    /// is compared as bytes, without `HeaderValue::to_str` over all of it: cached
    /// tokens passed that check, and what surrounds one in the header ("Bearer ",
    /// spaces and tabs) passes it too, so a hit is a header `to_str` accepts.
    fn authenticate_cached(
        &self,
        mode: AuthMode,
        roles: &[String],
        headers: &HeaderMap,
        now: Instant,
    ) -> Option<Result<Arc<Identity>, AuthError>> {
        let jwt = self.jwt.as_ref()?;
        if !matches!(mode, AuthMode::Jwt | AuthMode::Either) {
            return None;
        }
        let mut authorization = headers.get_all(header::AUTHORIZATION).iter();
        let raw = bearer_bytes(authorization.next()?)?;
        if authorization.next().is_some() {
            return None;
        }
        let id = jwt.verified.get(raw, now)?;
        Some(check_roles(id, roles))
    }

    fn verify_api_key(&self, key: &str) -> Result<Arc<Identity>, AuthError> {
        let k = self
            .api_keys
            .get(&hash_api_key(key))
            .ok_or_else(|| AuthError::Invalid("unknown api key".into()))?;
        Ok(Arc::new(Identity::new(
            k.user_id.clone(),
            k.roles.clone(),
            Some(k.name.clone()),
        )))
    }

    async fn verify_jwt(&self, token: &str) -> Result<Arc<Identity>, AuthError> {
        let v = self
            .jwt
            .as_ref()
            .ok_or_else(|| AuthError::Invalid("jwt not configured".into()))?;
        if let Some(id) = v.verified.get(token.as_bytes(), Instant::now()) {
            return Ok(id);
        }
        // Unknown algorithms (including "none") fail to parse here.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("bad header: {e}")))?;
        let (alg, key) = v.select_key(header.alg, header.kid.as_deref()).await?;
        if alg != header.alg {
            return Err(AuthError::Invalid(format!(
                "key is {alg:?}, token says {:?}",
                header.alg
            )));
        }
        let mut val = Validation::new(alg);
        val.algorithms = vec![alg];
        val.leeway = v.cfg.leeway_secs;
        val.validate_exp = true;
        val.validate_nbf = true;
        // A configured issuer / audience must be present, not only right when present:
        // jsonwebtoken checks `iss` / `aud` only if the token has them.
        let mut required = vec!["exp"];
        match &v.cfg.issuer {
            Some(iss) => {
                val.set_issuer(&[iss]);
                required.push("iss");
            }
            None => val.iss = None,
        }
        match &v.cfg.audience {
            Some(aud) => {
                val.set_audience(&[aud]);
                required.push("aud");
            }
            None => val.validate_aud = false,
        }
        val.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key, &val)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let payload = data.claims;
        claims::no_duplicate_claims(&payload_bytes(token)?)?;
        claims::check_time_claims(&payload)?;
        let user_id = claims::user_id(&payload, &v.cfg.user_id_claim)?;
        let roles = claims::roles(&payload, &v.cfg.role_claim)?;
        let id = Arc::new(Identity::new(user_id, roles, None));
        // `exp` is required, and was checked by `decode` and `check_time_claims`.
        if let Some(exp) = payload.get("exp").and_then(claims::numeric_date) {
            v.verified
                .put(token, &id, exp.saturating_add(v.cfg.leeway_secs));
        }
        Ok(id)
    }
}

impl JwtVerifier {
    async fn select_key(
        &self,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<(Algorithm, Arc<DecodingKey>), AuthError> {
        if let Some(kid) = kid {
            if let Some((_, a, k)) = self
                .keys
                .iter()
                .find(|(id, _, _)| id.as_deref() == Some(kid))
            {
                return Ok((*a, k.clone()));
            }
            if let Some(jwks) = &self.jwks {
                if let Some(found) = jwks.key(kid) {
                    return Ok(found);
                }
                // Key rotation: the issuer may have published a key we have not seen yet.
                // Boxed: the fetch's future (an HTTPS client request) is several KiB,
                // and inline it would be part of every request's future, copied from
                // stage to stage, although it is almost never run.
                let refresh =
                    jwks.refresh_if_allowed(Duration::from_secs(self.cfg.jwks_min_refetch_secs));
                if Box::pin(refresh).await {
                    if let Some(found) = jwks.key(kid) {
                        return Ok(found);
                    }
                }
            }
            return Err(AuthError::Invalid(format!("unknown kid {kid:?}")));
        }
        // Without a kid only a configured key of the token's algorithm can apply.
        self.keys
            .iter()
            .find(|(_, a, _)| *a == alg)
            .map(|(_, a, k)| (*a, k.clone()))
            .ok_or_else(|| AuthError::Invalid(format!("no key for {alg:?}")))
    }
}

/// The decoded JSON of a (verified) token's payload segment.
fn payload_bytes(token: &str) -> Result<Vec<u8>, AuthError> {
    use base64::Engine as _;
    let segment = token.split('.').nth(1).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|e| AuthError::Invalid(format!("payload: {e}")))
}

#[cfg(test)]
mod claim_tests;
#[cfg(test)]
mod stage_tests;

#[cfg(test)]
pub(super) mod tests {
    /// The scheme matches in any case and nothing else: every other byte in each
    /// position (also those that fold onto a letter's case bit) is refused.
    #[test]
    fn bearer_scheme_matches_in_any_case_only() {
        for ok in ["Bearer x", "bearer x", "BEARER x", "bEaReR x", "Bearer "] {
            assert!(is_bearer(ok.as_bytes()), "{ok:?}");
        }
        let scheme = *b"bearer ";
        for i in 0..scheme.len() {
            for byte in 0..=255u8 {
                let mut v = scheme;
                v[i] = byte;
                let same = byte.eq_ignore_ascii_case(&scheme[i]);
                assert_eq!(is_bearer(&v), same, "byte {byte:#x} at {i}");
            }
        }
        assert!(!is_bearer(b"Bearer") && !is_bearer(b"Bearer\tx") && !is_bearer(b""));
    }

    use super::*;
    use crate::config::JwtKeyConfig;
    use jsonwebtoken::{encode, EncodingKey, Header};

    pub(super) fn cfg() -> JwtConfig {
        JwtConfig {
            issuer: Some("iss".into()),
            audience: Some("aud".into()),
            keys: vec![JwtKeyConfig {
                kid: None,
                algorithm: "HS256".into(),
                secret: Some(crate::config::Secret::inline("s3cret")),
                public_key_pem: None,
                public_key_file: None,
            }],
            jwks_url: None,
            jwks_ca_file: None,
            jwks_refresh_secs: 60,
            jwks_min_refetch_secs: 10,
            user_id_claim: "sub".into(),
            role_claim: "role".into(),
            leeway_secs: 0,
            token_cache_max_entries: 10_000,
            token_cache_max_bytes: 4 << 20,
            jwks_refresh: None,
            jwks_min_refetch: None,
            leeway: None,
        }
    }

    pub(super) fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .expect("encode")
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {t}").parse().expect("header"),
        );
        h
    }

    pub(super) fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
    }

    #[tokio::test]
    async fn jwt_claims_are_checked() {
        let a = Authenticator::new(Some(&cfg()), &[], None).expect("auth");
        let good = serde_json::json!({"sub": "u1", "role": "admin", "iss": "iss", "aud": "aud", "exp": now() + 60});
        let id = a
            .authenticate(AuthMode::Jwt, &[], &bearer(&token(good.clone(), "s3cret")))
            .await
            .expect("valid token");
        assert_eq!(id.map(|i| i.user_id.clone()), Some("u1".into()));
        for (what, claims, secret) in [
            (
                "expired",
                serde_json::json!({"sub": "u1", "iss": "iss", "aud": "aud", "exp": now() - 100}),
                "s3cret",
            ),
            (
                "not yet valid",
                serde_json::json!({"sub": "u1", "iss": "iss", "aud": "aud", "exp": now() + 100, "nbf": now() + 50}),
                "s3cret",
            ),
            (
                "wrong issuer",
                serde_json::json!({"sub": "u1", "iss": "x", "aud": "aud", "exp": now() + 100}),
                "s3cret",
            ),
            (
                "wrong audience",
                serde_json::json!({"sub": "u1", "iss": "iss", "aud": "x", "exp": now() + 100}),
                "s3cret",
            ),
            ("bad signature", good.clone(), "other"),
        ] {
            let r = a
                .authenticate(AuthMode::Jwt, &[], &bearer(&token(claims, secret)))
                .await;
            assert!(matches!(r, Err(AuthError::Invalid(_))), "{what}: {r:?}");
        }
        let r = a
            .authenticate(
                AuthMode::Jwt,
                &["ops".into()],
                &bearer(&token(good, "s3cret")),
            )
            .await;
        assert!(
            matches!(r, Err(AuthError::Forbidden { .. })),
            "role check: {r:?}"
        );
        assert_eq!(
            a.authenticate(AuthMode::Jwt, &[], &HeaderMap::new()).await,
            Err(AuthError::Missing)
        );
    }

    #[tokio::test]
    async fn alg_none_is_rejected() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let a = Authenticator::new(Some(&cfg()), &[], None).expect("auth");
        let claims =
            serde_json::json!({"sub": "u1", "iss": "iss", "aud": "aud", "exp": now() + 60});
        let t = format!(
            "{}.{}.",
            b64.encode(r#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(claims.to_string())
        );
        let r = a.authenticate(AuthMode::Jwt, &[], &bearer(&t)).await;
        assert!(matches!(r, Err(AuthError::Invalid(_))), "{r:?}");
    }

    #[tokio::test]
    async fn api_keys_are_matched_by_hash() {
        let keys = [ApiKeyConfig {
            name: "partner".into(),
            sha256: hash_api_key("k-123"),
            user_id: "p1".into(),
            roles: vec![],
        }];
        let a = Authenticator::new(None, &keys, None).expect("auth");
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "k-123".parse().expect("hv"));
        let id = a
            .authenticate(AuthMode::ApiKey, &[], &h)
            .await
            .expect("valid key")
            .expect("identity");
        assert_eq!(
            (id.user_id.as_str(), id.api_key.as_deref()),
            ("p1", Some("partner"))
        );
        h.insert("x-api-key", "wrong".parse().expect("hv"));
        assert!(matches!(
            a.authenticate(AuthMode::ApiKey, &[], &h).await,
            Err(AuthError::Invalid(_))
        ));
    }
}
