//! One announcing daemon per routing table and network namespace. Each daemon makes its table
//! hold exactly its own routes, so two daemons sharing a table delete each other's routes on every
//! reconcile and BGP flaps with nobody told (issue 11 F3).
//!
//! The lock is a listening Unix socket in the abstract namespace, `@xdp-lb-announce-table-N`:
//! abstract names belong to a network namespace, which is exactly the scope of a routing table
//! (daemons on different nodes, each in its own namespace with table 100, do not conflict); the
//! kernel frees the name when the holder exits, however it exits; and no file system path is
//! needed, which the systemd units' sandbox (a private, read-only `/run` per instance) would
//! not share between instances. The second daemon learns the holder's pid by connecting to it
//! (`SO_PEERCRED`).

use std::{
    io,
    os::{
        fd::AsRawFd,
        linux::net::SocketAddrExt,
        unix::net::{SocketAddr, UnixListener, UnixStream},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "[announce] table {table} is already used by another xdp-lb daemon in this network namespace{}: \
         each daemon removes every route of the table that is not its own, so two would delete each other's \
         routes and BGP would flap; give this one another table (and a BIRD kernel protocol learning it), or stop the other",
        holder.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
    )]
    Taken { table: u32, holder: Option<i32> },
    #[error("[announce] table {table}: cannot take the table's lock (abstract socket @{name}): {source}")]
    Io { table: u32, name: String, source: io::Error },
}

/// Held while this daemon announces into `table`; dropping it releases the table.
#[derive(Debug)]
pub struct TableLock {
    table: u32,
    _listener: UnixListener,
}

impl TableLock {
    /// Locks `table` of this process's network namespace.
    pub fn acquire(table: u32) -> Result<TableLock, LockError> {
        TableLock::acquire_named(&format!("xdp-lb-announce-table-{table}"), table)
    }

    fn acquire_named(name: &str, table: u32) -> Result<TableLock, LockError> {
        let io = |source| LockError::Io { table, name: name.to_string(), source };
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(io)?;
        match UnixListener::bind_addr(&addr) {
            Ok(listener) => Ok(TableLock { table, _listener: listener }),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(LockError::Taken { table, holder: holder_pid(&addr) }),
            Err(e) => Err(io(e)),
        }
    }

    pub fn table(&self) -> u32 {
        self.table
    }
}

/// The pid of the process listening on `addr`, if it can be asked.
fn holder_pid(addr: &SocketAddr) -> Option<i32> {
    let stream = UnixStream::connect_addr(addr).ok()?;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt(2) writes at most `len` bytes into `cred`, a valid `ucred` we own.
    let rc = unsafe { libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len) };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_table_is_refused_naming_the_table_and_holder_and_freed_on_drop() {
        // A name of this test's own, so a daemon running on the host does not interfere.
        let name = format!("xdp-lb-test-lock-{}", std::process::id());
        let first = TableLock::acquire_named(&name, 100).unwrap();
        let e = TableLock::acquire_named(&name, 100).unwrap_err().to_string();
        assert!(e.starts_with("[announce] table 100 is already used by another xdp-lb daemon"), "{e}");
        assert!(e.contains(&format!("(pid {})", std::process::id())), "{e}");
        // Another name (another table) is free.
        let other = TableLock::acquire_named(&format!("{name}-101"), 101).unwrap();
        assert_eq!(other.table(), 101);
        drop(first);
        TableLock::acquire_named(&name, 100).unwrap();
    }
}
