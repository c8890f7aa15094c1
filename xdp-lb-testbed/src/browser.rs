//! Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: a WebSocket to the
//! page's target and a handful of calls (`Emulation.setDeviceMetricsOverride`, `Page.navigate`,
//! `Runtime.evaluate`, `Page.captureScreenshot`). One driver for the xdp-lb dashboard tests and
//! the demo's browser check (`cargo xtask demo --check-in-browser`). The browser runs in a
//! namespace or on the host, in its own process group, which is killed on drop.
//!
//! [`ACCESSIBILITY`] and [`FITS`] are the page checks both callers run.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use base64::Engine;
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

use crate::Netns;

/// The program started unless `XDP_LB_CHROMIUM` names another (Debian's package `chromium`).
pub const DEFAULT_PROGRAM: &str = "chromium";
/// How long Chromium may take to open its DevTools port (slow on a loaded 2-core machine).
const START_TIMEOUT: Duration = Duration::from_secs(30);

pub struct Browser {
    child: Child,
    ws: WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

/// The Chromium to run: `XDP_LB_CHROMIUM`, else `chromium`, found on `PATH` — or an error that
/// says what is missing and how to install it (a missing browser must fail a check, not skip it).
pub fn find_chromium() -> anyhow::Result<PathBuf> {
    let wanted = std::env::var_os("XDP_LB_CHROMIUM").map(PathBuf::from).unwrap_or_else(|| DEFAULT_PROGRAM.into());
    locate(&wanted, std::env::var_os("PATH").as_deref())
}

/// `program` as a path (if it has a `/`) or the first executable of that name in `path`.
fn locate(program: &Path, path: Option<&std::ffi::OsStr>) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    let found = if program.components().count() > 1 {
        Some(program.to_path_buf()).filter(|p| executable(p))
    } else {
        path.into_iter().flat_map(std::env::split_paths).map(|d| d.join(program)).find(|p| executable(p))
    };
    found.with_context(|| {
        format!(
            "no Chromium: {} is not an executable{} — install Debian's `chromium` package \
             (`cargo xtask setup` does) or set XDP_LB_CHROMIUM to a Chromium binary",
            program.display(),
            if program.components().count() > 1 { "" } else { " on PATH" }
        )
    })
}

impl Browser {
    /// Starts Chromium in `ns` (`None`: on the host) with a `width`×`height` viewport and connects
    /// to its blank page.
    pub fn start(ns: Option<&Netns>, width: u32, height: u32) -> anyhow::Result<Browser> {
        let program = find_chromium()?;
        let profile = tempfile::Builder::new().prefix("xdp-lb-chromium-").tempdir().context("Chromium's profile dir")?;
        let mut cmd = match ns {
            Some(ns) => ns.command(&program),
            None => Command::new(&program),
        };
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
        let child = cmd.spawn().with_context(|| format!("starting {}", program.display()))?;
        // Owned from here: dropped (and killed) on every error below.
        let mut guard = ChildGuard(Some(child));
        let port = wait_for_port(&profile.path().join("DevToolsActivePort"), &mut guard)?;
        // The socket is made in the namespace and stays there when used from this thread.
        let connect = move || -> anyhow::Result<(Value, TcpStream)> {
            let list = http_get_json(port, "/json/list")?;
            Ok((list, TcpStream::connect(("127.0.0.1", port)).context("connecting to Chromium's DevTools port")?))
        };
        let (list, stream) = match ns {
            Some(ns) => ns.run(connect)?,
            None => connect()?,
        };
        let url = list
            .as_array()
            .and_then(|targets| targets.iter().find(|t| t["type"] == "page"))
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .with_context(|| format!("Chromium lists no page target: {list:#}"))?
            .to_string();
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let (ws, _) = tungstenite::client(url.as_str(), stream).context("the DevTools WebSocket handshake")?;
        let child = guard.0.take().expect("the child is still owned");
        let mut browser = Browser { child, ws, next_id: 1, _profile: profile };
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": false }),
        )?;
        browser.call("Page.enable", json!({}))?;
        Ok(browser)
    }

    /// One DevTools call; events that arrive meanwhile are skipped.
    pub fn call(&mut self, method: &str, params: Value) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let message = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(Message::text(message)).with_context(|| format!("DevTools {method}: sending"))?;
        loop {
            let answer = self.ws.read().with_context(|| format!("DevTools {method}: reading the answer"))?;
            let Message::Text(text) = answer else { continue };
            let v: Value = serde_json::from_str(&text).with_context(|| format!("DevTools {method}: not JSON: {text}"))?;
            if v["id"] == id {
                if let Some(error) = v.get("error") {
                    bail!("DevTools {method}: {error}");
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Loads `url` and waits until `document.readyState` is complete.
    pub fn navigate(&mut self, url: &str) -> anyhow::Result<()> {
        self.call("Page.navigate", json!({ "url": url }))?;
        self.wait_for("document.readyState === 'complete'", Duration::from_secs(15)).map(|_| ()).with_context(|| format!("loading {url}"))
    }

    /// Evaluates `expression` in the page (promises awaited) and returns its value as JSON.
    pub fn eval(&mut self, expression: &str) -> anyhow::Result<Value> {
        let r = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true, "awaitPromise": true }))?;
        if let Some(e) = r.get("exceptionDetails") {
            bail!("the page threw evaluating {expression}: {e:#}");
        }
        Ok(r["result"]["value"].clone())
    }

    /// Polls `condition` (a JS expression) until it is true and returns how long that took; an
    /// error naming it after `within`.
    pub fn wait_for(&mut self, condition: &str, within: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            if self.eval(&format!("Boolean({condition})"))? == json!(true) {
                return Ok(started.elapsed());
            }
            ensure!(started.elapsed() < within, "not true within {within:?}: {condition}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A PNG of the viewport, written to `path` (directories created); returns its size.
    pub fn screenshot(&mut self, path: &Path) -> anyhow::Result<usize> {
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }))?;
        let data = shot["data"].as_str().context("Page.captureScreenshot returned no data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data).context("the screenshot's base64")?;
        ensure!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "the screenshot is not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, &png).with_context(|| format!("writing {}", path.display()))?;
        Ok(png.len())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Chromium until the driver owns it: killed if starting fails half-way.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            kill_group(&mut child);
        }
    }
}

