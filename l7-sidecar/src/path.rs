//! Request-path normalisation. Routing, auth and the upstream must all see the same
//! path, so the gateway normalises it once, before routing, and forwards the result.
//! Without this `/api/public/../users` matches a public prefix route and an upstream
//! that resolves the dot-segment itself serves a protected resource.
//!
//! Policy (Envoy's `normalize_path` + `merge_slashes` +
//! `path_with_escaped_slashes_action = REJECT_REQUEST`, made stricter):
//! - the path must be origin-form (start with `/`);
//! - `%XX` escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, every
//!   other escape is kept with upper-case hex (`%2e` becomes `.`, `%3b` stays `%3B`);
//! - refused with 400: malformed escapes (`%4`, `%zz`), escaped `/` or `\` (`%2F`,
//!   `%5C`), escaped control characters (`%00`–`%1F`, `%7F`), a raw `\`, escapes that
//!   do not decode to valid UTF-8 (overlong forms such as `%C0%AE`), and dot-segments
//!   carrying parameters (`..;x`, `.;x`, which Java servers treat as `..`);
//! - runs of `/` are merged; `.` and `..` segments are removed as RFC 3986 §5.2.4 says
//!   (`..` never climbs above `/`);
//! - the query is not a path and is left exactly as sent.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with /")]
    NotOriginForm,
    #[error("malformed percent-encoding")]
    BadEscape,
    #[error("encoded slash or backslash")]
    EncodedSeparator,
    #[error("backslash in path")]
    Backslash,
    #[error("control character in path")]
    ControlChar,
    #[error("path does not decode to UTF-8")]
    InvalidUtf8,
    #[error("dot-segment with parameters")]
    DotSegmentWithParams,
}

pub fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Append `%XX` for `b`.
pub fn push_escaped(out: &mut String, b: u8) {
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 0xf)]));
}

/// Decode every `%XX`; malformed escapes are kept as they are.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// Encode everything but unreserved characters (and `/` when `keep_slash`).
pub fn percent_encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(char::from(b));
        } else {
            push_escaped(&mut out, b);
        }
    }
    out
}

/// Nothing in `path` that normalisation would change or refuse.
fn plainly_normal(path: &str) -> bool {
    path.starts_with('/')
        && !path
            .bytes()
            .any(|b| matches!(b, b'%' | b'\\' | b';') || !(0x21..0x7f).contains(&b))
        && !path.contains("//")
        && !path.contains("/.")
}

/// Normalise a request path per the module's policy.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    // Almost every path is already normal: no allocation for those.
    if plainly_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    // First pass: decode unreserved escapes, check the rest, and check that the
    // fully decoded path is UTF-8 (so no upstream decoder can read overlong forms).
    let b = path.as_bytes();
    let mut canon = String::with_capacity(b.len());
    let mut decoded = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let (Some(h), Some(l)) = (
                    b.get(i + 1).copied().and_then(hex_val),
                    b.get(i + 2).copied().and_then(hex_val),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let v = h << 4 | l;
                if v == b'/' || v == b'\\' {
                    return Err(PathError::EncodedSeparator);
                }
                if v < 0x20 || v == 0x7f {
                    return Err(PathError::ControlChar);
                }
                if is_unreserved(v) {
                    canon.push(char::from(v));
                } else {
                    push_escaped(&mut canon, v);
                }
                decoded.push(v);
                i += 3;
                continue;
            }
            b'\\' => return Err(PathError::Backslash),
            0..=0x20 | 0x7f..=0xff => return Err(PathError::ControlChar),
            _ => {
                canon.push(char::from(c));
                decoded.push(c);
            }
        }
        i += 1;
    }
    if std::str::from_utf8(&decoded).is_err() {
        return Err(PathError::InvalidUtf8);
    }
    // Second pass: merge slashes and remove dot-segments.
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in canon.split('/').skip(1) {
        trailing_slash = false;
        let bare = seg.split(';').next().unwrap_or_default();
        if seg.contains(';') && (bare == "." || bare == "..") {
            return Err(PathError::DotSegmentWithParams);
        }
        match seg {
            "" | "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            s => out.push(s),
        }
    }
    let mut norm = String::with_capacity(canon.len());
    for s in &out {
        norm.push('/');
        norm.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        norm.push('/');
    }
    if norm == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(norm))
    }
}

/// `uri` with its path replaced and its query kept.
pub fn with_path(uri: &http::Uri, path: &str) -> Option<http::Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::from_maybe_shared(pq).ok()?);
    http::Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation_table() {
        for (input, want) in [
            ("/", "/"),
            ("/api/users", "/api/users"),
            ("/api/public/../users", "/api/users"),
            ("/api/public/%2e%2e/users", "/api/users"),
            ("/api/public/%2E./users", "/api/users"),
            ("/v1/users/../../api/payments", "/api/payments"),
            ("/../../etc", "/etc"),
            ("/a/b/..", "/a/"),
            ("/a/./b/.", "/a/b/"),
            ("//a///b//", "/a/b/"),
            ("/%7Ea%41%2d", "/~aA-"),
            ("/a%3bb%3F%25", "/a%3Bb%3F%25"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/a;b=1/c", "/a;b=1/c"),
            ("/.well-known/x", "/.well-known/x"),
            ("/..", "/"),
        ] {
            assert_eq!(normalize(input).as_deref(), Ok(want), "{input}");
        }
        for (input, err) in [
            ("*", PathError::NotOriginForm),
            ("", PathError::NotOriginForm),
            ("/a%2fb", PathError::EncodedSeparator),
            ("/a%2F..", PathError::EncodedSeparator),
            ("/a%5cb", PathError::EncodedSeparator),
            ("/a\\..\\b", PathError::Backslash),
            ("/a%00", PathError::ControlChar),
            ("/a%7f", PathError::ControlChar),
            ("/a%zz", PathError::BadEscape),
            ("/a%4", PathError::BadEscape),
            ("/a%", PathError::BadEscape),
            ("/%c0%ae%c0%ae/x", PathError::InvalidUtf8),
            ("/%e9", PathError::InvalidUtf8),
            ("/a/..;/b", PathError::DotSegmentWithParams),
            ("/a/.;x/b", PathError::DotSegmentWithParams),
            ("/a/%2e%2e;/b", PathError::DotSegmentWithParams),
        ] {
            assert_eq!(normalize(input), Err(err), "{input}");
        }
    }

    #[test]
    fn encode_and_decode_round_trip() {
        assert_eq!(percent_encode(b"7&admin=true", false), "7%26admin%3Dtrue");
        assert_eq!(percent_encode(b"a/b c", true), "a/b%20c");
        assert_eq!(percent_decode("a%20b%zz%4"), b"a b%zz%4");
    }

    proptest::proptest! {
        #[test]
        fn normal_paths_are_fixed_points(path in "\\PC{0,64}") {
            if let Ok(n) = normalize(&path) {
                let again = normalize(&n).map(|c| c.into_owned());
                proptest::prop_assert_eq!(again.as_deref(), Ok(&*n));
                proptest::prop_assert!(!n.split('/').any(|s| s == "." || s == ".."));
                proptest::prop_assert!(!n.contains("//"));
            }
        }
    }
}
