//! L7: l7-sidecar (plain, and with JWT + rate limiting) vs nginx and HAProxy as HTTP reverse proxies.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context};

use crate::{
    configs,
    report::{L7Row, Report, Target},
    util::{self, Proc, Wrk},
    Bench, L7_PORT,
};

/// One GET with extra headers; returns the status line and the body's start.
fn get_with(b: &Bench, addr: SocketAddr, headers: &[String]) -> anyhow::Result<(String, String)> {
    let req = format!(
        "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{}\r\n",
        headers
            .iter()
            .map(|h| format!("{h}\r\n"))
            .collect::<String>()
    );
    b.client().run(|| -> anyhow::Result<(String, String)> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        s.write_all(req.as_bytes())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text.lines().next().unwrap_or_default().to_string();
        let body = text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        Ok((status, body))
    })
}

fn wait_ready(b: &Bench, p: &mut Proc, log: &Path, addr: SocketAddr) -> anyhow::Result<()> {
    util::wait_listening(b.client(), addr, Duration::from_secs(15)).with_context(|| {
        format!(
            "{}: {}",
            p.what,
            std::fs::read_to_string(log).unwrap_or_default()
        )
    })?;
    p.check(log)
}

fn measure(
    b: &Bench,
    name: &str,
    mut p: Proc,
    log: &Path,
    addr: SocketAddr,
    headers: &[String],
    new_conn: bool,
) -> anyhow::Result<L7Row> {
    wait_ready(b, &mut p, log, addr)?;
    let (status, body) = get_with(b, addr, headers)?;
    if !status.contains(" 200") || !body.starts_with("backend-") {
        bail!(
            "{name}: GET / answered {status:?} {body:?}; log: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    if !headers.is_empty() {
        // Without the token it must refuse: the auth stage is really on.
        let (status, _) = get_with(b, addr, &[])?;
        if !status.contains(" 401") {
            bail!("{name}: a request without a token answered {status:?}, expected 401");
        }
    }
    let url = format!("http://{addr}/");
    let cpu0 = util::cpu_secs_in(b.lb());
    let w = util::wrk(b.client(), &url, &b.wrk_opts(headers))?;
    let cpu = util::cpu_secs_in(b.lb()) - cpu0;
    let rss = util::rss_kib_in(b.lb());
    let cpu_us_per_request = if w.requests > 0 {
        cpu * 1e6 / w.requests as f64
    } else {
        0.0
    };
    eprintln!("  {name}: {:.0} req/s p50 {:.3} ms p99 {:.3} ms errors {} RSS {} KiB, {:.0} µs CPU/request", w.rps, w.p50_ms, w.p99_ms, w.errors, rss, cpu_us_per_request);
    let new_conn = if new_conn {
        let close: Vec<String> = headers.iter().cloned().chain(["Connection: close".to_string()]).collect();
        let c = util::wrk(b.client(), &url, &b.wrk_opts(&close))?;
        eprintln!("  {name}, new connection per request: {:.0} req/s p50 {:.3} ms p99 {:.3} ms errors {}", c.rps, c.p50_ms, c.p99_ms, c.errors);
        Some(c)
    } else {
        None
    };
    p.check(log)?;
    drop(p);
    std::thread::sleep(Duration::from_secs(1));
    Ok(L7Row {
        name: name.to_string(),
        key: String::new(),
        wrk: Some(w),
        new_conn,
        rss_kib: rss,
        cpu_us_per_request,
        note: String::new(),
    })
}

pub fn run(b: &Bench, r: &mut Report) -> anyhow::Result<()> {
    let addr = SocketAddr::new(b.topo.lb_addr_v4().into(), L7_PORT);
    let listen = addr.to_string();
    let backends = b.backend_addrs();
    let sidecar = std::fs::canonicalize(&b.args.l7_sidecar)?;
    let sidecar = sidecar.display().to_string();
    let token = configs::jwt()?;
    let auth_headers = [format!("Authorization: Bearer {token}")];

    let plain = b.args.l7_sidecar_plain.as_ref().map(|p| p.display().to_string());
    let mut contenders: Vec<(&str, &str)> = vec![
        ("l7_sidecar", "l7-sidecar"),
        ("l7_sidecar_auth", "l7-sidecar + JWT + rate limit"),
        ("nginx", "nginx (proxy_pass, upstream keepalive, 2 workers)"),
        ("haproxy", "HAProxy (mode http, 2 threads)"),
    ];
    if plain.is_some() {
        // Then the first row is the shipped build (`cargo xtask dist`): profile-guided.
        contenders[0].1 = "l7-sidecar (shipped build: profile-guided)";
        contenders.insert(1, ("l7_sidecar_plain", "l7-sidecar, plain release build (no PGO)"));
    }
    let rounds = b.args.l7_rounds.max(1);
    let mut all: Vec<L7Row> = Vec::new();
    for round in 0..rounds {
        eprintln!("  round {}/{rounds}", round + 1);
        let new_conn = round < b.args.l7_new_conn_rounds;
        for &(key, name) in &in_round_order(&contenders, round) {
            let res = (|| -> anyhow::Result<L7Row> {
                let log = b.dir().join(format!("l7-{key}.log"));
                match key {
                    "l7_sidecar" | "l7_sidecar_auth" | "l7_sidecar_plain" => {
                        let auth = key == "l7_sidecar_auth";
                        let sidecar = match (key, &plain) {
                            ("l7_sidecar_plain", Some(p)) => p,
                            _ => &sidecar,
                        };
                        let cfg = b.dir().join(format!("{key}.toml"));
                        std::fs::write(&cfg, configs::l7_sidecar(&listen, &backends, auth))?;
                        let cfg_s = cfg.display().to_string();
                        let check = b.lb().exec(sidecar, &["--config", &cfg_s, "--check"])?;
                        if !check.status.success() {
                            bail!(
                                "l7-sidecar --check refused the config: {}{}",
                                String::from_utf8_lossy(&check.stdout),
                                String::from_utf8_lossy(&check.stderr)
                            );
                        }
                        let workers = configs::L7_WORKERS.to_string();
                        let p = Proc::spawn(
                            b.lb(),
                            sidecar,
                            &["--config", &cfg_s, "--workers", &workers],
                            &log,
                        )?;
                        let headers: &[String] = if auth { &auth_headers } else { &[] };
                        measure(b, name, p, &log, addr, headers, new_conn)
                    }
                    "nginx" => {
                        let cfg = b.dir().join("nginx-http.conf");
                        std::fs::write(&cfg, configs::nginx_http(b.dir(), &listen, &backends))?;
                        let err = b.dir().join("nginx-http.early.err").display().to_string();
                        let p = Proc::spawn(
                            b.lb(),
                            "nginx",
                            &["-e", &err, "-c", &cfg.display().to_string()],
                            &log,
                        )?;
                        measure(b, name, p, &log, addr, &[], new_conn)
                    }
                    _ => {
                        let cfg = b.dir().join("haproxy-http.cfg");
                        std::fs::write(&cfg, configs::haproxy("http", &listen, &backends))?;
                        let p = Proc::spawn(
                            b.lb(),
                            "haproxy",
                            &["-db", "-f", &cfg.display().to_string()],
                            &log,
                        )?;
                        measure(b, name, p, &log, addr, &[], new_conn)
                    }
                }
            })();
            match res {
                Ok(mut row) => {
                    row.key = key.into();
                    all.push(row);
                }
                Err(e) => {
                    eprintln!("  {name}: failed: {e:#}");
                    all.push(L7Row {
                        name: name.into(),
                        key: key.into(),
                        wrk: None,
                        new_conn: None,
                        rss_kib: 0,
                        cpu_us_per_request: 0.0,
                        note: format!("failed: {e:#}"),
                    });
                }
            }
        }
    }
    for &(key, name) in &contenders {
        let rounds_of: Vec<&L7Row> = all.iter().filter(|r| r.key == key).collect();
        let mut row = summarize(&rounds_of);
        row.name = name.into();
        row.key = key.into();
        r.l7.push(row);
    }
    Ok(())
}

/// The contenders in the order round `round` runs them: each round starts one further
/// along, so none always runs first (right after the previous round's last proxy let
/// go of its connections) or always last. In a fixed order the shipped build, always
/// first, measured 15 % below the same binary with auth added, third.
fn in_round_order<T: Copy>(contenders: &[T], round: u32) -> Vec<T> {
    let mut order = contenders.to_vec();
    if !order.is_empty() {
        let by = round as usize % order.len();
        order.rotate_left(by);
    }
    order
}

/// One contender's rounds as one row: each measured column (req/s, p50, p99, CPU per
/// request) the median of its successful rounds on its own, RSS the largest seen.
/// Taken from one "median round" instead, p99 was whatever that round's tail
/// happened to be: on this shared machine one round's p99 varies by 2× or more.
/// No successful round: the first failure's note.
fn summarize(rounds: &[&L7Row]) -> L7Row {
    let ok: Vec<&Wrk> = rounds.iter().filter_map(|r| r.wrk.as_ref()).collect();
    let failed: Vec<&&L7Row> = rounds.iter().filter(|r| r.wrk.is_none()).collect();
    let first = rounds.first();
    let mut row = L7Row {
        name: first.map(|r| r.name.clone()).unwrap_or_default(),
        key: first.map(|r| r.key.clone()).unwrap_or_default(),
        wrk: None,
        new_conn: None,
        rss_kib: 0,
        cpu_us_per_request: 0.0,
        note: String::new(),
    };
    let mut notes = Vec::new();
    if !ok.is_empty() {
        row.wrk = Some(median_wrk(&ok));
        row.cpu_us_per_request = median_of(
            rounds.iter().filter(|r| r.wrk.is_some()).map(|r| r.cpu_us_per_request).collect(),
        );
        row.rss_kib = rounds.iter().map(|r| r.rss_kib).max().unwrap_or(0);
        if ok.len() > 1 {
            let rps: Vec<f64> = ok.iter().map(|w| w.rps.round()).collect();
            let p99: Vec<f64> = ok.iter().map(|w| (w.p99_ms * 100.0).round() / 100.0).collect();
            notes.push(format!("rounds req/s {rps:?}, p99 ms {p99:?}"));
        }
    }
    let new_conn: Vec<&Wrk> = rounds.iter().filter_map(|r| r.new_conn.as_ref()).collect();
    if !new_conn.is_empty() {
        row.new_conn = Some(median_wrk(&new_conn));
        let rps: Vec<f64> = new_conn.iter().map(|w| w.rps.round()).collect();
        notes.push(format!("new-conn rounds req/s {rps:?}"));
    }
    if let Some(f) = failed.first() {
        notes.push(if ok.is_empty() {
            f.note.clone()
        } else {
            format!("{} failed round(s): {}", failed.len(), f.note)
        });
    }
    row.note = notes.join("; ");
    row
}

/// Rounds of one wrk measurement as one: each latency/rate column the median of its
/// own, requests and errors summed.
fn median_wrk(rounds: &[&Wrk]) -> Wrk {
    let median = |f: fn(&Wrk) -> f64| median_of(rounds.iter().map(|w| f(w)).collect());
    Wrk {
        rps: median(|w| w.rps),
        p50_ms: median(|w| w.p50_ms),
        p99_ms: median(|w| w.p99_ms),
        requests: rounds.iter().map(|w| w.requests).sum(),
        errors: rounds.iter().map(|w| w.errors).sum(),
    }
}

fn median_of(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Issue 10 §3's targets, judged on the rows of one run: keep-alive req/s at least
/// nginx's and HAProxy's with p99 no worse, JWT + rate limiting costing at most
/// 15 % of req/s, RSS at most nginx's. CPU per request is shown beside each
/// (on 2 shared cores it decides req/s, and it varies less than req/s).
pub fn targets(rows: &[L7Row]) -> Vec<Target> {
    let get = |key: &str| rows.iter().find(|r| r.key == key && r.wrk.is_some());
    let side = get("l7_sidecar");
    let mut t = Vec::new();
    for (key, name) in [("nginx", "nginx"), ("haproxy", "HAProxy")] {
        let (value, met) = match (side, get(key)) {
            (Some(s), Some(o)) => {
                let (sw, ow) = (s.wrk.as_ref().unwrap(), o.wrk.as_ref().unwrap());
                (
                    format!(
                        "{:.2}× req/s ({:.0} vs {:.0}); p99 {:.2} vs {:.2} ms; CPU {:.1} vs {:.1} µs/request",
                        sw.rps / ow.rps,
                        sw.rps,
                        ow.rps,
                        sw.p99_ms,
                        ow.p99_ms,
                        s.cpu_us_per_request,
                        o.cpu_us_per_request
                    ),
                    Some(sw.rps >= ow.rps && sw.p99_ms <= ow.p99_ms),
                )
            }
            _ => ("not measured".into(), None),
        };
        t.push(Target {
            target: format!("l7-sidecar keep-alive req/s ≥ 1.0× {name} with p99 no worse"),
            value,
            met,
        });
    }
    let (value, met) = match (side, get("l7_sidecar_auth")) {
        (Some(s), Some(a)) => {
            let (sw, aw) = (s.wrk.as_ref().unwrap(), a.wrk.as_ref().unwrap());
            let cost = 1.0 - aw.rps / sw.rps;
            (
                format!(
                    "{:.1} % fewer req/s; CPU {:.1} vs {:.1} µs/request",
                    cost * 100.0,
                    a.cpu_us_per_request,
                    s.cpu_us_per_request
                ),
                Some(cost <= 0.15),
            )
        }
        _ => ("not measured".into(), None),
    };
    t.push(Target {
        target: "JWT auth + rate limiting cost ≤ 15 % of req/s".into(),
        value,
        met,
    });
    let (value, met) = match (side, get("nginx")) {
        (Some(s), Some(n)) => (
            format!(
                "{:.1} vs {:.1} MiB",
                s.rss_kib as f64 / 1024.0,
                n.rss_kib as f64 / 1024.0
            ),
            Some(s.rss_kib <= n.rss_kib),
        ),
        _ => ("not measured".into(), None),
    };
    t.push(Target {
        target: "l7-sidecar RSS ≤ nginx's".into(),
        value,
        met,
    });
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, rps: f64, p99_ms: f64, rss_kib: u64) -> L7Row {
        L7Row {
            name: key.into(),
            key: key.into(),
            wrk: Some(Wrk {
                rps,
                p50_ms: p99_ms / 2.0,
                p99_ms,
                requests: rps as u64 * 8,
                errors: 0,
            }),
            new_conn: None,
            rss_kib,
            cpu_us_per_request: 1e6 / rps,
            note: String::new(),
        }
    }

    fn met(t: &[Target], words: &str) -> Option<bool> {
        t.iter()
            .find(|t| t.target.contains(words))
            .unwrap_or_else(|| panic!("no target with {words:?}"))
            .met
    }

    #[test]
    fn targets_are_the_issues_and_each_is_judged_on_its_own() {
        let rows = [
            row("l7_sidecar", 20_000.0, 3.0, 20_000),
            // Equal req/s meets 1.0×, but a worse p99 misses.
            row("nginx", 20_000.0, 2.9, 22_000),
            row("haproxy", 19_000.0, 3.5, 30_000),
            row("l7_sidecar_auth", 17_100.0, 3.2, 21_000),
        ];
        let t = targets(&rows);
        assert_eq!(t.len(), 4);
        assert_eq!(met(&t, "1.0× nginx"), Some(false));
        assert_eq!(met(&t, "1.0× HAProxy"), Some(true));
        // 14.5 % fewer req/s.
        assert_eq!(met(&t, "JWT"), Some(true));
        assert_eq!(met(&t, "RSS"), Some(true));
        assert!(
            t[0].value.contains("CPU 50.0 vs 50.0 µs/request"),
            "{}",
            t[0].value
        );
    }

    #[test]
    fn every_contender_takes_each_place_in_turn() {
        let c = ["a", "b", "c"];
        assert_eq!(in_round_order(&c, 0), ["a", "b", "c"]);
        assert_eq!(in_round_order(&c, 1), ["b", "c", "a"]);
        assert_eq!(in_round_order(&c, 2), ["c", "a", "b"]);
        assert_eq!(in_round_order(&c, 3), ["a", "b", "c"]);
        assert!(in_round_order::<&str>(&[], 4).is_empty());
    }

    #[test]
    fn each_column_is_the_median_of_its_own_rounds() {
        let rounds = [
            row("l7_sidecar", 30_000.0, 9.0, 100),
            row("l7_sidecar", 20_000.0, 3.0, 300),
            row("l7_sidecar", 25_000.0, 4.0, 200),
        ];
        let mut failed = row("l7_sidecar", 1.0, 1.0, 999);
        failed.wrk = None;
        failed.note = "failed: boom".into();
        let refs: Vec<&L7Row> = rounds.iter().chain([&failed]).collect();
        let s = summarize(&refs);
        let w = s.wrk.as_ref().expect("measured");
        // The median req/s round (25k) had p99 4.0, the median p99 is 4.0 too; but the
        // fastest round's 9 ms tail no longer decides anything on its own.
        assert_eq!((w.rps, w.p99_ms), (25_000.0, 4.0));
        assert_eq!(s.cpu_us_per_request, 1e6 / 25_000.0);
        assert_eq!(s.rss_kib, 999, "the largest RSS seen, failed rounds too");
        assert!(s.note.contains("1 failed round(s): failed: boom"), "{}", s.note);
        // Medians of an even count: the mean of the middle two.
        let two = [row("x", 10.0, 1.0, 1), row("x", 20.0, 3.0, 1)];
        let s = summarize(&two.iter().collect::<Vec<_>>());
        assert_eq!(s.wrk.as_ref().map(|w| (w.rps, w.p99_ms)), Some((15.0, 2.0)));
        // Nothing measured: the failure's note, no numbers.
        let s = summarize(&[&failed]);
        assert!(s.wrk.is_none());
        assert_eq!(s.note, "failed: boom");
    }

    /// New connections are measured in the first rounds only: their column is the
    /// median of the rounds that have them, not diluted by the others.
    #[test]
    fn the_new_connection_column_is_the_median_of_the_rounds_that_measured_it() {
        let with = |rps: f64, close_rps: f64| {
            let mut r = row("l7_sidecar", rps, 2.0, 1);
            r.new_conn = Some(Wrk { rps: close_rps, p50_ms: 1.0, p99_ms: close_rps / 1000.0, requests: 10, errors: 1 });
            r
        };
        let rounds = [with(30_000.0, 9_000.0), with(31_000.0, 11_000.0), with(29_000.0, 10_000.0), row("l7_sidecar", 32_000.0, 2.0, 1)];
        let s = summarize(&rounds.iter().collect::<Vec<_>>());
        let c = s.new_conn.as_ref().expect("measured in three rounds");
        assert_eq!((c.rps, c.p99_ms, c.requests, c.errors), (10_000.0, 10.0, 30, 3));
        assert!(s.note.contains("new-conn rounds req/s [9000.0, 11000.0, 10000.0]"), "{}", s.note);
        assert!(summarize(&[&rounds[3]]).new_conn.is_none(), "no round measured it");
    }

    #[test]
    fn a_failed_contender_leaves_its_targets_unjudged() {
        let mut failed = row("nginx", 1.0, 1.0, 1);
        failed.wrk = None;
        let t = targets(&[row("l7_sidecar", 10.0, 1.0, 1), failed]);
        assert_eq!(met(&t, "1.0× nginx"), None);
        assert_eq!(met(&t, "RSS"), None);
        assert_eq!(met(&t, "JWT"), None);
    }
}
