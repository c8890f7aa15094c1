//! Running under systemd: the real daemon's sd_notify messages (READY=1 only once it is attached and
//! serving, RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM), and the capability set that
//! dist/systemd/xdp-lb.service grants being enough for a daemon that is not root.

use std::{
    io::{BufRead, BufReader},
    os::unix::{fs::PermissionsExt, net::UnixDatagram},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use xdp_lb_testbed::{config_toml, Family, Mode, Protocol, Scheduler, ServiceConfig, Topology};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/systemd/xdp-lb.service");
const START_TIMEOUT: Duration = Duration::from_secs(20);
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

fn config(topo: &Topology, services: usize) -> String {
    let services: Vec<_> = (0..services)
        .map(|i| {
            let port = 80 + i as u16;
            let backends = (0..2).map(|b| topo.backend_socket(Family::V4, b, port));
            ServiceConfig::new(&format!("web{i}"), topo.vip_socket(Family::V4, port), Protocol::Tcp, Mode::Nat, Scheduler::Maglev, backends)
        })
        .collect();
    config_toml(&services)
}

/// A test-owned `$NOTIFY_SOCKET`: what systemd listens on for a `Type=notify` service.
struct NotifySocket {
    socket: UnixDatagram,
    path: PathBuf,
}

impl NotifySocket {
    fn bind(dir: &Path) -> NotifySocket {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
        // A daemon that is not root must be able to send to it, as to systemd's.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).expect("chmod notify socket");
        NotifySocket { socket, path }
    }

    /// The next datagram, or `None` after `timeout`.
    fn next(&self, timeout: Duration) -> Option<String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now()).max(Duration::from_millis(1));
            self.socket.set_read_timeout(Some(left)).expect("read timeout");
            match self.socket.recv(&mut buf) {
                Ok(n) => return Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return None,
                // A signal for another test in this process (CI: EINTR here): wait on.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("receiving from the notify socket: {e}"),
            }
        }
    }

    fn expect(&self, what: &str, timeout: Duration) -> String {
        self.next(timeout).unwrap_or_else(|| panic!("no sd_notify message within {timeout:?}; expected {what}"))
    }
}

/// True when `line` is one of the message's lines. Every message is checked to be well formed first:
/// one `KEY=VALUE` per line, keys that systemd knows (a multi-line STATUS would smuggle in others).
fn has_line(message: &str, line: &str) -> bool {
    for l in message.lines() {
        let key = l.split_once('=').map(|(k, _)| k);
        assert!(
            matches!(key, Some("READY" | "RELOADING" | "STOPPING" | "STATUS" | "MONOTONIC_USEC")),
            "not a KEY=VALUE line of sd_notify: {l:?} in {message:?}"
        );
    }
    message.lines().any(|l| l == line)
}

/// The daemon process with its stderr collected; killed if a test fails half-way.
struct Running {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Running {
    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args(["-s", signal, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill -s {signal} failed");
    }

    fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `[wrapper...] xdp-lb --socket DIR/xdp-lb.sock run ...` in the lb namespace, with `NOTIFY_SOCKET`.
fn launch(topo: &Topology, dir: &Path, notify: &Path, wrapper: &[&str], pins: Option<&Path>) -> Running {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = topo.lb().command(program);
            c.args(args).arg(XDP_LB);
            c
        }
        None => topo.lb().command(XDP_LB),
    };
    cmd.arg("--socket").arg(dir.join("xdp-lb.sock")).arg("run").arg("--config").arg(dir.join("xdp-lb.toml"));
    match pins {
        Some(p) => cmd.arg("--bpffs").arg(p),
        None => cmd.arg("--no-pin"),
    };
    for iface in topo.lb_ifaces() {
        cmd.args(["--iface", &iface]);
    }
    cmd.env("NOTIFY_SOCKET", notify).env("NO_COLOR", "1").env("RUST_LOG", "info");
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = topo.lb().spawn(&mut cmd).expect("spawn xdp-lb");
    let stderr = child.stderr.take().expect("stderr piped");
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
            log.push_str(&line);
            log.push('\n');
        }
    });
    Running { child, log }
}

