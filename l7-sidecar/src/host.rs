//! The grammar of a host: what a request's Host or target authority (`guard`) and a
//! route's host (`config`) may be, and how two spellings of one host compare. A leaf
//! module: plain functions over bytes, shared by the request path and validation so
//! the two cannot drift apart (a route host no request can match is refused).

use std::net::Ipv6Addr;

/// Longest label and name (without one trailing dot) a DNS name can have
/// (RFC 1035 §2.3.4; 253 characters is 255 octets in wire form).
pub const MAX_LABEL: usize = 63;
pub const MAX_NAME: usize = 253;

/// Bytes of a DNS-style host name by class: `NAME` (letters, digits, `-`, `_`), `DOT`,
/// `COLON` (the port follows), 0 for any other. IPv4 addresses are such names too.
/// A table: one load and one comparison per usual byte instead of a chain of them
/// (this runs on every request). RFC 3986 would also allow sub-delims and `%` in a
/// reg-name, but no DNS name has them and `,` / `;` let one Host read as a list to
/// the upstream (`X-Forwarded-Host: evil.example,api.example.com`).
const NAME: u8 = 1;
const DOT: u8 = 2;
const COLON: u8 = 3;
const CLASS: [u8; 256] = {
    let mut t = [0; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            NAME
        } else if b == b'.' {
            DOT
        } else if b == b':' {
            COLON
        } else {
            0
        };
        i += 1;
    }
    t
};

/// A port in its one spelling: 1–5 digits without a leading zero, 1–65535. `:99999`
/// and `a:` name no port; `:0` is no port a client can reach (Envoy refuses it too);
/// `:080` would be a second spelling of `:80`, which the upstream, a cache or a log
/// could compare as text and tell apart from `:80` where the gateway would not.
pub fn port(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || digits[0] == b'0' {
        return None;
    }
    let mut n: u32 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n * 10 + u32::from(d - b'0');
    }
    u16::try_from(n).ok()
}

/// `host[:port]` of a valid authority: the host without one trailing dot, and the port.
pub fn split_authority(v: &[u8]) -> (&[u8], Option<u16>) {
    // An IPv6 literal's colons are inside the brackets; a port's is after them.
    let (host, port) = match v.iter().rposition(|b| *b == b':') {
        Some(i) if !v[i..].contains(&b']') => (&v[..i], port(&v[i + 1..])),
        _ => (v, None),
    };
    (host.strip_suffix(b".").unwrap_or(host), port)
}

/// The address of a bracketed IPv6 literal (`[::1]`), if `host` is one: no zone id,
/// nothing after the bracket.
pub fn ipv6_literal(host: &[u8]) -> Option<Ipv6Addr> {
    let inner = host.strip_prefix(b"[")?.strip_suffix(b"]")?;
    std::str::from_utf8(inner).ok()?.parse().ok()
}

/// Whether two hosts `split_authority` gave are one: names without case, IPv6
/// literals by address (`[0::1]` is `[::1]`).
pub fn same_host(a: &[u8], b: &[u8]) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    // Brackets are rare in a Host: the exact parse costs nothing that matters.
    a.first() == Some(&b'[') && ipv6_literal(a).is_some_and(|x| ipv6_literal(b) == Some(x))
}

/// `host[:port]`: host a DNS-style name (`NAME`), an IPv4 address or a bracketed IPv6
/// literal, port as `port` spells it; no userinfo, path, query or empty host. A name
/// may end in one dot (fully qualified, routed as the same host:
/// `routing::route_host`) but has no empty label: `.`, `a..b` or `.a` name no host,
/// and routing must not guess one. Labels are 1–63 characters and the name at most
/// 253 (DNS limits: nothing longer resolves, and a 5,000-character Host is only
/// load on every log line and trace). A name whose last label is a number is an IPv4
/// address and must be one in dotted-decimal form (`ipv4_consistent`).
pub fn valid_authority(v: &[u8]) -> bool {
    let rest = if let Some(inner) = v.strip_prefix(b"[") {
        let Some(end) = inner.iter().position(|b| *b == b']') else {
            return false;
        };
        // Brackets are rare in a Host: std's exact parser costs nothing that matters.
        let ip = std::str::from_utf8(&inner[..end]).ok();
        if ip.and_then(|s| s.parse::<Ipv6Addr>().ok()).is_none() {
            return false;
        }
        &inner[end + 1..]
    } else {
        // One pass over the name: its bytes, and its labels, judged at each dot
        // (not per byte): none empty but for the root label after one trailing dot
        // (no leading dot, no two in a row), none longer than 63.
        let mut end = v.len();
        let mut label_start = 0;
        // Labels closed by a dot, and how many of them were octets (`octet`): only
        // labels starting with a digit are looked at, so names pay one comparison.
        let (mut dots, mut octets) = (0u32, 0u32);
        let mut i = 0;
        while i < v.len() {
            let class = CLASS[usize::from(v[i])];
            if class != NAME {
                if class == DOT {
                    if i == label_start || i - label_start > MAX_LABEL {
                        return false;
                    }
                    if v[label_start].is_ascii_digit() && octet(&v[label_start..i]) {
                        octets += 1;
                    }
                    dots += 1;
                    label_start = i + 1;
                } else if class == COLON {
                    end = i;
                    break;
                } else {
                    return false;
                }
            }
            i += 1;
        }
        // The last label: empty after a trailing dot (or for an empty host).
        if end == 0 || end - label_start > MAX_LABEL {
            return false;
        }
        let name = &v[..end];
        let (name, last, octets, dots) = match name.strip_suffix(b".") {
            Some(n) => (n, n.iter().rposition(|b| *b == b'.').map_or(0, |i| i + 1), octets, dots - 1),
            None => (name, label_start, octets + u32::from(octet(&name[label_start..])), dots),
        };
        if name.len() > MAX_NAME {
            return false;
        }
        // A last label that is a number makes the name an IPv4 address
        // (`ipv4_consistent`): four labels, all octets.
        let label = &name[last..];
        if label[0].is_ascii_digit() && ends_in_number(label) && (dots != 3 || octets != 4) {
            return false;
        }
        &v[end..]
    };
    match rest {
        [] => true,
        [b':', digits @ ..] => port(digits).is_some(),
        _ => false,
    }
}

