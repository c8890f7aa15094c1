//! Fail-safe behaviour against a hostile or mistaken outside (findings H12–H14), with the real
//! daemon in the namespace testbed:
//!
//! * spoofed SYNs from sources no client can have (loopback, multicast, a backend's own address)
//!   never take a service's backends out of the ring;
//! * `stop --bpffs DIR` sent to a daemon that pins elsewhere is refused and that daemon keeps
//!   running and forwarding;
//! * a start that fails to attach leaves no pins behind, and a `--bpffs` outside any bpffs creates
//!   nothing.

#[path = "control/support.rs"]
#[allow(dead_code)]
mod support;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use support::*;
use xdp_lb_testbed::{daemon::BPFFS_ROOT, RawSyns, Syn, Topology};

/// Sends `count` TCP SYNs from `src` (random ports) to `vip` over `spread`, as the tester's
/// spoof.py did, through a raw IPv4 socket (IP_HDRINCL). Must run inside the client namespace.
fn spoof_syns(src: Ipv4Addr, vip: SocketAddr, count: u16, spread: Duration) -> usize {
    let IpAddr::V4(dst) = vip.ip() else { panic!("IPv4 VIP") };
    let raw = RawSyns::open(dst).unwrap_or_else(|e| panic!("raw socket: {e}"));
    let mut sent = 0;
    for i in 0..count {
        let syn = Syn { src, sport: 20_000 + i, dport: vip.port(), seq: 0x1000_0000 + u32::from(i), ip_id: i };
        if raw.send(&syn).is_ok() {
            sent += 1;
        }
        std::thread::sleep(spread / u32::from(count));
    }
    sent
}

/// H12: before, 30 SYNs from 127.0.0.1 within 1.5 s marked every backend down (`[all-down]`, real
/// clients got RSTs) and a backend's own address as source took that backend out.
#[test]
fn spoofed_syns_from_impossible_sources_take_no_backend_out() {
    let topo = Topology::new("spoof", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let backends: Vec<_> = (0..2).map(|i| (backend_addr(&topo, i), &[][..])).collect();
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &backends));
    let web = vip(&topo, 80);
    check(&daemon, "connections before", connections(topo.client(), web, 6));
    let IpAddr::V4(own) = backend_addr(&topo, 0).ip() else { unreachable!() };
    let sources = [Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(224, 0, 0, 9), Ipv4Addr::new(127, 1, 2, 3), own];
    let mut sent = 0;
    for src in sources {
        sent += topo.client().run(|| spoof_syns(src, web, 30, Duration::from_millis(1500)));
    }
    assert!(sent >= 100, "only {sent} spoofed SYNs went out");
    // Longer than the passive checks' 2 s window and a few of the daemon's ticks.
    std::thread::sleep(Duration::from_millis(2500));
    let s = status(&daemon);
    assert_eq!(service(&s, "web")["state"], "ok", "{s:#}\n{}", daemon.log());
    for i in 0..2 {
        let b = backend(&s, "web", backend_addr(&topo, i));
        assert!(b["passive_down"] == false && b["effective_weight"] != 0, "{b:#}\n{}", daemon.log());
    }
    assert!(!daemon.log().contains("backend marked down"), "{}", daemon.log());
    let stats = daemon.stats().expect("stats");
    assert!(stats.reason("drop_martian_source") >= 85, "drop_martian_source {}: {:?}", stats.reason("drop_martian_source"), stats.reasons);
    check(&daemon, "connections after", connections(topo.client(), web, 6));
}

