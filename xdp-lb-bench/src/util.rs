//! Helpers: packages, processes inside namespaces (killed on drop), wrk, interface and program counters.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde::Serialize;
use xdp_lb_testbed::Netns;

/// Debian packages the benchmarks run (package, a binary it provides).
pub const PACKAGES: &[&str] = &[
    "wrk",
    "haproxy",
    "nginx",
    "libnginx-mod-stream",
    "nftables",
    "netsniff-ng",
    "bpftool",
];

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs what is missing (idempotent: `apt-get update` only when something is).
pub fn ensure_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xdp-lb-bench: installing {}", missing.join(" "));
    let status = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .context("apt-get update")?;
    if !status.success() {
        bail!("apt-get update failed ({status})");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed ({status})", missing.join(" "));
    }
    Ok(())
}

/// A long-running process inside a namespace (`ip netns exec` execs it, so the pid is the program's):
/// SIGTERM on drop, SIGKILL if it lingers. The namespace guard kills anything left after that.
pub struct Proc {
    child: Child,
    pub what: String,
}

impl Proc {
    pub fn spawn(ns: &Netns, program: &str, args: &[&str], log: &Path) -> anyhow::Result<Proc> {
        let log_file = std::fs::File::create(log)?;
        let mut cmd = ns.command(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = ns.spawn(&mut cmd)?;
        Ok(Proc {
            child,
            what: format!("{program} in {}", ns.name()),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error (with the log) if the process already exited.
    pub fn check(&mut self, log: &Path) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}): {}",
                self.what,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts TCP connections from `ns`.
pub fn wait_listening(ns: &Netns, addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ok = ns.run(|| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
        });
        if ok {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "nothing listens on {addr} (seen from {}) after {timeout:?}",
                ns.name()
            );
        }
        xdp_lb_testbed::interrupt::check()?;
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP GET from `ns` that must answer with a backend's identity body.
pub fn check_http(ns: &Netns, addr: SocketAddr) -> anyhow::Result<String> {
    let mut last = None;
    for _ in 0..20 {
        match ns.run(|| xdp_lb_testbed::http_get(addr)) {
            Ok(body) if body.starts_with("backend-") => return Ok(body.trim().to_string()),
            Ok(body) => last = Some(anyhow::anyhow!("unexpected body {body:?}")),
            Err(e) => last = Some(e.into()),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let neigh = ns.ip(&["neigh", "show"]).unwrap_or_default();
    Err(last.unwrap()).with_context(|| {
        format!(
            "GET http://{addr}/ from {} (its neighbours: {})",
            ns.name(),
            neigh.replace('\n', "; ")
        )
    })
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Wrk {
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub requests: u64,
    /// Socket errors plus non-2xx/3xx answers.
    pub errors: u64,
}

pub struct WrkOptions<'a> {
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
    pub headers: &'a [String],
}

/// Runs wrk in `ns` against `url`, bounded by its duration plus a margin.
pub fn wrk(ns: &Netns, url: &str, opts: &WrkOptions) -> anyhow::Result<Wrk> {
    xdp_lb_testbed::interrupt::check()?;
    let secs = opts.duration.as_secs().max(1);
    let mut args: Vec<String> = vec![
        "-k".into(),
        "5".into(),
        format!("{}", secs + 20),
        "wrk".into(),
        "-t".into(),
        opts.threads.to_string(),
        "-c".into(),
        opts.connections.to_string(),
        "-d".into(),
        format!("{secs}s"),
        "--timeout".into(),
        "3s".into(),
        "--latency".into(),
    ];
    for h in opts.headers {
        args.push("-H".into());
        args.push(h.clone());
    }
    args.push(url.into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ns.exec("timeout", &argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "wrk {url} failed ({}): {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_wrk(&stdout).with_context(|| format!("parsing wrk output:\n{stdout}"))
}

fn latency_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.trim().parse::<f64>().ok().map(|v| v * mult)
}

pub fn parse_wrk(out: &str) -> anyhow::Result<Wrk> {
    let mut w = Wrk::default();
    for line in out.lines() {
        let t = line.trim();
        let words: Vec<&str> = t.split_whitespace().collect();
        if t.starts_with("Requests/sec:") {
            w.rps = words.get(1).context("rps")?.parse()?;
        } else if words.first() == Some(&"50%") {
            w.p50_ms = latency_ms(words.get(1).context("p50")?).context("p50 unit")?;
        } else if words.first() == Some(&"99%") {
            w.p99_ms = latency_ms(words.get(1).context("p99")?).context("p99 unit")?;
        } else if t.contains("requests in") {
            w.requests = words.first().context("requests")?.parse()?;
        } else if t.starts_with("Socket errors:") {
            // Socket errors: connect 0, read 0, write 0, timeout 0
            w.errors += t
                .trim_start_matches("Socket errors:")
                .split(',')
                .filter_map(|p| p.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if t.starts_with("Non-2xx or 3xx responses:") {
            w.errors += words.last().context("non-2xx")?.parse::<u64>()?;
        }
    }
    if w.rps == 0.0 {
        bail!("no Requests/sec line");
    }
    Ok(w)
}

/// rx/tx packet counters of an interface.
#[derive(Clone, Copy, Debug, Default)]
pub struct IfStats {
    pub rx: u64,
    pub tx: u64,
}

pub fn if_stats(ns: &Netns, iface: &str) -> anyhow::Result<IfStats> {
    let out = ns.ip(&["-j", "-s", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let s = &v[0]["stats64"];
    Ok(IfStats {
        rx: s["rx"]["packets"].as_u64().context("rx packets")?,
        tx: s["tx"]["packets"].as_u64().context("tx packets")?,
    })
}

/// Sum of the `ethtool -S` counters whose name ends with `suffix` (e.g. veth's `_xdp_tx`).
pub fn ethtool_stat(ns: &Netns, iface: &str, suffix: &str) -> anyhow::Result<u64> {
    let out = ns.exec_ok("ethtool", &["-S", iface])?;
    Ok(out
        .lines()
        .filter_map(|l| l.trim().split_once(':'))
        .filter(|(k, _)| k.trim().ends_with(suffix))
        .filter_map(|(_, v)| v.trim().parse::<u64>().ok())
        .sum())
}

pub fn mac(ns: &Netns, iface: &str) -> anyhow::Result<String> {
    let out = ns.ip(&["-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v[0]["address"].as_str().context("no MAC")?.to_string())
}

/// `aa:bb:cc:dd:ee:ff` as bytes.
pub fn parse_mac(s: &str) -> anyhow::Result<[u8; 6]> {
    let bytes: Vec<u8> = s
        .split(':')
        .map(|x| u8::from_str_radix(x, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("MAC address {s:?}"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("MAC address {s:?} does not have 6 bytes"))
}

/// Pids of the kernel's threaded-NAPI threads (`napi/<iface>-<id>`).
fn napi_threads() -> std::collections::BTreeSet<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Default::default() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| read_trim(&format!("/proc/{pid}/comm")).starts_with("napi/"))
        .collect()
}

/// Moves `iface`'s NAPI (in `ns`; it exists while an XDP program is attached to the veth) from
/// softirq context, where veth runs it on whichever CPU sent the frame, to a kernel thread of its
/// own, pinned to `cpu`: the receiving side then runs beside the sender instead of on its CPU, as
/// a NIC's interrupt would place it. Returns the threads' pids.
pub fn napi_on_cpu(ns: &Netns, iface: &str, cpu: u32, realtime: bool) -> anyhow::Result<Vec<u32>> {
    let before = napi_threads();
    // `ip netns exec` mounts the namespace's own /sys, where its interfaces are.
    ns.exec_ok("sh", &["-c", &format!("echo 1 > /sys/class/net/{iface}/threaded")])
        .with_context(|| format!("threaded NAPI for {iface} in {}", ns.name()))?;
    let prefix: String = format!("napi/{iface}-").chars().take(15).collect();
    let new: Vec<u32> = napi_threads()
        .difference(&before)
        .copied()
        .filter(|pid| read_trim(&format!("/proc/{pid}/comm")).starts_with(&prefix))
        .collect();
    if new.is_empty() {
        bail!("no napi/{iface} thread appeared in {} (is an XDP program attached?)", ns.name());
    }
    for &pid in &new {
        let out = Command::new("taskset").args(["-pc", &cpu.to_string(), &pid.to_string()]).output()?;
        if !out.status.success() {
            bail!("taskset -pc {cpu} {pid} (napi/{iface}): {}", String::from_utf8_lossy(&out.stderr));
        }
        if realtime {
            crate::generator::set_fifo(pid as i32).with_context(|| format!("napi/{iface}"))?;
        }
    }
    Ok(new)
}

/// The id of the XDP program attached to `iface` in `ns`.
pub fn xdp_prog_id(ns: &Netns, iface: &str) -> anyhow::Result<u32> {
    let out = ns.ip(&["-j", "-d", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let xdp = &v[0]["xdp"];
    if let Some(id) = xdp["prog"]["id"].as_u64() {
        return Ok(id as u32);
    }
    if let Some(list) = xdp["attached"].as_array() {
        if let Some(id) = list.iter().find_map(|a| a["prog"]["id"].as_u64()) {
            return Ok(id as u32);
        }
    }
    bail!("no XDP program on {iface} in {}: {xdp}", ns.name())
}

/// (run_time_ns, run_cnt) of a loaded program (needs kernel.bpf_stats_enabled=1).
pub fn prog_stats(id: u32) -> anyhow::Result<(u64, u64)> {
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok((info.run_time().as_nanos() as u64, info.run_count()));
        }
    }
    bail!("no loaded program with id {id}")
}

/// Sends `count` packets out of `ns`'s eth0 with trafgen pinned to `cpu`. `conf` writes the
/// configuration for the packets still to send, given how many went out already (so a packet
/// stream that must not repeat, like new flows' source addresses, continues where it stopped).
/// Bounded: each attempt by a timeout, and at most 20 attempts. Returns the seconds it took.
pub fn trafgen(
    ns: &Netns,
    conf_path: &Path,
    count: u64,
    cpu: u32,
    mut conf: impl FnMut(u64) -> anyhow::Result<String>,
) -> anyhow::Result<f64> {
    let before = if_stats(ns, "eth0")?.tx;
    let started = Instant::now();
    // trafgen gives up when the veth pushes back at the wrong moment ("Flushing TX_RING failed"):
    // send what is left again, a bounded number of times.
    let mut attempts = 0;
    loop {
        let sent = if_stats(ns, "eth0")?.tx.saturating_sub(before);
        if sent >= count {
            break;
        }
        attempts += 1;
        std::fs::write(conf_path, conf(sent)?)?;
        let remaining = count - sent;
        let limit = (remaining / 50_000 + 30).to_string();
        let (conf_s, num, cpu_s) = (conf_path.display().to_string(), remaining.to_string(), cpu.to_string());
        let out = ns.exec(
            "timeout",
            &[
                "-k", "5", &limit, "taskset", "-c", &cpu_s, "trafgen", "--dev", "eth0", "--conf", &conf_s, "--num",
                &num, "--cpus", "1", "--qdisc-path", "--no-sock-mem", "--notouch-irq", "--no-cpu-stats",
            ],
        )?;
        if !out.status.success()
            && (attempts >= 20 || out.status.code() == Some(124) || out.status.code() == Some(137))
        {
            bail!(
                "trafgen failed ({}) after {attempts} attempts: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        xdp_lb_testbed::interrupt::check()?;
        if out.status.success() {
            break;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Sum of VmRSS (KiB) over every process in `ns`.
pub fn rss_kib_in(ns: &Netns) -> u64 {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
    else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .map(rss_kib)
        .sum()
}

/// CPU time (user + system, seconds) consumed so far by every process in `ns`.
pub fn cpu_secs_in(ns: &Netns) -> f64 {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", ns.name()])
        .output()
    else {
        return 0.0;
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may contain spaces) start at the last ')'.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime + stime) / hz)
        })
        .sum()
}

pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|n| n.parse().ok()))
        })
        .unwrap_or(0)
}

pub fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk() {
        let out = "Running 2s test @ http://10.200.100.100/\n  2 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   420.00us  100.00us   5.00ms   90.00%\n  Latency Distribution\n     50%  400.00us\n     75%  450.00us\n     90%  500.00us\n     99%    1.20ms\n  70000 requests in 2.00s, 10.00MB read\n  Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 4\nRequests/sec:  35000.00\nTransfer/sec:      5.00MB\n";
        let w = parse_wrk(out).unwrap();
        assert_eq!(w.rps, 35000.0);
        assert!((w.p50_ms - 0.4).abs() < 1e-9);
        assert!((w.p99_ms - 1.2).abs() < 1e-9);
        assert_eq!(w.requests, 70000);
        assert_eq!(w.errors, 10);
    }
}
