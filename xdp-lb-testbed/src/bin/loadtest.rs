//! The CI load test: real HTTP traffic through xdp-lb (NAT, default TCP health checks) and three
//! l7-sidecar replicas, one of which is SIGKILLed mid-run and revived a few seconds later.
//!
//! ```text
//! loadtest --xdp-lb target/debug/xdp-lb --l7-sidecar target/debug/l7-sidecar
//! ```
//!
//! Topology: client ── lb ── backend-0..2. Each backend namespace runs an identity server on
//! 127.0.0.1:8080 (answers `backend-<i>`) and an l7-sidecar replica on :80 that routes `/` to it; the
//! daemon balances the VIP 10.200.100.100:80 over the three replicas. The client opens a new
//! connection every 10 ms and keeps one keep-alive connection busy (a request every 10 ms).
//!
//! Pass criteria (exit 0), else a non-zero exit with the reason:
//! * no failed request before the kill;
//! * failures after the kill only within the detection window (2.5 s; the active checks need
//!   3 × 500 ms + 400 ms ≈ 1.9 s), and no more of them than the killed replica's share of the requests
//!   in that window (plus statistical slack);
//! * no failure from the end of the detection window until the revive, nor after it;
//! * the keep-alive connection (on a surviving replica) never fails and never changes replica;
//! * after the revive the replica gets new connections again.
//!
//! Traffic lasts about 19 s (bounded at 30 s); everything (namespaces, processes, pins) is removed on
//! exit, also on failure or Ctrl-C.

