//! The dashboard in a real browser: a daemon with `--dashboard` in the namespace testbed, real
//! traffic, and headless Chromium reading the page. The numbers on the page match
//! `xdp-lb --json stats`; a killed backend shows in the event log within 3 s; the scheduler switched
//! from the page reaches the config file; the page passes basic accessibility checks at 1280×800
//! and a screenshot is saved.

#[path = "dashboard/gateway.rs"]
mod gateway;

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use xdp_lb_testbed::{http_get, Daemon, Family, IdentityServers, Topology};

/// The testbed's Chromium driver, failing the test with the driver's message.
struct Browser(xdp_lb_testbed::Browser);

impl Browser {
    fn start(ns: &xdp_lb_testbed::Netns, width: u32, height: u32) -> Browser {
        Browser(xdp_lb_testbed::Browser::start(Some(ns), width, height).unwrap_or_else(|e| panic!("{e:#}")))
    }
    fn navigate(&mut self, url: &str) {
        self.0.navigate(url).unwrap_or_else(|e| panic!("{e:#}"))
    }
    fn eval(&mut self, expression: &str) -> Value {
        self.0.eval(expression).unwrap_or_else(|e| panic!("{e:#}"))
    }
    fn wait_for(&mut self, condition: &str, within: Duration) -> Duration {
        self.0.wait_for(condition, within).unwrap_or_else(|e| panic!("{e:#}"))
    }
    fn screenshot(&mut self, path: &Path) -> usize {
        self.0.screenshot(path).unwrap_or_else(|e| panic!("{e:#}"))
    }
}

use xdp_lb_testbed::browser::{ACCESSIBILITY, FITS};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const DASHBOARD: &str = "127.0.0.1:8090";
/// The viewport the page must stay usable in.
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;

/// A service whose backends have weights 1, 1 and 2 (so maglev and round-robin split new flows
/// differently) and fast health checks (a dead backend is detected within ~0.5 s).
fn config(topo: &Topology) -> String {
    let mut out = format!(
        "# dashboard test: this comment must survive changes made from the page\n\
         [[services]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\nscheduler = \"maglev\"\ndrain_timeout_ms = 1500\n\
         [services.health_check]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n",
        topo.vip_socket(Family::V4, 80)
    );
    for (i, weight) in [1, 1, 2].into_iter().enumerate() {
        out.push_str(&format!("[[services.backends]]\naddress = \"{}\"\nweight = {weight}\n", topo.backend_socket(Family::V4, i, 80)));
    }
    out
}

/// Requests to the VIP from the client namespace until stopped (at most 120 s, at most ~100/s).
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(topo: &Topology) -> Load {
        let vip = topo.vip_socket(Family::V4, 80);
        let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, d) = (stop.clone(), done.clone());
        let thread = topo
            .client()
            .spawn_thread(move || {
                let started = Instant::now();
                while !s.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                    // Failures are expected while a killed backend is being detected.
                    if http_get(vip).is_ok() {
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
            .expect("load thread");
        Load { stop, done, thread: Some(thread) }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn cli(daemon: &Daemon, args: &[&str]) -> Value {
    let out = daemon.cli(Path::new(XDP_LB), args).expect("xdp-lb");
    assert!(out.status.success(), "xdp-lb {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("xdp-lb {args:?}: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// The number of updates the page has rendered.
fn updates(b: &mut Browser) -> u64 {
    b.eval("Number(document.body.dataset.updates || 0)").as_u64().unwrap_or(0)
}

/// Waits for the page's next update.
fn next_update(b: &mut Browser) {
    let n = updates(b);
    b.wait_for(&format!("Number(document.body.dataset.updates || 0) > {n}"), Duration::from_secs(5));
}

/// Per backend of `web`, the page's `field` (its `data-value`, the number the cell shows).
fn page_backends(b: &mut Browser, field: &str) -> BTreeMap<String, f64> {
    let v = b.eval(&format!(
        r#"(() => {{ const out = {{}};
            for (const row of document.querySelectorAll('table[data-service="web"] tbody tr[data-backend]')) {{
              const c = row.querySelector('[data-field="{field}"]');
              if (c.dataset.value === "" || c.textContent === "–") return null;
              out[row.dataset.backend] = Number(c.dataset.value);
            }}
            return out; }})()"#
    ));
    serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{field} not shown for every backend: {v} ({e})"))
}

/// The page's pass/drop reason counters.
fn page_reasons(b: &mut Browser) -> BTreeMap<String, f64> {
    let v = b.eval(
        r#"(() => { const out = {};
            for (const row of document.querySelectorAll('#reasons tbody tr[data-reason]'))
              out[row.dataset.reason] = Number(row.querySelector('[data-field="packets"]').dataset.value);
            return out; })()"#,
    );
    serde_json::from_value(v).expect("reasons")
}

