//! The gateway's pure request handling on arbitrary input: the request-smuggling guard over raw
//! HTTP/1 bytes (in any chunking), route lookup on arbitrary host/method/path/headers, upstream
//! path rewriting, header transforms, hop-by-hop stripping, request ids, trace context, JSON field
//! stripping, and backend selection. Nothing may panic, and each has an invariant checked below.
#![no_main]

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{
        Arc, OnceLock,
    },
    task::{Context, Poll, Waker},
};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use l7_sidecar::{
    balance::{BackendRegistry, HashInput, Pool},
    client_headers::clean_client_headers,
    config::Config,
    ctx::{owned, ConnInfo, Req, ReqCtx},
    guard::{SmuggleGuard, Smuggled},
    observe::propagate_traceparent,
    proxy::{is_upgrade, strip_hop_by_hop},
    routing::{fill_template, RouteMatch, Router},
    transform::{apply_request, apply_response, cookie, ensure_request_id, is_json, set_forwarded_headers, strip_json_fields, valid_request_id},
};
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};

/// Routes exercising every matcher: the shipped example plus templates, hosts, headers, methods.
const EXTRA: &str = r#"
[pools.p]
backends = [{ address = "127.0.0.1:1" }, { address = "127.0.0.2:1", weight = 3 }]
[pools.h]
algorithm = "consistent-hash"
hash_on = "header:x-user"
backends = [{ address = "127.0.0.1:2" }, { address = "127.0.0.2:2" }]
[pools.c]
algorithm = "consistent-hash"
hash_on = "cookie:session"
backends = [{ address = "127.0.0.1:3" }, { address = "[::1]:3" }]
[transforms.t]
request_headers_add = { "x-gw" = "1" }
request_headers_remove = ["x-internal", "cookie"]
response_headers_add = { "x-served-by" = "gw" }
response_headers_remove = ["server"]
strip_json_fields = ["password", "ssn"]
[[routes]]
name = "prefix"
path = "/api"
pool = "p"
strip_prefix = "/api"
transform = "t"
[[routes]]
name = "template"
path = "/api/users/{id}"
path_match = "template"
methods = ["GET", "PUT"]
pool = "h"
rewrite = "/users/{id}/profile"
[[routes]]
name = "catch-all"
path = "/files/{*rest}"
path_match = "template"
pool = "c"
rewrite = "/static/{rest}"
[[routes]]
name = "exact"
path = "/api/users/me"
path_match = "exact"
methods = ["GET"]
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
[[routes]]
name = "wildcard"
host = "*.example.org"
path = "/"
pool = "c"
"#;

struct Fixture {
    configs: Vec<Config>,
    routers: Vec<Router>,
    pools: Vec<Pool>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // The example reads its JWT secret from this variable.
        std::env::set_var("GATEWAY_JWT_SECRET", "fuzz-secret");
        let example = include_str!("../../l7-sidecar/examples/gateway.toml");
        let configs: Vec<Config> = [example, EXTRA]
            .iter()
            .map(|t| Config::parse(t).unwrap_or_else(|e| panic!("fixture config invalid: {e}")))
            .collect();
        let routers = configs.iter().map(|c| Router::new(&c.routes)).collect();
        let registry = BackendRegistry::default();
        let pools = configs.iter().flat_map(|c| c.pools.iter().map(|(n, p)| Pool::new(n, p, &registry))).collect();
        Fixture { configs, routers, pools }
    })
}

#[derive(Arbitrary, Debug)]
struct Input {
    config: bool,
    host: Option<String>,
    method: Vec<u8>,
    path: String,
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    client: ([u8; 16], bool),
    tls: bool,
    json: Vec<u8>,
    fields: Vec<String>,
    cookie_name: String,
    /// Raw bytes of an HTTP/1 connection, and where reads split them.
    raw: Vec<u8>,
    splits: Vec<u8>,
}

/// Feeds `raw` through a SmuggleGuard in reads of the given sizes; returns whether it flagged.
fn guard_flags(raw: &[u8], chunks: &mut dyn Iterator<Item = usize>) -> bool {
    let flag = Arc::new(Smuggled::default());
    let mut guard = SmuggleGuard::new(raw, flag.clone());
    let mut cx = Context::from_waker(Waker::noop());
    let mut storage = vec![0u8; raw.len().max(1)];
    loop {
        let n = chunks.next().unwrap_or(raw.len()).clamp(1, storage.len());
        let mut buf = ReadBuf::new(&mut storage[..n]);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut buf) {
            Poll::Ready(Ok(())) if buf.filled().is_empty() => break,
            Poll::Ready(Ok(())) => {}
            other => panic!("reading a slice gave {other:?}"),
        }
    }
    flag.any()
}

const HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"];

