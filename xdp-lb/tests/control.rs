//! End to end for the control plane: health checks, failover, drain, backups, the schedulers and the
//! CLI, against the real daemon in a namespace testbed with real TCP traffic from the client.
//! Needs root. Set XDP_LB_TESTBED_ECHO=1 to see the daemon's log live.

#[path = "control/support.rs"]
mod support;

use std::{
    sync::{atomic::AtomicBool, atomic::Ordering, Mutex},
    time::{Duration, Instant},
};

use support::*;
use xdp_lb_testbed::{KeepAliveClient, Topology};

/// A backend whose server dies is out of new flows within the detection time, and back in once it
/// serves again; clients see failures only inside the detection window. Default settings: active
/// TCP checks and, since this is a NAT TCP service, passive checks.
#[test]
fn failover_and_recovery() {
    failover("fover", &[]);
}

/// The same with only the active checks, so a failure of the test above can be told apart from
/// one of the passive checks.
#[test]
fn failover_and_recovery_active_checks_only() {
    failover("fovac", &["passive_checks = false"]);
}

fn failover(tag: &str, settings: &[&str]) {
    const VICTIM: usize = 1;
    const KILL_AT: Duration = Duration::from_secs(1);
    /// How long the server stays dead: long enough to check that nothing reaches it after detection.
    const DEAD_FOR: Duration = Duration::from_secs(4);
    /// Rise 2 × 500 ms after the first probe that connects, with room for a loaded machine: what a
    /// client would call "a few seconds".
    const RETURN_WITHIN: Duration = Duration::from_secs(4);
    const REQUEST_TIMEOUT: Duration = Duration::from_millis(500);

    let topo = Topology::new(tag, 3).expect("building the testbed");
    let mut servers = Servers::start_all(&topo);
    let backends: Vec<_> = (0..3).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), settings, &backends));
    let victim = backend_addr(&topo, VICTIM);
    let initial = status(&daemon);
    assert_eq!(service(&initial, "web")["state"], "ok", "{initial:#}");

    let stop = AtomicBool::new(false);
    let samples = Mutex::new(Vec::<Sample>::new());
    let t0 = Instant::now();
    let limit = KILL_AT + DEAD_FOR + RETURN_WITHIN + Duration::from_secs(2);
    let (killed, detected, restarted, returned, rates) = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let load = PacedLoad {
                client: topo.client(),
                addr: vip(&topo, 80),
                period: Duration::from_millis(10),
                timeout: REQUEST_TIMEOUT,
                limit,
            };
            load.run(t0, &stop, &samples)
        });
        // Whatever happens below, the load ends before the scope does.
        let _stop_load = StopOnDrop(&stop);
        std::thread::sleep(KILL_AT.saturating_sub(t0.elapsed()));
        servers.stop(VICTIM);
        let killed = t0.elapsed();
        let took = wait_status(&daemon, "the stopped backend reported down", DETECTION + MARGIN, |s| {
            let b = backend(s, "web", victim);
            b["health"] == "down" && b["down"] == true && b["effective_weight"] == 0
        });
        let detected = killed + took;
        // A SYN sent to the dead server is refused, which the clients see as a failure but not as a
        // visit to the victim: the balancer's own counters say whether new flows still go there.
        std::thread::sleep((killed + DETECTION + MARGIN).saturating_sub(t0.elapsed()));
        let rates = json(&daemon, &["stats", "--interval-ms", "1000"]);
        std::thread::sleep((killed + DEAD_FOR).saturating_sub(t0.elapsed()));
        servers.start(VICTIM);
        let restarted = t0.elapsed();
        // Traffic is back when a connection opened after the restart is answered by the victim.
        let deadline = Instant::now() + RETURN_WITHIN;
        let returned = loop {
            let back = samples
                .lock()
                .unwrap()
                .iter()
                .find(|s| s.at > restarted && s.result.as_deref() == Ok(body(VICTIM).as_str()))
                .map(|s| s.at);
            if let Some(at) = back {
                break Some(at);
            }
            if Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // A little more traffic with the victim back in the ring, to see that it stays healthy.
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        load.join().expect("load thread");
        (killed, detected, restarted, returned, rates)
    });
    let samples = samples.into_inner().unwrap();
    let log = daemon.log();
    let summary = summarize(&samples, killed, restarted);
    eprintln!("failover {settings:?}: killed at {killed:?}, reported down at {detected:?}, restarted at {restarted:?}, back at {returned:?}\n{summary}");

    assert!(samples.len() > 300, "the load generator opened only {} connections\n{summary}", samples.len());
    // A connection still in flight when the server stops may be reset: it belongs to the window.
    let before: Vec<_> = samples.iter().filter(|s| s.at + REQUEST_TIMEOUT <= killed).collect();
    assert!(before.iter().all(|s| s.result.is_ok()), "failures before the kill\n{summary}\n{log}");
    assert!(
        before.iter().any(|s| s.result.as_deref() == Ok(body(VICTIM).as_str())),
        "the victim got no traffic before it was stopped\n{summary}"
    );
    // After the detection time nothing may fail and nothing may reach the victim until it is back.
    let settled = killed + DETECTION + MARGIN;
    let after: Vec<_> = samples.iter().filter(|s| s.at >= settled).collect();
    let failures: Vec<_> = after.iter().filter(|s| s.result.is_err()).collect();
    assert!(failures.is_empty(), "{} failures after the detection window, first: {:?}\n{summary}\n{log}", failures.len(), failures.first());
    let web_rates = rates["services"].as_array().and_then(|a| a.iter().find(|s| s["name"] == "web"));
    let victim_rates = web_rates
        .and_then(|s| s["backends"].as_array())
        .and_then(|a| a.iter().find(|b| b["address"] == victim.to_string()))
        .unwrap_or_else(|| panic!("no rates for {victim} in {rates:#}"));
    assert_eq!(
        victim_rates["new_flows_per_s"].as_f64(),
        Some(0.0),
        "new flows still sent to the dead backend after detection: {rates:#}\n{log}"
    );
    assert!(
        web_rates.and_then(|s| s["new_flows_per_s"].as_f64()).is_some_and(|r| r > 20.0),
        "the rates were taken while the load ran: {rates:#}"
    );
    let returned = returned.unwrap_or_else(|| {
        panic!(
            "no connection reached the restarted backend within {RETURN_WITHIN:?} of its restart\n{summary}\n{}\n{log}",
            status_text(&daemon)
        )
    });
    let final_status = status(&daemon);
    let b = backend(&final_status, "web", victim);
    assert!(b["health"] == "up" && b["down"] == false && b["effective_weight"] == 1, "victim after recovery: {b:#}\n{log}");
    eprintln!("traffic returned {:?} after the restart", returned - restarted);
}

