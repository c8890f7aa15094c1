//! Rate limiting, transformation, aggregation and observability over real HTTP.
mod common;
use common::*;

fn rl_cfg(up: &std::sync::Arc<Upstream>) -> String {
    format!(
        r#"{}{}
        [auth.jwt]
        [[auth.jwt.keys]]
        algorithm = "HS256"
        secret = "s"
        [rate_limits.fixed]
        algorithm = "fixed-window"
        limit = 3
        window_ms = 60000
        [rate_limits.sliding]
        algorithm = "sliding-window"
        limit = 2
        window_ms = 60000
        [rate_limits.bucket]
        algorithm = "token-bucket"
        key = "user-id"
        limit = 1
        window_ms = 60000
        burst = 4
        [rate_limits.per-key]
        algorithm = "fixed-window"
        key = "api-key"
        limit = 1
        window_ms = 60000
        [[auth.api_keys]]
        name = "k1"
        sha256 = "{k1}"
        user_id = "partner-1"
        [[auth.api_keys]]
        name = "k2"
        sha256 = "{k2}"
        user_id = "partner-2"
        [[routes]]
        name = "partner"
        path = "/partner"
        pool = "p"
        auth = "api-key"
        rate_limit = "per-key"
        [[routes]]
        name = "fixed"
        path = "/fixed"
        pool = "p"
        rate_limit = "fixed"
        [[routes]]
        name = "sliding"
        path = "/sliding"
        pool = "p"
        rate_limit = "sliding"
        [[routes]]
        name = "bucket"
        path = "/bucket"
        pool = "p"
        auth = "jwt"
        rate_limit = "bucket"
        "#,
        listener("public"),
        pool("p", &[up], ""),
        k1 = l7_sidecar::auth::hash_api_key("key-one"),
        k2 = l7_sidecar::auth::hash_api_key("key-two"),
    )
}

#[tokio::test]
async fn rate_limits_reject_with_429_and_headers() {
    let up = upstream("p").await;
    let gw = start_gateway(&rl_cfg(&up)).await;
    let c = client();
    let b = base(&gw);
    for i in 0..3 {
        let r = get(&c, &format!("{b}/fixed"), &[]).await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.header("ratelimit-limit").as_deref(), Some("3"));
        assert_eq!(r.header("ratelimit-remaining"), Some((2 - i).to_string()));
        assert!(r.header("ratelimit-reset").is_some());
    }
    let r = get(&c, &format!("{b}/fixed"), &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"], "rate_limited");
    assert_eq!(r.header("ratelimit-remaining").as_deref(), Some("0"));
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=60).contains(&retry), "{retry}");

    assert_eq!(get(&c, &format!("{b}/sliding"), &[]).await.status, 200);
    assert_eq!(get(&c, &format!("{b}/sliding"), &[]).await.status, 200);
    assert_eq!(get(&c, &format!("{b}/sliding"), &[]).await.status, 429);

    // Token bucket keyed by user: burst of 4 for alice, bob has his own bucket.
    let alice = format!(
        "Bearer {}",
        hs256("s", serde_json::json!({"sub": "alice", "exp": now() + 60}))
    );
    let bob = format!(
        "Bearer {}",
        hs256("s", serde_json::json!({"sub": "bob", "exp": now() + 60}))
    );
    for i in 0..4 {
        assert_eq!(
            get(&c, &format!("{b}/bucket"), &[("Authorization", &alice)])
                .await
                .status,
            200,
            "burst {i}"
        );
    }
    assert_eq!(
        get(&c, &format!("{b}/bucket"), &[("Authorization", &alice)])
            .await
            .status,
        429
    );
    assert_eq!(
        get(&c, &format!("{b}/bucket"), &[("Authorization", &bob)])
            .await
            .status,
        200,
        "per-user key"
    );
    assert_eq!(
        up.hits(),
        3 + 2 + 5,
        "rejected requests never reach the upstream"
    );
    let metrics =
        String::from_utf8_lossy(&get(&c, &format!("{b}/metrics"), &[]).await.body).to_string();
    assert!(
        metrics.contains("gateway_ratelimit_rejections_total{route=\"fixed\"}"),
        "rejections exported"
    );
}