/// What `READY=1` promises: the program is attached to every interface and the CLI answers with the
/// configured services.
fn assert_serving(topo: &Topology, dir: &Path, services: usize) {
    for iface in topo.lb_ifaces() {
        let link = topo.lb().ip(&["link", "show", "dev", &iface]).expect("ip link show");
        assert!(link.contains("prog/xdp"), "READY=1 before the program was attached to {iface}: {link}");
    }
    let out = Command::new(XDP_LB)
        .arg("--socket")
        .arg(dir.join("xdp-lb.sock"))
        .args(["--json", "service", "list"])
        .output()
        .expect("xdp-lb service list");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "CLI not answering at READY=1: {}", String::from_utf8_lossy(&out.stderr));
    for i in 0..services {
        assert!(text.contains(&format!("web{i}")), "service web{i} not programmed at READY=1: {text}");
    }
}

fn workdir(topo: &Topology, services: usize) -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("xdp-lb-systemd-").tempdir().expect("tempdir");
    std::fs::write(dir.path().join("xdp-lb.toml"), config(topo, services)).expect("write config");
    dir
}

#[test]
fn notifies_ready_after_attaching_and_brackets_reloads_and_stop() {
    let topo = Topology::new("sdn", 2).expect("testbed");
    let dir = workdir(&topo, 1);
    let notify = NotifySocket::bind(dir.path());
    let mut daemon = launch(&topo, dir.path(), &notify.path, &[], None);

    let first = notify.expect("READY=1", START_TIMEOUT);
    assert!(has_line(&first, "READY=1"), "the first message must be READY=1, got {first:?}; log:\n{}", daemon.log());
    assert!(first.lines().any(|l| l.starts_with("STATUS=") && l.contains("1 service")), "READY=1 without a STATUS summary: {first:?}");
    assert_serving(&topo, dir.path(), 1);

    // A good reload: RELOADING=1 with the monotonic clock, then READY=1 with the new summary.
    std::fs::write(dir.path().join("xdp-lb.toml"), config(&topo, 2)).expect("write config");
    daemon.signal("HUP");
    let reloading = notify.expect("RELOADING=1", STEP_TIMEOUT);
    assert!(has_line(&reloading, "RELOADING=1"), "expected RELOADING=1, got {reloading:?}");
    let usec = reloading.lines().find_map(|l| l.strip_prefix("MONOTONIC_USEC=")).expect("MONOTONIC_USEC with RELOADING=1");
    assert!(usec.parse::<u64>().is_ok_and(|u| u > 0), "MONOTONIC_USEC is not a positive integer: {usec}");
    let ready = notify.expect("READY=1 after the reload", STEP_TIMEOUT);
    assert!(has_line(&ready, "READY=1") && ready.contains("2 service") && ready.contains("reloaded"), "after a reload: {ready:?}");
    assert_serving(&topo, dir.path(), 2);

    // A rejected reload still ends in READY=1 (the daemon serves the running configuration) and
    // says so in STATUS.
    // Two invalid fields: the error has a line per field, STATUS= must still be one line.
    let invalid = config(&topo, 2).replacen("vip = ", "vip = \"nope\"\n#", 1).replacen("protocol = \"tcp\"", "protocol = \"bogus\"", 2);
    std::fs::write(dir.path().join("xdp-lb.toml"), invalid).expect("write config");
    daemon.signal("HUP");
    assert!(has_line(&notify.expect("RELOADING=1", STEP_TIMEOUT), "RELOADING=1"));
    let ready = notify.expect("READY=1 after a rejected reload", STEP_TIMEOUT);
    assert!(has_line(&ready, "READY=1") && ready.contains("rejected") && ready.contains("2 service"), "after a rejected reload: {ready:?}");
    assert!(ready.contains("services[0].vip") && ready.contains("services[1].protocol"), "STATUS names what was wrong: {ready:?}");

    daemon.signal("TERM");
    let stopping = notify.expect("STOPPING=1", STEP_TIMEOUT);
    assert!(has_line(&stopping, "STOPPING=1"), "expected STOPPING=1, got {stopping:?}");
    let status = daemon.wait(STEP_TIMEOUT).expect("the daemon exits after SIGTERM");
    assert!(status.success(), "exit status {status}; log:\n{}", daemon.log());
    assert_eq!(notify.next(Duration::from_millis(200)), None, "nothing after STOPPING=1");
}

