//! The daemon's API and process edges against the real daemon in a namespace testbed: bounded
//! requests and clients, plain logs off a terminal, a quiet stop, one daemon per pin directory, and
//! updates that would break connections. Needs root.

#[path = "control/support.rs"]
#[allow(dead_code)]
mod support;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use support::*;
use xdp_lb_testbed::Topology;

/// Far beyond the daemon's 1 MiB line limit.
const OVERSIZED: usize = 64 << 20;
/// What the daemon may grow by while refusing it (its buffers are bounded by the limit).
const RSS_SLACK_KB: u64 = 16 * 1024;
const MAX_CLIENTS: usize = 32;

/// `VmRSS` (resident now) or `VmHWM` (the peak so far) of a process, in kB.
fn memory_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the daemon's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field).and_then(|v| v.strip_prefix(':')))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in\n{status}"))
}

/// `xdp-lb run` started by the test itself (not the testbed's helper, which sets NO_COLOR and strips
/// escapes), with stdout and stderr in files; killed on drop.
struct RawDaemon {
    child: Child,
    dir: PathBuf,
}

impl RawDaemon {
    fn start(topo: &Topology, tag: &str, config: &str) -> RawDaemon {
        let dir = std::env::temp_dir().join(format!("xdp-lb-api-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("xdp-lb.toml"), config).unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", topo.lb().name(), XDP_LB]).arg("--socket").arg(dir.join("api.sock"));
        cmd.arg("run").arg("--config").arg(dir.join("xdp-lb.toml")).arg("--no-pin");
        for iface in topo.lb_ifaces() {
            cmd.args(["--iface", iface.as_ref()]);
        }
        cmd.env_remove("NO_COLOR").env("RUST_LOG", "info").stdin(Stdio::null());
        cmd.stdout(std::fs::File::create(dir.join("stdout")).unwrap());
        cmd.stderr(std::fs::File::create(dir.join("stderr")).unwrap());
        let child = cmd.spawn().expect("spawning xdp-lb run");
        let daemon = RawDaemon { child, dir };
        let start = Instant::now();
        while !daemon.stderr().contains("xdp-lb ready") {
            assert!(start.elapsed() < Duration::from_secs(20), "not ready in 20 s:\n{}", daemon.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        daemon
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default()
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(XDP_LB).arg("--socket").arg(self.socket()).args(args).output().expect("running xdp-lb")
    }

    /// SIGTERM, then waits (bounded) for the exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let killed = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().expect("kill");
        assert!(killed.success());
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for xdp-lb") {
                return status;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "still running 10 s after SIGTERM:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RawDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn answer_of(stream: &UnixStream) -> serde_json::Value {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("reading the daemon's answer");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("answer {line:?}: {e}"))
}

#[test]
fn requests_and_clients_are_bounded_logs_are_plain_and_stop_is_quiet() {
    let topo = Topology::new("apilim", 1).expect("building the testbed");
    let backends = [(backend_addr(&topo, 0), &[][..])];
    let mut daemon = RawDaemon::start(&topo, "limits", &service_toml("web", vip(&topo, 80), &[], &backends));
    let pid = daemon.child.id();

    // Plain text in a file: no escape sequences although NO_COLOR is unset.
    assert!(!daemon.stderr().contains('\x1b'), "colours in a log file:\n{:?}", daemon.stderr());

    // An oversized request line: an error answer, and the daemon does not buffer it.
    // The peak, not only the resident size after: a daemon that buffered the whole line and then
    // dropped it would look fine afterwards.
    let (before, peak_before) = (memory_kb(pid, "VmRSS"), memory_kb(pid, "VmHWM"));
    let stream = UnixStream::connect(daemon.socket()).expect("connecting");
    let writer = {
        let mut stream = stream.try_clone().unwrap();
        stream.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        std::thread::spawn(move || {
            let chunk = vec![b'x'; 1 << 20];
            // Stops at the first error: the daemon closes once it has refused the line.
            (0..OVERSIZED / chunk.len()).take_while(|_| stream.write_all(&chunk).is_ok()).count()
        })
    };
    let answer = answer_of(&stream);
    let written_mib = writer.join().unwrap();
    let (after, peak_after) = (memory_kb(pid, "VmRSS"), memory_kb(pid, "VmHWM"));
    let grew = format!("VmRSS {before} -> {after} kB, VmHWM {peak_before} -> {peak_after} kB ({written_mib} MiB written)");
    eprintln!("oversized request: {grew}");
    assert!(after < before + RSS_SLACK_KB && peak_after < peak_before.max(before) + RSS_SLACK_KB, "{grew}");
    assert_eq!(answer["ok"], false, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    assert!(error.contains("longer than") && error.contains("1048576"), "{answer}");
    let out = daemon.cli(&["status"]);
    assert!(out.status.success(), "the daemon still serves: {}", String::from_utf8_lossy(&out.stderr));

    // More clients than the daemon serves at once: the extra one is told so immediately.
    let idle: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| UnixStream::connect(daemon.socket()).expect("connecting")).collect();
    let extra = UnixStream::connect(daemon.socket()).expect("connecting");
    // The daemon may answer "busy" and close before the request is written (CI: EPIPE here); the
    // answer is readable either way.
    let _ = (&extra).write_all(b"{\"command\":\"status\"}\n");
    let answer = answer_of(&extra);
    assert_eq!(answer["ok"], false, "{answer}");
    assert!(answer["error"].as_str().unwrap_or_default().contains("busy"), "{answer}");
    drop(idle);
    let start = Instant::now();
    while !daemon.cli(&["status"]).status.success() {
        assert!(start.elapsed() < Duration::from_secs(10), "slots are not given back");
        std::thread::sleep(Duration::from_millis(100));
    }

    // SIGTERM: a summary line in the log, nothing on stdout.
    let status = daemon.terminate();
    assert!(status.success(), "exit after SIGTERM: {status}\n{}", daemon.stderr());
    assert_eq!(daemon.stdout(), "", "stdout after SIGTERM");
    assert!(daemon.stderr().contains("xdp-lb stopped"), "no summary line:\n{}", daemon.stderr());
    let mut rest = String::new();
    let _ = std::fs::File::open(daemon.dir.join("stderr")).unwrap().read_to_string(&mut rest);
    assert!(!rest.contains('\x1b'), "colours in the log:\n{rest:?}");
}

#[test]
fn a_second_daemon_on_the_same_pins_is_refused_and_disruptive_updates_need_force() {
    let topo = Topology::new("apipin", 2).expect("building the testbed");
    let backends: Vec<_> = (0..2).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &backends));

