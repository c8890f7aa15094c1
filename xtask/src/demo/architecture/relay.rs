//! Makes the daemon's dashboard reachable from the host's browser: the daemon listens on loopback
//! inside the lb namespace, which nothing outside can reach, so the demo listens on the host's
//! loopback and copies bytes both ways to a connection it opens inside the namespace. The daemon
//! still sees a loopback listener and a loopback `Host`, so the page's buttons work without a token
//! for root, as they would for an operator on the balancer itself.
//!
//! The daemon lets a loopback client change things without the token only if the client's socket
//! is owned by root. The relay runs as root, so it opens its inner connection as the user who owns
//! the outer one (looked up in `/proc/net/tcp` with the daemon's own lookup,
//! `xdp_lb_common::socket_owner`): the daemon applies its rule, and its 403, to the real client.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context;
use xdp_lb_common::socket_owner::owner_uid;
use xdp_lb_testbed::Netns;

/// Whose the inner connection is when the outer one's owner cannot be found.
pub const NOBODY: u32 = 65534;
/// Connections relayed at once; more are closed at once (a page holds two or three).
const MAX_CONNECTIONS: usize = 64;

pub struct Relay {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<TcpStream>>>,
    accept: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on `host` (the caller's namespace) and relays every connection to `inner` in `ns`.
    /// If `host`'s port is taken, an ephemeral one is used instead (the URL says which).
    pub fn start(host: SocketAddr, ns: &Netns, inner: SocketAddr) -> anyhow::Result<Relay> {
        Self::start_in(host, &ns.path(), inner)
    }

    /// [`Relay::start`] into the network namespace at `ns` (a `/proc/…/ns/net` or `/run/netns/…` file).
    fn start_in(host: SocketAddr, ns: &std::path::Path, inner: SocketAddr) -> anyhow::Result<Relay> {
        let listener = match TcpListener::bind(host) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                eprintln!("{host} is taken; the dashboard gets another port");
                TcpListener::bind(SocketAddr::new(host.ip(), 0))?
            }
            Err(e) => return Err(e).with_context(|| format!("binding the dashboard relay on {host}")),
        };
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let ns_file = std::fs::File::open(ns).with_context(|| format!("opening {}", ns.display()))?;
        let (s, o) = (stop.clone(), open.clone());
        let accept = std::thread::Builder::new()
            .name("dashboard-relay".into())
            .spawn(move || accept_loop(&listener, &ns_file, inner, &s, &o))?;
        Ok(Relay { addr, stop, open, accept: Some(accept) })
    }

    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Ends the copies of long-lived event streams, which would otherwise wait for the daemon.
        for s in self.open.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, ns: &std::fs::File, inner: SocketAddr, stop: &AtomicBool, open: &Arc<Mutex<Vec<TcpStream>>>) {
    let active = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::Relaxed) {
        let (outer, client) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(_) => continue,
        };
        if active.load(Ordering::Relaxed) >= MAX_CONNECTIONS || outer.set_nonblocking(false).is_err() {
            continue;
        }
        // Unknown owner (the client already gone): nobody's, so the daemon refuses any change.
        let uid = outer.local_addr().ok().and_then(|ours| owner_uid(client, ours)).unwrap_or(NOBODY);
        let Ok(inner) = connect_in(ns, inner, uid) else { continue };
        let (Ok(outer2), Ok(inner2)) = (outer.try_clone(), inner.try_clone()) else { continue };
        {
            let mut open = open.lock().unwrap_or_else(|p| p.into_inner());
            open.retain(|s| s.peer_addr().is_ok());
            open.extend(outer.try_clone().ok());
        }
        active.fetch_add(2, Ordering::Relaxed);
        for (from, to) in [(outer, inner), (inner2, outer2)] {
            let done = active.clone();
            let spawned = std::thread::Builder::new().name("dashboard-copy".into()).spawn(move || {
                let (mut from, mut to) = (from, to);
                let _ = io::copy(&mut from, &mut to);
                // One direction ended: end both, so neither thread waits forever.
                let _ = to.shutdown(Shutdown::Both);
                let _ = from.shutdown(Shutdown::Both);
                done.fetch_sub(1, Ordering::Relaxed);
            });
            if spawned.is_err() {
                active.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

/// A connection to `addr` (in this thread's namespace) from a socket owned by `uid`: what a browser
/// of that local user opens.
pub fn connect_as(uid: u32, addr: SocketAddr) -> io::Result<TcpStream> {
    let here = std::fs::File::open("/proc/thread-self/ns/net")?;
    connect_in(&here, addr, uid)
}

/// A connection made from inside the namespace `ns` (the socket belongs to the namespace of the
/// thread that creates it), from a socket owned by `uid` (the kernel takes a new socket's owner
/// from the creating thread's file-system uid).
fn connect_in(ns: &std::fs::File, addr: SocketAddr, uid: u32) -> io::Result<TcpStream> {
    let ns = ns.try_clone()?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                use std::os::fd::AsRawFd;
                // SAFETY: setns only reads the descriptor, which `ns` keeps open for the call; the
                // thread is ours and ends right after.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error());
                }
                // After setns, which needs root's capabilities. The raw syscall changes only this
                // thread (which ends right after); setfsuid reports no errors, hence the check.
                // SAFETY: setfsuid has no memory effects.
                unsafe { libc::syscall(libc::SYS_setfsuid, uid) };
                // SAFETY: as above; an invalid uid (-1) changes nothing and returns the current one.
                let now = unsafe { libc::syscall(libc::SYS_setfsuid, u32::MAX) };
                if now != i64::from(uid) {
                    return Err(io::Error::other(format!("could not take uid {uid} for the relayed connection (fsuid {now})")));
                }
                TcpStream::connect_timeout(&addr, Duration::from_secs(2))
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("relay thread panicked")))
    })
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// The daemon decides on the owner of the socket it accepts: through the relay, that socket
    /// must be owned by the relay's client's user, not by root (the relay's own user).
    #[test]
    fn the_daemon_sees_the_relays_client_not_root() {
        let daemon = TcpListener::bind("127.0.0.1:0").unwrap();
        let inner = daemon.local_addr().unwrap();
        let relay = Relay::start_in("127.0.0.1:0".parse().unwrap(), std::path::Path::new("/proc/self/ns/net"), inner).unwrap();
        for uid in [NOBODY, 0] {
            let mut client = connect_as(uid, relay.addr()).unwrap();
            let (accepted, peer) = daemon.accept().unwrap();
            let owner = xdp_lb_common::socket_owner::owner_uid(peer, accepted.local_addr().unwrap());
            assert_eq!(owner, Some(uid), "the relayed connection of a client owned by uid {uid}");
            drop(accepted);
            let mut rest = Vec::new();
            let _ = client.read_to_end(&mut rest);
        }
    }
}
