//! Durations written as strings (`"500ms"`, `"15s"`, `"2m"`, `"1.5s"`, parsed by humantime)
//! next to the older integer keys (`timeout_ms = 15000`, `leeway_secs = 30`). Each setting
//! has both spellings: the key without the unit suffix takes a string, the suffixed key an
//! integer. Giving both is an error naming both; the string is converted into the integer
//! field, so the rest of the gateway reads one field only.

use super::{Config, FieldError};
use serde::de::{self, Deserialize, Deserializer, Visitor};
use std::time::Duration;

/// A duration as written in the file; parsed (with its path) by `Config::resolve_durations`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration string such as \"500ms\", \"15s\" or \"2m\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Millis,
    Secs,
}

impl Unit {
    fn suffix(self) -> &'static str {
        match self {
            Unit::Millis => "_ms",
            Unit::Secs => "_secs",
        }
    }
}

/// Parse `text` for `path`; the message names the value and shows what would work.
pub fn parse(path: &str, text: &str, unit: Unit) -> Result<u64, FieldError> {
    let bad = |why: String| FieldError {
        path: path.to_string(),
        message: format!("{text:?} is not a duration ({why}; examples: 500ms, 15s, 2m)"),
    };
    let d: Duration = humantime::parse_duration(text.trim()).map_err(|e| bad(e.to_string()))?;
    let (value, whole) = match unit {
        Unit::Millis => (d.as_millis(), d.subsec_nanos().is_multiple_of(1_000_000)),
        Unit::Secs => (u128::from(d.as_secs()), d.subsec_nanos() == 0),
    };
    if !whole {
        return Err(bad(match unit {
            Unit::Millis => "finer than a millisecond".into(),
            Unit::Secs => "this setting takes whole seconds".into(),
        }));
    }
    u64::try_from(value).map_err(|_| bad("too long".into()))
}

/// One setting: `key` (string) and `key_ms`/`key_secs` (integer) inside the table at `table`.
pub struct Setting<'a> {
    pub table: &'a str,
    pub key: &'a str,
    pub unit: Unit,
    pub text: &'a Option<DurationText>,
    pub legacy: &'a mut u64,
}

impl Setting<'_> {
    /// `raw` is the same table as parsed TOML, to see whether the integer key was written
    /// (its serde default cannot tell).
    fn apply(self, raw: Option<&toml::Table>, errs: &mut Vec<FieldError>) {
        let Some(DurationText(text)) = self.text else {
            return;
        };
        let path = format!("{}.{}", self.table, self.key);
        let legacy_key = format!("{}{}", self.key, self.unit.suffix());
        if raw.is_some_and(|t| t.contains_key(&legacy_key)) {
            errs.push(FieldError {
                path: path.clone(),
                message: format!("give either {} or {legacy_key}, not both", self.key),
            });
            return;
        }
        match parse(&path, text, self.unit) {
            Ok(v) => *self.legacy = v,
            Err(e) => errs.push(e),
        }
    }
}

fn sub<'a>(t: Option<&'a toml::Table>, key: &str) -> Option<&'a toml::Table> {
    t?.get(key)?.as_table()
}