/// A drained backend keeps its established connection but gets no new one, until undrained.
#[test]
fn drain_keeps_established_connections() {
    let topo = Topology::new("drain", 3).expect("building the testbed");
    let servers = Servers::start_all(&topo);
    let backends: Vec<_> = (0..3).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &backends));
    let vip = vip(&topo, 80);

    let mut conn = check(&daemon, "keep-alive connect", topo.client().run(|| KeepAliveClient::connect(vip)));
    let first = check(&daemon, "first keep-alive round trip", conn.get());
    let held = (0..3).find(|&i| body(i) == first).unwrap_or_else(|| panic!("unexpected body {first:?}"));
    let held_addr = backend_addr(&topo, held);

    let out = cli_ok(&daemon, &["backend", "drain", "web", &held_addr.to_string()]);
    assert!(out.contains("draining"), "{out}");
    let s = status(&daemon);
    let b = backend(&s, "web", held_addr);
    assert_eq!(b["drained"], true, "{b:#}");
    assert_eq!(b["effective_weight"], 0, "{b:#}");
    assert!(b["active_flows"].as_u64().is_some_and(|n| n >= 1), "a drained NAT backend with an open connection: {b:#}");

    let bodies = check(&daemon, "round trips on the drained backend's connection", conn.get_many(50));
    assert!(bodies.iter().all(|b| *b == first), "the established connection changed backend: {:?}", tally(&bodies));
    let fresh = check(&daemon, "new connections while draining", connections(topo.client(), vip, 60));
    assert!(!fresh.contains(&first), "new connections reached the drained backend: {:?}\n{}", tally(&fresh), daemon.log());
    assert_eq!(tally(&fresh).len(), 2, "the other two backends share the new connections: {:?}", tally(&fresh));
    // The connection still works after the new ones came and went.
    assert_eq!(check(&daemon, "round trip after the new connections", conn.get()), first);

    cli_ok(&daemon, &["backend", "undrain", "web", &held_addr.to_string()]);
    let b = backend(&status(&daemon), "web", held_addr).clone();
    assert!(b["drained"] == false && b["effective_weight"] == 1, "{b:#}");
    let fresh = check(&daemon, "new connections after undrain", connections(topo.client(), vip, 60));
    assert!(fresh.contains(&first), "the undrained backend got none of 60 new connections: {:?}", tally(&fresh));
    assert_eq!(check(&daemon, "round trip after undrain", conn.get()), first);
    drop(conn);
    assert!(servers.served(held) >= 53, "backend-{held} served {}", servers.served(held));
}