    let other_socket = std::env::temp_dir().join(format!("xdp-lb-api-{}-second.sock", std::process::id()));
    let mut cmd = Command::new("timeout");
    cmd.args(["20", "ip", "netns", "exec", topo.lb().name(), XDP_LB]).arg("--socket").arg(&other_socket);
    cmd.arg("run").arg("--config").arg(daemon.config_path()).arg("--bpffs").arg(daemon.pin_dir());
    for iface in topo.lb_ifaces() {
        cmd.args(["--iface", iface.as_ref()]);
    }
    let out = cmd.env("NO_COLOR", "1").output().expect("running a second xdp-lb");
    let _ = std::fs::remove_file(&other_socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the second daemon must exit with an error:\n{stderr}");
    assert!(stderr.contains("another xdp-lb daemon is running") && stderr.contains("--bpffs"), "stderr:\n{stderr}");
    assert!(stderr.contains(&daemon.pin_dir().display().to_string()), "names the pin dir:\n{stderr}");
    cli_ok(&daemon, &["status"]);

    // Changes that break established connections are refused without --force, and change nothing.
    let before = json(&daemon, &["service", "list"]);
    let err = cli_err(&daemon, &["service", "update", "web", "--mode", "dsr"], "--force");
    assert!(err.contains("loopback"), "{err}");
    let err = cli_err(&daemon, &["service", "update", "web", "--vip", &vip(&topo, 81).to_string()], "--force");
    assert!(err.contains("established"), "{err}");
    cli_err(&daemon, &["service", "update", "web", "--protocol", "udp"], "--force");
    assert_eq!(json(&daemon, &["service", "list"]), before, "a refused update changed the service");
    // A no-op "update" to the current values breaks nothing.
    cli_ok(&daemon, &["service", "update", "web", "--mode", "nat", "--vip", &vip(&topo, 80).to_string()]);
    cli_ok(&daemon, &["service", "update", "web", "--mode", "dsr", "--force"]);
    assert_eq!(json(&daemon, &["service", "list"])[0]["mode"], "dsr");
    assert!(daemon.log().contains("forced"), "the daemon logs a forced change:\n{}", daemon.log());
}

/// Clients that send a request and never read the answer hold a slot only until the write times
/// out, not forever: an answer larger than the socket buffer (a status of 1,500 backends, ~400 kB)
/// blocks the daemon's write.
#[test]
fn clients_that_never_read_their_answer_give_their_slot_back() {
    const BACKENDS: u16 = 1500;
    let topo = Topology::new("apislow", 1).expect("building the testbed");
    let ip = backend_addr(&topo, 0).ip();
    let backends: Vec<_> = (0..BACKENDS).map(|i| (std::net::SocketAddr::new(ip, 1000 + i), &[][..])).collect();
    let settings = ["[services.health_check]", "kind = \"none\""];
    let daemon = RawDaemon::start(&topo, "slow", &service_toml("web", vip(&topo, 80), &settings, &backends));
    let out = daemon.cli(&["--json", "status"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.stdout.len() > 300_000, "the answer must exceed the socket buffer: {} bytes", out.stdout.len());

    let silent: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| {
            let s = UnixStream::connect(daemon.socket()).expect("connecting");
            (&s).write_all(b"{\"command\":\"status\"}\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let out = daemon.cli(&["status"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("busy"), "all slots are taken by now");
    // The daemon gives up on them after its 5 s timeout, although they are still connected.
    let start = Instant::now();
    loop {
        let out = daemon.cli(&["status"]);
        if out.status.success() {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "slots still held after {:?}: {}", start.elapsed(), String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("slots back after {:?}", start.elapsed());
    drop(silent);
}

/// Issue 9: a second daemon refused because its --socket is in use must leave nothing pinned in
/// its own --bpffs (the socket is checked before anything is loaded).
#[test]
fn a_second_daemon_refused_for_its_socket_pins_nothing() {
    let topo = Topology::new("apisock", 1).expect("building the testbed");
    let backends: Vec<_> = (0..1).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &backends));

    // On the testbed's bpffs (ip netns exec hides /sys/fs/bpf), next to the first daemon's pins.
    let other_pins = daemon.pin_dir().with_file_name(format!("xdp-lb-api-{}-second", std::process::id()));
    let _ = std::fs::create_dir_all(&other_pins);
    let mut cmd = Command::new("timeout");
    cmd.args(["20", "ip", "netns", "exec", topo.lb().name(), XDP_LB]).arg("--socket").arg(daemon.socket());
    cmd.arg("run").arg("--config").arg(daemon.config_path()).arg("--bpffs").arg(&other_pins);
    for iface in topo.lb_ifaces() {
        cmd.args(["--iface", iface.as_ref()]);
    }
    let out = cmd.env("NO_COLOR", "1").output().expect("running a second xdp-lb");
    let left: Vec<_> = std::fs::read_dir(&other_pins).map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect()).unwrap_or_default();
    xdp_lb_testbed::daemon::remove_pins(&other_pins);
    let _ = std::fs::remove_dir(&other_pins);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the second daemon must exit with an error:\n{stderr}");
    assert!(stderr.contains("another xdp-lb daemon is serving"), "stderr:\n{stderr}");
    assert!(left.is_empty(), "the refused daemon left pins in {}: {left:?}", other_pins.display());
    // The first daemon's socket is still there and answers.
    cli_ok(&daemon, &["status"]);
}

/// Hostile 9 H10: a second daemon (own socket, no pins) on an interface the first one holds is
/// refused because the interface is busy; it does not claim native XDP is unavailable.
#[test]
fn a_second_daemon_on_a_busy_interface_says_it_is_busy() {
    let topo = Topology::new("apibusy", 1).expect("building the testbed");
    let backends: Vec<_> = (0..1).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &backends));

    let other_socket = std::env::temp_dir().join(format!("xdp-lb-api-{}-busy.sock", std::process::id()));
    let mut cmd = Command::new("timeout");
    cmd.args(["20", "ip", "netns", "exec", topo.lb().name(), XDP_LB]).arg("--socket").arg(&other_socket);
    cmd.arg("run").arg("--config").arg(daemon.config_path()).arg("--no-pin");
    for iface in topo.lb_ifaces() {
        cmd.args(["--iface", iface.as_ref()]);
    }
    let out = cmd.env("NO_COLOR", "1").output().expect("running a second xdp-lb");
    let _ = std::fs::remove_file(&other_socket);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the second daemon must exit with an error:\n{stderr}");
    assert!(stderr.contains("busy") && stderr.contains("another XDP program"), "does not say the interface is busy:\n{stderr}");
    assert!(!stderr.contains("native XDP is not available"), "blames native XDP:\n{stderr}");
    cli_ok(&daemon, &["status"]);
}

/// Hostile 9 H8: a health-check change under which no backend passes is refused without --force
/// (it would take the whole service down); a check that passes is applied; --force applies it.
#[test]
fn a_check_change_no_backend_passes_needs_force() {
    let topo = Topology::new("apichk", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let backends: Vec<_> = (0..2).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", web, &[], &backends));
    let before = json(&daemon, &["service", "list"]);

    // Nothing listens on port 9 of the backends: every probe is refused.
    let err = cli_err(&daemon, &["service", "update", "web", "--check", "tcp", "--check-port", "9"], "--force");
    assert!(err.contains("no backend") && err.contains("connection refused"), "{err}");
    assert_eq!(json(&daemon, &["service", "list"]), before, "the refused check change was applied");
    assert_eq!(service(&status(&daemon), "web")["state"], "ok");

    // A check the backends pass goes through.
    cli_ok(&daemon, &["service", "update", "web", "--check", "tcp"]);
    wait_status(&daemon, "backends up under the new check", Duration::from_secs(10), |s| {
        service(s, "web")["backends"].as_array().is_some_and(|b| b.iter().all(|b| b["health"] == "up"))
    });

    // --force applies even the failing one; then the service goes all-down, as the refusal said.
    cli_ok(&daemon, &["service", "update", "web", "--check", "tcp", "--check-port", "9", "--force"]);
    wait_status(&daemon, "all down under the forced check", Duration::from_secs(10), |s| service(s, "web")["state"] == "all-down");
}
