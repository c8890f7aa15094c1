//! `--check-in-browser`: the demo's dashboard in headless Chromium while the scene's mixed load
//! runs, checked against the demo's own daemon and replicas (what `cargo xtask test` runs):
//!
//! 1. the page is live (an update a second) and allows changes (loopback, through the relay);
//! 2. per replica, packets/s and new flows/s on the page over four updates match
//!    `xdp-lb --json stats` over the same 4 s within 20 %;
//! 3. the gateway views have every replica's sampled traces with their stages' verdicts, and for
//!    each replica a *real recent request* picked from the page's list is explained: its client's
//!    L4 decision (the daemon's `explain`) names the replica that served it, and the L7 decision
//!    comes from that replica's router;
//! 4. one replica's l7-sidecar is SIGKILLed: `detected` and `removed` are in the page's event log
//!    within 3 s of the kill; the load's connection errors meanwhile are the outage's (see
//!    `Tally::record_at`); restarted, it is `restored`;
//! 5. the scheduler switched from the page (menu and Apply) reaches the daemon's config file;
//! 6. accessibility (labels, 4.5:1 contrast) and layout at 1280×800; a screenshot is saved.
//!
//! Chromium runs on the host and opens the URL the demo prints, as a user would.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use serde_json::Value;
use xdp_lb_testbed::{
    browser::{ACCESSIBILITY, FITS},
    interrupt, Browser, Daemon, Topology,
};

use super::{gateway::Replica, load::Load};

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;
/// The issue's bound: a killed replica's event is on the page within this of the kill.
const EVENT_BOUND: Duration = Duration::from_secs(3);
/// A restarted replica is back after `rise` checks; generous for a loaded machine.
const RESTORE_BOUND: Duration = Duration::from_secs(10);
/// Page rates against `stats` over the same seconds: this close, or 3/s for small rates.
const TOLERANCE: f64 = 0.2;
/// The replica the check kills and restarts.
pub const KILLED: usize = 2;

/// What the check works on: the scene's running parts.
pub struct Scene<'a> {
    pub url: String,
    pub daemon: &'a Daemon,
    pub xdp_lb: &'a Path,
    pub topo: &'a Topology,
    pub load: &'a Load,
    pub replicas: &'a mut [Replica],
    /// The replicas' backend addresses (`IP:port`), as the dashboard names them.
    pub backends: Vec<String>,
    /// Where the screenshot goes (and a copy, e.g. the README's image).
    pub out_dir: PathBuf,
    pub copy_screenshot_to: Option<PathBuf>,
}

pub fn run(mut scene: Scene<'_>) -> anyhow::Result<()> {
    let mut b = Browser::start(None, WIDTH, HEIGHT).context("starting headless Chromium")?;
    b.navigate(&scene.url)?;
    // 1. Live: three updates within ~3 s of loading.
    let live = b.wait_for("Number(document.body.dataset.updates || 0) >= 3", Duration::from_secs(8)).context("the page is not live")?;
    ensure!(b.eval("document.body.dataset.changes")? == "allowed", "the demo's page does not allow changes (through the relay, as root)");
    println!("browser: {} live, three updates in {:.1} s", scene.url, live.as_secs_f64());

    // Ctrl-C is honoured between steps (each step's waits are bounded).
    numbers(&mut b, &scene).context("the page's numbers against `xdp-lb --json stats`")?;
    interrupt::check()?;
    gateway_views(&mut b, &scene).context("the gateway views (traces, a picked request's path)")?;
    interrupt::check()?;
    failover(&mut b, &mut scene).context("a replica killed and restarted")?;
    interrupt::check()?;
    switch_scheduler(&mut b, &scene).context("switching the scheduler from the page")?;

    // 6. Accessibility and layout with every view filled, then the picture.
    let failures = b.eval(ACCESSIBILITY)?;
    ensure!(failures == serde_json::json!([]), "accessibility: {failures:#}");
    let failures = b.eval(FITS)?;
    ensure!(failures == serde_json::json!([]), "layout at {WIDTH}×{HEIGHT}: {failures:#}");
    let shot = scene.out_dir.join("dashboard.png");
    let size = b.screenshot(&shot)?;
    ensure!(size > 20_000, "a {size}-byte screenshot is too small to show the page");
    println!("browser: accessible (labels, contrast ≥ 4.5:1) and fits {WIDTH}×{HEIGHT}; screenshot {}", shot.display());
    if let Some(to) = &scene.copy_screenshot_to {
        std::fs::copy(&shot, to).with_context(|| format!("copying the screenshot to {}", to.display()))?;
        println!("browser: screenshot copied to {}", to.display());
    }
    Ok(())
}