/// Past the drain timeout a drained backend's established flows are moved: the connection's next
/// packet reaches a backend that does not know it, and is reset.
#[test]
fn drain_timeout_ends_established_connections() {
    const DRAIN_TIMEOUT: Duration = Duration::from_millis(1000);
    let topo = Topology::new("drnto", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let backends: Vec<_> = (0..2).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &["drain_timeout_ms = 1000"], &backends));
    let vip = vip(&topo, 80);
    let mut conn = check(&daemon, "keep-alive connect", topo.client().run(|| KeepAliveClient::connect(vip)));
    let first = check(&daemon, "first round trip", conn.get());
    let held = (0..2).find(|&i| body(i) == first).unwrap_or_else(|| panic!("unexpected body {first:?}"));
    // The drain starts when the daemon programs it, before it writes the config file and answers:
    // measure from the request, the earliest moment the drain can have started.
    let drained_at = Instant::now();
    cli_ok(&daemon, &["backend", "drain", "web", &backend_addr(&topo, held).to_string()]);
    assert_eq!(check(&daemon, "round trip while draining", conn.get()), first);
    // The daemon looks at drain timers every 500 ms.
    let took = wait_status(&daemon, "the drained backend marked down after its timeout", DRAIN_TIMEOUT * 3, |s| {
        backend(s, "web", backend_addr(&topo, held))["down"] == true
    });
    assert!(drained_at.elapsed() >= DRAIN_TIMEOUT, "marked down {took:?} after the drain, before its timeout");
    let after = conn.get();
    assert!(after.is_err(), "the connection still reaches its backend past the drain timeout: {after:?}\n{}", daemon.log());
    let fresh = check(&daemon, "new connections after the drain timeout", connections(topo.client(), vip, 10));
    assert!(fresh.iter().all(|b| *b != first), "new connections reached the drained backend: {:?}", tally(&fresh));
}

/// Backups serve only while no primary is healthy.
#[test]
fn backups_take_over_and_hand_back() {
    let topo = Topology::new("backup", 3).expect("building the testbed");
    let mut servers = Servers::start_all(&topo);
    let backends = [
        (backend_addr(&topo, 0), &[][..]),
        (backend_addr(&topo, 1), &[][..]),
        (backend_addr(&topo, 2), &["backup = true"][..]),
    ];
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &backends));
    let vip = vip(&topo, 80);

    let normal = check(&daemon, "connections with both primaries up", connections(topo.client(), vip, 60));
    let counts = tally(&normal);
    assert!(!counts.contains_key(&body(2)), "the backup got traffic while primaries are up: {counts:?}");
    assert_eq!(counts.len(), 2, "both primaries serve: {counts:?}");
    let s = status(&daemon);
    assert_eq!(service(&s, "web")["state"], "ok", "{s:#}");
    assert_eq!(backend(&s, "web", backend_addr(&topo, 2))["backup"], true, "{s:#}");

    servers.stop(0);
    servers.stop(1);
    let took = wait_status(&daemon, "on-backups after both primaries stopped", DETECTION + MARGIN, |s| {
        service(s, "web")["state"] == "on-backups"
    });
    eprintln!("on backups {took:?} after stopping the primaries");
    let s = status(&daemon);
    assert_eq!(backend(&s, "web", backend_addr(&topo, 2))["effective_weight"], 1, "the backup serves: {s:#}");
    let failover = check(&daemon, "connections on backups", connections(topo.client(), vip, 30));
    assert!(failover.iter().all(|b| *b == body(2)), "with both primaries down: {:?}", tally(&failover));
    assert!(daemon.log().contains("backups take over"), "no warning that backups took over:\n{}", daemon.log());

    servers.start(0);
    // Rise 2 × 500 ms after the first probe that connects.
    let took = wait_status(&daemon, "a primary back after its restart", Duration::from_secs(4), |s| {
        service(s, "web")["state"] == "ok"
    });
    eprintln!("primary back {took:?} after its restart");
    let back = check(&daemon, "connections after a primary returned", connections(topo.client(), vip, 30));
    assert!(back.iter().all(|b| *b == body(0)), "the restarted primary should take everything: {:?}", tally(&back));
    let s = status(&daemon);
    assert_eq!(backend(&s, "web", backend_addr(&topo, 2))["effective_weight"], 0, "the backup is idle again: {s:#}");
}

