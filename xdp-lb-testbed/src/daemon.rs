//! The real `xdp-lb` binary, run inside the lb namespace and driven through its public interface: a
//! config file (which CLI changes are written back to), SIGHUP to reload, SIGTERM to stop, and its
//! API socket for the counters.

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
    /// The running daemon process; `None` once it has exited (or before the first launch).
    child: Option<Child>,
    binary: PathBuf,
    netns: String,
    ifaces: Vec<String>,
    /// More `run` arguments (e.g. `--metrics ADDR`).
    extra_args: Vec<String>,
    config_path: PathBuf,
    stdout_path: PathBuf,
    socket: PathBuf,
    /// Where this daemon pins its data plane (on the testbed's bpffs).
    pin_dir: PathBuf,
    /// Everything the daemon wrote to stderr so far, escape sequences removed.
    log: Arc<Mutex<String>>,
    reader: Option<JoinHandle<()>>,
    // Last, so the files outlive the process that writes them.
    _dir: tempfile::TempDir,
}

/// The testbed's bpffs, mounted in the root mount namespace under /run so that the daemons started
/// with `ip netns exec` (which remounts /sys, hiding /sys/fs/bpf) see it, and their pins outlive
/// them.
pub const BPFFS_ROOT: &str = "/run/xlb-testbed/bpf";

fn bpffs_root() -> anyhow::Result<PathBuf> {
    let root = PathBuf::from(BPFFS_ROOT);
    std::fs::create_dir_all(&root)?;
    let mounted = std::fs::read_to_string("/proc/self/mounts")?
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPFFS_ROOT) && l.split_whitespace().nth(2) == Some("bpf"));
    if !mounted {
        let out = Command::new("mount").args(["-t", "bpf", "bpf", BPFFS_ROOT]).output()?;
        if !out.status.success() && !std::fs::read_to_string("/proc/self/mounts")?.contains(BPFFS_ROOT) {
            bail!("mount -t bpf bpf {BPFFS_ROOT}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    Ok(root)
}

/// Removes a daemon's pins: its XDP links first (detaching the program), then its maps.
pub fn remove_pins(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        paths.sort_by_key(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("link_")));
        for p in paths {
            let _ = std::fs::remove_file(p);
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// The file in a testbed temporary directory (a daemon's, the demo's) naming the process that
/// owns it and the pins named after it: `PID START`, START being the process's start time in
/// clock ticks since boot (field 22 of `/proc/PID/stat`), so a reused pid is not taken for it.
/// It cannot live in the pin directory itself: bpffs holds only directories and BPF objects.
pub const OWNER_FILE: &str = "owner";

/// A temporary directory without an owner file is given this long to get one (it is written right
/// after the directory is created) before it counts as a leftover.
const OWNERLESS_GRACE: Duration = Duration::from_secs(60);

/// A process, told apart from a later one with the same pid by its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub start: u64,
}

impl Owner {
    /// This process.
    pub fn current() -> std::io::Result<Owner> {
        Owner::of(std::process::id())
    }

    /// The process `pid` as it runs now (an error if there is none).
    pub fn of(pid: u32) -> std::io::Result<Owner> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // The command name (field 2) is in parentheses and may hold spaces: count from after it.
        let start = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(19))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no start time in /proc/{pid}/stat: {stat:.120}")))?;
        Ok(Owner { pid, start })
    }

    pub fn is_alive(self) -> bool {
        Owner::of(self.pid).is_ok_and(|now| now == self)
    }

    fn parse(text: &str) -> Option<Owner> {
        let mut words = text.split_whitespace();
        let (pid, start) = (words.next()?.parse().ok()?, words.next()?.parse().ok()?);
        words.next().is_none().then_some(Owner { pid, start })
    }
}

/// Writes [`OWNER_FILE`] naming this process into `dir`.
pub fn write_owner(dir: &Path) -> anyhow::Result<()> {
    let me = Owner::current().context("reading this process's start time")?;
    let path = dir.join(OWNER_FILE);
    std::fs::write(&path, format!("{} {}\n", me.pid, me.start)).with_context(|| format!("writing {}", path.display()))
}

/// Whether the testbed temporary directory `dir` (and the pins named after it) was left behind by
/// a process that is gone (e.g. a SIGKILLed run). With an owner file: whether that process is
/// dead. Without one (gone with the directory, or written by an older testbed): left over unless a
/// running process mentions the directory's name on its command line (a daemon's `--socket` and
/// `--bpffs`, a replica's `--config`) or the directory is younger than [`OWNERLESS_GRACE`].
///
/// Only a root-owned directory (not a symlink) can be ours: anyone may create `/tmp/xdp-lb-*`, and
/// such a directory is never removed nor its files opened (an `owner` FIFO would block the open).
pub fn is_leftover(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(dir) {
        Err(_) => return true,
        Ok(m) if !m.is_dir() || m.uid() != 0 => return false,
        Ok(_) => {}
    }
    if let Some(owner) = read_owner_file(&dir.join(OWNER_FILE)).as_deref().and_then(Owner::parse) {
        return !owner.is_alive();
    }
    let young = std::fs::metadata(dir).and_then(|m| m.modified()).is_ok_and(|t| t.elapsed().is_ok_and(|age| age < OWNERLESS_GRACE));
    let mentioned = dir.file_name().is_some_and(|name| process_mentions(&name.to_string_lossy()));
    !young && !mentioned
}