/// A name (no trailing dot, labels not empty) whose last label is a number — all
/// digits, or `0x` and hex digits — is an IPv4 address to a URL parser (WHATWG URL
/// "ends in a number"), to `inet_aton` and so to many upstreams: `0x7f.1`, `127.1` and
/// `2130706433` are `127.0.0.1` there, while routing would take them for three other
/// names. Only the dotted-decimal form (four parts 0–255, no leading zeros) is one
/// spelling of one address; every other such name is refused, as browsers refuse
/// `999.1.1.1` and `1.2.3.4.5`. No real name is lost: a top-level label is never
/// numeric (RFC 3696 §2). The usual name ends in a letter and costs one comparison.
/// `last`: where the name's last label starts. (`valid_authority` makes the same
/// test during its scan; this one serves `name_problem`, and the two are held to
/// each other by the tests.)
fn ipv4_consistent(name: &[u8], last: usize) -> bool {
    let label = &name[last..];
    if !label.first().is_some_and(u8::is_ascii_digit) || !ends_in_number(label) {
        return true;
    }
    dotted_decimal(name)
}

/// Four decimal parts 0–255 without leading zeros: what `Ipv4Addr`'s parser accepts
/// (the tests hold it to that), by hand.
fn dotted_decimal(name: &[u8]) -> bool {
    if name.len() > 15 {
        return false;
    }
    let mut rest = name;
    for part in 0..4 {
        let dot = rest.iter().position(|b| *b == b'.');
        let (label, next) = match dot {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &[][..]),
        };
        // Three parts end in a dot, the fourth does not.
        if (part < 3) != dot.is_some() || !octet(label) {
            return false;
        }
        rest = next;
    }
    true
}

/// 0–255 in 1–3 digits, no leading zero (`01` is octal to `inet_aton`).
fn octet(label: &[u8]) -> bool {
    match *label {
        [a] => a.is_ascii_digit(),
        [a, b] => (b'1'..=b'9').contains(&a) && b.is_ascii_digit(),
        [a, b, c] => {
            b.is_ascii_digit()
                && c.is_ascii_digit()
                && (a == b'1' || (a == b'2' && (b, c) <= (b'5', b'5')))
        }
        _ => false,
    }
}

/// WHATWG URL's number test for the last label: all decimal digits, or `0x`/`0X`
/// followed by hex digits (none counts: `0x` is 0).
fn ends_in_number(label: &[u8]) -> bool {
    match label {
        [b'0', b'x' | b'X', hex @ ..] => hex.iter().all(u8::is_ascii_hexdigit),
        _ => label.iter().all(u8::is_ascii_digit),
    }
}

/// Why a name (route host: no port, bytes and labels already checked) could never
/// be a request's host although its characters could: the limits `valid_authority`
/// adds. `None` when it could be one.
pub fn name_problem(name: &str) -> Option<&'static str> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.split('.').any(|l| l.len() > MAX_LABEL) {
        Some("has a label longer than 63 characters")
    } else if bare.len() > MAX_NAME {
        Some("is longer than 253 characters")
    } else if !ipv4_consistent(bare.as_bytes(), bare.rfind('.').map_or(0, |i| i + 1)) {
        Some("ends in a number but is not an IPv4 address in dotted-decimal form (a.b.c.d, each 0-255, no leading zeros)")
    } else {
        None
    }
}

#[cfg(test)]
mod tests;