/// Weighted round robin 3:1 splits new connections 3:1.
#[test]
fn weighted_round_robin_splits_by_weight() {
    const N: usize = 400;
    let topo = Topology::new("wrr", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let backends = [(backend_addr(&topo, 0), &["weight = 3"][..]), (backend_addr(&topo, 1), &["weight = 1"][..])];
    let config = service_toml("web", vip(&topo, 80), &["scheduler = \"weighted-round-robin\""], &backends);
    let daemon = start_daemon(&topo, &config);
    let bodies = check(&daemon, "connections", connections(topo.client(), vip(&topo, 80), N));
    let counts = tally(&bodies);
    let (a, b) = (counts.get(&body(0)).copied().unwrap_or(0), counts.get(&body(1)).copied().unwrap_or(0));
    assert_eq!(a + b, N, "{counts:?}");
    assert!((270..=330).contains(&a) && (70..=130).contains(&b), "expected 300/100 ± 10 %, got {counts:?}\n{}", daemon.log());
}

/// Round robin hands consecutive connections to the backends in order.
#[test]
fn round_robin_cycles_in_order() {
    let topo = Topology::new("rr", 3).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let backends: Vec<_> = (0..3).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let config = service_toml("web", vip(&topo, 80), &["scheduler = \"round-robin\""], &backends);
    let daemon = start_daemon(&topo, &config);
    let bodies = check(&daemon, "connections", connections(topo.client(), vip(&topo, 80), 30));
    let index = |b: &String| (0..3).find(|&i| body(i) == *b).unwrap_or_else(|| panic!("unexpected body {b:?}"));
    let order: Vec<usize> = bodies.iter().map(index).collect();
    for pair in order.windows(2) {
        assert_eq!(pair[1], (pair[0] + 1) % 3, "not in round-robin order: {order:?}\n{}", daemon.log());
    }
}

/// Least connections sends a new connection to the backend with the fewest open ones.
#[test]
fn least_conn_picks_the_idlest_backend() {
    let topo = Topology::new("lconn", 3).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let backends: Vec<_> = (0..3).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let config = service_toml("web", vip(&topo, 80), &["scheduler = \"least-conn\""], &backends);
    let daemon = start_daemon(&topo, &config);
    let vip = vip(&topo, 80);
    let index = |b: &str| (0..3).find(|&i| body(i) == b).unwrap_or_else(|| panic!("unexpected body {b:?}"));

    let mut long = Vec::new();
    let mut held = Vec::new();
    for n in 0..2 {
        let mut conn = check(&daemon, "keep-alive connect", topo.client().run(|| KeepAliveClient::connect(vip)));
        held.push(index(&check(&daemon, &format!("long connection {n}"), conn.get())));
        long.push(conn);
    }
    assert_ne!(held[0], held[1], "the second long connection went to the busy backend\n{}", daemon.log());
    let idle = (0..3).find(|i| !held.contains(i)).expect("three backends");
    let s = status(&daemon);
    for i in 0..3 {
        let expected = u64::from(held.contains(&i));
        let b = backend(&s, "web", backend_addr(&topo, i));
        assert_eq!(b["active_flows"].as_u64(), Some(expected), "backend-{i}: {b:#}");
    }
    // Each short connection ends before the next opens, so the idle backend stays the idlest.
    let bodies = check(&daemon, "short connections", connections(topo.client(), vip, 20));
    assert!(bodies.iter().all(|b| *b == body(idle)), "expected all on backend-{idle}: {:?}\n{}", tally(&bodies), daemon.log());
    // The long connections still work and stay put.
    for (conn, &i) in long.iter_mut().zip(&held) {
        assert_eq!(check(&daemon, "long connection round trip", conn.get()), body(i));
    }
    // Closing a long connection frees its backend: the next long connection goes to a backend with
    // none open (the freed or the idle one), never to the one still busy.
    drop(long.remove(0));
    let freed = held[0];
    wait_status(&daemon, "the closed connection no longer counted", Duration::from_secs(2), |s| {
        backend(s, "web", backend_addr(&topo, freed))["active_flows"] == 0
    });
    let mut third = check(&daemon, "keep-alive connect", topo.client().run(|| KeepAliveClient::connect(vip)));
    let got = index(&check(&daemon, "third long connection", third.get()));
    assert!(got == freed || got == idle, "with backend-{} busy, the new connection went to it\n{}", held[1], daemon.log());
}

/// Every CLI command against a running daemon, successes and refusals; a refusal changes nothing.
#[test]
fn cli_commands() {
    let topo = Topology::new("cli", 3).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let backends: Vec<_> = (0..2).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &backends));
    let web = vip(&topo, 80);
    let (b0, b1, b2) = (backend_addr(&topo, 0).to_string(), backend_addr(&topo, 1).to_string(), backend_addr(&topo, 2).to_string());

    // Tables.
    let out = cli_ok(&daemon, &["status"]);
    assert!(out.contains("web") && out.contains(&b0) && out.contains(&b1) && out.contains("[ok]"), "status:\n{out}");
    let out = cli_ok(&daemon, &["service", "list"]);
    assert!(out.contains("SERVICE") && out.contains("web") && out.contains(&web.to_string()), "service list:\n{out}");
    let out = cli_ok(&daemon, &["backend", "list", "web"]);
    assert!(out.contains(&b0) && out.contains(&b1), "backend list web:\n{out}");
    let out = cli_ok(&daemon, &["backend", "list"]);
    assert!(out.contains(&b0), "backend list:\n{out}");
    let list = json(&daemon, &["service", "list"]);
    assert_eq!(list[0]["name"], "web", "{list:#}");
    assert_eq!(list[0]["backends"].as_array().map(Vec::len), Some(2), "{list:#}");
    let s = json(&daemon, &["backend", "list", "web"]);
    for key in ["name", "vip", "state", "backends"] {
        assert!(!service(&s, "web")[key].is_null(), "status has no {key}: {s:#}");
    }
    let b = backend(&s, "web", backend_addr(&topo, 0));
    for key in ["address", "weight", "effective_weight", "backup", "drained", "health", "down", "active_flows"] {
        assert!(b.get(key).is_some(), "backend status has no {key}: {b:#}");
    }

    // explain: an established flow is pinned by the connection table, a new one by a Maglev slot.
    let mut conn = check(&daemon, "keep-alive connect", topo.client().run(|| xdp_lb_testbed::KeepAliveClient::connect(web)));
    let answered = check(&daemon, "keep-alive round trip", conn.get());
    let local = conn.local_addr().expect("local address").to_string();
    let e = json(&daemon, &["explain", &local, &web.to_string()]);
    assert_eq!(e["reason"], "connection-table", "explain {local}: {e:#}");
    let expected = (0..2).find(|&i| body(i) == answered).map(|i| backend_addr(&topo, i).to_string());
    assert_eq!(e["backend"].as_str(), expected.as_deref(), "explain names the backend that answered: {e:#}");
    let out = cli_ok(&daemon, &["explain", &local, &web.to_string()]);
    assert!(out.contains("connection table"), "explain table:\n{out}");
    let fresh_src = format!("{}:1", topo.client_addr_v4());
    let e = json(&daemon, &["explain", &fresh_src, &web.to_string()]);
    assert_eq!(e["reason"], "maglev", "{e:#}");
    assert!(e["slot"].as_u64().is_some() && e["ring_size"].as_u64().is_some(), "{e:#}");
    assert!([&b0, &b1].iter().any(|b| e["backend"] == b.as_str()), "{e:#}");
    let e2 = json(&daemon, &["explain", &fresh_src, &web.to_string()]);
    assert_eq!(e, e2, "explain is deterministic for the same flow");
    cli_err(&daemon, &["explain", &fresh_src, &vip(&topo, 9999).to_string()], "not a virtual service");
    cli_usage_err(&daemon, &["explain", &fresh_src, &web.to_string(), "--proto", "sctp"], "sctp");
    cli_err(&daemon, &["explain", "nonsense", &web.to_string()], "nonsense");
    drop(conn);

    // stats: rates over an interval, while traffic flows.
    std::thread::scope(|scope| {
        let traffic = scope.spawn(|| connections(topo.client(), web, 40));
        let st = json(&daemon, &["stats", "--interval-ms", "400"]);
        check(&daemon, "traffic during stats", traffic.join().expect("traffic thread"));
        for key in ["interval_s", "services", "reasons"] {
            assert!(st.get(key).is_some(), "stats has no {key}: {st:#}");
        }
        let s = &st["services"][0];
        for key in ["name", "packets_per_s", "bits_per_s", "new_flows_per_s", "backends"] {
            assert!(s.get(key).is_some(), "stats service has no {key}: {st:#}");
        }
        assert!(s["backends"][0].get("packets_per_s").is_some(), "{st:#}");
    });
    let out = cli_ok(&daemon, &["stats", "--watch", "--count", "2", "--interval-ms", "100"]);
    assert_eq!(out.matches("PACKETS/S").count(), 2, "two rounds of stats --watch:\n{out}");

    // Refusals: each one leaves the desired state and the status as they were.
    let before = (json(&daemon, &["service", "list"]), stable(&status(&daemon)));
    let unchanged = |what: &str| {
        let after = (json(&daemon, &["service", "list"]), stable(&status(&daemon)));
        assert_eq!(before, after, "a refused `{what}` changed the state");
    };
    cli_err(&daemon, &["backend", "add", "web", &b0], "already");
    unchanged("backend add (duplicate)");
    cli_err(&daemon, &["backend", "add", "web", "not-an-address"], "not-an-address");
    unchanged("backend add not-an-address");
    cli_err(&daemon, &["backend", "add", "nosuch", &b2], "unknown service");
    unchanged("backend add to an unknown service");
    cli_err(&daemon, &["backend", "remove", "web", &b2], "no backend");
    cli_err(&daemon, &["backend", "drain", "nosuch", &b0], "unknown service");
    cli_err(&daemon, &["backend", "undrain", "web", &b2], "no backend");
    cli_err(&daemon, &["backend", "weight", "web", &b0, "100000"], "weight");
    cli_err(&daemon, &["backend", "list", "nosuch"], "unknown service");
    cli_err(&daemon, &["service", "update", "web", "--scheduler", "fastest"], "fastest");
    unchanged("service update --scheduler fastest");
    cli_err(&daemon, &["service", "update", "nosuch", "--scheduler", "maglev"], "unknown service");
    cli_err(&daemon, &["service", "add", "web", "--vip", "10.200.100.100:81", "--protocol", "tcp"], "already exists");
    cli_err(&daemon, &["service", "add", "dup-vip", "--vip", &web.to_string(), "--protocol", "tcp"], "already used");
    cli_usage_err(&daemon, &["service", "add", "bad", "--vip", "10.200.100.100:82", "--protocol", "sctp"], "sctp");
    cli_usage_err(&daemon, &["service", "add", "novip", "--protocol", "tcp"], "--vip");
    cli_err(&daemon, &["service", "remove", "nosuch"], "unknown service");
    // Validation errors in the CLI's terms, not as config paths the user never wrote.
    cli_err(&daemon, &["backend", "add", "web", "10.0.0.1:99999"], "service web, backend 10.0.0.1:99999: 10.0.0.1:99999 has port 99999, above the maximum of 65535");
    cli_err(&daemon, &["backend", "add", "web", &b2, "--weight", "99999999999"], "--weight 99999999999: must be a whole number between 0 and 65535");
    cli_err(&daemon, &["service", "update", "web", "--check-interval-ms", "0"], "service web: --check-interval-ms: 0 must be between 1 and 86400000");
    let error = cli_err(&daemon, &["service", "add", "web\nadmin", "--vip", "10.200.100.100:82", "--protocol", "tcp"], "must start with a letter or digit");
    assert!(!error.contains("services["), "a config path in {error:?}");
    unchanged("the refusals");

    // Backend changes.
    cli_ok(&daemon, &["backend", "add", "web", &b2, "--weight", "2"]);
    let b = backend(&status(&daemon), "web", backend_addr(&topo, 2)).clone();
    assert!(b["weight"] == 2 && b["effective_weight"] == 2, "{b:#}");
    let bodies = check(&daemon, "connections with backend-2", connections(topo.client(), web, 60));
    assert!(bodies.contains(&body(2)), "the added backend got no traffic: {:?}", tally(&bodies));
    cli_ok(&daemon, &["backend", "weight", "web", &b0, "5"]);
    assert_eq!(backend(&status(&daemon), "web", backend_addr(&topo, 0))["weight"], 5);
    cli_ok(&daemon, &["backend", "drain", "web", &b1]);
    let s = status(&daemon);
    assert!(backend(&s, "web", backend_addr(&topo, 1))["drained"] == true, "{s:#}");
    let out = cli_ok(&daemon, &["backend", "list", "web"]);
    assert!(out.lines().any(|l| l.contains(&b1) && l.contains("drained")), "drained flag in the table:\n{out}");
    cli_ok(&daemon, &["backend", "undrain", "web", &b1]);
    assert_eq!(backend(&status(&daemon), "web", backend_addr(&topo, 1))["drained"], false);
    let out = cli_ok(&daemon, &["backend", "remove", "web", &b2]);
    assert!(out.contains("removed"), "{out}");
    let s = status(&daemon);
    assert_eq!(service(&s, "web")["backends"].as_array().map(Vec::len), Some(2), "{s:#}");
    let bodies = check(&daemon, "connections without backend-2", connections(topo.client(), web, 30));
    assert!(!bodies.contains(&body(2)), "the removed backend still gets traffic: {:?}", tally(&bodies));

    // Service changes.
    let out = cli_ok(&daemon, &["--json", "service", "update", "web", "--check-interval-ms", "300", "--check-timeout-ms", "200"]);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).ok(), Some(serde_json::json!({"ok": true})), "{out}");
    let hc = &json(&daemon, &["service", "list"])[0]["health_check"];
    assert!(hc["interval_ms"] == 300 && hc["timeout_ms"] == 200, "{hc:#}");
    let before = json(&daemon, &["service", "list"]);
    cli_err(&daemon, &["service", "update", "web", "--check-timeout-ms", "900"], "timeout");
    cli_err(&daemon, &["service", "update", "web", "--all-down", "maybe"], "maybe");
    cli_err(&daemon, &["service", "update", "web", "--check", "icmp"], "icmp");
    assert_eq!(json(&daemon, &["service", "list"]), before, "a refused update changed the service");
    cli_ok(&daemon, &["service", "update", "web", "--all-down", "fail-open"]);
    assert_eq!(json(&daemon, &["service", "list"])[0]["all_down"], "fail-open");
    cli_ok(&daemon, &["service", "update", "web", "--scheduler", "round-robin"]);
    assert_eq!(service(&status(&daemon), "web")["scheduler"], "round-robin");
    let bodies = check(&daemon, "connections after the scheduler change", connections(topo.client(), web, 10));
    assert_eq!(tally(&bodies).len(), 2, "round robin uses both backends: {:?}", tally(&bodies));

    let api = vip(&topo, 8080);
    let out = cli_ok(&daemon, &["service", "add", "api", "--vip", &api.to_string(), "--protocol", "tcp", "--scheduler", "maglev"]);
    assert!(out.contains("added"), "{out}");
    cli_ok(&daemon, &["backend", "add", "api", &b0]);
    cli_ok(&daemon, &["--json", "backend", "add", "api", &b2]);
    let bodies = check(&daemon, "connections to the added service", connections(topo.client(), api, 30));
    let counts = tally(&bodies);
    assert!(counts.keys().all(|b| *b == body(0) || *b == body(2)) && counts.len() == 2, "api: {counts:?}");
    assert_eq!(json(&daemon, &["service", "list"]).as_array().map(Vec::len), Some(2));
    cli_ok(&daemon, &["service", "remove", "api"]);
    assert!(status(&daemon).as_array().is_some_and(|a| a.len() == 1), "api removed");
    let gone = topo.client().run(|| get(api, Duration::from_millis(500)));
    assert!(gone.is_err(), "the removed service still answers: {gone:?}");
    // The remaining service is unaffected.
    check(&daemon, "web after removing api", connections(topo.client(), web, 10));

    // No daemon at the socket.
    let out = std::process::Command::new(XDP_LB)
        .args(["--socket", "/nonexistent/x.sock", "status"])
        .output()
        .expect("running xdp-lb");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "status without a daemon succeeded");
    assert!(stderr.starts_with("xdp-lb: error:") && stderr.contains("not running"), "stderr: {stderr}");
}

