use super::*;

fn long(n: usize) -> String {
    "a".repeat(n)
}

#[test]
fn host_must_be_one_plain_authority() {
    let label63 = long(63);
    // 253 characters: four labels of 62 and one of 1, joined by dots.
    let name253 = format!("{0}.{0}.{0}.{0}.a", long(62));
    assert_eq!(name253.len(), 253);
    for ok in [
        "a.example",
        "a.example:8080",
        "127.0.0.1",
        "127.0.0.1.",
        "0.0.0.0:1",
        "255.255.255.255",
        "[::1]",
        "[::1]:80",
        "x_y",
        // A fully qualified name: the root label's dot.
        "a.example.",
        "a.example.:8080",
        "a:1",
        "a:65535",
        "[::ffff:127.0.0.1]:443",
        // A last label that starts with a digit but is no number is a name.
        "a.1b",
        "1a.example",
        "0xg.example",
        "a.0xg",
        label63.as_str(),
        name253.as_str(),
        &format!("{name253}."),
        &format!("{name253}:443"),
    ] {
        assert!(valid_authority(ok.as_bytes()), "{ok}");
    }
    for bad in [
        "", "a/x", "u@a", "a:8x", "a:123456", "[::1", "[]", "a b", ":80", "a?b", "a#b",
        // Only dots, or an empty label: no such name, and no route should guess.
        ".", "..", ".:80", "a..b", ".a", "a..", "a..:80",
        // Not `host[:port]` (hostile test r3, 5): lists, sub-delims and `%` in the
        // name, a port out of range or empty, an IPv6 literal that is not one.
        "evil.example,api.example.com:99999", "a,b", "a;x", "a~b", "a%41", "a!b", "a=b",
        "a:65536", "a:99999", "a:", "[::1]:", "[zz::1]", "[1:2]", "[::1]x",
        // Hostile test r3b, 6: a port in a second spelling or none a client reaches.
        "a:0", "a:00", "a:080", "a:0080", "[::1]:0", "[::1]:080",
        // A name ending in a number is an IPv4 address, in dotted-decimal form.
        "999.1.1.1", "1.2.3.4.5", "0x7f.1", "0x7f.0.0.1", "127.1", "2130706433",
        "127.0.0.01", "256.0.0.1", "1.2.3", "a.1", "a.0x", "a.0X1f", "1.2.3.4..",
        "127.0.0.1.:80x",
    ] {
        assert!(!valid_authority(bad.as_bytes()), "{bad}");
    }
    // Hostile test r3b, 6: DNS lengths, with and without a port or trailing dot.
    for bad in [
        long(64),
        format!("{}.example", long(64)),
        format!("a.{}", long(64)),
        format!("{}:80", long(64)),
        format!("{name253}a"),
        format!("a{name253}."),
        format!("{name253}a:443"),
        long(5000),
        format!("{}.com", vec![long(9); 500].join(".")),
    ] {
        assert!(!valid_authority(bad.as_bytes()), "{} characters", bad.len());
    }
}

#[test]
fn ports_and_ipv6_literals_compare_by_value() {
    assert_eq!(split_authority(b"a.example.:8080"), (&b"a.example"[..], Some(8080)));
    assert_eq!(split_authority(b"[::1]:80"), (&b"[::1]"[..], Some(80)));
    assert_eq!(split_authority(b"[::1]"), (&b"[::1]"[..], None));
    assert!(same_host(b"[0::1]", b"[::1]"));
    assert!(same_host(b"[::FFFF:127.0.0.1]", b"[::ffff:7f00:1]"));
    assert!(same_host(b"A.example", b"a.EXAMPLE"));
    assert!(!same_host(b"[::1]", b"[::2]"));
    assert!(!same_host(b"[::1]", b"a"));
    assert_eq!(ipv6_literal(b"[0:0::1]"), Some(Ipv6Addr::LOCALHOST));
    assert_eq!(ipv6_literal(b"[::1%eth0]"), None);
    assert_eq!(ipv6_literal(b"::1"), None);
}

/// `name_problem` names what `valid_authority` refuses in a name whose bytes and
/// labels are fine, for the config's messages.
#[test]
fn name_problems_are_named() {
    assert_eq!(name_problem("a.example"), None);
    assert_eq!(name_problem("127.0.0.1"), None);
    assert!(name_problem(&long(64)).is_some_and(|m| m.contains("63")));
    let name254 = format!("{0}.{0}.{0}.{0}.ab", long(62));
    assert!(name_problem(&name254).is_some_and(|m| m.contains("253")));
    assert!(name_problem("127.1").is_some_and(|m| m.contains("IPv4")));
    assert!(name_problem("0x7f.1.").is_some_and(|m| m.contains("IPv4")));
}

