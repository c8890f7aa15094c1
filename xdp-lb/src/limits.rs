//! File-descriptor limits, and the reserve that keeps health checks and the API socket working
//! when something else (a flood of metrics connections) tries to use them all.
//!
//! At start the daemon raises its soft `RLIMIT_NOFILE` to the hard limit (systemd's default soft
//! limit is 1024). Listeners that strangers can reach — the metrics port — accept a connection
//! only while [`fd_headroom`] exceeds [`reserve`]; health probes and the API socket may use the
//! reserved descriptors. The reserve is two budgets added up: one for the health checks, and one
//! for the API's clients ([`crate::api::MAX_CLIENTS`] plus the one being turned away), so a full
//! API cannot eat the checks' share (hostile 9 H3: at 128 descriptors a metrics flood plus 40 idle
//! API clients made probes fail with EMFILE when the two shared one reserve of 32).

use std::io;

/// The soft and hard `RLIMIT_NOFILE` of this process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NofileLimit {
    pub soft: u64,
    pub hard: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("reading RLIMIT_NOFILE: {0}")]
    Get(io::Error),
    #[error("raising the soft RLIMIT_NOFILE from {from} to {to}: {source}")]
    Raise { from: u64, to: u64, source: io::Error },
    #[error("counting open file descriptors in /proc/self/fd: {0}")]
    Count(io::Error),
}

/// The current limit.
pub fn nofile() -> Result<NofileLimit, LimitsError> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(LimitsError::Get(io::Error::last_os_error()));
    }
    Ok(NofileLimit { soft: limit.rlim_cur, hard: limit.rlim_max })
}

/// Raises the soft limit to the hard one (capped by `fs.nr_open`, since an unlimited hard limit
/// cannot be a soft limit for descriptors). Returns the limit before and after.
pub fn raise_nofile() -> Result<(NofileLimit, NofileLimit), LimitsError> {
    let before = nofile()?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|v| v.trim().parse::<u64>().ok());
    let target = nr_open.map_or(before.hard, |n| before.hard.min(n));
    if target <= before.soft {
        return Ok((before, before));
    }
    let limit = libc::rlimit { rlim_cur: target, rlim_max: before.hard };
    // SAFETY: setrlimit reads the struct we pass; it changes only this process's limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(LimitsError::Raise { from: before.soft, to: target, source: io::Error::last_os_error() });
    }
    Ok((before, nofile()?))
}

/// Descriptors this process has open now (not counting the one used to list them).
pub fn open_fds() -> Result<u64, LimitsError> {
    let entries = std::fs::read_dir("/proc/self/fd").map_err(LimitsError::Count)?;
    Ok(entries.count().saturating_sub(1) as u64)
}

/// Descriptors kept for health probes alone for a process whose soft limit is `limit`: a quarter
/// of it, at least 32 and at most 1024.
pub fn health_reserve(limit: u64) -> u64 {
    (limit / 4).clamp(32, 1024)
}

/// Descriptors kept for the API socket's clients: every client slot, plus the connection accepted
/// only to be told the daemon is busy.
pub const API_RESERVE: u64 = crate::api::MAX_CLIENTS as u64 + 1;

/// Descriptors the metrics listener leaves free for a process whose soft limit is `limit`: the
/// health checks' share plus the API's.
pub fn reserve(limit: u64) -> u64 {
    health_reserve(limit) + API_RESERVE
}

/// How many more descriptors this process may open now (soft limit minus open ones); `None` if
/// that cannot be told — which, since listing /proc/self/fd needs a descriptor itself, is also
/// what a process at its limit sees.
pub fn fd_headroom() -> Option<u64> {
    let limit = nofile().ok()?;
    Some(limit.soft.saturating_sub(open_fds().ok()?))
}

/// Whether a listener strangers can reach may take one more connection without eating into the
/// reserve.
pub fn outside_reserve() -> bool {
    let Ok(limit) = nofile() else { return false };
    fd_headroom().is_some_and(|headroom| headroom > reserve(limit.soft))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_health_reserve_is_a_bounded_quarter() {
        assert_eq!(health_reserve(64), 32);
        assert_eq!(health_reserve(1024), 256);
        assert_eq!(health_reserve(1 << 20), 1024);
    }

    /// Hostile 9 H3: with every API slot taken, the health checks still have their own share.
    #[test]
    fn a_full_api_leaves_the_health_reserve_whole() {
        for limit in [96, 128, 256, 1024, 65536] {
            let api = crate::api::MAX_CLIENTS as u64 + 1;
            assert!(reserve(limit) >= api + health_reserve(limit), "limit {limit}: reserve {}", reserve(limit));
            assert!(reserve(limit) - api >= 32, "limit {limit}");
        }
    }

    #[test]
    fn open_descriptors_are_counted() {
        let files: Vec<std::fs::File> = (0..5).map(|_| std::fs::File::open("/proc/self/stat").expect("open")).collect();
        let during = open_fds().expect("count");
        drop(files);
        // Other tests of this process open and close descriptors too, so only a lower bound holds:
        // the five files plus stdin, stdout and stderr.
        assert!(during >= 8, "{during}");
        assert!(fd_headroom().is_some());
    }

    const RAISE_CHILD: &str = "XDP_LB_TEST_RAISE_CHILD";

    /// From a low soft limit (systemd's default is 1024) to the hard one, capped by `fs.nr_open`;
    /// the hard limit stays. In a child process of this test binary: lowering the limit in this
    /// one could starve the tests running beside it.
    #[test]
    fn raising_lifts_the_soft_limit_to_the_hard_one() {
        if std::env::var_os(RAISE_CHILD).is_some() {
            let start = nofile().expect("limit");
            let low = libc::rlimit { rlim_cur: 64, rlim_max: start.hard };
            // SAFETY: setrlimit reads the struct we pass; it changes only this (child) process.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0, "lowering the soft limit");
            let (before, after) = raise_nofile().expect("raise");
            let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open").expect("fs.nr_open").trim().parse().expect("a number");
            assert_eq!(before, NofileLimit { soft: 64, hard: start.hard });
            assert_eq!(after, NofileLimit { soft: start.hard.min(nr_open), hard: start.hard }, "not raised to the hard limit");
            assert_eq!(nofile().expect("limit"), after, "the returned limit is not the process's");
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "limits::tests::raising_lifts_the_soft_limit_to_the_hard_one", "--nocapture", "--test-threads=1"])
            .env(RAISE_CHILD, "1")
            .output()
            .expect("running the child");
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && stdout.contains("1 passed"), "child failed:\n{stdout}\n{stderr}");
    }
}
