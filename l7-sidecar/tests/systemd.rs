//! Running under systemd: the binary's sd_notify messages (READY=1 only once its listeners are bound,
//! RELOADING=1/READY=1 around SIGHUP, STOPPING=1 on SIGTERM), and the completions and man page
//! generated from its clap definition.
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_l7-sidecar");
const STEP: Duration = Duration::from_secs(10);

/// Kills the child even when an assertion fails.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args(["-s", sig, &child.0.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -s {sig}");
}

/// The next datagram on the test's `$NOTIFY_SOCKET`, or a panic naming what was expected.
fn expect(socket: &UnixDatagram, what: &str) -> String {
    let deadline = std::time::Instant::now() + STEP;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline
            .saturating_duration_since(std::time::Instant::now())
            .max(Duration::from_millis(1));
        socket.set_read_timeout(Some(left)).expect("timeout");
        match socket.recv(&mut buf) {
            Ok(n) => return String::from_utf8_lossy(&buf[..n]).into_owned(),
            // A signal for another test in this process (seen in xdp-lb's twin test): wait on.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("no sd_notify message ({e}); expected {what}"),
        }
    }
}

/// True when `line` is one of the message's lines. Every message is checked to be well formed first:
/// one `KEY=VALUE` per line, keys that systemd knows (a multi-line STATUS would smuggle in others).
fn has_line(message: &str, line: &str) -> bool {
    for l in message.lines() {
        let key = l.split_once('=').map(|(k, _)| k);
        assert!(
            matches!(
                key,
                Some("READY" | "RELOADING" | "STOPPING" | "STATUS" | "MONOTONIC_USEC")
            ),
            "not a KEY=VALUE line of sd_notify: {l:?} in {message:?}"
        );
    }
    message.lines().any(|l| l == line)
}

#[test]
fn notifies_ready_once_listening_and_brackets_reloads_and_stop() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    // Nothing is proxied here; the pool's backend need not exist.
    let cfg = |route: &str| {
        format!(
            "[server]\nreload_poll_ms = 0\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\n[pools.a]\nbackends = [{{ address = \"127.0.0.1:9\" }}]\n[[routes]]\nname = \"r\"\npath = \"{route}\"\npool = \"a\"\n"
        )
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, cfg("/")).expect("write");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    let child = Child(
        Command::new(BIN)
            .arg("--config")
            .arg(&path)
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gateway"),
    );

    let ready = expect(&notify, "READY=1");
    assert!(has_line(&ready, "READY=1"), "first message: {ready:?}");
    assert!(
        ready.contains("STATUS="),
        "READY=1 without STATUS: {ready:?}"
    );
    // READY=1 promises the listener is bound.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("listener bound at READY=1");

    std::fs::write(&path, cfg("/v2")).expect("rewrite");
    signal(&child, "HUP");
    let reloading = expect(&notify, "RELOADING=1");
    assert!(has_line(&reloading, "RELOADING=1"), "{reloading:?}");
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1");
    assert!(
        usec.parse::<u64>().is_ok_and(|u| u > 0),
        "MONOTONIC_USEC={usec}"
    );
    let ready = expect(&notify, "READY=1 after the reload");
    assert!(
        has_line(&ready, "READY=1") && ready.contains("reloaded"),
        "{ready:?}"
    );

    // A rejected reload keeps serving: READY=1 again, and STATUS says why.
    std::fs::write(
        &path,
        "[[routes]]\nname = \"r\"\npath = \"nope\"\npool = \"ghost\"\n",
    )
    .expect("rewrite");
    signal(&child, "HUP");
    assert!(has_line(&expect(&notify, "RELOADING=1"), "RELOADING=1"));
    let ready = expect(&notify, "READY=1 after a rejected reload");
    assert!(
        has_line(&ready, "READY=1") && ready.contains("rejected"),
        "{ready:?}"
    );

    signal(&child, "TERM");
    assert!(has_line(&expect(&notify, "STOPPING=1"), "STOPPING=1"));
}

#[test]
fn completions_and_man_page_come_from_the_flags() {
    let out = Command::new(BIN)
        .args(["--completions", "bash"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = String::from_utf8_lossy(&out.stdout);
    assert!(
        script.contains("--config") && script.contains("--check"),
        "{script}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let man = dir.path().join("man/man1");
    let out = Command::new(BIN)
        .arg("--man-page")
        .arg(&man)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = std::fs::read_to_string(man.join("l7-sidecar.1")).expect("l7-sidecar.1 written");
    assert!(
        page.contains(".TH l7-sidecar 1") && page.contains("config"),
        "{page}"
    );

    // They stand alone: no --config needed, and no mixing with serving flags.
    let out = Command::new(BIN)
        .args(["--completions", "bash", "--check"])
        .output()
        .expect("run");
    assert!(
        !out.status.success(),
        "--completions with --check must be refused"
    );
}

/// The first log record of a gateway started with or without `JOURNAL_STREAM`.
fn first_log_record(journal: bool) -> serde_json::Value {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(
        &path,
        "[server]\nreload_poll_ms = 0\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n[pools.a]\nbackends = [{ address = \"127.0.0.1:9\" }]\n[[routes]]\nname = \"r\"\npath = \"/\"\npool = \"a\"\n",
    )
    .expect("write");
    let mut cmd = Command::new(BIN);
    cmd.arg("--config")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd.env_remove("JOURNAL_STREAM");
    if journal {
        cmd.env("JOURNAL_STREAM", "8:12345");
    }
    let mut child = Child(cmd.spawn().expect("spawn gateway"));
    let stderr = child.0.stderr.take().expect("stderr");
    let mut line = String::new();
    BufReader::new(stderr)
        .read_line(&mut line)
        .expect("read a log line");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("log line is JSON ({e}): {line}"))
}

#[test]
fn under_the_journal_log_records_carry_no_timestamp() {
    assert!(
        first_log_record(false).get("timestamp").is_some(),
        "a file or terminal needs timestamps"
    );
    let record = first_log_record(true);
    assert!(
        record.get("timestamp").is_none(),
        "journald adds its own timestamp: {record}"
    );
}
