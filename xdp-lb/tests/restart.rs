//! Restarts without loss: the data plane is pinned, so a daemon that exits leaves it forwarding and
//! the next daemon adopts it (swapping its program in atomically and keeping the connection table).
//! A client streams requests over one connection and opens new ones throughout; none may fail.

use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use xdp_lb_testbed::{
    config_toml, http_get, Daemon, Family, IdentityServers, KeepAliveClient, Mode, Protocol, Scheduler, ServiceConfig,
    Topology,
};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const PORT: u16 = 80;
/// Bounds every load loop in this file.
const LOAD_LIMIT: Duration = Duration::from_secs(20);

fn config(topo: &Topology, mode: Mode) -> String {
    let backends = (0..3).map(|i| topo.backend_socket(Family::V4, i, PORT));
    config_toml(&[ServiceConfig::new("web", topo.vip_socket(Family::V4, PORT), Protocol::Tcp, mode, Scheduler::Maglev, backends)])
}

#[test]
fn restarting_the_daemon_loses_no_request_and_keeps_the_long_connection_on_its_backend() {
    for mode in [Mode::Nat, Mode::Dsr] {
        restart_under_load(mode);
    }
}

fn restart_under_load(mode: Mode) {
    let topo = Topology::new(&format!("rst{}", mode.as_str()), 3).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, PORT, 53).expect("servers");
    let mut daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config(&topo, mode))
        .unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, PORT);

    let stop = Arc::new(AtomicBool::new(false));
    let (streamed, stream_failures, new_ok, new_failures) =
        (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));

    // One long-lived connection: every answer must come from the backend that answered first.
    let long = {
        let (stop, streamed, failures) = (stop.clone(), streamed.clone(), stream_failures.clone());
        topo.client()
            .spawn_thread(move || {
                let started = Instant::now();
                let mut client = KeepAliveClient::connect(vip).expect("long connection");
                let first = client.get().expect("first answer");
                let mut others = Vec::new();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
                    match client.get() {
                        Ok(b) if b == first => {}
                        Ok(b) => others.push(b),
                        Err(_) => {
                            failures.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    streamed.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
                (first, others)
            })
            .expect("thread")
    };
    // New connections every 10 ms.
    let fresh = {
        let (stop, ok, failures) = (stop.clone(), new_ok.clone(), new_failures.clone());
        topo.client()
            .spawn_thread(move || {
                let started = Instant::now();
                let mut errors = Vec::new();
                while !stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT {
                    match http_get(vip) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.push(e.to_string());
                            failures.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    std::thread::sleep(Duration::from_millis(10));
                }
                errors
            })
            .expect("thread")
    };

    std::thread::sleep(Duration::from_millis(700));
    let before = (streamed.load(Ordering::Relaxed), new_ok.load(Ordering::Relaxed));
    daemon.restart().unwrap_or_else(|e| panic!("restart: {e:?}"));
    std::thread::sleep(Duration::from_millis(700));
    // A second restart, now with a connection table the first successor wrote to.
    daemon.restart().unwrap_or_else(|e| panic!("second restart: {e:?}"));
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    let (first, others) = long.join().expect("long connection thread");
    let errors = fresh.join().expect("new connections thread");

    let log = daemon.log();
    assert!(log.contains("adopted the running data plane"), "{mode:?}: the restarted daemon did not adopt\n{log}");
    assert_eq!(stream_failures.load(Ordering::Relaxed), 0, "{mode:?}: the long connection broke\n{log}");
    assert!(others.is_empty(), "{mode:?}: the long connection moved from {first} to {others:?}");
    assert!(errors.is_empty(), "{mode:?}: {} new connections failed: {errors:?}\n{log}", errors.len());
    let after = (streamed.load(Ordering::Relaxed), new_ok.load(Ordering::Relaxed));
    assert!(after.0 > before.0 + 50 && after.1 > before.1 + 50, "{mode:?}: traffic did not keep flowing: {before:?} → {after:?}");

    // `stop --detach` removes the data plane: no program left on the balancer's interfaces.
    let out = daemon.cli(Path::new(XDP_LB), &["stop", "--detach", "--bpffs", &daemon.pin_dir().display().to_string()]).unwrap();
    assert!(out.status.success(), "stop --detach: {}", String::from_utf8_lossy(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let links = topo.lb().ip(&["link", "show"]).unwrap();
        if !links.contains("prog/xdp") {
            break;
        }
        assert!(Instant::now() < deadline, "{mode:?}: XDP still attached after stop --detach:\n{links}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!daemon.pin_dir().exists(), "pins left behind in {}", daemon.pin_dir().display());
}

/// H9: `--iface` is the truth at a restart. An interface the pinned data plane was attached to but
/// the new daemon is not given is detached (its pin removed, a WARN naming it), instead of running
/// the previous program on the shared maps with no daemon in charge; `status` lists the attached
/// interfaces with their XDP mode.
#[test]
fn a_restart_detaches_interfaces_left_out_of_iface_and_status_lists_the_attached() {
    let topo = Topology::new("rif", 2).expect("testbed");
    let all = topo.lb_ifaces();
    let mut daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &all, &config(&topo, Mode::Nat)).unwrap_or_else(|e| panic!("{e:?}"));
    let xdp_on = |iface: &str| topo.lb().ip(&["-d", "link", "show", "dev", iface]).unwrap().contains("prog/xdp");
    assert!(all.iter().all(|i| xdp_on(i)), "attached everywhere at first");
    let (kept, left_out) = (&all[..all.len() - 1], &all[all.len() - 1]);
    assert!(daemon.pin_dir().join(format!("link_{left_out}")).exists());

    daemon.restart_with_ifaces(kept).unwrap_or_else(|e| panic!("restart: {e:?}"));
    let log = daemon.log();
    assert!(log.contains("adopted the running data plane"), "{log}");
    assert!(
        log.lines().any(|l| l.contains("WARN") && l.contains(left_out.as_str()) && l.contains("not given with --iface")),
        "no warning naming {left_out}:\n{log}"
    );
    assert!(!xdp_on(left_out), "{left_out} still runs the previous program");
    assert!(!daemon.pin_dir().join(format!("link_{left_out}")).exists(), "its pin is left");
    assert!(kept.iter().all(|i| xdp_on(i)), "the listed interfaces stay attached");

    let out = daemon.cli(Path::new(XDP_LB), &["--json", "status"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let listed: Vec<(String, String)> = status["interfaces"]
        .as_array()
        .unwrap_or_else(|| panic!("no interfaces in {status}"))
        .iter()
        .map(|i| (i["name"].as_str().unwrap().to_string(), i["mode"].as_str().unwrap().to_string()))
        .collect();
    let names: Vec<&String> = listed.iter().map(|(n, _)| n).collect();
    assert_eq!(names, kept.iter().collect::<Vec<_>>(), "{status}");
    // veth has native XDP; the program was attached natively at the first start.
    assert!(listed.iter().all(|(_, mode)| mode == "native"), "{listed:?}");
    let text = daemon.cli(Path::new(XDP_LB), &["status"]).unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.lines().any(|l| l.starts_with("interfaces ") && l.contains(&format!("{} (native)", kept[0]))), "{text}");
}

/// The backend's `down` flag in `status --json` (a drained backend is marked down when its drain
/// timeout has passed: its established flows move).
fn backend_down(daemon: &Daemon, backend: &str) -> Option<bool> {
    let out = daemon.cli(Path::new(XDP_LB), &["--json", "status"]).ok()?;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let backends = status["services"][0]["backends"].as_array()?;
    backends.iter().find(|b| b["address"] == backend).and_then(|b| b["down"].as_bool())
}

/// H11: a restart during a drain keeps the drain's timeout. The drain's start is written into the
/// config file (`drained_since`, in milliseconds) with `drained = true`; before, a restart 2 s into
/// a 12 s drain moved the flows 12 s after the restarted daemon read its file (≥ 14 s after the
/// drain; a restart takes 1–3 s on a quiet test machine, up to ~7 s beside other tests).
#[test]
fn a_restart_during_a_drain_keeps_its_timeout() {
    const TIMEOUT: Duration = Duration::from_secs(12);
    let topo = Topology::new("rdrain", 2).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, PORT, 53).expect("servers");
    let config = config(&topo, Mode::Nat).replace("scheduler = \"maglev\"\n", &format!("scheduler = \"maglev\"\ndrain_timeout_ms = {}\n", TIMEOUT.as_millis()));
    assert!(config.contains("drain_timeout_ms"), "{config}");
    let mut daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &config).unwrap_or_else(|e| panic!("{e:?}"));
    let backend = topo.backend_socket(Family::V4, 0, PORT).to_string();

    let drained_at = Instant::now();
    let out = daemon.cli(Path::new(XDP_LB), &["backend", "drain", "web", &backend]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read_to_string(daemon.config_path()).unwrap();
    assert!(written.contains("drained_since = \""), "the drain's start is in the file:\n{written}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(backend_down(&daemon, &backend), Some(false), "drained, its timeout not over yet");
    // A daemon that started the timer again would read the file after this instant.
    let restart_began = drained_at.elapsed();
    daemon.restart().unwrap_or_else(|e| panic!("restart: {e:?}"));
    let restarted = drained_at.elapsed();
    assert!(restarted < TIMEOUT - Duration::from_secs(1), "the restart took too long to tell anything: {restarted:?}");
    assert_eq!(backend_down(&daemon, &backend), Some(false), "the restarted daemon keeps the drain ({restarted:?} in)");

    let deadline = drained_at + Duration::from_secs(25);
    while backend_down(&daemon, &backend) != Some(true) {
        assert!(Instant::now() < deadline, "the drain never ended\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let ended = drained_at.elapsed();
    // A restarted timer would end at least `restart_began + TIMEOUT` in (≥ 14 s); the tick that
    // notices the end runs about once a second, and a loaded machine adds to it.
    assert!(
        ended >= TIMEOUT && ended < restart_began + TIMEOUT,
        "the drain ended {ended:?} after it began (timeout {TIMEOUT:?}, restart began {restart_began:?} in)"
    );

    // Undrain removes both keys.
    let out = daemon.cli(Path::new(XDP_LB), &["backend", "undrain", "web", &backend]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let written = std::fs::read_to_string(daemon.config_path()).unwrap();
    assert!(!written.contains("drained"), "{written}");
}

fn two_services(topo: &Topology, web_ring: u32) -> String {
    let vip = topo.vip(Family::V4);
    let backends: Vec<String> = (0..2).map(|i| format!("{{ address = \"{}\" }}", topo.backend_socket(Family::V4, i, PORT))).collect();
    let backends = backends.join(", ");
    format!(
        "[dataplane]\nmaglev_cells = 600\n\n[[services]]\nname = \"web\"\nvip = \"{vip}:{PORT}\"\nprotocol = \"tcp\"\nring_size = {web_ring}\nbackends = [{backends}]\n\n\
         [[services]]\nname = \"small\"\nvip = \"{vip}:8080\"\nprotocol = \"tcp\"\nring_size = 3\nbackends = [{backends}]\n"
    )
}

/// H7 at a restart: the running rings are adopted where they are. A ring size raised in the file
/// while the daemon was down (251 → 257 in 600 cells: 2 × 257 + 2 × 3 fits the sum) finds no room
/// next to the running ring. Before, the daemon exited ("too fragmented"), leaving no health
/// checks; now it starts, serves with the running ring, and reports the error in `status`.
#[test]
fn a_restart_whose_ring_cannot_be_placed_starts_and_reports_it() {
    let topo = Topology::new("rring", 2).expect("testbed");
    let _servers = IdentityServers::start_all(&topo, PORT, 53).expect("servers");
    let mut daemon = Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &two_services(&topo, 251)).unwrap_or_else(|e| panic!("{e:?}"));
    let vip = topo.vip_socket(Family::V4, PORT);
    topo.client().run(|| http_get(vip)).unwrap_or_else(|e| panic!("before: {e}"));

    daemon.write_config(&two_services(&topo, 257)).unwrap();
    daemon.restart().unwrap_or_else(|e| panic!("the restart must not exit on a ring it cannot place: {e:?}\n{}", daemon.log()));
    let out = daemon.cli(Path::new(XDP_LB), &["--json", "status"]).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let web = &status["services"][0];
    assert_eq!(web["state"], "ring-error", "{status}");
    let error = web["ring_error"].as_str().unwrap_or_default();
    assert!(error.contains("service web") && error.contains("ring_size") && error.contains("257"), "{error}");
    assert_eq!(status["services"][1]["state"], "ok", "{status}");
    // The running ring still serves.
    topo.client().run(|| http_get(vip)).unwrap_or_else(|e| panic!("after the restart: {e}\n{}", daemon.log()));
    let text = daemon.cli(Path::new(XDP_LB), &["status"]).unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("RING NOT REBUILT"), "{}", String::from_utf8_lossy(&text.stdout));
    // While web cannot place its ring, other services still take changes; web refuses another
    // size that does not fit either (never accepted to fail later).
    let b0 = topo.backend_socket(Family::V4, 0, PORT).to_string();
    let out = daemon.cli(Path::new(XDP_LB), &["backend", "weight", "small", &b0, "2"]).unwrap();
    assert!(out.status.success(), "a change to another service: {}", String::from_utf8_lossy(&out.stderr));
    let out = daemon.cli(Path::new(XDP_LB), &["service", "update", "web", "--ring-size", "263"]).unwrap();
    assert!(!out.status.success(), "an unplaceable size for the failing service was accepted");
    assert!(String::from_utf8_lossy(&out.stderr).contains("263"), "{}", String::from_utf8_lossy(&out.stderr));
    // Back to a size that fits: the error clears.
    daemon.write_config(&two_services(&topo, 251)).unwrap();
    daemon.reload().unwrap_or_else(|e| panic!("reload: {e:?}"));
    let out = daemon.cli(Path::new(XDP_LB), &["--json", "status"]).unwrap();
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["services"][0]["state"], "ok", "{status}");
}
