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
