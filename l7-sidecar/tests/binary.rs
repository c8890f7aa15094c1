//! The `l7-sidecar` binary itself: refuses invalid files, serves and reloads valid ones.
mod common;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_l7-sidecar");

#[test]
fn check_flag_validates_the_example_and_rejects_invalid_files() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway.toml");
    let out = Command::new(BIN)
        .args(["--check", "--config", example])
        .env("GATEWAY_JWT_SECRET", "example-secret-for-tests")
        .output()
        .expect("run binary");
    assert!(
        out.status.success(),
        "example rejected: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // --check lists the routes in match order: host-specific template routes first, the
    // host-less /healthz last (a host beats an exact path).
    let stdout = String::from_utf8_lossy(&out.stdout);
    let listed: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains(" -> "))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(listed.len(), 8, "{stdout}");
    assert_eq!(listed.first(), Some(&"user-by-id"), "{stdout}");
    assert_eq!(listed.last(), Some(&"public-health"), "{stdout}");
    assert!(
        !stdout.contains("example-secret-for-tests"),
        "secret printed: {stdout}"
    );

    // Without the variable the example's secret is missing: the error names the field
    // and the variable, never a value.
    let out = Command::new(BIN)
        .args(["--check", "--config", example])
        .env_remove("GATEWAY_JWT_SECRET")
        .output()
        .expect("run binary");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "auth.jwt.keys[0].secret: environment variable \"GATEWAY_JWT_SECRET\" is not set"
        ),
        "{err}"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[routes]]\nname = \"r\"\npath = \"nope\"\npool = \"ghost\"\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["--config", bad.to_str().expect("utf8 path")])
        .output()
        .expect("run binary");
    assert!(!out.status.success(), "invalid config must not start");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("routes[0].path") && err.contains("routes[0].pool"),
        "every error listed: {err}"
    );
}

// Hostile test r3, 7: an unset secret variable was reported, then followed by anyhow's
// debug dump and stack backtrace (RUST_BACKTRACE set). The error chain comes once, alone.
#[test]
fn check_reports_an_unset_secret_variable_without_a_backtrace() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway.toml");
    let out = Command::new(BIN)
        .args(["--check", "--config", example])
        .env_remove("GATEWAY_JWT_SECRET")
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .expect("run binary");
    assert!(!out.status.success(), "an unset secret fails --check");
    let err = String::from_utf8_lossy(&out.stderr);
    let unset = "environment variable \"GATEWAY_JWT_SECRET\" is not set";
    assert_eq!(err.matches(unset).count(), 1, "named once: {err}");
    assert!(err.contains("gateway.toml"), "names the file: {err}");
    for dump in ["backtrace", "Backtrace", "Caused by", "Error {", "at src/", "at /"] {
        assert!(!err.contains(dump), "no {dump:?} in: {err}");
    }
}

#[test]
fn check_prints_a_toml_syntax_error_once_and_refuses_unresolvable_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server\nmax_body_bytes = 1\n").expect("write");
    let out = Command::new(BIN)
        .args(["--check", "--config", bad.to_str().expect("utf8 path")])
        .output()
        .expect("run binary");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("[server").count(), 1, "printed once: {err}");

    let named = dir.path().join("named.toml");
    std::fs::write(
        &named,
        "[pools.p]\nbackends = [{ address = \"localhost:8080\" }, { address = \"nothing-here.invalid:80\" }]\n",
    )
    .expect("write");
    let out = Command::new(BIN)
        .args(["--check", "--config", named.to_str().expect("utf8 path")])
        .output()
        .expect("run binary");
    assert!(!out.status.success(), "an unresolvable name fails --check");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pools.p.backends[1].address: cannot resolve \"nothing-here.invalid:80\""),
        "{err}"
    );
    assert!(!err.contains("localhost"), "localhost resolves: {err}");
}