impl Config {
    /// Fill every `*_ms`/`*_secs` field from its string twin; `raw` is the parsed file.
    pub(super) fn resolve_durations(&mut self, raw: &toml::Table) -> Vec<FieldError> {
        use Unit::{Millis, Secs};
        let mut errs = Vec::new();
        let root = Some(raw);

        let s = &mut self.server;
        let t = sub(root, "server");
        for (key, text, legacy) in [
            (
                "header_read_timeout",
                &s.header_read_timeout,
                &mut s.header_read_timeout_ms,
            ),
            (
                "body_read_timeout",
                &s.body_read_timeout,
                &mut s.body_read_timeout_ms,
            ),
            (
                "first_byte_timeout",
                &s.first_byte_timeout,
                &mut s.first_byte_timeout_ms,
            ),
            ("idle_timeout", &s.idle_timeout, &mut s.idle_timeout_ms),
            (
                "tunnel_idle_timeout",
                &s.tunnel_idle_timeout,
                &mut s.tunnel_idle_timeout_ms,
            ),
            ("reload_poll", &s.reload_poll, &mut s.reload_poll_ms),
            ("dns_refresh", &s.dns_refresh, &mut s.dns_refresh_ms),
        ] {
            let table = "server";
            Setting {
                table,
                key,
                unit: Millis,
                text,
                legacy,
            }
            .apply(t, &mut errs);
        }

        for (name, p) in &mut self.pools {
            let table = format!("pools.{name}");
            let t = sub(sub(root, "pools"), name);
            for (key, text, legacy) in [
                (
                    "connect_timeout",
                    &p.connect_timeout,
                    &mut p.connect_timeout_ms,
                ),
                (
                    "request_timeout",
                    &p.request_timeout,
                    &mut p.request_timeout_ms,
                ),
            ] {
                Setting {
                    table: &table,
                    key,
                    unit: Millis,
                    text,
                    legacy,
                }
                .apply(t, &mut errs);
            }
            if let Some(hc) = &mut p.health_check {
                let table = format!("{table}.health_check");
                let t = sub(t, "health_check");
                for (key, text, legacy) in [
                    ("interval", &hc.interval, &mut hc.interval_ms),
                    ("timeout", &hc.timeout, &mut hc.timeout_ms),
                ] {
                    Setting {
                        table: &table,
                        key,
                        unit: Millis,
                        text,
                        legacy,
                    }
                    .apply(t, &mut errs);
                }
            }
            let pc = &mut p.passive;
            let table = format!("{table}.passive");
            let t = sub(t, "passive");
            for (key, text, legacy) in [
                ("base_ejection", &pc.base_ejection, &mut pc.base_ejection_ms),
                ("max_ejection", &pc.max_ejection, &mut pc.max_ejection_ms),
            ] {
                Setting {
                    table: &table,
                    key,
                    unit: Millis,
                    text,
                    legacy,
                }
                .apply(t, &mut errs);
            }
        }

        let auth = sub(root, "auth");
        let fl = &mut self.auth.failure_limit;
        Setting {
            table: "auth.failure_limit",
            key: "window",
            unit: Millis,
            text: &fl.window,
            legacy: &mut fl.window_ms,
        }
        .apply(sub(auth, "failure_limit"), &mut errs);
        if let Some(j) = &mut self.auth.jwt {
            let t = sub(auth, "jwt");
            for (key, text, legacy) in [
                ("jwks_refresh", &j.jwks_refresh, &mut j.jwks_refresh_secs),
                (
                    "jwks_min_refetch",
                    &j.jwks_min_refetch,
                    &mut j.jwks_min_refetch_secs,
                ),
                ("leeway", &j.leeway, &mut j.leeway_secs),
            ] {
                Setting {
                    table: "auth.jwt",
                    key,
                    unit: Secs,
                    text,
                    legacy,
                }
                .apply(t, &mut errs);
            }
        }

        for (name, rl) in &mut self.rate_limits {
            Setting {
                table: &format!("rate_limits.{name}"),
                key: "window",
                unit: Millis,
                text: &rl.window,
                legacy: &mut rl.window_ms,
            }
            .apply(sub(sub(root, "rate_limits"), name), &mut errs);
        }
        errs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        for (text, ms) in [
            ("60s", 60_000),
            ("500ms", 500),
            ("2m", 120_000),
            ("1h", 3_600_000),
            ("1.5s", 1_500),
            ("1m 30s", 90_000),
        ] {
            assert_eq!(parse("x", text, Unit::Millis), Ok(ms), "{text}");
        }
        assert_eq!(parse("x", "2m", Unit::Secs), Ok(120));
    }

    #[test]
    fn bad_values_name_the_field_and_the_value() {
        let e = parse("routes[2].timeout", "15 parsecs", Unit::Millis).expect_err("bad unit");
        assert_eq!(e.path, "routes[2].timeout");
        assert!(
            e.message.starts_with("\"15 parsecs\" is not a duration"),
            "{}",
            e.message
        );
        assert!(
            e.message.contains("examples: 500ms, 15s, 2m"),
            "{}",
            e.message
        );
        for bad in ["", "15", "-1s", "1.5ms"] {
            assert!(parse("p", bad, Unit::Millis).is_err(), "{bad:?} accepted");
        }
        let e = parse("auth.jwt.leeway", "1.5s", Unit::Secs).expect_err("fractional secs");
        assert!(e.message.contains("whole seconds"), "{}", e.message);
    }
}
