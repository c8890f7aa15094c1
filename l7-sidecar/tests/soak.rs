//! A 60-second soak: steady load through routing, rate limiting and proxying must produce no error,
//! and the process's resident memory must stay flat once warm (no per-request leak).
mod common;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SOAK: Duration = Duration::from_secs(60);
const WARM_UP: Duration = Duration::from_secs(10);

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .expect("VmRSS in /proc/self/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes 60 s; `cargo xtask test` runs it (cargo test -p l7-sidecar --test soak -- --ignored)"]
async fn sixty_seconds_under_load_without_errors_and_with_flat_memory() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    let cfg = format!(
        "{}{}[rate_limits.generous]\nalgorithm = \"token-bucket\"\nlimit = 1000000\nwindow_ms = 1000\nburst = 1000000\n\
         [[routes]]\nname = \"users\"\npath = \"/users\"\npath_match = \"prefix\"\npool = \"p\"\nrate_limit = \"generous\"\n",
        listener("public"),
        pool("p", &[&a, &b], "algorithm = \"least-connections\""),
    );
    let gw = start_gateway(&cfg).await;
    let url = format!("{}/users/42", base(&gw));
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, url) = (stop.clone(), ok.clone(), failed.clone(), url.clone());
        workers.push(tokio::spawn(async move {
            let c = client();
            // Bounded by count as well as by the stop flag.
            for _ in 0..2_000_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = get(&c, &url, &[]).await;
                if r.status == 200 {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(WARM_UP).await;
    let warm = rss_kib();
    let mut peak = warm;
    while started.elapsed() < SOAK {
        tokio::time::sleep(Duration::from_secs(5)).await;
        peak = peak.max(rss_kib());
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap_or_else(|e| panic!("worker panicked: {e}"));
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("soak: {ok} requests answered, {failed} failed; RSS {warm} KiB after warm-up, peak {peak} KiB");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(ok > 1_000, "the load actually ran: {ok}");
    // Flat: whatever the allocator keeps after warm-up may wobble, but not grow with the requests.
    assert!(peak <= warm + warm / 4 + 8 * 1024, "RSS grew from {warm} KiB to {peak} KiB over the soak");
    assert!(a.hits() > 0 && b.hits() > 0, "both upstreams served");
}