/// H13: `stop --detach --bpffs <another instance's pins>` went to the daemon on --socket, which
/// detached its own data plane (the template unit documented exactly that command).
#[test]
fn a_stop_for_another_instances_pins_is_refused() {
    let topo = Topology::new("stopx", 1).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &[(backend_addr(&topo, 0), &[])]));
    let web = vip(&topo, 80);
    let other = Path::new(BPFFS_ROOT).join(format!("{}-other", topo.prefix()));
    std::fs::create_dir_all(&other).unwrap();
    let other_text = other.display().to_string();
    let own_text = daemon.pin_dir().display().to_string();
    for args in [&["stop", "--detach", "--bpffs", &other_text][..], &["stop", "--bpffs", &other_text]] {
        let line = cli_err(&daemon, args, "nothing was stopped");
        assert!(line.contains(&own_text) && line.contains(&other_text) && line.contains("--socket"), "{line}");
    }
    let _ = std::fs::remove_dir(&other);
    // Still running, still pinned, still forwarding.
    assert_eq!(service(&status(&daemon), "web")["state"], "ok");
    assert!(daemon.pin_dir().exists(), "the refused stop removed the pins");
    check(&daemon, "connections after the refused stop", connections(topo.client(), web, 4));
    // Its own directory, named as the operator does: stopped and detached.
    cli_ok(&daemon, &["stop", "--detach", "--bpffs", &own_text]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while daemon.pin_dir().exists() {
        assert!(Instant::now() < deadline, "pins left in {own_text} after stop --detach");
        std::thread::sleep(Duration::from_millis(100));
    }
    // With that daemon gone, a stop on its socket without --bpffs must not fall back to the
    // default pin directory: that is the main instance's.
    cli_err(&daemon, &["stop", "--detach"], "name its pin directory with --bpffs");
}

