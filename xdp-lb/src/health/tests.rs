//! The engine against real loopback servers started by the tests. Every wait is bounded.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc::UnboundedReceiver,
    task::{JoinHandle, JoinSet},
};

use super::*;

const WAIT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Answer every request with this status.
    Status(u16),
    /// Accept and read the request, but never answer.
    Silent,
}

/// A tiny HTTP responder; a TCP check just connects to it.
struct Server {
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(mode: Mode) -> Server {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind loopback");
        Server::serve(listener, mode)
    }

    /// Binds `addr` again after a previous server there was shut down.
    async fn restart_on(addr: SocketAddr, mode: Mode) -> Server {
        let deadline = Instant::now() + WAIT;
        loop {
            match TcpListener::bind(addr).await {
                Ok(listener) => return Server::serve(listener, mode),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {addr}: {e}, retrying");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("could not rebind {addr}: {e}"),
            }
        }
    }

    fn serve(listener: TcpListener, mode: Mode) -> Server {
        let addr = listener.local_addr().expect("local addr");
        let mode = Arc::new(Mutex::new(mode));
        let shared_mode = Arc::clone(&mode);
        let task = tokio::spawn(async move {
            // Owned by this task, so aborting the server also ends its (silent) connections.
            let mut connections = JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let mode = *shared_mode.lock().unwrap();
                connections.spawn(answer(stream, mode));
                while connections.try_join_next().is_some() {}
            }
        });
        Server { addr, mode, task }
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Returns once the listener is closed.
    async fn shutdown(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: TcpStream, mode: Mode) {
    let mut request = Vec::new();
    let mut chunk = [0u8; 512];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
        match tokio::time::timeout(WAIT, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => request.extend_from_slice(&chunk[..n]),
            _ => return, // A TCP check closes without sending anything.
        }
    }
    match mode {
        Mode::Status(code) => {
            let response = format!("HTTP/1.1 {code} Test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = stream.write_all(response.as_bytes()).await;
        }
        Mode::Silent => std::future::pending::<()>().await,
    }
}

fn fast(kind: CheckKind) -> CheckSpec {
    CheckSpec {
        kind,
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(40),
        rise: 2,
        fall: 3,
    }
}

fn http(path: &str) -> CheckKind {
    CheckKind::Http { path: path.into(), expect: 200..=399 }
}

fn target(service: &str, addr: SocketAddr) -> Target {
    Target { service: service.into(), addr }
}

/// An address with (almost certainly) nothing listening on it.
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.expect("bind loopback");
    listener.local_addr().expect("local addr")
}

async fn next_transition(rx: &mut UnboundedReceiver<Transition>) -> Transition {
    match tokio::time::timeout(WAIT, rx.recv()).await {
        Ok(Some(transition)) => transition,
        Ok(None) => panic!("transition channel closed"),
        Err(_) => panic!("no transition within {WAIT:?}"),
    }
}

fn assert_transition(transition: &Transition, target: &Target, from: Health, to: Health, reason: &str) {
    assert_eq!(&transition.target, target, "{transition:?}");
    assert_eq!((transition.from, transition.to), (from, to), "{transition:?}");
    assert!(transition.reason.contains(reason), "reason {:?} lacks {reason:?}", transition.reason);
}