fuzz_target!(|input: Input| {
    let f = fixture();

    // --- Smuggling guard: the verdict does not depend on how the bytes arrive. ---
    let whole = guard_flags(&input.raw, &mut std::iter::empty());
    if input.raw.len() < 60 * 1024 && !input.splits.is_empty() {
        let mut sizes = input.splits.iter().map(|&s| s as usize + 1).cycle();
        assert_eq!(guard_flags(&input.raw, &mut sizes), whole, "the guard's verdict depends on read boundaries: {:?}", input.splits);
    }

    // --- Routing. ---
    let which = usize::from(input.config);
    let method = Method::from_bytes(&input.method).unwrap_or(Method::GET);
    let mut headers = HeaderMap::new();
    for (k, v) in input.headers.iter().take(32) {
        if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k), HeaderValue::from_bytes(v)) {
            headers.append(k, v);
        }
    }
    match f.routers[which].lookup(input.host.as_deref(), &method, &input.path, &headers) {
        RouteMatch::Found { route, params } => {
            let m = &route.cfg.methods;
            assert!(m.is_empty() || m.iter().any(|x| x == method.as_str()), "route {} does not allow {method}", route.cfg.name);
            let upstream = route.upstream_path(&input.path, &params);
            if route.cfg.rewrite.is_some() || route.cfg.strip_prefix.is_some() {
                let _ = upstream;
            } else {
                assert_eq!(upstream.as_deref(), Ok(input.path.as_str()));
            }
            for part in &route.cfg.aggregate {
                let _ = fill_template(&part.path, &params);
            }
            if let Some(t) = route.cfg.transform.as_ref().and_then(|t| f.configs[which].transforms.get(t)) {
                let mut h = headers.clone();
                apply_request(t, &mut h);
                for name in &t.request_headers_remove {
                    if !t.request_headers_add.contains_key(name) {
                        assert!(h.get(name.as_str()).is_none(), "{name} survived its removal");
                    }
                }
                apply_response(t, &mut h);
            }
        }
        RouteMatch::MethodNotAllowed { allowed } => {
            assert!(!allowed.is_empty() && !allowed.contains(&method), "405 for {method} lists {allowed:?}");
        }
        RouteMatch::NotFound => {}
    }

    // --- Header handling on the forwarded request. ---
    let client: IpAddr = if input.client.1 { input.client.0.into() } else { [input.client.0[0], input.client.0[1], input.client.0[2], input.client.0[3]].into() };
    // The client-header pass first, as in the pipeline: its notes on which gateway-owned
    // names the client sent decide which lookups the later steps make.
    let conn = Arc::new(ConnInfo::new(SocketAddr::new(client, 1), input.tls, false));
    let mut request = http::Request::new(());
    *request.headers_mut() = headers.clone();
    let mut req = Req::new(request, ReqCtx::new(conn, 0));
    clean_client_headers(&BTreeMap::new(), &mut req);
    let sent = |bit| req.ctx().client_sent(bit);
    let mut h = req.headers().clone();
    for name in ["x-user-id", "x-user-role", "x-request-id", "x-forwarded-for", "traceparent"] {
        if h.contains_key(name) {
            let bit = match name {
                "x-user-id" => owned::USER_ID,
                "x-user-role" => owned::USER_ROLE,
                "x-request-id" => owned::REQUEST_ID,
                "x-forwarded-for" => owned::FORWARDED_FOR,
                _ => owned::TRACEPARENT,
            };
            assert!(sent(bit), "{name} is left but the client-header pass did not note it");
        }
    }
    let _ = is_upgrade(&h);
    let _ = is_json(&h);
    let _ = cookie(&h, &input.cookie_name);
    let (id, id_header) = ensure_request_id(&mut h, sent(owned::REQUEST_ID));
    assert!(valid_request_id(&id), "request id {id:?}");
    assert_eq!(id_header.to_str().ok(), Some(&*id));
    assert_eq!(h.get("x-request-id").and_then(|v| v.to_str().ok()), Some(&*id));
    // The upstream gets exactly the one id the gateway logs and returns.
    assert_eq!(h.get_all("x-request-id").iter().count(), 1, "several x-request-id values go upstream");
    let client_header = HeaderValue::from_str(&client.to_string()).expect("an IP address is a header value");
    let host = input.host.as_deref().and_then(|v| HeaderValue::from_str(v).ok());
    set_forwarded_headers(&mut h, &client_header, if input.tls { "https" } else { "http" }, host.as_ref(), None, req.ctx().client_owned);
    let xff = h.get("x-forwarded-for").and_then(|v| v.to_str().ok()).expect("x-forwarded-for is set");
    assert!(xff.ends_with(&client.to_string()), "x-forwarded-for {xff:?} does not end with {client}");
    assert!(h.get("forwarded").is_none(), "the client's Forwarded goes upstream");
    assert_eq!(h.get_all("x-real-ip").iter().collect::<Vec<_>>(), [&client_header], "x-real-ip is the peer alone");
    let trace = propagate_traceparent(&mut h, sent(owned::TRACEPARENT)).to_string();
    assert!(trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit()), "trace id {trace:?}");
    strip_hop_by_hop(&mut h);
    for name in HOP_BY_HOP {
        assert!(h.get(*name).is_none(), "hop-by-hop header {name} survived");
    }

    // --- JSON field stripping. ---
    let fields: Vec<String> = input.fields.into_iter().take(8).collect();
    if let Some(out) = strip_json_fields(&input.json, &fields) {
        let v: serde_json::Value = serde_json::from_slice(&out).expect("stripped body is JSON");
        fn has_field(v: &serde_json::Value, fields: &[String]) -> bool {
            match v {
                serde_json::Value::Object(m) => m.iter().any(|(k, c)| fields.contains(k) || has_field(c, fields)),
                serde_json::Value::Array(a) => a.iter().any(|c| has_field(c, fields)),
                _ => false,
            }
        }
        assert!(!has_field(&v, &fields), "a stripped field is still in {v}");
    }

    // --- Backend selection. ---
    for pool in &f.pools {
        let hash = HashInput { client_ip: client, headers: &headers };
        let a = pool.pick(&hash, &[]).expect("fixture backends are all available");
        assert!(a < pool.backends.len());
        if let Some(b) = pool.pick(&hash, &[a]) {
            assert!(b != a && b < pool.backends.len());
        }
    }
});
