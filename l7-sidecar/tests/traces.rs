//! The admin listener: sampled request traces with each stage's verdict, the route lookup
//! answered by the gateway's own router, and what the listener refuses.
mod common;
use common::*;
use l7_sidecar::admin::RouteReply;
use l7_sidecar::trace::{StageKind, Trace, TracesReply};
use l7_sidecar::RunningGateway;

fn admin_base(gw: &RunningGateway) -> String {
    format!("http://{}", gw.addr("admin").expect("the [admin] listener is bound"))
}

fn cfg(up: &std::sync::Arc<Upstream>, admin: &str) -> String {
    format!(
        r#"{}{}{}
        [admin]
        listen = "127.0.0.1:0"
        {admin}
        [[auth.api_keys]]
        name = "partner"
        sha256 = "{}"
        user_id = "partner-1"
        [rate_limits.one]
        algorithm = "fixed-window"
        limit = 1
        window = "1m"
        [transforms.tag]
        response_headers_add = {{ "x-tagged" = "1" }}
        [[routes]]
        name = "open"
        path = "/open"
        pool = "p"
        transform = "tag"
        [[routes]]
        name = "key"
        path = "/key"
        pool = "p"
        auth = "api-key"
        [[routes]]
        name = "limited"
        path = "/limited"
        pool = "p"
        rate_limit = "one"
        [[routes]]
        name = "users-v2"
        path = "/users"
        headers = {{ "X-Version" = "2" }}
        methods = ["GET"]
        pool = "v2"
        "#,
        listener("public"),
        pool("p", &[up], ""),
        pool("v2", &[up], ""),
        l7_sidecar::auth::hash_api_key("key-secret-789")
    )
}

async fn traces(c: &Client, gw: &RunningGateway, query: &str) -> (TracesReply, String) {
    let r = get(c, &format!("{}/admin/traces{query}", admin_base(gw)), &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let text = String::from_utf8(r.body.to_vec()).expect("utf-8");
    let reply = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (reply, text)
}

/// `(stage, verdict, reason)` of each stage, in order.
fn stages(t: &Trace) -> Vec<(StageKind, &str, &str)> {
    t.stages
        .iter()
        .map(|s| (s.stage, s.verdict.as_str(), s.reason.as_str()))
        .collect()
}

fn by_path<'a>(traces: &'a [Trace], path: &str) -> Vec<&'a Trace> {
    traces.iter().filter(|t| t.path == path).collect()
}

