//! The worker threads connections are served on, and the counts that decide which one
//! accepts a new connection and whether a listener takes one more.
//!
//! Every worker accepts from each listener's one socket (each holds a duplicate of it
//! in its own reactor), so a worker busy with requests never delays a new connection:
//! another worker takes it. A worker serving more connections than another one leaves
//! a new connection to the others (`leave_to_others`) until one of them has taken one
//! and the counts are even again, or for at most `ACCEPT_DEFERRAL` if none does (they
//! may all be busy); then it takes what is waiting itself. That spreads connections
//! evenly without slowing a burst: the workers take turns at the speed of a wake-up,
//! not of a timer (waiting out the timer for every connection accepted at most one
//! connection per millisecond per worker, ~1.4k new connections/s). Per-worker
//! `SO_REUSEPORT` sockets, which this replaced, spread connections by a hash of their
//! addresses: 32 connections over 2 workers split 21:11 often enough that the busier
//! worker's queue set the p99 latency. A hand-over from one accepting worker to the one
//! serving fewest, tried next, made every accept wait for that worker's request work,
//! and let a client steer where later connections land by closing its own.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long at most a worker serving more connections than another leaves a new
/// connection to the others. Long enough for an idle worker to wake and accept; short
/// enough that a connection waits unnoticed when every other worker is busy.
pub const ACCEPT_DEFERRAL: Duration = Duration::from_millis(1);

/// The runtimes connections are served on, and how many each serves now.
#[derive(Clone)]
pub struct Workers(Arc<Shared>);

struct Shared {
    workers: Box<[Worker]>,
    /// Signalled whenever a count changes, for workers waiting in `leave_to_others`.
    counts_changed: Notify,
}

struct Worker {
    handle: tokio::runtime::Handle,
    live: AtomicUsize,
}

impl Workers {
    pub fn new(handles: Vec<tokio::runtime::Handle>) -> Workers {
        Workers(Arc::new(Shared {
            workers: handles
                .into_iter()
                .map(|handle| Worker {
                    handle,
                    live: AtomicUsize::new(0),
                })
                .collect(),
            counts_changed: Notify::new(),
        }))
    }

    pub fn len(&self) -> usize {
        self.0.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.workers.is_empty()
    }

    pub fn handle(&self, index: usize) -> &tokio::runtime::Handle {
        &self.0.workers[index].handle
    }

    /// Whether another worker serves fewer connections than `index` does (so
    /// `index` should leave a new connection to it first).
    pub fn busier_than_another(&self, index: usize) -> bool {
        let mine = self.0.workers[index].live.load(Relaxed);
        self.0.workers.iter().any(|w| w.live.load(Relaxed) < mine)
    }

    /// Wait while another worker serves fewer connections than `index` does, so that
    /// one of them takes the connection waiting to be accepted. True when the counts
    /// evened out (another worker took a connection, or one of `index`'s closed); false
    /// when `ACCEPT_DEFERRAL` passed first: the others are not accepting promptly.
    pub async fn leave_to_others(&self, index: usize) -> bool {
        let deadline = tokio::time::Instant::now() + ACCEPT_DEFERRAL;
        loop {
            let changed = self.0.counts_changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the counts are read, so a change in between wakes it.
            changed.as_mut().enable();
            if !self.busier_than_another(index) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Count one more connection on `index` until the returned value is dropped.
    pub fn count(&self, index: usize) -> Counted {
        self.0.workers[index].live.fetch_add(1, Relaxed);
        self.0.counts_changed.notify_waiters();
        Counted {
            workers: self.clone(),
            index,
        }
    }

    /// How many connections each worker serves now.
    pub fn live(&self) -> Vec<usize> {
        self.0.workers.iter().map(|w| w.live.load(Relaxed)).collect()
    }
}

/// One connection counted on its worker while it lives.
pub struct Counted {
    workers: Workers,
    index: usize,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let shared = &self.workers.0;
        shared.workers[self.index].live.fetch_sub(1, Relaxed);
        shared.counts_changed.notify_waiters();
    }
}

/// A listener's open connections, over all workers. The limit is passed at each
/// admission (the configuration's current `max_connections`), so a reload that
/// changes it applies to the next connection.
#[derive(Default)]
pub struct OpenConnections(AtomicUsize);

/// One admitted connection; it leaves the count when dropped.
pub struct Admitted(Arc<OpenConnections>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Relaxed);
    }
}

impl OpenConnections {
    /// Admit one more connection if fewer than `max` are open.
    pub fn admit(self: &Arc<Self>, max: usize) -> Option<Admitted> {
        self.0
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| Admitted(self.clone()))
    }

    pub fn open(&self) -> usize {
        self.0.load(Relaxed)
    }
}

/// At most one warning per second for a kind of event a client can cause at will
/// (refused connections), with the number it stood for: a flood of cheap connections
/// must not become a flood of log lines.
#[derive(Default)]
pub struct WarnEverySecond {
    /// The second (of `base`) of the last warning, plus one; 0: never warned.
    last: AtomicU64,
    /// Events since the last warning.
    since: AtomicU64,
}

