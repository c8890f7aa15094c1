//! The CLI's behaviour at its edges, against a fake daemon (a Unix socket this test owns that answers,
//! closes mid-request or stays silent) and with a real `head` closing the pipe. No root needed.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixListener,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

const XDP_LB: &str = env!("CARGO_BIN_EXE_xdp-lb");
/// Every fake daemon gives up after this long, so no test can hang on it.
const FAKE_LIFETIME: Duration = Duration::from_secs(30);
const FAKE_MAX_CLIENTS: usize = 10_000;

/// A directory of its own for each test (sockets, config files); removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("xdp-lb-cli-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Answers each request line with `answer(request)`; `None` closes the connection unanswered (a
/// daemon dying mid-request). Records the requests it read.
struct FakeDaemon {
    requests: Arc<Mutex<Vec<Value>>>,
    _thread: JoinHandle<()>,
}

impl FakeDaemon {
    fn start(socket: &Path, answer: impl Fn(&Value) -> Option<Value> + Send + 'static) -> FakeDaemon {
        let listener = UnixListener::bind(socket).expect("binding the fake daemon");
        listener.set_nonblocking(true).expect("nonblocking");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut served = 0;
            while start.elapsed() < FAKE_LIFETIME && served < FAKE_MAX_CLIENTS {
                let Ok((stream, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                served += 1;
                stream.set_nonblocking(false).expect("blocking stream");
                stream.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
                let mut line = String::new();
                if BufReader::new(&stream).read_line(&mut line).is_err() {
                    continue;
                }
                let request: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                seen.lock().unwrap().push(request.clone());
                if let Some(reply) = answer(&request) {
                    let _ = (&stream).write_all(format!("{reply}\n").as_bytes());
                }
            }
        });
        FakeDaemon { requests, _thread: thread }
    }

    fn requests(&self) -> Vec<Value> {
        self.requests.lock().unwrap().clone()
    }
}