/// The page's update counter.
fn updates(b: &mut Browser) -> anyhow::Result<u64> {
    Ok(b.eval("Number(document.body.dataset.updates || 0)")?.as_u64().unwrap_or(0))
}

fn next_update(b: &mut Browser) -> anyhow::Result<()> {
    let n = updates(b)?;
    b.wait_for(&format!("Number(document.body.dataset.updates || 0) > {n}"), Duration::from_secs(5)).map(|_| ())
}

/// Per replica of the `gateway` service, the number the page shows in `field` (`data-value`).
fn page_backends(b: &mut Browser, field: &str) -> anyhow::Result<std::collections::BTreeMap<String, f64>> {
    let v = b.eval(&format!(
        r#"(() => {{ const out = {{}};
            for (const row of document.querySelectorAll('table[data-service="gateway"] tbody tr[data-backend]')) {{
              const c = row.querySelector('[data-field="{field}"]');
              if (c.dataset.value === "") return null;
              out[row.dataset.backend] = Number(c.dataset.value);
            }}
            return out; }})()"#
    ))?;
    serde_json::from_value(v.clone()).with_context(|| format!("{field} is not shown for every replica: {v}"))
}

/// Step 2: four updates' rates against `stats --interval-ms 4000` started right after an update.
fn numbers(b: &mut Browser, scene: &Scene<'_>) -> anyhow::Result<()> {
    next_update(b)?;
    let (xdp_lb, socket) = (scene.xdp_lb.to_path_buf(), scene.daemon.socket().to_path_buf());
    let stats = std::thread::spawn(move || {
        Command::new(xdp_lb).arg("--socket").arg(socket).args(["--json", "stats", "--interval-ms", "4000"]).output()
    });
    let mut page: std::collections::BTreeMap<(String, &str), f64> = Default::default();
    for _ in 0..4 {
        next_update(b)?;
        for field in ["new_flows_per_s", "packets_per_s"] {
            for (backend, v) in page_backends(b, field)? {
                *page.entry((backend, field)).or_default() += v / 4.0;
            }
        }
    }
    let out = stats.join().map_err(|_| anyhow::anyhow!("the stats thread panicked"))?.context("running xdp-lb stats")?;
    ensure!(out.status.success(), "xdp-lb stats: {}", String::from_utf8_lossy(&out.stderr));
    let stats: Value = serde_json::from_slice(&out.stdout).context("xdp-lb --json stats")?;
    let service = stats["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "gateway"))
        .with_context(|| format!("no service `gateway` in {stats:#}"))?;
    let mut measured = Vec::new();
    for backend in service["backends"].as_array().context("no backends in stats")? {
        let address = backend["address"].as_str().context("a backend without address")?.to_string();
        for field in ["new_flows_per_s", "packets_per_s"] {
            let cli = backend[field].as_f64().with_context(|| format!("no {field} in stats"))?;
            let shown = page.get(&(address.clone(), field)).copied().with_context(|| format!("{address} is not on the page"))?;
            ensure!(cli > 1.0, "no traffic to {address} during the comparison: {stats:#}");
            ensure!((shown - cli).abs() <= (TOLERANCE * cli).max(3.0), "{address} {field}: page {shown:.1}, stats {cli:.1}");
            measured.push(format!("{address} {field} {shown:.1}/{cli:.1}"));
        }
    }
    println!("browser: page/stats over 4 s within {:.0} %: {}", TOLERANCE * 100.0, measured.join(", "));
    Ok(())
}

/// Step 3: every replica's traces on the page with stage verdicts; for each replica a real
/// request picked from "A request's path" is explained at L4 (its replica) and at L7 (its route).
fn gateway_views(b: &mut Browser, scene: &Scene<'_>) -> anyhow::Result<()> {
    for backend in &scene.backends {
        b.wait_for(
            &format!("document.querySelector('#traces tr[data-backend=\"{backend}\"] [data-stage=\"route\"][data-verdict]')"),
            Duration::from_secs(8),
        )
        .with_context(|| format!("no trace of replica {backend} with its stages on the page"))?;
        b.wait_for(&format!("document.querySelector('#gateways li[data-backend=\"{backend}\"][data-state=\"ok\"]')"), Duration::from_secs(3))?;
    }
    // Each kind of verdict the load provokes is on the page: 401s (auth deny), 429s (limited).
    for verdict in ["[data-stage=\"auth\"][data-verdict=\"deny\"]", "[data-stage=\"rate_limit\"][data-verdict=\"limited\"]", "[data-stage=\"upstream\"][data-verdict=\"response\"]"] {
        // Only the newest 12 are shown: a kind may take a few updates to come by.
        b.wait_for(&format!("document.querySelector('#traces {verdict}')"), Duration::from_secs(10))
            .with_context(|| format!("no sampled request with {verdict} in the pipeline view"))?;
    }
    for backend in &scene.backends {
        // A request the replica served (its router's decision does not depend on a header, so
        // the page's route question, which sends none, must give the recorded route).
        let pick = format!(
            r#"(() => {{
              const select = document.getElementById('explain-recent');
              const option = [...select.options].find((o) => o.trace && o.trace.backend === '{backend}'
                && o.trace.route && o.trace.route !== 'users-v2-header');
              if (!option) return null;
              const l4 = document.getElementById('explain-l4');
              delete l4.dataset.backend; delete l4.dataset.agrees;
              delete document.getElementById('explain-l7').dataset.route;
              select.value = option.value;
              select.dispatchEvent(new Event('change'));
              return option.trace;
            }})()"#
        );
        let started = Instant::now();
        let trace = loop {
            let t = b.eval(&pick)?;
            if !t.is_null() {
                break t;
            }
            ensure!(started.elapsed() < Duration::from_secs(8), "no recent request of replica {backend} to pick");
            std::thread::sleep(Duration::from_millis(200));
        };
        let route = trace["route"].as_str().context("a picked trace without route")?;
        ensure!(trace["client"].is_string(), "a picked trace without its client: {trace}");
        b.wait_for("document.getElementById('explain-l4').dataset.agrees !== undefined", Duration::from_secs(5))?;
        let l4 = b.eval("[document.getElementById('explain-l4').dataset.agrees, document.getElementById('explain-l4').textContent]")?;
        ensure!(l4[0] == "true", "picked {trace}: the L4 decision does not name the replica that served it: {}", l4[1]);
        b.wait_for(&format!("document.getElementById('explain-l7').dataset.route === '{route}'"), Duration::from_secs(5)).with_context(|| {
            format!("picked {trace}: the L7 decision from replica {backend} is not route {route}")
        })?;
        let l7 = b.eval("document.getElementById('explain-l7').textContent")?;
        ensure!(l7.as_str().is_some_and(|t| t.starts_with(&format!("{backend}'s gateway"))), "the L7 decision is not {backend}'s: {l7}");
        let stages = b.eval(&format!(
            "[...document.querySelectorAll('#explain-trace[data-backend=\"{backend}\"] [data-stage]')].map((s) => s.dataset.stage + ':' + s.dataset.verdict)"
        ))?;
        ensure!(stages.as_array().is_some_and(|s| s.len() >= 3), "the picked request's pipeline is not shown: {stages}");
        println!(
            "browser: picked {} {}{} from {} → L4 {backend} (agrees), L7 route {route}, pipeline {}",
            trace["method"].as_str().unwrap_or("?"),
            trace["host"].as_str().unwrap_or(""),
            trace["path"].as_str().unwrap_or("?"),
            trace["client"].as_str().unwrap_or("?"),
            stages.as_array().map(|s| s.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" ")).unwrap_or_default()
        );
    }
    Ok(())
}