#[tokio::test]
async fn transforms_headers_request_id_and_strips_fields() {
    let up = upstream("p").await;
    let cfg = format!(
        r#"{}{}
        [transforms.t]
        request_headers_add = {{ "X-Gateway" = "l7" }}
        request_headers_remove = ["X-Debug"]
        response_headers_add = {{ "X-Frame-Options" = "DENY" }}
        response_headers_remove = ["X-Internal-Debug"]
        strip_json_fields = ["internal_id", "password_hash"]
        [[routes]]
        name = "t"
        path = "/"
        pool = "p"
        transform = "t"
        "#,
        listener("public"),
        pool("p", &[&up], "")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let url = format!("{}/users/1", base(&gw));
    let r = get(
        &c,
        &url,
        &[
            ("X-Debug", "1"),
            ("X-Request-Id", "req-abc-1"),
            ("X-Forwarded-For", "203.0.113.9"),
            ("Host", "api.example.com"),
        ],
    )
    .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(seen.headers["x-gateway"], "l7");
    assert!(seen.headers.get("x-debug").is_none());
    assert_eq!(
        seen.headers["x-request-id"], "req-abc-1",
        "valid client id kept"
    );
    assert_eq!(seen.headers["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "api.example.com");
    assert_eq!(r.header("x-request-id").as_deref(), Some("req-abc-1"));
    assert_eq!(r.header("x-frame-options").as_deref(), Some("DENY"));
    assert!(r.header("x-internal-debug").is_none());
    let body = r.json();
    assert!(
        body.get("internal_id").is_none() && body["profile"].get("password_hash").is_none(),
        "{body}"
    );
    assert_eq!(body["profile"]["name"], "n", "other fields kept");

    let r = get(&c, &url, &[("X-Request-Id", "bad id\twith tab")]).await;
    let generated = r.header("x-request-id").expect("generated id");
    assert_eq!(generated.len(), 36);
    assert_eq!(
        up.last().headers["x-request-id"],
        generated.as_str(),
        "same id upstream and downstream"
    );
}

#[tokio::test]
async fn aggregation_merges_parallel_json_responses() {
    let (users, orders) = (upstream("users").await, upstream("orders").await);
    let cfg = format!(
        r#"{}{}{}
        [[routes]]
        name = "summary"
        path = "/summary/{{id}}"
        path_match = "template"
        aggregate = [
          {{ name = "user", pool = "users", path = "/users/{{id}}" }},
          {{ name = "orders", pool = "orders", path = "/orders/by-user/{{id}}" }},
        ]
        [[routes]]
        name = "broken"
        path = "/broken/{{id}}"
        path_match = "template"
        aggregate = [
          {{ name = "user", pool = "users", path = "/users/{{id}}" }},
          {{ name = "orders", pool = "orders", path = "/fail" }},
        ]
        "#,
        listener("public"),
        pool("users", &[&users], ""),
        pool("orders", &[&orders], "")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let r = get(&c, &format!("{}/summary/9", base(&gw)), &[]).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["user"]["service"], "users");
    assert_eq!(v["user"]["uri"], "/users/9");
    assert_eq!(v["orders"]["uri"], "/orders/by-user/9");
    let r = get(&c, &format!("{}/broken/9", base(&gw)), &[]).await;
    assert_eq!(r.status, 502, "a failed part fails the aggregate");
}

/// `observability.trace_context = false`: the gateway takes no part in the trace, so
/// the client's `traceparent` reaches the upstream as sent and none is made up.
#[tokio::test]
async fn trace_context_off_passes_traceparent_through() {
    let up = upstream("p").await;
    let cfg = format!(
        "[observability]\ntrace_context = false\n{}{}[[routes]]\nname = \"obs\"\npath = \"/\"\npool = \"p\"\n",
        listener("public"),
        pool("p", &[&up], "")
    );
    let gw = start_gateway(&cfg).await;
    let c = client();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get(&c, &format!("{}/a", base(&gw)), &[("traceparent", tp)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().headers["traceparent"], tp, "passed through as sent");
    let r = get(&c, &format!("{}/b", base(&gw)), &[]).await;
    assert_eq!(r.status, 200);
    assert!(
        !up.last().headers.contains_key("traceparent"),
        "none created: {:?}",
        up.last().headers.get("traceparent")
    );
}

#[tokio::test]
async fn access_log_metrics_and_traceparent() {
    let up = upstream("p").await;
    let cfg = format!(
        "{}{}[[routes]]\nname = \"obs\"\npath = \"/\"\npool = \"p\"\n",
        listener("public"),
        pool("p", &[&up], "")
    );
    let gw = start_gateway(&cfg).await;
    let mut log = gw.gateway.shared.access_log.subscribe();
    let c = client();
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = get(
        &c,
        &format!("{}/things?q=1", base(&gw)),
        &[("traceparent", tp), ("X-Request-Id", "obs-1")],
    )
    .await;
    assert_eq!(r.status, 200);
    let sent = up.last().headers["traceparent"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && sent != tp,
        "trace kept, new span: {sent}"
    );
    get(&c, &format!("{}/x", base(&gw)), &[]).await;
    let created = up.last().headers["traceparent"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert_eq!(
        created.len(),
        55,
        "traceparent created when missing: {created}"
    );

    let rec = tokio::time::timeout(std::time::Duration::from_secs(5), log.recv())
        .await
        .expect("log record in time")
        .expect("record");
    assert_eq!(
        (rec.method.as_str(), rec.path.as_str(), rec.status),
        ("GET", "/things", 200)
    );
    assert_eq!(rec.request_id, "obs-1");
    assert_eq!(rec.client_ip, "127.0.0.1");
    assert_eq!(rec.upstream, Some(up.addr.to_string()));
    assert_eq!(rec.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(rec.bytes > 0 && rec.latency_ms >= 0.0);
    let line = serde_json::to_value(&rec).expect("json");
    for k in [
        "time",
        "method",
        "path",
        "status",
        "latency_ms",
        "bytes",
        "client_ip",
        "upstream",
        "request_id",
        "user_id",
    ] {
        assert!(line.get(k).is_some(), "access log has {k}");
    }

    let m = get(&c, &format!("{}/metrics", base(&gw)), &[]).await;
    let text = String::from_utf8_lossy(&m.body);
    assert!(
        text.contains("gateway_requests_total{route=\"obs\",status=\"200\"}"),
        "{text}"
    );
    assert!(
        text.contains("gateway_request_duration_seconds_bucket{route=\"obs\""),
        "histogram exported"
    );
}
