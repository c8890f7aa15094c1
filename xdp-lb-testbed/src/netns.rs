//! A named network namespace that is deleted, with every process inside it, when its guard drops.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

/// Every namespace this crate creates starts with this, so [`cleanup_namespaces`] can find leftovers.
pub const NAME_PREFIX: &str = "xlb-";

/// A prefix unique to this process and call, e.g. `xlb-nat4-4242-3`: tests running in parallel (threads
/// or processes) never share namespace names.
pub fn unique_prefix(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{tag}-{}-{n}", std::process::id())
}

/// Removes namespaces whose name starts with `prefix` (and kills what runs inside them): for CI after
/// a crash left some behind. Returns the names removed.
pub fn cleanup_namespaces(prefix: &str) -> anyhow::Result<Vec<String>> {
    let dir = match std::fs::read_dir("/run/netns") {
        Ok(dir) => dir,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("listing /run/netns"),
    };
    let mut removed = Vec::new();
    for entry in dir {
        let name = entry?.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix) {
            kill_all_in(&name);
            run_ip(&["netns", "del", &name])?;
            removed.push(name);
        }
    }
    Ok(removed)
}

pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with loopback up. Fails if the name is taken.
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        run_ip(&["netns", "add", name])?;
        // From here on Drop deletes it, also if the next step fails.
        let ns = Netns { name: name.to_string() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind mount that keeps the namespace alive; opening it is how threads join the namespace.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME args...`; the error names the full command and its stderr.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_ip(&full)
    }

    /// Runs `program args...` inside the namespace and waits for it, whatever its exit status.
    pub fn exec(&self, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        self.command(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} {args:?} in netns {}", self.name))
    }

    /// Like [`Netns::exec`], but a non-zero exit status is an error carrying stdout and stderr.
    pub fn exec_ok(&self, program: &str, args: &[&str]) -> anyhow::Result<String> {
        let out = self.exec(program, args)?;
        check_output(&format!("ip netns exec {} {program} {}", self.name, args.join(" ")), out)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`, which also mounts the
    /// namespace's own /sys); add arguments and stdio, then hand it to [`Netns::spawn`].
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Starts a command built by [`Netns::command`]. Whatever still runs inside the namespace when the
    /// guard drops is killed, so a forgotten child cannot keep it alive.
    pub fn spawn(&self, cmd: &mut Command) -> anyhow::Result<Child> {
        cmd.spawn().with_context(|| format!("spawning {cmd:?}"))
    }

    /// Sets a sysctl of this namespace (`net.ipv4.ip_forward`, `net.ipv4.conf.eth0.rp_filter`, ...).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        // /proc/sys/net shows the namespace of the thread that opens it, so no process is needed.
        let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))
            .with_context(|| format!("sysctl {key}={value} in netns {}", self.name))
    }

    /// Runs `f` on a fresh thread that has joined the namespace: sockets `f` creates belong to it (and
    /// stay there when moved to other threads afterwards). Panics in `f` propagate.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        thread::scope(|scope| {
            let handle = scope.spawn(move || {
                enter(&path).unwrap_or_else(|e| panic!("{e:#}"));
                f()
            });
            handle.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Like [`Netns::run`] without waiting: for servers. The thread must end by itself (stop flag).
    pub fn spawn_thread<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<JoinHandle<T>> {
        let path = self.path();
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        thread::Builder::new()
            .name(format!("ns-{}", self.name))
            .spawn(move || {
                setns(&file, &path).unwrap_or_else(|e| panic!("{e:#}"));
                drop(file);
                f()
            })
            .context("spawning thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        kill_all_in(&self.name);
        if let Err(e) = run_ip(&["netns", "del", &self.name]) {
            eprintln!("xdp-lb-testbed: {e:#}");
        }
    }
}

impl std::fmt::Debug for Netns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Netns({})", self.name)
    }
}

fn enter(path: &std::path::Path) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    setns(&file, path)
}

fn setns(file: &File, path: &std::path::Path) -> anyhow::Result<()> {
    // SAFETY: setns only reads the descriptor, which `file` keeps open for the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns({}): {}", path.display(), io::Error::last_os_error());
    }
    Ok(())
}

/// SIGKILLs every process in the namespace and waits (bounded) until none is left.
fn kill_all_in(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let pids = match run_ip(&["netns", "pids", name]) {
            Ok(out) => out,
            Err(_) => return,
        };
        // Never ourselves: a thread of ours inside the namespace is not a process to kill.
        let me = std::process::id() as i32;
        let pids: Vec<i32> = pids.split_whitespace().filter_map(|p| p.parse().ok()).filter(|p| *p != me).collect();
        if pids.is_empty() || Instant::now() > deadline {
            return;
        }
        for pid in pids {
            // SAFETY: plain kill(2) on a pid that `ip netns pids` just reported inside our namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn run_ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    check_output(&format!("ip {}", args.join(" ")), out)
}

fn check_output(what: &str, out: Output) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "`{what}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