/// Chromium's helpers (zygote, renderers) share its process group: end them all.
fn kill_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    let _ = child.kill();
    let _ = child.wait();
}

/// Chromium writes its DevTools port into the profile once it listens.
fn wait_for_port(file: &Path, child: &mut ChildGuard) -> anyhow::Result<u16> {
    let started = Instant::now();
    loop {
        if let Some(port) = std::fs::read_to_string(file).ok().and_then(|t| t.lines().next()?.trim().parse().ok()) {
            return Ok(port);
        }
        if let Some(status) = child.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            bail!("Chromium exited ({status}) before opening its DevTools port");
        }
        ensure!(started.elapsed() < START_TIMEOUT, "Chromium did not open its DevTools port within {START_TIMEOUT:?} ({})", file.display());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http_get_json(port: u16, path: &str) -> anyhow::Result<Value> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).context("connecting to Chromium's DevTools port")?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")?;
    // Chromium keeps the connection open: read the head, then Content-Length bytes.
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).with_context(|| format!("reading DevTools {path}"))?;
        ensure!(n > 0, "DevTools {path}: closed early: {}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        let Some((head, body)) = text.split_once("\r\n\r\n") else { continue };
        let length = head
            .lines()
            .find_map(|l| l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case("content-length")).map(|(_, v)| v.trim().parse::<usize>()))
            .with_context(|| format!("DevTools {path}: no Content-Length: {head}"))?
            .with_context(|| format!("DevTools {path}: bad Content-Length: {head}"))?;
        if body.len() >= length {
            return serde_json::from_str(&body[..length]).with_context(|| format!("DevTools {path}: {body}"));
        }
    }
}

/// Every control has an accessible name, and all visible text contrasts at least 4.5:1 with its
/// background (WCAG AA), computed from the page's computed styles. Evaluates to the failures.
pub const ACCESSIBILITY: &str = include_str!("browser/accessibility.js");

/// Nothing wider than the viewport, every control inside it horizontally, nothing spilling out of
/// its section. Evaluates to the failures.
pub const FITS: &str = include_str!("browser/fits.js");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_chromium_is_an_error_that_says_how_to_install_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = locate(Path::new("chromium"), Some(dir.path().as_os_str())).unwrap_err().to_string();
        assert!(err.contains("chromium is not an executable on PATH") && err.contains("`cargo xtask setup`"), "{err}");
        let err = locate(&dir.path().join("nothing"), None).unwrap_err().to_string();
        assert!(err.contains("nothing is not an executable —"), "{err}");
        // A file that is not executable is not a browser either.
        std::fs::write(dir.path().join("chromium"), "").unwrap();
        assert!(locate(Path::new("chromium"), Some(dir.path().as_os_str())).is_err());
    }

    #[test]
    fn chromium_is_found_on_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("chromium");
        std::fs::write(&bin, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = std::env::join_paths([Path::new("/nonexistent"), dir.path()]).unwrap();
        assert_eq!(locate(Path::new("chromium"), Some(&path)).unwrap(), bin);
        assert_eq!(locate(&bin, None).unwrap(), bin);
    }
}