/// A second, plain implementation (comparison chain, label split, integer parse,
/// std's IPv4 parser) that the table-driven `valid_authority` must agree with.
fn reference_authority(v: &[u8]) -> bool {
    let (host_ok, rest) = if let Some(inner) = v.strip_prefix(b"[") {
        let Some(end) = inner.iter().position(|b| *b == b']') else {
            return false;
        };
        let ok = std::str::from_utf8(&inner[..end])
            .is_ok_and(|s| s.parse::<std::net::Ipv6Addr>().is_ok());
        (ok, &inner[end + 1..])
    } else {
        let end = v.iter().position(|b| *b == b':').unwrap_or(v.len());
        let name = &v[..end];
        let ok = labels_ok(name)
            && name
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        (ok, &v[end..])
    };
    let port_ok = match rest {
        [] => true,
        [b':', digits @ ..] => {
            (1..=5).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit)
                && !digits.starts_with(b"0")
                && std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse::<u32>().ok())
                    .is_some_and(|p| (1..=65535).contains(&p))
        }
        _ => false,
    };
    host_ok && port_ok
}

/// A reg-name's labels: none empty (but for the root label after one trailing dot),
/// 1–63 long, at most 253 in all; a numeric last label makes it an IPv4 address.
fn labels_ok(name: &[u8]) -> bool {
    let name = name.strip_suffix(b".").unwrap_or(name);
    if name.is_empty() || name.len() > 253 {
        return false;
    }
    let labels: Vec<&[u8]> = name.split(|b| *b == b'.').collect();
    if !labels.iter().all(|l| (1..=63).contains(&l.len())) {
        return false;
    }
    let last = labels[labels.len() - 1];
    let numeric = if last.len() >= 2 && last[0] == b'0' && (last[1] == b'x' || last[1] == b'X') {
        last[2..].iter().all(u8::is_ascii_hexdigit)
    } else {
        last.iter().all(u8::is_ascii_digit)
    };
    if !numeric {
        return true;
    }
    // Dotted-decimal by hand: four parts, 0–255, no leading zero.
    labels.len() == 4
        && labels.iter().all(|l| {
            l.iter().all(u8::is_ascii_digit)
                && l.len() <= 3
                && (l.len() == 1 || l[0] != b'0')
                && std::str::from_utf8(l).ok().and_then(|s| s.parse::<u16>().ok()).is_some_and(|n| n <= 255)
        })
}

proptest::proptest! {
    /// The table-driven check accepts exactly what the reference does: hosts
    /// built from the characters that matter (dots, colons, brackets, digits,
    /// reg-name and forbidden bytes), ports, IPv6 literals, numeric names, long
    /// labels and names, and arbitrary bytes.
    #[test]
    fn valid_authority_agrees_with_the_reference(
        shape in "[a.:1\\[\\]]{0,6}",
        v in "[a0.:\\[\\]_~%!$&'()*+,;=@/ ?#f-]{0,12}",
        port in "[a-z]{1,4}(:[0-9]{0,7})?",
        ip6 in "\\[[0-9a-f:.]{0,12}\\](:[0-9]{0,6})?",
        ip4 in "[0-9xXa.]{1,16}(:[0-9]{1,3})?",
        quad in "[0-9]{1,4}\\.[0-9]{1,4}\\.[0-9]{1,4}\\.[0-9]{1,4}\\.?",
        long_name in "([a-z0-9]{58,66}\\.){2,4}[a-z0-9]{1,66}\\.?",
        raw in proptest::collection::vec(proptest::num::u8::ANY, 0..12),
    ) {
        // `shape`: short strings of the structural characters alone, so dots,
        // colons and brackets meet in every order.
        proptest::prop_assert_eq!(valid_authority(shape.as_bytes()), reference_authority(shape.as_bytes()), "{:?}", shape);
        proptest::prop_assert_eq!(valid_authority(v.as_bytes()), reference_authority(v.as_bytes()), "{:?}", v);
        proptest::prop_assert_eq!(valid_authority(&raw), reference_authority(&raw), "{:?}", raw);
        // Ports around the 5-digit / 65535 limits and leading zeros, and bracketed literals.
        proptest::prop_assert_eq!(valid_authority(port.as_bytes()), reference_authority(port.as_bytes()), "{:?}", port);
        proptest::prop_assert_eq!(valid_authority(ip6.as_bytes()), reference_authority(ip6.as_bytes()), "{:?}", ip6);
        // The hand-written dotted-decimal check is std's IPv4 parser.
        proptest::prop_assert_eq!(dotted_decimal(ip4.as_bytes()), ip4.parse::<std::net::Ipv4Addr>().is_ok(), "{:?}", ip4);
        proptest::prop_assert_eq!(dotted_decimal(quad.as_bytes()), quad.parse::<std::net::Ipv4Addr>().is_ok(), "{:?}", quad);
        // Numbers, dots and hex around the IPv4 rule; labels and names around 63 / 253.
        proptest::prop_assert_eq!(valid_authority(ip4.as_bytes()), reference_authority(ip4.as_bytes()), "{:?}", ip4);
        proptest::prop_assert_eq!(valid_authority(long_name.as_bytes()), reference_authority(long_name.as_bytes()), "{:?}", long_name);
        // The config's messages name a problem exactly when the request check refuses.
        proptest::prop_assert_eq!(valid_authority(long_name.as_bytes()), name_problem(&long_name).is_none(), "{:?}", long_name);
    }
}