/// With every server gone the service is all-down, and the daemon says so loudly.
#[test]
fn all_backends_down() {
    let topo = Topology::new("alldn", 2).expect("building the testbed");
    let mut servers = Servers::start_all(&topo);
    let backends: Vec<_> = (0..2).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &backends));
    let web = vip(&topo, 80);
    check(&daemon, "connections before", connections(topo.client(), web, 10));
    servers.stop(0);
    servers.stop(1);
    let took = wait_status(&daemon, "all-down after stopping every server", DETECTION + MARGIN, |s| {
        service(s, "web")["state"] == "all-down"
    });
    eprintln!("all-down {took:?} after stopping the servers");
    // The error is logged in the same replan that sets the state.
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains("ALL BACKENDS DOWN"));
    assert!(line.is_some_and(|l| l.contains("ERROR")), "no ERROR line with ALL BACKENDS DOWN:\n{log}");
    let s = status(&daemon);
    for i in 0..2 {
        let b = backend(&s, "web", backend_addr(&topo, i));
        assert!(b["health"] == "down" && b["effective_weight"] == 0, "{b:#}");
    }
    // Drop policy: new connections are refused at once by the data plane (a RST), not left to time out.
    let tried = topo.client().run(|| get(web, Duration::from_millis(500)));
    let e = tried.expect_err("a connection succeeded with every backend down");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "expected a refusal: {e}");
    let e = json(&daemon, &["explain", &format!("{}:1", topo.client_addr_v4()), &web.to_string()]);
    assert_eq!(e["reason"], "no-backend", "{e:#}");

    // Fail-open ignores health: new connections reach the (dead) backends again, and are refused.
    cli_ok(&daemon, &["service", "update", "web", "--all-down", "fail-open"]);
    let tried = topo.client().run(|| get(web, Duration::from_millis(500)));
    let e = tried.expect_err("a connection succeeded with every server stopped");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "fail-open should forward to a backend: {e}");
}

struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Per-backend outcomes in three phases, for failure messages.
fn summarize(samples: &[Sample], killed: Duration, restarted: Duration) -> String {
    let phase = |lo: Duration, hi: Duration| {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for s in samples.iter().filter(|s| s.at >= lo && s.at < hi) {
            let key = match &s.result {
                Ok(b) => b.clone(),
                Err(_) => "failed".into(),
            };
            *counts.entry(key).or_default() += 1;
        }
        counts
    };
    let settled = killed + DETECTION + MARGIN;
    format!(
        "before the kill: {:?}\ndetection window: {:?}\ndead, after detection: {:?}\nafter the restart: {:?}\nfirst failures: {:?}",
        phase(Duration::ZERO, killed),
        phase(killed, settled),
        phase(settled, restarted),
        phase(restarted, Duration::MAX),
        samples.iter().filter(|s| s.result.is_err()).take(3).map(|s| (s.at, s.result.clone())).collect::<Vec<_>>(),
    )
}

/// Status without what moves on its own (probe results and latencies, flow counts).
fn stable(status: &serde_json::Value) -> serde_json::Value {
    let mut s = status.clone();
    for service in s.as_array_mut().into_iter().flatten() {
        for b in service["backends"].as_array_mut().into_iter().flatten() {
            if let Some(o) = b.as_object_mut() {
                for key in ["last_check", "check_latency_us", "active_flows"] {
                    o.remove(key);
                }
            }
        }
    }
    s
}

