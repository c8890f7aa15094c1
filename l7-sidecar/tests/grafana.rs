//! The shipped Grafana dashboards (`dist/grafana/*.json`) against a real l7-sidecar: every query
//! naming a `gateway_` metric names one that the binary's `/metrics` actually serves, after the
//! requests that make each series exist (a metric registered in the source but never exported,
//! or exported under another name, fails here).
//!
//! Series that appear only once something happened are provoked for real: a 401 (auth), a 429
//! (rate limit), 5xx answers that eject an upstream (passive checks), an active health check, and
//! access-log lines dropped because nobody reads the binary's stdout (its pipe and the writer's
//! queue fill up).

mod common;
use common::*;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use xdp_lb_testbed::grafana::{exported_names, metric_names, queries};

const BIN: &str = env!("CARGO_BIN_EXE_l7-sidecar");
const API_KEY: &str = "grafana-test-key";
/// The access-log flood stops after this many requests or this long, dropped lines or not.
const FLOOD_MAX_REQUESTS: usize = 60_000;
const FLOOD_MAX_TIME: Duration = Duration::from_secs(90);
const FLOOD_TASKS: usize = 16;

/// Kills the child even when an assertion fails.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn scrape(c: &Client, ops: u16) -> String {
    let reply = get(c, &format!("http://127.0.0.1:{ops}/metrics"), &[]).await;
    assert_eq!(reply.status, 200, "GET /metrics");
    String::from_utf8_lossy(&reply.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_gateway_query_of_the_grafana_dashboards_names_a_metric_a_real_gateway_exports() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/grafana");
    let queries = queries(&dir).unwrap_or_else(|e| panic!("{e:#}"));
    let wanted: BTreeSet<String> = queries
        .iter()
        .flat_map(|q| metric_names(&q.expr))
        .filter(|n| n.starts_with("gateway_"))
        .collect();
    assert!(wanted.len() >= 5, "the dashboards use only {wanted:?} of l7-sidecar's metrics");

    let (ok, bad) = (upstream("ok").await, upstream("bad").await);
    bad.force_status.store(500, Ordering::SeqCst);
    let (port, ops) = (free_port(), free_port());
    let config = format!(
        "[server]\nreload_poll_ms = 0\n\
         [[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\n\
         [[listeners]]\nname = \"ops\"\nbind = \"127.0.0.1:{ops}\"\nmetrics = true\n\
         [observability]\naccess_log = true\n\
         [[auth.api_keys]]\nname = \"partner\"\nsha256 = \"{}\"\nuser_id = \"partner-1\"\n\
         [rate_limits.tight]\nalgorithm = \"token-bucket\"\nkey = \"client-ip\"\nlimit = 1\nwindow = \"1s\"\nburst = 1\n\
         {}[pools.ok.health_check]\npath = \"/health\"\ninterval = \"200ms\"\n\
         {}[pools.bad.passive]\nconsecutive_failures = 2\nmax_ejected_percent = 100\n\
         [[routes]]\nname = \"ok\"\npath = \"/ok\"\npool = \"ok\"\n\
         [[routes]]\nname = \"private\"\npath = \"/private\"\npool = \"ok\"\nauth = \"api-key\"\n\
         [[routes]]\nname = \"limited\"\npath = \"/limited\"\npool = \"ok\"\nrate_limit = \"tight\"\n\
         [[routes]]\nname = \"bad\"\npath = \"/bad\"\npool = \"bad\"\n",
        l7_sidecar::auth::hash_api_key(API_KEY),
        pool("ok", &[&ok], ""),
        pool("bad", &[&bad], ""),
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, &config).expect("write config");
    let mut child = Child(
        Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn l7-sidecar"),
    );
    // Held open and never read: once the pipe and the access-log queue are full, lines drop.
    let _stdout = child.0.stdout.take().expect("stdout");

    let c = client();
    let base = format!("http://127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        let req = http::Request::get(format!("{base}/ok"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), c.request(req)).await {
            assert_eq!(r.status(), 200, "the gateway answers /ok");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "l7-sidecar not serving on {base} after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Each kind of answer the dashboards chart.
    assert_eq!(get(&c, &format!("{base}/ok"), &[]).await.status, 200);
    assert_eq!(get(&c, &format!("{base}/private"), &[]).await.status, 401);
    assert_eq!(get(&c, &format!("{base}/private"), &[("x-api-key", API_KEY)]).await.status, 200);
    let limited_url = format!("{base}/limited");
    let limited: Vec<u16> = futures_util::future::join_all((0..4).map(|_| get(&c, &limited_url, &[])))
        .await
        .iter()
        .map(|r| r.status.as_u16())
        .collect();
    assert!(limited.contains(&429), "over the limit of 1/s: {limited:?}");
    for _ in 0..3 {
        assert!(get(&c, &format!("{base}/bad"), &[]).await.status.is_server_error());
    }
    // A health check of the `ok` pool has run (every 200 ms).
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The access log's drops: cheap 404s until the counter shows up, bounded in count and time.
    let mut text = scrape(&c, ops).await;
    let mut sent = 0usize;
    let flood = Instant::now();
    while !text.contains("gateway_access_log_dropped_total") {
        assert!(
            sent < FLOOD_MAX_REQUESTS && flood.elapsed() < FLOOD_MAX_TIME,
            "no access-log line dropped after {sent} requests in {:?} with stdout unread",
            flood.elapsed()
        );
        let batch = futures_util::future::join_all((0..FLOOD_TASKS).map(|_| {
            let (c, url) = (c.clone(), format!("{base}/nowhere"));
            tokio::spawn(async move {
                for _ in 0..125 {
                    assert_eq!(get(&c, &url, &[]).await.status, 404);
                }
            })
        }))
        .await;
        batch.into_iter().for_each(|r| r.expect("flood task"));
        sent += FLOOD_TASKS * 125;
        text = scrape(&c, ops).await;
    }
    eprintln!("access-log lines dropped after {sent} requests ({:?})", flood.elapsed());

    let exported = exported_names(&text);
    let mut missing = Vec::new();
    for q in &queries {
        for name in metric_names(&q.expr).into_iter().filter(|n| n.starts_with("gateway_")) {
            if !exported.contains(&name) {
                missing.push(format!("{} panel {:?}: {name} is not in l7-sidecar's scrape", q.file, q.title));
            }
        }
    }
    let ours: Vec<&String> = exported.iter().filter(|n| n.starts_with("gateway_")).collect();
    assert!(missing.is_empty(), "{}\nexported: {ours:?}", missing.join("\n"));
}
