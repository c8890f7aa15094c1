//! One source of truth: `--config` is read at start and on reload (SIGHUP or `xdp-lb reload`), and
//! every CLI change is written into it. So restart and reload agree, no CLI change or hand edit is
//! lost silently, and a degenerate file (empty, no services) never replaces a serving data plane
//! unless the operator says so.

#[allow(dead_code)]
#[path = "control/support.rs"]
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use support::*;
use xdp_lb::api::{self, ConfigStatus, Request};
use xdp_lb_testbed::{Daemon, Topology};

fn config_status(daemon: &Daemon) -> ConfigStatus {
    let response = api::call(daemon.socket(), &Request::Status).unwrap_or_else(|e| panic!("status request: {e}"));
    assert!(response.ok, "status refused: {:?}", response.error);
    serde_json::from_value(response.data["config"].clone()).unwrap_or_else(|e| panic!("status has no config part ({e}): {:#}", response.data))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn service_names(daemon: &Daemon) -> Vec<String> {
    let s = status(daemon);
    s.as_array().expect("status is a list").iter().map(|s| s["name"].as_str().unwrap_or_default().to_string()).collect()
}

fn has_backend(daemon: &Daemon, service: &str, address: &str) -> bool {
    let s = status(daemon);
    s.as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == service))
        .and_then(|s| s["backends"].as_array())
        .is_some_and(|b| b.iter().any(|b| b["address"] == address))
}

/// New connections through the VIP: every one must be answered, by one of `allowed`.
fn assert_served_by(topo: &Topology, daemon: &Daemon, web: std::net::SocketAddr, allowed: &[usize], what: &str) {
    let bodies = check(daemon, what, connections(topo.client(), web, 12));
    let allowed: Vec<String> = allowed.iter().map(|&i| body(i)).collect();
    assert!(bodies.iter().all(|b| allowed.contains(b)), "{what}: answered by {:?}, expected only {allowed:?}", tally(&bodies));
}

const COMMENTED: &str = "# Shop front: edited by hand and by the CLI.\n";

#[test]
fn cli_changes_go_into_the_config_and_survive_sighup_reload_and_restart() {
    let topo = Topology::new("cfa", 3).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let (b0, b1, b2) = (backend_addr(&topo, 0).to_string(), backend_addr(&topo, 1).to_string(), backend_addr(&topo, 2).to_string());
    let config = format!(
        "{COMMENTED}{}",
        service_toml("web", web, &["# keep this comment"], &[(backend_addr(&topo, 0), &["weight = 1 # the big one"]), (backend_addr(&topo, 1), &[])])
    );
    let mut daemon = start_daemon(&topo, &config);
    let path = daemon.config_path().to_path_buf();

    // Drain, then SIGHUP: the drain is in the file, so the reload keeps it.
    cli_ok(&daemon, &["backend", "drain", "web", &b1]);
    let text = read(&path);
    assert!(text.contains("drained = true"), "the drain is not in the config file:\n{text}");
    for comment in [COMMENTED.trim(), "# keep this comment", "weight = 1 # the big one"] {
        assert!(text.contains(comment), "the CLI change lost {comment:?}:\n{text}");
    }
    daemon.reload().unwrap_or_else(|e| panic!("SIGHUP: {e:?}"));
    assert_eq!(backend(&status(&daemon), "web", backend_addr(&topo, 1))["drained"], true, "SIGHUP undid the drain");
    assert_served_by(&topo, &daemon, web, &[0], "after drain + SIGHUP");
    let c = config_status(&daemon);
    assert_eq!(c.path, path.display().to_string());
    assert!(!c.changed_on_disk, "the daemon's own write counts as a hand edit: {c:?}");

    // Add a backend, then restart: the new daemon reads it from the file.
    cli_ok(&daemon, &["backend", "add", "web", &b2]);
    daemon.restart().unwrap_or_else(|e| panic!("restart: {e:?}"));
    assert!(has_backend(&daemon, "web", &b2), "the CLI-added backend is gone after a restart");
    assert_eq!(backend(&status(&daemon), "web", backend_addr(&topo, 1))["drained"], true, "the restart undid the drain");
    assert_served_by(&topo, &daemon, web, &[0, 2], "after add + restart");

    // A CLI-added service and `xdp-lb reload`: both paths read the same file.
    let api = vip(&topo, 8080);
    cli_ok(&daemon, &["service", "add", "api", "--vip", &api.to_string(), "--protocol", "tcp"]);
    cli_ok(&daemon, &["backend", "add", "api", &b0]);
    let out = cli_ok(&daemon, &["reload"]);
    assert!(out.contains("2 service"), "reload output: {out}");
    assert_eq!(service_names(&daemon), ["web", "api"]);
    assert!(has_backend(&daemon, "api", &b0) && has_backend(&daemon, "web", &b2));
    daemon.reload().unwrap_or_else(|e| panic!("SIGHUP: {e:?}"));
    assert_eq!(service_names(&daemon), ["web", "api"]);
    assert!(read(&path).contains(COMMENTED.trim()), "{}", read(&path));

    // Undrain writes the file too.
    cli_ok(&daemon, &["backend", "undrain", "web", &b1]);
    daemon.restart().unwrap_or_else(|e| panic!("restart: {e:?}"));
    assert_eq!(backend(&status(&daemon), "web", backend_addr(&topo, 1))["drained"], false);
}