/// Sums `field` of every backend over the next `n` updates.
fn sum_over_updates(b: &mut Browser, field: &str, n: usize) -> BTreeMap<String, f64> {
    let mut sum = BTreeMap::new();
    for _ in 0..n {
        next_update(b);
        for (k, v) in page_backends(b, field) {
            *sum.entry(k).or_insert(0.0) += v;
        }
    }
    sum
}

fn output_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard")
}

#[test]
fn the_dashboard_in_a_browser_shows_real_numbers_events_and_changes_the_daemon() {
    let topo = Topology::new("dash", 3).expect("testbed");
    let mut servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let daemon = Daemon::start_with_args(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config(&topo), &["--dashboard", DASHBOARD])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let load = Load::start(&topo);
    let mut b = Browser::start(topo.lb(), WIDTH, HEIGHT);
    b.navigate(&format!("http://{DASHBOARD}/"));
    // Live: at least three updates within ~3 s of loading (one a second).
    let live = b.wait_for("Number(document.body.dataset.updates || 0) >= 3", Duration::from_secs(6));
    assert!(live < Duration::from_millis(4500), "three updates took {live:?}");
    assert_eq!(b.eval("document.body.dataset.changes"), "allowed", "a loopback dashboard allows changes");
    assert!(load.done.load(Ordering::Relaxed) > 0, "the load runs\n{}", daemon.log());

    // 1. The numbers: the page's rates over four updates against `stats` over the same 4 s.
    // Aligned with the page's updates: the CLI starts right after one, and runs in the background
    // while the page's next four updates (each over the second before it) are read.
    next_update(&mut b);
    let socket = daemon.socket().display().to_string();
    let stats_thread =
        std::thread::spawn(move || Command::new(XDP_LB).args(["--socket", &socket, "--json", "stats", "--interval-ms", "4000"]).output());
    let mut page_new = BTreeMap::new();
    let mut page_packets = BTreeMap::new();
    let mut reasons_early = BTreeMap::new();
    for i in 0..4 {
        next_update(&mut b);
        for (k, v) in page_backends(&mut b, "new_flows_per_s") {
            *page_new.entry(k).or_insert(0.0) += v / 4.0;
        }
        for (k, v) in page_backends(&mut b, "packets_per_s") {
            *page_packets.entry(k).or_insert(0.0) += v / 4.0;
        }
        if i == 1 {
            reasons_early = page_reasons(&mut b);
        }
    }
    let stats = stats_thread.join().expect("stats thread").expect("xdp-lb stats");
    assert!(stats.status.success(), "{}", String::from_utf8_lossy(&stats.stderr));
    let stats: Value = serde_json::from_slice(&stats.stdout).expect("stats JSON");
    let web = stats["services"].as_array().and_then(|s| s.iter().find(|s| s["name"] == "web")).expect("web in stats");
    let mut measured = Vec::new();
    for backend in web["backends"].as_array().expect("backends") {
        let address = backend["address"].as_str().expect("address");
        for (field, page) in [("new_flows_per_s", &page_new), ("packets_per_s", &page_packets)] {
            let cli = backend[field].as_f64().expect("rate");
            let shown = page[address];
            measured.push(format!("{address} {field}: page {shown:.1}, stats {cli:.1}"));
            assert!(cli > 1.0, "no traffic to {address} during the comparison: {stats:#}");
            assert!((shown - cli).abs() <= (0.2 * cli).max(3.0), "{address} {field}: page {shown:.1}, stats {cli:.1}");
        }
    }
    eprintln!("page vs stats, 4 s of load:\n  {}", measured.join("\n  "));
    // The service's totals since start: at least the requests the load completed before the read.
    let completed = load.done.load(Ordering::Relaxed) as f64;
    let total = b.eval("Number(document.querySelector('table[data-service=\"web\"] caption').dataset.newFlows)").as_f64().expect("total");
    assert!(total >= completed * 0.9 && total > 100.0, "page: {total} flows since start, the load completed {completed} requests");
    assert!(!reasons_early.is_empty(), "no pass/drop reason shown");
    for (reason, shown) in &reasons_early {
        let now = stats["reasons"][reason].as_f64().unwrap_or_else(|| panic!("no {reason} in {stats:#}"));
        // Read by the page before `stats` read its second snapshot: counters only grow, and only
        // by the traffic of ~3 s (health checks, replies).
        assert!(*shown <= now && now - shown < 5000.0, "{reason}: page {shown}, stats {now}");
    }

    // 2. A request's path, L4 half: the page's explain is the daemon's.
    let vip = topo.vip_socket(Family::V4, 80).to_string();
    b.eval(&format!(
        "document.getElementById('explain-source').value = '192.0.2.7:40000';
         document.getElementById('explain-destination').value = '{vip}';
         document.getElementById('explain-run').click(); true"
    ));
    b.wait_for("document.getElementById('explain-l4').dataset.backend", Duration::from_secs(5));
    let shown = b.eval("document.getElementById('explain-l4').dataset.backend");
    let explained = cli(&daemon, &["--json", "explain", "192.0.2.7:40000", &vip]);
    assert_eq!(shown, explained["backend"], "page: {}", b.eval("document.getElementById('explain-l4').textContent"));
    assert_eq!(b.eval("document.getElementById('explain-l7').dataset.gateway"), "none", "no fake L7 data");

    // 3. Accessibility and layout at 1280×800, then the screenshot.
    let failures = b.eval(ACCESSIBILITY);
    assert_eq!(failures, serde_json::json!([]), "accessibility");
    let failures = b.eval(FITS);
    assert_eq!(failures, serde_json::json!([]), "layout at {WIDTH}×{HEIGHT}");
    let shot = output_dir().join("dashboard.png");
    let size = b.screenshot(&shot);
    assert!(size > 20_000, "a {size}-byte screenshot is too small to show the page");
    eprintln!("screenshot: {} ({size} bytes)", shot.display());

    // 4. Algorithms: weights 1/1/2 under maglev give the third backend about half the new flows;
    // switched from the page to round-robin (which ignores weights), about a third.
    let heavy = topo.backend_socket(Family::V4, 2, 80).to_string();
    let share = |sums: &BTreeMap<String, f64>| sums[&heavy] / sums.values().sum::<f64>();
    let before = share(&sum_over_updates(&mut b, "new_flows_per_s", 3));
    b.eval("document.getElementById('scheduler-web').value = 'round-robin'; document.querySelector('#schedulers [data-service=\"web\"] button').click(); true");
    b.wait_for("document.getElementById('change-result').textContent.includes('round-robin')", Duration::from_secs(5));
    let result = b.eval("document.getElementById('change-result').textContent");
    assert_eq!(result, "service web now uses round-robin", "the page reports the daemon's answer");
    let file = std::fs::read_to_string(daemon.config_path()).expect("config file");
    assert!(file.contains("scheduler = \"round-robin\""), "the switch is in the config file:\n{file}");
    assert!(file.contains("# dashboard test: this comment must survive"), "written by the config writer (comments kept):\n{file}");
    let status = cli(&daemon, &["--json", "status"]);
    assert_eq!(status["services"][0]["scheduler"], "round-robin", "{status:#}");
    b.wait_for("document.querySelector('#schedulers [data-service=\"web\"] [data-field=\"scheduler\"]').textContent.includes('round-robin')", Duration::from_secs(3));
    b.wait_for("document.querySelector('#events li[data-kind=\"change\"]')?.textContent.includes('round-robin')", Duration::from_secs(3));
    next_update(&mut b); // the first interval may straddle the switch
    let after = share(&sum_over_updates(&mut b, "new_flows_per_s", 3));
    eprintln!("share of new flows of the weight-2 backend: maglev {before:.2}, round-robin {after:.2}");
    assert!(before > 0.42 && after < 0.40, "share of {heavy}: maglev {before:.2}, round-robin {after:.2}");

    // 5. Health and failover: kill the third backend's server; the page's log shows it within 3 s.
    let killed = Instant::now();
    drop(servers.remove(2));
    let detected = b.wait_for(&format!("document.querySelector('#events li[data-kind=\"detected\"][data-backend=\"{heavy}\"]')"), Duration::from_secs(3));
    b.wait_for(&format!("document.querySelector('#events li[data-kind=\"removed\"][data-backend=\"{heavy}\"]')"), Duration::from_secs(3));
    b.wait_for(&format!("document.querySelector('tr[data-backend=\"{heavy}\"] [data-field=\"health\"]').dataset.value === 'down'"), Duration::from_secs(3));
    eprintln!("kill → event on the page: {:?} (polled from the kill: {:?})", detected, killed.elapsed());
    assert!(killed.elapsed() < Duration::from_secs(6));
    // Revived: back in the ring after `rise` good checks, and the log says so.
    servers.push(IdentityServers::start(&topo, 2, 80, 53).expect("restart the killed backend's servers"));
    b.wait_for(&format!("document.querySelector('#events li[data-kind=\"restored\"][data-backend=\"{heavy}\"]')"), Duration::from_secs(3));
    b.wait_for(&format!("document.querySelector('tr[data-backend=\"{heavy}\"] [data-field=\"health\"]').dataset.value === 'up'"), Duration::from_secs(3));

    // Drain from the page: the same request as `xdp-lb backend drain`, written into the file.
    let first = topo.backend_socket(Family::V4, 0, 80).to_string();
    b.eval(&format!("document.querySelector('tr[data-backend=\"{first}\"] [data-field=\"drain\"] button').click(); true"));
    b.wait_for(&format!("document.querySelector('#events li[data-kind=\"drained\"][data-backend=\"{first}\"]')"), Duration::from_secs(3));
    let status = cli(&daemon, &["--json", "status"]);
    let drained: Vec<&Value> = status["services"][0]["backends"].as_array().expect("backends").iter().filter(|b| b["drained"] == true).collect();
    assert_eq!(drained.len(), 1, "{status:#}");
    assert_eq!(drained[0]["address"], first.as_str());
    assert!(std::fs::read_to_string(daemon.config_path()).expect("config").contains("drained = true"));
    // After drain_timeout_ms (1.5 s) its established flows are moved too: logged as well.
    b.wait_for(
        &format!("[...document.querySelectorAll('#events li[data-kind=\"removed\"][data-backend=\"{first}\"]')].some((e) => e.textContent.includes('drain timeout'))"),
        Duration::from_secs(4),
    );
    let after = output_dir().join("dashboard-after-failover.png");
    b.screenshot(&after);
    // The README's picture: `XDP_LB_README_SCREENSHOT=docs/dashboard.png cargo test -p xdp-lb --test dashboard the_dashboard`.
    if let Ok(to) = std::env::var("XDP_LB_README_SCREENSHOT") {
        let to = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(to);
        std::fs::copy(&after, &to).unwrap_or_else(|e| panic!("copying the screenshot to {}: {e}", to.display()));
    }
    drop(load);
    drop(b);
    daemon.stop().unwrap();
}

