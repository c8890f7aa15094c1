//! The pin directory's lock: a daemon holds `flock(LOCK_EX)` on the directory for as long as it
//! runs, so a second daemon on the same pins is refused, and `stop --detach` without a daemon
//! refuses to remove the pins of one that answers on another socket (Hostile 9b J9). bpffs holds
//! no regular files, so the holder is found through `/proc/locks` rather than a pid file.

use std::{
    fs::File,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use super::{PinDir, PinError};

/// Held while it lives; the kernel drops it when the process exits, however it exits.
#[derive(Debug)]
pub struct PinLock(#[allow(dead_code)] File);

/// The process holding a pin directory's lock, as far as `/proc` tells.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Holder {
    pub pid: Option<u32>,
    /// Its `--socket` (the default when it gave none), absolute where its working directory is known.
    pub socket: Option<PathBuf>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.pid, &self.socket) {
            (Some(pid), Some(socket)) => write!(f, "pid {pid}, socket {}", socket.display()),
            (Some(pid), None) => write!(f, "pid {pid}"),
            _ => write!(f, "a process /proc/locks does not name"),
        }
    }
}

impl PinDir {
    /// Takes the directory's lock, or says who holds it.
    pub fn lock(&self) -> Result<PinLock, PinError> {
        let dir = self.path();
        let io = |e: std::io::Error| PinError::Io { path: dir.display().to_string(), message: e.to_string() };
        let file = File::open(dir).map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(PinLock(file)),
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::metadata(dir).ok().and_then(|m| holder_of(m.dev(), m.ino())).unwrap_or_default();
                Err(PinError::Held { dir: dir.display().to_string(), holder })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(io(e)),
        }
    }
}

/// The process holding a flock on the inode `dev`:`ino`, from `/proc/locks`.
fn holder_of(dev: u64, ino: u64) -> Option<Holder> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let pid = locks_holder(&locks, libc::major(dev), libc::minor(dev), ino)?;
    let socket = std::fs::read(format!("/proc/{pid}/cmdline")).ok().and_then(|c| socket_arg(&c)).map(|s| {
        // A relative --socket is relative to the daemon's working directory, not ours.
        match std::fs::read_link(format!("/proc/{pid}/cwd")) {
            Ok(cwd) if s.is_relative() => cwd.join(s),
            _ => s,
        }
    });
    Some(Holder { pid: Some(pid), socket })
}

/// The pid of the granted FLOCK on `major:minor:ino` in the text of `/proc/locks`, whose lines read
/// `1: FLOCK  ADVISORY  WRITE 1234 00:2d:5678 0 EOF` (device numbers in hex, waiters marked `->`).
fn locks_holder(locks: &str, major: u32, minor: u32, ino: u64) -> Option<u32> {
    let wanted = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().filter(|l| !l.contains("->")).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&"FLOCK") && fields.get(5) == Some(&wanted.as_str())).then(|| fields.get(4)?.parse().ok()).flatten()
    })
}

/// The `--socket` of an `xdp-lb` command line (NUL-separated), or the default when it has none.
fn socket_arg(cmdline: &[u8]) -> Option<PathBuf> {
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let text = |a: &[u8]| PathBuf::from(String::from_utf8_lossy(a).into_owned());
    for (i, arg) in args.iter().enumerate() {
        if *arg == b"--socket" {
            return args.get(i + 1).map(|a| text(a));
        }
        if let Some(value) = arg.strip_prefix(b"--socket=") {
            return Some(text(value));
        }
        // Global options come before the subcommand: past `run`, a `--socket` is not ours.
        if *arg == b"run" {
            break;
        }
    }
    Some(PathBuf::from(crate::api::DEFAULT_SOCKET))
}

/// Whether `dir` is the root of a mount (a bpffs root is never removed, only what xdp-lb put in it).
pub(super) fn is_mount_root(dir: &Path) -> bool {
    let parent = dir.join("..");
    match (std::fs::metadata(dir), std::fs::metadata(&parent)) {
        (Ok(d), Ok(p)) => d.dev() != p.dev() || d.ino() == p.ino(),
        // Unknown: treat it as a root, so it is kept.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_holder_is_read_from_proc_locks() {
        let locks = "1: FLOCK  ADVISORY  WRITE 4242 00:2d:5678 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 77 00:2d:5678 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 99 00:2d:9999 0 EOF\n";
        assert_eq!(locks_holder(locks, 0, 0x2d, 5678), Some(4242));
        assert_eq!(locks_holder(locks, 0, 0x2d, 9999), None, "a POSIX lock is not the pin directory's");
        assert_eq!(locks_holder(locks, 0, 0x2e, 5678), None);
    }

    #[test]
    fn the_socket_is_the_global_option_or_the_default() {
        assert_eq!(socket_arg(b"xdp-lb\0--socket\0/tmp/a.sock\0run\0--config\0x\0"), Some(PathBuf::from("/tmp/a.sock")));
        assert_eq!(socket_arg(b"xdp-lb\0--socket=b.sock\0run\0"), Some(PathBuf::from("b.sock")));
        assert_eq!(socket_arg(b"xdp-lb\0run\0--config\0x\0"), Some(PathBuf::from(crate::api::DEFAULT_SOCKET)));
    }

    #[test]
    fn a_held_lock_names_its_holder() {
        let dir = tempfile::tempdir().unwrap();
        let pins = PinDir(dir.path().to_path_buf());
        let held = pins.lock().expect("a free lock");
        let e = pins.lock().expect_err("a second lock on the same directory");
        let PinError::Held { holder, .. } = &e else { panic!("{e}") };
        assert_eq!(holder.pid, Some(std::process::id()), "{e}");
        drop(held);
        pins.lock().expect("the lock is free again once dropped");
    }

    #[test]
    fn a_mount_root_is_recognised() {
        assert!(is_mount_root(Path::new("/")));
        assert!(is_mount_root(Path::new("/proc")));
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(!is_mount_root(&dir.path().join("sub")));
    }
}