/// Kills the child even when an assertion fails.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn binary_serves_and_reloads_on_sighup() {
    let (a, b) = (upstream("a").await, upstream("b").await);
    // Reserve a port for the gateway: bind, read it, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let cfg = |target: &str| {
        format!(
            "[server]\nreload_poll_ms = 0\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\n{}{}[[routes]]\nname = \"r\"\npath = \"/\"\npool = \"{target}\"\n",
            pool("a", &[&a], ""),
            pool("b", &[&b], "")
        )
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, cfg("a")).expect("write");
    let mut child = Child(
        Command::new(BIN)
            .args(["--config", path.to_str().expect("utf8 path")])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn gateway"),
    );
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let c = client();
    let url = format!("http://127.0.0.1:{port}/x");
    let mut up = false;
    for _ in 0..100 {
        let req = http::Request::get(&url)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("req");
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_millis(500), c.request(req)).await {
            up = r.status() == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "binary serves on its port");
    assert_eq!(get(&c, &url, &[]).await.json()["service"], "a");
    let line = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("access log line")
        .expect("line");
    let rec: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("access log is JSON ({e}): {line}"));
    assert_eq!(rec["path"], "/x");

    std::fs::write(&path, cfg("b")).expect("rewrite");
    let pid = child.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .expect("kill")
        .success());
    let mut switched = false;
    for _ in 0..100 {
        if get(&c, &url, &[]).await.json()["service"] == "b" {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(switched, "SIGHUP reloaded the binary's config");
}

#[test]
fn a_worker_count_of_zero_is_refused_by_name() {
    let out = Command::new(BIN)
        .args(["--workers", "0", "--config", "unused.toml"])
        .output()
        .expect("run binary");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--workers"), "{err}");
}

/// One GET over a new connection; the status line.
fn status_of_get(port: u16, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.lines().next().unwrap_or_default().to_string())
}

/// `BIN --config` under `prlimit --nofile=SOFT:HARD`, stderr to a file.
fn gateway_with_nofile(cfg: &str, soft: u64, hard: u64) -> (Child, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, cfg).expect("write");
    let log = std::fs::File::create(dir.path().join("stderr")).expect("log");
    let child = Command::new("prlimit")
        .arg(format!("--nofile={soft}:{hard}"))
        .args([BIN, "--workers", "2", "--config", path.to_str().expect("utf8")])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn prlimit l7-sidecar");
    (Child(child), dir)
}

// Hostile test s15a-9: under a shell's soft open-file limit descriptors ran out long
// before `max_connections`, and then nothing was accepted: not the public listener's
// clients, not the admin listener that has its own budget to stay reachable in a flood.
// The gateway raises its soft limit to the hard one at start.
#[tokio::test]
async fn the_soft_open_file_limit_is_raised_so_a_flood_past_it_locks_nobody_out() {
    let a = upstream("a").await;
    let (port, admin) = (free_port(), free_port());
    let cfg = format!(
        "[server]\nreload_poll_ms = 0\nmax_connections = 1000\nmax_connections_per_ip = 1000\n\
         [admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         [[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\n{}\
         [[routes]]\nname = \"r\"\npath = \"/\"\npool = \"a\"\n",
        pool("a", &[&a], "")
    );
    let (child, dir) = gateway_with_nofile(&cfg, 256, 4096);
    let pid = child.0.id();
    let ready = tokio::task::spawn_blocking(move || {
        (0..100).any(|_| {
            std::thread::sleep(Duration::from_millis(50));
            status_of_get(port, "/x").is_ok_and(|s| s.contains(" 200"))
        })
    });
    assert!(ready.await.expect("join"), "gateway serves");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or_default()
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect::<Vec<_>>();
    // prlimit execs the gateway: the pid is the gateway's.
    assert_eq!(open_files, ["4096", "4096"], "{limits}");
    // More idle connections than the old soft limit allowed descriptors.
    let flood = tokio::task::spawn_blocking(move || {
        (0..400)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
            .collect::<Vec<_>>()
    })
    .await
    .expect("join");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (public, admin_status) = tokio::task::spawn_blocking(move || {
        (status_of_get(port, "/x"), status_of_get(admin, "/admin/traces"))
    })
    .await
    .expect("join");
    drop(flood);
    let log = std::fs::read_to_string(dir.path().join("stderr")).unwrap_or_default();
    assert!(public.as_ref().is_ok_and(|s| s.contains(" 200")), "public: {public:?}\n{log}");
    assert!(
        admin_status.as_ref().is_ok_and(|s| s.starts_with("HTTP/1.1 ")),
        "admin: {admin_status:?}\n{log}"
    );
    assert!(log.contains("raised the open-file limit"), "{log}");
    assert!(!log.contains("open-file limit 4096 is below"), "{log}");
}