impl WarnEverySecond {
    /// Count one event; `Some(n)` if it should be warned about now, standing for `n`
    /// events (this one included). `now_secs`: a monotonic clock in seconds.
    pub fn event(&self, now_secs: u64) -> Option<u64> {
        self.since.fetch_add(1, Relaxed);
        self.take_if_due(now_secs).map(|n| n.max(1))
    }

    /// The events counted since the last warning, if there are any and a warning is
    /// allowed now (they are then taken): what a burst left unreported once its
    /// second is over, for a periodic flush to warn about.
    pub fn unreported(&self, now_secs: u64) -> Option<u64> {
        if self.since.load(Relaxed) == 0 {
            return None;
        }
        self.take_if_due(now_secs).filter(|&n| n > 0)
    }

    /// Claim the warning of second `now_secs` if none was given in it, and take the
    /// count. One thread wins the second; the others keep counting.
    fn take_if_due(&self, now_secs: u64) -> Option<u64> {
        let last = self.last.load(Relaxed);
        if last != 0 && now_secs < last {
            return None;
        }
        self.last
            .compare_exchange(last, now_secs + 1, Relaxed, Relaxed)
            .ok()?;
        Some(self.since.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_read_at_each_admission() {
        let open = Arc::new(OpenConnections::default());
        let a = open.admit(2).expect("first");
        let _b = open.admit(2).expect("second");
        assert!(open.admit(2).is_none(), "full at 2");
        assert!(open.admit(3).is_some(), "a raised limit applies at once");
        assert_eq!(open.open(), 2, "the refused one and the dropped one are not counted");
        drop(a);
        assert!(open.admit(1).is_none(), "a lowered limit refuses while above it");
        assert_eq!(open.open(), 1);
    }

    #[test]
    fn counts_follow_connections_and_name_the_busier_worker() {
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let w = Workers::new(vec![rt.handle().clone(), rt.handle().clone()]);
        assert!(!w.busier_than_another(0) && !w.busier_than_another(1), "equal");
        let c = w.count(0);
        assert!(w.busier_than_another(0));
        assert!(!w.busier_than_another(1));
        assert_eq!(w.live(), [1, 0]);
        drop(c);
        assert_eq!(w.live(), [0, 0]);
    }

    /// A worker leaving a connection to another goes on the moment that one takes a
    /// connection (the clock is paused: waiting out `ACCEPT_DEFERRAL` would advance it).
    #[tokio::test(start_paused = true)]
    async fn a_deferring_worker_goes_on_as_soon_as_the_counts_even_out() {
        let w = Workers::new(vec![tokio::runtime::Handle::current(); 2]);
        let _first = w.count(0);
        let started = tokio::time::Instant::now();
        let waiting = tokio::spawn({
            let w = w.clone();
            async move { w.leave_to_others(0).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "worker 0 serves one more: it waits");
        let _taken_by_the_other = w.count(1);
        assert!(waiting.await.expect("task"), "evened out");
        assert_eq!(started.elapsed(), Duration::ZERO, "without waiting for a timer");
    }

    /// When no other worker takes a connection, the busier one waits `ACCEPT_DEFERRAL`
    /// and no longer; a worker with no fewer connections than the others does not wait.
    #[tokio::test(start_paused = true)]
    async fn a_deferring_worker_waits_at_most_the_deferral() {
        let w = Workers::new(vec![tokio::runtime::Handle::current(); 2]);
        let started = tokio::time::Instant::now();
        assert!(w.leave_to_others(0).await, "equal counts");
        assert_eq!(started.elapsed(), Duration::ZERO);
        let _first = w.count(0);
        assert!(w.leave_to_others(1).await, "the one serving fewer");
        assert!(!w.leave_to_others(0).await, "nobody took it");
        assert_eq!(started.elapsed(), ACCEPT_DEFERRAL);
    }

    #[test]
    fn warnings_come_at_most_once_a_second_with_the_count() {
        let w = WarnEverySecond::default();
        assert_eq!(w.event(10), Some(1), "the first is warned");
        for _ in 0..99 {
            assert_eq!(w.event(10), None, "the same second");
        }
        assert_eq!(w.event(11), Some(100), "the next second stands for all since");
        assert_eq!(w.event(11), None);
        // Hostile test s16-F5: a burst's events after its first warning were reported
        // only with the next event, whenever (if ever) that came.
        for _ in 0..1899 {
            assert_eq!(w.event(11), None);
        }
        assert_eq!(w.unreported(11), None, "not within the warned second");
        assert_eq!(w.unreported(12), Some(1900), "flushed once the second is over");
        assert_eq!(w.unreported(13), None, "nothing new");
        assert_eq!(w.event(14), Some(1), "counting starts over");
    }
}