#[test]
fn without_notify_socket_the_daemon_runs_as_before() {
    let topo = Topology::new("sdu", 1).expect("testbed");
    let dir = workdir(&topo, 1);
    // NOTIFY_SOCKET names a path nobody listens on: the daemon must still come up (a notification
    // that cannot be delivered is logged, never fatal); with it unset there is nothing to send.
    let mut daemon = launch(&topo, dir.path(), &dir.path().join("absent.sock"), &[], None);
    let started = Instant::now();
    while !daemon.log().contains("xdp-lb ready") {
        assert!(started.elapsed() < START_TIMEOUT, "not ready; log:\n{}", daemon.log());
        assert!(daemon.child.try_wait().expect("try_wait").is_none(), "exited; log:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(daemon.log().contains("sd_notify READY=1 was not delivered"), "log:\n{}", daemon.log());
    assert_serving(&topo, dir.path(), 1);
    daemon.signal("TERM");
    assert!(daemon.wait(STEP_TIMEOUT).is_some_and(|s| s.success()), "log:\n{}", daemon.log());
}

/// The capabilities a unit line (`AmbientCapabilities=CAP_A CAP_B`) grants, as setpriv names them.
fn unit_capabilities(key: &str) -> Vec<String> {
    let unit = std::fs::read_to_string(UNIT).expect("read the unit");
    let line = unit.lines().find_map(|l| l.strip_prefix(&format!("{key}="))).unwrap_or_else(|| panic!("{key}= missing in {UNIT}"));
    line.split_whitespace().map(|c| c.trim_start_matches("CAP_").to_ascii_lowercase()).collect()
}

/// A bpffs of the test's own, root directory mode 0700 like the one systemd mounts at /sys/fs/bpf,
/// with a pin directory owned by the service user (what the unit's `ExecStartPre=+` creates),
/// bind-mounted where that user can reach it (what the unit's `BindPaths=` does): the user cannot
/// traverse the bpffs root itself.
struct Bpffs {
    root: tempfile::TempDir,
    bound: Option<PathBuf>,
}

impl Bpffs {
    /// `bind_to: None` leaves the pin directory where it is, out of the user's reach.
    fn mount(uid: u32, gid: u32, bind_to: Option<PathBuf>) -> Bpffs {
        let root = tempfile::Builder::new().prefix("xdp-lb-systemd-bpffs-").tempdir().expect("tempdir");
        run(Command::new("mount").args(["-t", "bpf", "-o", "mode=0700", "bpf"]).arg(root.path()));
        let pins = root.path().join("xdp-lb");
        std::fs::create_dir(&pins).expect("mkdir pins");
        std::os::unix::fs::chown(&pins, Some(uid), Some(gid)).expect("chown pins");
        let fs = Bpffs { root, bound: bind_to };
        if let Some(target) = &fs.bound {
            std::fs::create_dir(target).expect("mkdir bind target");
            run(Command::new("mount").arg("--bind").arg(&pins).arg(target));
        }
        fs
    }

    /// Where the daemon pins (`--bpffs`).
    fn pins(&self) -> PathBuf {
        self.bound.clone().unwrap_or_else(|| self.root.path().join("xdp-lb"))
    }
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Unmounting drops the pins, which detaches whatever they still held.
        if let Some(target) = &self.bound {
            let _ = Command::new("umount").arg(target).status();
        }
        let _ = Command::new("umount").arg(self.root.path()).status();
    }
}

const NOBODY: u32 = 65534;

/// Runs the daemon as `nobody` holding exactly `caps` (setpriv, as systemd's User= plus
/// AmbientCapabilities= would) and pinning into a bpffs like systemd's; returns whether it became
/// ready, and its log.
fn run_as_nobody(caps: &[String]) -> (bool, String) {
    run_as_nobody_pinning(caps, true)
}

fn run_as_nobody_pinning(caps: &[String], bind_pins: bool) -> (bool, String) {
    let topo = Topology::new("sdc", 1).expect("testbed");
    let dir = workdir(&topo, 1);
    // The service user reads the config and creates its socket here (as in /etc/xdp-lb, /run/xdp-lb).
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).expect("chown workdir");
    std::fs::set_permissions(dir.path().join("xdp-lb.toml"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let bpffs = Bpffs::mount(NOBODY, NOBODY, bind_pins.then(|| dir.path().join("bpf")));
    let notify = NotifySocket::bind(dir.path());
    let set: String = caps.iter().map(|c| format!(",+{c}")).collect::<String>().trim_start_matches(',').to_string();
    let mut wrapper = vec!["setpriv", "--reuid=nobody", "--regid=nogroup", "--init-groups"];
    let (inh, ambient, bounding) = (format!("--inh-caps=-all{}", if set.is_empty() { String::new() } else { format!(",{set}") }),
        format!("--ambient-caps=-all{}", if set.is_empty() { String::new() } else { format!(",{set}") }),
        format!("--bounding-set=-all{}", if set.is_empty() { String::new() } else { format!(",{set}") }));
    wrapper.extend([inh.as_str(), ambient.as_str(), bounding.as_str(), "--no-new-privs", "--"]);
    let mut daemon = launch(&topo, dir.path(), &notify.path, &wrapper, Some(&bpffs.pins()));
    // Until READY=1, or the daemon gives up (which it does at once when a permission is missing).
    let started = Instant::now();
    let mut ready = false;
    while !ready && started.elapsed() < START_TIMEOUT && daemon.child.try_wait().expect("try_wait").is_none() {
        ready = notify.next(Duration::from_millis(100)).is_some_and(|m| has_line(&m, "READY=1"));
    }
    if ready {
        assert_serving(&topo, dir.path(), 1);
        let pinned = std::fs::read_dir(bpffs.pins()).map(|d| d.count()).unwrap_or(0);
        assert!(pinned > 0, "ready but nothing pinned in {}", bpffs.pins().display());
        daemon.signal("TERM");
        assert!(daemon.wait(STEP_TIMEOUT).is_some_and(|s| s.success()), "log:\n{}", daemon.log());
    }
    let _ = daemon.wait(Duration::from_millis(500));
    (ready, daemon.log())
}

#[test]
fn the_units_capabilities_suffice_for_a_daemon_that_is_not_root_and_each_is_needed() {
    let caps = unit_capabilities("AmbientCapabilities");
    assert_eq!(caps, unit_capabilities("CapabilityBoundingSet"), "the bounding set and the ambient set differ");
    let (ready, log) = run_as_nobody(&caps);
    assert!(ready, "not ready as nobody with {caps:?}; log:\n{log}");
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let (ready, log) = run_as_nobody(&fewer);
        assert!(!ready, "ready without {missing}: the unit grants more than needed; log:\n{log}");
        eprintln!("without {missing}: {}", log.lines().filter(|l| l.contains("error")).collect::<Vec<_>>().join(" / "));
    }
}

/// One log line of `xdp-lb run` (it fails right after loading the config: the interface does not
/// exist) with stderr on a pipe and `JOURNAL_STREAM` naming that pipe, or another stream.
fn run_log(journal_is_stderr: bool) -> String {
    use std::{io::Read, os::unix::fs::MetadataExt};
    let dir = tempfile::Builder::new().prefix("xdp-lb-systemd-log-").tempdir().expect("tempdir");
    let config = dir.path().join("xdp-lb.toml");
    std::fs::write(&config, "").expect("write config");
    let (mut reader, writer) = std::io::pipe().expect("pipe");
    let pipe = std::fs::File::from(std::os::fd::OwnedFd::from(writer.try_clone().expect("dup"))).metadata().expect("fstat pipe");
    let stream = if journal_is_stderr { format!("{}:{}", pipe.dev(), pipe.ino()) } else { format!("{}:{}", pipe.dev(), pipe.ino() + 1) };
    let mut child = Command::new(XDP_LB)
        .arg("--socket")
        .arg(dir.path().join("xdp-lb.sock"))
        .args(["run", "--config"])
        .arg(&config)
        .args(["--no-pin", "--iface", "xlb-no-such-iface"])
        .env("JOURNAL_STREAM", stream)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(writer)
        .spawn()
        .expect("spawn xdp-lb");
    let status = child.wait().expect("wait");
    assert!(!status.success(), "xdp-lb run with a missing interface must fail");
    let mut text = String::new();
    reader.read_to_string(&mut text).expect("read stderr");
    text
}

fn line_with<'a>(text: &'a str, what: &str) -> &'a str {
    text.lines().find(|l| l.contains(what)).unwrap_or_else(|| panic!("no line with {what:?} in:\n{text}"))
}