/// H14: a start that fails to attach (the interface is held by another daemon's program) left its
/// freshly pinned maps behind; a --bpffs outside bpffs created the directory before refusing.
#[test]
fn a_failed_start_leaves_nothing_behind() {
    let topo = Topology::new("fstart", 1).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let config = service_toml("web", vip(&topo, 80), &[], &[(backend_addr(&topo, 0), &[])]);
    let daemon = start_daemon(&topo, &config);
    let scratch = tempfile::tempdir().unwrap();
    let config_path = scratch.path().join("second.toml");
    std::fs::write(&config_path, &config).unwrap();
    let second = |bpffs: &Path| {
        run_second(&topo, &scratch.path().join("second.sock"), &config_path, bpffs, &[topo.client_iface()])
    };
    let pins = Path::new(BPFFS_ROOT).join(format!("{}-second", topo.prefix()));
    let out = second(&pins);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second daemon attached to an interface the first holds:\n{stderr}");
    assert!(stderr.contains("attach"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&pins).map(|d| d.flatten().map(|e| e.file_name()).collect()).unwrap_or_default();
    assert!(!pins.exists(), "the failed start left {} with {left:?}", pins.display());
    // The first daemon's data plane is untouched.
    check(&daemon, "connections after the failed start", connections(topo.client(), vip(&topo, 80), 4));

    let not_bpffs = scratch.path().join("notbpf/x");
    let out = second(&not_bpffs);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not on a bpffs mount"), "{stderr}");
    assert!(!scratch.path().join("notbpf").exists(), "the refused --bpffs created {}", not_bpffs.display());
}

/// Pins a one-entry array of another tool at `path`, as `bpftool map create` does.
fn pin_foreign(path: &Path) {
    let out = Command::new("bpftool")
        .args(["map", "create"])
        .arg(path)
        .args(["type", "array", "key", "4", "value", "4", "entries", "1", "name", "foreign"])
        .output()
        .expect("running bpftool");
    assert!(out.status.success(), "bpftool map create {}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    names.sort();
    names
}

/// `xdp-lb --socket SOCKET stop --detach --bpffs DIR`, from the root namespace.
fn stop_detach(socket: &Path, dir: &Path) -> std::process::Output {
    Command::new(XDP_LB)
        .arg("--socket")
        .arg(socket)
        .args(["stop", "--detach", "--bpffs"])
        .arg(dir)
        .env("NO_COLOR", "1")
        .output()
        .expect("running xdp-lb stop")
}

/// J9: with no daemon answering on --socket, `stop --detach --bpffs DIR` removed the pins of the
/// daemon running on DIR under another socket ("No daemon was running"). J10: once that daemon was
/// gone it removed every pin in DIR, another tool's too, and DIR itself.
#[test]
fn a_stop_without_a_daemon_spares_a_running_instance_and_foreign_pins() {
    let topo = Topology::new("stopnd", 1).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let daemon = start_daemon(&topo, &service_toml("web", vip(&topo, 80), &[], &[(backend_addr(&topo, 0), &[])]));
    let web = vip(&topo, 80);
    let dir = daemon.pin_dir().to_path_buf();
    pin_foreign(&dir.join("FOREIGN"));
    let before = entries(&dir);
    assert!(before.iter().any(|n| n.starts_with("link_")) && before.contains(&"CONNTRACK".to_string()), "{before:?}");
    let scratch = tempfile::tempdir().unwrap();
    let nowhere = scratch.path().join("nowhere.sock");

    let out = stop_detach(&nowhere, &dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "stop --detach removed a running daemon's pins:\n{}{stderr}", String::from_utf8_lossy(&out.stdout));
    let pid = daemon.pid().to_string();
    let socket = daemon.socket().display().to_string();
    assert!(stderr.contains("running") && stderr.contains(&pid) && stderr.contains(&socket), "{stderr}");
    assert_eq!(entries(&dir), before, "the refused stop changed {}", dir.display());
    check(&daemon, "connections after the refused stop", connections(topo.client(), web, 4));

    // The daemon stops, leaving its data plane; then the stop without a daemon detaches it and
    // removes only xdp-lb's pins.
    cli_ok(&daemon, &["stop"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let out = loop {
        let out = stop_detach(&nowhere, &dir);
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(entries(&dir), ["FOREIGN"], "stop --detach without a daemon removed another tool's pin or left its own");
    let _ = std::fs::remove_file(dir.join("FOREIGN"));
    let _ = std::fs::remove_dir(&dir);
}

/// J11: a failed start into a directory holding another tool's pin kept its maps and the XDP link
/// it had attached to the first interface, with no daemon.
#[test]
fn a_failed_start_into_a_non_empty_directory_removes_what_it_made() {
    let topo = Topology::new("fstnd", 1).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let config = service_toml("web", vip(&topo, 80), &[], &[(backend_addr(&topo, 0), &[])]);
    let daemon = start_daemon(&topo, &config);
    // An interface nobody holds, attached before the one the first daemon holds.
    // In the lb namespace of this test only, so a fixed name cannot clash.
    let free = "free0".to_string();
    let out = Command::new("ip").args(["-n", topo.lb().name(), "link", "add", &free, "type", "veth", "peer", "name", "free1"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new("ip").args(["-n", topo.lb().name(), "link", "set", &free, "up"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let scratch = tempfile::tempdir().unwrap();
    let config_path = scratch.path().join("second.toml");
    std::fs::write(&config_path, &config).unwrap();
    let pins = Path::new(BPFFS_ROOT).join(format!("{}-second", topo.prefix()));
    std::fs::create_dir_all(&pins).unwrap();
    pin_foreign(&pins.join("FOREIGN"));
    let out = run_second(&topo, &scratch.path().join("second.sock"), &config_path, &pins, &[free.as_str(), topo.client_iface()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second daemon attached to an interface the first holds:\n{stderr}");
    let left = entries(&pins);
    let link = Command::new("ip").args(["-n", topo.lb().name(), "-d", "link", "show", &free]).output().unwrap();
    let link = String::from_utf8_lossy(&link.stdout).into_owned();
    // Links first: whatever the start left is detached before the assertions can fail.
    xdp_lb_testbed::daemon::remove_pins(&pins);
    assert_eq!(left, ["FOREIGN"], "the failed start left its pins (or removed another tool's)\n{stderr}");
    assert!(!link.contains("prog/xdp"), "the failed start left a program attached to {free}:\n{link}");
    check(&daemon, "connections after the failed start", connections(topo.client(), vip(&topo, 80), 4));
}

/// `xdp-lb run` of a second instance in the lb namespace (its own socket, config and pins), run
/// to its exit: every caller expects the start to fail.
fn run_second(topo: &Topology, socket: &Path, config: &Path, bpffs: &Path, ifaces: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", topo.lb().name()]).arg(XDP_LB).arg("--socket").arg(socket).arg("run");
    cmd.arg("--config").arg(config).arg("--bpffs").arg(bpffs);
    for iface in ifaces {
        cmd.args(["--iface", iface]);
    }
    cmd.env("NO_COLOR", "1").output().expect("running a second xdp-lb")
}
