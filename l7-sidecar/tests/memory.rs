//! Focused, faster versions of what the soak test watches, measured in live heap bytes
//! (a counting allocator) rather than RSS, so they are exact and need no 60 s run:
//! nothing may hold memory per request once the gateway is warm.
mod common;
use common::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

/// Bytes currently allocated by the whole test process.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call goes to `System` unchanged; only the sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's guarantees.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded with the caller's guarantees.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// The tests measure the one process-wide heap, so they must not overlap.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const KIB: isize = 1024;

fn soak_like_config(a: &Upstream, b: &Upstream) -> String {
    let (a, b) = (a.addr, b.addr);
    format!(
        "{}[pools.p]\nbackends = [{{ address = \"{a}\" }}, {{ address = \"{b}\" }}]\nalgorithm = \"least-connections\"\n\
         [rate_limits.generous]\nalgorithm = \"token-bucket\"\nlimit = 1000000\nwindow_ms = 1000\nburst = 1000000\n\
         [[routes]]\nname = \"users\"\npath = \"/users\"\npath_match = \"prefix\"\npool = \"p\"\nrate_limit = \"generous\"\n",
        listener("public"),
    )
}

/// `n` GETs of `url` from 4 concurrent keep-alive clients, as in the soak test.
async fn load(url: &str, n: usize) {
    let mut workers = Vec::new();
    for _ in 0..4 {
        let url = url.to_string();
        workers.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..n / 4 {
                let r = get(&c, &url, &[]).await;
                assert_eq!(r.status, 200, "{:?}", r.body);
            }
        }));
    }
    for w in workers {
        w.await.unwrap_or_else(|e| panic!("load worker panicked: {e}"));
    }
}

/// The Prometheus exporter keeps each histogram sample until upkeep folds it into the
/// buckets; the gateway must run that upkeep itself, or an unscraped gateway grows by
/// 8 bytes per request for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_duration_samples_are_drained_without_a_scrape() {
    let _serial = SERIAL.lock().await;
    let up = upstream("a").await;
    // Starting a gateway installs the process-wide recorder the request metrics use.
    let _gw = start_gateway(&format!(
        "{}{}[[routes]]\nname = \"r\"\npath = \"/\"\npath_match = \"prefix\"\npool = \"p\"\n",
        listener("public"),
        pool("p", &[&up], ""),
    ))
    .await;
    let histogram = metrics::histogram!("gateway_request_duration_seconds", "route" => "memory-test");
    histogram.record(0.001);
    let before = live();
    // As many samples as half a million requests record.
    for _ in 0..500_000 {
        histogram.record(0.001);
    }
    let held = live() - before;
    println!("500000 samples held {} KiB before upkeep", held / KIB);
    // Traffic goes on (a hundred samples per poll), as freed sample blocks are reclaimed by
    // later recordings; no one renders the metrics.
    let limit = l7_sidecar::stats::METRICS_UPKEEP * 3;
    let deadline = tokio::time::Instant::now() + limit;
    let mut now_held = held;
    while tokio::time::Instant::now() < deadline {
        for _ in 0..100 {
            histogram.record(0.001);
        }
        now_held = live() - before;
        if now_held < held / 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("then {} KiB after upkeep", now_held / KIB);
    // Drained blocks are freed through crossbeam-epoch, a little later and not all at
    // once on a loaded machine; without upkeep nothing is freed and the held bytes only
    // grow, so half is a clear line between the two.
    assert!(
        now_held < held / 2,
        "histogram samples still hold {} KiB of {} KiB after {limit:?} without a scrape",
        now_held / KIB,
        held / KIB
    );
}

/// What the soak test measures, in heap bytes and a few seconds: once connections and
/// the upstreams' request logs are set up, further requests must not keep memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_the_gateway_keep_no_memory() {
    let _serial = SERIAL.lock().await;
    let (a, b) = (upstream("a").await, upstream("b").await);
    let gw = start_gateway(&soak_like_config(&a, &b)).await;
    let url = format!("{}/users/42", base(&gw));
    // Warm: client and gateway connection pools, route metrics, rate-limit key.
    load(&url, 200).await;
    let before = live();
    let n = 1_200;
    load(&url, n).await;
    let grown = live() - before;
    println!(
        "{n} requests: live heap +{} KiB ({} B per request) with the upstream logs",
        grown / KIB,
        grown / n as isize
    );
    // The upstreams remember each request (the test harness's log); an entry is its
    // method, URI and headers (~2 KiB with the forwarding headers the gateway adds:
    // X-Forwarded-*, X-Real-IP, X-Request-Id, identity), far under the 8 KiB and more
    // of a pinned hyper read buffer. The gateway's own share is judged below.
    assert!(
        grown < 3 * KIB * n as isize,
        "{n} requests kept {} KiB ({} B each)",
        grown / KIB,
        grown / n as isize
    );
    drop(std::mem::take(&mut *a.seen.lock().expect("seen")));
    drop(std::mem::take(&mut *b.seen.lock().expect("seen")));
    let kept = live() - before;
    println!("without the upstream logs: +{} KiB", kept / KIB);
    // What is left is the gateway's (and clients') own: bounded, not per request.
    assert!(
        kept < 512 * KIB,
        "{n} requests left {} KiB in the gateway",
        kept / KIB
    );
    assert!(a.hits() + b.hits() >= n, "the load reached the upstreams");
}