fn xdp_lb(socket: &Path, args: &[&str]) -> Output {
    Command::new(XDP_LB).arg("--socket").arg(socket).args(args).output().expect("running xdp-lb")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ok(data: Value) -> Option<Value> {
    Some(json!({ "ok": true, "data": data }))
}

fn backend_status(address: &str) -> Value {
    json!({
        "address": address, "weight": 1, "effective_weight": 1, "backup": false, "drained": false,
        "health": "up", "down": false, "passive_down": false, "active_flows": 0,
        "last_check": "ok", "check_latency_us": 120
    })
}

/// The daemon's answer to `status`: the config file's state and the services.
fn status_reply(services: Vec<Value>) -> Value {
    json!({
        "config": { "path": "/etc/xdp-lb/xdp-lb.toml", "loaded_unix_ms": 0, "changed_on_disk": false, "services": services.len() },
        "services": services
    })
}

fn service_status(name: &str) -> Value {
    json!({
        "name": name, "vip": "10.0.0.100:80", "protocol": "tcp", "mode": "nat", "scheduler": "maglev",
        "state": "ok", "backends": [backend_status("10.1.0.2:80"), backend_status("10.1.0.3:80")]
    })
}

/// Counters that grow with every call, so rates are non-zero.
fn stats_answer(calls: &Mutex<u64>) -> Value {
    let mut n = calls.lock().unwrap();
    *n += 1;
    let k = *n;
    json!({
        "unix_ms": 1_000_000 + k * 100,
        "snapshot": {
            "services": [{
                "name": "web", "vip": "10.0.0.100:80", "protocol": "tcp", "packets": k * 10, "bytes": k * 1000,
                "new_flows": k, "backends": [{
                    "address": "10.1.0.2:80", "weight": 1, "packets": k * 10, "bytes": k * 1000, "new_flows": k,
                    "syns": k, "syn_acks": k, "resets": 0
                }]
            }],
            "reasons": { "pass_not_vip": k }
        }
    })
}

/// Runs `xdp-lb ARGS | head -N` in bash; returns xdp-lb's exit status and the pipeline's stderr.
fn into_head(socket: &Path, args: &[&str], lines: usize) -> (i32, String) {
    let script = format!(
        "timeout 20 \"$0\" --socket \"$1\" {} | head -{lines} >/dev/null; echo \"exit=${{PIPESTATUS[0]}}\" >&2",
        args.join(" ")
    );
    let out = Command::new("bash").arg("-c").arg(script).arg(XDP_LB).arg(socket).output().expect("bash");
    let err = stderr(&out);
    let code = err
        .lines()
        .find_map(|l| l.strip_prefix("exit="))
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no exit status from the pipeline: {err}"));
    (code, err)
}

#[test]
fn status_into_a_closed_pipe_exits_quietly() {
    let dir = Scratch::new("pipe-status");
    let socket = dir.path("api.sock");
    // Far more than a pipe buffer holds, so writing must meet the closed pipe.
    let many: Vec<Value> = (0..3000).map(|i| service_status(&format!("svc{i}"))).collect();
    let _fake = FakeDaemon::start(&socket, move |_| ok(status_reply(many.clone())));
    let (code, err) = into_head(&socket, &["status"], 1);
    assert_eq!(code, 0, "`xdp-lb status | head -1` must exit 0 quietly; stderr:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("xdp-lb: error"), "stderr:\n{err}");
}

#[test]
fn stats_watch_into_a_closed_pipe_exits_quietly() {
    let dir = Scratch::new("pipe-stats");
    let socket = dir.path("api.sock");
    let calls = Mutex::new(0);
    let _fake = FakeDaemon::start(&socket, move |_| ok(stats_answer(&calls)));
    let (code, err) = into_head(&socket, &["stats", "--watch", "--interval-ms", "10"], 3);
    assert_eq!(code, 0, "`xdp-lb stats --watch | head` must exit 0 quietly; stderr:\n{err}");
    assert!(!err.contains("panicked") && !err.contains("xdp-lb: error"), "stderr:\n{err}");
}

#[test]
fn json_stats_watch_prints_one_compact_object_per_line() {
    let dir = Scratch::new("json-watch");
    let socket = dir.path("api.sock");
    let calls = Mutex::new(0);
    let _fake = FakeDaemon::start(&socket, move |_| ok(stats_answer(&calls)));
    let out = xdp_lb(&socket, &["--json", "stats", "--watch", "--count", "3", "--interval-ms", "10"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "three rounds, one line each:\n{text}");
    for line in lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("line {line:?} is not JSON: {e}"));
        assert_eq!(v["services"][0]["name"], "web", "{v}");
        assert!(v["services"][0]["packets_per_s"].as_f64().is_some_and(|r| r > 0.0), "{v}");
        assert_eq!(v["reasons"]["pass_not_vip"].as_u64().map(|n| n > 0), Some(true), "{v}");
    }
}

#[test]
fn json_check_prints_json_for_valid_and_invalid_files() {
    let dir = Scratch::new("json-check");
    let good = dir.path("good.toml");
    std::fs::write(
        &good,
        "[[services]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nprotocol = \"tcp\"\n[[services.backends]]\naddress = \"10.1.0.2:80\"\n",
    )
    .unwrap();
    let out = xdp_lb(&dir.path("unused.sock"), &["--json", "check", "--config", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["services"], 1, "{v}");

    let bad = dir.path("bad.toml");
    std::fs::write(&bad, "[[services]]\nname = \"web\"\nvip = \"nonsense\"\nprotocol = \"sctp\"\n").unwrap();
    let out = xdp_lb(&dir.path("unused.sock"), &["--json", "check", "--config", bad.to_str().unwrap()]);
    assert!(!out.status.success(), "an invalid file must fail");
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(v["ok"], false, "{v}");
    let errors = v["errors"].as_array().unwrap_or_else(|| panic!("no errors array: {v}"));
    assert!(errors.len() >= 2, "every invalid field is listed: {v}");
    for e in errors {
        assert!(e["field"].is_string() && e["message"].is_string() && e.get("line").is_some(), "{e}");
    }
    assert!(errors.iter().any(|e| e["message"].as_str().unwrap_or("").contains("nonsense")), "{v}");

    // A file that is not TOML at all is still one JSON answer.
    let broken = dir.path("broken.toml");
    std::fs::write(&broken, "[[services]\n").unwrap();
    let out = xdp_lb(&dir.path("unused.sock"), &["--json", "check", "--config", broken.to_str().unwrap()]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(v["ok"], false, "{v}");
    assert!(v["errors"][0]["message"].is_string(), "{v}");
    assert_eq!(v["errors"][0]["line"], 1, "a syntax error's line is in the JSON too: {v}");

    // An unknown key is a syntax error as well: its line, not null.
    std::fs::write(&broken, "[dataplane]\n\nconntrack_entrys = 2048\n").unwrap();
    let out = xdp_lb(&dir.path("unused.sock"), &["--json", "check", "--config", broken.to_str().unwrap()]);
    let v: Value = serde_json::from_str(&stdout(&out)).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(&out)));
    assert_eq!(v["errors"][0]["line"], 3, "{v}");
    assert!(v["errors"][0]["message"].as_str().unwrap_or_default().contains("conntrack_entrys"), "{v}");
}

/// J12: the same interface twice is refused before anything is loaded, naming both arguments.
#[test]
fn the_same_interface_twice_is_refused() {
    let dir = Scratch::new("iface-twice");
    let config = dir.path("lb.toml");
    std::fs::write(
        &config,
        "[[services]]\nname = \"web\"\nvip = \"10.0.0.100:80\"\nprotocol = \"tcp\"\n[[services.backends]]\naddress = \"10.1.0.2:80\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let out = xdp_lb(&dir.path("api.sock"), &["run", "--config", config, "--no-pin", "--iface", "lo", "--iface", "lo"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let error: Vec<&str> = err.lines().filter(|l| l.starts_with("xdp-lb: error:")).collect();
    assert_eq!(error.len(), 1, "one error line: {err}");
    assert!(error[0].contains("--iface lo: the same interface as --iface lo"), "{err}");
}

#[test]
fn an_os_error_is_printed_once() {
    // A socket path under a regular file: connect fails with ENOTDIR.
    let dir = Scratch::new("os-error");
    std::fs::write(dir.path("file"), "").unwrap();
    let out = xdp_lb(&dir.path("file").join("api.sock"), &["status"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert_eq!(err.matches("os error").count(), 1, "the OS error once:\n{err}");
}

#[test]
fn a_stale_socket_says_the_daemon_is_not_running() {
    let dir = Scratch::new("stale");
    let socket = dir.path("api.sock");
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists(), "the socket file stays behind");
    let out = xdp_lb(&socket, &["status"]);
    let err = stderr(&out);
    assert!(!out.status.success());
    assert!(err.contains("stale socket") && err.contains("not running"), "stderr:\n{err}");
    assert!(err.contains(socket.to_str().unwrap()), "names the socket:\n{err}");
}

#[test]
fn a_daemon_dying_mid_change_leaves_the_outcome_unknown() {
    let dir = Scratch::new("dies");
    let socket = dir.path("api.sock");
    let _fake = FakeDaemon::start(&socket, |_| None);
    let out = xdp_lb(&socket, &["backend", "add", "web", "10.1.0.9:80"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(3), "a distinct exit code for an unknown outcome; stderr:\n{err}");
    assert!(err.contains("unknown") && err.contains("xdp-lb status") && err.contains("service list"), "stderr:\n{err}");
    assert!(!err.contains("EOF"), "stderr:\n{err}");

    // A read-only request has no outcome to be unsure about: an ordinary error.
    let out = xdp_lb(&socket, &["status"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    assert!(err.contains("closed the connection without answering"), "stderr:\n{err}");
}

#[test]
fn service_update_without_options_is_refused_before_asking_the_daemon() {
    let dir = Scratch::new("noop");
    let socket = dir.path("api.sock");
    let fake = FakeDaemon::start(&socket, |_| ok(Value::Null));
    let out = xdp_lb(&socket, &["service", "update", "web"]);
    let err = stderr(&out);
    assert!(!out.status.success(), "a no-op update must fail; stdout: {}", stdout(&out));
    assert!(err.contains("nothing to change") && err.contains("--scheduler") && err.contains("--vip"), "stderr:\n{err}");
    assert!(fake.requests().is_empty(), "nothing was sent: {:?}", fake.requests());
}

#[test]
fn service_update_passes_force_to_the_daemon() {
    let dir = Scratch::new("force");
    let socket = dir.path("api.sock");
    let fake = FakeDaemon::start(&socket, |_| ok(Value::Null));
    let out = xdp_lb(&socket, &["service", "update", "web", "--mode", "dsr", "--force"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let requests = fake.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0]["changes"]["force"], true, "{}", requests[0]);
    assert_eq!(requests[0]["changes"]["mode"], "dsr", "{}", requests[0]);
}

#[test]
fn typed_replies_render_as_tables() {
    let dir = Scratch::new("typed");
    let socket = dir.path("api.sock");
    let _fake = FakeDaemon::start(&socket, |request| match request["command"].as_str() {
        Some("status") => ok(status_reply(vec![service_status("web")])),
        Some("explain") => ok(json!({
            "service": "web", "backend": "10.1.0.2:80", "reason": "maglev", "slot": 7, "ring_size": 251,
            "explanation": "a new flow: Maglev selects slot 7 of 251, which holds 10.1.0.2:80"
        })),
        _ => Some(json!({ "ok": false, "error": "unexpected" })),
    });
    let out = xdp_lb(&socket, &["status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("web 10.0.0.100:80 tcp/nat maglev [ok]") && text.contains("ok 120µs"), "{text}");
    let out = xdp_lb(&socket, &["explain", "192.0.2.7:1", "10.0.0.100:80"]);
    assert!(stdout(&out).starts_with("web: a new flow"), "{}", stdout(&out));

    // A reply missing a field is an error naming it, not a table of dashes.
    let dir2 = Scratch::new("typed-bad");
    let socket2 = dir2.path("api.sock");
    let _bad = FakeDaemon::start(&socket2, |_| ok(status_reply(vec![json!({ "name": "web" })])));
    let out = xdp_lb(&socket2, &["status"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(stderr(&out).contains("vip"), "{}", stderr(&out));
}

/// `--json status` prints the daemon's whole answer (the config file's state too); `backend list
/// --json` prints the list of services.
#[test]
fn json_status_prints_the_config_part_and_backend_list_the_services() {
    let dir = Scratch::new("json-status");
    let socket = dir.path("api.sock");
    let _fake = FakeDaemon::start(&socket, |request| match request["command"].as_str() {
        Some("status") => ok(status_reply(vec![service_status("web")])),
        _ => ok(json!([service_status("web")])),
    });
    let out = xdp_lb(&socket, &["--json", "status"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("status JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(status["config"]["path"], "/etc/xdp-lb/xdp-lb.toml", "{status}");
    assert_eq!(status["config"]["changed_on_disk"], false, "{status}");
    assert_eq!(status["services"][0]["name"], "web", "{status}");

    let out = xdp_lb(&socket, &["--json", "backend", "list", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let list: Value = serde_json::from_slice(&out.stdout).expect("backend list JSON");
    assert_eq!(list[0]["name"], "web", "{list}");
}

/// Any CLI error is one line: a daemon's multi-line refusal (a reload of a file with several
/// invalid fields) is joined, and a missing `--config` names its OS error once.
#[test]
fn errors_are_one_line_and_name_the_os_error_once() {
    let dir = Scratch::new("one-line");
    let socket = dir.path("api.sock");
    let refusal = "x.toml has 2 invalid field(s):\n  x.toml:3: services[0].vip: bad\n  x.toml:9: services[1].name: bad";
    let _fake = FakeDaemon::start(&socket, move |_| Some(json!({ "ok": false, "error": refusal })));
    let out = xdp_lb(&socket, &["reload"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert_eq!(err.trim_end().lines().count(), 1, "the error is not one line:\n{err}");
    assert!(err.contains("services[0].vip: bad") && err.contains("services[1].name: bad"), "{err}");

    let out = xdp_lb(&socket, &["check", "--config", "/nonexistent/xdp-lb.toml"]);
    let err = stderr(&out);
    assert!(!out.status.success() && err.contains("/nonexistent/xdp-lb.toml"), "{err}");
    assert_eq!(err.matches("os error").count(), 1, "the OS error once:\n{err}");
}

/// README: usage errors exit 2 with clap's message, before anything is sent to the daemon.
#[test]
fn usage_errors_exit_2_with_clap_messages() {
    let dir = Scratch::new("usage");
    let socket = dir.path("api.sock");
    let fake = FakeDaemon::start(&socket, |_| ok(Value::Null));
    let cases: [(&[&str], &[&str]); 4] = [
        (&["service", "add", "foo"], &["--vip", "--protocol", "required"]),
        (&["service", "add", "foo", "--vip", "10.0.0.1:80"], &["--protocol", "required"]),
        (&["explain", "192.0.2.7:4000", "10.0.0.1:80", "--proto", "sctp"], &["sctp", "--proto", "tcp", "udp"]),
        (&["service", "add", "foo", "--vip", "10.0.0.1:80", "--protocol", "sctp"], &["sctp", "--protocol", "tcp", "udp"]),
    ];
    for (args, wanted) in cases {
        let out = xdp_lb(&socket, args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?} is a usage error; stderr:\n{err}");
        for w in wanted {
            assert!(err.contains(w), "{args:?}: stderr names {w}:\n{err}");
        }
        assert!(err.starts_with("error:") && err.contains("--help"), "{args:?}: clap's message:\n{err}");
    }
    assert!(fake.requests().is_empty(), "nothing was sent: {:?}", fake.requests());
}

#[test]
fn a_regular_file_as_socket_says_it_is_not_a_socket() {
    let dir = Scratch::new("not-socket");
    let file = dir.path("api.sock");
    std::fs::write(&file, "").unwrap();
    let out = xdp_lb(&file, &["status"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    assert!(err.contains("not a socket") && err.contains(file.to_str().unwrap()), "stderr:\n{err}");
    assert!(!err.contains("no socket at"), "the file is there:\n{err}");
}

/// What `cargo xtask dist` ships: completions for every shell and one man page per visible command,
/// both generated from the binary's own clap definitions (so a new flag appears in them).
#[test]
fn completions_and_man_pages_come_from_the_binarys_own_definitions() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = Command::new(XDP_LB).args(["completions", shell]).output().expect("running xdp-lb completions");
        assert!(out.status.success(), "completions {shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8_lossy(&out.stdout);
        for word in ["service", "backend", "undrain", "explain", "allow-empty", "check-interval-ms"] {
            assert!(script.contains(word), "the {shell} completions lack {word:?}");
        }
    }
    let scratch = Scratch::new("man");
    let dir = scratch.path("man");
    let out = Command::new(XDP_LB).arg("man-pages").arg(&dir).output().expect("running xdp-lb man-pages");
    assert!(out.status.success(), "man-pages: {}", String::from_utf8_lossy(&out.stderr));
    let mut pages: Vec<String> = std::fs::read_dir(&dir).expect("man dir").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
    pages.sort();
    for page in ["xdp-lb.1", "xdp-lb-run.1", "xdp-lb-check.1", "xdp-lb-reload.1", "xdp-lb-service-update.1", "xdp-lb-backend-drain.1", "xdp-lb-node-drain.1"] {
        assert!(pages.iter().any(|p| p == page), "no {page} in {pages:?}");
    }
    assert!(!pages.iter().any(|p| p.contains("man-pages") || p.contains("completions")), "hidden commands got pages: {pages:?}");
    let run = std::fs::read_to_string(dir.join("xdp-lb-run.1")).expect("xdp-lb-run.1");
    assert!(run.contains(".TH xdp-lb-run 1") && run.contains("allow\\-empty"), "{run}");
}
