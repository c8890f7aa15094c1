//! What the control-plane tests share: a config writer for the settings the testbed's `config_toml`
//! does not know, backend servers that can be stopped and restarted, a client with short timeouts, a
//! paced load generator, and helpers around the CLI and `status --json`.

use std::{
    fmt::Debug,
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Output,
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use serde_json::Value;
use xdp_lb_testbed::{Daemon, Family, HttpServer, IdentityServers, Netns, Topology};

pub const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
pub const HTTP_PORT: u16 = 80;
/// The default checks (500 ms interval, 400 ms timeout, fall 3) promise detection within 2 s.
pub const DETECTION: Duration = Duration::from_secs(2);
/// Two shared cores run the daemon, the servers, the client and the other tests: allow some slack.
pub const MARGIN: Duration = Duration::from_millis(700);

/// One `[[services]]` table: `settings` are extra `key = value` lines, each backend comes with its
/// own extra lines (e.g. `weight = 3`, `backup = true`).
pub fn service_toml(name: &str, vip: SocketAddr, settings: &[&str], backends: &[(SocketAddr, &[&str])]) -> String {
    let mut out = format!("[[services]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\nmode = \"nat\"\n");
    for line in settings {
        out.push_str(line);
        out.push('\n');
    }
    for (address, extra) in backends {
        out.push_str(&format!("[[services.backends]]\naddress = \"{address}\"\n"));
        for line in *extra {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push('\n');
    out
}

pub fn backend_addr(topo: &Topology, i: usize) -> SocketAddr {
    topo.backend_socket(Family::V4, i, HTTP_PORT)
}

pub fn vip(topo: &Topology, port: u16) -> SocketAddr {
    topo.vip_socket(Family::V4, port)
}

pub fn start_daemon(topo: &Topology, config: &str) -> Daemon {
    Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), config)
        .unwrap_or_else(|e| panic!("starting xdp-lb with\n{config}\n{e:?}"))
}

/// HTTP identity servers (`backend-<i>` on port 80) that a test can stop, as if the process died,
/// and start again.
pub struct Servers<'t> {
    topo: &'t Topology,
    http: Vec<Option<HttpServer>>,
}

impl<'t> Servers<'t> {
    pub fn start_all(topo: &'t Topology) -> Servers<'t> {
        let mut servers = Servers { topo, http: (0..topo.backend_count()).map(|_| None).collect() };
        for i in 0..topo.backend_count() {
            servers.start(i);
        }
        servers
    }

    pub fn start(&mut self, i: usize) {
        assert!(self.http[i].is_none(), "backend-{i} is already serving");
        let addr = SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), HTTP_PORT);
        let server = HttpServer::start(self.topo.backend(i), addr, &IdentityServers::body(i))
            .unwrap_or_else(|e| panic!("starting backend-{i}: {e:?}"));
        self.http[i] = Some(server);
    }

    /// Closes the listener and every open connection: new SYNs get a RST from the backend's kernel.
    pub fn stop(&mut self, i: usize) {
        assert!(self.http[i].take().is_some(), "backend-{i} was not serving");
    }

    pub fn served(&self, i: usize) -> u64 {
        self.http[i].as_ref().map_or(0, HttpServer::served)
    }
}

pub fn body(i: usize) -> String {
    IdentityServers::body(i)
}

/// One `GET /` on a new connection with `timeout` on every step; returns the body. Call inside the
/// client namespace.
pub fn get(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    stream.write_all(format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut response = Vec::new();
    // The server closes after answering; the identity bodies are tiny.
    stream.take(64 * 1024).read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, format!("incomplete response {text:?}")))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("unexpected response {head:?}")));
    }
    Ok(body.to_string())
}

/// `n` sequential new connections from the client; the first failure is an error naming the attempt.
pub fn connections(client: &Netns, addr: SocketAddr, n: usize) -> Result<Vec<String>, String> {
    client.run(|| {
        (0..n).map(|i| get(addr, Duration::from_secs(2)).map_err(|e| format!("connection {} of {n}: {e}", i + 1))).collect()
    })
}

#[derive(Clone, Debug)]
pub struct Sample {
    /// When the connection was opened, from the start of the load.
    pub at: Duration,
    pub result: Result<String, String>,
}

/// A new connection every `period` (one request each, `timeout` per step) for at most `limit`.
pub struct PacedLoad<'a> {
    pub client: &'a Netns,
    pub addr: SocketAddr,
    pub period: Duration,
    pub timeout: Duration,
    pub limit: Duration,
}