async fn wait_for(monitor: &HealthMonitor, target: &Target, what: &str, cond: impl Fn(&Status) -> bool) -> Status {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = monitor.status(target);
        match status {
            Some(status) if cond(&status) => return status,
            _ if Instant::now() >= deadline => panic!("{target:?} not {what} within {WAIT:?}: {status:?}"),
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_target_goes_up_down_and_up_again() {
    let server = Server::start(Mode::Status(200)).await;
    let addr = server.addr;
    let web = target("web", addr);
    let (mut monitor, mut rx) = HealthMonitor::new();
    monitor.set_targets([(web.clone(), fast(CheckKind::Tcp))]);
    assert_eq!(monitor.status(&web).map(|s| s.health), Some(Health::Unknown));

    assert_transition(&next_transition(&mut rx).await, &web, Health::Unknown, Health::Up, "2 consecutive successful");
    let status = monitor.status(&web).expect("status");
    assert_eq!((status.health, status.last_ok, status.last_error), (Health::Up, Some(true), None));

    server.shutdown().await;
    assert_transition(&next_transition(&mut rx).await, &web, Health::Up, Health::Down, "connection refused");
    let status = monitor.status(&web).expect("status");
    assert_eq!((status.health, status.last_ok), (Health::Down, Some(false)));
    assert!(status.consecutive_fail >= 3 && status.consecutive_ok == 0, "{status:?}");

    let _server = Server::restart_on(addr, Mode::Status(200)).await;
    assert_transition(&next_transition(&mut rx).await, &web, Health::Down, Health::Up, "successful");
}

// Current-thread runtime on purpose: the monitor must work there too.
#[tokio::test]
async fn tcp_target_with_nothing_listening_goes_down() {
    let dead = target("db", closed_port().await);
    let (mut monitor, mut rx) = HealthMonitor::new();
    monitor.set_targets([(dead.clone(), fast(CheckKind::Tcp))]);

    let transition = next_transition(&mut rx).await;
    assert_transition(&transition, &dead, Health::Unknown, Health::Down, "connection refused");
    assert!(transition.reason.contains("3 consecutive failed"), "{transition:?}");
    let status = monitor.status(&dead).expect("status");
    assert_eq!(status.last_error.as_deref(), Some("connection refused"));
    assert_eq!((status.last_latency_us, status.latency_ewma_us), (None, None));
    assert!(status.checked_at_unix_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_check_works_on_ipv6_loopback() {
    let Ok(listener) = TcpListener::bind("[::1]:0").await else {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    };
    let server = Server::serve(listener, Mode::Status(200));
    let v6 = target("v6", server.addr);
    let (mut monitor, mut rx) = HealthMonitor::new();
    monitor.set_targets([(v6.clone(), fast(http("/")))]);
    assert_transition(&next_transition(&mut rx).await, &v6, Health::Unknown, Health::Up, "successful");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_target_follows_the_status_code() {
    let server = Server::start(Mode::Status(200)).await;
    let api = target("api", server.addr);
    let (mut monitor, mut rx) = HealthMonitor::new();
    monitor.set_targets([(api.clone(), fast(http("/healthz")))]);
    assert_transition(&next_transition(&mut rx).await, &api, Health::Unknown, Health::Up, "successful");

    server.set(Mode::Status(503));
    assert_transition(&next_transition(&mut rx).await, &api, Health::Up, Health::Down, "HTTP 503 not in 200-399");
    let status = monitor.status(&api).expect("status");
    assert_eq!(status.last_error.as_deref(), Some("HTTP 503 not in 200-399"));

    server.set(Mode::Status(204));
    assert_transition(&next_transition(&mut rx).await, &api, Health::Down, Health::Up, "successful");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_target_that_never_answers_times_out() {
    let server = Server::start(Mode::Silent).await;
    let stuck = target("stuck", server.addr);
    let (mut monitor, mut rx) = HealthMonitor::new();
    monitor.set_targets([(stuck.clone(), fast(http("/")))]);
    assert_transition(&next_transition(&mut rx).await, &stuck, Health::Unknown, Health::Down, "timeout after 40 ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_targets_keeps_unchanged_forgets_removed_and_restarts_changed() {
    let server_a = Server::start(Mode::Status(503)).await;
    let server_b = Server::start(Mode::Status(200)).await;
    let (a, b) = (target("svc", server_a.addr), target("svc", server_b.addr));
    let c = target("other", closed_port().await);
    let (mut monitor, mut rx) = HealthMonitor::new();
    // TCP on a server that answers 503: the TCP check does not care.
    monitor.set_targets([(a.clone(), fast(CheckKind::Tcp)), (b.clone(), fast(CheckKind::Tcp))]);
    for t in [&a, &b] {
        wait_for(&monitor, t, "up", |s| s.health == Health::Up).await;
    }

    // Unchanged `a` keeps its state, removed `b` is forgotten, new `c` starts from Unknown.
    let before = monitor.status(&a).expect("status");
    monitor.set_targets([(a.clone(), fast(CheckKind::Tcp)), (c.clone(), fast(CheckKind::Tcp))]);
    let after = monitor.status(&a).expect("status");
    assert_eq!(after.health, Health::Up);
    assert!(after.consecutive_ok >= before.consecutive_ok, "{before:?} -> {after:?}");
    assert_eq!(monitor.status(&b), None);
    assert_eq!(monitor.status(&c).map(|s| s.health), Some(Health::Unknown));
    assert_eq!(monitor.statuses().keys().collect::<Vec<_>>(), [&c, &a]); // "other" < "svc"
    // An in-flight probe of `b` must not bring it back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(monitor.status(&b), None);
    wait_for(&monitor, &c, "down", |s| s.health == Health::Down).await;

    // Changing `a` to an HTTP check restarts it: counters reset, health kept until the new check
    // has failed `fall` times, then the 503 takes it down.
    monitor.set_targets([(a.clone(), fast(http("/"))), (c.clone(), fast(CheckKind::Tcp))]);
    let restarted = monitor.status(&a).expect("status");
    assert_eq!((restarted.health, restarted.consecutive_ok), (Health::Up, 0));
    let transitions: Vec<Transition> = std::iter::from_fn(|| rx.try_recv().ok()).collect();
    assert!(transitions.iter().all(|t| t.target != a || t.to == Health::Up), "{transitions:?}");
    let down = loop {
        let transition = next_transition(&mut rx).await;
        if transition.target == a {
            break transition;
        }
    };
    assert_transition(&down, &a, Health::Up, Health::Down, "HTTP 503");

    monitor.set_targets([]);
    assert!(monitor.statuses().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_is_recorded_for_successful_checks() {
    let server = Server::start(Mode::Status(200)).await;
    let web = target("web", server.addr);
    let (mut monitor, _rx) = HealthMonitor::new();
    monitor.set_targets([(web.clone(), fast(http("/")))]);
    let status = wait_for(&monitor, &web, "checked 3 times", |s| s.consecutive_ok >= 3).await;
    let last = status.last_latency_us.expect("last latency");
    let ewma = status.latency_ewma_us.expect("latency EWMA");
    assert!(ewma.is_finite() && ewma >= 0.0, "{status:?}");
    // Every sample is below the timeout, so their average is too.
    assert!(last < 40_000 && ewma < 40_000.0, "{status:?}");
    assert!(status.checked_at_unix_ms.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_monitor_stops_its_checks() {
    let server = Server::start(Mode::Status(200)).await;
    let (mut monitor, mut rx) = HealthMonitor::new();
    monitor.set_targets([(target("web", server.addr), fast(CheckKind::Tcp))]);
    next_transition(&mut rx).await;
    drop(monitor);
    // The channel closes once every task (each holding a sender) has ended.
    let deadline = Instant::now() + WAIT;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline.into(), rx.recv()).await {}
    assert!(Instant::now() < deadline, "checks still running after the monitor was dropped");
}

#[test]
fn invalid_specs_and_missing_runtime_are_reported_not_panicked() {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let server = runtime.block_on(Server::start(Mode::Status(200)));
    let (ok, bad) = (target("ok", server.addr), target("bad", server.addr));
    let bad_spec = CheckSpec { rise: 0, ..fast(CheckKind::Tcp) };

    // Created and fed outside any runtime: nothing can run yet, and it says so.
    let (mut monitor, _rx) = HealthMonitor::new();
    monitor.set_targets([(ok.clone(), fast(CheckKind::Tcp)), (bad.clone(), bad_spec.clone())]);
    let status = monitor.status(&ok).expect("status");
    assert_eq!(status.health, Health::Unknown);
    assert!(status.last_error.expect("error").contains("no tokio runtime"));
    let status = monitor.status(&bad).expect("status");
    assert!(status.last_error.expect("error").contains("invalid check spec: rise"));

    // The same targets from inside a runtime: the valid one starts, the invalid one stays put.
    let _guard = runtime.enter();
    monitor.set_targets([(ok.clone(), fast(CheckKind::Tcp)), (bad.clone(), bad_spec)]);
    runtime.block_on(wait_for(&monitor, &ok, "up", |s| s.health == Health::Up));
    assert_eq!(monitor.status(&bad).map(|s| s.health), Some(Health::Unknown));
}

#[test]
#[allow(clippy::reversed_empty_ranges)]
fn validate_rejects_bad_specs() {
    let ms = Duration::from_millis;
    let http_spec = |path: &str, expect| CheckSpec { kind: CheckKind::Http { path: path.into(), expect }, ..CheckSpec::default() };
    let cases = [
        (CheckSpec { interval: ms(0), ..CheckSpec::default() }, "interval must be greater than 0"),
        (CheckSpec { interval: Duration::MAX, ..CheckSpec::default() }, "interval must be at most"),
        (CheckSpec { timeout: ms(0), ..CheckSpec::default() }, "timeout must be greater than 0"),
        (CheckSpec { timeout: ms(501), ..CheckSpec::default() }, "must not exceed interval"),
        (CheckSpec { rise: 0, ..CheckSpec::default() }, "rise must be at least 1"),
        (CheckSpec { fall: 0, ..CheckSpec::default() }, "fall must be at least 1"),
        (http_spec("healthz", 200..=399), "must start with '/'"),
        (http_spec("", 200..=399), "must start with '/'"),
        (http_spec("/a b", 200..=399), "whitespace"),
        (http_spec("/a\r\nX: y", 200..=399), "whitespace"),
        (http_spec("/", 99..=399), "within 100-599"),
        (http_spec("/", 200..=600), "within 100-599"),
        // Hostile 9 H8: not valid in a request-target (RFC 3986/9112), so never sent raw.
        (http_spec("/a\"b", 200..=399), "'\"' (character 3)"),
        (http_spec("/a\\b", 200..=399), "request target"),
        (http_spec("/a[b", 200..=399), "%5B"),
        (http_spec("/a]b", 200..=399), "%5D"),
        (http_spec("/a{b}", 200..=399), "request target"),
        (http_spec("/caf\u{e9}", 200..=399), "request target"),
        (http_spec("/a#frag", 200..=399), "request target"),
        (http_spec("/a%zz", 200..=399), "'%' must start a percent-encoding"),
        (http_spec("/", 399..=200), "non-empty"),
    ];
    for (spec, expected) in cases {
        let error = spec.validate().expect_err(expected);
        assert!(error.contains(expected), "{spec:?}: {error:?} lacks {expected:?}");
    }
    assert_eq!(http_spec("/healthz?full=1", 100..=599).validate(), Ok(()));
    assert_eq!(http_spec("/a%22b/~x_y-z.1;p=2&q=%5B1%5D:@!$'()*+,", 200..=399).validate(), Ok(()));
    assert_eq!(CheckSpec { timeout: ms(500), ..CheckSpec::default() }.validate(), Ok(()));
}

#[test]
fn default_spec_detects_a_dead_backend_within_two_seconds_on_paper() {
    let spec = CheckSpec::default();
    assert_eq!(spec.validate(), Ok(()));
    assert_eq!(spec.kind, CheckKind::Tcp);
    // fall × interval + timeout = 3 × 500 ms + 400 ms
    assert_eq!(spec.worst_case_detection(), Duration::from_millis(1900));
    assert!(spec.worst_case_detection() <= Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_spec_detects_a_dead_backend_within_two_seconds_in_practice() {
    let server = Server::start(Mode::Status(200)).await;
    let web = target("web", server.addr);
    let (mut monitor, mut rx) = HealthMonitor::new();
    monitor.set_targets([(web.clone(), CheckSpec::default())]);
    assert_transition(&next_transition(&mut rx).await, &web, Health::Unknown, Health::Up, "successful");

    server.shutdown().await;
    let died = Instant::now();
    assert_transition(&next_transition(&mut rx).await, &web, Health::Up, Health::Down, "connection refused");
    let detected_after = died.elapsed();
    assert!(detected_after <= Duration::from_secs(2), "took {detected_after:?}");
}

#[test]
fn status_lines_are_parsed_strictly() {
    let parse = |line: &str| parse_status_line(line.as_bytes()).map_err(|e| e.to_string());
    assert_eq!(parse("HTTP/1.1 200 OK\r"), Ok(200));
    assert_eq!(parse("HTTP/1.0 503"), Ok(503));
    assert_eq!(parse("HTTP/1.1 404 Not Found"), Ok(404));
    for bad in ["", "garbage", "HTTP/1.1 20 OK", "HTTP/1.1 2000 OK", "HTTP/1.1 +20 OK", "SSH-2.0-OpenSSH", "HTTP/1.1  200"] {
        assert!(parse(bad).is_err_and(|e| e.starts_with("malformed status line")), "{bad:?} parsed");
    }
}

#[test]
fn latency_average_is_exponentially_weighted() {
    assert_eq!(ewma(None, 100.0), 100.0);
    assert!((ewma(Some(100.0), 200.0) - 130.0).abs() < 1e-9);
    // A single outlier moves the average by only 30 % of the difference.
    let mut avg = None;
    for sample in [100.0, 100.0, 100.0, 1100.0] {
        avg = Some(ewma(avg, sample));
    }
    assert!((avg.unwrap_or_default() - 400.0).abs() < 1e-9);
}

#[test]
fn errors_read_as_reasons() {
    let timeout = CheckError::Timeout(Duration::from_millis(400));
    assert_eq!(timeout.to_string(), "timeout after 400 ms");
    let status = CheckError::UnexpectedStatus { code: 503, expect: 200..=399 };
    assert_eq!(status.to_string(), "HTTP 503 not in 200-399");
}

/// A target already `Up` with one failure on record, as `record` sees it.
fn up_slot(target: &Target) -> SharedStatuses {
    let mut status = Status::new(Health::Up);
    status.last_ok = Some(false);
    status.consecutive_fail = 1;
    let shared = SharedStatuses::default();
    lock(&shared).insert(target.clone(), Slot { generation: 7, status });
    shared
}

#[test]
fn a_probe_that_failed_on_this_host_is_inconclusive() {
    let target = Target { service: "web".into(), addr: "10.1.0.2:80".parse().unwrap() };
    let spec = CheckSpec { fall: 2, ..CheckSpec::default() };
    let shared = up_slot(&target);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let local = LocalErrors::default();
    // Far more than `fall` local errors in a row: EMFILE at connect, then ENOBUFS on the write.
    for _ in 0..10 {
        let emfile = CheckError::Connect(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(record(&shared, &tx, &local, &target, 7, &spec, Err(emfile)));
        let enobufs = CheckError::Io(io::Error::from_raw_os_error(libc::ENOBUFS));
        assert!(record(&shared, &tx, &local, &target, 7, &spec, Err(enobufs)));
    }
    let status = lock(&shared)[&target].status.clone();
    assert_eq!(status.health, Health::Up, "{status:?}");
    assert_eq!(status.consecutive_fail, 1, "local errors are not failures: {status:?}");
    assert_eq!(status.last_ok, None);
    assert!(status.last_error.as_deref().is_some_and(|e| e.contains("inconclusive")), "{status:?}");
    assert!(rx.try_recv().is_err(), "no transition");
    let counts = local.counts();
    assert!(counts.contains(&("process_fd_limit", 10)), "{counts:?}");
    assert!(counts.contains(&("no_buffer_space", 10)), "{counts:?}");

    // A backend-side failure still counts: with fall = 2 this one makes it Down.
    let refused = CheckError::Refused;
    assert!(record(&shared, &tx, &local, &target, 7, &spec, Err(refused)));
    assert_eq!(lock(&shared)[&target].status.health, Health::Down);
    assert_eq!(rx.try_recv().map(|t| t.to).ok(), Some(Health::Down));
}

#[tokio::test]
async fn a_probe_from_a_process_out_of_file_descriptors_is_local() {
    // What the probe really returns at the fd limit: the socket cannot even be created. Holding
    // every descriptor would disturb the other tests of this process, so this checks the error
    // path end to end with a connect that fails locally for another reason instead: an
    // unassigned source address is EADDRNOTAVAIL, decided before any packet leaves.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    let err = socket.bind("192.0.2.1:0".parse().unwrap()).expect_err("192.0.2.1 is not ours");
    assert_eq!(CheckError::Connect(err).local_reason(), Some(LocalReason::NoLocalAddress));
}

/// Set in the child process of [`a_probe_at_the_descriptor_limit_fails_locally`].
const EMFILE_CHILD: &str = "XDP_LB_TEST_EMFILE_CHILD";

/// The real probe in a process with no descriptor left classifies its error as local. It runs in a
/// child process (this test binary again, running only this test), because using up every
/// descriptor here would break the tests running alongside.
#[test]
fn a_probe_at_the_descriptor_limit_fails_locally() {
    if std::env::var_os(EMFILE_CHILD).is_some() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let mut held = Vec::new();
        let error = loop {
            match std::fs::File::open("/dev/null") {
                Ok(file) => held.push(file),
                Err(e) => break e,
            }
            assert!(held.len() < 1 << 21, "no descriptor limit reached after {} files", held.len());
        };
        assert_eq!(error.raw_os_error(), Some(libc::EMFILE), "{error}");
        let result = runtime.block_on(probe(SocketAddr::from((Ipv4Addr::LOCALHOST, 9)), &CheckSpec::default()));
        drop(held);
        let error = result.expect_err("no socket can be opened");
        assert_eq!(error.local_reason(), Some(LocalReason::ProcessFdLimit), "{error}");
        return;
    }
    let name = "health::tests::a_probe_at_the_descriptor_limit_fails_locally";
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", name, "--test-threads=1"])
        .env(EMFILE_CHILD, "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Hostile 9 H8: the config (and so `service update --check-path`, which is validated as the
/// config) refuses a path that is not a valid request target, naming the field.
#[test]
fn a_check_path_that_is_not_a_request_target_is_refused_in_the_config() {
    let text = r#"
[[services]]
name = "web"
vip = "10.0.0.100:80"
protocol = "tcp"
[services.health_check]
kind = "http"
path = '/a"b]]\[x'
"#;
    let error = crate::config::RawConfig::parse(text, "lb.toml").expect_err("accepted an invalid check path").to_string();
    assert!(error.contains("services[0].health_check.path") && error.contains("request target"), "{error}");
}
