//! VIP announcements (`[announce]`) with the real daemon in a namespace: the routes in its table
//! through health changes, node drain, reloads, restarts, `stop`, a crash and foreign routes; and a
//! real BIRD on the node, rendered from `examples/bgp/node-bird.conf`, peered with a BIRD router
//! (from `examples/bgp/router-bird.conf`) that must lose the VIP within a second of `node drain`.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use xdp_lb::api::StatusReply;
use xdp_lb_testbed::{http_get, Daemon, Family, HttpServer, IdentityServers, Netns, Topology};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const PORT: u16 = 80;
/// The backends' health checks go to this port, where the test runs (and stops) a listener.
const CHECK_PORT: u16 = 9000;
const TABLE: &str = "100";
const NODE_BIRD: &str = include_str!("../../examples/bgp/node-bird.conf");
const ROUTER_BIRD: &str = include_str!("../../examples/bgp/router-bird.conf");

fn config(topo: &Topology, announce: bool) -> String {
    let mut out = String::new();
    if announce {
        out.push_str(&format!("[announce]\ntable = {TABLE}\n\n"));
    }
    let backends = |family| {
        (0..topo.backend_count()).map(|i| format!("[[services.backends]]\naddress = \"{}\"\n", topo.backend_socket(family, i, PORT))).collect::<String>()
    };
    out.push_str(&format!(
        "[[services]]\nname = \"web\"\nvip = \"{}\"\nprotocol = \"tcp\"\nmode = \"dsr\"\n\
         health_check = {{ kind = \"tcp\", port = {CHECK_PORT}, interval_ms = 100, timeout_ms = 100, rise = 1, fall = 1 }}\n{}\n",
        topo.vip_socket(Family::V4, PORT),
        backends(Family::V4)
    ));
    out.push_str(&format!(
        "[[services]]\nname = \"web6\"\nvip = \"{}\"\nprotocol = \"tcp\"\nmode = \"dsr\"\nhealth_check = {{ kind = \"none\" }}\n{}",
        topo.vip_socket(Family::V6, PORT),
        backends(Family::V6)
    ));
    out
}

/// The destinations of `table`'s routes with protocol `proto` in `ns`, both families, sorted.
fn routes(ns: &Netns, table: &str, proto: &str) -> Vec<String> {
    let mut out = Vec::new();
    for family in ["-4", "-6"] {
        let json = match ns.ip(&["-j", family, "route", "show", "table", table, "proto", proto]) {
            Ok(json) => json,
            // A table that never held a route of this family does not exist yet.
            Err(e) if format!("{e:#}").contains("table does not exist") => continue,
            Err(e) => panic!("{e:#}"),
        };
        let list: Vec<serde_json::Value> = serde_json::from_str(if json.trim().is_empty() { "[]" } else { &json }).expect("ip -j output");
        out.extend(list.iter().filter_map(|r| r["dst"].as_str().map(str::to_string)));
    }
    out.sort();
    out
}

fn vip_routes(ns: &Netns) -> Vec<String> {
    routes(ns, TABLE, "247")
}

fn wait_until(what: &str, limit: Duration, mut done: impl FnMut() -> bool, context: impl Fn() -> String) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}\n{}", context());
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