impl PacedLoad<'_> {
    /// Runs until `stop` is set or `limit` has passed since `t0`; results land in `samples` as they
    /// come, so the caller can watch them.
    pub fn run(&self, t0: Instant, stop: &AtomicBool, samples: &Mutex<Vec<Sample>>) {
        self.client.run(|| {
            let max = (self.limit.as_millis() / self.period.as_millis().max(1)) as usize + 1;
            for i in 0..max {
                if stop.load(Ordering::Relaxed) || t0.elapsed() >= self.limit {
                    break;
                }
                let at = t0.elapsed();
                let result = get(self.addr, self.timeout).map_err(|e| e.to_string());
                samples.lock().unwrap().push(Sample { at, result });
                // Paced from the start rather than from the last answer, so slow answers do not
                // thin out the load.
                if let Some(wait) = (self.period * (i as u32 + 1)).checked_sub(t0.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        })
    }
}

pub fn cli(daemon: &Daemon, args: &[&str]) -> Output {
    daemon.cli(Path::new(XDP_LB), args).unwrap_or_else(|e| panic!("running xdp-lb {args:?}: {e:?}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn cli_ok(daemon: &Daemon, args: &[&str]) -> String {
    let out = cli(daemon, args);
    assert!(
        out.status.success(),
        "xdp-lb {args:?} failed ({}): {}\n--- xdp-lb stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        daemon.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that clap must refuse as a usage error (exit 2, its message naming `fragment`).
pub fn cli_usage_err(daemon: &Daemon, args: &[&str], fragment: &str) {
    let out = cli(daemon, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "xdp-lb {args:?} is a usage error; stderr:\n{stderr}");
    assert!(stderr.contains(fragment), "xdp-lb {args:?}: stderr does not mention {fragment:?}:\n{stderr}");
}

/// Runs a command that must fail with one `xdp-lb: error:` line mentioning `fragment`; returns it.
pub fn cli_err(daemon: &Daemon, args: &[&str], fragment: &str) -> String {
    let out = cli(daemon, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "xdp-lb {args:?} succeeded but should fail; stdout:\n{}", String::from_utf8_lossy(&out.stdout));
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("xdp-lb: error:")).collect();
    assert_eq!(errors.len(), 1, "xdp-lb {args:?}: expected one `xdp-lb: error:` line, stderr:\n{stderr}");
    assert!(
        errors[0].to_lowercase().contains(&fragment.to_lowercase()),
        "xdp-lb {args:?}: error {:?} does not mention {fragment:?}",
        errors[0]
    );
    errors[0].to_string()
}

pub fn json(daemon: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let stdout = cli_ok(daemon, &all);
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("xdp-lb {all:?} printed invalid JSON ({e}):\n{stdout}"))
}

/// The services of `status --json` (which also holds the config file's state).
pub fn status(daemon: &Daemon) -> Value {
    let mut whole = json(daemon, &["status"]);
    whole["services"].take()
}

pub fn service<'a>(status: &'a Value, name: &str) -> &'a Value {
    status
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no service {name} in status {status:#}"))
}

pub fn backend<'a>(status: &'a Value, name: &str, addr: SocketAddr) -> &'a Value {
    let s = service(status, name);
    s["backends"]
        .as_array()
        .and_then(|all| all.iter().find(|b| b["address"] == addr.to_string()))
        .unwrap_or_else(|| panic!("no backend {addr} in service {name}: {s:#}"))
}

/// Polls `status` until `ok` holds for it; returns how long that took. Panics after `timeout` with
/// the last status and the daemon's log.
pub fn wait_status(daemon: &Daemon, what: &str, timeout: Duration, mut ok: impl FnMut(&Value) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let s = status(daemon);
        if ok(&s) {
            return start.elapsed();
        }
        if start.elapsed() > timeout {
            panic!("{what}: not within {timeout:?}; last status:\n{s:#}\n--- xdp-lb stderr ---\n{}", daemon.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn tally(bodies: &[String]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    for b in bodies {
        *counts.entry(b.clone()).or_default() += 1;
    }
    counts
}

/// Unwraps, or panics with what was being done and the daemon's log so far.
pub fn check<T, E: Debug>(daemon: &Daemon, what: &str, result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("{what}: {e:?}\n--- xdp-lb stderr ---\n{}", daemon.log()))
}