#[test]
fn under_the_journal_log_lines_carry_priorities_and_neither_timestamps_nor_colours() {
    let journal = run_log(true);
    // journald reads a leading <N> as the syslog priority (journalctl -p warning) and strips it.
    let info = line_with(&journal, "INFO");
    assert!(info.starts_with("<6>") && info.trim_start_matches("<6>").trim_start().starts_with("INFO"), "journald adds its own timestamp: {info:?}");
    assert!(!journal.contains('\u{1b}'), "escape codes in the journal: {journal:?}");
    let error = line_with(&journal, "xdp-lb: error:");
    assert!(error.starts_with("<3>xdp-lb: error:") && error.contains("xlb-no-such-iface"), "the final error at priority err: {error:?}");
    // A stream that is not stderr (a child that inherited the variable but was redirected) keeps
    // timestamps and gets no prefixes.
    let file = run_log(false);
    let info = line_with(&file, "INFO");
    assert!(info.starts_with("20") && info.contains('T'), "a file needs timestamps: {info:?}");
    assert!(line_with(&file, "xdp-lb: error:").starts_with("xdp-lb: error:"), "{file}");
    assert!(!file.contains('\u{1b}'), "escape codes in a file: {file:?}");
}

#[test]
fn a_pin_directory_out_of_the_users_reach_is_reported_as_such() {
    // Without the unit's bind mount the user cannot traverse the mode-0700 bpffs root: the error
    // must say so, not send the operator off to mount a bpffs that is already there.
    let (ready, log) = run_as_nobody_pinning(&unit_capabilities("AmbientCapabilities"), false);
    assert!(!ready, "ready although the pin directory is out of reach; log:\n{log}");
    let error = line_with(&log, "xdp-lb: error:");
    assert!(error.contains("Permission denied") && !error.contains("not on a bpffs"), "{error}");
}

