//! Probe errors that happen on this host, not at the backend.
//!
//! A probe that could not even open a socket (out of file descriptors, ephemeral ports, memory)
//! or was refused by the local firewall says nothing about the backend. Counting it as a failure
//! took every backend down at once when anyone exhausted the daemon's file descriptors (e.g. with
//! idle connections to the metrics port). Such a probe is *inconclusive*: the backend's health and
//! rise/fall counters stay as they are, and the error is counted and logged (rate-limited).

use std::{
    io,
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

/// The same local error is logged at most this often (with how many were not logged).
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a probe failed locally; [`LocalReason::label`] is the `reason` label of
/// `xdp_lb_health_check_local_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalReason {
    /// EMFILE: this process is at its file-descriptor limit.
    ProcessFdLimit,
    /// ENFILE: the system-wide file table is full.
    SystemFdLimit,
    /// ENOBUFS: no kernel buffer space for the socket.
    NoBuffers,
    /// ENOMEM.
    OutOfMemory,
    /// EADDRNOTAVAIL: no free ephemeral port (or the source address is gone).
    NoLocalAddress,
    /// EPERM/EACCES: a local firewall rule (netfilter drops on OUTPUT give EPERM) or policy.
    Forbidden,
}

impl LocalReason {
    pub const ALL: [LocalReason; 6] = [
        LocalReason::ProcessFdLimit,
        LocalReason::SystemFdLimit,
        LocalReason::NoBuffers,
        LocalReason::OutOfMemory,
        LocalReason::NoLocalAddress,
        LocalReason::Forbidden,
    ];

    pub fn label(self) -> &'static str {
        match self {
            LocalReason::ProcessFdLimit => "process_fd_limit",
            LocalReason::SystemFdLimit => "system_fd_limit",
            LocalReason::NoBuffers => "no_buffer_space",
            LocalReason::OutOfMemory => "out_of_memory",
            LocalReason::NoLocalAddress => "no_local_address",
            LocalReason::Forbidden => "local_policy",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Whether `error` arose on this host. Pure: decided by the errno (or, for errors built
    /// without one, the kind), never by the message.
    pub fn classify(error: &io::Error) -> Option<LocalReason> {
        if let Some(errno) = error.raw_os_error() {
            return match errno {
                libc::EMFILE => Some(LocalReason::ProcessFdLimit),
                libc::ENFILE => Some(LocalReason::SystemFdLimit),
                libc::ENOBUFS => Some(LocalReason::NoBuffers),
                libc::ENOMEM => Some(LocalReason::OutOfMemory),
                libc::EADDRNOTAVAIL => Some(LocalReason::NoLocalAddress),
                libc::EPERM | libc::EACCES => Some(LocalReason::Forbidden),
                _ => None,
            };
        }
        match error.kind() {
            io::ErrorKind::OutOfMemory => Some(LocalReason::OutOfMemory),
            io::ErrorKind::AddrNotAvailable => Some(LocalReason::NoLocalAddress),
            io::ErrorKind::PermissionDenied => Some(LocalReason::Forbidden),
            _ => None,
        }
    }
}

impl std::fmt::Display for LocalReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

/// Counts of local probe errors per reason, shared by every check task of a monitor.
#[derive(Debug, Default)]
pub struct LocalErrors {
    counts: [AtomicU64; LocalReason::ALL.len()],
    /// Per reason: when it was last logged and how many occurrences were not logged since.
    logged: Mutex<[(Option<Instant>, u64); LocalReason::ALL.len()]>,
}

impl LocalErrors {
    /// Counts one local error and logs it unless the same reason was logged less than
    /// [`LOG_EVERY`] ago.
    pub fn note(&self, reason: LocalReason, service: &str, backend: std::net::SocketAddr, error: &dyn std::fmt::Display) {
        self.counts[reason.index()].fetch_add(1, Ordering::Relaxed);
        let mut logged = self.logged.lock().unwrap_or_else(PoisonError::into_inner);
        let (last, suppressed) = &mut logged[reason.index()];
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < LOG_EVERY) {
            *suppressed += 1;
            return;
        }
        tracing::warn!(
            %service, %backend, reason = reason.label(), %error, suppressed = *suppressed,
            "health check inconclusive: the probe failed on this host, not at the backend; its health is unchanged"
        );
        *last = Some(now);
        *suppressed = 0;
    }

    /// `(reason label, count)` for every reason, zeros included, so the metric family is complete.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        LocalReason::ALL.iter().map(|r| (r.label(), self.counts[r.index()].load(Ordering::Relaxed))).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_errnos_classify_as_local() {
        for (errno, reason) in [
            (libc::EMFILE, LocalReason::ProcessFdLimit),
            (libc::ENFILE, LocalReason::SystemFdLimit),
            (libc::ENOBUFS, LocalReason::NoBuffers),
            (libc::ENOMEM, LocalReason::OutOfMemory),
            (libc::EADDRNOTAVAIL, LocalReason::NoLocalAddress),
            (libc::EPERM, LocalReason::Forbidden),
            (libc::EACCES, LocalReason::Forbidden),
        ] {
            assert_eq!(LocalReason::classify(&io::Error::from_raw_os_error(errno)), Some(reason), "errno {errno}");
        }
    }

    #[test]
    fn backend_side_errors_are_not_local() {
        for errno in [libc::ECONNREFUSED, libc::ECONNRESET, libc::EHOSTUNREACH, libc::ENETUNREACH, libc::ETIMEDOUT, libc::EPIPE] {
            assert_eq!(LocalReason::classify(&io::Error::from_raw_os_error(errno)), None, "errno {errno}");
        }
        assert_eq!(LocalReason::classify(&io::Error::from(io::ErrorKind::TimedOut)), None);
        assert_eq!(LocalReason::classify(&io::Error::from(io::ErrorKind::UnexpectedEof)), None);
    }

    #[test]
    fn errors_without_an_errno_classify_by_kind() {
        assert_eq!(LocalReason::classify(&io::Error::from(io::ErrorKind::AddrNotAvailable)), Some(LocalReason::NoLocalAddress));
        assert_eq!(LocalReason::classify(&io::Error::from(io::ErrorKind::OutOfMemory)), Some(LocalReason::OutOfMemory));
    }

    #[test]
    fn counts_cover_every_reason() {
        let errors = LocalErrors::default();
        let backend = "127.0.0.1:1".parse().unwrap();
        for _ in 0..3 {
            errors.note(LocalReason::ProcessFdLimit, "web", backend, &"EMFILE");
        }
        let counts = errors.counts();
        assert_eq!(counts.len(), LocalReason::ALL.len());
        assert!(counts.contains(&("process_fd_limit", 3)));
        assert!(counts.contains(&("no_local_address", 0)));
    }
}