fn status_text(daemon: &xdp_lb_testbed::Daemon) -> String {
    String::from_utf8_lossy(&cli(daemon, &["status"]).stdout).into_owned()
}

/// Issue 9: a reload near the limits (256 services, 4,064 backends that all fail their checks)
/// used to replan once per health transition, ~90 ms each, and starve `status` for minutes. Now
/// transitions are coalesced (one replan per 250 ms) and API requests go first. Before the fix this
/// failed with the CLI's "did not answer within 30 s"; after it (debug build, 2 shared cores) each
/// status took ~6 s and all 3,840 were Down 13 s after the reload. The 1 s goal is not met yet:
/// the bound is the CLI's timeout, so this catches a stall, not a slow answer.
#[test]
fn a_reload_near_the_limits_keeps_the_api_responsive() {
    const SERVICES: usize = 256;
    const BACKENDS_PER_SERVICE: usize = 15; // 3,840 unreachable + the 1 real one below the 4,095 cap
    const STATUS_WITHIN: Duration = Duration::from_secs(30);
    const ALL_DOWN_WITHIN: Duration = Duration::from_secs(30);

    let topo = Topology::new("limit", 1).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let small = service_toml("web", vip(&topo, 80), &[], &[(backend_addr(&topo, 0), &[][..])]);
    let mut daemon = start_daemon(&topo, &small);

    // 198.18.0.0/15 has no route in the lb's namespace: every probe fails at once, so the
    // transitions arrive as fast as the checks can produce them (the hardest case for the loop).
    let mut big = String::new();
    let settings = ["ring_size = 1021", "[services.health_check]", "kind = \"tcp\"", "interval_ms = 1000", "timeout_ms = 500", "fall = 2", "rise = 2"];
    for s in 0..SERVICES {
        let backends: Vec<(std::net::SocketAddr, &[&str])> = (0..BACKENDS_PER_SERVICE)
            .map(|b| (format!("198.18.{s}.{}:80", b + 1).parse().unwrap(), &[][..]))
            .collect();
        big += &service_toml(&format!("s{s}"), vip(&topo, 1000 + s as u16), &settings, &backends);
    }
    let reload_started = Instant::now();
    daemon.reconfigure(&big).unwrap_or_else(|e| panic!("reloading 256 services: {e:?}\n{}", daemon.log()));
    let reload = reload_started.elapsed();

    let t0 = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut polls = 0;
    loop {
        // Timed on the socket itself: the daemon's answer, not the debug CLI's JSON handling.
        let asked = Instant::now();
        let answer = raw_status(&daemon);
        let took = asked.elapsed();
        slowest = slowest.max(took);
        polls += 1;
        eprintln!("status poll {polls} at {:?} took {took:?}", t0.elapsed());
        assert!(took < STATUS_WITHIN, "status took {took:?} after {:?} (poll {polls})\n{}", t0.elapsed(), daemon.log());
        let s: serde_json::Value = serde_json::from_str(&answer).expect("status answer is JSON");
        let all = s["data"]["services"].as_array().unwrap_or_else(|| panic!("status lists services: {}", &answer[..answer.len().min(500)]));
        let down = all.iter().flat_map(|svc| svc["backends"].as_array().unwrap()).filter(|b| b["health"] == "down").count();
        if down == SERVICES * BACKENDS_PER_SERVICE {
            break;
        }
        assert!(t0.elapsed() < ALL_DOWN_WITHIN, "only {down} backends down after {:?}", t0.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
    let all_down = t0.elapsed();
    // The CLI still renders the whole thing.
    assert_eq!(status(&daemon).as_array().map(|a| a.len()), Some(SERVICES));
    eprintln!(
        "reload {reload:?}; all {} backends down after {all_down:?}; {polls} status polls on the socket, slowest {slowest:?}",
        SERVICES * BACKENDS_PER_SERVICE,
    );
}

/// One `status` request straight on the daemon's socket; the answer line.
fn raw_status(daemon: &xdp_lb_testbed::Daemon) -> String {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(daemon.socket()).expect("connecting to the daemon");
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    stream.write_all(b"{\"command\":\"status\"}\n").expect("sending status");
    let mut line = String::new();
    std::io::BufReader::new(stream).read_line(&mut line).expect("reading the status answer");
    line
}