/// The newest event number on the page (events after a step have larger ones).
fn newest_event(b: &mut Browser) -> anyhow::Result<u64> {
    Ok(b.eval("Math.max(0, ...[...document.querySelectorAll('#events li[data-seq]')].map((e) => Number(e.dataset.seq)))")?.as_u64().unwrap_or(0))
}

fn event_after(kind: &str, backend: &str, seq: u64) -> String {
    format!("[...document.querySelectorAll('#events li[data-kind=\"{kind}\"][data-backend=\"{backend}\"]')].some((e) => Number(e.dataset.seq) > {seq})")
}

/// Step 4: SIGKILL one replica: its events within 3 s of the kill; restarted, `restored`.
fn failover(b: &mut Browser, scene: &mut Scene<'_>) -> anyhow::Result<()> {
    let backend = scene.backends[KILLED].clone();
    let name = scene.replicas[KILLED].name.clone();
    let before = newest_event(b)?;
    let killed = Instant::now();
    scene.load.outage_begins(&name, killed);
    scene.replicas[KILLED].kill();
    // Polled from the kill, so each bound includes the page's update and the relay.
    let mut seen = Vec::new();
    for kind in ["detected", "removed"] {
        let remaining = EVENT_BOUND.saturating_sub(killed.elapsed());
        b.wait_for(&event_after(kind, &backend, before), remaining)
            .with_context(|| format!("{kind} for {backend} ({name} killed) not on the page within {EVENT_BOUND:?} of the kill"))?;
        seen.push(format!("{kind} {:.2} s", killed.elapsed().as_secs_f64()));
    }
    // From here the balancer sends it nothing new: later connection errors are not its doing.
    scene.load.outage_ends(&name, Instant::now());
    b.wait_for(&format!("document.querySelector('tr[data-backend=\"{backend}\"] [data-field=\"health\"]').dataset.value === 'down'"), Duration::from_secs(3))?;
    let before = newest_event(b)?;
    scene.replicas[KILLED].restart(scene.topo.backend(KILLED)).with_context(|| format!("restarting {name}"))?;
    let restarted = Instant::now();
    b.wait_for(&event_after("restored", &backend, before), RESTORE_BOUND)
        .with_context(|| format!("{name} restarted but not restored on the page within {RESTORE_BOUND:?}"))?;
    println!(
        "browser: {name} ({backend}) SIGKILLed → on the page: {}; restarted → restored {:.2} s later",
        seen.join(", "),
        restarted.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Step 5: the scheduler menu and Apply button: the daemon's config file says round-robin.
fn switch_scheduler(b: &mut Browser, scene: &Scene<'_>) -> anyhow::Result<()> {
    let config = || std::fs::read_to_string(scene.daemon.config_path()).context("reading the daemon's config");
    if config()?.contains("scheduler = \"round-robin\"") {
        bail!("the daemon's config says round-robin before the switch");
    }
    b.eval(
        "(() => { const s = document.getElementById('scheduler-gateway'); s.value = 'round-robin';
           s.closest('div').querySelector('button').click(); return true; })()",
    )?;
    b.wait_for("document.getElementById('change-result').textContent.includes('now uses round-robin')", Duration::from_secs(5))
        .with_context(|| format!("the page's answer: {}", b.eval("document.getElementById('change-result').textContent").unwrap_or_default()))?;
    ensure!(config()?.contains("scheduler = \"round-robin\""), "the daemon's config did not change:\n{}", config()?);
    b.wait_for("document.querySelector('#schedulers div[data-service=\"gateway\"] [data-field=\"scheduler\"]').textContent === 'running: round-robin'", Duration::from_secs(5))?;
    println!("browser: scheduler switched to round-robin on the page; the daemon wrote it into {}", scene.daemon.config_path().display());
    Ok(())
}
