//! Who a verified token says the caller is. The user id and roles go upstream in
//! `X-User-Id` / `X-User-Role`, so each must read the same to every HTTP parser as
//! it did to the gateway: parsers trim surrounding whitespace (RFC 9110 OWS), so a
//! token for " alice" would reach the upstream as "alice", and an upstream splitting
//! the role list on `,` or whitespace would see " admin" as "admin". Such a value
//! refuses the token (401) rather than being dropped or passed on altered.

use super::AuthError;
use serde_json::Value;

/// A user id or role the gateway passes on: not empty, visible ASCII only
/// (0x21–0x7E). No spaces, not even inner ones: one rule that no header parser
/// trims or splits, where "inner spaces only" would leave each upstream to agree
/// on it. A role additionally has no `,` (the list separator in `X-User-Role`).
pub fn valid_identity_value(v: &str) -> bool {
    !v.is_empty() && v.bytes().all(|b| matches!(b, 0x21..=0x7e))
}

/// A role as `valid_identity_value`, and without `,`.
pub fn valid_role(v: &str) -> bool {
    valid_identity_value(v) && !v.contains(',')
}

/// The user id claim `name`: a string or an integer. Not any other number: JSON
/// numbers that are not 64-bit integers are read as floating point, and `1e2`,
/// `-0` or 2^64 + 1 would become user ids (`100.0`, `-0.0`, `1.8446744073709552e+19`)
/// that several subjects share, and that an upstream reading the token renders
/// differently.
pub(super) fn user_id(claims: &Value, name: &str) -> Result<String, AuthError> {
    let id = match claims.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        Some(Value::Number(_)) => {
            return Err(AuthError::Invalid(format!(
                "user id claim {name} is a number but not an integer of at most 64 bits"
            )))
        }
        _ => return Err(AuthError::Invalid(format!("missing claim {name}"))),
    };
    if !valid_identity_value(&id) {
        return Err(AuthError::Invalid(format!(
            "user id claim {name} is empty or not visible ASCII (no spaces or control characters)"
        )));
    }
    Ok(id)
}

/// The role claim `name`: one string or a list of strings. Absent, or `null` (what
/// many issuers write for an unset optional claim), means no roles. Any other type
/// refuses the token, as one bad element of a list does: passing it on as "no
/// roles" would say something the issuer did not.
pub(super) fn roles(claims: &Value, name: &str) -> Result<Vec<String>, AuthError> {
    let roles = match claims.get(name) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|r| r.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                AuthError::Invalid(format!(
                    "role claim {name} has an element that is not a string"
                ))
            })?,
        Some(_) => {
            return Err(AuthError::Invalid(format!(
                "role claim {name} is neither a string nor a list of strings"
            )))
        }
    };
    if !roles.iter().all(|r| valid_role(r)) {
        return Err(AuthError::Invalid(format!(
            "role claim {name} holds a value that is empty, has ',' or is not visible ASCII"
        )));
    }
    Ok(roles)
}

/// Refuses a payload (the token's decoded JSON) that names a claim twice. A JSON
/// parser keeps the last of duplicate names or the first, or refuses them:
/// `jsonwebtoken` refuses duplicates of the claims it checks itself, but the claims
/// this gateway reads (user id, roles) come from a map that keeps the last, while an
/// upstream re-verifying the forwarded token might keep the first — and see another
/// role than the gateway granted. Run once per verification, not per request.
pub(super) fn no_duplicate_claims(payload: &[u8]) -> Result<(), AuthError> {
    struct Names;
    impl<'de> serde::de::Visitor<'de> for Names {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut duplicate = None;
            while let Some(name) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                map.next_value::<serde::de::IgnoredAny>()?;
                if !seen.insert(name.clone().into_owned()) && duplicate.is_none() {
                    duplicate = Some(name.into_owned());
                }
            }
            Ok(duplicate)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(payload);
    match serde::Deserializer::deserialize_map(&mut de, Names) {
        Ok(None) => Ok(()),
        Ok(Some(name)) => Err(AuthError::Invalid(format!("claim {name} appears twice"))),
        Err(e) => Err(AuthError::Invalid(format!("payload: {e}"))),
    }
}

/// A NumericDate (RFC 7519 §2) as `jsonwebtoken` reads one: a non-negative integer,
/// or a finite non-negative number below 2^64, rounded. `None` for anything else.
pub(super) fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        let f = v.as_f64()?;
        (f.is_finite() && f >= 0.0 && f < u64::MAX as f64).then(|| f.round() as u64)
    })
}

/// The time claims `jsonwebtoken` checks when it can read them: one it cannot read
/// (`"nbf": "later"`, `1e20`, `-1`) would be skipped and the token accepted, so it
/// refuses the token. `null` counts as absent, as for the role claim; `exp` must be
/// present anyway (`decode` requires it).
pub(super) fn check_time_claims(claims: &Value) -> Result<(), AuthError> {
    for name in ["exp", "nbf"] {
        match claims.get(name) {
            None | Some(Value::Null) => {}
            Some(v) if numeric_date(v).is_some() => {}
            Some(_) => {
                return Err(AuthError::Invalid(format!(
                    "claim {name} is not a NumericDate (seconds since the epoch, 0 to 2^64)"
                )))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_values_are_visible_ascii_without_spaces() {
        for ok in ["a", "alice@example.com", "auth0|1", "~!\"#"] {
            assert!(valid_identity_value(ok), "{ok:?}");
        }
        for bad in [
            "", " a", "a ", "a b", "a\tb", "é", "\u{2028}", "\u{7f}", "a\0",
        ] {
            assert!(!valid_identity_value(bad), "{bad:?}");
        }
        assert!(valid_identity_value("a,b") && !valid_role("a,b"));
    }
}
