//! Route matching: host, path (exact / prefix / template), method and headers.
//! Routes are sorted once by specificity so the first full match is the most specific.

use crate::config::{PathMatch, RouteConfig};
use crate::ctx::Req;
use crate::http_util::json_error;
use crate::http_util::Body;
use crate::stage::{run, Next};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Response extensions read by the access log.
#[derive(Clone)]
pub struct MatchedRoute(pub Arc<Route>);

/// The matched route, for the stages below routing.
#[derive(Clone)]
pub struct RouteCtx {
    pub route: Arc<Route>,
    pub params: BTreeMap<String, String>,
    /// Host as the client sent it (Host header, or the HTTP/2 authority); a
    /// header value so passing it on upstream needs no copy.
    pub host: Option<HeaderValue>,
}

/// A request that matched a route, as every stage below routing receives it: the
/// route travels with the request in the type, so it cannot be missing there.
/// Both boxed: a stage boundary moves two pointers.
pub struct Routed<B> {
    pub req: Req<B>,
    pub route: Box<RouteCtx>,
}

/// Find the route or answer 404 / 405 with a JSON body.
pub async fn routing_stage<B>(
    router: &Router,
    req: Req<B>,
    next: impl Next<Routed<B>>,
) -> Response<Body> {
    match route(router, req) {
        Ok(routed) => {
            let matched = MatchedRoute(routed.route.route.clone());
            let mut resp = run(next, routed).await;
            resp.extensions_mut().insert(matched);
            resp
        }
        Err(resp) => resp,
    }
}

/// `routing_stage`'s lookup as a plain call: the routed request, or the 404 / 405
/// answer. The untraced pipeline runs it inline and hands the route to the access
/// log itself (no `MatchedRoute` extension).
pub fn route<B>(router: &Router, req: Req<B>) -> Result<Routed<B>, Response<Body>> {
    // The Host the checks accepted (visible ASCII) if they ran, else looked up.
    let checked = req.ctx().host.clone();
    let host = checked
        .or_else(|| req.headers().get(header::HOST).filter(|h| h.to_str().is_ok()).cloned())
        .or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
    match router.lookup(
        host.as_ref().and_then(|h| h.to_str().ok()),
        req.method(),
        req.uri().path(),
        req.headers(),
    ) {
        RouteMatch::Found { route, params } => {
            let route = Box::new(RouteCtx {
                route,
                params,
                host,
            });
            Ok(Routed { req, route })
        }
        RouteMatch::NotFound => Err(json_error(
            &req,
            StatusCode::NOT_FOUND,
            "not_found",
            "no route matches this request",
        )),
        RouteMatch::MethodNotAllowed { allowed } => {
            let mut r = json_error(
                &req,
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            );
            let allow = allowed
                .iter()
                .map(|m| m.as_str())
                .collect::<Vec<_>>()
                .join(", ");
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            Err(r)
        }
    }
}

/// The name a host routes as: without one trailing dot, since `api.example.com.` (fully
/// qualified) is the same host as `api.example.com` (RFC 1034 §3.1) and must meet the
/// same route, auth included, rather than fall through to a catch-all. Names with more
/// dots or an empty label never get here: `guard` refuses them (400 `bad_host`).
pub fn route_host(host: &str) -> &str {
    host.strip_suffix('.').unwrap_or(host)
}

pub struct Route {
    pub cfg: RouteConfig,
    /// This route's request counters and latency histogram.
    pub metrics: crate::stats::RouteMetrics,
    host: Option<String>,
    /// The address of an IPv6 route host (`[::1]`): requests spell it many ways
    /// (`[0::1]`, `[0:0:0:0:0:0:0:1]`) and match by address.
    host_v6: Option<std::net::Ipv6Addr>,
    template: Option<matchit::Router<()>>,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
}

/// Result of looking a request up.
pub enum RouteMatch {
    Found {
        route: Arc<Route>,
        params: BTreeMap<String, String>,
    },
    /// Some route matches host/path/headers but not the method.
    MethodNotAllowed {
        allowed: Vec<Method>,
    },
    NotFound,
}

pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Route {
    fn new(cfg: &RouteConfig) -> Route {
        let template = (cfg.path_match == PathMatch::Template).then(|| {
            let mut r = matchit::Router::new();
            // Validation already rejected templates matchit cannot parse.
            let _ = r.insert(cfg.path.as_str(), ());
            r
        });
        Route {
            host: cfg.host.as_ref().map(|h| route_host(h).to_ascii_lowercase()),
            host_v6: cfg.host.as_ref().and_then(|h| crate::host::ipv6_literal(h.as_bytes())),
            template,
            methods: cfg.methods.iter().filter_map(|m| m.parse().ok()).collect(),
            headers: cfg
                .headers
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect(),
            cfg: cfg.clone(),
            metrics: Default::default(),
        }
    }

    /// Higher sorts first: host, then path kind and length, then header and method constraints.
    fn specificity(&self) -> (u8, u8, usize, usize, u8) {
        let host = match &self.host {
            Some(h) if h.starts_with("*.") => 1,
            Some(_) => 2,
            None => 0,
        };
        let kind = match self.cfg.path_match {
            PathMatch::Exact => 3,
            PathMatch::Template => 2,
            PathMatch::Prefix => 1,
        };
        // For templates, literal characters count: `/users/me` beats `/users/{id}`.
        let literal_len = self.cfg.path.split('{').next().map_or(0, str::len);
        (
            host,
            kind,
            literal_len,
            self.headers.len(),
            u8::from(!self.methods.is_empty()),
        )
    }

    fn host_matches(&self, host: Option<&str>) -> bool {
        let Some(want) = &self.host else { return true };
        let Some(host) = host else { return false };
        // Ports are not part of the route's host.
        let host = host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        });
        if let Some(want) = self.host_v6 {
            return crate::host::ipv6_literal(host.as_bytes()) == Some(want);
        }
        let host = route_host(host);
        // `want` is lower case already; compare without allocating a lowered copy.
        let host = host.as_bytes();
        match want.strip_prefix("*.") {
            Some(suffix) => {
                host.len() > suffix.len() + 1
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix.as_bytes())
                    && host[host.len() - suffix.len() - 1] == b'.'
            }
            None => host.eq_ignore_ascii_case(want.as_bytes()),
        }
    }

    fn path_matches(&self, path: &str) -> Option<BTreeMap<String, String>> {
        match self.cfg.path_match {
            PathMatch::Exact => (path == self.cfg.path).then(BTreeMap::new),
            PathMatch::Prefix => {
                let prefix = self.cfg.path.trim_end_matches('/');
                // Prefix `/api` matches `/api` and `/api/x` but not `/apix`.
                let ok = prefix.is_empty()
                    || path == prefix
                    || path
                        .strip_prefix(prefix)
                        .is_some_and(|rest| rest.starts_with('/'));
                ok.then(BTreeMap::new)
            }
            PathMatch::Template => {
                let m = self.template.as_ref()?.at(path).ok()?;
                Some(
                    m.params
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            }
        }
    }

    fn headers_match(&self, headers: &HeaderMap) -> bool {
        self.headers
            .iter()
            .all(|(k, v)| headers.get_all(k).iter().any(|h| h == v))
    }

    /// Parameters the route's template captures with `{*name}`: their values keep `/`
    /// wherever they are placed in a path, also as `{name}` in a rewrite.
    pub fn catch_all_names(&self) -> Vec<&str> {
        if self.cfg.path_match != PathMatch::Template {
            return Vec::new();
        }
        self.cfg
            .path
            .split("{*")
            .skip(1)
            .filter_map(|s| s.split_once('}').map(|(name, _)| name))
            .collect()
    }

    /// Path sent upstream after prefix stripping or rewriting.
    pub fn upstream_path(
        &self,
        path: &str,
        params: &BTreeMap<String, String>,
    ) -> Result<String, TemplateError> {
        if let Some(rw) = &self.cfg.rewrite {
            return fill_template_with(rw, params, &self.catch_all_names());
        }
        if let Some(sp) = &self.cfg.strip_prefix {
            let sp = sp.trim_end_matches('/');
            if let Some(rest) = path.strip_prefix(sp) {
                return Ok(if rest.is_empty() {
                    "/".into()
                } else {
                    rest.to_string()
                });
            }
        }
        Ok(path.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("parameter {0} is a dot-segment")]
    DotSegment(String),
}

/// Replace `{name}` (and `{*name}`) placeholders with their captured values.
///
/// A value is decoded and re-encoded for where it lands, so it can only ever be data:
/// in the path (before the template's `?`) everything but unreserved characters is
/// percent-encoded (`/` too, except in a `{*catch-all}`), in the query even `/`, so
/// `7&admin=true` cannot add a parameter. A value that is (or, for a catch-all,
/// contains) a `.` or `..` segment is refused: it would move the upstream path.
/// Unknown placeholders are left as written.
pub fn fill_template(
    template: &str,
    params: &BTreeMap<String, String>,
) -> Result<String, TemplateError> {
    fill_template_with(template, params, &[])
}

/// `fill_template`, where the parameters named in `catch_all` (captured by a route's
/// `{*name}`) keep their `/` in the path even when placed as `{name}`.
pub fn fill_template_with(
    template: &str,
    params: &BTreeMap<String, String>,
    catch_all: &[&str],
) -> Result<String, TemplateError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    let mut in_query = false;
    while let Some(open) = rest.find('{') {
        let (before, from) = rest.split_at(open);
        in_query |= before.contains('?');
        out.push_str(before);
        let Some(close) = from.find('}') else {
            out.push_str(from);
            return Ok(out);
        };
        let inner = &from[1..close];
        let (catch_all, name) = match inner.strip_prefix('*') {
            Some(n) => (true, n),
            None => (catch_all.contains(&inner), inner),
        };
        match params.get(name) {
            Some(v) => {
                let raw = crate::path::percent_decode(v);
                // Servlet containers read `..;x` as `..` with a path parameter
                // (path normalisation refuses the raw form; `%3b` arrives decoded here).
                let dot = |s: &[u8]| {
                    let head = s.split(|b| *b == b';').next().unwrap_or_default();
                    head == b"." || head == b".."
                };
                let is_dot = if catch_all {
                    raw.split(|b| *b == b'/').any(dot)
                } else {
                    dot(&raw)
                };
                if is_dot {
                    return Err(TemplateError::DotSegment(name.to_string()));
                }
                out.push_str(&crate::path::percent_encode(&raw, catch_all && !in_query));
            }
            None => out.push_str(&from[..=close]),
        }
        rest = &from[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Append the client's query to a filled template that has no query of its own. A
/// template with a query gets none of the client's: filtering parameters by name
/// cannot work, because upstream frameworks read `User`, `user[]`, `user%00` or
/// `user+` as `user` in their own ways, and each could override what the template sets.
pub fn append_query(filled: String, client_query: Option<&str>) -> String {
    let Some(q) = client_query.filter(|q| !q.is_empty()) else {
        return filled;
    };
    if filled.contains('?') {
        return filled;
    }
    format!("{filled}?{q}")
}

impl Router {
    pub fn new(routes: &[RouteConfig]) -> Router {
        let mut routes: Vec<Arc<Route>> = routes.iter().map(|r| Arc::new(Route::new(r))).collect();
        // Stable sort keeps file order among equally specific routes.
        routes.sort_by_key(|r| std::cmp::Reverse(r.specificity()));
        Router { routes }
    }

    /// Routes in the order `lookup` tries them (most specific first), for `--check`.
    pub fn match_order(&self) -> impl Iterator<Item = &RouteConfig> {
        self.routes.iter().map(|r| &r.cfg)
    }

    pub fn lookup(
        &self,
        host: Option<&str>,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> RouteMatch {
        let mut allowed: Vec<Method> = Vec::new();
        for route in &self.routes {
            if !route.host_matches(host) || !route.headers_match(headers) {
                continue;
            }
            let Some(params) = route.path_matches(path) else {
                continue;
            };
            if route.methods.is_empty() || route.methods.contains(method) {
                return RouteMatch::Found {
                    route: route.clone(),
                    params,
                };
            }
            allowed.extend(route.methods.iter().cloned());
        }
        if allowed.is_empty() {
            RouteMatch::NotFound
        } else {
            allowed.dedup();
            RouteMatch::MethodNotAllowed { allowed }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use crate::config::Config;

    fn router(toml: &str) -> Router {
        let cfg = Config::parse(toml).unwrap_or_else(|e| panic!("test config invalid: {e}"));
        Router::new(&cfg.routes)
    }

    /// The stage alone, given only a router: the route reaches `next` in the
    /// request's type, and misses are answered here.
    #[tokio::test]
    async fn routing_stage_alone_hands_the_route_to_next() {
        use crate::stage::testing::stub;
        let r = router(
            r#"
            [pools.p]
            backends = [{ address = "127.0.0.1:1" }]
            [[routes]]
            name = "template"
            path = "/api/users/{id}"
            path_match = "template"
            methods = ["GET"]
            pool = "p"
        "#,
        );
        let next = stub(|r: Routed<()>| {
            let mut resp = Response::new(crate::http_util::full(r.route.route.cfg.name.clone()));
            resp.headers_mut().insert("x-param", r.route.params["id"].parse().expect("hv"));
            resp
        });
        let req = testing::req(Request::get("/api/users/7"));
        let resp = routing_stage(&r, req, next.clone()).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-param"], "7");
        let matched = resp.extensions().get::<MatchedRoute>().expect("matched route for the log");
        assert_eq!(matched.0.cfg.name, "template");
        let req = testing::req(Request::post("/api/users/7"));
        let resp = routing_stage(&r, req, next.clone()).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "GET");
        let req = testing::req(Request::get("/elsewhere"));
        let resp = routing_stage(&r, req, next).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    /// Through the stage, from the Host header or HTTP/2's `:authority`: the dotted
    /// name takes the host route, and what goes upstream (`RouteCtx::host`) is the
    /// client's Host as sent, dot included.
    #[tokio::test]
    async fn routing_stage_routes_a_dotted_host_and_keeps_it_as_sent() {
        use crate::stage::testing::stub;
        let r = router(
            r#"
            [pools.p]
            backends = [{ address = "127.0.0.1:1" }]
            [[routes]]
            name = "open"
            path = "/h"
            pool = "p"
            [[routes]]
            name = "secure"
            host = "api.example.com"
            path = "/h"
            pool = "p"
        "#,
        );
        let next = stub(|r: Routed<()>| {
            let mut resp = Response::new(crate::http_util::full(r.route.route.cfg.name.clone()));
            if let Some(h) = &r.route.host {
                resp.headers_mut().insert("x-host", h.clone());
            }
            resp
        });
        for req in [
            Request::get("/h").header(header::HOST, "api.example.com."),
            Request::get("http://api.example.com.:8443/h").version(http::Version::HTTP_2),
        ] {
            let resp = routing_stage(&r, testing::req(req), next.clone()).await;
            let matched = resp.extensions().get::<MatchedRoute>().expect("matched");
            assert_eq!(matched.0.cfg.name, "secure");
            let host = resp.headers()["x-host"].to_str().expect("ascii");
            assert!(host.starts_with("api.example.com."), "forwarded as sent: {host}");
        }
    }

    fn name(m: RouteMatch) -> String {
        match m {
            RouteMatch::Found { route, .. } => route.cfg.name.clone(),
            RouteMatch::MethodNotAllowed { .. } => "405".into(),
            RouteMatch::NotFound => "404".into(),
        }
    }

    const CFG: &str = r#"
        [pools.p]
        backends = [{ address = "127.0.0.1:1" }]
        [[routes]]
        name = "prefix"
        path = "/api"
        pool = "p"
        [[routes]]
        name = "template"
        path = "/api/users/{id}"
        path_match = "template"
        methods = ["GET"]
        pool = "p"
        [[routes]]
        name = "exact"
        path = "/api/users/me"
        path_match = "exact"
        pool = "p"
        [[routes]]
        name = "v2"
        path = "/api/users/{id}"
        path_match = "template"
        headers = { "x-version" = "2" }
        pool = "p"
        [[routes]]
        name = "host"
        host = "admin.example.com"
        path = "/api"
        pool = "p"
    "#;

    #[test]
    fn most_specific_wins() {
        let r = router(CFG);
        let h = HeaderMap::new();
        assert_eq!(
            name(r.lookup(None, &Method::GET, "/api/users/me", &h)),
            "exact"
        );
        assert_eq!(
            name(r.lookup(None, &Method::GET, "/api/users/7", &h)),
            "template"
        );
        assert_eq!(
            name(r.lookup(None, &Method::GET, "/api/other", &h)),
            "prefix"
        );
        assert_eq!(
            name(r.lookup(
                Some("admin.example.com:8080"),
                &Method::GET,
                "/api/users/7",
                &h
            )),
            "host"
        );
        assert_eq!(name(r.lookup(None, &Method::GET, "/apix", &h)), "404");
        let mut v2 = HeaderMap::new();
        v2.insert("x-version", HeaderValue::from_static("2"));
        assert_eq!(
            name(r.lookup(None, &Method::GET, "/api/users/7", &v2)),
            "v2"
        );
    }

    /// A fully qualified name (one trailing dot) is the same host: it must not slip
    /// past a host route (with its auth) to a catch-all route on the same path.
    #[test]
    fn a_trailing_dot_host_matches_its_host_routes() {
        let r = router(
            r#"
            [pools.p]
            backends = [{ address = "127.0.0.1:1" }]
            [[routes]]
            name = "open"
            path = "/h"
            pool = "p"
            [[routes]]
            name = "exact"
            host = "api.example.com"
            path = "/h"
            pool = "p"
            [[routes]]
            name = "wild"
            host = "*.example.org"
            path = "/h"
            pool = "p"
            [[routes]]
            name = "dotted"
            host = "fq.example.net."
            path = "/h"
            pool = "p"
        "#,
        );
        let h = HeaderMap::new();
        let at = |host: &str| name(r.lookup(Some(host), &Method::GET, "/h", &h));
        for (host, want) in [
            ("api.example.com", "exact"),
            ("api.example.com.", "exact"),
            ("API.Example.COM.", "exact"),
            ("api.example.com.:8080", "exact"),
            ("a.example.org.", "wild"),
            ("a.b.example.org.:443", "wild"),
            ("fq.example.net", "dotted"),
            ("fq.example.net.", "dotted"),
            // Only one dot is the root label; anything else is another name.
            ("api.example.com..", "open"),
            ("example.org.", "open"),
            (".example.org", "open"),
        ] {
            assert_eq!(at(host), want, "{host}");
        }
    }

    /// Hostile test r3b, 6: an IPv6 route host matches its address however the
    /// request spells it (`[0::1]`, `[::1]:8080`), and only that address.
    #[test]
    fn an_ipv6_route_host_matches_its_address() {
        let r = router(
            r#"
            [pools.p]
            backends = [{ address = "127.0.0.1:1" }]
            [[routes]]
            name = "open"
            path = "/h"
            pool = "p"
            [[routes]]
            name = "v6"
            host = "[0::1]"
            path = "/h"
            pool = "p"
            [[routes]]
            name = "v4"
            host = "127.0.0.1"
            path = "/h"
            pool = "p"
        "#,
        );
        let h = HeaderMap::new();
        let at = |host: &str| name(r.lookup(Some(host), &Method::GET, "/h", &h));
        for (host, want) in [
            ("[::1]", "v6"),
            ("[0::1]", "v6"),
            ("[0:0:0:0:0:0:0:1]:8080", "v6"),
            ("[::2]", "open"),
            ("[::ffff:127.0.0.1]", "open"),
            ("127.0.0.1", "v4"),
            ("127.0.0.1.:80", "v4"),
        ] {
            assert_eq!(at(host), want, "{host}");
        }
    }

    #[test]
    fn template_params_and_rewrite() {
        let r = router(CFG);
        let RouteMatch::Found { route, params } =
            r.lookup(None, &Method::GET, "/api/users/42", &HeaderMap::new())
        else {
            panic!("expected a match");
        };
        assert_eq!(params.get("id").map(String::as_str), Some("42"));
        assert_eq!(
            fill_template("/users/{id}/profile", &params).as_deref(),
            Ok("/users/42/profile")
        );
        assert_eq!(
            route.upstream_path("/api/users/42", &params).as_deref(),
            Ok("/api/users/42")
        );
    }

    #[test]
    fn template_values_are_encoded_for_where_they_land() {
        let p = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect()
        };
        let id = p(&[("id", "7&admin=true")]);
        assert_eq!(
            fill_template("/orders/{id}?user={id}", &id).as_deref(),
            Ok("/orders/7%26admin%3Dtrue?user=7%26admin%3Dtrue")
        );
        let rest = p(&[("rest", "a/b%20c/d?e")]);
        assert_eq!(
            fill_template("/s/{*rest}?p={rest}", &rest).as_deref(),
            Ok("/s/a/b%20c/d%3Fe?p=a%2Fb%20c%2Fd%3Fe")
        );
        for (tpl, v) in [
            ("/u/{id}", ".."),
            ("/u/{id}", "%2e"),
            ("/s/{*id}", "a/../b"),
        ] {
            assert_eq!(
                fill_template(tpl, &p(&[("id", v)])),
                Err(TemplateError::DotSegment("id".into())),
                "{tpl} {v}"
            );
        }
        assert_eq!(
            fill_template("/u/{other}", &id).as_deref(),
            Ok("/u/{other}")
        );
        for q in [
            "x=1&user=8&us%65r=9",
            "User=9",
            "user[]=9",
            "user%00=9",
            "user+=9",
        ] {
            assert_eq!(
                append_query("/o?user=7".into(), Some(q)),
                "/o?user=7",
                "{q}"
            );
        }
        // A route's catch-all keeps `/` when the rewrite names it `{rest}`; `..;` and
        // `.;x` are dot-segments too.
        let files = p(&[("rest", "a/b c")]);
        assert_eq!(
            fill_template_with("/files/{rest}", &files, &["rest"]).as_deref(),
            Ok("/files/a/b%20c")
        );
        for v in ["a/..%3b/b", "a/.;x/b", "..;"] {
            assert_eq!(
                fill_template_with("/files/{rest}", &p(&[("rest", v)]), &["rest"]),
                Err(TemplateError::DotSegment("rest".into())),
                "{v}"
            );
        }
        assert_eq!(append_query("/o".into(), Some("x=1")), "/o?x=1");
        assert_eq!(append_query("/o?a=1".into(), None), "/o?a=1");
    }

    proptest::proptest! {
        #[test]
        fn lookup_never_panics(path in "\\PC{0,64}", host in "\\PC{0,32}") {
            let r = router(CFG);
            let _ = r.lookup(Some(&host), &Method::GET, &path, &HeaderMap::new());
        }
    }
}

#[cfg(test)]
pub mod testing {
    //! A routed request for testing the stages below routing alone.
    use super::*;
    use crate::config::Config;
    use crate::ctx::{ConnInfo, ReqCtx};
    use std::sync::Arc;

    /// `builder`'s request with a context, as routing receives it.
    pub fn req(builder: http::request::Builder) -> Req<()> {
        crate::ctx::testing::req(builder.body(()).unwrap_or_else(|e| panic!("request: {e}")))
    }

    /// `builder`'s request matched against `toml`'s routes, with a connection in its
    /// extensions, as the stages below routing receive it. No gateway is built.
    pub fn routed(toml: &str, builder: http::request::Builder) -> (Config, Routed<()>) {
        let cfg = Config::parse(toml).unwrap_or_else(|e| panic!("test config: {e}"));
        let router = Router::new(&cfg.routes);
        let req = builder.body(()).unwrap_or_else(|e| panic!("request: {e}"));
        let RouteMatch::Found { route, params } =
            router.lookup(None, req.method(), req.uri().path(), req.headers())
        else {
            panic!("test request must match a route");
        };
        let conn = ConnInfo::new("127.0.0.1:5555".parse().expect("addr"), false, false);
        let req = Req::new(req, ReqCtx::new(Arc::new(conn), 0));
        let route = Box::new(RouteCtx {
            route,
            params,
            host: None,
        });
        (cfg, Routed { req, route })
    }
}