/// The first bytes of `path` if it is a regular file (in a root-owned directory nobody else can
/// swap it for a FIFO or a symlink after this check).
fn read_owner_file(path: &Path) -> Option<String> {
    use std::io::Read;
    if !std::fs::symlink_metadata(path).ok()?.is_file() {
        return None;
    }
    let mut text = String::new();
    std::fs::File::open(path).ok()?.take(64).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Whether a running process's command line contains `needle`.
fn process_mentions(needle: &str) -> bool {
    let Ok(procs) = std::fs::read_dir("/proc") else { return false };
    procs.flatten().filter(|p| p.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit())).any(|p| {
        std::fs::read(p.path().join("cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
    })
}

impl Daemon {
    /// Writes `config` to a temporary file, starts `binary run --config FILE --iface ...` in `lb` and
    /// waits for it to log that it is ready. The daemon gets its own socket, config file and pin
    /// directory, so tests can run side by side.
    pub fn start(binary: &Path, lb: &Netns, ifaces: &[impl AsRef<str>], config: &str) -> anyhow::Result<Daemon> {
        Self::start_with_args(binary, lb, ifaces, config, &[])
    }

    /// [`Daemon::start`] with more arguments for `run`.
    pub fn start_with_args(
        binary: &Path,
        lb: &Netns,
        ifaces: &[impl AsRef<str>],
        config: &str,
        extra_args: &[&str],
    ) -> anyhow::Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("xdp-lb-testbed-").tempdir()?;
        write_owner(dir.path())?;
        let config_path = dir.path().join("xdp-lb.toml");
        std::fs::write(&config_path, config)?;
        Self::start_in(binary, lb, ifaces, dir, config_path, extra_args)
    }

    /// [`Daemon::start_with_args`] with a config file the caller wrote (e.g. on a small or
    /// read-only file system); the caller keeps it alive as long as the daemon.
    pub fn start_with_config_file(
        binary: &Path,
        lb: &Netns,
        ifaces: &[impl AsRef<str>],
        config_path: &Path,
        extra_args: &[&str],
    ) -> anyhow::Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("xdp-lb-testbed-").tempdir()?;
        write_owner(dir.path())?;
        Self::start_in(binary, lb, ifaces, dir, config_path.to_path_buf(), extra_args)
    }

    fn start_in(
        binary: &Path,
        lb: &Netns,
        ifaces: &[impl AsRef<str>],
        dir: tempfile::TempDir,
        config_path: PathBuf,
        extra_args: &[&str],
    ) -> anyhow::Result<Daemon> {
        let pin_dir = bpffs_root()?.join(dir.path().file_name().context("tempdir has a name")?);
        let (log, reader) = (Arc::new(Mutex::new(String::new())), None);
        let mut daemon = Daemon {
            child: None,
            binary: binary.to_path_buf(),
            netns: lb.name().to_string(),
            ifaces: ifaces.iter().map(|i| i.as_ref().to_string()).collect(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            stdout_path: dir.path().join("stdout.json"),
            socket: dir.path().join("xdp-lb.sock"),
            config_path,
            pin_dir,
            log,
            reader,
            _dir: dir,
        };
        daemon.launch()?;
        Ok(daemon)
    }

    /// Starts the daemon process and waits for its next `xdp-lb ready`.
    fn launch(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.netns]).arg(&self.binary);
        cmd.arg("--socket").arg(&self.socket).arg("run").arg("--config").arg(&self.config_path);
        cmd.arg("--bpffs").arg(&self.pin_dir);
        for iface in &self.ifaces {
            cmd.args(["--iface", iface]);
        }
        cmd.args(&self.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(File::create(&self.stdout_path)?)
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            // Its own process group: a Ctrl-C at the terminal reaches only us, and we stop it cleanly.
            .process_group(0);
        let mut child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        let stderr = child.stderr.take().context("stderr was piped")?;
        let sink = self.log.clone();
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
        let ready_before = self.count(READY);
        self.child = Some(child);
        self.reader = Some(reader);
        self.wait_for(READY, ready_before + 1, START_TIMEOUT)
            .with_context(|| format!("starting {} {:?}", self.binary.display(), cmd_line(&cmd)))
    }

    /// Stops the daemon with SIGTERM (the pinned data plane keeps forwarding) and starts it again;
    /// the new daemon adopts the data plane.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.terminate()?;
        self.launch()
    }

    /// Like [`Daemon::restart`] with other extra `run` arguments (e.g. `--allow-empty`); also starts
    /// a daemon whose last start failed (the pins, and so the data plane, are still there).
    pub fn restart_with_args(&mut self, extra_args: &[&str]) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.terminate()?;
        }
        self.extra_args = extra_args.iter().map(|a| a.to_string()).collect();
        self.launch()
    }

    /// Like [`Daemon::restart`] with another `--iface` list (an interface left out at a restart).
    pub fn restart_with_ifaces(&mut self, ifaces: &[impl AsRef<str>]) -> anyhow::Result<()> {
        if self.child.is_some() {
            self.terminate()?;
        }
        self.ifaces = ifaces.iter().map(|i| i.as_ref().to_string()).collect();
        self.launch()
    }

    /// The bpffs directory holding this daemon's pins.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
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
        self.child.as_ref().map_or(0, Child::id)
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

    /// Sends SIGTERM, waits for a clean exit and returns stdout (empty unless something printed); then removes
    /// the pins, which detaches the data plane.
    pub fn stop(mut self) -> anyhow::Result<String> {
        let stdout = self.terminate();
        remove_pins(&self.pin_dir);
        stdout
    }

    fn terminate(&mut self) -> anyhow::Result<String> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            let child = self.child.as_mut().context("the daemon is not running")?;
            if let Some(status) = child.try_wait()? {
                self.child = None;
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

    /// The counters, read just before [`Daemon::stop`].
    pub fn stop_stats(self) -> anyhow::Result<Stats> {
        let stats = self.stats()?;
        self.stop()?;
        Ok(stats)
    }

    /// The counters now, asked over the API socket: the raw snapshot `xdp-lb stats` starts from.
    pub fn stats(&self) -> anyhow::Result<Stats> {
        let data = self.request(&serde_json::json!({"command": "stats"}))?;
        serde_json::from_value(data["snapshot"].clone()).with_context(|| format!("parsing the counters in {data}"))
    }

    /// One request over the API socket (what the CLI sends, e.g. `{"command":"explain",...}`);
    /// returns the answer's `data`, or an error with the daemon's refusal. Quicker than [`Daemon::cli`]
    /// when a test asks thousands of times.
    pub fn request(&self, request: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        use std::io::Write;
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket)
            .with_context(|| format!("connecting to {}", self.socket.display()))?;
        stream.set_read_timeout(Some(STOP_TIMEOUT))?;
        stream.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line)?;
        let mut answer: serde_json::Value =
            serde_json::from_str(&line).with_context(|| format!("the answer to {request}: {line:?}"))?;
        if answer["ok"] != true {
            bail!("the daemon refused {request}: {line}");
        }
        Ok(answer["data"].take())
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
        let Some(child) = self.child.as_mut() else { bail!("the daemon is not running\n--- stderr ---\n{}", self.log()) };
        if let Some(status) = child.try_wait()? {
            self.child = None;
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
        let pid = self.pid();
        // SAFETY: kill(2) on our own child, which has not been reaped (check_running just looked), so
        // the pid cannot have been reused.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
        remove_pins(&self.pin_dir);
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
    use super::*;

    #[test]
    fn owner_is_this_process_and_a_reused_pid_is_not_it() {
        let dir = tempfile::tempdir().unwrap();
        write_owner(dir.path()).unwrap();
        assert!(!is_leftover(dir.path()), "a directory this live process owns");
        let me = Owner::current().unwrap();
        let text = format!("{} {}", me.pid, me.start + 1);
        std::fs::write(dir.path().join(OWNER_FILE), text).unwrap();
        assert!(is_leftover(dir.path()), "the same pid with another start time is another process");
    }

    #[test]
    fn a_dead_owner_makes_a_leftover() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let owner = Owner::of(child.id()).unwrap_or(Owner { pid: child.id(), start: 1 });
        child.wait().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(OWNER_FILE), format!("{} {}", owner.pid, owner.start)).unwrap();
        assert!(is_leftover(dir.path()));
    }

    #[test]
    fn a_directory_another_user_made_is_never_ours_and_never_opened() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("xdp-lb-testbed-").tempdir().unwrap();
        // Hostile G3: an `owner` FIFO hung the clean-up in open(2).
        let fifo = dir.path().join(OWNER_FILE);
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) on a NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        let started = std::time::Instant::now();
        assert!(!is_leftover(dir.path()), "another user's directory is not ours to remove");
        std::os::unix::fs::chown(dir.path(), Some(0), Some(0)).unwrap();
        assert!(read_owner_file(&fifo).is_none(), "a FIFO is not read");
        assert!(started.elapsed() < Duration::from_secs(2), "nothing blocked");
    }

    #[test]
    fn an_ownerless_directory_is_kept_while_young() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_leftover(dir.path()), "just created, its owner file may be on its way");
        assert!(is_leftover(Path::new("/nonexistent/xdp-lb-testbed-gone")), "a directory that is gone");
    }

    #[test]
    fn parses_owner_files() {
        assert_eq!(Owner::parse("12 345\n"), Some(Owner { pid: 12, start: 345 }));
        assert_eq!(Owner::parse("12"), None);
        assert_eq!(Owner::parse("12 x"), None);
        assert_eq!(Owner::parse("1 2 3"), None);
    }

    #[test]
    fn strips_colours() {
        assert_eq!(super::strip_ansi("\u{1b}[32m INFO\u{1b}[0m xdp-lb ready"), " INFO xdp-lb ready");
    }
}