/// The `key=` values of a unit file, in order (comments and sections left out).
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(unit).unwrap_or_else(|e| panic!("reading {unit}: {e}"));
    text.lines().filter_map(|l| l.strip_prefix(&format!("{key}="))).map(|v| v.trim().to_string()).collect()
}

/// What issue 9 asks of the shipped units, read from the files `cargo xtask dist` installs (the
/// tests above run the daemon the way they describe; `systemd-analyze verify` checks their syntax):
/// readiness through sd_notify, a raised descriptor limit, an unprivileged user with only the
/// capabilities the daemon needs, and a reload that validates before it signals.
#[test]
fn the_shipped_units_notify_raise_nofile_and_run_unprivileged() {
    let dist = concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/systemd/");
    let one = |unit: &str, key: &str| {
        let values = unit_values(unit, key);
        assert_eq!(values.len(), 1, "{unit}: {key}= should appear once: {values:?}");
        values[0].clone()
    };
    for (unit, user, caps) in [
        (format!("{dist}xdp-lb.service"), "xdp-lb", "CAP_BPF CAP_NET_ADMIN CAP_PERFMON"),
        (format!("{dist}xdp-lb@.service"), "xdp-lb", "CAP_BPF CAP_NET_ADMIN CAP_PERFMON"),
        (format!("{dist}l7-sidecar.service"), "l7-sidecar", ""),
    ] {
        assert_eq!(one(&unit, "Type"), "notify", "{unit}");
        assert_eq!(one(&unit, "NotifyAccess"), "main", "{unit}");
        let nofile: u64 = one(&unit, "LimitNOFILE").parse().unwrap_or_else(|e| panic!("{unit}: LimitNOFILE: {e}"));
        assert!(nofile >= 65_536, "{unit}: LimitNOFILE={nofile}, below 65536");
        assert_eq!(one(&unit, "User"), user, "{unit}");
        assert_eq!(one(&unit, "AmbientCapabilities"), caps, "{unit}");
        assert_eq!(one(&unit, "CapabilityBoundingSet"), caps, "{unit}");
        assert_eq!(one(&unit, "NoNewPrivileges"), "yes", "{unit}");
        let reload = unit_values(&unit, "ExecReload");
        assert!(
            reload.len() == 2 && reload[0].contains("check") && reload[1] == "/bin/kill -HUP $MAINPID",
            "{unit}: a reload must validate the file, then send SIGHUP: {reload:?}"
        );
    }
}
