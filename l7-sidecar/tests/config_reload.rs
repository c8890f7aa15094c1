//! Configuration validation and live reload (API, file change, SIGHUP, under load).
mod common;
use common::*;
use l7_sidecar::config::ConfigError;
use l7_sidecar::{Config, Gateway, GatewayError};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn shipped_example_config_is_valid() {
    // The example takes its JWT secret from the environment, as operators should.
    std::env::set_var("GATEWAY_JWT_SECRET", "example-secret-for-tests");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway.toml");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("example must be valid: {e}"));
    let names: Vec<&str> = cfg.pools.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["orders", "payments", "users", "users-v2"],
        "users/orders/payments setup"
    );
}

#[tokio::test]
async fn invalid_config_refuses_to_start_and_lists_every_error() {
    let text = r#"
        [server]
        max_headers = 0
        [[listeners]]
        name = "public"
        bind = "127.0.0.1:notaport"
        [pools.users]
        algorithm = "consistent-hash"
        hash_on = "body:x"
        backends = [{ address = "localhost" }]
        [rate_limits.rl]
        algorithm = "fixed-window"
        limit = 0
        window_ms = 1000
        [[routes]]
        name = "r"
        path = "/users/{id}"
        pool = "users"
        auth = "jwt"
    "#;
    let cfg: Config = toml::from_str(text).expect("syntactically valid");
    let err = Gateway::new(cfg, None)
        .err()
        .expect("gateway must refuse an invalid config");
    let GatewayError::Config(ConfigError::Invalid(errs)) = err else {
        panic!("expected validation errors, got {err}")
    };
    let paths: Vec<&str> = errs.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "server.max_headers",
        "listeners[0].bind",
        "pools.users.hash_on",
        "pools.users.backends[0].address",
        "rate_limits.rl.limit",
        "routes[0].path_match",
        "routes[0].auth",
    ] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
}

fn two_route_cfg(a: &Arc<Upstream>, b: &Arc<Upstream>, target: &str, poll_ms: u64) -> String {
    format!(
        "[server]\nreload_poll_ms = {poll_ms}\n[observability]\naccess_log = false\n{}{}{}[[routes]]\nname = \"r\"\npath = \"/\"\npool = \"{target}\"\n",
        listener("public"),
        pool("a", &[a], "algorithm = \"round-robin\""),
        pool("b", &[b], "")
    )
}

#[tokio::test]
async fn reload_applies_to_new_requests_and_invalid_reload_keeps_running_config() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let gw = start_gateway(&two_route_cfg(&a, &b, "a", 0)).await;
    let c = client();
    let url = format!("{}/x", base(&gw));
    assert_eq!(get(&c, &url, &[]).await.json()["service"], "a");

    // An ejection on the balancer must survive the reload.
    let backend = gw.gateway.runtime().upstreams["a"].pool.backends[0].clone();
    gw.gateway
        .reload(Config::parse(&two_route_cfg(&a, &b, "b", 0)).expect("valid"))
        .await
        .expect("reload");
    assert_eq!(get(&c, &url, &[]).await.json()["service"], "b");
    let after = gw.gateway.runtime().upstreams["a"].pool.backends[0].clone();
    assert!(
        Arc::ptr_eq(&backend, &after),
        "backend state object reused across reload"
    );

    let mut bad: Config = toml::from_str(&two_route_cfg(&a, &b, "a", 0)).expect("toml");
    bad.routes[0].pool = Some("ghost".into());
    let err = gw
        .gateway
        .reload(bad)
        .await
        .expect_err("invalid reload must fail");
    assert!(err.to_string().contains("routes[0].pool"), "{err}");
    assert_eq!(
        get(&c, &url, &[]).await.json()["service"],
        "b",
        "running config kept"
    );
}

#[tokio::test]
async fn file_change_and_sighup_trigger_reload() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, two_route_cfg(&a, &b, "a", 50)).expect("write config");
    let cfg = Config::load(&path).expect("valid file");
    let gw = Gateway::new(cfg, Some(path.clone())).expect("gateway");
    let running = l7_sidecar::start(gw.clone()).await.expect("start");
    let watcher = l7_sidecar::reload::spawn_file_watch(gw.clone()).expect("watcher");
    let c = client();
    let url = format!("{}/x", base(&running));
    assert_eq!(get(&c, &url, &[]).await.json()["service"], "a");

    std::fs::write(&path, two_route_cfg(&a, &b, "b", 50)).expect("rewrite config");
    eventually(Duration::from_secs(5), "file change reload", || {
        gw.runtime().cfg.routes[0].pool.as_deref() == Some("b")
    })
    .await;
    assert_eq!(get(&c, &url, &[]).await.json()["service"], "b");

    // Broken file: keeps serving b.
    std::fs::write(&path, "this is [not toml").expect("write broken");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&c, &url, &[]).await.json()["service"], "b");

    // SIGHUP: stop the watcher so only the signal can apply the next change.
    watcher.abort();
    l7_sidecar::reload::spawn_sighup(gw.clone()).expect("sighup handler");
    std::fs::write(&path, two_route_cfg(&a, &b, "a", 0)).expect("rewrite config");
    let status = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    eventually(Duration::from_secs(5), "sighup reload", || {
        gw.runtime().cfg.routes[0].pool.as_deref() == Some("a")
    })
    .await;
    assert_eq!(get(&c, &url, &[]).await.json()["service"], "a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_no_request() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let gw = start_gateway(&two_route_cfg(&a, &b, "a", 0)).await;
    let url = format!("{}/delay/5", base(&gw));
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, ok, url) = (stop.clone(), ok.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..500 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let r = get(&c, &url, &[]).await;
                assert_eq!(
                    r.status,
                    200,
                    "request failed during reload: {:?}",
                    String::from_utf8_lossy(&r.body)
                );
                ok.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    for i in 0..20 {
        let target = if i % 2 == 0 { "b" } else { "a" };
        gw.gateway
            .reload(Config::parse(&two_route_cfg(&a, &b, target, 0)).expect("valid"))
            .await
            .expect("reload");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.await.unwrap_or_else(|e| panic!("worker panicked: {e}"));
    }
    assert!(
        ok.load(Ordering::SeqCst) >= 40,
        "load actually ran: {}",
        ok.load(Ordering::SeqCst)
    );
    assert!(a.hits() > 0 && b.hits() > 0, "both configs served traffic");
}

#[tokio::test]
async fn invalid_file_reload_logs_every_error() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, two_route_cfg(&a, &b, "a", 0)).expect("write");
    let gw =
        Gateway::new(Config::load(&path).expect("valid"), Some(path.clone())).expect("gateway");
    let bad = two_route_cfg(&a, &b, "ghost", 0)
        .replace("reload_poll_ms = 0", "reload_poll_ms = 0\nmax_headers = 0");
    std::fs::write(&path, bad).expect("write bad");
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    gw.reload_from_file()
        .await
        .expect_err("invalid file must not apply");
    let text = logs.text();
    for want in ["routes[0].pool", "server.max_headers"] {
        assert!(text.contains(want), "{want} not logged: {text}");
    }
    assert_eq!(
        gw.runtime().cfg.routes[0].pool.as_deref(),
        Some("a"),
        "running config kept"
    );
}