#[test]
fn config_edits_are_picked_up_at_restart_and_differences_are_reported() {
    let topo = Topology::new("cfb", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let one = service_toml("web", web, &[], &[(backend_addr(&topo, 0), &[])]);
    let mut daemon = start_daemon(&topo, &one);
    // A CLI change first: under the old model it created the state file that then hid every edit.
    cli_ok(&daemon, &["backend", "weight", "web", &backend_addr(&topo, 0).to_string(), "2"]);

    let text = read(daemon.config_path());
    let edited = format!("{text}{}", service_toml("api", vip(&topo, 8080), &[], &[(backend_addr(&topo, 1), &[])]));
    daemon.write_config(&edited).expect("editing the config");
    assert!(config_status(&daemon).changed_on_disk, "status does not show the unreloaded edit");
    let out = cli_ok(&daemon, &["status"]);
    assert!(out.contains("EDITED ON DISK"), "status text does not show the unreloaded edit:\n{out}");

    daemon.restart().unwrap_or_else(|e| panic!("restart: {e:?}"));
    assert_eq!(service_names(&daemon), ["web", "api"], "the restart ignored the edit\n{}", daemon.log());
    assert_eq!(backend(&status(&daemon), "web", backend_addr(&topo, 0))["weight"], 2);
    let c = config_status(&daemon);
    assert!(!c.changed_on_disk, "{c:?}");
    assert!(
        c.start_differences.iter().any(|d| d.contains("service api") && d.contains("will be added")),
        "status does not list what differed at start: {c:?}"
    );
    assert!(daemon.log().contains("differs from the config file"), "no WARN at start:\n{}", daemon.log());
    let api_bodies = check(&daemon, "api", connections(topo.client(), vip(&topo, 8080), 3));
    assert!(api_bodies.iter().all(|b| *b == body(1)), "{api_bodies:?}");

    // After a reload the file runs as it is: the start differences describe nothing any more.
    cli_ok(&daemon, &["reload"]);
    let c = config_status(&daemon);
    assert!(c.start_differences.is_empty(), "status still shows the start differences after a reload: {c:?}");
}

#[test]
fn empty_config_at_start_is_refused_while_the_data_plane_serves() {
    let topo = Topology::new("cfc", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let mut daemon = start_daemon(&topo, &service_toml("web", web, &[], &[(backend_addr(&topo, 0), &[]), (backend_addr(&topo, 1), &[])]));
    assert_served_by(&topo, &daemon, web, &[0, 1], "before");

    for (what, empty) in [("an empty file", ""), ("a file without services", "# nothing yet\n[dataplane]\n")] {
        daemon.write_config(empty).expect("writing the config");
        let err = daemon.restart().expect_err(&format!("the daemon started with {what}"));
        let err = format!("{err:#}");
        assert!(err.contains("--allow-empty") && err.contains("Refusing to start"), "{what}: unclear refusal:\n{err}");
        // The pinned data plane was left alone: the VIP still answers.
        assert_served_by(&topo, &daemon, web, &[0, 1], &format!("after refusing {what}"));
    }

    daemon.restart_with_args(&["--allow-empty"]).unwrap_or_else(|e| panic!("--allow-empty: {e:?}"));
    assert!(service_names(&daemon).is_empty());
    let after = topo.client().run(|| get(web, Duration::from_millis(700)));
    assert!(after.is_err(), "the VIP still answers after an explicit --allow-empty: {after:?}");
}

#[test]
fn reload_to_empty_is_refused_unless_allowed() {
    let topo = Topology::new("cfd", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let mut daemon = start_daemon(&topo, &service_toml("web", web, &[], &[(backend_addr(&topo, 0), &[])]));
    daemon.write_config("").expect("emptying the config");

    let err = daemon.reload().expect_err("SIGHUP emptied the running services");
    assert!(format!("{err:#}").contains("--allow-empty"), "{err:#}");
    cli_err(&daemon, &["reload"], "--allow-empty");
    assert_eq!(service_names(&daemon), ["web"]);
    assert_served_by(&topo, &daemon, web, &[0], "after the refused reloads");

    let out = cli_ok(&daemon, &["reload", "--allow-empty"]);
    assert!(out.contains("0 service"), "{out}");
    assert!(service_names(&daemon).is_empty());
}

#[test]
fn a_cli_change_after_a_hand_edit_is_refused_and_neither_is_lost() {
    let topo = Topology::new("cfe", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let (b0, b1) = (backend_addr(&topo, 0), backend_addr(&topo, 1));
    let daemon = start_daemon(&topo, &service_toml("web", web, &[], &[(b0, &[]), (b1, &[])]));
    let path = daemon.config_path().to_path_buf();

    let edited = service_toml("web", web, &["# hand edit"], &[(b0, &["weight = 5"]), (b1, &[])]);
    daemon.write_config(&edited).expect("editing");
    cli_err(&daemon, &["backend", "drain", "web", &b1.to_string()], "xdp-lb reload");
    assert_eq!(read(&path), edited, "the refused CLI change touched the hand-edited file");
    let s = status(&daemon);
    assert_eq!(backend(&s, "web", b1)["drained"], false, "the refused drain runs anyway");
    assert_eq!(backend(&s, "web", b0)["weight"], 1, "the edit runs without a reload");

    cli_ok(&daemon, &["reload"]);
    cli_ok(&daemon, &["backend", "drain", "web", &b1.to_string()]);
    let s = status(&daemon);
    assert_eq!((backend(&s, "web", b0)["weight"].clone(), backend(&s, "web", b1)["drained"].clone()), (5.into(), true.into()));
    let text = read(&path);
    assert!(text.contains("# hand edit") && text.contains("weight = 5") && text.contains("drained = true"), "{text}");
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(PathBuf, #[allow(dead_code)] tempfile::TempDir);

impl SmallFs {
    fn mount() -> SmallFs {
        let dir = tempfile::Builder::new().prefix("xdp-lb-cfg-").tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        mount(&["-t", "tmpfs", "-o", "size=64k", "tmpfs", &path.display().to_string()]);
        SmallFs(path, dir)
    }

    fn remount(&self, options: &str) {
        mount(&["-o", &format!("remount,{options}"), &self.0.display().to_string()]);
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount(args: &[&str]) {
    let out = Command::new("mount").args(args).output().expect("running mount");
    assert!(out.status.success(), "mount {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_unwritable_config_refuses_the_change_and_leaves_the_data_plane() {
    let topo = Topology::new("cff", 3).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let fs = SmallFs::mount();
    let path = fs.0.join("xdp-lb.toml");
    let config = service_toml("web", web, &[], &[(backend_addr(&topo, 0), &[]), (backend_addr(&topo, 1), &[])]);
    std::fs::write(&path, &config).expect("writing the config");
    let daemon = Daemon::start_with_config_file(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &path, &[])
        .unwrap_or_else(|e| panic!("starting: {e:?}"));
    let (b1, b2) = (backend_addr(&topo, 1).to_string(), backend_addr(&topo, 2).to_string());

    // Disk full.
    let filler = fs.0.join("filler");
    let mut file = std::fs::File::create(&filler).expect("filler");
    let chunk = [0u8; 4096];
    let full = (0..64).any(|_| std::io::Write::write_all(&mut file, &chunk).is_err());
    assert!(full, "64 KiB of filler did not fill the 64 KiB tmpfs");
    cli_err(&daemon, &["backend", "drain", "web", &b1], "rolled back");
    cli_err(&daemon, &["backend", "add", "web", &b2], "rolled back");
    assert_eq!(read(&path), config);
    assert_eq!(backend(&status(&daemon), "web", backend_addr(&topo, 1))["drained"], false, "the unsaved drain runs");
    assert!(!has_backend(&daemon, "web", &b2), "the unsaved backend runs");
    assert_served_by(&topo, &daemon, web, &[0, 1], "after the refused changes");
    drop(file);
    std::fs::remove_file(&filler).expect("removing the filler");

    // Read-only.
    fs.remount("ro");
    let err = cli_err(&daemon, &["backend", "drain", "web", &b1], "rolled back");
    assert!(err.to_lowercase().contains("read-only"), "{err}");
    assert_eq!(backend(&status(&daemon), "web", backend_addr(&topo, 1))["drained"], false);

    // Writable again: the same change goes through.
    fs.remount("rw");
    cli_ok(&daemon, &["backend", "drain", "web", &b1]);
    assert!(read(&path).contains("drained = true"));
    drop(daemon);
}

#[test]
fn a_missing_config_and_the_removed_state_flags_are_errors() {
    let run = |args: &[&str]| {
        let out = Command::new(XDP_LB).args(args).output().expect("running xdp-lb");
        assert!(!out.status.success(), "xdp-lb {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let socket = tempfile::tempdir().expect("tempdir");
    let socket = socket.path().join("s.sock").display().to_string();
    let err = run(&["--socket", &socket, "run", "--config", "/nonexistent/xdp-lb.toml", "--iface", "lo", "--no-pin"]);
    assert!(err.contains("/nonexistent/xdp-lb.toml"), "{err}");
    let err = run(&["check", "--config", "/nonexistent/xdp-lb.toml"]);
    assert!(err.contains("/nonexistent/xdp-lb.toml"), "{err}");
    for flag in [&["--state-file", "/tmp/state.toml"][..], &["--no-state"]] {
        let mut args = vec!["--socket", &socket, "run", "--config", "/nonexistent/xdp-lb.toml", "--iface", "lo", "--no-pin"];
        args.extend_from_slice(flag);
        let err = run(&args);
        assert!(err.contains("written into it") && err.contains("--config"), "{flag:?}: {err}");
    }
}

/// A hand edit racing CLI changes is never lost: each append is in the final file, or the CLI
/// change that met it was refused (and the edit then reloaded). The appender opens the file for
/// each append, as `echo >>` does, at irregular intervals around a change's duration.
#[test]
fn hand_edits_racing_cli_changes_are_never_lost() {
    use std::{
        io::Write,
        sync::{
            atomic::{AtomicBool, Ordering},
            Arc,
        },
        time::Instant,
    };
    let topo = Topology::new("cfr", 2).expect("building the testbed");
    let web = vip(&topo, 80);
    let b0 = backend_addr(&topo, 0).to_string();
    let daemon = start_daemon(&topo, &service_toml("web", web, &[], &[(backend_addr(&topo, 0), &[]), (backend_addr(&topo, 1), &[])]));
    let path = daemon.config_path().to_path_buf();
    let done = Arc::new(AtomicBool::new(false));

    const EDITS: usize = 150;
    let appender = {
        let (path, done) = (path.clone(), done.clone());
        std::thread::spawn(move || {
            let mut written = 0;
            for n in 0..EDITS {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let mut f = std::fs::OpenOptions::new().append(true).open(&path).expect("opening the config to append");
                f.write_all(format!("# edit-{n}\n").as_bytes()).expect("appending");
                written += 1;
                // 1..13 ms, with a pause every 10th edit so that some changes get through.
                let pause = if n % 10 == 9 { 150 } else { (n * 7 % 13 + 1) as u64 };
                std::thread::sleep(Duration::from_millis(pause));
            }
            written
        })
    };

    let deadline = Instant::now() + Duration::from_secs(60);
    let (mut applied, mut refused) = (0, 0);
    for i in 0..400u32 {
        if appender.is_finished() || Instant::now() > deadline {
            break;
        }
        let change = Request::BackendWeight { service: "web".into(), address: b0.clone(), weight: 1 + i % 5 };
        let r = api::call(daemon.socket(), &change).unwrap_or_else(|e| panic!("weight request: {e}"));
        if r.ok {
            applied += 1;
            continue;
        }
        let error = r.error.unwrap_or_default();
        assert!(error.contains("xdp-lb reload"), "a refused change does not say to reload: {error}");
        refused += 1;
        let r = api::call(daemon.socket(), &Request::Reload { allow_empty: false }).unwrap_or_else(|e| panic!("reload request: {e}"));
        assert!(r.ok, "reload refused: {:?}", r.error);
    }
    done.store(true, Ordering::Relaxed);
    let written = appender.join().expect("the appender panicked");

    let text = read(&path);
    let lost: Vec<usize> = (0..written).filter(|n| !text.contains(&format!("# edit-{n}\n"))).collect();
    println!("{written} appends, {applied} changes applied, {refused} refused, {} edits lost", lost.len());
    assert!(lost.is_empty(), "{} of {written} hand edits were overwritten by CLI changes: {lost:?}\n{text}", lost.len());
    assert!(applied > 0 && refused > 0, "the race was not exercised: {applied} applied, {refused} refused");
}

/// Map sizes change only through `stop --detach` + start, and both refusals say so; `hash_seed`
/// changes at reload (every ring is rebuilt with it). An empty file with a pinned data plane of
/// other sizes gets the empty-file refusal, not the destructive size advice.
#[test]
fn dataplane_sizes_need_a_detach_hash_seed_reloads_and_an_empty_file_is_named() {
    let topo = Topology::new("cfs", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let web_toml = service_toml("web", web, &[], &[(backend_addr(&topo, 0), &[]), (backend_addr(&topo, 1), &[])]);
    let sized = format!("[dataplane]\nconntrack_entries = 2048\n\n{web_toml}");
    let mut daemon = start_daemon(&topo, &sized);
    let ring = |daemon: &Daemon| service(&status(daemon), "web")["ring_fingerprint"].clone();
    let before = ring(&daemon);

    daemon.write_config(&sized.replace("conntrack_entries = 2048", "conntrack_entries = 4096")).expect("editing");
    let err = cli_err(&daemon, &["reload"], "stop --detach");
    assert!(err.contains("connection table") && !err.contains("restart xdp-lb to apply"), "unclear resize refusal: {err}");

    daemon.write_config(&sized.replace("conntrack_entries = 2048", "conntrack_entries = 2048\nhash_seed = 12345")).expect("editing");
    cli_ok(&daemon, &["reload"]);
    assert_ne!(ring(&daemon), before, "the new hash_seed did not rebuild the ring");
    assert_served_by(&topo, &daemon, web, &[0, 1], "after the hash_seed reload");

    // A drain made in the file while no daemon ran is reported at adoption (the ring shows it).
    let b1 = backend_addr(&topo, 1);
    let drained = service_toml("web", web, &[], &[(backend_addr(&topo, 0), &[]), (b1, &["drained = true"])]);
    daemon.write_config(&format!("[dataplane]\nconntrack_entries = 2048\nhash_seed = 12345\n\n{drained}")).expect("draining in the file");
    daemon.restart().unwrap_or_else(|e| panic!("restart: {e:?}"));
    let c = config_status(&daemon);
    assert!(
        c.start_differences.iter().any(|d| d.contains(&format!("backend {b1} took new flows")) && d.contains("drained in the config")),
        "the drain made while the daemon was down is not reported: {c:?}"
    );
    assert!(daemon.log().contains("drained in the config"), "no WARN for it:\n{}", daemon.log());

    daemon.write_config("").expect("emptying");
    // The daemon's own error line (the error also carries its earlier log).
    let error_line = |err: anyhow::Error| {
        let all = format!("{err:#}");
        all.lines().rfind(|l| l.contains("xdp-lb: error:")).unwrap_or_else(|| panic!("no error line in:\n{all}")).to_string()
    };
    let err = error_line(daemon.restart().expect_err("started with an empty file"));
    assert!(err.contains("empty or truncated") && err.contains("--allow-empty"), "{err}");
    assert!(!err.contains("stop --detach"), "an empty file got the destructive size advice: {err}");
    assert_served_by(&topo, &daemon, web, &[0, 1], "after refusing the empty file");

    daemon.write_config(&web_toml).expect("dropping the [dataplane] section");
    let err = error_line(daemon.restart_with_args(&[]).expect_err("started with other map sizes"));
    assert!(err.contains("no [dataplane] section") && err.contains("truncated"), "{err}");
}

/// Hostile 9 H6: an edit the daemon rejected (or would reject: a staged map resize) does not lock
/// the operator out of a drain, the refusals of other changes say what is really wrong, and
/// `status` shows the rejection next to EDITED ON DISK. The pending edit stays on disk, untouched
/// but for the drain, and is still reported.
#[test]
fn a_rejected_edit_is_reported_and_does_not_block_a_drain() {
    let topo = Topology::new("cfrj", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let (b0, b1) = (backend_addr(&topo, 0), backend_addr(&topo, 1));
    let mut daemon = start_daemon(&topo, &service_toml("web", web, &[], &[(b0, &[]), (b1, &[])]));
    let path = daemon.config_path().to_path_buf();
    let good = read(&path);

    // A broken hand edit, then SIGHUP: rejected.
    daemon.write_config(&format!("bogus = 1\n{good}")).expect("editing");
    daemon.reload().expect_err("the daemon accepted an unknown key");
    let c = config_status(&daemon);
    assert!(c.changed_on_disk, "{c:?}");
    let rejected = c.rejected_edit.clone().unwrap_or_else(|| panic!("status --json does not show the rejected reload: {c:?}"));
    assert!(rejected.contains("bogus"), "{rejected}");
    let out = cli_ok(&daemon, &["status"]);
    assert!(out.contains("EDITED ON DISK") && out.contains("REJECTED") && out.contains("bogus"), "status text hides the rejection:\n{out}");
    assert!(!out.contains("`xdp-lb reload` applies it"), "status still promises the reload applies it:\n{out}");

    // Other changes are refused with the real reason, not "run reload".
    let err = cli_err(&daemon, &["backend", "add", "web", "10.9.9.9:80"], "rejected");
    assert!(err.contains("bogus") && err.contains("fix or revert"), "{err}");
    assert!(!err.contains("to apply the edit"), "still says a reload applies it: {err}");

    // The emergency lever works: the drain runs, is written into the file, the edit stays.
    cli_ok(&daemon, &["backend", "drain", "web", &b1.to_string()]);
    assert_eq!(backend(&status(&daemon), "web", b1)["drained"], true, "the drain does not run");
    assert_served_by(&topo, &daemon, web, &[0], "after the drain beside the rejected edit");
    let text = read(&path);
    assert!(text.starts_with("bogus = 1\n") && text.contains("drained = true"), "the file lost the edit or the drain:\n{text}");
    cli_ok(&daemon, &["backend", "weight", "web", &b0.to_string(), "3"]);
    assert_eq!(backend(&status(&daemon), "web", b0)["weight"], 3);
    let c = config_status(&daemon);
    assert!(c.changed_on_disk && c.rejected_edit.is_some(), "the pending edit is no longer reported: {c:?}");

    // Fixing the edit: the reload applies the file, drain and weight included.
    daemon.write_config(read(&path).trim_start_matches("bogus = 1\n")).expect("fixing");
    daemon.reload().unwrap_or_else(|e| panic!("reload of the fixed file: {e:?}"));
    let c = config_status(&daemon);
    assert!(!c.changed_on_disk && c.rejected_edit.is_none(), "{c:?}");
    assert_eq!(backend(&status(&daemon), "web", b1)["drained"], true);
    assert_eq!(backend(&status(&daemon), "web", b0)["weight"], 3);

    // A valid edit the daemon cannot apply live (a staged resize), not reloaded yet: a change
    // other than drain/undrain/weight names the resize, not "run reload".
    let good = read(&path);
    daemon.write_config(&format!("[dataplane]\nconntrack_entries = 524288\n{good}")).expect("staging a resize");
    let err = cli_err(&daemon, &["backend", "remove", "web", &b1.to_string()], "conntrack_entries");
    assert!(err.contains("fix or revert"), "{err}");
    cli_ok(&daemon, &["backend", "undrain", "web", &b1.to_string()]);
    assert_eq!(backend(&status(&daemon), "web", b1)["drained"], false);
    assert!(read(&path).starts_with("[dataplane]\nconntrack_entries = 524288\n"), "{}", read(&path));
}

/// Hostile 9 H5: the daemon runs as an unprivileged user with the unit's capabilities (no
/// CAP_CHOWN); root replaces the config file, so it is root's. The reload and `status` warn that
/// CLI changes will be refused, and the refused change names the owner as the cause.
#[test]
fn a_config_file_the_daemon_user_cannot_keep_the_owner_of_is_warned_about() {
    let topo = Topology::new("cfown", 2).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let web = vip(&topo, 80);
    let b0 = backend_addr(&topo, 0).to_string();
    let wrapper_dir = tempfile::tempdir().expect("tempdir");
    let wrapper = wrapper_dir.path().join("xdp-lb-as-nobody");
    // Gives the daemon's directory (config, socket) and pin directory to nobody, then runs the
    // daemon as nobody with the shipped unit's capability set.
    let script = format!(
        "#!/bin/sh\nprev=\nfor a in \"$@\"; do case \"$prev\" in --config) cfg=\"$a\";; --bpffs) pins=\"$a\";; esac; prev=\"$a\"; done\n\
         chown -R 65534:65534 \"$(dirname \"$cfg\")\"\n\
         if [ -n \"$pins\" ]; then mkdir -p \"$pins\" && chown -R 65534:65534 \"$pins\"; fi\n\
         exec setpriv --reuid=65534 --regid=65534 --clear-groups --inh-caps=+bpf,+net_admin,+perfmon \
         --ambient-caps=+bpf,+net_admin,+perfmon --bounding-set=-all,+bpf,+net_admin,+perfmon -- {XDP_LB} \"$@\"\n"
    );
    std::fs::write(&wrapper, script).expect("wrapper");
    std::fs::set_permissions(&wrapper, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(wrapper_dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let config = service_toml("web", web, &[], &[(backend_addr(&topo, 0), &[])]);
    let daemon = Daemon::start_with_args(&wrapper, topo.lb(), &topo.lb_ifaces(), &config, &[]).unwrap_or_else(|e| panic!("starting as nobody: {e:?}"));
    let path = daemon.config_path().to_path_buf();

    // nobody's own file: changes work, nothing to warn about.
    cli_ok(&daemon, &["backend", "weight", "web", &b0, "2"]);
    assert_eq!(config_status(&daemon).owner_problem, None);

    // Root replaces the file (as `install` or config management's `mv` do): root's now.
    let replacement = path.with_extension("new");
    std::fs::write(&replacement, read(&path)).expect("writing the replacement");
    std::fs::rename(&replacement, &path).expect("replacing the config");
    cli_ok(&daemon, &["reload"]);
    let problem = config_status(&daemon).owner_problem.unwrap_or_else(|| panic!("status does not warn about the owner"));
    assert!(problem.contains("owned by root") && problem.contains("CLI changes will be refused") && problem.contains("chown"), "{problem}");
    let out = cli_ok(&daemon, &["status"]);
    assert!(out.contains("WARNING") && out.contains("owned by root"), "status text:\n{out}");
    // The daemon's log reaches the test through a pipe: the line can trail the reply.
    let warned = (0..50).any(|_| {
        let seen = daemon.log().contains("CLI changes will be refused");
        if !seen {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        seen
    });
    assert!(warned, "no warning at reload:\n{}", daemon.log());

    let err = cli_err(&daemon, &["backend", "weight", "web", &b0, "3"], "rolled back");
    assert!(err.contains("owned by root") && err.contains("chown"), "the refusal does not name the cause: {err}");
}

/// A VIP that is one of the balancer's own addresses on an interface it attaches to would take
/// this host's own traffic to that port (SSH, BGP, health-check replies, the metrics port): refused
/// at start, at reload and from the CLI, naming the field and the interface. The same address on
/// `lo` (how a host holds a VIP to answer ARP or ping for it) is accepted.
#[test]
fn a_vip_on_an_attached_interface_is_refused_at_start_reload_and_from_the_cli() {
    let topo = Topology::new("cfh", 1).expect("building the testbed");
    let _servers = Servers::start_all(&topo);
    let own = std::net::SocketAddr::new(topo.lb_addr_v4().into(), 80);
    let backends: [(std::net::SocketAddr, &[&str]); 1] = [(backend_addr(&topo, 0), &[])];
    let mine = service_toml("mine", own, &[], &backends);
    let err = match Daemon::start(Path::new(XDP_LB), topo.lb(), &topo.lb_ifaces(), &mine) {
        Ok(daemon) => panic!("started with the host's own address as a VIP:\n{}", daemon.log()),
        Err(e) => format!("{e:#}"),
    };
    assert!(
        err.contains(&format!("services[0].vip: {own} is an address of interface {}", topo.client_iface())) && err.contains(":3: "),
        "the refusal does not name the field, its line and the interface:\n{err}"
    );

    // The interface named by an alternative name is the same interface.
    topo.lb().ip(&["link", "property", "add", "dev", topo.client_iface(), "altname", "uplink-c"]).expect("adding an altname");
    let ifaces = ["uplink-c".to_string(), topo.backend_iface(0)];
    let err = match Daemon::start(Path::new(XDP_LB), topo.lb(), &ifaces, &mine) {
        Ok(daemon) => panic!("started with the host's own address as a VIP (--iface by altname):\n{}", daemon.log()),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains(&format!("services[0].vip: {own} is an address of interface uplink-c")), "{err}");

    let web = vip(&topo, 80);
    let mut daemon = start_daemon(&topo, &service_toml("web", web, &[], &backends));
    // The CLI: the flag and the interface are named, nothing changes.
    let err = cli_err(&daemon, &["service", "add", "mine", "--vip", &own.to_string(), "--protocol", "tcp"], "--vip");
    assert!(err.contains(&format!("is an address of interface {}", topo.client_iface())), "{err}");
    assert_eq!(service_names(&daemon), ["web"]);
    cli_err(&daemon, &["service", "update", "web", "--vip", &own.to_string(), "--force"], "is an address of interface");

    // A reload to such a file keeps the running configuration.
    let path = daemon.config_path().to_path_buf();
    let text = read(&path);
    daemon.write_config(&format!("{text}{mine}")).expect("editing");
    let err = daemon.reload().expect_err("SIGHUP programmed the host's own address as a VIP");
    assert!(format!("{err:#}").contains("is an address of interface"), "{err:#}");
    assert_eq!(service_names(&daemon), ["web"]);
    assert_served_by(&topo, &daemon, web, &[0], "after the refused reload");

    // Added to an attached interface while the daemon runs: logged as an error within the check
    // interval (5 s), since nothing can refuse it any more.
    topo.lb().ip(&["addr", "add", &format!("{}/32", web.ip()), "dev", topo.client_iface()]).expect("adding the VIP to the interface");
    let wanted = format!("services[0].vip: {web} is an address of interface {}", topo.client_iface());
    let deadline = std::time::Instant::now() + Duration::from_secs(12);
    while !daemon.log().contains(&wanted) {
        assert!(std::time::Instant::now() < deadline, "no error for the VIP added to an attached interface:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // It blocks no unrelated CLI change (a drain in an incident), but a reload of the file is
    // refused as a start would be.
    daemon.write_config(&text).expect("undoing the refused edit");
    cli_ok(&daemon, &["backend", "weight", "web", &backend_addr(&topo, 0).to_string(), "2"]);
    cli_err(&daemon, &["reload"], "is an address of interface");
    topo.lb().ip(&["addr", "del", &format!("{}/32", web.ip()), "dev", topo.client_iface()]).expect("removing it again");

    // On lo the same address is fine: only the interfaces xdp-lb is attached to carry the host's traffic.
    let on_lo: std::net::IpAddr = "10.203.0.1".parse().expect("address");
    topo.lb().ip(&["addr", "add", "10.203.0.1/32", "dev", "lo"]).expect("adding an address to lo");
    cli_ok(&daemon, &["reload"]);
    cli_ok(&daemon, &["service", "add", "held", "--vip", &std::net::SocketAddr::new(on_lo, 80).to_string(), "--protocol", "tcp"]);
    assert_eq!(service_names(&daemon), ["web", "held"]);
}
