//! One announcing daemon per routing table and network namespace. Each daemon makes its table
//! hold exactly its own routes, so two daemons sharing a table delete each other's routes on every
//! reconcile and BGP flaps with nobody told (issue 11 F3). An exclusive `flock` on a file named by
//! the namespace and the table refuses the second; the kernel releases it when the holder exits,
//! however it exits, so a crash never leaves a stale lock.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read, Seek, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Where the lock files live.
pub const LOCK_DIR: &str = "/run/xdp-lb";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "[announce] table {table} is already used by another xdp-lb daemon in this network namespace{}: \
         each daemon removes every route of the table that is not its own, so two would delete each other's \
         routes and BGP would flap; give this one another table (and a BIRD kernel protocol learning it), or stop the other (lock file {})",
        holder.as_ref().map(|h| format!(" ({h})")).unwrap_or_default(),
        path.display()
    )]
    Taken { table: u32, holder: Option<String>, path: PathBuf },
    #[error("[announce] table {table}: cannot lock {}: {source}", path.display())]
    Io { table: u32, path: PathBuf, source: std::io::Error },
}

/// Held while this daemon announces into `table`; dropping it releases the table.
#[derive(Debug)]
pub struct TableLock {
    table: u32,
    _file: File,
}

impl TableLock {
    /// Locks `table` of this process's network namespace in [`LOCK_DIR`].
    pub fn acquire(table: u32) -> Result<TableLock, LockError> {
        TableLock::acquire_in(Path::new(LOCK_DIR), table)
    }

    pub fn acquire_in(dir: &Path, table: u32) -> Result<TableLock, LockError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LockError::Io { table, path, source }
        };
        // Daemons in different namespaces (one per node, all with table 100) do not conflict.
        let netns = std::fs::metadata("/proc/self/ns/net").map_err(io(Path::new("/proc/self/ns/net")))?.ino();
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let path = dir.join(format!("announce-{netns}-{table}.lock"));
        // Not truncated on open: the holder's pid is in it.
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = text.trim().parse::<u32>().ok().map(|pid| format!("pid {pid}"));
                return Err(LockError::Taken { table, holder, path });
            }
            Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        let written = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
        written.map_err(io(&path))?;
        Ok(TableLock { table, _file: file })
    }

    pub fn table(&self) -> u32 {
        self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_a_table_is_refused_naming_the_table_and_holder_and_freed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = TableLock::acquire_in(dir.path(), 100).unwrap();
        let e = TableLock::acquire_in(dir.path(), 100).unwrap_err().to_string();
        assert!(e.starts_with("[announce] table 100 is already used by another xdp-lb daemon"), "{e}");
        assert!(e.contains(&format!("(pid {})", std::process::id())), "{e}");
        // Another table is free.
        let other = TableLock::acquire_in(dir.path(), 101).unwrap();
        assert_eq!(other.table(), 101);
        drop(first);
        TableLock::acquire_in(dir.path(), 100).unwrap();
    }
}