/// The gateway's stderr under `prlimit --nofile=SOFT:HARD` once it holds `wanted` (or
/// after 5 s), and `--check`'s stderr under the same limits.
fn log_and_check_under_nofile(cfg: &str, soft: u64, hard: u64, wanted: &str) -> (String, String) {
    let (child, dir) = gateway_with_nofile(cfg, soft, hard);
    let stderr = dir.path().join("stderr");
    let mut log = String::new();
    for _ in 0..100 {
        log = std::fs::read_to_string(&stderr).unwrap_or_default();
        if log.contains(wanted) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    let path = dir.path().join("gw.toml");
    let out = Command::new("prlimit")
        .args([&format!("--nofile={soft}:{hard}"), BIN, "--check", "--config", path.to_str().expect("utf8")])
        .output()
        .expect("run --check");
    assert!(out.status.success(), "--check: {out:?}");
    (log, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_hard_open_file_limit_below_the_budgets_is_warned_about_by_name() {
    let port = free_port();
    let cfg = format!(
        "[server]\nreload_poll_ms = 0\nmax_connections = 1000\n\
         [[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\n"
    );
    let (log, check) = log_and_check_under_nofile(&cfg, 512, 1024, "is below");
    assert!(
        log.contains("open-file limit 1024 is below the 2064 descriptors")
            && log.contains("server.max_connections 1000"),
        "{log}"
    );
    // --check says so too, before anything starts.
    assert!(check.contains("warning: open-file limit 1024 is below"), "{check}");
}

// The default `max_connections` (10 000) needs 20 064 descriptors: under a smaller hard
// limit every start warned about a setting the operator never made, and the gateway ran
// out of descriptors before its limit. Unwritten, it is now fitted to the limit.
#[test]
fn an_unset_max_connections_fits_the_open_file_limit_without_a_warning() {
    let port = free_port();
    let cfg = format!("[server]\nreload_poll_ms = 0\n[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:{port}\"\n");
    let (log, check) = log_and_check_under_nofile(&cfg, 512, 1024, "instead of 10000");
    assert!(log.contains("server.max_connections (not set) is 480 instead of 10000"), "{log}");
    assert!(!log.contains("is below"), "{log}");
    assert!(check.contains("note: server.max_connections (not set) is 480") && !check.contains("warning: open-file"), "{check}");
}

// Hostile test s16-F8: a worker that could not start printed its OS error twice
// ("Too many open files (os error 24): Too many open files (os error 24)").
#[test]
fn a_worker_that_cannot_start_names_its_error_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gw.toml");
    std::fs::write(&path, "[[listeners]]\nname = \"p\"\nbind = \"127.0.0.1:0\"\n").expect("write");
    let out = Command::new("prlimit")
        .args(["--nofile=12:12", BIN, "--workers", "8", "--config", path.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err.lines().find(|l| l.starts_with("error: ")).unwrap_or_default();
    assert!(line.contains("cannot start its thread or runtime"), "{err}");
    assert_eq!(line.matches("os error 24").count(), 1, "{line}");
}