/// One HTTP/1.1 GET from inside `topo`'s balancer namespace; returns the body.
fn get_in_lb(topo: &Topology, addr: &'static str, path: &str, extra: &str) -> (String, String) {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n");
    let response = topo.lb().run(move || {
        let mut s = TcpStream::connect(addr.parse::<SocketAddr>().expect("addr"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(request.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    });
    let response = response.expect("GET");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no body: {response}"));
    (head.to_string(), body.to_string())
}

/// The page must reach nothing but its own origin.
#[test]
fn the_page_is_self_contained_and_a_change_from_another_origin_is_refused() {
    let topo = Topology::new("dashoff", 1).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let daemon = Daemon::start_with_args(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config_one(&topo), &["--dashboard", DASHBOARD])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let (head, html) = get_in_lb(&topo, DASHBOARD, "/", "");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-security-policy: default-src 'self'"), "{head}");
    for asset in ["/app.js", "/style.css"] {
        assert!(html.contains(asset), "{asset} is not linked from the page");
    }
    let (_, snapshot) = get_in_lb(&topo, DASHBOARD, "/api/snapshot", "");
    let snapshot: Value = serde_json::from_str(&snapshot).expect("snapshot JSON");
    assert_eq!(snapshot["services"][0]["name"], "web", "{snapshot:#}");
    // A cross-site script's POST carries its Origin: refused, nothing changes.
    let body = r#"{"service":"web","scheduler":"round-robin"}"#;
    let out = topo.lb().run(move || {
        let mut s = TcpStream::connect(DASHBOARD.parse::<SocketAddr>().unwrap())?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(
            s,
            "POST /api/scheduler HTTP/1.1\r\nHost: {DASHBOARD}\r\nOrigin: http://attacker.example\r\nX-XDP-LB-Dashboard: 1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok::<_, std::io::Error>(out)
    });
    let out = out.expect("POST");
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(std::fs::read_to_string(daemon.config_path()).unwrap().contains("scheduler = \"maglev\""));
    daemon.stop().unwrap();
}

fn config_one(topo: &Topology) -> String {
    format!(
        "[[services]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\nscheduler = \"maglev\"\n[[services.backends]]\naddress = \"{}\"\n",
        topo.vip_socket(Family::V4, 80),
        topo.backend_socket(Family::V4, 0, 80)
    )
}

/// The dashboard's events of `kind` for `backend`, from `GET /api/snapshot`.
fn snapshot_events(topo: &Topology, kind: &str, backend: &str) -> Vec<Value> {
    let (_, body) = get_in_lb(topo, DASHBOARD, "/api/snapshot", "");
    let snapshot: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    snapshot["events"].as_array().expect("events").iter().filter(|e| e["kind"] == kind && e["backend"] == backend).cloned().collect()
}

/// A backend that swallows SYNs (an nft drop rule) is held out by the passive checks: the event
/// log says so, and says when the hold ends.
#[test]
fn a_passive_hold_and_its_end_are_in_the_event_log() {
    let topo = Topology::new("dashpas", 2).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let mut config = format!(
        "[[services]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\npassive_checks = true\n[services.health_check]\nkind = \"none\"\n",
        topo.vip_socket(Family::V4, 80)
    );
    for i in 0..2 {
        config.push_str(&format!("[[services.backends]]\naddress = \"{}\"\n", topo.backend_socket(Family::V4, i, 80)));
    }
    let daemon = Daemon::start_with_args(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config, &["--dashboard", DASHBOARD])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let silent = topo.backend_socket(Family::V4, 1, 80).to_string();
    let nft = |script: &str| {
        let file = tempfile::NamedTempFile::new().expect("rules file");
        std::fs::write(file.path(), script).expect("write rules");
        topo.backend(1).exec_ok("nft", &["-f", &file.path().display().to_string()]).map(|_| ())
    };
    nft("table inet dashpas {\n chain input {\n  type filter hook input priority 0;\n  tcp dport 80 drop\n }\n}\n").expect("nft drop rule");
    // New connections with fresh ports: about half go to the silent backend and are not answered.
    let vip = topo.vip_socket(Family::V4, 80);
    let started = Instant::now();
    let detected = loop {
        topo.client().run(|| {
            for _ in 0..10 {
                let _ = TcpStream::connect_timeout(&vip, Duration::from_millis(100));
            }
        });
        let found = snapshot_events(&topo, "detected", &silent);
        if let Some(e) = found.first() {
            break e.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no passive detection of {silent} in 10 s\n{}", daemon.log());
    };
    assert!(detected["message"].as_str().is_some_and(|m| m.contains("passive check") && m.contains("SYNs unanswered")), "{detected}");
    nft("delete table inet dashpas").expect("remove the rule");
    // The hold lasts 10 s; then the backend is tried again, and the log says so.
    let started = Instant::now();
    while snapshot_events(&topo, "restored", &silent).is_empty() {
        assert!(started.elapsed() < Duration::from_secs(15), "no end of the passive hold of {silent} in 15 s\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.stop().unwrap();
}

/// One HTTP/1.1 exchange with `addr` from the client namespace; returns the whole response.
fn exchange_from_client(topo: &Topology, addr: SocketAddr, request: String) -> String {
    topo.client()
        .run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(request.as_bytes())?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok::<_, std::io::Error>(out)
        })
        .unwrap_or_else(|e| panic!("{addr}: {e}"))
}

/// A dashboard on a non-loopback address is read-only without `--dashboard-token-file`'s token
/// and changes the daemon with it; an empty token file is refused at start.
#[test]
fn beyond_loopback_changes_need_the_token() {
    let topo = Topology::new("dashtok", 1).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let dir = tempfile::tempdir().expect("dir");
    let empty = dir.path().join("empty-token");
    std::fs::write(&empty, "\n").expect("token file");
    let addr = SocketAddr::new(topo.lb_addr(Family::V4), 8090);
    let listen = addr.to_string();
    let refused = Daemon::start_with_args(
        Path::new(XDP_LB),
        topo.lb(),
        &topo.lb_ifaces(),
        &config_one(&topo),
        &["--dashboard", &listen, "--dashboard-token-file", &empty.display().to_string()],
    );
    let why = format!("{:?}", refused.err().expect("an empty token file is refused"));
    assert!(why.contains("first line is empty") && why.contains("empty-token"), "{why}");

    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("token file");
    let daemon = Daemon::start_with_args(
        Path::new(XDP_LB),
        topo.lb(),
        &topo.lb_ifaces(),
        &config_one(&topo),
        &["--dashboard", &listen, "--dashboard-token-file", &token.display().to_string()],
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    let snapshot = exchange_from_client(&topo, addr, format!("GET /api/snapshot HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"));
    assert!(snapshot.contains("\"changes\":\"need-token\""), "{snapshot}");
    let body = r#"{"service":"web","scheduler":"round-robin"}"#;
    let post = |auth: &str| {
        exchange_from_client(
            &topo,
            addr,
            format!(
                "POST /api/scheduler HTTP/1.1\r\nHost: {addr}\r\nX-XDP-LB-Dashboard: 1\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            ),
        )
    };
    let without = post("");
    assert!(without.starts_with("HTTP/1.1 403") && without.contains("needs the token"), "{without}");
    let wrong = post("Authorization: Bearer guess\r\n");
    assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
    assert!(std::fs::read_to_string(daemon.config_path()).unwrap().contains("scheduler = \"maglev\""), "a refused change reached the file");
    let right = post("Authorization: Bearer s3cret\r\n");
    assert!(right.starts_with("HTTP/1.1 200"), "{right}");
    assert!(std::fs::read_to_string(daemon.config_path()).unwrap().contains("scheduler = \"round-robin\""));
    // An invalid change is the daemon's refusal, named.
    let body = r#"{"service":"web","scheduler":"fastest"}"#;
    let bad = exchange_from_client(
        &topo,
        addr,
        format!(
            "POST /api/scheduler HTTP/1.1\r\nHost: {addr}\r\nX-XDP-LB-Dashboard: 1\r\nAuthorization: Bearer s3cret\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(bad.starts_with("HTTP/1.1 422") && bad.contains("fastest"), "{bad}");
    daemon.stop().unwrap();
}

/// A scheduler switch POSTed with curl from the balancer's namespace, as `user` (through
/// setpriv) or as root; returns curl's output: the body, then the status on its own line.
fn curl_switch(topo: &Topology, user: Option<&str>) -> String {
    let body = r#"{"service":"web","scheduler":"round-robin"}"#;
    let url = format!("http://{DASHBOARD}/api/scheduler");
    let curl = ["curl", "-s", "-m", "5", "-w", "\n%{http_code}", "-H", "X-XDP-LB-Dashboard: 1", "-X", "POST", "-d", body, &url];
    let reuid = user.map(|u| format!("--reuid={u}"));
    let args: Vec<&str> = match &reuid {
        Some(reuid) => [reuid.as_str(), "--regid=nogroup", "--clear-groups"].into_iter().chain(curl).collect(),
        None => curl[1..].to_vec(),
    };
    let program = if user.is_some() { "setpriv" } else { "curl" };
    topo.lb().exec_ok(program, &args).unwrap_or_else(|e| panic!("{e:?}"))
}

/// hostile2 F10: loopback is no authentication boundary; a local user other than root cannot
/// change anything through a loopback dashboard without the token (the API socket's rule), and
/// the refusal does not reach the config. Root still can; anyone can still read.
#[test]
fn a_loopback_change_needs_root_or_the_token() {
    let topo = Topology::new("dashroot", 1).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, 80, 53).expect("servers");
    let daemon = Daemon::start_with_args(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config_one(&topo), &["--dashboard", DASHBOARD])
        .unwrap_or_else(|e| panic!("{e:?}"));
    let read = topo.lb().exec_ok("setpriv", &["--reuid=nobody", "--regid=nogroup", "--clear-groups", "curl", "-s", &format!("http://{DASHBOARD}/api/snapshot")]);
    assert!(read.as_ref().is_ok_and(|r| r.contains("\"web\"")), "reads stay open on loopback: {read:?}");
    let refused = curl_switch(&topo, Some("nobody"));
    assert!(refused.ends_with("403") && refused.contains("changes from loopback need root or the token"), "{refused}");
    assert!(std::fs::read_to_string(daemon.config_path()).unwrap().contains("scheduler = \"maglev\""), "a refused change reached the config");
    let done = curl_switch(&topo, None);
    assert!(done.ends_with("200"), "{done}\n{}", daemon.log());
    assert!(std::fs::read_to_string(daemon.config_path()).unwrap().contains("scheduler = \"round-robin\""));
    daemon.stop().unwrap();
}