#[tokio::test]
async fn traces_name_each_stage_for_allowed_denied_limited_and_unrouted_requests() {
    let up = upstream("a").await;
    let gw = start_gateway(&cfg(&up, "trace_sample_rate = 1.0")).await;
    let c = client();
    let b = base(&gw);
    // Secrets in every place a request can carry them: none may reach a trace.
    let open = send(
        &c,
        "POST",
        &format!("{b}/open?token=query-secret-123"),
        &[
            ("authorization", "Bearer tok-secret-456"),
            ("x-api-key", "key-secret-789"),
            ("cookie", "session=cookie-secret-321"),
        ],
        "body-secret-000",
    )
    .await;
    assert_eq!(open.status, 200);
    assert_eq!(get(&c, &format!("{b}/key"), &[]).await.status, 401);
    let keyed = get(&c, &format!("{b}/key"), &[("x-api-key", "key-secret-789")]).await;
    assert_eq!(keyed.status, 200);
    assert_eq!(get(&c, &format!("{b}/limited"), &[]).await.status, 200);
    assert_eq!(get(&c, &format!("{b}/limited"), &[]).await.status, 429);
    assert_eq!(get(&c, &format!("{b}/nowhere"), &[]).await.status, 404);

    let (reply, text) = traces(&c, &gw, "").await;
    for secret in [
        "query-secret-123",
        "tok-secret-456",
        "key-secret-789",
        "cookie-secret-321",
        "body-secret-000",
        "token=",
    ] {
        assert!(!text.contains(secret), "{secret} leaked into the traces: {text}");
    }
    assert_eq!(reply.traces.len(), 6, "{text}");
    assert_eq!((reply.sampling, reply.capacity, reply.next_seq), (1.0, 256, 6));
    let seqs: Vec<u64> = reply.traces.iter().map(|t| t.seq).collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4, 5], "oldest first");
    let log = (StageKind::Log, "pass", "access log off");

    let t = by_path(&reply.traces, "/open")[0];
    assert_eq!((t.method.as_str(), t.status), ("POST", 200));
    assert_eq!(t.route.as_deref(), Some("open"));
    assert_eq!(t.pool.as_deref(), Some("p"));
    assert_eq!(t.upstream.as_deref(), Some(up.addr.to_string().as_str()));
    let upstream = format!("200 from {}", up.addr);
    assert_eq!(
        stages(t),
        [
            log,
            (StageKind::Route, "match", "open"),
            (StageKind::Auth, "skip", "route needs no auth"),
            (StageKind::RateLimit, "skip", "route has no rate limit"),
            (StageKind::Transform, "pass", "tag"),
            (StageKind::Upstream, "response", upstream.as_str()),
        ]
    );
    let own: f64 = t.stages.iter().map(|s| s.us).sum();
    assert!(t.stages.iter().all(|s| s.us >= 0.0), "{t:?}");
    assert!(t.stages[5].us > 10.0, "the upstream's round trip takes more than 10 µs: {t:?}");
    assert!(own <= t.total_us + 1.0, "stages' own times add up to at most the total: {t:?}");

    let keys = by_path(&reply.traces, "/key");
    assert_eq!(
        stages(keys[0]),
        [log, (StageKind::Route, "match", "key"), (StageKind::Auth, "deny", "unauthorized")]
    );
    assert_eq!((keys[0].status, keys[0].upstream.as_deref()), (401, None));
    assert_eq!(stages(keys[1])[2], (StageKind::Auth, "pass", "api-key"));
    assert_eq!(keys[1].status, 200);

    let limited = by_path(&reply.traces, "/limited");
    assert_eq!(stages(limited[0])[3], (StageKind::RateLimit, "pass", "one"));
    assert_eq!(
        stages(limited[1])[3..],
        [(StageKind::RateLimit, "limited", "rate_limited")]
    );
    assert_eq!(limited[1].status, 429);

    let nowhere = by_path(&reply.traces, "/nowhere")[0];
    assert_eq!(
        stages(nowhere),
        [log, (StageKind::Route, "no_route", "not_found")]
    );
    assert_eq!((nowhere.status, nowhere.route.as_deref()), (404, None));

    // Polling from next_seq returns only what is new; admin requests are never traced.
    let (again, _) = traces(&c, &gw, "?since=6").await;
    assert!(again.traces.is_empty(), "{again:?}");
    assert_eq!(again.next_seq, 6);
}

#[tokio::test]
async fn sampling_zero_records_nothing_and_the_buffer_is_bounded() {
    let up = upstream("a").await;
    let off = start_gateway(&cfg(&up, "trace_sample_rate = 0.0")).await;
    let c = client();
    for _ in 0..20 {
        assert_eq!(get(&c, &format!("{}/open", base(&off)), &[]).await.status, 200);
    }
    let (reply, _) = traces(&c, &off, "").await;
    assert!(reply.traces.is_empty() && reply.next_seq == 0, "{reply:?}");

    let small = start_gateway(&cfg(&up, "trace_sample_rate = 1.0\ntrace_buffer = 3")).await;
    for _ in 0..10 {
        get(&c, &format!("{}/open", base(&small)), &[]).await;
    }
    let (reply, _) = traces(&c, &small, "").await;
    assert_eq!(reply.traces.len(), 3, "bounded by trace_buffer");
    assert_eq!((reply.next_seq, reply.dropped), (10, 7));
    assert_eq!(reply.traces[0].seq, 7, "the newest are kept");
    let (two, _) = traces(&c, &small, "?since=7&limit=2").await;
    assert_eq!(two.traces.iter().map(|t| t.seq).collect::<Vec<_>>(), [8, 9]);
}

