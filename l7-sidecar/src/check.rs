//! What `l7-sidecar --check` prints about a valid config: the routes in the order the
//! router tries them (taken from `Router` itself, so it cannot drift from matching), and
//! advice such as inline secrets. Never prints a secret.

use crate::config::{Config, PathMatch};
use crate::routing::Router;
use std::fmt::Write as _;

/// One line per route: match order, name, host, methods, headers, path → target.
pub fn route_table(cfg: &Config) -> String {
    let router = Router::new(&cfg.routes);
    let mut out = String::from("routes, in match order (first match wins):\n");
    for (i, r) in router.match_order().enumerate() {
        let host = r.host.as_deref().unwrap_or("*");
        let methods = if r.methods.is_empty() {
            "ANY".to_string()
        } else {
            r.methods.join(",")
        };
        let kind = match r.path_match {
            PathMatch::Exact => "exact",
            PathMatch::Prefix => "prefix",
            PathMatch::Template => "template",
        };
        let target = match &r.pool {
            Some(p) => format!("pool {p}"),
            None => {
                let parts: Vec<String> = r
                    .aggregate
                    .iter()
                    .map(|a| format!("{}={}", a.name, a.pool))
                    .collect();
                format!("aggregate [{}]", parts.join(", "))
            }
        };
        let _ = write!(
            out,
            "  {:>2}. {:<20} host={host} methods={methods} path={} ({kind})",
            i + 1,
            r.name,
            r.path
        );
        for (k, v) in &r.headers {
            let _ = write!(out, " header {k}={v}");
        }
        let _ = writeln!(out, " -> {target}");
    }
    out
}

/// Warnings as `warning: path: message` lines.
pub fn warnings(cfg: &Config) -> String {
    cfg.warnings()
        .iter()
        .map(|w| format!("warning: {w}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_listed_in_the_routers_order_with_their_targets() {
        // File order is the reverse of specificity: the table must not follow the file.
        let cfg = Config::parse(
            r#"
            [pools.a]
            backends = [{ address = "127.0.0.1:1" }]
            [pools.b]
            backends = [{ address = "127.0.0.1:2" }]
            [[routes]]
            name = "catch-all"
            path = "/"
            pool = "a"
            [[routes]]
            name = "users"
            path = "/users"
            methods = ["GET"]
            pool = "b"
            [[routes]]
            name = "users-host"
            host = "api.example.com"
            path = "/users"
            headers = { "x-version" = "2" }
            pool = "b"
            [[routes]]
            name = "summary"
            path = "/users/{id}/summary"
            path_match = "template"
            aggregate = [{ name = "u", pool = "a", path = "/u/{id}" }]
        "#,
        )
        .expect("valid");
        let table = route_table(&cfg);
        let order: Vec<&str> = table
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().nth(1).expect("name"))
            .collect();
        assert_eq!(
            order,
            ["users-host", "summary", "users", "catch-all"],
            "{table}"
        );
        let line = |name: &str| {
            table
                .lines()
                .find(|l| l.split_whitespace().nth(1) == Some(name))
                .expect("listed")
                .to_string()
        };
        assert!(
            line("users-host").contains("host=api.example.com"),
            "{table}"
        );
        assert!(
            line("users-host").contains("header x-version=2 -> pool b"),
            "{table}"
        );
        assert!(
            line("users").contains("methods=GET path=/users (prefix) -> pool b"),
            "{table}"
        );
        assert!(line("summary").contains("-> aggregate [u=a]"), "{table}");
        assert!(line("catch-all").contains("host=* methods=ANY"), "{table}");
    }
}
