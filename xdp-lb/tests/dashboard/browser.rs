//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: a WebSocket to the
//! page's target and a handful of calls (`Emulation.setDeviceMetricsOverride`, `Page.navigate`,
//! `Runtime.evaluate`, `Page.captureScreenshot`). The browser runs inside a test's namespace, in
//! its own process group, which is killed on drop.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use base64::Engine;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};
use xdp_lb_testbed::Netns;

pub struct Browser {
    child: Child,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts Chromium in `ns` with a `width`×`height` viewport and connects to its blank page.
    pub fn start(ns: &Netns, width: u32, height: u32) -> Browser {
        let profile = tempfile::Builder::new().prefix("xdp-lb-chromium-").tempdir().expect("profile dir");
        let mut cmd = ns.command("chromium");
        cmd.args([
            "--headless=new",
            // As root, Chromium's sandbox cannot start; the page is our own, from loopback.
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-dev-shm-usage",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", profile.path().display()),
            "about:blank",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = ns.spawn(&mut cmd).expect("chromium (Debian package `chromium`; `cargo xtask setup` installs it)");
        let port = wait_for_port(&profile.path().join("DevToolsActivePort"));
        // The socket is made in the namespace and stays there when used from this thread.
        let (list, stream) = ns.run(move || {
            let list = http_get_json(port, "/json/list");
            (list, TcpStream::connect(("127.0.0.1", port)).expect("connect to the DevTools port"))
        });
        let url = list
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .unwrap_or_else(|| panic!("no page target in {list:#}"))
            .to_string();
        stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
        let (ws, _) = tungstenite::client(url.as_str(), stream).expect("DevTools WebSocket handshake");
        let mut browser = Browser { child, ws, next_id: 1, _profile: profile };
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        );
        browser.call("Page.enable", json!({}));
        browser
    }

    /// One DevTools call; events that arrive meanwhile are skipped. Panics on a protocol error.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(Message::text(message)).unwrap_or_else(|e| panic!("{method}: {e}"));
        loop {
            let answer = self.ws.read().unwrap_or_else(|e| panic!("{method}: reading the answer: {e}"));
            let Message::Text(text) = answer else { continue };
            let v: Value = serde_json::from_str(&text).expect("DevTools JSON");
            if v["id"] == id {
                if let Some(error) = v.get("error") {
                    panic!("{method}: {error}");
                }
                return v["result"].clone();
            }
        }
    }

    /// Loads `url` and waits until `document.readyState` is complete.
    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({ "url": url }));
        self.wait_for("document.readyState === 'complete'", Duration::from_secs(15));
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value as JSON.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }));
        if let Some(e) = r.get("exceptionDetails") {
            panic!("the page threw evaluating {expression}: {e:#}");
        }
        r["result"]["value"].clone()
    }

    /// Polls `condition` (a JS expression) until it is true; panics with it after `within`.
    pub fn wait_for(&mut self, condition: &str, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            if self.eval(&format!("Boolean({condition})")) == json!(true) {
                return started.elapsed();
            }
            assert!(started.elapsed() < within, "not true within {within:?}: {condition}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&mut self, path: &Path) -> usize {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        let png = base64::engine::general_purpose::STANDARD.decode(shot["data"].as_str().expect("data")).expect("base64");
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        std::fs::create_dir_all(path.parent().expect("dir")).expect("screenshot dir");
        std::fs::write(path, &png).expect("write the screenshot");
        png.len()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Chromium's helpers (zygote, renderers) share its process group: end them all.
        let group = format!("-{}", self.child.id());
        let _ = std::process::Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Chromium writes its DevTools port into the profile once it listens.
fn wait_for_port(file: &Path) -> u16 {
    let started = Instant::now();
    loop {
        if let Some(port) = std::fs::read_to_string(file).ok().and_then(|t| t.lines().next()?.trim().parse().ok()) {
            return port;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "Chromium did not open its DevTools port within 30 s ({})", file.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http_get_json(port: u16, path: &str) -> Value {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the DevTools port");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n").expect("write");
    // Chromium keeps the connection open: read the head, then Content-Length bytes.
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let length = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim().parse::<usize>()))
            .unwrap_or_else(|| panic!("no Content-Length: {head}"))
            .expect("length");
        if body.len() >= length {
            return serde_json::from_str(&body[..length]).unwrap_or_else(|e| panic!("{e}: {body}"));
        }
    }
}
