//! The real `xdp-lb` binary, run inside the lb namespace and driven through its public interface: a
//! config file, SIGHUP to reload, SIGTERM to stop (which prints the counters as JSON on stdout).

use std::{
    fs::File,
    io::{BufRead, BufReader},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::{netns::Netns, stats::Stats};

pub const READY: &str = "xdp-lb ready";
pub const RELOADED: &str = "config reloaded";
pub const REJECTED: &str = "reload rejected";

const START_TIMEOUT: Duration = Duration::from_secs(20);
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

pub struct Daemon {
    child: Child,
    exited: bool,
    config_path: PathBuf,
    stdout_path: PathBuf,
    socket: PathBuf,
    /// Everything the daemon wrote to stderr so far, escape sequences removed.
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    // Last, so the files outlive the process that writes them.
    _dir: tempfile::TempDir,
}

impl Daemon {
    /// Writes `config` to a temporary file, starts `binary run --config FILE --iface ...` in `lb` and
    /// waits for it to log that it is ready.
    pub fn start(binary: &Path, lb: &Netns, ifaces: &[impl AsRef<str>], config: &str) -> anyhow::Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("xdp-lb-testbed-").tempdir()?;
        let config_path = dir.path().join("xdp-lb.toml");
        let stdout_path = dir.path().join("stdout.json");
        let socket = dir.path().join("xdp-lb.sock");
        std::fs::write(&config_path, config)?;
        let mut cmd = lb.command(binary);
        // Each daemon gets its own API socket and state file, so tests can run side by side.
        cmd.arg("--socket").arg(&socket).arg("run").arg("--config").arg(&config_path);
        cmd.arg("--state-file").arg(dir.path().join("state.toml"));
        for iface in ifaces {
            cmd.args(["--iface", iface.as_ref()]);
        }
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout_path)?)
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            // Its own process group: a Ctrl-C at the terminal reaches only us, and we stop it cleanly.
            .process_group(0);
        let mut child = lb.spawn(&mut cmd)?;
        let stderr = child.stderr.take().context("stderr was piped")?;
        let log = Arc::new(Mutex::new(String::new()));
        let sink = log.clone();
        let echo = std::env::var_os("XDP_LB_TESTBED_ECHO").is_some();
        let reader = std::thread::Builder::new().name("xdp-lb-stderr".into()).spawn(move || {
            // Ends at EOF, i.e. when the daemon exits.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let line = strip_ansi(&line);
                if echo {
                    eprintln!("[xdp-lb] {line}");
                }
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        })?;
        let mut daemon =
            Daemon { child, exited: false, config_path, stdout_path, socket, log, reader: Some(reader), _dir: dir };
        daemon
            .wait_for(READY, 1, START_TIMEOUT)
            .with_context(|| format!("starting {} {:?}", binary.display(), cmd_line(&cmd)))?;
        Ok(daemon)
    }

    /// The daemon's API socket, for `xdp-lb --socket PATH <command>`.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Runs an `xdp-lb` CLI command against this daemon (from the root namespace: the socket is a
    /// file) and returns its output, whatever the exit status.
    pub fn cli(&self, binary: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
        Command::new(binary)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running xdp-lb {args:?}"))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Replaces the configuration file; takes effect at the next [`Daemon::reload`].
    pub fn write_config(&self, config: &str) -> anyhow::Result<()> {
        std::fs::write(&self.config_path, config).with_context(|| format!("writing {}", self.config_path.display()))
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Sends SIGHUP and waits until the daemon logs that it applied the file; an error if it logs
    /// that it rejected it, exits, or says nothing for 10 s.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        let reloaded = self.count(RELOADED);
        let rejected = self.count(REJECTED);
        self.signal(libc::SIGHUP)?;
        let deadline = Instant::now() + RELOAD_TIMEOUT;
        while Instant::now() < deadline {
            if self.count(RELOADED) > reloaded {
                return Ok(());
            }
            if self.count(REJECTED) > rejected {
                // Give the daemon a moment to log the reasons that follow the headline.
                std::thread::sleep(Duration::from_millis(100));
                bail!("the daemon rejected the new config:\n{}\n--- stderr ---\n{}", self.config(), self.log());
            }
            self.check_running()?;
            std::thread::sleep(POLL);
        }
        bail!("no `{RELOADED}` within {RELOAD_TIMEOUT:?} of SIGHUP\n--- stderr ---\n{}", self.log())
    }

    /// Writes `config` and reloads.
    pub fn reconfigure(&mut self, config: &str) -> anyhow::Result<()> {
        self.write_config(config)?;
        self.reload()
    }

    /// Sends SIGTERM, waits for a clean exit and returns stdout (the JSON counters).
    pub fn stop(mut self) -> anyhow::Result<String> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                self.exited = true;
                break status;
            }
            if Instant::now() > deadline {
                bail!("still running {STOP_TIMEOUT:?} after SIGTERM\n--- stderr ---\n{}", self.log());
            }
            std::thread::sleep(POLL);
        };
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        let stdout = std::fs::read_to_string(&self.stdout_path)?;
        if !status.success() {
            bail!("exited with {status} after SIGTERM\n--- stdout ---\n{stdout}\n--- stderr ---\n{}", self.log());
        }
        Ok(stdout)
    }

    /// [`Daemon::stop`], parsing the counters.
    pub fn stop_stats(self) -> anyhow::Result<Stats> {
        let stdout = self.stop()?;
        Stats::parse(&stdout)
    }

    fn config(&self) -> String {
        std::fs::read_to_string(&self.config_path).unwrap_or_default()
    }

    fn count(&self, fragment: &str) -> usize {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).matches(fragment).count()
    }

    fn wait_for(&mut self, fragment: &str, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.count(fragment) >= count {
                return Ok(());
            }
            self.check_running()?;
            crate::interrupt::check()?;
            std::thread::sleep(POLL);
        }
        bail!("no `{fragment}` within {timeout:?}\n--- stderr ---\n{}", self.log())
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            self.exited = true;
            if let Some(reader) = self.reader.take() {
                let _ = reader.join();
            }
            let stdout = std::fs::read_to_string(&self.stdout_path).unwrap_or_default();
            bail!("the daemon exited ({status})\n--- stdout ---\n{stdout}\n--- stderr ---\n{}", self.log());
        }
        Ok(())
    }

    fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        self.check_running()?;
        // SAFETY: kill(2) on our own child, which has not been reaped (check_running just looked), so
        // the pid cannot have been reused.
        if unsafe { libc::kill(self.child.id() as libc::pid_t, signal) } != 0 {
            bail!("kill({}, {signal}): {}", self.child.id(), std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn cmd_line(cmd: &std::process::Command) -> Vec<String> {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(|a| a.to_string_lossy().into_owned()).collect()
}

/// Removes terminal escape sequences (`ESC [ ... letter`), in case the daemon colours its logs anyway.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn strips_colours() {
        assert_eq!(super::strip_ansi("\u{1b}[32m INFO\u{1b}[0m xdp-lb ready"), " INFO xdp-lb ready");
    }
}