use std::{
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, ExitCode, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use xdp_lb_testbed::{config_toml, interrupt, Daemon, Family, HttpServer, Mode, Protocol, Scheduler, ServiceConfig, Topology};

const REPLICAS: usize = 3;
const VIP_PORT: u16 = 80;
const UPSTREAM: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 8080);
const PACE: Duration = Duration::from_millis(10);
const BEFORE_KILL: Duration = Duration::from_secs(5);
const KILLED_FOR: Duration = Duration::from_secs(7);
const AFTER_REVIVE: Duration = Duration::from_secs(7);
/// Hard bound on the traffic phase.
const TRAFFIC_LIMIT: Duration = Duration::from_secs(30);
/// Failures are tolerated this long after the kill: detection ≈ 3 × 500 ms + 400 ms = 1.9 s.
const DETECTION_WINDOW: Duration = Duration::from_millis(2500);
/// Generous: CI machines are small and everything runs unoptimised; a request slower than this fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let _ = interrupt::catch_sigint();
    match run() {
        Ok(summary) => {
            println!("{summary}");
            println!("loadtest: PASSED");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("loadtest: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Args {
    xdp_lb: PathBuf,
    l7_sidecar: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut xdp_lb = None;
    let mut l7_sidecar = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--xdp-lb" => xdp_lb = it.next().map(PathBuf::from),
            "--l7-sidecar" => l7_sidecar = it.next().map(PathBuf::from),
            "-h" | "--help" => {
                println!("usage: loadtest --xdp-lb PATH --l7-sidecar PATH");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (usage: loadtest --xdp-lb PATH --l7-sidecar PATH)"),
        }
    }
    let args = Args {
        xdp_lb: xdp_lb.context("--xdp-lb PATH is required")?,
        l7_sidecar: l7_sidecar.context("--l7-sidecar PATH is required")?,
    };
    for p in [&args.xdp_lb, &args.l7_sidecar] {
        ensure!(p.is_file(), "{} does not exist (build it first)", p.display());
    }
    Ok(args)
}

/// One l7-sidecar replica in a backend namespace; SIGKILLed (and reaped) when dropped.
struct Sidecar {
    index: usize,
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
}

impl Sidecar {
    fn start(topo: &Topology, index: usize, binary: &Path, dir: &Path) -> anyhow::Result<Sidecar> {
        let config = dir.join(format!("gateway-{index}.toml"));
        std::fs::write(
            &config,
            format!(
                "[server]\nreload_poll_ms = 0\n\n[[listeners]]\nname = \"public\"\nbind = \"0.0.0.0:{VIP_PORT}\"\n\n\
                 [observability]\naccess_log = false\n\n[pools.app]\nbackends = [{{ address = \"{UPSTREAM}\" }}]\n\n\
                 [[routes]]\nname = \"all\"\npath = \"/\"\npool = \"app\"\n"
            ),
        )?;
        let mut sidecar = Sidecar { index, child: None, config, log: dir.join(format!("gateway-{index}.log")) };
        sidecar.spawn(topo, binary)?;
        Ok(sidecar)
    }

    fn spawn(&mut self, topo: &Topology, binary: &Path) -> anyhow::Result<()> {
        let ns = topo.backend(self.index);
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = ns.command(binary);
        cmd.arg("--config").arg(&self.config).stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        // `ip netns exec` execs the program: the child's pid is the replica's.
        self.child = Some(ns.spawn(&mut cmd)?);
        let addr = SocketAddr::new(topo.backend_addr_v4(self.index).into(), VIP_PORT);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if ns.run(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200))).is_ok() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("l7-sidecar replica {} exited ({status}) at start:\n{}", self.index, self.log_text());
            }
            interrupt::check()?;
            ensure!(Instant::now() < deadline, "l7-sidecar replica {} not listening on {addr} after 15 s:\n{}", self.index, self.log_text());
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL
            let _ = child.wait();
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `GET /` on `stream`; returns the body. Handles Content-Length and chunked bodies.
fn get(stream: &mut BufReader<TcpStream>, close: bool) -> anyhow::Result<String> {
    let connection = if close { "close" } else { "keep-alive" };
    let request = format!("GET / HTTP/1.1\r\nHost: loadtest\r\nUser-Agent: xdp-lb-loadtest\r\nConnection: {connection}\r\n\r\n");
    stream.get_mut().write_all(request.as_bytes()).context("sending the request")?;
    let mut status = String::new();
    if stream.read_line(&mut status)? == 0 {
        bail!("connection closed before a response");
    }
    ensure!(status.starts_with("HTTP/1.1 200"), "status {:?}", status.trim_end());
    let (mut length, mut chunked) = (None, false);
    for _ in 0..100 {
        let mut line = String::new();
        ensure!(stream.read_line(&mut line)? > 0, "connection closed inside the headers");
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") && value.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = Vec::new();
    if chunked {
        for _ in 0..1000 {
            let mut size = String::new();
            stream.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16).context("chunk size")?;
            let mut chunk = vec![0; n + 2];
            stream.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
            ensure!(body.len() <= 64 * 1024, "huge body");
        }
    } else {
        let n = length.context("no Content-Length")?;
        ensure!(n <= 64 * 1024, "huge body");
        body.resize(n, 0);
        stream.read_exact(&mut body)?;
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

fn connect(addr: SocketAddr) -> anyhow::Result<BufReader<TcpStream>> {
    let stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).context("connect")?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

/// `backend-<i>` → i.
fn replica_of(body: &str) -> anyhow::Result<usize> {
    body.strip_prefix("backend-").and_then(|i| i.parse().ok()).filter(|i| *i < REPLICAS).with_context(|| format!("unexpected body {body:?}"))
}

/// What happened when: the replica killed, the kill and the revive, and how long after each xdp-lb
/// logged the replica down and up again.
type Timeline = (usize, Instant, Instant, Option<Duration>, Option<Duration>);

/// One request's outcome, stamped when it ended.
struct Sample {
    end: Instant,
    result: Result<usize, String>,
}

fn run() -> anyhow::Result<String> {
    let args = args()?;
    let dir = tempfile::Builder::new().prefix("xdp-lb-loadtest-").tempdir()?;
    let topo = Topology::new("load", REPLICAS).context("building the testbed")?;
    let _upstreams: Vec<HttpServer> = (0..REPLICAS)
        .map(|i| HttpServer::start(topo.backend(i), UPSTREAM, &format!("backend-{i}")))
        .collect::<anyhow::Result<_>>()?;
    let mut sidecars: Vec<Sidecar> =
        (0..REPLICAS).map(|i| Sidecar::start(&topo, i, &args.l7_sidecar, dir.path())).collect::<anyhow::Result<_>>()?;
    let vip = topo.vip_socket(Family::V4, VIP_PORT);
    let backends: Vec<SocketAddr> = (0..REPLICAS).map(|i| topo.backend_socket(Family::V4, i, VIP_PORT)).collect();
    let config = config_toml(&[ServiceConfig::new("web", vip, Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends.clone())]);
    let daemon = Daemon::start(&args.xdp_lb, topo.lb(), &topo.lb_ifaces(), &config).context("starting xdp-lb")?;

    // Warm up: every replica answers through the VIP, and 30 requests in a row succeed.
    topo.client().run(|| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        let (mut seen, mut streak) = ([false; REPLICAS], 0);
        while !(seen.iter().all(|s| *s) && streak >= 30) {
            interrupt::check()?;
            ensure!(Instant::now() < deadline, "warm-up: the VIP did not answer steadily within 15 s (seen {seen:?})\n{}", daemon.log());
            match connect(vip).and_then(|mut s| get(&mut s, true)).and_then(|b| replica_of(&b)) {
                Ok(i) => {
                    seen[i] = true;
                    streak += 1;
                }
                Err(_) => streak = 0,
            }
            thread::sleep(PACE);
        }
        Ok(())
    })?;

    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    // New connections, one every 10 ms.
    let fresh = {
        let stop = stop.clone();
        topo.client().spawn_thread(move || {
            let mut samples = Vec::new();
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) && started.elapsed() < TRAFFIC_LIMIT {
                let result = connect(vip).and_then(|mut s| get(&mut s, true)).and_then(|b| replica_of(&b));
                samples.push(Sample { end: Instant::now(), result: result.map_err(|e| format!("{e:#}")) });
                next += PACE;
                let now = Instant::now();
                if next > now {
                    thread::sleep(next - now);
                } else {
                    next = now;
                }
            }
            samples
        })?
    };
    // One keep-alive connection, a request every 10 ms (reconnecting if it ever breaks).
    let first_stream_replica = Arc::new(Mutex::new(None::<usize>));
    let stream = {
        let (stop, first) = (stop.clone(), first_stream_replica.clone());
        topo.client().spawn_thread(move || {
            let mut samples = Vec::new();
            let mut conn = None;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < TRAFFIC_LIMIT {
                let result = (|| {
                    if conn.is_none() {
                        conn = Some(connect(vip)?);
                    }
                    let body = get(conn.as_mut().expect("connected"), false);
                    if body.is_err() {
                        conn = None;
                    }
                    replica_of(&body?)
                })();
                if let Ok(i) = result {
                    first.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(i);
                }
                samples.push(Sample { end: Instant::now(), result: result.map_err(|e| format!("{e:#}")) });
                thread::sleep(PACE);
            }
            samples
        })?
    };

    // The timeline. Any error from here on still stops and joins the client threads.
    let timeline = (|| -> anyhow::Result<Timeline> {
        sleep_checked(BEFORE_KILL)?;
        let keep_alive_replica = first_stream_replica.lock().unwrap_or_else(|p| p.into_inner()).context("the keep-alive stream got no answer")?;
        // Kill a replica the keep-alive connection does not use, so that connection must survive.
        let victim = (keep_alive_replica + 1) % REPLICAS;
        let victim_addr = backends[victim].to_string();
        let downs_before = count_lines(&daemon.log(), "backend is down", &victim_addr);
        let killed_at = Instant::now();
        sidecars[victim].kill();
        let mut detected = None;
        while killed_at.elapsed() < KILLED_FOR {
            interrupt::check()?;
            if detected.is_none() && count_lines(&daemon.log(), "backend is down", &victim_addr) > downs_before {
                detected = Some(killed_at.elapsed());
            }
            thread::sleep(Duration::from_millis(10));
        }
        let ups_before = count_lines(&daemon.log(), "backend is up", &victim_addr);
        sidecars[victim].spawn(&topo, &args.l7_sidecar).context("reviving the replica")?;
        let revived_at = Instant::now();
        let mut back_up = None;
        while revived_at.elapsed() < AFTER_REVIVE {
            interrupt::check()?;
            if back_up.is_none() && count_lines(&daemon.log(), "backend is up", &victim_addr) > ups_before {
                back_up = Some(revived_at.elapsed());
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok((victim, killed_at, revived_at, detected, back_up))
    })();
    stop.store(true, Ordering::Relaxed);
    let fresh = fresh.join().map_err(|_| anyhow::anyhow!("the new-connections client panicked"))?;
    let stream = stream.join().map_err(|_| anyhow::anyhow!("the keep-alive client panicked"))?;
    let (victim, killed_at, revived_at, detected, back_up) = timeline?;
    let traffic = started.elapsed();

    // Analysis.
    let detection_end = killed_at + DETECTION_WINDOW;
    let window = |s: &&Sample, from: Instant, to: Option<Instant>| s.end >= from && to.is_none_or(|t| s.end < t);
    let before: Vec<&Sample> = fresh.iter().filter(|s| s.end < killed_at).collect();
    let during: Vec<&Sample> = fresh.iter().filter(|s| window(s, killed_at, Some(detection_end))).collect();
    let after_detection: Vec<&Sample> = fresh.iter().filter(|s| window(s, detection_end, Some(revived_at))).collect();
    let after_revive: Vec<&Sample> = fresh.iter().filter(|s| s.end >= revived_at).collect();
    let failures = |v: &[&Sample]| v.iter().filter(|s| s.result.is_err()).count();
    let on = |v: &[&Sample], i: usize| v.iter().filter(|s| s.result.as_ref().ok() == Some(&i)).count();
    let share = on(&before, victim) as f64 / before.len().max(1) as f64;
    let n = during.len() as f64;
    let bound = (share * n + 3.0 * (n * share * (1.0 - share)).sqrt() + 3.0).ceil() as usize;
    let last_failure = fresh.iter().filter(|s| s.result.is_err() && s.end >= killed_at).map(|s| s.end - killed_at).max();
    let victim_after_up = back_up.map(|d| {
        let up = revived_at + d;
        fresh.iter().filter(|s| s.end >= up && s.result.as_ref().ok() == Some(&victim)).count()
    });
    let stream_failures: Vec<&Sample> = stream.iter().filter(|s| s.result.is_err()).collect();
    let stream_replicas: std::collections::BTreeSet<usize> = stream.iter().filter_map(|s| s.result.as_ref().ok().copied()).collect();
    // The first few errors, each with when it ended relative to the kill.
    let first_errors = |v: &[&Sample]| -> String {
        v.iter()
            .filter_map(|s| {
                let at = if s.end >= killed_at {
                    format!("+{:.2} s", (s.end - killed_at).as_secs_f64())
                } else {
                    format!("-{:.2} s", (killed_at - s.end).as_secs_f64())
                };
                s.result.as_ref().err().map(|e| format!("[{at}] {e}"))
            })
            .take(3)
            .collect::<Vec<_>>()
            .join("; ")
    };

    let mut summary = String::new();
    use std::fmt::Write as _;
    let _ = writeln!(summary, "loadtest summary ({:.1} s of traffic, a new connection every {PACE:?} + one keep-alive stream):", traffic.as_secs_f64());
    let _ = writeln!(
        summary,
        "  before the kill:       {} requests, {} failed; replica shares {:?}",
        before.len(),
        failures(&before),
        (0..REPLICAS).map(|i| on(&before, i)).collect::<Vec<_>>()
    );
    let _ = writeln!(
        summary,
        "  killed replica {victim} (SIGKILL); xdp-lb logged it down after {}",
        detected.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "— (never)".into())
    );
    let _ = writeln!(
        summary,
        "  detection window ({:.1} s): {} requests, {} failed (bound {bound}: replica {victim}'s share {:.0} % of them + slack); last failure {} after the kill{}",
        DETECTION_WINDOW.as_secs_f64(),
        during.len(),
        failures(&during),
        share * 100.0,
        last_failure.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "—".into()),
        if failures(&during) > 0 { format!(" ({})", first_errors(&during)) } else { String::new() }
    );
    let _ = writeln!(summary, "  after detection, until the revive: {} requests, {} failed", after_detection.len(), failures(&after_detection));
    let _ = writeln!(
        summary,
        "  revived replica {victim}; xdp-lb logged it up after {}; then {} requests, {} failed, {} answered by replica {victim}",
        back_up.map(|d| format!("{:.2} s", d.as_secs_f64())).unwrap_or_else(|| "— (never)".into()),
        after_revive.len(),
        failures(&after_revive),
        victim_after_up.unwrap_or(0)
    );
    let _ = writeln!(
        summary,
        "  keep-alive stream: {} requests, {} failed, replicas {:?}",
        stream.len(),
        stream_failures.len(),
        stream_replicas
    );

    let mut problems = Vec::new();
    if before.len() < 100 {
        problems.push(format!("only {} requests before the kill", before.len()));
    }
    if failures(&before) > 0 {
        problems.push(format!("{} requests failed before the kill: {}", failures(&before), first_errors(&before)));
    }
    if failures(&during) > bound {
        problems.push(format!("{} failures in the detection window, more than the bound {bound}", failures(&during)));
    }
    if failures(&after_detection) > 0 {
        problems.push(format!(
            "{} requests failed after the detection window, before the revive: {}",
            failures(&after_detection),
            first_errors(&after_detection)
        ));
    }
    if failures(&after_revive) > 0 {
        problems.push(format!("{} requests failed after the revive: {}", failures(&after_revive), first_errors(&after_revive)));
    }
    match detected {
        None => problems.push(format!("xdp-lb never logged replica {victim} down")),
        Some(d) if d > DETECTION_WINDOW => problems.push(format!("detection took {:.2} s", d.as_secs_f64())),
        _ => {}
    }
    match victim_after_up {
        None => problems.push(format!("xdp-lb never logged replica {victim} up again within {AFTER_REVIVE:?}")),
        Some(0) => problems.push(format!("replica {victim} got no new connection after it was up again")),
        _ => {}
    }
    if !stream_failures.is_empty() {
        problems.push(format!("the keep-alive stream failed {} times: {}", stream_failures.len(), first_errors(&stream_failures)));
    }
    if stream_replicas.len() != 1 {
        problems.push(format!("the keep-alive stream was answered by replicas {stream_replicas:?}"));
    }
    if !problems.is_empty() {
        bail!("{}\n{summary}\n--- xdp-lb log ---\n{}", problems.join("\n"), daemon.log());
    }
    let stats = daemon.stop_stats().context("stopping xdp-lb")?;
    let _ = write!(summary, "xdp-lb counters:\n{}", stats.render());
    Ok(summary)
}

fn count_lines(log: &str, what: &str, backend: &str) -> usize {
    log.lines().filter(|l| l.contains(what) && l.contains(backend)).count()
}

fn sleep_checked(d: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        interrupt::check()?;
        thread::sleep(Duration::from_millis(20).min(end.saturating_duration_since(Instant::now())));
    }
    Ok(())
}