fn cli(daemon: &Daemon, args: &[&str]) -> Result<String, String> {
    let out = daemon.cli(Path::new(XDP_LB), args).expect("run the CLI");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn status(daemon: &Daemon) -> StatusReply {
    let text = cli(daemon, &["--json", "status"]).unwrap_or_else(|e| panic!("status: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// (vip, announced, reason) of every VIP in `status`.
fn announcements(daemon: &Daemon) -> Vec<(String, bool, String)> {
    let reply = status(daemon);
    let a = reply.announce.expect("status has an announce section");
    assert_eq!(a.table, 100);
    a.vips.into_iter().map(|v| (v.vip, v.announced, v.reason.unwrap_or_default())).collect()
}

fn check_servers(topo: &Topology) -> Vec<HttpServer> {
    (0..topo.backend_count())
        .map(|i| HttpServer::start(topo.backend(i), topo.backend_socket(Family::V4, i, CHECK_PORT), "check").expect("check listener"))
        .collect()
}

/// Starts the daemon again after its process ended (a `stop` or a kill): the testbed's restart
/// first reaps the ended process, which it reports as an error.
fn start_again(daemon: &mut Daemon) {
    if daemon.restart_with_args(&[]).is_ok() {
        panic!("the daemon was still running");
    }
    daemon.restart_with_args(&[]).unwrap_or_else(|e| panic!("start again: {e:?}"));
}

fn wait_for_exit(pid: u32) {
    let stat = format!("/proc/{pid}/stat");
    wait_until(
        "the daemon exits",
        Duration::from_secs(10),
        || std::fs::read_to_string(&stat).map_or(true, |s| s.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z'))),
        String::new,
    );
}

#[test]
fn the_announce_table_follows_health_drain_reloads_restarts_stop_and_a_crash() {
    let topo = Topology::new("ann", 2).expect("testbed");
    let lb = topo.lb();
    let _servers = IdentityServers::start_all(&topo, PORT, 53).expect("servers");
    let checks = check_servers(&topo);
    let (v4, v6) = (topo.vip(Family::V4).to_string(), topo.vip(Family::V6).to_string());
    let both = || {
        let mut b = vec![v4.clone(), v6.clone()];
        b.sort();
        b
    };
    // Routes that are not the daemon's: another protocol in its table, its protocol in another table.
    lb.ip(&["route", "add", "blackhole", "10.200.100.200/32", "table", TABLE, "proto", "static"]).unwrap();
    lb.ip(&["route", "add", "blackhole", &format!("{v4}/32"), "table", "101", "proto", "247"]).unwrap();
    let foreign = || (routes(lb, TABLE, "static"), routes(lb, "101", "247"));
    let foreign_before = foreign();
    assert_eq!(foreign_before, (vec!["10.200.100.200".to_string()], vec![v4.clone()]));

    let mut daemon = Daemon::start(Path::new(XDP_LB), lb, &topo.lb_ifaces(), &config(&topo, true)).unwrap_or_else(|e| panic!("{e:?}"));
    let log = |d: &Daemon| d.log();
    // Announced once the first checks confirm web's backends (web6 is unchecked: at once).
    wait_until("announcement at start", Duration::from_secs(5), || vip_routes(lb) == both(), || log(&daemon));
    // The routes do not change the node's own forwarding: nothing looks the table up.
    let rules = lb.ip(&["rule", "show"]).unwrap() + &lb.ip(&["-6", "rule", "show"]).unwrap();
    assert!(!rules.contains("lookup 100"), "{rules}");
    assert!(announcements(&daemon).iter().all(|(_, announced, _)| *announced));

    // All of web's backends fail their checks: its VIP is withdrawn, web6's stays.
    drop(checks);
    let took = wait_until("withdrawal on all-down", Duration::from_secs(5), || vip_routes(lb) == [v6.clone()], || log(&daemon));
    eprintln!("all backends down → VIP withdrawn after {took:?} (checks every 100 ms, fall 1)");
    let web = announcements(&daemon).into_iter().find(|(vip, ..)| *vip == v4).unwrap();
    assert_eq!((web.1, web.2.as_str()), (false, "all backends down (service web)"));
    let _checks = check_servers(&topo);
    let took = wait_until("announcement when back up", Duration::from_secs(5), || vip_routes(lb) == both(), || log(&daemon));
    eprintln!("backends up again → VIP announced after {took:?}");

    // Node drain: withdrawn by the time the CLI returns, written to the file, traffic still served.
    cli(&daemon, &["node", "drain"]).unwrap_or_else(|e| panic!("node drain: {e}"));
    assert!(vip_routes(lb).is_empty(), "{:?}", vip_routes(lb));
    let file = std::fs::read_to_string(daemon.config_path()).unwrap();
    assert!(file.contains("drained = true"), "{file}");
    assert!(announcements(&daemon).iter().all(|(_, a, reason)| !a && reason == "node drained"));
    let human = cli(&daemon, &["status"]).unwrap();
    assert!(human.contains("NODE DRAINED") && human.contains("withdrawn") && human.contains("node drained"), "{human}");
    let vip: SocketAddr = topo.vip_socket(Family::V4, PORT);
    for _ in 0..5 {
        topo.client().run(|| http_get(vip)).unwrap_or_else(|e| panic!("a drained node still forwards what arrives: {e}"));
    }
    // The drain is in the file: a reload and a restart keep it.
    daemon.reload().unwrap();
    assert!(vip_routes(lb).is_empty());
    daemon.restart().unwrap_or_else(|e| panic!("{e:?}"));
    assert!(vip_routes(lb).is_empty(), "restarted drained node announced: {}", log(&daemon));
    cli(&daemon, &["node", "undrain"]).unwrap_or_else(|e| panic!("node undrain: {e}"));
    wait_until("announcement after undrain", Duration::from_secs(5), || vip_routes(lb) == both(), || log(&daemon));

    // A NAT service is refused while announcing, naming the option.
    let err = cli(&daemon, &["service", "add", "api", "--vip", "10.200.100.101:80", "--protocol", "tcp"]).unwrap_err();
    assert!(err.contains("--mode: \"nat\" cannot be announced from several nodes"), "{err}");

    // kill -9: the routes stay (the pinned data plane keeps forwarding).
    let pid = daemon.pid();
    // SAFETY: kill(2) on the daemon this test started, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    wait_for_exit(pid);
    assert_eq!(vip_routes(lb), both(), "a crash must leave the announcements");
    // A VIP that left the config while no daemon ran: its route is stale.
    lb.ip(&["route", "add", "blackhole", "10.200.100.150/32", "table", TABLE, "proto", "247"]).unwrap();
    start_again(&mut daemon);
    assert_eq!(vip_routes(lb), both(), "the restarted daemon adopts its routes and removes the stale one\n{}", log(&daemon));

    // Announcements turned off by a reload: every route withdrawn, node drain refused.
    daemon.reconfigure(&config(&topo, false)).unwrap();
    assert!(vip_routes(lb).is_empty(), "{}", log(&daemon));
    let err = cli(&daemon, &["node", "drain"]).unwrap_err();
    assert!(err.contains("has no [announce] section"), "{err}");
    // Issue 11 F15: undrain names itself, not drain.
    let err = cli(&daemon, &["node", "undrain"]).unwrap_err();
    assert!(err.contains("node undrain lets the node announce its VIPs again, but") && err.contains("has no [announce] section"), "{err}");
    assert!(status(&daemon).announce.is_none());
    daemon.reconfigure(&config(&topo, true)).unwrap();
    wait_until("announcement after the reload", Duration::from_secs(5), || vip_routes(lb) == both(), || log(&daemon));

    // `xdp-lb stop`: every route withdrawn before the daemon exits; others' routes untouched.
    let pid = daemon.pid();
    cli(&daemon, &["stop"]).unwrap_or_else(|e| panic!("stop: {e}"));
    wait_for_exit(pid);
    assert!(vip_routes(lb).is_empty(), "stop left {:?}\n{}", vip_routes(lb), log(&daemon));
    assert_eq!(foreign(), foreign_before, "a route that is not the daemon's was touched");
    start_again(&mut daemon);
    wait_until("announcement after a start", Duration::from_secs(5), || vip_routes(lb) == both(), || log(&daemon));
    // SIGTERM withdraws too.
    let stopped = daemon.stop().unwrap_or_else(|e| panic!("{e:?}"));
    assert!(vip_routes(lb).is_empty(), "SIGTERM left routes: {stopped}");
    assert_eq!(foreign(), foreign_before);
}

/// `ip -o monitor route` in `ns`, every line kept in a file, ended when dropped.
struct Monitor {
    child: Child,
    file: tempfile::NamedTempFile,
}

impl Monitor {
    fn start(ns: &Netns) -> Monitor {
        let file = tempfile::NamedTempFile::new().unwrap();
        let child = std::process::Command::new("ip")
            .args(["-n", ns.name(), "-o", "monitor", "route"])
            .stdin(Stdio::null())
            .stdout(file.reopen().unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("ip monitor");
        // Subscribed once it runs.
        std::thread::sleep(Duration::from_millis(100));
        Monitor { child, file }
    }

    fn lines(&self) -> String {
        std::fs::read_to_string(self.file.path()).unwrap()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 11 F1: a VIP whose backends never pass a check is never announced, not even for the
/// moment before the first check fails: not at start, not after `backend add`, not after a
/// restart (kill -9, then a new daemon adopts the pins).
#[test]
fn a_service_whose_backends_never_answer_is_never_announced() {
    let topo = Topology::new("anf", 1).expect("testbed");
    let lb = topo.lb();
    let dead = topo.vip(Family::V4).to_string();
    let later = "10.200.100.151";
    let monitor = Monitor::start(lb);
    let text = format!(
        "[announce]\ntable = {TABLE}\n\n[[services]]\nname = \"dead\"\nvip = \"{}\"\nprotocol = \"tcp\"\nmode = \"dsr\"\n\
         health_check = {{ kind = \"tcp\", port = {CHECK_PORT}, interval_ms = 300, timeout_ms = 200, rise = 1, fall = 2 }}\n\
         [[services.backends]]\naddress = \"{}\"\n",
        topo.vip_socket(Family::V4, PORT),
        topo.backend_socket(Family::V4, 0, PORT)
    );
    let mut daemon = Daemon::start(Path::new(XDP_LB), lb, &topo.lb_ifaces(), &text).unwrap_or_else(|e| panic!("{e:?}"));
    let reason = |d: &Daemon| announcements(d).into_iter().find(|(vip, ..)| *vip == dead).map(|v| v.2).unwrap_or_default();
    wait_until("the dead service is found down", Duration::from_secs(5), || reason(&daemon).contains("all backends down"), || daemon.log());
    cli(&daemon, &["service", "add", "dead2", "--vip", &format!("{later}:80"), "--protocol", "tcp", "--mode", "dsr", "--check", "tcp", "--check-interval-ms", "300", "--check-timeout-ms", "200", "--fall", "2"])
        .unwrap_or_else(|e| panic!("service add: {e}"));
    cli(&daemon, &["backend", "add", "dead2", &topo.backend_socket(Family::V4, 0, PORT).to_string()]).unwrap_or_else(|e| panic!("backend add: {e}"));
    std::thread::sleep(Duration::from_millis(1500));
    let pid = daemon.pid();
    // SAFETY: kill(2) on the daemon this test started, which has not been reaped.
    assert_eq!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) }, 0);
    wait_for_exit(pid);
    start_again(&mut daemon);
    std::thread::sleep(Duration::from_millis(1500));
    let seen = monitor.lines();
    assert!(
        !seen.lines().any(|l| l.contains(&format!("{dead} ")) || l.contains(&format!("{later} "))),
        "a VIP with no confirmed backend was announced:\n{seen}\n{}",
        daemon.log()
    );
    assert!(vip_routes(lb).is_empty());
    assert!(reason(&daemon).contains("all backends down"), "{}", reason(&daemon));
    // The log does not claim a withdrawal of something never announced (issue 11 F15).
    assert!(!daemon.log().contains("VIP withdrawn"), "{}", daemon.log());
}

/// Issue 11 F3: a second daemon in the same namespace with the same table is refused at start
/// and at a reload that moves to that table, naming the table and the other daemon; the first
/// keeps its routes.
#[test]
fn a_second_daemon_on_the_same_table_in_one_namespace_is_refused() {
    let topo = Topology::new("anl", 1).expect("testbed");
    let lb = topo.lb();
    let _servers = IdentityServers::start_all(&topo, PORT, 53).expect("servers");
    let _checks = check_servers(&topo);
    let first = Daemon::start(Path::new(XDP_LB), lb, &topo.lb_ifaces(), &config(&topo, true)).unwrap_or_else(|e| panic!("{e:?}"));
    wait_until("the first daemon announces", Duration::from_secs(5), || vip_routes(lb).len() == 2, || first.log());
    let before = vip_routes(lb);
    // The second one gets its own interface (a veth pair inside the lb namespace).
    lb.ip(&["link", "add", "anl-x0", "type", "veth", "peer", "name", "anl-x1"]).unwrap();
    lb.ip(&["link", "set", "anl-x0", "up"]).unwrap();
    lb.ip(&["link", "set", "anl-x1", "up"]).unwrap();
    let second_config = |table: u32| {
        format!(
            "[announce]\ntable = {table}\n\n[[services]]\nname = \"other\"\nvip = \"10.200.100.120:80\"\nprotocol = \"tcp\"\nmode = \"dsr\"\n\
             health_check = {{ kind = \"none\" }}\n[[services.backends]]\naddress = \"{}\"\n",
            topo.backend_socket(Family::V4, 0, PORT)
        )
    };
    let err = match Daemon::start(Path::new(XDP_LB), lb, &["anl-x0"], &second_config(100)) {
        Ok(d) => panic!("a second daemon on table 100 started:\n{}", d.log()),
        Err(e) => format!("{e:?}"),
    };
    assert!(err.contains("[announce] table 100 is already used by another xdp-lb daemon in this network namespace"), "{err}");
    assert!(err.contains(&format!("pid {}", first.pid())), "{err}");
    // Its own table: fine, and the first daemon's routes were never touched.
    let mut second = Daemon::start(Path::new(XDP_LB), lb, &["anl-x0"], &second_config(101)).unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(vip_routes(lb), before, "{}", first.log());
    // A reload onto the first one's table is refused; the second stays on 101.
    let refused = second.reconfigure(&second_config(100));
    let text = format!("{refused:?}") + &second.log();
    assert!(text.contains("[announce] table 100 is already used"), "{text}");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(vip_routes(lb), before, "{}", first.log());
    assert_eq!(routes(lb, "101", "247"), ["10.200.100.120"]);
    // Issue 11 F8: a table an `ip rule` looks up is refused at reload, naming the rule.
    lb.ip(&["rule", "add", "from", "10.200.100.1", "lookup", "102", "pref", "1234"]).unwrap();
    let refused = second.reconfigure(&second_config(102));
    let text = format!("{refused:?}") + &second.log();
    assert!(text.contains("[announce] table 102 is looked up by `ip rule` pref 1234 (IPv4)"), "{text}");
    assert_eq!(routes(lb, "101", "247"), ["10.200.100.120"]);
}

/// Issue 11 F11: an interface the program was attached to is deleted and re-created (new
/// ifindex, no XDP on it): every VIP is withdrawn and `status` names the interface.
#[test]
fn a_recreated_interface_withdraws_every_vip() {
    let topo = Topology::new("ani", 1).expect("testbed");
    let lb = topo.lb();
    let _servers = IdentityServers::start_all(&topo, PORT, 53).expect("servers");
    let _checks = check_servers(&topo);
    let daemon = Daemon::start(Path::new(XDP_LB), lb, &topo.lb_ifaces(), &config(&topo, true)).unwrap_or_else(|e| panic!("{e:?}"));
    wait_until("announced", Duration::from_secs(5), || vip_routes(lb).len() == 2, || daemon.log());
    // Issue 11 F13: a family the node does not forward is withdrawn, with the sysctl named.
    let v4 = topo.vip(Family::V4).to_string();
    lb.sysctl("net.ipv6.conf.all.forwarding", "0").unwrap();
    wait_until("IPv6 VIP withdrawn without IPv6 forwarding", Duration::from_secs(3), || vip_routes(lb) == [v4.clone()], || daemon.log());
    let v6 = announcements(&daemon).into_iter().find(|(vip, ..)| *vip != v4).unwrap();
    assert!(v6.2.contains("net.ipv6.conf.all.forwarding = 0"), "{v6:?}");
    lb.sysctl("net.ipv6.conf.all.forwarding", "1").unwrap();
    wait_until("IPv6 VIP back with forwarding", Duration::from_secs(3), || vip_routes(lb).len() == 2, || daemon.log());
    let iface = topo.backend_iface(0);
    lb.ip(&["link", "del", &iface]).unwrap();
    lb.ip(&["link", "add", &iface, "type", "veth", "peer", "name", "ani-peer"]).unwrap();
    lb.ip(&["link", "set", &iface, "up"]).unwrap();
    let took = wait_until("withdrawal after the interface was re-created", Duration::from_secs(3), || vip_routes(lb).is_empty(), || daemon.log());
    eprintln!("interface re-created → every VIP withdrawn after {took:?}");
    for (vip, announced, reason) in announcements(&daemon) {
        assert!(!announced && reason.contains("XDP program not attached") && reason.contains(&iface), "{vip}: {reason}");
    }
    assert!(daemon.log().contains(&format!("interface {iface}")), "{}", daemon.log());
}

/// An unpinned daemon started directly (the testbed's always pins), killed when dropped.
struct Unpinned(Child);

impl Drop for Unpinned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn announcing_needs_a_pinned_data_plane_at_start_and_at_reload() {
    let topo = Topology::new("anp", 1).expect("testbed");
    let dir = tempfile::Builder::new().prefix("xdp-lb-unpinned-").tempdir().unwrap();
    let (config_path, socket) = (dir.path().join("xdp-lb.toml"), dir.path().join("xdp-lb.sock"));
    let run = || {
        let mut cmd = topo.lb().command(XDP_LB);
        cmd.arg("--socket").arg(&socket).arg("run").arg("--config").arg(&config_path).args(["--iface", topo.client_iface(), "--no-pin"]);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
        cmd
    };
    // At start: refused, nothing attached, no route.
    std::fs::write(&config_path, config(&topo, true)).unwrap();
    let stderr_path = dir.path().join("stderr");
    let mut cmd = run();
    let mut refused = Unpinned(topo.lb().spawn(cmd.stderr(std::fs::File::create(&stderr_path).unwrap())).unwrap());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = refused.0.try_wait().unwrap() {
            break status;
        }
        let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
        assert!(started.elapsed() < Duration::from_secs(20), "an unpinned daemon started with [announce]:\n{stderr}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = std::fs::read_to_string(&stderr_path).unwrap();
    assert!(!status.success() && stderr.contains("not pinned (--no-pin)"), "{stderr}");
    assert!(vip_routes(topo.lb()).is_empty());
    assert!(!topo.lb().ip(&["link", "show"]).unwrap().contains("prog/xdp"));
    // At reload: an unpinned daemon refuses a config that adds [announce], and keeps running.
    std::fs::write(&config_path, config(&topo, false)).unwrap();
    let mut cmd = run();
    let _daemon = Unpinned(topo.lb().spawn(cmd.stderr(Stdio::null())).unwrap());
    let xdp_lb = |args: &[&str]| std::process::Command::new(XDP_LB).arg("--socket").arg(&socket).args(args).output().unwrap();
    wait_until("the unpinned daemon answers", Duration::from_secs(20), || xdp_lb(&["status"]).status.success(), String::new);
    std::fs::write(&config_path, config(&topo, true)).unwrap();
    let out = xdp_lb(&["reload"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not pinned (--no-pin)"), "{stderr}");
    assert!(vip_routes(topo.lb()).is_empty());
    assert!(xdp_lb(&["status"]).status.success());
}

/// A BIRD in the foreground in `ns`, killed when dropped (also when the test fails).
struct Bird {
    child: Child,
    name: &'static str,
    dir: PathBuf,
}

impl Bird {
    fn start(ns: &Netns, name: &'static str, conf: &str, dir: &Path) -> Bird {
        let path = dir.join(format!("{name}.conf"));
        std::fs::write(&path, conf).unwrap();
        // Each instance its own control socket and pidfile: the file system is shared.
        let mut cmd = ns.command("bird");
        cmd.arg("-f").arg("-c").arg(&path).arg("-s").arg(dir.join(format!("{name}.ctl"))).arg("-P").arg(dir.join(format!("{name}.pid")));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(dir.join(format!("{name}.stderr"))).unwrap());
        let child = ns.spawn(&mut cmd).unwrap_or_else(|e| panic!("starting BIRD (apt-get install bird2; `cargo xtask setup` does): {e:?}"));
        Bird { child, name, dir: dir.to_path_buf() }
    }

    fn log(&self) -> String {
        let read = |suffix: &str| std::fs::read_to_string(self.dir.join(format!("{}.{suffix}", self.name))).unwrap_or_default();
        format!("--- {} log ---\n{}{}", self.name, read("log"), read("stderr"))
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets `define NAME = value;` in a shipped BIRD config; the define must be there, so a changed
/// example breaks this test instead of silently testing something else.
fn define(conf: &str, name: &str, value: &str) -> String {
    let prefix = format!("define {name} = ");
    let mut found = false;
    let out = conf
        .lines()
        .map(|l| {
            if l.starts_with(&prefix) {
                found = true;
                format!("{prefix}{value};")
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(found, "the example BIRD config has no `{prefix}...`");
    out
}

fn log_to(conf: &str, file: &Path) -> String {
    assert!(conf.contains("log syslog all;"));
    conf.replace("log syslog all;", &format!("log \"{}\" all;", file.display()))
}

#[test]
fn a_bird_router_learns_the_vip_from_the_node_and_loses_it_within_a_second_of_node_drain() {
    let topo = Topology::new("bgp", 1).expect("testbed");
    let lb = topo.lb();
    let router = Netns::new(&format!("{}-rtr", topo.prefix())).expect("router netns");
    lb.ip(&["link", "add", "to-rtr", "type", "veth", "peer", "name", "eth0", "netns", router.name()]).unwrap();
    for (ns, dev, v4, v6) in [(lb, "to-rtr", "10.250.0.2/24", "fd00:250::2/64"), (&router, "eth0", "10.250.0.1/24", "fd00:250::1/64")] {
        ns.ip(&["addr", "add", v4, "dev", dev]).unwrap();
        ns.ip(&["addr", "add", v6, "dev", dev, "nodad"]).unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
    }
    let dir = tempfile::Builder::new().prefix("xdp-lb-bird-").tempdir().unwrap();
    let node_conf = [("NODE_ADDR", "10.250.0.2"), ("ROUTER_ADDR", "10.250.0.1"), ("VIP_TABLE", TABLE)]
        .iter()
        .fold(NODE_BIRD.to_string(), |c, (name, value)| define(&c, name, value));
    let router_part = ROUTER_BIRD.split("protocol bgp node1").next().unwrap();
    let router_conf = [
        ("ROUTER_ADDR", "10.250.0.1".to_string()),
        ("VIP_PREFIXES4", format!("[ {}/32 ]", topo.vip(Family::V4))),
        ("VIP_PREFIXES6", format!("[ {}/128 ]", topo.vip(Family::V6))),
    ]
    .iter()
    .fold(router_part.to_string(), |c, (name, value)| define(&c, name, value))
        + "protocol bgp node1 from xdp_lb_node {\n    neighbor 10.250.0.2 as NODES_AS;\n}\n";
    let router_bird = Bird::start(&router, "router", &log_to(&router_conf, &dir.path().join("router.log")), dir.path());
    let node_bird = Bird::start(lb, "node", &log_to(&node_conf, &dir.path().join("node.log")), dir.path());
    let birds = || format!("{}\n{}", node_bird.log(), router_bird.log());

    let _servers = IdentityServers::start_all(&topo, PORT, 53).expect("servers");
    let _checks = check_servers(&topo);
    let daemon = Daemon::start(Path::new(XDP_LB), lb, &topo.lb_ifaces(), &config(&topo, true)).unwrap_or_else(|e| panic!("{e:?}"));
    let (v4, v6) = (topo.vip(Family::V4).to_string(), topo.vip(Family::V6).to_string());
    let router_has = |vip: &str| {
        let family = if vip.contains(':') { "-6" } else { "-4" };
        router.ip(&[family, "route", "show", vip]).unwrap().contains("proto bird")
    };
    // The session comes up (connect delay 0), then both VIPs arrive with the node as next hop.
    let took = wait_until("the router learns the VIPs", Duration::from_secs(20), || router_has(&v4) && router_has(&v6), birds);
    eprintln!("router learned both VIPs {took:?} after the daemon was ready");
    let via = router.ip(&["route", "show", &v4]).unwrap();
    assert!(via.contains("via 10.250.0.2"), "{via}");

    let started = Instant::now();
    cli(&daemon, &["node", "drain"]).unwrap_or_else(|e| panic!("node drain: {e}"));
    let cli_took = started.elapsed();
    wait_until("the router loses the VIPs", Duration::from_secs(1), || !router_has(&v4) && !router_has(&v6), birds);
    let took = started.elapsed();
    eprintln!("node drain: CLI returned after {cli_took:?}, router lost both VIPs {took:?} after the command started");

    let started = Instant::now();
    cli(&daemon, &["node", "undrain"]).unwrap_or_else(|e| panic!("node undrain: {e}"));
    wait_until("the router learns the VIPs again", Duration::from_secs(2), || router_has(&v4) && router_has(&v6), birds);
    eprintln!("node undrain: router has both VIPs again after {:?}", started.elapsed());

    let started = Instant::now();
    daemon.stop().unwrap_or_else(|e| panic!("{e:?}"));
    wait_until("the router loses the VIPs at stop", Duration::from_secs(1), || !router_has(&v4) && !router_has(&v6), birds);
    eprintln!("SIGTERM: router lost both VIPs {:?} after the signal", started.elapsed());
}

/// Hostile-test finding: `node drain`, the lever an operator pulls during an incident, was refused
/// whenever the file held a hand edit not yet reloaded (even a comment). It now writes only
/// `drained` into the file as it is on disk and leaves the rest of the edit pending.
#[test]
fn node_drain_works_beside_a_hand_edit_that_is_not_reloaded_yet() {
    let topo = Topology::new("annedit", 2).expect("testbed");
    let lb = topo.lb();
    let _servers = IdentityServers::start_all(&topo, PORT, 53).expect("servers");
    let _checks = check_servers(&topo);
    let daemon = Daemon::start(Path::new(XDP_LB), lb, &topo.lb_ifaces(), &config(&topo, true)).unwrap_or_else(|e| panic!("{e:?}"));
    wait_until("announcement", Duration::from_secs(5), || vip_routes(lb).len() == 2, || daemon.log());
    let path = daemon.config_path().to_path_buf();
    let original = std::fs::read_to_string(&path).unwrap();
    let edited = format!("# operator note: maintenance tonight\n{}", original.replacen("mode = \"dsr\"\n", "mode = \"dsr\"\ndrain_timeout_ms = 1000\n", 1));
    std::fs::write(&path, &edited).unwrap();

    cli(&daemon, &["node", "drain"]).unwrap_or_else(|e| panic!("node drain beside a hand edit: {e}\n{}", daemon.log()));
    assert!(vip_routes(lb).is_empty(), "{:?}", vip_routes(lb));
    let file = std::fs::read_to_string(&path).unwrap();
    assert!(file.contains("# operator note") && file.contains("drain_timeout_ms = 1000"), "the hand edit is kept:\n{file}");
    assert!(file.contains("drained = true"), "{file}");
    let s = status(&daemon);
    assert!(s.config.changed_on_disk, "the rest of the edit is still pending: {:?}", s.config);
    // Other changes are still refused until the edit is read.
    let err = cli(&daemon, &["backend", "weight", "web", &topo.backend_socket(Family::V4, 0, PORT).to_string(), "2"]).unwrap_err();
    assert!(err.contains("edited since"), "{err}");
    cli(&daemon, &["node", "undrain"]).unwrap_or_else(|e| panic!("node undrain beside a hand edit: {e}"));
    wait_until("announcement after undrain", Duration::from_secs(5), || vip_routes(lb).len() == 2, || daemon.log());

    // A reload applies the edit and keeps the node's drain state as written.
    cli(&daemon, &["node", "drain"]).unwrap();
    cli(&daemon, &["reload"]).unwrap_or_else(|e| panic!("reload: {e}"));
    assert!(!status(&daemon).config.changed_on_disk);
    assert!(status(&daemon).announce.expect("announce status").node_drained);
    assert!(vip_routes(lb).is_empty());

    // A half-written edit the daemon cannot read is not written into: refused as before.
    let before = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{before}\n[[services\n")).unwrap();
    let err = cli(&daemon, &["node", "undrain"]).unwrap_err();
    assert!(err.contains("edited since"), "{err}");
    assert!(vip_routes(lb).is_empty(), "nothing changed");
}