#[tokio::test]
async fn the_admin_listener_answers_get_only_and_names_bad_queries() {
    let up = upstream("a").await;
    let gw = start_gateway(&cfg(&up, "")).await;
    let c = client();
    let a = admin_base(&gw);
    let post = send(&c, "POST", &format!("{a}/admin/traces"), &[], "x").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow").as_deref(), Some("GET"));
    // The gateway's routes are not served here.
    assert_eq!(get(&c, &format!("{a}/open"), &[]).await.status, 404);
    assert_eq!(up.hits(), 0, "nothing reached the upstream through the admin listener");
    for (query, named) in [
        ("/admin/traces?since=x", "since"),
        ("/admin/traces?limit=0", "limit"),
        ("/admin/traces?sinse=1", "sinse"),
        ("/admin/route", "path"),
        ("/admin/route?path=/a&path=/b", "path"),
        ("/admin/route?path=users", "path"),
        ("/admin/route?path=/a&header=novalue", "header"),
        ("/admin/route?path=/a&method=G%20T", "method"),
        ("/admin/route?path=/a%252Fb", "path"),
    ] {
        let r = get(&c, &format!("{a}{query}"), &[]).await;
        assert_eq!(r.status, 400, "{query}");
        let why = r.json()["message"].as_str().unwrap_or_default().to_string();
        assert!(why.contains(named), "{query}: {why}");
    }
    // The default rate: 1 %.
    let (reply, _) = traces(&c, &gw, "").await;
    assert_eq!(reply.sampling, 0.01);
    // Metrics are served here too.
    let m = get(&c, &format!("{a}/metrics"), &[]).await;
    assert_eq!(m.status, 200);
}

#[tokio::test]
async fn the_route_lookup_is_the_gateways_router() {
    let up = upstream("a").await;
    let text = cfg(&up, "");
    let gw = start_gateway(&text).await;
    let c = client();
    let a = admin_base(&gw);
    let route = |q: &'static str| {
        let (c, a) = (c.clone(), a.clone());
        async move {
            let r = get(&c, &format!("{a}/admin/route?{q}"), &[]).await;
            assert_eq!(r.status, 200, "{q}: {:?}", r.body);
            serde_json::from_slice::<RouteReply>(&r.body).expect("RouteReply")
        }
    };
    let v2 = route("path=%2Fusers%2F7&header=X-Version%3A2").await;
    assert_eq!((v2.outcome.as_str(), v2.route.as_deref(), v2.pool.as_deref()), ("found", Some("users-v2"), Some("v2")));
    assert_eq!(v2.upstreams.len(), 1);
    assert_eq!(v2.upstreams[0].address, up.addr.to_string());
    assert_eq!(v2.version, 1);
    let without = route("path=/users/7").await;
    assert_eq!(without.outcome, "not_found", "the v2 route needs its header");
    let post = route("method=POST&path=/users&header=x-version:2").await;
    assert_eq!((post.outcome.as_str(), post.allowed.as_slice()), ("method_not_allowed", ["GET".to_string()].as_slice()));
    // Dot segments are normalised as for a real request.
    let dotted = route("path=/x/../open").await;
    assert_eq!(dotted.route.as_deref(), Some("open"));
    // A pasted request target: its query and fragment are not part of the routed path.
    let pasted = route("path=%2Fopen%3Fa%3D1%23top").await;
    assert_eq!((pasted.outcome.as_str(), pasted.route.as_deref()), ("found", Some("open")));
    // A reload is a new generation.
    let cfg = l7_sidecar::Config::parse(&text).expect("config");
    gw.gateway.reload(cfg).await.expect("reload");
    assert_eq!(route("path=/open").await.version, 2);
    // A reload that removes [admin]: the bound listener stops showing routes and traces.
    let without_admin = text.replace("[admin]\n        listen = \"127.0.0.1:0\"", "");
    assert_ne!(without_admin, text, "the test config has an [admin] section to remove");
    let cfg = l7_sidecar::Config::parse(&without_admin).expect("config");
    gw.gateway.reload(cfg).await.expect("reload");
    for endpoint in ["/admin/route?path=/open", "/admin/traces"] {
        let r = get(&c, &format!("{a}{endpoint}"), &[]).await;
        assert_eq!(r.status, 404, "{endpoint}: {:?}", String::from_utf8_lossy(&r.body));
        assert!(String::from_utf8_lossy(&r.body).contains("admin_disabled"));
    }
    // Hostile G2: [admin] named again, on another address: the bound listener stays closed.
    let elsewhere = text.replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"");
    gw.gateway.reload(l7_sidecar::Config::parse(&elsewhere).expect("config")).await.expect("reload");
    let r = get(&c, &format!("{a}/admin/route?path=/open"), &[]).await;
    assert_eq!(r.status, 404, "{:?}", String::from_utf8_lossy(&r.body));
}
